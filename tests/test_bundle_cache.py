"""The bundle cache (consistent_avatar.bundle): bounded size, least-recently-used pruning, entries
locked by their readers, stale leftovers, the limit's environment variable."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from bundle_factory import make_tiny_bundle
from pyarrow import fs as pafs

from consistent_avatar.bundle import (
    CACHE_LIMIT_ENV,
    ActorBundle,
    bundle_cache_limit,
    cache_entry_lock_path,
    load_bundle,
    locate_bundle,
)
from consistent_avatar.errors import ConsistentAvatarError

ACTORS = ("a", "b", "c")


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory) -> Path:
    """Three tiny bundles (different weights) on a folder served as a non-local filesystem."""
    root = tmp_path_factory.mktemp("remote")
    for seed, actor in enumerate(ACTORS):
        make_tiny_bundle(root, actor, seed=seed)
    return root


@pytest.fixture
def remote(remote_dir: Path) -> pafs.FileSystem:
    # not a LocalFileSystem: load_bundle downloads into the cache, as from s3:// or gs://
    return pafs.SubTreeFileSystem(str(remote_dir), pafs.LocalFileSystem())


@pytest.fixture(autouse=True)
def _no_limit_from_outside(monkeypatch) -> None:
    monkeypatch.delenv(CACHE_LIMIT_ENV, raising=False)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """The bundle module's log records of INFO and above (the suite runs with ``-p no:logging``)."""
    logger = logging.getLogger("consistent_avatar.bundle")
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = got.append  # type: ignore[method-assign]
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield got
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _entries(cache: Path) -> dict[str, Path]:
    """actor → its cached folder (``<actor>-<16 hex>``)."""
    return {p.name.rsplit("-", 1)[0]: p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _messages(records: list[logging.LogRecord], level: int) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level]


def _same_weights(x: ActorBundle, y: ActorBundle) -> None:
    assert set(x.tsdm) == set(y.tsdm) and set(x.fcsd) == set(y.fcsd)
    for mine, theirs in [*zip(x.tsdm.values(), y.tsdm.values()), *zip(x.fcsd.values(), y.fcsd.values())]:
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(x.emotions.embeddings, y.emotions.embeddings)


def test_least_recently_used_bundles_are_pruned_to_the_limit(
    tmp_path, remote_dir, remote, records, monkeypatch
) -> None:
    size = max(_bytes(remote_dir / a) for a in ACTORS)
    monkeypatch.setenv(CACHE_LIMIT_ENV, str(2.5 * size / 1e9))  # room for two of the three
    cache = tmp_path / "cache"
    loaded = {a: load_bundle(a, filesystem=remote, cache_dir=cache) for a in ACTORS}
    entries = _entries(cache)
    assert set(entries) == {"b", "c"}  # a, the least recently used, made room for c
    assert loaded["b"].root == entries["b"] and loaded["c"].root == entries["c"]
    assert not loaded["a"].root.exists() and not cache_entry_lock_path(loaded["a"].root).exists()
    assert not [p for p in cache.iterdir() if ".trash-" in p.name or ".staging-" in p.name]
    pruned = [m for m in _messages(records, logging.INFO) if "pruned" in m]
    assert len(pruned) == 1 and f"({loaded['a'].root.name})" in pruned[0]
    assert f"freed {_bytes(remote_dir / 'a') / 1e9:.2f} GB" in pruned[0]
    assert not _messages(records, logging.WARNING)

    records.clear()
    again = load_bundle("a", filesystem=remote, cache_dir=cache)  # pruned: downloaded again
    assert again.root == loaded["a"].root
    assert any("downloaded to" in m for m in _messages(records, logging.INFO))
    assert set(_entries(cache)) == {"c", "a"}  # b is now the least recently used
    assert sum(_bytes(p) for p in _entries(cache).values()) <= 2.5 * size
    # what was loaded from the pruned-then-downloaded copy equals the original bundle
    _same_weights(again, load_bundle(remote_dir / "a"))
    _same_weights(again, loaded["a"])

    records.clear()
    load_bundle("c", filesystem=remote, cache_dir=cache, variants=("lcm",))  # a cache hit: nothing downloaded
    assert any("using the cached copy" in m for m in _messages(records, logging.INFO))
    load_bundle("b", filesystem=remote, cache_dir=cache, variants=("lcm",))  # c is now newer than a
    assert set(_entries(cache)) == {"c", "b"}


def test_an_entry_locked_by_a_reader_is_not_pruned(tmp_path, remote_dir, remote, records) -> None:
    cache = tmp_path / "cache"
    first = locate_bundle("a", filesystem=remote, cache_dir=cache)
    limit = int(2.5 * _bytes(first))
    load = {"filesystem": remote, "cache_dir": cache, "cache_limit_bytes": limit}
    locate_bundle("b", **load)
    # another process (a pool actor between fetching a and reading its files) holds a's lock shared
    fd = os.open(cache_entry_lock_path(first), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        third = load_bundle("c", **load)  # a is the least recently used, but in use: b goes instead
        assert set(_entries(cache)) == {"a", "c"} and third.root.is_dir()
        assert (first / "bundle.json").is_file() and not _messages(records, logging.WARNING)
        # room for one: c goes, a stays over the limit, with a warning naming it
        locate_bundle("b", **(load | {"cache_limit_bytes": int(1.5 * _bytes(first))}))
        assert set(_entries(cache)) == {"a", "b"}
        warned = _messages(records, logging.WARNING)
        assert len(warned) == 1 and "being loaded by other processes" in warned[0] and first.name in warned[0]
    finally:
        os.close(fd)
    _same_weights(load_bundle(first), load_bundle(remote_dir / "a"))  # untouched by the pruner
    locate_bundle("c", **load)  # released: a, the least recently used, is pruned now
    assert set(_entries(cache)) == {"b", "c"}


def test_a_bundle_larger_than_the_limit_is_kept_with_a_warning(tmp_path, remote, records) -> None:
    cache = tmp_path / "cache"
    a = load_bundle("a", filesystem=remote, cache_dir=cache, cache_limit_bytes=1000, variants=("lcm",))
    assert a.root.is_dir() and set(_entries(cache)) == {"a"}
    warned = _messages(records, logging.WARNING)
    assert len(warned) == 1 and "smaller than one bundle" in warned[0] and a.root.name in warned[0]
    b = locate_bundle("b", filesystem=remote, cache_dir=cache, cache_limit_bytes=1000)
    assert set(_entries(cache)) == {"b"} and b.is_dir() and not a.root.exists()


def test_unlimited_cache_keeps_everything(tmp_path, remote, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_LIMIT_ENV, "none")
    for actor in ACTORS:
        locate_bundle(actor, filesystem=remote, cache_dir=cache)
    locate_bundle("a", filesystem=remote, cache_dir=tmp_path / "cache", cache_limit_bytes=math.inf)
    assert set(_entries(cache)) == set(ACTORS)


@pytest.mark.parametrize("limit", [10**12, math.inf], ids=["limited", "unlimited"])
def test_stale_leftovers_are_removed_and_fresh_ones_left_alone(tmp_path, remote, limit) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    made = {}
    for name in (".x-0123456789abcdef.staging-0badf00d", ".x-0123456789abcdef.trash-0badf00d",
                 ".y-0123456789abcdef.staging-12345678", ".y-0123456789abcdef.trash-12345678", "notes"):
        (cache / name / "vae").mkdir(parents=True)
        (cache / name / "vae" / "part").write_bytes(b"0" * 100)
        made[name] = cache / name
    for p in [made[".x-0123456789abcdef.staging-0badf00d"], made[".x-0123456789abcdef.trash-0badf00d"]]:
        for q in [p / "vae" / "part", p / "vae", p]:
            os.utime(q, (two_days_ago, two_days_ago))
    locate_bundle("a", filesystem=remote, cache_dir=cache, cache_limit_bytes=limit)
    assert not made[".x-0123456789abcdef.staging-0badf00d"].exists()  # a killed download, two days old
    assert not made[".x-0123456789abcdef.trash-0badf00d"].exists()
    assert not made[".y-0123456789abcdef.trash-12345678"].exists()  # a killed pruner's, of any age
    assert made[".y-0123456789abcdef.staging-12345678"].is_dir()  # maybe a download in progress
    assert made["notes"].is_dir()  # not the cache's


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "lots", "nan", "1e-3GB"])
def test_a_bad_limit_in_the_environment_names_the_variable(tmp_path, remote, monkeypatch, value) -> None:
    monkeypatch.setenv(CACHE_LIMIT_ENV, value)
    with pytest.raises(ConsistentAvatarError, match=CACHE_LIMIT_ENV):
        load_bundle("a", filesystem=remote, cache_dir=tmp_path / "cache")
    with pytest.raises(ConsistentAvatarError, match=CACHE_LIMIT_ENV):
        bundle_cache_limit()
    assert not (tmp_path / "cache").exists() or not _entries(tmp_path / "cache")


def test_limit_values(monkeypatch) -> None:
    assert bundle_cache_limit() == 50 * 10**9
    cases = [("2.5", 2_500_000_000), (" 1e-6 ", 1000), ("inf", None), ("None", None), ("", 50 * 10**9)]
    for text, expected in cases:
        monkeypatch.setenv(CACHE_LIMIT_ENV, text)
        assert bundle_cache_limit() == expected
    monkeypatch.setenv(CACHE_LIMIT_ENV, "0")
    assert bundle_cache_limit(123) == 123 and bundle_cache_limit(math.inf) is None  # the keyword wins
    for bad in (0, -5, math.nan, True, "10"):
        with pytest.raises(ConsistentAvatarError, match="cache_limit_bytes"):
            bundle_cache_limit(bad)  # type: ignore[arg-type]


def test_a_reader_waiting_on_a_lock_the_pruner_deletes_locks_the_new_file(tmp_path, monkeypatch) -> None:
    import threading

    from consistent_avatar import bundle as bundle_module
    from consistent_avatar.bundle import _flock

    lock = cache_entry_lock_path(tmp_path / "a-0123456789abcdef")
    pruner = _flock(lock, fcntl.LOCK_EX)
    waiting = threading.Event()
    shared_calls: list[int] = []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:  # the reader's calls: say when it is about to block
        if operation == fcntl.LOCK_SH:
            shared_calls.append(os.fstat(fd).st_ino)
            waiting.set()
        real_flock(fd, operation)

    monkeypatch.setattr(bundle_module.fcntl, "flock", flock)
    got: list[int | None] = []
    reader = threading.Thread(target=lambda: got.append(_flock(lock, fcntl.LOCK_SH)))
    reader.start()
    assert waiting.wait(10)  # it holds the lock file open: whenever its flock runs, the file is the old one
    assert not got  # waiting for the pruner
    lock.unlink()  # the pruner removed the entry and its lock file, then lets go
    os.close(pruner)
    reader.join(5)
    assert got and got[0] is not None
    try:
        assert os.fstat(got[0]).st_ino == lock.stat().st_ino  # the file now at the path, not the deleted one
        assert len(shared_calls) == 2  # it locked the deleted file, saw it gone, and locked the new one
        assert _flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) is None  # so a second pruner cannot take it
    finally:
        os.close(got[0])


def test_a_folder_that_is_not_a_published_bundle_is_never_pruned(tmp_path, remote) -> None:
    """Only folders holding a bundle.json count as entries: a user's folder that happens to be named
    like one (``<name>-<16 hex>``) in a chosen cache_dir is neither counted nor deleted."""
    cache = tmp_path / "cache"
    mine = cache / "results-0123456789abcdef"
    mine.mkdir(parents=True)
    (mine / "data.bin").write_bytes(b"0" * 10_000)
    os.utime(mine, (0, 0))  # older than everything
    for actor in ACTORS:
        locate_bundle(actor, filesystem=remote, cache_dir=cache, cache_limit_bytes=1000)
    assert (mine / "data.bin").is_file() and set(_entries(cache)) == {"c", "results"}


def test_a_filesystem_without_flock_loads_unprotected_and_prunes_nothing(tmp_path, remote, records, monkeypatch) -> None:
    """Some FUSE / SMB volumes cannot flock: loading still works, nothing is deleted (deleting without
    locks could pull a bundle from under another reader), and a warning says why and what to do."""
    import errno

    from consistent_avatar import bundle as bundle_module

    def no_flock(fd, operation):  # noqa: ANN001
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(bundle_module.fcntl, "flock", no_flock)
    cache = tmp_path / "cache"
    loaded = [load_bundle(a, filesystem=remote, cache_dir=cache, cache_limit_bytes=1000, variants=("lcm",))
              for a in ACTORS]
    assert set(_entries(cache)) == set(ACTORS) and all(b.root.is_dir() for b in loaded)
    warned = _messages(records, logging.WARNING)
    assert warned and all("cannot lock files" in m and "CONSISTENT_AVATAR_CACHE" in m for m in warned)


def test_room_is_made_before_a_download_starts(tmp_path, remote_dir, remote, monkeypatch) -> None:
    """The cache makes room for a bundle (its size from bundle.json) before downloading it, so the
    cache stays within its limit during the download too: with room for two, c's download starts
    after a, the least recently used, is gone."""
    from pyarrow import fs as pyarrow_fs

    size = max(_bytes(remote_dir / a) for a in ACTORS)
    cache = tmp_path / "cache"
    load = {"filesystem": remote, "cache_dir": cache, "cache_limit_bytes": int(2.5 * size)}
    for actor in ("a", "b"):
        locate_bundle(actor, **load)
    seen: list[set[str]] = []
    real_copy = pyarrow_fs.copy_files  # what _fetch downloads with (imported from pyarrow.fs at call time)

    def copy_files(*args, **kwargs):  # noqa: ANN002, ANN003
        seen.append(set(_entries(cache)))
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(pyarrow_fs, "copy_files", copy_files)
    locate_bundle("c", **load)
    assert seen == [{"b"}] and set(_entries(cache)) == {"b", "c"}
