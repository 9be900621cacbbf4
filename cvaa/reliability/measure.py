"""One call: reconstruct with reliability (:func:`assess`), and measure held-out cases for
a calibration (:func:`measure_cases`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cvaa.config import Config
from cvaa.reliability.calibration import ReliabilityCalibration
from cvaa.reliability.features import features
from cvaa.reliability.reprojection import reproject
from cvaa.reliability.uncertainty import estimate_with_uncertainty
from cvaa.reliability.verdict import Assessment


@dataclass(frozen=True)
class Reliability:
    """Everything :func:`assess` measured on one reconstruction.

    Attributes:
        estimate: ``(S, S, S)`` the reconstruction in [0, 1] (the plain one).
        uncertainty: ``(S, S, S)`` per-voxel standard deviation, normalised units.
        drr: ``(2, P, P)`` DRRs of the estimate; residual: ``drr - xrays``.
        features: :func:`features`.
        assessment: score, interval and verdict (verdict ``uncalibrated`` without a
            calibration).
        k: forward samples.
    """

    estimate: np.ndarray
    uncertainty: np.ndarray
    drr: np.ndarray
    residual: np.ndarray
    features: dict[str, float]
    assessment: Assessment
    k: int

    def metadata(self) -> dict[str, Any]:
        """What goes next to the output: the features and the assessment."""
        return {"k": self.k, "features": dict(self.features), **self.assessment.to_dict()}


def assess(generator: nn.Module, xrays, cfg: Config,
           calibration: ReliabilityCalibration | None = None, *, k: int = 8,
           seed: int = 0) -> Reliability:
    """Reconstruct with reliability: one batched forward pass of ``k``, one reprojection.

    Args:
        generator: the generator.
        xrays: ``(2, P, P)`` in [0, 1].
        cfg: the model's config.
        calibration: the model's calibration; ``None``: the verdict is ``uncalibrated``.
        k: forward samples (a calibration fitted at another ``k`` is refused).
    """
    if calibration is not None and calibration.k != k:
        raise ValueError(f"k={k}, but the calibration was fitted with k={calibration.k}: "
                         f"use k={calibration.k}")
    x = torch.as_tensor(np.asarray(xrays, np.float32) if not torch.is_tensor(xrays)
                        else xrays).float().cpu()
    estimate, uncertainty = estimate_with_uncertainty(generator, x, cfg, k, seed)
    drr = reproject(estimate, cfg)
    row = features(x, estimate, uncertainty, cfg, drr=drr)
    return Reliability(estimate[0, 0].numpy(), uncertainty[0, 0].numpy(), drr[0].numpy(),
                       (drr[0] - x).numpy(), row,
                       calibration.assess(row, x.numpy()) if calibration is not None
                       else Assessment.uncalibrated(), k)


def measure_cases(generator: nn.Module, cases, cfg: Config, k: int, seed: int = 0
                  ) -> tuple[list[dict[str, float]], list[float], list[np.ndarray]]:
    """Features, actual PSNR and X-rays of held-out cases, for
    :meth:`ReliabilityCalibration.fit` (``rows, psnr, xrays=...``).

    Args:
        cases: ``(xrays (2, P, P), ct (1, S, S, S))`` pairs in [0, 1], cases the model did
            not train on.
    """
    from cvaa.metrics import psnr

    rows, values, inputs = [], [], []
    for xrays, ct in cases:
        rel = assess(generator, xrays, cfg, None, k=k, seed=seed)
        rows.append(rel.features)
        values.append(float(psnr(torch.from_numpy(rel.estimate)[None, None],
                                 torch.as_tensor(np.asarray(ct, np.float32))[None])))
        inputs.append(np.asarray(xrays, np.float32))
    return rows, values, inputs


__all__ = ["Reliability", "assess", "measure_cases"]
