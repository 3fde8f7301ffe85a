"""Latent consistency distillation (LCM, Luo et al. 2023, Alg. "LCD"; paper Sec. 4.3).

Why: both diffusion stages need ~50 ε-model calls per frame with DDIM; a consistency model maps
any point of the probability-flow ODE straight to its origin, so a distilled student samples in
1–4 steps (:func:`.sampling.inference_scheduler` ``("lcm", n)``).

One distillation step, for clean latents x_0 and the frames' conditions c:

1. draw n uniformly on the skipping-step grid t ∈ {19, 39, …, 999} (``num_ddim_timesteps`` = 50
   DDIM timesteps of T = 1000; the same grid :class:`diffusers.LCMScheduler` samples on) and
   ε ~ N(0, I); x_{t_{n+k}} = √ᾱ x_0 + √(1−ᾱ) ε (``add_noise`` of the training schedule);
2. the frozen teacher solves the ODE one DDIM step back, t_{n+k} → t_n = t_{n+k} − k
   (k = ``skip_ddim_steps`` · T / N = 20 by default; clamped at 0): x̂_{t_n} = Ψ(x_{t_{n+k}}).
   Guidance scale w = 1: the method has no text prompt, so there is no classifier-free guidance
   to distil (LCM's w-conditioning is dropped);
3. the consistency function f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, t) with LCM's boundary
   scalings (σ_data = 0.5, ``timestep_scaling`` = 10, so f(x, 0) = x exactly);
4. loss d(f_student(x_{t_{n+k}}, t_{n+k}), f_target(x̂_{t_n}, t_n)), pseudo-Huber
   √(Δ² + c²) − c (c = 0.001) or L2, the target side under ``no_grad``;
5. after the optimiser step, ``update_target()``: θ⁻ ← μ θ⁻ + (1 − μ) θ (μ = 0.95).

Works for any ε-model :class:`.denoiser.Denoiser` that is an ``nn.Module`` (stage 2 and 3 alike).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from ..errors import ConsistentAvatarError
from .denoiser import Denoiser
from .sampling import (
    LCM_ORIGINAL_STEPS,
    alpha_bar,
    check_cond,
    check_latents,
    denoise,
    inference_scheduler,
    predict_x0,
    training_scheduler,
)

#: LCM's σ_data. Fixed, not configurable: diffusers' LCMScheduler hard-codes 0.5 at inference.
SIGMA_DATA = 0.5


class LCMDistillConfig(BaseModel):
    """Hyper-parameters of consistency distillation (defaults: the LCM paper / diffusers scripts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_ddim_timesteps: int = Field(
        LCM_ORIGINAL_STEPS, ge=1, le=1000, description="N: grid of the ODE solver"
    )
    skip_ddim_steps: int = Field(1, ge=1, description="grid steps per teacher DDIM step (k = this · T/N)")
    loss_type: Literal["huber", "l2"] = "huber"
    huber_c: float = Field(0.001, gt=0.0, description="pseudo-Huber c")
    ema_decay: float = Field(0.95, ge=0.0, le=1.0, description="μ of the target network's EMA")
    timestep_scaling: float = Field(10.0, gt=0.0, description="boundary-condition timestep scaling")

    @model_validator(mode="after")
    def _skip_fits(self) -> LCMDistillConfig:
        if self.skip_ddim_steps >= self.num_ddim_timesteps:
            raise ValueError(
                f"skip_ddim_steps ({self.skip_ddim_steps}) must be smaller than num_ddim_timesteps "
                f"({self.num_ddim_timesteps})"
            )
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> LCMDistillConfig:
        """Validate a mapping; every problem becomes one ConsistentAvatarError naming the fields."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<config>'}: {e['msg']}" for e in exc.errors()
            )
            raise ConsistentAvatarError(f"invalid LCM distillation config: {problems}") from exc


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) with c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x, the consistency boundary."""
    s = timestep_scaling * t.float()
    denom = s**2 + SIGMA_DATA**2
    return SIGMA_DATA**2 / denom, s / denom.sqrt()


def consistency_function(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    scheduler: Any,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, t) for an ε-model, in float32. t: (B,) integers."""
    eps = denoise(denoiser, x, t, cond)
    x0 = predict_x0(x, eps, t, scheduler).float()
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    shape = (-1, *([1] * (x.ndim - 1)))
    return c_skip.reshape(shape) * x.float() + c_out.reshape(shape) * x0


def ddim_step(
    x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, scheduler: Any
) -> torch.Tensor:
    """One deterministic DDIM step x_t → x_{t_prev} (η = 0): Ψ, the ODE solver LCM distils."""
    x0 = predict_x0(x, eps, t, scheduler).float()
    a_prev = alpha_bar(scheduler, t_prev, x)
    return (a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps.float()).to(x.dtype)


class ConsistencyDistiller:
    """Student, EMA target and frozen teacher of latent consistency distillation.

    The student and the target start as copies of ``teacher`` (same architecture and weights);
    the teacher itself is frozen *in place* (``requires_grad_(False)``, ``eval()``). Train the
    student's :meth:`trainable_parameters`; call :meth:`update_target` after every optimiser step.
    Parameters frozen in the teacher (e.g. a shared VAE) stay frozen in the student and are not
    averaged: they never change. Sample the result with :meth:`inference_scheduler`.
    """

    def __init__(
        self,
        teacher: nn.Module,
        config: LCMDistillConfig | Mapping[str, Any] | None = None,
        *,
        noise_scheduler: DDPMScheduler | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise ConsistentAvatarError(
                f"the teacher must be an ε-model nn.Module (a Denoiser), got {type(teacher).__name__}"
            )
        if config is None:
            config = LCMDistillConfig()
        elif not isinstance(config, LCMDistillConfig):
            config = LCMDistillConfig.parse(config)
        self.config = config
        self.noise_scheduler = noise_scheduler if noise_scheduler is not None else training_scheduler()
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ConsistentAvatarError(
                f"consistency distillation here assumes ε-prediction; the scheduler has "
                f"prediction_type={self.noise_scheduler.config.prediction_type!r}"
            )
        total = int(self.noise_scheduler.config.num_train_timesteps)
        spacing = total // config.num_ddim_timesteps
        #: the skipping-step grid t = 19, 39, …, 999 (as diffusers' LCMScheduler builds it)
        self.timesteps = torch.arange(1, config.num_ddim_timesteps + 1) * spacing - 1
        self._spacing = spacing
        #: k, in training timesteps: how far back the teacher's DDIM step goes
        self.skip = config.skip_ddim_steps * spacing

        self._student = copy.deepcopy(teacher).train()
        self._target = copy.deepcopy(teacher).requires_grad_(False).eval()
        self.teacher = teacher.requires_grad_(False).eval()
        pairs = [
            (s, t)
            for s, t in zip(self._student.parameters(), self._target.parameters(), strict=True)
            if s.requires_grad
        ]
        self._ema_student = [s for s, _ in pairs]
        self._ema_target = [t for _, t in pairs]

    @property
    def student(self) -> nn.Module:
        """The network being trained (θ)."""
        return self._student

    @property
    def target(self) -> nn.Module:
        """The EMA target network (θ⁻): frozen, updated only by :meth:`update_target`."""
        return self._target

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._student.parameters() if p.requires_grad]

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random t_{n+k} on the grid (B,) and noise ε like ``x0``: the randomness of one step."""
        gen_device = generator.device if generator is not None else x0.device
        index = torch.randint(0, len(self.timesteps), (x0.shape[0],), generator=generator, device=gen_device)
        # timesteps[index], computed where the index was drawn: copying the (CPU) grid to a GPU every
        # step would be a blocking copy, i.e. a host-GPU synchronisation per step
        t_start = ((index + 1) * self._spacing - 1).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32)
        return t_start, noise.to(device=x0.device, dtype=x0.dtype)

    def loss_at(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        t_start: torch.Tensor,
        noise: torch.Tensor,
        *,
        student: Denoiser | None = None,
    ) -> torch.Tensor:
        """The consistency loss for given t_{n+k} (B,) and ε: differentiable in the student only.

        ``student`` runs θ in place of :attr:`student` — pass the wrapper that trains it (e.g. the
        DeepSpeed engine around ``self.student``) so its forward hooks and casts apply.
        """
        check_latents(x0, "x0")
        check_cond(cond, x0.shape[0])
        if noise.shape != x0.shape:
            raise ConsistentAvatarError(
                f"noise {tuple(noise.shape)} must be shaped like x0 {tuple(x0.shape)}"
            )
        t_start = torch.as_tensor(t_start, device=x0.device).long().reshape(-1).expand(x0.shape[0])
        t_end = (t_start - self.skip).clamp(min=0)
        scaling = self.config.timestep_scaling
        x_start = self.noise_scheduler.add_noise(x0, noise, t_start)
        online = self._student if student is None else student
        prediction = consistency_function(online, x_start, t_start, cond, self.noise_scheduler, scaling)
        with torch.no_grad():
            eps = denoise(self.teacher, x_start, t_start, cond)
            x_end = ddim_step(x_start, eps, t_start, t_end, self.noise_scheduler)
            target = consistency_function(self._target, x_end, t_end, cond, self.noise_scheduler, scaling)
        diff = prediction - target
        if self.config.loss_type == "l2":
            return diff.pow(2).mean()
        c = self.config.huber_c
        return (torch.sqrt(diff.pow(2) + c * c) - c).mean()

    def loss(
        self,
        x0: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        *,
        student: Denoiser | None = None,
    ) -> torch.Tensor:
        """One LCD step's loss for clean latents ``x0`` (B, C, H, W) and per-frame ``cond``."""
        check_latents(x0, "x0")
        t_start, noise = self.draw(x0, generator)
        return self.loss_at(x0, cond, t_start, noise, student=student)

    @torch.no_grad()
    def update_target(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ, after the optimiser step."""
        if self._ema_target:
            online = [
                p.to(device=t.device, dtype=t.dtype)
                for p, t in zip(self._ema_student, self._ema_target, strict=True)
            ]
            torch._foreach_lerp_(self._ema_target, online, 1.0 - self.config.ema_decay)

    def inference_scheduler(self, num_steps: int) -> SchedulerMixin:
        """The LCMScheduler matching this distillation's grid and scalings, for ``num_steps`` steps."""
        return inference_scheduler(
            "lcm",
            num_steps,
            original_steps=self.config.num_ddim_timesteps,
            timestep_scaling=self.config.timestep_scaling,
        )
