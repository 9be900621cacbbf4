"""Tiny registered generators for the inference tests: a real MLflow registry, no training."""

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
