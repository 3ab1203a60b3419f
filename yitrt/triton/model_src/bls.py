"""yitrt's ``tensorrt_llm_bls`` model: one request → preprocessing → tensorrt_llm → text, with incremental streaming.

Written by `yitrt deploy` into ``tensorrt_llm_bls/1/model.py`` with ``yitrt_text.py`` beside it. Tensors follow
TensorRT-LLM's contract (reference/triton-repository.md §1.6); the optional ``messages`` input is yitrt's.
Compared with the stock BLS:
- every request runs in its own thread, so one instance serves many requests at once (stock: one at a time);
- streamed text is the delta of an incremental detokenizer, and a non-streamed answer is the join of the same
  deltas, so streamed text concatenates exactly to the non-streamed text (stock: ``accumulate_tokens`` resends the
  whole text each time);
- stop words end the text where they occur, and text that might begin one is held back until it cannot;
- the prompt is never echoed (``exclude_input_in_output`` is always sent as true).
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
import yitrt_text as text

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_PREPROCESS_INPUTS = {"text_input": "QUERY", "messages": "MESSAGES", "max_tokens": "REQUEST_OUTPUT_LEN",
                      "bad_words": "BAD_WORDS_DICT", "stop_words": "STOP_WORDS_DICT", "end_id": "END_ID", "pad_id": "PAD_ID",
                      "embedding_bias_words": "EMBEDDING_BIAS_WORDS", "embedding_bias_weights": "EMBEDDING_BIAS_WEIGHTS"}
_PREPROCESS_OUTPUTS = {"INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths", "REQUEST_OUTPUT_LEN": "request_output_len",
                       "STOP_WORDS_IDS": "stop_words_list", "BAD_WORDS_IDS": "bad_words_list", "OUT_END_ID": "end_id",
                       "OUT_PAD_ID": "pad_id"}
#: BLS input → tensorrt_llm input, passed through when the client sends it.
_PASS_THROUGH = {"top_k": "runtime_top_k", "top_p": "runtime_top_p", "temperature": "temperature", "length_penalty": "len_penalty",
                 "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens", "min_length": "min_length",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
                 "random_seed": "random_seed", "beam_width": "beam_width", "num_return_sequences": "num_return_sequences",
                 "lora_task_id": "lora_task_id", "lora_weights": "lora_weights", "lora_config": "lora_config"}


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _flag(request, name):
    value = _input(request, name)
    return bool(value is not None and value.size and np.asarray(value).reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        folder = text.resolve_dir(text.param(config, "tokenizer_dir", "tokenizer"), args["model_repository"])
        self.tokenizer = text.load_tokenizer(folder)
        self.skip = text.flag(config, "skip_special_tokens", True)
        self.engine = text.param(config, "tensorrt_llm_model_name", "tensorrt_llm")
        self.engine_decoupled = text.flag(config, "tensorrt_llm_decoupled", self.decoupled)
        self.preprocessing = text.param(config, "preprocessing_model_name", "preprocessing")
        self.inputs = {t["name"] for t in config["input"]}

    # -- one request ------------------------------------------------------------------------------------------
    def _preprocess(self, request):
        inputs = [pb_utils.Tensor(target, _input(request, source)) for source, target in _PREPROCESS_INPUTS.items()
                  if _input(request, source) is not None]
        response = pb_utils.InferenceRequest(model_name=self.preprocessing, inputs=inputs,
                                             requested_output_names=list(_PREPROCESS_OUTPUTS)).exec()
        if response.has_error():
            raise text.RequestError(response.error().message())
        return {target: pb_utils.get_output_tensor_by_name(response, source).as_numpy() for source, target in _PREPROCESS_OUTPUTS.items()}

    def _engine_inputs(self, request, pre, stream):
        values = dict(pre)
        for name in ("stop_words_list", "bad_words_list"):
            if values[name].size == 0:
                del values[name]
        values["streaming"] = np.array([[stream]], dtype=np.bool_)
        values["exclude_input_in_output"] = np.array([[True]], dtype=np.bool_)
        for source, target in _PASS_THROUGH.items():
            value = _input(request, source) if source in self.inputs else None
            if value is not None:
                values[target] = value
        return [pb_utils.Tensor(name, value) for name, value in values.items()]

    def _tokens(self, response):
        if response.has_error():
            raise text.RequestError(response.error().message())
        ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
        if ids is None:  # the empty final response of a decoupled model
            return []
        lengths = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy().reshape(-1)
        return ids.as_numpy().reshape(-1)[: int(lengths[0])].tolist()  # [1, beam 1, tokens]: the first beam

    def _reply(self, delta, counts=None):
        tensors = [pb_utils.Tensor("text_output", np.array([[delta.encode("utf-8")]], dtype=np.object_))]
        for name, value in (counts or {}).items():
            tensors.append(pb_utils.Tensor(name, np.array([[value]], dtype=np.int32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run(self, request, send):
        """Answer one request; ``send(response, final)`` delivers each response."""
        stream = _flag(request, "stream")
        if stream and not self.decoupled:
            raise text.RequestError("stream=true needs the decoupled deployment (yitrt deploy --streaming); send stream=false")
        pre = self._preprocess(request)
        stop_words = text.strings(_input(request, "stop_words")) if _input(request, "stop_words") is not None else []
        answer = text.TextStream(self.tokenizer, stop_words, self.skip)
        engine = pb_utils.InferenceRequest(model_name=self.engine, inputs=self._engine_inputs(request, pre, stream and self.engine_decoupled),
                                           requested_output_names=["output_ids", "sequence_length"])
        responses = engine.exec(decoupled=True) if self.engine_decoupled else [engine.exec()]
        generated, pieces = 0, []
        for response in responses:
            tokens = self._tokens(response)
            generated += len(tokens)
            delta = answer.add(tokens)
            if stream and delta:
                send(self._reply(delta), False)
            elif delta:
                pieces.append(delta)
        pieces.append(answer.finish())
        counts = {}
        if _flag(request, "return_num_input_tokens"):
            counts["num_input_tokens"] = int(pre["input_lengths"].reshape(-1)[0])
        if _flag(request, "return_num_output_tokens"):
            counts["num_output_tokens"] = generated
        send(self._reply("".join(pieces), counts), True)

    def _serve_decoupled(self, request):
        sender = request.get_response_sender()

        def send(response, final):
            sender.send(response, flags=_FINAL if final else 0)

        try:
            self._run(request, send)
        except Exception as exc:  # noqa: BLE001 - this request's error; the model keeps serving
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(_message(exc))), flags=_FINAL)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                threading.Thread(target=self._serve_decoupled, args=(request,), daemon=True).start()
            return None
        results = [None] * len(requests)

        def answer(i, request):
            def send(response, final):
                results[i] = response
            try:
                self._run(request, send)
            except Exception as exc:  # noqa: BLE001
                results[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(_message(exc)))

        threads = [threading.Thread(target=answer, args=(i, r)) for i, r in enumerate(requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def _message(exc):
    return str(exc) if isinstance(exc, text.RequestError) else f"tensorrt_llm_bls failed: {type(exc).__name__}: {exc}"
