"""The synthetic actor generator: determinism, image outputs, stage-1 degradation, emotions, layout."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from consistent_avatar.data import layout
from consistent_avatar.errors import ActorDataError, ConsistentAvatarError
from consistent_avatar.synthetic import (
    EMOTION_PROFILES,
    Expr,
    FrameRenderer,
    HeadModel,
    HeadRenderer,
    Stage1Degradation,
    SynthConfig,
    actor_emotion_schedule,
    actor_motion,
    decode_normals,
    emotion_prototypes,
    frame_rng,
    sample_identity,
    sample_mead_expressions,
    synthesize_actors,
    write_video_actor,
)
from consistent_avatar.synthetic.emotions import NUM_SEMANTIC_DIMS, SEMANTIC_RANGE

RES = 64


def _render_sequence(res: int, frames: int, degradation: float, seed: int = 0, index: int = 0):
    deg = Stage1Degradation.from_strength(degradation)
    motion = actor_motion(seed, index, frames, 25.0, deg)
    renderer = FrameRenderer(sample_identity(motion.identity_seed), res, deg)
    outs = [renderer.render(motion.expression[i], motion.pose[i], motion.coarse_expression[i], motion.coarse_pose[i],
                            frame_rng(seed, index, i)) for i in range(frames)]
    return motion, outs


def _laplacian_energy(rgb: np.ndarray, mask: np.ndarray) -> float:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lap = cv2.Laplacian(grey, cv2.CV_32F)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return float((lap[inner] ** 2).mean())


@pytest.fixture(scope="module")
def sequence():
    return _render_sequence(RES, 12, 1.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(actors=2, frames=6, res=32, seed=3)
    return root, cfg, synthesize_actors(root, cfg)


# ---- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"res": 8}, "res"),
        ({"res": 1024}, "res"),
        ({"frames": 0}, "frames"),
        ({"actors": 0}, "actors"),
        ({"degradation": -0.5}, "degradation"),
        ({"degradation": float("nan")}, "degradation"),
        ({"fps": 0}, "fps"),
        ({"seed": -1}, "seed"),
        ({"resolution": 64}, "resolution"),
    ],
)
def test_invalid_config_says_what_to_fix(kwargs, names):
    with pytest.raises(ConsistentAvatarError) as err:
        SynthConfig(**kwargs)
    assert names in str(err.value)
    assert "set " in str(err.value) or "remove it" in str(err.value)


def test_config_defaults_and_parse():
    cfg = SynthConfig()
    assert (cfg.actors, cfg.frames, cfg.res, cfg.seed, cfg.degradation, cfg.fps) == (3, 120, 128, 0, 1.0, 25.0)
    assert SynthConfig.parse({"res": 32}).res == 32
    with pytest.raises(ConsistentAvatarError):
        SynthConfig.parse([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConsistentAvatarError, match="workers"):
        synthesize_actors("/nonexistent-never-written", cfg, workers=0)


# ---- determinism and identity ---------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_identity(tmp_path):
    cfg = SynthConfig(actors=1, frames=3, res=32, seed=11)
    a = synthesize_actors(tmp_path / "a", cfg)[0]
    b = synthesize_actors(tmp_path / "b", cfg)[0]
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 * 5 + 2
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = synthesize_actors(tmp_path / "c", SynthConfig(actors=1, frames=3, res=32, seed=12))[0]
    assert (a / "images/00000.png").read_bytes() != (c / "images/00000.png").read_bytes()
    ta, tc = (json.loads((x / layout.SYNTHETIC_TRUTH_FILE).read_text()) for x in (a, c))
    assert ta["identity"] != tc["identity"]
    assert sample_identity(5) == sample_identity(5) != sample_identity(6)


# ---- per-frame outputs ------------------------------------------------------------------------------


def test_frame_outputs_shapes_ranges_mask_and_normals(sequence):
    _, outs = sequence
    for o in outs:
        for img in (o.rgb, o.normal, o.coarse_rgb, o.coarse_normal):
            assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
        for m in (o.mask, o.coarse_mask):
            assert m.shape == (RES, RES) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
        fg = o.mask > 0
        assert 0.15 < fg.mean() < 0.85  # a head, not an empty or full frame
        assert o.rgb[~fg].max() == 0 and o.rgb[fg].mean() > 40
        for normal, mask in ((o.normal, fg), (o.coarse_normal, o.coarse_mask > 0)):
            n = decode_normals(normal)[mask]
            assert np.abs(np.linalg.norm(n, axis=1) - 1).max() < 0.03
            assert (n[:, 2] > -0.02).all()  # visible surfaces face the camera
            assert normal[~mask].max() == 0


def test_stage1_loses_detail_and_flickers(sequence):
    _, outs = sequence
    both = [(o.mask > 0) & (o.coarse_mask > 0) for o in outs]
    real_hf = np.mean([_laplacian_energy(o.rgb, m) for o, m in zip(outs, both)])
    coarse_hf = np.mean([_laplacian_energy(o.coarse_rgb, m) for o, m in zip(outs, both)])
    assert coarse_hf < 0.5 * real_hf
    real_flicker = np.mean([np.abs(b.rgb.astype(np.float32) - a.rgb).mean() for a, b in zip(outs, outs[1:])])
    coarse_flicker = np.mean([np.abs(b.coarse_rgb.astype(np.float32) - a.coarse_rgb).mean() for a, b in zip(outs, outs[1:])])
    assert coarse_flicker > 1.5 * real_flicker


def test_stage1_codes_are_perturbed_but_close(sequence):
    motion, _ = sequence
    err = np.abs(motion.coarse_expression[:, :NUM_SEMANTIC_DIMS] - motion.expression[:, :NUM_SEMANTIC_DIMS])
    assert 0.01 < err.mean() < 0.25
    rot_err = np.abs(motion.coarse_pose[:, :3] - motion.pose[:, :3])
    assert 1e-4 < rot_err.mean() < 0.05
    # the per-frame part of the error is independent between frames (flicker, not drift)
    step = np.diff(motion.coarse_expression[:, Expr.JAW_OPEN] - motion.expression[:, Expr.JAW_OPEN])
    assert step.std() > 0.02


def test_degradation_zero_equals_real_and_strength_is_monotone():
    motion0, outs0 = _render_sequence(48, 3, 0.0)
    np.testing.assert_array_equal(motion0.coarse_expression, motion0.expression)
    np.testing.assert_array_equal(motion0.coarse_pose, motion0.pose)
    for o in outs0:
        np.testing.assert_array_equal(o.coarse_rgb, o.rgb)
        np.testing.assert_array_equal(o.coarse_normal, o.normal)
    energies = []
    for strength in (0.0, 1.0, 2.0):
        _, outs = _render_sequence(48, 3, strength)
        energies.append(np.mean([_laplacian_energy(o.coarse_rgb, o.coarse_mask > 0) for o in outs]))
    assert energies[0] > energies[1] > energies[2]
    with pytest.raises(ConsistentAvatarError):
        Stage1Degradation.from_strength(-1)


def test_every_semantic_dim_and_pose_changes_the_render():
    model = HeadModel(sample_identity(1), 256)
    renderer = HeadRenderer(model, 64)
    zero_e, zero_p = np.zeros(100, np.float32), np.zeros(6, np.float32)
    base = renderer.render(zero_e, zero_p)
    for dim in Expr:
        e = zero_e.copy()
        e[dim] = SEMANTIC_RANGE[dim][1]
        diff = np.abs(renderer.render(e, zero_p).rgb - base.rgb).mean()
        assert diff > 1e-3, dim.name
    e = zero_e.copy()
    e[50:] = 0.5  # plain noise dims carry no rendered meaning
    np.testing.assert_array_equal(renderer.render(e, zero_p).rgb, base.rgb)
    # translation +x moves the head right
    moved = renderer.render(zero_e, np.array([0, 0, 0, 0.02, 0, 0], np.float32))
    cols = np.arange(64)
    assert (moved.mask.sum(0) * cols).sum() / moved.mask.sum() > (base.mask.sum(0) * cols).sum() / base.mask.sum() + 2
    # rotation: paint the face's vertical midline (phi ~ 0) and horizontal equator (theta ~ 0) white;
    # +ry turns the face towards image right, +rx nods it down
    pad = 2
    h, w = model.albedo.shape[0], model.albedo.shape[1] - 2 * pad
    phi = ((np.arange(w) + 0.5) / w * 2 - 1) * np.pi
    theta = (0.5 - (np.arange(h) + 0.5) / h) * np.pi
    for pose, axis, sign in (([0, 0.3, 0], 1, 1), ([0.3, 0, 0], 0, 1)):
        tex = np.full_like(model.albedo, 60)
        if axis == 1:
            tex[:, pad:-pad][:, np.abs(phi) < 0.08] = 255
        else:
            tex[np.abs(theta) < 0.08, pad:-pad] = 255
        coord = np.arange(64)
        centres = []
        for rot in ([0, 0, 0], pose):
            img = renderer.render(zero_e, np.array([*rot, 0, 0, 0], np.float32), albedo=tex, wrinkles=False).rgb
            band = img.min(-1) > 0.7
            centres.append((band.sum(1 - axis) * coord).sum() / band.sum())
        assert sign * (centres[1] - centres[0]) > 3, (pose, centres)
    with pytest.raises(ConsistentAvatarError, match="expression"):
        renderer.render(np.zeros(99), zero_p)
    with pytest.raises(ConsistentAvatarError, match="pose"):
        renderer.render(zero_e, np.full(6, np.nan))


# ---- emotions -----------------------------------------------------------------------------------------


def test_emotion_schedule_covers_emotions_and_shapes_expressions():
    motion = actor_motion(0, 0, 240, 25.0, Stage1Degradation.from_strength(1.0))
    labels = np.asarray(motion.labels)
    assert set(labels) == set(layout.EMOTIONS)
    mean = {e: motion.expression[labels == e].mean(0) for e in layout.EMOTIONS}
    assert mean["happy"][Expr.SMILE] > mean["sad"][Expr.SMILE] + 0.5
    assert mean["surprised"][Expr.BROW_RAISE] > mean["neutral"][Expr.BROW_RAISE] + 0.4
    assert mean["angry"][Expr.BROW_FROWN] > mean["happy"][Expr.BROW_FROWN] + 0.4
    assert mean["disgusted"][Expr.NOSE_WRINKLE] > mean["neutral"][Expr.NOSE_WRINKLE] + 0.4
    assert motion.expression[:, Expr.JAW_OPEN].std() > 0.05  # talking
    assert motion.expression.dtype == np.float32 and motion.expression.shape == (240, 100)
    assert list(EMOTION_PROFILES) == list(layout.EMOTIONS)
    assert emotion_prototypes().shape == (8, 100)


def test_synthetic_mead_labels_transfer_to_actors():
    x, labels, sources = sample_mead_expressions(num_speakers=4, clips_per_emotion=2, frames_per_clip=20, seed=7)
    assert x.shape == (4 * 8 * 2 * 20, 100) and x.dtype == np.float32
    assert len(labels) == len(sources) == len(x) and set(labels) == set(layout.EMOTIONS)
    assert sources[0] == "synthetic-mead/spk00/angry/clip01"
    y, _, _ = sample_mead_expressions(num_speakers=4, clips_per_emotion=2, frames_per_clip=20, seed=7)
    np.testing.assert_array_equal(x, y)
    # label actor frames by cosine nearest neighbour in the database (eq. 7 of the paper)
    motion = actor_motion(0, 1, 240, 25.0, Stage1Degradation.from_strength(1.0))
    db = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = motion.expression / np.linalg.norm(motion.expression, axis=1, keepdims=True)
    predicted = np.asarray(labels)[(q @ db.T).argmax(1)]
    accuracy = (predicted == np.asarray(motion.labels)).mean()
    assert accuracy > 0.6, accuracy
    with pytest.raises(ConsistentAvatarError):
        sample_mead_expressions(num_speakers=0)


# ---- the written INSTA layout ---------------------------------------------------------------------------


def test_written_layout_matches_spec(written):
    root, cfg, paths = written
    assert [p.name for p in paths] == ["actor_000", "actor_001"]
    for index, actor in enumerate(paths):
        tf = json.loads((actor / layout.TRANSFORMS_FILE).read_text())
        for key in ("w", "h", "fl_x", "fl_y", "cx", "cy", "camera_angle_x", "camera_angle_y"):
            assert key in tf
        assert tf["w"] == tf["h"] == cfg.res and len(tf["frames"]) == cfg.frames
        truth = json.loads((actor / layout.SYNTHETIC_TRUTH_FILE).read_text())
        assert truth["seed"] == cfg.seed and truth["config"] == cfg.model_dump() and truth["version"]
        assert truth["emotions"] == actor_emotion_schedule(cfg, index)
        assert len(truth["emotions"]) == cfg.frames and set(truth["emotions"]) <= set(layout.EMOTIONS)
        assert truth["degradation"]["strength"] == cfg.degradation
        motion = actor_motion(cfg.seed, index, cfg.frames, cfg.fps, Stage1Degradation.from_strength(cfg.degradation))
        for i, frame in enumerate(tf["frames"]):
            fid = f"{i:05d}"
            assert frame["file_path"] == f"images/{fid}.png"
            assert np.asarray(frame["transform_matrix"]).shape == (4, 4)
            img = cv2.imread(str(actor / frame["file_path"]), cv2.IMREAD_UNCHANGED)
            assert img.shape == (cfg.res, cfg.res, 4) and img.dtype == np.uint8
            assert 0 < (img[..., 3] > 127).mean() < 1
            exp = np.loadtxt(actor / frame["exp_path"])
            pose = np.loadtxt(actor / layout.POSE_DIR / f"{fid}.txt")
            assert exp.shape == (100,) and pose.shape == (6,)
            np.testing.assert_array_equal(exp.astype(np.float32), motion.expression[i])  # true codes, exactly
            np.testing.assert_array_equal(pose.astype(np.float32), motion.pose[i])
            assert not np.allclose(exp, truth["stage1_codes"]["expression"][i])
            for folder in (layout.STAGE1_RGB_DIR, layout.STAGE1_NORMAL_DIR):
                s1 = cv2.imread(str(actor / folder / f"{fid}.png"), cv2.IMREAD_UNCHANGED)
                assert s1.shape == (cfg.res, cfg.res, 3)
        for folder in (layout.IMAGES_DIR, layout.EXPRESSION_DIR, layout.POSE_DIR, layout.STAGE1_RGB_DIR, layout.STAGE1_NORMAL_DIR):
            assert len(list((actor / folder).iterdir())) == cfg.frames
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_existing_actor_is_kept_and_changed_settings_rewrite(tmp_path):
    root, cfg = tmp_path, SynthConfig(actors=2, frames=4, res=32, seed=5)
    paths = synthesize_actors(root, cfg)
    stamp = {p: (p / layout.SYNTHETIC_TRUTH_FILE).stat().st_mtime_ns for p in paths}
    again = synthesize_actors(root, SynthConfig(**{**cfg.model_dump(), "actors": 3}))
    assert len(again) == 3 and (root / "actor_002" / layout.TRANSFORMS_FILE).is_file()
    assert all((p / layout.SYNTHETIC_TRUTH_FILE).stat().st_mtime_ns == stamp[p] for p in paths)
    synthesize_actors(root, SynthConfig(**{**cfg.model_dump(), "actors": 1, "degradation": 0.5}))
    truth = json.loads((paths[0] / layout.SYNTHETIC_TRUTH_FILE).read_text())
    assert truth["degradation"]["strength"] == 0.5
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = FrameRenderer.render

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FrameRenderer, "render", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthesize_actors(tmp_path, SynthConfig(actors=1, frames=5, res=32))
    assert list(tmp_path.iterdir()) == []


def test_parallel_workers_match_serial(written, tmp_path):
    root, cfg, paths = written
    par = synthesize_actors(tmp_path, SynthConfig(**{**cfg.model_dump(), "actors": 2}), workers=2)
    for a, b in zip(paths, par):
        for rel in ("images/00005.png", "stage1/rgb/00002.png", "flame/exp/00003.txt", layout.SYNTHETIC_TRUTH_FILE):
            assert (a / rel).read_bytes() == (b / rel).read_bytes()


# ---- the video layout -------------------------------------------------------------------------------------


def test_write_video_actor_round_trip(written, tmp_path):
    from decord import VideoReader, cpu

    _, cfg, paths = written
    dst = write_video_actor(paths[0], tmp_path / "actor_000")
    for name in (layout.VIDEO_FILE, layout.MASK_VIDEO_FILE, layout.STAGE1_RGB_VIDEO, layout.STAGE1_NORMAL_VIDEO):
        vr = VideoReader(str(dst / name), ctx=cpu(0))
        assert len(vr) == cfg.frames and vr[0].shape == (cfg.res, cfg.res, 3)
    track = np.load(dst / layout.TRACKING_NPZ)
    assert track["expression"].shape == (cfg.frames, 100) and track["pose"].shape == (cfg.frames, 6)
    np.testing.assert_array_equal(track["expression"][2], np.loadtxt(paths[0] / "flame/exp/00002.txt").astype(np.float32))
    mask = VideoReader(str(dst / layout.MASK_VIDEO_FILE), ctx=cpu(0))[1].asnumpy()[..., 0] > 127
    alpha = cv2.imread(str(paths[0] / "images/00001.png"), cv2.IMREAD_UNCHANGED)[..., 3] > 127
    assert (mask == alpha).mean() > 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ActorDataError, match="transforms.json"):
        write_video_actor(tmp_path / "nothing-here", tmp_path / "out")


def test_video_layout_rejects_odd_sizes(tmp_path):
    actor = synthesize_actors(tmp_path / "src", SynthConfig(actors=1, frames=2, res=33))[0]
    with pytest.raises(ActorDataError, match="even"):
        write_video_actor(actor, tmp_path / "dst")
    assert not Path(tmp_path / "dst").exists()
