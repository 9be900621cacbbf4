"""cvaa/distributed/cluster.py: starting Ray with a quiet console."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvaa.distributed.cluster import _LOG_LEVEL_NOTICE, _without_log_level_notice

ROOT = Path(__file__).resolve().parents[1]


def test_only_rays_log_level_notice_is_dropped_from_stderr(capfd):
    with _without_log_level_notice():
        os.write(2, f"[2026-12-07 I 1 1] logging.cc:303: {_LOG_LEVEL_NOTICE} to 3\n".encode())
        os.write(2, b"a real error from the C++ core\n")
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert err == "a real error from the C++ core\nafter\n"


@pytest.mark.ray
def test_a_job_starting_ray_prints_nothing_of_rays_own():
    """A fresh process that starts a local Ray as every job does: Ray's C++ logger
    announces RAY_BACKEND_LOG_LEVEL on fd 2 (tried without the filter: it does), and
    nothing of it reaches the console."""
    code = ("import os, ray\n"
            "from cvaa.distributed.cluster import init_ray\n"
            "init_ray(num_cpus=1)\n"
            "os.write(2, b'the job\\'s own line\\n')\n"
            "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_BACKEND_LOG_LEVEL",
                                                             "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "the job's own line\n", out.stderr
    assert out.stdout == ""
