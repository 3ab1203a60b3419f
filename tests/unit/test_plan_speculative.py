"""Speculative plans at real Yi shapes: a draft-target pair on the same GPUs (weights of both, two KV pools, the
Triton fractions in either load order) and lookahead's tokens per step, checked against hand arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from yitrt.errors import UsageError, ValidationError
from yitrt.models.registry import load_registry
from yitrt.plan.gpus import get_gpu
from yitrt.plan.memory import (
    PlanRequest,
    Workload,
    activation_bytes,
    kv_bytes_per_token,
    plan_memory,
    rank_weight_bytes,
)
from yitrt.plan.planner import PlanOptions, plan
from yitrt.plan.speculative import pair_problems, plan_pair
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES
from yitrt.speculation import LookaheadSizes

REG = load_registry()
YI_34B, YI_6B, YI_9B = REG.config_of("01-ai/Yi-34B-Chat"), REG.config_of("01-ai/Yi-6B-Chat"), REG.config_of("01-ai/Yi-1.5-9B-Chat")


def request(cfg, gpu="H100-SXM", scheme="fp8", kv="fp8", tp=2, pp=1, draft=0, **workload) -> PlanRequest:
    return PlanRequest(cfg=cfg, dtype="bfloat16", scheme=SCHEMES[scheme], kv=KV_CACHE_FORMATS[kv] if kv else None, tp=tp, pp=pp,
                       gpu=get_gpu(gpu), workload=Workload(**workload), max_draft_len=draft)


def _pair(**workload):
    return plan_pair(request(YI_34B, draft=4, **workload), request(YI_6B, **workload))


def test_yi34b_target_and_yi6b_draft_share_two_h100s():
    pair = _pair()
    t, d = pair.target, pair.draft
    assert pair.fits and pair.max_batch_size == t.limits.max_batch_size == d.limits.max_batch_size
    # KV bytes per token at tp 2 with FP8 KV (by hand): 34B 2·60·4·128·1, 6B 2·32·2·128·1
    assert t.ranks[0].kv_bytes_per_token == 61_440 == kv_bytes_per_token(YI_34B, 2, 60, 1)
    assert d.ranks[0].kv_bytes_per_token == 16_384
    # weights: each GPU holds half of both models (the sum the pair reports is the two engines' ranks)
    wt, wd = sum(rank_weight_bytes(t.request, 0).values()), sum(rank_weight_bytes(d.request, 0).values())
    j = pair.to_json()
    assert j["weight_bytes_per_gpu"] == {"target": wt, "draft": wd, "total": wt + wd}
    assert round(wt / 1e9, 2) == 17.65 and round(wd / 1e9, 2) == 3.29
    # the free memory is the GPU less both engines' weights, activations and runtime
    fixed = sum(j["weight_bytes_per_gpu"][k] + j["activation_bytes_per_gpu"][k] + j["runtime_bytes_per_gpu"][k] for k in ("target", "draft"))
    assert j["free_bytes_per_gpu"] == get_gpu("H100-SXM").memory_bytes - fixed
    # the draft's pool is exactly a full batch of ISL+OSL sequences: ceil(1536/32) = 48 blocks each
    assert pair.draft_pool_bytes == pair.max_batch_size * 48 * 32 * 16_384
    assert d.max_tokens_in_paged_kv_cache == pair.max_batch_size * 48 * 32
    # the target's sequences hold ISL + OSL + K = 1540 tokens: 49 blocks
    assert t.blocks_per_sequence == math.ceil(1540 / 32) == 49
    assert t.max_concurrent >= pair.max_batch_size and d.max_concurrent >= pair.max_batch_size
    # the rest goes to the target: both pools together take the kv_fraction share of the free memory
    shares = j["kv_share_of_free"]
    assert shares["target"] + shares["draft"] == pytest.approx(0.9, abs=1e-5) and shares["target"] + shares["draft"] <= 1
    assert pair.target_pool_bytes + pair.draft_pool_bytes == int(j["free_bytes_per_gpu"] * 0.9)


def test_the_pair_holds_fewer_sequences_than_the_target_alone():
    pair = _pair()
    alone = plan_memory(request(YI_34B, draft=4))
    assert pair.max_concurrent < alone.max_concurrent
    # and no more than the free memory allows for one target + one draft sequence each
    per_pair = 49 * 32 * 61_440 + 48 * 32 * 16_384
    assert pair.max_concurrent <= pair.free_bytes * 0.9 // per_pair


def _load(first_pool: int, first_cap: int, first_fraction: float, second_cap: int, second_fraction: float, free: int) -> tuple[int, int]:
    """Two executors created one after the other on a GPU with ``free`` bytes left after both engines loaded: each
    takes min(its token cap, fraction × the memory free when it is created)."""
    a = min(first_cap, int(first_fraction * free))
    b = min(second_cap, int(second_fraction * (free - a)))
    return a, b


def test_the_two_pools_reach_their_size_whichever_model_loads_first():
    pair = _pair()
    tri = pair.triton()
    t_cap = tri["tensorrt_llm"]["max_tokens_in_paged_kv_cache"] * 61_440
    d_cap = tri["tensorrt_llm_draft"]["max_tokens_in_paged_kv_cache"] * 16_384
    ft, fd = tri["tensorrt_llm"]["kv_cache_free_gpu_mem_fraction"], tri["tensorrt_llm_draft"]["kv_cache_free_gpu_mem_fraction"]
    assert 0 < ft <= 1 and 0 < fd <= 1
    t_first = _load(0, t_cap, ft, d_cap, fd, pair.free_bytes)
    d_first = _load(0, d_cap, fd, t_cap, ft, pair.free_bytes)
    assert t_first == (t_cap, d_cap) and d_first == (d_cap, t_cap)
    # DTM's 0.5 each would leave the model loaded second with a quarter of the free memory: too little here
    naive = _load(0, t_cap, 0.5, d_cap, 0.5, pair.free_bytes)
    assert naive[0] < t_cap


def test_a_fixed_batch_sizes_the_draft_pool_and_leaves_the_rest_to_the_target():
    pair = _pair(max_batch_size=32)
    assert pair.max_batch_size == 32 and pair.max_concurrent >= 32
    assert pair.draft.max_tokens_in_paged_kv_cache == 32 * 48 * 32
    assert pair.target_pool_bytes > 10 * pair.draft_pool_bytes  # a small draft pool: the target keeps the rest
    assert pair.target.limits.max_num_tokens >= 32 * 5


def test_a_pair_that_does_not_fit_says_why():
    pair = plan_pair(request(YI_34B, scheme="none", kv=None, tp=1, draft=4), request(YI_6B, scheme="none", kv=None, tp=1))
    assert not pair.fits and any("exceed" in p or "before any KV cache" in p for p in pair.problems)


def test_pair_structure_problems():
    other_vocab = YI_6B.__class__(**{**YI_6B.__dict__, "vocab_size": 32000})
    problems = pair_problems(request(YI_34B, draft=4, tp=2), request(other_vocab, tp=4))
    assert any("vocabulary" in p for p in problems) and any("tp 4 exceeds" in p for p in problems)
    assert any("needs max_draft_len" in p for p in pair_problems(request(YI_34B), request(YI_6B)))
    assert any("pp 1" in p for p in pair_problems(request(YI_34B, draft=4, pp=2), request(YI_6B)))
    assert any("pair shares its GPUs" in p for p in pair_problems(request(YI_34B, draft=4), request(YI_6B, gpu="H200")))
    assert pair_problems(request(YI_34B, draft=4), request(YI_6B, tp=1)) == []


def test_a_draft_on_fewer_gpus_is_planned_beside_every_target_rank():
    pair = plan_pair(request(YI_34B, draft=4), request(YI_6B, tp=1))
    assert pair.fits and pair.to_json()["shared_gpus"] == 1 and any("spans 1 of the target's 2 GPUs" in n for n in pair.notes)
    assert pair.draft.ranks[0].kv_bytes_per_token == 2 * 32 * 4 * 128  # all 4 KV heads on the one GPU, FP8


def test_lookahead_feeds_d_plus_one_tokens_per_sequence():
    la = LookaheadSizes(7, 7, 7)
    assert la.max_draft_len == 83 and la.decoding_tokens == 84
    p = plan_memory(request(YI_9B, gpu="L40S", scheme="none", kv=None, tp=1, draft=la.max_draft_len, max_batch_size=128))
    assert p.limits.max_num_tokens == 128 * 84  # raised from 8192 as trtllm-build does
    assert p.ranks[0].activations == activation_bytes(p.request, 128 * 84, 128)
    assert p.blocks_per_sequence == math.ceil((1536 + 83) / 32)
    eng = p.speculative()["engine_limits"]
    assert eng["max_seq_len"] == p.limits.max_seq_len + 83 and eng["max_num_tokens"] == 128 * 84
    plain = plan_memory(request(YI_9B, gpu="L40S", scheme="none", kv=None, tp=1, max_batch_size=128))
    assert plain.limits.max_num_tokens == 8192 and plain.ranks[0].activations < p.ranks[0].activations
    assert plain.speculative() is None


def test_plan_report_for_a_pair_and_for_lookahead():
    opts = PlanOptions(gpu="H100-SXM", tp=(2,), schemes=("fp8",), kv_cache="fp8", draft="01-ai/Yi-6B-Chat", max_draft_len=4)
    report = plan("01-ai/Yi-34B-Chat", opts)
    data = json.loads(json.dumps(report.to_json()))
    spec = data["speculative"]
    assert report.fits and spec["mode"] == "draft-target" and spec["draft_model"]["scheme"] == "fp8" and spec["draft_model"]["tp"] == 2
    assert data["candidates"][0]["plan"]["speculative"]["engine_limits"]["max_seq_len"] == 4100
    assert spec["max_batch_size"] == data["candidates"][0]["plan"]["build_limits"]["max_batch_size"]
    assert set(spec["triton"]) == {"tensorrt_llm", "tensorrt_llm_draft"}
    la = plan("01-ai/Yi-1.5-9B-Chat", PlanOptions(gpu="L40S", lookahead=LookaheadSizes(4, 3, 4)))
    lj = la.to_json()["speculative"]
    assert lj["max_draft_len"] == 15 and lj["decoding_tokens"] == 16
    assert lj["triton"]["tensorrt_llm"] == {"decoding_mode": "lookahead", "lookahead_window_size": 4, "lookahead_ngram_size": 3,
                                            "lookahead_verification_set_size": 4}


def test_plan_options_that_contradict_are_refused_together(make_model):
    with pytest.raises(UsageError) as info:
        plan("01-ai/Yi-34B-Chat", PlanOptions(gpu="H100", draft="01-ai/Yi-6B-Chat", lookahead=LookaheadSizes(4, 3, 4), compare=True))
    text = str(info.value)
    assert "pick one" in text and "needs --max-draft-len" in text and "--compare" in text
    with pytest.raises(UsageError, match="needs --draft"):
        plan("01-ai/Yi-34B-Chat", PlanOptions(gpu="H100", max_draft_len=4, draft_tp=1))
    with pytest.raises(ValidationError, match="vocabulary"):
        plan("01-ai/Yi-34B-Chat", PlanOptions(gpu="H100", tp=(2,), schemes=("fp8",), draft=str(make_model()), max_draft_len=4))


def test_plan_cli_json_and_render(cli):
    result = cli("plan", "01-ai/Yi-34B-Chat", "--gpu", "H100-SXM", "--tp", "2", "--scheme", "fp8", "--kv-cache", "fp8",
                 "--draft", "01-ai/Yi-6B-Chat", "--max-draft-len", "4", "--json")
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)["speculative"]
    assert spec["fits"] and spec["kv_share_of_free"]["target"] + spec["kv_share_of_free"]["draft"] <= 1
    shown = cli("plan", "01-ai/Yi-34B-Chat", "--gpu", "H100-SXM", "--tp", "2", "--scheme", "fp8", "--kv-cache", "fp8",
                "--draft", "01-ai/Yi-6B-Chat", "--max-draft-len", "4")
    assert shown.returncode == 0 and "tensorrt_llm_draft" in shown.stdout and "Two engines per GPU" in shown.stdout
    la = cli("plan", "01-ai/Yi-1.5-9B-Chat", "--gpu", "L40S", "--lookahead", "4,3,4")
    assert la.returncode == 0 and "--max_draft_len 15" in la.stdout and "decoding_mode lookahead" in la.stdout
    bad = cli("plan", "01-ai/Yi-1.5-9B-Chat", "--gpu", "L40S", "--lookahead", "4,3")
    assert bad.returncode == 2 and "W,N,G" in bad.stderr


def test_a_truncated_self_draft_is_planned_with_its_kept_layers():
    opts = PlanOptions(gpu="H100-SXM", tp=(2,), schemes=("fp8",), draft="01-ai/Yi-34B-Chat", max_draft_len=4, draft_layers=12)
    spec = plan("01-ai/Yi-34B-Chat", opts).to_json()["speculative"]
    assert spec["draft_model"]["num_layers"] == 12
    # 12 of 60 layers: a fifth of the linears, the same embedding and lm_head, a fifth of the KV per token
    assert spec["kv_bytes_per_token"]["draft"] == spec["kv_bytes_per_token"]["target"] * 12 // 60
    full = rank_weight_bytes(request(YI_34B, kv=None), 0)
    kept = {k: v * 12 // 60 if k in ("linear", "scales", "bias") else v for k, v in full.items()}
    kept["norms"] = 2 * 12 * YI_34B.hidden_size * 2 + YI_34B.hidden_size * 2
    assert spec["weight_bytes_per_gpu"]["draft"] == sum(kept.values())
    with pytest.raises(UsageError, match="exceeds the model's 60"):
        plan("01-ai/Yi-34B-Chat", PlanOptions(gpu="H100-SXM", tp=(2,), schemes=("fp8",), draft="01-ai/Yi-34B-Chat",
                                              max_draft_len=4, draft_layers=61))
