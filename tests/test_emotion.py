"""Emotion labels (eq. 7): the database file, the MEAD and synthetic builders, exact blockwise
cosine-similarity labelling, temporal smoothing, and accuracy on synthetic actors' true emotions."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consistent_avatar.data.layout import EMOTIONS, EXPRESSION_DIM
from consistent_avatar.emotion import (
    EmotionDatabase,
    EmotionLabeller,
    ExpressionEstimator,
    build_emotion_db,
    build_mead_database,
    build_synthetic_database,
    confusion_matrix,
    database_schema,
    labelling_accuracy,
    smooth_labels,
)
from consistent_avatar.errors import ConsistentAvatarError

E = {name: i for i, name in enumerate(EMOTIONS)}


def vec(*values: float) -> np.ndarray:
    v = np.zeros(EXPRESSION_DIM, np.float32)
    v[: len(values)] = values
    return v


def small_db(n: int = 50, seed: int = 0) -> EmotionDatabase:
    rng = np.random.default_rng(seed)
    return EmotionDatabase(
        rng.standard_normal((n, EXPRESSION_DIM)).astype(np.float32),
        rng.integers(0, len(EMOTIONS), n),
        [f"clip{i // 5}" for i in range(n)],
    )


# ------------------------------------------------------------------------------------------------
# database file
# ------------------------------------------------------------------------------------------------


def test_database_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    db = small_db()
    path = tmp_path / "sub" / "db.parquet"
    db.write(path)
    assert pq.read_schema(path).equals(database_schema(), check_metadata=False)
    back = EmotionDatabase.read(path)
    assert np.array_equal(back.expressions, db.expressions) and back.expressions.dtype == np.float32
    assert np.array_equal(back.labels, db.labels) and back.sources == db.sources
    EmotionDatabase(db.expressions[:3], db.labels[:3], db.sources[:3]).write(path)  # replace
    assert len(EmotionDatabase.read(path)) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["db.parquet"]  # no temporaries left


def _write(path: Path, expr: list, labels: list, sources: list | None = None, expr_type=None) -> Path:
    cols = {
        "expression": pa.array(expr, expr_type or pa.list_(pa.float32())),
        "label": pa.array(labels, pa.string()),
    }
    if sources is not False:
        cols["source"] = pa.array(sources or ["s"] * len(labels), pa.string())
    pq.write_table(pa.table(cols), path)
    return path


def test_database_read_accepts_plain_float64_lists(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "db.parquet",
        [list(vec(1, 2)), list(vec(3))],
        ["happy", "sad"],
        expr_type=pa.list_(pa.float64()),
    )
    db = EmotionDatabase.read(p)
    assert db.labels.tolist() == [E["happy"], E["sad"]] and db.expressions[0, 1] == 2.0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p / "missing.parquet", "does not exist"),
        (
            lambda p: (p / "x.parquet").write_bytes(b"not parquet") and p / "x.parquet",
            "not a readable parquet",
        ),
        (
            lambda p: _write(p / "x.parquet", [list(vec(1))], ["happy"], False),
            r"lacks column\(s\) \['source'\]",
        ),
        (lambda p: _write(p / "x.parquet", [[1.0] * 99], ["happy"]), "must have 100 values, row 0 has 99"),
        (
            lambda p: _write(p / "x.parquet", [list(vec(1)), list(vec(np.nan))], ["happy", "sad"]),
            "NaN/inf .*row 1",
        ),
        (lambda p: _write(p / "x.parquet", [list(vec(1))], ["joy"]), r"unknown emotion label\(s\) \['joy'\]"),
        (lambda p: _write(p / "x.parquet", [list(vec(1))], [None]), "have no label"),
        (lambda p: _write(p / "x.parquet", [], []), "has no rows"),
        (lambda p: _write(p / "x.parquet", [None], ["happy"]), "null expression"),
    ],
)
def test_database_read_rejects_bad_files(tmp_path: Path, make, match: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConsistentAvatarError, match=match) as info:
        EmotionDatabase.read(path)
    assert str(path) in str(info.value)


def test_database_constructor_validates() -> None:
    with pytest.raises(ConsistentAvatarError, match=r"\(N, 100\)"):
        EmotionDatabase(np.zeros((2, 50), np.float32), np.zeros(2, np.int64), ["a", "b"])
    with pytest.raises(ConsistentAvatarError, match="label ids"):
        EmotionDatabase(np.zeros((1, 100), np.float32), np.array([8]), ["a"])
    with pytest.raises(ConsistentAvatarError, match="1 sources for 2"):
        EmotionDatabase(np.ones((2, 100), np.float32), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ConsistentAvatarError, match="unknown emotion"):
        EmotionDatabase.from_names(np.ones((1, 100)), ["glad"], ["a"])


def test_synthetic_database_and_build_emotion_db(tmp_path: Path) -> None:
    db = build_synthetic_database(num_speakers=2, clips_per_emotion=1, frames_per_clip=5, seed=3)
    assert len(db) == 2 * 8 * 5 and set(db.counts().values()) == {10}
    out = build_emotion_db(
        tmp_path / "db.parquet",
        source="synthetic",
        num_speakers=2,
        clips_per_emotion=1,
        frames_per_clip=5,
        seed=3,
    )
    assert np.array_equal(out.expressions, db.expressions) and out.sources == db.sources
    assert np.array_equal(EmotionDatabase.read(tmp_path / "db.parquet").labels, db.labels)
    with pytest.raises(ConsistentAvatarError, match=r"unknown option\(s\) \['speakers'\]"):
        build_emotion_db(tmp_path / "x.parquet", speakers=2)
    with pytest.raises(ConsistentAvatarError, match="source must be one of"):
        build_emotion_db(tmp_path / "x.parquet", source="afew")
    with pytest.raises(ConsistentAvatarError, match="needs mead_root"):
        build_emotion_db(tmp_path / "x.parquet", source="mead", codes={})
    assert not (tmp_path / "x.parquet").exists()


# ------------------------------------------------------------------------------------------------
# MEAD builder
# ------------------------------------------------------------------------------------------------

MEAD_CLIPS = {  # relative path -> frames
    "M003/video/front/happy/level_1/001.mp4": 4,
    "M003/video/front/sad/level_3/002.mp4": 6,
    "M003/video/left_30/happy/level_2/001.mp4": 3,
    "W009/video/front/neutral/level_1/001.mp4": 5,
    "W009/video/front/Surprised/level_2/003.mp4": 2,
}


def write_clip(path: Path, frames: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (32, 32))
    assert w.isOpened()
    for i in range(frames):
        w.write(np.full((32, 32, 3), 20 + 40 * i, np.uint8))
    w.release()


@pytest.fixture(scope="module")
def mead_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("mead")
    rng = np.random.default_rng(0)
    codes = {}
    for rel, n in MEAD_CLIPS.items():
        write_clip(root / rel, n)
        codes[rel] = rng.standard_normal((n, EXPRESSION_DIM)).astype(np.float32)
    (root / "README.txt").write_text("not a clip")
    return root, codes


def test_mead_database_from_npz_and_parquet_codes(mead_tree, tmp_path: Path) -> None:
    root, codes = mead_tree
    npz = tmp_path / "codes.npz"
    np.savez(npz, **codes)
    # parquet: one row per frame, rows shuffled, order given by the frame column
    rows = [(rel, f, codes[rel][f]) for rel in codes for f in range(len(codes[rel]))]
    perm = np.random.default_rng(1).permutation(len(rows))
    table = pa.table(
        {
            "clip": [rows[i][0] for i in perm],
            "frame": [rows[i][1] for i in perm],
            "expression": pa.array([list(rows[i][2]) for i in perm], pa.list_(pa.float32(), EXPRESSION_DIM)),
        }
    )
    pqf = tmp_path / "codes.parquet"
    pq.write_table(table, pqf)
    a = build_mead_database(root, codes=npz, progress=False)
    b = build_mead_database(root, codes=pqf, progress=False)
    order = sorted(MEAD_CLIPS)
    expected_expr = np.concatenate([codes[r] for r in order])
    expected_labels = sum(([E[r.split("/")[3].lower()]] * MEAD_CLIPS[r] for r in order), [])
    for db in (a, b):
        assert np.array_equal(db.expressions, expected_expr)
        assert db.labels.tolist() == expected_labels
        assert db.sources == sum(([r] * MEAD_CLIPS[r] for r in order), [])
    front = build_mead_database(root, codes=codes, views=["front"], progress=False)
    assert len(front) == sum(n for r, n in MEAD_CLIPS.items() if "/front/" in r)


def test_mead_errors_name_the_clip(mead_tree, tmp_path: Path) -> None:
    root, codes = mead_tree
    rel = "M003/video/front/sad/level_3/002.mp4"
    with pytest.raises(ConsistentAvatarError, match=f"{rel}: no expression codes"):
        build_mead_database(root, codes={k: v for k, v in codes.items() if k != rel}, progress=False)
    short = dict(codes, **{rel: codes[rel][:5]})
    with pytest.raises(ConsistentAvatarError, match=f"{rel}: 5 expression codes for 6 video frames"):
        build_mead_database(root, codes=short, progress=False)
    assert len(build_mead_database(root, codes=short, check_frame_counts=False, progress=False)) == 19
    bad = dict(codes, **{rel: codes[rel][:, :50]})
    with pytest.raises(ConsistentAvatarError, match=rf"{rel}: expression codes must be \(T, 100\)"):
        build_mead_database(root, codes=bad, progress=False)
    with pytest.raises(ConsistentAvatarError, match="exactly one of codes= .* or estimator="):
        build_mead_database(root, progress=False)
    with pytest.raises(ConsistentAvatarError, match="no MEAD clips"):
        build_mead_database(tmp_path, codes=codes, progress=False)
    with pytest.raises(ConsistentAvatarError, match="does not exist"):
        build_mead_database(root, codes=tmp_path / "nope.npz", progress=False)
    odd = tmp_path / "odd"
    write_clip(odd / "M001/video/front/bored/level_1/001.mp4", 2)
    with pytest.raises(
        ConsistentAvatarError, match="M001/video/front/bored/level_1/001.mp4: unknown emotion folder 'bored'"
    ):
        build_mead_database(odd, codes={}, progress=False)
    broken = tmp_path / "broken"
    (broken / "M001/video/front/sad/level_1").mkdir(parents=True)
    (broken / "M001/video/front/sad/level_1/001.mp4").write_bytes(b"no video here")
    with pytest.raises(ConsistentAvatarError, match="M001/video/front/sad/level_1/001.mp4: cannot decode"):
        build_mead_database(
            broken, codes={"M001/video/front/sad/level_1/001.mp4": np.zeros((1, 100))}, progress=False
        )


class BrightnessEstimator:
    """A deterministic stand-in for DECA: code dim 0 = mean brightness, dim 1 = 1, dim 2 = call number."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        self.calls.append(frames.shape)
        out = np.zeros((len(frames), EXPRESSION_DIM), np.float32)
        out[:, 0] = frames.mean(axis=(1, 2, 3)) / 255.0
        out[:, 1] = 1.0
        out[:, 2] = len(self.calls)
        return out


def test_mead_database_from_an_estimator(mead_tree) -> None:
    root, _ = mead_tree
    est = BrightnessEstimator()
    assert isinstance(est, ExpressionEstimator)
    db = build_emotion_db(
        root.parent / "mead_est.parquet",
        source="mead",
        mead_root=root,
        estimator=est,
        frames_per_call=4,
        progress=False,
    )
    assert len(db) == sum(MEAD_CLIPS.values())
    assert [c[0] for c in est.calls] == [
        4,
        4,
        2,
        3,
        2,
        4,
        1,
    ]  # chunks of at most 4 frames, clips sorted by path
    assert all(c[1:] == (32, 32, 3) for c in est.calls)
    six = db.expressions[np.asarray(db.sources) == "M003/video/front/sad/level_3/002.mp4"]
    assert np.all(np.diff(six[:, 0]) > 0.1)  # frames written brighter and brighter, decoded in order
    assert set(db.labels[np.asarray(db.sources) == "W009/video/front/Surprised/level_2/003.mp4"]) == {
        E["surprised"]
    }


def test_estimator_errors_name_the_clip(mead_tree) -> None:
    root, _ = mead_tree
    with pytest.raises(
        ConsistentAvatarError,
        match=r"M003/video/front/happy/level_1/001.mp4: the estimator returned \(4, 3\)",
    ):
        build_mead_database(root, estimator=lambda f: np.zeros((len(f), 3)), progress=False)

    def failing(frames: np.ndarray) -> np.ndarray:
        raise RuntimeError("no face found")

    with pytest.raises(
        ConsistentAvatarError, match="001.mp4: the expression estimator failed: no face found"
    ):
        build_mead_database(root, estimator=failing, progress=False)


# ------------------------------------------------------------------------------------------------
# labelling
# ------------------------------------------------------------------------------------------------


def test_hand_computed_labels_and_similarities() -> None:
    db = EmotionDatabase.from_names(
        np.stack([vec(1, 0), vec(0, 1), vec(1, 1), vec(0, 0, 5)]),
        ["happy", "sad", "angry", "happy"],
        list("abcd"),
    )
    lab = EmotionLabeller(db, chunk_size=1)
    q = np.stack([vec(2, 0.1), vec(1, 1.1), vec(-1, 0), vec(0, 0, -1, 0), vec(0, -1, 2)])
    ids, sim = lab.label(q)
    c = 1 / np.sqrt(2)
    assert ids.tolist() == [E["happy"], E["angry"], E["happy"], E["angry"], E["happy"]]
    np.testing.assert_allclose(sim[0], 2 / np.sqrt(4.01), rtol=1e-6)
    np.testing.assert_allclose(sim[1], (1 + 1.1) / np.sqrt(2.21) * c, rtol=1e-6)
    # (-1, 0): happy row d scores 0, sad 0, angry -0.71, happy row a -1  -> happy (0) ties sad (0): lower id
    assert ids[2] == min(E["happy"], E["sad"]) and sim[2] == 0
    # (0,0,-1): every row scores 0 except d (-1): happy's best is a (0); tie -> lowest id present (angry)
    assert ids[3] == E["angry"] and sim[3] == 0
    np.testing.assert_allclose(sim[4], 2 / np.sqrt(5), rtol=1e-6)  # happy row d: 10 / (5 * sqrt 5)
    s = lab.scores(q)
    assert s.shape == (5, 8) and np.isneginf(s[:, [E["fear"], E["neutral"]]]).all()
    np.testing.assert_allclose(
        s[1, [E["happy"], E["sad"], E["angry"]]],
        [1 / np.sqrt(2.21), 1.1 / np.sqrt(2.21), 2.1 / np.sqrt(2.21) * c],
        rtol=1e-6,
    )


def test_zero_vectors(caplog: pytest.LogCaptureFixture) -> None:
    db = EmotionDatabase.from_names(
        np.stack([vec(1), vec(), vec(0, 1)]), ["happy", "sad", "fear"], ["a", "zero", "c"]
    )
    with caplog.at_level(logging.WARNING, logger="consistent_avatar.emotion"):
        lab = EmotionLabeller(db)
    assert "dropped 1 zero-norm" in caplog.text and "'zero'" in caplog.text
    assert lab.num_vectors == 2 and np.isneginf(lab.scores(vec(1)[None])[0, E["sad"]])
    ids, sim = lab.label(np.stack([vec(), vec(0, 3)]))
    assert ids.tolist() == [E["neutral"], E["fear"]] and sim.tolist() == [0.0, 1.0]
    with pytest.raises(ConsistentAvatarError, match="every expression vector is zero"):
        EmotionLabeller(EmotionDatabase(np.zeros((2, 100), np.float32), np.zeros(2, np.int64), ["a", "b"]))


def reference_labels(db: EmotionDatabase, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = db.expressions.astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    s = b @ a.T
    return s, db.labels[np.argmax(s, axis=1)]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 120),
    m=st.integers(1, 40),
    chunk=st.integers(1, 130),
    qchunk=st.integers(1, 45),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_equals_unchunked_and_reference(n: int, m: int, chunk: int, qchunk: int, seed: int) -> None:
    db = small_db(n, seed)
    q = np.random.default_rng(seed + 1).standard_normal((m, EXPRESSION_DIM)).astype(np.float32)
    whole = EmotionLabeller(db, chunk_size=n, query_chunk_size=m)
    blocks = EmotionLabeller(db, chunk_size=chunk, query_chunk_size=qchunk)
    np.testing.assert_allclose(blocks.scores(q), whole.scores(q), atol=1e-6)
    ids_w, sim_w = whole.label(q)
    ids_b, sim_b = blocks.label(q)
    s, ref_ids = reference_labels(db, q)
    top2 = np.sort(s, axis=1)[:, -2:] if n > 1 else np.c_[np.full(m, -2.0), s]
    clear = top2[:, 1] - top2[:, 0] > 1e-5  # float32 rounding may reorder near-ties only
    assert np.array_equal(ids_b[clear], ids_w[clear]) and np.array_equal(ids_b[clear], ref_ids[clear])
    np.testing.assert_allclose(sim_b, s.max(axis=1), atol=2e-6)
    np.testing.assert_allclose(sim_w, s.max(axis=1), atol=2e-6)


def test_labeller_input_validation() -> None:
    lab = EmotionLabeller(small_db())
    with pytest.raises(ConsistentAvatarError, match=r"\(M, 100\)"):
        lab.label(np.zeros((3, 99)))
    with pytest.raises(ConsistentAvatarError, match="NaN/inf .*row 1"):
        lab.label(np.stack([vec(1), vec(np.inf)]))
    ids, sim = lab.label(np.zeros((0, 100), np.float32))
    assert ids.shape == (0,) and sim.shape == (0,)
    t_ids, _ = lab.label(torch.ones(2, 100))
    assert t_ids.tolist() == lab.label(np.ones((2, 100)))[0].tolist()


def test_smooth_labels_by_hand() -> None:
    assert smooth_labels([0, 0, 1, 0, 0], 3).tolist() == [0, 0, 0, 0, 0]
    assert smooth_labels([0, 1, 1, 0], 3).tolist() == [0, 1, 1, 0]  # ends: truncated windows, ties keep own
    assert smooth_labels([2, 0, 1], 3).tolist() == [2, 0, 1]  # three-way ties keep the own label
    assert smooth_labels([3, 3, 2, 1, 2, 3, 3], 5).tolist() == [
        3,
        3,
        2,
        2,
        2,
        3,
        3,
    ]  # 2 vs 3 ties: own; 1: lowest
    assert smooth_labels([3, 3, 3, 1, 2, 3, 3], 5).tolist() == [3, 3, 3, 3, 3, 3, 3]
    assert smooth_labels([5, 2, 7], 9).tolist() == [5, 2, 7]
    assert smooth_labels([4, 4, 6, 4, 6, 6, 6], 1).tolist() == [4, 4, 6, 4, 6, 6, 6]
    assert smooth_labels(np.zeros(0, np.int64), 5).tolist() == []
    for bad in (2, 0, -3, 2.0):
        with pytest.raises(ConsistentAvatarError, match="odd integer"):
            smooth_labels([1, 2], bad)
    with pytest.raises(ConsistentAvatarError, match="0..7"):
        smooth_labels([1, 8], 3)


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 7), min_size=1, max_size=60), half=st.integers(0, 6))
def test_smoothing_properties(labels: list[int], half: int) -> None:
    w = 2 * half + 1
    out = smooth_labels(labels, w)
    a = np.asarray(labels)
    for i, v in enumerate(out):
        window = a[max(0, i - half) : i + half + 1]
        counts = np.bincount(window, minlength=8)
        assert counts[v] == counts.max()  # always a most frequent label of its window
        if counts[a[i]] == counts.max():
            assert v == a[i]  # and the frame keeps its own label when that is one of them


def test_label_with_smoothing_reports_similarity_of_the_final_label() -> None:
    db = EmotionDatabase.from_names(np.stack([vec(1, 0), vec(0, 1)]), ["happy", "sad"], ["a", "b"])
    q = np.stack([vec(1, 0.1)] * 3 + [vec(0.1, 1)] + [vec(1, 0.2)] * 3)
    lab = EmotionLabeller(db)
    raw, _ = lab.label(q)
    ids, sim = lab.label(q, smoothing_window=3)
    assert raw[3] == E["sad"] and set(ids.tolist()) == {E["happy"]}
    np.testing.assert_allclose(sim[3], 0.1 / np.sqrt(1.01), rtol=1e-6)
    np.testing.assert_allclose(sim, lab.scores(q)[:, E["happy"]], rtol=1e-6)


def test_accuracy_and_confusion() -> None:
    assert labelling_accuracy([0, 1, 2, 3], ["angry", "contempt", "happy", "fear"]) == 0.75
    cm = confusion_matrix(["happy", "happy", "sad"], [E["happy"], E["sad"], E["sad"]])
    assert cm.sum() == 3 and cm[E["happy"], E["happy"]] == 1 and cm[E["sad"], E["happy"]] == 1
    with pytest.raises(ConsistentAvatarError, match="equally many"):
        labelling_accuracy([0, 1], [0])
    with pytest.raises(ConsistentAvatarError, match="unknown emotion"):
        labelling_accuracy(["glad"], ["happy"])


def test_synthetic_actors_are_labelled_from_the_synthetic_mead(capsys: pytest.CaptureFixture[str]) -> None:
    """Actors and database share the emotion model but no speaker: accuracy measures generalisation.
    Cosine (eq. 7) gets every expressive emotion; it cannot see neutral (a near-zero code), L2 can."""
    from consistent_avatar.synthetic.head import Stage1Degradation
    from consistent_avatar.synthetic.motion import actor_motion

    db = build_synthetic_database(seed=11)
    cosine, euclid = EmotionLabeller(db), EmotionLabeller(db, metric="euclidean")
    truth, codes = [], []
    for index in range(4):
        motion = actor_motion(0, index, 400, 25.0, Stage1Degradation.from_strength(1.0))
        truth += motion.labels
        codes.append(motion.expression)
    q = np.concatenate(codes)
    raw = cosine.label(q)[0]
    acc = labelling_accuracy(raw, truth)
    acc_smooth = labelling_accuracy(cosine.label(q, smoothing_window=9)[0], truth)
    acc_l2 = labelling_accuracy(euclid.label(q)[0], truth)
    cm = confusion_matrix(raw, truth)
    recall = np.diag(cm) / cm.sum(1)
    with capsys.disabled():
        print(
            f"\nsynthetic actors (4 × 400 frames): cosine accuracy {acc:.3f} (9-frame smoothing {acc_smooth:.3f}, "
            f"neutral recall {recall[E['neutral']]:.2f}); euclidean {acc_l2:.3f}"
        )
    assert acc > 0.85 and abs(acc_smooth - acc) < 0.02
    assert (np.delete(recall, E["neutral"]) > 0.95).all(), dict(zip(EMOTIONS, recall.round(2)))
    assert acc_l2 > 0.97


def test_euclidean_metric_by_hand_and_chunked() -> None:
    db = EmotionDatabase.from_names(
        np.stack([vec(), vec(3, 0), vec(0, 1)]), ["neutral", "happy", "sad"], list("abc")
    )
    lab = EmotionLabeller(db, metric="euclidean", chunk_size=1)
    ids, sim = lab.label(np.stack([vec(0.2, 0.1), vec(2, 0), vec(0, 0.7), vec(-4, 0)]))
    assert ids.tolist() == [E["neutral"], E["happy"], E["sad"], E["neutral"]]
    np.testing.assert_allclose(sim, [-np.hypot(0.2, 0.1), -1.0, -0.3, -4.0], rtol=1e-5)
    big = small_db(200, 4)
    q = np.random.default_rng(5).standard_normal((30, EXPRESSION_DIM)).astype(np.float32)
    d = np.linalg.norm(q[:, None].astype(np.float64) - big.expressions[None], axis=2)
    np.testing.assert_allclose(
        EmotionLabeller(big, metric="euclidean", chunk_size=7, query_chunk_size=4).label(q)[1],
        -d.min(1),
        rtol=1e-4,
    )
    with pytest.raises(ConsistentAvatarError, match="metric must be one of"):
        EmotionLabeller(db, metric="manhattan")
