"""Temporal consistency (paper Fig. 7): optical-flow magnitude between adjacent frames, rendered vs
real, and a flicker measure.

The paper "utilize[s] optical flow to compute the degree of change between two frames" and compares
the per-frame curve with the ground truth's: a method is temporally consistent when its curve
follows the real video's (too high = jitter, too low = frozen). Here:

* :func:`flow_magnitude_curve` — per adjacent pair (i, i+1), the mean over pixels of the flow
  vector's length, in pixels: the Fig. 7 curve.
* :func:`temporal_consistency` — both curves, their per-pair absolute difference and its mean
  (``curve_mad``, pixels; lower is better), plus :func:`flicker`.
* Flow comes from a :class:`FlowEstimator`: :class:`FarnebackFlow` (OpenCV, always available) or
  :class:`RAFTFlow` (torchvision RAFT, only with local weights; otherwise :class:`.image.Unavailable`).

Frames are ``(N, H, W, 3)`` uint8 (or 0..1 float), numpy or torch; flows are ``(N-1, H, W, 2)``
float32 in pixels, ``[..., 0]`` = x (right), ``[..., 1]`` = y (down), from frame i to frame i+1.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConsistentAvatarError
from .image import MetricUnavailableError, Unavailable, as_mask, as_unit_float, torch_hub_checkpoints

# torchvision's RAFT checkpoints (the DEFAULT weights of raft_small / raft_large), by the file names
# torch.hub caches them under.
RAFT_WEIGHT_FILES = {
    "small": "raft_small_C_T_V2-01064c6d.pth",
    "large": "raft_large_C_T_SKHT_V2-ff5fadd5.pth",
}
RAFT_MIN_SIZE = 128  # RAFT's correlation pyramid needs feature maps >= 16 px (input / 8)


def _frames_u8(frames: Any, what: str = "frames") -> np.ndarray:
    u8 = _numpy_u8(frames)
    if u8 is not None:  # uint8 already: no float64 copy (8× the frames' size: GBs for a 512² video)
        if u8.ndim != 4 or u8.shape[-1] != 3:
            raise ConsistentAvatarError(f"{what} must be RGB frames shaped (N, H, W, 3), got shape {u8.shape}")
        a = u8
    else:
        a = (as_unit_float(frames, what) * 255.0 + 0.5).astype(np.uint8)
    if len(a) < 2:
        raise ConsistentAvatarError(f"{what}: temporal metrics need at least 2 frames, got {len(a)}")
    return a


def pair_mask(mask: Any | None, n_frames: int, hw: tuple[int, int]) -> np.ndarray | None:
    """Mask per adjacent pair, (N-1, H, W) bool: an (N, H, W) mask becomes the union of frames i
    and i+1 (a pixel counts when it is foreground in either); an (N-1, H, W) mask is used as is."""
    if mask is None:
        return None
    m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    if m.ndim >= 1 and len(m) == n_frames:
        fm = as_mask(m, (n_frames, *hw))
        return fm[:-1] | fm[1:]
    return as_mask(m, (n_frames - 1, *hw), "pair mask")


# --------------------------------------------------------------------------------------------------
# flow estimators
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class FlowEstimator(Protocol):
    """Dense optical flow between adjacent frames: (N, H, W, 3) → (N-1, H, W, 2) float32 pixels."""

    name: str

    @property
    def available(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...

    def __call__(self, frames: Any) -> np.ndarray: ...


@dataclass
class FarnebackFlow:
    """OpenCV's ``calcOpticalFlowFarneback`` on grey frames (``cv2.COLOR_RGB2GRAY``).

    Defaults are OpenCV's tutorial settings, which track motions of a few pixels well at 64²–512²:
    ``pyr_scale=0.5`` (each pyramid level halves the image), ``levels=3`` (handles motions up to
    ~2³ times what one level does), ``winsize=15`` (averaging window: robust to noise, blurs motion
    boundaries), ``iterations=3`` per level, ``poly_n=5`` / ``poly_sigma=1.2`` (the pixel
    neighbourhood of the polynomial expansion; OpenCV recommends 1.1–1.2 for poly_n 5), ``flags=0``.
    """

    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2
    flags: int = 0
    name: str = "farneback"

    @property
    def available(self) -> bool:
        return True

    @property
    def reason(self) -> str | None:
        return None

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        return d

    def __call__(self, frames: Any) -> np.ndarray:
        import cv2

        f = _frames_u8(frames)
        grey = [cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in f]
        out = np.empty((len(f) - 1, *f.shape[1:3], 2), np.float32)
        for i in range(len(f) - 1):
            out[i] = cv2.calcOpticalFlowFarneback(grey[i], grey[i + 1], None, self.pyr_scale, self.levels,
                                                  self.winsize, self.iterations, self.poly_n, self.poly_sigma,
                                                  self.flags)
        return out


def farneback_flow(frames: Any, **params: Any) -> np.ndarray:
    """(N, H, W, 3) → (N-1, H, W, 2) float32 Farneback flow; ``params`` override
    :class:`FarnebackFlow`'s documented defaults."""
    return FarnebackFlow(**params)(frames)


class RAFTFlow:
    """torchvision's RAFT (``raft_small`` or ``raft_large``) from a LOCAL checkpoint.

    The checkpoint is ``weights`` when given, else torchvision's DEFAULT file for the size
    (:data:`RAFT_WEIGHT_FILES`) in the torch hub cache ``<torch_home or $TORCH_HOME>/hub/checkpoints``.
    Without it :attr:`available` is False and :attr:`reason` says which file to put where. The model
    is built with ``weights=None`` (never downloads) and the file loaded strictly.

    Frames are scaled to -1..1 (torchvision's RAFT preprocessing) and resized so both sides are
    multiples of 8 and at least :data:`RAFT_MIN_SIZE` (RAFT's limits); the flow is resized back
    and rescaled to the input's pixels. ``num_flow_updates`` refinement iterations (torchvision's
    default 12); pairs are processed ``batch_size`` at a time on ``device``.
    """

    def __init__(
        self,
        size: str = "small",
        weights: str | os.PathLike[str] | None = None,
        device: str | None = None,
        torch_home: str | os.PathLike[str] | None = None,
        num_flow_updates: int = 12,
        batch_size: int = 8,
    ) -> None:
        if size not in RAFT_WEIGHT_FILES:
            raise ConsistentAvatarError(f"RAFT size must be 'small' or 'large', got {size!r}")
        self.size = size
        self.name = f"raft_{size}"
        self.num_flow_updates = int(num_flow_updates)
        self.batch_size = int(batch_size)
        self._device = device
        self._model: Any = None
        if weights is not None:
            self.weights_path = Path(weights)
            where = f"the given path {self.weights_path}"
        else:
            self.weights_path = torch_hub_checkpoints(torch_home) / RAFT_WEIGHT_FILES[size]
            where = f"the torch hub cache ({self.weights_path.parent}; set TORCH_HOME to move it)"
        self._reason: str | None = None
        if not self.weights_path.is_file():
            self._reason = (
                f"RAFT ({size}) weights not found: {self.weights_path} is missing. Copy torchvision's checkpoint "
                f"{RAFT_WEIGHT_FILES[size]} (https://download.pytorch.org/models/{RAFT_WEIGHT_FILES[size]}) to "
                f"{where}; nothing is downloaded here"
            )

    @property
    def available(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def load(self) -> Any:
        if self._model is not None:
            return self._model
        if not self.available:
            raise MetricUnavailableError(Unavailable(self.name, self._reason or ""))
        import torch
        from torchvision.models.optical_flow import raft_large, raft_small

        try:
            model = (raft_small if self.size == "small" else raft_large)(weights=None, progress=False)
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            self._reason = f"could not load RAFT ({self.size}) weights from {self.weights_path}: {exc}"
            raise MetricUnavailableError(Unavailable(self.name, self._reason)) from exc
        self._model = model.eval().to(self.device)
        return self._model

    def __call__(self, frames: Any) -> np.ndarray:
        model = self.load()
        import torch
        import torch.nn.functional as F

        f = _frames_u8(frames)
        n, h, w = f.shape[:3]
        hr = max(RAFT_MIN_SIZE, -(-h // 8) * 8)
        wr = max(RAFT_MIN_SIZE, -(-w // 8) * 8)
        out = np.empty((n - 1, h, w, 2), np.float32)
        with torch.no_grad():
            for s in range(0, n - 1, self.batch_size):
                e = min(n - 1, s + self.batch_size)
                x = torch.from_numpy(f[s:e + 1]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                if (hr, wr) != (h, w):
                    x = F.interpolate(x, size=(hr, wr), mode="bilinear", align_corners=False)
                flow = model(x[:-1].contiguous(), x[1:].contiguous(), num_flow_updates=self.num_flow_updates)[-1]
                if (hr, wr) != (h, w):
                    flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
                    flow = flow * torch.tensor([w / wr, h / hr], device=flow.device).view(1, 2, 1, 1)
                out[s:e] = flow.permute(0, 2, 3, 1).float().cpu().numpy()
        return out


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def flow_magnitude_curve(flow: Any, mask: Any | None = None) -> np.ndarray:
    """Mean flow magnitude ``sqrt(u² + v²)`` (pixels) per adjacent pair: (N-1,) float64 — the Fig. 7
    curve. ``mask``: (N-1, H, W) per pair, or (N, H, W) per frame (then pair i uses the union of
    frames i and i+1); pairs without foreground are NaN."""
    fl = np.asarray(flow.detach().cpu().numpy() if hasattr(flow, "detach") else flow)
    if fl.ndim != 4 or fl.shape[-1] != 2:
        raise ConsistentAvatarError(f"flow must be shaped (N-1, H, W, 2), got {fl.shape}")
    m = pair_mask(mask, len(fl) + 1, fl.shape[1:3])
    out = np.empty(len(fl), np.float64)
    for i in range(len(fl)):  # one pair at a time: a float64 copy of a whole video's flow is GBs
        mag = np.sqrt((fl[i].astype(np.float64) ** 2).sum(-1))
        if m is None:
            out[i] = mag.mean()
        else:
            out[i] = mag[m[i]].mean() if m[i].any() else np.nan
    return out


def flicker(rendered: Any, real: Any, mask: Any | None = None) -> np.ndarray:
    """Frame-difference energy of the rendered video that the real video does not explain, per pair:
    (N-1,) float64, in squared 0..1 intensity (the unit of L2).

    With D_i = frame_{i+1} − frame_i and ``e(D) = mean over RGB of D²`` at every pixel::

        flicker_i = mean over pixels of max(0, e(D_i^rendered) − e(D_i^real))

    (over the pair's foreground with ``mask``, as in :func:`pair_mask`).

    Why this definition: a per-frame static error (a constant wrong colour, a slightly wrong shape)
    cancels in D, so it is not counted; per-frame noise or brightness/colour flicker adds energy to
    D where the real video changes little, so it is; the comparison is per pixel, so flicker in one
    region cannot be hidden by lost motion in another. It is one-sided on purpose: a video that moves
    *less* than the real one (frozen, over-smoothed) has zero flicker — that failure shows in the
    flow curves (:func:`temporal_consistency`'s ``curve_mad``). The symmetric alternative,
    mean ``|D^rendered − D^real|²``, mixes both failures into one number. Zero when rendered == real.
    """
    ru, tu = _numpy_u8(rendered), _numpy_u8(real)
    exact = ru is not None and tu is not None  # exact integer arithmetic: static errors cancel exactly
    if exact:
        r, t = ru, tu  # no float64 copies of whole videos (GBs at 512²)
        for a, what in ((r, "rendered frames"), (t, "real frames")):
            if a.ndim != 4 or a.shape[-1] != 3:
                raise ConsistentAvatarError(f"{what} must be RGB frames shaped (N, H, W, 3), got shape {a.shape}")
    else:
        r = as_unit_float(rendered, "rendered frames")
        t = as_unit_float(real, "real frames")
    if r.shape != t.shape:
        raise ConsistentAvatarError(f"rendered and real frames differ in shape: {r.shape} vs {t.shape}")
    if len(r) < 2:
        raise ConsistentAvatarError(f"flicker needs at least 2 frames, got {len(r)}")
    m = pair_mask(mask, len(r), r.shape[1:3])
    out = np.empty(len(r) - 1, np.float64)
    for i in range(len(r) - 1):  # one pair at a time: bounded memory whatever the video's length
        if exact:
            dr = (r[i + 1].astype(np.int32) - r[i].astype(np.int32)) ** 2
            dt = (t[i + 1].astype(np.int32) - t[i].astype(np.int32)) ** 2
            excess = np.maximum(dr.sum(-1) - dt.sum(-1), 0).astype(np.float64) / (3 * 255.0**2)
        else:
            excess = np.maximum(0.0, ((r[i + 1] - r[i]) ** 2).mean(-1) - ((t[i + 1] - t[i]) ** 2).mean(-1))
        if m is None:
            out[i] = excess.mean()
        else:
            out[i] = excess[m[i]].mean() if m[i].any() else np.nan
    return out


def _numpy_u8(frames: Any) -> np.ndarray | None:
    a = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    return a if a.dtype == np.uint8 else None


def temporal_consistency(
    rendered: Any,
    real: Any,
    mask: Any | None = None,
    estimator: FlowEstimator | None = None,
) -> dict[str, Any]:
    """Fig. 7's comparison for one video: rendered and real frames (N, H, W, 3), same N ≥ 2.

    Returns a dict:

    * ``estimator`` — the flow estimator's name (default :class:`FarnebackFlow`);
    * ``rendered_curve``, ``real_curve`` — (N-1,) mean flow magnitude per adjacent pair, pixels;
    * ``curve_abs_diff`` — (N-1,) ``|rendered_curve − real_curve|``;
    * ``curve_mad`` — its mean (pixels; 0 = the rendered video moves exactly as much as the real);
    * ``rendered_mean_motion``, ``real_mean_motion`` — each curve's mean;
    * ``flicker`` — (N-1,) :func:`flicker`; ``flicker_mean`` — its mean.

    When the estimator is unavailable (RAFT without weights) every flow entry is that
    :class:`.image.Unavailable` and only the flicker entries are numbers. Means skip NaN pairs
    (pairs without foreground under ``mask``).
    """
    est = estimator if estimator is not None else FarnebackFlow()
    fl = flicker(rendered, real, mask)
    out: dict[str, Any] = {"estimator": est.name, "flicker": fl, "flicker_mean": _nanmean(fl)}
    if not est.available:
        u = Unavailable(f"temporal_consistency[{est.name}]", est.reason or "flow estimator unavailable")
        for k in ("rendered_curve", "real_curve", "curve_abs_diff", "curve_mad", "rendered_mean_motion", "real_mean_motion"):
            out[k] = u
        return out
    rc = flow_magnitude_curve(est(rendered), mask)
    tc = flow_magnitude_curve(est(real), mask)
    diff = np.abs(rc - tc)
    out.update(rendered_curve=rc, real_curve=tc, curve_abs_diff=diff, curve_mad=_nanmean(diff),
               rendered_mean_motion=_nanmean(rc), real_mean_motion=_nanmean(tc))
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def choose_flow(
    method: str = "auto", *, device: str | None = None, torch_home: str | os.PathLike[str] | None = None
) -> tuple[Any, str]:
    """The flow estimator for ``method`` and a note saying why it was chosen.

    ``auto`` (the default of ``cavatar evaluate``): RAFT (small) when its checkpoint is on disk and
    loads, Farneback otherwise — the note then says which file would enable RAFT, or why it did not load. ``raft`` asks for RAFT
    only: without weights its metrics are reported unavailable, never replaced by Farneback's.
    """
    if method == "farneback":
        return FarnebackFlow(), "farneback: asked for"
    if method not in ("raft", "auto"):
        raise ConsistentAvatarError(f"flow method must be 'auto', 'raft' or 'farneback', got {method!r}")
    raft = RAFTFlow(device=device, torch_home=torch_home)
    if method == "raft":
        return raft, "raft: asked for"
    if raft.available:
        try:
            raft.load()  # a file that is there but does not load must not cost the flow metrics
        except MetricUnavailableError:
            pass
        else:
            return raft, f"auto: RAFT, its weights are at {raft.weights_path}"
    return FarnebackFlow(), f"auto: Farneback, as RAFT is unavailable ({raft.reason})"
