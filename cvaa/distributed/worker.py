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
from cvaa.data.dataset import CaseDataset, PreparedDataset, validation_split
from cvaa.scoring import evaluate_cases, predict
from cvaa.models import build_discriminator, build_generator, set_output_prior
from cvaa.gan import GANTrainer, NonFiniteLossError, per_worker_batch, unwrap

CHECKPOINT_FILE = "checkpoint.pt"
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
    dataset = PreparedDataset(config["data"])
    train_ids, val_ids = validation_split(dataset, cfg.train.val_fraction, cfg.train.seed)
    train_set = CaseDataset(dataset, train_ids)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=per_worker_batch(cfg), shuffle=True,
        generator=torch.Generator().manual_seed(cfg.train.seed))
    loader = ray.train.torch.prepare_data_loader(loader)  # DistributedSampler + device
    val_set = CaseDataset(dataset, val_ids[rank::world])  # each rank validates a shard

    # ------------------------------------------------------------------ models
    generator = build_generator(cfg.model.generator, cfg)
    if cfg.model.output_prior:  # same cases on every rank; a resumed run loads over it
        set_output_prior(generator, training_mean_intensity(train_set))
    discriminator = build_discriminator(cfg) if generator.uses_discriminator else None
    generator = ray.train.torch.prepare_model(generator)
    if discriminator is not None:
        discriminator = ray.train.torch.prepare_model(discriminator)
    trainer = GANTrainer(generator, discriminator, cfg, device)
    if distributed:
        def all_finite(ok: bool) -> bool:
            flag = torch.tensor([0.0 if ok else 1.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() == 0.0)
        trainer.all_finite = all_finite

    start_epoch, history = 0, defaultdict(list)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=device,
                               weights_only=True)
        trainer.load_state_dict(state["trainer"])
        start_epoch = int(state["epoch"]) + 1
        history = defaultdict(list, state.get("history", {}))
        history["resumed_at_epoch"].append(float(start_epoch + 1))
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {state['epoch'] + 1}")

    tracker = _RankZeroTracker(config.get("mlflow"), rank)
    for epoch in range(start_epoch, cfg.train.epochs):
        for callback in callbacks:
            callback.on_epoch_start(epoch, trainer)
        if distributed and hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        trainer.set_epoch(epoch)
        tick = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        steps, nonfinite = 0, ""
        for xrays, ct, _ in loader:
            try:
                out = trainer.step(xrays, ct)
            except NonFiniteLossError as exc:
                nonfinite = f"epoch {epoch + 1}, step {steps + 1}: {exc}"
                break
            for k, v in out.items():
                sums[k] += v
            steps += 1
        if nonfinite:
            # Stop every rank cleanly (no retries: a NaN would recur); the last good
            # checkpoint stays the run's checkpoint, the driver raises with this message.
            ray.train.report({"epoch": epoch + 1, "nonfinite": 1.0})
            return {"status": "nonfinite", "message": nonfinite}
        metrics: dict[str, Any] = {k: _mean_over_ranks(v / max(steps, 1), distributed, device)
                                   for k, v in sorted(sums.items())}
        metrics.update(_validate(unwrap(generator), val_set, cfg, distributed, device))
        metrics.update(epoch=epoch + 1, lr_g=trainer.opt_g.param_groups[0]["lr"],
                       epoch_seconds=time.perf_counter() - tick, nonfinite=0.0)
        for k, v in metrics.items():
            if isinstance(v, float):
                history[k].append(v)

        last = epoch + 1 == cfg.train.epochs
        figure_due = last or (epoch + 1) % max(cfg.train.figure_every, 1) == 0
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="cvaa-ckpt-") as tmp:
                state = {"trainer": trainer.state_dict(), "epoch": epoch,
                         "config": cfg.to_dict(), "history": dict(history),
                         "metrics": {k: v for k, v in metrics.items()
                                     if isinstance(v, (int, float))}}
                torch.save(state, Path(tmp) / CHECKPOINT_FILE)
                tracker.log_epoch(metrics, epoch + 1)
                if figure_due:
                    tracker.log_figure(unwrap(generator), val_set or train_set, epoch + 1)
                    tracker.log_checkpoint(Path(tmp) / CHECKPOINT_FILE, epoch + 1)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(metrics)
    return {"status": "completed", "epochs": cfg.train.epochs}


def _mean_over_ranks(value: float, distributed: bool, device) -> float:
    if not distributed:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _validate(generator, val_set: CaseDataset, cfg: Config, distributed: bool,
              device) -> dict[str, float]:
    """Mean validation metrics over all ranks' shards, keyed ``val/<metric>``."""
    results = evaluate_cases(generator, (val_set[i] for i in range(len(val_set))),
                             batch_size=per_worker_batch(cfg))
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


def training_mean_intensity(cases: CaseDataset, limit: int = 16) -> float:
    """Mean normalised CT intensity over the first ``limit`` cases (read into the set's
    cache, so the first epoch does not read them again)."""
    means = [float(cases[i][1].mean()) for i in range(min(limit, len(cases)))]
    if not means:
        raise ValueError(f"{cases.dataset.root}: no training cases to take the mean "
                         "intensity of")
    return sum(means) / len(means)


class _RankZeroTracker:
    """MLflow logging from rank 0 into the driver's run (a no-op elsewhere / without one)."""

    def __init__(self, mlflow_cfg: dict[str, str] | None, rank: int):
        self.active = bool(mlflow_cfg) and rank == 0
        if self.active:
            from cvaa import tracking
            self.run = tracking.RunLogger(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"])

    def log_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        if self.active:
            self.run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)},
                                 epoch)

    def log_figure(self, generator, cases: CaseDataset, epoch: int) -> None:
        if not self.active or len(cases) == 0:
            return
        from cvaa.figures import slice_grid

        xrays, ct, _ = cases[0]
        pred = predict(generator, xrays[None])[0]
        png = slice_grid({"prediction": [pred.numpy()], "ground truth": [ct.numpy()]},
                         row_labels=[cases.case_ids[0]], title=f"epoch {epoch}")
        self.run.log_bytes(png, f"figures/slices_epoch_{epoch:04d}.png")

    def log_checkpoint(self, path: Path, epoch: int) -> None:
        if self.active:
            self.run.log_file(path, f"checkpoints/epoch_{epoch:04d}")
