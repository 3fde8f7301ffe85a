"""Stage 2's coarse-TSD latent from the shards instead of a VAE encode, when it provably is the same.

Shards prepared with ``--vae`` hold ``latent_tsd_coarse``, the VAE latent of each frame's coarse TSD.
Handing it to the pipeline (``coarse_latent=``) skips stage 2's VAE encode (sd15 at batch 24 on an
H200: 26.7 → 29.4 frames/s). It is only the latent the bundle's own VAE would compute when the
shards recorded the identity of the VAE that made it (by content:
:mod:`consistent_avatar.vae_identity`), the bundle's ``bundle.json`` records its VAE's, and the two
are equal; the TSD was computed with the bundle's TSD settings, and the shapes agree; otherwise the
render encodes as before. Frames still differ from encoded ones by the latents' fp16 storage (and
the TSD's 8-bit PNG) rounding, so the choice is part of the recorded row settings.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConsistentAvatarError
from ..vae_identity import identity_problem

#: what fixes shards whose latents (or their record) cannot be used
REPREPARE = "re-run `cavatar prepare --force --vae DIR`"

COLUMN = "latent_tsd_coarse"
#: the row-settings key (and its value) of frames rendered from the shards' latents; absent otherwise,
#: so the settings of encoded frames are what they were before this option existed
SETTING, FROM_SHARDS = "coarse_latent", "shards"
#: the load stage's payload of a unit that does not use them (one dtype and rank for every unit)
NO_LATENT = np.zeros((0, 1, 1, 1), dtype=np.float16)


@dataclass(frozen=True)
class BundleVAE:
    """What the driver knows of a bundle's VAE without loading any weights."""

    identity: dict[str, str] | None  # bundle.json's vae_identity (None: a bundle written before it)
    latent_shape: tuple[int, int, int]
    tsd: dict[str, Any]
    shift_factor: float | None


def why_not(
    *, enabled: bool, rows: Sequence[Mapping[str, bool]], entry: Mapping[str, Any],
    shards_tsd: Mapping[str, Any] | None, bundle: BundleVAE,
) -> str:
    """Why this actor's shard latents cannot stand for its bundle's encode; "" when they can.
    ``entry``: the actor's entry of the shard manifest; ``rows``: each row's switches."""
    if not enabled:
        return "shard latents are turned off (--no-shard-latents)"
    if all(r.get("baseline") for r in rows):
        return "no row runs stage 2 (baseline only)"
    shape = entry.get("latent_shape")
    if not shape:
        return "the shards hold no VAE latents (prepared without --vae)"
    recorded = entry.get("vae_identity")
    problem = identity_problem(recorded)
    if problem == "missing":
        return ("the shards record no identity of the VAE of their latents (prepared by an older version): "
                + REPREPARE)
    if problem:
        what = "a file hash" if problem == "file-hash" else "another format"
        return (f"the shards predate the VAE content identity (they record {what}, which a bundle's "
                f"re-saved VAE does not match): {REPREPARE}")
    if identity_problem(bundle.identity):
        return ("the bundle predates the VAE content identity (its bundle.json records no vae_identity): re-export "
                "it (remove it and re-run `cavatar train`, which exports again from its finished stages)")
    assert bundle.identity is not None
    if recorded["tensors_sha256"] != bundle.identity["tensors_sha256"]:
        theirs, ours = recorded["tensors_sha256"][:12], bundle.identity["tensors_sha256"][:12]
        return f"the shards' latents come from another VAE (weights sha256 {theirs}, the bundle's {ours})"
    if recorded["config"] != bundle.identity["config"]:
        return "the shards' VAE has the bundle's weights but another config (scaling factor, architecture)"
    if tuple(shape) != bundle.latent_shape:
        return f"the shards' latents are {tuple(shape)}, the bundle's preset works on {bundle.latent_shape}"
    if shards_tsd is None or dict(shards_tsd) != bundle.tsd:
        return "the shards' coarse TSD was computed with other TSD settings than the bundle's"
    if bundle.shift_factor:
        return "the bundle's VAE has a shift_factor, which the shards' latents do not apply"
    return ""


def lacking_column(shards: Any, paths: Sequence[str]) -> dict[str, str]:
    """The shard files among ``paths`` (on ``shards.filesystem``) without a binary :data:`COLUMN`,
    each with what is wrong; footers only."""
    lacking: dict[str, str] = {}
    for path in paths:
        try:
            schema = pq.read_schema(path, filesystem=shards.filesystem)
        except (OSError, pa.ArrowException) as exc:
            lacking[path] = f"unreadable ({exc})"
            continue
        i = schema.get_field_index(COLUMN)
        if i < 0:
            lacking[path] = f"no {COLUMN} column"
        elif not (pa.types.is_binary(schema.field(i).type) or pa.types.is_large_binary(schema.field(i).type)):
            lacking[path] = f"{COLUMN} is {schema.field(i).type}, not binary"
    return lacking


def column_note(shards: Any, paths: Sequence[str]) -> str:
    """"" when every shard file of an actor (``paths``) holds :data:`COLUMN`, else why not: the
    manifest announces latents, this checks (by their footers) that the files agree."""
    lacking = lacking_column(shards, sorted(set(paths)))
    if not lacking:
        return ""
    path, what = next(iter(lacking.items()))
    more = f" (and {len(lacking) - 1} more of its {len(set(paths))} files)" if len(lacking) > 1 else ""
    return f"the shard file {path}: {what}{more}, though the manifest announces latents: {REPREPARE}"


def frame_span(frames: Sequence[int]) -> str:
    """``frame 7``, ``frames 20–23`` (a run) or ``frames 1, 5, 9 …`` (at most 5 named)."""
    fs = sorted(int(f) for f in frames)
    if len(fs) == 1:
        return f"frame {fs[0]}"
    if fs and fs[-1] - fs[0] == len(fs) - 1:
        return f"frames {fs[0]}–{fs[-1]}"
    return "frames " + ", ".join(map(str, fs[:5])) + (" …" if len(fs) > 5 else "")


def decode(
    column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], *, actor: str = "?",
    frames: Sequence[int] | None = None,
) -> np.ndarray:
    """Raw float16 latent bytes, one value per frame → (N, *shape) float16, in one view of the column's
    data buffer (no per-frame copy); every value must hold exactly ``shape``. ``actor`` and ``frames``
    (the frame of each value) name what is wrong in an error."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, size = len(arr), int(np.prod(shape)) * 2
    at = list(frames) if frames is not None and len(frames) == n else list(range(n))
    where = "frames" if frames is not None and len(frames) == n else "rows"

    def error(bad: np.ndarray, what: str) -> ConsistentAvatarError:
        span = frame_span([at[i] for i in bad]) if where == "frames" else f"rows {sorted(bad.tolist())[:5]}"
        return ConsistentAvatarError(
            f"actor {actor!r}, {span}: the shards' {COLUMN} {what} (the shards changed since prepare?): "
            f"{REPREPARE}, or render with --no-shard-latents"
        )

    if arr.null_count:
        raise error(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)), "has missing values")
    if n == 0:
        return np.zeros((0, *shape), dtype=np.float16)
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise error(np.arange(n), f"is {arr.type}, not raw float16 bytes")
    wide = pa.types.is_large_binary(arr.type)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = offsets[arr.offset : arr.offset + n + 1]
    sizes = np.diff(offsets)
    if not np.all(sizes == size):
        bad = np.flatnonzero(sizes != size)
        raise error(bad, f"values are {int(sizes[bad[0]]) // 2} float16 values, not {shape} latents")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[int(offsets[0]) : int(offsets[0]) + n * size]
    return data.view(np.float16).reshape(n, *shape)


def summary(reasons: Mapping[str, str]) -> list[str]:
    """One line per outcome (actor → "" when shard latents are used, else why not), naming its actors."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for actor, reason in sorted(reasons.items()):
        by_reason[reason].append(actor)
    lines = []
    if "" in by_reason:
        used = ", ".join(by_reason.pop(""))
        lines.append(f"coarse TSD latents from the shards (no stage-2 VAE encode): {used}")
    for reason, actors in by_reason.items():
        lines.append(f"coarse TSD latents encoded by the bundle's VAE for {', '.join(actors)}: {reason}")
    return lines
