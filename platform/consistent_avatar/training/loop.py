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


def _tiling_buffer(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The one flat buffer that ``grads`` tile exactly (contiguous, same storage, disjoint, no gap),
    as a 1-D tensor; None when they do not (then DeepSpeed's own per-tensor code runs)."""
    if not grads:
        return None
    first = grads[0]
    storage = first.untyped_storage()
    ptr, size = storage.data_ptr(), storage.nbytes() // first.element_size()
    spans = []
    for g in grads:
        if (g.dtype != first.dtype or g.device != first.device or g.is_sparse or not g.is_contiguous()
                or g.untyped_storage().data_ptr() != ptr):
            return None
        spans.append((g.storage_offset(), g.numel()))
    spans.sort()
    end = 0
    for offset, numel in spans:
        if offset != end:
            return None
        end += numel
    if end != size:
        return None
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, 0, (size,), (1,))


def lean_zero_step(engine: Any) -> bool:
    """Replace the per-parameter loops of DeepSpeed's ZeRO-1/2 ``step()`` with one reduction each over
    the flat gradient buffer, when the gradients live in one (ZeRO-2, contiguous_gradients: every
    gradient of this rank's partition is a view into one buffer; world size 1 and whole parameters).

    DeepSpeed 0.19.8 (``runtime/zero/stage_1_and_2.py``) does, per step and per trainable parameter:

    - ``get_grad_norm_direct`` (gradient clipping): ``g.to(float64)`` (a copy) then ``vector_norm`` — two
      kernels per parameter, then a stack and a sum;
    - ``has_overflow_partitioned_grads_serial`` (bf16 ``check_grad_overflow``): ``has_inf_or_nan(g)`` =
      ``amax``, ``amin``, two ``isfinite`` and a logical op, then an add into a counter — about six
      kernels per parameter, before one all-reduce and one ``.item()``.

    Here, when the gradients tile one buffer, the norm is ``vector_norm(…, dtype=float64)`` over the
    buffer in chunks (the same fp64 accumulation, so the same clipping factor up to fp64 rounding) and the overflow test is
    ``has_inf_or_nan(buffer)`` (the same answer: a non-finite gradient still skips the step). Everything
    after (all-reduces, ``.item()``, clipping, Adam, loss scale) is DeepSpeed's own code. Otherwise
    (offload, several ranks owning parts of a parameter, zero padding that is not all-zero...) each call
    falls back to DeepSpeed's method. Returns whether the fast paths were installed.
    """
    from deepspeed.runtime.utils import has_inf_or_nan
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if type(opt) is not DeepSpeedZeroOptimizer or opt.cpu_offload or opt.model_parallel_world_size != 1:
        return False
    needed = ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial", "bit16_groups",
              "averaged_gradients", "params_in_partition", "dp_process_group")
    missing = [name for name in needed if not hasattr(opt, name)]
    if missing:  # another DeepSpeed than the one this was written against (requirements.lock)
        log.warning("lean_zero_step: DeepSpeed's ZeRO optimiser lacks %s; its own step runs", missing)
        return False
    original_norm = opt.get_grad_norm_direct
    original_overflow = opt.has_overflow_partitioned_grads_serial

    def grad_norm(gradients: Any, params: Any, norm_type: float = 2) -> torch.Tensor:
        gradients, params = list(gradients), list(params)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)][: len(params)]
        flat = None
        if float(norm_type) == 2.0 and len(grads) == len(params) and not any(hasattr(p, "ds_pipe_replicated") for p in params):
            flat = _tiling_buffer(grads)
        if flat is None:
            return original_norm(gradients, params, norm_type)
        from deepspeed import comm as dist
        from deepspeed.runtime.zero.utils import get_norm_dtype
        from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

        # In chunks: an fp64 norm of the whole buffer would first copy all of it to fp64 (4× a bf16
        # gradient buffer: ~7 GB for a full SD 1.5 UNet); 2^24-element chunks keep that at 128 MB.
        norm_dtype = get_norm_dtype()
        total = sum(
            torch.linalg.vector_norm(chunk, 2, dtype=norm_dtype).pow(2) for chunk in flat.split(1 << 24)
        ).float()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=opt.device)
        return total

    def overflow_serial() -> torch.Tensor:
        own: list[torch.Tensor] = []
        for i in range(len(opt.bit16_groups)):
            grads = [g for g in opt.averaged_gradients[i] or [] if not getattr(g, "_zero_padding", False)]
            n = len(opt.params_in_partition[i])
            if any(g is None for g in grads[:n]):
                return original_overflow()
            # past the partition's parameters come only DeepSpeed's torch.zeros alignment padding
            own += grads[:n]
        flat = _tiling_buffer(own)
        if flat is None:
            return original_overflow()
        return has_inf_or_nan(flat).reshape(1)

    opt.get_grad_norm_direct = grad_norm
    opt.has_overflow_partitioned_grads_serial = overflow_serial
    return True


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
        mode = spec.performance.get("compile_mode") or "default"
        for m in modules:
            if type(m).__name__ != "AutoencoderKL":
                m.compile(mode=mode)


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

    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + rank)
    state: dict[str, Any] = {"attempt": 1, "probe_initial": None, "seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            folder = Path(d)
            saved = json.loads((folder / STATE_FILE).read_text())
            engine.load_checkpoint(str(folder), tag=saved["tag"])
            rng = folder / f"rng_rank{rank}.pt"
            if rng.is_file():
                generator.set_state(torch.load(rng, weights_only=True))
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
