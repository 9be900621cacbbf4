"""Streaming ingest (cvaa.data.stream): the epoch plan, read-ahead, bounded memory."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from cvaa.config import load_config
from cvaa.data.stream import CaseStream, Step, chunks, epoch_order, epoch_plan
from cvaa.gan import GANTrainer
from cvaa.models import build_discriminator, build_generator

IDS = [f"case-{i:03d}" for i in range(23)]


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 1), (2, 2), (3, 2), (4, 3), (8, 1)])
def test_every_case_once_per_epoch_over_the_ranks_with_equal_step_counts(world, batch):
    for epoch in range(3):
        plans = [epoch_plan(IDS, seed=7, epoch=epoch, rank=r, world=world, batch=batch)
                 for r in range(world)]
        assert len({len(p) for p in plans}) == 1             # DDP: same number of steps
        real = [c for p in plans for s in p if s.weight > 0 for c in s.case_ids]
        assert sorted(real) == sorted(IDS)                   # each exactly once
        assert all(len(s.case_ids) <= batch for p in plans for s in p)
        padding = [s for p in plans for s in p if s.weight == 0]
        assert all(len(s.case_ids) == 1 and s.case_ids[0] in IDS for s in padding)
        assert all(sum(s.weight == 0 for s in p) <= 1 for p in plans)
        # a global step k: the ranks' k-th batches, at most the global batch
        for k in range(len(plans[0])):
            assert sum(len(p[k].case_ids) for p in plans if p[k].weight > 0) <= world * batch


def test_each_epoch_reshuffles_reproducibly():
    orders = [epoch_order(IDS, seed=0, epoch=e) for e in range(4)]
    assert all(sorted(o) == sorted(IDS) for o in orders)
    assert len({tuple(o) for o in orders}) == 4                # a new order every epoch
    assert epoch_order(IDS, seed=0, epoch=2) == orders[2]      # a restart replays it
    assert epoch_order(IDS[::-1], seed=0, epoch=2) == orders[2]
    assert epoch_order(IDS, seed=1, epoch=2) != orders[2]


def test_plan_errors():
    with pytest.raises(ValueError, match="no training cases"):
        epoch_plan([], seed=0, epoch=0, rank=0, world=1, batch=1)
    with pytest.raises(ValueError, match="bad plan"):
        epoch_plan(IDS, seed=0, epoch=0, rank=2, world=2, batch=1)
    # fewer cases than ranks: the rank without a case takes part with a weight-0 step
    plan = epoch_plan(["a"], seed=0, epoch=0, rank=1, world=2, batch=1)
    assert plan == [Step(("a",), 0.0)]


def _arrays(case_id: str):
    i = int(case_id.split("-")[1])
    return np.full((2, 4, 4), i, np.float32), np.full((1, 4, 4, 4), i, np.float32)


def test_stream_yields_the_plan_in_order_as_tensors():
    plan = epoch_plan(IDS, seed=3, epoch=1, rank=0, world=2, batch=3)
    got = list(CaseStream(_arrays, prefetch=2, threads=3).iterate(plan))
    assert [b.case_ids for b in got] == [s.case_ids for s in plan]
    for b in got:
        assert b.xrays.shape == (len(b.case_ids), 2, 4, 4) and b.xrays.dtype == torch.float32
        assert b.ct.shape == (len(b.case_ids), 1, 4, 4, 4)
        assert [int(v) for v in b.ct[:, 0, 0, 0, 0]] == [int(c[-3:]) for c in b.case_ids]


def test_stream_reads_ahead_but_holds_a_bounded_number_of_cases():
    lock, state = threading.Lock(), {"loaded": 0, "consumed": 0, "most_ahead": 0}

    def load(case_id):
        out = _arrays(case_id)
        with lock:
            state["loaded"] += 1
            state["most_ahead"] = max(state["most_ahead"], state["loaded"] - state["consumed"])
        return out

    batch, prefetch = 2, 2
    stream = CaseStream(load, prefetch=prefetch, threads=4)
    plan = chunks(IDS, batch)
    for b in stream.iterate(plan):
        time.sleep(0.02)            # the "training step": the threads read ahead meanwhile
        with lock:
            assert state["loaded"] - state["consumed"] <= (prefetch + 1) * batch
            state["consumed"] += len(b.case_ids)
    assert state["most_ahead"] > batch                   # it did read ahead
    assert state["most_ahead"] <= (prefetch + 1) * batch  # and no further than allowed
    assert stream.stats.cases == len(IDS)


def test_an_unreadable_case_is_named():
    def load(case_id):
        if case_id == "case-005":
            raise OSError("truncated npz")
        return _arrays(case_id)

    with pytest.raises(RuntimeError, match="case-005.*truncated npz"):
        list(CaseStream(load).iterate(chunks(IDS, 2)))


def test_a_storage_outage_is_waited_out_and_a_longer_one_named():
    tries: dict[str, int] = {}
    said: list[str] = []

    def load(case_id):
        tries[case_id] = tries.get(case_id, 0) + 1
        if case_id == "case-003" and tries[case_id] <= 2:   # down for two tries (~3 s)
            raise ConnectionError("s3://bucket/case-003.npz: S3 endpoint unreachable")
        return _arrays(case_id)

    stream = CaseStream(load, threads=1, retry_s=60, on_retry=said.append)
    got = [c for b in stream.iterate(chunks(IDS, 2)) for c in b.case_ids]
    assert got == IDS and tries["case-003"] == 3
    assert stream.stats.retried_seconds >= 2.5
    assert [m.split(": ")[0] for m in said] == ["case case-003"] * 2
    assert "retrying for up to 60 s" in said[0] and "after waiting" in said[1]

    def down(case_id):
        raise ConnectionError("endpoint unreachable")

    with pytest.raises(RuntimeError, match="case-000.*storage unreachable for 1 s"):
        list(CaseStream(down, threads=1, retry_s=1).iterate(chunks(IDS, 2)))


def test_closing_the_iterator_early_stops_the_threads():
    started = []

    def load(case_id):
        started.append(case_id)
        time.sleep(0.01)
        return _arrays(case_id)

    it = CaseStream(load, prefetch=1, threads=1).iterate(chunks(IDS, 1))
    next(it)
    it.close()
    n = len(started)
    time.sleep(0.1)
    assert len(started) == n < len(IDS)


def test_a_padded_stream_yields_one_batch_shape_with_weight_zero_fillers():
    """pad_to: every batch has the full size (one compiled shape); the fillers are
    copies of the step's first case at weight 0 with no draw to render, and the step's
    own cases alone are its case ids. A rank's padding step is all weight 0."""
    ids = [f"c-{i:03d}" for i in range(5)]
    plan = epoch_plan(ids, seed=0, epoch=0, rank=1, world=2, batch=2)
    assert [len(s.case_ids) for s in plan] == [2, 1] and plan[-1].weight == 0.0

    def with_draws(case_id):
        return (*_arrays(case_id), f"draw-{case_id}")

    got = list(CaseStream(with_draws, prefetch=1, threads=2, pad_to=3).iterate(plan))
    assert [b.xrays.shape[0] for b in got] == [3, 3]
    assert [b.case_ids for b in got] == [s.case_ids for s in plan]
    assert got[0].sample_weight.tolist() == [1.0, 1.0, 0.0]
    assert got[1].sample_weight.tolist() == [0.0, 0.0, 0.0]     # the padding step
    first = int(got[0].case_ids[0][-3:])
    assert [int(v) for v in got[0].ct[:, 0, 0, 0, 0]][2] == first
    assert got[0].extras == (f"draw-{got[0].case_ids[0]}", f"draw-{got[0].case_ids[1]}", None)
    with pytest.raises(ValueError, match="pad_to"):
        CaseStream(_arrays, pad_to=-1)
    # without pad_to, the batches are as planned
    plain = list(CaseStream(_arrays, prefetch=1, threads=1).iterate(plan))
    assert [b.xrays.shape[0] for b in plain] == [2, 1]


def test_a_weight_zero_step_leaves_g_and_d_untouched():
    cfg = load_config("cpu")
    torch.manual_seed(0)
    g, d = build_generator("cvaa", cfg), build_discriminator(cfg)
    trainer = GANTrainer(g, d, cfg)
    before = [p.detach().clone() for p in [*g.parameters(), *d.parameters()]]
    x, y = torch.rand(1, 2, 32, 32), torch.rand(1, 1, 32, 32, 32)
    out = trainer.step(x, y, weight=0.0)
    assert out["loss_g"] > 0                              # the losses are reported unweighted
    after = list(g.parameters()) + list(d.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    trainer.step(x, y, weight=1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, g.parameters()))
