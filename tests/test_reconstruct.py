"""jobs/reconstruct.py and cvaa.inference: X-ray files -> registered model -> CT in HU."""

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cvaa import inference, tracking
from cvaa.config import load_config
from cvaa.data.io import read_ct
from cvaa.data.preprocess import CANONICAL_DIRECTION, denormalize, orient_canonical
from tiny_models import register_tiny_models

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config("cpu")


def _load_job():
    spec = importlib.util.spec_from_file_location("reconstruct_job",
                                                  ROOT / "jobs" / "reconstruct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOB = _load_job()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    uri, models = register_tiny_models(tmp_path_factory.mktemp("registry"), names=("cvaa",))
    return {"uri": uri, "model": models["cvaa"]}


@pytest.fixture(scope="module")
def round_trip(real_ct_paths):
    """DRRs of the real abdomen CT with the cpu geometry, and its prepared cube."""
    xrays, prepared = inference.xrays_from_ct(str(real_ct_paths["abdomen"]), CFG)
    return xrays, prepared


def _run(argv, registry, capsys):
    code = JOB.main([*argv, "--mlflow-uri", registry["uri"]] if "--mlflow-uri" not in argv
                    else argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _png(path, image01, bits):
    dtype, peak = (np.uint8, 255) if bits == 8 else (np.uint16, 65535)
    Image.fromarray(np.round(image01 * peak).astype(dtype)).save(path)
    return path


def _dicom_xray(path, image01, monochrome1=False, tags=None):
    """A DX image as a detector would store it (uint16, rescale 1/0), with ``tags``
    (keyword -> value) in its header, written as they are (no value validation)."""
    pixels = np.round(image01 * 4095).astype(np.uint16)
    if monochrome1:
        pixels = (4095 - pixels).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, \
        meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.PixelData = pixels.tobytes()
    with pydicom.config.disable_value_validation():
        for keyword, value in (tags or {}).items():
            setattr(ds, keyword, value)
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- library

def test_png_16_bit_reads_back_the_drr_and_the_window_restores_it(tmp_path, round_trip):
    xrays, _ = round_trip
    pa = inference.read_xray(_png(tmp_path / "pa.png", xrays[0], 16))
    assert pa.shape == xrays[0].shape
    np.testing.assert_allclose(pa / 65535, xrays[0], atol=1 / 65535)
    # A min-max window onto the DRR's own range is the identity (up to quantisation).
    lo, hi = float(xrays[0].min()), float(xrays[0].max())
    back = inference.normalize_xray(pa, (0, 100), (lo, hi))
    np.testing.assert_allclose(back, xrays[0], atol=2e-5)


@pytest.mark.parametrize("name", ["pa.nii.gz", "pa.mha", "pa.tif", "pa_rgb.png"])
def test_other_formats_read_as_displayed(tmp_path, round_trip, name):
    import SimpleITK as sitk

    image = np.round(round_trip[0][0] * 65535).astype(np.uint16)   # rows S->I, as shown
    path = tmp_path / name
    if name.endswith(".tif"):
        Image.fromarray(image).save(path)
    elif name.endswith("_rgb.png"):
        image = (image // 257).astype(np.uint8)
        Image.fromarray(np.stack([image] * 3, axis=-1), mode="RGB").save(path)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
    np.testing.assert_allclose(inference.read_xray(path), image, atol=0.01)


def test_normalize_is_monotonic_and_invert_flips(round_trip):
    image = round_trip[0][1] * 1000 + 7.0
    out = inference.normalize_xray(image, value_range=(0.0, 0.5))
    assert out.min() == 0.0 and out.max() == pytest.approx(0.5)
    order = np.argsort(image.ravel(), kind="stable")
    assert (np.diff(out.ravel()[order]) >= 0).all()          # monotonic non-decreasing
    inverted = inference.normalize_xray(-image, value_range=(0.0, 0.5), invert=True)
    np.testing.assert_allclose(inverted, out, atol=1e-6)
    assert inference.default_xray_range(CFG) == (0.0, 6.0 / CFG.drr.log_scale)


def test_fit_detector_centre_crops_and_resizes():
    image = np.zeros((40, 60), np.float32)
    image[:, 10:50] = 1.0                                     # the central 40x40 square
    out = inference.fit_detector(image, 20)
    assert out.shape == (20, 20)
    np.testing.assert_allclose(out, 1.0)                      # the crop kept only the square


def test_dicom_monochrome1_is_inverted_to_bone_bright(tmp_path, round_trip):
    xrays, _ = round_trip
    mono2 = inference.read_xray(_dicom_xray(tmp_path / "m2.dcm", xrays[0]))
    mono1 = inference.read_xray(_dicom_xray(tmp_path / "m1.dcm", xrays[0], monochrome1=True))
    np.testing.assert_allclose(mono2, np.round(xrays[0] * 4095), atol=0)
    # Inverted back about its own range: the same picture up to an offset.
    np.testing.assert_allclose(mono1 - mono1.min(), mono2 - mono2.min(), atol=0)


def test_dicom_series_writer_reads_back_with_read_ct(tmp_path, round_trip):
    _, prepared = round_trip
    volume = prepared.cube                                   # real HU, canonical geometry
    files = inference.write_dicom_series(volume, tmp_path / "series")
    assert len(files) == volume.shape[0]
    back = read_ct(tmp_path / "series")                      # GDCM series reader, HU check
    assert back.shape == volume.shape
    assert back.spacing_mm == pytest.approx(volume.spacing_mm)
    canon = orient_canonical(back)
    assert canon.direction == pytest.approx(CANONICAL_DIRECTION)
    assert canon.origin_mm == pytest.approx(volume.origin_mm, abs=1e-4)
    np.testing.assert_allclose(canon.array, np.rint(volume.array), atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    # Without a model named, still an estimate, in an anonymous patient's new study.
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.SeriesDescription == "CT estimate from 2 X-rays"
    assert ds.ImageComments.startswith("Not an acquired CT: a CT volume estimated by a ")
    assert ds.PatientID == "ANONYMOUS" and list(ds.ImageType)[0] == "DERIVED"


# --------------------------------------------------------------------------- the job

def test_round_trip_from_ct_writes_nifti_with_training_geometry(tmp_path, registry,
                                                                round_trip, real_ct_paths,
                                                                capsys):
    out = tmp_path / "ct.nii.gz"
    code, stdout, err = _run(["--model", registry["model"], "--from-ct",
                              str(real_ct_paths["abdomen"]), "--out", str(out)],
                             registry, capsys)
    assert code == 0, err
    volume = read_ct(out, check_hu=False)                   # an untrained model: no air
    assert volume.shape == (32, 32, 32)
    assert volume.spacing_mm == pytest.approx((8.0, 8.0, 8.0))
    assert volume.direction == pytest.approx(CANONICAL_DIRECTION)
    xrays, prepared = round_trip
    assert volume.origin_mm == pytest.approx(prepared.cube.origin_mm, abs=1e-4)
    # The file holds denormalize(G(DRRs)) of the registered model: sample 0 of the
    # reliability's batched pass, equal to a plain pass up to float rounding (batch-size
    # dependent kernels: <= 0.003 HU measured).
    model = tracking.load_generator(registry["model"], registry["uri"])
    expected = denormalize(inference.reconstruct(model, xrays), CFG.preprocess.clip_hu)
    np.testing.assert_allclose(volume.array, expected, atol=0.01)
    assert "against the prepared CT: mae" in stdout and "ssim_x2ct" in stdout
    assert "time:" in stdout


@pytest.mark.parametrize("bits", [8, 16])
def test_png_inputs(tmp_path, registry, round_trip, bits, capsys):
    xrays, _ = round_trip
    pa, lat = (_png(tmp_path / f"{v}.png", xrays[i], bits) for i, v in enumerate(("pa", "lat")))
    out = tmp_path / "out" / "ct.mha"
    code, stdout, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                              str(lat), "--out", str(out)], registry, capsys)
    assert code == 0, err
    volume = read_ct(out, check_hu=False)
    assert volume.shape == (32, 32, 32)
    assert volume.direction == pytest.approx(CANONICAL_DIRECTION)
    assert volume.origin_mm == pytest.approx((-124.0, -124.0, 124.0))  # centred on 0
    lo, hi = CFG.preprocess.clip_hu
    assert lo <= volume.array.min() and volume.array.max() <= hi


def test_large_dicom_inputs_to_dicom_series(tmp_path, registry, round_trip, capsys):
    xrays, _ = round_trip
    # A detector of 96 x 128 pixels: centre-cropped to 96^2, then resized to 32^2.
    big = [np.kron(x, np.ones((3, 3))) for x in xrays]
    big = [np.pad(b, ((0, 0), (16, 16)), mode="edge") for b in big]
    pa = _dicom_xray(tmp_path / "pa.dcm", big[0])
    lat = _dicom_xray(tmp_path / "lat.dcm", big[1], monochrome1=True)
    out = tmp_path / "series"
    code, stdout, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                              str(lat), "--out", str(out), "--dicom"], registry, capsys)
    assert code == 0, err
    assert len(list(out.glob("*.dcm"))) == 32 and "32 DICOM slices" in stdout
    volume = read_ct(out, check_hu=False)
    assert volume.shape == (32, 32, 32)
    assert volume.spacing_mm == pytest.approx((8.0, 8.0, 8.0))


def _bad_cases(tmp_path, registry, round_trip, real_ct_paths):
    xrays, _ = round_trip
    pa = _png(tmp_path / "pa.png", xrays[0], 16)
    lat = _png(tmp_path / "lat.png", xrays[1], 16)
    small = _png(tmp_path / "lat_small.png", xrays[1][:24, :24], 16)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    ct = str(real_ct_paths["abdomen"])
    model = registry["model"]
    views = ["--pa", str(pa), "--lateral", str(lat)]
    return {
        "missing view": (["--model", model, "--pa", str(pa)], "--lateral"),
        "mismatched sizes": (["--model", model, "--pa", str(pa), "--lateral", str(small)],
                             "differ in size"),
        "non-image": (["--model", model, "--pa", str(text), "--lateral", str(lat)],
                      f"{text}: not an image file"),
        "3D as X-ray": (["--model", model, "--pa", str(pa), "--lateral", ct],
                        f"{ct}: 3D image"),
        "missing file": (["--model", model, "--pa", str(tmp_path / "nope.png"),
                          "--lateral", str(lat)], "nope.png: no such file"),
        "unknown model": (["--model", "models:/no-such-model@candidate", *views],
                          "no registered model 'no-such-model'"),
        "unknown alias": (["--model", model.replace("@candidate", "@production"), *views],
                          "has no alias 'production'"),
        "unreachable server": (["--model", model, *views, "--mlflow-uri",
                                f"http://127.0.0.1:{_free_port()}"], "unreachable"),
        "bad output suffix": (["--model", model, *views], "unsupported output suffix"),
    }


BAD = ["missing view", "mismatched sizes", "non-image", "3D as X-ray", "missing file",
       "unknown model", "unknown alias", "unreachable server", "bad output suffix"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_clearly_and_writes_nothing(case, tmp_path, registry, round_trip,
                                                    real_ct_paths, capsys):
    argv, message = _bad_cases(tmp_path, registry, round_trip, real_ct_paths)[case]
    out_dir = tmp_path / "out"
    out = out_dir / ("ct.txt" if case == "bad output suffix" else "ct.nii.gz")
    before = set(tmp_path.rglob("*"))
    code, stdout, err = _run([*argv, "--out", str(out)], registry, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert not out.exists() and not out_dir.exists()
    assert set(tmp_path.rglob("*")) == before                 # no stray temp files either


def test_cli_exit_status_in_a_subprocess(tmp_path):
    out = tmp_path / "ct.nii.gz"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "reconstruct.py"), "--model",
                           "models:/x@y", "--lateral", "lat.png", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: missing X-ray view: --pa" in proc.stderr
    assert not out.exists()


def test_dicom_output_refuses_a_non_empty_directory(tmp_path, registry, round_trip, capsys):
    xrays, _ = round_trip
    out = tmp_path / "series"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's file")
    pa, lat = (_png(tmp_path / f"{v}.png", xrays[i], 8) for i, v in enumerate(("pa", "lat")))
    code, _, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                         str(lat), "--out", str(out), "--dicom"], registry, capsys)
    assert code == 2 and "not an empty directory" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_reconstruct_rejects_wrong_shapes():
    g = torch.nn.Conv2d(2, 1, 1)
    with pytest.raises(ValueError, match=r"\(2, P, P\)"):
        inference.reconstruct(g, np.zeros((1, 32, 32), np.float32))


# --------------------------------------------------------------------------- DICOM identity

# One patient's PA and lateral, as a DX modality would store them. The birth date is in the
# old ACR-NEMA form, which pydicom's value validation would quote in a warning.
PATIENT = {
    "SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen^Quirin",
    "PatientID": "PID-77813-XQ", "PatientBirthDate": "1961.02.03", "PatientSex": "M",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.7781300001", "StudyDate": "20240102",
    "StudyTime": "101112", "AccessionNumber": "ACC-4471-ZZ", "StudyID": "STUDY-7743",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.7781300002",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.7781300003",
}
# What must not leak: every identifying value, in the input's and in UTF-8 encoding.
PLANTED = ["Müller", "Jürgen", "Quirin", "PID-77813-XQ", "1961.02.03", "7781300001",
           "ACC-4471-ZZ", "STUDY-7743", "20240102"]
LABEL = "CT estimate from 2 X-rays (tiny-cvaa v1)"


def _dicom_pair(tmp_path, round_trip, lateral_tags=None):
    xrays, _ = round_trip
    pa = _dicom_xray(tmp_path / "pa.dcm", xrays[0], tags=PATIENT)
    lat = _dicom_xray(tmp_path / "lat.dcm", xrays[1], monochrome1=True,
                      tags={**PATIENT, **(lateral_tags or {})})
    return pa, lat


def _series(out):
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 32
    return [pydicom.dcmread(str(f)) for f in files]


def _leaks(text_or_bytes):
    data = text_or_bytes if isinstance(text_or_bytes, bytes) else text_or_bytes.encode()
    return [v for v in PLANTED for enc in ("utf-8", "latin-1") if v.encode(enc) in data]


def _assert_labelled(ds):
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.Modality == "CT"
    assert ds.SeriesDescription == LABEL and len(ds.SeriesDescription) <= 64
    comments = ("Not an acquired CT: a CT volume estimated by the CVAA-GAN model "
                "models:/tiny-cvaa@candidate (registry version 1) from a PA and a lateral "
                "radiograph. Not for diagnosis.")
    assert ds.ImageComments == comments and ds.DerivationDescription == comments
    assert ds.Manufacturer == "cvaa"
    assert ds.ManufacturerModelName == "tiny-cvaa@candidate (v1)"


def test_dicom_inputs_file_the_series_with_their_patient_and_study(
        tmp_path, registry, round_trip, capsys, caplog, recwarn):
    pa, lat = _dicom_pair(tmp_path, round_trip)
    out = tmp_path / "series"
    code, stdout, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                              str(lat), "--out", str(out), "--dicom"], registry, capsys)
    assert code == 0, err
    assert "with the radiographs' patient and study" in stdout
    series = _series(out)
    inputs = [pydicom.dcmread(str(f)) for f in (pa, lat)]
    for ds in series:
        _assert_labelled(ds)
        assert str(ds.PatientName) == PATIENT["PatientName"]     # re-encoded as UTF-8
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        for keyword in ("PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
            assert ds.data_element(keyword).value == PATIENT[keyword], keyword
        assert "PatientIdentityRemoved" not in ds
    # A new series in the patient's study: its own series, instance and frame UIDs.
    input_uids = {str(x.get(k)) for x in inputs for k in ("SeriesInstanceUID",
                                                          "SOPInstanceUID",
                                                          "FrameOfReferenceUID")}
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == 32
    new_uids = {ds.SeriesInstanceUID, ds.FrameOfReferenceUID} | {
        d.SOPInstanceUID for d in series}
    assert not new_uids & input_uids
    # The identifiers went into the files only: not to the console, logs or warnings.
    assert not _leaks(stdout + err) and not _leaks(caplog.text)
    assert not _leaks(" ".join(str(w.message) for w in recwarn))


def test_anonymize_writes_no_input_identifier(tmp_path, registry, round_trip, capsys):
    pa, lat = _dicom_pair(tmp_path, round_trip)
    out = tmp_path / "series"
    code, stdout, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                              str(lat), "--out", str(out), "--dicom", "--anonymize"],
                             registry, capsys)
    assert code == 0, err
    assert "anonymized" in stdout and not _leaks(stdout + err)
    for ds in _series(out):
        _assert_labelled(ds)
        assert ds.PatientName == "ANONYMOUS" and ds.PatientID == "ANONYMOUS"
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
        assert ds.StudyInstanceUID != PATIENT["StudyInstanceUID"]
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
            assert keyword not in ds, keyword
    leaked = {f.name: _leaks(f.read_bytes()) for f in out.iterdir()}
    assert not any(leaked.values()), leaked
    # The scan finds the identifiers where they are (the inputs): it can fail.
    assert set(_leaks(pa.read_bytes())) == set(PLANTED)


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID"])
def test_radiographs_of_two_patients_or_studies_are_refused(keyword, tmp_path, registry,
                                                            round_trip, capsys):
    other = {"PatientID": "PID-OTHER-99",
             "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.99"}[keyword]
    pa, lat = _dicom_pair(tmp_path, round_trip, lateral_tags={keyword: other})
    out = tmp_path / "series"
    before = set(tmp_path.rglob("*"))
    code, stdout, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                              str(lat), "--out", str(out), "--dicom"], registry, capsys)
    assert code == 2
    assert err.startswith(f"error: {pa}, {lat}: ") and keyword in err, err
    assert not _leaks(stdout + err) and "PID-OTHER-99" not in err
    assert not out.exists() and set(tmp_path.rglob("*")) == before


def test_png_inputs_to_dicom_are_labelled_and_anonymous(tmp_path, registry, round_trip,
                                                        capsys):
    xrays, _ = round_trip
    pa, lat = (_png(tmp_path / f"{v}.png", xrays[i], 16) for i, v in enumerate(("pa", "lat")))
    out = tmp_path / "series"
    code, stdout, err = _run(["--model", registry["model"], "--pa", str(pa), "--lateral",
                              str(lat), "--out", str(out), "--dicom"], registry, capsys)
    assert code == 0, err
    assert "patient ANONYMOUS, new study" in stdout
    series = _series(out)
    for ds in series:
        _assert_labelled(ds)
        assert ds.PatientName == "ANONYMOUS" and ds.PatientID == "ANONYMOUS"
        assert "PatientIdentityRemoved" not in ds and "AccessionNumber" not in ds
    assert len({ds.StudyInstanceUID for ds in series}) == 1


def test_anonymize_needs_dicom_output(tmp_path, registry, capsys):
    out = tmp_path / "ct.nii.gz"
    code, _, err = _run(["--model", registry["model"], "--pa", "pa.dcm", "--lateral",
                         "lat.dcm", "--out", str(out), "--anonymize"], registry, capsys)
    assert code == 2 and "error: --anonymize applies to a DICOM series" in err
    assert not out.exists()


def test_pair_identity_needs_two_dicom_files_and_hides_its_values(tmp_path, round_trip):
    pa, lat = _dicom_pair(tmp_path, round_trip)
    png = _png(tmp_path / "lat.png", round_trip[0][1], 8)
    assert inference.read_dicom_identity(png) is None
    assert inference.read_pair_identity(pa, png) is None
    identity = inference.read_pair_identity(pa, lat)
    assert identity.patient_id == PATIENT["PatientID"]
    assert identity.accession_number == PATIENT["AccessionNumber"]
    assert not _leaks(repr(identity)) and not _leaks(str(identity))


@pytest.mark.parametrize("uri, version, description", [
    ("models:/cvaa-gan@candidate", "3", "CT estimate from 2 X-rays (cvaa-gan v3)"),
    ("models:/cvaa-gan/12", "12", "CT estimate from 2 X-rays (cvaa-gan v12)"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "",
     "CT estimate from 2 X-rays (runs:/0123456789abcdef0123456789a...)"),
    ("models:/" + "n" * 80 + "@a", "7",
     "CT estimate from 2 X-rays (" + "n" * 30 + "... v7)"),
])
def test_estimate_label_fits_dicom_lengths_and_keeps_the_version(uri, version, description):
    label = inference.estimate_label(uri, version=version, generator="x2ct")
    assert label.series_description == description
    assert len(label.series_description) <= 64 and len(label.model_name) <= 64
    assert label.model_name == uri[:61] + ("..." if len(uri) > 64 else "")
    assert label.comments.startswith("Not an acquired CT: a CT volume estimated by the "
                                      f"X2CT-GAN model {uri}")
    assert (f"(registry version {version})" in label.comments) == bool(version)
    assert label.comments.endswith("Not for diagnosis.")
