"""The archive-scale path on one machine: two Ray nodes, data and Ray storage on S3 (a
real SeaweedFS server), MLflow on a real ``mlflow server`` over HTTP with its artifacts on
S3, and the faults a multi-day run meets: a node lost mid-run (its processes killed), the
tracking server stopped mid-training and restarted on the same port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from cvaa import tracking
from cvaa.data import store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    from mlflowserver import MlflowServer

    s3_server.client().create_bucket(Bucket="mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"),
                          "s3://mlflow/artifacts").start()
    try:
        yield server
    finally:
        server.stop()


def _upload(local: str, uri: str) -> None:
    for path in store.list_files(local):
        store.write_bytes(store.join(uri, os.path.relpath(path, local)),
                          Path(path).read_bytes())


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_two_nodes_s3_and_an_mlflow_server_survive_a_lost_node(
        prepared_cpu, s3_server, mlflow_server, tmp_path):
    client = s3_server.client()
    client.create_bucket(Bucket="archive")
    _upload(prepared_cpu, "s3://archive/prepared")
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "multinode_run.py"),
             "--data", "s3://archive/prepared", "--storage", "s3://archive/ray",
             "--mlflow-uri", mlflow_server.uri, "--out", str(out), "--epochs", "6"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the driver and the nodes it started
            proc.wait()
            code = "timeout"
    tail = "\n".join(line for line in log.read_text(errors="replace").splitlines()
                     if "(raylet)" not in line and "(gcs_server)" not in line)[-4000:]
    assert code == 0, f"exit {code}; {log}:\n{tail}"
    result = json.loads(out.read_text())
    lines = result["lines"]

    print(f"node loss: killed at {result['node_lost_at']:.0f} s, noticed at "
          f"{result['loss_noticed_at']:.0f} s, new node at {result['node_added_at']:.0f} s, "
          f"resumed at epoch {result['resumed_at_epoch']}, whole run {result['wall_seconds']:.0f} s")
    # Two nodes trained; one was lost after epoch 2 and a fresh one joined.
    assert result["nodes_at_start"] == 2
    assert result["alive_after_loss"] == 1
    assert "node_added_at" in result
    # The run went on from the last checkpoint: the epoch count continued, not restarted.
    assert result["epochs"] == 6
    assert len(result["resumed_at_epoch"]) >= 1
    assert all(3 <= e <= 6 for e in result["resumed_at_epoch"])
    assert any(line.startswith("worker failure 1") for line in lines), lines
    assert any(line.startswith("resumed from the checkpoint of epoch") for line in lines)
    epochs = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("epoch ")]
    assert epochs[-1] == 6 and 1 in epochs and epochs == sorted(epochs)

    # Checkpoints live on S3, not on a node.
    assert result["checkpoint"].startswith("archive/ray/multinode/")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket="archive", Prefix="ray/multinode/") for o in page.get("Contents", [])]
    assert any(k.endswith("checkpoint.pt") for k in keys)

    # MLflow over HTTP: one FINISHED run, every epoch logged once, Table I, the registry.
    mc = mlflow.MlflowClient(mlflow_server.uri)
    run = mc.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mc.get_metric_history(result["run_id"], "loss_g")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    assert {"evaluation/table_i.json", "evaluation/table_i.md"} <= {
        a.path for a in mc.list_artifacts(result["run_id"], "evaluation")}
    version = mc.get_model_version_by_alias("multinode", "candidate")
    assert version.run_id == result["run_id"]
    assert float(version.tags["test.psnr"]) == pytest.approx(result["rows"][0]["psnr_mean"],
                                                             abs=1e-4)
    # The server keeps the artifacts (checkpoints, figures, the model) on S3.
    art = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket="mlflow") for o in page.get("Contents", [])]
    assert any("table_i.json" in k for k in art) and any("checkpoints/" in k for k in art)
    # And the registered model loads back through the server.
    from cvaa import tracking
    model = tracking.load_model("models:/multinode@candidate", mlflow_server.uri)
    assert model.config["train"]["num_workers"] == 2


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_tracking_server_outage_neither_stops_training_nor_loses_an_epoch(
        prepared_cpu, s3_server, tmp_path):
    """Stop the MLflow server after epoch 1, start it again (same port, same store) after
    epoch 4: epochs 2-4 train while it is down, and every epoch's metrics, figure and
    checkpoint artifact arrive, in order, once it is back."""
    import threading
    import time

    from mlflowserver import MlflowServer

    from cvaa.config import load_config
    from cvaa.distributed.training import TrainJob, run_training

    s3_server.client().create_bucket(Bucket="mlflow-outage")
    server = MlflowServer(tmp_path / "mlflow", "s3://mlflow-outage/artifacts").start()
    events: dict = {}
    threads = []

    def later(name, fn):
        def go():
            fn()
            events[name] = time.monotonic()
        t = threading.Thread(target=go, daemon=True)
        threads.append(t)
        t.start()

    lines = []

    def log(line):
        lines.append((time.monotonic(), line))
        if line.startswith("epoch 1/") and "stopped" not in events:
            events["stopping"] = time.monotonic()
            later("stopped", server.stop)
        if line.startswith("epoch 4/") and "restarting" not in events:
            events["restarting"] = time.monotonic()
            stopping = threads[0]  # a slow stop (SIGTERM's grace) ends before the restart
            later("restarted", lambda: (stopping.join(), server.start()))

    try:
        cfg = load_config("cpu", overrides=["train.batch_size=2", "train.cpus_per_worker=1",
                                            "train.epochs=6", "train.figure_every=1"])
        job = TrainJob(cfg=cfg, data=prepared_cpu, run_name="outage",
                       storage=str(tmp_path / "ray"), mlflow_uri=server.uri,
                       register_name="outage", preset="cpu")
        out = run_training(job, log=log)
        for t in threads:
            t.join(timeout=120)
        assert {"stopped", "restarted"} <= set(events), events
        # Epochs 2-4 finished while the server was down: training did not wait for it.
        # (from the SIGTERM on: the server takes no connection while it shuts down)
        during = [line for at, line in lines
                  if events["stopping"] < at < events["restarting"] and line.startswith("epoch ")]
        assert [line.split()[1] for line in during][-1] == "4/6", lines
        assert any("MLflow unreachable" in line for line in during), during
        print(f"MLflow outage: server down {events['restarted'] - events['stopped']:.0f} s "
              f"(stop took {events['stopped'] - events['stopping']:.0f} s); "
              f"{len(during)} epoch lines while down; run returned "
              f"{lines[-1][0] - events['restarted']:.0f} s after the restart")

        client = mlflow.MlflowClient(server.uri)
        assert client.get_run(out["run_id"]).info.status == "FINISHED"
        history = sorted(client.get_metric_history(out["run_id"], "loss_g"),
                         key=lambda m: (m.timestamp, m.step))
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
        assert [m.value for m in history] == pytest.approx(out["history"]["loss_g"])
        figures = {a.path for a in client.list_artifacts(out["run_id"], "figures")}
        assert {f"figures/slices_epoch_{e:04d}.png" for e in range(1, 7)} <= figures
        checkpoints = {a.path for a in client.list_artifacts(out["run_id"], "checkpoints")}
        assert {f"checkpoints/epoch_{e:04d}" for e in range(1, 7)} <= checkpoints
        assert client.get_model_version_by_alias("outage", "candidate").run_id == out["run_id"]
    finally:
        server.stop()


@pytest.mark.slow
def test_a_tracking_server_that_never_returns_leaves_a_resumable_run(prepared_cpu, tmp_path):
    """Stop the MLflow server after epoch 1 and leave it down: training still finishes,
    the entries the server did not take stay in the last checkpoint, and the job stops
    with a message (no traceback, no minutes of client retries) that says how to go on.
    Started again, the same command does not train again: it sends the kept entries, then
    scores and registers into the same run, which ends FINISHED with every epoch."""
    import time

    from mlflowserver import MlflowServer

    from cvaa.config import load_config
    from cvaa.distributed.training import TrainJob, run_training
    from cvaa.tracking.spool import PENDING

    server = MlflowServer(tmp_path / "mlflow", str(tmp_path / "artifacts")).start()
    lines: list[tuple[float, str]] = []

    def log(line):
        lines.append((time.monotonic(), line))
        if line.startswith("epoch 1/") and server.proc.poll() is None:
            server.stop()

    try:
        cfg = load_config("cpu", overrides=["train.batch_size=2", "train.cpus_per_worker=1",
                                            "train.epochs=3", "train.figure_every=1",
                                            "train.mlflow_wait_s=5"])
        job = TrainJob(cfg=cfg, data=prepared_cpu, run_name="never", mlflow_uri=server.uri,
                       storage=str(tmp_path / "ray"), register_name="never", preset="cpu")
        with pytest.raises(tracking.TrackingUnavailableError) as caught:
            run_training(job, log=log)
        message, raised = str(caught.value), time.monotonic()
        epochs = [line for _, line in lines if line.startswith("epoch ")]
        assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], lines
        last_epoch = max(at for at, line in lines if line.startswith("epoch 3/"))
        print(f"MLflow never back: the job stopped {raised - last_epoch:.0f} s after its "
              f"last epoch line; message: {message}")
        assert raised - last_epoch < 60, "the job must not sit in MLflow's own retries"
        assert "--run-name never" in message and "replay_log.py" in message
        kept = Path(message.split("are kept in ")[1].split(";")[0])
        steps = sorted({json.loads(line).get("step") for line in
                        (kept / PENDING).read_text().splitlines() if line.strip()} - {None})
        assert steps == [2, 3], steps   # epoch 1 was sent before the server stopped

        server.start()   # same port, same store
        again: list[str] = []
        out = run_training(job, log=again.append)
        assert not [line for line in again if line.startswith("epoch ")], again
        client = mlflow.MlflowClient(server.uri)
        assert client.get_run(out["run_id"]).info.status == "FINISHED"
        history = client.get_metric_history(out["run_id"], "loss_g")
        assert sorted(m.step for m in history) == [1, 2, 3]
        figures = {a.path for a in client.list_artifacts(out["run_id"], "figures")}
        assert {f"figures/slices_epoch_{e:04d}.png" for e in (1, 2, 3)} <= figures
        assert client.get_model_version_by_alias("never", "candidate").run_id == out["run_id"]
        assert len(client.search_runs([client.get_run(out["run_id"]).info.experiment_id],
                                      "tags.`mlflow.runName` = 'never'")) == 1
    finally:
        server.stop()
