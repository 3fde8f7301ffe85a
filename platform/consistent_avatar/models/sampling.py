"""Noise schedules and the sampling loop shared by both diffusion stages (and their LCM students).

One noise schedule everywhere: Stable Diffusion 1.5's (1000 DDPM steps, "scaled_linear" betas
0.00085 → 0.012, ε-prediction). Training draws x_t with it (:func:`training_scheduler`); every
inference scheduler is built *from that scheduler's config* (:func:`inference_scheduler`), so a
model is never sampled under a schedule it was not trained on:

- ``"ddim"`` / ``"dpm"`` (DPM-Solver++ 2M) sample the undistilled ε-models (the paper's "w/o LCM"
  row). They use "trailing" timestep spacing by default: the first step then starts at t = 999,
  i.e. from (almost) pure noise, which matters at the few steps we aim for (Lin et al. 2023,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2); SD 1.5's own "leading"
  spacing is available.
- ``"lcm"`` samples a consistency-distilled student (see :mod:`.lcm`) on the same skipping-step
  grid it was distilled on (``original_steps`` DDIM timesteps; t = 19, 39, …, 999 for 50).

:func:`sample` is the plain loop: ``scale_model_input`` → denoiser → ``scheduler.step``, batched
over frames (the denoiser sees the whole batch at every step; there is no per-frame loop).

No CPU–GPU synchronisation inside the loop: the timesteps stay on the host, so a scheduler's scalar
arithmetic (ᾱ_t, LCM's c_skip / c_out, DDIM's σ_t) runs there and reaches the GPU kernels as
scalars, and the denoiser's (B,) timestep is filled on the device from a host integer. With device
timesteps, diffusers' schedulers index their host tables with a device scalar and PyTorch's blocking
host→device copies wait for the GPU — several full synchronisations per step, which at batch 1 left
the GPU idle for a third of a compiled pipeline call (benchmarks/README.md). The noise a scheduler
injects between steps is drawn with the caller's generator on *its* device: a GPU generator keeps
that sync-free too, a CPU one costs one blocking copy per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from ..errors import ConsistentAvatarError
from .denoiser import Denoiser

SchedulerKind = Literal["ddim", "dpm", "lcm"]
Spacing = Literal["trailing", "leading", "linspace"]

#: Stable Diffusion 1.5's noise schedule (its ``scheduler/scheduler_config.json``), as DDPM kwargs.
#: ``clip_sample`` is off because the models denoise VAE latents, which are not bounded to [-1, 1].
SD15_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

#: LCM's default skipping-step grid: 50 DDIM timesteps of the 1000-step schedule (k = 20).
LCM_ORIGINAL_STEPS = 50


def training_scheduler() -> DDPMScheduler:
    """The DDPM scheduler both stages train with (``add_noise``) and every sampler derives from."""
    return DDPMScheduler(**SD15_NOISE_SCHEDULE)


def inference_scheduler(
    kind: SchedulerKind,
    num_steps: int,
    *,
    spacing: Spacing = "trailing",
    original_steps: int = LCM_ORIGINAL_STEPS,
    timestep_scaling: float = 10.0,
) -> SchedulerMixin:
    """A sampler for ``num_steps`` steps over the training noise schedule, timesteps already set.

    ``spacing`` applies to ``ddim`` / ``dpm``; ``original_steps`` and ``timestep_scaling`` to
    ``lcm`` and must match the distillation (:class:`.lcm.LCMDistillConfig`): the student is only
    consistent on the grid it was distilled on, with the same boundary-condition scalings.
    """
    if kind not in get_args(SchedulerKind):
        raise ConsistentAvatarError(
            f"unknown scheduler kind {kind!r}; choose one of {get_args(SchedulerKind)}"
        )
    if spacing not in get_args(Spacing):
        raise ConsistentAvatarError(
            f"unknown timestep spacing {spacing!r}; choose one of {get_args(Spacing)}"
        )
    base = training_scheduler().config
    total = int(base.num_train_timesteps)
    scheduler: SchedulerMixin
    if kind == "ddim":
        # set_alpha_to_one=False as in SD 1.5: the last step lands on ᾱ_0, the schedule's own end.
        scheduler = DDIMScheduler.from_config(base, set_alpha_to_one=False, timestep_spacing=spacing)
    elif kind == "dpm":
        scheduler = DPMSolverMultistepScheduler.from_config(
            base, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing
        )
    else:
        if not isinstance(original_steps, int) or not 1 <= original_steps <= total:
            raise ConsistentAvatarError(
                f"LCM original_steps must be an integer in [1, {total}], got {original_steps!r}"
            )
        scheduler = LCMScheduler.from_config(
            base,
            original_inference_steps=original_steps,
            timestep_scaling=timestep_scaling,
            steps_offset=0,
        )
    set_steps(scheduler, num_steps)
    return scheduler


def max_steps(scheduler: SchedulerMixin) -> int:
    """The most sampling steps ``scheduler`` can take: T, or the distillation grid for LCM."""
    if isinstance(scheduler, LCMScheduler):
        return int(scheduler.config.original_inference_steps)
    return int(scheduler.config.num_train_timesteps)


def set_steps(scheduler: SchedulerMixin, num_steps: int, device: torch.device | str | None = None) -> None:
    """``set_timesteps`` with a user-facing error; also resets multistep solver state."""
    limit = max_steps(scheduler)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= limit:
        what = "the LCM distillation grid (original_steps)" if isinstance(scheduler, LCMScheduler) else "T"
        raise ConsistentAvatarError(
            f"num_steps must be an integer in [1, {limit}] ({what} = {limit}) for "
            f"{type(scheduler).__name__}, got {num_steps!r}"
        )
    try:
        scheduler.set_timesteps(num_steps, device=device)
    except ValueError as exc:  # diffusers' own limits, e.g. LCM steps vs. grid
        raise ConsistentAvatarError(
            f"{type(scheduler).__name__} cannot take {num_steps} steps: {exc}"
        ) from exc


def alpha_bar(scheduler: Any, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t of ``scheduler`` for a scalar or (B,) ``t``, shaped to broadcast against ``like`` (float32)."""
    alphas = scheduler.alphas_cumprod
    total = alphas.shape[0]
    t = torch.as_tensor(t, device=like.device)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ConsistentAvatarError(f"timesteps must be integers, got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, like.shape[0])):
        raise ConsistentAvatarError(
            f"timesteps must be a scalar or shape ({like.shape[0]},), got {tuple(t.shape)}"
        )
    if t.device.type == "cpu":
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= total):
            raise ConsistentAvatarError(f"timesteps must lie in [0, {total}), got {t.tolist()}")
    elif t.numel():
        # Reading a GPU tensor's values back is a host-GPU synchronisation (LCM training calls this
        # several times a step): the range is asserted on the device instead.
        torch._assert_async(((t >= 0) & (t < total)).all(), f"timesteps must lie in [0, {total})")
    a = alphas.to(device=like.device, dtype=torch.float32)[t.long()]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def predict_x0(
    sample: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, scheduler: Any
) -> torch.Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t: what an ε-model believes the clean latent is."""
    if sample.shape != eps.shape:
        raise ConsistentAvatarError(f"sample {tuple(sample.shape)} and ε {tuple(eps.shape)} differ in shape")
    a = alpha_bar(scheduler, t, sample)
    x0 = (sample.float() - (1.0 - a).sqrt() * eps.float()) / a.sqrt()
    return x0.to(sample.dtype)


def check_cond(cond: Mapping[str, torch.Tensor], batch: int) -> None:
    """Every condition is a per-frame tensor with the batch's leading dimension."""
    if not isinstance(cond, Mapping):
        raise ConsistentAvatarError(f"cond must be a mapping of name → tensor, got {type(cond).__name__}")
    for name, value in cond.items():
        if not isinstance(value, torch.Tensor):
            raise ConsistentAvatarError(f"cond[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.ndim == 0 or value.shape[0] != batch:
            raise ConsistentAvatarError(
                f"cond[{name!r}] has shape {tuple(value.shape)}; "
                f"its leading dimension must be the batch ({batch})"
            )


def check_latents(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.dtype.is_floating_point:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConsistentAvatarError(f"{what} must be a float tensor (B, C, H, W), got {shape}")
    if x.shape[0] == 0:
        raise ConsistentAvatarError(f"{what} is an empty batch")


def denoise(
    denoiser: Denoiser, sample: torch.Tensor, t: torch.Tensor | int, cond: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Call ``denoiser`` with a (B,) long timestep and check it answered with ε of the right shape."""
    if isinstance(t, torch.Tensor) and (t.device == sample.device or t.numel() != 1):
        ts = t.to(sample.device).long().reshape(-1).expand(sample.shape[0])
    else:  # a host timestep: filled on the device (a copy of it would block until the GPU is idle)
        ts = torch.full((sample.shape[0],), int(t), device=sample.device, dtype=torch.long)
    eps = denoiser(sample, ts, cond)
    if not isinstance(eps, torch.Tensor) or eps.shape != sample.shape:
        got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ConsistentAvatarError(
            f"the denoiser must return ε shaped like x_t {tuple(sample.shape)}, got {got}"
        )
    return eps


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    scheduler: SchedulerMixin,
    num_steps: int,
    generator: torch.Generator | None = None,
    *,
    eta: float = 0.0,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise ``noise`` (B, C, H, W) ~ N(0, I) into clean latents in ``num_steps`` steps.

    ``generator`` seeds the noise a scheduler injects between steps (LCM always, DDIM when
    ``eta`` > 0); DDIM with eta = 0 and DPM-Solver++ are deterministic without it. The timesteps
    are reset on every call, so one scheduler can be reused across batches (not concurrently).
    """
    check_latents(noise, "noise")
    check_cond(cond, noise.shape[0])
    if eta != 0.0 and not isinstance(scheduler, DDIMScheduler):
        raise ConsistentAvatarError(f"eta only applies to DDIM, not {type(scheduler).__name__}")
    if eta < 0.0:
        raise ConsistentAvatarError(f"eta must be ≥ 0, got {eta}")
    set_steps(scheduler, num_steps)  # host timesteps: see the module docstring
    step_kwargs: dict[str, Any] = {"generator": generator}
    if isinstance(scheduler, DDIMScheduler):
        step_kwargs["eta"] = eta
    x = noise * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        model_input = scheduler.scale_model_input(x, t)
        eps = denoise(denoiser, model_input, t, cond)
        x = scheduler.step(eps, t, x, return_dict=False, **step_kwargs)[0]
    return x
