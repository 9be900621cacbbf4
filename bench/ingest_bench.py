"""Training ingest: streamed (cvaa.data.stream) against the cached loader it replaced.

    python bench/ingest_bench.py                      # N = 64 and 512 paper-size cases
    python bench/ingest_bench.py --n 16 64 --preset cpu --pace-steps 8   # quick look

The prepared datasets are made once with the real pipeline (phantoms -> Ray Data ->
``cases/*.npz``) under ``--data-dir`` (default ``$CVAA_HOME/bench/ingest``) and copied to a
SeaweedFS S3 server that the benchmark starts (and stops by PID). Each measurement runs
``--workers`` Ray actors (one process per DDP rank, 1 CPU each), every one reading its
rank's share of the training cases exactly as a training worker does, and reports per
worker:

- ``wait %``: the fraction of step time spent waiting for data, over ``--pace-steps``
  steps (at most half the worker's epoch) that each sleep ``--step`` seconds (a stand-in
  for a GPU step), after 2 warm-up steps;
- ``cases/s``: cases delivered per second when nothing else runs (the rest of the epoch,
  no step time): the loader's ceiling;
- ``peak RSS``: the worker's largest resident set over the epoch (sampled every step).

Loaders: ``stream`` is the training path (epoch_plan + CaseStream, ``--prefetch`` batches
ahead in ``--threads`` threads, nothing cached); ``augment`` is the same with every
sample's X-rays rendered again from its context CT (``augment.*`` defaults, each thread
rendering single-threaded); ``cached`` is the loader training used
before: a ``DataLoader`` over ``CaseDataset(cache=True)`` with a ``DistributedSampler``, no
loader processes. Targets: stream peak RSS at the largest N <= 1.2x that at the smallest;
stream wait <= 5 % from local disk and S3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the SeaweedFS launcher the tests use

from cvaa.config import PRESETS, load_config  # noqa: E402
from cvaa.data import store  # noqa: E402
from cvaa.data.dataset import PreparedDataset, list_inputs  # noqa: E402

WARMUP = 2


# --------------------------------------------------------------------------- the workers

def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _batches(loader: str, data: str, rank: int, world: int, batch: int, seed: int,
             prefetch: int, threads: int):
    """(iterator of (xrays, ct, n_cases), n_steps) for one rank's first epoch."""
    import torch

    from cvaa.data.stream import CaseStream, epoch_plan

    dataset = PreparedDataset(data)
    train_ids = dataset.split("train")
    if loader in ("stream", "augment"):
        plan = epoch_plan(train_ids, seed=seed, epoch=0, rank=rank, world=world, batch=batch)
        load = dataset.arrays
        if loader == "augment":  # every sample's X-rays rendered again (cvaa.data.augment)
            from cvaa.config import Config
            from cvaa.data.augment import Randomizer

            cfg = Config.from_dict(dataset.config).override({"augment.enabled": True})
            load = Randomizer(dataset.arrays, dataset.context, cfg)
        stream = CaseStream(load, prefetch=prefetch, threads=threads)
        return ((b.xrays, b.ct, len(b.case_ids) if b.weight else 0)
                for b in stream.iterate(plan)), len(plan)
    from torch.utils.data import DataLoader, DistributedSampler

    from cvaa.data.dataset import CaseDataset

    cases = CaseDataset(dataset, train_ids, cache=True)
    sampler = DistributedSampler(cases, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    dl = DataLoader(cases, batch_size=batch, sampler=sampler,
                    generator=torch.Generator().manual_seed(seed))
    return ((x, c, x.shape[0]) for x, c, _ in dl), len(dl)


def run_worker(loader: str, data: str, rank: int, world: int, batch: int, step_s: float,
               pace_steps: int, seed: int, prefetch: int, threads: int,
               env: dict[str, str]) -> dict[str, float]:
    """One rank's epoch: ``pace_steps`` paced steps, then the rest as fast as possible."""
    import torch

    os.environ.update(env)
    torch.set_num_threads(1)
    start_rss = peak = _rss_mb()
    it, n_steps = _batches(loader, data, rank, world, batch, seed, prefetch, threads)
    pace_steps = min(pace_steps, max(1, (n_steps - WARMUP) // 2))  # leave half to drain
    wait = paced = 0.0
    drained_cases, drain_start, steps, checksum = 0, None, 0, 0.0
    while True:
        tick = time.perf_counter()
        item = next(it, None)
        got = time.perf_counter()
        if item is None:
            break
        xrays, ct, n = item
        checksum += float(ct[:, :, ::16, ::16, ::16].sum())  # touch the data
        if steps < WARMUP + pace_steps:
            time.sleep(step_s)                               # the stand-in GPU step
            if steps >= WARMUP:
                wait += got - tick
                paced += time.perf_counter() - tick
        else:
            drain_start = drain_start or tick
            drained_cases += n
        steps += 1
        peak = max(peak, _rss_mb())
    drain_s = time.perf_counter() - drain_start if drain_start else 0.0
    return {"wait": wait / paced if paced else float("nan"),
            "cases_per_s": drained_cases / drain_s if drain_s else float("nan"),
            "peak_rss_mb": peak, "start_rss_mb": start_rss, "steps": n_steps,
            "checksum": checksum}


# --------------------------------------------------------------------------- the data

def ensure_dataset(n: int, preset: str, root: Path) -> str:
    """The prepared dataset of ``n`` phantoms at ``preset`` under ``root`` (made once)."""
    from cvaa.distributed.pipeline import ensure_phantoms, run_pipeline

    cfg = load_config(preset, overrides=[f"data.n_phantoms={n}", "data.test_fraction=0"])
    from cvaa.data.dataset import config_hash

    out = root / f"{preset}-{n}"
    if ((out / "manifest.json").exists() and len(PreparedDataset(str(out)).records) >= n
            and PreparedDataset(str(out)).manifest.get("config_hash") == config_hash(cfg)):
        return str(out)
    phantoms = ensure_phantoms(cfg, str(root / f"phantoms-{preset}"), log=print)
    inputs = sorted(list_inputs(phantoms), key=lambda c: c.uri)[:n]
    run_pipeline(inputs, cfg, str(out), source=phantoms, log=print)
    return str(out)


def upload(local: str, uri: str) -> None:
    files = store.list_files(local)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: store.write_bytes(
            store.join(uri, os.path.relpath(f, local)), Path(f).read_bytes()), files))


# --------------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[64, 512])
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--loaders", nargs="+", default=["stream", "cached"],
                   choices=["stream", "augment", "cached"])
    p.add_argument("--batch", type=int, default=1, help="cases per worker and step")
    p.add_argument("--step", type=float, default=0.5, help="stand-in step time (s)")
    p.add_argument("--pace-steps", type=int, default=30)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=str(Path(os.environ.get(
        "CVAA_HOME", Path.home() / ".cvaa")) / "bench" / "ingest"))
    p.add_argument("--prepare-only", action="store_true",
                   help="make the prepared datasets, measure nothing")
    args = p.parse_args()

    import ray

    from cvaa.distributed.cluster import init_ray

    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=max(2, max(args.workers)))
    t0 = time.perf_counter()
    local = {n: ensure_dataset(n, args.preset, root) for n in args.n}
    print(f"datasets ready in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"N={n}: {PreparedDataset(d).manifest.get('summary', {}).get('prepared', len(PreparedDataset(d).records))} cases"
                      for n, d in local.items()))

    if args.prepare_only:
        return 0
    server, tmp = None, None
    sources = {("local", n): d for n, d in local.items()}
    env: dict[str, str] = {}
    if "s3" in args.sources:
        from s3server import SeaweedS3

        tmp = tempfile.mkdtemp(prefix="cvaa-ingest-s3-")
        server = SeaweedS3(tmp).start()
        env = server.env()
        os.environ.update(env)
        server.client().create_bucket(Bucket="ingest")
        for n, d in local.items():
            t = time.perf_counter()
            upload(d, f"s3://ingest/{Path(d).name}")
            print(f"uploaded N={n} to SeaweedFS in {time.perf_counter() - t:.0f} s")
            sources[("s3", n)] = f"s3://ingest/{Path(d).name}"

    # max_calls=1: every measurement in a fresh process (a reused worker would carry the
    # previous one's memory into its RSS).
    remote = ray.remote(num_cpus=1, max_calls=1)(run_worker)
    rows = []
    try:
        for source in args.sources:
            for n in args.n:
                for world in args.workers:
                    for loader in args.loaders:
                        data = sources[(source, n)]
                        refs = [remote.remote(loader, data, r, world, args.batch, args.step,
                                              args.pace_steps, 0, args.prefetch,
                                              args.threads, env) for r in range(world)]
                        res = ray.get(refs)
                        row = {"source": source, "n": n, "workers": world, "loader": loader,
                               "wait": max(r["wait"] for r in res),
                               "cases_per_s": min(r["cases_per_s"] for r in res),
                               "peak_rss_mb": max(r["peak_rss_mb"] for r in res),
                               "start_rss_mb": max(r["start_rss_mb"] for r in res)}
                        rows.append(row)
                        print(f"{source:5s} N={n:<4d} workers={world} {loader:6s}  "
                              f"wait {100 * row['wait']:5.1f} %  "
                              f"{row['cases_per_s']:6.1f} cases/s/worker  "
                              f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args)
    return 0


def report(rows: list[dict], args) -> None:
    print("\n| source | N | workers | loader | data wait (% of step) | cases/s per worker "
          "| peak RSS per worker (MB) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['source']} | {r['n']} | {r['workers']} | {r['loader']} | "
              f"{100 * r['wait']:.1f} | {r['cases_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    lo, hi = min(args.n), max(args.n)
    print()
    for source in args.sources:
        for world in args.workers:
            def pick(n, loader):
                return next((r for r in rows if (r["source"], r["n"], r["workers"],
                                                 r["loader"]) == (source, n, world, loader)),
                            None)
            s_lo, s_hi = pick(lo, "stream"), pick(hi, "stream")
            if s_lo and s_hi and lo != hi:
                ratio = s_hi["peak_rss_mb"] / s_lo["peak_rss_mb"]
                print(f"target RSS  {source} {world} worker(s): stream N={hi} / N={lo} = "
                      f"{ratio:.2f}x (<= 1.2x: {'met' if ratio <= 1.2 else 'MISSED'})")
                c_lo, c_hi = pick(lo, "cached"), pick(hi, "cached")
                if c_lo and c_hi:
                    print(f"            {source} {world} worker(s): cached N={hi} / N={lo} = "
                          f"{c_hi['peak_rss_mb'] / c_lo['peak_rss_mb']:.2f}x")
            for n in args.n:
                s = pick(n, "stream")
                if s:
                    print(f"target wait {source} N={n} {world} worker(s): stream "
                          f"{100 * s['wait']:.1f} % (<= 5 %: "
                          f"{'met' if s['wait'] <= 0.05 else 'MISSED'})")


if __name__ == "__main__":
    threading.current_thread().name = "ingest-bench"
    sys.exit(main())
