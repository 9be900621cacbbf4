"""Sweep loss weights or learning rates with Ray Tune (ASHA), one TorchTrainer per trial.

    python jobs/tune.py --space tune_spaces/optim.yaml --samples 4 --epochs 8
    python jobs/tune.py --space tune_spaces/loss_weights.yaml --samples 16 --preset paper \\
        --data s3://bucket/prepared --workers-per-trial 2 --gpus-per-trial 2 \\
        --storage s3://bucket/ray --mlflow-uri http://mlflow:5000 --run-name loss-w-1
    python jobs/tune.py --space tune_spaces/optim.yaml --run-name opt-1 --resume

The space file is checked against the config before Ray starts (unknown key, bad bounds,
wrong types fail here, naming the file and the key). Each trial trains with
``jobs/train.py``'s code; ASHA stops the trials that fall behind on ``--metric``. MLflow
gets a parent run (space file, leaderboard) with one child run per trial, and the best
trial's generator is registered as ``models:/NAME@tuned-best``.
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
    t = p.add_argument_group("sweep")
    t.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    t.add_argument("--samples", type=int, default=4,
                   help="draws of the space, each crossed with its grid (default: 4)")
    t.add_argument("--workers-per-trial", type=int, help="Ray Train workers of each trial")
    t.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs of each trial, split over its workers (0.5: two trials "
                        "share a GPU); default 0: CPU")
    t.add_argument("--metric", default="val/ssim", help="validation metric ASHA ranks by "
                                                        "(default: val/ssim)")
    t.add_argument("--mode", default="max", choices=["max", "min"])
    t.add_argument("--max-concurrent", type=int,
                   help="trials at once (default: what the cluster's resources allow)")
    t.add_argument("--grace-period", type=int, help="ASHA's first rung in epochs "
                                                    "(default: a tenth of the epochs)")
    t.add_argument("--reduction-factor", type=int,
                   help="ASHA's rung ratio (default: 2, or 3 from 30 epochs)")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep of --run-name on --storage")
    g = p.add_argument_group("training (as jobs/train.py)")
    add_training_arguments(
        g, set_example="train.batch_size=2", epochs_help="epochs per trial (ASHA's max_t)",
        storage_help="Ray storage for the sweep and its trials' checkpoints (local or "
                     "s3://; default ~/.cvaa/ray_results)",
        run_name_help="sweep name (Tune experiment and MLflow parent run)")
    return p


def resolve_config(args):
    cfg = load_config(args.preset, args.config, training_overrides(args))
    workers = args.workers_per_trial or cfg.train.num_workers
    if workers < 1:
        raise ConfigError(f"--workers-per-trial must be >= 1, got {workers}")
    extra = [f"train.num_workers={workers}"]
    if args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.gpus_per_trial > 0:
        per_worker = args.gpus_per_trial / workers
        if per_worker > 1 and not per_worker.is_integer():
            raise ConfigError(f"--gpus-per-trial {args.gpus_per_trial} over {workers} "
                              f"workers gives {per_worker:g} GPUs each; Ray needs a "
                              "fraction below 1 or a whole number")
        extra += ["train.use_gpu=true", f"train.gpus_per_worker={per_worker}"]
    return cfg.override(extra, source="--workers-per-trial/--gpus-per-trial")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cvaa.tune_space import load_space

    try:
        cfg = resolve_config(args)
        space = load_space(args.space, cfg)   # a bad space fails here, before Ray
        if args.resume and not args.run_name:
            raise ConfigError("--resume needs the --run-name of the sweep to continue")
    except (ConfigError, KeyError) as exc:   # SpaceError is a ConfigError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from cvaa import tracking
    from cvaa.distributed.training import TrainJob, default_storage
    from cvaa.distributed.sweep import SweepJob, check_sweep

    try:
        run_name = args.run_name or f"tune-{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        job = TrainJob(cfg=cfg, data=args.data or "", run_name=run_name,
                       storage=args.storage or default_storage(),
                       mlflow_uri=args.mlflow_uri or tracking.default_tracking_uri(),
                       register_name=args.register_name, preset=args.preset)
        sweep = SweepJob(train=job, space=space, samples=args.samples, metric=args.metric,
                         mode=args.mode, resume=args.resume,
                         max_concurrent=args.max_concurrent, grace_period=args.grace_period,
                         reduction_factor=args.reduction_factor)
        check_sweep(sweep)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from cvaa.data.dataset import config_hash
    from cvaa.distributed.training import ensure_prepared
    from cvaa.distributed.cluster import init_ray
    from cvaa.distributed.sweep import SweepError, tune_sweep

    start = time.perf_counter()
    try:  # before anything starts: wrong credentials stop the job here, in one line
        tracking.check_server(job.mlflow_uri)
    except tracking.TrackingUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    init_ray(args.address, verbose=args.verbose)
    if not args.data:
        home = Path(default_storage()).parent
        job.data = ensure_prepared(cfg, str(home / f"prepared-{config_hash(cfg)}"))
    try:
        out = tune_sweep(sweep)
    except (SweepError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except tracking.TrackingUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print()
    print(f"Sweep {run_name} over {args.space}: {len(out['leaderboard'])} trials in "
          f"{out['wall_seconds']:.0f} s (whole job {time.perf_counter() - start:.0f} s)")
    print(out["markdown"])
    print(f"MLflow parent run {out['parent_run_id']} at {job.mlflow_uri}")
    print(f"registered model: {out['model_uri']} (version {out['version']}, "
          f"trial {out['best']['trial']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
