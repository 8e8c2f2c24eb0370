# Sourced by the scripts that serve the Llama-3-8B shape through tritonserver on the GPU machine
# (perf/gpu_serving_mixed.sh, perf/gpu_replicas.sh, perf/gpu_sweep.sh), after carrying .device: the unpacked
# server, numpy 1.26 for the Python backend stub (perf/device_stub_env.sh says why), $OUT, and the engine flags
# every one of them generates its repository with (bf16, batches of up to 256, 85% of the GPU).
source .device/unpack.sh
source perf/device_stub_env.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/tritium-out}
mkdir -p "$OUT"
ENGINE_FLAGS="--dtype bfloat16 --max-batch-size 256 --max-seq-len 4096 --max-num-batched-tokens 8192 --gpu-memory-utilization 0.85 --device cuda"
