#!/usr/bin/env bash
# The INT4 batch-1 experiments prepared in session 19 (issue #5), in one device call of about 8-9 minutes on one
# H100, most informative first (each part's log in $OUT/NAME.log; a part cut by the time budget is recorded):
#   1. GPU tests of the INT4 GEMVs: the tensor-core kernel, the pairs loop, preload and pipelined loads
#   2. perf/exp_w4_mma.py: the tensor-core GEMV's tiles against the default, per projection from HBM (bf16)
#   3. perf/ablate_decode.py, 8B INT4 + INT8 head batch-1 decode: base, the first-trip preload, 3 pipelined trips,
#      the tensor-core GEMV with 8 and 4 warps (zero points folded) and with 3 pipelined trips, base again
#   4. the same harness in bf16, for the ratio on this machine
#   OUT=/tmp/o BUDGET_S=560 bash perf/gpu_int4_experiments.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/tritium-out}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"
source perf/device_steps.sh  # step NAME LIMIT_S COMMAND...

step tests 150 python3 -m pytest -q tests/kernels/test_quant_matmul.py -k "tensor_cores or w4a16 or gated or 16_bit"
step mma 120 python3 perf/exp_w4_mma.py --dtypes bf16 --out "$OUT/exp_w4_mma.json"
step int4 260 python3 perf/ablate_decode.py --quant int4_wo+head \
  --variants base,w4preload,w4stages=3,w4mma=8f,w4mma=4f,w4mma=8f:3,base --out "$OUT/ablate_int4.json"
step bf16 60 python3 perf/ablate_decode.py --variants base --out "$OUT/ablate_bf16.json"
rm -f "$OUT"/*.rc
echo; tail -n 2 "$OUT/tests.log"; grep -v Warn "$OUT/mma.log" | tail -n 4; tail -n 9 "$OUT/int4.log"; tail -n 2 "$OUT/bf16.log"
