"""The driver side of ``jobs/tune.py``: Ray Tune over a search space, one TorchTrainer per trial.

Ray Train V2 cannot be wrapped as ``Tuner(TorchTrainer(...))``. Each Tune trial runs
:func:`_trial`, a small driver function (a fraction of a CPU) that resolves the trial's
config and runs :func:`cvaa.distributed.training.train` (then Table I on the test split),
with ``TuneReportCallback`` in the Train ``RunConfig``: every epoch's report of rank 0 (``val/ssim``, ``epoch``, the checkpoint
path, ...) reaches Tune, and ASHA stops the trials that fall behind at its rungs.

MLflow: the sweep is a parent run (the space file, the sweep settings, a leaderboard table
and its Markdown); every trial is a child run (tag ``mlflow.parentRunId``) with its
resolved params and per-epoch curves, logged by rank 0 as in ``jobs/train.py``. Trials do
not register their models: at the end the best trial's last checkpoint is logged into its
child run and registered as a new version with alias ``tuned-best``, so the registry gets
one version per sweep, and ``models:/NAME@tuned-best`` is the model that won on validation.

Resources: a trial holds its driver function (``DRIVER_CPUS``) plus its Train workers'
CPUs and GPUs; as many trials run at once as the cluster's scarcest resource allows
(``max_concurrent_trials``), or ``--max-concurrent``.

Resume: the Tune experiment lives at ``STORAGE/RUN_NAME`` and every trial's Train run at
``STORAGE/RUN_NAME-trials/RUN_NAME-TRIAL_ID``; ``Tuner.restore`` reruns the unfinished and
errored trials, whose ``train`` resumes its Train run from the last checkpoint and its MLflow
child run by name.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ray
import ray.train
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator

from cvaa import tracking
from cvaa.config import Config, ConfigError
from cvaa.data.dataset import PreparedDataset
from cvaa.distributed import compat
from cvaa.distributed.storage import ray_storage, storage_filesystem
from cvaa.distributed.checkpoints import load_checkpoint_generator
from cvaa.distributed.training import (TrainJob, calibrate_registered, dataset_splits,
                                       describe_run, evaluate_split, log_curves,
                                       log_evaluation, register, train)
from cvaa.loop import VAL_METRICS
from cvaa.gan import NonFiniteLossError
from cvaa.tune_space import SearchSpace

VAL_METRIC_KEYS = tuple(f"val/{k}" for k in VAL_METRICS)
# The trial's driver function mostly waits on the Train controller (which takes no CPU);
# it needs a slot of its own so that Tune can place it next to the workers.
DRIVER_CPUS = 0.25


class SweepError(RuntimeError):
    """A sweep that cannot start (exists / nothing to resume) or whose trials all failed."""


class SweepInterrupted(SweepError, tracking.RunKilled):
    """The sweep stopped with trials unfinished (its MLflow run closes KILLED)."""


@dataclass
class SweepJob:
    """Everything ``jobs/tune.py`` resolved from its arguments.

    Args:
        train: the base training job: its config (before the space's values), data,
            storage, MLflow URI, registered-model name; its ``run_name`` names the sweep.
        space: the validated search space.
        samples: Tune's ``num_samples`` (each draw is crossed with the space's grid).
        metric: the validation metric ASHA and the leaderboard rank by.
        mode: ``max`` or ``min``.
        resume: continue the interrupted sweep of the same name and storage.
        max_concurrent: trials at once; default: what the cluster's resources allow.
        grace_period: ASHA's first rung, in epochs (default: :func:`asha_settings`).
        reduction_factor: ASHA's rung ratio (default: :func:`asha_settings`).
        driver_cpus: CPUs of each trial's driver function.
        alias: registry alias of the best trial's model.
        verbose: Tune's console verbosity (0 silent .. 2 every result).
    """

    train: TrainJob
    space: SearchSpace
    samples: int = 1
    metric: str = "val/ssim"
    mode: str = "max"
    resume: bool = False
    max_concurrent: int | None = None
    grace_period: int | None = None
    reduction_factor: int | None = None
    driver_cpus: float = DRIVER_CPUS
    alias: str = "tuned-best"
    verbose: int = 1

    @property
    def name(self) -> str:
        return self.train.run_name

    @property
    def trial_storage(self) -> str:
        return f"{self.train.storage.rstrip('/')}/{self.name}-trials"


def asha_settings(epochs: int) -> tuple[int, int]:
    """ASHA's ``(grace_period, reduction_factor)`` for a budget of ``epochs``.

    The first rung comes after a tenth of the epochs (a GAN needs a few epochs before its
    validation numbers mean anything); the ratio is 2 for short runs, so that they still
    get several rungs, and 3 from 30 epochs on. 200 epochs: rungs at 20, 60, 180; 16: 2,
    4, 8; 3: 1, 2.

    Example:
        >>> asha_settings(200), asha_settings(16), asha_settings(3)
        ((20, 3), (2, 2), (1, 2))
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return max(1, round(epochs / 10)), (3 if epochs >= 30 else 2)


def trial_resources(cfg: Config, driver_cpus: float = DRIVER_CPUS) -> dict[str, float]:
    """What one trial holds: its driver function plus its Train workers."""
    t = cfg.train
    out = {"CPU": driver_cpus + t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        out["GPU"] = t.num_workers * t.gpus_per_worker
    return out


def max_concurrent_trials(cluster: Mapping[str, float], per_trial: Mapping[str, float]) -> int:
    """How many trials fit the cluster at once (at least 1): the scarcest resource decides.

    Example:
        >>> max_concurrent_trials({"CPU": 16, "GPU": 4}, {"CPU": 2.25, "GPU": 1})
        4
        >>> max_concurrent_trials({"CPU": 2}, {"CPU": 0.75})
        2
    """
    counts = [math.floor(cluster.get(k, 0.0) / need + 1e-9)
              for k, need in per_trial.items() if need > 0]
    return max(1, min(counts, default=1))


def check_sweep(sweep: SweepJob) -> None:
    """Argument checks that need no Ray (metric, mode, counts)."""
    if sweep.metric not in VAL_METRIC_KEYS:
        raise ConfigError(f"--metric {sweep.metric!r} is not reported every epoch; "
                          f"choose one of {list(VAL_METRIC_KEYS)}")
    if sweep.mode not in ("min", "max"):
        raise ConfigError(f"--mode must be 'min' or 'max', got {sweep.mode!r}")
    if sweep.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {sweep.samples}")
    if sweep.max_concurrent is not None and sweep.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {sweep.max_concurrent}")
    epochs = sweep.train.cfg.train.epochs
    grace, _ = asha_settings(epochs)
    if not 1 <= (sweep.grace_period or grace) <= epochs:
        raise ConfigError(f"--grace-period must be in [1, {epochs}] (the epochs), got "
                          f"{sweep.grace_period}")
    if sweep.reduction_factor is not None and sweep.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor must be >= 2, got {sweep.reduction_factor}")


def tune_sweep(sweep: SweepJob, log=print, *, callbacks: Sequence[tune.Callback] = ()
               ) -> dict[str, Any]:
    """Run (or resume) the sweep, write the leaderboard, register the best trial's model.

    Args:
        sweep: the resolved sweep.
        log: where progress lines go.
        callbacks: extra ``ray.tune.Callback`` objects for the Tuner's run.

    Returns ``{"parent_run_id", "leaderboard" (rows, best first), "markdown", "best"
    (its row, or None), "model_uri", "version", "wall_seconds"}``.

    Raises:
        SweepError: the sweep exists and ``resume`` is off, there is nothing to resume,
            or no trial produced a usable model.
        SweepInterrupted: the sweep stopped with trials unfinished (continue with resume).
    """
    check_sweep(sweep)   # TrainJob made its local paths absolute for the trials
    job, cfg = sweep.train, sweep.train.cfg
    storage_path, fs = ray_storage(job.storage, cfg.train.storage_retry_s)
    experiment_path = f"{storage_path.rstrip('/')}/{sweep.name}"
    exists = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
    if sweep.resume and not exists:
        raise SweepError(f"nothing to resume: no Tune experiment at {experiment_path}")
    if exists and not sweep.resume:
        raise SweepError(f"a sweep named {sweep.name!r} already exists at {experiment_path}; "
                         "pass --resume to continue it or choose another --run-name")

    epochs = cfg.train.epochs
    grace, factor = asha_settings(epochs)
    grace, factor = sweep.grace_period or grace, sweep.reduction_factor or factor
    per_trial = trial_resources(cfg, sweep.driver_cpus)
    cluster = ray.cluster_resources()
    concurrent = sweep.max_concurrent or max_concurrent_trials(cluster, per_trial)
    if any(cluster.get(k, 0.0) < need for k, need in per_trial.items()):
        log(f"[tune] warning: one trial needs {per_trial} but the cluster has "
            f"{ {k: cluster.get(k, 0.0) for k in per_trial} }; trials wait for more nodes")
    n_trials = sweep.samples * sweep.space.grid_size
    tags = {"cvaa.tune.role": "sweep", "cvaa.tune.space": Path(sweep.space.source).name,
            "cvaa.model": cfg.model.generator, "cvaa.data": job.data}
    with tracking.open_run(job.mlflow_uri, sweep.name, experiment=job.experiment, tags=tags,
                           resume=sweep.resume,
                           log=lambda line: log(f"[tune] {line}")) as parent:
        tuned = set(sweep.space.keys)
        parent.log_params({
            **{k: v for k, v in cfg.flat().items() if k not in tuned},
            **{f"space.{k}": v for k, v in sweep.space.describe().items()},
            "tune.space_file": sweep.space.source, "tune.samples": sweep.samples,
            "tune.trials": n_trials, "tune.metric": sweep.metric, "tune.mode": sweep.mode,
            "tune.scheduler": "ASHA", "tune.max_t": epochs, "tune.grace_period": grace,
            "tune.reduction_factor": factor, "tune.max_concurrent": concurrent,
            "tune.trial_resources": per_trial, "data.prepared": job.data})
        if Path(sweep.space.source).is_file():
            parent.log_file(sweep.space.source, "space")
        log(f"[tune] sweep {sweep.name}: {n_trials} trials ({sweep.samples} samples x grid "
            f"{sweep.space.grid_size}) of up to {epochs} epochs, {concurrent} at a time "
            f"({per_trial} each); ASHA on {sweep.metric} ({sweep.mode}), rungs from epoch "
            f"{grace}, ratio {factor}")

        payload = {"cfg": cfg.to_dict(), "space": sweep.space, "data": job.data,
                   "trial_storage": sweep.trial_storage, "sweep": sweep.name,
                   "mlflow_uri": job.mlflow_uri, "experiment": job.experiment,
                   "parent_run_id": parent.run_id, "preset": job.preset,
                   # the trial's process is a Ray worker: the sweep's entry point and commit
                   "source_tags": tracking.source_tags()}
        trainable = tune.with_resources(tune.with_parameters(_trial, sweep=payload),
                                        {"CPU": sweep.driver_cpus})
        run_callbacks = [OrphanedPlacementGroupReaper(), *callbacks]
        start = time.perf_counter()
        if sweep.resume:
            log(f"[tune] resuming {experiment_path}")
            tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=fs)
        else:
            scheduler = FinishingASHA(time_attr="epoch", max_t=epochs, grace_period=grace,
                                      reduction_factor=factor)
            tuner = tune.Tuner(
                trainable, param_space=sweep.space.to_tune(),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                    num_samples=sweep.samples,
                    # The generator's own limit: Tune ignores max_concurrent_trials when
                    # it is handed a BasicVariantGenerator.
                    search_alg=BasicVariantGenerator(max_concurrent=concurrent,
                                                     random_state=cfg.train.seed),
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path,
                                          storage_filesystem=fs, verbose=sweep.verbose,
                                          callbacks=run_callbacks))
        with _credentials_kept_out_of_trial_envs():
            grid = tuner.fit()
        wall = time.perf_counter() - start
        _release_stopped_trials()

        rows = leaderboard(grid, sweep, _child_runs(job.mlflow_uri, parent.run_id),
                           trial_statuses(experiment_path, fs))
        _finish_children(job.mlflow_uri, rows)
        # The logged tables name each trial by its directory, trial_<id>: a bare id such as
        # 66e25_00000 or 43666_00000 reads as a number in mlflow.load_table (pandas).
        logged = [{**r, "trial": _trial_dirname(r["trial"])} for r in rows]
        markdown = leaderboard_markdown(logged, sweep.metric)
        if rows:
            parent.log_table(logged, "leaderboard.json")
        parent.log_text(markdown, "leaderboard.md")
        unfinished = [r["trial"] for r in rows if r["status"] == "unfinished"]
        if unfinished:   # Ctrl-C: Tune saved its state and returned early
            raise SweepInterrupted(f"sweep {sweep.name} was interrupted with trials "
                                   f"{unfinished} unfinished; continue it with --resume")
        best = next((r for r in rows if r["rank"] is not None), None)
        if best is None:
            errors = "; ".join(f"{r['trial']}: {r['status']}" for r in rows)
            raise SweepError(f"no trial of sweep {sweep.name} produced a model ({errors}); "
                             "fix the cause and rerun with --resume")
        registered = _register_best(sweep, best, log)
        parent.client.set_tag(parent.run_id, "cvaa.tune.best_trial", best["trial"])
        parent.client.set_tag(parent.run_id, "cvaa.tune.best_run_id", best["run_id"])
        parent.log_metrics({f"best/{sweep.metric}": best[f"{sweep.metric} last"],
                            "tune_wall_seconds": wall}, 0)
    log(f"[tune] best trial {best['trial']}: {sweep.metric} "
        f"{best[f'{sweep.metric} last']:.4f} after {best['epochs']} epochs; registered "
        f"{registered['model_uri']} (version {registered['version']})")
    return {"parent_run_id": parent.run_id, "leaderboard": rows, "markdown": markdown,
            "best": best, "model_uri": registered["model_uri"],
            "version": registered["version"], "wall_seconds": wall}


# --------------------------------------------------------------------------- resources

def remove_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    A trial that ASHA stopped leaves its Ray Train workers' placement group behind (see
    :func:`cvaa.distributed.compat.orphaned_placement_groups`); without this, on a
    cluster without a dashboard its CPUs and GPUs stay reserved and later trials starve.
    """
    from ray.util.placement_group import remove_placement_group

    orphans = compat.orphaned_placement_groups()
    for pg in orphans:
        remove_placement_group(pg)
    return len(orphans)


def _release_stopped_trials() -> None:
    """After the sweep: free what the trials stopped last still hold (see above)."""
    try:
        remove_orphaned_placement_groups()
    except Exception as exc:
        print(f"[tune] warning: cannot check for orphaned placement groups: {exc}")


class OrphanedPlacementGroupReaper(tune.Callback):
    """Runs :func:`remove_orphaned_placement_groups` every few seconds of the sweep (a
    stopped trial's controller dies a little after the stop)."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self.last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self.last < self.interval_s:
            return
        self.last = time.monotonic()
        try:
            remove_orphaned_placement_groups()
        except Exception as exc:  # never fail the sweep over the clean-up
            print(f"[tune] warning: cannot check for orphaned placement groups: {exc}")
            self.last = float("inf")


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last epoch.

    A trial that reaches ``max_t`` is done training but its ``fit`` still evaluates the
    test split and closes its MLflow run; a stop there (a rung can fall on ``max_t``, e.g.
    rungs 2, 4, 8, 16 for 16 epochs) would kill it halfway through that.
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs):
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.last_step = (time_attr, max_t)

    def on_trial_result(self, tune_controller, trial, result):
        time_attr, max_t = self.last_step
        if result.get(time_attr, 0) >= max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


# --------------------------------------------------------------------------- one trial

def _trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's function trainable: one trial = train + Table I in a child MLflow run.

    The child run closes itself FINISHED; a trial that raises (or that ASHA stops, which
    ends this process) leaves it open for the sweep to close KILLED or FAILED.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    space: SearchSpace = sweep["space"]
    cfg = space.apply(Config.from_dict(sweep["cfg"]), params).validate(f"trial {trial_id}")
    job = TrainJob(cfg=cfg, data=sweep["data"], run_name=f"{sweep['sweep']}-{trial_id}",
                   storage=sweep["trial_storage"], mlflow_uri=sweep["mlflow_uri"],
                   experiment=sweep["experiment"], preset=sweep["preset"])
    tags = {"cvaa.tune.sweep": sweep["sweep"], "cvaa.tune.trial_id": trial_id,
            "cvaa.tune.role": "trial", "cvaa.model": cfg.model.generator}
    dataset = PreparedDataset(job.data)
    try:
        with tracking.open_run(job.mlflow_uri, job.run_name, experiment=job.experiment,
                               tags=tags, parent_run_id=sweep["parent_run_id"],
                               resume=True, source=sweep["source_tags"]) as run:
            result = train(job, run, callbacks=[TuneReportCallback()], log=None)
            if dataset.split("test"):
                table = evaluate_split(result.generator(cfg), dataset, "test", cfg)
                log_evaluation(run, table, result.epochs)
                run.set_description(describe_run(job, dataset_splits(dataset, cfg), table))
            log_curves(run, result.history, f"trial {trial_id}")
    except NonFiniteLossError as exc:
        # A diverging combination is a result of the sweep, not an error to retry on
        # --resume: the leaderboard shows it (the loop reported nonfinite=1).
        print(f"[tune] trial {trial_id}: {exc}")


def _trial_dirname(trial) -> str:
    """A trial's directory name, trial_<id>; takes Tune's Trial or its id."""
    return f"trial_{getattr(trial, 'trial_id', trial)}"


# --------------------------------------------------------------------------- leaderboard

def leaderboard(grid, sweep: SweepJob, runs: Mapping[str, Any],
                statuses: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per trial, best first: rank, trial, status, epochs, the metric's last and
    best values, the tuned values, the child run and the last checkpoint.

    Trials rank by their *last* reported value, the one that describes the checkpoint
    that would be registered; diverged, failed and unfinished trials get no rank.

    Args:
        grid: Tune's ``ResultGrid``.
        sweep: the sweep (metric, mode, epochs, tuned keys).
        runs: ``{trial_id: mlflow Run}`` of the child runs.
        statuses: ``{trial_id: Tune status}``; a trial neither ``TERMINATED`` nor
            ``ERROR`` (an interrupted sweep) is ``unfinished``.
    """
    metric, epochs_max = sweep.metric, sweep.train.cfg.train.epochs
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        epochs = int(m.get("epoch", 0))
        history = _history(result, metric)
        last = m.get(metric, history[-1] if history else None)
        if statuses.get(trial_id) not in ("TERMINATED", "ERROR"):
            status = "unfinished"
        elif result.error is not None:
            status = f"error: {type(result.error).__name__}: {str(result.error)[:200]}"
        elif m.get("nonfinite"):
            status = "diverged (non-finite loss)"
        elif epochs < epochs_max:
            status = f"stopped by ASHA at epoch {epochs}"
        else:
            status = "completed"
        usable = (status in ("completed", f"stopped by ASHA at epoch {epochs}")
                  and last is not None and math.isfinite(last)
                  and bool(m.get("checkpoint_path")))
        pick = max if sweep.mode == "max" else min
        run = runs.get(trial_id)
        rows.append({
            "rank": 0 if usable else None, "trial": trial_id, "status": status,
            "epochs": epochs, f"{metric} last": last,
            f"{metric} best": pick(history) if history else None,
            **{k: (result.config or {}).get(k) for k in sweep.space.keys},
            "run_id": run.info.run_id if run else None,
            "checkpoint": m.get("checkpoint_path")})
    sign = -1.0 if sweep.mode == "max" else 1.0
    rows.sort(key=lambda r: (r["rank"] is None, sign * (r[f"{metric} last"] or 0.0)))
    for i, row in enumerate(r for r in rows if r["rank"] is not None):
        row["rank"] = i + 1
    return rows


def leaderboard_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    """The leaderboard as a Markdown table (without the checkpoint paths)."""
    if not rows:
        return "No trials ran.\n"
    cols = [c for c in rows[0] if c != "checkpoint"]

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [f"Ranked by the last {metric}.", "",
             "| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if isinstance(rows[0][c], (int, float)) else "---"
                            for c in cols) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# Ray Tune copies these from the driver's environment into every trial actor's runtime_env,
# which Ray's runtime_env agent writes in full to runtime_env_agent.log on each node.
_TUNE_FORWARDED_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                           "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def _credentials_kept_out_of_trial_envs():
    """While Tune starts trials, the driver's AWS credentials are out of its environment, so
    they reach no runtime_env (nor Ray's logs); the trials take them from their node's own
    environment, as every Ray Train worker does. The storage filesystem made before holds
    its own copy."""
    saved = {k: os.environ.pop(k) for k in _TUNE_FORWARDED_SECRETS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def trial_statuses(experiment_path: str, fs=None) -> dict[str, str]:
    """``{trial_id: Tune status}`` from the sweep's saved experiment state (what Tune wrote
    when ``Tuner.fit`` returned, interrupted or not)."""
    analysis = tune.ExperimentAnalysis(experiment_path, storage_filesystem=fs)
    return {t.trial_id: t.status for t in analysis.trials}


def _history(result, metric: str) -> list[float]:
    df = result.metrics_dataframe
    if df is None or metric not in df:
        return []
    return [float(v) for v in df[metric].dropna()]


# --------------------------------------------------------------------------- MLflow

def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def _child_runs(uri: str, parent_id: str) -> dict[str, Any]:
    """``{trial_id: Run}`` of the parent's child runs."""
    runs = _client(uri).search_runs(
        [_client(uri).get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)
    return {r.data.tags["cvaa.tune.trial_id"]: r for r in runs
            if "cvaa.tune.trial_id" in r.data.tags}


def _finish_children(uri: str, rows: list[dict[str, Any]]) -> None:
    """Tag each child run with its outcome; close the runs ASHA's stop left open."""
    client = _client(uri)
    for row in rows:
        if row["run_id"] is None:
            continue
        client.set_tag(row["run_id"], "cvaa.tune.outcome", row["status"])
        client.set_tag(row["run_id"], "cvaa.tune.rank", str(row["rank"] or "-"))
        status = client.get_run(row["run_id"]).info.status
        if row["status"] == "unfinished":
            continue   # --resume picks the run up again
        if row["status"].startswith("stopped") and status != "KILLED":
            # ASHA stopped the trial's driver mid-fit: its run is still open (a trial's
            # open_run leaves a child's failure to its parent, so no late handler races this).
            client.set_terminated(row["run_id"], "KILLED")
        elif status == "RUNNING":
            client.set_terminated(row["run_id"], "FAILED")


def _register_best(sweep: SweepJob, best: dict[str, Any], log: Callable[[str], Any]
                   ) -> dict[str, Any]:
    """Log the best trial's last checkpoint into its child run and register it, with the
    test metrics its trial logged, then calibrate it on the trial's hold-out
    (``train.calibration_cases``), as ``jobs/train.py`` does."""
    job = sweep.train
    checkpoint = ray.train.Checkpoint(best["checkpoint"],
                                      filesystem=storage_filesystem(
                                          job.storage, job.cfg.train.storage_retry_s))
    generator, state = load_checkpoint_generator(checkpoint)
    trial_job = TrainJob(cfg=Config.from_dict(state["config"]), data=job.data,
                         run_name=job.run_name, storage=job.storage,
                         mlflow_uri=job.mlflow_uri, register_name=job.register_name,
                         experiment=job.experiment, preset=job.preset)
    child = tracking.RunLogger(job.mlflow_uri, best["run_id"])
    metrics = child.client.get_run(best["run_id"]).data.metrics
    test_row = {k[len("test/"):]: v for k, v in metrics.items() if k.startswith("test/")}
    dataset = PreparedDataset(job.data)
    registered = register(child, generator, trial_job, dataset, test_row or None,
                          alias=sweep.alias)
    child.client.set_tag(best["run_id"], "cvaa.tune.best", "true")
    calibrate_registered(trial_job, child, checkpoint, dataset, registered,
                         lambda line: log(f"[tune] {line}"))
    return registered


__all__ = ["FinishingASHA", "OrphanedPlacementGroupReaper", "SweepError", "SweepInterrupted",
           "SweepJob",
           "VAL_METRIC_KEYS", "asha_settings", "check_sweep", "leaderboard",
           "leaderboard_markdown", "max_concurrent_trials", "remove_orphaned_placement_groups",
           "trial_resources", "trial_statuses", "tune_sweep"]
