"""bench/robustness.py: the independent renderer agrees with ours in geometry, and the
benchmark scores registered models under every perturbation and writes its tables."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cvaa.config import load_config
from cvaa.data.augment import RenderParams, context_of, render_context
from cvaa.data.io import read_ct
from cvaa.data.preprocess import prepare_ct

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import robustness  # noqa: E402


def test_plastimatch_renders_the_same_geometry_with_its_own_physics(real_ct_paths):
    pytest.importorskip("plastimatch")
    cfg = load_config("cpu")
    prep = prepare_ct(read_ct(real_ct_paths["abdomen"]), cfg.preprocess)
    context = context_of(prep, cfg.preprocess.context_margin_mm)
    ours = render_context(context, cfg.drr, RenderParams())
    theirs = robustness.Plastimatch(cfg).render(context)
    assert theirs.shape == ours.shape
    for view in range(2):
        corr = np.corrcoef(ours[view].ravel(), theirs[view].ravel())[0, 1]
        assert corr > 0.98, (view, corr)
        # flipped, it would not match: the orientation is checked, not assumed
        assert np.corrcoef(ours[view].ravel(), theirs[view][:, ::-1].ravel())[0, 1] < corr
    print(f"plastimatch vs ours, real lumbar CT at the cpu preset: mean |diff| "
          f"{np.abs(ours - theirs).mean():.4f} (images in [0, 1])")


def test_the_benchmark_scores_every_perturbation(prepared_cpu, tmp_path):
    from tiny_models import register_tiny_models

    uri, models = register_tiny_models(tmp_path, names=("cvaa",))
    out = tmp_path / "rob"
    args = ["--data", prepared_cpu, "--extra-data", prepared_cpu, "--mlflow-uri", uri,
            "--model", f"a={models['cvaa']}", "--model", f"b={models['cvaa']}",
            "--out", str(out)]
    if shutil.which("plastimatch") is None:
        args.append("--no-plastimatch")
    assert robustness.main(args) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    summary = result["summary"]["test split"]
    expected = {f"{f}@{s:g}" for f, (_, strengths, _) in robustness.SUITE.items()
                for s in strengths} | {"clean@0"}
    assert expected <= set(summary)
    assert summary["clean@0"]["a"]["d_psnr"] == 0.0
    # the same model under two labels: the same numbers; a perturbation changes them
    for setting, per_model in summary.items():
        assert per_model["a"]["psnr"] == pytest.approx(per_model["b"]["psnr"])
        assert np.isfinite(per_model["a"]["psnr"])
    assert summary["rotation@10"]["a"]["psnr"] != summary["clean@0"]["a"]["psnr"]
    n_test = len(result["per_case"]["test split"]["clean@0"]["a"])
    assert n_test == len(json.loads(Path(prepared_cpu, "manifest.json").read_text())
                         ["split"]["test"])
    assert "real CTs" in result["summary"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| rotation 5 |" in out.with_suffix(".md").read_text()
