"""The client side of LoRA (`yitrt chat/bench --lora`, `--lora-mix`): the repository's adapter list, the mix's
validation and draw, and when a request carries an adapter's weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from yitrt.errors import UsageError
from yitrt.triton import lora_client


def _repo(tmp_path, entries=None):
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        folder = repo / "tensorrt_llm" / "lora" / name
        folder.mkdir(parents=True)
        np.save(folder / "model.lora_weights.npy", np.full((1, 2, 6), 0.5, dtype=np.float32))
        np.save(folder / "model.lora_config.npy", np.array([[[1, 0, 2], [3, 1, 2]]], dtype=np.int32))
    if entries is None:
        entries = [{"name": n, "task_id": i + 1, "dir": f"tensorrt_llm/lora/{n}", "rank": 2, "modules": ["attn_q"], "dtype": "bfloat16"}
                   for i, n in enumerate(("a", "b"))]
    (repo / "lora_adapters.json").write_text(json.dumps({"adapters": entries}))
    return repo


def test_read_adapters_and_pick(tmp_path):
    adapters = lora_client.read_adapters(_repo(tmp_path))
    assert {n: a.task_id for n, a in adapters.items()} == {"a": 1, "b": 2}
    weights, config = adapters["a"].arrays()
    assert weights.shape == (1, 2, 6) and config.dtype == np.int32
    with pytest.raises(UsageError, match="no adapter 'c'") as refused:
        lora_client.pick(adapters, "c")
    assert refused.value.hint == "use one of: a, b"
    with pytest.raises(UsageError, match="lists no LoRA adapters"):
        lora_client.read_adapters(tmp_path)


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "task_id": -1, "dir": "x", "dtype": "float16"}, "a task_id of 0 to 2\\^64 - 1"),
    ({"name": "a", "task_id": 1, "dir": "x", "dtype": "int8"}, "dtype"),
    ({"name": "base", "task_id": 1, "dir": "x", "dtype": "float16"}, "reserved"),
    ({"name": "a", "task_id": 1, "dir": "../outside", "dtype": "float16"}, "outside"),
])
def test_bad_adapter_lists_are_refused(tmp_path, entry, message):
    with pytest.raises(UsageError, match=message):
        lora_client.read_adapters(_repo(tmp_path, [entry]))


def test_mix_is_validated_whole():
    assert lora_client.parse_mix("a:0.5, b:0.25,base:0.25", {"a", "b"}) == {"a": 0.5, "b": 0.25, "base": 0.25}
    for text, message in (("a:0.5,b:0.4", "sum to 0.9"), ("a:1.5,b:-0.5", "positive"), ("a:0.5,c:0.5", "'c'"),
                          ("a:0.5,a:0.5", "twice"), ("a", "NAME:WEIGHT"), ("a:x", "NAME:WEIGHT"), ("a:nan", "positive")):
        with pytest.raises(UsageError, match=message):
            lora_client.parse_mix(text, {"a", "b"})
    assert lora_client.parse_mix("a:0.3333333,b:0.6666667", {"a", "b"})  # within 1e-6 of 1


def test_assign_follows_the_weights_and_is_reproducible():
    names = lora_client.assign({"a": 0.5, "b": 0.3, "base": 0.2}, 10, seed=3)
    assert sorted(n or "base" for n in names) == ["a"] * 5 + ["b"] * 3 + ["base"] * 2
    assert names == lora_client.assign({"a": 0.5, "b": 0.3, "base": 0.2}, 10, seed=3)
    assert names != lora_client.assign({"a": 0.5, "b": 0.3, "base": 0.2}, 10, seed=4)
    assert sorted(n for n in lora_client.assign({"a": 0.5, "b": 0.5}, 3, seed=0)).count("a") in (1, 2)


class _Input:
    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype, self.data = name, shape, dtype, None

    def set_data_from_numpy(self, array):
        self.data = array


def test_sender_types_the_weights_as_the_server_declares_and_tracks_confirmation(tmp_path):
    import ml_dtypes

    adapters = lora_client.read_adapters(_repo(tmp_path))
    grpc = SimpleNamespace(InferInput=_Input)
    declared = {"lora_task_id": "UINT64", "lora_weights": "BF16", "lora_config": "INT32"}
    sender = lora_client.LoraSender(grpc, declared, adapters, "ensemble")
    assert sender.id_tensor("b").data.tolist() == [[2]] and sender.id_tensor("b").dtype == "UINT64"
    weights, config = sender.weight_tensors("a")
    assert weights.dtype == "BF16" and weights.data.dtype == ml_dtypes.bfloat16 and weights.shape == [1, 2, 6]
    assert config.dtype == "INT32" and config.data.tolist() == [[[1, 0, 2], [3, 1, 2]]]
    assert sender.weight_tensors("a")[0] is weights  # built once
    assert sender.needs_weights("a")
    sender.confirm("a")
    assert not sender.needs_weights("a") and sender.needs_weights("b")
    sender.forget("a")
    assert sender.needs_weights("a")
    fp16 = lora_client.LoraSender(grpc, dict(declared, lora_weights="FP16"), adapters, "ensemble")
    with pytest.raises(UsageError, match="adapter a is bfloat16, but the server's lora_weights input is FP16"):
        fp16.weight_tensors("a")
    with pytest.raises(UsageError, match="has no input lora_weights, lora_config"):
        lora_client.LoraSender(grpc, {"lora_task_id": "UINT64"}, adapters, "ensemble")
    assert lora_client.not_cached("LoRA task 4 not found in cache. Please send LoRA weights with request")
    assert not lora_client.not_cached("PEFT Cache is full. Could not store taskId=4") and not lora_client.not_cached(None)


@pytest.mark.parametrize("field, value", [("modules", 5), ("modules", [1]), ("dtype", ["f"]), ("dtype", {"a": 1}),
                                          ("task_id", 1 << 64), ("task_id", -1), ("task_id", True), ("dir", None)])
def test_a_mistyped_adapter_list_is_a_refusal_not_a_crash(tmp_path, field, value):
    """Every field of lora_adapters.json a client reads is checked: a wrong type or a task id outside UINT64 is one
    UsageError naming the file (exit 2), never a TypeError or OverflowError (exit 70)."""
    entry = {"name": "a", "task_id": 1, "dir": "tensorrt_llm/lora/a", "rank": 2, "modules": ["attn_q"], "dtype": "float16", field: value}
    with pytest.raises(UsageError, match="lora_adapters.json: adapter 0 needs"):
        lora_client.read_adapters(_repo(tmp_path, [entry]))


def test_adapter_arrays_that_are_not_numbers_are_refused(tmp_path):
    repo = _repo(tmp_path)
    np.save(repo / "tensorrt_llm/lora/a/model.lora_weights.npy", np.array([["x"] * 6] * 2))  # loads without pickle
    with pytest.raises(UsageError, match="adapter a: .* holds <U1 weights"):
        lora_client.read_adapters(repo)["a"].arrays()
