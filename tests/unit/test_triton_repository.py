"""The Triton repository writer: every config.pbtxt parses into Triton's ModelConfig, the ensemble's wiring is
complete, the TensorRT-LLM contract per line (facts from reference/triton-repository.md and the templates), and
golden files per line. No server here (tests/integration/test_triton_server.py serves a repository for real)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from yitrt.errors import ValidationError
from yitrt.triton.contract import contract, known_lines, resolve_line
from yitrt.triton.pbtxt import parse_config
from yitrt.triton.repository import MODEL_NAMES, DeployRequest, EngineFacts, render_repository

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "triton"
TYPES = {"TYPE_STRING", "TYPE_INT32", "TYPE_FP32", "TYPE_BOOL", "TYPE_UINT64", "TYPE_INT64", "TYPE_FP16", "TYPE_BF16", "TYPE_UINT8"}


def _facts(kind: str = "trtllm", tp: int = 2, pp: int = 1, batch: int = 64) -> EngineFacts:
    return EngineFacts(kind, Path("/ENGINE"), "1.2.1", "bfloat16", "float32", tp, pp, batch, 4095, 4096,
                       {"paged_kv_cache": True, "remove_input_padding": True},
                       plan={"kv_cache_free_gpu_mem_fraction": 0.85, "max_tokens_in_paged_kv_cache": 200000})


def _render(line: str, streaming: bool = True, kind: str = "trtllm", **req) -> dict:
    texts = render_repository(DeployRequest(Path("/ENGINE"), Path("/REPO"), engine=kind, streaming=streaming, **req),
                              _facts(kind), line, 7, [2])
    return {name: parse_config(text) for name, text in texts.items()}


@pytest.mark.parametrize("line", known_lines())
@pytest.mark.parametrize("streaming", [True, False])
def test_every_config_parses_into_model_config(line, streaming):
    from tritonclient.grpc import model_config_pb2 as pb

    configs = _render(line, streaming)
    assert set(configs) == set(MODEL_NAMES)
    for name, cfg in configs.items():
        assert cfg.name == name
        assert cfg.max_batch_size == 64
        for tensor in [*cfg.input, *cfg.output]:
            assert pb.DataType.Name(tensor.data_type) in TYPES, (name, tensor.name)  # no ${...} type left unfilled
    assert configs["tensorrt_llm"].model_transaction_policy.decoupled is streaming
    assert configs["tensorrt_llm_bls"].model_transaction_policy.decoupled is streaming


@pytest.mark.parametrize("line", known_lines())
def test_ensemble_wiring_connects_every_consumed_tensor_to_a_producer(line):
    configs = _render(line)
    ensemble = configs["ensemble"]
    available = {t.name: t.data_type for t in ensemble.input}
    produced: set[str] = set()
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs, outputs = {t.name: t for t in model.input}, {t.name: t.data_type for t in model.output}
        for model_input, tensor in step.input_map.items():
            assert model_input in inputs, f"{step.model_name} has no input {model_input}"
            assert tensor in available, f"{step.model_name}.{model_input} reads {tensor}, which nothing produced before"
            # Triton refuses an ensemble whose tensor types disagree between producer and consumer
            assert available[tensor] == inputs[model_input].data_type, f"{tensor}: type differs for {step.model_name}.{model_input}"
        required = {n for n, t in inputs.items() if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name}: required inputs {required - set(step.input_map)} unmapped"
        for model_output, tensor in step.output_map.items():
            assert model_output in outputs, f"{step.model_name} has no output {model_output}"
            assert tensor not in produced, f"{tensor} produced twice"
            produced.add(tensor)
        available |= {tensor: outputs[name] for name, tensor in step.output_map.items()}
    assert {t.name for t in ensemble.output} <= produced  # every ensemble output has a producer
    assert all(available[t.name] == t.data_type for t in ensemble.output)
    # internal tensors are consumed somewhere (no dangling producer except the ensemble's own outputs)
    consumed = {v for s in ensemble.ensemble_scheduling.step for v in s.input_map.values()}
    assert {t for t in produced if t.startswith("_")} <= consumed


def _params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_tensorrt_llm_1_2_contract_facts():
    """Facts of TensorRT-LLM 1.2's tensorrt_llm / ensemble templates (reference §1.4, §1.5, §3, §6.3)."""
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = _render("1.2")
    trt = {t.name: t for t in cfg["tensorrt_llm"].input}
    assert not trt["input_lengths"].optional and not trt["request_output_len"].optional
    assert trt["input_ids"].optional and trt["input_ids"].allow_ragged_batch
    assert trt["seed"].HasField("reshape") and "random_seed" not in trt and "min_length" not in trt and "min_tokens" in trt
    assert {"return_num_input_tokens", "return_num_output_tokens", "stop", "streaming"} <= set(trt)
    params = _params(cfg["tensorrt_llm"])
    assert params["gpt_model_type"] == "inflight_fused_batching" and params["gpt_model_path"] == "/ENGINE"
    assert params["exclude_input_in_output"] == "true"
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85" and params["max_tokens_in_paged_kv_cache"] == "200000"
    assert params["executor_worker_path"] == "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
    assert params["enable_kv_cache_reuse"] == "false" and params["decoding_mode"] == "${decoding_mode}"  # unfilled stays literal
    assert params["tokenizer_dir"] == "${tokenizer_dir}"  # the C++ backend's own key (guided decoding only): not ours to fill
    assert cfg["tensorrt_llm"].backend == "tensorrtllm"
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg["tensorrt_llm"].instance_group] == [(1, "KIND_CPU")]  # GPUs via gpu_device_ids
    assert cfg["tensorrt_llm"].dynamic_batching.preferred_batch_size == [64]
    ens_inputs = {t.name: t for t in cfg["ensemble"].input}
    assert not ens_inputs["text_input"].optional and list(ens_inputs["text_input"].dims) == [1]
    assert ens_inputs["messages"].optional  # yitrt's addition stays optional
    logits = {t.name: t for t in cfg["ensemble"].output}["generation_logits"]
    assert list(logits.dims) == [-1, -1, -1]
    steps = {s.model_name: s for s in cfg["ensemble"].ensemble_scheduling.step}
    assert steps["tensorrt_llm"].input_map["streaming"] == "stream" and steps["tensorrt_llm"].input_map["runtime_top_k"] == "top_k"
    assert steps["tensorrt_llm"].output_map["output_ids"] == "_TOKENS_BATCH"
    prompt_table = {t.name: t for t in cfg["tensorrt_llm"].input}["prompt_embedding_table"]
    assert pb.DataType.Name(prompt_table.data_type) == "TYPE_FP16"  # = the ensemble's, which Triton requires


def test_version_differences_come_from_the_one_table():
    old, new = contract("0.19"), contract("1.2")
    assert old["ensemble"].input("min_length") and old["ensemble"].input("random_seed") and not old["ensemble"].input("min_tokens")
    assert not old["tensorrt_llm"].input("return_num_input_tokens") and new["tensorrt_llm"].input("return_num_input_tokens")
    step = {s.model: s for s in old["ensemble"].steps}["tensorrt_llm"]
    assert step.input_map["min_length"] == "min_length" and "min_tokens" not in step.input_map
    assert old["tensorrt_llm"].input("prompt_embedding_table").data_type == "FP16"
    assert contract("1.0")["preprocessing"].input("IMAGE_SIZES") is None and new["preprocessing"].input("IMAGE_SIZES")
    assert set(old["tensorrt_llm"].parameters) == set(new["tensorrt_llm"].parameters)  # 45 keys since 0.19
    assert len(new["tensorrt_llm"].parameters) == 45


@pytest.mark.parametrize("line", known_lines())
def test_bls_wiring_is_derived_from_the_ensemble_and_names_real_tensors(line):
    from yitrt.triton.repository import bls_wiring

    models = contract(line)
    wiring = bls_wiring(models)
    pre_inputs, bls_inputs = {t.name for t in models["preprocessing"].inputs}, {t.name for t in models["tensorrt_llm_bls"].inputs}
    pre_outputs, engine_inputs = {t.name for t in models["preprocessing"].outputs}, {t.name for t in models["tensorrt_llm"].inputs}
    assert set(wiring["yitrt_preprocessing_inputs"]) <= bls_inputs and set(wiring["yitrt_preprocessing_inputs"].values()) <= pre_inputs
    assert wiring["yitrt_preprocessing_inputs"]["messages"] == "MESSAGES"
    engine = wiring["yitrt_engine_inputs"]
    assert set(engine) <= engine_inputs
    for source, name in engine.values():
        assert name in (pre_outputs if source == "preprocessing" else bls_inputs)
    assert engine["input_ids"] == ["preprocessing", "INPUT_ID"] and engine["runtime_top_k"] == ["request", "top_k"]
    seed = "random_seed" if line == "0.19" else "seed"  # the rename reaches the BLS through the table
    assert engine[seed] == ["request", seed] and ("seed" in engine) is (line != "0.19")


def test_unknown_or_engineless_versions_are_refused():
    from yitrt.errors import UsageError

    assert resolve_line("1.2.1") == "1.2" and resolve_line(None) == "1.2"
    with pytest.raises(UsageError, match="not 1.3.0") as newer:
        resolve_line("1.3.0")
    assert "llmapi" in newer.value.hint
    with pytest.raises(UsageError, match="0.19"):
        resolve_line("0.16.0")


def test_reference_slot_has_the_same_tensors_and_says_what_it_is():
    engine = _render("1.2", kind="trtllm")["tensorrt_llm"]
    slot = _render("1.2", kind="reference")["tensorrt_llm"]
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in slot.input] == [(t.name, t.data_type, list(t.dims), t.optional) for t in engine.input]
    assert [t.name for t in slot.output] == [t.name for t in engine.output]
    assert slot.backend == "python" and "reference" in _params(slot)["yitrt_engine_slot"]


def test_options_reach_the_configs():
    cfg = _render("1.2", streaming=False, max_batch_size=16, instances=3, kv_reuse=True, kv_fraction=0.5, model_name="yi")
    assert set(cfg) == {"ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "yi"}
    assert cfg["yi"].instance_group[0].count == 3 and cfg["preprocessing"].instance_group[0].count == 3
    assert all(c.max_batch_size == 16 for c in cfg.values())
    params = _params(cfg["tensorrt_llm"])
    assert params["enable_kv_cache_reuse"] == "true" and params["kv_cache_free_gpu_mem_fraction"] == "0.5"
    assert _params(cfg["preprocessing"])["end_id"] == "7" and _params(cfg["preprocessing"])["stop_token_ids"] == "2"
    assert _params(cfg["preprocessing"])["yitrt_words_encoding"] == "with_space"
    assert _params(_render("1.2", words_encoding="stock")["preprocessing"])["yitrt_words_encoding"] == "stock"


@pytest.mark.parametrize("line", known_lines())
def test_golden_repository(line):
    texts = render_repository(DeployRequest(Path("/ENGINE"), Path("/REPO")), _facts(), line, 7, [2])
    folder = GOLDEN / line
    if os.environ.get("YITRT_UPDATE_GOLDEN") == "1":  # regenerate after a deliberate change, then review the diff
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (folder / f"{name}.pbtxt").write_text(_stable(text))
    for name, text in texts.items():
        assert _stable(text) == (folder / f"{name}.pbtxt").read_text(), f"{line}/{name}.pbtxt differs from the golden file"


def _stable(text: str) -> str:
    """Drop the version line of the header comment (it names the yitrt version)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("# Written by yitrt")) + "\n"


# -- LoRA (trtllm-serving-features.md §2.3, §2.5, §2.6) --------------------------------------------------------------

WTYPES = {"bfloat16": "TYPE_BF16", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}


def write_base(folder: Path, dtype: str = "bfloat16") -> Path:
    """A weightless tiny HF model (hidden 256, 8 heads, 2 KV heads, 4 layers) with the test tokenizer."""
    import json

    from yitrt.synthetic import SyntheticSpec, hf_config, write_tokenizer

    folder.mkdir(parents=True)
    write_tokenizer(folder, 512)
    (folder / "config.json").write_text(json.dumps(hf_config(SyntheticSpec(dtype=dtype))))
    return folder


def write_adapter(folder: Path, base: Path, modules=("q_proj", "v_proj"), r: int = 4, seed: int = 0, scale: float = 0.05) -> Path:
    """A PEFT-format LoRA adapter folder for ``base`` (random A and B of std ``scale``; what `yitrt lora convert` reads)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from yitrt.lora.modules import by_hf
    from yitrt.models.config import load_config

    cfg = load_config(base)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for hf in modules:
            m = by_hf(hf)
            key = f"base_model.model.model.layers.{layer}.{m.parent}.{hf}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, m.in_dim(cfg)), dtype=np.float32) * np.float32(scale)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((m.out_dim(cfg), r), dtype=np.float32) * np.float32(scale)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules),
                                                            "use_rslora": False, "base_model_name_or_path": str(base)}))
    return folder


def lora_engine(folder: Path, dtype: str = "bfloat16", modules=("attn_q", "attn_k", "attn_v"), max_rank: int = 8,
                plugin: bool = True) -> Path:
    """A TEST DOUBLE of an engine folder built with (or without) the LoRA plugin: config.json as a 1.2 build writes it."""
    import json

    folder.mkdir(parents=True)
    pretrained = {"architecture": "LlamaForCausalLM", "dtype": dtype, "logits_dtype": "float32", "vocab_size": 512,
                  "max_position_embeddings": 4096, "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
                  "quantization": {"quant_algo": None, "kv_cache_quant_algo": None}}
    build = {"max_batch_size": 8, "max_input_len": 2047, "max_seq_len": 2048, "max_num_tokens": 8192, "kv_cache_type": "PAGED",
             "plugin_config": {"paged_kv_cache": True, "remove_input_padding": True, "use_paged_context_fmha": True, "context_fmha": True,
                               "lora_plugin": dtype if plugin else None},
             "lora_config": {"lora_dir": [], "lora_ckpt_source": "hf", "max_lora_rank": max_rank, "lora_target_modules": list(modules)}}
    (folder / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": pretrained, "build_config": build}))
    (folder / "rank0.engine").write_bytes(b"test double: not an engine\n")
    return folder


@pytest.fixture(scope="module")
def lora_work(tmp_path_factory):
    """Tiny bases in bf16 and fp16, and per dtype two converted adapters: qv (rank 4, q and v) and mlp (rank 8, gate/up/down)."""
    from yitrt.lora.convert import convert_adapter

    root = tmp_path_factory.mktemp("lora-deploy")
    out = {}
    for dtype in ("bfloat16", "float16"):
        base = write_base(root / f"base-{dtype}", dtype)
        qv = write_adapter(root / f"peft-qv-{dtype}", base)
        mlp = write_adapter(root / f"peft-mlp-{dtype}", base, ("gate_proj", "up_proj", "down_proj"), r=8, seed=1)
        out[dtype] = {"base": base, "qv": convert_adapter(qv, base, root / f"qv-{dtype}"),
                      "mlp": convert_adapter(mlp, base, root / f"mlp-{dtype}")}
    out["root"] = root
    return out


ALL_MODULES = ("attn_q", "attn_k", "attn_v", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate")


@pytest.mark.parametrize("dtype", sorted(WTYPES))
def test_lora_weights_take_the_engine_dtype_everywhere(dtype):
    from tritonclient.grpc import model_config_pb2 as pb

    facts = dataclasses.replace(_facts(), dtype=dtype)
    configs = {name: parse_config(text) for name, text in
               render_repository(DeployRequest(Path("/ENGINE"), Path("/REPO")), facts, "1.2", 7, [2]).items()}
    for model in ("tensorrt_llm", "ensemble", "tensorrt_llm_bls"):
        tensor = {t.name: t for t in configs[model].input}["lora_weights"]
        assert pb.DataType.Name(tensor.data_type) == WTYPES[dtype], model
    assert {t.name: t for t in configs["tensorrt_llm"].input}["lora_config"].data_type == pb.TYPE_INT32


def _lora_deploy(tmp_path, work, dtype="bfloat16", engine=None, **lora):
    from yitrt.triton.lora import AdapterRequest, LoraRequest
    from yitrt.triton.repository import deploy

    engine = engine or (tmp_path / "engine" if (tmp_path / "engine").is_dir() else lora_engine(tmp_path / "engine", dtype, ALL_MODULES, 8))
    adapters = lora.pop("adapters", (AdapterRequest("qv", work[dtype]["qv"]), AdapterRequest("mlp", work[dtype]["mlp"])))
    return deploy(DeployRequest(engine, tmp_path / "repo", tokenizer=work[dtype]["base"], lora=LoraRequest(adapters, **lora)))


def test_lora_repository_holds_the_adapters_their_index_the_cache_and_the_readme(tmp_path, lora_work):
    import json

    result = _lora_deploy(tmp_path, lora_work, gpu_memory_fraction=0.1, host_memory_bytes=1 << 28, max_adapter_size=64)
    repo = result.out
    index = json.loads((repo / "lora_adapters.json").read_text())
    assert index == {"adapters": [
        {"name": "qv", "task_id": 1, "dir": "tensorrt_llm/lora/qv", "rank": 4, "modules": ["attn_q", "attn_v"], "dtype": "bfloat16"},
        {"name": "mlp", "task_id": 2, "dir": "tensorrt_llm/lora/mlp", "rank": 8, "modules": ["mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"],
         "dtype": "bfloat16"}]}
    for entry in index["adapters"]:
        for name in ("model.lora_weights.npy", "model.lora_config.npy"):  # the converted arrays, byte for byte
            assert (repo / entry["dir"] / name).read_bytes() == (lora_work["bfloat16"][entry["name"]] / name).read_bytes()
    assert not (repo / "lora").exists() and not (repo / "tensorrt_llm/lora/prefetch").exists()  # no model-like root folder
    trt = parse_config((repo / "tensorrt_llm/config.pbtxt").read_text())
    params = _params(trt)
    assert (params["lora_cache_optimal_adapter_size"], params["lora_cache_max_adapter_size"], params["lora_cache_gpu_memory_fraction"],
            params["lora_cache_host_memory_bytes"]) == ("8", "8", "0.1", str(1 << 28))  # max_adapter_size 64 clamped to the rank 8
    assert params["lora_prefetch_dir"] == "${lora_prefetch_dir}"  # no prefetch: the backend's default (none)
    assert "yitrt_max_lora_rank" not in params  # an engine knows its own
    for name in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"):
        parse_config((repo / name / "config.pbtxt").read_text())  # every config still parses with Triton's schema
    readme = (repo / "README.md").read_text()
    assert "| `qv` | 1 | 4 | attn_q, attn_v | `tensorrt_llm/lora/qv/` |" in readme
    assert "| `mlp` | 2 | 8 | mlp_h_to_4h, mlp_4h_to_h, mlp_gate |" in readme
    assert "yitrt chat localhost:8001 --model tensorrt_llm_bls --lora qv" in readme and "--lora-mix qv:0.5,mlp:0.5" in readme
    assert "TYPE_BF16" in readme
    assert result.summary["lora"] == [{"name": "qv", "task_id": 1}, {"name": "mlp", "task_id": 2}]
    again = _lora_deploy(tmp_path, lora_work, gpu_memory_fraction=0.1, host_memory_bytes=1 << 28, max_adapter_size=64)
    assert again.reused  # same inputs: the repository is reused


def test_lora_prefetch_writes_numeric_task_folders_for_an_fp16_engine(tmp_path, lora_work):
    from yitrt.triton.lora import AdapterRequest

    adapters = (AdapterRequest("qv", lora_work["float16"]["qv"], task_id=7), AdapterRequest("mlp", lora_work["float16"]["mlp"]))
    repo = _lora_deploy(tmp_path, lora_work, "float16", prefetch=True, adapters=adapters).out
    prefetch = repo / "tensorrt_llm/lora/prefetch"
    assert sorted(p.name for p in prefetch.iterdir()) == ["1", "7"]  # the given id, then the smallest free one
    for task, name in (("7", "qv"), ("1", "mlp")):
        assert sorted(p.name for p in (prefetch / task).iterdir()) == ["model.lora_config.npy", "model.lora_weights.npy"]
        assert (prefetch / task / "model.lora_weights.npy").read_bytes() == (lora_work["float16"][name] / "model.lora_weights.npy").read_bytes()
    params = _params(parse_config((repo / "tensorrt_llm/config.pbtxt").read_text()))
    assert params["lora_prefetch_dir"] == str(repo / "tensorrt_llm/lora/prefetch")  # absolute, like engine_dir
    tensor = {t.name: t for t in parse_config((repo / "ensemble/config.pbtxt").read_text()).input}["lora_weights"]
    from tritonclient.grpc import model_config_pb2 as pb

    assert tensor.data_type == pb.TYPE_FP16


def test_lora_deploy_refusals_are_all_reported_at_once(tmp_path, lora_work):
    from yitrt.triton.lora import AdapterRequest

    narrow = lora_engine(tmp_path / "narrow", "bfloat16", ("attn_q", "attn_k", "attn_v"), 4)
    adapters = (AdapterRequest("qv", lora_work["bfloat16"]["qv"], 3), AdapterRequest("mlp", lora_work["bfloat16"]["mlp"], 3),
                AdapterRequest("fp16", lora_work["float16"]["qv"]), AdapterRequest("../out", lora_work["bfloat16"]["qv"]))
    with pytest.raises(ValidationError) as info:
        _lora_deploy(tmp_path, lora_work, engine=narrow, adapters=adapters, prefetch=True)
    text = " | ".join(info.value.problems)
    assert "LoRA task ids must be unique: 3 given twice" in text
    assert "LoRA adapter names must be a-z, 0-9, _ or - (at most 64; they name folders): not '../out'" in text
    assert "LoRA adapter mlp has rank 8, above the engine's max_lora_rank 4" in text
    assert "LoRA adapter mlp adapts mlp_h_to_4h, mlp_4h_to_h, mlp_gate, which the engine does not enable" in text
    assert "LoRA adapter fp16 holds float16 weights, the engine is bfloat16" in text
    assert "lora_prefetch_dir with a bfloat16 engine silently serves the base model (tensorrtllm_backend #791" in text
    assert not (tmp_path / "repo").exists()  # nothing partial left behind
    plain = lora_engine(tmp_path / "plain", plugin=False)
    with pytest.raises(ValidationError, match="built without the LoRA plugin"):
        _lora_deploy(tmp_path, lora_work, engine=plain)


def test_reference_slot_gets_the_lora_limits_an_engine_has_from_its_build(lora_work):
    from yitrt.triton.lora import AdapterRequest, LoraRequest
    from yitrt.triton.lora import resolve as resolve_lora

    req = LoraRequest((AdapterRequest("qv", lora_work["bfloat16"]["qv"]), AdapterRequest("mlp", lora_work["bfloat16"]["mlp"])))
    lora, problems = resolve_lora(req, "bfloat16", "reference", None)
    assert problems == [] and lora.max_rank == 8 and lora.modules == ALL_MODULES  # q/k/v completed, module-id order
    facts = dataclasses.replace(_facts("reference"), dtype="bfloat16")
    texts = render_repository(DeployRequest(Path("/ENGINE"), Path("/REPO"), engine="reference"), facts, "1.2", 7, [2], lora=lora)
    params = _params(parse_config(texts["tensorrt_llm"]))
    assert params["yitrt_lora_target_modules"] == ",".join(ALL_MODULES) and params["yitrt_max_lora_rank"] == "8"
    assert params["lora_cache_max_adapter_size"] == "8" and params["lora_cache_gpu_memory_fraction"] == "0.05"


def test_deploy_lora_option_parses_name_dir_and_task_id():
    from yitrt.errors import UsageError
    from yitrt.triton.lora import AdapterRequest, parse_adapter_option

    assert parse_adapter_option("chat=/a/b") == AdapterRequest("chat", Path("/a/b"))
    assert parse_adapter_option("chat=/a/b:7") == AdapterRequest("chat", Path("/a/b"), 7)
    assert parse_adapter_option("x=C:dir") == AdapterRequest("x", Path("C:dir"))  # a colon not before digits is part of the path
    for bad in ("chat", "Chat=/a", "chat=", "chat=/a:0"):
        with pytest.raises(UsageError):
            parse_adapter_option(bad)


def test_build_and_deploy_commands_take_converted_adapters(tmp_path, lora_work, cli):
    import json

    from tests.unit.test_build_argv import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", "01-ai/Yi-1.5-6B-Chat")
    qv = lora_work["bfloat16"]["qv"]
    result = cli("build", str(ckpt), "--out", str(tmp_path / "e"), "--gpu", "H100", "--dry-run", "--json", "--lora", str(qv),
                 "--max-lora-rank", "16", "--lora-target-modules", "attn_q,attn_v")
    # the tiny adapter's dims are not Yi-6B's: a dry run checks names, ranks and modules, not the base (convert did)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)["argv"]
    at = argv.index("--lora_target_modules")
    assert argv[at + 1 : at + 4] == ["attn_q", "attn_k", "attn_v"] and argv[argv.index("--max_lora_rank") + 1] == "16"
    shown = cli("build", str(ckpt), "--out", str(tmp_path / "e"), "--gpu", "H100", "--dry-run", "--lora", str(qv))
    assert shown.returncode == 0 and "# lora: 1 adapter(s) (qv-bfloat16), modules attn_q attn_k attn_v, max_lora_rank 4" in shown.stdout
    assert "adapter cache (LoRA, rank 0, pp 0): device" in shown.stdout
    refused = cli("build", str(ckpt), "--out", str(tmp_path / "e"), "--gpu", "H100", "--dry-run", "--max-lora-rank", "8")
    assert refused.returncode == 2 and "need adapters" in refused.stderr
    engine = lora_engine(tmp_path / "engine", "bfloat16", ALL_MODULES, 8)
    deployed = cli("deploy", str(engine), "--out", str(tmp_path / "repo"), "--tokenizer", str(lora_work["bfloat16"]["base"]), "--json",
                   "--lora", f"qv={qv}:4", "--lora", f"mlp={lora_work['bfloat16']['mlp']}", "--lora-cache-fraction", "0.2")
    assert deployed.returncode == 0, deployed.stderr
    assert json.loads(deployed.stdout)["lora"] == [{"name": "qv", "task_id": 4}, {"name": "mlp", "task_id": 1}]
    params = _params(parse_config((tmp_path / "repo/tensorrt_llm/config.pbtxt").read_text()))
    assert params["lora_cache_gpu_memory_fraction"] == "0.2"
    prefetch = cli("deploy", str(engine), "--out", str(tmp_path / "repo2"), "--tokenizer", str(lora_work["bfloat16"]["base"]),
                   "--lora", f"qv={qv}", "--lora-prefetch")
    assert prefetch.returncode == 3 and "#791" in prefetch.stderr and not (tmp_path / "repo2").exists()


@pytest.mark.parametrize("count", [1, 3, 6, 7, 12])
def test_lora_readme_mix_example_is_a_valid_lora_mix(count):
    """The README's `--lora-mix` example is what bench accepts (its shares sum to 1, each positive) for any adapter count."""
    import re

    from yitrt.triton.lora import DeployedAdapter, LoraDeployment
    from yitrt.triton.lora_client import parse_mix

    adapters = tuple(DeployedAdapter(f"a{i}", i + 1, Path("/x"), 4, ("attn_q",), "float16") for i in range(count))
    readme = LoraDeployment(adapters, 4, ("attn_q", "attn_k", "attn_v"), 4, 4, 0.05, 1 << 30, False).readme_section("tensorrt_llm_bls")
    mix = re.search(r"--lora-mix (\S+)", readme).group(1)
    assert set(parse_mix(mix, {a.name for a in adapters})) == {a.name for a in adapters}


@pytest.mark.parametrize("text", ["a=dir:²", "a=dir:0", f"a=dir:{1 << 64}"])
def test_deploy_lora_option_task_ids_are_ascii_uint64(text):
    """`--lora NAME=DIR:TASK_ID`: a task id is ASCII digits from 1 to 2^64 - 1 (lora_task_id is UINT64); '²' is a
    digit to str.isdigit and would crash int()."""
    from yitrt.errors import UsageError
    from yitrt.triton.lora import parse_adapter_option

    if text.endswith("²"):  # not a task id: the whole text after '=' is the folder
        assert parse_adapter_option(text).path == Path("dir:²")
        return
    with pytest.raises(UsageError, match="task id .* must be 1 to 2\\^64 - 1"):
        parse_adapter_option(text)


@pytest.mark.parametrize("build", [{"plugin_config": [1]}, {"plugin_config": {"lora_plugin": "float16"}, "lora_config": {"max_lora_rank": "x"}},
                                   {"plugin_config": {"lora_plugin": "float16"}, "lora_config": ["x"]}])
def test_engine_lora_settings_of_the_wrong_type_read_as_absent(build):
    """An engine config.json's LoRA values are data: a wrong type reads as absent (deploy then refuses the engine's LoRA
    settings, naming them), never an AttributeError or ValueError."""
    from yitrt.triton.lora import engine_lora

    got = engine_lora(build)
    assert got is None or (got["max_lora_rank"] is None and got["lora_target_modules"] == [])
