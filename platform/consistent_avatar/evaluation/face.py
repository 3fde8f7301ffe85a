"""Pose error and expression error (paper Table 2) with pluggable face-parameter estimators.

The paper runs DECA on the generated frames and measures the distance between the estimated and the
ground-truth coefficients: Pose Error (PE) "measured by the Euclidean distance", Expression Error (EE)
"similar to PE". Here both are the per-frame Euclidean (L2) norm of the coefficient difference over
the dimensions the estimator actually estimates (:func:`pose_error`, :func:`expression_error`),
averaged over frames by :mod:`.aggregate`.

Estimators (:class:`FaceEstimator`): frames uint8 (N, H, W, 3) → (expression (N, 100), pose (N, 6)).

* :class:`SyntheticFaceRegressor` — a small CNN trained on renders of *fresh* synthetic actors
  (a seed domain of their own, :data:`TRAIN_SEED`), regressing the 12 blendshape-like expression
  dims and the 6 pose values the synthetic renderer obeys. Trains in ~2.5 minutes on 2 CPU cores;
  ``python -m consistent_avatar.evaluation.face train --help`` trains a better one.
* :class:`DECAEstimator` / :class:`EMOCAEstimator` — hooks for the real estimators, used only when
  their package is installed and a config names their weights; otherwise unavailable with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.layout import EXPRESSION_DIM, POSE_DIM
from ..errors import ConsistentAvatarError
from .image import MetricUnavailableError, Unavailable

log = logging.getLogger(__name__)

POSE_NAMES = ("rx", "ry", "rz", "tx", "ty", "tz")  # axis-angle radians, then metres
TRAIN_SEED = 0x46414345  # "FACE": the regressor's training actors never share a seed with evaluated ones
REGRESSOR_FORMAT = "consistent_avatar.face_regressor"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------------


def _codes(x: Any, width: int, what: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, np.float64)
    if a.ndim != 2 or a.shape[1] != width:
        raise ConsistentAvatarError(f"{what} must be shaped (N, {width}), got {a.shape}")
    return a


def _dims(dims: Sequence[int] | None, width: int, what: str) -> np.ndarray:
    if dims is None:
        return np.arange(width)
    d = np.asarray(list(dims), np.int64)
    if d.ndim != 1 or len(d) == 0 or d.min() < 0 or d.max() >= width or len(set(d.tolist())) != len(d):
        raise ConsistentAvatarError(f"{what}: dims must be distinct indices in 0..{width - 1}, got {list(dims)}")
    return d


def _l2_rows(pred: np.ndarray, true: np.ndarray, dims: np.ndarray, what: str) -> np.ndarray:
    if pred.shape != true.shape:
        raise ConsistentAvatarError(f"{what}: predicted and true codes differ in shape: {pred.shape} vs {true.shape}")
    return np.sqrt(((pred[:, dims] - true[:, dims]) ** 2).sum(axis=1))


def pose_error(pred_pose: Any, true_pose: Any, dims: Sequence[int] | None = None) -> np.ndarray:
    """Pose Error per frame, (N,) float64: ``||pred[dims] − true[dims]||₂`` of the (N, 6) pose codes
    (the paper's Euclidean distance). ``dims`` defaults to all six (rotation in radians and
    translation in metres summed as the paper does); pass the estimator's ``pose_dims``."""
    p, t = _codes(pred_pose, POSE_DIM, "pred_pose"), _codes(true_pose, POSE_DIM, "true_pose")
    return _l2_rows(p, t, _dims(dims, POSE_DIM, "pose_error"), "pose_error")


def pose_error_parts(pred_pose: Any, true_pose: Any) -> dict[str, np.ndarray]:
    """The pose error split by unit: ``rotation`` (N,) radians (L2 of the axis-angle difference,
    dims 0–2) and ``translation`` (N,) metres (dims 3–5)."""
    p, t = _codes(pred_pose, POSE_DIM, "pred_pose"), _codes(true_pose, POSE_DIM, "true_pose")
    return {"rotation": _l2_rows(p, t, np.arange(3), "pose_error"), "translation": _l2_rows(p, t, np.arange(3, 6), "pose_error")}


def expression_error(pred_expr: Any, true_expr: Any, dims: Sequence[int] | None = None) -> np.ndarray:
    """Expression Error per frame, (N,) float64: ``||pred[dims] − true[dims]||₂`` of the (N, 100)
    expression codes — "similar to PE" (paper), i.e. the same Euclidean distance. ``dims`` defaults
    to all 100; pass the estimator's ``expression_dims`` so dims it does not estimate (filled with a
    constant) do not add a constant floor."""
    p, t = _codes(pred_expr, EXPRESSION_DIM, "pred_expr"), _codes(true_expr, EXPRESSION_DIM, "true_expr")
    return _l2_rows(p, t, _dims(dims, EXPRESSION_DIM, "expression_error"), "expression_error")


@runtime_checkable
class FaceEstimator(Protocol):
    """Face parameters from frames: uint8 (N, H, W, 3) RGB → (expression (N, 100), pose (N, 6)).

    ``expression_dims`` / ``pose_dims`` list the dimensions it really estimates (others are filled
    with a constant or NaN and must be left out of the errors); ``available`` / ``reason`` as for
    every metric component (calling an unavailable one raises :class:`.image.MetricUnavailableError`).
    ``shard_codes`` says whether its codes are the shards' own (the space the tracked pose and
    expression and the emotion database are in): then PE/EE compare with the tracked codes; otherwise
    (DECA's FLAME codes on synthetic actors) with the estimator's own reading of the real frames.
    """

    name: str
    shard_codes: bool

    @property
    def expression_dims(self) -> tuple[int, ...]: ...

    @property
    def pose_dims(self) -> tuple[int, ...]: ...

    @property
    def available(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def face_consistency(
    estimator: FaceEstimator,
    rendered: Any,
    true_expression: Any | None = None,
    true_pose: Any | None = None,
    real: Any | None = None,
) -> dict[str, Any]:
    """PE and EE of rendered frames, per frame, against the ground-truth codes and/or the real frames.

    * with ``true_expression``/``true_pose`` (the tracked/synthetic codes the frames were rendered
      for): ``pose_error``, ``expression_error`` — estimator(rendered) vs the truth (the paper's PE/EE);
    * with ``real`` frames as well: ``pose_error_real``, ``expression_error_real`` — estimator(real)
      vs the truth, the estimator's own floor on real frames;
    * with ``real`` frames: ``pose_error_vs_real``, ``expression_error_vs_real`` — estimator(rendered)
      vs estimator(real): needs no ground truth and cancels the estimator's bias (use it when the
      estimator's code space differs from the truth's, e.g. DECA on synthetic actors).

    Every entry is (N,) float64 over the estimator's ``pose_dims`` / ``expression_dims``; ``estimator``
    holds its name. An unavailable estimator gives ``{"estimator": name, "unavailable": Unavailable}``.
    """
    out: dict[str, Any] = {"estimator": estimator.name}
    if not estimator.available:
        out["unavailable"] = Unavailable(f"face[{estimator.name}]", estimator.reason or "face estimator unavailable")
        return out
    ed, pd = estimator.expression_dims, estimator.pose_dims
    e_r, p_r = estimator(np.asarray(rendered))
    if true_pose is not None:
        out["pose_error"] = pose_error(p_r, true_pose, pd)
    if true_expression is not None:
        out["expression_error"] = expression_error(e_r, true_expression, ed)
    if real is not None:
        e_t, p_t = estimator(np.asarray(real))
        out["pose_error_vs_real"] = pose_error(p_r, p_t, pd)
        out["expression_error_vs_real"] = expression_error(e_r, e_t, ed)
        if true_pose is not None:
            out["pose_error_real"] = pose_error(p_t, true_pose, pd)
        if true_expression is not None:
            out["expression_error_real"] = expression_error(e_t, true_expression, ed)
    return out


# --------------------------------------------------------------------------------------------------
# training data: renders of fresh synthetic actors
# --------------------------------------------------------------------------------------------------


@dataclass
class FaceFrames:
    """Rendered frames with their true codes: frames uint8 (N, res, res, 3), expression (N, 100),
    pose (N, 6) float32, actor (N,) int (the actor index in the seed domain ``seed``)."""

    frames: np.ndarray
    expression: np.ndarray
    pose: np.ndarray
    actor: np.ndarray
    seed: int

    def __len__(self) -> int:
        return len(self.frames)


def render_face_frames(
    actors: Sequence[int],
    frames_per_actor: int = 100,
    res: int = 64,
    seed: int = TRAIN_SEED,
    stride: int = 3,
    fps: float = 25.0,
    progress: bool = False,
) -> FaceFrames:
    """Render real (undegraded) frames of synthetic actors ``actors`` of seed ``seed``, exactly as
    ``cavatar synth`` renders an actor's ``images/`` (same motion model, same renderer), keeping every
    ``stride``-th frame of a ``frames_per_actor * stride``-frame performance (more variety per frame).
    """
    from tqdm.auto import tqdm

    from ..synthetic.head import FrameRenderer, Stage1Degradation, sample_identity
    from ..synthetic.motion import actor_motion

    if frames_per_actor < 1 or stride < 1 or not actors:
        raise ConsistentAvatarError("render_face_frames needs at least one actor, frames_per_actor >= 1, stride >= 1")
    clean = Stage1Degradation.from_strength(0.0)
    frames, expr, pose, who = [], [], [], []
    for index in tqdm(list(actors), desc="rendering face-regressor frames", unit="actor", disable=not progress):
        motion = actor_motion(seed, int(index), frames_per_actor * stride, fps, clean)
        renderer = FrameRenderer(sample_identity(motion.identity_seed), res, clean).real
        for i in range(0, frames_per_actor * stride, stride):
            view = renderer.render(motion.expression[i], motion.pose[i])
            frames.append((np.clip(view.rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
            expr.append(motion.expression[i])
            pose.append(motion.pose[i])
            who.append(int(index))
    return FaceFrames(np.stack(frames), np.stack(expr).astype(np.float32), np.stack(pose).astype(np.float32),
                      np.asarray(who, np.int64), int(seed))


# --------------------------------------------------------------------------------------------------
# the regressor
# --------------------------------------------------------------------------------------------------


def _semantic_dims() -> tuple[int, ...]:
    from ..synthetic.emotions import NUM_SEMANTIC_DIMS

    return tuple(range(NUM_SEMANTIC_DIMS))


def _dim_names(expression_dims: Sequence[int], pose_dims: Sequence[int]) -> list[str]:
    from ..synthetic.emotions import Expr

    names = []
    for d in expression_dims:
        names.append(f"expr[{d}] {Expr(d).name.lower()}" if d < len(Expr) else f"expr[{d}]")
    return names + [f"pose {POSE_NAMES[d]}" for d in pose_dims]


class FaceRegressorConfig(BaseModel):
    """Everything needed to rebuild a :class:`SyntheticFaceRegressor` (saved as ``config.json``)."""

    model_config = ConfigDict(extra="forbid")

    format: str = REGRESSOR_FORMAT
    version: int = 1
    res: int = Field(64, ge=32, le=256, description="input size (frames are resized to res×res)")
    width: int = Field(32, ge=4, le=256, description="channels of the first conv block")
    expression_dims: tuple[int, ...] = Field(default_factory=_semantic_dims)
    pose_dims: tuple[int, ...] = tuple(range(POSE_DIM))
    target_mean: list[float] | None = None  # per regressed dim (expression dims, then pose dims)
    target_std: list[float] | None = None
    expression_fill: list[float] = Field(default_factory=lambda: [0.0] * EXPRESSION_DIM)
    training: dict[str, Any] = Field(default_factory=dict)  # provenance: seed, actors, schedule, accuracy


def _build_net(cfg: FaceRegressorConfig) -> Any:
    import torch.nn as nn

    w = cfg.width

    def block(ci: int, co: int) -> list[Any]:
        return [nn.Conv2d(ci, co, 3, 2, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True),
                nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

    out = len(cfg.expression_dims) + len(cfg.pose_dims)
    # Four stride-2 blocks (64² → 4²), then a fixed 4×4 grid: positions matter (pose, translation),
    # so the head is a flatten + MLP rather than a global pool.
    return nn.Sequential(
        *block(3, w), *block(w, 2 * w), *block(2 * w, 4 * w), *block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, out),
    )


@dataclass
class FaceAccuracyReport:
    """Accuracy of a face estimator on frames with known codes, against the trivial predictor that
    always answers the training mean. Per regressed dim: ``r2`` (1 − SSE/SST around the evaluated
    frames' own mean; 0 = no better than knowing that mean), ``mae`` and ``mae_mean_predictor``.
    Overall: mean PE / EE (Euclidean, over the regressed dims) of the model and of the mean predictor."""

    dims: list[str]
    r2: list[float]
    mae: list[float]
    mae_mean_predictor: list[float]
    pose_error: float
    pose_error_mean_predictor: float
    expression_error: float
    expression_error_mean_predictor: float
    n_frames: int
    frames: str = ""  # what was evaluated (e.g. "held-out synthetic actors 6..7 of seed ...")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'dim':28s} {'R²':>7s} {'MAE':>9s} {'MAE(mean)':>10s}"]
        for n, r, m, b in zip(self.dims, self.r2, self.mae, self.mae_mean_predictor):
            lines.append(f"{n:28s} {r:7.3f} {m:9.4f} {b:10.4f}")
        lines.append(f"PE {self.pose_error:.4f} (mean predictor {self.pose_error_mean_predictor:.4f});  "
                     f"EE {self.expression_error:.4f} (mean predictor {self.expression_error_mean_predictor:.4f});  "
                     f"{self.n_frames} frames {self.frames}".rstrip())
        return "\n".join(lines)


class SyntheticFaceRegressor:
    """A small CNN regressing the synthetic renderer's expression dims (12 blendshape-like dims by
    default) and pose (6) from a frame, trained on renders of fresh synthetic actors.

    Implements :class:`FaceEstimator`: ``regressor(frames)`` → (expression (N, 100), pose (N, 6));
    dims it does not regress are filled with the training mean (``config.expression_fill``), so
    compare over ``expression_dims``. Frames of any size are resized to ``config.res`` (area
    interpolation). Build with :meth:`train_synthetic` (renders + fits + held-out report) or
    :meth:`fit` on your own frames; :meth:`save` / :meth:`load` a folder with ``model.safetensors``
    and ``config.json``.
    """

    shard_codes = True  # it regresses the synthetic generator's codes: those of synthetic actors' shards

    name = "synthetic_regressor"

    def __init__(self, config: FaceRegressorConfig | dict[str, Any] | None = None, device: str = "cpu") -> None:
        import torch

        if config is None:
            config = FaceRegressorConfig()
        elif isinstance(config, dict):
            try:
                config = FaceRegressorConfig(**config)
            except ValidationError as exc:
                raise ConsistentAvatarError(f"invalid face regressor config: {exc}") from None
        self.config = config
        self.device = device
        self.net = _build_net(config).to(device, memory_format=torch.channels_last)
        self._torch = torch

    # ---- FaceEstimator -------------------------------------------------------------------------

    @property
    def expression_dims(self) -> tuple[int, ...]:
        return tuple(self.config.expression_dims)

    @property
    def pose_dims(self) -> tuple[int, ...]:
        return tuple(self.config.pose_dims)

    @property
    def available(self) -> bool:
        return self.config.target_mean is not None

    @property
    def reason(self) -> str | None:
        return None if self.available else "the face regressor is untrained: call fit() or train_synthetic(), or load() a trained one"

    def trained_on(self, seed: int, index: int) -> bool:
        """Whether synthetic actor ``index`` of seed ``seed`` was among the training actors (its
        errors would then be optimistic)."""
        t = self.config.training
        return int(t.get("seed", -1)) == int(seed) and int(index) in set(t.get("train_actors", []))

    def _inputs(self, frames: Any) -> Any:
        import cv2

        a = np.asarray(frames.detach().cpu().numpy() if hasattr(frames, "detach") else frames)
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ConsistentAvatarError(f"face estimator input must be uint8 RGB frames (N, H, W, 3), got {a.shape} {a.dtype}")
        r = self.config.res
        if len(a) == 0:
            a = np.zeros((0, r, r, 3), np.uint8)
        elif a.shape[1:3] != (r, r):
            a = np.stack([cv2.resize(x, (r, r), interpolation=cv2.INTER_AREA if x.shape[0] > r else cv2.INTER_LINEAR)
                          for x in a])
        return self._torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div_(255.0)

    def _stats(self) -> tuple[Any, Any]:
        t = self._torch
        return (t.tensor(self.config.target_mean, dtype=t.float32, device=self.device),
                t.tensor(self.config.target_std, dtype=t.float32, device=self.device))

    def predict_targets(self, frames: Any, batch_size: int = 256) -> np.ndarray:
        """(N, len(expression_dims) + len(pose_dims)) float32 in code units."""
        if not self.available:
            raise MetricUnavailableError(Unavailable(self.name, self.reason or ""))
        x = self._inputs(frames)
        mean, std = self._stats()
        self.net.eval()
        outs = []
        with self._torch.no_grad():
            for s in range(0, len(x), batch_size):
                xb = x[s:s + batch_size].to(self.device, memory_format=self._torch.channels_last)
                outs.append((self.net(xb) * std + mean).cpu())
        return self._torch.cat(outs).numpy().astype(np.float32) if outs else np.zeros((0, len(mean)), np.float32)

    def __call__(self, frames: Any) -> tuple[np.ndarray, np.ndarray]:
        y = self.predict_targets(frames)
        ne = len(self.expression_dims)
        expr = np.tile(np.asarray(self.config.expression_fill, np.float32), (len(y), 1))
        expr[:, list(self.expression_dims)] = y[:, :ne]
        pose = np.zeros((len(y), POSE_DIM), np.float32)
        if len(self.pose_dims) < POSE_DIM:
            pose[:] = np.nan
        pose[:, list(self.pose_dims)] = y[:, ne:]
        return expr, pose

    # ---- training ------------------------------------------------------------------------------

    def _targets(self, expression: Any, pose: Any) -> np.ndarray:
        e = _codes(expression, EXPRESSION_DIM, "expression")
        p = _codes(pose, POSE_DIM, "pose")
        return np.concatenate([e[:, list(self.expression_dims)], p[:, list(self.pose_dims)]], 1).astype(np.float32)

    def fit(
        self,
        frames: Any,
        expression: Any,
        pose: Any,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        augment: bool = True,
        seed: int = 0,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Fit on frames (N, H, W, 3) uint8 with their true codes (N, 100), (N, 6); returns the
        history (loss per epoch, seconds). Targets are standardised with the training mean/std
        (stored in the config). Adam with cosine decay; ``augment`` applies per-image brightness
        (±6 %) and colour (±2 %) gains and pixel noise (σ 0.01), since the frames to be judged
        are renders, not the generator's own output."""
        torch = self._torch
        from tqdm.auto import tqdm

        y = self._targets(expression, pose)
        x = self._inputs(frames)
        if len(x) != len(y) or len(x) < 2:
            raise ConsistentAvatarError(f"fit needs >= 2 frames with one code each, got {len(x)} frames and {len(y)} codes")
        mean, std = y.mean(0), y.std(0)
        std = np.where(std > 1e-6, std, 1.0)
        e_all = _codes(expression, EXPRESSION_DIM, "expression")
        self.config.target_mean = [float(v) for v in mean]
        self.config.target_std = [float(v) for v in std]
        self.config.expression_fill = [float(v) for v in e_all.mean(0)]
        yt = torch.from_numpy((y - mean) / std).float()

        gen = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        self.net = _build_net(self.config).to(self.device, memory_format=torch.channels_last)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(x) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                                    pct_start=0.15)
        history: dict[str, Any] = {"loss": [], "frames": len(x), "epochs": epochs, "batch_size": batch_size, "lr": lr}
        t0 = time.perf_counter()
        self.net.train()
        for _ in tqdm(range(epochs), desc="fitting face regressor", unit="epoch", disable=not progress):
            perm = torch.randperm(len(x), generator=gen)
            total = 0.0
            for s in range(0, len(x), batch_size):
                idx = perm[s:s + batch_size]
                if len(idx) < 2:
                    continue
                xb, yb = x[idx], yt[idx]
                if augment:
                    gain = (1 + 0.06 * torch.randn(len(xb), 1, 1, 1, generator=gen)) * (1 + 0.02 * torch.randn(len(xb), 3, 1, 1, generator=gen))
                    xb = (xb * gain + 0.01 * torch.randn(xb.shape, generator=gen)).clamp_(0, 1)
                pred = self.net(xb.to(self.device, memory_format=torch.channels_last))
                loss = torch.nn.functional.mse_loss(pred, yb.to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            history["loss"].append(total / len(x))
        history["seconds"] = round(time.perf_counter() - t0, 2)
        self.net.eval()
        return history

    def evaluate(self, frames: Any, expression: Any, pose: Any, description: str = "") -> FaceAccuracyReport:
        """:class:`FaceAccuracyReport` on frames whose true codes are known."""
        y = self._targets(expression, pose).astype(np.float64)
        pred = self.predict_targets(frames).astype(np.float64)
        base = np.tile(np.asarray(self.config.target_mean, np.float64), (len(y), 1))
        sst = ((y - y.mean(0)) ** 2).sum(0)
        sse = ((pred - y) ** 2).sum(0)
        r2 = np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), np.nan)
        ne = len(self.expression_dims)

        def l2(a: np.ndarray, sl: slice) -> float:
            return float(np.sqrt(((a[:, sl] - y[:, sl]) ** 2).sum(1)).mean()) if a[:, sl].shape[1] else float("nan")

        return FaceAccuracyReport(
            dims=_dim_names(self.expression_dims, self.pose_dims),
            r2=[float(v) for v in r2],
            mae=[float(v) for v in np.abs(pred - y).mean(0)],
            mae_mean_predictor=[float(v) for v in np.abs(base - y).mean(0)],
            pose_error=l2(pred, slice(ne, None)),
            pose_error_mean_predictor=l2(base, slice(ne, None)),
            expression_error=l2(pred, slice(0, ne)),
            expression_error_mean_predictor=l2(base, slice(0, ne)),
            n_frames=len(y),
            frames=description,
        )

    @classmethod
    def train_synthetic(
        cls,
        actors: int = 32,
        frames_per_actor: int = 75,
        holdout_actors: int = 4,
        res: int = 64,
        width: int = 32,
        epochs: int = 15,
        batch_size: int = 64,
        lr: float = 2e-3,
        seed: int = TRAIN_SEED,
        stride: int = 5,
        device: str = "cpu",
        progress: bool = False,
    ) -> tuple["SyntheticFaceRegressor", FaceAccuracyReport]:
        """Render ``actors`` fresh synthetic actors (indices 0..actors-1 of ``seed``) for training and
        ``holdout_actors`` more (the next indices: unseen identities and performances) for the
        accuracy report; fit; return the regressor (its config records all of it) and the report.

        Defaults take ~2.5 minutes on 2 CPU cores (held-out PE 0.053 vs 0.145 for the mean predictor,
        EE 0.60 vs 0.99). A better one (~5.5 min on 2 cores; PE 0.038 vs 0.176, EE 0.42 vs 0.96):
        ``python -m consistent_avatar.evaluation.face train --out models/face_regressor --actors 80
        --frames-per-actor 100 --holdout-actors 8 --epochs 20`` (see docs/evaluation.md).
        """
        if actors < 1 or holdout_actors < 1:
            raise ConsistentAvatarError("train_synthetic needs actors >= 1 and holdout_actors >= 1")
        t0 = time.perf_counter()
        train = render_face_frames(range(actors), frames_per_actor, res, seed, stride, progress=progress)
        held = render_face_frames(range(actors, actors + holdout_actors), max(1, frames_per_actor // 2), res, seed,
                                  stride, progress=progress)
        render_s = time.perf_counter() - t0
        reg = cls(FaceRegressorConfig(res=res, width=width), device=device)
        hist = reg.fit(train.frames, train.expression, train.pose, epochs=epochs, batch_size=batch_size, lr=lr,
                       progress=progress)
        desc = f"(held-out synthetic actors {actors}..{actors + holdout_actors - 1} of seed {seed:#x})"
        report = reg.evaluate(held.frames, held.expression, held.pose, desc)
        reg.config.training = {
            "seed": int(seed),
            "train_actors": list(range(actors)),
            "holdout_actors": list(range(actors, actors + holdout_actors)),
            "frames_per_actor": frames_per_actor,
            "stride": stride,
            "res": res,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "final_loss": hist["loss"][-1] if hist["loss"] else None,
            "render_seconds": round(render_s, 2),
            "fit_seconds": hist["seconds"],
            "holdout_report": report.to_json(),
        }
        return reg, report

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/`` = ``model.safetensors`` + ``config.json``, atomically (a complete folder or
        nothing)."""
        from safetensors.torch import save_file

        from ..io import publish_dir, staging_dir

        if not self.available:
            raise ConsistentAvatarError("refusing to save an untrained face regressor: fit() it first")
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_dir(final)
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
            save_file(state, str(staged / WEIGHTS_FILE), metadata={"format": REGRESSOR_FORMAT})
            (staged / CONFIG_FILE).write_text(json.dumps(self.config.model_dump(mode="json"), indent=1) + "\n")
            publish_dir(staged, final)
        except BaseException:
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
            raise
        return final

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> "SyntheticFaceRegressor":
        from safetensors.torch import load_file

        root = Path(path)
        cfg_file, w_file = root / CONFIG_FILE, root / WEIGHTS_FILE
        if not cfg_file.is_file() or not w_file.is_file():
            raise ConsistentAvatarError(
                f"{root} is not a saved face regressor (needs {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
                "`python -m consistent_avatar.evaluation.face train --out DIR`"
            )
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != REGRESSOR_FORMAT:
            raise ConsistentAvatarError(f"{cfg_file} is not a {REGRESSOR_FORMAT} config (format={cfg.get('format')!r})")
        reg = cls(cfg, device=device)
        try:
            reg.net.load_state_dict(load_file(str(w_file), device=device), strict=True)
        except RuntimeError as exc:
            raise ConsistentAvatarError(f"{w_file} does not match {cfg_file}: {exc}") from None
        reg.net.eval()
        return reg


# --------------------------------------------------------------------------------------------------
# DECA / EMOCA hooks
# --------------------------------------------------------------------------------------------------


def _frames_224(frames: Any, device: str) -> Any:
    import cv2
    import torch

    a = np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ConsistentAvatarError(f"face estimator input must be uint8 RGB frames (N, H, W, 3), got {a.shape} {a.dtype}")
    a = np.stack([cv2.resize(x, (224, 224), interpolation=cv2.INTER_AREA if x.shape[0] > 224 else cv2.INTER_LINEAR) for x in a])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(255.0).to(device)


class _ExternalEstimator:
    """Shared availability logic: a package that must be importable and weight files that must exist."""

    name = "external"
    package = ""
    install_hint = ""
    expression_dims: tuple[int, ...] = tuple(range(50))  # FLAME expression coefficients DECA/EMOCA estimate
    pose_dims: tuple[int, ...] = (0, 1, 2)  # global head rotation (axis-angle); their pose[3:] is the jaw

    def __init__(self, device: str = "cpu", batch_size: int = 32, shard_codes: bool = False,
                 **files: str | os.PathLike[str] | None) -> None:
        self.device = device
        self.batch_size = int(batch_size)
        # True only when the shards' pose/expression were tracked with this same estimator (real
        # actors tracked with DECA); FLAME codes are not the synthetic generator's codes
        self.shard_codes = bool(shard_codes)
        self.files = {k: (Path(v) if v is not None else None) for k, v in files.items()}
        self._model: Any = None
        self._reason = self._check()

    def _required(self) -> dict[str, str]:
        return {}

    def _check(self) -> str | None:
        if importlib.util.find_spec(self.package) is None:
            return f"{self.name.upper()} is not installed (Python package {self.package!r}; {self.install_hint})"
        for key, what in self._required().items():
            p = self.files.get(key)
            if p is None:
                return f"no {self.name.upper()} weights configured: set {key} to the path of {what}"
            if not p.exists():
                return f"{self.name.upper()} {key} {p} not found ({what})"
        return None

    @property
    def available(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> str | None:
        return self._reason

    def _encode(self, images: Any) -> tuple[Any, Any]:  # pragma: no cover - needs the package
        raise NotImplementedError

    def __call__(self, frames: Any) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - needs the package
        if not self.available:
            raise MetricUnavailableError(Unavailable(f"face[{self.name}]", self._reason or ""))
        import torch

        exprs, poses = [], []
        with torch.no_grad():
            for s in range(0, len(frames), self.batch_size):
                exp, pose = self._encode(_frames_224(frames[s:s + self.batch_size], self.device))
                exprs.append(exp.float().cpu().numpy())
                poses.append(pose.float().cpu().numpy())
        exp, pose = np.concatenate(exprs), np.concatenate(poses)
        expression = np.zeros((len(exp), EXPRESSION_DIM), np.float32)
        expression[:, : exp.shape[1]] = exp
        out_pose = np.full((len(pose), POSE_DIM), np.nan, np.float32)
        out_pose[:, :3] = pose[:, :3]
        return expression, out_pose


class DECAEstimator(_ExternalEstimator):
    """DECA (Feng et al. 2021) as the paper uses it: ``pip install`` the ``decalib`` package from
    https://github.com/yfeng95/DECA and name its weights ``deca_model.tar`` (``weights``) and,
    optionally, FLAME's ``generic_model.pkl`` (``flame_model``). Frames are taken as face crops and
    resized to 224². Returns DECA's 50 FLAME expression coefficients in dims 0–49 (the rest 0) and its
    global head rotation in pose dims 0–2 (translation NaN: DECA's camera is not a pose translation).
    Its codes are FLAME's, not the synthetic generator's: on synthetic actors compare
    ``*_vs_real`` entries of :func:`face_consistency`. Not exercised here (package not installed)."""

    name = "deca"
    package = "decalib"
    install_hint = "install DECA from https://github.com/yfeng95/DECA and name deca_model.tar as weights"

    def __init__(self, weights: str | os.PathLike[str] | None = None, flame_model: str | os.PathLike[str] | None = None,
                 device: str = "cpu", batch_size: int = 32, shard_codes: bool = False) -> None:
        super().__init__(device, batch_size, shard_codes, weights=weights, flame_model=flame_model)

    def _required(self) -> dict[str, str]:
        req = {"weights": "DECA's deca_model.tar"}
        if self.files.get("flame_model") is not None:
            req["flame_model"] = "FLAME's generic_model.pkl"
        return req

    def _encode(self, images: Any) -> tuple[Any, Any]:  # pragma: no cover - needs the package
        if self._model is None:
            from decalib.deca import DECA
            from decalib.utils.config import cfg as deca_cfg

            cfg = deca_cfg.clone()
            cfg.pretrained_modelpath = str(self.files["weights"])
            if self.files.get("flame_model") is not None:
                cfg.model.flame_model_path = str(self.files["flame_model"])
            self._model = DECA(config=cfg, device=self.device)
        code = self._model.encode(images, use_detail=False)
        return code["exp"], code["pose"]


class EMOCAEstimator(_ExternalEstimator):
    """EMOCA (Danecek et al. 2022): the ``gdl`` / ``gdl_apps`` packages from
    https://github.com/radekd91/emoca, ``models_dir`` holding ``model_name`` (e.g.
    ``EMOCA_v2_lr_mse_20``). Outputs as :class:`DECAEstimator` (``expcode`` → dims 0–49, global
    rotation of ``posecode`` → pose dims 0–2). Not exercised here (package not installed)."""

    name = "emoca"
    package = "gdl_apps"
    install_hint = "install EMOCA from https://github.com/radekd91/emoca and name its models folder as models_dir"

    def __init__(self, models_dir: str | os.PathLike[str] | None = None, model_name: str = "EMOCA_v2_lr_mse_20",
                 mode: str = "detail", device: str = "cpu", batch_size: int = 32, shard_codes: bool = False) -> None:
        self.model_name, self.mode = model_name, mode
        super().__init__(device, batch_size, shard_codes, models_dir=models_dir)

    def _required(self) -> dict[str, str]:
        return {"models_dir": f"EMOCA's models folder containing {self.model_name}/"}

    def _check(self) -> str | None:
        reason = super()._check()
        if reason is None and not (self.files["models_dir"] / self.model_name).is_dir():
            reason = f"EMOCA model {self.model_name!r} not found under {self.files['models_dir']}"
        return reason

    def _encode(self, images: Any) -> tuple[Any, Any]:  # pragma: no cover - needs the package
        if self._model is None:
            from gdl_apps.EMOCA.utils.load import load_model

            model, _ = load_model(str(self.files["models_dir"]), self.model_name, self.mode)
            self._model = model.to(self.device).eval()
        vals = self._model.encode({"image": images}, training=False)
        return vals["expcode"], vals["posecode"]


def load_face_estimator(spec: dict[str, Any], device: str = "cpu") -> FaceEstimator:
    """An estimator from a config mapping: ``{"kind": "synthetic", "path": DIR}``,
    ``{"kind": "deca", "weights": ..., "flame_model": ...}`` or ``{"kind": "emoca", "models_dir": ...,
    "model_name": ..., "mode": ...}``; DECA/EMOCA take ``"shard_codes": true`` when the shards' codes
    were tracked with that same estimator (default false: compare with its reading of the real
    frames). DECA/EMOCA come back unavailable (``.reason``) when their package or files are missing;
    a synthetic path that does not hold a regressor is an error."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "synthetic":
        if "path" not in spec:
            raise ConsistentAvatarError("face estimator 'synthetic' needs path: a folder written by SyntheticFaceRegressor.save")
        return SyntheticFaceRegressor.load(spec["path"], device=device)
    shard_codes = spec.get("shard_codes", False)
    if not isinstance(shard_codes, bool):
        raise ConsistentAvatarError(f"face estimator shard_codes must be true or false, got {shard_codes!r}")
    if kind == "deca":
        return DECAEstimator(spec.get("weights"), spec.get("flame_model"), device=device, shard_codes=shard_codes)
    if kind == "emoca":
        return EMOCAEstimator(spec.get("models_dir"), spec.get("model_name", "EMOCA_v2_lr_mse_20"),
                              spec.get("mode", "detail"), device=device, shard_codes=shard_codes)
    raise ConsistentAvatarError(f"face estimator kind must be 'synthetic', 'deca' or 'emoca', got {kind!r}")


# --------------------------------------------------------------------------------------------------
# command line: train a regressor
# --------------------------------------------------------------------------------------------------


def _add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--out", required=True, help="folder to write (model.safetensors + config.json)")
    t.add_argument("--actors", type=int, default=32, help="training actors (fresh identities)")
    t.add_argument("--frames-per-actor", type=int, default=75)
    t.add_argument("--holdout-actors", type=int, default=4, help="unseen actors for the accuracy report")
    t.add_argument("--stride", type=int, default=5, help="keep every stride-th frame of each performance")
    t.add_argument("--res", type=int, default=64)
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=TRAIN_SEED)
    t.add_argument("--device", default="cpu")


def _run_train(args: argparse.Namespace) -> int:
    try:
        reg, report = SyntheticFaceRegressor.train_synthetic(
            actors=args.actors, frames_per_actor=args.frames_per_actor, holdout_actors=args.holdout_actors,
            res=args.res, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, stride=args.stride, device=args.device, progress=True,
        )
        path = reg.save(args.out)
    except ConsistentAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    tr = reg.config.training
    print(f"rendered in {tr['render_seconds']} s, fitted in {tr['fit_seconds']} s; saved to {path}")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``cavatar face-regressor`` (train the synthetic estimator for pose / expression error)."""
    t = subparsers.add_parser(
        "face-regressor",
        help="train the synthetic face-parameter regressor used by `cavatar evaluate --face-estimator DIR`",
    )
    _add_train_arguments(t)
    t.set_defaults(func=_run_train)
    return t


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consistent_avatar.evaluation.face",
        description="Train the synthetic face-parameter regressor used for pose/expression error.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(sub.add_parser("train", help="render fresh synthetic actors, fit, report held-out accuracy, save"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _run_train(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
