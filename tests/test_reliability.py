"""cvaa.reliability: reprojection, uncertainty, features, calibration, verdict; the
image-space perturbations (cvaa.data.augment) and view attention (cvaa.models.fusion) it
uses."""

import json
import math

import numpy as np
import pytest
import torch

from cvaa import reliability as R
from cvaa.config import load_config
from cvaa.data.augment import RenderParams, perturb_xrays
from cvaa.data.drr import render_drr
from cvaa.models import build_generator
from cvaa.models.fusion import view_attention

CFG = load_config("cpu")
S = CFG.preprocess.size


def _body(shift_w: int = 0) -> torch.Tensor:
    """(1, 1, S, S, S) normalised: an elliptic water body, wider left-right than deep,
    with a 'spine' of bone posterior."""
    d, h, w = torch.meshgrid(*(torch.arange(S, dtype=torch.float32),) * 3, indexing="ij")
    c = (S - 1) / 2
    inside = ((h - c) / (S * 0.25)) ** 2 + ((w - c - shift_w) / (S * 0.4)) ** 2 <= 1
    hu = torch.full((S, S, S), -1000.0)
    hu[inside] = 0.0
    hu[(abs(w - c) < 2) & (h > c + 2) & (h < c + 6)] = 700.0
    lo, hi = CFG.preprocess.clip_hu
    return ((hu - lo) / (hi - lo))[None, None]


def test_conformal_quantile_uses_the_finite_sample_rank():
    assert R.conformal_quantile(range(1, 10), 0.9) == 9.0          # ceil(10 * 0.9) = 9
    assert R.conformal_quantile(range(1, 11), 0.9) == 10.0         # ceil(11 * 0.9) = 10
    assert R.conformal_quantile(range(1, 9), 0.9) == math.inf      # ceil(9 * 0.9) = 9 > 8
    with pytest.raises(ValueError, match="level"):
        R.conformal_quantile([1.0], 1.0)


def test_conformal_quantile_covers_new_exchangeable_residuals():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(2000):
        r = np.abs(rng.standard_t(3, size=20))
        hits.append(abs(rng.standard_t(3)) <= R.conformal_quantile(r, 0.9))
    assert 0.9 <= np.mean(hits) <= 0.94     # guaranteed >= 0.9, at most 0.9 + 1/21


def test_reprojection_of_a_cube_matches_its_drr_and_sees_the_views_apart():
    vol = _body()
    drr = R.reproject(vol, CFG)
    lo, hi = CFG.preprocess.clip_hu
    direct = render_drr(vol * (hi - lo) + lo, CFG.drr, spacing_mm=CFG.preprocess.spacing_mm,
                        fov_mm=S * CFG.preprocess.spacing_mm)
    assert drr.shape == (1, 2, S, S) and torch.allclose(drr, direct)
    same = R.reprojection_consistency(drr, drr)
    assert torch.allclose(same["ncc"], torch.ones(1, 2), atol=1e-5)
    assert float(same["l1"].max()) == 0.0
    swapped = R.reprojection_consistency(drr.flip(1), drr)
    assert float(swapped["ncc"].mean()) < 0.9 and float(swapped["l1"].min()) > 0.0
    flat = R.reprojection_consistency(torch.zeros_like(drr), drr)
    assert float(flat["ncc"].abs().max()) == 0.0                  # constant: no correlation


def test_perturbation_identity_is_identity_and_draws_change_the_image():
    x = R.reproject(_body(), CFG)[0]
    fov = S * CFG.preprocess.spacing_mm
    assert torch.equal(perturb_xrays(x, RenderParams(), CFG.drr.log_scale, fov), x)
    zoomed = perturb_xrays(x, RenderParams(zoom=1.2), CFG.drr.log_scale, fov)
    # smaller on the detector: the body's extent shrinks
    assert (zoomed[0].mean(0) > 0.01).sum() < (x[0].mean(0) > 0.01).sum()
    moved = perturb_xrays(x, RenderParams(shift_mm=(32.0, 0.0, 0.0)), CFG.drr.log_scale,
                            fov)
    # 32 mm = 4 pixels at 8 mm: the PA's column profile moves by 4, the lateral stays
    shift = int(np.argmax(np.correlate(moved[0].mean(0).numpy(), x[0].mean(0).numpy(),
                                       "full"))) - (S - 1)
    assert abs(shift) == 4 and torch.allclose(moved[1], x[1], atol=1e-5)
    batch = R.sample_xrays(x, CFG, 5, seed=3)
    assert batch.shape == (5, 2, S, S) and torch.equal(batch[0], x)
    assert all(float((batch[i] - x).abs().mean()) > 1e-4 for i in range(1, 5))
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    assert torch.equal(batch, R.sample_xrays(x, CFG, 5, seed=3))   # reproducible


def test_input_features_see_swapped_views_and_a_flipped_lateral():
    x = R.reproject(_body(), CFG)[0]
    clean = R.input_features(x)
    assert clean["profile_corr"] > 0.99
    assert clean["log_width_ratio"] > 0.2                  # wider left-right than deep
    assert R.input_features(x.flip(0))["log_width_ratio"] == pytest.approx(
        -clean["log_width_ratio"])
    flipped = torch.stack([x[0], x[1].flip(-1)])
    assert clean["lateral_balance"] > 0.0                  # posterior spine
    assert R.input_features(flipped)["lateral_balance"] == pytest.approx(
        -clean["lateral_balance"], abs=1e-6)
    noise = R.input_features(torch.rand(2, S, S, generator=torch.Generator().manual_seed(0)))
    assert abs(noise["profile_corr"]) < 0.7


def test_one_batched_pass_gives_the_plain_estimate_and_an_uncertainty():
    torch.manual_seed(0)
    g = build_generator("cvaa", CFG)
    x = R.reproject(_body(), CFG)[0]
    from cvaa.inference import reconstruct
    plain = reconstruct(g, x)
    est, unc = R.estimate_with_uncertainty(g, x, CFG, k=4)
    assert est.shape == unc.shape == (1, 1, S, S, S)
    assert np.allclose(est[0, 0].numpy(), plain, atol=1e-5)
    assert float(unc.mean()) > 0.0
    _, none = R.estimate_with_uncertainty(g, x, CFG, k=1)
    assert float(none.abs().max()) == 0.0


def _synthetic_rows(n, rng):
    rows, psnr = [], []
    for _ in range(n):
        row = {name: float(rng.normal()) for name in R.OOD_FEATURES}
        row["reprojection_ncc"] = float(rng.normal())
        row["reprojection_l1"] = float(rng.normal())
        rows.append(row)
        psnr.append(30.0 - 2.0 * row["log_uncertainty"] + 0.3 * rng.normal())
    return rows, psnr


def test_calibration_predicts_covers_flags_and_round_trips_as_json():
    rng = np.random.default_rng(1)
    rows, psnr = _synthetic_rows(200, rng)
    cal = R.ReliabilityCalibration.fit(rows[:100], psnr[:100], k=8, level=0.9)
    test_rows, test_psnr = rows[100:], psnr[100:]
    preds = [cal.assess(r) for r in test_rows]
    inside = np.mean([a.psnr_low <= y <= a.psnr_high for a, y in zip(preds, test_psnr)])
    assert 0.8 <= inside <= 1.0
    assert np.corrcoef([a.score for a in preds], test_psnr)[0, 1] > 0.9
    far = dict(test_rows[0], profile_corr=50.0)
    assert cal.assess(far).verdict == "out of distribution"
    assert sum(a.verdict == "out of distribution" for a in preds) < 20
    again = R.ReliabilityCalibration.from_json(cal.to_json())
    assert again == cal and again.assess(test_rows[3]) == cal.assess(test_rows[3])
    assert json.loads(cal.to_json())["level"] == 0.9
    with pytest.raises(ValueError, match="unknown field"):
        R.ReliabilityCalibration.from_json(json.dumps({**json.loads(cal.to_json()), "x": 1}))
    old = {k: v for k, v in json.loads(cal.to_json()).items() if k != "case_ids"}
    with pytest.raises(ValueError, match="missing field.*case_ids"):
        R.ReliabilityCalibration.from_json(json.dumps(old))


def test_the_interval_is_jackknife_plus_and_widens_with_the_distance():
    rng = np.random.default_rng(7)
    rows, psnr = _synthetic_rows(400, rng)
    cal = R.ReliabilityCalibration.fit(rows[:60], psnr[:60], k=8, level=0.9)
    # exchangeable new cases: covered at about the level (jackknife+ guarantees >= 80 %)
    held = [cal.assess(r) for r in rows[60:]]
    inside = np.mean([a.psnr_low <= y <= a.psnr_high for a, y in zip(held, psnr[60:])])
    assert 0.85 <= inside <= 0.99, inside
    # the same features further away: a wider interval, around the same score
    row = rows[100]
    near = cal.interval(row, 2.0)
    far = cal.interval(row, 4.0)
    ratio = (far[1] - far[0]) / (near[1] - near[0])
    assert ratio == pytest.approx(2.0 ** R.SCALE_POWER, rel=0.35)
    flat = R.ReliabilityCalibration.fit(rows[:60], psnr[:60], k=8, scale_power=0.0)
    assert flat.interval(row, 2.0) == pytest.approx(flat.interval(row, 4.0))
    # the typical half-width is the median calibration case's
    assert 0.0 < cal.halfwidth < 5.0


def test_fit_refuses_a_case_count_whose_interval_or_threshold_would_be_infinite():
    # 2 cases per distance feature (13 + 2 margins): 30; there ceil(31 * 0.95) = 30 is finite
    assert R.minimum_cases(0.9, 0.95) == 30
    # at ood_level 0.98 the rank sets it: ceil(50 * 0.98) = 49 <= 49 first at 49
    assert R.minimum_cases(0.9, 0.98) == 49
    with pytest.raises(ValueError, match="at least 49 held-out cases.*got 48"):
        R.ReliabilityCalibration.fit(*_synthetic_rows(48, np.random.default_rng(3)), k=8,
                                     ood_level=0.98)
    rows, psnr = _synthetic_rows(30, np.random.default_rng(4))
    with pytest.raises(ValueError, match="at least 30 held-out cases.*got 29"):
        R.ReliabilityCalibration.fit(rows[:29], psnr[:29], k=8)
    cal = R.ReliabilityCalibration.fit(rows, psnr, k=8)
    assert math.isfinite(cal.halfwidth) and math.isfinite(cal.ood_threshold)
    assert cal.n_cases == 30 and len(cal.loo_models) == len(cal.loo_residuals) == 30
    bad = [dict(r) for r in rows]
    bad[5]["log_uncertainty"] = math.nan
    with pytest.raises(ValueError, match="'log_uncertainty' of case 5 is not finite"):
        R.ReliabilityCalibration.fit(bad, psnr, k=8)
    with pytest.raises(ValueError, match="psnr: case 2"):
        R.ReliabilityCalibration.fit(rows, psnr[:2] + [math.inf] + psnr[3:], k=8)
    with pytest.raises(ValueError, match="case_ids"):
        R.ReliabilityCalibration.fit(rows, psnr, k=8, case_ids=["a"])
    text = json.loads(cal.to_json())
    with pytest.raises(ValueError, match="halfwidth is inf"):
        R.ReliabilityCalibration.from_json(json.dumps({**text, "halfwidth": math.inf}))


def test_the_verdict_line_gives_no_psnr_where_it_means_nothing():
    ok = R.Assessment(31.0, 30.0, 32.0, 0.9, 2.0, 6.0, "ok")
    assert "predicted PSNR 31.0 dB (90 % interval 30.0-32.0)" in ok.line()
    assert ok.to_dict()["predicted_psnr"] == 31.0
    far = R.Assessment(-13.2, -14.0, -12.4, 0.9, 57.0, 6.0, "out of distribution")
    assert "PSNR" not in far.line().replace("no PSNR", "") and "57.0" in far.line()
    assert far.to_dict()["predicted_psnr"] is None and far.to_dict()["score"] == -13.2
    none = R.Assessment.uncalibrated()
    assert none.verdict == "uncalibrated" and none.verdict in R.VERDICTS
    assert "jobs/calibrate.py" in none.line() and "dB" not in none.line()
    assert none.to_dict()["score"] is None and json.dumps(none.to_dict(), allow_nan=False)


def test_assess_refuses_a_calibration_of_another_k_and_reports_metadata():
    torch.manual_seed(0)
    g = build_generator("cvaa", CFG)
    x = R.reproject(_body(), CFG)[0]
    rows, psnr = _synthetic_rows(40, np.random.default_rng(2))
    cal = R.ReliabilityCalibration.fit(rows, psnr, k=4)
    with pytest.raises(ValueError, match="k=4"):
        R.assess(g, x, CFG, cal, k=2)
    rel = R.assess(g, x, CFG, cal, k=4)
    meta = rel.metadata()
    assert meta["verdict"] in R.VERDICTS[:3] and meta["k"] == 4
    assert rel.uncertainty.shape == (S, S, S) and rel.residual.shape == (2, S, S)
    assert "reliability:" in rel.assessment.line()
    bare = R.assess(g, x, CFG, None, k=4)
    assert bare.assessment.verdict == "uncalibrated" and bare.metadata()["score"] is None


def test_view_attention_weights_per_scale_sum_to_one():
    torch.manual_seed(0)
    g = build_generator("cvaa", CFG)
    maps = view_attention(g, torch.rand(2, S, S))
    assert [m.shape[1] for m in maps] == [8, 16, 32]
    assert all(np.allclose(m.sum(0), 1.0, atol=1e-5) for m in maps)
    with pytest.raises(ValueError, match="no view-attention"):
        view_attention(build_generator("3dcnn", CFG), torch.rand(2, S, S))


def _bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "reliability.py"
    spec = importlib.util.spec_from_file_location("reliability_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_auroc_and_altered_inputs():
    bench = _bench()
    assert bench.auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert bench.auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert bench.auroc([1.0, 1.0], [1.0]) == 0.5                   # ties count half
    x = R.reproject(_body(), CFG)[0].numpy()
    assert np.array_equal(bench.altered_input("swapped views", x), x[::-1])
    assert np.array_equal(bench.altered_input("flipped lateral", x)[1], x[1][:, ::-1])
    const = bench.foreign_input("constant", x, 0, [])
    assert np.allclose(const.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)
    assert float(np.ptp(const, axis=(1, 2)).max()) == 0.0
    noise = bench.foreign_input("noise", x, 0, [])
    assert noise.shape == x.shape and 0.0 <= noise.min() and noise.max() <= 1.0


def test_orientation_check_reads_each_view_from_its_anatomy():
    from cvaa.reliability.orientation import OrientationCheck
    pairs = [R.reproject(_body(s), CFG)[0].numpy() for s in (-2, -1, 0, 1, 2)]
    check = OrientationCheck.fit(pairs)
    assert all(check.problems(x) == [] for x in pairs)
    x = pairs[2]
    mirrored_lateral = np.stack([x[0], x[1][:, ::-1]])
    assert check.problems(mirrored_lateral) == ["the lateral looks mirrored left-right"]
    # the body is left-right symmetric in the PA: its mirror image is not asked about
    assert "looks mirrored left-right" not in check.checked[0]
    assert check.problems(np.stack([x[0][:, ::-1], x[1]])) == []
    assert "looks rotated 90 degrees" in check.checked[0]
    # named after a mistake whose undoing every discriminant accepts
    assert check.problems(np.stack([x[0], np.rot90(x[1], 1)])) == [
        "the lateral looks rotated 90 degrees"]
    assert any("looks like a" in p for p in check.problems(x[::-1]))          # swapped
    assert any("polarity inverted" in p for p in check.problems(1.0 - x))
    assert any("lateral" in p for p in check.problems(np.stack([x[0], x[0]])))  # PA twice
    assert OrientationCheck.from_dict(check.to_dict()) == check
    with pytest.raises(ValueError, match="unknown field"):
        OrientationCheck.from_dict({**check.to_dict(), "x": 1})
    # in a calibration: the verdict says what is wrong, with no predicted PSNR
    rows, psnr = _synthetic_rows(40, np.random.default_rng(5))
    cal = R.ReliabilityCalibration.fit(rows, psnr, k=8, xrays=pairs * 8)
    verdict = cal.assess(rows[0], mirrored_lateral)
    assert verdict.verdict == "out of distribution" and "mirrored" in verdict.reason
    assert "mirrored" in verdict.line() and "dB" not in verdict.line()
    assert cal.assess(rows[0], x).reason == ""
    assert R.ReliabilityCalibration.from_json(cal.to_json()) == cal


def test_bench_judges_its_kept_measurements_with_the_current_code(tmp_path):
    """bench/reliability.py --verdicts --from-cache: the measurements a run kept (features,
    X-rays, actual PSNR per input) give the verdict table again without the model."""
    bench = _bench()
    pairs = [R.reproject(_body(s), CFG)[0].numpy() for s in (-2, -1, 0, 1, 2)]
    rows, psnr = _synthetic_rows(30, np.random.default_rng(11))
    (tmp_path / "measurements.json").write_text(json.dumps(
        {"model": "tiny", "k": 8, "calibration_dataset": "abc"}))
    ids = [f"c{i}" for i in range(30)]
    (tmp_path / "calibration.json").write_text(json.dumps(
        {c: {"features": r, "psnr": p} for c, r, p in zip(ids, rows, psnr)}))
    np.savez_compressed(tmp_path / "calibration.npz",
                        **{c: pairs[i % 5].astype(np.float16) for i, c in enumerate(ids)})
    x = pairs[2]
    inputs = {"clean": x, "lateral mirrored": bench.altered_input("lateral mirrored", x),
              "swapped views": bench.altered_input("swapped views", x)}
    new_rows, new_psnr = _synthetic_rows(1, np.random.default_rng(12))
    (tmp_path / "case-h0.json").write_text(json.dumps(
        {name: {"features": new_rows[0], "psnr": new_psnr[0]} for name in inputs}))
    np.savez_compressed(tmp_path / "case-h0.npz",
                        **{k: v.astype(np.float16) for k, v in inputs.items()})
    result = bench.operating_point(tmp_path)
    assert result["calibration"]["n_cases"] == 30
    assert result["calibration"]["case_ids"] == ids
    verdicts = {name: rows_[0]["verdict"] for name, rows_ in result["families"].items()}
    assert verdicts["lateral mirrored"] == verdicts["swapped views"] == "out of distribution"
    assert "mirrored" in result["families"]["lateral mirrored"][0]["reason"]
    summary = bench.operating_summary(result)
    assert summary["lateral mirrored"]["out of distribution"] == 1.0
    assert summary["clean"]["n"] == 1
    assert "| lateral mirrored | 1 | 0 % | 0 % | 100 % | - |" in bench.operating_markdown(
        result, summary)


def test_an_orientation_reading_far_from_the_calibration_is_only_a_hint():
    pairs = [R.reproject(_body(s), CFG)[0].numpy() for s in (-2, -1, 0, 1, 2)]
    rows, psnr = _synthetic_rows(40, np.random.default_rng(5))
    cal = R.ReliabilityCalibration.fit(rows, psnr, k=8, xrays=pairs * 8)
    x = pairs[2]
    mirrored = np.stack([x[0], x[1][:, ::-1]])
    near = cal.assess(rows[0], mirrored)
    assert cal.width_distance(rows[0]) <= cal.width_threshold
    assert near.verdict == "out of distribution"
    assert near.reason == "the lateral looks mirrored left-right"
    far = cal.assess(dict(rows[0], profile_corr=50.0), mirrored)
    assert far.verdict == "out of distribution"
    assert cal.width_distance(dict(rows[0], profile_corr=50.0)) > cal.width_threshold
    assert far.reason == ("the input is unlike every case the model was calibrated on; read "
                          "against the calibration views, the lateral looks mirrored "
                          "left-right")


def test_bench_chooses_the_calibration_settings_on_the_calibration_data_alone(tmp_path):
    """bench/reliability.py --select: two folds of the calibration cases' own measurements
    (every family), one row per setting, in the documented order of choice."""
    bench = _bench()
    pairs = [R.reproject(_body(s), CFG)[0].numpy() for s in (-2, -1, 0, 1, 2)]
    rng = np.random.default_rng(21)
    rows, psnr = _synthetic_rows(60, rng)
    ids = [f"c{i}" for i in range(60)]
    (tmp_path / "calibration.json").write_text(json.dumps(
        {c: {"features": r, "psnr": p} for c, r, p in zip(ids, rows, psnr)}))
    np.savez_compressed(tmp_path / "calibration.npz",
                        **{c: pairs[i % 5].astype(np.float16) for i, c in enumerate(ids)})
    for i, (c, r, p) in enumerate(zip(ids, rows, psnr)):
        x = pairs[i % 5]
        shifted = dict(r, log_uncertainty=r["log_uncertainty"] + 0.5)   # 1 dB lower PSNR
        (tmp_path / f"case-{c}.json").write_text(json.dumps(
            {"clean": {"features": r, "psnr": p},
             "shift": {"features": shifted, "psnr": p - 1.0}}))
        np.savez_compressed(tmp_path / f"case-{c}.npz", clean=x.astype(np.float16),
                            shift=x.astype(np.float16))
    grid = {"score_features": {"3": R.SCORE_FEATURES}, "ridge": (1.0,),
            "scale_power": (0.0, 1.5)}
    lines = []
    chosen = bench.select_settings(tmp_path, lines.append, grid)
    assert len(chosen) == len(lines) == 2
    assert {r["scale_power"] for r in chosen} == {0.0, 1.5}
    for r in chosen:
        assert 0.0 <= r["clean_coverage"] <= 1.0 and r["clean_width"] > 0.0
        assert r["clean_rho"] > 0.6                       # PSNR follows log_uncertainty
    keys = [(r["clean_coverage"] < 0.9, -round(r["clean_rho"], 3),
             -r["worst_family_coverage"], r["clean_width"]) for r in chosen]
    assert keys == sorted(keys)
    assert "| 3 | 1 |" in bench.selection_markdown(chosen)
