"""Compatibility rules: each rule fires on a combination that breaks it and stays silent on a fixed one."""

from __future__ import annotations

import pytest

from yitrt.errors import ValidationError
from yitrt.plan.gpus import get_gpu
from yitrt.plan.rules import check, load_rules, raise_errors, rule_context, unmet
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

OK_PLUGINS = {"gpt_attention_plugin": "auto", "remove_input_padding": "enable", "kv_cache_type": "paged",
              "tokens_per_block": 32, "context_fmha": "enable", "use_paged_context_fmha": "enable", "nccl_plugin": "auto",
              "use_fused_mlp": "enable", "multiple_profiles": "enable"}
OK_BUILD = {"max_batch_size": 64, "max_num_tokens": 8192, "max_seq_len": 4096, "max_input_len": 4095, "max_beam_width": 1}


def ctx(gpu="H100", scheme="none", kv=None, dtype="bfloat16", tp=1, pp=1, trtllm="1.2", plugins=None, build=None, serve=None,
        context_length=4096):
    return rule_context(gpu=get_gpu(gpu), scheme=SCHEMES[scheme], kv=KV_CACHE_FORMATS[kv] if kv else None, dtype=dtype, tp=tp,
                        pp=pp, trtllm=trtllm, plugins={**OK_PLUGINS, **(plugins or {})}, build={**OK_BUILD, **(build or {})},
                        serve=serve or {}, context_length=context_length)


TARGET = {"speculative_decoding_mode": "draft_tokens_external", "max_draft_len": 4, "speculative_role": "target"}
DRAFT = {"speculative_role": "draft"}
LOOKAHEAD = {"speculative_decoding_mode": "lookahead_decoding", "max_draft_len": 15, "speculative_role": "lookahead"}

#: rule id → (a context that breaks it, the closest context that does not)
CASES = {
    "scheme-sm-min": (dict(gpu="A100", scheme="fp8"), dict(gpu="L40S", scheme="fp8")),
    "scheme-sm-max": (dict(gpu="B200", scheme="int8-sq"), dict(gpu="H100", scheme="int8-sq")),
    "kv-sm-min": (dict(gpu="A10G", scheme="int4-awq", kv="fp8"), dict(gpu="L4", scheme="int4-awq", kv="fp8")),
    "kv-sm-max": (dict(gpu="B200", scheme="fp8", kv="int8"), dict(gpu="B200", scheme="fp8", kv="fp8")),
    "scheme-dtype": (dict(scheme="w4a8-awq", dtype="bfloat16"), dict(scheme="w4a8-awq", dtype="float16")),
    "trtllm-engine-path-removed": (dict(trtllm="1.3.0rc2"), dict(trtllm="1.2.1")),
    "trtllm-too-old": (dict(trtllm="0.16.0"), dict(trtllm="0.17.0")),
    "ifb-needs-attention-plugin": (dict(plugins={"gpt_attention_plugin": "disable"}), dict(plugins={"gpt_attention_plugin": "float16"})),
    "ifb-needs-packed-input": (dict(plugins={"remove_input_padding": "disable"}), dict()),
    "ifb-needs-paged-kv": (dict(plugins={"kv_cache_type": "continuous"}), dict(plugins={"kv_cache_type": "paged"})),
    "tokens-per-block-pow2": (dict(plugins={"tokens_per_block": 48}), dict(plugins={"tokens_per_block": 64})),
    "nccl-needed": (dict(tp=2, plugins={"nccl_plugin": "disable"}), dict(tp=1, plugins={"nccl_plugin": "disable"})),
    "paged-context-fmha-needs-context-fmha": (dict(plugins={"context_fmha": "disable"}), dict(plugins={"context_fmha": "disable", "use_paged_context_fmha": "disable"})),
    "fp8-context-fmha-needs-context-fmha": (dict(scheme="fp8", plugins={"context_fmha": "disable", "use_paged_context_fmha": "disable", "use_fp8_context_fmha": "enable"}),
                                            dict(scheme="fp8", plugins={"use_fp8_context_fmha": "enable"})),
    "paged-context-fmha-dropped": (dict(scheme="int8-sq", kv="int8"), dict(scheme="int8-sq")),
    "paged-context-fmha-error-old": (dict(scheme="int8-sq", kv="int8", trtllm="0.18.2"), dict(scheme="int8-sq", kv="int8", trtllm="0.18.2", plugins={"use_paged_context_fmha": "disable"})),
    "kv-reuse-needs-paged-context-fmha": (dict(scheme="int4-awq", kv="fp8", serve={"kv_reuse": True}), dict(scheme="fp8", kv="fp8", serve={"kv_reuse": True})),
    "chunked-context-needs-paged-context-fmha": (dict(serve={"chunked_context": True}, plugins={"use_paged_context_fmha": "disable"}), dict(serve={"chunked_context": True})),
    "long-context-without-fmha": (dict(build={"max_seq_len": 32768}, plugins={"context_fmha": "disable", "use_paged_context_fmha": "disable"}),
                                  dict(build={"max_seq_len": 4096}, plugins={"context_fmha": "disable", "use_paged_context_fmha": "disable"})),
    "fused-mlp-quantized": (dict(scheme="int4-awq"), dict(scheme="int4-awq", plugins={"use_fused_mlp": "disable"})),
    "gemm-plugin-fp8-format": (dict(scheme="int8-sq", plugins={"gemm_plugin": "fp8"}), dict(scheme="fp8", plugins={"gemm_plugin": "fp8"})),
    "low-latency-gemm-format": (dict(scheme="none", plugins={"low_latency_gemm_plugin": "fp8"}), dict(scheme="fp8", plugins={"low_latency_gemm_plugin": "fp8"})),
    "low-latency-gemm-hopper": (dict(gpu="L40S", scheme="fp8", plugins={"low_latency_gemm_plugin": "fp8"}), dict(gpu="H200", scheme="fp8", plugins={"low_latency_gemm_plugin": "fp8"})),
    "gemm-swiglu-needs-fused-mlp": (dict(scheme="fp8", plugins={"gemm_swiglu_plugin": "fp8", "use_fused_mlp": "disable"}), dict(scheme="fp8", plugins={"gemm_swiglu_plugin": "fp8"})),
    "gemm-swiglu-format": (dict(scheme="int4-awq", plugins={"gemm_swiglu_plugin": "fp8", "use_fused_mlp": "disable"}), dict(scheme="fp8", plugins={"gemm_swiglu_plugin": "fp8"})),
    "gemm-swiglu-hopper": (dict(gpu="B200", scheme="fp8", plugins={"gemm_swiglu_plugin": "fp8"}), dict(gpu="H100", scheme="fp8", plugins={"gemm_swiglu_plugin": "fp8"})),
    "reduce-fusion-single-gpu": (dict(tp=1, plugins={"reduce_fusion": "enable"}), dict(tp=2, plugins={"reduce_fusion": "enable"})),
    "reduce-fusion-pp-old": (dict(tp=2, pp=2, trtllm="0.18", plugins={"reduce_fusion": "enable"}), dict(tp=2, pp=2, trtllm="0.19", plugins={"reduce_fusion": "enable"})),
    "user-buffer-needs-reduce-fusion": (dict(tp=2, plugins={"user_buffer": "enable"}), dict(tp=2, plugins={"user_buffer": "enable", "reduce_fusion": "enable"})),
    "multiple-profiles-opt-tokens": (dict(build={"opt_num_tokens": 256}), dict(build={"opt_num_tokens": 256}, plugins={"multiple_profiles": "disable"})),
    "input-longer-than-sequence": (dict(build={"max_input_len": 8192}), dict(build={"max_input_len": 4096})),
    "num-tokens-below-block": (dict(build={"max_num_tokens": 16}), dict(build={"max_num_tokens": 32})),
    "num-tokens-large": (dict(build={"max_num_tokens": 32768}), dict(build={"max_num_tokens": 16384})),
    "sequence-beyond-context": (dict(build={"max_seq_len": 8192, "max_input_len": 8191}), dict(build={"max_seq_len": 8192, "max_input_len": 8191}, context_length=200_000)),
    "speculative-needs-draft-heads": (dict(build={"speculative_decoding_mode": "medusa", "max_draft_len": 4}), dict(build={"speculative_decoding_mode": "lookahead_decoding", "max_draft_len": 4})),
    "speculative-beam": (dict(build={"speculative_decoding_mode": "draft_tokens_external", "max_draft_len": 4, "max_beam_width": 4}),
                         dict(build={"speculative_decoding_mode": "draft_tokens_external", "max_draft_len": 4})),
    "draft-len-without-mode": (dict(build={"max_draft_len": 4}), dict(build={"max_draft_len": 0})),
    "mode-without-draft-len": (dict(build={"speculative_decoding_mode": "draft_tokens_external"}), dict(build={"speculative_decoding_mode": "draft_tokens_external", "max_draft_len": 3})),
    "speculative-gather-context-logits": (dict(build={**TARGET, "max_draft_len": 4}, plugins={"gather_context_logits": True}),
                                          dict(build={**TARGET, "max_draft_len": 4}, plugins={"gather_generation_logits": True})),
    "speculative-gather-all-token-logits": (dict(build={**LOOKAHEAD}, plugins={"gather_all_token_logits": True}),
                                            dict(build={"max_draft_len": 0}, plugins={"gather_all_token_logits": True})),
    "speculative-needs-paged-context-fmha": (dict(scheme="int8-sq", kv="int8", build={**DRAFT}), dict(scheme="fp8", kv="fp8", build={**DRAFT})),
    "speculative-sm": (dict(gpu="T4", build={**LOOKAHEAD}), dict(gpu="A10G", build={**LOOKAHEAD})),
    "speculative-format": (dict(scheme="int4-awq", build={**TARGET}), dict(scheme="fp8", build={**TARGET})),
    "speculative-pp": (dict(tp=2, pp=2, build={**LOOKAHEAD}), dict(tp=4, pp=1, build={**LOOKAHEAD})),
    "tp-over-pcie": (dict(gpu="L40S", tp=2), dict(gpu="H100", tp=2)),
    "tp-beyond-nvlink-domain": (dict(gpu="H100-PCIe", tp=4), dict(gpu="H100-PCIe", tp=2)),
}


def _ids(context) -> set[str]:
    return {f.rule for f in check(context)}


def test_every_rule_has_a_case():
    assert {r.id for r in load_rules()} == set(CASES)
    assert all(r.reason and r.fix and r.source for r in load_rules())


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_fires_on_the_breaking_case_only(rule_id):
    bad, good = CASES[rule_id]
    assert rule_id in _ids(ctx(**bad))
    assert rule_id not in _ids(ctx(**good))


def test_texts_are_filled_from_the_context():
    finding = next(f for f in check(ctx(gpu="A100", scheme="fp8")) if f.rule == "scheme-sm-min")
    assert finding.message == "scheme fp8 needs SM >= 89; A100-80GB is SM 80" and "{" not in finding.fix


def test_all_violations_are_reported_at_once():
    context = ctx(gpu="A10G", scheme="fp8", kv="fp8", trtllm="1.3", plugins={"remove_input_padding": "disable", "tokens_per_block": 48})
    with pytest.raises(ValidationError) as info:
        raise_errors(check(context))
    text = str(info.value)
    for part in ("scheme fp8 needs SM >= 89", "fp8 KV cache needs SM >= 89", "1.3", "remove_input_padding", "power of two"):
        assert part in text
    assert len(info.value.problems) == 5


def test_unknown_fields_keep_rules_silent():
    # quantize knows GPU and scheme but no plugin flags: only the format rules can fire
    partial = rule_context(gpu=get_gpu("A100"), scheme=SCHEMES["fp8"], dtype="bfloat16", tp=1, pp=1)
    assert _ids(partial) == {"scheme-sm-min"}
    assert unmet(ctx(), {"gpu.sm": {"ge": 89}, "scheme.quant_algo": None}) == []
    assert unmet(ctx(gpu="A100"), {"gpu.sm": {"ge": 89}}) == ["gpu.sm"]
