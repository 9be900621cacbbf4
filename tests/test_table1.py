"""bench/reproduce_table1.py's statistics and report: intervals over seeds, paired
bootstrap differences pooled over seeds, and results.md rebuilt from seed files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import reproduce_table1 as table1  # noqa: E402


def test_t_interval_matches_the_t_distribution():
    mean, half = table1.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)   # t(0.975, 2) * sd / sqrt(n)
    assert np.isnan(table1.t_interval([5.0])[1])


def test_paired_bootstrap_pools_seeds_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    groups = [rng.normal(1.0, 0.5, 40), rng.normal(1.0, 0.5, 30)]
    mean, low, high, n = table1.paired_bootstrap(groups)
    assert n == 70 and low < mean < high
    assert mean == pytest.approx(np.concatenate(groups).mean())
    assert 0.8 < low and high < 1.2            # ~ +- 1.96 * 0.5 / sqrt(70) = 0.12
    assert table1.paired_bootstrap([[0.3] * 5, [0.3] * 4])[:3] == pytest.approx((0.3,) * 3)
    # an effect that is all noise straddles zero
    _, low, high, _ = table1.paired_bootstrap([rng.normal(0.0, 1.0, 50)])
    assert low < 0 < high


def _cases(psnr: float, n: int, rng, prefix: str = "ct") -> dict:
    return {f"{prefix}-{i}": {"psnr": psnr + float(rng.normal(0, 0.1)), "ssim": 0.7,
                          "psnr_x2ct": psnr + 5, "ssim_x2ct": 0.75} for i in range(n)}


def test_the_report_is_rebuilt_from_whichever_seeds_exist(tmp_path):
    rng = np.random.default_rng(1)
    seed_dir = tmp_path / "results"
    seed_dir.mkdir()
    out = tmp_path / "results.md"
    assert "No seed has been run yet" in table1.write_report(seed_dir, out)
    for seed in range(3):
        ph = f"phantom-seed{seed}"     # each seed draws its own phantoms; the real CTs recur
        models = {"CVAA-GAN": {"test": _cases(30.0, 8, rng, ph), "real": _cases(22.0, 3, rng)},
                  "X2CT-GAN": {"test": _cases(29.0, 8, rng, ph), "real": _cases(22.5, 3, rng)}}
        if seed == 0:
            models["3DCNN"] = {"test": _cases(27.0, 8, rng, ph),
                               "real": _cases(21.0, 3, rng)}
        (seed_dir / f"seed-{seed}.json").write_text(json.dumps({
            "seed": seed, "n_phantoms": 40, "epochs": 1, "lr": 1e-3, "threads": 2,
            "machine": "test", "train_cases": 32, "test_cases": 8, "models": models,
            "mean_volume": {"test": _cases(20.0, 8, rng, ph), "real": _cases(18.0, 3, rng)}}))
    text = table1.write_report(seed_dir, out)
    assert out.read_text() == text
    assert "3 seed file(s): CVAA-GAN 3, X2CT-GAN 3, 3DCNN 1" in text
    row = next(line for line in text.splitlines() if line.startswith("| CVAA-GAN | 3 |"))
    assert "30.0" in row and "±" in row
    assert next(line for line in text.splitlines()
                if line.startswith("| 3DCNN | 1 |")).count("±") == 0   # one seed: no interval
    pair = next(line for line in text.splitlines() if line.startswith("| CVAA-GAN − X2CT-GAN"))
    assert "| 3 | 24 | +1.0" in pair
    assert "CVAA-GAN beats X2CT-GAN" in text
    assert "With 3 seeds this is not yet a verdict" in text
    per_seed = next(line for line in text.splitlines()
                    if line.startswith("| CVAA-GAN − X2CT-GAN | 3 | +1.0"))
    assert per_seed.count(",") == 2 and "±" in per_seed       # three seeds, t interval
    real = text.split("## Real CTs")[1]
    pair = next(line for line in real.splitlines() if line.startswith("| CVAA-GAN − X2CT-GAN"))
    # the same 3 CTs in every seed: 3 distinct cases, not 9
    assert pair.startswith("| CVAA-GAN − X2CT-GAN | 3 | 3 (each in 3 seeds) | ")
    assert float(pair.split("|")[4].split()[0]) == pytest.approx(-0.5, abs=0.15)
    assert "results_history.md" in text


def test_the_verdict_needs_both_the_cases_and_the_seeds_to_agree():
    def seeds(offsets):
        out = []
        for k, off in enumerate(offsets):
            cases = [off + 0.01 * c for c in range(30)]
            out.append({"models": {
                "CVAA-GAN": {"test": {f"p{k}-{c}": {"psnr": 30.0 + v, "ssim": 0.8 + v / 100}
                                      for c, v in enumerate(cases)}},
                "X2CT-GAN": {"test": {f"p{k}-{c}": {"psnr": 30.0, "ssim": 0.8}
                                      for c in range(30)}}}})
        return out

    beats = table1.verdict(seeds([1.0, 1.2, 0.9, 1.1, 1.0]))
    assert "CVAA-GAN beats" in beats and "3D SSIM: +0.0" in beats
    assert "includes zero" not in beats
    assert "beaten by" in table1.verdict(seeds([-1.0, -1.2, -0.9, -1.1, -1.0]))
    # every seed's test cases agree with themselves, the seeds do not agree with each other
    mixed = table1.verdict(seeds([1.3, -0.2, -0.2, 1.0, 0.2]))
    assert "not robust to the training seed" in mixed and "3 of them" in mixed
    assert "not a verdict" in table1.verdict(seeds([1.0]))
