"""A training run on a two-node Ray cluster that loses a node mid-run (tests/test_multinode).

    python tests/multinode_run.py --data s3://B/prepared --storage s3://B/ray \\
        --mlflow-uri http://127.0.0.1:PORT --out result.json

Runs in its own process (the test session already has a local Ray). Starts a head node
(the driver's) and a worker node as separate raylets (``ray.cluster_utils.Cluster``), trains
2 DDP workers one per node (``STRICT_SPREAD``), and when the driver prints the epoch-2 line
kills the worker node's processes (no graceful drain), then adds a fresh node a few seconds
later. ``jobs/train.py``'s ``run_training`` does the rest: Ray Train restarts the worker
group from the last checkpoint on S3, evaluates on the cluster and registers through the
MLflow server. Writes what happened as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NODE = {"num_cpus": 2}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--mlflow-uri", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lose-after", type=int, default=2)
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    tick = time.perf_counter()
    # shutdown_at_exit=False: no SIGTERM hook, so nodes can be added from a thread (the
    # main one is in run_training); the finally below shuts the cluster down.
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE), shutdown_at_exit=False)
    try:
        return run(args, cluster, tick)
    finally:
        ray.shutdown()
        cluster.shutdown()


def run(args, cluster, tick: float) -> int:
    import ray

    from cvaa.config import load_config
    from cvaa.distributed.cluster import init_ray
    from cvaa.distributed.training import TrainJob, run_training

    worker_node = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    init_ray(cluster.address)
    nodes_at_start = sum(1 for n in ray.nodes() if n["Alive"])

    cfg = load_config("cpu", overrides=[
        "train.num_workers=2", "train.batch_size=2", "train.cpus_per_worker=1",
        "train.placement_strategy=STRICT_SPREAD", f"train.epochs={args.epochs}",
        "train.max_failures=3", "train.figure_every=2"])
    job = TrainJob(cfg=cfg, data=args.data, run_name="multinode", storage=args.storage,
                   mlflow_uri=args.mlflow_uri, register_name="multinode", alias="candidate",
                   preset="cpu")
    events: dict = {"lines": []}

    def lose_a_node() -> None:
        events["node_lost_at"] = time.perf_counter() - tick
        cluster.remove_node(worker_node, allow_graceful=False)
        deadline = time.monotonic() + 60  # until the head has noticed
        while sum(1 for n in ray.nodes() if n["Alive"]) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        events["alive_after_loss"] = sum(1 for n in ray.nodes() if n["Alive"])
        events["loss_noticed_at"] = time.perf_counter() - tick
        time.sleep(3)
        cluster.add_node(**NODE)
        events["node_added_at"] = time.perf_counter() - tick

    loser = threading.Thread(target=lose_a_node, daemon=True)

    def log(line: str) -> None:
        print(line, flush=True)
        events["lines"].append(line)
        if line.startswith(f"epoch {args.lose_after}/") and "node_lost_at" not in events \
                and not loser.is_alive():
            loser.start()

    try:
        out = run_training(job, log=log)
    finally:
        if loser.is_alive():
            loser.join(timeout=60)
    result = {k: out[k] for k in ("model_uri", "version", "run_id", "epochs", "checkpoint",
                                  "rows")}
    result.update(events, nodes_at_start=nodes_at_start,
                  resumed_at_epoch=out["history"].get("resumed_at_epoch", []),
                  wall_seconds=time.perf_counter() - tick)
    Path(args.out).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
