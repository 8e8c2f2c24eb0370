"""Where a batch-1 decode step's fixed costs go: the step re-timed with one kind of small kernel taken out.

    python3 perf/ablate_decode.py --out ablate.json                      # 8B shape, bf16, one GPU
    python3 perf/ablate_decode.py --variants base,silu,one_split --out a.json
    python3 perf/ablate_decode.py --quant int8_wo+head --variants base,w8=8:256:4 --out q.json
    python3 perf/ablate_decode.py --workload mixed --variants base,unfused_rotary --out m.json

A profiler's per-kernel times overlap under programmatic dependent launch (a kernel is resident while it waits
for the one before), so they do not say what a kernel costs the step. Here each variant builds the engine with
one change and times batch-1 decode as perf/bench_multi_gpu.py does (--workload mixed: bench_engine.py's mixed
workload, then decode at batch 256); the difference from `base` is what the change costs or saves inside the
CUDA graph, launch gaps included. Variants:
  silu, norm, attention, rotary: that operation replaced by a no-op (the tokens are garbage: timings only;
    attention and rotary take unfused_rotary's path; silu also takes unfused_silu's);
  sampling: greedy sampling's clone, bans and argmax replaced by zeros;
  one_split: decode attention in one split per KV head (a real alternative: the same values);
  unfused_rotary: rotary.py's kernel before decode attention, as before the fusion (the same values);
  torch_argmax: greedy sampling's argmax by torch instead of backend/kernels/argmax.py (the same ids);
  unfused_silu: activation.py's SiLU-and-mul kernel after gate_up, as before its GEMV's epilogue took it
    (TRITIUM_GEMV_SILU=0; the same function, gate and up rounded to the model dtype first);
  no_preload: the GEMVs load their first weight tile after the PDL wait (TRITIUM_GEMV_PRELOAD=0);
  w8=BLOCK_N:WORDS:num_warps: every INT8 GEMV with that tile (with --quant int8_wo or int8_wo+head);
  w8at=N:K:BLOCK_N:WORDS:num_warps: that tile for the INT8 GEMV of weight shape [N, K] only;
  w4at=N:K:TILES:BLOCK_N:BLOCKS:num_warps[:maxnreg]: the same for the INT4 GEMV (TILES even for gate_up, which is
    gated; maxnreg: registers per thread, for occupancy);
  gated16=BLOCK_N:BLOCK_K:num_warps, gated8=BLOCK_N:WORDS:num_warps: that tile for the bf16 or INT8 gate_up GEMV
    with SiLU-and-mul in its epilogue (BLOCK_N weight rows per program: half gate, half up).
  dtile=KEYS:WARPS:STAGES[:PROGRAMS_PER_SM]: that paged_attention.DecodeTile for decode attention (the same values).
  noevict: the GEMVs' weight loads with the default L2 policy instead of evict-first (the same values);
  w8maxnreg=R: every INT8 GEMV compiled with at most R registers per thread (the same values);
  w8plain: the INT8 GEMV's loop without its int64 activation words and exponent-trick bytes (the same values);
  w4fp32: the INT4 GEMV's float32 loop instead of its bf16x2 pairs (the products then exact before the sums).
  w4chain=WORDS: the INT4 GEMV's bf16x2 sums over the pairs of WORDS words (1 or 2) before float32
    (quant_matmul.w4_chain_words; w4chain=1 is the loop before session 18).
  w4ring: the INT4 GEMV through shared memory where it applies (backend/kernels/w4_gemv_ring.py; the same values
    up to the order of float32 sums);
  w4ringtma: w4ring with the weights copied by the TMA engine (w4_gemv_ring.use_tma);
  w4ringat=N:K: the same for the INT4 GEMV of weight shape [N, K] only;
  w4scales32: INT4 group scales held in float32 (as before session 22; the same values).
Variants joined by "+" (w8plain+w8at=...) apply together; w8=, w8at= and w8maxnreg= each replace the INT8 tile
choice, so the later one in such a list wraps the earlier one's choice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from perf.bench_engine import write_config  # noqa: E402
from perf.bench_multi_gpu import decode_b1, make_engine  # noqa: E402


def _skip_silu(gate_up):
    return gate_up[..., :gate_up.shape[-1] // 2]


def _skip_rotary(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping):
    return q, k


def _skip_attention(q, kv_cache, meta, scale):
    return q


def _skip_norm(x, weight, eps, residual=None):
    return x, (x if residual is None else residual)


def _skip_sampling(self, logits, requests, output_positions=None):
    return torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device), None


def _torch_argmax(self, x):
    return x.argmax(dim=-1)


def _with_gated_tile(fn, tile):
    def call(*args, gated=False, **kwargs):
        if gated:
            kwargs["tile"] = tile
        return fn(*args, gated=gated, **kwargs)
    return call


def _patch(variant: str):
    """Install the variant's replacement; returns a function that undoes it."""
    from backend.kernels import _pdl, gemv, paged_attention, quant_matmul, triton_ops

    from backend.engine.sampler import Sampler

    original_ops, original_splits, original_sample = (triton_ops.TRITON_OPS, paged_attention.decode_num_splits,
                                                      Sampler.sample)
    original_decode_tile = paged_attention.default_decode_tile
    original_argmax, original_preload = Sampler.greedy_argmax, _pdl.preload_first_tile
    original_w8_tile, original_fuse_silu = quant_matmul.w8_gemv_tile, gemv.fuse_silu_and_mul
    original_w4_tile = quant_matmul.w4_gemv_tile
    original_evictions = quant_matmul.w8_weight_eviction, quant_matmul.w4_weight_eviction, gemv.weight_eviction
    original_w8_loop = quant_matmul.w8_x_words, quant_matmul.w8_magic
    original_w4_loop = quant_matmul.w4_bf16_pairs, quant_matmul.w4_chain_words, quant_matmul.w4_gemv_ring
    from backend.engine.quantization import layers
    original_scale_dtype = layers.INT4_SCALE_DTYPE
    original_gemvs = gemv.gemv_triton, quant_matmul.w8a16_gemv_triton
    unfused = {"rotary_decode_attention": None}
    replacements = {"silu": {"silu_and_mul": _skip_silu}, "rotary": {"rotary_and_cache": _skip_rotary, **unfused},
                    "attention": {"paged_attention": _skip_attention, **unfused}, "norm": {"rms_norm": _skip_norm},
                    "unfused_rotary": unfused}
    # silu's no-op must run where the gate_up GEMV's epilogue would otherwise apply the function
    gemv.fuse_silu_and_mul = original_fuse_silu and variant not in ("silu", "unfused_silu")
    if variant in replacements:
        triton_ops.TRITON_OPS = dataclasses.replace(original_ops, **replacements[variant])
    elif variant == "one_split":
        paged_attention.decode_num_splits = lambda num_seqs, num_kv_heads, device, programs_per_sm=4: 1
    elif variant == "sampling":
        Sampler.sample = _skip_sampling
    elif variant == "no_preload":  # the GEMVs load their first weight tile after the PDL wait, as before
        _pdl.preload_first_tile = False
    elif variant.startswith("dtile="):  # the decode attention tile: dtile=KEYS:WARPS:STAGES[:PROGRAMS_PER_SM]
        tile = paged_attention.DecodeTile(*(int(v) for v in variant[6:].split(":")))
        paged_attention.default_decode_tile = lambda block_d, num_seqs=0: tile
    elif variant.startswith("w8="):  # every INT8 GEMV with this tile: w8=BLOCK_N:WORDS:num_warps
        block_n, words, warps = (int(v) for v in variant[3:].split(":"))
        quant_matmul.w8_gemv_tile = lambda N, K, device: dict(BLOCK_N=block_n, WORDS=words, num_warps=warps)
    elif variant.startswith("w8at="):  # one INT8 GEMV shape with this tile: w8at=N:K:BLOCK_N:WORDS:num_warps
        n, k, block_n, words, warps = (int(v) for v in variant[5:].split(":"))
        quant_matmul.w8_gemv_tile = lambda N, K, device: (
            dict(BLOCK_N=block_n, WORDS=words, num_warps=warps) if (N, K) == (n, k) else original_w8_tile(N, K, device))
    elif variant.startswith("w4at="):  # one INT4 GEMV shape's tile: w4at=N:K:TILES:BLOCK_N:BLOCKS:num_warps[:maxnreg]
        n, k, tiles, block_n, blocks, warps, *cap = (int(v) for v in variant[5:].split(":"))
        tile = dict(TILES=tiles, BLOCK_N=block_n, BLOCKS=blocks, num_warps=warps)
        tile.update({"maxnreg": cap[0]} if cap else {})
        quant_matmul.w4_gemv_tile = lambda N, K, group, device: (
            tile if (N, K) == (n, k) else original_w4_tile(N, K, group, device))
    elif variant.startswith(("gated16=", "gated8=")):  # a tile for the gated gate_up GEMV only
        name, _, values = variant.partition("=")
        a, b, warps = (int(v) for v in values.split(":"))
        module, attr, tile = ((gemv, "gemv_triton", (a, b, warps)) if name == "gated16" else
                              (quant_matmul, "w8a16_gemv_triton", dict(BLOCK_N=a, WORDS=b, num_warps=warps)))
        setattr(module, attr, _with_gated_tile(getattr(module, attr), tile))
    elif variant == "noevict":  # every GEMV's weight loads with the default L2 policy, as before session 16
        quant_matmul.w8_weight_eviction = quant_matmul.w4_weight_eviction = gemv.weight_eviction = ""
    elif variant == "w8plain":  # the INT8 GEMV's loop before session 17: x loaded per activation, bytes by cvt
        quant_matmul.w8_x_words = quant_matmul.w8_magic = False
    elif variant == "w4fp32":  # the INT4 GEMV's float32 loop, as before session 17
        quant_matmul.w4_bf16_pairs = False
    elif variant.startswith("w4chain="):  # the INT4 GEMV's bf16x2 sums over the pairs of 1 or 2 words
        quant_matmul.w4_chain_words = int(variant.partition("=")[2])
    elif variant == "w4ring":  # the INT4 GEMV through shared memory (backend/kernels/w4_gemv_ring.py)
        quant_matmul.w4_gemv_ring = True
    elif variant == "w4ringtma":  # the same with its copies by the TMA engine
        from backend.kernels import w4_gemv_ring

        quant_matmul.w4_gemv_ring = w4_gemv_ring.use_tma = True
    elif variant.startswith("w4ringat="):  # the same for one weight shape only: w4ringat=N:K
        from backend.kernels import w4_gemv_ring

        quant_matmul.w4_gemv_ring = True
        w4_gemv_ring.only_shapes = {tuple(int(v) for v in variant[9:].split(":"))}
    elif variant == "w4scales32":  # INT4 group scales held in float32, as before session 22
        layers.INT4_SCALE_DTYPE = torch.float32
    elif variant.startswith("w8maxnreg="):
        cap = int(variant.partition("=")[2])
        quant_matmul.w8_gemv_tile = lambda N, K, device: {**original_w8_tile(N, K, device), "maxnreg": cap}
    elif variant == "torch_argmax":  # greedy sampling's argmax by torch, as before backend/kernels/argmax.py
        Sampler.greedy_argmax = _torch_argmax
    elif variant not in ("base", "unfused_silu"):
        raise SystemExit(f"--variants: unknown variant {variant!r}")

    def undo():
        triton_ops.TRITON_OPS, paged_attention.decode_num_splits = original_ops, original_splits
        paged_attention.default_decode_tile = original_decode_tile
        Sampler.sample = original_sample
        Sampler.greedy_argmax, _pdl.preload_first_tile = original_argmax, original_preload
        quant_matmul.w8_gemv_tile, gemv.fuse_silu_and_mul = original_w8_tile, original_fuse_silu
        quant_matmul.w4_gemv_tile = original_w4_tile
        quant_matmul.w8_weight_eviction, quant_matmul.w4_weight_eviction, gemv.weight_eviction = original_evictions
        quant_matmul.w8_x_words, quant_matmul.w8_magic = original_w8_loop
        quant_matmul.w4_bf16_pairs, quant_matmul.w4_chain_words, quant_matmul.w4_gemv_ring = original_w4_loop
        layers.INT4_SCALE_DTYPE = original_scale_dtype
        if variant.startswith(("w4ringat=", "w4ringtma")):
            from backend.kernels import w4_gemv_ring

            w4_gemv_ring.only_shapes, w4_gemv_ring.use_tma = None, False
        gemv.gemv_triton, quant_matmul.w8a16_gemv_triton = original_gemvs
    return undo


def run_variant(variant: str, folder: str, workload: str) -> dict:
    """b1: batch-1 decode, best of 3; mixed: bench_engine's mixed workload (256 requests) and decode at batch
    256, as bench_engine.py sets the engine up for them ("ms_per_step" is then the batch-256 step)."""
    from perf.bench_engine import decode_rate, mixed_workload

    undos = [_patch(part) for part in variant.split("+")]
    try:
        start = time.perf_counter()
        if workload == "b1":
            engine = make_engine(folder, "cuda", max_num_seqs=8, max_num_batched_tokens=4096)
        else:
            engine = make_engine(folder, "cuda", max_num_seqs=256, max_num_batched_tokens=8192)
        record = {"load_s": time.perf_counter() - start}
        try:
            vocab = engine.model_config.vocab_size
            if workload == "b1":
                rates = [decode_b1(engine, vocab, seed) for seed in (1, 2, 3)]
                record.update(tok_s_runs=rates, tok_s=max(rates), ms_per_step=1e3 / max(rates))
            else:
                record["mixed_tok_s"] = mixed_workload(engine, vocab)
                record["tok_s"] = decode_rate(engine, 256, vocab)
                record["ms_per_step"] = 256e3 / record["tok_s"]
        finally:
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
    finally:
        for undo in reversed(undos):
            undo()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--workload", choices=("b1", "mixed"), default="b1",
                        help="b1: batch-1 decode; mixed: the mixed workload and batch-256 decode")
    parser.add_argument("--quant", default="", help="8B shape quantized in place, e.g. int8_wo+head (bench_quant.py)")
    parser.add_argument("--variants", default="base,silu,rotary,norm,one_split,attention,sampling,base")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = {"device": torch.cuda.get_device_name(), "shape": args.shape, "quant": args.quant,
           "workload": args.workload, "variants": {}}
    with tempfile.TemporaryDirectory() as folder:
        if args.quant:
            from perf.bench_quant import write_config as write_quant_config

            write_quant_config(folder, args.quant)
        else:
            write_config(args.shape, folder)
        for i, variant in enumerate(args.variants.split(",")):
            out["variants"][f"{i}:{variant}"] = record = run_variant(variant, folder, args.workload)
            mixed = f"  mixed {record['mixed_tok_s']:8.1f} tok/s" if "mixed_tok_s" in record else ""
            step = f"{record['tok_s']:7.1f} tok/s  {record['ms_per_step']:.3f} ms/step"
            print(f"{variant:>10}: {step}{mixed}", flush=True)
    bases = [r["ms_per_step"] for k, r in out["variants"].items() if k.endswith(":base")]
    base = min(bases) if bases else None
    if base is not None:
        for record in out["variants"].values():
            record["us_saved_per_step"] = round(1e3 * (base - record["ms_per_step"]), 1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v.get("us_saved_per_step") for k, v in out["variants"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
