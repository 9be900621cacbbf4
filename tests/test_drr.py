"""DRR renderer: physics against closed forms, geometry, display orientation, fixed
normalisation, noise, full vs cube, and the real lumbar CT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvaa.config import DRRConfig, PreprocessConfig, load_config
from cvaa.data.drr import (Geometry, detector_pitch_mm, geometry_from_config, hu_to_mu,
                           line_integrals, plane_positions, render_drr, render_prepared)
from cvaa.data.io import Volume, read_ct
from cvaa.data.preprocess import CANONICAL_DIRECTION, prepare_ct

SAD, SID = 1000.0, 1500.0


def sphere_occupancy(n: int, spacing_mm: float, radius_mm: float, sub: int = 4) -> np.ndarray:
    """``(n, n, n)`` fraction of each voxel inside a centred sphere (``sub``^3 samples)."""
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    centres = (np.arange(n) - (n - 1) / 2)
    coords = ((centres[:, None] + offsets[None, :]) * spacing_mm)       # (n, sub)
    occ = np.zeros((n, n, n), np.float32)
    for a in range(sub):
        for b in range(sub):
            for c in range(sub):
                r2 = (coords[:, a, None, None] ** 2 + coords[None, :, b, None] ** 2
                      + coords[None, None, :, c] ** 2)
                occ += r2 <= radius_mm ** 2
    return occ / sub ** 3


def blob_centroid(image: torch.Tensor) -> tuple[float, float]:
    """(row, col) centroid of a non-negative image."""
    img = image.double()
    rows = torch.arange(img.shape[0], dtype=torch.float64)
    cols = torch.arange(img.shape[1], dtype=torch.float64)
    total = img.sum()
    return float((img.sum(1) * rows).sum() / total), float((img.sum(0) * cols).sum() / total)


# --------------------------------------------------------------------------- physics

@pytest.mark.parametrize("step_mm", [0.0, 1.0])
def test_sphere_centre_ray_and_integrated_mass_match_closed_form(step_mm):
    n, spacing, radius, mu0 = 64, 2.0, 30.0, 0.02
    mu = torch.from_numpy(sphere_occupancy(n, spacing, radius) * mu0)[None, None]
    geom = Geometry(SAD, SID, detector_pixels=65, pixel_pitch_mm=3.0, step_mm=step_mm)
    line = line_integrals(mu, geom, spacing)                            # (1, 2, 65, 65)
    centre = line[0, :, 32, 32]
    # The central ray crosses the whole diameter: L = 2 R mu.
    assert torch.allclose(centre, torch.full_like(centre, 2 * radius * mu0), rtol=0.01)
    # Off-centre rays: chord 2 sqrt(R^2 - q^2), q the ray's distance from the centre.
    for k in (5, 10):
        q = k * 3.0 / geom.magnification
        expected = 2 * math.sqrt(radius ** 2 - q ** 2) * mu0
        assert float(line[0, 0, 32, 32 + k]) == pytest.approx(expected, rel=0.01)
    # Integral over the detector plane = mu * volume * (SID / SAD)^2 for an object at the
    # isocentre (to O(R^2 / SAD^2) = 1e-3).
    mass = line.sum((2, 3)) * geom.pixel_pitch_mm ** 2
    expected = mu0 * 4 / 3 * math.pi * radius ** 3 * geom.magnification ** 2
    assert torch.allclose(mass, torch.full_like(mass, expected), rtol=0.01)


def test_hu_to_mu_is_linear_in_hu_and_clamped_at_zero():
    hu = torch.tensor([-3000.0, -1000.0, 0.0, 1000.0])
    assert hu_to_mu(hu, 0.02).tolist() == pytest.approx([0.0, 0.0, 0.02, 0.04])


def test_plane_positions_cover_the_volume_and_hit_voxel_centres():
    assert plane_positions(4, 2.0, 0.0).tolist() == [0, 1, 2, 3]
    assert plane_positions(4, 2.0, 2.0).tolist() == [0, 1, 2, 3]
    assert plane_positions(3, 2.0, 1.0).tolist() == [-0.5, 0, 0.5, 1, 1.5, 2, 2.5]


def test_geometry_helpers_and_validation():
    assert detector_pitch_mm(256.0, SAD, SID, 128) == pytest.approx(3.0)
    geom = geometry_from_config(DRRConfig(), fov_mm=256.0)
    assert geom.pixel_pitch_mm == pytest.approx(3.0)
    assert geom.fov_mm == pytest.approx(256.0)
    assert geometry_from_config(DRRConfig(pixel_pitch_mm=1.0), 256.0).pixel_pitch_mm == 1.0
    with pytest.raises(ValueError, match="sid_mm"):
        Geometry(1000.0, 900.0, 64, 1.0, 0.0)
    with pytest.raises(ValueError, match="detector_pixels"):
        Geometry(1000.0, 1500.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        render_drr(torch.zeros(1, 1, 8, 8, 8), DRRConfig())
    with pytest.raises(ValueError, match="volume_hu"):
        render_drr(torch.zeros(8, 8, 8), DRRConfig(), spacing_mm=1.0)


# --------------------------------------------------------------------------- geometry

def test_offcentre_cube_lands_where_perspective_magnification_puts_it():
    n, spacing, pitch = 64, 2.0, 3.0
    vol = torch.zeros(1, 1, n, n, n)
    # A 3-voxel cube centred at index (42, 20, 47): 10.5 voxels inferior, 11.5 anterior and
    # 15.5 to the left of the centre 31.5.
    d0, h0, w0 = 41, 19, 46
    vol[0, 0, d0:d0 + 3, h0:h0 + 3, w0:w0 + 3] = 0.05
    c = (n - 1) / 2
    z_mm = -(d0 + 1 - c) * spacing       # superior +
    y_mm = (h0 + 1 - c) * spacing        # posterior +
    x_mm = (w0 + 1 - c) * spacing        # left +
    geom = Geometry(SAD, SID, detector_pixels=64, pixel_pitch_mm=pitch, step_mm=0.0)
    line = line_integrals(vol, geom, spacing)[0]
    mid = (64 - 1) / 2
    # PA: source posterior at y = +SAD, so the cube is SAD - y from the source.
    m_pa = SID / (SAD - y_mm)
    row, col = blob_centroid(line[0])
    assert row == pytest.approx(mid - z_mm * m_pa / pitch, abs=0.05)
    assert col == pytest.approx(mid + x_mm * m_pa / pitch, abs=0.05)
    # Lateral: source on the patient's right at x = -SAD, so SAD + x from the source.
    m_lat = SID / (SAD + x_mm)
    row, col = blob_centroid(line[1])
    assert row == pytest.approx(mid - z_mm * m_lat / pitch, abs=0.05)
    assert col == pytest.approx(mid + y_mm * m_lat / pitch, abs=0.05)
    # The magnification at the isocentre alone (SID / SAD) would miss by > 0.2 px.
    assert abs(col - (mid + y_mm * geom.magnification / pitch)) > 0.2


def test_isocentre_shift_moves_the_image():
    vol = torch.zeros(1, 1, 32, 32, 32)
    vol[0, 0, 15:17, 15:17, 15:17] = 1.0
    geom = Geometry(SAD, SID, 32, 3.0, 0.0)
    centred = line_integrals(vol, geom, 2.0)[0, 0]
    shifted = line_integrals(vol, geom, 2.0, isocenter_index=(15.5, 15.5, 20.5))[0, 0]
    # The isocentre 5 voxels (10 mm) to the left: the object appears 10 mm * M to the right
    # of it, i.e. on the patient's right = the viewer's left.
    dcol = blob_centroid(shifted)[1] - blob_centroid(centred)[1]
    assert dcol == pytest.approx(-10.0 * SID / SAD / 3.0, abs=0.1)


# --------------------------------------------------------------------------- orientation

def marker_volume(n: int, where: str) -> torch.Tensor:
    """Air with one bone marker on the patient's right, anterior or superior side."""
    vol = torch.full((1, 1, n, n, n), -1000.0)
    c, e = n // 2 - 2, 3
    sl = {"right": (slice(c, c + 4), slice(c, c + 4), slice(e, e + 4)),
          "anterior": (slice(c, c + 4), slice(e, e + 4), slice(c, c + 4)),
          "superior": (slice(e, e + 4), slice(c, c + 4), slice(c, c + 4))}[where]
    vol[(0, 0) + sl] = 1000.0
    return vol


def test_display_orientation_of_both_views():
    cfg = load_config("cpu").drr                  # 32^2 detector, 8 mm voxels
    n, half = 32, 16
    pa, lat = render_drr(marker_volume(n, "right"), cfg, spacing_mm=8.0)[0]
    # Patient's right appears on the viewer's left of the PA image.
    assert blob_centroid(pa)[1] < half - 8
    assert blob_centroid(lat)[1] == pytest.approx(half - 0.5, abs=1.0)
    pa, lat = render_drr(marker_volume(n, "anterior"), cfg, spacing_mm=8.0)[0]
    # Anterior appears on the viewer's left of the lateral image.
    assert blob_centroid(lat)[1] < half - 8
    assert blob_centroid(pa)[1] == pytest.approx(half - 0.5, abs=1.0)
    pa, lat = render_drr(marker_volume(n, "superior"), cfg, spacing_mm=8.0)[0]
    # Superior appears in the top rows of both.
    assert blob_centroid(pa)[0] < half - 8
    assert blob_centroid(lat)[0] < half - 8


def test_perspective_agrees_with_parallel_sums_of_the_volume_axes():
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(1, 1, 24, 24, 24, generator=gen)
    mu = torch.nn.functional.avg_pool3d(mu, 5, 1, 2)   # smooth, asymmetric content
    # A far source approaches parallel projection: PA = sum over H, lateral = sum over W.
    geom = Geometry(1e6, 1e6 * (1 + 1e-6), 24, 1.0, 0.0)
    line = line_integrals(mu, geom, 1.0)[0]
    inner = (slice(2, -2), slice(2, -2))
    assert torch.allclose(line[0][inner], mu[0, 0].sum(1)[inner], rtol=2e-3)
    assert torch.allclose(line[1][inner], mu[0, 0].sum(2)[inner], rtol=2e-3)


# --------------------------------------------------------------------------- normalisation

def test_fixed_normalisation_scales_with_attenuation():
    n = 32
    hu = torch.full((1, 1, n, n, n), -1000.0)
    hu[0, 0, 8:24, 8:24, 8:24] = 0.0                          # a water cube
    cfg = DRRConfig(detector_pixels=32, log_scale=12.0)
    once = render_drr(hu, cfg, spacing_mm=4.0)
    twice = render_drr(2 * hu + 1000.0, cfg, spacing_mm=4.0)   # mu doubled
    assert float(once.max()) < 0.5                            # not stretched to 1
    inside = once > 0.01
    ratio = twice[inside] / once[inside]
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-4)
    # Water: 64 mm of it gives L = 1.28, i.e. 1.28 / 12 at the centre.
    assert float(once[0, 0, 16, 16]) == pytest.approx(64 * 0.02 / 12.0, rel=0.02)
    assert float(render_drr(torch.full_like(hu, -1000.0), cfg, spacing_mm=4.0).max()) == 0.0


def test_noise_is_seeded_and_unbiased():
    n = 32
    hu = torch.zeros(2, 1, n, n, n)                           # water blocks
    cfg = DRRConfig(detector_pixels=32, photons=1e4, blur_sigma_px=0.5, seed=7)
    clean = render_drr(hu, DRRConfig(detector_pixels=32), spacing_mm=4.0)
    a = render_drr(hu, cfg, spacing_mm=4.0)
    b = render_drr(hu, cfg, spacing_mm=4.0)
    other = render_drr(hu, DRRConfig(detector_pixels=32, photons=1e4, seed=8), spacing_mm=4.0)
    given = render_drr(hu, cfg, spacing_mm=4.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(a, given)
    assert not torch.equal(a, other)
    assert not torch.equal(a[0], a[1])                         # cases get their own noise
    noise = (a - clean)[..., 4:-4, 4:-4]
    assert 1e-4 < float(noise.std()) < 0.05
    assert abs(float(noise.mean())) < 0.2 * float(noise.std())


# --------------------------------------------------------------------------- full vs cube

def test_full_render_sees_anatomy_outside_the_cube_and_cube_render_does_not():
    # 16^3 crop at 4 mm of a volume twice as deep (A-P) as the crop; a dense marker in
    # front of the crop (anterior, outside it) lies on PA rays through the crop.
    d, h, w = 16, 40, 16
    array = np.full((d, h, w), -1000.0, np.float32)
    array[4:12, 12:28, 4:12] = 0.0                            # water inside the crop
    array[6:10, 2:6, 6:10] = 2000.0                           # bone anterior of the crop
    volume = Volume(array, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), CANONICAL_DIRECTION, "synthetic")
    prep = prepare_ct(volume, PreprocessConfig(spacing_mm=4.0, size=16))
    assert prep.cube.array.max() == 0.0                       # the marker is outside
    cfg = load_config("cpu", overrides=["drr.detector_pixels=16", "preprocess.size=16"])
    full = render_prepared(prep, cfg)
    cube = render_prepared(prep, cfg.override(["drr.source=cube"]))
    assert full.shape == cube.shape == (2, 16, 16) and full.dtype == np.float32
    # PA: the marker (16 mm of 2000 HU: L = 0.96, 0.08 on the scale) adds to the water.
    assert (full[0, 6:10, 6:10] - cube[0, 6:10, 6:10]).min() > 0.06
    assert np.allclose(full[0, :, :3], cube[0, :, :3], atol=1e-6)
    # Lateral: the marker, 62 mm anterior of the isocentre, projects beyond the edge of the
    # detector (+-32 mm at the isocentre), so both lateral images agree.
    assert np.allclose(full[1], cube[1], atol=1e-6)


def test_volume_input_matches_tensor_input_and_uses_isocenter_mm():
    gen = torch.Generator().manual_seed(1)
    arr = (torch.rand(20, 24, 28, generator=gen) * 2000 - 1000).numpy()
    vol = Volume(arr, (2.0, 2.0, 2.0), (10.0, -20.0, 30.0), CANONICAL_DIRECTION)
    cfg = DRRConfig(detector_pixels=24)
    # isocenter at index (d, h, w) = (9, 11, 13): x = 10 + 26, y = -20 + 22, z = 30 - 18
    from_volume = render_drr(vol, cfg, isocenter_mm=(36.0, 2.0, 12.0), fov_mm=48.0)
    from_tensor = render_drr(torch.from_numpy(arr)[None, None], cfg, spacing_mm=2.0,
                             isocenter_index=(9.0, 11.0, 13.0), fov_mm=48.0)
    assert torch.allclose(from_volume, from_tensor)
    flipped = Volume(arr, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="canonical"):
        render_drr(flipped, cfg)


def test_batch_renders_each_volume_independently():
    gen = torch.Generator().manual_seed(2)
    hu = torch.rand(3, 1, 16, 16, 16, generator=gen) * 1000 - 500
    cfg = load_config("cpu").drr
    batch = render_drr(hu, cfg, spacing_mm=16.0)
    assert batch.shape == (3, 2, 32, 32) and batch.dtype == torch.float32
    for i in range(3):
        assert torch.allclose(batch[i], render_drr(hu[i:i + 1], cfg, spacing_mm=16.0)[0],
                              atol=1e-6)


# --------------------------------------------------------------------------- real CT

def test_real_lumbar_ct_renders_inside_the_range_with_the_spine_where_expected(real_ct_paths):
    cfg = load_config("cpu")
    prep = prepare_ct(read_ct(real_ct_paths["abdomen"]), cfg.preprocess)
    xray = render_prepared(prep, cfg)                          # (2, 32, 32)
    assert xray.shape == (2, 32, 32)
    # Fixed scale: the real body lands well inside [0, 1], neither black nor saturated.
    assert 0.3 < xray[0].max() < 0.8 and 0.5 < xray[1].max() < 0.9
    # PA: the spine is a bright column in the middle (compare with the flanks).
    cols = xray[0, 8:24].mean(0)
    assert cols[13:19].mean() > cols[4:10].mean() and cols[13:19].mean() > cols[22:28].mean()
    # Lateral: the body (anterior, left) ends before the back; the spine is on the right:
    # the brightest columns lie right of the centre.
    assert int(np.argmax(xray[1, 8:24].mean(0))) > 16


@pytest.mark.parametrize("step_mm", [0.0, 2.0, 4.0, 3.0])
def test_plane_steps_agree_on_a_smooth_volume(step_mm):
    # Every plane step (voxel centres, a coarser multiple of the voxel, in between)
    # integrates a smooth blob to within a few per cent of the voxel-step result.
    n = 32
    c = (torch.arange(n) - (n - 1) / 2) * 2.0
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    mu = (0.02 * torch.exp(-r2 / (2 * 12.0 ** 2)))[None, None]
    ref = line_integrals(mu, Geometry(SAD, SID, 32, 3.0, 0.0), 2.0)
    out = line_integrals(mu, Geometry(SAD, SID, 32, 3.0, step_mm), 2.0)
    assert torch.allclose(out, ref, rtol=0.03, atol=1e-4)


def test_single_and_multi_threaded_paths_agree():
    # The CPU path picks its plane chunking by the thread count; both must agree.
    gen = torch.Generator().manual_seed(3)
    hu = torch.rand(2, 1, 24, 40, 36, generator=gen) * 1500 - 1000
    cfg = DRRConfig(detector_pixels=24)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = render_drr(hu, cfg, spacing_mm=3.0)
        torch.set_num_threads(2)
        two = render_drr(hu, cfg, spacing_mm=3.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(one, two, atol=1e-6)
