"""`cavatar train`: the sub-command (registered by the main CLI with :func:`register_cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``cavatar``'s sub-parsers."""
    t = subparsers.add_parser(
        "train",
        help="train actors: stage 2 (TSDM) → stage 3 (FCSD) → LCM distillation → bundle (Ray Train + DeepSpeed)",
    )
    t.add_argument("--shards", required=True, help="shard folder written by `cavatar prepare`, or its pyarrow filesystem URI (s3://, gs://, file://)")
    t.add_argument("--actors", default="", help="comma-separated actor names (default: every prepared actor)")
    t.add_argument("--preset", default=None, help="model preset name (tiny, small, sd15) or JSON path")
    t.add_argument("--out", required=True, help="run folder (bundles under OUT/bundles/<actor>)")
    t.add_argument("--config", default=None, help="training config JSON (TrainConfig); defaults: the paper's")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set fcsd.iterations=2000 (repeatable)")
    t.add_argument("--workers", type=int, default=None, help="training workers per actor")
    t.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per training worker; 0 trains on CPU even on a GPU cluster (default: 1 when the cluster has GPUs)")
    t.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per training worker (default 1)")
    t.add_argument("--max-concurrent", type=int, default=None, help="cap on actors trained at once")
    t.add_argument("--checkpoint-storage", default=None, help="pyarrow-filesystem URI for checkpoints (s3://…)")
    t.add_argument("--until", default=None, help="last stage to train: vae, tsdm, lcm_tsdm, fcsd, lcm_fcsd")
    t.add_argument("--force", action="store_true", help="delete the actors' earlier runs and start over")
    t.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_cli)
    return t


def config_from_args(args: argparse.Namespace) -> Any:
    from .config import TrainConfig

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"scaling.num_workers={args.workers}")
    per_worker: dict[str, float] = dict(config.scaling.resources_per_worker or {})
    if args.cpus_per_worker is not None:
        per_worker["CPU"] = args.cpus_per_worker
    if args.gpus_per_worker is not None:
        if args.gpus_per_worker > 0:
            per_worker["GPU"] = args.gpus_per_worker
        else:  # CPU workers, also on a GPU cluster (a zero entry would only be an empty ask to Ray)
            per_worker.pop("GPU", None)
        overrides.append(f"scaling.use_gpu={'true' if args.gpus_per_worker > 0 else 'false'}")
    if args.cpus_per_worker is not None or args.gpus_per_worker is not None:
        import json

        # null when nothing is left (a config's lone GPU entry under --gpus-per-worker 0): the default CPU
        overrides.append(f"scaling.resources_per_worker={json.dumps(per_worker or None)}")
    if args.max_concurrent is not None:
        overrides.append(f"max_concurrent_actors={args.max_concurrent}")
    if args.checkpoint_storage:
        overrides.append(f"checkpoint_storage={args.checkpoint_storage}")
    if args.until:
        overrides.append(f"until={args.until}")
    return config.with_overrides(overrides) if overrides else config


def run_cli(args: argparse.Namespace) -> int:
    from . import train

    config = config_from_args(args)
    actors = [a.strip() for a in args.actors.split(",") if a.strip()]
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    report = train(args.shards, actors, args.preset, args.out, config, force=args.force, progress=not args.no_progress)
    print(report.table())
    for actor, error in report.failed.items():
        print(f"  {actor}: {error}", file=sys.stderr)
    return 0 if report.ok else 1
