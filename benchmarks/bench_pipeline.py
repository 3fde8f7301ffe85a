"""Render pipeline throughput: ms per frame and frames/s over sampling steps × batch size.

Random weights of the chosen preset (timings do not depend on the values), the full method
(coarse TSD → stage 2 → stage 3 → VAE decode; no refiner) with the LCM sampler by default. Inputs
are created on the target device, so the figures are the pipeline's own (no host→device copies).
Each configuration runs ``--warmup`` untimed calls (scheduler set-up, cuDNN autotuning, compilation
with ``--compile``), then ``--iters`` timed calls with ``torch.cuda.synchronize`` around each;
the table reports the median. Writes JSON with the command, the machine and a timestamp.

    PYTHONPATH=platform python benchmarks/bench_pipeline.py                       # tiny, CPU, fp32
    PYTHONPATH=platform python benchmarks/bench_pipeline.py --preset sd15 --device cuda --dtype bf16 \\
        --steps 1 2 4 8 --batch 1 2 4 8 16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def machine_info(device: torch.device) -> dict[str, Any]:
    import diffusers

    from machine import machine_info as base

    return base(gpu=device.type == "cuda") | {"diffusers": diffusers.__version__}

def build_pipeline(preset_name: str, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Random-weight TSDM + FCSD (both variants share the weights: same shapes, same cost)."""
    from consistent_avatar.bundle import EmotionTable
    from consistent_avatar.data.layout import EMOTIONS
    from consistent_avatar.models import build_fcsd, build_tsdm, load_preset, load_shared_components
    from consistent_avatar.pipeline import ConsistentAvatarPipeline

    preset = load_preset(preset_name)
    shared = load_shared_components(preset, seed=seed)
    tsdm, fcsd = build_tsdm(preset, shared, seed=seed), build_fcsd(preset, shared, seed=seed)
    emb = torch.randn(
        len(EMOTIONS), preset.conditioning.emotion_dim, generator=torch.Generator().manual_seed(seed)
    )
    pipe = ConsistentAvatarPipeline(
        preset=preset,
        tsdm={"teacher": tsdm, "lcm": tsdm},
        fcsd={"teacher": fcsd, "lcm": fcsd},
        emotions=EmotionTable(EMOTIONS, emb),
        actor="benchmark",
    )
    tsdm.eval()
    fcsd.eval()
    return pipe.to(device, dtype)


def make_inputs(preset: Any, batch: int, device: torch.device, seed: int) -> dict[str, Any]:
    from consistent_avatar.data.layout import EMOTIONS

    g = torch.Generator().manual_seed(seed)
    r = preset.resolution
    return {
        "coarse_rgb": torch.randint(0, 256, (batch, 3, r, r), generator=g, dtype=torch.uint8).to(device),
        "coarse_normal": torch.randint(0, 256, (batch, 3, r, r), generator=g, dtype=torch.uint8).to(device),
        "pose": (torch.randn(batch, 6, generator=g) * 0.1).to(device),
        "expression": torch.randn(batch, 100, generator=g).to(device),
        "emotion": [EMOTIONS[i % len(EMOTIONS)] for i in range(batch)],
    }


def call_inputs(pipe: Any, batch: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """``make_inputs``, plus with ``--precomputed-latent`` the coarse TSD's VAE latent computed once,
    untimed (what shards prepared with the bundle's VAE hold as ``latent_tsd_coarse``): the timed calls
    then skip stage 2's VAE encode."""
    x = make_inputs(pipe.preset, batch, device, args.seed)
    if args.precomputed_latent and not args.baseline:
        from consistent_avatar.models.components import vae_encode
        from consistent_avatar.tsd import temporally_sensitive_detail

        with torch.no_grad():
            tsd = temporally_sensitive_detail(x["coarse_rgb"], pipe.tsd).to(pipe.dtype)
            x["coarse_latent"] = vae_encode(pipe.tsdm["lcm"].vae, tsd).half()  # stored as float16 in shards
    return x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    pipe: Any, device: torch.device, steps: int, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    x = call_inputs(pipe, batch, device, args)
    kw = {"num_steps": steps, "sampler": args.sampler, "baseline": args.baseline, "seed": args.seed}
    for _ in range(args.warmup):
        pipe(**x, **kw)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls: list[float] = []
    phases: dict[str, list[float]] = {}
    for _ in range(args.iters):
        sync(device)
        start = time.perf_counter()
        out = pipe(**x, **kw)
        sync(device)
        walls.append(time.perf_counter() - start)
        for k, v in out.timings.items():
            phases.setdefault(k, []).append(v)
    med = statistics.median(walls)
    row: dict[str, Any] = {
        "preset": pipe.preset.name,
        "device": str(device),
        "dtype": args.dtype,
        "sampler": out.settings["sampler"],
        "variant": out.settings["variant"],
        "baseline": args.baseline,
        "steps": steps,
        "batch": batch,
        "iters": args.iters,
        "ms_per_call": 1000 * med,
        "ms_per_frame": 1000 * med / batch,
        "frames_per_s": batch / med,
        "ms_per_call_min": 1000 * min(walls),
        "ms_per_call_max": 1000 * max(walls),
        "phase_ms_per_call": {k: 1000 * statistics.median(v) for k, v in phases.items()},
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def time_call(fn: Any, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` with synchronisation around each call."""
    for _ in range(warmup):
        fn()
    walls = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def components(pipe: Any, device: torch.device, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Each network of the full method timed alone at ``batch`` (ms per call), and what they add up to.

    Per frame at S steps the method runs: the TSD FFT, the VAE encode, the TSD-code encoder twice
    (f_c and f_d), S TSDM UNet calls, S FCSD calls (ControlNet + UNet) and two VAE decodes. The sum
    against the measured pipeline call shows what is left for the schedulers and Python.
    """
    from consistent_avatar.models.components import vae_decode, vae_encode
    from consistent_avatar.pipeline import _to_signed
    from consistent_avatar.tsd import temporally_sensitive_detail

    p, dt = pipe.preset, pipe.dtype
    x = make_inputs(p, batch, device, args.seed)
    tsdm, fcsd = pipe.tsdm["lcm"], pipe.fcsd["lcm"]
    tsd = temporally_sensitive_detail(x["coarse_rgb"], pipe.tsd).to(dt)
    normal = _to_signed(x["coarse_normal"]).to(dt)
    pose, expr = x["pose"].to(dt), x["expression"].to(dt)
    emb = pipe.emotions.lookup(x["emotion"], batch)
    z = torch.randn(batch, p.latent_channels, p.latent_size, p.latent_size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    f_c = tsdm.conditioning(tsd, pose, expr, validate=False)
    f_d = fcsd.conditioning(tsd, pose, expr, emb, validate=False)
    control = torch.cat([normal, tsd], dim=1)
    zc = vae_encode(tsdm.vae, tsd)
    calls = {
        "tsd_fft": lambda: temporally_sensitive_detail(x["coarse_rgb"], pipe.tsd),
        "vae_encode": lambda: vae_encode(tsdm.vae, tsd),
        "tsd_code_encoder": lambda: tsdm.conditioning(tsd, pose, expr, validate=False),
        "tsdm_unet": lambda: tsdm(z, t, f_c, zc),
        "fcsd_controlnet_unet": lambda: fcsd(z, t, f_d, control),
        "vae_decode": lambda: vae_decode(fcsd.vae, z),
    }
    ms: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in calls.items():
            ms[name] = 1000 * time_call(fn, device, args.warmup, args.iters)
    s = 4
    per_call = (
        ms["tsd_fft"] + ms["vae_encode"] + 2 * ms["tsd_code_encoder"]
        + s * (ms["tsdm_unet"] + ms["fcsd_controlnet_unet"]) + 2 * ms["vae_decode"]
    )
    vae_share = (ms["vae_encode"] + 2 * ms["vae_decode"]) / per_call
    return {
        "batch": batch,
        "ms_per_call": ms,
        "sum_at_4_steps_ms_per_frame": per_call / batch,
        "vae_share_at_4_steps": vae_share,
    }


def profile_call(pipe: Any, device: torch.device, steps: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (already warm) call under torch.profiler: GPU time by kernel against the call's wall time
    (``profiling.kernel_summary``)."""
    from torch.profiler import ProfilerActivity, profile

    x = call_inputs(pipe, batch, device, args)
    kw = {"num_steps": steps, "sampler": args.sampler, "baseline": args.baseline, "seed": args.seed}
    pipe(**x, **kw)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        pipe(**x, **kw)
        sync(device)
    wall = time.perf_counter() - start
    from profiling import kernel_summary

    row = {"steps": steps, "batch": batch, "wall_ms": 1000 * wall, **kernel_summary(prof)}
    if device.type == "cuda":
        row["host_syncs"] = host_syncs(lambda: pipe(**x, **kw))
    return row


def host_syncs(fn: Any) -> dict[str, Any]:
    """CPU–GPU synchronisations during ``fn()`` (``torch.cuda.set_sync_debug_mode``), by call site.

    Each one idles the GPU until the host has launched the next work: in a CUDA-graph pipeline that
    is the gap between GPU busy time and wall time. The pipeline's own start and end syncs count.
    """
    import collections
    import traceback
    import warnings

    sites: collections.Counter[str] = collections.Counter()

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in frames if "consistent_avatar" in f.filename or "diffusers" in f.filename]
        f = (ours or frames)[-1]
        sites[f"{Path(f.filename).name}:{f.lineno} {f.name}"] += 1

    torch.cuda.synchronize()
    previous = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = previous
    return {"count": sum(sites.values()), "sites": dict(sites.most_common(12))}


def precision_check(pipe: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Frames of the benchmarked pipeline vs an eager fp32 pipeline built from the same seed.

    Same weights (same seed), same inputs, same noise (seeded generators on the same device), 4 LCM steps, the first
    ``--batch``. The
    difference measures what bf16/fp16 and compilation change in the output, nothing else.
    """
    steps, batch = 4, args.batch[0]  # a batch size already compiled/captured by the benchmark
    x = make_inputs(pipe.preset, batch, device, args.seed)
    kw = {"num_steps": steps, "sampler": args.sampler, "baseline": args.baseline, "seed": args.seed}
    fast = pipe(**x, **kw).frames.float()
    plain = build_pipeline(args.preset, device, torch.float32, args.seed)
    ref = plain(**x, **kw).frames.float()
    del plain
    diff = (fast - ref).abs()
    mse = float((diff**2).mean())
    return {
        "steps": steps,
        "batch": batch,
        "reference": "eager fp32, same seed and inputs",
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "psnr_db": float("inf") if mse == 0 else 10 * float(torch.log10(torch.tensor(1.0 / mse))),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="tiny | small | sd15 | a preset JSON path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--sampler", choices=["lcm", "ddim", "dpm"], default="lcm")
    ap.add_argument("--baseline", action="store_true", help="skip stage 2 (the paper's baseline row)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--compile",
        metavar="MODE",
        default=None,
        help="torch.compile the UNets/ControlNet with this mode (e.g. max-autotune-no-cudagraphs, "
        "reduce-overhead); raise --warmup to cover compilation",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--check",
        action="store_true",
        help="also render one batch with an eager fp32 copy of the same weights and report how far "
        "the benchmarked (dtype, compile) pipeline's frames are from it",
    )
    ap.add_argument("--no-compile-vae", action="store_true", help="with --compile: leave the VAE eager")
    ap.add_argument(
        "--inductor-tuning",
        action="store_true",
        help="with --compile: inductor's settings for diffusion models (1×1 convs as matmuls, coordinate-"
        "descent tuning of generated kernels, no epilogue fusion); compilation takes longer",
    )
    ap.add_argument(
        "--channels-last", action="store_true", help="store conv weights NHWC (pipeline.to(memory_format=...))"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the timings, profile one call of every --batch at the first --steps (GPU time by kernel, "
        "and on a GPU the CPU-GPU synchronisations of one call by call site)",
    )
    ap.add_argument(
        "--precomputed-latent",
        action="store_true",
        help="pass the coarse TSD's VAE latent (computed once, untimed, as shards prepared with the bundle's VAE "
        "hold it) so that the timed calls skip stage 2's VAE encode",
    )
    ap.add_argument(
        "--components",
        action="store_true",
        help="also time each network alone (VAE encode/decode, TSD-code encoder, TSDM UNet, ControlNet + UNet) "
        "at every --batch, to show where a call's time goes",
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/pipeline_<preset>_<device>.json)"
    )
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="torch.compile's cache folder (consistent_avatar.compile_cache): a second run with the same "
                   "DIR reuses the compiled kernels — split a long compilation (max-autotune) over two runs")
    args = ap.parse_args(argv)
    if args.compile_cache is not None:
        from consistent_avatar.compile_cache import use_compile_cache

        use_compile_cache(args.compile_cache)  # before anything compiles

    from tqdm.auto import tqdm

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    pipe = build_pipeline(args.preset, device, DTYPES[args.dtype], args.seed)
    if args.channels_last:
        pipe.to(memory_format=torch.channels_last)
    build_s = time.perf_counter() - t0
    if args.compile:
        if args.inductor_tuning:
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.coordinate_descent_check_all_directions = True
            inductor.epilogue_fusion = False
        pipe.compile(mode=args.compile, vae=not args.no_compile_vae, channels_last=args.channels_last)

    preset_tag = Path(args.preset).stem if args.preset.endswith(".json") else args.preset
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).resolve().parent / "results" / f"pipeline_{preset_tag}_{device.type}.json"
    )
    rows: list[dict[str, Any]] = []
    check: dict[str, Any] | None = None
    parts: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []

    def save(complete: bool = False) -> None:
        """Rewrite the JSON after every configuration: a run cut short keeps what it measured, in
        ``<out>.partial.json`` until the run completes (``record.write_record``)."""
        from record import write_record

        write_record(
            out,
            {
                "complete": complete,
                "benchmark": "pipeline",
                "command": "PYTHONPATH=platform python "
                + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_info(device),
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                "build_seconds": round(build_s, 2),
                "notes": "random weights; full method (stage 2 + stage 3 + VAE decodes), no refiner; "
                "inputs on device; median of --iters calls after --warmup untimed calls (compilation "
                "and graph capture happen in the warm-up); ms/frame = ms per call / batch",
                "results": rows,
                "components": parts,
                "profiles": profiles,
                "precision_check": check,
            },
            complete,
        )

    if args.components:
        for batch in args.batch:
            parts.append(components(pipe, device, batch, args))
            save()
    configs = [(s, b) for s in args.steps for b in args.batch]
    for steps, batch in tqdm(configs, desc="pipeline configs", file=sys.stderr):
        rows.append(bench_one(pipe, device, steps, batch, args))
        save()

    if args.profile:
        for batch in args.batch:
            prof = profile_call(pipe, device, args.steps[0], batch, args)
            profiles.append(prof)
            save()
            print(
                f"profile batch {batch}: wall {prof['wall_ms']:.1f} ms, GPU busy {prof['gpu_busy_ms']:.1f} ms, "
                f"{prof['kernel_launches']} kernels; top:"
            )
            for k in prof["top_kernels"][:12]:
                print(f"  {k['ms']:8.2f} ms  {k['count']:5d}×  {k['name']}")
            if "host_syncs" in prof:
                print(f"  host syncs per call: {prof['host_syncs']['count']}  {prof['host_syncs']['sites']}")

    if args.check:
        check = precision_check(pipe, device, args)
        save()
        print(
            f"optimised vs eager fp32 ({check['steps']} steps, batch {check['batch']}): "
            f"max |Δ| {check['max_abs_diff']:.4f}, mean |Δ| {check['mean_abs_diff']:.5f}, "
            f"PSNR {check['psnr_db']:.1f} dB (frames in [0, 1])"
        )

    save(complete=True)
    header = (
        f"{'preset':8s} {'device':8s} {'dtype':5s} {'sampler':7s} {'steps':>5s} {'batch':>5s} "
        f"{'ms/frame':>10s} {'frames/s':>9s} {'stage2 ms':>10s} {'stage3 ms':>10s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ph = r["phase_ms_per_call"]
        print(
            f"{r['preset']:8s} {r['device']:8s} {r['dtype']:5s} {r['sampler']:7s} "
            f"{r['steps']:5d} {r['batch']:5d} "
            f"{r['ms_per_frame']:10.2f} {r['frames_per_s']:9.2f} "
            f"{ph.get('stage2', 0.0):10.2f} {ph.get('stage3', 0.0):10.2f}"
        )
    if parts:
        names = list(parts[0]["ms_per_call"])
        print("\nms per call of each network (" + ", ".join(names) + "); sum = one frame's share at 4 steps")
        for part in parts:
            cells = " ".join(f"{part['ms_per_call'][n]:8.2f}" for n in names)
            print(
                f"batch {part['batch']:3d}: {cells}  sum {part['sum_at_4_steps_ms_per_frame']:7.2f} ms/frame "
                f"(VAE {100 * part['vae_share_at_4_steps']:.0f}%)"
            )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
