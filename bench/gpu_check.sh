#!/usr/bin/env bash
# The GPU checks, for a lent GPU machine (see /work/.library/device): one call builds, tests,
# sanitizes and benchmarks, each phase under its own time limit and all of them under one deadline
# (GPU_CHECK_DEADLINE_S, default 570 s: one device call of at most 600 s), logs under $OUT.
#
#   bench/gpu_check.sh [phase ...]     phases: build test sanitize bench trainer (default: all, in
#                                      order; what the deadline skips, a second call can run:
#                                      `bench/gpu_check.sh trainer` on the still-warm machine)
#
# A phase that fails is reported and the next one still runs; a phase that the deadline leaves
# no time for is reported as skipped; the summary is printed last (the device tool returns the end
# of the output). Bench JSON lands in $OUT/results, written after every row (so a cut run keeps
# its rows): copy it into bench/results/ and run `python -m bench.readme_table` on the dev machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT/results"
PY=${PY:-python3}
# Peers carried from the dev machine (`make peers-dir`, then run(carry=[".peers"])): the GPU
# machine has no network to pip-install Liger-Kernel or TRL.
[ -d .peers ] && export PYTHONPATH="$PWD/.peers${PYTHONPATH:+:$PYTHONPATH}"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(build test sanitize bench trainer)
summary=()

DEADLINE=${GPU_CHECK_DEADLINE_S:-570}
left() { echo $((DEADLINE - SECONDS - 10)); }  # 10 s kept for the summary

run_phase() {  # name, limit (s), command...: the limit is cut to what the deadline leaves
  local name=$1 limit=$2
  shift 2
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -lt 20 ]; then
    summary+=("$(printf '%-10s skipped: the %ss deadline leaves %ss' "$name" "$DEADLINE" "$(left)")")
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log")")")
}

for p in "${phases[@]}"; do
  case $p in
    build)  # sm_90 only: the lent machines are Hopper; 16 cores
      run_phase build 300 env DISTILL_OPS_FORCE_CUDA=1 DISTILL_OPS_CUDA_ARCHS=90 MAX_JOBS=16 \
        "$PY" -m pip install --no-build-isolation --no-deps -e . ;;
    test)  # a first run on a GPU: see many failures at once rather than stop at the first.
      # The kernels never run on a GPU yet go first (pytest skips the repeated paths), so a
      # phase cut by its limit still reports them.
      run_phase test 200 "$PY" -m pytest -q -ra -m cuda --maxfail=25 -p no:cacheprovider \
        tests/test_native.py tests/test_topk.py tests/test_sparse_sample.py \
        tests/test_sparse_loss.py tests/test_sparse_inplace.py tests
      # the resident dense kernel (opt-in: csrc/cuda/dense_resident.cuh): required on the shapes
      # it takes (test_cuda_resident_kernel: a refusal is an error), then where it applies
      run_phase resident 150 "$PY" -m pytest -q -ra -m cuda --maxfail=25 -p no:cacheprovider \
        tests/test_native.py -k resident_kernel
      run_phase resident-1 120 env DISTILL_OPS_CUDA_RESIDENT=1 "$PY" -m pytest -q -ra -m cuda \
        --maxfail=25 -p no:cacheprovider tests/test_native.py tests/test_dense_edge.py tests/test_dense_gradcheck.py ;;
    sanitize)
      run_phase memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m bench.sanitize_ops
      run_phase racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$PY" -m bench.sanitize_ops --quick ;;
    bench)  # the bench's own budget stops it (rows kept) before the phase's limit would
      b=$(($(left) - 40))
      [ "$b" -gt 240 ] && b=240
      run_phase bench 300 "$PY" -m bench all --device cuda --quick --no-progress \
        --budget-s "$b" --out "$OUT/results/" ;;
    trainer)  # 3B -> 1B Llama shapes, V = 128256: tokens/s and the largest batch x 2048 per loss
      b=$(($(left) - 60))
      [ "$b" -gt 180 ] && b=180
      run_phase trainer 240 "$PY" -m bench.trainer_step --find-max --budget-s "$b" \
        --out "$OUT/results/" ;;
    *) summary+=("unknown phase: $p") ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
echo "== $(cat "$OUT/gpu.txt") | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for line in "${summary[@]}"; do echo "$line"; done
