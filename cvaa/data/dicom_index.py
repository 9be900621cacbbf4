"""Find the CT series of a DICOM export from file headers, and choose the ones to prepare.

A hospital export (PACS, CD, research archive) mixes, per study, the axial CT series with
localizers, reformats, other kernels and phases, dose reports, secondary captures, MR and
SR objects, in any folder layout (one folder per series, per study, or one for everything;
DICOMDIR media; file names with or without ``.dcm``). This module turns a list of files into
cases in three pure steps, none of which reads pixel data:

1. :func:`read_header` reads one file's header with pydicom (``stop_before_pixels``, the
   tags in ``HEADER_TAGS`` only) into a small dict; a file that is not DICOM, is truncated
   or has no pixel data comes back with its ``problem`` instead. It never raises, so one
   bad file never stops an archive. (The Ray pipeline maps it over the files in parallel:
   ``cvaa.distributed.pipeline.index_dicom``.)
2. :class:`SeriesIndex` groups the headers by StudyInstanceUID -> SeriesInstanceUID, split
   further by orientation (and by AcquisitionNumber where one UID holds the same slice
   positions twice); per file it keeps only the path, slice position and size.
3. :func:`select_series` checks every series (CT, not a localizer, enough slices, one size,
   evenly spaced without gaps) and chooses by ``DicomConfig`` (axial, slices fine enough for
   the preprocessing grid, soft-tissue kernel, non-contrast, thinnest, longest coverage).
   Every series and file not used gets a typed reason (``kind``) and a sentence.

pydicom rather than GDCM (through SimpleITK): pydicom parses only the header bytes it is
given (a 64 KiB head of the file, or an S3 range read), can skip the pixel data and every
tag not asked for, and reports a truncated or foreign file as a Python exception per file;
GDCM's series scanner (``GetGDCMSeriesIDs``) opens whole directories, groups by its own
rule, and says nothing about the files it drops. SimpleITK still reads the chosen series'
voxels (``cvaa.data.io.read_dicom_files``), JPEG 2000 included.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cvaa.config import DicomConfig
from cvaa.data.io import slice_spacing_problem  # noqa: F401  (also this module's API)

# The header fields read (keywords); nothing else is parsed.
HEADER_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "Modality", "ImageType", "SeriesNumber", "SeriesDescription", "AcquisitionNumber",
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
    "NumberOfFrames", "ConvolutionKernel", "ContrastBolusAgent", "FrameOfReferenceUID",
)
# Bytes read first; a longer header (large private blocks) is read whole.
HEAD_BYTES = 64 * 1024
MEDIA_DIRECTORY_SOP = "1.2.840.10008.1.3.10"            # DICOMDIR
SECONDARY_CAPTURE_SOP = "1.2.840.10008.5.1.4.1.1.7"     # and its .1-.4 variants
LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"}
PROJECTION_TYPES = {"MIP", "MINIP", "PROJECTION IMAGE", "VOLUME_RENDER", "VR", "SSD"}
# Transfer syntaxes whose pixel data is native (a known byte count), all others encapsulated.
BIG_ENDIAN, DEFLATED = "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", BIG_ENDIAN}
NO_CONTRAST = {"", "NONE", "NO", "N", "0", "NO CONTRAST", "WITHOUT"}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


# --------------------------------------------------------------------------- one file

class FileSource:
    """Random access to one file's bytes: ``size`` and ``read(offset, n)``; local here,
    ``cvaa.data.io`` adds S3 (ranged GETs)."""

    def __init__(self, path: str):
        self.uri = path
        self._fh = open(path, "rb")
        self.size = os.fstat(self._fh.fileno()).st_size

    def read(self, offset: int, n: int) -> bytes:
        self._fh.seek(offset if offset >= 0 else max(0, self.size + offset))
        return self._fh.read(n)

    def close(self) -> None:
        self._fh.close()


def open_source(uri: str):
    """A :class:`FileSource`, or for ``s3://`` a ``cvaa.data.io.S3Source`` (ranged GETs)."""
    if uri.startswith("s3://"):
        from cvaa.data.io import S3Source  # boto3 only for an s3:// archive

        return S3Source(uri, HEAD_BYTES)
    return FileSource(uri)


def read_header(uri: str, open_source: Callable[[str], Any] = open_source) -> dict[str, Any]:
    """The header fields of one file as a dict of builtins; never raises.

    Args:
        uri: the file (local path; ``open_source`` decides how it is opened).
        open_source: makes an object with ``size``, ``read(offset, n)`` and ``close()``.

    Returns:
        ``{"uri", "size", "problem": "", ...HEADER_TAGS-derived fields}``, or for a file
        that cannot be used ``{"uri", "size", "problem": <kind>, "reason": <sentence>}``
        with kind ``unreadable``, ``not_dicom``, ``dicomdir``, ``corrupt``, ``truncated``,
        or ``no_pixels`` (a CT image object without an image).

    Example:
        >>> read_header("export/PAT1/ST1/SE2/IM0007")["modality"]
        'CT'
    """
    try:
        source = open_source(uri)
    except Exception as exc:  # OSError locally, botocore errors on S3
        return _problem(uri, 0, "unreadable", f"cannot open ({type(exc).__name__}: {exc})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values per file
            return _read_header(uri, source)
    except Exception as exc:  # a read error mid-file: this file only, never the archive
        return _problem(uri, source.size, "unreadable",
                        f"cannot read ({type(exc).__name__}: {exc})")
    finally:
        source.close()


def _problem(uri: str, size: int, kind: str, reason: str) -> dict[str, Any]:
    return {"uri": uri, "size": size, "problem": kind, "reason": reason}


def _read_header(uri: str, source) -> dict[str, Any]:
    size = source.size
    head = source.read(0, min(size, HEAD_BYTES))
    if len(head) < 132 or head[128:132] != b"DICM":
        return _problem(uri, size, "not_dicom", "not DICOM (no 'DICM' marker at byte 128)")
    ds, end, error = _parse(head)
    if len(head) < size and end + 12 > len(head):  # the header runs past the head
        head = source.read(0, size)
        ds, end, error = _parse(head)
    if ds is None:
        cut = isinstance(error, EOFError) or "end" in str(error).lower()
        return _problem(uri, size, "truncated" if cut else "corrupt",
                        f"{'truncated' if cut else 'corrupt'} DICOM header "
                        f"({type(error).__name__}: {error})")
    meta = getattr(ds, "file_meta", None)
    v = _values(ds)
    sop_class = _text(v, "SOPClassUID") or _meta(meta, "MediaStorageSOPClassUID")
    if sop_class == MEDIA_DIRECTORY_SOP:
        return _problem(uri, size, "dicomdir", "DICOMDIR (a media index; the files it lists "
                                               "are read on their own)")
    image_type = tuple(t.upper() for t in v.get("ImageType", ()))
    header = {
        "uri": uri, "size": size, "problem": "",
        "sop_class": sop_class,
        "sop_uid": _text(v, "SOPInstanceUID") or _meta(meta, "MediaStorageSOPInstanceUID"),
        "study_uid": _text(v, "StudyInstanceUID"),
        "series_uid": _text(v, "SeriesInstanceUID"),
        "patient_id": _text(v, "PatientID"),
        "modality": _text(v, "Modality").upper(),
        "image_type": list(image_type),
        "series_number": _number(v, "SeriesNumber"),
        "series_description": _text(v, "SeriesDescription"),
        "acquisition": _number(v, "AcquisitionNumber"),
        "instance": _number(v, "InstanceNumber"),
        "position": _floats(v, "ImagePositionPatient", 3),
        "orientation": _floats(v, "ImageOrientationPatient", 6),
        "pixel_spacing": _floats(v, "PixelSpacing", 2),
        "slice_thickness": _number(v, "SliceThickness", float),
        "rows": _number(v, "Rows"),
        "columns": _number(v, "Columns"),
        "frames": _number(v, "NumberOfFrames") or 1,
        "kernel": _text(v, "ConvolutionKernel"),
        "contrast": _text(v, "ContrastBolusAgent"),
        "frame_of_reference": _text(v, "FrameOfReferenceUID"),
    }
    if end >= size and not (header["modality"] and header["series_uid"]):
        return _problem(uri, size, "truncated", f"truncated: the header ends at byte {size} "
                                                "before Modality / SeriesInstanceUID")
    if not header["modality"]:  # no DICOM object goes without one: foreign or damaged bytes
        return _problem(uri, size, "corrupt", "corrupt DICOM header: no Modality")
    problem = _pixel_problem(v, meta, head, end, size, source)
    if problem and header["modality"] == "CT" and not sop_class.startswith(
            SECONDARY_CAPTURE_SOP):
        return _problem(uri, size, *problem)
    return header


def _parse(head: bytes):
    """``(dataset, offset where the parse stopped, None)`` or ``(None, len, exception)``."""
    import pydicom

    buf = io.BytesIO(head)
    try:
        if not _TAGS:
            _TAGS.update(_tag_table())
        ds = pydicom.dcmread(buf, stop_before_pixels=True,
                             specific_tags=[tag for tag, _ in _TAGS.values()])
        return ds, buf.tell(), None
    except Exception as exc:  # pydicom raises several types for cut or foreign bytes
        return None, len(head), exc


def _pixel_problem(v: dict[str, list], meta, head: bytes, end: int, size: int,
                   source) -> tuple[str, str] | None:
    """``(kind, reason)`` when the file holds no complete image, else None. ``end`` is where
    the header parse stopped: the pixel data element, if there is one."""
    rows, cols = _number(v, "Rows"), _number(v, "Columns")
    if not rows or not cols:
        return "no_pixels", "no pixel data (no Rows/Columns: no image pixel module)"
    syntax = _meta(meta, "TransferSyntaxUID")
    if syntax in (BIG_ENDIAN, DEFLATED):  # rare: bytes after the header not checked here
        return None
    if end + 8 > size or head[end:end + 4] != _PIXEL_DATA_TAG:
        return "no_pixels", "no pixel data (the file ends without a PixelData element)"
    explicit = head[end + 4:end + 6] in (b"OB", b"OW")
    length = int.from_bytes(head[end + 8:end + 12] if explicit else head[end + 4:end + 8],
                            "little")
    start = end + (12 if explicit else 8)
    if length == 0xFFFFFFFF:  # encapsulated (compressed): the sequence must be closed
        if source.read(-8, 8) != _SEQUENCE_END:
            return "truncated", (f"truncated: the compressed pixel data "
                                 f"({syntax or 'unknown syntax'}) is not closed at the end "
                                 f"of the file ({size} bytes)")
        return None
    bits = _number(v, "BitsAllocated") or 16
    need = rows * cols * (_number(v, "SamplesPerPixel") or 1) * (bits // 8) \
        * (_number(v, "NumberOfFrames") or 1)
    if syntax in NATIVE_SYNTAXES and length < need:
        return "truncated", (f"truncated: PixelData holds {length} bytes, {rows}x{cols} "
                             f"pixels of {bits} bits need {need}")
    if start + length > size:
        return "truncated", (f"truncated: PixelData needs bytes up to {start + length}, the "
                             f"file has {size}")
    return None


def _tag_table() -> dict[str, tuple[int, str]]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    return {kw: (tag_for_keyword(kw), dictionary_VR(tag_for_keyword(kw))) for kw in HEADER_TAGS}


_TAGS: dict[str, tuple[int, str]] = {}


def _values(ds) -> dict[str, list]:
    """The ``HEADER_TAGS`` of ``ds`` as lists of strings (ints for US), decoded from the raw
    elements (``Dataset.get_item``): the dozen value types read here need none of
    pydicom's per-element conversion machinery, which took most of the time per file.
    Text is decoded as Latin-1 (ISO_IR 100, the common character set; it never fails)."""
    if not _TAGS:
        _TAGS.update(_tag_table())
    out: dict[str, list] = {}
    for keyword, (tag, vr) in _TAGS.items():
        try:
            elem = ds.get_item(tag)
        except Exception:  # a malformed element reads as absent
            continue
        if elem is None or elem.value is None:
            continue
        value = elem.value
        if isinstance(value, (bytes, bytearray)):
            if vr == "US":
                order = "<" if getattr(elem, "is_little_endian", True) else ">"
                out[keyword] = list(struct.unpack(f"{order}{len(value) // 2}H",
                                                  value[:len(value) // 2 * 2]))
            else:
                text = value.decode("latin-1").strip("\0 ")
                out[keyword] = [t.strip("\0 ") for t in text.split("\\")] if text else []
        elif isinstance(value, (str, int, float)):
            out[keyword] = [value if isinstance(value, int) else str(value)]
        else:
            out[keyword] = [str(v) for v in value]
    return out


def _text(v: dict[str, list], keyword: str) -> str:
    return "\\".join(str(x) for x in v.get(keyword, ())).strip()


def _meta(meta, keyword: str) -> str:
    try:
        return str(meta.get(keyword) or "").strip() if meta is not None else ""
    except Exception:  # a malformed value reads as absent
        return ""


def _number(v: dict[str, list], keyword: str, kind: type = int):
    try:
        return kind(float(v[keyword][0])) if kind is int else kind(v[keyword][0])
    except (KeyError, IndexError, ValueError, TypeError):
        return None


def _floats(v: dict[str, list], keyword: str, n: int) -> list[float] | None:
    try:
        values = [float(x) for x in v.get(keyword, ())]
    except ValueError:
        return None
    return values if len(values) == n and all(np.isfinite(values)) else None


# --------------------------------------------------------------------------- the index

def orientation_name(orientation: list[float] | tuple[float, ...]) -> str:
    """``axial``, ``coronal``, ``sagittal`` or ``oblique`` from ImageOrientationPatient:
    the patient axis the slice normal is within ~25 degrees of (cos 25 = 0.9)."""
    normal = slice_normal(orientation)
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def slice_normal(orientation: list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """Row direction x column direction of ImageOrientationPatient (plain floats: this runs
    once per file, where numpy's per-call overhead would dominate)."""
    r0, r1, r2, c0, c1, c2 = orientation
    return (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)


@dataclass
class Series:
    """One group of image files: a series (or one orientation / acquisition of it).

    The fields shared by its files come from the first file; per file only
    ``(uri, z_mm, acquisition, rows, columns)`` is kept (``z_mm``: position along the
    slice normal).
    """

    study_key: str
    series_key: str
    part: str
    patient_id: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    series_number: int | None
    description: str
    kernel: str
    contrast: str
    orientation: tuple[float, ...] | None
    files: list[tuple[str, float | None, int | None, int | None, int | None]] = field(
        default_factory=list)
    sop_uids: dict[str, str] = field(default_factory=dict, repr=False)  # SOP UID -> file

    @property
    def name(self) -> str:
        """How reasons name the series: ``series 3 'Abdomen 1.0 B30f'``."""
        number = "?" if self.series_number is None else self.series_number
        text = f"series {number}"
        if self.description:
            text += f" '{self.description}'"
        return text + (f" ({self.part})" if self.part else "")

    @property
    def folders(self) -> list[str]:
        return sorted({u.rsplit("/", 1)[0] if "/" in u else "." for u, *_ in self.files})

    @property
    def uri(self) -> str:
        """``<folder>#<SeriesInstanceUID>[/<part>]``: a case's source in the manifest."""
        parts = [f.split("/") for f in self.folders]   # local paths and s3:// alike
        common = []
        for names in zip(*parts):
            if len(set(names)) > 1:
                break
            common.append(names[0])
        return f"{'/'.join(common)}#{self.series_key}" + (f"/{self.part}" if self.part else "")


# Header fields that define a group beyond its UIDs.
def _group_key(h: dict[str, Any]) -> tuple[str, str, str, bool]:
    folder = h["uri"].rsplit("/", 1)[0]
    study = h["study_uid"] or f"folder {folder}"
    # Anonymisers sometimes blank the UIDs: then the folder, series number, description
    # and frame of reference stand in for them.
    series = h["series_uid"] or (f"{folder}|{h['series_number']}|{h['series_description']}"
                                 f"|{h['frame_of_reference']}")
    o = h["orientation"]
    orient = "none" if o is None else orientation_name(o) + ":" + ",".join(
        f"{v:.2f}" for v in o)
    localizer = bool(LOCALIZER_TYPES & set(h["image_type"]))
    return study, series, orient, localizer


class SeriesIndex:
    """Headers grouped into :class:`Series` as they arrive (in any order), plus the files
    that could not be used. Memory: one small tuple per image file, shared fields once per
    series; nothing else grows with the number of files.

    Example:
        >>> index = SeriesIndex()
        >>> for h in map(read_header, files): index.add(h)
        >>> selection = select_series(index, DicomConfig(), grid_spacing_mm=2.0)
    """

    def __init__(self):
        self.groups: dict[tuple[str, str, str, bool], Series] = {}
        self.bad_files: list[dict[str, Any]] = []
        self.files = 0

    def add(self, h: dict[str, Any]) -> None:
        self.files += 1
        if h["problem"]:
            self.bad_files.append({"level": "file", "uri": h["uri"], "kind": h["problem"],
                                   "reason": h["reason"]})
            return
        key = _group_key(h)
        series = self.groups.get(key)
        if series is None:
            series = self.groups[key] = Series(
                study_key=key[0], series_key=h["series_uid"] or _short_hash(key[1]),
                part="", patient_id=h["patient_id"] or f"study {key[0]}",
                modality=h["modality"], sop_class=h["sop_class"],
                image_type=tuple(h["image_type"]), series_number=h["series_number"],
                description=h["series_description"], kernel=h["kernel"],
                contrast=h["contrast"],
                orientation=tuple(h["orientation"]) if h["orientation"] else None)
        first = series.sop_uids.get(h["sop_uid"]) if h["sop_uid"] else None
        if first is not None:  # the same image exported twice (two folders, two names):
            # keep the first path in sorted order, whatever order the headers came in
            keep, drop = sorted((first, h["uri"]))
            self.bad_files.append({"level": "file", "uri": drop, "kind": "duplicate",
                                   "reason": f"the same image (SOPInstanceUID) as {keep}"})
            if keep == first:
                return
            series.files = [f for f in series.files if f[0] != first]
        if h["sop_uid"]:
            series.sop_uids[h["sop_uid"]] = h["uri"]
        z = None
        if h["position"] is not None and series.orientation is not None:
            n, p = slice_normal(series.orientation), h["position"]
            z = p[0] * n[0] + p[1] * n[1] + p[2] * n[2]
        series.files.append((h["uri"], z, h["acquisition"], h["rows"], h["columns"]))

    def series(self) -> list[Series]:
        """Every group, each series' orientations / localizer split off as parts."""
        by_uid: dict[tuple[str, str], list[Series]] = {}
        for key, s in self.groups.items():
            by_uid.setdefault(key[:2], []).append(s)
        out = []
        for parts in by_uid.values():
            if len(parts) > 1:  # one UID, several orientations: name the parts
                seen: dict[str, int] = {}
                for s in parts:
                    name = ("localizer" if LOCALIZER_TYPES & set(s.image_type) else
                            orientation_name(s.orientation) if s.orientation else
                            "no orientation")
                    seen[name] = seen.get(name, 0) + 1
                    s.part = name if seen[name] == 1 else f"{name}-{seen[name]}"
            for s in parts:
                out.extend(_split_acquisitions(s))
        return sorted(out, key=lambda s: (s.study_key, s.series_number or 0, s.series_key,
                                          s.part))


def _short_hash(text: str) -> str:
    import hashlib

    return "nouid-" + hashlib.sha1(text.encode()).hexdigest()[:12]


def _split_acquisitions(s: Series) -> list[Series]:
    """One series whose slice positions repeat, once per AcquisitionNumber (phases stored
    in one series), as one part per acquisition; any other series unchanged."""
    z = [f[1] for f in s.files if f[1] is not None]
    if len(set(np.round(z, 2))) == len(z):
        return [s]
    acquisitions = sorted({f[2] for f in s.files}, key=lambda a: (a is None, a or 0))
    if len(acquisitions) < 2:
        return [s]
    parts = []
    for acq in acquisitions:
        files = [f for f in s.files if f[2] == acq]
        zs = [f[1] for f in files if f[1] is not None]
        if len(set(np.round(zs, 2))) != len(zs):  # acquisitions do not explain the repeats
            return [s]
        part = Series(**{**s.__dict__, "files": files, "sop_uids": {}})
        part.part = "/".join(p for p in (s.part, f"acquisition {acq}") if p)
        parts.append(part)
    return parts


# --------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class Candidate:
    """A series that qualifies, with what the choice looks at."""

    series: Series
    files: tuple[str, ...]          # in slice-position order
    spacing_mm: float
    coverage_mm: float
    sharp: bool
    contrast: bool


@dataclass
class Selection:
    """What :func:`select_series` decided: ``cases`` (qualifying series chosen, each with
    ``note``s such as a split across folders) and ``not_used`` (every series and file
    left out, each ``{"level", "kind", "reason", ...}``)."""

    cases: list[Candidate]
    not_used: list[dict[str, Any]]
    studies: int
    series: int
    files: int

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for item in self.not_used:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        return {"files": self.files, "studies": self.studies, "series": self.series,
                "cases": len(self.cases), "not_used": dict(sorted(kinds.items()))}


def disqualify(s: Series, cfg: DicomConfig) -> tuple[str, str] | Candidate:
    """The first reason ``s`` cannot be a case, ``(kind, reason)``, or its
    :class:`Candidate`."""
    types = set(s.image_type)
    if s.modality != "CT":
        return "not_ct", f"not CT: {s.modality or 'no Modality'}"
    if types & LOCALIZER_TYPES:
        return "localizer", f"localizer ({'/'.join(s.image_type)})"
    if s.sop_class.startswith(SECONDARY_CAPTURE_SOP):
        return "secondary_capture", "secondary capture (a screenshot or report, not slices)"
    if types & PROJECTION_TYPES:
        return "projection", f"projection image ({'/'.join(s.image_type)})"
    n = len(s.files)
    if n == 1:
        return "single_slice", "single slice"
    if s.orientation is None or any(f[1] is None for f in s.files):
        return "no_position", "slices without ImagePositionPatient/ImageOrientationPatient"
    sizes: dict[tuple, int] = {}
    for f in s.files:
        sizes[(f[3], f[4])] = sizes.get((f[3], f[4]), 0) + 1
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({k} files)" for (r, c), k in
                           sorted(sizes.items(), key=lambda kv: -kv[1]))
        return "mixed_sizes", f"mixed image sizes in one series: {listed}"
    if n < cfg.min_slices:
        return "too_few_slices", f"{n} slices, fewer than dicom.min_slices={cfg.min_slices}"
    orientation = orientation_name(s.orientation)
    if cfg.orientation == "axial" and orientation != "axial":
        return "not_axial", f"not axial: {orientation}"
    ordered = sorted(s.files, key=lambda f: f[1])
    z = [f[1] for f in ordered]
    problem = slice_spacing_problem(z)
    if problem:
        return problem
    spacing = float(np.median(np.diff(z)))
    return Candidate(s, tuple(f[0] for f in ordered), spacing, z[-1] - z[0],
                     bool(re.search(cfg.sharp_kernel_pattern, s.kernel.split("\\")[0], re.I))
                     if s.kernel else False,
                     s.contrast.strip().upper() not in NO_CONTRAST)


def _rank(c: Candidate, cfg: DicomConfig, max_spacing: float) -> tuple:
    """Sort key of a candidate, best first: slices fine enough for the grid, preferred
    kernel, preferred contrast, thinnest, longest coverage, then lowest series number."""
    kernel = {"soft": c.sharp, "sharp": not c.sharp, "any": False}[cfg.prefer_kernel]
    contrast = {"without": c.contrast, "with": not c.contrast, "any": False}[
        cfg.prefer_contrast]
    return (c.spacing_mm > max_spacing + 1e-3, kernel, contrast, round(c.spacing_mm, 3),
            -round(c.coverage_mm, 1), c.series.series_number or 0, c.series.series_key,
            c.series.part)


def _why_not(c: Candidate, best: Candidate, cfg: DicomConfig, max_spacing: float) -> str:
    """The first preference on which ``c`` loses to ``best``, as a sentence."""
    a, b = _rank(c, cfg, max_spacing), _rank(best, cfg, max_spacing)
    other = best.series.name
    if a[0] != b[0]:
        return (f"not chosen: slices {c.spacing_mm:.2f} mm apart, coarser than the "
                f"{max_spacing:g} mm grid; {other} has {best.spacing_mm:.2f} mm")
    if a[1] != b[1]:
        mine = "sharp" if c.sharp else "soft-tissue"
        theirs = "sharp" if best.sharp else "soft-tissue"
        return (f"not chosen: {mine} kernel {c.series.kernel or '?'}; {other} has "
                f"{theirs} kernel {best.series.kernel or '?'}")
    if a[2] != b[2]:
        mine = f"with contrast ({c.series.contrast})" if c.contrast else "without contrast"
        return f"not chosen: {mine}; {other} is " + (
            f"with contrast ({best.series.contrast})" if best.contrast else
            "without contrast")
    if a[3] != b[3]:
        return (f"not chosen: thicker slices than {other} ({c.spacing_mm:.2f} mm vs "
                f"{best.spacing_mm:.2f} mm)")
    if a[4] != b[4]:
        return (f"not chosen: shorter coverage than {other} ({c.coverage_mm:.1f} mm vs "
                f"{best.coverage_mm:.1f} mm)")
    return f"not chosen: ranks equal to {other}, which comes first by series number / UID"


def select_series(index: SeriesIndex, cfg: DicomConfig, grid_spacing_mm: float
                  ) -> Selection:
    """Check every series of ``index`` and choose the cases (see :class:`DicomConfig`).

    Args:
        index: the grouped headers.
        cfg: the rule (``keep``, ``orientation``, preferences).
        grid_spacing_mm: the preprocessing grid (``preprocess.spacing_mm``); slices at most
            ``cfg.max_slice_spacing_mm`` (or this, when that is 0) apart are preferred.

    Returns:
        The :class:`Selection`; every series and file of ``index`` is either a case or in
        ``not_used`` with its reason.
    """
    max_spacing = cfg.max_slice_spacing_mm or grid_spacing_mm
    by_study: dict[str, list[Series]] = {}
    all_series = index.series()
    for s in all_series:
        by_study.setdefault(s.study_key, []).append(s)
    cases: list[Candidate] = []
    not_used = list(index.bad_files)
    for study, series in sorted(by_study.items()):
        candidates = []
        for s in series:
            verdict = disqualify(s, cfg)
            if isinstance(verdict, Candidate):
                candidates.append(verdict)
            else:
                not_used.append(_series_entry(s, *verdict))
        candidates.sort(key=lambda c: _rank(c, cfg, max_spacing))
        if cfg.keep == "all":
            cases.extend(candidates)
            continue
        if candidates:
            cases.append(candidates[0])
        for c in candidates[1:]:
            not_used.append(_series_entry(c.series, "not_chosen",
                                          _why_not(c, candidates[0], cfg, max_spacing)))
        if not candidates:
            not_used.append({"level": "study", "study": study, "kind": "no_ct_series",
                             "reason": f"no qualifying CT series among {len(series)} "
                                       "series (each listed with its reason)"})
    return Selection(cases, not_used, len(by_study), len(all_series), index.files)


def _series_entry(s: Series, kind: str, reason: str) -> dict[str, Any]:
    folders = s.folders
    return {"level": "series", "kind": kind, "reason": reason, "series": s.name,
            "uri": s.uri, "study": s.study_key, "files": len(s.files),
            "folders": folders[:5] + ([f"... {len(folders) - 5} more"] if len(folders) > 5
                                      else [])}


def index_headers(headers: Iterable[dict[str, Any]]) -> SeriesIndex:
    """A :class:`SeriesIndex` of ``headers`` (from :func:`read_header`)."""
    index = SeriesIndex()
    for h in headers:
        index.add(h)
    return index


def read_headers(uris: Iterable[str]) -> Iterator[dict[str, Any]]:
    """:func:`read_header` of each local file, in this process."""
    for uri in uris:
        yield read_header(uri)


__all__ = ["HEADER_TAGS", "FileSource", "open_source", "read_header", "orientation_name", "Series",
           "SeriesIndex", "slice_spacing_problem", "Candidate", "Selection", "disqualify",
           "select_series", "index_headers", "read_headers"]
