"""Render job throughput: frames/s of `cavatar render` end to end, against the pipeline's own frames/s.

Builds its inputs in a work folder (a temporary one unless ``--work DIR``): ``--actors`` synthetic
actors of ``--frames`` frames at the preset's resolution (``synthesize_actors``, the synthetic
emotion database, ``prepare``: what ``cavatar synth`` and ``cavatar prepare`` run), and one
random-weight bundle per actor for ``--preset`` (``save_bundle``; timings do not depend on the
values). A kept ``--work`` folder is reused: complete actors, up-to-date shards and bundles of the
same preset are not rebuilt. Then one timed call of ``consistent_avatar.render.render`` (what
``cavatar render`` calls) on a local Ray started with ``consistent_avatar.cluster.ensure_ray``
before the clock starts, into a fresh OUT, rendering the ``full`` row of every frame (``--split all``
by default).

Reported (from the report, the outputs parquet and the PNGs' modification times):

- wall: the whole ``render()`` call (input checks, the Ray Data job with its pool actors' start,
  bundle loads and ``--compile`` compilation, PNG and parquet writes, the merge into
  ``outputs.parquet``, the side-by-side mp4s, the manifest) → end-to-end frames/s;
- steady state: frames/s between the end of the first P batches to complete (P = pool size; with
  identical pool actors these are each actor's first batch, which carries the bundle load and
  compilation) and the last PNG — the job's rate once every pool actor is warm;
- the pipeline's own ms/frame, from the ``timings`` column of ``outputs.parquet`` (per batch: the
  ``ConsistentAvatarPipeline.__call__`` time, host→device copies included), over all batches and
  over the steady-state batches; P × that rate is what the pool would reach if reading shards,
  writing outputs and scheduling cost nothing, and the share of the steady window the pool spends
  inside pipeline calls says how close it comes. When ``benchmarks/results/pipeline_<preset>_*.json``
  (``bench_pipeline.py``) holds a row with the same device, dtype, steps, batch and compile on/off,
  it is shown as a reference too.

    PYTHONPATH=platform python benchmarks/bench_render.py --preset tiny --frames 128 --batch-size 4
    PYTHONPATH=platform python benchmarks/bench_render.py --preset sd15 --gpus-per-actor 1 \\
        --dtype bfloat16 --batch-size 16 --frames 256 --compile

An sd15 bundle is two UNets, a ControlNet and the VAE in float32 (several GB per actor): the work
folder (``--work``, else ``TMPDIR``) needs the room. Under ``--compile`` keep ``--frames`` a multiple
of ``--batch-size``: render pads a short last batch to ``--batch-size``, its pipeline time then covers
the padded batch, and (seen on CPU) the padded batch's image inputs have another memory layout than
the others, which makes torch.compile compile the ControlNet again inside the steady-state window.

Prints a table and writes JSON (default ``benchmarks/results/render_<preset>_<device>.json``) with
the command, the machine and a timestamp. Nothing is downloaded: the models are random, the data
synthetic.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PLATFORM = HERE.parent / "platform"
if str(PLATFORM) not in sys.path:
    sys.path.insert(0, str(PLATFORM))
# Ray's worker processes (prepare tasks, render pool actors) import the library too: they inherit
# this environment when the local Ray starts.
if str(PLATFORM) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLATFORM), os.environ.get("PYTHONPATH")) if p)

ROW = "full"
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # bench_pipeline's names

NOTES = " ".join(
    [
        "Random-weight bundles: timings do not depend on the values (LCM students only, the full row).",
        "Synthetic actors prepared at the preset's resolution. Building the inputs and starting Ray are",
        "not timed. wall_seconds = one render() call into a fresh OUT (force): input checks, the Ray Data",
        "job (pool actors' start, bundle load with the sha256 check unless --no-verify, torch.compile with",
        "--compile, shard reads, PNG + parquet part writes), merging the parts into outputs.parquet, the",
        "mp4s (unless --no-video) and the manifest; frames_per_s = frames / wall_seconds. pool_stage = the",
        "Ray Data job alone (report.render_seconds). first_batch_overhead_seconds = time to the first",
        "batch's last PNG minus its pipeline call: Ray Data and pool actor start (imports), bundle load,",
        "shard read, PNG writes. steady = frames of the batches finishing after the first pool_size",
        "batches to finish (each pool actor's first batch when the actors are alike; that batch carries",
        "the load and compilation) over the time from the pool_size-th batch's last PNG to the last PNG;",
        "a batch under way at that moment counts pro rata of its pipeline call inside the window. Times",
        "come from the PNGs' modification times: the outputs parquet records neither the pool actor nor",
        "a time per batch, so with several pool actors this is an approximation (exact with one).",
        "pipeline_* = the pipeline's own time per batch from the outputs parquet timings column",
        "(ConsistentAvatarPipeline.__call__, host-to-device copies included, synchronised on GPU).",
        "ideal_pool_frames_per_s = pool_size x the steady pipeline rate: what the pool would reach if",
        "reading, writing and scheduling cost nothing (on CPU the pool actors share the cores, so each",
        "call is slower than alone). steady.pipeline_busy_fraction = pipeline-call seconds inside the",
        "window / (pool_size x window). bench_pipeline_reference: the matching row of a bench_pipeline.py",
        "result (inputs already on the device, median of calls, its own thread count and compile mode),",
        "if any. --compile uses ConsistentAvatarPipeline.compile()'s defaults (render_compile) and",
        "compiles in each pool actor's first call; render pads a short last batch to --batch-size",
        "(partial_batches counts them): its pipeline time covers the padded batch while the per-frame",
        "figures divide it over the real frames, and it can recompile (another input memory layout).",
    ]
)


def progress(msg: str) -> None:
    print(f"[bench_render {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def bundle_vae(work: Path, args: argparse.Namespace, preset: Any) -> Path:
    """The random VAE every bundle of this run carries (same preset and seed), saved as a diffusers
    folder: ``--shard-latents`` prepares the shards with it, as a user prepares with the VAE their
    bundles are trained with, so that render may take the coarse TSD's latent from the shards."""
    from consistent_avatar.io import publish_dir, staging_dir
    from consistent_avatar.models import load_shared_components

    folder = work / f"vae_{preset.name}_seed{args.seed}"
    if not (folder / "config.json").is_file():  # staged: an interrupted save is never taken for a VAE
        progress(f"saving the bundles' random VAE (seed {args.seed}) to {folder}")
        staged = staging_dir(folder)
        load_shared_components(preset, seed=args.seed).vae.save_pretrained(staged)
        publish_dir(staged, folder)
    return folder


def build_shards(
    work: Path, args: argparse.Namespace, preset: Any
) -> tuple[Path, list[str], dict[str, Any]]:
    """Synthetic actors at the preset's resolution prepared into shards (reused when up to date);
    with ``--shard-latents`` prepared with the bundles' VAE (latent columns stored)."""
    from consistent_avatar.data.prepare import PrepareConfig, prepare
    from consistent_avatar.emotion import build_emotion_db
    from consistent_avatar.synthetic import SynthConfig, actor_name, synthesize_actors

    info: dict[str, Any] = {}
    resolution = preset.resolution
    src = work / f"actors_{resolution}"
    shards = work / (f"shards_{resolution}_latents_{preset.name}" if args.shard_latents else f"shards_{resolution}")
    vae = str(bundle_vae(work, args, preset)) if args.shard_latents else None
    names = [actor_name(i) for i in range(args.actors)]

    progress(f"synthesizing {args.actors} actor(s) × {args.frames} frames at {resolution}² in {src}")
    t0 = time.perf_counter()
    workers = max(1, min(args.actors, os.cpu_count() or 1))
    synthesize_actors(
        src,
        SynthConfig(actors=args.actors, frames=args.frames, res=resolution, seed=args.seed),
        workers=workers,
    )
    db = src / "emotion_db.parquet"
    if not db.is_file():
        build_emotion_db(db, source="synthetic", seed=args.seed + 1_000_003)  # as `cavatar synth`
    info["synth_seconds"] = round(time.perf_counter() - t0, 2)

    progress(f"preparing shards in {shards} (Ray Data)")
    t0 = time.perf_counter()
    gpus = 0.0
    if vae:
        import torch

        gpus = args.prepare_gpus if args.prepare_gpus is not None else (0.5 if torch.cuda.is_available() else 0.0)
    cfg = PrepareConfig(emotion_db=str(db), vae_path=vae, num_gpus_per_worker=gpus)
    report = prepare([str(src / n) for n in names], shards, cfg)
    if not report.ok:
        raise SystemExit(f"prepare failed: {report.failed}")
    info["prepare_seconds"] = round(time.perf_counter() - t0, 2)
    info["prepared"], info["prepare_skipped"] = report.prepared, report.skipped
    return shards, names, info


def build_bundles(
    work: Path, shards: Path, names: list[str], args: argparse.Namespace, preset: Any
) -> tuple[Path, dict[str, Any]]:
    """A random-weight bundle per actor at ``<work>/bundles_<preset>/<actor>`` (kept when one of the
    same preset is there). LCM students of both stages only: the ``full`` row samples with them."""
    import torch

    from consistent_avatar.bundle import PRESET_FILE, save_bundle
    from consistent_avatar.data.shards import load_manifest, read_emotion_table
    from consistent_avatar.models import build_fcsd, build_tsdm, load_shared_components
    from consistent_avatar.tsd import TSDConfig

    bundles = work / f"bundles_{preset.name}"
    todo = []
    for actor in names:
        p = bundles / actor / PRESET_FILE
        if (
            (bundles / actor / "bundle.json").is_file()
            and p.is_file()
            and json.loads(p.read_text()).get("name") == preset.name
        ):
            progress(f"keeping the bundle {bundles / actor}")
        else:
            todo.append(actor)
    t0 = time.perf_counter()
    if todo:
        progress(f"building random {preset.name} weights (seed {args.seed})")
        shared = load_shared_components(preset, seed=args.seed)
        tsdm, fcsd = build_tsdm(preset, shared, seed=args.seed), build_fcsd(preset, shared, seed=args.seed)
        # The emotion table of the shards (what a trained bundle carries); random rows of the
        # preset's width if the shards' text encoder has another one.
        labels, table = read_emotion_table(shards)
        if table.shape[1] != preset.conditioning.emotion_dim:
            g = torch.Generator().manual_seed(args.seed)
            table = torch.randn(len(labels), preset.conditioning.emotion_dim, generator=g).numpy()
        tsd = load_manifest(shards).get("tsd")  # as training's export: the shards' TSD settings
        for actor in todo:
            progress(f"saving the bundle {bundles / actor}")
            save_bundle(
                bundles / actor,
                actor=actor,
                preset=preset,
                weights={"lcm_tsdm": tsdm, "lcm_fcsd": fcsd},
                emotion_labels=labels,
                emotion_table=table,
                tsd=TSDConfig(**tsd) if tsd else None,
                training={"note": "benchmarks/bench_render.py: random weights"},
                seed=args.seed,
            )
        del tsdm, fcsd, shared
    return bundles, {"bundle_seconds": round(time.perf_counter() - t0, 2), "bundles_built": todo}


# ---------------------------------------------------------------------------------------------
# Analysis of what render wrote
# ---------------------------------------------------------------------------------------------


def batches_of(out: Path, names: list[str]) -> list[dict[str, Any]]:
    """One entry per rendered batch: frames, the pipeline's timings, and when its last PNG was
    written (the rows of a batch share one ``timings`` string)."""
    from consistent_avatar.render import read_outputs

    found: list[dict[str, Any]] = []
    for actor in names:
        t = read_outputs(out, ROW, actor)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, timing in enumerate(t["timings"].to_pylist()):
            groups[timing].append(i)
        pngs, frames = t["png"].to_pylist(), t["frame"].to_pylist()
        steps, samplers = t["steps"].to_pylist(), t["sampler"].to_pylist()
        for timing, rows in groups.items():
            found.append(
                {
                    "actor": actor,
                    "first_frame": min(frames[i] for i in rows),
                    "frames": len(rows),
                    "timings": json.loads(timing),
                    "done": max(os.stat(out / pngs[i]).st_mtime for i in rows),
                    "steps": steps[rows[0]],
                    "sampler": samplers[rows[0]],
                }
            )
    return sorted(found, key=lambda b: b["done"])


def pipeline_stats(batches: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not batches:
        return None
    frames = sum(b["frames"] for b in batches)
    total = sum(b["timings"]["total"] for b in batches)
    phases = sorted({k for b in batches for k in b["timings"]})
    return {
        "batches": len(batches),
        "frames": frames,
        "ms_per_frame": 1000 * total / frames,
        "frames_per_s": frames / total,
        "median_batch_ms_per_frame": statistics.median(
            1000 * b["timings"]["total"] / b["frames"] for b in batches
        ),
        "phase_ms_per_call": {
            k: 1000 * statistics.mean(b["timings"].get(k, 0.0) for b in batches) for k in phases
        },
    }


def compile_mode() -> dict[str, Any]:
    """What ``--compile`` does in the pool actors: ``ConsistentAvatarPipeline.compile()`` defaults."""
    import inspect

    from consistent_avatar.pipeline import ConsistentAvatarPipeline

    params = inspect.signature(ConsistentAvatarPipeline.compile).parameters
    keys = ("mode", "backend", "fullgraph", "dynamic", "vae", "channels_last")
    return {k: params[k].default for k in keys if k in params}


def reference_row(
    preset: str, device: str, dtype: str, steps: int, batch: int, compiled: bool
) -> dict[str, Any] | None:
    """The matching row of a bench_pipeline JSON in results/ (the newest file when several match)."""
    best: tuple[str, dict[str, Any]] | None = None
    for path in sorted((HERE / "results").glob(f"pipeline_{preset}_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        mode = (data.get("settings") or {}).get("compile")
        if bool(mode) != compiled:
            continue
        for r in data.get("results", []):
            if (
                r.get("preset") == preset
                and str(r.get("device", "")).split(":")[0] == device
                and r.get("dtype") == SHORT_DTYPE.get(dtype, dtype)
                and r.get("steps") == steps
                and r.get("batch") == batch
                and not r.get("baseline")
                and r.get("sampler") == "lcm"
            ):
                stamp = str(data.get("timestamp", ""))
                if best is None or stamp >= best[0]:
                    best = (
                        stamp,
                        {
                            "file": f"benchmarks/results/{path.name}",
                            "command": data.get("command"),
                            "compile": mode,
                            "no_compile_vae": (data.get("settings") or {}).get("no_compile_vae"),
                            "ms_per_frame": r["ms_per_frame"],
                            "frames_per_s": r["frames_per_s"],
                            "threads": (data.get("machine") or {}).get("torch_threads"),
                        },
                    )
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from consistent_avatar.render.cli import _concurrency

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="tiny | small | sd15 | a preset JSON path")
    ap.add_argument("--actors", type=int, default=1, help="synthetic actors (one bundle each)")
    ap.add_argument("--frames", type=int, default=64, help="frames per actor")
    ap.add_argument("--split", choices=["test", "train", "all"], default="all", help="frames to render")
    ap.add_argument("--batch-size", type=int, default=8, help="frames per network call")
    ap.add_argument("--steps", type=int, default=None, help="LCM steps (default: the bundle's, 4)")
    ap.add_argument(
        "--concurrency",
        type=_concurrency,
        default=None,
        metavar="N|MIN:MAX",
        help="pool actors (default: what the cluster fits)",
    )
    ap.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per pool actor (0: CPU)")
    ap.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs per pool actor (torch threads on CPU)"
    )
    ap.add_argument(
        "--io-cpus", type=float, default=None, help="CPUs per load/write task (default: render's, 0.1)"
    )
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks in each pool actor")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="torch.compile cache folder of the pool actors (render --compile-cache): run twice with the "
                    "same DIR to time a render whose compilation hits the cache")
    ap.add_argument(
        "--cache-size", type=int, default=2,
        help="actor pipelines each pool actor keeps (render's --cache-size); with --compile and more actors than "
        "this, later actors adopt a compiled pipeline instead of compiling (ConsistentAvatarPipeline.adopt)",
    )
    ap.add_argument(
        "--no-video", action="store_true", help="write no mp4 (default: mp4s are part of the job)"
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the bundles' sha256 check on load")
    ap.add_argument(
        "--shard-latents", action="store_true",
        help="prepare the shards with the bundles' VAE (latents stored), so that render's stage 2 takes the coarse "
        "TSD's latent from them instead of encoding it (RenderConfig.shard_latents; docs/render.md)",
    )
    ap.add_argument("--prepare-gpus", type=float, default=None,
                    help="with --shard-latents: GPUs per prepare worker for the VAE encode (default 0.5 with a "
                    "GPU, 0 without)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work folder to keep and reuse (default: a temporary one)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/render_<preset>_<device>.json)"
    )
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import ray

    from consistent_avatar.cluster import ensure_ray
    from consistent_avatar.io import atomic_write_json
    from consistent_avatar.models import load_preset
    from consistent_avatar.render import RenderConfig, render
    from consistent_avatar.render.cli import command_line
    from consistent_avatar.render.job import _resources

    preset = load_preset(args.preset)
    config = RenderConfig.build(
        split=args.split,
        rows=[ROW],
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.gpus_per_actor,
        num_cpus_per_actor=args.cpus_per_actor,
        **({} if args.io_cpus is None else {"io_cpus": args.io_cpus}),
        dtype=args.dtype,
        compile=args.compile,
        compile_cache=args.compile_cache,
        cache_size=args.cache_size,
        video=not args.no_video,
        verify_bundles=not args.no_verify,
        force=True,
        progress=True,
    )
    device = "cuda" if config.use_gpu else "cpu"
    preset_tag = Path(args.preset).stem if args.preset.endswith(".json") else args.preset
    out_json = Path(args.out) if args.out else HERE / "results" / f"render_{preset_tag}_{device}.json"

    tmp = None
    if args.work:
        work = Path(args.work).expanduser().absolute()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-render-")
        work = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        progress("starting a local Ray (consistent_avatar.cluster.ensure_ray; not timed)")
        ensure_ray(include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False  # render's own bar stays
        ray_seconds = round(time.perf_counter() - t0, 2)

        shards, names, inputs = build_shards(work, args, preset)
        bundles, binfo = build_bundles(work, shards, names, args, preset)
        inputs |= binfo | {
            "ray_start_seconds": ray_seconds,
            "work": str(work) if args.work else "(temporary)",
        }

        out = work / f"render_{preset.name}"
        if out.exists():
            shutil.rmtree(out)  # a fresh OUT: every frame is rendered by the timed run
        config = config.model_copy(update={"actors": names})
        if args.compile and args.split == "all" and args.frames % args.batch_size:
            progress(
                f"note: {args.frames} frames is not a multiple of --batch-size {args.batch_size}: render "
                "pads the last batch, whose per-frame pipeline time then reads high (and it may recompile)"
            )
        equivalent = command_line(str(shards), str(bundles), str(out), config)
        progress(f"rendering (timed): {equivalent}")
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        start_epoch = time.time()
        t0 = time.perf_counter()
        report = render(shards, bundles, out, config, command=equivalent)
        wall = time.perf_counter() - t0
        end_epoch = time.time()
        print(report.table(), file=sys.stderr)

        batches = batches_of(out, names)
        res = _resources(config, max(1, len(batches)))  # the pool the job ran with (same rule as render)
        pool_size = int(res.pool.max_size)
        frames = report.frames
        first, rest = batches[:pool_size], batches[pool_size:]
        steady: dict[str, Any] | None = None
        if rest:
            # From when every pool actor has finished a batch to the last PNG. A batch of another
            # actor that was under way at the window's start counts pro rata of its pipeline call
            # [done - pipeline seconds, done] inside the window.
            w0, w1 = first[-1]["done"], batches[-1]["done"]
            n = busy = 0.0
            for b in rest:
                call = b["timings"]["total"]
                inside = min(1.0, (b["done"] - w0) / call) if call > 0 else 1.0
                n += b["frames"] * inside
                busy += call * inside
            steady = {
                "excluded_batches": len(first),
                "batches": len(rest),
                "frames": round(n, 2),
                "seconds": w1 - w0,
                "frames_per_s": n / (w1 - w0) if w1 > w0 else None,
                # share of the window the pool actors spend inside pipeline calls (1.0: reading shards,
                # writing outputs and scheduling are all hidden or free)
                "pipeline_busy_fraction": busy / (pool_size * (w1 - w0)) if w1 > w0 else None,
            }
        pipe_all, pipe_steady = pipeline_stats(batches), pipeline_stats(rest)
        pipe_ref = pipe_steady or pipe_all
        steps = batches[0]["steps"] if batches else None
        results: dict[str, Any] = {
            "frames": frames,
            "loadavg_1m_before": load_before,
            "actors": len(names),
            "batches": len(batches),
            "pool_size": pool_size,
            "pool_actor_cpus": res.actor_cpus,
            "io_cpus": res.io_cpus,
            "io_tasks_per_stage": res.io_tasks,
            "steps": steps,
            "sampler": batches[0]["sampler"] if batches else None,
            "dtype": config.torch_dtype_name,
            "wall_seconds": wall,
            "frames_per_s": frames / wall if wall > 0 else None,
            "pool_stage_seconds": report.render_seconds,
            "frames_per_s_pool_stage": frames / report.render_seconds if report.render_seconds > 0 else None,
            "first_batch_done_seconds": batches[0]["done"] - start_epoch if batches else None,
            "first_batches_done_seconds": first[-1]["done"] - start_epoch if first else None,
            "after_last_png_seconds": end_epoch - batches[-1]["done"] if batches else None,
            "steady": steady,
            "pipeline_all_batches": pipe_all,
            "pipeline_steady_batches": pipe_steady,
            "first_batches_pipeline_ms_per_frame": [
                1000 * b["timings"]["total"] / b["frames"] for b in first
            ],
            "ideal_pool_frames_per_s": pool_size * pipe_ref["frames_per_s"] if pipe_ref else None,
            "failed": report.failed,
            "videos": len(report.videos),
            # per actor: whether stage 2 took the shards' coarse latent, or why not (render's own decision)
            "shard_latents": dict(report.shard_latents),
        }
        results["partial_batches"] = sum(1 for b in batches if b["frames"] < args.batch_size)
        if batches:
            # before the first batch's PNGs: Ray Data start, pool actor start (imports), bundle load,
            # that batch's shard read and its PNG writes; its pipeline call (compilation included) is not
            results["first_batch_overhead_seconds"] = (
                results["first_batch_done_seconds"] - batches[0]["timings"]["total"]
            )
        if steps is not None:
            results["render_compile"] = compile_mode() if args.compile else None
            results["bench_pipeline_reference"] = reference_row(
                preset.name, device, config.torch_dtype_name, steps, args.batch_size, args.compile
            )

        import diffusers
        from machine import machine_info

        machine = machine_info(gpu=device == "cuda") | {
            "diffusers": diffusers.__version__,
            "ray": ray.__version__,
            "ray_cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        }
        atomic_write_json(
            out_json,
            {
                "benchmark": "render",
                "command": "PYTHONPATH=platform python "
                + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                "render_command": equivalent,
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine,
                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")}
                | {"render_config": config.model_dump(mode="json", exclude={"actors"})},
                "inputs": inputs,
                "notes": NOTES,
                "results": results,
            },
        )
    finally:
        if tmp is not None:
            tmp.cleanup()

    r = results
    if not batches:
        print(f"nothing rendered: {report.failed}", file=sys.stderr)
        print(f"\nwrote {out_json}")
        return 1
    rows = [
        (
            "preset / device / dtype",
            f"{preset.name} / {device} / {r['dtype']}" + (" / compiled" if args.compile else ""),
        ),
        (
            "batch × steps, pool actors",
            f"{args.batch_size} × {r['steps']}, {pool_size} (× {res.actor_cpus:g} CPU; I/O tasks "
            f"{res.io_cpus:g} CPU, " + (f"≤ {res.io_tasks} per stage)" if res.io_tasks else "as many as Ray Data runs)"),
        ),
        ("frames (actors × frames)", f"{frames} ({len(names)} × {args.frames}, split {args.split})"),
        ("wall, render() call", f"{wall:.2f} s → {r['frames_per_s']:.2f} frames/s end to end"),
        ("Ray Data stage", f"{report.render_seconds:.2f} s → {r['frames_per_s_pool_stage']:.2f} frames/s"),
        (
            "first batch written after",
            f"{r['first_batch_done_seconds']:.2f} s "
            f"({r['first_batch_overhead_seconds']:.2f} s outside its pipeline call)",
        ),
        ("merge + mp4 + manifest", f"{r['after_last_png_seconds']:.2f} s"),
    ]
    if steady and steady["frames_per_s"]:
        rows.append(
            (
                "steady state",
                f"{steady['frames_per_s']:.2f} frames/s ({steady['frames']:.0f} frames in "
                f"{steady['seconds']:.2f} s, "
                f"first {steady['excluded_batches']} batch(es) excluded)",
            )
        )
    else:
        rows.append(("steady state", "n/a (no batch after each pool actor's first: raise --frames)"))
    if pipe_all:
        rows.append(
            (
                "pipeline, all batches",
                f"{pipe_all['ms_per_frame']:.2f} ms/frame ({pipe_all['frames_per_s']:.2f} frames/s)",
            )
        )
    if pipe_steady:
        rows.append(
            (
                "pipeline, steady batches",
                f"{pipe_steady['ms_per_frame']:.2f} ms/frame ({pipe_steady['frames_per_s']:.2f} frames/s)",
            )
        )
    if r["ideal_pool_frames_per_s"]:
        rows.append(("pool × pipeline rate", f"{r['ideal_pool_frames_per_s']:.2f} frames/s"))
    if steady and steady["pipeline_busy_fraction"] is not None:
        rows.append(
            (
                "pool busy in pipeline calls",
                f"{100 * steady['pipeline_busy_fraction']:.0f}% of the steady window",
            )
        )
    ref = r.get("bench_pipeline_reference")
    if ref:
        rows.append(
            (
                "bench_pipeline.py",
                f"{ref['ms_per_frame']:.2f} ms/frame ({ref['frames_per_s']:.2f} frames/s), {ref['file']}",
            )
        )
    width = max(len(k) for k, _ in rows)
    print(f"\ncavatar render throughput ({preset.name}, random weights)")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.compile and r["partial_batches"]:
        print(
            f"note: {r['partial_batches']} short batch(es), padded to --batch-size under --compile: "
            "their pipeline time covers the padded frames (and may include a recompilation)"
        )
    if report.failed:
        print(f"FAILED: {report.failed}", file=sys.stderr)
    print(f"\nwrote {out_json}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
