#!/usr/bin/env bash
# The INT4 batch-1 experiments (issue #5; sessions 19-21), in one device call of about 6 minutes on one H100, most
# informative first (each part's log in $OUT/NAME.log; a part cut by the time budget is recorded):
#   1. GPU tests of the INT4 GEMV (fp16 and bf16 x, tiles with and without the first trip preloaded and with a
#      register cap, gated)
#   2. perf/ablate_decode.py, 8B INT4 + INT8 head batch-1 decode: base, then per projection shape the 8-warp tile
#      capped at 48 registers a thread (maxnreg: 5 programs an SM instead of 4, no spills in the sm_90 cubin; for
#      o and down also a change from their 16-warp tile), base again
#   3. the tiles that saved 5 us or more each, all together, against base
#   4. the headline, python3 perf/bench_quant.py --skip-kernels --engine-modes bf16,int4_wo+head (bf16 for the ratio)
#   5. with 3's tiles applied (when any won): INT4 + INT8 head again, for the defaults they would become
#   OUT=/tmp/o BUDGET_S=560 bash perf/gpu_int4_experiments.sh
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"  # step NAME LIMIT_S COMMAND..., device_setup
device_setup 560

QKV=6144:4096 O=4096:4096 GATE_UP=28672:4096 DOWN=4096:14336
TILES="w4at=$GATE_UP:8:2:8:8:48,w4at=$QKV:8:2:8:8:48,w4at=$O:8:2:8:8:48,w4at=$DOWN:8:2:8:8:48"

T=tests/kernels/test_quant_matmul.py
step tests 110 python3 -m pytest -q -rf $T::test_w4a16 $T::test_w4a16_batch_one_gemv $T::test_w4a16_gemv_tiles \
  $T::test_gated_gemvs_are_silu_and_mul_of_the_product
step tiles 160 python3 perf/ablate_decode.py --quant int4_wo+head --variants "base,$TILES,base" \
  --out "$OUT/ablate_tiles.json"
# The best tile of each shape that beat the better base by 5 us or more (base to base moved ~6 us in session 20).
COMBO=$(python3 - "$OUT/ablate_tiles.json" <<'PY' 2>/dev/null
import json, sys
runs = json.load(open(sys.argv[1]))["variants"]
base = min(r["ms_per_step"] for k, r in runs.items() if k.endswith(":base"))
best = {}
for key, r in runs.items():
    variant = key.partition(":")[2]
    if variant.startswith("w4at=") and base - r["ms_per_step"] >= 0.005:
        shape = tuple(variant[5:].split(":")[:2])
        if shape not in best or r["ms_per_step"] < best[shape][1]:
            best[shape] = (variant, r["ms_per_step"])
print("+".join(v for v, _ in best.values()))
PY
)
echo "tiles that won: ${COMBO:-none}"
[[ -n "$COMBO" ]] && step combo 60 python3 perf/ablate_decode.py --quant int4_wo+head --variants "$COMBO,base" \
  --out "$OUT/ablate_combo.json"
step headline 150 python3 perf/bench_quant.py --skip-kernels --engine-modes bf16,int4_wo+head \
  --out "$OUT/bench_quant.json"
[[ -n "$COMBO" ]] && step headline_combo 80 python3 - "$COMBO" "$OUT/bench_quant_combo.json" <<'PY'
import runpy, sys
from perf.ablate_decode import _patch
combo, out = sys.argv[1:]
for part in combo.split("+"):
    _patch(part)
sys.argv = ["bench_quant.py", "--skip-kernels", "--engine-modes", "int4_wo+head", "--out", out]
runpy.run_path("perf/bench_quant.py", run_name="__main__")
PY
rm -f "$OUT"/*.rc
echo; tail -n 3 "$OUT/tests.log"; tail -n 8 "$OUT/tiles.log"; echo "combo: ${COMBO:-none}"
[[ -n "$COMBO" ]] && tail -n 3 "$OUT/combo.log"; tail -n 6 "$OUT/headline.log"
[[ -n "$COMBO" ]] && tail -n 4 "$OUT/headline_combo.log"
true
