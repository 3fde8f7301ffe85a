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
float16 bytes whose shape is in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConsistentAvatarError
from ..io import decode_png, read_json
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


def load_manifest(shards: str | Path) -> dict[str, Any]:
    """The dataset manifest, checked for a schema version this code can read."""
    path = Path(shards) / MANIFEST_FILE
    if not path.is_file():
        raise ConsistentAvatarError(
            f"{shards} holds no {MANIFEST_FILE}: it is not a shard directory (create one with `cavatar prepare`)"
        )
    manifest = read_json(path)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConsistentAvatarError(
            f"{path} has shard schema version {version}, this code reads version {SCHEMA_VERSION}: "
            "re-run `cavatar prepare --force` on the sources"
        )
    return manifest


def actor_files(shards: str | Path, actor: str) -> list[Path]:
    """The parquet files of one prepared actor; unknown actors get an error listing the known ones."""
    manifest = load_manifest(shards)
    if actor not in manifest["actors"]:
        known = ", ".join(sorted(manifest["actors"])) or "none"
        raise ConsistentAvatarError(f"actor {actor!r} is not in {shards} (prepared actors: {known})")
    files = sorted((Path(shards) / ACTORS_DIR / actor).glob("part-*.parquet"))
    if not files:
        raise ConsistentAvatarError(f"actor {actor!r} in {shards} has no parquet files: re-run prepare")
    return files


def read_actor_table(shards: str | Path, actor: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """One actor's frames as a pyarrow table, sorted by frame, optionally one split only.

    ``columns`` selects what is returned; ``frame`` and ``split`` are read as well when the sort or
    the filter needs them, and dropped again if they were not asked for.
    """
    read = None
    if columns is not None:
        read = list(dict.fromkeys([*columns, "frame", *(["split"] if split is not None else [])]))
    # The split filter is pushed into the parquet read, so other splits' image bytes are never loaded.
    filters = [("split", "=", split)] if split is not None else None
    table = pq.read_table(actor_files(shards, actor), columns=read, filters=filters)
    table = table.sort_by("frame")
    if columns is not None:
        table = table.select(list(columns))
    return table


def read_emotion_table(shards: str | Path) -> tuple[list[str], np.ndarray]:
    """Labels (in id order) and their text embeddings (L, D) float32."""
    table = pq.read_table(Path(shards) / EMOTION_TABLE_FILE).sort_by("emotion_id")
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
