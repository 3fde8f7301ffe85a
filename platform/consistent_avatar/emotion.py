"""Emotion labels (paper eq. 7): each frame takes the label of the most cosine-similar expression
vector in a database of labelled expressions (MEAD clips, coded per frame by DECA in the paper).

Why a database lookup and not a classifier: it needs no training, it is exactly the paper's rule,
and any labelled set of expression codes (real MEAD, the synthetic MEAD of
:mod:`consistent_avatar.synthetic.emotions`) plugs in unchanged.

Database file (parquet, one row per labelled frame)::

    expression  fixed_size_list<float32>[100]   the FLAME/DECA expression code
    label       string                          one of layout.EMOTIONS
    source      string                          where the row came from (clip path)

Labelling is exact brute force: database and queries are L2-normalised once (cosine), then blocks of the
(queries × database) similarity matrix are formed with matrix products and reduced to a running
per-emotion maximum, so memory stays at one block whatever the sizes. ``scores`` is that (M, 8)
matrix of per-emotion best similarities; the label is its argmax (ties: the lower emotion id).
Zero vectors (norm <= :data:`ZERO_NORM_EPS`) have no direction, so cosine similarity is undefined:
database rows with zero norm are dropped with a warning; a zero query is FLAME's neutral face and
is labelled ``neutral`` with similarity 0.

A limit of the paper's rule, measured here: cosine similarity discards magnitude, and the neutral
face is the zero code, so a neutral frame's small residual (talking, blinks, tracker noise) points
in an arbitrary direction and matches any emotion. On the synthetic actors cosine labelling gets
the seven expressive emotions right ~99 % of the time but neutral only 30-50 % (overall 0.91-0.94);
temporal smoothing cannot fix whole mislabelled segments. ``EmotionLabeller(metric="euclidean")``
(nearest code by L2 distance) keeps neutral at ~97 % (overall 0.99); cosine stays the default
because it is eq. 7. Figures: ``benchmarks/bench_emotion_label.py``, results in benchmarks/results/.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .data.layout import EMOTIONS, EXPRESSION_DIM
from .errors import ConsistentAvatarError
from .io import atomic_write_table

log = logging.getLogger(__name__)

NEUTRAL = EMOTIONS.index("neutral")
ZERO_NORM_EPS = 1e-6
METRICS = ("cosine", "euclidean")
MEAD_CLIP_GLOB = "*/video/*/*/level_*/*.mp4"  # <speaker>/video/<view>/<emotion>/level_<k>/<clip>.mp4


def database_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("expression", pa.list_(pa.float32(), EXPRESSION_DIM), nullable=False),
            pa.field("label", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ]
    )


def _label_ids(names: Sequence[str], where: str) -> np.ndarray:
    lookup = {e: i for i, e in enumerate(EMOTIONS)}
    ids = np.fromiter((lookup.get(n, -1) for n in names), dtype=np.int64, count=len(names))
    if (ids < 0).any():
        bad = sorted({str(n) for n, i in zip(names, ids) if i < 0})
        raise ConsistentAvatarError(
            f"{where}: unknown emotion label(s) {bad[:5]}; use one of {', '.join(EMOTIONS)}"
        )
    return ids


# ------------------------------------------------------------------------------------------------
# The database
# ------------------------------------------------------------------------------------------------


@dataclass
class EmotionDatabase:
    """Labelled expression vectors: ``expressions`` (N, 100) float32, ``labels`` (N,) int64 index
    into :data:`EMOTIONS`, ``sources`` (N,) strings naming where each row came from."""

    expressions: np.ndarray
    labels: np.ndarray
    sources: list[str] = field(repr=False)

    def __post_init__(self) -> None:
        e = np.asarray(self.expressions)
        if e.ndim != 2 or e.shape[1] != EXPRESSION_DIM:
            raise ConsistentAvatarError(
                f"emotion database: expressions must be (N, {EXPRESSION_DIM}), got {e.shape}"
            )
        if len(e) == 0:
            raise ConsistentAvatarError(
                "emotion database is empty: it needs at least one labelled expression"
            )
        self.expressions = np.ascontiguousarray(e, dtype=np.float32)
        bad = ~np.isfinite(self.expressions).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            src = self.sources[i] if i < len(self.sources) else "?"
            raise ConsistentAvatarError(
                f"emotion database: {int(bad.sum())} expression rows hold NaN/inf (first: row {i}, source {src!r})"
            )
        labels = np.asarray(self.labels)
        if labels.shape != (len(e),) or not np.issubdtype(labels.dtype, np.integer):
            raise ConsistentAvatarError(
                f"emotion database: labels must be {len(e)} integer ids, got shape {labels.shape} dtype {labels.dtype}"
            )
        if labels.min() < 0 or labels.max() >= len(EMOTIONS):
            raise ConsistentAvatarError(
                f"emotion database: label ids must be in 0..{len(EMOTIONS) - 1} (index into EMOTIONS)"
            )
        self.labels = labels.astype(np.int64)
        self.sources = list(self.sources)
        if len(self.sources) != len(e):
            raise ConsistentAvatarError(
                f"emotion database: {len(self.sources)} sources for {len(e)} expressions"
            )

    @classmethod
    def from_names(
        cls, expressions: np.ndarray, labels: Sequence[str], sources: Sequence[str]
    ) -> EmotionDatabase:
        """Build from label *names* (validated against :data:`EMOTIONS`)."""
        return cls(np.asarray(expressions), _label_ids(list(labels), "emotion database"), list(sources))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def label_names(self) -> list[str]:
        return [EMOTIONS[i] for i in self.labels]

    def counts(self) -> dict[str, int]:
        """Rows per emotion (every emotion listed, zeros included)."""
        c = np.bincount(self.labels, minlength=len(EMOTIONS))
        return {e: int(n) for e, n in zip(EMOTIONS, c)}

    def to_table(self) -> pa.Table:
        flat = pa.array(self.expressions.reshape(-1), type=pa.float32())
        expr = pa.FixedSizeListArray.from_arrays(flat, EXPRESSION_DIM)
        label = pa.array(list(EMOTIONS), pa.string()).take(pa.array(self.labels))
        return pa.Table.from_arrays(
            [expr, label, pa.array(self.sources, pa.string())], schema=database_schema()
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the parquet file atomically (temporary name in the same folder, then rename)."""
        return atomic_write_table(path, self.to_table())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EmotionDatabase:
        """Read and validate a database parquet file; every problem names the file and what to fix."""
        path = Path(path)
        if not path.is_file():
            raise ConsistentAvatarError(
                f"emotion database {path} does not exist (build one with `cavatar emotion-db`)"
            )
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ConsistentAvatarError(
                f"emotion database {path} is not a readable parquet file: {exc}"
            ) from exc
        missing = [c for c in ("expression", "label", "source") if c not in table.column_names]
        if missing:
            raise ConsistentAvatarError(
                f"emotion database {path} lacks column(s) {missing}; expected expression "
                f"(list<float32>[{EXPRESSION_DIM}]), label (string), source (string), got {table.column_names}"
            )
        if len(table) == 0:
            raise ConsistentAvatarError(f"emotion database {path} has no rows")
        expressions = _expression_matrix(table.column("expression"), f"emotion database {path}")
        label_col = table.column("label")
        if not pa.types.is_string(label_col.type) and not pa.types.is_large_string(label_col.type):
            raise ConsistentAvatarError(
                f"emotion database {path}: column label must be strings, got {label_col.type}"
            )
        if label_col.null_count:
            raise ConsistentAvatarError(f"emotion database {path}: {label_col.null_count} rows have no label")
        ids = pc.index_in(label_col, value_set=pa.array(list(EMOTIONS)))
        if ids.null_count:
            bad = sorted(set(pc.filter(label_col, pc.is_null(ids)).unique().to_pylist()))
            raise ConsistentAvatarError(
                f"emotion database {path}: unknown emotion label(s) {bad[:5]}; use one of {', '.join(EMOTIONS)}"
            )
        source_col = table.column("source")
        if source_col.null_count:
            source_col = pc.fill_null(source_col, "")
        try:
            return cls(expressions, ids.to_numpy().astype(np.int64), source_col.cast(pa.string()).to_pylist())
        except ConsistentAvatarError as exc:
            raise ConsistentAvatarError(f"{path}: {exc}") from None


def _expression_matrix(col: pa.ChunkedArray, where: str) -> np.ndarray:
    """(N, 100) float32 from a list-typed column; checks nulls and per-row lengths."""
    t = col.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)) or not (
        pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
    ):
        raise ConsistentAvatarError(
            f"{where}: column expression must be a list of {EXPRESSION_DIM} floats, got {t}"
        )
    if col.null_count:
        raise ConsistentAvatarError(f"{where}: {col.null_count} rows have a null expression")
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if (lengths != EXPRESSION_DIM).any():
        i = int(np.flatnonzero(lengths != EXPRESSION_DIM)[0])
        raise ConsistentAvatarError(
            f"{where}: expression vectors must have {EXPRESSION_DIM} values, row {i} has {int(lengths[i])}"
        )
    values = pc.list_flatten(arr)
    if values.null_count:
        raise ConsistentAvatarError(f"{where}: expression vectors contain null values")
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, EXPRESSION_DIM)


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def build_synthetic_database(
    num_speakers: int = 8, clips_per_emotion: int = 4, frames_per_clip: int = 40, seed: int = 1234
) -> EmotionDatabase:
    """The synthetic MEAD: talking speakers (none of them an actor) in all eight emotions."""
    from .synthetic.emotions import sample_mead_expressions

    expr, labels, sources = sample_mead_expressions(num_speakers, clips_per_emotion, frames_per_clip, seed)
    return EmotionDatabase.from_names(expr, labels, sources)


@runtime_checkable
class ExpressionEstimator(Protocol):
    """Per-frame expression codes from video frames: DECA or any face tracker plugs in here.

    ``frames`` is uint8 (T, H, W, 3) RGB; returns (T, 100) float codes, one per frame.
    """

    def __call__(self, frames: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class MeadClip:
    path: Path
    rel: str  # path relative to the MEAD root, POSIX separators: the key into a codes file
    speaker: str
    view: str
    emotion: int
    level: int


def find_mead_clips(mead_root: str | os.PathLike[str], views: Iterable[str] | None = None) -> list[MeadClip]:
    """Every clip of a MEAD-layout tree, ``<speaker>/video/<view>/<emotion>/level_<k>/<clip>.mp4``,
    sorted by relative path; ``views`` keeps only those camera views (default: all)."""
    root = Path(mead_root)
    if not root.is_dir():
        raise ConsistentAvatarError(f"MEAD root {root} is not a directory")
    keep_views = set(views) if views is not None else None
    clips = []
    for p in sorted(root.glob(MEAD_CLIP_GLOB), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        speaker, _, view, emotion, level, _ = rel.parts
        if keep_views is not None and view not in keep_views:
            continue
        m = re.fullmatch(r"level_(\d+)", level)
        if m is None:
            raise ConsistentAvatarError(
                f"MEAD clip {rel.as_posix()}: intensity folder must be level_<k>, got {level!r}"
            )
        if emotion.lower() not in EMOTIONS:
            raise ConsistentAvatarError(
                f"MEAD clip {rel.as_posix()}: unknown emotion folder {emotion!r}; MEAD's are {', '.join(EMOTIONS)}"
            )
        clips.append(
            MeadClip(p, rel.as_posix(), speaker, view, EMOTIONS.index(emotion.lower()), int(m.group(1)))
        )
    if not clips:
        which = f" for views {sorted(keep_views)}" if keep_views is not None else ""
        raise ConsistentAvatarError(
            f"no MEAD clips{which} under {root}: expected <speaker>/video/<view>/<emotion>/level_<k>/<clip>.mp4"
        )
    return clips


def load_expression_codes(codes: str | os.PathLike[str] | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Precomputed per-frame codes, keyed by clip path relative to the MEAD root.

    Accepted: a mapping; an ``.npz`` whose array names are the clip paths, each (T, 100); or a
    ``.parquet`` with one row per frame, columns ``clip`` (string), ``expression`` (list of 100
    floats) and optionally ``frame`` (int, the order within the clip; file order otherwise).
    """
    if isinstance(codes, Mapping):
        return {str(k): np.asarray(v) for k, v in codes.items()}
    path = Path(codes)
    if not path.is_file():
        raise ConsistentAvatarError(f"expression codes file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise ConsistentAvatarError(f"expression codes file {path} is not a readable npz: {exc}") from exc
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ConsistentAvatarError(
                f"expression codes file {path} is not readable parquet: {exc}"
            ) from exc
        for c in ("clip", "expression"):
            if c not in table.column_names:
                raise ConsistentAvatarError(
                    f"expression codes file {path} lacks column {c!r}; expected clip (string), "
                    f"expression (list of {EXPRESSION_DIM} floats), optional frame (int)"
                )
        expr = _expression_matrix(table.column("expression"), f"expression codes file {path}")
        clip = np.asarray(table.column("clip").to_pylist(), dtype=object)
        order = np.argsort(clip, kind="stable")
        if "frame" in table.column_names:
            frame = table.column("frame").to_numpy()
            order = np.lexsort((frame, clip))
        clip, expr = clip[order], expr[order]
        bounds = np.flatnonzero(clip[1:] != clip[:-1]) + 1
        starts, stops = np.r_[0, bounds], np.r_[bounds, len(clip)]
        return {str(clip[a]): expr[a:b] for a, b in zip(starts, stops)}
    raise ConsistentAvatarError(
        f"expression codes file {path}: use a .parquet or .npz file, got {suffix or 'no suffix'!r}"
    )


def _check_codes(codes: np.ndarray, rel: str, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != EXPRESSION_DIM or len(codes) == 0:
        raise ConsistentAvatarError(
            f"MEAD clip {rel}: {what} must be (T, {EXPRESSION_DIM}) with T >= 1, got {codes.shape}"
        )
    if not np.issubdtype(codes.dtype, np.number):
        raise ConsistentAvatarError(f"MEAD clip {rel}: {what} must be numbers, got {codes.dtype}")
    codes = codes.astype(np.float32)
    if not np.isfinite(codes).all():
        raise ConsistentAvatarError(f"MEAD clip {rel}: {what} contain NaN/inf")
    return codes


def _open_video(clip: MeadClip) -> Any:
    from decord import VideoReader, cpu

    try:
        return VideoReader(str(clip.path), ctx=cpu(0))
    except Exception as exc:  # decord raises its own DECORDError / RuntimeError
        raise ConsistentAvatarError(f"MEAD clip {clip.rel}: cannot decode {clip.path}: {exc}") from exc


def _estimate_codes(clip: MeadClip, estimator: ExpressionEstimator, frames_per_call: int) -> np.ndarray:
    vr = _open_video(clip)
    n = len(vr)
    if n == 0:
        raise ConsistentAvatarError(f"MEAD clip {clip.rel}: the video has no frames")
    parts = []
    for start in range(0, n, frames_per_call):
        idx = list(range(start, min(n, start + frames_per_call)))
        try:
            frames = vr.get_batch(idx).asnumpy()
        except Exception as exc:
            raise ConsistentAvatarError(
                f"MEAD clip {clip.rel}: decoding frames {idx[0]}..{idx[-1]} failed: {exc}"
            ) from exc
        try:
            out = estimator(frames)
        except ConsistentAvatarError:
            raise
        except Exception as exc:
            raise ConsistentAvatarError(
                f"MEAD clip {clip.rel}: the expression estimator failed: {exc}"
            ) from exc
        out = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out)
        if out.shape != (len(idx), EXPRESSION_DIM):
            raise ConsistentAvatarError(
                f"MEAD clip {clip.rel}: the estimator returned {out.shape} for {len(idx)} frames; "
                f"it must return ({len(idx)}, {EXPRESSION_DIM})"
            )
        parts.append(out)
    return _check_codes(np.concatenate(parts), clip.rel, "estimated codes")


def build_mead_database(
    mead_root: str | os.PathLike[str],
    codes: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    estimator: ExpressionEstimator | None = None,
    *,
    views: Iterable[str] | None = None,
    check_frame_counts: bool = True,
    frames_per_call: int = 64,
    progress: bool = True,
) -> EmotionDatabase:
    """The paper's database: every frame of every MEAD clip, labelled with the clip's emotion folder.

    Per-frame codes come from ``codes`` (precomputed, see :func:`load_expression_codes`; with
    ``check_frame_counts`` each clip's code count must equal its decoded frame count) or from
    ``estimator`` applied to the decoded frames (``frames_per_call`` at a time). ``source`` of a row
    is the clip path relative to ``mead_root``.
    """
    if (codes is None) == (estimator is None):
        raise ConsistentAvatarError(
            "build_mead_database: give exactly one of codes= (precomputed per-frame expression codes, "
            "parquet or npz) or estimator= (an ExpressionEstimator run on the decoded frames)"
        )
    if frames_per_call < 1:
        raise ConsistentAvatarError(f"frames_per_call must be >= 1, got {frames_per_call}")
    clips = find_mead_clips(mead_root, views)
    table = load_expression_codes(codes) if codes is not None else None
    if table is not None:
        unused = set(table) - {c.rel for c in clips}
        if unused:
            log.warning(
                "%d clip(s) in the codes file are not under %s (e.g. %s); ignored",
                len(unused),
                mead_root,
                sorted(unused)[0],
            )
    expressions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    sources: list[str] = []
    for clip in tqdm(clips, desc="MEAD clips", unit="clip", disable=not progress):
        if table is not None:
            if clip.rel not in table:
                where = "the codes mapping" if isinstance(codes, Mapping) else str(codes)
                raise ConsistentAvatarError(f"MEAD clip {clip.rel}: no expression codes for it in {where}")
            e = _check_codes(table[clip.rel], clip.rel, "expression codes")
            if check_frame_counts:
                n = len(_open_video(clip))
                if n != len(e):
                    raise ConsistentAvatarError(
                        f"MEAD clip {clip.rel}: {len(e)} expression codes for {n} video frames; "
                        "recompute its codes (or pass check_frame_counts=False)"
                    )
        else:
            assert estimator is not None
            e = _estimate_codes(clip, estimator, frames_per_call)
        expressions.append(e)
        labels.append(np.full(len(e), clip.emotion, np.int64))
        sources.extend([clip.rel] * len(e))
    db = EmotionDatabase(np.concatenate(expressions), np.concatenate(labels), sources)
    log.info("MEAD database: %d clips, %d frames, per emotion %s", len(clips), len(db), db.counts())
    return db


def build_emotion_db(
    out: str | os.PathLike[str],
    *,
    source: str = "synthetic",
    mead_root: str | os.PathLike[str] | None = None,
    codes: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None,
    estimator: ExpressionEstimator | None = None,
    **kwargs: Any,
) -> EmotionDatabase:
    """Build a database (``source`` = "synthetic" or "mead"), write it atomically to ``out``, return it.

    Extra keyword arguments go to :func:`build_synthetic_database` (num_speakers, clips_per_emotion,
    frames_per_clip, seed) or :func:`build_mead_database` (views, check_frame_counts, ...).
    """
    builders: dict[str, Callable[..., EmotionDatabase]] = {
        "synthetic": build_synthetic_database,
        "mead": build_mead_database,
    }
    if source not in builders:
        raise ConsistentAvatarError(
            f"emotion database source must be one of {sorted(builders)}, got {source!r}"
        )
    import inspect

    accepted = [
        p
        for p in inspect.signature(builders[source]).parameters
        if p not in ("mead_root", "codes", "estimator")
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConsistentAvatarError(
            f"build_emotion_db(source={source!r}): unknown option(s) {unknown}; accepted: {accepted}"
        )
    if source == "synthetic":
        if mead_root is not None or codes is not None or estimator is not None:
            raise ConsistentAvatarError("mead_root/codes/estimator only apply to source='mead'")
        db = build_synthetic_database(**kwargs)
    else:
        if mead_root is None:
            raise ConsistentAvatarError("source='mead' needs mead_root (a MEAD-layout folder of clips)")
        db = build_mead_database(mead_root, codes=codes, estimator=estimator, **kwargs)
    path = db.write(out)
    log.info("wrote %d labelled expressions to %s", len(db), path)
    return db


# ------------------------------------------------------------------------------------------------
# Labelling
# ------------------------------------------------------------------------------------------------


def _as_matrix(expressions: Any, where: str) -> torch.Tensor:
    x = expressions if isinstance(expressions, torch.Tensor) else torch.from_numpy(np.array(expressions))
    if x.ndim != 2 or x.shape[1] != EXPRESSION_DIM:
        raise ConsistentAvatarError(
            f"{where}: expressions must be (M, {EXPRESSION_DIM}), got {tuple(x.shape)}"
        )
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ConsistentAvatarError(f"{where}: expressions must be numbers, got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ConsistentAvatarError(
            f"{where}: expressions contain NaN/inf (first bad row "
            f"{int((~torch.isfinite(x).all(1)).nonzero()[0])})"
        )
    return x


class EmotionLabeller:
    """Eq. 7 against one database: exact nearest neighbour, blockwise.

    ``metric="cosine"`` is the paper's rule. ``metric="euclidean"`` (nearest code by L2 distance;
    ``similarity`` is then minus that distance) is offered because cosine similarity ignores
    magnitude, and a neutral face is FLAME's *zero* code: its small residual vector points
    anywhere. On the synthetic actors cosine labels 30-50 % of neutral frames correctly and L2 ~97 %
    (see the module docstring and benchmarks/results/emotion_label.json).

    ``chunk_size`` database rows × ``query_chunk_size`` queries form one block of the similarity
    matrix (defaults: 2048 × 16384 on CPU, 32768 × 16384 on CUDA; 128 MiB / 2 GiB of float32).
    The database is sorted by label once so each block belongs to one emotion.
    """

    def __init__(
        self,
        db: EmotionDatabase,
        chunk_size: int | None = None,
        device: str | torch.device = "cpu",
        query_chunk_size: int | None = None,
        metric: str = "cosine",
    ) -> None:
        if metric not in METRICS:
            raise ConsistentAvatarError(f"EmotionLabeller: metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.device = torch.device(device)
        gpu = self.device.type != "cpu"
        self.chunk_size = int(chunk_size or (32768 if gpu else 2048))
        self.query_chunk_size = int(query_chunk_size or 16384)
        if self.chunk_size < 1 or self.query_chunk_size < 1:
            raise ConsistentAvatarError("EmotionLabeller: chunk sizes must be >= 1")
        e = torch.from_numpy(np.array(db.expressions, dtype=np.float32))  # own, writable copy
        norms = e.norm(dim=1)
        ok = norms > ZERO_NORM_EPS if metric == "cosine" else torch.ones(len(e), dtype=torch.bool)
        if not bool(ok.all()):
            dropped = int((~ok).sum())
            if dropped == len(e):
                raise ConsistentAvatarError(
                    "emotion database: every expression vector is zero; nothing to match against"
                )
            first = int((~ok).nonzero()[0])
            log.warning(
                "emotion database: dropped %d zero-norm expression vector(s) (cosine similarity is "
                "undefined for them), first from %r",
                dropped,
                db.sources[first],
            )
        labels = torch.from_numpy(np.array(db.labels))[ok]
        order = torch.argsort(labels, stable=True)
        rows = (e[ok] / norms[ok, None] if metric == "cosine" else e)[order]
        self.labels = labels[order]
        counts = torch.bincount(self.labels, minlength=len(EMOTIONS))
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
        self._segments = [(k, bounds[k], bounds[k + 1]) for k in range(len(EMOTIONS)) if counts[k] > 0]
        self._db = rows.to(self.device, torch.float32).contiguous()
        # L2: argmin |q - x|^2 = argmax (q.x - |x|^2 / 2), the same matrix product plus a row bias.
        self._bias = (-0.5 * (self._db * self._db).sum(1))[None, :] if metric == "euclidean" else None
        self.num_vectors = len(self._db)

    def _scores(self, expressions: Any) -> tuple[np.ndarray, np.ndarray]:
        q = _as_matrix(expressions, "EmotionLabeller").to(self.device, torch.float32)
        m = len(q)
        out = torch.full((m, len(EMOTIONS)), float("-inf"), device=self.device)
        norms = q.norm(dim=1, keepdim=True)
        if self.metric == "cosine":
            zero = (norms <= ZERO_NORM_EPS)[:, 0]
            q = torch.where(zero[:, None], torch.zeros_like(q), q / norms.clamp_min(ZERO_NORM_EPS))
        else:
            zero = torch.zeros(m, dtype=torch.bool)
        with torch.no_grad():
            for qa in range(0, m, self.query_chunk_size):
                qs = q[qa : qa + self.query_chunk_size]
                for k, a, b in self._segments:
                    best = torch.full((len(qs),), float("-inf"), device=self.device)
                    for s in range(a, b, self.chunk_size):
                        rows = self._db[s : min(b, s + self.chunk_size)]
                        if self._bias is None:
                            block = qs @ rows.T
                        else:
                            block = torch.addmm(self._bias[:, s : s + len(rows)], qs, rows.T)
                        torch.maximum(best, block.amax(dim=1), out=best)
                    out[qa : qa + len(qs), k] = best
            if (
                self._bias is not None
            ):  # back to minus the distance: |q|^2 - 2 max(q.x - |x|^2/2) = min |q - x|^2
                out = -torch.sqrt((norms * norms - 2 * out).clamp_min(0.0))
        return out.cpu().numpy(), zero.cpu().numpy()

    def scores(self, expressions: Any) -> np.ndarray:
        """(M, 8) float32: per emotion, the best similarity of each query in the database (cosine;
        minus the L2 distance for ``metric="euclidean"``); -inf for emotions the database lacks,
        0 for zero queries under cosine."""
        return self._scores(expressions)[0]

    def label(self, expressions: Any, smoothing_window: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Eq. 7 per frame: ``(label ids (M,) int64, similarity (M,) float32)``.

        With ``smoothing_window`` > 1 (odd) the label sequence is majority-smoothed over time
        (:func:`smooth_labels`) and the similarity is the frame's best match within its final label.
        Under cosine, zero queries are labelled neutral with similarity 0.
        """
        s, zero = self._scores(expressions)
        ids = np.argmax(s, axis=1).astype(np.int64) if len(s) else np.zeros(0, np.int64)
        if zero.any():
            log.warning("%d frame(s) have an all-zero expression vector: labelled neutral", int(zero.sum()))
            ids[zero] = NEUTRAL
        if smoothing_window != 1:
            ids = smooth_labels(ids, smoothing_window)
        sim = s[np.arange(len(ids)), ids]
        sim[zero] = 0.0
        return ids, sim.astype(np.float32)


def smooth_labels(labels: Any, window: int, num_labels: int = len(EMOTIONS)) -> np.ndarray:
    """Majority vote over a centred window of ``window`` (odd) frames, truncated at the ends.

    Why: a frame-wise argmax flips on single frames where two emotions are close (talking moves the
    jaw through other emotions' codes); an emotion lasts far longer than a few frames. Ties keep the
    frame's own label when it is among the most frequent, else take the lowest id.
    """
    ids = np.asarray(labels)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ConsistentAvatarError(
            f"smooth_labels: labels must be a 1-D integer sequence, got shape {ids.shape} {ids.dtype}"
        )
    if not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        raise ConsistentAvatarError(f"smooth_labels: window must be an odd integer >= 1, got {window!r}")
    if len(ids) and (ids.min() < 0 or ids.max() >= num_labels):
        raise ConsistentAvatarError(f"smooth_labels: label ids must be in 0..{num_labels - 1}")
    ids = ids.astype(np.int64)
    if window == 1 or len(ids) == 0:
        return ids.copy()
    m = len(ids)
    onehot = np.zeros((m + 1, num_labels), np.int32)
    onehot[np.arange(1, m + 1), ids] = 1
    csum = np.cumsum(onehot, axis=0)
    half = window // 2
    idx = np.arange(m)
    lo, hi = np.maximum(0, idx - half), np.minimum(m, idx + half + 1)
    counts = (csum[hi] - csum[lo]).astype(np.float64)
    counts[idx, ids] += 0.5  # integer counts: +0.5 only breaks ties in favour of the own label
    return np.argmax(counts, axis=1).astype(np.int64)


def _ids(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ConsistentAvatarError(f"{what} must be a 1-D sequence of labels, got shape {a.shape}")
    if a.dtype.kind in "US" or a.dtype == object:
        return _label_ids([str(v) for v in a], what)
    if not np.issubdtype(a.dtype, np.integer) or (len(a) and (a.min() < 0 or a.max() >= len(EMOTIONS))):
        raise ConsistentAvatarError(f"{what} must be emotion names or ids in 0..{len(EMOTIONS) - 1}")
    return a.astype(np.int64)


def labelling_accuracy(pred: Any, truth: Any) -> float:
    """Fraction of frames whose predicted label equals the truth (names or ids, any mix)."""
    p, t = _ids(pred, "predicted labels"), _ids(truth, "true labels")
    if len(p) != len(t) or len(p) == 0:
        raise ConsistentAvatarError(
            f"labelling_accuracy: need equally many labels, at least one; got {len(p)} and {len(t)}"
        )
    return float((p == t).mean())


def confusion_matrix(pred: Any, truth: Any) -> np.ndarray:
    """(8, 8) int64 counts, rows = true emotion, columns = predicted, in :data:`EMOTIONS` order."""
    p, t = _ids(pred, "predicted labels"), _ids(truth, "true labels")
    if len(p) != len(t):
        raise ConsistentAvatarError(f"confusion_matrix: {len(p)} predictions for {len(t)} true labels")
    n = len(EMOTIONS)
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n)
