"""Evaluate registered models on a prepared split: Table I and Fig. 2, logged to MLflow.

    python jobs/evaluate.py --models models:/cvaa-gan@candidate models:/x2ct@candidate \\
        --data runs/prepared
    python jobs/evaluate.py --models models:/cvaa-gan@candidate --data s3://bucket/prepared \\
        --split test --out runs/eval --cases 3 --mlflow-uri http://mlflow.internal:5000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/evaluate.py --models models:/cvaa-gan@candidate --data s3://bucket/prepared

Rows are models (labelled NAME@ALIAS (vN) unless --labels), columns MAE, MSE, cosine, PSNR,
SSIM on [0, 1] volumes ("volume" convention) and X2CT-GAN's per-slice PSNR / SSIM ("x2ct"),
each as mean (std) over the cases. Writes table_i.md, table_i.csv, per_case.csv and fig2.png
(mid-axial / sagittal / coronal slices of --cases cases: one column per model, then the
ground truth) under --out, and logs them to an MLflow evaluation run. The models run on the
Ray cluster (RAY_ADDRESS, else a local one), never in this process: Ray Data batch inference
with one actor per GPU (--gpu) or per CPU, each loading a model once; --engine local runs
them here instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from cvaa.cli import add_verbose_argument  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="URI",
                   help="registered models, e.g. models:/cvaa-gan@candidate")
    p.add_argument("--data", required=True, help="prepared dataset (local dir or s3://)")
    p.add_argument("--split", default="test", help="test, train or all (default test)")
    p.add_argument("--out", help="output directory (default ~/.cvaa/evaluations/RUN_NAME)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                        "else sqlite:///~/.cvaa/mlflow.db)")
    p.add_argument("--cases", type=int, default=2, help="cases shown in Fig. 2 (default 2)")
    p.add_argument("--labels", nargs="+", help="row labels, one per model")
    p.add_argument("--engine", choices=("ray", "local", "auto"), default="ray",
                   help="ray (default; auto is the same): Ray Data on the cluster; "
                        "local: in this process")
    p.add_argument("--batch-size", type=int, default=4,
                   help="cases per forward pass and per Ray Data batch (default 4)")
    p.add_argument("--workers", type=int, help="Ray Data actors (default: cluster CPUs - 1, "
                                                "or one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="run the models on GPUs")
    p.add_argument("--run-name", help="MLflow run name (default evaluate-SPLIT-TIME)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    add_verbose_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cvaa import tracking
    from cvaa.distributed.cluster import quiet_libraries
    from cvaa.distributed.evaluate import EvalJob, default_output_root, run

    quiet_libraries(args.verbose)

    run_name = args.run_name or f"evaluate-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    job = EvalJob(models=args.models, data=args.data, split=args.split,
                  out=args.out or str(default_output_root() / run_name),
                  mlflow_uri=args.mlflow_uri or tracking.default_tracking_uri(),
                  figure_cases=args.cases, engine=args.engine, batch_size=args.batch_size,
                  workers=args.workers, use_gpu=args.gpu, labels=args.labels,
                  run_name=run_name, address=args.address, verbose=args.verbose)
    start = time.perf_counter()
    try:
        out = run(job)
    except (FileNotFoundError, KeyError, ValueError, tracking.ModelLookupError,
            tracking.TrackingUnavailableError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    print()
    print(out["caption"])
    print(out["table"])
    print(f"Fig. 2 columns: {', '.join(out['figure_columns']) or 'none (--cases 0)'}")
    for name, path in out["files"].items():
        print(f"  {name}: {path}")
    print(f"MLflow run {out['run_id']} at {job.mlflow_uri}; {out['engine']} engine, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
