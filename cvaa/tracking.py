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
from typing import Any, Mapping, NamedTuple, Sequence

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


# --------------------------------------------------------------------------- inference side

class ModelLookupError(LookupError):
    """A model URI that names nothing in the registry, or a model without cvaa metadata."""


class TrackingUnavailableError(ConnectionError):
    """The tracking store cannot be reached: a server that does not answer, or a local
    store that does not exist (looking a model up must not create an empty one)."""


def check_tracking_uri(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming the URI, when the store behind ``tracking_uri`` is not there.

    MLflow itself retries an unreachable server for minutes before it gives up.
    """
    import urllib.error
    import urllib.request

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise TrackingUnavailableError(f"{tracking_uri}: no MLflow database at {db}")
    elif tracking_uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
        except urllib.error.HTTPError:
            pass  # it answered (an auth proxy may refuse /health): reachable
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailableError(f"{tracking_uri}: tracking server unreachable "
                                           f"({reason})") from exc
    elif tracking_uri.startswith("file:") or ("://" not in tracking_uri
                                              and not tracking_uri.startswith("databricks")):
        root = Path(tracking_uri[len("file://"):] if tracking_uri.startswith("file://")
                    else tracking_uri)
        if not root.is_dir():
            raise TrackingUnavailableError(f"{tracking_uri}: no MLflow file store at {root}")


class LoadedModel(NamedTuple):
    """A registered generator with what the inference side needs to know about it.

    Attributes:
        generator: the ``nn.Module`` in eval mode, on CPU.
        config: the resolved config dict it was trained with (``cvaa_config`` metadata).
        uri: the model URI it was loaded from.
        label: ``NAME@ALIAS (vN)``, ``NAME vN``, or the URI, for tables and figures.
        version: the registry version, or ``""`` for a URI outside the registry.
    """

    generator: Any
    config: dict[str, Any]
    uri: str
    label: str
    version: str


def load_model(model_uri: str, tracking_uri: str) -> LoadedModel:
    """Look up ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, ``runs:/...``) and load
    the generator with its ``cvaa_config`` metadata (written by :func:`log_generator`).

    Raises:
        TrackingUnavailableError: the store cannot be reached.
        ModelLookupError: no such model, version or alias (the message lists the aliases
            there are), or a model logged without ``cvaa_config``.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    check_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    label, version = model_uri, ""
    if model_uri.startswith("models:/"):
        ref = model_uri[len("models:/"):].rstrip("/")
        name, at, alias = ref.partition("@")
        number = ""
        if not at and "/" in ref:
            name, _, number = ref.rpartition("/")
        try:
            registered = client.get_registered_model(name)
        except MlflowException as exc:
            raise ModelLookupError(f"{model_uri}: no registered model {name!r} in "
                                   f"{tracking_uri}") from exc
        aliases = dict(registered.aliases or {})
        if at:
            if alias not in aliases:
                raise ModelLookupError(f"{model_uri}: registered model {name!r} has no alias "
                                       f"{alias!r} (aliases: {sorted(aliases) or 'none'})")
            version = str(aliases[alias])
            label = f"{name}@{alias} (v{version})"
        elif number:
            try:
                version = client.get_model_version(name, number).version
            except MlflowException as exc:
                raise ModelLookupError(f"{model_uri}: registered model {name!r} has no "
                                       f"version {number!r}") from exc
            label = f"{name} v{version}"
        else:
            raise ModelLookupError(f"{model_uri}: name an alias or a version "
                                   f"(models:/{name}@ALIAS or models:/{name}/VERSION)")
    try:
        metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    except MlflowException as exc:
        raise ModelLookupError(f"{model_uri}: cannot read the model ({exc.message})") from exc
    if "cvaa_config" not in metadata:
        raise ModelLookupError(f"{model_uri}: no 'cvaa_config' in the model's metadata; log "
                               "it with cvaa.tracking.log_generator")
    generator = mlflow.pytorch.load_model(model_uri, map_location="cpu").eval()
    return LoadedModel(generator, metadata["cvaa_config"], model_uri, label, version)


def create_run(tracking_uri: str, run_name: str, tags: Mapping[str, str] | None = None,
               experiment: str = EXPERIMENT) -> str:
    """A new run in ``experiment`` (created if needed); returns its id."""
    import mlflow

    experiment_id = setup(tracking_uri, experiment)
    run = mlflow.MlflowClient(tracking_uri).create_run(experiment_id, run_name=run_name,
                                                       tags=dict(tags or {}))
    return run.info.run_id
