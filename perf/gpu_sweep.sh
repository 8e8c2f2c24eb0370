#!/usr/bin/env bash
# Concurrency sweep through tritonserver on the GPU machine: Llama-3-8B shape, bf16, random weights, the
# `ensemble` driven by perf_analyzer with TensorRT-LLM-style inputs (perf/sweep.py, perf/perf_analyzer.py).
#
#   bash perf/gpu_sweep.sh --prepare   # here, with network: puts a numpy 1.26.4 wheel for Python 3.12 in .device/
#   bash perf/gpu_sweep.sh             # on the GPU machine (carry .device): $OUT/<label>-sweep.json, server log
#   .venv/bin/python -m perf.sweep --plot-only perf/results/<label>-sweep.json   # back here: the PNG plots
#
# Why numpy 1.26: tritonserver 2.51's Python stub corrupts BYTES inputs under numpy 2 (README), and the GPU
# machine has numpy 2.5: perf/device_stub_env.sh gives the server's stubs a numpy 1.26 (PYTHONPATH does not reach
# them).
set -uo pipefail
NUMPY_WHEEL_DIR=.device/numpy1
if [ "${1:-}" = "--prepare" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d "$NUMPY_WHEEL_DIR" numpy==1.26.4
  ls -la "$NUMPY_WHEEL_DIR"; du -sh .device
  exit 0
fi
source perf/gpu_server_env.sh   # the server, the stub's numpy 1.26 (it ignores PYTHONPATH), $OUT, ENGINE_FLAGS
SHAPE=${SHAPE:-llama3-8b}
CONCURRENCY=${CONCURRENCY:-1,4,16,64,256}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
LABEL=${LABEL:-$(echo "$GPU" | grep -o -i -E 'h100|h200' | tr 'A-Z' 'a-z' | head -1)-$SHAPE}

python3 perf/make_bench_checkpoint.py --shape "$SHAPE" --out /tmp/bench-ckpt >/dev/null
python3 -m tools.generate_repo --output-dir /tmp/bench-repo --model /tmp/bench-ckpt --load-format dummy $ENGINE_FLAGS --quiet
# 128-word prompts are 128 tokens with the checkpoint's word-level tokenizer; 128 new tokens each (min_length).
python3 -m perf.sweep --start-server --model-repository /tmp/bench-repo \
  --concurrency "$CONCURRENCY" --max-tokens 128 --prompt-words 128 --requests-per-window 16 \
  --label "$LABEL" --device "$GPU, $SHAPE shape, bf16, random weights" --out-dir "$OUT"
code=$?
cp "$OUT/$LABEL-server.log" "$OUT/server.log" 2>/dev/null
for f in "$OUT"/work/profile_c*.json; do  # sizes and ends of perf_analyzer's exports (one once broke off)
  [ -f "$f" ] && { echo "== $f $(stat -c %s "$f") bytes"; tail -c 400 "$f"; echo; } >>"$OUT/export-ends.txt"
done
rm -rf "$OUT/work"
exit $code
