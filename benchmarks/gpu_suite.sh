#!/usr/bin/env bash
# The GPU test suite and the trust benchmarks on a 2-GPU machine, one kernel family per process (flash-attn 2 and
# flash-attn-4 both install the package flash_attn). Writes logs and JSON reports under GPU_LOGS/MODE (default
# $HOME/gpu-logs) and, where OUT is set, one archive OUT/gpu_MODE.tgz of them.
#
#   bash benchmarks/gpu_suite.sh base   # cudnn + torch_flash: dense, packed, deterministic, 2x2 hybrid on NCCL
#   bash benchmarks/gpu_suite.sh fa2    # PYTHONPATH with flash-attn 2 + ring-flash-attn: fa2 suite, peer check
#   bash benchmarks/gpu_suite.sh fa4    # PYTHONPATH with flash-attn-4: fa4 suite
#   bash benchmarks/gpu_suite.sh MODE tests/test_x.py ...   # only those test files, no benchmark
# Each run requires the backends it names (USP_GPU_REQUIRE): one that is missing or fails is a failure.
set -uo pipefail
mode=${1:?usage: gpu_suite.sh base|fa2|fa4 [test files]}
shift
out=${GPU_LOGS:-$HOME/gpu-logs}/$mode
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
case "$mode" in
  base) backends=cudnn,torch_flash; extra=(tests/test_hybrid_nccl_gpu.py tests/test_consistency.py tests/test_examples.py) ;;
  fa2) backends=fa2; extra=(tests/test_peer_gpu.py) ;;
  fa4) backends=fa4; extra=() ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
status=0
archive() { [ -z "${OUT:-}" ] || tar -czf "$OUT/gpu_${mode}.tgz" -C "$(dirname "$out")" "$mode"; }
tests=(tests/test_gpu.py tests/test_varlen_gpu.py tests/test_masks_gpu.py "${extra[@]}")
[ "$#" -eq 0 ] || tests=("$@")
for test in "${tests[@]}"; do
  name=$(basename "$test" .py)
  USP_GPU_TEST_BACKENDS=$backends USP_GPU_REQUIRE=$backends USP_TEST_REPORT="$out/${name}_${mode}.json" \
    python3 -m pytest "$test" -q -s -p no:cacheprovider > "$out/${name}_${mode}.log" 2>&1
  rc=$?
  echo "== $name ($mode): exit $rc"
  grep -E "passed|failed|worst|bitwise|peer cross|2x2|^FAILED|^E " "$out/${name}_${mode}.log" | cut -c1-400 | tail -25
  [ "$rc" -eq 0 ] || status=1
  archive
done
[ "$#" -eq 0 ] || { archive; exit $status; }
torchrun --nproc-per-node 2 benchmarks/deterministic_cost.py --out "$out/deterministic_cost_${mode}.json" \
  > "$out/deterministic_cost_${mode}.log" 2>&1 || status=1
grep -v "^W" "$out/deterministic_cost_${mode}.log" | tail -8
archive
exit $status
