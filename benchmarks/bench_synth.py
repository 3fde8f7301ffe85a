"""Synthetic actor generator throughput, per CPU core: frames/s of the full per-frame output.

Full output = real frame (RGB + mask) + normal map + stage-1 coarse RGB, normal and mask, from the
procedural head (`consistent_avatar.synthetic`). Runs single-threaded (torch, OpenCV and BLAS pinned
to one thread, one process), so frames/s is per core. Reports wall-clock and CPU-time rates (CPU
time is robust to other load on a shared machine), the one-off per-actor setup (textures), and the
rate including writing the INSTA-layout files (PNG + txt) to a temporary folder.

    PYTHONPATH=platform python benchmarks/bench_synth.py [--res 128 256 512] [--frames 60] [--out PATH]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402


def machine_info() -> dict[str, object]:
    from machine import machine_info as base

    return base() | {"opencv": cv2.__version__}

def bench_res(res: int, frames: int, seed: int, degradation: float) -> dict[str, float]:
    from consistent_avatar.synthetic import SynthConfig
    from consistent_avatar.synthetic.actors import synthesize_actor
    from consistent_avatar.synthetic.head import FrameRenderer, Stage1Degradation, sample_identity
    from consistent_avatar.synthetic.motion import actor_motion, frame_rng

    deg = Stage1Degradation.from_strength(degradation)
    motion = actor_motion(seed, 0, frames, 25.0, deg)
    t0, c0 = time.perf_counter(), time.process_time()
    renderer = FrameRenderer(sample_identity(motion.identity_seed), res, deg)
    setup_s = time.perf_counter() - t0
    setup_cpu = time.process_time() - c0
    renderer.render(motion.expression[0], motion.pose[0], motion.coarse_expression[0], motion.coarse_pose[0], frame_rng(seed, 0, 0))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(frames):
        renderer.render(motion.expression[i], motion.pose[i], motion.coarse_expression[i], motion.coarse_pose[i],
                        frame_rng(seed, 0, i))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(actors=1, frames=frames, res=res, seed=seed, degradation=degradation)
        t0 = time.perf_counter()
        synthesize_actor(tmp, cfg, 0, progress=False)
        write_wall = time.perf_counter() - t0
    return {
        "res": res,
        "frames": frames,
        "render_fps_wall": frames / wall,
        "render_fps_cpu": frames / cpu,
        "ms_per_frame_wall": 1e3 * wall / frames,
        "actor_setup_s": setup_s,
        "actor_setup_cpu_s": setup_cpu,
        "write_fps_wall_incl_setup": frames / write_wall,
        "coarse_res": renderer.coarse_res,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--frames", type=int, default=60, help="frames timed per resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--degradation", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "synth.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = [bench_res(r, args.frames, args.seed, args.degradation) for r in args.res]

    print(f"{'res':>5} {'fps/core (wall)':>16} {'fps/core (cpu)':>15} {'ms/frame':>9} {'setup s':>8} {'write fps':>10}")
    for r in rows:
        print(f"{r['res']:>5} {r['render_fps_wall']:>16.1f} {r['render_fps_cpu']:>15.1f} {r['ms_per_frame_wall']:>9.1f} "
              f"{r['actor_setup_s']:>8.2f} {r['write_fps_wall_incl_setup']:>10.1f}")
    result = {
        "benchmark": "synthetic actor generator, full per-frame output, single thread",
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": {"torch": torch.get_num_threads(), "opencv": cv2.getNumThreads()},
        "degradation": args.degradation,
        "results": rows,
        "requirement": "render_fps >= 10 at 512 per core",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
