"""An actor's shards as streaming training batches: Ray Data → per-worker shard → decoded torch tensors.

Each training run hands one Ray Dataset (``read_parquet`` over the actor's files, ``train`` split,
only the columns the stage needs) to its ``TorchTrainer``; Ray Train splits it across the workers
(``streaming_split``) and each worker iterates its part with ``iter_torch_batches`` and
:class:`StageCollate`, which decodes PNG bytes into uint8 image tensors and raw float16 latent bytes
into tensors (in Ray Data's collate threads; pinned on a GPU worker); :func:`to_device` makes the
images float in [-1, 1] on the training device, so a quarter of the bytes crosses to the GPU.
Nothing reads the whole actor into memory: blocks stream from the parquet files
through the object store and are decoded batch by batch on the worker.

Batch keys are the models' own (see :class:`..models.tsdm.TSDMBatch` / :class:`..models.fcsd.FCSDBatch`);
the VAE stage gets ``images``. Every decode error names the actor, the frame and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from ..data.shards import (
    ACTOR_MANIFEST_FILE,
    ACTORS_DIR,
    actor_parts,
    load_manifest,
    open_shards,
    part_locations,
    read_emotion_table,
    read_shard_json,
)
from ..errors import ActorDataError, ConsistentAvatarError
from ..io import decode_png

Kind = Literal["vae", "tsdm", "fcsd"]

#: The shards' latent columns and the batch key each becomes.
LATENT_KEYS = {"latent_tsd_real": "target_latent", "latent_tsd_coarse": "coarse_latent", "latent_real": "image_latent"}
ALIGNED_TSD_COLUMN = "tsd_aligned"


@dataclass(frozen=True)
class ActorData:
    """Where one actor's rows are and what they hold (checked by :func:`inspect_actor`)."""

    actor: str
    files: tuple[str, ...]
    resolution: int
    train_frames: int
    latent_shape: tuple[int, ...] | None
    latent_vae: str | None
    emotion_labels: tuple[str, ...]
    emotion_table: np.ndarray  # (L, D) float32, row = emotion id
    latent_vae_identity: dict[str, str] | None = None  # the VAE of the latents, by content (vae_identity)


def inspect_actor(shards: str | Path, actor: str, resolution: int, emotion_dim: int) -> ActorData:
    """Pre-flight check of one actor's shards (cheap: manifests and parquet footers only).

    Raises :class:`ActorDataError` naming what to fix when the actor is missing, a file is
    unreadable, or sizes disagree with the model preset.
    """
    try:
        store = open_shards(shards)  # a local path or a pyarrow filesystem URI, resolved once
        manifest = load_manifest(store)
        _, parts = actor_parts(store, actor)  # listed once; named as actor_files names them
        files = part_locations(store, actor, parts)
        meta = read_shard_json(store, ACTORS_DIR, actor, ACTOR_MANIFEST_FILE)
    except ConsistentAvatarError as exc:
        raise ActorDataError(actor, str(exc)) from None
    if meta is None:
        raise ActorDataError(
            actor, f"{store.location} has no {ACTORS_DIR}/{actor}/{ACTOR_MANIFEST_FILE}: re-run `cavatar prepare --force`"
        )
    res = int(meta["resolution"])
    if res != resolution:
        raise ActorDataError(
            actor,
            f"shards are {res}² but the model preset works at {resolution}²: re-run `cavatar prepare "
            f"--res {resolution} --force` or pick the preset that matches",
        )
    rows = 0
    for f, part in zip(files, parts, strict=True):
        try:
            with store.filesystem.open_input_file(part) as handle:
                pf = pq.ParquetFile(handle)
                rows += pf.metadata.num_rows
                names = set(pf.schema_arrow.names)
        except Exception as exc:  # a truncated or overwritten file
            raise ActorDataError(
                actor, f"shard file {f} is unreadable ({type(exc).__name__}: {exc}): re-run `cavatar prepare --force`"
            ) from None
        missing = {"frame", "split", "tsd_real", "tsd_coarse", "real_rgb", "coarse_normal", "pose", "expression"} - names
        if missing:
            raise ActorDataError(actor, f"shard file {f} lacks columns {sorted(missing)}: re-run `cavatar prepare --force`")
    if rows != int(meta["frames"]):
        raise ActorDataError(actor, f"shards hold {rows} rows, the actor manifest says {meta['frames']}: re-run prepare")
    labels, table = read_emotion_table(store)
    if table.shape[1] != emotion_dim:
        raise ActorDataError(
            actor,
            f"emotion text embeddings are {table.shape[1]}-d, the preset's emotion token takes {emotion_dim}: "
            "prepare with a matching text encoder (--clip)",
        )
    shape = meta.get("latent_shape")
    vae = (meta.get("config") or {}).get("vae_path") if manifest.get("latents") else None
    return ActorData(
        actor=actor,
        files=tuple(str(f) for f in files),
        resolution=res,
        train_frames=int(meta["train"]),
        latent_shape=tuple(shape) if shape else None,
        latent_vae=vae,
        emotion_labels=tuple(labels),
        emotion_table=table,
        latent_vae_identity=meta.get("vae_identity") if manifest.get("latents") else None,
    )


def same_directory(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def shard_latents_problem(data: ActorData, vae_path: str | None) -> str:
    """"" when the shards' VAE latents are what the model's own VAE computes, so that training may take
    them instead of encoding images; otherwise why not (logged once per actor).

    By content when the shards record their VAE's identity (:mod:`..vae_identity`: the weights as
    loaded, and the config keys that shape a latent), so that new weights at the same path are not
    mistaken for the old ones. Shards prepared before content identities were recorded (none, or the
    earlier file-hash format) fall back to the VAE folder's path, as before. Prepare stores
    ``mean × scaling_factor``: a VAE with a ``shift_factor`` encodes otherwise, so its latents are not used.
    """
    from ..vae_identity import identity_problem, vae_dir_identity

    if not data.latent_shape:
        return "the shards hold no VAE latents (prepared without --vae)"
    if vae_path is None:
        return "the model's VAE is not a pretrained folder (initialised randomly or trained in this run)"
    config = Path(vae_path) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("shift_factor"):
        return f"the VAE at {vae_path} has a shift_factor, which the shards' stored latents do not apply"
    recorded = data.latent_vae_identity
    if identity_problem(recorded):  # none recorded, or an earlier format: the folder's path, as before
        if same_directory(data.latent_vae, vae_path):
            return ""
        return f"the shards' latents come from the VAE at {data.latent_vae}, the model's VAE is {vae_path}"
    assert recorded is not None
    if vae_dir_identity(vae_path) != {k: recorded.get(k) for k in ("format", "tensors_sha256", "config")}:
        return f"the shards' latents come from another VAE than the model's ({vae_path}: other weights or config)"
    return ""


def stage_columns(kind: Kind, tsd_column: str = "tsd_real", latents: bool = False) -> list[str]:
    """The parquet columns a stage reads (fewer columns: less I/O and less decoding)."""
    if kind == "vae":
        return ["frame", "real_rgb", "tsd_real"]
    if kind == "tsdm":
        cols = ["frame", "tsd_coarse", "tsd_real", "pose", "expression"]
        return cols + (["latent_tsd_real", "latent_tsd_coarse"] if latents else [])
    cols = ["frame", tsd_column, "coarse_normal", "real_rgb", "pose", "expression", "emotion_id"]
    return cols + (["latent_real"] if latents else [])


class StageCollate(NumpyBatchCollateFn):
    """numpy batch from Ray Data → dict of CPU tensors in the stage's batch keys (picklable).

    The values are checked here, on the CPU, where a bad one can be named by actor and frame: latents,
    pose and expression vectors and the emotion table must be finite (images are uint8, in range by
    construction). The training step then checks shapes only, with no read-back from the GPU.
    """

    def __init__(
        self,
        actor: str,
        kind: Kind,
        *,
        tsd_column: str = "tsd_real",
        emotion_table: np.ndarray | None = None,
        latent_shape: tuple[int, ...] | None = None,
        with_images: bool = False,
    ) -> None:
        if kind == "fcsd" and emotion_table is None:
            raise ConsistentAvatarError("stage 3 batches need the emotion embedding table")
        if emotion_table is not None and not np.isfinite(emotion_table).all():
            raise ActorDataError(actor, "the shards' emotion embedding table holds NaN or infinite values: re-run prepare")
        self.actor = actor
        self.kind = kind
        self.tsd_column = tsd_column
        self.emotion_table = emotion_table
        self.latent_shape = latent_shape
        self.with_images = with_images  # decode images even when latents stand in for them

    def for_probe(self) -> StageCollate:
        """The same decoding, plus the images latents stand in for (sample grids show them)."""
        return StageCollate(
            self.actor,
            self.kind,
            tsd_column=self.tsd_column,
            emotion_table=self.emotion_table,
            latent_shape=self.latent_shape,
            with_images=True,
        )

    def _images(self, batch: dict[str, Any], column: str) -> torch.Tensor:
        frames = batch.get("frame")
        out = []
        for i, data in enumerate(batch[column]):
            try:
                img = decode_png(bytes(data), 3)
            except ConsistentAvatarError:
                frame = int(frames[i]) if frames is not None else None
                raise ActorDataError(
                    self.actor, f"corrupt PNG in column {column!r}: re-run `cavatar prepare --force`", frame
                ) from None
            out.append(img)
        # uint8 (B, 3, H, W) over NHWC memory: a quarter of float32's bytes to pin and copy to the GPU;
        # :func:`to_device` makes the [-1, 1] floats where the step runs
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    def _latents(self, batch: dict[str, Any], column: str) -> torch.Tensor:
        assert self.latent_shape is not None
        n = int(np.prod(self.latent_shape))
        rows = []
        for i, data in enumerate(batch[column]):
            a = np.frombuffer(bytes(data), dtype=np.float16)
            if a.size != n:
                raise ActorDataError(
                    self.actor,
                    f"latent column {column!r} holds {a.size} values, expected {self.latent_shape}: re-run prepare",
                    int(batch["frame"][i]),
                )
            rows.append(a.reshape(self.latent_shape))
        out = np.stack(rows).astype(np.float32)
        self._finite(out, column, batch)
        return torch.from_numpy(out)

    def _vectors(self, batch: dict[str, Any], column: str) -> torch.Tensor:
        out = np.stack([np.asarray(v, dtype=np.float32) for v in batch[column]])
        self._finite(out, column, batch)
        return torch.from_numpy(out)

    def _finite(self, values: np.ndarray, column: str, batch: dict[str, Any]) -> None:
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            frames = [int(f) for f in np.asarray(batch["frame"])[bad]]
            raise ActorDataError(
                self.actor, f"column {column!r} holds NaN or infinite values in frames {frames}: re-run prepare", frames[0]
            )

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"frame": torch.as_tensor(np.asarray(batch["frame"], dtype=np.int64))}
        latents = self.latent_shape is not None
        if self.kind == "vae":
            out["images"] = torch.cat([self._images(batch, "real_rgb"), self._images(batch, "tsd_real")])
            return out
        out["pose"] = self._vectors(batch, "pose")
        out["expression"] = self._vectors(batch, "expression")
        if self.kind == "tsdm":
            out["coarse_tsd"] = self._images(batch, "tsd_coarse")
            if latents:
                out["target_latent"] = self._latents(batch, "latent_tsd_real")
                out["coarse_latent"] = self._latents(batch, "latent_tsd_coarse")
            if not latents or self.with_images:
                out["target_tsd"] = self._images(batch, "tsd_real")
            return out
        out["tsd"] = self._images(batch, self.tsd_column)
        out["normal"] = self._images(batch, "coarse_normal")
        assert self.emotion_table is not None
        ids = np.asarray(batch["emotion_id"], dtype=np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= len(self.emotion_table):
            raise ActorDataError(self.actor, f"emotion ids {sorted(set(ids.tolist()))} outside the emotion table")
        out["emotion"] = torch.from_numpy(self.emotion_table[ids])
        if latents:
            out["image_latent"] = self._latents(batch, "latent_real")
        if not latents or self.with_images:
            out["image"] = self._images(batch, "real_rgb")
        return out


def train_dataset(
    files: list[str] | tuple[str, ...], columns: list[str], *, num_cpus: float = 0.25, passes: int = 1
) -> Any:
    """A streaming Ray Dataset of the train-split rows of ``files``, ``columns`` only.

    Reads take a fraction of a CPU: the trainers' placement groups hold most CPUs, and parquet reads
    of a few files are I/O, not compute; a whole CPU per read task could starve them of a slot.
    ``passes`` > 1 makes one epoch of a short actor span several passes over its rows: every epoch
    restarts the streaming pipeline (seconds), which should not happen every few batches. The rows
    are then read once into the object store and the epoch is a union of references to those same
    blocks (no copies); the caller keeps that to small actors (:data:`.actor.REPEAT_MAX_BYTES`).
    ``read_parquet`` of a path listed twice reads it once, and a union of independent reads starts
    one operator chain per pass — both were tried and measured.
    """
    import ray.data
    from ray.data.expressions import col

    cols = list(dict.fromkeys([*columns, "split"]))
    ds = ray.data.read_parquet(list(files), columns=cols, num_cpus=num_cpus)
    # No Ray Data progress bars (the derived datasets share this context, and so does the materialising
    # read below): they would interleave with `cavatar train`'s own progress board, which shows steps/s.
    ds.context.enable_progress_bars = False
    ds = ds.filter(expr=col("split") == "train", num_cpus=num_cpus)
    if passes > 1:
        base = ds.materialize()
        ds = base.union(*([base] * (passes - 1)))
    return ds.randomize_block_order()


def read_rows(files: list[str] | tuple[str, ...], columns: list[str], count: int) -> dict[str, np.ndarray]:
    """The first ``count`` train rows by frame, read directly (the fixed probe batch of a stage)."""
    cols = list(dict.fromkeys([*columns, "split", "frame"]))
    # One file at a time: pyarrow infers a URI's filesystem for a single source, not for a list.
    table = pa.concat_tables([pq.read_table(str(f), columns=cols) for f in files])
    table = table.filter(pa.compute.equal(table["split"], "train")).sort_by("frame").slice(0, count)
    if table.num_rows < count:
        raise ConsistentAvatarError(f"only {table.num_rows} training frames, a batch needs {count}")
    return {c: table[c].to_numpy(zero_copy_only=False) for c in columns}


def to_device(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """A collated batch as the models take it, on ``device``: uint8 images become floats in [-1, 1]
    there (``x / 127.5 - 1``, the same float32 operations on any device, so the same values), and
    4-D tensors take the requested memory format."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if v.dtype == torch.uint8:
            # a 0-dim tensor on the device, not a Python number: CUDA divides by a host scalar as a
            # multiplication by its reciprocal (a last-bit difference); this is a true division there too
            v = v.float().div_(torch.full((), 127.5, device=v.device)).sub_(1.0)
        if v.ndim == 4:
            v = v.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out[k] = v
    return out
