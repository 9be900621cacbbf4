"""Calibrate a registered generator's reliability on held-out cases and store the
calibration with that version (cvaa/reliability.py).

    python jobs/calibrate.py --model models:/cvaa-gan@candidate --data runs/calib-prepared
    python jobs/calibrate.py --model models:/cvaa-gan/3 --data runs/prepared --split test

The cases must be ones the model never trained on (another prepared dataset, or a split it
did not see), with their CT: each is reconstructed with K forward samples, and its features
(reprojection consistency, uncertainty, input statistics) and actual PSNR fit the score's
regression, a split-conformal interval at --level and the out-of-distribution threshold.
The calibration is a JSON file stored in the version's logged model (next to MLmodel), so
it travels with the version; the version gets reliability/* tags. jobs/reconstruct.py and
the pyfunc (params={"reliability": True}) use it from then on.
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
        print(f"[calibrate] {model.label}: {len(case_ids)} held-out cases of {args.data} "
              f"({args.split}), K = {args.k}")
        rows, psnr = reliability.measure_cases(model.generator, (data.arrays(c)
                                                                 for c in case_ids), cfg,
                                               args.k)
        calibration = reliability.ReliabilityCalibration.fit(
            rows, psnr, k=args.k, level=args.level,
            info={"data": args.data, "split": args.split, "cases": len(case_ids)})
        version = tracking.attach_calibration(args.model, calibration.to_json(), uri)
        tracking.log_calibration_run(args.model, uri, args.data, data.manifest, args.split,
                                     case_ids, calibration.to_json())
    except (FileNotFoundError, KeyError, ValueError, tracking.ModelLookupError,
            tracking.TrackingUnavailableError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"[calibrate] stored with {args.model} (version {version}): predicted PSNR "
          f"+-{calibration.halfwidth:.2f} dB at {100 * calibration.level:.0f} % "
          f"({calibration.n_conformal} conformal cases), 'check' below "
          f"{calibration.check_psnr:.2f} dB, out of distribution beyond input distance "
          f"{calibration.ood_threshold ** 0.5:.1f}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
