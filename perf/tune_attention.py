"""Launch shapes of the paged attention kernels (backend/kernels/paged_attention.py) on the GPU.

    python3 perf/tune_attention.py --out $OUT/tune_attention.json

Llama-3-8B attention (32/8 heads x 128, block size 16), bf16 cache. Decode: for each batch x context length,
every DecodeTile (keys per iteration x warps x pipeline stages x split programs per SM), as KV GB/s and a share
of a device copy. Prefill: for each batch of new tokens (among them a mixed-workload chunk of 28 prompts of
64-512 tokens), every PrefillTile of the large-query launch, as TFLOP/s of causal work. Timing inside a CUDA
graph over input sets rotated past L2 (perf/check_kernels.py's); each tile's output is checked against the
torch reference. The default tile's figure is printed beside the best.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "kernels")]

from backend.kernels import paged_attention as pa  # noqa: E402
from perf.check_kernels import copies_for, copy_bandwidth, graph_ms, rel_err  # noqa: E402
from test_paged_attention import make_batch  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
SCALE = D ** -0.5
DECODE_SHAPES = [[(352, 1)] * 256, [(1024, 1)] * 256, [(352, 1)] * 128, [(4096, 1)] * 64, [(2048, 1)] * 16,
                 [(4096, 1)]]
CHUNK = [(n, n) for n in torch.randint(64, 513, (28,), generator=torch.Generator().manual_seed(0)).tolist()]
PREFILL_SHAPES = [CHUNK, [(4096, 4096)], [(4096, 512)], [(1024, 1024)] * 4]
DECODE_TILES = [pa.DecodeTile(*t) for t in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (4, 8))]
PREFILL_TILES = [pa.PrefillTile(*t) for t in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]


def run(tile, q, kv_cache, meta, out) -> torch.Tensor:
    if isinstance(tile, pa.DecodeTile):
        pa.launch_decode(q, kv_cache, meta, SCALE * pa._LOG2E, out, D, tile)
    else:
        pa._prefill(q, kv_cache, meta, SCALE * pa._LOG2E, out, HQ // HKV, D, tile)
    return out


def inputs(seqs) -> tuple:
    kv_cache, meta = make_batch(seqs, HKV, D, BS, torch.bfloat16, torch.device("cuda"))
    q = torch.randn(meta.query_start_loc_cpu[-1], HQ, D, dtype=torch.bfloat16, device="cuda")
    return q, kv_cache, meta, torch.empty_like(q)


def label(seqs) -> str:
    new = sum(q for _, q in seqs)
    return f"{len(seqs)} seqs, {new} new tokens, {sum(s for s, _ in seqs)} in all"


def tune(kind: str, shapes, tiles, default, metric) -> dict:
    """Every tile on every shape; prints the default against the best per shape."""
    q, kv_cache, meta, out = inputs(shapes[0][:8])
    want = pa.paged_attention_ref(q.float(), kv_cache.float(), meta, SCALE)
    errors = {str(t): rel_err(run(t, q, kv_cache, meta, out), want) for t in tiles}
    results = {}
    for seqs in shapes:
        kv_bytes = sum(s for s, _ in seqs) * HKV * D * 2 * 2
        sets = [inputs(seqs) for _ in range(copies_for(kv_bytes))]
        rows = []
        for tile in tiles:
            us = 1e3 * graph_ms([lambda s=s, t=tile: run(t, *s) for s in sets])
            rows.append(dict(tile=str(tile), us=us, metric=metric(seqs, us), rel_err=errors[str(tile)]))
        best = min(rows, key=lambda r: r["us"])
        base = next(r for r in rows if r["tile"] == str(default))
        results[label(seqs)] = {"tiles": rows, "best": best, "default": base}
        print(f"{kind:7s} {label(seqs):44s} default {base['us']:7.1f} us ({base['metric']})  best {best['us']:7.1f} us "
              f"({best['metric']}) {best['tile']}", flush=True)
        del sets
    return {"shapes": results, "largest_rel_err": max(errors.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tune_attention.json")
    args = parser.parse_args()
    copy = copy_bandwidth()

    def bandwidth(seqs, us):
        return f"{100 * sum(s for s, _ in seqs) * HKV * D * 4 / (us * 1e-6) / copy:.0f}% of copy"

    def tflops(seqs, us):
        pairs = sum(q * (s - q) + q * (q + 1) // 2 for s, q in seqs)
        return f"{4 * HQ * D * pairs / (us * 1e-6) / 1e12:.0f} TFLOP/s"

    results = {"device": torch.cuda.get_device_name(), "copy_GBps": copy / 1e9,
               "decode": tune("decode", DECODE_SHAPES, DECODE_TILES, pa.default_decode_tile(D), bandwidth),
               "prefill": tune("prefill", PREFILL_SHAPES, PREFILL_TILES, pa.PrefillTile(), tflops)}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    worst = max(results[k]["largest_rel_err"] for k in ("decode", "prefill"))
    print(f"largest relative error of any tile against the reference: {worst:.1e}")
    sys.exit(0 if worst < 2e-2 else 1)


if __name__ == "__main__":
    main()
