"""Image metrics (L2, PSNR, SSIM, LPIPS), aggregation and emotion accuracy against hand-computed values."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.evaluation import aggregate as agg
from consistent_avatar.evaluation import image
from consistent_avatar.evaluation.emotion import emotion_accuracy, shard_emotion_accuracy, true_emotions
from consistent_avatar.evaluation.image import LPIPSMetric, MetricUnavailableError, Unavailable


def _pair_2x2() -> tuple[np.ndarray, np.ndarray]:
    """Three 2×2 frames with known differences against an all-black real frame."""
    real = np.zeros((3, 2, 2, 3), np.uint8)
    pred = real.copy()
    pred[0, 0, 0] = 255  # one of four pixels fully white: per-pixel error 1 → L2 = 1/4
    pred[1, :, :, 0] = 51  # 0.2 in the red channel everywhere: (0.2² / 3) = 0.04 / 3
    return pred, real  # frame 2 identical


def test_l2_and_psnr_by_hand() -> None:
    pred, real = _pair_2x2()
    np.testing.assert_allclose(image.l2(pred, real), [0.25, 0.04 / 3, 0.0], rtol=1e-12)
    p = image.psnr(pred, real)
    np.testing.assert_allclose(p[:2], [10 * math.log10(4), 10 * math.log10(75)], rtol=1e-12)  # 6.02 dB, 18.75 dB
    assert p[2] == math.inf


def test_masked_l2_psnr_and_empty_mask() -> None:
    pred, real = _pair_2x2()
    mask = np.zeros((3, 2, 2), np.uint8)
    mask[0, 0, 0] = 255  # only the white pixel
    mask[1, 1, :] = 255  # bottom row: same error as everywhere
    l2 = image.l2(pred, real, mask)
    assert l2[0] == pytest.approx(1.0) and l2[1] == pytest.approx(0.04 / 3)
    assert np.isnan(l2[2])  # no foreground
    p = image.psnr(pred, real, mask.astype(bool))
    assert p[0] == pytest.approx(0.0) and np.isnan(p[2])


def test_float_inputs_match_uint8_and_bad_inputs_are_explained() -> None:
    pred, real = _pair_2x2()
    np.testing.assert_allclose(image.l2(pred / 255.0, real.astype(np.float32) / 255), image.l2(pred, real), rtol=1e-6)
    with pytest.raises(ConsistentAvatarError, match="in 0..1"):
        image.l2(pred.astype(np.float32), real.astype(np.float32))  # 0..255 floats
    with pytest.raises(ConsistentAvatarError, match="differ in shape"):
        image.l2(pred, real[:2])
    with pytest.raises(ConsistentAvatarError, match=r"\(N, H, W, 3\)"):
        image.psnr(pred[0], real[0])
    # bf16 tensors (a GPU pipeline's output) are accepted: numpy has no bfloat16.
    import torch

    bf = torch.from_numpy(pred / 255.0).to(torch.bfloat16)
    np.testing.assert_allclose(image.l2(bf, real), image.l2(bf.float().numpy(), real), rtol=1e-6)


def test_ssim_identical_constant_and_skimage_reference() -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(image.ssim(a, a), [1.0, 1.0], atol=1e-12)

    # Constant images: the structure term is C2/C2, so SSIM = (2·μx·μy + C1) / (μx² + μy² + C1).
    x = np.full((1, 16, 16, 3), 51, np.uint8)  # 0.2
    y = np.full((1, 16, 16, 3), 102, np.uint8)  # 0.4
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.4 + c1) / (0.2**2 + 0.4**2 + c1)  # 0.80009995
    assert image.ssim(x, y)[0] == pytest.approx(expected, abs=1e-9)

    # A textured case against scikit-image called directly with the documented settings.
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    ref = [structural_similarity(a[i] / 255.0, b[i] / 255.0, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False) for i in range(2)]
    np.testing.assert_allclose(image.ssim(a, b), ref, rtol=1e-10)
    full = np.ones(a.shape[:3], bool)
    np.testing.assert_allclose(image.ssim(a, b, full), ref, rtol=1e-10)  # a full mask changes nothing


def test_masked_ssim_ignores_the_background() -> None:
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    pred = real.copy()
    pred[:, :, 24:] = rng.integers(0, 256, (1, 32, 24, 3), dtype=np.uint8)  # right half wrong
    mask = np.zeros((1, 32, 48), bool)
    mask[:, :, :19] = True  # every 11-px window centred here sees only the identical left half
    assert image.ssim(pred, real)[0] < 0.8
    assert image.ssim(pred, real, mask)[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ConsistentAvatarError, match="at least 11"):
        image.ssim(real[:, :8, :8], real[:, :8, :8])


# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------


def test_lpips_backbone_file_names_are_torchvision_s() -> None:
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    for net, w in (("alex", AlexNet_Weights.DEFAULT), ("vgg", VGG16_Weights.DEFAULT), ("squeeze", SqueezeNet1_1_Weights.DEFAULT)):
        assert image.LPIPS_BACKBONE_FILES[net] == w.url.rsplit("/", 1)[-1]


def test_lpips_unavailable_without_backbone_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = LPIPSMetric()
    expected = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert metric.available is False
    assert str(expected) in metric.reason and "TORCH_HOME" in metric.reason
    a = np.zeros((1, 32, 32, 3), np.uint8)
    result = metric.compute(a, a)
    assert isinstance(result, Unavailable) and result.metric == "lpips" and str(expected) in result.reason
    with pytest.raises(MetricUnavailableError, match="alexnet-owt-7be5be79.pth"):
        metric(a, a)
    vgg = LPIPSMetric(net="vgg", torch_home=tmp_path / "elsewhere")
    assert "vgg16-397923af.pth" in vgg.reason and str(tmp_path / "elsewhere") in vgg.reason


def _no_downloads(monkeypatch) -> None:
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse, raising=False)


def test_lpips_loading_path_with_a_random_backbone(tmp_path, monkeypatch) -> None:
    """LOADING test only: the backbone file holds randomly initialised AlexNet weights, saved under
    torchvision's file name in a temporary TORCH_HOME. The values are not LPIPS quality figures."""
    import torch
    from torchvision.models import alexnet

    _no_downloads(monkeypatch)
    torch.manual_seed(0)
    state = alexnet(weights=None).state_dict()
    ckpt = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)

    metric = LPIPSMetric(torch_home=tmp_path, device="cpu", batch_size=2)
    assert metric.available and metric.reason is None
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    b = a.copy()
    b[1:] = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    d = metric(a, b)
    assert d.shape == (3,) and d[0] == pytest.approx(0.0, abs=1e-7) and (d[1:] > 0).all()
    import lpips

    with torch.no_grad():  # lpips's own image conversion ([0, 255] HWC → [-1, 1] NCHW), one pair at a time
        ref = [float(metric.load()(lpips.im2tensor(x), lpips.im2tensor(y))) for x, y in zip(a, b)]
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-7)  # batching, scaling and layout are lpips's
    net = metric.load().net  # the saved tensors, not a fresh random init
    torch.testing.assert_close(getattr(net.slice1, "0").weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(net.slice5, "10").bias, state["features.10.bias"])
    assert metric.backbone_verified is False  # random weights do not match torchvision's published hash
    assert metric.describe()["backbone_sha256_matches_torchvision"] is False
    m = np.zeros((3, 64, 64), bool)
    np.testing.assert_allclose(metric(a, b, m), 0.0, atol=1e-7)  # everything masked out: both black


def test_lpips_foreign_checkpoint_is_unavailable_not_random(tmp_path) -> None:
    import torch

    ckpt = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(3)}, ckpt)
    metric = LPIPSMetric(torch_home=tmp_path, device="cpu")
    a = np.zeros((1, 32, 32, 3), np.uint8)
    result = metric.compute(a, a)
    assert isinstance(result, Unavailable) and "could not load" in result.reason
    assert metric.available is False


def test_evaluation_package_import_is_light() -> None:
    import subprocess

    code = ("import sys, consistent_avatar.evaluation as e; heavy = [m for m in ('torch', 'lpips', 'skimage', 'cv2') "
            "if m in sys.modules]; print(heavy); assert callable(e.l2)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


def test_finite_mean_and_summary_count_what_they_leave_out() -> None:
    assert agg.finite_mean([1.0, math.inf, 3.0, math.nan]) == 2.0
    assert agg.finite_mean([math.inf, math.inf]) == math.inf  # every frame identical
    assert math.isnan(agg.finite_mean([math.nan])) and math.isnan(agg.finite_mean([]))
    s = agg.summarize(np.array([30.0, math.inf, 34.0, math.nan]))
    assert (s["mean"], s["min"], s["max"], s["n"], s["n_finite"], s["n_inf"], s["n_nan"]) == (32.0, 30.0, 34.0, 4, 2, 1, 1)
    assert agg.group_means([1, 2, 3, math.inf], ["a", "b", "a", "b"]) == {"a": 2.0, "b": 2.0}
    rows = [{"actor": "a", "frame": 0, "psnr": 30.0}, {"actor": "a", "frame": 1, "psnr": math.inf},
            {"actor": "b", "frame": 0, "psnr": 20.0, "l2": 0.01}]
    assert agg.mean_by(rows) == {"a": {"psnr": 30.0, "l2": pytest.approx(math.nan, nan_ok=True)},
                                 "b": {"psnr": 20.0, "l2": 0.01}}


def test_aggregate_actors_means_of_actor_means_and_unavailable() -> None:
    lp = Unavailable("lpips", "no weights")
    out = agg.aggregate_actors({
        "a": {"psnr": np.array([30.0, 32.0, math.inf]), "lpips": lp},
        "b": {"psnr": np.array([20.0]), "lpips": lp},
    })
    assert out["actors"]["a"]["psnr"]["mean"] == 31.0 and out["actors"]["a"]["psnr"]["n_inf"] == 1
    o = out["overall"]["psnr"]
    assert o["mean"] == 25.5  # (31 + 20) / 2: each actor weighs the same
    assert o["frame_mean"] == pytest.approx((30 + 32 + 20) / 3) and o["n_inf"] == 1 and o["n_actors"] == 2
    assert out["overall"]["lpips"] == lp and out["actors"]["b"]["lpips"] == lp
    text = json.dumps(agg.jsonable(out), allow_nan=False)  # strict JSON
    assert '"n_inf": 1' in text and '"reason": "no weights"' in text
    assert agg.jsonable({"x": np.array([1.0, math.inf, math.nan])}) == {"x": [1.0, "inf", "nan"]}


# ----------------------------------------------------------------------------------------------
# emotion accuracy
# ----------------------------------------------------------------------------------------------


def test_emotion_accuracy_by_hand() -> None:
    r = emotion_accuracy(["happy", "happy", "sad", "angry"], ["happy", "sad", "sad", "sad"])
    assert r["accuracy"] == 0.5 and r["n_frames"] == 4
    assert r["per_emotion"]["sad"] == {"n": 3, "recall": pytest.approx(1 / 3)}
    assert r["per_emotion"]["happy"]["recall"] == 1.0 and math.isnan(r["per_emotion"]["fear"]["recall"])
    labels = r["labels"]
    assert r["confusion"][labels.index("sad")][labels.index("happy")] == 1
    with pytest.raises(ConsistentAvatarError):
        emotion_accuracy(["happy"], ["happy", "sad"])


def _hand_made_shards(root, actor: str, source) -> None:
    (root / "actors" / actor).mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "actors": {actor: {}}}))
    table = pa.table({"actor": [actor] * 4, "frame": pa.array([0, 1, 2, 3], pa.int32()),
                      "split": ["train", "train", "test", "test"], "emotion": ["happy", "sad", "sad", "angry"]})
    pq.write_table(table, root / "actors" / actor / "part-00000.parquet")
    (root / "actors" / actor / "_actor.json").write_text(json.dumps({"source": {"kind": "insta", "root": str(source)}}))


def test_shard_emotion_accuracy_against_synthetic_truth(tmp_path) -> None:
    synth, real = tmp_path / "src" / "actor_000", tmp_path / "src" / "real_actor"
    synth.mkdir(parents=True)
    real.mkdir(parents=True)
    (synth / "synthetic.json").write_text(json.dumps({"emotions": ["happy", "happy", "sad", "sad"]}))
    assert true_emotions(synth) == ["happy", "happy", "sad", "sad"]
    _hand_made_shards(tmp_path / "shards", "actor_000", synth)
    everything = shard_emotion_accuracy(tmp_path / "shards", "actor_000")
    assert everything["accuracy"] == 0.5 and everything["n_frames"] == 4
    test = shard_emotion_accuracy(tmp_path / "shards", "actor_000", split="test")
    assert test["accuracy"] == 0.5 and test["n_frames"] == 2 and test["split"] == "test"
    none = shard_emotion_accuracy(tmp_path / "shards", "actor_000", actor_dir=real)
    assert isinstance(none, Unavailable) and "synthetic.json" in none.reason
