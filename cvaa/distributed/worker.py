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
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from cvaa.config import Config
from cvaa.distributed.checkpoints import (CHECKPOINT_FILE, CorruptCheckpointError,
                                          checkpoint_name, load_resume_state,
                                          persist_checkpoint, write_marker)
from cvaa.data.dataset import PreparedDataset, validation_split
from cvaa.data.augment import Randomizer
from cvaa.data.stream import CaseStream, chunks, epoch_plan
from cvaa.scoring import evaluate_cases, predict
from cvaa.models import build_discriminator, build_generator, set_output_prior
from cvaa.gan import GANTrainer, NonFiniteLossError, per_worker_batch, unwrap

# Inside a checkpoint: MLflow entries not yet received when it was written (see spool.py).
PENDING_DIR = "mlflow_pending"
# How long an epoch's report waits for a reachable server to take the epoch's entries (not
# at all while it is unreachable).
MLFLOW_EPOCH_SETTLE_S = 30.0
# Reported every epoch as ``val/<name>`` (means over the validation patients).
VAL_METRICS = ("mae", "mse", "cosine", "psnr", "ssim", "psnr_x2ct", "ssim_x2ct")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = Config.from_dict(config["cfg"])
    callbacks = list(config.get("callbacks") or ())
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    # ------------------------------------------------------------------ data
    # Streamed, never cached: each epoch this rank reads its share of a seeded permutation
    # (every case once over the ranks), prefetched in threads (cvaa.data.stream).
    dataset = PreparedDataset(config["data"])
    train_ids, val_ids = validation_split(dataset, cfg.train.val_fraction, cfg.train.seed)
    if not train_ids:
        raise ValueError(f"{dataset.root}: no training cases after the validation split")
    batch = per_worker_batch(cfg)
    stream_options = dict(prefetch=cfg.train.prefetch_batches, threads=cfg.train.io_threads,
                          pin_memory=device.type == "cuda", retry_s=cfg.train.storage_retry_s,
                          on_retry=lambda line: print(f"warning: rank {rank}: {line}",
                                                      flush=True))
    stream = CaseStream(dataset.arrays, **stream_options)     # validation: fixed DRRs
    randomizer = None
    if cfg.augment.enabled:  # training X-rays rendered again per sample, in the threads
        dataset.context(train_ids[0])  # fails now, naming the dataset, if it has none
        randomizer = Randomizer(dataset.arrays, dataset.context, cfg)
    train_stream = CaseStream(randomizer, **stream_options) if randomizer else stream
    my_val_ids = val_ids[rank::world]  # each rank validates a shard

    # ------------------------------------------------------------------ models
    generator = build_generator(cfg.model.generator, cfg)
    if cfg.model.output_prior:  # same cases on every rank; a resumed run loads over it
        set_output_prior(generator, training_mean_intensity(dataset, train_ids))
    discriminator = build_discriminator(cfg) if generator.uses_discriminator else None
    generator = ray.train.torch.prepare_model(generator)
    if discriminator is not None:
        discriminator = ray.train.torch.prepare_model(discriminator)
    trainer = GANTrainer(generator, discriminator, cfg, device)
    if distributed:
        trainer.all_finite = lambda ok: _all_ok(ok, distributed, device)

    start_epoch, history, mlflow_pending = 0, defaultdict(list), 0
    tracker = _RankZeroTracker(config.get("mlflow"), rank)
    checkpoint = ray.train.get_checkpoint()
    resume_warnings: list[str] = []
    if checkpoint is not None:
        try:  # the newest checkpoint whose files match their checksums
            state, resume_warnings = load_resume_state(
                checkpoint, CHECKPOINT_FILE, map_location=device, use=tracker.requeue)
        except CorruptCheckpointError as exc:
            # Every rank reads the same storage and stops the same way: no crash loop.
            ray.train.report({"epoch": 0, "corrupt_checkpoints": 1.0})
            return {"status": "corrupt", "message": str(exc)}
        for warning in resume_warnings:
            if rank == 0:
                print(f"warning: {warning}", flush=True)
        trainer.load_state_dict(state["trainer"])
        start_epoch = int(state["epoch"]) + 1
        history = defaultdict(list, state.get("history", {}))
        history["resumed_at_epoch"].append(float(start_epoch + 1))
        if resume_warnings:  # later checkpoints get new names (checkpoint_name)
            history["checkpoint_fallback_at"].append(float(start_epoch + 1))
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {state['epoch'] + 1}")

    for epoch in range(start_epoch, cfg.train.epochs):
        for callback in callbacks:
            callback.on_epoch_start(epoch, trainer)
        trainer.set_epoch(epoch)
        tick = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        steps, cases, wait, nonfinite = 0, 0, 0.0, ""
        plan = epoch_plan(train_ids, seed=cfg.train.seed, epoch=epoch, rank=rank,
                          world=world, batch=batch)
        if randomizer:
            randomizer.epoch = epoch
        batches = train_stream.iterate(plan)
        while True:
            waited = time.perf_counter()
            item = next(batches, None)
            wait += time.perf_counter() - waited
            if item is None:
                break
            xrays = item.xrays.to(device, non_blocking=True)
            ct = item.ct.to(device, non_blocking=True)
            try:
                out = trainer.step(xrays, ct, weight=item.weight)
            except NonFiniteLossError as exc:
                nonfinite = f"epoch {epoch + 1}, step {steps + 1}: {exc}"
                batches.close()
                break
            if item.weight > 0:  # a padding step (weight 0) is not one of the epoch's
                for k, v in out.items():  # summed on the device, read once an epoch
                    sums[k] = sums[k] + v
                steps += 1
                cases += len(item.case_ids)
        if not nonfinite:
            try:  # the steps since the last check, before anything is checkpointed
                trainer.check_finite()
            except NonFiniteLossError as exc:
                nonfinite = f"epoch {epoch + 1}, by step {steps}: {exc}"
        train_seconds = time.perf_counter() - tick
        if nonfinite:
            # Stop every rank cleanly (no retries: a NaN would recur); the last good
            # checkpoint stays the run's checkpoint, the driver raises with this message.
            ray.train.report({"epoch": epoch + 1, "nonfinite": 1.0})
            return {"status": "nonfinite", "message": nonfinite}
        metrics: dict[str, Any] = {k: _mean_over_ranks(float(v) / max(steps, 1), distributed,
                                                    device)
                                   for k, v in sorted(sums.items())}
        metrics.update(
            epoch_cases=_sum_over_ranks(cases, distributed, device),
            data_wait_fraction=_mean_over_ranks(wait / max(train_seconds, 1e-9),
                                                distributed, device),
            cases_per_second=_mean_over_ranks(cases / max(train_seconds, 1e-9),
                                              distributed, device))
        if randomizer:  # the CPU cost of rendering, per randomised sample (read included)
            metrics["augment_ms_per_sample"] = _mean_over_ranks(
                randomizer.take_ms_per_sample(), distributed, device)
        metrics.update(_validate(unwrap(generator), stream, my_val_ids, cfg, distributed,
                                 device))
        metrics.update(epoch=epoch + 1, lr_g=trainer.opt_g.param_groups[0]["lr"],
                       epoch_seconds=time.perf_counter() - tick, nonfinite=0.0)
        if checkpoint is not None and epoch == start_epoch:  # the console says so
            metrics["resumed_from_epoch"] = float(start_epoch)
            if resume_warnings:
                metrics["checkpoint_warnings"] = "; ".join(resume_warnings)
        for k, v in metrics.items():
            if isinstance(v, float):
                history[k].append(v)

        last = epoch + 1 == cfg.train.epochs
        figure_due = last or (epoch + 1) % max(cfg.train.figure_every, 1) == 0
        name = checkpoint_name(epoch + 1, len(history.get("checkpoint_fallback_at", [])))
        persisted, failure = None, ""
        with tempfile.TemporaryDirectory(prefix="cvaa-ckpt-") as tmp:
            if rank == 0:
                state = {"trainer": trainer.state_dict(), "epoch": epoch,
                         "config": cfg.to_dict(), "history": dict(history),
                         "metrics": {k: v for k, v in metrics.items()
                                     if isinstance(v, (int, float))}}
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                # The epoch's log is held until its checkpoint exists: a rank 0 that dies
                # before has sent nothing of an epoch its successor trains again (one value
                # per step in MLflow). Unsent entries travel with the checkpoint.
                tracker.hold()
                tracker.log_epoch(metrics, epoch + 1)
                if figure_due:
                    tracker.log_figure(unwrap(generator), dataset,
                                       (my_val_ids or train_ids)[0], epoch + 1)
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
                if last and not failure:
                    mlflow_pending = tracker.finish(cfg.train.mlflow_wait_s)
                    if mlflow_pending:
                        metrics["mlflow_pending"] = float(mlflow_pending)
                elif not failure:  # a reachable server has the epoch before it is reported
                    tracker.settle(MLFLOW_EPOCH_SETTLE_S)
                metrics["mlflow_queued"] = float(tracker.queued())
            if not _all_ok(not failure, distributed, device):
                if rank == 0:
                    return {"status": "storage", "message": failure}
                return {"status": "storage", "message": "rank 0 could not write the "
                        "checkpoint"}
            ray.train.report(metrics, checkpoint=persisted, checkpoint_dir_name=name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    if start_epoch >= cfg.train.epochs:
        # Training was complete: a resubmitted job sends what MLflow did not receive then
        # (requeued from the last checkpoint) before the driver evaluates and registers.
        mlflow_pending = tracker.finish(cfg.train.mlflow_wait_s)
    return {"status": "completed", "epochs": cfg.train.epochs,
            "mlflow_pending": mlflow_pending}


def _mean_over_ranks(value: float, distributed: bool, device) -> float:
    if not distributed:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _all_ok(ok: bool, distributed: bool, device) -> bool:
    """Whether every rank's ``ok`` is true (an all-reduce; the value itself alone)."""
    if not distributed:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() == 0.0)


def _sum_over_ranks(value: float, distributed: bool, device) -> float:
    if not distributed:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def _validate(generator, stream: CaseStream, case_ids: list[str], cfg: Config,
              distributed: bool, device) -> dict[str, float]:
    """Mean validation metrics over all ranks' shards, keyed ``val/<metric>``."""
    batch = per_worker_batch(cfg)
    items = ((x, c) for b in stream.iterate(chunks(case_ids, batch))
             for x, c in zip(b.xrays, b.ct))
    results = evaluate_cases(generator, items, batch_size=batch)
    keys = list(VAL_METRICS)
    sums = torch.tensor([sum(r[k] for r in results) for k in keys] + [len(results)],
                        dtype=torch.float64, device=device)
    if distributed:
        import torch.distributed as dist
        dist.all_reduce(sums)
    count = float(sums[-1])
    if count == 0:
        return {}
    return {f"val/{k}": float(sums[i]) / count for i, k in enumerate(keys)}


def training_mean_intensity(dataset: PreparedDataset, case_ids: list[str],
                            limit: int = 16) -> float:
    """Mean normalised CT intensity over the first ``limit`` (sorted) training cases."""
    chosen = sorted(case_ids)[:limit]
    if not chosen:
        raise ValueError(f"{dataset.root}: no training cases to take the mean intensity of")
    return sum(float(dataset.arrays(c)[1].mean()) for c in chosen) / len(chosen)


class _RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run (a no-op elsewhere / without one),
    through a :class:`cvaa.tracking.SpooledRun`: a tracking server that is down never
    stops or stalls training; what it has not received travels with every checkpoint."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int):
        self.active = bool(mlflow_cfg) and rank == 0
        if self.active:
            from cvaa.tracking.spool import SpooledRun
            self.run = SpooledRun(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"],
                                  on_state=lambda line: print(line, flush=True))

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
