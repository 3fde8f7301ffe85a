"""Stage 2's coarse-TSD latent from the shards instead of a VAE encode, when it provably is the same.

Shards prepared with ``--vae`` hold ``latent_tsd_coarse``, the VAE latent of each frame's coarse TSD.
Handing it to the pipeline (``coarse_latent=``) skips stage 2's VAE encode (sd15 at batch 24 on an
H200: 26.7 → 29.4 frames/s). It is only the latent the bundle's own VAE would compute when the shards
recorded the identity of the VAE that made it (:mod:`consistent_avatar.vae_identity`) and it is the
bundle's, the TSD was computed with the bundle's TSD settings, and the shapes agree; otherwise the
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

COLUMN = "latent_tsd_coarse"
#: the row-settings key (and its value) of frames rendered from the shards' latents; absent otherwise,
#: so the settings of encoded frames are what they were before this option existed
SETTING, FROM_SHARDS = "coarse_latent", "shards"
#: the load stage's payload of a unit that does not use them (one dtype and rank for every unit)
NO_LATENT = np.zeros((0, 1, 1, 1), dtype=np.float16)


@dataclass(frozen=True)
class BundleVAE:
    """What the driver knows of a bundle's VAE without loading any weights."""

    identity: dict[str, str] | None
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
    if not recorded:
        return ("the shards record no identity of the VAE of their latents (prepared by an older version, or "
                "--vae without safetensors weights): `cavatar prepare --force --vae DIR` records it")
    if bundle.identity is None:
        return "the bundle records no VAE weights file (vae/diffusion_pytorch_model.safetensors)"
    if recorded.get("weights_sha256") != bundle.identity["weights_sha256"]:
        theirs, ours = str(recorded.get("weights_sha256"))[:12], bundle.identity["weights_sha256"][:12]
        return f"the shards' latents come from another VAE (weights sha256 {theirs}, the bundle's {ours})"
    if recorded.get("config") != bundle.identity["config"]:
        return "the shards' VAE has the bundle's weights but another config (scaling factor, architecture)"
    if tuple(shape) != bundle.latent_shape:
        return f"the shards' latents are {tuple(shape)}, the bundle's preset works on {bundle.latent_shape}"
    if shards_tsd is None or dict(shards_tsd) != bundle.tsd:
        return "the shards' coarse TSD was computed with other TSD settings than the bundle's"
    if bundle.shift_factor:
        return "the bundle's VAE has a shift_factor, which the shards' latents do not apply"
    return ""


def column_note(shards: Any, path: str) -> str:
    """"" when the shard file ``path`` (on ``shards.filesystem``) holds :data:`COLUMN`, else why not
    (a footer read: the manifest announces latents, this checks the files agree)."""
    try:
        names = pq.read_schema(path, filesystem=shards.filesystem).names
    except (OSError, pa.ArrowException) as exc:
        return f"the shard file {path} is unreadable ({exc})"
    return "" if COLUMN in names else f"the shard files lack the {COLUMN} column their manifest announces"


def decode(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Raw float16 latent bytes, one value per frame → (N, *shape) float16, in one view of the column's
    data buffer (no per-frame copy); every value must hold exactly ``shape``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n, size = len(arr), int(np.prod(shape)) * 2
    if arr.null_count:
        raise ConsistentAvatarError(f"{COLUMN} has missing values: re-run `cavatar prepare --force`")
    if n == 0:
        return np.zeros((0, *shape), dtype=np.float16)
    wide = pa.types.is_large_binary(arr.type)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = offsets[arr.offset : arr.offset + n + 1]
    if not np.all(np.diff(offsets) == size):
        raise ConsistentAvatarError(
            f"{COLUMN} values are not {shape} float16 latents (the shards changed?): "
            "re-run `cavatar prepare --force`"
        )
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
