"""The per-worker training loop of one stage: DeepSpeed engine, streaming batches, checkpoints, logs.

Runs inside every Ray Train worker (``TorchTrainer(train_loop_per_worker=stage_worker)``):

1. **Engine.** ``deepspeed.initialize(model=<stage module>, model_parameters=<trainable only>,
   optimizer=torch.optim.Adam(...))``. A client optimiser keeps DeepSpeed's compiled optimiser ops
   out of the picture (they need a compiler toolchain on CPU); only trainable parameters reach it, so
   frozen parts (VAE, a frozen base UNet, LCM teacher and EMA target) hold no optimiser state. ZeRO
   stage from the config (2 by default); bf16 on GPU, fp32 on CPU. Ray Train has already created the
   process group (NCCL on GPU, gloo on CPU); DeepSpeed adopts it.
2. **Data.** ``ray.train.get_dataset_shard("train").iter_torch_batches(collate_fn=StageCollate)``,
   one pass per epoch, until the configured number of optimiser steps is reached: every rank does
   the same number of steps because Ray Train splits the dataset into equal shares.
3. **Checkpoints.** Every ``checkpoint_every`` steps and at the end: ``engine.save_checkpoint`` into a
   temporary directory on every rank (rank 0 writes the module, every rank its ZeRO shard, plus its
   RNG state and, for LCM, the EMA target), then ``ray.train.report(metrics, checkpoint=...)``; Ray
   Train merges the ranks' files into one checkpoint in storage and keeps the last K. A (re)started
   worker group resumes from ``ray.train.get_checkpoint()``: weights, optimiser, step counter, RNG.
4. **Progress.** Rank 0 logs the all-reduced loss and the *probe loss* (the loss of one fixed batch
   under fixed noise and timesteps, so its curve shows learning without sampling noise) to
   TensorBoard, sample image grids every ``sample_every`` steps, a ``status.json`` (step, worker pids)
   for operators, and pushes the step to the driver's progress bar.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..compile_cache import join_compile_cache
from ..errors import ConsistentAvatarError
from ..io import atomic_write_json
from .data import to_device
from .stages import StageRunner, StageSpec, make_runner
from .zero_fast import lean_zero_backward, lean_zero_step

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def disable_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce kernel unbuilt: gloo does the (tiny) CPU
    collectives, and building that kernel JIT costs a minute per fresh machine. DeepSpeed decides
    from ``deepspeed.ops.__compatible_ops__``, whose only reader is that choice; filling the cache
    here also skips its probe, which compiles a test program per op (seconds, linker noise)."""
    import deepspeed.ops

    existing = deepspeed.ops.__dict__.get("__compatible_ops__")
    compatible = {k: v for k, v in (existing or {}).items() if "shm_comm" not in k}
    deepspeed.ops.__dict__["__compatible_ops__"] = compatible


def deepspeed_config(cfg: dict[str, Any], num_workers: int, bf16: bool) -> dict[str, Any]:
    from .config import StageConfig

    micro, accum = StageConfig.model_validate(
        {k: v for k, v in cfg.items() if k in StageConfig.model_fields}
    ).split(num_workers)
    ds: dict[str, Any] = {
        "train_batch_size": cfg["batch_size"],
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        # Stated rather than left to DeepSpeed's defaults because the step's fast paths
        # (:func:`lean_zero_step`) rely on them: contiguous gradients put every gradient of this rank's
        # partition into one flat buffer; no overlap_comm (nothing to overlap at world size 1, and it
        # adds a stream synchronisation per bucket); round-robin partitioning off (it reorders the
        # partition); one reduce bucket up to 5e8 elements (whole ControlNet / UNet of SD 1.5 in one
        # or two reductions).
        "zero_optimization": {
            "stage": int(cfg["zero_stage"]),
            "contiguous_gradients": True,
            "overlap_comm": False,
            "round_robin_gradients": False,
            "reduce_bucket_size": int(5e8),
            "allgather_bucket_size": int(5e8),
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # check_grad_overflow stays on: a non-finite gradient skips the step (it is one fused check
        # per step with lean_zero_step, not one per parameter).
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
    }
    if cfg.get("grad_clip"):
        ds["gradient_clipping"] = float(cfg["grad_clip"])
    return ds


class _Board:
    """Rank 0's outputs: TensorBoard, status file, driver progress (no-ops on other ranks)."""

    def __init__(self, spec: StageSpec, rank: int, start_step: int, pids: list[int], hosts: list[str], attempt: int) -> None:
        self.spec = spec
        self.rank = rank
        self.dir = Path(spec.stage_dir)
        self.writer = None
        self.status: dict[str, Any] = {
            "actor": spec.actor,
            "stage": spec.stage,
            "iterations": spec.config["iterations"],
            "step": start_step,
            "attempt": attempt,
            "resumed_from": start_step,
            "worker_pids": pids,
            "worker_hosts": hosts,
            "last_checkpoint_step": start_step if start_step else None,
        }
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # hosts with tensorboardX only (same writer API and event format)
                from tensorboardX import SummaryWriter

            self.dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step or None)
            self.write_status()

    def write_status(self) -> None:
        if self.rank == 0:
            atomic_write_json(self.dir / "status.json", {**self.status, "updated": time.time()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{self.spec.stage}/{k}", v, step)
        self.writer.flush()
        self.status.update(step=step, **{k: v for k, v in values.items()})
        self.write_status()
        if self.spec.progress is not None:
            self.spec.progress.update.remote(self.spec.actor, self.spec.stage, step, values.get("loss"))

    def image(self, step: int, grid: torch.Tensor | None) -> None:
        if self.writer is not None and grid is not None:
            self.writer.add_image(f"{self.spec.stage}/samples", grid.clamp(0, 1), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _perf(spec: StageSpec, cuda: bool, key: str) -> bool:
    value = spec.performance.get(key)
    return cuda if value is None else bool(value)


_SPEED_MODULES = ("UNet2DConditionModel", "ControlNetModel", "AutoencoderKL")
# Stages whose compiled step has been measured under CUDA graphs (compile mode reduce-overhead) on a
# GPU: the default mode there (sd15 stage 3 on an H200: 126 -> 80 ms/step, 74 with lean_zero_backward;
# benchmarks/README.md). The others keep inductor's default mode until measured: stage 2 did not finish
# compiling inside a device call, and the LCM stages call the compiled teacher / target several times a step.
CUDA_GRAPH_STAGES = ("fcsd",)


def _prepare_modules(runner: StageRunner, spec: StageSpec, cuda: bool) -> None:
    """channels-last and torch.compile, applied once the engine exists.

    channels-last only goes to networks whose weights are all frozen (the VAE, a frozen base UNet,
    an LCM teacher / EMA target): ZeRO keeps trainable weights as views into one flat contiguous
    buffer, which a memory-format change would silently detach them from (and DeepSpeed's
    broadcast of strided bf16 weights fails outright). Inputs go channels-last in the loop.
    ``Module.compile()`` works in place, so state-dict keys (and checkpoints) stay unchanged.
    """
    modules = [m for root in runner.speed_roots() for m in root.modules() if type(m).__name__ in _SPEED_MODULES]
    if _perf(spec, cuda, "channels_last"):
        for m in modules:
            if not any(p.requires_grad for p in m.parameters()):
                m.to(memory_format=torch.channels_last)
    if _perf(spec, cuda, "compile"):
        mode = spec.performance.get("compile_mode") or (
            "reduce-overhead" if spec.stage in CUDA_GRAPH_STAGES else "default"
        )
        for m in modules:
            if type(m).__name__ != "AutoencoderKL":
                m.compile(mode=mode)


def restore_generator(generator: torch.Generator, state: torch.Tensor, step: int) -> None:
    """The noise generator's state from a checkpoint. A state of another kind of generator (a CPU
    generator's, from a checkpoint an older version wrote on a GPU) cannot be loaded: the stream then
    restarts from a seed derived from the generator's own and the step, with a warning, so that the
    run resumes (its noise is a fresh draw, not the one the interrupted run would have made)."""
    try:
        generator.set_state(state)
    except RuntimeError:
        seed = generator.initial_seed() + 7919 * step
        log.warning(
            "the checkpoint's noise-generator state is for another kind of generator (written by an older "
            "version); the noise stream restarts from seed %d at step %d", seed, step,
        )
        generator.manual_seed(seed)


def setup_backend(device: torch.device, performance: dict[str, Any]) -> None:
    """DeepSpeed's accelerator and the process group (already created by Ray Train, or by a caller)."""
    cuda = device.type == "cuda"
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not cuda:
        disable_cpu_shm_comm()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    elif performance.get("tf32", True):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    join_compile_cache(performance.get("compile_cache"), "this worker")  # before this process compiles anything


def build_engine(spec: StageSpec, device: torch.device, world: int) -> tuple[StageRunner, Any, torch.optim.Optimizer]:
    """The stage's runner and its DeepSpeed engine (trainable parameters only in the optimiser)."""
    import deepspeed

    cuda = device.type == "cuda"
    cfg = spec.config
    precision = cfg.get("precision", "auto")
    bf16 = cuda if precision == "auto" else precision == "bf16"
    runner = make_runner(spec, device)
    runner.module.to(device)
    params = runner.trainable_parameters()
    if not params:
        raise ConsistentAvatarError(f"stage {spec.stage} has no trainable parameters: check the preset's training scope")
    optimizer = torch.optim.Adam(
        params,
        lr=cfg["lr"],
        betas=tuple(cfg["adam_betas"]),
        weight_decay=cfg["weight_decay"],
        fused=_perf(spec, cuda, "fused_adam") and cuda,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=runner.module, model_parameters=params, optimizer=optimizer, config=deepspeed_config(cfg, world, bf16)
    )
    if _perf(spec, True, "lean_zero_step"):
        lean_zero_step(engine)
    if _perf(spec, True, "lean_zero_backward"):
        lean_zero_backward(engine)
    runner.attach(engine)
    _prepare_modules(runner, spec, cuda)
    return runner, engine, optimizer


def stage_worker(spec: StageSpec) -> None:
    """``train_loop_per_worker`` of one stage (see the module docstring)."""
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    setup_backend(device, spec.performance)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = spec.config
    runner, engine, optimizer = build_engine(spec, device, world)
    micro = engine.train_micro_batch_size_per_gpu()

    # The step's noise and timesteps are drawn where the step runs: a CPU generator on a GPU would
    # copy them over with a blocking copy, a host-GPU synchronisation every step.
    generator = torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + rank)
    state: dict[str, Any] = {"attempt": 1, "probe_initial": None, "seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            folder = Path(d)
            saved = json.loads((folder / STATE_FILE).read_text())
            engine.load_checkpoint(str(folder), tag=saved["tag"])
            rng = folder / f"rng_rank{rank}.pt"
            if rng.is_file():
                restore_generator(generator, torch.load(rng, weights_only=True), int(saved.get("step", 0)))
            runner.load_extra(folder)
            state.update(saved, attempt=int(saved.get("attempt", 1)) + 1)
    step = int(engine.global_steps)
    iterations = int(cfg["iterations"])

    pids: list[Any] = [None] * world
    hosts: list[Any] = [None] * world
    torch.distributed.all_gather_object(pids, os.getpid())
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    board = _Board(spec, rank, step, pids, hosts, int(state["attempt"]))

    probe_batch = None
    probe_seed = spec.seed + 7
    if rank == 0:
        from .data import read_rows

        rows = read_rows(spec.probe_files, spec.columns, micro)
        probe_batch = to_device(spec.collate.for_probe()(rows), device)
        if state["probe_initial"] is None:
            state["probe_initial"] = runner.probe(probe_batch, probe_seed)
            board.scalars(0, {"probe_loss": state["probe_initial"]})
        if step == 0:
            board.image(0, runner.samples(probe_batch, probe_seed))

    def checkpoint_now(metrics: dict[str, Any]) -> None:
        tag = f"step{step:08d}"
        with tempfile.TemporaryDirectory(prefix="cavatar-ckpt-") as tmp:
            folder = Path(tmp)
            engine.save_checkpoint(tmp, tag=tag)
            torch.save(generator.get_state(), folder / f"rng_rank{rank}.pt")
            if rank == 0:
                runner.save_extra(folder)
                (folder / STATE_FILE).write_text(json.dumps({**state, "tag": tag, "step": step}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        board.status["last_checkpoint_step"] = step
        board.write_status()

    shard = ray.train.get_dataset_shard("train")
    log_every, ckpt_every = int(cfg["log_every"]), int(cfg["checkpoint_every"])
    sample_every = int(cfg["sample_every"])
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    last_loss = float("nan")
    t_start = time.perf_counter()
    start_step = step
    epoch = 0
    while step < iterations:
        batches = 0
        for batch in shard.iter_torch_batches(
            batch_size=micro,
            collate_fn=spec.collate,
            drop_last=True,
            local_shuffle_buffer_size=spec.shuffle_buffer or None,
            local_shuffle_seed=(spec.seed + epoch * 7919 + step) if spec.shuffle_buffer else None,
            prefetch_batches=spec.prefetch_batches,
            pin_memory=cuda,  # page-locked: the copy to the GPU is asynchronous
        ):
            batches += 1
            batch = to_device(batch, device, _perf(spec, cuda, "channels_last"))
            loss = runner.loss(engine, batch, generator)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            loss_count += 1
            if int(engine.global_steps) == step:
                continue  # inside a gradient-accumulation window
            step = int(engine.global_steps)
            runner.after_step()
            done = step >= iterations
            if step % log_every == 0 or done:
                mean = loss_sum.clone()
                torch.distributed.all_reduce(mean)
                last_loss = float(mean) / (world * max(1, loss_count))
                loss_sum.zero_()
                loss_count = 0
                values = {"loss": last_loss}
                if rank == 0 and probe_batch is not None:
                    values["probe_loss"] = runner.probe(probe_batch, probe_seed)
                    values["lr"] = float(optimizer.param_groups[0]["lr"])
                board.scalars(step, values)
            if rank == 0 and probe_batch is not None and (step % sample_every == 0 or done):
                board.image(step, runner.samples(probe_batch, probe_seed))
            if step % ckpt_every == 0 or done:
                elapsed = time.perf_counter() - t_start
                state["seconds"] = float(state.get("seconds", 0.0)) + elapsed
                t_start = time.perf_counter()
                metrics = {
                    "step": step,
                    "loss": last_loss,
                    "attempt": state["attempt"],
                    "resumed_from": start_step,
                    "probe_loss_initial": state["probe_initial"],
                    "probe_loss": board.status.get("probe_loss"),
                    "seconds": state["seconds"],
                    "micro_batch": micro,
                    "workers": world,
                }
                checkpoint_now(metrics)
            if done:
                break
        if batches == 0:
            raise ConsistentAvatarError(
                f"actor {spec.actor!r}: worker {rank} got no full batch of {micro} frames from its share of the "
                "training split; use fewer workers or a smaller batch"
            )
        epoch += 1
    board.status["step"] = step
    board.write_status()
    board.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The ``TorchTrainer`` entry point: ``train_loop_config = {"spec": StageSpec}``."""
    stage_worker(config["spec"])
