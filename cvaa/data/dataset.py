"""The prepared dataset: one case per CT, written by ``jobs/preprocess.py``.

Layout under the output URI (a local directory or an ``s3://`` prefix)::

    manifest.json            config, split, every input's outcome, summary
    cases/<case_id>.npz      ct (D, H, W) float32 in [0, 1]; xrays (2, P, P) float32 in [0, 1]
    cases/<case_id>.json     the case's record (metadata + config hash): written after the
                             .npz, so its presence means the case is complete
    rejected/<case_id>.json  why an input was rejected

One file per case (rather than Parquet shards) because every case is written, skipped on a
re-run, or replaced on its own: a crash loses at most the case in flight, resume is a
listing, and a training worker or the evaluator reads exactly the cases it needs from a
local disk or S3 alike. At the paper size a case is ~8 MB compressed to ~3 MB.

Nothing here imports Ray: :func:`process_case` is the pure per-case work that the Ray Data
pipeline (``cvaa.distributed.pipeline``) maps over the inputs.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io as _io
import json
import re
import secrets
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np

from cvaa.config import Config, TrainConfig
from cvaa.data import store
from cvaa.data.io import (VOLUME_SUFFIXES, InvalidVolumeError, VolumeNotFoundError, is_s3,
                          read_ct, read_dicom_files)

MANIFEST = "manifest.json"
# The sections of the config that decide a prepared case's content.
PREPARED_SECTIONS = ("preprocess", "drr")


@dataclass(frozen=True)
class CaseInput:
    """One CT to prepare: its URI, the patient it belongs to, and a stable case id."""

    uri: str
    patient_id: str
    case_id: str
    files: tuple[str, ...] = ()   # a DICOM series' files in slice order (``uri`` names it)


# The prepared dataset's pseudonym key (hex), written once beside its manifest.
PSEUDONYM_KEY = "pseudonym.key"


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """``KIND-<12 hex>``: a keyed hash (HMAC-SHA256) of ``value``, so that a case or patient
    id says nothing about the file or person it came from, and nobody without the key can
    test a guessed name against it.

    Example:
        >>> pseudonym(b"k" * 32, "case", "s3://pacs/export/0001.nii.gz")
        'case-4dca84b495e5'
    """
    digest = hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:12]}"


def dataset_key(output: str, key_file: str | None = None) -> bytes:
    """The pseudonym key of the prepared dataset at ``output``: read from ``key_file`` when
    given (the user keeps it), else the one stored with the dataset, else a new random key
    that is stored there (``PSEUDONYM_KEY``), so a re-run derives the same ids."""
    if key_file:
        text = store.read_text(key_file).strip()
    else:
        uri = store.join(output, PSEUDONYM_KEY)
        if store.exists(uri):
            text = store.read_text(uri).strip()
        else:
            text = secrets.token_hex(32)
            store.write_text(uri, text + "\n")
    key = bytes.fromhex(text) if re.fullmatch(r"[0-9a-fA-F]{32,}", text) else text.encode()
    if len(key) < 16:
        raise ValueError(f"{key_file or output}: a pseudonym key needs at least 16 bytes")
    return key


def case_id_for(uri: str) -> str:
    """A readable, collision-free id: the file's stem plus a hash of the whole URI (for
    data without identifiers, ``--keep-names``)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:48] or "case"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def config_hash(cfg: Config) -> str:
    return cfg.hash(*PREPARED_SECTIONS)


# --------------------------------------------------------------------------- inputs

def list_inputs(source: str, key: bytes | None = None, *,
                cfg: Config | None = None) -> list[CaseInput]:
    """The CTs named by ``source``: a directory, an ``s3://`` prefix, or a manifest file
    (``.csv`` with a ``uri`` column and an optional ``patient_id`` column; ``.json`` with a
    list of URIs or of ``{"uri": ..., "patient_id": ...}``, optionally under ``"cases"``).

    Under a directory or prefix, volume files count by suffix and every other file is read
    as a possible DICOM file: the series chosen by ``cfg.dicom`` (default rule without
    ``cfg``) become cases (:func:`archive_inputs`, which also says why the rest is not
    used). Without a patient id, each CT is its own patient (a DICOM series: its
    PatientID). Relative paths in a manifest are relative to the manifest's directory.
    With a pseudonym ``key`` (the default of ``jobs/preprocess.py``) case and patient ids
    are :func:`pseudonym` s of the URI and the patient id; without one they are readable
    (:func:`case_id_for`, the given patient id).
    """
    lower = source.lower()
    if not lower.endswith((".csv", ".json")):
        return archive_inputs(source, key, cfg or Config()).inputs
    rows = _manifest_rows(source)
    base = source.rsplit("/", 1)[0] if is_s3(source) else str(Path(source).parent)
    out, seen = [], set()
    for row in rows:
        uri = str(row["uri"]).strip()
        if not is_s3(uri) and not Path(uri).is_absolute():
            uri = store.join(base, uri)
        if uri in seen:
            continue
        seen.add(uri)
        out.append(_case_input(uri, str(row.get("patient_id") or "").strip(), key))
    return out


def _case_input(uri: str, given_patient: str, key: bytes | None,
                files: tuple[str, ...] = ()) -> CaseInput:
    if key is None:
        case_id = case_id_for(uri)
        return CaseInput(uri, given_patient or case_id, case_id, files)
    return CaseInput(uri, pseudonym(key, "patient", given_patient or uri),
                     pseudonym(key, "case", uri), files)


@dataclass
class ArchiveInputs:
    """What :func:`archive_inputs` found: the ``inputs``, every DICOM file and series not
    used with its reason (``not_used``), and the DICOM ``summary`` and ``series`` (one
    entry per DICOM case: its series, folders and slice spacing)."""

    inputs: list[CaseInput]
    not_used: list[dict[str, Any]]
    summary: dict[str, Any]
    series: list[dict[str, Any]]

    def manifest_section(self) -> dict[str, Any]:
        return {"summary": self.summary, "cases": self.series}


def archive_inputs(source: str, key: bytes | None, cfg: Config,
                   read_headers: Callable[[list[str]], Iterable[dict[str, Any]]] | None = None
                   ) -> ArchiveInputs:
    """The cases under a directory or ``s3://`` prefix: every volume file (by suffix), and
    the DICOM series that ``cfg.dicom`` chooses among all other files, read from their
    headers by ``read_headers`` (default: one after the other in this process; the Ray
    pipeline passes its parallel reader).

    Example:
        >>> found = archive_inputs("/pacs/export", None, load_config("paper"))
        >>> [c.uri for c in found.inputs], [n["reason"] for n in found.not_used][:2]
        (['/pacs/export/PAT1/ST1#1.2.840...'], ['localizer (ORIGINAL/PRIMARY/LOCALIZER)', ...])
    """
    from cvaa.data.dicom_index import index_headers, select_series
    from cvaa.data.dicom_index import read_headers as serial

    start = time.perf_counter()
    if not is_s3(source) and not Path(source).is_dir():
        raise VolumeNotFoundError(source, "input directory does not exist")
    volumes, others = [], []
    for uri in store.list_files(source):
        (volumes if uri.lower().endswith(VOLUME_SUFFIXES) else others).append(uri)
    index = index_headers((read_headers or serial)(others))
    selection = select_series(index, cfg.dicom, cfg.preprocess.spacing_mm)
    inputs = [_case_input(uri, "", key) for uri in volumes]
    series = []
    for c in selection.cases:
        item = _case_input(c.series.uri, c.series.patient_id, key, c.files)
        inputs.append(item)
        series.append({"case_id": item.case_id, "series": c.series.name,
                       "uri": c.series.uri, "files": len(c.files),
                       "folders": len(c.series.folders),
                       "slice_spacing_mm": round(c.spacing_mm, 4),
                       "kernel": c.series.kernel, "contrast": c.series.contrast})
    summary = {**selection.summary(), "volume_files": len(volumes),
               "seconds": round(time.perf_counter() - start, 2)}
    return ArchiveInputs(inputs, selection.not_used, summary, series)


def _manifest_rows(source: str) -> list[dict[str, Any]]:
    try:
        text = store.read_text(source)
    except Exception as exc:  # OSError locally; botocore errors are not OSErrors
        raise InvalidVolumeError(source, f"cannot read the input manifest ({exc})") from exc
    if source.lower().endswith(".csv"):
        reader = csv.DictReader(_io.StringIO(text))
        if not reader.fieldnames or "uri" not in reader.fieldnames:
            raise InvalidVolumeError(source, "CSV manifest needs a 'uri' column "
                                             f"(columns: {reader.fieldnames})")
        return [dict(r) for r in reader]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidVolumeError(source, f"manifest is not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("cases", data.get("inputs"))
    if not isinstance(data, list):
        raise InvalidVolumeError(source, "JSON manifest must be a list of URIs or of "
                                         "{'uri', 'patient_id'} objects (or have 'cases')")
    rows = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            rows.append({"uri": item})
        elif isinstance(item, dict) and "uri" in item:
            rows.append(item)
        else:
            raise InvalidVolumeError(source, f"manifest entry {i} has no 'uri': {item!r}")
    return rows


# --------------------------------------------------------------------------- per case

def process_case(item: CaseInput, cfg: Config, output: str, volume=None) -> dict[str, Any]:
    """Read, preprocess and render one CT, write it under ``output``; never raises.

    ``volume`` (a :class:`cvaa.data.io.Volume` in HU) is the CT when it is in memory
    already (a phantom drawn in this process); ``item.uri`` is then only recorded.

    Returns the case's record: ``status`` is ``prepared`` (with metadata) or ``rejected``
    (with ``reason``: the bad-input message, or the crash with its exception type).
    """
    from cvaa.data.drr import render_prepared
    from cvaa.data.preprocess import prepare_ct

    start = time.perf_counter()
    record: dict[str, Any] = {"case_id": item.case_id, "patient_id": item.patient_id,
                              "source_uri": item.uri, "config_hash": config_hash(cfg)}
    try:
        if volume is None:
            volume = (read_dicom_files(item.files, item.uri) if item.files else
                      read_ct(item.uri))
        prep = prepare_ct(volume, cfg.preprocess)
        generator = None
        if cfg.drr.photons > 0:  # per-case noise, reproducible from the case id and seed
            import torch
            seed = int.from_bytes(hashlib.sha256(
                f"{cfg.drr.seed}:{item.case_id}".encode()).digest()[:8], "little")
            generator = torch.Generator().manual_seed(seed)
        xrays = render_prepared(prep, cfg, generator=generator)  # (2, P, P) in [0, 1]
        if cfg.preprocess.context_margin_mm > 0:  # what X-ray randomisation renders from
            from cvaa.data.augment import context_of, encode_context
            record["context_path"] = f"context/{item.case_id}.npz"
            store.write_bytes(store.join(output, record["context_path"]),
                              encode_context(context_of(prep,
                                                        cfg.preprocess.context_margin_mm)))
        record.update(
            status="prepared",
            path=f"cases/{item.case_id}.npz",
            spacing_mm=list(prep.cube.spacing_mm),
            crop_center_mm=[round(float(v), 4) for v in prep.center_mm],
            ct_shape=list(prep.normalized.shape),
            xray_shape=list(xrays.shape),
        )
        # The case file carries no source URI: only the manifest (and the per-case record
        # it is rebuilt from) maps a case id to a file.
        meta = {k: v for k, v in record.items() if k != "source_uri"}
        store.write_bytes(store.join(output, record["path"]),
                          encode_case(prep.normalized, xrays, meta))
        record["seconds"] = round(time.perf_counter() - start, 3)
        store.write_text(store.join(output, "cases", f"{item.case_id}.json"),
                         json.dumps(record, indent=1))
    except InvalidVolumeError as exc:
        record.update(status="rejected", reason=str(exc), kind="invalid_input")
    except Exception as exc:  # any other failure is reported with its type, never lost
        record.update(status="rejected", kind="error",
                      reason=f"{item.uri}: {type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=6))
    if record["status"] == "rejected":
        record["seconds"] = round(time.perf_counter() - start, 3)
        try:
            store.write_text(store.join(output, "rejected", f"{item.case_id}.json"),
                             json.dumps(record, indent=1))
        except Exception as exc:  # the record still reaches the manifest via the driver
            record["reason"] += f" (and writing the rejection failed: {exc})"
    return record


def encode_case(ct: np.ndarray, xrays: np.ndarray, meta: dict[str, Any]) -> bytes:
    buf = _io.BytesIO()
    np.savez_compressed(buf, ct=ct.astype(np.float32), xrays=xrays.astype(np.float32),
                        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return buf.getvalue()


def decode_case(data: bytes) -> dict[str, Any]:
    """``{"ct": (1, D, H, W), "xrays": (2, P, P), "meta": dict}`` from an encoded case."""
    with np.load(_io.BytesIO(data)) as z:
        return {"ct": z["ct"][None], "xrays": z["xrays"],
                "meta": json.loads(z["meta"].tobytes().decode())}


# --------------------------------------------------------------------------- resume, split

def previous_outcomes(output: str, cfg_hash: str) -> dict[str, dict[str, Any]]:
    """Records of cases already prepared (or rejected as bad input) under this config hash.

    A crash (kind ``error``) is not remembered: the next run tries that case again.
    """
    out: dict[str, dict[str, Any]] = {}
    for uri in store.list_files(output):
        parent, name = uri.rsplit("/", 2)[-2:]
        if not name.endswith(".json") or parent not in ("cases", "rejected"):
            continue
        try:
            record = json.loads(store.read_text(uri))
        except (ValueError, OSError):
            continue
        if record.get("config_hash") != cfg_hash:
            continue
        if record.get("status") == "rejected" and record.get("kind") != "invalid_input":
            continue
        out[record["case_id"]] = record
    return out


def split_by_patient(records: Iterable[dict[str, Any]], test_fraction: float,
                     seed: int) -> dict[str, list[str]]:
    """Seeded train/test split of case ids by patient: no patient on both sides."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    records = list(records)
    patients = sorted({r["patient_id"] for r in records})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = int(round(len(patients) * test_fraction))
    if test_fraction > 0 and n_test == 0 and len(patients) > 1:
        n_test = 1
    test_patients = {patients[i] for i in order[:n_test]}
    split: dict[str, list[str]] = {"train": [], "test": []}
    for r in sorted(records, key=lambda r: r["case_id"]):
        split["test" if r["patient_id"] in test_patients else "train"].append(r["case_id"])
    return split


def write_manifest(output: str, manifest: dict[str, Any]) -> str:
    uri = store.join(output, MANIFEST)
    store.write_text(uri, json.dumps(manifest, indent=1))
    return uri


# --------------------------------------------------------------------------- reading

class PreparedDataset:
    """A prepared dataset, read from its manifest (local or S3).

    Example:
        >>> ds = PreparedDataset("runs/prepared")
        >>> case = ds.load(ds.split("train")[0])
        >>> case["ct"].shape, case["xrays"].shape
        ((1, 128, 128, 128), (2, 128, 128))
    """

    def __init__(self, root: str):
        self.root = str(root)
        uri = store.join(self.root, MANIFEST)
        try:
            self.manifest = json.loads(store.read_text(uri))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{uri}: no prepared dataset here (run "
                                    "jobs/preprocess.py first)") from exc
        self.records = {r["case_id"]: r for r in self.manifest["prepared"]}

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def split(self, name: str) -> list[str]:
        if name == "all":
            return sorted(self.records)
        if name not in self.manifest["split"]:
            raise KeyError(f"unknown split {name!r}; valid: "
                           f"{sorted(self.manifest['split']) + ['all']}")
        return list(self.manifest["split"][name])

    @property
    def fingerprint(self) -> str:
        """``data-<16 hex>``: a hash of the preprocessing config and every case id, the
        same for every copy of this dataset (local or S3) and different for another
        dataset (another seed, other CTs, or the same CTs under another pseudonym key)."""
        text = json.dumps([self.manifest.get("config_hash", ""), sorted(self.records)])
        return "data-" + hashlib.sha256(text.encode()).hexdigest()[:16]

    def shared_cases(self, case_ids: Iterable[str], other: "PreparedDataset",
                     other_ids: Iterable[str]) -> list[str]:
        """The ``case_ids`` of this dataset that are also among ``other_ids`` of ``other``:
        the same case id, or the same source CT (the manifests' ``source_uri``), so that
        a dataset prepared again from the same CTs is caught too."""
        other_ids = set(other_ids)
        sources = {other.records[c].get("source_uri") for c in other_ids if c in other.records}
        sources.discard(None)
        return [c for c in case_ids
                if c in other_ids or self.records[c].get("source_uri") in sources]

    def load(self, case_id: str) -> dict[str, Any]:
        record = self.records[case_id]
        return decode_case(store.read_bytes(store.join(self.root, record["path"])))

    def arrays(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(xrays (2, P, P), ct (1, D, H, W))`` of a case: what training streams."""
        case = self.load(case_id)
        return case["xrays"], case["ct"]

    def context(self, case_id: str):
        """The case's :class:`cvaa.data.augment.ContextCT` (the resampled CT the X-rays
        are rendered from).

        Raises:
            FileNotFoundError: the dataset was prepared without context
                (``preprocess.context_margin_mm = 0``, or before it existed).
        """
        from cvaa.data.augment import decode_context

        path = self.records[case_id].get("context_path")
        if not path:
            raise FileNotFoundError(f"{self.root}: case {case_id} has no context CT "
                                    f"(prepared with preprocess.context_margin_mm=0 or by "
                                    f"an older cvaa); prepare the dataset again to "
                                    f"randomise its X-rays")
        return decode_context(store.read_bytes(store.join(self.root, path)))


class CaseDataset:
    """A ``torch.utils.data.Dataset`` over some cases of a prepared dataset.

    Items are ``(xrays (2, P, P), ct (1, D, H, W), index)`` float32 tensors. Cases are read
    once and kept in memory (``cache=True``): prepared sets are small (3 MB per paper-size
    case compressed, 8 MB in memory) and re-reading S3 every epoch would dominate.
    """

    def __init__(self, dataset: PreparedDataset, case_ids: list[str], cache: bool = True):
        self.dataset, self.case_ids, self.cache = dataset, list(case_ids), cache
        self._memory: dict[int, tuple[Any, Any]] = {}

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int):
        import torch

        if index not in self._memory:
            case = self.dataset.load(self.case_ids[index])
            item = (torch.from_numpy(case["xrays"]), torch.from_numpy(case["ct"]))
            if not self.cache:
                return (*item, index)
            self._memory[index] = item
        return (*self._memory[index], index)


class TrainingSplit(NamedTuple):
    """What a training run makes of a prepared dataset's train split: case ids of the
    cases it trains on, validates on each epoch, and holds out for the reliability
    calibration (never trained or validated on). No patient is in two of them, nor in
    the test split."""

    train: list[str]
    validation: list[str]
    calibration: list[str]


def training_split(dataset: PreparedDataset, train: TrainConfig) -> TrainingSplit:
    """Split the train split by patient, seeded by ``train.seed``: first the calibration
    hold-out (``train.calibration_cases``: whole patients in a seeded order until it has
    that many cases; nothing when the train split has fewer than twice that many), then
    the validation part of the rest (``train.val_fraction`` of its patients, at least one
    case when there are two or more patients). Every rank and the driver get the same.

    Example:
        >>> training_split(PreparedDataset("runs/prepared"), cfg.train).calibration[:2]
        ['case-0a1b...', 'case-3c4d...']                                  # doctest: +SKIP
    """
    records = [dataset.records[c] for c in dataset.split("train")]
    n = train.calibration_cases
    held_out: set[str] = set()
    if n and len(records) >= 2 * n:
        patients = sorted({r["patient_id"] for r in records})
        cases: dict[str, list[str]] = {}
        for r in records:
            cases.setdefault(r["patient_id"], []).append(r["case_id"])
        for i in np.random.default_rng(train.seed + 2).permutation(len(patients)):
            if len(held_out) >= n:
                break
            held_out.update(cases[patients[i]])
    rest = [r for r in records if r["case_id"] not in held_out]
    parts = split_by_patient(rest, train.val_fraction, train.seed + 1)
    return TrainingSplit(parts["train"], parts["test"],
                         [c for c in dataset.split("train") if c in held_out])
