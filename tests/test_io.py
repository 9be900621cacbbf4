import gzip
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cvaa.data.io import (InvalidVolumeError, Volume, VolumeNotFoundError, find_volumes,
                          read_ct, write_ct)


def _ct_like(shape=(24, 20, 18), seed=0) -> np.ndarray:
    """A small array with air, soft tissue and bone, like a CT in HU."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0, np.float32)
    a[4:-4, 3:-3, 3:-3] = rng.normal(40, 10, (shape[0] - 8, shape[1] - 6, shape[2] - 6))
    a[8:12, 8:12, 6:10] = 1200
    return a


def _volume(array=None) -> Volume:
    array = _ct_like() if array is None else array
    return Volume(array.astype(np.float32), (0.8, 1.1, 2.5), (-12.5, 30.0, 100.25),
                  (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0))


# --------------------------------------------------------------------------- real data

def test_real_ct_files_read(real_ct_paths):
    vol = read_ct(real_ct_paths["abdomen"])
    assert vol.shape == (112, 101, 122)
    assert vol.spacing_mm == (3.0, 3.0, 3.0)
    assert vol.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert vol.array.dtype == np.float32
    assert vol.array.min() == -1207 and vol.array.max() == 3382
    for key in ("aorta", "pulmonary"):
        assert read_ct(real_ct_paths[key]).spacing_mm == (1.5, 1.5, 1.5)


def test_dicom_series_reads_to_size_and_spacing(real_ct_paths):
    vol = read_ct(real_ct_paths["dicom"])
    assert vol.shape == (20, 512, 512)
    assert vol.spacing_mm == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert vol.array.min() == -1024 and vol.array.max() == 1839  # rescaled to HU


def test_find_volumes_lists_files_and_dicom_dirs(shared_data):
    found = find_volumes(shared_data)
    names = {p.split("/")[-1] for p in found}
    assert {"abdomen_lumbar_3mm.nii.gz", "dicom_series", "abdomen_mr.nii.gz"} <= names
    assert len(found) == 5


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_read_round_trip(tmp_path, suffix):
    vol = _volume()
    path = write_ct(vol, tmp_path / f"case{suffix}")
    back = read_ct(path)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.spacing_mm == pytest.approx(vol.spacing_mm)
    assert back.origin_mm == pytest.approx(vol.origin_mm, abs=1e-4)
    assert back.direction == pytest.approx(vol.direction, abs=1e-6)


def test_real_ct_round_trip(tmp_path, real_ct_paths):
    vol = read_ct(real_ct_paths["abdomen"])
    back = read_ct(write_ct(vol, tmp_path / "abdomen.mha"))
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.origin_mm == pytest.approx(vol.origin_mm)


# --------------------------------------------------------------------------- bad input

def _assert_names_file(exc_info, path, *fragments):
    message = str(exc_info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeNotFoundError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "no such file")
    assert isinstance(exc.value, InvalidVolumeError)


def test_truncated_gzip(tmp_path):
    good = write_ct(_volume(), tmp_path / "good.nii.gz")
    data = open(good, "rb").read()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "gzip")


def test_corrupt_gzip(tmp_path):
    raw = gzip.compress(b"\x00" * 100_000)
    data = bytearray(raw)
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "gzip")


@pytest.mark.parametrize("name", ["notes.nii", "notes.mha", "notes.nrrd"])
def test_not_an_image(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is a text file, not a CT\n" * 50)
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "not an image")


def test_2d_image(tmp_path):
    path = tmp_path / "xray.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 64), -1000, np.float32)), str(path))
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "2D image")


def test_4d_series(tmp_path):
    path = tmp_path / "dynamic.nii.gz"
    image = sitk.JoinSeries([sitk.GetImageFromArray(_ct_like()) for _ in range(3)])
    sitk.WriteImage(image, str(path))
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "4D image")


def test_vector_image(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20, 20, 3), np.float32),
                                           isVector=True), str(path))
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "3-component")


@pytest.mark.parametrize("shape", [(10, 32, 32), (2049, 16, 16)])
def test_absurd_size(tmp_path, shape):
    path = tmp_path / "absurd.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, -1000, np.int16)), str(path))
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "absurd size")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, bad):
    array = _ct_like()
    array[5, 5, 5] = bad
    path = write_ct(_volume(array), tmp_path / "nan.mha")
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "non-finite")


def test_real_mr_is_not_ct(real_ct_paths):
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(real_ct_paths["mr"])
    _assert_names_file(exc, real_ct_paths["mr"], "cannot be CT in HU")
    assert read_ct(real_ct_paths["mr"], check_hu=False).shape == (20, 91, 117)


@pytest.mark.parametrize("array", [
    np.random.default_rng(1).uniform(0, 1, (20, 20, 20)),      # a normalised volume
    np.random.default_rng(2).uniform(0, 900, (20, 20, 20)),    # MR-like, no air
    np.full((20, 20, 20), -5000.0),                            # below any CT padding
])
def test_intensity_range_cannot_be_ct(tmp_path, array):
    path = write_ct(_volume(array.astype(np.float32)), tmp_path / "odd.nii.gz")
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(path)
    _assert_names_file(exc, path, "cannot be CT in HU")


def _copy_series(real_ct_paths, tmp_path, skip=()):
    dst = tmp_path / "series"
    dst.mkdir()
    files = sorted(real_ct_paths["dicom"].iterdir())
    for i, f in enumerate(files):
        if i not in skip:
            shutil.copy(f, dst / f.name)
    return dst, files


def _slice_positions(directory):
    import pydicom
    out = []
    for f in sorted(directory.iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((float(ds.ImagePositionPatient[2]), f))
    return sorted(out)


def test_dicom_missing_slices(real_ct_paths, tmp_path):
    dst, _ = _copy_series(real_ct_paths, tmp_path)
    positions = _slice_positions(dst)
    positions[7][1].unlink()   # drop one slice from the middle of the stack
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(dst)
    _assert_names_file(exc, dst, "1 missing slice")


def test_dicom_inconsistent_spacing(real_ct_paths, tmp_path):
    import pydicom
    dst, _ = _copy_series(real_ct_paths, tmp_path)
    positions = _slice_positions(dst)
    z, path = positions[10]
    ds = pydicom.dcmread(path)
    ipp = list(ds.ImagePositionPatient)
    ipp[2] = z + 0.7   # 0.7 mm off in a 2 mm stack
    ds.ImagePositionPatient = ipp
    ds.save_as(path)
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(dst)
    _assert_names_file(exc, dst, "inconsistent slice spacing")


def test_empty_directory(tmp_path):
    with pytest.raises(InvalidVolumeError) as exc:
        read_ct(tmp_path)
    _assert_names_file(exc, tmp_path, "no DICOM series")


def test_import_does_not_pull_ray_or_mlflow():
    import subprocess
    code = ("import importlib, pkgutil, sys, cvaa.data, cvaa.config\n"
            "for m in pkgutil.iter_modules(cvaa.data.__path__):\n"
            "    importlib.import_module('cvaa.data.' + m.name)\n"
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
