import torch

from backend.engine.ops import select_ops
from backend.kernels.triton_ops import TRITON_OPS, warmup


def test_select_ops_returns_triton_ops():
    assert select_ops("triton", "cuda") is TRITON_OPS and TRITON_OPS.name == "triton"


def test_warmup_runs_every_kernel(device):
    kv_cache = torch.zeros(2, 6, 16, 3, 16, dtype=torch.float16, device=device)
    warmup(hidden_size=40, intermediate_size=24, num_q_heads=9, num_kv_heads=3, head_dim=16,
           kv_cache=kv_cache, dtype=torch.float16)
    flat = kv_cache.view(2, -1, 3, 16)
    assert (flat[:, 3:43].abs().sum(dim=(2, 3)) > 0).all() and flat[:, 43:].abs().sum() == 0
