"""Shared fixtures: one local Ray for the whole session, started only by tests that ask for it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
