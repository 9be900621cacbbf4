"""Tiny registered generators for the inference tests (a real MLflow registry, no
training), and a prepared dataset written directly from one CT (no Ray, no phantoms)."""

from __future__ import annotations

from pathlib import Path

import torch

from cvaa import tracking
from cvaa.config import load_config
from cvaa.models import build_generator


def register_tiny_models(root: Path, names: tuple[str, ...] = ("cvaa", "x2ct"),
                         alias: str = "candidate", version_tags: dict[str, str] | None = None
                         ) -> tuple[str, dict[str, str]]:
    """Register ``build_generator(name, cpu preset)`` (seed 0) as ``tiny-NAME@alias`` in a
    SQLite store under ``root``, with ``version_tags`` (e.g. ``{"data": PREPARED}``, the
    dataset it would have trained on); returns the tracking URI and ``{name: model URI}``."""
    uri = f"sqlite:///{root}/mlflow.db"
    models = {}
    for name in names:
        cfg = load_config("cpu", overrides=[f"model.generator={name}"])
        torch.manual_seed(0)
        generator = build_generator(name, cfg)
        with tracking.open_run(uri, f"register-tiny-{name}") as run:
            out = tracking.log_generator(run.run_id, generator, cfg.to_dict(), f"tiny-{name}",
                                         alias, uri, version_tags=version_tags)
        models[name] = out["model_uri"]
    return uri, models


def write_perturbed_dataset(root: Path, ct_path: str, n: int, split: dict[str, slice],
                            seed: int = 9) -> str:
    """A prepared dataset of ``n`` cases at the cpu preset, written directly: the CT's
    cube under ``n`` copies of its DRRs, each with its own contrast (a gamma in [0.8, 1.25])
    and noise (cheap: :func:`cvaa.reliability.sample_xrays` takes 0.15 s a copy), each case
    ``c<i>`` its own patient ``p<i>`` and source; ``split`` maps split names to slices of
    the cases (``{"test": slice(0, 3), "train": slice(3, None)}``)."""
    import numpy as np

    from cvaa import inference
    from cvaa.data.dataset import encode_case, write_manifest

    cfg = load_config("cpu")
    xrays, prepared = inference.xrays_from_ct(ct_path, cfg)
    (root / "cases").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    copies = [np.clip(xrays ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.01, xrays.shape),
                      0, 1).astype(np.float32) for _ in range(n)]
    records = []
    for i, x in enumerate(copies):
        path = f"cases/c{i}.npz"
        (root / path).write_bytes(encode_case(prepared.normalized, x, {}))
        records.append({"case_id": f"c{i}", "path": path, "patient_id": f"p{i}",
                        "source_uri": f"/archive/ct{i}.nii.gz"})
    ids = [r["case_id"] for r in records]
    write_manifest(str(root), {"config": cfg.to_dict(), "prepared": records,
                               "split": {name: ids[s] for name, s in split.items()}})
    return str(root)
