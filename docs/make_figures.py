"""Make the pictures in docs/: a phantom beside the real lumbar CT, slices and DRRs.

    python docs/make_figures.py                      # writes docs/phantom_vs_real.png
    python docs/make_figures.py --seed 5 --implants  # another phantom

Both volumes go through the same chain (``prepare_ct`` at the paper preset: 2 mm, 128^3;
DRRs rendered from the whole resampled CT, isocentre at the crop centre). Slices use a
bone-and-soft-tissue window; the DRRs are the renderer's output on its fixed [0, 1] scale
(white = more attenuation), all shown with one display window so the two cases compare in
absolute terms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cvaa.config import load_config  # noqa: E402
from cvaa.data.drr import render_prepared  # noqa: E402
from cvaa.data.io import read_ct  # noqa: E402
from cvaa.data.phantom import generate_phantom, phantom_shape  # noqa: E402
from cvaa.data.preprocess import prepare_ct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "ct" / "abdomen_lumbar_3mm.nii.gz"
WINDOW_HU = (-350.0, 1250.0)
# One display window for every DRR panel (values are on the renderer's fixed scale), so
# the phantom and the real CT compare in absolute terms.
DRR_WINDOW = (0.0, 0.75)


def spine_planes(cube_hu: np.ndarray, spacing_mm: float) -> tuple[int, int]:
    """``(w, h)`` indices of the sagittal plane through the spine (the mean W of dense bone
    in the middle half of the slices) and of the coronal plane through the vertebral
    bodies (the most anterior dense bone there, plus half a body depth, ~16 mm)."""
    d, h, w = cube_hu.shape
    bone = cube_hu[d // 4: 3 * d // 4] > 250                               # (d/2, H, W)
    cols = np.nonzero(bone.any(axis=(0, 1)))[0]
    w_spine = int(round(np.nonzero(bone)[2].mean())) if cols.size else w // 2
    mid = bone[:, :, max(0, w_spine - 4): w_spine + 4]
    rows = np.nonzero(mid.any(axis=(0, 2)))[0]
    h_body = int(rows.min() + round(16.0 / spacing_mm)) if rows.size else h // 2
    return w_spine, h_body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--implants", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--real", default=str(REAL_CT))
    ap.add_argument("--out", default=str(ROOT / "docs" / "phantom_vs_real.png"))
    args = ap.parse_args()

    cfg = load_config("paper")
    cases = {
        f"phantom (seed {args.seed}{', implants' if args.implants else ''})":
            generate_phantom(args.seed, implants=args.implants,
                             shape=phantom_shape(cfg.preprocess.size,
                                                 cfg.preprocess.spacing_mm)).volume,
        "real CT (abdomen_lumbar_3mm)": read_ct(args.real),
    }
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.4))
    for row, (name, volume) in enumerate(cases.items()):
        prep = prepare_ct(volume, cfg.preprocess)
        xray = render_prepared(prep, cfg)                       # (2, P, P) in [0, 1]
        cube = prep.cube.array                                  # (D, H, W) HU
        w_sag, h_cor = spine_planes(cube, prep.cube.spacing_mm[0])
        panels = [
            (cube[:, :, w_sag], f"sagittal through the spine (w={w_sag}; anterior left)",
             WINDOW_HU),
            (cube[:, h_cor, :], f"coronal through the bodies (h={h_cor}; "
                                "patient right on the left)", WINDOW_HU),
            (xray[0], f"PA DRR (range {xray[0].min():.2f}..{xray[0].max():.2f})",
             DRR_WINDOW),
            (xray[1], f"lateral DRR (range {xray[1].min():.2f}..{xray[1].max():.2f})",
             DRR_WINDOW),
        ]
        for col, (image, title, (lo, hi)) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=11)
    fig.suptitle("Synthetic lumbar phantom vs real CT after prepare_ct (2 mm, 128³, 256 mm "
                 "FOV); DRRs: SAD 1000 mm, SID 1500 mm, fixed log scale "
                 f"{cfg.drr.log_scale:g}", fontsize=11)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
