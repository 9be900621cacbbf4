"""jobs/tune.py: search spaces fail fast; ASHA sweeps on a local Ray, tracked in MLflow."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from cvaa import tracking
from cvaa.config import ConfigError, load_config
from cvaa.tune_space import SpaceError, load_space, parse_space

import faults

faults.register_by_value()

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.batch_size=2", "train.cpus_per_worker=0.5", "train.figure_every=2"]


def _jobs_tune():
    spec = importlib.util.spec_from_file_location("jobs_tune", ROOT / "jobs" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- spaces

@pytest.mark.parametrize("name, keys", [
    ("loss_weights.yaml", {"loss.adv", "loss.rec", "loss.proj"}),
    ("optim.yaml", {"optim.lr_g", "optim.lr_d", "optim.beta1"}),
])
def test_shipped_spaces_load(name, keys):
    space = load_space(ROOT / "tune_spaces" / name, load_config("cpu"))
    assert set(space.keys) == keys
    for dim in space.dimensions:
        assert all(isinstance(v, float) for v in dim.values), dim   # all float fields


def test_yaml_numbers_like_1e_4_are_floats_and_values_take_the_field_type(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optim.lr_g: {loguniform: [1e-5, 1e-3]}\n"   # strings to plain YAML
                    "loss.proj: {grid: [0, 10]}\n"               # ints for a float field
                    "train.batch_size: {uniform: [2, 8]}\n"      # an int field
                    "model.generator: {choice: [cvaa, x2ct]}\n")
    space = load_space(path, load_config("cpu"))
    dims = {d.key: d for d in space.dimensions}
    assert dims["optim.lr_g"].values == (1e-5, 1e-3)
    assert dims["loss.proj"].values == (0.0, 10.0)
    assert all(isinstance(v, float) for v in dims["loss.proj"].values)
    assert dims["train.batch_size"].integer and dims["train.batch_size"].values == (2, 8)
    assert space.grid_size == 2
    cfg = space.apply(load_config("cpu"), {"optim.lr_g": 3e-4, "train.batch_size": 5,
                                           "model.generator": "x2ct", "loss.proj": 0.0})
    assert (cfg.optim.lr_g, cfg.train.batch_size, cfg.model.generator) == (3e-4, 5, "x2ct")
    with pytest.raises(SpaceError, match="not in the space"):
        space.apply(load_config("cpu"), {"optim.lr_d": 1e-4})


def test_space_converts_to_tune_domains():
    from ray import tune

    space = parse_space({"optim.lr_g": {"loguniform": ["1e-5", "1e-3"]},
                         "train.batch_size": {"uniform": [2, 4]},
                         "optim.beta1": {"grid": [0.5, 0.9]}}, load_config("cpu"))
    domains = space.to_tune()
    assert isinstance(domains["optim.lr_g"], tune.search.sample.Float)
    assert domains["optim.lr_g"].lower == 1e-5 and domains["optim.lr_g"].upper == 1e-3
    assert isinstance(domains["train.batch_size"], tune.search.sample.Integer)
    assert domains["train.batch_size"].upper == 5          # inclusive high
    assert domains["optim.beta1"] == {"grid_search": [0.5, 0.9]}


@pytest.mark.parametrize("text, fragment", [
    ("loss.advv: {uniform: [0, 1]}", "unknown config key 'loss.advv'; did you mean"),
    ("loss.adv: {uniform: [1, 0.1]}", "loss.adv: uniform needs low < high"),
    ("loss.adv: {uniform: [0.1, 0.1]}", "loss.adv: uniform needs low < high"),
    ("optim.lr_g: {loguniform: [0, 1e-3]}", "optim.lr_g: loguniform needs positive"),
    ("loss.adv: {normal: [0, 1]}", "loss.adv: unknown distribution 'normal'"),
    ("loss.adv: {choice: [0.1, heavy]}", "loss.adv='heavy' is not a valid float"),
    ("loss.adv: {uniform: [low, 1]}", "loss.adv: bounds must be finite numbers"),
    ("train.batch_size: {uniform: [2, 4.5]}", "train.batch_size=4.5 is not a valid int"),
    ("optim.beta1: {choice: []}", "optim.beta1: choice needs a non-empty list"),
    ("optim.beta1: {grid: 0.5}", "optim.beta1: grid needs a non-empty list"),
    ("loss.adv: {uniform: [0, 1, 2]}", "loss.adv: uniform needs \\[low, high\\]"),
    ("model.generator: {uniform: [0, 1]}", "model.generator: uniform needs a numeric"),
    ("train.precision: {choice: [fp8]}", "train.precision='fp8' must be one of"),
    ("train.use_gpu: {grid: [true, false]}", "train.use_gpu: cannot be tuned"),
    ("train.epochs: {grid: [2, 4]}", "train.epochs: cannot be tuned"),
    ("drr.sad_mm: {uniform: [900, 1100]}", "drr.sad_mm: cannot be tuned: fixed by the "
                                           "prepared dataset"),
    ("loss: {adv: {uniform: [0, 1]}}", "unknown config key 'loss' \\(write dotted keys"),
    ("loss.adv: 0.1", "loss.adv: needs exactly one distribution"),
    ("loss.adv: {uniform: [0, 1], choice: [1]}", "loss.adv: needs exactly one"),
    ("", "a search space is a non-empty mapping"),
    ("- optim.lr_g", "a search space is a non-empty mapping"),
    ("loss.adv: {uniform: [0, 1]", "not valid YAML"),
])
def test_bad_space_names_the_file_and_the_key(tmp_path, text, fragment):
    path = tmp_path / "bad_space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SpaceError, match=fragment) as exc:
        load_space(path, load_config("cpu"))
    assert str(exc.value).startswith(str(path))
    assert isinstance(exc.value, ConfigError)       # the jobs' usual error path


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match="nope.yaml: cannot read"):
        load_space(tmp_path / "nope.yaml", load_config("cpu"))


def test_jobs_tune_fails_on_a_bad_space_before_starting_ray(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("optim.lr_gen: {loguniform: [1e-5, 1e-3]}\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune.py"), "--space", str(bad),
                           "--samples", "2", "--storage", str(tmp_path / "ray"),
                           "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}: unknown config key 'optim.lr_gen'" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr        # no cluster was started
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    assert time.monotonic() - start < 60


# --------------------------------------------------------------------------- sweep settings

def test_asha_settings_scale_with_the_epochs():
    assert _asha_rungs(200) == [20, 60, 180]
    assert _asha_rungs(16) == [2, 4, 8]
    assert _asha_rungs(3) == [1, 2]


def _asha_rungs(epochs):
    from cvaa.distributed.sweep import asha_settings

    grace, factor = asha_settings(epochs)
    rungs, t = [], grace
    while t < epochs:
        rungs.append(t)
        t *= factor
    return rungs


def test_asha_never_stops_a_trial_at_its_last_epoch():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from cvaa.distributed.sweep import FinishingASHA

    def run(scheduler):
        trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(3)]
        for t in trials:
            scheduler.on_trial_add(None, t)
        decisions = []
        for t, epoch, psnr in [(trials[0], 1, 10.0), (trials[1], 1, 5.0), (trials[0], 2, 10.0),
                               (trials[2], 1, 20.0), (trials[2], 2, 1.0)]:
            decisions.append(scheduler.on_trial_result(None, t, {"epoch": epoch,
                                                                 "val/psnr": psnr}))
        return decisions

    kw = dict(time_attr="epoch", metric="val/psnr", mode="max", max_t=2, grace_period=1,
              reduction_factor=2)
    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    # Rungs at epochs 1 and 2 (= max_t): t1 loses at rung 1, t2 at rung 2, its last epoch.
    assert run(ASHAScheduler(stop_last_trials=False, **kw)) == [go, stop, go, go, stop]
    assert run(FinishingASHA(**kw)) == [go, stop, go, go, go]


def test_concurrency_follows_the_scarcest_resource():
    from cvaa.distributed.sweep import max_concurrent_trials, trial_resources

    cpu = load_config("cpu", overrides=["train.cpus_per_worker=0.5"])
    per_trial = trial_resources(cpu, driver_cpus=0.25)
    assert per_trial == {"CPU": 0.75}
    assert max_concurrent_trials({"CPU": 2.0}, per_trial) == 2
    gpu = load_config("paper", overrides=["train.use_gpu=true", "train.num_workers=2",
                                          "train.gpus_per_worker=0.5"])
    per_trial = trial_resources(gpu, driver_cpus=0.25)
    assert per_trial == {"CPU": 2.25, "GPU": 1.0}
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 4.0}, per_trial) == 4     # GPUs
    assert max_concurrent_trials({"CPU": 4.0, "GPU": 8.0}, per_trial) == 1      # CPUs
    assert max_concurrent_trials({"CPU": 1.0}, per_trial) == 1                  # at least 1


def test_gpus_per_trial_are_split_over_the_workers():
    jobs_tune = _jobs_tune()
    args = jobs_tune.build_parser().parse_args(
        ["--space", "x.yaml", "--workers-per-trial", "2", "--gpus-per-trial", "1"])
    cfg = jobs_tune.resolve_config(args)
    assert cfg.train.use_gpu and cfg.train.num_workers == 2
    assert cfg.train.gpus_per_worker == 0.5
    args = jobs_tune.build_parser().parse_args(
        ["--space", "x.yaml", "--workers-per-trial", "2", "--gpus-per-trial", "3"])
    with pytest.raises(ConfigError, match="1.5 GPUs each"):
        jobs_tune.resolve_config(args)


@pytest.mark.parametrize("kw, fragment", [
    ({"metric": "val/ssmi"}, "--metric 'val/ssmi'"),
    ({"mode": "maximum"}, "--mode"),
    ({"samples": 0}, "--samples"),
    ({"grace_period": 5}, "--grace-period must be in \\[1, 3\\]"),
])
def test_bad_sweep_arguments(tmp_path, kw, fragment):
    from cvaa.distributed.training import TrainJob
    from cvaa.distributed.sweep import SweepJob, check_sweep

    cfg = load_config("cpu", overrides=["train.epochs=3"])
    space = parse_space({"loss.adv": {"grid": [0.1]}}, cfg)
    sweep = SweepJob(train=TrainJob(cfg=cfg, data="x", run_name="s"), space=space, **kw)
    with pytest.raises(ConfigError, match=fragment):
        check_sweep(sweep)


# --------------------------------------------------------------------------- Ray Tune

def _sweep(tmp_path, prepared, space, overrides=(), **kw):
    from cvaa.distributed.training import TrainJob
    from cvaa.distributed.sweep import SweepJob

    cfg = load_config("cpu", overrides=TINY + list(overrides))
    job = TrainJob(cfg=cfg, data=prepared, run_name=kw.pop("run_name", "sweep"),
                   storage=str(tmp_path / "ray"), mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
                   register_name="tiny-tune")
    return SweepJob(train=job, space=parse_space(space, cfg, source=str(tmp_path / "space")),
                    verbose=0, **kw)


def _wait_for_free_cpus(ray, want=2.0, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < want:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(1)


@pytest.mark.ray
def test_sweep_stops_the_loser_early_and_registers_the_winner(tmp_path, prepared_cpu,
                                                              ray_local, ray_session_dir):
    """Two trials, one after the other: lr_g = 1e-3 learns, lr_g = 0 cannot (its G keeps
    its initial weights), so at ASHA's first rung (epoch 1) the second trial is below the
    first one's value and is stopped; the first runs both epochs and wins."""
    from cvaa.distributed.sweep import tune_sweep

    sweep = _sweep(tmp_path, prepared_cpu, {"optim.lr_g": {"grid": [1e-3, 0.0]}},
                   ["train.epochs=2"], metric="val/psnr", mode="max", max_concurrent=1)
    lines = []
    out = tune_sweep(sweep, log=lines.append)
    # the cpu preset's hold-out (40 cases) does not fit in the 6 train-split cases
    assert ("[tune] calibration: the version stays uncalibrated: no cases held out (the "
            "train split's 6 cases are fewer than twice train.calibration_cases=40)") in "\n".join(
        lines)

    rows = {r["optim.lr_g"]: r for r in out["leaderboard"]}
    assert set(rows) == {1e-3, 0.0}
    winner, loser = rows[1e-3], rows[0.0]
    assert winner["status"] == "completed" and winner["epochs"] == 2 and winner["rank"] == 1
    assert loser["status"] == "stopped by ASHA at epoch 1" and loser["epochs"] == 1
    assert loser["rank"] == 2
    assert winner["val/psnr last"] > loser["val/psnr last"]
    assert out["best"]["trial"] == winner["trial"]
    _wait_for_free_cpus(ray_local)          # the stopped trial's workers went away

    client = mlflow.MlflowClient(sweep.train.mlflow_uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.metric"] == "val/psnr"
    assert parent.data.params["space.optim.lr_g"] == "grid([0.001, 0.0])"
    assert parent.data.tags["cvaa.tune.best_run_id"] == winner["run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.json", "leaderboard.md"} <= artifacts
    mlflow.set_tracking_uri(sweep.train.mlflow_uri)
    mlflow.set_experiment(experiment_id=parent.info.experiment_id)
    table = mlflow.load_table("leaderboard.json", run_ids=[parent.info.run_id])
    # trial_<id>, never a bare id that pandas reads as a number (66e25_00000 -> inf)
    assert list(table["trial"]) == [f"trial_{winner['trial']}", f"trial_{loser['trial']}"]
    assert list(table["status"]) == ["completed", "stopped by ASHA at epoch 1"]
    assert "| rank | trial | status | epochs |" in out["markdown"]

    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_id = {r.info.run_id: r for r in children}
    assert set(by_id) == {winner["run_id"], loser["run_id"]}
    assert by_id[winner["run_id"]].info.status == "FINISHED"
    assert by_id[loser["run_id"]].info.status == "KILLED"
    assert float(by_id[loser["run_id"]].data.params["optim.lr_g"]) == 0.0
    assert len(client.get_metric_history(winner["run_id"], "val/psnr")) == 2
    # The stopped trial's worker trains on until Tune's stop reaches it, so on a loaded
    # machine its run may also hold epoch 2's values (logged just before its report).
    assert [m.step for m in client.get_metric_history(loser["run_id"], "val/psnr")] in (
        [1], [1, 2])
    winner_artifacts = {a.path for a in client.list_artifacts(winner["run_id"], "evaluation")}
    assert "evaluation/table_i.md" in winner_artifacts         # completed: full fit()
    # a trial's run, in a Ray worker, carries the sweep's source and its own datasets
    won = by_id[winner["run_id"]]
    assert won.data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
    assert won.data.tags.get("mlflow.source.git.commit") == \
        parent.data.tags.get("mlflow.source.git.commit")
    assert {i.dataset.name.rsplit("/", 1)[1] for i in won.inputs.dataset_inputs} == {
        "train", "validation", "test"}
    assert "Table I, test split" in won.data.tags["mlflow.note.content"]

    version = client.get_model_version_by_alias("tiny-tune", "tuned-best")
    assert version.run_id == winner["run_id"]
    assert len(client.search_model_versions("name = 'tiny-tune'")) == 1   # only the best
    model = tracking.load_generator("models:/tiny-tune@tuned-best", sweep.train.mlflow_uri)
    import ray.train
    from cvaa.distributed.checkpoints import load_checkpoint_generator
    trained, state = load_checkpoint_generator(ray.train.Checkpoint(winner["checkpoint"]))
    assert state["epoch"] == 1 and state["config"]["optim"]["lr_g"] == 1e-3
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))

    # Tune forwards the driver's AWS keys into each trial's runtime_env, which Ray's agent
    # logs in full; the sweep keeps them out (the session has the S3 server's keys set).
    from s3server import SECRET_KEY
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY        # given back after fit
    leaked = [p.name for p in (ray_session_dir / "logs").rglob("*")
              if p.is_file() and SECRET_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.ray
def test_resume_continues_an_interrupted_sweep(tmp_path, prepared_cpu, ray_local):
    """The only trial's worker dies at epoch 2 with no retries left: the sweep fails. The
    same sweep with resume reruns the errored trial, whose Train run resumes from its
    epoch-1 checkpoint in the same MLflow child run."""
    from cvaa.distributed.sweep import SweepError, tune_sweep

    def sweep(run_name="interrupted", **kw):
        return _sweep(tmp_path, prepared_cpu, {"loss.adv": {"grid": [0.1]}},
                      ["train.epochs=2", "train.max_failures=0"], run_name=run_name, **kw)

    killer = faults.KillTrialWorkerAfterEpoch(1, str(tmp_path / "killed"))
    with pytest.raises(SweepError, match="no trial of sweep interrupted produced a model"):
        tune_sweep(sweep(), log=lambda *_: None, callbacks=[killer])
    assert (tmp_path / "killed").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (failed,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   "tags.`cvaa.tune.role` = 'trial'")
    assert failed.info.status == "FAILED"      # closed by the sweep (trials leave it open)
    with pytest.raises(SweepError, match="already exists.*--resume"):
        tune_sweep(sweep(), log=lambda *_: None)
    with pytest.raises(SweepError, match="nothing to resume"):
        tune_sweep(sweep(resume=True, run_name="never-ran"), log=lambda *_: None)

    out = tune_sweep(sweep(resume=True), log=lambda *_: None)
    (row,) = out["leaderboard"]
    assert row["status"] == "completed" and row["epochs"] == 2
    import ray.train
    from cvaa.distributed.checkpoints import load_checkpoint_generator
    _, state = load_checkpoint_generator(ray.train.Checkpoint(row["checkpoint"]))
    assert state["history"]["resumed_at_epoch"] == [2.0]     # not restarted from scratch

    sweeps = client.search_runs([client.get_run(out["parent_run_id"]).info.experiment_id],
                                "tags.`cvaa.tune.role` = 'sweep'")
    assert [r.info.run_id for r in sweeps] == [out["parent_run_id"]]       # one parent
    children = client.search_runs(
        [sweeps[0].info.experiment_id], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    assert [r.info.run_id for r in children] == [row["run_id"]]           # one child
    assert children[0].info.status == "FINISHED"
    # epoch 1 logged once (resumed, not restarted). Epoch 2's log waits for its checkpoint,
    # so the killed attempt sent it only if the kill landed between that checkpoint's upload
    # and its report (a window of milliseconds; Ray then resumes from epoch 1 and the step
    # gets a second value).
    steps = [m.step for m in client.get_metric_history(row["run_id"], "val/ssim")]
    assert steps.count(1) == 1 and sorted(set(steps)) == [1, 2], steps
    version = client.get_model_version_by_alias("tiny-tune", "tuned-best")
    assert version.run_id == row["run_id"]
