"""Synthetic lumbar CT phantoms in HU, seeded, resembling postoperative lumbar CT.

Anatomy (adult sizes in mm, scaled per case): vertebrae T12-L5 (vertebral body with a
cortical shell and cancellous core, pedicles and laminae around the spinal canal, spinous
and transverse processes, articular processes), intervertebral discs (annulus, nucleus),
the spinal canal (epidural fat, thecal sac), the sacrum (S1-S3, alae) and the iliac wings
at the bottom (the pelvic brim at the L4-L5 level), psoas, quadratus lumborum, erector
spinae and abdominal wall muscles, subcutaneous and visceral fat, skin, bowel with gas,
liver, spleen, kidneys, aorta, IVC and bladder. On request, titanium pedicle screws and
rods (a posterior fusion over 2-3 levels, sometimes with a laminectomy).

Per-case variation: skeletal size, lordosis, scoliosis, axial rotation of each vertebra,
bone density (cancellous and cortical HU), body habitus (width, depth, fat), muscle bulk,
position of the spine in the field of view, bowel gas.

Following torchio, the random parameters are sampled first (:func:`sample_params`, a
frozen :class:`PhantomParams` that can be logged) and then drawn deterministically
(:func:`render_phantom`). Drawing uses approximate signed distances of simple primitives
(elliptic cylinders, ellipsoids, boxes, capsules) in each vertebra's local frame along a
curved centreline: the union of a vertebra's primitives is bone, its outer millimetre is
cortex, and voxels on a surface take the partial volume of what they cover.

The volume is in the canonical orientation of :mod:`cvaa.data.preprocess` (array
``(D, H, W)`` = S->I, A->P, R->L; direction ``diag(1, 1, -1)``), centred on the physical
origin. Grids coarser than 4 mm are drawn at a finer spacing and block-averaged, so thin
cortex and screws show up as partial volume, as in a real coarse CT.

Example:
    >>> ph = generate_phantom(seed=3, implants=True)            # 128^3 at 2 mm
    >>> ph.volume.array.shape, float(ph.volume.array.max()) >= 3000
    ((128, 128, 128), True)
    >>> cases = generate_phantoms(8, "data/phantoms", load_config("cpu"))
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cvaa.config import Config
from cvaa.data.io import Volume, check_volume, write_ct
from cvaa.data.preprocess import CANONICAL_DIRECTION

# Tissue labels of the label map that comes with every phantom.
LABELS: dict[str, int] = {
    "air": 0, "fat": 1, "skin": 2, "muscle": 3, "organ": 4, "gas": 5, "csf": 6,
    "disc": 7, "cancellous": 8, "cortical": 9, "implant": 10,
}
# Texture (HU standard deviation of a correlated noise field) per label: trabecular bone
# is coarse and strong, soft tissue mild; implants are flat (they saturate in real CT).
_TEXTURE_HU = {0: 6.0, 1: 10.0, 2: 8.0, 3: 8.0, 4: 6.0, 5: 15.0, 6: 4.0, 7: 8.0,
               8: 40.0, 9: 50.0, 10: 0.0}
_SCANNER_NOISE_HU = 5.0
# Cortical thickness of the drawn bone. Vertebral cortex is thin; drawn at 1 mm with
# partial volume, a 2 mm voxel on the shell reads ~600-800 HU, as on the real lumbar CT
# in ../shared/data (99th percentile of its bone: ~750 HU), though the tissue is 1000-1500.
_CORTEX_MM = 1.0

# Level-dependent sizes, T12 then L1..L5 (mm, before the per-case scale).
_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
_BODY_WIDTH = (40.0, 42.0, 44.0, 46.0, 48.0, 50.0)
_BODY_DEPTH = (28.0, 30.0, 32.0, 33.0, 34.0, 34.0)
_BODY_HEIGHT = (22.0, 24.0, 25.0, 26.0, 26.0, 25.0)
_DISC_BELOW = (7.0, 8.0, 9.0, 10.0, 11.0, 11.0)     # T12-L1 ... L5-S1
_CANAL_HALF_WIDTH = (9.0, 10.0, 10.5, 11.0, 11.5, 12.0)
_TRANSVERSE_LENGTH = (10.0, 16.0, 20.0, 26.0, 23.0, 20.0)
_SPINOUS_LENGTH = (30.0, 30.0, 31.0, 31.0, 29.0, 25.0)


@dataclass(frozen=True)
class PhantomParams:
    """Every random choice of one phantom (sampled by :func:`sample_params`).

    Lengths in mm; angles in degrees; HU in Hounsfield units. ``y`` is posterior, ``x`` the
    patient's left, ``t`` inferior, all relative to the volume centre.
    """

    seed: int
    scale: float                      # skeletal size factor
    spine_t_mm: float                 # craniocaudal position of the L3 centre
    spine_y_mm: float                 # AP position of the L3 body centre (before lordosis)
    lordosis_mm: float                # anterior bow of the lumbar centreline
    sacral_slope_deg: float
    scoliosis_mm: float               # lateral bow (signed)
    scoliosis_phase: float
    rotation_deg: tuple[float, ...]   # axial rotation of T12..L5
    cancellous_hu: float
    cortical_hu: float
    body_halfwidth_mm: float          # lateral semi-axis of the abdomen
    belly_mm: float                   # anterior extent of the abdomen from y = 0
    fat_mm: float                     # subcutaneous fat (anterior; thinner at the back)
    visceral_fat: float               # fraction of the abdominal cavity that is fat
    muscle: float                     # muscle bulk, 0..1
    crest_offset_mm: float            # iliac crest below the L4-L5 disc
    gas: tuple[tuple[float, float, float, float], ...]  # bowel gas (t, y, x, radius)
    implants: bool
    fused_levels: tuple[int, ...]     # indices into T12..L5, plus 6 for S1
    screw_medial_deg: float
    laminectomy: bool
    implant_hu: float


@dataclass(frozen=True, eq=False)
class Phantom:
    """A phantom CT (HU), its tissue labels ``(D, H, W)`` uint8 (see ``LABELS``) and the
    parameters that drew it."""

    volume: Volume
    labels: np.ndarray
    params: PhantomParams


# --------------------------------------------------------------------------- parameters

def sample_params(seed: int, *, implants: bool = False) -> PhantomParams:
    """Sample one phantom's parameters from ``seed`` (same seed, same parameters)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform
    habitus = float(u(0.0, 1.0))
    scale = float(u(0.9, 1.1))
    twist = u(-6.0, 6.0)
    rotation = tuple(float(twist * math.sin(math.pi * (i + 0.5) / 6) + rng.normal(0, 1.5))
                     for i in range(6))
    n_gas = int(rng.integers(4, 12))
    gas = tuple((float(u(-100, 90)), float(u(-90, -10)), float(u(-90, 90)),
                 float(u(5, 20))) for _ in range(n_gas))
    first = int(rng.integers(2, 5))                   # L2..L4
    last = min(6, first + int(rng.integers(1, 3)))    # one or two levels below, up to S1
    fused = tuple(range(first, last + 1)) if implants else ()
    return PhantomParams(
        seed=int(seed),
        scale=scale,
        spine_t_mm=float(u(-18.0, -4.0)),
        spine_y_mm=float(u(8.0, 22.0)),
        lordosis_mm=float(u(4.0, 16.0)),
        sacral_slope_deg=float(u(30.0, 45.0)),
        scoliosis_mm=float(rng.normal(0.0, 5.0)),
        scoliosis_phase=float(u(-0.5, 0.5)),
        rotation_deg=rotation,
        cancellous_hu=float(u(160.0, 380.0)),
        cortical_hu=float(u(1050.0, 1450.0)),
        body_halfwidth_mm=float(108.0 + 28.0 * habitus + rng.normal(0, 3)),
        belly_mm=float(95.0 + 25.0 * habitus + rng.normal(0, 4)),
        fat_mm=float(np.clip(8.0 + 26.0 * habitus + rng.normal(0, 3), 5.0, 36.0)),
        visceral_fat=float(np.clip(0.2 + 0.4 * habitus + rng.normal(0, 0.05), 0.1, 0.7)),
        muscle=float(u(0.0, 1.0)),
        crest_offset_mm=float(u(-6.0, 8.0)),
        gas=gas,
        implants=bool(implants),
        fused_levels=fused,
        screw_medial_deg=float(u(8.0, 18.0)),
        laminectomy=bool(implants and u() < 0.5),
        implant_hu=float(u(3200.0, 3800.0)),
    )


# --------------------------------------------------------------------------- SDF helpers
# Approximate signed distances (mm, negative inside). Exact for boxes and capsules; for
# ellipses the radial error is at most the axis ratio, enough for a cortex threshold.

def _sd_ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)


def _sd_extrude(sd_plane: np.ndarray, w: np.ndarray, half: float) -> np.ndarray:
    dz = np.abs(w) - half
    inside = np.minimum(np.maximum(sd_plane, dz), 0.0)
    outside = np.sqrt(np.maximum(sd_plane, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)
    return inside + outside


def _sd_ellipsoid(t, y, x, center, semi) -> np.ndarray:
    rho = np.sqrt(((t - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2
                  + ((x - center[2]) / semi[2]) ** 2)
    return (rho - 1.0) * min(semi)


def _sd_box(t, y, x, center, half) -> np.ndarray:
    q = [np.abs(t - center[0]) - half[0], np.abs(y - center[1]) - half[1],
         np.abs(x - center[2]) - half[2]]
    outside = np.sqrt(sum(np.maximum(c, 0.0) ** 2 for c in q))
    inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0.0)
    return outside + inside


def _sd_capsule(t, y, x, a, b, radius: float) -> np.ndarray:
    ba = np.subtract(b, a, dtype=float)
    pa = (t - a[0], y - a[1], x - a[2])
    h = np.clip((pa[0] * ba[0] + pa[1] * ba[1] + pa[2] * ba[2]) / float(ba @ ba), 0.0, 1.0)
    return np.sqrt((pa[0] - ba[0] * h) ** 2 + (pa[1] - ba[1] * h) ** 2
                   + (pa[2] - ba[2] * h) ** 2) - radius


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union: a fillet of about ``k`` mm where two bones meet."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


# --------------------------------------------------------------------------- canvas

class _Canvas:
    """HU and label arrays plus the mm coordinates of the voxel centres.

    ``t`` (D, 1, 1) inferior, ``y`` (1, H, 1) posterior, ``x`` (1, 1, W) left, in mm from
    the volume centre.
    """

    def __init__(self, shape: tuple[int, int, int], spacing_mm: float):
        self.shape = shape
        self.spacing_mm = spacing_mm
        d, h, w = shape
        self.t = ((np.arange(d) - (d - 1) / 2) * spacing_mm).reshape(d, 1, 1)
        self.y = ((np.arange(h) - (h - 1) / 2) * spacing_mm).reshape(1, h, 1)
        self.x = ((np.arange(w) - (w - 1) / 2) * spacing_mm).reshape(1, 1, w)
        self.hu = np.full(shape, -1000.0, np.float32)
        self.lab = np.zeros(shape, np.uint8)

    def box(self, center, radius):
        """Index slices of the sub-grid within ``radius`` (t, y, x) of ``center``, and its
        coordinates; ``None`` when the box misses the grid."""
        sl = []
        for axis, (c, r) in enumerate(zip(center, radius)):
            n = self.shape[axis]
            lo = int(math.floor((c - r) / self.spacing_mm + (n - 1) / 2))
            hi = int(math.ceil((c + r) / self.spacing_mm + (n - 1) / 2)) + 1
            lo, hi = max(lo, 0), min(hi, n)
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        sl = tuple(sl)
        return sl, self.t[sl[0]], self.y[:, sl[1]], self.x[:, :, sl[2]]

    def paint(self, sl, mask: np.ndarray, label: str, hu: float | np.ndarray,
              where: np.ndarray | None = None) -> None:
        """Set ``label``/``hu`` where ``mask`` (and ``where``, a mask of current labels)."""
        if where is not None:
            mask = mask & where
        if not mask.any():
            return
        sub_hu, sub_lab = self.hu[sl], self.lab[sl]
        sub_lab[mask] = LABELS[label]
        sub_hu[mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, mask.shape)[mask]


def _labels_in(lab: np.ndarray, *names: str) -> np.ndarray:
    return np.isin(lab, [LABELS[n] for n in names])


# --------------------------------------------------------------------------- skeleton

@dataclass(frozen=True)
class _Frame:
    """A local frame: origin and unit axes, all as (t, y, x) in mm."""

    origin: np.ndarray
    et: np.ndarray   # along the spine, inferior
    ey: np.ndarray   # posterior
    ex: np.ndarray   # patient's left

    def local(self, t, y, x):
        d = (t - self.origin[0], y - self.origin[1], x - self.origin[2])
        return tuple(d[0] * e[0] + d[1] * e[1] + d[2] * e[2]
                     for e in (self.et, self.ey, self.ex))

    def point(self, lt: float, ly: float, lx: float) -> np.ndarray:
        return self.origin + lt * self.et + ly * self.ey + lx * self.ex


def _frame(origin, tangent, rotation_deg: float) -> _Frame:
    et = np.asarray(tangent, float) / np.linalg.norm(tangent)
    ey = np.array([0.0, 1.0, 0.0]) - et[1] * et
    ey /= np.linalg.norm(ey)
    ex = np.array([0.0, 0.0, 1.0]) - et[2] * et - ey[2] * ey
    ex /= np.linalg.norm(ex)
    a = math.radians(rotation_deg)
    ey, ex = math.cos(a) * ey + math.sin(a) * ex, -math.sin(a) * ey + math.cos(a) * ex
    return _Frame(np.asarray(origin, float), et, ey, ex)


@dataclass(frozen=True)
class _Spine:
    """Where the vertebrae are: centres and frames of T12..L5, and the sacral frame."""

    frames: tuple[_Frame, ...]
    sizes: tuple[dict, ...]
    sacrum: _Frame
    top_mm: float          # t of the T12 upper endplate
    bottom_mm: float       # t of the S1 upper endplate


def _centreline(p: PhantomParams, t_top: float, t_bottom: float):
    """The centreline (y, x) of the vertebral bodies as a function of t."""
    span = t_bottom - t_top

    def at(t):
        u = np.clip((np.asarray(t, float) - t_top) / span, 0.0, 1.0)
        # Lordosis: the mid-lumbar spine bows anteriorly (smaller y).
        y = p.spine_y_mm + p.lordosis_mm * (0.5 - np.sin(math.pi * u))
        x = p.scoliosis_mm * np.sin(math.pi * (u + p.scoliosis_phase))
        return y, x
    return at


def _layout_spine(p: PhantomParams) -> tuple[_Spine, callable]:
    s = p.scale
    heights = [h * s for h in _BODY_HEIGHT]
    discs = [d * s for d in _DISC_BELOW]
    # Craniocaudal positions of the body centres, L3 at spine_t_mm.
    centres, t = [], 0.0
    for i in range(6):
        centres.append(t + heights[i] / 2)
        t += heights[i] + discs[i]
    shift = p.spine_t_mm - centres[3]
    centres = [c + shift for c in centres]
    top = centres[0] - heights[0] / 2
    s1_top = centres[5] + heights[5] / 2 + discs[5]
    line = _centreline(p, top, s1_top)
    frames, sizes = [], []
    for i, tc in enumerate(centres):
        y, x = line(tc)
        y2, x2 = line(tc + 1.0)
        y1, x1 = line(tc - 1.0)
        tangent = (2.0, float(y2 - y1), float(x2 - x1))
        frames.append(_frame((tc, float(y), float(x)), tangent, p.rotation_deg[i]))
        sizes.append(dict(w=_BODY_WIDTH[i] * s / 2, d=_BODY_DEPTH[i] * s / 2,
                          h=heights[i] / 2, disc=discs[i], ac=_CANAL_HALF_WIDTH[i] * s,
                          bc=7.5 * s, tp=_TRANSVERSE_LENGTH[i] * s,
                          sp=_SPINOUS_LENGTH[i] * s, level=i))
    # Sacrum: its upper endplate one disc below L5, tilted by the sacral slope.
    l5 = frames[5]
    origin = l5.point(heights[5] / 2 + discs[5], 0.0, 0.0)
    slope = math.radians(p.sacral_slope_deg)
    sacrum = _frame(origin, (math.cos(slope), math.sin(slope), float(l5.et[2])), 0.0)
    return _Spine(tuple(frames), tuple(sizes), sacrum, top, float(origin[0])), line


def _vertebra_sd(lt, ly, lx, z: dict, *, laminectomy: bool) -> np.ndarray:
    """Signed distance to one vertebra in its local frame (origin at the body centre)."""
    w, d, h, ac, bc = z["w"], z["d"], z["h"], z["ac"], z["bc"]
    # Vertebral body: an elliptic cylinder with a waist and a concave posterior wall.
    waist = 1.0 - 0.07 * (1.0 - np.clip((lt / h) ** 2, 0.0, 1.0))
    body = _sd_extrude(_sd_ellipse(lx / waist, ly / waist, w, d), lt, h)
    body = np.maximum(body, -_sd_ellipse(lx, ly - d - 3.0, 0.45 * w, 5.0))
    # Neural arch: pedicles and laminae as an elliptic ring around the canal; taller and
    # lower at the back, where the laminae shingle over the level below.
    yc = d + bc + 0.5
    thick = 5.5 * z["w"] / 23.0
    ring = np.maximum(_sd_ellipse(lx, ly - yc, ac + thick, bc + thick),
                      -_sd_ellipse(lx, ly - yc, ac, bc))
    ring = np.maximum(ring, (d - 5.0) - ly)
    back = np.clip((ly - yc) / bc, 0.0, 1.0)
    arch_half = h * (0.33 + 0.2 * back)
    arch = _sd_extrude(ring, lt - h * (-0.25 + 0.3 * back), arch_half)
    if laminectomy:  # the posterior arch between the pedicles is gone
        arch = np.maximum(arch, -_sd_box(lt, ly, lx, (0.0, yc + bc + 20.0, 0.0),
                                         (3 * h, bc + 20.0, ac + 2.0)))
    sd = _smin(body, arch, 3.0)
    y_lam = yc + bc + thick * 0.5
    if not laminectomy:
        # Spinous process: a plate running back and slightly down, with a bulbous tip.
        base = np.array([0.05 * h, y_lam - 3.0])                 # (lt, ly)
        tip = np.array([0.35 * h + 0.12 * z["sp"], y_lam + z["sp"]])
        along = (tip - base) / np.linalg.norm(tip - base)
        mid = 0.5 * (base + tip)
        u = (lt - mid[0]) * along[0] + (ly - mid[1]) * along[1]
        v = -(lt - mid[0]) * along[1] + (ly - mid[1]) * along[0]
        plate = _sd_box(u, v, lx, (0.0, 0.0, 0.0),
                        (0.5 * float(np.linalg.norm(tip - base)), 0.4 * h, 3.5))
        knob = _sd_capsule(lt, ly, lx, (tip[0] - 0.3 * h, tip[1], 0.0),
                           (tip[0] + 0.3 * h, tip[1], 0.0), 3.5)
        sd = _smin(sd, _smin(plate, knob, 2.0), 2.0)
    for side in (-1.0, 1.0):
        # Transverse processes, from the pedicle-lamina junction, slightly back.
        root = (-0.2 * h, yc, side * (ac + thick - 1.0))
        tip = (-0.15 * h, yc + 5.0, side * (ac + thick + z["tp"]))
        radius = 4.5 if z["level"] == 5 else 3.5
        sd = _smin(sd, _sd_capsule(lt, ly, lx, root, tip, radius), 2.0)
        # Articular processes: the superior ones stand lateral to the inferior ones of the
        # vertebra above, so the facet joints show as a thin gap.
        sap = _sd_capsule(lt, ly, lx, (-h - 5.0, yc + 3.0, side * (ac + 9.5)),
                          (-0.3 * h, yc + 1.0, side * (ac + 8.0)), 4.0)
        iap = _sd_capsule(lt, ly, lx, (0.3 * h, yc + bc + 2.0, side * (ac + 1.5)),
                          (h + 6.0, yc + bc + 4.0, side * (ac + 2.0)), 3.5)
        sd = _smin(sd, np.minimum(sap, iap), 2.0)
    return sd


def _sacrum_sd(lt, ly, lx, s: float) -> np.ndarray:
    """Signed distance to the sacrum (S1-S3 and alae) in the sacral frame (origin at the
    centre of the S1 upper endplate)."""
    sd = _sd_extrude(_sd_ellipse(lx, ly, 25 * s, 17 * s), lt - 12 * s, 12 * s)
    sd = _smin(sd, _sd_extrude(_sd_ellipse(lx, ly - 3 * s, 21 * s, 13 * s),
                               lt - 35 * s, 10 * s), 4.0)
    sd = _smin(sd, _sd_extrude(_sd_ellipse(lx, ly - 8 * s, 16 * s, 10 * s),
                               lt - 54 * s, 9 * s), 4.0)
    for side in (-1.0, 1.0):
        sd = _smin(sd, _sd_ellipsoid(lt, ly, lx, (14 * s, 6 * s, side * 32 * s),
                                     (15 * s, 17 * s, 22 * s)), 5.0)
        sd = _smin(sd, _sd_ellipsoid(lt, ly, lx, (38 * s, 14 * s, side * 28 * s),
                                     (20 * s, 15 * s, 17 * s)), 5.0)
    # Posterior wall around the sacral canal, and the median crest.
    ring = np.maximum(_sd_ellipse(lx, ly - 26 * s, 17 * s, 10 * s),
                      -_sd_ellipse(lx, ly - 26 * s, 12 * s, 5.5 * s))
    sd = _smin(sd, _sd_extrude(ring, lt - 30 * s, 30 * s), 3.0)
    sd = _smin(sd, _sd_box(lt, ly, lx, (30 * s, 38 * s, 0.0), (28 * s, 5 * s, 2.5)), 3.0)
    return sd


# --------------------------------------------------------------------------- drawing

def render_phantom(params: PhantomParams, shape: tuple[int, int, int] = (128, 128, 128),
                   spacing_mm: float = 2.0, patient_id: str = "") -> Phantom:
    """Draw the phantom of ``params`` on a ``shape`` grid of isotropic ``spacing_mm``.

    Args:
        params: from :func:`sample_params`.
        shape: ``(D, H, W)`` voxels.
        spacing_mm: isotropic voxel size; grids coarser than 4 mm are drawn finer and
            block-averaged.
        patient_id: recorded as the volume's ``source``.

    Returns:
        The :class:`Phantom`: HU volume in the canonical orientation, centred on the
        physical origin, and its label map.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (D, H, W), got {shape}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    k = max(1, math.ceil(spacing_mm / 4.0 - 1e-9))
    canvas = _Canvas(tuple(n * k for n in shape), spacing_mm / k)
    rng = np.random.default_rng([params.seed, 1])
    spine, line = _layout_spine(params)
    _draw_body(canvas, params, spine, line, rng)
    _draw_organs(canvas, params, spine, line)
    _draw_muscles(canvas, params, spine, line)
    _draw_spine(canvas, params, spine)
    _draw_pelvis(canvas, params, spine)
    _draw_canal(canvas, params, spine)
    _add_texture(canvas, rng)
    if params.implants:
        _draw_implants(canvas, params, spine)
    hu, lab = canvas.hu, canvas.lab
    if k > 1:  # partial volume of the coarse grid
        hu = hu.reshape(shape[0], k, shape[1], k, shape[2], k).mean(axis=(1, 3, 5))
        lab = lab[k // 2::k, k // 2::k, k // 2::k]
    d, h, w = shape
    origin = (-(w - 1) / 2 * spacing_mm, -(h - 1) / 2 * spacing_mm, (d - 1) / 2 * spacing_mm)
    volume = Volume(np.ascontiguousarray(hu, np.float32), (float(spacing_mm),) * 3,
                    tuple(float(v) for v in origin), CANONICAL_DIRECTION, patient_id)
    return Phantom(volume, np.ascontiguousarray(lab), params)


def _smooth_noise(shape, sigma_vox: float, rng: np.random.Generator,
                  coarse: int = 1) -> np.ndarray:
    """Unit-variance correlated Gaussian noise; drawn ``coarse`` times smaller, then
    zoomed, when only its large scales matter (cheaper)."""
    small = tuple(max(2, -(-n // coarse)) for n in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32),
                                    sigma_vox / coarse, mode="wrap")
    if coarse > 1:
        field = ndimage.zoom(field, [n / m for n, m in zip(shape, small)], order=1,
                             grid_mode=True, mode="grid-wrap")[:shape[0], :shape[1], :shape[2]]
    return field / (field.std() + 1e-6)


def _body_profile(p: PhantomParams, c: _Canvas):
    """Depth (mm) below the skin of every voxel and the polar angle of its direction
    (0 = anterior); the abdomen is two half-ellipses, flatter at the back."""
    back = p.spine_y_mm + (68.0 + 8.0) * p.scale + 0.5 * p.fat_mm
    a = p.body_halfwidth_mm * (1.0 + 0.03 * np.sin(c.t / 60.0))           # (D, 1, 1)
    b = np.where(c.y < 0, p.belly_mm, back)                                 # (1, H, 1)
    ex, ey = c.x / a, c.y / b
    # A squarer back (a superellipse behind), as of a patient lying on the table.
    rho = np.where(c.y < 0, np.sqrt(ex ** 2 + ey ** 2),
                   (np.abs(ex) ** 2.6 + np.abs(ey) ** 2.6) ** (1 / 2.6))
    r = np.sqrt(c.x ** 2 + c.y ** 2) + 1e-6
    depth = r * (1.0 / np.maximum(rho, 1e-6) - 1.0)
    anterior = np.clip(-c.y / r, 0.0, 1.0)
    return depth, anterior


def _draw_body(c: _Canvas, p: PhantomParams, spine: _Spine, line, rng) -> None:
    depth, anterior = _body_profile(p, c)
    fat = p.fat_mm * (0.45 + 0.75 * anterior)          # thicker over the belly
    wall = 7.0 + 6.0 * p.muscle
    sl = (slice(None),) * 3
    inside = depth >= 0
    c.paint(sl, inside, "skin", 35.0)
    c.paint(sl, depth >= 2.0, "fat", -100.0)
    c.paint(sl, depth >= 2.0 + fat, "muscle", 45.0)
    cavity = depth >= 2.0 + fat + wall
    # Abdominal contents: bowel loops mixed with visceral fat.
    mottle = _smooth_noise(c.shape, 5.0 / c.spacing_mm, rng, coarse=2)
    fat_level = np.quantile(mottle, p.visceral_fat)
    c.paint(sl, cavity & (mottle < fat_level), "fat", -95.0)
    c.paint(sl, cavity & (mottle >= fat_level), "organ", 35.0)
    # Retroperitoneal fat around the spine, psoas and kidneys (drawn over it later): it is
    # what makes those stand out on a real CT.
    y_spine, x_spine = line(np.clip(c.t, spine.top_mm, spine.bottom_mm))   # (D, 1, 1)
    retro = ((c.x - x_spine) / 115.0) ** 2 + ((c.y - y_spine - 25.0) / 60.0) ** 2 <= 1.0
    c.paint(sl, cavity & retro, "fat", -95.0)
    c.cavity = cavity


def _ellipsoid(c: _Canvas, center, semi, label: str, hu: float, where=None) -> None:
    box = c.box(center, semi)
    if box is None:
        return
    sl, t, y, x = box
    mask = _sd_ellipsoid(t, y, x, center, semi) <= 0
    c.paint(sl, mask, label, hu, None if where is None else where[sl])


def _draw_organs(c: _Canvas, p: PhantomParams, spine: _Spine, line) -> None:
    s = p.scale
    l1, l2, l4 = spine.frames[1], spine.frames[2], spine.frames[4]
    cav = c.cavity
    # Liver (right upper quadrant, tip reaching L2-L3) and spleen (left, posterior).
    _ellipsoid(c, (spine.top_mm - 20, -5.0, -55.0), (95.0, 85.0, 75.0), "organ", 60.0, cav)
    _ellipsoid(c, (spine.top_mm, 25.0, 75.0), (45.0, 35.0, 25.0), "organ", 48.0, cav)
    # Kidneys beside the psoas at L1-L2, the right one lower.
    for side, drop in ((-1.0, 12.0), (1.0, 0.0)):
        tk = 0.5 * (l1.origin[0] + l2.origin[0]) + drop
        yk, xk = line(tk)
        _ellipsoid(c, (tk, float(yk) + 18.0, float(xk) + side * 62.0 * s),
                   (50.0 * s, 22.0 * s, 27.0 * s), "organ", 32.0, cav)
    # Aorta (left of the midline) down to L4, then the iliac arteries; the IVC on the right.
    t_bif = l4.origin[0]
    for t0, t1, dx, radius in ((spine.top_mm - 40, t_bif, 14.0, 10.5 * s),
                               (spine.top_mm - 40, t_bif + 20, -18.0, 11.0 * s)):
        box = c.box(((t0 + t1) / 2, 0.0, 0.0), ((t1 - t0) / 2 + 1, 200.0, 200.0))
        if box is None:
            continue
        sl, t, y, x = box
        yv, xv = line(np.clip(t, spine.top_mm, None))
        ya = yv - 42.0 * s * (0.5 + 0.5 * s)
        mask = ((y - ya) ** 2 + (x - xv - dx) ** 2 <= radius ** 2) & (t >= t0) & (t <= t1)
        c.paint(sl, mask, "organ", 42.0, cav[sl])
    yb, xb = line(t_bif)
    for side in (-1.0, 1.0):
        a = (t_bif, float(yb) - 42.0 * s, float(xb) + 14.0)
        b = (t_bif + 90.0, float(yb) - 70.0 * s, float(xb) + side * 55.0)
        box = c.box(tuple((np.add(a, b) / 2)), tuple(np.abs(np.subtract(a, b)) / 2 + 8))
        if box is not None:
            sl, t, y, x = box
            c.paint(sl, _sd_capsule(t, y, x, a, b, 6.0 * s) <= 0, "organ", 42.0, cav[sl])
    # Bladder at the bottom, anterior.
    _ellipsoid(c, (spine.bottom_mm + 90.0, -45.0, 0.0), (45.0, 35.0, 45.0), "organ", 8.0, cav)
    # Bowel gas, only in bowel (not in solid organs or muscle).
    bowel = c.lab == LABELS["organ"]
    for t0, y0, x0, r in p.gas:
        gas_where = bowel & cav & (c.hu < 40.0) & (c.hu > 30.0)
        _ellipsoid(c, (t0, y0, x0), (r * 1.3, r, r * 1.1), "gas", -950.0, gas_where)


def _tube(c: _Canvas, t_range, center_fn, radii_fn, label: str, hu: float,
          where=None) -> None:
    """A tube of elliptic cross-section whose centre and radii vary with t."""
    box = c.box(((t_range[0] + t_range[1]) / 2, 0.0, 0.0),
                ((t_range[1] - t_range[0]) / 2, 1e4, 1e4))
    if box is None:
        return
    sl, t, y, x = box
    tt = np.clip(t, *t_range)
    cy, cx = center_fn(tt)
    ry, rx = radii_fn(tt)
    mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    mask &= (t >= t_range[0]) & (t <= t_range[1])
    c.paint(sl, mask, label, hu, None if where is None else where[sl])


def _draw_muscles(c: _Canvas, p: PhantomParams, spine: _Spine, line) -> None:
    s, m = p.scale, p.muscle
    depth, _ = _body_profile(p, c)
    under_fat = depth >= 2.0 + p.fat_mm * 0.45
    t_l1, t_s1 = spine.frames[1].origin[0], spine.bottom_mm
    span = t_s1 - t_l1

    def frac(t):
        return np.clip((t - t_l1) / span, 0.0, 1.2)

    for side in (-1.0, 1.0):
        # Psoas: small at L1, thick at L5, then running anterolaterally into the pelvis.
        def psoas_c(t, side=side):
            y, x = line(t)
            u = frac(t)
            below = np.maximum(u - 1.0, 0.0) * span
            return (y + 2.0 - 0.6 * below,
                    x + side * (24.0 * s + 14.0 * u * s + 0.5 * below))

        def psoas_r(t):
            r = (7.0 + 15.0 * np.minimum(frac(t), 1.0)) * s * (0.85 + 0.3 * m)
            return 0.85 * r, r
        _tube(c, (t_l1 - 10.0, t_s1 + 40.0), psoas_c, psoas_r, "muscle", 46.0, under_fat)

        # Quadratus lumborum: lateral, behind the kidney, from T12 to the iliac crest.
        def ql_c(t, side=side):
            y, x = line(t)
            return y + 28.0 * s, x + side * (60.0 * s + 10.0 * frac(t))

        def ql_r(t):
            r = (8.0 + 6.0 * np.minimum(frac(t), 1.0)) * (0.85 + 0.3 * m)
            return 0.6 * r, 1.3 * r
        _tube(c, (spine.top_mm - 20.0, t_s1 - 10.0), ql_c, ql_r, "muscle", 44.0, under_fat)

        # Erector spinae and multifidus beside the spinous processes.
        def es_c(t, side=side):
            y, x = line(t)
            return y + 68.0 * s, x + side * (24.0 + 10.0 * m) * s

        def es_r(t):
            return (np.full_like(t, 24.0 * s * (0.8 + 0.3 * m)),
                    np.full_like(t, (22.0 + 9.0 * m) * s))
        _tube(c, (-1e3, t_s1 + 45.0), es_c, es_r, "muscle", 48.0, under_fat)
    del depth


def _draw_spine(c: _Canvas, p: PhantomParams, spine: _Spine) -> None:
    s = p.scale
    cortex = _CORTEX_MM
    # Discs first: bone overwrites their margins.
    ends = []
    for i, (f, z) in enumerate(zip(spine.frames, spine.sizes)):
        ends.append((f.point(-z["h"], 0, 0), f.point(z["h"], 0, 0)))
    upper_next = [e[0] for e in ends[1:]] + [spine.sacrum.origin]
    for i, (f, z) in enumerate(zip(spine.frames, spine.sizes)):
        lo, hi = ends[i][1], upper_next[i]
        centre = 0.5 * (lo + hi)
        axis = hi - lo
        other = spine.frames[i + 1] if i < 5 else spine.sacrum
        tangent = f.et + other.et
        df = _frame(centre, tangent, 0.0)
        df = _Frame(df.origin, df.et, 0.5 * (f.ey + other.ey), 0.5 * (f.ex + other.ex))
        half = 0.5 * float(np.linalg.norm(axis)) + 3.0
        rad = z["w"] + 15.0
        box = c.box(centre, (half + 15.0, rad + 10.0, rad + 10.0))
        if box is None:
            continue
        sl, t, y, x = box
        lt, ly, lx = df.local(t, y, x)
        # The disc overfills the gap between the endplates (bone is drawn over it), so
        # tilted neighbours (L5 on the sacrum) leave no hole.
        disc = _sd_extrude(_sd_ellipse(lx, ly, z["w"] * 1.03, z["d"] * 1.03), lt, half)
        nucleus = _sd_ellipse(lx, ly - 2.0, 0.55 * z["w"], 0.5 * z["d"]) <= 0
        c.paint(sl, disc <= 0, "disc", 100.0)
        c.paint(sl, (disc <= 0) & nucleus, "disc", 75.0)
    fused = set(p.fused_levels)
    for i, (f, z) in enumerate(zip(spine.frames, spine.sizes)):
        reach = z["d"] + z["bc"] + z["sp"] + 20.0
        box = c.box(f.origin, (z["h"] + 25.0, reach + 20.0, z["w"] + z["tp"] + 30.0))
        if box is None:
            continue
        sl, t, y, x = box
        lt, ly, lx = f.local(t, y, x)
        lam = p.laminectomy and i == max(fused, default=-1) - (1 if 6 in fused else 0)
        sd = _vertebra_sd(lt, ly, lx, z, laminectomy=bool(lam))
        _paint_bone(c, sl, sd, cortex, p)
    box = c.box(spine.sacrum.point(35 * s, 5 * s, 0), (80 * s, 80 * s, 70 * s))
    if box is not None:
        sl, t, y, x = box
        sd = _sacrum_sd(*spine.sacrum.local(t, y, x), s)
        _paint_bone(c, sl, sd, cortex, p)


def _paint_bone(c: _Canvas, sl, sd: np.ndarray, cortex_mm: float, p: PhantomParams) -> None:
    """Bone from its signed distance, anti-aliased: each voxel takes the fractions of
    background, cortex (the outer ``cortex_mm``) and cancellous core that a planar surface
    at distance ``sd`` leaves in it, as a CT's partial-volume effect does. Labels follow
    the voxel centre."""
    step = c.spacing_mm
    bone = np.clip(0.5 - sd / step, 0.0, 1.0)
    core = np.clip(0.5 - (sd + cortex_mm) / step, 0.0, 1.0)
    touched = bone > 0
    if not touched.any():
        return
    hu, lab = c.hu[sl], c.lab[sl]
    mixed = hu * (1.0 - bone) + p.cortical_hu * (bone - core) + p.cancellous_hu * core
    hu[touched] = mixed[touched]
    lab[sd <= 0] = LABELS["cortical"]
    lab[sd <= -cortex_mm] = LABELS["cancellous"]


def _draw_pelvis(c: _Canvas, p: PhantomParams, spine: _Spine) -> None:
    """Iliac wings: the upper rim of a bowl, crest at the L4-L5 disc, joined to the sacral
    alae at the sacroiliac joints; iliacus inside the bowl, gluteal muscle outside."""
    s = p.scale
    l4 = spine.frames[4]
    t_crest = l4.origin[0] + spine.sizes[4]["h"] + 0.5 * spine.sizes[4]["disc"] \
        + p.crest_offset_mm
    y_si = float(spine.sacrum.origin[1]) + 10.0 * s
    wing = min(100.0 * s, p.body_halfwidth_mm - p.fat_mm - 24.0)
    # The wings' widest point (near the anterior superior iliac spine) lies in front of
    # the sacroiliac joints: use the posterior half of the bowl only, a "V" open in front.
    centre = (t_crest - 15.0, y_si - 85.0 * s, float(spine.sacrum.origin[2]))
    semi = (150.0, 105.0 * s, wing)
    box = c.box((t_crest + 80.0, y_si - 35.0, 0.0), (85.0, 75.0, wing + 40.0))
    if box is None:
        return
    sl, t, y, x = box
    rho = np.sqrt(((t - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                  + ((x - centre[2]) / semi[2]) ** 2)
    sd = (rho - 1.0) * min(semi[1], semi[2])
    # The crest is highest at its middle and drops towards its ends.
    crest = t_crest + 0.006 * (y - (y_si - 35.0)) ** 2
    limits = np.maximum(np.maximum(crest - t, y - (y_si + 25.0)),
                        np.maximum((y_si - 95.0 * s) - y, 38.0 * s - np.abs(x)))
    thick = 4.0 + 1.5 * s
    wing_sd = np.maximum(np.abs(sd + thick) - thick, limits)
    depth, _ = _body_profile(p, c)
    under_fat = (depth >= 2.0 + p.fat_mm * 0.6)[sl]
    muscle = np.maximum(np.abs(sd + thick) - thick - 16.0, limits - 4.0) <= 0
    c.paint(sl, muscle, "muscle", 46.0, under_fat & ~_labels_in(c.lab[sl], "cortical",
                                                              "cancellous", "disc"))
    cortex = _CORTEX_MM
    _paint_bone(c, sl, wing_sd, cortex, p)


def _draw_canal(c: _Canvas, p: PhantomParams, spine: _Spine) -> None:
    """Spinal canal (epidural fat around the CSF-filled thecal sac), cut through the
    vertebrae and discs, continuing into the sacral canal."""
    for f, z in zip(spine.frames, spine.sizes):
        yc = z["d"] + z["bc"] + 0.5
        half = z["h"] + z["disc"] + 2.0
        box = c.box(f.origin, (half + 10.0, yc + z["bc"] + 10.0, z["ac"] + 10.0))
        if box is None:
            continue
        sl, t, y, x = box
        lt, ly, lx = f.local(t, y, x)
        canal = _sd_extrude(_sd_ellipse(lx, ly - yc, z["ac"], z["bc"]), lt, half) <= 0
        sac = _sd_ellipse(lx, ly - yc + 0.5, 0.78 * z["ac"], 0.8 * z["bc"]) <= 0
        not_implant = c.lab[sl] != LABELS["implant"]
        c.paint(sl, canal, "fat", -80.0, not_implant)
        c.paint(sl, canal & sac, "csf", 10.0, not_implant)
    s = p.scale
    box = c.box(spine.sacrum.point(30 * s, 26 * s, 0), (45 * s, 40 * s, 30 * s))
    if box is not None:
        sl, t, y, x = box
        lt, ly, lx = spine.sacrum.local(t, y, x)
        canal = _sd_extrude(_sd_ellipse(lx, ly - 26 * s, 11 * s, 5 * s), lt - 25 * s,
                            27 * s) <= 0
        c.paint(sl, canal, "fat", -80.0)
        c.paint(sl, canal & (_sd_ellipse(lx, ly - 26 * s, 7 * s, 3.5 * s) <= 0), "csf", 10.0)


def _add_texture(c: _Canvas, rng: np.random.Generator) -> None:
    """Correlated tissue texture (trabeculae, fat lobules) plus white scanner noise."""
    field = _smooth_noise(c.shape, 1.0, rng)
    amp = np.array([_TEXTURE_HU[i] for i in range(len(LABELS))], np.float32)[c.lab]
    c.hu += amp * field
    c.hu += _SCANNER_NOISE_HU * rng.standard_normal(c.shape, dtype=np.float32)


def _draw_implants(c: _Canvas, p: PhantomParams, spine: _Spine) -> None:
    """Titanium pedicle screws (6.5 mm) through both pedicles of every fused level, with
    tulip heads, and a 5.5 mm rod on each side through the heads."""
    s = p.scale
    heads = {-1.0: [], 1.0: []}
    medial = math.radians(p.screw_medial_deg)
    for level in p.fused_levels:
        if level == 6:  # S1: screws converge into the S1 body
            f = spine.sacrum
            entries = {side: (8.0 * s, 20.0 * s, side * 20.0 * s) for side in (-1.0, 1.0)}
            length = 38.0 * s
        else:
            f, z = spine.frames[level], spine.sizes[level]
            yc = z["d"] + z["bc"] + 0.5
            entries = {side: (-0.25 * z["h"], yc + 4.0, side * (z["ac"] + 5.5))
                       for side in (-1.0, 1.0)}
            length = (yc + 4.0 + 0.55 * z["d"]) / math.cos(medial)
        for side, entry in entries.items():
            direction = np.array([0.0, -math.cos(medial), -side * math.sin(medial)])
            tip = np.asarray(entry) + length * direction
            head = np.asarray(entry) - 9.0 * direction
            a, b, h = f.point(*entry), f.point(*tip), f.point(*head)
            for p0, p1, radius in ((a, b, 3.25), (a, h, 5.0)):
                box = c.box(0.5 * (p0 + p1), np.abs(p1 - p0) / 2 + radius + 2)
                if box is not None:
                    sl, t, y, x = box
                    c.paint(sl, _sd_capsule(t, y, x, p0, p1, radius) <= 0, "implant",
                            p.implant_hu)
            heads[side].append(f.point(*(np.asarray(entry) - 6.0 * direction)))
    for side, points in heads.items():
        if len(points) < 2:
            continue
        points = sorted(points, key=lambda q: q[0])
        ext = 6.0 * (points[-1] - points[0]) / np.linalg.norm(points[-1] - points[0])
        points = [points[0] - ext] + points[1:-1] + [points[-1] + ext]
        for p0, p1 in zip(points[:-1], points[1:]):
            box = c.box(0.5 * (p0 + p1), np.abs(p1 - p0) / 2 + 5)
            if box is not None:
                sl, t, y, x = box
                c.paint(sl, _sd_capsule(t, y, x, p0, p1, 2.75) <= 0, "implant", p.implant_hu)


# --------------------------------------------------------------------------- public API

def generate_phantom(seed: int = 0, *, implants: bool = False,
                     shape: tuple[int, int, int] = (128, 128, 128), spacing_mm: float = 2.0,
                     patient_id: str = "") -> Phantom:
    """Sample and draw one phantom (see :func:`sample_params`, :func:`render_phantom`)."""
    return render_phantom(sample_params(seed, implants=implants), shape, spacing_mm,
                          patient_id or f"phantom-seed{seed}")


def write_phantom(phantom: Phantom, uri: str | Path) -> str:
    """Write the phantom's HU volume with its geometry (NIfTI/MHA/NRRD by suffix)."""
    check_volume(phantom.volume)
    return write_ct(phantom.volume, uri)


def implant_flags(n: int, fraction: float, seed: int) -> list[bool]:
    """Which of ``n`` cases carry implants: exactly ``round(n * fraction)``, chosen by seed."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    chosen = np.random.default_rng([seed, 2]).permutation(n)[:round(n * fraction)]
    flags = [False] * n
    for i in chosen:
        flags[int(i)] = True
    return flags


@dataclass(frozen=True)
class PhantomCase:
    """One written phantom."""

    patient_id: str
    path: str
    seed: int
    implants: bool


def phantom_shape(size: int, spacing_mm: float, margin_mm: float = 16.0) -> tuple[int, int, int]:
    """A cubic grid of ``size`` voxels plus ``margin_mm`` of anatomy on every side.

    The margin is what a real scan has beyond the crop: perspective rays through the edge
    of a 256 mm field of view reach ~16 mm beyond the cube (SAD 1000, SID 1500), so DRRs
    rendered from the whole volume show no false frame.
    """
    n = size + 2 * int(math.ceil(margin_mm / spacing_mm))
    return (n, n, n)


def phantom_spacing_mm(cfg: Config) -> float:
    """Phantoms are drawn at most 4 mm apart (finer than coarse presets, so resampling to
    the preset averages real structure) and at the preset's spacing when that is finer."""
    return min(4.0, cfg.preprocess.spacing_mm)


def phantom_case_name(index: int, suffix: str = ".nii.gz") -> str:
    """File name of case ``index`` of a phantom set: ``phantom-0007.nii.gz``."""
    return f"phantom-{index:04d}{suffix}"


def phantom_case(index: int, cfg: Config, *, shape: tuple[int, int, int] | None = None,
                 spacing_mm: float | None = None,
                 flags: list[bool] | None = None) -> tuple[Phantom, PhantomCase]:
    """Case ``index`` of the set that ``cfg.data`` describes (seeded by ``cfg.data.seed``
    and the index, so cases can be drawn independently and in parallel)."""
    spacing_mm = spacing_mm or cfg.preprocess.spacing_mm
    if shape is None:  # the crop's field of view at this spacing, plus the margin
        crop = int(round(cfg.preprocess.size * cfg.preprocess.spacing_mm / spacing_mm))
        shape = phantom_shape(crop, spacing_mm)
    if flags is None:
        flags = implant_flags(max(cfg.data.n_phantoms, index + 1),
                              cfg.data.phantom_implant_fraction, cfg.data.seed)
    seed = int(np.random.SeedSequence([cfg.data.seed, index]).generate_state(1)[0])
    pid = phantom_case_name(index, "")
    phantom = render_phantom(sample_params(seed, implants=flags[index]), shape, spacing_mm, pid)
    return phantom, PhantomCase(pid, "", seed, flags[index])


def write_phantom_case(index: int, cfg: Config, out_dir: str, *,
                       spacing_mm: float | None = None) -> str:
    """Draw case ``index`` (see :func:`phantom_case`) and write it under ``out_dir`` (local
    or ``s3://``); returns its URI."""
    from cvaa.data import store

    phantom, _ = phantom_case(index, cfg, spacing_mm=spacing_mm)
    return write_phantom(phantom, store.join(out_dir, phantom_case_name(index)))


def generate_phantoms(n: int, out_dir: str | Path, cfg: Config, *,
                      shape: tuple[int, int, int] | None = None,
                      spacing_mm: float | None = None,
                      suffix: str = ".nii.gz") -> list[PhantomCase]:
    """Write ``n`` phantoms as ``<out_dir>/<patient_id><suffix>`` plus ``phantoms.csv``.

    Args:
        n: number of cases (``cfg.data.n_phantoms`` is the usual value).
        out_dir: local directory (created).
        cfg: ``cfg.data.seed`` seeds the cases, ``cfg.data.phantom_implant_fraction`` picks
            how many carry implants; the grid defaults to the crop of ``cfg.preprocess``
            (``size``^3 at ``spacing_mm``) plus a 16 mm margin (:func:`phantom_shape`).
        shape, spacing_mm: override the grid.

    Returns:
        One :class:`PhantomCase` per case, patient ids ``phantom-0000`` onwards.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spacing_mm = spacing_mm or cfg.preprocess.spacing_mm
    shape = shape or phantom_shape(cfg.preprocess.size, spacing_mm)
    flags = implant_flags(n, cfg.data.phantom_implant_fraction, cfg.data.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        phantom, case = phantom_case(i, cfg, shape=shape, spacing_mm=spacing_mm, flags=flags)
        path = write_phantom(phantom, out / phantom_case_name(i, suffix))
        cases.append(PhantomCase(case.patient_id, path, case.seed, case.implants))
    with open(out / "phantoms.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(cases[0])) if cases else
                                ["patient_id", "path", "seed", "implants"])
        writer.writeheader()
        writer.writerows(asdict(c) for c in cases)
    return cases


__all__ = [
    "LABELS", "PhantomParams", "Phantom", "PhantomCase", "sample_params", "render_phantom",
    "phantom_shape",
    "generate_phantom", "write_phantom", "implant_flags", "generate_phantoms",
    "phantom_case", "phantom_case_name", "phantom_spacing_mm", "write_phantom_case",
]
