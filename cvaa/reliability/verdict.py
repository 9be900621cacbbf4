"""The verdict on one reconstruction, what a user reads: ``ok``, ``check``,
``out of distribution`` or ``uncalibrated``, with the predicted PSNR and its interval only
where they mean something."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# ``uncalibrated``: the model has no calibration, so there is no predicted PSNR to give.
VERDICTS = ("ok", "check", "out of distribution", "uncalibrated")


@dataclass(frozen=True)
class Assessment:
    """The verdict on one reconstruction.

    Attributes:
        score: the reliability score, in dB: the PSNR the calibration predicts (NaN when
            ``uncalibrated``).
        psnr_low, psnr_high: the jackknife+ interval at ``level``, wider the further the
            input is from the calibration cases.
        ood_distance: Mahalanobis distance of the features to the calibration cases.
        ood_threshold: the distance beyond which an input is ``out of distribution`` (the
            calibration's :attr:`ReliabilityCalibration.ood_threshold`, the same quantity).
        verdict: ``out of distribution`` (distance beyond the threshold: the predicted PSNR
            means nothing then), else ``check`` (predicted PSNR below
            :attr:`ReliabilityCalibration.check_psnr`, the 5th percentile of the
            calibration cases' actual PSNR), else ``ok``; ``uncalibrated`` without a
            calibration.
        reason: why an input is ``out of distribution`` when its anatomy says so (a view
            mirrored, rotated, inverted or in the other view's slot:
            :class:`cvaa.reliability.orientation.OrientationCheck`), else "".
    """

    score: float
    psnr_low: float
    psnr_high: float
    level: float
    ood_distance: float
    ood_threshold: float
    verdict: str
    reason: str = ""

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
            why = self.reason or "the input is unlike every case the model was calibrated on"
            return (f"reliability: out of distribution; {distance}: {why}, so no PSNR "
                    "can be predicted")
        return (f"reliability: {self.verdict}; predicted PSNR {self.score:.1f} dB "
                f"({100 * self.level:.0f} % interval {self.psnr_low:.1f}-{self.psnr_high:.1f}); "
                f"{distance}")


__all__ = ["VERDICTS", "Assessment"]
