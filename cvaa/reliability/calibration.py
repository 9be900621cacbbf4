"""Held-out cases -> a score (the predicted PSNR), a split-conformal interval and an
out-of-distribution threshold: :class:`ReliabilityCalibration`, a JSON dataclass stored next
to the registered model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from cvaa.reliability.orientation import OrientationCheck
from cvaa.reliability.verdict import Assessment

CALIBRATION_FILE = "reliability_calibration.json"

# Features the PSNR regression reads (a few, so 30-60 held-out cases fit them); the
# out-of-distribution distance reads every feature.
# Chosen on the 64 calibration phantoms alone (leave-one-out, model seed 0): the central
# reprojection residual predicts PSNR best (rho 0.77), these three give the smallest error
# (0.45 dB); see docs/reliability-score.md.
SCORE_FEATURES = ("reprojection_l1_center", "log_uncertainty", "reprojection_l1")
OOD_FEATURES = ("pa_mean", "pa_std", "lateral_mean", "lateral_std", "profile_corr",
                "log_width_ratio", "lateral_balance", "reprojection_ncc_pa",
                "reprojection_ncc_lateral", "reprojection_l1_pa", "reprojection_l1_lateral",
                "reprojection_l1_center", "log_uncertainty")


def conformal_quantile(residuals: Sequence[float], level: float) -> float:
    """The split-conformal quantile: the ``ceil((n + 1) * level)``-th smallest of ``n``
    held-out residuals (``inf`` when that exceeds ``n``), so that a new exchangeable case's
    residual is at most it with probability at least ``level`` (Vovk et al. 2005;
    Lei et al. 2018, eq. 2.2).

    Example:
        >>> conformal_quantile(range(1, 10), 0.9)
        9.0
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.sort(np.asarray(list(residuals), float))
    rank = conformal_rank(len(values), level)
    return float(values[rank - 1]) if rank <= len(values) else math.inf


def conformal_rank(n: int, level: float) -> int:
    """The rank ``ceil((n + 1) * level)`` :func:`conformal_quantile` takes of ``n``
    residuals; above ``n`` the quantile is infinite."""
    # The rounding guard keeps e.g. (19 + 1) * 0.95 = 19.000000000000004 at rank 19.
    return math.ceil(round((n + 1) * level, 9))


def minimum_cases(level: float = 0.9, ood_level: float = 0.95, fit_fraction: float = 0.5,
                  min_fit: int = 8) -> int:
    """The fewest held-out cases :meth:`ReliabilityCalibration.fit` accepts: its conformal
    part (``1 - fit_fraction`` of them) must give a finite rank at ``level`` (the interval)
    and at ``ood_level`` (the distance threshold), and its fitting part at least
    ``min_fit`` cases.

    Example:
        >>> minimum_cases(0.9, 0.95)
        37
    """
    for level_ in (level, ood_level):
        if not 0.0 < level_ < 1.0:
            raise ValueError(f"levels must be in (0, 1), got {level_}")
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    n = 2
    while True:
        n_fit = int(round(n * fit_fraction))
        n_conf = n - n_fit
        if n_fit >= min_fit and all(conformal_rank(n_conf, lv) <= n_conf
                                    for lv in (level, ood_level)):
            return n
        n += 1


@dataclass(frozen=True)
class ReliabilityCalibration:
    """Held-out cases -> score, interval and verdict thresholds; JSON, never a pickle.

    Fitted by :meth:`fit` on held-out cases split in two: the first part fits the ridge
    regression of PSNR on :data:`SCORE_FEATURES` and the input distribution (mean,
    scale and shrunk covariance of :data:`OOD_FEATURES`); the second, which neither saw,
    gives the conformal half-width and the distance threshold. ``dataset`` and
    ``case_ids`` name the cases it was fitted on, so that nobody reports its quality on
    them (:func:`cvaa.data.dataset.dataset_fingerprint`).

    Attributes:
        halfwidth: the interval's half-width, dB (finite: :meth:`fit` refuses too few
            cases).
        ood_threshold: the Mahalanobis distance (not its square) beyond which an input is
            ``out of distribution``.
        check_psnr: the 10th percentile of the calibration cases' actual PSNR, dB.
        orientation: :meth:`OrientationCheck.to_dict` of the calibration cases' X-rays
            (``{}``: fitted without them, no orientation check).
    """

    level: float
    halfwidth: float
    score_features: tuple[str, ...]
    score_mean: tuple[float, ...]
    score_scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    ood_features: tuple[str, ...]
    ood_mean: tuple[float, ...]
    ood_scale: tuple[float, ...]
    ood_precision: tuple[tuple[float, ...], ...]
    ood_level: float
    ood_threshold: float
    check_psnr: float
    n_fit: int
    n_conformal: int
    k: int
    dataset: str
    case_ids: tuple[str, ...]
    orientation: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, float]], psnr: Sequence[float], *,
            k: int, level: float = 0.9, ood_level: float = 0.95, fit_fraction: float = 0.5,
            ridge: float = 1.0, shrinkage: float = 0.2, seed: int = 0, dataset: str = "",
            case_ids: Sequence[str] = (), xrays: Sequence[np.ndarray] | None = None,
            info: Mapping[str, Any] | None = None) -> "ReliabilityCalibration":
        """Fit on held-out cases (their :func:`features` at ``k`` and actual PSNR).

        Args:
            rows: one feature dict per case.
            psnr: actual PSNR (dB) of each case.
            k: the sample count the features were computed with (kept: the uncertainty
                scale depends on it).
            level: coverage of the PSNR interval.
            ood_level: share of in-distribution cases below the distance threshold.
            fit_fraction: share of cases for the regression and the distribution.
            ridge: L2 penalty on the standardised coefficients.
            shrinkage: covariance shrinkage towards the identity (standardised).
            seed: the random split.
            dataset: fingerprint of the dataset the cases come from
                (:func:`cvaa.data.dataset.dataset_fingerprint`), "" if none.
            case_ids: the cases' ids in that dataset (one per row, or none).
            xrays: the cases' ``(2, P, P)`` inputs, for the per-view orientation check
                (:class:`OrientationCheck`); ``None``: no orientation check.

        Raises:
            ValueError: fewer cases than :func:`minimum_cases` (the interval or the
                distance threshold would be infinite), a non-finite feature or PSNR, or
                ``case_ids`` of another length than ``rows``.
        """
        n = len(rows)
        if n != len(psnr):
            raise ValueError(f"rows ({n}) and psnr ({len(psnr)}) differ in length")
        if case_ids and len(case_ids) != n:
            raise ValueError(f"case_ids ({len(case_ids)}) and rows ({n}) differ in length")
        need = minimum_cases(level, ood_level, fit_fraction)
        if n < need:
            raise ValueError(
                f"need at least {need} held-out cases to calibrate at level {level} and "
                f"ood_level {ood_level} (fit_fraction {fit_fraction}), got {n}: with fewer, "
                "the split-conformal interval or the out-of-distribution threshold is "
                "infinite")
        y = np.asarray(psnr, float)
        if not np.isfinite(y).all():
            raise ValueError(f"psnr: case {int(np.argmin(np.isfinite(y)))} is not finite")
        order = np.random.default_rng(seed).permutation(n)
        n_fit = int(round(n * fit_fraction))
        first, second = order[:n_fit], order[n_fit:]

        def matrix(names, idx):
            out = np.array([[float(rows[i][name]) for name in names] for i in idx])
            bad = ~np.isfinite(out)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(f"feature {names[j]!r} of case {int(idx[i])} is not finite")
            return out

        xs = matrix(SCORE_FEATURES, first)
        mean, scale = xs.mean(0), xs.std(0) + 1e-9
        z = (xs - mean) / scale
        centred = y[first] - y[first].mean()
        coef = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ centred)
        intercept = float(y[first].mean())
        pred = ((matrix(SCORE_FEATURES, second) - mean) / scale) @ coef + intercept
        halfwidth = conformal_quantile(np.abs(y[second] - pred), level)

        xo = matrix(OOD_FEATURES, first)
        o_mean, o_scale = xo.mean(0), xo.std(0) + 1e-9
        zo = (xo - o_mean) / o_scale
        cov = (1 - shrinkage) * np.cov(zo, rowvar=False) + shrinkage * np.eye(zo.shape[1])
        precision = np.linalg.inv(cov)
        d2 = _mahalanobis((matrix(OOD_FEATURES, second) - o_mean) / o_scale, precision)
        threshold = math.sqrt(conformal_quantile(d2, ood_level))
        return cls(level=level, halfwidth=float(halfwidth),
                   score_features=SCORE_FEATURES, score_mean=_t(mean), score_scale=_t(scale),
                   coef=_t(coef), intercept=intercept, ood_features=OOD_FEATURES,
                   ood_mean=_t(o_mean), ood_scale=_t(o_scale),
                   ood_precision=tuple(_t(r) for r in precision), ood_level=ood_level,
                   ood_threshold=float(threshold),
                   check_psnr=float(np.quantile(y, 0.1)), n_fit=int(n_fit),
                   n_conformal=int(n - n_fit), k=int(k), dataset=str(dataset),
                   case_ids=tuple(str(c) for c in case_ids),
                   orientation=(OrientationCheck.fit(xrays).to_dict()
                                if xrays is not None and len(xrays) else {}),
                   info=dict(info or {}))

    # ------------------------------------------------------------------ use
    def score(self, row: Mapping[str, float]) -> float:
        """The reliability score (dB): the predicted PSNR."""
        x = np.array([float(row[name]) for name in self.score_features])
        z = (x - np.asarray(self.score_mean)) / np.asarray(self.score_scale)
        return float(z @ np.asarray(self.coef) + self.intercept)

    def ood_distance(self, row: Mapping[str, float]) -> float:
        """Mahalanobis distance (the square root) to the calibration cases."""
        x = np.array([float(row[name]) for name in self.ood_features])
        z = (x - np.asarray(self.ood_mean)) / np.asarray(self.ood_scale)
        return float(math.sqrt(_mahalanobis(z[None], np.asarray(self.ood_precision))[0]))

    def assess(self, row: Mapping[str, float], xrays: np.ndarray | None = None
               ) -> Assessment:
        """Score, interval, distance and verdict of one feature dict; with the input
        ``xrays`` ``(2, P, P)``, a view whose anatomy shows it mirrored, rotated, inverted
        or in the other view's slot makes it ``out of distribution`` too."""
        score = self.score(row)
        distance = self.ood_distance(row)
        problems = []
        if xrays is not None and self.orientation:
            problems = OrientationCheck.from_dict(self.orientation).problems(xrays)
        if problems:
            return Assessment(score, score - self.halfwidth, score + self.halfwidth,
                              self.level, distance, self.ood_threshold,
                              "out of distribution", "; ".join(problems))
        if not math.isfinite(distance) or distance > self.ood_threshold:
            verdict = "out of distribution"
        elif score < self.check_psnr:
            verdict = "check"
        else:
            verdict = "ok"
        return Assessment(score, score - self.halfwidth, score + self.halfwidth, self.level,
                          distance, self.ood_threshold, verdict)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ReliabilityCalibration":
        data = json.loads(text)
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"reliability calibration: unknown field(s) {unknown}")
        missing = sorted(n for n, f in cls.__dataclass_fields__.items()
                         if n not in data and n != "info")
        if missing:
            raise ValueError(f"reliability calibration: missing field(s) {missing} (a "
                             "calibration of an older cvaa: run jobs/calibrate.py again)")
        for key in ("score_features", "score_mean", "score_scale", "coef", "ood_features",
                    "ood_mean", "ood_scale", "case_ids"):
            data[key] = tuple(data[key])
        data["ood_precision"] = tuple(tuple(r) for r in data["ood_precision"])
        for key in ("halfwidth", "ood_threshold"):
            if not math.isfinite(float(data[key])):
                raise ValueError(f"reliability calibration: {key} is {data[key]} (fitted on "
                                 "too few cases): run jobs/calibrate.py again")
        return cls(**data)

def _t(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _mahalanobis(z: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared distances of the rows of ``z``."""
    return np.einsum("ni,ij,nj->n", z, precision, z)


__all__ = ["CALIBRATION_FILE", "SCORE_FEATURES", "OOD_FEATURES", "conformal_quantile",
           "conformal_rank", "minimum_cases", "ReliabilityCalibration"]
