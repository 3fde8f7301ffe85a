"""The shared torch.compile cache (render --compile-cache, performance.compile_cache)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from consistent_avatar.compile_cache import ENV, check_compile_cache, use_compile_cache
from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.render.config import RenderConfig
from consistent_avatar.training.config import TrainConfig

PLATFORM = Path(__file__).resolve().parents[1] / "platform"


def _restore_env_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """use_compile_cache writes os.environ itself: let monkeypatch record (and later restore) the
    variable's state before the test runs without it."""
    monkeypatch.setenv(ENV, "recorded")
    monkeypatch.delenv(ENV)


def test_none_leaves_torch_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _restore_env_afterwards(monkeypatch)
    assert use_compile_cache(None) is None
    assert ENV not in os.environ


def test_a_folder_is_created_made_absolute_and_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _restore_env_afterwards(monkeypatch)
    monkeypatch.chdir(tmp_path)
    path = use_compile_cache("cache/inductor")
    assert path == tmp_path / "cache" / "inductor" and path.is_dir()
    assert os.environ[ENV] == str(path)
    assert not list(path.iterdir())  # the write check leaves nothing behind


def test_uris_and_unwritable_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConsistentAvatarError, match="URI cannot hold torch.compile's cache"):
        check_compile_cache("s3://bucket/cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConsistentAvatarError, match="cannot write there"):
        check_compile_cache(blocker / "cache")


def test_render_needs_compile_for_a_cache_and_the_command_line_keeps_it(tmp_path: Path) -> None:
    from consistent_avatar.render.cli import command_line

    with pytest.raises(ConsistentAvatarError, match="compile_cache is set but compile is off"):
        RenderConfig.build(compile_cache=str(tmp_path))
    config = RenderConfig.build(compile=True, compile_cache=str(tmp_path))
    assert f"--compile-cache {tmp_path}" in command_line("S", "B", "O", config)


def test_train_takes_the_cache_as_a_set_override(tmp_path: Path) -> None:
    config = TrainConfig().with_overrides([f"performance.compile_cache={tmp_path}"])
    assert config.performance.compile_cache == str(tmp_path)


def test_a_render_pool_actor_compiles_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool actor uses the folder the driver checked; on a node where it is missing (the shared
    volume not mounted) it warns and keeps torch's own cache instead of filling the node's disk."""
    import torch

    from consistent_avatar.render import job as render_job

    _restore_env_afterwards(monkeypatch)
    threads = torch.get_num_threads()

    def spec(cache: Path) -> render_job.JobSpec:
        return render_job.JobSpec(
            out=str(tmp_path / "OUT"), actors={}, seed=0, use_gpu=False, dtype="float32", num_threads=1,
            compile=True, compile_cache=str(cache), batch_size=2, refine=None, refiner=None,
            cache_size=1, verify=True,
        )

    try:
        with pytest.raises(ConsistentAvatarError, match="does not exist on this node: mount the shared volume"):
            check_compile_cache(tmp_path / "unmounted", create=False)
        render_job.FrameRenderer(spec(tmp_path / "unmounted"))
        assert ENV not in os.environ and not (tmp_path / "unmounted").exists()
        check_compile_cache(tmp_path / "cache")  # what the driver does before the job
        render_job.FrameRenderer(spec(tmp_path / "cache"))
        assert os.environ[ENV] == str(tmp_path / "cache")
    finally:
        torch.set_num_threads(threads)  # the pool actor set its own


# A function compiled by inductor in a fresh process: the first run fills the cache, the second
# (another process, as another pool actor or trainer would be) hits it.
_COMPILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from consistent_avatar.compile_cache import use_compile_cache
    use_compile_cache(sys.argv[1])
    import torch
    from torch._dynamo.utils import counters
    torch.set_num_threads(1)

    def f(x):
        return torch.nn.functional.silu(x) * 3.0 + x.sin()

    torch.compile(f)(torch.ones(8))
    print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
    """
)


def test_a_second_process_hits_what_the_first_compiled(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "TRITON_CACHE_DIR")}

    def run() -> str:
        done = subprocess.run(
            [sys.executable, "-c", _COMPILE, str(cache), str(PLATFORM)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    assert run() == "hits 0 misses 1"
    assert any(cache.rglob("*")), "inductor wrote nothing under the cache folder"
    assert run() == "hits 1 misses 0"
