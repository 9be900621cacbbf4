"""Prepared datasets as MLflow dataset inputs: what a run trained, validated, tested or
calibrated on, through MLflow's own ``mlflow.data`` API (a run's "Datasets" in the UI).

One split of a prepared dataset is one MLflow dataset: its name (the dataset's folder and
the split), a digest of the preprocessing config hash and the split's manifest records (it
changes when a case or the preprocessing changes), its source (the local path or
``s3://`` URI), a schema (the X-ray pair in, the CT out) and a profile (case count, volume
and X-ray sizes, spacing, config hash). It names no case: the records it hashes hold
pseudonymous ids, and only the digest leaves the data store (issue #18's rule).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Mapping, Sequence

from mlflow.data.dataset import Dataset

# MLflow's context tag (``mlflow.data.context``) values cvaa uses.
CONTEXTS = ("training", "validation", "test", "calibration", "evaluation")


class PreparedSplit(Dataset):
    """One split of a prepared dataset (``cvaa.data.dataset.PreparedDataset``).

    Args:
        root: the prepared dataset's URI (local directory or ``s3://bucket/prefix``).
        manifest: its ``manifest.json`` content.
        split: the split's name (``train``, ``validation``, ``test``, ``all`` ...).
        case_ids: the split's (pseudonymous) case ids.

    Example:
        >>> ds = PreparedDataset("runs/prepared")
        >>> PreparedSplit(ds.root, ds.manifest, "test", ds.split("test")).digest
        '3f2a9c1b'
    """

    def __init__(self, root: str, manifest: Mapping[str, Any], split: str,
                 case_ids: Sequence[str]):
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        self._manifest, self._split, self._case_ids = manifest, split, list(case_ids)
        records = {r["case_id"]: r for r in manifest.get("prepared", [])}
        missing = [c for c in self._case_ids if c not in records]
        if missing:
            raise KeyError(f"{root}: split {split!r} names {len(missing)} case(s) that its "
                           f"manifest does not hold (first: {missing[0]})")
        self._records = [records[c] for c in self._case_ids]
        folder = root.rstrip("/").rsplit("/", 1)[-1] or root
        with warnings.catch_warnings():
            # MLflow registers its local source for both "" and "file:" and says so
            warnings.filterwarnings("ignore", ".*can be interpreted in multiple ways")
            source = resolve_dataset_source(root)
        super().__init__(source=source, name=f"{folder}/{split}")

    def _compute_digest(self) -> str:
        # Not the preprocessing time (it differs between identical runs), nor the source
        # path (the case id is a keyed pseudonym of it already).
        records = [{k: v for k, v in r.items() if k not in ("seconds", "source_uri")}
                   for r in self._records]
        body = json.dumps({"config_hash": self._manifest.get("config_hash", ""),
                           "records": records}, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:10]

    @property
    def profile(self) -> dict[str, Any]:
        first = self._records[0] if self._records else {}
        return {"split": self._split, "num_cases": len(self._case_ids),
                "num_patients": len({r.get("patient_id", r["case_id"])
                                     for r in self._records}),
                "config_hash": self._manifest.get("config_hash", ""),
                "ct_shape": first.get("ct_shape"), "xray_shape": first.get("xray_shape"),
                "spacing_mm": first.get("spacing_mm")}

    @property
    def schema(self):
        """X-rays ``(N, 2, P, P)`` in, CT ``(N, 1, D, H, W)`` out, float32 in [0, 1]."""
        import numpy as np
        from mlflow.types import Schema, TensorSpec

        first = self._records[0] if self._records else {}
        xray = first.get("xray_shape") or [2, -1, -1]
        ct = first.get("ct_shape") or [1, -1, -1, -1]
        return Schema([TensorSpec(np.dtype(np.float32), (-1, *xray), "xrays"),
                       TensorSpec(np.dtype(np.float32), (-1, *ct), "ct")])

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "schema": json.dumps({"mlflow_tensorspec": {
            "features": self.schema.to_json()}}), "profile": json.dumps(self.profile)}


def log_splits(client, run_id: str, root: str, manifest: Mapping[str, Any],
               splits: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, PreparedSplit]:
    """Log splits of a prepared dataset as the run's dataset inputs.

    Args:
        client: an ``mlflow.MlflowClient``.
        splits: ``{context: (split name, case ids)}`` with a context of :data:`CONTEXTS`
            (MLflow's ``mlflow.data.context`` input tag); empty splits are left out.

    Returns:
        ``{context: PreparedSplit}`` of what was logged.
    """
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    unknown = sorted(set(splits) - set(CONTEXTS))
    if unknown:
        raise KeyError(f"unknown dataset context(s) {unknown}; valid: {list(CONTEXTS)}")
    logged = {context: PreparedSplit(root, manifest, split, ids)
              for context, (split, ids) in splits.items() if ids}
    client.log_inputs(run_id, datasets=[
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for context, ds in logged.items()])
    return logged
