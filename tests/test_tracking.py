"""cvaa.tracking.runs: the one MLflow run lifecycle, against a real SQLite store."""

import json
import shutil

import mlflow
import pytest

from cvaa import tracking
from manifests import prepared_manifest


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _status(uri, run_id):
    return mlflow.MlflowClient(uri).get_run(run_id).info.status


def test_a_run_that_ends_normally_is_finished(uri):
    with tracking.open_run(uri, "ok", tags={"cvaa.kind": "test"}) as run:
        run.log_metrics({"loss": 1.0}, 1)
        assert _status(uri, run.run_id) == "RUNNING"
    assert _status(uri, run.run_id) == "FINISHED"
    assert mlflow.MlflowClient(uri).get_run(run.run_id).data.tags["cvaa.kind"] == "test"


def test_an_error_after_the_work_marks_the_run_failed(uri):
    # e.g. registering fails after training returned: the run must not stay RUNNING
    with pytest.raises(OSError, match="registry down"):
        with tracking.open_run(uri, "fails-late") as run:
            run.log_metrics({"loss": 1.0}, 1)
            raise OSError("registry down")
    assert _status(uri, run.run_id) == "FAILED"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, tracking.RunKilled])
def test_an_interrupt_marks_the_run_killed(uri, exc):
    with pytest.raises(exc):
        with tracking.open_run(uri, "stopped") as run:
            raise exc()
    assert _status(uri, run.run_id) == "KILLED"


def test_a_failed_child_is_left_for_its_parent(uri):
    with tracking.open_run(uri, "sweep") as parent:
        with pytest.raises(RuntimeError):
            with tracking.open_run(uri, "trial", parent_run_id=parent.run_id) as child:
                raise RuntimeError("worker died")
        assert _status(uri, child.run_id) == "RUNNING"      # the sweep decides
        tags = mlflow.MlflowClient(uri).get_run(child.run_id).data.tags
        assert tags["mlflow.parentRunId"] == parent.run_id
        with tracking.open_run(uri, "trial-2", parent_run_id=parent.run_id) as ok:
            pass
        assert _status(uri, ok.run_id) == "FINISHED"


def test_resume_reopens_the_unfinished_run_of_that_name_and_tags(uri):
    with pytest.raises(RuntimeError):
        with tracking.open_run(uri, "train-a", tags={"role": "x"}) as first:
            raise RuntimeError("node lost")
    lines = []
    with tracking.open_run(uri, "train-a", tags={"role": "x"}, resume=True,
                           log=lines.append) as again:
        assert _status(uri, again.run_id) == "RUNNING"
    assert again.run_id == first.run_id
    assert "resumed" in lines[0]
    # a finished run is not resumed, and other tags do not match
    with tracking.open_run(uri, "train-a", tags={"role": "x"}, resume=True) as third:
        pass
    assert third.run_id != first.run_id
    with pytest.raises(RuntimeError):
        with tracking.open_run(uri, "train-b", tags={"role": "x"}) as other:
            raise RuntimeError
    with tracking.open_run(uri, "train-b", tags={"role": "y"}, resume=True) as fresh:
        pass
    assert fresh.run_id != other.run_id


def test_evaluating_an_empty_split_is_an_error_never_another_split(tmp_path, prepared_cpu):
    from cvaa.config import load_config
    from cvaa.data.dataset import PreparedDataset
    from cvaa.distributed.training import EmptySplitError, evaluate_split
    from cvaa.models import build_generator

    copy = tmp_path / "prepared"
    shutil.copytree(prepared_cpu, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["split"]["train"] += manifest["split"]["test"]
    manifest["split"]["test"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("cpu")
    with pytest.raises(EmptySplitError, match="the test split has no cases"):
        evaluate_split(build_generator("cvaa", cfg), PreparedDataset(str(copy)), "test", cfg)
    table = evaluate_split(build_generator("cvaa", cfg), PreparedDataset(prepared_cpu), "test",
                           cfg)
    assert table.split == "test" and len(table.per_case) == len(table.case_ids) > 0
    assert table.rows[0]["cases"] == len(PreparedDataset(prepared_cpu).split("test"))


# --------------------------------------------------------------------------- what MLflow users look for

def test_a_split_is_an_mlflow_dataset_whose_digest_follows_cases_and_preprocessing(tmp_path):
    from cvaa.tracking.datasets import PreparedSplit

    root = str(tmp_path / "prepared-abc123")
    m = prepared_manifest()
    train = PreparedSplit(root, m, "train", m["split"]["train"])
    assert train.name == "prepared-abc123/train" and len(train.digest) == 10
    assert train.source.to_dict() == {"uri": root}
    assert train.profile["num_cases"] == 3 and train.profile["ct_shape"] == [1, 32, 32, 32]
    assert [s.shape for s in train.schema.inputs] == [(-1, 2, 32, 32), (-1, 1, 32, 32, 32)]
    timed = prepared_manifest()
    timed["prepared"][0]["seconds"] = 99.0                    # a rerun's timing: same data
    assert PreparedSplit(root, timed, "train", m["split"]["train"]).digest == train.digest
    other = prepared_manifest(config_hash="def456")                   # other preprocessing
    assert PreparedSplit(root, other, "train", m["split"]["train"]).digest != train.digest
    assert PreparedSplit(root, m, "train", m["split"]["train"][:2]).digest != train.digest
    s3 = PreparedSplit("s3://bucket/prepared", m, "test", m["split"]["test"])
    assert s3.source.to_dict() == {"uri": "s3://bucket/prepared"}
    with pytest.raises(KeyError, match="case-9999"):
        PreparedSplit(root, m, "train", ["case-9999"])
    assert "DOE" not in train.to_json() and "case-0000" not in train.to_json()


def test_a_run_has_source_tags_description_dataset_inputs_and_system_metrics(uri, tmp_path):
    import re
    import time

    m = prepared_manifest()
    root = str(tmp_path / "prepared")
    with tracking.open_run(uri, "seen") as run:
        run.log_datasets(root, m, {"training": ("train", m["split"]["train"]),
                                   "test": ("test", m["split"]["test"]),
                                   "validation": ("validation", [])})   # empty: left out
        run.set_description("CVAA-GAN, preset cpu")
        with tracking.system_metrics(uri, run.run_id, 0.2):
            time.sleep(1.5)
        with pytest.raises(KeyError, match="valid"):
            run.log_datasets(root, m, {"train": ("train", m["split"]["train"])})
    got = mlflow.MlflowClient(uri).get_run(run.run_id)
    tags = got.data.tags
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.source.name"]
    assert tags["cvaa.version"] and tags["mlflow.note.content"] == "CVAA-GAN, preset cpu"
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])  # run from git
    contexts = {i.dataset.name: [t.value for t in i.tags] for i in got.inputs.dataset_inputs}
    assert contexts == {"prepared/train": ["training"], "prepared/test": ["test"]}
    assert "system/cpu_utilization_percentage" in got.data.metrics
    assert "system/system_memory_usage_megabytes" in got.data.metrics
    # a Tune trial (a Ray worker process) passes the source tags of its sweep
    with tracking.open_run(uri, "seen2", resume=True,
                           source={"mlflow.source.name": "jobs/other.py"}) as again:
        pass
    assert mlflow.MlflowClient(uri).get_run(again.run_id).data.tags[
        "mlflow.source.name"] == "jobs/other.py"
