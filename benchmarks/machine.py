"""The machine a benchmark ran on, recorded next to every figure (one definition for every script).

Imported by the scripts in this folder (``python benchmarks/bench_x.py`` puts the folder on
``sys.path``). Keys: hostname, platform, processor, python, torch, numpy, nproc, torch_threads,
cpu_model and loadavg_1m (Linux), and with ``gpu=True`` on a CUDA machine: gpu, gpu_memory_gib,
cuda, cudnn.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any


def machine_info(gpu: bool = False) -> dict[str, Any]:
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info
