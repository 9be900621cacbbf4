"""Training and preparation on one machine without Ray or MLflow (e.g. a short GPU lease).

- :func:`train_local` runs :func:`cvaa.loop.train_epochs`, the loop Ray Train's workers
  run, on one device, with a checkpoint directory per epoch under a local folder (the same
  ``checkpoint.pt`` state); run again, it resumes from the newest checkpoint that loads.
- :func:`prepare_phantoms` and :func:`prepare_inputs` write a prepared dataset (the
  format ``jobs/preprocess.py`` writes) with a process pool on the machine's cores.

Example::

    cfg = load_config("paper", overrides=["data.n_phantoms=268"])
    prepare_phantoms(cfg, "runs/prepared", processes=16)
    result = train_local(cfg, "runs/prepared", "runs/ckpt-cvaa", budget_s=500)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cvaa.config import Config
from cvaa.data.stream import epoch_plan
from cvaa.gan import per_worker_batch
from cvaa.loop import CHECKPOINT_FILE, EpochEnd, format_epoch, setup, train_epochs

# Config keys a resumed run may change: more epochs extend a run (the LR schedule is in
# ``optim``, which must match).
RESUMABLE_CHANGES = ("train.epochs",)


def train_local(cfg: Config, data: str, out_dir: str | Path, *,
                device: torch.device | str | None = None, callbacks: Sequence[Any] = (),
                budget_s: float | None = None, keep: int = 2,
                log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train ``cfg.model.generator`` on the prepared dataset ``data`` on one device.

    Args:
        cfg: the resolved config (``train.num_workers`` is taken as 1).
        data: prepared dataset (local or ``s3://``).
        out_dir: local folder; ``epoch_NNNN/checkpoint.pt`` after each epoch (the last
            ``keep`` kept). A folder with checkpoints is resumed from the newest one that
            loads; its config must equal ``cfg`` but for ``train.epochs``.
        device: default CUDA when there is one, else the CPU.
        callbacks: ``on_epoch_start(epoch, trainer)`` objects (:func:`cvaa.loop.train_epochs`).
        budget_s: stop cleanly, after a checkpoint, once another epoch as long as the
            longest so far (compilation not counted: only a process's first epoch pays
            it) would end after ``budget_s`` seconds from the call (``status``
            ``budget``; the next call resumes).
        log: the console (one line per epoch); ``None``: silent.

    Returns:
        ``{"status": "completed" | "budget" | "nonfinite", "epoch": epochs done,
        "steps": optimizer steps done, "checkpoint": path, "history": ..., "wall_s",
        "message"}``.

    Raises:
        ValueError: ``out_dir`` holds checkpoints of another config.
    """
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.train.num_workers != 1:
        cfg = cfg.override(["train.num_workers=1"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    run = setup(cfg, data, device,
                on_retry=lambda line: say(f"warning: {line}"))
    state, warnings, path = latest_state(out, device)
    if state is not None:
        _check_same_config(Config.from_dict(state["config"]).flat(), cfg.flat(), path)
    steps_per_epoch = len(epoch_plan(run.train_ids, seed=cfg.train.seed, epoch=0, rank=0,
                                     world=1, batch=per_worker_batch(cfg)))
    seconds: list[float] = []
    saved = {"checkpoint": str(path) if path else "",
             "epochs": int(state["epoch"]) + 1 if state else 0,
             "history": dict(state["history"]) if state else {}}

    def on_epoch_end(end: EpochEnd) -> dict[str, Any] | None:
        name = f"epoch_{end.epoch + 1:04d}"
        tmp = out / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(end.state(), tmp / CHECKPOINT_FILE)
        shutil.rmtree(out / name, ignore_errors=True)
        os.replace(tmp, out / name)  # a directory appears whole or not at all
        saved.update(checkpoint=str(out / name / CHECKPOINT_FILE), epochs=end.epoch + 1,
                     history=dict(end.history))
        for old in _checkpoint_dirs(out)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        # The epoch's cost without its compilation (a first epoch's compiled steps), so
        # the budget plans on the step time every later epoch pays.
        seconds.append(float(end.metrics["epoch_seconds"])
                       - float(end.metrics.get("compile_seconds", 0.0)))
        recent = seconds[-5:]
        eta = (cfg.train.epochs - end.epoch - 1) * sum(recent) / len(recent)
        say(format_epoch(end.metrics, cfg.train.epochs, eta))
        if (not end.last and budget_s is not None
                and time.perf_counter() - start + max(seconds) > budget_s):
            return {"status": "budget", "epoch": end.epoch + 1}
        return None

    outcome = train_epochs(run, on_epoch_end=on_epoch_end, callbacks=callbacks, state=state,
                           resume_warnings=warnings, log=say)
    epochs_done = saved["epochs"]
    if outcome["status"] == "budget":
        say(f"stopped for the time budget ({budget_s:g} s) after epoch {epochs_done}/"
            f"{cfg.train.epochs}; run again to resume from {saved['checkpoint']}")
    return {"status": outcome["status"], "epoch": epochs_done,
            "steps": epochs_done * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "checkpoint": saved["checkpoint"], "history": saved["history"],
            "wall_s": time.perf_counter() - start, "message": outcome.get("message", "")}


def _checkpoint_dirs(out: Path) -> list[Path]:
    """``epoch_NNNN`` directories under ``out``, newest first."""
    found = [p for p in out.glob("epoch_*") if p.is_dir() and p.name[6:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[6:]), reverse=True)


def latest_state(out: str | Path, device: torch.device | str = "cpu"
                 ) -> tuple[dict[str, Any] | None, list[str], Path | None]:
    """The newest checkpoint under ``out`` that loads: ``(state, warnings about the
    newer ones skipped, its path)``, or ``(None, warnings, None)`` when none does."""
    warnings: list[str] = []
    for directory in _checkpoint_dirs(Path(out)):
        path = directory / CHECKPOINT_FILE
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            return state, warnings, path
        except (OSError, RuntimeError, EOFError) as exc:
            warnings.append(f"checkpoint {directory} skipped: {exc}")
    return None, warnings, None


def _check_same_config(saved: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    differ = sorted(k for k in set(saved) | set(wanted)
                    if k not in RESUMABLE_CHANGES and saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(f"{path} was written with another config ("
                         + ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now"
                                     for k in differ[:5])
                         + "); use another output folder or delete it")


# --------------------------------------------------------------------------- preparation

def _phantom_record(args: tuple[int, dict[str, Any], str]) -> dict[str, Any]:
    from cvaa.data.dataset import CaseInput, process_case
    from cvaa.data.phantom import phantom_case, phantom_spacing_mm

    index, cfg_dict, output = args
    torch.set_num_threads(1)  # one case per core
    cfg = Config.from_dict(cfg_dict)
    phantom, case = phantom_case(index, cfg, spacing_mm=phantom_spacing_mm(cfg))
    item = CaseInput(f"phantom:{cfg.data.seed}:{index}", case.patient_id, case.patient_id)
    return process_case(item, cfg, output, volume=phantom.volume)


def _input_record(args: tuple[Any, dict[str, Any], str]) -> dict[str, Any]:
    from cvaa.data.dataset import process_case

    item, cfg_dict, output = args
    torch.set_num_threads(1)
    import SimpleITK as sitk  # _need_simpleitk checked it is there
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    return process_case(item, Config.from_dict(cfg_dict), output)


def _need_simpleitk() -> None:
    """Preprocessing (orientation, resampling, reading CTs) is SimpleITK's: say so once,
    not in every case's rejection."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError as exc:
        raise ImportError("preparing CTs and phantoms needs SimpleITK: pip install SimpleITK "
                          "(or carry its wheel, README: \"Table I at paper scale\")") from exc


def _prepare(jobs: list, fn: Callable, cfg: Config, output: str, source: str,
             processes: int, log: Callable[[str], None]) -> dict[str, Any]:
    from cvaa.data.dataset import config_hash, split_by_patient, write_manifest

    start = time.perf_counter()
    Path(output).mkdir(parents=True, exist_ok=True)
    records = []
    # spawn, not fork: torch's thread pools do not survive a fork
    with multiprocessing.get_context("spawn").Pool(max(1, processes)) as pool:
        for record in pool.imap_unordered(fn, [(j, cfg.to_dict(), output) for j in jobs]):
            records.append(record)
            if len(records) % max(1, len(jobs) // 4) == 0 or len(records) == len(jobs):
                log(f"[prepare] {len(records)}/{len(jobs)} cases  "
                    f"{time.perf_counter() - start:.0f} s")
    records.sort(key=lambda r: r["case_id"])
    prepared = [r for r in records if r["status"] == "prepared"]
    rejected = [r for r in records if r["status"] == "rejected"]
    for r in rejected:
        log(f"[prepare] rejected {r['reason']}")
    seconds = time.perf_counter() - start
    manifest = {
        "format": "cvaa-prepared/1", "input": source, "ids": "names", "output": output,
        "config": cfg.to_dict(), "config_hash": config_hash(cfg),
        "split": split_by_patient(prepared, cfg.data.test_fraction, cfg.data.seed),
        "prepared": prepared, "rejected": rejected,
        "summary": {"inputs": len(jobs), "prepared": len(prepared),
                    "rejected": len(rejected), "skipped": 0, "processed": len(jobs),
                    "seconds": round(seconds, 2),
                    "cases_per_second": round(len(jobs) / max(seconds, 1e-9), 3),
                    "workers": processes, "cases_per_task": 1},
    }
    write_manifest(output, manifest)
    log(f"[prepare] prepared {len(prepared)}, rejected {len(rejected)} in {seconds:.1f} s "
        f"with {processes} processes -> {output}")
    return manifest


def _existing(output: str, cfg: Config, n: int) -> dict[str, Any] | None:
    from cvaa.data.dataset import config_hash

    path = Path(output) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    summary = manifest.get("summary", {})
    if manifest.get("config_hash") == config_hash(cfg) and summary.get("inputs") == n \
            and manifest.get("split", {}).get("test") is not None \
            and manifest["config"]["data"] == cfg.to_dict()["data"]:
        return manifest
    return None


def prepare_phantoms(cfg: Config, output: str, *, processes: int | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """``cfg.data.n_phantoms`` synthetic lumbar CTs (seeded by ``cfg.data.seed``), drawn
    and prepared in memory in ``processes`` processes (default: every core), written as a
    prepared dataset at ``output`` with its manifest (train/test split by
    ``cfg.data.test_fraction``). A dataset already there with this config is kept."""
    n = cfg.data.n_phantoms
    have = _existing(output, cfg, n)
    if have is not None:
        log(f"[prepare] {output}: {len(have['prepared'])} phantoms prepared already")
        return have
    _need_simpleitk()
    processes = processes or os.cpu_count() or 1
    log(f"[prepare] drawing and preparing {n} phantoms ({cfg.preprocess.size}^3 at "
        f"{cfg.preprocess.spacing_mm:g} mm) with {processes} processes")
    manifest = _prepare(list(range(n)), _phantom_record, cfg, output,
                        f"phantoms:n={n},seed={cfg.data.seed}", processes, log)
    counts = Counter(r["status"] for r in manifest["prepared"] + manifest["rejected"])
    if counts["prepared"] != n:
        raise RuntimeError(f"{output}: only {counts['prepared']} of {n} phantoms prepared; "
                           "see the rejections in its manifest.json")
    return manifest


def prepare_inputs(source: str, cfg: Config, output: str, *, processes: int | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The CTs under ``source`` (readable case ids), prepared in a process pool; needs
    SimpleITK to read them. A dataset already there with this config is kept."""
    from cvaa.data.dataset import list_inputs

    inputs = list_inputs(source, cfg=cfg)  # DICOM series chosen by cfg.dicom
    have = _existing(output, cfg, len(inputs))
    if have is not None:
        log(f"[prepare] {output}: {len(have['prepared'])} CTs prepared already")
        return have
    _need_simpleitk()
    processes = min(processes or os.cpu_count() or 1, max(1, len(inputs)))
    return _prepare(inputs, _input_record, cfg, output, source, processes, log)
