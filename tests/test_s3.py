"""CT I/O against a real S3-compatible server (SeaweedFS), started by a fixture."""

import numpy as np
import pytest

from cvaa.data.io import (InvalidVolumeError, VolumeNotFoundError, find_volumes, read_ct,
                          write_ct)

pytestmark = pytest.mark.s3


def test_read_ct_from_s3_equals_disk(s3_server, s3_bucket, real_ct_paths):
    path = real_ct_paths["abdomen"]
    s3_server.client().upload_file(str(path), s3_bucket, "archive/abdomen.nii.gz")
    from_s3 = read_ct(f"s3://{s3_bucket}/archive/abdomen.nii.gz")
    from_disk = read_ct(path)
    np.testing.assert_array_equal(from_s3.array, from_disk.array)
    assert from_s3.spacing_mm == from_disk.spacing_mm
    assert from_s3.origin_mm == from_disk.origin_mm
    assert from_s3.direction == from_disk.direction
    assert from_s3.source == f"s3://{s3_bucket}/archive/abdomen.nii.gz"


def test_dicom_series_under_an_s3_prefix(s3_server, s3_bucket, real_ct_paths):
    client = s3_server.client()
    for f in sorted(real_ct_paths["dicom"].iterdir()):
        client.upload_file(str(f), s3_bucket, f"dicom/series1/{f.name}")
    vol = read_ct(f"s3://{s3_bucket}/dicom/series1")
    assert vol.shape == (20, 512, 512)
    assert f"s3://{s3_bucket}/dicom/series1" in find_volumes(f"s3://{s3_bucket}/dicom")


def test_missing_s3_key(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/nothing/here.nii.gz"
    with pytest.raises(VolumeNotFoundError) as exc:
        read_ct(uri)
    assert uri in str(exc.value) and "no such S3 key" in str(exc.value)
    assert isinstance(exc.value, InvalidVolumeError)


def test_write_ct_to_s3_round_trip(s3_server, s3_bucket, real_ct_paths):
    vol = read_ct(real_ct_paths["pulmonary"])
    uri = write_ct(vol, f"s3://{s3_bucket}/out/pulmonary.mha")
    back = read_ct(uri)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.origin_mm == pytest.approx(vol.origin_mm)
    assert find_volumes(f"s3://{s3_bucket}/out") == [uri]


def test_corrupt_object_on_s3_names_the_uri(s3_server, s3_bucket):
    s3_server.client().put_object(Bucket=s3_bucket, Key="bad/broken.nii.gz",
                                  Body=b"\x1f\x8b\x08\x00garbage")
    uri = f"s3://{s3_bucket}/bad/broken.nii.gz"
    with pytest.raises(InvalidVolumeError, match="gzip") as exc:
        read_ct(uri)
    assert uri in str(exc.value)
