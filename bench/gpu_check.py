"""One-command GPU check: step time, memory, FLOPs, DRR, reconstruction and a Ray Train run.

On one CUDA GPU, in under 8 minutes, it measures at the paper preset (128^3 CT, 128^2
X-rays) and writes a Markdown report (default ``docs/performance_gpu.md``):

* per cell of the grid generator x batch x precision x activation checkpointing x
  ``train.compile`` mode x ``train.memory_format`` (where this checkout has the field):
  one D+G step (``cvaa.gan.GANTrainer.step``; G only for the generators trained without
  D), median of ``--steps`` after the cell's warm-up steps (compilation, cuDNN autotuning:
  reported apart as "warm-up s"), with ``torch.cuda.synchronize``; peak
  ``torch.cuda.max_memory_allocated`` (reset per cell); the GPU-busy fraction of the step
  (the CUDA kernel time of one ``torch.profiler`` step over the median step's wall time:
  below 1 the GPU waits for the host); an out-of-memory cell reads ``OOM`` and the
  script goes on; ``--profile DIR`` writes each cell's top kernels (the profiler table);
* FLOPs of that step (forward + backward of D and G, ``torch.utils.flop_counter``), counted
  once per generator and batch in fp32 without checkpointing (the model's work: the
  recomputation of checkpointing is not counted, as in MFU), achieved TFLOP/s and the
  fraction of the device's dense tensor-core peak for the dtype (``PEAK_TFLOPS``);
* DRR rendering (PA + lateral, ``cvaa.data.drr.render_drr``) and a reconstruction forward
  pass (generator in eval, ``no_grad``, batch 1), ms each;
* a 1-GPU Ray Train run, ``jobs/train.py --preset paper --gpu --epochs 2`` on 16 phantoms
  in a temporary ``CVAA_HOME``, s/epoch from its progress lines (``--no-train`` skips it).

It watches the clock against ``--budget-s`` (default 450 s). One-time costs are measured
apart and never charged to a cell's estimate: the device's start (a throwaway step of the
smallest model), FLOP counting (once per generator and batch). A cell is estimated from
what it will really cost: its warm-up as measured for the same compile mode and generator
(or the longest seen in that mode), plus ``--steps`` times its per-step time (the same generator
and settings at another batch, scaled by the batch); a cell that does not fit is skipped
and says so. The default grid (4 generators x batch 4 x bf16 x checkpointing off x compile
none/default) is sized for 8 minutes on one H200 with the Ray Train run: the eager cells
take seconds each (582 ms/step measured), compilation is the unknown (not yet measured at
the paper preset); a compiled cell that would not fit is skipped and says so.
``--cpu`` runs the same code at the ``cpu`` preset (32^3) on the CPU,
fp32 only unless ``--precisions`` is given and without the training run unless ``--train``,
printing the report (and writing it only with ``--out``): CI runs it so the script does not rot.

    python bench/gpu_check.py                                  # on the GPU node
    python bench/gpu_check.py --no-train --models cvaa x2ct    # steps, DRR, forward only
    python bench/gpu_check.py --cpu --models cvaa --batches 1  # CI smoke run, to stdout
    python bench/gpu_check.py --no-train --compile none default max-autotune cudagraphs \
        --memory-format contiguous channels_last --profile OUT/profiles
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
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

COMPILE_MODES = ("-", "none", "default", "max-autotune", "cudagraphs")
FLOP_SECONDS = [0.0]          # time spent counting FLOPs (one-time, reported apart)
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
    """FLOPs of one D+G step (forward + backward), fp32, no checkpointing, of the unpadded
    model (the plain convolutions, whatever the device's formulation)."""
    cfg = cfg.override({"train.precision": "fp32", "model.checkpoint": False})
    if "compile" in train_fields():   # count the model's ops, not a compilation
        cfg = cfg.override({"train.compile": "none"})
    if hasattr(cfg.model, "cpu_conv"):
        # FFT convolutions are not counted by FlopCounterMode; count the direct ones.
        cfg = cfg.override({"model.cpu_conv": "direct"})
    trainer = build_trainer(name, cfg, device)
    # The model's own FLOPs: the plain layers, not the channels that the tensor-core
    # formulation pads with zeros on CUDA (those would inflate TFLOP/s).
    from cvaa.gan import unwrap
    from cvaa.models.blocks import set_cuda_shaped
    for module in (trainer.generator, trainer.discriminator):
        if module is not None:
            set_cuda_shaped(unwrap(module), False)
    x, y = random_batch(cfg, batch, device)
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(x, y)
    return counter.get_total_flops()


def sync_of(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def warm_up(trainer, x, y, device: torch.device, steps: int = 2) -> float:
    """Seconds of the first ``steps`` steps: compilation (each compiled callable builds on
    its first call), cuDNN's algorithm search, the allocator's first blocks."""
    sync = sync_of(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(x, y)
    sync()
    return time.perf_counter() - t0


def time_steps(trainer, x, y, steps: int, device: torch.device,
               clock: "Clock | None" = None) -> list[float]:
    """Seconds of up to ``steps`` steps (already warm); stops early, after at least one,
    when the clock's budget would not hold the next."""
    sync = sync_of(device)
    times: list[float] = []
    for _ in range(steps):
        if times and clock is not None and not clock.fits(max(times)):
            break
        t0 = time.perf_counter()
        trainer.step(x, y)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def profile_step(trainer, x, y, device: torch.device):
    """One step under ``torch.profiler``: ``(kernel seconds or None on a CPU, profiler)``.
    Kernel seconds = the sum of the CUDA kernels' own times (what kept the GPU busy)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync = sync_of(device)
    with profile(activities=activities) as prof:
        trainer.step(x, y)
        sync()
    if device.type != "cuda":
        return None, prof
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernel_us / 1e6, prof


def write_profile(prof, path: Path, device: torch.device, rows: int = 40) -> None:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=rows) + "\n")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def train_fields() -> set[str]:
    """The ``train.*`` fields of this checkout (``compile`` and ``memory_format`` may be
    missing on an older or newer branch: their columns then read n/a)."""
    from cvaa.config import TrainConfig
    return {f.name for f in dataclasses.fields(TrainConfig)}


def start_device(device: torch.device, args) -> float:
    """Seconds of the one-time start (CUDA context, cuBLAS/cuDNN handles): a throwaway
    step of the cheapest generator at batch 1, eager, never charged to a cell."""
    t0 = time.perf_counter()
    cfg, _ = make_config(args.preset, "3dcnn", ["train.precision=fp32", *args.set])
    if cfg is not None:
        trainer = build_trainer("3dcnn", cfg, device)
        warm_up(trainer, *random_batch(cfg, 1, device), device, steps=1)
        trainer = None
        free(device)
    return time.perf_counter() - t0


class CellTimeout(Exception):
    """A cell ran past the time left in the budget (raised by :func:`deadline`)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`CellTimeout` in this (main) thread after ``seconds``: a compilation
    that takes longer than the budget has left ends the cell, not the run."""
    def on_alarm(signum, frame):
        raise CellTimeout(f"stopped after {seconds:.0f} s (time budget)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Estimator:
    """A cell's cost from measured parts: warm-up (per compile mode; per generator when
    seen) + steps x per-step time (per generator and settings, scaled by the batch)."""

    def __init__(self, compile_guess_s: float = 0.0) -> None:
        self.warmup: dict[tuple, float] = {}
        self.step: dict[tuple, tuple[float, int]] = {}
        # A compile mode's warm-up before one was measured: the first compiled cell is
        # charged this guess (not 0), so it is skipped when the budget cannot hold it.
        self.compile_guess_s = compile_guess_s

    def record(self, name: str, settings: tuple, compile_mode: str, batch: int,
               warmup_s: float, step_s: float | None) -> None:
        self.warmup[(name, compile_mode)] = warmup_s
        self.warmup.setdefault(("*", compile_mode), warmup_s)
        self.warmup[("*", compile_mode)] = max(self.warmup[("*", compile_mode)], warmup_s)
        if step_s is not None:
            self.step[(name, settings)] = (step_s, batch)

    def cost(self, name: str, settings: tuple, compile_mode: str, batch: int,
             steps: int) -> float | None:
        """Seconds, or None when nothing comparable was measured yet (run it to learn)."""
        warm = self.warmup.get((name, compile_mode), self.warmup.get(("*", compile_mode)))
        if warm is None and compile_mode not in ("-", "none"):
            warm = self.compile_guess_s
        per = self.step.get((name, settings))
        if per is None:   # the same generator with other settings (e.g. another mode)
            seen = [v for k, v in self.step.items() if k[0] == name]
            per = max(seen) if seen else None
        if per is None and warm:
            return warm   # at least the warm-up; its steps are not known yet
        if warm is None or per is None:
            return None
        # warm-up + timed steps + the profiled step
        return warm + (steps + 1) * per[0] * max(batch / per[1], 1.0)


def step_rows(args, device, clock, peak_key, log, report) -> list[dict]:
    """One row per (model, batch, compile, precision, checkpointing, memory format, cuDNN
    benchmark), in that order of priority: a model's cells in the compile mode training
    uses come first, so a short budget still measures them. Each row reaches the report
    as soon as it is measured (or skipped)."""
    fields = train_fields()
    rows = report.steps
    estimate = Estimator(args.compile_guess_s)
    for name in args.models:
        for batch in args.batches:
            flops: int | str | None = None
            for mode in args.compile:
                for precision in args.precisions:
                    for ckpt in args.checkpoint:
                        for layout in args.memory_format:
                            for bench in args.cudnn_benchmark:
                                row = {"model": name, "batch": batch, "precision": precision,
                                       "checkpoint": ckpt, "compile": mode, "layout": layout,
                                       "cudnn_benchmark": bench, "status": ""}
                                rows.append(row)
                                flops = step_cell(args, device, clock, peak_key, log, row,
                                                  fields, estimate, flops)
                                report.cell("step", row)
    return rows


def step_cell(args, device, clock, peak_key, log, row, fields, estimate, flops):
    """Fills ``row``; returns the (model, batch)'s FLOPs, counted on its first cell."""
    name, batch, precision, ckpt = row["model"], row["batch"], row["precision"], row["checkpoint"]
    mode, layout, bench = row["compile"], row["layout"], row["cudnn_benchmark"]
    overrides = [f"train.precision={precision}",
                 f"model.checkpoint={'true' if ckpt == 'on' else 'false'}"]
    if bench != "-":
        overrides.append(f"train.cudnn_benchmark={'true' if bench == 'on' else 'false'}")
    missing = [f"train.{k}" for k, v in (("compile", mode), ("memory_format", layout))
               if v != "-" and k not in fields]
    if missing:
        row["status"] = f"n/a: no {', '.join(missing)} in this checkout"
        return flops
    if mode != "-":
        overrides.append(f"train.compile={mode}")
    if layout != "-":
        overrides.append(f"train.memory_format={layout}")
    cfg, error = make_config(args.preset, name, [*overrides, *args.set])
    if cfg is None:
        row["status"] = f"n/a: {error}"
        return flops
    settings = (precision, ckpt, layout, bench)
    cost = estimate.cost(name, settings, mode, batch, args.steps)
    if not clock.fits(cost or 0.0, reserve_s=args.reserve_s):
        row["status"] = (f"skipped (time budget: ~{cost:.0f} s needed, "
                         f"{clock.budget_s - args.reserve_s - clock.elapsed():.0f} s left)"
                         if cost else f"skipped (time budget, {clock.elapsed():.0f} s used)")
        return flops
    trainer = x = y = prof = None
    if mode not in ("-", "none"):
        # Each cell compiles afresh: the cells of a generator share its forward's code
        # object, whose compiled entries would otherwise pile up to dynamo's recompile
        # limit (beyond it, it runs eager without a word).
        torch._dynamo.reset()
    try:
        if flops is None:      # once per (model, batch), not charged to the cell
            t0 = time.perf_counter()
            flops = count_step_flops(name, cfg, batch, device)
            free(device)
            FLOP_SECONDS[0] += time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            # as training sets it (cvaa.loop.setup)
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        trainer = build_trainer(name, cfg, device)
        x, y = random_batch(cfg, batch, device)
        with deadline(clock.budget_s - clock.elapsed()):
            row["warmup_s"] = warm_up(trainer, x, y, device)
        times = time_steps(trainer, x, y, args.steps, device, clock)
        row["step_s"] = statistics.median(times)
        if len(times) < args.steps:
            row["status"] = f"{len(times)} of {args.steps} steps (time budget)"
        row["peak_gb"] = peak_memory_gb(device)
        kernel_s, prof = profile_step(trainer, x, y, device)
        if kernel_s is not None:
            row["busy"] = kernel_s / row["step_s"]
        if args.profile:
            path = args.profile / f"{name}_b{batch}_{precision}_ckpt-{ckpt}_{mode}_{layout}.txt"
            write_profile(prof, path, device)
            row["profile"] = str(path)
    except CellTimeout as exc:
        row["status"] = f"warm-up {exc}: compilation longer than the budget left"
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        row["status"] = "OOM"
        if flops is None:
            flops = "OOM"
    finally:
        trainer = x = y = prof = None
        free(device)
        if mode not in ("-", "none"):
            torch._dynamo.reset()   # the cell's compiled code and its caches go with it
    if "warmup_s" in row:
        estimate.record(name, settings, mode, batch, row["warmup_s"], row.get("step_s"))
    row["flops"] = flops
    if "step_s" in row and isinstance(flops, int):
        row["tflops"] = flops / row["step_s"] / 1e12
        if peak_key:
            row["frac"] = row["tflops"] / PEAK_TFLOPS[peak_key][precision]
    log(f"{name} b{batch} {precision} ckpt {ckpt} compile {mode} layout {layout} "
        f"cudnn.benchmark {bench}: "
        + (f"warm-up {row['warmup_s']:.1f} s, {row['step_s'] * 1e3:.1f} ms/step"
           if "step_s" in row else row["status"]))
    return flops


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


class Report:
    """The report on disk, current after every row: each measured (or skipped) row is
    appended to ``gpu_check.jsonl`` and the Markdown rewritten whole (a temporary file
    renamed over it), so a run cut off at any point leaves what it had measured."""

    def __init__(self, args, device_name: str, peak_key: str | None) -> None:
        self.args, self.device_name, self.peak_key = args, device_name, peak_key
        self.steps: list[dict] = []
        self.infer: list[dict] = []
        self.train: dict | None = None
        self.start = time.perf_counter()
        self.jsonl = args.out.parent / "gpu_check.jsonl" if args.out else None
        if self.jsonl:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl.write_text(json.dumps({"kind": "run", "command": args.command,
                                              "device": device_name, "commit": args.commit,
                                              "torch": torch.__version__,
                                              "cuda": torch.version.cuda}) + "\n")

    def cell(self, kind: str, row: dict) -> None:
        if self.jsonl:
            entry = {"kind": kind, "elapsed_s": round(time.perf_counter() - self.start, 1),
                     **{k: v for k, v in row.items() if k != "profile"}}
            with self.jsonl.open("a") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        self.write()

    def text(self) -> str:
        self.args.flops_s = FLOP_SECONDS[0]
        return render(self.args, self.device_name, self.peak_key, self.steps, self.infer,
                      self.train)

    def write(self) -> None:
        if self.args.out:
            tmp = self.args.out.with_suffix(".partial")
            tmp.write_text(self.text())
            os.replace(tmp, self.args.out)


def inference_rows(args, device, clock, log, report: Report) -> list[dict]:
    """DRR (PA + lateral of a phantom) once, and one generator forward per model/precision."""
    from cvaa.data.drr import render_drr
    from cvaa.data.phantom import generate_phantom
    from cvaa.gan import autocast_context
    from cvaa.models import build_generator

    cfg = load_config(args.preset, overrides=args.set)
    size, spacing = cfg.preprocess.size, cfg.preprocess.spacing_mm
    rows = report.infer
    phantom = generate_phantom(0, implants=True, shape=(size,) * 3, spacing_mm=spacing)
    hu = torch.from_numpy(phantom.volume.array.copy()).float()[None, None].to(device)
    ms = median_ms(lambda: render_drr(hu, cfg.drr, spacing_mm=spacing), args.repeats, device)
    p = cfg.drr.detector_pixels
    rows.append({"what": f"DRR PA + lateral, {size}^3 -> 2 x {p}^2", "precision": "fp32",
                 "ms": ms})
    log(f"DRR: {ms:.1f} ms")
    report.cell("inference", rows[-1])
    for name in args.models:
        for precision in args.precisions:
            row = {"what": f"reconstruction forward {name}, batch 1", "precision": precision}
            rows.append(row)
            if not clock.fits(reserve_s=args.reserve_s):
                row["status"] = "skipped (time budget)"
                report.cell("inference", row)
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
            report.cell("inference", row)
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
        f"- commit: {args.commit}",
        f"- torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
           f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
           f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
           if gpu else f", {torch.get_num_threads()} threads"),
        f"- date: {now}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
        f"- command: `{args.command}`",
        f"- preset `{args.preset}`: {size}^3 CT, {cfg.drr.detector_pixels}^2 X-rays; "
        f"step = D step + G step (`GANTrainer.step`; G only for 3dcnn/psr), median of "
        f"{args.steps} after the cell's warm-up",
        f"- one-time costs, not charged to any cell: device start {args.start_s:.1f} s "
        f"(a throwaway eager step), FLOP counting {args.flops_s:.1f} s in all",
        "",
        "## Training step",
        "",
        "warm-up s: the cell's first two steps (compilation for a compile mode, cuDNN's "
        "algorithm search). GPU busy: CUDA kernel time of one profiled step / the median "
        "step's wall time (below 100% the GPU waits for the host to launch work). "
        "compile: `train.compile`; layout: `train.memory_format`; cudnn.benchmark: "
        "`train.cudnn_benchmark` (`-`: the config's default, what training uses; n/a where "
        "this checkout lacks the field). GFLOP/step: forward + backward of D and G of the "
        "unpadded model, counted once per model and batch in fp32 without checkpointing "
        f"(recomputation not counted); {unit} = that / step time.",
        "",
        f"| model | batch | precision | checkpoint | compile | layout | cudnn.benchmark "
        f"| warm-up s | ms/step "
        f"| GPU busy | peak GB ({'max allocated' if gpu else 'process RSS so far'}) "
        f"| GFLOP/step | {unit} | of peak | note |",
        "|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in steps:
        flops = r.get("flops")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['checkpoint']} | "
            f"{r['compile']} | {r['layout']} | {r.get('cudnn_benchmark', '-')} | "
            + (f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-") + " | "
            + (f"{r['step_s'] * 1e3:.1f}" if "step_s" in r else (r["status"] or "-")) + " | "
            + (f"{100 * r['busy']:.0f}%" if "busy" in r else "-") + " | "
            + (f"{r['peak_gb']:.2f}" if "peak_gb" in r else "-") + " | "
            + (f"{flops / 1e9:.1f}" if isinstance(flops, int) else (flops or "-")) + " | "
            + (f"{r['tflops'] * scale:.3g}" if "tflops" in r else "-") + " | "
            + (f"{100 * r['frac']:.1f}%" if "frac" in r else "-") + " | "
            + (r["status"] if "step_s" in r else "") + " |")
    skipped = [r for r in steps if "step_s" not in r]
    if skipped:
        lines += ["", f"{len(skipped)} of {len(steps)} cells not measured; each row says why."]
    if args.profile:
        lines += ["", f"Top kernels per cell (torch.profiler): `{args.profile}`."]
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
    p.add_argument("--models", nargs="+", choices=ALL_MODELS,
                   help="default: cvaa x2ct on GPU (CVAA-GAN and X2CT-GAN), all on CPU")
    p.add_argument("--batches", nargs="+", type=int, default=[4])
    p.add_argument("--precisions", nargs="+", choices=("bf16", "fp32"),
                   help="default: bf16 fp32 on GPU, fp32 on CPU")
    p.add_argument("--checkpoint", nargs="+", choices=("off", "on"), default=["off"],
                   help="activation checkpointing settings to time")
    p.add_argument("--compile", nargs="+", choices=COMPILE_MODES,
                   help="train.compile modes to time, in this order (default: default "
                        "none on GPU, none on CPU; '-' leaves the config's own)")
    p.add_argument("--compile-guess-s", type=float, default=120.0,
                   help="warm-up charged to a compile mode's first cell before one was "
                        "measured (a cell that would not fit is skipped, and says so)")
    p.add_argument("--cudnn-benchmark", nargs="+", default=["-"], choices=("-", "off", "on"),
                   help="train.cudnn_benchmark settings to time ('-': the config's, as "
                        "training runs)")
    p.add_argument("--memory-format", nargs="+", default=["-"],
                   choices=("-", "auto", "contiguous", "channels_last"),
                   help="train.memory_format settings (where the config has the field)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="write each cell's top kernels (torch.profiler table) here")
    p.add_argument("--steps", type=int, default=5, help="timed steps per cell after a warm-up")
    p.add_argument("--repeats", type=int, default=5, help="timed DRR / forward calls")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="whole-run time budget; heavy cells past it are skipped")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every cell")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--no-train", action="store_true", help="skip the Ray Train run")
    train.add_argument("--train", action="store_true", help="with --cpu: do the Ray Train run")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path,
                     help="Markdown file (default: docs/performance_gpu.md on GPU, none with "
                          "--cpu); gpu_check.jsonl beside it gets each row as it is measured")
    out.add_argument("--out-dir", type=Path,
                     help="folder for performance_gpu.md and gpu_check.jsonl (a GPU "
                          "machine's output folder)")
    p.add_argument("--commit", default=None,
                   help="the code's commit for the report (default: $CVAA_COMMIT, else git)")
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
    args.models = args.models or (list(ALL_MODELS) if args.cpu else ["cvaa", "x2ct"])
    args.precisions = args.precisions or (["fp32"] if args.cpu else ["bf16", "fp32"])
    args.compile = args.compile or (["none"] if args.cpu else ["default", "none"])
    run_train = args.train if args.cpu else not args.no_train
    args.reserve_s = TRAIN_RESERVE_S if run_train else 0.0
    if args.out_dir is not None:
        args.out = args.out_dir / "performance_gpu.md"
    if args.out is None and not args.cpu:
        args.out = ROOT / "docs" / "performance_gpu.md"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    args.commit = args.commit or code_commit()
    args.start_s = args.flops_s = 0.0

    def log(line: str) -> None:
        if args.verbose:
            print(f"[gpu_check] {line}", file=sys.stderr, flush=True)

    clock = Clock(args.budget_s)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_key = peak_entry(device_name) if device.type == "cuda" else None
    report = Report(args, device_name, peak_key)
    args.start_s = start_device(device, args)
    log(f"device start: {args.start_s:.1f} s")
    inference_rows(args, device, clock, log, report)
    step_rows(args, device, clock, peak_key, log, report)
    args.reserve_s = 0.0
    if run_train:
        report.train = train_row(args, clock, log)
        report.cell("train", report.train)
    report.write()
    print(report.text(), end="")
    if args.out:
        print(f"\nwritten to {args.out} in {clock.elapsed():.0f} s", file=sys.stderr)
    return 0


def code_commit() -> str:
    """The commit this code is: ``$CVAA_COMMIT`` (a copy without ``.git``), else git's
    HEAD (with ``+changes`` when the tree differs from it), else ``unknown``."""
    if os.environ.get("CVAA_COMMIT"):
        return os.environ["CVAA_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here; set CVAA_COMMIT)"


if __name__ == "__main__":
    sys.exit(main())
