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

The driver creates the folder; a worker on a node that does not see it (the volume not mounted there)
warns and keeps torch's default cache rather than creating the path on the node's own disk. The folder
must be a local or mounted path: inductor writes its entries there by path, with atomic renames.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from .errors import ConsistentAvatarError
from .io import is_uri

log = logging.getLogger(__name__)

#: the environment variable inductor reads for its cache root (Triton's kernels go under it too,
#: unless ``TRITON_CACHE_DIR`` is set)
ENV = "TORCHINDUCTOR_CACHE_DIR"


def check_compile_cache(folder: str | os.PathLike[str], create: bool = True) -> Path:
    """The absolute cache folder, checked writable — before any work, on the driver (``create``: made
    if missing). Workers pass ``create=False``: a folder the driver made but this node does not see
    means the shared volume is not mounted here, and creating it would fill the node's own disk."""
    if is_uri(str(folder)):
        raise ConsistentAvatarError(
            f"compile cache {folder}: a storage URI cannot hold torch.compile's cache (inductor writes files "
            "there by path); give a local folder or a mounted shared volume"
        )
    path = Path(folder).expanduser().absolute()
    if not create and not path.is_dir():
        raise ConsistentAvatarError(
            f"compile cache {path} does not exist on this node: mount the shared volume here at the same path"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConsistentAvatarError(
            f"compile cache {path}: cannot write there ({exc.strerror or exc}); give a writable folder"
        ) from None
    return path


def use_compile_cache(folder: str | os.PathLike[str] | None, create: bool = True) -> Path | None:
    """Make this process's later ``torch.compile`` calls read and write their cache under ``folder``.

    Call it before the first compilation of the process (a Ray worker's set-up, with ``create=False``:
    see :func:`check_compile_cache`): inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it looks for
    its cache. None leaves torch's default.
    """
    if folder is None:
        return None
    path = check_compile_cache(folder, create=create)
    os.environ[ENV] = str(path)
    return path


def join_compile_cache(folder: str | os.PathLike[str] | None, who: str) -> Path | None:
    """A worker's set-up (``who``: "this pool actor", "this worker"): use the folder the driver checked,
    or — on a node that does not see it (the volume not mounted here) — warn and keep torch's own cache.
    The cache only saves time, so a node without it still does the same work."""
    try:
        return use_compile_cache(folder, create=False)
    except ConsistentAvatarError as exc:
        log.warning("%s: %s compiles with torch's own cache", exc, who)
        return None
