"""Connecting to Ray: the cluster, the environment workers inherit, and a quiet console.

Every job starts here (:func:`init_ray`): under ``ray job submit`` (``RAY_ADDRESS`` set) or
with ``--address`` it joins that cluster, otherwise it starts a local one. By default the
console shows only cvaa's own progress lines: worker output is not forwarded to the driver
(it stays in Ray's log files, ``/tmp/ray/session_latest/logs``), Ray Data's progress bars
are off and Ray's and MLflow's loggers say only warnings. ``verbose=True`` (the jobs'
``--verbose``) brings all of it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator


# S3 and MLflow settings the driver was given reach the workers too. Secrets never do:
# a runtime_env is written to Ray's logs (runtime_env_agent.log) and shown by the
# dashboard. Workers take credentials from their own environment: a local Ray started by
# the job inherits the driver's; on a cluster, the environment of `ray start` on each node,
# ~/.aws/credentials, or the node's IAM role (tests/test_secrets.py scans for leaks).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_PROFILE", "MLFLOW_TRACKING_URI",
                 "MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
# Library loggers that are quiet unless --verbose.
_CHATTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic",
                   "urllib3", "botocore")


def forwarded_env() -> dict[str, str]:
    """The driver's S3 / MLflow environment variables, for a Ray ``runtime_env``."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def quiet_libraries(verbose: bool = False) -> None:
    """Ray's and MLflow's loggers at ERROR (INFO with ``verbose``)."""
    level = logging.INFO if verbose else logging.ERROR
    # MLflow sets its loggers' level from this variable when it is imported.
    os.environ["MLFLOW_LOGGING_LEVEL"] = logging.getLevelName(level)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def joins_cluster(address: str | None = None) -> bool:
    """Whether :func:`init_ray` would join an existing cluster rather than start one."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def init_ray(address: str | None = None, num_cpus: int | None = None, *,
             verbose: bool = False) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS`` (as under ``ray job submit``),
    else start a local one with ``num_cpus`` CPUs (default: the machine's).

    Args:
        address: a Ray address (``ray://...``, ``host:port`` or ``auto``).
        num_cpus: CPUs of a local cluster; ignored when joining one.
        verbose: forward the workers' output to this console and keep the libraries'
            progress bars and INFO logs.
    """
    import ray
    import ray.data

    quiet_libraries(verbose)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if ray.is_initialized():
        return
    if not verbose:
        # Ray's C++ core writes some internal notices to the driver's stderr at ERROR
        # level (e.g. one per Ray Data actor pool: "constructor arguments in the object
        # store"); quiet means fatal only. A value of the user's own is kept.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict[str, Any] = {"log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.ERROR}
    with contextlib.nullcontext() if verbose else _without_log_level_notice():
        if joins_cluster(address):
            ray.init(address=address or os.environ["RAY_ADDRESS"], **kwargs)
        else:
            # address="local": always a new cluster (ray.init() alone joins any Ray
            # already running on this machine, e.g. another job's, and then refuses
            # num_cpus)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)


# What Ray's C++ logger prints, at INFO, whenever RAY_BACKEND_LOG_LEVEL is set.
_LOG_LEVEL_NOTICE = "Set ray log level from environment variable RAY_BACKEND_LOG_LEVEL"


@contextlib.contextmanager
def _without_log_level_notice() -> Iterator[None]:
    """Drop the one line that ``RAY_BACKEND_LOG_LEVEL`` cannot silence itself.

    As the driver's core worker starts (inside ``ray.init``), Ray's C++ logger announces
    the level it read from ``RAY_BACKEND_LOG_LEVEL`` on the process's stderr (file
    descriptor 2, not ``sys.stderr``) before that level applies (``logging.cc: Set ray log
    level from environment variable ...``). File descriptor 2 is held in a file while the
    block runs; afterwards every other line written there is passed on unchanged.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace")
                    .splitlines(keepends=True) if _LOG_LEVEL_NOTICE not in line]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


