"""Send MLflow entries that a training run could not deliver (its tracking server was down
when it ended) into their run, in order.

    python jobs/replay_log.py ~/.cvaa/ray_results/RUN/epoch_0200/mlflow_pending \\
        --mlflow-uri http://mlflow.internal:5000

The folder is the ``mlflow_pending`` of a checkpoint (``pending.jsonl``, the figures and
checkpoint files, ``run.json`` naming the run). From S3, copy it to a local folder first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a checkpoint's mlflow_pending folder")
    p.add_argument("--mlflow-uri", help="tracking URI (default: the one in run.json)")
    p.add_argument("--run-id", help="run to send into (default: the one in run.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import json

    from cvaa.tracking.spool import replay

    folder = Path(args.folder)
    meta = folder / "run.json"
    if not (folder / "pending.jsonl").exists():
        print(f"{folder}: no pending.jsonl here (nothing to replay, or not a mlflow_pending "
              "folder)", file=sys.stderr)
        return 2
    uri = args.mlflow_uri or (json.loads(meta.read_text())["tracking_uri"]
                              if meta.exists() else None)
    if not uri:
        print(f"{folder}: no run.json; pass --mlflow-uri and --run-id", file=sys.stderr)
        return 2
    replay(folder, uri, args.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
