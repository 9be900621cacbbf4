"""A prepared dataset's manifest as jobs/preprocess.py writes it, for tests of what is
recorded about a dataset (no CT needed)."""


def prepared_manifest(n=4, config_hash="abc123"):
    """A prepared dataset's manifest as preprocessing writes it (pseudonymous ids)."""
    records = [{"case_id": f"case-{i:04x}", "patient_id": f"patient-{i:04x}",
                "source_uri": f"/archive/DOE_JOHN_{i}.nii.gz", "config_hash": config_hash,
                "status": "prepared", "path": f"cases/case-{i:04x}.npz",
                "spacing_mm": [8.0] * 3, "ct_shape": [1, 32, 32, 32],
                "xray_shape": [2, 32, 32], "seconds": 0.1 * i} for i in range(n)]
    return {"config_hash": config_hash, "prepared": records,
            "split": {"train": [r["case_id"] for r in records[:3]],
                      "test": [records[3]["case_id"]]}}
