"""The MLflow model registry: registering a trained generator and loading it back."""

from __future__ import annotations

from typing import Any, NamedTuple

from cvaa.tracking.runs import check_tracking_uri


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
