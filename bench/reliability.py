"""How far each reconstruction can be trusted, measured: the reliability score against the
actual PSNR, the split-conformal interval's coverage, out-of-distribution detection, and
the per-voxel uncertainty against the per-voxel error (cvaa/reliability/); with
--verdicts, the verdicts per input family and strength and the coverage among ``ok``.

    python bench/reliability.py --data PREPARED --calib-data PREPARED_HELD_OUT \\
        --extra-data PREPARED_REAL --model s0=models:/rel-s0@candidate \\
        --model s1=models:/rel-s1@candidate --mlflow-uri sqlite:///$HOME/.cvaa/mlflow.db \\
        --out docs/reliability_results

For every model: the calibration is fitted on ``--calib-data`` (held-out cases none of the
models trained on: phantoms of another data seed), then applied to the test split of
``--data`` and to every case of ``--extra-data`` (the real CTs):

- score vs actual PSNR (Spearman), the interval's coverage, the verdicts;
- AUROC of the out-of-distribution distance, clean test X-rays against each shift of
  bench/robustness.py (rendered the same way, from the same seed), swapped PA/lateral, a
  left-right flipped lateral, and inputs that are not chest/spine radiographs: an MR slice
  pair (through :func:`cvaa.inference.prepare_xrays`, as a user's two images would go),
  a constant pair and noise (each with the clean case's mean and contrast per view);
- per-voxel Spearman correlation of the uncertainty with the absolute error, for the
  test-time sampling (K = --k) and for the disagreement of the models (an ensemble of
  the ``--model`` generators);
- the cost of reconstruction with reliability against one plain reconstruction.

Writes ``OUT.json`` (every case), ``OUT.md`` (tables) and ``OUT.png`` (calibration plot,
distances per input, uncertainty vs error).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cvaa import reliability, tracking  # noqa: E402
from cvaa.config import Config  # noqa: E402
from cvaa.data.dataset import PreparedDataset  # noqa: E402
from cvaa.inference import fit_detector, prepare_xrays, reconstruct  # noqa: E402
from cvaa.metrics import psnr  # noqa: E402
from cvaa.models.fusion import view_attention  # noqa: E402
from robustness import render_setting  # noqa: E402

SHIFTS = [("rotation", 10.0), ("distance", 0.1), ("LUT", 0.3), ("scatter", 0.3),
          ("dose", 5e3), ("moderate", 1.0)]
ALTERED = ["swapped views", "flipped lateral"]
FOREIGN = ["MR slice pair", "constant", "noise"]


def auroc(negatives, positives) -> float:
    """P(a positive's score > a negative's), ties counted half (Mann-Whitney)."""
    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(neg) * len(pos)))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def mr_pairs(path: str, n: int, cfg: Config) -> list[np.ndarray]:
    """``n`` coronal + sagittal MR slice pairs (different positions) as model inputs."""
    import SimpleITK as sitk

    # read as it is: cvaa.data.io.read_ct rightly refuses an MR as a CT
    array = sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32)  # (z, y, x)
    pixels = cfg.drr.detector_pixels
    out = []
    for t in np.linspace(0.3, 0.7, n):
        coronal = array[:, int(t * (array.shape[1] - 1)), :][::-1]        # rows S -> I
        sagittal = array[:, :, int(t * (array.shape[2] - 1))][::-1]
        out.append(prepare_xrays(fit_detector(coronal, pixels), fit_detector(sagittal, pixels),
                                 cfg, names=("MR coronal", "MR sagittal")))
    return out


def foreign_input(kind: str, clean: np.ndarray, index: int, mr: list[np.ndarray]) -> np.ndarray:
    if kind == "MR slice pair":
        return mr[index % len(mr)]
    mean = clean.mean(axis=(1, 2), keepdims=True)
    if kind == "constant":
        return np.broadcast_to(mean, clean.shape).astype(np.float32).copy()
    std = clean.std(axis=(1, 2), keepdims=True)
    rng = np.random.default_rng(1000 + index)
    return np.clip(mean + std * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)


# Mistakes of a DICOM header, a viewer export or a technologist: every orientation error
# of either view, the views swapped, the same image as both views, polarity inverted.
TURNS = {"mirrored": lambda a: a[:, ::-1], "rotated 90": lambda a: np.rot90(a, 1),
         "rotated 180": lambda a: np.rot90(a, 2), "rotated 270": lambda a: np.rot90(a, 3)}
ORIENTATION_ERRORS = [f"{view} {turn}" for view in ("PA", "lateral") for turn in TURNS] + \
    ["swapped views", "PA twice", "lateral twice", "polarity inverted"]
# Physical shifts of bench/robustness.py at several strengths.
SHIFT_LADDER = [("rotation", 2.0), ("rotation", 5.0), ("rotation", 10.0), ("distance", 0.05),
                ("distance", 0.1), ("distance", 0.2), ("LUT", 0.15), ("LUT", 0.3),
                ("scatter", 0.1), ("scatter", 0.3), ("dose", 2e4), ("dose", 5e3),
                ("dose", 1e3)]
SHIFT_NAMES = [f"{family} {strength:g}" for family, strength in SHIFT_LADDER]
# Every input family of --verdicts, in the order the tables give them.
FAMILIES = ["clean", *ORIENTATION_ERRORS, *SHIFT_NAMES, *FOREIGN]


def altered_input(kind: str, clean: np.ndarray) -> np.ndarray:
    """``clean`` (2, P, P) with one of :data:`ORIENTATION_ERRORS` (or the older name
    ``flipped lateral``: the lateral mirrored)."""
    if kind == "swapped views":
        out = clean[::-1]
    elif kind in ("PA twice", "lateral twice"):
        out = np.stack([clean[int(kind.startswith("lateral"))]] * 2)
    elif kind == "polarity inverted":
        out = 1.0 - clean
    else:
        view, _, turn = ("lateral mirrored" if kind == "flipped lateral" else kind).partition(" ")
        v = ("PA", "lateral").index(view)
        out = clean.copy()
        out[v] = TURNS[turn](clean[v])
    return np.ascontiguousarray(out, dtype=np.float32)


def voxel_corr(uncertainty: np.ndarray, error: np.ndarray, mask: np.ndarray) -> float:
    return spearman(uncertainty[mask], error[mask])


def run_model(label: str, model, data: PreparedDataset, calib: PreparedDataset,
              extra: PreparedDataset | None, mr_path: str, k: int, log) -> dict:
    cfg = Config.from_dict(model.config)
    g = model.generator.eval()
    torch.manual_seed(0)
    out: dict = {"label": model.label}

    def case_row(xrays: np.ndarray, ct: np.ndarray | None) -> dict:
        rel = reliability.assess(g, xrays, cfg, None, k=k)
        row = {"features": rel.features}
        if ct is not None:
            row["psnr"] = float(psnr(torch.from_numpy(rel.estimate)[None, None],
                                     torch.from_numpy(ct[None])))
        return row, rel

    tick = time.perf_counter()
    rows = []
    for case_id in calib.split("all"):
        xrays, ct = calib.arrays(case_id)
        rows.append(case_row(xrays, ct)[0])
    cal = reliability.ReliabilityCalibration.fit(
        [r["features"] for r in rows], [r["psnr"] for r in rows], k=k,
        info={"calibration_cases": len(rows), "calibration_data": calib.root})
    out["calibration"] = json.loads(cal.to_json())
    out["calibration_rows"] = rows
    log(f"{label}: calibrated on {len(rows)} held-out cases in "
        f"{time.perf_counter() - tick:.0f} s (half-width {cal.halfwidth:.2f} dB, "
        f"check below {cal.check_psnr:.2f} dB)")

    mr = mr_pairs(mr_path, 8, cfg)
    settings: dict[str, list] = {}
    estimates, truths, times_plain, times_rel = {}, {}, [], []
    test_ids = data.split("test")
    for i, case_id in enumerate(test_ids):
        fixed, ct = data.arrays(case_id)
        context = data.context(case_id)
        start = time.perf_counter()
        reconstruct(g, fixed)
        times_plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        reliability.assess(g, fixed, cfg, cal, k=k)
        times_rel.append(time.perf_counter() - start)
        row, rel = case_row(fixed, ct)
        row["case_id"] = case_id
        mask = (ct[0] > reliability.body_threshold(cfg)) | \
            (rel.estimate > reliability.body_threshold(cfg))
        error = np.abs(rel.estimate - ct[0])
        row["voxel_corr_tta"] = voxel_corr(rel.uncertainty, error, mask)
        row["voxel_corr_tta_all"] = spearman(rel.uncertainty.ravel(), error.ravel())
        estimates[case_id], truths[case_id] = rel.estimate, ct[0]
        settings.setdefault("clean", []).append(row)
        for family, strength in SHIFTS:
            xrays = render_setting(family, strength, case_id, context, fixed, cfg, None)
            row = case_row(xrays, ct)[0]
            settings.setdefault(f"{family} {strength:g}", []).append(row)
        for kind in ALTERED:
            settings.setdefault(kind, []).append(case_row(altered_input(kind, fixed), ct)[0])
        for kind in FOREIGN:
            settings.setdefault(kind, []).append(
                case_row(foreign_input(kind, fixed, i, mr), None)[0])
    if extra is not None:
        for case_id in extra.split("all"):
            xrays, ct = extra.arrays(case_id)
            row = case_row(xrays, ct)[0]
            row["case_id"] = case_id
            settings.setdefault("real CTs", []).append(row)
    for items in settings.values():
        for row in items:
            row["assessment"] = cal.assess(row["features"]).to_dict()
    out["settings"] = settings
    out["estimates"], out["truths"] = estimates, truths
    out["seconds_plain"], out["seconds_reliability"] = times_plain, times_rel
    log(f"{label}: {len(test_ids)} test cases x {len(settings) - 1} inputs scored")
    return out


def measure_operating_point(model, calib: PreparedDataset, held: PreparedDataset, cases: int,
                            mr_path: str, k: int, folder: Path, log,
                            extra: PreparedDataset | None = None,
                            only: set[str] | None = None) -> Path:
    """Measure what the verdicts need, once: every calibration case of ``calib`` and, for
    ``cases`` cases of ``held`` (a data seed neither the model nor the calibration saw),
    every input family and strength, each input's features, X-rays and actual PSNR (none
    for non-radiographs); with ``extra``, its cases (real CTs) as one more family.
    Written to ``folder`` case by case (a stopped run resumes where it stopped, and a
    family added later is measured alone into the kept cases), so that
    :func:`operating_point` can refit and judge them with the current code in seconds.
    ``only``: measure these families alone (e.g. clean and the physical shifts, what
    :func:`select_settings` needs)."""
    cfg = Config.from_dict(model.config)
    g = model.generator.eval()
    folder.mkdir(parents=True, exist_ok=True)
    header = {"model": model.label, "k": k, "calibration_data": calib.root,
              "calibration_dataset": calib.fingerprint, "held_out": held.root}
    head = folder / "measurements.json"
    if head.is_file() and json.loads(head.read_text()) != header:
        raise SystemExit(f"{folder} holds measurements of another model, K or data: "
                         "choose another --cache")
    head.write_text(json.dumps(header, indent=1))

    def measure(name: str, inputs: dict) -> None:
        rows, arrays = {}, {}
        if (folder / f"{name}.json").is_file():        # kept: add what it lacked
            rows, arrays = read_measurements(folder, name)
            arrays = {key: value.astype(np.float16) for key, value in arrays.items()}
        for key, (x, truth) in inputs.items():
            rel = reliability.assess(g, x, cfg, None, k=k)
            rows[key] = {"features": rel.features}
            if truth is not None:
                rows[key]["psnr"] = float(psnr(torch.from_numpy(rel.estimate)[None, None],
                                               torch.from_numpy(np.asarray(truth)[None])))
            arrays[key] = np.asarray(x, np.float16)
        np.savez_compressed(folder / f"{name}.npz", **arrays)
        (folder / f"{name}.json").write_text(json.dumps(rows))   # last: marks it complete

    tick = time.perf_counter()
    if not (folder / "calibration.json").is_file():
        measure("calibration", {c: calib.arrays(c) for c in calib.split("all")})
    log(f"calibration cases measured ({time.perf_counter() - tick:.0f} s)")
    mr = mr_pairs(mr_path, 8, cfg)
    shifts = dict(zip(SHIFT_NAMES, SHIFT_LADDER))
    for i, case_id in enumerate(held.split("all")[:cases]):
        kept = folder / f"case-{case_id}.json"
        kept = set(json.loads(kept.read_text())) if kept.is_file() else set()
        missing = [name for name in FAMILIES if name not in kept and (not only or name in only)]
        if missing:                                    # render only what is not kept
            fixed, ct = held.arrays(case_id)
            context = held.context(case_id)

            def make(name):
                if name == "clean":
                    return fixed, ct
                if name in shifts:
                    return render_setting(*shifts[name], case_id, context, fixed, cfg,
                                          None), ct
                if name in FOREIGN:
                    return foreign_input(name, fixed, i, mr), None
                return altered_input(name, fixed), ct

            measure(f"case-{case_id}", {name: make(name) for name in missing})
        log(f"case {i + 1}/{cases} {case_id}: {len(missing)} inputs measured, "
            f"{time.perf_counter() - tick:.0f} s")
    if extra is not None:
        for case_id in extra.split("all"):
            if not (folder / f"real-{case_id}.json").is_file():
                measure(f"real-{case_id}", {"real CT": extra.arrays(case_id)})
        log(f"{len(extra.split('all'))} real CTs measured")
    return folder


def read_measurements(folder: Path, name: str) -> tuple[dict, dict]:
    rows = json.loads((folder / f"{name}.json").read_text())
    with np.load(folder / f"{name}.npz") as z:
        return rows, {key: z[key].astype(np.float32) for key in z.files}


def operating_point_calibration(folder: Path):
    """The calibration fitted on the calibration cases kept in ``folder``."""
    header = json.loads((folder / "measurements.json").read_text())
    rows, xrays = read_measurements(folder, "calibration")
    ids = list(rows)
    return reliability.ReliabilityCalibration.fit(
        [rows[c]["features"] for c in ids], [rows[c]["psnr"] for c in ids], k=header["k"],
        dataset=header["calibration_dataset"], case_ids=ids, xrays=[xrays[c] for c in ids])


def operating_point(folder: Path) -> dict:
    """The verdict as a user meets it, from :func:`measure_operating_point`'s
    measurements: calibrate on every calibration case (with the orientation check), then
    judge every measured input with that calibration."""
    header = json.loads((folder / "measurements.json").read_text())
    cal = operating_point_calibration(folder)
    families: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("case-*.json")) + sorted(folder.glob("real-*.json")):
        name = path.stem
        case_id = name.split("-", 1)[1]
        rows, xrays = read_measurements(folder, name)
        for key, row in rows.items():
            out = {"case_id": case_id, **cal.assess(row["features"], xrays[key]).to_dict()}
            if "psnr" in row:
                out["psnr"] = row["psnr"]
            families.setdefault(key, []).append(out)
    families = dict(sorted(families.items(), key=lambda item: (
        FAMILIES.index(item[0]) if item[0] in FAMILIES else len(FAMILIES))))
    return {"model": header["model"], "k": header["k"],
            "calibration": json.loads(cal.to_json()), "families": families}


def operating_summary(result: dict) -> dict:
    """Per family: verdict shares, coverage among ``ok``, mean PSNR change from clean."""
    clean = {r["case_id"]: r["psnr"] for r in result["families"]["clean"]}
    out = {}
    for name, rows in result["families"].items():
        ok = [r for r in rows if r["verdict"] == "ok"]
        covered = [r["psnr_low"] <= r["psnr"] <= r["psnr_high"] for r in ok if "psnr" in r]
        drops = [r["psnr"] - clean[r["case_id"]] for r in rows
                 if "psnr" in r and r["case_id"] in clean]
        out[name] = {"n": len(rows),
                     **{v: float(np.mean([r["verdict"] == v for r in rows]))
                        for v in reliability.VERDICTS[:3]},
                     "ok_covered": int(sum(covered)), "ok_with_psnr": len(covered),
                     "d_psnr": float(np.mean(drops)) if drops else None}
    cl = result["families"]["clean"]
    out["clean"]["spearman"] = spearman([r["score"] for r in cl], [r["psnr"] for r in cl])
    return out


SELECTION_GRID = {"score_features": {
    "3": ("reprojection_l1_center", "log_uncertainty", "reprojection_l1"),
    "13": reliability.OOD_FEATURES},
                  "ridge": (1.0, 3.0, 10.0), "scale_power": (1.0, 1.5, 2.0)}


def select_settings(folder: Path, log, grid: dict | None = None) -> list[dict]:
    """Choose the calibration's settings on measurements of the *calibration* dataset
    (``--verdicts`` run on it), never on the held-out one: two folds (each half of the
    cases calibrates, the other half's inputs of every family are judged), for every
    setting of ``grid`` (default :data:`SELECTION_GRID`). Returns one row per setting, the
    chosen one first: among settings whose coverage among ``ok`` is at least 90 % on clean
    inputs, the highest clean Spearman rho (the score ranks cases first), then the best
    coverage among ``ok`` on the worst other family where ``ok`` is given, then the
    narrowest mean clean interval."""
    grid = grid or SELECTION_GRID
    rows, xrays = read_measurements(folder, "calibration")
    ids = list(rows)
    half = len(ids) // 2
    folds = [(ids[:half], ids[half:]), (ids[half:], ids[:half])]
    cases = {cid: read_measurements(folder, f"case-{cid}") for cid in ids}
    out = []
    for label, names in grid["score_features"].items():
        for ridge in grid["ridge"]:
            for power in grid["scale_power"]:
                families: dict[str, list[dict]] = {}
                for fit_ids, judged in folds:
                    cal = reliability.ReliabilityCalibration.fit(
                        [rows[c]["features"] for c in fit_ids],
                        [rows[c]["psnr"] for c in fit_ids], k=8, ridge=ridge,
                        scale_power=power, score_features=names,
                        xrays=[xrays[c] for c in fit_ids])
                    for cid in judged:
                        measured, inputs = cases[cid]
                        for key, row in measured.items():
                            judged_row = {"case_id": cid, **cal.assess(
                                row["features"], inputs[key]).to_dict()}
                            if "psnr" in row:
                                judged_row["psnr"] = row["psnr"]
                            families.setdefault(key, []).append(judged_row)
                summary = operating_summary({"families": families})
                clean = families["clean"]
                shifted = {k: s for k, s in summary.items() if k != "clean" and s["ok_with_psnr"]}
                worst = min((s["ok_covered"] / s["ok_with_psnr"] for s in shifted.values()),
                            default=1.0)
                cover = summary["clean"]["ok_covered"] / max(summary["clean"]["ok_with_psnr"], 1)
                out.append({"score_features": label, "ridge": ridge, "scale_power": power,
                            "clean_rho": summary["clean"]["spearman"], "clean_coverage": cover,
                            "clean_width": float(np.mean([r["psnr_high"] - r["psnr_low"]
                                                          for r in clean])),
                            "worst_family_coverage": worst,
                            "worst_family": min(shifted, default="-", key=lambda k: (
                                shifted[k]["ok_covered"] / shifted[k]["ok_with_psnr"])),
                            "clean_false_alarms": 1.0 - summary["clean"]["ok"]})
                log(f"{label} features, ridge {ridge:g}, power {power:g}: clean rho "
                    f"{out[-1]['clean_rho']:.3f}, coverage {cover:.3f}, width "
                    f"{out[-1]['clean_width']:.2f} dB, worst family {worst:.3f}")

    return sorted(out, key=lambda r: (r["clean_coverage"] < 0.9, -round(r["clean_rho"], 3),
                                      -r["worst_family_coverage"], r["clean_width"]))


def selection_markdown(rows: list[dict]) -> str:
    lines = ["| score features | ridge | scale power | clean rho | clean coverage among ok | "
             "clean width (dB) | worst other family's coverage among ok | clean false "
             "alarms |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['score_features']} | {r['ridge']:g} | {r['scale_power']:g} | "
                     f"{r['clean_rho']:.3f} | {100 * r['clean_coverage']:.1f} % | "
                     f"{r['clean_width']:.2f} | {100 * r['worst_family_coverage']:.1f} % "
                     f"({r['worst_family']}) | {100 * r['clean_false_alarms']:.1f} % |")
    return "\n".join(lines)


def operating_markdown(result: dict, summary: dict) -> str:
    cal = result["calibration"]
    lines = [f"Verdicts of {result['model']} (K = {result['k']}), calibrated on "
             f"{cal['n_cases']} cases: interval half-width "
             f"{cal['halfwidth']:.2f} dB, input distance threshold {cal['ood_threshold']:.2f}; "
             f"clean Spearman rho {summary['clean']['spearman']:.3f}", "",
             "| input | n | ok | check | out of distribution | covered among ok | "
             "PSNR change vs clean |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        cover = (f"{s['ok_covered']}/{s['ok_with_psnr']}" if s["ok_with_psnr"] else "-")
        change = f"{s['d_psnr']:+.2f} dB" if s["d_psnr"] is not None else "-"
        lines.append(f"| {name} | {s['n']} | {100 * s['ok']:.0f} % | {100 * s['check']:.0f} % "
                     f"| {100 * s['out of distribution']:.0f} % | {cover} | {change} |")
    return "\n".join(lines)


def summarise(per_model: dict) -> dict:
    def pooled(setting):
        return [r for m in per_model.values() for r in m["settings"].get(setting, [])]

    clean = pooled("clean")
    psnrs = [r["psnr"] for r in clean]
    scores = [r["assessment"]["score"] for r in clean]
    inside = [r["assessment"]["psnr_low"] <= r["psnr"] <= r["assessment"]["psnr_high"]
              for r in clean]
    summary = {
        "test_cases": len(clean),
        "spearman_score_psnr": spearman(scores, psnrs),
        "spearman_per_model": {
            m: spearman([r["assessment"]["score"] for r in v["settings"]["clean"]],
                        [r["psnr"] for r in v["settings"]["clean"]])
            for m, v in per_model.items()},
        "coverage": float(np.mean(inside)),
        "level": next(iter(per_model.values()))["calibration"]["level"],
        "halfwidth_db": {m: v["calibration"]["halfwidth"] for m, v in per_model.items()},
        "mean_abs_error_db": float(np.mean(np.abs(np.subtract(scores, psnrs)))),
        "voxel_corr_tta": float(np.mean([r["voxel_corr_tta"] for r in clean])),
        "voxel_corr_tta_all": float(np.mean([r["voxel_corr_tta_all"] for r in clean])),
        "verdicts": {}, "auroc": {}, "auroc_per_model": {}, "mean_psnr": {},
    }
    names = list(next(iter(per_model.values()))["settings"])
    for setting in names:
        rows = pooled(setting)
        summary["verdicts"][setting] = {v: float(np.mean([r["assessment"]["verdict"] == v
                                                         for r in rows]))
                                        for v in reliability.VERDICTS}
        if "psnr" in rows[0]:
            summary["mean_psnr"][setting] = float(np.mean([r["psnr"] for r in rows]))
        if setting in ("clean", "real CTs"):
            continue
        summary["auroc"][setting] = auroc([r["assessment"]["ood_distance"] for r in clean],
                                          [r["assessment"]["ood_distance"] for r in rows])
        summary["auroc_per_model"][setting] = {
            m: auroc([r["assessment"]["ood_distance"] for r in v["settings"]["clean"]],
                     [r["assessment"]["ood_distance"] for r in v["settings"][setting]])
            for m, v in per_model.items()}
    shifted = [r for s in names if s not in ("clean", "real CTs") for r in pooled(s)
               if "psnr" in r] + clean
    summary["spearman_score_psnr_with_shifts"] = spearman(
        [r["assessment"]["score"] for r in shifted], [r["psnr"] for r in shifted])
    real = pooled("real CTs")
    if real:
        summary["real"] = [{"case_id": r["case_id"], "psnr": r["psnr"],
                            **{k: r["assessment"][k] for k in ("score", "psnr_low", "psnr_high",
                                                               "verdict", "ood_distance")}}
                           for r in real]
        summary["spearman_real"] = spearman([r["assessment"]["score"] for r in real],
                                            [r["psnr"] for r in real])
    ratio = [np.median(v["seconds_reliability"]) / np.median(v["seconds_plain"])
             for v in per_model.values()]
    summary["cost"] = {"plain_s": float(np.median([np.median(v["seconds_plain"])
                                                   for v in per_model.values()])),
                       "reliability_s": float(np.median([np.median(v["seconds_reliability"])
                                                         for v in per_model.values()])),
                       "ratio": float(np.median(ratio))}
    # Ensemble disagreement as the uncertainty, where there are two models or more.
    labels = list(per_model)
    if len(labels) > 1:
        corr = []
        for case_id, truth in per_model[labels[0]]["truths"].items():
            stack = np.stack([per_model[m]["estimates"][case_id] for m in labels])
            spread, first = stack.std(0), stack[0]
            mask = truth > 0.0961  # -500 HU at the default clip (body_threshold)
            mask |= first > 0.0961
            corr.append(voxel_corr(spread, np.abs(first - truth), mask))
        summary["voxel_corr_ensemble"] = float(np.mean(corr))
    # Coverage over random re-splits of the held-out pool (calibration + test): a
    # finite-sample check with more cases than the test split alone.
    summary["coverage_resplits"] = resplit_coverage(per_model)
    return summary


def resplit_coverage(per_model: dict, repeats: int = 200) -> float:
    hits = []
    for v in per_model.values():
        rows = v["calibration_rows"] + v["settings"]["clean"]
        k = v["calibration"]["k"]
        for seed in range(repeats):
            order = np.random.default_rng(seed).permutation(len(rows))
            cal_idx, test_idx = order[:64], order[64:]
            cal = reliability.ReliabilityCalibration.fit(
                [rows[i]["features"] for i in cal_idx], [rows[i]["psnr"] for i in cal_idx],
                k=k, seed=seed)
            for i in test_idx:
                a = cal.assess(rows[i]["features"])
                hits.append(a.psnr_low <= rows[i]["psnr"] <= a.psnr_high)
    return float(np.mean(hits))


def markdown(summary: dict, per_model: dict, k: int) -> str:
    s = summary
    lines = [f"**Reliability at K = {k}: {s['test_cases']} test cases pooled over "
             f"{len(per_model)} models ({', '.join(v['label'] for v in per_model.values())})**",
             "", "| measure | value | target |", "|---|---:|---|",
             f"| Spearman ρ, score vs actual PSNR (test split, pooled) | "
             f"{s['spearman_score_psnr']:.3f} | ≥ 0.6 |",
             *[f"| Spearman ρ, {m} alone | {v:.3f} | |" for m, v in
               s["spearman_per_model"].items()],
             f"| Spearman ρ with every shifted input too | "
             f"{s['spearman_score_psnr_with_shifts']:.3f} | |",
             f"| actual PSNR inside the {100 * s['level']:.0f} % interval (test split) | "
             f"{100 * s['coverage']:.1f} % | 85-95 % |",
             f"| same, 200 random re-splits of calibration + test cases | "
             f"{100 * s['coverage_resplits']:.1f} % | |",
             f"| interval half-width | "
             f"{', '.join(f'{v:.2f}' for v in s['halfwidth_db'].values())} dB | |",
             f"| mean abs. error of the predicted PSNR | {s['mean_abs_error_db']:.2f} dB | |",
             f"| per-voxel Spearman, uncertainty vs abs. error (body), K-sample | "
             f"{s['voxel_corr_tta']:.3f} | |",
             f"| same, every voxel of the cube | {s['voxel_corr_tta_all']:.3f} | |"]
    if "voxel_corr_ensemble" in s:
        lines.append(f"| per-voxel Spearman (body), ensemble of the {len(per_model)} models | "
                     f"{s['voxel_corr_ensemble']:.3f} | |")
    c = s["cost"]
    lines.append(f"| cost: plain reconstruction / with reliability (median) | "
                 f"{1000 * c['plain_s']:.0f} ms / {1000 * c['reliability_s']:.0f} ms "
                 f"= {c['ratio']:.1f}x | ≤ 10x |")
    lines += ["", "| input | AUROC vs clean (pooled) | per model | mean PSNR (dB) | ok | check "
                  "| out of distribution |", "|---|---:|---|---:|---:|---:|---:|"]
    for setting, verdicts in s["verdicts"].items():
        au = s["auroc"].get(setting)
        per = s["auroc_per_model"].get(setting, {})
        lines.append(
            f"| {setting} | {'' if au is None else f'{au:.3f}'} | "
            f"{', '.join(f'{v:.3f}' for v in per.values())} | "
            f"{s['mean_psnr'].get(setting, float('nan')):.2f} | "
            + " | ".join(f"{100 * verdicts[v]:.0f} %" for v in reliability.VERDICTS) + " |")
    if "real" in s:
        lines += ["", f"Real CTs (Spearman ρ {s['spearman_real']:.3f} over "
                      f"{len(s['real'])} case-model pairs):", "",
                  "| case | actual PSNR | score | interval | verdict | distance |",
                  "|---|---:|---:|---|---|---:|"]
        for r in s["real"]:
            lines.append(f"| {r['case_id']} | {r['psnr']:.2f} | {r['score']:.2f} | "
                         f"{r['psnr_low']:.2f}-{r['psnr_high']:.2f} | {r['verdict']} | "
                         f"{r['ood_distance']:.1f} |")
    return "\n".join(lines)


def plot(per_model: dict, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.6))
    for (m, v), colour in zip(per_model.items(), ("C0", "C1", "C2", "C3")):
        rows = v["settings"]["clean"]
        y = [r["psnr"] for r in rows]
        x = [r["assessment"]["score"] for r in rows]
        err = [[r["assessment"]["score"] - r["assessment"]["psnr_low"] for r in rows]] * 2
        a1.errorbar(x, y, xerr=err, fmt="o", ms=4, color=colour, alpha=0.7, label=f"{m} test")
        # the real CTs are all out of distribution (their scores mean nothing): table only
    lo, hi = a1.get_xlim()
    a1.plot([lo, hi], [lo, hi], "k:", lw=1)
    a1.set_xlabel("predicted PSNR (score), dB, with 90 % interval")
    a1.set_ylabel("actual PSNR, dB")
    a1.set_title(f"calibration: rho {summary['spearman_score_psnr']:.2f}, "
                 f"coverage {100 * summary['coverage']:.0f} %")
    a1.legend(fontsize=7)
    names = [s for s in next(iter(per_model.values()))["settings"]]
    for j, setting in enumerate(names):
        d = [r["assessment"]["ood_distance"] for v in per_model.values()
             for r in v["settings"][setting]]
        a2.plot(np.full(len(d), j) + np.random.default_rng(j).uniform(-0.2, 0.2, len(d)),
                np.log10(d), ".", alpha=0.6)
    thr = [v["calibration"]["ood_threshold"] for v in per_model.values()]
    for t in thr:
        a2.axhline(np.log10(t), color="r", lw=0.8, ls="--")
    a2.set_xticks(range(len(names)))
    a2.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    a2.set_ylabel("log10 input distance (red: thresholds)")
    a2.set_title("out-of-distribution distance per input")
    corr = [r["voxel_corr_tta"] for v in per_model.values() for r in v["settings"]["clean"]]
    a3.hist(corr, bins=10, alpha=0.7, label="K-sample")
    a3.set_xlabel("per-voxel Spearman, uncertainty vs abs. error (per case)")
    a3.set_title("uncertainty vs error")
    a3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median milliseconds of each call and its ratio to ``calls["plain"]``, the calls
    interleaved round by round after one warm-up each (the machine's load hits them
    alike)."""
    for fn in calls.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    plain = float(np.median(seconds["plain"]))
    return {name: {"ms": 1000 * float(np.median(v)), "ratio": float(np.median(v)) / plain}
            for name, v in seconds.items()}


def cost_by_k(model, data: PreparedDataset, ks=(1, 4, 8, 16), repeats: int = 15) -> dict:
    """Median seconds of a plain reconstruction and of :func:`cvaa.reliability.assess` at
    each K, interleaved on one test case (the machine's load hits them alike)."""
    cfg = Config.from_dict(model.config)
    g = model.generator.eval()
    x = data.arrays(data.split("test")[0])[0]
    calls = {"plain": lambda: reconstruct(g, x),
             **{f"K={k}": (lambda k=k: reliability.assess(g, x, cfg, k=k)) for k in ks}}
    return interleaved_medians(calls, repeats)


def cost_of_the_job(model, data: PreparedDataset, k: int, out: Path, repeats: int = 15,
                    calibration=None) -> dict:
    """What jobs/reconstruct.py pays after loading the model, median seconds, interleaved:
    ``plain`` (forward pass + NIfTI written, ``--no-reliability``), ``reused`` (the batched
    pass of K whose sample 0 is written, + the uncertainty volume: the job now) and
    ``twice`` (the plain reconstruction, then the batched pass: the job before); with
    ``calibration``, the verdict (orientation check, distance, interval) is in both."""
    from cvaa.inference import reconstruct_to_file, volume_from_prediction, write_volume

    cfg = Config.from_dict(model.config)
    g = model.generator.eval()
    x = data.arrays(data.split("test")[0])[0]
    out.mkdir(parents=True, exist_ok=True)

    def with_reliability(reuse: bool) -> None:
        rel = reliability.assess(g, x, cfg, calibration, k=k) if reuse else None
        reconstruct_to_file(g, cfg, x, str(out / "ct.nii.gz"),
                            normalized=rel.estimate if reuse else None)
        rel = rel or reliability.assess(g, x, cfg, calibration, k=k)
        write_volume(volume_from_prediction(rel.uncertainty, cfg), str(out / "u.nii.gz"))

    calls = {"plain": lambda: reconstruct_to_file(g, cfg, x, str(out / "ct.nii.gz")),
             "reused": lambda: with_reliability(True),
             "twice": lambda: with_reliability(False)}
    return interleaved_medians(calls, repeats)


def example_figures(item: str, tracking_uri: str, data: PreparedDataset, k: int,
                    out: Path) -> None:
    """OUT_uncertainty.png and OUT_attention.png of the first test case, first model."""
    from cvaa.figures import attention_grid, reliability_grid

    label, _, model_uri = item.partition("=")
    model = tracking.load_model(model_uri, tracking_uri)
    cfg = Config.from_dict(model.config)
    case_id = data.split("test")[0]
    xrays, ct = data.arrays(case_id)
    rel = reliability.assess(model.generator, xrays, cfg, None, k=k)
    out.with_name(out.name + "_uncertainty.png").write_bytes(reliability_grid(
        rel.estimate, rel.uncertainty, ct[0], title=f"{label}, test case {case_id}, K = {k}"))
    out.with_name(out.name + "_attention.png").write_bytes(attention_grid(
        view_attention(model.generator, xrays),
        title=f"{label}, test case {case_id}: CVAA view attention per scale"))


def save_cached(folder: str, label: str, result: dict) -> None:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {f"{kind}/{case}": v for kind in ("estimates", "truths")
              for case, v in result[kind].items()}
    np.savez_compressed(root / f"{label}.npz", **arrays)
    (root / f"{label}.json").write_text(json.dumps(
        {k: v for k, v in result.items() if k not in ("estimates", "truths")}))


def load_cached(folder: str | None, label: str, model_uri: str) -> dict | None:
    if not folder or not (Path(folder) / f"{label}.json").is_file():
        return None
    result = json.loads((Path(folder) / f"{label}.json").read_text())
    if result.get("uri") != model_uri:
        return None
    result["estimates"], result["truths"] = {}, {}
    with np.load(Path(folder) / f"{label}.npz") as z:
        for key in z.files:
            kind, case = key.split("/", 1)
            result[kind][case] = z[key]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset (its test split)")
    p.add_argument("--calib-data", required=True,
                   help="prepared held-out cases for the calibration (all of them)")
    p.add_argument("--extra-data", help="a prepared dataset scored whole (the real CTs)")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=URI")
    p.add_argument("--mr", default=str(ROOT.parent / "shared" / "data" / "mr" /
                                       "abdomen_mr.nii.gz"))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--out", default="docs/reliability_results")
    p.add_argument("--cost-only", action="store_true", help="only time a plain "
                   "reconstruction against reliability at K = 1, 4, 8, 16 (first --model)")
    p.add_argument("--verdicts", metavar="PREPARED", help="only the operating point: "
                   "calibrate on --calib-data, then verdicts per input family and strength on "
                   "--cases cases of this dataset (a data seed nobody trained or calibrated "
                   "on); writes OUT_verdicts.json and .md (first --model)")
    p.add_argument("--cases", type=int, default=12, help="cases of --verdicts (default 12)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds of "
                   "--cost-only (default 15)")
    p.add_argument("--shifts-only", action="store_true", help="with --verdicts: measure "
                   "clean inputs and the physical shifts alone (what --select reads)")
    p.add_argument("--select", action="store_true", help="with --cache holding a --verdicts "
                   "run on the calibration dataset: choose the calibration's settings there "
                   "(two folds), writes OUT_selection.md")
    p.add_argument("--from-cache", action="store_true", help="with --verdicts: judge the "
                   "measurements already in --cache with the current code (no model run)")
    p.add_argument("--cache", help="directory keeping each model's measurements (LABEL.json "
                   "+ LABEL.npz): a model measured there before is read back, not run again")
    args = p.parse_args(argv)
    uri = args.mlflow_uri or tracking.default_tracking_uri()
    data, calib = PreparedDataset(args.data), PreparedDataset(args.calib_data)
    extra = PreparedDataset(args.extra_data) if args.extra_data else None
    if args.select:
        rows = select_settings(Path(args.cache), log=lambda line: print(f"[select] {line}"))
        text = selection_markdown(rows)
        Path(args.out + "_selection.md").write_text(text + "\n")
        print(text)
        return 0
    if args.verdicts:
        label, _, model_uri = args.model[0].partition("=")
        out = Path(args.out + "_verdicts")
        out.parent.mkdir(parents=True, exist_ok=True)

        def save(result: dict) -> str:    # the verdicts of the current code
            summary = operating_summary(result)
            text = operating_markdown(result, summary)
            out.with_suffix(".json").write_text(json.dumps({"summary": summary, **result},
                                                           indent=1))
            out.with_suffix(".md").write_text(text + "\n")
            return text

        if not args.cache:
            p.error("--verdicts needs --cache DIR: where the measurements are kept")
        folder = Path(args.cache)
        if not args.from_cache:
            measure_operating_point(tracking.load_model(model_uri, uri), calib,
                                    PreparedDataset(args.verdicts), args.cases, args.mr,
                                    args.k, folder, extra=extra,
                                    only=({"clean", *SHIFT_NAMES} if args.shifts_only
                                          else None),
                                    log=lambda line: print(f"[verdicts] {line}"))
        print(save(operating_point(folder)))
        return 0
    if args.cost_only:
        label, _, model_uri = args.model[0].partition("=")
        model = tracking.load_model(model_uri, uri)
        calibration = None
        if args.cache and (Path(args.cache) / "calibration.json").is_file():
            calibration = operating_point_calibration(Path(args.cache))
            print(f"| calibration | fitted on the {calibration.n_cases} cases kept in "
                  f"{args.cache}: the verdict is in the timed job |")
        job = cost_of_the_job(model, data, args.k, Path(args.out).parent / "cost-tmp",
                              repeats=args.repeats, calibration=calibration)
        print(f"| {label} job, K = {args.k} | " + " | ".join(
            f"{k}: {v['ms']:.0f} ms ({v['ratio']:.2f}x)" for k, v in job.items()) + " |")
        costs = cost_by_k(model, data, repeats=args.repeats)
        print(f"| {label} | " + " | ".join(f"{k}: {v['ms']:.0f} ms ({v['ratio']:.2f}x)"
                                          for k, v in costs.items()) + " |")
        return 0
    per_model = {}
    for item in args.model:
        label, _, model_uri = item.partition("=")
        cached = load_cached(args.cache, label, model_uri)
        if cached is not None:
            print(f"[reliability] {label}: measurements read from {args.cache}")
            per_model[label] = cached
            continue
        model = tracking.load_model(model_uri, uri)
        print(f"[reliability] {label}: {model.label}")
        per_model[label] = run_model(label, model, data, calib, extra, args.mr, args.k,
                                     log=lambda line: print(f"[reliability] {line}"))
        per_model[label]["uri"] = model_uri
        if args.cache:
            save_cached(args.cache, label, per_model[label])
    summary = summarise(per_model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = {m: {k: v for k, v in d.items() if k not in ("estimates", "truths")}
            for m, d in per_model.items()}
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "per_model": slim},
                                                   indent=1))
    text = markdown(summary, per_model, args.k)
    out.with_suffix(".md").write_text(text + "\n")
    plot(per_model, summary, out.with_suffix(".png"))
    example_figures(args.model[0], uri, data, args.k, out)
    print(text)
    print(f"[reliability] wrote {out.with_suffix('.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
