"""Deploy's serving settings for the batch manager: KV reuse on where the engine allows it, the slot's limits and KV
budget, the scheduler policy and the host pool — written as tensorrt_llm parameters, refused where they cannot hold."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from yitrt.errors import ValidationError
from yitrt.triton.pbtxt import parse_config
from yitrt.triton.repository import (
    DeployRequest,
    EngineFacts,
    _check_serving,
    render_repository,
    reuse_possible,
)


def _facts(kind: str, plugins: dict | None = None, kv: str | None = None, quant: str | None = None) -> EngineFacts:
    return EngineFacts(kind, Path("/ENGINE"), "1.2.1", "bfloat16", "float32", 1, 1, 16, 511, 512,
                       {"paged_kv_cache": True, "remove_input_padding": True, **(plugins or {})}, quant, kv)


def _params(facts: EngineFacts, **req) -> dict[str, str]:
    texts = render_repository(DeployRequest(Path("/ENGINE"), Path("/REPO"), engine=facts.kind, **req), facts, "1.2", 2, [])
    config = parse_config(texts["tensorrt_llm"])
    return {key: value.string_value for key, value in config.parameters.items()}


def test_reuse_defaults_on_where_the_engine_keeps_paged_context_fmha():
    assert reuse_possible(_facts("trtllm", {"use_paged_context_fmha": True, "context_fmha": True}))
    assert not reuse_possible(_facts("trtllm", {"use_paged_context_fmha": False}))
    assert not reuse_possible(_facts("trtllm", {"use_paged_context_fmha": True}, kv="INT8"))  # the build turns it off
    assert reuse_possible(_facts("reference")) and not reuse_possible(_facts("reference", kv="FP8"))
    assert _params(_facts("reference"))["enable_kv_cache_reuse"] == "true"
    assert _params(_facts("reference", kv="FP8"))["enable_kv_cache_reuse"] == "false"
    assert _params(_facts("reference"), kv_reuse=False)["enable_kv_cache_reuse"] == "false"


def test_the_slot_gets_its_limits_budget_policy_and_host_pool():
    params = _params(_facts("reference"), scheduler_policy="max_utilization", kv_host_cache=1 << 20, max_num_tokens=256,
                     tokens_per_block=16, kv_cache_bytes=64 << 20)
    assert (params["batch_scheduler_policy"], params["kv_cache_host_memory_bytes"]) == ("max_utilization", str(1 << 20))
    assert (params["max_num_tokens"], params["tokens_per_block"], params["yitrt_kv_cache_bytes"]) == ("256", "16", str(64 << 20))
    defaults = _params(_facts("reference"))
    assert (defaults["max_num_tokens"], defaults["tokens_per_block"], defaults["yitrt_kv_cache_bytes"]) == ("8192", "32", str(1 << 30))
    assert defaults["batch_scheduler_policy"] == "guaranteed_no_evict"
    assert defaults["kv_cache_host_memory_bytes"].startswith("${")  # 0: left unset, the backend's default
    engine = _params(_facts("trtllm"))
    assert "yitrt_kv_cache_bytes" not in engine and "tokens_per_block" not in engine  # an engine carries its own


@pytest.mark.parametrize("facts, req, message", [
    (_facts("reference", kv="FP8"), {"kv_reuse": True}, "--no-kv-reuse"),
    (_facts("reference", kv="INT8"), {"chunked_context": True}, "chunks the context"),
    (_facts("reference"), {"tokens_per_block": 48}, "power of two"),
    (_facts("reference"), {"scheduler_policy": "guaranteed_completion"}, "is not one of"),
    (_facts("trtllm"), {"tokens_per_block": 64, "max_num_tokens": 4096}, "reference slot only"),
    (_facts("trtllm", {"use_paged_context_fmha": False}), {"kv_reuse": True}, "paged context FMHA"),
])
def test_impossible_serving_settings_are_refused(facts, req, message):
    request = dataclasses.replace(DeployRequest(Path("/ENGINE"), Path("/REPO"), engine=facts.kind), **req)
    with pytest.raises(ValidationError) as info:
        _check_serving(request, facts, "1.2")
    assert message in str(info.value)


def test_a_small_kv_budget_is_the_slots_business_not_a_refusal():
    request = DeployRequest(Path("/ENGINE"), Path("/REPO"), engine="reference", max_kv_tokens=64)
    assert _check_serving(request, _facts("reference"), "1.2") == []  # the slot refuses per request what never fits
    with pytest.raises(ValidationError, match="cannot hold one 512-token sequence"):
        _check_serving(dataclasses.replace(request, engine="trtllm"), _facts("trtllm"), "1.2")
