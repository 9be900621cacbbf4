"""The driver of a training run: TorchTrainer, then evaluation and registration as steps.

Runs on the Ray driver (the machine of ``ray job submit`` or the local process); the
workers run :func:`cvaa.distributed.worker.train_loop_per_worker`. ``jobs/train.py`` calls
:func:`run_training`, which composes the steps inside one MLflow run
(:func:`cvaa.tracking.open_run`)::

    with tracking.open_run(uri, name, resume=True) as run:
        result = train(job, run)                                 # Ray Train DDP
        table = evaluate_on_workers(result, dataset, "test", cfg)  # Table I, Ray Data
        log_evaluation(run, table, result.epochs)
        registered = register(run, result.generator(cfg), job, dataset, table.rows[0])
        calibrate_registered(job, run, result.checkpoint, dataset, registered)  # hold-out

A Tune trial (:mod:`cvaa.distributed.sweep`) composes the same steps differently.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import ray
import ray.train
from ray.train.torch import TorchTrainer

from cvaa import tracking
from cvaa.config import Config
from cvaa.data import store
from cvaa.data.dataset import CaseDataset, PreparedDataset, training_split
from cvaa.distributed.checkpoints import CorruptCheckpointError, load_checkpoint_state
from cvaa.distributed.cluster import forwarded_env
from cvaa.distributed.storage import ray_storage
from cvaa.distributed.worker import PENDING_DIR, train_loop_per_worker
from cvaa.gan import NonFiniteLossError, per_worker_batch, scaled_lr
from cvaa.loop import format_epoch
from cvaa.models import generator_from_state
from cvaa.scoring import evaluate_cases, table_markdown, table_rows
from cvaa.tracking.datasets import PreparedSplit

# Table I row labels of the generators (the paper's names).
MODEL_LABELS = {"cvaa": "CVAA-GAN", "x2ct": "X2CT-GAN", "3dcnn": "3DCNN", "psr": "PSR"}


def default_storage() -> str:
    return str(Path(os.environ.get("CVAA_HOME", Path.home() / ".cvaa")) / "ray_results")


@dataclass
class TrainJob:
    """Everything ``jobs/train.py`` resolved from its arguments."""

    cfg: Config
    data: str
    run_name: str
    storage: str = field(default_factory=default_storage)
    mlflow_uri: str = field(default_factory=tracking.default_tracking_uri)
    register_name: str = "cvaa-gan"
    alias: str = "candidate"
    experiment: str = tracking.EXPERIMENT
    preset: str = ""

    def __post_init__(self) -> None:
        # Ray Train workers do not run in the driver's directory: local paths go absolute.
        self.data = store.absolute_uri(self.data)
        self.storage = store.absolute_uri(self.storage)
        self.mlflow_uri = store.absolute_uri(self.mlflow_uri)


class StorageError(OSError):
    """A checkpoint could not be written (storage full, or unreachable for longer than
    ``train.storage_retry_s``); the previous checkpoint is intact."""


class EmptySplitError(ValueError):
    """A split with no cases: Table I cannot be computed on it."""


# --------------------------------------------------------------------------- step 1: train

@dataclass
class TrainResult:
    """What :func:`train` leaves: the last checkpoint and the run's history."""

    checkpoint: Any                      # ray.train.Checkpoint of the last epoch
    metrics: dict[str, Any]              # rank 0's last report
    wall_seconds: float
    state: dict[str, Any]                # the checkpoint's content (read once)

    @property
    def epochs(self) -> int:
        return int(self.state["epoch"]) + 1

    @property
    def history(self) -> dict[str, list[float]]:
        return self.state.get("history", {})

    def generator(self, cfg: Config | None = None):
        """The trained generator (eval mode, CPU)."""
        return generator_from_state(self.state, cfg)


def train(job: TrainJob, run: tracking.RunLogger, *, callbacks: Sequence[Any] = (),
          worker_callbacks: Sequence[Any] = (), log: Callable[[str], None] = print
          ) -> TrainResult:
    """Train with Ray Train DDP into ``run``; resumes from the job's last checkpoint.

    Args:
        job: the resolved job (config, data, storage).
        run: the MLflow run rank 0 logs its epochs into.
        callbacks: extra ``ray.train.UserCallback`` objects (a Tune trial passes
            ``TuneReportCallback``).
        worker_callbacks: objects with ``on_epoch_start(epoch, trainer)``, called on every
            rank before each epoch (0-based) with its :class:`cvaa.gan.GANTrainer`.
        log: where the per-epoch progress lines go (``None``: nowhere).

    Raises:
        NonFiniteLossError: a loss went NaN/inf (the last good checkpoint is kept).
        TrackingAuthError: the MLflow server refused rank 0's credentials (the run stops
            at the end of that epoch, its checkpoint written).
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    cfg, t = job.cfg, job.cfg.train
    dataset = PreparedDataset(job.data)
    run.log_params({**cfg.flat(), "data.prepared": job.data,
                    "train.per_worker_batch": per_worker_batch(cfg),
                    "optim.lr_g_scaled": scaled_lr(cfg.optim.lr_g, cfg),
                    "optim.lr_d_scaled": scaled_lr(cfg.optim.lr_d, cfg),
                    "data.config_hash": dataset.manifest.get("config_hash", ""),
                    "data.train_cases": len(dataset.split("train")),
                    "data.test_cases": len(dataset.split("test"))})
    splits = dataset_splits(dataset, cfg)
    run.log_datasets(dataset.root, dataset.manifest, splits)
    run.set_description(describe_run(job, splits))
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    scaling = ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                      resources_per_worker=resources,
                                      placement_strategy=t.placement_strategy,
                                      accelerator_type=t.accelerator_type or None)
    with epoch_lines(t.epochs, log, t.max_failures) as reporter:
        storage_path, fs = ray_storage(job.storage, t.storage_retry_s)
        run_config = ray.train.RunConfig(
            name=job.run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            worker_runtime_env={"env_vars": forwarded_env()},
            callbacks=[*callbacks, *([reporter] if reporter else [])] or None)
        loop_config = {"cfg": cfg.to_dict(), "data": job.data,
                       "mlflow": {"tracking_uri": job.mlflow_uri, "run_id": run.run_id},
                       "callbacks": list(worker_callbacks)}
        trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                               scaling_config=scaling, run_config=run_config)
        start = time.perf_counter()
        result = trainer.fit()
    wall = time.perf_counter() - start
    outcome = result.return_value or {}
    kept = result.checkpoint.path if result.checkpoint else "none (first epoch)"
    if outcome.get("status") == "nonfinite":
        raise NonFiniteLossError(f"training stopped: non-finite loss at "
                                 f"{outcome.get('message')}; last good checkpoint: {kept}")
    if outcome.get("status") == "storage":
        raise StorageError(f"training stopped: {outcome.get('message')} (storage "
                           f"{job.storage}; last complete checkpoint: {kept})")
    if outcome.get("status") == "refused":
        raise tracking.TrackingAuthError(
            f"training stopped, rank 0's MLflow log was refused on its node: "
            f"{outcome.get('message')} (last checkpoint: {kept}; the same command with "
            f"--run-name {job.run_name} resumes from it)")
    if outcome.get("status") == "corrupt":
        raise CorruptCheckpointError(f"training stopped: {outcome.get('message')}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.run_name} finished without a checkpoint")
    pending = int(outcome.get("mlflow_pending", 0))
    if pending:
        _send_kept_entries(job, run, result.checkpoint, pending, log)
    state = load_checkpoint_state(result.checkpoint)
    run.log_metrics({"train_wall_seconds": wall}, state["epoch"] + 1)
    return TrainResult(result.checkpoint, dict(result.metrics or {}), wall, state)


def resubmit_hint(job: TrainJob) -> str:
    return (f"once the server answers, run the same command again with --run-name "
            f"{job.run_name}: it does not train again; it sends what MLflow has not "
            f"received, scores Table I and registers the model, in the same MLflow run")


def _send_kept_entries(job: TrainJob, run: tracking.RunLogger, checkpoint, pending: int,
                       log: Callable[[str], None] | None) -> None:
    """Rank 0's last wait ended with ``pending`` MLflow entries unsent (kept in the last
    checkpoint): send them from the driver if the server answers now; otherwise stop
    with a message that says where they are and how to resume.

    Raises:
        TrackingUnavailableError: the server still does not answer.
    """
    from cvaa.tracking.spool import replay

    where = f"{checkpoint.path}/{PENDING_DIR}"
    try:
        tracking.check_tracking_uri(job.mlflow_uri)
    except tracking.TrackingAuthError:
        raise
    except tracking.TrackingUnavailableError as exc:
        raise tracking.TrackingUnavailableError(
            f"training finished (checkpoint {checkpoint.path}), but MLflow at "
            f"{job.mlflow_uri} did not come back: the {pending} entries it has not received "
            f"are kept in {where}; {resubmit_hint(job)} (or send the entries alone: "
            f"`python jobs/replay_log.py {where} --mlflow-uri {job.mlflow_uri}`)") from exc
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="cvaa-pending-") as tmp:
        pyarrow.fs.copy_files(where, tmp, source_filesystem=checkpoint.filesystem)
        replay(tmp, job.mlflow_uri, run.run_id, log=log or (lambda line: None))


def dataset_splits(dataset: PreparedDataset, cfg: Config
                   ) -> dict[str, tuple[str, list[str]]]:
    """What a training run reads, by MLflow dataset context: the train split less the
    calibration hold-out and the validation patients (:func:`training_split`, as every rank
    splits it), the validation part, the test split (Table I) and, when there is one, the
    calibration hold-out (its cases only measured, with the final generator)."""
    train_ids, val_ids, calibration_ids = training_split(dataset, cfg.train)
    splits = {"training": ("train", train_ids), "validation": ("validation", val_ids),
              "test": ("test", dataset.split("test"))}
    if calibration_ids:
        splits["calibration"] = ("calibration", calibration_ids)
    return splits


def describe_run(job: TrainJob, splits: Mapping[str, tuple[str, Sequence[str]]],
                 table: "SplitTable | None" = None) -> str:
    """The run's description (Markdown): model, preset, data, and once it is scored the
    test split's Table I line."""
    cfg = job.cfg
    counts = ", ".join(f"{len(ids)} {context}" for context, (_, ids) in splits.items())
    text = (f"**{MODEL_LABELS.get(cfg.model.generator, cfg.model.generator)}** "
            f"(`model.generator={cfg.model.generator}`), preset {job.preset or 'custom'}, "
            f"{cfg.train.epochs} epochs, {cfg.train.num_workers} worker(s)"
            f"{' with GPUs' if cfg.train.use_gpu else ''}; volumes "
            f"{cfg.preprocess.size}^3 at {cfg.preprocess.spacing_mm:g} mm.\n\n"
            f"Data: `{job.data}` ({counts} cases).")
    if table is not None:
        text += "\n\n" + table_line(table)
    return text


def table_line(table: "SplitTable") -> str:
    """Table I of the first row as one line: means (std) over the split's cases."""
    r = table.rows[0]
    return (f"Table I, {table.split} split ({len(table.case_ids)} cases), {r['model']}: "
            f"MAE {r['mae_mean']:.4f} ({r['mae_std']:.4f}), MSE {r['mse_mean']:.5f}, "
            f"cosine {r['cosine_mean']:.4f}, PSNR {r['psnr_mean']:.2f} "
            f"({r['psnr_std']:.2f}) dB, SSIM {r['ssim_mean']:.4f} ({r['ssim_std']:.4f}); "
            f"x2ct convention PSNR {r['psnr_x2ct_mean']:.2f} dB, SSIM "
            f"{r['ssim_x2ct_mean']:.4f}.")


# --------------------------------------------------------------------------- step 2: evaluate

class SplitTable(NamedTuple):
    """Table I of one model on one split of a prepared dataset."""

    split: str
    case_ids: list[str]
    per_case: list[dict[str, float]]
    rows: list[dict[str, Any]]
    markdown: str


def _split_cases(dataset: PreparedDataset, split: str) -> list[str]:
    case_ids = dataset.split(split)
    if not case_ids:
        raise EmptySplitError(f"{dataset.root}: the {split} split has no cases, so Table I "
                              f"cannot be computed on it (prepare more cases or a larger "
                              f"data.test_fraction)")
    return case_ids


def _split_table(split: str, case_ids: list[str], per_case: list[dict[str, float]],
                 cfg: Config) -> SplitTable:
    label = MODEL_LABELS.get(cfg.model.generator, cfg.model.generator)
    rows = table_rows({label: per_case})
    return SplitTable(split, list(case_ids), per_case, rows, table_markdown(rows))


def evaluate_split(generator, dataset: PreparedDataset, split: str, cfg: Config
                   ) -> SplitTable:
    """Table I (both metric conventions) of ``generator`` on ``split``, in this process
    (a Tune trial, itself on a cluster worker, scores its model so).

    Raises:
        EmptySplitError: the split has no cases (never silently another split).
    """
    case_ids = _split_cases(dataset, split)
    cases = CaseDataset(dataset, case_ids, cache=False)
    per_case = evaluate_cases(generator, (cases[i] for i in range(len(cases))),
                              batch_size=per_worker_batch(cfg))
    return _split_table(split, case_ids, per_case, cfg)


def evaluate_on_workers(result: TrainResult, dataset: PreparedDataset, split: str,
                        cfg: Config, workers: int | None = None) -> SplitTable:
    """Table I of a training run's generator on ``split``, as Ray Data batch inference on
    the cluster: ``workers`` actors (default: the run's ``train.num_workers``) with the
    training workers' resources (a GPU each with ``train.use_gpu``), each loading the run's
    last checkpoint from its storage and scoring its share of the cases with
    ``per_worker_batch`` cases per forward. The driver only receives the metrics; they
    equal :func:`evaluate_split`'s on the same cases.

    Raises:
        EmptySplitError: the split has no cases.
    """
    from cvaa.distributed.evaluate import ModelSpec, score_on_cluster

    case_ids = _split_cases(dataset, split)
    t = cfg.train
    spec = ModelSpec(checkpoint=result.checkpoint)
    per_case = score_on_cluster(spec, dataset.root, case_ids,
                                batch_size=per_worker_batch(cfg),
                                workers=workers or t.num_workers, use_gpu=t.use_gpu,
                                threads=t.cpus_per_worker)
    return _split_table(split, case_ids, per_case, cfg)


def log_evaluation(run: tracking.RunLogger, table: SplitTable, step: int, *,
                   model_id: str | None = None, dataset=None) -> None:
    """Table I and the per-case metrics as MLflow tables, Markdown and ``<split>/*``
    metrics; with ``model_id`` (a logged model) and ``dataset`` (the split's
    :class:`~cvaa.tracking.datasets.PreparedSplit`) the metrics are also the logged
    model's, measured on that dataset (how MLflow 3 links a model to its datasets)."""
    run.log_table(table.rows, "evaluation/table_i.json")
    run.log_table([{"case_id": c, **r} for c, r in zip(table.case_ids, table.per_case)],
                  "evaluation/per_case.json")
    run.log_text(f"Table I, {table.split} split ({len(table.case_ids)} cases)\n\n"
                 f"{table.markdown}", "evaluation/table_i.md")
    run.log_metrics({f"{table.split}/{k}": v for k, v in table.rows[0].items()
                     if isinstance(v, float)}, step, model_id=model_id, dataset=dataset)


def log_curves(run: tracking.RunLogger, history: dict[str, list[float]], title: str) -> None:
    """The loss and validation curves as one PNG."""
    from cvaa.figures import curves_png

    keys = [k for k in ("loss_g", "loss_d", "loss_rec", "val/psnr", "val/ssim")
            if history.get(k)]
    if keys:
        run.log_bytes(curves_png({k: history[k] for k in keys}, title=title),
                      "figures/curves.png")


# --------------------------------------------------------------------------- step 3: register

def register(run: tracking.RunLogger, generator, job: TrainJob, dataset: PreparedDataset,
             test_row: Mapping[str, Any] | None, *, alias: str | None = None
             ) -> dict[str, Any]:
    """Register ``generator`` as a new version of ``job.register_name`` under ``alias``
    (default ``job.alias``), tagged and described with what a registry user needs: test
    metrics (both conventions), generator, preset, sizes, spacing, the prepared dataset's
    config hash and case counts, and the run it came from.

    Args:
        test_row: the model's Table I row on the test split (``psnr_mean``, ...), or
            ``None`` when it was not evaluated.
    """
    cfg = job.cfg
    size, pixels, spacing = cfg.preprocess.size, cfg.drr.detector_pixels, cfg.preprocess.spacing_mm
    tags = {"generator": cfg.model.generator, "preset": job.preset or "custom",
            "volume_size": str(size), "xray_pixels": str(pixels), "spacing_mm": str(spacing),
            "data": job.data, "data.config_hash": str(dataset.manifest.get("config_hash", "")),
            "data.train_cases": str(len(dataset.split("train"))),
            "data.test_cases": str(len(dataset.split("test"))), "source_run_id": run.run_id}
    parts = dataset_splits(dataset, cfg)
    # The calibration hold-out is named by its count and digest (dataset.calibration),
    # never by its case ids (only digests leave the data store); jobs/calibrate.py
    # recomputes it from the version's config and checks the digest.
    tags["data.calibration_cases"] = str(len(parts.get("calibration", ("", []))[1]))
    splits = {context: PreparedSplit(dataset.root, dataset.manifest, split, ids)
              for context, (split, ids) in parts.items() if ids}
    for context, ds in splits.items():
        tags[f"dataset.{context}"] = f"{ds.name}@{ds.digest}"
    if test_row:
        for key in ("psnr", "ssim", "psnr_x2ct", "ssim_x2ct"):
            tags[f"test.{key}"] = f"{test_row[f'{key}_mean']:.4f}"
        quality = (f"Test split ({tags['data.test_cases']} cases): PSNR "
                   f"{test_row['psnr_mean']:.2f} dB, SSIM {test_row['ssim_mean']:.4f} (volume); "
                   f"PSNR {test_row['psnr_x2ct_mean']:.2f} dB, SSIM "
                   f"{test_row['ssim_x2ct_mean']:.4f} (x2ct per-slice convention).")
    else:
        quality = "Not evaluated on a test split."
    description = (f"{MODEL_LABELS[cfg.model.generator]} generator, preset {tags['preset']}: "
                   f"PA + lateral X-rays (N, 2, {pixels}, {pixels}) in [0, 1] -> CT "
                   f"(N, 1, {size}, {size}, {size}) in [0, 1], {spacing:g} mm voxels. "
                   f"{quality} Trained on {job.data} (preprocessing config "
                   f"{tags['data.config_hash']}); MLflow run {run.run_id}.")
    out = tracking.log_generator(run.run_id, generator, cfg.to_dict(), job.register_name,
                                 alias or job.alias, job.mlflow_uri,
                                 version_tags=tags, description=description)
    # the logged model (MLflow 3's model page) names its datasets as the version does
    run.client.set_logged_model_tags(out["logged_uri"].removeprefix("models:/"),
                                     {k: v for k, v in tags.items()
                                      if k.startswith("dataset.")})
    return out


# --------------------------------------------------------------------------- step 4: calibrate

def calibrate_registered(job: TrainJob, run: tracking.RunLogger, checkpoint,
                         dataset: PreparedDataset, registered: Mapping[str, Any],
                         log: Callable[[str], None] = print) -> str | None:
    """Calibrate the version :func:`register` made on the run's calibration hold-out
    (``train.calibration_cases``), as ``jobs/calibrate.py`` would: ``train.calibration_k``
    forward samples per case with the generator of ``checkpoint`` (the run's last), in one
    cluster task with a training worker's resources (its GPU with ``train.use_gpu``), the
    fit here, then :func:`cvaa.tracking.attach_calibration` and
    :func:`cvaa.tracking.log_calibration_run`. A hold-out below
    :func:`cvaa.reliability.minimum_cases` leaves the version ``uncalibrated``, said in one
    line. Returns the calibration (JSON) or ``None``.
    """
    from cvaa import reliability
    from cvaa.distributed.evaluate import ModelSpec, measure_on_cluster

    t = job.cfg.train
    held_out = dataset_splits(dataset, job.cfg).get("calibration", ("", []))[1]
    need = reliability.minimum_cases()
    if len(held_out) < need:
        n_train = len(dataset.split("train"))
        if held_out:
            why = f"{len(held_out)} cases held out (train.calibration_cases={t.calibration_cases})"
        elif not t.calibration_cases:
            why = "no cases held out (train.calibration_cases=0)"
        else:
            why = (f"no cases held out (the train split's {n_train} cases are fewer than "
                   f"twice train.calibration_cases={t.calibration_cases})")
        log(f"calibration: the version stays uncalibrated: {why}, and a calibration needs "
            f"at least {need}; calibrate it later with jobs/calibrate.py")
        return None
    tick = time.perf_counter()
    rows, psnr, xrays = measure_on_cluster(ModelSpec(checkpoint=checkpoint), dataset.root,
                                           held_out, job.cfg, t.calibration_k, t.use_gpu,
                                           t.cpus_per_worker)
    calibration = reliability.ReliabilityCalibration.fit(
        rows, psnr, k=t.calibration_k, dataset=dataset.fingerprint, case_ids=held_out,
        xrays=xrays, info={"data": job.data, "split": "calibration",
                           "source": f"held out of training by MLflow run {run.run_id} "
                                     f"(train.calibration_cases={t.calibration_cases})"})
    text = calibration.to_json()
    model_uri = f"models:/{job.register_name}/{registered['version']}"
    tracking.attach_calibration(model_uri, text, job.mlflow_uri)
    tracking.log_calibration_run(model_uri, job.mlflow_uri, job.data, dataset.manifest,
                                 "calibration", held_out, text)
    run.log_metrics({"calibration_seconds": time.perf_counter() - tick}, 0)
    log(f"calibrated on {len(held_out)} held-out cases (K = {calibration.k}) in "
        f"{time.perf_counter() - tick:.0f} s: predicted PSNR +-{calibration.halfwidth:.2f} dB "
        f"at {100 * calibration.level:.0f} %")
    return text


# --------------------------------------------------------------------------- the job

def run_training(job: TrainJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``jobs/train.py``: train -> Table I on the test split -> registered model ->
    calibrated on the run's hold-out (``train.calibration_cases``), in one MLflow run
    (resumed by name) that is closed FINISHED, FAILED or KILLED on every path.

    Returns ``{"model_uri", "version", "run_id", "table" (Markdown or None), "rows",
    "metrics", "checkpoint", "wall_seconds", "epochs", "history"}``.
    """
    dataset = PreparedDataset(job.data)  # fails early, with the URI, if there is none
    tracking.check_server(job.mlflow_uri)  # fails fast, naming the URI
    tags = {"cvaa.model": job.cfg.model.generator, "cvaa.data": job.data}
    with tracking.open_run(job.mlflow_uri, job.run_name, experiment=job.experiment,
                           tags=tags, resume=True, log=log) as run:
        result = train(job, run, log=log)
        try:
            table, registered = _evaluate_and_register(job, run, result, dataset, log)
        except Exception as exc:  # an outage after training: no traceback, a way on
            try:
                tracking.check_tracking_uri(job.mlflow_uri)
            except tracking.TrackingAuthError:
                raise  # it answers, and refuses: the message says what to set
            except tracking.TrackingUnavailableError:
                raise tracking.TrackingUnavailableError(
                    f"training finished (checkpoint {result.checkpoint.path}), but MLflow "
                    f"at {job.mlflow_uri} stopped answering during evaluation and "
                    f"registration ({type(exc).__name__}); {resubmit_hint(job)}") from exc
            raise
    return {"model_uri": registered["model_uri"], "version": registered["version"],
            "run_id": run.run_id, "table": table.markdown if table else None,
            "rows": table.rows if table else [], "metrics": result.metrics,
            "checkpoint": result.checkpoint.path, "wall_seconds": result.wall_seconds,
            "epochs": result.epochs, "history": result.history}


def _evaluate_and_register(job: TrainJob, run: tracking.RunLogger, result: TrainResult,
                           dataset: PreparedDataset, log: Callable[[str], None]):
    generator = result.generator(job.cfg)
    label = MODEL_LABELS.get(job.cfg.model.generator, job.cfg.model.generator)
    table = None
    if dataset.split("test"):
        n_test, tick = len(dataset.split("test")), time.perf_counter()
        log(f"evaluating the test split ({n_test} cases) on "
            f"{job.cfg.train.num_workers} cluster worker(s)")
        table = evaluate_on_workers(result, dataset, "test", job.cfg)
        run.log_metrics({"test_eval_seconds": time.perf_counter() - tick}, result.epochs)
    else:
        log("no test split in the dataset: Table I not computed")
    log_curves(run, result.history, label)
    registered = register(run, generator, job, dataset, table.rows[0] if table else None)
    if table:
        # logged after registration: the test metrics are then also the logged model's,
        # on the test dataset (MLflow 3's model page lists it)
        test = PreparedSplit(dataset.root, dataset.manifest, "test", table.case_ids)
        log_evaluation(run, table, result.epochs,
                       model_id=registered["logged_uri"].removeprefix("models:/"),
                       dataset=test)
        run.set_description(describe_run(job, dataset_splits(dataset, job.cfg), table))
    calibrate_registered(job, run, result.checkpoint, dataset, registered, log)
    return table, registered


def ensure_prepared(cfg: Config, output: str, log=print) -> str:
    """The embedded default: phantoms -> preprocessing, unless already prepared."""
    from cvaa.data.dataset import list_inputs
    from cvaa.distributed.pipeline import default_phantom_dir, ensure_phantoms, run_pipeline

    phantoms = ensure_phantoms(cfg, default_phantom_dir(output, cfg), log=log)
    run_pipeline(list_inputs(phantoms), cfg, output, source=phantoms, log=log)
    return output


# --------------------------------------------------------------------------- console

class EpochReporter(ray.train.UserCallback):
    """Turns rank 0's report into a :func:`format_epoch` line on a Ray queue.

    Ray Train calls it in the Train controller, a process whose output the quiet console
    does not forward; :func:`epoch_lines` prints the queue on the driver.
    """

    def __init__(self, queue, epochs: int, max_failures: int = 0):
        self.queue, self.epochs, self.max_failures = queue, epochs, max_failures
        self.seconds: list[float] = []
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions):
        self.failures += 1
        ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
        first = next(iter(worker_exceptions.values()), None)
        what = (f"{type(first).__name__}: {str(first).strip().splitlines()[0][:160]}"
                if first is not None and str(first).strip() else type(first).__name__)
        then = ("restarting the workers from the last checkpoint"
                if self.failures <= self.max_failures else "no retries left")
        self.queue.put(f"worker failure {self.failures} (train.max_failures="
                       f"{self.max_failures}) on rank {ranks}: {what}; {then}")

    def after_report(self, run_context, metrics, checkpoint):
        m = metrics[0] if metrics else {}
        if m.get("storage_note"):
            self.queue.put(f"note: {m['storage_note']}")
        if m.get("checkpoint_warnings"):
            self.queue.put(f"warning: {m['checkpoint_warnings']}")
        if "resumed_from_epoch" in m:
            self.queue.put(f"resumed from the checkpoint of epoch "
                           f"{int(m['resumed_from_epoch'])}: the epoch count continues")
        if "epoch_seconds" in m:
            self.seconds.append(float(m["epoch_seconds"]))
        recent = self.seconds[-5:]
        eta = ((self.epochs - int(m.get("epoch", 0))) * sum(recent) / len(recent)
               if recent else None)
        self.queue.put(format_epoch(m, self.epochs, eta))


@contextlib.contextmanager
def epoch_lines(epochs: int, log: Callable[[str], None] | None, max_failures: int = 0
                ) -> Iterator[EpochReporter | None]:
    """An :class:`EpochReporter` for the trainer, and a driver thread that passes its lines
    to ``log`` until the block ends (nothing at all when ``log`` is ``None``)."""
    if log is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    # The queue lives on the driver's node: a node lost mid-run must not take it along.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    done = threading.Event()

    def pump() -> None:
        while not (done.is_set() and queue.empty()):
            try:
                log(queue.get(timeout=0.5))
            except Empty:
                continue

    thread = threading.Thread(target=pump, name="cvaa-epoch-lines", daemon=True)
    thread.start()
    try:
        yield EpochReporter(queue, epochs, max_failures)
    finally:
        done.set()
        thread.join(timeout=10)
        ray.kill(queue.actor)
