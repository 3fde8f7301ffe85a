"""Step time of each training stage for a preset / device / dtype / batch: the numbers behind the
"whole paper schedule for one actor in ≤ 15 minutes on one H100" target.

It runs the trainer's own code path — :func:`consistent_avatar.training.loop.build_engine` (stage
module, DeepSpeed engine with ZeRO, client Adam over the trainable parameters only) and the stage's
loss — in one process (world size 1), on random inputs of the preset's shapes (the data pipeline is
not timed: with precomputed latents it only decodes a few small PNGs per sample). Prints a table,
projects the paper schedule (stage 2: 3000, stage 3: 15000, LCM: 1000 + 1000 steps, VAE fit when
the preset has no pretrained VAE), and writes JSON (command, machine, settings, results) to
``benchmarks/results/``.

    PYTHONPATH=platform python benchmarks/bench_train.py --preset sd15 --device cuda --batch 4
    PYTHONPATH=platform python benchmarks/bench_train.py --preset tiny --device cpu --steps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from consistent_avatar.models.presets import ModelPreset, load_preset  # noqa: E402
from consistent_avatar.training.config import TrainConfig  # noqa: E402
from consistent_avatar.training.data import StageCollate  # noqa: E402
from consistent_avatar.training.stages import StageSpec  # noqa: E402

ALL_STAGES = ("vae", "tsdm", "lcm_tsdm", "fcsd", "lcm_fcsd")


def random_batch(kind: str, preset: ModelPreset, batch: int, latents: bool, device: torch.device) -> dict[str, torch.Tensor]:
    r, c, s = preset.resolution, preset.latent_channels, preset.latent_size
    g = torch.Generator().manual_seed(0)

    def img() -> torch.Tensor:
        return torch.rand(batch, 3, r, r, generator=g) * 2 - 1

    def lat() -> torch.Tensor:
        return torch.randn(batch, c, s, s, generator=g)

    out: dict[str, torch.Tensor] = {}
    if kind == "vae":
        out["images"] = torch.cat([img(), img()])
    elif kind == "tsdm":
        out.update(coarse_tsd=img(), pose=torch.randn(batch, 6, generator=g), expression=torch.randn(batch, 100, generator=g))
        if latents:
            out.update(target_latent=lat(), coarse_latent=lat())
        else:
            out["target_tsd"] = img()
    else:
        out.update(
            tsd=img(),
            normal=img(),
            pose=torch.randn(batch, 6, generator=g),
            expression=torch.randn(batch, 100, generator=g),
            emotion=torch.randn(batch, preset.conditioning.emotion_dim, generator=g),
        )
        if latents:
            out["image_latent"] = lat()
        else:
            out["image"] = img()
    return {k: v.to(device) for k, v in out.items()}


def machine() -> dict[str, Any]:
    from machine import machine_info

    info = machine_info(gpu=True)
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # pragma: no cover - reported, not fatal
        info["deepspeed"] = None
    return info

def phase_times(runner: Any, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator, sync: Any, n: int) -> dict[str, float]:
    """Median ms of forward (the stage loss), backward and the optimiser step, synchronised apart.

    The synchronisations cost a little overlap, so the parts add up to slightly more than a step.
    """
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        loss = runner.loss(engine, batch, gen)
        sync()
        t1 = time.perf_counter()
        engine.backward(loss)
        sync()
        t2 = time.perf_counter()
        engine.step()
        runner.after_step()
        sync()
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[k].append(v)
    return {k: round(1000 * sorted(v)[len(v) // 2], 1) for k, v in parts.items()}


def profile_steps(step: Any, sync: Any, device: torch.device, n: int = 3) -> dict[str, Any]:
    """``n`` steps under torch.profiler: GPU busy time against wall time, and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync()
    wall = (time.perf_counter() - t0) / n
    from profiling import kernel_summary

    ops = sorted(
        (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
        key=lambda e: e.cpu_time_total, reverse=True,
    )
    return {
        "steps": n,
        "wall_ms_per_step": round(1000 * wall, 1),
        **kernel_summary(prof, per=n, top=20),
        "top_cpu_ops": [
            {"name": e.key[:120], "count": e.count // n, "cpu_ms_per_step": round(e.cpu_time_total / 1000 / n, 2)}
            for e in ops[:20]
        ],
    }


def profile_backward(runner: Any, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator, sync: Any,
                     device: torch.device, n: int = 3) -> dict[str, Any]:
    """``engine.backward(loss)`` alone, ``n`` times (forward and step outside): its wall time, the host
    time DeepSpeed's ZeRO gradient hooks take inside it, and under torch.profiler its GPU busy time.

    Why: on the GPU the stage-3 backward took 100 ms of wall for less GPU work. ZeRO-1/2 runs a Python
    hook per trainable parameter (``process_gradients``: copy into the contiguous gradient buffer,
    bucket bookkeeping) and, after the last one, an epilogue (with ``lean_zero_backward``: no hooks, one
    copy in the epilogue); all are timed here by wrapping those
    methods on this engine's optimiser instance (a benchmark-only wrapper, removed afterwards). The
    hook time is host time: where the host is the bottleneck, it is the backward's share of the step.
    """
    from torch.profiler import ProfilerActivity, profile

    opt = engine.optimizer
    timed = [m for m in ("process_gradients", "update_hook_state_and_maybe_run_epilogue",
                         "overlapping_partition_gradients_reduce_epilogue") if hasattr(opt, m)]
    spent = {m: 0.0 for m in timed}
    calls = {m: 0 for m in timed}

    def wrap(name: str) -> Any:
        inner = getattr(opt, name)

        def timed_call(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t
                calls[name] += 1

        return timed_call

    walls = []
    own = {name: opt.__dict__.get(name) for name in timed}  # an instance-level method already there stays
    for name in timed:
        setattr(opt, name, wrap(name))
    try:
        for _ in range(n):
            loss = runner.loss(engine, batch, gen)
            sync()
            t0 = time.perf_counter()
            engine.backward(loss)
            sync()
            walls.append(time.perf_counter() - t0)
            engine.step()
            runner.after_step()
    finally:
        for name in timed:
            if own[name] is None:
                delattr(opt, name)  # the class's method again
            else:
                setattr(opt, name, own[name])
    out: dict[str, Any] = {
        "passes": n,
        "wall_ms": round(1000 * sorted(walls)[n // 2], 2),
        "zero_hooks": {m: {"calls_per_backward": calls[m] // n, "host_ms_per_backward": round(1000 * spent[m] / n, 2)}
                       for m in timed} or None,
    }
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    loss = runner.loss(engine, batch, gen)
    sync()
    with profile(activities=activities) as prof:
        engine.backward(loss)
        sync()
    engine.step()
    runner.after_step()
    if device.type == "cuda":
        from profiling import kernel_summary

        ks = kernel_summary(prof, per=1, top=8)
        out.update(gpu_busy_ms=ks["gpu_busy_ms"], kernel_launches=ks["kernel_launches"], top_kernels=ks["top_kernels"])
    aten = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::")]
    out["aten_ops"] = sum(e.count for e in aten)
    return out


def profile_optimizer(runner: Any, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator, sync: Any,
                      device: torch.device, n: int = 3) -> dict[str, Any]:
    """``engine.step()`` alone (forward and backward run outside the profiler), ``n`` times: host ops
    (aten calls and the host time they take) and, on a GPU, kernels per optimiser step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    counts: dict[str, int] = {}
    cpu_us: dict[str, float] = {}
    kernels = busy = 0.0
    wall = 0.0
    for _ in range(n):
        loss = runner.loss(engine, batch, gen)
        engine.backward(loss)
        sync()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            engine.step()
            sync()
        wall += time.perf_counter() - t0
        runner.after_step()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::"):
                counts[e.key] = counts.get(e.key, 0) + e.count
                cpu_us[e.key] = cpu_us.get(e.key, 0.0) + e.self_cpu_time_total
        if device.type == "cuda":
            from profiling import kernel_summary

            ks = kernel_summary(prof, per=1, top=0)
            kernels += ks["kernel_launches"]
            busy += ks["gpu_busy_ms"]
    top = sorted(counts, key=lambda k: counts[k], reverse=True)[:12]
    return {
        "steps": n,
        "wall_ms_per_step": round(1000 * wall / n, 2),
        "aten_ops_per_step": sum(counts.values()) // n,
        "aten_self_cpu_ms_per_step": round(sum(cpu_us.values()) / 1000 / n, 2),
        "kernel_launches_per_step": int(kernels // n) if device.type == "cuda" else None,
        "gpu_busy_ms_per_step": round(busy / n, 2) if device.type == "cuda" else None,
        "top_aten_ops": [{"name": k, "count": counts[k] // n, "self_cpu_ms": round(cpu_us[k] / 1000 / n, 3)} for k in top],
    }


def bench_stage(stage: str, args: argparse.Namespace, preset: ModelPreset, device: torch.device, tmp: Path) -> dict[str, Any]:
    from consistent_avatar.training.loop import build_engine
    from consistent_avatar.training.stages import STAGE_KIND, make_runner
    from consistent_avatar.training.weights import save_weights, without_vae

    base = TrainConfig()
    cfg = base.stage(stage).model_copy(
        update={"batch_size": args.batch, "micro_batch_size": args.batch, "zero_stage": args.zero,
                "precision": args.dtype}
    ).model_dump(mode="json")
    perf = {"channels_last": args.channels_last, "compile": args.compile, "compile_mode": args.compile_mode,
            "fused_adam": None, "tf32": True, "lean_zero_step": args.lean_zero_step,
            "lean_zero_backward": args.lean_zero_backward}
    kind = STAGE_KIND[stage]
    inputs: dict[str, str] = {}
    if stage.startswith("lcm_"):  # a teacher to distil: the randomly initialised stage model
        teacher_spec = StageSpec(
            actor="bench", stage=stage[4:], preset=preset.model_dump(mode="json"),
            config=base.stage(stage[4:]).model_dump(mode="json"), performance={}, seed=0, num_workers=1,
            probe_files=[], columns=[], collate=StageCollate("bench", "tsdm"), stage_dir=str(tmp),
        )
        teacher = make_runner(teacher_spec, torch.device("cpu"))
        path = tmp / f"{stage}-teacher.safetensors"
        save_weights(without_vae({k[len("model."):]: v for k, v in teacher.module.state_dict().items()}), path)
        inputs["teacher"] = str(path)
        del teacher
    spec = StageSpec(
        actor="bench", stage=stage, preset=preset.model_dump(mode="json"), config=cfg, performance=perf,
        seed=0, num_workers=1, probe_files=[], columns=[], collate=StageCollate("bench", "tsdm"),
        stage_dir=str(tmp / stage), inputs=inputs,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runner, engine, _ = build_engine(spec, device, 1)
    trainable = sum(p.numel() for p in runner.trainable_parameters())
    total = sum(p.numel() for p in runner.module.parameters())
    batch = random_batch(kind, preset, args.batch, args.latents, device)
    if args.channels_last:
        batch = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}
    gen = torch.Generator(device=device).manual_seed(0)  # as the trainer: noise drawn on the training device

    def step() -> float:
        loss = runner.loss(engine, batch, gen)
        engine.backward(loss)
        engine.step()
        runner.after_step()
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    phases = phase_times(runner, engine, batch, gen, sync, max(3, args.steps // 2)) if args.phases else None
    profile = profile_steps(step, sync, device) if args.profile else None
    optimizer_profile = profile_optimizer(runner, engine, batch, gen, sync, device) if args.profile else None
    backward_profile = profile_backward(runner, engine, batch, gen, sync, device) if args.profile else None
    result = {
        "stage": stage,
        "batch": args.batch,
        "trainable_params_m": round(trainable / 1e6, 2),
        "total_params_m": round(total / 1e6, 2),
        "warmup_s": round(warmup_s, 2),
        "step_ms_median": round(1000 * median, 1),
        "step_ms_mean": round(1000 * sum(times) / len(times), 1),
        "samples_per_s": round(args.batch / median, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "paper_iterations": base.stage(stage).iterations,
    }
    result["projected_minutes"] = round(result["paper_iterations"] * median / 60, 2)
    if phases is not None:
        result["phase_ms_median"] = phases
    if profile is not None:
        result["profile"] = profile
        result["optimizer_profile"] = optimizer_profile
        result["backward_profile"] = backward_profile
    del runner, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--pretrained-root", default=None, help="SD 1.5 folder (frozen UNet/VAE as in real runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--batch", type=int, default=4, help="micro-batch = effective batch (one process)")
    p.add_argument("--stages", default="tsdm,lcm_tsdm,fcsd,lcm_fcsd", help=f"comma list of {ALL_STAGES}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="inductor mode of --compile (performance.compile_mode; default: the trainer's, "
                   "reduce-overhead for fcsd, default for the others)")
    p.add_argument("--latents", action=argparse.BooleanOptionalAction, default=True,
                   help="feed precomputed VAE latents (as shards with latents do)")
    p.add_argument("--phases", action="store_true", help="also time forward / backward / optimiser step apart")
    p.add_argument("--profile", action="store_true", help="also profile 3 steps (GPU busy vs wall, top kernels and ops)")
    p.add_argument("--lean-zero-step", action=argparse.BooleanOptionalAction, default=True,
                   help="one fused gradient-norm / overflow check per ZeRO step (performance.lean_zero_step)")
    p.add_argument("--lean-zero-backward", action=argparse.BooleanOptionalAction, default=True,
                   help="gradients into ZeRO's flat buffer in one copy after the backward, not one hook per "
                   "parameter (performance.lean_zero_backward)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_<preset>_<device>.json)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="torch.compile's cache folder (consistent_avatar.compile_cache): a second run with the same "
                   "DIR reuses the compiled kernels — split a long compilation (max-autotune) over two runs")
    args = p.parse_args(argv)
    if args.compile_cache is not None:
        from consistent_avatar.compile_cache import use_compile_cache

        use_compile_cache(args.compile_cache)  # before anything compiles

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    preset = load_preset(args.preset)
    if args.pretrained_root:
        preset = preset.with_pretrained(root=args.pretrained_root)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
                       "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    from consistent_avatar.training.loop import setup_backend

    setup_backend(device, {"tf32": True})
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {ALL_STAGES}")
    results: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"train_{args.preset}_{device.type}.json"

    def save(complete: bool) -> None:
        """Rewrite the JSON after every stage: a run cut short (a device call's time limit) keeps what
        it measured, in ``<out>.partial.json`` until the run completes (``record.write_record``)."""
        from record import write_record

        out.parent.mkdir(parents=True, exist_ok=True)
        total = sum(r["projected_minutes"] for r in results)
        record = {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items()} | {"device": device.type},
            "results": results,
            "complete": complete,
            "projected_total_minutes": round(total, 2),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_record(out, record, complete)

    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            results.append(bench_stage(stage, args, preset, device, Path(tmp)))
            save(complete=False)
            r = results[-1]
            print(f"  {stage}: {r['step_ms_median']} ms/step", flush=True)
            if "phase_ms_median" in r:
                print(f"    phases (ms): {r['phase_ms_median']}", flush=True)
            if "profile" in r:
                pr = r["profile"]
                print(f"    profile: wall {pr['wall_ms_per_step']} ms/step, GPU busy {pr['gpu_busy_ms']} ms/step, "
                      f"{pr['kernel_launches']} kernels/step", flush=True)
                for k in pr["top_kernels"][:8]:
                    print(f"      {k['ms']:8.2f} ms  {k['count']:5d}x  {k['name']}", flush=True)
                op = r["optimizer_profile"]
                print(f"    optimizer step alone: {op['wall_ms_per_step']} ms, {op['aten_ops_per_step']} aten ops "
                      f"({op['aten_self_cpu_ms_per_step']} ms host), kernels {op['kernel_launches_per_step']}, "
                      f"GPU busy {op['gpu_busy_ms_per_step']} ms", flush=True)
                for k in op["top_aten_ops"][:6]:
                    print(f"      {k['count']:6d}x  {k['self_cpu_ms']:8.3f} ms  {k['name']}", flush=True)
                bp = r["backward_profile"]
                hooks = ", ".join(f"{m} {h['calls_per_backward']}× {h['host_ms_per_backward']} ms"
                                  for m, h in (bp["zero_hooks"] or {}).items()) or "none"
                print(f"    backward alone: {bp['wall_ms']} ms wall, GPU busy {bp.get('gpu_busy_ms', '-')} ms, "
                      f"{bp['aten_ops']} aten ops; ZeRO hooks: {hooks}", flush=True)

    header = ("stage", "batch", "trainable M", "ms/step", "samples/s", "peak GiB", "paper steps", "projected min")
    rows = [header] + [
        (r["stage"], str(r["batch"]), str(r["trainable_params_m"]), str(r["step_ms_median"]), str(r["samples_per_s"]),
         str(r["peak_memory_gib"]), str(r["paper_iterations"]), str(r["projected_minutes"]))
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    total = sum(r["projected_minutes"] for r in results)
    print(f"paper schedule of the stages above: {total:.1f} min on {device} ({machine().get('gpu', machine().get('cpu_model', '?'))})")

    save(complete=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
