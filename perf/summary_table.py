"""The closing table of the multi-GPU scripts (perf/gpu_multi.sh, perf/gpu_tp_allreduce.sh): the summary
written as JSON, then its title and one aligned row (name, value, note) per check."""
from __future__ import annotations

import json


def write_and_print(path: str, summary: dict, title: str, rows: list[tuple[str, str, str]],
                    value_width: int = 12) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{title}")
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"  {name:{width}s}  {value:>{value_width}s}  {note}")
