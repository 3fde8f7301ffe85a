"""`cavatar render`: the sub-command (registered by the main CLI with :func:`register_cli`)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from .config import ROWS, RenderConfig


def _concurrency(text: str) -> int | tuple[int, int]:
    """``N`` (a fixed pool) or ``MIN:MAX`` (an autoscaling pool)."""
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return int(lo), int(hi)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``render`` sub-command to ``cavatar``'s sub-parsers."""
    r = subparsers.add_parser(
        "render",
        help="render actors' frames from shards with their bundles (Ray Data batch inference): PNG, parquet, mp4",
    )
    r.add_argument("--shards", required=True,
                   help="shards written by `cavatar prepare`: a folder or a pyarrow filesystem URI "
                        "(file:///…, s3://bucket/…, gs://bucket/…)")
    r.add_argument("--bundles", required=True, help="folder or URI holding one bundle per actor: <bundles>/<actor>")
    r.add_argument("--out", required=True, help="output folder, a local or shared-filesystem path, not a URI (see docs/render.md for its layout)")
    r.add_argument("--split", choices=["test", "train", "all"], default="test", help="frames to render (default: test)")
    r.add_argument("--actors", default="", help="comma-separated actor names (default: every prepared actor)")
    r.add_argument("--rows", default="full", help=f"comma-separated ablation rows, or 'all': {', '.join(ROWS)} (default: full)")
    r.add_argument("--sampler", choices=["lcm", "ddim", "dpm"], default=None, help="sampler (default: the bundle's)")
    r.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    r.add_argument("--teacher-sampler", choices=["ddim", "dpm"], default=None, help="sampler of the without_lcm row")
    r.add_argument("--teacher-steps", type=int, default=None,
                   help="steps when the teachers sample: the without_lcm row, and any row under --sampler ddim|dpm without --steps")
    r.add_argument("--seed", type=int, default=0, help="frame i is sampled with seed + i")
    r.add_argument("--batch-size", type=int, default=8, help="frames per network call")
    r.add_argument("--concurrency", type=_concurrency, default=None, metavar="N|MIN:MAX", help="pool actors")
    r.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per pool actor (0: CPU)")
    r.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per pool actor")
    r.add_argument("--io-cpus", type=float, default=0.1,
                   help="CPUs per load task (shard reads, PNG decoding) and write task (PNG encoding, parquet)")
    r.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="network dtype (auto: bfloat16 on GPU, float32 on CPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the networks in each pool actor")
    r.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="with --compile: torch.compile's cache folder, shared by every pool actor and later jobs "
                   "(a volume every node mounts; default: torch's, per node)")
    r.add_argument("--no-shard-latents", action="store_true",
                   help="always VAE-encode the coarse TSD in stage 2; by default an actor whose shards were "
                   "prepared with its bundle's VAE (`prepare --vae`, the same tensors and latent config by "
                   "content, same TSD settings) takes their stored latent_tsd_coarse instead (faster; frames "
                   "differ by fp16 rounding and are recorded as such)")
    ref = r.add_mutually_exclusive_group()
    ref.add_argument("--refiner", default=None, help="refiner directory overriding the bundles' reference")
    ref.add_argument("--no-refiner", action="store_true", help="render without the refiner the bundles reference")
    r.add_argument("--cache-size", type=int, default=2, help="loaded actor pipelines per pool actor (LRU)")
    r.add_argument("--fps", type=float, default=25.0, help="frame rate of the mp4s")
    r.add_argument("--no-video", action="store_true", help="write no mp4")
    r.add_argument("--no-verify", action="store_true", help="skip the bundles' sha256 check on load")
    r.add_argument("--force", action="store_true", help="re-render frames that exist (also under other settings)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run_cli)
    return r


def config_from_args(args: argparse.Namespace) -> RenderConfig:
    rows = list(ROWS) if args.rows.strip() == "all" else _names(args.rows)
    actors = _names(args.actors) or None
    return RenderConfig.build(
        split=args.split,
        actors=actors,
        rows=rows,
        sampler=args.sampler,
        steps=args.steps,
        teacher_sampler=args.teacher_sampler,
        teacher_steps=args.teacher_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.gpus_per_actor,
        num_cpus_per_actor=args.cpus_per_actor,
        io_cpus=args.io_cpus,
        dtype=args.dtype,
        compile=args.compile,
        compile_cache=args.compile_cache,
        shard_latents=not args.no_shard_latents,
        refine=False if args.no_refiner else None,
        refiner=args.refiner,
        cache_size=args.cache_size,
        fps=args.fps,
        video=not args.no_video,
        verify_bundles=not args.no_verify,
        force=args.force,
        progress=not args.no_progress,
    )


def command_line(shards: str, bundles: str, out: str, config: RenderConfig) -> str:
    """The `cavatar render` command that reproduces ``config`` (recorded in the manifest)."""
    argv = ["cavatar", "render", "--shards", shards, "--bundles", bundles, "--out", out, "--split", config.split]
    if config.actors:
        argv += ["--actors", ",".join(config.actors)]
    argv += ["--rows", ",".join(config.rows), "--seed", str(config.seed), "--batch-size", str(config.batch_size)]
    for flag, value in (
        ("--sampler", config.sampler),
        ("--steps", config.steps),
        ("--teacher-sampler", config.teacher_sampler),
        ("--teacher-steps", config.teacher_steps),
        ("--refiner", config.refiner),
        ("--compile-cache", config.compile_cache),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if config.concurrency is not None:
        c = config.concurrency
        argv += ["--concurrency", f"{c[0]}:{c[1]}" if isinstance(c, tuple) else str(c)]
    argv += ["--gpus-per-actor", f"{config.num_gpus_per_actor:g}", "--cpus-per-actor", f"{config.num_cpus_per_actor:g}"]
    argv += ["--io-cpus", f"{config.io_cpus:g}"]
    argv += ["--dtype", config.dtype, "--cache-size", str(config.cache_size), "--fps", f"{config.fps:g}"]
    for flag, on in (
        ("--compile", config.compile),
        ("--no-shard-latents", not config.shard_latents),
        ("--no-refiner", config.refine is False),
        ("--no-video", not config.video),
        ("--no-verify", not config.verify_bundles),
        ("--force", config.force),
        ("--no-progress", not config.progress),
    ):
        if on:
            argv.append(flag)
    return shlex.join(argv)


def run_cli(args: argparse.Namespace) -> int:
    from .job import render

    config = config_from_args(args)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address  # render() starts Ray only once its inputs check out
    report = render(
        args.shards, args.bundles, args.out, config, command=command_line(args.shards, args.bundles, args.out, config)
    )
    print(report.table())
    print(f"outputs: {report.out} (manifest {report.manifest}, layout: docs/render.md)")
    if report.failed:
        print(f"{len(report.failed)} actor(s) failed; everything else is complete in {args.out}", file=sys.stderr)
        for actor, msg in report.failed.items():
            print(f"  {actor}: {msg}", file=sys.stderr)
        return 1
    return 0

