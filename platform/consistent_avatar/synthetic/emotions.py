"""The emotion expression model shared by synthetic actors and the synthetic MEAD database.

The paper labels every frame by matching its FLAME expression against MEAD's labelled expressions
(eq. 7). No real MEAD or FLAME data is reachable here, so both sides come from one generative model:
each of the eight MEAD emotions is a distribution over a 100-d expression code whose first
:data:`NUM_SEMANTIC_DIMS` dimensions are blendshape-like (jaw open, smile, brow raise, ...) and whose
remaining dimensions are small noise, with talking (jaw oscillation), blinks and a per-speaker style
on top. Because actors and the database share the model but not the speakers, labelling accuracy on
actors measures generalisation across people, as it does with the real datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..data.layout import EMOTIONS, EXPRESSION_DIM, POSE_DIM
from ..errors import ConsistentAvatarError


class Expr(IntEnum):
    """Blendshape-like expression dimensions (index into the 100-d code) the head renderer obeys."""

    JAW_OPEN = 0  # lower jaw drops, mouth opens (0..1.2)
    SMILE = 1  # mouth corners up and out; negative = corners down (-1..1.2)
    LIP_PUCKER = 2  # lips rounded and pushed together (0..1)
    BROW_RAISE = 3  # whole brows up (forehead wrinkles); negative = lowered (-0.6..1.2)
    BROW_FROWN = 4  # brows down and drawn together (glabella lines) (0..1.2)
    BLINK = 5  # eyelid closure (0 open .. 1 closed)
    EYE_WIDE = 6  # upper lid raised, more sclera (0..1.2)
    NOSE_WRINKLE = 7  # nose bridge wrinkles, nostrils up (0..1.2)
    UPPER_LIP_RAISE = 8  # upper lip lifted, teeth show (0..1.2)
    LIP_CORNER_ASYM = 9  # one-sided smile: + raises the subject's right corner (-1..1)
    LIP_STRETCH = 10  # lips pulled sideways and thin (0..1.2)
    BROW_INNER_RAISE = 11  # inner brow ends up (sadness, fear) (0..1.2)


NUM_SEMANTIC_DIMS = len(Expr)

# Plausible range of each semantic dimension; trajectories are clipped to it.
SEMANTIC_RANGE: dict[Expr, tuple[float, float]] = {
    Expr.JAW_OPEN: (0.0, 1.2),
    Expr.SMILE: (-1.0, 1.2),
    Expr.LIP_PUCKER: (0.0, 1.0),
    Expr.BROW_RAISE: (-0.6, 1.2),
    Expr.BROW_FROWN: (0.0, 1.2),
    Expr.BLINK: (0.0, 1.0),
    Expr.EYE_WIDE: (0.0, 1.2),
    Expr.NOSE_WRINKLE: (0.0, 1.2),
    Expr.UPPER_LIP_RAISE: (0.0, 1.2),
    Expr.LIP_CORNER_ASYM: (-1.0, 1.0),
    Expr.LIP_STRETCH: (0.0, 1.2),
    Expr.BROW_INNER_RAISE: (0.0, 1.2),
}

NOISE_DIM_STD = 0.04  # the 88 non-semantic dims: small, smooth, identity-independent noise
POSE_BIAS_NAMES = ("rx", "ry", "rz", "tx", "ty", "tz")  # axis-angle (rx > 0 nods down), metres


@dataclass(frozen=True)
class EmotionProfile:
    """One emotion as a distribution over expression codes, plus how it changes talking and pose.

    ``mean``/``std`` are 100-d (only the semantic dims are non-zero); ``talk_gain`` scales the jaw
    oscillation of speech; ``pose_bias`` (6,) nudges the head (sad looks down, surprise pulls back).
    """

    name: str
    mean: np.ndarray
    std: np.ndarray
    talk_gain: float
    pose_bias: np.ndarray = field(default_factory=lambda: np.zeros(POSE_DIM, np.float32))


def _profile(
    name: str,
    active: dict[Expr, float],
    talk_gain: float,
    pose_bias: dict[str, float] | None = None,
    spread: float = 0.16,
) -> EmotionProfile:
    mean = np.zeros(EXPRESSION_DIM, np.float32)
    std = np.zeros(EXPRESSION_DIM, np.float32)
    std[:NUM_SEMANTIC_DIMS] = 0.05  # every emotion wobbles a little on every semantic dim
    for dim, value in active.items():
        mean[dim] = value
        std[dim] = max(spread * abs(value), 0.06)
    bias = np.zeros(POSE_DIM, np.float32)
    for key, value in (pose_bias or {}).items():
        bias[POSE_BIAS_NAMES.index(key)] = value
    mean.setflags(write=False)
    std.setflags(write=False)
    bias.setflags(write=False)
    return EmotionProfile(name, mean, std, talk_gain, bias)


# Prototypes follow FACS descriptions of the basic emotions (Ekman): e.g. happiness = AU6+AU12,
# sadness = AU1+AU4+AU15, surprise = AU1+AU2+AU5+AU26, fear = AU1+AU2+AU4+AU5+AU20+AU26,
# anger = AU4+AU5+AU7+AU23, disgust = AU9+AU15+AU16, contempt = unilateral AU14. Pose biases are
# axis-angle radians (rx > 0 nods the face down, so sadness looks down) and metres.
EMOTION_PROFILES: dict[str, EmotionProfile] = {
    p.name: p
    for p in (
        _profile(
            "angry",
            {Expr.BROW_FROWN: 0.95, Expr.BROW_RAISE: -0.35, Expr.EYE_WIDE: 0.35, Expr.NOSE_WRINKLE: 0.2,
             Expr.UPPER_LIP_RAISE: 0.25, Expr.SMILE: -0.3, Expr.LIP_STRETCH: 0.25},
            talk_gain=1.25, pose_bias={"rx": 0.05},
        ),
        _profile(
            "contempt",
            {Expr.LIP_CORNER_ASYM: 0.85, Expr.SMILE: 0.15, Expr.BROW_FROWN: 0.15, Expr.BLINK: 0.25},
            talk_gain=0.8, pose_bias={"rx": -0.05, "rz": 0.06},
        ),
        _profile(
            "disgusted",
            {Expr.NOSE_WRINKLE: 0.95, Expr.UPPER_LIP_RAISE: 0.8, Expr.BROW_FROWN: 0.5, Expr.SMILE: -0.4,
             Expr.BLINK: 0.35},
            talk_gain=0.9, pose_bias={"ry": 0.05, "tz": -0.004},
        ),
        _profile(
            "fear",
            {Expr.BROW_RAISE: 0.6, Expr.BROW_INNER_RAISE: 0.75, Expr.BROW_FROWN: 0.35, Expr.EYE_WIDE: 0.9,
             Expr.LIP_STRETCH: 0.75, Expr.JAW_OPEN: 0.25},
            talk_gain=0.9, pose_bias={"rx": 0.03, "tz": -0.006},
        ),
        _profile(
            "happy",
            {Expr.SMILE: 1.0, Expr.BLINK: 0.3, Expr.BROW_RAISE: 0.15, Expr.JAW_OPEN: 0.12},
            talk_gain=1.1, pose_bias={"rx": -0.02},
        ),
        _profile("neutral", {}, talk_gain=1.0),
        _profile(
            "sad",
            {Expr.SMILE: -0.75, Expr.BROW_INNER_RAISE: 0.85, Expr.BROW_FROWN: 0.3, Expr.BLINK: 0.35,
             Expr.LIP_PUCKER: 0.25},
            talk_gain=0.65, pose_bias={"rx": 0.09},
        ),
        _profile(
            "surprised",
            {Expr.BROW_RAISE: 1.0, Expr.EYE_WIDE: 0.9, Expr.JAW_OPEN: 0.65, Expr.BROW_INNER_RAISE: 0.3},
            talk_gain=0.9, pose_bias={"rx": -0.05, "tz": -0.004},
        ),
    )
}
assert tuple(EMOTION_PROFILES) == EMOTIONS, "profiles must follow layout.EMOTIONS order"

# MEAD records three intensity levels per non-neutral emotion.
MEAD_INTENSITY_LEVELS = (0.55, 0.8, 1.05)


@dataclass(frozen=True)
class SpeakerStyle:
    """How one person expresses: per-dim gains and offsets, talking amplitude/rate, blink rate."""

    gain: np.ndarray  # (NUM_SEMANTIC_DIMS,) multiplies the emotion mean
    offset: np.ndarray  # (EXPRESSION_DIM,) resting-face offset
    talk_amp: float  # jaw opening at a full syllable
    talk_rate_hz: float  # syllables per second
    blink_per_s: float


def sample_speaker_style(rng: np.random.Generator) -> SpeakerStyle:
    """A random person. Offsets are small so that emotions stay recognisable across speakers."""
    gain = rng.uniform(0.75, 1.25, NUM_SEMANTIC_DIMS).astype(np.float32)
    offset = np.zeros(EXPRESSION_DIM, np.float32)
    offset[:NUM_SEMANTIC_DIMS] = rng.normal(0.0, 0.05, NUM_SEMANTIC_DIMS)
    offset[Expr.BLINK] = abs(offset[Expr.BLINK])
    offset[Expr.JAW_OPEN] = abs(offset[Expr.JAW_OPEN]) * 0.5
    offset[NUM_SEMANTIC_DIMS:] = rng.normal(0.0, 0.03, EXPRESSION_DIM - NUM_SEMANTIC_DIMS)
    return SpeakerStyle(
        gain=gain,
        offset=offset,
        talk_amp=float(rng.uniform(0.25, 0.45)),
        talk_rate_hz=float(rng.uniform(3.5, 5.0)),
        blink_per_s=float(rng.uniform(0.2, 0.45)),
    )


def smooth_noise(rng: np.random.Generator, frames: int, dims: int, sigma_frames: float) -> np.ndarray:
    """Gaussian noise low-passed along time, rescaled to unit marginal std: smooth but lively."""
    white = rng.standard_normal((frames, dims))
    if sigma_frames <= 0.5:
        return white.astype(np.float32)
    smooth = gaussian_filter1d(white, sigma_frames, axis=0, mode="reflect")
    radius = int(4 * sigma_frames + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_frames) ** 2)
    k /= k.sum()
    return (smooth / np.sqrt((k**2).sum())).astype(np.float32)


def _labels_to_ids(labels: list[str] | tuple[str, ...]) -> np.ndarray:
    try:
        return np.asarray([EMOTIONS.index(x) for x in labels], dtype=np.int64)
    except ValueError as exc:
        raise ConsistentAvatarError(f"unknown emotion label ({exc}); use one of {', '.join(EMOTIONS)}") from exc


def talking_motion(frames: int, fps: float, style: SpeakerStyle, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Speech as jaw and lip-rounding curves (T,) each: syllables at ~4 Hz, in phrases with pauses."""
    envelope = np.zeros(frames, np.float32)
    t = 0
    speaking = bool(rng.random() < 0.8)
    while t < frames:
        seconds = rng.uniform(1.0, 3.0) if speaking else rng.uniform(0.2, 0.8)
        n = max(1, int(round(seconds * fps)))
        if speaking:
            ramp = np.minimum(1.0, np.minimum(np.arange(1, n + 1), np.arange(n, 0, -1)) / max(1.0, 0.08 * fps))
            envelope[t : t + n] = ramp[: frames - t]
        t += n
        speaking = not speaking
    step = 2 * np.pi * style.talk_rate_hz / fps * rng.uniform(0.7, 1.3, frames)
    phase = np.cumsum(step) + rng.uniform(0, 2 * np.pi)
    cycle = (phase // (2 * np.pi)).astype(np.int64)
    cycle -= cycle.min()
    n_cycles = int(cycle.max()) + 1
    syllable_gain = rng.uniform(0.35, 1.2, n_cycles)
    rounded = (rng.random(n_cycles) < 0.3).astype(np.float32)
    open_curve = 0.5 - 0.5 * np.cos(phase)
    jaw = style.talk_amp * envelope * syllable_gain[cycle] * open_curve
    pucker = 0.35 * envelope * rounded[cycle] * open_curve
    return jaw.astype(np.float32), pucker.astype(np.float32)


def blink_events(frames: int, fps: float, rate_per_s: float, rng: np.random.Generator) -> np.ndarray:
    """Eyelid closure (T,) in 0..1 from Poisson blinks lasting ~0.2 s (close fast, open slower)."""
    out = np.zeros(frames, np.float32)
    t = rng.exponential(1.0 / rate_per_s) * fps * 0.5
    duration = max(3.0, 0.2 * fps)
    while t < frames:
        start = int(t)
        idx = np.arange(start, min(frames, start + int(np.ceil(duration)) + 1))
        u = (idx - t) / duration
        shape = np.where(u < 0.35, u / 0.35, np.clip(1 - (u - 0.35) / 0.65, 0, 1))
        out[idx] = np.maximum(out[idx], shape.astype(np.float32))
        t += max(duration + 1, rng.exponential(1.0 / rate_per_s) * fps)
    return out


def expression_trajectory(
    labels: list[str] | tuple[str, ...],
    fps: float,
    style: SpeakerStyle,
    rng: np.random.Generator,
    intensity: np.ndarray | None = None,
) -> np.ndarray:
    """Expression codes (T, 100) float32 for a per-frame emotion label sequence.

    Per frame: the emotion's mean scaled by ``intensity`` (T,) and the speaker's gains, blended
    smoothly across label changes, plus smooth within-emotion variation (the profile's std), talking
    (jaw + lip rounding scaled by the emotion's talk gain), blinks, the speaker's resting offset and
    small noise on the non-semantic dims; clipped to :data:`SEMANTIC_RANGE`.
    """
    ids = _labels_to_ids(labels)
    frames = len(ids)
    if frames == 0:
        raise ConsistentAvatarError("an expression trajectory needs at least one frame")
    if intensity is None:
        intensity = np.ones(frames, np.float32)
    means = np.stack([EMOTION_PROFILES[e].mean for e in EMOTIONS])[ids]  # (T,100)
    stds = np.stack([EMOTION_PROFILES[e].std for e in EMOTIONS])[ids]
    talk_gain = np.asarray([EMOTION_PROFILES[e].talk_gain for e in EMOTIONS], np.float32)[ids]
    target = means * intensity[:, None].astype(np.float32)
    target[:, :NUM_SEMANTIC_DIMS] *= style.gain[None, :]
    # Onsets/offsets of expressions take ~0.15 s.
    sigma_t = max(0.6, 0.06 * fps)
    target = gaussian_filter1d(target, sigma_t, axis=0, mode="nearest")
    stds = gaussian_filter1d(stds, sigma_t, axis=0, mode="nearest")
    talk_gain = gaussian_filter1d(talk_gain, sigma_t, mode="nearest")

    expr = target + stds * smooth_noise(rng, frames, EXPRESSION_DIM, 0.3 * fps)
    expr += style.offset[None, :]
    expr[:, NUM_SEMANTIC_DIMS:] += NOISE_DIM_STD * smooth_noise(rng, frames, EXPRESSION_DIM - NUM_SEMANTIC_DIMS, 0.15 * fps)

    jaw, pucker = talking_motion(frames, fps, style, rng)
    expr[:, Expr.JAW_OPEN] += talk_gain * jaw
    expr[:, Expr.LIP_PUCKER] += talk_gain * pucker
    blink = blink_events(frames, fps, style.blink_per_s, rng)
    expr[:, Expr.BLINK] = np.maximum(expr[:, Expr.BLINK], blink)
    for dim, (lo, hi) in SEMANTIC_RANGE.items():
        np.clip(expr[:, dim], lo, hi, out=expr[:, dim])
    return expr.astype(np.float32)


# Seed-domain tags keep synthetic MEAD speakers disjoint from actors generated with the same seed.
MEAD_SEED_TAG = 0x4D454144  # "MEAD"


def sample_mead_expressions(
    num_speakers: int = 8,
    clips_per_emotion: int = 4,
    frames_per_clip: int = 40,
    seed: int = 1234,
    fps: float = 25.0,
) -> tuple[np.ndarray, list[str], list[str]]:
    """A synthetic MEAD: labelled expression vectors from speakers who are not any actor.

    Returns ``(expressions (N,100) float32, labels, sources)`` with one row per frame,
    N = num_speakers * 8 * clips_per_emotion * frames_per_clip. Each clip holds one emotion at one
    of MEAD's three intensity levels (neutral: level 1 only) while the speaker talks;
    ``sources[i]`` names the clip, e.g. ``"synthetic-mead/spk03/happy/clip01"``.
    """
    for name, value in (("num_speakers", num_speakers), ("clips_per_emotion", clips_per_emotion),
                        ("frames_per_clip", frames_per_clip)):
        if int(value) != value or value < 1:
            raise ConsistentAvatarError(f"sample_mead_expressions: {name} must be a positive integer, got {value!r}")
    if fps <= 0:
        raise ConsistentAvatarError(f"sample_mead_expressions: fps must be > 0, got {fps!r}")
    expressions: list[np.ndarray] = []
    labels: list[str] = []
    sources: list[str] = []
    for spk in range(num_speakers):
        rng = np.random.default_rng(np.random.SeedSequence([seed, MEAD_SEED_TAG, spk]))
        style = sample_speaker_style(rng)
        for emotion in EMOTIONS:
            for clip in range(clips_per_emotion):
                level = 0 if emotion == "neutral" else int(rng.integers(0, len(MEAD_INTENSITY_LEVELS)))
                scale = MEAD_INTENSITY_LEVELS[level] * rng.uniform(0.9, 1.1)
                clip_labels = [emotion] * frames_per_clip
                expr = expression_trajectory(clip_labels, fps, style, rng, np.full(frames_per_clip, scale, np.float32))
                expressions.append(expr)
                labels.extend(clip_labels)
                sources.extend([f"synthetic-mead/spk{spk:02d}/{emotion}/clip{clip + 1:02d}"] * frames_per_clip)
    return np.concatenate(expressions).astype(np.float32), labels, sources


def emotion_prototypes() -> np.ndarray:
    """(8, 100) float32 profile means in :data:`EMOTIONS` order (neutral is all zeros)."""
    return np.stack([EMOTION_PROFILES[e].mean for e in EMOTIONS]).astype(np.float32)
