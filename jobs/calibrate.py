"""Calibrate a registered generator's reliability on held-out cases and store the
calibration with that version (cvaa/reliability/).

    python jobs/calibrate.py --model models:/cvaa-gan@candidate --data runs/calib-prepared
    python jobs/calibrate.py --model models:/cvaa-gan/3 --data runs/prepared --split test
        # a split it did not train on, if it holds at least 30 cases

The cases must be ones the model never trained on (another prepared dataset, or a split of
its own dataset it did not see), with their CT. Cases the version trained and validated on
(the split ``train`` of the dataset its ``data`` tag names, less the calibration hold-out
of ``train.calibration_cases``: the same case id or the same source CT) are refused, and
so is a version whose training data cannot be read to check. (jobs/train.py calibrates
the version on that hold-out itself when it has enough cases.) Each case is
reconstructed with K forward samples, and its features (reprojection consistency,
uncertainty, input statistics, how clearly each view reads as given) and actual PSNR fit
the score's regression, a jackknife+ interval at --level (wider for inputs further from
these cases) and the out-of-distribution threshold; fewer cases than that needs (30 at
the default levels) are refused. The calibration records the dataset's
fingerprint and the case ids, so that jobs/evaluate.py leaves those cases out of the
calibration's quality. It is a JSON file stored in the version's logged model (next to
MLmodel), so it travels with the version; the version gets reliability/* tags.
jobs/reconstruct.py and the pyfunc (params={"reliability": True}) use it from then on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="registered version: models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--data", required=True, help="prepared dataset of held-out cases")
    p.add_argument("--split", default="all", help="its split to use (default all)")
    p.add_argument("--k", type=int, default=8, help="forward samples per case (default 8)")
    p.add_argument("--level", type=float, default=0.9,
                   help="coverage of the PSNR interval (default 0.9)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                        "else sqlite:///~/.cvaa/mlflow.db)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cvaa import reliability, tracking
    from cvaa.config import Config
    from cvaa.data.dataset import PreparedDataset

    uri = args.mlflow_uri or tracking.default_tracking_uri()
    start = time.perf_counter()
    try:
        model = tracking.load_model(args.model, uri)
        cfg = Config.from_dict(model.config, source=f"{args.model} cvaa_config")
        data = PreparedDataset(args.data)
        case_ids = data.split(args.split)
        _refuse_training_cases(args, data, case_ids, tracking.model_version_tags(args.model,
                                                                                 uri), cfg)
        need = reliability.minimum_cases(args.level)
        if len(case_ids) < need:
            raise ValueError(f"{args.data} ({args.split}): {len(case_ids)} cases, but a "
                             f"calibration at level {args.level} needs at least {need}")
        print(f"[calibrate] {model.label}: {len(case_ids)} held-out cases of {args.data} "
              f"({args.split}), K = {args.k}")
        rows, psnr, xrays = reliability.measure_cases(
            model.generator, (data.arrays(c) for c in case_ids), cfg, args.k)
        calibration = reliability.ReliabilityCalibration.fit(
            rows, psnr, k=args.k, level=args.level, dataset=data.fingerprint,
            case_ids=case_ids, xrays=xrays, info={"data": args.data, "split": args.split})
        version = tracking.attach_calibration(args.model, calibration.to_json(), uri)
        tracking.log_calibration_run(args.model, uri, args.data, data.manifest, args.split,
                                     case_ids, calibration.to_json())
    except (FileNotFoundError, KeyError, ValueError, tracking.ModelLookupError,
            tracking.TrackingUnavailableError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"[calibrate] stored with {args.model} (version {version}): predicted PSNR "
          f"+-{calibration.halfwidth:.2f} dB at {100 * calibration.level:.0f} % for a typical "
          f"input (wider further out; {calibration.n_cases} cases), 'check' below "
          f"{calibration.check_psnr:.2f} dB, out of distribution beyond input distance "
          f"{calibration.ood_threshold:.1f}; {time.perf_counter() - start:.0f} s")
    return 0


def _refuse_training_cases(args, data, case_ids: list[str], tags: dict[str, str],
                           cfg) -> None:
    """Raise ``ValueError`` if any of ``case_ids`` is a case the version trained or
    validated on (the ``train`` split of the dataset its ``data`` tag names, less the
    calibration hold-out its config ``cfg`` makes of it), or if that cannot be checked."""
    from cvaa.data.dataset import PreparedDataset, training_split
    from cvaa.tracking.datasets import PreparedSplit

    trained_on = tags.get("data")
    if not trained_on:
        raise ValueError(f"{args.model}: the version has no 'data' tag, so the cases it "
                         "trained on cannot be told apart from held-out ones; register it "
                         "with jobs/train.py (which tags it)")
    try:
        training = PreparedDataset(trained_on)
    except FileNotFoundError as exc:
        raise ValueError(f"{args.model} trained on {trained_on} (its 'data' tag), which "
                         f"cannot be read to check that the calibration cases are held "
                         f"out: {exc}") from exc
    split = training_split(training, cfg.train)
    if split.calibration:  # recomputed from the config: it must be the one registered
        digest = PreparedSplit(training.root, training.manifest, "calibration",
                               split.calibration).digest
        if not tags.get("dataset.calibration", "").endswith(f"@{digest}"):
            raise ValueError(f"{args.model}: its calibration hold-out of {trained_on} "
                             f"(train.calibration_cases={cfg.train.calibration_cases}) does "
                             f"not match its 'dataset.calibration' tag, so the cases it "
                             f"trained on cannot be told apart from held-out ones")
    seen = data.shared_cases(case_ids, training, split.train + split.validation)
    if seen:
        raise ValueError(f"{len(seen)} of the {len(case_ids)} cases of {args.data} "
                         f"({args.split}) are cases {args.model} trained or validated on "
                         f"(split 'train' of {trained_on}; e.g. {seen[0]}): calibrate on "
                         "held-out cases (another dataset, or --split test)")


if __name__ == "__main__":
    sys.exit(main())
