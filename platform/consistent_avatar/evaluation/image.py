"""Per-frame image quality between rendered and real frames: L2, PSNR, SSIM, LPIPS (paper Table 1).

Inputs are batches of frames, ``(N, H, W, 3)``: uint8 (0..255, divided by 255) or floating point
already in 0..1; numpy arrays or torch tensors. An optional foreground ``mask`` ``(N, H, W)`` (bool;
uint8 with > 127 = foreground, as the shards store it; or float with > 0.5 = foreground) restricts
L2, PSNR and SSIM to the foreground; LPIPS composites both images on black outside it. Every
function returns one value per frame, ``(N,)`` float64; aggregation over frames and actors lives in
:mod:`.aggregate`.

A metric that cannot be computed here (LPIPS without its backbone weights) is an
:class:`Unavailable` (metric name + the reason, saying what to put where), never a number computed
with random weights. Nothing in this module downloads anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConsistentAvatarError

log = logging.getLogger(__name__)

# SSIM settings (Wang et al. 2004, as scikit-image documents for matching that paper): an 11-tap
# Gaussian window with sigma 1.5 (truncate 3.5), population covariances, K1 = 0.01, K2 = 0.03, on
# 0..1 data (data_range 1), computed per colour channel and averaged over channels.
SSIM_SETTINGS: dict[str, Any] = {
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
    "data_range": 1.0,
    "K1": 0.01,
    "K2": 0.03,
}
SSIM_WINDOW = 11  # 2 * int(3.5 * 1.5 + 0.5) + 1: what scikit-image derives from the settings above
SSIM_BORDER = (SSIM_WINDOW - 1) // 2  # scikit-image averages the SSIM map without this border

# torchvision's ImageNet checkpoints of the LPIPS backbones, by the file names torch.hub caches them
# under (``<torch hub dir>/checkpoints/<name>``). The 8 hex digits in a name are the start of the
# file's SHA-256, which :class:`LPIPSMetric` checks.
LPIPS_BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
LPIPS_BACKBONE_URLS = {k: f"https://download.pytorch.org/models/{v}" for k, v in LPIPS_BACKBONE_FILES.items()}


# --------------------------------------------------------------------------------------------------
# unavailable results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unavailable:
    """The result of a metric that cannot be computed here: which metric and why (with the fix)."""

    metric: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"available": False, "metric": self.metric, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.metric}: unavailable ({self.reason})"


class MetricUnavailableError(ConsistentAvatarError):
    """Raised when asked to compute a metric that is unavailable; ``.unavailable`` says why."""

    def __init__(self, unavailable: Unavailable) -> None:
        self.unavailable = unavailable
        super().__init__(str(unavailable))


def is_unavailable(value: Any) -> bool:
    return isinstance(value, Unavailable)


# --------------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------------


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():  # numpy has no bfloat16; float32 holds every bf16/fp16 value exactly
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def as_unit_float(frames: Any, what: str = "frames") -> np.ndarray:
    """(N, H, W, 3) uint8 or 0..1 float → float64 in 0..1, with an error that says what is wrong."""
    a = _numpy(frames)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ConsistentAvatarError(f"{what} must be RGB frames shaped (N, H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6):
            raise ConsistentAvatarError(
                f"{what}: floating-point frames must be finite and in 0..1 "
                f"(got {np.nanmin(a):.4g}..{np.nanmax(a):.4g}); pass uint8 for 0..255 images"
            )
        return np.clip(a, 0.0, 1.0)
    raise ConsistentAvatarError(f"{what} must be uint8 (0..255) or float (0..1), got dtype {a.dtype}")


def as_mask(mask: Any, shape: tuple[int, ...], what: str = "mask") -> np.ndarray:
    """(N, H, W) bool foreground: bool as is, uint8 > 127, other numbers > 0.5."""
    m = _numpy(mask)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ConsistentAvatarError(f"{what} must be shaped {tuple(shape)} (N, H, W), got {m.shape}")
    if m.dtype == bool:
        return m
    if m.dtype == np.uint8:
        return m > 127
    if np.issubdtype(m.dtype, np.number):
        return m > 0.5
    raise ConsistentAvatarError(f"{what} must be bool, uint8 (255 = foreground) or a number array, got {m.dtype}")


def _pair(pred: Any, real: Any, mask: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    p = as_unit_float(pred, "rendered frames")
    r = as_unit_float(real, "real frames")
    if p.shape != r.shape:
        raise ConsistentAvatarError(f"rendered and real frames differ in shape: {p.shape} vs {r.shape}")
    m = None if mask is None else as_mask(mask, p.shape[:3])
    return p, r, m


# --------------------------------------------------------------------------------------------------
# L2, PSNR, SSIM
# --------------------------------------------------------------------------------------------------


def l2(pred: Any, real: Any, mask: Any | None = None) -> np.ndarray:
    """Per-frame mean squared error on 0..1 intensities, over pixels and RGB channels: (N,) float64.

    With ``mask``, the mean runs over foreground pixels only; a frame with an empty mask is NaN.
    This is the paper's "L2" (Table 1: ~0.001 for good renders).
    """
    p, r, m = _pair(pred, real, mask)
    sq = ((p - r) ** 2).mean(axis=-1)  # (N, H, W)
    if m is None:
        return sq.reshape(len(sq), -1).mean(axis=1)
    count = m.reshape(len(m), -1).sum(axis=1)
    total = (sq * m).reshape(len(sq), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def psnr(pred: Any, real: Any, mask: Any | None = None) -> np.ndarray:
    """Per-frame PSNR in dB with data range 1: ``10 * log10(1 / L2)``, (N,) float64.

    Identical frames (L2 = 0) give ``+inf``; :func:`.aggregate.finite_mean` leaves such frames out of
    means and counts them (``n_inf``), so one perfect frame cannot make an average infinite. A frame
    with an empty mask is NaN (also left out and counted).
    """
    mse = l2(pred, real, mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mse > 0, -10.0 * np.log10(np.where(mse > 0, mse, 1.0)), np.where(np.isnan(mse), np.nan, np.inf))


def ssim(pred: Any, real: Any, mask: Any | None = None) -> np.ndarray:
    """Per-frame SSIM, (N,) float64, with scikit-image's ``structural_similarity`` and
    :data:`SSIM_SETTINGS` (Gaussian 11-tap window, sigma 1.5, population covariance, data range 1,
    ``channel_axis=-1``: SSIM per RGB channel, averaged).

    Without a mask the value is exactly scikit-image's (the SSIM map averaged without its
    :data:`SSIM_BORDER`-pixel border). With ``mask`` the same border-less map is averaged over the
    foreground pixels (and channels) only; a frame without foreground inside the border is NaN.
    Frames must be at least 11×11 pixels.
    """
    from skimage.metrics import structural_similarity

    p, r, m = _pair(pred, real, mask)
    n, h, w = p.shape[:3]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ConsistentAvatarError(f"SSIM needs frames of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, got {h}×{w}")
    out = np.empty(n, np.float64)
    b = SSIM_BORDER
    for i in range(n):
        if m is None:
            out[i] = structural_similarity(p[i], r[i], channel_axis=-1, **SSIM_SETTINGS)
            continue
        _, smap = structural_similarity(p[i], r[i], channel_axis=-1, full=True, **SSIM_SETTINGS)
        inner = m[i, b:h - b, b:w - b]
        out[i] = smap[b:h - b, b:w - b][inner].mean() if inner.any() else np.nan
    return out


# --------------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------------


def torch_hub_checkpoints(torch_home: str | os.PathLike[str] | None = None) -> Path:
    """Where torch.hub caches checkpoints: ``<torch_home>/hub/checkpoints`` when ``torch_home`` is
    given, else ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``, default
    ``~/.cache/torch/hub``)."""
    if torch_home is not None:
        return Path(torch_home) / "hub" / "checkpoints"
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_matches_name(path: Path) -> bool:
    """torch.hub convention: ``name-<first hex digits of sha256>.pth``; True when the file agrees."""
    stem = path.name.split(".")[0]
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
        return False
    return _sha256(path).startswith(prefix)


def _lpips_linear_file(net: str, version: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / f"v{version}" / f"{net}.pth"


class LPIPSMetric:
    """LPIPS (Zhang et al. 2018) with the ``lpips`` package, loaded only from local files.

    Two sets of weights are needed, and nothing is downloaded:

    * the backbone's ImageNet weights, torchvision's checkpoint file
      (:data:`LPIPS_BACKBONE_FILES`, e.g. ``alexnet-owt-7be5be79.pth`` for ``net="alex"``), looked up
      at ``backbone_path`` when given, else in the torch hub cache ``<torch_home or
      $TORCH_HOME>/hub/checkpoints/`` (see :func:`torch_hub_checkpoints`);
    * the calibrated linear layers, ``weights/v0.1/<net>.pth``, shipped inside the ``lpips`` package.

    When either is missing, :attr:`available` is False and :attr:`reason` names the missing file and
    where to put it; :meth:`compute` then returns an :class:`Unavailable` and ``__call__`` raises
    :class:`MetricUnavailableError`. The backbone is built without pretrained weights (no download
    path is ever taken) and the checkpoint is loaded into it strictly; :attr:`backbone_verified` says
    whether the file's SHA-256 matches the prefix in torchvision's file name (a file that does not
    is loaded but logged: its values are not comparable with published LPIPS figures).

    Values: one per frame, (N,) float64, lower is better (Table 1: ~0.04). Inputs as for
    :func:`l2`; with ``mask`` both images are set to black outside the foreground first. Frames are
    processed ``batch_size`` at a time on ``device`` (default: CUDA when available, else CPU).
    """

    name = "lpips"

    def __init__(
        self,
        net: str = "alex",
        version: str = "0.1",
        device: str | None = None,
        torch_home: str | os.PathLike[str] | None = None,
        backbone_path: str | os.PathLike[str] | None = None,
        batch_size: int = 16,
    ) -> None:
        if net not in LPIPS_BACKBONE_FILES:
            raise ConsistentAvatarError(f"LPIPS net must be one of {', '.join(LPIPS_BACKBONE_FILES)}, got {net!r}")
        if version not in ("0.0", "0.1"):
            raise ConsistentAvatarError(f"LPIPS version must be '0.1' (or the old '0.0'), got {version!r}")
        if int(batch_size) < 1:
            raise ConsistentAvatarError(f"batch_size must be >= 1, got {batch_size!r}")
        self.net = net
        self.version = version
        self.batch_size = int(batch_size)
        self._device = device
        self._model: Any = None
        self.backbone_verified: bool | None = None
        if backbone_path is not None:
            self.backbone_path = Path(backbone_path)
            where = f"the given backbone_path {self.backbone_path}"
        else:
            self.backbone_path = torch_hub_checkpoints(torch_home) / LPIPS_BACKBONE_FILES[net]
            where = f"the torch hub cache ({self.backbone_path.parent}; set TORCH_HOME to move it)"
        self.linear_path = _lpips_linear_file(net, version)
        self.reason: str | None = None
        if self.linear_path is None:
            self.reason = "the lpips package is not installed: pip install lpips (its linear-layer weights ship inside it)"
        elif not self.linear_path.is_file():
            self.reason = (f"lpips's linear-layer weights {self.linear_path} are missing: reinstall the lpips "
                           "package (pip install --force-reinstall lpips)")
        elif not self.backbone_path.is_file():
            self.reason = (
                f"LPIPS backbone weights not found: {self.backbone_path} is missing. Copy torchvision's "
                f"ImageNet checkpoint {LPIPS_BACKBONE_FILES[net]} (from {LPIPS_BACKBONE_URLS[net]}) to "
                f"{where}; nothing is downloaded here"
            )

    @property
    def available(self) -> bool:
        return self.reason is None

    def unavailable(self) -> Unavailable:
        return Unavailable(self.name, self.reason or "")

    def describe(self) -> dict[str, Any]:
        """What the report prints about this metric's weights."""
        return {
            "metric": self.name,
            "net": self.net,
            "version": self.version,
            "available": self.available,
            "reason": self.reason,
            "backbone": str(self.backbone_path),
            "backbone_sha256_matches_torchvision": self.backbone_verified,
            "linear_layers": str(self.linear_path) if self.linear_path else None,
        }

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def load(self) -> Any:
        """Build the model (once); raises :class:`MetricUnavailableError` when weights are missing
        or do not load."""
        if self._model is not None:
            return self._model
        if not self.available:
            raise MetricUnavailableError(self.unavailable())
        import warnings

        import torch

        try:
            import lpips

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's deprecation notice for pretrained=False
                # pnet_rand=True: the backbone is built with random weights (torchvision never
                # downloads), then overwritten below from the local checkpoint; pretrained=True
                # loads the linear layers from the file inside the package.
                model = lpips.LPIPS(pretrained=True, net=self.net, version=self.version, pnet_rand=True,
                                    verbose=False, model_path=str(self.linear_path))
            state = torch.load(self.backbone_path, map_location="cpu", weights_only=True)
            _load_backbone(model.net, state, self.backbone_path)
        except MetricUnavailableError:
            raise
        except Exception as exc:  # a corrupt or foreign checkpoint: unavailable, with what went wrong
            self.reason = f"could not load the LPIPS {self.net} backbone from {self.backbone_path}: {exc}"
            raise MetricUnavailableError(self.unavailable()) from exc
        self.backbone_verified = hash_matches_name(self.backbone_path)
        if not self.backbone_verified:
            log.warning("LPIPS backbone %s does not match torchvision's published SHA-256 (the prefix in its "
                        "name): LPIPS values are not comparable with published figures", self.backbone_path)
        self._model = model.eval().to(self.device)
        return self._model

    def compute(self, pred: Any, real: Any, mask: Any | None = None) -> np.ndarray | Unavailable:
        """(N,) float64 LPIPS distances, or :class:`Unavailable` (with the reason) when the weights
        are not here."""
        try:
            return self(pred, real, mask)
        except MetricUnavailableError as exc:
            return exc.unavailable

    def __call__(self, pred: Any, real: Any, mask: Any | None = None) -> np.ndarray:
        model = self.load()
        import torch

        p, r, m = _pair(pred, real, mask)
        if m is not None:
            p = p * m[..., None]
            r = r * m[..., None]
        out = np.empty(len(p), np.float64)
        with torch.no_grad():
            for s in range(0, len(p), self.batch_size):
                a = torch.from_numpy(p[s:s + self.batch_size]).float().permute(0, 3, 1, 2).to(self.device)
                b = torch.from_numpy(r[s:s + self.batch_size]).float().permute(0, 3, 1, 2).to(self.device)
                d = model(a * 2 - 1, b * 2 - 1)  # LPIPS expects -1..1
                out[s:s + len(a)] = d.reshape(len(a)).double().cpu().numpy()
        return out


def _load_backbone(net: Any, state: dict[str, Any], path: Path) -> None:
    """Load a torchvision ``features.<i>.*`` state dict into lpips's sliced backbone strictly.

    lpips splits torchvision's ``features`` Sequential into ``slice1..sliceK``, keeping each layer's
    index: ``features.3.weight`` lives at ``slice2.3.weight``. The classifier is not used.
    """
    if not isinstance(state, dict):
        raise ConsistentAvatarError(f"{path} does not hold a state dict")
    where: dict[str, str] = {}
    for slice_name, block in net.named_children():
        for idx, _ in block.named_children():
            where[idx] = slice_name
    mapped = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        idx, rest = key[len("features."):].split(".", 1)
        if idx in where:
            mapped[f"{where[idx]}.{idx}.{rest}"] = value
    net.load_state_dict(mapped, strict=True)  # raises, naming missing/unexpected keys, on a foreign file
