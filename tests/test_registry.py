"""cvaa.tracking.registry: a generator registered as a models-from-code pyfunc, loaded back
without pickle (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) and described in the registry."""

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cvaa import tracking
from cvaa.config import load_config
from cvaa.models import GENERATORS, build_generator
from cvaa.tracking.registry import REQUIREMENTS

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config("cpu")
NAME, ALIAS = "tiny-registry", "candidate"
TAGS = {"test.psnr": "31.2500", "preset": "cpu"}
DESCRIPTION = "CVAA-GAN generator, preset cpu: (N, 2, 32, 32) -> (N, 1, 32, 32, 32)."


def _trained_generator() -> torch.nn.Module:
    """The cpu-preset generator with every weight moved off its (seed 0) initialisation."""
    torch.manual_seed(0)
    generator = build_generator(CFG.model.generator, CFG)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    return generator.eval()


def _new_run(uri: str, name: str) -> str:
    """A RUNNING run to log into (the test closes it, or not)."""
    return mlflow.MlflowClient(uri).create_run(tracking.setup(uri), run_name=name).info.run_id


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    generator = _trained_generator()
    run_id = _new_run(uri, "register-tiny")
    out = tracking.log_generator(run_id, generator, CFG.to_dict(), NAME, ALIAS, uri,
                                 version_tags=TAGS, description=DESCRIPTION)
    status = mlflow.MlflowClient(uri).get_run(run_id).info.status
    tracking.RunLogger(uri, run_id).set_terminated()
    model_dir = Path(mlflow.artifacts.download_artifacts(out["model_uri"],
                                                         dst_path=str(root / "download")))
    return {"uri": uri, "run_id": run_id, "generator": generator, "status_after": status,
            "model_dir": model_dir, **out}


@pytest.fixture(scope="module")
def legacy(registered, tmp_path_factory):
    """The generator logged the old way, as a pickled PyTorch model, as ``tiny-legacy@old``."""
    uri = registered["uri"]
    run_id = _new_run(uri, "register-legacy")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(registered["generator"], name="legacy",
                                 serialization_format="pickle", pip_requirements=["torch"],
                                 registered_model_name="tiny-legacy",
                                 metadata={"cvaa_config": CFG.to_dict()})
    mlflow.MlflowClient(uri).set_registered_model_alias("tiny-legacy", "old", "1")
    return "models:/tiny-legacy@old"


def _xrays(n: int) -> np.ndarray:
    return np.random.default_rng(7).random((n, 2, 32, 32), dtype=np.float32)


@torch.no_grad()
def _expected(generator: torch.nn.Module, xrays: np.ndarray) -> torch.Tensor:
    return generator.eval()(torch.from_numpy(xrays))


def _python(code: str, cwd: Path, *args: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with pickle loading disabled; its stdout."""
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", **env}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# --------------------------------------------------------------------------- loading, no pickle

FRESH_PYFUNC = """
import sys
import numpy as np
import mlflow.pyfunc

model_uri, xrays, out = sys.argv[1:]
assert "cvaa" not in sys.modules
model = mlflow.pyfunc.load_model(model_uri)
x = np.load(xrays)
for n in (1, 3):
    np.save(f"{out}/plain_{n}.npy", model.predict(x[:n]))
import cvaa
print(cvaa.__file__)
"""


@pytest.mark.slow
def test_plain_pyfunc_predicts_in_a_fresh_process_without_pickle_or_installed_cvaa(
        registered, tmp_path):
    np.save(tmp_path / "xrays.npy", _xrays(3))
    stdout = _python(FRESH_PYFUNC, tmp_path, registered["model_uri"],
                     str(tmp_path / "xrays.npy"), str(tmp_path),
                     MLFLOW_TRACKING_URI=registered["uri"])
    # The model's own copy of cvaa was imported (code_paths), not the checkout.
    cvaa_file = Path(stdout.strip().splitlines()[-1])
    assert cvaa_file.parts[-3:] == ("code", "cvaa", "__init__.py")
    assert ROOT not in cvaa_file.parents
    for n in (1, 3):
        got = np.load(tmp_path / f"plain_{n}.npy")
        assert got.dtype == np.float32 and got.shape == (n, 1, 32, 32, 32)
        assert torch.allclose(torch.from_numpy(got), _expected(registered["generator"],
                                                               _xrays(3)[:n]),
                              rtol=0, atol=1e-6)


CVAA_FIRST = """
import sys
import numpy as np
import torch
import mlflow.pyfunc
import mlflow.pytorch
from mlflow.exceptions import MlflowException
from cvaa import tracking
from cvaa.models import GENERATORS

model_uri, tracking_uri, legacy_uri, xrays, out = sys.argv[1:]
model = tracking.load_model(model_uri, tracking_uri)
assert type(model.generator) is GENERATORS[model.config["model"]["generator"]]
assert not model.generator.training
assert {p.device.type for p in model.generator.parameters()} == {"cpu"}
print(model.label, model.version, model.uri)
x = np.load(xrays)
pyfunc = mlflow.pyfunc.load_model(model_uri)
assert type(pyfunc.unwrap_python_model().generator) is type(model.generator)
with torch.no_grad():
    for n in (1, 3):
        np.save(f"{out}/loaded_{n}.npy", model.generator(torch.from_numpy(x[:n])).numpy())
        np.save(f"{out}/pyfunc_{n}.npy", pyfunc.predict(x[:n]))
# Control: the same process refuses the pickled model, so the variable is in force.
try:
    mlflow.pytorch.load_model(legacy_uri)
except MlflowException as exc:
    print("refused:", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" in str(exc))
"""


@pytest.mark.slow
def test_load_model_in_a_fresh_process_without_pickle_matches_the_trained_generator(
        registered, legacy, tmp_path):
    np.save(tmp_path / "xrays.npy", _xrays(3))
    stdout = _python(CVAA_FIRST, tmp_path, registered["model_uri"], registered["uri"],
                     legacy, str(tmp_path / "xrays.npy"), str(tmp_path))
    assert f"{NAME}@{ALIAS} (v{registered['version']}) {registered['version']}" in stdout
    assert "refused: True" in stdout
    torch.manual_seed(0)
    initial = build_generator(CFG.model.generator, CFG)
    for n in (1, 3):
        expected = _expected(registered["generator"], _xrays(3)[:n])
        for kind in ("loaded", "pyfunc"):
            got = torch.from_numpy(np.load(tmp_path / f"{kind}_{n}.npy"))
            assert got.shape == (n, 1, 32, 32, 32)
            assert torch.allclose(got, expected, rtol=0, atol=1e-6), kind
        # The weights were loaded: the initialisation predicts something else.
        assert not torch.allclose(_expected(initial, _xrays(3)[:n]), expected, atol=1e-3)


def test_load_model_in_process_uses_the_imported_cvaa(registered):
    model = tracking.load_model(registered["model_uri"], registered["uri"])
    assert type(model.generator) is GENERATORS[CFG.model.generator]
    assert model.config == CFG.to_dict()
    assert model.version == registered["version"]
    assert model.label == f"{NAME}@{ALIAS} (v{registered['version']})"
    assert not model.generator.training
    generator = tracking.load_generator(f"models:/{NAME}/{registered['version']}",
                                        registered["uri"])
    x = _xrays(2)
    assert torch.equal(_expected(generator, x), _expected(registered["generator"], x))


def test_pyfunc_predict_takes_any_batch_size_as_array_or_dict(registered):
    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(registered["model_uri"])
    x = _xrays(6)   # more than one chunk of 4
    expected = _expected(registered["generator"], x)
    for model_input in (x, {"xrays": x}):
        got = model.predict(model_input)
        assert got.dtype == np.float32 and got.shape == (6, 1, 32, 32, 32)
        assert 0.0 <= got.min() and got.max() <= 1.0
        assert torch.allclose(torch.from_numpy(got), expected, rtol=0, atol=1e-6)
    with pytest.raises(mlflow.exceptions.MlflowException, match="shape"):
        model.predict(_xrays(2)[:, :1])   # one view only: the signature refuses it


def test_a_pickled_legacy_model_is_refused_with_a_way_out(registered, legacy):
    with pytest.raises(tracking.ModelLookupError, match="register it again"):
        tracking.load_model(legacy, registered["uri"])
    with pytest.raises(tracking.ModelLookupError, match="register it again"):
        tracking.load_generator(legacy, registered["uri"])


# --------------------------------------------------------------------------- what is logged

def test_logged_model_is_code_and_weights_without_pickle(registered):
    model_dir = registered["model_dir"]
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function"}
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(pyfunc["model_code_path"]).name == "pyfunc_model.py"
    assert "python_model" not in pyfunc   # the cloudpickled PythonModel of older pyfuncs
    assert mlmodel["metadata"]["cvaa_config"] == CFG.to_dict()
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pyc")]
    assert not list(model_dir.rglob("__pycache__"))
    weights = model_dir / pyfunc["artifacts"]["weights"]["path"]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert state.keys() == registered["generator"].state_dict().keys()
    config = json.loads((model_dir / pyfunc["artifacts"]["config"]["path"]).read_text())
    assert config == CFG.to_dict()
    # The cvaa source travels with the model: .py files only, a few hundred kB.
    code = model_dir / pyfunc["code"] / "cvaa"
    code_files = [p for p in code.rglob("*") if p.is_file()]
    assert (code / "models" / "__init__.py").is_file() and (code / "config.py").is_file()
    assert {p.suffix for p in code_files} == {".py"}
    assert sum(p.stat().st_size for p in code_files) < 1_000_000


def test_version_is_tagged_described_and_aliased(registered):
    client = mlflow.MlflowClient(registered["uri"])
    version = client.get_model_version(NAME, registered["version"])
    assert version.tags == TAGS
    assert version.description == DESCRIPTION
    assert version.run_id == registered["run_id"]
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == registered["version"]
    assert registered["logged_uri"] == version.source


def test_requirements_are_installed_pypi_pins_without_cvaa(registered):
    lines = (registered["model_dir"] / "requirements.txt").read_text().split()
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines)   # every line is NAME==VERSION
    assert {canonicalize_name(n) for n in pins} == {canonicalize_name(n) for n in REQUIREMENTS}
    assert "cvaa" not in pins
    for name, version in pins.items():
        assert metadata.version(name).split("+")[0] == version, name
        assert "+" not in version, name


def _closure(names) -> set[str]:
    """The distributions ``names`` install, with their dependencies (no extras)."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


IMPORTS = """
import sys
import importlib.metadata as metadata
import cvaa.config, cvaa.models, cvaa.scoring
owners = metadata.packages_distributions()
print(" ".join(sorted({d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])})))
print("mlflow" in sys.modules, "ray" in sys.modules)
"""


@pytest.mark.slow
def test_model_imports_need_only_the_logged_requirements(tmp_path):
    """What the model file imports besides mlflow (cvaa.config, .models, .scoring) is
    installed by REQUIREMENTS; and it pulls in neither MLflow nor Ray."""
    distributions, flags = _python(IMPORTS, tmp_path).strip().splitlines()
    needed = {canonicalize_name(d) for d in distributions.split()} - {"cvaa"}
    assert needed, "no third-party imports found: the probe is broken"
    assert needed <= _closure([n for n in REQUIREMENTS if n != "mlflow"])
    assert flags == "False False"


# --------------------------------------------------------------------------- the run

def test_log_generator_leaves_the_run_status_and_experiment(registered, tmp_path,
                                                            monkeypatch):
    assert registered["status_after"] == "RUNNING"
    monkeypatch.chdir(tmp_path)   # where a default experiment would put its artifacts
    uri = registered["uri"]
    client = mlflow.MlflowClient(uri)
    run_id = _new_run(uri, "killed-trial")
    client.set_terminated(run_id, "KILLED")
    out = tracking.log_generator(run_id, registered["generator"], CFG.to_dict(), NAME,
                                 "killed", uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert [m.model_id for m in run.outputs.model_outputs] == [out["logged_uri"][len("models:/"):]]
    logged = client.get_logged_model(out["logged_uri"][len("models:/"):])
    assert logged.experiment_id == run.info.experiment_id
    assert not (tmp_path / "mlruns").exists()
    assert int(out["version"]) == int(registered["version"]) + 1
    assert client.get_model_version(NAME, out["version"]).tags == {}


def test_a_generator_that_does_not_match_its_config_is_not_registered(registered):
    uri = registered["uri"]
    run_id = _new_run(uri, "mismatch")
    x2ct = load_config("cpu", overrides=["model.generator=x2ct"])
    with pytest.raises(ValueError, match="model.generator='x2ct'"):
        tracking.log_generator(run_id, registered["generator"], x2ct.to_dict(),
                               "tiny-mismatch", ALIAS, uri)
    assert not mlflow.MlflowClient(uri).search_registered_models("name = 'tiny-mismatch'")
