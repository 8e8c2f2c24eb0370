"""GPU check of the Triton kernels: correctness against the torch references (bf16, Llama-3-8B-like shapes)
and median times (triton.testing.do_bench, L2 flushed between runs) against those references.

Decode attention is memory-bound: its achieved bandwidth (KV bytes read / time) is reported as a share of a
measured device-to-device copy (read + write bytes / time). Prefill attention is reported in TFLOP/s, with
torch's SDPA (flash, causal, same shapes without paging) as a peer.
Run: python3 perf/check_kernels.py   (writes a JSON copy of the table to $OUT when set)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "kernels")]

from backend.kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from backend.kernels.paged_attention import paged_attention_ref, paged_attention_triton  # noqa: E402
from backend.kernels.rms_norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from backend.kernels.rotary import rotary_and_cache_ref, rotary_and_cache_triton  # noqa: E402
from test_paged_attention import make_batch  # noqa: E402
from test_rotary import cos_sin_cache  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16  # Llama-3-8B attention, block size 16
ROWS: list[dict] = []


def ms(fn, rep: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copies_for(nbytes: int) -> int:
    """Independent input sets to rotate through so that the working set (> 256 MB) outgrows the 50 MB L2."""
    return max(1, min(16, -(-(256 << 20) // max(1, nbytes))))


def graph_ms(fns, reps: int = 30) -> float:
    """Median time per call of fns run back to back in one CUDA graph: device time without launch gaps.

    The decode step will run inside a CUDA graph, so this is the number that matters there; a function
    that cannot be captured (a reference that syncs) falls back to do_bench over the first one."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
    except Exception as exc:  # noqa: BLE001 - report and time eagerly instead
        print(f"  (graph capture failed: {type(exc).__name__}; timing eagerly)", flush=True)
        torch.cuda.synchronize()
        return ms(fns[0])
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2] / len(fns)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def record(kernel, shape, err, t_triton, t_ref, metric="") -> None:
    ok = err < 2e-2
    ROWS.append(dict(kernel=kernel, shape=shape, rel_err=err, ok=ok, triton_us=t_triton * 1e3,
                     ref_us=t_ref * 1e3, speedup=t_ref / t_triton, metric=metric))
    print(f"{kernel:10s} {shape:32s} err {err:.1e} {'ok' if ok else 'FAIL'}  "
          f"{t_triton * 1e3:9.1f} us  ref {t_ref * 1e3:10.1f} us  {metric}", flush=True)


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, dtype=BF16, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (t * 1e-3)


def timed(make_inputs, kernel, reference, nbytes: int) -> tuple[float, float]:
    """(triton ms, torch ms) per call, each over the same rotated input sets."""
    sets = [make_inputs() for _ in range(copies_for(nbytes))]
    return graph_ms([lambda a=a: kernel(*a) for a in sets]), graph_ms([lambda a=a: reference(*a) for a in sets])


def check_rms_norm(tokens: int, hidden: int = 4096) -> None:
    def make():
        x, res = (torch.randn(tokens, hidden, dtype=BF16, device=DEV) for _ in range(2))
        return x, torch.rand(hidden, dtype=BF16, device=DEV) + 0.5, 1e-5, res
    x, w, eps, res = make()
    out, _ = rms_norm_triton(x, w, eps, res)
    ref, _ = rms_norm_ref((x + res).double(), w.double(), eps)
    nbytes = 5 * tokens * hidden * 2
    t, t_ref = timed(make, rms_norm_triton, rms_norm_ref, nbytes)
    record("rms_norm", f"T={tokens} H={hidden} +res", rel_err(out, ref), t, t_ref, f"{nbytes / t / 1e6:.0f} GB/s")


def check_silu(tokens: int, inter: int = 14336) -> None:
    def make():
        return (torch.randn(tokens, 2 * inter, dtype=BF16, device=DEV),)
    (gu,) = make()
    g, u = gu.double().chunk(2, dim=-1)
    nbytes = 3 * tokens * inter * 2
    t, t_ref = timed(make, silu_and_mul_triton, silu_and_mul_ref, nbytes)
    record("silu_mul", f"T={tokens} I={inter}", rel_err(silu_and_mul_triton(gu), F.silu(g) * u), t, t_ref,
           f"{nbytes / t / 1e6:.0f} GB/s")


def check_rotary(tokens: int) -> None:
    cs = cos_sin_cache(8192, D, DEV)
    blocks = tokens // BS + 8

    def make():
        qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, dtype=BF16, device=DEV)
        q, k, v = (t.view(tokens, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], -1))
        pos = torch.randint(0, 8192, (tokens,), device=DEV)
        slots = torch.randperm(blocks * BS, device=DEV)[:tokens]
        return q, k, v, pos, cs, torch.zeros(2, blocks, BS, HKV, D, dtype=BF16, device=DEV), slots
    q, k, v, pos, cs, cache, slots = make()
    cache_ref = cache.clone()
    q_rot, _ = rotary_and_cache_triton(q, k, v, pos, cs, cache, slots)
    q_ref, _ = rotary_and_cache_ref(q.double(), k.double(), v.double(), pos, cs.double(), cache_ref, slots)
    err = max(rel_err(q_rot, q_ref), rel_err(cache, cache_ref))
    nbytes = tokens * D * 2 * ((HQ + 2 * HKV) + (HQ + HKV) + 2 * HKV)
    t, t_ref = timed(make, rotary_and_cache_triton, rotary_and_cache_ref, nbytes)
    record("rotary", f"T={tokens} {HQ}/{HKV}x{D}", err, t, t_ref, f"{nbytes / t / 1e6:.0f} GB/s")


def check_attention(kernel: str, seqs, name: str, hq=HQ, hkv=HKV, head_dim=D, copy_bw: float = 0.0) -> None:
    scale = head_dim ** -0.5
    tokens = sum(q_len for _, q_len in seqs)

    def make():
        kv_cache, meta = make_batch(seqs, hkv, head_dim, BS, BF16, DEV)
        return torch.randn(tokens, hq, head_dim, dtype=BF16, device=DEV), kv_cache, meta, scale
    q, kv_cache, meta, _ = make()
    err = rel_err(paged_attention_triton(q, kv_cache, meta, scale),
                  paged_attention_ref(q.float(), kv_cache.float(), meta, scale))
    kv_bytes = sum(s for s, _ in seqs) * hkv * head_dim * 2 * 2
    t, t_ref = timed(make, paged_attention_triton, paged_attention_ref, kv_bytes)
    if kernel == "decode":
        bw = kv_bytes / (t * 1e-3)
        metric = f"{bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f}% of copy"
    else:
        pairs = sum(q_len * (s - q_len) + q_len * (q_len + 1) // 2 for s, q_len in seqs)
        metric = f"{4 * hq * head_dim * pairs / (t * 1e-3) / 1e12:.0f} TFLOP/s"
        if len(seqs) == 1 and seqs[0][0] == seqs[0][1]:  # peer: flash SDPA, same causal problem unpaged
            qs = q.transpose(0, 1).unsqueeze(0)
            ks = torch.randn(1, hkv, tokens, head_dim, dtype=BF16, device=DEV).repeat_interleave(hq // hkv, 1)
            sdpa = ms(lambda: F.scaled_dot_product_attention(qs, ks, ks, is_causal=True))
            metric += f", torch sdpa {sdpa * 1e3:.0f} us"
    record(kernel, f"{name} {hq}/{hkv}x{head_dim}", err, t, t_ref, metric)


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    for tokens in (1, 64, 4096):
        check_rms_norm(tokens)
    for tokens in (64, 4096):
        check_silu(tokens)
    for tokens in (64, 4096):
        check_rotary(tokens)
    for batch, seq_len in ((1, 4096), (1, 32768), (16, 2048), (64, 4096), (256, 1024), (256, 352)):
        check_attention("decode", [(seq_len, 1)] * batch, f"B={batch} L={seq_len}", copy_bw=copy_bw)
    check_attention("decode", [(2048, 1)] * 32, "B=32 L=2048", 9, 3, 64, copy_bw=copy_bw)  # SmolLM2-135M
    check_attention("prefill", [(4096, 4096)], "1 x 4096 new")
    check_attention("prefill", [(4096, 512)], "512 new after 3584")
    check_attention("prefill", [(1024, 1024)] * 4, "4 x 1024 new")
    check_attention("prefill", [(2048, 512)] + [(2048, 1)] * 64, "512 + 64 dec @2048")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_kernels.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
    print(f"\n{'kernel':10s} {'shape':32s} {'rel err':>8s} {'triton us':>10s} {'torch us':>10s} {'x':>6s}  metric")
    for r in ROWS:
        print(f"{r['kernel']:10s} {r['shape']:32s} {r['rel_err']:8.1e} {r['triton_us']:10.1f} {r['ref_us']:10.1f} "
              f"{r['speedup']:6.1f}  {r['metric']}{'' if r['ok'] else '  FAIL'}")
    sys.exit(0 if all(r["ok"] for r in ROWS) else 1)


if __name__ == "__main__":
    main()
