"""cvaa.local: the Ray-free runner trains with the same loop, checkpoints and resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvaa.config import load_config
from cvaa.local import latest_state, prepare_phantoms, train_local

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.n_phantoms=4", "data.test_fraction=0.5", "train.io_threads=1",
        "train.prefetch_batches=1"]


@pytest.fixture(scope="module")
def prepared_tiny(tmp_path_factory) -> str:
    """4 phantoms at the cpu preset (2 train, of which 1 validates; 2 test), no Ray."""
    out = str(tmp_path_factory.mktemp("prepared-local"))
    manifest = prepare_phantoms(load_config("cpu", overrides=TINY), out, processes=2,
                                log=lambda line: None)
    assert len(manifest["split"]["train"]) == 2 and len(manifest["split"]["test"]) == 2
    return out


def test_train_two_epochs_then_resume_to_three(prepared_tiny, tmp_path):
    cfg = load_config("cpu", overrides=[*TINY, "train.epochs=2", "model.generator=3dcnn"])
    lines: list[str] = []
    first = train_local(cfg, prepared_tiny, tmp_path, device="cpu", log=lines.append)
    assert first["status"] == "completed" and first["epoch"] == 2
    assert first["steps"] == 2 * first["steps_per_epoch"] == 2  # 1 train case, batch 4
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch")] == ["1/2", "2/2"]
    state, warnings, path = latest_state(tmp_path)
    assert state["epoch"] == 1 and warnings == [] and path.parent.name == "epoch_0002"
    assert len(state["history"]["val/psnr"]) == 2
    weights = {k: v.clone() for k, v in state["trainer"]["generator"].items()}

    lines.clear()
    again = train_local(cfg.override(["train.epochs=3"]), prepared_tiny, tmp_path,
                        device="cpu", log=lines.append)
    assert again["status"] == "completed" and again["epoch"] == 3
    assert "resumed from the checkpoint of epoch 2" in lines
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch")] == ["3/3"]
    state, _, path = latest_state(tmp_path)
    assert path.parent.name == "epoch_0003" and state["history"]["resumed_at_epoch"] == [3.0]
    assert len(state["history"]["val/psnr"]) == 3
    assert any(not torch.equal(weights[k], v)   # it trained on from the saved weights
               for k, v in state["trainer"]["generator"].items())
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(prepared_tiny, tmp_path):
    cfg = load_config("cpu", overrides=[*TINY, "train.epochs=2", "model.generator=psr"])
    train_local(cfg, prepared_tiny, tmp_path, device="cpu", log=None)
    newest = tmp_path / "epoch_0002" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    lines: list[str] = []
    result = train_local(cfg, prepared_tiny, tmp_path, device="cpu", log=lines.append)
    assert any(ln.startswith("warning: checkpoint") and "epoch_0002" in ln for ln in lines)
    assert "resumed from the checkpoint of epoch 1" in lines
    assert result["status"] == "completed" and result["epoch"] == 2
    state, warnings, _ = latest_state(tmp_path)
    assert warnings == [] and state["epoch"] == 1   # epoch 2 trained again and saved whole


def test_another_config_in_the_folder_is_refused(prepared_tiny, tmp_path):
    cfg = load_config("cpu", overrides=[*TINY, "train.epochs=1", "model.generator=psr"])
    train_local(cfg, prepared_tiny, tmp_path, device="cpu", log=None)
    with pytest.raises(ValueError, match="model.generator"):
        train_local(cfg.override(["model.generator=3dcnn"]), prepared_tiny, tmp_path,
                    device="cpu", log=None)


def test_the_runner_imports_without_ray_or_mlflow():
    code = ("import sys\n"
            "for name in ('ray', 'mlflow'):\n"
            "    sys.modules[name] = None  # any import of them raises ImportError\n"
            "import cvaa.local, cvaa.loop\n"
            "sys.path.insert(0, 'bench')\n"
            "import table1_paper\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_real_cts_prepare_in_a_pool_and_the_mr_is_rejected(shared_data, tmp_path):
    from cvaa.local import prepare_inputs

    cfg = load_config("cpu")
    lines: list[str] = []
    manifest = prepare_inputs(str(shared_data), cfg, str(tmp_path), processes=2,
                              log=lines.append)
    assert len(manifest["prepared"]) == 4          # 3 NIfTI CTs and the DICOM series
    assert [r["source_uri"].rsplit("/", 1)[-1] for r in manifest["rejected"]] == \
        ["abdomen_mr.nii.gz"]
    assert all(r["ct_shape"] == [32, 32, 32] for r in manifest["prepared"])
    again = prepare_inputs(str(shared_data), cfg, str(tmp_path), processes=2,
                           log=lines.append)
    assert again["prepared"] == manifest["prepared"] and "prepared already" in lines[-1]


def test_a_spent_budget_stops_after_a_checkpoint_and_the_next_call_goes_on(prepared_tiny,
                                                                          tmp_path):
    cfg = load_config("cpu", overrides=[*TINY, "train.epochs=3", "model.generator=psr"])
    lines: list[str] = []
    first = train_local(cfg, prepared_tiny, tmp_path, device="cpu", budget_s=1e-3,
                        log=lines.append)
    assert first["status"] == "budget" and first["epoch"] == 1 and first["steps"] == 1
    assert "stopped for the time budget" in lines[-1]
    rest = train_local(cfg, prepared_tiny, tmp_path, device="cpu", log=None)
    assert rest["status"] == "completed" and rest["epoch"] == 3
    assert rest["history"]["resumed_at_epoch"] == [2.0]


class _NanGradientAtEpoch:
    """From ``epoch`` (0-based) on, the generator's first gradient is NaN in every
    backward while every loss stays finite (an overflow inside a backward)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, epoch: int, trainer) -> None:
        if epoch == self.epoch:
            next(trainer.generator.parameters()).register_hook(
                lambda grad: torch.full_like(grad, float("nan")))


def test_no_checkpoint_holds_a_weight_stepped_on_a_nan_gradient(prepared_tiny, tmp_path):
    """CUDA-shaped (the check reads every 25 steps, so the NaN-gradient step is taken):
    the check before the epoch's checkpoint stops the run, and the last checkpoint is the
    finite one before it. The epoch's one step is a short batch padded to 4."""
    cfg = load_config("cpu", overrides=[*TINY, "train.epochs=3", "model.generator=3dcnn",
                                        "train.cuda_shaped=true", "train.compile=none"])
    result = train_local(cfg, prepared_tiny, tmp_path, device="cpu", log=None,
                         callbacks=[_NanGradientAtEpoch(1)])
    assert result["status"] == "nonfinite" and "G gradient norm is nan" in result["message"]
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0001"]
    state, _, _ = latest_state(tmp_path)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["trainer"]["generator"].values())
