"""Many actors at once: one driver task per actor, as many in flight as the cluster's resources fit.

Why Ray tasks and not Ray Tune. Ray Train V2 separates the two: a Tune trial is only a *driver*
that starts a ``TorchTrainer`` whose workers reserve their own placement group, and the Train docs
("Hyperparameter Tuning with Ray Tune", Train V2) ask users to cap such trials with
``TuneConfig(max_concurrent_trials)`` — one number for identical trials — because Tune cannot see
the workers' resources and surplus trials sit waiting for a placement group. Here nothing is tuned:
actors are independent jobs whose trainers may differ in size, failures must stay per actor, and
an interrupted job must resume from each actor's own stage markers and checkpoints rather than
from a Tune experiment state. So the driver runs each actor's pipeline (a sequence of trainers, a
Ray Data pass and the bundle export) in its own Ray task (``num_cpus=0``: it only drives) and admits
a new one only while the trainers in flight plus the new one fit the cluster's resources; the rest
queue in order. A task that raises, or whose node dies after its retries, fails that actor alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from ..compile_cache import check_compile_cache
from ..errors import ConsistentAvatarError
from ..io import absolute_or_uri, atomic_write_json
from .actor import ActorOutcome, ActorTrainer, resolve_preset, scaling_for
from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """Every actor's outcome; ``ok`` when none failed."""

    out: Path
    outcomes: list[ActorOutcome] = field(default_factory=list)
    seconds: float = 0.0
    concurrency: int = 0  # most actors in flight at once

    @property
    def ok(self) -> bool:
        return all(o.status != "failed" for o in self.outcomes)

    @property
    def failed(self) -> dict[str, str]:
        return {o.actor: o.error or "failed" for o in self.outcomes if o.status == "failed"}

    def table(self) -> str:
        rows = [("actor", "status", "time", "probe loss (stage 3)", "bundle / error")]
        for o in self.outcomes:
            fcsd = o.stages.get("fcsd", {})
            probe = (
                f"{fcsd['probe_loss_initial']:.4g} → {fcsd['probe_loss']:.4g}"
                if fcsd.get("probe_loss") is not None and fcsd.get("probe_loss_initial") is not None
                else ""
            )
            detail = o.bundle or "" if o.status != "failed" else (o.error or "").splitlines()[0][:200]
            rows.append((o.actor, o.status.upper() if o.status == "failed" else o.status, f"{o.seconds:.0f} s", probe, detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        done = sum(o.status != "failed" for o in self.outcomes)
        lines.append(
            f"{done}/{len(self.outcomes)} actors done in {self.seconds:.0f} s, up to {self.concurrency} at once → {self.out}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "seconds": self.seconds, "concurrency": self.concurrency,
                "outcomes": [asdict(o) for o in self.outcomes]}


def trainer_demand(config: TrainConfig, actor: str) -> dict[str, float]:
    """Resources one actor's trainer needs: workers × per-worker resources, plus the CPUs of the
    Ray Data read tasks that stream its shards to the workers (``data.read_cpus`` per worker).

    The read tasks count because they are scheduled beside the workers: admitting trainers whose
    workers alone fill the cluster leaves the reads no CPU, and every trainer then waits for data
    forever (seen on 2 CPUs with two 1-CPU workers).
    """
    workers, _, per_worker = scaling_for(config, actor)
    demand = {k: v * workers for k, v in per_worker.items() if v > 0}
    demand["CPU"] = demand.get("CPU", 0.0) + config.data.read_cpus * workers
    return demand


def fits(in_use: dict[str, float], demand: dict[str, float], capacity: dict[str, float]) -> bool:
    """Whether a trainer needing ``demand`` fits beside the trainers holding ``in_use``."""
    return all(in_use.get(k, 0.0) + v <= capacity.get(k, 0.0) + 1e-9 for k, v in demand.items())


def _add(a: dict[str, float], b: dict[str, float], sign: float = 1.0) -> dict[str, float]:
    return {k: a.get(k, 0.0) + sign * b.get(k, 0.0) for k in set(a) | set(b)}


def _run_actor(shards: str, actor: str, config_json: dict[str, Any], out: str, preset: str | None, board: Any) -> ActorOutcome:
    config = TrainConfig.parse(config_json)
    return ActorTrainer(shards, actor, config, out, preset=preset, progress=board).run()


def train_many(
    shards: str | Path,
    actors: list[str],
    config: TrainConfig,
    out: str | Path,
    *,
    preset: str | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train ``actors`` concurrently, bounded by resources; never raises for one actor's failure.

    Admission is first come, first served: the next actor starts when its trainer's resources fit
    beside those of the trainers in flight (``ray.cluster_resources()``), or when none is in flight
    (a trainer larger than the cluster then waits for its placement group, e.g. for an autoscaler),
    and ``max_concurrent_actors`` is not reached.
    """
    from .progress import ProgressBar, ProgressBoard

    t0 = time.perf_counter()
    shards = absolute_or_uri(shards)
    out = Path(out).expanduser().absolute()
    capacity = {k: float(v) for k, v in ray.cluster_resources().items()}
    demands = {a: trainer_demand(config, a) for a in actors}
    for actor, demand in demands.items():
        short = {k: v for k, v in demand.items() if capacity.get(k, 0.0) < v}
        if short:
            log.warning("actor %s: its trainer needs %s, the cluster has %s now: it will wait for resources",
                        actor, short, {k: capacity.get(k, 0.0) for k in short})
    cap = config.max_concurrent_actors or len(actors)
    report = TrainReport(out=out)
    log.info("training %d actor(s) on a cluster with %s", len(actors), capacity)

    remote = ray.remote(_run_actor).options(
        num_cpus=0,
        resources=config.scaling.driver_resources or None,
        max_retries=config.actor_retries,
        retry_exceptions=False,
    )
    board = ProgressBoard.remote()
    bar = ProgressBar(board, enabled=progress)
    pending = deque(actors)
    running: dict[Any, str] = {}
    in_use: dict[str, float] = {}
    results: dict[str, ActorOutcome] = {}
    config_json = config.model_dump(mode="json")
    try:
        while pending or running:
            while pending and len(running) < cap and (not running or fits(in_use, demands[pending[0]], capacity)):
                actor = pending.popleft()
                running[remote.remote(str(shards), actor, config_json, str(out), preset, board)] = actor
                in_use = _add(in_use, demands[actor])
                report.concurrency = max(report.concurrency, len(running))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                actor = running.pop(ref)
                in_use = _add(in_use, demands[actor], -1.0)
                try:
                    results[actor] = ray.get(ref)
                except Exception as exc:  # the task died (node lost, OOM) after its retries
                    results[actor] = ActorOutcome(actor=actor, status="failed", error=f"driver task died: {exc}")
                    board.complete.remote(actor)
            bar.refresh()
    finally:
        bar.close()
    report.outcomes = [results[a] for a in actors]
    report.seconds = time.perf_counter() - t0
    return report


def check_actors(shards: str | Path, actors: list[str] | None) -> list[str]:
    """The actors to train: the given ones (which must be prepared) or every prepared actor."""
    from ..data.shards import load_manifest

    manifest = load_manifest(shards)
    known = sorted(manifest["actors"])
    if not actors:
        if not known:
            raise ConsistentAvatarError(f"{shards} holds no prepared actors: run `cavatar prepare` first")
        return known
    unknown = [a for a in actors if a not in manifest["actors"]]
    if unknown:
        raise ConsistentAvatarError(
            f"actors {unknown} are not in {shards} (prepared: {', '.join(known) or 'none'})"
        )
    if len(set(actors)) != len(actors):
        raise ConsistentAvatarError(f"actor list {actors} names an actor twice")
    return list(actors)


def train(
    shards: str | Path,
    actors: list[str] | None,
    preset: str | None,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> TrainReport:
    """`cavatar train`: train every listed actor (all prepared ones when ``actors`` is empty).

    ``preset`` overrides ``config.preset``. Starts a local Ray unless one is running or
    ``RAY_ADDRESS`` points at a cluster. ``force`` deletes the actors' earlier run folders first.
    """
    config = config or TrainConfig()
    if preset:
        config = config.model_copy(update={"preset": preset})
    resolve_preset(config)  # fail fast on a bad preset, before any cluster work
    if config.performance.compile_cache is not None:  # absolute: workers do not run in this folder
        cache = str(check_compile_cache(config.performance.compile_cache))
        config = config.model_copy(
            update={"performance": config.performance.model_copy(update={"compile_cache": cache})}
        )
    shards = absolute_or_uri(shards)
    names = check_actors(shards, actors)
    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    from ..cluster import check_shared_folder, ensure_ray

    ensure_ray()  # honours RAY_ADDRESS; else a local Ray (with its state API when installed)
    # per-actor drivers and workers on any node write runs, aligned-TSD files and bundles here
    check_shared_folder(out, "RUNS (--out)")
    if force:
        _remove_runs(out, names, config)
    report = train_many(shards, names, config, out, progress=progress)
    atomic_write_json(out / "train_report.json", report.to_json())
    return report


def _remove_runs(out: Path, actors: list[str], config: TrainConfig) -> None:
    """``--force``: delete run folders and checkpoints (a bundle stays until a new one replaces it)."""
    import shutil

    import pyarrow.fs as pafs

    for actor in actors:
        shutil.rmtree(out / actor, ignore_errors=True)
        if config.checkpoint_storage:
            fs, root = pafs.FileSystem.from_uri(config.checkpoint_storage.rstrip("/") + f"/{actor}")
            try:
                fs.delete_dir(root)
            except (FileNotFoundError, OSError):
                pass
