"""Faults a multi-day run meets, injected into real processes and real storage: a torn
checkpoint, a full storage, an S3 outage while checkpoints are written. (The node loss and
the tracking-server outage are in test_multinode.py, with the cluster they need.)"""

from __future__ import annotations

import errno
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cvaa import tracking
from cvaa.config import load_config
from cvaa.distributed.checkpoints import (MARKER, CorruptCheckpointError, verify_directory,
                                          write_marker)
from cvaa.distributed.training import StorageError, TrainJob, train

TINY = ["train.batch_size=2", "train.cpus_per_worker=1", "train.figure_every=100"]


def _job(tmp_path, prepared, storage, epochs, name="faulty"):
    cfg = load_config("cpu", overrides=TINY + [f"train.epochs={epochs}"])
    return TrainJob(cfg=cfg, data=prepared, run_name=name, storage=str(storage),
                    mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", register_name="faulty")


def _train(job, lines=None):
    with tracking.open_run(job.mlflow_uri, job.run_name, resume=True) as run:
        return train(job, run, log=(lines.append if lines is not None else None))


def test_checksums_catch_truncation_and_corruption(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x" * 1000)
    (tmp_path / "mlflow_pending").mkdir()
    (tmp_path / "mlflow_pending" / "pending.jsonl").write_text("{}\n")
    write_marker(tmp_path)
    verify_directory(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"x" * 999)
    with pytest.raises(CorruptCheckpointError, match="999 bytes, 1000 were written"):
        verify_directory(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"y" * 1000)
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        verify_directory(tmp_path)
    (tmp_path / MARKER).unlink()
    with pytest.raises(CorruptCheckpointError, match="no COMPLETE.json"):
        verify_directory(tmp_path)


@pytest.mark.ray
def test_a_torn_checkpoint_falls_back_to_the_previous_one(tmp_path, prepared_cpu):
    storage = tmp_path / "ray"
    _train(_job(tmp_path, prepared_cpu, storage, 3))
    latest = storage / "faulty" / "epoch_0003" / "checkpoint.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])          # a crash mid-write

    lines: list[str] = []
    tick = time.monotonic()
    result = _train(_job(tmp_path, prepared_cpu, storage, 5), lines)
    print(f"torn checkpoint: resumed run of 3 epochs took {time.monotonic() - tick:.0f} s; "
          + "; ".join(line for line in lines if not line.startswith("epoch ")))
    assert result.epochs == 5
    assert result.history["resumed_at_epoch"] == [3.0]   # from epoch 2, not 3
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "epoch_0003" in warning and "truncated" in warning
    assert "resumed from the checkpoint of epoch 2" in "\n".join(lines)

    # every checkpoint bad: a clear error at once, not a crash loop through max_failures
    for ckpt in (storage / "faulty").glob("epoch_*/checkpoint.pt"):
        ckpt.write_bytes(b"garbage")
    start = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint"):
        _train(_job(tmp_path, prepared_cpu, storage, 7))
    assert time.monotonic() - start < 240
    print(f"every checkpoint bad: stopped after {time.monotonic() - start:.0f} s")


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs (needs root, as on CI); unmounted at the end."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory: Path) -> Path:
    ballast = directory / "ballast.bin"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


@pytest.mark.ray
def test_a_full_storage_stops_cleanly_and_the_run_resumes_after_space_is_freed(
        tmp_path, prepared_cpu, small_disk):
    storage = small_disk / "ray"
    lines: list[str] = []
    filled = {}

    def log(line):
        lines.append(line)
        if line.startswith("epoch 1/") and not filled:
            filled["ballast"] = _fill(small_disk)

    job = _job(tmp_path, prepared_cpu, storage, 4, name="full")
    with pytest.raises(StorageError) as exc:
        with tracking.open_run(job.mlflow_uri, job.run_name, resume=True) as run:
            train(job, run, log=log)
    message = str(exc.value)
    assert "storage full" in message and "epoch 2" in message and str(storage) in message
    verify_directory(storage / "full" / "epoch_0001")        # the previous one intact

    print(f"storage full: {message}")
    filled["ballast"].unlink()                                # free space, run again
    result = _train(_job(tmp_path, prepared_cpu, storage, 4, name="full"))
    assert result.epochs == 4 and result.history["resumed_at_epoch"] == [2.0]


@pytest.mark.ray
@pytest.mark.s3
def test_an_s3_outage_while_checkpointing_is_waited_out(tmp_path, prepared_cpu):
    """Stop the S3 server as epoch 2 begins and start it again (same port, same data)
    8 s later: rank 0 retries the upload, Ray's controller writes its snapshot through the
    patient filesystem (an S3 error there would end the run), nothing restarts, all epochs
    are checkpointed."""
    from s3server import SeaweedS3, environment_of

    server = SeaweedS3(tmp_path / "s3").start()
    threads: list[threading.Thread] = []
    try:
        with environment_of(server):
            _train_through_an_s3_outage(server, tmp_path, prepared_cpu, threads)
    finally:
        server.stop()


def _train_through_an_s3_outage(server, tmp_path, prepared, threads) -> None:
    server.client().create_bucket(Bucket="ckpt")
    lines: list[str] = []
    errors = []

    def outage():
        try:
            server.stop()
            time.sleep(8)
            server.start()
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    def log(line):
        lines.append(line)
        if line.startswith("epoch 1/") and not threads:
            threads.append(threading.Thread(target=outage, daemon=True))
            threads[0].start()

    job = _job(tmp_path, prepared, "s3://ckpt/ray", 4, name="s3-outage")
    with tracking.open_run(job.mlflow_uri, job.run_name) as run:
        result = train(job, run, log=log)
    threads[0].join(timeout=120)
    assert not errors, errors
    assert result.epochs == 4
    assert "resumed_at_epoch" not in result.history        # no restart was needed
    # Ray's controller wrote its snapshots through the filesystem that waits out outages
    from cvaa.distributed.storage import PatientS3
    assert isinstance(result.checkpoint.filesystem.handler, PatientS3)
    notes = [line for line in lines if line.startswith("note: checkpoint upload")]
    assert any("retrying" in line for line in notes), lines
    print(f"S3 outage: {notes}")
    keys = {o["Key"] for o in server.client().list_objects_v2(
        Bucket="ckpt", Prefix="ray/s3-outage/").get("Contents", [])}
    for epoch in (3, 4):   # checkpoints_to_keep=2: the last two, complete
        assert f"ray/s3-outage/epoch_{epoch:04d}/checkpoint.pt" in keys
        assert f"ray/s3-outage/epoch_{epoch:04d}/{MARKER}" in keys


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_driver_is_resubmitted_into_the_same_run(tmp_path, prepared_cpu):
    """SIGKILL the `ray job submit` driver after its epoch-3 checkpoint; submitting the
    same command again resumes from that checkpoint, in the same MLflow run, which ends
    FINISHED (never left RUNNING)."""
    import mlflow
    import psutil

    from rayhead import local_head, submit

    root = str(Path(__file__).resolve().parents[1])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["python", "jobs/train.py", "--data", prepared_cpu, "--epochs", "5",
            "--run-name", "killed-driver", "--storage", str(tmp_path / "ray"),
            "--mlflow-uri", uri, "--register-name", "killed",
            "--set", "train.cpus_per_worker=0.5", "--set", "train.batch_size=2"]
    with local_head() as address:
        first = submit(address, args, working_dir=root, wait=False, submission_id="first")
        assert first.returncode == 0, first.stderr[-2000:]
        # once epoch 3 is on disk, the report of epoch 2 has surely been registered
        marker = tmp_path / "ray" / "killed-driver" / "epoch_0003" / MARKER
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert time.monotonic() < deadline, "no epoch-3 checkpoint within 300 s"
            time.sleep(0.5)
        drivers = [p for p in psutil.process_iter(["cmdline"])
                   if "jobs/train.py" in " ".join(p.info["cmdline"] or [])
                   and "killed-driver" in " ".join(p.info["cmdline"] or [])
                   and "ray" not in (p.info["cmdline"] or [""])[0].rsplit("/", 1)[-1]]
        assert drivers, "the driver process was not found"
        killed_at = time.monotonic()
        for p in drivers:
            p.kill()
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("cvaa").experiment_id],
                                  "tags.`mlflow.runName` = 'killed-driver'")
        assert [r.info.status for r in runs] == ["RUNNING"]   # what the dead driver left

        second = submit(address, args, working_dir=root, submission_id="second")
        recovered = time.monotonic() - killed_at
    out = second.stdout
    assert second.returncode == 0, out[-4000:] + second.stderr[-2000:]
    assert f"resumed ({runs[0].info.run_id}" in out            # the same MLflow run
    assert re.search(r"resumed from the checkpoint of epoch [23]", out), out[-3000:]
    assert "epoch 5/5" in out and "epoch 1/5" not in out
    runs = client.search_runs([client.get_experiment_by_name("cvaa").experiment_id],
                              "tags.`mlflow.runName` = 'killed-driver'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss_g")})
    assert steps == [1, 2, 3, 4, 5]
    print(f"killed driver: resubmitted run finished {recovered:.0f} s after the kill")


@pytest.mark.s3
def test_an_s3_outage_while_training_data_is_read_is_waited_out(tmp_path, prepared_cpu):
    """Stop the S3 server holding the prepared cases after the first batch and start it
    again 8 s later: the training stream waits the outage out (the reads fail with
    ``StorageUnavailableError`` through boto3's retries, then are retried) and delivers
    every case in order, instead of failing the worker into a restart loop."""
    from s3server import SeaweedS3, environment_of

    from cvaa.data.dataset import PreparedDataset
    from cvaa.data.stream import CaseStream, chunks

    server = SeaweedS3(tmp_path / "s3").start()
    threads: list[threading.Thread] = []
    try:
        with environment_of(server):
            client = server.client()
            client.create_bucket(Bucket="data")
            for f in Path(prepared_cpu).rglob("*"):
                if f.is_file():
                    key = f"prepared/{f.relative_to(prepared_cpu).as_posix()}"
                    client.upload_file(str(f), "data", key)
            dataset = PreparedDataset("s3://data/prepared")
            ids = sorted(dataset.records)
            said: list[str] = []
            stream = CaseStream(dataset.arrays, prefetch=1, threads=1, retry_s=120,
                                on_retry=said.append)
            got, tick = [], time.monotonic()
            for batch in stream.iterate(chunks(ids, 1)):
                got.extend(batch.case_ids)
                if not threads:
                    server.stop()
                    threads.append(threading.Thread(
                        target=lambda: (time.sleep(8), server.start()), daemon=True))
                    threads[0].start()
            threads[0].join(timeout=120)
            print(f"S3 outage while reading: {len(ids)} cases in {time.monotonic() - tick:.0f} s, "
                  f"{stream.stats.retried_seconds:.0f} s spent waiting; {said}")
            assert got == ids
            assert stream.stats.retried_seconds > 0
            # no answer, or a 5xx from a server shutting down or starting: both an outage
            assert ("S3 endpoint unreachable" in said[0] or "S3 server error" in said[0]) \
                and "retrying" in said[0], said
            assert "after waiting" in said[-1], said
    finally:
        server.stop()
