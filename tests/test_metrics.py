"""Metrics in both conventions against skimage and known values (cvaa.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from cvaa import metrics


def _pair(kind: str, shape=(2, 1, 24, 20, 28)):
    gen = torch.Generator().manual_seed(1)
    if kind == "random":
        target = torch.rand(shape, generator=gen)
    else:  # structured: a smooth blob plus a bright "bone" block, like a CT in [0, 1]
        d, h, w = (torch.linspace(-1, 1, n) for n in shape[2:])
        r2 = d[:, None, None] ** 2 + h[None, :, None] ** 2 + w[None, None, :] ** 2
        vol = 0.3 * torch.exp(-2 * r2)
        vol[6:14, 8:14, 10:20] += 0.6
        target = vol.expand(shape).clone()
    pred = (target + 0.08 * torch.randn(shape, generator=gen)).clamp(0, 1)
    return pred, target


def _np(x: torch.Tensor, i: int) -> np.ndarray:
    return x[i, 0].double().numpy()


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_volume_convention_matches_skimage(kind):
    pred, target = _pair(kind)
    ours_ssim = metrics.ssim(pred, target)
    ours_psnr = metrics.psnr(pred, target)
    for i in range(pred.shape[0]):
        ref = sk_ssim(_np(pred, i), _np(target, i), gaussian_weights=True, sigma=1.5,
                      use_sample_covariance=False, data_range=1.0)
        assert ours_ssim[i].item() == pytest.approx(ref, abs=1e-4)
        assert ours_psnr[i].item() == pytest.approx(
            sk_psnr(_np(target, i), _np(pred, i), data_range=1.0), abs=1e-4)
    assert 0 < ours_ssim.min() < 1


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_x2ct_convention_matches_skimage_per_slice(kind):
    pred, target = _pair(kind)
    ours_ssim, ours_psnr = metrics.ssim_x2ct(pred, target), metrics.psnr_x2ct(pred, target)
    for i in range(pred.shape[0]):
        p, t = _np(pred, i), _np(target, i)
        ssims, psnrs = [], []
        for axis in range(3):
            ps, ts = np.moveaxis(p, axis, 0), np.moveaxis(t, axis, 0)
            ssims.append(np.mean([sk_ssim(a, b, data_range=1.0) for a, b in zip(ps, ts)]))
            psnrs.append(np.mean([sk_psnr(b * 2500, a * 2500, data_range=4095)
                                  for a, b in zip(ps, ts)]))
        assert ours_ssim[i].item() == pytest.approx(np.mean(ssims), abs=1e-4)
        assert ours_psnr[i].item() == pytest.approx(np.mean(psnrs), abs=1e-4)


def test_identical_volumes_score_perfectly():
    y = torch.rand(2, 1, 16, 16, 16)
    for case in metrics.evaluate_batch(y, y):
        assert case["mae"] == 0.0 and case["mse"] == 0.0
        assert case["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert case["psnr"] == math.inf
        assert case["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert case["ssim_x2ct"] == pytest.approx(1.0, abs=1e-12)
        assert case["psnr_x2ct"] == 100.0                      # X2CT-GAN's zero-error value


def test_known_values():
    y = torch.full((1, 1, 12, 12, 12), 0.5)
    pred = y + 0.1
    assert metrics.mae(pred, y).item() == pytest.approx(0.1)
    assert metrics.mse(pred, y).item() == pytest.approx(0.01)
    assert metrics.psnr(pred, y).item() == pytest.approx(20.0)
    # Per-slice errors are all 0.1 * 2500 = 250: 20 log10(4095 / 250) on every slice.
    assert metrics.psnr_x2ct(pred, y).item() == pytest.approx(20 * math.log10(4095 / 250))
    # Parallel vectors: cosine 1 whatever the scale; orthogonal supports: cosine 0.
    assert metrics.cosine_similarity(2 * y, y).item() == pytest.approx(1.0)
    a, b = torch.zeros_like(y), torch.zeros_like(y)
    a[..., :6], b[..., 6:] = 1.0, 1.0
    assert metrics.cosine_similarity(a, b).item() == 0.0
    # Constant volumes: SSIM reduces to the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    c1 = 0.01 ** 2
    lum = (2 * 0.6 * 0.5 + c1) / (0.6 ** 2 + 0.5 ** 2 + c1)
    assert metrics.ssim(pred, y).item() == pytest.approx(lum)
    assert metrics.ssim_x2ct(pred, y).item() == pytest.approx(lum)


def test_summarize_gives_mean_and_population_std():
    table = metrics.summarize([{"mae": 1.0, "psnr": 20.0}, {"mae": 3.0, "psnr": 30.0}])
    assert table == {"mae": (2.0, 1.0), "psnr": (25.0, 5.0)}
    with pytest.raises(ValueError, match="empty"):
        metrics.summarize([])


def test_evaluate_batch_selects_conventions_and_rejects_bad_input():
    y = torch.rand(3, 1, 12, 12, 12)
    cases = metrics.evaluate_batch(y, y.flip(2), conventions=["x2ct"])
    assert len(cases) == 3 and set(cases[0]) == {"psnr_x2ct", "ssim_x2ct"}
    with pytest.raises(ValueError, match="unknown conventions"):
        metrics.evaluate_batch(y, y, conventions=["hu"])
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        metrics.mae(y[:, 0], y[:, 0])
    with pytest.raises(ValueError, match="11-tap"):
        metrics.ssim(torch.rand(1, 1, 8, 16, 16), torch.rand(1, 1, 8, 16, 16))
