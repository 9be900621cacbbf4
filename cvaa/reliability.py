"""How far to trust one reconstruction: reprojection consistency, a per-voxel uncertainty
volume, input-statistics features, one score calibrated into a predicted PSNR with a
split-conformal interval, and a verdict (``ok`` / ``check`` / ``out of distribution``).

Everything here needs only the two X-rays and the generator (no ground truth) except
:meth:`ReliabilityCalibration.fit`, which needs held-out cases with their CT:

1. **Reprojection** (:func:`reproject`, :func:`reprojection_consistency`): PA + lateral DRRs
   of the estimated CT with the training geometry (``cfg.drr``, the crop's field of view)
   against the input X-rays: normalised cross-correlation and L1 per view, and the
   per-pixel residual. The estimate is the crop cube only, while the training DRRs see the
   whole body (``drr.source = "full"``), so even a perfect estimate leaves a residual
   outside the cube's superior-inferior range; calibration absorbs that offset.
2. **Uncertainty** (:func:`estimate_with_uncertainty`): ``K`` inputs in ONE forward pass of
   batch ``K``: the X-rays as given (sample 0, the estimate users get, unchanged) and
   ``K - 1`` test-time perturbations drawn from the train-time randomisation's ranges
   (``cfg.augment``, :func:`cvaa.data.augment.sample_params`) applied in image space
   (:func:`perturb_xrays`: a radiograph has no context CT to render again). The voxel's
   standard deviation over the ``K`` outputs is the uncertainty volume.
3. **Features and score** (:func:`features`): input statistics (per-view level and
   contrast, the PA/lateral superior-inferior profile agreement, body width ratio, the
   lateral's anterior-posterior balance), reprojection consistency and the mean
   uncertainty. :class:`ReliabilityCalibration` maps them to a score (a ridge regression
   onto PSNR, in dB), an interval with split-conformal coverage, and an out-of-distribution
   distance (Mahalanobis to the calibration cases) with a conformal threshold.

Plain torch/numpy: no Ray, no MLflow. The calibration is a JSON dataclass
(:meth:`ReliabilityCalibration.to_json`) stored next to the registered model.

Example:
    >>> rel = assess(generator, xrays, cfg, calibration, k=8)       # doctest: +SKIP
    >>> rel.assessment.verdict, rel.assessment.predicted_psnr        # doctest: +SKIP
    ('ok', 30.9)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvaa.config import Config
from cvaa.data.augment import RenderParams, _display, sample_params
from cvaa.data.drr import gaussian_blur, render_drr

# ``uncalibrated``: the model has no calibration, so there is no predicted PSNR to give.
VERDICTS = ("ok", "check", "out of distribution", "uncalibrated")
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


# --------------------------------------------------------------------------- reprojection

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


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
    return {"ncc": _ncc(xrays, drr), "l1": (drr - xrays).abs().mean(dim=(-2, -1)),
            "residual": drr - xrays}


# --------------------------------------------------------------------------- perturbations

def perturb_xrays(xrays: torch.Tensor, params: RenderParams, log_scale: float,
                  fov_mm: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One randomisation draw applied to a radiograph pair in image space.

    The train-time randomisation (:func:`cvaa.data.augment.render_context`) renders the
    context CT again; a radiograph has none, so the same draw acts on the images: the
    in-plane part of the geometry (magnification by the distances and the pitch, the
    isocentre shift, the rotation about each beam's axis), the effective energy as a
    scale of the line integral (bone contrast needs the CT and is left out), then scatter,
    dose, blur and the display exactly as there. The identity returns the input.

    Args:
        xrays: ``(2, P, P)`` in [0, 1], rows superior -> inferior.
        params: the draw.
        log_scale: ``cfg.drr.log_scale`` (image = line integral / log_scale).
        fov_mm: the field of view the detector covers at the isocentre.
        generator: seeds the Poisson noise.

    Returns:
        ``(2, P, P)`` float32 in [0, 1].
    """
    if xrays.dim() != 3 or xrays.shape[0] != 2:
        raise ValueError(f"xrays must be (2, P, P), got {tuple(xrays.shape)}")
    if params.is_identity():
        return xrays.float().clone()
    x = xrays.float()
    p = x.shape[-1]
    # The object's size on the detector scales with SID / SAD and inversely with pitch.
    scale = (params.sid_scale / params.sad_scale) / params.zoom
    dx, dy, dz = (2.0 * s / fov_mm for s in params.shift_mm)   # mm -> normalised units
    thetas = []
    # PA: columns along x (R->L), turned about y; lateral: columns along y (A->P), turned
    # about x; rows run along -z in both. affine_grid maps output to input coordinates,
    # so content moved by +d takes the offset -d.
    for angle, col, row in ((params.rotation_deg[1], dx, dz),
                            (params.rotation_deg[0], dy, dz)):
        a = math.radians(angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / scale
        thetas.append(np.concatenate([rot, np.array([[-col], [row]])], axis=1))
    theta = torch.as_tensor(np.stack(thetas), dtype=torch.float32)       # (2, 2, 3)
    grid = F.affine_grid(theta, [2, 1, p, p], align_corners=False)
    moved = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)[:, 0][None]                # (1, 2, P, P)
    line = moved * log_scale * params.mu_scale
    if params.scatter > 0 or params.photons > 0 or params.blur_px > 0:
        intensity = torch.exp(-line)
        if params.scatter > 0:
            wide = max(1.0, p / 8.0)
            intensity = (intensity + params.scatter * gaussian_blur(intensity, wide)) \
                / (1.0 + params.scatter)
        floor = 1e-6
        if params.photons > 0:
            intensity = torch.poisson(params.photons * intensity,
                                      generator=generator) / params.photons
            floor = 0.5 / params.photons
        intensity = gaussian_blur(intensity, params.blur_px)
        line = -torch.log(intensity.clamp(min=floor))
    image = _display(torch.clamp(line / log_scale, 0.0, 1.0), params)
    return image[0].float()


def sample_xrays(xrays: torch.Tensor, cfg: Config, k: int, seed: int = 0) -> torch.Tensor:
    """The X-rays as given and ``k - 1`` perturbed copies, ``(K, 2, P, P)``.

    Each copy's draw comes from ``cfg.augment``'s ranges (never the clean draw), seeded by
    ``(seed, index)`` so that an assessment is reproducible.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ranges = replace(cfg.augment, clean_fraction=0.0)
    fov_mm = cfg.preprocess.size * float(cfg.preprocess.spacing_mm)
    out = [xrays.float()]
    for index in range(1, k):
        rng = np.random.default_rng([seed, index])
        params = sample_params(ranges, rng)
        noise = torch.Generator().manual_seed(int(rng.integers(2**31)))
        out.append(perturb_xrays(xrays, params, cfg.drr.log_scale, fov_mm,
                                 generator=noise))
    return torch.stack(out)


@torch.no_grad()
def estimate_with_uncertainty(generator: nn.Module, xrays: torch.Tensor, cfg: Config,
                              k: int = 8, seed: int = 0
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate and its per-voxel uncertainty from one forward pass of batch ``k``.

    Args:
        generator: the generator (its device is used; put in eval mode for the call).
        xrays: ``(2, P, P)`` in [0, 1].
        k: forward samples: the X-rays as given plus ``k - 1`` perturbed copies.

    Returns:
        ``(estimate, uncertainty)``, each ``(1, 1, S, S, S)`` on the CPU: the output for
        the X-rays as given (what :func:`cvaa.inference.reconstruct` returns) and the
        standard deviation of the ``k`` outputs (0 for ``k = 1``), in normalised units.
    """
    device = next(generator.parameters()).device
    batch = sample_xrays(torch.as_tensor(xrays).cpu(), cfg, k, seed).to(device)
    was_training = generator.training
    generator.eval()
    try:
        out = generator(batch).float().clamp(0, 1).cpu()                 # (K, 1, S, S, S)
    finally:
        generator.train(was_training)
    spread = out.std(dim=0, keepdim=True) if k > 1 else torch.zeros_like(out[:1])
    return out[:1], spread


# --------------------------------------------------------------------------- features

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
    corr = _corr1d(rows_pa, rows_lat)

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


def _corr1d(a: torch.Tensor, b: torch.Tensor) -> float:
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


# --------------------------------------------------------------------------- calibration

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
class Assessment:
    """The verdict on one reconstruction.

    Attributes:
        score: the reliability score, in dB: the PSNR the calibration predicts (NaN when
            ``uncalibrated``).
        psnr_low, psnr_high: the split-conformal interval at ``level``.
        ood_distance: Mahalanobis distance of the features to the calibration cases.
        ood_threshold: the distance beyond which an input is ``out of distribution`` (the
            calibration's :attr:`ReliabilityCalibration.ood_threshold`, the same quantity).
        verdict: ``out of distribution`` (distance beyond the threshold: the predicted PSNR
            means nothing then), else ``check`` (predicted PSNR below
            :attr:`ReliabilityCalibration.check_psnr`, the 10th percentile of the
            calibration cases' actual PSNR), else ``ok``; ``uncalibrated`` without a
            calibration.
    """

    score: float
    psnr_low: float
    psnr_high: float
    level: float
    ood_distance: float
    ood_threshold: float
    verdict: str

    @classmethod
    def uncalibrated(cls) -> "Assessment":
        """What a model without a calibration can say: nothing about its PSNR."""
        nan = math.nan
        return cls(nan, nan, nan, nan, nan, nan, "uncalibrated")

    @property
    def predicted_psnr(self) -> float | None:
        """The predicted PSNR where it means something (``ok`` or ``check``), else None."""
        return self.score if self.verdict in ("ok", "check") else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN as None, and ``predicted_psnr`` (None unless ``ok`` / ``check``)."""
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in asdict(self).items()}
        return {**out, "predicted_psnr": self.predicted_psnr}

    def line(self) -> str:
        """One console line; no predicted PSNR where it means nothing."""
        if self.verdict == "uncalibrated":
            return ("reliability: uncalibrated (the model has no calibration: "
                    "jobs/calibrate.py); no predicted PSNR")
        distance = (f"input distance {self.ood_distance:.1f} "
                    f"(threshold {self.ood_threshold:.1f})")
        if self.verdict == "out of distribution":
            return (f"reliability: out of distribution; {distance}: the input is unlike "
                    "every case the model was calibrated on, so no PSNR can be predicted")
        return (f"reliability: {self.verdict}; predicted PSNR {self.score:.1f} dB "
                f"({100 * self.level:.0f} % interval {self.psnr_low:.1f}-{self.psnr_high:.1f}); "
                f"{distance}")


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
    info: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, float]], psnr: Sequence[float], *,
            k: int, level: float = 0.9, ood_level: float = 0.95, fit_fraction: float = 0.5,
            ridge: float = 1.0, shrinkage: float = 0.2, seed: int = 0, dataset: str = "",
            case_ids: Sequence[str] = (), info: Mapping[str, Any] | None = None
            ) -> "ReliabilityCalibration":
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
                   case_ids=tuple(str(c) for c in case_ids), info=dict(info or {}))

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

    def assess(self, row: Mapping[str, float]) -> Assessment:
        """Score, interval, distance and verdict of one feature dict."""
        score = self.score(row)
        distance = self.ood_distance(row)
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


# --------------------------------------------------------------------------- one call

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
                       calibration.assess(row) if calibration is not None
                       else Assessment.uncalibrated(), k)


def measure_cases(generator: nn.Module, cases, cfg: Config, k: int, seed: int = 0
                  ) -> tuple[list[dict[str, float]], list[float]]:
    """Features and actual PSNR of held-out cases, for :meth:`ReliabilityCalibration.fit`.

    Args:
        cases: ``(xrays (2, P, P), ct (1, S, S, S))`` pairs in [0, 1], cases the model did
            not train on.
    """
    from cvaa.metrics import psnr

    rows, values = [], []
    for xrays, ct in cases:
        rel = assess(generator, xrays, cfg, None, k=k, seed=seed)
        rows.append(rel.features)
        values.append(float(psnr(torch.from_numpy(rel.estimate)[None, None],
                                 torch.as_tensor(np.asarray(ct, np.float32))[None])))
    return rows, values


# --------------------------------------------------------------------------- attention

@torch.no_grad()
def view_attention(generator: nn.Module, xrays) -> list[np.ndarray]:
    """CVAA's view-attention weights at each decoder scale, coarsest first.

    Forward hooks on every :class:`cvaa.models.fusion.ViewAttentionAlignment` recompute
    its softmax weights from the inputs it received (the model is not changed).

    Args:
        generator: a CVAA generator (any model with VAA modules).
        xrays: ``(2, P, P)``.

    Returns:
        ``[(2, s, s, s)]``: channel 0 the PA's weight, 1 the lateral's (they sum to 1).
    """
    from cvaa.models.fusion import ViewAttentionAlignment

    found: list[np.ndarray] = []

    def hook(module, inputs, _output):
        found.append(module.weights(*inputs)[0].float().cpu().numpy())

    modules = [m for m in generator.modules() if isinstance(m, ViewAttentionAlignment)]
    if not modules:
        raise ValueError(f"{type(generator).__name__} has no view-attention modules")
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = generator.training
    generator.eval()
    try:
        x = torch.as_tensor(np.asarray(xrays, np.float32) if not torch.is_tensor(xrays)
                            else xrays).float()
        generator(x[None].to(next(generator.parameters()).device))
    finally:
        generator.train(was_training)
        for h in handles:
            h.remove()
    return found


__all__ = [
    "VERDICTS", "CALIBRATION_FILE", "SCORE_FEATURES", "OOD_FEATURES", "reproject",
    "reprojection_consistency", "perturb_xrays", "sample_xrays", "estimate_with_uncertainty",
    "input_features", "features", "body_threshold", "conformal_quantile", "conformal_rank",
    "minimum_cases", "Assessment",
    "ReliabilityCalibration", "Reliability", "assess", "measure_cases", "view_attention",
]
