"""`cavatar evaluate`: a render run against its shards → metrics.json, per_frame.parquet, report.html.

What it does, per evaluated row and actor (rows = every row of ``RUN/render_manifest.json`` plus the
implicit ``coarse`` row, the stage-1 input itself read from the shards — the paper's "coarse input"):

1. **Check everything first** (no metric is computed before every input is known good): the render
   manifest, the shards it names, the requested rows and actors, resolutions (render manifest vs
   shards), and every (row, actor)'s outputs: all frames of the split rendered (a partially rendered
   actor is an error that says how many frames are missing and to re-run ``cavatar render``, which
   resumes), every PNG the outputs list present.
2. **Measure**, one actor at a time (its real frames, masks and tracked codes are decoded once, then
   each row's frames are loaded in frame order): L2, PSNR, SSIM, LPIPS per frame; seconds per frame
   (from the outputs parquet; unavailable for ``coarse``); the temporal metrics of the paper's Fig. 7
   (optical-flow magnitude curves of rendered and real video, their mean absolute difference,
   flicker); pose and expression error from a face-parameter estimator against the shard's tracked
   pose/expression; emotion accuracy against synthetic ground truth where the actor's source has it.
   A metric that cannot be computed is recorded as unavailable with its reason — never a made-up number.
3. **Write** ``EVAL`` (default ``RUN/eval``): ``strips/`` (worst/best frames by PSNR, coarse | ours |
   real), ``per_frame.parquet``, ``report.html``, and ``metrics.json`` last; every file atomically.

The metric implementations live in :mod:`.image`, :mod:`.temporal`, :mod:`.face` (and
:mod:`.emotion`, :mod:`.aggregate`); this module only plans, loads, calls them and records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform as _platform
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConsistentAvatarError
from ..data.shards import Shards, open_shards
from ..io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    encode_png,
    is_uri,
    publish_dir,
    read_json,
    require_local_dir,
    staging_dir,
)

log = logging.getLogger(__name__)

METRICS_SCHEMA_VERSION = 1
RENDER_SCHEMA_VERSION = 1
RENDER_MANIFEST = "render_manifest.json"
METRICS_FILE = "metrics.json"
PER_FRAME_FILE = "per_frame.parquet"
REPORT_FILE = "report.html"
STRIPS_DIR = "strips"
COARSE = "coarse"
STRIP_ROW_PREFERENCE = ("full", "without_lcm", "without_emotion", "without_normal", "baseline")

# metric key → what it is (recorded in metrics.json["metrics"])
METRICS: dict[str, dict[str, str]] = {
    "l2": {"label": "L2", "better": "lower", "unit": "mean squared error on 0..1 intensities", "scope": "frame"},
    "psnr": {"label": "PSNR", "better": "higher", "unit": "dB (data range 1)", "scope": "frame"},
    "ssim": {"label": "SSIM", "better": "higher", "unit": "", "scope": "frame"},
    "lpips": {"label": "LPIPS", "better": "lower", "unit": "", "scope": "frame"},
    "seconds_per_frame": {"label": "seconds/frame", "better": "lower", "unit": "s", "scope": "frame"},
    "pose_error": {"label": "PE", "better": "lower", "unit": "L2 of the pose-code difference", "scope": "frame"},
    "expression_error": {"label": "EE", "better": "lower", "unit": "L2 of the expression-code difference", "scope": "frame"},
    "flow_mean_abs_diff": {"label": "flow-curve |Δ|", "better": "lower", "unit": "px", "scope": "actor"},
    "flicker": {"label": "flicker", "better": "lower", "unit": "squared 0..1 intensity", "scope": "actor"},
    "emotion_accuracy": {"label": "emotion accuracy", "better": "higher", "unit": "fraction of frames", "scope": "frame"},
}
FRAME_METRICS = tuple(k for k, v in METRICS.items() if v["scope"] == "frame")
# frames per call of the per-frame image metrics (their float64 working copies stay ~100 MB at 512²)
IMAGE_METRIC_CHUNK = 16
ACTOR_METRICS = tuple(k for k, v in METRICS.items() if v["scope"] == "actor")


# ---------------------------------------------------------------------------------------------
# Config and result
# ---------------------------------------------------------------------------------------------


class EvaluateConfig(BaseModel):
    """Settings of one `cavatar evaluate` run (printed back in metrics.json)."""

    model_config = ConfigDict(extra="forbid")

    rows: list[str] | None = Field(None, description="rows to evaluate (default: every rendered row + 'coarse')")
    actors: list[str] | None = Field(None, description="actors to evaluate (default: every rendered actor)")
    shards: str | None = Field(None, description="shards: a folder or a pyarrow filesystem URI (default: the render manifest's)")
    lpips: bool = Field(True, description="compute LPIPS (needs the backbone weights locally)")
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    torch_home: str | None = Field(None, description="TORCH_HOME holding hub/checkpoints/<LPIPS backbone, RAFT>")
    flow: Literal["auto", "farneback", "raft"] = Field(
        "auto", description="auto: RAFT when its weights are on disk, else Farneback (temporal.choose_flow)"
    )
    face_estimator: str = Field(
        "none",
        description="'none', a SyntheticFaceRegressor folder, or a JSON file naming an estimator "
        "(face.load_face_estimator)",
    )
    mask_foreground: bool = Field(False, description="compare the foreground (the shards' mask) only")
    device: str = "cpu"
    strip_frames: int = Field(3, ge=0, le=20, description="worst and best frames per actor in the report")
    thumbnail: int = Field(128, ge=16, le=512, description="strip thumbnails' height (px, never enlarged)")
    workers: int = Field(1, ge=1, le=256, description="processes evaluating (row, actor) videos in parallel")
    report: bool = Field(True, description="also write report.html")
    progress: bool = True
    command: str | None = Field(None, description="recorded as the producing command (default: this process's)")

    @field_validator("rows", "actors")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("give at least one name, or leave it unset for all")
        return list(dict.fromkeys(v)) if v is not None else None


@dataclass
class EvaluationResult:
    """Where the evaluation went and what it found (``metrics`` = the metrics.json content)."""

    out: Path
    metrics_path: Path
    per_frame_path: Path
    report_path: Path | None
    metrics: dict[str, Any]
    seconds: float = 0.0

    def table(self) -> str:
        """A plain-text Table 1 + 2 of the per-row means."""
        from .report import METRIC_COLUMNS, format_value, ordered_rows, row_label

        cols = ["l2", "psnr", "ssim", "lpips", "seconds_per_frame", "pose_error", "expression_error",
                "flow_mean_abs_diff", "flicker"]
        head = ["row"] + [METRIC_COLUMNS[c][0].split(" ")[0] if c != "flow_mean_abs_diff" else "flow|Δ|" for c in cols]
        lines = [head]
        for row in ordered_rows(list(self.metrics["rows"])):
            mean = self.metrics["rows"][row]["mean"]
            lines.append([row_label(row)] + [format_value(mean.get(c), METRIC_COLUMNS[c][1]) for c in cols])
        widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
        text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)
        notes = sorted({f"{m}: {why}" for r in self.metrics["rows"].values() for m, why in r["unavailable"].items()})
        if notes:
            text += "\nn/a: " + "\n     ".join(notes)
        return text


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """The machine this ran on (recorded next to every figure)."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": _platform.platform(),
        "python": _platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = device
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    return info


def jsonable(value: Any) -> Any:
    """numpy → Python; +inf/-inf → the strings "inf"/"-inf" and NaN → None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(value, Path):
        return str(value)
    return value


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a metrics.json (numbers stay as written: "inf" strings mark infinite PSNR)."""
    p = Path(path)
    if not p.is_file():
        raise ConsistentAvatarError(f"{p} does not exist: run `cavatar evaluate` first")
    data = read_json(p)
    if data.get("schema_version") != METRICS_SCHEMA_VERSION:
        raise ConsistentAvatarError(
            f"{p} has metrics schema version {data.get('schema_version')}, this code reads {METRICS_SCHEMA_VERSION}"
        )
    return data


def _frames_text(frames: Sequence[int], limit: int = 8) -> str:
    frames = sorted(frames)
    shown = ", ".join(map(str, frames[:limit]))
    return shown + (f", … (+{len(frames) - limit} more)" if len(frames) > limit else "")


def _frame_mean(values: np.ndarray) -> tuple[float | None, dict[str, Any]]:
    """:func:`.aggregate.summarize` of one metric's per-frame values: (mean or None when no value is
    usable, the statistics). Identical frames' +inf PSNR is left out of the mean and counted; a
    video whose every frame is identical has mean +inf."""
    from .aggregate import summarize

    stats = summarize(values)
    mean = float(stats["mean"])
    return (None if math.isnan(mean) else mean), stats


# ---------------------------------------------------------------------------------------------
# Planning: what is there, and is it complete
# ---------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One (row, actor) to evaluate."""

    row: str
    actor: str
    frames: list[int]
    pngs: list[Path] = field(default_factory=list)  # empty for the coarse row
    seconds: np.ndarray | None = None
    seconds_reason: str | None = None


@dataclass
class _Plan:
    run: Path
    manifest: dict[str, Any]
    shards: Shards  # a local path or a pyarrow filesystem URI, resolved once
    shard_manifest: dict[str, Any]
    split: str
    rows: list[str]
    actors: list[str]
    frames: dict[str, list[int]]  # per actor: the frames of the split
    units: dict[tuple[str, str], _Unit]


def _read_render_manifest(run: Path) -> dict[str, Any]:
    path = run / RENDER_MANIFEST
    if not run.is_dir():
        raise ConsistentAvatarError(f"render run {run} does not exist: pass the --out folder of `cavatar render`")
    if not path.is_file():
        raise ConsistentAvatarError(
            f"{run} holds no {RENDER_MANIFEST}: it is not a render run (make one with `cavatar render --out {run}`), "
            "or its first render has not finished"
        )
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConsistentAvatarError(
            f"{path} is not valid JSON ({exc}): re-run `cavatar render`, which rewrites it"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != RENDER_SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise ConsistentAvatarError(f"{path} has render schema version {version}; this code reads {RENDER_SCHEMA_VERSION}")
    for key in ("rows", "actors", "split"):
        if key not in manifest:
            raise ConsistentAvatarError(
                f"{path} has no {key!r}: it is not a complete render manifest; re-run `cavatar render`"
            )
    return manifest


def _resolve_shards(run: Path, manifest: dict[str, Any], override: str | None) -> Shards:
    """The shards to evaluate against (``--shards``, else the render manifest's), a local path or a
    pyarrow filesystem URI, resolved once (a bad URI or a missing directory raises here)."""
    if override:
        return open_shards(override)
    recorded = manifest.get("shards")
    if not recorded:
        raise ConsistentAvatarError(f"{run / RENDER_MANIFEST} names no shards: pass --shards")
    if is_uri(recorded):
        return open_shards(recorded)
    p = Path(recorded).expanduser()
    if not p.is_absolute() and not p.exists() and (run / p).exists():
        p = run / p
    return open_shards(p)


def _split_frames(shards: Shards, actor: str, split: str) -> list[int]:
    from ..data.shards import read_actor_table

    t = read_actor_table(shards, actor, columns=["frame", "split"])
    if split not in ("all", "", None):
        t = t.filter(pa.compute.equal(t["split"], split))
    return [int(f) for f in t["frame"].to_pylist()]


def _read_outputs(run: Path, row: str, actor: str) -> dict[int, dict[str, Any]]:
    """Newest outputs row per frame of RUN/<row>/<actor> (frame → {png, seconds}).

    Every outputs file records the settings it was rendered with; a folder whose files disagree is
    a forced re-render (``--force``) killed half-way — old frames beside new ones — and is refused
    rather than measured as one video."""
    from ..render.outputs import file_settings, output_files, settings_difference

    latest: dict[int, dict[str, Any]] = {}
    first: tuple[Path, dict[str, Any] | None] | None = None
    for path in output_files(run / row / actor):
        try:
            t = pq.read_table(path, columns=["frame", "png", "seconds"])
            recorded = file_settings(path)
        except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
            raise ConsistentAvatarError(
                f"{path} cannot be read ({exc}): delete it and re-run `cavatar render` to render its frames again"
            ) from exc
        # files without a record (hand-made runs) agree with each other; one beside recorded ones does not
        if first is None:
            first = (path, recorded)
        elif recorded != first[1]:
            what = (settings_difference(first[1], recorded) if recorded is not None
                    else f"{path.name} records no settings")
            raise ConsistentAvatarError(
                f"{run / row / actor} mixes frames rendered with different settings ({first[0].name} → "
                f"{path.name}: {what}): a forced re-render was stopped half-way; re-run that "
                "`cavatar render … --force` command to finish it, then evaluate"
            )
        for f, png, sec in zip(t["frame"].to_pylist(), t["png"].to_pylist(), t["seconds"].to_pylist()):
            latest[int(f)] = {"png": png, "seconds": sec}
    return latest


def _png_path(run: Path, row: str, actor: str, frame: int, recorded: str | None) -> Path:
    if recorded:
        p = Path(recorded)
        return p if p.is_absolute() else run / p
    return run / row / actor / "frames" / f"{frame:06d}.png"


_CORRUPT_FIX = "delete it and re-run `cavatar render` with the same settings, which renders frames without a PNG again"


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the PNG header when the file looks complete (signature, IHDR first, IEND
    last), else None. Cheap: catches empty, truncated and wrong-sized files before any metric runs;
    decoding catches the rest."""
    try:
        size = path.stat().st_size
        if size < 33 + 12:
            return None
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(size - 12)
            tail = f.read(12)
    except OSError:
        return None
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or tail[4:8] != b"IEND":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _plan(run: Path, config: EvaluateConfig) -> _Plan:
    from ..data.shards import load_manifest

    manifest = _read_render_manifest(run)
    shards = _resolve_shards(run, manifest, config.shards)
    shard_manifest = load_manifest(shards)
    split = str(manifest.get("split") or "all")
    rendered_rows = [str(r) for r in manifest["rows"]]
    available_rows = rendered_rows + [COARSE]
    if config.rows is None:
        rows = available_rows
    else:
        unknown = [r for r in config.rows if r not in available_rows]
        if unknown:
            raise ConsistentAvatarError(
                f"row(s) {', '.join(map(repr, unknown))} were not rendered in {run} (rows there: "
                f"{', '.join(rendered_rows) or 'none'}, plus {COARSE!r}): render them with "
                f"`cavatar render --rows {','.join(unknown)} --out {run} …`, or choose other --rows"
            )
        rows = list(config.rows)
    man_actors: dict[str, Any] = manifest["actors"]
    if config.actors is None:
        actors = list(man_actors)
    else:
        unknown = [a for a in config.actors if a not in man_actors]
        if unknown:
            raise ConsistentAvatarError(
                f"actor(s) {', '.join(map(repr, unknown))} were not rendered in {run} (actors there: "
                f"{', '.join(map(repr, man_actors)) or 'none'})"
            )
        actors = list(config.actors)
    if not actors:
        raise ConsistentAvatarError(f"{run / RENDER_MANIFEST} lists no actors: nothing was rendered")
    missing_in_shards = [a for a in actors if a not in shard_manifest.get("actors", {})]
    if missing_in_shards:
        raise ConsistentAvatarError(
            f"actor(s) {', '.join(map(repr, missing_in_shards))} of {run} are not in the shards {shards} "
            f"(prepared actors: {', '.join(map(repr, sorted(shard_manifest.get('actors', {})))) or 'none'}): "
            "pass the shards the run rendered from with --shards"
        )
    shard_res = shard_manifest.get("resolution")
    problems: list[str] = []
    frames: dict[str, list[int]] = {}
    for actor in actors:
        entry = man_actors[actor] or {}
        res = entry.get("resolution")
        if res is not None and shard_res is not None and int(res) != int(shard_res):
            problems.append(
                f"actor {actor!r} was rendered at {res}² but the shards {shards} are {shard_res}²: evaluate against "
                "the shards the run rendered from (--shards), or re-render at the shards' resolution"
            )
            continue
        fr = _split_frames(shards, actor, split)
        if not fr:
            problems.append(f"actor {actor!r} has no {split!r} frames in {shards}: these are not the shards of the run")
            continue
        n = entry.get("frames")
        if n is not None and int(n) != len(fr):
            problems.append(
                f"actor {actor!r}: the render manifest counts {n} {split!r} frames but the shards {shards} hold "
                f"{len(fr)}: the shards changed since the render; re-run `cavatar render` on them"
            )
            continue
        frames[actor] = fr
    if problems:
        raise ConsistentAvatarError("cannot evaluate " + str(run) + ":\n  " + "\n  ".join(problems))

    units: dict[tuple[str, str], _Unit] = {}
    for row in rows:
        for actor in actors:
            fr = frames[actor]
            if row == COARSE:
                units[(row, actor)] = _Unit(
                    row, actor, fr,
                    seconds_reason="the coarse input is stage 1's render (INSTA or the synthetic stand-in) read from the "
                    "shards; the platform does not time stage 1",
                )
                continue
            outputs = _read_outputs(run, row, actor)
            have = [f for f in fr if f in outputs]
            missing = sorted(set(fr) - set(have))
            if missing and not have:
                problems.append(
                    f"row {row!r} was not rendered for actor {actor!r} (no frames in {run / row / actor}): render it "
                    f"with `cavatar render` (rows {row}, actor {actor}), or leave it out with --rows/--actors"
                )
                continue
            if missing:
                problems.append(
                    f"row {row!r}, actor {actor!r} is partially rendered: {len(missing)} of {len(fr)} frames are missing "
                    f"(frames {_frames_text(missing)}): re-run `cavatar render` with the same settings to resume it"
                )
                continue
            pngs = [_png_path(run, row, actor, f, outputs[f]["png"]) for f in fr]
            absent = [(f, p) for f, p in zip(fr, pngs) if not p.is_file()]
            if absent:
                f0, p0 = absent[0]
                rest = [f for f, _ in absent[1:]]
                more = f" (and {len(rest)} more: frames {_frames_text(rest)})" if rest else ""
                problems.append(
                    f"missing PNG {p0} (actor {actor!r}, frame {f0}, row {row!r}){more}: its outputs row exists "
                    "but the file is gone; re-run `cavatar render` with the same settings, which renders frames "
                    "without a PNG again"
                )
                continue
            sizes = [_png_size(p) for p in pngs]
            broken = [(f, p) for f, p, wh in zip(fr, pngs, sizes) if wh is None]
            if broken:
                f0, p0 = broken[0]
                rest = [f for f, _ in broken[1:]]
                more = f" (and {len(rest)} more: frames {_frames_text(rest)})" if rest else ""
                problems.append(f"corrupt PNG {p0} (actor {actor!r}, frame {f0}, row {row!r}){more}: {_CORRUPT_FIX}")
                continue
            want = (int(shard_res), int(shard_res)) if shard_res is not None else sizes[0]
            wrong = [(f, p, wh) for f, p, wh in zip(fr, pngs, sizes) if wh != want]
            if wrong:
                f0, p0, (w0, h0) = wrong[0]  # type: ignore[misc]
                more = f" (and {len(wrong) - 1} more frames)" if len(wrong) > 1 else ""
                problems.append(
                    f"{p0} (actor {actor!r}, frame {f0}, row {row!r}) is {w0}×{h0} but the shards' frames are "
                    f"{want[0]}×{want[1]}{more}: resolution mismatch between the renders and the shards (evaluate "
                    "against the shards the run rendered from with --shards, or re-render)"
                )
                continue
            secs = np.asarray([np.nan if outputs[f]["seconds"] is None else float(outputs[f]["seconds"]) for f in fr])
            unit = _Unit(row, actor, fr, pngs=pngs, seconds=secs)
            if np.isnan(secs).all():
                unit.seconds, unit.seconds_reason = None, f"the outputs of row {row!r} record no seconds per frame"
            units[(row, actor)] = unit
    if problems:
        raise ConsistentAvatarError("cannot evaluate " + str(run) + ":\n  " + "\n  ".join(problems))
    return _Plan(run, manifest, shards, shard_manifest, split, rows, actors, frames, units)


# ---------------------------------------------------------------------------------------------
# Loading frames
# ---------------------------------------------------------------------------------------------


@dataclass
class _ActorData:
    frames: list[int]
    split: list[str]
    real: np.ndarray  # (N, H, W, 3) uint8
    coarse: np.ndarray
    mask: np.ndarray  # (N, H, W) uint8
    expression: np.ndarray  # (N, 100) float32
    pose: np.ndarray  # (N, 6)
    emotion: list[str]
    real_flow: np.ndarray | None = None  # the real video's optical flow, computed once for all rows


class _RealFlowCache:
    """A flow estimator that computes the real video's flow once per actor: every row's
    :func:`.temporal.temporal_consistency` call asks for it again (same array object)."""

    def __init__(self, estimator: Any, data: _ActorData) -> None:
        self.estimator, self.data = estimator, data
        self.name = estimator.name

    @property
    def available(self) -> bool:
        return bool(self.estimator.available)

    @property
    def reason(self) -> str | None:
        return self.estimator.reason

    def __call__(self, frames: Any) -> np.ndarray:
        if frames is self.data.real:
            if self.data.real_flow is None:
                self.data.real_flow = self.estimator(frames)
            return self.data.real_flow
        return self.estimator(frames)


def _load_actor(plan: _Plan, actor: str) -> _ActorData:
    from ..data.shards import decode_images, read_actor_table

    cols = ["frame", "split", "real_rgb", "mask", "coarse_rgb", "expression", "pose", "emotion"]
    t = read_actor_table(plan.shards, actor, columns=cols)
    wanted = set(plan.frames[actor])
    keep = [i for i, f in enumerate(t["frame"].to_pylist()) if int(f) in wanted]
    t = t.take(pa.array(keep, pa.int64()))
    return _ActorData(
        frames=[int(f) for f in t["frame"].to_pylist()],
        split=[str(s) for s in t["split"].to_pylist()],
        real=decode_images(t["real_rgb"]),
        coarse=decode_images(t["coarse_rgb"]),
        mask=decode_images(t["mask"], channels=1),
        expression=np.asarray(t["expression"].to_pylist(), np.float32),
        pose=np.asarray(t["pose"].to_pylist(), np.float32),
        emotion=[str(e) for e in t["emotion"].to_pylist()],
    )


def _load_pngs(unit: _Unit, shape: tuple[int, ...]) -> np.ndarray:
    import cv2

    out = np.empty((len(unit.pngs), *shape), np.uint8)
    for i, (f, p) in enumerate(zip(unit.frames, unit.pngs)):
        data = np.fromfile(p, np.uint8) if p.is_file() else None
        if data is None:
            raise ConsistentAvatarError(
                f"missing PNG {p} (actor {unit.actor!r}, frame {f}, row {unit.row!r}): re-run `cavatar render`"
            )
        img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if img is None:
            raise ConsistentAvatarError(
                f"corrupt PNG {p} (actor {unit.actor!r}, frame {f}, row {unit.row!r}): {_CORRUPT_FIX}"
            )
        if img.shape != shape:
            raise ConsistentAvatarError(
                f"{p} (actor {unit.actor!r}, frame {f}, row {unit.row!r}) is {img.shape[1]}×{img.shape[0]} but the shards' "
                f"frames are {shape[1]}×{shape[0]}: resolution mismatch between the renders and the shards "
                "(evaluate against the shards the run rendered from with --shards, or re-render)"
            )
        out[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return out


# ---------------------------------------------------------------------------------------------
# Metric components (thin adapters over the metrics library)
# ---------------------------------------------------------------------------------------------


def _reason(x: Any) -> str | None:
    from .image import Unavailable

    return x.reason if isinstance(x, Unavailable) else None


class _Components:
    """The metric objects of one run, built once: LPIPS, flow estimator, face estimator, emotion."""

    def __init__(self, config: EvaluateConfig, plan: _Plan) -> None:
        from .image import LPIPSMetric
        from .temporal import choose_flow

        self.config = config
        self.lpips: Any = None
        self.lpips_reason: str | None = None
        if not config.lpips:
            self.lpips_reason = "LPIPS switched off (--no-lpips)"
        else:
            self.lpips = LPIPSMetric(net=config.lpips_net, device=config.device, torch_home=config.torch_home)
            if not self.lpips.available:
                self.lpips_reason, self.lpips = self.lpips.reason, None
        self.flow, self.flow_choice = choose_flow(config.flow, device=config.device, torch_home=config.torch_home)
        self.face, self.face_reason = self._face(config)
        self.emotion = _EmotionTruth(plan, self.face, self.face_reason)
        self._face_real: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None  # (actor, its reading)

    def face_on_real(self, actor: str, data: _ActorData) -> tuple[np.ndarray, np.ndarray]:
        """The face estimator's (expression, pose) of the actor's real frames, read once per actor
        (every row of the actor and its reference ask for it; actors are evaluated one at a time)."""
        if self._face_real is None or self._face_real[0] != actor:
            self._face_real = (actor, self.face(data.real))
        return self._face_real[1]

    @staticmethod
    def _face(config: EvaluateConfig) -> tuple[Any, str | None]:
        from .face import SyntheticFaceRegressor, load_face_estimator

        spec = config.face_estimator.strip()
        if spec.lower() in ("", "none"):
            return None, (
                "no face-parameter estimator given: pass --face-estimator DIR (a face regressor trained with "
                "`python -m consistent_avatar.evaluation.face train --out DIR`, or a JSON file naming DECA/EMOCA weights)"
            )
        p = Path(spec).expanduser()
        if not p.exists():
            raise ConsistentAvatarError(
                f"face estimator {p} does not exist: pass a saved face regressor folder, a JSON spec, or 'none'"
            )
        if p.is_file():
            try:
                est = load_face_estimator(json.loads(p.read_text()), device=config.device)
            except (ValueError, TypeError) as exc:
                raise ConsistentAvatarError(f"face estimator spec {p} is not a JSON object ({exc})") from exc
        else:
            est = SyntheticFaceRegressor.load(p, device=config.device)
        if not est.available:
            return None, est.reason or f"face estimator {est.name} is unavailable"
        return est, None

    def describe(self) -> dict[str, Any]:
        return {
            "lpips": self.lpips.describe() if self.lpips is not None else {"available": False, "reason": self.lpips_reason},
            "flow": {"estimator": getattr(self.flow, "name", self.config.flow), "available": self.flow.available,
                     "reason": self.flow.reason, "choice": self.flow_choice,
                     **({"params": self.flow.params()} if hasattr(self.flow, "params") else {})},
            "face_estimator": ({"name": self.face.name, "expression_dims": list(self.face.expression_dims),
                                "pose_dims": list(self.face.pose_dims), "available": True,
                                "reference": "tracked codes" if self.face.shard_codes else "estimate on the real frames"}
                               if self.face is not None else {"available": False, "reason": self.face_reason}),
            "emotion": self.emotion.describe(),
        }


class _EmotionTruth:
    """Emotion accuracy of rendered frames: the face estimator reads an expression off each frame,
    the run's emotion database labels it (paper eq. 7, as `cavatar prepare` labelled the shards),
    and the label is compared with the synthetic generator's true emotion of that frame.

    The truth and the scoring come from :mod:`.emotion` (``true_emotions``, ``emotion_accuracy``).
    ADAPTER: :mod:`.emotion` scores the labels stored in the shards; labelling *rendered* frames
    (estimator → :class:`consistent_avatar.emotion.EmotionLabeller` with the shards' database,
    metric and smoothing) is done here."""

    def __init__(self, plan: _Plan, face: Any, face_reason: str | None) -> None:
        self.plan = plan
        self.face = face
        self.face_reason = face_reason
        self._labeller: Any = None
        self._labeller_reason: str | None = None
        self.settings = plan.shard_manifest.get("emotion") or {}

    def describe(self) -> dict[str, Any]:
        return {"database": self.settings.get("database"), "metric": self.settings.get("metric"),
                "smoothing_window": self.settings.get("smoothing_window")}

    def truth(self, actor: str, frames: Sequence[int]) -> tuple[list[str] | None, str | None]:
        """The synthetic true emotion per frame, or (None, why not)."""
        from ..data.layout import SYNTHETIC_TRUTH_FILE
        from ..data.shards import ACTOR_MANIFEST_FILE, ACTORS_DIR, read_shard_json

        try:
            source = ((read_shard_json(self.plan.shards, ACTORS_DIR, actor, ACTOR_MANIFEST_FILE) or {})
                      .get("source") or {}).get("root")
        except (OSError, ValueError):
            source = None
        if not source:
            return None, f"actor {actor!r}'s shard manifest names no source folder to find synthetic ground truth in"
        from .emotion import true_emotions

        truth_file = Path(source) / SYNTHETIC_TRUTH_FILE
        if not truth_file.is_file():
            return None, (f"no synthetic ground truth for actor {actor!r} ({truth_file} not found): emotion accuracy "
                          "needs the true labels of a synthetic actor")
        try:
            labels = true_emotions(source)
        except (ConsistentAvatarError, OSError, ValueError) as exc:
            return None, f"{truth_file} cannot be read ({exc})"
        if max(frames) >= len(labels):
            return None, f"{truth_file} holds {len(labels)} labels, fewer than actor {actor!r}'s frames"
        return [labels[f] for f in frames], None

    def labeller(self) -> tuple[Any, str | None]:
        if self._labeller is not None or self._labeller_reason is not None:
            return self._labeller, self._labeller_reason
        from ..emotion import EmotionDatabase, EmotionLabeller

        db = self.settings.get("database")
        path = Path(db) if db else None
        if path is not None and not path.is_absolute() and not path.is_file() and self.plan.shards.local:
            beside = Path(self.plan.shards.root) / path  # a database path relative to local shards
            path = beside if beside.is_file() else path
        if path is None or not path.is_file():
            self._labeller_reason = (f"the emotion database the shards were labelled with ({db}) is not found from here: "
                                     "emotion labels of rendered frames cannot be computed")
            return None, self._labeller_reason
        try:
            self._labeller = EmotionLabeller(EmotionDatabase.read(path), metric=self.settings.get("metric", "cosine"))
        except (ConsistentAvatarError, TypeError, ValueError) as exc:
            self._labeller_reason = f"could not load the emotion database {path}: {exc}"
        return self._labeller, self._labeller_reason

    def accuracy(
        self, actor: str, frames: Sequence[int], expressions: np.ndarray | None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Per-frame predicted/true labels and correctness, or (None, why not)."""
        from ..data.layout import EMOTIONS

        truth, why = self.truth(actor, frames)
        if truth is None:
            return None, why
        if expressions is None:
            return None, f"emotion accuracy reads expressions off the frames: {self.face_reason}"
        labeller, why = self.labeller()
        if labeller is None:
            return None, why
        from .emotion import emotion_accuracy

        ids, _ = labeller.label(expressions, smoothing_window=int(self.settings.get("smoothing_window") or 1))
        pred = [EMOTIONS[int(i)] for i in np.asarray(ids)]
        return {"pred": pred, "true": truth, "correct": np.asarray([p == t for p, t in zip(pred, truth)]),
                "scores": emotion_accuracy(pred, truth)}, None


# ---------------------------------------------------------------------------------------------
# One (row, actor)
# ---------------------------------------------------------------------------------------------


def _measure(
    unit: _Unit, images: np.ndarray, data: _ActorData, comp: _Components, mask: np.ndarray | None
) -> dict[str, Any]:
    """Per-frame arrays, per-actor scalars, curves and unavailable reasons of one (row, actor)."""
    from .face import expression_error, pose_error
    from .image import MetricUnavailableError, l2, psnr, ssim
    from .temporal import flicker, temporal_consistency

    n = len(unit.frames)
    nan = np.full(n, np.nan)
    per: dict[str, np.ndarray] = {}
    scalars: dict[str, float | None] = {}
    unavailable: dict[str, str] = {}
    curves: dict[str, Any] = {"frame": list(unit.frames)}

    # per-frame image metrics, IMAGE_METRIC_CHUNK frames at a time: the metrics work on float64
    # copies (8× the uint8 frames), which for a whole 350-frame 512² video would be GBs per array
    chunks: dict[str, list[np.ndarray]] = {"l2": [], "psnr": [], "ssim": [], "lpips": []}
    for s in range(0, n, IMAGE_METRIC_CHUNK):
        sl = slice(s, s + IMAGE_METRIC_CHUNK)
        im, re, mk = images[sl], data.real[sl], (None if mask is None else mask[sl])
        chunks["l2"].append(l2(im, re, mk))
        chunks["psnr"].append(psnr(im, re, mk))
        chunks["ssim"].append(ssim(im, re, mk))
        if comp.lpips is not None:
            res = comp.lpips.compute(im, re, mk)
            if _reason(res) is not None:
                comp.lpips_reason, comp.lpips = _reason(res), None
            else:
                chunks["lpips"].append(np.asarray(res, np.float64))
    for k in ("l2", "psnr", "ssim"):
        per[k] = np.concatenate(chunks[k]) if chunks[k] else np.zeros(0)
    if comp.lpips is not None:
        per["lpips"] = np.concatenate(chunks["lpips"]) if chunks["lpips"] else np.zeros(0)
    else:
        unavailable["lpips"], per["lpips"] = comp.lpips_reason or "LPIPS unavailable", nan
    if unit.seconds is not None:
        per["seconds_per_frame"] = unit.seconds
    else:
        unavailable["seconds_per_frame"], per["seconds_per_frame"] = unit.seconds_reason or "not recorded", nan

    # temporal (Fig. 7): per adjacent pair; per-frame columns hold pair (i-1, i) at frame i
    for k in ("flow_rendered", "flow_real", "flow_abs_diff", "flicker"):
        per[k] = nan.copy()
    if n < 2:
        for k in ("flow_mean_abs_diff", "flicker"):
            unavailable[k] = f"temporal metrics need at least 2 consecutive frames; actor {unit.actor!r} has {n}"
    else:
        try:
            tc = temporal_consistency(images, data.real, mask, estimator=_RealFlowCache(comp.flow, data))
        except MetricUnavailableError as exc:  # e.g. RAFT weights present but not loadable
            fl = flicker(images, data.real, mask)
            tc = {"flicker": fl, "flicker_mean": float(np.nanmean(fl)) if np.isfinite(fl).any() else math.nan,
                  "curve_mad": exc.unavailable}
        per["flicker"][1:] = tc["flicker"]
        scalars["flicker"] = tc["flicker_mean"]
        curves["flow_frame"] = list(unit.frames[1:])
        curves["flicker"] = tc["flicker"]
        if _reason(tc["curve_mad"]) is not None:
            unavailable["flow_mean_abs_diff"] = _reason(tc["curve_mad"])
        else:
            per["flow_rendered"][1:], per["flow_real"][1:] = tc["rendered_curve"], tc["real_curve"]
            per["flow_abs_diff"][1:] = tc["curve_abs_diff"]
            scalars["flow_mean_abs_diff"] = tc["curve_mad"]
            curves["flow_rendered"], curves["flow_real"] = tc["rendered_curve"], tc["real_curve"]
            curves["rendered_mean_motion"], curves["real_mean_motion"] = tc["rendered_mean_motion"], tc["real_mean_motion"]

    # pose / expression error (face.face_consistency's PE/EE, the estimator run once per frame set:
    # its expressions also feed the emotion labels). The reference is the shard's tracked codes when
    # the estimator's codes are the shards' own; otherwise — DECA's FLAME codes on synthetic actors —
    # the estimator's reading of the real frames, as the paper compares DECA on generated and real frames.
    expressions = None
    face_reason = comp.face_reason
    if comp.face is not None:
        try:
            expressions, poses = comp.face(images)
            if comp.face.shard_codes:
                ref_expression, ref_pose = data.expression, data.pose
            else:
                ref_expression, ref_pose = comp.face_on_real(unit.actor, data)
        except MetricUnavailableError as exc:  # weights that exist but do not load
            face_reason, expressions = exc.unavailable.reason, None
        else:
            per["pose_error"] = pose_error(poses, ref_pose, comp.face.pose_dims)
            per["expression_error"] = expression_error(expressions, ref_expression, comp.face.expression_dims)
    if expressions is None:
        unavailable["pose_error"] = unavailable["expression_error"] = face_reason or "no face estimator"
        per["pose_error"], per["expression_error"] = nan, nan

    if comp.face is not None and not comp.face.shard_codes:
        emo, why = None, (
            f"the emotion database labels the shards' expression codes; face estimator {comp.face.name!r} reads "
            "codes of its own (set shard_codes in its spec when the shards were tracked with it)"
        )
    else:
        emo, why = comp.emotion.accuracy(unit.actor, unit.frames, expressions)
    if emo is None:
        unavailable["emotion_accuracy"] = why or "no emotion ground truth"
        per["emotion_accuracy"] = nan
        labels: dict[str, list[Any]] = {"emotion_pred": [None] * n, "emotion_true": [None] * n}
        emotion_scores = None
    else:
        per["emotion_accuracy"] = emo["correct"].astype(np.float64)
        labels = {"emotion_pred": emo["pred"], "emotion_true": emo["true"]}
        emotion_scores = emo["scores"]

    means: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for k in FRAME_METRICS:
        if k in unavailable:
            means[k] = None
            continue
        means[k], stats[k] = _frame_mean(per[k])
        if means[k] is None:
            unavailable[k] = f"no frame of actor {unit.actor!r} gave a value (empty foreground mask?)"
    for k in ACTOR_METRICS:
        if k not in unavailable:
            v = scalars.get(k)
            means[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
            if means[k] is None:
                unavailable[k] = f"no frame pair of actor {unit.actor!r} gave a value (empty foreground mask?)"
        else:
            means[k] = None
    curves["psnr"] = per["psnr"]
    return {"per_frame": per, "labels": labels, "metrics": means, "stats": stats, "unavailable": unavailable,
            "curves": curves, "emotion": emotion_scores}


def _strip(coarse: np.ndarray, ours: np.ndarray, real: np.ndarray, height: int) -> np.ndarray:
    """coarse | ours | real, each scaled to ``height`` (never enlarged), 2 px white gaps."""
    import cv2

    h, w = real.shape[:2]
    th = min(height, h)
    tw = max(1, round(w * th / h))
    tiles = [cv2.resize(x, (tw, th), interpolation=cv2.INTER_AREA) if th != h else x for x in (coarse, ours, real)]
    gap = np.full((th, 2, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _strip_row(rows: Sequence[str]) -> str | None:
    for r in STRIP_ROW_PREFERENCE:
        if r in rows:
            return r
    others = [r for r in rows if r != COARSE]
    return others[0] if others else None


def _row_summary(actors: dict[str, Any], per_frame: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Overall per-row figures with :func:`.aggregate.aggregate_actors` (the rule every table of the
    platform uses): ``mean`` = the mean of the per-actor means (each actor weighs the same, as in the
    paper's per-dataset tables), ``frame_mean`` = the mean over every frame of those actors beside it
    (frame metrics only); an actor for which a metric is unavailable is left out and named."""
    from .aggregate import aggregate_actors
    from .image import Unavailable

    per_actor: dict[str, dict[str, Any]] = {}
    for actor, e in actors.items():
        d: dict[str, Any] = {}
        for k in FRAME_METRICS:
            d[k] = (per_frame[actor][k] if e["metrics"].get(k) is not None
                    else Unavailable(k, e["unavailable"].get(k, "not computed")))
        for k in ACTOR_METRICS:  # one value per actor: its mean is the value
            v = e["metrics"].get(k)
            d[k] = np.asarray([v], np.float64) if v is not None else Unavailable(k, e["unavailable"].get(k, "not computed"))
        per_actor[actor] = d
    overall = aggregate_actors(per_actor)["overall"]
    mean: dict[str, Any] = {}
    frame_mean: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for k in (*FRAME_METRICS, *ACTOR_METRICS):
        o = overall.get(k)
        if o is None or isinstance(o, Unavailable):
            reasons = sorted({e["unavailable"].get(k, "not computed") for e in actors.values()})
            mean[k], unavailable[k] = None, "; ".join(reasons)
            continue
        mean[k] = None if math.isnan(o["mean"]) else o["mean"]
        if k in FRAME_METRICS:
            frame_mean[k] = None if math.isnan(o["frame_mean"]) else o["frame_mean"]
        if o["unavailable_actors"]:
            unavailable[k] = f"mean over {o['n_actors']} of {len(actors)} actors; n/a for " + ", ".join(
                f"{a} ({actors[a]['unavailable'].get(k, 'not computed')})" for a in o["unavailable_actors"])
        if mean[k] is None:
            unavailable[k] = "no actor gave a value"
    return {"mean": mean, "frame_mean": frame_mean, "unavailable": unavailable}


FLOAT_COLUMNS = ("l2", "psnr", "ssim", "lpips", "seconds_per_frame", "flow_rendered", "flow_real", "flow_abs_diff",
                 "flicker", "pose_error", "expression_error")
PER_FRAME_SCHEMA = pa.schema([
    ("row", pa.string()), ("actor", pa.string()), ("frame", pa.int32()), ("split", pa.string()),
    *[(k, pa.float64()) for k in FLOAT_COLUMNS],
    ("emotion_pred", pa.string()), ("emotion_true", pa.string()), ("emotion_correct", pa.bool_()),
])
PER_FRAME_COLUMNS = tuple(PER_FRAME_SCHEMA.names)


class _Evaluator:
    """Evaluates (row, actor) units; keeps the last actor's decoded shard frames (a unit of the same
    actor reuses them). One per process: in the driver, or in each pool worker."""

    def __init__(self, plan: _Plan, config: EvaluateConfig, strips_stage: Path, strip_row: str | None,
                 components: _Components | None = None) -> None:
        self.plan, self.config, self.strips_stage, self.strip_row = plan, config, strips_stage, strip_row
        self.comp = components if components is not None else _Components(config, plan)
        self._actor: tuple[str, _ActorData] | None = None

    def data(self, actor: str) -> _ActorData:
        if self._actor is None or self._actor[0] != actor:
            self._actor = None  # free the previous actor's frames first
            self._actor = (actor, _load_actor(self.plan, actor))
        return self._actor[1]

    def unit(self, row: str, actor: str, with_reference: bool) -> dict[str, Any]:
        data = self.data(actor)
        unit = self.plan.units[(row, actor)]
        mask = data.mask if self.config.mask_foreground else None
        images = data.coarse if row == COARSE else _load_pngs(unit, data.real.shape[1:])
        m = _measure(unit, images, data, self.comp, mask)
        out: dict[str, Any] = {
            "entry": {
                "frames": len(unit.frames),
                "first_frame": unit.frames[0],
                "last_frame": unit.frames[-1],
                "metrics": m["metrics"],
                "stats": m["stats"],
                "emotion": m["emotion"],
                "unavailable": m["unavailable"],
                "curves": m["curves"],
            },
            "frames": list(unit.frames),
            "split": list(data.split),
            "per_frame": m["per_frame"],
            "labels": m["labels"],
            "reference": _reference(self.comp, actor, data) if with_reference else None,
            "strip": None,
        }
        if row == self.strip_row and self.config.strip_frames > 0:
            a_index = self.plan.actors.index(actor)
            out["strip"] = _write_strips(self.strips_stage, a_index, actor, row, unit, images, data,
                                         m["per_frame"]["psnr"], self.config)
        return out


_WORKER: _Evaluator | None = None


def _init_worker(plan: _Plan, config: EvaluateConfig, strips_stage: Path, strip_row: str | None) -> None:
    import cv2

    global _WORKER
    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass
    _WORKER = _Evaluator(plan, config, strips_stage, strip_row)


def _worker_unit(row: str, actor: str, with_reference: bool) -> dict[str, Any]:
    assert _WORKER is not None, "pool worker not initialised"
    return _WORKER.unit(row, actor, with_reference)


def evaluate(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    config: EvaluateConfig | dict[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate the render run ``run`` into ``out`` (default ``run/eval``); see the module docstring.

    Raises :class:`ConsistentAvatarError` (before computing anything) when the run or its shards are
    missing, rows or actors are absent, resolutions disagree, or an actor is partially rendered; and
    while loading, on a missing or corrupt PNG (naming actor and frame).
    """
    from tqdm.auto import tqdm

    if config is None:
        config = EvaluateConfig()
    elif isinstance(config, dict):
        try:
            config = EvaluateConfig(**config)
        except ValidationError as exc:
            raise ConsistentAvatarError(f"invalid evaluate config: {exc}") from None
    t0 = time.perf_counter()
    why = "evaluation reads the PNGs `cavatar render` wrote there and writes its files by atomic renames"
    run_path = require_local_dir(run, "RUN", why + " (the shards, --shards, may be a URI)")
    out_path = require_local_dir(out, "the evaluation folder", why) if out is not None else run_path / "eval"
    plan = _plan(run_path, config)
    from .temporal import RAFTFlow

    comp = _Components(config, plan)
    # worker processes build their own estimators: hand them the method chosen here, not "auto" again
    config = config.model_copy(update={"flow": "raft" if isinstance(comp.flow, RAFTFlow) else "farneback"})
    strip_row = _strip_row(plan.rows)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log.info("evaluate: %d row(s) × %d actor(s) of %s (%s split) against %s", len(plan.rows), len(plan.actors),
             run_path, plan.split, plan.shards)

    out_path.mkdir(parents=True, exist_ok=True)
    strips_stage = staging_dir(out_path / STRIPS_DIR)
    rows_out: dict[str, dict[str, Any]] = {r: {"actors": {}} for r in plan.rows}
    row_frames: dict[str, dict[str, dict[str, np.ndarray]]] = {r: {} for r in plan.rows}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    strips: dict[str, Any] = {}
    reference: dict[str, Any] = {"actors": {}}
    # actor-major, so that a worker mostly finds the actor it decoded last in its cache
    tasks = [(row, actor, row == plan.rows[0]) for actor in plan.actors for row in plan.rows]
    workers = min(config.workers, len(tasks))
    try:
        bar = tqdm(total=len(tasks), unit="video", desc="evaluate", disable=not config.progress)
        if workers <= 1:
            evaluator = _Evaluator(plan, config, strips_stage, strip_row, comp)
            for row, actor, with_ref in tasks:
                bar.set_postfix_str(f"{actor} {row}")
                results[(row, actor)] = evaluator.unit(row, actor, with_ref)
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                     initargs=(plan, config, strips_stage, strip_row)) as pool:
                futures = {pool.submit(_worker_unit, row, actor, with_ref): (row, actor) for row, actor, with_ref in tasks}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        if fut.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise fut.exception()  # type: ignore[misc]
                        results[futures[fut]] = fut.result()
                        bar.update(1)
                        bar.set_postfix_str(" ".join(reversed(futures[fut])))
        bar.close()
        for row, actor, _ in tasks:
            r = results[(row, actor)]
            rows_out[row]["actors"][actor] = r["entry"]
            row_frames[row][actor] = r["per_frame"]
            if r.get("reference") is not None:
                reference["actors"][actor] = r["reference"]
            if r.get("strip") is not None:
                strips[actor] = r["strip"]
        for row in plan.rows:
            rows_out[row].update(_row_summary(rows_out[row]["actors"], row_frames[row]))
            rows_out[row]["frames"] = sum(e["frames"] for e in rows_out[row]["actors"].values())
            rows_out[row]["settings"] = (plan.manifest.get("settings") or {}).get(row) if row != COARSE else {
                "source": "coarse_rgb column of the shards (stage 1)"}
        # From here the folder's files are replaced one by one; metrics.json, written last, marks a
        # complete evaluation, so an earlier one goes first: a failure in between must not leave new
        # strips or a new report beside old metrics.
        (out_path / METRICS_FILE).unlink(missing_ok=True)
        publish_dir(strips_stage, out_path / STRIPS_DIR)
    except BaseException:
        shutil.rmtree(strips_stage, ignore_errors=True)
        raise

    columns: dict[str, list[Any]] = {k: [] for k in PER_FRAME_COLUMNS}
    for row, actor, _ in tasks:
        r = results[(row, actor)]
        n = len(r["frames"])
        columns["row"] += [row] * n
        columns["actor"] += [actor] * n
        columns["frame"] += r["frames"]
        columns["split"] += r["split"]
        for k in FLOAT_COLUMNS:
            columns[k] += [None if np.isnan(v) else float(v) for v in r["per_frame"][k]]
        pred, true = r["labels"]["emotion_pred"], r["labels"]["emotion_true"]
        columns["emotion_pred"] += pred
        columns["emotion_true"] += true
        columns["emotion_correct"] += [None if t is None else p == t for p, t in zip(pred, true)]

    ref_keys = ("pose_error", "expression_error", "emotion_accuracy", "tracked_emotion_accuracy")
    ref_vals = {k: [e[k] for e in reference["actors"].values() if e.get(k) is not None] for k in ref_keys}
    reference["mean"] = {k: (float(np.mean(v)) if v else None) for k, v in ref_vals.items()}
    no_truth = "no synthetic ground truth (synthetic.json beside the actors' sources)"
    why = {"pose_error": comp.face_reason, "expression_error": comp.face_reason,
           "emotion_accuracy": comp.face_reason if comp.face is None else no_truth, "tracked_emotion_accuracy": no_truth}
    if comp.face is not None and not comp.face.shard_codes:
        own = (f"face estimator {comp.face.name!r} reads codes of its own: PE/EE compare its readings of the rendered "
               "and the real frames, so the real frames have no floor to report")
        why.update(pose_error=own, expression_error=own, emotion_accuracy=own)
    reference["unavailable"] = {k: why[k] or "not computed" for k, v in ref_vals.items() if not v}
    reference["description"] = (
        "the face estimator on the real frames against the tracked codes: the floor of pose and expression error "
        "that a perfect render would get" if comp.face is None or comp.face.shard_codes else
        "none: the face estimator reads codes of its own, so PE/EE already compare rendered with real frames"
    )

    table = pa.Table.from_pydict(columns, schema=PER_FRAME_SCHEMA)
    per_frame_path = out_path / PER_FRAME_FILE
    atomic_write_table(per_frame_path, table)

    command = config.command or shlex.join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])
    metrics: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "run": str(run_path),
        "eval_dir": str(out_path),
        "shards": plan.shards.location,
        "split": plan.split,
        "resolution": plan.shard_manifest.get("resolution"),
        "actors": plan.actors,
        "row_order": plan.rows,
        "config": config.model_dump(),
        "metrics": METRICS,
        "components": comp.describe(),
        "rows": rows_out,
        "reference": reference,
        "strips": strips,
        "strips_row": strip_row,
        "files": {"per_frame": PER_FRAME_FILE, "report": REPORT_FILE if config.report else None, "strips": STRIPS_DIR},
        "render": {k: plan.manifest.get(k) for k in ("command", "machine", "created_at", "bundles")},
        "command": command,
        "machine": machine_info(config.device),
        "created_at": created,
    }
    if strip_row is None:
        metrics["strips_unavailable"] = "only the coarse row was evaluated: no rendered frames to show"
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    metrics = jsonable(metrics)
    report_path = None
    if config.report:
        from .report import write_report

        report_path = write_report(metrics, out_path / REPORT_FILE, base_dir=out_path)
    metrics_path = out_path / METRICS_FILE
    atomic_write_json(metrics_path, metrics)  # last: its presence marks a complete evaluation
    log.info("evaluation written to %s (%s, %s%s)", out_path, METRICS_FILE, PER_FRAME_FILE,
             f", {REPORT_FILE}" if report_path else "")
    return EvaluationResult(out_path, metrics_path, per_frame_path, report_path, metrics, time.perf_counter() - t0)


def _reference(comp: _Components, actor: str, data: _ActorData) -> dict[str, Any]:
    """What the real frames score: the face estimator's PE/EE and emotion accuracy on them (the floor
    a perfect render would get), and the accuracy of the shards' own emotion labels (from the tracked
    expressions) against the synthetic truth."""
    out: dict[str, Any] = {"pose_error": None, "expression_error": None, "emotion_accuracy": None,
                           "tracked_emotion_accuracy": None}
    from .emotion import shard_emotion_accuracy
    from .image import Unavailable

    plan = comp.emotion.plan
    try:
        tracked = shard_emotion_accuracy(plan.shards, actor, split=None if plan.split in ("all", "") else plan.split)
    except ConsistentAvatarError:
        tracked = None
    if tracked is not None and not isinstance(tracked, Unavailable):
        out["tracked_emotion_accuracy"] = float(tracked["accuracy"])
    if comp.face is None or not comp.face.shard_codes:
        return out  # an estimator with codes of its own has no floor against the tracked codes
    from .face import expression_error, pose_error
    from .image import MetricUnavailableError

    try:
        expressions, poses = comp.face_on_real(actor, data)
    except MetricUnavailableError:
        return out
    out["pose_error"] = _frame_mean(pose_error(poses, data.pose, comp.face.pose_dims))[0]
    out["expression_error"] = _frame_mean(expression_error(expressions, data.expression, comp.face.expression_dims))[0]
    emo, _ = comp.emotion.accuracy(actor, data.frames, expressions)
    if emo is not None:
        out["emotion_accuracy"] = float(emo["correct"].mean())
    return out


def _write_strips(stage: Path, a_index: int, actor: str, row: str, unit: _Unit, images: np.ndarray, data: _ActorData,
                  psnr: np.ndarray, config: EvaluateConfig) -> dict[str, Any]:
    """Worst and best frames by PSNR as coarse | ours | real PNGs under ``stage``; their entries."""
    # frames without a PSNR (NaN: empty foreground mask) are neither worst nor best
    order = [int(i) for i in np.argsort(np.where(np.isnan(psnr), np.inf, psnr), kind="stable") if not np.isnan(psnr[i])]
    k = min(config.strip_frames, len(order))
    worst = order[:k]
    best = [i for i in order[::-1] if i not in worst][:k] if len(order) > k else []
    info: dict[str, Any] = {"row": row, "worst": [], "best": []}
    for kind, idx in (("worst", worst), ("best", best)):
        for i in idx:
            name = f"actor{a_index:03d}_{kind}_{unit.frames[i]:06d}.png"
            strip = _strip(data.coarse[i], images[i], data.real[i], config.thumbnail)
            atomic_write_bytes(stage / name, encode_png(strip, 6))
            info[kind].append({"frame": unit.frames[i], "psnr": float(psnr[i]), "image": f"{STRIPS_DIR}/{name}"})
    return info
