"""Command-line options the training jobs share (jobs/train.py, jobs/tune.py).

One definition per option, so ``--data`` or ``--mlflow-uri`` means the same in every job.
"""

from __future__ import annotations

import argparse

from cvaa.config import PRESETS


def add_training_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                           set_example: str = "optim.lr_g=1e-4",
                           epochs_help: str = "total epochs",
                           storage_help: str = "Ray Train storage for checkpoints (local or "
                                               "s3://; default ~/.cvaa/ray_results)",
                           run_name_help: str = "Ray Train / MLflow run name (same name "
                                                "resumes)") -> None:
    """Data, model, config, storage, tracking and cluster options."""
    from cvaa.models import GENERATORS

    p.add_argument("--data", help="prepared dataset (local dir or s3://); default: prepare "
                                  "synthetic phantoms first")
    p.add_argument("--model", choices=sorted(GENERATORS), help="generator (default: cvaa)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="config preset (default: cpu)")
    p.add_argument("--config", help="YAML config file applied over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help=f"dotted override, e.g. {set_example}")
    p.add_argument("--epochs", type=int, help=epochs_help)
    p.add_argument("--storage", help=storage_help)
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                        "else sqlite:///~/.cvaa/mlflow.db)")
    p.add_argument("--register-name", default="cvaa-gan", help="registered model name")
    p.add_argument("--run-name", help=run_name_help)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    add_verbose_argument(p)


def add_verbose_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and MLflow's own output (worker logs, progress bars)")


def training_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values plus the shortcuts ``--model`` and ``--epochs`` (which win)."""
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.generator={args.model}")
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    return overrides
