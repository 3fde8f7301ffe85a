"""Per-actor trajectories: the emotion schedule, talking expressions, head pose, and the stage-1 codes.

Why: a talking-head video is smooth expression and head motion under changing emotions; the paper's
stage-1 proxy (INSTA) is driven by *tracked* codes that are slightly wrong and jitter from frame to
frame. Everything here is a pure function of a seed, so an actor can be regenerated bit for bit and
its ground truth (emotion per frame, true and perturbed codes) is known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..data.layout import EMOTIONS, EXPRESSION_DIM, POSE_DIM
from ..errors import ConsistentAvatarError
from .emotions import (
    EMOTION_PROFILES,
    NUM_SEMANTIC_DIMS,
    SEMANTIC_RANGE,
    SpeakerStyle,
    expression_trajectory,
    sample_speaker_style,
    smooth_noise,
)
from .head import HEAD_UNIT_M, Stage1Degradation

ACTOR_SEED_TAG = 0x41435452  # "ACTR": actors never share random streams with synthetic MEAD speakers


def actor_seed_sequence(seed: int, index: int) -> np.random.SeedSequence:
    """The root of every random choice about actor ``index`` of a run with ``seed``."""
    if seed < 0 or index < 0:
        raise ConsistentAvatarError(f"seed and actor index must be >= 0, got seed={seed}, index={index}")
    return np.random.SeedSequence([int(seed), ACTOR_SEED_TAG, int(index)])


def emotion_schedule(frames: int, fps: float, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Per-frame emotion labels and intensities: segments in shuffled order, all eight emotions
    once before any repeats, so even a short actor shows every emotion when it has >= 8 * 10 frames.

    Segment length is ~frames / 8, clamped to 10 frames .. 3 s, with ±25 % jitter.
    """
    if frames < 1:
        raise ConsistentAvatarError(f"an emotion schedule needs frames >= 1, got {frames}")
    base = int(np.clip(frames // len(EMOTIONS), 10, max(10, round(3.0 * fps))))
    labels: list[str] = []
    intensity: list[float] = []
    order: list[int] = []
    while len(labels) < frames:
        if not order:
            order = list(rng.permutation(len(EMOTIONS)))
            if labels and EMOTIONS[order[0]] == labels[-1]:
                order.append(order.pop(0))
        emotion = EMOTIONS[order.pop(0)]
        n = max(3, int(round(base * rng.uniform(0.75, 1.25))))
        level = 1.0 if emotion == "neutral" else float(rng.uniform(0.75, 1.2))
        labels.extend([emotion] * n)
        intensity.extend([level] * n)
    return labels[:frames], np.asarray(intensity[:frames], np.float32)


def pose_trajectory(labels: list[str], fps: float, rng: np.random.Generator) -> np.ndarray:
    """(T, 6) float32: slow head sway and nods (axis-angle, radians) and small translation
    (metres), plus each emotion's pose bias, blended smoothly across emotion changes."""
    frames = len(labels)
    rot = np.stack([
        0.05 * smooth_noise(rng, frames, 1, 0.8 * fps)[:, 0],  # nod
        0.14 * smooth_noise(rng, frames, 1, 1.2 * fps)[:, 0],  # turn
        0.035 * smooth_noise(rng, frames, 1, 1.0 * fps)[:, 0],  # tilt
    ], 1)
    trans = np.stack([
        0.006 * smooth_noise(rng, frames, 1, 1.0 * fps)[:, 0],
        0.004 * smooth_noise(rng, frames, 1, 1.0 * fps)[:, 0],
        0.008 * smooth_noise(rng, frames, 1, 1.5 * fps)[:, 0],
    ], 1)
    bias = np.stack([EMOTION_PROFILES[e].pose_bias for e in labels]).astype(np.float64)
    bias = gaussian_filter1d(bias, max(0.6, 0.25 * fps), axis=0, mode="nearest")
    pose = np.concatenate([rot, trans], 1) + bias
    pose[:, :3] = np.clip(pose[:, :3], -0.45, 0.45)
    pose[:, 3:] = np.clip(pose[:, 3:], -0.3 * HEAD_UNIT_M, 0.3 * HEAD_UNIT_M)
    return pose.astype(np.float32)


def stage1_codes(expression: np.ndarray, pose: np.ndarray, degradation: Stage1Degradation,
                 rng: np.random.Generator, fps: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """The codes the coarse proxy is rendered with: the true ones damped, with a slowly varying
    error and independent per-frame jitter (the tracking noise that makes INSTA flicker)."""
    expression = np.asarray(expression, np.float32)
    pose = np.asarray(pose, np.float32)
    frames = len(expression)
    d = degradation
    ce = expression.copy()
    k = NUM_SEMANTIC_DIMS
    ce[:, :k] = ((1 - d.expression_damping) * expression[:, :k]
                 + d.expression_bias_std * smooth_noise(rng, frames, k, 1.0 * fps)
                 + d.expression_jitter_std * rng.standard_normal((frames, k)).astype(np.float32))
    ce[:, k:] += 0.3 * d.expression_jitter_std * rng.standard_normal((frames, EXPRESSION_DIM - k)).astype(np.float32)
    for dim, (lo, hi) in SEMANTIC_RANGE.items():
        np.clip(ce[:, dim], lo, hi, out=ce[:, dim])
    cp = pose.copy()
    cp[:, :3] += d.pose_rot_bias_std * smooth_noise(rng, frames, 3, 1.0 * fps)
    cp[:, :3] += d.pose_rot_jitter_std * rng.standard_normal((frames, 3)).astype(np.float32)
    cp[:, 3:] += d.pose_trans_jitter_std * rng.standard_normal((frames, 3)).astype(np.float32)
    return ce.astype(np.float32), cp.astype(np.float32)


@dataclass(frozen=True)
class ActorMotion:
    """One actor's whole performance: per-frame labels, true codes, and stage-1 codes."""

    labels: list[str]
    intensity: np.ndarray  # (T,)
    expression: np.ndarray  # (T, 100) true codes (what the real frame shows, what tracking stores)
    pose: np.ndarray  # (T, 6)
    coarse_expression: np.ndarray  # (T, 100) codes the stage-1 proxy is rendered with
    coarse_pose: np.ndarray  # (T, 6)
    style: SpeakerStyle
    identity_seed: int


def actor_motion(seed: int, index: int, frames: int, fps: float, degradation: Stage1Degradation) -> ActorMotion:
    """Deterministic motion of actor ``index`` in a run with ``seed``."""
    if frames < 1 or not fps > 0:
        raise ConsistentAvatarError(f"actor motion needs frames >= 1 and fps > 0, got frames={frames}, fps={fps}")
    root = actor_seed_sequence(seed, index)
    ident_ss, style_ss, sched_ss, expr_ss, pose_ss, stage1_ss = root.spawn(6)
    identity_seed = int(ident_ss.generate_state(1)[0])
    style = sample_speaker_style(np.random.default_rng(style_ss))
    labels, intensity = emotion_schedule(frames, fps, np.random.default_rng(sched_ss))
    expression = expression_trajectory(labels, fps, style, np.random.default_rng(expr_ss), intensity)
    pose = pose_trajectory(labels, fps, np.random.default_rng(pose_ss))
    ce, cp = stage1_codes(expression, pose, degradation, np.random.default_rng(stage1_ss), fps)
    if expression.shape != (frames, EXPRESSION_DIM) or pose.shape != (frames, POSE_DIM):
        raise AssertionError("motion shapes")
    return ActorMotion(labels, intensity, expression, pose, ce, cp, style, identity_seed)


def frame_rng(seed: int, index: int, frame: int) -> np.random.Generator:
    """Independent random stream for one frame's flicker (order- and worker-independent)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), ACTOR_SEED_TAG, int(index), 0xF11C, int(frame)]))
