"""Writes synthetic actors to disk in the INSTA layout (and converts them to the video layout).

Why: every job of the platform (prepare, train, serve, render, evaluate) needs actors, and no real
talking-head data is reachable; these actors follow :mod:`consistent_avatar.data.layout` exactly, so
ingest cannot tell them from an INSTA output folder, and ``synthetic.json`` carries the ground
truth (emotion per frame, true and stage-1 codes, identity, degradation) for measuring later stages.
Each actor appears atomically (assembled in a hidden staging folder, then renamed) and an existing
complete actor generated with the same settings is kept, so re-running is cheap and safe.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from ..data import layout
from ..errors import ActorDataError, ConsistentAvatarError
from ..io import publish_dir, read_json, staging_dir
from .head import FrameRenderer, Stage1Degradation, camera_intrinsics, camera_to_world, sample_identity
from .motion import actor_motion, frame_rng

log = logging.getLogger(__name__)

GENERATOR = "consistent_avatar.synthetic"
GENERATOR_VERSION = "1.0"
PNG_COMPRESSION = 1  # fast; PNG stays lossless
TXT_FORMAT = "%.9g"  # round-trips float32 exactly


class SynthConfig(BaseModel):
    """What to generate. Every actor ``i`` depends only on (seed, i, frames, res, degradation, fps),
    so raising ``actors`` later only adds actors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int = Field(3, ge=1, le=10_000, description="number of actors to write, 1..10000")
    frames: int = Field(120, ge=1, le=100_000, description="frames per actor, 1..100000")
    res: int = Field(128, ge=16, le=512, description="square image resolution N (N×N pixels), 16..512")
    seed: int = Field(0, ge=0, lt=2**63, description="non-negative integer seed")
    degradation: float = Field(1.0, ge=0.0, le=4.0, allow_inf_nan=False,
                               description="stage-1 degradation strength, 0 (coarse = real) .. 4, default 1")
    fps: float = Field(25.0, gt=0.0, le=240.0, allow_inf_nan=False, description="frame rate, > 0 and <= 240")

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConsistentAvatarError(_explain(exc)) from None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> "SynthConfig":
        """Build from a dict (e.g. a JSON file), with the same error messages as the constructor."""
        if not isinstance(obj, dict):
            raise ConsistentAvatarError(f"synthetic config must be a mapping of settings, got {type(obj).__name__}")
        return cls(**obj)

    def per_actor(self) -> dict[str, Any]:
        """The settings one actor's content depends on (everything but the actor count)."""
        d = self.model_dump()
        d.pop("actors")
        return d


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err.get("loc", ())) or "config"
        field = SynthConfig.model_fields.get(name)
        hint = f"; set {name} to {field.description}" if field is not None and field.description else ""
        if err.get("type") == "extra_forbidden":
            hint = f"; remove it (known settings: {', '.join(SynthConfig.model_fields)})"
        parts.append(f"{name}={err.get('input')!r}: {err.get('msg')}{hint}")
    return "invalid synthetic config: " + " | ".join(parts)


def actor_name(index: int) -> str:
    return f"actor_{index:03d}"


def actor_emotion_schedule(config: SynthConfig, index: int) -> list[str]:
    """The true per-frame emotion labels of actor ``index`` (without rendering anything)."""
    motion = actor_motion(config.seed, index, config.frames, config.fps, Stage1Degradation.from_strength(config.degradation))
    return list(motion.labels)


def _is_complete(actor_dir: Path, config: SynthConfig, index: int) -> bool:
    truth_file = actor_dir / layout.SYNTHETIC_TRUTH_FILE
    if not truth_file.is_file() or not (actor_dir / layout.TRANSFORMS_FILE).is_file():
        return False
    try:
        truth = read_json(truth_file)
    except (OSError, json.JSONDecodeError):
        return False
    if (truth.get("generator") != GENERATOR or truth.get("version") != GENERATOR_VERSION
            or truth.get("actor_index") != index or truth.get("per_actor_config") != config.per_actor()):
        return False
    n = config.frames
    for folder in (layout.IMAGES_DIR, layout.EXPRESSION_DIR, layout.POSE_DIR, layout.STAGE1_RGB_DIR, layout.STAGE1_NORMAL_DIR):
        d = actor_dir / folder
        if not d.is_dir() or sum(1 for _ in d.iterdir()) != n:
            return False
    return True


def _write_png(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> None:
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if alpha is not None:
        img = np.dstack([img, alpha])
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]):
        raise ConsistentAvatarError(f"could not write {path}: check that the output folder is writable")


def synthesize_actor(out_dir: str | Path, config: SynthConfig, index: int, progress: bool = True) -> Path:
    """Write (or keep, if already complete) actor ``index`` under ``out_dir``; returns its folder."""
    out_dir = Path(out_dir)
    final = out_dir / actor_name(index)
    if _is_complete(final, config, index):
        log.info("kept %s (complete, same settings)", final)
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{final.name}.staging-*"):  # leftovers of a killed run of this actor
        shutil.rmtree(stale, ignore_errors=True)
    degradation = Stage1Degradation.from_strength(config.degradation)
    motion = actor_motion(config.seed, index, config.frames, config.fps, degradation)
    identity = sample_identity(motion.identity_seed)
    renderer = FrameRenderer(identity, config.res, degradation)

    staged = staging_dir(final)
    try:
        for folder in (layout.IMAGES_DIR, layout.EXPRESSION_DIR, layout.POSE_DIR, layout.STAGE1_RGB_DIR, layout.STAGE1_NORMAL_DIR):
            (staged / folder).mkdir(parents=True)
        frames_meta = []
        bar = tqdm(range(config.frames), desc=final.name, unit="frame", disable=not progress, leave=False)
        for i in bar:
            fid = f"{i:05d}"
            out = renderer.render(motion.expression[i], motion.pose[i], motion.coarse_expression[i],
                                  motion.coarse_pose[i], frame_rng(config.seed, index, i))
            _write_png(staged / layout.IMAGES_DIR / f"{fid}.png", out.rgb, out.mask)
            _write_png(staged / layout.STAGE1_RGB_DIR / f"{fid}.png", out.coarse_rgb)
            _write_png(staged / layout.STAGE1_NORMAL_DIR / f"{fid}.png", out.coarse_normal)
            np.savetxt(staged / layout.EXPRESSION_DIR / f"{fid}.txt", motion.expression[i], fmt=TXT_FORMAT)
            np.savetxt(staged / layout.POSE_DIR / f"{fid}.txt", motion.pose[i], fmt=TXT_FORMAT)
            frames_meta.append({
                "file_path": f"{layout.IMAGES_DIR}/{fid}.png",
                "transform_matrix": camera_to_world(),
                "exp_path": f"{layout.EXPRESSION_DIR}/{fid}.txt",
            })
        transforms = {**camera_intrinsics(config.res), "frames": frames_meta}
        (staged / layout.TRANSFORMS_FILE).write_text(json.dumps(transforms, indent=1) + "\n")
        truth = {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "seed": config.seed,
            "actor_index": index,
            "identity_seed": motion.identity_seed,
            "config": config.model_dump(),
            "per_actor_config": config.per_actor(),
            "fps": config.fps,
            "emotions": list(motion.labels),
            "emotion_intensity": [round(float(x), 4) for x in motion.intensity],
            "degradation": {**degradation.to_json(), "coarse_resolution": renderer.coarse_res},
            "identity": identity.to_json(),
            "stage1_codes": {
                "expression": np.round(motion.coarse_expression.astype(np.float64), 6).tolist(),
                "pose": np.round(motion.coarse_pose.astype(np.float64), 7).tolist(),
            },
            "conventions": {
                "pose": "axis-angle rotation (3, radians, head frame = camera frame at zero pose) then translation (3, metres)",
                "camera": "fixed, camera-to-world in transforms.json (OpenGL: x right, y up, looks along -z)",
                "normal_maps": "camera-space unit normals, RGB = (n + 1) / 2 * 255, background 0",
                "flame_files": "true codes the real frame was rendered with; stage1/* used stage1_codes",
            },
        }
        (staged / layout.SYNTHETIC_TRUTH_FILE).write_text(json.dumps(truth) + "\n")  # last: marks completeness
        publish_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("wrote %s (%d frames, %d²)", final, config.frames, config.res)
    return final


def _worker(args: tuple[str, dict[str, Any], int]) -> str:
    cv2.setNumThreads(1)
    out_dir, cfg, index = args
    return str(synthesize_actor(out_dir, SynthConfig(**cfg), index, progress=False))


def synthesize_actors(out_dir: str | Path, config: SynthConfig, workers: int = 1) -> list[Path]:
    """Write ``config.actors`` actors ``actor_000, actor_001, ...`` under ``out_dir`` (INSTA layout).

    ``workers`` > 1 renders actors in parallel processes (one actor per process at a time).
    Actors already complete with the same settings are kept as they are.
    """
    if not isinstance(config, SynthConfig):
        raise ConsistentAvatarError(f"config must be a SynthConfig, got {type(config).__name__}")
    if not isinstance(workers, int) or workers < 1:
        raise ConsistentAvatarError(f"workers must be a positive integer, got {workers!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConsistentAvatarError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(config.actors))
    todo = [i for i in indices if not _is_complete(out_dir / actor_name(i), config, i)]
    if len(todo) < len(indices):
        log.info("%d of %d actors already complete under %s", len(indices) - len(todo), len(indices), out_dir)
    if workers == 1 or len(todo) <= 1:
        for i in tqdm(todo, desc="actors", unit="actor", disable=len(todo) <= 1):
            synthesize_actor(out_dir, config, i)
    else:
        ctx = multiprocessing.get_context("spawn")
        jobs = [(str(out_dir), config.model_dump(), i) for i in todo]
        with ctx.Pool(min(workers, len(todo))) as pool:
            for _ in tqdm(pool.imap_unordered(_worker, jobs), total=len(jobs), desc="actors", unit="actor"):
                pass
    return [out_dir / actor_name(i) for i in indices]


# --------------------------------------------------------------------------------------------------
# video layout
# --------------------------------------------------------------------------------------------------


def _read_rgba(path: Path, actor: str, frame: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ActorDataError(actor, f"cannot read {path}", frame)
    return img


def _open_writer(path: Path, fps: float, size: int) -> cv2.VideoWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size), True)
    if not writer.isOpened():
        raise ConsistentAvatarError(f"OpenCV could not open an mp4v writer for {path} ({size}x{size} at {fps} fps)")
    return writer


def write_video_actor(src_actor_dir: str | Path, dst_dir: str | Path) -> Path:
    """Convert an INSTA-layout synthetic actor into the video layout (mp4v videos + tracking.npz).

    The videos are checked by decoding them with decord: the frame count must match. ``dst_dir``
    appears atomically; ``synthetic.json`` is copied along so the ground truth stays with the actor.
    """
    src, dst = Path(src_actor_dir), Path(dst_dir)
    actor = src.name
    transforms_file = src / layout.TRANSFORMS_FILE
    if not transforms_file.is_file():
        raise ActorDataError(actor, f"no {layout.TRANSFORMS_FILE} in {src}: not an INSTA-layout actor")
    frames = read_json(transforms_file).get("frames") or []
    if not frames:
        raise ActorDataError(actor, f"{transforms_file} lists no frames")
    truth_file = src / layout.SYNTHETIC_TRUTH_FILE
    fps = float(read_json(truth_file).get("fps", 25.0)) if truth_file.is_file() else 25.0
    ids = [Path(f["file_path"]).stem for f in frames]
    first = _read_rgba(src / frames[0]["file_path"], actor, 0)
    size = first.shape[0]
    if first.shape[0] != first.shape[1] or size % 2:
        raise ActorDataError(actor, f"the video layout needs square frames of even size, got {first.shape[1]}x{first.shape[0]}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_dir(dst)
    try:
        names = {"video": layout.VIDEO_FILE, "mask": layout.MASK_VIDEO_FILE,
                 "rgb": layout.STAGE1_RGB_VIDEO, "normal": layout.STAGE1_NORMAL_VIDEO}
        writers = {k: _open_writer(staged / v, fps, size) for k, v in names.items()}
        expression, pose = [], []
        try:
            for i, fid in enumerate(tqdm(ids, desc=f"{actor} -> video", unit="frame", leave=False)):
                img = _read_rgba(src / frames[i]["file_path"], actor, i)
                if img.ndim != 3 or img.shape[2] != 4:
                    raise ActorDataError(actor, f"{frames[i]['file_path']} is not RGBA (alpha = mask)", i)
                writers["video"].write(np.ascontiguousarray(img[..., :3]))
                writers["mask"].write(cv2.cvtColor(img[..., 3], cv2.COLOR_GRAY2BGR))
                for key, folder in (("rgb", layout.STAGE1_RGB_DIR), ("normal", layout.STAGE1_NORMAL_DIR)):
                    stage1 = _read_rgba(src / folder / f"{fid}.png", actor, i)
                    writers[key].write(np.ascontiguousarray(stage1[..., :3]))
                exp_path = src / frames[i].get("exp_path", f"{layout.EXPRESSION_DIR}/{fid}.txt")
                pose_path = src / frames[i].get("pose_path", f"{layout.POSE_DIR}/{fid}.txt")
                expression.append(np.loadtxt(exp_path, dtype=np.float32).reshape(-1))
                pose.append(np.loadtxt(pose_path, dtype=np.float32).reshape(-1))
        finally:
            for w in writers.values():
                w.release()
        np.savez(staged / layout.TRACKING_NPZ, expression=np.stack(expression), pose=np.stack(pose))
        if truth_file.is_file():
            shutil.copy2(truth_file, staged / layout.SYNTHETIC_TRUTH_FILE)
        _check_videos(staged, names.values(), len(ids), actor)
        publish_dir(staged, dst)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dst


def _check_videos(root: Path, names: Any, expected: int, actor: str) -> None:
    from decord import VideoReader, cpu

    for name in names:
        n = len(VideoReader(str(root / name), ctx=cpu(0)))
        if n != expected:
            raise ActorDataError(actor, f"{name}: decord reads {n} frames back, {expected} were written")

