"""Reconstruction latency at the paper size (128^2 X-rays -> 128^3 CT), CPU and CUDA.

Two numbers per generator and device:

* ``forward``: ``G(x)`` for one pair of X-rays (batch 1, eval mode, ``no_grad``): a warm-up
  call, then the median of ``--repeats`` calls.
* ``round trip``: what ``jobs/reconstruct.py`` does after the model is loaded: read two
  16-bit PNG radiographs (DRRs of the real lumbar CT, written once beforehand), window and
  resize them (``cvaa.inference.prepare_xrays``), forward, back to HU and write a
  compressed NIfTI; median of ``--repeats``, with the median of each stage.

On the CPU each generator runs once per ``--cpu-conv`` path of its large 3D kernels
(``model.cpu_conv``; default both ``fft`` and ``direct``), with the peak resident memory of
its forward calls (``peak RSS``: the kernel's high-water mark, reset before each path).

With ``--registry`` it also times the registry lookup and model load
(``cvaa.tracking.load_model`` of ``models:/NAME@bench`` from a temporary SQLite store), the
rest of the CLI's latency. Weights are random (seed 0): the cost does not depend on them.

    python bench/inference_bench.py                          # cvaa + x2ct, CPU (+ CUDA)
    python bench/inference_bench.py --models cvaa --repeats 5 --registry
    python bench/inference_bench.py --preset cpu --repeats 20  # the 32^3 test size
    python bench/inference_bench.py --models cvaa --repeats 1 --threads 2 --cpu-conv fft
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CT = ROOT.parent / "shared" / "data" / "ct" / "abdomen_lumbar_3mm.nii.gz"


def _median_time(fn, repeats: int, sync=lambda: None) -> tuple[float, float, float]:
    """(first call, median of ``repeats`` later calls, median CPU time of those), seconds.

    The process CPU time says how much work a call was when the cores are shared: the
    wall time then depends on the neighbours (and with several threads on spinning).
    """
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return first, statistics.median(times), statistics.median(cpu)


def _reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    """Peak resident memory since the last reset (``VmHWM``), else since the process began."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024          # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--models", nargs="+", default=["cvaa", "x2ct"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--registry", action="store_true",
                   help="also time the registry lookup + model load")
    p.add_argument("--cpu", action="store_true", help="skip CUDA even if present")
    p.add_argument("--cpu-conv", choices=["both", "auto", "fft", "direct"], default="both",
                   help="CPU path of large 3D kernels (model.cpu_conv); both = fft and direct")
    args = p.parse_args(argv)
    cpu_convs = ["fft", "direct"] if args.cpu_conv == "both" else [args.cpu_conv]

    import numpy as np
    import torch
    from PIL import Image

    from cvaa import inference
    from cvaa.config import load_config
    from cvaa.models import build_generator, count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu else [])
    tmp = Path(tempfile.mkdtemp(prefix="cvaa-inference-bench-"))
    rows = []
    for name in args.models:
        cfg = load_config(args.preset, overrides=[f"model.generator={name}"])
        # Real radiograph stand-ins: 16-bit PNGs of the real CT's DRRs at this geometry.
        xrays, _ = inference.xrays_from_ct(str(CT), cfg)
        paths = []
        for view, image in zip(("pa", "lat"), xrays):
            paths.append(tmp / f"{name}_{view}.png")
            Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(paths[-1])
        # CUDA ignores cpu_conv (always cuDNN): one run there.
        runs = [("cpu", c) for c in cpu_convs] + [(d, "auto") for d in devices if d != "cpu"]
        for device, cpu_conv in runs:
            run_cfg = load_config(args.preset, overrides=[f"model.generator={name}",
                                                          f"model.cpu_conv={cpu_conv}"])
            torch.manual_seed(0)
            generator = build_generator(name, run_cfg).eval()
            params = count_parameters(generator)
            g = generator.to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            x = torch.from_numpy(xrays)[None].to(device)

            def forward():
                with torch.no_grad():
                    g(x)

            peak_reset = device == "cpu" and _reset_peak_rss()
            first, fwd, fwd_cpu = _median_time(forward, args.repeats, sync)
            peak = _peak_rss_bytes() if device == "cpu" else None
            stages: dict[str, list[float]] = {"read+prepare": [], "forward": [], "write": []}

            def round_trip():
                start = time.perf_counter()
                pa, lat = (inference.read_xray(q) for q in paths)
                prepared = inference.prepare_xrays(pa, lat, cfg)
                stages["read+prepare"].append(time.perf_counter() - start)
                result = inference.reconstruct_to_file(g, cfg, prepared,
                                                       str(tmp / f"{name}_ct.nii.gz"))
                stages["forward"].append(result.seconds["forward"])
                stages["write"].append(result.seconds["write"])

            _, trip, trip_cpu = _median_time(round_trip, args.repeats)
            med = {f"trip {k}": statistics.median(v[1:]) for k, v in stages.items()}
            conv = cpu_conv if device == "cpu" else "cuDNN"
            rows.append({"model": name, "device": device, "conv": conv, "params": params,
                         "first": first, "peak": peak, "peak reset": peak_reset,
                         "forward": fwd, "forward cpu": fwd_cpu, "trip": trip,
                         "trip cpu": trip_cpu, **med})
            peak_text = f", forward peak RSS {peak / 1e9:.2f} GB" if peak else ""
            print(f"[bench] {name} on {device} ({conv} conv): forward {fwd:.3f} s"
                  f"{peak_text}, round trip {trip:.3f} s", flush=True)
        generator.cpu()
        if args.registry:
            rows[-1]["load"] = _registry_load(generator, cfg, name, tmp)

    size = load_config(args.preset).preprocess.size
    print(f"\nload average {' '.join(f'{v:.1f}' for v in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs")
    print(f"Reconstruction latency, preset {args.preset} ({size}^2 X-rays -> {size}^3 CT), "
          f"batch 1, median of {args.repeats} after a warm-up; torch threads "
          f"{torch.get_num_threads()}")
    if any(r["peak"] and not r["peak reset"] for r in rows):
        print("peak RSS could not be reset between runs: each is the process's peak so far")
    print("| model | device | conv | params (M) | first call s | forward s | forward peak "
          "RSS GB | forward CPU s | read+prepare s | forward (in trip) s | HU + NIfTI write s | "
          "round trip s | round trip CPU s | registry load s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        load = f"{r['load']:.2f}" if "load" in r else "-"
        peak = f"{r['peak'] / 1e9:.2f}" if r["peak"] else "-"
        print(f"| {r['model']} | {r['device']} | {r['conv']} | {r['params'] / 1e6:.1f} | "
              f"{r['first']:.3f} | {r['forward']:.3f} | {peak} | {r['forward cpu']:.3f} | "
              f"{r['trip read+prepare']:.3f} | {r['trip forward']:.3f} | {r['trip write']:.3f} | "
              f"{r['trip']:.3f} | "
              f"{r['trip cpu']:.3f} | {load} |")
    return 0


def _registry_load(generator, cfg, name: str, tmp: Path) -> float:
    """Seconds to look up ``models:/bench-NAME@bench`` and load it (median of 2)."""
    from cvaa import tracking

    uri = f"sqlite:///{tmp}/mlflow.db"
    with tracking.open_run(uri, f"bench-{name}") as run:
        tracking.log_generator(run.run_id, generator, cfg.to_dict(), f"bench-{name}", "bench",
                               uri)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        tracking.load_model(f"models:/bench-{name}@bench", uri)
        times.append(time.perf_counter() - start)
    print(f"[bench] {name}: registry lookup + load {statistics.median(times):.2f} s",
          flush=True)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
