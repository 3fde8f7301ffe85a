"""Parquet shards: the schema `cavatar prepare` writes and that training, rendering and evaluation read.

Layout of a shard directory ``S``::

    S/manifest.json                 dataset manifest (written last): schema version, resolution,
                                    TSD settings, emotion table, per-actor counts and fingerprints
    S/emotions.parquet              emotion table: label, id, CLIP text embedding (one row per label)
    S/actors/<actor>/part-*.parquet one row per frame (columns below), ~frames_per_task rows a file
    S/actors/<actor>/_actor.json    per-actor manifest (written last inside the actor directory)

An actor directory appears under ``S/actors`` only once complete (assembled in a hidden staging
directory, then renamed). Images are stored as PNG bytes (lossless, ~3x smaller than raw), TSD maps as
8-bit PNG of the VAE-normalised map (see :mod:`consistent_avatar.tsd`), VAE latents (optional) as raw
float16 bytes whose shape is in the manifest, with the identity of the VAE that made them
(``vae_identity``, by content: :mod:`consistent_avatar.vae_identity`; absent in older shards).

Where shards are read from: ``S`` is a local (or shared-filesystem) path or any pyarrow filesystem
URI (``file:///…``, ``s3://bucket/…``, ``gs://bucket/…``). :func:`open_shards` resolves it once into
a :class:`Shards` (filesystem + root); every reader here accepts either form, and one that is handed
a :class:`Shards` does not resolve the URI again. ``cavatar prepare`` still writes local paths only.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConsistentAvatarError
from ..io import decode_png, first_line, is_uri, resolve_filesystem
from .layout import EXPRESSION_DIM, POSE_DIM

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
EMOTION_TABLE_FILE = "emotions.parquet"
ACTORS_DIR = "actors"
ACTOR_MANIFEST_FILE = "_actor.json"

IMAGE_COLUMNS = ("real_rgb", "coarse_rgb", "coarse_normal", "tsd_real", "tsd_coarse")
LATENT_COLUMNS = ("latent_real", "latent_tsd_real", "latent_tsd_coarse")


def frame_schema(with_latents: bool = False) -> pa.Schema:
    fields = [
        pa.field("actor", pa.string()),
        pa.field("frame", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("real_rgb", pa.binary()),
        pa.field("mask", pa.binary()),
        pa.field("coarse_rgb", pa.binary()),
        pa.field("coarse_normal", pa.binary()),
        pa.field("tsd_real", pa.binary()),
        pa.field("tsd_coarse", pa.binary()),
        pa.field("expression", pa.list_(pa.float32(), EXPRESSION_DIM)),
        pa.field("pose", pa.list_(pa.float32(), POSE_DIM)),
        pa.field("emotion", pa.string()),
        pa.field("emotion_id", pa.int8()),
        pa.field("emotion_similarity", pa.float32()),
    ]
    if with_latents:
        fields += [pa.field(c, pa.binary()) for c in LATENT_COLUMNS]
    return pa.schema(fields, metadata={b"consistent_avatar.schema_version": str(SCHEMA_VERSION).encode()})


def emotion_table_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("label", pa.string()),
            pa.field("emotion_id", pa.int8()),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shards:
    """A shard directory resolved once: ``location`` as given (a local path made absolute, or the
    URI), the pyarrow ``filesystem`` it lives on and its ``root`` path there. Pickles (pyarrow
    filesystems pickle by their options; credentials are resolved where the object is used), so Ray
    tasks receive it as is and read with ``filesystem=`` without resolving the URI again."""

    location: str
    filesystem: Any  # pyarrow.fs.FileSystem
    root: str

    def path(self, *parts: str) -> str:
        """A path under the root, on :attr:`filesystem`."""
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def local(self) -> bool:
        from pyarrow import fs as pafs

        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.location


def open_shards(shards: str | os.PathLike[str] | Shards) -> Shards:
    """Resolve a shard location (a local path or a pyarrow filesystem URI) and check that a directory
    is there. A URI whose filesystem cannot be created or reached (unknown scheme, missing
    credentials) or a missing directory raises :class:`ConsistentAvatarError` naming it and the fix."""
    if isinstance(shards, Shards):
        return shards
    from pyarrow import fs as pafs

    location = os.fspath(shards)
    fs, root = resolve_filesystem(location, what="shards")
    if not is_uri(location):
        location = root
    try:
        info = fs.get_file_info(root)
    except (pa.ArrowException, OSError) as exc:
        raise ConsistentAvatarError(
            f"cannot read the shards at {location!r}: {first_line(exc)} (check the URI and that the "
            "credentials for its filesystem are in the environment, e.g. AWS_* for s3://, "
            "GOOGLE_APPLICATION_CREDENTIALS for gs://)"
        ) from exc
    if info.type != pafs.FileType.Directory:
        what = "nothing is there" if info.type == pafs.FileType.NotFound else "it is a file"
        raise ConsistentAvatarError(
            f"{location} holds no {MANIFEST_FILE}: it is not a shard directory ({what}; give the folder or "
            "URI that `cavatar prepare` wrote, or create one with `cavatar prepare`)"
        )
    return Shards(location, fs, root)


def _read_bytes(store: Shards, *parts: str) -> bytes | None:
    """A file under the shard root, or None when it is not there."""
    from pyarrow import fs as pafs

    path = store.path(*parts)
    if store.filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with store.filesystem.open_input_stream(path) as f:
        return f.read()


def read_shard_json(shards: str | os.PathLike[str] | Shards, *parts: str) -> Any:
    """A JSON file under the shard root (e.g. ``actors/<actor>/_actor.json``), or None when absent."""
    data = _read_bytes(open_shards(shards), *parts)
    return None if data is None else json.loads(data)


def load_manifest(shards: str | os.PathLike[str] | Shards) -> dict[str, Any]:
    """The dataset manifest, checked for a schema version this code can read."""
    store = open_shards(shards)
    data = _read_bytes(store, MANIFEST_FILE)
    if data is None:
        raise ConsistentAvatarError(
            f"{store} holds no {MANIFEST_FILE}: it is not a shard directory (create one with `cavatar prepare`)"
        )
    manifest = json.loads(data)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConsistentAvatarError(
            f"{store.path(MANIFEST_FILE)} has shard schema version {version}, this code reads version {SCHEMA_VERSION}: "
            "re-run `cavatar prepare --force` on the sources"
        )
    return manifest


def actor_parts(shards: str | os.PathLike[str] | Shards, actor: str) -> tuple[Shards, list[str]]:
    """(the resolved shards, the parquet files of one prepared actor as paths on its filesystem);
    unknown actors get an error listing the known ones."""
    from pyarrow import fs as pafs

    store = open_shards(shards)
    manifest = load_manifest(store)
    if actor not in manifest["actors"]:
        known = ", ".join(sorted(manifest["actors"])) or "none"
        raise ConsistentAvatarError(f"actor {actor!r} is not in {store} (prepared actors: {known})")
    selector = pafs.FileSelector(store.path(ACTORS_DIR, actor), allow_not_found=True)
    files = sorted(
        i.path for i in store.filesystem.get_file_info(selector)
        if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, "part-*.parquet")
    )
    if not files:
        raise ConsistentAvatarError(f"actor {actor!r} in {store} has no parquet files: re-run prepare")
    return store, files


def actor_files(shards: str | os.PathLike[str] | Shards, actor: str) -> list[Path] | list[str]:
    """The parquet files of one prepared actor: paths for local shards, URIs (``<shards>/actors/
    <actor>/part-….parquet``) for shards given as a URI."""
    store, files = actor_parts(shards, actor)
    return part_locations(store, actor, files)


def part_locations(store: Shards, actor: str, files: list[str]) -> list[Path] | list[str]:
    """``actor_parts``' files as :func:`actor_files` names them (for a caller that has listed them)."""
    if store.local:
        return [Path(f) for f in files]
    base, _, query = store.location.partition("?")
    suffix = f"?{query}" if query else ""
    return [f"{base.rstrip('/')}/{ACTORS_DIR}/{actor}/{f.rsplit('/', 1)[-1]}{suffix}" for f in files]


def read_actor_table(
    shards: str | os.PathLike[str] | Shards, actor: str, split: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """One actor's frames as a pyarrow table, sorted by frame, optionally one split only.

    ``columns`` selects what is returned; ``frame`` and ``split`` are read as well when the sort or
    the filter needs them, and dropped again if they were not asked for.
    """
    read = None
    if columns is not None:
        read = list(dict.fromkeys([*columns, "frame", *(["split"] if split is not None else [])]))
    # The split filter is pushed into the parquet read, so other splits' image bytes are never loaded.
    filters = [("split", "=", split)] if split is not None else None
    store, files = actor_parts(shards, actor)
    table = pq.read_table(files, columns=read, filters=filters, filesystem=store.filesystem)
    table = table.sort_by("frame")
    if columns is not None:
        table = table.select(list(columns))
    return table


def read_emotion_table(shards: str | os.PathLike[str] | Shards) -> tuple[list[str], np.ndarray]:
    """Labels (in id order) and their text embeddings (L, D) float32."""
    store = open_shards(shards)
    table = pq.read_table(store.path(EMOTION_TABLE_FILE), filesystem=store.filesystem).sort_by("emotion_id")
    labels = table["label"].to_pylist()
    emb = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    return labels, emb


def decode_images(column: list[bytes] | pa.ChunkedArray | pa.Array, channels: int = 3) -> np.ndarray:
    """PNG column → (N,H,W,3) or (N,H,W) uint8."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    return np.stack([decode_png(v, channels) for v in values])


def decode_latents(column: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """Raw float16 latent bytes → (N, *shape) float16."""
    return np.stack([np.frombuffer(b, dtype=np.float16).reshape(shape) for b in column])
