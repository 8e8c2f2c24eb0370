#!/usr/bin/env bash
# Session 22's INT4 batch-1 experiments (issue #5) in one device call of about 8 minutes on one H100 (each part's
# log in $OUT/NAME.log):
#   1. GPU tests of the shared-memory INT4 GEMV (backend/kernels/w4_gemv_ring.py) and of the register GEMV
#   2. perf/exp_w4_ring.py: both kernels per 8B projection from HBM, float32 and float16 scales
#   3. perf/ablate_decode.py, 8B INT4 + INT8 head batch-1 decode in place: base (float16 scales), float32 scales
#      (the engine before), the ring kernel everywhere (cp.async, then TMA copies), then on one projection shape at a
#      time, base again
#   4. the headline, python3 perf/bench_quant.py --skip-kernels --engine-modes bf16,int4_wo+head
#   OUT=/tmp/o BUDGET_S=560 bash perf/gpu_w4_ring.sh
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"  # step NAME LIMIT_S COMMAND..., device_setup
device_setup 560

T=tests/kernels/test_quant_matmul.py
RING="w4ringat=6144:4096,w4ringat=4096:4096,w4ringat=28672:4096,w4ringat=4096:14336"
step tests 110 python3 -m pytest -q -rf -x $T::test_w4a16_gemv_ring \
  $T::test_w4a16_gemv_ring_leaves_other_shapes_to_the_register_kernel $T::test_w4a16_batch_one_gemv
step kernels 90 python3 perf/exp_w4_ring.py --out "$OUT/exp_w4_ring.json"
step inplace 290 python3 perf/ablate_decode.py --quant int4_wo+head --variants "base,w4scales32,w4ring,w4ringtma,$RING,base" \
  --out "$OUT/ablate_ring.json"
step headline 120 python3 perf/bench_quant.py --skip-kernels --engine-modes bf16,int4_wo+head \
  --out "$OUT/bench_quant.json"
rm -f "$OUT"/*.rc
echo; tail -n 4 "$OUT/tests.log"; grep -v Warning "$OUT/kernels.log" | tail -n 20; tail -n 12 "$OUT/inplace.log"
tail -n 6 "$OUT/headline.log"
true
