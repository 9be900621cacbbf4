"""Post-training evaluation where the compute is: Table I scored by Ray Data actors on the
cluster (``evaluate_on_workers``, what ``jobs/train.py`` runs after training) with 1 and 2
workers, against scoring in the driver process (what it did before), in the same run.

    python bench/eval_bench.py                     # 4 paper-size cases, CVAA-GAN
    python bench/eval_bench.py --preset cpu --cases 16

Uses the prepared paper-size dataset of bench/ingest_bench.py (``--data``; made with the
pipeline when missing) and a freshly initialised generator: the forward cost does not depend
on the weights. Prints wall seconds per engine and the speed-up of 2 workers over 1; the
per-case metrics of every engine must agree (checked, printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvaa.config import PRESETS, load_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--generator", default="cvaa")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data-dir", default=str(Path(os.environ.get(
        "CVAA_HOME", Path.home() / ".cvaa")) / "bench" / "ingest"))
    args = p.parse_args()

    import torch

    from cvaa.data.dataset import PreparedDataset
    from cvaa.distributed.cluster import cluster_cpus, init_ray
    from cvaa.distributed.evaluate import ModelSpec, score_on_cluster
    from cvaa.models import build_generator
    from cvaa.scoring import evaluate_cases

    sys.path.insert(0, str(ROOT / "bench"))
    from ingest_bench import ensure_dataset

    init_ray(num_cpus=max(2, max(args.workers)))
    data = ensure_dataset(64, args.preset, Path(args.data_dir))
    dataset = PreparedDataset(data)
    ids = dataset.split("all")[:args.cases]
    cfg = load_config(args.preset, overrides=[f"model.generator={args.generator}"])
    torch.manual_seed(0)
    generator = build_generator(args.generator, cfg).eval()
    threads = max(1, cluster_cpus() // max(args.workers))
    print(f"{len(ids)} {args.preset} cases ({cfg.preprocess.size}^3), {args.generator}; "
          f"{threads} thread(s) per actor; driver {torch.get_num_threads()} threads")

    import tempfile

    import ray.train

    from cvaa.distributed.checkpoints import write_marker
    from cvaa.distributed.worker import CHECKPOINT_FILE

    ckpt = Path(tempfile.mkdtemp(prefix="cvaa-eval-bench-"))  # as training leaves it
    torch.save({"epoch": 0, "config": cfg.to_dict(),
                "trainer": {"generator": generator.state_dict()}}, ckpt / CHECKPOINT_FILE)
    write_marker(ckpt)
    spec = ModelSpec(checkpoint=ray.train.Checkpoint.from_directory(str(ckpt)))
    results, walls = {}, {}
    tick = time.perf_counter()
    results["driver"] = evaluate_cases(generator, ((torch.from_numpy(x), torch.from_numpy(c))
                                                   for x, c in map(dataset.arrays, ids)),
                                       batch_size=1)
    walls["driver"] = time.perf_counter() - tick
    print(f"driver (in-process)  {walls['driver']:7.1f} s", flush=True)
    for w in args.workers:
        tick = time.perf_counter()
        results[w] = score_on_cluster(spec, data, ids, batch_size=1, workers=w,
                                      threads=threads)
        walls[w] = time.perf_counter() - tick
        print(f"{w} cluster worker(s)  {walls[w]:7.1f} s", flush=True)
    worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
                for key in results for a, b in zip(results[key], results["driver"])
                for k in b)
    print(f"\nlargest relative difference of a per-case metric between engines: {worst:.1e}")
    lo, hi = min(args.workers), max(args.workers)
    if lo != hi:
        ratio = walls[lo] / walls[hi]
        print(f"target: wall falls with workers: {lo} -> {hi} workers {ratio:.2f}x faster "
              f"({'met' if walls[hi] < walls[lo] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
