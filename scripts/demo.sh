#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job on the embedded default: synthetic
# lumbar phantoms -> Ray Data preprocessing -> Ray Train (cpu preset) -> Table I on the
# test split -> registered model models:/cvaa-gan@candidate, all on a local Ray and a local
# MLflow store (~/.cvaa). Extra arguments go to jobs/train.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python jobs/train.py "$@"
