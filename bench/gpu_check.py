"""One-command GPU check: step time, memory, FLOPs, DRR, reconstruction and a Ray Train run.

On one CUDA GPU, in under 8 minutes, it measures at the paper preset (128^3 CT, 128^2
X-rays) and writes a Markdown report (default ``docs/performance.md``):

* per generator (``cvaa``, ``x2ct``, ``3dcnn``, ``psr``), batch 1 / 2 / 4, bf16 / fp32,
  activation checkpointing off / on: one D+G step (``cvaa.gan.GANTrainer.step``; G only
  for the generators trained without D), median of ``--steps`` after a warm-up step, with
  ``torch.cuda.synchronize``; peak ``torch.cuda.max_memory_allocated`` (reset per cell);
  an out-of-memory cell reads ``OOM`` and the script goes on;
* FLOPs of that step (forward + backward of D and G, ``torch.utils.flop_counter``), counted
  once per generator and batch in fp32 without checkpointing (the model's work: the
  recomputation of checkpointing is not counted, as in MFU), achieved TFLOP/s and the
  fraction of the device's dense tensor-core peak for the dtype (``PEAK_TFLOPS``);
* DRR rendering (PA + lateral, ``cvaa.data.drr.render_drr``) and a reconstruction forward
  pass (generator in eval, ``no_grad``, batch 1), ms each;
* a 1-GPU Ray Train run, ``jobs/train.py --preset paper --gpu --epochs 2`` on 16 phantoms
  in a temporary ``CVAA_HOME``, s/epoch from its progress lines (``--no-train`` skips it).

It watches the clock: once ``--budget-s`` (default 480 s) is near, the remaining heavy cells
are skipped and say so. ``--cpu`` runs the same code at the ``cpu`` preset (32^3) on the CPU,
fp32 only unless ``--precisions`` is given and without the training run unless ``--train``,
printing the report (and writing it only with ``--out``): CI runs it so the script does not rot.

    python bench/gpu_check.py                                  # on the GPU node
    python bench/gpu_check.py --no-train --models cvaa x2ct    # steps, DRR, forward only
    python bench/gpu_check.py --cpu --models cvaa --batches 1  # CI smoke run, to stdout
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cvaa.config import ConfigError, load_config  # noqa: E402

ALL_MODELS = ("cvaa", "x2ct", "3dcnn", "psr")

# Dense (non-sparse) tensor-core peaks in TFLOP/s. "fp32" is the TF32 tensor-core peak:
# PyTorch runs fp32 convolutions on TF32 tensor cores by default
# (torch.backends.cudnn.allow_tf32 = True; the report prints both TF32 switches), and the
# convolutions are nearly all of these models' FLOPs. Vendors quote "X | 2X*" with the
# starred value "with sparsity"; these are the unstarred ones. Sources (NVIDIA datasheets):
#   A40:  NVIDIA A40 datasheet: TF32 74.8, BF16 149.7.
#   A100: NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike): TF32 156, BF16 312.
#   H100: NVIDIA H100 Tensor Core GPU datasheet, SXM: TF32 989 / 2, BF16 1979 / 2;
#         PCIe: TF32 756 / 2, BF16 1513 / 2.
#   H200: NVIDIA H200 Tensor Core GPU product page/datasheet, SXM: same as H100 SXM
#         (TF32 989 / 2, BF16 1979 / 2); NVL: TF32 835 / 2, BF16 1671 / 2.
#   L40S: NVIDIA L40S datasheet: TF32 183, BF16 362.05.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A40": {"fp32": 74.8, "bf16": 149.7},
    "A100": {"fp32": 156.0, "bf16": 312.0},
    "H100": {"fp32": 494.7, "bf16": 989.4},          # SXM5 (device name "H100 80GB HBM3")
    "H100 PCIe": {"fp32": 378.0, "bf16": 756.5},
    "H200": {"fp32": 494.7, "bf16": 989.4},          # SXM (device name "NVIDIA H200")
    "H200 NVL": {"fp32": 417.5, "bf16": 835.5},
    "L40S": {"fp32": 183.0, "bf16": 362.05},
}

TRAIN_RESERVE_S = 200.0       # time kept for the Ray Train run (phantoms + 2 epochs)
EPOCH_LINE = re.compile(r"\[train\] epoch\s+(\d+)/(\d+).*?([\d.]+) s/epoch")


def peak_entry(device_name: str) -> str | None:
    """The ``PEAK_TFLOPS`` key for a device name (the longest key it contains), or None."""
    hits = [k for k in PEAK_TFLOPS if k.lower() in device_name.lower()]
    return max(hits, key=len) if hits else None


class Clock:
    """Seconds since start against a budget; says whether a cell of ``cost_s`` still fits."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, cost_s: float = 0.0, reserve_s: float = 0.0) -> bool:
        return self.elapsed() + cost_s + reserve_s < self.budget_s


def make_config(preset: str, name: str, overrides: list[str]):
    """The config for one cell, or the ``ConfigError`` text when an override does not exist
    in this checkout (a setting another branch adds): the cell then says so."""
    try:
        return load_config(preset, overrides=[f"model.generator={name}", *overrides]), None
    except (ConfigError, KeyError) as exc:
        return None, str(exc).splitlines()[0]


def build_trainer(name: str, cfg, device: torch.device):
    from cvaa.gan import GANTrainer
    from cvaa.models import build_discriminator, build_generator

    torch.manual_seed(0)
    g = build_generator(name, cfg).to(device)
    d = build_discriminator(cfg).to(device) if g.uses_discriminator else None
    return GANTrainer(g, d, cfg, device)


def random_batch(cfg, batch: int, device: torch.device):
    s, p = cfg.preprocess.size, cfg.drr.detector_pixels
    return (torch.rand(batch, 2, p, p, device=device),              # (B, 2, P, P)
            torch.rand(batch, 1, s, s, s, device=device))           # (B, 1, D, H, W)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def count_step_flops(name: str, cfg, batch: int, device: torch.device) -> int:
    """FLOPs of one D+G step (forward + backward), fp32, no checkpointing."""
    cfg = cfg.override({"train.precision": "fp32", "model.checkpoint": False})
    if hasattr(cfg.model, "cpu_conv"):
        # FFT convolutions are not counted by FlopCounterMode; count the direct ones.
        cfg = cfg.override({"model.cpu_conv": "direct"})
    trainer = build_trainer(name, cfg, device)
    x, y = random_batch(cfg, batch, device)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(x, y)
    return counter.get_total_flops()


def time_steps(trainer, x, y, steps: int, device: torch.device) -> list[float]:
    """Seconds of ``steps`` steps after one warm-up step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    trainer.step(x, y)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def step_rows(args, device, clock, peak_key, log) -> list[dict]:
    """One row per (model, batch, precision, checkpointing)."""
    rows = []
    for name in args.models:
        last: tuple[float, int] | None = None     # (seconds, batch) of this model's last cell
        for batch in args.batches:
            flops: int | str | None = None
            for precision in args.precisions:
                for ckpt in args.checkpoint:
                    row = {"model": name, "batch": batch, "precision": precision,
                           "checkpoint": ckpt, "status": ""}
                    rows.append(row)
                    overrides = [f"train.precision={precision}",
                                 f"model.checkpoint={'true' if ckpt == 'on' else 'false'}",
                                 *args.set]
                    cfg, missing = make_config(args.preset, name, overrides)
                    if cfg is None:
                        row["status"] = f"n/a: {missing}"
                        continue
                    # A cell costs about the model's last one, scaled by the batch.
                    cost = last[0] * batch / last[1] if last else 0.0
                    if not clock.fits(cost, reserve_s=args.reserve_s):
                        row["status"] = f"skipped (time budget, {clock.elapsed():.0f} s used)"
                        continue
                    started = clock.elapsed()
                    try:
                        if flops is None:
                            flops = count_step_flops(name, cfg, batch, device)
                            free(device)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        trainer = build_trainer(name, cfg, device)
                        x, y = random_batch(cfg, batch, device)
                        times = time_steps(trainer, x, y, args.steps, device)
                        row["step_s"] = statistics.median(times)
                        row["peak_gb"] = peak_memory_gb(device)
                    except RuntimeError as exc:
                        if not is_oom(exc):
                            raise
                        row["status"] = "OOM"
                        if flops is None:
                            flops = "OOM"
                    finally:
                        trainer = x = y = None
                        free(device)
                    last = (clock.elapsed() - started, batch)
                    row["flops"] = flops
                    if "step_s" in row and isinstance(flops, int):
                        row["tflops"] = flops / row["step_s"] / 1e12
                        if peak_key:
                            row["frac"] = row["tflops"] / PEAK_TFLOPS[peak_key][precision]
                    log(f"{name} b{batch} {precision} ckpt {ckpt}: "
                        + (f"{row['step_s'] * 1e3:.1f} ms/step" if "step_s" in row
                           else row["status"]))
    return rows


def median_ms(fn, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def inference_rows(args, device, clock, log) -> list[dict]:
    """DRR (PA + lateral of a phantom) once, and one generator forward per model/precision."""
    from cvaa.data.drr import render_drr
    from cvaa.data.phantom import generate_phantom
    from cvaa.gan import autocast_context
    from cvaa.models import build_generator

    cfg = load_config(args.preset, overrides=args.set)
    size, spacing = cfg.preprocess.size, cfg.preprocess.spacing_mm
    rows = []
    phantom = generate_phantom(0, implants=True, shape=(size,) * 3, spacing_mm=spacing)
    hu = torch.from_numpy(phantom.volume.array.copy()).float()[None, None].to(device)
    ms = median_ms(lambda: render_drr(hu, cfg.drr, spacing_mm=spacing), args.repeats, device)
    p = cfg.drr.detector_pixels
    rows.append({"what": f"DRR PA + lateral, {size}^3 -> 2 x {p}^2", "precision": "fp32",
                 "ms": ms})
    log(f"DRR: {ms:.1f} ms")
    for name in args.models:
        for precision in args.precisions:
            row = {"what": f"reconstruction forward {name}, batch 1", "precision": precision}
            rows.append(row)
            if not clock.fits(reserve_s=args.reserve_s):
                row["status"] = "skipped (time budget)"
                continue
            mcfg = load_config(args.preset, overrides=[f"model.generator={name}", *args.set])
            torch.manual_seed(0)
            g = build_generator(name, mcfg).to(device).eval()
            x = torch.rand(1, 2, p, p, device=device)

            def forward():
                with torch.no_grad(), autocast_context(device, precision):
                    g(x)

            try:
                row["ms"] = median_ms(forward, args.repeats, device)
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                row["status"] = "OOM"
            g = None
            free(device)
            log(f"forward {name} {precision}: {row.get('ms', float('nan')):.1f} ms")
    return rows


def train_row(args, clock, log) -> dict:
    """Run ``jobs/train.py`` for 2 epochs on 16 phantoms; s/epoch from its epoch lines."""
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--preset", args.preset,
           "--epochs", "2", "--set", "data.n_phantoms=16", *(f"--set={s}" for s in args.set)]
    if not args.cpu:
        cmd.append("--gpu")
    shown = ["jobs/train.py", *cmd[2:]]
    row = {"cmd": " ".join(shlex.quote(c) for c in shown), "epochs": {}}
    timeout = args.budget_s - clock.elapsed() - 5
    if timeout < 60:
        row["status"] = f"skipped (time budget, {clock.elapsed():.0f} s used)"
        return row
    with tempfile.TemporaryDirectory(prefix="cvaa-gpu-check-") as home:
        env = {**os.environ, "CVAA_HOME": home}
        env.pop("MLFLOW_TRACKING_URI", None)
        t0 = time.perf_counter()
        # Own session, so a timeout can end the driver and the Ray processes it started.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            row["status"] = f"stopped at the time budget after {timeout:.0f} s"
        row["wall_s"] = time.perf_counter() - t0
    for m in EPOCH_LINE.finditer(out):
        row["epochs"][int(m.group(1))] = float(m.group(3))
    if proc.returncode not in (0, None) and "status" not in row:
        row["status"] = f"failed (exit {proc.returncode}): {out.strip().splitlines()[-1:]}"
    log(f"train: {row.get('status', 'ok')} {row['epochs']}")
    return row


def render(args, device_name, peak_key, steps, infer, train) -> str:
    """The Markdown report."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cfg = load_config(args.preset, overrides=args.set)
    size = cfg.preprocess.size
    gpu = device_name != "cpu"
    unit, scale = ("TFLOP/s", 1.0) if gpu else ("GFLOP/s", 1e3)
    peak_note = (f"`PEAK_TFLOPS[{peak_key!r}]` = {PEAK_TFLOPS[peak_key]} TFLOP/s dense "
                 "(fp32 = TF32 tensor cores)" if peak_key
                 else "unknown device: no fraction" if gpu
                 else "CPU: no fraction here (bench/train_step_bench.py measures one)")
    lines = [
        "# Performance check",
        "",
        f"- device: {device_name}; peak used: {peak_note}",
        f"- torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
           f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
           if gpu else f", {torch.get_num_threads()} threads"),
        f"- date: {now}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"- command: `{args.command}`",
        f"- preset `{args.preset}`: {size}^3 CT, {cfg.drr.detector_pixels}^2 X-rays; "
        f"step = D step + G step (`GANTrainer.step`; G only for 3dcnn/psr), median of "
        f"{args.steps} after a warm-up",
        "",
        "## Training step",
        "",
        "GFLOP/step: forward + backward of D and G counted once per model and batch in fp32 "
        f"without checkpointing (recomputation not counted); {unit} = that / step time.",
        "",
        f"| model | batch | precision | checkpoint | ms/step | peak GB "
        f"({'max allocated' if gpu else 'process RSS so far'}) | GFLOP/step | {unit} | of peak "
        "| note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in steps:
        flops = r.get("flops")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['checkpoint']} | "
            + (f"{r['step_s'] * 1e3:.1f}" if "step_s" in r else (r["status"] or "-")) + " | "
            + (f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-") + " | "
            + (f"{flops / 1e9:.1f}" if isinstance(flops, int) else (flops or "-")) + " | "
            + (f"{r['tflops'] * scale:.3g}" if "tflops" in r else "-") + " | "
            + (f"{100 * r['frac']:.1f}%" if "frac" in r else "-") + " | "
            + (r["status"] if "step_s" in r else "") + " |")
    lines += ["", "## DRR and reconstruction", "",
              f"Median of {args.repeats} after a warm-up.", "",
              "| what | precision | ms |", "|---|---|---:|"]
    for r in infer:
        lines.append(f"| {r['what']} | {r['precision']} | "
                     + (f"{r['ms']:.1f}" if "ms" in r else r.get("status", "-")) + " |")
    lines += ["", "## Ray Train, 1 worker", ""]
    if train is None:
        lines.append("not run (`--no-train`)")
    else:
        lines += [f"`python {train['cmd']}` (temporary `CVAA_HOME`)", "",
                  "| epoch | s/epoch |", "|---:|---:|"]
        lines += [f"| {e} | {s:.1f} |" for e, s in sorted(train["epochs"].items())]
        if "status" in train:
            lines += ["", train["status"]]
        if "wall_s" in train:
            lines += ["", f"whole job {train['wall_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="cpu preset on the CPU (fp32, no training run unless asked)")
    p.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"),
                   help="default: bf16 fp32 on GPU, fp32 on CPU")
    p.add_argument("--checkpoint", nargs="+", choices=("off", "on"), default=["off", "on"],
                   help="activation checkpointing settings to time")
    p.add_argument("--steps", type=int, default=3, help="timed steps per cell after a warm-up")
    p.add_argument("--repeats", type=int, default=5, help="timed DRR / forward calls")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="whole-run time budget; heavy cells past it are skipped")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every cell")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--no-train", action="store_true", help="skip the Ray Train run")
    train.add_argument("--train", action="store_true", help="with --cpu: do the Ray Train run")
    p.add_argument("--out", type=Path,
                   help="Markdown file (default: docs/performance.md on GPU, none with --cpu)")
    p.add_argument("--verbose", action="store_true", help="one line per cell on stderr")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.command = "python bench/gpu_check.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))

    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device; use --cpu for the CPU smoke run")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.preset = "cpu" if args.cpu else "paper"
    args.precisions = args.precisions or (["fp32"] if args.cpu else ["bf16", "fp32"])
    run_train = args.train if args.cpu else not args.no_train
    args.reserve_s = TRAIN_RESERVE_S if run_train else 0.0
    if args.out is None and not args.cpu:
        args.out = ROOT / "docs" / "performance.md"

    def log(line: str) -> None:
        if args.verbose:
            print(f"[gpu_check] {line}", file=sys.stderr, flush=True)

    clock = Clock(args.budget_s)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_key = peak_entry(device_name) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # as a training run would
    infer = inference_rows(args, device, clock, log)
    steps = step_rows(args, device, clock, peak_key, log)
    args.reserve_s = 0.0
    trained = train_row(args, clock, log) if run_train else None
    report = render(args, device_name, peak_key, steps, infer, trained)
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"\nwritten to {args.out} in {clock.elapsed():.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
