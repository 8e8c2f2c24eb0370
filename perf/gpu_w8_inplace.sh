#!/usr/bin/env bash
# One GPU call for issue 5's batch-1 work: the INT4 and INT8 GEMV loop options timed in place in the 8B batch-1
# step (perf/ablate_decode.py), bf16's GEMV with its own beside them, then the GEMV kernels' GPU tests. On the GPU
# machine: `bash perf/gpu_w8_inplace.sh`; every part's log and exit code land in $OUT (perf/device_steps.sh), and
# a part that fails or runs out of time does not stop the rest.
set -uo pipefail
source perf/device_steps.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-570}
INT8_VARIANTS=${INT8_VARIANTS:-base,w8plain,base,w8plain}
BF16_VARIANTS=${BF16_VARIANTS:-base,noevict,base}
INT4_VARIANTS=${INT4_VARIANTS:-base,w4fp32,base,w4fp32}

nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
step ablate_int4 130 python3 perf/ablate_decode.py --quant int4_wo+head --variants "$INT4_VARIANTS" \
  --out "$OUT/ablate_int4.json"
step ablate_int8 300 python3 perf/ablate_decode.py --quant int8_wo+head --variants "$INT8_VARIANTS" \
  --out "$OUT/ablate_int8.json"
step ablate_bf16 120 python3 perf/ablate_decode.py --variants "$BF16_VARIANTS" --out "$OUT/ablate_bf16.json"
step quant_tests 300 python3 -m pytest -q -x ${TESTS:-tests/kernels/test_quant_matmul.py tests/kernels/test_gemv.py}
echo "== summary"
for f in "$OUT"/ablate_*.log; do echo "-- $f"; grep -E "tok/s|^\{" "$f"; done
tail -n 2 "$OUT/quant_tests.log"
# $OUT brings back at most 8 files: the exit codes in one, the ablation logs in one
for f in "$OUT"/*.rc; do echo "$(basename "$f" .rc) $(cat "$f")"; done >"$OUT/exit_codes.txt" && rm -f "$OUT"/*.rc
for f in "$OUT"/ablate_*.log; do echo "== $f"; cat "$f"; done >"$OUT/ablate.txt" && rm -f "$OUT"/ablate_*.log
