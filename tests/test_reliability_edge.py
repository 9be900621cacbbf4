"""Reliability where users meet it: the calibration stored with a registered version, the
pyfunc's ``params``, and jobs/reconstruct.py's uncertainty output, metadata and line."""

import importlib.util
import json
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest

from cvaa import inference, reliability, tracking
from cvaa.config import load_config
from cvaa.data.io import read_ct
from tiny_models import register_tiny_models, write_perturbed_dataset

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config("cpu")


def _load_job():
    spec = importlib.util.spec_from_file_location("reconstruct_job_rel",
                                                  ROOT / "jobs" / "reconstruct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOB = _load_job()


@pytest.fixture(scope="module")
def round_trip(real_ct_paths):
    xrays, _ = inference.xrays_from_ct(str(real_ct_paths["abdomen"]), CFG)
    return xrays


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, round_trip):
    """A tiny registered CVAA whose version carries a calibration fitted on perturbed
    copies of one real CT's DRRs (features measured with the model itself; the PSNR
    targets are synthetic: the plumbing is under test here, the calibration's quality in
    bench/reliability.py)."""
    uri, models = register_tiny_models(tmp_path_factory.mktemp("registry-rel"),
                                       names=("cvaa",))
    model = tracking.load_model(models["cvaa"], uri)
    import torch
    x = torch.from_numpy(round_trip)
    measured = [reliability.assess(model.generator, xi, CFG, k=4, seed=i).features
                for i, xi in enumerate(reliability.sample_xrays(x, CFG, 4, seed=5))]
    # 40 rows (the fewest a calibration accepts is 30) around the 4 measured ones: four
    # assessments cost what forty would not
    rng = np.random.default_rng(0)
    rows = [{k: v * (1 + 0.02 * rng.standard_normal()) for k, v in measured[i % 4].items()}
            for i in range(40)]
    psnr = [25.0 + 0.1 * i for i in range(len(rows))]
    cal = reliability.ReliabilityCalibration.fit(rows, psnr, k=4)
    version = tracking.attach_calibration(models["cvaa"], cal.to_json(), uri)
    return {"uri": uri, "model": models["cvaa"], "calibration": cal, "version": version}


def test_the_calibration_travels_with_the_version(calibrated):
    loaded = tracking.load_model(calibrated["model"], calibrated["uri"])
    assert reliability.ReliabilityCalibration.from_json(loaded.calibration) == \
        calibrated["calibration"]
    client = mlflow.MlflowClient(calibrated["uri"])
    tags = client.get_model_version("tiny-cvaa", calibrated["version"]).tags
    assert tags["reliability/k"] == "4" and tags["reliability/level"] == "0.9"
    with pytest.raises(ValueError):
        tracking.attach_calibration(calibrated["model"], "{}", calibrated["uri"])
    with pytest.raises(tracking.ModelLookupError):
        tracking.attach_calibration("models:/tiny-cvaa@nope", loaded.calibration,
                                    calibrated["uri"])


def test_a_calibration_is_an_mlflow_run_with_its_held_out_dataset(calibrated, tmp_path):
    from manifests import prepared_manifest

    manifest = prepared_manifest()
    cases = manifest["split"]["test"]
    run_id = tracking.log_calibration_run(calibrated["model"], calibrated["uri"],
                                          str(tmp_path / "held-out"), manifest, "test", cases,
                                          calibrated["calibration"].to_json())
    client = mlflow.MlflowClient(calibrated["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cvaa.kind"] == "calibration"
    (given,) = run.inputs.dataset_inputs
    assert given.dataset.name == "held-out/test"
    assert [t.value for t in given.tags] == ["calibration"]
    assert run.data.params["k"] == "4" and "held-out cases" in run.data.tags[
        "mlflow.note.content"]
    tags = client.get_model_version("tiny-cvaa", calibrated["version"]).tags
    assert tags["reliability/run_id"] == run_id


def test_pyfunc_returns_reliability_on_request_and_the_volume_by_default(calibrated,
                                                                         round_trip):
    mlflow.set_tracking_uri(calibrated["uri"])
    model = mlflow.pyfunc.load_model(calibrated["model"])
    x = np.stack([round_trip, round_trip[::-1]]).astype(np.float32)
    plain = model.predict(x)
    assert isinstance(plain, np.ndarray) and plain.shape == (2, 1, 32, 32, 32)
    out = model.predict(x, params={"reliability": True})
    np.testing.assert_allclose(out["ct"], plain, atol=1e-5)
    assert out["uncertainty"].shape == plain.shape and float(out["uncertainty"].max()) > 0
    assert set(out["verdict"]) <= {"ok", "check", "out of distribution"}
    assert (out["psnr_low"] < out["score"]).all() and (out["score"] < out["psnr_high"]).all()
    with pytest.raises(Exception, match="k=4"):
        model.predict(x, params={"reliability": True, "k": 2})


def test_reconstruct_writes_the_uncertainty_metadata_and_a_line(tmp_path, calibrated,
                                                                  round_trip, capsys):
    from PIL import Image
    paths = []
    for name, image in (("pa.png", round_trip[0]), ("lat.png", round_trip[1])):
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "ct.nii.gz"
    code = JOB.main(["--model", calibrated["model"], "--pa", paths[0], "--lateral", paths[1],
                     "--out", str(out), "--mlflow-uri", calibrated["uri"]])
    printed = capsys.readouterr().out
    assert code == 0
    import SimpleITK as sitk
    unc = sitk.ReadImage(str(tmp_path / "ct_uncertainty.nii.gz"))   # not a CT: no air
    est = read_ct(str(out), check_hu=False)
    assert unc.GetSize() == est.shape[::-1]
    assert np.allclose(unc.GetOrigin(), sitk.ReadImage(str(out)).GetOrigin())
    spread = sitk.GetArrayFromImage(unc)
    assert float(spread.min()) >= 0.0 and float(spread.max()) > 0.0
    meta = json.loads((tmp_path / "ct.reliability.json").read_text())
    assert meta["verdict"] in reliability.VERDICTS and meta["k"] == 4
    assert meta["psnr_low"] < meta["score"] < meta["psnr_high"]
    assert (meta["predicted_psnr"] is None) == (meta["verdict"] == "out of distribution")
    assert "reliability: " + meta["verdict"] in printed
    assert (tmp_path / "ct.reliability_reprojection.png").read_bytes()[:4] == b"\x89PNG"

    plain = tmp_path / "plain.nii.gz"
    assert JOB.main(["--model", calibrated["model"], "--pa", paths[0], "--lateral", paths[1],
                     "--out", str(plain), "--mlflow-uri", calibrated["uri"],
                     "--no-reliability"]) == 0
    assert not (tmp_path / "plain_uncertainty.nii.gz").exists()
    # the estimate with reliability is the batch's sample 0, reused: the plain one up to
    # float rounding (well under 1 HU)
    np.testing.assert_allclose(read_ct(str(plain), check_hu=False).array, est.array, atol=1.0)


def test_dicom_uncertainty_is_a_derived_series_of_the_same_study(tmp_path, calibrated,
                                                                  round_trip, capsys):
    from PIL import Image
    paths = []
    for name, image in (("pa.png", round_trip[0]), ("lat.png", round_trip[1])):
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "ct_dicom"
    assert JOB.main(["--model", calibrated["model"], "--pa", paths[0], "--lateral", paths[1],
                     "--out", str(out), "--dicom", "--mlflow-uri", calibrated["uri"]]) == 0
    capsys.readouterr()
    est = pydicom.dcmread(sorted(out.iterdir())[0], stop_before_pixels=True)
    unc_files = sorted((tmp_path / "ct_dicom_uncertainty").iterdir())
    unc = pydicom.dcmread(unc_files[0], stop_before_pixels=True)
    assert len(unc_files) == 32
    assert unc.StudyInstanceUID == est.StudyInstanceUID
    assert unc.SeriesInstanceUID != est.SeriesInstanceUID and unc.SeriesNumber == 2
    assert list(unc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert unc.SeriesDescription.startswith("Uncertainty of CT estimate")
    assert "reliability: " in unc.ImageComments and "Not for diagnosis" in unc.ImageComments
    assert (tmp_path / "ct_dicom.reliability.json").is_file()


def test_reliability_paths():
    assert JOB.reliability_paths("a/ct.nii.gz", False) == ("a/ct_uncertainty.nii.gz",
                                                           "a/ct.reliability.json")
    assert JOB.reliability_paths("a/ct.mha", False) == ("a/ct_uncertainty.mha",
                                                        "a/ct.reliability.json")
    assert JOB.reliability_paths("a/series/", True) == ("a/series_uncertainty",
                                                        "a/series.reliability.json")


def test_uncalibrated_is_a_verdict_of_the_pyfunc_and_the_job(tmp_path, round_trip, capsys):
    uri, models = register_tiny_models(tmp_path, names=("cvaa",))
    mlflow.set_tracking_uri(uri)
    out = mlflow.pyfunc.load_model(models["cvaa"]).predict(
        round_trip[None].astype(np.float32), params={"reliability": True})
    assert list(out["verdict"]) == ["uncalibrated"] and np.isnan(out["score"]).all()
    assert float(out["uncertainty"].max()) > 0                 # still measured
    from PIL import Image
    paths = []
    for name, image in (("pa.png", round_trip[0]), ("lat.png", round_trip[1])):
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    assert JOB.main(["--model", models["cvaa"], "--pa", paths[0], "--lateral", paths[1],
                     "--out", str(tmp_path / "ct.nii.gz"), "--mlflow-uri", uri]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((tmp_path / "ct.reliability.json").read_text())
    assert meta["verdict"] == "uncalibrated" and meta["k"] == 8
    assert meta["predicted_psnr"] is None and meta["score"] is None
    line = next(x for x in printed.splitlines() if x.startswith("reliability: "))
    assert line.startswith("reliability: uncalibrated") and " dB" not in line
    assert (tmp_path / "ct_uncertainty.nii.gz").is_file()


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory, real_ct_paths):
    """A 48-case prepared dataset written directly (no Ray): the real abdomen CT's DRRs
    and cube under 48 perturbed copies of its X-rays (each its own patient and source);
    3 cases are the test split, 5 the train split, 40 a calibration split."""
    return write_perturbed_dataset(
        tmp_path_factory.mktemp("tiny-prepared"), str(real_ct_paths["abdomen"]), 48,
        {"test": slice(0, 3), "train": slice(3, 8), "calibration": slice(8, None)})


def test_evaluate_adds_the_calibration_to_table_i_and_logs_the_figures(
        tmp_path, calibrated, tiny_prepared):
    from cvaa.distributed.evaluate import EvalJob, run

    out = run(EvalJob(models=[calibrated["model"]], data=tiny_prepared, out=str(tmp_path),
                      mlflow_uri=calibrated["uri"], figure_cases=1, engine="local"),
              log=lambda *_: None)
    text = Path(out["files"]["table_md"]).read_text()
    assert "Reliability of tiny-cvaa@candidate (v1)" in text
    assert sum(line.startswith(tuple(f"| c{i} |" for i in range(8)))
               for line in text.splitlines()) == 3
    rows = Path(out["files"]["reliability_csv_tiny-cvaa_candidate_v1"]).read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("case_id,psnr,score")
    names = {Path(p).name for p in out["files"].values()}
    assert {"calibration_tiny-cvaa_candidate_v1.png", "uncertainty_tiny-cvaa_candidate_v1_c0.png",
            "attention_tiny-cvaa_candidate_v1_c0.png"} <= names
    client = mlflow.MlflowClient(calibrated["uri"])
    logged = {a.path for a in client.list_artifacts(out["run_id"], "figures")}
    assert "figures/attention_tiny-cvaa_candidate_v1_c0.png" in logged
    assert "figures/uncertainty_tiny-cvaa_candidate_v1_c0.png" in logged


def test_calibrate_job_stores_a_calibration_fitted_on_the_held_out_cases(
        tmp_path, tiny_prepared, capsys):
    spec = importlib.util.spec_from_file_location("calibrate_job", ROOT / "jobs" / "calibrate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from cvaa.data.dataset import PreparedDataset
    from cvaa.distributed.evaluate import EvalJob, run

    # the version trained on tiny_prepared's train split (its 'data' tag says so)
    uri, models = register_tiny_models(tmp_path, names=("cvaa",),
                                       version_tags={"data": tiny_prepared})
    assert tracking.load_model(models["cvaa"], uri).calibration is None
    common = ["--model", models["cvaa"], "--data", tiny_prepared, "--k", "1",
              "--mlflow-uri", uri]                      # K = 1: one pass per case, cheap
    assert job.main(common) == 2                       # --split all holds the 5 train cases
    assert "5 of the 48 cases" in capsys.readouterr().err
    assert job.main(common + ["--split", "test"]) == 2            # 3 cases: too few
    assert "needs at least 30" in capsys.readouterr().err
    assert tracking.load_model(models["cvaa"], uri).calibration is None
    assert job.main(common + ["--split", "calibration"]) == 0
    assert "stored with models:/tiny-cvaa@candidate (version 1)" in capsys.readouterr().out
    cal = reliability.ReliabilityCalibration.from_json(
        tracking.load_model(models["cvaa"], uri).calibration)
    data = PreparedDataset(tiny_prepared)
    assert cal.k == 1 and cal.n_cases == 40
    assert cal.dataset == data.fingerprint and cal.case_ids == tuple(data.split("calibration"))
    assert job.main(["--model", "models:/tiny-cvaa@gone", "--data", tiny_prepared,
                     "--mlflow-uri", uri]) == 2

    # evaluate reports the calibration's quality on the 8 other cases only
    out = run(EvalJob(models=[models["cvaa"]], data=tiny_prepared, split="all",
                      out=str(tmp_path / "eval"), mlflow_uri=uri, figure_cases=0,
                      engine="local"), log=lambda *_: None)
    text = Path(out["files"]["table_md"]).read_text()
    assert "(40 cases the calibration was fitted on left out)" in text, text
    assert sum(line.startswith(tuple(f"| c{i} |" for i in range(48)))
               for line in text.splitlines()) == 8

    # a version without a 'data' tag cannot be checked, so it is refused
    uri2, bare = register_tiny_models(tmp_path / "bare", names=("cvaa",))
    assert job.main(["--model", bare["cvaa"], "--data", tiny_prepared, "--split",
                     "calibration", "--mlflow-uri", uri2]) == 2
    assert "no 'data' tag" in capsys.readouterr().err
