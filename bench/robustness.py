"""How fast reconstruction quality falls when the X-rays drift from the fixed DRRs a model
was trained on: registered models scored on test cases whose PA + lateral pairs are
rendered again from their context CT under one perturbation at a time, at increasing
strength, plus DRRs from an independent renderer (plastimatch) in the same geometry.

    python bench/robustness.py --data PREPARED --extra-data PREPARED_REAL \\
        --model fixed=models:/robust-fixed@candidate --model randomised=models:/robust-random@candidate \\
        --mlflow-uri sqlite:///$HOME/.cvaa/mlflow.db --out docs/robustness

The perturbations (each drawn per case from a seed, so every model sees the same X-rays):

- rotation s deg: the patient turned by s degrees about a random axis through the isocentre;
- distance f: source-isocentre and source-detector distances each scaled by 1 +- f;
- LUT g: display gamma (1 + g) or 1 / (1 + g);
- unsharp a: unsharp masking of amount a (sigma 2 pixels);
- scatter s: scatter-to-primary ratio s (the primary blurred by a wide Gaussian);
- dose N: Poisson noise at N photons per pixel;
- moderate: 5 deg rotation, +-10 % distances, LUT 0.3 and scatter 0.3 at once;
- plastimatch: ``plastimatch drr`` (exact ray tracing, its own HU-to-attenuation
  conversion) of the same context CT in the same geometry, its water attenuation matched
  to ours on a water cube.

Writes ``OUT.json`` (every case's metrics), ``OUT.md`` (tables) and ``OUT.png`` (curves).
Needs the ``bench`` extra for plastimatch (``--no-plastimatch`` skips it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvaa import tracking  # noqa: E402
from cvaa.config import Config  # noqa: E402
from cvaa.data.augment import ContextCT, RenderParams, render_context, sample_seed  # noqa: E402
from cvaa.data.dataset import PreparedDataset  # noqa: E402
from cvaa.scoring import evaluate_cases  # noqa: E402

SEED = 17


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], n)


def rotation(degrees: float, rng: np.random.Generator) -> RenderParams:
    from scipy.spatial.transform import Rotation

    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    euler = Rotation.from_rotvec(axis * np.radians(degrees)).as_euler("xyz", degrees=True)
    return RenderParams(rotation_deg=tuple(float(v) for v in euler))


def distance(frac: float, rng: np.random.Generator) -> RenderParams:
    s = _signs(rng, 2)
    return RenderParams(sad_scale=1 + s[0] * frac, sid_scale=1 + s[1] * frac)


def lut(g: float, rng: np.random.Generator) -> RenderParams:
    return RenderParams(gamma=float((1 + g) ** _signs(rng, 1)[0]))


def moderate(_: float, rng: np.random.Generator) -> RenderParams:
    turned, far, shown = rotation(5.0, rng), distance(0.1, rng), lut(0.3, rng)
    return replace(turned, sad_scale=far.sad_scale, sid_scale=far.sid_scale,
                   gamma=shown.gamma, scatter=0.3)


# family -> (x-axis label, strengths, params of a strength); strength 0 is the clean DRR
SUITE = {
    "rotation": ("degrees", (2.0, 5.0, 10.0), rotation),
    "distance": ("fraction", (0.05, 0.1, 0.2), distance),
    "LUT": ("gamma - 1", (0.15, 0.3, 0.6), lut),
    "unsharp": ("amount", (0.5, 1.0, 2.0),
                lambda a, rng: RenderParams(unsharp_amount=a, unsharp_sigma_px=2.0)),
    "scatter": ("scatter / primary", (0.1, 0.3, 0.6),
                lambda s, rng: RenderParams(scatter=s)),
    "dose": ("photons per pixel", (2e4, 5e3, 1e3),
             lambda n, rng: RenderParams(photons=n)),
    "moderate": ("", (1.0,), moderate),
}


# --------------------------------------------------------------------------- plastimatch

def _read_pfm(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        f.readline()
        width, height = map(int, f.readline().split())
        scale = float(f.readline())
        return np.fromfile(f, "<f4" if scale < 0 else ">f4").reshape(height, width)


class Plastimatch:
    """PA + lateral DRRs from ``plastimatch drr`` in our geometry (isocentre, distances,
    detector), normalised with our fixed ``log_scale``. The views' normal vectors and the
    left-right flip of its output were found on an asymmetric phantom at a strongly
    perspective geometry (correlation 0.999 with ours); the scale of its attenuation is
    set so that water matches ours (its HU-to-attenuation curve is its own)."""

    def __init__(self, cfg: Config):
        self.exe = shutil.which("plastimatch")
        if not self.exe:
            raise RuntimeError("plastimatch not found: pip install -e '.[bench]' (or pass "
                               "--no-plastimatch)")
        self.drr = cfg.drr
        self.tmp = Path(tempfile.mkdtemp(prefix="cvaa-plastimatch-"))
        self.water_scale = self._calibrate()

    def _run(self, hu: np.ndarray, spacing, iso_dhw, pixels: int, pitch: float) -> np.ndarray:
        import SimpleITK as sitk

        # identity direction with z up: the canonical D axis (S->I) reversed
        image = sitk.GetImageFromArray(np.ascontiguousarray(hu[::-1]).astype(np.int16))
        image.SetSpacing(tuple(float(s) for s in spacing))
        d, h, w = iso_dhw
        n_d = hu.shape[0]
        sx, sy, sz = spacing
        image.SetOrigin((-w * sx, -h * sy, -((n_d - 1) - d) * sz))   # isocentre at 0
        path = self.tmp / "volume.mha"
        sitk.WriteImage(image, str(path))
        out = []
        for view, normal in (("pa", "0 1 0"), ("lateral", "-1 0 0")):
            subprocess.run([self.exe, "drr", "-t", "pfm", "-r", f"{pixels} {pixels}",
                            "-z", f"{pixels * pitch} {pixels * pitch}",
                            "--sad", str(self.drr.sad_mm), "--sid", str(self.drr.sid_mm),
                            "-o", "0 0 0", "-n", normal, "--vup", "0 0 1",
                            "-P", "preprocess", "-i", "exact",
                            "-O", str(self.tmp / f"{view}_"), str(path)],
                           check=True, capture_output=True)
            out.append(_read_pfm(self.tmp / f"{view}_0000.pfm")[:, ::-1])
        return np.stack(out)

    def _calibrate(self) -> float:
        """Our line integral over plastimatch's for the central ray through 64 mm of water."""
        hu = np.full((48, 48, 48), -1000, np.int16)
        hu[16:32, 16:32, 16:32] = 0
        lines = self._run(hu, (4.0, 4.0, 4.0), (23.5, 23.5, 23.5), 9, 4.0)
        return self.drr.mu_water_per_mm * 64.0 / float(lines[0, 4, 4])

    def render(self, context: ContextCT) -> np.ndarray:
        pixels = self.drr.detector_pixels
        pitch = self.drr.pixel_pitch_mm or (context.fov_mm * self.drr.sid_mm
                                            / self.drr.sad_mm / pixels)
        lines = self._run(context.hu, context.spacing_mm, context.isocenter_index, pixels,
                          pitch)
        return np.clip(lines * self.water_scale / self.drr.log_scale, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- scoring

def settings(plastimatch: bool) -> list[tuple[str, float]]:
    out = [("clean", 0.0)]
    out += [(family, s) for family, (_, strengths, _) in SUITE.items() for s in strengths]
    return out + ([("plastimatch", 0.0)] if plastimatch else [])


def render_setting(family: str, strength: float, case_id: str, context: ContextCT,
                   fixed: np.ndarray, cfg: Config, pm: Plastimatch | None) -> np.ndarray:
    if family == "clean":
        return fixed
    if family == "plastimatch":
        return pm.render(context)
    index = list(SUITE).index(family)
    rng = np.random.default_rng(sample_seed(SEED, index, case_id))
    params = SUITE[family][2](strength, rng)
    generator = torch.Generator().manual_seed(sample_seed(SEED, -1, case_id))
    return render_context(context, replace(cfg.drr, photons=0.0), params,
                          bone_hu=cfg.augment.bone_hu, generator=generator)


def score(models: dict, dataset: PreparedDataset, case_ids: list[str], cfg: Config,
          pm: Plastimatch | None, log=print) -> dict:
    """``{setting: {model: [per-case metrics]}}`` with setting ``family@strength``."""
    inputs: dict[str, list] = {}
    tick = time.perf_counter()
    for case_id in case_ids:
        fixed, ct = dataset.arrays(case_id)
        context = dataset.context(case_id)
        for family, strength in settings(pm is not None):
            xrays = render_setting(family, strength, case_id, context, fixed, cfg, pm)
            inputs.setdefault(f"{family}@{strength:g}", []).append(
                (torch.from_numpy(np.ascontiguousarray(xrays)), torch.from_numpy(ct)))
    log(f"  rendered {len(inputs)} settings x {len(case_ids)} cases in "
        f"{time.perf_counter() - tick:.0f} s")
    out: dict = {}
    for setting, items in inputs.items():
        out[setting] = {label: evaluate_cases(model.generator, items, batch_size=4)
                        for label, model in models.items()}
    return out


def summarise(results: dict) -> dict:
    """``{setting: {model: {"psnr", "ssim", "d_psnr"}}}``: means, and the PSNR change
    against the clean DRRs."""
    out: dict = {}
    for setting, per_model in results.items():
        out[setting] = {}
        for label, cases in per_model.items():
            psnr = float(np.mean([c["psnr"] for c in cases]))
            clean = float(np.mean([c["psnr"] for c in results["clean@0"][label]]))
            out[setting][label] = {"psnr": psnr,
                                   "ssim": float(np.mean([c["ssim"] for c in cases])),
                                   "d_psnr": psnr - clean}
    return out


def markdown(summary: dict, title: str) -> str:
    labels = list(next(iter(summary.values())))
    head = "| X-rays | " + " | ".join(f"{m} PSNR (dB) | {m} SSIM | {m} dPSNR" for m in labels)
    lines = [f"**{title}**", "", head + " |",
             "|---|" + "---:|---:|---:|" * len(labels)]
    for setting, per_model in summary.items():
        family, strength = setting.split("@")
        name = family if family in ("clean", "plastimatch", "moderate") else \
            f"{family} {strength}"
        cells = " | ".join(f"{v['psnr']:.2f} | {v['ssim']:.4f} | {v['d_psnr']:+.2f}"
                           for v in per_model.values())
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def plot(summaries: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in SUITE if f != "moderate"]
    fig, grid = plt.subplots(2, (len(families) + 1) // 2, figsize=(11, 6.4), sharey=True)
    axes = grid.ravel()
    styles = ["-", "--", ":"]
    for ax, family in zip(axes, families):
        label_x, strengths, _ = SUITE[family]
        xs = [0.0, *strengths] if family != "dose" else [1e6, *strengths]
        for k, (title, summary) in enumerate(summaries.items()):
            for model, colour in zip(next(iter(summary.values())), ("C0", "C1", "C2", "C3")):
                ys = [summary["clean@0"][model]["psnr"]] + [
                    summary[f"{family}@{s:g}"][model]["psnr"] for s in strengths]
                ax.plot(xs, ys, styles[k % 3], color=colour, marker="o", ms=3,
                        label=f"{model} ({title})")
        if family == "dose":
            ax.set_xscale("log")
            ax.invert_xaxis()
        ax.set_title(family)
        ax.set_xlabel(label_x + (" (clean: none)" if family == "dose" else ""))
        ax.grid(alpha=0.3)
    for row in grid:
        row[0].set_ylabel("PSNR (dB)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset (its test split)")
    p.add_argument("--extra-data", help="a second prepared dataset, all of its cases "
                                        "(e.g. the real CTs)")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=URI")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--out", default="docs/robustness_results")
    p.add_argument("--no-plastimatch", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    uri = args.mlflow_uri or tracking.default_tracking_uri()
    models = {}
    for item in args.model:
        label, _, model_uri = item.partition("=")
        models[label] = tracking.load_model(model_uri, uri)
        print(f"[robustness] {label}: {models[label].label}")
    datasets = {"test split": (PreparedDataset(args.data), "test")}
    if args.extra_data:
        datasets["real CTs"] = (PreparedDataset(args.extra_data), "all")
    first = next(iter(datasets.values()))[0]
    cfg = Config.from_dict(first.config)
    pm = None if args.no_plastimatch else Plastimatch(cfg)
    if pm:
        print(f"[robustness] plastimatch water scale {pm.water_scale:.4f}")
    raw, summaries = {}, {}
    for title, (dataset, split) in datasets.items():
        case_ids = dataset.split(split)
        print(f"[robustness] {title}: {len(case_ids)} cases from {dataset.root}")
        raw[title] = score(models, dataset, case_ids, cfg, pm,
                           log=lambda line: print(f"[robustness] {line}"))
        summaries[title] = summarise(raw[title])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"models": {k: m.label for k, m in models.items()}, "summary": summaries,
         "per_case": raw}, indent=1))
    text = "\n\n".join(markdown(s, t) for t, s in summaries.items())
    out.with_suffix(".md").write_text(text + "\n")
    plot(summaries, out.with_suffix(".png"))
    print(text)
    print(f"[robustness] wrote {out.with_suffix('.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
