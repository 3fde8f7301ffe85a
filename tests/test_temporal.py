"""Temporal consistency: optical-flow curves on sequences with known motion, flicker, RAFT loading."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from scipy.ndimage import gaussian_filter

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.evaluation.image import Unavailable
from consistent_avatar.evaluation.temporal import (
    RAFT_WEIGHT_FILES,
    FarnebackFlow,
    RAFTFlow,
    farneback_flow,
    flicker,
    flow_magnitude_curve,
    temporal_consistency,
)


def _texture(h: int = 112, w: int = 144, seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture (blurred noise, contrast stretched), uint8."""
    rng = np.random.default_rng(seed)
    t = np.stack([gaussian_filter(rng.standard_normal((h, w)), 2.5) for _ in range(3)], -1)
    t = (t - t.min()) / (t.max() - t.min())
    return (t * 235 + 10).astype(np.uint8)


def _moving(dx: int, dy: int, n: int = 5, size: int = 64) -> np.ndarray:
    """Frames of a window over a fixed texture; the *content* moves by (dx, dy) px per frame."""
    tex = _texture()
    y0, x0 = 24, 40
    return np.stack([tex[y0 - k * dy: y0 - k * dy + size, x0 - k * dx: x0 - k * dx + size] for k in range(n)])


def _interior(n: int, size: int = 64, border: int = 10) -> np.ndarray:
    m = np.zeros((n, size, size), bool)
    m[:, border:-border, border:-border] = True
    return m


def test_farneback_recovers_a_known_translation() -> None:
    frames = _moving(dx=2, dy=0)
    flow = farneback_flow(frames)
    assert flow.shape == (4, 64, 64, 2) and flow.dtype == np.float32
    inner = flow[:, 10:-10, 10:-10]
    assert inner[..., 0].mean() == pytest.approx(2.0, abs=0.2)  # +x: content moves right
    assert abs(inner[..., 1].mean()) < 0.2
    curve = flow_magnitude_curve(flow, _interior(5))  # per-frame masks: union per pair
    np.testing.assert_allclose(curve, 2.0, atol=0.25)

    up = farneback_flow(_moving(dx=0, dy=-2))  # content moves up: flow y = -2 (image y points down)
    assert up[:, 10:-10, 10:-10, 1].mean() == pytest.approx(-2.0, abs=0.2)
    assert abs(up[:, 10:-10, 10:-10, 0].mean()) < 0.2


def test_flow_magnitude_curve_by_hand() -> None:
    flow = np.zeros((2, 4, 4, 2), np.float32)
    flow[0, ..., 0], flow[0, ..., 1] = 3.0, 4.0  # |(3, 4)| = 5 everywhere
    flow[1, 0, 0] = (6.0, 8.0)  # one pixel of 16 moves by 10
    np.testing.assert_allclose(flow_magnitude_curve(flow), [5.0, 10 / 16])
    pair_mask = np.zeros((2, 4, 4), bool)
    pair_mask[1, 0, :2] = True
    out = flow_magnitude_curve(flow, pair_mask)
    assert np.isnan(out[0]) and out[1] == pytest.approx(5.0)  # (10 + 0) / 2; empty pair → NaN
    with pytest.raises(ConsistentAvatarError):
        flow_magnitude_curve(np.zeros((2, 4, 4)))


def test_flicker_by_hand() -> None:
    real = np.zeros((3, 1, 2, 3), np.float64)
    rend = np.zeros_like(real)
    rend[1, 0, 0] = 0.1  # rendered pixel blinks: D = +0.1 then -0.1, real static → 0.01 / 2 pixels
    real[1, 0, 1], rend[1, 0, 1] = 0.2, 0.1  # rendered moves less than real at pixel 2: not flicker
    np.testing.assert_allclose(flicker(rend, real), [0.005, 0.005], atol=1e-15)


def test_flicker_zero_for_the_truth_and_static_errors_positive_for_noise() -> None:
    real = _moving(dx=1, dy=1)
    assert np.array_equal(flicker(real, real), np.zeros(4))
    offset = (real.astype(np.int16) + 7).clip(0, 255).astype(np.uint8)  # a static error (no clipping: 10..245)
    assert np.array_equal(flicker(offset, real), np.zeros(4))
    rng = np.random.default_rng(0)
    noisy = (real.astype(np.int16) + rng.normal(0, 6, real.shape).round()).clip(0, 255).astype(np.uint8)
    f = flicker(noisy, real)
    assert (f > 0).all()
    gain = np.stack([(x.astype(np.float64) * g).clip(0, 255).astype(np.uint8) for x, g in zip(real, [1, 1.08, 0.95, 1.05, 1])])
    assert flicker(gain, real).min() > 1e-4  # brightness flicker


def test_temporal_consistency_of_truth_noise_and_a_frozen_video() -> None:
    real = _moving(dx=2, dy=0)
    same = temporal_consistency(real, real, estimator=FarnebackFlow())
    assert same["estimator"] == "farneback" and same["curve_mad"] == 0.0 and same["flicker_mean"] == 0.0
    assert same["real_mean_motion"] == pytest.approx(2.0, abs=0.35)
    frozen = np.repeat(real[:1], len(real), axis=0)
    out = temporal_consistency(frozen, real)
    assert out["flicker_mean"] == 0.0  # one-sided: moving less is not flicker ...
    assert out["rendered_mean_motion"] < 0.05 and out["curve_mad"] > 1.5  # ... the flow curves show it
    assert out["rendered_curve"].shape == out["real_curve"].shape == out["curve_abs_diff"].shape == (4,)


def test_raft_unavailable_without_weights_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    raft = RAFTFlow()
    assert not raft.available and str(tmp_path / "hub" / "checkpoints" / "raft_small_C_T_V2-01064c6d.pth") in raft.reason
    assert "raft_large_C_T_SKHT_V2-ff5fadd5.pth" in RAFTFlow("large").reason
    assert "/given.pth" in RAFTFlow(weights=tmp_path / "given.pth").reason
    real = _moving(dx=1, dy=0, n=3)
    out = temporal_consistency(real, real, estimator=raft)
    assert isinstance(out["curve_mad"], Unavailable) and isinstance(out["rendered_curve"], Unavailable)
    assert out["flicker_mean"] == 0.0  # flicker needs no flow


def test_raft_weight_file_names_are_torchvision_s() -> None:
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

    assert RAFT_WEIGHT_FILES["small"] == Raft_Small_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    assert RAFT_WEIGHT_FILES["large"] == Raft_Large_Weights.DEFAULT.url.rsplit("/", 1)[-1]


def test_raft_loading_path_with_random_weights(tmp_path, monkeypatch) -> None:
    """LOADING test only: randomly initialised raft_small weights under torchvision's file name in a
    temporary TORCH_HOME; the flow values mean nothing, only shapes and loading are checked."""
    import torch
    import torch.hub
    from torchvision.models.optical_flow import raft_small

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    torch.manual_seed(0)
    state = raft_small(weights=None).state_dict()
    ckpt = tmp_path / "hub" / "checkpoints" / RAFT_WEIGHT_FILES["small"]
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)
    raft = RAFTFlow(torch_home=tmp_path, device="cpu", num_flow_updates=2)
    assert raft.available
    frames = _moving(dx=1, dy=0, n=3)[:, :36, :44]  # not a multiple of 8, smaller than RAFT's minimum
    flow = raft(frames)
    assert flow.shape == (2, 36, 44, 2) and np.isfinite(flow).all()
    loaded = raft.load().state_dict()
    torch.testing.assert_close(loaded["feature_encoder.convnormrelu.0.weight"], state["feature_encoder.convnormrelu.0.weight"])


def test_long_uint8_videos_are_measured_without_float64_copies_of_the_whole_video() -> None:
    """Flicker, the uint8 view the flow estimators take and the flow curve work pair by pair: the
    memory they allocate does not grow with the video (a 350-frame 512² video is 275 MB as uint8
    but 2.2 GB per float64 copy)."""
    import tracemalloc

    from consistent_avatar.evaluation.temporal import _frames_u8

    rng = np.random.default_rng(0)
    n = 80
    a = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    flow = rng.standard_normal((n - 1, 96, 96, 2)).astype(np.float32)
    video = a.nbytes
    for fn in (lambda: flicker(a, b), lambda: flicker(a, b, _interior(n, 96)), lambda: _frames_u8(a),
               lambda: flow_magnitude_curve(flow, _interior(n, 96))):
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2 * video, f"{peak} bytes allocated for a {video}-byte video (a float64 copy is 8×)"
    # and the values are the whole-video formulas'
    d = (np.diff(a.astype(np.int64), axis=0) ** 2).sum(-1) - (np.diff(b.astype(np.int64), axis=0) ** 2).sum(-1)
    np.testing.assert_allclose(flicker(a, b), np.maximum(d, 0).reshape(n - 1, -1).mean(1) / (3 * 255.0**2), rtol=1e-12)
    m = _interior(n, 96)
    pm = m[:-1] | m[1:]
    mag = np.sqrt((flow.astype(np.float64) ** 2).sum(-1))
    np.testing.assert_allclose(flow_magnitude_curve(flow, m), (mag * pm).reshape(n - 1, -1).sum(1) / pm.reshape(n - 1, -1).sum(1),
                               rtol=1e-12)
    assert _frames_u8(a) is a or np.array_equal(_frames_u8(a), a)


def test_auto_flow_takes_raft_only_when_its_weights_are_on_disk(tmp_path, monkeypatch) -> None:
    from torchvision.models.optical_flow import raft_small

    from consistent_avatar.evaluation.temporal import FarnebackFlow, choose_flow

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    flow, note = choose_flow("auto", device="cpu")
    assert isinstance(flow, FarnebackFlow) and RAFT_WEIGHT_FILES["small"] in note and note.startswith("auto: Farneback")
    flow, note = choose_flow("raft", device="cpu")  # asked for RAFT: no fallback, reported unavailable
    assert isinstance(flow, RAFTFlow) and not flow.available
    assert isinstance(choose_flow("farneback")[0], FarnebackFlow)
    ckpt = tmp_path / "hub" / "checkpoints" / RAFT_WEIGHT_FILES["small"]
    ckpt.parent.mkdir(parents=True)
    torch.save(raft_small(weights=None).state_dict(), ckpt)  # random weights: a loading test only
    flow, note = choose_flow("auto", device="cpu")
    assert isinstance(flow, RAFTFlow) and flow.available and str(ckpt) in note
    ckpt.write_bytes(b"not a checkpoint")  # there but unloadable: auto keeps the flow metrics with Farneback
    flow, note = choose_flow("auto", device="cpu")
    assert isinstance(flow, FarnebackFlow) and "could not load" in note
    with pytest.raises(ConsistentAvatarError, match="flow method"):
        choose_flow("lucas-kanade")
