"""Where ``torch.compile`` keeps what it compiled: one folder for every process that compiles the same networks.

Why: compiling is a fixed cost per process — about 140 s for the sd15 render pipeline in each render
pool actor and about 190 s for each training stage of each actor on an H200 (benchmarks/README.md).
Inductor caches its work on disk (the FX-graph and AOTAutograd caches and the generated Triton/C++
kernels, keyed by the graph, the shapes, the device and the library versions), but by default under
the process's temporary folder (``/tmp/torchinductor_<user>``): one cache per node, and on Kubernetes
one per pod, gone with the pod. Pointing every process at one folder on a shared volume lets every
compilation after the first one on the cluster hit that cache — other actors of the same preset,
later stages of the same shapes, the next render job. Dynamo still traces the Python (tens of
seconds at sd15 shapes); the hit saves inductor's code generation, autotuning and kernel builds.

A cache that only one node sees is harmless (the other nodes compile and fill their own). The folder
must be a local or mounted path: inductor writes its entries there by path, with atomic renames.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConsistentAvatarError
from .io import is_uri

#: the environment variable inductor reads for its cache root (Triton's kernels go under it too,
#: unless ``TRITON_CACHE_DIR`` is set)
ENV = "TORCHINDUCTOR_CACHE_DIR"


def check_compile_cache(folder: str | os.PathLike[str]) -> Path:
    """The absolute cache folder, created and checked writable — before any work, on the driver."""
    if is_uri(str(folder)):
        raise ConsistentAvatarError(
            f"compile cache {folder}: a storage URI cannot hold torch.compile's cache (inductor writes files "
            "there by path); give a local folder or a mounted shared volume"
        )
    path = Path(folder).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConsistentAvatarError(
            f"compile cache {path}: cannot write there ({exc.strerror or exc}); give a writable folder"
        ) from None
    return path


def use_compile_cache(folder: str | os.PathLike[str] | None) -> Path | None:
    """Make this process's later ``torch.compile`` calls read and write their cache under ``folder``.

    Call it before the first compilation of the process (a Ray worker's set-up): inductor reads
    ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks for its cache. None leaves torch's default.
    """
    if folder is None:
        return None
    path = check_compile_cache(folder)
    os.environ[ENV] = str(path)
    return path
