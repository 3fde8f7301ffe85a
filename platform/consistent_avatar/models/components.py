"""Pretrained components from LOCAL directories, else random init from the preset.

No model hub is reachable, so every ``from_pretrained`` here runs with ``local_files_only=True`` on a
directory named in the preset's ``pretrained`` section (a Stable Diffusion 1.5 folder: ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``; optionally a ControlNet folder). A component without a
directory is built from the preset's config under a fixed seed. Each loader logs which it did and
returns the source with the model. Frozen parts (VAE, text encoder) come back with
``requires_grad=False`` in eval mode.

:func:`save_random_components` writes small random components in the same layout, so tests drive
the real ``from_pretrained`` path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from ..errors import ConsistentAvatarError
from ..io import publish_dir, staging_dir
from .presets import CONTROL_CHANNELS, ModelPreset

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)

RANDOM = "random"
#: How a diffusers model loads from a local folder here: offline, in float32 (the dtype is set later, per
#: device), and without accelerate's meta-device loading — accelerate is not a dependency, and diffusers,
#: which falls back to this itself, would say so in every training worker's log.
LOCAL_LOAD: dict[str, Any] = {"local_files_only": True, "torch_dtype": torch.float32, "low_cpu_mem_usage": False}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic random init that leaves the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad False on every parameter, eval mode: the part is used, never trained."""
    module.requires_grad_(False)
    module.eval()
    return module


def widen_conv_in(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_channels`` inputs: old weights kept, new input channels zero.

    Zero weights on the new channels (as InstructPix2Pix widens SD's conv_in) make the widened model
    compute exactly what the original did until training teaches it to use the extra input.
    """
    if in_channels < conv.in_channels:
        raise ConsistentAvatarError(
            f"cannot narrow a convolution from {conv.in_channels} to {in_channels} inputs"
        )
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            assert new.bias is not None
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    return new


def _check_unet(unet: UNet2DConditionModel, preset: ModelPreset, where: str) -> None:
    cfg = unet.config
    if cfg.cross_attention_dim != preset.unet.cross_attention_dim:
        raise ConsistentAvatarError(
            f"UNet at {where} has cross_attention_dim {cfg.cross_attention_dim}, preset {preset.name!r} says "
            f"{preset.unet.cross_attention_dim}: use the preset that matches these weights"
        )
    if cfg.out_channels != preset.latent_channels:
        raise ConsistentAvatarError(
            f"UNet at {where} predicts {cfg.out_channels} channels, "
            f"the preset's VAE has {preset.latent_channels}"
        )


def load_unet(preset: ModelPreset, *, seed: int = 0) -> tuple[UNet2DConditionModel, str]:
    """The base denoiser with ``in_channels`` = latent channels; each call returns a new instance."""
    path = preset.pretrained.resolve("unet")
    if path is not None:
        unet = UNet2DConditionModel.from_pretrained(path, **LOCAL_LOAD)
        _check_unet(unet, preset, str(path))
        if unet.config.in_channels != preset.latent_channels:
            raise ConsistentAvatarError(
                f"UNet at {path} takes {unet.config.in_channels} input channels; a base (text-to-image) UNet "
                f"with {preset.latent_channels} is expected"
            )
        log.info("unet: pretrained weights from %s", path)
        return unet, str(path)
    with seeded(seed):
        unet = UNet2DConditionModel(**preset.unet_kwargs())
    log.info("unet: random init from preset %r (seed %d)", preset.name, seed)
    return unet, RANDOM


def load_vae(preset: ModelPreset, *, seed: int = 0) -> tuple[AutoencoderKL, str]:
    """The frozen image ↔ latent autoencoder."""
    path = preset.pretrained.resolve("vae")
    if path is not None:
        vae = AutoencoderKL.from_pretrained(path, **LOCAL_LOAD)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if factor != preset.vae.scale_factor or vae.config.latent_channels != preset.latent_channels:
            raise ConsistentAvatarError(
                f"VAE at {path} has scale factor {factor} and {vae.config.latent_channels} latent channels; "
                f"preset {preset.name!r} needs {preset.vae.scale_factor} and {preset.latent_channels}"
            )
        log.info("vae: pretrained weights from %s", path)
        source = str(path)
    else:
        with seeded(seed + 1):
            vae = AutoencoderKL(**preset.vae_kwargs())
        log.info("vae: random init from preset %r (seed %d)", preset.name, seed + 1)
        source = RANDOM
    return freeze(vae), source  # type: ignore[return-value]


def load_text_encoder(preset: ModelPreset) -> tuple[CLIPTextModel, CLIPTokenizer, str] | None:
    """The frozen CLIP text encoder and tokenizer if the preset names them, else None."""
    enc_path = preset.pretrained.resolve("text_encoder")
    tok_path = preset.pretrained.resolve("tokenizer")
    if enc_path is None or tok_path is None:
        if (enc_path is None) != (tok_path is None):
            raise ConsistentAvatarError("pretrained text_encoder and tokenizer must be given together")
        log.info("text encoder: none given")
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder = CLIPTextModel.from_pretrained(enc_path, local_files_only=True, dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(tok_path, local_files_only=True)
    if encoder.config.hidden_size != preset.unet.cross_attention_dim:
        raise ConsistentAvatarError(
            f"text encoder at {enc_path} has width {encoder.config.hidden_size}, the UNet's cross-attention "
            f"takes {preset.unet.cross_attention_dim}"
        )
    log.info("text encoder: pretrained weights from %s", enc_path)
    return freeze(encoder), tokenizer, str(enc_path)  # type: ignore[return-value]


@torch.no_grad()
def encode_empty_prompt(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, tokens: int) -> torch.Tensor:
    """CLIP's last hidden states for "" padded to ``tokens``: (tokens, width)."""
    ids = tokenizer(
        "", padding="max_length", max_length=tokens, truncation=True, return_tensors="pt"
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device)).last_hidden_state[0].float().cpu()


def load_controlnet(
    preset: ModelPreset, unet: UNet2DConditionModel, *, seed: int = 0
) -> tuple[ControlNetModel, str]:
    """A ControlNet for z_c (6 channels): a pretrained one (widened if it takes 3) or ``from_unet``.

    ``from_unet`` copies the UNet's encoder half, as the ControlNet paper initialises its trainable
    copy; the condition embedding maps image space to latent space with one stride-2 conv per
    halving of the preset's VAE. Call it before decoupled attention is installed on ``unet``.
    """
    path = preset.pretrained.resolve("controlnet")
    if path is not None:
        controlnet = ControlNetModel.from_pretrained(path, **LOCAL_LOAD)
        got = controlnet.config.conditioning_channels
        if got != CONTROL_CHANNELS:
            if got > CONTROL_CHANNELS:
                raise ConsistentAvatarError(
                    f"ControlNet at {path} takes {got} condition channels; at most 6 fit z_c"
                )
            emb = controlnet.controlnet_cond_embedding
            emb.conv_in = widen_conv_in(emb.conv_in, CONTROL_CHANNELS)
            controlnet.register_to_config(conditioning_channels=CONTROL_CHANNELS)
            log.info(
                "controlnet: widened condition input from %d to %d channels (new ones zero)",
                got,
                CONTROL_CHANNELS,
            )
        if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
            raise ConsistentAvatarError(f"ControlNet at {path} does not match the UNet's cross_attention_dim")
        log.info("controlnet: pretrained weights from %s", path)
        return controlnet, str(path)
    with seeded(seed + 2):
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_channels=CONTROL_CHANNELS,
            conditioning_embedding_out_channels=preset.controlnet.conditioning_embedding_out_channels,
        )
    log.info(
        "controlnet: initialised from the UNet (from_unet), condition embedding random (seed %d)", seed + 2
    )
    return controlnet, "from_unet"


@dataclass
class SharedComponents:
    """What both stages share: the frozen VAE and the base cross-attention's null context."""

    vae: AutoencoderKL
    null_context: torch.Tensor
    sources: dict[str, str] = field(default_factory=dict)


def load_shared_components(preset: ModelPreset, *, seed: int = 0) -> SharedComponents:
    """VAE and null context: CLIP's empty-prompt states if a text encoder is given, else random."""
    vae, vae_source = load_vae(preset, seed=seed)
    sources = {"vae": vae_source}
    text = load_text_encoder(preset)
    n, dim = preset.conditioning.null_context_tokens, preset.unet.cross_attention_dim
    if text is not None:
        encoder, tokenizer, enc_source = text
        context = encode_empty_prompt(encoder, tokenizer, n)
        sources["null_context"] = f"empty prompt via {enc_source}"
        del encoder
    else:
        gen = torch.Generator().manual_seed(seed + 3)
        context = torch.randn(n, dim, generator=gen)
        sources["null_context"] = RANDOM
    log.info("null context (%d×%d): %s", n, dim, sources["null_context"])
    return SharedComponents(vae=vae, null_context=context, sources=sources)


def _tiny_clip(preset: ModelPreset) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    width = preset.unet.cross_attention_dim
    heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config), tokenizer


def save_random_components(
    preset: ModelPreset, root: str | Path, *, seed: int = 0, text_encoder: bool = True
) -> Path:
    """Write random components in Stable Diffusion 1.5 layout under ``root`` (atomically).

    ``unet/`` and ``vae/`` are exactly what the loaders would build at random with ``seed``, so a
    model loaded from ``root`` must equal one built in memory. ``text_encoder/`` + ``tokenizer/``
    are a one-layer CLIP with a 54-token vocabulary: enough to run the empty-prompt path.
    """
    root = Path(root)
    random_preset = preset.model_copy(update={"pretrained": type(preset.pretrained)()})
    staged = staging_dir(root)
    try:
        unet, _ = load_unet(random_preset, seed=seed)
        unet.save_pretrained(staged / "unet")
        vae, _ = load_vae(random_preset, seed=seed)
        vae.save_pretrained(staged / "vae")
        if text_encoder:
            with seeded(seed + 4):
                encoder, tokenizer = _tiny_clip(preset)
            encoder.save_pretrained(staged / "text_encoder")
            tokenizer.save_pretrained(staged / "tokenizer")
    except BaseException:
        import shutil

        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish_dir(staged, root)
    log.info("random components of preset %r written to %s", preset.name, root)
    return root


def vae_encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    sample: bool = False,
) -> torch.Tensor:
    """Images in [-1, 1] → scaled latents (posterior mode unless ``sample``), as the UNets see them."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    shift = vae.config.shift_factor or 0.0
    return (z - shift) * vae.config.scaling_factor


def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [-1, 1]."""
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    return vae.decode(z.to(vae.dtype)).sample.clamp(-1.0, 1.0)
