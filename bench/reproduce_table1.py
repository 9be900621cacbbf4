"""Reproduce the paper's Table I at CPU scale: CVAA-GAN vs X2CT-GAN vs 3DCNN vs PSR.

    python bench/reproduce_table1.py --seeds 5 --models cvaa x2ct   # 200 phantoms per seed
    python bench/reproduce_table1.py --seeds 3 --models 3dcnn psr
    python bench/reproduce_table1.py --report-only                  # results.md from the files
    python bench/reproduce_table1.py --n 24 --epochs 1              # a smoke run

Every step is one of the project's own commands, run as a subprocess and recorded:

1. ``jobs/preprocess.py`` prepares N synthetic lumbar phantoms (80/20 split by patient);
2. ``jobs/train.py`` trains each model on the same data, seed and epochs (``cpu`` preset),
   registering ``models:/table1-<model>@table1`` in a private MLflow store;
3. ``jobs/evaluate.py`` evaluates the four models on the test split (Table I, Fig. 2);
4. the real CTs of ``../shared/data`` are prepared with the same geometry and evaluated too;
5. a trivial baseline, the training-set mean volume, is scored on both for scale.

With ``--seeds N`` every step runs once per seed (data, split and initialisation drawn from
the seed). Each finished seed's evaluated per-case metrics go into
``docs/results/seed-<seed>.json`` (with the commit and the commands); a seed and model
already there is skipped, so seeds can run at different times. ``docs/results.md`` is
rebuilt from whichever seed files exist (``--report-only`` does only that): per model the
mean over seeds with a 95 % t interval, and CVAA-GAN − X2CT-GAN and CVAA-GAN − 3DCNN as
paired per-case differences pooled over seeds with a bootstrap 95 % interval, in both metric
conventions. Seed 0 also writes ``docs/table1_fig2.png`` and ``docs/table1_curves.png``
(when CVAA-GAN is among the models that run trains).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"cvaa": "CVAA-GAN", "x2ct": "X2CT-GAN", "3dcnn": "3DCNN", "psr": "PSR"}
PAPER = {  # Table I of arXiv 2408.09736 (private lumbar CT, 128^3 at 2 mm)
    "PSR": (25.1421, 0.6025), "3DCNN": (25.4031, 0.6328), "X2CT-GAN": (27.8361, 0.7673),
    "CVAA-GAN": (29.7508, 0.8113)}


def run(cmd: list[str], log: list[str], env=None) -> tuple[str, float]:
    """Run a project command, echo its output, record it; fail loudly."""
    shown = " ".join(shlex.quote(c) for c in cmd).replace(str(ROOT) + "/", "")
    print(f"\n$ {shown}", flush=True)
    log.append(shown)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
        raise SystemExit(f"command failed ({proc.returncode}): {shown}")
    tail = [ln for ln in proc.stdout.splitlines() if ln.startswith(("|", "[", "final",
                                                                     "registered", "MLflow"))]
    print("\n".join(tail[-12:]), flush=True)
    return proc.stdout, seconds


def mean_volume_cases(prepared: str, targets: dict[str, tuple[str, str]]
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """Per-case metrics of the training-set mean volume on each target split."""
    import numpy as np
    import torch

    from cvaa.data.dataset import PreparedDataset
    from cvaa.metrics import evaluate_batch

    train = PreparedDataset(prepared)
    mean = np.mean([train.load(c)["ct"] for c in train.split("train")], axis=0)
    out = {}
    for name, (data, split) in targets.items():
        ds = PreparedDataset(data)
        out[name] = {}
        for case_id in ds.split(split):
            target = torch.from_numpy(ds.load(case_id)["ct"])[None]
            result = evaluate_batch(torch.from_numpy(mean)[None], target)[0]
            out[name][case_id] = {k: float(v) for k, v in result.items()}
    return out


def curves_png(tracking_uri: str, run_ids: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    keys = [("loss_rec", "train MSE (loss_rec)"), ("val/psnr", "validation PSNR (dB)"),
            ("val/ssim", "validation SSIM")]
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.2))
    for label, run_id in run_ids.items():
        for ax, (key, title) in zip(axes, keys):
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            ax.plot([m.step for m in hist], [m.value for m in hist], marker=".", label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU; Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="phantoms (default 200)")
    p.add_argument("--epochs", type=int, default=32, help="epochs for every model")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads of the (single) training worker, every model")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "table1"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--seeds", type=int, default=1,
                   help="run seeds 0 .. N-1 (data, split and initialisation per seed)")
    p.add_argument("--seed-list", type=int, nargs="+",
                   help="run exactly these seeds instead of 0 .. N-1")
    p.add_argument("--force", action="store_true",
                   help="run a (seed, model) again even if its results file has it")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild results.md from the seed files that exist")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam LR for G and D of every model (the paper's 2e-4 needs ~10k "
                        "steps; a CPU budget has a few hundred)")
    args = p.parse_args(argv)

    docs = Path(args.docs)
    seed_dir = docs / "results"
    seed_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seed_list or range(args.seeds):
            run_seed(args, seed, seed_dir / f"seed-{seed}.json")
    report = write_report(seed_dir, docs / "results.md")
    print(report)
    return 0


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        # this script's own outputs (the report, the seed files, seed 0's figures) are not
        # changes to the code that produced a result
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":!docs/results.md", ":!docs/results", ":!docs/table1_*",
                                ":!docs/results-paper.md"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _per_case(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{model label: {case id: metrics}}`` from an evaluation's ``per_case.csv``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            label, case = r.pop("model"), r.pop("case_id")
            out.setdefault(label, {})[case] = {k: float(v) for k, v in r.items()}
    return out


def run_seed(args, seed: int, result_path: Path) -> None:
    """Prepare seed ``seed``'s data, train the models it lacks, evaluate them on its test
    split and on the real CTs, and merge their per-case metrics into ``result_path``."""
    done = json.loads(result_path.read_text()) if result_path.exists() else {}
    have = set(done.get("models", {}))
    todo = [m for m in args.models if args.force or MODELS[m] not in have]
    if not todo:
        print(f"[table1] seed {seed}: {', '.join(MODELS[m] for m in args.models)} already "
              f"in {result_path}", flush=True)
        return
    commit = _git_commit()  # before this run writes its own figures into docs/
    work = Path(args.workdir) / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    mlflow_uri = f"sqlite:///{work.resolve()}/mlflow.db"
    half = args.epochs // 2
    common = ["--preset", "cpu",
              "--set", f"data.n_phantoms={args.n}", "--set", f"data.seed={seed}",
              "--set", f"train.seed={seed}"]
    train_set = ["--set", f"optim.lr_g={args.lr}", "--set", f"optim.lr_d={args.lr}",
                 "--set", f"optim.constant_epochs={half}",
                 "--set", f"optim.decay_epochs={args.epochs - half}",
                 "--set", f"train.figure_every={args.epochs}",
                 "--set", f"train.cpus_per_worker={args.threads}",
                 # the protocol trains on the whole train split (no calibration hold-out)
                 "--set", "train.calibration_cases=0"]
    env = {**os.environ, "CVAA_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    log: list[str] = []

    prepared = str(work / "prepared")
    run([py, "jobs/preprocess.py", "--output", prepared, *common], log, env)
    real = str(work / "prepared-real")
    shared = Path(os.path.relpath(ROOT.parent / "shared" / "data", ROOT))
    # Public, de-identified CTs (TotalSegmentator): readable case ids in the figures.
    run([py, "jobs/preprocess.py", "--input", str(shared), "--output", real, "--keep-names",
         *common], log, env)

    walls, run_ids, uris = {}, {}, []
    for model in todo:
        out, seconds = run([py, "jobs/train.py", "--data", prepared, "--model", model,
                            "--epochs", str(args.epochs), *common, *train_set,
                            "--run-name", f"table1-{model}", "--storage", str(work / "ray"),
                            "--mlflow-uri", mlflow_uri, "--register-name", f"table1-{model}",
                            "--alias", "table1"], log, env)
        walls[MODELS[model]] = seconds
        run_ids[MODELS[model]] = re.search(r"^MLflow run (\w+) at ", out, re.M).group(1)
        uris.append(f"models:/table1-{model}@table1")

    labels = [MODELS[m] for m in todo]
    per_case = {}
    for name, data, split in (("test", prepared, "test"), ("real", real, "all")):
        out_dir = work / f"eval-{name}"
        run([py, "jobs/evaluate.py", "--models", *uris, "--labels", *labels, "--data", data,
             "--split", split, "--out", str(out_dir), "--cases", "3" if name == "test" else "2",
             "--mlflow-uri", mlflow_uri, "--run-name", f"table1-eval-{name}"], log, env)
        per_case[name] = _per_case(out_dir / "per_case.csv")
    if seed == 0 and "cvaa" in todo:  # the figures of the first seed, with CVAA-GAN in them
        docs = Path(args.docs)
        (docs / "table1_fig2.png").write_bytes((work / "eval-test" / "fig2.png").read_bytes())
        (docs / "table1_fig2_real.png").write_bytes(
            (work / "eval-real" / "fig2.png").read_bytes())
        curves_png(mlflow_uri, run_ids, docs / "table1_curves.png")
    baseline = mean_volume_cases(prepared, {"test": (prepared, "test"),
                                            "real": (real, "all")})

    manifest = json.loads((Path(prepared) / "manifest.json").read_text())
    models = done.get("models", {})
    for label in labels:
        models[label] = {"test": per_case["test"][label], "real": per_case["real"][label],
                         "wall_seconds": round(walls[label], 1), "commit": commit,
                         "commands": log}
    result = {
        "seed": seed, "n_phantoms": args.n, "epochs": args.epochs, "lr": args.lr,
        "threads": args.threads, "machine": machine(),
        "train_cases": len(manifest["split"]["train"]),
        "test_cases": len(manifest["split"]["test"]),
        "models": models, "mean_volume": baseline,
    }
    result_path.write_text(json.dumps(result, indent=1))
    print(f"[table1] seed {seed}: {', '.join(labels)} -> {result_path}", flush=True)


def _param_counts() -> str:
    from cvaa.config import load_config
    from cvaa.models import build_generator, count_parameters

    cfg = load_config("cpu")
    return ", ".join(f"{label} {count_parameters(build_generator(name, cfg)) / 1e3:.0f} k"
                     for name, label in MODELS.items())


# --------------------------------------------------------------------------- the report

METRICS = (("psnr", "PSNR", 2), ("ssim", "SSIM", 4),
           ("psnr_x2ct", "PSNR (x2ct)", 2), ("ssim_x2ct", "SSIM (x2ct)", 4))
PAIRS = (("CVAA-GAN", "X2CT-GAN"), ("CVAA-GAN", "3DCNN"))


def t_interval(values) -> tuple[float, float]:
    """Mean and half-width of the 95 % t confidence interval (nan with one value)."""
    import numpy as np
    from scipy import stats

    v = np.asarray(list(values), float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(half)


def paired_bootstrap(groups, n_boot: int = 10000, seed: int = 0
                     ) -> tuple[float, float, float, int]:
    """Mean of paired per-case differences pooled over seeds, with a 95 % bootstrap
    interval that resamples cases with replacement within each seed (the seeds' test sets
    differ); returns ``(mean, low, high, n_cases)``."""
    import numpy as np

    groups = [np.asarray(g, float) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(groups)
    sums = np.zeros(n_boot)
    for g in groups:
        picks = rng.integers(0, len(g), size=(n_boot, len(g)))
        sums += g[picks].sum(axis=1)
    means = sums / len(pooled)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(pooled.mean()), float(low), float(high), len(pooled)


def load_seeds(seed_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(
        seed_dir.glob("seed-*.json"), key=lambda p: int(p.stem.split("-")[1]))]


def summary_rows(seeds: list[dict], split: str) -> list[str]:
    """Markdown rows: per model, seeds, mean +- 95 % CI over the seeds' split means."""
    import numpy as np

    labels = [m for m in MODELS.values() if any(m in s["models"] for s in seeds)]
    rows = []
    for label in labels + ["Mean volume (train)"]:
        per_seed = [s["models"][label][split] if label in s["models"]
                    else s["mean_volume"][split] if label.startswith("Mean") else None
                    for s in seeds]
        per_seed = [cases for cases in per_seed if cases]
        cells = []
        for key, _, digits in METRICS:
            mean, half = t_interval(np.mean([c[key] for c in cases.values()])
                                    for cases in per_seed)
            cells.append(f"{mean:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half)
                         else f"{mean:.{digits}f}")
        rows.append(f"| {label} | {len(per_seed)} | " + " | ".join(cells) + " |")
    return rows


def _pair_diffs(seeds: list[dict], a: str, b: str, split: str, key: str
                ) -> list[dict[str, float]]:
    """Per seed that has both models, ``{case id: metric of a - metric of b}``."""
    out = []
    for s in seeds:
        if a in s["models"] and b in s["models"]:
            ca, cb = s["models"][a][split], s["models"][b][split]
            out.append({c: ca[c][key] - cb[c][key] for c in sorted(set(ca) & set(cb))})
    return out


def _seed_means(diffs: list[dict[str, float]]) -> list[float]:
    """Each seed's mean paired difference over its cases."""
    return [sum(d.values()) / len(d) for d in diffs]


def pooled_difference(diffs: list[dict[str, float]]) -> tuple[float, float, float, str]:
    """Mean paired difference with its 95 % bootstrap interval, and the case count.

    The phantom test cases differ from seed to seed, so cases are resampled within each
    seed. The real CTs are the same few cases in every seed: there the unit is the case
    (its difference averaged over the seeds) and the distinct cases are resampled, so the
    interval does not pretend that 4 CTs seen 5 times are 20 cases."""
    seen: dict[str, list[float]] = {}
    for d in diffs:
        for case, v in d.items():
            seen.setdefault(case, []).append(v)
    if len(diffs) > 1 and any(len(v) > 1 for v in seen.values()):
        mean, low, high, n = paired_bootstrap([[sum(v) / len(v) for v in seen.values()]])
        return mean, low, high, f"{n} (each in {len(diffs)} seeds)"
    mean, low, high, n = paired_bootstrap([list(d.values()) for d in diffs])
    return mean, low, high, str(n)


def pair_rows(seeds: list[dict], split: str) -> list[str]:
    rows = []
    for a, b in PAIRS:
        n_seeds = sum(a in s["models"] and b in s["models"] for s in seeds)
        if not n_seeds:
            continue
        cells = []
        for key, _, digits in METRICS:
            mean, low, high, n = pooled_difference(_pair_diffs(seeds, a, b, split, key))
            cells.append(f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]")
        rows.append(f"| {a} − {b} | {n_seeds} | {n} | " + " | ".join(cells) + " |")
    return rows


def seed_rows(seeds: list[dict], split: str) -> list[str]:
    """Markdown rows: per pair, each seed's mean paired difference (PSNR) and the mean over
    seeds ± its 95 % t half-width, PSNR and SSIM: the seed-to-seed variation that a case
    bootstrap within seeds cannot show."""
    import numpy as np

    rows = []
    for a, b in PAIRS:
        psnr = _seed_means(_pair_diffs(seeds, a, b, split, "psnr"))
        if not psnr:
            continue
        ssim = _seed_means(_pair_diffs(seeds, a, b, split, "ssim"))
        cells = []
        for values, digits in ((psnr, 2), (ssim, 4)):
            mean, half = t_interval(values)
            cells.append(f"{mean:+.{digits}f} ± {half:.{digits}f}" if np.isfinite(half)
                         else f"{mean:+.{digits}f}")
        rows.append(f"| {a} − {b} | {len(psnr)} | "
                    + ", ".join(f"{v:+.2f}" for v in psnr) + " | " + " | ".join(cells) + " |")
    return rows


def verdict(seeds: list[dict], a: str = "CVAA-GAN", b: str = "X2CT-GAN") -> str:
    """Does ``a`` beat ``b`` on the phantom test split? Pooled test cases and seed-to-seed
    variation must both say so."""
    diffs = _pair_diffs(seeds, a, b, "test", "psnr")
    if not diffs:
        return f"No seed has both {a} and {b} yet."
    mean, low, high, n = pooled_difference(diffs)
    per_seed = _seed_means(diffs)
    s_mean, s_half = t_interval(per_seed)
    positive = sum(v > 0 for v in per_seed)
    text = (f"On the phantom test split, over {len(diffs)} seed(s) and {n} paired test cases, "
            f"the PSNR difference {a} − {b} is {mean:+.2f} dB, 95 % "
            f"bootstrap interval [{low:+.2f}, {high:+.2f}]")
    if len(diffs) < 2:
        return (text + ". With one seed this interval covers the sampling of test cases only, "
                "not the variation from seed to seed (earlier single-seed runs differed by "
                "more than a decibel): it is not a verdict before at least 5 seeds.")
    text += (f"; over seeds {s_mean:+.2f} ± {s_half:.2f} dB (95 % t interval, {len(diffs)} "
             f"seeds, {positive} of them in {a}'s favour). ")
    s_low, s_high = s_mean - s_half, s_mean + s_half
    if low > 0 and s_low > 0:
        word = f"**{a} beats {b}**: both intervals exclude zero."
    elif high < 0 and s_high < 0:
        word = f"**{a} is beaten by {b}**: both intervals exclude zero."
    elif low > 0 or high < 0:
        word = ("The test cases alone would call it, but the seed-to-seed interval includes "
                "zero: **the difference is not robust to the training seed**, no verdict.")
    else:
        word = "**The two are not distinguishable** at this scale: both intervals include zero."
    ssim = _pair_diffs(seeds, a, b, "test", "ssim")
    ss_mean, ss_low, ss_high, _ = pooled_difference(ssim)
    ss_seed, ss_half = t_interval(_seed_means(ssim))
    word += (f" (3D SSIM: {ss_mean:+.4f} [{ss_low:+.4f}, {ss_high:+.4f}] pooled, "
             f"{ss_seed:+.4f} ± {ss_half:.4f} over seeds"
             + (", an interval that includes zero" if abs(ss_seed) <= ss_half else "") + ".)")
    if len(diffs) < 5:
        word += f" With {len(diffs)} seeds this is not yet a verdict: it needs at least 5."
    return text + word


def write_report(seed_dir: Path, path: Path) -> str:
    """``results.md`` from every ``seed-*.json`` under ``seed_dir`` (whichever exist)."""
    seeds = load_seeds(seed_dir)
    lines = ["# Table I at CPU scale, over seeds", ""]
    if not seeds:
        lines += ["No seed has been run yet with the rebuilt X2CT-GAN: "
                  "`python bench/reproduce_table1.py --seeds 5 --models cvaa x2ct`, then "
                  "`--seeds 3 --models 3dcnn psr`. The earlier single-seed tables are in "
                  "[results_history.md](results_history.md).", ""]
        path.write_text("\n".join(lines))
        return path.read_text()
    first = seeds[0]
    counts = {label: sum(label in s["models"] for s in seeds) for label in MODELS.values()}
    lines += [
        "Rebuilt by `python bench/reproduce_table1.py --report-only` from the per-seed result "
        f"files in `docs/results/` ({len(seeds)} seed file(s): "
        + ", ".join(f"{label} {n}" for label, n in counts.items() if n) + "). Each seed file "
        "holds every evaluated test case's metrics with the commit and the commands that "
        "produced them; run more seeds with `--seeds N` or `--seed-list ...` (seeds already "
        "done are skipped).",
        "",
        f"- Machine: {first['machine']}.",
        f"- Data per seed: {first['n_phantoms']} synthetic lumbar phantoms drawn with that "
        f"seed ({first['train_cases']} train / {first['test_cases']} test by patient, the "
        "split seeded too), `cpu` preset (8 mm, 32³, 32² DRRs). Every model of a seed "
        "trains on the same data with that seed's initialisation.",
        f"- Budget: {first['epochs']} epochs, batch 4, Adam {first['lr']:g} for G and D, one "
        f"worker with {first['threads']} CPU threads; capacity: {_param_counts()}.",
        "",
        "## Table I: phantom test split",
        "",
        "Per model: the number of seeds, then the mean over seeds of each seed's test-split "
        "mean, ± the half-width of its 95 % t interval over the seeds. Volume convention "
        "(PSNR peak 1, 3D SSIM) and X2CT-GAN's code's convention (x2ct).",
        "",
        "| Model | Seeds | " + " | ".join(name for _, name, _ in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
        *summary_rows(seeds, "test"),
        "",
        "Paired differences per test case, pooled over the seeds that have both models, "
        "mean [95 % bootstrap interval, cases resampled within each seed]:",
        "",
        "| Pair | Seeds | Cases | " + " | ".join(name for _, name, _ in METRICS) + " |",
        "|---|---:|---:|" + "---:|" * len(METRICS),
        *pair_rows(seeds, "test"),
        "",
        "The same differences seed by seed (each seed's mean over its test cases), and their "
        "mean over seeds ± the half-width of the 95 % t interval: the variation from one "
        "training seed to the next, which resampling cases within seeds does not show.",
        "",
        "| Pair | Seeds | PSNR per seed | PSNR over seeds | SSIM over seeds |",
        "|---|---:|---|---:|---:|",
        *seed_rows(seeds, "test"),
        "",
        "- " + verdict(seeds),
        "- " + verdict(seeds, "CVAA-GAN", "3DCNN") + " (3DCNN, a 3D U-Net on back-projected "
        "X-rays trained without a discriminator, led at this scale before too; what was "
        "ruled out and the likely cause — 32³ phantoms that favour ray-aligned 3D "
        "convolution — are in [results_history.md](results_history.md).)",
        "",
        "Paper (private lumbar CT, 2 mm, 128³; convention not stated): "
        + ", ".join(f"{label} {psnr:.2f} dB / {ssim:.4f}" for label, (psnr, ssim)
                    in PAPER.items()) + ".",
        "",
        "![Fig. 2, seed 0](table1_fig2.png)",
        "",
        "## Real CTs of ../shared/data (domain gap)",
        "",
        f"The same models, trained on phantoms only, on the {len(first['mean_volume']['real'])} "
        "real CTs that preprocess (the NIfTI volumes and the DICOM series; the MR is rejected):",
        "",
        "| Model | Seeds | " + " | ".join(name for _, name, _ in METRICS) + " |",
        "|---|---:|" + "---:|" * len(METRICS),
        *summary_rows(seeds, "real"),
        "",
        "The same CTs are evaluated in every seed, so their paired interval resamples the "
        "distinct CTs (each CT's difference averaged over the seeds). With "
        f"{len(first['mean_volume']['real'])} CTs a bootstrap has only a few dozen distinct "
        "resamples and understates the uncertainty: read it with the per-seed row below.",
        "",
        "| Pair | Seeds | Cases | " + " | ".join(name for _, name, _ in METRICS) + " |",
        "|---|---:|---:|" + "---:|" * len(METRICS),
        *pair_rows(seeds, "real"),
        "",
        "| Pair | Seeds | PSNR per seed | PSNR over seeds | SSIM over seeds |",
        "|---|---:|---|---:|---:|",
        *seed_rows(seeds, "real"),
        "",
        "## Training curves (seed 0)",
        "",
        "![curves](table1_curves.png)",
        "",
        "## History",
        "",
        "The earlier single-seed tables, with the old X2CT-GAN baseline, are in "
        "[results_history.md](results_history.md).",
        "",
    ]
    path.write_text("\n".join(lines))
    return path.read_text()


if __name__ == "__main__":
    sys.exit(main())
