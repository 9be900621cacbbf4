"""The driver side of ``jobs/train.py``: data -> TorchTrainer -> Table I -> registered model.

Runs on the Ray driver (the machine of ``ray job submit`` or the local process). The
workers run :func:`cvaa.distributed.worker.train_loop_per_worker`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from cvaa import tracking
from cvaa.config import Config
from cvaa.data import store
from cvaa.data.dataset import CaseDataset, PreparedDataset
from cvaa.distributed.cluster import forwarded_env
from cvaa.scoring import evaluate_cases, table_markdown, table_rows
from cvaa.models import build_generator
from cvaa.gan import NonFiniteLossError
from cvaa.distributed.worker import CHECKPOINT_FILE, train_loop_per_worker


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
    inject: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Ray Train workers do not run in the driver's directory: local paths go absolute.
        self.data = store.absolute_uri(self.data)
        self.storage = store.absolute_uri(self.storage)
        self.mlflow_uri = store.absolute_uri(self.mlflow_uri)


def storage_filesystem(storage: str):
    """A pyarrow S3 filesystem honouring ``AWS_ENDPOINT_URL`` for ``s3://`` storage (Ray's
    default one ignores it), else ``None``."""
    if not storage.startswith("s3://"):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    from pyarrow import fs

    scheme, _, host = endpoint.partition("://")
    return fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                           region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def fit(job: TrainJob, log=print, *, callbacks: Sequence[Any] = (),
        parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
        register: bool = True, close_on_error: bool = True) -> dict[str, Any]:
    """Train, evaluate on the test split, log to MLflow and register the generator.

    Args:
        job: the resolved job.
        log: where progress lines go.
        callbacks: extra Ray Train ``RunConfig`` callbacks (a Tune trial passes
            ``TuneReportCallback``).
        parent_run_id: makes the MLflow run a child of this run (a Tune sweep's run).
        tags: extra tags of a newly created MLflow run.
        register: log and register the generator; without it ``model_uri`` and
            ``version`` are ``None`` (a sweep registers only its best trial).
        close_on_error: mark the MLflow run FAILED when training raises. A Tune trial
            turns it off: the sweep closes its children itself (KILLED for a trial ASHA
            stopped, FAILED for an error), and a stopped trial's own late error handler
            must not race it.

    Returns ``{"model_uri", "run_id", "table", "rows", "metrics", "checkpoint", ...}``.

    Raises:
        NonFiniteLossError: a loss went NaN/inf (the last good checkpoint is kept).
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = job.cfg
    dataset = PreparedDataset(job.data)  # fails early, with the URI, if there is none
    experiment_id = tracking.setup(job.mlflow_uri, job.experiment)
    run_id = tracking.find_run(job.mlflow_uri, experiment_id, job.run_name)
    if run_id is None:
        import mlflow
        run_tags = {"cvaa.model": cfg.model.generator, "cvaa.data": job.data, **(tags or {})}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.MlflowClient(job.mlflow_uri).create_run(
            experiment_id, run_name=job.run_name, tags=run_tags)
        run_id = run.info.run_id
        log(f"[train] MLflow run {run_id} ({job.run_name}) at {job.mlflow_uri}")
    else:
        log(f"[train] resuming MLflow run {run_id} ({job.run_name})")
    logger = tracking.RunLogger(job.mlflow_uri, run_id)
    logger.log_params({**cfg.flat(), "data.prepared": job.data,
                       "data.train_cases": len(dataset.split("train")),
                       "data.test_cases": len(dataset.split("test"))})

    train_cfg = cfg.train
    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = train_cfg.gpus_per_worker
    scaling = ray.train.ScalingConfig(
        num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
        resources_per_worker=resources,
        accelerator_type=train_cfg.accelerator_type or None)
    run_config = ray.train.RunConfig(
        name=job.run_name, storage_path=job.storage,
        storage_filesystem=storage_filesystem(job.storage),
        failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=train_cfg.checkpoints_to_keep),
        worker_runtime_env={"env_vars": forwarded_env()},
        callbacks=list(callbacks) or None)
    loop_config = {"cfg": cfg.to_dict(), "data": job.data,
                   "mlflow": {"tracking_uri": job.mlflow_uri, "run_id": run_id},
                   "inject": job.inject}
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                           scaling_config=scaling, run_config=run_config)
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        if close_on_error:
            logger.set_terminated("FAILED")
        raise
    wall = time.perf_counter() - start
    metrics = dict(result.metrics or {})
    outcome = result.return_value or {}
    if outcome.get("status") == "nonfinite":
        logger.set_terminated("FAILED")
        kept = result.checkpoint.path if result.checkpoint else "none (first epoch)"
        raise NonFiniteLossError(f"training stopped: non-finite loss at "
                                 f"{outcome.get('message')}; last good checkpoint: {kept}")
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    generator, state = load_checkpoint_generator(result.checkpoint, cfg)
    log(f"[train] trained {state['epoch'] + 1} epochs in {wall:.1f} s; evaluating the test "
        f"split ({len(dataset.split('test'))} cases)")
    test_ids = dataset.split("test") or dataset.split("train")
    cases = CaseDataset(dataset, test_ids, cache=False)
    results = evaluate_cases(generator, (cases[i] for i in range(len(cases))),
                             batch_size=cfg.train.batch_size)
    label = {"cvaa": "CVAA-GAN", "x2ct": "X2CT-GAN", "3dcnn": "3DCNN",
             "psr": "PSR"}.get(cfg.model.generator, cfg.model.generator)
    rows = table_rows({label: results})
    table = table_markdown(rows)
    logger.log_table(rows, "evaluation/table_i.json")
    logger.log_table([{"case_id": c, **r} for c, r in zip(test_ids, results)],
                     "evaluation/per_case.json")
    logger.log_text(table, "evaluation/table_i.md")
    logger.log_metrics({f"test/{k}": v for k, v in rows[0].items()
                        if isinstance(v, float)}, state["epoch"] + 1)
    logger.log_metrics({"train_wall_seconds": wall}, state["epoch"] + 1)
    _log_curves(logger, state.get("history", {}), label)
    registered = {"model_uri": None, "version": None}
    if register:
        registered = tracking.log_generator(run_id, generator, cfg.to_dict(),
                                            job.register_name, job.alias, job.mlflow_uri)
    logger.set_terminated("FINISHED")
    return {"model_uri": registered["model_uri"], "version": registered["version"],
            "run_id": run_id, "table": table, "rows": rows, "metrics": metrics,
            "checkpoint": result.checkpoint.path, "wall_seconds": wall,
            "epochs": state["epoch"] + 1, "history": state.get("history", {})}


def load_checkpoint_generator(checkpoint, cfg: Config | None = None):
    """The generator (eval mode, CPU) and the raw state of a Ray Train checkpoint."""
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location="cpu",
                           weights_only=True)
    cfg = cfg or Config.from_dict(state["config"])
    generator = build_generator(cfg.model.generator, cfg)
    generator.load_state_dict(state["trainer"]["generator"])
    return generator.eval(), state


def _log_curves(logger: tracking.RunLogger, history: dict[str, list[float]], label: str) -> None:
    from cvaa.figures import curves_png

    keys = [k for k in ("loss_g", "loss_d", "loss_rec", "val/psnr", "val/ssim")
            if history.get(k)]
    if keys:
        logger.log_bytes(curves_png({k: history[k] for k in keys}, title=label),
                         "figures/curves.png")


def ensure_prepared(cfg: Config, output: str, log=print) -> str:
    """The embedded default: phantoms -> preprocessing, unless already prepared."""
    from cvaa.data.dataset import list_inputs
    from cvaa.distributed.pipeline import default_phantom_dir, ensure_phantoms, run_pipeline

    phantoms = ensure_phantoms(cfg, default_phantom_dir(output, cfg), log=log)
    run_pipeline(list_inputs(phantoms), cfg, output, source=phantoms, log=log)
    return output
