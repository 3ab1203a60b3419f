"""LoRA adapters served per request on a real tritonserver (CPU reference slot, one server for the module).

A tiny bf16 Llama, two PEFT adapters made here (q/v/o rank 4; k/gate/up/down rank 8; B randomized so that the
answers change), converted with ``yitrt lora convert``'s library call and deployed with the base checkpoint (``yitrt
deploy``'s LoRA settings: the repository's ``lora_weights`` inputs are TYPE_BF16, the engine dtype, and
``lora_adapters.json`` lists the adapters).
Checked: the greedy answers of adapter 1, adapter 2 and the base model differ, and each equals transformers (+ peft
``PeftModel``) greedy on the same tokens; a later request with the task id alone gives the same answer; an unknown id
is refused with the engine's message; the ensemble and the BLS pass the three tensors through (BF16 included);
``yitrt chat --lora`` and ``yitrt bench --lora-mix`` select adapters by name, and a task id the server never saw is
sent once more with its weights.
"""

from __future__ import annotations

import json
import queue
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

PROMPT = "the adapters of a tiny model"
NEW = 10
ADAPTERS = {  # name → (task id, PEFT target modules, rank)
    "alpha": (11, ["q_proj", "v_proj", "o_proj"], 4),
    "beta": (12, ["k_proj", "gate_proj", "up_proj", "down_proj"], 8),
}


def _bf16(t):
    """Values rounded to bf16 (so that the converted bf16 arrays are the PEFT weights exactly)."""
    import torch

    return t.to(torch.bfloat16).to(torch.float32)


def _make_adapter(hf: Path, out: Path, targets: list[str], rank: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    # lora_alpha = r: the scale is 1, so B (bf16-rounded) needs no rescaling that would round again
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # B is zero after init: randomized to a noticeable magnitude
                p.copy_(_bf16(torch.randn_like(p) * (0.08 if "lora_A" in name else 0.15)))
    model.save_pretrained(out)
    return out


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by full recomputation (argmax of the last position; nothing masked)."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def lora_repo(tmp_path_factory):
    """(root, repo, {name: converted folder}, tokenizer, {None|name: expected greedy ids of PROMPT})."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from yitrt.build.environment import find_tritonserver
    from yitrt.checkpoint.convert import ConvertRequest, convert
    from yitrt.lora.convert import convert_adapter
    from yitrt.synthetic import SyntheticSpec, write_synthetic_model
    from yitrt.triton.cpu_stub import stub_env_dir
    from yitrt.triton.lora import AdapterRequest, LoraRequest
    from yitrt.triton.repository import DeployRequest, deploy

    if find_tritonserver() is None or not (stub_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip("no tritonserver (nvidia-pytriton) or no NumPy-1.x stub environment: run `make setup`")
    root = tmp_path_factory.mktemp("lora-serving")
    hf = write_synthetic_model(root / "hf", SyntheticSpec(seed=31, dtype="bfloat16", layers=2, tokenizer=True, head_std=0.2))
    convert(ConvertRequest(hf, root / "ckpt"))
    converted = {}
    for i, (name, (_, targets, rank)) in enumerate(ADAPTERS.items()):
        peft_dir = _make_adapter(hf, root / f"peft-{name}", targets, rank, seed=100 + i)
        converted[name] = convert_adapter(peft_dir, hf, root / f"conv-{name}", dtype="bfloat16")
    repo = root / "repo"
    lora = LoraRequest(tuple(AdapterRequest(name, converted[name], task) for name, (task, _, _) in ADAPTERS.items()))
    deploy(DeployRequest(root / "ckpt", repo, engine="reference", streaming=True, max_batch_size=8, max_seq_len=256, lora=lora))
    assert 'data_type: TYPE_BF16' in (repo / "tensorrt_llm_bls" / "config.pbtxt").read_text().split('name: "lora_weights"')[1][:80]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    expected = {None: _greedy(AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32), ids, NEW)}
    for name in ADAPTERS:
        base = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
        expected[name] = _greedy(PeftModel.from_pretrained(base, root / f"peft-{name}"), ids, NEW)
    return root, repo, converted, ids, expected


@pytest.fixture(scope="module")
def server(lora_repo):
    from yitrt.pipeline import free_ports
    from yitrt.triton.server import Ports, ServeRequest, start_server

    http, grpc_port, metrics = free_ports(3)
    srv = start_server(ServeRequest(lora_repo[1], Ports(http, grpc_port, metrics), exit_timeout=5, ready_timeout=300))
    yield f"localhost:{grpc_port}"
    srv.stop()


def _arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / "model.lora_weights.npy"), np.load(folder / "model.lora_config.npy")


def _inputs(grpc, values: dict) -> list:
    import ml_dtypes

    out = []
    for name, value in values.items():
        if name == "lora_weights":  # bf16 values stored as float32: sent as TYPE_BF16
            array, dtype = value.astype(ml_dtypes.bfloat16), "BF16"
        else:
            array = value
            dtype = {np.int32: "INT32", np.bool_: "BOOL", np.object_: "BYTES", np.uint64: "UINT64"}[array.dtype.type]
        tensor = grpc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _ask(url: str, model: str, values: dict) -> tuple[list, str | None]:
    """One streamed request: (its responses, the error message or None)."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    try:
        client.async_stream_infer(model, _inputs(grpc, values), enable_empty_final_response=True)
        out = []
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return out, str(error)
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out, None
    finally:
        client.stop_stream()
        client.close()


def _lora(task: int, folder: Path | None = None) -> dict:
    values = {"lora_task_id": np.array([[task]], dtype=np.uint64)}
    if folder is not None:
        weights, config = _arrays(folder)
        values.update(lora_weights=weights, lora_config=config)
    return values


def _engine(url: str, ids: list[int], extra: dict) -> tuple[list[int], str | None]:
    values = {"input_ids": np.array([ids], dtype=np.int32), "input_lengths": np.array([[len(ids)]], dtype=np.int32),
              "request_output_len": np.array([[NEW]], dtype=np.int32), "streaming": np.array([[False]], dtype=np.bool_), **extra}
    responses, error = _ask(url, "tensorrt_llm", values)
    tokens = [int(t) for r in responses if r.as_numpy("output_ids") is not None for t in r.as_numpy("output_ids").reshape(-1)]
    return tokens, error


def _text(url: str, model: str, extra: dict, chat: bool = False) -> tuple[str, str | None]:
    """The text answer to PROMPT (raw text, the end token ignored; ``chat``: as `yitrt chat` asks, one user message)."""
    values = {"text_input": np.array([[PROMPT.encode()]], dtype=np.object_), "max_tokens": np.array([[NEW]], dtype=np.int32),
              "end_id": np.array([[-1]], dtype=np.int32), "stream": np.array([[False]], dtype=np.bool_), **extra}
    if chat:
        del values["end_id"]
        values.update(text_input=np.array([[b""]], dtype=np.object_),
                      messages=np.array([[json.dumps([{"role": "user", "content": PROMPT}]).encode()]], dtype=np.object_))
    responses, error = _ask(url, model, values)
    return "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in responses if r.as_numpy("text_output") is not None), error


def test_two_adapters_and_the_base_model_answer_as_transformers_with_peft(lora_repo, server):
    _, _, converted, ids, expected = lora_repo
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the greedy answer, each its own way
    base, error = _engine(server, ids, {})
    assert error is None and base == expected[None]
    for name, (task, _, _) in ADAPTERS.items():
        got, error = _engine(server, ids, _lora(task, converted[name]))  # the first request of a task: weights + config
        assert error is None and got == expected[name], name
    for name, (task, _, _) in ADAPTERS.items():  # later requests: the task id alone
        got, error = _engine(server, ids, _lora(task))
        assert error is None and got == expected[name], name


def test_an_unknown_task_id_is_refused_with_the_engines_message(lora_repo, server):
    _, _, converted, ids, expected = lora_repo
    tokens, error = _engine(server, ids, _lora(999))
    assert tokens == [] and error is not None
    assert "LoRA task 999 not found in cache. Please send LoRA weights with request" in error and "Traceback" not in error
    weights, config = _arrays(converted["alpha"])
    _, error = _engine(server, ids, {**_lora(998), "lora_weights": weights, "lora_config": config[:, :1]})  # rows differ
    assert error is not None and "same size" in error
    again, error = _engine(server, ids, {})  # the server goes on
    assert error is None and again == expected[None]


def test_ensemble_and_bls_pass_the_lora_tensors_through(lora_repo, server):
    from transformers import AutoTokenizer

    root, _, converted, _, expected = lora_repo
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    for name, (task, _, _) in ADAPTERS.items():
        want = tokenizer.decode(expected[name], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for model in ("ensemble", "tensorrt_llm_bls"):
            text, error = _text(server, model, _lora(task, converted[name]))  # BF16 weights through both
            assert error is None and text == want, (name, model)
    base, error = _text(server, "ensemble", {})
    assert error is None and base == tokenizer.decode(expected[None], skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_chat_and_bench_select_adapters_by_name(lora_repo, server, tmp_path):
    from yitrt.bench.loadgen import Load
    from yitrt.bench.runner import BenchRequest, run_bench
    from yitrt.bench.workload import LengthSpec
    from yitrt.errors import UsageError
    from yitrt.triton.client import ChatRequest, chat

    _, repo, converted, _, _ = lora_repo
    answers = {}
    for name in (None, "alpha", "beta"):
        result = chat(ChatRequest(server, PROMPT, model="ensemble", max_tokens=NEW, stream=False, lora=name, repo=repo))
        answers[name] = result.text
        assert (result.adapter or {}).get("task_id") == (ADAPTERS[name][0] if name else None)
        assert result.lora_weights_sent == (name is not None)
        # the adapter the name stands for: the same answer as its task id and arrays sent by hand
        same, error = _text(server, "ensemble", _lora(ADAPTERS[name][0], converted[name]) if name else {}, chat=True)
        assert error is None and result.text == same, name
    assert answers["beta"] != answers[None]
    again = chat(ChatRequest(server, PROMPT, model="ensemble", max_tokens=NEW, stream=False, lora="beta", repo=repo,
                             lora_weights=False))
    assert again.text == answers["beta"] and not again.lora_weights_sent and not again.lora_resent
    with pytest.raises(UsageError, match="no adapter 'gamma'"):
        chat(ChatRequest(server, PROMPT, lora="gamma", repo=repo))
    # an adapter the server has never seen, asked with its task id alone: refused "not found in cache", then sent once
    # more with its weights
    other = tmp_path / "other-repo"
    shutil.copytree(repo / "tensorrt_llm" / "lora" / "alpha", other / "lora" / "gamma")
    (other / "lora_adapters.json").write_text(json.dumps({"adapters": [
        {"name": "gamma", "task_id": 77, "dir": "lora/gamma", "rank": 4, "modules": ["attn_q"], "dtype": "bfloat16"}]}))
    fresh = chat(ChatRequest(server, PROMPT, model="ensemble", max_tokens=NEW, stream=False, lora="gamma", repo=other,
                             lora_weights=False))
    assert fresh.lora_resent and fresh.lora_weights_sent and fresh.text == answers["alpha"]  # alpha's arrays, id 77
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"text": "{PROMPT} {i}", "max_tokens": 4}}\n' for i in range(6)))
    report = run_bench(BenchRequest(server, (Load("concurrency", 2),), tmp_path / "bench", model="ensemble", num_requests=6,
                                    dataset=str(prompts), osl=LengthSpec(4), repo=repo, lora_mix="alpha:0.5,base:0.5",
                                    metrics_url="none")).report
    requests = report["points"][0]["requests"]
    assert sorted(r["adapter"] or "base" for r in requests) == ["alpha"] * 3 + ["base"] * 3
    assert all(r["ok"] for r in requests)
    assert any(r["lora_weights_sent"] for r in requests if r["adapter"] == "alpha")
    assert not any(r["lora_weights_sent"] for r in requests if r["adapter"] is None)
    per = report["points"][0]["adapters"]
    assert per["alpha"]["counts"]["answered"] == 3 and per["base"]["counts"]["answered"] == 3
    assert report["lora"]["mix"] == {"alpha": 0.5, "base": 0.5} and report["lora"]["adapters"]["alpha"]["task_id"] == 11
    with pytest.raises(UsageError, match="sum to 0.9"):
        run_bench(BenchRequest(server, (Load("concurrency", 1),), tmp_path / "bench2", repo=repo, lora_mix="alpha:0.5,beta:0.4"))
