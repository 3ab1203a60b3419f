"""The Yi registry (yi_checkpoints.yaml) and `describe_model` (what `yitrt inspect` reports).

Expected facts come from shared reference/yi-models.md §1.1-1.3, §3, §5-7 and
reference/trtllm-checkpoint-and-build.md §2; valid TP/PP sizes are derived by hand in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yitrt.models.config import parse_config
from yitrt.models.registry import load_registry
from yitrt.models.summary import describe_model

# Shape families, yi-models.md §1.2 (hidden, layers, heads, kv, inter, vocab).
REFERENCE_SHAPES = {
    "yi-6b": (4096, 32, 32, 4, 11008, 64000),
    "yi-9b": (4096, 48, 32, 4, 11008, 64000),
    "yi-34b": (7168, 60, 56, 8, 20480, 64000),
    "yi-coder-1.5b": (2048, 24, 16, 16, 5504, 64000),
}

# (repo id, shape family, context, rope_theta) from yi-models.md §1.2 (the 200K repos after their 2024 rope update).
REFERENCE_CHECKPOINTS = [
    ("01-ai/Yi-6B", "yi-6b", 4096, 5e6),
    ("01-ai/Yi-6B-Chat", "yi-6b", 4096, 5e6),
    ("01-ai/Yi-6B-200K", "yi-6b", 200000, 1e7),
    ("01-ai/Yi-9B", "yi-9b", 4096, 1e4),
    ("01-ai/Yi-9B-200K", "yi-9b", 262144, 1e7),
    ("01-ai/Yi-34B", "yi-34b", 4096, 5e6),
    ("01-ai/Yi-34B-Chat", "yi-34b", 4096, 5e6),
    ("01-ai/Yi-1.5-6B-Chat", "yi-6b", 4096, 5e6),
    ("01-ai/Yi-1.5-9B", "yi-9b", 4096, 5e6),
    ("01-ai/Yi-1.5-9B-Chat", "yi-9b", 4096, 5e6),
    ("01-ai/Yi-1.5-9B-Chat-16K", "yi-9b", 16384, 5e6),
    ("01-ai/Yi-1.5-34B-32K", "yi-34b", 32768, 5e6),
    ("01-ai/Yi-1.5-34B-Chat-16K", "yi-34b", 16384, 5e6),
    ("01-ai/Yi-Coder-9B-Chat", "yi-9b", 131072, 1e7),
    ("01-ai/Yi-Coder-1.5B", "yi-coder-1.5b", 131072, 1e7),
]


def _hf_config(shape: str, context: int = 4096, rope_theta: float = 5e6, **extra) -> dict:
    hidden, layers, heads, kv, inter, vocab = REFERENCE_SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": context,
        "rope_theta": rope_theta,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
    }


def _folder(tmp_path: Path, raw: dict, **files: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


# ---- the packaged table -----------------------------------------------------------------------------------

def test_registry_loads_and_every_checkpoint_names_a_known_shape():
    reg = load_registry()
    assert len(reg.checkpoints) >= 20
    for ckpt in reg.checkpoints.values():
        assert ckpt.shape in reg.shapes, ckpt.repo_id
        assert ckpt.repo_id.startswith("01-ai/")
        assert ckpt.context > 0 and ckpt.rope_theta > 0


def test_shapes_equal_reference_dims():
    reg = load_registry()
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
    assert set(reg.shapes) == set(REFERENCE_SHAPES)
    for name, dims in REFERENCE_SHAPES.items():
        assert tuple(reg.shapes[name][k] for k in keys) == dims, name


@pytest.mark.parametrize(("repo", "shape", "context", "theta"), REFERENCE_CHECKPOINTS)
def test_checkpoint_facts_match_reference(repo, shape, context, theta):
    ckpt = load_registry().by_repo_id(repo)
    assert ckpt is not None, repo
    assert (ckpt.shape, ckpt.context, ckpt.rope_theta) == (shape, context, theta)


def test_chat_models_end_on_im_end_and_base_models_on_endoftext():
    # yi-models.md §7.4: chat end_id 7 (<|im_end|>), base 2 (<|endoftext|>)
    for ckpt in load_registry().checkpoints.values():
        is_chat = ckpt.repo_id.endswith("-Chat") or "-Chat-" in ckpt.repo_id
        assert ckpt.chat is is_chat, ckpt.repo_id
        assert ckpt.end_id == (7 if is_chat else 2), ckpt.repo_id
        if is_chat:
            assert "chat-end-id" in {p.id for p in ckpt.pitfalls}, ckpt.repo_id


@pytest.mark.parametrize(
    ("repo", "end_id"),
    [("01-ai/Yi-34B-Chat", 7), ("01-AI/YI-34B-CHAT", 7), ("01-ai/yi-34b-chat", 7), ("01-ai/Yi-34B", 2), ("01-ai/yi-34b", 2)],
)
def test_lookup_by_repo_id_is_case_insensitive(repo, end_id):
    reg = load_registry()
    ckpt = reg.by_repo_id(repo)
    assert ckpt is not None
    assert ckpt.end_id == end_id
    assert ckpt.repo_id.lower() == repo.lower()
    match = reg.match(parse_config(_hf_config("yi-34b")), repo)
    assert match.how == "repo id"
    assert match.checkpoint is ckpt
    assert match.candidates == (ckpt,)


def test_unknown_repo_id_is_none():
    assert load_registry().by_repo_id("01-ai/Yi-42B") is None


def test_shape_match_narrows_to_the_one_repo():
    cfg = parse_config(_hf_config("yi-9b", context=16384, rope_theta=5e6))
    match = load_registry().match(cfg)
    assert match.how == "shape"
    assert match.checkpoint is not None
    assert match.checkpoint.repo_id == "01-ai/Yi-1.5-9B-Chat-16K"
    assert [c.repo_id for c in match.candidates] == ["01-ai/Yi-1.5-9B-Chat-16K"]
    assert match.shape == "yi-9b"


def test_ambiguous_shape_returns_candidates_without_a_checkpoint():
    # Yi-1.5-9B and Yi-1.5-9B-Chat share dims, context 4096 and rope 5e6 (Yi-9B has rope 1e4)
    cfg = parse_config(_hf_config("yi-9b", context=4096, rope_theta=5e6))
    match = load_registry().match(cfg)
    assert match.how == "shape"
    assert match.checkpoint is None
    assert {c.repo_id for c in match.candidates} == {"01-ai/Yi-1.5-9B", "01-ai/Yi-1.5-9B-Chat"}
    assert match.shape == "yi-9b"


def test_non_yi_shape_matches_nothing():
    # SmolLM2-135M-like Llama: hidden 576, 30 layers, 9 heads, 3 KV heads
    raw = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
    }
    match = load_registry().match(parse_config(raw))
    assert match.how == "none"
    assert match.checkpoint is None
    assert match.candidates == ()
    assert match.shape is None


def test_yi_shape_with_other_vocab_is_not_yi():
    cfg = parse_config(_hf_config("yi-6b", vocab_size=32000))
    assert load_registry().match(cfg).how == "none"


def test_pitfalls_with_triggers():
    pitfalls = load_registry().pitfalls
    triggered = {p.id: p.trigger for p in pitfalls.values() if p.trigger}
    assert {"kv_cache": "int8"} in triggered.values()
    assert {"pp": 2} in triggered.values()
    assert "sq-per-tensor-broken" in pitfalls  # reported, but no yitrt scheme is per-tensor SmoothQuant
    for pitfall in pitfalls.values():
        assert pitfall.text and pitfall.source
    reg = load_registry()
    assert {"kv_cache": "int8"} in [p.trigger for p in reg.by_repo_id("01-ai/Yi-6B").pitfalls]
    assert {"pp": 2} in [p.trigger for p in reg.by_repo_id("01-ai/Yi-34B-Chat").pitfalls]


def test_pitfall_triggers_name_real_choices():
    from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES

    valid = {"scheme": set(SCHEMES), "kv_cache": set(KV_CACHE_FORMATS)}
    for pitfall in load_registry().pitfalls.values():
        for key, value in pitfall.trigger.items():
            assert key in ("pp", "kv_cache", "scheme"), pitfall.id
            if key == "pp":
                assert isinstance(value, int) and value > 1
            else:
                assert value in valid[key], f"{pitfall.id}: {key}={value!r}"


# ---- describe_model ---------------------------------------------------------------------------------------

def test_describe_yi_34b_kv_bytes(tmp_path):
    report = describe_model(_folder(tmp_path, _hf_config("yi-34b")))
    kv = report.kv_bytes_per_token()
    # 2 (K,V) × 60 layers × 8 KV heads × 128 × 2 bytes = 245,760 (yi-models.md §6: 240 KiB)
    assert kv["fp16"][1] == 245_760 == 240 * 1024
    assert kv["fp16"][2] == 122_880  # 4 KV heads per rank
    assert kv["fp16"][8] == 2 * 60 * 1 * 128 * 2
    for tp, nbytes in kv["fp16"].items():
        assert kv["fp8"][tp] * 2 == nbytes
    assert set(kv["fp16"]) == set(report.valid_tp)


def test_describe_yi_6b_kv_bytes_with_duplicated_heads(tmp_path):
    report = describe_model(_folder(tmp_path, _hf_config("yi-6b")))
    kv = report.kv_bytes_per_token()["fp16"]
    assert kv[1] == 2 * 32 * 4 * 128 * 2 == 64 * 1024  # §6: 64 KiB
    assert kv[4] == 2 * 32 * 1 * 128 * 2
    assert kv[8] == 16_384  # one (duplicated) KV head per rank, not 4/8
    assert kv[16] == 16_384


def test_describe_yi_6b_valid_tp(tmp_path):
    # heads 32 → tp ∈ {1,2,4,8,16}; kv 4: tp ≤ 4 must divide 4 ({1,2,4}), tp > 4 must be a multiple of 4 ({8,12,16});
    # inter 11008 = 2^8·43 → divisible by 1,2,4,8,16. Intersection over 1..16: [1, 2, 4, 8, 16].
    report = describe_model(_folder(tmp_path, _hf_config("yi-6b")))
    assert report.valid_tp == [1, 2, 4, 8, 16]
    assert set(report.invalid_tp) == set(range(1, 17)) - {1, 2, 4, 8, 16}
    assert "head" in report.invalid_tp[3][0]
    # tp 12 divides neither 32 heads nor 11008 (but is a multiple of the 4 KV heads)
    assert any("32 attention heads" in p for p in report.invalid_tp[12])
    assert any("11008" in p for p in report.invalid_tp[12])
    assert not any("KV" in p for p in report.invalid_tp[12])
    # tp 6 (> 4 KV heads, not a multiple of 4) is refused for the KV-head rule too
    assert any("KV" in p for p in report.invalid_tp[6])
    assert report.to_json()["kv_head_duplication"] == {"8": 2, "16": 4}


def test_describe_yi_34b_valid_tp_and_pp(tmp_path):
    # heads 56 = 2^3·7 → divisors ≤ 16: 1,2,4,7,8,14; kv 8: tp ≤ 8 must divide 8 (drops 7), tp > 8 must be a
    # multiple of 8 (drops 14); inter 20480 = 2^12·5 → 1,2,4,8 fine. Valid: [1, 2, 4, 8].
    report = describe_model(_folder(tmp_path, _hf_config("yi-34b")))
    assert report.valid_tp == [1, 2, 4, 8]
    assert any("KV" in p for p in report.invalid_tp[7])
    assert not any("attention heads" in p for p in report.invalid_tp[7])
    assert any("KV" in p for p in report.invalid_tp[14])
    assert any("56 attention heads" in p for p in report.invalid_tp[16])
    assert any("56 attention heads" in p for p in report.invalid_tp[3])
    # 60 layers: divisors among 1..8 are 1,2,3,4,5,6
    assert report.valid_pp == [1, 2, 3, 4, 5, 6]
    assert set(report.invalid_pp) == {7, 8}
    assert "60 layers" in report.invalid_pp[7][0]


def test_describe_yi_34b_weight_bytes_and_params(tmp_path):
    report = describe_model(_folder(tmp_path, _hf_config("yi-34b")))
    assert report.params == 34_388_917_248
    wb = report.weight_bytes()
    assert wb["bf16"] == 68_777_834_496 == 2 * 34_388_917_248
    # fp8: decoder linears 1 byte, embedding + lm_head + norms 2 bytes
    embed = 2 * 64000 * 7168
    norms = 60 * 2 * 7168 + 7168
    linear = 34_388_917_248 - embed - norms
    assert wb["fp8"] == linear + 2 * (embed + norms)
    assert wb["int8"] == wb["fp8"]
    assert wb["fp8"] < wb["bf16"]


def test_describe_local_yi_34b_config_is_ambiguous(tmp_path):
    # Yi-34B, Yi-34B-Chat, Yi-1.5-34B and Yi-1.5-34B-Chat all have these dims, 4096 context and rope 5e6
    report = describe_model(_folder(tmp_path, _hf_config("yi-34b")))
    assert report.match.checkpoint is None
    assert {c.repo_id for c in report.match.candidates} == {
        "01-ai/Yi-34B", "01-ai/Yi-34B-Chat", "01-ai/Yi-1.5-34B", "01-ai/Yi-1.5-34B-Chat",
    }
    assert report.chat_end_id == 2  # from config.json, nothing better known
    assert report.chat_end_source == "config.json"
    data = report.to_json()
    assert data["yi"]["matched_by"] == "shape"
    assert data["kv_bytes_per_token"]["fp16"]["1"] == 245_760
    # pitfalls common to every candidate only
    common = {"short-context", "rope-base"}
    assert {p["id"] for p in data["pitfalls"]} == common


def test_describe_with_repo_id_uses_registry_end_id(tmp_path):
    report = describe_model(_folder(tmp_path, _hf_config("yi-34b")), repo_id="01-ai/Yi-34B-Chat")
    assert report.chat_end_id == 7
    assert "01-ai/Yi-34B-Chat" in report.chat_end_source
    assert {p.id for p in report.pitfalls()} >= {"chat-end-id", "pp2-garbage-34b-chat"}


def test_describe_chat_template_eos_from_tokenizer(tmp_path):
    # Yi-1.5-Chat style: config eos 2, tokenizer eos <|im_end|> and a chat template (yi-models.md §3)
    folder = _folder(
        tmp_path,
        _hf_config("yi-34b", context=4096),
        tokenizer_config={
            "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            "added_tokens_decoder": {
                "2": {"content": "<|endoftext|>", "special": True},
                "7": {"content": "<|im_end|>", "special": True},
            },
        },
    )
    report = describe_model(folder)
    assert report.chat_end_id == 7


def test_describe_local_yi_34b_chat_folder_ends_on_im_end(tmp_path):
    # Official Yi-34B-Chat files (yi-models.md §3 (d), §1.2): config eos 2, special_tokens_map/tokenizer eos
    # <|endoftext|>, a ChatML chat template in tokenizer_config, generation_config eos 7.
    folder = _folder(
        tmp_path,
        _hf_config("yi-34b", context=4096),
        tokenizer_config={
            "eos_token": "<|endoftext|>",
            "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            "added_tokens_decoder": {
                "2": {"content": "<|endoftext|>", "special": True},
                "6": {"content": "<|im_start|>", "special": True},
                "7": {"content": "<|im_end|>", "special": True},
            },
        },
        generation_config={"bos_token_id": 6, "eos_token_id": 7, "pad_token_id": 0},
    )
    assert describe_model(folder).chat_end_id == 7


def test_describe_generation_config_eos(tmp_path):
    folder = _folder(tmp_path, _hf_config("yi-34b", context=8192), generation_config={"eos_token_id": [7, 2]})
    report = describe_model(folder)
    assert report.chat_end_id == 7
    assert report.chat_end_source == "generation_config.json"
