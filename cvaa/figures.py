"""Slice figures: mid-axial / mid-sagittal / mid-coronal (paper Fig. 2), as PNG bytes.

Display follows the radiological convention of the volume axes (``(D, H, W)`` = S->I,
A->P, R->L): axial slices with anterior up and the patient's right on the viewer's left,
sagittal with anterior on the left, coronal with the patient's right on the left.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

PLANES = ("axial", "sagittal", "coronal")


def mid_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The three mid-plane slices of a ``(D, H, W)`` (or ``(1, D, H, W)``) volume."""
    v = np.asarray(volume, np.float32)
    v = v[0] if v.ndim == 4 else v
    d, h, w = v.shape
    return {"axial": v[d // 2], "sagittal": v[:, :, w // 2], "coronal": v[:, h // 2, :]}


def slice_grid(columns: Mapping[str, Sequence[np.ndarray]], row_labels: Sequence[str] = (),
               title: str = "", vmin: float = 0.0, vmax: float = 0.45) -> bytes:
    """A PNG with one column per entry of ``columns`` (e.g. models, then ground truth) and
    three rows (axial, sagittal, coronal) per case.

    Args:
        columns: ``{label: [volume_case0, volume_case1, ...]}``, volumes ``(D, H, W)`` in
            [0, 1] (normalised HU). Every column has the same number of cases.
        row_labels: one label per case (e.g. the case id).
        vmin, vmax: display window in normalised units (0.45 ~ 1300 HU: bone visible,
            soft tissue distinguishable).
    """
    plt = _pyplot()

    labels = list(columns)
    n_cases = len(next(iter(columns.values())))
    if any(len(v) != n_cases for v in columns.values()):
        raise ValueError("columns: every column needs the same number of cases")
    rows = n_cases * len(PLANES)
    fig, axes = plt.subplots(rows, len(labels), figsize=(1.9 * len(labels), 1.9 * rows),
                             squeeze=False)
    for j, label in enumerate(labels):
        for c, volume in enumerate(columns[label]):
            for p, (plane, image) in enumerate(mid_slices(volume).items()):
                ax = axes[c * len(PLANES) + p, j]
                ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0 and p == 0:
                    ax.set_title(label, fontsize=9)
                if j == 0:
                    case = f"{row_labels[c]}\n" if c < len(row_labels) else ""
                    ax.set_ylabel(f"{case}{plane}", fontsize=7)
    return _finish(fig, title)


def reliability_grid(estimate: np.ndarray, uncertainty: np.ndarray,
                     truth: np.ndarray | None = None, title: str = "",
                     vmax: float = 0.45) -> bytes:
    """Mid-slices of the estimate, its absolute error (with the ground truth) and its
    per-voxel uncertainty side by side: one row per plane.

    Args:
        estimate, uncertainty, truth: ``(D, H, W)`` in normalised units.
        vmax: display maximum of the estimate; error and uncertainty share a window (the
            error's 99th percentile) so that their magnitudes compare.
    """
    plt = _pyplot()

    columns = {"estimate": mid_slices(estimate)}
    top = float(np.percentile(np.asarray(uncertainty), 99))
    if truth is not None:
        error = np.abs(np.asarray(estimate, np.float32) - np.asarray(truth, np.float32))
        columns["|error|"] = mid_slices(error)
        top = max(top, float(np.percentile(error, 99)))
    columns["uncertainty (std)"] = mid_slices(uncertainty)
    top = max(top, 1e-6)
    fig, axes = plt.subplots(len(PLANES), len(columns),
                             figsize=(2.2 * len(columns), 2.0 * len(PLANES)), squeeze=False)
    for j, (label, planes) in enumerate(columns.items()):
        for i, plane in enumerate(PLANES):
            ax = axes[i, j]
            shown = ax.imshow(planes[plane], cmap="gray" if j == 0 else "magma", vmin=0.0,
                              vmax=vmax if j == 0 else top, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(plane, fontsize=8)
        if j > 0:
            fig.colorbar(shown, ax=axes[-1, j], orientation="horizontal", fraction=0.08)
    return _finish(fig, title)


def attention_grid(maps: Sequence[np.ndarray], title: str = "") -> bytes:
    """CVAA's view attention: the PA's weight (1 - the lateral's) at every decoder scale,
    mid-slices, one column per scale (coarsest first).

    Args:
        maps: ``[(2, s, s, s)]`` softmax weights, channel 0 PA, 1 lateral.
    """
    plt = _pyplot()

    fig, axes = plt.subplots(len(PLANES), len(maps), figsize=(2.1 * len(maps), 2.0 * 3),
                             squeeze=False)
    for j, weights in enumerate(maps):
        for i, (plane, image) in enumerate(mid_slices(np.asarray(weights)[0]).items()):
            ax = axes[i, j]
            shown = ax.imshow(image, cmap="coolwarm", vmin=0.0, vmax=1.0,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"scale {weights.shape[-1]}^3", fontsize=9)
            if j == 0:
                ax.set_ylabel(plane, fontsize=8)
    fig.colorbar(shown, ax=axes[-1, -1], orientation="horizontal", fraction=0.08,
                 label="PA weight (red: PA, blue: lateral)")
    return _finish(fig, title)


def reprojection_png(xrays: np.ndarray, drr: np.ndarray, title: str = "") -> bytes:
    """Input X-rays, DRRs of the estimate and their residual (``drr - xrays``), one row
    per view (PA, lateral).

    Args:
        xrays, drr: ``(2, P, P)`` in [0, 1].
    """
    plt = _pyplot()

    xrays, drr = np.asarray(xrays), np.asarray(drr)
    residual = drr - xrays
    top = max(float(np.abs(residual).max()), 1e-6)
    fig, axes = plt.subplots(2, 3, figsize=(6.6, 4.6), squeeze=False)
    for i, view in enumerate(("PA", "lateral")):
        vmax = max(float(xrays[i].max()), float(drr[i].max()), 1e-6)
        for j, (label, image, cmap, lo, hi) in enumerate((
                ("input", xrays[i], "gray", 0.0, vmax), ("DRR of the estimate", drr[i], "gray",
                                                         0.0, vmax),
                ("residual", residual[i], "coolwarm", -top, top))):
            ax = axes[i, j]
            shown = ax.imshow(image, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(view, fontsize=8)
    fig.colorbar(shown, ax=axes[-1, -1], orientation="horizontal", fraction=0.08)
    return _finish(fig, title)


def calibration_png(score: Sequence[float], low: Sequence[float], high: Sequence[float],
                    actual: Sequence[float], title: str = "") -> bytes:
    """Predicted PSNR (the reliability score) with its interval against the actual PSNR."""
    plt = _pyplot()

    score, actual = np.asarray(score, float), np.asarray(actual, float)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.errorbar(score, actual, xerr=[score - np.asarray(low), np.asarray(high) - score],
                fmt="o", ms=4, alpha=0.8)
    lo, hi = float(min(score.min(), actual.min())) - 1, float(max(score.max(), actual.max())) + 1
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("predicted PSNR (dB), with interval")
    ax.set_ylabel("actual PSNR (dB)")
    return _finish(fig, title)


def curves_png(history: Mapping[str, Sequence[float]], title: str = "") -> bytes:
    """Line plots of per-epoch series, one panel per series."""
    plt = _pyplot()

    names = list(history)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(range(1, len(history[name]) + 1), history[name], marker=".")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    return _finish(fig, title)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, title: str) -> bytes:
    """Title, layout, PNG bytes; the figure is closed."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()
