"""jobs/evaluate.py: registered models x prepared split -> Table I, Fig. 2, MLflow run."""

import csv
import importlib.util
import io
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from cvaa import tracking
from cvaa.data.dataset import PreparedDataset
from cvaa.distributed.evaluate import GROUND_TRUTH, EvalJob, run
from cvaa.scoring import predict
from cvaa.metrics import evaluate_batch
from tiny_models import register_tiny_models

# Every test here evaluates on the prepared_cpu fixture, which Ray Data prepares.
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["mae", "mse", "cosine", "psnr", "ssim", "psnr_x2ct", "ssim_x2ct"]


def _load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    uri, models = register_tiny_models(tmp_path_factory.mktemp("registry"))
    return {"uri": uri, **models}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, registry, prepared_cpu):
    out = tmp_path_factory.mktemp("eval") / "out"
    job = EvalJob(models=[registry["cvaa"], registry["x2ct"]], data=prepared_cpu,
                  out=str(out), mlflow_uri=registry["uri"], figure_cases=2, engine="local")
    return job, run(job, log=lambda *_: None)


def _direct_metrics(model_uri, tracking_uri, data):
    """Metrics computed straight from cvaa.metrics on the model's predictions."""
    dataset = PreparedDataset(data)
    ids = dataset.split("test")
    cases = [dataset.load(c) for c in ids]
    generator = tracking.load_generator(model_uri, tracking_uri)
    pred = predict(generator, torch.from_numpy(np.stack([c["xrays"] for c in cases])))
    target = torch.from_numpy(np.stack([c["ct"] for c in cases]))
    return evaluate_batch(pred.clamp(0, 1), target)


def test_table_equals_metrics_computed_directly(evaluated, registry, prepared_cpu):
    job, out = evaluated
    labels = ["tiny-cvaa@candidate (v1)", "tiny-x2ct@candidate (v1)"]
    assert out["labels"] == labels and [r["model"] for r in out["rows"]] == labels
    n = len(PreparedDataset(prepared_cpu).split("test"))
    assert n >= 1 and all(r["cases"] == n for r in out["rows"])
    for name, row in zip(("cvaa", "x2ct"), out["rows"]):
        direct = _direct_metrics(registry[name], registry["uri"], prepared_cpu)
        assert len(out["per_case"][row["model"]]) == n
        for key in METRICS:
            values = np.array([d[key] for d in direct])
            per_case = [r[key] for r in out["per_case"][row["model"]]]
            np.testing.assert_allclose(per_case, values, rtol=1e-9)
            assert row[f"{key}_mean"] == pytest.approx(values.mean(), rel=1e-9)
            assert row[f"{key}_std"] == pytest.approx(values.std(), rel=1e-9, abs=1e-12)
    # The two models are different networks: their rows differ.
    assert out["rows"][0]["mae_mean"] != out["rows"][1]["mae_mean"]


def test_outputs_markdown_csv_and_figure(evaluated, prepared_cpu):
    job, out = evaluated
    files = {k: Path(v) for k, v in out["files"].items()}
    md = files["table_md"].read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2                               # header, rule, two models
    assert "| MAE | MSE | Cosine | PSNR | SSIM | PSNR (x2ct) | SSIM (x2ct) |" in lines[0]
    assert lines[2].startswith("| tiny-cvaa@candidate (v1) |")
    rows = list(csv.DictReader(io.StringIO(files["table_csv"].read_text())))
    assert [r["model"] for r in rows] == out["labels"]
    assert float(rows[1]["ssim_mean"]) == pytest.approx(out["rows"][1]["ssim_mean"])
    assert rows[0]["model_uri"] == job.models[0] and rows[0]["version"] == "1"
    per_case = list(csv.DictReader(io.StringIO(files["per_case_csv"].read_text())))
    assert len(per_case) == 2 * out["rows"][0]["cases"]
    assert {r["case_id"] for r in per_case} == set(out["case_ids"])
    assert out["figure_columns"] == [*out["labels"], GROUND_TRUTH]
    with Image.open(files["figure"]) as image:
        assert image.format == "PNG"
        assert image.size[1] > image.size[0]                # 2 cases x 3 planes of rows


def test_mlflow_evaluation_run_holds_the_table_and_figure(evaluated):
    job, out = evaluated
    client = mlflow.MlflowClient(job.mlflow_uri)
    run_ = client.get_run(out["run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["cvaa.kind"] == "evaluation"
    assert run_.data.params["split"] == "test"
    key = "tiny-cvaa_candidate_v1/psnr_mean"
    assert run_.data.metrics[key] == pytest.approx(out["rows"][0]["psnr_mean"])
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/table_i.md", "evaluation/table_i.csv", "evaluation/per_case.csv",
            "evaluation/table_i.json"} <= artifacts
    figures = {a.path for a in client.list_artifacts(out["run_id"], "figures")}
    assert figures == {"figures/fig2.png"}
    (scored,) = run_.inputs.dataset_inputs                    # the split it scored
    assert scored.dataset.name.endswith("/test") and [t.value for t in scored.tags] == ["test"]
    assert "Table I of 2 registered model(s) on the test split" in run_.data.tags[
        "mlflow.note.content"]


def test_job_cli_one_model_makes_a_narrower_figure(evaluated, registry, prepared_cpu,
                                                   tmp_path, capsys):
    _, two = evaluated
    out = tmp_path / "one"
    code = _load_job().main(["--models", registry["cvaa"], "--data", prepared_cpu,
                             "--out", str(out), "--mlflow-uri", registry["uri"],
                             "--labels", "CVAA-GAN"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "| CVAA-GAN |" in stdout and "Fig. 2 columns: CVAA-GAN, Ground truth" in stdout
    with Image.open(out / "fig2.png") as one, Image.open(two["files"]["figure"]) as both:
        assert one.size[0] < both.size[0]                    # 2 columns vs 3
        assert one.size[1] == both.size[1]                   # same cases and planes


def test_ray_data_engine_matches_the_local_loop(evaluated, registry, prepared_cpu, tmp_path):
    _, local = evaluated
    job = EvalJob(models=[registry["x2ct"]], data=prepared_cpu, out=str(tmp_path / "ray"),
                  mlflow_uri=registry["uri"], figure_cases=0, engine="ray", batch_size=1,
                  workers=1)
    out = run(job, log=lambda *_: None)
    assert out["engine"] == "ray" and out["figure_columns"] == []
    label = "tiny-x2ct@candidate (v1)"
    for got, want in zip(out["per_case"][label], local["per_case"][label]):
        for key in METRICS:
            assert math.isclose(got[key], want[key], rel_tol=1e-6), key


@pytest.mark.parametrize("case", ["unknown alias", "no dataset", "unknown split",
                                  "unreachable server"])
def test_bad_input_fails_clearly(case, registry, prepared_cpu, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {"unknown alias": ["--models", registry["cvaa"].replace("@candidate", "@prod"),
                              "--data", prepared_cpu],
            "no dataset": ["--models", registry["cvaa"], "--data", str(tmp_path / "none")],
            "unknown split": ["--models", registry["cvaa"], "--data", prepared_cpu,
                              "--split", "validation"],
            "unreachable server": ["--models", registry["cvaa"], "--data", prepared_cpu,
                                   "--mlflow-uri", "http://127.0.0.1:9"]}[case]
    if "--mlflow-uri" not in argv:
        argv += ["--mlflow-uri", registry["uri"]]
    code = _load_job().main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    expected = {"unknown alias": "has no alias 'prod'", "no dataset": "no prepared dataset",
                "unknown split": "unknown split 'validation'",
                "unreachable server": "http://127.0.0.1:9: tracking server unreachable"}[case]
    assert code == 2 and err.startswith("error: ") and expected in err, err
    assert not out.exists()
