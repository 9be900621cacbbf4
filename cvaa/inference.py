"""Reconstruction for users: two X-ray files in, a CT in HU out (behind ``jobs/reconstruct.py``).

Pure torch + numpy + SimpleITK + pydicom (no Ray, no MLflow: the registry lookup is
:func:`cvaa.tracking.load_model`). The chain for real radiographs::

    pa, lat = read_xray("pa.dcm"), read_xray("lat.png")      # (H, W) float32, bone bright
    xrays = prepare_xrays(pa, lat, cfg)                      # (2, P, P) in the DRR domain
    volume = volume_from_prediction(reconstruct(G, xrays), cfg)   # HU, 2 mm, LPS
    write_volume(volume, "ct.nii.gz")                        # or write_dicom_series(...)

A DICOM series is labelled as a model's estimate (:func:`estimate_label`) and, when both
radiographs are DICOM of one patient and study, filed with them
(:func:`read_pair_identity`); otherwise its patient is ``ANONYMOUS`` in a new study.

What can and cannot match training. The model was trained on DRRs: a perspective
line integral of attenuation ``L`` (dimensionless) divided by a fixed constant
(``drr.log_scale``), with air at 0 and the trunk peaking near ``L = 4..8`` (0.35..0.7 at
``log_scale = 12``). A real radiograph's stored values are a monotonic but unknown function
of ``L`` (detector response, log transform, the vendor's processing and look-up tables), so
the intensity mapping here is an assumption, not a calibration: each view is windowed
between robust percentiles (default 0.5 and 99.5), the dark end taken as air (``L = 0``)
and the bright end as :data:`TYPICAL_PEAK_ATTENUATION` attenuation lengths, linearly in
between. The geometry is assumed to be the training geometry: PA and lateral views from
perpendicular sources at the config's ``sad_mm`` / ``sid_mm``, the image (centre-cropped to
a square) covering the crop's field of view at the isocentre (``preprocess.size *
spacing_mm``, 256 mm at the paper preset), rows superior -> inferior, the PA with the
patient's right on the viewer's left and the lateral with anterior on the viewer's left
(DESIGN.md, "Data contracts"). Images where bone is dark need ``invert=True``; DICOM
``MONOCHROME1`` images are inverted from their header.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from cvaa.config import Config
from cvaa.data.io import (WRITE_SUFFIXES, InvalidVolumeError, Volume, is_s3, local_copy,
                          write_ct)
from cvaa.data.preprocess import CANONICAL_DIRECTION, denormalize

# Attenuation lengths (L = integral of mu dl) the bright end of a radiograph's window is
# taken to be: ~300 mm of water, a typical trunk. The real CTs in ../shared/data render
# at L = 5.5 (lumbar PA), 8.4 (lumbar lateral), 5.2 / 4.2 (thorax PA / lateral).
TYPICAL_PEAK_ATTENUATION = 6.0
DEFAULT_WINDOW_PCT = (0.5, 99.5)
MIN_XRAY_PIXELS = 16
# Modalities whose images are not projection radiographs.
_NOT_RADIOGRAPHS = {"CT", "MR", "PT", "NM", "US", "SEG", "RTDOSE", "RTSTRUCT"}


class InvalidXrayError(ValueError):
    """An X-ray input that cannot be used; the message names the file and the problem."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri}: {problem}")
        self.uri = str(uri)
        self.problem = problem


# --------------------------------------------------------------------------- reading

def read_xray(uri: str | os.PathLike) -> np.ndarray:
    """Read one radiograph as ``(H, W)`` float32, rows as displayed, bright = attenuating.

    Formats: PNG / TIFF / JPEG / BMP (8- or 16-bit grey, or colour converted to luminance),
    DICOM (DX, CR, ...; rescale slope/intercept applied, ``MONOCHROME1`` inverted so bone
    is bright), and 2D NIfTI / MHA / NRRD (array rows taken as display rows). Local paths or
    ``s3://bucket/key``.

    Raises:
        InvalidXrayError: missing file, not an image, a 3D volume or a series, fewer than
            16 pixels along an axis, non-finite or constant pixels.

    Example:
        >>> read_xray("pa.png").shape
        (2048, 2048)
    """
    uri = str(uri)
    try:
        with local_copy(uri) as path:
            if not path.exists():
                raise InvalidXrayError(uri, "no such file")
            if path.is_dir():
                raise InvalidXrayError(uri, "is a directory; give one X-ray image file")
            image = _read_dicom(path, uri) if _is_dicom(path) else _read_itk(path, uri)
    except InvalidVolumeError as exc:  # S3 errors from local_copy
        raise InvalidXrayError(uri, exc.problem) from exc
    if min(image.shape) < MIN_XRAY_PIXELS:
        raise InvalidXrayError(uri, f"image of {image.shape[1]}x{image.shape[0]} pixels is "
                                    f"too small (at least {MIN_XRAY_PIXELS} per axis)")
    if not np.isfinite(image).all():
        raise InvalidXrayError(uri, "non-finite pixel values (NaN or inf)")
    if float(image.max()) == float(image.min()):
        raise InvalidXrayError(uri, f"every pixel is {float(image.min())}: no image content")
    return image


def _is_dicom(path: Path) -> bool:
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read_dicom(path: Path, uri: str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidXrayError(uri, f"not a readable DICOM file ({exc})") from exc
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NOT_RADIOGRAPHS:
        raise InvalidXrayError(uri, f"a DICOM {modality} image, not a projection "
                                    "radiograph (DX, CR)")
    if "PixelData" not in ds:
        raise InvalidXrayError(uri, "DICOM file without pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InvalidXrayError(uri, f"multi-frame DICOM ({frames} frames); an X-ray is one "
                                    "2D image")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidXrayError(uri, f"colour DICOM ({ds.get('PhotometricInterpretation')}); "
                                    "a radiograph is greyscale")
    try:
        array = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # compressed syntaxes pydicom cannot decode: try GDCM
        array = _read_itk(path, uri, reason=f"pydicom could not decode it ({exc})")
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        array = array * slope + float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if array.ndim != 2:
        raise InvalidXrayError(uri, f"DICOM pixel array of shape {array.shape}; an X-ray is "
                                    "one 2D image")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # MONOCHROME1: the lowest value is displayed white. Flip so bright = attenuating.
        array = array.max() + array.min() - array
    return array.astype(np.float32)


def _read_itk(path: Path, uri: str, reason: str = "") -> np.ndarray:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        why = f"; {reason}" if reason else ""
        raise InvalidXrayError(uri, f"not an image file (PNG, TIFF, DICOM, 2D NIfTI/MHA)"
                                    f"{why}") from exc
    size = tuple(reader.GetSize())
    if len(size) > 2 and sum(n > 1 for n in size) > 2:
        raise InvalidXrayError(uri, f"{len(size)}D image of size {size}: a volume or a "
                                    "series, not an X-ray (give one 2D image per view)")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InvalidXrayError(uri, "cannot read the pixels "
                                    f"({str(exc).strip().splitlines()[-1]})") from exc
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        if components not in (3, 4):
            raise InvalidXrayError(uri, f"{components}-component pixels; give a greyscale "
                                        "image")
        # Colour export of a greyscale radiograph: ITU-R BT.601 luminance, alpha dropped.
        array = array[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    array = np.squeeze(array)  # a 3D file with one slice is a 2D image
    if array.ndim != 2:
        raise InvalidXrayError(uri, f"image of shape {array.shape}; an X-ray is 2D")
    return array


# --------------------------------------------------------------------------- identity

@dataclass(frozen=True, repr=False)
class DicomIdentity:
    """The patient and study of a DICOM radiograph, to file a reconstruction with them.

    Used only to write the output series (:func:`write_dicom_series`): never logged or
    printed, and ``repr`` shows no values, so a traceback or a debugger does not either.
    Values are the header's text, ``""`` where a tag is absent or empty.
    """

    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""

    def __repr__(self) -> str:
        return "DicomIdentity(<withheld>)"


# DicomIdentity field -> DICOM keyword (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study).
_IDENTITY_KEYWORDS = {
    "patient_name": "PatientName", "patient_id": "PatientID",
    "patient_birth_date": "PatientBirthDate", "patient_sex": "PatientSex",
    "study_instance_uid": "StudyInstanceUID", "study_date": "StudyDate",
    "study_time": "StudyTime", "accession_number": "AccessionNumber", "study_id": "StudyID",
}


def read_dicom_identity(uri: str | os.PathLike) -> DicomIdentity | None:
    """The patient and study tags of a DICOM radiograph, or ``None`` for another format.

    Reads only those tags (header up to the pixels, ``specific_tags``), with pydicom's
    value validation off: its warnings quote the values.

    Raises:
        InvalidXrayError: missing file, or a DICOM file whose header cannot be read.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.tag import Tag

    uri = str(uri)
    tags = [Tag(keyword) for keyword in _IDENTITY_KEYWORDS.values()]
    try:
        with local_copy(uri) as path:
            if not path.is_file():
                raise InvalidXrayError(uri, "no such file")
            if not _is_dicom(path):
                return None
            with pydicom.config.disable_value_validation():
                try:
                    ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                                         specific_tags=tags)
                except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
                    raise InvalidXrayError(uri, "not a readable DICOM file "
                                                f"({type(exc).__name__})") from exc
                values = {name: _dicom_text(ds.get(keyword))
                          for name, keyword in _IDENTITY_KEYWORDS.items()}
    except InvalidVolumeError as exc:  # S3 errors from local_copy
        raise InvalidXrayError(uri, exc.problem) from exc
    return DicomIdentity(**values)


def read_pair_identity(pa_uri: str | os.PathLike,
                       lateral_uri: str | os.PathLike) -> DicomIdentity | None:
    """The PA's :class:`DicomIdentity` when both views are DICOM of one patient and study.

    Returns ``None`` unless both files are DICOM.

    Raises:
        InvalidXrayError: naming both files, when their ``PatientID`` or
            ``StudyInstanceUID`` differ (the message names the tag, not its values).

    Example:
        >>> read_pair_identity("pa.dcm", "lat.png") is None
        True
    """
    pa, lateral = read_dicom_identity(pa_uri), read_dicom_identity(lateral_uri)
    if pa is None or lateral is None:
        return None
    differ = [keyword for name, keyword in (("patient_id", "PatientID"),
                                            ("study_instance_uid", "StudyInstanceUID"))
              if getattr(pa, name) != getattr(lateral, name)]
    if differ:
        raise InvalidXrayError(
            f"{pa_uri}, {lateral_uri}",
            f"the two radiographs differ in {' and '.join(differ)}: they must show one "
            "patient in one study")
    return pa


def _dicom_text(value: Any) -> str:
    """A header value as DICOM text: multiple values joined by ``\\``, ``""`` if absent."""
    from pydicom.multival import MultiValue

    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------- preprocessing

def default_xray_range(cfg: Config) -> tuple[float, float]:
    """Training-domain values for the dark and bright ends of a radiograph's window:
    air (0) and :data:`TYPICAL_PEAK_ATTENUATION` / ``drr.log_scale``."""
    return 0.0, min(1.0, TYPICAL_PEAK_ATTENUATION / cfg.drr.log_scale)


def normalize_xray(image: np.ndarray, window_pct: Sequence[float] = DEFAULT_WINDOW_PCT,
                   value_range: Sequence[float] = (0.0, 0.5), invert: bool = False,
                   uri: str = "image") -> np.ndarray:
    """Map a radiograph monotonically into the DRR domain.

    The window between the ``window_pct`` percentiles maps linearly onto ``value_range``,
    clipped to it (robust to burnt-in labels and collimator edges).

    Args:
        image: ``(H, W)`` with bright = attenuating (or dark, with ``invert``).
        window_pct: low and high percentiles, ``0 <= low < high <= 100``.
        value_range: training-domain values of the window's ends, within [0, 1].
        invert: bone is dark in ``image``: negate it first.
        uri: names the image in errors.

    Returns:
        ``(H, W)`` float32 within ``value_range``.

    Example:
        >>> normalize_xray(np.array([[0.0, 1.0], [2.0, 4.0]]), (0, 100), (0, 1)).tolist()
        [[0.0, 0.25], [0.5, 1.0]]
    """
    low_pct, high_pct = (float(v) for v in window_pct)
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"window_pct must satisfy 0 <= low < high <= 100, got {window_pct}")
    lo_val, hi_val = (float(v) for v in value_range)
    if not 0.0 <= lo_val < hi_val <= 1.0:
        raise ValueError(f"value_range must satisfy 0 <= low < high <= 1, got {value_range}")
    x = np.asarray(image, np.float64)
    if invert:
        x = -x
    lo, hi = np.percentile(x, [low_pct, high_pct])
    if not hi > lo:
        raise InvalidXrayError(uri, f"no contrast between the {low_pct} and {high_pct} "
                                    f"percentiles (both {lo:g}); widen the window")
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (lo_val + t * (hi_val - lo_val)).astype(np.float32)


def fit_detector(image: np.ndarray, pixels: int) -> np.ndarray:
    """Centre-crop ``(H, W)`` to a square and resize it to ``(pixels, pixels)``.

    The square crop keeps pixels square (the detector is square and covers the crop's
    field of view); resizing is antialiased bilinear, so downsampling averages.
    """
    h, w = image.shape
    n = min(h, w)
    top, left = (h - n) // 2, (w - n) // 2
    square = torch.from_numpy(np.ascontiguousarray(image[top:top + n, left:left + n],
                                                   np.float32))
    if n == pixels:
        return square.numpy()
    out = torch.nn.functional.interpolate(square[None, None], size=(pixels, pixels),
                                          mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0, 0].numpy()


def prepare_xrays(pa: np.ndarray, lateral: np.ndarray, cfg: Config, *,
                  window_pct: Sequence[float] = DEFAULT_WINDOW_PCT,
                  value_range: Sequence[float] | None = None, invert: bool = False,
                  names: tuple[str, str] = ("PA", "lateral")) -> np.ndarray:
    """Two radiographs -> the model's ``(2, P, P)`` input (channel 0 PA, 1 lateral).

    Args:
        pa, lateral: ``(H, W)`` images from :func:`read_xray`; the same size (one detector).
        cfg: the model's config (``drr.detector_pixels``, ``drr.log_scale``).
        window_pct, value_range, invert: see :func:`normalize_xray`; ``value_range``
            defaults to :func:`default_xray_range`.
        names: the two inputs' names (file paths) for error messages.

    Raises:
        InvalidXrayError: the two views differ in size, or one has no contrast.
    """
    if pa.shape != lateral.shape:
        raise InvalidXrayError(
            f"{names[0]}, {names[1]}",
            f"the two views differ in size ({pa.shape[1]}x{pa.shape[0]} vs "
            f"{lateral.shape[1]}x{lateral.shape[0]} pixels); both must come from the same "
            "detector geometry")
    value_range = default_xray_range(cfg) if value_range is None else value_range
    pixels = cfg.drr.detector_pixels
    views = [normalize_xray(fit_detector(img, pixels), window_pct, value_range, invert, name)
             for img, name in zip((pa, lateral), names)]
    return np.stack(views).astype(np.float32)                             # (2, P, P)


def xrays_from_ct(uri: str, cfg: Config):
    """The training-geometry DRRs of a CT and its prepared cube (the demo round trip).

    Returns:
        ``(xrays (2, P, P), prepared)`` with ``prepared`` a
        :class:`~cvaa.data.preprocess.PreparedCT` (``normalized`` is the ground truth).
    """
    from cvaa.data.drr import render_prepared
    from cvaa.data.io import read_ct
    from cvaa.data.preprocess import prepare_ct

    prepared = prepare_ct(read_ct(uri), cfg.preprocess)
    return render_prepared(prepared, cfg), prepared


# --------------------------------------------------------------------------- model

@torch.no_grad()
def reconstruct(generator: nn.Module, xrays: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(2, P, P)`` X-rays in [0, 1] -> ``(D, H, W)`` float32 volume in [0, 1].

    Runs on the generator's device, in eval mode; the output is clamped to [0, 1].
    """
    x = torch.as_tensor(np.asarray(xrays, np.float32) if not torch.is_tensor(xrays) else xrays)
    if x.dim() != 3 or x.shape[0] != 2:
        raise ValueError(f"xrays must be (2, P, P), got {tuple(x.shape)}")
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        y = generator(x[None].float().to(device))                         # (1, 1, D, H, W)
    finally:
        generator.train(was_training)
    return y[0, 0].float().clamp(0, 1).cpu().numpy()


def volume_from_prediction(normalized: np.ndarray, cfg: Config,
                           origin_mm: Sequence[float] | None = None, source: str = "") -> Volume:
    """A ``(D, H, W)`` prediction in [0, 1] as a CT in HU with the training geometry.

    Spacing ``preprocess.spacing_mm`` (isotropic), canonical LPS direction
    ``diag(1, 1, -1)``; ``origin_mm`` defaults to putting the cube's centre at (0, 0, 0).
    """
    array = denormalize(normalized, cfg.preprocess.clip_hu)
    s = float(cfg.preprocess.spacing_mm)
    if origin_mm is None:
        half = (np.array(array.shape[::-1], float) - 1) / 2 * s            # (x, y, z) index
        origin_mm = -(np.array(CANONICAL_DIRECTION).reshape(3, 3) @ half)
    return Volume(array, (s, s, s), tuple(float(v) for v in origin_mm), CANONICAL_DIRECTION,
                  source)


# --------------------------------------------------------------------------- writing

def check_output(out: str, dicom: bool) -> None:
    """Refuse an output path that cannot be written, before any work is done.

    Raises:
        ValueError: a volume path without a known suffix, a ``--dicom`` path that is a
            file or a non-empty directory, or a DICOM series to S3.
    """
    lower = str(out).lower()
    if not dicom:
        if not lower.endswith(WRITE_SUFFIXES):
            raise ValueError(f"{out}: unsupported output suffix; use one of "
                             f"{', '.join(WRITE_SUFFIXES)} (or --dicom with a directory)")
        if not is_s3(out) and Path(out).is_dir():
            raise ValueError(f"{out}: is a directory; give a file name")
        return
    if is_s3(out):
        raise ValueError(f"{out}: DICOM series are written to a local directory")
    if lower.endswith(WRITE_SUFFIXES):
        raise ValueError(f"{out}: with --dicom the output is a directory, not a volume file")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory (a DICOM series "
                         "needs a directory of its own)")


def write_volume(volume: Volume, out: str) -> str:
    """Write NIfTI / MHA / NRRD by suffix; locally through a temporary file renamed into
    place, so a failure leaves no partial output."""
    if is_s3(out):
        return write_ct(volume, out)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next(s for s in WRITE_SUFFIXES if path.name.lower().endswith(s))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:-len(suffix)]}-", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        write_ct(volume, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Display names of cfg.model.generator for the label; other names are shown as they are.
_GENERATOR_TITLES = {"cvaa": "CVAA-GAN", "x2ct": "X2CT-GAN", "3dcnn": "3D CNN", "psr": "PSR"}
# DICOM value lengths (PS3.5 table 6.2-1): LO 64, ST 1024, LT 10240 characters.
_LO, _ST, _LT = 64, 1024, 10240


@dataclass(frozen=True)
class EstimateLabel:
    """What a written series says about itself: a model's estimate, not an acquired CT.

    Attributes:
        series_description: ``SeriesDescription`` (at most 64 characters).
        comments: ``ImageComments`` and ``DerivationDescription``: which model, from what,
            and that it is not for diagnosis.
        model_name: ``ManufacturerModelName`` (at most 64 characters).
    """

    series_description: str
    comments: str
    model_name: str


def estimate_label(model_uri: str = "", *, model_label: str = "", version: str = "",
                   generator: str = "cvaa") -> EstimateLabel:
    """The label of a series estimated by a registered model.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or another model URI;
            ``""``: a model not named (the label still says it is an estimate).
        model_label: a short name for ``ManufacturerModelName`` (``LoadedModel.label``);
            defaults to the URI.
        version: the registry version (``LoadedModel.version``), ``""`` outside a registry.
        generator: the architecture, ``cfg.model.generator``.

    Example:
        >>> estimate_label("models:/cvaa-gan@candidate", version="3").series_description
        'CT estimate from 2 X-rays (cvaa-gan v3)'
    """
    title = _GENERATOR_TITLES.get(generator, generator)
    if not model_uri:
        return EstimateLabel("CT estimate from 2 X-rays",
                             f"Not an acquired CT: a CT volume estimated by a {title} model "
                             "from a PA and a lateral radiograph. Not for diagnosis.",
                             _fit(model_label or "cvaa", _LO))
    name = model_uri
    if model_uri.startswith("models:/"):
        ref = model_uri[len("models:/"):].rstrip("/")
        name = ref.partition("@")[0] if "@" in ref else ref.rpartition("/")[0] or ref
    head, tail = "CT estimate from 2 X-rays (", f" v{version})" if version else ")"
    description = head + _fit(name, _LO - len(head) - len(tail)) + tail   # the version kept
    registry = f" (registry version {version})" if version else ""
    comments = (f"Not an acquired CT: a CT volume estimated by the {title} model "
                f"{model_uri}{registry} from a PA and a lateral radiograph. Not for "
                "diagnosis.")
    return EstimateLabel(description, _fit(comments, _LT), _fit(model_label or model_uri, _LO))


def _fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked by ``...``."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_dicom_series(volume: Volume, directory: str | os.PathLike, *,
                       label: EstimateLabel | None = None,
                       identity: DicomIdentity | None = None,
                       identity_removed: bool = False, study_uid: str | None = None,
                       series_number: int = 1) -> list[str]:
    """Write a volume in HU as a DICOM CT series, one file per slice along ``D``.

    Pixel data are int16 HU (slope 1, intercept 0); every slice carries the same study,
    series and frame of reference UIDs, ``ImageOrientationPatient`` from the direction
    matrix, its own ``ImagePositionPatient``, and ``PixelSpacing``, ``SliceThickness`` and
    ``SpacingBetweenSlices``, so :func:`cvaa.data.io.read_ct` reads it back with the same
    size, spacing and physical positions. Written into a temporary sibling directory that
    is renamed into place at the end.

    The series is ``DERIVED\\SECONDARY``, labelled by ``label`` (``SeriesDescription``,
    ``ImageComments``, ``DerivationDescription``, ``ManufacturerModelName``), with new
    series, instance and frame of reference UIDs (its coordinates are the model's, not the
    radiographs').

    Args:
        volume: the CT in HU.
        directory: a new (or empty) directory.
        label: from :func:`estimate_label`; default ``estimate_label()``, naming no model.
        identity: the radiographs' patient and study (:func:`read_pair_identity`) to file
            the series with; ``None``: patient ``ANONYMOUS`` in a new study.
        identity_removed: also mark ``PatientIdentityRemoved = YES`` (``--anonymize``);
            only with ``identity=None``.
        study_uid: with ``identity=None``, the study to file the series in (a second
            series of the same estimate, e.g. its uncertainty); default a new study.
        series_number: ``SeriesNumber``.

    Returns:
        The files written, in slice order.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if identity is not None and identity_removed:
        raise ValueError("identity_removed=True needs identity=None")
    label = label if label is not None else estimate_label()
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    direction = np.array(volume.direction, float).reshape(3, 3)
    sx, sy, sz = (float(s) for s in volume.spacing_mm)
    origin = np.array(volume.origin_mm, float)
    hu = np.clip(np.rint(volume.array), -32768, 32767).astype(np.int16)  # (D, H, W)
    series, frame = generate_uid(), generate_uid()
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    # Patient and study: the radiographs' (copied as they are, empty tags left out), or an
    # anonymous patient in a study of its own.
    filed = {keyword: getattr(identity, name) for name, keyword in _IDENTITY_KEYWORDS.items()
             if getattr(identity, name)} if identity is not None else {}
    filed.setdefault("PatientName", "ANONYMOUS" if identity is None else "")
    filed.setdefault("PatientID", "ANONYMOUS" if identity is None else "")
    filed.setdefault("StudyInstanceUID", study_uid or generate_uid())
    if identity is None:
        filed.update(StudyDate=now[0], StudyTime=now[1])
    names = []
    try:
        # Validation off: pydicom's warnings about a copied value would quote it.
        with pydicom.config.disable_value_validation():
            for k in range(hu.shape[0]):
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
                meta.MediaStorageSOPInstanceUID = generate_uid()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = Dataset()
                ds.file_meta = meta
                ds.SpecificCharacterSet = "ISO_IR 192"   # UTF-8: names as the input has them
                ds.SOPClassUID = CT_IMAGE_STORAGE
                ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
                for keyword, value in filed.items():
                    setattr(ds, keyword, value)
                if identity_removed:
                    ds.PatientIdentityRemoved = "YES"
                    ds.DeidentificationMethod = "cvaa --anonymize: no input identifiers copied"
                ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, frame
                ds.Modality = "CT"
                ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
                ds.SeriesDescription = label.series_description
                ds.ImageComments = label.comments
                ds.DerivationDescription = _fit(label.comments, _ST)
                ds.Manufacturer, ds.ManufacturerModelName = "cvaa", label.model_name
                ds.SeriesDate = ds.ContentDate = now[0]
                ds.SeriesTime = ds.ContentTime = now[1]
                ds.SeriesNumber, ds.InstanceNumber = int(series_number), k + 1
                ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0],
                                                               *direction[:, 1])]
                position = origin + direction[:, 2] * k * sz
                ds.ImagePositionPatient = [_ds(v) for v in position]
                ds.SliceLocation = _ds(position @ np.cross(direction[:, 0], direction[:, 1]))
                ds.PixelSpacing = [_ds(sy), _ds(sx)]        # row spacing, column spacing
                ds.SliceThickness = ds.SpacingBetweenSlices = _ds(sz)
                ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
                ds.PixelRepresentation = 1
                ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
                ds.WindowCenter, ds.WindowWidth = "40", "400"
                ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
                name = tmp / f"CT{k + 1:05d}.dcm"
                pydicom.dcmwrite(str(name), ds, enforce_file_format=True)
                names.append(target / name.name)
        if target.exists():  # an empty directory (checked by check_output)
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [str(n) for n in names]


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text[:16]


# --------------------------------------------------------------------------- the whole path

@dataclass(frozen=True)
class Reconstruction:
    """What :func:`reconstruct_to_file` did.

    Attributes:
        volume: the CT in HU as written.
        normalized: ``(D, H, W)`` the model's output in [0, 1].
        xrays: ``(2, P, P)`` the model's input.
        written: output path(s): the volume file, or the DICOM slice files.
        seconds: wall time per stage (``prepare``, ``forward``, ``write``).
    """

    volume: Volume
    normalized: np.ndarray
    xrays: np.ndarray
    written: list[str]
    seconds: dict[str, float]


def reconstruct_to_file(generator: nn.Module, cfg: Config, xrays: np.ndarray, out: str, *,
                        dicom: bool = False, label: EstimateLabel | None = None,
                        identity: DicomIdentity | None = None, identity_removed: bool = False,
                        origin_mm: Sequence[float] | None = None,
                        source: str = "", normalized: np.ndarray | None = None
                        ) -> Reconstruction:
    """Forward pass -> HU volume with the training geometry -> NIfTI/MHA or DICOM series.

    With ``dicom``, ``label``, ``identity`` and ``identity_removed`` go to
    :func:`write_dicom_series`. ``normalized``: the ``(D, H, W)`` output of this
    generator for these X-rays when it was already computed (``cvaa.reliability.assess``'s
    estimate), so the forward pass is not run twice (``seconds["forward"]`` is then 0).
    """
    seconds: dict[str, Any] = {}
    start = time.perf_counter()
    if normalized is None:
        normalized = reconstruct(generator, xrays)
    seconds["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    volume = volume_from_prediction(normalized, cfg, origin_mm, source)
    if dicom:
        written = write_dicom_series(volume, out, label=label, identity=identity,
                                     identity_removed=identity_removed)
    else:
        written = [write_volume(volume, out)]
    seconds["write"] = time.perf_counter() - start
    return Reconstruction(volume, normalized, np.asarray(xrays), written, seconds)


__all__ = [
    "InvalidXrayError", "TYPICAL_PEAK_ATTENUATION", "DEFAULT_WINDOW_PCT", "read_xray",
    "DicomIdentity", "read_dicom_identity", "read_pair_identity", "default_xray_range", "normalize_xray", "fit_detector", "prepare_xrays", "xrays_from_ct",
    "reconstruct", "volume_from_prediction", "check_output", "write_volume",
    "EstimateLabel", "estimate_label", "write_dicom_series", "Reconstruction", "reconstruct_to_file",
]
