"""The Ray Data pipeline behind ``jobs/preprocess.py``: one task per CT, in parallel.

Each task runs :func:`cvaa.data.dataset.process_case` (read -> orient -> resample -> DRR ->
crop -> clip -> normalise -> write) and returns only the case's small record, so the
driver never holds volumes. A task that raises is caught inside it and recorded as a
rejection; a task whose worker dies (out of memory, segfault) is retried by Ray and, if it
keeps dying, reported as rejected by the driver: every input ends up prepared or rejected.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict
from typing import Any

from cvaa.config import Config
from cvaa.data.dataset import (CaseInput, config_hash, previous_outcomes, process_case,
                               split_by_patient, write_manifest)
from cvaa.distributed.cluster import forwarded_env


def _process_row(row: dict[str, Any], cfg_dict: dict[str, Any], output: str) -> dict[str, Any]:
    # One CT per task on one CPU: keep torch and ITK to one thread each, so N tasks on N
    # cores scale instead of fighting over threads.
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    item = CaseInput(row["uri"], row["patient_id"], row["case_id"])
    record = process_case(item, Config.from_dict(cfg_dict), output)
    return {"record": record}


# Ray Data's scheduler waits up to this long for *all* running tasks before it looks at
# the ones that finished (Ray 2.60: 100 ms, twice per task: block, then end of stream).
# With one CT per task and a task per CPU, every finished task leaves its CPU idle for
# that wait: ~0.15 s of every ~0.6 s case on two CPUs (measured, bench/pipeline_bench.py).
# 10 ms keeps the CPUs busy; the driver then uses 5-10 % of one core (measured).
SCHEDULER_WAIT_S = 0.01


@contextlib.contextmanager
def _per_case_scheduling():
    """Tune Ray Data's executor for one-CT-per-task work, for this pipeline only.

    Two settings, restored afterwards: the scheduler's completion wait (above; a module
    constant of Ray Data's executor, left alone where a Ray version lacks it) and the
    per-operator resource reservation, which exists to share CPUs between the operators
    of a multi-stage pipeline and here only holds the second task back for a second.
    """
    import ray.data
    from ray.data._internal.execution import streaming_executor_state as executor_state

    ctx = ray.data.DataContext.get_current()
    saved_reservation = ctx.op_resource_reservation_enabled
    saved_wait = getattr(executor_state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", None)
    ctx.op_resource_reservation_enabled = False
    if saved_wait is not None:
        executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = min(saved_wait, SCHEDULER_WAIT_S)
    try:
        yield ctx
    finally:
        ctx.op_resource_reservation_enabled = saved_reservation
        if saved_wait is not None:
            executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = saved_wait


def run_pipeline(inputs: list[CaseInput], cfg: Config, output: str, *,
                 workers: int | None = None, source: str = "",
                 log=print) -> dict[str, Any]:
    """Prepare every input under ``output``; returns (and writes) the manifest.

    Args:
        inputs: the CTs to prepare (``cvaa.data.dataset.list_inputs``).
        cfg: the resolved config; its preprocess + drr sections decide the content.
        output: local directory or ``s3://`` prefix.
        workers: at most this many cases in flight (default: as many as the cluster's CPUs).
        source: the ``--input`` that named the inputs, recorded in the manifest.
    """
    import ray
    import ray.data

    start = time.perf_counter()
    cfg_hash = config_hash(cfg)
    done = previous_outcomes(output, cfg_hash)
    wanted = {i.case_id for i in inputs}
    done = {k: v for k, v in done.items() if k in wanted}
    todo = [i for i in inputs if i.case_id not in done]
    log(f"[preprocess] {len(inputs)} inputs: {len(done)} already done with config "
        f"{cfg_hash}, {len(todo)} to process")

    results: dict[str, dict[str, Any]] = {}
    if todo:
        with _per_case_scheduling() as ctx:
            ctx.max_errored_blocks = -1   # a block whose worker keeps dying is skipped
            ds = ray.data.from_items([asdict(i) for i in todo], override_num_blocks=len(todo))
            with warnings.catch_warnings():
                # Ray Data retries a dying task forever by default; bound it (a Ray remote
                # arg, which Ray 2.60 warns about but still honours).
                warnings.simplefilter("ignore", DeprecationWarning)
                ds = ds.map(_process_row, num_cpus=1, max_retries=2,
                            fn_kwargs={"cfg_dict": cfg.to_dict(), "output": output},
                            runtime_env={"env_vars": forwarded_env()},
                            compute=(ray.data.TaskPoolStrategy(size=workers)
                                     if workers else None))
            for row in ds.iter_rows():
                results[row["record"]["case_id"]] = row["record"]
    for item in todo:
        if item.case_id not in results:  # its worker died on every try
            results[item.case_id] = {
                "case_id": item.case_id, "patient_id": item.patient_id,
                "source_uri": item.uri, "config_hash": cfg_hash, "status": "rejected",
                "kind": "error", "reason": f"{item.uri}: the worker processing it died "
                                           "(out of memory or a crash) on every retry"}

    records = [done.get(i.case_id) or results[i.case_id] for i in inputs]
    prepared = [r for r in records if r["status"] == "prepared"]
    rejected = [r for r in records if r["status"] == "rejected"]
    seconds = time.perf_counter() - start
    manifest = {
        "format": "cvaa-prepared/1",
        "input": source,
        "output": output,
        "config": cfg.to_dict(),
        "config_hash": cfg_hash,
        "split": split_by_patient(prepared, cfg.data.test_fraction, cfg.data.seed),
        "prepared": prepared,
        "rejected": rejected,
        "summary": {"inputs": len(inputs), "prepared": len(prepared),
                    "rejected": len(rejected), "skipped": len(done),
                    "processed": len(todo), "seconds": round(seconds, 2),
                    "cases_per_second": round(len(todo) / seconds, 3) if todo else 0.0,
                    "workers": workers or int(ray.cluster_resources().get("CPU", 1))},
    }
    write_manifest(output, manifest)
    for r in rejected:
        log(f"[preprocess] rejected {r['reason']}")
    s = manifest["summary"]
    log(f"[preprocess] prepared {s['prepared']}, rejected {s['rejected']} "
        f"({s['skipped']} skipped as already done), {s['seconds']:.1f} s, "
        f"{s['cases_per_second']:.2f} cases/s -> {output}")
    return manifest


# --------------------------------------------------------------------------- phantoms

def phantom_key(cfg: Config) -> str:
    """Cache key of the embedded-default phantom set: count, seed, implants, spacing."""
    import hashlib
    import json

    blob = json.dumps([cfg.data.n_phantoms, cfg.data.seed, cfg.data.phantom_implant_fraction,
                       cfg.preprocess.spacing_mm, cfg.preprocess.size], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def default_phantom_dir(output: str, cfg: Config) -> str:
    """Where the embedded default caches its phantoms: beside ``output``."""
    from cvaa.data import store

    parent = output.rstrip("/").rsplit("/", 1)[0] if "/" in output.rstrip("/") else "."
    return store.join(parent, f"phantoms-{phantom_key(cfg)}")


def phantom_spacing_mm(cfg: Config) -> float:
    """Phantoms are drawn at most 4 mm apart (finer than coarse presets, so resampling to
    the preset averages real structure) and at the preset's spacing when that is finer."""
    return min(4.0, cfg.preprocess.spacing_mm)


def _phantom_row(row: dict[str, Any], cfg_dict: dict[str, Any], out_dir: str) -> dict[str, Any]:
    from cvaa.data import phantom

    cfg = Config.from_dict(cfg_dict)
    uri = phantom.write_phantom_case(int(row["index"]), cfg, out_dir,
                                     spacing_mm=phantom_spacing_mm(cfg))
    return {"uri": uri}


def ensure_phantoms(cfg: Config, out_dir: str, *, log=print) -> str:
    """Generate ``cfg.data.n_phantoms`` synthetic lumbar CTs into ``out_dir`` (one Ray task
    each) unless they are there already; returns ``out_dir`` for ``--input``."""
    import ray.data

    from cvaa.data import store
    from cvaa.data.phantom import phantom_case_name

    n = cfg.data.n_phantoms
    have = {u.rsplit("/", 1)[-1] for u in store.list_files(out_dir)}
    missing = [i for i in range(n) if phantom_case_name(i) not in have]
    if missing:
        log(f"[phantoms] generating {len(missing)} of {n} synthetic lumbar CTs in {out_dir}")
        start = time.perf_counter()
        ds = ray.data.from_items([{"index": i} for i in missing],
                                 override_num_blocks=len(missing))
        ds = ds.map(_phantom_row, fn_kwargs={"cfg_dict": cfg.to_dict(), "out_dir": out_dir},
                    num_cpus=1, runtime_env={"env_vars": forwarded_env()})
        count = sum(1 for _ in ds.iter_rows())
        log(f"[phantoms] {count} generated in {time.perf_counter() - start:.1f} s")
    return out_dir
