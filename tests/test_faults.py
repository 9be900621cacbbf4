"""Faults a multi-day run meets, injected into real processes and real storage: a torn
checkpoint, a full storage, an S3 outage while checkpoints are written. (The node loss and
the tracking-server outage are in test_multinode.py, with the cluster they need.)"""

from __future__ import annotations

import errno
import os
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
    result = _train(_job(tmp_path, prepared_cpu, storage, 5), lines)
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

    filled["ballast"].unlink()                                # free space, run again
    result = _train(_job(tmp_path, prepared_cpu, storage, 4, name="full"))
    assert result.epochs == 4 and result.history["resumed_at_epoch"] == [2.0]


@pytest.mark.ray
@pytest.mark.s3
def test_an_s3_outage_while_checkpointing_is_waited_out(tmp_path, prepared_cpu):
    """Stop the S3 server as epoch 2 begins and start it again (same port, same data)
    8 s later: rank 0 retries the upload, nothing restarts, all epochs are checkpointed."""
    from s3server import SeaweedS3

    server = SeaweedS3(tmp_path / "s3").start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    threads = []
    try:
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

        job = _job(tmp_path, prepared_cpu, "s3://ckpt/ray", 4, name="s3-outage")
        with tracking.open_run(job.mlflow_uri, job.run_name) as run:
            result = train(job, run, log=log)
        threads[0].join(timeout=120)
        assert not errors, errors
        assert result.epochs == 4
        assert "resumed_at_epoch" not in result.history        # no restart was needed
        assert any(line.startswith("note: checkpoint upload") and "retrying" in line
                   for line in lines), lines
        keys = {o["Key"] for o in server.client().list_objects_v2(
            Bucket="ckpt", Prefix="ray/s3-outage/").get("Contents", [])}
        for epoch in (3, 4):   # checkpoints_to_keep=2: the last two, complete
            assert f"ray/s3-outage/epoch_{epoch:04d}/checkpoint.pt" in keys
            assert f"ray/s3-outage/epoch_{epoch:04d}/{MARKER}" in keys
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
