"""The tensorrt_llm parameters → the reference slot's batch-manager settings, read as the C++ backend reads them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from yitrt.errors import UsageError
from yitrt.reference.engine.parameters import bytes_per_block, engine_config

SPEC = SimpleNamespace(num_layers=4, num_kv_heads=2, head_size=32, kv_cache_quant_algo=None)


def test_unset_means_the_backend_default():
    config, warnings = engine_config({"max_batch_size": "4", "tokens_per_block": "${tokens_per_block}", "max_num_tokens": ""}, SPEC)
    assert (config.max_batch_size, config.max_num_tokens, config.tokens_per_block) == (4, 8192, 32)
    assert config.reuse and not config.chunked_context and config.policy == "guaranteed_no_evict" and config.host_blocks == 0
    assert config.primary_blocks == (1 << 30) // bytes_per_block(SPEC, 32, 4) and not warnings


def test_the_pool_is_the_token_cap_bounded_by_the_byte_budget():
    per_block = bytes_per_block(SPEC, 16, 4)  # 2 × 4 layers × 2 heads × 32 × 4 bytes × 16 tokens
    assert per_block == 2 * 4 * 2 * 32 * 4 * 16
    config, _ = engine_config({"tokens_per_block": "16", "max_tokens_in_paged_kv_cache": "100", "yitrt_kv_cache_bytes": str(per_block * 50),
                               "kv_cache_host_memory_bytes": str(per_block * 3 + 1)}, SPEC)
    assert config.primary_blocks == 7 and config.host_blocks == 3  # ceil(100 / 16) under the 50 the bytes hold
    config, _ = engine_config({"tokens_per_block": "16", "max_tokens_in_paged_kv_cache": "100000", "yitrt_kv_cache_bytes": str(per_block * 50)}, SPEC)
    assert config.primary_blocks == 50


def test_booleans_and_policies_parse_like_the_backend():
    config, _ = engine_config({"enable_kv_cache_reuse": "FALSE", "enable_chunked_context": "1", "batch_scheduler_policy": "max_utilization"}, SPEC)
    assert not config.reuse and config.chunked_context and config.policy == "max_utilization"
    config, warnings = engine_config({"batch_scheduler_policy": "guaranteed_completion"}, SPEC)
    assert config.policy == "guaranteed_no_evict" and "guaranteed_completion" in warnings[0]


@pytest.mark.parametrize("params, fix", [
    ({"tokens_per_block": "48"}, "16, 32, 64 or 128"),
    ({"tokens_per_block": "abc"}, "whole number"),
    ({"max_num_tokens": "0"}, "at least 1"),
    ({"enable_kv_cache_reuse": "maybe"}, "true or false"),
    ({"yitrt_kv_cache_bytes": "100"}, "raise yitrt_kv_cache_bytes"),
])
def test_bad_values_are_refused_with_the_fix(params, fix):
    with pytest.raises(UsageError) as info:
        engine_config(params, SPEC)
    assert fix in info.value.hint


def test_a_quantized_kv_cache_turns_reuse_and_chunking_off_with_a_warning():
    config, warnings = engine_config({"enable_chunked_context": "true"}, SimpleNamespace(**{**vars(SPEC), "kv_cache_quant_algo": "FP8"}))
    assert not config.reuse and not config.chunked_context and "FP8" in warnings[0]
