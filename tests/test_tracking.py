"""cvaa.tracking.runs: the one MLflow run lifecycle, against a real SQLite store."""

import json
import shutil

import mlflow
import pytest

from cvaa import tracking


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
