"""DICOM export discovery (cvaa.data.dicom_index): exports built from phantoms as a PACS
writes them, in nested, flat and DICOMDIR layouts, plus broken files and the real series."""

from pathlib import Path

import numpy as np
import pytest

from cvaa.config import Config, ConfigError, DicomConfig, load_config
from cvaa.data.dataset import archive_inputs, list_inputs
from cvaa.data.dicom_export import write_export
from cvaa.data.dicom_index import (index_headers, orientation_name, read_header, read_headers,
                                   select_series, slice_spacing_problem)
from cvaa.data.io import read_ct, read_dicom_files
from dicomexports import CHOSEN, MIXED_KINDS, mixed_study, phantom_volume, write_broken_study


@pytest.fixture(scope="module")
def study():
    return mixed_study()


@pytest.fixture(scope="module")
def exports(study, tmp_path_factory) -> dict[str, Path]:
    """The mixed study written once per layout: nested with ``.dcm``, flat without
    extensions, DICOMDIR."""
    root = tmp_path_factory.mktemp("exports")
    for layout, suffix in (("nested", ".dcm"), ("flat", ""), ("dicomdir", "")):
        write_export(study, root / layout, layout=layout, suffix=suffix)
    return {layout: root / layout for layout in ("nested", "flat", "dicomdir")}


@pytest.fixture(scope="module")
def headers(exports) -> dict[str, list[dict]]:
    """Each layout's headers, read once."""
    return {layout: list(read_headers(_files(root))) for layout, root in exports.items()}


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def _select(root: Path | list[dict], cfg: DicomConfig = DicomConfig(), grid_mm: float = 2.0):
    """The selection under a folder, or from headers read already."""
    found = root if isinstance(root, list) else read_headers(_files(root))
    return select_series(index_headers(found), cfg, grid_mm)


def _kinds(selection) -> dict[str, str]:
    """``{series description or file name: reason kind}`` of what was not used."""
    return {(n["series"].split("'")[1] if n["level"] == "series" else
             Path(n.get("uri", n.get("study", ""))).name): n["kind"]
            for n in selection.not_used}


def _number(case) -> int:
    return case.series.series_number


# --------------------------------------------------------------------------- the rule

def test_mixed_study_yields_its_axial_ct_and_a_reason_for_every_other_series(exports,
                                                                            headers):
    written = _files(exports["nested"])
    sel = _select(headers["nested"])
    assert [_number(c) for c in sel.cases] == [CHOSEN]
    (case,) = sel.cases
    assert len(case.files) == 36 and case.spacing_mm == pytest.approx(1.25)
    by_number = {int(n["series"].split()[1]): n for n in sel.not_used}
    assert {k: n["kind"] for k, n in by_number.items()} == MIXED_KINDS
    reasons = {k: n["reason"] for k, n in by_number.items()}
    assert reasons[6] == "not CT: MR" and reasons[7] == "not CT: SR"
    assert "coarser than the 2 mm grid" in reasons[3]
    assert "sharp kernel B70f" in reasons[4] and "with contrast (IOMERON 350)" in reasons[8]
    assert reasons[5] == "not axial: coronal"
    # Every file is in the chosen series or counted in a series not used.
    assert len(case.files) + sum(n["files"] for n in sel.not_used) == len(written)
    assert sel.summary()["files"] == len(written)


@pytest.mark.parametrize("layout", ["flat", "dicomdir"])
def test_flat_and_dicomdir_layouts_give_the_same_cases(headers, layout):
    nested, other = _select(headers["nested"]), _select(headers[layout])
    assert [c.series.series_key for c in other.cases] == \
        [c.series.series_key for c in nested.cases]
    assert [c.files for c in other.cases] != [c.files for c in nested.cases]  # other paths
    expected = {k: v for k, v in _kinds(nested).items()}
    if layout == "dicomdir":  # the index file itself is listed, not read as an image
        expected["DICOMDIR"] = "dicomdir"
        assert all("." not in Path(f).name for f in other.cases[0].files)  # IM000000 ...
    assert _kinds(other) == expected


def test_chosen_series_reads_as_the_phantom(headers):
    (case,) = _select(headers["flat"]).cases
    from cvaa.data.preprocess import orient_canonical

    # Files come in ascending position (inferior first): the same voxels, k flipped.
    vol = orient_canonical(read_dicom_files(case.files, case.series.uri))
    expected = phantom_volume()
    assert vol.shape == expected.shape
    assert vol.spacing_mm == pytest.approx(expected.spacing_mm)
    assert vol.direction == pytest.approx(expected.direction)
    assert vol.origin_mm == pytest.approx(expected.origin_mm, abs=1e-3)
    np.testing.assert_array_equal(vol.array, np.round(expected.array))


@pytest.mark.parametrize("overrides,chosen", [
    ({"prefer_kernel": "sharp"}, [4]),
    ({"prefer_contrast": "with"}, [8]),
    ({"max_slice_spacing_mm": 3.0, "prefer_kernel": "any", "prefer_contrast": "any"},
     [CHOSEN]),
    ({"keep": "all"}, [2, 8, 4, 3]),
    ({"keep": "all", "orientation": "any"}, [2, 8, 4, 3, 5]),   # coronal: 8 mm apart
    ({"min_slices": 37}, []),
])
def test_overrides_change_the_choice(headers, overrides, chosen):
    cfg = load_config("paper", overrides={f"dicom.{k}": v for k, v in overrides.items()})
    sel = _select(headers["flat"], cfg.dicom, cfg.preprocess.spacing_mm)
    assert [_number(c) for c in sel.cases] == chosen
    if not chosen:
        assert [n["kind"] for n in sel.not_used].count("no_ct_series") == 1
        assert "36 slices, fewer than dicom.min_slices=37" in {n["reason"]
                                                              for n in sel.not_used}


def test_not_chosen_reason_names_the_preference_that_decided(headers):
    cfg = DicomConfig(max_slice_spacing_mm=3.0)
    reasons = {int(n["series"].split()[1]): n["reason"] for n in
               _select(headers["flat"], cfg).not_used if n["kind"] == "not_chosen"}
    assert reasons[3] == ("not chosen: thicker slices than series 2 'Abdomen 1.25 B30f' "
                          "(2.50 mm vs 1.25 mm)")


def test_keep_all_puts_a_patients_series_on_one_side_of_the_split(study, tmp_path):
    write_export(study, tmp_path / "a", layout="nested")
    write_export([ds for ds in mixed_study("PAT3", seed=3) if ds.SeriesNumber in (2, 8)],
                 tmp_path / "b", layout="nested")
    cfg = Config().override({"dicom.keep": "all"})
    found = archive_inputs(str(tmp_path), b"k" * 32, cfg)
    patients = {i.patient_id for i in found.inputs}
    assert len(found.inputs) == 6 and len(patients) == 2
    assert all(i.patient_id.startswith("patient-") for i in found.inputs)  # pseudonyms
    from cvaa.data.dataset import split_by_patient
    split = split_by_patient([{"case_id": i.case_id, "patient_id": i.patient_id}
                              for i in found.inputs], 0.5, 0)
    assert sorted(map(len, split.values())) == [2, 4]


def test_config_checks_the_rule():
    with pytest.raises(ConfigError, match="dicom.sharp_kernel_pattern"):
        load_config("paper", overrides=["dicom.sharp_kernel_pattern=(b"])
    with pytest.raises(ConfigError, match="dicom.keep"):
        load_config("paper", overrides=["dicom.keep=best"])


# --------------------------------------------------------------------------- bad DICOM

def test_bad_files_never_stop_the_run_and_each_has_a_typed_reason(study, tmp_path):
    write_export([ds for ds in study if ds.SeriesNumber == CHOSEN], tmp_path, layout="nested")
    bad = write_broken_study(tmp_path)
    sel = _select(tmp_path)
    # Both studies still give a case: PAT1 its axial CT, PAT2 its series split over two
    # folders (complete: read as one); PAT2's damaged axial series is refused.
    assert sorted((c.series.patient_id, c.series.description) for c in sel.cases) == [
        ("PAT1", "Abdomen 1.25 B30f"), ("PAT2", "Split")]
    split = next(c for c in sel.cases if c.series.description == "Split")
    assert Path(bad["duplicate"]).parent.name == "copies"        # the copy, not the original
    assert sum(n["kind"] == "duplicate" for n in sel.not_used) == 1
    assert len(split.series.folders) == 2 and len(split.files) == 36
    files = {n["uri"]: n for n in sel.not_used if n["level"] == "file"}
    assert files[bad["truncated"]]["kind"] == "truncated"
    assert "PixelData needs bytes" in files[bad["truncated"]]["reason"]
    assert files[bad["cut_header"]]["kind"] == "truncated"
    assert files[bad["no_pixels"]]["kind"] == "no_pixels"
    assert files[bad["duplicate"]]["reason"].startswith("the same image (SOPInstanceUID) as ")
    assert files[bad["not_dicom"]]["kind"] == files[bad["empty"]]["kind"] == "not_dicom"
    kinds = _kinds(sel)
    assert kinds["Axial"] == "gap" and kinds["Mixed"] == "mixed_sizes"
    axial = next(n for n in sel.not_used if n.get("series", "").endswith("'Axial'"))
    assert axial["reason"].startswith("gap at slice") and "; 2 more" in axial["reason"]


def test_read_header_never_raises(tmp_path):
    missing = read_header(str(tmp_path / "gone"))
    assert missing["problem"] == "unreadable" and "gone" in missing["uri"]
    (tmp_path / "junk").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    junk = read_header(str(tmp_path / "junk"))
    assert junk["problem"] == "corrupt" and junk["reason"] == "corrupt DICOM header: no Modality"


def test_one_uid_with_two_orientations_is_split_into_parts(tmp_path):
    from cvaa.data.dicom_export import SeriesTags, StudyTags, slice_datasets, uid

    vol = phantom_volume()
    study = StudyTags("PAT4", uid("study", "PAT4"))
    tags = SeriesTags(uid("series", "PAT4", 1), 1, "Axial+Cor")
    write_export(slice_datasets(vol, study, tags) +
                 slice_datasets(vol, study, tags, plane="coronal"), tmp_path, layout="flat")
    sel = _select(tmp_path)
    assert [c.series.part for c in sel.cases] == ["axial"]
    assert [(n["kind"], n["series"]) for n in sel.not_used] == [
        ("not_axial", "series 1 'Axial+Cor' (coronal)")]
    assert sel.cases[0].series.uri.endswith("/axial")


# --------------------------------------------------------------------------- real data

def test_real_series_is_discovered_and_reads_as_read_ct(real_ct_paths):
    folder = real_ct_paths["dicom"]
    found = archive_inputs(str(folder), None, Config())
    (item,) = found.inputs
    assert len(item.files) == 20 and found.not_used == []
    assert found.summary["files"] == 20 and found.summary["cases"] == 1
    # Anonymised: blank Study/Series UIDs; grouped by folder, series number and frame.
    assert "#nouid-" in item.uri
    a, b = read_dicom_files(item.files, item.uri), read_ct(folder)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.spacing_mm == pytest.approx(b.spacing_mm)
    header = read_header(item.files[0])
    assert header["kernel"] == "Br38f\\3" and header["contrast"] == "APPLIED"
    assert orientation_name(header["orientation"]) == "axial"


def test_list_inputs_of_a_directory_discovers_series(exports):
    (item,) = list_inputs(str(exports["nested"]))
    assert len(item.files) == 36 and item.patient_id == "PAT1"


# --------------------------------------------------------------------------- pure helpers

@pytest.mark.parametrize("z,kind", [
    ([0, 2, 4, 6, 8], None),
    ([8, 0, 4, 2, 6], None),                  # any order
    ([0, 2, 4, 8, 10], "gap"),
    ([0, 2, 4, 6.7, 8], "uneven_spacing"),
    ([0, 2, 2, 4], "duplicate_positions"),
])
def test_slice_spacing_problem(z, kind):
    problem = slice_spacing_problem(z)
    assert (problem[0] if problem else None) == kind


def test_gap_names_the_missing_slice():
    assert slice_spacing_problem([0, 2, 4, 8, 10])[1].startswith("gap at slice 4: 1 missing")


@pytest.mark.parametrize("orientation,name", [
    ((1, 0, 0, 0, 1, 0), "axial"),
    ((1, 0, 0, 0, 0, -1), "coronal"),
    ((0, 1, 0, 0, 0, -1), "sagittal"),
    ((1, 0, 0, 0, 0.7071, 0.7071), "oblique"),
    ((1, 0, 0, 0, 0.966, 0.259), "axial"),     # 15 degrees gantry tilt
])
def test_orientation_name(orientation, name):
    assert orientation_name(orientation) == name


def test_header_order_does_not_change_the_selection(headers):
    """Ray workers return headers in any order: the same cases and reasons."""
    import random

    reference = _select(headers["nested"])
    shuffled = list(headers["nested"])
    random.Random(0).shuffle(shuffled)
    other = _select(shuffled)
    assert [c.files for c in other.cases] == [c.files for c in reference.cases]
    assert sorted(map(str, other.not_used)) == sorted(map(str, reference.not_used))


@pytest.mark.parametrize("folders,uri", [
    (["/x/y/2"], "/x/y/2#K"),
    (["/x/y/2", "/x/z"], "/x#K"),
    (["s3://b/pacs/ST/2", "s3://b/pacs/ST/20"], "s3://b/pacs/ST#K"),   # not ".../ST/2"
])
def test_series_uri_is_the_common_folder(folders, uri):
    from cvaa.data.dicom_index import Series

    files = [(f"{folder}/IM1", 0.0, 1, 8, 8) for folder in folders]
    series = Series("study", "K", "", "p", "CT", "", (), 1, "", "", "", None, files=files)
    assert series.uri == uri
