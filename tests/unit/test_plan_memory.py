"""The memory planner against figures computed by hand (reference §6, yi-models.md §1.3) and its arithmetic."""

from __future__ import annotations

import math

import pytest

from yitrt.models.registry import load_registry
from yitrt.plan.gpus import all_gpus, get_gpu, match_gpu
from yitrt.plan.memory import PlanRequest, Workload, kv_bytes_per_token, plan_memory, rank_weight_bytes
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

YI_6B = load_registry().config_of("01-ai/Yi-6B")
YI_9B = load_registry().config_of("01-ai/Yi-1.5-9B-Chat")
YI_34B = load_registry().config_of("01-ai/Yi-34B")


def request(cfg, gpu="H100", scheme="none", kv=None, tp=1, pp=1, **workload) -> PlanRequest:
    return PlanRequest(cfg=cfg, dtype="bfloat16", scheme=SCHEMES[scheme], kv=KV_CACHE_FORMATS[kv] if kv else None, tp=tp, pp=pp,
                       gpu=get_gpu(gpu), workload=Workload(**workload))


def test_gpu_table_has_the_issue_gpus_with_every_fact():
    names = {g.name for g in all_gpus()}
    for name in ("A10G", "L4", "L40S", "A100-40GB", "A100-80GB", "H100-PCIe", "H100-SXM", "H200", "GH200", "B200"):
        assert name in names
    h100 = get_gpu("h100 sxm")  # case, spaces and aliases
    assert (h100.sm, h100.memory_mib, h100.bandwidth_gbs, h100.fp8, h100.fp4, h100.nvlink_gbs) == (90, 81559, 3350, True, False, 900)
    assert get_gpu("H100_PCIE").name == "H100-PCIe" and get_gpu("a100").name == "A100-80GB"
    assert get_gpu("b200").fp4 and not get_gpu("A10G").fp8 and get_gpu("L4").nvlink_gbs == 0


def test_nvidia_smi_names_map_to_table_rows():
    # the first string is what a real H100 SXM's nvidia-smi printed (device check, this issue)
    assert match_gpu("NVIDIA H100 80GB HBM3", 90).name == "H100-SXM"
    assert match_gpu("NVIDIA H100 PCIe").name == "H100-PCIe"
    assert match_gpu("NVIDIA H100 NVL").name == "H100-NVL"
    assert match_gpu("NVIDIA A100-SXM4-40GB").name == "A100-40GB"
    assert match_gpu("NVIDIA L40S").name == "L40S" and match_gpu("NVIDIA L4").name == "L4"
    assert match_gpu("NVIDIA H100 80GB HBM3", 89) is None  # the SM must agree
    assert match_gpu("Some Other Card") is None


def test_hand_checked_kv_bytes_per_token():
    assert kv_bytes_per_token(YI_34B, 1, 60, 2) == 245_760  # 2·60·8·128·2
    assert kv_bytes_per_token(YI_34B, 2, 60, 2) == 122_880
    assert kv_bytes_per_token(YI_34B, 1, 60, 1) == 122_880  # FP8 KV halves it
    assert kv_bytes_per_token(YI_6B, 1, 32, 2) == 65_536
    assert kv_bytes_per_token(YI_6B, 8, 32, 2) == 16_384  # 4 KV heads at tp 8: one duplicated head per rank
    assert kv_bytes_per_token(YI_6B, 4, 32, 2) == 16_384  # ... the same as tp 4: duplication buys nothing
    # a 16K-token Yi-34B request needs 4.03 GB of fp16 KV
    assert round(16 * 1024 * kv_bytes_per_token(YI_34B, 1, 60, 2) / 1e9, 2) == 4.03


def test_hand_checked_weight_bytes():
    weights = sum(rank_weight_bytes(request(YI_34B), 0).values())
    assert round(weights / 1e9, 2) == 68.78 and weights == 2 * 34_388_917_248
    assert sum(rank_weight_bytes(request(YI_6B), 0).values()) == 2 * 6_061_035_520
    assert sum(rank_weight_bytes(request(YI_9B), 0).values()) == 2 * 8_829_407_232
    # tp 2: each rank holds half of every linear, half the vocab rows of embedding and lm_head, all norms
    half = rank_weight_bytes(request(YI_34B, tp=2), 0)
    h, v, i, L = 7168, 64000, 20480, 60
    elements = L * (h * (7168 + 2 * 1024) + 7168 * h + 3 * h * i)
    assert half["linear"] == elements // 2 * 2  # half the elements per rank, 2 bytes each
    assert half["embedding"] == half["lm_head"] == v // 2 * h * 2
    assert half["norms"] == (2 * L + 1) * h * 2


def test_quantized_weights_count_their_scales():
    # int4-awq (group 128): 4-bit linears + one model-dtype scale per group + the prequant vector per linear,
    # embedding and lm_head untouched
    awq = rank_weight_bytes(request(YI_34B, scheme="int4-awq"), 0)
    h, i, L = 7168, 20480, 60
    shapes = [(7168 + 2048, h), (h, 7168), (i, h), (i, h), (h, i)]
    elements = sum(o * n for o, n in shapes)
    assert awq["linear"] == L * elements // 2
    assert awq["scales"] == L * sum(o * (n // 128) * 2 + n * 2 for o, n in shapes)
    assert awq["embedding"] == awq["lm_head"] == 64000 * h * 2
    fp8 = rank_weight_bytes(request(YI_34B, scheme="fp8"), 0)
    assert fp8["linear"] == L * elements and fp8["scales"] == L * 5 * 8  # two fp32 scalars per linear
    sq = rank_weight_bytes(request(YI_34B, scheme="int8-sq"), 0)
    assert sq["scales"] == L * sum(o * 4 + 4 + n * 2 for o, n in shapes)


def test_pipeline_stages_split_layers_embedding_and_head():
    plan = plan_memory(request(YI_34B, pp=2, tp=2))
    first, last = plan.ranks[0], plan.ranks[-1]
    assert [r.layers for r in plan.ranks] == [30, 30, 30, 30]
    assert first.weights["embedding"] > 0 and first.weights["lm_head"] == 0
    assert last.weights["embedding"] == 0 and last.weights["lm_head"] > 0
    assert first.kv_bytes_per_token == 2 * 30 * 4 * 128 * 2
    assert plan.kv_blocks == min(r.kv_blocks for r in plan.ranks)  # every rank takes the smallest pool


def test_capacity_and_concurrency_arithmetic():
    plan = plan_memory(request(YI_34B, isl=1024, osl=512))
    r = plan.ranks[0]
    gpu = get_gpu("H100")
    assert r.kv_pool == int((gpu.memory_bytes - r.weight_bytes - r.activations - r.overhead) * 0.9)
    assert r.kv_tokens == r.kv_pool // 245_760 and r.kv_blocks == r.kv_tokens // 32
    assert plan.blocks_per_sequence == math.ceil(1536 / 32) == 48
    assert plan.max_concurrent == plan.kv_blocks // 48 and plan.fits
    assert plan.limits.max_batch_size == plan.max_concurrent  # yitrt sizes the batch to what the pool holds
    assert plan.limits.max_seq_len == 4096 and plan.limits.max_input_len == 4095
    fp8kv = plan_memory(request(YI_34B, kv="fp8", isl=1024, osl=512))
    assert fp8kv.max_concurrent >= 2 * plan.max_concurrent - 1  # half the bytes per token


def test_plan_that_does_not_fit_says_why():
    plan = plan_memory(request(YI_34B, gpu="L40S"))
    assert not plan.fits and "68.78 GB" in plan.problems[0] and "L40S" in plan.problems[0]
    # fits the weights but not one long sequence: Yi-34B on one H100 cannot hold a 200K-token request
    long = plan_memory(request(load_registry().config_of("01-ai/Yi-34B-200K"), isl=150_000, osl=60_000))
    assert not long.fits and "less than one 210000-token sequence" in long.problems[0]


def test_default_max_seq_len_shrinks_to_the_pool_and_explicit_one_is_kept():
    cfg = load_registry().config_of("01-ai/Yi-34B-200K")
    auto = plan_memory(request(cfg))
    assert auto.fits and auto.limits.max_seq_len < 200_000 and auto.limits.max_seq_len % 32 == 0
    assert auto.limits.max_seq_len <= auto.kv_tokens and any("shortened" in n for n in auto.notes)
    explicit = plan_memory(request(cfg, max_seq_len=200_000))
    assert explicit.limits.max_seq_len == 200_000 and any("attention window" in n for n in explicit.notes)


def test_requested_limits_are_honoured_and_checked():
    plan = plan_memory(request(YI_6B, max_batch_size=64, max_num_tokens=4096))
    assert plan.limits.max_batch_size == 64 and plan.limits.max_num_tokens == 4096
    tiny = plan_memory(request(YI_6B, isl=8000, osl=500, max_seq_len=4096))
    assert not tiny.fits and "exceeds max_seq_len 4096" in tiny.problems[-1]
    big_prompt = plan_memory(request(YI_6B, gpu="H200", isl=12000, osl=100, max_seq_len=16384))
    assert any("chunked context" in n for n in big_prompt.notes)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_kv_fraction_scales_the_pool(fraction):
    plan = plan_memory(request(YI_9B, kv_fraction=fraction))
    r = plan.ranks[0]
    assert r.kv_pool == int((get_gpu("H100").memory_bytes - r.weight_bytes - r.activations - r.overhead) * fraction)
    assert plan.max_tokens_in_paged_kv_cache <= plan.kv_tokens


def test_prefix_cache_capacity_is_what_a_full_batch_leaves_in_the_pool():
    plan = plan_memory(request(YI_6B, isl=1024, osl=256, max_batch_size=64, prefix_tokens=500))
    cache = plan.prefix_cache()
    assert cache["blocks_per_prefix"] == 500 // 32  # only full blocks are reused
    assert cache["running_batch_blocks"] == 64 * plan.blocks_per_sequence
    assert cache["spare_blocks"] == plan.kv_blocks - cache["running_batch_blocks"]
    assert cache["resident_prefixes"] == cache["spare_blocks"] // 15
    # the plan caps max_tokens_in_paged_kv_cache at the batch's need: nothing is left for cached prefixes there
    assert plan.max_tokens_in_paged_kv_cache == 64 * plan.blocks_per_sequence * 32
    assert cache["resident_prefixes_within_max_tokens"] == 0
    assert plan.to_json()["prefix_cache"] == cache


# -- the LoRA adapter cache (trtllm-serving-features.md §2.5) --------------------------------------------------------


def _lora(modules=("attn_q", "attn_k", "attn_v"), max_rank=16, **cache):
    from yitrt.plan.lora import LoraCacheRequest

    return LoraCacheRequest(tuple(modules), max_rank, **cache)


def test_lora_cache_is_its_fraction_of_what_the_kv_pool_leaves_and_leaves_the_pool_alone():
    from dataclasses import replace

    base = request(YI_6B, "H100", tp=2)
    plain, lora = plan_memory(base), plan_memory(replace(base, lora=_lora()))
    assert lora.fits and lora.kv_tokens == plain.kv_tokens and lora.limits == plain.limits  # the executor sizes KV first
    r = lora.ranks[0]
    free = r.kv_pool / 0.9  # the pool is 0.9 of the free memory, so the executor's leftover is the other 0.1
    assert abs(r.lora_cache - 0.05 * (free - r.kv_pool)) <= 2
    assert plain.ranks[0].lora_cache == 0 and plain.lora is None
    # one rank-16 q/k/v adapter on a rank of Yi-6B at tp 2 (hidden 4096, 32 heads, 4 KV heads of 128, 32 layers):
    # q: in 4096 + out 4096/2, k and v: in 4096 + out 512/2 — per layer, × 16 × 2 bytes
    need = 32 * ((4096 + 2048) + 2 * (4096 + 256)) * 16 * 2
    stage = lora.lora["stages"][0]
    assert stage["max_adapter_bytes"] == need and stage["max_adapters_on_device"] == r.lora_cache // need
    assert stage["max_adapters_on_host"] == (1 << 30) // need
    assert lora.to_json()["lora"]["triton"] == {"lora_cache_optimal_adapter_size": 8, "lora_cache_max_adapter_size": 16,
                                                "lora_cache_gpu_memory_fraction": 0.05, "lora_cache_host_memory_bytes": 1 << 30}


def test_lora_cache_row_modules_split_their_input_and_pipeline_stages_hold_their_layers():
    from dataclasses import replace

    plan = plan_memory(replace(request(YI_6B, "H100", tp=2, pp=2), lora=_lora(("attn_dense", "mlp_4h_to_h"), max_rank=8)))
    # dense: in 4096/2 + out 4096; 4h_to_h: in 11008/2 + out 4096; 16 layers per stage, rank 8, bf16
    assert [s["max_adapter_bytes"] for s in plan.lora["stages"]] == [16 * ((2048 + 4096) + (5504 + 4096)) * 8 * 2] * 2
    assert [s["pp_rank"] for s in plan.lora["stages"]] == [0, 1]


def test_lora_cache_too_small_is_refused_naming_the_fix():
    from dataclasses import replace

    no_room = plan_memory(replace(request(YI_6B, "H100", kv_fraction=1.0), lora=_lora()))
    assert not no_room.fits and no_room.lora["only_problem"]  # the cache alone: its fix is the cache's (no tp suggestions)
    too_big = plan_memory(replace(request(YI_34B, "L4"), lora=_lora()))
    assert not too_big.fits and not too_big.lora["only_problem"]  # the weights do not fit: the planner still suggests tp
    assert any("device LoRA cache" in p and "lora.cache.gpu_memory_fraction" in p and "serve.kv_fraction" in p
               and "lora.cache.max_adapter_size" in p for p in no_room.problems)
    # one rank-1 q/k/v adapter of Yi-6B at tp 1 is 32 · ((4096 + 4096) + 2 · (4096 + 512)) · 2 = 1,114,112 bytes
    need_1 = 1_114_112
    host = plan_memory(replace(request(YI_6B, "H100"), lora=_lora(max_rank=64, host_memory_bytes=8 * need_1)))
    assert not host.fits and any("host LoRA cache" in p and "lora.cache.host_memory_bytes" in p for p in host.problems)
    # ... which a max_adapter_size of 8 fits exactly, and one byte less does not
    small = plan_memory(replace(request(YI_6B, "H100"), lora=_lora(max_rank=64, max_adapter_size=8, host_memory_bytes=8 * need_1)))
    assert small.fits and small.lora["max_adapter_size"] == 8 and small.lora["stages"][0]["max_adapters_on_host"] == 1
    short = plan_memory(replace(request(YI_6B, "H100"), lora=_lora(max_rank=64, max_adapter_size=8, host_memory_bytes=8 * need_1 - 1)))
    assert not short.fits


def test_lora_cache_sizes_are_clamped_to_max_rank_and_bad_ones_refused():
    from yitrt.errors import UsageError

    assert _lora(max_rank=4).effective_max_adapter_size == 4 and _lora(max_rank=4).effective_optimal_adapter_size == 4
    assert _lora(max_rank=128).effective_max_adapter_size == 64
    with pytest.raises(UsageError, match="gpu_memory_fraction"):
        _lora(gpu_memory_fraction=0)
    with pytest.raises(UsageError, match="no target module"):
        _lora(modules=())


def test_plan_command_plans_the_adapter_cache(cli):
    import json

    short = cli("plan", "01-ai/Yi-1.5-6B-Chat", "--gpu", "L4", "--lora-rank", "16", "--json")
    assert short.returncode == 13  # all seven modules at rank 16 do not fit TensorRT-LLM's default fraction on an L4
    plan = json.loads(short.stdout)["candidates"][0]["plan"]
    assert plan["lora"]["modules"] == ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]
    assert any("--lora-cache-fraction" in p for p in plan["problems"])
    roomy = cli("plan", "01-ai/Yi-1.5-6B-Chat", "--gpu", "L4", "--lora-rank", "16", "--lora-cache-fraction", "0.2")
    assert roomy.returncode == 0 and "adapter cache (LoRA, rank 0, pp 0)" in roomy.stdout
    qv = json.loads(cli("plan", "01-ai/Yi-1.5-6B-Chat", "--gpu", "L4", "--lora-rank", "8", "--lora-modules", "attn_q,attn_v", "--json").stdout)
    assert qv["candidates"][0]["plan"]["lora"]["modules"] == ["attn_q", "attn_k", "attn_v"]  # completed all-or-none
    bad = cli("plan", "01-ai/Yi-1.5-6B-Chat", "--gpu", "L4", "--lora-rank", "8", "--lora-modules", "q_proj")
    assert bad.returncode == 2 and "q_proj is the PEFT name" in bad.stderr
    assert cli("plan", "01-ai/Yi-1.5-6B-Chat", "--gpu", "L4", "--lora-modules", "attn_q").returncode == 2
