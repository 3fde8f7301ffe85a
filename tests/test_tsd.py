"""TSD (eq. 2–3): the FFT high-pass against a literal numpy implementation, its frequency behaviour,
the resolution rule, the fixed VAE normalisation and its 8-bit storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consistent_avatar.errors import ConsistentAvatarError
from consistent_avatar.tsd import (
    TSDConfig,
    _keep_mask,
    high_pass,
    temporally_sensitive_detail,
    tsd_from_uint8,
    tsd_from_vae,
    tsd_radius,
    tsd_to_uint8,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_high_pass(images: np.ndarray, radius: float) -> np.ndarray:
    """The paper's recipe, literally: fft2, fftshift, zero the disc |k - centre| <= r, ifftshift,
    ifft2, real part (float64, one image and channel at a time)."""
    b, c, h, w = images.shape
    yy, xx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    inside = np.hypot(yy, xx) <= radius
    out = np.empty((b, c, h, w), np.float64)
    for i in range(b):
        for j in range(c):
            spec = np.fft.fftshift(np.fft.fft2(images[i, j].astype(np.float64)))
            spec[inside] = 0
            out[i, j] = np.real(np.fft.ifft2(np.fft.ifftshift(spec)))
    return out


def cosine(h: int, w: int, ky: int, kx: int, amp: float = 1.0, phase: float = 0.3) -> np.ndarray:
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return amp * np.cos(2 * np.pi * (ky * y / h + kx * x / w) + phase)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(2, 33),
    w=st.integers(2, 33),
    radius=st.floats(0.0, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
@example(b=1, c=1, h=16, w=16, radius=5.0, seed=0)  # (3, 4) lies exactly on the circle: inclusive disc
@example(b=1, c=2, h=9, w=12, radius=1.0, seed=1)  # odd/even sizes, ring |k| = 1 on the boundary
def test_high_pass_matches_numpy_reference(b: int, c: int, h: int, w: int, radius: float, seed: int) -> None:
    x = np.random.default_rng(seed).random((b, c, h, w))
    ref = reference_high_pass(x, radius)
    np.testing.assert_allclose(high_pass(torch.from_numpy(x), radius).numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(high_pass(torch.from_numpy(x).float(), radius).numpy(), ref, atol=2e-6)


def test_low_frequency_content_is_removed() -> None:
    h = w = 64
    radius = 5.0
    img = 0.4 + cosine(h, w, 3, 2, 0.2) + cosine(h, w, 0, 5, 0.1) + cosine(h, w, -4, 3, 0.05)  # all |k| <= 5
    out = high_pass(torch.from_numpy(img)[None, None].float(), radius)
    assert float(out.abs().max()) < 1e-5


@pytest.mark.parametrize(("ky", "kx"), [(0, 6), (4, 4), (-5, 3), (20, 31), (32, 0)])
def test_high_frequency_pattern_is_kept(ky: int, kx: int) -> None:
    h = w = 64
    pattern = cosine(h, w, ky, kx, 0.3)
    img = 0.5 + pattern  # the constant (DC) goes, the pattern (|k| > 5) stays
    out = high_pass(torch.from_numpy(img)[None, None].float(), 5.0)[0, 0].numpy()
    np.testing.assert_allclose(out, pattern, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(a=st.floats(-3, 3), b=st.floats(-3, 3), radius=st.floats(0, 12), seed=st.integers(0, 2**31 - 1))
def test_raw_high_pass_is_linear(a: float, b: float, radius: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = (torch.from_numpy(rng.standard_normal((2, 3, 24, 20))) for _ in range(2))
    lhs = high_pass(a * x + b * y, radius)
    rhs = a * high_pass(x, radius) + b * high_pass(y, radius)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)


def test_batch_equals_per_image_loop() -> None:
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (5, 3, 48, 40), dtype=np.uint8))
    cfg = TSDConfig(reference_resolution=64)
    batched = temporally_sensitive_detail(x, cfg)
    looped = torch.cat([temporally_sensitive_detail(x[i : i + 1], cfg) for i in range(len(x))])
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=0)


def test_radius_scales_with_resolution() -> None:
    assert tsd_radius(512, 512) == 10.0
    assert tsd_radius(128, 128) == 2.5
    assert tsd_radius(256, 512) == 5.0  # the shorter side sets the scale
    assert tsd_radius(1024, 1024, TSDConfig(omega=8, reference_resolution=256)) == 32.0
    assert tsd_radius(64, 64, TSDConfig(omega=0)) == 0.0


@pytest.mark.parametrize("res", [64, 128, 256, 512])
def test_cutoff_is_the_same_band_at_every_resolution(res: int) -> None:
    """ω = 10 at 512² removes 10 cycles/image and keeps 11; at res N the cutoff is 10·N/512 cycles,
    so a pattern just inside the scaled radius goes and one just outside stays."""
    r = tsd_radius(res, res)
    inside, outside = int(np.floor(r)), int(np.floor(r)) + 1
    img = np.stack([cosine(res, res, 0, inside, 0.2), cosine(res, res, outside, 0, 0.2)])[:, None]
    out = high_pass(torch.from_numpy(img), r).numpy()
    assert np.abs(out[0]).max() < 1e-9
    np.testing.assert_allclose(out[1], img[1], atol=1e-9)


def test_radius_zero_removes_only_the_mean() -> None:
    x = torch.from_numpy(np.random.default_rng(1).random((1, 1, 16, 16)))
    torch.testing.assert_close(high_pass(x, 0.0), x - x.mean())


def test_normalisation_is_fixed_clamped_gain_and_invertible() -> None:
    rng = np.random.default_rng(7)
    pattern = cosine(64, 64, 9, 13, 1.0)[None]
    base = np.clip(0.5 + 0.05 * pattern + 0.02 * rng.standard_normal((3, 64, 64)), 0, 1)
    x = torch.from_numpy(base[None]).float()
    cfg = TSDConfig()
    raw = high_pass(x, tsd_radius(64, 64, cfg))
    out = temporally_sensitive_detail(x, cfg)
    torch.testing.assert_close(out, (cfg.gain * raw).clamp(-1, 1))
    assert float(out.abs().max()) < 1.0  # this mild image does not saturate
    torch.testing.assert_close(tsd_from_vae(out, cfg), raw, atol=1e-6, rtol=0)
    # Fixed mapping: doubling a frame's detail doubles its map (no per-image rescaling) ...
    doubled = temporally_sensitive_detail(0.5 + 2 * (x - 0.5), cfg)
    torch.testing.assert_close(doubled, 2 * out, atol=1e-5, rtol=0)
    # ... and a strong edge saturates at exactly ±1 instead of rescaling the frame.
    edge = torch.zeros(1, 1, 64, 64)
    edge[..., 20:44, 20:44] = 1.0
    e = temporally_sensitive_detail(edge, TSDConfig(gain=50.0))
    assert float(e.max()) == 1.0 and float(e.min()) == -1.0


def test_uint8_input_means_0_255() -> None:
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    from_u8 = temporally_sensitive_detail(u8)
    from_float = temporally_sensitive_detail(u8.float() / 255)
    assert from_u8.dtype == torch.float32
    torch.testing.assert_close(from_u8, from_float)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_device_and_dtype_follow_the_input(device: str, dtype: torch.dtype) -> None:
    x64 = torch.from_numpy(np.random.default_rng(2).random((2, 3, 32, 32)))
    x = x64.to(device=device, dtype=dtype)
    out = temporally_sensitive_detail(x)
    assert out.device.type == device and out.dtype == dtype and out.shape == x.shape
    ref = temporally_sensitive_detail(x.to("cpu", torch.float64))
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=0)


def test_masks_are_cached() -> None:
    x = torch.rand(1, 3, 40, 36)
    high_pass(x, 3.25)
    hits = _keep_mask.cache_info().hits
    high_pass(x, 3.25)
    assert _keep_mask.cache_info().hits == hits + 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_uint8_round_trip_error_is_at_most_half_a_level(seed: int) -> None:
    x = torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32))
    u8 = tsd_to_uint8(x)
    assert u8.dtype == torch.uint8
    assert float((tsd_from_uint8(u8) - x).abs().max()) <= 1 / 255 + 1e-6
    xn = x.numpy()
    un = tsd_to_uint8(xn)
    assert un.dtype == np.uint8 and np.array_equal(un, u8.numpy())
    assert np.abs(tsd_from_uint8(un) - xn).max() <= 1 / 255 + 1e-6


def test_uint8_endpoints_and_saturation() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, -3.0, 3.0])
    assert tsd_to_uint8(x).tolist() == [0, 128, 255, 0, 255]
    assert tsd_from_uint8(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(3, 16, 16), "got 3 dims"),
        (torch.rand(1, 1, 3, 16, 16), "got 5 dims"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN or inf"),
        (torch.tensor([[[[0.5, float("inf")]]]]), "NaN or inf"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "uint8 .* or floating"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.bool), "uint8 .* or floating"),
        (torch.full((1, 3, 8, 8), 200.0), r"in \[0, 1\]"),
        (torch.full((1, 3, 8, 8), -1.0), r"in \[0, 1\]"),
        (np.zeros((1, 3, 8, 8), np.float32), "torch.Tensor"),
    ],
)
def test_bad_images_are_rejected(images, match: str) -> None:
    with pytest.raises(ConsistentAvatarError, match=match):
        temporally_sensitive_detail(images)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ConsistentAvatarError, match="radius"):
        high_pass(torch.rand(1, 1, 8, 8), -1.0)
    with pytest.raises(ConsistentAvatarError, match="floating"):
        high_pass(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 1.0)
    with pytest.raises(ConsistentAvatarError, match="omega"):
        TSDConfig(omega=-1)
    with pytest.raises(ConsistentAvatarError, match="gain"):
        TSDConfig(gain=0)
    with pytest.raises(ConsistentAvatarError, match="reference_resolution"):
        TSDConfig(reference_resolution=0)
    with pytest.raises(ConsistentAvatarError, match="NaN or inf"):
        tsd_to_uint8(torch.tensor([float("nan")]))
    with pytest.raises(ConsistentAvatarError, match="uint8"):
        tsd_from_uint8(torch.zeros(3))
    with pytest.raises(ConsistentAvatarError, match="uint8"):
        tsd_from_uint8(np.zeros(3, np.int16))
