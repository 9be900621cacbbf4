"""Synthetic lumbar phantoms: seeded, plausible HU per tissue, implants only on request,
valid CT geometry that survives a NIfTI round trip, anatomy where it belongs."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from cvaa.config import load_config
from cvaa.data.drr import render_prepared
from cvaa.data.io import check_volume, read_ct
from cvaa.data.phantom import (LABELS, generate_phantom, generate_phantoms, implant_flags,
                               phantom_shape, render_phantom, sample_params, write_phantom)
from cvaa.data.preprocess import CANONICAL_DIRECTION, prepare_ct


@pytest.fixture(scope="module")
def plain():
    """One 128^3 phantom at 2 mm without implants (about 1 s)."""
    return generate_phantom(11, implants=False)


@pytest.fixture(scope="module")
def fused():
    """The same anatomy with screws and rods."""
    return generate_phantom(11, implants=True)


def median_hu(phantom, label: str) -> float:
    return float(np.median(phantom.volume.array[phantom.labels == LABELS[label]]))


def test_same_seed_same_phantom_other_seed_other_phantom():
    a = generate_phantom(5, shape=(32, 32, 32), spacing_mm=8.0)
    b = generate_phantom(5, shape=(32, 32, 32), spacing_mm=8.0)
    c = generate_phantom(6, shape=(32, 32, 32), spacing_mm=8.0)
    assert np.array_equal(a.volume.array, b.volume.array)
    assert np.array_equal(a.labels, b.labels)
    assert a.params == b.params and a.params != c.params
    assert not np.array_equal(a.volume.array, c.volume.array)


def test_parameters_vary_per_case_within_their_ranges():
    params = [sample_params(s) for s in range(40)]
    for field, lo, hi in [("scale", 0.9, 1.1), ("lordosis_mm", 4.0, 16.0),
                          ("cancellous_hu", 150.0, 400.0), ("cortical_hu", 1000.0, 1500.0),
                          ("fat_mm", 5.0, 36.0)]:
        values = np.array([getattr(p, field) for p in params])
        assert values.min() >= lo and values.max() <= hi, field
        assert values.std() > 0.1 * (hi - lo), field            # really varies
    assert np.std([p.scoliosis_mm for p in params]) > 2.0
    assert np.std([p.rotation_deg[3] for p in params]) > 1.0
    assert not any(p.implants or p.fused_levels for p in params)


def test_tissue_hu_ranges(plain):
    assert -120 <= median_hu(plain, "fat") <= -80
    assert 30 <= median_hu(plain, "muscle") <= 60
    assert 0 <= median_hu(plain, "organ") <= 70
    assert -10 <= median_hu(plain, "csf") <= 25
    assert 60 <= median_hu(plain, "disc") <= 110
    assert median_hu(plain, "gas") <= -900
    cancellous = median_hu(plain, "cancellous")
    assert 150 <= cancellous <= 400
    assert cancellous == pytest.approx(plain.params.cancellous_hu, abs=40)
    # At 2 mm the 1 mm cortex is partial volume, but clearly brighter than the core.
    cortex = plain.volume.array[plain.labels == LABELS["cortical"]]
    assert np.percentile(cortex, 90) > cancellous + 250
    assert plain.volume.array.max() < 1600
    air = plain.volume.array[plain.labels == LABELS["air"]]
    assert abs(float(np.median(air)) + 1000) < 5


def test_cortex_reaches_its_tissue_value_on_a_fine_grid():
    # 1 mm voxels around L3: the cortex fills whole voxels, reading 1000-1500 HU.
    ph = generate_phantom(11, shape=(80, 96, 96), spacing_mm=1.0)
    cortex = ph.volume.array[ph.labels == LABELS["cortical"]]
    assert 1000 <= ph.params.cortical_hu <= 1500
    assert 900 <= np.percentile(cortex, 90) <= 1600


def test_every_tissue_is_present(plain):
    present = {name for name, value in LABELS.items() if (plain.labels == value).any()}
    assert present == set(LABELS) - {"implant"}


def test_implants_only_when_requested(plain, fused):
    assert plain.volume.array.max() < 3000
    assert not (plain.labels == LABELS["implant"]).any()
    metal = fused.labels == LABELS["implant"]
    assert metal.sum() > 500
    assert fused.volume.array[metal].min() >= 3000
    assert (fused.volume.array >= 3000).sum() == metal.sum()
    # Screws on both sides of the spine, behind the front of the vertebral bodies.
    d, h, w = np.nonzero(metal)
    bone_w = np.nonzero(plain.labels >= LABELS["cancellous"])[2].mean()
    assert (w < bone_w - 5).sum() > 100 and (w > bone_w + 5).sum() > 100
    assert fused.params.fused_levels and len(fused.params.fused_levels) >= 2


def test_implant_fraction_is_exact_and_seeded():
    flags = implant_flags(20, 0.3, seed=0)
    assert sum(flags) == 6
    assert flags == implant_flags(20, 0.3, seed=0) and flags != implant_flags(20, 0.3, seed=1)
    with pytest.raises(ValueError, match="fraction"):
        implant_flags(4, 1.5, seed=0)


def test_anatomy_is_where_it_belongs(plain):
    lab = plain.labels
    n = lab.shape[0]
    bone = (lab == LABELS["cortical"]) | (lab == LABELS["cancellous"])
    d, h, w = np.nonzero(bone[n // 4: 3 * n // 4])
    centre = (n - 1) / 2
    # The spine is posterior of the centre and near the midline.
    assert h.mean() > centre + 5
    assert abs(w.mean() - centre) < 10
    # The iliac wings make the bone much wider at the bottom than at the top.
    top_width = np.ptp(np.nonzero(bone[: n // 4])[2])
    bottom_width = np.ptp(np.nonzero(bone[-n // 8:])[2])
    assert bottom_width > 1.5 * top_width
    # The liver (brightest soft organ) is in the upper abdomen, on the patient's right.
    liver = (lab == LABELS["organ"]) & (plain.volume.array > 52) & (plain.volume.array < 80)
    dl, hl, wl = np.nonzero(liver)
    assert wl.mean() < centre - 10 and dl.mean() < centre
    # The body is surrounded by air, like a real scan.
    assert (lab[:, :, 0] == 0).mean() > 0.5 and (lab[:, 0, :] == 0).mean() > 0.5


def test_valid_ct_that_round_trips_through_nifti(tmp_path, fused):
    vol = fused.volume
    check_volume(vol)
    assert vol.direction == CANONICAL_DIRECTION
    assert vol.spacing_mm == (2.0, 2.0, 2.0)
    path = write_phantom(fused, tmp_path / "case.nii.gz")
    back = read_ct(path)
    assert back.shape == vol.shape
    assert np.allclose(back.spacing_mm, vol.spacing_mm)
    assert np.allclose(back.origin_mm, vol.origin_mm, atol=1e-4)
    assert np.allclose(back.direction, vol.direction)
    assert np.array_equal(back.array, vol.array)


def test_generate_phantoms_writes_cases_with_patient_ids(tmp_path):
    cfg = load_config("cpu", overrides=["data.phantom_implant_fraction=0.5"])
    cases = generate_phantoms(4, tmp_path, cfg)
    assert [c.patient_id for c in cases] == [f"phantom-{i:04d}" for i in range(4)]
    assert sum(c.implants for c in cases) == 2
    assert len({c.seed for c in cases}) == 4
    with open(tmp_path / "phantoms.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["patient_id"] for r in rows] == [c.patient_id for c in cases]
    for case in cases:
        vol = read_ct(case.path)
        # The crop (32^3 at 8 mm) plus a 16 mm margin on every side.
        assert vol.shape == phantom_shape(32, 8.0) == (36, 36, 36)
        assert vol.spacing_mm == (8.0, 8.0, 8.0)
    again = generate_phantoms(4, tmp_path / "again", cfg)
    assert np.array_equal(read_ct(again[3].path).array, read_ct(cases[3].path).array)


def test_phantom_drrs_show_the_spine_where_the_display_convention_puts_it():
    cfg = load_config("cpu")
    ph = generate_phantom(4, shape=phantom_shape(32, 8.0), spacing_mm=8.0)
    prep = prepare_ct(ph.volume, cfg.preprocess)
    pa, lat = render_prepared(prep, cfg)                          # (32, 32) each
    rows = slice(6, 20)                                           # lumbar levels
    pa_cols = pa[rows].mean(0)
    assert abs(int(np.argmax(pa_cols)) - 15.5) <= 3                # spine in the middle
    lat_cols = lat[rows].mean(0)
    assert int(np.argmax(lat_cols)) > 16                           # spine right (posterior)
    assert 0.2 < pa.max() < 0.9 and 0.2 < lat.max() < 0.9


def test_bad_grid_arguments_name_the_argument():
    params = sample_params(0)
    with pytest.raises(ValueError, match="spacing_mm"):
        render_phantom(params, (16, 16, 16), spacing_mm=0.0)
    with pytest.raises(ValueError, match="shape"):
        render_phantom(params, (16, 16), spacing_mm=8.0)
    assert dataclasses.is_dataclass(params)
