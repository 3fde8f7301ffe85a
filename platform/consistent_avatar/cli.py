"""`cavatar`: one sub-command per job. Thin: parse arguments, call the library, report.

Every sub-command exits 0 on success, 1 when some input failed (the summary says which), and 2 on a
usage error (argparse). Errors the user can fix are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ConsistentAvatarError


def _cmd_synth(args: argparse.Namespace) -> int:
    from .emotion import build_emotion_db
    from .synthetic import SynthConfig, synthesize_actors

    cfg = SynthConfig(actors=args.actors, frames=args.frames, res=args.res, seed=args.seed, degradation=args.degradation)
    paths = synthesize_actors(Path(args.out), cfg, workers=args.workers)
    db_path = Path(args.out) / "emotion_db.parquet"
    db = build_emotion_db(db_path, source="synthetic", seed=args.seed + 1_000_003)
    print(f"wrote {len(paths)} synthetic actors ({args.frames} frames, {args.res}²) under {args.out}")
    print(f"wrote the synthetic emotion database ({len(db.labels)} labelled expressions) to {db_path}")
    return 0


def _cmd_emotion_db(args: argparse.Namespace) -> int:
    from .emotion import build_emotion_db

    if args.mead_root:
        db = build_emotion_db(Path(args.out), source="mead", mead_root=Path(args.mead_root), codes=args.codes)
    else:
        db = build_emotion_db(Path(args.out), source="synthetic", num_speakers=args.speakers, seed=args.seed)
    print(f"wrote {len(db.labels)} labelled expression vectors to {args.out}")
    return 0


def _prepare_config(args: argparse.Namespace):  # -> PrepareConfig
    from .data.prepare import PrepareConfig
    from .tsd import TSDConfig

    tsd_kwargs = {"omega": args.omega} if args.omega is not None else {}
    return PrepareConfig(
        resolution=args.res,
        test_frames=args.test_frames,
        tsd=TSDConfig(**tsd_kwargs),
        emotion_db=args.emotion_db,
        smoothing_window=args.smoothing,
        emotion_metric=args.emotion_metric,
        clip_path=args.clip,
        vae_path=args.vae,
        frames_per_task=args.frames_per_task,
        workers=args.workers,
        num_gpus_per_worker=args.gpus_per_worker,
        force=args.force,
    )


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare

    config = _prepare_config(args)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address  # prepare() starts Ray only once its inputs check out
    report = prepare(args.sources, args.out, config)
    print(report.table())
    if report.failed:
        print(f"{len(report.failed)} actor(s) failed; the others are complete in {args.out}", file=sys.stderr)
        for name, msg in report.failed.items():
            print(f"  {name}: {msg}", file=sys.stderr)
        return 1
    return 0


def _demo_train_config() -> str:
    """The shipped short training schedule for the demo (tiny preset, from scratch, a few minutes)."""
    from importlib import resources

    return str(resources.files("consistent_avatar") / "presets" / "training" / "demo.json")


def _cmd_demo(args: argparse.Namespace) -> int:
    """The whole method end to end on embedded defaults (local Ray, synthetic actors, CPU).

    synth → prepare → face regressor (for pose/expression error) → train (tiny preset, the short
    schedule in presets/training/demo.json) → render every ablation row of the test split →
    evaluate → report.html. Every step is the same sub-command a user runs; a re-run resumes
    (prepare, train and render skip what is complete).
    """
    out = Path(args.out)
    actors = [f"actor_{i:03d}" for i in range(args.actors)]
    steps: list[tuple[str, list[str]]] = [
        ("synth", ["synth", "--out", str(out / "actors"), "--actors", str(args.actors),
                   "--frames", str(args.frames), "--res", "64"]),
        ("prepare", ["prepare", "--sources", str(out / "actors"), "--out", str(out / "shards"),
                     "--emotion-metric", "euclidean"]),
        ("face-regressor", ["face-regressor", "--out", str(out / "face_regressor"), "--actors", "12",
                            "--frames-per-actor", "60", "--holdout-actors", "2", "--epochs", "8"]),
        ("train", ["train", "--shards", str(out / "shards"), "--actors", ",".join(actors), "--preset", "tiny",
                   "--config", _demo_train_config(), "--out", str(out / "train"), "--cpus-per-worker", "0.5",
                   "--gpus-per-worker", "0"]),
        ("render", ["render", "--shards", str(out / "shards"), "--bundles", str(out / "train" / "bundles"),
                    "--out", str(out / "render"), "--rows", "all"]),
        ("evaluate", ["evaluate", "--run", str(out / "render"), "--face-estimator", str(out / "face_regressor")]),
    ]
    if (out / "face_regressor" / "config.json").is_file():
        steps = [s for s in steps if s[0] != "face-regressor"]
    for name, argv in steps:
        print(f"\n== demo step: cavatar {' '.join(argv)}", flush=True)
        code = main(argv)
        if code != 0:
            print(f"demo stopped: step {name!r} exited with {code}", file=sys.stderr)
            return code
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    print("\n== demo finished. Written:")
    print(f"  {out / 'actors'}: synthetic actors in the INSTA layout + emotion_db.parquet")
    print(f"  {out / 'shards'}: parquet shards of {len(manifest['actors'])} actors at {manifest['resolution']}², manifest.json")
    for name, a in manifest["actors"].items():
        print(f"    {name}: {a['train']} train + {a['test']} test frames")
    print(f"  {out / 'face_regressor'}: the synthetic face-parameter regressor (pose / expression error)")
    print(f"  {out / 'train'}: training runs; bundles under {out / 'train' / 'bundles'}")
    print(f"  {out / 'render'}: rendered test frames per ablation row (PNG, outputs.parquet, side-by-side mp4)")
    print(f"  {out / 'render' / 'eval'}: metrics.json, per_frame.parquet and report.html (open it in a browser)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cavatar", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic actors (INSTA layout) and a synthetic emotion database")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--actors", type=int, default=3)
    s.add_argument("--frames", type=int, default=120)
    s.add_argument("--res", type=int, default=128, help="square resolution, at most 512")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--degradation", type=float, default=1.0, help="strength of the stage-1-like degradation")
    s.add_argument("--workers", type=int, default=1, help="processes (one actor each)")
    s.set_defaults(func=_cmd_synth)

    e = sub.add_parser("emotion-db", help="build the labelled expression database (eq. 7)")
    e.add_argument("--out", required=True, help="output parquet file")
    e.add_argument("--mead-root", help="MEAD-layout folder of clips (default: synthetic MEAD speakers)")
    e.add_argument("--codes", help="precomputed per-frame expression codes for --mead-root (parquet or npz)")
    e.add_argument("--speakers", type=int, default=8, help="synthetic speakers")
    e.add_argument("--seed", type=int, default=1234)
    e.set_defaults(func=_cmd_emotion_db)

    r = sub.add_parser("prepare", help="actor sources → parquet shards with TSD and emotion labels (Ray Data)")
    r.add_argument("--sources", nargs="+", required=True, help="actor folders, or folders holding actor folders")
    r.add_argument("--out", required=True, help="shard folder")
    r.add_argument("--res", type=int, default=None, help="output resolution (default: the sources')")
    r.add_argument("--test-frames", type=int, default=None, help="test split size (default: min(350, frames//5))")
    r.add_argument("--omega", type=float, default=None, help="TSD radius at 512² (default 10)")
    r.add_argument("--emotion-db", default=None, help="emotion database (default: <source>/emotion_db.parquet)")
    r.add_argument("--smoothing", type=int, default=1, help="temporal majority window for emotion labels")
    r.add_argument("--emotion-metric", choices=["cosine", "euclidean"], default="cosine",
                   help="cosine = paper eq. 7; euclidean labels neutral frames far better on synthetic actors")
    r.add_argument("--clip", default=None, help="local CLIP text encoder folder (default: random-init encoder)")
    r.add_argument("--vae", default=None, help="local AutoencoderKL folder: store VAE latents too")
    r.add_argument("--frames-per-task", type=int, default=16)
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--gpus-per-worker", type=float, default=0.0)
    r.add_argument("--force", action="store_true", help="re-prepare actors that are up to date")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    r.set_defaults(func=_cmd_prepare)

    d = sub.add_parser("demo", help="the whole method end to end on embedded defaults (local Ray, synthetic actors, CPU)")
    d.add_argument("--out", default="runs/demo", help="folder for every step's outputs; a re-run resumes (default: runs/demo)")
    d.add_argument("--actors", type=int, default=2, help="synthetic actors (default 2)")
    d.add_argument("--frames", type=int, default=100, help="frames per actor, the last fifth the test split (default 100)")
    d.set_defaults(func=_cmd_demo)

    from .training.cli import register_cli as register_train
    from .evaluation.cli import register_cli as register_evaluate
    from .render.cli import register_cli as register_render
    from .evaluation.face import register_cli as register_face_regressor

    register_train(sub)
    register_evaluate(sub)
    register_render(sub)
    register_face_regressor(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConsistentAvatarError as exc:
        print(f"cavatar {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
