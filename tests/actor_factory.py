"""Tiny actors on disk, in both layouts of ``consistent_avatar.data.layout``, with their true contents.

Images carry structure (smooth gradients, a moving block, per-frame offsets) so that a wrong frame,
a swapped channel or a transposed axis shows up; tracking values are random floats written with
np.savetxt (which round-trips float32 exactly).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from consistent_avatar.data import layout


@dataclass
class ActorTruth:
    """What an actor folder holds, frame i = i-th frame in the layout's order."""

    root: Path
    real: np.ndarray  # (K, H, W, 3) uint8
    mask: np.ndarray  # (K, H, W) uint8
    coarse: np.ndarray  # (K, H, W, 3) uint8
    normal: np.ndarray  # (K, H, W, 3) uint8
    expression: np.ndarray  # (K, 100) float32
    pose: np.ndarray  # (K, 6) float32
    ids: list[str] = field(default_factory=list)  # INSTA frame ids in transforms.json order


def _smooth_frames(n: int, h: int, w: int, seed: int, phase: float) -> np.ndarray:
    """(n, h, w, 3) uint8: low-frequency colour waves that move per frame, plus a bright block."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    rng = np.random.default_rng(seed)
    shifts = rng.uniform(0, 2 * np.pi, size=3)
    for i in range(n):
        t = phase + 0.7 * i
        r = 128 + 90 * np.sin(2 * np.pi * xx / w + t + shifts[0])
        g = 128 + 90 * np.cos(2 * np.pi * yy / h - t + shifts[1])
        b = 40 + 3.0 * i + 150 * (xx + yy) / (w + h)
        img = np.stack([r, g, b], axis=-1)
        y0, x0 = (2 * i) % max(1, h // 2), (3 * i) % max(1, w // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = (250, 250 - 10 * i % 200, 20)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _masks(n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) uint8 binary ellipses that grow with the frame index."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        ry, rx = h * (0.25 + 0.02 * i), w * (0.3 + 0.01 * i)
        out[i][((yy - h / 2) / ry) ** 2 + ((xx - w / 2) / rx) ** 2 <= 1] = 255
    return out


def actor_contents(frames: int, h: int, w: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "real": _smooth_frames(frames, h, w, seed, 0.0),
        "mask": _masks(frames, h, w),
        "coarse": _smooth_frames(frames, h, w, seed + 1, 1.3),
        "normal": _smooth_frames(frames, h, w, seed + 2, 2.1),
        "expression": rng.standard_normal((frames, layout.EXPRESSION_DIM)).astype(np.float32),
        "pose": (rng.standard_normal((frames, layout.POSE_DIM)) * 0.2).astype(np.float32),
    }


def write_png(path: Path, img: np.ndarray) -> None:
    """Grey (H,W), RGB (H,W,3) or RGBA (H,W,4) uint8 to PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    assert cv2.imwrite(str(path), img), path


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def make_insta_actor(
    parent: Path,
    name: str = "actor",
    frames: int = 5,
    h: int = 24,
    w: int = 32,
    *,
    order: list[int] | None = None,
    mask_mode: str = "alpha",
    real_grey: bool = False,
    stage1_rgba: bool = False,
    normal_grey: bool = False,
    seed: int = 0,
) -> ActorTruth:
    """An INSTA-layout actor. ``order``: file numbers in the order transforms.json lists them.

    ``mask_mode``: "alpha" (RGBA frames) or "folder" (RGB frames + masks/<id>.png).
    ``real_grey``/``normal_grey`` write grey PNGs (truth becomes the grey value replicated);
    ``stage1_rgba`` adds a random alpha channel to the stage-1 RGB renders (to be dropped).
    """
    root = parent / name
    c = actor_contents(frames, h, w, seed)
    if real_grey:
        c["real"] = np.repeat(np.stack([_grey(x) for x in c["real"]])[..., None], 3, axis=3)
    if normal_grey:
        c["normal"] = np.repeat(np.stack([_grey(x) for x in c["normal"]])[..., None], 3, axis=3)
    order = list(range(frames)) if order is None else order
    ids = [f"{j:05d}" for j in range(frames)]
    rng = np.random.default_rng(seed + 7)
    for j, fid in enumerate(ids):
        real = c["real"][j][..., 0] if real_grey else c["real"][j]
        if mask_mode == "alpha":
            write_png(root / layout.IMAGES_DIR / f"{fid}.png", np.dstack([c["real"][j], c["mask"][j]]))
        elif mask_mode == "folder":
            write_png(root / layout.IMAGES_DIR / f"{fid}.png", real)
            write_png(root / layout.MASKS_DIR / f"{fid}.png", c["mask"][j])
        else:
            raise ValueError(mask_mode)
        coarse = c["coarse"][j]
        if stage1_rgba:
            coarse = np.dstack([coarse, rng.integers(0, 256, (h, w), dtype=np.uint8)])
        write_png(root / layout.STAGE1_RGB_DIR / f"{fid}.png", coarse)
        write_png(
            root / layout.STAGE1_NORMAL_DIR / f"{fid}.png",
            c["normal"][j][..., 0] if normal_grey else c["normal"][j],
        )
        for d, key in ((layout.EXPRESSION_DIR, "expression"), (layout.POSE_DIR, "pose")):
            (root / d).mkdir(parents=True, exist_ok=True)
            np.savetxt(root / d / f"{fid}.txt", c[key][j])
    transforms = {
        "w": w,
        "h": h,
        "fl_x": 40.0,
        "fl_y": 40.0,
        "cx": w / 2,
        "cy": h / 2,
        "camera_angle_x": 0.7,
        "camera_angle_y": 0.6,
        "frames": [
            {
                "file_path": f"{layout.IMAGES_DIR}/{ids[j]}.png",
                "transform_matrix": np.eye(4).tolist(),
                "exp_path": f"{layout.EXPRESSION_DIR}/{ids[j]}.txt",
            }
            for j in order
        ],
    }
    (root / layout.TRANSFORMS_FILE).write_text(json.dumps(transforms, indent=1))
    return ActorTruth(root=root, ids=[ids[j] for j in order], **{k: v[order] for k, v in c.items()})


def write_video(path: Path, frames: np.ndarray, fps: float = 25.0) -> None:
    """(N, H, W, 3) RGB or (N, H, W) grey uint8 frames to an mp4v .mp4 (lossy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h), True)
    assert writer.isOpened(), path
    for f in frames:
        writer.write(
            cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_RGB2BGR)
        )
    writer.release()


def make_video_actor(
    parent: Path,
    name: str = "vactor",
    frames: int = 8,
    h: int = 48,
    w: int = 64,
    *,
    mask: bool = True,
    stage1: str = "video",
    png_name: Callable[[int], str] = lambda i: f"{i:05d}.png",
    tracking: str = "npz",
    seed: int = 0,
) -> ActorTruth:
    """A video-layout actor: mp4v videos (w must not be one of decord 0.6's bad widths 16/24/48/72).

    ``stage1``: "video" (stage1/rgb.mp4, stage1/normal.mp4) or "png" (folders named by ``png_name``).
    ``tracking``: "npz" or "json".
    """
    root = parent / name
    c = actor_contents(frames, h, w, seed)
    write_video(root / layout.VIDEO_FILE, c["real"])
    if mask:
        write_video(root / layout.MASK_VIDEO_FILE, c["mask"])
    else:
        c["mask"] = np.full_like(c["mask"], 255)
    if stage1 == "video":
        write_video(root / layout.STAGE1_RGB_VIDEO, c["coarse"])
        write_video(root / layout.STAGE1_NORMAL_VIDEO, c["normal"])
    elif stage1 == "png":
        for i in range(frames):
            write_png(root / layout.STAGE1_RGB_DIR / png_name(i), c["coarse"][i])
            write_png(root / layout.STAGE1_NORMAL_DIR / png_name(i), c["normal"][i])
    else:
        raise ValueError(stage1)
    if tracking == "npz":
        np.savez(root / layout.TRACKING_NPZ, expression=c["expression"], pose=c["pose"])
    elif tracking == "json":
        (root / layout.TRACKING_JSON).write_text(
            json.dumps(
                {
                    "expression": c["expression"].astype(float).tolist(),
                    "pose": c["pose"].astype(float).tolist(),
                }
            )
        )
    else:
        raise ValueError(tracking)
    return ActorTruth(root=root, **c)


def synthetic_shards(src: Path, out: Path, actors: int, frames: int, workers: int) -> Path:
    """``actors`` synthetic actors of ``frames`` frames at 64² (the tiny preset's resolution) written
    to ``src`` and prepared into ``out`` by the real CLI (``cavatar synth`` then ``cavatar prepare``)."""
    from consistent_avatar.cli import main

    assert main(["synth", "--out", str(src), "--actors", str(actors), "--frames", str(frames), "--res", "64"]) == 0
    assert main(["prepare", "--sources", str(src), "--out", str(out), "--workers", str(workers)]) == 0
    return out
