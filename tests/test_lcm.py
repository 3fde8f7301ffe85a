"""Latent consistency distillation (models/lcm.py)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from torch import nn

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.models.lcm import (
    ConsistencyDistiller,
    LCMDistillConfig,
    boundary_scalings,
    consistency_function,
)
from consistent_avatar.models.sampling import alpha_bar, sample, training_scheduler


class UNetEps(nn.Module):
    """A plain diffusers UNet as a Denoiser (the stage wrappers do the same with more cond)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class OracleEps(nn.Module):
    """The exact ε of x_t for the x_0 given per frame in cond: a perfect (parameter-free) ε-model."""

    def __init__(self) -> None:
        super().__init__()
        self.schedule = training_scheduler()

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        a = alpha_bar(self.schedule, timestep, sample)
        return (sample - a.sqrt() * cond["x0"]) / (1 - a).sqrt()


class ScaleEps(nn.Module):
    """ε̂ = w·x, with one trainable and one frozen parameter: EMA arithmetic on scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.w * sample + self.frozen


def tiny_unet_eps(seed: int = 0) -> UNetEps:
    torch.manual_seed(seed)
    return UNetEps(
        UNet2DConditionModel(
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
    )


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), {"encoder_hidden_states": torch.randn(n, 3, 32, generator=g)}


def test_boundary_conditions_match_lcm_scheduler() -> None:
    c_skip, c_out = boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # f(x, 0) = x
    c_skip, c_out = boundary_scalings(torch.tensor([999]))
    assert c_skip.item() < 1e-6 and c_out.item() == pytest.approx(1.0, abs=1e-6)
    for scaling in (10.0, 0.1):
        ref = LCMScheduler(timestep_scaling=scaling)
        for t in (0, 1, 19, 259, 999):
            want = ref.get_scalings_for_boundary_condition_discrete(t)
            got = boundary_scalings(torch.tensor([t]), scaling)
            assert got[0].item() == pytest.approx(want[0], rel=1e-5, abs=1e-12)
            assert got[1].item() == pytest.approx(want[1], rel=1e-5, abs=1e-12)


def test_consistency_function_is_identity_at_t0() -> None:
    x, _ = batch(2)
    f = consistency_function(ScaleEps(), x, torch.zeros(2, dtype=torch.long), {}, training_scheduler())
    torch.testing.assert_close(f, x)


def test_default_config_is_the_lcm_papers() -> None:
    d = ConsistencyDistiller(ScaleEps())
    assert d.skip == 20
    assert d.timesteps.tolist() == list(range(19, 1000, 20))
    c = d.config
    assert (c.num_ddim_timesteps, c.loss_type, c.huber_c, c.ema_decay, c.timestep_scaling) == (
        50,
        "huber",
        0.001,
        0.95,
        10.0,
    )


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
@pytest.mark.parametrize("skip", [1, 2])
def test_loss_closed_form_with_perfect_teacher(loss_type: str, skip: int) -> None:
    """With an exact ε-model everything is analytic: x̂_{t_n} lies on the true trajectory."""
    config = LCMDistillConfig.parse(
        {"loss_type": loss_type, "skip_ddim_steps": skip, "timestep_scaling": 0.1}
    )
    d = ConsistencyDistiller(OracleEps(), config)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t_start = torch.tensor([19, 39, 519, 999])
    got = d.loss_at(x0, {"x0": x0}, t_start, noise)

    a = training_scheduler().alphas_cumprod
    ref = LCMScheduler(timestep_scaling=0.1)
    expected_terms = []
    for i, s in enumerate(t_start.tolist()):
        e = max(s - 20 * skip, 0)
        x_s = a[s].sqrt() * x0[i] + (1 - a[s]).sqrt() * noise[i]
        x_e = a[e].sqrt() * x0[i] + (1 - a[e]).sqrt() * noise[i]
        cs_s, co_s = ref.get_scalings_for_boundary_condition_discrete(s)
        cs_e, co_e = ref.get_scalings_for_boundary_condition_discrete(e)
        expected_terms.append((cs_s * x_s + co_s * x0[i]) - (cs_e * x_e + co_e * x0[i]))
    diff = torch.stack(expected_terms)
    if loss_type == "l2":
        expected = diff.pow(2).mean()
    else:
        expected = (torch.sqrt(diff.pow(2) + 1e-6) - 1e-3).mean()
    assert expected.item() > 1e-4  # the case is not trivially zero
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_draw_is_seeded_and_on_the_grid() -> None:
    d = ConsistencyDistiller(ScaleEps())
    x0, _ = batch(16)
    t1, n1 = d.draw(x0, torch.Generator().manual_seed(5))
    t2, n2 = d.draw(x0, torch.Generator().manual_seed(5))
    t3, _ = d.draw(x0, torch.Generator().manual_seed(6))
    assert torch.equal(t1, t2) and torch.equal(n1, n2) and not torch.equal(t1, t3)
    assert set(t1.tolist()) <= set(d.timesteps.tolist())
    assert n1.shape == x0.shape


def test_draw_copies_no_host_tensor_to_the_generator_device() -> None:
    """The step's draw happens where its generator is (the training GPU): t_{n+k} comes from the drawn
    index there, not from copying the CPU grid over, which on a GPU is a blocking copy (a host sync)
    every step. On CPU the copy is free, so the test watches for the call itself."""
    from torch.overrides import TorchFunctionMode

    d = ConsistencyDistiller(ScaleEps())
    x0, _ = batch(16)
    moved: list[torch.Tensor] = []

    class WatchTo(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.Tensor.to and args and args[0] is d.timesteps:
                moved.append(args[0])
            return func(*args, **(kwargs or {}))

    with WatchTo():
        t, _ = d.draw(x0, torch.Generator().manual_seed(5))
    assert not moved
    index = torch.randint(0, len(d.timesteps), (16,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(t, d.timesteps[index]) and t.dtype == d.timesteps.dtype  # the same draw as before


def test_ema_update_math() -> None:
    teacher = ScaleEps()
    d = ConsistencyDistiller(teacher, {"ema_decay": 0.95})
    with torch.no_grad():
        d.student.w.fill_(1.0)
        d.student.frozen.fill_(5.0)
    d.update_target()
    assert d.target.w.item() == pytest.approx(0.05)
    d.update_target()
    assert d.target.w.item() == pytest.approx(0.95 * 0.05 + 0.05)
    assert d.target.frozen.item() == 0.0  # frozen parameters are copies, never averaged
    assert teacher.w.item() == 0.0  # the teacher is not the student
    assert d.student.w.requires_grad and not d.target.w.requires_grad and not teacher.w.requires_grad


def test_only_the_student_gets_gradients() -> None:
    teacher = tiny_unet_eps()
    d = ConsistencyDistiller(teacher, {"loss_type": "l2"})
    x0, cond = batch(2)
    loss = d.loss(x0, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in d.target.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in d.student.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert not any(p.requires_grad for p in d.target.parameters())


def test_student_runner_override() -> None:
    """A wrapper around the student (e.g. a DeepSpeed engine) can run θ in the loss."""
    d = ConsistencyDistiller(tiny_unet_eps(), {"loss_type": "l2"})
    x0, cond = batch(2)
    t, noise = d.draw(x0, torch.Generator().manual_seed(4))
    plain = d.loss_at(x0, cond, t, noise)
    torch.testing.assert_close(
        d.loss_at(x0, cond, t, noise, student=lambda x, ts, c: d.student(x, ts, c)), plain
    )
    other = tiny_unet_eps(seed=1)
    assert not torch.allclose(d.loss_at(x0, cond, t, noise, student=other), plain)


def test_distillation_reduces_the_consistency_loss() -> None:
    d = ConsistencyDistiller(tiny_unet_eps())
    x0, cond = batch(4)
    opt = torch.optim.Adam(d.trainable_parameters(), lr=1e-4)
    losses = []
    for _ in range(30):
        loss = d.loss(x0, cond, torch.Generator().manual_seed(0))  # a fixed batch: same t and ε
        opt.zero_grad()
        loss.backward()
        opt.step()
        d.update_target()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert losses[-1] < losses[0], losses


def test_distilled_student_samples_with_matching_lcm_scheduler() -> None:
    d = ConsistencyDistiller(tiny_unet_eps(), {"num_ddim_timesteps": 10})
    full = d.inference_scheduler(10)
    assert full.timesteps.tolist() == d.timesteps.flip(0).tolist()
    noise, cond = batch(2, seed=1)
    out = sample(d.student, noise, cond, d.inference_scheduler(4), 4, torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ConsistentAvatarError, match="num_steps"):
        d.inference_scheduler(11)  # beyond the distillation grid


def test_bad_configs_and_inputs() -> None:
    with pytest.raises(ConsistentAvatarError, match="loss_type"):
        LCMDistillConfig.parse({"loss_type": "l1"})
    with pytest.raises(ConsistentAvatarError, match="skip_ddim_steps"):
        ConsistencyDistiller(ScaleEps(), {"num_ddim_timesteps": 4, "skip_ddim_steps": 4})
    with pytest.raises(ConsistentAvatarError, match="ema_decay"):
        LCMDistillConfig.parse({"ema_decay": 1.5})
    with pytest.raises(ConsistentAvatarError, match="nn.Module"):
        ConsistencyDistiller(lambda x, t, c: x)  # type: ignore[arg-type]
    d = ConsistencyDistiller(tiny_unet_eps())
    x0, cond = batch(2)
    with pytest.raises(ConsistentAvatarError, match="x0"):
        d.loss(x0[0], cond)
    with pytest.raises(ConsistentAvatarError, match="encoder_hidden_states"):
        d.loss(x0, {"encoder_hidden_states": cond["encoder_hidden_states"][:1]})
    with pytest.raises(ConsistentAvatarError, match="noise"):
        d.loss_at(x0, cond, torch.tensor([19, 39]), torch.zeros(2, 4, 4, 4))
