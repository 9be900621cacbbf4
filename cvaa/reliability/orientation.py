"""Is each view the view it claims to be, the right way round? A check from anatomy.

A radiograph mirrored, rotated by a multiple of 90 degrees, with its polarity inverted
(MONOCHROME1 read as MONOCHROME2), or put in the other view's slot (swapped views, the same
image twice) is a mistake of a DICOM header, a viewer export or a technologist, and the
generator turns it into a plausible-looking CT that is wrong. Such inputs are not
physical shifts: the anatomy shows them. :class:`OrientationCheck` keeps one template per
view, the mean standardised thumbnail of the calibration cases' PA and lateral, and asks
of each input view which of the eight orientations (the dihedral group of the square)
and two polarities matches its own template best, and whether the other view's template
matches it better than its own. A competing reading that the calibration cases
themselves do not rule out (their own reading wins in fewer than 95 % of them: e.g. a
nearly symmetric PA mirrored left-right) is not asked about: the anatomy cannot reveal it.

Plain torch/numpy; the templates are a few hundred floats, stored in the calibration's
JSON.
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


def thumbnail(view: np.ndarray, size: int) -> np.ndarray:
    """``(P, P)`` -> ``(size, size)`` area-averaged, zero mean, unit norm (zeros if flat)."""
    # a copy: the view may be read-only (an array a Ray task returned), which torch warns of
    x = torch.tensor(np.asarray(view), dtype=torch.float32)[None, None]
    small = F.adaptive_avg_pool2d(x, size)[0, 0].double().numpy()
    small = small - small.mean()
    norm = float(np.sqrt((small ** 2).sum()))
    return small / norm if norm > 1e-12 else np.zeros_like(small)


def readings(z: np.ndarray, own: np.ndarray, other: np.ndarray, other_view: str
             ) -> dict[str, float]:
    """How well each competing reading of a thumbnail ``z`` matches: the other view's
    template, every other orientation, and every orientation with the polarity inverted
    (correlations with the view's own template ``own``)."""
    out = {f"looks like a {other_view} view": float((z * other).sum())}
    for name, turn in ORIENTATIONS.items():
        score = float((turn(z) * own).sum())
        if name != "as given":
            out[f"looks {name}"] = score
        out[("has its polarity inverted (bone dark)" if name == "as given" else
             f"looks {name}, polarity inverted")] = -score
    return out


@dataclass(frozen=True)
class OrientationCheck:
    """Per-view anatomy templates and the competing readings each can rule out.

    Attributes:
        size: the thumbnails' side, pixels.
        templates: per view, the mean thumbnail of the calibration cases, row-major.
        checked: per view, the competing readings (:func:`readings` names) that the
            calibration cases' own reading beat in at least :data:`CHECKED_SHARE` of them.
    """

    size: int
    templates: tuple[tuple[float, ...], tuple[float, ...]]
    checked: tuple[tuple[str, ...], tuple[str, ...]]

    @classmethod
    def fit(cls, xrays: Sequence[np.ndarray], size: int = 16) -> "OrientationCheck":
        """Templates from correctly oriented pairs ``(2, P, P)`` (the calibration cases)."""
        if len(xrays) < 2:
            raise ValueError(f"need at least 2 X-ray pairs for the templates, got {len(xrays)}")
        thumbs = [[thumbnail(np.asarray(x)[v], size) for x in xrays] for v in range(2)]
        templates = [thumbnail(np.mean(t, axis=0), size) for t in thumbs]
        checked = []
        for v in range(2):
            wins: dict[str, list[bool]] = {}
            for z in thumbs[v]:
                given = float((z * templates[v]).sum())
                for name, score in readings(z, templates[v], templates[1 - v],
                                            VIEWS[1 - v]).items():
                    wins.setdefault(name, []).append(given > score)
            checked.append(tuple(n for n, w in wins.items() if np.mean(w) >= CHECKED_SHARE))
        return cls(int(size), tuple(tuple(float(a) for a in t.ravel()) for t in templates),
                   (checked[0], checked[1]))

    def template(self, v: int) -> np.ndarray:
        return np.asarray(self.templates[v]).reshape(self.size, self.size)

    def problems(self, xrays: np.ndarray) -> list[str]:
        """What is wrong with the pair's orientation, in words; empty if nothing.

        Args:
            xrays: ``(2, P, P)``, channel 0 the PA.
        """
        x = np.asarray(xrays, np.float64)
        out = []
        for v in range(2):
            z = thumbnail(x[v], self.size)
            if not np.any(z):
                out.append(f"the {VIEWS[v]} is blank")
                continue
            given = float((z * self.template(v)).sum())
            beaten = {name: score for name, score in readings(
                z, self.template(v), self.template(1 - v), VIEWS[1 - v]).items()
                if name in self.checked[v] and score > given}
            if beaten:
                out.append(f"the {VIEWS[v]} {max(beaten, key=beaten.get)}")
        return out

    def to_dict(self) -> dict:
        return {"size": self.size, "templates": [list(t) for t in self.templates],
                "checked": [list(c) for c in self.checked]}

    @classmethod
    def from_dict(cls, data: dict) -> "OrientationCheck":
        unknown = sorted(set(data) - {"size", "templates", "checked"})
        if unknown:
            raise ValueError(f"orientation check: unknown field(s) {unknown}")
        return cls(int(data["size"]), tuple(tuple(float(a) for a in t)
                                            for t in data["templates"]),
                   tuple(tuple(c) for c in data["checked"]))


__all__ = ["VIEWS", "ORIENTATIONS", "CHECKED_SHARE", "thumbnail", "readings",
           "OrientationCheck"]
