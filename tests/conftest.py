"""Shared fixtures: one local Ray for the whole session, started only by tests that ask for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


try:  # CI runs the same examples every time: a rare counterexample shows up where it was introduced
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # hypothesis is a test extra
    pass


@pytest.fixture(autouse=True)
def _restore_process_settings() -> Iterator[None]:
    """Each test leaves the process as it found it: library code under test sets torch's thread count
    (the render pool's and the training workers' one-thread-per-CPU settings) and environment variables
    (``DS_ACCELERATOR``), which would otherwise slow every later test or change what it computes."""
    import torch

    threads, env = torch.get_num_threads(), dict(os.environ)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})


@pytest.fixture(scope="session", autouse=True)
def _own_torch_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """An empty torch hub cache for the whole session: LPIPS/RAFT weights in a developer's own cache
    would otherwise change what the evaluation tests compute (``--flow auto`` picks RAFT when present).
    Tests that need weights put them in a TORCH_HOME of their own."""
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch_home"))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 2 CPUs, shared by every test of the session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        from consistent_avatar.cluster import ensure_ray

        ensure_ray(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=512 * 1024**2,
            configure_logging=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def end_process_group() -> None:
    """Destroy this process's torch.distributed group through DeepSpeed, which also drops the groups
    it cached (e.g. its clone of the world group): after a plain ``torch.distributed`` teardown the
    next in-process engine of another test would use a dead cached group ("Group ... is not
    registered")."""
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()
