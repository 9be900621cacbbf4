"""The Ray Train per-worker loop: DDP GAN training with validation, checkpoints, MLflow.

``train_loop_per_worker(config)`` runs on every rank. ``config`` is plain builtins plus
the callbacks the caller of :func:`cvaa.distributed.training.train` passed in:

    {"cfg": Config.to_dict(), "data": PREPARED_URI,
     "mlflow": {"tracking_uri": ..., "run_id": ...},
     "callbacks": [obj with on_epoch_start(epoch, trainer), ...]}

A callback's ``on_epoch_start(epoch, trainer)`` runs on every rank before each epoch
(0-based) with the rank's :class:`cvaa.gan.GANTrainer`: a hook for schedules or freezing,
and how the tests poison the weights to check the NaN guard.

Every epoch every rank calls ``ray.train.report``; rank 0 attaches the checkpoint (a
``checkpoint.pt`` readable with ``torch.load(..., weights_only=True)``) and alone talks to
MLflow. A restarted worker group resumes from ``ray.train.get_checkpoint()``. The return
value (``Result.return_value``) says whether the run completed or stopped on a NaN/inf.

The epochs themselves (steps, NaN guard, validation, metrics, checkpoint state) are
:func:`cvaa.loop.train_epochs`, the loop :func:`cvaa.local.train_local` runs without Ray;
this module adds what a Ray run needs around it: resume from Ray's checkpoint, the
checkpoint upload, MLflow on rank 0 and ``ray.train.report``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from cvaa.config import Config
from cvaa.data.dataset import PreparedDataset
from cvaa.distributed.checkpoints import (CHECKPOINT_FILE, CorruptCheckpointError,
                                          checkpoint_name, load_resume_state,
                                          persist_checkpoint, write_marker)
from cvaa.loop import EpochEnd, all_ok, setup, train_epochs
from cvaa.scoring import predict

# Inside a checkpoint: MLflow entries not yet received when it was written (see spool.py).
PENDING_DIR = "mlflow_pending"
# How long an epoch's report waits for a reachable server to take the epoch's entries (not
# at all while it is unreachable).
MLFLOW_EPOCH_SETTLE_S = 30.0


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    run = setup(cfg, config["data"], device, rank=rank, world=world,
                wrap=ray.train.torch.prepare_model,
                on_retry=lambda line: print(f"warning: rank {rank}: {line}", flush=True))

    tracker = _RankZeroTracker(config.get("mlflow"), rank)
    checkpoint = ray.train.get_checkpoint()
    state, resume_warnings = None, []
    if checkpoint is not None:
        try:  # the newest checkpoint whose files match their checksums
            state, resume_warnings = load_resume_state(
                checkpoint, CHECKPOINT_FILE, map_location=device, use=tracker.requeue)
        except CorruptCheckpointError as exc:
            # Every rank reads the same storage and stops the same way: no crash loop.
            ray.train.report({"epoch": 0, "corrupt_checkpoints": 1.0})
            return {"status": "corrupt", "message": str(exc)}

    persist = _PersistAndReport(tracker)
    with tracker.system_metrics(cfg.train.system_metrics_s):
        outcome = train_epochs(run, on_epoch_end=persist,
                               callbacks=config.get("callbacks") or (), state=state,
                               resume_warnings=resume_warnings,
                               log=(lambda line: print(line, flush=True)) if rank == 0
                               else None)
    if outcome["status"] == "nonfinite":
        # The driver raises with this message; the last good checkpoint stays the run's.
        ray.train.report({"epoch": outcome["epoch"], "nonfinite": 1.0})
        return {"status": "nonfinite", "message": outcome["message"]}
    if outcome["status"] != "completed":
        return outcome
    mlflow_pending = persist.mlflow_pending
    if outcome["start_epoch"] >= cfg.train.epochs:
        # Training was complete: a resubmitted job sends what MLflow did not receive then
        # (requeued from the last checkpoint) before the driver evaluates and registers.
        mlflow_pending = tracker.finish(cfg.train.mlflow_wait_s)
    return {"status": "completed", "epochs": cfg.train.epochs,
            "mlflow_pending": mlflow_pending}


class _PersistAndReport:
    """The Ray end of each epoch (:func:`cvaa.loop.train_epochs`' ``on_epoch_end``): rank
    0 writes the checkpoint and uploads it to the run's storage, holding the epoch's MLflow
    entries until it exists; every rank learns whether that worked, then reports."""

    def __init__(self, tracker: "_RankZeroTracker"):
        self.tracker = tracker
        self.mlflow_pending = 0

    def __call__(self, end: EpochEnd) -> dict[str, Any] | None:
        import ray.train

        run, metrics, tracker, epoch = end.run, end.metrics, self.tracker, end.epoch
        cfg = run.cfg
        figure_due = end.last or (epoch + 1) % max(cfg.train.figure_every, 1) == 0
        name = checkpoint_name(epoch + 1, len(end.history.get("checkpoint_fallback_at", [])))
        persisted, failure = None, ""
        with tempfile.TemporaryDirectory(prefix="cvaa-ckpt-") as tmp:
            if run.rank == 0:
                torch.save(end.state(), Path(tmp) / CHECKPOINT_FILE)
                # The epoch's log is held until its checkpoint exists: a rank 0 that dies
                # before has sent nothing of an epoch its successor trains again (one value
                # per step in MLflow). Unsent entries travel with the checkpoint.
                tracker.hold()
                tracker.log_epoch(metrics, epoch + 1)
                if figure_due:
                    tracker.log_figure(run.generator, run.dataset,
                                       (run.val_ids or run.train_ids)[0], epoch + 1)
                    tracker.log_checkpoint(Path(tmp) / CHECKPOINT_FILE, epoch + 1)
                tracker.keep_pending(Path(tmp))
                write_marker(tmp)
                # Rank 0 uploads before anyone reports, retrying an unreachable storage;
                # all ranks then learn the outcome, so a full storage stops them together.
                notes: list[str] = []
                try:
                    persisted = persist_checkpoint(tmp, name, cfg.train.storage_retry_s,
                                                   epoch + 1, log=notes.append)
                    tracker.release()
                except OSError as exc:
                    failure = str(exc)
                if len(notes) > 1:  # it took retries: the console says so (first, last)
                    metrics["storage_note"] = f"{notes[0]} ... {notes[-1]}"
                if end.last and not failure:
                    self.mlflow_pending = tracker.finish(cfg.train.mlflow_wait_s)
                    if self.mlflow_pending:
                        metrics["mlflow_pending"] = float(self.mlflow_pending)
                elif not failure:  # a reachable server has the epoch before it is reported
                    tracker.settle(MLFLOW_EPOCH_SETTLE_S)
                metrics["mlflow_queued"] = float(tracker.queued())
            if not all_ok(not failure, run.distributed, run.device):
                if run.rank == 0:
                    return {"status": "storage", "message": failure}
                return {"status": "storage", "message": "rank 0 could not write the "
                        "checkpoint"}
            ray.train.report(metrics, checkpoint=persisted, checkpoint_dir_name=name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        # A server that refuses rank 0's credentials stops every rank, the epoch's checkpoint
        # reported (an outage does not: it is waited out): each later epoch would go
        # unlogged, and no restart fixes credentials.
        refused = tracker.refused()
        if not all_ok(not refused, run.distributed, run.device):
            return {"status": "refused", "message": refused}
        return None


class _RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run (a no-op elsewhere / without one),
    through a :class:`cvaa.tracking.SpooledRun`: a tracking server that is down never
    stops or stalls training; what it has not received travels with every checkpoint."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int):
        self.active = bool(mlflow_cfg) and rank == 0
        self.cfg = mlflow_cfg or {}
        if self.active:
            from cvaa.tracking.spool import SpooledRun
            self.run = SpooledRun(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"],
                                  on_state=lambda line: print(line, flush=True))

    def system_metrics(self, interval_s: float):
        """MLflow system metrics of rank 0's node while the epochs run."""
        import contextlib

        from cvaa.tracking import system_metrics

        if not self.active:
            return contextlib.nullcontext()
        return system_metrics(self.cfg["tracking_uri"], self.cfg["run_id"], interval_s)

    def hold(self) -> None:
        if self.active:
            self.run.hold()

    def release(self) -> None:
        if self.active:
            self.run.release()

    def log_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        if self.active:
            self.run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)},
                                 epoch)

    def log_figure(self, generator, dataset: PreparedDataset, case_id: str,
                   epoch: int) -> None:
        if not self.active:
            return
        from cvaa.figures import slice_grid

        xrays, ct = dataset.arrays(case_id)
        pred = predict(generator, torch.from_numpy(xrays)[None])[0]
        png = slice_grid({"prediction": [pred.numpy()], "ground truth": [ct]},
                         row_labels=[case_id], title=f"epoch {epoch}")
        self.run.log_bytes(png, f"figures/slices_epoch_{epoch:04d}.png")

    def log_checkpoint(self, path: Path, epoch: int) -> None:
        if self.active:
            # a copy for MLflow users; not dumped into the next checkpoint (it is one)
            self.run.log_file(path, f"checkpoints/epoch_{epoch:04d}", dumped=False)

    def settle(self, timeout_s: float) -> None:
        if self.active:
            self.run.settle(timeout_s)

    def queued(self) -> int:
        return self.run.pending() if self.active else 0

    def refused(self) -> str:
        """The tracking server's refusal of rank 0's credentials ("" if none)."""
        return self.run.refused if self.active else ""

    def keep_pending(self, checkpoint_dir: Path) -> int:
        """Copy what MLflow has not received yet into the checkpoint (Ray storage)."""
        return self.run.dump(checkpoint_dir / PENDING_DIR) if self.active else 0

    def requeue(self, checkpoint_dir: Path) -> int:
        """A resumed rank 0 sends first what its predecessor could not."""
        pending = checkpoint_dir / PENDING_DIR
        return self.run.requeue(pending) if self.active and pending.is_dir() else 0

    def finish(self, timeout_s: float) -> int:
        """Wait (bounded) for the queue to drain; returns what is still pending."""
        if not self.active:
            return 0
        self.run.flush(timeout_s)
        left = self.run.pending()
        if not left:
            self.run.close()
        return left
