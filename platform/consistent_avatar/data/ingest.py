"""Reading actor sources: the two on-disk layouts of :mod:`.layout` behind one interface.

Why one interface: `cavatar prepare` (Ray Data) hands an :class:`ActorSource` to many workers, each
decoding only its chunk of frames, so a source holds paths and small metadata only (it pickles) and
opens decoders where it is used. Why the strict checks: a wrong frame count or a NaN in a tracking
file found hours into training is expensive; :meth:`ActorSource.validate` finds them up front by
reading file headers and the small tracking files, and every problem is an :class:`ActorDataError`
naming the actor, the frame and the file to fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image

from ..errors import ActorDataError
from . import layout
from .layout import EXPRESSION_DIM, POSE_DIM
from .video import VideoFrames

log = logging.getLogger(__name__)

EXPRESSION_WHAT = f"{EXPRESSION_DIM} FLAME expression coefficients"
POSE_WHAT = f"{POSE_DIM} pose values (axis-angle rotation 3, translation 3)"


@dataclass(frozen=True)
class Tracking:
    """Per-frame FLAME codes of one actor, row i = frame i."""

    expression: np.ndarray  # (K, 100) float32
    pose: np.ndarray  # (K, 6) float32

    @property
    def num_frames(self) -> int:
        return int(self.expression.shape[0])


@dataclass
class FrameBatch:
    """Decoded frames at the source resolution (resizing is the caller's business)."""

    indices: np.ndarray  # (N,) int64 frame indices
    real_rgb: np.ndarray  # (N, H, W, 3) uint8
    mask: np.ndarray  # (N, H, W) uint8, 255 = foreground
    coarse_rgb: np.ndarray  # (N, H, W, 3) uint8
    coarse_normal: np.ndarray  # (N, H, W, 3) uint8


# --------------------------------------------------------------------------------------------------
# PNG: headers for validation, pixels for reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PngInfo:
    width: int
    height: int
    has_alpha: bool  # decoding yields 4 channels (alpha, or RGB/palette with a tRNS chunk)


def png_info(actor: str, path: Path, frame: int | None) -> PngInfo:
    """Size and alpha of an image from its header only (no pixels are decoded)."""
    try:
        with Image.open(path) as im:
            mode, info, (w, h) = im.mode, dict(im.info), im.size
    except FileNotFoundError:
        raise ActorDataError(actor, f"{path} is missing", frame) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, OSError, ...
        raise ActorDataError(
            actor,
            f"{path} is not a readable image ({exc.__class__.__name__}: {exc}): re-export it as PNG",
            frame,
        ) from None
    # Same rule as OpenCV's PNG decoder with IMREAD_UNCHANGED, which read_png uses.
    alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("RGB", "P") and "transparency" in info)
    return PngInfo(int(w), int(h), alpha)


def read_png(actor: str, path: Path, frame: int | None) -> np.ndarray:
    """Decode an image to uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; 16-bit is scaled down."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ActorDataError(actor, f"{path} is missing", frame) from None
    except OSError as exc:
        raise ActorDataError(actor, f"{path} cannot be read ({exc})", frame) from None
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ActorDataError(
            actor,
            f"{path} cannot be decoded (corrupt or truncated image): re-export this frame as PNG",
            frame,
        )
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ActorDataError(actor, f"{path} has {img.dtype} pixels: save it as 8- or 16-bit PNG", frame)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    elif img.ndim != 2:
        raise ActorDataError(actor, f"{path} has an unsupported pixel layout {img.shape}", frame)
    return img


def as_rgb(img: np.ndarray) -> np.ndarray:
    """Grey -> replicated RGB; RGBA -> its RGB (alpha dropped)."""
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def as_grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)


def _natural_key(name: str) -> tuple[Any, ...]:
    """``frame_2.png`` before ``frame_10.png``: digit runs compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class PngFrames:
    """A folder of PNGs as a frame sequence (frame i = i-th file in natural name order)."""

    def __init__(self, actor: str, folder: Path, label: str) -> None:
        self.actor = actor
        self.folder = Path(folder)
        self.label = label
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        if self._files is None:
            self._files = sorted((p.name for p in self.folder.glob("*.png") if p.is_file()), key=_natural_key)
        return self._files

    def __len__(self) -> int:
        return len(self.files())

    def path(self, i: int) -> Path:
        return self.folder / self.files()[i]

    def size(self) -> tuple[int, int]:
        if not self.files():
            raise ActorDataError(self.actor, f"{self.label} ({self.folder}) holds no PNG files")
        info = png_info(self.actor, self.path(0), 0)
        return info.height, info.width

    def check_sizes(self, hw: tuple[int, int], reference: str) -> None:
        for i in range(len(self)):
            info = png_info(self.actor, self.path(i), i)
            _check_size(self.actor, self.path(i), (info.height, info.width), hw, reference, i)

    def read(self, indices: np.ndarray) -> np.ndarray:
        files = self.files()
        bad = [int(i) for i in indices if not 0 <= i < len(files)]
        if bad:
            raise ActorDataError(
                self.actor, f"{self.label} holds {len(files)} PNGs; frame {bad[0]} has none", bad[0]
            )
        imgs = [as_rgb(read_png(self.actor, self.folder / files[i], int(i))) for i in indices]
        if not imgs:
            h, w = self.size()
            return np.zeros((0, h, w, 3), np.uint8)
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            ref = imgs[0].shape
            k = next(k for k, im in enumerate(imgs) if im.shape != ref)
            _check_size(
                self.actor,
                self.folder / files[indices[k]],
                imgs[k].shape[:2],
                ref[:2],
                f"{self.folder / files[indices[0]]}",
                int(indices[k]),
            )
        return np.stack(imgs)


def _check_size(
    actor: str,
    path: Path | str,
    hw: tuple[int, ...],
    ref_hw: tuple[int, ...],
    reference: str,
    frame: int | None,
) -> None:
    if tuple(hw) != tuple(ref_hw):
        raise ActorDataError(
            actor,
            f"image size mismatch: {path} is {hw[1]}x{hw[0]} px (w x h) but {reference} is "
            f"{ref_hw[1]}x{ref_hw[0]} px: every frame of every part must have the real frames' size",
            frame,
        )


# --------------------------------------------------------------------------------------------------
# Tracking vectors
# --------------------------------------------------------------------------------------------------


def _read_vector(actor: str, path: Path, dim: int, what: str, frame: int) -> np.ndarray:
    """One np.savetxt-style text file of ``dim`` numbers (one per line; '#' comments allowed)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ActorDataError(
            actor, f"{path} is missing: write the frame's {what}, one per line (np.savetxt)", frame
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ActorDataError(actor, f"{path} cannot be read as text ({exc})", frame) from None
    tokens = [
        t
        for line in text.splitlines()
        if not line.lstrip().startswith("#")
        for t in line.replace(",", " ").split()
    ]
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise ActorDataError(
            actor, f"{path} holds {bad!r}, which is not a number: it must hold {what}", frame
        ) from None
    if values.size != dim:
        raise ActorDataError(actor, f"{path} holds {values.size} values, expected {dim} ({what})", frame)
    _check_finite(actor, values[None], str(path), frame)
    return values.astype(np.float32)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _check_finite(actor: str, rows: np.ndarray, label: str, first_frame: int) -> None:
    """Rows must be finite before and after the float32 cast (1e39 overflows to inf)."""
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(rows) | ~np.isfinite(rows.astype(np.float32))
    if bad.any():
        r, c = (int(x[0]) for x in np.nonzero(bad))
        kind = "NaN" if np.isnan(rows[r, c]) else "inf (or a value beyond float32)"
        raise ActorDataError(
            actor,
            f"{label} holds {kind} at value {c} of frame {first_frame + r}: fix or re-run the tracking",
            first_frame + r,
        )


def _check_tracking_arrays(actor: str, label: str, expression: Any, pose: Any) -> Tracking:
    arrays = {}
    for key, value, dim, what in (
        ("expression", expression, EXPRESSION_DIM, EXPRESSION_WHAT),
        ("pose", pose, POSE_DIM, POSE_WHAT),
    ):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ActorDataError(
                actor, f"{label} {key!r} is not a numeric array: it must be (K, {dim}) floats"
            ) from None
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise ActorDataError(
                actor,
                f"{label} {key!r} has shape {arr.shape}, expected (K, {dim}): one row of {what} per frame",
            )
        arrays[key] = arr
    ke, kp = arrays["expression"].shape[0], arrays["pose"].shape[0]
    if ke != kp:
        raise ActorDataError(
            actor,
            f"{label} has {ke} expression rows but {kp} pose rows: both need one row per frame",
            min(ke, kp),
        )
    for key, arr in arrays.items():
        _check_finite(actor, arr, f"{label} {key!r}", 0)
    return Tracking(arrays["expression"].astype(np.float32), arrays["pose"].astype(np.float32))


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------


class ActorSource(ABC):
    """One actor's frames, tracking and stage-1 renders on disk. Picklable: paths and metadata only."""

    kind: str = ""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = Path(root)
        self._shape: tuple[int, int, int] | None = None  # (num_frames, height, width), probed once

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, root={str(self.root)!r})"

    def _probed(self) -> tuple[int, int, int]:
        if self._shape is None:
            self._shape = self._probe()
        return self._shape

    @property
    def num_frames(self) -> int:
        return self._probed()[0]

    @property
    def height(self) -> int:
        return self._probed()[1]

    @property
    def width(self) -> int:
        return self._probed()[2]

    @abstractmethod
    def _probe(self) -> tuple[int, int, int]:
        """(num_frames, height, width) from the cheapest source (an index file, one header)."""

    @abstractmethod
    def tracking(self) -> Tracking:
        """Validated expression (K, 100) and pose (K, 6), float32, K = num_frames."""

    @abstractmethod
    def read_frames(self, indices: Sequence[int] | np.ndarray) -> FrameBatch:
        """Decode only frames ``indices`` (in the given order) at the source resolution."""

    @abstractmethod
    def validate(self) -> None:
        """Cheap structural checks (headers, counts, tracking); raises ActorDataError on the first problem."""

    @abstractmethod
    def input_files(self) -> list[Path]:
        """Every file this source reads (or would read if present)."""

    def fingerprint(self) -> str:
        """Hash of (relative path, size, mtime_ns) of every input file: changes when any input changes."""
        h = hashlib.sha256(f"{self.kind}\n".encode())
        for path in sorted(set(self.input_files())):
            rel = os.path.relpath(path, self.root) if path.is_absolute() else str(path)
            try:
                st = path.stat()
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                h.update(f"{rel}\0-\n".encode())
        return h.hexdigest()[:16]

    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(indices)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ActorDataError(
                self.name, f"frame indices must be a 1-D sequence of integers, got {arr.dtype} {arr.shape}"
            )
        arr = arr.astype(np.int64)
        n = self.num_frames
        bad = arr[(arr < 0) | (arr >= n)]
        if bad.size:
            raise ActorDataError(
                self.name,
                f"frame {int(bad[0])} does not exist: the actor has {n} frames (0..{n - 1})",
                int(bad[0]),
            )
        return arr


# --------------------------------------------------------------------------------------------------
# INSTA layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstaFrame:
    """Where one frame's files are, relative to the actor folder (or absolute if given so)."""

    id: str
    image: str
    expression: str
    pose: str
    stage1_rgb: str
    stage1_normal: str

    @property
    def mask(self) -> str:
        return f"{layout.MASKS_DIR}/{self.id}.png"


# (attribute of InstaFrame, what it is, how to fix a missing one)
_INSTA_PARTS: tuple[tuple[str, str, str], ...] = (
    ("image", "real frames", "restore the frame or drop it from transforms.json"),
    ("expression", "expression files", f"write {EXPRESSION_WHAT} per frame (np.savetxt)"),
    ("pose", "pose files", f"write {POSE_WHAT} per frame (np.savetxt)"),
    ("stage1_rgb", "stage-1 RGB renders", "render stage 1 for every listed frame"),
    ("stage1_normal", "stage-1 normal maps", "render stage 1 normals for every listed frame"),
)


class InstaActorSource(ActorSource):
    """INSTA output folder: transforms.json + images/ (RGBA) + flame/ + stage1/ (see layout.py)."""

    kind = "insta"

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self._frames: tuple[InstaFrame, ...] | None = None

    @property
    def transforms_path(self) -> Path:
        return self.root / layout.TRANSFORMS_FILE

    def frames(self) -> tuple[InstaFrame, ...]:
        """The frames in transforms.json order, with per-frame overrides applied."""
        if self._frames is None:
            self._frames = self._parse_transforms()
        return self._frames

    def _parse_transforms(self) -> tuple[InstaFrame, ...]:
        path = self.transforms_path
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ActorDataError(self.name, f"{path} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ActorDataError(
                self.name, f"{path} is not valid JSON ({exc}): fix or regenerate it"
            ) from None
        entries = doc.get("frames") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ActorDataError(
                self.name, f'{path} has no "frames" list (or it is empty): list one entry per frame'
            )
        frames = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ActorDataError(self.name, f"{path}: frames[{i}] is not an object", i)

            def key(k: str, default: str | None, entry: dict[str, Any] = entry, i: int = i) -> str:
                value = entry.get(k, default)
                if not isinstance(value, str) or not value:
                    want = "is missing" if k not in entry else f"is {value!r}, not a path"
                    raise ActorDataError(
                        self.name, f'{path}: frames[{i}] "{k}" {want}: give a path relative to {self.root}', i
                    )
                return value

            image = key("file_path", None)
            if not Path(image).suffix:  # NeRF convention: file_path may omit the extension
                image += ".png"
            fid = Path(image).stem
            frames.append(
                InstaFrame(
                    id=fid,
                    image=image,
                    expression=key("exp_path", f"{layout.EXPRESSION_DIR}/{fid}.txt"),
                    pose=key("pose_path", f"{layout.POSE_DIR}/{fid}.txt"),
                    stage1_rgb=key("stage1_rgb_path", f"{layout.STAGE1_RGB_DIR}/{fid}.png"),
                    stage1_normal=key("stage1_normal_path", f"{layout.STAGE1_NORMAL_DIR}/{fid}.png"),
                )
            )
        return tuple(frames)

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def _probe(self) -> tuple[int, int, int]:
        frames = self.frames()
        info = png_info(self.name, self._path(frames[0].image), 0)
        return len(frames), info.height, info.width

    def input_files(self) -> list[Path]:
        files = [self.transforms_path]
        for f in self.frames():
            files += [
                self._path(p) for p in (f.image, f.mask, f.expression, f.pose, f.stage1_rgb, f.stage1_normal)
            ]
        return files

    def tracking(self) -> Tracking:
        frames = self.frames()
        exp = np.empty((len(frames), EXPRESSION_DIM), np.float32)
        pose = np.empty((len(frames), POSE_DIM), np.float32)
        for i, f in enumerate(frames):
            exp[i] = _read_vector(self.name, self._path(f.expression), EXPRESSION_DIM, EXPRESSION_WHAT, i)
            pose[i] = _read_vector(self.name, self._path(f.pose), POSE_DIM, POSE_WHAT, i)
        return Tracking(exp, pose)

    def _missing_mask(self, f: InstaFrame, i: int) -> ActorDataError:
        return ActorDataError(
            self.name,
            f"{self._path(f.image)} has no alpha channel and {self._path(f.mask)} does not exist: "
            f"save the frame as RGBA with the foreground mask as alpha, or write {f.mask} "
            "(8-bit, 255 = foreground)",
            i,
        )

    def validate(self) -> None:
        frames = self.frames()
        n = len(frames)
        for attr, what, fix in _INSTA_PARTS:
            missing = [i for i, f in enumerate(frames) if not self._path(getattr(f, attr)).is_file()]
            if missing:
                first = missing[0]
                raise ActorDataError(
                    self.name,
                    f"frame counts disagree: transforms.json lists {n} frames but only "
                    f"{n - len(missing)} {what} exist; "
                    f"first missing: {self._path(getattr(frames[first], attr))}: {fix}",
                    first,
                )
        ref_path = self._path(frames[0].image)
        h, w = self.height, self.width
        ref = f"{ref_path} (frame 0)"
        for i, f in enumerate(frames):
            info = png_info(self.name, self._path(f.image), i)
            _check_size(self.name, self._path(f.image), (info.height, info.width), (h, w), ref, i)
            if not info.has_alpha:
                if not self._path(f.mask).is_file():
                    raise self._missing_mask(f, i)
                m = png_info(self.name, self._path(f.mask), i)
                _check_size(self.name, self._path(f.mask), (m.height, m.width), (h, w), ref, i)
            for rel in (f.stage1_rgb, f.stage1_normal):
                s = png_info(self.name, self._path(rel), i)
                _check_size(self.name, self._path(rel), (s.height, s.width), (h, w), ref, i)
        self.tracking()

    def read_frames(self, indices: Sequence[int] | np.ndarray) -> FrameBatch:
        idx = self._indices(indices)
        frames = self.frames()
        h, w = self.height, self.width
        ref = f"{self._path(frames[0].image)} (frame 0)"
        batch = FrameBatch(
            indices=idx,
            real_rgb=np.empty((len(idx), h, w, 3), np.uint8),
            mask=np.empty((len(idx), h, w), np.uint8),
            coarse_rgb=np.empty((len(idx), h, w, 3), np.uint8),
            coarse_normal=np.empty((len(idx), h, w, 3), np.uint8),
        )
        for k, i in enumerate(idx.tolist()):
            f = frames[i]

            def load(rel: str, i: int = i) -> np.ndarray:
                img = read_png(self.name, self._path(rel), i)
                _check_size(self.name, self._path(rel), img.shape[:2], (h, w), ref, i)
                return img

            real = load(f.image)
            if real.ndim == 3 and real.shape[2] == 4:
                batch.mask[k] = real[..., 3]
            elif self._path(f.mask).is_file():
                batch.mask[k] = as_grey(load(f.mask))
            else:
                raise self._missing_mask(f, i)
            batch.real_rgb[k] = as_rgb(real)
            batch.coarse_rgb[k] = as_rgb(load(f.stage1_rgb))
            batch.coarse_normal[k] = as_rgb(load(f.stage1_normal))
        return batch


# --------------------------------------------------------------------------------------------------
# Video layout
# --------------------------------------------------------------------------------------------------

FrameSequence = VideoFrames | PngFrames


class VideoParts(NamedTuple):
    mask: VideoFrames | None  # None: no mask.mp4, every pixel is foreground
    stage1_rgb: FrameSequence
    stage1_normal: FrameSequence


class VideoActorSource(ActorSource):
    """video.mp4 (+ mask.mp4) + tracking.npz|json + stage1 videos or PNG folders (see layout.py)."""

    kind = "video"

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self.video = VideoFrames(name, self.root / layout.VIDEO_FILE, layout.VIDEO_FILE)
        self._parts: VideoParts | None = None

    def _stage1(self, video_rel: str, dir_rel: str) -> FrameSequence:
        video, folder = self.root / video_rel, self.root / dir_rel
        if video.is_file() and folder.is_dir():
            raise ActorDataError(self.name, f"both {video} and the folder {folder} exist: keep one of them")
        if folder.is_dir():
            return PngFrames(self.name, folder, f"{dir_rel}/")
        if video.is_file():
            return VideoFrames(self.name, video, video_rel)
        raise ActorDataError(
            self.name, f"neither {video} nor a folder {folder}/*.png exists: provide the stage-1 renders"
        )

    def parts(self) -> VideoParts:
        """The frame sequences besides video.mp4, found once (on first use)."""
        if self._parts is None:
            mask = self.root / layout.MASK_VIDEO_FILE
            self._parts = VideoParts(
                mask=VideoFrames(self.name, mask, layout.MASK_VIDEO_FILE) if mask.is_file() else None,
                stage1_rgb=self._stage1(layout.STAGE1_RGB_VIDEO, layout.STAGE1_RGB_DIR),
                stage1_normal=self._stage1(layout.STAGE1_NORMAL_VIDEO, layout.STAGE1_NORMAL_DIR),
            )
        return self._parts

    def _probe(self) -> tuple[int, int, int]:
        h, w = self.video.size()
        return len(self.video), h, w

    def input_files(self) -> list[Path]:
        r = self.root
        files = [
            r / layout.VIDEO_FILE,
            r / layout.MASK_VIDEO_FILE,
            r / layout.TRACKING_NPZ,
            r / layout.TRACKING_JSON,
            r / layout.STAGE1_RGB_VIDEO,
            r / layout.STAGE1_NORMAL_VIDEO,
        ]
        for d in (layout.STAGE1_RGB_DIR, layout.STAGE1_NORMAL_DIR):
            if (r / d).is_dir():
                files += sorted(p for p in (r / d).glob("*.png"))
        return files

    def tracking(self) -> Tracking:
        npz, js = self.root / layout.TRACKING_NPZ, self.root / layout.TRACKING_JSON
        if npz.is_file() and js.is_file():
            raise ActorDataError(self.name, f"both {npz} and {js} exist: keep one tracking file")
        if npz.is_file():
            label = layout.TRACKING_NPZ
            try:
                with np.load(npz, allow_pickle=False) as z:
                    missing = [k for k in ("expression", "pose") if k not in z.files]
                    if missing:
                        raise ActorDataError(
                            self.name,
                            f"{npz} has arrays {sorted(z.files)} but lacks {missing}: "
                            "store 'expression' (K, 100) and 'pose' (K, 6)",
                        )
                    exp, pose = z["expression"], z["pose"]
            except ActorDataError:
                raise
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
                raise ActorDataError(
                    self.name, f"{npz} cannot be read ({exc}): rewrite it with np.savez"
                ) from None
        elif js.is_file():
            label = layout.TRACKING_JSON
            try:
                doc = json.loads(js.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ActorDataError(self.name, f"{js} is not valid JSON ({exc})") from None
            if not isinstance(doc, dict) or not {"expression", "pose"} <= set(doc):
                raise ActorDataError(
                    self.name, f'{js} must be an object with lists "expression" (K x 100) and "pose" (K x 6)'
                )
            exp, pose = doc["expression"], doc["pose"]
        else:
            raise ActorDataError(
                self.name, f"no tracking file: write {npz} (arrays 'expression' (K, 100), 'pose' (K, 6))"
            )
        tr = _check_tracking_arrays(self.name, label, exp, pose)
        n = self.num_frames
        if tr.num_frames != n:
            raise ActorDataError(
                self.name,
                f"frame counts disagree: {label} has {tr.num_frames} rows but {layout.VIDEO_FILE} has "
                f"{n} frames: track every frame of the video",
                min(tr.num_frames, n),
            )
        return tr

    def _check_counts(self) -> None:
        n = self.num_frames
        for part in self.parts():
            if part is not None and len(part) != n:
                m = len(part)
                raise ActorDataError(
                    self.name,
                    f"frame counts disagree: {layout.VIDEO_FILE} has {n} frames but {part.label} has {m}: "
                    "every part needs exactly one frame per video frame",
                    min(n, m),
                )

    def validate(self) -> None:
        h, w = self.height, self.width
        self._check_counts()
        ref = f"{self.video.path} (frame 0)"
        for part in self.parts():
            if isinstance(part, VideoFrames):
                _check_size(self.name, f"{part.path} (frame 0)", part.size(), (h, w), ref, 0)
            elif isinstance(part, PngFrames):
                part.check_sizes((h, w), ref)
        self.tracking()

    def read_frames(self, indices: Sequence[int] | np.ndarray) -> FrameBatch:
        idx = self._indices(indices)
        h, w = self.height, self.width
        self._check_counts()
        ref = f"{self.video.path}"
        parts = self.parts()
        real = self.video.read(idx)

        def read(part: FrameSequence) -> np.ndarray:
            frames = part.read(idx)
            if frames.shape[1:3] != (h, w):  # one folder/video has one size, so the first frame tells
                first = int(idx[0]) if len(idx) else 0
                where = part.path(first) if isinstance(part, PngFrames) else part.path
                _check_size(self.name, where, frames.shape[1:3], (h, w), ref, first)
            return frames

        if parts.mask is None:
            mask = np.full((len(idx), h, w), 255, np.uint8)
        else:  # grey video, lossy: threshold at mid-grey
            mask = np.where(read(parts.mask).mean(axis=-1) > 127, 255, 0).astype(np.uint8)
        return FrameBatch(
            indices=idx,
            real_rgb=real,
            mask=mask,
            coarse_rgb=read(parts.stage1_rgb),
            coarse_normal=read(parts.stage1_normal),
        )


# --------------------------------------------------------------------------------------------------
# Finding actors
# --------------------------------------------------------------------------------------------------


def _layout_of(path: Path) -> str | None:
    insta, video = (path / layout.TRANSFORMS_FILE).is_file(), (path / layout.VIDEO_FILE).is_file()
    if insta and video:
        raise ActorDataError(
            path.name,
            f"{path} holds both {layout.TRANSFORMS_FILE} and {layout.VIDEO_FILE}: "
            "an actor folder has one layout; split it into two folders",
        )
    return "insta" if insta else "video" if video else None


def open_actor(path: str | Path) -> ActorSource:
    """Open one actor folder; the layout is detected from transforms.json (insta) or video.mp4 (video)."""
    root = Path(os.path.abspath(Path(path).expanduser()))
    name = root.name
    if not root.is_dir():
        raise ActorDataError(name, f"{root} is not a folder: pass an actor folder")
    kind = _layout_of(root)
    if kind == "insta":
        return InstaActorSource(name, root)
    if kind == "video":
        return VideoActorSource(name, root)
    raise ActorDataError(
        name,
        f"{root} is not an actor folder: it needs {layout.TRANSFORMS_FILE} (INSTA layout) or "
        f"{layout.VIDEO_FILE} (video layout), see consistent_avatar/data/layout.py",
    )


def discover_actors(paths: Sequence[str | Path] | str | Path) -> list[ActorSource]:
    """Actors under ``paths``: each is an actor folder or a folder of actor folders. Sorted by name.

    Hidden folders (``.``-prefixed, e.g. staging leftovers) and folders that are not actors are
    skipped inside a parent; two different folders with the same actor name are an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[str, ActorSource] = {}
    for raw in paths:
        p = Path(os.path.abspath(Path(raw).expanduser()))
        if not p.exists():
            raise ActorDataError(p.name, f"source path {p} does not exist")
        if not p.is_dir():
            raise ActorDataError(
                p.name, f"source path {p} is a file: pass an actor folder or a folder of actor folders"
            )
        if _layout_of(p) is not None:
            candidates = [p]
        else:
            children = sorted(
                (c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")), key=lambda c: c.name
            )
            candidates = [c for c in children if _layout_of(c) is not None]
            chosen = set(candidates)
            skipped = [c.name for c in children if c not in chosen]
            if skipped:
                log.info("not actor folders, skipped under %s: %s", p, ", ".join(skipped))
            if not candidates:
                raise ActorDataError(
                    p.name,
                    f"{p} is neither an actor folder (with {layout.TRANSFORMS_FILE} or {layout.VIDEO_FILE}) "
                    "nor a folder holding actor folders",
                )
        for c in candidates:
            actor = open_actor(c)
            prev = found.get(actor.name)
            if prev is not None:
                if prev.root.resolve() == actor.root.resolve():
                    continue
                raise ActorDataError(
                    actor.name,
                    f"two actor sources have this name: {prev.root} and {actor.root}; "
                    "rename one folder (actor names must be unique)",
                )
            found[actor.name] = actor
    return sorted(found.values(), key=lambda a: a.name)
