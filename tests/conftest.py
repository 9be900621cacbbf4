"""Shared fixtures: the real CTs in ../shared/data (read-only) and a real S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CVAA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CT test data (read-only: never write next to it)."""
    if not (SHARED_DATA / "ct").is_dir():
        pytest.fail(f"real CT test data not found at {SHARED_DATA}; set CVAA_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_ct_paths(shared_data) -> dict[str, Path]:
    return {
        "abdomen": shared_data / "ct" / "abdomen_lumbar_3mm.nii.gz",
        "aorta": shared_data / "ct" / "thorax_aorta_1p5mm.nii.gz",
        "pulmonary": shared_data / "ct" / "thorax_pulmonary_1p5mm.nii.gz",
        "dicom": shared_data / "dicom_series",
        "mr": shared_data / "mr" / "abdomen_mr.nii.gz",
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the whole session, stopped by PID at the end.

    Sets the AWS_* variables (endpoint, keys) so boto3's standard chain finds it.
    """
    from s3server import SeaweedS3, environment_of

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        with environment_of(server):
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test."""
    import re
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster (2 CPUs) for the session; shut down at the end. Started after
    the S3 server, so that its workers inherit the S3 credentials (cvaa never passes
    secrets through a runtime_env)."""
    import ray

    if not ray.is_initialized():
        context = ray.init(address="local", num_cpus=2, include_dashboard=False,
                           log_to_driver=False, configure_logging=False)
        RAY_SESSION["dir"] = context.address_info.get("session_dir", "")
    yield ray
    ray.shutdown()


RAY_SESSION: dict[str, str] = {}


@pytest.fixture(scope="session")
def ray_session_dir(ray_local) -> Path:
    """The session directory (logs included) of the tests' local Ray cluster."""
    return Path(RAY_SESSION["dir"])


@pytest.fixture(scope="session")
def prepared_cpu(tmp_path_factory, ray_local):
    """A prepared dataset of 8 synthetic phantoms at the cpu preset (32^3), made once."""
    from cvaa.config import load_config
    from cvaa.distributed.training import ensure_prepared

    cfg = load_config("cpu", overrides=["data.n_phantoms=8"])
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    return ensure_prepared(cfg, str(out), log=lambda *_: None)
