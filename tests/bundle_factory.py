"""Tiny random actor bundles for tests: what `cavatar train` exports, without training.

``make_tiny_bundle(root, actor)`` writes ``root/<actor>`` with the ``tiny`` preset (64², matching
shards prepared at 64²), a teacher and an LCM student for both stages, and an emotion table over the
shard labels (``consistent_avatar.data.layout.EMOTIONS``). Random weights render noise, but noise
that depends on every input: the zero-initialised parts (TSDM's widened ``conv_in``, the ControlNet's
zero convolutions) are moved as training would move them, so each ablation switch changes the frames.
Deterministic in ``seed``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from consistent_avatar.bundle import EmotionTable, save_bundle
from consistent_avatar.data.layout import EMOTIONS
from consistent_avatar.models import build_fcsd, build_tsdm, load_preset, load_shared_components

__all__ = ["make_tiny_bundle", "tiny_emotions", "tiny_models"]


def tiny_emotions(seed: int = 0, dim: int = 768) -> EmotionTable:
    """The shard labels with random (seeded) text embeddings of the tiny preset's width."""
    g = torch.Generator().manual_seed(1_000 + seed)
    return EmotionTable(tuple(EMOTIONS), torch.randn(len(EMOTIONS), dim, generator=g))


def _as_if_trained(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the zero-initialised input paths non-zero weights: at init, the coarse latent (TSDM) and
    z_c (ControlNet) have no effect at all, so ``baseline`` / ``without_normal`` would change nothing."""
    g = torch.Generator().manual_seed(seed)
    parts = [model.unet.conv_in]
    if hasattr(model, "controlnet"):
        cn = model.controlnet
        parts += [cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for part in parts:
            for p in part.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _student(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A stand-in LCM student: the teacher with its condition layers and output conv moved."""
    student = copy.deepcopy(model, memo={id(model.vae): model.vae})  # the VAE stays shared
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*student.conditioning.parameters(), *student.unet.conv_out.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


def tiny_models(preset: Any, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Teachers (moved as if trained) and stand-in LCM students of both stages, keyed as
    ``save_bundle`` takes them: ``tsdm``, ``fcsd``, ``lcm_tsdm``, ``lcm_fcsd``. Deterministic in ``seed``."""
    shared = load_shared_components(preset, seed=seed)
    tsdm = _as_if_trained(build_tsdm(preset, shared, seed=seed), seed + 4)
    fcsd = _as_if_trained(build_fcsd(preset, shared, seed=seed), seed + 5)
    return {"tsdm": tsdm, "fcsd": fcsd, "lcm_tsdm": _student(tsdm, seed + 1), "lcm_fcsd": _student(fcsd, seed + 2)}


def make_tiny_bundle(
    root: Path,
    actor: str,
    emotions: EmotionTable | None = None,
    seed: int = 0,
    *,
    preset: str = "tiny",
    variants: tuple[str, ...] = ("teacher", "lcm"),
    sampling: Mapping[str, Any] | None = None,
    vae: Any = None,
) -> Path:
    """Write a random bundle for ``actor`` to ``root / actor`` and return that path.

    ``emotions``: the bundle's emotion table (default: :func:`tiny_emotions` of ``seed``).
    ``variants``: which of teacher / LCM student to store for both stages. ``sampling``: the bundle's
    sampling defaults (``SamplingDefaults`` fields), e.g. ``{"num_steps": 2}``. ``vae``: the bundle's
    VAE (a diffusers folder or model, as ``save_bundle`` takes it); by default the models' random one.
    """
    p = load_preset(preset)
    models = tiny_models(p, seed)
    weights: dict[str, torch.nn.Module] = {}
    if "teacher" in variants:
        weights |= {"tsdm": models["tsdm"], "fcsd": models["fcsd"]}
    if "lcm" in variants:
        weights |= {"lcm_tsdm": models["lcm_tsdm"], "lcm_fcsd": models["lcm_fcsd"]}
    table = emotions if emotions is not None else tiny_emotions(seed, p.conditioning.emotion_dim)
    out = Path(root) / actor
    save_bundle(
        out,
        actor=actor,
        preset=p,
        weights=weights,
        emotion_labels=table.labels,
        emotion_table=table.embeddings,
        sampling=dict(sampling) if sampling is not None else None,
        training={"note": "tests/bundle_factory.py: random weights"},
        seed=seed,
        vae=vae,
    )
    return out
