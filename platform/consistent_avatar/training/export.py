"""The last step of an actor's training: its trained stages as one actor bundle (:mod:`..bundle`).

``save_bundle`` assembles the bundle beside its final place and renames it in (a reader never sees a
partial bundle; on object stores ``bundle.json`` is uploaded last). The bundle records the
distillation grid of each student and samples with the step count the aligned-TSD pass used, so
rendering feeds stage 3 the kind of TSD it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.presets import ModelPreset
from ..tsd import TSDConfig
from .config import TrainConfig
from .data import ActorData

#: the training stages whose weights go into a bundle
BUNDLED = ("tsdm", "lcm_tsdm", "fcsd", "lcm_fcsd")


def export_bundle(
    *,
    actor: str,
    out: Path,
    preset: ModelPreset,
    config: TrainConfig,
    data: ActorData,
    shards: str,
    vae_dir: Path | None,
    stages: dict[str, dict[str, Any]],
) -> Path:
    """Write the bundle of ``actor`` to ``out`` and return its path."""
    from ..bundle import save_bundle
    from ..data.shards import load_manifest

    tsd = load_manifest(shards).get("tsd")
    path = save_bundle(
        out,
        actor=actor,
        preset=preset,
        weights={name: stages[name]["weights"] for name in BUNDLED if name in stages},
        emotion_labels=list(data.emotion_labels),
        emotion_table=data.emotion_table,
        vae=vae_dir,  # None: the preset's VAE (pretrained, or the trainer's seeded random init)
        lcm={"tsdm": config.lcm_tsdm.distill, "fcsd": config.lcm_fcsd.distill},
        sampling={"sampler": "lcm", "num_steps": config.align.steps if config.align.sampler == "lcm" else 4},
        tsd=TSDConfig(**tsd) if tsd else None,
        training={
            "config": config.model_dump(mode="json"),
            "stages": {k: {n: v for n, v in s.items() if n != "fingerprint"} for k, s in stages.items()},
            "shards": shards,
        },
        seed=config.seed,
    )
    return Path(path)
