"""Held-out cases -> a score (the predicted PSNR), a jackknife+ interval that widens with
the input's distance, and an out-of-distribution threshold: :class:`ReliabilityCalibration`,
a JSON dataclass stored next to the registered model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from cvaa.reliability.orientation import OrientationCheck
from cvaa.reliability.verdict import Assessment

CALIBRATION_FILE = "reliability_calibration.json"

# The out-of-distribution distance reads these features; the PSNR regression reads them too
# (SCORE_FEATURES), chosen with the ridge penalty and the interval's scale power by
# bench/reliability.py --select on the calibration phantoms alone (two folds): the highest
# clean Spearman rho (0.755 against 0.62-0.64 for the three reprojection and uncertainty
# features alone), then the best coverage among `ok` under the physical shifts (scale power
# 2: 70 % on the worst family, 10 degree rotation, against 20-50 % for 1 and 1.5); see
# docs/reliability-score.md.
OOD_FEATURES = ("pa_mean", "pa_std", "lateral_mean", "lateral_std", "profile_corr",
                "log_width_ratio", "lateral_balance", "reprojection_ncc_pa",
                "reprojection_ncc_lateral", "reprojection_l1_pa", "reprojection_l1_lateral",
                "reprojection_l1_center", "log_uncertainty")
SCORE_FEATURES = OOD_FEATURES
# With the calibration cases' X-rays, the distance also reads how clearly each view reads
# as given (:meth:`OrientationCheck.margins`; the calibration cases' own left out of the
# check's fit): a patient turned 5-10 degrees sits low there. The interval's width reads
# OOD_FEATURES alone.
MARGIN_FEATURES = ("pa_orientation_margin", "lateral_orientation_margin")
# The smallest scale a margin feature is given (margins are in units of the discriminants'
# within-class standard deviation; calibration cases that agree more closely than half of
# one, e.g. copies of a few pairs, would make any new pair far).
MARGIN_SCALE_FLOOR = 0.5


def conformal_quantile(residuals: Sequence[float], level: float) -> float:
    """The conformal quantile: the ``ceil((n + 1) * level)``-th smallest of ``n``
    held-out (or left-out) scores (``inf`` when that exceeds ``n``), so that a new
    exchangeable case's score is at most it with probability at least ``level`` (Vovk et
    al. 2005; Lei et al. 2018, eq. 2.2).

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


# Below this many held-out cases per distance feature the distance's covariance (15
# features) is fitted from too few cases: a stated rule of thumb, not a measurement.
CASES_PER_DISTANCE_FEATURE = 2
# The interval's half-width grows as the input's distance to the calibration cases to this
# power (normalised conformal); chosen with SCORE_FEATURES above.
SCALE_POWER = 2.0
RIDGE = 1.0


def minimum_cases(level: float = 0.9, ood_level: float = 0.95) -> int:
    """The fewest held-out cases :meth:`ReliabilityCalibration.fit` accepts: the
    leave-one-out conformal ranks must be finite at ``level`` (both ends of the interval)
    and at ``ood_level`` (the distance threshold), and the distance's covariance needs
    :data:`CASES_PER_DISTANCE_FEATURE` cases per feature (:data:`OOD_FEATURES` and
    :data:`MARGIN_FEATURES`).

    Example:
        >>> minimum_cases(0.9, 0.95)
        30
    """
    for level_ in (level, ood_level):
        if not 0.0 < level_ < 1.0:
            raise ValueError(f"levels must be in (0, 1), got {level_}")
    n = CASES_PER_DISTANCE_FEATURE * len(OOD_FEATURES + MARGIN_FEATURES)
    while not (conformal_rank(n, level) <= n and conformal_rank(n, ood_level) <= n
               and math.floor(round((n + 1) * (1 - level), 9)) >= 1):
        n += 1
    return n


@dataclass(frozen=True)
class ReliabilityCalibration:
    """Held-out cases -> score, interval and verdict thresholds; JSON, never a pickle.

    Fitted by :meth:`fit` on held-out cases, every one of which serves twice by leaving it
    out: the ridge regression of PSNR on :data:`SCORE_FEATURES` and the input distribution
    (mean, scale and shrunk covariance of :data:`OOD_FEATURES`) are fitted on all of them
    (for the point score and the distance), and once more without each case in turn, which
    gives that case's left-out prediction, distance and residual. The interval is
    jackknife+ (Barber, Candès, Ramdas & Tibshirani 2021) with residuals normalised by the
    distance to the power :data:`SCALE_POWER` (locally adaptive conformal, Lei et al.
    2018): an input far from the calibration cases gets a wider interval. The distance
    threshold is the conformal quantile of the left-out distances. ``dataset`` and
    ``case_ids`` name the cases it was fitted on, so that nobody reports its quality on
    them (:func:`cvaa.data.dataset.dataset_fingerprint`).

    Attributes:
        halfwidth: the interval's half-width at the calibration cases' median distance, dB
            (the typical one; each input's own is in its :class:`Assessment`).
        loo_models: per case, the regression fitted without it: its feature means and
            scales, coefficients and intercept, concatenated.
        loo_residuals: per case, its absolute left-out error divided by its left-out
            width distance to the power ``scale_power``.
        width_mean, width_scale, width_precision: the Gaussian of :data:`OOD_FEATURES` the
            interval's width reads (the width distance, :meth:`width_distance`), and the
            conformal quantile of its left-out values at ``ood_level``: an input beyond it
            is unlike the calibration cases whatever its orientation (the reason says so).
        ood_threshold: the Mahalanobis distance (not its square) beyond which an input is
            ``out of distribution``.
        check_psnr: the ``check_quantile`` of the calibration cases' actual PSNR, dB: an
            in-distribution input predicted below it is ``check``.
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
    loo_models: tuple[tuple[float, ...], ...]
    loo_residuals: tuple[float, ...]
    scale_power: float
    width_mean: tuple[float, ...]
    width_scale: tuple[float, ...]
    width_precision: tuple[tuple[float, ...], ...]
    width_threshold: float
    ood_features: tuple[str, ...]
    ood_mean: tuple[float, ...]
    ood_scale: tuple[float, ...]
    ood_precision: tuple[tuple[float, ...], ...]
    ood_level: float
    ood_threshold: float
    check_quantile: float
    check_psnr: float
    n_cases: int
    k: int
    dataset: str
    case_ids: tuple[str, ...]
    orientation: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, float]], psnr: Sequence[float], *,
            k: int, level: float = 0.9, ood_level: float = 0.95,
            check_quantile: float = 0.05, ridge: float = RIDGE, shrinkage: float = 0.2,
            scale_power: float = SCALE_POWER,
            score_features: Sequence[str] = SCORE_FEATURES, dataset: str = "",
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
            check_quantile: the quantile of the actual PSNR below which a prediction is
                ``check``.
            ridge: L2 penalty on the standardised coefficients.
            shrinkage: covariance shrinkage towards the identity (standardised).
            scale_power: the interval grows as the distance to this power (0: plain
                jackknife+, the same width everywhere).
            score_features: the features the PSNR regression reads.
            dataset: fingerprint of the dataset the cases come from
                (:func:`cvaa.data.dataset.dataset_fingerprint`), "" if none.
            case_ids: the cases' ids in that dataset (one per row, or none).
            xrays: the cases' ``(2, P, P)`` inputs, for the per-view orientation check
                (:class:`OrientationCheck`); ``None``: no orientation check.

        Raises:
            ValueError: fewer cases than :func:`minimum_cases` (an end of the interval or
                the distance threshold would be infinite), a non-finite feature or PSNR,
                or ``case_ids`` of another length than ``rows``.
        """
        n = len(rows)
        if n != len(psnr):
            raise ValueError(f"rows ({n}) and psnr ({len(psnr)}) differ in length")
        if case_ids and len(case_ids) != n:
            raise ValueError(f"case_ids ({len(case_ids)}) and rows ({n}) differ in length")
        need = minimum_cases(level, ood_level)
        if n < need:
            raise ValueError(
                f"need at least {need} held-out cases to calibrate at level {level} and "
                f"ood_level {ood_level}, got {n}: with fewer, an end of the conformal "
                "interval or the out-of-distribution threshold is infinite, or the "
                "distance is fitted from too few cases")
        y = np.asarray(psnr, float)
        if not np.isfinite(y).all():
            raise ValueError(f"psnr: case {int(np.argmin(np.isfinite(y)))} is not finite")

        def matrix(names):
            out = np.array([[float(row[name]) for name in names] for row in rows])
            bad = ~np.isfinite(out)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                raise ValueError(f"feature {names[j]!r} of case {int(i)} is not finite")
            return out

        score_features = tuple(score_features)
        ood_features = OOD_FEATURES
        check = None
        if xrays is not None and len(xrays):
            check, margins = OrientationCheck.fit_with_margins(xrays)
            rows = [dict(row, **dict(zip(MARGIN_FEATURES, (float(m) for m in case))))
                    for row, case in zip(rows, margins)]
            ood_features = OOD_FEATURES + MARGIN_FEATURES
        xs, xo, xw = matrix(score_features), matrix(ood_features), matrix(OOD_FEATURES)
        full = _ridge(xs, y, ridge)
        # margins are in units of the discriminants' within-class spread: finer is noise
        floor = np.array([MARGIN_SCALE_FLOOR if name in MARGIN_FEATURES else 0.0
                          for name in ood_features])
        o_mean, o_scale, precision = _gaussian(xo, shrinkage, floor)
        w_mean, w_scale, w_precision = _gaussian(xw, shrinkage)
        loo_models, residuals, distances, widths = [], [], [], []
        for i in range(n):
            keep = np.arange(n) != i
            model = _ridge(xs[keep], y[keep], ridge)
            distances.append(_distance(xo[i], *_gaussian(xo[keep], shrinkage, floor)))
            widths.append(_distance(xw[i], *_gaussian(xw[keep], shrinkage)))
            residuals.append(abs(y[i] - _predict(model, xs[i])) / _scale(widths[-1], scale_power))
            loo_models.append(model)
        threshold = conformal_quantile(distances, ood_level)
        calibration = cls(
            level=level, halfwidth=math.nan, score_features=score_features,
            score_mean=full[0], score_scale=full[1], coef=full[2], intercept=full[3],
            loo_models=tuple(m[0] + m[1] + m[2] + (m[3],) for m in loo_models),
            loo_residuals=_t(residuals), scale_power=float(scale_power),
            width_mean=_t(w_mean), width_scale=_t(w_scale),
            width_precision=tuple(_t(r) for r in w_precision),
            width_threshold=float(conformal_quantile(widths, ood_level)),
            ood_features=ood_features, ood_mean=_t(o_mean), ood_scale=_t(o_scale),
            ood_precision=tuple(_t(r) for r in precision), ood_level=ood_level,
            ood_threshold=float(threshold), check_quantile=float(check_quantile),
            check_psnr=float(np.quantile(y, check_quantile)), n_cases=n, k=int(k),
            dataset=str(dataset), case_ids=tuple(str(c) for c in case_ids),
            orientation=check.to_dict() if check is not None else {},
            info=dict(info or {}))
        typical = float(np.median(widths))
        half = [(hi - lo) / 2 for lo, hi in (calibration.interval(row, typical)
                                             for row in rows)]
        return replace(calibration, halfwidth=float(np.median(half)))

    # ------------------------------------------------------------------ use
    def score(self, row: Mapping[str, float]) -> float:
        """The reliability score (dB): the predicted PSNR."""
        return _predict((self.score_mean, self.score_scale, self.coef, self.intercept),
                        self._score_x(row))

    def interval(self, row: Mapping[str, float], distance: float) -> tuple[float, float]:
        """The jackknife+ interval at ``level`` of an input with features ``row`` at width
        distance ``distance`` (:meth:`width_distance`) from the calibration cases."""
        x = self._score_x(row)
        d = len(self.score_features)
        preds = np.array([_predict((m[:d], m[d:2 * d], m[2 * d:3 * d], m[3 * d]), x)
                          for m in self.loo_models])
        spread = np.asarray(self.loo_residuals) * _scale(distance, self.scale_power)
        n = len(preds)
        low_rank = math.floor(round((n + 1) * (1 - self.level), 9))
        return (float(np.sort(preds - spread)[low_rank - 1]),
                float(np.sort(preds + spread)[conformal_rank(n, self.level) - 1]))

    def ood_distance(self, row: Mapping[str, float]) -> float:
        """Mahalanobis distance (the square root) to the calibration cases, over
        ``ood_features`` (with the orientation margins, ``row`` must hold them:
        :meth:`assess` adds them)."""
        x = np.array([float(row[name]) for name in self.ood_features])
        return _distance(x, np.asarray(self.ood_mean), np.asarray(self.ood_scale),
                         np.asarray(self.ood_precision))

    def width_distance(self, row: Mapping[str, float]) -> float:
        """Mahalanobis distance over :data:`OOD_FEATURES`, which the interval's width
        reads."""
        x = np.array([float(row[name]) for name in OOD_FEATURES])
        return _distance(x, np.asarray(self.width_mean), np.asarray(self.width_scale),
                         np.asarray(self.width_precision))

    def assess(self, row: Mapping[str, float], xrays: np.ndarray | None = None
               ) -> Assessment:
        """Score, interval, distance and verdict of one feature dict; with the input
        ``xrays`` ``(2, P, P)``, a view whose anatomy shows it mirrored, rotated, inverted
        or in the other view's slot makes it ``out of distribution`` too, with that reason
        (given as a hint behind the distance's when the input is also far from every
        calibration case: a thorax read against lumbar views is not "upside down")."""
        problems = []
        if self.orientation:
            if xrays is None:
                raise ValueError("this calibration reads the X-rays' anatomy: pass xrays")
            check = OrientationCheck.from_dict(self.orientation)
            problems, margins = check.read(xrays)
            row = dict(row, **dict(zip(MARGIN_FEATURES, margins)))
        score = self.score(row)
        distance = self.ood_distance(row)
        width = self.width_distance(row)
        low, high = (self.interval(row, width) if math.isfinite(width)
                     else (-math.inf, math.inf))
        far = not math.isfinite(distance) or distance > self.ood_threshold
        if problems:
            # unlike the calibration cases beyond the orientation margins too: the anatomy
            # may be another one, so the reading is a hint
            far = not math.isfinite(width) or width > self.width_threshold
            reason = ("the input is unlike every case the model was calibrated on; read "
                      "against the calibration views, " if far else "") + "; ".join(problems)
            return Assessment(score, low, high, self.level, distance, self.ood_threshold,
                              "out of distribution", reason)
        if far:
            verdict = "out of distribution"
        elif score < self.check_psnr:
            verdict = "check"
        else:
            verdict = "ok"
        return Assessment(score, low, high, self.level, distance, self.ood_threshold, verdict)

    def _score_x(self, row: Mapping[str, float]) -> np.ndarray:
        return np.array([float(row[name]) for name in self.score_features])

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "ReliabilityCalibration":
        data = json.loads(text)
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"reliability calibration: unknown field(s) {unknown} (a "
                             "calibration of another cvaa: run jobs/calibrate.py again)")
        missing = sorted(n for n, f in cls.__dataclass_fields__.items()
                         if n not in data and n != "info")
        if missing:
            raise ValueError(f"reliability calibration: missing field(s) {missing} (a "
                             "calibration of an older cvaa: run jobs/calibrate.py again)")
        for key in ("score_features", "score_mean", "score_scale", "coef", "ood_features",
                    "ood_mean", "ood_scale", "case_ids", "loo_residuals"):
            data[key] = tuple(data[key])
        for key in ("ood_features", "width_mean", "width_scale"):
            data[key] = tuple(data[key])
        for key in ("ood_precision", "loo_models", "width_precision"):
            data[key] = tuple(tuple(r) for r in data[key])
        for key in ("halfwidth", "ood_threshold", "width_threshold"):
            if not math.isfinite(float(data[key])):
                raise ValueError(f"reliability calibration: {key} is {data[key]} (fitted on "
                                 "too few cases): run jobs/calibrate.py again")
        return cls(**data)


def _ridge(x: np.ndarray, y: np.ndarray, ridge: float):
    """Ridge regression on standardised features: ``(mean, scale, coef, intercept)``."""
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / scale
    coef = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return _t(mean), _t(scale), _t(coef), float(y.mean())


def _predict(model, x: np.ndarray) -> float:
    mean, scale, coef, intercept = model
    return float(((x - np.asarray(mean)) / np.asarray(scale)) @ np.asarray(coef) + intercept)


def _gaussian(x: np.ndarray, shrinkage: float, floor: np.ndarray | float = 0.0):
    """Mean, scale (at least ``floor`` per column) and the precision of the shrunk
    correlation of ``x`` ``(n, d)``."""
    mean, scale = x.mean(0), np.maximum(x.std(0), floor) + 1e-9
    z = (x - mean) / scale
    cov = (1 - shrinkage) * np.cov(z, rowvar=False) + shrinkage * np.eye(z.shape[1])
    return mean, scale, np.linalg.inv(cov)


def _distance(x: np.ndarray, mean, scale, precision) -> float:
    """Mahalanobis distance (the square root) of one feature vector."""
    return float(math.sqrt(_mahalanobis(((x - mean) / scale)[None], precision)[0]))


def _scale(distance: float, power: float) -> float:
    """How much wider than at distance 1 an input's interval is."""
    return max(distance, 1e-6) ** power


def _t(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _mahalanobis(z: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared distances of the rows of ``z``."""
    return np.einsum("ni,ij,nj->n", z, precision, z)


__all__ = ["CALIBRATION_FILE", "SCORE_FEATURES", "OOD_FEATURES", "MARGIN_FEATURES", "conformal_quantile",
           "conformal_rank", "minimum_cases", "SCALE_POWER", "ReliabilityCalibration"]
