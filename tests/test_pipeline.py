"""jobs/preprocess.py end to end: phantoms + real CTs + broken inputs, local and on S3."""

import contextlib
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cvaa.config import load_config
from cvaa.data.dataset import (CaseInput, PreparedDataset, case_id_for, list_inputs,
                               split_by_patient, training_split, write_manifest)
from cvaa.distributed import pipeline
from cvaa.distributed.pipeline import (DATA_CONTEXT_SETTINGS, TASK_RETRIES, Progress,
                                       cases_per_task, ensure_phantoms, run_pipeline)

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


def _data_context_fields():
    """The process-wide Ray Data settings the pipeline changes while it runs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    return {name: getattr(ctx, name) for name in DATA_CONTEXT_SETTINGS}


def _progress_counts(lines, tag="[preprocess]", unit="cases"):
    """(done, total, rejected or None) of each progress line."""
    found = [re.fullmatch(rf"{re.escape(tag)} (\d+)/(\d+) {unit}  [\d.]+ {unit}/s"
                          r"(?:  ETA \S+)?(?:  rejected (\d+))?", line) for line in lines]
    return [(int(m[1]), int(m[2]), m[3] and int(m[3])) for m in found if m]


def test_pipeline_end_to_end_and_resume(tmp_path, inputs_manifest):
    cfg = load_config("cpu", overrides=CPU)
    settings_before = _data_context_fields()
    out = str(tmp_path / "prepared")
    inputs = list_inputs(str(inputs_manifest))
    assert len(inputs) == 10
    lines = []
    start = time.perf_counter()
    first = run_pipeline(inputs, cfg, out, log=lines.append)
    seconds = time.perf_counter() - start
    m = _check_prepared(out, cfg)
    assert first["summary"]["processed"] == 10
    # Progress: throttled to one line per PROGRESS_EVERY_S plus a final one, counting to
    # the total, with the rejections; then the reasons and the summary line.
    progress = _progress_counts(lines)
    assert 1 <= len(progress) <= 1 + seconds / pipeline.PROGRESS_EVERY_S
    assert progress[-1] == (10, 10, 3)
    assert sum(line.startswith("[preprocess] rejected ") for line in lines) == 3
    assert lines[-1].startswith("[preprocess] prepared 7, rejected 3 (0 skipped")
    # Both thorax CTs belong to one patient: they land on the same side.
    thorax = [r["case_id"] for r in m["prepared"] if r["patient_id"] == "P-thorax"]
    assert len(thorax) == 2
    assert (thorax[0] in m["split"]["test"]) == (thorax[1] in m["split"]["test"])

    again = run_pipeline(inputs, cfg, out, log=lambda *_: None)
    assert again["summary"]["processed"] == 0 and again["summary"]["skipped"] == 10
    assert again["split"] == first["split"]
    assert [r["case_id"] for r in again["prepared"]] == [r["case_id"] for r in m["prepared"]]

    # Ray Data's process-wide settings hold inside the pipeline only.
    assert _data_context_fields() == settings_before

    changed = cfg.override(["drr.sad_mm=900"])
    third = run_pipeline(inputs, changed, out, log=lambda *_: None)
    assert third["summary"]["processed"] == 10
    assert third["config_hash"] != first["config_hash"]


def test_a_crash_inside_a_task_is_recorded_and_retried_later(tmp_path, inputs_manifest,
                                                             monkeypatch):
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)  # a line per finished case
    cfg = load_config("cpu", overrides=CPU)
    inputs = list_inputs(str(inputs_manifest))[:2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases").write_text("a file where a directory must go")  # every write fails
    lines = []
    m = run_pipeline(inputs, cfg, str(out), log=lines.append)
    assert len(m["rejected"]) == 2 and not m["prepared"]
    assert all(r["kind"] == "error" for r in m["rejected"])
    counts = _progress_counts(lines)
    assert [done for done, _, _ in counts][:2] == [1, 2] and counts[-1] == (2, 2, 2)
    (out / "cases").unlink()
    m = run_pipeline(inputs, cfg, str(out), log=lambda *_: None)
    assert len(m["prepared"]) == 2 and m["summary"]["processed"] == 2


def test_settings_are_restored_when_the_pipeline_fails(tmp_path, inputs_manifest,
                                                       monkeypatch):
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)
    cfg = load_config("cpu", overrides=CPU)
    before = _data_context_fields()
    assert before != DATA_CONTEXT_SETTINGS   # else this test could not see a leak
    during = []

    class ConsoleGone(Exception):
        pass

    def log(line):  # the first progress line fails, as a closed console would
        if _progress_counts([line]):
            during.append(_data_context_fields())
            raise ConsoleGone(line)

    with pytest.raises(ConsoleGone):
        run_pipeline(list_inputs(str(inputs_manifest))[:2], cfg, str(tmp_path), log=log)
    assert during == [DATA_CONTEXT_SETTINGS]     # in force while the pipeline ran
    assert _data_context_fields() == before      # and every one put back


@contextlib.contextmanager
def _kill_readers(fifo):
    """Kill (SIGKILL) each process that opens the named pipe ``fifo`` for reading, as the
    kernel kills a worker out of memory; yields the list of killed PIDs."""
    os.mkfifo(fifo)
    stop, killed = threading.Event(), []

    def readers():
        pids = set()
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            with contextlib.suppress(OSError):
                if any(os.readlink(f) == str(fifo) for f in fd_dir.iterdir()):
                    pids.add(int(fd_dir.parent.name))
        return pids - {os.getpid()}

    def wait_for(condition, seconds=10.0):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    def serve():
        while True:
            fd = os.open(fifo, os.O_WRONLY)  # waits for a reader
            try:
                if stop.is_set():
                    return
                wait_for(readers)  # the reader's open completes just after ours
                for pid in readers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                wait_for(lambda: not readers())  # gone, so the next open waits again
            finally:
                os.close(fd)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the waiting open return
        thread.join(timeout=10)
        os.close(fd)


@pytest.mark.slow  # six worker deaths, each followed by a fresh worker: ~20-30 s on 2 CPUs
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the reader in /proc")
def test_a_dying_worker_loses_only_its_own_case(tmp_path, inputs_manifest):
    cfg = load_config("cpu", overrides=CPU)
    phantoms = list_inputs(str(inputs_manifest))[:3]
    fifo = tmp_path / "kills_its_reader.nii.gz"
    dying = CaseInput(str(fifo), "P-dying", case_id_for(str(fifo)))
    inputs = [phantoms[0], dying, *phantoms[1:]]
    assert cases_per_task(len(inputs), workers=1) == 2   # the dying case has a task-mate
    lines = []
    with _kill_readers(fifo) as killed:
        m = run_pipeline(inputs, cfg, str(tmp_path / "out"), workers=1, log=lines.append)
    # Every try of its task of two, then every try of it alone.
    assert len(killed) == 2 * (1 + TASK_RETRIES)
    assert {r["case_id"] for r in m["prepared"]} == {i.case_id for i in phantoms}
    [rejected] = m["rejected"]
    assert rejected["case_id"] == dying.case_id
    assert rejected["reason"].startswith(str(fifo)) and "died" in rejected["reason"]
    assert ("[preprocess] 2 cases lost with dying workers; retrying them one per task"
            in lines)
    assert _progress_counts(lines)[-1] == (4, 4, 1)


@pytest.mark.parametrize("n_cases, workers, expected", [
    (16, 2, 4), (16, 1, 8), (32, 2, 8), (6, 2, 2), (3, 2, 1), (1, 8, 1), (10_000, 64, 8)])
def test_cases_per_task_keeps_every_worker_busy(n_cases, workers, expected):
    assert cases_per_task(n_cases, workers) == expected


def test_progress_is_throttled_to_a_few_lines():
    lines = []
    progress = Progress("[preprocess]", 10_000, lines.append)
    for i in range(10_000):
        progress.add(rejected=i % 1000 == 0)
    progress.finish()
    assert _progress_counts(lines) == [(10_000, 10_000, 10)]   # not one line per case


@pytest.mark.s3
def test_pipeline_on_s3(s3_server, s3_bucket, inputs_manifest, real_ct_paths):
    client = s3_server.client()
    cases = json.loads(inputs_manifest.read_text())["cases"]
    s3_cases = []
    for i, case in enumerate(cases):
        src = case["uri"]
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


def test_training_split_holds_out_calibration_patients_seeded_and_disjoint(tmp_path):
    from dataclasses import replace

    # 60 patients of 1 to 3 cases; 20 % of them are the test split
    records = [{"case_id": f"c{p:02d}-{k}", "patient_id": f"p{p:02d}"}
               for p in range(60) for k in range(1 + p % 3)]
    write_manifest(str(tmp_path), {"prepared": records,
                                   "split": split_by_patient(records, 0.2, seed=0)})
    ds = PreparedDataset(str(tmp_path))
    patient = {r["case_id"]: r["patient_id"] for r in records}
    cfg = load_config("cpu", overrides=["train.calibration_cases=30", "train.seed=5"]).train
    split = training_split(ds, cfg)
    assert split == training_split(ds, cfg)                           # deterministic
    assert split.calibration != training_split(ds, replace(cfg, seed=6)).calibration
    # at least 30 cases, whole patients: one patient fewer would not reach 30
    assert 30 <= len(split.calibration) < 30 + 3
    parts = [split.train, split.validation, split.calibration, ds.split("test")]
    owners = [{patient[c] for c in part} for part in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not owners[i] & owners[j], (i, j)                  # no patient twice
    assert sorted(split.train + split.validation + split.calibration) == ds.split("train")
    assert split.validation and split.train
    # no hold-out: the train/validation split of before; a train split below twice the
    # hold-out: nothing held out
    plain = training_split(ds, replace(cfg, calibration_cases=0))
    before = split_by_patient([r for r in records if r["case_id"] in ds.split("train")],
                              cfg.val_fraction, cfg.seed + 1)
    assert (plain.train, plain.validation, plain.calibration) == (before["train"],
                                                                  before["test"], [])
    n_train = len(ds.split("train"))
    assert not training_split(ds, replace(cfg, calibration_cases=n_train // 2 + 1)).calibration
    assert training_split(ds, replace(cfg, calibration_cases=n_train // 2)).calibration


@pytest.mark.slow
def test_cli_rejects_unknown_config_key(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/preprocess.py", "--output", str(tmp_path),
                           "--set", "drr.sadmm=900"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'drr.sadmm'" in proc.stderr
