"""DICOM exports built from phantoms for the discovery tests: a study as a PACS exports it
(localizer, axial CT in two slice spacings, two kernels, a contrast phase, a coronal
reformat, an MR and a dose SR), and a study of broken files. Small (24x24 slices) and fast.
"""

from __future__ import annotations

from pathlib import Path

from cvaa.data.dicom_export import (MR_IMAGE, SECONDARY_CAPTURE, SeriesTags, StudyTags,
                                    localizer_dataset, report_dataset, slice_datasets, uid,
                                    write_export)
from cvaa.data.io import Volume
from cvaa.data.phantom import generate_phantom

# What each series of the mixed study is, by SeriesNumber, and the reason kind it gets
# under the default rule at the paper's 2 mm grid.
MIXED_KINDS = {1: "localizer", 3: "not_chosen", 4: "not_chosen", 5: "not_axial",
               6: "not_ct", 7: "not_ct", 8: "not_chosen", 9: "secondary_capture"}
CHOSEN = 2


def phantom_volume(seed: int = 0) -> Volume:
    """A 36-slice phantom, 24x24 pixels of 8 mm (body and air around it), slices 1.25 mm
    apart (anisotropic, as a thin-slice CT series is)."""
    ph = generate_phantom(seed, shape=(36, 24, 24), spacing_mm=8.0).volume
    return Volume(ph.array, (8.0, 8.0, 1.25), ph.origin_mm, ph.direction)


def mixed_study(patient: str = "PAT1", seed: int = 0) -> list:
    """The datasets of one study as a hospital exports it (see ``MIXED_KINDS``)."""
    vol = phantom_volume(seed)
    study = StudyTags(patient, uid("study", patient))

    def tags(n: int, description: str, **kw) -> SeriesTags:
        return SeriesTags(uid("series", patient, n), n, description, **kw)

    return [
        localizer_dataset(vol, study, tags(1, "Topogram", image_type=(
            "ORIGINAL", "PRIMARY", "LOCALIZER"))),
        *slice_datasets(vol, study, tags(2, "Abdomen 1.25 B30f")),
        *slice_datasets(vol, study, tags(3, "Abdomen 2.5 B30f"), every=2),
        *slice_datasets(vol, study, tags(4, "Abdomen 1.25 B70f", kernel="B70f")),
        *slice_datasets(vol, study, tags(5, "Cor MPR 2.0", image_type=(
            "DERIVED", "SECONDARY", "MPR")), plane="coronal"),
        *slice_datasets(vol, study, tags(6, "T1 axial", modality="MR",
                                         sop_class=MR_IMAGE))[:16],
        report_dataset(study, tags(7, "Dose Report", modality="SR")),
        *slice_datasets(vol, study, tags(8, "Venous 1.25 B30f", contrast="IOMERON 350",
                                         acquisition=2)),
        slice_datasets(vol, study, tags(9, "Patient Protocol", sop_class=SECONDARY_CAPTURE,
                                        image_type=("DERIVED", "SECONDARY", "OTHER")))[0],
    ]


def write_broken_study(root: Path) -> dict[str, str]:
    """A second study (PAT2) whose axial series loses files to damage, a series split over
    two folders with one image exported twice, and foreign files: returns what each
    damaged path is (``{"truncated": path, ...}``)."""
    vol = phantom_volume(1)
    study = StudyTags("PAT2", uid("study", "PAT2"))
    good = slice_datasets(vol, study, SeriesTags(uid("series", "PAT2", 2), 2, "Axial"))
    # Series 3: one slice of another size; series 4 split over two folders (complete).
    mixed = slice_datasets(vol, study, SeriesTags(uid("series", "PAT2", 3), 3, "Mixed"))
    small = slice_datasets(Volume(vol.array[:, :20, :20], vol.spacing_mm, vol.origin_mm,
                                  vol.direction), study,
                           SeriesTags(uid("series", "PAT2", 3), 3, "Mixed"))
    mixed[5] = small[5]
    split = slice_datasets(vol, study, SeriesTags(uid("series", "PAT2", 4), 4, "Split"))
    files = write_export(good + mixed, root / "PAT2" / "study", layout="flat",
                         suffix=".dcm")
    write_export(split[:18], root / "PAT2" / "split_a", layout="flat")
    write_export(split[18:], root / "PAT2" / "split_b", layout="flat")
    # One image of the split series exported twice, under another name (sorted after).
    write_export(split[3:4], root / "PAT2" / "split_c" / "copies", layout="flat",
                 suffix=".dcm")
    by_uid = {Path(f).stem: f for f in files}
    axial = [by_uid[ds.SOPInstanceUID] for ds in good]
    out = {"truncated": axial[10], "cut_header": axial[20], "no_pixels": axial[30]}
    data = Path(out["truncated"]).read_bytes()
    Path(out["truncated"]).write_bytes(data[:-300])              # pixel data cut short
    Path(out["cut_header"]).write_bytes(Path(out["cut_header"]).read_bytes()[:400])
    from pydicom import dcmread

    ds = dcmread(out["no_pixels"])
    del ds.PixelData, ds.Rows, ds.Columns                      # no image pixel module
    ds.save_as(out["no_pixels"], enforce_file_format=True)
    (root / "PAT2" / "README.txt").write_text("exported by PACS\n")
    (root / "PAT2" / "empty").write_bytes(b"")
    out["not_dicom"] = str(root / "PAT2" / "README.txt")
    out["empty"] = str(root / "PAT2" / "empty")
    out["duplicate"] = str(root / "PAT2" / "split_c" / "copies" /
                           f"{split[3].SOPInstanceUID}.dcm")
    return out

