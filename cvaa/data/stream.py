"""Streaming ingest for training: each rank's cases of an epoch, read ahead in threads.

Nothing is cached: a worker holds at most ``prefetch + 1`` batches of cases at a time,
whatever the size of the archive (a paper-size case is 8.5 MB decoded; 10,000 cases
cached would be 85 GB per worker). Reading (local disk or S3) and decompression run in
background threads while the training step runs: both release the GIL (socket I/O, zlib).

The plan of an epoch (:func:`epoch_plan`) is a function of ``(case ids, seed, epoch,
rank, world, batch)`` only, so a worker group restarted after a failure replays the same
order, and every rank knows every other rank's share without talking to it:

- the training case ids are permuted by a generator seeded with ``(seed, epoch)``;
- rank ``r`` takes every ``world``-th case from position ``r``, so each case is seen
  exactly once per epoch across the ranks;
- the ranks' shares differ by at most one case, so one rank may be a step short: it pads
  with a *weight-0 step* (a real case, loss multiplied by zero). DDP needs every rank in
  every step's gradient all-reduce; a weight-0 step takes part without adding to the
  gradient sum, and is not counted in the epoch's losses.

With ``pad_to`` (training) every batch the stream yields has the full per-rank batch
size: a short step (an epoch's last, a padding step) is filled with copies of its first
case at sample weight 0 (:attr:`Batch.sample_weight`). A compiled step (``torch.compile``,
static shapes) then sees one shape all run long instead of compiling again for every
distinct batch size.

Plain numpy/torch (no Ray): :mod:`cvaa.distributed.worker` feeds it the prepared dataset.

Example:
    >>> plan = epoch_plan([f"c{i}" for i in range(5)], seed=0, epoch=0, rank=1, world=2,
    ...                   batch=2)
    >>> [(len(step.case_ids), step.weight) for step in plan]
    [(2, 1.0), (1, 0.0)]
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cvaa.backoff import call_with_backoff


@dataclass(frozen=True)
class Step:
    """One rank's cases of one training step; ``weight`` 0 marks a padding step."""

    case_ids: tuple[str, ...]
    weight: float = 1.0


def epoch_order(case_ids: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The epoch's seeded permutation of ``case_ids`` (sorted first: the order of the
    input does not matter)."""
    ids = sorted(case_ids)
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(ids))
    return [ids[i] for i in order]


def epoch_plan(case_ids: Sequence[str], *, seed: int, epoch: int, rank: int, world: int,
               batch: int) -> list[Step]:
    """This rank's steps of ``epoch``: as many on every rank, every case once over all.

    Raises:
        ValueError: no cases, or a bad rank / world / batch.
    """
    if not case_ids:
        raise ValueError("no training cases to plan an epoch over")
    if world < 1 or not 0 <= rank < world or batch < 1:
        raise ValueError(f"bad plan: rank={rank} world={world} batch={batch}")
    order = epoch_order(case_ids, seed, epoch)
    mine = order[rank::world]
    steps = -(-(-(-len(order) // world)) // batch)  # ceil(ceil(N / world) / batch)
    plan = [Step(tuple(mine[i:i + batch])) for i in range(0, len(mine), batch)]
    while len(plan) < steps:  # one short (or, with fewer cases than ranks, all of it)
        plan.append(Step((order[rank % len(order)],), weight=0.0))
    return plan


def chunks(case_ids: Sequence[str], batch: int) -> list[Step]:
    """Fixed-order steps (validation, evaluation): no shuffling, no padding."""
    return [Step(tuple(case_ids[i:i + batch])) for i in range(0, len(case_ids), batch)]


@dataclass
class Batch:
    """A step's tensors: ``xrays (B, 2, P, P)``, ``ct (B, 1, D, H, W)``, float32.

    ``extras`` holds, per sample, the third item of a ``load`` that returns three (e.g.
    :meth:`cvaa.data.augment.Randomizer.sample`'s draws, rendered on the device); empty
    for a two-item ``load``. ``sample_weight`` ``(B,)`` is the step's ``weight`` for each
    of its cases and 0 for the copies that pad it to the stream's ``pad_to`` (their
    extras are ``None``); ``case_ids`` are the step's own cases only.
    """

    xrays: torch.Tensor
    ct: torch.Tensor
    case_ids: tuple[str, ...]
    weight: float
    extras: tuple = ()
    sample_weight: torch.Tensor | None = None


@dataclass
class StreamStats:
    """What a :class:`CaseStream` delivered since it was made."""

    cases: int = 0
    wait_seconds: float = 0.0        # time the consumer spent blocked on the next batch
    retried_seconds: float = 0.0     # time reads spent waiting out storage outages


class CaseStream:
    """Reads the cases of a plan ahead of the consumer, in a small thread pool.

    Args:
        load: ``case_id -> (xrays (2, P, P), ct (1, D, H, W))`` numpy arrays (e.g.
            :meth:`cvaa.data.dataset.PreparedDataset.load`), optionally with a third item
            per case, passed through as :attr:`Batch.extras`; called from the threads.
        prefetch: batches read ahead of the one being consumed (memory: at most
            ``prefetch + 1`` batches of decoded cases and their stacked copies).
        threads: concurrent case reads.
        pin_memory: pin the stacked batches (for fast, asynchronous copies to a GPU).
        retry_s: how long a read that raises ``ConnectionError`` (a storage outage, e.g.
            :class:`cvaa.data.store.StorageUnavailableError`) is retried, with backoff,
            before it fails; other errors fail at once.
        on_retry: called with a one-line message when a read starts waiting out an
            outage, and when it recovers (``None``: silent).
        pad_to: fill every shorter batch to this many samples with weight-0 copies of
            its first case (0: batches as planned).

    Iterating :meth:`iterate` yields :class:`Batch` es in the plan's order. A case that
    cannot be read raises its error (with the case id) at its turn in the order.
    """

    def __init__(self, load: Callable[[str], tuple[np.ndarray, np.ndarray]], *,
                 prefetch: int = 4, threads: int = 2, pin_memory: bool = False,
                 retry_s: float = 0.0, on_retry: Callable[[str], None] | None = None,
                 pad_to: int = 0):
        if prefetch < 1 or threads < 1:
            raise ValueError(f"prefetch ({prefetch}) and threads ({threads}) must be >= 1")
        if pad_to < 0:
            raise ValueError(f"pad_to must be >= 0, got {pad_to}")
        self.load, self.prefetch, self.threads, self.pad_to = load, prefetch, threads, pad_to
        self.pin_memory, self.retry_s, self.on_retry = pin_memory, retry_s, on_retry
        self.stats = StreamStats()

    def _read(self, case_id: str) -> tuple:
        def waiting(exc: BaseException, attempt: int, wait: float) -> None:
            if attempt == 1:
                self._say(f"case {case_id}: storage unreachable ({exc}); retrying for "
                          f"up to {self.retry_s:.0f} s")

        def recovered(attempt: int, waited: float) -> None:
            self.stats.retried_seconds += waited
            self._say(f"case {case_id}: read after waiting {waited:.0f} s for the storage")

        start = time.monotonic()
        try:   # an outage (ConnectionError) is waited out, bounded; anything else fails
            return call_with_backoff(lambda: self.load(case_id), deadline_s=self.retry_s,
                                     retry_if=lambda exc: isinstance(exc, ConnectionError),
                                     on_retry=waiting, on_recovered=recovered)
        except ConnectionError as exc:
            raise RuntimeError(f"case {case_id}: cannot be read for training: storage "
                               f"unreachable for {time.monotonic() - start:.0f} s ({exc})"
                               ) from exc
        except Exception as exc:
            raise RuntimeError(f"case {case_id}: cannot be read for training: "
                               f"{type(exc).__name__}: {exc}") from exc

    def _say(self, message: str) -> None:
        if self.on_retry is not None:
            self.on_retry(message)

    def _assemble(self, step: Step, jobs: list[futures.Future]) -> Batch:
        """Wait for a step's cases and stack them (in the assembler thread, so the
        consumer only ever waits for data that is genuinely late)."""
        done = [job.result() for job in jobs]
        if len(done) > self.pad_to > 0:
            raise ValueError(f"a step of {len(done)} cases is larger than pad_to="
                             f"{self.pad_to}")
        weights = [step.weight] * len(done)
        pad = max(0, self.pad_to - len(done))
        if pad:   # copies of the first case, not rendered again (extras None), weight 0
            done = done + [tuple(done[0][:2]) + (None,) * (len(done[0]) - 2)] * pad
            weights += [0.0] * pad
        xrays = torch.from_numpy(np.stack([d[0] for d in done]))
        ct = torch.from_numpy(np.stack([d[1] for d in done]))
        sample_weight = torch.tensor(weights, dtype=torch.float32)
        if self.pin_memory:
            xrays, ct = xrays.pin_memory(), ct.pin_memory()
            sample_weight = sample_weight.pin_memory()
        extras = tuple(d[2] for d in done) if len(done[0]) > 2 else ()
        return Batch(xrays, ct, step.case_ids, step.weight, extras, sample_weight)

    def iterate(self, plan: Sequence[Step]) -> Iterator[Batch]:
        readers = futures.ThreadPoolExecutor(self.threads, thread_name_prefix="cvaa-ingest")
        assembler = futures.ThreadPoolExecutor(1, thread_name_prefix="cvaa-ingest-batch")
        pending: collections.deque = collections.deque()
        queued = 0
        try:
            while queued < len(plan) or pending:
                while queued < len(plan) and len(pending) <= self.prefetch:
                    step = plan[queued]
                    jobs = [readers.submit(self._read, c) for c in step.case_ids]
                    pending.append(assembler.submit(self._assemble, step, jobs))
                    queued += 1
                tick = time.perf_counter()
                batch = pending.popleft().result()
                self.stats.wait_seconds += time.perf_counter() - tick
                self.stats.cases += len(batch.case_ids)
                yield batch
                del batch
        finally:
            for job in pending:
                job.cancel()
            readers.shutdown(wait=True, cancel_futures=True)
            assembler.shutdown(wait=True, cancel_futures=True)
