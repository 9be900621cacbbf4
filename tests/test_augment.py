"""Train-time X-ray randomisation: the context CT renders the fixed DRR again, every
transform does what it says (against the fixed rendering of the same case), draws are
seeded, and a training run renders its samples in the ingest threads."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cvaa.config import ConfigError, load_config
from cvaa.data.augment import (ContextCT, Randomizer, RenderParams, context_of,
                               decode_context, encode_context, render_context,
                               rotate_about, sample_params, sample_seed)
from cvaa.data.dataset import PreparedDataset
from cvaa.data.drr import render_prepared
from cvaa.data.io import read_ct
from cvaa.data.preprocess import prepare_ct

CFG = load_config("cpu")


@pytest.fixture(scope="module")
def lumbar(real_ct_paths):
    prep = prepare_ct(read_ct(real_ct_paths["abdomen"]), CFG.preprocess)
    context = decode_context(encode_context(context_of(prep,
                                                       CFG.preprocess.context_margin_mm)))
    return prep, context, render_prepared(prep, CFG)


def test_the_context_renders_the_fixed_drr_again(lumbar):
    prep, context, fixed = lumbar
    assert context.hu.dtype == np.int16
    assert context.hu.shape[1:] == prep.resampled.shape[1:]     # full axial extent
    again = render_context(context, CFG.drr, RenderParams())
    assert np.abs(again - fixed).max() < 1e-3


def test_each_transform_changes_the_image_the_way_it_says(lumbar):
    _, context, fixed = lumbar

    def render(**kw):
        return render_context(context, CFG.drr, RenderParams(**kw),
                              generator=torch.Generator().manual_seed(0))

    assert np.abs(render(rotation_deg=(0.0, 0.0, 5.0)) - fixed).mean() > 1e-3
    # a longer source-detector distance magnifies: the body covers more of the detector
    covered = (fixed > 0.05).mean()
    assert (render(sid_scale=1.2) > 0.05).mean() > covered
    assert (render(zoom=1.2) > 0.05).mean() < covered           # a larger pitch: smaller
    # harder bone: brighter where bone is; a lower effective energy: brighter everywhere
    assert render(bone_scale=1.5).sum() > fixed.sum()
    assert render(mu_scale=1.1).sum() > fixed.sum()
    # scatter lifts the intensity of dense regions: lower line integrals, less contrast
    scattered = render(scatter=0.3)
    assert scattered.max() < fixed.max() and scattered.std() < fixed.std()
    # dose: fewer photons, more noise
    noisy = [np.abs(render(photons=p) - fixed).mean() for p in (1e6, 1e4)]
    assert 0 < noisy[0] < noisy[1]
    # a look-up table is monotonic: it keeps the order of the pixels
    base = render()
    for kw in ({"gamma": 0.7}, {"gamma": 1.4}, {"window_center": 0.4, "window_width": 0.15}):
        mapped = render(**kw)
        order = np.argsort(base, axis=None, kind="stable")
        assert (np.diff(mapped.reshape(-1)[order]) >= -1e-6).all(), kw
        assert np.abs(mapped - fixed).mean() > 1e-3
    # unsharp masking adds high frequencies
    sharp = render(unsharp_amount=1.0, unsharp_sigma_px=2.0)

    def edges(x):
        return np.abs(np.diff(x, axis=-1)).mean()
    assert edges(sharp) > edges(fixed)


def test_rotation_turns_the_patient_about_the_isocentre():
    n = 21
    mu = torch.zeros(1, 1, n, n, n)
    mu[0, 0, 10, 10, 15] = 1.0        # 5 voxels to the patient's left (+x) of the centre
    turned = rotate_about(mu, (0.0, 0.0, 90.0), (2.0, 2.0, 2.0), (10.0, 10.0, 10.0))
    d, h, w = np.unravel_index(int(turned.argmax()), (n, n, n))
    # +90 deg about z (x -> y): the point moves to the posterior side (+y = +H)
    assert (d, h, w) == (10, 15, 10)
    assert float(turned.sum()) == pytest.approx(1.0, abs=1e-4)


def test_draws_are_seeded_by_sample_and_respect_the_ranges():
    a = CFG.augment
    draw = [sample_params(replace(a, clean_fraction=0.0),
                          np.random.default_rng(sample_seed(0, 1, f"c{i}"))) for i in range(200)]
    assert draw[0] == sample_params(replace(a, clean_fraction=0.0),
                                    np.random.default_rng(sample_seed(0, 1, "c0")))
    assert sample_seed(0, 1, "c0") != sample_seed(0, 2, "c0") != sample_seed(1, 1, "c0")
    assert not any(p.is_identity() for p in draw)
    assert max(abs(v) for p in draw for v in p.rotation_deg) <= a.rotation_deg
    assert max(abs(v) for p in draw for v in p.shift_mm) <= a.shift_mm
    assert all(a.photons_min <= p.photons <= a.photons_max for p in draw)
    assert all(abs(p.sad_scale - 1) <= a.distance_frac for p in draw)
    clean = [sample_params(replace(a, clean_fraction=1.0), np.random.default_rng(i))
             for i in range(20)]
    assert all(p.is_identity() for p in clean)


def test_presets_and_validation():
    assert not load_config("paper").augment.enabled
    assert load_config("cpu-augment").augment.enabled
    assert load_config("cpu-augment").preprocess == load_config("cpu").preprocess
    with pytest.raises(ConfigError, match="context_margin_mm"):
        load_config("cpu-augment", overrides=["preprocess.context_margin_mm=0"])
    with pytest.raises(ConfigError, match="clean_fraction"):
        load_config("cpu", overrides=["augment.clean_fraction=1.5"])


def test_a_dataset_without_context_says_so(prepared_cpu, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(prepared_cpu, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for record in manifest["prepared"]:
        record.pop("context_path", None)
    (root / "manifest.json").write_text(json.dumps(manifest))
    dataset = PreparedDataset(str(root))
    with pytest.raises(FileNotFoundError, match="no context CT.*prepare the dataset again"):
        dataset.context(dataset.split("train")[0])


def test_the_randomizer_renders_fresh_xrays_per_epoch_from_the_prepared_dataset(prepared_cpu):
    dataset = PreparedDataset(prepared_cpu)
    case = dataset.split("train")[0]
    context = dataset.context(case)
    assert isinstance(context, ContextCT)
    cfg = load_config("cpu-augment", overrides=["augment.clean_fraction=0"])
    randomizer = Randomizer(dataset.arrays, dataset.context, cfg)
    fixed, ct = dataset.arrays(case)
    assert np.abs(render_context(context, cfg.drr, RenderParams()) - fixed).max() < 1e-3
    epochs = []
    for epoch in (0, 1, 0):
        randomizer.epoch = epoch
        xrays, target = randomizer(case)
        assert xrays.shape == fixed.shape and xrays.dtype == np.float32
        assert np.array_equal(target, ct)              # the target stays canonical
        epochs.append(xrays)
    assert np.abs(epochs[0] - fixed).mean() > 1e-3
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(epochs[0], epochs[2])        # seeded by (seed, epoch, case)
    assert randomizer.take_ms_per_sample() > 0 and randomizer.take_ms_per_sample() == 0


@pytest.mark.ray
def test_training_with_randomisation_reports_its_rendering_cost(prepared_cpu, tmp_path):
    from cvaa import tracking
    from cvaa.distributed.training import TrainJob, train

    cfg = load_config("cpu-augment", overrides=["train.epochs=2", "train.batch_size=2",
                                                "train.cpus_per_worker=1",
                                                "train.figure_every=100"])
    job = TrainJob(cfg=cfg, data=prepared_cpu, run_name="augment", storage=str(tmp_path / "r"),
                   mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", register_name="augment")
    with tracking.open_run(job.mlflow_uri, job.run_name) as run:
        result = train(job, run, log=None)
    assert result.epochs == 2
    assert all(ms > 0 for ms in result.history["augment_ms_per_sample"])
    assert np.isfinite(result.history["loss_g"]).all()
    params = tracking.RunLogger(job.mlflow_uri, run.run_id).client.get_run(
        run.run_id).data.params
    assert params["augment.enabled"] == "True" and params["augment.rotation_deg"] == "5.0"
    print(f"randomised rendering at the cpu preset: "
          f"{result.history['augment_ms_per_sample']} ms per sample (read included)")


def test_the_prepared_context_is_small_at_the_cpu_preset(prepared_cpu):
    sizes = [p.stat().st_size for p in Path(prepared_cpu, "context").glob("*.npz")]
    cases = [p.stat().st_size for p in Path(prepared_cpu, "cases").glob("*.npz")]
    assert len(sizes) == len(cases) > 0
    assert sum(sizes) < 4 * sum(cases)
