"""MLflow at the edge: the run, its metrics and artifacts, the model registry.

The tracking URI comes from ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else a local
SQLite store (``~/.cvaa/mlflow.db``, artifacts beside it), so the model registry works with
no server. Browse it with ``mlflow ui --backend-store-uri sqlite:///$HOME/.cvaa/mlflow.db``.
Only the driver and rank 0 call into this module.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

EXPERIMENT = "cvaa"


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = Path(os.environ.get("CVAA_HOME", Path.home() / ".cvaa"))
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _artifact_root(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live next to the database file (not in the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def setup(tracking_uri: str, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at ``tracking_uri`` and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment,
                                    artifact_location=_artifact_root(tracking_uri, experiment))


def find_run(tracking_uri: str, experiment_id: str, run_name: str) -> str | None:
    """The newest unfinished run called ``run_name`` (to resume into), if any."""
    import mlflow

    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if runs and runs[0].info.status != "FINISHED":
        return runs[0].info.run_id
    return None


class RunLogger:
    """Logs into one existing run through the client API (no global active run), so it
    works from a Ray worker as well as from the driver."""

    def __init__(self, tracking_uri: str, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory(prefix="cvaa-art-") as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path),
                                     None if parent in ("", ".") else parent)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        columns = list(rows[0]) if rows else []
        data = {c: [r.get(c) for r in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def log_generator(run_id: str, generator, cfg_dict: dict[str, Any], register_name: str,
                  alias: str, tracking_uri: str) -> dict[str, Any]:
    """Log the generator as an MLflow PyTorch model in ``run_id``, register a new version
    of ``register_name`` and point ``alias`` at it. Loadable for any batch size:
    ``mlflow.pytorch.load_model("models:/NAME@ALIAS")`` gives the ``nn.Module``.

    Pickle serialisation keeps the module's Python class (the default ``pt2`` export fixes
    the input shapes); loading needs ``cvaa`` importable, as the model's requirements say.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = cfg_dict["preprocess"]["size"]
    pixels = cfg_dict["drr"]["detector_pixels"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2, pixels, pixels), "xrays")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, size, size, size), "ct")]))
    generator = generator.cpu().eval()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            generator, name="generator", serialization_format="pickle",
            signature=signature, registered_model_name=register_name,
            metadata={"cvaa_config": cfg_dict},
            pip_requirements=_requirements())
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    client.set_registered_model_alias(register_name, alias, str(version))
    return {"model_uri": f"models:/{register_name}@{alias}", "version": str(version),
            "logged_uri": info.model_uri}


def _requirements() -> list[str]:
    from importlib.metadata import version

    import cvaa

    reqs = [f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}",
            f"cvaa=={cvaa.__version__}"]
    return reqs


def load_generator(model_uri: str, tracking_uri: str | None = None):
    """``models:/NAME@ALIAS`` (or any model URI) -> the generator ``nn.Module`` on CPU."""
    import mlflow
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pytorch.load_model(model_uri, map_location="cpu").eval()
