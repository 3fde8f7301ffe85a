"""Many actors at once: stage-3 (FCSD) training throughput of K actors' trainers side by side versus one.

The issue's requirement: "two actors on two GPUs at ≥ 1.9× the throughput of one". This runs the real
multi-actor training — :func:`consistent_avatar.training.train`, the function behind `cavatar train`
(one Ray task per actor, one Ray Train ``TorchTrainer`` + DeepSpeed per stage, admission by resources)
— first with one actor, then with K actors at once, each trainer with one worker of
``--gpus-per-worker`` GPUs, on the same synthetic data, for ``--steps`` optimiser steps of
``--stage`` (FCSD, paper stage 3; the only stage supported for now).

What runs, in order (all under ``--work`` or a temporary folder):

1. **Inputs** (untimed): K + 1 synthetic actors at the preset's resolution
   (``synthesize_actors``), the synthetic emotion database, a randomly initialised VAE saved as the
   "pretrained" one (``load_vae`` → ``save_pretrained``; no hub is reached), and ``prepare`` into
   shards with that VAE's latents (``--no-latents``: images, the VAE encodes in every step and a
   random VAE is used without stage 0). Local Ray comes from ``consistent_avatar.cluster.ensure_ray``.
2. **Prefix** (untimed): the library cannot train stage 3 alone — ``until`` only names the *last*
   stage, and an actor's stage 3 runs after stage 2 and its LCM distillation have a ``result.json``.
   So one ``train(until="lcm_tsdm")`` call gives all K + 1 actors the shortest prefix (1 step of
   stage 2, 1 step of its LCM distillation), with half the per-worker resources so that all K + 1
   fit at once. By default stage 2 trains only its new layers and the UNet's ``conv_in`` (a copy of
   the preset with ``training.tsdm_unet = "conv_in"``; ``--full-prefix`` keeps the preset's scope):
   this changes nothing in stage 3's model, and spares sd15 two 12 GB optimiser checkpoints per
   actor. ``align.source = "coarse"`` feeds stage 3 the stage-1 TSD maps from the shards (the
   paper's baseline), so no aligned-TSD Ray Data pass runs; stage 3's step is the same.
3. **1 actor**: ``train([actor_000], until="fcsd")`` in the same run folder — its prefix is
   skipped by its ``result.json`` (the documented resume path), so the call trains stage 3 alone.
4. **K actors**: ``train([actor_001 … actor_K], until="fcsd")`` likewise: K stage-3 trainers
   start together.

What is timed. *Steady state*: rank 0 of every trainer writes the loss to TensorBoard every
``--log-every`` steps (``<run>/<actor>/fcsd/tensorboard``, with each event's wall-clock time); an
actor's rate is (last logged step − first logged step ≥ ``--warmup``) / (time between those two
events). That window holds only optimiser steps (and the probe loss the trainer computes at each log
point) — not Ray Train's start, the model build, data start-up or the final checkpoint and weight
consolidation. Aggregated steps/s of a run = the sum of its actors' steady rates; the JSON also
holds each actor's window, how much the windows overlap, and the aggregate over the common window
(every actor's steps in it, interpolated between log points). *Run wall time*: the ``train()``
call, Ray Train's fixed cost per stage included; the end-to-end speed-up compares K × steps per
wall second with one actor's steps per wall second. The target is 0.95·K (1.9× for K = 2).

Prints progress and a table; writes JSON (default ``benchmarks/results/train_many_<preset>_<device>.json``)
with the command, the machine, a timestamp, the settings, the results and these notes — rewritten after
the inputs, the prefix and each run, with ``complete: false`` until the end, so that a run cut short (a
device call's time limit) keeps the phases it finished.

    PYTHONPATH=platform python benchmarks/bench_train_many.py --preset tiny            # CPU, ~4 min
    PYTHONPATH=platform python benchmarks/bench_train_many.py --preset sd15 --actors 2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("fcsd",)
TARGET_PER_ACTOR = 0.95  # "two actors at ≥ 1.9× the throughput of one"

NOTES = [
    "Each run calls consistent_avatar.training.train (what `cavatar train` calls): one Ray task per actor, "
    "one Ray Train TorchTrainer with DeepSpeed per stage, 1 worker per trainer.",
    "The library has no single-stage mode (`until` names the last stage), so an untimed prefix call trains "
    "stage 2 and its LCM distillation for 1 step each for every actor (until=lcm_tsdm); the timed calls "
    "(until=fcsd, same run folder) skip them by their result.json and train stage 3 only.",
    "steady steps/s per actor: between the first TensorBoard loss event at step >= warmup and the last one "
    "(wall_time of the events written by rank 0 every log_every steps); includes the probe-loss forward the "
    "trainer runs at every log point; excludes Ray Train start, model build, data start-up, final checkpoint "
    "and consolidation.",
    "aggregate steps/s of a run: sum of its actors' steady rates; `common_window` recomputes it over the "
    "interval where all actors' windows overlap (steps interpolated between log points).",
    "wall_s: the whole train() call of the run (fixed costs included); end-to-end speed-up = "
    "(K x steps / wall_K) / (steps / wall_1).",
    "Every actor has enough frames for one epoch to span the whole stage (--frames, default "
    "ceil(5/4 x steps x batch) + 4): each epoch restarts Ray Data's streaming pipeline (seconds), and the "
    "library's `passes` (files listed several times per epoch) has no effect with Ray 2.60 (read_parquet "
    "followed by filter(expr=...) reads each path once), so a short actor would time those restarts.",
    "stage 3 reads the stage-1 TSD from the shards (align.source=coarse): no aligned-TSD pass; same step cost.",
    "Random-init weights (no model hub); the 'pretrained' VAE is a random one saved to disk so that shards "
    "can carry its latents.",
]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def build_inputs(work: Path, preset: Any, n_actors: int, frames: int, latents: bool, cluster_gpus: float) -> tuple[Path, Path | None]:
    """Synthetic actors → (random VAE) → shards, through the library's Python APIs."""
    from consistent_avatar.data.prepare import PrepareConfig, prepare
    from consistent_avatar.emotion import build_emotion_db
    from consistent_avatar.synthetic import SynthConfig, synthesize_actors

    # keyed by what shapes the data, so a reused --work never mixes actors of other settings
    inputs = work / f"inputs_{preset.name}_{preset.resolution}px_{n_actors}x{frames}f{'_latents' if latents else ''}"
    src = inputs / "actors"
    synthesize_actors(src, SynthConfig(actors=n_actors, frames=frames, res=preset.resolution, seed=0),
                      workers=max(1, min(n_actors, (os.cpu_count() or 1) // 2)))
    db = src / "emotion_db.parquet"
    if not db.is_file():
        build_emotion_db(db, source="synthetic", seed=1_000_003)
    vae_dir = None
    if latents:
        vae_dir = inputs / "random_vae"
        if not (vae_dir / "config.json").is_file():
            from consistent_avatar.io import publish_dir, staging_dir
            from consistent_avatar.models.components import load_vae

            random_preset = preset.model_copy(update={"pretrained": type(preset.pretrained)()})
            vae, _ = load_vae(random_preset, seed=0)
            staged = staging_dir(vae_dir)
            vae.save_pretrained(staged)
            publish_dir(staged, vae_dir)
    shards = inputs / "shards"
    cfg = PrepareConfig(
        resolution=preset.resolution,
        emotion_metric="euclidean",
        vae_path=str(vae_dir) if vae_dir else None,
        frames_per_task=32,
        # with a VAE on GPUs: 4 writers per GPU (each holds a VAE); else one per CPU (the default)
        workers=int(4 * cluster_gpus) if (cluster_gpus > 0 and vae_dir) else None,
        num_gpus_per_worker=0.25 if (cluster_gpus > 0 and vae_dir) else 0.0,
    )
    report = prepare([str(src)], shards, cfg)
    if report.failed:
        raise SystemExit(f"prepare failed: {report.failed}")
    return shards, vae_dir


def bench_preset(work: Path, name: str, full_prefix: bool) -> tuple[str, dict[str, Any]]:
    """The preset to train (a JSON copy with stage 2 limited to conv_in unless ``full_prefix``)."""
    from consistent_avatar.models.presets import load_preset

    preset = load_preset(name)
    if full_prefix or preset.training.tsdm_unet == "conv_in":
        return name, {}
    data = preset.model_dump(mode="json")
    data["training"] = {**data["training"], "tsdm_unet": "conv_in"}
    path = work / f"preset_{preset.name}_prefix_conv_in.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return str(path), {"training.tsdm_unet": "conv_in (was full): stage 2 / LCM-2 prefix only"}


def train_config(args: argparse.Namespace, preset: str, vae_dir: Path | None, gpus: float, cpus: float) -> Any:
    from consistent_avatar.training import TrainConfig

    quick = {"iterations": 1, "batch_size": args.batch, "checkpoint_every": 1000, "log_every": 1,
             "sample_every": 100000, "sample_steps": 1}
    per_worker: dict[str, float] = {"CPU": cpus}
    if gpus > 0:
        per_worker["GPU"] = gpus
    data: dict[str, Any] = {
        "preset": preset,
        "pretrained": {"vae": str(vae_dir)} if vae_dir else {},
        "scaling": {"num_workers": 1, "use_gpu": gpus > 0, "resources_per_worker": per_worker},
        "vae": {"lr": 1e-4, "iterations": 1, "batch_size": 8, "enabled": "auto" if vae_dir else "never"},
        "tsdm": {**quick, "lr": 1e-5},
        "lcm_tsdm": {**quick, "lr": 1e-5, "inference_steps": 1},
        "fcsd": {"lr": 1e-4, "iterations": args.steps, "batch_size": args.batch,
                 "checkpoint_every": args.steps + 1, "log_every": args.log_every,
                 "sample_every": 10 * args.steps + 1, "sample_steps": 1},
        "align": {"source": "coarse"},
        "performance": {"compile": args.compile, "train_poll_s": 0.5},
        "until": "fcsd",
        "max_failures": 0,
        "actor_retries": 0,
    }
    return TrainConfig.parse(data)


# ---------------------------------------------------------------------------------------------
# running and reading what training recorded
# ---------------------------------------------------------------------------------------------


class Monitor:
    """Prints the actors' current stage and step (from their status.json) every ``every`` seconds."""

    def __init__(self, out: Path, actors: list[str], stages: list[str], label: str, every: float = 10.0) -> None:
        self.out, self.actors, self.stages, self.label, self.every = out, actors, stages, label, every
        self.stop = threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _line(self) -> str:
        parts = []
        for actor in self.actors:
            state = "waiting"
            for stage in self.stages:
                f = self.out / actor / stage
                if (f / "result.json").is_file():
                    state = f"{stage} done"
                    continue
                try:
                    s = json.loads((f / "status.json").read_text())
                    state = f"{stage} {s.get('step', 0)}/{s.get('iterations', '?')}"
                except (OSError, ValueError):
                    pass
                break
            parts.append(f"{actor} {state}")
        return "; ".join(parts)

    def _loop(self) -> None:
        last = None
        while not self.stop.wait(self.every):
            line = self._line()
            if line != last:
                print(f"  [{self.label} {time.perf_counter() - self.t0:5.0f} s] {line}", flush=True)
                last = line


def run_train(shards: Path, actors: list[str], config: Any, out: Path, label: str, stages: list[str]) -> tuple[Any, float]:
    from consistent_avatar.training import train

    print(f"{label}: train {', '.join(actors)} (until={config.until})", flush=True)
    t0 = time.perf_counter()
    with Monitor(out, actors, stages, label):
        report = train(shards, actors, None, out, config, progress=False)
    wall = time.perf_counter() - t0
    print(f"{label}: {wall:.1f} s, up to {report.concurrency} actor(s) at once", flush=True)
    for actor, error in report.failed.items():
        print(f"  {actor} FAILED: {error}", file=sys.stderr, flush=True)
    return report, wall


def _event_class() -> Any:
    try:
        from tensorboard.compat.proto.event_pb2 import Event
    except ImportError:  # hosts with tensorboardX only
        from tensorboardX.proto.event_pb2 import Event
    return Event


def log_points(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, wall_time) of every scalar event named ``tag`` in a TensorBoard folder (TFRecord files
    read directly; a step written twice, e.g. after a worker restart, keeps its last event)."""
    Event = _event_class()
    points: dict[int, float] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            body = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            if len(body) < length:
                break  # a record still being written
            event = Event.FromString(body)
            if any(v.tag == tag for v in event.summary.value):
                points[int(event.step)] = float(event.wall_time)
    return sorted(points.items())


def actor_result(out: Path, outcome: Any, stage: str, warmup: int, batch: int) -> dict[str, Any]:
    s = outcome.stages.get(stage, {})
    row: dict[str, Any] = {
        "actor": outcome.actor,
        "status": outcome.status,
        "error": outcome.error,
        "steps": s.get("steps"),
        "attempts": s.get("attempt"),
        "stage_wall_s": round(s["finished"] - s["started"], 2) if s.get("finished") else None,
        "loop_s": round(s["seconds"], 2) if s.get("seconds") else None,
        "log_points": [],
    }
    points = log_points(out / outcome.actor / stage / "tensorboard", f"{stage}/loss")
    row["log_points"] = [[step, round(t, 3)] for step, t in points]
    steady = [(step, t) for step, t in points if step >= warmup]
    if len(steady) >= 2:
        (s0, t0), (s1, t1) = steady[0], steady[-1]
        rate = (s1 - s0) / (t1 - t0)
        row.update(window_steps=s1 - s0, window_s=round(t1 - t0, 3), window=[round(t0, 3), round(t1, 3)],
                   steps_per_s=round(rate, 4), ms_per_step=round(1000 / rate, 1),
                   samples_per_s=round(rate * batch, 2))
    else:
        row.update(window_steps=None, window_s=None, window=None, steps_per_s=None, ms_per_step=None, samples_per_s=None)
    return row


def _steps_at(points: list[tuple[int, float]], t: float) -> float:
    """An actor's step count at wall time ``t``, interpolated between its log points."""
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return s0 + (s1 - s0) * (t - t0) / (t1 - t0)
    return float(points[0][0] if t < points[0][1] else points[-1][0])


def run_result(label: str, report: Any, wall: float, out: Path, stage: str, args: argparse.Namespace) -> dict[str, Any]:
    rows = [actor_result(out, o, stage, args.warmup, args.batch) for o in report.outcomes]
    rates = [r["steps_per_s"] for r in rows]
    ok = report.ok and all(r is not None for r in rates)
    res: dict[str, Any] = {
        "run": label,
        "actors": [r["actor"] for r in rows],
        "ok": ok,
        "wall_s": round(wall, 2),
        "concurrency": report.concurrency,
        "steps_per_s": round(sum(rates), 4) if ok else None,
        "samples_per_s": round(sum(rates) * args.batch, 2) if ok else None,
        "end_to_end_steps_per_s": round(sum(r["steps"] or 0 for r in rows) / wall, 4) if ok else None,
        "per_actor": rows,
    }
    if ok and len(rows) > 1:
        start = max(r["window"][0] for r in rows)
        end = min(r["window"][1] for r in rows)
        shortest = min(r["window_s"] for r in rows)
        res["overlap"] = round(max(0.0, end - start) / shortest, 3)
        if end > start:
            pts = [[(s, t) for s, t in r["log_points"] if s >= args.warmup] for r in rows]
            done = sum(_steps_at(p, end) - _steps_at(p, start) for p in pts)
            res["common_window"] = {"seconds": round(end - start, 3), "steps": round(done, 1),
                                    "steps_per_s": round(done / (end - start), 4)}
        else:
            res["common_window"] = None
    elif ok:
        res["overlap"] = 1.0
    return res


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from machine import machine_info

    info = machine_info(gpu=True)
    for mod in ("ray", "deepspeed", "diffusers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - reported, not fatal
            info[mod] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, sd15)")
    p.add_argument("--actors", type=int, default=2, help="K: actors trained at once in the second run")
    p.add_argument("--stage", default="fcsd", choices=STAGES, help="stage whose step throughput is measured")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of the stage (default 60 on GPU, 40 on CPU)")
    p.add_argument("--log-every", type=int, default=None, help="steps between log points (default 10 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the steady window (default: --log-every)")
    p.add_argument("--batch", type=int, default=4, help="batch per trainer (one worker: micro-batch = batch)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per synthetic actor (4/5 train); default: enough for one epoch to cover --steps")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default 1 when Ray sees GPUs, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default 1 on GPU, 0.5 on CPU (K trainers fit 2 cores)")
    p.add_argument("--latents", action=argparse.BooleanOptionalAction, default=True,
                   help="shards carry the (random) VAE's latents, as with a pretrained VAE")
    p.add_argument("--full-prefix", action="store_true", help="keep the preset's stage-2 training scope in the prefix")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="performance.compile (torch.compile adds minutes of fixed cost per trainer)")
    p.add_argument("--work", default=None, help="folder for inputs and runs (default: a temporary folder)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep Ray Train checkpoints (sd15: ~7 GB each)")
    p.add_argument("--verbose", action="store_true", help="Ray worker logs on the console")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_many_<preset>_<device>.json)")
    args = p.parse_args(argv)
    if args.actors < 1:
        p.error("--actors must be ≥ 1")

    import ray

    from consistent_avatar.cluster import ensure_ray
    from consistent_avatar.models.presets import load_preset
    from consistent_avatar.synthetic.actors import actor_name

    t_start = time.perf_counter()
    ensure_ray(include_dashboard=False, log_to_driver=args.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    has_gpu = cluster.get("GPU", 0.0) > 0
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if has_gpu else 0.0)
    cpus = args.cpus_per_worker if args.cpus_per_worker is not None else (1.0 if gpus > 0 else 0.5)
    device = "cuda" if gpus > 0 else "cpu"
    args.steps = args.steps or (60 if device == "cuda" else 40)
    args.log_every = args.log_every or (10 if device == "cuda" else 5)
    args.warmup = args.log_every if args.warmup is None else args.warmup
    if args.steps < args.warmup + 2 * args.log_every:
        p.error(f"--steps {args.steps} leaves fewer than two log points after the warm-up of {args.warmup}")
    if args.frames is None:  # train frames (all but the last fifth) ≥ steps × batch: no epoch restart mid-stage
        args.frames = math.ceil(args.steps * args.batch * 5 / 4) + 4
    k = args.actors
    print(f"Ray cluster {cluster}; per worker {cpus} CPU, {gpus} GPU; {args.preset}, {args.stage}, "
          f"{args.steps} steps, batch {args.batch}; 1 actor then {k}", flush=True)

    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_many-")
        work = Path(tmp.name)
    runs = work / "train"
    shutil.rmtree(runs, ignore_errors=True)  # a timed stage must never be "up to date"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"train_many_{args.preset}_{device}.json"
    record: dict[str, Any] = {
        "benchmark": "train_many",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "settings": {
            **{k_: v for k_, v in vars(args).items() if k_ not in ("out", "work", "verbose")},
            "device": device, "gpus_per_worker": gpus, "cpus_per_worker": cpus, "workers_per_trainer": 1,
            "ray_cluster": cluster,
        },
        "phases_s": {},
        "results": [],
        "complete": False,
        "notes": NOTES,
    }

    def save() -> None:
        """Rewrite the JSON after every phase (``complete`` false until the end, in ``<out>.partial.json``):
        a run cut short by a time limit keeps what it measured."""
        from record import write_record

        record["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["phases_s"]["total"] = round(time.perf_counter() - t_start, 2)
        write_record(out, record, bool(record["complete"]))

    try:
        t = time.perf_counter()
        preset_arg, preset_changes = bench_preset(work, args.preset, args.full_prefix)
        preset = load_preset(preset_arg)
        names = [actor_name(i) for i in range(k + 1)]
        shards, vae_dir = build_inputs(work, preset, k + 1, args.frames, args.latents, cluster.get("GPU", 0.0) if gpus > 0 else 0.0)
        inputs_s = time.perf_counter() - t
        print(f"inputs: {k + 1} actors × {args.frames} frames at {preset.resolution}² prepared in {inputs_s:.1f} s "
              f"({'with' if vae_dir else 'without'} VAE latents)", flush=True)

        config = train_config(args, preset_arg, vae_dir, gpus, cpus)
        prefix_cfg = config.model_copy(update={"until": "lcm_tsdm"}).with_overrides(
            [f"scaling.resources_per_worker={json.dumps({k_: v / 2 for k_, v in config.scaling.resources_per_worker.items()})}"]
        )
        record["settings"].update({
            "preset_changes": preset_changes,
            "prefix": {"until": "lcm_tsdm", "steps": {"tsdm": 1, "lcm_tsdm": 1},
                       "resources_per_worker": prefix_cfg.scaling.resources_per_worker},
            "train_config": config.model_dump(mode="json"),
        })
        record["phases_s"]["inputs"] = round(inputs_s, 2)
        save()
        prefix, prefix_s = run_train(shards, names, prefix_cfg, runs, "prefix", ["tsdm", "lcm_tsdm"])
        record["phases_s"]["prefix"] = round(prefix_s, 2)
        save()
        if not prefix.ok:
            raise SystemExit(f"prefix failed: {prefix.failed}")
        if not args.keep_checkpoints:
            for a in names:
                shutil.rmtree(runs / a / "checkpoints", ignore_errors=True)

        results = record["results"]
        for label, actors in (("1 actor", names[:1]), (f"{k} actors", names[1:])):
            report, wall = run_train(shards, actors, config, runs, label, [args.stage])
            results.append(run_result(label, report, wall, runs, args.stage, args))
            save()
            r = results[-1]
            if r["ok"]:
                print(f"{label}: {r['steps_per_s']:.3f} steps/s steady (" +
                      ", ".join(f"{a['actor']} {a['ms_per_step']} ms/step" for a in r["per_actor"]) + ")", flush=True)
            if not args.keep_checkpoints:
                for a in actors:
                    shutil.rmtree(runs / a / "checkpoints", ignore_errors=True)

        one, many = results
        target = round(TARGET_PER_ACTOR * k, 3)
        speedup: dict[str, Any] = {"target": target}
        if one["ok"] and many["ok"]:
            speedup["steady"] = round(many["steps_per_s"] / one["steps_per_s"], 3)
            speedup["end_to_end"] = round(many["end_to_end_steps_per_s"] / one["end_to_end_steps_per_s"], 3)
            if many.get("common_window"):
                speedup["common_window"] = round(many["common_window"]["steps_per_s"] / one["steps_per_s"], 3)
            speedup["meets_target"] = speedup["steady"] >= target
        ok = one["ok"] and many["ok"]

        header = ("run", "actors", "wall s", "at once", "stage-3 wall s", "ms/step", "steps/s", "samples/s", "speed-up")
        table = [header]
        for r in results:
            su = "1.00" if r is one else (f"{speedup['steady']:.2f}" if "steady" in speedup else "-")
            table.append((
                r["run"], str(len(r["actors"])), f"{r['wall_s']:.1f}", str(r["concurrency"]),
                "/".join(f"{a['stage_wall_s']:.0f}" if a["stage_wall_s"] else "-" for a in r["per_actor"]),
                "/".join(str(a["ms_per_step"]) for a in r["per_actor"]),
                f"{r['steps_per_s']:.3f}" if r["ok"] else "failed",
                f"{r['samples_per_s']:.2f}" if r["ok"] else "-", su,
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        print()
        for row in table:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if "steady" in speedup:
            verdict = "meets" if speedup["meets_target"] else "DOES NOT MEET"
            print(f"\n{k} actors vs 1: steady {speedup['steady']:.2f}× ({verdict} the {target}× target), "
                  f"end to end {speedup['end_to_end']:.2f}×"
                  + (f", common window {speedup['common_window']:.2f}×, windows overlap {many['overlap']:.0%}"
                     if "common_window" in speedup else f", windows overlap {many.get('overlap', 0):.0%}"), flush=True)
            if many["concurrency"] < k:
                print(f"warning: only {many['concurrency']} of {k} actors ran at once (resources)", flush=True)
            if many.get("overlap", 1.0) < 0.9:
                print("warning: the actors' steady windows overlap by less than 90%: the sum of rates overstates "
                      "the concurrent throughput; see common_window", flush=True)

        record.update(speedup=speedup, ok=ok, complete=True)
        save()
        print(f"wrote {out} (total {record['phases_s']['total']:.0f} s)")
        return 0 if ok else 1
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
