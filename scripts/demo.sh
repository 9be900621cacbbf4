#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job on the embedded default:
# synthetic lumbar phantoms -> Ray Data preprocessing (local Ray). Extra arguments go to
# the job.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python jobs/preprocess.py "$@"
