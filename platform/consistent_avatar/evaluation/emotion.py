"""Emotion labelling accuracy against the synthetic generator's ground truth.

`cavatar prepare` labels every frame by matching its expression code against the emotion database
(paper eq. 7) and stores the label in the shards' ``emotion`` column. For synthetic actors the
generator knows the true emotion of every frame (``synthetic.json`` → ``"emotions"``, one label per
frame in frame order), so the labeller can be scored. Real actors have no such truth: their score is
:class:`.image.Unavailable`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.layout import EMOTIONS, SYNTHETIC_TRUTH_FILE
from ..emotion import confusion_matrix, labelling_accuracy
from ..errors import ConsistentAvatarError
from ..io import read_json
from .image import Unavailable

METRIC = "emotion_accuracy"


def true_emotions(actor_dir: str | os.PathLike[str]) -> list[str]:
    """The generator's per-frame emotion labels of a synthetic actor folder (INSTA or video layout)."""
    path = Path(actor_dir) / SYNTHETIC_TRUTH_FILE
    if not path.is_file():
        raise ConsistentAvatarError(f"{path} not found: {actor_dir} is not a synthetic actor, its true emotions are unknown")
    labels = read_json(path).get("emotions")
    if not isinstance(labels, list) or not labels:
        raise ConsistentAvatarError(f"{path} has no 'emotions' list: regenerate the actor with `cavatar synth`")
    return [str(x) for x in labels]


def emotion_accuracy(predicted: Sequence[Any], truth: Sequence[Any]) -> dict[str, Any]:
    """Score predicted labels against true ones (emotion names or ids, equal length):

    ``accuracy`` (fraction of frames correct, :func:`consistent_avatar.emotion.labelling_accuracy`),
    ``n_frames``, ``per_emotion`` ``{emotion: {"n": true frames, "recall": fraction labelled
    correctly (NaN when n = 0)}}``, ``confusion`` (8×8 counts, rows = truth, columns = predicted, in
    ``labels`` order) and ``labels``.
    """
    acc = labelling_accuracy(predicted, truth)
    cm = confusion_matrix(predicted, truth)
    per = {}
    for i, e in enumerate(EMOTIONS):
        n = int(cm[i].sum())
        per[e] = {"n": n, "recall": float(cm[i, i] / n) if n else float("nan")}
    return {"accuracy": acc, "n_frames": int(cm.sum()), "per_emotion": per, "confusion": cm.tolist(), "labels": list(EMOTIONS)}


def _source_root(shards: Any, actor: str) -> Path | None:
    from ..data.shards import ACTOR_MANIFEST_FILE, ACTORS_DIR, read_shard_json

    meta = read_shard_json(shards, ACTORS_DIR, actor, ACTOR_MANIFEST_FILE)
    if meta is None:
        return None
    root = (meta.get("source") or {}).get("root")
    return Path(root) if root else None


def shard_emotion_accuracy(
    shards: str | os.PathLike[str],
    actor: str,
    split: str | None = None,
    actor_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | Unavailable:
    """Accuracy of the prepared labels (shard column ``emotion``) of ``actor`` against its
    ``synthetic.json``, over ``split`` ("train"/"test"; None = all frames).

    The truth is read from ``actor_dir`` when given, else from the source folder recorded in the
    actor's ``_actor.json``. Returns :func:`emotion_accuracy`'s dict (plus ``split``), or
    :class:`.image.Unavailable` when the actor has no synthetic ground truth.
    """
    from ..data.shards import open_shards, read_actor_table

    shards = open_shards(shards)  # a path or a pyarrow filesystem URI
    table = read_actor_table(shards, actor, split=split, columns=["frame", "split", "emotion"])
    root = Path(actor_dir) if actor_dir is not None else _source_root(shards, actor)
    if root is None or not (root / SYNTHETIC_TRUTH_FILE).is_file():
        where = f"{root}" if root is not None else "its source folder (unknown: no _actor.json source)"
        return Unavailable(METRIC, f"actor {actor!r} has no {SYNTHETIC_TRUTH_FILE} in {where}: only synthetic actors "
                                   "carry true emotions")
    truth = true_emotions(root)
    frames = np.asarray(table["frame"].to_pylist(), np.int64)
    if len(frames) == 0:
        return Unavailable(METRIC, f"actor {actor!r} has no frames in split {split!r}")
    if frames.max() >= len(truth):
        raise ConsistentAvatarError(
            f"actor {actor!r}: shards hold frame {int(frames.max())} but {root / SYNTHETIC_TRUTH_FILE} lists "
            f"{len(truth)} frames: the shards were prepared from another version of the actor (re-run prepare)"
        )
    result = emotion_accuracy(table["emotion"].to_pylist(), [truth[i] for i in frames])
    result["split"] = split
    return result
