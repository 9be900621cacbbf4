"""A Ray head started as users start one (``ray start --head --block``), for tests that
submit jobs to it; stopped by PID (its process group)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc, grace_s: float = 30) -> None:
    """SIGTERM the process group (`ray start --block` stops its cluster), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a Ray command (the venv's ``ray`` first), plus ``extra``."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def local_head(num_cpus: int = 2, env: dict[str, str] | None = None,
               port: int | None = None, temp_dir: str | None = None) -> Iterator[str]:
    """A head with a dashboard; yields the dashboard address for ``ray job submit``.

    ``env``: added to the head's environment and the readiness probe's, as a cluster's
    nodes and users set them (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH``: a head
    with token authentication). ``port``: its GCS port (``ray.init(address=
    "127.0.0.1:PORT")``; default: a free one). ``temp_dir``: its session files and logs
    (kept; default: a new directory, removed at the end).
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = ray_env(env)
    port, dash = port or free_port(), free_port()
    # unix sockets: paths < 108 bytes
    short_tmp = temp_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}",
         f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats",
         # The session's own local cluster holds Ray's default agent ports.
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--temp-dir={short_tmp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 90
        while True:
            probe = subprocess.run([ray_bin, "job", "list", "--address", address],
                                   env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None:
                raise RuntimeError(head.stdout.read().decode()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(probe.stderr[-2000:])
            time.sleep(2)
        yield address
    finally:
        stop_group(head)
        if temp_dir is None:
            shutil.rmtree(short_tmp, ignore_errors=True)


def submit(address: str, args: list[str], *, working_dir: str, wait: bool = True,
           submission_id: str | None = None, timeout: float = 600,
           env: dict[str, str] | None = None):
    """``ray job submit`` (retried while the job agent is still coming up); ``env`` is
    added to its environment (the token of an authenticated head)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "job", "submit", "--address", address, "--working-dir", working_dir]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", *args]
    for _ in range(20):   # the job agent comes up a little after the dashboard
        proc = subprocess.run(cmd, env=ray_env(env), capture_output=True, text=True,
                              timeout=timeout)
        if "No available agent" not in proc.stderr:
            return proc
        time.sleep(3)
    return proc
