"""Faults the tests inject from outside the production code.

A worker is killed the way a node loss or the OOM killer kills it: SIGKILL to the real Ray
Train worker process, from a callback the test passes in. A NaN comes from poisoned
weights, set by a per-epoch worker callback. Ray pickles these objects into its
processes by value (``register_by_value``), so the workers need not import ``tests``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

import psutil
import ray.train
import torch
from ray import tune

# The process title Ray gives Ray Train's worker actors.
WORKER_TITLE = "RayTrainWorker"


def register_by_value() -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes on this machine."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::") and WORKER_TITLE in cmdline:
            pids.append(proc.pid)
    return sorted(pids)


def kill_one_train_worker(marker: Path, note: str) -> int:
    """SIGKILL the newest Ray Train worker once (``marker`` records that it happened)."""
    if marker.exists():
        return 0
    pids = train_worker_pids()
    if not pids:
        raise RuntimeError("no Ray Train worker process to kill")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed {pids[-1]} {note}\n")
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


class KillWorkerAfterEpoch(ray.train.UserCallback):
    """Ray Train callback: once ``epoch`` is reported (and its checkpoint persisted), kill
    a worker process while it trains the next epoch."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, Path(marker)

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and int(metrics[0].get("epoch", 0)) == self.epoch:
            kill_one_train_worker(self.marker, f"after epoch {self.epoch}")


class KillTrialWorkerAfterEpoch(tune.Callback):
    """Tune callback (runs in the sweep's driver): the same fault inside a trial."""

    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, Path(marker)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if int(result.get("epoch", 0)) == self.epoch:
            kill_one_train_worker(self.marker, f"of {trial.trial_id} after epoch {self.epoch}")


class PoisonWeightsAtEpoch:
    """Worker callback: the generator's weights become NaN at the start of ``epoch``
    (0-based), on every rank or only on ``rank``, so the next loss there is non-finite."""

    def __init__(self, epoch: int, rank: int | None = None):
        self.epoch, self.rank = epoch, rank

    def on_epoch_start(self, epoch: int, trainer) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if epoch == self.epoch and self.rank in (None, rank):
            with torch.no_grad():
                for p in trainer.generator.parameters():
                    p.fill_(math.nan)
