"""yitrt's ``preprocessing`` model: request text (or chat messages) → token ids, lengths, stop/bad words, end/pad ids.

Written by `yitrt deploy` into ``preprocessing/1/model.py`` with ``yitrt_text.py`` beside it. Tensors follow
TensorRT-LLM's ``inflight_batcher_llm`` contract (reference/triton-repository.md §1.2); the optional ``MESSAGES``
input (a JSON list of chat turns) is yitrt's addition. Stop and bad words get their leading-space variant too unless the
parameter ``yitrt_words_encoding`` is ``stock`` (``yitrt_text.Encoder.word_sequences``). Each request is answered on its own, so one bad request in a
dynamic batch gets its own error and the others go on.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
import yitrt_text as text

_NOT_HANDLED = ("IMAGE_BYTES", "IMAGE_URL", "IMAGE_SIZES", "VIDEO_BYTES", "EMBEDDING_BIAS_WORDS", "EMBEDDING_BIAS_WEIGHTS")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = text.resolve_dir(text.param(config, "tokenizer_dir", "tokenizer"), args["model_repository"])
        self.tokenizer = text.load_tokenizer(folder)
        max_input = text.param(config, "max_input_len")
        self.encoder = text.Encoder(self.tokenizer, _int_or_none(text.param(config, "end_id")),
                                    text.int_list(text.param(config, "stop_token_ids")), int(max_input) if max_input else None,
                                    add_special_tokens=text.flag(config, "add_special_tokens", True),
                                    words_encoding=text.param(config, "yitrt_words_encoding", "with_space"))
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def _one(self, request):
        query = text.first_string(request, "QUERY") or ""
        messages = text.first_string(request, "MESSAGES")
        output_len = text.scalar(request, "REQUEST_OUTPUT_LEN")
        if output_len is None or output_len < 1:
            raise text.RequestError(f"max_tokens must be >= 1, got {output_len}")
        if text.first_string(request, "DECODER_QUERY"):
            raise text.RequestError("decoder_text_input is for encoder-decoder models; this one is decoder-only: send text_input")
        for name in _NOT_HANDLED:  # refused, never silently dropped
            if text.array(request, name) is not None and text.array(request, name).size:
                raise text.RequestError(f"{name} is not supported by this deployment (text-only model, no embedding bias)")
        ids = self.encoder.encode(query, messages)
        stop_words = text.strings(text.array(request, "STOP_WORDS_DICT")) if text.array(request, "STOP_WORDS_DICT") is not None else []
        bad_words = text.strings(text.array(request, "BAD_WORDS_DICT")) if text.array(request, "BAD_WORDS_DICT") is not None else []
        end_id = text.scalar(request, "END_ID")  # -1: ignore end tokens (generation runs to max_tokens)
        pad_id = self.encoder.pad_id if text.scalar(request, "PAD_ID") is None else text.scalar(request, "PAD_ID")
        # decoder inputs of a decoder-only model: one pad token, length 1, as the stock preprocessing sends them
        values = {
            "INPUT_ID": np.array([ids], dtype=np.int32),
            "REQUEST_INPUT_LEN": np.array([[len(ids)]], dtype=np.int32),
            "DECODER_INPUT_ID": np.array([[pad_id]], dtype=np.int32),
            "REQUEST_DECODER_INPUT_LEN": np.array([[1]], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": np.array([[output_len]], dtype=np.int32),
            "STOP_WORDS_IDS": text.to_words_list(self.encoder.stop_sequences(stop_words, end_id is not None and end_id < 0))[None],
            "BAD_WORDS_IDS": text.to_words_list(self.encoder.word_sequences(bad_words))[None],
            "EMBEDDING_BIAS": np.zeros((1, 0), dtype=np.float32),
            "OUT_END_ID": np.array([[self.encoder.end_id if end_id is None else end_id]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[pad_id]], dtype=np.int32),
            "OUT_PROMPT_TABLE_EXTRA_IDS": np.zeros((1, 0), dtype=np.uint64),
        }
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, values[name].astype(dtype)) for name, dtype in self.outputs.items() if name in values])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except text.RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
            except Exception as exc:  # noqa: BLE001 - any failure is this request's error, the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocessing failed: {type(exc).__name__}: {exc}")))
        return responses


def _int_or_none(value):
    return None if value is None else int(value)
