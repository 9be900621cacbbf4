"""The MLflow model registry: registering a trained generator and loading it back.

A registered generator is an MLflow models-from-code pyfunc (:mod:`cvaa.tracking.pyfunc_model`):
the model file, the generator's ``state_dict`` and resolved config, and the ``cvaa`` source
the file imports. Loading runs no pickle, so it works where MLflow is hardened with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, and survives renames of cvaa's classes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from cvaa.tracking.runs import auth_refusal, check_tracking_uri, open_run

# The model definition MLflow logs as code (it is run as a file, never imported from cvaa).
MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
# What the model file imports, as PyPI distributions: mlflow itself, and torch, numpy and
# pyyaml for cvaa.config, cvaa.models and cvaa.scoring (they import neither Ray nor MLflow),
# and SimpleITK for cvaa.reliability's DRR renderer (``params={"reliability": True}``).
# cvaa travels with the model as source (code_paths); it is on no package index.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pyyaml", "SimpleITK")


def log_generator(run_id: str, generator, cfg_dict: dict[str, Any], register_name: str,
                  alias: str, tracking_uri: str, *,
                  version_tags: Mapping[str, str] | None = None,
                  description: str = "") -> dict[str, Any]:
    """Log the generator into the existing run ``run_id`` as a models-from-code pyfunc,
    register it as a new version of ``register_name``, describe that version and point
    ``alias`` at it. The run's status is left as it was (its owner closes it).

    Args:
        run_id: the run the model is logged into (any status).
        generator: the ``nn.Module`` built from ``cfg_dict`` (left untouched, any device).
        cfg_dict: its resolved config (``Config.to_dict()``); stored as the model's
            ``cvaa_config`` metadata and as the artifact the generator is rebuilt from.
        version_tags: tags for the new version (values are stored as strings).
        description: the new version's description ("" leaves it empty).

    Returns:
        ``{"model_uri": "models:/NAME@ALIAS", "version": "N", "logged_uri": "models:/ID"}``.

    Example:
        >>> out = log_generator(run_id, G, cfg.to_dict(), "cvaa-gan", "candidate", uri,
        ...                     version_tags={"test/psnr": "33.1"})     # doctest: +SKIP
        >>> mlflow.pyfunc.load_model(out["model_uri"]).predict(xrays)  # doctest: +SKIP
    """
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
    from mlflow.exceptions import MlflowException

    _check_rebuildable(generator, cfg_dict)
    size = cfg_dict["preprocess"]["size"]
    pixels = cfg_dict["drr"]["detector_pixels"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2, pixels, pixels), "xrays")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, size, size, size), "ct")]),
        # On request, predict also returns the uncertainty, score and verdict
        # (cvaa.tracking.pyfunc_model); k = 0: the calibration's own K.
        params=ParamSchema([ParamSpec("reliability", "boolean", False),
                            ParamSpec("k", "long", 0)]))
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    mlflow.set_tracking_uri(tracking_uri)  # Model.log and its registration use the global URI
    with tempfile.TemporaryDirectory(prefix="cvaa-model-") as tmp:
        weights, config = Path(tmp) / "generator.pt", Path(tmp) / "config.json"
        torch.save(generator.state_dict(), weights)
        config.write_text(json.dumps(cfg_dict, indent=1))
        code = _package_source(Path(tmp) / "code")
        # Model.log takes run_id (mlflow.pyfunc.log_model does not), so the run is neither
        # reopened nor ended. With no active run it would create the logged model in the
        # default experiment; created here, it lives in the run's experiment.
        logged = client.create_logged_model(run.info.experiment_id, name="generator",
                                            source_run_id=run_id, params=run.data.params)
        with warnings.catch_warnings():
            # The signature describes the input; an example would be a (1, 2, P, P) JSON array.
            warnings.filterwarnings("ignore", ".*An input example was not provided")
            info = Model.log(
                artifact_path=None, name="generator", flavor=mlflow.pyfunc, run_id=run_id,
                model_id=logged.model_id, python_model=str(MODEL_FILE),
                artifacts={"weights": str(weights), "config": str(config)},
                code_paths=[str(code)], signature=signature,
                metadata={"cvaa_config": cfg_dict}, pip_requirements=_requirements())
    # Registered through the client (mlflow.register_model prints to stderr), with the
    # version's tags and description in the same call.
    try:
        client.create_registered_model(register_name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    created = client.create_model_version(
        register_name, source=f"models:/{logged.model_id}", run_id=run_id,
        tags={k: str(v) for k, v in (version_tags or {}).items()},
        description=description or None, model_id=logged.model_id)
    version = str(created.version)
    # The alias moves last: whoever resolves it finds the version fully described.
    client.set_registered_model_alias(register_name, alias, version)
    return {"model_uri": f"models:/{register_name}@{alias}", "version": version,
            "logged_uri": info.model_uri}


def _check_rebuildable(generator, cfg_dict: dict[str, Any]) -> None:
    """Fail before logging when the loader could not rebuild ``generator`` from the config."""
    from cvaa.config import Config
    from cvaa.models import build_generator

    cfg = Config.from_dict(cfg_dict, source="log_generator cfg_dict")
    try:
        build_generator(cfg.model.generator, cfg).load_state_dict(generator.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"the generator does not match cfg_dict (model.generator="
                         f"{cfg.model.generator!r}): {exc}") from exc


def _package_source(dst: Path) -> Path:
    """Copy the ``cvaa`` package's ``.py`` files (no caches or other files) to ``dst/cvaa``."""
    import cvaa

    def not_source(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "__pycache__"
                or not (n.endswith(".py") or Path(folder, n).is_dir())]

    return Path(shutil.copytree(Path(cvaa.__file__).parent, dst / "cvaa", ignore=not_source))


def _requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the installed versions (torch without ``+cpu``)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def load_generator(model_uri: str, tracking_uri: str | None = None):
    """``models:/NAME@ALIAS`` (or any model URI) -> the generator ``nn.Module`` on CPU.

    Raises:
        ModelLookupError: a model that :func:`log_generator` did not log.
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return _load_pyfunc_generator(model_uri, mlflow.models.get_model_info(model_uri))


def _load_pyfunc_generator(model_uri: str, info) -> Any:
    """The generator inside the models-from-code pyfunc at ``model_uri`` (eval, CPU)."""
    return _load_python_model(model_uri, info).generator.eval()


def _load_python_model(model_uri: str, info) -> Any:
    """The models-from-code pyfunc's python model at ``model_uri`` (its ``generator``).

    In a process that has imported ``cvaa`` already, the model file's ``import cvaa...``
    finds that package (MLflow only prepends the logged source to ``sys.path``), so the
    generator's classes are the caller's; in a fresh process the logged source is used.
    """
    import mlflow.pyfunc

    if "model_code_path" not in info.flavors.get("python_function", {}):
        raise ModelLookupError(f"{model_uri}: not a models-from-code generator (flavors: "
                               f"{sorted(info.flavors)}); an older cvaa logged pickled "
                               "PyTorch models: register it again with "
                               "cvaa.tracking.log_generator")
    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not hasattr(python_model, "generator"):
        raise ModelLookupError(f"{model_uri}: its pyfunc ({type(python_model).__name__}) "
                               "holds no generator; log it with cvaa.tracking.log_generator")
    return python_model


# --------------------------------------------------------------------------- calibration

def _model_version(client, model_uri: str):
    """The registry version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise ModelLookupError(f"{model_uri}: name a registered version (models:/NAME@ALIAS "
                               "or models:/NAME/VERSION)")
    ref = model_uri[len("models:/"):].rstrip("/")
    try:
        if "@" in ref:
            name, _, alias = ref.partition("@")
            return client.get_model_version_by_alias(name, alias)
        name, _, number = ref.rpartition("/")
        return client.get_model_version(name, number)
    except MlflowException as exc:
        refused = auth_refusal(exc, client.tracking_uri)
        raise refused or ModelLookupError(f"{model_uri}: no such registered version") from exc


def model_version_tags(model_uri: str, tracking_uri: str) -> dict[str, str]:
    """The tags of the registered version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
    names (:func:`cvaa.distributed.training.register` writes ``data``, the dataset it
    trained on, among them)."""
    import mlflow

    check_tracking_uri(tracking_uri)
    version = _model_version(mlflow.MlflowClient(tracking_uri), model_uri)
    return dict(version.tags or {})


def attach_calibration(model_uri: str, calibration_json: str, tracking_uri: str) -> str:
    """Store a reliability calibration with a registered version: the JSON file
    ``reliability_calibration.json`` (:data:`cvaa.reliability.CALIBRATION_FILE`) in the
    version's logged model, next to ``MLmodel``, so that every copy of the model carries it,
    and the version tags ``reliability/*`` (level, half-width, K, cases). A later call
    replaces the file.

    Returns:
        The version number.
    """
    import mlflow

    from cvaa.reliability import CALIBRATION_FILE, ReliabilityCalibration

    calibration = ReliabilityCalibration.from_json(calibration_json)   # refuse a bad file
    client = mlflow.MlflowClient(tracking_uri)
    version = _model_version(client, model_uri)
    # log_generator registers the source models:/<logged model id>
    model_id = version.model_id or (version.source or "").removeprefix("models:/")
    if not model_id.startswith("m-"):
        raise ModelLookupError(f"{model_uri}: version {version.version} has no logged model "
                               f"(source {version.source!r}; registered by an older cvaa); "
                               "register it again")
    with tempfile.TemporaryDirectory(prefix="cvaa-calibration-") as tmp:
        path = Path(tmp) / CALIBRATION_FILE
        path.write_text(calibration_json)
        client.log_model_artifact(model_id, str(path))
    tags = {"reliability/level": calibration.level,
            "reliability/halfwidth_db": round(calibration.halfwidth, 4),
            "reliability/k": calibration.k,
            "reliability/cases": calibration.n_cases,
            "reliability/dataset": calibration.dataset or "none recorded"}
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, str(value))
    return str(version.version)


def log_calibration_run(model_uri: str, tracking_uri: str, data: str,
                        manifest: Mapping[str, Any], split: str, case_ids: list[str],
                        calibration_json: str) -> str:
    """Record a calibration of ``model_uri`` (stored by :func:`attach_calibration`) as an
    MLflow run: the held-out cases as its dataset input (context ``calibration``), K, the
    level, the interval's half-width and the calibration file; the version gets the tag
    ``reliability/run_id``. Returns the run id.
    """
    import mlflow

    from cvaa.reliability import CALIBRATION_FILE, ReliabilityCalibration

    calibration = ReliabilityCalibration.from_json(calibration_json)
    version = _model_version(mlflow.MlflowClient(tracking_uri), model_uri)
    name = f"calibrate-{version.name}-v{version.version}"
    with open_run(tracking_uri, name, tags={"cvaa.kind": "calibration",
                                            "cvaa.model": model_uri}) as run:
        run.log_datasets(data, manifest, {"calibration": (split, case_ids)})
        run.log_params({"model": model_uri, "version": version.version, "data": data,
                        "split": split, "cases": len(case_ids), "k": calibration.k,
                        "level": calibration.level})
        run.log_metrics({"halfwidth_db": calibration.halfwidth,
                         "check_psnr": calibration.check_psnr}, 0)
        run.log_text(calibration_json, CALIBRATION_FILE)
        run.set_description(
            f"Reliability calibration of {model_uri} (version {version.version}) on "
            f"{len(case_ids)} held-out cases of `{data}` ({split}), K = {calibration.k}: "
            f"predicted PSNR +-{calibration.halfwidth:.2f} dB at "
            f"{100 * calibration.level:.0f} %.")
    run.client.set_model_version_tag(version.name, version.version, "reliability/run_id",
                                     run.run_id)
    return run.run_id


# --------------------------------------------------------------------------- inference side

class ModelLookupError(LookupError):
    """A model URI that names nothing in the registry, or a model :func:`log_generator` did
    not log (no cvaa metadata, or a pickled PyTorch model of an older cvaa)."""


class LoadedModel(NamedTuple):
    """A registered generator with what the inference side needs to know about it.

    Attributes:
        generator: the ``nn.Module`` in eval mode, on CPU.
        config: the resolved config dict it was trained with (``cvaa_config`` metadata).
        uri: the model URI it was loaded from.
        label: ``NAME@ALIAS (vN)``, ``NAME vN``, or the URI, for tables and figures.
        version: the registry version, or ``""`` for a URI outside the registry.
        calibration: the version's reliability calibration (JSON text,
            :func:`attach_calibration`), or ``None``.
    """

    generator: Any
    config: dict[str, Any]
    uri: str
    label: str
    version: str
    calibration: str | None = None


def load_model(model_uri: str, tracking_uri: str) -> LoadedModel:
    """Look up ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, ``runs:/...``) and load
    the generator with its ``cvaa_config`` metadata (written by :func:`log_generator`).

    Raises:
        TrackingUnavailableError: the store cannot be reached.
        ModelLookupError: no such model, version or alias (the message lists the aliases
            there are), a model logged without ``cvaa_config``, or one that is not a
            models-from-code pyfunc (older cvaa versions logged pickled PyTorch models).
    """
    import mlflow
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
            raise auth_refusal(exc, tracking_uri) or ModelLookupError(
                f"{model_uri}: no registered model {name!r} in {tracking_uri}") from exc
        aliases = dict(registered.aliases or {})
        if at:
            if alias not in aliases:
                raise ModelLookupError(f"{model_uri}: registered model {name!r} has no alias "
                                       f"{alias!r} (aliases: {sorted(aliases) or 'none'})")
            version = str(aliases[alias])
            label = f"{name}@{alias} (v{version})"
        elif number:
            try:
                version = str(client.get_model_version(name, number).version)
            except MlflowException as exc:
                raise auth_refusal(exc, tracking_uri) or ModelLookupError(
                    f"{model_uri}: registered model {name!r} has no version {number!r}"
                ) from exc
            label = f"{name} v{version}"
        else:
            raise ModelLookupError(f"{model_uri}: name an alias or a version "
                                   f"(models:/{name}@ALIAS or models:/{name}/VERSION)")
    try:
        info = mlflow.models.get_model_info(model_uri)
    except MlflowException as exc:
        raise auth_refusal(exc, tracking_uri) or ModelLookupError(
            f"{model_uri}: cannot read the model ({exc.message})") from exc
    metadata = info.metadata or {}
    if "cvaa_config" not in metadata:
        raise ModelLookupError(f"{model_uri}: no 'cvaa_config' in the model's metadata; log "
                               "it with cvaa.tracking.log_generator")
    python_model = _load_python_model(model_uri, info)
    return LoadedModel(python_model.generator.eval(), metadata["cvaa_config"], model_uri,
                       label, version, getattr(python_model, "calibration_json", None))
