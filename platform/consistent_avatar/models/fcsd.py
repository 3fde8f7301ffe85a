"""Stage 3 — FCSD, the Fully Consistent Stable Diffusion model (paper Sec. 4.2, eq. 8-9).

A Stable Diffusion UNet plus a ControlNet C. The ControlNet sees the image-space condition
z_c = concat(coarse normal, aligned TSD): 6 channels, both in [-1, 1] — the normal map as the unit
normal's components (layout's 8-bit (n + 1) / 2 · 255 decodes to exactly that) and the TSD as
stage 2 produces it; the ControlNet's condition embedding brings it down to the latent grid.
Both UNet and ControlNet attend to f_d = [E(TSD), W_P P, W_E E, W_T T] through decoupled
cross-attention (eq. 4), where T is the CLIP text embedding of the frame's emotion label (eq. 7).
The TSD code in f_d is that of the same TSD image that goes into z_c. Training: ε-prediction MSE
(eq. 9) on VAE latents of the real frame.

Call signature for a sampler: ``fcsd(x_t, t, tokens, control) -> ε̂`` with
``tokens = fcsd.condition(tsd, pose, expression, emotion)`` and ``control = fcsd.control_image(normal, tsd)``;
``fcsd.decode(x_0)`` gives the frame in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from ..errors import ConsistentAvatarError
from .components import (
    SharedComponents,
    load_controlnet,
    load_shared_components,
    load_unet,
    seeded,
    vae_decode,
    vae_encode,
)
from .conditioning import StageConditioning, check_image, check_latents, check_tokens
from .decoupled_attention import (
    COND_TOKENS_KWARG,
    NullContext,
    copy_decoupled_weights,
    decoupled_processors,
    install_decoupled_attention,
)
from .objective import check_scheduler, check_timesteps, epsilon_mse, require
from .presets import CONTROL_CHANNELS, ModelPreset


class FCSDBatch(TypedDict, total=False):
    """A stage-3 training batch. Images in [-1, 1] at the preset resolution; latents already scaled.

    Needed: ``tsd`` (aligned or ground-truth TSD), ``normal`` (coarse normal), ``pose`` (B, 6),
    ``expression`` (B, 100), ``emotion`` (B, emotion_dim), and ``image`` (the real frame) or
    ``image_latent``.
    """

    image: torch.Tensor
    image_latent: torch.Tensor
    tsd: torch.Tensor
    normal: torch.Tensor
    pose: torch.Tensor
    expression: torch.Tensor
    emotion: torch.Tensor


class FCSD(nn.Module):
    """UNet + ControlNet + f_d conditioning + the (frozen, shared) VAE. Build with :func:`build_fcsd`."""

    def __init__(
        self,
        preset: ModelPreset,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        vae: AutoencoderKL,
        null_context: torch.Tensor,
    ) -> None:
        super().__init__()
        self.preset = preset
        if unet.config.in_channels != preset.latent_channels:
            raise ConsistentAvatarError(
                f"FCSD UNet must take {preset.latent_channels} input channels, got {unet.config.in_channels}"
            )
        if controlnet.config.conditioning_channels != CONTROL_CHANNELS:
            raise ConsistentAvatarError(
                f"FCSD ControlNet must take {CONTROL_CHANNELS} condition channels (normal + TSD), "
                f"got {controlnet.config.conditioning_channels}"
            )
        self.unet = unet
        self.controlnet = controlnet
        self.vae = vae
        self.null_context = NullContext(null_context)
        self.conditioning = StageConditioning(preset.conditioning, preset.resolution, with_emotion=True)
        cfg = preset.conditioning
        install_decoupled_attention(unet, cfg.token_dim, cfg.decoupled_scale)
        install_decoupled_attention(controlnet, cfg.token_dim, cfg.decoupled_scale)
        copy_decoupled_weights(unet, controlnet)
        self.sources: dict[str, str] = {}
        self.configure_trainable()

    def configure_trainable(self) -> None:
        """Stage-3 trainable set: ControlNet, decoupled W^k/W^v (UNet and ControlNet), conditioning,
        and the base UNet only when the preset says ``fcsd_unet = "full"``."""
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(self.preset.training.fcsd_unet == "full")
        for proc in decoupled_processors(self.unet).values():
            proc.requires_grad_(True)
        self.controlnet.requires_grad_(True)
        self.conditioning.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_tokens(self) -> int:
        return self.conditioning.num_tokens

    def condition(
        self, tsd: torch.Tensor, pose: torch.Tensor, expression: torch.Tensor, emotion: torch.Tensor
    ) -> torch.Tensor:
        """f_d (B, 4, token_dim) from the TSD image, pose, expression and emotion embedding (validated)."""
        return self.conditioning(tsd, pose, expression, emotion)

    def control_image(self, normal: torch.Tensor, tsd: torch.Tensor) -> torch.Tensor:
        """z_c = concat(normal, tsd) (B, 6, H, W), both validated as [-1, 1] images."""
        r = self.preset.resolution
        check_image("normal", normal, channels=3, size=r)
        check_image("tsd", tsd, channels=3, size=r, batch=normal.shape[0])
        return torch.cat([normal, tsd], dim=1)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Frames (B, 3, H, W) in [-1, 1] → scaled latents (frozen VAE, no grad)."""
        check_image("image", images, channels=3, size=self.preset.resolution)
        with torch.no_grad():
            return vae_encode(self.vae, images, generator=generator, sample=sample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → frames in [-1, 1] (D_portrait of Sec. 4.2)."""
        check_latents("latents", latents, channels=self.preset.latent_channels, size=self.preset.latent_size)
        with torch.no_grad():
            return vae_decode(self.vae, latents)

    def forward(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor | int | float,
        tokens: torch.Tensor,
        control: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """ε̂ = S([x_t, f_d], t, C(x_t, z_c)) (eq. 8). Shape checks only: safe in a compiled loop."""
        p = self.preset
        b = noisy_latent.shape[0]
        check_latents(
            "noisy_latent", noisy_latent, channels=p.latent_channels, size=p.latent_size, values=False
        )
        check_image("control", control, channels=CONTROL_CHANNELS, size=p.resolution, batch=b, values=False)
        check_tokens("tokens", tokens, count=self.num_tokens, dim=p.conditioning.token_dim, batch=b)
        timestep = check_timesteps(timestep, b)
        dtype = self.unet.dtype
        sample = noisy_latent.to(dtype)
        context = self.null_context(b).to(dtype)
        kwargs = {COND_TOKENS_KWARG: tokens.to(dtype)}
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=context,
            controlnet_cond=control.to(dtype),
            conditioning_scale=conditioning_scale,
            cross_attention_kwargs=kwargs,
            return_dict=False,
        )
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=context,
            cross_attention_kwargs=kwargs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def training_loss(
        self,
        batch: Mapping[str, Any],
        noise_scheduler: Any,
        generator: torch.Generator | None = None,
        *,
        values: bool = True,
    ) -> torch.Tensor:
        """L_portrait = ‖ε̂ - ε‖² (eq. 9). Every input is validated before any network runs
        (``values=False``: shapes only, see :meth:`Conditioning.validate`)."""
        p = self.preset
        stage = "FCSD"
        check_scheduler(noise_scheduler)
        tsd, normal = require(batch, "tsd", stage), require(batch, "normal", stage)
        pose, expression = require(batch, "pose", stage), require(batch, "expression", stage)
        emotion = require(batch, "emotion", stage)
        b = self.conditioning.validate(tsd, pose, expression, emotion, values=values)
        check_image("normal", normal, channels=3, size=p.resolution, batch=b, values=values)
        if batch.get("image_latent") is not None:
            target = check_latents(
                "image_latent", batch["image_latent"], channels=p.latent_channels, size=p.latent_size, batch=b,
                values=values,
            )
        else:
            image = check_image(
                "image", require(batch, "image", stage), channels=3, size=p.resolution, batch=b, values=values
            )
            with torch.no_grad():
                target = vae_encode(self.vae, image)
        control = torch.cat([normal, tsd], dim=1)
        tokens = self.conditioning(tsd, pose, expression, emotion, validate=False)
        return epsilon_mse(lambda x_t, t: self(x_t, t, tokens, control), target, noise_scheduler, generator)


def build_fcsd(preset: ModelPreset, shared: SharedComponents | None = None, *, seed: int = 0) -> FCSD:
    """An FCSD from the preset: pretrained UNet/VAE/ControlNet where named, else seeded random init."""
    shared = shared or load_shared_components(preset, seed=seed)
    unet, unet_source = load_unet(preset, seed=seed)
    controlnet, cn_source = load_controlnet(preset, unet, seed=seed)
    if unet_source == "random" and preset.training.fcsd_unet == "frozen":
        import logging

        logging.getLogger(__name__).warning(
            "FCSD base UNet is randomly initialised but preset %r freezes it "
            "(training.fcsd_unet = 'frozen'): give pretrained.root or set training.fcsd_unet = 'full'",
            preset.name,
        )
    with seeded(seed + 20):
        model = FCSD(preset, unet, controlnet, shared.vae, shared.null_context)
    model.sources = {**shared.sources, "unet": unet_source, "controlnet": cn_source}
    return model
