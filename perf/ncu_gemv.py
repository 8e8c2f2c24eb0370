"""The batch-1 GEMVs of the Llama-3-8B shape under Nsight Compute: bf16 (backend/kernels/gemv.py) against INT8
(W8A16) and INT4 (W4A16, groups of 128; both backend/kernels/quant_matmul.py), one launch each from HBM, to see
what bounds the quantized kernels.

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section LaunchStats --section SchedulerStats --csv --page details \\
        python3 perf/ncu_gemv.py > $OUT/ncu.csv                                        # on the GPU machine
    python3 perf/ncu_gemv.py --summarize $OUT/ncu.csv                                 # here or there: the table

Each profiled launch is preceded by a write of 256 MB, so its weight comes from HBM as in the engine (every
projection of 4 and 8 bits fits the 50 MB L2 otherwise). The default tiles of each kernel are profiled, as the
engine launches them (gate_up gated, SiLU-and-mul in the epilogue).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, N, K, gated) of the Llama-3-8B batch-1 products
PRODUCTS = [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 28672, 4096, True),
            ("down", 4096, 14336, False), ("lm_head", 128256, 4096, False)]

KERNELS = ("bf16", "int8", "int4")  # launched in this order for each product
# metric (as ncu names it in the details page) -> short column name
COLUMNS = {
    "Duration": "us", "Memory Throughput": "TB/s", "DRAM Throughput": "dram %", "Compute (SM) Throughput": "sm %",
    "Achieved Occupancy": "occ %", "Theoretical Occupancy": "theo occ %", "Registers Per Thread": "regs",
    "Grid Size": "grid", "L1/TEX Hit Rate": "L1 hit %",
    "Mem Busy": "mem busy %", "Max Bandwidth": "max bw %", "Warp Cycles Per Issued Instruction": "cycles/issue",
    "No Eligible": "no eligible %", "Active Warps Per Scheduler": "warps/sched",
}


def run() -> None:
    import torch

    from backend.engine.quantization import rtn
    from backend.kernels import quant_matmul as qm
    from backend.kernels.gemv import gemv_triton

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    launches = []
    for name, N, K, gated in PRODUCTS:
        w = torch.randn(N, K, device="cuda") * 0.02
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        wb = w.bfloat16()
        q8, s8 = rtn.quantize_int8(w)
        q4, s4, z4 = rtn.quantize_int4(w, 128)
        w4 = qm.to_planar_int4(qm.pack_int4(q4), 128)  # the engine's layout
        del w, q4
        launches.append(lambda x=x, wb=wb, gated=gated: gemv_triton(x, wb, gated=gated))
        launches.append(lambda x=x, q8=q8, s8=s8, gated=gated: qm.w8a16_gemv_triton(x, q8, s8, gated=gated))
        launches.append(lambda x=x, w4=w4, s4=s4, z4=z4, gated=gated:
                        qm.w4a16_gemv_triton(x, w4, s4, z4, 128, gated=gated))
    for launch in launches:  # compile outside the profiled range
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for launch in launches:
        flush.fill_(1)
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def summarize(path: str) -> None:
    """One row per profiled GEMV launch (in PRODUCTS order, bf16, INT8, INT4) from ncu's --csv --page details."""
    rows: dict[str, dict] = defaultdict(dict)
    order = []
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for rec in csv.DictReader(lines):
        kernel = rec.get("Kernel Name", "")
        if "gemv" not in kernel:
            continue
        key = rec["ID"]
        if key not in rows:
            order.append(key)
            rows[key]["kernel"] = "bf16" if kernel.startswith("_gemv") else "int4" if "w4a16" in kernel else "int8"
        metric = rec["Metric Name"]
        if metric == "Memory Throughput" and rec.get("Metric Unit", "").endswith("%"):
            continue  # the Speed Of Light percentage; the Memory Workload Analysis row gives the rate
        if metric in COLUMNS:
            value = rec["Metric Value"].replace(",", "")
            unit = rec.get("Metric Unit", "")
            if metric == "Duration" and unit in ("nsecond", "ns"):
                value = f"{float(value) / 1e3:.2f}"
            elif metric == "Duration" and unit in ("msecond", "ms"):
                value = f"{float(value) * 1e3:.2f}"
            rows[key][COLUMNS[metric]] = value
    names = [p[0] for p in PRODUCTS for _ in KERNELS]
    header = ["product", "kernel"] + list(COLUMNS.values())
    print(" | ".join(header))
    for name, key in zip(names, order):
        print(" | ".join([name] + [str(rows[key].get(c, "")) for c in header[1:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", metavar="CSV", help="print the table from ncu's CSV instead of running")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run()


if __name__ == "__main__":
    main()
