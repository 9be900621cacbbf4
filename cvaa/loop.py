"""The epoch loop of GAN training: plain torch, the same on one device and on a DDP rank.

:func:`setup` builds what a run trains with (streams, models, :class:`cvaa.gan.GANTrainer`)
and :func:`train_epochs` runs the epochs: the steps over the stream, the losses summed on
the device and read once an epoch, the NaN guard, validation, the metrics and the
checkpoint *state*. Where that state goes, who is told about the epoch and whether to go on
is the caller's ``on_epoch_end``:

- :func:`cvaa.distributed.worker.train_loop_per_worker` (Ray Train, DDP): rank 0 writes
  the checkpoint to the run's storage, logs to MLflow, every rank calls
  ``ray.train.report``;
- :func:`cvaa.local.train_local` (one device, no Ray, no MLflow): a checkpoint directory
  per epoch under a local folder.

Example (one device, what :func:`cvaa.local.train_local` does)::

    run = setup(cfg, "runs/prepared", torch.device("cuda"))
    outcome = train_epochs(run, on_epoch_end=lambda end: save(end.state()))
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cvaa.config import Config
from cvaa.data.augment import Randomizer, renders_on_device
from cvaa.data.dataset import PreparedDataset, training_split
from cvaa.data.stream import CaseStream, chunks, epoch_plan
from cvaa.gan import (GANTrainer, NonFiniteLossError, branch_device, compiled_graphs,
                      per_worker_batch, unwrap)
from cvaa.models import build_discriminator, build_generator, set_output_prior
from cvaa.models.layout import resolve_memory_format, to_memory_format
from cvaa.scoring import evaluate_cases

# The training state inside each checkpoint directory (a ``weights_only`` torch file).
CHECKPOINT_FILE = "checkpoint.pt"
# Reported every epoch as ``val/<name>`` (means over the validation patients).
VAL_METRICS = ("mae", "mse", "cosine", "psnr", "ssim", "psnr_x2ct", "ssim_x2ct")


@dataclass
class Run:
    """What one process (one DDP rank, or the only one) trains with; see :func:`setup`."""

    cfg: Config
    device: torch.device
    dataset: PreparedDataset
    trainer: GANTrainer
    train_stream: CaseStream          # training batches (re-rendered X-rays if augmenting)
    val_stream: CaseStream            # fixed DRRs: validation
    train_ids: list[str]
    val_ids: list[str]                # this rank's shard of the validation cases
    randomizer: Randomizer | None = None
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1 and torch.distributed.is_available() \
            and torch.distributed.is_initialized()

    @property
    def generator(self) -> nn.Module:
        return unwrap(self.trainer.generator)


@dataclass
class EpochEnd:
    """A finished epoch, as ``on_epoch_end`` receives it.

    ``metrics`` (rank-averaged) is what gets reported: the callback may add entries
    (``storage_note``, ``mlflow_queued``) before it reports them. ``history`` has the
    epoch's float metrics appended already.
    """

    epoch: int                        # 0-based
    metrics: dict[str, Any]
    history: dict[str, list[float]]
    last: bool
    run: Run

    def state(self) -> dict[str, Any]:
        """The content of ``checkpoint.pt`` (tensors and builtins: ``weights_only``)."""
        return {"trainer": self.run.trainer.state_dict(), "epoch": self.epoch,
                "config": self.run.cfg.to_dict(), "history": dict(self.history),
                "metrics": {k: v for k, v in self.metrics.items()
                            if isinstance(v, (int, float))}}


def setup(cfg: Config, data: str, device: torch.device, *, rank: int = 0, world: int = 1,
          wrap: Callable[[nn.Module], nn.Module] | None = None,
          on_retry: Callable[[str], None] | None = None) -> Run:
    """Streams over ``data`` (a prepared dataset), G and D (wrapped by ``wrap``: Ray's
    ``prepare_model`` for DDP; default: moved to ``device``) and their trainer.

    Args:
        cfg: the resolved config (``train.seed`` seeds the weights: identical on every
            rank, and the validation split).
        data: prepared dataset URI (local or ``s3://``).
        device: where the batches go.
        rank, world: this process's DDP rank and the world size (each rank reads its
            share of every epoch and validates a shard).
        on_retry: told (one line) when a case read waits out a storage outage.
    """
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    wrap = wrap or (lambda module: module.to(device))
    # Streamed, never cached: each epoch this rank reads its share of a seeded permutation
    # (every case once over the ranks), prefetched in threads (cvaa.data.stream).
    dataset = PreparedDataset(data)
    train_ids, val_ids, _ = training_split(dataset, cfg.train)  # calibration cases: never
    if not train_ids:
        raise ValueError(f"{dataset.root}: no training cases after the validation split")
    stream_options = dict(prefetch=cfg.train.prefetch_batches, threads=cfg.train.io_threads,
                          pin_memory=device.type == "cuda", retry_s=cfg.train.storage_retry_s,
                          on_retry=on_retry)
    stream = CaseStream(dataset.arrays, **stream_options)     # validation: fixed DRRs
    branches = branch_device(cfg, device)   # CUDA's code paths on a GPU or when cuda_shaped
    randomizer = None
    if cfg.augment.enabled:  # training X-rays rendered again per sample: on a CUDA device
        # in the step (Randomizer.render_batch), else in the ingest threads
        dataset.context(train_ids[0])  # fails now, naming the dataset, if it has none
        randomizer = Randomizer(dataset.arrays, dataset.context, cfg, device=device,
                                render_in_step=renders_on_device(branches))
    # Training batches all have the full per-rank size (short ones padded with weight-0
    # samples): a compiled step sees one shape and never compiles again.
    train_stream = CaseStream(randomizer.loader() if randomizer else dataset.arrays,
                              pad_to=per_worker_batch(cfg), **stream_options)

    generator = build_generator(cfg.model.generator, cfg)
    if cfg.model.output_prior:  # same cases on every rank; a resumed run loads over it
        set_output_prior(generator, training_mean_intensity(dataset, train_ids))
    discriminator = build_discriminator(cfg) if generator.uses_discriminator else None
    # the layout the trainer steps in, set before DDP holds the parameters (cvaa.gan)
    memory_format = resolve_memory_format(cfg.train.memory_format, branches)
    for module in (generator, discriminator):
        if module is not None:
            to_memory_format(module, memory_format)
    generator = wrap(generator)
    if discriminator is not None:
        discriminator = wrap(discriminator)
    trainer = GANTrainer(generator, discriminator, cfg, device)
    run = Run(cfg, device, dataset, trainer, train_stream, stream, train_ids,
              val_ids[rank::world], randomizer, rank, world)
    if run.distributed:  # every rank skips (or stops on) a NaN together
        trainer.all_finite = lambda ok: all_ok(ok, True, device)
    return run


def train_epochs(run: Run, *, on_epoch_end: Callable[[EpochEnd], dict[str, Any] | None],
                 callbacks: Sequence[Any] = (), state: dict[str, Any] | None = None,
                 resume_warnings: Sequence[str] = (),
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train from ``state`` (a checkpoint's content; ``None``: from scratch) to
    ``cfg.train.epochs``.

    Args:
        run: from :func:`setup`.
        on_epoch_end: after each epoch's metrics (every rank): persists and reports;
            returns ``None`` to go on, or the outcome dict to stop with.
        callbacks: objects with ``on_epoch_start(epoch, trainer)`` (0-based), called
            before each epoch on every rank: schedules, freezing, the tests' NaN poison.
        state: the checkpoint to resume from (:meth:`EpochEnd.state`).
        resume_warnings: the checkpoints skipped to find ``state`` (said on the console,
            in the first epoch's metrics and, as ``checkpoint_fallback_at``, in history).
        log: the console (rank 0's ``print``); ``None``: silent.

    Returns:
        ``{"status": "completed", "start_epoch": ...}``, ``{"status": "nonfinite",
        "message": ..., "epoch": ...}`` (no checkpoint of that epoch was offered), or what
        ``on_epoch_end`` returned to stop.
    """
    cfg, trainer, device = run.cfg, run.trainer, run.device
    say = log or (lambda line: None)
    start_epoch, history = 0, defaultdict(list)
    if state is not None:
        for warning in resume_warnings:
            say(f"warning: {warning}")
        trainer.load_state_dict(state["trainer"])
        start_epoch = int(state["epoch"]) + 1
        history = defaultdict(list, state.get("history", {}))
        history["resumed_at_epoch"].append(float(start_epoch + 1))
        if resume_warnings:  # later checkpoints get new names (checkpoint_name)
            history["checkpoint_fallback_at"].append(float(start_epoch + 1))
        say(f"resumed from the checkpoint of epoch {state['epoch'] + 1}")

    for epoch in range(start_epoch, cfg.train.epochs):
        for callback in callbacks:
            callback.on_epoch_start(epoch, trainer)
        trainer.set_epoch(epoch)
        tick = time.perf_counter()
        graphs = compiled_graphs()
        sums, steps, cases, wait, compile_s, nonfinite = _train_one_epoch(run, epoch)
        train_seconds = time.perf_counter() - tick
        if nonfinite:
            # Stop (every rank: the finiteness checks agree across ranks); no retries, a
            # NaN would recur. The last good checkpoint stays the run's checkpoint.
            return {"status": "nonfinite", "message": nonfinite, "epoch": epoch + 1}
        dist = run.distributed
        metrics: dict[str, Any] = {k: mean_over_ranks(float(v) / max(steps, 1), dist, device)
                                   for k, v in sorted(sums.items())}
        metrics.update(
            epoch_cases=sum_over_ranks(cases, dist, device),
            data_wait_fraction=mean_over_ranks(wait / max(train_seconds, 1e-9), dist, device),
            cases_per_second=mean_over_ranks(cases / max(train_seconds, 1e-9), dist, device))
        if run.randomizer:  # the CPU cost of rendering, per randomised sample (read included)
            metrics["augment_ms_per_sample"] = mean_over_ranks(
                run.randomizer.take_ms_per_sample(), dist, device)
        metrics.update(validate(run))
        # Graphs torch.compile built this epoch (training and validation), over the ranks:
        # the first epoch of a process compiles; any later count is a recompilation.
        metrics["compiled_graphs"] = sum_over_ranks(compiled_graphs() - graphs, dist, device)
        # Wall time of the steps that compiled: what a time budget must not take for the
        # cost of every epoch (cvaa.local.train_local plans on epoch_seconds minus this).
        metrics["compile_seconds"] = max_over_ranks(compile_s, dist, device)
        metrics.update(epoch=epoch + 1, lr_g=trainer.opt_g.param_groups[0]["lr"],
                       epoch_seconds=time.perf_counter() - tick, nonfinite=0.0)
        if state is not None and epoch == start_epoch:  # the console says so
            metrics["resumed_from_epoch"] = float(start_epoch)
            if resume_warnings:
                metrics["checkpoint_warnings"] = "; ".join(resume_warnings)
        for k, v in metrics.items():
            if isinstance(v, float):
                history[k].append(v)
        stop = on_epoch_end(EpochEnd(epoch, metrics, history,
                                     epoch + 1 == cfg.train.epochs, run))
        if stop is not None:
            return stop
    return {"status": "completed", "start_epoch": start_epoch}


def _train_one_epoch(run: Run, epoch: int
                     ) -> tuple[dict[str, torch.Tensor], int, int, float, float, str]:
    """One pass over this rank's share of the epoch: ``(loss sums on the device, steps,
    cases, seconds waiting for data, seconds of the steps that compiled, "" or where a loss
    went non-finite)``."""
    cfg, trainer, device = run.cfg, run.trainer, run.device
    sums: dict[str, torch.Tensor] = {}
    steps, cases, wait, compile_s, nonfinite = 0, 0, 0.0, 0.0, ""
    plan = epoch_plan(run.train_ids, seed=cfg.train.seed, epoch=epoch, rank=run.rank,
                      world=run.world, batch=per_worker_batch(cfg))
    if run.randomizer:
        run.randomizer.epoch = epoch
    batches = run.train_stream.iterate(plan)
    while True:
        waited = time.perf_counter()
        item = next(batches, None)
        wait += time.perf_counter() - waited
        if item is None:
            break
        # ---------------------------------------------------------------- the step
        xrays = item.xrays.to(device, non_blocking=True)
        if item.extras:  # draws from Randomizer.sample: rendered here, on the device
            xrays = run.randomizer.render_batch(xrays, item.extras)
        ct = item.ct.to(device, non_blocking=True)
        weight = (item.weight if item.sample_weight is None
                  else item.sample_weight.to(device, non_blocking=True))
        graphs, started = compiled_graphs(), time.perf_counter()
        try:
            out = trainer.step(xrays, ct, weight=weight)
        except NonFiniteLossError as exc:
            nonfinite = f"epoch {epoch + 1}, step {steps + 1}: {exc}"
            batches.close()
            break
        if compiled_graphs() != graphs:  # a host-side count: no wait for the device
            compile_s += time.perf_counter() - started
        # ---------------------------------------------------------------- end of step
        if item.weight > 0:  # a padding step (weight 0) is not one of the epoch's
            for k, v in out.items():  # summed on the device, read once an epoch
                sums[k] = sums[k] + v if k in sums else v
            steps += 1
            cases += len(item.case_ids)
    if not nonfinite:
        try:  # the steps since the last check, before anything is checkpointed
            trainer.check_finite()
        except NonFiniteLossError as exc:
            nonfinite = f"epoch {epoch + 1}, by step {steps}: {exc}"
    return sums, steps, cases, wait, compile_s, nonfinite


def validate(run: Run) -> dict[str, float]:
    """Mean validation metrics over all ranks' shards, keyed ``val/<metric>``.

    Runs the eager generator (the module the compiled step wraps, not the compiled
    callable): a validation pass is a few batches an epoch, each of a size the shard
    decides, and compiling it would cost a compilation per distinct size for no gain.
    """
    batch = per_worker_batch(run.cfg)
    items = ((x, c) for b in run.val_stream.iterate(chunks(run.val_ids, batch))
             for x, c in zip(b.xrays, b.ct))
    results = evaluate_cases(run.generator, items, batch_size=batch)
    keys = list(VAL_METRICS)
    sums = torch.tensor([sum(r[k] for r in results) for k in keys] + [len(results)],
                        dtype=torch.float64, device=run.device)
    if run.distributed:
        torch.distributed.all_reduce(sums)
    count = float(sums[-1])
    if count == 0:
        return {}
    return {f"val/{k}": float(sums[i]) / count for i, k in enumerate(keys)}


def reduce_over_ranks(value: float, distributed: bool, device, op: str) -> float:
    """``value`` reduced over the ranks by ``op`` (a ``ReduceOp`` name); itself on one."""
    if not distributed:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return float(t.item())


def mean_over_ranks(value: float, distributed: bool, device) -> float:
    world = torch.distributed.get_world_size() if distributed else 1
    return sum_over_ranks(value, distributed, device) / world


def sum_over_ranks(value: float, distributed: bool, device) -> float:
    return reduce_over_ranks(value, distributed, device, "SUM")


def max_over_ranks(value: float, distributed: bool, device) -> float:
    return reduce_over_ranks(value, distributed, device, "MAX")


def all_ok(ok: bool, distributed: bool, device) -> bool:
    """Whether every rank's ``ok`` is true (an all-reduce; the value itself alone)."""
    if not distributed:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() == 0.0)


def training_mean_intensity(dataset: PreparedDataset, case_ids: list[str],
                            limit: int = 16) -> float:
    """Mean normalised CT intensity over the first ``limit`` (sorted) training cases."""
    chosen = sorted(case_ids)[:limit]
    if not chosen:
        raise ValueError(f"{dataset.root}: no training cases to take the mean intensity of")
    return sum(float(dataset.arrays(c)[1].mean()) for c in chosen) / len(chosen)


# --------------------------------------------------------------------------- console

def format_duration(seconds: float) -> str:
    """``42s``, ``2m40s``, ``3h05m`` (``?`` when unknown), for ETAs on the console.

    Example:
        >>> format_duration(160), format_duration(11100), format_duration(float("inf"))
        ('2m40s', '3h05m', '?')
    """
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_epoch(m: dict[str, Any], epochs: int, eta_s: float | None) -> str:
    """One readable line per epoch, from rank 0's metrics.

    Example:
        >>> format_epoch({"epoch": 3, "loss_g": 0.0123, "val/psnr": 28.3,
        ...               "val/ssim": 0.7012, "epoch_seconds": 12.1}, 16, 160.0)
        'epoch  3/16  loss_g 0.0123  val PSNR 28.30 dB  SSIM 0.7012  12.1 s/epoch  ETA 2m40s'
    """
    width = len(str(epochs))
    parts = [f"epoch {int(m.get('epoch', 0)):>{width}}/{epochs}"]
    parts += [f"{k} {m[k]:.4f}" for k in ("loss_g", "loss_d") if k in m]
    if "val/psnr" in m:
        parts.append(f"val PSNR {m['val/psnr']:.2f} dB  SSIM {m.get('val/ssim', float('nan')):.4f}")
    if "epoch_seconds" in m:
        parts.append(f"{m['epoch_seconds']:.1f} s/epoch")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    if m.get("mlflow_queued"):
        parts.append(f"(MLflow unreachable: {int(m['mlflow_queued'])} entries queued)")
    return "  ".join(parts)
