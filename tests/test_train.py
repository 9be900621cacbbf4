"""jobs/train.py: DDP on Ray Train, MLflow run + registry, failure recovery, NaN guard."""

import json
import math
import re
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from cvaa import tracking
from cvaa.config import load_config
from cvaa.models import build_discriminator, build_generator
from cvaa.distributed.training import TrainJob, run_training, train
from cvaa.distributed.worker import CHECKPOINT_FILE
from cvaa.gan import GANTrainer, NonFiniteLossError, lr_factor

import faults

faults.register_by_value()

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.batch_size=2", "train.cpus_per_worker=0.5", "train.figure_every=1"]


def _job(tmp_path, prepared, overrides, **kw):
    cfg = load_config("cpu", overrides=TINY + overrides)
    return TrainJob(cfg=cfg, data=prepared, run_name=kw.pop("run_name", "test-run"),
                    storage=str(tmp_path / "ray"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
                    register_name=kw.pop("register_name", "tiny"), **kw)


# --------------------------------------------------------------------------- pure parts

def test_train_job_makes_local_paths_absolute_for_the_workers(tmp_path, monkeypatch):
    # Ray Train workers run in another directory: a relative --data, --storage or
    # sqlite:///relative.db would point them at other (empty) places.
    monkeypatch.chdir(tmp_path)
    job = TrainJob(cfg=load_config("cpu"), data="runs/prepared", run_name="r",
                   storage="runs/ray", mlflow_uri="sqlite:///runs/mlflow.db")
    assert job.data == str(tmp_path / "runs" / "prepared")
    assert job.storage == str(tmp_path / "runs" / "ray")
    assert job.mlflow_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    remote = TrainJob(cfg=load_config("cpu"), data="s3://b/prepared", run_name="r",
                      storage="s3://b/ray", mlflow_uri="http://mlflow:5000")
    assert (remote.data, remote.storage, remote.mlflow_uri) == (
        "s3://b/prepared", "s3://b/ray", "http://mlflow:5000")


def test_training_mean_intensity_averages_the_first_training_cases(prepared_cpu):
    from cvaa.data.dataset import PreparedDataset
    from cvaa.loop import training_mean_intensity

    ds = PreparedDataset(prepared_cpu)
    ids = ds.split("train")
    expected = sum(float(ds.load(c)["ct"].mean()) for c in sorted(ids)[:3]) / 3
    assert training_mean_intensity(ds, ids[::-1], limit=3) == pytest.approx(expected)
    assert 0.0 < expected < 0.5             # mostly air and soft tissue
    with pytest.raises(ValueError, match="no training cases"):
        training_mean_intensity(ds, [])


def test_lr_schedule_constant_then_linear_decay():
    o = load_config("paper").optim   # 100 constant + 100 decay
    assert lr_factor(0, o) == lr_factor(99, o) == 1.0
    assert lr_factor(100, o) < 1.0 and lr_factor(150, o) == pytest.approx(0.5, abs=0.01)
    assert lr_factor(199, o) > 0.0 and lr_factor(250, o) == 0.0


@pytest.mark.parametrize("name, adversarial", [("cvaa", True), ("3dcnn", False)])
def test_gan_step_updates_g_and_d(name, adversarial, tmp_path):
    cfg = load_config("cpu")
    torch.manual_seed(0)
    g = build_generator(name, cfg)
    d = build_discriminator(cfg) if g.uses_discriminator else None
    assert (d is not None) == adversarial
    trainer = GANTrainer(g, d, cfg)
    before_g = [p.detach().clone() for p in g.parameters()]
    before_d = [p.detach().clone() for p in d.parameters()] if d else []
    out = trainer.step(torch.rand(2, 2, 32, 32), torch.rand(2, 1, 32, 32, 32))
    assert all(torch.isfinite(v) for v in out.values())
    assert ("loss_d" in out) == adversarial and ("loss_adv" in out) == adversarial
    assert any(not torch.equal(a, b) for a, b in zip(before_g, g.parameters()))
    if d:
        assert any(not torch.equal(a, b) for a, b in zip(before_d, d.parameters()))
        assert all(p.requires_grad for p in d.parameters())   # unfrozen after the G step
    state = trainer.state_dict()
    torch.save(state, tmp_path / "state.pt")
    torch.load(tmp_path / "state.pt", weights_only=True)      # loadable without pickle


def test_nan_loss_raises_before_any_update():
    cfg = load_config("cpu")
    g, d = build_generator("cvaa", cfg), build_discriminator(cfg)
    trainer = GANTrainer(g, d, cfg)
    before = [p.detach().clone() for p in g.parameters()]
    with pytest.raises(NonFiniteLossError, match="nan"):
        trainer.step(torch.rand(1, 2, 32, 32), torch.full((1, 1, 32, 32, 32), float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(before, g.parameters()))


# --------------------------------------------------------------------------- Ray Train

@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2])
def test_table_i_on_cluster_workers_equals_in_process_scoring(prepared_cpu, workers,
                                                              tmp_path):
    from cvaa.data.dataset import PreparedDataset
    from cvaa.distributed.checkpoints import write_marker
    from cvaa.distributed.training import TrainResult, evaluate_on_workers, evaluate_split

    cfg = load_config("cpu", overrides=["train.cpus_per_worker=0.5", "train.batch_size=2",
                                        "train.num_workers=2"])
    torch.manual_seed(3)
    generator = build_generator("cvaa", cfg).eval()
    state = {"epoch": 0, "config": cfg.to_dict(),
             "trainer": {"generator": generator.state_dict()}}
    ckpt = tmp_path / "epoch_0001"
    ckpt.mkdir()
    torch.save(state, ckpt / CHECKPOINT_FILE)
    write_marker(ckpt)
    import ray.train
    result = TrainResult(ray.train.Checkpoint.from_directory(str(ckpt)), {}, 0.0, state)
    dataset = PreparedDataset(prepared_cpu)
    here = evaluate_split(generator, dataset, "test", cfg)
    there = evaluate_on_workers(result, dataset, "test", cfg, workers=workers)
    assert there.case_ids == here.case_ids and len(here.case_ids) >= 2
    for got, want in zip(there.per_case, here.per_case):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert there.markdown == here.markdown


@pytest.mark.ray
def test_ddp_two_workers_logs_and_registers(tmp_path, prepared_cpu):
    # 3 of the 6 train-split cases held out for a calibration: too few to fit one
    job = _job(tmp_path, prepared_cpu, ["train.num_workers=2", "train.epochs=2",
                                        "train.system_metrics_s=1",
                                        "train.calibration_cases=3"], alias="candidate")
    lines = []
    out = run_training(job, log=lines.append)
    assert out["epochs"] == 2
    # the job finishes, and says in one line why the version stays uncalibrated
    (why,) = [line for line in lines if line.startswith("calibration:")]
    assert why.startswith("calibration: the version stays uncalibrated: 3 cases held out "
                          "(train.calibration_cases=3), and a calibration needs at least 30")
    assert tracking.load_model("models:/tiny@candidate", job.mlflow_uri).calibration is None
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert all("val PSNR" in line and "s/epoch" in line for line in epoch_lines)
    assert "ETA 0s" in epoch_lines[-1]
    client = mlflow.MlflowClient(job.mlflow_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["model.generator"] == "cvaa"
    assert len(client.get_metric_history(out["run_id"], "loss_g")) == 2
    assert len(client.get_metric_history(out["run_id"], "val/ssim")) == 2
    # streamed ingest: every training case once per epoch over the two ranks
    from cvaa.data.dataset import PreparedDataset, training_split
    train_ids = training_split(PreparedDataset(prepared_cpu), job.cfg.train).train
    assert len(train_ids) == 2
    seen = client.get_metric_history(out["run_id"], "epoch_cases")
    assert [m.value for m in seen] == [len(train_ids)] * 2
    assert all(0 <= m.value <= 1 for m in
               client.get_metric_history(out["run_id"], "data_wait_fraction"))
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/table_i.json", "evaluation/table_i.md"} <= artifacts
    figures = {a.path for a in client.list_artifacts(out["run_id"], "figures")}
    assert "figures/slices_epoch_0002.png" in figures
    assert "| CVAA-GAN |" in out["table"]

    version = client.get_model_version_by_alias("tiny", "candidate")
    assert version.run_id == out["run_id"]
    # What a registry user reads about the version
    assert version.tags["generator"] == "cvaa" and version.tags["source_run_id"] == out["run_id"]
    assert float(version.tags["test.psnr"]) == pytest.approx(out["rows"][0]["psnr_mean"], abs=1e-4)
    assert float(version.tags["test.ssim_x2ct"]) == pytest.approx(out["rows"][0]["ssim_x2ct_mean"],
                                                                   abs=1e-4)
    assert version.tags["volume_size"] == "32" and version.tags["data.test_cases"] != "0"
    assert "Test split" in version.description and "(N, 2, 32, 32)" in version.description
    _check_mlflow_lineage(client, out, version, job, prepared_cpu)
    model = tracking.load_generator("models:/tiny@candidate", job.mlflow_uri)
    from cvaa.distributed.checkpoints import load_checkpoint_generator
    import ray.train
    trained, state = load_checkpoint_generator(ray.train.Checkpoint(out["checkpoint"]))
    assert state["epoch"] == 1
    for batch in (1, 3):   # any batch size
        x = torch.rand(batch, 2, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), trained(x))


@pytest.mark.ray
def test_training_calibrates_the_version_on_its_held_out_patients(tmp_path, real_ct_paths,
                                                                   ray_local, capsys):
    """77 train-split cases: 37 held out (more than the 30 a calibration takes), 36 validated
    (cheap: forwards only), 4 trained on for one epoch; the job ends with a calibrated
    version, and jobs/calibrate.py treats the hold-out as held out."""
    import importlib.util

    import numpy as np

    from tiny_models import write_perturbed_dataset

    data = write_perturbed_dataset(tmp_path / "prepared", str(real_ct_paths["abdomen"]), 80,
                                   {"test": slice(0, 3), "train": slice(3, None)})
    job = _job(tmp_path, data, ["train.epochs=1", "train.calibration_cases=37",
                                "train.calibration_k=1", "train.val_fraction=0.9"])
    lines = []
    out = run_training(job, log=lines.append)
    (done,) = [line for line in lines if line.startswith("calibrated on ")]
    assert re.fullmatch(r"calibrated on 37 held-out cases \(K = 1\) in \d+ s: predicted PSNR "
                        r"\+-\d+\.\d\d dB at 90 %", done), done
    model = tracking.load_model(out["model_uri"], job.mlflow_uri)
    from cvaa.data.dataset import PreparedDataset, training_split
    from cvaa.reliability import ReliabilityCalibration
    dataset = PreparedDataset(data)
    split = training_split(dataset, job.cfg.train)
    calibration = ReliabilityCalibration.from_json(model.calibration)
    assert calibration.k == 1 and calibration.case_ids == tuple(split.calibration)
    assert calibration.dataset == dataset.fingerprint
    assert calibration.info["source"].startswith(f"held out of training by MLflow run "
                                                 f"{out['run_id']}")
    client = mlflow.MlflowClient(job.mlflow_uri)
    version = client.get_model_version_by_alias("tiny", "candidate")
    assert version.tags["reliability/cases"] == "37" and version.tags["reliability/run_id"]
    mlflow.set_tracking_uri(job.mlflow_uri)
    x = dataset.arrays(dataset.split("test")[0])[0][None].astype(np.float32)
    verdict = mlflow.pyfunc.load_model(out["model_uri"]).predict(
        x, params={"reliability": True})["verdict"]
    assert list(verdict) != ["uncalibrated"] and verdict[0] in ("ok", "check",
                                                                "out of distribution")

    # jobs/calibrate.py: the train split is refused for its 40 trained and validated cases
    # only, and the hold-out is accepted as held out
    spec = importlib.util.spec_from_file_location("calibrate_job", ROOT / "jobs" / "calibrate.py")
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    capsys.readouterr()
    assert calibrate.main(["--model", out["model_uri"], "--data", data, "--split", "train",
                           "--mlflow-uri", job.mlflow_uri]) == 2
    assert "40 of the 77 cases" in capsys.readouterr().err
    args = calibrate.build_parser().parse_args(["--model", out["model_uri"], "--data", data])
    tags = tracking.model_version_tags(out["model_uri"], job.mlflow_uri)
    calibrate._refuse_training_cases(args, dataset, split.calibration, tags, job.cfg)
    with pytest.raises(ValueError, match="1 of the 38 cases"):
        calibrate._refuse_training_cases(args, dataset, split.calibration + split.train[:1],
                                         tags, job.cfg)
    other = job.cfg.override({"train.seed": 1})       # another hold-out than the registered
    with pytest.raises(ValueError, match="does not match its 'dataset.calibration' tag"):
        calibrate._refuse_training_cases(args, dataset, split.calibration, tags, other)


def _check_mlflow_lineage(client, out, version, job, prepared):
    """What an MLflow user looks for on a training run: its datasets, system metrics,
    source and description, and the registered version's link to its training data."""
    from cvaa.data.dataset import PreparedDataset
    from cvaa.tracking.datasets import PreparedSplit

    run = client.get_run(out["run_id"])
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test", "calibration"}
    data = PreparedDataset(prepared)
    test = PreparedSplit(data.root, data.manifest, "test", data.split("test"))
    assert inputs["test"].digest == test.digest and len(test.digest) == 10
    assert inputs["test"].source_type == "local" and prepared in inputs["test"].source
    profile = json.loads(inputs["training"].profile)
    assert profile["num_cases"] + sum(json.loads(inputs[c].profile)["num_cases"]
                                      for c in ("validation", "calibration")) \
        == len(data.split("train"))
    assert "case-" not in inputs["training"].profile     # counts, never case ids
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system
    assert "system/system_memory_usage_megabytes" in system
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "JOB" and tags["cvaa.version"]
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])   # a checkout
    note = tags["mlflow.note.content"]
    assert "CVAA-GAN" in note and prepared in note and "preset custom" in note
    assert f"PSNR {out['rows'][0]['psnr_mean']:.2f}" in note.splitlines()[-1]
    # the version (and its logged model) names the run's training and test datasets
    training = inputs["training"]
    assert version.tags["dataset.training"] == f"{training.name}@{training.digest}"
    assert version.tags["dataset.test"] == f"{test.name}@{test.digest}"
    held_out = inputs["calibration"]
    assert version.tags["dataset.calibration"] == f"{held_out.name}@{held_out.digest}"
    assert version.tags["data.calibration_cases"] == str(job.cfg.train.calibration_cases)
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    assert logged.tags["dataset.training"] == version.tags["dataset.training"]
    assert logged.source_run_id == out["run_id"]
    on_test = {m.key: m for m in logged.metrics if m.dataset_digest == test.digest}
    assert on_test["test/psnr_mean"].value == pytest.approx(out["rows"][0]["psnr_mean"])
    assert on_test["test/psnr_mean"].dataset_name == test.name


# The GPU path's logic on CPU workers (train.cuda_shaped): compiled (train.compile auto =
# default), channels-last, fused Adam, padded convs, GEMM transposed conv, layout-keeping
# norm, X-rays rendered in the step; narrow widths to keep Inductor's compile short.
CUDA_SHAPED_DDP = ["train.cuda_shaped=true", "augment.enabled=true", "train.batch_size=4",
                   "model.stem_channels=4", "model.growth=2", "model.encoder_channels=[8,8,8]",
                   "model.decoder_channels=[8,8,4,4]", "model.disc_channels=[4,8,8]",
                   "model.disc_expand_channels=2"]


@pytest.mark.ray
def test_compiled_cuda_shaped_ddp_survives_a_killed_worker_without_recompiling(
        tmp_path, prepared_cpu):
    """Two DDP ranks (gloo) through Ray Train, every CUDA branch but the kernels, compiled;
    SIGKILL a worker while it trains epoch 3: Ray Train restarts the worker group, which
    resumes from the epoch-2 checkpoint in the same MLflow run. Each process compiles in
    its first epoch (training steps, the short last batch padded to the full size, and
    validation) and never again: dynamo's count of new graphs is 0 in every later epoch."""
    from cvaa.data.dataset import PreparedDataset, training_split

    marker = tmp_path / "killed"
    job = _job(tmp_path, prepared_cpu, ["train.epochs=4", "train.max_failures=2",
                                        "train.num_workers=2", *CUDA_SHAPED_DDP],
               run_name="killed-run")
    train_ids = training_split(PreparedDataset(prepared_cpu), job.cfg.train).train
    assert len(train_ids) % job.cfg.train.batch_size, "no short batch to pad"
    lines = []
    with tracking.open_run(job.mlflow_uri, job.run_name) as run:
        result = train(job, run, callbacks=[faults.KillWorkerAfterEpoch(2, str(marker))],
                       log=lines.append)
    assert marker.exists(), "the failure was not injected"
    assert result.epochs == 4
    # The console says what happened, between the epoch lines
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == [
        "1/4", "2/4", "3/4", "4/4"]
    failure = next(i for i, line in enumerate(lines) if line.startswith("worker failure 1"))
    assert "train.max_failures=2" in lines[failure] and "restarting" in lines[failure]
    assert lines[failure + 1] == ("resumed from the checkpoint of epoch 2: the epoch count "
                                  "continues")
    # Resumed at epoch 3 from the epoch-2 checkpoint, not restarted at epoch 1.
    history = result.history
    assert history["resumed_at_epoch"] == [3.0]
    assert len(history["loss_g"]) == 4
    assert all(math.isfinite(v) for k in ("loss_g", "loss_d", "val/psnr") for v in history[k])
    assert history["epoch_cases"] == [len(train_ids)] * 4   # padding samples not counted
    compiled = history["compiled_graphs"]
    assert compiled[0] > 0 and compiled[2] > 0, compiled    # each process compiled ...
    assert compiled[1] == 0 and compiled[3] == 0, compiled  # ... once
    client = mlflow.MlflowClient(job.mlflow_uri)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "loss_g")] == [1, 2, 3, 4]


@pytest.mark.ray
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, prepared_cpu):
    job = _job(tmp_path, prepared_cpu, ["train.epochs=4"], run_name="nan-run")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2") as exc:
        with tracking.open_run(job.mlflow_uri, job.run_name) as run:
            train(job, run, worker_callbacks=[faults.PoisonWeightsAtEpoch(1)], log=None)
    assert "last good checkpoint" in str(exc.value)
    ckpts = sorted((tmp_path / "ray" / "nan-run").glob("epoch_*"))
    assert [p.name for p in ckpts] == ["epoch_0001"]
    state = torch.load(ckpts[-1] / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["trainer"]["generator"].values())
    run = mlflow.MlflowClient(job.mlflow_uri).search_runs(
        [tracking.setup(job.mlflow_uri)], "tags.`mlflow.runName` = 'nan-run'")[0]
    assert run.info.status == "FAILED"


@pytest.mark.ray
def test_a_nan_on_one_rank_stops_both_ranks_together(tmp_path, prepared_cpu):
    """Rank 1 alone goes non-finite at epoch 2 (gloo, 2 CPU workers): the ranks agree on
    it (all-reduce), both stop in the same step without hanging, the run fails with the
    NaN error and the epoch-1 checkpoint stays the last one."""
    job = _job(tmp_path, prepared_cpu, ["train.epochs=3", "train.num_workers=2"],
               run_name="nan-rank1")
    start = time.monotonic()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2, step 1") as exc:
        with tracking.open_run(job.mlflow_uri, job.run_name) as run:
            train(job, run, worker_callbacks=[faults.PoisonWeightsAtEpoch(1, rank=1)],
                  log=None)
    assert time.monotonic() - start < 300                     # no hang
    # the error comes from rank 0, whose own loss was finite: it stopped for rank 1
    assert re.search(r"loss is [0-9.]+ on this rank", str(exc.value)), str(exc.value)
    ckpts = sorted((tmp_path / "ray" / "nan-rank1").glob("epoch_*"))
    assert [p.name for p in ckpts] == ["epoch_0001"]
    state = torch.load(ckpts[-1] / CHECKPOINT_FILE, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["trainer"]["generator"].values())
    assert mlflow.MlflowClient(job.mlflow_uri).get_run(run.run_id).info.status == "FAILED"


# `ray start --head` + `ray job submit --working-dir . -- python jobs/train.py`: in
# tests/test_auth.py, against a head with token authentication (the way cluster.yaml starts
# one).


# --------------------------------------------------------------------------- cluster.yaml

def _validate_cluster(config):
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(config))


def test_cluster_yaml_passes_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate_cluster(config)
    starts = " ".join(config["worker_start_ray_commands"])
    assert '"accelerator_type:A40": 1' in starts     # what ScalingConfig(accelerator_type) asks
    assert any("pip install" in c and "~/cvaa" in c for c in config["setup_commands"])


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_wrokers=3),
    lambda c: c["provider"].pop("type"),
    lambda c: c.update(setup_commands="pip install cvaa"),
])
def test_cluster_yaml_typos_fail(mutate):
    import jsonschema
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError, TypeError)):
        _validate_cluster(config)
