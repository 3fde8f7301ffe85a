"""`cavatar evaluate` and `cavatar report` (registered by the main CLI with :func:`register_cli`)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any


def _names(values: list[str] | None) -> list[str] | None:
    """``--rows a b`` and ``--rows a,b`` both work."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def register_cli(subparsers: Any) -> None:
    """Add the ``evaluate`` and ``report`` sub-commands to ``cavatar``'s sub-parsers."""
    e = subparsers.add_parser(
        "evaluate",
        help="metrics of a render run against the shards (L2/PSNR/SSIM/LPIPS, s/frame, PE/EE, temporal) + report.html",
    )
    e.add_argument("--run", required=True, help="render run folder (holds render_manifest.json, from `cavatar render`)")
    e.add_argument("--out", default=None, help="evaluation folder (default: RUN/eval)")
    e.add_argument("--rows", nargs="+", default=None,
                   help="rows to evaluate (default: every rendered row + coarse); 'coarse' = the stage-1 input")
    e.add_argument("--actors", nargs="+", default=None, help="actors to evaluate (default: every rendered actor)")
    e.add_argument("--shards", default=None,
                   help="shards: a folder or a pyarrow filesystem URI such as s3://bucket/shards "
                        "(default: the shards named in the render manifest)")
    e.add_argument("--no-lpips", action="store_true", help="skip LPIPS (reported as unavailable)")
    e.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex", help="LPIPS backbone")
    e.add_argument("--torch-home", default=None, help="TORCH_HOME holding the LPIPS backbone weights (offline)")
    e.add_argument("--flow", choices=["auto", "farneback", "raft"], default="auto",
                   help="optical-flow method (auto: RAFT when its weights are in the torch hub cache, else Farneback)")
    e.add_argument("--face-estimator", default="none",
                   help="face-parameter estimator for pose/expression error: a face regressor folder (python -m "
                   "consistent_avatar.evaluation.face train --out DIR), a JSON spec file such as {\"kind\": \"deca\", "
                   "\"weights\": \"deca_model.tar\"} (docs/evaluation.md), or 'none'")
    e.add_argument("--mask", action="store_true", help="compare the foreground (shard mask) only")
    e.add_argument("--device", default="cpu", help="torch device for LPIPS / RAFT / the estimator")
    e.add_argument("--workers", type=int, default=1, help="processes evaluating (row, actor) videos in parallel")
    e.add_argument("--no-report", action="store_true", help="do not write report.html")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_evaluate)

    r = subparsers.add_parser("report", help="metrics.json (from `cavatar evaluate`) → self-contained report.html")
    r.add_argument("--metrics", required=True, help="EVAL/metrics.json")
    r.add_argument("--out", default=None, help="HTML file (default: report.html beside the metrics)")
    r.set_defaults(func=run_report)


def config_from_args(args: argparse.Namespace) -> Any:
    from .job import EvaluateConfig

    return EvaluateConfig(
        rows=_names(args.rows),
        actors=_names(args.actors),
        shards=args.shards,
        lpips=not args.no_lpips,
        lpips_net=args.lpips_net,
        torch_home=args.torch_home,
        flow=args.flow,
        face_estimator=args.face_estimator,
        mask_foreground=args.mask,
        device=args.device,
        workers=args.workers,
        report=not args.no_report,
        progress=not args.no_progress,
        command=command_of(args),
    )


def command_of(args: argparse.Namespace) -> str:
    """The `cavatar evaluate` command line equivalent to ``args`` (recorded in metrics.json)."""
    argv = ["cavatar", "evaluate", "--run", str(args.run)]
    for flag, value in (("--out", args.out), ("--shards", args.shards), ("--torch-home", args.torch_home)):
        if value:
            argv += [flag, str(value)]
    for flag, values in (("--rows", _names(args.rows)), ("--actors", _names(args.actors))):
        if values:
            argv += [flag, *values]
    if args.no_lpips:
        argv.append("--no-lpips")
    if args.lpips_net != "alex":
        argv += ["--lpips-net", args.lpips_net]
    argv += ["--flow", args.flow, "--face-estimator", str(args.face_estimator)]
    if args.mask:
        argv.append("--mask")
    if args.device != "cpu":
        argv += ["--device", args.device]
    if args.workers != 1:
        argv += ["--workers", str(args.workers)]
    if args.no_report:
        argv.append("--no-report")
    return shlex.join(argv)


def run_evaluate(args: argparse.Namespace) -> int:
    from .job import evaluate

    result = evaluate(args.run, args.out, config_from_args(args))
    print(result.table())
    report = f"; report: {result.report_path}" if result.report_path else ""
    print(f"wrote {result.metrics_path} and {result.per_frame_path}{report}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from .report import write_report

    metrics = Path(args.metrics)
    out = Path(args.out) if args.out else metrics.parent / "report.html"
    write_report(metrics, out)
    print(f"wrote {out}")
    return 0
