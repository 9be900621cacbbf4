"""Train CVAA-GAN (or a baseline) with Ray Train DDP, tracked in MLflow, then register it.

    python jobs/train.py                                   # embedded default, CPU, ~minutes
    python jobs/train.py --data s3://bucket/prepared --preset paper --workers 8 --gpu \\
        --set train.batch_size=32 --set optim.lr_scaling=sqrt --accelerator-type A40 \\
        --storage s3://bucket/ray --mlflow-uri http://mlflow:5000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py

Without ``--data`` it first runs the preprocessing job's embedded default (synthetic lumbar
phantoms), so the command alone does the whole chain: phantoms -> preprocess -> train ->
evaluate (Table I on the test split) -> registered model ``models:/NAME@ALIAS`` ->
its reliability calibration, fitted on the patients held out of training
(``train.calibration_cases``: 40 of the embedded default's 112 phantoms at the ``cpu``
preset; a hold-out under 30 cases leaves the version ``uncalibrated``, and says so).
Re-running with the same ``--run-name`` and ``--storage`` resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from cvaa.cli import add_training_arguments, training_overrides  # noqa: E402
from cvaa.config import ConfigError, load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--accelerator-type", help="run workers on nodes with this accelerator "
                                              "label, e.g. A40")
    p.add_argument("--alias", default="candidate", help="registry alias of the new version")
    return p


def resolve_config(args):
    overrides = training_overrides(args)
    if args.workers:
        overrides.append(f"train.num_workers={args.workers}")
    if args.gpu:
        overrides.append("train.use_gpu=true")
    if args.accelerator_type:
        overrides.append(f"train.accelerator_type={args.accelerator_type}")
    return load_config(args.preset, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except (ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from cvaa import tracking
    from cvaa.data.dataset import config_hash
    from cvaa.distributed.cluster import cluster_cpus, init_ray, joins_cluster
    from cvaa.distributed.checkpoints import CorruptCheckpointError
    from cvaa.distributed.training import (EmptySplitError, StorageError, TrainJob,
                                           default_storage, ensure_prepared, run_training)
    from cvaa.gan import NonFiniteLossError, per_worker_batch, scaled_lr

    start = time.perf_counter()
    mlflow_uri = args.mlflow_uri or tracking.default_tracking_uri()
    try:  # before anything starts: wrong credentials stop the job here, in one line
        tracking.check_server(mlflow_uri)
    except tracking.TrackingUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    init_ray(args.address, verbose=args.verbose)
    data = args.data
    if data is None:
        home = Path(default_storage()).parent
        data = ensure_prepared(cfg, str(home / f"prepared-{config_hash(cfg)}"))
    if not joins_cluster(args.address) and not _cpus_given(args):
        # A local Ray: once preprocessing is done, the training workers take every core.
        per_worker = max(1, cluster_cpus() // cfg.train.num_workers)
        cfg = cfg.override({"train.cpus_per_worker": float(per_worker)})
    run_name = args.run_name or f"{cfg.model.generator}-{time.strftime('%Y%m%d-%H%M%S')}"
    job = TrainJob(cfg=cfg, data=data, run_name=run_name,
                   storage=args.storage or default_storage(),
                   mlflow_uri=mlflow_uri,
                   register_name=args.register_name, alias=args.alias, preset=args.preset)
    t, o = cfg.train, cfg.optim
    print(f"[train] {cfg.model.generator}, preset {args.preset}, {t.epochs} epochs, "
          f"{t.num_workers} worker(s) x {t.cpus_per_worker:g} CPU"
          f"{f' + {t.gpus_per_worker:g} GPU' if t.use_gpu else ''}; data {data}")
    print(f"[train] global batch {t.batch_size} ({per_worker_batch(cfg)} per worker); "
          f"lr G {scaled_lr(o.lr_g, cfg):.3g}, D {scaled_lr(o.lr_d, cfg):.3g} (lr_scaling "
          f"{o.lr_scaling} from batch {o.reference_batch})")
    try:
        out = run_training(job, log=lambda line: print(f"[train] {line}"))
    except (NonFiniteLossError, StorageError, CorruptCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except tracking.TrackingUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, EmptySplitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    if out["table"]:
        print(f"Test split, {out['epochs']} epochs ({cfg.model.generator}, preset {args.preset}):")
        print(out["table"])
    m = out["metrics"]
    print(f"final validation: PSNR {m.get('val/psnr', float('nan')):.2f} dB, "
          f"SSIM {m.get('val/ssim', float('nan')):.4f}; training {out['wall_seconds']:.0f} s "
          f"({out['wall_seconds'] / out['epochs']:.1f} s/epoch); whole job "
          f"{time.perf_counter() - start:.0f} s")
    print(f"MLflow run {out['run_id']} at {job.mlflow_uri}")
    print(f"registered model: {out['model_uri']} (version {out['version']})")
    return 0


def _cpus_given(args) -> bool:
    """Whether the user chose ``train.cpus_per_worker`` (in ``--set`` or ``--config``)."""
    if any(o.split("=", 1)[0].strip() == "train.cpus_per_worker" for o in args.overrides):
        return True
    return bool(args.config) and "cpus_per_worker" in Path(args.config).read_text()


if __name__ == "__main__":
    sys.exit(main())
