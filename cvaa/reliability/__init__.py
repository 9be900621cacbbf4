"""How far to trust one reconstruction: reprojection consistency, a per-voxel uncertainty
volume, input-statistics features, one score calibrated into a predicted PSNR with a
conformal interval, and a verdict (``ok`` / ``check`` / ``out of distribution`` /
``uncalibrated``). One module per concept:

1. :mod:`~cvaa.reliability.reprojection`: PA + lateral DRRs of the estimated CT with the
   training geometry against the input X-rays (NCC and L1 per view, the residual).
2. :mod:`~cvaa.reliability.uncertainty`: ``K`` inputs in ONE forward pass of batch ``K``:
   the X-rays as given (sample 0, the estimate users get) and ``K - 1`` test-time
   perturbations drawn from the train-time randomisation's ranges, applied in image space
   (:func:`cvaa.data.augment.perturb_xrays`: a radiograph has no context CT to render
   again). The voxel's standard deviation over the ``K`` outputs is the uncertainty.
3. :mod:`~cvaa.reliability.features`: input statistics (per-view level and contrast, the
   PA/lateral superior-inferior profile agreement, body width ratio, the lateral's
   anterior-posterior balance), reprojection consistency and the mean uncertainty.
4. :mod:`~cvaa.reliability.calibration`: :class:`ReliabilityCalibration` maps the features
   to a score (a ridge regression onto PSNR, in dB), a jackknife+ interval that widens
   with the input's distance to the calibration cases, and that out-of-distribution
   distance (Mahalanobis) with a conformal threshold; it refuses too few cases.
5. :mod:`~cvaa.reliability.orientation`: is each view the view it claims to be, the right
   way round? Linear discriminants per view and mistake (fitted with the calibration) rule
   out a view
   mirrored, rotated, inverted or in the other view's slot: such an input is ``out of
   distribution`` whatever its distance.
6. :mod:`~cvaa.reliability.verdict`: :class:`Assessment`, what a user reads.
7. :mod:`~cvaa.reliability.measure`: :func:`assess`, all of it in one call.

Everything needs only the two X-rays and the generator (no ground truth) except
:meth:`ReliabilityCalibration.fit`, which needs held-out cases with their CT. Plain
torch/numpy: no Ray, no MLflow. The calibration is a JSON dataclass
(:meth:`ReliabilityCalibration.to_json`) stored next to the registered model.

Example:
    >>> rel = assess(generator, xrays, cfg, calibration, k=8)       # doctest: +SKIP
    >>> rel.assessment.verdict, rel.assessment.predicted_psnr        # doctest: +SKIP
    ('ok', 30.9)
"""

from cvaa.reliability.calibration import (CALIBRATION_FILE, OOD_FEATURES, SCALE_POWER,
                                          SCORE_FEATURES, ReliabilityCalibration,
                                          conformal_quantile, conformal_rank, minimum_cases)
from cvaa.reliability.features import body_threshold, features, input_features
from cvaa.reliability.measure import Reliability, assess, measure_cases
from cvaa.reliability.orientation import OrientationCheck
from cvaa.reliability.reprojection import reproject, reprojection_consistency
from cvaa.reliability.uncertainty import estimate_with_uncertainty, sample_xrays
from cvaa.reliability.verdict import VERDICTS, Assessment

__all__ = [
    "VERDICTS", "CALIBRATION_FILE", "SCORE_FEATURES", "OOD_FEATURES", "reproject",
    "reprojection_consistency", "sample_xrays", "estimate_with_uncertainty",
    "input_features", "features", "body_threshold", "conformal_quantile", "conformal_rank",
    "minimum_cases", "SCALE_POWER", "OrientationCheck", "Assessment", "ReliabilityCalibration", "Reliability", "assess",
    "measure_cases",
]
