"""One actor's whole training: stage 0 → stage 2 → LCM(2) → aligned TSD → stage 3 → LCM(3) → bundle.

Each trained stage is one Ray Train ``TorchTrainer`` run (workers from the config's scaling section)
named ``<actor>-<stage>`` under the checkpoint storage; its final DeepSpeed checkpoint is
consolidated into ``<out>/<actor>/<stage>/model.safetensors`` and a ``result.json`` marks the stage
done. Run folder of one actor::

    <out>/<actor>/vae/model/                 stage 0's fitted VAE (diffusers layout), when it ran
    <out>/<actor>/<stage>/model.safetensors  stage weights (fp32, without the shared VAE)
    <out>/<actor>/<stage>/result.json        stage outcome (steps, losses, time); written last
    <out>/<actor>/<stage>/tensorboard/       loss curves and sample grids
    <out>/<actor>/<stage>/status.json        live step, attempt and worker pids while it runs
    <out>/<actor>/aligned_tsd/*.parquet      stage 3's inputs (see :mod:`.align`)
    <out>/<actor>/checkpoints/<actor>-<stage>/   Ray Train runs (unless checkpoint_storage is set)
    <out>/<actor>/summary.json               the actor's outcome, config and per-stage results
    <out>/bundles/<actor>/                   the exported actor bundle (atomic)

Resuming. A crashed worker is restarted by Ray Train (``FailureConfig(max_failures)``) from the
last checkpoint. A killed driver is resumed by running the same command again: finished stages are
skipped by their ``result.json``, and the interrupted stage's trainer, started with the same name
and storage path, finds its checkpoint and continues, ending with the configured step count.
Order note: the issue lists "stage 2, stage 3, then LCM of both"; stage 2 is distilled *before*
the aligned-TSD pass so that stage 3 trains on the TSD maps the renderer will feed it (LCM, few
steps). With ``align.sampler = "ddim"`` the undistilled TSDM produces them instead.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ActorDataError, ConsistentAvatarError
from ..io import absolute_or_uri, atomic_write_json, fingerprint_of, is_uri, publish_dir, read_json, staging_dir
from ..models.presets import ModelPreset, load_preset
from .config import STAGE_ORDER, StageName, TrainConfig
from .data import (
    ALIGNED_TSD_COLUMN,
    ActorData,
    StageCollate,
    inspect_actor,
    shard_latents_problem,
    stage_columns,
    train_dataset,
)
from .stages import STAGE_TITLE, StageSpec
from .weights import consolidated_state_dict, save_weights, strip_prefix, without_vae

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "model.safetensors"
VAE_MODEL_DIR = "model"
EXPORT_FILE = "export.json"
#: An epoch re-plans the streaming read (file listing, parquet footers: new Ray tasks, seconds of
#: CPU), so a short actor's files are listed several times per epoch until an epoch holds this many
#: micro-batches per worker (or the whole stage); MAX_PASSES bounds the listing for huge runs.
MIN_EPOCH_BATCHES = 1024
MAX_PASSES = 64
#: Several passes per epoch hold the actor's train rows in the object store for the stage (once:
#: the passes reference the same blocks), so they are used only for actors whose shard files are at
#: most this size; a larger actor's epochs are long enough for the restart not to matter.
REPEAT_MAX_BYTES = 1 << 30
BUNDLES_DIR = "bundles"


def _local_bytes(files: Sequence[str]) -> int | None:
    """Total size of local files; None if any is not a local file (a URI, or gone)."""
    if not files:
        return None
    total = 0
    for f in files:
        path = Path(f)
        if is_uri(f) or not path.is_file():
            return None
        total += path.stat().st_size
    return total


@dataclass
class StageOutcome:
    stage: str
    iterations: int
    steps: int
    attempt: int
    resumed_from: int
    loss: float | None
    probe_loss_initial: float | None
    probe_loss: float | None
    seconds: float
    weights: str
    checkpoint: str
    fingerprint: str
    started: float = 0.0
    finished: float = 0.0
    skipped: bool = False


@dataclass
class ActorOutcome:
    """What happened to one actor (also the row of the final table)."""

    actor: str
    status: str  # "trained" | "up to date" | "failed"
    error: str | None = None
    bundle: str | None = None
    summary: str | None = None
    seconds: float = 0.0
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_preset(config: TrainConfig, preset: str | None = None) -> ModelPreset:
    p = load_preset(preset or config.preset)
    return p.with_pretrained(**config.pretrained) if config.pretrained else p


def planned_stages(config: TrainConfig, preset: ModelPreset) -> list[StageName]:
    """The trained stages of one actor, in order."""
    stages: list[StageName] = []
    if config.vae.enabled == "always" or (config.vae.enabled == "auto" and preset.pretrained.resolve("vae") is None):
        stages.append("vae")
    stages += ["tsdm", "lcm_tsdm", "fcsd", "lcm_fcsd"]
    last = STAGE_ORDER.index(config.until)
    return [s for s in stages if STAGE_ORDER.index(s) <= last]


def scaling_for(config: TrainConfig, actor: str) -> tuple[int, bool, dict[str, float]]:
    """(workers, use_gpu, resources per worker) of one actor's trainers."""
    import ray

    s = config.actor_scaling.get(actor, config.scaling)
    use_gpu = s.use_gpu if s.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    res = dict(s.resources_per_worker) if s.resources_per_worker else {"CPU": 1.0}
    if use_gpu:
        res.setdefault("GPU", 1.0)
    return s.num_workers, use_gpu, res


def check_batches(actor: str, config: TrainConfig, stages: list[StageName], train_frames: int) -> None:
    """Every worker must get at least one full micro-batch per epoch."""
    workers = config.actor_scaling.get(actor, config.scaling).num_workers
    for stage in stages:
        micro, _ = config.stage(stage).split(workers)
        if train_frames // workers < micro:
            raise ActorDataError(
                actor,
                f"{train_frames} training frames give each of {workers} workers {train_frames // workers}, fewer than "
                f"the {stage} micro-batch of {micro}: lower scaling.num_workers or {stage}.batch_size",
            )


class ActorTrainer:
    """Runs the stages of one actor in order (in the driver, or in a Ray task of :mod:`.many`)."""

    def __init__(
        self,
        shards: str | Path,
        actor: str,
        config: TrainConfig,
        out: str | Path,
        *,
        preset: str | None = None,
        progress: Any = None,
    ) -> None:
        self.shards = str(shards)
        self.actor = actor
        self.config = config
        self.out = Path(out)
        self.dir = self.out / actor
        self.preset = resolve_preset(config, preset)
        self.progress = progress
        self.workers, self.use_gpu, self.resources = scaling_for(config, actor)
        self.storage = absolute_or_uri(
            f"{config.checkpoint_storage.rstrip('/')}/{actor}" if config.checkpoint_storage else str(self.dir / "checkpoints")
        )

    # -- one stage ------------------------------------------------------------------------------

    def _stage_fingerprint(self, stage: StageName, inputs: dict[str, str], data_fp: str) -> str:
        return fingerprint_of(
            {
                "stage": stage,
                "config": self.config.stage(stage).model_dump(mode="json"),
                "preset": self.preset.model_dump(mode="json"),
                "inputs": {k: _file_stamp(v) for k, v in inputs.items()},
                "data": data_fp,
                "seed": self.config.seed,
            }
        )

    def run_stage(
        self,
        stage: StageName,
        *,
        data: ActorData,
        files: list[str] | tuple[str, ...],
        collate: StageCollate,
        columns: list[str],
        inputs: dict[str, str] | None = None,
    ) -> StageOutcome:
        """Train one stage (or skip it when its result is present and current)."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from .loop import train_loop_per_worker

        inputs = inputs or {}
        cfg = self.config.stage(stage)
        stage_dir = self.dir / stage
        data_fp = fingerprint_of([_file_stamp(f) for f in files])
        fp = self._stage_fingerprint(stage, inputs, data_fp)
        done = stage_dir / RESULT_FILE
        if done.is_file():
            saved = read_json(done)
            if saved.get("fingerprint") == fp and Path(saved["weights"]).exists():
                if self.progress is not None:
                    self.progress.update.remote(self.actor, stage, cfg.iterations)
                return StageOutcome(**{**saved, "skipped": True})
            raise ConsistentAvatarError(
                f"actor {self.actor!r}: {stage_dir} holds a {stage} stage trained with other settings or data; "
                "train into a new --out folder, or pass --force to retrain this actor from scratch"
            )
        spec = StageSpec(
            actor=self.actor,
            stage=stage,
            preset=self.preset.model_dump(mode="json"),
            config=cfg.model_dump(mode="json"),
            performance=self.config.performance.model_dump(mode="json"),
            seed=self.config.seed,
            num_workers=self.workers,
            probe_files=list(files),
            columns=columns,
            collate=collate,
            stage_dir=str(stage_dir),
            inputs=inputs,
            shuffle_buffer=self.config.data.shuffle_buffer,
            prefetch_batches=self.config.data.prefetch_batches,
            progress=self.progress,
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec},
            scaling_config=ScalingConfig(
                num_workers=self.workers, use_gpu=self.use_gpu, resources_per_worker=self.resources
            ),
            run_config=RunConfig(
                name=f"{self.actor}-{stage}",
                storage_path=self.storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_last),
                failure_config=FailureConfig(max_failures=self.config.max_failures),
            ),
            datasets={
                "train": train_dataset(
                    files, columns, num_cpus=self.config.data.read_cpus, passes=self._passes(cfg, data.train_frames, files)
                )
            },
        )
        if self.config.performance.train_poll_s is not None:  # read by the Train controller we start
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(self.config.performance.train_poll_s)
        log.info("actor %s: %s, %d iterations on %d workers", self.actor, STAGE_TITLE[stage], cfg.iterations, self.workers)
        started = time.time()
        try:
            result = trainer.fit()
        except Exception as exc:
            raise ConsistentAvatarError(f"{STAGE_TITLE[stage]} failed: {root_cause(exc)}") from None
        if result.checkpoint is None:
            raise ConsistentAvatarError(f"{STAGE_TITLE[stage]} finished without a checkpoint")
        metrics = dict(result.metrics or {})
        if int(metrics.get("step", -1)) != cfg.iterations:
            raise ConsistentAvatarError(
                f"{STAGE_TITLE[stage]} stopped at step {metrics.get('step')} of {cfg.iterations}"
            )
        with result.checkpoint.as_directory() as ckpt:
            state = consolidated_state_dict(ckpt)
        weights = self._export_stage(stage, state, stage_dir)
        outcome = StageOutcome(
            stage=stage,
            iterations=cfg.iterations,
            steps=int(metrics["step"]),
            attempt=int(metrics.get("attempt", 1)),
            resumed_from=int(metrics.get("resumed_from", 0)),
            loss=_float(metrics.get("loss")),
            probe_loss_initial=_float(metrics.get("probe_loss_initial")),
            probe_loss=_float(metrics.get("probe_loss")),
            seconds=float(metrics.get("seconds", 0.0)),
            weights=str(weights),
            checkpoint=str(result.checkpoint.path),
            fingerprint=fp,
            started=started,
            finished=time.time(),
        )
        atomic_write_json(done, asdict(outcome))
        return outcome

    def _passes(self, cfg: Any, rows: int, files: Sequence[str] = ()) -> int:
        """Passes over the files per epoch: an epoch holds at least ``MIN_EPOCH_BATCHES`` micro-batches
        per worker, or the whole run — for actors of at most ``REPEAT_MAX_BYTES`` of local shard files."""
        size = _local_bytes(files)
        if size is None or size > REPEAT_MAX_BYTES:
            return 1
        micro, accum = cfg.split(self.workers)
        per_pass = max(1, rows // self.workers // micro)
        needed = min(cfg.iterations * accum, MIN_EPOCH_BATCHES)
        return min(MAX_PASSES, max(1, math.ceil(needed / per_pass)))

    def _export_stage(self, stage: StageName, state: dict[str, torch.Tensor], stage_dir: Path) -> Path:
        if stage == "vae":
            from diffusers import AutoencoderKL

            vae = AutoencoderKL(**self.preset.vae_kwargs())
            vae.load_state_dict(strip_prefix(state, "vae."))
            final = stage_dir / VAE_MODEL_DIR
            staged = staging_dir(final)
            try:
                vae.save_pretrained(staged)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            publish_dir(staged, final)
            return final
        # TrainingObjective and the LCM denoisers both hold the stage model as ``model``.
        return save_weights(without_vae(strip_prefix(state, "model.")), stage_dir / WEIGHTS_FILE)

    # -- the whole actor -------------------------------------------------------------------------

    def plan(self) -> dict[str, int]:
        return {s: self.config.stage(s).iterations for s in planned_stages(self.config, self.preset)}

    def run(self) -> ActorOutcome:
        t0 = time.perf_counter()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        outcome = ActorOutcome(actor=self.actor, status="failed")
        stages: list[StageName] = planned_stages(self.config, self.preset)
        if self.progress is not None:
            self.progress.set_plan.remote(self.actor, self.plan())
        try:
            self._run(stages, outcome)
            skipped = all(s.get("skipped") for s in outcome.stages.values())
            outcome.status = "up to date" if skipped else "trained"
        except ConsistentAvatarError as exc:
            outcome.error = str(exc)
        except Exception as exc:  # an internal error: keep the trace in the summary
            outcome.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        finally:
            outcome.seconds = time.perf_counter() - t0
            if self.progress is not None:
                self.progress.complete.remote(self.actor)
            self.dir.mkdir(parents=True, exist_ok=True)
            summary = self.dir / SUMMARY_FILE
            atomic_write_json(
                summary,
                {
                    **asdict(outcome),
                    "shards": self.shards,
                    "preset": self.preset.model_dump(mode="json"),
                    "config": self.config.model_dump(mode="json"),
                    "checkpoint_storage": self.storage,
                    "scaling": {"workers": self.workers, "use_gpu": self.use_gpu, "resources_per_worker": self.resources},
                    "started": started,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            outcome.summary = str(summary)
        return outcome

    def _run(self, stages: list[StageName], outcome: ActorOutcome) -> None:
        cfg = self.config
        data = inspect_actor(self.shards, self.actor, self.preset.resolution, self.preset.conditioning.emotion_dim)
        check_batches(self.actor, cfg, stages, data.train_frames)

        def record(o: StageOutcome) -> None:
            outcome.stages[o.stage] = asdict(o)

        if "vae" in stages:
            record(
                self.run_stage(
                    "vae",
                    data=data,
                    files=data.files,
                    collate=StageCollate(self.actor, "vae"),
                    columns=stage_columns("vae"),
                )
            )
            self.preset = self.preset.with_pretrained(vae=str(self.dir / "vae" / VAE_MODEL_DIR))
        if "tsdm" not in stages:
            return
        latents = None
        if cfg.data.use_latents:
            problem = shard_latents_problem(data, _vae_path(self.preset))
            if problem:
                log.info("actor %s: stages 2 and 3 encode images with the VAE: %s", self.actor, problem)
            else:
                latents = data.latent_shape
        tsdm_cols = stage_columns("tsdm", latents=latents is not None)
        tsdm_collate = StageCollate(self.actor, "tsdm", latent_shape=latents)
        tsdm = self.run_stage("tsdm", data=data, files=data.files, collate=tsdm_collate, columns=tsdm_cols)
        record(tsdm)
        if "lcm_tsdm" not in stages:
            return
        lcm_tsdm = self.run_stage(
            "lcm_tsdm", data=data, files=data.files, collate=tsdm_collate, columns=tsdm_cols, inputs={"teacher": tsdm.weights}
        )
        record(lcm_tsdm)
        if "fcsd" not in stages:
            return

        source = cfg.align.source
        if source == "aligned":
            files = self._aligned_inputs(data, latents, tsdm.weights if cfg.align.sampler == "ddim" else lcm_tsdm.weights)
            tsd_column = ALIGNED_TSD_COLUMN
        else:
            files = list(data.files)
            tsd_column = "tsd_real" if source == "ground_truth" else "tsd_coarse"
        fcsd_cols = stage_columns("fcsd", tsd_column=tsd_column, latents=latents is not None)
        fcsd_collate = StageCollate(
            self.actor, "fcsd", tsd_column=tsd_column, emotion_table=data.emotion_table, latent_shape=latents
        )
        fcsd = self.run_stage("fcsd", data=data, files=files, collate=fcsd_collate, columns=fcsd_cols)
        record(fcsd)
        if "lcm_fcsd" not in stages:
            return
        record(
            self.run_stage(
                "lcm_fcsd", data=data, files=files, collate=fcsd_collate, columns=fcsd_cols, inputs={"teacher": fcsd.weights}
            )
        )
        from ..bundle import MANIFEST_FILE
        from .export import export_bundle

        target = self.out / BUNDLES_DIR / self.actor
        marker = self.dir / EXPORT_FILE
        fp = fingerprint_of({name: s["fingerprint"] for name, s in outcome.stages.items()})
        if marker.is_file() and read_json(marker).get("fingerprint") == fp and (target / MANIFEST_FILE).is_file():
            outcome.bundle = str(target)
            return
        outcome.bundle = str(
            export_bundle(
                actor=self.actor,
                out=target,
                preset=self.preset,
                config=cfg,
                data=data,
                shards=self.shards,
                vae_dir=self.dir / "vae" / VAE_MODEL_DIR if "vae" in stages else None,
                stages={name: outcome.stages[name] for name in STAGE_ORDER if name in outcome.stages},
            )
        )
        atomic_write_json(marker, {"fingerprint": fp, "bundle": outcome.bundle})

    def _aligned_inputs(self, data: ActorData, latents: tuple[int, ...] | None, weights: str) -> list[str]:
        from .align import write_aligned_tsd

        cfg = self.config
        out_dir = self.dir / "aligned_tsd"
        marker = out_dir / "_done.json"
        fp = fingerprint_of({"weights": _file_stamp(weights), "align": cfg.align.model_dump(mode="json"), "data": data.files})
        if marker.is_file() and read_json(marker).get("fingerprint") == fp:
            return sorted(str(p) for p in out_dir.glob("*.parquet"))
        log.info("actor %s: aligned TSD for %d training frames (%s, %d steps)", self.actor, data.train_frames, cfg.align.sampler, cfg.align.steps)
        files = write_aligned_tsd(
            actor=self.actor,
            files=data.files,
            columns=stage_columns("fcsd", tsd_column="tsd_real", latents=latents is not None),
            out_dir=out_dir,
            preset=self.preset.model_dump(mode="json"),
            weights=weights,
            sampler=cfg.align.sampler,
            steps=cfg.align.steps,
            seed=cfg.align.seed,
            distill=cfg.lcm_tsdm.distill.model_dump(mode="json"),
            latent_shape=latents,
            batch_size=cfg.align.batch_size,
            workers=self.workers,
            use_gpu=self.use_gpu,
            cpus_per_worker=float(self.resources.get("CPU", 1.0)),
            read_cpus=cfg.data.read_cpus,
        )
        atomic_write_json(marker, {"fingerprint": fp, "files": [Path(f).name for f in files]})
        return files


def _vae_path(preset: ModelPreset) -> str | None:
    p = preset.pretrained.resolve("vae")
    return str(p) if p is not None else None


def _file_stamp(path: str) -> list[Any]:
    p = Path(path)
    if p.is_dir():
        return [str(p.resolve()), sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.is_file())]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _float(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def root_cause(exc: BaseException) -> str:
    """The first user-facing message inside a Ray Train failure (worker errors are wrapped twice)."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank, err = sorted(failures.items())[0]
        return f"worker {rank}: {root_cause(err)}"
    cause = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return root_cause(cause)
    if isinstance(exc, ConsistentAvatarError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
