#!/usr/bin/env bash
# The X-ray randomisation experiment of docs/robustness.md, at CPU scale: CVAA-GAN trained
# on the embedded phantoms with fixed DRRs, with randomised X-rays, and with only the
# geometry or only the appearance part of the randomisation (same data, budget and seed),
# the real CTs of ../shared/data prepared as extra test cases, then the four registered
# models through bench/robustness.py. Everything goes under $CVAA_HOME (default
# ~/.cvaa/robustness); extra arguments go to both trainings (e.g. --epochs 32).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export CVAA_HOME="${CVAA_HOME:-$HOME/.cvaa/robustness}"
mkdir -p "$CVAA_HOME"
MLFLOW="sqlite:///$CVAA_HOME/mlflow.db"
# The first training prepares the embedded phantoms under $CVAA_HOME (prepared-<config hash>).
# The recorded protocol: 64 phantoms, every train-split case trained or validated on (the
# cpu preset now holds 40 of 112 out for a calibration).
PROTOCOL=(--set data.n_phantoms=64 --set train.calibration_cases=0)
python jobs/train.py --preset cpu "${PROTOCOL[@]}" --mlflow-uri "$MLFLOW" \
    --run-name fixed --register-name robust-fixed "$@"
PREPARED="$(ls -d "$CVAA_HOME"/prepared-* | head -n 1)"
python jobs/preprocess.py --preset cpu --input ../shared/data/ct --keep-names \
    --output "$CVAA_HOME/real-cpu"
python jobs/train.py --preset cpu-augment "${PROTOCOL[@]}" --data "$PREPARED" --mlflow-uri "$MLFLOW" \
    --run-name randomised --register-name robust-random "$@"
GEOMETRY_ONLY=(--set augment.mu_frac=0 --set augment.bone_frac=0 --set augment.scatter_max=0
    --set augment.photons_max=0 --set augment.blur_max_px=0 --set augment.gamma_frac=0
    --set augment.window_prob=0 --set augment.unsharp_max=0)
APPEARANCE_ONLY=(--set augment.rotation_deg=0 --set augment.shift_mm=0
    --set augment.distance_frac=0 --set augment.zoom_frac=0)
python jobs/train.py --preset cpu-augment "${PROTOCOL[@]}" "${GEOMETRY_ONLY[@]}" --data "$PREPARED" \
    --mlflow-uri "$MLFLOW" --run-name geometry --register-name robust-geo "$@"
python jobs/train.py --preset cpu-augment "${PROTOCOL[@]}" "${APPEARANCE_ONLY[@]}" --data "$PREPARED" \
    --mlflow-uri "$MLFLOW" --run-name appearance --register-name robust-app "$@"
python bench/robustness.py --data "$PREPARED" --extra-data "$CVAA_HOME/real-cpu" \
    --model fixed=models:/robust-fixed@candidate \
    --model randomised=models:/robust-random@candidate \
    --model geometry=models:/robust-geo@candidate --model appearance=models:/robust-app@candidate \
    --mlflow-uri "$MLFLOW" --out docs/robustness_results
