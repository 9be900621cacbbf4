"""Turn a CT archive into a prepared training set with Ray Data.

    python jobs/preprocess.py --input /data/ct --output runs/prepared
    python jobs/preprocess.py --input s3://archive/ct --output s3://bucket/prepared --preset paper
    python jobs/preprocess.py --input cases.csv --output runs/prepared --set preprocess.crop_center=body
    python jobs/preprocess.py                       # embedded default: synthetic phantoms

Under ``ray job submit`` (or with ``--address``) it runs on that cluster; otherwise it
starts a local Ray. A few CTs per Ray task: read -> orient -> resample -> DRR -> crop ->
clip -> normalise -> write. Every input ends up prepared or rejected (with its reason) in
``OUTPUT/manifest.json``; a re-run with the same config skips the cases already done.
A directory or prefix may be a hospital's DICOM export as it comes: the series are found
from the file headers (on the Ray workers) and the CT of each study chosen by the
``dicom.*`` config (docs/guide/dicom.md); every file and series not used is listed under
``not_used`` in the manifest with its reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too

from cvaa.cli import add_verbose_argument  # noqa: E402
from cvaa.config import PRESETS, ConfigError, load_config  # noqa: E402
from cvaa.data.io import InvalidVolumeError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="directory, s3://bucket/prefix, or a .csv/.json manifest "
                                   "of CT URIs (optional patient_id); default: generate "
                                   "data.n_phantoms synthetic lumbar phantoms")
    p.add_argument("--output", default="runs/prepared",
                   help="local directory or s3:// prefix (default: runs/prepared)")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="config preset (default: cpu)")
    p.add_argument("--config", help="YAML config file applied over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="dotted override, e.g. preprocess.size=64")
    p.add_argument("--workers", type=int, help="cases in flight at once (default: all CPUs)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--keep-names", action="store_true",
                   help="case ids from the file names (data without identifiers only); "
                        "default: pseudonyms, a keyed hash of each URI and patient id")
    p.add_argument("--pseudonym-key", metavar="FILE",
                   help="file with the pseudonym key (hex, >= 16 bytes) to use instead of "
                        "the one generated once and stored with the prepared dataset")
    add_verbose_argument(p)
    p.add_argument("--phantom-dir", help="where generated phantoms are cached "
                                         "(default: OUTPUT/../phantoms-<hash>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except (ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from cvaa.data.dataset import dataset_key, list_inputs
    from cvaa.distributed.cluster import init_ray
    from cvaa.distributed.pipeline import (default_phantom_dir, discover_inputs,
                                           ensure_phantoms, run_pipeline)

    init_ray(args.address, verbose=args.verbose)
    source = args.input
    keep_names = args.keep_names
    if source is None:   # synthetic phantoms carry no identifiers: readable ids
        source = ensure_phantoms(cfg, args.phantom_dir or default_phantom_dir(args.output, cfg))
        keep_names = True
    try:
        key = None if keep_names else dataset_key(args.output, args.pseudonym_key)
        archive = None
        if source.lower().endswith((".csv", ".json")):
            inputs = list_inputs(source, key)
        else:  # a directory or prefix: volume files, and DICOM series from their headers
            archive = discover_inputs(source, cfg, key, workers=args.workers)
            inputs = archive.inputs
    except (InvalidVolumeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not inputs and not (archive and archive.not_used):
        print(f"error: no CT volumes found under {source}", file=sys.stderr)
        return 2
    if not inputs:  # DICOM files, none usable: the manifest still says why, file by file
        print(f"error: no usable CT series under {source}; the reasons are under "
              f"not_used in {args.output}/manifest.json", file=sys.stderr)
    manifest = run_pipeline(inputs, cfg, args.output, workers=args.workers, source=source,
                            pseudonymous=key is not None, archive=archive)
    return 0 if manifest["prepared"] else 1


if __name__ == "__main__":
    sys.exit(main())
