"""Evaluation: the paper's metrics (Tables 1–2, Fig. 7) as library functions, and aggregation.

:mod:`.image` (L2, PSNR, SSIM, LPIPS and the :class:`Unavailable` result type), :mod:`.temporal`
(optical-flow curves and flicker), :mod:`.face` (pose / expression error and face estimators),
:mod:`.emotion` (labelling accuracy vs synthetic truth), :mod:`.aggregate` (per-actor and overall
means). ``docs/evaluation.md`` defines every metric.

Importing this package is cheap: names are resolved from their module on first use (numpy, torch,
OpenCV, scikit-image and lpips load only when a metric that needs them is touched).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # image
    "Unavailable": "image",
    "MetricUnavailableError": "image",
    "is_unavailable": "image",
    "l2": "image",
    "psnr": "image",
    "ssim": "image",
    "LPIPSMetric": "image",
    "SSIM_SETTINGS": "image",
    "LPIPS_BACKBONE_FILES": "image",
    "torch_hub_checkpoints": "image",
    # temporal
    "FlowEstimator": "temporal",
    "FarnebackFlow": "temporal",
    "RAFTFlow": "temporal",
    "farneback_flow": "temporal",
    "flow_magnitude_curve": "temporal",
    "flicker": "temporal",
    "temporal_consistency": "temporal",
    "RAFT_WEIGHT_FILES": "temporal",
    # face
    "FaceEstimator": "face",
    "SyntheticFaceRegressor": "face",
    "FaceRegressorConfig": "face",
    "FaceAccuracyReport": "face",
    "DECAEstimator": "face",
    "EMOCAEstimator": "face",
    "load_face_estimator": "face",
    "render_face_frames": "face",
    "pose_error": "face",
    "pose_error_parts": "face",
    "expression_error": "face",
    "face_consistency": "face",
    # emotion
    "true_emotions": "emotion",
    "emotion_accuracy": "emotion",
    "shard_emotion_accuracy": "emotion",
    # aggregate
    "finite_mean": "aggregate",
    "summarize": "aggregate",
    "group_means": "aggregate",
    "mean_by": "aggregate",
    "aggregate_actors": "aggregate",
    "jsonable": "aggregate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
