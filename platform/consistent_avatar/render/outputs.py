"""Render outputs on disk: PNG frames, per-frame parquet rows, side-by-side mp4, the run manifest.

The layout is documented in :mod:`consistent_avatar.render` (and ``docs/render.md``); `cavatar
evaluate` reads it through :func:`read_outputs` and :func:`read_render_manifest`.

Atomicity and resume. Every file is written under a hidden temporary name (``.<name>.tmp-<id>``) and
renamed into place, so a killed run leaves no half-written PNG, parquet or mp4 under a visible name.
A batch writes its PNGs first, then one parquet *part* (``outputs-<frame>-<id>.parquet``) holding
its rows: a frame counts as rendered once its PNG and its parquet row both exist. At the end of a
run the parts are merged into ``outputs.parquet`` (written atomically, then the parts are deleted);
a run killed before that leaves parts, which the next run merges. Readers therefore take
``outputs.parquet`` plus any ``outputs-*.parquet`` and keep the newest row per frame
(:func:`read_outputs` does exactly that).

Settings. Each parquet file carries, in its schema metadata, the settings the frames were rendered
with (row switches, sampler, steps, seed, dtype, refiner, and fingerprints of the bundle and the
shard data). A re-run compares them with its own and refuses to mix frames rendered differently
unless ``force`` is given.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConsistentAvatarError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_table, encode_png, read_json

RENDER_SCHEMA_VERSION = 1
MANIFEST_FILE = "render_manifest.json"
FRAMES_DIR = "frames"
OUTPUTS_FILE = "outputs.parquet"
PART_GLOB = "outputs-*.parquet"
OUTPUTS_GLOB = "outputs*.parquet"
SETTINGS_KEY = b"consistent_avatar.render_settings"


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def actor_dir(out: str | Path, row: str, actor: str) -> Path:
    """``OUT/<row>/<actor>``: everything one row renders for one actor."""
    return Path(out) / row / actor


def png_relpath(row: str, actor: str, frame: int) -> str:
    """The ``png`` column: the frame's PNG relative to OUT (``<row>/<actor>/frames/<frame:06d>.png``)."""
    return f"{row}/{actor}/{FRAMES_DIR}/{int(frame):06d}.png"


def frame_png(out: str | Path, row: str, actor: str, frame: int) -> Path:
    return Path(out) / png_relpath(row, actor, frame)


def video_path(out: str | Path, row: str, actor: str) -> Path:
    """``OUT/<row>/<actor>/<actor>.mp4``: coarse | ours | real, side by side."""
    return actor_dir(out, row, actor) / f"{actor}.mp4"


# ---------------------------------------------------------------------------------------------
# Parquet rows
# ---------------------------------------------------------------------------------------------


def outputs_schema(settings: Mapping[str, Any] | None = None) -> pa.Schema:
    """One row per rendered frame. ``settings`` go into the schema metadata (see module docstring)."""
    meta = {SETTINGS_KEY: json.dumps(dict(settings), sort_keys=True).encode()} if settings else None
    return pa.schema(
        [
            pa.field("actor", pa.string()),
            pa.field("frame", pa.int32()),
            pa.field("row", pa.string()),
            pa.field("split", pa.string()),
            pa.field("png", pa.string()),
            pa.field("seconds", pa.float64()),
            pa.field("batch_size", pa.int32()),
            pa.field("timings", pa.string()),
            pa.field("sampler", pa.string()),
            pa.field("steps", pa.int32()),
            pa.field("seed", pa.int64()),
        ],
        metadata=meta,
    )


def write_batch(
    out: str | Path,
    *,
    row: str,
    actor: str,
    frames: Sequence[int],
    splits: Sequence[str],
    images: np.ndarray,
    timings: Mapping[str, float],
    sampler: str,
    steps: int,
    seeds: Sequence[int],
    settings: Mapping[str, Any],
    call_batch: int | None = None,
) -> Path:
    """Write one rendered batch: its PNGs (each atomically), then one parquet part of its rows.

    ``images``: (B, H, W, 3) uint8 RGB in the order of ``frames``. ``call_batch``: the frames the
    network call really ran when it was padded (``--compile``); ``seconds`` is the call's time per
    frame of the call and ``batch_size`` that size, so a padded call is not booked at the cost of a
    bigger batch per real frame. Returns the part's path.
    """
    b = len(frames)
    if images.shape[0] != b or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConsistentAvatarError(f"write_batch needs ({b}, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    for f, img in zip(frames, images):
        atomic_write_bytes(frame_png(out, row, actor, f), encode_png(img, compression=3))
    total = float(timings.get("total", 0.0))
    per_call = max(b, int(call_batch or 0))
    table = pa.Table.from_pydict(
        {
            "actor": [actor] * b,
            "frame": np.asarray(frames, dtype=np.int32),
            "row": [row] * b,
            "split": list(splits),
            "png": [png_relpath(row, actor, f) for f in frames],
            "seconds": np.full(b, total / per_call, dtype=np.float64),
            "batch_size": np.full(b, per_call, dtype=np.int32),
            "timings": [json.dumps({k: float(v) for k, v in timings.items()}, sort_keys=True)] * b,
            "sampler": [sampler] * b,
            "steps": np.full(b, steps, dtype=np.int32),
            "seed": np.asarray(seeds, dtype=np.int64),
        },
        schema=outputs_schema(settings),
    )
    part = actor_dir(out, row, actor) / f"outputs-{int(frames[0]):06d}-{uuid.uuid4().hex[:8]}.parquet"
    atomic_write_table(part, table)
    return part


def file_settings(path: Path) -> dict[str, Any] | None:
    """The render settings recorded in a parquet file's metadata (None if it has none)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(SETTINGS_KEY)
    return json.loads(raw) if raw else None


def settings_difference(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """``steps 4 → 2, bundle abc → def``: what changed between two settings records."""
    if old is None:
        return "no settings recorded"
    keys = sorted(set(old) | set(new))
    diffs = [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(diffs)


def output_files(directory: Path) -> list[Path]:
    """The outputs files of one ``<row>/<actor>`` folder: outputs.parquet first, then the parts a
    running or killed render wrote, oldest first (a later file's row for a frame wins)."""
    files: list[Path] = []
    if (directory / OUTPUTS_FILE).is_file():
        files.append(directory / OUTPUTS_FILE)
    parts = [p for p in directory.glob(PART_GLOB) if p.is_file()]
    files += sorted(parts, key=lambda p: (p.stat().st_mtime_ns, p.name))
    return files


def _merge(out: Path, files: Sequence[Path]) -> pa.Table:
    """Rows of ``files``, newest row per frame, only frames whose PNG exists, sorted by frame."""
    schema = outputs_schema()
    tables = [pq.read_table(p).cast(schema) for p in files]
    if not tables:
        return schema.empty_table()
    latest: dict[int, tuple[int, int]] = {}
    for t_i, t in enumerate(tables):
        for r_i, f in enumerate(t["frame"].to_pylist()):
            latest[f] = (t_i, r_i)
    picks: dict[int, list[int]] = {}
    for f, (ti, ri) in latest.items():
        if (out / tables[ti]["png"][ri].as_py()).is_file():
            picks.setdefault(ti, []).append(ri)
    if not picks:
        return schema.empty_table()
    merged = pa.concat_tables([tables[ti].take(sorted(rows)) for ti, rows in sorted(picks.items())])
    return merged.sort_by("frame").combine_chunks()


@dataclass
class OutputsScan:
    """What one (row, actor) directory holds, judged against the settings of this run."""

    done: pa.Table  # rows (matching settings, PNG present), newest per frame, sorted by frame
    stale: dict[Path, str] = field(default_factory=dict)  # parquet files of other settings: what differs

    @property
    def frames(self) -> set[int]:
        return set(self.done["frame"].to_pylist())


def scan_outputs(out: str | Path, row: str, actor: str, settings: Mapping[str, Any]) -> OutputsScan:
    """The frames of ``row``/``actor`` already rendered with ``settings``, and any files rendered
    with other settings (the caller decides: refuse, or re-render with ``force``)."""
    out = Path(out)
    directory = actor_dir(out, row, actor)
    matching, stale = [], {}
    for p in output_files(directory):
        try:
            recorded = file_settings(p)
        except (pa.ArrowException, OSError, json.JSONDecodeError) as exc:
            stale[p] = f"unreadable ({exc})"
            continue
        if recorded == dict(settings):
            matching.append(p)
        else:
            stale[p] = settings_difference(recorded, settings)
    try:
        done = _merge(out, matching)
    except (pa.ArrowException, OSError) as exc:
        raise ConsistentAvatarError(
            f"the outputs of {directory} cannot be read ({exc}): delete that folder to render it again"
        ) from exc
    return OutputsScan(done=done, stale=stale)


def compact_outputs(out: str | Path, row: str, actor: str, settings: Mapping[str, Any]) -> pa.Table:
    """Merge the parts of ``row``/``actor`` into ``outputs.parquet`` (atomically), then delete the
    parts; files of other settings are dropped (only reached under ``force``). Returns the table."""
    out = Path(out)
    directory = actor_dir(out, row, actor)
    files = output_files(directory)
    matching = [p for p in files if _safe_settings(p) == dict(settings)]
    table = _merge(out, matching)
    if not files:
        return table
    unchanged = (
        files == [directory / OUTPUTS_FILE]
        and matching == files
        and pq.read_metadata(files[0]).num_rows == table.num_rows
    )
    if not unchanged:
        atomic_write_table(directory / OUTPUTS_FILE, table.replace_schema_metadata(outputs_schema(settings).metadata))
        for p in files:
            if p.name != OUTPUTS_FILE:
                p.unlink(missing_ok=True)
    return table


def _safe_settings(path: Path) -> dict[str, Any] | None:
    try:
        return file_settings(path)
    except (pa.ArrowException, OSError, json.JSONDecodeError):
        return None


def read_outputs(out: str | Path, row: str, actor: str) -> pa.Table:
    """Every rendered frame of ``row``/``actor``: ``outputs.parquet`` plus parts a killed run left,
    newest row per frame, only frames whose PNG exists, sorted by frame (the outputs schema)."""
    out = Path(out)
    return _merge(out, output_files(actor_dir(out, row, actor)))


# ---------------------------------------------------------------------------------------------
# Video and manifest
# ---------------------------------------------------------------------------------------------


def write_side_by_side_video(
    path: str | Path, triples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], fps: float
) -> int:
    """``coarse | ours | real`` as one mp4 (OpenCV ``mp4v``), written to a hidden name and renamed.

    ``triples`` yields (coarse, ours, real), each (H, W, 3) uint8 RGB, one frame at a time (a long
    actor at 512² does not fit in memory three times over); the video is H × 3W. Returns the frame count.
    """
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.mp4")  # the suffix picks the container
    writer = None
    n = 0
    try:
        for coarse, ours, real in triples:
            if not (coarse.shape == ours.shape == real.shape) or coarse.ndim != 3 or coarse.shape[2] != 3:
                raise ConsistentAvatarError(
                    f"{path}: frame {n} has coarse {coarse.shape}, ours {ours.shape}, real {real.shape}; "
                    "all three must be the same (H, W, 3)"
                )
            h, w = coarse.shape[:2]
            if writer is None:
                writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (3 * w, h), True)
                if not writer.isOpened():
                    raise ConsistentAvatarError(f"OpenCV cannot open an mp4v writer for {path}")
            writer.write(cv2.cvtColor(np.concatenate([coarse, ours, real], axis=1), cv2.COLOR_RGB2BGR))
            n += 1
        if writer is None:
            raise ConsistentAvatarError(f"{path}: no frames to write")
        writer.release()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.release()
        tmp.unlink(missing_ok=True)
    return n


def read_render_manifest(out: str | Path) -> dict[str, Any] | None:
    """``OUT/render_manifest.json`` (None when OUT holds none), checked for its schema version."""
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConsistentAvatarError(f"{path} is not valid JSON ({exc}): delete it; the next render rewrites it") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != RENDER_SCHEMA_VERSION:
        raise ConsistentAvatarError(
            f"{path} has render schema version {version}, this code reads {RENDER_SCHEMA_VERSION}: "
            "render into another --out"
        )
    return manifest


def write_render_manifest(out: str | Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(out) / MANIFEST_FILE
    atomic_write_json(path, dict(manifest))
    return path
