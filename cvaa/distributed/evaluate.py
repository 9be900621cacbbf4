"""The driver side of ``jobs/evaluate.py``: registered models x a prepared split -> Table I
and Fig. 2, written to a directory and logged to an MLflow evaluation run.

Like :mod:`cvaa.distributed.training`, this is an edge module: it reaches MLflow through
:mod:`cvaa.tracking` and Ray (imported lazily). The models run where the compute is, never
on the driver: Ray Data batch inference (``map_batches`` over the case ids with a callable
class, so each actor -- a GPU actor with ``use_gpu`` -- loads the model once and then reads,
predicts and scores its cases, returning only the metrics), and one cluster task per model
for the few volumes of Fig. 2. ``engine="local"`` runs everything in this process instead
(debugging, or a machine without Ray). The post-training Table I of ``jobs/train.py`` uses
the same :func:`score_on_cluster`.

Example:
    >>> out = run(EvalJob(models=["models:/cvaa-gan@candidate", "models:/x2ct@candidate"],
    ...                   data="runs/prepared", out="runs/eval"))
    >>> print(out["table"])
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cvaa import tracking
from cvaa.data.dataset import CaseDataset, PreparedDataset
from cvaa.scoring import TABLE_COLUMNS, evaluate_cases, predict, table_markdown, table_rows
from cvaa.figures import attention_grid, calibration_png, reliability_grid, slice_grid
from cvaa.metrics import evaluate_batch

GROUND_TRUTH = "Ground truth"
ENGINES = ("ray", "local", "auto")  # auto: the same as ray (kept for existing scripts)
# Config keys that must agree between a model and the dataset it is evaluated on.
_SHAPE_KEYS = (("preprocess", "size"), ("drr", "detector_pixels"))


def default_output_root() -> Path:
    return Path(os.environ.get("CVAA_HOME", Path.home() / ".cvaa")) / "evaluations"


@dataclass
class EvalJob:
    """Everything ``jobs/evaluate.py`` resolved from its arguments.

    Args:
        models: model URIs, e.g. ``models:/cvaa-gan@candidate``; one table row each.
        data: prepared dataset (local dir or ``s3://``).
        out: directory for ``table_i.md``, ``table_i.csv``, ``per_case.csv``, ``fig2.png``.
        split: ``test``, ``train`` or ``all``.
        figure_cases: cases shown in Fig. 2 (the first ones of the split, sorted by id).
        engine: ``ray`` (Ray Data on the cluster; ``auto`` is the same) or ``local``
            (this process).
        batch_size: cases per forward pass (and per Ray Data batch).
        workers: Ray Data actors (default: one per GPU with ``use_gpu``, else one per CPU
            of the cluster but one).
        labels: row labels (default: each model's ``NAME@ALIAS (vN)``).
        address: Ray cluster for the ``ray`` engine (default ``RAY_ADDRESS``, else a
            local one started on first need).
    """

    models: Sequence[str]
    data: str
    out: str
    split: str = "test"
    mlflow_uri: str = field(default_factory=tracking.default_tracking_uri)
    figure_cases: int = 2
    engine: str = "ray"
    batch_size: int = 4
    workers: int | None = None
    use_gpu: bool = False
    labels: Sequence[str] | None = None
    run_name: str = ""
    experiment: str = tracking.EXPERIMENT
    address: str | None = None
    verbose: bool = False


def run(job: EvalJob, log=print) -> dict[str, Any]:
    """Evaluate every model on the split, write the outputs, log the MLflow run.

    Returns:
        ``{"table", "rows", "per_case", "figure_columns", "files", "run_id", "engine",
        "labels"}``; ``per_case`` maps each label to the per-case metric dicts in the
        split's order (``case_ids``).

    Raises:
        FileNotFoundError: no prepared dataset at ``job.data``.
        KeyError: an unknown split.
        ValueError: bad arguments, an empty split, or a model whose sizes do not fit the
            dataset.
        tracking.ModelLookupError, tracking.TrackingUnavailableError: from the registry.
    """
    if not job.models:
        raise ValueError("models: give at least one model URI")
    if job.engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {job.engine!r}")
    if job.labels is not None and len(job.labels) != len(job.models):
        raise ValueError(f"labels: {len(job.labels)} given for {len(job.models)} models")
    if job.figure_cases < 0 or job.batch_size < 1:
        raise ValueError("figure_cases must be >= 0 and batch_size >= 1")
    dataset = PreparedDataset(job.data)
    case_ids = dataset.split(job.split)
    if not case_ids:
        raise ValueError(f"{job.data}: split {job.split!r} has no cases")
    models = [tracking.load_model(uri, job.mlflow_uri) for uri in job.models]
    for m in models:
        _check_compatible(m, dataset.config, job.data, log)
    labels = _unique(job.labels or [m.label for m in models])
    engine = "local" if job.engine == "local" else "ray"
    device = torch.device("cuda" if job.use_gpu else "cpu")
    specs = [ModelSpec(uri, job.mlflow_uri) for uri in job.models]
    if engine == "ray":
        from cvaa.distributed.cluster import init_ray

        init_ray(job.address, verbose=job.verbose)  # joins RAY_ADDRESS or starts a local Ray
    log(f"[evaluate] {len(models)} model(s) x {len(case_ids)} {job.split} cases of "
        f"{job.data} ({engine})")

    per_case: dict[str, list[dict[str, float]]] = {}
    for label, m, spec in zip(labels, models, specs):
        start = time.perf_counter()
        if engine == "ray":
            per_case[label] = score_on_cluster(spec, job.data, case_ids,
                                               batch_size=job.batch_size, workers=job.workers,
                                               use_gpu=job.use_gpu)
        else:
            cases = CaseDataset(dataset, case_ids, cache=False)
            per_case[label] = evaluate_cases(m.generator.to(device),
                                             (cases[i] for i in range(len(cases))),
                                             batch_size=job.batch_size)
        log(f"[evaluate] {label}: {len(case_ids)} cases in "
            f"{time.perf_counter() - start:.1f} s")

    rows = table_rows(per_case)
    for row, m in zip(rows, models):
        row["model_uri"], row["version"] = m.uri, m.version
    caption = (f"Table I: {job.split} split of {job.data} ({len(case_ids)} cases); "
               "mean (std) over cases; PSNR in dB")
    table = table_markdown(rows)

    fig_ids = case_ids[:job.figure_cases]
    figure_columns: list[str] = []
    png = b""
    if fig_ids:
        columns = figure_volumes(models, labels, dataset, fig_ids, device,
                                 specs if engine == "ray" else None, job.use_gpu)
        figure_columns = list(columns)
        png = slice_grid(columns, row_labels=fig_ids,
                         title=f"Fig. 2: mid-axial / sagittal / coronal ({job.split} split)")

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table_md": out / "table_i.md", "table_csv": out / "table_i.csv",
             "per_case_csv": out / "per_case.csv"}
    # Models whose version carries a reliability calibration: score vs actual PSNR per
    # case, and the uncertainty and attention figures of the Fig. 2 cases.
    reliability_md, figure_files = [], {}
    for label, m, spec in zip(labels, models, specs):
        if m.calibration is None:
            continue
        start = time.perf_counter()
        # The calibration's quality is not measured on the cases it was fitted on.
        held_out, fitted_on = calibration_held_out(m.calibration, dataset, case_ids)
        if not held_out:
            reliability_md.append(f"Reliability of {label}: not reported: all "
                                  f"{len(case_ids)} cases are ones its calibration was "
                                  "fitted on")
            continue
        result = (reliability_on_cluster if engine == "ray" else _reliability_cases)(
            spec, job.data, held_out, m.calibration,
            [c for c in fig_ids if c in held_out], job.use_gpu, 1)
        psnr_of = dict(zip(case_ids, (r["psnr"] for r in per_case[label])))
        metrics = [psnr_of[c] for c in held_out]
        reliability_md.append(reliability_markdown(label, result["cases"], metrics,
                                                   left_out=fitted_on))
        name = _metric_name(label)
        files[f"reliability_csv_{name}"] = out / f"reliability_{name}.csv"
        files[f"reliability_csv_{name}"].write_text(reliability_csv(result["cases"], metrics))
        figure_files[f"calibration_{name}"] = calibration_png(
            [r["score"] for r in result["cases"]], [r["psnr_low"] for r in result["cases"]],
            [r["psnr_high"] for r in result["cases"]], metrics,
            title=f"{label}: predicted vs actual PSNR")
        for case_id, fig in result["figures"].items():
            figure_files[f"uncertainty_{name}_{case_id}"] = reliability_grid(
                fig["estimate"], fig["uncertainty"], fig["truth"],
                title=f"{label}, {case_id}: {fig['line']}")
            if fig["attention"]:
                figure_files[f"attention_{name}_{case_id}"] = attention_grid(
                    fig["attention"], title=f"{label}, {case_id}: which view CVAA trusted")
        log(f"[evaluate] {label}: reliability of {len(held_out)} cases in "
            f"{time.perf_counter() - start:.1f} s")
    files["table_md"].write_text(f"{caption}\n\n{table}" + "".join(
        f"\n\n{text}" for text in reliability_md))
    files["table_csv"].write_text(table_csv(rows))
    files["per_case_csv"].write_text(per_case_csv(per_case, case_ids))
    if png:
        files["figure"] = out / "fig2.png"
        files["figure"].write_bytes(png)
    for key, data in figure_files.items():
        files[f"figure_{key}"] = out / f"{key}.png"
        files[f"figure_{key}"].write_bytes(data)

    run_id = _log_run(job, rows, files, labels, dataset, case_ids, engine)
    log(f"[evaluate] wrote {out}; MLflow run {run_id} at {job.mlflow_uri}")
    return {"table": table, "caption": caption, "rows": rows, "per_case": per_case,
            "case_ids": case_ids, "figure_columns": figure_columns,
            "files": {k: str(v) for k, v in files.items()}, "run_id": run_id,
            "engine": engine, "labels": labels}


# --------------------------------------------------------------------------- pieces

def _check_compatible(model: tracking.LoadedModel, data_cfg: dict[str, Any], data: str,
                      log) -> None:
    """Sizes must agree; other preprocessing/DRR differences are reported, not fatal."""
    for section, key in _SHAPE_KEYS:
        have, want = model.config[section][key], data_cfg[section][key]
        if have != want:
            raise ValueError(f"{model.uri}: trained with {section}.{key}={have}, but {data} "
                             f"was prepared with {want}; evaluate it on a dataset prepared "
                             "with the model's config")
    for section in ("preprocess", "drr"):
        diff = sorted(k for k in data_cfg[section]
                      if model.config[section].get(k) != data_cfg[section][k])
        if diff:
            log(f"[evaluate] warning: {model.label} was trained with other {section} "
                f"settings than {data} was prepared with: {', '.join(diff)}")


def _unique(labels: Sequence[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, n = label, 2
        while name in out or name == GROUND_TRUTH:
            name, n = f"{label} #{n}", n + 1
        out.append(name)
    return out


def figure_volumes(models: Sequence[tracking.LoadedModel], labels: Sequence[str],
                   dataset: PreparedDataset, case_ids: Sequence[str], device: torch.device,
                   specs: Sequence[ModelSpec] | None = None, use_gpu: bool = False
                   ) -> dict[str, list[np.ndarray]]:
    """``{label: [(D, H, W) per case], ..., "Ground truth": [...]}`` for Fig. 2: predicted
    on cluster workers when ``specs`` are given, else in this process on ``device``."""
    cases = [dataset.load(c) for c in case_ids]
    columns: dict[str, list[np.ndarray]] = {}
    if specs is not None:
        for label, spec in zip(labels, specs):
            columns[label] = predict_on_cluster(spec, dataset.root, case_ids, use_gpu=use_gpu)
    else:
        xrays = torch.from_numpy(np.stack([c["xrays"] for c in cases]))  # (N, 2, P, P)
        for label, m in zip(labels, models):
            pred = predict(m.generator.to(device), xrays).clamp(0, 1)     # (N, 1, D, H, W)
            columns[label] = [p[0].numpy() for p in pred]
    columns[GROUND_TRUTH] = [c["ct"][0] for c in cases]
    return columns


def _metric_keys() -> list[str]:
    return [key for conv in TABLE_COLUMNS.values() for _, key in conv]


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Table I as CSV: one row per model, ``<metric>_mean`` and ``<metric>_std`` columns."""
    fields = ["model", "model_uri", "version", "cases"]
    fields += [f"{k}_{s}" for k in _metric_keys() for s in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def per_case_csv(per_case: dict[str, Sequence[dict[str, float]]],
                 case_ids: Sequence[str]) -> str:
    """One row per (model, case) with every metric."""
    keys = _metric_keys()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "case_id", *keys])
    for label, results in per_case.items():
        for case_id, r in zip(case_ids, results):
            writer.writerow([label, case_id, *(repr(float(r[k])) for k in keys)])
    return buf.getvalue()


def _metric_name(label: str) -> str:
    """``tiny@candidate (v1)`` -> ``tiny_candidate_v1`` (MLflow allows ``[A-Za-z0-9_-./ ]``)."""
    return re.sub(r"[^A-Za-z0-9_\-.]+", "_", label).strip("_") or "model"


def _log_run(job: EvalJob, rows, files, labels, dataset: PreparedDataset,
             case_ids: Sequence[str], engine: str) -> str:
    n_cases = len(case_ids)
    run_name = job.run_name or f"evaluate-{job.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"cvaa.kind": "evaluation", "cvaa.data": job.data, "cvaa.split": job.split,
            "cvaa.models": ", ".join(job.models)}
    with tracking.open_run(job.mlflow_uri, run_name, experiment=job.experiment,
                           tags=tags) as run:
        run.log_params({"data": job.data, "split": job.split, "cases": n_cases,
                        "engine": engine, "figure_cases": job.figure_cases,
                        **{f"model.{i}": f"{label} = {uri}" for i, (label, uri)
                           in enumerate(zip(labels, job.models))}})
        context = "test" if job.split == "test" else "evaluation"
        run.log_datasets(dataset.root, dataset.manifest, {context: (job.split, case_ids)})
        run.set_description("\n".join(
            [f"Table I of {len(job.models)} registered model(s) on the {job.split} split of "
             f"`{job.data}` ({n_cases} cases):", ""]
            + [f"- {r['model']}: PSNR {r['psnr_mean']:.2f} ({r['psnr_std']:.2f}) dB, SSIM "
               f"{r['ssim_mean']:.4f} ({r['ssim_std']:.4f}); x2ct PSNR "
               f"{r['psnr_x2ct_mean']:.2f} dB, SSIM {r['ssim_x2ct_mean']:.4f}"
               for r in rows]))
        metrics = {}
        for row in rows:
            name = _metric_name(row["model"])
            for key in _metric_keys():
                metrics[f"{name}/{key}_mean"] = row[f"{key}_mean"]
                metrics[f"{name}/{key}_std"] = row[f"{key}_std"]
        run.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=0)
        run.log_table(rows, "evaluation/table_i.json")
        for key in files:
            if key in ("table_md", "table_csv", "per_case_csv") or \
                    key.startswith("reliability_csv_"):
                run.log_file(files[key], "evaluation")
            elif key == "figure" or key.startswith("figure_"):
                run.log_file(files[key], "figures")
    return run.run_id


# --------------------------------------------------------------------------- reliability

def _reliability_cases(model: ModelSpec, data: str, case_ids: Sequence[str],
                       calibration_json: str, figure_ids: Sequence[str], use_gpu: bool,
                       threads: float) -> dict[str, Any]:
    """Every case's reliability (score, interval, verdict) with the version's calibration,
    and the figure volumes (estimate, uncertainty, truth, view attention) of
    ``figure_ids``: run on a cluster worker (or here with the local engine)."""
    from cvaa import reliability
    from cvaa.config import Config
    from cvaa.models.fusion import view_attention

    device = _device(use_gpu, threads)
    dataset = PreparedDataset(data)
    generator = model.load().to(device)
    calibration = reliability.ReliabilityCalibration.from_json(calibration_json)
    cfg = Config.from_dict(dataset.config)
    cases, figures = [], {}
    for case_id in case_ids:
        xrays, ct = dataset.arrays(case_id)
        rel = reliability.assess(generator, xrays, cfg, calibration, k=calibration.k)
        cases.append({"case_id": case_id, **rel.assessment.to_dict()})
        if case_id in figure_ids:
            try:
                attention = view_attention(generator, xrays)
            except ValueError:              # a baseline without view attention
                attention = []
            figures[case_id] = {"estimate": rel.estimate, "uncertainty": rel.uncertainty,
                                "truth": ct[0], "attention": attention,
                                "line": rel.assessment.line()[len("reliability: "):]}
    return {"cases": cases, "figures": figures}


def reliability_on_cluster(model: ModelSpec, data: str, case_ids: Sequence[str],
                           calibration_json: str, figure_ids: Sequence[str], use_gpu: bool,
                           threads: float = 1) -> dict[str, Any]:
    """:func:`_reliability_cases` as one cluster task."""
    return _one_task(_reliability_cases, use_gpu, threads, model, data, list(case_ids),
                     calibration_json, list(figure_ids), use_gpu, threads)


def _measure_cases(model: ModelSpec, data: str, case_ids: Sequence[str],
                   cfg: dict[str, Any], k: int, use_gpu: bool, threads: float):
    """:func:`cvaa.reliability.measure_cases` of the model on cases of ``data`` (what a
    calibration is fitted on): run on a cluster worker."""
    from cvaa import reliability
    from cvaa.config import Config

    device = _device(use_gpu, threads)
    dataset = PreparedDataset(data)
    generator = model.load().to(device)
    return reliability.measure_cases(generator, (dataset.arrays(c) for c in case_ids),
                                     Config.from_dict(cfg), k)


def measure_on_cluster(model: ModelSpec, data: str, case_ids: Sequence[str], cfg,
                       k: int, use_gpu: bool, threads: float = 1):
    """:func:`_measure_cases` as one cluster task (with a GPU when ``use_gpu``): the
    ``(rows, psnr, xrays)`` that :meth:`ReliabilityCalibration.fit` takes."""
    return _one_task(_measure_cases, use_gpu, threads, model, data, list(case_ids),
                     cfg.to_dict(), k, use_gpu, threads)


def _one_task(fn, use_gpu: bool, threads: float, *args):
    """``fn(*args)`` as one Ray task with a worker's resources, and its result."""
    import ray

    from cvaa.distributed.cluster import forwarded_env

    env = forwarded_env()
    task = ray.remote(fn).options(**_worker_resources(use_gpu, threads),
                                  runtime_env={"env_vars": env} if env else None)
    return ray.get(task.remote(*args))


def calibration_held_out(calibration_json: str, dataset: PreparedDataset,
                         case_ids: Sequence[str]) -> tuple[list[str], int]:
    """``(case_ids`` the calibration was not fitted on, how many it was) of ``dataset``:
    the calibration names its dataset by :attr:`PreparedDataset.fingerprint`."""
    from cvaa.reliability import ReliabilityCalibration

    calibration = ReliabilityCalibration.from_json(calibration_json)
    if calibration.dataset != dataset.fingerprint:
        return list(case_ids), 0
    fitted = set(calibration.case_ids)
    held_out = [c for c in case_ids if c not in fitted]
    return held_out, len(case_ids) - len(held_out)


def reliability_markdown(label: str, cases: Sequence[dict[str, Any]],
                         actual: Sequence[float], left_out: int = 0) -> str:
    """Score vs actual PSNR per case, with the Spearman correlation and the coverage;
    ``left_out``: the cases of the split the calibration was fitted on (not reported)."""
    from scipy.stats import spearmanr

    inside = [c["psnr_low"] <= y <= c["psnr_high"] for c, y in zip(cases, actual)]
    rho = float(spearmanr([c["score"] for c in cases], actual).statistic) \
        if len(cases) > 2 else float("nan")
    level = 100 * cases[0]["level"] if cases else 0
    lines = [f"Reliability of {label}: Spearman rho {rho:.3f} between the score and the "
             f"actual PSNR; {sum(inside)}/{len(inside)} cases inside the {level:.0f} % "
             "interval" + (f" ({left_out} cases the calibration was fitted on left out)"
                           if left_out else ""), "",
             "| case | actual PSNR | score (predicted PSNR) | interval | verdict |",
             "|---|---:|---:|---|---|"]
    for c, y in zip(cases, actual):
        lines.append(f"| {c['case_id']} | {y:.2f} | {c['score']:.2f} | "
                     f"{c['psnr_low']:.2f}-{c['psnr_high']:.2f} | {c['verdict']} |")
    return "\n".join(lines)


def reliability_csv(cases: Sequence[dict[str, Any]], actual: Sequence[float]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", "psnr", "score", "psnr_low", "psnr_high", "ood_distance",
                     "verdict"])
    for c, y in zip(cases, actual):
        writer.writerow([c["case_id"], repr(float(y)), repr(c["score"]), repr(c["psnr_low"]),
                         repr(c["psnr_high"]), repr(c["ood_distance"]), c["verdict"]])
    return buf.getvalue()


# --------------------------------------------------------------------------- Ray Data

@dataclass(frozen=True)
class ModelSpec:
    """What a Ray Data actor loads: a registered model (``uri`` + ``tracking_uri``), or a
    training run's ``ray.train.Checkpoint`` (``checkpoint``; read from the run's storage,
    which every node reaches, and verified against its checksums). Either way the actor's
    constructor arguments stay small: no weights travel through the object store."""

    uri: str = ""
    tracking_uri: str = ""
    checkpoint: Any = None

    def load(self):
        if self.checkpoint is None:
            return tracking.load_model(self.uri, self.tracking_uri).generator
        from cvaa.distributed.checkpoints import load_checkpoint_state
        from cvaa.models import generator_from_state

        return generator_from_state(load_checkpoint_state(self.checkpoint))


def _device(use_gpu: bool, threads: int) -> torch.device:
    torch.set_num_threads(max(1, int(threads)))
    return torch.device("cuda" if use_gpu else "cpu")


class _CasePredictor:
    """A Ray Data actor: loads the model once, then scores batches of case ids."""

    def __init__(self, model: ModelSpec, data: str, use_gpu: bool, threads: int):
        self.device = _device(use_gpu, threads)
        self.generator = model.load().to(self.device)
        self.dataset = PreparedDataset(data)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(c) for c in batch["case_id"]]
        cases = [self.dataset.arrays(c) for c in ids]
        xrays = torch.from_numpy(np.stack([c[0] for c in cases]))  # (B, 2, P, P)
        target = torch.from_numpy(np.stack([c[1] for c in cases]))  # (B, 1, D, H, W)
        pred = predict(self.generator, xrays, batch_size=len(ids)).clamp(0, 1)
        results = evaluate_batch(pred, target)
        out = {"case_id": np.array(ids), "order": np.asarray(batch["order"])}
        for key in results[0]:
            out[key] = np.array([r[key] for r in results], np.float64)
        return out


def _predict_volumes(model: ModelSpec, data: str, case_ids: Sequence[str], use_gpu: bool,
                     threads: int) -> list[np.ndarray]:
    """``(D, H, W)`` predictions of a few cases (Fig. 2), computed on a cluster worker."""
    device = _device(use_gpu, threads)
    dataset = PreparedDataset(data)
    xrays = torch.from_numpy(np.stack([dataset.arrays(c)[0] for c in case_ids]))
    pred = predict(model.load().to(device), xrays).clamp(0, 1)
    return [p[0].numpy() for p in pred]


def _worker_resources(use_gpu: bool, threads: float) -> dict[str, Any]:
    return {"num_cpus": threads, "num_gpus": 1 if use_gpu else None}


def default_workers(n_cases: int, batch_size: int, use_gpu: bool) -> int:
    """One actor per GPU with ``use_gpu``, else one per cluster CPU but one; never more
    actors than batches."""
    import ray

    resources = ray.cluster_resources()
    workers = (max(1, int(resources.get("GPU", 1))) if use_gpu
               else max(1, int(resources.get("CPU", 2)) - 1))
    return max(1, min(workers, -(-n_cases // batch_size)))


def score_on_cluster(model: ModelSpec, data: str, case_ids: Sequence[str], *,
                     batch_size: int = 4, workers: int | None = None, use_gpu: bool = False,
                     threads: float = 1) -> list[dict[str, float]]:
    """Per-case metrics of one model with Ray Data batch inference, in ``case_ids`` order.

    ``workers`` actors (``threads`` CPUs each, one GPU each with ``use_gpu``) each load the
    model once, then read, predict and score their batches; only the metrics come back.
    The dataset (and the registry) must be reachable from every node, as for training.
    Ray must be initialised (:func:`cvaa.distributed.cluster.init_ray`).
    """
    import ray
    import ray.data

    from cvaa.distributed.cluster import forwarded_env

    if not case_ids:
        raise ValueError(f"{data}: no cases to score")
    workers = max(1, min(workers or default_workers(len(case_ids), batch_size, use_gpu),
                         -(-len(case_ids) // batch_size)))
    env = forwarded_env()
    ds = ray.data.from_items([{"case_id": c, "order": i} for i, c in enumerate(case_ids)])
    ds = ds.map_batches(
        _CasePredictor, batch_size=batch_size, batch_format="numpy",
        fn_constructor_kwargs={"model": model, "data": data, "use_gpu": use_gpu,
                               "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=workers),
        **_worker_resources(use_gpu, threads),
        runtime_env={"env_vars": env} if env else None)
    rows = sorted(ds.take_all(), key=lambda r: int(r["order"]))
    if [str(r["case_id"]) for r in rows] != list(case_ids):
        raise RuntimeError(f"Ray Data returned {len(rows)} rows for {len(case_ids)} cases")
    keys = [k for k in rows[0] if k not in ("case_id", "order")]
    return [{k: float(r[k]) for k in keys} for r in rows]


def predict_on_cluster(model: ModelSpec, data: str, case_ids: Sequence[str], *,
                       use_gpu: bool = False, threads: float = 1) -> list[np.ndarray]:
    """Predicted volumes of a few cases (for figures), computed by one cluster task."""
    import ray

    from cvaa.distributed.cluster import forwarded_env

    env = forwarded_env()
    task = ray.remote(_predict_volumes).options(
        **_worker_resources(use_gpu, threads),
        runtime_env={"env_vars": env} if env else None)
    return ray.get(task.remote(model, data, list(case_ids), use_gpu, threads))
