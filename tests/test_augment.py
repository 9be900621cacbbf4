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


# ------------------------------------------------------------ rendering on the device

def _phantom_context() -> ContextCT:
    """A cpu-preset context CT (48 slices: the 32^3 crop and 8 of margin each side)."""
    from cvaa.data.phantom import generate_phantom

    hu = generate_phantom(3, implants=True, shape=(48, 32, 32), spacing_mm=8.0).volume.array
    return ContextCT(np.clip(np.rint(hu), -32768, 32767).astype(np.int16), (8.0, 8.0, 8.0),
                     (23.5, 15.5, 15.5), 256.0)


def _device_randomizer(device: torch.device, **augment) -> Randomizer:
    context = _phantom_context()
    fixed = render_context(context, CFG.drr, RenderParams())
    cfg = load_config("cpu-augment", overrides=[f"augment.{k}={v}"
                                                for k, v in augment.items()])
    return Randomizer(lambda case: (fixed, np.zeros((1, 32, 32, 32), np.float32)),
                      lambda case: context, cfg, device=device)


def _rendered_both_ways(randomizer: Randomizer, cases, device):
    """The threads' path (``randomizer(case)``) and the device path (``sample`` in the
    threads, ``render_batch`` in the step) for the same cases."""
    threads = np.stack([randomizer(c)[0] for c in cases])               # (B, 2, P, P)
    samples = [randomizer.sample(c) for c in cases]
    fixed = torch.from_numpy(np.stack([s[0] for s in samples])).to(device)
    rendered = randomizer.render_batch(fixed, tuple(s[2] for s in samples))
    return threads, rendered, samples


def test_the_device_path_renders_what_the_threads_render():
    """Same draws (seeded by sample), same X-rays: rotation, shift, scatter, noise,
    blur, window, unsharp masking; a clean sample keeps its fixed DRR."""
    cpu = torch.device("cpu")
    randomizer = _device_randomizer(cpu, clean_fraction=0.5, window_prob=1.0)
    assert randomizer.loader() is randomizer                # a CPU renders in the threads
    cases = [f"case-{i}" for i in range(6)]
    threads, rendered, samples = _rendered_both_ways(randomizer, cases, cpu)
    draws = [s[2] for s in samples]
    assert any(d is None for d in draws) and any(d is not None for d in draws)
    assert all(d is None or (d.params.photons > 0 and any(d.params.rotation_deg))
               for d in draws)
    assert rendered.shape == threads.shape and rendered.dtype == torch.float32
    np.testing.assert_allclose(rendered.numpy(), threads, rtol=0, atol=1e-6)
    for s, x in zip(samples, rendered):                     # clean rows untouched
        if s[2] is None:
            assert np.array_equal(x.numpy(), s[0])
        else:
            assert np.abs(x.numpy() - s[0]).mean() > 1e-3
    assert randomizer.take_ms_per_sample() > 0


def test_a_cuda_worker_streams_draws_and_the_stream_carries_them():
    from cvaa.data.stream import CaseStream, Step

    randomizer = _device_randomizer(torch.device("cuda"), clean_fraction=0.0)
    assert randomizer.loader() == randomizer.sample         # selection only: no CUDA used
    cpu_randomizer = _device_randomizer(torch.device("cpu"), clean_fraction=0.0)
    stream = CaseStream(cpu_randomizer.sample, prefetch=1, threads=1)
    (batch,) = stream.iterate([Step(("a", "b"))])
    assert batch.xrays.shape == (2, 2, 32, 32) and len(batch.extras) == 2
    assert [d.seed for d in batch.extras] == [cpu_randomizer.params(c)[1] for c in "ab"]
    with pytest.raises(ValueError, match="1 draws for a batch of 2"):
        cpu_randomizer.render_batch(batch.xrays, batch.extras[:1])


def test_the_step_side_render_makes_no_tensor_from_host_values(monkeypatch):
    """The CUDA path's render (``render_in_step``, as ``train.cuda_shaped`` takes it on a
    CPU): the draws carry their projection tables and rotation, built in the threads, and
    ``render_batch`` only moves them. A tensor made there from a host value (a table, an
    affine, a window's end) would be a pageable host-to-device copy on a GPU, a wait for
    the stream: here any such construction fails the test."""
    cpu = torch.device("cpu")
    randomizer = _device_randomizer(cpu, clean_fraction=0.0, window_prob=1.0)
    step_side = Randomizer(randomizer.load_case, randomizer.load_context, randomizer.cfg,
                           device=cpu, render_in_step=True)
    assert step_side.loader() == step_side.sample
    cases = ["a", "b", "c"]
    samples = [step_side.sample(c) for c in cases]
    assert all(s[2].plan.theta is not None and len(s[2].plan.tables) == 2 for s in samples)
    fixed = torch.from_numpy(np.stack([s[0] for s in samples]))

    def refused(*args, **kwargs):
        raise AssertionError("a tensor made from a host value inside the step's render")

    with monkeypatch.context() as m:
        for name in ("tensor", "as_tensor", "from_numpy"):
            m.setattr(torch, name, refused)
        rendered = step_side.render_batch(fixed, tuple(s[2] for s in samples))
    threads = np.stack([randomizer(c)[0] for c in cases])
    np.testing.assert_allclose(rendered.numpy(), threads, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_the_gpu_render_never_waits_for_the_stream():
    """On CUDA, with the draws pinned in the threads, the step's render makes no
    synchronising call (torch's sync debug mode raises on one)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    randomizer = _device_randomizer(cuda, clean_fraction=0.0, window_prob=1.0)
    samples = [randomizer.sample(c) for c in "abcd"]
    assert all(s[2].hu.is_pinned() and s[2].plan.tables[0].row_i0.is_pinned()
               for s in samples)
    fixed = torch.from_numpy(np.stack([s[0] for s in samples])).to(cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rendered = randomizer.render_batch(fixed, tuple(s[2] for s in samples))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rendered.shape == fixed.shape


@pytest.mark.gpu
def test_the_gpu_renders_what_the_cpu_renders():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    # Noise-free: a CUDA generator's Poisson draws are its own (reproducible) sequence.
    randomizer = _device_randomizer(cuda, clean_fraction=0.0, photons_max=0.0,
                                    window_prob=1.0)
    threads, rendered, _ = _rendered_both_ways(randomizer, ["a", "b", "c"], cuda)
    assert rendered.device.type == "cuda"
    np.testing.assert_allclose(rendered.cpu().numpy(), threads, rtol=0, atol=2e-4)
