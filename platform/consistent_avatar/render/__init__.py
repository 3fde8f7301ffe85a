"""`cavatar render`: bulk offline rendering of prepared shards with actor bundles (Ray Data batch inference).

Library entry point: :func:`render` (``render(shards, bundles, out, config) -> RenderReport``); the
job is described in :mod:`.job`, settings in :mod:`.config`, file handling in :mod:`.outputs`.

Output layout (`cavatar evaluate` reads exactly this; also in ``docs/render.md``)::

    OUT/render_manifest.json                    rewritten atomically at the end of every run:
        {"schema_version": 1, "shards": str, "bundles": str, "split": "test" | "train" | "all",
         "rows": [row, ...],
         "actors": {actor: {"frames": n, "resolution": r,
                            "rendered": {row: frames present}, "failed": {row: why}}},
         "settings": {row: {"sampler": s, "steps": n, "seed": seed, "seed_rule": "seed + frame",
                            "baseline": b, "without_normal": b, "without_emotion": b, "without_lcm": b,
                            "dtype": d, "refine": r, "refiner": path,
                            "per_actor": {actor: {"sampler", "steps", "bundle",
                                                  "coarse_latent": "shards" (only when used)}}}},
         "command": str, "machine": {...}, "created_at": ISO 8601}
        ("frames": the frames of the split, which a complete row holds; "sampler"/"steps" are None
        when the actors' bundles resolve them differently — "per_actor" then says which;
        "coarse_latent": stage 2 took the shards' latent_tsd_coarse instead of a VAE encode, see .latents.)
    OUT/<row>/<actor>/frames/<frame:06d>.png    the rendered frame, RGB uint8, at the shards' resolution
    OUT/<row>/<actor>/outputs.parquet           one row per rendered frame, sorted by frame:
        actor (string), frame (int32), row (string), split (string),
        png (string: the PNG's path relative to OUT), seconds (float64: the batch's pipeline time /
        batch size), batch_size (int32), timings (string: JSON of the pipeline's per-phase seconds for
        that batch: tsd, stage2, stage3, refiner, total), sampler (string), steps (int32),
        seed (int64: the frame's seed, seed + frame)
    OUT/<row>/<actor>/<actor>.mp4               coarse | ours | real side by side (H × 3W), mp4v,
                                                --fps (25); written once the row has every frame

``row`` is one of ``full``, ``baseline``, ``without_normal``, ``without_emotion``, ``without_lcm``
(:data:`ROWS`). Real and coarse frames stay in the shards (``manifest["shards"]``). After an
interrupted run, ``OUT/<row>/<actor>/`` may also hold ``outputs-<frame>-<id>.parquet`` parts not yet
merged into ``outputs.parquet``: read with :func:`read_outputs` (``outputs*.parquet``, newest row per
frame, only frames whose PNG exists), or simply re-run the render, which merges them. Hidden files
(``.*``) are temporary and never complete.
"""

from __future__ import annotations

from .config import ROWS, RenderConfig
from .job import RenderReport, render
from .outputs import MANIFEST_FILE, read_outputs, read_render_manifest

__all__ = ["MANIFEST_FILE", "ROWS", "RenderConfig", "RenderReport", "read_outputs", "read_render_manifest", "render"]
