import numpy as np
import pytest

from cvaa.config import PreprocessConfig
from cvaa.data.io import Volume, read_ct
from cvaa.data.preprocess import (CANONICAL_DIRECTION, body_centroid, crop_or_pad,
                                  denormalize, index_to_physical, normalize,
                                  orient_canonical, prepare_ct, resample_isotropic)


@pytest.fixture(scope="module")
def abdomen(real_ct_paths):
    return read_ct(real_ct_paths["abdomen"])


@pytest.fixture(scope="module")
def abdomen_2mm(abdomen):
    return resample_isotropic(orient_canonical(abdomen), 2.0)


def test_orient_to_canonical_keeps_physical_positions(abdomen):
    oriented = orient_canonical(abdomen)
    assert oriented.direction == pytest.approx(CANONICAL_DIRECTION)
    # diag(-1,-1,1) -> diag(1,1,-1): all three axes flip, so the corners swap.
    np.testing.assert_array_equal(oriented.array, abdomen.array[::-1, ::-1, ::-1])
    last = np.array(abdomen.shape) - 1
    assert index_to_physical(abdomen, last) == pytest.approx(
        index_to_physical(oriented, (0, 0, 0)))


def test_spine_is_posterior_and_liver_on_the_right(abdomen_2mm):
    a = abdomen_2mm.array
    d, h, w = a.shape
    bone = np.argwhere(a > 250)
    assert bone[:, 1].mean() > (h - 1) / 2 + 5           # H runs anterior -> posterior
    upper = a[: d // 3]                                   # D runs superior -> inferior
    liver_band = (upper > 40) & (upper < 90)
    right, left = liver_band[:, :, : w // 2].sum(), liver_band[:, :, w // 2:].sum()
    assert right > 1.5 * left                             # W runs patient right -> left


def test_superior_is_first(real_ct_paths):
    # The thoracic CT: lungs (air inside the body) sit above the abdomen's soft tissue;
    # in the abdominal CT the pelvis (more bone) is at the bottom, i.e. at high D.
    vol = resample_isotropic(orient_canonical(read_ct(real_ct_paths["abdomen"])), 4.0)
    bone = vol.array > 250
    d = vol.shape[0]
    assert bone[2 * d // 3:].sum() > bone[: d // 3].sum()


@pytest.mark.parametrize("key, shape", [
    ("abdomen", (167, 151, 183)), ("aorta", (123, 95, 90)), ("dicom", (20, 251, 251))])
def test_resample_to_2mm(real_ct_paths, key, shape):
    vol = resample_isotropic(orient_canonical(read_ct(real_ct_paths[key])), 2.0)
    assert vol.shape == shape
    assert vol.spacing_mm == (2.0, 2.0, 2.0)
    assert vol.direction == pytest.approx(CANONICAL_DIRECTION)


def test_resample_identity_spacing_is_identity():
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(0, 100, (20, 18, 16)).astype(np.float32), (2.0, 2.0, 2.0),
                 (1.0, 2.0, 3.0), CANONICAL_DIRECTION)
    out = resample_isotropic(vol, 2.0)
    np.testing.assert_allclose(out.array, vol.array, atol=1e-3)
    assert out.origin_mm == pytest.approx(vol.origin_mm)


def test_resample_preserves_a_linear_ramp():
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None] * 10, (40, 20, 20))
    vol = Volume(np.ascontiguousarray(ramp), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                 CANONICAL_DIRECTION)
    out = resample_isotropic(vol, 3.0)
    np.testing.assert_allclose(out.array[:, 3, 3], np.arange(out.shape[0]) * 30, atol=1e-3)


@pytest.mark.parametrize("key", ["abdomen", "aorta", "pulmonary", "dicom"])
@pytest.mark.parametrize("center", ["volume", "body"])
def test_prepare_real_ct_to_the_cube(real_ct_paths, key, center):
    cfg = PreprocessConfig(spacing_mm=4.0, size=64, crop_center=center)
    prep = prepare_ct(read_ct(real_ct_paths[key]), cfg)
    assert prep.normalized.shape == (64, 64, 64)
    assert prep.normalized.dtype == np.float32
    assert 0.0 <= prep.normalized.min() and prep.normalized.max() <= 1.0
    assert prep.cube.spacing_mm == (4.0, 4.0, 4.0)
    # The reported centre is the physical centre of the cube.
    assert index_to_physical(prep.cube, (31.5, 31.5, 31.5)) == pytest.approx(prep.center_mm)


def test_crop_or_pad_pads_with_air_and_keeps_positions():
    a = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    vol = Volume(a, (2.0, 2.0, 2.0), (5.0, -3.0, 7.0), CANONICAL_DIRECTION)
    cube = crop_or_pad(vol, 16, (4.5, 5.5, 6.5), pad_hu=-1000)
    assert cube.shape == (16, 16, 16)
    assert (cube.array == -1000).sum() == 16 ** 3 - a.size   # all of a inside, rest padding
    assert cube.array[3, 2, 1] == a[0, 0, 0]                  # start index (-3, -2, -1)
    assert index_to_physical(cube, (3, 2, 1)) == pytest.approx(index_to_physical(vol, (0, 0, 0)))
    small = crop_or_pad(vol, 4, (4.5, 5.5, 6.5))
    np.testing.assert_array_equal(small.array, a[3:7, 4:8, 5:9])


def test_crop_entirely_outside_is_padding():
    vol = Volume(np.zeros((8, 8, 8), np.float32), (1.0,) * 3, (0.0,) * 3, CANONICAL_DIRECTION)
    assert (crop_or_pad(vol, 4, (100, 100, 100), pad_hu=-1000).array == -1000).all()


def test_body_centroid_ignores_table_and_air():
    a = np.full((40, 60, 60), -1000, np.float32)
    a[:, 10:30, 5:25] = 40            # the body: anterior and on the patient's right
    a[:, 52:54, :] = 300              # a 2-voxel-thick table across the whole width
    vol = Volume(a, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), CANONICAL_DIRECTION)
    c = body_centroid(vol, threshold_hu=-500)
    assert c == pytest.approx((19.5, 19.5, 14.5), abs=0.6)
    cube = prepare_ct(vol, PreprocessConfig(spacing_mm=2.0, size=16, crop_center="body"))
    assert (cube.cube.array > 0).mean() > 0.9   # the body fills the crop


def test_normalize_inverse_round_trip():
    hu = np.linspace(-1500, 5000, 10001, dtype=np.float32)
    x = normalize(hu)
    assert x.min() == 0.0 and x.max() == 1.0
    back = denormalize(x)
    inside = (hu >= -1000) & (hu <= 4096)
    np.testing.assert_allclose(back[inside], hu[inside], atol=1e-3)
    assert back[~inside].min() == -1000 and back[~inside].max() == 4096
    assert normalize(np.array([-1000.0, 4096.0, 1548.0])) == pytest.approx([0, 1, 0.5])
