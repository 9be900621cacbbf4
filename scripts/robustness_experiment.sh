#!/usr/bin/env bash
# The X-ray randomisation experiment of docs/robustness.md, at CPU scale: CVAA-GAN trained
# on the embedded phantoms with fixed DRRs and with randomised X-rays (same data, budget and
# seed), the real CTs of ../shared/data prepared as extra test cases, then both registered
# models through bench/robustness.py. Everything goes under $CVAA_HOME (default
# ~/.cvaa/robustness); extra arguments go to both trainings (e.g. --epochs 32).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export CVAA_HOME="${CVAA_HOME:-$HOME/.cvaa/robustness}"
mkdir -p "$CVAA_HOME"
MLFLOW="sqlite:///$CVAA_HOME/mlflow.db"
python jobs/preprocess.py --preset cpu --output "$CVAA_HOME/prepared"
python jobs/preprocess.py --preset cpu --input ../shared/data/ct --keep-names \
    --output "$CVAA_HOME/real-cpu"
python jobs/train.py --preset cpu --data "$CVAA_HOME/prepared" --mlflow-uri "$MLFLOW" \
    --run-name fixed --register-name robust-fixed "$@"
python jobs/train.py --preset cpu-augment --data "$CVAA_HOME/prepared" --mlflow-uri "$MLFLOW" \
    --run-name randomised --register-name robust-random "$@"
python bench/robustness.py --data "$CVAA_HOME/prepared" --extra-data "$CVAA_HOME/real-cpu" \
    --model fixed=models:/robust-fixed@candidate \
    --model randomised=models:/robust-random@candidate \
    --mlflow-uri "$MLFLOW" --out docs/robustness_results
