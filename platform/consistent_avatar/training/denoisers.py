"""The two stages as :class:`~consistent_avatar.models.denoiser.Denoiser` ε-models over raw conditions.

Samplers and the LCM distiller call ``denoiser(x_t, t, cond)``. Here ``cond`` holds the frame's *raw*
conditions (images and vectors), and each call recomputes the condition tokens with the wrapped
model's own conditioning network: in consistency distillation the student, its EMA target and the
teacher each own a TSD encoder and projections, so tokens computed once by one of them would be
wrong for the others (and would not train the student's encoder).

- stage 2: ``cond = {coarse_tsd, pose, expression, coarse_latent}``
- stage 3: ``cond = {tsd, normal, pose, expression, emotion}``
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..models.fcsd import FCSD
from ..models.tsdm import TSDM

TSDM_COND = ("coarse_tsd", "pose", "expression", "coarse_latent")
FCSD_COND = ("tsd", "normal", "pose", "expression", "emotion")


class TSDMDenoiser(nn.Module):
    """ε̂ of stage 2 from (x_t, t, {coarse_tsd, pose, expression, coarse_latent})."""

    def __init__(self, model: TSDM) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        tokens = m.conditioning(cond["coarse_tsd"], cond["pose"], cond["expression"], validate=False)
        return m(sample, timestep, tokens, cond["coarse_latent"])


class FCSDDenoiser(nn.Module):
    """ε̂ of stage 3 from (x_t, t, {tsd, normal, pose, expression, emotion})."""

    def __init__(self, model: FCSD) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        tokens = m.conditioning(cond["tsd"], cond["pose"], cond["expression"], cond["emotion"], validate=False)
        control = torch.cat([cond["normal"], cond["tsd"]], dim=1)
        return m(sample, timestep, tokens, control)
