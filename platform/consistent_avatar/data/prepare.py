"""`cavatar prepare`: actor sources → per-actor parquet shards, on Ray Data.

What happens, in order:

1. **Discover and validate** every actor source (cheap structural checks in the driver). A broken
   actor is reported and skipped; the others go on.
2. **Skip what is up to date**: an actor whose ``_actor.json`` carries the same source fingerprint
   and the same preparation settings is not prepared again (``force`` overrides).
3. **Emotion labels** (paper eq. 7) for every frame, from the tracked expressions, by cosine
   nearest neighbour in the labelled expression database; the labels' CLIP text embeddings are
   computed once per label and stored in ``emotions.parquet``.
4. **Ray Data job**: one row per chunk of consecutive frames; ``map_batches`` with a pool of
   workers decodes the frames, resizes them, computes the TSD maps of the coarse render and the
   real frame, encodes PNGs (and VAE latents when a VAE is configured) and writes the chunk's
   parquet file into the actor's hidden staging directory. Each call returns a one-row summary
   (frames, seconds, error); a chunk that fails reports its error instead of failing the job, so
   one bad actor does not stop the others.
5. **Publish**: an actor whose chunks all succeeded gets its ``_actor.json`` and is renamed into
   ``actors/<name>``; a failed actor's staging directory is deleted, leaving any earlier complete
   version in place. The dataset ``manifest.json`` is rewritten last from the actors present.

Why chunks write their own parquet files instead of ``Dataset.write_parquet``: publication must be
per actor and atomic (a killed job leaves no half-written actor visible) and a failed actor must
be dropped without touching the others; writing each chunk into the actor's staging directory
from the worker keeps data off the driver and keeps both guarantees simple.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ActorDataError, ConsistentAvatarError
from ..io import (
    atomic_write_json,
    atomic_write_table,
    encode_png,
    fingerprint_of,
    publish_dir,
    read_json,
    remove_stale_staging,
    staging_dir,
)
from ..tsd import TSDConfig
from .layout import EMOTIONS, SYNTHETIC_TRUTH_FILE
from .shards import (
    ACTOR_MANIFEST_FILE,
    ACTORS_DIR,
    EMOTION_TABLE_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    emotion_table_schema,
    frame_schema,
)

log = logging.getLogger(__name__)

DEFAULT_TEST_FRAMES = 350
EMOTION_DB_FILE = "emotion_db.parquet"


class PrepareConfig(BaseModel):
    """Settings of one `cavatar prepare` run. Everything that changes the output is fingerprinted."""

    model_config = ConfigDict(extra="forbid")

    resolution: int | None = Field(
        None, ge=16, le=2048, description="output size (square); default: the sources' own size"
    )
    test_frames: int | None = Field(
        None, ge=1, description=f"last N frames of each actor form the test split; default min({DEFAULT_TEST_FRAMES}, frames // 5)"
    )
    tsd: TSDConfig = Field(default_factory=TSDConfig)
    emotion_db: str | None = Field(None, description="emotion database parquet; default: <source>/emotion_db.parquet")
    smoothing_window: int = Field(1, ge=1, description="temporal majority smoothing of emotion labels (odd)")
    emotion_metric: Literal["cosine", "euclidean"] = Field(
        "cosine", description="nearest-neighbour metric: cosine is the paper's eq. 7; euclidean labels neutral frames far better"
    )
    clip_path: str | None = Field(None, description="local CLIP text encoder dir; default: random-init encoder")
    vae_path: str | None = Field(None, description="local AutoencoderKL dir; when set, VAE latents are stored")
    frames_per_task: int = Field(16, ge=1, le=4096)
    workers: int | None = Field(None, ge=1, description="parallel workers; default: all CPUs of the cluster")
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    force: bool = False

    def output_fingerprint(self, emotion_db_fp: str, emotion_source: str) -> str:
        keep = self.model_dump(include={"resolution", "test_frames", "tsd", "smoothing_window", "emotion_metric", "vae_path"})
        return fingerprint_of({**keep, "emotion_db": emotion_db_fp, "emotion_text": emotion_source, "schema": SCHEMA_VERSION})


@dataclass
class ActorPlan:
    """Everything a worker needs to prepare one actor's chunks (picklable)."""

    source: Any  # ingest.ActorSource
    staging: str
    resolution: int
    test_start: int
    expression: np.ndarray
    pose: np.ndarray
    emotion_id: np.ndarray
    emotion_similarity: np.ndarray


@dataclass
class PrepareReport:
    out: Path
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    frames: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        rows = [("actor", "status", "detail")]
        rows += [(a, "prepared", "") for a in self.prepared]
        rows += [(a, "up to date", "") for a in self.skipped]
        rows += [(a, "FAILED", msg.splitlines()[0][:160]) for a, msg in self.failed.items()]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {s:<{w1}}  {d}" for a, s, d in rows]
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"{self.frames} frames in {self.seconds:.1f} s ({fps:.1f} frames/s) → {self.out}")
        return "\n".join(lines)


def default_test_frames(num_frames: int) -> int:
    """The paper tests on the last 350 frames; short (synthetic) actors keep a fifth for testing."""
    return max(1, min(DEFAULT_TEST_FRAMES, num_frames // 5))


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


class ChunkWriter:
    """Ray Data UDF (a stateful actor): prepares chunks of frames and writes their parquet files."""

    def __init__(self, plans: dict[str, ActorPlan], tsd: TSDConfig, vae_path: str | None, use_gpu: bool) -> None:
        import torch

        torch.set_num_threads(1)
        self.plans = plans
        self.tsd = tsd
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.vae = None
        self.vae_identity = ""  # JSON of the VAE's identity by content, as each summary row reports it
        if vae_path:
            from diffusers import AutoencoderKL

            from ..models.components import LOCAL_LOAD
            from ..vae_identity import model_identity

            vae = AutoencoderKL.from_pretrained(vae_path, **LOCAL_LOAD)
            # of the model that makes the latents (no second load), before it moves to the device
            self.vae_identity = json.dumps(model_identity(vae), sort_keys=True)
            self.vae = vae.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {
            "actor": [], "start": [], "frames": [], "seconds": [], "error": [], "vae_identity": []
        }
        for actor, start, stop in zip(batch["actor"], batch["start"], batch["stop"]):
            t0 = time.perf_counter()
            error = ""
            try:
                self._write_chunk(self.plans[str(actor)], int(start), int(stop))
            except Exception as exc:  # isolate the actor: report, never kill the whole job
                error = str(exc) if isinstance(exc, ConsistentAvatarError) else (
                    f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
                )
            out["actor"].append(str(actor))
            out["start"].append(int(start))
            out["frames"].append(int(stop) - int(start))
            out["seconds"].append(time.perf_counter() - t0)
            out["error"].append(error)
            out["vae_identity"].append(self.vae_identity)
        return {k: np.asarray(v) for k, v in out.items()}

    def _write_chunk(self, plan: ActorPlan, start: int, stop: int) -> None:
        import cv2
        import torch

        from ..tsd import temporally_sensitive_detail, tsd_to_uint8

        idx = np.arange(start, stop)
        fb = plan.source.read_frames(idx)
        res = plan.resolution

        def resize(imgs: np.ndarray) -> np.ndarray:
            if imgs.shape[1] == res and imgs.shape[2] == res:
                return imgs
            interp = cv2.INTER_AREA if imgs.shape[1] > res else cv2.INTER_LINEAR
            return np.stack([cv2.resize(im, (res, res), interpolation=interp) for im in imgs])

        real, mask = resize(fb.real_rgb), resize(fb.mask)
        coarse, normal = resize(fb.coarse_rgb), resize(fb.coarse_normal)

        with torch.no_grad():
            both = torch.from_numpy(np.concatenate([real, coarse])).permute(0, 3, 1, 2).to(self.device)
            tsd = temporally_sensitive_detail(both, self.tsd)
            tsd_u8 = tsd_to_uint8(tsd).permute(0, 2, 3, 1).cpu().numpy()
        n = len(idx)
        tsd_real, tsd_coarse = tsd_u8[:n], tsd_u8[n:]

        columns: dict[str, Any] = {
            "actor": [plan.source.name] * n,
            "frame": idx.astype(np.int32),
            "split": ["test" if i >= plan.test_start else "train" for i in idx],
            "real_rgb": [encode_png(x) for x in real],
            "mask": [encode_png(x) for x in mask],
            "coarse_rgb": [encode_png(x) for x in coarse],
            "coarse_normal": [encode_png(x) for x in normal],
            "tsd_real": [encode_png(x) for x in tsd_real],
            "tsd_coarse": [encode_png(x) for x in tsd_coarse],
            "expression": list(plan.expression[idx]),
            "pose": list(plan.pose[idx]),
            "emotion": [EMOTIONS[i] for i in plan.emotion_id[idx]],
            "emotion_id": plan.emotion_id[idx].astype(np.int8),
            "emotion_similarity": plan.emotion_similarity[idx].astype(np.float32),
        }
        if self.vae is not None:
            columns.update(self._latents(real, tsd_real, tsd_coarse))
        table = pa.Table.from_pydict(columns, schema=frame_schema(self.vae is not None))
        pq.write_table(table, Path(plan.staging) / f"part-{start:07d}.parquet", compression="zstd")

    def _latents(self, real: np.ndarray, tsd_real: np.ndarray, tsd_coarse: np.ndarray) -> dict[str, list[bytes]]:
        import torch

        out: dict[str, list[bytes]] = {}
        with torch.no_grad():
            for name, imgs in (("latent_real", real), ("latent_tsd_real", tsd_real), ("latent_tsd_coarse", tsd_coarse)):
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
                lat = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
                out[name] = [t.half().cpu().numpy().tobytes() for t in lat]
        return out


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _find_emotion_db(config: PrepareConfig, sources: list[str]) -> Path:
    if config.emotion_db:
        p = Path(config.emotion_db)
        if not p.is_file():
            raise ConsistentAvatarError(f"emotion database {p} does not exist (build one with `cavatar emotion-db`)")
        return p
    for s in sources:
        cand = Path(s) / EMOTION_DB_FILE
        if cand.is_file():
            return cand
    raise ConsistentAvatarError(
        "no emotion database: pass --emotion-db PATH, or build one with `cavatar emotion-db --out "
        f"<sources>/{EMOTION_DB_FILE}` (`cavatar synth` writes one next to synthetic actors)"
    )


def _file_fingerprint(path: Path) -> str:
    """The emotion database by content: `cavatar synth` rewrites the same database on every run, and
    a rewritten but identical file must not make every prepared actor stale (nor must a moved one)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return fingerprint_of([path.stat().st_size, digest.hexdigest()])


def _emotion_text_table(config: PrepareConfig) -> tuple[np.ndarray, str]:
    from ..text_embedding import EmotionTextEncoder

    if config.clip_path:
        encoder = EmotionTextEncoder.from_pretrained(config.clip_path)
        source = f"clip:{Path(config.clip_path).resolve()}"
    else:
        encoder = EmotionTextEncoder.random()
        source = "random-init-clip:seed0"
    return np.asarray(encoder.embed(list(EMOTIONS)), dtype=np.float32), source


def _synthetic_accuracy(source: Any, predicted: np.ndarray) -> float | None:
    truth_file = Path(source.root) / SYNTHETIC_TRUTH_FILE
    if source.kind != "insta" or not truth_file.is_file():
        return None
    truth = read_json(truth_file)
    labels = truth.get("emotions") or truth.get("emotion")
    if not labels or len(labels) != len(predicted):
        return None
    ids = np.asarray([EMOTIONS.index(x) for x in labels])
    return float((ids == predicted).mean())


def _write_manifest(out: Path, config: PrepareConfig, emotion_info: dict[str, Any], failures: dict[str, str]) -> dict[str, Any]:
    actors: dict[str, Any] = {}
    resolution = None
    root = out / ACTORS_DIR
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.startswith(".") or not (d / ACTOR_MANIFEST_FILE).is_file():
            continue
        m = read_json(d / ACTOR_MANIFEST_FILE)
        resolution = resolution or m["resolution"]
        actors[d.name] = {k: m[k] for k in ("frames", "train", "test", "resolution", "source_fingerprint", "config_fingerprint", "files")}
        # What a render needs to decide, per actor, whether its latents are its bundle's VAE's (an
        # actor prepared by an older version has no vae_identity: unknown, never reused).
        actors[d.name].update(
            latent_shape=m.get("latent_shape"),
            vae_identity=m.get("vae_identity"),
            tsd=(m.get("config") or {}).get("tsd"),
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "resolution": resolution,
        "tsd": config.tsd.model_dump(),
        "emotion_table": EMOTION_TABLE_FILE,
        "emotion": emotion_info,
        "latents": bool(config.vae_path),
        "actors": actors,
        "last_run_failures": failures,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def prepare(sources: list[str], out: str | Path, config: PrepareConfig | None = None) -> PrepareReport:
    """Prepare every actor found under ``sources`` into shards under ``out``. Needs a running Ray
    (``ray.init`` is called with defaults when none is). On a cluster of several nodes the chunk
    writers run anywhere, so ``out`` (checked before the job starts) and ``sources`` must be shared
    volumes mounted at the same paths on every node."""
    import ray

    from ..emotion import EmotionDatabase, EmotionLabeller
    from .ingest import discover_actors

    config = config or PrepareConfig()
    out = Path(out)
    report = PrepareReport(out=out)
    t0 = time.perf_counter()
    (out / ACTORS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(out / ACTORS_DIR) + remove_stale_staging(out):
        log.info("removed leftover of an interrupted run: %s", stale)

    actors = discover_actors(sources)
    if not actors:
        raise ConsistentAvatarError(f"no actor sources found under {', '.join(map(str, sources))}")

    db_path = _find_emotion_db(config, sources)
    db = EmotionDatabase.read(db_path)
    labeller = EmotionLabeller(db, metric=config.emotion_metric)
    embeddings, text_source = _emotion_text_table(config)
    config_fp = config.output_fingerprint(_file_fingerprint(db_path), text_source)

    # 1-2: validate, decide what needs work
    valid = []
    for a in actors:
        try:
            a.validate()
        except ActorDataError as exc:
            report.failed[a.name] = str(exc)
            continue
        valid.append(a)
    sizes = {(a.height, a.width) for a in valid}
    resolution = config.resolution
    if resolution is None and valid:
        if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
            raise ConsistentAvatarError(
                f"actor sources have sizes {sorted(sizes)}: pass --res N to resize every actor to N×N"
            )
        resolution = next(iter(sizes))[0]
    for a in valid:
        if a.height != a.width:
            report.failed[a.name] = str(ActorDataError(a.name, f"frames are {a.width}×{a.height}; crop them square first"))
    valid = [a for a in valid if a.name not in report.failed]

    todo = []
    for a in valid:
        done = out / ACTORS_DIR / a.name / ACTOR_MANIFEST_FILE
        if not config.force and done.is_file():
            m = read_json(done)
            if m.get("source_fingerprint") == a.fingerprint() and m.get("config_fingerprint") == config_fp and m.get("resolution") == resolution:
                report.skipped.append(a.name)
                continue
        todo.append(a)

    # 3: emotion labels, text embeddings
    plans: dict[str, ActorPlan] = {}
    meta: dict[str, dict[str, Any]] = {}
    for a in todo:
        try:
            tr = a.tracking()
        except ActorDataError as exc:
            report.failed[a.name] = str(exc)
            continue
        ids, sim = labeller.label(tr.expression, smoothing_window=config.smoothing_window)
        ids = np.asarray(ids, dtype=np.int64)
        k = a.num_frames
        test = config.test_frames if config.test_frames is not None else default_test_frames(k)
        if test >= k:
            report.failed[a.name] = str(ActorDataError(a.name, f"--test-frames {test} leaves no training frames ({k} frames)"))
            continue
        staged = staging_dir(out / ACTORS_DIR / a.name)
        plans[a.name] = ActorPlan(a, str(staged), resolution, k - test, tr.expression, tr.pose, ids, np.asarray(sim))
        meta[a.name] = {
            "frames": k,
            "train": k - test,
            "test": test,
            "emotion_counts": {EMOTIONS[i]: int(c) for i, c in zip(*np.unique(ids, return_counts=True))},
            "emotion_accuracy_vs_synthetic_truth": _synthetic_accuracy(a, ids),
        }
    atomic_write_bytes_table(out / EMOTION_TABLE_FILE, embeddings)

    # 4: the Ray Data job
    if plans:
        from ..cluster import check_shared_folder, ensure_ray

        ensure_ray(include_dashboard=False)  # honours RAY_ADDRESS; a local Ray otherwise
        check_shared_folder(out, "the shard folder (--out)")  # chunk writers on any node write here
        items = [
            {"actor": name, "start": s, "stop": min(s + config.frames_per_task, p.source.num_frames)}
            for name, p in plans.items()
            for s in range(0, p.source.num_frames, config.frames_per_task)
        ]
        workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(workers, len(items))
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ChunkWriter,
            fn_constructor_kwargs={
                "plans": plans,
                "tsd": config.tsd,
                "vae_path": config.vae_path,
                "use_gpu": config.num_gpus_per_worker > 0,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=config.num_gpus_per_worker or None,
        )
        summaries = ds.take_all()
        errors: dict[str, list[str]] = defaultdict(list)
        seconds: dict[str, float] = defaultdict(float)
        vae_ids: dict[str, set[str]] = defaultdict(set)
        for row in summaries:
            if row["error"]:
                errors[row["actor"]].append(f"frames {row['start']}…: {row['error']}")
            seconds[row["actor"]] += float(row["seconds"])
            vae_ids[row["actor"]].add(str(row.get("vae_identity") or ""))

        # 5: publish or discard, per actor
        for name, plan in plans.items():
            staged = Path(plan.staging)
            files = sorted(p.name for p in staged.glob("part-*.parquet"))
            expected = -(-plan.source.num_frames // config.frames_per_task)
            if not errors[name] and len(files) != expected:
                errors[name].append(f"{len(files)} of {expected} chunks were written (worker lost?)")
            if errors[name]:
                shutil.rmtree(staged, ignore_errors=True)
                first = errors[name][0]
                more = f" (+{len(errors[name]) - 1} more failing chunks)" if len(errors[name]) > 1 else ""
                report.failed[name] = first + more
                continue
            atomic_write_json(
                staged / ACTOR_MANIFEST_FILE,
                {
                    "actor": name,
                    "schema_version": SCHEMA_VERSION,
                    "resolution": resolution,
                    "source": {"kind": plan.source.kind, "root": str(plan.source.root)},
                    "source_fingerprint": plan.source.fingerprint(),
                    "config_fingerprint": config_fp,
                    "config": config.model_dump(),
                    "files": files,
                    "latent_shape": _latent_shape(config, resolution),
                    "vae_identity": _vae_identity(name, vae_ids[name]) if config.vae_path else None,
                    "cpu_seconds": seconds[name],
                    **meta[name],
                },
            )
            publish_dir(staged, out / ACTORS_DIR / name)
            report.prepared.append(name)
            report.frames += plan.source.num_frames

    _write_manifest(
        out,
        config,
        {"database": str(db_path.resolve()), "database_vectors": int(len(db.labels)), "text_embedding": text_source,
         "embedding_dim": int(embeddings.shape[1]), "smoothing_window": config.smoothing_window, "metric": config.emotion_metric},
        report.failed,
    )
    report.seconds = time.perf_counter() - t0
    return report


def _vae_identity(actor: str, reported: set[str]) -> dict[str, str] | None:
    """The identity of the VAE an actor's latents come from (by content: see :mod:`..vae_identity`),
    as the chunk writers computed it from the model they encoded with, so a render can prove them its
    bundle's own; None when the writers disagree (the folder changed during the run)."""
    if len(reported) != 1 or not next(iter(reported)):
        log.warning(
            "actor %s: its chunks were encoded by VAEs of different content (%d identities: the --vae "
            "folder changed during the run?); its latents are stored without a VAE identity, so `cavatar "
            "render` will encode instead of reusing them", actor, len(reported),
        )
        return None
    return json.loads(next(iter(reported)))


def _latent_shape(config: PrepareConfig, resolution: int) -> list[int] | None:
    if not config.vae_path:
        return None
    from diffusers import AutoencoderKL

    cfg = AutoencoderKL.load_config(config.vae_path, local_files_only=True)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    return [cfg["latent_channels"], resolution // factor, resolution // factor]


def atomic_write_bytes_table(path: Path, embeddings: np.ndarray) -> None:
    """Write the emotion table (label, id, embedding) atomically."""
    table = pa.Table.from_pydict(
        {
            "label": list(EMOTIONS),
            "emotion_id": np.arange(len(EMOTIONS), dtype=np.int8),
            "embedding": list(embeddings.astype(np.float32)),
        },
        schema=emotion_table_schema(int(embeddings.shape[1])),
    )
    atomic_write_table(path, table, compression="snappy")
