"""Compile the INT4 batch-1 GEMVs for sm_90 on a machine without a GPU and count what their code holds.

    python perf/sm90_sass.py                       # register, ring (cp.async) and ring (TMA) kernels, 8B shapes
    python perf/sm90_sass.py --kernels ring --dump /tmp/sass   # and write each SASS listing there

Per kernel and Llama-3-8B projection: registers per thread, spills (local memory), shared memory a program,
instructions in all, and the counts of the instructions that matter for these loops (16-byte global and shared
loads, cp.async and TMA copies, CTA barriers, mbarrier waits, bf16x2 FMAs, LOP3s). The device time is scarce
(perf/RESULTS.md says how scarce), so loop shapes are compared here first; pointers and integers are specialized
as a launch from PyTorch would (16-byte aligned, multiples of 16).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PROJECTIONS = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (14336, 4096, True),
               "down": (4096, 14336, False)}
COUNTED = ("LDG.E.128", "LDG.E.EF.128", "LDS.128", "LDGSTS.E.BYPASS.128", "UTMALDG", "BAR.SYNC",
           "SYNCS.PHASECHK", "DEPBAR", "HFMA2.BF16_V2", "LOP3.LUT")


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, aligned: tuple, gluon: bool):
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source
    else:
        source = ASTSource
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = source(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))


def _tool(name: str, cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(BIN, name), *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def stats(compiled) -> tuple[dict, str]:
    cubin = compiled.asm["cubin"]
    sass = _tool("nvdisasm", cubin, "-c")
    usage = re.search(r"REG:(\d+).*?LOCAL:(\d+)", _tool("cuobjdump", cubin, "--dump-resource-usage"))
    instructions = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    row = {"regs": int(usage.group(1)), "local": int(usage.group(2)), "smem": compiled.metadata.shared,
           "instructions": len(instructions)}
    row.update({op: sum(op in line for line in instructions) for op in COUNTED})
    return row, sass


def register_kernel(n_out: int, K: int, gated: bool):
    from backend.kernels import quant_matmul as qm

    tile = qm.w4_gemv_tile(2 * n_out if gated else n_out, K, 128, None)
    signature = {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*bf16", "N": "i32",
                 "K": "i32", "num_blocks": "i32", "sw_n": "i32", "ss_n": "i32"}
    constexprs = dict(GROUP_SIZE=128, BLOCK_K=128, TILES=tile["TILES"], BLOCK_N=tile["BLOCK_N"],
                      BLOCKS=tile["BLOCKS"], EVEN_K=True, INLINE_ASM=True, GATED=gated, EVICTION=qm.w4_weight_eviction,
                      PAIRS=True, CHAIN=qm.w4_chain_words, X_FP16=False, PRELOAD=True, PDL=True)
    return _compile(qm._w4a16_gemv_kernel.kernel, signature, constexprs, tile["num_warps"], tuple(range(10)), False)


def ring_kernel(n_out: int, K: int, gated: bool, tma: bool):
    from backend.kernels import w4_gemv_ring as ring

    tile = ring.ring_tile(n_out, K)
    constexprs = dict(K=K, ROWS=tile["ROWS"], BLOCKS=tile["BLOCKS"],
                      STAGES=ring._stages(K, tile["ROWS"], tile["BLOCKS"], 2),
                      GROUPS_P2=triton.next_power_of_2(K // 128), GATED=gated, PDL=True)
    signature = {"x_ptr": "*i32"}
    if tma:
        box = [tile["ROWS"] // 2 if gated else tile["ROWS"], tile["BLOCKS"], 4, 4]
        signature["w_desc"] = ("tensordesc<i32[%s],NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, "
                               "rank=4, transposed=False, fp4_padded=False, cga_layout=[])>" % ", ".join(map(str, box)))
        signature.update({"s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*bf16", "N": "i32", "ss_n": "i32"})
        return _compile(ring._w4a16_gemv_tma_kernel, signature, dict(constexprs, num_warps=tile["num_warps"]),
                        tile["num_warps"], (0, 2, 3, 4, 5, 6), True)
    signature.update({"w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*bf16", "N": "i32", "sw_n": "i32",
                      "ss_n": "i32"})
    constexprs.update(EVICTION=ring.EVICTION, num_warps=tile["num_warps"])
    return _compile(ring._w4a16_gemv_ring_kernel, signature, constexprs, tile["num_warps"], tuple(range(8)), True)


KERNELS = {"register": register_kernel, "ring": lambda n, k, g: ring_kernel(n, k, g, False),
           "ring-tma": lambda n, k, g: ring_kernel(n, k, g, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=list(KERNELS))
    parser.add_argument("--projections", nargs="+", choices=list(PROJECTIONS), default=list(PROJECTIONS))
    parser.add_argument("--dump", help="a folder for the SASS listings")
    args = parser.parse_args()
    print(f"{'kernel':9s} {'proj':8s} " + " ".join(f"{c:>8.8s}" for c in ("regs", "local", "smem", "instructions",
                                                                         *COUNTED)))
    for kernel in args.kernels:
        for name in args.projections:
            row, sass = stats(KERNELS[kernel](*PROJECTIONS[name]))
            print(f"{kernel:9s} {name:8s} " + " ".join(f"{v:8d}" for v in row.values()), flush=True)
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{kernel}-{name}.sass"), "w") as f:
                    f.write(sass)


if __name__ == "__main__":
    main()
