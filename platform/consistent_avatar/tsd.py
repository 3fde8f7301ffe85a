"""Temporally-Sensitive Detail (TSD), paper eq. 2–3: the part of an image above a radial frequency cutoff.

Why: the details that flicker between frames of a coarse avatar (skin texture, contours of the mouth,
eyes and brows) live at high spatial frequencies; the smooth shading does not. Removing every
frequency within radius ω of DC leaves a detail map that stage 2 (TSDM) learns to stabilise.

The map, step by step (``high_pass``)::

    F = fftshift(fft2(I))                       per image and channel
    F[k] = 0  for every bin k with |k - centre| <= r     (a disc, inclusive, in frequency-index units:
                                                          bin (i, j) of the shifted spectrum is at
                                                          (i - H//2, j - W//2) from the DC bin)
    TSD = real(ifft2(ifftshift(F)))

Implementation: ``rfft2``/``irfft2`` with the same disc laid out in unshifted order. Shifting is a
permutation and the disc is symmetric under k -> -k, so the masked spectrum stays Hermitian and this
is exactly the real part of the full-FFT recipe above, at half the cost (the tests compare it with a
literal ``np.fft`` implementation). Masks are cached per (H, W, radius, device, dtype).

Radius rule: the paper fixes ω = 10 at 512². A cutoff is a number of cycles per image, so to keep
the same *physical* detail band at other sizes the radius scales with resolution::

    r = omega * min(H, W) / reference_resolution          (defaults: omega = 10, reference 512)

(r = 2.5 at 128², 1.25 at 64²). r = 0 still removes DC (the inclusive disc holds the DC bin).

Input convention (``temporally_sensitive_detail``): RGB (or any C) images ``(B, C, H, W)``, either
``uint8`` in 0..255 or floating point in [0, 1] (values outside [-0.5, 1.5] are rejected as a wrong
convention, e.g. 0..255 floats or [-1, 1] images). ``high_pass`` itself is the raw linear map on any
finite floating tensor.

Normalisation for the VAE (stage 2 diffuses TSD maps through an SD VAE, which expects [-1, 1])::

    x = clamp(gain * TSD, -1, 1)                          (default gain = 2.0)

It is a fixed, per-dataset mapping, never a per-image rescale: a per-frame max-normalisation would
change a frame's scale with its content and inject exactly the flicker TSD is meant to expose.
A clamp keeps the map linear (and exactly invertible, ``tsd_from_vae``) everywhere but the rare
saturated extremes, where a tanh would bend every value.

Why gain 2: TSD of a [0, 1] image is zero-mean and heavy-tailed (sparse edges). Measured at 512²,
ω = 10 (``python -m consistent_avatar.tsd`` repeats the measurement):

    images (512²)                                |TSD| p50   p99    p99.9   max    clipped at gain 2 / 3 / 4
    synthetic actor frames (real + coarse, 16)   0.016     0.26   0.46    0.80   0.05 % / 0.5 % / 1.2 %
    procedural 1/f noise + shapes (8)            0.063     0.35   0.46    0.72   0.04 % / 1.4 % / 5.4 %

With gain 2 the faces' p99 lands at ~0.53 and p99.9 at ~0.91 of the range, and fewer than 0.1 % of
the values clip; gain 4 would clip over 1 % (5 % of strongly textured images), gain 1 would leave
99 % of the faces' detail within ±0.27 (fewer than 70 of the 256 PNG levels).

Storage: the shards keep a normalised TSD map as an 8-bit PNG, ``u8 = round((x + 1) * 127.5)``
(``tsd_to_uint8``), read back with ``x = u8 / 127.5 - 1`` (``tsd_from_uint8``), the same [-1, 1]
convention the VAE encoder is fed with; round-trip error <= 1/255.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConsistentAvatarError

DEFAULT_OMEGA = 10.0
DEFAULT_REFERENCE_RESOLUTION = 512
DEFAULT_GAIN = 2.0
# Float images must be in [0, 1]; this margin tolerates resampling overshoot but not other conventions.
FLOAT_RANGE = (-0.5, 1.5)

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


class TSDConfig(BaseModel):
    """How TSD maps are computed and normalised (see the module docstring for the rules)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    omega: float = Field(
        DEFAULT_OMEGA,
        ge=0.0,
        allow_inf_nan=False,
        description="cutoff radius in frequency bins at reference_resolution (paper: 10)",
    )
    reference_resolution: int = Field(
        DEFAULT_REFERENCE_RESOLUTION,
        gt=0,
        description="image side (pixels) at which omega applies (paper: 512)",
    )
    gain: float = Field(
        DEFAULT_GAIN,
        gt=0.0,
        allow_inf_nan=False,
        description="fixed scale of the VAE normalisation x = clamp(gain * TSD, -1, 1)",
    )

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConsistentAvatarError(
                "invalid TSD config: "
                + " | ".join(
                    f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
                )
            ) from None


def tsd_radius(h: int, w: int, cfg: TSDConfig | None = None) -> float:
    """Cutoff radius (frequency bins) for an ``h``×``w`` image: ω · min(h, w) / reference_resolution."""
    cfg = cfg or TSDConfig()
    if h < 1 or w < 1:
        raise ConsistentAvatarError(f"TSD needs images of at least 1×1 pixels, got {h}×{w}")
    return cfg.omega * min(h, w) / cfg.reference_resolution


@functools.lru_cache(maxsize=64)
def _keep_mask(h: int, w: int, radius: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W//2+1) real mask in rfft2 layout: 0 inside the disc |k| <= radius around DC, 1 outside."""
    ky = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)  # signed frequency index per row
    kx = torch.fft.rfftfreq(w, d=1.0 / w, dtype=torch.float64)  # 0..W//2 per rfft column
    dist = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    keep = (dist > radius).to(dtype)
    return keep.to(device)


def _check_images(images: Any, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ConsistentAvatarError(
            f"{what}: expected a torch.Tensor (B, C, H, W), got {type(images).__name__}"
        )
    if images.ndim != 4:
        raise ConsistentAvatarError(
            f"{what}: expected images shaped (B, C, H, W), got {images.ndim} dims {tuple(images.shape)}; "
            "add a batch dim with images[None] or move channels first with permute(0, 3, 1, 2)"
        )
    if images.shape[-1] < 1 or images.shape[-2] < 1:
        raise ConsistentAvatarError(f"{what}: images must be at least 1×1 pixels, got {tuple(images.shape)}")
    return images


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ConsistentAvatarError(f"{what}: images contain NaN or inf values; fix the source frames")


def high_pass(images: torch.Tensor, radius: float) -> torch.Tensor:
    """The raw TSD map (linear): remove every frequency within ``radius`` bins of DC, per channel.

    ``images``: floating ``(B, C, H, W)`` on any device. Returns the same shape, dtype and device
    (float16/bfloat16 are computed in float32, float64 in float64).
    """
    x = _check_images(images, "high_pass")
    if not x.is_floating_point():
        raise ConsistentAvatarError(
            f"high_pass: expected a floating tensor, got {x.dtype}; convert with .float() "
            "(or use temporally_sensitive_detail, which accepts uint8 images)"
        )
    if isinstance(radius, bool) or not (
        isinstance(radius, numbers.Real) and math.isfinite(radius) and radius >= 0
    ):
        raise ConsistentAvatarError(f"high_pass: radius must be a finite number >= 0, got {radius!r}")
    _check_finite(x, "high_pass")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h, w = x.shape[-2:]
    keep = _keep_mask(int(h), int(w), float(radius), x.device, compute)
    spectrum = torch.fft.rfft2(x.to(compute))
    out = torch.fft.irfft2(spectrum * keep, s=(h, w))
    return out.to(x.dtype)


def _to_unit_float(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise ConsistentAvatarError(
            f"{what}: images must be uint8 (0..255) or floating point in [0, 1], got {images.dtype}"
        )
    _check_finite(images, what)
    if images.numel():
        lo, hi = torch.aminmax(images)
        if float(lo) < FLOAT_RANGE[0] or float(hi) > FLOAT_RANGE[1]:
            raise ConsistentAvatarError(
                f"{what}: float images must be in [0, 1], got values in [{float(lo):.3g}, {float(hi):.3g}]; "
                "divide 0..255 images by 255 (or pass uint8), map [-1, 1] images with (x + 1) / 2"
            )
    return images


def temporally_sensitive_detail(images: torch.Tensor, cfg: TSDConfig | None = None) -> torch.Tensor:
    """TSD maps normalised for the VAE: ``clamp(gain * high_pass(I, r), -1, 1)``.

    ``images``: ``(B, C, H, W)`` uint8 (0..255) or float in [0, 1]. Returns float32 for uint8 input,
    otherwise the input's floating dtype, on the input's device.
    """
    cfg = cfg or TSDConfig()
    x = _to_unit_float(_check_images(images, "temporally_sensitive_detail"), "temporally_sensitive_detail")
    radius = tsd_radius(int(x.shape[-2]), int(x.shape[-1]), cfg)
    return (high_pass(x, radius) * cfg.gain).clamp_(-1.0, 1.0)


def tsd_from_vae(x: torch.Tensor, cfg: TSDConfig | None = None) -> torch.Tensor:
    """Invert the normalisation: the raw TSD (in [0, 1]-image units) from a VAE-range map.

    Exact where the map was not saturated; values at ±1 are lower bounds of the true magnitude.
    """
    cfg = cfg or TSDConfig()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConsistentAvatarError(
            f"tsd_from_vae: expected a floating torch.Tensor, got {getattr(x, 'dtype', type(x))}"
        )
    _check_finite(x, "tsd_from_vae")
    return x.clamp(-1.0, 1.0) / cfg.gain


def tsd_to_uint8(x: ArrayT) -> ArrayT:
    """A normalised TSD map ([-1, 1], torch or numpy, any shape) as 8-bit: round((x + 1) * 127.5)."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ConsistentAvatarError(f"tsd_to_uint8: expected a floating array in [-1, 1], got {x.dtype}")
        if not np.isfinite(x).all():
            raise ConsistentAvatarError("tsd_to_uint8: the TSD map contains NaN or inf values")
        return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConsistentAvatarError(
            f"tsd_to_uint8: expected a floating tensor in [-1, 1], got {getattr(x, 'dtype', type(x))}"
        )
    _check_finite(x, "tsd_to_uint8")
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def tsd_from_uint8(u8: ArrayT) -> ArrayT:
    """Read an 8-bit TSD map back to [-1, 1] float32: u8 / 127.5 - 1 (torch or numpy)."""
    if isinstance(u8, np.ndarray):
        if u8.dtype != np.uint8:
            raise ConsistentAvatarError(f"tsd_from_uint8: expected uint8, got {u8.dtype}")
        return u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if not isinstance(u8, torch.Tensor) or u8.dtype != torch.uint8:
        raise ConsistentAvatarError(
            f"tsd_from_uint8: expected a uint8 tensor or array, got {getattr(u8, 'dtype', type(u8))}"
        )
    return u8.to(torch.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------
# The gain measurement quoted in the module docstring.
# ------------------------------------------------------------------------------------------------


def procedural_textures(n: int, res: int, seed: int = 0) -> np.ndarray:
    """(n, res, res, 3) uint8 textured images: 1/f colour noise (natural-image spectrum) plus
    random filled shapes with hard edges, the two ingredients of a face photo's detail."""
    import cv2

    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(res)[:, None]
    fx = np.fft.fftfreq(res)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / res)
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        spec = amp[..., None] * np.exp(2j * np.pi * rng.random((res, res, 3)))
        noise = np.real(np.fft.ifft2(spec, axes=(0, 1)))
        noise = 0.5 + 0.18 * noise / noise.std()
        img = np.clip(noise, 0, 1)
        for _ in range(12):
            colour = tuple(float(c) for c in rng.random(3))
            centre = tuple(int(c) for c in rng.integers(0, res, 2))
            axes = tuple(int(a) for a in rng.integers(res // 32, res // 4, 2))
            cv2.ellipse(
                img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA
            )
        out[i] = np.rint(img * 255).astype(np.uint8)
    return out


def measure_tsd_statistics(images_u8: np.ndarray, cfg: TSDConfig | None = None) -> dict[str, float]:
    """Percentiles of |raw TSD| and the fraction clipped at ``cfg.gain`` for (N, H, W, 3) uint8 images."""
    cfg = cfg or TSDConfig()
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    raw = high_pass(x, tsd_radius(x.shape[-2], x.shape[-1], cfg)).abs().flatten().numpy()
    p50, p99, p999 = np.percentile(raw, [50, 99, 99.9])
    return {
        "p50": float(p50),
        "p99": float(p99),
        "p99.9": float(p999),
        "max": float(raw.max()),
        "clipped_fraction": float((raw * cfg.gain > 1.0).mean()),
    }


def _main() -> None:  # pragma: no cover - a measurement script, run by hand
    import tempfile

    import cv2

    from .synthetic import SynthConfig, synthesize_actor

    cfg = TSDConfig()
    rows = {"procedural textures (8, 512²)": procedural_textures(8, 512)}
    with tempfile.TemporaryDirectory() as tmp:
        frames = []
        for index in range(2):
            actor = synthesize_actor(
                tmp, SynthConfig(actors=2, frames=4, res=512, seed=0), index, progress=False
            )
            for sub in ("images", "stage1/rgb"):
                for p in sorted((actor / sub).glob("*.png")):
                    frames.append(cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        rows["synthetic actor frames (real + coarse, 16, 512²)"] = np.stack(frames)
    print(
        f"omega {cfg.omega} at {cfg.reference_resolution}²; |raw TSD| percentiles, % of values clipped per gain"
    )
    for name, imgs in rows.items():
        s = measure_tsd_statistics(imgs, cfg)
        fractions = {
            g: measure_tsd_statistics(imgs, cfg.model_copy(update={"gain": g}))["clipped_fraction"]
            for g in (1.0, 2.0, 3.0, 4.0)
        }
        clipped = "  ".join(f"gain {g:g}: {100 * f:.3f} %" for g, f in fractions.items())
        print(
            f"{name:46s} p50 {s['p50']:.4f}  p99 {s['p99']:.4f}  p99.9 {s['p99.9']:.4f}  max {s['max']:.3f}  {clipped}"
        )


if __name__ == "__main__":  # pragma: no cover
    _main()
