"""`yitrt lora convert` and TensorRT-LLM's LoRA request format, proven against PEFT on tiny models made here.

The base is a random 3-layer Llama (hidden 64, 4 heads, 2 KV heads, head_dim 16, intermediate 128); adapters are
made by PEFT itself (``get_peft_model``) with B randomised (PEFT starts B at zero, which would make every delta
zero and every comparison vacuous) and saved with ``save_pretrained``. The source of truth of each module's
update is PEFT's own ``get_delta_weight`` (scale included), and the oracle of what a TP rank must compute is
yitrt's base-weight sharding rule (``yitrt.checkpoint.sharding.shard``) applied to that full ΔW.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from yitrt.checkpoint.sharding import shard  # noqa: E402
from yitrt.errors import LoraError  # noqa: E402
from yitrt.lora import CONFIG_NAME, HF_DIR, WEIGHTS_NAME  # noqa: E402
from yitrt.lora.convert import convert_adapter, read_converted  # noqa: E402
from yitrt.lora.format import pack, rank_slice, round_bf16, unpack  # noqa: E402
from yitrt.lora.modules import LORA_MODULES, by_hf, by_id, by_trtllm  # noqa: E402
from yitrt.models.config import load_config  # noqa: E402
from yitrt.models.llama import LLAMA_TENSORS, ResolvedPart, ResolvedTensor  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 3


# -- fixtures ---------------------------------------------------------------------------------------------------------


def _llama(seed: int = 0, layers: int = LAYERS, hidden: int = 64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, num_hidden_layers=layers,
        intermediate_size=128, vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _save_base(folder: Path, dtype=torch.float32, **kw) -> Path:
    model = _llama(**kw).to(dtype)
    model.save_pretrained(folder)
    return folder


def _make_adapter(base: Path, folder: Path, seed: int, **lora_kwargs):
    """A PEFT adapter over the base in ``base`` (B randomised), saved; returns (folder, {(layer, hf): ΔW})."""
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, "lora_dropout": 0.0, **lora_kwargs})
    pm = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in pm.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_B:
            with torch.no_grad():
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=gen) * 0.2)
                module.lora_A["default"].weight.copy_(torch.randn(module.lora_A["default"].weight.shape, generator=gen) * 0.2)
            parts = name.split(".")
            if "layers" in parts:  # (lm_head / embed_tokens adapters are for refusal tests only)
                layer = int(parts[parts.index("layers") + 1])
                deltas[(layer, parts[-1])] = module.get_delta_weight("default").detach().float().numpy()
    pm.save_pretrained(folder)
    return folder, deltas


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def base_hf(work) -> Path:
    return _save_base(work / "base")


@pytest.fixture(scope="module")
def cfg(base_hf):
    return load_config(base_hf)


@pytest.fixture(scope="module")
def checkpoints(work, base_hf) -> dict[int, Path]:
    """float32 TensorRT-LLM checkpoints of the base at tp 1, 2, 4 (the engine's dtype and tp come from them)."""
    from yitrt.checkpoint.convert import ConvertRequest, convert

    out = {}
    for tp in (1, 2, 4):
        out[tp] = work / f"ckpt-tp{tp}"
        convert(ConvertRequest(model_dir=base_hf, out=out[tp], dtype="float32", tp=tp))
    return out


@pytest.fixture(scope="module")
def adapter_r4(work, base_hf):
    return _make_adapter(base_hf, work / "ad-r4", seed=1, r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def adapter_r16(work, base_hf):
    return _make_adapter(base_hf, work / "ad-r16", seed=2, r=16, lora_alpha=8)


@pytest.fixture(scope="module")
def adapter_rslora(work, base_hf):
    return _make_adapter(base_hf, work / "ad-rslora", seed=3, r=16, lora_alpha=8, use_rslora=True)


@pytest.fixture(scope="module")
def adapter_patterns(work, base_hf):
    return _make_adapter(base_hf, work / "ad-patterns", seed=4, r=4, lora_alpha=8,
                         rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 32, "up_proj": 3})


def _copy_adapter(src: Path, dst: Path, edit_config=None, edit_tensors=None) -> Path:
    """A hand-edited copy of a saved adapter (for refusals PEFT itself would not produce)."""
    from safetensors.numpy import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


# -- the oracle -------------------------------------------------------------------------------------------------------


def _rule(module):
    return next(r for r in LLAMA_TENSORS if r.target == f"transformer.layers.{{i}}.{module.target}.weight")


def _oracle_pieces(cfg, module, deltas, layer, tp):
    """Each TP rank's piece of the full ΔW of this module's base tensor, cut by the base weights' sharding rule.

    For attention.qkv the piece is q, k, v (those the adapter lacks are zero, as TensorRT-LLM zero-fills them)."""
    rule = _rule(module)
    parts, full = [], {}
    for source in rule.sources:
        hf = source.name.split(".")[-2]
        shape = (cfg.q_size if source.shape[0] == "q" else cfg.kv_size if source.shape[0] == "kv" else
                 cfg.hidden_size if source.shape[0] == "hidden" else cfg.intermediate_size,
                 cfg.hidden_size if source.shape[1] == "hidden" else cfg.q_size if source.shape[1] == "q" else cfg.intermediate_size)
        full[hf] = torch.from_numpy(deltas.get((layer, hf), np.zeros(shape, np.float32)))
        parts.append(ResolvedPart(hf, shape, source.role))
    tensor = ResolvedTensor(rule, rule.target, layer, tuple(parts))

    def read(name, rows=None):
        return full[name] if rows is None else full[name][rows[0] : rows[1]]

    return [p.numpy() for p in shard(cfg, tensor, tp, read)]


def _local_products(unpacked, cfg, module, layer, tp, tp_rank):
    """What rank ``tp_rank`` adds to the module's base tensor, from the converted arrays: B_l @ A_l per part."""
    rule = _rule(module)
    blocks = []
    for source in rule.sources:
        part = by_hf(source.name.split(".")[-2])
        if (layer, part.trtllm) in unpacked:
            a, b = unpacked[(layer, part.trtllm)]
            a_l, b_l = rank_slice(part, a, b, tp, tp_rank)
            blocks.append(b_l @ a_l)
        else:  # a q/k/v part the adapter lacks: zero rows of this rank's size
            rows = part.out_dim(cfg, tp) // tp
            blocks.append(np.zeros((rows, part.in_dim(cfg, tp)), np.float32))
    return np.concatenate(blocks)


def _check_roundtrip(out: Path, cfg, deltas, tp: int, rtol=1e-5, atol=1e-6):
    converted = read_converted(out)
    unpacked = unpack(converted.weights, converted.config, cfg, tp=tp, max_lora_rank=converted.max_rank,
                      engine_dtype=converted.dtype)
    assert {(layer, by_hf(hf).trtllm) for layer, hf in deltas} == set(unpacked)
    checked = 0
    for layer in range(cfg.num_layers):
        for module in {by_hf(hf) for (lay, hf) in deltas if lay == layer}:
            expected = _oracle_pieces(cfg, module, deltas, layer, tp)
            for tp_rank in range(tp):
                got = _local_products(unpacked, cfg, module, layer, tp, tp_rank)
                assert got.shape == expected[tp_rank].shape
                np.testing.assert_allclose(got, expected[tp_rank], rtol=rtol, atol=atol,
                                           err_msg=f"layer {layer} {module.trtllm} tp {tp} rank {tp_rank}")
                checked += 1
    assert checked > 0
    return converted, unpacked


# -- the module table -------------------------------------------------------------------------------------------------


def test_module_table_names_ids_and_the_fc_gate_swap():
    table = {m.hf: (m.trtllm, m.module_id, m.target, m.split) for m in LORA_MODULES}
    assert table == {
        "q_proj": ("attn_q", 1, "attention.qkv", "column"), "k_proj": ("attn_k", 2, "attention.qkv", "column"),
        "v_proj": ("attn_v", 3, "attention.qkv", "column"), "o_proj": ("attn_dense", 4, "attention.dense", "row"),
        "gate_proj": ("mlp_h_to_4h", 5, "mlp.fc", "column"), "down_proj": ("mlp_4h_to_h", 6, "mlp.proj", "row"),
        "up_proj": ("mlp_gate", 7, "mlp.gate", "column"),
    }
    assert by_trtllm("mlp_gate").hf == "up_proj" and by_id(5).hf == "gate_proj" and by_id(0) is None and by_hf("qkv_proj") is None


def test_module_dims_follow_the_runtime_including_repeated_kv_heads(cfg):
    k, q, down = by_hf("k_proj"), by_hf("q_proj"), by_hf("down_proj")
    assert (k.in_dim(cfg, 1), k.out_dim(cfg, 1), k.out_dim(cfg, 2)) == (64, 32, 32)
    assert k.out_dim(cfg, 4) == 4 * 16  # 1 KV head per rank × tp 4 × head_dim (trtllm-serving-features.md §2.6)
    assert q.out_dim(cfg, 4) == 64 and (down.in_dim(cfg, 4), down.out_dim(cfg, 4)) == (128, 64)


# -- round trips ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("which", ["adapter_r4", "adapter_r16"])
def test_roundtrip_every_rank_computes_the_sharded_peft_delta(request, work, cfg, checkpoints, tp, which):
    folder, deltas = request.getfixturevalue(which)
    out = convert_adapter(folder, checkpoints[tp], work / f"out-{which}-tp{tp}")
    converted, unpacked = _check_roundtrip(out, cfg, deltas, tp)
    rank = 4 if which == "adapter_r4" else 16
    info = converted.info
    assert info["tp"] == tp and info["dtype"] == "float32" and converted.weights.dtype == np.float32
    assert info["r"] == rank and info["max_rank"] == rank and info["rows"] == LAYERS * 7
    assert info["module_ids"] == [1, 2, 3, 4, 5, 6, 7] and info["hf_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert info["kv_heads_repeated"] is (tp == 4)
    rows = converted.config[0].tolist()
    assert rows == sorted(rows, key=lambda r: (r[1], r[0]))  # layers ascending, then module id
    assert all(r[2] == rank for r in rows)
    # B rows as the runtime sizes them at this tp: k/v repeated per KV head at tp 4 > 2 KV heads
    a, b = unpacked[(0, "attn_k")]
    assert a.shape == (rank, 64) and b.shape == ((64 if tp == 4 else 32), rank)
    width = max(rank * (m.in_dim(cfg, tp) + m.out_dim(cfg, tp)) for m in LORA_MODULES)
    assert converted.weights.shape == (1, LAYERS * 7, width) and converted.config.shape == (1, LAYERS * 7, 3)


def test_repeated_kv_rows_are_the_heads_each_rank_holds_in_the_base_checkpoint(work, cfg, checkpoints, adapter_r4):
    """At tp 4 with 2 KV heads rank r holds KV head r·2//4 in the checkpoint; the converted B chunk of rank r must be
    that head's rows of the adapter's B (scaled)."""
    from safetensors.numpy import load_file

    folder, _ = adapter_r4
    out = convert_adapter(folder, checkpoints[4], work / "out-kv")
    unpacked = unpack(*(lambda c: (c.weights, c.config))(read_converted(out)), cfg, tp=4)
    tensors = load_file(folder / "adapter_model.safetensors")
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] * (8 / 4)
    for tp_rank in range(4):
        _, b_local = rank_slice(by_hf("v_proj"), *unpacked[(1, "attn_v")], 4, tp_rank)
        head = tp_rank * 2 // 4
        np.testing.assert_allclose(b_local, b[head * 16 : (head + 1) * 16], rtol=1e-6)


def test_rslora_scales_by_alpha_over_sqrt_r(work, cfg, checkpoints, adapter_rslora, adapter_r16):
    folder, deltas = adapter_rslora
    out = convert_adapter(folder, checkpoints[2], work / "out-rslora")
    converted, unpacked = _check_roundtrip(out, cfg, deltas, 2)
    assert converted.info["rslora"] is True
    from safetensors.numpy import load_file

    b = load_file(folder / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_allclose(unpacked[(0, "attn_q")][1], b * (8 / math.sqrt(16)), rtol=1e-6)  # not 8/16


def test_rank_and_alpha_patterns_apply_per_module(work, cfg, checkpoints, adapter_patterns):
    folder, deltas = adapter_patterns
    out = convert_adapter(folder, checkpoints[1], work / "out-patterns")
    converted, unpacked = _check_roundtrip(out, cfg, deltas, 1)
    ranks = {(layer, module_id): r for module_id, layer, r in converted.config[0].tolist()}
    assert ranks[(0, 1)] == 8 and ranks[(2, 1)] == 8  # q_proj: rank_pattern
    assert ranks[(1, 6)] == 2 and ranks[(0, 6)] == 4  # layers.1.mlp.down_proj only
    assert converted.info["max_rank"] == 8 and converted.info["ranks"]["attn_q"] == [8]
    assert converted.info["ranks"]["mlp_4h_to_h"] == [2, 4]


def test_bfloat16_base_stores_bf16_values_in_float32(work, adapter_r4):
    base = _save_base(work / "base-bf16", dtype=torch.bfloat16)
    folder, deltas = adapter_r4
    out = convert_adapter(folder, base, work / "out-bf16")  # the engine dtype defaults to the base's
    converted = read_converted(out)
    assert converted.dtype == "bfloat16" and converted.weights.dtype == np.float32
    assert not np.any(converted.weights.view(np.uint32) & 0xFFFF)  # every value is a bf16 value
    cfg = load_config(base)
    unpacked = unpack(converted.weights, converted.config, cfg, engine_dtype="bfloat16")
    a, b = unpacked[(2, "mlp_gate")]
    np.testing.assert_allclose(b @ a, deltas[(2, "up_proj")], rtol=0.05, atol=0.02 * np.abs(deltas[(2, "up_proj")]).max())
    with pytest.raises(LoraError, match="Expected lora weights to be the same data type as base model"):
        unpack(converted.weights.astype(np.float16), converted.config, cfg, engine_dtype="bfloat16")


def test_hf_float32_base_defaults_to_float16_like_yitrt_convert(work, base_hf, adapter_r4):
    out = convert_adapter(adapter_r4[0], base_hf, work / "out-fp16")
    converted = read_converted(out)
    assert converted.dtype == "float16" and converted.weights.dtype == np.float16
    assert converted.info["tp"] == 1 and converted.info["base_kind"] == "hf"


def test_outputs_hf_copy_and_manifest(work, checkpoints, adapter_r4):
    folder, _ = adapter_r4
    out = convert_adapter(folder, checkpoints[1], work / "out-files")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == sorted([WEIGHTS_NAME, CONFIG_NAME, f"{HF_DIR}/adapter_config.json", f"{HF_DIR}/adapter_model.safetensors", "yitrt-manifest.json"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / HF_DIR / name).read_bytes() == (folder / name).read_bytes()
    manifest = json.loads((out / "yitrt-manifest.json").read_text())
    assert manifest["stage"] == "lora-convert"
    extra = manifest["extra"]
    for key in ("adapter_name", "adapter_source", "base_fingerprint", "r", "alpha", "rslora", "hf_modules", "trtllm_modules",
                "module_ids", "dtype", "tp", "rows", "max_row_len"):
        assert key in extra, key
    assert extra["alpha"] == 8 and extra["trtllm_modules"] == ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]
    assert np.load(out / CONFIG_NAME).dtype == np.int32
    mtime = (out / WEIGHTS_NAME).stat().st_mtime_ns
    convert_adapter(folder, checkpoints[1], out)  # identical inputs: reused, not rewritten
    assert (out / WEIGHTS_NAME).stat().st_mtime_ns == mtime


def test_pickle_only_with_allow_pickle(work, checkpoints, adapter_r4, cfg):
    from safetensors.torch import load_file

    folder, deltas = adapter_r4
    pickled = work / "ad-pickle"
    pickled.mkdir(exist_ok=True)
    shutil.copy(folder / "adapter_config.json", pickled)
    torch.save(load_file(folder / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(LoraError, match="--allow-pickle"):
        convert_adapter(pickled, checkpoints[1], work / "out-pickle")
    assert not (work / "out-pickle").exists()
    out = convert_adapter(pickled, checkpoints[1], work / "out-pickle", allow_pickle=True)
    _check_roundtrip(out, cfg, deltas, 1)
    assert sorted(p.name for p in (out / HF_DIR).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# -- refusals ---------------------------------------------------------------------------------------------------------


def _refusal(*args, **kwargs) -> str:
    with pytest.raises(LoraError) as info:
        convert_adapter(*args, **kwargs)
    assert "\n" not in info.value.message
    return info.value.message


def test_rank_above_max_lora_rank(work, checkpoints, adapter_r16):
    message = _refusal(adapter_r16[0], checkpoints[1], work / "never", max_lora_rank=8)
    assert "ranks above --max-lora-rank 8" in message and "q_proj (rank 16)" in message and "--max_lora_rank 16 or more" in message
    assert message.count("max-lora-rank") == 1  # one line for every module and layer
    assert not (work / "never").exists()


def test_dtype_other_than_the_engines(work, checkpoints, adapter_r4):
    message = _refusal(adapter_r4[0], checkpoints[1], work / "never", dtype="float16")
    assert "--dtype float16 differs from the engine's dtype float32" in message and "give --dtype float32" in message


def test_modules_outside_the_builds_target_modules(work, checkpoints, adapter_r4):
    message = _refusal(adapter_r4[0], checkpoints[1], work / "never", target_modules="attn_q,attn_v,attn_dense")
    for hf in ("k_proj (attn_k)", "gate_proj (mlp_h_to_4h)", "up_proj (mlp_gate)", "down_proj (mlp_4h_to_h)"):
        assert hf in message
    assert "q_proj (attn_q)" not in message
    assert "unknown module 'bogus'" in _refusal(adapter_r4[0], checkpoints[1], work / "never", target_modules="attn_q,bogus")


def test_tp_other_than_the_checkpoints(work, checkpoints, adapter_r4):
    assert "--tp 2 differs from the base checkpoint's tp 4" in _refusal(adapter_r4[0], checkpoints[4], work / "never", tp=2)


def test_base_with_another_hidden_size(work, adapter_r4):
    base = _save_base(work / "base-wide", hidden=128)
    message = _refusal(adapter_r4[0], base, work / "never")
    assert "q_proj: lora_A is [4, 64], the base model's q_proj takes 128 inputs" in message
    assert "down_proj: lora_B is [64, 4], the base model's down_proj has 128 outputs" in message


def test_base_with_fewer_layers(work, adapter_r4):
    base = _save_base(work / "base-short", layers=2)
    message = _refusal(adapter_r4[0], base, work / "never")
    assert "the adapter has layer 2 but the base model has 2 layers" in message


def test_missing_r_and_alpha_both_reported(work, checkpoints, adapter_r4):
    def drop(config):
        del config["r"], config["lora_alpha"]

    bad = _copy_adapter(adapter_r4[0], work / "ad-no-r", edit_config=drop)
    message = _refusal(bad, checkpoints[1], work / "never")
    assert "2 problems" in message and "no 'r'" in message and "no 'lora_alpha'" in message


@pytest.mark.parametrize("key, value, expect", [
    ("lora_alpha", "x", "'lora_alpha' is 'x', not a positive number"),
    ("lora_alpha", None, "'lora_alpha' is None, not a positive number"),
    ("r", -3, "'r' is -3, not a positive integer"),
    ("r", "4", "'r' is '4', not a positive integer"),
    ("rank_pattern", [1], "'rank_pattern' is [1], not a mapping"),
    ("alpha_pattern", {"q_proj": "big"}, "'alpha_pattern' is {'q_proj': 'big'}, not a mapping"),
    ("use_rslora", "yes", "'use_rslora' is 'yes', not true or false"),
])
def test_mistyped_config_values_are_refused_not_crashed_on(work, checkpoints, adapter_r4, key, value, expect):
    """A value of the wrong type in adapter_config.json is a refusal naming it (exit 17), never an internal error: the
    tensors are then checked without reading it."""
    bad = _copy_adapter(adapter_r4[0], work / f"ad-typed-{key}", edit_config=lambda config: config.__setitem__(key, value))
    assert expect in _refusal(bad, checkpoints[1], work / "never")
    assert not (work / "never").exists()


def test_weights_overflowing_the_engine_dtype_are_refused(work, base_hf, adapter_r4):
    """Finite PEFT weights whose scaled B exceeds float16 would be sent as Inf: refused, nothing written."""
    def huge(tensors):
        name = next(n for n in tensors if "lora_B" in n)
        tensors[name] = np.full_like(tensors[name], 6e4)  # × alpha/r = 2 → 1.2e5 > float16's 65504

    bad = _copy_adapter(adapter_r4[0], work / "ad-huge", edit_tensors=huge)
    assert "overflow float16" in _refusal(bad, base_hf, work / "never")  # an fp32 HF base converts to a float16 engine
    assert not (work / "never").exists()


@pytest.mark.parametrize("edit, expect", [
    (lambda c: c.__setitem__("rank_pattern", {"q_proj(": 4}), "'rank_pattern' key 'q_proj(' is not a valid pattern"),
    (lambda c: c.__setitem__("alpha_pattern", {"[": 2}), "'alpha_pattern' key '[' is not a valid pattern"),
    (lambda c: c.__setitem__("lora_alpha", 0), "'lora_alpha' is 0, not a positive number"),
    (lambda c: c.__setitem__("lora_alpha", -8), "'lora_alpha' is -8, not a positive number"),
    (lambda c: c.__setitem__("init_lora_weights", "loftq"), "init_lora_weights 'loftq' rewrote the base model's weights"),
])
def test_config_values_peft_reads_as_patterns_or_scales_are_checked(work, checkpoints, adapter_r4, edit, expect):
    """rank/alpha pattern keys are regular expressions (a broken one is refused, not re.error), alpha must be positive,
    and LoftQ (like PiSSA) only fits the base it rewrote."""
    bad = _copy_adapter(adapter_r4[0], work / "ad-cfg-edit", edit_config=edit)
    assert expect in _refusal(bad, checkpoints[1], work / "never")


def test_odd_tensor_names_are_refused_not_crashed_on_or_merged(work, checkpoints, adapter_r4):
    """A layer number of thousands of digits is an unknown tensor (never int()'s digit limit), and two tensors naming
    one module's lora_B under different prefixes are refused (neither silently wins)."""
    def add(tensors):
        some = next(n for n in tensors if n.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
        tensors["base_model.model.model.layers." + "9" * 5000 + ".self_attn.q_proj.lora_A.weight"] = tensors[some][:1]
        tensors["zzz.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.full_like(tensors[some], 7.0)

    message = _refusal(_copy_adapter(adapter_r4[0], work / "ad-odd-names", edit_tensors=add), checkpoints[1], work / "never")
    assert "is not a LoRA A/B weight of a decoder layer" in message
    assert "two tensors for q_proj lora_B" in message


def test_unknown_and_fused_modules_refused_by_name(work, checkpoints, adapter_r4):
    def add(tensors):
        tensors["base_model.model.model.layers.0.self_attn.rotary_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
        tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = np.zeros((4, 64), np.float32)
        tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] = np.zeros((128, 4), np.float32)

    bad = _copy_adapter(adapter_r4[0], work / "ad-unknown", edit_tensors=add)
    message = _refusal(bad, checkpoints[1], work / "never")
    assert "unknown module self_attn.rotary_proj" in message and "fused qkv_proj" in message


def test_lm_head_embed_tokens_and_modules_to_save_refused(work, base_hf, checkpoints):
    folder, _ = _make_adapter(base_hf, work / "ad-head", seed=5, target_modules=["q_proj", "lm_head"], modules_to_save=["embed_tokens"])
    message = _refusal(folder, checkpoints[1], work / "never")
    assert "modules_to_save" in message and "embed_tokens" in message and "lm_head" in message
    folder, _ = _make_adapter(base_hf, work / "ad-emb", seed=6, target_modules=["q_proj", "embed_tokens"])
    assert "embedding LoRA (lora_embedding_A/B)" in _refusal(folder, checkpoints[1], work / "never")


def test_dora_refused(work, base_hf, checkpoints):
    folder, _ = _make_adapter(base_hf, work / "ad-dora", seed=7, use_dora=True, target_modules=["q_proj", "v_proj"])
    message = _refusal(folder, checkpoints[1], work / "never")
    assert "use_dora" in message and "DoRA magnitude vectors" in message


def test_fan_in_fan_out_and_bias_refused(work, checkpoints, adapter_r4):
    def edit(config):
        config["fan_in_fan_out"] = True
        config["bias"] = "all"

    message = _refusal(_copy_adapter(adapter_r4[0], work / "ad-fifo", edit_config=edit), checkpoints[1], work / "never")
    assert "fan_in_fan_out" in message and "bias 'all'" in message


def test_config_rank_disagreeing_with_tensors(work, checkpoints, adapter_r4):
    bad = _copy_adapter(adapter_r4[0], work / "ad-r-lie", edit_config=lambda c: c.update(r=8))
    assert "the tensors have rank 4, adapter_config.json says 8" in _refusal(bad, checkpoints[1], work / "never")


def test_every_problem_in_one_message(work, checkpoints, adapter_r16):
    message = _refusal(adapter_r16[0], checkpoints[1], work / "never", dtype="bfloat16", max_lora_rank=8, target_modules="attn_q")
    assert message.count(";") >= 2 and "dtype" in message and "max-lora-rank" in message and "attn_k" in message


# -- atomicity and the CLI --------------------------------------------------------------------------------------------


def test_failed_convert_leaves_a_previous_good_output_intact(work, checkpoints, adapter_r4, monkeypatch):
    folder, _ = adapter_r4
    out = convert_adapter(folder, checkpoints[1], work / "out-atomic")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _refusal(folder, checkpoints[1], out, dtype="float16", force=True)  # refused in validation
    import yitrt.lora.convert as lora_convert

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_convert.np, "save", boom)  # fails while writing, after validation
    from yitrt.errors import ArtifactError

    with pytest.raises(ArtifactError):
        convert_adapter(folder, checkpoints[1], out, force=True)
    monkeypatch.undo()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith("out-atomic")] == ["out-atomic"]


def test_cli_convert_and_refusal(cli, work, checkpoints, adapter_r4):
    folder, _ = adapter_r4
    result = cli("lora", "convert", str(folder), "--base", str(checkpoints[2]), "--out", str(work / "out-cli"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tp"] == 2 and data["rows"] == LAYERS * 7 and (work / "out-cli" / WEIGHTS_NAME).is_file()
    result = cli("lora", "convert", str(folder), "--base", str(checkpoints[2]), "--out", str(work / "out-cli-bad"), "--max-lora-rank", "2")
    assert result.returncode == LoraError.exit_code == 17
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ranks above --max-lora-rank 2" in lines[0] and not (work / "out-cli-bad").exists()


# -- the request format ----------------------------------------------------------------------------------------------


def _small_pack():
    rng = np.random.default_rng(0)
    modules = {(1, "attn_k"): (rng.normal(size=(4, 64)), rng.normal(size=(32, 4))),
               (0, "mlp_4h_to_h"): (rng.normal(size=(2, 128)), rng.normal(size=(64, 2)))}
    return modules, *pack(modules, "float32")


def test_pack_layout_is_a_then_b_row_major_zero_padded():
    modules, weights, config = _small_pack()
    assert config.tolist() == [[[6, 0, 2], [2, 1, 4]]]
    (a0, b0), (a1, b1) = modules[(0, "mlp_4h_to_h")], modules[(1, "attn_k")]
    row0 = np.concatenate([a0.ravel(), b0.ravel()])
    assert weights.shape == (1, 2, max(row0.size, a1.size + b1.size))
    np.testing.assert_allclose(weights[0, 0, : row0.size], row0.astype(np.float32))
    assert not weights[0, 0, row0.size :].any()
    np.testing.assert_allclose(weights[0, 1], np.concatenate([a1.ravel(), b1.ravel()]).astype(np.float32))


def test_round_bf16_rounds_to_nearest_even():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -3.14159], np.float32)
    np.testing.assert_array_equal(round_bf16(values), torch.tensor(values).bfloat16().float().numpy())


def test_unpack_validates_like_tensorrt_llm(cfg):
    _, weights, config = _small_pack()
    with pytest.raises(LoraError, match="lora module attn_k not enabled for this model"):
        unpack(weights, config, cfg, enabled={"mlp_4h_to_h"})
    with pytest.raises(LoraError, match="lora_weights has to few values for attn_k"):
        unpack(weights[:, :, :300], config, cfg)
    with pytest.raises(LoraError, match="Expected lora weights to be the same data type as base model"):
        unpack(weights, config, cfg, engine_dtype="float16")
    with pytest.raises(LoraError, match=r"Invalid low_rank \(4\)"):
        unpack(weights, config, cfg, max_lora_rank=2)
    bad = config.copy()
    bad[0, 0, 1] = LAYERS
    with pytest.raises(LoraError, match=r"Expected layerId to be in the range \[0, numModelLayers\)"):
        unpack(weights, bad, cfg)
    bad = config.copy()
    bad[0, 1, 0] = 0  # attn_qkv: not a Yi module
    with pytest.raises(LoraError, match="lora module attn_qkv not enabled"):
        unpack(weights, bad, cfg)
    with pytest.raises(LoraError, match="TYPE_INT32"):
        unpack(weights, config.astype(np.int64), cfg)
    with pytest.raises(LoraError, match="same size"):
        unpack(weights[:, :1], config, cfg)
    with pytest.raises(LoraError, match="batch dimension to be 1"):
        unpack(np.concatenate([weights, weights]), np.concatenate([config, config]), cfg)
    # 2-D (Triton's batch dim removed) and torch tensors are accepted
    got = unpack(torch.from_numpy(weights[0]), torch.from_numpy(config[0]), cfg, engine_dtype="float32")
    assert got[(1, "attn_k")][1].shape == (32, 4)


def test_unpack_accepts_a_checkpoint_spec(checkpoints, adapter_r4, work):
    from yitrt.reference.spec import load_spec

    spec = load_spec(checkpoints[4])
    converted = read_converted(convert_adapter(adapter_r4[0], checkpoints[4], work / "out-spec"))
    unpacked = unpack(converted.weights, converted.config, spec, tp=spec.tp, engine_dtype=spec.dtype, max_lora_rank=4)
    assert unpacked[(0, "attn_v")][1].shape == (64, 4) and len(unpacked) == LAYERS * 7


@pytest.mark.integration  # a subprocess against the Hub double (huggingface_hub reads HF_ENDPOINT at import)
def test_hub_adapter_is_fetched_without_its_pickle_and_converted(work, checkpoints, adapter_r4, tmp_path):
    import os

    from tests.conftest import run_cli
    from tests.hub_double import HubDouble

    folder, _ = adapter_r4
    repo = tmp_path / "repo"
    shutil.copytree(folder, repo)
    (repo / "adapter_model.bin").write_bytes(b"decoy pickle: must never be requested")
    local = read_converted(convert_adapter(folder, checkpoints[1], work / "out-local"))
    with HubDouble() as hub:
        sha = hub.add_repo("someone/yi-lora", repo)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()}
        env.update(hub.env(tmp_path / "hf"))
        result = run_cli("lora", "convert", "someone/yi-lora", "--base", str(checkpoints[1]), "--out", str(tmp_path / "out"), "--json", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert hub.downloaded() == {"adapter_config.json", "adapter_model.safetensors"}
    data = json.loads(result.stdout)
    assert data["adapter_name"] == "someone/yi-lora" and data["adapter_source"] == f"someone/yi-lora@{sha}"
    converted = read_converted(tmp_path / "out")
    np.testing.assert_array_equal(converted.weights, local.weights)
    np.testing.assert_array_equal(converted.config, local.config)


def test_read_converted_refuses_a_manifest_whose_facts_are_not_an_adapters(work, checkpoints, adapter_r4):
    """The manifest's own fields (dtype, tp, ranks, modules) are read by build, deploy and verify but not covered by its
    file hashes: a hand-edited one is a LoraError, never a getattr(torch, 'load') or a KeyError."""
    out = convert_adapter(adapter_r4[0], checkpoints[1], work / "conv-edited")
    path = out / "yitrt-manifest.json"
    good = path.read_text()
    for field, value in (("dtype", "load"), ("tp", "2"), ("max_rank", 0), ("trtllm_modules", ["attn_qkv_typo"])):
        data = json.loads(good)
        data["extra"][field] = value
        path.write_text(json.dumps(data))
        with pytest.raises(LoraError, match="its manifest does not describe a converted adapter"):
            read_converted(out)
    path.write_text(good)
    assert read_converted(out).dtype == "float32"
