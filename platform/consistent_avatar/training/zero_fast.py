"""Fast paths through DeepSpeed's ZeRO-1/2 optimiser for what a stage trainer does most: one worker.

DeepSpeed's ZeRO-2 is written for many ranks, and pays for it per trainable tensor on every step even
when there is one rank: a Python gradient hook per parameter copies each gradient into a bucket and
then into the partition buffer (:func:`lean_zero_backward` replaces that), and the optimiser step
takes a norm and an overflow test per parameter (:func:`lean_zero_step`). An sd15 stage-3 step has
448 trainable tensors; on an H200 under CUDA graphs the hooks alone were 19.6 ms of host time in a
59 ms backward (``benchmarks/README.md``). Both keep DeepSpeed's numbers: the same gradients reach
the same fp32 Adam step (bitwise-equal weights in ``tests/test_zero_step.py``), and each installs only
when the optimiser's state is the plain case it was written for; otherwise DeepSpeed's code runs.
Written against the DeepSpeed of ``requirements.lock`` (0.19.8).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


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
        flat = getattr(gradients, "flat_partition", None)  # published by lean_zero_backward
        gradients, params = list(gradients), list(params)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)][: len(params)]
        if float(norm_type) != 2.0 or any(hasattr(p, "ds_pipe_replicated") for p in params):
            flat = None
        elif flat is None and len(grads) == len(params):
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
        published = [getattr(opt.averaged_gradients.get(i), "flat_partition", None) for i in range(len(opt.bit16_groups))]
        if all(f is not None for f in published):  # lean_zero_backward's buffers (zero padding included)
            return torch.stack([has_inf_or_nan(f) for f in published]).any().reshape(1)
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


class _FlatGradients(list):
    """``averaged_gradients[i]`` as DeepSpeed reads it (the per-parameter gradient views, in partition
    order), plus ``flat_partition``: the flat buffer they tile, which ZeRO's ``step()`` then takes as
    the whole partition's gradient instead of concatenating the list (its hook for pre-flattened
    gradients, ``_get_preflattened_grad_partition``)."""

    flat_partition: torch.Tensor


def lean_zero_backward(engine: Any) -> bool:
    """One worker under ZeRO-2: gradients reach DeepSpeed's partition through one multi-tensor copy
    after the backward instead of a Python hook per parameter during it.

    DeepSpeed registers a hook on every trainable parameter's gradient accumulator; per parameter and
    per step it copies the gradient into the reduce bucket, at the bucket's end "reduces" it (with one
    rank: an all-reduce of one tensor) and copies it again into the partition's gradient buffer. With
    one rank nothing is reduced, so here the hooks are removed and, after the backward (where DeepSpeed
    runs its own reduction epilogue), ``torch._foreach_copy_`` moves every ``param.grad`` into one
    persistent flat buffer in the partition's order; ``averaged_gradients`` then holds views into it
    and ``step()`` reads the buffer whole. A parameter that got no gradient contributes zeros, as it does
    in DeepSpeed's flat partition. Installed only for: DeepSpeed's ZeRO-2 optimiser, one data-parallel
    rank, no offload, contiguous gradients without overlap, one micro-batch per step (gradient
    accumulation goes through DeepSpeed's accumulators), bit16 gradients (no fp32 accumulation
    buffer), whole unpadded parameters in each partition, Adam-style optimisers (not Muon). The
    gradients are moved by ``engine.backward`` (which runs the epilogue), as the trainer does; a bare
    ``loss.backward()`` would leave them on the parameters. Returns whether it was installed.
    """
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if type(opt) is not DeepSpeedZeroOptimizer:
        return False
    needed = ("_grad_acc_hooks", "params_in_partition", "params_not_in_partition", "partition_size", "first_offset",
              "averaged_gradients", "overlapping_partition_gradients_reduce_epilogue", "_get_preflattened_grad_partition",
              "_use_compact_grad_partition_buffer", "round_robin_bit16_padding", "use_grad_accum_attribute")
    missing = [name for name in needed if not hasattr(opt, name)]
    if missing:  # another DeepSpeed than the one this was written against
        log.warning("lean_zero_backward: DeepSpeed's ZeRO optimiser lacks %s; its own backward runs", missing)
        return False
    groups = range(len(opt.bit16_groups))
    plain = (
        opt.partition_gradients and not opt.cpu_offload and opt.contiguous_gradients and not opt.overlap_comm
        and not opt.use_grad_accum_attribute and engine.gradient_accumulation_steps() == 1
        and dist.get_world_size(group=opt.dp_process_group) == 1
        # step() rebuilding gradients itself, expert-parallel folding, a pre-division of gradients:
        # DeepSpeed's per-parameter path does work there that the copy below does not
        and getattr(engine, "managed_gradient_accumulation", lambda: True)()
        and getattr(opt, "autoep_folding_tp_group", None) is None
        and float(getattr(opt, "gradient_predivide_factor", 1.0)) == 1.0
        and all(
            opt.params_in_partition[i] and not opt._use_compact_grad_partition_buffer(i)
            and not opt.params_not_in_partition[i]
            and not (hasattr(opt, "_is_muon_group") and opt._is_muon_group(opt.params_in_partition[i]))
            and int(opt.first_offset[i]) == 0 and not any(opt.round_robin_bit16_padding[i])
            and sum(p.numel() for p in opt.params_in_partition[i]) <= int(opt.partition_size[i])
            for i in groups
        )
    )
    if not plain:
        return False
    flats: list[torch.Tensor] = []
    views: list[list[torch.Tensor]] = []
    for i in groups:
        params = opt.params_in_partition[i]
        flat = torch.zeros(int(opt.partition_size[i]), dtype=opt.dtype, device=params[0].device)
        group_views, offset = [], 0
        for p in params:
            group_views.append(flat.narrow(0, offset, p.numel()).view_as(p))
            offset += p.numel()
        flats.append(flat)
        views.append(group_views)
    for handle in opt._grad_acc_hooks:
        handle.remove()
    opt._grad_acc_hooks.clear()

    def epilogue() -> None:
        for i in groups:
            params = opt.params_in_partition[i]
            dst, src = [], []
            for view, p in zip(views[i], params):
                if p.grad is None:
                    view.zero_()
                else:
                    dst.append(view)
                    src.append(p.grad)
                    p.grad = None
            if dst:
                torch._foreach_copy_(dst, src)
            grads = _FlatGradients(views[i])
            grads.flat_partition = flats[i]
            opt.averaged_gradients[i] = grads

    opt.overlapping_partition_gradients_reduce_epilogue = epilogue
    return True
