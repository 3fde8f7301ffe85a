"""GPU time by kernel from a torch.profiler run (one definition for the benchmark scripts' ``--profile``).

GPU busy time (the sum of kernel times) against the wall time of the profiled work tells launch-bound
(much less) from compute-bound (close); the top kernels tell which layers cost the most.
"""

from __future__ import annotations

from typing import Any

import torch


def kernel_summary(prof: Any, per: int = 1, top: int = 25) -> dict[str, Any]:
    """Busy ms, kernel launches and the ``top`` kernels of a finished ``torch.profiler.profile``,
    each divided by ``per`` (the number of calls or steps profiled)."""
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "gpu_busy_ms": round(sum(e.self_device_time_total for e in kernels) / 1000 / per, 2),
        "kernel_launches": sum(e.count for e in kernels) // per,
        "top_kernels": [
            {"name": e.key[:120], "count": e.count // per, "ms": round(e.self_device_time_total / 1000 / per, 3)}
            for e in kernels[:top]
        ],
    }
