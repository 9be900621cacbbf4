"""Reconstruct a CT (HU) from a PA and a lateral X-ray with a registered generator.

    python jobs/reconstruct.py --model models:/cvaa-gan@candidate \\
        --pa pa.dcm --lateral lat.dcm --out ct.nii.gz
    python jobs/reconstruct.py --model models:/cvaa-gan@candidate \\
        --pa pa.dcm --lateral lat.dcm --out ct_dicom/ --dicom    # filed with the patient
    python jobs/reconstruct.py --model models:/cvaa-gan@candidate \\
        --pa pa.dcm --lateral lat.dcm --out ct_dicom/ --dicom --anonymize
    python jobs/reconstruct.py --model models:/cvaa-gan@candidate \\
        --from-ct ../shared/data/ct/abdomen_lumbar_3mm.nii.gz --out roundtrip.nii.gz

Inputs: PNG / TIFF (8- or 16-bit), DICOM (DX, CR; MONOCHROME1 is inverted from its
header), or 2D NIfTI / MHA / NRRD. The model was trained on DRRs with this geometry, and
real radiographs are assumed to match it:

  * two perpendicular views, PA and lateral, taken at the source-to-isocentre and
    source-to-detector distances of the model's config (drr.sad_mm, drr.sid_mm: 1000 and
    1500 mm by default);
  * each image (centre-cropped to a square, then resized to drr.detector_pixels) covers
    the reconstruction's field of view at the isocentre (preprocess.size x spacing_mm:
    256 mm at the paper preset), centred on the region to reconstruct;
  * rows run superior -> inferior; the PA is displayed as a radiologist sees it (patient's
    right on the viewer's left), the lateral with anterior on the viewer's left; both
    images have the same size in pixels (one detector);
  * bone is bright (high attenuation = high value); use --invert otherwise.

Intensities cannot be matched exactly: a DRR is a line integral of attenuation divided by a
fixed constant (drr.log_scale), while a radiograph's stored values are a vendor-processed,
monotonic function of it. Each view is windowed between robust percentiles (--window,
default 0.5 99.5) mapped linearly onto --xray-range (default: air 0 to 6 attenuation
lengths / drr.log_scale = 0.5, a typical trunk's peak in the training DRRs).

The output is the model's cube in HU (clip range of the config), isotropic
preprocess.spacing_mm voxels (2 mm at the paper preset), canonical LPS direction
diag(1, 1, -1) (axial slices from superior to inferior), centred at (0, 0, 0) mm, or at the
input CT's crop with --from-ct; as NIfTI / MHA / NRRD by suffix, or a DICOM CT series in a
directory with --dicom. --from-ct renders the two DRRs from a CT with the training geometry
and also prints the metrics against that CT's prepared cube. Bad input exits with status 2
and writes nothing; two DICOM radiographs with different PatientID or StudyInstanceUID are
bad input.

A DICOM series says what it is: ImageType DERIVED\SECONDARY, SeriesDescription "CT
estimate from 2 X-rays (NAME vN)", and ImageComments / DerivationDescription "Not an
acquired CT: a CT volume estimated by the ... model models:/NAME@ALIAS (registry version
N) from a PA and a lateral radiograph. Not for diagnosis." (Manufacturer cvaa,
ManufacturerModelName the model). When --pa and --lateral are both DICOM, the series is
filed with their patient and study (PatientName, PatientID, PatientBirthDate, PatientSex,
StudyInstanceUID, StudyDate, StudyTime, AccessionNumber, StudyID, copied from the PA) as a
new series with its own frame of reference; otherwise (PNG, NIfTI, --from-ct) the patient
is ANONYMOUS in a new study. --anonymize writes it without any of the inputs' identifiers
(ANONYMOUS, a new study, PatientIdentityRemoved YES). These identifiers are only copied
into the series: never printed or logged.

Every reconstruction says how far to trust it (cvaa/reliability/; --no-reliability skips
it): K forward samples in one batch (the X-rays as given plus K-1 test-time perturbations)
give the estimate (the output for the X-rays as given: the same network, the same input,
so it is the plain reconstruction up to float rounding, and it is not computed again) and
a per-voxel uncertainty, written next to the estimate as OUT_uncertainty (the same format;
with --dicom a second DERIVED series in the same study, the standard deviation in HU);
DRRs of the estimate are compared with the inputs. With the calibration stored with the
registered version (jobs/calibrate.py), a console line and OUT.reliability.json give a
verdict: ok or check with the predicted PSNR and its conformal interval, or out of
distribution with the input's distance only (a predicted PSNR would mean nothing there).
OUT.reliability_reprojection.png shows the inputs, the DRRs of the estimate and their
residual. Without a calibration, the uncertainty and the reprojection are still written,
and the verdict is "uncalibrated" (no predicted PSNR).
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
                   help="registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--pa", help="frontal (PA) X-ray file")
    p.add_argument("--lateral", help="lateral X-ray file")
    p.add_argument("--from-ct", metavar="CT", help="render both X-rays from this CT (file or "
                   "DICOM series directory) with the training geometry, instead of --pa and "
                   "--lateral; also prints the metrics against it")
    p.add_argument("--out", required=True, help="output volume (.nii.gz, .nii, .mha, .nrrd) "
                   "or, with --dicom, a new directory for the DICOM series")
    p.add_argument("--dicom", action="store_true",
                   help="write a DICOM CT series, labelled as this model's estimate; filed "
                   "with the patient and study of --pa and --lateral when both are DICOM")
    p.add_argument("--anonymize", action="store_true",
                   help="with --dicom: copy no identifiers from DICOM inputs (patient "
                   "ANONYMOUS, a new study, PatientIdentityRemoved YES)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                        "else sqlite:///~/.cvaa/mlflow.db)")
    p.add_argument("--invert", action="store_true",
                   help="the X-rays show bone dark (negate them before windowing)")
    p.add_argument("--window", nargs=2, type=float, metavar=("LOW_PCT", "HIGH_PCT"),
                   default=None, help="intensity percentiles taken as air and as the "
                   "brightest tissue (default 0.5 99.5)")
    p.add_argument("--xray-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   default=None, help="training-domain values the window maps onto "
                   "(default 0 and 6 / drr.log_scale)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-reliability", action="store_true",
                   help="write the estimate only: no uncertainty, score or verdict")
    p.add_argument("--k", type=int, default=0, help="forward samples for the uncertainty "
                   "(default: the calibration's K, else 8)")
    return p


def reliability_paths(out: str, dicom: bool) -> tuple[str, str]:
    """``(uncertainty output, metadata JSON)`` beside ``out``: ``ct.nii.gz`` ->
    ``ct_uncertainty.nii.gz`` and ``ct.reliability.json``; a DICOM directory ``ct/`` ->
    ``ct_uncertainty/`` and ``ct.reliability.json``."""
    path = Path(out.rstrip("/"))
    if dicom:
        return str(path.with_name(path.name + "_uncertainty")), \
            str(path.with_name(path.name + ".reliability.json"))
    name = path.name
    stem, suffix = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else \
        (path.stem, path.suffix)
    return str(path.with_name(stem + "_uncertainty" + suffix)), \
        str(path.with_name(stem + ".reliability.json"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_ct and (args.pa or args.lateral):
        return _fail("give either --pa and --lateral, or --from-ct, not both")
    if not args.from_ct and not (args.pa and args.lateral):
        missing = " and ".join(f"--{v}" for v in ("pa", "lateral") if not getattr(args, v))
        return _fail(f"missing X-ray view: {missing} (give both --pa and --lateral, "
                     "or --from-ct CT)")
    if args.anonymize and not args.dicom:
        return _fail("--anonymize applies to a DICOM series (--dicom); NIfTI / MHA / NRRD "
                     "output carries no patient identifiers")

    import torch

    from cvaa import inference, tracking
    from cvaa.config import Config
    from cvaa.data.io import InvalidVolumeError
    from cvaa.metrics import evaluate_batch

    unc_out, meta_out = reliability_paths(args.out, args.dicom)
    try:
        inference.check_output(args.out, args.dicom)
        if not args.no_reliability:
            inference.check_output(unc_out, args.dicom)
    except ValueError as exc:
        return _fail(str(exc))
    mlflow_uri = args.mlflow_uri or tracking.default_tracking_uri()
    start = time.perf_counter()
    identity = None  # the DICOM inputs' patient and study: into the series only, never shown
    try:
        if not args.from_ct:  # bad files fail before the model is fetched
            pa, lateral = inference.read_xray(args.pa), inference.read_xray(args.lateral)
            identity = inference.read_pair_identity(args.pa, args.lateral)
        model = tracking.load_model(args.model, mlflow_uri)
        cfg = Config.from_dict(model.config, source=f"{args.model} cvaa_config")
        loaded = time.perf_counter()
        origin, prepared = None, None
        if args.from_ct:
            xrays, prepared = inference.xrays_from_ct(args.from_ct, cfg)
            origin = prepared.cube.origin_mm
        else:
            xrays = inference.prepare_xrays(
                pa, lateral, cfg, window_pct=args.window or inference.DEFAULT_WINDOW_PCT,
                value_range=args.xray_range, invert=args.invert,
                names=(args.pa, args.lateral))
        prepped = time.perf_counter()
        generator = model.generator.to(torch.device(args.device))
        filed = identity is not None and not args.anonymize
        # With reliability, one batched pass of K gives the estimate (its sample 0) and the
        # uncertainty: the estimate is reused, not computed a second time.
        assessed = time.perf_counter()
        assessment = None if args.no_reliability else _assess(generator, cfg, xrays, model,
                                                              args.k)
        assessed = time.perf_counter() - assessed
        result = inference.reconstruct_to_file(
            generator, cfg, xrays, args.out, dicom=args.dicom,
            label=inference.estimate_label(model.uri, model_label=model.label,
                                           version=model.version,
                                           generator=cfg.model.generator),
            identity=identity if filed else None, identity_removed=args.anonymize,
            origin_mm=origin, source=args.from_ct or f"{args.pa} + {args.lateral}",
            normalized=None if assessment is None else assessment.estimate)
        rel, written = None, time.perf_counter()
        if assessment is not None:
            rel = _write_reliability(assessment, cfg, xrays, result, model, args, unc_out,
                                     meta_out, identity if filed else None)
        written = time.perf_counter() - written
    except (inference.InvalidXrayError, InvalidVolumeError, tracking.ModelLookupError,
            tracking.TrackingUnavailableError, ValueError) as exc:
        return _fail(str(exc))
    total = time.perf_counter() - start

    vol = result.volume
    where = args.out
    if args.dicom:
        filing = ("with the radiographs' patient and study" if filed else
                  "anonymized, new study" if args.anonymize else "patient ANONYMOUS, new study")
        where += f" ({len(result.written)} DICOM slices, {filing})"
    print(f"model: {model.label} ({cfg.model.generator}), X-rays {xrays.shape[1]}x"
          f"{xrays.shape[2]} -> CT {'x'.join(map(str, vol.shape))} at "
          f"{vol.spacing_mm[0]:g} mm, HU {vol.array.min():.0f}..{vol.array.max():.0f}")
    print(f"wrote {where}")
    if rel is not None:
        print(rel["line"])
        print(f"wrote {unc_out} (uncertainty, K = {rel['k']}), {meta_out} and "
              f"{rel['reprojection_figure']}")
    forward = (f"forward with reliability (K = {rel['k']}) {assessed:.2f} s" if rel else
               f"forward {result.seconds['forward']:.2f} s")
    print(f"time: {total:.2f} s (model load {loaded - start:.2f} s, inputs "
          f"{prepped - loaded:.2f} s, {forward} on {args.device}, write "
          f"{result.seconds['write'] + written:.2f} s)")
    if prepared is not None:
        pred = torch.from_numpy(result.normalized)[None, None]
        target = torch.from_numpy(prepared.normalized)[None, None]
        metrics = evaluate_batch(pred, target)[0]
        print("against the prepared CT: " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _assess(generator, cfg, xrays, model, k: int):
    """:func:`cvaa.reliability.assess` with the version's calibration (if any) at its K
    (``k`` 0), else at ``k`` or 8."""
    from cvaa import reliability

    calibration = None
    if model.calibration is not None:
        calibration = reliability.ReliabilityCalibration.from_json(model.calibration)
    k = k or (calibration.k if calibration is not None else 8)
    return reliability.assess(generator, xrays, cfg, calibration, k=k)


def _write_reliability(rel, cfg, xrays, result, model, args, unc_out: str, meta_out: str,
                       identity) -> dict:
    """Write the uncertainty volume (or series), the reprojection figure and the metadata
    JSON of an assessment; returns the metadata with its console ``line``."""
    import json

    import numpy as np

    from cvaa import inference
    from cvaa.data.io import Volume

    k = rel.k
    lo, hi = cfg.preprocess.clip_hu
    vol = result.volume
    unc = Volume((rel.uncertainty * (hi - lo)).astype(np.float32), vol.spacing_mm,
                 vol.origin_mm, vol.direction, vol.source)          # standard deviation, HU
    meta = {"model": model.uri, "version": model.version, "estimate": args.out,
            "uncertainty": unc_out, "uncertainty_unit": "HU (standard deviation)",
            **rel.metadata()}
    f = rel.features
    meta["line"] = rel.assessment.line()
    if rel.assessment.verdict == "uncalibrated":
        meta["line"] += (f"; reprojection NCC PA {f['reprojection_ncc_pa']:.3f}, lateral "
                         f"{f['reprojection_ncc_lateral']:.3f}")
    if args.dicom:
        import pydicom

        study = pydicom.dcmread(result.written[0], stop_before_pixels=True).StudyInstanceUID
        label = inference.estimate_label(model.uri, model_label=model.label,
                                         version=model.version,
                                         generator=cfg.model.generator)
        verdict = meta["line"][len("reliability: "):]
        unc_label = inference.EstimateLabel(
            ("Uncertainty of " + label.series_description)[:64],
            f"Per-voxel standard deviation (HU) over {k} forward samples of the CT estimate "
            f"in this study; reliability: {verdict}. " + label.comments, label.model_name)
        inference.write_dicom_series(unc, unc_out, label=unc_label, identity=identity,
                                     identity_removed=args.anonymize,
                                     study_uid=None if identity is not None else study,
                                     series_number=2)
    else:
        inference.write_volume(unc, unc_out)
    from cvaa.figures import reprojection_png

    figure = meta_out[:-len(".json")] + "_reprojection.png"
    Path(figure).write_bytes(reprojection_png(np.asarray(xrays), rel.drr,
                                              title=meta["line"][len("reliability: "):]))
    meta["reprojection_figure"] = figure
    Path(meta_out).write_text(json.dumps(meta, indent=1))
    return meta


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
