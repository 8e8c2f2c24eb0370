"""AutoAWQ / AutoGPTQ checkpoints: a tiny model quantized by us, written in their packed layouts and configs,
must load to exactly the model our own layout gives."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from backend.engine.checkpoint import iter_safetensors, load_model
from backend.engine.ops import REFERENCE_OPS
from backend.engine.quantization import QuantConfig, quantize_checkpoint
from backend.engine.quantization.foreign import AWQ_ORDER, pack_int32, unpack_int32
from backend.engine.quantization.forward import window_logits
from backend.kernels.quant_matmul import unpack_int4
from tests.tiny_models import make_tiny_checkpoint

GROUP = 32


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    tiny = make_tiny_checkpoint("llama", root / "float")
    return quantize_checkpoint(tiny, root / "ours", "int4_wo", group_size=GROUP, progress=False)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] -> [R, C/8] int32 with AutoAWQ's column interleave."""
    order = torch.tensor(AWQ_ORDER)
    return pack_int32(values.view(values.shape[0], -1, 8)[:, :, order].reshape(values.shape), dim=1)


def _foreign_tensors(ours_dir, kind: str) -> dict[str, torch.Tensor]:
    tensors = dict(iter_safetensors(ours_dir))
    out = {}
    for name, t in tensors.items():
        prefix, leaf = name.rsplit(".", 1)
        if leaf != "qweight":
            if leaf not in ("scales", "qzeros"):
                out[name] = t.half() if t.is_floating_point() else t
            continue
        codes = unpack_int4(t).T.contiguous()  # [K, N]
        zeros = tensors[f"{prefix}.qzeros"].T.contiguous().to(torch.int32)  # [G, N]
        out[f"{prefix}.scales"] = tensors[f"{prefix}.scales"].T.contiguous().half()
        if kind == "awq":
            out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"] = _awq_pack(codes), _awq_pack(zeros)
        else:
            out[f"{prefix}.qweight"] = pack_int32(codes, dim=0)
            out[f"{prefix}.qzeros"] = pack_int32((zeros - 1) & 0xF, dim=1)  # the zero - 1 convention
            out[f"{prefix}.g_idx"] = torch.arange(codes.shape[0], dtype=torch.int32) // GROUP
            out[f"{prefix}.bias"] = torch.zeros(codes.shape[1], dtype=torch.float16)
    return out


def write_foreign(ours_dir, dest, kind: str):
    dest.mkdir()
    save_file(_foreign_tensors(ours_dir, kind), str(dest / "model.safetensors"))
    config = json.loads((ours_dir / "config.json").read_text())
    if kind == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                         "zero_point": True, "version": "gemm"}
    else:  # the older AutoGPTQ layout: quantize_config.json beside a config without quantization_config
        del config["quantization_config"]
        (dest / "quantize_config.json").write_text(json.dumps(
            {"bits": 4, "group_size": GROUP, "desc_act": False, "sym": False, "true_sequential": True}))
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_int32_packing_roundtrip():
    v = torch.randint(0, 16, (16, 24), dtype=torch.int32)
    assert torch.equal(unpack_int32(pack_int32(v, dim=0), dim=0), v)
    assert torch.equal(unpack_int32(pack_int32(v, dim=1), dim=1), v)


@pytest.mark.parametrize("kind", ["awq", "gptq"])
def test_foreign_checkpoint_loads_like_ours(ours, tmp_path, kind):
    path = write_foreign(ours, tmp_path / kind, kind)
    assert QuantConfig.from_dir(path).source == kind
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    want = window_logits(load_model(ours, REFERENCE_OPS, torch.float32, "cpu")[0], ids)
    got = window_logits(load_model(path, REFERENCE_OPS, torch.float32, "cpu")[0], ids)
    # Same codes, scales and zeros; only the unquantized tensors went through float16 here.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_act_order_gptq_is_refused_with_a_reason(ours, tmp_path):
    path = write_foreign(ours, tmp_path / "gptq", "gptq")
    tensors = dict(iter_safetensors(path))
    key = next(k for k in tensors if k.endswith("g_idx"))
    tensors[key] = torch.flip(tensors[key], dims=[0]).contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="act-order"):
        load_model(path, REFERENCE_OPS, torch.float32, "cpu")
    shutil.rmtree(path)
