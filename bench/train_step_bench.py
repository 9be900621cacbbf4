"""Seconds per training step and peak memory of each generator (with D), CPU or CUDA.

One training step = D step (LSGAN, eq. 1) + G step (weighted adversarial + MSE +
projection losses, ``cfg.loss``), as the GAN loop alternates them; generators trained
without D (``3dcnn``, ``psr``) take the G step only. Each model runs in a fresh
subprocess so its peak memory is its own: peak RSS (``resource.getrusage``) on CPU,
``torch.cuda.max_memory_allocated`` on CUDA, where the step runs under bf16 autocast.

    python bench/train_step_bench.py --size 64 --batch 1 --preset paper --steps 3
    python bench/train_step_bench.py --size 128 --models cvaa x2ct --steps 2 --checkpoint
    python bench/train_step_bench.py --size 128 --models cvaa --mode g   # G fwd+bwd only

The first step (allocation, kernel selection) is reported apart; s/step is the mean of the
later ones and "min s" the fastest (the first one alone when ``--steps 1``).

FLOPs: one more step runs under ``torch.utils.flop_counter.FlopCounterMode`` (forward +
backward of D and G, fp32, direct convolutions: FFT ones are not counted), so GFLOP/s =
GFLOP/step / min s. On CPU that is set against this CPU's fp32 matmul peak measured in the
same run (best of ``--matmul-repeats`` ``torch.mm`` of ``--matmul-n``^2 float32, same
thread count). Where the config has ``model.cpu_conv``, cvaa gets an ``fft`` and a
``direct`` row on CPU (unless ``--set model.cpu_conv=...`` picks one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_MODELS = ("cvaa", "x2ct", "3dcnn", "psr")


def _peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def matmul_peak_gflops(n: int, repeats: int) -> float:
    """This CPU's fp32 ``torch.mm`` rate, GFLOP/s: best of ``repeats`` ``(n, n) @ (n, n)``."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)                                                  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def run_one(args: argparse.Namespace) -> dict:
    """Build one model, run ``args.steps`` steps, return timings and memory (in this process)."""
    import torch

    from cvaa.config import load_config

    overrides = [f"preprocess.size={args.size}", f"drr.detector_pixels={args.size}",
                 f"model.checkpoint={'true' if args.checkpoint else 'false'}", *args.set]
    cfg = load_config(args.preset, overrides=overrides)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    step, g_params, d_params = make_step(args, cfg, device, amp=cuda and not args.no_amp)
    times, peak_gb, rss_before = _time_steps(args, step, cuda)
    timed = times[1:] or times
    s, b = args.size, args.batch
    step = None                                       # free it before counting
    flops = count_flops(args, cfg, device)
    return {
        "model": args.model, "size": s, "batch": b, "mode": args.mode,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "amp": "bf16" if cuda and not args.no_amp else "fp32",
        "checkpoint": args.checkpoint,
        "cpu_conv": getattr(cfg.model, "cpu_conv", None),
        "g_params": g_params, "d_params": d_params,
        "first_step_s": times[0], "step_s": sum(timed) / len(timed), "steps": len(times),
        "min_step_s": min(timed), "threads": torch.get_num_threads(),
        "peak_gb": peak_gb, "peak_kind": "cuda max allocated" if cuda else "peak RSS",
        "rss_before_step_gb": rss_before, "flops": flops,
    }


def count_flops(args: argparse.Namespace, cfg, device) -> int:
    """FLOPs of one step (forward + backward), fp32, no checkpointing, direct convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = cfg.override({"model.checkpoint": False})
    if hasattr(cfg.model, "cpu_conv"):
        cfg = cfg.override({"model.cpu_conv": "direct"})   # FFT convs are not counted
    step, _, _ = make_step(args, cfg, device, amp=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def make_step(args: argparse.Namespace, cfg, device, amp: bool):
    """``(step, G params, D params)``: a closure doing one training step on random data."""
    import torch

    from cvaa.losses import generator_loss, lsgan_d_loss, reconstruction_loss
    from cvaa.models import build_discriminator, build_generator, count_parameters

    torch.manual_seed(0)
    g = build_generator(args.model, cfg).to(device)
    adversarial = g.uses_discriminator and args.mode == "step"
    d = build_discriminator(cfg).to(device) if adversarial else None
    g_params, d_params = count_parameters(g), count_parameters(d) if d else 0
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.optim.lr_g,
                             betas=(cfg.optim.beta1, cfg.optim.beta2))
    opt_d = (torch.optim.Adam(d.parameters(), lr=cfg.optim.lr_d,
                              betas=(cfg.optim.beta1, cfg.optim.beta2)) if d else None)
    s, b = args.size, args.batch
    x = torch.rand(b, 2, s, s, device=device)
    y = torch.rand(b, 1, s, s, s, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step() -> None:
        with amp:
            fake = g(x)
        d_fake = None
        if d is not None:
            d.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            with amp:
                loss_d = lsgan_d_loss(d(x, y), d(x, fake.detach()))
            loss_d.backward()
            opt_d.step()
            d.requires_grad_(False)                       # G step: D frozen
            with amp:
                d_fake = d(x, fake)
        opt_g.zero_grad(set_to_none=True)
        if args.mode == "g":
            loss_g = reconstruction_loss(fake, y)
        else:
            loss_g, _ = generator_loss(fake, y, d_fake, cfg.loss)
        loss_g.backward()
        opt_g.step()

    return step, g_params, d_params


def _time_steps(args, step, cuda: bool):
    import torch

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    rss_before = _peak_rss_gb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak_gb = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else _peak_rss_gb()
    return times, peak_gb, rss_before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="volume edge = X-ray edge (voxels)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS)
    p.add_argument("--steps", type=int, default=3, help="steps per model, the first is warm-up")
    p.add_argument("--preset", default="paper", help="config preset for the widths")
    p.add_argument("--mode", choices=("step", "g"), default="step",
                   help="step: D step + G step; g: G forward + backward (MSE) only")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing in G")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides, e.g. model.decoder_channels=[...]")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--matmul-n", type=int, default=2048,
                   help="edge of the float32 torch.mm that measures the CPU's peak")
    p.add_argument("--matmul-repeats", type=int, default=5, help="best of this many torch.mm")
    p.add_argument("--model", help=argparse.SUPPRESS)        # internal: run one model here
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")

    if args.model:
        print(json.dumps(run_one(args)), flush=True)
        return

    import torch

    from cvaa.config import load_config

    on_cpu = args.cpu or not torch.cuda.is_available()
    # Both CPU convolution paths for cvaa where the config has the switch and --set does
    # not pick one.
    conv_choice = (hasattr(load_config(args.preset).model, "cpu_conv") and on_cpu
                   and not any(o.startswith("model.cpu_conv=") for o in args.set))
    runs = []
    for name in args.models:
        if name == "cvaa" and conv_choice:
            runs += [(name, [f"model.cpu_conv={c}"]) for c in ("fft", "direct")]
        else:
            runs.append((name, []))
    peak_gflops = matmul_peak_gflops(args.matmul_n, args.matmul_repeats) if on_cpu else None

    results = []
    for name, extra in runs:
        cmd = [sys.executable, __file__, "--model", name, "--size", str(args.size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--preset", args.preset,
               "--mode", args.mode, "--set", *args.set, *extra]
        cmd += ["--checkpoint"] * args.checkpoint + ["--cpu"] * args.cpu + ["--no-amp"] * args.no_amp
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"# {name} {' '.join(extra)} done in {res['wall_s']:.0f} s", file=sys.stderr,
              flush=True)

    if not results:
        sys.exit("no model finished")
    r0 = results[0]
    print(f"\n{args.size}^3 volume, {args.size}^2 X-rays, batch {args.batch}, preset {args.preset}, "
          f"mode {args.mode}, checkpoint {args.checkpoint}, {r0['device']}, {r0['amp']}")
    if peak_gflops:
        print(f"CPU fp32 matmul peak: {peak_gflops:.1f} GFLOP/s (best of {args.matmul_repeats} "
              f"torch.mm {args.matmul_n}^2, {torch.get_num_threads()} threads); load average "
              f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    head = (f"{'model':<7}{'conv':>7}{'G params':>12}{'D params':>12}{'s/step':>9}{'min s':>8}"
            f"{'1st step s':>12}{'peak GB':>9}{'GFLOP/step':>12}{'GFLOP/s':>9}{'of peak':>9}")
    print(head + f"  ({r0['peak_kind']})")
    print("-" * len(head))
    for r in results:
        d = f"{r['d_params'] / 1e6:.2f} M" if r["d_params"] else "-"
        rate = r["flops"] / r["min_step_s"] / 1e9
        frac = f"{100 * rate / peak_gflops:.1f}%" if peak_gflops else "-"
        print(f"{r['model']:<7}{r.get('cpu_conv') or '-':>7}{r['g_params'] / 1e6:>10.2f} M"
              f"{d:>12}{r['step_s']:>9.2f}{r['min_step_s']:>8.2f}{r['first_step_s']:>12.2f}"
              f"{r['peak_gb']:>9.2f}{r['flops'] / 1e9:>12.2f}{rate:>9.2f}{frac:>9}")
    print("s/step: mean over the steps after the first; min s: the fastest of them (less "
          "sensitive to other jobs sharing the machine). GFLOP/step: forward + backward in "
          "fp32 with direct convolutions (FlopCounterMode); GFLOP/s = GFLOP/step / min s"
          + ("; of peak: against the matmul peak above." if peak_gflops else "."))
    if args.json:
        for r in results:
            r["matmul_peak_gflops"] = peak_gflops
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
