"""bench/gpu_check.py in its CPU smoke mode: it runs and writes a report with real numbers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "perf.md"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", "--models", "cvaa",
           "--batches", "1", "--checkpoint", "off", "--steps", "1", "--repeats", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Performance check")
    for field in ("- device: cpu", "- torch ", "- date: ", "- command: `python bench/gpu_check.py"):
        assert field in text, f"header lacks {field!r}:\n{text}"
    # | cvaa | 1 | fp32 | off | ms/step | peak GB | GFLOP/step | GFLOP/s | of peak | note |
    row = re.search(r"^\| cvaa \| 1 \| fp32 \| off \| ([^|]+) \| [^|]+ \| ([^|]+) \|",
                    text, re.MULTILINE)
    assert row, f"no cvaa batch-1 row:\n{text}"
    step_ms, gflop = float(row.group(1)), float(row.group(2))
    assert step_ms > 0 and gflop > 0
    assert re.search(r"^\| DRR PA \+ lateral, 32\^3 -> 2 x 32\^2 \| fp32 \| [\d.]+ \|$", text,
                     re.MULTILINE), text
