"""A real MLflow tracking server for tests: ``mlflow server`` over HTTP, its runs and
registry in sqlite, its artifacts proxied to an S3 bucket (``--artifacts-destination``).

Started on a free loopback port in its own process group, stopped by PID (SIGTERM to the
group, then SIGKILL if it lingers). Clients need only the ``http://`` URI: the server
holds the S3 credentials (``MLFLOW_S3_ENDPOINT_URL`` + ``AWS_*`` in its environment).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, workdir: str | os.PathLike, artifacts: str,
                 env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.artifacts, self.extra_env = artifacts, dict(env or {})
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> "MlflowServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.extra_env}
        if "AWS_ENDPOINT_URL" in env:
            env.setdefault("MLFLOW_S3_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = open(self.workdir / "mlflow-server.log", "ab")  # a restart appends
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: "
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        path = self.workdir / "mlflow-server.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self, grace_s: float = 10.0) -> None:
        # The process this call stops, held apart: a start() that runs meanwhile (another
        # thread) replaces self.proc, and its new server must not get this one's SIGKILL.
        proc, log = self.proc, self.log
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
