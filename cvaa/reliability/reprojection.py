"""Reprojection consistency: DRRs of an estimated CT against the X-rays it came from.

The estimate is the crop cube only, while the training DRRs see the whole body
(``drr.source = "full"``), so even a perfect estimate leaves a residual outside the cube's
superior-inferior range; the calibration absorbs that offset.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cvaa.config import Config
from cvaa.data.drr import render_drr


def reproject(volume01: torch.Tensor, cfg: Config) -> torch.Tensor:
    """PA + lateral DRRs of estimated volumes with the training geometry.

    Args:
        volume01: ``(B, 1, S, S, S)`` normalised estimates in [0, 1] (the crop cube,
            isotropic ``preprocess.spacing_mm``, canonical axes).
        cfg: ``drr`` (geometry, attenuation, ``log_scale``) and ``preprocess`` (spacing,
            HU clip).

    Returns:
        ``(B, 2, P, P)`` in [0, 1], noise-free, the detector covering the cube's field of
        view at the isocentre (its centre), as in training.
    """
    if volume01.dim() != 5 or volume01.shape[1] != 1:
        raise ValueError(f"volume01 must be (B, 1, D, H, W), got {tuple(volume01.shape)}")
    lo, hi = cfg.preprocess.clip_hu
    hu = volume01.float() * (hi - lo) + lo
    spacing = float(cfg.preprocess.spacing_mm)
    return render_drr(hu, replace(cfg.drr, photons=0.0), spacing_mm=spacing,
                      fov_mm=volume01.shape[-1] * spacing)


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation over the last two axes; 0 where either is constant."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    den = (a.square().sum(dim=(-2, -1)) * b.square().sum(dim=(-2, -1))).sqrt()
    return torch.where(den > 1e-12, (a * b).sum(dim=(-2, -1)) / den.clamp(min=1e-12),
                       torch.zeros_like(den))


def reprojection_consistency(xrays: torch.Tensor, drr: torch.Tensor
                             ) -> dict[str, torch.Tensor]:
    """Input X-rays against the DRRs of the estimate.

    Args:
        xrays, drr: ``(B, 2, P, P)`` in [0, 1] (channel 0 PA, 1 lateral).

    Returns:
        ``ncc`` and ``l1``: ``(B, 2)`` per view; ``residual``: ``(B, 2, P, P)``,
        ``drr - xrays``.
    """
    if xrays.shape != drr.shape:
        raise ValueError(f"xrays {tuple(xrays.shape)} and drr {tuple(drr.shape)} differ")
    return {"ncc": ncc(xrays, drr), "l1": (drr - xrays).abs().mean(dim=(-2, -1)),
            "residual": drr - xrays}


__all__ = ["reproject", "ncc", "reprojection_consistency"]
