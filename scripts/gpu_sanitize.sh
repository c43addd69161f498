#!/usr/bin/env bash
# compute-sanitizer over a small representative set of fastattn's CUDA prefill calls
# (tests/gpu/sanitize_prefill.py: dense, varlen, block-table and CSR paged, every option, head dims
# 8..256, page sizes 1..256, strided views, empty sequences, probabilities) and KV-cache / decode
# calls (tests/gpu/sanitize_decode.py: contiguous and paged caches, appends with rotary, leftpad,
# cache_batch_idx, split-KV, out-of-range page ids, empty caches), merge calls
# (tests/gpu/sanitize_merge.py: merge_state / merge_state_in_place / merge_states on the vector and
# scalar paths, strided and aliased views, masks, empty states, zero sizes) and shared-prefix (cascade)
# calls (tests/gpu/sanitize_cascade.py: stacked / per-request prefix passes with splits, decode and
# prefill suffix passes, rows past qo_indptr[B], the decode wrapper). For the GPU machine,
# after the package is installed (scripts/gpu_check.sh does that). From the repository root:
#   scripts/gpu_sanitize.sh
# Runs each tool in turn over each case script, prints its summary line and a compact table last;
# exits 1 when a tool reports an error (or a script's results are wrong), 2 when compute-sanitizer
# is missing.
#
# memcheck runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (each tensor its own cudaMalloc, so a read
# past a tensor's end is out of bounds, not inside a cached block) and checks every kernel,
# torch's included, with the reference comparisons on. The other tools check only fastattn's
# kernels (mangled names containing "fastattn", when the extension's device code has such
# kernels) and skip the reference (--no-check): racecheck is slow on other kernels.
#
# Environment: SANITIZE_TOOLS (default "memcheck racecheck"; synccheck and initcheck also work),
#              SANITIZE_FILTER (kernel-name substring for the non-memcheck tools; "" = none;
#              default "fastattn" when found in the device code), SANITIZE_ARGS (extra arguments
#              of both case scripts, e.g. "--only varlen" or "--seed N"), SANITIZE_SCRIPTS
#              (default "prefill decode merge cascade": tests/gpu/sanitize_<name>.py), SANITIZE_TIMEOUT
#              (seconds per tool and script, default 540), PYTHON, OUT (logs go there, else
#              build-gpu/: sanitize_<tool>.log for prefill, sanitize_<name>_<tool>.log for the others).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY="${PYTHON:-python3}"
TOOLS="${SANITIZE_TOOLS:-memcheck racecheck}"
SCRIPTS="${SANITIZE_SCRIPTS:-prefill decode merge cascade}"
LIMIT="${SANITIZE_TIMEOUT:-540}"
LOGDIR="${OUT:-build-gpu}"
mkdir -p "$LOGDIR"
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"

if ! command -v compute-sanitizer >/dev/null 2>&1; then
  echo "ERROR: compute-sanitizer not found (CUDA toolkit bin/ not on PATH)"
  exit 2
fi
compute-sanitizer --version | tail -1

SO="$("$PY" -c 'import fastattn._C as m; print(m.__file__)' 2>/dev/null)"
if [ -z "$SO" ]; then
  echo "ERROR: fastattn is not importable with $PY: install the package first (pip install .)"
  exit 2
fi
if [ -z "${SANITIZE_FILTER+x}" ]; then
  # Kernel entry points in the extension's embedded cubins whose mangled name has "fastattn".
  n_kernels=$(cuobjdump -symbols "$SO" 2>/dev/null | grep STO_ENTRY | grep -c fastattn || true)
  if [ "${n_kernels:-0}" -gt 0 ]; then FILTER=fastattn; else FILTER=""; fi
  echo "fastattn kernel entry points in $(basename "$SO"): ${n_kernels:-0}" \
       "-> filter for non-memcheck tools: ${FILTER:-none (all kernels checked)}"
else
  FILTER="$SANITIZE_FILTER"
fi

declare -a SUMMARY=()
FAILED=0
for tool in $TOOLS; do
for script in $SCRIPTS; do
  if [ "$script" = prefill ]; then log="$LOGDIR/sanitize_${tool}.log"; label="$tool"
  else log="$LOGDIR/sanitize_${script}_${tool}.log"; label="$tool $script"; fi
  opts=(--tool "$tool" --error-exitcode 99 --print-limit 30)
  args=()
  if [ "$tool" = memcheck ]; then
    env_extra=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  else
    env_extra=()
    args+=(--no-check)
    [ -n "$FILTER" ] && opts+=(--kernel-name "kns=$FILTER")
  fi
  echo "== [sanitize] $label: compute-sanitizer ${opts[*]} $PY tests/gpu/sanitize_${script}.py ${args[*]} ${SANITIZE_ARGS:-}"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  env "${env_extra[@]}" timeout "$LIMIT" compute-sanitizer "${opts[@]}" \
    "$PY" "tests/gpu/sanitize_${script}.py" "${args[@]}" ${SANITIZE_ARGS:-} >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  line="$(grep -E '^=+ [A-Z]+ SUMMARY' "$log" | tail -1 | sed 's/^=* *//')"
  cases="$(grep -E "^sanitize_${script}: [0-9]+ cases" "$log" | tail -1)"
  if [ "$rc" -eq 0 ]; then
    status=ok
  else
    status=FAIL
    FAILED=1
    case "$rc" in
      99) why="sanitizer errors" ;;
      124) why="timed out after ${LIMIT}s" ;;
      *) why="exit status $rc" ;;
    esac
    line="$why; ${line:-no summary}"
    echo "---- $label: errors (first 60 lines of $log) ----"
    grep -E '^=+ ' "$log" | head -60
    echo "---- $label: last lines of $log ----"
    tail -15 "$log"
  fi
  echo "$label: ${line:-no summary line} | ${cases:-the case script did not finish} (${secs}s, log $log)"
  SUMMARY+=("$(printf '%-16s %-5s %5ss  %s' "$label" "$status" "$secs" "${line:-no summary line}")")
done
done

echo
echo "==================== fastattn compute-sanitizer ($SCRIPTS) ===================="
for l in "${SUMMARY[@]}"; do echo "$l"; done
if [ "$FAILED" = "0" ]; then echo "SANITIZE PASSED"; else echo "SANITIZE FAILED"; fi
exit "$FAILED"
