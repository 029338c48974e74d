#!/usr/bin/env bash
# The GPU checks, for a lent GPU machine (see /work/.library/device): one call builds, tests,
# benchmarks and sanitizes, each phase under its own time limit and all of them under one deadline
# (GPU_CHECK_DEADLINE_S, default 570 s: one device call of at most 600 s), logs under $OUT.
#
#   bench/gpu_check.sh [phase ...]     phases: build test bench sanitize trainer (default: all
#                                      but trainer, in order; the session's 15 minutes of device
#                                      time hold one full call and a short second one on the
#                                      still-warm machine: `bench/gpu_check.sh build trainer`)
#
# The phase limits are sized so that every phase gets its turn before the deadline when the
# extension comes prebuilt (the bench takes what the tests leave, less the sanitizer's 150 s;
# building from source, ~1.5 min, comes out of the bench's share). The test phases run on
# 8 pytest workers where pytest-xdist is installed (the GPU image has it: Triton's compilations
# are CPU work, and the machine has 16 cores), and the build takes seconds when the dev machine
# built it ahead (`make device-prebuilt`, then carry .prebuilt: bench/prebuilt.py refuses a build
# from other sources). A phase that fails is reported and the next one still runs; a phase that
# the deadline leaves no time for is reported as skipped; the summary is printed last (the device
# tool returns the end of the output). Bench JSON lands in $OUT/results, written after every row
# (so a cut run keeps its rows), and the logs in $OUT/logs.tar.gz: copy the JSON into bench/results/
# and run `python -m bench.readme_table` on the dev machine. Without .git on the GPU machine, set DISTILL_OPS_COMMIT=<sha> so the JSON
# names the commit measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT/results"
PY=${PY:-python3}
# Peers carried from the dev machine (`make peers-dir`, then run(carry=[".peers"])): the GPU
# machine has no network to pip-install Liger-Kernel or TRL.
[ -d .peers ] && export PYTHONPATH="$PWD/.peers${PYTHONPATH:+:$PYTHONPATH}"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(build test bench sanitize)
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

# pytest's workers: 8 where pytest-xdist is installed, else one process
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
PYTEST=("$PY" -m pytest -q -ra -m cuda --maxfail=25 -p no:cacheprovider "${XDIST[@]}")

for p in "${phases[@]}"; do
  case $p in
    build)  # the prebuilt extension if it matches these sources, else sm_90 only, on 16 cores
      run_phase build 150 bash -c "\"$PY\" -m bench.prebuilt install || env DISTILL_OPS_FORCE_CUDA=1 \
        DISTILL_OPS_CUDA_ARCHS=90 MAX_JOBS=16 \"$PY\" -m pip install --no-build-isolation --no-deps -e ." ;;
    test)  # a first run on a GPU: see many failures at once rather than stop at the first
      run_phase test 150 "${PYTEST[@]}" tests
      # the resident dense kernel (opt-in: csrc/cuda/dense_resident.cuh): required on the shapes
      # it takes (test_cuda_resident_kernel: a refusal is an error), then wherever it applies
      run_phase resident 80 env DISTILL_OPS_CUDA_RESIDENT=1 "${PYTEST[@]}" \
        tests/test_native.py tests/test_dense_edge.py tests/test_dense_gradcheck.py ;;
    bench)  # the bench's own budget stops it (rows kept) before the phase's limit would
      b=$(($(left) - 160))   # leaves the sanitizer its 150 s
      [ "$b" -gt 200 ] && b=200
      [ "$b" -lt 0 ] && b=0     # the key rows still run (they are never skipped), cut by the limit
      run_phase bench $((b + 30)) "$PY" -m bench all --device cuda --quick --no-progress \
        --budget-s "$b" --out "$OUT/results/" ;;
    sanitize)
      run_phase memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m bench.sanitize_ops
      run_phase racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$PY" -m bench.sanitize_ops --quick ;;
    trainer)  # 3B -> 1B Llama shapes, V = 128256: tokens/s and the largest batch x 2048 per loss
      b=$(($(left) - 40))
      [ "$b" -gt 180 ] && b=180
      run_phase trainer $((b + 30)) "$PY" -m bench.trainer_step --find-max --budget-s "$b" \
        --out "$OUT/results/" ;;
    *) summary+=("unknown phase: $p") ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
# what the installation ran with (versions, kernels built, auto's picks): into the logs archive
"$PY" -m distill_ops.env_report >"$OUT/env.log" 2>&1
echo "== $(cat "$OUT/gpu.txt") | commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for line in "${summary[@]}"; do echo "$line"; done
# The device tool brings back at most 8 files from $OUT: the logs travel as one archive, so the
# results JSON always comes back (logs.tar.gz, gpu.txt, results/*.json).
(cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
echo "files: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
