"""The render job: prepared shards × actor bundles × ablation rows → frames, parquet rows, mp4s.

What :func:`render` does, in order:

1. **Check every input in the driver, before any Ray work**: the shard manifest, the actors (known,
   with frames in the split), each actor's bundle at ``<bundles>/<actor>`` (present, readable, made
   for that actor, at the shards' resolution, holding the weights the rows need, knowing the shards'
   emotion labels), and OUT (not rendered from another split, not holding frames of other settings
   unless ``force``). All problems are raised together as one :class:`ConsistentAvatarError`.
   Also per actor: whether stage 2 may take the shards' coarse-TSD latents instead of encoding them
   (:mod:`.latents`: only when provably its bundle's VAE's); logged, and recorded in the row settings.
2. **Plan what is missing**: per (row, actor) the frames of the split whose PNG and parquet row do
   not exist yet, cut into *units* of at most ``batch_size`` frames — each unit is one actor, one
   row, one network call.
3. **Ray Data**, the batch-inference shape, one unit per block at every stage::

       from_items(units)
         .map_batches(load_units,    CPU tasks, io_cpus each)   shard rows → decoded PNGs, vectors (numpy)
         .map_batches(FrameRenderer, ActorPoolStrategy pool)    pipeline only → (B, 3, H, W) uint8 frames
         .map_batches(write_units,   CPU tasks, io_cpus each)   PNGs, then one parquet part (see .outputs)

   The load task reads the unit's rows from the shard files (a filter on ``frame``) and decodes its
   PNGs into contiguous NCHW uint8 arrays (and, for a row that uses them, the stored coarse-TSD
   latents into one float16 array, which the pool actor passes as ``coarse_latent``). A pool actor
   loads bundles on first use (``load_bundle`` →
   ``ConsistentAvatarPipeline.from_bundle``, an LRU of ``cache_size`` pipelines; ``compile`` wraps
   them, and a compiled pipeline evicted from the LRU adopts the next actor's weights in place rather
   than compiling again — ``ConsistentAvatarPipeline.adopt``; with ``compile_cache`` every pool actor
   compiles through one shared torch.compile cache, :mod:`consistent_avatar.compile_cache`), pads a
   short unit to ``batch_size`` under ``compile``, and renders it in one
   ``ConsistentAvatarPipeline.__call__`` with per-frame seeds ``seed + frame``. The write task writes
   the PNGs and the parquet part and returns the unit's result row (row, actor, frames, seconds,
   error). So while a pool actor renders one unit, tasks decode the next ones and encode the last
   ones: the pool actor's time goes to the pipeline. A unit that fails at any stage carries its error
   through the later ones (which pass it on untouched) to its result row instead of failing the job,
   so one broken actor or frame does not stop the others; a pool actor or task that dies is restarted
   by Ray Data and its unit retried (writes are atomic and idempotent).

   **Resources.** Pool actors hold their CPUs (and GPUs) for the whole job, and the load and write
   tasks can only run on CPUs no pool actor holds: a pool that took every CPU would leave the tasks
   unscheduled and the job hanging. Each I/O task asks for ``io_cpus`` (default 0.1: it is short
   and single-threaded, and a small fraction lets Ray Data run several beside a pool that takes
   nearly every CPU; 0.25 rendered measurably slower on 2 cores), at most one task per cluster CPU
   per stage. Ray places actors node by node, so the reserve is kept **per node**: a pool actor asks
   for its GPU(s) and ``num_cpus_per_actor`` (default 1) CPUs, or for the largest equal share under
   which every node with more than ``2 × io_cpus`` CPUs keeps ``2 × io_cpus`` free (one load and one
   write task) with as many actors as Ray can put on it (by its CPUs and GPUs), and under which the
   cluster holds the whole pool now. A CPU pool keeps one actor per CPU, each still running
   ``num_cpus_per_actor`` torch threads: on the 2-CPU local default 2 actors × 0.9 CPU beside 0.2 for
   the tasks, and on 3 nodes of 2 CPUs 6 × 0.9, 0.2 left on each node. A GPU actor whose
   ``num_cpus_per_actor`` would take a node's every CPU is shrunk the same way (8 GPUs and 8 CPUs a
   node: 0.975 CPU an actor). That share is what the I/O used to cost inside the pool actor, now
   spent by the tasks instead; the alternative, a pool one actor smaller, would leave a whole core to
   the little I/O of a CPU render. A pool that may grow later (``concurrency`` MIN:MAX, or a GPU pool
   waiting for an autoscaler's GPU nodes) need not fit now and leaves the I/O task count to Ray Data;
   if no node present can hold an actor it keeps ``num_cpus_per_actor`` (nodes the autoscaler adds
   must leave ``2 × io_cpus`` themselves). A fixed pool that fits on no node is refused. See
   :func:`_resources`.
4. **Finish**: per (row, actor) merge the parts into ``outputs.parquet``; write the side-by-side mp4
   (Ray tasks, one per video) once every frame exists; rewrite ``render_manifest.json``.

Why work units instead of ``read_parquet(...).map_batches``: a batch must hold a single actor (one
pipeline, one call), and only the missing frames of each (row, actor) are rendered. Units built in
the driver give both without a shuffle of image bytes through the object store (a groupby would move
every frame); each load task reads just its unit's rows from the shard files, with a filter on
``frame``. The driver only ever holds the small per-frame index (frame, split, emotion label).

**Where the shards are.** SHARDS is a local or shared-filesystem path or any pyarrow filesystem URI
(``file:///…``, ``s3://bucket/…``, ``gs://bucket/…``). The driver resolves it once
(:func:`~consistent_avatar.data.shards.open_shards`: ``pyarrow.fs.FileSystem.from_uri``), lists the
actors' parquet files with that filesystem, and every plan carries the resolved
:class:`~consistent_avatar.data.shards.Shards` (filesystem + root) with the files as paths on it; the
load and video tasks read with ``pq.read_table(paths, filesystem=…)``. We pass the filesystem object,
not the URI strings, because it pickles (by its options, so credentials are still found by each
worker from its own environment), a URI is then parsed and checked once instead of in every task
(``from_uri`` of an ``s3://`` URI without a region asks the bucket's region over the network), and
every task reads exactly the files the driver listed and checked. A URI whose filesystem cannot be
created or reached, or a missing shard directory, fails in step 1. OUT stays a local or
shared-filesystem path: it holds the resume lock (``fcntl``) and the PNGs and parquet parts are
published by atomic renames, neither of which object stores offer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import platform as _platform
import shlex
import socket
import sys
import tempfile
import time
import traceback
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..compile_cache import check_compile_cache, join_compile_cache
from ..data.layout import EXPRESSION_DIM, POSE_DIM
from ..data.shards import Shards, actor_parts, load_manifest, open_shards
from ..errors import ConsistentAvatarError
from ..io import (
    absolute_or_uri,
    decode_png,
    fingerprint_of,
    is_uri,
    remove_stale_staging,
    require_local_dir,
    resolve_filesystem,
)
from .config import ROWS, RenderConfig, row_switches
from .latents import COLUMN as LATENT_COLUMN
from .latents import FROM_SHARDS, NO_LATENT, SETTING, BundleVAE, column_note, frame_span, lacking_column, why_not
from .latents import decode as decode_latents
from .latents import summary as latents_summary
from .outputs import (
    FRAMES_DIR,
    RENDER_SCHEMA_VERSION,
    OutputsScan,
    actor_dir,
    compact_outputs,
    frame_png,
    read_render_manifest,
    scan_outputs,
    video_path,
    write_batch,
    write_render_manifest,
    write_side_by_side_video,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".render.lock"
_INPUT_COLUMNS = ["frame", "coarse_rgb", "coarse_normal", "pose", "expression", "emotion"]
#: what the load stage hands the pool actor per unit (besides row, actor, frames, error, seconds)
_PAYLOAD = ("coarse_rgb", "coarse_normal", "pose", "expression", "emotion", "coarse_latent")


# ---------------------------------------------------------------------------------------------
# Plans (plain, picklable data: the driver builds them, the pool actors read them)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSettings:
    """How one row is rendered for one actor: what the pipeline is called with, and the record of it
    stored with the outputs (``settings``), which a re-run compares against."""

    row: str
    sampler: str
    steps: int
    switches: dict[str, bool]
    settings: dict[str, Any]
    shard_latent: bool = False  # stage 2 takes the shards' latent_tsd_coarse (see .latents)


@dataclass(frozen=True)
class ActorPlan:
    """One actor: where its bundle and shard rows are, and which frames the split selects.
    ``file_of`` maps a frame to its parquet file as a path on ``shards.filesystem``. ``latent_shape``:
    the shards' coarse-TSD latents' shape when rows use them, else None and ``latent_note`` says why."""

    actor: str
    shards: Shards
    bundle: str
    bundle_fingerprint: str
    variants: tuple[str, ...] | None
    resolution: int
    frames: tuple[int, ...]
    splits: dict[int, str]
    file_of: dict[int, str]
    rows: dict[str, RowSettings]
    latent_shape: tuple[int, ...] | None = None
    latent_note: str = ""


@dataclass(frozen=True)
class JobSpec:
    """What every stage needs: the plans plus the device settings."""

    out: str
    actors: dict[str, ActorPlan]
    seed: int
    use_gpu: bool
    dtype: str
    num_threads: int
    compile: bool
    compile_cache: str | None
    batch_size: int
    refine: bool | None
    refiner: str | None
    cache_size: int
    verify: bool


# ---------------------------------------------------------------------------------------------
# The three stages. A work unit travels as one row (one block) from stage to stage: ``row``,
# ``actor``, ``frames`` (JSON), ``error`` ("" while it is fine), ``seconds`` (summed over the
# stages) and the stage's payload. A stage that fails on a unit sets its ``error`` and empties its
# payload; the later stages pass such a unit on untouched, so it ends as its error row.
# ---------------------------------------------------------------------------------------------


def _unit_error(exc: Exception) -> str:
    """How a unit's failure is reported: our own errors as their message, others with a traceback."""
    if isinstance(exc, ConsistentAvatarError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"


def _column(values: list[Any]) -> np.ndarray:
    """One output column: arrays stacked along a new first axis (rows), object-dtype if ragged."""
    if values and isinstance(values[0], np.ndarray):
        if all(v.shape == values[0].shape and v.dtype == values[0].dtype for v in values):
            return np.stack(values)
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    return np.asarray(values)


def _units(batch: Mapping[str, Any]) -> Iterator[tuple[int, str, str, list[int], str, float]]:
    """(index, row, actor, frames, error, seconds so far) of every unit in a stage's input batch."""
    n = len(batch["row"])
    errors = batch.get("error")
    seconds = batch.get("seconds")
    for i in range(n):
        yield (
            i,
            str(batch["row"][i]),
            str(batch["actor"][i]),
            [int(f) for f in json.loads(str(batch["frames"][i]))],
            "" if errors is None else str(errors[i]),
            0.0 if seconds is None else float(seconds[i]),
        )


def _read_unit(
    plan: ActorPlan, frames: list[int], latent_shape: tuple[int, ...] | None = None
) -> dict[str, np.ndarray | str]:
    """A unit's pipeline inputs from the shard files: images as contiguous NCHW uint8, vectors as
    float32, emotion labels as JSON, in the order of ``frames``; with ``latent_shape`` also the coarse
    TSD's VAE latents, (n, *latent_shape) float16 (the column is read only then)."""
    files = sorted({plan.file_of[f] for f in frames})
    columns = _INPUT_COLUMNS + ([LATENT_COLUMN] if latent_shape else [])
    try:
        table = pq.read_table(
            files, columns=columns, filters=[("frame", "in", frames)], filesystem=plan.shards.filesystem
        )
    except pa.ArrowException:
        lacking = lacking_column(plan.shards, files) if latent_shape else {}
        if not lacking:
            raise
        path, what = next(iter(lacking.items()))  # a shard file rewritten since the render was planned
        raise ConsistentAvatarError(
            f"actor {plan.actor!r}, {frame_span([f for f in frames if plan.file_of[f] == path])}: the shard "
            f"file {path} has {what} (the shards changed since prepare?): re-run `cavatar prepare --force "
            "--vae DIR`, or render with --no-shard-latents"
        ) from None
    got = table["frame"].to_pylist()
    missing = sorted(set(frames) - set(got))
    if missing:
        raise ConsistentAvatarError(
            f"frames {missing[:5]} of actor {plan.actor!r} are no longer in the shards: "
            "the shards changed during the render; re-run the render"
        )
    position = {f: i for i, f in enumerate(got)}
    table = table.take(pa.array([position[f] for f in frames]))

    def images(column: str) -> np.ndarray:
        arr = np.stack([decode_png(v) for v in table[column].to_pylist()])
        # contiguous NCHW: the GPU stage wraps it as is, and a padded unit (a concatenation) has
        # these strides too, so a compiled pipeline sees one input layout and does not recompile
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

    def vectors(column: str) -> np.ndarray:
        return np.asarray(table[column].to_pylist(), dtype=np.float32)

    return {
        "coarse_rgb": images("coarse_rgb"),
        "coarse_normal": images("coarse_normal"),
        "pose": vectors("pose"),
        "expression": vectors("expression"),
        "emotion": json.dumps(table["emotion"].to_pylist()),
        "coarse_latent": (
            decode_latents(table[LATENT_COLUMN], latent_shape, actor=plan.actor, frames=frames)
            if latent_shape else NO_LATENT
        ),
    }


def _empty_inputs(resolution: int) -> dict[str, np.ndarray | str]:
    """The payload of a unit that failed to load (zero frames, the shapes of a real one)."""
    image = np.zeros((0, 3, resolution, resolution), dtype=np.uint8)
    return {
        "coarse_rgb": image,
        "coarse_normal": image,
        "pose": np.zeros((0, POSE_DIM), dtype=np.float32),
        "expression": np.zeros((0, EXPRESSION_DIM), dtype=np.float32),
        "emotion": "[]",
        "coarse_latent": NO_LATENT,
    }


def load_units(batch: Mapping[str, Any], spec: JobSpec) -> dict[str, np.ndarray]:
    """Stage 1 (a CPU task): read each unit's rows from the shard files, decode its PNGs."""
    out: dict[str, list[Any]] = defaultdict(list)
    for _, row, actor, frames, error, seconds in _units(batch):
        t0 = time.perf_counter()
        plan = spec.actors[actor]
        inputs = None
        if not error:
            try:
                inputs = _read_unit(plan, frames, plan.latent_shape if plan.rows[row].shard_latent else None)
            except Exception as exc:  # isolate the unit: report, never fail the whole job
                error = _unit_error(exc)
        for key, value in (inputs or _empty_inputs(plan.resolution)).items():
            out[key].append(value)
        out["row"].append(row)
        out["actor"].append(actor)
        out["frames"].append(json.dumps(frames))
        out["error"].append(error)
        out["seconds"].append(seconds + time.perf_counter() - t0)
    return {k: _column(v) for k, v in out.items()}


class FrameRenderer:
    """Stage 2 (the pool actor; one per GPU, or per CPU share): renders loaded work units, each one
    actor × one row × ≤B frames, with one ``ConsistentAvatarPipeline.__call__``; returns the frames as
    (B, 3, H, W) uint8 (their layout in memory; the write stage transposes them) plus what the write
    stage records (timings, sampler, steps, seeds).

    Keeps up to ``cache_size`` actor pipelines loaded (LRU). The constructor does no heavy work and
    cannot fail on bad input (a failing constructor would fail the whole job); bundles load on first use
    and a bundle that does not load fails only its actor's units.
    """

    def __init__(self, spec: JobSpec) -> None:
        import torch

        self.spec = spec
        if spec.use_gpu and torch.cuda.is_available():
            self.device = torch.device("cuda")
            # This process only renders, at a few fixed shapes: let cuDNN pick the fastest conv
            # algorithm per shape once (the VAE's 512² convs are a third of a call). Precision is
            # left alone (no TF32): a float32 render stays float32.
            torch.backends.cudnn.benchmark = True
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, spec.num_threads))
        join_compile_cache(spec.compile_cache, "this pool actor")  # before this process compiles anything
        self.dtype = getattr(torch, spec.dtype)
        self.pipelines: OrderedDict[str, Any] = OrderedDict()
        self.load_errors: dict[str, str] = {}

    # -- loading ---------------------------------------------------------------------------

    def _pipeline(self, actor: str) -> Any:
        if actor in self.load_errors:
            raise ConsistentAvatarError(self.load_errors[actor])
        if actor in self.pipelines:
            self.pipelines.move_to_end(actor)
            return self.pipelines[actor]
        from ..bundle import load_bundle
        from ..pipeline import ConsistentAvatarPipeline

        if self.spec.use_gpu and self.device.type != "cuda":
            raise ConsistentAvatarError(
                "this render asks for GPUs but the pool actor sees no CUDA device: check the node's "
                "drivers, or render on CPU (num_gpus_per_actor=0)"
            )
        plan = self.spec.actors[actor]
        evicted: Any = None
        while len(self.pipelines) >= self.spec.cache_size:
            _, evicted = self.pipelines.popitem(last=False)
        if evicted is not None and not self.spec.compile:
            evicted = None  # nothing to reuse: free its memory before the next bundle loads
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        try:
            bundle = load_bundle(
                plan.bundle, self.device, self.dtype, variants=plan.variants, verify=self.spec.verify
            )
            if self.spec.refine is False:
                refiner: Any = False
            elif self.spec.refiner is not None:
                refiner = self.spec.refiner
            else:
                refiner = True if self.spec.refine else None
            pipe = ConsistentAvatarPipeline.from_bundle(bundle, refiner=refiner)
            if self.spec.compile:
                pipe = self._compiled(pipe, evicted)
        except ConsistentAvatarError as exc:
            self.load_errors[actor] = f"bundle {plan.bundle}: {exc}"
            raise ConsistentAvatarError(self.load_errors[actor]) from exc
        self.pipelines[actor] = pipe
        return pipe

    def _compiled(self, fresh: Any, evicted: Any) -> Any:
        """A compiled pipeline for ``fresh``'s actor: the evicted compiled pipeline takes its weights in
        place (``adopt``: no new compilation or CUDA-graph capture, minutes at sd15 shapes) when both
        have the same preset and networks; otherwise ``fresh`` is compiled."""
        if evicted is not None:
            try:
                return evicted.adopt(fresh)
            except ConsistentAvatarError as exc:
                log.info("compiling a new pipeline for %s: %s", fresh.actor, exc)
        return fresh.compile()

    # -- one unit --------------------------------------------------------------------------

    def _render_unit(
        self, row: str, actor: str, frames: list[int], inputs: Mapping[str, Any]
    ) -> tuple[np.ndarray, Any, list[int]]:
        """(frames as (n, 3, H, W) uint8, the PipelineOutput, per-frame seeds) of one loaded unit."""
        import torch

        rs = self.spec.actors[actor].rows[row]
        pipe = self._pipeline(actor)
        n = len(frames)
        arrays = {k: np.asarray(inputs[k]) for k in ("coarse_rgb", "coarse_normal", "pose", "expression")}
        if rs.shard_latent:  # the shards' latent_tsd_coarse: stage 2 skips its VAE encode
            arrays["coarse_latent"] = np.asarray(inputs["coarse_latent"])
        emotion: list[str] | None = [str(e) for e in json.loads(str(inputs["emotion"]))]
        if any(a.shape[0] != n for a in arrays.values()) or len(emotion) != n:
            raise ConsistentAvatarError(
                f"the loaded unit holds {arrays['coarse_rgb'].shape[0]} frames, not {n}: re-run the render"
            )
        if rs.switches.get("without_emotion"):
            emotion = None  # no lookup: the row must not depend on the bundle knowing the labels
        seeds = [self.spec.seed + f for f in frames]
        pad = self.spec.batch_size - n if self.spec.compile else 0
        if pad > 0:
            # A compiled pipeline compiles (and captures CUDA graphs) once per batch size: pad a short
            # unit with copies of its last frame instead. Per-frame seeds keep each real frame's noise
            # what it would be unpadded; the copies' outputs are dropped.
            arrays = {k: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for k, a in arrays.items()}
            emotion = None if emotion is None else emotion + [emotion[-1]] * pad
            seeds = seeds + [seeds[-1]] * pad
        # Ray Data hands the arrays over read-only (object store memory): copy those, which the
        # pipeline would otherwise share with the store (torch has no read-only tensors).
        x = {k: torch.from_numpy(a if a.flags.writeable else a.copy()) for k, a in arrays.items()}
        latent = x.pop("coarse_latent", None)
        result = pipe(
            **x,
            coarse_latent=None if latent is None else latent.to(device=self.device, dtype=self.dtype),
            emotion=emotion,
            num_steps=rs.steps,
            sampler=rs.sampler,
            seed=seeds,
            refine=self.spec.refine,
            **rs.switches,
        )
        # uint8 and NCHW-contiguous on the pipeline's device, then one plain copy to the host: a compiled
        # GPU pipeline's frames are channels-last in memory, and fixing that layout on the host (a strided
        # copy of 16 frames at 512²) cost tens of ms in this actor. The write task transposes to NHWC (a view).
        u8 = (result.frames[:n].clamp(0, 1) * 255.0).round_().to(torch.uint8)
        images = u8.contiguous().cpu().numpy()
        return images, result, seeds[:n]

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = defaultdict(list)
        for i, row, actor, frames, error, seconds in _units(batch):
            t0 = time.perf_counter()
            r = self.spec.actors[actor].resolution
            images = np.zeros((0, 3, r, r), dtype=np.uint8)
            timings, sampler, steps, seeds, call_batch = "{}", "", 0, "[]", 0
            if not error:
                try:
                    inputs = {k: batch[k][i] for k in _PAYLOAD}
                    images, result, used = self._render_unit(row, actor, frames, inputs)
                    timings = json.dumps({k: float(v) for k, v in result.timings.items()})
                    sampler = str(result.settings["sampler"])
                    steps = int(result.settings["num_steps"])
                    seeds = json.dumps(used)
                    call_batch = int(result.settings["batch"])  # with padding under --compile: > len(frames)
                except Exception as exc:  # isolate the actor: report, never fail the whole job
                    error = _unit_error(exc)
            out["row"].append(row)
            out["actor"].append(actor)
            out["frames"].append(json.dumps(frames))
            out["error"].append(error)
            out["seconds"].append(seconds + time.perf_counter() - t0)
            out["images"].append(images)
            out["timings"].append(timings)
            out["sampler"].append(sampler)
            out["steps"].append(steps)
            out["seeds"].append(seeds)
            out["call_batch"].append(call_batch)
        return {k: _column(v) for k, v in out.items()}


def write_units(batch: Mapping[str, Any], spec: JobSpec) -> dict[str, np.ndarray]:
    """Stage 3 (a CPU task): write each rendered unit's PNGs, then its parquet part (atomically, see
    :func:`.outputs.write_batch`). Returns the job's result rows: row, actor, frames written, seconds
    (all stages), error ("" when the unit is complete)."""
    out: dict[str, list[Any]] = {"row": [], "actor": [], "frames": [], "seconds": [], "error": []}
    for i, row, actor, frames, error, seconds in _units(batch):
        t0 = time.perf_counter()
        done = 0
        if not error:
            try:
                plan = spec.actors[actor]
                write_batch(
                    spec.out,
                    row=row,
                    actor=actor,
                    frames=frames,
                    splits=[plan.splits[f] for f in frames],
                    images=np.asarray(batch["images"][i]).transpose(0, 2, 3, 1),  # NCHW → NHWC (a view)
                    timings=json.loads(str(batch["timings"][i])),
                    sampler=str(batch["sampler"][i]),
                    steps=int(batch["steps"][i]),
                    seeds=json.loads(str(batch["seeds"][i])),
                    settings=plan.rows[row].settings,
                    call_batch=int(batch["call_batch"][i]) if "call_batch" in batch else None,
                )
                done = len(frames)
            except Exception as exc:  # isolate the unit: report, never fail the whole job
                error = _unit_error(exc)
        out["row"].append(row)
        out["actor"].append(actor)
        out["frames"].append(done)
        out["seconds"].append(seconds + time.perf_counter() - t0)
        out["error"].append(error)
    return {k: np.asarray(v) for k, v in out.items()}


def render_units_locally(
    spec: JobSpec, batch: Mapping[str, Any], renderer: FrameRenderer | None = None
) -> dict[str, np.ndarray]:
    """The three stages in this process, one after the other (what the Ray Data job runs, without
    Ray): for tests and debugging. ``renderer``: a FrameRenderer to reuse (its loaded pipelines)."""
    return write_units((renderer or FrameRenderer(spec))(load_units(batch, spec)), spec)


def _video_task(out: str, row: str, plan: ActorPlan, fps: float) -> str:
    """Write ``OUT/<row>/<actor>/<actor>.mp4`` (coarse | ours | real) for every frame of the split,
    streaming one frame at a time from the shard files and the PNGs."""
    import cv2

    def ours(f: int) -> np.ndarray:
        img = cv2.imread(str(frame_png(out, row, plan.actor, f)), cv2.IMREAD_COLOR)
        if img is None:
            raise ConsistentAvatarError(f"{frame_png(out, row, plan.actor, f)} is missing or unreadable")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def triples() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        wanted = set(plan.frames)
        by_file: dict[str, list[int]] = defaultdict(list)
        for f in plan.frames:
            by_file[plan.file_of[f]].append(f)
        for path in sorted(by_file, key=lambda p: min(by_file[p])):
            table = pq.read_table(
                path, columns=["frame", "coarse_rgb", "real_rgb"], filesystem=plan.shards.filesystem
            ).sort_by("frame")
            for f, coarse, real in zip(
                table["frame"].to_pylist(), table["coarse_rgb"].to_pylist(), table["real_rgb"].to_pylist()
            ):
                if f in wanted:
                    yield decode_png(coarse), ours(f), decode_png(real)

    path = video_path(out, row, plan.actor)
    n = write_side_by_side_video(path, triples(), fps)
    if n != len(plan.frames):
        raise ConsistentAvatarError(f"{path}: wrote {n} of {len(plan.frames)} frames (shards changed?)")
    return str(path)


# ---------------------------------------------------------------------------------------------
# Driver: checks
# ---------------------------------------------------------------------------------------------


@dataclass
class _BundleInfo:
    manifest: Any  # BundleManifest
    resolution: int
    preset: str
    labels: tuple[str, ...]
    fingerprint: str
    vae: BundleVAE


def bundle_location(bundles: str | os.PathLike[str], actor: str) -> str:
    """``<bundles>/<actor>`` for a local folder or a pyarrow URI (s3://…, gs://…)."""
    text = absolute_or_uri(bundles)
    return f"{text.rstrip('/')}/{actor}" if is_uri(text) else str(Path(text) / actor)


def _inspect_bundle(location: str) -> _BundleInfo:
    """The small files of a bundle (manifest, preset, emotion labels, VAE config), without loading
    weights; a remote bundle's four files are fetched into a temporary folder."""
    from ..bundle import EMOTIONS_FILE, MANIFEST_FILE, PRESET_FILE, VAE_DIR, read_manifest
    from ..models.presets import parse_preset
    from ..vae_identity import CONFIG_FILE, latent_config

    vae_config_file = f"{VAE_DIR}/{CONFIG_FILE}"

    def vae_of(root: Path, manifest: Any, preset: Any) -> BundleVAE:
        try:  # unreadable: no shard latents; loading the bundle will say what is wrong
            config: dict[str, Any] | None = json.loads((root / vae_config_file).read_text())
        except (OSError, json.JSONDecodeError):
            config = None
        shift = latent_config(config).get("shift_factor") if isinstance(config, dict) else None
        return BundleVAE(
            identity=manifest.vae_identity if isinstance(config, dict) else None,
            latent_shape=(preset.latent_channels, preset.latent_size, preset.latent_size),
            tsd=manifest.tsd.model_dump(),
            shift_factor=shift,
        )

    def inspect(root: Path) -> _BundleInfo:
        manifest = read_manifest(root)
        try:
            preset = parse_preset(json.loads((root / PRESET_FILE).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConsistentAvatarError(f"bundle {location}: {PRESET_FILE} is unreadable ({exc}): export it again") from exc
        try:
            labels = tuple(pq.read_table(root / EMOTIONS_FILE, columns=["label"])["label"].to_pylist())
        except (OSError, pa.ArrowException) as exc:
            raise ConsistentAvatarError(f"bundle {location}: {EMOTIONS_FILE} is unreadable ({exc}): export it again") from exc
        digest = hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
        vae = vae_of(root, manifest, preset)
        return _BundleInfo(manifest, preset.resolution, preset.name, labels, digest, vae)

    if not is_uri(location):
        return inspect(Path(location))
    from pyarrow import fs as pafs

    fs, path = resolve_filesystem(location, what="bundle")
    with tempfile.TemporaryDirectory(prefix="cavatar-bundle-") as tmp:
        root = Path(tmp) / "bundle"
        root.mkdir()
        for name in (MANIFEST_FILE, PRESET_FILE, EMOTIONS_FILE, vae_config_file):
            info = fs.get_file_info(f"{path.rstrip('/')}/{name}")
            if info.type == pafs.FileType.File:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(info.path) as src:
                    (root / name).write_bytes(src.read())
        if not (root / MANIFEST_FILE).is_file():
            raise ConsistentAvatarError(f"no bundle at {location} (no {MANIFEST_FILE}): export it with `cavatar train`")
        return inspect(root)


def resolve_sampling(row: str, config: RenderConfig, manifest: Any) -> tuple[str, int, str]:
    """(sampler, steps, variant) for ``row`` under ``config`` and a bundle manifest.

    Mirrors the pipeline's defaults (``ConsistentAvatarPipeline._resolve_sampling``) so that they are
    known, checked and recorded before rendering; the pool actors pass them explicitly. Raises when
    the bundle lacks the weights the row needs.
    """
    sw = row_switches(row)
    s = manifest.sampling
    held = {stage: set(entry.variants) for stage, entry in manifest.stages.items()}
    has_lcm = "lcm" in held.get("fcsd", set()) and (sw["baseline"] or "lcm" in held.get("tsdm", set()))
    if sw["without_lcm"]:
        kind = config.teacher_sampler or s.teacher_sampler
        steps = config.teacher_steps or s.teacher_steps
    else:
        if config.sampler is not None:
            kind = config.sampler
        elif s.sampler == "lcm" and not has_lcm:
            kind = s.teacher_sampler  # a bundle without students: its teachers
        else:
            kind = s.sampler
        if config.steps is not None:
            steps = config.steps
        elif kind == "lcm":
            steps = s.num_steps
        else:
            steps = config.teacher_steps or s.teacher_steps
    variant = "lcm" if kind == "lcm" else "teacher"
    needed = ["fcsd"] + ([] if sw["baseline"] else ["tsdm"])
    lacking = [stage for stage in needed if variant not in held.get(stage, set())]
    if lacking:
        what = "LCM student" if variant == "lcm" else "teacher"
        raise ConsistentAvatarError(
            f"row {row!r} samples with {kind!r}, which needs the {what} weights of {', '.join(lacking)}, "
            f"but the bundle holds {sorted(held.get(lacking[0], set()))}: "
            + ("choose --sampler ddim" if variant == "lcm" else "drop that row or export the teachers too")
        )
    return kind, int(steps), variant


def _shard_index(
    shards: Shards, files: list[str], split: str
) -> tuple[list[int], dict[int, str], dict[int, str], set[str]]:
    """(frames, split per frame, file per frame, emotion labels) of one actor's rows in ``split``;
    ``files`` are paths on ``shards.filesystem``."""
    frames: list[int] = []
    splits: dict[int, str] = {}
    file_of: dict[int, str] = {}
    labels: set[str] = set()
    for path in files:
        t = pq.read_table(path, columns=["frame", "split", "emotion"], filesystem=shards.filesystem)
        for f, s, e in zip(t["frame"].to_pylist(), t["split"].to_pylist(), t["emotion"].to_pylist()):
            if split != "all" and s != split:
                continue
            frames.append(int(f))
            splits[int(f)] = s
            file_of[int(f)] = str(path)
            labels.add(e)
    return sorted(frames), splits, file_of, labels


def _check_inputs(
    shards: str | os.PathLike[str] | Shards, bundles: str, config: RenderConfig
) -> tuple[dict[str, Any], dict[str, ActorPlan]]:
    """Every input check (see the module docstring, step 1); returns the shard manifest and plans.
    ``shards``: a path, a pyarrow filesystem URI, or shards already resolved by ``open_shards``."""
    shards = open_shards(shards)
    manifest = load_manifest(shards)
    known = sorted(manifest.get("actors", {}))
    actors = config.actors or known
    if not actors:
        raise ConsistentAvatarError(f"{shards} holds no prepared actors: run `cavatar prepare` first")
    unknown = [a for a in actors if a not in manifest["actors"]]
    if unknown:
        raise ConsistentAvatarError(
            f"actor(s) {unknown} are not in {shards} (prepared actors: {', '.join(known) or 'none'}): "
            "fix --actors, or prepare them"
        )
    resolution = manifest.get("resolution")
    problems: list[str] = []
    plans: dict[str, ActorPlan] = {}
    emotion_needed = any(not row_switches(r)["without_emotion"] for r in config.rows)
    for actor in actors:
        entry = manifest["actors"][actor]
        try:
            _, files = actor_parts(shards, actor)
        except ConsistentAvatarError as exc:
            problems.append(str(exc))
            continue
        frames, splits, file_of, labels = _shard_index(shards, files, config.split)
        if not frames:
            problems.append(f"actor {actor!r} has no {config.split!r} frames in {shards}: choose another --split")
            continue
        shard_res = int(entry.get("resolution") or resolution)
        location = bundle_location(bundles, actor)
        try:
            info = _inspect_bundle(location)
        except ConsistentAvatarError as exc:
            problems.append(f"actor {actor!r}: {exc}")
            continue
        if info.manifest.actor != actor:
            problems.append(
                f"the bundle at {location} is the bundle of actor {info.manifest.actor!r}, not {actor!r}: "
                f"put {actor!r}'s bundle there (as `cavatar train` exports it: <bundles>/<actor>)"
            )
            continue
        if info.resolution != shard_res:
            problems.append(
                f"actor {actor!r}: the bundle renders {info.resolution}² (preset {info.preset!r}) but the "
                f"shards are {shard_res}²: prepare the shards with `cavatar prepare --res {info.resolution}`, "
                "or use bundles trained on these shards"
            )
            continue
        if emotion_needed:
            unknown_labels = sorted(labels - set(info.labels))
            if unknown_labels:
                problems.append(
                    f"actor {actor!r}: the shards label frames {unknown_labels}, which the bundle's emotion "
                    f"table ({list(info.labels)}) lacks: use shards and bundles of the same emotion labels"
                )
                continue
        rows: dict[str, RowSettings] = {}
        variants: set[str] = set()
        shard_keys = ("source_fingerprint", "config_fingerprint", "frames", "train", "test", "resolution")
        shard_fp = fingerprint_of({k: entry.get(k) for k in shard_keys})
        latent_note = _latent_note(config, shards, entry, manifest, info.vae, files)
        use_latents = not latent_note
        try:
            for row in config.rows:
                kind, steps, variant = resolve_sampling(row, config, info.manifest)
                variants.add(variant)
                switches = row_switches(row)
                settings = {
                    "row": row,
                    **switches,
                    "sampler": kind,
                    "steps": steps,
                    "seed": config.seed,
                    "dtype": config.torch_dtype_name,
                    # A GPU draws its noise on the GPU (other values than a CPU for the same seed): frames
                    # from a CPU render are not resumed by a GPU one, or the reverse. CPU renders carry no
                    # key, so their settings are what they were before GPU noise existed.
                    **({"noise": "cuda"} if config.use_gpu else {}),
                    "refine": config.refine,
                    "refiner": config.refiner,
                    "bundle": info.fingerprint,
                    "shards": shard_fp,
                }
                # Frames from the shards' latents differ from encoded ones by their fp16 rounding: recorded,
                # so that a resume does not mix the two. Absent when encoding (earlier renders' settings).
                from_shards = use_latents and not switches["baseline"]  # baseline has no stage 2
                if from_shards:
                    settings[SETTING] = FROM_SHARDS
                rows[row] = RowSettings(
                    row, kind, steps, {k: v for k, v in switches.items() if v}, settings, from_shards
                )
        except ConsistentAvatarError as exc:
            problems.append(f"actor {actor!r} (bundle {location}): {exc}")
            continue
        if config.refine is True and info.manifest.refiner is None and config.refiner is None:
            problems.append(f"actor {actor!r}: refine is on but its bundle references no refiner: pass --refiner DIR")
            continue
        held = [set(e.variants) for e in info.manifest.stages.values()]
        load = tuple(v for v in ("teacher", "lcm") if v in variants)
        plans[actor] = ActorPlan(
            actor=actor,
            shards=shards,
            bundle=location,
            bundle_fingerprint=info.fingerprint,
            variants=load if all(set(load) <= h for h in held) else None,
            resolution=shard_res,
            frames=tuple(frames),
            splits=splits,
            file_of=file_of,
            rows=rows,
            latent_shape=info.vae.latent_shape if use_latents else None,
            latent_note=latent_note,
        )
    if config.refiner is not None and not is_uri(config.refiner) and not Path(config.refiner).is_dir():
        problems.append(f"refiner {config.refiner} is not a directory")
    if problems:
        raise ConsistentAvatarError(
            "cannot render:\n  " + "\n  ".join(problems) + "\n(nothing was rendered; fix the above and re-run)"
        )
    return manifest, plans


def _latent_note(
    config: RenderConfig,
    shards: Shards,
    entry: Mapping[str, Any],
    manifest: Mapping[str, Any],
    vae: BundleVAE,
    files: Sequence[str],
) -> str:
    """Why stage 2 must encode this actor's coarse TSD itself; "" when the shards' latents are provably
    its bundle's own (see :mod:`.latents`) and every one of its shard ``files`` holds them."""
    from ..tsd import TSDConfig

    raw = entry.get("tsd", manifest.get("tsd"))
    try:
        shards_tsd = TSDConfig(**raw).model_dump() if isinstance(raw, dict) else None
    except (ConsistentAvatarError, TypeError):  # a manifest this version cannot read: not provable
        shards_tsd = None
    note = why_not(
        enabled=config.shard_latents, rows=[row_switches(r) for r in config.rows], entry=entry,
        shards_tsd=shards_tsd, bundle=vae,
    )
    return note or column_note(shards, [str(f) for f in files])


def _check_out(out: Path, shards: str, config: RenderConfig) -> dict[str, Any] | None:
    previous = read_render_manifest(out)
    if previous is not None and previous.get("split") != config.split:
        raise ConsistentAvatarError(
            f"{out} holds renders of the {previous.get('split')!r} split; render the {config.split!r} split "
            "into another --out (the layout has one split per output folder)"
        )
    if previous is not None and previous.get("shards") != shards:
        log.warning("%s was rendered from shards %s; now %s", out, previous.get("shards"), shards)
    return previous


# ---------------------------------------------------------------------------------------------
# Driver: the run
# ---------------------------------------------------------------------------------------------


@dataclass
class RenderReport:
    """What one run did. ``rendered`` / ``kept``: frames per row per actor rendered by this run /
    already there; ``failed``: actor → what went wrong (its other frames are kept); ``shard_latents``:
    actor → "" when stage 2 takes the shards' coarse-TSD latents, else why it encodes them."""

    out: Path
    split: str
    rows: list[str]
    actors: list[str]
    rendered: dict[str, dict[str, int]] = field(default_factory=dict)
    kept: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    videos: list[Path] = field(default_factory=list)
    shard_latents: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    render_seconds: float = 0.0
    seconds: float = 0.0
    manifest: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        lines = [("row", "actor", "rendered", "kept", "missing", "status")]
        for row in self.rows:
            for actor in self.actors:
                n = self.rendered.get(row, {}).get(actor, 0)
                k = self.kept.get(row, {}).get(actor, 0)
                m = self.missing.get(row, {}).get(actor, 0)
                status = "FAILED" if m else ("rendered" if n else "up to date")
                lines.append((row, actor, str(n), str(k), str(m), status))
        widths = [max(len(r[i]) for r in lines) for i in range(6)]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
        for actor, msg in self.failed.items():
            text.append(f"FAILED {actor}: {msg.splitlines()[0][:200]}")
        text += latents_summary(self.shard_latents)
        fps = self.frames / self.render_seconds if self.render_seconds > 0 else 0.0
        text.append(
            f"{self.frames} frames rendered in {self.seconds:.1f} s ({fps:.2f} frames/s in the render stage) → {self.out}"
        )
        return "\n".join(text)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One render at a time per OUT (an advisory lock, released even when the process is killed)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConsistentAvatarError(
                f"another `cavatar render` ({holder}) is writing into {out}: wait for it, or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pool(config: RenderConfig, units: int) -> Any:
    """The ActorPoolStrategy: the configured size, else what the cluster's CPUs or GPUs fit."""
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu:
        gpus = float(resources.get("GPU", 0.0))
        if gpus < config.num_gpus_per_actor:
            if config.concurrency is None:
                raise ConsistentAvatarError(
                    f"each pool actor asks for {config.num_gpus_per_actor} GPU(s) but the Ray cluster has {gpus:g} "
                    "now: pass --concurrency N (or MIN:MAX) to wait for an autoscaler to add GPU nodes, lower "
                    "--gpus-per-actor, or render on CPU (--gpus-per-actor 0)"
                )
            # An explicit pool size on a cluster that scales GPU nodes from zero (KubeRay): the pool
            # actors stay pending until the autoscaler provides the GPUs.
            log.warning(
                "the Ray cluster has %g GPU(s) now, the render pool asks for %g per actor: waiting for the "
                "autoscaler to add GPU nodes", gpus, config.num_gpus_per_actor,
            )
        fit = int(gpus // config.num_gpus_per_actor)
    else:
        fit = int(float(resources.get("CPU", 1.0)) // config.num_cpus_per_actor)
    if isinstance(config.concurrency, tuple):
        lo, hi = config.concurrency
        hi = max(1, min(hi, units))
        return ray.data.ActorPoolStrategy(min_size=min(lo, hi), max_size=hi)
    size = config.concurrency or max(1, fit)
    return ray.data.ActorPoolStrategy(size=max(1, min(size, units)))


@dataclass(frozen=True)
class _Resources:
    """What the job asks Ray for: the pool (its actors' CPUs and GPUs) and the I/O tasks."""

    pool: Any  # ray.data.ActorPoolStrategy
    actor_cpus: float
    actor_gpus: float
    io_cpus: float
    io_tasks: int | None  # at most this many load (and as many write) tasks at a time; None: Ray Data's choice


_UNIT = 10_000  # Ray counts CPUs and GPUs in 1e-4 steps


def _nodes() -> list[tuple[int, int]]:
    """(CPUs, GPUs) of each alive node of the Ray cluster, in Ray's 1e-4 units."""
    import ray

    out = []
    for node in ray.nodes():
        if node.get("Alive", node.get("alive", True)):
            res = node.get("Resources") or {}
            out.append((round(float(res.get("CPU", 0.0)) * _UNIT), round(float(res.get("GPU", 0.0)) * _UNIT)))
    return out


def _actor_share(
    nodes: list[tuple[int, int]], size: int, cpus: float, gpus: float, reserve: float, all_now: bool
) -> float | None:
    """The largest CPU request per pool actor, at most ``cpus``, under which every node that has more
    than ``reserve`` CPUs keeps ``reserve`` of them free however many actors Ray packs onto it (the
    most that fit there by CPUs and GPUs, at most ``size``), and — when ``all_now`` — the cluster
    holds all ``size`` actors now. None when no share does."""
    import heapq

    want, res_u, gpu_u = round(cpus * _UNIT), round(reserve * _UNIT), round(gpus * _UNIT)
    eligible = []
    for cpu_n, gpu_n in nodes:
        gpu_fit = size if not gpu_u else min(size, gpu_n // gpu_u)
        if cpu_n > res_u and gpu_fit > 0:
            eligible.append((cpu_n, gpu_fit))
    if not eligible:
        return None

    def fits(share: int) -> bool:
        held = 0
        for cpu_n, gpu_fit in eligible:
            placed = min(gpu_fit, cpu_n // share)  # what Ray may place on the node at this share
            if cpu_n - placed * share < res_u:
                return False
            held += placed
        return held >= size or not all_now

    # The best share is the request itself or one that fills a node exactly up to its reserve:
    # (cpu_n - reserve) / k for k actors on node n. Try them from the largest down.
    def candidates(cpu_n: int, gpu_fit: int) -> Iterator[int]:
        for k in range(1, gpu_fit + 1):
            yield -((cpu_n - res_u) // k)

    seen = 0
    for neg in heapq.merge([-want], *(candidates(c, g) for c, g in eligible)):
        share = -neg
        if share <= 0:
            break
        if share > want or share == seen:
            continue
        seen = share
        if fits(share):
            return share / _UNIT
    return None


def _resources(config: RenderConfig, units: int) -> _Resources:
    """Size the pool and the I/O stages so that they fit together (see the module docstring).

    Pool actors hold their CPUs for the whole job; the load and write tasks can only run on CPUs no
    pool actor holds, and Ray places actors node by node. So a pool actor asks Ray for
    ``num_cpus_per_actor`` CPUs, or less (its torch thread count stays ``num_cpus_per_actor``): the
    largest share under which every node with more than ``2 × io_cpus`` CPUs keeps ``2 × io_cpus``
    free (one load and one write task) with as many actors as Ray can put on it (by its CPUs and
    GPUs, at most the pool size), and under which the cluster holds the whole pool now. A pool that
    may grow later — ``--concurrency MIN:MAX``, or a GPU pool waiting for an autoscaler's GPU nodes —
    need not fit now, and its I/O task count is left to Ray Data (nodes that join bring CPUs); when
    no node present can hold an actor yet, it asks for ``num_cpus_per_actor`` and the nodes the
    autoscaler adds must leave room for the I/O tasks themselves.
    """
    import ray

    pool = _pool(config, units)
    size = int(pool.max_size)
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0.0))
    reserve = 2 * config.io_cpus
    gpus = config.num_gpus_per_actor if config.use_gpu else 0.0
    waiting = bool(gpus) and float(resources.get("GPU", 0.0)) < size * gpus
    growing = waiting or isinstance(config.concurrency, tuple)
    share = _actor_share(_nodes(), size, config.num_cpus_per_actor, gpus, reserve, all_now=not growing)
    if share is None:
        if not growing:
            raise ConsistentAvatarError(
                f"the Ray cluster has {cpus:g} CPU(s): not enough for {size} pool actor(s) and the load and "
                f"write tasks ({config.io_cpus:g} CPU each) on any node (each node needs "
                f"{reserve:g} CPU free beside its pool actors): lower --concurrency, --cpus-per-actor or "
                "--io-cpus, or add CPUs"
            )
        log.warning(
            "no node of the Ray cluster can hold a pool actor (%g CPU%s) and the load and write tasks "
            "(%g CPU) now: waiting for the autoscaler to add nodes; each must have more than %g CPU per "
            "pool actor it holds plus %g for the I/O tasks",
            config.num_cpus_per_actor, f", {gpus:g} GPU" if gpus else "", reserve,
            config.num_cpus_per_actor, reserve,
        )
        share = config.num_cpus_per_actor
    actor_cpus = share
    # A task decodes or encodes one PNG at a time: one core. A pool that may grow leaves the count to
    # Ray Data: the nodes that join bring CPUs.
    io_tasks: int | None = None if growing else max(2, math.ceil(cpus))
    if io_tasks in (None, size) and actor_cpus == config.io_cpus and not gpus:
        # Ray Data fuses a task stage into the actor pool after it when both ask for the same resources
        # and the task pool is unbounded or as large as the actor pool: loading would run inside the
        # pool actors, serially again. A bound one above the pool keeps the stages apart.
        io_tasks = size + 1
    return _Resources(pool, actor_cpus, config.num_gpus_per_actor, config.io_cpus, io_tasks)


def _pool_size_text(pool: Any) -> str:
    lo, hi = int(pool.min_size), int(pool.max_size)
    return str(hi) if lo == hi else f"{lo}–{hi}"


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": _platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import ray

        info["ray"] = ray.__version__
        if ray.is_initialized():
            info["cluster"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return info


def _row_summary(config: RenderConfig, per_actor: Mapping[str, Mapping[str, Any]], row: str) -> dict[str, Any]:
    samplers = {v["sampler"] for v in per_actor.values()}
    steps = {v["steps"] for v in per_actor.values()}
    return {
        **row_switches(row),
        "sampler": samplers.pop() if len(samplers) == 1 else None,
        "steps": steps.pop() if len(steps) == 1 else None,
        "seed": config.seed,
        "seed_rule": "seed + frame",
        "dtype": config.torch_dtype_name,
        "refine": config.refine,
        "refiner": config.refiner,
        "per_actor": dict(sorted(per_actor.items())),
    }


def _fail(report: RenderReport, actor: str, message: str) -> None:
    report.failed[actor] = f"{report.failed[actor]}; {message}" if actor in report.failed else message


def _plan_units(
    out: Path, plans: Mapping[str, ActorPlan], config: RenderConfig, report: RenderReport
) -> list[dict[str, Any]]:
    """Scan what OUT holds (refusing frames of other settings unless ``force``) and cut what is missing
    into work units: one row, one actor, at most ``batch_size`` frames each, actor-major (so a pool
    actor keeps using the pipeline it has loaded)."""
    for stale in remove_stale_staging(out):
        log.info("removed a leftover of an interrupted run: %s", stale)
    scans: dict[tuple[str, str], OutputsScan] = {}
    problems: list[str] = []
    for actor, plan in plans.items():
        for row, rs in plan.rows.items():
            d = actor_dir(out, row, actor)
            for leftover in remove_stale_staging(d) + remove_stale_staging(d / FRAMES_DIR):
                log.info("removed a leftover of an interrupted run: %s", leftover)
            scans[(row, actor)] = scan = scan_outputs(out, row, actor, rs.settings)
            if scan.stale and not config.force:
                problems.append(f"{d} holds frames rendered with other settings ({next(iter(scan.stale.values()))})")
    if problems:
        raise ConsistentAvatarError(
            "will not mix frames rendered with different settings:\n  "
            + "\n  ".join(problems)
            + "\npass --force to re-render them with these settings, or choose another --out"
        )
    units: list[dict[str, Any]] = []
    for actor, plan in plans.items():
        for row in plan.rows:
            done = set() if config.force else scans[(row, actor)].frames
            report.kept.setdefault(row, {})[actor] = len(done & set(plan.frames))
            missing = [f for f in plan.frames if f not in done]
            for i in range(0, len(missing), config.batch_size):
                units.append({"row": row, "actor": actor, "frames": json.dumps(missing[i : i + config.batch_size])})
    return units


def _run_pool(
    out: Path, plans: dict[str, ActorPlan], units: list[dict[str, Any]], config: RenderConfig, report: RenderReport
) -> tuple[dict[tuple[str, str], list[str]], str | None, bool]:
    """The Ray Data job. Returns the errors per (row, actor), the job's own error if it failed as a
    whole, and whether it was interrupted; what it rendered is on disk either way."""
    import ray
    from tqdm.auto import tqdm

    spec = JobSpec(
        out=str(out),
        actors=plans,
        seed=config.seed,
        use_gpu=config.use_gpu,
        dtype=config.torch_dtype_name,
        num_threads=max(1, int(config.num_cpus_per_actor)),
        compile=config.compile,
        compile_cache=config.compile_cache,
        batch_size=config.batch_size,
        refine=config.refine,
        refiner=config.refiner,
        cache_size=config.cache_size,
        verify=config.verify_bundles,
    )
    res = _resources(config, len(units))
    io = ray.data.TaskPoolStrategy(size=res.io_tasks)
    shrunk = res.actor_cpus < config.num_cpus_per_actor
    at_a_time = f"≤ {res.io_tasks} at a time" if res.io_tasks else "as many as Ray Data runs"
    log.info(
        "render stages: load (%g CPU per task, %s) → %s pool actor(s) (%g CPU%s each%s) → "
        "write (%g CPU per task, %s)",
        res.io_cpus, at_a_time, _pool_size_text(res.pool), res.actor_cpus,
        f", {res.actor_gpus:g} GPU" if res.actor_gpus else "",
        f", not {config.num_cpus_per_actor:g}: CPUs left for the I/O tasks on each node" if shrunk else "",
        res.io_cpus, at_a_time,
    )
    # One unit per block and per batch at every stage: a unit is one pipeline call, and a unit that
    # failed somewhere is one result row.
    ds = (
        ray.data.from_items(units, override_num_blocks=len(units))
        .map_batches(load_units, fn_kwargs={"spec": spec}, batch_size=1, compute=io, num_cpus=res.io_cpus)
        .map_batches(
            FrameRenderer,
            fn_constructor_kwargs={"spec": spec},
            batch_size=1,
            compute=res.pool,
            num_cpus=res.actor_cpus,
            num_gpus=res.actor_gpus or None,
        )
        .map_batches(write_units, fn_kwargs={"spec": spec}, batch_size=1, compute=io, num_cpus=res.io_cpus)
    )
    errors: dict[tuple[str, str], list[str]] = defaultdict(list)
    job_error: str | None = None
    interrupted = False
    total = sum(len(json.loads(u["frames"])) for u in units)
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="frame", desc="render", disable=not config.progress)
    try:
        for summary in ds.iter_rows():
            row, actor, n = str(summary["row"]), str(summary["actor"]), int(summary["frames"])
            per_row = report.rendered.setdefault(row, {})
            per_row[actor] = per_row.get(actor, 0) + n
            report.frames += n
            if summary["error"]:
                errors[(row, actor)].append(str(summary["error"]))
            bar.update(n)
            bar.set_postfix_str(f"{actor} {row}")
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:  # the job as a whole failed: keep what was rendered, report
        job_error = f"the Ray Data job failed: {type(exc).__name__}: {exc}"
        log.error("%s", job_error)
    finally:
        bar.close()
    report.render_seconds = time.perf_counter() - t0
    return errors, job_error, interrupted


def _merge_and_check(
    out: Path,
    plans: Mapping[str, ActorPlan],
    errors: Mapping[tuple[str, str], list[str]],
    job_error: str | None,
    report: RenderReport,
) -> dict[tuple[str, str], int]:
    """Merge every (row, actor)'s parts into outputs.parquet; an incomplete one fails its actor with
    the first error its batches reported. Returns the frames present per (row, actor)."""
    counts: dict[tuple[str, str], int] = {}
    for actor, plan in plans.items():
        for row, rs in plan.rows.items():
            table = compact_outputs(out, row, actor, rs.settings)
            counts[(row, actor)] = len(set(table["frame"].to_pylist()) & set(plan.frames))
            missing = len(plan.frames) - counts[(row, actor)]
            report.missing.setdefault(row, {})[actor] = missing
            if missing:
                why = errors.get((row, actor)) or [job_error or "not rendered (interrupted?)"]
                more = f" (+{len(why) - 1} more failed batches)" if len(why) > 1 else ""
                _fail(report, actor, f"row {row}: {missing} of {len(plan.frames)} frames missing: {why[0].strip()}{more}")
    return counts


def _write_videos(out: Path, plans: Mapping[str, ActorPlan], config: RenderConfig, report: RenderReport) -> None:
    """One Ray task per complete (row, actor) whose frames changed in this run or that has no mp4 yet."""
    import ray

    t0 = time.perf_counter()
    task = ray.remote(num_cpus=1, max_retries=1)(_video_task)
    refs = []
    for actor, plan in plans.items():
        for row in plan.rows:
            if report.missing[row][actor]:
                continue
            path = video_path(out, row, actor)
            if report.rendered.get(row, {}).get(actor, 0) > 0 or config.force or not path.is_file():
                refs.append((row, actor, task.remote(str(out), row, plan, config.fps)))
            else:
                report.videos.append(path)
    for row, actor, ref in refs:
        try:
            report.videos.append(Path(ray.get(ref)))
        except Exception as exc:  # a video failure is the actor's failure; its frames stay
            _fail(report, actor, f"row {row}: the mp4 was not written: {getattr(exc, 'cause', None) or exc}")
    if refs:
        log.info("wrote %d mp4(s) in %.1f s", len(refs), time.perf_counter() - t0)


def render(
    shards: str | os.PathLike[str],
    bundles: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: RenderConfig | None = None,
    *,
    command: str | None = None,
) -> RenderReport:
    """Render ``config.rows`` for the actors of ``shards`` (split ``config.split``) with the bundles at
    ``<bundles>/<actor>`` into ``out``; only what is missing is rendered. ``shards`` and ``bundles`` are
    local paths or pyarrow filesystem URIs; ``out`` must be a local or shared-filesystem path. Starts a local Ray when none
    is running (``RAY_ADDRESS`` is honoured). Input problems raise :class:`ConsistentAvatarError`
    before any Ray work; per-actor failures are in the report (``report.failed``), never raised.
    ``command``: recorded in the manifest (default: this process's command line)."""
    config = config or RenderConfig()
    t_start = time.perf_counter()
    out_path = require_local_dir(
        out, "OUT",
        "render keeps its resume lock there (fcntl) and publishes every PNG and parquet part by an atomic "
        "rename, which object stores do not offer; render into a local or shared folder and copy it to "
        "the bucket afterwards (SHARDS and BUNDLES may be URIs)",
    )
    if config.compile_cache is not None:  # a bad folder fails here, before any Ray work
        config = config.model_copy(update={"compile_cache": str(check_compile_cache(config.compile_cache))})
    store = open_shards(shards)  # resolved once: the plans carry its filesystem to every task
    bundles_text = absolute_or_uri(bundles)

    _, plans = _check_inputs(store, os.fspath(bundles), config)
    report = RenderReport(out=out_path, split=config.split, rows=list(config.rows), actors=list(plans))
    report.shard_latents = {a: p.latent_note for a, p in plans.items()}
    for line in latents_summary(report.shard_latents):
        log.info("%s", line)

    with _locked(out_path):
        # Read under the lock: a render that held it until a moment ago may just have rewritten the
        # manifest, and this run merges its own over what it reads here.
        previous = _check_out(out_path, store.location, config)
        units = _plan_units(out_path, plans, config, report)
        log.info(
            "render: %d actor(s) × %d row(s) of the %s split: %d frame(s) to render in %d batch(es), %d kept",
            len(plans), len(config.rows), config.split, sum(len(json.loads(u["frames"])) for u in units),
            len(units), sum(sum(v.values()) for v in report.kept.values()),
        )
        needs_video = config.video and any(
            not video_path(out_path, row, a).is_file() for a, p in plans.items() for row in p.rows
        )
        if units or needs_video:
            from ..cluster import check_shared_folder, ensure_ray

            ensure_ray(include_dashboard=False)  # honours RAY_ADDRESS; a local Ray otherwise
            check_shared_folder(out_path, "OUT")  # write tasks on any node write here by path
        errors: dict[tuple[str, str], list[str]] = {}
        job_error: str | None = None
        interrupted = False
        if units:
            errors, job_error, interrupted = _run_pool(out_path, plans, units, config, report)
        counts = _merge_and_check(out_path, plans, errors, job_error, report)
        if config.video and not interrupted and (units or needs_video):
            _write_videos(out_path, plans, config, report)
        elif config.video:
            report.videos = [video_path(out_path, r, a) for a, p in plans.items() for r in p.rows
                             if video_path(out_path, r, a).is_file()]
        manifest = _merged_manifest(previous, config, plans, counts, report, store.location, bundles_text, command)
        report.manifest = write_render_manifest(out_path, manifest)
        if interrupted:
            raise ConsistentAvatarError(
                f"render interrupted: {sum(counts.values())} frames are complete in {out_path} and kept; "
                "re-run the same command to render the rest"
            )
    report.seconds = time.perf_counter() - t_start
    log.info("render outputs: %s (manifest %s)", out_path, report.manifest)
    return report


def _merged_manifest(
    previous: Mapping[str, Any] | None,
    config: RenderConfig,
    plans: Mapping[str, ActorPlan],
    counts: Mapping[tuple[str, str], int],
    report: RenderReport,
    shards: str,
    bundles: str,
    command: str | None,
) -> dict[str, Any]:
    """This run's manifest merged over the previous one: OUT keeps describing everything it holds."""
    prev = dict(previous or {})
    actors: dict[str, Any] = {k: dict(v) for k, v in (prev.get("actors") or {}).items()}
    for actor, plan in plans.items():
        entry = actors.get(actor, {})
        rendered = dict(entry.get("rendered") or {})
        failed = dict(entry.get("failed") or {})
        for row in plan.rows:
            rendered[row] = counts[(row, actor)]
            missing = report.missing.get(row, {}).get(actor, 0)
            if missing:
                failed[row] = f"{missing} frames missing"
            else:
                failed.pop(row, None)
        actors[actor] = {"frames": len(plan.frames), "resolution": plan.resolution, "rendered": rendered, "failed": failed}
    settings = dict(prev.get("settings") or {})
    for row in config.rows:
        old = settings.get(row)
        per_actor = dict(old["per_actor"]) if isinstance(old, dict) and isinstance(old.get("per_actor"), dict) else {}
        for a, p in plans.items():
            rs = p.rows[row]
            per_actor[a] = {"sampler": rs.sampler, "steps": rs.steps, "bundle": p.bundle_fingerprint}
            if rs.shard_latent:
                per_actor[a][SETTING] = FROM_SHARDS
        settings[row] = _row_summary(config, per_actor, row)
    rows = [r for r in ROWS if r in set(prev.get("rows") or []) | set(config.rows)]
    return {
        "schema_version": RENDER_SCHEMA_VERSION,
        "shards": shards,
        "bundles": bundles,
        "split": config.split,
        "rows": rows,
        "actors": dict(sorted(actors.items())),
        "settings": settings,
        "command": command if command is not None else shlex.join(sys.argv),
        "machine": _machine(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
