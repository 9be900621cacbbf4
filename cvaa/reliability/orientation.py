"""Is each view the view it claims to be, the right way round? A check from anatomy.

A radiograph mirrored, rotated by a multiple of 90 degrees, with its polarity inverted
(MONOCHROME1 read as MONOCHROME2), or put in the other view's slot (swapped views, the same
image twice) is a mistake of a DICOM header, a viewer export or a technologist, and the
generator turns it into a plausible-looking CT that is wrong. Such inputs are not
physical shifts: the anatomy shows them. For each view and each competing reading (the
seven other orientations of the dihedral group of the square, each polarity, and the other
view in this view's slot), :class:`OrientationCheck` fits Fisher's linear discriminant
between the calibration cases' small standardised thumbnails as given and the same
thumbnails read that wrong way; an input on the wrong side of any discriminant has that
mistake. A reading the calibration cases themselves do not rule out (each case left out of
the fit, fewer than 95 % of them on the right side: e.g. a symmetric PA mirrored) is not
asked about: the anatomy cannot reveal it.

A discriminant replaced the mean template (one correlation per reading) after measurement:
the template read 3 of 64 calibration laterals as mirrored and let 2 of 24 mirrored
laterals through, while the discriminants at 8 x 8 pixels put every calibration case (left
out) and every one of 64 held-out cases on the right side and flagged every mirror,
rotation, swap, duplicate and polarity error of them (docs/reliability-score.md).

:meth:`OrientationCheck.margins` (the smallest discriminant value per view) also measures
how clearly a view reads as given: the calibration's distance reads it, so a patient
turned 5-10 degrees, whose views read less clearly, is more often out of distribution.

Plain torch/numpy; the discriminants are a few thousand floats, stored in the
calibration's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

VIEWS = ("PA", "lateral")
# Every orientation of a square image (rows superior -> inferior as given).
ORIENTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as given": lambda a: a,
    "mirrored left-right": lambda a: a[:, ::-1],
    "upside down": lambda a: a[::-1, :],
    "rotated 180 degrees": lambda a: a[::-1, ::-1],
    "rotated 90 degrees": lambda a: np.rot90(a, 1),
    "rotated 270 degrees": lambda a: np.rot90(a, 3),
    "transposed": lambda a: a.T,
    "anti-transposed": lambda a: np.rot90(a, 2).T,
}
# A competing reading is checked only if the calibration cases' own reading beats it in at
# least this share of them (one the anatomy cannot tell apart, e.g. a nearly symmetric PA
# mirrored, is not: it would only raise false alarms).
CHECKED_SHARE = 0.95
# The margin of a view none of whose readings is checked (nothing to be unsure about).
NO_MARGIN = 10.0


def thumbnail(view: np.ndarray, size: int) -> np.ndarray:
    """``(P, P)`` -> ``(size, size)`` area-averaged, zero mean, unit norm (zeros if flat)."""
    # a copy: the view may be read-only (an array a Ray task returned), which torch warns of
    x = torch.tensor(np.asarray(view), dtype=torch.float32)[None, None]
    small = F.adaptive_avg_pool2d(x, size)[0, 0].double().numpy()
    small = small - small.mean()
    norm = float(np.sqrt((small ** 2).sum()))
    return small / norm if norm > 1e-12 else np.zeros_like(small)


def _undo(reading: str, z: np.ndarray) -> np.ndarray:
    """The thumbnail ``z`` of a view that has the mistake ``reading`` (a :func:`competing`
    name other than the other view's), put right."""
    if "polarity inverted" in reading:
        z = -z
    name = reading.removeprefix("looks ").split(",")[0]
    if name not in ORIENTATIONS:                       # the polarity alone
        return z
    back = {"rotated 90 degrees": "rotated 270 degrees",
            "rotated 270 degrees": "rotated 90 degrees"}.get(name, name)
    return np.ascontiguousarray(ORIENTATIONS[back](z))


def competing(z: np.ndarray, other: np.ndarray, other_view: str) -> dict[str, np.ndarray]:
    """Every competing reading of thumbnails ``z`` ``(n, size, size)``: what they would
    look like turned to each other orientation, with the polarity inverted (each
    orientation), and the other view's thumbnails ``other`` (the view in the wrong slot).
    An input whose thumbnail looks more like one of these than like the view as given is
    that reading's mistake."""
    out = {f"looks like a {other_view} view": other}
    for name, turn in ORIENTATIONS.items():
        turned = np.stack([np.ascontiguousarray(turn(t)) for t in z])
        if name != "as given":
            out[f"looks {name}"] = turned
        out[("has its polarity inverted (bone dark)" if name == "as given" else
             f"looks {name}, polarity inverted")] = -turned
    return out


def discriminant(given: np.ndarray, wrong: np.ndarray, shrinkage: float
                 ) -> tuple[np.ndarray, float]:
    """Fisher's linear discriminant of two sets of flattened thumbnails ``(n, d)``:
    ``(w, b)`` with ``x @ w + b`` positive on the ``given`` side, zero halfway between the
    two means, and of unit standard deviation within a set (pooled covariance shrunk
    towards a multiple of the identity by ``shrinkage``)."""
    mg, mw = given.mean(0), wrong.mean(0)
    centred = np.concatenate([given - mg, wrong - mw])
    cov = centred.T @ centred / max(len(centred) - 2, 1)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d + 1e-12) * np.eye(d)
    w = np.linalg.solve(cov, mg - mw)
    sd = float(np.sqrt(max(w @ cov @ w, 1e-24)))
    w = w / sd
    return w, float(-w @ (mg + mw) / 2)


@dataclass(frozen=True)
class OrientationCheck:
    """Per view, one linear discriminant for each competing reading it can rule out.

    Attributes:
        size: the thumbnails' side, pixels.
        checked: per view, the competing readings asked about (:func:`competing` names):
            those whose discriminant told the calibration cases from their mistaken
            reading in at least :data:`CHECKED_SHARE` of them, each case left out of its
            own fit.
        weights: per view, per checked reading, the discriminant's ``w`` (row-major
            ``size x size``) followed by its offset ``b``.
    """

    size: int
    checked: tuple[tuple[str, ...], tuple[str, ...]]
    weights: tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]

    @classmethod
    def fit(cls, xrays: Sequence[np.ndarray], size: int = 8, shrinkage: float = 0.1
            ) -> "OrientationCheck":
        """Discriminants from correctly oriented pairs ``(2, P, P)`` (the calibration
        cases) against every competing reading of them."""
        return cls.fit_with_margins(xrays, size, shrinkage)[0]

    @classmethod
    def fit_with_margins(cls, xrays: Sequence[np.ndarray], size: int = 8,
                         shrinkage: float = 0.1) -> tuple["OrientationCheck", np.ndarray]:
        """:meth:`fit`, and each case's :meth:`margins` with that case left out of the fit
        ``(n, 2)``: what a new, correctly oriented pair's margins look like."""
        if len(xrays) < 2:
            raise ValueError(f"need at least 2 X-ray pairs for the discriminants, got {len(xrays)}")
        thumbs = [np.stack([thumbnail(np.asarray(x)[v], size) for x in xrays]) for v in range(2)]
        n = len(xrays)
        readings, weights = [], []
        case_margins = np.full((n, 2), np.inf)
        for v in range(2):
            given = thumbs[v].reshape(n, -1)
            names, kept = [], []
            for name, wrong in competing(thumbs[v], thumbs[1 - v], VIEWS[1 - v]).items():
                wrong = wrong.reshape(n, -1)
                left_out = np.array([
                    given[i] @ w + b for i in range(n)
                    for w, b in [discriminant(np.delete(given, i, 0), np.delete(wrong, i, 0),
                                              shrinkage)]])
                if np.mean(left_out > 0) >= CHECKED_SHARE:
                    w, b = discriminant(given, wrong, shrinkage)
                    names.append(name)
                    kept.append(tuple(float(a) for a in w) + (b,))
                    case_margins[:, v] = np.minimum(case_margins[:, v], left_out)
            readings.append(tuple(names))
            weights.append(tuple(kept))
        case_margins[~np.isfinite(case_margins)] = NO_MARGIN
        return (cls(int(size), (readings[0], readings[1]), (weights[0], weights[1])),
                case_margins)

    def margins(self, xrays: np.ndarray) -> tuple[float, float]:
        """Per view, the smallest discriminant value over its checked readings: how
        clearly the view reads as given (below 0: a mistake; small: an unusual view,
        e.g. a patient turned; :data:`NO_MARGIN` for a view with nothing checked)."""
        return self.read(xrays)[1]

    def problems(self, xrays: np.ndarray) -> list[str]:
        """What is wrong with the pair's orientation, in words; empty if nothing
        (:meth:`read`)."""
        return self.read(xrays)[0]

    def read(self, xrays: np.ndarray) -> tuple[list[str], tuple[float, float]]:
        """:meth:`problems` and :meth:`margins` of one pair, its thumbnails made once.

        A view on the wrong side of a discriminant is named with the first mistake (most
        wrong first) whose undoing gives a view every discriminant accepts (a mirrored
        lateral mirrored back is a lateral); otherwise its anatomy fits no reading, and
        it is named as unlike the calibration cases' views (a thorax shown to a model of
        the lumbar spine is not "upside down").

        Args:
            xrays: ``(2, P, P)``, channel 0 the PA.
        """
        x = np.asarray(xrays, np.float64)
        out, margins = [], []
        for v in range(2):
            z = thumbnail(x[v], self.size)
            values = self._values(v, z)
            margins.append(min(values.values()) if values else NO_MARGIN)
            if not np.any(z):
                out.append(f"the {VIEWS[v]} is blank")
                continue
            wrong = {name: value for name, value in values.items() if value < 0}
            if not wrong:
                continue
            fits = [name for name in sorted(wrong, key=wrong.get)
                    if min((self._values(1 - v, z) if name.startswith("looks like a")
                            else self._values(v, _undo(name, z))).values(), default=1.0) > 0]
            out.append(f"the {VIEWS[v]} {fits[0]}" if fits
                       else f"the {VIEWS[v]} is unlike the calibration cases' {VIEWS[v]} "
                            "views (no orientation of it fits)")
        return out, (margins[0], margins[1])

    def _values(self, v: int, z: np.ndarray) -> dict[str, float]:
        """Each checked discriminant of view ``v`` at thumbnail ``z`` (> 0: as given)."""
        flat = z.ravel()
        return {name: float(flat @ np.asarray(wb[:-1]) + wb[-1])
                for name, wb in zip(self.checked[v], self.weights[v])}

    def to_dict(self) -> dict:
        return {"size": self.size, "checked": [list(r) for r in self.checked],
                "weights": [[list(w) for w in ws] for ws in self.weights]}

    @classmethod
    def from_dict(cls, data: dict) -> "OrientationCheck":
        unknown = sorted(set(data) - {"size", "checked", "weights"})
        if unknown:
            raise ValueError(f"orientation check: unknown field(s) {unknown} (a calibration "
                             "of an older cvaa: run jobs/calibrate.py again)")
        return cls(int(data["size"]), tuple(tuple(r) for r in data["checked"]),
                   tuple(tuple(tuple(float(a) for a in w) for w in ws)
                         for ws in data["weights"]))


__all__ = ["VIEWS", "ORIENTATIONS", "CHECKED_SHARE", "NO_MARGIN", "thumbnail", "competing",
           "discriminant", "OrientationCheck"]
