"""Noise schedules and the shared sampling loop (models/sampling.py)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    UNet2DConditionModel,
)

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models.denoiser import Denoiser
from consistent_avatar.models.sampling import (
    alpha_bar,
    denoise,
    inference_scheduler,
    predict_x0,
    sample,
    training_scheduler,
)

KINDS = ("ddim", "dpm", "lcm")


class UNetEps(torch.nn.Module):
    """A plain diffusers UNet as a :class:`Denoiser` (the stage wrappers do the same with more cond)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class OracleEps:
    """The exact ε of x_t for a known x_0 (passed per frame in cond): a perfect ε-model."""

    def __init__(self) -> None:
        self.schedule = training_scheduler()
        self.calls = 0

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        self.calls += 1
        a = alpha_bar(self.schedule, timestep, sample)
        return (sample - a.sqrt() * cond["x0"]) / (1 - a).sqrt()


@pytest.fixture(scope="module")
def tiny_unet() -> UNetEps:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return UNetEps(unet).eval()


def unet_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return noise, {"encoder_hidden_states": torch.randn(batch, 3, 32, generator=g)}


def test_training_schedule_is_sd15() -> None:
    s = training_scheduler()
    assert isinstance(s, DDPMScheduler)
    assert s.config.num_train_timesteps == 1000
    assert s.config.beta_schedule == "scaled_linear"
    assert s.config.prediction_type == "epsilon"
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-5)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_schedulers_share_the_training_noise_schedule(kind: str) -> None:
    s = inference_scheduler(kind, 4)  # type: ignore[arg-type]
    expected = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "lcm": LCMScheduler}[kind]
    assert isinstance(s, expected)
    assert torch.equal(s.alphas_cumprod, training_scheduler().alphas_cumprod)
    assert len(s.timesteps) == 4
    assert int(s.timesteps[0]) == 999  # few-step sampling starts from (almost) pure noise


def test_lcm_grid_follows_original_steps() -> None:
    s = inference_scheduler("lcm", 50)
    assert s.timesteps.tolist() == list(range(999, 0, -20))
    s = inference_scheduler("lcm", 2, original_steps=10)
    assert all((int(t) + 1) % 100 == 0 for t in s.timesteps)


def test_add_noise_and_perfect_eps_reconstruct_x0() -> None:
    s = training_scheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    eps = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 700, 999])
    xt = s.add_noise(x0, eps, t)
    assert not torch.allclose(xt, x0, atol=1e-2)
    torch.testing.assert_close(predict_x0(xt, eps, t, s), x0, atol=1e-4, rtol=1e-4)
    # a scalar timestep broadcasts over the batch
    xt = s.add_noise(x0, eps, torch.full((5,), 500))
    torch.testing.assert_close(predict_x0(xt, eps, 500, s), x0, atol=1e-4, rtol=1e-4)
    # a wrong ε does not reconstruct
    assert not torch.allclose(predict_x0(xt, torch.zeros_like(eps), 500, s), x0, atol=1e-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_oracle_denoiser_samples_x0(kind: str, steps: int) -> None:
    """A perfect ε-model must land on its x_0 under every sampler (DDIM ends at ᾱ_0, not 1)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    oracle = OracleEps()
    out = sample(
        oracle, noise, {"x0": x0}, inference_scheduler(kind, steps), steps, torch.Generator().manual_seed(0)
    )  # type: ignore[arg-type]
    assert oracle.calls == steps  # one batched call per step, no per-frame loop
    if kind == "ddim":
        # every x0 prediction is exact, and the DDIM direction stays the first step's ε̂
        a = training_scheduler().alphas_cumprod
        eps_first = (noise - a[999].sqrt() * x0) / (1 - a[999]).sqrt()
        expected = a[0].sqrt() * x0 + (1 - a[0]).sqrt() * eps_first
    else:
        expected = x0
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_unet_sampling_shapes(tiny_unet: UNetEps, kind: str, steps: int) -> None:
    assert isinstance(tiny_unet, Denoiser)
    noise, cond = unet_inputs()
    out = sample(
        tiny_unet, noise, cond, inference_scheduler(kind, steps), steps, torch.Generator().manual_seed(0)
    )  # type: ignore[arg-type]
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, noise)


def test_lcm_determinism_by_generator(tiny_unet: UNetEps) -> None:
    noise, cond = unet_inputs()
    s = inference_scheduler("lcm", 4)
    a = sample(tiny_unet, noise, cond, s, 4, torch.Generator().manual_seed(7))
    b = sample(tiny_unet, noise, cond, s, 4, torch.Generator().manual_seed(7))
    c = sample(tiny_unet, noise, cond, s, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # LCM injects noise between steps


def test_ddim_eta0_deterministic_without_generator(tiny_unet: UNetEps) -> None:
    noise, cond = unet_inputs()
    s = inference_scheduler("ddim", 3)
    assert torch.equal(sample(tiny_unet, noise, cond, s, 3), sample(tiny_unet, noise, cond, s, 3))
    a = sample(tiny_unet, noise, cond, s, 3, torch.Generator().manual_seed(1), eta=1.0)
    b = sample(tiny_unet, noise, cond, s, 3, torch.Generator().manual_seed(1), eta=1.0)
    c = sample(tiny_unet, noise, cond, s, 3, torch.Generator().manual_seed(2), eta=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_dpm_is_deterministic_and_reusable(tiny_unet: UNetEps) -> None:
    noise, cond = unet_inputs()
    s = inference_scheduler("dpm", 4)
    first = sample(tiny_unet, noise, cond, s, 4)
    sample(tiny_unet, noise * 2, cond, s, 2)  # other work on the same scheduler in between
    assert torch.equal(first, sample(tiny_unet, noise, cond, s, 4))


def test_batch_equals_frames_one_by_one(tiny_unet: UNetEps) -> None:
    noise, cond = unet_inputs(batch=3)
    s = inference_scheduler("ddim", 2)
    batched = sample(tiny_unet, noise, cond, s, 2)
    single = torch.cat(
        [
            sample(tiny_unet, noise[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()}, s, 2)
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("kind", "steps"),
    [("euler", 4), ("ddim", 0), ("ddim", 1001), ("dpm", -1), ("lcm", 51), ("lcm", 2.0), ("ddim", True)],
)
def test_bad_kind_or_steps(kind: str, steps: object) -> None:
    with pytest.raises(ConsistentAvatarError, match="kind|num_steps"):
        inference_scheduler(kind, steps)  # type: ignore[arg-type]


def test_bad_inputs_are_named(tiny_unet: UNetEps) -> None:
    noise, cond = unet_inputs()
    s = inference_scheduler("ddim", 2)
    with pytest.raises(ConsistentAvatarError, match="num_steps"):
        sample(tiny_unet, noise, cond, s, 0)
    with pytest.raises(ConsistentAvatarError, match="noise"):
        sample(tiny_unet, noise[0], cond, s, 2)
    with pytest.raises(ConsistentAvatarError, match="encoder_hidden_states"):
        sample(tiny_unet, noise, {"encoder_hidden_states": cond["encoder_hidden_states"][:1]}, s, 2)
    with pytest.raises(ConsistentAvatarError, match="eta"):
        sample(tiny_unet, noise, cond, inference_scheduler("lcm", 2), 2, eta=0.5)
    with pytest.raises(ConsistentAvatarError, match="shaped like"):
        sample(lambda x, t, c: x[:, :3], noise, cond, s, 2)
    with pytest.raises(ConsistentAvatarError, match="timesteps"):
        predict_x0(noise, noise, 1000, training_scheduler())
    with pytest.raises(ConsistentAvatarError, match="original_steps"):
        inference_scheduler("lcm", 1, original_steps=0)
    with pytest.raises(ConsistentAvatarError, match="spacing"):
        inference_scheduler("ddim", 1, spacing="random")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["lcm", "ddim", "dpm"])
def test_sample_keeps_timesteps_on_the_host(kind: str) -> None:
    """The scheduler's timesteps stay on the CPU and the denoiser gets a (B,) long timestep filled on
    the sample's device: no host↔device copy (a CUDA sync) per step. The "meta" device stands in
    for a GPU: a device timestep indexing the schedulers' host tables would fail on it."""
    seen: set[tuple[str, torch.dtype, tuple[int, ...]]] = set()

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        seen.add((t.device.type, t.dtype, tuple(t.shape)))
        return torch.zeros_like(x)

    scheduler = inference_scheduler(kind, 4)  # type: ignore[arg-type]
    out = sample(denoiser, torch.randn(2, 4, 8, 8, device="meta"), {}, scheduler, 4, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 8)
    assert scheduler.timesteps.device.type == "cpu"
    assert seen == {("meta", torch.long, (2,))}


def test_denoise_accepts_per_frame_timesteps_from_the_host() -> None:
    got: list[torch.Tensor] = []

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        got.append(t)
        return torch.zeros_like(x)

    x = torch.zeros(3, 4, 8, 8)
    denoise(denoiser, x, torch.tensor([5, 6, 7]), {})
    denoise(denoiser, x, 9, {})
    assert got[0].tolist() == [5, 6, 7] and got[1].tolist() == [9, 9, 9]


def test_alpha_bar_refuses_timesteps_outside_the_schedule() -> None:
    """On the CPU the range is checked on the host with the values in the message (on a GPU it is
    asserted on the device: reading the values back would synchronise every LCM training step)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    like = torch.zeros(2, 4, 8, 8)
    a = alpha_bar(scheduler, torch.tensor([0, 999]), like)
    assert a.shape == (2, 1, 1, 1) and torch.equal(a.flatten(), scheduler.alphas_cumprod[[0, 999]].float())
    with pytest.raises(ConsistentAvatarError, match=r"timesteps must lie in \[0, 1000\), got \[3, 1000\]"):
        alpha_bar(scheduler, torch.tensor([3, 1000]), like)
    with pytest.raises(ConsistentAvatarError, match="must lie in"):
        alpha_bar(scheduler, -1, like)
