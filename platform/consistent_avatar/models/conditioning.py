"""Condition tokens of the paper: f_c (stage 2, eq. 4-5) and f_d (stage 3, eq. 8).

f_c = [E(I_TSD), W_P P_i, W_E E_i] ∈ R^{3×256} and f_d = [E(I_TSD), W_P P_i, W_E E_i, W_T T_i] ∈
R^{4×256}: a conv encoder E gives one global code of a TSD image (as DiffusionRig's encoder gives its
global latent), and one Linear layer per vector lifts pose (6), FLAME expression (100) and the CLIP
text embedding of the emotion label (768) to the token width. The tokens reach the UNet only through
decoupled cross-attention (:mod:`.decoupled_attention`).

The input checks here run before any model does: wrong shapes, wrong value ranges and non-finite
values raise :class:`~consistent_avatar.errors.ConsistentAvatarError` naming the tensor and the fix.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConsistentAvatarError
from .presets import ConditioningConfig

_RANGE_TOLERANCE = 1e-3


def _require_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ConsistentAvatarError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ConsistentAvatarError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_image(
    name: str, x: object, *, channels: int, size: int, batch: int | None = None, values: bool = True
) -> torch.Tensor:
    """(B, channels, size, size), finite, in [-1, 1]. ``values=False`` checks the shape only (no sync)."""
    x = _require_tensor(name, x)
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ConsistentAvatarError(
            f"{name} must have shape (B, {channels}, {size}, {size}), got {tuple(x.shape)}: "
            f"resize to the preset resolution and give {channels} channels first"
        )
    if batch is not None and x.shape[0] != batch:
        raise ConsistentAvatarError(f"{name} has batch size {x.shape[0]}, the other inputs have {batch}")
    if values:
        peak = float(x.detach().abs().amax()) if x.numel() else 0.0
        if peak != peak or peak == float("inf"):
            raise ConsistentAvatarError(f"{name} contains NaN or infinite values")
        if peak > 1.0 + _RANGE_TOLERANCE:
            raise ConsistentAvatarError(
                f"{name} has values up to {peak:.3g}; images must be scaled to [-1, 1] "
                "(x / 127.5 - 1 for 8-bit)"
            )
    return x


def check_vectors(
    name: str, x: object, *, dim: int, batch: int | None = None, values: bool = True
) -> torch.Tensor:
    """(B, dim) and finite."""
    x = _require_tensor(name, x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ConsistentAvatarError(f"{name} must have shape (B, {dim}), got {tuple(x.shape)}")
    if batch is not None and x.shape[0] != batch:
        raise ConsistentAvatarError(f"{name} has batch size {x.shape[0]}, the other inputs have {batch}")
    if values and not bool(torch.isfinite(x.detach()).all()):
        raise ConsistentAvatarError(f"{name} contains NaN or infinite values")
    return x


def check_latents(
    name: str, x: object, *, channels: int, size: int, batch: int | None = None, values: bool = True
) -> torch.Tensor:
    """(B, channels, size, size) latents, finite (no range: latents are unbounded)."""
    x = _require_tensor(name, x)
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != size or x.shape[3] != size:
        raise ConsistentAvatarError(
            f"{name} must have shape (B, {channels}, {size}, {size}) (VAE latents of the preset), "
            f"got {tuple(x.shape)}"
        )
    if batch is not None and x.shape[0] != batch:
        raise ConsistentAvatarError(f"{name} has batch size {x.shape[0]}, the other inputs have {batch}")
    if values and not bool(torch.isfinite(x.detach()).all()):
        raise ConsistentAvatarError(f"{name} contains NaN or infinite values")
    return x


def check_tokens(name: str, x: object, *, count: int, dim: int, batch: int) -> torch.Tensor:
    """(B, count, dim) condition tokens; shape only, so it is free inside a sampling loop."""
    x = _require_tensor(name, x)
    if x.ndim != 3 or x.shape[0] != batch or x.shape[1] != count or x.shape[2] != dim:
        raise ConsistentAvatarError(
            f"{name} must have shape ({batch}, {count}, {dim}) (from the stage's condition()), "
            f"got {tuple(x.shape)}"
        )
    return x


class _DownStage(nn.Module):
    """Stride-2 conv, then a pre-norm residual block at the new resolution."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.block(x)


class TSDEncoder(nn.Module):
    """E(I_TSD): image (B, 3, H, W) in [-1, 1] → one global code (B, out_dim).

    Global average pooling after the stride-2 stages makes the code independent of where details
    sit in the frame; pose and expression tokens carry the geometry.
    """

    def __init__(
        self, out_dim: int, channels: tuple[int, ...], norm_num_groups: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        widths = (channels[0], *channels)
        self.stages = nn.ModuleList(
            _DownStage(widths[i], widths[i + 1], norm_num_groups) for i in range(len(channels))
        )
        self.head_norm = nn.GroupNorm(norm_num_groups, channels[-1])
        self.proj = nn.Linear(channels[-1], out_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.stem(image)
        for stage in self.stages:
            h = stage(h)
        h = nn.functional.silu(self.head_norm(h)).mean(dim=(2, 3))
        return self.proj(h)


class ConditionTokens(nn.Module):
    """Linear lifts of pose, expression (and emotion) stacked after the TSD code as tokens."""

    def __init__(self, token_dim: int, pose_dim: int, expression_dim: int, emotion_dim: int | None) -> None:
        super().__init__()
        self.pose_proj = nn.Linear(pose_dim, token_dim)
        self.expression_proj = nn.Linear(expression_dim, token_dim)
        self.emotion_proj = nn.Linear(emotion_dim, token_dim) if emotion_dim is not None else None

    @property
    def num_tokens(self) -> int:
        return 3 if self.emotion_proj is None else 4

    def forward(
        self,
        tsd_code: torch.Tensor,
        pose: torch.Tensor,
        expression: torch.Tensor,
        emotion: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = [tsd_code, self.pose_proj(pose), self.expression_proj(expression)]
        if self.emotion_proj is not None:
            if emotion is None:
                raise ConsistentAvatarError("emotion embedding is required for f_d (stage 3) tokens")
            parts.append(self.emotion_proj(emotion))
        elif emotion is not None:
            raise ConsistentAvatarError(
                "f_c (stage 2) has no emotion token: do not pass an emotion embedding"
            )
        return torch.stack(parts, dim=1)


class StageConditioning(nn.Module):
    """Validated inputs → condition tokens: f_c when ``with_emotion`` is False, else f_d."""

    def __init__(
        self, cfg: ConditioningConfig, resolution: int, *, with_emotion: bool, tsd_name: str = "tsd"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.resolution = resolution
        self.tsd_name = tsd_name  # how errors name the TSD image (the stage's batch key)
        self.encoder = TSDEncoder(cfg.token_dim, cfg.tsd_encoder.channels, cfg.tsd_encoder.norm_num_groups)
        self.tokens = ConditionTokens(
            cfg.token_dim, cfg.pose_dim, cfg.expression_dim, cfg.emotion_dim if with_emotion else None
        )

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    @property
    def token_dim(self) -> int:
        return self.cfg.token_dim

    def validate(
        self,
        tsd: object,
        pose: object,
        expression: object,
        emotion: object | None = None,
        *,
        values: bool = True,
    ) -> int:
        """Check every input (shape, range, finiteness); return the batch size. ``values=False``
        checks shapes only: reading values back from a GPU is a host-GPU synchronisation, which a
        caller whose data is checked where it was read (the trainer's collate) need not pay per step."""
        image = check_image(self.tsd_name, tsd, channels=3, size=self.resolution, values=values)
        b = image.shape[0]
        check_vectors("pose", pose, dim=self.cfg.pose_dim, batch=b, values=values)
        check_vectors("expression", expression, dim=self.cfg.expression_dim, batch=b, values=values)
        if self.tokens.emotion_proj is not None:
            if emotion is None:
                raise ConsistentAvatarError(
                    f"emotion (B, {self.cfg.emotion_dim}) CLIP text embedding is required in stage 3"
                )
            check_vectors("emotion", emotion, dim=self.cfg.emotion_dim, batch=b, values=values)
        elif emotion is not None:
            raise ConsistentAvatarError(
                "stage 2 (TSDM) takes no emotion embedding; f_c = [TSD code, pose, expression]"
            )
        return b

    def forward(
        self,
        tsd: torch.Tensor,
        pose: torch.Tensor,
        expression: torch.Tensor,
        emotion: torch.Tensor | None = None,
        *,
        validate: bool = True,
    ) -> torch.Tensor:
        """Tokens (B, num_tokens, token_dim). ``validate=False`` skips the checks (already done)."""
        if validate:
            self.validate(tsd, pose, expression, emotion)
        dtype = self.tokens.pose_proj.weight.dtype
        emo = emotion.to(dtype) if emotion is not None else None
        return self.tokens(self.encoder(tsd.to(dtype)), pose.to(dtype), expression.to(dtype), emo)
