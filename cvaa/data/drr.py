"""Biplanar DRRs (digitally reconstructed radiographs): geometry -> rays -> line integral.

Physics (DESIGN.md, "DRR"): ``mu = mu_water * (1 + HU / 1000)``, clamped at 0, in 1/mm;
the line integral ``L = integral of mu dl`` along perspective rays from a point source is
dimensionless. Optionally Beer-Lambert ``I = I0 * exp(-L)`` with Poisson noise and a small
detector blur, and back to ``-log(I / I0)``. The image is ``clip(L / log_scale, 0, 1)``: a
fixed divisor, never the per-image maximum (X2CT-GAN's choice, which destroys dose
information).

Geometry. The isocentre is a physical point (the crop centre); the central ray of each view
passes through it. Distances are ``sad_mm`` (source to isocentre) and ``sid_mm`` (source to
detector); the flat detector is ``detector_pixels`` square with ``pixel_pitch_mm``.

* PA (channel 0): source posterior, detector anterior; rows superior -> inferior, columns
  patient right -> left (radiologist's view: the patient's right on the viewer's left).
* Lateral (channel 1): source on the patient's right, detector on the left; rows superior ->
  inferior, columns anterior -> posterior (anterior on the viewer's left).

With the volume axes ``(D, H, W)`` = (S->I, A->P, R->L) of :mod:`cvaa.data.preprocess`, a
parallel-beam PA image is ``vol.sum(axis=H)`` and a lateral one ``vol.sum(axis=W)``; the
perspective images have the same orientation.

Fast path. The source of each view lies on a volume axis (H for PA, W for lateral), so the
points where the rays cross a plane perpendicular to that axis form a regular grid, scaled
by the plane's magnification: the row index depends only on (plane, detector row) and the
column index only on (plane, detector column). Trilinear sampling at those points is then
three 1D linear interpolations (along the main axis, the rows, the columns), each an
``index_select`` of whole rows with index tables of size ``(planes, P)``; the tables depend
only on the geometry and the volume's shape, spacing and isocentre, so they are computed
once and cached. Cost: O(planes * P * (N + P)) per view, not O(planes * P^2 * 8). Planes are ``step_mm`` apart along the main axis (Joseph's method when
``step_mm`` equals the voxel size); each sample stands for a ray segment of
``step_mm / cos(angle of the ray to the main axis)``. Outside the volume is air (mu 0).

Example:
    >>> prep = prepare_ct(read_ct("ct.nii.gz"), cfg.preprocess)
    >>> xrays = render_prepared(prep, cfg)      # (2, P, P) float32 in [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cvaa.config import Config, DRRConfig
from cvaa.data.io import Volume
from cvaa.data.preprocess import CANONICAL_DIRECTION, PreparedCT

VIEWS = ("pa", "lateral")  # channel order of every X-ray pair


# --------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Geometry:
    """Source/detector geometry shared by both views.

    Args:
        sad_mm: source-to-isocentre distance.
        sid_mm: source-to-detector distance (> ``sad_mm``: the patient is between).
        detector_pixels: detector edge in pixels (square detector).
        pixel_pitch_mm: detector pixel pitch (at the detector, not the isocentre).
        step_mm: distance between sampling planes along each view's main axis; ``0``
            samples one plane per voxel, through the voxel centres (Joseph's method).
    """

    sad_mm: float
    sid_mm: float
    detector_pixels: int
    pixel_pitch_mm: float
    step_mm: float

    def __post_init__(self) -> None:
        if not self.sad_mm > 0:
            raise ValueError(f"sad_mm must be positive, got {self.sad_mm}")
        if not self.sid_mm > self.sad_mm:
            raise ValueError(f"sid_mm must exceed sad_mm (detector behind the patient), "
                             f"got sid_mm={self.sid_mm}, sad_mm={self.sad_mm}")
        if int(self.detector_pixels) != self.detector_pixels or self.detector_pixels < 1:
            raise ValueError(f"detector_pixels must be a positive integer, "
                             f"got {self.detector_pixels}")
        if not self.pixel_pitch_mm > 0:
            raise ValueError(f"pixel_pitch_mm must be positive, got {self.pixel_pitch_mm}")
        if not self.step_mm >= 0:
            raise ValueError(f"step_mm must be >= 0 (0: one plane per voxel), "
                             f"got {self.step_mm}")

    @property
    def magnification(self) -> float:
        """Magnification of the isocentre plane on the detector, ``sid / sad``."""
        return self.sid_mm / self.sad_mm

    @property
    def fov_mm(self) -> float:
        """Field of view the detector covers at the isocentre."""
        return self.detector_pixels * self.pixel_pitch_mm / self.magnification


def detector_pitch_mm(fov_mm: float, sad_mm: float, sid_mm: float,
                      detector_pixels: int) -> float:
    """Pixel pitch so ``detector_pixels`` cover ``fov_mm`` at the isocentre, magnified."""
    if not fov_mm > 0:
        raise ValueError(f"fov_mm must be positive, got {fov_mm}")
    return fov_mm * sid_mm / sad_mm / detector_pixels


def geometry_from_config(cfg: DRRConfig, fov_mm: float) -> Geometry:
    """The :class:`Geometry` of ``cfg``; ``pixel_pitch_mm == 0`` derives it from ``fov_mm``."""
    pitch = cfg.pixel_pitch_mm or detector_pitch_mm(fov_mm, cfg.sad_mm, cfg.sid_mm,
                                                    cfg.detector_pixels)
    return Geometry(cfg.sad_mm, cfg.sid_mm, cfg.detector_pixels, pitch, cfg.step_mm)


def detector_coords_mm(detector_pixels: int, pixel_pitch_mm: float) -> np.ndarray:
    """``(P,)`` pixel centres along one detector edge, relative to the central ray."""
    return (np.arange(detector_pixels) - (detector_pixels - 1) / 2) * pixel_pitch_mm


def hu_to_mu(hu: torch.Tensor, mu_water_per_mm: float) -> torch.Tensor:
    """Linear attenuation (1/mm) from HU: ``mu_water * (1 + HU / 1000)``, at least 0."""
    # One new tensor, then in place: this runs on every rendered volume.
    return hu.float().mul(mu_water_per_mm / 1000.0).add_(mu_water_per_mm).clamp_(min=0.0)


# --------------------------------------------------------------------------- sampling tables

class _Tables(NamedTuple):
    """Index/weight tables of one view. Indices refer to the volume padded by one air
    voxel on every side, permuted to ``(main, row, col)``; ``w`` are linear weights of the
    upper neighbour."""

    main_i0: torch.Tensor   # (Np,) int64
    main_w: torch.Tensor    # (Np,)
    row_i0: torch.Tensor    # (Np, P) int64
    row_w: torch.Tensor     # (Np, P)
    col_i0: torch.Tensor    # (Np, P) int64
    col_w: torch.Tensor     # (Np, P)
    length_mm: torch.Tensor  # (P, P): ray length each plane sample stands for
    planes_on_voxels: bool   # every main weight is 0: planes are voxel slices
    consecutive: bool        # ... and they are consecutive slices
    main_start: int          # the first plane's slice (host int: no device sync)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "_Tables":
        """The tables on ``device`` (asynchronous from pinned memory with
        ``non_blocking``); the host flags stay host values."""
        return self._replace(**{k: getattr(self, k).to(device, non_blocking=non_blocking)
                                for k in _TABLE_TENSORS})

    def pin_memory(self) -> "_Tables":
        """The tables in page-locked host memory (needs a CUDA build with a device)."""
        return self._replace(**{k: getattr(self, k).pin_memory() for k in _TABLE_TENSORS})


_TABLE_TENSORS = ("main_i0", "main_w", "row_i0", "row_w", "col_i0", "col_w", "length_mm")


def _linear(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and weight of fractional ``index`` in an axis of ``n`` voxels padded
    by one air voxel at each end; points beyond the pad land on it (mu 0)."""
    f = np.clip(np.asarray(index, np.float64) + 1.0, 0.0, n + 1.0)
    i0 = np.minimum(np.floor(f), n).astype(np.int64)
    return i0, (f - i0).astype(np.float32)


def plane_positions(n_voxels: int, spacing_mm: float, step_mm: float) -> np.ndarray:
    """Fractional indices of the sampling planes along an axis of ``n_voxels``.

    Planes sit at multiples of ``step_mm`` from voxel 0 (so ``step_mm == spacing_mm``, or
    ``0``, samples the voxel centres exactly) and cover the volume plus its ramp to the air
    pad.
    """
    ratio = step_mm / spacing_mm if step_mm > 0 else 1.0
    first = math.floor(-1.0 / ratio) + 1          # first j with j * ratio > -1
    last = math.ceil(n_voxels / ratio) - 1        # last j with j * ratio < n_voxels
    return np.arange(first, last + 1) * ratio


@lru_cache(maxsize=64)
def _tables_cached(view: str, geometry: Geometry, shape_dhw: tuple[int, int, int],
                   spacing_xyz: tuple[float, float, float],
                   iso_dhw: tuple[float, float, float], device: str) -> _Tables:
    n_d, n_h, n_w = shape_dhw
    sx, sy, sz = spacing_xyz
    iso_d, iso_h, iso_w = iso_dhw
    det = detector_coords_mm(geometry.detector_pixels, geometry.pixel_pitch_mm)  # (P,)
    # Detector rows run superior -> inferior: physical z (superior +) falls with the row.
    det_z = -det
    if view == "pa":
        # Main axis H (posterior +y); source at y = +sad (posterior), detector anterior.
        planes = plane_positions(n_h, sy, geometry.step_mm)          # (Np,) in H index
        y_mm = (planes - iso_h) * sy
        scale = (geometry.sad_mm - y_mm) / geometry.sid_mm            # (Np,)
        main_n, main_spacing_mm = n_h, sy
        # Columns run patient right -> left = +x = +W.
        col_index = iso_w + scale[:, None] * det[None, :] / sx        # (Np, P)
        col_n = n_w
    elif view == "lateral":
        # Main axis W (left +x); source at x = -sad (patient's right), detector on the left.
        planes = plane_positions(n_w, sx, geometry.step_mm)
        x_mm = (planes - iso_w) * sx
        scale = (geometry.sad_mm + x_mm) / geometry.sid_mm
        main_n, main_spacing_mm = n_w, sx
        # Columns run anterior -> posterior = +y = +H.
        col_index = iso_h + scale[:, None] * det[None, :] / sy
        col_n = n_h
    else:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if (scale <= 0).any():
        raise ValueError(f"the volume reaches the source: sad_mm={geometry.sad_mm} is too "
                         "short for this volume")
    # D index grows inferior, i.e. as physical z falls (direction diag(1, 1, -1)).
    row_index = iso_d - scale[:, None] * det_z[None, :] / sz           # (Np, P)
    main_i0, main_w = _linear(planes, main_n)
    row_i0, row_w = _linear(row_index, n_d)
    col_i0, col_w = _linear(col_index, col_n)
    # A plane sample stands for step_mm along the main axis, i.e. step / cos(angle) along
    # the ray; the angle is set by the pixel's offset (u, v) from the central ray.
    u, v = np.meshgrid(det, det, indexing="ij")
    sec = np.sqrt(geometry.sid_mm ** 2 + u ** 2 + v ** 2) / geometry.sid_mm  # (P, P)
    step_mm = geometry.step_mm or main_spacing_mm
    length = (step_mm * sec).astype(np.float32)
    to = dict(device=device)
    return _Tables(torch.as_tensor(main_i0, **to), torch.as_tensor(main_w, **to),
                   torch.as_tensor(row_i0, **to), torch.as_tensor(row_w, **to),
                   torch.as_tensor(col_i0, **to), torch.as_tensor(col_w, **to),
                   torch.as_tensor(length, **to), bool((main_w == 0).all()),
                   bool((main_w == 0).all() and (np.diff(main_i0) == 1).all()),
                   int(main_i0[0]))


def _project(mu_padded: torch.Tensor, t: _Tables, chunk: int) -> torch.Tensor:
    """Line integrals of one view.

    Args:
        mu_padded: ``(B, Nm + 2, Nr + 2, Nc + 2)`` attenuation (1/mm), axes permuted to
            (main, row, col), contiguous, padded with one voxel of air on every side.
        t: the view's sampling tables.
        chunk: planes processed at a time.

    Returns:
        ``(B, P, P)`` dimensionless line integrals.
    """
    b, _, n_r, n_c = mu_padded.shape
    n_p, p = t.row_i0.shape
    parts = []
    for lo in range(0, n_p, chunk):
        hi = min(n_p, lo + chunk)
        k = hi - lo
        i0 = t.main_i0[lo:hi]
        if t.consecutive:
            # Planes through consecutive voxel slices: a view of the volume, no copy.
            planes = mu_padded.narrow(1, t.main_start + lo, k)           # (B, k, Nr, Nc)
        elif t.planes_on_voxels:
            planes = mu_padded.index_select(1, i0)
        else:
            planes = torch.lerp(mu_padded.index_select(1, i0),
                                mu_padded.index_select(1, i0 + 1),
                                t.main_w[lo:hi].view(1, k, 1, 1))
        # Rows: each plane's detector rows are whole rows of that plane, so one
        # index_select over the flattened (plane, row) axis copies both neighbours of
        # every sample row (no per-element index, unlike gather; few large ops).
        base = torch.arange(k, device=i0.device)[:, None]
        at = (t.row_i0[lo:hi] + base * n_r).reshape(1, -1)                # (1, k*P)
        both = planes.reshape(b, k * n_r, n_c).index_select(
            1, torch.cat([at, at + 1]).reshape(-1)).view(b, 2, k * p, n_c)
        rows = torch.lerp(both[:, 0], both[:, 1], t.row_w[lo:hi].reshape(1, -1, 1))
        # Columns the same way, after putting them on the middle axis.
        rows = rows.view(b, k, p, n_c).transpose(2, 3).reshape(b, k * n_c, p)
        at = (t.col_i0[lo:hi] + base * n_c).reshape(1, -1)                # (1, k*P)
        both = rows.index_select(1, torch.cat([at, at + 1]).reshape(-1)).view(b, 2, k * p, p)
        samples = torch.lerp(both[:, 0], both[:, 1],
                             t.col_w[lo:hi].reshape(1, -1, 1))            # (B, k*Pc, Pr)
        parts.append(samples.view(b, k, p, p).sum(1))                    # (B, Pc, Pr)
    total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
    return total.transpose(1, 2) * t.length_mm                            # (B, Pr, Pc)


def projection_tables(geometry: Geometry, shape_dhw: tuple[int, int, int],
                      spacing_mm: float | tuple[float, float, float],
                      isocenter_index: tuple[float, float, float] | None = None,
                      device: torch.device | str = "cpu") -> tuple[_Tables, ...]:
    """The sampling tables of both views (PA, lateral) for :func:`line_integrals`, built
    on the host (numpy) and placed on ``device``; cached per geometry.

    A training step that renders on a GPU builds them in its ingest threads on the CPU,
    pins them and copies them with ``non_blocking`` (``_Tables.to``): building them on the
    device would be ~14 pageable host-to-device copies, each a wait for the stream.
    """
    shape = tuple(int(n) for n in shape_dhw)
    spacing = _spacing_xyz(spacing_mm)
    iso = (tuple((n - 1) / 2 for n in shape) if isocenter_index is None
           else tuple(float(v) for v in isocenter_index))
    if len(iso) != 3:
        raise ValueError(f"isocenter_index must be (d, h, w), got {isocenter_index}")
    return tuple(_tables_cached(view, geometry, shape, spacing, iso, str(device))
                 for view in VIEWS)


def line_integrals(mu_per_mm: torch.Tensor, geometry: Geometry,
                   spacing_mm: float | tuple[float, float, float] | None,
                   isocenter_index: tuple[float, float, float] | None = None,
                   tables: tuple[_Tables, ...] | None = None) -> torch.Tensor:
    """Perspective line integrals of attenuation, PA and lateral.

    Args:
        mu_per_mm: ``(B, 1, D, H, W)`` attenuation in 1/mm, canonical axes
            (S->I, A->P, R->L).
        geometry: source/detector geometry.
        spacing_mm: voxel size, a float or ``(x, y, z)`` = ``(W, H, D)`` as in
            :attr:`Volume.spacing_mm`.
        isocenter_index: fractional array index ``(d, h, w)`` of the isocentre; default the
            array centre.
        tables: :func:`projection_tables` of this geometry, spacing and isocentre, already
            on ``mu_per_mm``'s device (then ``spacing_mm`` and ``isocenter_index`` are not
            read; ``None``: built or taken from the cache here).

    Returns:
        ``(B, 2, P, P)`` dimensionless line integrals; channel 0 PA, 1 lateral.
    """
    if mu_per_mm.dim() != 5 or mu_per_mm.shape[1] != 1:
        raise ValueError(f"mu_per_mm must be (B, 1, D, H, W), got {tuple(mu_per_mm.shape)}")
    mu = mu_per_mm[:, 0].float()                                          # (B, D, H, W)
    if tables is None:
        if spacing_mm is None:
            raise ValueError("spacing_mm is required unless tables are given")
        tables = projection_tables(geometry, tuple(mu.shape[1:]), spacing_mm,
                                   isocenter_index, mu.device)
    out = []
    for view, t in zip(VIEWS, tables):
        # Contiguous (main, row, col) layout, padded with one voxel of air on every side,
        # so every later selection copies whole rows.
        if view == "pa":
            permuted = mu.permute(0, 2, 1, 3)                             # (B, H, D, W)
        else:
            # (B, W, D, H): swapping the two fastest axes first, then moving whole rows,
            # is 2x faster than one scattered copy.
            permuted = mu.transpose(2, 3).contiguous().permute(0, 2, 1, 3)
        padded = mu.new_zeros(permuted.shape[0], *(n + 2 for n in permuted.shape[1:]))
        padded[:, 1:-1, 1:-1, 1:-1] = permuted
        if padded.device.type == "cpu":
            # One volume at a time. Single-threaded (Ray tasks, DataLoader workers), 32
            # planes at a time keep the intermediates in cache: 3x faster than all planes
            # at 128^3. Multi-threaded, every op ends in a barrier that costs a scheduler
            # slice when the cores are shared, so fewer, larger ops (all planes) win: 2x
            # on a loaded 2-core machine.
            chunk = 32 if torch.get_num_threads() == 1 else t.row_i0.shape[0]
            image = torch.cat([_project(v, t, chunk=chunk) for v in padded.split(1)])
        else:
            image = _project(padded, t, chunk=t.row_i0.shape[0])
        out.append(image)
    return torch.stack(out, dim=1)                                        # (B, 2, P, P)


def _spacing_xyz(spacing_mm: float | tuple[float, ...]) -> tuple[float, float, float]:
    values = (spacing_mm,) * 3 if np.isscalar(spacing_mm) else tuple(spacing_mm)
    if len(values) != 3 or not all(float(v) > 0 for v in values):
        raise ValueError(f"spacing_mm must be a positive float or 3 positive floats "
                         f"(x, y, z), got {spacing_mm}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


# --------------------------------------------------------------------------- detector

def gaussian_blur(image: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images, edges replicated."""
    if sigma_px <= 0:
        return image
    radius = max(1, int(math.ceil(3 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    b, c, h, w = image.shape
    flat = image.reshape(b * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
                    kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"),
                    kernel.view(1, 1, -1, 1))
    return flat.reshape(b, c, h, w)


def noisy_line_integrals(line: torch.Tensor, photons: float, blur_sigma_px: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Beer-Lambert with Poisson noise at ``photons`` per pixel, detector blur, and back.

    Args:
        line: ``(B, C, H, W)`` line integrals.
        photons: unattenuated counts per pixel, I0 (> 0).
        blur_sigma_px: Gaussian blur of the detected counts (light spread in the
            scintillator, which also correlates the noise); 0 for none.
        generator: seeds the Poisson draw.

    Returns:
        ``-log(I / I0)``, same shape; a pixel that caught no photon reads as half of one.
    """
    if not photons > 0:
        raise ValueError(f"photons must be positive, got {photons}")
    counts = torch.poisson(photons * torch.exp(-line), generator=generator)
    counts = gaussian_blur(counts, blur_sigma_px)
    return -torch.log(torch.clamp(counts, min=0.5) / photons)


# --------------------------------------------------------------------------- public API

def render_drr(volume_hu: torch.Tensor | Volume, cfg: DRRConfig, *,
               spacing_mm: float | tuple[float, float, float] | None = None,
               isocenter_index: tuple[float, float, float] | None = None,
               isocenter_mm: tuple[float, float, float] | None = None,
               fov_mm: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Render normalised PA + lateral DRRs of CT volumes in HU.

    Args:
        volume_hu: ``(B, 1, D, H, W)`` HU in the canonical axes (S->I, A->P, R->L), or a
            :class:`Volume` with the canonical direction ``diag(1, 1, -1)``.
        cfg: geometry and physics (``mu_water_per_mm``, ``log_scale``, noise ...).
        spacing_mm: voxel size of a tensor input (float or ``(x, y, z)``); a Volume
            carries its own.
        isocenter_index: fractional index ``(d, h, w)`` of the isocentre; default the array
            centre.
        isocenter_mm: physical LPS isocentre (Volume input only), e.g. the crop centre
            ``PreparedCT.center_mm``.
        fov_mm: field of view at the isocentre that sets the pixel pitch when
            ``cfg.pixel_pitch_mm == 0``; default the volume's largest extent (for a crop
            cube: ``size * spacing_mm``).
        generator: seeds the noise (``cfg.photons > 0``); default seeded with ``cfg.seed``.

    Returns:
        ``(B, 2, P, P)`` float32 in [0, 1]: ``clip(L / cfg.log_scale, 0, 1)``; channel 0 PA,
        channel 1 lateral, rows superior -> inferior.

    Example:
        >>> x = render_drr(torch.full((1, 1, 32, 32, 32), -1000.0), load_config("cpu").drr,
        ...                spacing_mm=8.0)
        >>> x.shape, float(x.max())
        (torch.Size([1, 2, 32, 32]), 0.0)
    """
    hu, spacing, iso = _as_batch(volume_hu, spacing_mm, isocenter_index, isocenter_mm)
    if fov_mm is None:
        fov_mm = max(n * s for n, s in zip(hu.shape[2:], spacing[::-1]))
    geometry = geometry_from_config(cfg, fov_mm)
    if not cfg.log_scale > 0:
        raise ValueError(f"cfg.log_scale must be positive, got {cfg.log_scale}")
    line = line_integrals(hu_to_mu(hu, cfg.mu_water_per_mm), geometry, spacing, iso)
    if cfg.photons > 0:
        if generator is None:
            generator = torch.Generator(device=line.device).manual_seed(cfg.seed)
        line = noisy_line_integrals(line, cfg.photons, cfg.blur_sigma_px, generator)
    return torch.clamp(line / cfg.log_scale, 0.0, 1.0)


def render_prepared(prep: PreparedCT, cfg: Config, *,
                    generator: torch.Generator | None = None) -> np.ndarray:
    """PA + lateral DRRs of a :class:`~cvaa.data.preprocess.PreparedCT`.

    Renders ``prep.resampled`` (``cfg.drr.source == "full"``: the whole body, as a real
    radiograph sees it) or ``prep.cube`` (``"cube"``), with the isocentre at the crop
    centre ``prep.center_mm`` and the detector covering the crop's field of view.

    Returns:
        ``(2, P, P)`` float32 in [0, 1]; channel 0 PA, 1 lateral.
    """
    if cfg.drr.source == "full":
        volume = prep.resampled
    elif cfg.drr.source == "cube":
        volume = prep.cube
    else:
        raise ValueError(f"cfg.drr.source must be 'full' or 'cube', got {cfg.drr.source!r}")
    fov_mm = prep.cube.shape[0] * prep.cube.spacing_mm[0]
    out = render_drr(volume, cfg.drr, isocenter_mm=prep.center_mm, fov_mm=fov_mm,
                     generator=generator)
    return out[0].numpy().astype(np.float32, copy=False)


def _as_batch(volume_hu, spacing_mm, isocenter_index, isocenter_mm):
    """``(B, 1, D, H, W)`` HU tensor, spacing ``(x, y, z)`` and isocentre index."""
    if isinstance(volume_hu, Volume):
        if spacing_mm is not None:
            raise ValueError("spacing_mm: a Volume carries its own spacing; pass None")
        direction = np.asarray(volume_hu.direction, float)
        if not np.allclose(direction, CANONICAL_DIRECTION, atol=1e-6):
            raise ValueError(f"volume_hu: direction {tuple(direction.round(3))} is not the "
                             "canonical diag(1, 1, -1); orient and resample it first "
                             "(cvaa.data.preprocess.prepare_ct)")
        spacing = tuple(float(s) for s in volume_hu.spacing_mm)
        if isocenter_mm is not None:
            if isocenter_index is not None:
                raise ValueError("give isocenter_mm or isocenter_index, not both")
            offset = np.asarray(isocenter_mm, float) - np.asarray(volume_hu.origin_mm, float)
            ijk = (direction.reshape(3, 3).T @ offset) / np.asarray(spacing)
            isocenter_index = tuple(float(v) for v in ijk[::-1])
        hu = torch.from_numpy(np.ascontiguousarray(volume_hu.array, np.float32))[None, None]
        return hu, spacing, isocenter_index
    if not isinstance(volume_hu, torch.Tensor):
        raise ValueError(f"volume_hu must be a torch.Tensor or a Volume, "
                         f"got {type(volume_hu).__name__}")
    if volume_hu.dim() != 5 or volume_hu.shape[1] != 1:
        raise ValueError(f"volume_hu must be (B, 1, D, H, W), got {tuple(volume_hu.shape)}")
    if isocenter_mm is not None:
        raise ValueError("isocenter_mm needs a Volume (a tensor has no origin); "
                         "use isocenter_index")
    if spacing_mm is None:
        raise ValueError("spacing_mm is required for a tensor volume")
    return volume_hu.float(), _spacing_xyz(spacing_mm), isocenter_index


__all__ = [
    "VIEWS", "Geometry", "detector_pitch_mm", "geometry_from_config", "detector_coords_mm",
    "hu_to_mu", "plane_positions", "projection_tables", "line_integrals", "gaussian_blur",
    "noisy_line_integrals", "render_drr", "render_prepared",
]
