"""The reference slot's LoRA glue without a server: BF16 ``lora_weights`` read through DLPack (the Python backend's
``as_numpy()`` does not convert BF16 and the stub has no torch), and an engine loop without an adapter cache (a
deployment without LoRA) refusing LoRA requests."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import yitrt.triton
from yitrt.errors import LoraError


@pytest.fixture
def slot(monkeypatch):
    """reference_engine.py loaded with stand-ins for the modules only Triton's stub has."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setitem(sys.modules, "yitrt_text", types.ModuleType("yitrt_text"))
    path = Path(yitrt.triton.__file__).parent / "model_src" / "reference_engine.py"
    spec = importlib.util.spec_from_file_location("reference_engine_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Tensor:
    """A pb_utils.Tensor stand-in: what the slot calls is ``to_dlpack()``."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(self.value)


def test_bf16_weights_are_read_exactly_through_dlpack(slot):
    values = torch.randn(1, 3, 7).to(torch.bfloat16)
    out = slot.bf16_values(_Tensor(values))
    assert out.dtype == np.float32 and out.shape == (1, 3, 7)
    assert np.array_equal(out, values.float().numpy())  # bit for bit: bf16 is the upper half of a float32
    rows = torch.randn(4, 5).to(torch.bfloat16)[1:3]  # a view that starts inside its storage
    assert np.array_equal(slot.bf16_values(_Tensor(rows)), rows.float().numpy())
    with pytest.raises(ValueError, match="not BF16"):
        slot.bf16_values(_Tensor(torch.ones(2, 2, dtype=torch.float16)))


def test_a_loop_without_an_adapter_cache_refuses_lora_requests():
    from yitrt.reference.engine.loop import EngineLoop
    from yitrt.reference.engine.scheduler import EngineConfig
    from yitrt.reference.runtime import Sampling, StopRule

    runtime = SimpleNamespace(_call=lambda *a: None, check_tokens=lambda *a: None, adapters={5}, spec=None)
    loop = EngineLoop(runtime, EngineConfig(max_batch_size=2, max_num_tokens=64, tokens_per_block=8, primary_blocks=16))
    assert loop.adapters is None
    with pytest.raises(LoraError, match="serves no LoRA adapters"):
        loop.add("a", [1, 2, 3], StopRule(2), Sampling(), adapter=3)
    with pytest.raises(LoraError, match="serves no LoRA adapters"):
        loop.add("b", [1, 2, 3], StopRule(2), Sampling(), adapter=5, lora_weights=np.zeros((1, 1, 4)), lora_config=np.zeros((1, 1, 3)))
    with pytest.raises(LoraError, match="without lora_task_id"):
        loop.add("c", [1, 2, 3], StopRule(2), Sampling(), lora_config=np.zeros((1, 1, 3), dtype=np.int32))
    loop.add("d", [1, 2, 3], StopRule(2), Sampling(), adapter=5)  # loaded on the ranks by the caller: runs
    assert loop.scheduler.waiting[0].adapter == 5
