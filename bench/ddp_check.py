"""Two DDP ranks of the plain-torch training loop, without Ray: compile under DDP, checked.

Each rank runs :func:`cvaa.loop.setup` (models wrapped in torch's
``DistributedDataParallel``) and :func:`cvaa.loop.train_epochs`, the loop the Ray Train
worker and :func:`cvaa.local.train_local` run, over the same prepared phantoms. The ranks
talk over gloo, so two of them can share one GPU (NCCL wants a GPU per rank) or run on
the CPU. Rank 0 prints one line per epoch and appends each epoch's metrics to
``OUT/ddp_check.jsonl`` as it ends; the last line says whether it held:

* every loss finite, every epoch;
* nothing compiled after the first epoch (``compiled_graphs``, dynamo's own count of
  new graphs, summed over the ranks: training steps with the short batches padded, and
  validation);
* the epochs all ran.

It needs torch, numpy, scipy, yaml and SimpleITK (for the phantoms); no Ray, no MLflow,
no network. Exit status 0 when it held, 1 when not, 2 when it could not run.

    python bench/ddp_check.py --out OUT --device cuda              # one GPU, 2 ranks
    python bench/ddp_check.py --out OUT --device cpu --set train.cuda_shaped=true
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from cvaa.config import load_config  # noqa: E402

RESULTS = "ddp_check.jsonl"
# The cpu preset's generator is under 1 MB: one gradient bucket, and compile under DDP
# would never split a graph. Twice its widths (~3.5 MB) span several 1 MB buckets.
CHECK_WIDTHS = ("model.stem_channels=16", "model.growth=8", "model.encoder_channels=[32,48,64]",
                "model.decoder_channels=[64,32,16,16]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, options: dict) -> None:
    """One rank: join the group, train, leave. Rank 0 writes the results."""
    from cvaa.loop import format_epoch, setup, train_epochs

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{options['port']}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=options["timeout_s"]))
    try:
        device = torch.device(options["device"])
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        cfg = load_config(options["preset"], overrides=options["overrides"])

        def wrap(module: torch.nn.Module) -> torch.nn.Module:
            return DistributedDataParallel(module.to(device),
                                           device_ids=[device.index or 0]
                                           if device.type == "cuda" else None,
                                           bucket_cap_mb=options["bucket_cap_mb"])

        run = setup(cfg, options["data"], device, rank=rank, world=world, wrap=wrap)
        results = Path(options["out"]) / RESULTS

        def on_epoch_end(end) -> None:
            if rank == 0:
                line = {k: v for k, v in end.metrics.items() if isinstance(v, (int, float))}
                with results.open("a") as f:
                    f.write(json.dumps({"kind": "epoch", **line}) + "\n")
                print(f"[ddp_check] {format_epoch(end.metrics, cfg.train.epochs, None)}  "
                      f"compiled {int(end.metrics['compiled_graphs'])} graphs", flush=True)
            return None

        outcome = train_epochs(run, on_epoch_end=on_epoch_end,
                               log=(lambda line: print(f"[ddp_check] {line}", flush=True))
                               if rank == 0 else None)
        if rank == 0:
            with results.open("a") as f:
                f.write(json.dumps({"kind": "outcome", **{k: v for k, v in outcome.items()
                                                          if isinstance(v, (str, int))}})
                        + "\n")
    finally:
        dist.destroy_process_group()


def verdict(rows: list[dict], epochs: int) -> tuple[bool, str]:
    """Whether the run held (see the module docstring), and why not."""
    done = [r for r in rows if r.get("kind") == "epoch"]
    outcome = next((r for r in rows if r.get("kind") == "outcome"), {})
    problems = []
    if outcome.get("status") != "completed":
        problems.append(f"outcome {outcome.get('status', 'none')}: "
                        f"{outcome.get('message', 'no outcome recorded')}")
    if len(done) != epochs:
        problems.append(f"{len(done)} of {epochs} epochs")
    losses = [r[k] for r in done for k in ("loss_g", "loss_d") if k in r]
    if not all(math.isfinite(v) for v in losses):
        problems.append("a non-finite loss")
    late = [int(r["compiled_graphs"]) for r in done[1:]]
    if any(late):
        problems.append(f"recompiled after epoch 1: {late} graphs in epochs 2..")
    first = int(done[0]["compiled_graphs"]) if done else 0
    summary = (f"{len(done)}/{epochs} epochs, {first} graphs compiled in epoch 1, "
               f"{sum(late)} after; losses finite: {all(map(math.isfinite, losses))}")
    return not problems, summary + ("" if not problems else "; " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True,
                   help="folder for ddp_check.jsonl (one line per epoch, then the verdict)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for the prepared phantoms (default: a temporary one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (both ranks on GPU 0) or cpu")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--preset", default="cpu", help="config preset (default: cpu, 32^3)")
    p.add_argument("--n", type=int, default=8, help="phantoms to prepare")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides (e.g. train.compile=default)")
    p.add_argument("--bucket-cap-mb", type=float, default=1.0,
                   help="DDP gradient bucket size (default 1 MB, the least torch.compile's "
                        "DDP optimizer takes): with --preset cpu's wider check widths (~3.5 "
                        "MB of generator) several buckets, so compile splits the graph at "
                        "their boundaries, as it does for the paper preset's ~150 MB at "
                        "DDP's default 25 MB")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="a collective that waits longer fails (a rank died)")
    args = p.parse_args(argv)
    if args.ranks < 2:
        p.error("--ranks must be >= 2 (this checks DDP)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("[ddp_check] no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    from cvaa.local import prepare_phantoms

    args.out.mkdir(parents=True, exist_ok=True)
    overrides = [f"data.n_phantoms={args.n}", f"train.epochs={args.epochs}",
                 f"train.num_workers={args.ranks}", f"train.batch_size={2 * args.ranks}",
                 "train.io_threads=1", "train.prefetch_batches=1",
                 *(CHECK_WIDTHS if args.preset == "cpu" else ()), *args.set]
    cfg = load_config(args.preset, overrides=overrides)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cvaa-ddp-check-"))
    data = str(workdir / f"prepared-{args.preset}-{args.n}")
    prepare_phantoms(cfg, data, processes=min(4, os.cpu_count() or 1),
                     log=lambda line: print(line, flush=True))
    results = args.out / RESULTS
    results.write_text(json.dumps({"kind": "run", "device": args.device,
                                   "ranks": args.ranks, "preset": args.preset,
                                   "overrides": overrides, "torch": torch.__version__}) + "\n")
    start = time.perf_counter()
    options = {"port": free_port(), "device": args.device, "preset": args.preset,
               "overrides": overrides, "data": data, "out": str(args.out),
               "timeout_s": args.timeout_s, "bucket_cap_mb": args.bucket_cap_mb}
    error = ""
    try:
        mp.spawn(rank_main, args=(args.ranks, options), nprocs=args.ranks, join=True)
    except Exception as exc:   # a rank failed: its traceback, then one line
        print(f"[ddp_check] a rank failed:\n{exc}", file=sys.stderr, flush=True)
        raised = [line for line in str(exc).splitlines()
                  if re.match(r"\w+(Error|Exception): ", line)]
        error = raised[-1] if raised else f"{type(exc).__name__}: {exc}".splitlines()[0]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    ok, summary = verdict(rows, args.epochs)
    if error:
        ok, summary = False, f"{summary}; a rank failed: {error}"
    line = (f"[ddp_check] {'ok' if ok else 'FAILED'}: {args.ranks} ranks on {args.device}, "
            f"torch {torch.__version__}, {summary} ({time.perf_counter() - start:.0f} s)")
    with results.open("a") as f:
        f.write(json.dumps({"kind": "verdict", "ok": ok, "summary": line}) + "\n")
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
