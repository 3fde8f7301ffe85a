"""Aggregating per-frame metric values into per-actor and overall figures, the same way everywhere.

Rules (one place, so every table agrees):

* A **frame mean** (:func:`finite_mean`) averages the finite values only. ``+inf`` (PSNR of a frame
  identical to the truth) and NaN (a frame whose mask is empty) are left out and *counted*
  (``n_inf``, ``n_nan`` in :func:`summarize`), so one perfect frame cannot make an average infinite
  and a missing frame cannot make it NaN. If no value is finite the mean is ``+inf`` when some value
  is ``+inf`` (every frame identical: PSNR is unbounded), else NaN. ``-inf`` never occurs for these
  metrics and is treated like NaN.
* A **per-actor** figure is the frame mean over that actor's (test) frames.
* The **overall** figure is the mean of the per-actor figures (each actor weighs the same, as in the
  paper's per-dataset tables); the frame-weighted mean over all frames is reported beside it.
* A metric that is :class:`.image.Unavailable` stays unavailable; an actor for which it is
  unavailable is listed, and left out of the overall mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConsistentAvatarError
from .image import Unavailable


def _values(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.asarray(values, dtype=np.float64)
    return a.reshape(-1)


def finite_mean(values: Any) -> float:
    """Mean of the finite entries; ``+inf`` if none is finite but some is ``+inf``; else NaN."""
    a = _values(values)
    ok = np.isfinite(a)
    if ok.any():
        return float(a[ok].mean())
    return math.inf if np.isposinf(a).any() else math.nan


def summarize(values: Any) -> dict[str, float | int]:
    """Frame statistics of one metric for one actor (or any group of frames):
    ``mean`` (:func:`finite_mean`), ``std``, ``median``, ``min``, ``max`` (over finite values; NaN when
    there are none), ``n`` (all frames), ``n_finite``, ``n_inf``, ``n_nan``."""
    a = _values(values)
    ok = np.isfinite(a)
    fin = a[ok]
    nan = math.nan
    return {
        "mean": finite_mean(a),
        "std": float(fin.std()) if len(fin) else nan,
        "median": float(np.median(fin)) if len(fin) else nan,
        "min": float(fin.min()) if len(fin) else nan,
        "max": float(fin.max()) if len(fin) else nan,
        "n": int(a.size),
        "n_finite": int(ok.sum()),
        "n_inf": int(np.isposinf(a).sum()),
        "n_nan": int(a.size - ok.sum() - np.isposinf(a).sum()),
    }


def group_means(values: Any, groups: Sequence[Any]) -> dict[Any, float]:
    """:func:`finite_mean` of ``values`` (N,) per distinct label in ``groups`` (N,), e.g. per actor,
    in first-appearance order."""
    a = _values(values)
    g = list(groups.tolist() if hasattr(groups, "tolist") else groups)
    if len(g) != len(a):
        raise ConsistentAvatarError(f"group_means: {len(a)} values but {len(g)} group labels")
    order: dict[Any, list[int]] = {}
    for i, label in enumerate(g):
        order.setdefault(label, []).append(i)
    return {label: finite_mean(a[idx]) for label, idx in order.items()}


def mean_by(rows: Iterable[Mapping[str, Any]], by: str = "actor", metrics: Sequence[str] | None = None) -> dict[Any, dict[str, float]]:
    """Per-group means of per-frame rows (dicts such as ``{"actor": "a", "frame": 3, "psnr": 31.2}``):
    ``{group: {metric: finite_mean}}``. ``metrics`` defaults to every numeric key but ``by`` and
    ``frame``; a row missing a metric (or holding None) contributes nothing to it."""
    rows = list(rows)
    if metrics is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k, v in r.items():
                if k not in (by, "frame") and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    seen.setdefault(k, None)
        metrics = list(seen)
    out: dict[Any, dict[str, list[float]]] = {}
    for r in rows:
        if by not in r:
            raise ConsistentAvatarError(f"mean_by: a row has no {by!r} key: {sorted(r)}")
        bucket = out.setdefault(r[by], {m: [] for m in metrics})
        for m in metrics:
            v = r.get(m)
            if v is not None:
                bucket[m].append(float(v))
    return {g: {m: finite_mean(v) for m, v in ms.items()} for g, ms in out.items()}


def aggregate_actors(per_actor: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-actor and overall figures from ``{actor: {metric: per-frame values | Unavailable}}``.

    Returns ``{"actors": {actor: {metric: summarize(...) | Unavailable}}, "overall": {metric: {...}}}``
    where each overall entry holds ``mean`` (mean of the per-actor means with a finite mean: the
    headline number), ``frame_mean`` (:func:`finite_mean` over all frames of those actors),
    ``n_actors``, ``n_frames``, ``n_inf``, ``n_nan`` and ``unavailable_actors`` (actors for which it
    is :class:`.image.Unavailable`); an overall entry is itself :class:`.image.Unavailable` when the
    metric is unavailable for every actor.
    """
    actors_out: dict[str, dict[str, Any]] = {}
    metrics: dict[str, None] = {}
    for actor, ms in per_actor.items():
        actors_out[actor] = {}
        for m, v in ms.items():
            metrics.setdefault(m, None)
            actors_out[actor][m] = v if isinstance(v, Unavailable) else summarize(v)
    overall: dict[str, Any] = {}
    for m in metrics:
        avail = {a: per_actor[a][m] for a in per_actor if m in per_actor[a] and not isinstance(per_actor[a][m], Unavailable)}
        missing = [a for a in per_actor if isinstance(per_actor[a].get(m), Unavailable)]
        if not avail:
            first = per_actor[missing[0]][m] if missing else Unavailable(m, "no actor has values")
            overall[m] = first
            continue
        actor_means = [actors_out[a][m]["mean"] for a in avail]
        finite = [x for x in actor_means if math.isfinite(x)]
        allv = np.concatenate([_values(v) for v in avail.values()])
        s = summarize(allv)
        overall[m] = {
            "mean": float(np.mean(finite)) if finite else finite_mean(actor_means),
            "frame_mean": s["mean"],
            "n_actors": len(avail),
            "n_frames": s["n"],
            "n_inf": s["n_inf"],
            "n_nan": s["n_nan"],
            "unavailable_actors": missing,
        }
    return {"actors": actors_out, "overall": overall}


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps`` writes as strict JSON: numpy arrays/scalars → lists and
    numbers, non-finite floats → the strings ``"inf"``, ``"-inf"``, ``"nan"``, :class:`.image.Unavailable`
    → its ``to_json()`` dict, tuples → lists."""
    if isinstance(obj, Unavailable):
        return obj.to_json()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    return obj
