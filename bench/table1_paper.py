"""Table I at the paper's scale (128³, 2 mm) on one GPU without Ray or MLflow, in pieces
that fit a short lease: CVAA-GAN vs X2CT-GAN vs 3DCNN vs PSR.

    python bench/table1_paper.py --seed-list 0 --models cvaa --budget-s 540   # one lease
    python bench/table1_paper.py --report-only          # docs/results-paper.md from files
    python bench/table1_paper.py --preset cpu --n 4 --test-cases 2 --steps 2 \\
        --models 3dcnn psr --real none --workdir /tmp/t1 --docs /tmp/t1/docs   # smoke run

Per seed: ``--n`` synthetic lumbar phantoms (268: the paper's 212 train / 56 test CTs) are
drawn from the seed and prepared in a process pool on the machine's cores
(:func:`cvaa.local.prepare_phantoms`), the real CTs of ``--real`` too
(:func:`cvaa.local.prepare_inputs`, needs SimpleITK); then every model trains on the same
data with the same seed for the same number of optimizer steps (``--steps``, rounded up to
whole epochs) through :func:`cvaa.local.train_local`, the loop Ray Train's workers run.
A model's result (every test case's and real CT's metrics, its validation curve, steps,
wall time, device, commit, command) goes into ``docs/results/paper-seed-<seed>.json`` as
soon as it is evaluated; a (seed, model) already there is skipped. ``--budget-s`` ends the
command cleanly inside a lease: training stops after a checkpoint (``--workdir``, outside
docs/) when the next epoch would overrun, and the next invocation on the same workdir
resumes it. ``docs/results-paper.md`` is rebuilt from whichever seed files exist, with the
CPU report's statistics (``bench/reproduce_table1.py``: both PSNR/SSIM conventions, paired
differences with bootstrap intervals, per-seed t intervals, a verdict only with 5 seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reproduce_table1 as cpu_report  # noqa: E402  (the report's statistics, shared)

MODELS = cpu_report.MODELS
# The protocol's default: optimizer steps per model (every model the same). At the paper
# preset one epoch is 48 steps (191 training cases after validation, batch 4), and
# CVAA-GAN takes ~0.58 s a step on an H200: 480 steps (10 epochs) are ~5 min of training,
# which with ~2 min of data preparation and ~1 min of evaluation fits one 10-minute
# command. The paper's 200 epochs (~9.6k steps, ~1.7 GPU-hours per model) do not fit a
# lease; see the report's "Protocol" section.
DEFAULT_STEPS = 480
# The real CTs of a developer's checkout (absent on a bare GPU machine).
SHARED_DATA = ROOT.parent / "shared" / "data"
# Seconds of --budget-s kept for evaluating a model after its training stops.
EVAL_RESERVE_S = 60.0


def log(line: str) -> None:
    print(line, flush=True)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch " \
               f"{torch.__version__}, {os.cpu_count()} CPU cores"
    return cpu_report.machine()


def base_config(args, seed: int):
    from cvaa.config import load_config

    return load_config(args.preset, overrides=[
        f"data.n_phantoms={args.n}", f"data.seed={seed}", f"train.seed={seed}",
        f"data.test_fraction={args.test_cases / args.n!r}",
        "train.calibration_cases=0", *args.set])  # the protocol trains on the whole split


def model_config(base, model: str, epochs: int, lr: float):
    half = epochs // 2
    return base.override([f"model.generator={model}", f"train.epochs={epochs}",
                          f"optim.lr_g={lr}", f"optim.lr_d={lr}",
                          f"optim.constant_epochs={half}",
                          f"optim.decay_epochs={epochs - half}"])


def per_case(generator, data: str, split: str, device, batch: int) -> dict:
    """``{case id: metrics}`` of ``generator`` on a split of a prepared dataset."""
    from cvaa.data.dataset import CaseDataset, PreparedDataset
    from cvaa.scoring import evaluate_cases

    ds = PreparedDataset(data)
    ids = ds.split(split)
    cases = CaseDataset(ds, ids, cache=False)
    results = evaluate_cases(generator.to(device), (cases[i] for i in range(len(cases))),
                             batch_size=batch)
    return {c: {k: float(v) for k, v in r.items()} for c, r in zip(ids, results)}


def curve(history: dict, steps_per_epoch: int) -> dict:
    """Validation PSNR/SSIM after each epoch, by optimizer step."""
    psnr = history.get("val/psnr", [])
    return {"step": [(i + 1) * steps_per_epoch for i in range(len(psnr))],
            "val_psnr": [round(v, 4) for v in psnr],
            "val_ssim": [round(v, 5) for v in history.get("val/ssim", [])]}


def run_seed(args, seed: int, result_path: Path, started: float, device) -> bool:
    """Prepare seed ``seed``, train and evaluate the models its file lacks; each finished
    model is written at once. Returns False when the budget stopped it."""
    import torch

    from cvaa.data.dataset import PreparedDataset, training_split
    from cvaa.gan import per_worker_batch
    from cvaa.local import prepare_inputs, prepare_phantoms, train_local
    from cvaa.models import generator_from_state

    done = json.loads(result_path.read_text()) if result_path.exists() else {}
    todo = [m for m in args.models if args.force or MODELS[m] not in done.get("models", {})]
    if not todo:
        log(f"[table1-paper] seed {seed}: "
            f"{', '.join(MODELS[m] for m in args.models)} already in {result_path}")
        return True
    base = base_config(args, seed)
    work = Path(args.workdir) / f"seed-{seed}"
    prepared, real = str(work / "prepared"), str(work / "prepared-real")
    tick = time.perf_counter()
    manifest = prepare_phantoms(base, prepared, processes=args.processes, log=log)
    if args.real != "none":
        prepare_inputs(args.real, base, real, processes=args.processes, log=log)
    prep_s = time.perf_counter() - tick
    ds = PreparedDataset(prepared)
    train_ids, val_ids, _ = training_split(ds, base.train)
    batch = per_worker_batch(base)
    steps_per_epoch = math.ceil(len(train_ids) / batch)
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    protocol = dict(preset=args.preset, n_phantoms=args.n, test_cases=len(manifest["split"]["test"]),
                    steps=epochs * steps_per_epoch, lr=args.lr, overrides=list(args.set))
    differ = {k: (done[k], v) for k, v in protocol.items() if k in done and done[k] != v}
    if differ and done.get("models") and not args.force:
        raise SystemExit(f"{result_path} holds results of another protocol ("
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                         + "): every model of a seed must have the same data and steps; use "
                         "the same options, another --docs, or --force to redo the seed")
    if args.force and differ:
        done["models"] = {}
    commit = cpu_report._git_commit()
    if commit == "unknown" and args.commit:  # a copy of the tree without .git (a lease)
        commit = f"{args.commit} (given with --commit)"
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    if "mean_volume" not in done:
        targets = {"test": (prepared, "test")}
        if args.real != "none":
            targets["real"] = (real, "all")
        done["mean_volume"] = cpu_report.mean_volume_cases(prepared, targets)
        done["mean_volume"].setdefault("real", {})
    done.update(seed=seed, **protocol, epochs=epochs, steps_per_epoch=steps_per_epoch,
                train_cases=len(train_ids), val_cases=len(val_ids), batch=base.train.batch_size,
                spacing_mm=base.preprocess.spacing_mm, size=base.preprocess.size,
                prepare_seconds=round(prep_s, 1), models=done.get("models", {}))
    for model in todo:
        left = None
        if args.budget_s is not None:
            left = args.budget_s - (time.perf_counter() - started) - EVAL_RESERVE_S
            if left <= 0:
                log(f"[table1-paper] seed {seed}: the budget is spent before {MODELS[model]}; "
                    "run again to go on")
                return False
        cfg = model_config(base, model, epochs, args.lr)
        log(f"[table1-paper] seed {seed}: {MODELS[model]}, {epochs} epochs x "
            f"{steps_per_epoch} steps, lr {args.lr:g}, on {device}")
        result = train_local(cfg, prepared, work / f"ckpt-{model}", device=device,
                             budget_s=left, log=log)
        if result["status"] == "nonfinite":
            raise SystemExit(f"{MODELS[model]} (seed {seed}): {result['message']}")
        if result["status"] != "completed":
            log(f"[table1-paper] seed {seed}: {MODELS[model]} stopped after "
                f"{result['steps']} of {epochs * steps_per_epoch} steps for the budget; "
                f"its checkpoint is in {work / f'ckpt-{model}'}: run again to resume")
            return False
        state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
        generator = generator_from_state(state)
        tick = time.perf_counter()
        entry = {"test": per_case(generator, prepared, "test", device, batch),
                 "real": (per_case(generator, real, "all", device, batch)
                          if args.real != "none" else {})}
        history = state["history"]
        entry.update(
            steps=result["steps"], epochs=result["epoch"],
            train_seconds=round(sum(history.get("epoch_seconds", [])), 1),
            eval_seconds=round(time.perf_counter() - tick, 1),
            resumed_at_epoch=history.get("resumed_at_epoch", []),
            curve=curve(history, steps_per_epoch), device=device_name(device),
            commit=commit, command=command)
        done["models"][MODELS[model]] = entry
        result_path.write_text(json.dumps(done, indent=1))
        psnr = sum(c["psnr"] for c in entry["test"].values()) / max(len(entry["test"]), 1)
        log(f"[table1-paper] seed {seed}: {MODELS[model]} test PSNR {psnr:.2f} dB over "
            f"{len(entry['test'])} cases, {entry['train_seconds']:.0f} s training -> "
            f"{result_path}")
    return True


# --------------------------------------------------------------------------- the report

def curve_rows(seeds: list[dict]) -> list[str]:
    """Markdown rows: each (seed, model)'s validation PSNR at a few steps of its curve."""
    rows = []
    for s in seeds:
        for label in MODELS.values():
            c = s["models"].get(label, {}).get("curve")
            if not c or not c["step"]:
                continue
            n = len(c["step"])
            picks = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
            points = ", ".join(f"{c['step'][i]}: {c['val_psnr'][i]:.2f}" for i in picks)
            tail = c["val_psnr"][-1] - c["val_psnr"][max(0, n - 1 - max(1, n // 4))]
            rows.append(f"| {s['seed']} | {label} | {points} | {tail:+.2f} |")
    return rows


def why_protocol(steps_per_epoch: int | str) -> str:
    """The report's justification of the default budget."""
    return (
        "- Why not the paper's 200 epochs: at this scale an epoch is "
        f"{steps_per_epoch} steps and CVAA-GAN took ~0.58 s a step on an H200 "
        "(the project's measurement), so 200 epochs are ~1.7 GPU-hours per model, while a "
        "lease here is 15 minutes of GPU time with at most 10 minutes per command, on a "
        "fresh machine each time. A checkpoint cannot be carried from one lease to the "
        "next (G + D with Adam's moments: ~0.58 GB for CVAA-GAN, ~0.87 GB for X2CT-GAN, "
        "from their parameter counts; a lease carries 64 MiB), so one (seed, model) has "
        "to finish in one command: the default 480 steps (10 epochs, ~5 min of CVAA-GAN "
        "steps) is what fits one 10-minute command with the data preparation (~5-7 s per "
        "phantom on one core measured on the 2-core VM, so ~1.5-2 min on 16 cores) and the "
        "evaluation. The learning rate is the CPU table's 1e-3 rather than the paper's "
        "2e-4, which at a few hundred steps stayed below the mean volume at CPU scale "
        "(results.md). With a workdir that persists (a longer lease, a machine of one's "
        "own) `--steps` can be raised and `--budget-s` splits it over commands: a model "
        "resumes from its checkpoint. Whether this budget is enough is what the validation "
        "curves show. If a first lease shows a model stopping for the budget, every model "
        "of the table needs the lower `--steps` (a seed file refuses a second protocol).")


def write_report(seed_dir: Path, path: Path) -> str:
    """``results-paper.md`` from every ``paper-seed-*.json`` under ``seed_dir``."""
    seeds = [json.loads(p.read_text()) for p in sorted(
        seed_dir.glob("paper-seed-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))]
    lines = ["# Table I at the paper's scale (128³, 2 mm), over seeds", ""]
    run_line = ("`python bench/table1_paper.py --seed-list S --models M --budget-s 540` on "
                "one GPU (README: \"Table I at paper scale\")")
    if not seeds:
        lines += [f"No (seed, model) has been run yet: {run_line}.", "", "## Protocol", "",
                  "- Data per seed: 268 synthetic lumbar phantoms (212 train / 56 test by "
                  "patient, as the paper), `paper` preset (2 mm, 128³, 128² DRRs); a tenth of "
                  "the training patients validate each epoch.",
                  f"- Budget: every model of a seed the same {DEFAULT_STEPS} optimizer steps "
                  "(rounded up to whole epochs), batch 4, Adam 1e-3 for G and D.",
                  why_protocol("about 48"), ""]
        path.write_text("\n".join(lines))
        return path.read_text()
    first = seeds[0]
    counts = {label: sum(label in s["models"] for s in seeds) for label in MODELS.values()}
    devices = sorted({m["device"] for s in seeds for m in s["models"].values()})
    real = any(m.get("real") for s in seeds for m in s["models"].values())
    lines += [
        "Rebuilt by `python bench/table1_paper.py --report-only` from the per-seed files "
        f"`docs/results/paper-seed-*.json` ({len(seeds)} seed file(s): "
        + ", ".join(f"{label} {n}" for label, n in counts.items() if n) + "), each holding "
        f"every test case's metrics with the commit, command and device. Run more with {run_line}.",
        "",
        "## Protocol",
        "",
        f"- Data per seed: {first['n_phantoms']} synthetic lumbar phantoms drawn with that "
        f"seed, `{first['preset']}` preset ({first['spacing_mm']:g} mm, {first['size']}³, "
        f"{first['size']}² DRRs); {first['train_cases'] + first['val_cases']} train / "
        f"{first['test_cases']} test by patient, as the paper's 212 / 56; of the train "
        f"cases {first['val_cases']} validate each epoch (curves below), "
        f"{first['train_cases']} train.",
        f"- Budget: every model of a seed trains on the same data, with the same seed and "
        f"initialisation seed, for the same **{first['steps']} optimizer steps** "
        f"({first['epochs']} epochs × {first['steps_per_epoch']} steps, batch "
        f"{first['batch']}), Adam {first['lr']:g} for G and D, constant for half the epochs "
        "then decaying linearly.",
        why_protocol(first["steps_per_epoch"]),
        f"- Device(s): {'; '.join(devices)}.",
        "",
        "## Table I: phantom test split",
        "",
        "Per model: seeds, then the mean over seeds of each seed's test-split mean ± the "
        "half-width of its 95 % t interval over the seeds. Volume convention (PSNR peak 1, "
        "3D SSIM) and X2CT-GAN's code's convention (x2ct).",
        "",
        "| Model | Seeds | " + " | ".join(n for _, n, _ in cpu_report.METRICS) + " |",
        "|---|---:|" + "---:|" * len(cpu_report.METRICS),
        *cpu_report.summary_rows(seeds, "test"),
        "",
        "Paired differences per test case, pooled over the seeds that have both models, "
        "mean [95 % bootstrap interval, cases resampled within each seed]:",
        "",
        "| Pair | Seeds | Cases | " + " | ".join(n for _, n, _ in cpu_report.METRICS) + " |",
        "|---|---:|---:|" + "---:|" * len(cpu_report.METRICS),
        *cpu_report.pair_rows(seeds, "test"),
        "",
        "| Pair | Seeds | PSNR per seed | PSNR over seeds | SSIM over seeds |",
        "|---|---:|---|---:|---:|",
        *cpu_report.seed_rows(seeds, "test"),
        "",
        "- " + cpu_report.verdict(seeds),
        "- " + cpu_report.verdict(seeds, "CVAA-GAN", "3DCNN"),
        "",
        "Paper (private lumbar CT, 2 mm, 128³, 200 epochs; convention not stated): "
        + ", ".join(f"{label} {psnr:.2f} dB / {ssim:.4f}" for label, (psnr, ssim)
                    in cpu_report.PAPER.items()) + ".",
        "",
        "## Validation curves",
        "",
        "Validation PSNR (dB, volume convention) after each epoch, at five points of each "
        "(seed, model)'s run (step: PSNR), and its change over the last quarter of the run: "
        "a model still climbing there had not converged in the budget, and the ordering at "
        "the end of the budget may still move.",
        "",
        "| Seed | Model | val PSNR by step | last quarter |",
        "|---:|---|---|---:|",
        *curve_rows(seeds),
        "",
    ]
    if real:
        lines += [
            "## Real CTs (domain gap)",
            "",
            "The same models, trained on phantoms only, on the real CTs of ../shared/data "
            "that preprocess (the MR is rejected):",
            "",
            "| Model | Seeds | " + " | ".join(n for _, n, _ in cpu_report.METRICS) + " |",
            "|---|---:|" + "---:|" * len(cpu_report.METRICS),
            *cpu_report.summary_rows(seeds, "real"),
            "",
            "| Pair | Seeds | Cases | " + " | ".join(n for _, n, _ in cpu_report.METRICS) + " |",
            "|---|---:|---:|" + "---:|" * len(cpu_report.METRICS),
            *cpu_report.pair_rows(seeds, "real"),
            "",
        ]
    path.write_text("\n".join(lines))
    return path.read_text()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", choices=["paper", "cpu"])
    p.add_argument("--n", type=int, default=268, help="phantoms per seed (default 268)")
    p.add_argument("--test-cases", type=int, default=56,
                   help="of which test patients (default 56: the paper's 212 / 56)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per model, the same for every model, rounded up "
                        f"to whole epochs (default {DEFAULT_STEPS}; the report says why)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam LR of G and D, every model")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1")
    p.add_argument("--seed-list", type=int, nargs="+", help="exactly these seeds")
    p.add_argument("--budget-s", type=float,
                   help="end cleanly within this many seconds (a lease's command limit)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "table1-paper"),
                   help="prepared data and checkpoints (outside docs/)")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--real", default=None,
                   help="real CTs to evaluate on as the second table ('none': skip; "
                        f"default: {SHARED_DATA} where it exists, else none)")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                   help="processes that draw and prepare the cases")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every model (e.g. train.precision=bf16)")
    p.add_argument("--commit", help="the commit of this tree, recorded when it has no .git "
                                     "(a copy on a lease machine)")
    p.add_argument("--force", action="store_true", help="run finished (seed, model)s again")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.real is None:   # a bare GPU machine has no ../shared
        args.real = str(SHARED_DATA) if (SHARED_DATA / "ct").is_dir() else "none"
        if args.real == "none":
            log(f"[table1-paper] no real CTs at {SHARED_DATA}: the real-CT table is left out "
                "(--real DIR to give some)")
    elif args.real != "none" and not Path(args.real).exists():
        p.error(f"--real {args.real}: no such folder ('none' to leave the real CTs out)")

    started = time.perf_counter()
    docs = Path(args.docs)
    seed_dir = docs / "results"
    seed_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        import torch

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        for seed in args.seed_list or range(args.seeds):
            if not run_seed(args, seed, seed_dir / f"paper-seed-{seed}.json", started, device):
                break
    try:
        report = write_report(seed_dir, docs / "results-paper.md")
    except ImportError as exc:  # scipy, for the intervals, may be missing on a GPU lease
        log(f"[table1-paper] results are in {seed_dir}; the report was not rebuilt ({exc}): "
            "run --report-only where scipy is installed")
        return 0
    log(report)
    log(f"[table1-paper] {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
