"""Secrets never leak: with S3 keys and an MLflow token in the environment, nothing a
training run writes contains them (MLflow params, tags, metrics names, every artifact, the
registered version's tags and description, the console, the Ray logs of the session)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from cvaa.config import load_config
from cvaa.data import store
from cvaa.distributed.training import TrainJob, run_training
from secretscan import leaks, read_all

TOKEN = "mlflow-token-PLANTED-5c1e9a7b"


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_no_secret_reaches_mlflow_the_console_or_the_ray_logs(
        tmp_path, prepared_cpu, s3_server, ray_session_dir, monkeypatch):
    from s3server import SECRET_KEY

    secrets = [SECRET_KEY, TOKEN]
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    s3_server.client().create_bucket(Bucket="secret-scan")
    for path in store.list_files(prepared_cpu):
        store.write_bytes(store.join("s3://secret-scan/prepared",
                                     os.path.relpath(path, prepared_cpu)),
                          Path(path).read_bytes())
    cfg = load_config("cpu", overrides=["train.batch_size=2", "train.cpus_per_worker=1",
                                        "train.epochs=2", "train.figure_every=1"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    job = TrainJob(cfg=cfg, data="s3://secret-scan/prepared", run_name="secret-scan",
                   storage=str(tmp_path / "ray"), mlflow_uri=uri,
                   register_name="secret-scan", preset="cpu")
    lines: list[str] = []
    out = run_training(job, log=lines.append)

    client = mlflow.MlflowClient(uri)
    run = client.get_run(out["run_id"])
    version = client.get_model_version_by_alias("secret-scan", "candidate")
    texts = {"console": "\n".join(lines),
             "params": repr(run.data.params), "tags": repr(run.data.tags),
             "metric names": repr(sorted(run.data.metrics)),
             "version": repr(version.tags) + (version.description or "")}
    assert "s3://secret-scan/prepared" in texts["params"]      # the scan sees what it should
    artifacts = Path(mlflow.artifacts.download_artifacts(
        run_id=out["run_id"], dst_path=str(tmp_path / "artifacts"), tracking_uri=uri))
    model = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/secret-scan/{version.version}",
        dst_path=str(tmp_path / "model"), tracking_uri=uri))
    blobs = {**read_all("artifact", artifacts, tmp_path), **read_all("artifact", model, tmp_path),
             **read_all("ray log", ray_session_dir / "logs"),
             **read_all("checkpoint", tmp_path / "ray", tmp_path)}
    assert any(k.startswith("ray log") for k in blobs) and len(blobs) > 10
    found = leaks(secrets, texts, blobs)
    assert not found, found
