"""The ε-prediction objective both diffusion stages train with (paper eq. 6 and 9).

x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε with t ~ U{0..T-1} and ε ~ N(0, I) drawn by the scheduler's
``add_noise``; the loss is ‖ε̂ - ε‖² averaged over elements, computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConsistentAvatarError


def require(batch: Mapping[str, Any], key: str, stage: str) -> Any:
    if key not in batch or batch[key] is None:
        raise ConsistentAvatarError(f"{stage} training batch is missing {key!r} (has {sorted(batch)})")
    return batch[key]


def check_timesteps(timestep: object, batch: int) -> torch.Tensor | int | float:
    """A number, a 0-d tensor or a (B,) tensor — what diffusers UNets accept."""
    if isinstance(timestep, (int, float)):
        return timestep
    if not isinstance(timestep, torch.Tensor):
        raise ConsistentAvatarError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
    if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
        raise ConsistentAvatarError(
            f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}"
        )
    return timestep


def check_scheduler(noise_scheduler: Any) -> int:
    """The scheduler must add DDPM noise and the objective must be ε; returns T."""
    config = getattr(noise_scheduler, "config", None)
    if config is None or not hasattr(noise_scheduler, "add_noise"):
        raise ConsistentAvatarError(
            "noise_scheduler must be a diffusers scheduler with add_noise (e.g. DDPMScheduler)"
        )
    if getattr(config, "prediction_type", "epsilon") != "epsilon":
        raise ConsistentAvatarError(
            f"the paper trains ε-prediction; the scheduler has prediction_type={config.prediction_type!r}"
        )
    return int(config.num_train_timesteps)


def epsilon_mse(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    noise_scheduler: Any,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise ``x0`` at random timesteps and return the MSE of ``denoise(x_t, t)`` against ε."""
    steps = check_scheduler(noise_scheduler)
    gen_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(
        x0.device, x0.dtype
    )
    t = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=gen_device).to(x0.device)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    eps = denoise(x_t, t)
    return F.mse_loss(eps.float(), noise.float())


class TrainingObjective(torch.nn.Module):
    """``forward(batch, generator) -> loss`` around a stage model (TSDM or FCSD).

    DDP and DeepSpeed only do their bookkeeping when their wrapper's ``forward`` is called; wrap
    this module, not the stage model, so the loss computation goes through that ``forward``.
    """

    def __init__(self, model: torch.nn.Module, noise_scheduler: Any, *, check_values: bool = True) -> None:
        """``check_values=False``: the batch's values (range, finiteness) were checked where it was read
        (the trainer's collate, on the CPU), so the step checks shapes only and reads nothing back from
        the GPU (each value check is a host-GPU synchronisation)."""
        super().__init__()
        check_scheduler(noise_scheduler)
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.check_values = check_values

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.model.training_loss(  # type: ignore[operator, no-any-return]
            batch, self.noise_scheduler, generator, values=self.check_values
        )
