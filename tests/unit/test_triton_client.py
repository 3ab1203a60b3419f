"""`yitrt chat`'s request building: typed as the server declares the model's inputs, options a model lacks refused."""

from __future__ import annotations

import pytest

from yitrt.errors import UsageError
from yitrt.triton.client import ChatRequest, build_inputs
from yitrt.triton.contract import contract


def _declared(line: str, model: str = "tensorrt_llm_bls") -> dict[str, str]:
    """What the server would declare for a repository of ``line`` (from the contract table)."""
    return {t.name: t.data_type.replace("STRING", "BYTES") for t in contract(line)[model].inputs}


def test_inputs_follow_the_declared_types_and_carry_the_chat_turns():
    import tritonclient.grpc as grpc

    req = ChatRequest("localhost:1", "Hi?", system="Be brief.", max_tokens=5, seed=3, top_p=0.5, stop_words=("END", "STOP"))
    tensors = {t.name(): t for t in build_inputs(grpc, _declared("1.2"), req, True, "tensorrt_llm_bls")}
    assert tensors["seed"].datatype() == "UINT64" and tensors["top_p"].datatype() == "FP32" and tensors["max_tokens"].datatype() == "INT32"
    assert tensors["stop_words"].shape() == [1, 2] and tensors["stream"].datatype() == "BOOL"
    assert set(tensors) >= {"messages", "text_input", "return_num_output_tokens"}


def test_options_the_model_lacks_are_refused_not_dropped():
    import tritonclient.grpc as grpc

    with pytest.raises(UsageError, match="has no input seed"):  # 0.19 calls it random_seed
        build_inputs(grpc, _declared("0.19"), ChatRequest("localhost:1", "Hi?", seed=1), False, "tensorrt_llm_bls")
    plain = {k: v for k, v in _declared("1.2").items() if k != "messages"}  # a stock BLS without yitrt's messages input
    with pytest.raises(UsageError, match="takes no chat messages"):
        build_inputs(grpc, plain, ChatRequest("localhost:1", "Hi?", system="x"), False, "stock_bls")
    tensors = build_inputs(grpc, plain, ChatRequest("localhost:1", "Hi?"), False, "stock_bls")
    assert "messages" not in {t.name() for t in tensors}
    with pytest.raises(UsageError, match="not a text entry point"):
        build_inputs(grpc, _declared("1.2", "tensorrt_llm"), ChatRequest("localhost:1", "Hi?"), False, "tensorrt_llm")
