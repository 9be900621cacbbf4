"""Preprocessing throughput: cases per second with 1 and with 2 Ray Data workers.

    python bench/pipeline_bench.py                 # 16 phantoms, paper preset (2 mm, 128^3)
    python bench/pipeline_bench.py --n 8 --preset cpu

Phantoms are generated once (not timed); each measurement prepares them into a fresh output
directory, so nothing is skipped. Prints cases/s per worker count (with the cases per Ray
task the pipeline chose) and the speed-up ratio (target on a 2-core machine: >= 1.7x from
1 to 2 workers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvaa.config import PRESETS, load_config  # noqa: E402
from cvaa.data.dataset import list_inputs  # noqa: E402
from cvaa.distributed.cluster import init_ray  # noqa: E402
from cvaa.distributed.pipeline import ensure_phantoms, run_pipeline  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="phantoms to prepare per measurement")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    cfg = load_config(args.preset, overrides=[f"data.n_phantoms={args.n}"])
    init_ray(num_cpus=max(args.workers))
    with tempfile.TemporaryDirectory(prefix="cvaa-bench-") as tmp:
        phantoms = ensure_phantoms(cfg, str(Path(tmp) / "phantoms"), log=lambda *_: None)
        inputs = list_inputs(phantoms)
        # Warm-up: worker processes, imports, the DRR tables' first build.
        run_pipeline(inputs[:2], cfg, str(Path(tmp) / "warmup"), workers=max(args.workers),
                     log=lambda *_: None)
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        for r in range(args.repeats):
            for w in args.workers:
                out = Path(tmp) / f"out-{w}-{r}"
                start = time.perf_counter()
                m = run_pipeline(inputs, cfg, str(out), workers=w, log=lambda *_: None)
                seconds = time.perf_counter() - start
                assert len(m["prepared"]) == len(inputs), m["rejected"]
                rates[w].append(len(inputs) / seconds)
                print(f"workers={w} repeat={r}: {len(inputs)} cases "
                      f"({m['summary']['cases_per_task']} per task) in {seconds:.1f} s = "
                      f"{len(inputs) / seconds:.3f} cases/s", flush=True)
    best = {w: max(v) for w, v in rates.items()}
    print(f"\npreset {args.preset}, {args.n} phantoms, best of {args.repeats}:")
    for w in args.workers:
        print(f"  {w} worker(s): {best[w]:.3f} cases/s")
    if 1 in best and 2 in best:
        print(f"  speed-up 1 -> 2 workers: {best[2] / best[1]:.2f}x (target >= 1.7x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
