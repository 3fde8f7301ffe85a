"""Stage 2 — TSDM, the Temporally-Sensitive Diffusion Model (paper Sec. 4.1, eq. 4-6).

A latent-diffusion UNet turns the coarse TSD (of the stage-1 render) into the real frame's TSD.
It denoises VAE latents x_t of the target TSD, conditioned on f_c = [E(TSD_coarse), W_P P, W_E E]
through decoupled cross-attention (eq. 4), and is trained with ε-prediction MSE (eq. 6).

UNet input (our reading of eq. 5, ε̂ = F([x_t, f_c], t, x_0)): the task is to *align* a given coarse
TSD to the real one, so the coarse TSD must reach the denoiser spatially, not only as one pooled
256-d code. The coarse TSD latent z_coarse is therefore concatenated channel-wise with x_t
(``conv_in`` takes 2 × latent channels; a pretrained SD ``conv_in`` is widened with zero weights for
the new channels, so it starts as the pretrained UNet), as image-conditioned diffusion does
(SR3, InstructPix2Pix). The global code additionally enters every cross-attention layer via f_c.

Call signature for a sampler: ``tsdm(x_t, t, tokens, coarse_latent) -> ε̂`` with
``tokens = tsdm.condition(coarse_tsd, pose, expression)`` and ``coarse_latent = tsdm.encode(coarse_tsd)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ..errors import ConsistentAvatarError
from .components import (
    SharedComponents,
    load_shared_components,
    load_unet,
    seeded,
    vae_decode,
    vae_encode,
    widen_conv_in,
)
from .conditioning import StageConditioning, check_image, check_latents, check_tokens
from .decoupled_attention import (
    COND_TOKENS_KWARG,
    NullContext,
    decoupled_processors,
    install_decoupled_attention,
)
from .objective import check_scheduler, check_timesteps, epsilon_mse, require
from .presets import ModelPreset


class TSDMBatch(TypedDict, total=False):
    """A stage-2 training batch. Images in [-1, 1] at the preset resolution; latents already scaled.

    Needed: ``coarse_tsd``, ``pose`` (B, 6), ``expression`` (B, 100), and ``target_tsd`` or
    ``target_latent``. ``coarse_latent`` is encoded from ``coarse_tsd`` when absent.
    """

    coarse_tsd: torch.Tensor
    target_tsd: torch.Tensor
    target_latent: torch.Tensor
    coarse_latent: torch.Tensor
    pose: torch.Tensor
    expression: torch.Tensor


class TSDM(nn.Module):
    """UNet + f_c conditioning + the (frozen, shared) VAE. Build with :func:`build_tsdm`."""

    def __init__(
        self, preset: ModelPreset, unet: UNet2DConditionModel, vae: AutoencoderKL, null_context: torch.Tensor
    ) -> None:
        super().__init__()
        self.preset = preset
        c = preset.latent_channels
        if unet.config.in_channels == c:
            unet.conv_in = widen_conv_in(unet.conv_in, 2 * c)
            unet.register_to_config(in_channels=2 * c)
        elif unet.config.in_channels != 2 * c:
            raise ConsistentAvatarError(
                f"TSDM UNet must take {c} or {2 * c} input channels, got {unet.config.in_channels}"
            )
        self.unet = unet
        self.vae = vae
        self.null_context = NullContext(null_context)
        self.conditioning = StageConditioning(
            preset.conditioning, preset.resolution, with_emotion=False, tsd_name="coarse_tsd"
        )
        install_decoupled_attention(unet, preset.conditioning.token_dim, preset.conditioning.decoupled_scale)
        self.sources: dict[str, str] = {}
        self.configure_trainable()

    def configure_trainable(self) -> None:
        """Stage-2 trainable set: conditioning, decoupled W^k/W^v, and the UNet (all, or conv_in only)."""
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(self.preset.training.tsdm_unet == "full")
        self.unet.conv_in.requires_grad_(True)
        for proc in decoupled_processors(self.unet).values():
            proc.requires_grad_(True)
        self.conditioning.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_tokens(self) -> int:
        return self.conditioning.num_tokens

    def condition(
        self, coarse_tsd: torch.Tensor, pose: torch.Tensor, expression: torch.Tensor
    ) -> torch.Tensor:
        """f_c (B, 3, token_dim) from the coarse TSD image and FLAME pose/expression (validated)."""
        return self.conditioning(coarse_tsd, pose, expression)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """TSD images (B, 3, H, W) in [-1, 1] → scaled latents (frozen VAE, no grad)."""
        check_image("tsd image", images, channels=3, size=self.preset.resolution)
        with torch.no_grad():
            return vae_encode(self.vae, images, generator=generator, sample=sample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → TSD images in [-1, 1] (D_TSD of Sec. 4.1)."""
        check_latents("latents", latents, channels=self.preset.latent_channels, size=self.preset.latent_size)
        with torch.no_grad():
            return vae_decode(self.vae, latents)

    def forward(
        self,
        noisy_latent: torch.Tensor,
        timestep: torch.Tensor | int | float,
        tokens: torch.Tensor,
        coarse_latent: torch.Tensor,
    ) -> torch.Tensor:
        """ε̂ = F([x_t ⊕ z_coarse, f_c], t) (B, C, h, w). Shape checks only: safe in a compiled loop."""
        p = self.preset
        b = noisy_latent.shape[0]
        check_latents(
            "noisy_latent", noisy_latent, channels=p.latent_channels, size=p.latent_size, values=False
        )
        check_latents(
            "coarse_latent",
            coarse_latent,
            channels=p.latent_channels,
            size=p.latent_size,
            batch=b,
            values=False,
        )
        check_tokens("tokens", tokens, count=self.num_tokens, dim=p.conditioning.token_dim, batch=b)
        timestep = check_timesteps(timestep, b)
        dtype = self.unet.dtype
        sample = torch.cat([noisy_latent, coarse_latent], dim=1).to(dtype)
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=self.null_context(b).to(dtype),
            cross_attention_kwargs={COND_TOKENS_KWARG: tokens.to(dtype)},
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
        """L_TSD = ‖ε̂ - ε‖² (eq. 6). Every input is validated before any network runs
        (``values=False``: shapes only, see :meth:`Conditioning.validate`)."""
        p = self.preset
        stage = "TSDM"
        check_scheduler(noise_scheduler)
        coarse = require(batch, "coarse_tsd", stage)
        pose, expression = require(batch, "pose", stage), require(batch, "expression", stage)
        b = self.conditioning.validate(coarse, pose, expression, values=values)
        if batch.get("target_latent") is not None:
            target = check_latents(
                "target_latent",
                batch["target_latent"],
                channels=p.latent_channels,
                size=p.latent_size,
                batch=b,
                values=values,
            )
            target_image = None
        else:
            target_image = check_image(
                "target_tsd", require(batch, "target_tsd", stage), channels=3, size=p.resolution, batch=b,
                values=values,
            )
        coarse_latent = batch.get("coarse_latent")
        if coarse_latent is not None:
            check_latents(
                "coarse_latent", coarse_latent, channels=p.latent_channels, size=p.latent_size, batch=b,
                values=values,
            )

        with torch.no_grad():
            if target_image is not None:
                target = vae_encode(self.vae, target_image)
            if coarse_latent is None:
                coarse_latent = vae_encode(self.vae, coarse)
        tokens = self.conditioning(coarse, pose, expression, validate=False)
        return epsilon_mse(
            lambda x_t, t: self(x_t, t, tokens, coarse_latent), target, noise_scheduler, generator
        )


def build_tsdm(preset: ModelPreset, shared: SharedComponents | None = None, *, seed: int = 0) -> TSDM:
    """A TSDM from the preset: pretrained UNet/VAE where the preset names them, else seeded random."""
    shared = shared or load_shared_components(preset, seed=seed)
    unet, unet_source = load_unet(preset, seed=seed)
    with seeded(seed + 10):
        model = TSDM(preset, unet, shared.vae, shared.null_context)
    model.sources = {**shared.sources, "unet": unet_source}
    return model
