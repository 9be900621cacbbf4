"""Patient data stays in the data store: identifiers planted in file names, directory names
and DICOM headers appear nowhere that preprocess -> train -> evaluate -> register ->
reconstruct writes outside the prepared dataset's manifest."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from cvaa.config import load_config
from cvaa.data.dataset import PSEUDONYM_KEY, dataset_key, list_inputs, pseudonym

ROOT = Path(__file__).resolve().parents[1]
# Planted identifiers: a patient's name in file and directory names, a medical record
# number, a DICOM PatientName / PatientID / AccessionNumber.
PLANTED = ["PACS_EXPORT", "DOE_JOHN", "MRN00123", "SMITH_JANE", "SMITH^JANE", "MRN7654321",
           "ACC7654321"]


def _job(name):
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pseudonyms_are_keyed_stable_and_say_nothing(tmp_path):
    (tmp_path / "DOE_JOHN_MRN0012345.nii.gz").write_bytes(b"")
    key = dataset_key(str(tmp_path / "prepared"))
    assert (tmp_path / "prepared" / PSEUDONYM_KEY).is_file()
    assert dataset_key(str(tmp_path / "prepared")) == key            # stored, reused
    (item,) = list_inputs(str(tmp_path), key)
    assert item.case_id == pseudonym(key, "case", item.uri)
    assert item.case_id.startswith("case-") and item.patient_id.startswith("patient-")
    assert "doe" not in (item.case_id + item.patient_id).lower()
    other = dataset_key(str(tmp_path / "other"))
    assert list_inputs(str(tmp_path), other)[0].case_id != item.case_id   # keyed
    (named,) = list_inputs(str(tmp_path))                            # --keep-names
    assert named.case_id.startswith("DOE_JOHN_MRN0012345-")
    user_key = tmp_path / "key.hex"
    user_key.write_text("ab" * 16)
    assert dataset_key(str(tmp_path / "third"), str(user_key)) == bytes.fromhex("ab" * 16)
    assert not (tmp_path / "third" / PSEUDONYM_KEY).exists()        # the user keeps it


def _plant_archive(root: Path, cfg) -> Path:
    """7 NIfTI phantoms named after a patient, and one DICOM series with a named directory
    and identifying header fields."""
    import pydicom

    from cvaa.data.io import read_ct
    from cvaa.data.phantom import write_phantom_case
    from cvaa.inference import write_dicom_series

    archive = root / "PACS_EXPORT_2026"
    raw = root / "raw"
    for i in range(8):
        uri = write_phantom_case(i, cfg, str(raw), spacing_mm=8.0)
        if i < 7:
            archive.mkdir(parents=True, exist_ok=True)
            shutil.copy(uri, archive / f"DOE_JOHN_MRN00123{i}.nii.gz")
    series = archive / "SMITH_JANE_ACC7654321"
    for f in write_dicom_series(read_ct(uri), series):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "SMITH^JANE", "MRN7654321", "ACC7654321"
        ds.save_as(f)
    return archive


def _leaks(paths, text: str = "") -> list[str]:
    needles = [p.lower().encode() for p in PLANTED]
    found = [f"console: {p}" for p in PLANTED if p.lower() in text.lower()]
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if any(n in str(path).lower().encode() for n in needles):
                found.append(f"name: {path}")
                continue
            try:
                data = path.read_bytes().lower()
            except OSError:
                continue
            found += [f"{path}: {p}" for p, n in zip(PLANTED, needles) if n in data]
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_no_identifier_leaves_the_data_store(tmp_path, ray_local, capsys):
    import ray

    cfg = load_config("cpu")
    archive = _plant_archive(tmp_path / "hospital", cfg)
    work = tmp_path / "work"
    prepared, storage, evaluation = work / "prepared", work / "ray", work / "eval"
    mlflow_uri = f"sqlite:///{work}/mlflow/mlflow.db"
    (work / "mlflow").mkdir(parents=True)
    capsys.readouterr()

    assert _job("preprocess").main(["--input", str(archive), "--output", str(prepared)]) == 0
    assert _job("train").main([
        "--data", str(prepared), "--epochs", "1", "--storage", str(storage),
        "--mlflow-uri", mlflow_uri, "--run-name", "privacy", "--register-name", "privacy",
        "--set", "train.cpus_per_worker=0.5", "--set", "train.batch_size=2",
        "--set", "train.figure_every=1", "--set", "data.test_fraction=0.25"]) == 0
    assert _job("evaluate").main([
        "--models", "models:/privacy@candidate", "--data", str(prepared), "--split", "all",
        "--out", str(evaluation), "--mlflow-uri", mlflow_uri, "--cases", "8",
        "--engine", "local"]) == 0
    assert _job("reconstruct").main([
        "--model", "models:/privacy@candidate", "--mlflow-uri", mlflow_uri,
        "--from-ct", str(archive / "DOE_JOHN_MRN001230.nii.gz"),
        "--out", str(work / "estimate.nii.gz")]) == 0
    console = capsys.readouterr()
    text = console.out + console.err
    assert "privacy@candidate" in text and "Test split" in text        # it all ran

    manifest = (prepared / "manifest.json").read_text()
    assert "DOE_JOHN_MRN001230" in manifest and "SMITH_JANE" in manifest  # the mapping
    assert len(_leaks([prepared / "manifest.json"])) >= 3                 # the scan can fail
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    written = [work / "mlflow", storage, evaluation, work / "estimate.nii.gz",
               session / "logs"]
    assert all(p.exists() for p in written)
    assert len([p for p in (session / "logs").rglob("*") if p.is_file()]) > 10
    assert _leaks(written, text) == []
    # inside the prepared dataset only the manifest and per-case records map ids to files
    inside = [p for p in prepared.rglob("*") if p.is_file()
              and p.name != "manifest.json" and p.suffix != ".json"]
    assert inside and _leaks(inside) == []
