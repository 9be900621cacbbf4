"""A real MLflow tracking server for tests: ``mlflow server`` over HTTP, its runs and
registry in sqlite, its artifacts proxied to an S3 bucket (``--artifacts-destination``).

Started on a free loopback port in its own process group, stopped by PID (SIGTERM to the
group, then SIGKILL if it lingers). Clients need only the ``http://`` URI: the server
holds the S3 credentials (``MLFLOW_S3_ENDPOINT_URL`` + ``AWS_*`` in its environment).

With ``admin_password`` it runs MLflow's own authentication (``--app-name basic-auth``, users
and permissions in a second sqlite file): every request then needs
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (:func:`credentials`), and
:meth:`MlflowServer.add_user` creates accounts as the admin.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ADMIN = "admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, workdir: str | os.PathLike, artifacts: str,
                 env: dict[str, str] | None = None, *, admin_password: str | None = None):
        self.workdir = Path(workdir)
        self.artifacts, self.extra_env = artifacts, dict(env or {})
        self.admin_password = admin_password
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
        if self.admin_password is not None:
            cmd += ["--app-name", "basic-auth"]
            env.update(self._auth_env())
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

    def _auth_env(self) -> dict[str, str]:
        """The auth app's settings: a new account may do nothing until it is granted
        something (``NO_PERMISSIONS``); the admin is created with ``admin_password``."""
        ini = self.workdir / "basic_auth.ini"
        ini.write_text("[mlflow]\n"
                       "default_permission = NO_PERMISSIONS\n"
                       f"database_uri = sqlite:///{self.workdir / 'basic_auth.db'}\n"
                       f"admin_username = {ADMIN}\n"
                       "authorization_function = "
                       "mlflow.server.auth:authenticate_request_basic_auth\n"
                       # a verified password is not hashed again for a while (scrypt per
                       # request costs seconds on a loaded test machine)
                       "auth_cache_ttl_seconds = 300\n")
        key = self.workdir / "flask_secret_key"   # the same across a restart
        if not key.exists():
            key.write_text(secrets.token_hex(16))
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
                # MLflow's own job runner (huey workers): cvaa runs none, the CPU is the tests'
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": key.read_text()}

    def add_user(self, username: str, password: str,
                 grants: dict[tuple[str, str], str] | None = None) -> None:
        """Create ``username`` (as the admin) and grant it ``{(resource_type, resource_id):
        permission}``, e.g. ``{("experiment", "1"): "EDIT"}``."""
        from mlflow.server import get_app_client

        with credentials(ADMIN, self.admin_password):
            auth = get_app_client("basic-auth", tracking_uri=self.uri)
            auth.create_user(username, password)
            for (kind, resource), permission in (grants or {}).items():
                auth.grant_user_permission(username, kind, resource, permission)

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


@contextlib.contextmanager
def credentials(username: str | None, password: str | None) -> Iterator[None]:
    """MLflow's client reads its credentials from the environment: these for the block
    (``None``: none at all), then the previous ones again."""
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    saved = {k: os.environ.pop(k, None) for k in names}
    if username is not None:
        os.environ.update(MLFLOW_TRACKING_USERNAME=username, MLFLOW_TRACKING_PASSWORD=password)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
