"""Small I/O building blocks: atomic writes, atomic directory publication, PNG coding, fingerprints,
and storage locations (a local path or a pyarrow filesystem URI → filesystem + path).

Every dataset, checkpoint or bundle the platform writes becomes visible only when complete: files
are written under a temporary name and renamed; directories are assembled beside their final place
and renamed into it (a rename within one filesystem is atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import ConsistentAvatarError


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI (``scheme://…``) rather than a local or shared-filesystem path."""
    return "://" in os.fspath(location)


def absolute_or_uri(location: str | os.PathLike[str]) -> str:
    """A URI as given; a local path made absolute. Ray Train hands ``storage_path`` to
    ``pyarrow.fs.FileSystem.from_uri`` (which refuses ``runs/x``), and Ray workers do not run in the
    driver's working directory, so every location a job hands to other processes goes through here."""
    text = os.fspath(location)
    return text if is_uri(text) else str(Path(text).expanduser().absolute())


def resolve_filesystem(location: str | os.PathLike[str], what: str = "storage") -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a local path or a pyarrow filesystem URI (``file:///…``,
    ``s3://bucket/…``, ``gs://bucket/…``). A local path is made absolute, on the local filesystem.
    A URI that pyarrow cannot open (unknown scheme, a filesystem this pyarrow lacks) raises
    :class:`ConsistentAvatarError` naming the URI and the fix; ``what`` names the location in it."""
    from pyarrow import ArrowException
    from pyarrow import fs as pafs

    text = os.fspath(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except (ArrowException, ValueError, OSError) as exc:
        raise ConsistentAvatarError(
            f"cannot open the {what} URI {text!r}: {first_line(exc)} (give a local path or a pyarrow filesystem "
            "URI such as file:///…, s3://bucket/…, gs://bucket/…, with credentials in the environment)"
        ) from exc


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, shortened: pyarrow's can run to pages (libjvm probes)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def require_local_dir(location: str | os.PathLike[str], what: str, why: str) -> Path:
    """``location`` as an absolute local path; a URI raises :class:`ConsistentAvatarError` saying that
    ``what`` must be a local or shared-filesystem path, because ``why``."""
    if is_uri(location):
        raise ConsistentAvatarError(
            f"{what} {os.fspath(location)!r} is a URI, but it must be a local or shared-filesystem path: {why}"
        )
    return Path(location).expanduser().absolute()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_table(path: str | os.PathLike[str], table: Any, compression: str = "zstd") -> Path:
    """Write a pyarrow table as one parquet file, visible only when complete (temporary name, rename)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, compression=compression)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def staging_dir(final: Path) -> Path:
    """A fresh, hidden directory beside ``final`` to assemble its contents in."""
    tmp = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(staged: Path, final: Path) -> None:
    """Move a fully written ``staged`` directory to ``final``, replacing any previous version.

    The old version is first renamed aside, so at no moment is a half-written directory visible
    under ``final``; the old copy is deleted only after the new one is in place.
    """
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Delete leftovers of killed runs (``.*.staging-*`` / ``.*.old-*``) under ``parent``."""
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p.name.startswith(".") and (".staging-" in p.name or ".old-" in p.name or ".tmp-" in p.name):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """Lossless PNG bytes of an RGB (H,W,3) or grey (H,W) uint8 image.

    Level 1 compression: the shards trade ~10% size for several times faster encoding.
    """
    if image.dtype != np.uint8:
        raise ConsistentAvatarError(f"encode_png expects uint8, got {image.dtype}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ConsistentAvatarError(f"could not PNG-encode an image of shape {image.shape}")
    return buf.tobytes()


def decode_png(data: bytes, channels: int = 3) -> np.ndarray:
    """Decode PNG bytes to uint8 RGB (H,W,3) when ``channels`` is 3, or grey (H,W) when 1."""
    flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None:
        raise ConsistentAvatarError("corrupt PNG bytes in a shard: re-run `cavatar prepare --force`")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if channels == 3 else img


def fingerprint_of(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (configs, file listings)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
