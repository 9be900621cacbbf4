"""Reconstruction metrics of the paper's Table I, in two conventions (pure torch).

Volumes are ``(B, 1, D, H, W)`` in [0, 1]; every metric returns one value per case,
``(B,)`` float64. Computation runs in float64 on the inputs' device.

``volume`` (ours, the default):
    MAE, MSE, cosine similarity of the flattened volumes, PSNR with data range 1 over the
    whole volume, 3D SSIM with a Gaussian window (sigma 1.5, 11 taps, K1 0.01, K2 0.03,
    population covariance, as Wang et al. 2004; equals ``skimage.metrics.
    structural_similarity(gaussian_weights=True, use_sample_covariance=False)``).

``x2ct`` (what X2CT-GAN's evaluation code computes, to compare with that literature):
    2D SSIM per slice with skimage's defaults (7x7 uniform window, sample covariance,
    data range 1), averaged over the slices of each axis and then over the three axes;
    PSNR per slice with peak 4095 on the volume scaled to [0, 2500] (a slice with zero
    error scores 100 dB), averaged the same way. The 4095-on-2500 peak inflates PSNR by
    20 log10(4095 / 2500) = 4.3 dB relative to the ``volume`` convention.

Per-case dicts and a mean/std summary for the training and evaluation jobs::

    results = evaluate_batch(pred, target)        # [{"mae": ..., "ssim_x2ct": ...}, ...]
    table = summarize(results)                    # {"mae": (mean, std), ...}
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

CONVENTIONS = ("volume", "x2ct")


def _cases(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, D, H, W) x 2 -> (B, D, H, W) float64 x 2."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")
    if pred.dim() != 5 or pred.shape[1] != 1:
        raise ValueError(f"volumes must be (B, 1, D, H, W), got {tuple(pred.shape)}")
    return pred[:, 0].double(), target[:, 0].double()


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per case, ``(B,)``."""
    p, t = _cases(pred, target)
    return (p - t).abs().flatten(1).mean(1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per case, ``(B,)``."""
    p, t = _cases(pred, target)
    return ((p - t) ** 2).flatten(1).mean(1)


def cosine_similarity(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the flattened volumes per case, ``(B,)`` (0 if one is all 0)."""
    p, t = _cases(pred, target)
    return torch.nn.functional.cosine_similarity(p.flatten(1), t.flatten(1), dim=1, eps=1e-12)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR over the whole volume, ``10 log10(data_range^2 / MSE)``, ``(B,)``; inf if equal.

    Example:
        >>> y = torch.zeros(1, 1, 4, 4, 4)
        >>> round(psnr(y + 0.1, y).item(), 4)  # MSE 0.01 -> 20 dB
        20.0
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    err = mse(pred, target)
    return 10 * torch.log10(data_range ** 2 / err)


def _filter_valid(x: torch.Tensor, kernel: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Separable correlation with a 1D kernel along ``dims``, keeping only the valid part.

    The valid part is what skimage averages after cropping ``(win - 1) // 2`` on each
    side, so no border mode is needed.
    """
    k = kernel.numel()
    for dim in dims:
        n = x.shape[dim] - k + 1
        out = kernel[0] * x.narrow(dim, 0, n)
        for i in range(1, k):
            out = out + kernel[i] * x.narrow(dim, i, n)
        x = out
    return x


def _ssim_map(p: torch.Tensor, t: torch.Tensor, kernel: torch.Tensor, dims: Sequence[int],
              data_range: float, k1: float, k2: float, cov_norm: float) -> torch.Tensor:
    """SSIM map (Wang et al. 2004) over the valid region of the window along ``dims``."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ux, uy = _filter_valid(p, kernel, dims), _filter_valid(t, kernel, dims)
    uxx, uyy = _filter_valid(p * p, kernel, dims), _filter_valid(t * t, kernel, dims)
    uxy = _filter_valid(p * t, kernel, dims)
    vx, vy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _gaussian_kernel(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # as scipy.ndimage / skimage
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5,
         truncate: float = 3.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """3D SSIM with a Gaussian window (``volume`` convention), ``(B,)``.

    Args:
        pred, target: ``(B, 1, D, H, W)``.
        data_range: range of the voxel values (1 for [0, 1] volumes).
        sigma, truncate: Gaussian window; the defaults give 11 taps.
        k1, k2: SSIM stabilising constants.
    """
    p, t = _cases(pred, target)
    kernel = _gaussian_kernel(sigma, truncate, p.device)
    if min(p.shape[1:]) < kernel.numel():
        raise ValueError(f"every volume extent must be >= the {kernel.numel()}-tap window, "
                         f"got {tuple(p.shape[1:])}")
    s = _ssim_map(p, t, kernel, (1, 2, 3), data_range, k1, k2, cov_norm=1.0)
    return s.flatten(1).mean(1)


def ssim_x2ct(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
              win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean 2D SSIM per slice along D, H and W, averaged over the axes (``x2ct``), ``(B,)``.

    Each slice's SSIM is skimage's default (uniform ``win_size`` window, sample covariance).
    """
    p, t = _cases(pred, target)
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(p.shape[1:]) < win_size:
        raise ValueError(f"every volume extent must be >= win_size {win_size}, "
                         f"got {tuple(p.shape[1:])}")
    kernel = torch.full((win_size,), 1.0 / win_size, dtype=torch.float64, device=p.device)
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    per_axis = []
    for axis in (1, 2, 3):                     # slices along D, H, W
        plane = tuple(d for d in (1, 2, 3) if d != axis)
        s = _ssim_map(p, t, kernel, plane, data_range, k1, k2, cov_norm)
        per_axis.append(s.mean(dim=plane).mean(dim=1))   # mean within, then over slices
    return sum(per_axis) / 3


def psnr_x2ct(pred: torch.Tensor, target: torch.Tensor, scale: float = 2500.0,
              peak: float = 4095.0, zero_error_db: float = 100.0) -> torch.Tensor:
    """Mean per-slice PSNR along D, H and W, averaged over the axes (``x2ct``), ``(B,)``.

    The volumes are scaled to [0, ``scale``] and the peak is ``peak``, as X2CT-GAN's code.
    """
    p, t = _cases(pred, target)
    se = ((p - t) * scale) ** 2
    per_axis = []
    for axis in (1, 2, 3):
        plane = tuple(d for d in (1, 2, 3) if d != axis)
        err = se.mean(dim=plane)                                    # (B, slices)
        db = 10 * torch.log10(peak ** 2 / err.clamp_min(1e-300))
        per_axis.append(torch.where(err == 0, torch.full_like(db, zero_error_db), db).mean(1))
    return sum(per_axis) / 3


def evaluate_batch(pred: torch.Tensor, target: torch.Tensor,
                   conventions: Iterable[str] = CONVENTIONS) -> list[dict[str, float]]:
    """All metrics for each case of a batch.

    Args:
        pred, target: ``(B, 1, D, H, W)`` in [0, 1].
        conventions: ``volume`` (keys ``mae, mse, cosine, psnr, ssim``) and/or ``x2ct``
            (keys ``psnr_x2ct, ssim_x2ct``).

    Returns:
        One ``{metric: value}`` dict per case.

    Example:
        >>> y = torch.rand(2, 1, 16, 16, 16)
        >>> evaluate_batch(y, y)[0]["ssim"]
        1.0
    """
    conventions = tuple(conventions)
    unknown = set(conventions) - set(CONVENTIONS)
    if unknown:
        raise ValueError(f"unknown conventions {sorted(unknown)}; valid: {list(CONVENTIONS)}")
    with torch.no_grad():
        columns: dict[str, torch.Tensor] = {}
        if "volume" in conventions:
            columns.update(mae=mae(pred, target), mse=mse(pred, target),
                           cosine=cosine_similarity(pred, target), psnr=psnr(pred, target),
                           ssim=ssim(pred, target))
        if "x2ct" in conventions:
            columns.update(psnr_x2ct=psnr_x2ct(pred, target), ssim_x2ct=ssim_x2ct(pred, target))
    values = {k: v.cpu().tolist() for k, v in columns.items()}
    return [{k: values[k][i] for k in values} for i in range(pred.shape[0])]


def summarize(results: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and (population) standard deviation of each metric over cases.

    Example:
        >>> summarize([{"mae": 1.0}, {"mae": 3.0}])
        {'mae': (2.0, 1.0)}
    """
    if not results:
        raise ValueError("results is empty: nothing to summarize")
    keys = list(results[0])
    out = {}
    for key in keys:
        if any(key not in r for r in results):
            raise ValueError(f"metric {key!r} is missing from some cases")
        vals = [float(r[key]) for r in results]
        mean = math.fsum(vals) / len(vals)
        if math.isinf(mean):
            out[key] = (mean, 0.0 if all(v == mean for v in vals) else math.nan)
            continue
        out[key] = (mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / len(vals)))
    return out


__all__ = ["CONVENTIONS", "mae", "mse", "cosine_similarity", "psnr", "ssim", "ssim_x2ct",
           "psnr_x2ct", "evaluate_batch", "summarize"]
