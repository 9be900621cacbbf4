#!/usr/bin/env bash
# Creates .venv (if needed) and installs cvaa into it: the CPU build of torch first, then
# the package with its dev extra. Sourced by demo.sh and test.sh; safe to run repeatedly
# (skips pip when pyproject.toml has not changed since the last install).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CVAA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.cvaa-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing torch (CPU build) and cvaa[dev] into $VENV"
  # pip's notes that a configured local index has no folder for a package (a machine's
  # pip.conf can list such indexes) are dropped; everything else pip says is shown.
  pip_quiet() {
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 \
      | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" || true; }
  }
  pip_quiet --upgrade pip
  # The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
  # GPU users: skip this line and let the package's torch range take your CUDA build.
  pip_quiet "torch==${CVAA_TORCH_VERSION:-2.13.0}"
  pip_quiet -e "$ROOT[dev]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
cd "$ROOT"
