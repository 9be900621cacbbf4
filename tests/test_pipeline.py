"""jobs/preprocess.py end to end: phantoms + real CTs + broken inputs, local and on S3."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cvaa.config import load_config
from cvaa.data.dataset import PreparedDataset, list_inputs, split_by_patient
from cvaa.distributed.pipeline import ensure_phantoms, run_pipeline

pytestmark = pytest.mark.ray

CPU = ["data.n_phantoms=3"]


def _broken_inputs(directory):
    """A corrupt gzip, an MR-like volume (real MR), and a 2D image."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = bytearray(gzip.compress(np.zeros(200_000, np.int16).tobytes()))
    raw[len(raw) // 2: len(raw) // 2 + 16] = b"\xff" * 16
    (directory / "corrupt.nii.gz").write_bytes(bytes(raw))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 64), -1000, np.float32)),
                    str(directory / "flat_2d.nii.gz"))
    return [str(directory / "corrupt.nii.gz"), str(directory / "flat_2d.nii.gz")]


@pytest.fixture(scope="module")
def inputs_manifest(tmp_path_factory, real_ct_paths, ray_local):
    """A JSON manifest: 3 phantoms, the 4 real CTs (two thoraxes as one patient), the real
    MR and 2 broken files written here."""
    base = tmp_path_factory.mktemp("inputs")
    cfg = load_config("cpu", overrides=CPU)
    phantom_dir = ensure_phantoms(cfg, str(base / "phantoms"))
    phantoms = [{"uri": u.uri, "patient_id": u.patient_id} for u in list_inputs(phantom_dir)]
    assert len(phantoms) == 3
    cases = phantoms + [
        {"uri": str(real_ct_paths["abdomen"]), "patient_id": "P-abdomen"},
        {"uri": str(real_ct_paths["aorta"]), "patient_id": "P-thorax"},
        {"uri": str(real_ct_paths["pulmonary"]), "patient_id": "P-thorax"},
        {"uri": str(real_ct_paths["dicom"])},
        {"uri": str(real_ct_paths["mr"])},
    ] + [{"uri": u} for u in _broken_inputs(base / "broken")]
    manifest = base / "cases.json"
    manifest.write_text(json.dumps({"cases": cases}))
    return manifest


def _check_prepared(output, cfg, n_prepared=7, n_rejected=3):
    ds = PreparedDataset(output)
    m = ds.manifest
    assert len(m["prepared"]) == n_prepared, m["rejected"]
    assert len(m["rejected"]) == n_rejected
    reasons = {r["source_uri"]: r["reason"] for r in m["rejected"]}
    for uri, reason in reasons.items():
        assert reason.startswith(uri)                  # the message names the input

    def reason_for(name):
        [reason] = [v for k, v in reasons.items() if k.endswith(name)]
        return reason

    assert "gzip" in reason_for("corrupt.nii.gz")
    assert "2D image" in reason_for("flat_2d.nii.gz")
    assert "cannot be CT in HU" in reason_for("abdomen_mr.nii.gz")
    train, test = ds.split("train"), ds.split("test")
    assert sorted(train + test) == sorted(ds.records)
    patients = {s: {ds.records[c]["patient_id"] for c in ds.split(s)} for s in ("train", "test")}
    assert not patients["train"] & patients["test"]
    assert test, "the 20% test split is empty"
    size, pixels = cfg.preprocess.size, cfg.drr.detector_pixels
    for case_id in ds.split("all"):
        case = ds.load(case_id)
        assert case["ct"].shape == (1, size, size, size) and case["ct"].dtype == np.float32
        assert case["xrays"].shape == (2, pixels, pixels)
        assert 0.0 <= case["ct"].min() and case["ct"].max() <= 1.0
        assert 0.0 <= case["xrays"].min() and case["xrays"].max() <= 1.0
        assert case["xrays"].std() > 0.01           # a real radiograph, not a blank
        assert case["meta"]["case_id"] == case_id
        assert case["meta"]["config_hash"] == m["config_hash"]
    return m


def _scheduler_settings():
    import ray.data
    from ray.data._internal.execution import streaming_executor_state as executor_state

    return (executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S,
            ray.data.DataContext.get_current().op_resource_reservation_enabled)


def test_pipeline_end_to_end_and_resume(tmp_path, inputs_manifest):
    cfg = load_config("cpu", overrides=CPU)
    scheduler_before = _scheduler_settings()
    out = str(tmp_path / "prepared")
    inputs = list_inputs(str(inputs_manifest))
    assert len(inputs) == 10
    first = run_pipeline(inputs, cfg, out, log=lambda *_: None)
    m = _check_prepared(out, cfg)
    assert first["summary"]["processed"] == 10
    # Both thorax CTs belong to one patient: they land on the same side.
    thorax = [r["case_id"] for r in m["prepared"] if r["patient_id"] == "P-thorax"]
    assert len(thorax) == 2
    assert (thorax[0] in m["split"]["test"]) == (thorax[1] in m["split"]["test"])

    again = run_pipeline(inputs, cfg, out, log=lambda *_: None)
    assert again["summary"]["processed"] == 0 and again["summary"]["skipped"] == 10
    assert again["split"] == first["split"]
    assert [r["case_id"] for r in again["prepared"]] == [r["case_id"] for r in m["prepared"]]

    # The scheduler settings tuned for one-CT tasks hold inside the pipeline only.
    assert _scheduler_settings() == scheduler_before

    changed = cfg.override(["drr.sad_mm=900"])
    third = run_pipeline(inputs, changed, out, log=lambda *_: None)
    assert third["summary"]["processed"] == 10
    assert third["config_hash"] != first["config_hash"]


def test_a_crash_inside_a_task_is_recorded_and_retried_later(tmp_path, inputs_manifest):
    cfg = load_config("cpu", overrides=CPU)
    inputs = list_inputs(str(inputs_manifest))[:2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases").write_text("a file where a directory must go")  # every write fails
    m = run_pipeline(inputs, cfg, str(out), log=lambda *_: None)
    assert len(m["rejected"]) == 2 and not m["prepared"]
    assert all(r["kind"] == "error" for r in m["rejected"])
    (out / "cases").unlink()
    m = run_pipeline(inputs, cfg, str(out), log=lambda *_: None)
    assert len(m["prepared"]) == 2 and m["summary"]["processed"] == 2


@pytest.mark.s3
def test_pipeline_on_s3(s3_server, s3_bucket, inputs_manifest, real_ct_paths):
    client = s3_server.client()
    cases = json.loads(inputs_manifest.read_text())["cases"]
    s3_cases = []
    for i, case in enumerate(cases):
        src = case["uri"]
        from pathlib import Path
        path = Path(src)
        if path.is_dir():
            for f in sorted(path.iterdir()):
                client.upload_file(str(f), s3_bucket, f"in/{i}-{path.name}/{f.name}")
            key = f"in/{i}-{path.name}"
        else:
            key = f"in/{i}-{path.name}"
            client.upload_file(src, s3_bucket, key)
        s3_cases.append({**case, "uri": f"s3://{s3_bucket}/{key}"})
    client.put_object(Bucket=s3_bucket, Key="cases.json",
                      Body=json.dumps(s3_cases).encode())
    cfg = load_config("cpu", overrides=CPU)
    out = f"s3://{s3_bucket}/prepared"
    inputs = list_inputs(f"s3://{s3_bucket}/cases.json")
    first = run_pipeline(inputs, cfg, out, log=lambda *_: None)
    assert first["summary"]["processed"] == 10
    _check_prepared(out, cfg)
    again = run_pipeline(inputs, cfg, out, log=lambda *_: None)
    assert again["summary"]["processed"] == 0


def test_split_by_patient_is_seeded_and_disjoint():
    records = [{"case_id": f"c{i}", "patient_id": f"p{i // 2}"} for i in range(40)]
    a = split_by_patient(records, 0.2, seed=3)
    assert a == split_by_patient(records, 0.2, seed=3)
    assert a != split_by_patient(records, 0.2, seed=4)
    assert len(a["test"]) == 8 and len(a["train"]) == 32
    test_patients = {f"p{int(c[1:]) // 2}" for c in a["test"]}
    train_patients = {f"p{int(c[1:]) // 2}" for c in a["train"]}
    assert not test_patients & train_patients


@pytest.mark.slow
def test_cli_rejects_unknown_config_key(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/preprocess.py", "--output", str(tmp_path),
                           "--set", "drr.sadmm=900"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'drr.sadmm'" in proc.stderr
