"""Which GPUs a Triton model instance's engine uses (pure: tested on CPU; backend/model.py calls it).

tools/generate_repo.py writes, for `--instances N --tp K --gpus g0,...`, an instance_group of kind KIND_GPU
listing each instance's first GPU (count 1 per GPU, so Triton starts one instance on each), and the serving
parameter `instance_gpu_groups` = "g0,g1;g2,g3" (each instance's K GPUs). Triton passes an instance its GPU
in args["model_instance_device_id"]; the instance takes the group that GPU leads.
"""
from __future__ import annotations

GROUPS_KEY = "instance_gpu_groups"


def format_groups(gpus: list[int], tp: int) -> str:
    """[0, 1, 2, 3], tp 2 -> "0,1;2,3": instance i gets gpus[i*tp:(i+1)*tp]."""
    groups = [gpus[i:i + tp] for i in range(0, len(gpus), tp)]
    return ";".join(",".join(str(g) for g in group) for group in groups)


def parse_groups(text: str) -> list[list[int]]:
    return [[int(g) for g in group.split(",")] for group in text.split(";") if group.strip()]


def instance_device_ids(kind: str | None, device_id: int, groups_text: str, tp: int) -> str | None:
    """The EngineConfig.device_ids of a KIND_GPU instance on GPU `device_id`; None for other kinds (the
    engine then picks its device as configured)."""
    if kind != "GPU":
        return None
    for group in parse_groups(groups_text or ""):
        if group[0] == device_id:
            return ",".join(str(g) for g in group)
    return ",".join(str(device_id + rank) for rank in range(tp))  # no groups written: consecutive GPUs
