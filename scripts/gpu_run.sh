#!/usr/bin/env bash
# One command for any single-GPU machine without network access (Python 3 with torch and
# numpy; no Ray, MLflow or SimpleITK needed there):
#
#   bash scripts/gpu_run.sh OUT [WHEELS]
#
# 1. installs the wheels in WHEELS (default ./wheels; SimpleITK, pytest and its plugins:
#    docs/performance.md says how to download them) into a folder of its own;
# 2. runs the GPU-marked tests (compiled vs eager on CUDA for every generator, the X-ray
#    render without a host sync, the layout);
# 3. measures the training step (bench/gpu_check.py: CVAA-GAN and X2CT-GAN at batch 4,
#    bf16 and fp32, compiled and eager);
# 4. runs two compiled DDP ranks of the plain-torch loop on the one GPU (gloo;
#    bench/ddp_check.py).
#
# Every stage writes into OUT as it goes (OUT/gpu_run.log is the whole console) and has
# its own time limit, so the command returns within 9 minutes whatever happens, with what
# was measured until then. Its exit status is the number of stages that did not pass.
set -uo pipefail
OUT="${1:?usage: bash scripts/gpu_run.sh OUT [WHEELS]}"
WHEELS="${2:-wheels}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_run.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=0

say() { echo "[gpu_run] $*" | tee -a "$LOG"; }
# stage NAME LIMIT_S CMD...: runs CMD under a time limit, its output to the console and
# OUT/gpu_run.log, and says how it ended.
stage() {
  local name="$1" limit="$2"
  shift 2
  say "$name: start (limit ${limit} s; $(( $(date +%s) - START )) s so far)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    say "$name: passed"
  else
    FAILED=$((FAILED + 1))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      say "$name: stopped at its ${limit} s limit (what it wrote to $OUT stays)"
    else
      say "$name: failed (exit $rc)"
    fi
  fi
}

export CVAA_COMMIT="${CVAA_COMMIT:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || cat "$ROOT/.commit" 2>/dev/null || echo unknown)}"
say "commit $CVAA_COMMIT; $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' 2>&1)"

SITE="${TMPDIR:-/tmp}/cvaa-gpu-site"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  stage "install wheels" 40 "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
else
  say "install wheels: no wheels in $WHEELS (using what the machine has)"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

stage "GPU tests" 140 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rA \
  tests/test_gan_compile.py tests/test_augment.py tests/test_layout.py \
  --junitxml "$OUT/gpu_tests.xml"
stage "gpu_check" 240 "$PY" bench/gpu_check.py --no-train --budget-s 215 \
  --out-dir "$OUT" --verbose
stage "ddp_check" 110 "$PY" bench/ddp_check.py --device cuda --ranks 2 --epochs 3 \
  --out "$OUT" --workdir "${TMPDIR:-/tmp}/cvaa-ddp-check" --timeout-s 90
say "done in $(( $(date +%s) - START )) s; $FAILED stage(s) did not pass; results in $OUT"
exit "$FAILED"
