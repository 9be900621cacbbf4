"""The Ray Data pipeline behind ``jobs/preprocess.py``: a few CTs per task, in parallel.

Each task runs :func:`cvaa.data.dataset.process_case` (read -> orient -> resample -> DRR ->
crop -> clip -> normalise -> write) over its cases and returns only their small records,
consumed as a stream, so the driver never holds volumes. A case that raises is caught
inside its task and recorded as a rejection; a task whose worker dies (out of memory,
segfault) is retried by Ray; if it keeps dying, its cases are tried again one per task, and
only a case that still kills its worker is reported rejected: every input ends up prepared
or rejected, and one bad case never takes its task-mates with it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from cvaa.config import Config
from cvaa.data import store
from cvaa.data.dataset import (CaseInput, config_hash, previous_outcomes, process_case,
                               split_by_patient, write_manifest)
from cvaa.distributed.cluster import cluster_cpus, forwarded_env
from cvaa.loop import format_duration

if TYPE_CHECKING:
    import ray.data

# At most this many cases per Ray task. Ray Data's scheduler notices a finished task only
# after waiting up to 100 ms for the other running ones (twice: its output, then its end),
# and starts the next one after that: with one ~0.6 s CT per task each CPU idled ~0.25 s
# per case (1.4-1.6x from 1 to 2 workers, bench/pipeline_bench.py); eight per task pay
# it once per ~5 s (95 % busy, measured). Small enough that a dying worker costs little
# to redo and the progress line moves.
CASES_PER_TASK = 8
# Ray Data settings for this pipeline only, restored afterwards (DataContext is
# process-wide): a task whose worker dies on every retry drops its block instead of
# failing the run (its cases are retried one per task, then reported); the per-operator
# CPU reservation, there to share CPUs between the stages of a multi-stage pipeline, is
# off: there is one stage, and with it on the benchmark scaled 1.47x instead of 1.72x.
DATA_CONTEXT_SETTINGS: dict[str, Any] = {"max_errored_blocks": -1,
                                         "op_resource_reservation_enabled": False}
# Seconds between two progress lines (plus a final one): short consoles for any size.
PROGRESS_EVERY_S = 5.0
# Ray retries of a task whose worker died (Ray Data's default is forever).
TASK_RETRIES = 2


def cases_per_task(n_cases: int, workers: int, most: int = CASES_PER_TASK) -> int:
    """Cases per Ray task: up to ``most``, but at least two tasks per worker, so that
    every worker gets work and the last tasks finish together.

    Example:
        >>> cases_per_task(16, 2), cases_per_task(6, 2), cases_per_task(10_000, 64)
        (4, 2, 8)
    """
    return max(1, min(most, math.ceil(n_cases / (2 * workers))))


@contextlib.contextmanager
def _ray_data_settings(settings: dict[str, Any]) -> Iterator[None]:
    """Set fields of Ray Data's process-wide ``DataContext`` while the block runs, then
    put the previous values back (also on an exception)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(ctx, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)


class Progress:
    """One console line per batch of finished cases, at most every ``PROGRESS_EVERY_S``,
    plus a final one: ``[preprocess] 48/64 cases  5.1 cases/s  ETA 3s  rejected 1``."""

    def __init__(self, tag: str, total: int, log: Callable[[str], Any], *,
                 unit: str = "cases", count_rejected: bool = True):
        self.tag, self.total, self.log, self.unit = tag, total, log, unit
        self.count_rejected = count_rejected
        self.done = self.rejected = 0
        self.start = self.last = time.perf_counter()

    def add(self, rejected: bool = False, count: int = 1) -> None:
        """``count`` more cases done (``rejected`` or not); a line if the last is old
        enough."""
        self.done += count
        self.rejected += rejected
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self._line()

    def finish(self) -> None:
        self._line()

    def _line(self) -> None:
        self.last = time.perf_counter()
        rate = self.done / max(self.last - self.start, 1e-9)
        line = f"{self.tag} {self.done}/{self.total} {self.unit}  {rate:.1f} {self.unit}/s"
        if self.done < self.total:
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            line += f"  ETA {format_duration(eta)}"
        if self.count_rejected:
            line += f"  rejected {self.rejected}"
        self.log(line)


def _map_in_tasks(rows: list[dict[str, Any]], fn: Callable, fn_kwargs: dict[str, Any], *,
                  workers: int | None, per_task: int, **remote_args) -> ray.data.Dataset:
    """A dataset of ``fn`` over ``rows``: one block of at most ``per_task`` rows per Ray
    task (``batch_size=None``: the whole block is the batch), one CPU each, at most
    ``workers`` tasks in flight (None: as many as the cluster's CPUs, also as it grows)."""
    import ray.data

    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / per_task))
    with warnings.catch_warnings():
        # max_retries has no named parameter: a Ray remote arg, which Ray 2.60 warns
        # about (RayDeprecationWarning) but honours.
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.map_batches(fn, batch_size=None, batch_format="numpy", num_cpus=1,
                              compute=ray.data.TaskPoolStrategy(size=workers),
                              fn_kwargs=fn_kwargs,
                              runtime_env={"env_vars": forwarded_env()}, **remote_args)


def _process_batch(batch: dict[str, np.ndarray], cfg_dict: dict[str, Any],
                   output: str) -> dict[str, np.ndarray]:
    # One task per CPU: keep torch and ITK to one thread each, so N tasks on N cores
    # scale instead of fighting over threads.
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    cfg = Config.from_dict(cfg_dict)
    records = [process_case(CaseInput(str(uri), str(patient), str(case),
                                      tuple(str(f) for f in files)), cfg, output)
               for uri, patient, case, files in zip(batch["uri"], batch["patient_id"],
                                                    batch["case_id"], batch["files"])]
    # As JSON: prepared and rejected records have different keys, kept exactly as made.
    return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def _process(cases: list[CaseInput], cfg: Config, output: str, *, workers: int | None,
             per_task: int, progress: Progress) -> dict[str, dict[str, Any]]:
    """The records of ``cases`` by case id, streamed in as tasks finish; the cases of a
    task whose worker died on every retry are missing."""
    ds = _map_in_tasks([asdict(i) for i in cases], _process_batch,
                       {"cfg_dict": cfg.to_dict(), "output": output},
                       workers=workers, per_task=per_task, max_retries=TASK_RETRIES)
    records = {}
    for row in ds.iter_rows():
        record = json.loads(row["record"])
        records[record["case_id"]] = record
        progress.add(rejected=record["status"] == "rejected")
    return records


def _worker_died(item: CaseInput, cfg_hash: str) -> dict[str, Any]:
    return {"case_id": item.case_id, "patient_id": item.patient_id, "source_uri": item.uri,
            "config_hash": cfg_hash, "status": "rejected", "kind": "error",
            "reason": f"{item.uri}: the worker processing it died (out of memory or a "
                      "crash) on every retry"}


def run_pipeline(inputs: list[CaseInput], cfg: Config, output: str, *,
                 workers: int | None = None, source: str = "", pseudonymous: bool = False,
                 archive=None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Prepare every input under ``output``; returns (and writes) the manifest.

    Args:
        inputs: the CTs to prepare (``cvaa.data.dataset.list_inputs``).
        cfg: the resolved config; its preprocess + drr sections decide the content.
        output: local directory or ``s3://`` prefix.
        workers: at most this many tasks in flight (default: as many as the cluster's
            CPUs); tasks are sized so that each of them gets at least two.
        source: the ``--input`` that named the inputs, recorded in the manifest.
        pseudonymous: the inputs' ids are pseudonyms (``list_inputs(..., key)``): the
            console then names rejected cases by id only (their files and reasons are in
            the manifest, which alone maps ids to sources).
        archive: the ``cvaa.data.dataset.ArchiveInputs`` the inputs came from, when
            discovered under a directory: its files and series not used (with reasons)
            go to the manifest's ``not_used``, its DICOM summary to ``dicom``.
        log: where the progress lines go.

    Example:
        >>> m = run_pipeline(list_inputs("/data/ct"), load_config("cpu"), "runs/prepared")
        [preprocess] 64 inputs: 0 already done with config b6c00c846171ba4c, 64 to ...
        [preprocess] 48/64 cases  5.1 cases/s  ETA 3s  rejected 1
        [preprocess] 64/64 cases  5.0 cases/s  rejected 1
        [preprocess] rejected /data/ct/mr_0042.nii.gz: intensities cannot be CT in HU: ...
        [preprocess] prepared 63, rejected 1 (0 skipped as already done), 12.9 s, ...
    """
    start = time.perf_counter()
    cfg_hash = config_hash(cfg)
    wanted = {i.case_id for i in inputs}
    done = {k: v for k, v in previous_outcomes(output, cfg_hash).items() if k in wanted}
    todo = [i for i in inputs if i.case_id not in done]
    parallel = workers or cluster_cpus()
    per_task = cases_per_task(len(todo), parallel)
    log(f"[preprocess] {len(inputs)} inputs: {len(done)} already done with config "
        f"{cfg_hash}, {len(todo)} to process"
        + (f" ({per_task} per task, {parallel} in parallel)" if todo else ""))

    results: dict[str, dict[str, Any]] = {}
    if todo:
        progress = Progress("[preprocess]", len(todo), log)
        with _ray_data_settings(DATA_CONTEXT_SETTINGS):
            results = _process(todo, cfg, output, workers=workers, per_task=per_task,
                               progress=progress)
            lost = [i for i in todo if i.case_id not in results]
            if lost and per_task > 1:  # tasks died on every retry: their cases one by one
                log(f"[preprocess] {len(lost)} cases lost with dying workers; retrying "
                    "them one per task")
                results.update(_process(lost, cfg, output, workers=workers, per_task=1,
                                        progress=progress))
                lost = [i for i in lost if i.case_id not in results]
        for item in lost:
            results[item.case_id] = _worker_died(item, cfg_hash)
            progress.add(rejected=True)
        progress.finish()

    records = [done.get(i.case_id) or results[i.case_id] for i in inputs]
    prepared = [r for r in records if r["status"] == "prepared"]
    rejected = [r for r in records if r["status"] == "rejected"]
    seconds = time.perf_counter() - start
    manifest = {
        "format": "cvaa-prepared/1",
        "input": source,
        "ids": "pseudonymous" if pseudonymous else "names",
        "output": output,
        "config": cfg.to_dict(),
        "config_hash": cfg_hash,
        "split": split_by_patient(prepared, cfg.data.test_fraction, cfg.data.seed),
        "prepared": prepared,
        "rejected": rejected,
        "not_used": archive.not_used if archive is not None else [],
        "dicom": archive.manifest_section() if archive is not None else None,
        "summary": {"inputs": len(inputs), "prepared": len(prepared),
                    "rejected": len(rejected), "skipped": len(done),
                    "processed": len(todo), "seconds": round(seconds, 2),
                    "cases_per_second": round(len(todo) / seconds, 3) if todo else 0.0,
                    "workers": parallel, "cases_per_task": per_task},
    }
    write_manifest(output, manifest)
    for r in rejected:
        log(f"[preprocess] rejected {r['case_id']} ({r['kind']}); its file and the reason are "
            f"in {store.join(output, 'manifest.json')}" if pseudonymous
            else f"[preprocess] rejected {r['reason']}")
    s = manifest["summary"]
    log(f"[preprocess] prepared {s['prepared']}, rejected {s['rejected']} "
        f"({s['skipped']} skipped as already done), {s['seconds']:.1f} s, "
        f"{s['cases_per_second']:.2f} cases/s -> {output}")
    return manifest


# --------------------------------------------------------------------------- DICOM headers

# At most this many files per header-reading task: ~1-2 s of work at the measured
# 500-1000 files/s, so Ray Data's per-task scheduling pause (~0.1-0.2 s, see
# CASES_PER_TASK) costs a few per cent, and a dying worker costs little to redo.
FILES_PER_TASK = 1000


def _header_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from cvaa.data.dicom_index import read_header

    return {"header": np.array([json.dumps(read_header(str(u))) for u in batch["uri"]],
                               dtype=object)}


def index_dicom(uris: list[str], *, workers: int | None = None,
                log: Callable[[str], Any] = print) -> Iterator[dict[str, Any]]:
    """The header of every file (``cvaa.data.dicom_index.read_header``), read in parallel
    by Ray Data tasks of up to ``FILES_PER_TASK`` files, streamed back as tasks finish; a
    progress line every few seconds. A file whose worker died on every retry comes back
    as an ``unreadable`` file, so every file is accounted for.

    Example:
        >>> index = index_headers(index_dicom(store.list_files("/pacs/export")))
        [dicom] 48000/52310 files  1840.2 files/s  ETA 2s
    """
    if not uris:
        return
    parallel = workers or cluster_cpus()
    per_task = cases_per_task(len(uris), parallel, most=FILES_PER_TASK)
    progress = Progress("[dicom]", len(uris), log, unit="files", count_rejected=False)
    seen: set[str] = set()
    with _ray_data_settings(DATA_CONTEXT_SETTINGS):
        ds = _map_in_tasks([{"uri": u} for u in uris], _header_batch, {}, workers=workers,
                           per_task=per_task, max_retries=TASK_RETRIES)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            headers = [json.loads(text) for text in batch["header"]]
            seen.update(h["uri"] for h in headers)
            progress.add(count=len(headers))
            yield from headers
    progress.finish()
    if len(seen) < len(uris):
        for u in uris:
            if u not in seen:
                yield {"uri": u, "size": 0, "problem": "unreadable",
                       "reason": "the worker reading its header died on every retry"}


def discover_inputs(source: str, cfg: Config, key: bytes | None, *,
                    workers: int | None = None, log: Callable[[str], Any] = print):
    """``cvaa.data.dataset.archive_inputs`` with the DICOM headers read on the Ray workers:
    the cases under ``source`` and the reason for every file and series not used."""
    from cvaa.data.dataset import archive_inputs

    found = archive_inputs(source, key, cfg,
                           lambda uris: index_dicom(uris, workers=workers, log=log))
    s = found.summary
    if s["files"]:
        kinds = ", ".join(f"{n} {k}" for k, n in s["not_used"].items()) or "none"
        log(f"[dicom] {s['files']} files, {s['studies']} studies, {s['series']} series -> "
            f"{s['cases']} cases in {s['seconds']:.1f} s; not used: {kinds}")
    return found


# --------------------------------------------------------------------------- phantoms

def phantom_key(cfg: Config) -> str:
    """Cache key of the embedded-default phantom set: count, seed, implants, spacing."""
    import hashlib

    blob = json.dumps([cfg.data.n_phantoms, cfg.data.seed, cfg.data.phantom_implant_fraction,
                       cfg.preprocess.spacing_mm, cfg.preprocess.size], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def default_phantom_dir(output: str, cfg: Config) -> str:
    """Where the embedded default caches its phantoms: beside ``output``."""
    from cvaa.data import store

    parent = output.rstrip("/").rsplit("/", 1)[0] if "/" in output.rstrip("/") else "."
    return store.join(parent, f"phantoms-{phantom_key(cfg)}")


def _phantom_batch(batch: dict[str, np.ndarray], cfg_dict: dict[str, Any],
                   out_dir: str) -> dict[str, np.ndarray]:
    from cvaa.data import phantom

    cfg = Config.from_dict(cfg_dict)
    spacing_mm = phantom.phantom_spacing_mm(cfg)
    uris = [phantom.write_phantom_case(int(i), cfg, out_dir, spacing_mm=spacing_mm)
            for i in batch["index"]]
    return {"uri": np.array(uris, dtype=object)}


def ensure_phantoms(cfg: Config, out_dir: str, *, log: Callable[[str], Any] = print) -> str:
    """Generate ``cfg.data.n_phantoms`` synthetic lumbar CTs into ``out_dir`` (a few per
    Ray task) unless they are there already; returns ``out_dir`` for ``--input``."""
    from cvaa.data import store
    from cvaa.data.phantom import phantom_case_name

    n = cfg.data.n_phantoms
    have = {u.rsplit("/", 1)[-1] for u in store.list_files(out_dir)}
    missing = [i for i in range(n) if phantom_case_name(i) not in have]
    if missing:
        log(f"[phantoms] generating {len(missing)} of {n} synthetic lumbar CTs in {out_dir}")
        progress = Progress("[phantoms]", len(missing), log, unit="phantoms",
                            count_rejected=False)
        per_task = cases_per_task(len(missing), cluster_cpus())
        ds = _map_in_tasks([{"index": i} for i in missing], _phantom_batch,
                           {"cfg_dict": cfg.to_dict(), "out_dir": out_dir},
                           workers=None, per_task=per_task)
        for _ in ds.iter_rows():
            progress.add()
        progress.finish()
    return out_dir
