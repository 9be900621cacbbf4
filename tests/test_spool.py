"""cvaa.tracking.spool: in-order delivery, dump into a checkpoint, requeue, replay."""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from cvaa import tracking
from cvaa.tracking.spool import PENDING, SpooledRun, replay

DOWN = "http://127.0.0.1:9"  # a tracking server that refuses every connection


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.open_run(uri, "spooled") as r:
        yield uri, r.run_id


def _steps(uri, run_id, key="loss"):
    return [(m.step, m.value) for m in sorted(
        mlflow.MlflowClient(uri).get_metric_history(run_id, key),
        key=lambda m: (m.timestamp, m.step))]


def test_entries_arrive_in_order_with_their_steps(run, tmp_path):
    uri, run_id = run
    spool = SpooledRun(uri, run_id)
    for step in range(1, 6):
        spool.log_metrics({"loss": 1.0 / step}, step)
        spool.log_bytes(f"figure {step}".encode(), f"figures/f{step}.png")
    (tmp_path / "ckpt.pt").write_bytes(b"weights")
    spool.log_file(tmp_path / "ckpt.pt", "checkpoints/epoch_0005")
    assert spool.flush(60) and spool.pending() == 0
    spool.close()
    assert _steps(uri, run_id) == [(s, 1.0 / s) for s in range(1, 6)]
    client = mlflow.MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run_id, "figures")} == {
        f"figures/f{s}.png" for s in range(1, 6)}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints/epoch_0005")] == [
        "checkpoints/epoch_0005/ckpt.pt"]


def test_a_store_that_fails_keeps_everything_queued_then_dump_and_replay(run, tmp_path):
    uri, run_id = run
    # A tracking URI whose store cannot be written: every send fails, nothing is lost
    spool = SpooledRun(DOWN, run_id, max_backoff_s=0.2)
    for step in (1, 2, 3):
        spool.log_metrics({"loss": float(step)}, step)
    spool.log_bytes(b"png", "figures/f3.png")
    deadline = time.monotonic() + 60
    while not spool.failures and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not spool.flush(0.5)
    assert spool.pending() == 4 and spool.failures >= 1 and spool.last_error
    kept = tmp_path / "ckpt" / "mlflow_pending"
    assert spool.dump(kept) == 4
    lines = (kept / PENDING).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["metrics"] * 3 + ["artifact"]
    assert json.loads((kept / "run.json").read_text())["run_id"] == run_id

    # replay into the real store: same steps, same order, the figure under its name
    spool.close()
    assert replay(kept, uri, log=lambda *_: None) == 4
    assert _steps(uri, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "figures")] == [
        "figures/f3.png"]


def test_a_restarted_logger_sends_its_predecessors_entries_first(run, tmp_path):
    uri, run_id = run
    dead = SpooledRun(DOWN, run_id, max_backoff_s=0.2)
    dead.log_metrics({"loss": 1.0}, 1)
    dead.log_bytes(b"a", "figures/f1.png")
    dead.dump(tmp_path / "pending")
    dead.close()
    spool = SpooledRun(uri, run_id)
    spool.log_metrics({"loss": 2.0}, 2)  # logged by the new rank 0 before it requeues
    assert spool.requeue(tmp_path / "pending") == 2
    assert spool.flush(60)
    spool.close()
    assert _steps(uri, run_id) == [(1, 1.0), (2, 2.0)]


def test_held_entries_wait_for_release_and_a_successor_resends_them_once(run, tmp_path):
    """Rank 0 holds an epoch's log until its checkpoint exists: one that dies before the
    release has sent nothing of that epoch; one that dies after has sent it, and the
    successor's requeue of the checkpoint's copy adds no second value for the step."""
    uri, run_id = run
    spool = SpooledRun(uri, run_id)
    spool.log_metrics({"loss": 1.0}, 1)                  # epoch 1, its checkpoint exists
    assert spool.flush(60)
    spool.hold()
    spool.log_metrics({"loss": 2.0}, 2)                  # epoch 2, checkpoint being written
    assert spool.dump(tmp_path / "epoch_2") == 1         # the held entry goes with it
    assert not spool.flush(1.5) and spool.pending() == 1
    assert _steps(uri, run_id) == [(1, 1.0)]             # nothing of epoch 2 sent yet
    spool.release()
    spool.log_metrics({"loss": 3.0}, 3)
    assert spool.flush(60)
    spool.close()
    assert _steps(uri, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]

    successor = SpooledRun(uri, run_id)                  # resumed from epoch 2's checkpoint
    assert successor.requeue(tmp_path / "epoch_2") == 1
    assert successor.flush(60)
    successor.close()
    assert _steps(uri, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_replay_job_sends_a_dumped_folder(run, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    uri, run_id = run
    dead = SpooledRun(DOWN, run_id, max_backoff_s=0.2)
    dead.log_metrics({"loss": 0.5}, 7)
    dead.dump(tmp_path / "pending")
    dead.close()
    spec = importlib.util.spec_from_file_location(
        "replay_log", Path(__file__).resolve().parents[1] / "jobs" / "replay_log.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([str(tmp_path / "empty")]) == 2              # nothing to replay: said
    assert "no pending.jsonl" in capsys.readouterr().err
    assert job.main([str(tmp_path / "pending"), "--mlflow-uri", uri]) == 0
    assert _steps(uri, run_id) == [(7, 0.5)]
