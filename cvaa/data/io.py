"""Read and write CT volumes with SimpleITK, from local paths and ``s3://bucket/key``.

Formats: NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``, ``.mhd``), NRRD (``.nrrd``,
``.nhdr``) and DICOM series directories. Every volume comes back as a :class:`Volume`: the
voxels as a ``float32`` array in HU, indexed ``(D, H, W)`` = SimpleITK's ``(k, j, i)``, plus
the geometry (spacing, origin, direction) in SimpleITK's physical (LPS) order ``(x, y, z)``.

Bad input raises :class:`InvalidVolumeError` (or a subclass) whose message starts with the
file's URI and says what is wrong. The checks, in order:

* the file or S3 key exists (:class:`VolumeNotFoundError`);
* a ``.gz`` file decompresses completely (truncated or corrupt gzip);
* SimpleITK can read it as an image (``not an image``);
* it is 3D and scalar (2D images, 4D series and vector images are refused);
* every axis has 16..2048 voxels (checked from the header, before the pixels are read);
* every voxel is finite;
* the intensities can be CT in Hounsfield units: the volume contains air, i.e. its 0.1 %
  quantile is at most -800 HU (an MR, PET or normalised volume has no voxel near -1000),
  and no voxel lies below -3100 HU (-3024 is the lowest padding scanners write);
* a DICOM series has no missing slices and a constant slice spacing.

S3 uses boto3's standard credential chain; ``AWS_ENDPOINT_URL`` points it at an
S3-compatible server (SeaweedFS, MinIO); transient errors are retried (standard mode).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import SimpleITK as sitk

MIN_AXIS_VOXELS = 16
MAX_AXIS_VOXELS = 2048
AIR_HU = -800.0          # the 0.1 % quantile of a CT must be at or below this
AIR_QUANTILE = 0.001
MIN_HU = -3100.0         # below the lowest padding value scanners write (-3024)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


class InvalidVolumeError(ValueError):
    """A CT input that cannot be used; the message names the file and the problem."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri}: {problem}")
        self.uri = str(uri)
        self.problem = problem


class VolumeNotFoundError(InvalidVolumeError, FileNotFoundError):
    """The file, directory or S3 key does not exist."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume and its physical geometry.

    Args:
        array: ``(D, H, W)`` float32 HU, SimpleITK index order ``(k, j, i)``.
        spacing_mm: voxel size along ``(i, j, k)`` = ``(W, H, D)``.
        origin_mm: physical position (LPS, mm) of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines, row-major as SimpleITK gives them; column ``n``
            is the physical direction of index axis ``n`` (``i``, ``j``, ``k``).
        source: the URI the volume came from (for error messages and manifests).
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str = "") -> "Volume":
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        return cls(array, tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()), source)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry holding other voxels (of the same shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} != volume shape {self.array.shape}")
        return Volume(array, self.spacing_mm, self.origin_mm, self.direction, self.source)


# --------------------------------------------------------------------------- URIs and S3

def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = str(uri)[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket in S3 URI")
    return bucket, key


_S3_CLIENTS: dict[tuple, Any] = {}
_S3_LOCK = threading.Lock()


def s3_client():
    """A boto3 S3 client: standard credential chain, ``AWS_ENDPOINT_URL`` honoured,
    transient errors retried with backoff (botocore's ``standard`` mode, 5 attempts).

    One client per process and endpoint/credentials, shared by threads (boto3 clients are
    thread-safe; making one costs tens of milliseconds, too much per case read).
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_PROFILE"))
    with _S3_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint,
                config=BotoConfig(retries={"max_attempts": 5, "mode": "standard"},
                                  connect_timeout=10, read_timeout=60,
                                  max_pool_connections=32,
                                  s3={"addressing_style": "path"}))
            _S3_CLIENTS[key] = client
        return client


def list_s3(uri: str) -> list[str]:
    """Every object key under an ``s3://bucket/prefix``, as full URIs."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    return out


@contextmanager
def local_copy(uri: str | os.PathLike) -> Iterator[Path]:
    """Yield a local path for ``uri``: the path itself, or a temporary download of an S3
    object (or of every object under an S3 prefix, for a DICOM series)."""
    if not is_s3(uri):
        yield Path(uri)
        return
    from botocore.exceptions import ClientError

    uri = str(uri)
    bucket, key = split_s3(uri)
    client = s3_client()
    tmp = Path(tempfile.mkdtemp(prefix="cvaa-s3-"))
    try:
        name = key.rstrip("/").rsplit("/", 1)[-1] or "object"
        target = tmp / name
        try:
            client.download_file(bucket, key, str(target))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("404", "NoSuchKey", "NotFound"):
                raise InvalidVolumeError(uri, f"S3 error {code}: {exc}") from exc
            # Not an object: maybe a "directory" (DICOM series) under this prefix.
            keys = list_s3(uri.rstrip("/") + "/")
            if not keys:
                raise VolumeNotFoundError(uri, "no such S3 key or prefix") from exc
            target.mkdir()
            prefix = key.rstrip("/") + "/"
            for full in keys:
                rel = split_s3(full)[1][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, split_s3(full)[1], str(dest))
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_file(path: str | os.PathLike, uri: str) -> None:
    bucket, key = split_s3(uri)
    s3_client().upload_file(str(path), bucket, key)


# --------------------------------------------------------------------------- reading

def read_ct(uri: str | os.PathLike, *, check_hu: bool = True) -> Volume:
    """Read a CT volume (file or DICOM series directory; local or ``s3://``) and check it.

    Args:
        uri: path or ``s3://bucket/key``; a directory (or S3 prefix) is read as a DICOM
            series.
        check_hu: apply the Hounsfield-range rule (see the module docstring).

    Returns:
        The :class:`Volume`, voxels in HU as ``float32``.

    Raises:
        InvalidVolumeError: with the URI and the problem in its message.

    Example:
        >>> vol = read_ct("../shared/data/ct/abdomen_lumbar_3mm.nii.gz")
        >>> vol.array.shape, vol.spacing_mm
        ((112, 101, 122), (3.0, 3.0, 3.0))
    """
    uri = str(uri)
    with local_copy(uri) as path:
        if not path.exists():
            raise VolumeNotFoundError(uri, "no such file or directory")
        if path.is_dir():
            image = _read_dicom_series(path, uri)
        else:
            image = _read_file(path, uri)
    volume = Volume.from_sitk(image, source=uri)
    check_volume(volume, check_hu=check_hu)
    return volume


def check_volume(volume: Volume, *, check_hu: bool = True) -> None:
    """Voxel-level checks: finite values, and (optionally) a plausible HU range."""
    uri, a = volume.source, volume.array
    finite = np.isfinite(a)
    if not finite.all():
        raise InvalidVolumeError(uri, f"{int((~finite).sum())} non-finite voxel values "
                                      "(NaN or inf)")
    if not check_hu:
        return
    low = float(np.quantile(a, AIR_QUANTILE))
    if low > AIR_HU:
        raise InvalidVolumeError(
            uri, f"intensities cannot be CT in HU: no air (0.1% quantile {low:.1f} > "
                 f"{AIR_HU:.0f} HU; range {a.min():.1f}..{a.max():.1f}); an MR, PET or "
                 "normalised volume?")
    if a.min() < MIN_HU:
        raise InvalidVolumeError(
            uri, f"intensities cannot be CT in HU: minimum {a.min():.1f} < {MIN_HU:.0f} HU")


def _check_header(reader: sitk.ImageFileReader, uri: str) -> None:
    dim = reader.GetDimension()
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise InvalidVolumeError(uri, f"{reader.GetNumberOfComponents()}-component (vector "
                                      "or colour) image; a CT is scalar")
    _check_size(dim, size, uri)


def _check_size(dim: int, size: tuple[int, ...], uri: str) -> None:
    if dim == 4 and size[3] > 1:
        raise InvalidVolumeError(uri, f"4D image of size {size} (a time or multi-volume "
                                      "series); give one 3D volume")
    if dim == 2 or (dim == 3 and min(size) == 1):
        raise InvalidVolumeError(uri, f"2D image of size {size}; a CT is a 3D volume")
    if dim not in (3, 4):
        raise InvalidVolumeError(uri, f"{dim}D image; a CT is a 3D volume")
    for axis, n in enumerate(size[:3]):
        if n < MIN_AXIS_VOXELS or n > MAX_AXIS_VOXELS:
            raise InvalidVolumeError(
                uri, f"absurd size {tuple(size[:3])}: axis {axis} has {n} voxels "
                     f"(allowed {MIN_AXIS_VOXELS}..{MAX_AXIS_VOXELS})")


def _check_gzip(path: Path, uri: str) -> None:
    """SimpleITK may read a truncated gzip as zeros; decompress fully to be sure."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise InvalidVolumeError(uri, f"truncated or corrupt gzip ({exc})") from exc


def _read_file(path: Path, uri: str) -> sitk.Image:
    name = path.name.lower()
    if name.endswith(".gz"):
        _check_gzip(path, uri)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InvalidVolumeError(uri, "not an image SimpleITK can read "
                                      f"({_first_line(exc)})") from exc
    _check_header(reader, uri)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InvalidVolumeError(uri, f"cannot read the voxels ({_first_line(exc)})") from exc
    if image.GetDimension() == 4:  # a 4D file with one time point: take the volume
        image = image[:, :, :, 0]
    return image


# DICOM tags (group|element) that SimpleITK's reader exposes.
_IMAGE_POSITION = "0020|0032"
_IMAGE_ORIENTATION = "0020|0037"


def _read_dicom_series(path: Path, uri: str) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InvalidVolumeError(uri, "directory holds no DICOM series (and is not a "
                                      "volume file)")
    if len(series) > 1:
        counts = {s: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), s))
                  for s in series}
        raise InvalidVolumeError(uri, f"{len(series)} DICOM series in one directory "
                                      f"({counts}); give one series per directory")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
    _check_size(3, (MIN_AXIS_VOXELS, MIN_AXIS_VOXELS, len(files)), uri)  # before the headers
    _check_slice_positions(files, uri)
    return _read_slices(files, uri)


def _read_slices(files, uri: str) -> sitk.Image:
    """The slices ``files`` (local paths, in order) as one float32 image, size-checked."""
    _check_size(3, (MIN_AXIS_VOXELS, MIN_AXIS_VOXELS, len(files)), uri)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InvalidVolumeError(uri, f"cannot read the DICOM series "
                                      f"({_first_line(exc)})") from exc
    _check_size(3, image.GetSize(), uri)
    return image


def read_dicom_files(files: list[str] | tuple[str, ...], uri: str, *,
                     check_hu: bool = True) -> Volume:
    """Read one DICOM series given as its files in slice order (local or ``s3://``), as
    ``cvaa.data.dicom_index.select_series`` chose and checked them; ``uri`` names it in
    errors. The same checks as :func:`read_ct` apply to the volume.

    Example:
        >>> case = select_series(index, DicomConfig(), 2.0).cases[0]
        >>> read_dicom_files(case.files, case.series.uri).shape
        (36, 24, 24)
    """
    with _local_files(files) as paths:
        image = _read_slices(paths, uri)
    volume = Volume.from_sitk(image, source=uri)
    check_volume(volume, check_hu=check_hu)
    return volume


@contextmanager
def _local_files(uris: list[str] | tuple[str, ...]) -> Iterator[list[Path]]:
    """Local paths of ``uris``: themselves, or S3 objects downloaded to a temporary folder."""
    if not any(is_s3(u) for u in uris):
        yield [Path(u) for u in uris]
        return
    tmp = Path(tempfile.mkdtemp(prefix="cvaa-s3-"))
    try:
        client, paths = s3_client(), []
        for n, u in enumerate(uris):
            bucket, key = split_s3(u)
            paths.append(tmp / f"{n:06d}")
            client.download_file(bucket, key, str(paths[-1]))
        yield paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class S3Source:
    """Random access to one S3 object by ranged GETs (``size``, ``read(offset, n)``), for
    reading DICOM headers without the pixel data. The first read also learns the size."""

    def __init__(self, uri: str, first_bytes: int = 64 * 1024):
        from botocore.exceptions import ClientError

        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        try:
            response = s3_client().get_object(Bucket=self.bucket, Key=self.key,
                                              Range=f"bytes=0-{first_bytes - 1}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            self._head, self.size = b"", 0  # an empty object has no byte 0
            return
        self._head = response["Body"].read()
        self.size = int(response.get("ContentRange", "/").rsplit("/", 1)[-1] or
                        len(self._head))

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0:
            offset = max(0, self.size + offset)
        if offset + n <= len(self._head):
            return self._head[offset:offset + n]
        last = min(self.size, offset + n) - 1
        response = s3_client().get_object(Bucket=self.bucket, Key=self.key,
                                          Range=f"bytes={offset}-{last}")
        return response["Body"].read()

    def close(self) -> None:
        pass


def _check_slice_positions(files: tuple[str, ...] | list[str], uri: str) -> None:
    """Refuse a series with gaps (missing slices) or uneven slice spacing."""
    positions, normal = [], None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.LoadPrivateTagsOff()
        try:
            r.ReadImageInformation()
        except RuntimeError as exc:
            raise InvalidVolumeError(uri, f"{Path(f).name}: unreadable DICOM slice "
                                          f"({_first_line(exc)})") from exc
        if not (r.HasMetaDataKey(_IMAGE_POSITION) and r.HasMetaDataKey(_IMAGE_ORIENTATION)):
            raise InvalidVolumeError(uri, f"{Path(f).name}: DICOM slice without "
                                          "ImagePositionPatient/ImageOrientationPatient")
        if normal is None:
            o = np.array([float(v) for v in r.GetMetaData(_IMAGE_ORIENTATION).split("\\")])
            normal = np.cross(o[:3], o[3:])
        p = np.array([float(v) for v in r.GetMetaData(_IMAGE_POSITION).split("\\")])
        positions.append(float(p @ normal))
    problem = slice_spacing_problem(positions)
    if problem:
        raise InvalidVolumeError(uri, f"DICOM series: {problem[1]}")


def slice_spacing_problem(z_mm: Iterable[float]) -> tuple[str, str] | None:
    """``(kind, reason)`` when sorted slice positions have duplicates, gaps or uneven
    spacing, else None. ``kind`` is ``duplicate_positions``, ``gap`` or ``uneven_spacing``;
    slices are counted from 1 in position order.

    Example:
        >>> slice_spacing_problem([0, 2, 4, 8, 10])[1]
        'gap at slice 4: 1 missing slice(s) between positions 4.00 and 8.00 mm (spacing 2.00 mm)'
    """
    z = np.sort(np.asarray(list(z_mm), float))
    gaps = np.diff(z)
    if (gaps <= 1e-3).any():
        i = int(np.argmax(gaps <= 1e-3))
        return "duplicate_positions", f"duplicate slice position {z[i]:.2f} mm (slices " \
                                      f"{i + 1} and {i + 2})"
    if len(gaps) == 0:
        return None
    step = float(np.median(gaps))
    tol = max(0.01 * step, 1e-2)
    bad = [i for i, g in enumerate(gaps) if abs(g - step) > tol]
    if not bad:
        return None
    i, g = bad[0], gaps[bad[0]]
    more = f"; {len(bad) - 1} more" if len(bad) > 1 else ""
    ratio = g / step
    if abs(ratio - round(ratio)) <= 0.05 and round(ratio) >= 2:
        return "gap", (f"gap at slice {i + 2}: {round(ratio) - 1} missing slice(s) between "
                       f"positions {z[i]:.2f} and {z[i + 1]:.2f} mm (spacing {step:.2f} mm)"
                       f"{more}")
    return "uneven_spacing", (f"inconsistent slice spacing: {g:.2f} mm between positions "
                              f"{z[i]:.2f} and {z[i + 1]:.2f} mm, {step:.2f} mm "
                              f"elsewhere{more}")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file:line location; the last line says what went wrong.
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- writing

def write_ct(volume: Volume, uri: str | os.PathLike) -> str:
    """Write a volume with its geometry, as NIfTI / MHA / NRRD by suffix; local or S3.

    Returns the URI written. Voxels are written as float32 (HU or normalised, as given).
    """
    uri = str(uri)
    lower = uri.lower()
    if not lower.endswith(WRITE_SUFFIXES):
        raise ValueError(f"{uri}: unsupported output suffix; use one of {WRITE_SUFFIXES}")
    image = volume.to_sitk()
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="cvaa-s3-") as tmp:
            name = Path(split_s3(uri)[1]).name
            local = Path(tmp) / name
            sitk.WriteImage(image, str(local), useCompression=lower.endswith(".gz"))
            upload_file(local, uri)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, uri, useCompression=lower.endswith(".gz"))
    return uri


def find_volumes(root: str | os.PathLike) -> list[str]:
    """Every CT under ``root`` (local dir or ``s3://`` prefix): volume files by suffix, and
    directories holding DICOM files (each read as one series). Sorted URIs."""
    root = str(root)
    if is_s3(root):
        keys = list_s3(root.rstrip("/") + "/")
        files = [k for k in keys if k.lower().endswith(VOLUME_SUFFIXES)]
        dicom_dirs = sorted({k.rsplit("/", 1)[0] for k in keys
                             if _maybe_dicom_key(k)})
        return sorted(files) + dicom_dirs
    base = Path(root)
    if not base.is_dir():
        raise VolumeNotFoundError(root, "input directory does not exist")
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        dicom = False
        for name in sorted(filenames):
            low = name.lower()
            if low.endswith(VOLUME_SUFFIXES):
                out.append(str(Path(dirpath) / name))
            elif not dicom and _is_dicom_file(Path(dirpath) / name):
                dicom = True
        if dicom:
            out.append(str(Path(dirpath)))
    return sorted(out)


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128, whatever their name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _maybe_dicom_key(key: str) -> bool:
    # S3 has no cheap magic check: .dcm files, or names that are bare or UID-like
    # ("CT.1.2.840...", "1.3.12..."), as series exports commonly use.
    name = key.rsplit("/", 1)[-1]
    return name.lower().endswith(".dcm") or bool(re.fullmatch(r"([A-Za-z]{2}\.)?[0-9.]+", name))
