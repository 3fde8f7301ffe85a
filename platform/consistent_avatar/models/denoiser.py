"""The one interface samplers and distillation need from a diffusion stage: an ε-predictor.

Stage 2 (TSDM) and stage 3 (FCSD) differ in what they are conditioned on (f_c + coarse latent vs.
f_d + ControlNet image), but a sampler, the LCM distiller and the render loop only ever ask one
question: "given x_t at timestep t and this frame's conditions, what is ε?". Keeping that question
behind a tiny protocol lets one sampling loop and one distiller serve both stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """An ε-prediction model, batched over frames.

    ``sample``: noisy latents x_t, (B, C, H, W). ``timestep``: (B,) integer timesteps of the
    1000-step training schedule (one per sample). ``cond``: every per-frame condition tensor the
    model needs, each with leading dimension B (the names are the model's own, e.g.
    ``{"tokens": f_c, "coarse_latent": z}``). Returns ε̂ with the shape of ``sample``.
    """

    def __call__(self, sample: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor: ...
