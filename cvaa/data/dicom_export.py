"""Write volumes as a DICOM export, as a PACS or CD would: CT slices with their geometry
and the tags series selection looks at, plus the other objects a study folder holds
(localizers, MR, secondary captures, structured reports), in nested, flat or DICOMDIR
layouts. For tests, benchmarks and demos built from phantoms (``cvaa.data.phantom``);
nothing here reads.

Example:
    >>> vol = generate_phantom(0, shape=(40, 24, 24)).volume
    >>> study = StudyTags("PAT1", uid("study", 1))
    >>> ds = slice_datasets(vol, study, SeriesTags(uid("series", 1), 2, "Abdomen 1.0 B30f"))
    >>> write_export(ds, "export", layout="nested")
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cvaa.data.io import Volume

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# The planes a series can be cut in, from a volume in the canonical (D, H, W) frame:
# (array axis the slices step along, index axes of a slice's rows and columns).
PLANES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def uid(*parts: object) -> str:
    """A valid, reproducible DICOM UID from ``parts``: ``2.25.`` and a 120-bit hash (the
    UUID-derived root of PS3.5 B.2, here from a hash so that tests can name it again)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()
    return f"2.25.{int(digest[:30], 16)}"


@dataclass(frozen=True)
class StudyTags:
    """Patient- and study-level tags shared by the series of one study."""

    patient_id: str
    study_uid: str
    study_date: str = "20240101"


@dataclass(frozen=True)
class SeriesTags:
    """Series-level tags (what selection reads).

    Args:
        image_type: ImageType values, e.g. ``("ORIGINAL", "PRIMARY", "LOCALIZER")``.
        kernel: ConvolutionKernel (``B30f`` soft tissue, ``B70f`` bone).
        contrast: ContrastBolusAgent (``""`` none tagged).
        acquisition: AcquisitionNumber of every slice.
    """

    series_uid: str
    number: int
    description: str = ""
    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    kernel: str = "B30f"
    contrast: str = ""
    acquisition: int = 1
    sop_class: str = CT_IMAGE


def _dataset(study: StudyTags, series: SeriesTags, sop_uid: str, sop_class: str):
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientID, ds.PatientName = study.patient_id, study.patient_id
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study.study_uid, study.study_date, "1200"
    ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "1", "", "phantom study"
    ds.SeriesInstanceUID, ds.SeriesNumber = series.series_uid, series.number
    ds.SeriesDescription, ds.Modality = series.description, series.modality
    return ds


def slice_datasets(volume: Volume, study: StudyTags, series: SeriesTags, *,
                   plane: Literal["axial", "coronal", "sagittal"] = "axial",
                   every: int = 1) -> list:
    """One pydicom dataset per slice of ``volume`` cut in ``plane`` (every ``every``-th),
    with ImagePositionPatient / ImageOrientationPatient / PixelSpacing from its geometry
    and int16 HU pixels (RescaleSlope 1, intercept 0)."""
    step_axis, row_axis, col_axis = PLANES[plane]
    direction = np.array(volume.direction).reshape(3, 3)
    spacing_dhw = np.array(volume.spacing_mm)[::-1]           # (D, H, W) order
    axis_dir = [direction[:, 2], direction[:, 1], direction[:, 0]]  # of array axes D, H, W
    row_dir, col_dir = axis_dir[col_axis], axis_dir[row_axis]  # along a row: columns
    out = []
    for n, k in enumerate(range(0, volume.shape[step_axis], every)):
        pixels = np.take(volume.array, k, axis=step_axis)      # (rows, cols)
        sop = uid(series.series_uid, plane, k)
        ds = _dataset(study, series, sop, series.sop_class)
        position = np.array(volume.origin_mm) + axis_dir[step_axis] * spacing_dhw[
            step_axis] * k
        ds.ImageType = list(series.image_type)
        ds.FrameOfReferenceUID = uid(study.study_uid, "frame")
        ds.AcquisitionNumber, ds.InstanceNumber = series.acquisition, n + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing_dhw[row_axis]), float(spacing_dhw[col_axis])]
        ds.SliceThickness = float(spacing_dhw[step_axis] * every)
        ds.ConvolutionKernel = series.kernel
        if series.contrast:
            ds.ContrastBolusAgent = series.contrast
        _set_pixels(ds, pixels)
        out.append(ds)
    return out


def _set_pixels(ds, pixels: np.ndarray) -> None:
    values = np.clip(np.round(pixels), -32768, 32767).astype("<i2")
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.PixelData = values.tobytes()


def localizer_dataset(volume: Volume, study: StudyTags, series: SeriesTags):
    """A frontal localizer (scout): the volume's mean along H as one coronal image."""
    ds = slice_datasets(volume, study, series, plane="coronal")[volume.shape[1] // 2]
    _set_pixels(ds, volume.array.mean(axis=1))
    return ds


def report_dataset(study: StudyTags, series: SeriesTags, text: str = "dose report"):
    """A structured report (SR) object: no pixel data."""
    from pydicom.dataset import Dataset

    ds = _dataset(study, series, uid(series.series_uid, "sr"), BASIC_TEXT_SR)
    ds.InstanceNumber, ds.ContentDate, ds.ContentTime = 1, study.study_date, "1200"
    ds.CompletionFlag, ds.VerificationFlag, ds.ValueType = "COMPLETE", "UNVERIFIED", "CONTAINER"
    item = Dataset()
    item.TextValue, item.ValueType, item.RelationshipType = text, "TEXT", "CONTAINS"
    ds.ContentSequence = [item]
    concept = Dataset()  # the report's title, (113701, DCM) "X-Ray Radiation Dose Report"
    concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
    concept.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [concept]
    return ds


def write_export(datasets: list, root: str | os.PathLike, *,
                 layout: Literal["nested", "flat", "dicomdir"] = "nested",
                 suffix: str = "") -> list[str]:
    """Write ``datasets`` under ``root``; returns the files written (DICOMDIR included).

    Layouts: ``nested`` ``<PatientID>/<study>/<SeriesNumber>/IM<n><suffix>``; ``flat`` one
    folder, files named by SOPInstanceUID; ``dicomdir`` a DICOM File-set (pydicom.fileset:
    ``DICOMDIR`` plus ``PT000000/ST000000/SE000000/IM000000``, names without extension).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if layout == "dicomdir":
        from pydicom.fileset import FileSet

        fs = FileSet()
        for ds in datasets:
            fs.add(ds)
        fs.write(root)
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    written = []
    for n, ds in enumerate(datasets):
        if layout == "flat":
            path = root / f"{ds.SOPInstanceUID}{suffix}"
        elif layout == "nested":
            path = (root / ds.PatientID / ds.StudyInstanceUID[-8:] / f"{ds.SeriesNumber}"
                    / f"IM{n:05d}{suffix}")
        else:
            raise ValueError(f"layout must be nested, flat or dicomdir, got {layout!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written.append(str(path))
    return written


__all__ = ["CT_IMAGE", "MR_IMAGE", "SECONDARY_CAPTURE", "BASIC_TEXT_SR", "uid", "StudyTags",
           "SeriesTags", "slice_datasets", "localizer_dataset", "report_dataset",
           "write_export"]
