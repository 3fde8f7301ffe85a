"""Actor ingest: both layouts read back exactly (PNG) or within codec tolerance (mp4v), overrides,
masks, fingerprints, discovery, pickling, and every malformed input as an ActorDataError that names
the actor, the frame and the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from actor_factory import ActorTruth, make_insta_actor, make_video_actor, write_png, write_video
from consistent_avatar.data import layout
from consistent_avatar.data.ingest import (
    ActorSource,
    FrameBatch,
    Tracking,
    discover_actors,
    open_actor,
)
from consistent_avatar.errors import ActorDataError, ConsistentAvatarError

VIDEO_MEAN_TOL = 8.0  # mean |decoded - written| of mp4v at these sizes is ~4


def _assert_batch(fb: FrameBatch, n: int, h: int, w: int) -> None:
    assert fb.indices.dtype == np.int64 and fb.indices.shape == (n,)
    for arr in (fb.real_rgb, fb.coarse_rgb, fb.coarse_normal):
        assert arr.dtype == np.uint8 and arr.shape == (n, h, w, 3)
    assert fb.mask.dtype == np.uint8 and fb.mask.shape == (n, h, w)


def _assert_video_frames(
    decoded: np.ndarray, truth: np.ndarray, idx: list[int], distinct: bool = True
) -> None:
    """Each decoded frame is close to the frame written at that index and, where the written frames
    differ clearly (``distinct``), closer to it than to any other."""
    for k, i in enumerate(idx):
        errs = np.abs(truth.astype(np.float32) - decoded[k].astype(np.float32)).mean(axis=(1, 2, 3))
        assert errs[i] < VIDEO_MEAN_TOL, (i, errs[i])
        if distinct:
            assert int(np.argmin(errs)) == i, (i, errs)


# --------------------------------------------------------------------------------------------------
# INSTA layout: values
# --------------------------------------------------------------------------------------------------


def test_insta_reads_exact_values_in_transforms_order(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path, "a", frames=5, order=[3, 0, 4, 1, 2])
    a = open_actor(t.root)
    assert isinstance(a, ActorSource) and (a.name, a.kind, a.root) == ("a", "insta", t.root)
    assert (a.num_frames, a.height, a.width) == (5, 24, 32)
    a.validate()
    idx = [2, 0, 4, 0]
    fb = a.read_frames(idx)
    _assert_batch(fb, 4, 24, 32)
    assert fb.indices.tolist() == idx
    np.testing.assert_array_equal(fb.real_rgb, t.real[idx])
    np.testing.assert_array_equal(fb.mask, t.mask[idx])  # alpha channel
    np.testing.assert_array_equal(fb.coarse_rgb, t.coarse[idx])
    np.testing.assert_array_equal(fb.coarse_normal, t.normal[idx])
    # frame i is the i-th file listed in transforms.json: frame 1 is images/00000.png
    assert t.ids[:2] == ["00003", "00000"]
    on_disk = cv2.cvtColor(cv2.imread(str(t.root / "images/00000.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(a.read_frames([1]).real_rgb[0], on_disk)
    tr = a.tracking()
    assert isinstance(tr, Tracking) and tr.expression.dtype == np.float32 and tr.pose.dtype == np.float32
    np.testing.assert_array_equal(tr.expression, t.expression)
    np.testing.assert_array_equal(tr.pose, t.pose)
    assert tr.expression.shape == (5, 100) and tr.pose.shape == (5, 6)
    empty = a.read_frames([])
    _assert_batch(empty, 0, 24, 32)


def test_insta_grey_and_rgba_inputs_become_rgb_and_mask_comes_from_masks_folder(tmp_path: Path) -> None:
    t = make_insta_actor(
        tmp_path, "a", mask_mode="folder", real_grey=True, stage1_rgba=True, normal_grey=True
    )
    a = open_actor(t.root)
    a.validate()
    fb = a.read_frames(range(5))
    _assert_batch(fb, 5, 24, 32)
    np.testing.assert_array_equal(fb.real_rgb, t.real)  # grey replicated to 3 channels
    np.testing.assert_array_equal(fb.mask, t.mask)  # from masks/<id>.png
    np.testing.assert_array_equal(fb.coarse_rgb, t.coarse)  # alpha of the render dropped
    np.testing.assert_array_equal(fb.coarse_normal, t.normal)


def test_alpha_channel_wins_over_a_masks_folder_and_16_bit_masks_are_scaled(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path, "a")  # RGBA frames
    for fid, m in zip(t.ids, t.mask, strict=True):
        write_png(t.root / layout.MASKS_DIR / f"{fid}.png", 255 - m)
    np.testing.assert_array_equal(open_actor(t.root).read_frames([1]).mask[0], t.mask[1])

    u = make_insta_actor(tmp_path, "b", mask_mode="folder")
    write_png(u.root / layout.MASKS_DIR / f"{u.ids[2]}.png", u.mask[2].astype(np.uint16) * 257)
    np.testing.assert_array_equal(open_actor(u.root).read_frames([2]).mask[0], u.mask[2])


def test_per_frame_overrides_are_honoured(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path, "a", frames=4)
    alt = make_insta_actor(tmp_path, "alt", frames=4, seed=5)
    root = t.root
    (root / "other").mkdir()
    np.savetxt(root / "other" / "p1.txt", alt.pose[1])
    np.savetxt(root / "other" / "e1.txt", alt.expression[1])
    write_png(root / "other" / "rgb1.png", alt.coarse[1])
    write_png(root / "other" / "nrm1.png", alt.normal[1])
    fid = t.ids[1]
    for rel in (
        f"{layout.POSE_DIR}/{fid}.txt",
        f"{layout.EXPRESSION_DIR}/{fid}.txt",
        f"{layout.STAGE1_RGB_DIR}/{fid}.png",
        f"{layout.STAGE1_NORMAL_DIR}/{fid}.png",
    ):
        (root / rel).unlink()  # the defaults are gone: only the overrides can be read
    doc = json.loads((root / layout.TRANSFORMS_FILE).read_text())
    doc["frames"][1].update(
        pose_path="other/p1.txt",
        exp_path="other/e1.txt",
        stage1_rgb_path="other/rgb1.png",
        stage1_normal_path="other/nrm1.png",
        file_path=f"images/{fid}",
    )  # NeRF style: no extension
    (root / layout.TRANSFORMS_FILE).write_text(json.dumps(doc))

    a = open_actor(root)
    a.validate()
    fb = a.read_frames([0, 1])
    np.testing.assert_array_equal(fb.real_rgb[1], t.real[1])
    np.testing.assert_array_equal(fb.coarse_rgb, np.stack([t.coarse[0], alt.coarse[1]]))
    np.testing.assert_array_equal(fb.coarse_normal, np.stack([t.normal[0], alt.normal[1]]))
    tr = a.tracking()
    np.testing.assert_array_equal(tr.pose[[0, 1]], np.stack([t.pose[0], alt.pose[1]]))
    np.testing.assert_array_equal(tr.expression[1], alt.expression[1])


# --------------------------------------------------------------------------------------------------
# Video layout: values
# --------------------------------------------------------------------------------------------------


def test_video_reads_frames_in_requested_order_within_codec_tolerance(tmp_path: Path) -> None:
    t = make_video_actor(tmp_path, "v", frames=8, h=48, w=64)
    a = open_actor(t.root)
    assert (a.name, a.kind) == ("v", "video")
    assert (a.num_frames, a.height, a.width) == (8, 48, 64)  # decord reads back every written frame
    a.validate()
    idx = [5, 1, 7, 1, 0]
    fb = a.read_frames(np.asarray(idx))
    _assert_batch(fb, 5, 48, 64)
    assert fb.indices.tolist() == idx
    _assert_video_frames(fb.real_rgb, t.real, idx)
    _assert_video_frames(fb.coarse_rgb, t.coarse, idx)
    _assert_video_frames(fb.coarse_normal, t.normal, idx)
    assert set(np.unique(fb.mask)) <= {0, 255}
    assert (fb.mask == t.mask[idx]).mean() > 0.97  # thresholded grey mask video
    tr = a.tracking()
    np.testing.assert_array_equal(tr.expression, t.expression)
    np.testing.assert_array_equal(tr.pose, t.pose)


def test_video_with_png_stage1_folders_json_tracking_and_no_mask(tmp_path: Path) -> None:
    t = make_video_actor(
        tmp_path, "v", frames=12, mask=False, stage1="png", png_name=lambda i: f"{i}.png", tracking="json"
    )
    a = open_actor(t.root)
    a.validate()
    idx = [10, 2, 11]  # natural order: 2.png < 10.png < 11.png
    fb = a.read_frames(idx)
    _assert_batch(fb, 3, 48, 64)
    np.testing.assert_array_equal(fb.coarse_rgb, t.coarse[idx])  # PNG: exact
    np.testing.assert_array_equal(fb.coarse_normal, t.normal[idx])
    assert (fb.mask == 255).all()  # no mask.mp4: all foreground
    _assert_video_frames(fb.real_rgb, t.real, idx)
    np.testing.assert_array_equal(a.tracking().expression, t.expression)
    np.testing.assert_array_equal(a.tracking().pose, t.pose)


# --------------------------------------------------------------------------------------------------
# Pickling, fingerprints, discovery
# --------------------------------------------------------------------------------------------------


def test_sources_survive_pickle_round_trip(tmp_path: Path) -> None:
    for a in (
        open_actor(make_insta_actor(tmp_path, "a").root),
        open_actor(make_video_actor(tmp_path, "v").root),
    ):
        first = a.read_frames([3, 1])  # decoders are open now; they must not travel
        b = pickle.loads(pickle.dumps(a))
        assert type(b) is type(a) and (b.name, b.kind, b.root, b.num_frames) == (
            a.name,
            a.kind,
            a.root,
            a.num_frames,
        )
        again = b.read_frames([3, 1])
        for f in ("real_rgb", "mask", "coarse_rgb", "coarse_normal"):
            np.testing.assert_array_equal(getattr(again, f), getattr(first, f))
        assert b.fingerprint() == a.fingerprint()
        np.testing.assert_array_equal(b.tracking().pose, a.tracking().pose)


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize(
    "rel",
    [
        "transforms.json",
        "images/00002.png",
        "flame/exp/00001.txt",
        "flame/pose/00004.txt",
        "stage1/rgb/00000.png",
        "stage1/normal/00003.png",
    ],
)
def test_insta_fingerprint_changes_when_any_input_is_touched(tmp_path: Path, rel: str) -> None:
    t = make_insta_actor(tmp_path, "a")
    fp = open_actor(t.root).fingerprint()
    assert open_actor(t.root).fingerprint() == fp  # stable
    _touch(t.root / rel)
    assert open_actor(t.root).fingerprint() != fp


def test_fingerprint_follows_content_not_location_or_unrelated_files(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path / "one", "a")
    a = open_actor(t.root)
    fp = a.fingerprint()
    a.read_frames([0, 1])
    a.validate()
    assert a.fingerprint() == fp  # reading changes nothing
    (t.root / "meshes").mkdir()
    (t.root / "meshes" / "00000.obj").write_text("v 0 0 0\n")  # INSTA output that ingest ignores
    assert a.fingerprint() == fp
    copy = shutil.copytree(t.root, tmp_path / "two" / "a")  # copy2 keeps sizes and mtimes
    assert open_actor(copy).fingerprint() == fp
    # a modified file with its old mtime restored still changes the fingerprint (size differs)
    p = t.root / layout.EXPRESSION_DIR / "00001.txt"
    st = p.stat()
    np.savetxt(p, np.zeros(100, np.float32), fmt="%.3f")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.fingerprint() != fp


def test_video_fingerprint_changes_on_touch_and_new_stage1_frame(tmp_path: Path) -> None:
    t = make_video_actor(tmp_path, "v", stage1="png")
    a = open_actor(t.root)
    fp = a.fingerprint()
    assert open_actor(t.root).fingerprint() == fp
    for rel in ("video.mp4", "mask.mp4", "tracking.npz", "stage1/rgb/00004.png"):
        _touch(t.root / rel)
        assert a.fingerprint() != fp, rel
        fp = a.fingerprint()
    write_png(t.root / layout.STAGE1_NORMAL_DIR / "00099.png", t.normal[0])
    assert a.fingerprint() != fp


def test_discover_actors_in_parent_folders(tmp_path: Path) -> None:
    parent = tmp_path / "sources"
    make_insta_actor(parent, "b")
    make_video_actor(parent, "a")
    make_insta_actor(parent, "c")
    make_insta_actor(parent, ".c.staging-1234")  # leftover of a killed run: hidden, skipped
    (parent / "notes").mkdir()  # not an actor folder: skipped
    (parent / "emotion_db.npz").write_bytes(b"x")  # files beside actors are ignored
    found = discover_actors([parent])
    assert [(x.name, x.kind) for x in found] == [("a", "video"), ("b", "insta"), ("c", "insta")]
    # an actor folder given directly, and the same actor twice, are fine
    other = tmp_path / "more"
    make_insta_actor(other, "d")
    assert [x.name for x in discover_actors([str(parent), parent / "b", other / "d"])] == ["a", "b", "c", "d"]
    assert [x.name for x in discover_actors(other / "d")] == ["d"]

    make_insta_actor(other, "b")
    with pytest.raises(
        ActorDataError, match=r"actor 'b': two actor sources have this name: .*sources/b and .*more/b"
    ):
        discover_actors([parent, other])
    with pytest.raises(ActorDataError, match=r"source path .*missing does not exist"):
        discover_actors([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ActorDataError, match=r"actor 'empty': .*empty is neither an actor folder"):
        discover_actors([tmp_path / "empty"])


def test_open_actor_rejects_unknown_and_ambiguous_layouts(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(
        ActorDataError, match=r"actor 'x': .*x is not an actor folder: it needs transforms\.json"
    ):
        open_actor(tmp_path / "x")
    t = make_insta_actor(tmp_path, "both")
    write_video(t.root / layout.VIDEO_FILE, t.real)
    with pytest.raises(ActorDataError, match=r"actor 'both': .* holds both transforms\.json and video\.mp4"):
        open_actor(t.root)
    assert issubclass(ActorDataError, ConsistentAvatarError)


# --------------------------------------------------------------------------------------------------
# Bad INSTA inputs
# --------------------------------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a PNG")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_frame(root: Path, i: int, **entry: object) -> None:
    doc = json.loads((root / layout.TRANSFORMS_FILE).read_text())
    doc["frames"][i] = entry
    (root / layout.TRANSFORMS_FILE).write_text(json.dumps(doc))


INSTA_BAD: list[tuple[str, Callable[[ActorTruth], None], str]] = [
    (
        "missing image",
        lambda t: (t.root / "images/00002.png").unlink(),
        r"actor 'a', frame 2: frame counts disagree: transforms\.json lists 5 frames but only 4 real frames "
        r"exist; first missing: .*images/00002\.png",
    ),
    (
        "missing normal",
        lambda t: (t.root / "stage1/normal/00004.png").unlink(),
        r"actor 'a', frame 4: frame counts disagree: transforms\.json lists 5 frames but only 4 stage-1 "
        r"normal maps exist; first missing: .*stage1/normal/00004\.png",
    ),
    (
        "missing rgb",
        lambda t: (t.root / "stage1/rgb/00000.png").unlink(),
        r"actor 'a', frame 0: .* only 4 stage-1 RGB renders exist; first missing: .*stage1/rgb/00000\.png",
    ),
    (
        "missing expression",
        lambda t: (t.root / "flame/exp/00003.txt").unlink(),
        r"actor 'a', frame 3: .* only 4 expression files exist; first missing: .*flame/exp/00003\.txt",
    ),
    (
        "corrupt image",
        lambda t: _corrupt(t.root / "images/00001.png"),
        r"actor 'a', frame 1: .*images/00001\.png is not a readable image",
    ),
    (
        "corrupt normal",
        lambda t: _corrupt(t.root / "stage1/normal/00003.png"),
        r"actor 'a', frame 3: .*stage1/normal/00003\.png is not a readable image",
    ),
    (
        "short expression",
        lambda t: np.savetxt(t.root / "flame/exp/00002.txt", np.zeros(50)),
        r"actor 'a', frame 2: .*flame/exp/00002\.txt holds 50 values, expected 100 \(100 FLAME expression",
    ),
    (
        "long pose",
        lambda t: np.savetxt(t.root / "flame/pose/00001.txt", np.zeros(7)),
        r"actor 'a', frame 1: .*flame/pose/00001\.txt holds 7 values, expected 6 \(6 pose values",
    ),
    (
        "nan expression",
        lambda t: np.savetxt(t.root / "flame/exp/00003.txt", np.where(np.arange(100) == 7, np.nan, 0.0)),
        r"actor 'a', frame 3: .*flame/exp/00003\.txt holds NaN at value 7",
    ),
    (
        "inf pose",
        lambda t: np.savetxt(t.root / "flame/pose/00000.txt", [0, 0, np.inf, 0, 0, 0]),
        r"actor 'a', frame 0: .*flame/pose/00000\.txt holds inf",
    ),
    (
        "float32 overflow",
        lambda t: np.savetxt(t.root / "flame/pose/00004.txt", [0, 0, 1e39, 0, 0, 0]),
        r"actor 'a', frame 4: .*flame/pose/00004\.txt holds inf \(or a value beyond float32\) at value 2",
    ),
    (
        "not a number",
        lambda t: (t.root / "flame/exp/00002.txt").write_text("0.5\nabc\n" + "0\n" * 98),
        r"actor 'a', frame 2: .*flame/exp/00002\.txt holds 'abc', which is not a number",
    ),
    (
        "small render",
        lambda t: write_png(t.root / "stage1/rgb/00002.png", np.zeros((16, 16, 3), np.uint8)),
        r"actor 'a', frame 2: image size mismatch: .*stage1/rgb/00002\.png is 16x16 px \(w x h\) but "
        r".*images/00000\.png \(frame 0\) is 32x24 px",
    ),
    (
        "frame size differs",
        lambda t: write_png(t.root / "images/00003.png", np.zeros((24, 30, 4), np.uint8)),
        r"actor 'a', frame 3: image size mismatch: .*images/00003\.png is 30x24 px",
    ),
    (
        "bad json",
        lambda t: (t.root / "transforms.json").write_text("{not json"),
        r"actor 'a': .*transforms\.json is not valid JSON",
    ),
    (
        "no frames",
        lambda t: (t.root / "transforms.json").write_text('{"frames": []}'),
        r"actor 'a': .*transforms\.json has no \"frames\" list",
    ),
    (
        "no file_path",
        lambda t: _set_frame(t.root, 3, exp_path="flame/exp/00003.txt"),
        r"actor 'a', frame 3: .*transforms\.json: frames\[3\] \"file_path\" is missing",
    ),
    (
        "bad override",
        lambda t: _set_frame(t.root, 1, file_path="images/00001.png", pose_path=5),
        r"actor 'a', frame 1: .*frames\[1\] \"pose_path\" is 5, not a path",
    ),
    (
        "override to missing file",
        lambda t: _set_frame(t.root, 2, file_path="images/00002.png", stage1_rgb_path="x/r.png"),
        r"actor 'a', frame 2: .*stage-1 RGB renders exist; first missing: .*x/r\.png",
    ),
]


@pytest.mark.parametrize("case", INSTA_BAD, ids=[c[0] for c in INSTA_BAD])
def test_bad_insta_input_is_named_by_actor_frame_and_file(tmp_path: Path, case) -> None:
    _, spoil, message = case
    t = make_insta_actor(tmp_path, "a")
    spoil(t)
    a = open_actor(t.root)
    with pytest.raises(ActorDataError, match=message):
        a.validate()


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in INSTA_BAD
        if c[0] in ("missing image", "missing normal", "corrupt image", "small render", "frame size differs")
    ],
    ids=lambda c: c[0],
)
def test_bad_insta_frame_also_fails_read_frames_with_its_index(tmp_path: Path, case) -> None:
    _, spoil, message = case
    t = make_insta_actor(tmp_path, "a")
    spoil(t)
    frame = int(message.split("frame ")[1].split(":")[0])
    a = open_actor(t.root)
    with pytest.raises(ActorDataError, match=rf"actor 'a', frame {frame}: ") as info:
        a.read_frames([frame])
    assert info.value.actor == "a" and info.value.frame == frame


def test_bad_tracking_also_fails_tracking(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path, "a")
    np.savetxt(t.root / "flame/exp/00002.txt", np.zeros(50))
    with pytest.raises(ActorDataError, match=r"actor 'a', frame 2: .*holds 50 values, expected 100"):
        open_actor(t.root).tracking()


def test_truncated_png_passes_header_checks_but_fails_decoding_with_its_frame(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path, "a")
    _truncate(t.root / "images/00003.png")
    a = open_actor(t.root)
    a.validate()  # headers only: cheap by design
    a.read_frames([0, 1, 2, 4])
    with pytest.raises(ActorDataError, match=r"actor 'a', frame 3: .*images/00003\.png cannot be decoded"):
        a.read_frames([1, 3])


def test_rgb_frames_without_masks_are_rejected(tmp_path: Path) -> None:
    t = make_insta_actor(tmp_path, "a", mask_mode="folder")
    (t.root / "masks/00002.png").unlink()
    write_png(t.root / "masks/00001.png", np.zeros((10, 10), np.uint8))
    a = open_actor(t.root)
    with pytest.raises(
        ActorDataError, match=r"actor 'a', frame 1: image size mismatch: .*masks/00001\.png is 10x10"
    ):
        a.validate()
    with pytest.raises(
        ActorDataError,
        match=r"actor 'a', frame 2: .*images/00002\.png has no alpha channel and "
        r".*masks/00002\.png does not exist: save the frame as RGBA",
    ):
        a.read_frames([2])
    write_png(t.root / "masks/00001.png", t.mask[1])
    with pytest.raises(ActorDataError, match=r"actor 'a', frame 2: .*has no alpha channel"):
        a.validate()


def test_out_of_range_and_non_integer_indices(tmp_path: Path) -> None:
    a = open_actor(make_insta_actor(tmp_path, "a").root)
    with pytest.raises(
        ActorDataError, match=r"actor 'a', frame 5: frame 5 does not exist: the actor has 5 frames"
    ):
        a.read_frames([0, 5])
    with pytest.raises(ActorDataError, match=r"actor 'a', frame -1: "):
        a.read_frames([-1])
    with pytest.raises(ActorDataError, match=r"frame indices must be a 1-D sequence of integers"):
        a.read_frames([0.5])


# --------------------------------------------------------------------------------------------------
# Bad video inputs
# --------------------------------------------------------------------------------------------------


def _savez(t: ActorTruth, **arrays: np.ndarray) -> None:
    np.savez(t.root / layout.TRACKING_NPZ, **{"expression": t.expression, "pose": t.pose, **arrays})


def _with_nan(arr: np.ndarray, row: int, col: int, value: float = np.nan) -> np.ndarray:
    out = arr.astype(np.float64).copy()
    out[row, col] = value
    return out


def _json_tracking(t: ActorTruth, pose: np.ndarray) -> None:
    (t.root / layout.TRACKING_NPZ).unlink()
    (t.root / layout.TRACKING_JSON).write_text(
        json.dumps({"expression": t.expression.tolist(), "pose": pose.tolist()})
    )


VIDEO_BAD: list[tuple[str, Callable[[ActorTruth], None], str]] = [
    (
        "junk video",
        lambda t: (t.root / "video.mp4").write_bytes(b"not a video at all"),
        r"actor 'v': video\.mp4 \(.*video\.mp4\) cannot be opened by decord/FFmpeg",
    ),
    (
        "short rgb video",
        lambda t: write_video(t.root / "stage1/rgb.mp4", t.coarse[:6]),
        r"actor 'v', frame 6: frame counts disagree: video\.mp4 has 8 frames but stage1/rgb\.mp4 has 6",
    ),
    (
        "long mask video",
        lambda t: write_video(t.root / "mask.mp4", np.concatenate([t.mask, t.mask[:2]])),
        r"actor 'v', frame 8: frame counts disagree: video\.mp4 has 8 frames but mask\.mp4 has 10",
    ),
    (
        "small normal video",
        lambda t: write_video(t.root / "stage1/normal.mp4", t.normal[:, :32, :40]),
        r"actor 'v', frame 0: image size mismatch: .*stage1/normal\.mp4 \(frame 0\) is 40x32 px "
        r"\(w x h\) but .*video\.mp4 \(frame 0\) is 64x48 px",
    ),
    (
        "short tracking",
        lambda t: _savez(t, expression=t.expression[:7], pose=t.pose[:7]),
        r"actor 'v', frame 7: frame counts disagree: tracking\.npz has 7 rows but video\.mp4 has 8 frames",
    ),
    (
        "expression vs pose rows",
        lambda t: _savez(t, pose=t.pose[:7]),
        r"actor 'v', frame 7: tracking\.npz has 8 expression rows but 7 pose rows",
    ),
    (
        "narrow expression",
        lambda t: _savez(t, expression=t.expression[:, :50]),
        r"actor 'v': tracking\.npz 'expression' has shape \(8, 50\), expected \(K, 100\)",
    ),
    (
        "wide pose",
        lambda t: _savez(t, pose=np.zeros((8, 7))),
        r"actor 'v': tracking\.npz 'pose' has shape \(8, 7\), expected \(K, 6\)",
    ),
    (
        "nan expression",
        lambda t: _savez(t, expression=_with_nan(t.expression, 3, 11)),
        r"actor 'v', frame 3: tracking\.npz 'expression' holds NaN at value 11 of frame 3",
    ),
    (
        "inf pose json",
        lambda t: _json_tracking(t, _with_nan(t.pose, 5, 2, np.inf)),
        r"actor 'v', frame 5: tracking\.json 'pose' holds inf",
    ),
    (
        "npz without pose",
        lambda t: np.savez(t.root / "tracking.npz", expression=t.expression),
        r"actor 'v': .*tracking\.npz has arrays \['expression'\] but lacks \['pose'\]",
    ),
    (
        "no tracking",
        lambda t: (t.root / "tracking.npz").unlink(),
        r"actor 'v': no tracking file: write .*tracking\.npz",
    ),
    (
        "two tracking files",
        lambda t: (t.root / "tracking.json").write_text("{}"),
        r"actor 'v': both .*tracking\.npz and .*tracking\.json exist",
    ),
    (
        "two rgb sources",
        lambda t: write_png(t.root / "stage1/rgb/00000.png", t.coarse[0]),
        r"actor 'v': both .*stage1/rgb\.mp4 and the folder .*stage1/rgb exist",
    ),
    (
        "no normals",
        lambda t: (t.root / "stage1/normal.mp4").unlink(),
        r"actor 'v': neither .*stage1/normal\.mp4 nor a folder .*stage1/normal/\*\.png exists",
    ),
]


@pytest.mark.parametrize("case", VIDEO_BAD, ids=[c[0] for c in VIDEO_BAD])
def test_bad_video_input_is_named_by_actor_frame_and_part(tmp_path: Path, case) -> None:
    _, spoil, message = case
    t = make_video_actor(tmp_path, "v")
    spoil(t)
    with pytest.raises(ActorDataError, match=message):
        open_actor(t.root).validate()


def test_count_mismatch_also_fails_read_frames(tmp_path: Path) -> None:
    t = make_video_actor(tmp_path, "v")
    write_video(t.root / "stage1/rgb.mp4", t.coarse[:6])
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 6: frame counts disagree: .*stage1/rgb\.mp4 has 6"
    ):
        open_actor(t.root).read_frames([0])


def test_bad_png_stage1_folders_name_the_frame(tmp_path: Path) -> None:
    t = make_video_actor(tmp_path, "v", stage1="png")
    (t.root / "stage1/normal/00007.png").unlink()
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 7: .*video\.mp4 has 8 frames but stage1/normal/ has 7"
    ):
        open_actor(t.root).validate()
    write_png(t.root / "stage1/normal/00007.png", t.normal[7])
    write_png(t.root / "stage1/rgb/00005.png", t.coarse[5][:20])
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 5: image size mismatch: .*stage1/rgb/00005\.png is 64x20"
    ):
        open_actor(t.root).validate()
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 5: image size mismatch: .*stage1/rgb/00005\.png"
    ):
        open_actor(t.root).read_frames([5])
    write_png(t.root / "stage1/rgb/00005.png", t.coarse[5])
    _corrupt(t.root / "stage1/rgb/00002.png")
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 2: .*stage1/rgb/00002\.png is not a readable image"
    ):
        open_actor(t.root).validate()
    write_png(t.root / "stage1/rgb/00002.png", t.coarse[2])
    _truncate(t.root / "stage1/normal/00006.png")
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 6: .*stage1/normal/00006\.png cannot be decoded"
    ):
        open_actor(t.root).read_frames([4, 6])


def test_damaged_video_frame_is_reported_by_index(tmp_path: Path) -> None:
    t = make_video_actor(tmp_path, "v")
    path = t.root / "video.mp4"
    data = path.read_bytes()
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    assert 0 < mdat < moov  # mp4v from OpenCV: frames first, index (moov) last
    cut = mdat + (moov - mdat) * 2 // 3  # zero the last third of the frame data, keep the index
    path.write_bytes(data[:cut] + b"\0" * (moov - 8 - cut) + data[moov - 8 :])
    a = open_actor(t.root)
    a.validate()  # the header and frame 0 are fine
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame (\d+): video\.mp4 \(.*\): frame \1 cannot be decoded"
    ) as info:
        a.read_frames(range(8))
    bad = info.value.frame
    assert bad is not None and 0 < bad < 8
    # The frames before it still decode. The frame just before the first failing one may hold the cut
    # itself, which FFmpeg conceals instead of failing on, so it is not compared.
    fb = a.read_frames(range(bad - 1))
    _assert_video_frames(fb.real_rgb, t.real, list(range(bad - 1)))


def test_decord_row_padding_bug_is_explained(tmp_path: Path) -> None:
    t = make_video_actor(tmp_path, "v", w=48)
    with pytest.raises(
        ActorDataError, match=r"actor 'v', frame 0: video\.mp4 .*decord 0\.6 cannot copy frames of this width"
    ):
        open_actor(t.root).validate()


# --------------------------------------------------------------------------------------------------
# Synthetic actors (consistent_avatar.synthetic) in both layouts
# --------------------------------------------------------------------------------------------------


def test_synthetic_actor_ingests_in_both_layouts(tmp_path: Path) -> None:
    from consistent_avatar.synthetic import SynthConfig, synthesize_actors, write_video_actor

    (insta_dir,) = synthesize_actors(tmp_path / "insta", SynthConfig(actors=1, frames=6, res=64))
    write_video_actor(insta_dir, tmp_path / "video" / "actor_000_video")
    insta, video = discover_actors([tmp_path / "insta", tmp_path / "video"])
    assert (insta.kind, video.kind) == ("insta", "video") and insta.name == "actor_000"
    for a in (insta, video):
        a.validate()
        assert (a.num_frames, a.height, a.width) == (6, 64, 64)
    idx = list(range(6))
    fi, fv = insta.read_frames(idx), video.read_frames(idx)
    assert 0 < (fi.mask > 0).mean() < 1  # a head in front of a background
    assert (fv.mask == np.where(fi.mask > 127, 255, 0)).mean() > 0.97
    for f in ("real_rgb", "coarse_rgb", "coarse_normal"):
        _assert_video_frames(getattr(fv, f), getattr(fi, f), idx, distinct=False)  # slow head motion
    ti, tv = insta.tracking(), video.tracking()
    np.testing.assert_array_equal(ti.expression, tv.expression)
    np.testing.assert_array_equal(ti.pose, tv.pose)
    np.testing.assert_array_equal(
        ti.expression[2], np.loadtxt(insta_dir / "flame/exp/00002.txt", dtype=np.float32)
    )
