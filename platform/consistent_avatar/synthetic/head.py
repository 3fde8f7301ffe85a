"""A procedural 3D head and its renderer: the synthetic "real video" and its stage-1 (INSTA-like) proxy.

Why this design: the platform needs talking-head frames whose expression and pose are known exactly,
with skin-level detail that a coarse volumetric avatar loses. The head is a star-shaped surface
around its centre, ``|p| = r(phi, theta)``, stored as an equirectangular radius map (identity shape
plus linear blendshape deltas driven by the expression code). Rendering is analytic ray casting in
camera space with a weak-perspective camera, vectorised with numpy/OpenCV (no per-pixel Python):
a few fixed-point steps find the visible root along each pixel's ray, the normal comes from the map's
derivatives, skin and hair albedo (pores, wrinkle lines, freckles, stubble, hair strokes) is a
texture in the same (phi, theta) coordinates, and the moving face parts (eyes and lids, brows, lips
and mouth interior) are drawn analytically per frame in those coordinates, so expressions read
clearly even at 64².

Conventions: head frame = camera frame at zero pose (x right, y up, z towards the camera; OpenGL
style). A pose is FLAME-like: axis-angle rotation (3, radians; +x nods the face down) then
translation (3, metres). Normal maps are camera-space unit normals encoded ``(n + 1) / 2 * 255``,
background 0. One head unit is :data:`HEAD_UNIT_M` metres.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..data.layout import EXPRESSION_DIM, POSE_DIM
from ..errors import ConsistentAvatarError
from .emotions import Expr

HEAD_UNIT_M = 0.1  # one head unit (≈ head radius) in metres
CAMERA_DISTANCE_M = 1.0  # fixed camera on +z looking at the head centre
VIEW_HALF_EXTENT = 1.35  # half the image side, in head units, at zero translation
GAZE_DIMS = (12, 13)  # two "noise" dims also steer the gaze a little (keeps eyes alive)
MIN_RES, MAX_RES = 16, 512

_F32 = np.float32


# --------------------------------------------------------------------------------------------------
# camera
# --------------------------------------------------------------------------------------------------


def camera_intrinsics(res: int) -> dict[str, float]:
    """Pinhole intrinsics (pixels) whose weak-perspective limit is the renderer's camera."""
    half_m = VIEW_HALF_EXTENT * HEAD_UNIT_M
    fl = (res / 2) * CAMERA_DISTANCE_M / half_m
    angle = 2 * math.atan(res / (2 * fl))
    return {"w": res, "h": res, "fl_x": fl, "fl_y": fl, "cx": res / 2, "cy": res / 2,
            "camera_angle_x": angle, "camera_angle_y": angle}


def camera_to_world() -> list[list[float]]:
    """The fixed camera (NeRF/OpenGL convention: looks along its -z) at +z, world = head frame."""
    return [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, CAMERA_DISTANCE_M], [0.0, 0.0, 0.0, 1.0]]


def axis_angle_to_matrix(rvec: np.ndarray) -> np.ndarray:
    """Rodrigues' formula, float64 (3,3)."""
    rvec = np.asarray(rvec, np.float64)
    angle = float(np.linalg.norm(rvec))
    if angle < 1e-12:
        return np.eye(3)
    k = rvec / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * (kx @ kx)


# --------------------------------------------------------------------------------------------------
# identity
# --------------------------------------------------------------------------------------------------

_SKIN_TONES = ((0.95, 0.80, 0.70), (0.91, 0.73, 0.61), (0.86, 0.66, 0.53), (0.77, 0.57, 0.44),
               (0.65, 0.46, 0.34), (0.52, 0.36, 0.26), (0.40, 0.27, 0.20))
_HAIR_COLOURS = ((0.07, 0.055, 0.05), (0.20, 0.13, 0.08), (0.38, 0.25, 0.14), (0.72, 0.56, 0.34),
                 (0.52, 0.24, 0.10), (0.60, 0.58, 0.56))
_IRIS_COLOURS = ((0.36, 0.22, 0.11), (0.22, 0.38, 0.58), (0.30, 0.42, 0.24), (0.16, 0.10, 0.07),
                 (0.42, 0.40, 0.30))


@dataclass(frozen=True)
class HeadIdentity:
    """Everything that makes one synthetic person (angles in radians of the head's (phi, theta))."""

    seed: int
    axes: tuple[float, float, float]  # half-width, half-height, half-depth (head units)
    squareness: float  # superellipsoid exponent: flatter face, squarer skull
    jaw_taper: float
    chin: float
    nose_height: float
    nose_width: float
    nose_tip: float  # theta of the nose tip
    eye_sep: float
    eye_height: float
    eye_size: float
    brow_height: float
    brow_thickness: float
    brow_arch: float
    mouth_height: float
    mouth_width: float
    lip_upper: float
    lip_lower: float
    hairline: float
    hair_volume: float
    hair_length: float  # lowest theta hair reaches at the back/sides
    fringe: float
    hair_part: float
    ear_size: float
    age: float  # 0..1: static wrinkle strength
    pores: float
    freckles: float
    stubble: float
    skin_rgb: tuple[float, float, float]
    lip_rgb: tuple[float, float, float]
    hair_rgb: tuple[float, float, float]
    iris_rgb: tuple[float, float, float]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def sample_identity(seed: int) -> HeadIdentity:
    """A deterministic random person for ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x49444E54]))  # "IDNT"
    u = rng.uniform

    def jitter(rgb: tuple[float, ...], amount: float) -> tuple[float, float, float]:
        c = np.clip(np.asarray(rgb) * u(0.92, 1.08) + rng.normal(0, amount, 3), 0.02, 0.98)
        return (float(c[0]), float(c[1]), float(c[2]))

    skin = jitter(_SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))], 0.015)
    lip = tuple(float(x) for x in np.clip(np.asarray(skin) * (0.86, 0.6, 0.62) + (0.03, 0.0, 0.01), 0, 1))
    return HeadIdentity(
        seed=int(seed),
        axes=(float(u(0.74, 0.82)), float(u(1.05, 1.13)), float(u(0.92, 1.0))),
        squareness=float(u(2.0, 2.3)),
        jaw_taper=float(u(0.16, 0.28)),
        chin=float(u(0.03, 0.07)),
        nose_height=float(u(0.17, 0.25)),
        nose_width=float(u(0.85, 1.2)),
        nose_tip=float(u(-0.22, -0.16)),
        eye_sep=float(u(0.32, 0.38)),
        eye_height=float(u(0.08, 0.12)),
        eye_size=float(u(1.0, 1.2)),
        brow_height=float(u(0.25, 0.3)),
        brow_thickness=float(u(0.045, 0.065)),
        brow_arch=float(u(0.012, 0.035)),
        mouth_height=float(u(-0.5, -0.44)),
        mouth_width=float(u(0.25, 0.31)),
        lip_upper=float(u(0.045, 0.065)),
        lip_lower=float(u(0.055, 0.08)),
        hairline=float(u(0.52, 0.68)),
        hair_volume=float(u(0.03, 0.09)),
        hair_length=float(u(-1.0, -0.15)),
        fringe=float(u(0.0, 1.0)) if rng.random() < 0.4 else 0.0,
        hair_part=float(u(-0.3, 0.3)),
        ear_size=float(u(0.85, 1.15)),
        age=float(u(0.0, 1.0)),
        pores=float(u(0.5, 1.0)),
        freckles=float(u(0.3, 1.0)) if rng.random() < 0.3 else 0.0,
        stubble=float(u(0.3, 0.9)) if rng.random() < 0.35 else 0.0,
        skin_rgb=skin,
        lip_rgb=lip,  # type: ignore[arg-type]
        hair_rgb=jitter(_HAIR_COLOURS[int(rng.integers(len(_HAIR_COLOURS)))], 0.01),
        iris_rgb=jitter(_IRIS_COLOURS[int(rng.integers(len(_IRIS_COLOURS)))], 0.02),
    )


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) * (1.0 / (e1 - e0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(phi: np.ndarray, theta: np.ndarray, c: tuple[float, float], s: tuple[float, float]) -> np.ndarray:
    return np.exp(-0.5 * (((phi - c[0]) / s[0]) ** 2 + ((theta - c[1]) / s[1]) ** 2))


def _wrap_pad(img: np.ndarray, pad: int) -> np.ndarray:
    """Repeat ``pad`` columns across the phi = ±pi seam so bilinear lookups wrap around the head."""
    return np.concatenate([img[:, -pad:], img, img[:, :pad]], axis=1)


class _EquirectGrid:
    """Maps (phi, theta) to pixel coordinates of an equirectangular image of ``h x w`` (+ wrap pad)."""

    PAD = 2

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.sx = _F32(w / (2 * math.pi))
        self.bx = _F32(w / 2 - 0.5 + self.PAD)
        self.sy = _F32(-h / math.pi)
        self.by = _F32(h / 2 - 0.5)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        phi = ((np.arange(self.w, dtype=np.float64) + 0.5) / self.w * 2 - 1) * math.pi
        theta = (0.5 - (np.arange(self.h, dtype=np.float64) + 0.5) / self.h) * math.pi
        p, t = np.meshgrid(phi, theta)
        return p.astype(_F32), t.astype(_F32)

    def texel(self) -> float:
        return 2 * math.pi / self.w


# --------------------------------------------------------------------------------------------------
# the head model: identity baked into maps
# --------------------------------------------------------------------------------------------------

class HeadModel:
    """Identity shape, blendshapes, albedo and wrinkle textures, precomputed once per actor.

    ``texture_width`` sets the equirectangular albedo resolution (height = width / 2); see
    :func:`texture_width_for`.
    """

    GEO_H, GEO_W = 256, 512

    def __init__(self, identity: HeadIdentity, texture_width: int = 2048) -> None:
        if texture_width < 256 or texture_width > 8192:
            raise ConsistentAvatarError(f"texture_width must be in 256..8192, got {texture_width}")
        self.identity = identity
        self.geo_grid = _EquirectGrid(self.GEO_H, self.GEO_W)
        self.tex_grid = _EquirectGrid(texture_width // 2, texture_width)
        self._build_geometry()
        rng = np.random.default_rng(np.random.SeedSequence([identity.seed, 0x54455854, texture_width]))  # "TEXT"
        self._build_textures(rng)
        self._blurred: dict[float, np.ndarray] = {}
        # sparse hull of the neutral head (for tight per-frame pixel boxes)
        phi, theta = self.geo_grid.coords()
        rr = self.geometry[:, _EquirectGrid.PAD:-_EquirectGrid.PAD, 0]
        sub = (slice(None, None, 4), slice(None, None, 4))
        ph, th, rs = phi[sub].ravel(), theta[sub].ravel(), rr[sub].ravel() + 0.01
        self.hull = np.stack([np.cos(th) * np.sin(ph) * rs, np.sin(th) * rs, np.cos(th) * np.cos(ph) * rs], 1).astype(np.float64)

    # ---- geometry -------------------------------------------------------------------------------

    def _hair_mask(self, phi: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Soft 0..1 hair coverage: above a hairline that drops from forehead to temples to nape."""
        idn = self.identity
        a = np.abs(phi)
        front = idn.hairline - 0.09 * idn.fringe * (0.5 + 0.5 * np.cos(2.5 * (phi - idn.hair_part)))
        line_front = front - (front - 0.22) * _smoothstep(0.35, 1.15, a) - 0.3 * _smoothstep(1.15, 1.35, a)
        line_back = -0.08 + (idn.hair_length + 0.08) * _smoothstep(1.45, 2.2, a)
        line = np.where(a < 1.45, line_front, line_back)
        # Ears stay visible unless the hair is long.
        ear = _gauss(a, theta, (1.52, 0.0), (0.1, 0.16)) * float(idn.hair_length > -0.55)
        m = _smoothstep(-0.035, 0.035, theta - line)
        return np.clip(m * (1 - ear), 0, 1).astype(_F32)

    def _build_geometry(self) -> None:
        idn = self.identity
        phi, theta = self.geo_grid.coords()
        qx = np.cos(theta) * np.sin(phi)
        qy = np.sin(theta)
        qz = np.cos(theta) * np.cos(phi)
        ax, ay, az = idn.axes
        lower = _smoothstep(0.05, -0.9, theta)
        ax_t = ax * (1 - idn.jaw_taper * lower)
        az_t = np.where(qz < 0, az * 1.06, az * (1 - 0.08 * lower))
        p = idn.squareness
        r = (np.abs(qx / ax_t) ** p + np.abs(qy / ay) ** p + np.abs(qz / az_t) ** p) ** (-1 / p)
        # below the ears the skull gives way to the neck: pull the lower back of the head in
        r = r * (1 - 0.3 * _smoothstep(-0.15, -0.85, theta) * _smoothstep(0.2, -0.4, qz))
        g = _gauss
        e, es = idn.eye_sep, idn.eye_size
        # nose: a ridge that grows towards the tip, a bulb, two wings
        ridge_t = _smoothstep(0.16, idn.nose_tip, theta) * (theta > idn.nose_tip - 0.05)
        width = 0.045 + 0.04 * ridge_t
        nose = idn.nose_height * (0.55 * ridge_t * np.exp(-0.5 * (phi / (width * idn.nose_width)) ** 2)
                                  * _smoothstep(idn.nose_tip - 0.07, idn.nose_tip, theta))
        nose += idn.nose_height * 0.55 * g(phi, theta, (0, idn.nose_tip), (0.05 * idn.nose_width, 0.04))
        for s in (-1, 1):
            nose += idn.nose_height * 0.3 * g(phi, theta, (s * 0.085 * idn.nose_width, idn.nose_tip - 0.03), (0.035, 0.03))
        r = r + nose
        for s in (-1, 1):
            r -= 0.075 * g(phi, theta, (s * e, idn.eye_height), (0.13 * es, 0.085 * es))  # eye socket
            r += 0.035 * g(phi, theta, (s * e, idn.eye_height), (0.09 * es, 0.05 * es))  # eyeball
            r += 0.04 * g(phi, theta, (s * 0.55, -0.08), (0.15, 0.12))  # cheekbone
            r += 0.12 * idn.ear_size * g(phi, theta, (s * 1.52, 0.0), (0.08, 0.15))  # ear
        r += 0.035 * g(phi, theta, (0, idn.brow_height - 0.02), (0.5, 0.05))  # brow ridge
        r += 0.035 * g(phi, theta, (0, idn.mouth_height), (0.2, 0.06))  # lips
        r += idn.chin * g(phi, theta, (0, -0.78), (0.16, 0.1))  # chin
        r += idn.hair_volume * cv2.GaussianBlur(self._hair_mask(phi, theta), (0, 0), 3)
        self.ao = np.clip(1 + 3.0 * (r - cv2.GaussianBlur(r.astype(_F32), (0, 0), 7)), 0.55, 1.0).astype(_F32)

        # blendshape radius deltas, one per geometry-driving expression dim
        blends = {
            Expr.JAW_OPEN: 0.17 * g(phi, theta, (0, -0.95), (0.38, 0.3)) * _smoothstep(idn.mouth_height + 0.02, idn.mouth_height - 0.3, theta)
            - 0.05 * g(phi, theta, (0, idn.mouth_height - 0.05), (0.16, 0.06)),
            Expr.SMILE: sum(0.04 * g(phi, theta, (s * 0.34, idn.mouth_height + 0.2), (0.1, 0.08))
                            - 0.02 * g(phi, theta, (s * 0.3, idn.mouth_height), (0.06, 0.06)) for s in (-1, 1)),
            Expr.LIP_PUCKER: 0.06 * g(phi, theta, (0, idn.mouth_height), (0.11, 0.07)),
            Expr.LIP_STRETCH: -0.02 * g(phi, theta, (0, idn.mouth_height), (0.2, 0.05)),
            # skin bunches on the bridge, the wings lift
            Expr.NOSE_WRINKLE: 0.025 * g(phi, theta, (0, idn.eye_height - 0.03), (0.07, 0.05))
            + sum(0.03 * g(phi, theta, (s * 0.09 * idn.nose_width, idn.nose_tip + 0.01), (0.04, 0.03)) for s in (-1, 1)),
        }
        blends[Expr.JAW_OPEN] = cv2.GaussianBlur(blends[Expr.JAW_OPEN].astype(_F32), (0, 0), 2)
        self.geometry = self._with_derivatives(r.astype(_F32), self.ao)
        self.blendshapes: list[tuple[int, tuple[slice, slice], np.ndarray]] = []
        self.blend_peaks: list[tuple[int, float]] = []
        for dim, delta in blends.items():
            full = self._with_derivatives(delta.astype(_F32), None)
            rows = np.nonzero(np.abs(delta).max(axis=1) > 1e-4)[0]
            cols = np.nonzero(np.abs(delta).max(axis=0) > 1e-4)[0]
            sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1 + 2 * _EquirectGrid.PAD))
            self.blendshapes.append((int(dim), sl, np.ascontiguousarray(full[sl])))
            self.blend_peaks.append((int(dim), float(np.abs(delta).max())))

    def _with_derivatives(self, r: np.ndarray, ao: np.ndarray | None) -> np.ndarray:
        """(H, W + pad, 4): r, dr/dphi, dr/dtheta (per radian), ambient occlusion (0 for deltas)."""
        grid = self.geo_grid
        rp = _wrap_pad(r, 1)
        d_phi = (rp[:, 2:] - rp[:, :-2]) / (2 * (2 * math.pi / grid.w))
        d_theta = np.gradient(r, axis=0) / (-math.pi / grid.h)
        out = np.stack([r, d_phi, d_theta, ao if ao is not None else np.zeros_like(r)], axis=-1)
        return np.ascontiguousarray(_wrap_pad(out.astype(_F32), _EquirectGrid.PAD))

    def geometry_for(self, expression: np.ndarray) -> np.ndarray:
        """The (r, dr/dphi, dr/dtheta, ao) map of the head under ``expression``."""
        geo = self.geometry.copy()
        for dim, sl, delta in self.blendshapes:
            w = float(expression[dim])
            if w != 0.0:
                geo[sl] += _F32(w) * delta
        return geo

    # ---- textures -------------------------------------------------------------------------------

    def _build_textures(self, rng: np.random.Generator) -> None:
        """Albedo (RGB), expression-wrinkle layers (4 ch), brow strands and iris streaks.

        Smooth fields (tint, hair and beard regions) are computed on a grid of at most 1024 x 512
        and upsampled; only the detail (pores, mottling, lines, strokes) is made at full size.
        """
        idn = self.identity
        grid = self.tex_grid
        h, w = grid.h, grid.w
        px = grid.texel()  # radians per texel
        lo = _EquirectGrid(min(h, 512), min(w, 1024))
        phi, theta = lo.coords()
        g = _gauss

        def up(field: np.ndarray) -> np.ndarray:
            return field if field.shape[:2] == (h, w) else cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)

        # smooth colour: skin tone, blotchiness, redness of cheeks / nose / lips, darker around the eyes
        blotch = cv2.GaussianBlur(rng.standard_normal(phi.shape).astype(_F32), (0, 0), 0.15 / lo.texel())
        blotch /= max(float(blotch.std()), 1e-6)
        shade = 1 + 0.05 * blotch
        red = 0.5 * g(phi, theta, (0, idn.nose_tip), (0.07, 0.06)) + 0.3 * g(phi, theta, (0, idn.mouth_height), (0.3, 0.12))
        for s in (-1, 1):
            red += 0.6 * g(phi, theta, (s * 0.45, -0.15), (0.16, 0.12))
            shade *= 1 - 0.08 * g(phi, theta, (s * idn.eye_sep, idn.eye_height - 0.06), (0.12, 0.05))
        tint = shade[..., None] * (1 + red[..., None] * np.asarray((0.02, -0.07, -0.06), _F32)) * np.asarray(idn.skin_rgb, _F32)
        pore_region = _smoothstep(1.3, 0.9, np.abs(phi))
        beard = np.zeros_like(phi)
        if idn.stubble > 0:
            beard = _smoothstep(-0.2, -0.32, theta) * _smoothstep(1.25, 1.0, np.abs(phi))
            beard *= 1 - g(phi, theta, (0, idn.mouth_height), (0.3, 0.045))
        freckle_region = sum(g(phi, theta, (s * 0.3, -0.05), (0.2, 0.12)) for s in (-1, 1)) + g(phi, theta, (0, 0.0), (0.1, 0.15))
        hair_mask = self._hair_mask(phi, theta)
        smooth = up(np.dstack([tint, pore_region, beard, freckle_region, hair_mask]).astype(_F32))
        tint, pore_region, beard, freckle_region, hm = (smooth[..., :3], smooth[..., 3], smooth[..., 4],
                                                        smooth[..., 5], smooth[..., 6:7])

        # detail: pores, texel-scale mottling, static ageing lines, stubble
        dark = (idn.pores * 0.45) * cv2.GaussianBlur((rng.random((h, w), dtype=_F32) < 0.02).astype(_F32), (0, 0), 0.6)
        dark *= pore_region
        dark += 0.05 * cv2.GaussianBlur(rng.standard_normal((h, w), dtype=_F32), (0, 0), 0.7)
        lines = np.zeros((h, w), np.uint8)
        to_px = self._to_tex_px
        thin = max(1, round(0.004 / px))
        for s in (-1, 1):
            cx = s * (idn.eye_sep + 0.14 * idn.eye_size)
            for k in range(4):  # crow's feet
                a0 = -0.5 + k * 0.33 + rng.normal(0, 0.08)
                pts = [(cx + s * t * 0.09 * math.cos(a0), idn.eye_height + t * 0.09 * math.sin(a0)) for t in np.linspace(0.1, 1, 6)]
                cv2.polylines(lines, [to_px(pts)], False, 255, thin, cv2.LINE_AA)
            pts = [(s * (idn.eye_sep + (t - 0.5) * 0.2), idn.eye_height - 0.085 - 0.02 * (1 - (2 * t - 1) ** 2)) for t in np.linspace(0, 1, 9)]
            cv2.polylines(lines, [to_px(pts)], False, 160, thin, cv2.LINE_AA)  # under-eye
        dark += (idn.age * 0.25 / 255) * cv2.GaussianBlur(lines, (0, 0), 0.7).astype(_F32)
        if idn.stubble > 0:
            dots = cv2.GaussianBlur((rng.random((h, w), dtype=_F32) < 0.3).astype(_F32), (0, 0), 0.5)
            dark += (idn.stubble * 0.3) * beard * dots
        albedo = tint * (1 - np.clip(dark, -0.2, 0.8))[..., None]
        if idn.freckles > 0:
            spots = (rng.random((h, w), dtype=_F32) < 0.004).astype(_F32)
            spots = cv2.GaussianBlur(spots, (0, 0), max(0.7, 0.004 / px)) * 6
            f = np.clip(idn.freckles * spots * freckle_region, 0, 0.8)[..., None]
            albedo = albedo * (1 - f * np.asarray((0.3, 0.5, 0.65), _F32))
        # nostrils and ear bowls
        holes = np.zeros((h, w), np.uint8)
        for s in (-1, 1):
            c = to_px([(s * 0.055 * idn.nose_width, idn.nose_tip - 0.055)])[0]
            cv2.ellipse(holes, (int(c[0]), int(c[1])), (max(1, round(0.022 / px)), max(1, round(0.011 / px))),
                        s * 20, 0, 360, 255, -1, cv2.LINE_AA)
            c = to_px([(s * 1.52, 0.0)])[0]
            cv2.ellipse(holes, (int(c[0]), int(c[1])), (max(1, round(0.03 / px)), max(1, round(0.07 / px))), 0, 0, 360, 150, -1, cv2.LINE_AA)
        hole = cv2.GaussianBlur(holes, (0, 0), max(0.8, 0.006 / px)).astype(_F32) * _F32(0.8 / 255)
        albedo *= (1 - hole)[..., None]

        # hair: strokes along the combing direction (down and away from the parting), over the hair mask
        strands = np.full((h, w), 90, np.uint8)
        n_strokes = int(9000 * w / 2048) + 800
        thickness = max(1, round(0.0025 / px))
        p0 = rng.uniform(-math.pi, math.pi, n_strokes)
        t0 = rng.uniform(max(idn.hair_length, -0.6) - 0.1, 1.5, n_strokes)
        length = rng.uniform(0.08, 0.35, n_strokes)
        bend = rng.normal(0, 0.05, n_strokes)
        level = rng.integers(0, 6, n_strokes)
        sweep = np.sign(p0 - idn.hair_part + 1e-6) * (0.25 + 0.4 * idn.fringe) * (np.abs(p0) < 1.2)
        ts = np.linspace(0, 1, 5)[None, :]
        stretch = 1 / np.maximum(0.3, np.cos(np.minimum(1.4, np.abs(t0))))
        sp = p0[:, None] + (length * stretch)[:, None] * (sweep[:, None] * ts + bend[:, None] * ts * ts)
        st = t0[:, None] - length[:, None] * ts
        pts = to_px(np.stack([sp.ravel(), st.ravel()], 1)).reshape(n_strokes, 5, 2)
        for k in range(6):
            cv2.polylines(strands, list(pts[level == k]), False, int(40 + k * 36), thickness, cv2.LINE_AA)
        strands = cv2.GaussianBlur(strands, (0, 0), 0.5)
        hair = np.asarray(idn.hair_rgb, _F32) * (0.45 + strands.astype(_F32)[..., None] * _F32(0.9 / 255))
        albedo = albedo * (1 - hm) + hair * hm
        self.albedo = np.ascontiguousarray(_wrap_pad(np.clip(albedo * 255 + 0.5, 0, 255).astype(np.uint8), _EquirectGrid.PAD))

        # expression wrinkles: forehead (brow raise), glabella + nose bridge (frown, nose wrinkle),
        # nasolabial folds (smile), crow's feet (smile squint)
        det = np.zeros((h, w, 4), np.uint8)
        lw = max(1, round(0.005 / px))
        ch0 = np.zeros((h, w), np.uint8)
        for k in range(4):
            y = idn.brow_height + 0.09 + k * 0.055 + rng.normal(0, 0.008)
            pts_ = [(x, y + 0.012 * math.sin(7 * x + k) + 0.03 * x * x) for x in np.linspace(-0.5, 0.5, 21)]
            cv2.polylines(ch0, [to_px(pts_)], False, 255, lw, cv2.LINE_AA)
        ch1 = np.zeros((h, w), np.uint8)
        for s in (-1, 1):
            pts_ = [(s * (0.035 + 0.01 * t), idn.brow_height - 0.1 + t * 0.12) for t in np.linspace(0, 1, 5)]
            cv2.polylines(ch1, [to_px(pts_)], False, 255, lw, cv2.LINE_AA)
        for k in range(3):
            y = idn.eye_height - 0.02 - k * 0.035
            pts_ = [(x, y + 0.01 * x / 0.08) for x in np.linspace(-0.07, 0.07, 5)]
            cv2.polylines(ch1, [to_px(pts_)], False, 200, lw, cv2.LINE_AA)
        ch2 = np.zeros((h, w), np.uint8)
        ch3 = np.zeros((h, w), np.uint8)
        for s in (-1, 1):
            pts_ = [(s * (0.11 * idn.nose_width + 0.2 * t), idn.nose_tip - 0.02 - t * 0.33 + 0.05 * t * (1 - t)) for t in np.linspace(0, 1, 9)]
            cv2.polylines(ch2, [to_px(pts_)], False, 255, 2 * lw, cv2.LINE_AA)
            cx = s * (idn.eye_sep + 0.15 * idn.eye_size)
            for k in range(3):
                a0 = -0.6 + k * 0.45
                pts_ = [(cx + s * t * 0.1 * math.cos(a0), idn.eye_height + t * 0.1 * math.sin(a0)) for t in np.linspace(0.05, 1, 5)]
                cv2.polylines(ch3, [to_px(pts_)], False, 255, lw, cv2.LINE_AA)
        det[..., 0] = cv2.GaussianBlur(ch0, (0, 0), 0.8)
        det[..., 1] = cv2.GaussianBlur(ch1, (0, 0), 0.8)
        det[..., 2] = cv2.GaussianBlur(ch2, (0, 0), max(1.0, 0.008 / px))
        det[..., 3] = ch3
        self.wrinkles = np.ascontiguousarray(_wrap_pad(det, _EquirectGrid.PAD))

        # eyebrow hair, in brow-local coordinates (t along the brow 0..1, d across -1..1)
        bt = np.zeros((64, 256), np.uint8)
        polys = []
        for _ in range(700):
            tb = rng.uniform(0, 1)
            db = rng.uniform(-1, 1)
            ang = math.radians(25 + 50 * (1 - tb)) if tb < 0.25 else math.radians(rng.normal(12, 6))
            ln = rng.uniform(0.08, 0.2)
            polys.append(np.asarray([[tb * 255, (db + 1) * 31.5],
                                     [(tb + ln * math.cos(ang)) * 255, (db + 1) * 31.5 - ln * math.sin(ang) * 160]], np.int32))
        cv2.polylines(bt, polys, False, 255, 1, cv2.LINE_AA)
        self.brow_strands = cv2.GaussianBlur(bt, (0, 0), 0.6).astype(_F32) / 255
        streaks = rng.standard_normal(257)
        self.iris_streaks = cv2.GaussianBlur(streaks.reshape(1, -1), (0, 0), 1.2).ravel().astype(_F32)
        self.iris_streaks[-1] = self.iris_streaks[0]

    def _to_tex_px(self, pts: list[tuple[float, float]] | np.ndarray) -> np.ndarray:
        g = self.tex_grid
        arr = np.asarray(pts, np.float64)
        x = (arr[:, 0] + math.pi) / (2 * math.pi) * g.w - 0.5
        y = (math.pi / 2 - arr[:, 1]) / math.pi * g.h - 0.5
        return np.stack([x, y], axis=1).round().astype(np.int32)

    def blurred_albedo(self, sigma_rad: float) -> np.ndarray:
        """The albedo with detail removed (what a coarse volumetric avatar keeps), cached per sigma.

        Built at reduced size (the blur removes what the texels would hold); the renderer reads a
        texture's own size, so any padded equirectangular texture works.
        """
        key = round(float(sigma_rad), 6)
        if key not in self._blurred:
            sigma = sigma_rad / self.tex_grid.texel()
            if sigma < 0.3:
                self._blurred[key] = self.albedo
            else:
                pad = _EquirectGrid.PAD
                core = self.albedo[:, pad:-pad]
                f = 1
                while f < 8 and sigma / (2 * f) >= 1.5 and core.shape[0] // (2 * f) >= 64:
                    f *= 2
                small = cv2.resize(core, (core.shape[1] // f, core.shape[0] // f), interpolation=cv2.INTER_AREA) if f > 1 else core
                small = cv2.GaussianBlur(small, (0, 0), sigma / f)
                self._blurred[key] = np.ascontiguousarray(_wrap_pad(small, pad))
        return self._blurred[key]


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------

_KEY = np.asarray((-0.35, 0.45, 0.82)) / np.linalg.norm((-0.35, 0.45, 0.82))
_FILL = np.asarray((0.6, -0.05, 0.8)) / np.linalg.norm((0.6, -0.05, 0.8))
_HALF = (_KEY + (0, 0, 1)) / np.linalg.norm(_KEY + (0, 0, 1))


@dataclass
class RenderedView:
    """One rendered image: ``rgb`` float32 (N,N,3) in 0..1 (0 outside), ``mask`` bool (N,N),
    ``normal`` float32 (N,N,3) camera-space unit normals (0 outside)."""

    rgb: np.ndarray
    mask: np.ndarray
    normal: np.ndarray


def _check_codes(expression: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(expression, _F32).reshape(-1)
    p = np.asarray(pose, np.float64).reshape(-1)
    if e.shape != (EXPRESSION_DIM,) or not np.isfinite(e).all():
        raise ConsistentAvatarError(f"expression must be {EXPRESSION_DIM} finite floats, got shape {np.shape(expression)}")
    if p.shape != (POSE_DIM,) or not np.isfinite(p).all():
        raise ConsistentAvatarError(f"pose must be {POSE_DIM} finite floats (axis-angle, translation), got shape {np.shape(pose)}")
    return e, p


class HeadRenderer:
    """Renders a :class:`HeadModel` at ``res``² under an expression code and a pose."""

    def __init__(self, model: HeadModel, res: int, iterations: int = 4) -> None:
        if not 4 <= int(res) <= MAX_RES:  # the coarse proxy of a 16² actor renders at 8²
            raise ConsistentAvatarError(f"render resolution must be in 4..{MAX_RES}, got {res}")
        self.model = model
        self.res = int(res)
        self.iterations = iterations
        self.pix = 2 * VIEW_HALF_EXTENT / self.res  # head units per pixel at zero translation

    # ---- projection helpers ---------------------------------------------------------------------

    def _project(self, R: np.ndarray, t: np.ndarray, sc: float, phi: np.ndarray, theta: np.ndarray, r: float) -> np.ndarray:
        q = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta), np.cos(theta) * np.cos(phi)], -1) * r
        c = q @ R.T + t
        col = sc * c[:, 0] / self.pix + self.res / 2
        row = self.res / 2 - sc * c[:, 1] / self.pix
        return np.stack([row, col], -1)

    def _feature_rect(self, box: tuple[float, float, float, float], R, t, sc, origin: tuple[int, int],
                      shape: tuple[int, int]) -> tuple[slice, slice] | None:
        p0, p1, t0, t1 = box
        pp, tt = np.meshgrid(np.linspace(p0, p1, 4), np.linspace(t0, t1, 4))
        rc = self._project(R, t, sc, pp.ravel(), tt.ravel(), 1.15)
        rc = np.concatenate([rc, self._project(R, t, sc, pp.ravel(), tt.ravel(), 0.8)])
        r0 = max(0, int(math.floor(rc[:, 0].min())) - 2 - origin[0])
        r1 = min(shape[0], int(math.ceil(rc[:, 0].max())) + 3 - origin[0])
        c0 = max(0, int(math.floor(rc[:, 1].min())) - 2 - origin[1])
        c1 = min(shape[1], int(math.ceil(rc[:, 1].max())) + 3 - origin[1])
        if r1 <= r0 or c1 <= c0:
            return None
        return slice(r0, r1), slice(c0, c1)

    # ---- main entry -----------------------------------------------------------------------------

    def render(self, expression: np.ndarray, pose: np.ndarray, albedo: np.ndarray | None = None,
               wrinkles: bool = True) -> RenderedView:
        """Ray-cast the head (and neck) under ``expression`` (100,) and ``pose`` (6,).

        ``albedo`` replaces the identity's texture (the coarse proxy passes a blurred one);
        ``wrinkles`` toggles expression wrinkles (a coarse proxy loses them).
        """
        e, p = _check_codes(expression, pose)
        model, idn, n = self.model, self.model.identity, self.res
        R = axis_angle_to_matrix(p[:3])
        t = p[3:] / HEAD_UNIT_M
        depth = CAMERA_DISTANCE_M / HEAD_UNIT_M
        if t[2] > depth * 0.5:
            raise ConsistentAvatarError(f"pose translation z={p[5]:.3f} m puts the head too close to the camera")
        sc = depth / (depth - t[2])
        pix = self.pix
        rgb = np.zeros((n, n, 3), _F32)
        normal = np.zeros((n, n, 3), _F32)
        mask = np.zeros((n, n), bool)
        zbuf = np.full((n, n), -np.inf, _F32)

        box = self._head_box(e, R, t, sc)
        if box is not None:
            self._render_head(e, R, t, sc, box, albedo, wrinkles, rgb, normal, mask, zbuf)
        self._render_neck(t, sc, rgb, normal, mask, zbuf)
        return RenderedView(rgb, mask, normal)

    def _head_box(self, e, R, t, sc) -> tuple[int, int, int, int] | None:
        """Tight pixel box of the posed head: rotate a sparse hull of the radius map, add a margin
        for the active blendshapes."""
        model, n, pix = self.model, self.res, self.pix
        margin = sum(abs(float(e[dim])) * peak for dim, peak in model.blend_peaks) + 0.02
        cam = model.hull @ R.T
        lo = sc * (cam[:, :2].min(0) - margin + t[:2]) / pix
        hi = sc * (cam[:, :2].max(0) + margin + t[:2]) / pix
        j0, j1 = max(0, int(math.floor(lo[0] + n / 2)) - 1), min(n, int(math.ceil(hi[0] + n / 2)) + 1)
        i0, i1 = max(0, int(math.floor(n / 2 - hi[1])) - 1), min(n, int(math.ceil(n / 2 - lo[1])) + 1)
        return (i0, i1, j0, j1) if (i1 > i0 and j1 > j0) else None

    def _rays(self, rows: np.ndarray, cols: np.ndarray, R, t, sc):
        """Per-pixel ray origin ``o`` (head frame, orthogonal to the view direction) and |o|²."""
        n, pix = self.res, self.pix
        X = (cols.astype(_F32) - _F32(n / 2)) * _F32(pix)
        Y = (_F32(n / 2) - rows.astype(_F32)) * _F32(pix)
        a = (X / _F32(sc) - _F32(t[0]))[None, :]
        b = (Y / _F32(sc) - _F32(t[1]))[:, None]
        Rt = R.T.astype(_F32)
        ox = Rt[0, 0] * a + Rt[0, 1] * b
        oy = Rt[1, 0] * a + Rt[1, 1] * b
        oz = Rt[2, 0] * a + Rt[2, 1] * b
        return ox, oy, oz, a * a + b * b

    def _march(self, ox, oy, oz, rho2, d, r, geo_map):
        """One fixed-point step: intersect the ray with the sphere of the current radius estimate,
        look the map up in that direction. Returns the lookup and the point's (phi, theta)."""
        gg = self.model.geo_grid
        s = np.sqrt(np.maximum(r * r - rho2, 0))
        px = ox + s * d[0]
        py = oy + s * d[1]
        pz = oz + s * d[2]
        pr = np.sqrt(rho2 + s * s)
        phi = np.arctan2(px, pz)
        theta = np.arcsin(np.clip(py / np.maximum(pr, 1e-6), -1, 1))
        look = cv2.remap(geo_map, phi * gg.sx + gg.bx, theta * gg.sy + gg.by, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
        return look, (px, py, pz, pr, phi, theta)

    def _render_head(self, e, R, t, sc, box, albedo_tex, wrinkles, rgb, normal, mask, zbuf) -> None:
        model, idn = self.model, self.model.identity
        pix = self.pix
        i0, i1, j0, j1 = box
        H, W = i1 - i0, j1 - j0
        d = R.T[:, 2].astype(_F32)
        geo = model.geometry_for(e)
        r_only = np.ascontiguousarray(geo[..., 0])
        r0 = _F32(sum(idn.axes) / 3)

        # Fixed-point iterations on a half-resolution grid (the radius field is smooth, also across
        # the silhouette, where misses still look the map up at the ray's closest point), then
        # upsampled; the last step runs at full resolution.
        steps = max(1, self.iterations - 1)
        if H >= 48 and W >= 48:
            hh, wh = (H + 1) // 2, (W + 1) // 2
            rows = i0 + 2 * np.arange(hh) + 1.0
            cols = j0 + 2 * np.arange(wh) + 1.0
            hx, hy, hz, hrho2 = self._rays(rows, cols, R, t, sc)
            r = np.full(hrho2.shape, r0, _F32)
            for it in range(steps):
                r_new, _ = self._march(hx, hy, hz, hrho2, d, r, r_only)
                r = r_new if it == 0 else _F32(0.7) * r_new + _F32(0.3) * r
            r = cv2.resize(r, (2 * wh, 2 * hh), interpolation=cv2.INTER_LINEAR)[:H, :W]
            ox, oy, oz, rho2 = self._rays(np.arange(i0, i1) + 0.5, np.arange(j0, j1) + 0.5, R, t, sc)
        else:
            ox, oy, oz, rho2 = self._rays(np.arange(i0, i1) + 0.5, np.arange(j0, j1) + 0.5, R, t, sc)
            r = np.full(rho2.shape, r0, _F32)
            for it in range(steps):
                r_new, _ = self._march(ox, oy, oz, rho2, d, r, r_only)
                r = r_new if it == 0 else _F32(0.7) * r_new + _F32(0.3) * r
        g4, (px, py, pz, pr, phi, theta) = self._march(ox, oy, oz, rho2, d, r, geo)
        r_s, r_phi, r_theta, ao = g4[..., 0], g4[..., 1], g4[..., 2], g4[..., 3]
        hit = (r * r > rho2) & (r_s * r_s > rho2 * 0.995)
        if not hit.any():
            return

        # surface normal of |p| = r(phi, theta) in the head frame, then camera frame
        inv_pr = 1 / np.maximum(pr, 1e-6)
        rxz = np.sqrt(px * px + pz * pz)
        inv_rxz = 1 / np.maximum(rxz, 1e-6)
        sin_p, cos_p = px * inv_rxz, pz * inv_rxz
        sin_t, cos_t = py * inv_pr, rxz * inv_pr
        k_phi = r_phi / (r_s * np.maximum(cos_t, 0.05))
        k_theta = r_theta / r_s
        nx = px * inv_pr - k_phi * cos_p + k_theta * sin_t * sin_p
        ny = py * inv_pr - k_theta * cos_t
        nz = pz * inv_pr + k_phi * sin_p + k_theta * sin_t * cos_p
        inv = 1 / np.sqrt(nx * nx + ny * ny + nz * nz)
        nx, ny, nz = nx * inv, ny * inv, nz * inv
        Rf = R.astype(_F32)
        cx = Rf[0, 0] * nx + Rf[0, 1] * ny + Rf[0, 2] * nz
        cy = Rf[1, 0] * nx + Rf[1, 1] * ny + Rf[1, 2] * nz
        cz = Rf[2, 0] * nx + Rf[2, 1] * ny + Rf[2, 2] * nz
        cz = np.maximum(cz, 0.0)
        inv = 1 / np.sqrt(cx * cx + cy * cy + cz * cz + 1e-12)
        cx, cy, cz = cx * inv, cy * inv, cz * inv

        # albedo: texture (lower face follows the opening jaw) + analytic moving parts
        jaw = float(np.clip(e[Expr.JAW_OPEN], 0, 1.5))
        theta_tex = theta
        if jaw > 0.01:
            drop = jaw * 0.1 * _smoothstep(idn.mouth_height + 0.02, idn.mouth_height - 0.12, theta) \
                * _smoothstep(-1.5, -0.95, theta) * np.exp(-((phi / 0.7) ** 2))
            theta_tex = theta + drop
        tex = model.albedo if albedo_tex is None else albedo_tex
        tg = _EquirectGrid(tex.shape[0], tex.shape[1] - 2 * _EquirectGrid.PAD)
        alb = cv2.remap(tex, phi * tg.sx + tg.bx, theta_tex * tg.sy + tg.by, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE).astype(_F32)
        alb *= _F32(1 / 255)
        if wrinkles:
            tg = model.tex_grid
            w = cv2.remap(model.wrinkles, phi * tg.sx + tg.bx, theta_tex * tg.sy + tg.by, cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
            gains = np.asarray([max(e[Expr.BROW_RAISE], 0), max(e[Expr.BROW_FROWN], 0) + 1.6 * max(e[Expr.NOSE_WRINKLE], 0),
                                max(e[Expr.SMILE], 0), 0.7 * max(e[Expr.SMILE], 0)], _F32) * _F32(0.3 / 255)
            if gains.any():
                dark = w.astype(_F32) @ gains
                alb *= (1 - np.minimum(dark, 0.6))[..., None]

        ang_pix = pix / sc  # radians per pixel near the face centre (radius ~1)
        self._draw_features(e, R, t, sc, (i0, j0), phi, theta, alb, ang_pix)

        # shading: wrapped key light, fill, sky ambient, Blinn specular
        kd = (cx * _F32(_KEY[0]) + cy * _F32(_KEY[1]) + cz * _F32(_KEY[2]) + 0.3) * _F32(1 / 1.3)
        fd = cx * _F32(_FILL[0]) + cy * _F32(_FILL[1]) + cz * _F32(_FILL[2])
        light = 0.78 * np.maximum(kd, 0) + 0.2 * np.maximum(fd, 0) + 0.26 + 0.08 * cy
        hd = np.maximum(cx * _F32(_HALF[0]) + cy * _F32(_HALF[1]) + cz * _F32(_HALF[2]), 0)
        hd2 = hd * hd
        hd4 = hd2 * hd2
        spec = 0.11 * hd4 * hd4 * hd4 * hd4 * hd4
        col = alb * (light * ao)[..., None] + spec[..., None]

        z = np.sqrt(np.maximum(r * r - rho2, 0)) + _F32(t[2])
        sl = (slice(i0, i1), slice(j0, j1))
        hitf = hit.astype(_F32)[..., None]
        rgb[sl] = col * hitf
        normal[sl] = np.stack([cx, cy, cz], -1) * hitf
        mask[sl] = hit
        zbuf[sl] = np.where(hit, z, _F32(-np.inf))

    def _draw_features(self, e, R, t, sc, origin, phi, theta, alb, ang_pix) -> None:
        idn = self.model.identity
        shape = phi.shape
        for s in (-1, 1):
            ex = s * idn.eye_sep
            hw = 0.12 * idn.eye_size
            sl = self._feature_rect((ex - 1.3 * hw, ex + 1.3 * hw, idn.eye_height - hw, idn.eye_height + hw), R, t, sc, origin, shape)
            if sl is not None:
                self._draw_eye(e, s, phi[sl], theta[sl], alb[sl], ang_pix)
            inner = idn.eye_sep - 0.25
            outer = idn.eye_sep + 0.27
            bh = idn.brow_height
            sl = self._feature_rect((s * (inner - 0.06), s * (outer + 0.03), bh - 0.12, bh + 0.16), R, t, sc, origin, shape)
            if sl is not None:
                self._draw_brow(e, s, phi[sl], theta[sl], alb[sl], ang_pix)
        mw = idn.mouth_width * 1.45
        sl = self._feature_rect((-mw, mw, idn.mouth_height - 0.24, idn.mouth_height + 0.12), R, t, sc, origin, shape)
        if sl is not None:
            self._draw_mouth(e, phi[sl], theta[sl], alb[sl], ang_pix)

    def _draw_eye(self, e, s, phi, theta, alb, ang_pix) -> None:
        idn = self.model.identity
        hw = 0.12 * idn.eye_size
        u = (phi - s * idn.eye_sep) * _F32(s / hw)  # + towards the outer corner
        v = (theta - idn.eye_height) * _F32(1 / hw)
        eps = max(ang_pix / hw, 0.02)
        blink = float(np.clip(e[Expr.BLINK], 0, 1))
        wide = float(np.clip(e[Expr.EYE_WIDE], 0, 1.3))
        squint = (float(np.clip(0.35 * e[Expr.SMILE], 0, 0.35)) + 0.2 * max(float(e[Expr.BROW_FROWN]), 0)
                  + 0.35 * max(float(e[Expr.NOSE_WRINKLE]), 0))
        shape = np.clip(1 - u * u, 0, 1)
        close = 0.1 * u - 0.1 * shape  # where the lids meet
        opening = 1 - blink
        upper = close + (0.52 * (1 + 0.6 * wide) - 0.12 * squint) * np.sqrt(shape) * opening
        lower = close - (0.2 * (1 + 0.25 * wide) - 0.1 * squint) * shape ** 0.8 * opening
        inside = _smoothstep(-eps, eps, upper - v) * _smoothstep(-eps, eps, v - lower) * _smoothstep(-eps, eps, 1 - np.abs(u))
        # eyeball: sclera, iris with streaks and limbal ring, pupil, catch light
        gx = 0.3 * float(np.clip(e[GAZE_DIMS[0]] / 0.08, -1, 1))
        gy = 0.15 * float(np.clip(e[GAZE_DIMS[1]] / 0.08, -1, 1))
        du = u - s * gx
        dv = v - gy
        dist = np.sqrt(du * du + dv * dv)
        ri = 0.42
        sclera = np.asarray((0.92, 0.89, 0.86), _F32) * (1 - 0.3 * np.abs(u) ** 3)[..., None]
        ang = (np.arctan2(dv, du) + np.pi) * _F32(256 / (2 * np.pi))
        streak = self.model.iris_streaks[np.clip(ang.astype(np.int32), 0, 256)]
        iris = np.asarray(idn.iris_rgb, _F32) * ((0.8 + 0.25 * streak) * (0.45 + 0.55 * _smoothstep(ri, 0.75 * ri, dist)))[..., None]
        pupil_r = 0.15 + 0.04 * wide
        iris = iris * (1 - _smoothstep(pupil_r + eps, pupil_r - eps, dist))[..., None] + 0.02 * _smoothstep(pupil_r + eps, pupil_r - eps, dist)[..., None]
        in_iris = _smoothstep(ri + eps, ri - eps, dist)[..., None]
        ball = sclera * (1 - in_iris) + iris * in_iris
        ball = ball * (0.5 + 0.5 * _smoothstep(0.0, 0.35, upper - v))[..., None]  # lid shadow
        hl = _smoothstep(0.1, 0.05, np.sqrt((du + 0.13 * s) ** 2 + (dv - 0.13) ** 2))
        ball = ball + 1.5 * hl[..., None]
        m = inside[..., None]
        alb[:] = alb * (1 - m) + ball * m
        # lashes on the upper lid, a softer lower lash line, the lid crease
        lash = _smoothstep(-eps, eps, v - upper + 0.02) * _smoothstep(0.14 + eps, 0.1 - eps, v - upper) \
            * _smoothstep(1.08, 0.9, np.abs(u)) * (0.9 - 0.3 * blink)
        low = _smoothstep(-eps, eps, lower - v) * _smoothstep(0.07 + eps, 0.04, lower - v) * _smoothstep(1.0, 0.7, np.abs(u)) * 0.4 * opening
        crease_v = close + 0.32 + 0.45 * np.sqrt(shape) * (0.4 + 0.6 * opening) + 0.25 * wide
        crease = _smoothstep(0.08, 0.0, np.abs(v - crease_v)) * _smoothstep(1.1, 0.6, np.abs(u)) * 0.22
        dark = np.clip(lash + low, 0, 1)[..., None]
        alb[:] = alb * (1 - dark) + np.asarray((0.05, 0.04, 0.04), _F32) * dark
        alb *= (1 - crease)[..., None]

    def _draw_brow(self, e, s, phi, theta, alb, ang_pix) -> None:
        idn = self.model.identity
        raise_ = float(e[Expr.BROW_RAISE])
        frown = max(float(e[Expr.BROW_FROWN]), 0.0) + 0.4 * max(float(e[Expr.NOSE_WRINKLE]), 0.0)
        inner_up = max(float(e[Expr.BROW_INNER_RAISE]), 0.0)
        inner = idn.eye_sep - 0.25 - 0.035 * frown
        outer = idn.eye_sep + 0.27
        tt = (phi * _F32(s) - _F32(inner)) * _F32(1 / (outer - inner))
        tc = np.clip(tt, 0, 1)
        centre = (idn.brow_height + 0.08 * raise_ - 0.035 * frown
                  + idn.brow_arch * np.sin(np.pi * np.minimum(tc / 0.7, 1) * 0.5) * 2 - idn.brow_arch * _smoothstep(0.7, 1.0, tc)
                  + (1 - tc) ** 2 * (0.1 * inner_up - 0.05 * frown) - tc * tc * 0.02 * inner_up)
        half = idn.brow_thickness * (1.1 - 0.65 * tc) * 0.5
        d = (theta - centre) / half
        epsd = max(ang_pix, 0.004) / half
        alpha = _smoothstep(1 + epsd, 1 - epsd, np.abs(d)) * _smoothstep(-0.04, 0.05, tt) * _smoothstep(1.03, 0.88, tt)
        strands = cv2.remap(self.model.brow_strands, (tc * 255).astype(_F32), ((np.clip(d, -1, 1) + 1) * 31.5).astype(_F32),
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        a = (alpha * (0.6 + 0.4 * strands))[..., None]
        colour = np.asarray(idn.hair_rgb, _F32) * 0.55 + 0.015
        alb[:] = alb * (1 - a) + colour * a

    def _draw_mouth(self, e, phi, theta, alb, ang_pix) -> None:
        idn = self.model.identity
        smile = float(e[Expr.SMILE])
        jaw = float(np.clip(e[Expr.JAW_OPEN], 0, 1.5))
        pucker = float(np.clip(e[Expr.LIP_PUCKER], 0, 1.2))
        stretch = float(np.clip(e[Expr.LIP_STRETCH], 0, 1.3))
        ulr = float(np.clip(e[Expr.UPPER_LIP_RAISE] + 0.3 * max(float(e[Expr.NOSE_WRINKLE]), 0), 0, 1.5))
        asym = float(e[Expr.LIP_CORNER_ASYM])
        eps = max(ang_pix, 0.003)
        mw = idn.mouth_width * (1 + 0.2 * max(smile, 0) + 0.25 * stretch - 0.35 * pucker + 0.08 * abs(asym))
        u = phi * _F32(1 / mw)
        shape = np.clip(1 - u * u, 0, 1)
        corner = u * u
        side = np.where(u < 0, _F32(1.0), _F32(-0.25))  # + asym lifts the subject's right (image-left) corner
        lift = (0.06 * smile + 0.055 * asym * side - 0.015 * stretch) * corner
        c = idn.mouth_height + lift
        gap = (0.2 * jaw + 0.03 * ulr + 0.025 * max(smile, 0)) * shape ** (0.6 - 0.3 * pucker)
        up_in = c + 0.3 * gap + 0.035 * ulr * shape
        lo_in = c - 0.7 * gap
        bow = 1 - 0.3 * np.exp(-(u / 0.13) ** 2)
        tu = idn.lip_upper * (1 + 0.5 * pucker - 0.45 * stretch - 0.2 * max(smile, 0)) * np.sqrt(shape) * bow
        tl = idn.lip_lower * (1 + 0.5 * pucker - 0.4 * stretch - 0.1 * max(smile, 0)) * shape ** 0.45
        up_out = up_in + tu
        lo_out = lo_in - tl
        inside_x = _smoothstep(-0.02, 0.02, 1 - np.abs(u))
        lips = _smoothstep(-eps, eps, up_out - theta) * _smoothstep(-eps, eps, theta - lo_out) * inside_x
        interior = _smoothstep(-eps, eps, up_in - theta) * _smoothstep(-eps, eps, theta - lo_in) * inside_x
        lip_rgb = np.asarray(idn.lip_rgb, _F32)
        fine = 0.06 * float(_smoothstep(0.006, 0.003, np.float32(ang_pix)))  # lip lines only where pixels resolve them
        grain = (1 - fine) + fine * np.sin(phi * _F32(2 * np.pi / 0.012))
        lower_shine = 1 + 0.12 * _smoothstep(0, 1, (lo_in - theta) / np.maximum(tl, 1e-4)) * (theta < lo_in)
        lipc = lip_rgb * (grain * lower_shine)[..., None]
        a = np.clip(lips - interior, 0, 1)[..., None]
        alb[:] = alb * (1 - a) + lipc * a
        # mouth interior: dark cavity, upper teeth under the upper lip, lower teeth when wide open
        depth_v = (theta - lo_in) / np.maximum(up_in - lo_in, 1e-4)
        cavity = np.asarray((0.16, 0.05, 0.05), _F32) * (0.6 + 0.4 * depth_v)[..., None]
        tooth = 0.8 + 0.2 * np.abs(np.sin(phi * _F32(np.pi / 0.03))) ** 0.3
        upper_teeth = _smoothstep(0.026 + eps, 0.022, up_in - theta) * _smoothstep(0.7, 0.5, np.abs(u))
        lower_teeth = _smoothstep(0.014 + eps, 0.01, theta - lo_in) * _smoothstep(0.55, 0.35, np.abs(u)) * float(jaw > 0.15)
        teeth = np.clip(upper_teeth + lower_teeth, 0, 1)
        inner_col = cavity * (1 - teeth)[..., None] + (np.asarray((0.86, 0.83, 0.76), _F32) * tooth[..., None]) * teeth[..., None]
        m = interior[..., None]
        alb[:] = alb * (1 - m) + inner_col * m
        # the line where the lips meet, always visible
        line = _smoothstep(eps * 1.5, 0, np.abs(theta - c)) * (gap < 0.01) * shape ** 0.3 * 0.7
        alb *= (1 - line)[..., None]
        # shadowed dimples at the corners, which follow the corners' lift
        for k in (-1.0, 1.0):
            corner_theta = idn.mouth_height + 0.06 * smile - 0.015 * stretch + 0.055 * asym * (1.0 if k < 0 else -0.25)
            dist = np.sqrt((phi - k * mw) ** 2 + (theta - corner_theta) ** 2)
            alb *= (1 - 0.25 * _smoothstep(0.035, 0.0, dist))[..., None]

    def _render_neck(self, t, sc, rgb, normal, mask, zbuf) -> None:
        """A vertical cylinder under the head (does not rotate with it), shaded like skin."""
        idn = self.model.identity
        n, pix = self.res, self.pix
        radius = 0.4 * idn.axes[0] / 0.8
        top_y = -0.45
        cz = -0.2
        i_top = max(0, int(math.floor(n / 2 - (sc * (t[1] + top_y)) / pix)))
        j0 = max(0, int(math.floor((sc * (t[0] - radius)) / pix + n / 2)))
        j1 = min(n, int(math.ceil((sc * (t[0] + radius)) / pix + n / 2)))
        if i_top >= n or j1 <= j0:
            return
        X = ((np.arange(j0, j1, dtype=_F32) + 0.5) - n / 2) * _F32(pix)
        Y = (n / 2 - (np.arange(i_top, n, dtype=_F32) + 0.5)) * _F32(pix)
        a = (X / _F32(sc) - _F32(t[0]))[None, :]
        b = (Y / _F32(sc) - _F32(t[1]))[:, None]
        inside = np.broadcast_to(np.abs(a) < radius, (len(Y), len(X)))
        zc = np.sqrt(np.maximum(radius * radius - a * a, 0)) / radius
        z = cz + radius * zc + _F32(t[2])
        z = np.broadcast_to(z, inside.shape)
        sl = (slice(i_top, n), slice(j0, j1))
        vis = inside & (z > zbuf[sl])
        if not vis.any():
            return
        nx = np.broadcast_to(a / radius, inside.shape)
        nzz = np.broadcast_to(zc, inside.shape)
        light = 0.78 * np.maximum((nx * _F32(_KEY[0]) + nzz * _F32(_KEY[2]) + 0.3) / 1.3, 0) + 0.2 * np.maximum(nx * _F32(_FILL[0]) + nzz * _F32(_FILL[2]), 0) + 0.26
        shadow = 0.55 + 0.45 * _smoothstep(-0.75, -1.15, b)  # under the chin
        col = np.asarray(idn.skin_rgb, _F32) * 0.93 * (light * shadow)[..., None]
        rgb[sl][vis] = col[vis]
        normal[sl][vis] = np.stack([nx, np.zeros_like(nx), nzz], -1)[vis]
        mask[sl] |= vis
        zbuf[sl][vis] = z[vis]


# --------------------------------------------------------------------------------------------------
# the stage-1 proxy and the full per-frame output
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage1Degradation:
    """How far the coarse (INSTA-like) render falls short of the real frame, from one strength.

    The paper's stage-1 failure modes: lost high-frequency detail (lower render resolution,
    blurred albedo, no expression wrinkles), small expression/pose errors (damped and biased codes
    plus per-frame jitter) and frame-to-frame flicker (per-frame brightness, colour and noise).
    Strength 0 makes the coarse render identical to the real one; 1 is the default.
    """

    strength: float
    coarse_scale: float  # coarse render resolution / output resolution
    texture_blur_rad: float  # Gaussian sigma on the albedo, radians of the head surface
    expression_damping: float  # coarse expression = (1 - damping) * true + errors
    expression_bias_std: float  # slowly varying error on the semantic dims
    expression_jitter_std: float  # independent per-frame error on the semantic dims
    pose_rot_bias_std: float  # radians, slowly varying
    pose_rot_jitter_std: float  # radians, per frame
    pose_trans_jitter_std: float  # metres, per frame
    brightness_flicker: float  # std of a per-frame gain
    colour_flicker: float  # std of per-frame per-channel gains
    noise_std: float  # per-frame pixel noise (0..1 units) at the coarse resolution

    @classmethod
    def from_strength(cls, strength: float) -> "Stage1Degradation":
        s = float(strength)
        if not (math.isfinite(s) and 0.0 <= s <= 4.0):
            raise ConsistentAvatarError(f"degradation strength must be a finite number in 0..4, got {strength!r}")
        return cls(
            strength=s,
            coarse_scale=1.0 / (1.0 + s),
            texture_blur_rad=0.012 * s,
            expression_damping=min(0.8, 0.2 * s),
            expression_bias_std=0.06 * s,
            expression_jitter_std=0.06 * s,
            pose_rot_bias_std=0.012 * s,
            pose_rot_jitter_std=0.006 * s,
            pose_trans_jitter_std=0.0008 * s,
            brightness_flicker=0.035 * s,
            colour_flicker=0.015 * s,
            noise_std=0.02 * s,
        )

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class FrameOutput:
    """Everything one frame writes (uint8, N×N): the real frame and its mask, the true normal map,
    and the stage-1 coarse RGB, normal map and mask. Normal maps are encoded (n + 1) / 2 * 255."""

    rgb: np.ndarray
    mask: np.ndarray  # 0 / 255
    normal: np.ndarray
    coarse_rgb: np.ndarray
    coarse_normal: np.ndarray
    coarse_mask: np.ndarray  # 0 / 255


def encode_normals(normal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Camera-space unit normals -> uint8 RGB (n + 1) / 2 * 255, background 0."""
    enc = cv2.convertScaleAbs(normal, alpha=127.5, beta=127.5)  # rounds and saturates to uint8
    return enc * mask.astype(np.uint8)[..., None]


def decode_normals(encoded: np.ndarray) -> np.ndarray:
    """uint8 (n + 1) / 2 * 255 -> float32 normals in -1..1 (not renormalised)."""
    return encoded.astype(_F32) * _F32(2 / 255) - 1


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def texture_width_for(res: int) -> int:
    """About two texels per output pixel on the face (the "mip level" for ``res``): pores and hair
    strokes land at pixel scale without the sparkle a much finer texture would alias into."""
    return int(min(4096, max(256, 2 ** math.ceil(math.log2(3.2 * res)))))


class FrameRenderer:
    """One actor's renderer: the real frame from the true codes and the stage-1 proxy from perturbed
    codes (see :func:`.motion.stage1_codes`), at ``res``²."""

    def __init__(self, identity: HeadIdentity, res: int, degradation: Stage1Degradation) -> None:
        if not MIN_RES <= int(res) <= MAX_RES:
            raise ConsistentAvatarError(f"res must be in {MIN_RES}..{MAX_RES}, got {res}")
        self.res = int(res)
        self.degradation = degradation
        self.model = HeadModel(identity, texture_width_for(self.res))
        self.real = HeadRenderer(self.model, self.res)
        self.coarse_res = max(MIN_RES // 2, int(round(self.res * degradation.coarse_scale)))
        self.coarse = HeadRenderer(self.model, self.coarse_res) if degradation.strength > 0 else None
        self.coarse_albedo = self.model.blurred_albedo(degradation.texture_blur_rad)

    def render(self, expression: np.ndarray, pose: np.ndarray, coarse_expression: np.ndarray,
               coarse_pose: np.ndarray, rng: np.random.Generator) -> FrameOutput:
        """``rng`` drives this frame's flicker; seed it per frame so frames are independent."""
        view = self.real.render(expression, pose)
        rgb = _to_u8(view.rgb)
        mask = view.mask.astype(np.uint8) * 255
        normal = encode_normals(view.normal, view.mask)
        if self.coarse is None:
            return FrameOutput(rgb, mask, normal, rgb.copy(), normal.copy(), mask.copy())
        deg = self.degradation
        cv = self.coarse.render(coarse_expression, coarse_pose, albedo=self.coarse_albedo, wrinkles=False)
        m = cv.mask.astype(_F32)
        gain = (1 + deg.brightness_flicker * rng.standard_normal()) * (1 + deg.colour_flicker * rng.standard_normal(3))
        noise = rng.standard_normal(cv.rgb.shape).astype(_F32) * _F32(deg.noise_std)
        noise = cv2.GaussianBlur(noise, (0, 0), 0.6)
        crgb = (cv.rgb * gain.astype(_F32) + noise) * m[..., None]
        n = self.res
        if self.coarse_res != n:
            crgb = cv2.resize(crgb, (n, n), interpolation=cv2.INTER_LINEAR)
            cnorm = cv2.resize(cv.normal, (n, n), interpolation=cv2.INTER_LINEAR)
            cmask = cv2.resize(m, (n, n), interpolation=cv2.INTER_LINEAR) > 0.5
            nx, ny, nz = cnorm[..., 0], cnorm[..., 1], cnorm[..., 2]
            length = np.sqrt(nx * nx + ny * ny + nz * nz)
            cnorm *= (1 / np.maximum(length, 1e-3))[..., None]
            crgb *= cmask[..., None]
        else:
            cnorm, cmask = cv.normal, cv.mask
        return FrameOutput(rgb, mask, normal, _to_u8(crgb), encode_normals(cnorm, cmask), cmask.astype(np.uint8) * 255)
