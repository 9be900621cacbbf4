"""DICOM discovery at the edges: headers read on Ray Data workers, the chosen series
prepared by the pipeline with every other file and series in the manifest; an S3 prefix."""

import json
from pathlib import Path

import pytest

from cvaa.config import load_config
from cvaa.data.dataset import archive_inputs
from cvaa.data.dicom_export import write_export
from cvaa.data.io import read_dicom_files
from cvaa.distributed.pipeline import discover_inputs, run_pipeline
from dicomexports import CHOSEN, mixed_study, write_broken_study


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """PAT1's mixed study (nested, extension-less) and PAT2's broken one."""
    root = tmp_path_factory.mktemp("export")
    write_export(mixed_study(), root, layout="nested")
    return root, write_broken_study(root)


def _comparable(found) -> tuple:
    return ([(i.uri, i.case_id, i.patient_id, i.files) for i in found.inputs],
            sorted(json.dumps(n, sort_keys=True) for n in found.not_used))


@pytest.mark.ray
def test_ray_discovery_equals_serial_and_the_pipeline_prepares_the_chosen(export, ray_local,
                                                                          tmp_path):
    root, bad = export
    cfg = load_config("cpu")
    lines: list[str] = []
    found = discover_inputs(str(root), cfg, None, workers=2, log=lines.append)
    assert _comparable(found) == _comparable(archive_inputs(str(root), None, cfg))
    assert any(line.startswith("[dicom] ") and "files/s" in line for line in lines)
    summary = next(line for line in lines if "cases in" in line)
    assert f"{found.summary['files']} files, 2 studies" in summary and "1 truncated" not in \
        summary and "2 truncated" in summary

    manifest = run_pipeline(found.inputs, cfg, str(tmp_path / "out"), workers=2,
                            archive=found, log=lines.append)
    prepared = {r["source_uri"]: r for r in manifest["prepared"]}
    assert sorted(prepared) == sorted(i.uri for i in found.inputs) and len(prepared) == 2
    assert manifest["rejected"] == []
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {n.get("uri"): n for n in on_disk["not_used"]}
    assert reasons[bad["truncated"]]["kind"] == "truncated"
    assert on_disk["dicom"]["summary"]["cases"] == 2
    assert {c["series"].split()[1] for c in on_disk["dicom"]["cases"]} == {str(CHOSEN), "4"}


@pytest.mark.s3
def test_discovery_under_an_s3_prefix_equals_the_local_one(export, s3_server, s3_bucket):
    """Headers by ranged GETs: the same cases and reasons (truncated, cut, empty and
    foreign files included) as from the local copy."""
    from cvaa.data.io import s3_client

    root, _ = export
    client = s3_client()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(f), s3_bucket, f"pacs/{f.relative_to(root)}")
    prefix = f"s3://{s3_bucket}/pacs"
    found = archive_inputs(prefix, None, load_config("cpu"))
    local = archive_inputs(str(root), None, load_config("cpu"))

    def relative(uri: str) -> str:
        return uri[len(prefix) + 1:] if uri.startswith(prefix) else \
            str(Path(uri).relative_to(root))

    assert [[relative(f) for f in i.files] for i in found.inputs] == \
        [[relative(f) for f in i.files] for i in local.inputs]
    assert sorted((n["kind"], relative(n.get("uri", prefix + "/-").split("#")[0]))
                  for n in found.not_used) == \
        sorted((n["kind"], relative(n.get("uri", str(root / "-")).split("#")[0]))
               for n in local.not_used)
    vol = read_dicom_files(found.inputs[0].files, found.inputs[0].uri)
    assert vol.shape == (36, 24, 24)
