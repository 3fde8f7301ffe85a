"""Optional SDXL-refiner pass (paper Sec. 4.3: "minor noise reduction and enhance detail quality").

A light img2img pass of the SDXL refiner over the rendered frames: the frame is encoded by the
refiner's VAE, noised to ``strength`` of the schedule and denoised for the remaining steps.

- **Pixels, not latents.** The paper refines "latent features", but our stages use SD 1.5's VAE,
  whose latent space is not the SDXL VAE's; so frames are decoded by our VAE first and the refiner
  encodes them with its own (the same thing diffusers does for SD 1.5 → SDXL-refiner chains).
- **No prompt.** The method has no text; the refiner's prompt embeddings for "" (and, with CFG,
  the negative ones) are computed once at load time, after which the text encoder is released, so
  a call costs only the VAE and ``int(num_steps · strength)`` UNet steps.
- **Weights** come from a local directory in the SDXL-refiner layout (``model_index.json``,
  ``unet/``, ``vae/``, ``text_encoder_2/``, ``tokenizer_2/``, ``scheduler/``; no ``text_encoder``:
  the refiner conditions on OpenCLIP-bigG only and on an aesthetic score).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from ..errors import ConsistentAvatarError

log = logging.getLogger(__name__)

ValueRange = Literal["signed", "unit"]

#: What an SDXL-refiner directory must hold for this loader.
REFINER_LAYOUT = ("model_index.json", "unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")

_RANGES: dict[str, tuple[float, float]] = {"signed": (-1.0, 1.0), "unit": (0.0, 1.0)}


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ConsistentAvatarError(f"refiner strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


class Refiner:
    """SDXL-refiner img2img with cached empty-prompt embeddings. Build with :meth:`from_pretrained`."""

    def __init__(
        self,
        pipeline: StableDiffusionXLImg2ImgPipeline,
        *,
        strength: float = 0.2,
        num_steps: int = 20,
        guidance_scale: float = 1.0,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ConsistentAvatarError(f"refiner num_steps must be a positive integer, got {num_steps!r}")
        if guidance_scale < 0:
            raise ConsistentAvatarError(f"refiner guidance_scale must be ≥ 0, got {guidance_scale}")
        self.strength = _check_strength(strength)
        self.num_steps = num_steps
        self.guidance_scale = float(guidance_scale)
        self.aesthetic_score = float(aesthetic_score)
        self.negative_aesthetic_score = float(negative_aesthetic_score)
        self.pipeline = pipeline
        pipeline.set_progress_bar_config(disable=True)
        self._check_time_embedding()
        self._embeds = self._encode_empty_prompt()
        # The text encoder is not needed again: the pipeline takes the cached embeddings.
        pipeline.text_encoder_2 = None
        pipeline.tokenizer_2 = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        strength: float = 0.2,
        num_steps: int = 20,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        guidance_scale: float = 1.0,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
    ) -> Refiner:
        """Load an SDXL refiner from the local directory ``path`` (never from a hub)."""
        root = Path(path)
        if not root.is_dir():
            raise ConsistentAvatarError(
                f"SDXL refiner weights not found: {root} is not a directory (expected the "
                f"stabilityai/stable-diffusion-xl-refiner layout: {', '.join(REFINER_LAYOUT)})"
            )
        missing = [name for name in REFINER_LAYOUT if not (root / name).exists()]
        if missing:
            raise ConsistentAvatarError(f"SDXL refiner at {root} lacks {', '.join(missing)}")
        try:
            pipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                root, local_files_only=True, dtype=dtype, add_watermarker=False
            )
        except (OSError, ValueError, TypeError) as exc:
            raise ConsistentAvatarError(f"cannot load the SDXL refiner at {root}: {exc}") from exc
        pipeline.to(device)
        log.info("SDXL refiner loaded from %s on %s (%s)", root, device, dtype)
        return cls(
            pipeline,
            strength=strength,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )

    @property
    def do_classifier_free_guidance(self) -> bool:
        # the pipeline's own rule: CFG for w > 1 unless the UNet is guidance-distilled
        return self.guidance_scale > 1.0 and self.pipeline.unet.config.time_cond_proj_dim is None

    def effective_steps(self, strength: float | None = None) -> int:
        """UNet calls per refine: diffusers' img2img runs the last ``int(num_steps · strength)`` steps."""
        s = self.strength if strength is None else _check_strength(strength)
        return min(int(self.num_steps * s), self.num_steps)

    def _check_time_embedding(self) -> None:
        """Fail at load, not at the first frame, if the UNet's added-time embedding does not fit."""
        pipe = self.pipeline
        unet = pipe.unet
        if unet.config.addition_embed_type != "text_time" or pipe.text_encoder_2 is None:
            raise ConsistentAvatarError(
                "not an SDXL refiner: the UNet needs addition_embed_type='text_time' and a text_encoder_2"
            )
        ids = 5 if pipe.config.requires_aesthetics_score else 6
        passed = unet.config.addition_time_embed_dim * ids + pipe.text_encoder_2.config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ConsistentAvatarError(
                f"SDXL refiner UNet expects {expected} added-embedding features, but "
                f"requires_aesthetics_score={pipe.config.requires_aesthetics_score} gives {passed}: "
                "set requires_aesthetics_score in model_index.json to match the UNet"
            )

    @torch.no_grad()
    def _encode_empty_prompt(self) -> dict[str, torch.Tensor]:
        pipe = self.pipeline
        device = pipe.unet.device
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt="",
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
        )
        embeds = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        if self.do_classifier_free_guidance:
            embeds |= {"negative_prompt_embeds": npe, "negative_pooled_prompt_embeds": nppe}
        return {k: v.detach() for k, v in embeds.items()}

    @property
    def prompt_embeds(self) -> dict[str, torch.Tensor]:
        """The cached empty-prompt embeddings (batch 1), as the pipeline takes them."""
        return dict(self._embeds)

    def _check_images(self, images: torch.Tensor, value_range: ValueRange) -> tuple[float, float]:
        if value_range not in _RANGES:
            raise ConsistentAvatarError(f"value_range must be one of {sorted(_RANGES)}, got {value_range!r}")
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConsistentAvatarError(f"refiner images must be a (B, 3, H, W) tensor, got {shape}")
        if not images.dtype.is_floating_point or images.shape[0] == 0:
            raise ConsistentAvatarError("refiner images must be a non-empty float tensor")
        factor = self.pipeline.vae_scale_factor
        h, w = images.shape[-2:]
        if h % factor or w % factor:
            raise ConsistentAvatarError(
                f"refiner images must have H and W divisible by the VAE's factor {factor}, got {h}×{w}"
            )
        lo, hi = _RANGES[value_range]
        tol = 1e-3
        mn, mx = float(images.min()), float(images.max())
        if mn < lo - tol or mx > hi + tol:
            raise ConsistentAvatarError(
                f"refiner images span [{mn:.3f}, {mx:.3f}], outside the declared value_range "
                f"{value_range!r} = [{lo}, {hi}]"
            )
        return lo, hi

    @torch.no_grad()
    def refine(
        self,
        images: torch.Tensor,
        *,
        seed: int | Sequence[int] = 0,
        value_range: ValueRange = "signed",
        strength: float | None = None,
    ) -> torch.Tensor:
        """Refine a batch of frames (B, 3, H, W); returns the same shape, range, dtype and device.

        ``value_range``: "signed" for [-1, 1] (what :func:`.components.vae_decode` returns, the
        platform's convention) or "unit" for [0, 1]. ``seed`` fixes the VAE posterior sample and
        the img2img noise, so a call is reproducible; one seed per frame makes each frame's result
        independent of the batch it is refined in. ``strength`` overrides the configured one.
        When ``int(num_steps · strength)`` is 0 there is no denoising step to run and the frames are
        returned unchanged (not even a VAE round trip).
        """
        lo, hi = self._check_images(images, value_range)
        s = self.strength if strength is None else _check_strength(strength)
        if self.effective_steps(s) == 0:
            return images.clone()
        pipe = self.pipeline
        batch = images.shape[0]
        unit = ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        unit = unit.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
        embeds = {k: v.repeat(batch, *([1] * (v.ndim - 1))) for k, v in self._embeds.items()}
        generator: torch.Generator | list[torch.Generator]
        if isinstance(seed, int):
            generator = torch.Generator(device="cpu").manual_seed(seed)
        else:
            seeds = [int(v) for v in seed]
            if len(seeds) != batch:
                raise ConsistentAvatarError(f"refiner: {len(seeds)} seeds for a batch of {batch} frames")
            generator = [torch.Generator(device="cpu").manual_seed(v) for v in seeds]
        out = pipe(
            image=unit,
            strength=s,
            num_inference_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            aesthetic_score=self.aesthetic_score,
            negative_aesthetic_score=self.negative_aesthetic_score,
            generator=generator,
            output_type="pt",
            return_dict=False,
            **embeds,
        )[0]
        out = out.to(device=images.device, dtype=torch.float32) * (hi - lo) + lo
        return out.to(images.dtype)
