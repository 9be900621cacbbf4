"""bench/gpu_check.py in its CPU smoke mode: it runs and writes a report with real numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    out_dir = tmp_path / "OUT"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--models", "cvaa",
           "--batches", "1", "--checkpoint", "off", "--steps", "1", "--repeats", "1",
           "--compile", "none", "--profile", str(tmp_path / "profiles"),
           "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "CVAA_COMMIT": "abc123def456"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out_dir / "performance_gpu.md").read_text()
    assert text.startswith("# Performance check")
    for field in ("- device: cpu", "- commit: abc123def456", "- torch ", "- date: ",
                  "- command: `python bench/gpu_check.py"):
        assert field in text, f"header lacks {field!r}:\n{text}"
    assert re.search(r"one-time costs, not charged to any cell: device start [\d.]+ s", text)
    # Each row reached the folder as it was measured: the run line, DRR, the forward, the
    # step cell, in that order.
    rows = [json.loads(line) for line in (out_dir / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["run", "inference", "inference", "step"], rows
    assert rows[0]["commit"] == "abc123def456" and rows[-1]["step_s"] > 0
    assert rows[-1]["elapsed_s"] >= rows[1]["elapsed_s"]
    # | cvaa | 1 | fp32 | off | compile | layout | cudnn.benchmark | warm-up s | ms/step
    # | GPU busy | peak GB | GFLOP/step | GFLOP/s | of peak | note |
    row = re.search(r"^\| cvaa \| 1 \| fp32 \| off \| none \| - \| - \| ([^|]+) \| ([^|]+) \| "
                    r"- \| [^|]+ \| ([^|]+) \|", text, re.MULTILINE)
    assert row, f"no cvaa batch-1 row:\n{text}"
    warmup_s, step_ms, gflop = (float(row.group(i)) for i in (1, 2, 3))
    assert warmup_s > 0 and step_ms > 0 and gflop > 0
    # --profile: the cell's top ops (CPU here: no kernels, so no GPU-busy fraction)
    (table,) = (tmp_path / "profiles").glob("cvaa_b1_fp32_ckpt-off_none_-.txt")
    assert "Self CPU" in table.read_text() and "aten::" in table.read_text()
    assert re.search(r"^\| DRR PA \+ lateral, 32\^3 -> 2 x 32\^2 \| fp32 \| [\d.]+ \|$", text,
                     re.MULTILINE), text


def test_layer_bench_times_every_layer_and_marks_the_reformulated_ones():
    cmd = [sys.executable, str(ROOT / "bench" / "layer_bench.py"), "--preset", "cpu",
           "--set", "preprocess.size=16", "drr.detector_pixels=16", "--models", "D",
           "--batch", "1", "--repeats", "1", "--warmup", "0",
           "--layout", "contiguous", "channels_last"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # D's first conv: volume (1 channel) + two 4-channel expansions -> 8, padded on CUDA.
    row = re.search(r"^\| `net\.0\.conv` \| ConcatConv3d \| 1x1x16x16x16 \+ 1x4x16x16x16 \+ "
                    r"1x4x16x16x16 \| 1\+4\+4->8 \| k4 s2 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                    r"([\d.]+) \| ([\d.]+) \| \*\*\(CUDA\) C_in 1->8, C_in 4->8, C_in 4->8\*\* \|$",
                    proc.stdout, re.MULTILINE)
    assert row, proc.stdout
    assert all(float(v) > 0 for v in row.groups()[:4])
    # Every conv and norm of D is timed: 4 PatchGAN convs + 2 norms + 2 x (2 convs + 1 norm).
    assert re.search(r"^12 layer calls", proc.stdout, re.MULTILINE), proc.stdout


def test_gpu_check_estimates_a_cell_from_its_own_costs():
    """A cell's estimate is its compile mode's warm-up plus its own per-step time (scaled
    by the batch), never the previous cell's total (which carried one-time costs)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    est = gpu_check.Estimator(compile_guess_s=120.0)
    bf16 = ("bf16", "off", "-", "-")
    assert est.cost("cvaa", bf16, "none", 1, steps=5) is None          # nothing seen: run it
    # a compile mode never measured is charged the guess, not nothing
    assert est.cost("cvaa", bf16, "default", 1, steps=5) == pytest.approx(120.0)
    est.record("cvaa", bf16, "none", 1, warmup_s=3.0, step_s=0.2)
    assert est.cost("cvaa", bf16, "none", 4, steps=5) == pytest.approx(3.0 + 6 * 0.8)
    assert est.cost("cvaa", bf16, "default", 4, steps=5) == pytest.approx(120.0 + 6 * 0.8)
    est.record("x2ct", bf16, "default", 1, warmup_s=90.0, step_s=0.1)
    # cvaa compiled: the compile warm-up seen (x2ct's) + cvaa's own eager step time
    assert est.cost("cvaa", bf16, "default", 1, steps=5) == pytest.approx(90.0 + 6 * 0.2)
    est.record("cvaa", bf16, "default", 1, warmup_s=150.0, step_s=0.1)
    assert est.cost("cvaa", bf16, "default", 4, steps=5) == pytest.approx(150.0 + 6 * 0.4)


def test_gpu_check_ends_a_cell_whose_warm_up_outlasts_the_budget():
    """A compilation longer than the budget left ends its cell (``CellTimeout``), not
    the run: the command always returns with what it measured."""
    import time as clock
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    start = clock.perf_counter()
    with pytest.raises(gpu_check.CellTimeout, match="time budget"):
        with gpu_check.deadline(1.0):
            clock.sleep(30)
    assert clock.perf_counter() - start < 10
    with gpu_check.deadline(5.0):     # a cell inside its time: nothing raised
        pass


def test_the_gpu_command_always_returns_and_says_what_each_stage_did(tmp_path):
    """scripts/gpu_run.sh on a machine without a GPU: the GPU tests skip, gpu_check and
    ddp_check cannot run; it still returns, with a line per stage in OUT/gpu_run.log and
    the count of stages that did not pass as its exit status."""
    out = tmp_path / "OUT"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_run.sh"), str(out),
                           str(tmp_path / "no-wheels")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable,
                               "CVAA_COMMIT": "abc123", "TMPDIR": str(tmp_path)})
    log = (out / "gpu_run.log").read_text()
    assert "[gpu_run] commit abc123" in log
    assert "install wheels: no wheels in" in log
    assert "[gpu_run] GPU tests: passed" in log                  # every one skips here
    assert "[gpu_run] gpu_check: failed (exit 2)" in log        # no CUDA device
    assert "[gpu_run] ddp_check: failed (exit 2)" in log
    assert re.search(r"\[gpu_run\] done in \d+ s; 2 stage\(s\) did not pass", log), log
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert (out / "gpu_tests.xml").exists()
