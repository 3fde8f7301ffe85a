"""Training of ConsistentAvatar actors on Ray Train + DeepSpeed (`cavatar train`).

Entry point: :func:`train` (shards, actors, preset, out, config) → :class:`TrainReport`. See
:mod:`.actor` for one actor's stages and run folder, :mod:`.many` for many actors at once,
:mod:`.loop` for the per-worker DeepSpeed loop, :mod:`.align` for how stage 3's inputs are made,
and ``docs/training.md``. Names are imported lazily, so ``cavatar --help`` (which registers
:func:`.cli.register_cli`) does not pay for Ray, torch and diffusers.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "train": "many",
    "TrainReport": "many",
    "TrainConfig": "config",
    "StageConfig": "config",
    "LCMStageConfig": "config",
    "VAEStageConfig": "config",
    "AlignConfig": "config",
    "ScalingSection": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
