"""CT preprocessing as pure functions (paper section III.A), each testable alone.

Axis convention, stated once for all of cvaa: after :func:`orient_canonical` a volume's
array ``(D, H, W)`` runs

* ``D`` superior -> inferior (physical -z in LPS),
* ``H`` anterior -> posterior (+y in LPS),
* ``W`` patient right -> left (+x in LPS),

i.e. the SimpleITK direction matrix is ``diag(1, 1, -1)``. Row 0 of an axial slice is
anterior and column 0 is the patient's right, as a radiologist views it; ``array[0]`` is the
most superior slice. Batched tensors add ``(B, 1, ...)`` in front.

The chain for one case (:func:`prepare_ct`): orient -> resample to isotropic spacing ->
pick the crop centre -> crop or pad to a cube -> clip to the HU window -> min-max to [0, 1].
:func:`denormalize` is the exact inverse of the last two inside the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from cvaa.config import PreprocessConfig
from cvaa.data.io import Volume

# DICOM-style orientation code of the canonical frame: index axes i, j, k point towards the
# patient's Left, Posterior and Inferior.
CANONICAL_ORIENTATION = "LPI"
CANONICAL_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def orient_canonical(volume: Volume) -> Volume:
    """Permute/flip the axes (lossless) so the array is ``(D, H, W)`` = (S->I, A->P, R->L)."""
    image = sitk.DICOMOrient(volume.to_sitk(), CANONICAL_ORIENTATION)
    return Volume.from_sitk(image, source=volume.source)


def resample_isotropic(volume: Volume, spacing_mm: float = 2.0,
                       fill_hu: float = -1000.0) -> Volume:
    """Resample (linear) onto an exactly canonical grid of ``spacing_mm`` voxels.

    The new grid starts at the same origin and covers the same physical extent; it has the
    exact canonical direction, so slightly oblique scans are resampled, not just relabelled.
    Voxels outside the scan get ``fill_hu`` (air).
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    image = volume.to_sitk()
    direction = np.array(volume.direction).reshape(3, 3)
    size = np.array(image.GetSize(), dtype=float)
    spacing = np.array(volume.spacing_mm)
    # Physical extent along each canonical axis: project the volume's corner box.
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners = corners * (size - 1) * spacing
    phys = (direction @ corners.T).T + np.array(volume.origin_mm)
    canon = np.array(CANONICAL_DIRECTION).reshape(3, 3)
    in_canon = phys @ canon  # coordinates along the canonical axes (columns of canon)
    start = in_canon.min(axis=0)
    extent = in_canon.max(axis=0) - start
    new_size = [max(1, int(round(e / spacing_mm)) + 1) for e in extent]
    origin = canon @ start
    out = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear,
                        origin.tolist(), (spacing_mm,) * 3, CANONICAL_DIRECTION,
                        float(fill_hu), sitk.sitkFloat32)
    return Volume.from_sitk(out, source=volume.source)


def body_centroid(volume: Volume, threshold_hu: float = -500.0) -> np.ndarray:
    """Index ``(d, h, w)`` (float) of the body's centroid.

    The body is the largest connected component of ``HU > threshold_hu`` after a binary
    opening, which detaches the thin patient table and drops noise, so neither the table
    nor empty air decides the crop. Falls back to the volume centre if nothing is found.
    """
    from scipy import ndimage

    mask = volume.array > threshold_hu
    radius = max(1, int(round(4.0 / min(volume.spacing_mm))))  # ~4 mm opening
    mask = ndimage.binary_opening(mask, structure=ndimage.generate_binary_structure(3, 1),
                                  iterations=radius)
    labels, n = ndimage.label(mask)
    if n == 0:
        return (np.array(volume.shape, float) - 1) / 2
    sizes = np.bincount(labels.ravel())[1:]
    body = labels == (int(np.argmax(sizes)) + 1)
    return np.array(ndimage.center_of_mass(body))


def volume_center(volume: Volume) -> np.ndarray:
    """Index ``(d, h, w)`` of the volume's centre."""
    return (np.array(volume.shape, float) - 1) / 2


def crop_or_pad(volume: Volume, size: int, center_index: np.ndarray | tuple[float, ...],
                pad_hu: float = -1000.0) -> Volume:
    """The ``size``^3 cube centred (to the nearest voxel) on ``center_index``.

    Where the cube reaches outside the volume it is padded with ``pad_hu``. The origin is
    moved so every voxel keeps its physical position.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    start = np.round(np.asarray(center_index, float) - (size - 1) / 2).astype(int)
    out = np.full((size,) * 3, pad_hu, dtype=np.float32)
    src, dst = [], []
    for axis in range(3):
        lo, hi = start[axis], start[axis] + size
        s_lo, s_hi = max(lo, 0), min(hi, volume.shape[axis])
        if s_hi <= s_lo:  # no overlap along this axis: all padding
            return _shifted(volume, out, start)
        src.append(slice(s_lo, s_hi))
        dst.append(slice(s_lo - lo, s_hi - lo))
    out[tuple(dst)] = volume.array[tuple(src)]
    return _shifted(volume, out, start)


def _shifted(volume: Volume, array: np.ndarray, start_dhw: np.ndarray) -> Volume:
    """A volume whose voxel (0, 0, 0) is ``start_dhw`` of ``volume`` (same direction)."""
    return Volume(array, volume.spacing_mm, index_to_physical(volume, start_dhw),
                  volume.direction, volume.source)


def index_to_physical(volume: Volume, index_dhw: np.ndarray | tuple[float, ...]) -> tuple:
    """Physical LPS position (mm) of a (fractional) array index ``(d, h, w)``."""
    ijk = np.asarray(index_dhw, float)[::-1]
    direction = np.array(volume.direction).reshape(3, 3)
    pos = np.array(volume.origin_mm) + direction @ (ijk * np.array(volume.spacing_mm))
    return tuple(float(v) for v in pos)


def clip_hu(array: np.ndarray, clip: tuple[float, float] = (-1000.0, 4096.0)) -> np.ndarray:
    return np.clip(array, clip[0], clip[1])


def normalize(hu: np.ndarray, clip: tuple[float, float] = (-1000.0, 4096.0)) -> np.ndarray:
    """Clip to the window and map it linearly to [0, 1]: ``(clip(HU) + 1000) / 5096``."""
    lo, hi = clip
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def denormalize(x: np.ndarray, clip: tuple[float, float] = (-1000.0, 4096.0)) -> np.ndarray:
    """Exact inverse of :func:`normalize` inside the window: [0, 1] -> HU."""
    lo, hi = clip
    return (np.asarray(x, np.float32) * (hi - lo) + lo).astype(np.float32)


@dataclass(frozen=True)
class PreparedCT:
    """The outputs of :func:`prepare_ct` for one case.

    Attributes:
        resampled: the whole oriented, resampled CT in HU (the DRR renders from it).
        cube: the ``size``^3 crop in HU (unclipped), with its geometry.
        normalized: the cube clipped and scaled to [0, 1], ``(D, H, W)`` float32.
        center_mm: physical LPS position of the crop centre (the DRR isocentre).
        crop_start: index ``(d, h, w)`` in ``resampled`` of the cube's first voxel.
    """

    resampled: Volume
    cube: Volume
    normalized: np.ndarray
    center_mm: tuple[float, float, float]
    crop_start: tuple[int, int, int] = (0, 0, 0)


def prepare_ct(volume: Volume, cfg: PreprocessConfig) -> PreparedCT:
    """Orient, resample, crop/pad, clip and normalise one CT (paper section III.A).

    Example:
        >>> prep = prepare_ct(read_ct("ct.nii.gz"), PreprocessConfig())
        >>> prep.normalized.shape
        (128, 128, 128)
    """
    resampled = resample_isotropic(orient_canonical(volume), cfg.spacing_mm, cfg.pad_hu)
    if cfg.crop_center == "body":
        center = body_centroid(resampled, cfg.body_threshold_hu)
    else:
        center = volume_center(resampled)
    # The crop starts at a whole voxel; its centre is where that cube's centre really is.
    start = np.round(center - (cfg.size - 1) / 2)
    cube = crop_or_pad(resampled, cfg.size, center, cfg.pad_hu)
    center_mm = index_to_physical(resampled, start + (cfg.size - 1) / 2)
    return PreparedCT(resampled, cube, normalize(cube.array, cfg.clip_hu), center_mm,
                      tuple(int(v) for v in start))
