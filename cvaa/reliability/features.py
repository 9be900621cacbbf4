"""What one reconstruction can be judged by without ground truth: input statistics,
reprojection consistency and the mean uncertainty, as one flat dict of floats."""

from __future__ import annotations

import math

import torch

from cvaa.config import Config
from cvaa.reliability.reprojection import reproject, reprojection_consistency


def input_features(xrays: torch.Tensor) -> dict[str, float]:
    """Statistics of a radiograph pair that a model has learned without being told.

    ``profile_corr``: both views integrate the same axial slices, so their
    superior-inferior profiles (row sums) agree for a true biplanar pair, whatever the
    patient (near 1); ``log_width_ratio``: the body's width in PA (left-right) over its
    depth in the lateral (anterior-posterior), which swapping the views inverts;
    ``lateral_balance``: where the lateral's attenuation lies between anterior (-1) and
    posterior (+1) (the spine is posterior), which flipping the lateral mirrors.

    Args:
        xrays: ``(2, P, P)`` in [0, 1].
    """
    x = torch.as_tensor(xrays).float()
    pa, lat = x[0], x[1]
    rows_pa, rows_lat = pa.sum(dim=1), lat.sum(dim=1)                    # (P,)
    corr = corr1d(rows_pa, rows_lat)

    def width(view: torch.Tensor) -> float:
        columns = view.mean(dim=0)
        return float((columns > 0.05 * max(float(columns.max()), 1e-6)).float().mean())

    columns = lat.mean(dim=0)
    pos = torch.linspace(-1.0, 1.0, columns.shape[0])
    total = float(columns.sum())
    balance = float((columns * pos).sum()) / total if total > 1e-9 else 0.0
    return {"pa_mean": float(pa.mean()), "pa_std": float(pa.std()),
            "lateral_mean": float(lat.mean()), "lateral_std": float(lat.std()),
            "profile_corr": corr,
            "log_width_ratio": math.log(max(width(pa), 1e-3) / max(width(lat), 1e-3)),
            "lateral_balance": balance}


def corr1d(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1D profiles; 0 where either is constant."""
    a, b = a - a.mean(), b - b.mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / den if den > 1e-12 else 0.0


def features(xrays: torch.Tensor, estimate: torch.Tensor, uncertainty: torch.Tensor,
             cfg: Config, drr: torch.Tensor | None = None) -> dict[str, float]:
    """Every feature of one reconstruction: :func:`input_features`, reprojection NCC and
    L1 per view and their means, ``reprojection_l1_center`` (L1 over the central half of
    the detector in each axis, both views: the rays there stay inside the estimated cube,
    while those near the edges also cross anatomy above and below it that the training
    DRRs saw and the cube lacks), and ``log_uncertainty`` (log of the mean voxel standard
    deviation).

    Args:
        xrays: ``(2, P, P)``; estimate, uncertainty: ``(1, 1, S, S, S)``.
        drr: :func:`reproject` of ``estimate`` if already rendered.
    """
    x = torch.as_tensor(xrays).float()
    drr = reproject(estimate, cfg) if drr is None else drr
    rep = reprojection_consistency(x[None], drr)
    ncc, l1 = rep["ncc"][0], rep["l1"][0]
    p = x.shape[-1]
    c = p // 4
    out = input_features(x)
    out["reprojection_l1_center"] = float(rep["residual"][0, :, c:p - c, c:p - c].abs().mean())
    out.update({"reprojection_ncc_pa": float(ncc[0]), "reprojection_ncc_lateral": float(ncc[1]),
                "reprojection_l1_pa": float(l1[0]), "reprojection_l1_lateral": float(l1[1]),
                "reprojection_ncc": float(ncc.mean()), "reprojection_l1": float(l1.mean())})
    out["log_uncertainty"] = math.log(float(uncertainty.mean()) + 1e-6)
    return out


def body_threshold(cfg: Config) -> float:
    """The normalised value of -500 HU: above it a voxel is body, not air."""
    lo, hi = cfg.preprocess.clip_hu
    return (-500.0 - lo) / (hi - lo)


__all__ = ["input_features", "corr1d", "features", "body_threshold"]
