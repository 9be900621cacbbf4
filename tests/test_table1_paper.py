"""bench/table1_paper.py end to end at a tiny size, with Ray and MLflow unimportable: results
per (seed, model), the report, finished work skipped, an interrupted model resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The runner as a GPU lease has it: any import of Ray or MLflow fails.
WITHOUT_RAY_OR_MLFLOW = ("import runpy, sys\n"
                         "for name in ('ray', 'mlflow'):\n"
                         "    sys.modules[name] = None\n"
                         "sys.argv[0] = 'bench/table1_paper.py'\n"
                         "runpy.run_path('bench/table1_paper.py', run_name='__main__')\n")


def _command(tmp: Path, *models: str, steps: int) -> list[str]:
    return [sys.executable, "-c", WITHOUT_RAY_OR_MLFLOW, "--preset", "cpu", "--n", "4",
            "--test-cases", "2", "--steps", str(steps), "--models", *models,
            "--real", "none", "--processes", "2", "--device", "cpu",
            "--workdir", str(tmp / "work"), "--docs", str(tmp / "docs"),
            "--set", "train.io_threads=1", "--set", "train.prefetch_batches=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_results_report_skip_and_resume(tmp_path):
    # 1. PSR trains 3 steps (1 training case, batch 4: one step an epoch) and is written.
    first = subprocess.run(_command(tmp_path, "psr", steps=3), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    result_file = tmp_path / "docs" / "results" / "paper-seed-0.json"
    seed = json.loads(result_file.read_text())
    psr = seed["models"]["PSR"]
    assert seed["test_cases"] == 2 and seed["steps"] == 3 and psr["steps"] == 3
    assert len(psr["test"]) == 2 and all(-1 <= c["ssim"] <= 1 for c in psr["test"].values())
    assert psr["curve"]["step"] == [1, 2, 3] and len(psr["curve"]["val_psnr"]) == 3
    assert psr["device"] and psr["commit"] and "table1_paper.py" in psr["command"]
    report = (tmp_path / "docs" / "results-paper.md").read_text()
    assert "| PSR | 1 |" in report and "3 optimizer steps" in report

    # 2. 3DCNN, stopped (like a lease that ends) after its first checkpoint.
    ckpt = tmp_path / "work" / "seed-0" / "ckpt-3dcnn"
    proc = subprocess.Popen(_command(tmp_path, "psr", "3dcnn", steps=3), cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    while not (ckpt / "epoch_0001").is_dir():
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint of 3DCNN within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate()[0]
    assert "3DCNN, 3 epochs" in out
    assert "3DCNN" not in json.loads(result_file.read_text())["models"]

    # 3. Again: PSR is not trained again, 3DCNN resumes and is written.
    third = subprocess.run(_command(tmp_path, "psr", "3dcnn", steps=3), cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "PSR" not in [ln.split(": ")[1].split(",")[0] for ln in third.stdout.splitlines()
                         if ln.startswith("[table1-paper] seed 0: ") and "epochs x" in ln]
    assert "resumed from the checkpoint of epoch" in third.stdout
    seed = json.loads(result_file.read_text())
    assert seed["models"]["PSR"] == psr                     # untouched
    cnn = seed["models"]["3DCNN"]
    assert cnn["steps"] == 3 and cnn["resumed_at_epoch"] and cnn["resumed_at_epoch"][0] >= 2
    assert len(cnn["test"]) == 2
    assert "| 3DCNN | 1 |" in (tmp_path / "docs" / "results-paper.md").read_text()


def test_another_protocol_in_the_seed_file_is_refused(tmp_path):
    docs = tmp_path / "docs" / "results"
    docs.mkdir(parents=True)
    (docs / "paper-seed-0.json").write_text(json.dumps(
        {"seed": 0, "preset": "cpu", "n_phantoms": 4, "test_cases": 2, "steps": 2, "lr": 1e-3,
         "overrides": ["train.io_threads=1", "train.prefetch_batches=1"],
         "models": {"PSR": {}}}))
    out = subprocess.run(_command(tmp_path, "3dcnn", steps=3), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "steps: 2 there, 3 now" in out.stderr
