"""MLflow runs: where the tracking store is, creating, finding and logging into runs.

The tracking URI comes from ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else a local
SQLite store (``~/.cvaa/mlflow.db``, artifacts beside it), so the model registry works with
no server. Browse it with ``mlflow ui --backend-store-uri sqlite:///$HOME/.cvaa/mlflow.db``.
Only the driver and rank 0 call into this module.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

EXPERIMENT = "cvaa"


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = Path(os.environ.get("CVAA_HOME", Path.home() / ".cvaa"))
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live next to the database file (not in the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def setup(tracking_uri: str, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``tracking_uri`` and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment,
                                    artifact_location=_artifact_root(tracking_uri, experiment))


def find_run(tracking_uri: str, experiment_id: str, run_name: str,
             tags: Mapping[str, str] | None = None) -> str | None:
    """The newest unfinished run called ``run_name`` (and carrying ``tags``), if any."""
    import mlflow

    query = " and ".join([f"tags.`mlflow.runName` = '{run_name}'"]
                         + [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()])
    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
        max_results=1)
    if runs and runs[0].info.status != "FINISHED":
        return runs[0].info.run_id
    return None


def source_tags(entry_point: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags for a run this process starts, and cvaa's version.

    ``mlflow.source.name`` is the entry point (``jobs/train.py``: ``sys.argv[0]``, relative
    to the checkout), ``mlflow.source.type`` ``JOB``, ``mlflow.source.git.commit`` the
    checkout's commit when the ``cvaa`` package runs from a git checkout (absent
    otherwise), ``cvaa.version`` the package version.
    """
    import cvaa

    root = Path(cvaa.__file__).resolve().parents[1]
    script = Path(entry_point or sys.argv[0] or "python").resolve()
    name = str(script.relative_to(root)) if script.is_relative_to(root) else script.name
    tags = {"mlflow.source.name": name, "mlflow.source.type": "JOB",
            "cvaa.version": cvaa.__version__}
    commit = _git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(root: Path) -> str | None:
    """The commit of the checkout at ``root`` (not of a repository that merely contains
    it), or ``None``."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, interval_s: float,
                   stop_wait_s: float = 10.0) -> Iterator[None]:
    """MLflow system metrics of this node logged into ``run_id`` while the block runs:
    ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, disk
    and network, and per GPU ``system/gpu_<i>_utilization_percentage`` and
    ``system/gpu_<i>_memory_usage_megabytes`` where the NVIDIA management library
    (``nvidia-ml-py``) finds GPUs (none is not an error). One sample every ``interval_s``
    seconds (MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins when set); ``0``
    logs none. A resumed run continues the steps. Rank 0 of a training calls it.

    The monitor starts in the background, and leaving the block waits at most
    ``stop_wait_s`` for its last flush: a tracking server that is down must not hold up a
    training (MLflow retries an unreachable server for minutes; the spool of
    :mod:`cvaa.tracking.spool` keeps the run's own entries, and the system metrics of an
    outage are not worth a stall).
    """
    if interval_s <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitors: list[SystemMetricsMonitor] = []

    def start() -> None:   # resuming the steps reads the run: a call that may retry
        monitors.append(SystemMetricsMonitor(run_id, sampling_interval=interval_s,
                                             resume_logging=True, tracking_uri=tracking_uri))
        monitors[0].start()

    def stop() -> None:
        starting.join()
        if monitors:
            monitors[0].finish()

    starting = threading.Thread(target=start, name="cvaa-system-metrics-start", daemon=True)
    starting.start()
    try:
        yield
    finally:
        stopping = threading.Thread(target=stop, name="cvaa-system-metrics-stop",
                                    daemon=True)
        stopping.start()
        stopping.join(timeout=stop_wait_s)


class RunKilled(Exception):
    """Raised inside :func:`open_run` to close the run KILLED (a stop, not a failure)."""


@contextlib.contextmanager
def open_run(tracking_uri: str, name: str, *, experiment: str = EXPERIMENT,
             tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
             resume: bool = False, log: Callable[[str], None] | None = None,
             source: Mapping[str, str] | None = None) -> Iterator["RunLogger"]:
    """The one lifecycle of every cvaa MLflow run: open it, yield a logger, close it.

    Opening creates a run called ``name`` (a child of ``parent_run_id`` if given), or
    with ``resume`` reopens the newest unfinished run of that name and ``tags`` (as
    ``jobs/train.py --run-name`` and ``jobs/tune.py --resume`` do). Closing happens on every
    exit path: FINISHED when the block ends, KILLED on ``KeyboardInterrupt`` or
    :class:`RunKilled`, FAILED on any other exception, which is re-raised, except
    :class:`TrackingUnavailableError` (the store cannot be told: the run stays RUNNING for
    the resubmitted job to resume). A server's refusal (HTTP 401 / 403) is raised as
    :class:`TrackingAuthError`, naming the variables to set. A child run
    is the exception to the last rule: it is closed FINISHED by itself, but when it raises
    it stays RUNNING for its parent to close (a sweep knows whether its scheduler stopped
    the trial or the trial failed; see ``cvaa.distributed.sweep``).

    Every run carries MLflow's source tags (``source``, default :func:`source_tags` of
    this process; a resumed run gets those of the code that resumed it).

    Example:
        >>> with open_run("sqlite:///mlflow.db", "cvaa-demo", resume=True) as run:
        ...     run.log_metrics({"loss": 0.1}, step=1)
    """
    import mlflow

    try:
        experiment_id = setup(tracking_uri, experiment)
        client = mlflow.MlflowClient(tracking_uri)
        run_id = find_run(tracking_uri, experiment_id, name, tags) if resume else None
        run_tags = {**(source or source_tags()), **(tags or {})}
        if run_id is None:
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run_id = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
            verb = "started"
        else:
            client.update_run(run_id, status="RUNNING")
            _set_tags(client, run_id, run_tags)   # the code that resumed it
            verb = "resumed"
    except Exception as exc:
        raise auth_refusal(exc, tracking_uri) or exc
    if log:
        log(f"MLflow run {name} {verb} ({run_id} at {tracking_uri})")
    logger = RunLogger(tracking_uri, run_id)
    try:
        yield logger
    except (KeyboardInterrupt, RunKilled):
        logger.set_terminated("KILLED")
        raise
    except TrackingUnavailableError:
        raise  # it cannot be told; the run stays RUNNING and the next resume takes it
    except BaseException as exc:
        if not parent_run_id:
            logger.set_terminated("FAILED")
        raise auth_refusal(exc, tracking_uri) or exc
    logger.set_terminated("FINISHED")


def _set_tags(client, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class RunLogger:
    """Logs into one existing run through the client API (no global active run), so it
    works from a Ray worker as well as from the driver."""

    def __init__(self, tracking_uri: str, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, *,
                    model_id: str | None = None, dataset=None) -> None:
        """Metrics at ``step``; with ``model_id`` (a logged model) and ``dataset`` (an
        ``mlflow.data`` dataset) they are also the logged model's, measured on that
        dataset."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        on = ({"dataset_name": dataset.name, "dataset_digest": dataset.digest}
              if dataset is not None else {})
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step, model_id=model_id, **on)
            for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _set_tags(self.client, self.run_id, tags)

    def set_description(self, text: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content``, Markdown)."""
        self.set_tags({"mlflow.note.content": text})

    def log_datasets(self, root: str, manifest: Mapping[str, Any],
                     splits: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, Any]:
        """Splits of a prepared dataset as the run's dataset inputs
        (:func:`cvaa.tracking.datasets.log_splits`); returns them by context."""
        from cvaa.tracking.datasets import log_splits

        return log_splits(self.client, self.run_id, root, manifest, splits)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory(prefix="cvaa-art-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path),
                                     None if parent in ("", ".") else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        columns = list(rows[0]) if rows else []
        data = {c: [r.get(c) for r in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class TrackingUnavailableError(ConnectionError):
    """The tracking store cannot be reached: a server that does not answer, or a local
    store that does not exist (looking a model up must not create an empty one)."""


# The variables MLflow's client takes its credentials from (basic auth, or a bearer token).
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                        "(or MLFLOW_TRACKING_TOKEN)")


class TrackingAuthError(TrackingUnavailableError):
    """The tracking server refused the request (HTTP 401: no or wrong credentials; 403: the
    account lacks the permission). Retrying cannot help: the message names what to set."""


def auth_refusal(exc: BaseException, tracking_uri: str) -> TrackingAuthError | None:
    """The :class:`TrackingAuthError` to raise when ``exc`` is MLflow's 401 / 403 answer,
    else ``None``.

    Example:
        >>> try:
        ...     client.create_run(experiment_id)
        ... except MlflowException as exc:
        ...     raise auth_refusal(exc, uri) or exc
    """
    import re

    code = getattr(exc, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    account = (f"account {user!r}" if user else "the MLFLOW_TRACKING_TOKEN given"
               if os.environ.get("MLFLOW_TRACKING_TOKEN") else "no credentials set")
    if code == "UNAUTHENTICATED":
        return TrackingAuthError(
            f"{tracking_uri} refused the credentials (HTTP 401, {account}): set "
            f"{CREDENTIAL_VARIABLES} to an account of that server")
    endpoint = re.search(r"endpoint (\S+)", str(exc))
    what = f" for {endpoint.group(1)}" if endpoint else ""
    return TrackingAuthError(
        f"{tracking_uri} refused the request{what} (HTTP 403, {account} lacks the "
        f"permission): ask the server's admin for it, or set {CREDENTIAL_VARIABLES} to an "
        f"account that has it")


def check_server(tracking_uri: str) -> None:
    """:func:`check_tracking_uri` for a tracking server (a local store is created on first
    use). Jobs call it before they start anything: a server that does not answer or that
    refuses the credentials stops them at once, in one line."""
    if tracking_uri.startswith(("http://", "https://")):
        check_tracking_uri(tracking_uri)


def check_tracking_uri(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the URI, when the store behind ``tracking_uri`` is not there.

    MLflow itself retries an unreachable server for minutes before it gives up.
    """
    import urllib.error
    import urllib.request

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise TrackingUnavailableError(f"{tracking_uri}: no MLflow database at {db}")
    elif tracking_uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
        except urllib.error.HTTPError:
            pass  # it answered (an auth proxy may refuse /health): reachable
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailableError(f"{tracking_uri}: tracking server unreachable "
                                           f"({reason})") from exc
        _check_credentials(tracking_uri)
    elif tracking_uri.startswith("file:") or ("://" not in tracking_uri
                                              and not tracking_uri.startswith("databricks")):
        root = Path(tracking_uri[len("file://"):] if tracking_uri.startswith("file://")
                    else tracking_uri)
        if not root.is_dir():
            raise TrackingUnavailableError(f"{tracking_uri}: no MLflow file store at {root}")


def _check_credentials(tracking_uri: str) -> None:
    """One authenticated request (the one every job makes first: find the experiment), so
    that missing or wrong credentials stop a job before it starts anything."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)
    except MlflowException as exc:
        refused = auth_refusal(exc, tracking_uri)
        if refused is not None:
            raise refused from None
        raise
