"""The run's Ray storage on S3 waits out an outage (a real SeaweedFS server, stopped and
started again by PID): what Ray Train's controller writes through it cannot end a run."""

import pickle
import threading
import time

import pytest
from pyarrow import fs as pafs

from cvaa.distributed.storage import (PatientS3, is_transient, ray_storage, s3_options,
                                      storage_filesystem, unwrap)


def test_outage_errors_are_transient_and_the_others_are_not():
    assert is_transient(OSError("When initiating multiple part upload for key 'k' in bucket "
                                "'b': AWS Error INTERNAL_FAILURE during CreateMultipartUpload "
                                "operation: We encountered an internal error"))
    assert is_transient(OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: "
                                "curlCode: 7, Could not connect to server"))
    assert is_transient(OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation"))
    assert not is_transient(OSError("AWS Error NO_SUCH_BUCKET during HeadBucket operation"))
    assert not is_transient(FileNotFoundError("Path does not exist 'b/k'. curlCode"))
    assert not is_transient(ValueError("AWS Error NETWORK_CONNECTION"))


def test_local_storage_keeps_rays_default_and_s3_gets_the_patient_filesystem(monkeypatch):
    assert storage_filesystem("/data/ray_results") is None
    assert ray_storage("/data/ray_results") == ("/data/ray_results", None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert s3_options("s3://ckpt/ray") == {
        "endpoint_override": "127.0.0.1:8333", "scheme": "http", "region": "us-east-1",
        "access_key": "id", "secret_key": "secret", "session_token": None}
    path, fs = ray_storage("s3://ckpt/ray", retry_s=42)
    assert path == "ckpt/ray" and isinstance(fs.handler, PatientS3)
    assert isinstance(unwrap(fs), pafs.S3FileSystem)
    # what Ray's controller gets: the same options and deadline, after pickling
    again = pickle.loads(pickle.dumps(fs))
    assert again.handler.retry_s == 42 and again.handler.options == fs.handler.options


@pytest.fixture
def stopped_and_restarted(tmp_path):
    """A private SeaweedFS server (bucket ``ckpt``) with ``outage(seconds)``: stop it now,
    start it again (same port, same data) after ``seconds`` in a thread (``None``: never)."""
    from s3server import SeaweedS3, environment_of

    server = SeaweedS3(tmp_path / "s3").start()
    threads: list[threading.Thread] = []

    def outage(seconds: float | None):
        server.stop()
        if seconds is None:
            return

        def back():
            time.sleep(seconds)
            server.start()

        threads.append(threading.Thread(target=back, daemon=True))
        threads[-1].start()

    try:
        with environment_of(server):
            server.client().create_bucket(Bucket="ckpt")
            yield server, outage
    finally:
        for t in threads:
            t.join(timeout=90)
        server.stop()


@pytest.mark.s3
def test_writes_and_reads_wait_for_a_restarted_s3_server(stopped_and_restarted, capsys):
    server, outage = stopped_and_restarted
    fs = storage_filesystem("s3://ckpt/ray", retry_s=120)
    with fs.open_output_stream("ckpt/ray/before.json") as f:
        f.write(b'{"epoch": 1}')

    outage(6)
    start = time.monotonic()
    # what Ray's controller does after every report: write its snapshot
    with fs.open_output_stream("ckpt/ray/checkpoint_manager_snapshot.json") as f:
        f.write(b'{"epoch": 2}')
    waited = time.monotonic() - start
    with fs.open_input_stream("ckpt/ray/before.json") as f:
        assert f.read() == b'{"epoch": 1}'
    body = server.client().get_object(Bucket="ckpt",
                                      Key="ray/checkpoint_manager_snapshot.json")["Body"]
    assert body.read() == b'{"epoch": 2}'
    out = capsys.readouterr().out
    assert waited > 3 and "retrying in" in out and "succeeded on attempt" in out, out
    print(f"S3 outage of 6 s waited out in {waited:.1f} s:\n{out}")


@pytest.mark.s3
def test_an_outage_longer_than_the_deadline_and_a_permanent_error_are_raised(
        stopped_and_restarted):
    server, outage = stopped_and_restarted
    fs = storage_filesystem("s3://ckpt/ray", retry_s=3)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="ckpt/ray/missing"):    # not retried
        fs.open_input_stream("ckpt/ray/missing")
    assert time.monotonic() - start < 3

    outage(None)   # down for good: the write gives up at the deadline, not before or long after
    start = time.monotonic()
    with pytest.raises(OSError, match=r"write ckpt/ray/late\.json: storage still "
                                      r"unreachable after \d+ attempts in \d+ s"):
        with fs.open_output_stream("ckpt/ray/late.json") as f:
            f.write(b"x")
    assert 3 <= time.monotonic() - start < 20


@pytest.mark.s3
def test_two_loaders_of_one_s3_checkpoint_never_share_its_files(s3_bucket, tmp_path):
    """What two evaluation actors (or two restored workers) on one node do at once. Ray's
    ``as_directory()`` gives both the same directory and downloads again into it when the
    second arrives, rewriting the file the first is reading: a torn ``checkpoint.pt``."""
    from ray.train import Checkpoint

    from cvaa.distributed.checkpoints import local_checkpoint, verify_directory, write_marker

    source = tmp_path / "epoch_0001"
    source.mkdir()
    (source / "checkpoint.pt").write_bytes(bytes(range(256)) * 4096)   # 1 MiB
    write_marker(source)
    fs = storage_filesystem(f"s3://{s3_bucket}/ray")
    pafs.copy_files(str(source), f"{s3_bucket}/ray/epoch_0001", destination_filesystem=fs)
    checkpoint = Checkpoint(f"{s3_bucket}/ray/epoch_0001", fs)

    with local_checkpoint(checkpoint) as first:
        weights = first / "checkpoint.pt"
        before = weights.stat()
        with local_checkpoint(pickle.loads(pickle.dumps(checkpoint))) as second:
            assert second != first
            verify_directory(second)
        after = weights.stat()
        # the first loader's file was not rewritten under it, and is still whole
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        verify_directory(first)
        assert not second.exists()
    assert not first.exists()

    # a local checkpoint is read where it is, never copied or deleted
    with local_checkpoint(Checkpoint.from_directory(str(source))) as here:
        assert here == source
    assert (source / "checkpoint.pt").exists()
