"""Prepare throughput: frames/s of `cavatar prepare` at a given resolution, and how it scales with CPUs.

For each worker count, a fresh local Ray with that many CPUs prepares the same synthetic actors
from scratch (``force``). The synthetic actors are generated once, outside the timed region.

    python benchmarks/bench_prepare.py --res 512 --frames 64 --actors 2 --cpus 1 2

Prints a table and writes JSON (default benchmarks/results/prepare.json) with the command and the
machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def machine() -> dict[str, object]:
    from machine import machine_info

    return machine_info()

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--frames-per-task", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prepare.json"))
    args = ap.parse_args()

    import ray

    from consistent_avatar.data.prepare import PrepareConfig, prepare
    from consistent_avatar.emotion import build_emotion_db
    from consistent_avatar.synthetic import SynthConfig, synthesize_actors

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        synthesize_actors(src, SynthConfig(actors=args.actors, frames=args.frames, res=args.res, seed=0))
        build_emotion_db(src / "emotion_db.parquet", source="synthetic")
        for cpus in args.cpus:
            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            cfg = PrepareConfig(force=True, workers=cpus, frames_per_task=args.frames_per_task)
            prepare([str(src)], Path(tmp) / "warm", cfg.model_copy(update={"workers": cpus}))  # warm-up: imports, Ray workers
            t0 = time.perf_counter()
            report = prepare([str(src)], Path(tmp) / f"S{cpus}", cfg)
            wall = time.perf_counter() - t0
            ray.shutdown()
            assert report.ok, report.failed
            rows.append({"cpus": cpus, "frames": report.frames, "seconds": wall, "frames_per_s": report.frames / wall})

    base = rows[0]["frames_per_s"]
    print(f"prepare throughput at {args.res}² ({args.actors} actors × {args.frames} frames)")
    print(f"{'cpus':>4}  {'frames':>6}  {'seconds':>8}  {'frames/s':>8}  {'speed-up':>8}")
    for r in rows:
        r["speedup"] = r["frames_per_s"] / base
        print(f"{r['cpus']:>4}  {r['frames']:>6}  {r['seconds']:>8.2f}  {r['frames_per_s']:>8.2f}  {r['speedup']:>8.2f}")
    result = {
        "benchmark": "prepare",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(),
        "resolution": args.res,
        "rows": rows,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
