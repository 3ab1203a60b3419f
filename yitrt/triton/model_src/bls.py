"""yitrt's ``tensorrt_llm_bls`` model: one request → preprocessing → tensorrt_llm → text, with incremental streaming.

Written by `yitrt deploy` into ``tensorrt_llm_bls/1/model.py`` with ``yitrt_text.py`` beside it. Tensors follow
TensorRT-LLM's contract (reference/triton-repository.md §1.6); the optional ``messages`` input is yitrt's.
Compared with the stock BLS:
- every request runs in its own thread, so one instance serves many requests at once (stock: one at a time);
- streamed text is the delta of an incremental detokenizer, and a non-streamed answer is the join of the same
  deltas, so streamed text concatenates exactly to the non-streamed text (stock: ``accumulate_tokens`` resends the
  whole text each time);
- stop words end the text where they occur, and text that might begin one is held back until it cannot;
- the engine is always asked for new tokens only; a non-streamed request with ``exclude_input_in_output`` false gets the
  decoded prompt before its answer, as through the ensemble (a streamed one never repeats the prompt, as the engine);
- a stop word is cut from the text with what follows (the ensemble, like the engine, keeps the stop word's text).
- draft-target speculative decoding (``tensorrt_llm_draft_model_name`` set) runs one round per draft: the draft model
  proposes K tokens (``num_draft_tokens``, default this model's ``yitrt_num_draft_tokens``; 0 turns it off), the
  target verifies them in one step and answers the accepted ones plus its own next token; rounds stream their text
  as they finish and many requests run at once (stock: batch 1, no streaming). Every speculative response carries the
  target's ``total_accepted_draft_tokens``/``total_draft_tokens``/``acceptance_rate`` and yitrt's
  ``accepted_draft_tokens`` (per target step in that response).
- LoRA: ``lora_task_id``, ``lora_weights`` and ``lora_config`` go to tensorrt_llm as they came (``lora_weights`` in
  the data type this config declares, BF16 passed as its DLPack capsule: numpy has none); not with draft-target
  rounds (refused: the draft model has no adapter).
Which request tensor feeds which preprocessing and tensorrt_llm input is not written here: deploy derives it from the
ensemble's wiring in its contract table for the TensorRT-LLM line (``yitrt_preprocessing_inputs``,
``yitrt_engine_inputs`` parameters), so renamed tensors (``min_length``/``min_tokens``) follow the line.
"""

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
import yitrt_text as text

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

def _flag(request, name):
    return bool(text.scalar(request, name, bool))


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
        self.pre_map = json.loads(text.param(config, "yitrt_preprocessing_inputs", "{}"))  # request input → preprocessing input
        self.engine_map = json.loads(text.param(config, "yitrt_engine_inputs", "{}"))  # engine input → [source, name]
        if not self.pre_map or not self.engine_map:
            raise pb_utils.TritonModelException("tensorrt_llm_bls: no yitrt_preprocessing_inputs/yitrt_engine_inputs parameters; redeploy with yitrt deploy")
        self.pre_outputs = sorted({name for source, name in self.engine_map.values() if source == "preprocessing"})
        draft = text.param(config, "tensorrt_llm_draft_model_name", "")
        self.draft = draft if draft and not draft.startswith("${") else None
        k = text.param(config, "yitrt_num_draft_tokens", "")
        self.default_draft_tokens = int(k) if k and k.strip().isdigit() and self.draft else 0
        bound = text.param(config, "yitrt_max_draft_len", "")
        self.max_draft_len = int(bound) if bound and bound.strip().isdigit() else None  # None: the target engine checks
        self.default_draft_logits = text.flag(config, "yitrt_use_draft_logits", False)

    # -- one request ------------------------------------------------------------------------------------------
    def _preprocess(self, request):
        inputs = [pb_utils.Tensor(target, text.array(request, source)) for source, target in self.pre_map.items()
                  if text.array(request, source) is not None]
        response = pb_utils.InferenceRequest(model_name=self.preprocessing, inputs=inputs,
                                             requested_output_names=self.pre_outputs).exec()
        if response.has_error():
            raise text.RequestError(response.error().message())
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.pre_outputs}

    def _engine_inputs(self, request, pre, stream):
        values, passed = {}, []
        for target, (source, name) in self.engine_map.items():
            if source == "request" and name == "lora_weights":  # any dtype, BF16 too: passed without numpy
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    passed.append(pb_utils.Tensor.from_dlpack(target, tensor.to_dlpack()))
                continue
            value = pre[name] if source == "preprocessing" else text.array(request, name)
            if value is not None and value.size:  # an empty words list / bias means "none": not sent
                # a BLS input reshaped to a scalar arrives as [batch]; the engine takes it as [batch, 1]
                values[target] = value.reshape(1, -1) if value.ndim == 1 else value
        values["streaming"] = np.array([[stream]], dtype=np.bool_)
        values["exclude_input_in_output"] = np.array([[True]], dtype=np.bool_)
        return [pb_utils.Tensor(name, value) for name, value in values.items()] + passed

    def _tokens(self, response):
        if response.has_error():
            raise text.RequestError(response.error().message())
        ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
        if ids is None:  # the empty final response of a decoupled model
            return []
        lengths = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy().reshape(-1)
        if lengths.size and lengths[0] < 0:  # the reference slot's mark of a stream that failed part-way (its error: server log)
            raise text.RequestError(f"{self.engine} failed during the answer (the error is in the server log)")
        return ids.as_numpy().reshape(-1)[: int(lengths[0])].tolist()  # [1, beam 1, tokens]: the first beam

    def _reply(self, delta, counts=None, extra=None):
        # text_output is 1-D [1] like the stock BLS's and the ensemble's (postprocessing OUTPUT); counts are the
        # engine's [1, 1] (reference §1.4, §1.6)
        tensors = [pb_utils.Tensor("text_output", np.array([delta.encode("utf-8")], dtype=np.object_))]
        for name, value in (counts or {}).items():
            tensors.append(pb_utils.Tensor(name, np.array([[value]], dtype=np.int32)))
        tensors += [pb_utils.Tensor(name, value) for name, value in (extra or {}).items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _draft_tokens(self, request):
        """K for this request: its num_draft_tokens, else the deployment's default (0: no speculation)."""
        k = text.scalar(request, "num_draft_tokens")
        k = self.default_draft_tokens if k is None else int(k)
        if k < 0:
            raise text.RequestError(f"num_draft_tokens must be >= 0, got {k}")
        if k and not self.draft:
            raise text.RequestError("cannot perform speculative decoding without draft model (tensorrt_llm_draft_model_name is not set)")
        if self.max_draft_len is not None and k > self.max_draft_len:
            raise text.RequestError(f"num_draft_tokens {k} is larger than the target's max_draft_len {self.max_draft_len}; send at most that")
        return k

    def _call(self, model, inputs, outputs):
        """One non-streamed request to an LLM model: (tokens, {output name: numpy array} of its last response)."""
        engine = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor(n, v) for n, v in inputs.items()],
                                           requested_output_names=outputs)
        responses = engine.exec(decoupled=True) if self.engine_decoupled else [engine.exec()]
        tokens, last = [], {}
        for response in responses:
            tokens += self._tokens(response)
            for name in outputs:
                tensor = pb_utils.get_output_tensor_by_name(response, name)
                if tensor is not None:
                    last[name] = tensor.as_numpy()
        return tokens, last

    def _speculate(self, request, pre, k, answer, emit):
        """Draft-target rounds until the answer ends; ``emit(tokens, accepted, drafted)`` takes each round's tokens.
        Returns the number of generated tokens."""
        base = {t.name(): t.as_numpy() for t in self._engine_inputs(request, pre, False)}
        prompt = base["input_ids"].reshape(-1)[: int(base["input_lengths"].reshape(-1)[0])].tolist()
        max_new = int(base["request_output_len"].reshape(-1)[0])
        use_logits = text.scalar(request, "use_draft_logits", bool)
        use_logits = self.default_draft_logits if use_logits is None else bool(use_logits)
        generated = []
        while len(generated) < max_new and not answer.stopped:
            ids = np.array([prompt + generated], dtype=np.int32)
            round_inputs = dict(base, input_ids=ids, input_lengths=np.array([[ids.shape[1]]], dtype=np.int32))
            n = min(k, max_new - len(generated) - 1)
            draft, draft_logits = [], None
            if n > 0:
                ask = dict(round_inputs, request_output_len=np.array([[n]], dtype=np.int32), min_tokens=np.array([[n]], dtype=np.int32),
                           return_generation_logits=np.array([[use_logits]], dtype=np.bool_))
                wanted = ["output_ids", "sequence_length"] + (["generation_logits"] if use_logits else [])
                draft, out = self._call(self.draft, ask, wanted)
                if use_logits and "generation_logits" in out:
                    draft_logits = out["generation_logits"].reshape(-1, out["generation_logits"].shape[-1])[: len(draft)]
                    draft_logits = draft_logits.reshape(1, len(draft), -1)
            check = dict(round_inputs, request_output_len=np.array([[len(draft) + 1]], dtype=np.int32),
                         return_perf_metrics=np.array([[True]], dtype=np.bool_))
            if "min_tokens" in base:  # the request's minimum counts over all rounds
                check["min_tokens"] = np.maximum(base["min_tokens"] - len(generated), 0).astype(base["min_tokens"].dtype)
            if draft:
                check["draft_input_ids"] = np.array([draft], dtype=np.int32)
                if draft_logits is not None:
                    check["draft_logits"] = draft_logits
            tokens, out = self._call(self.engine, check, ["output_ids", "sequence_length", "total_accepted_draft_tokens"])
            accepted = int(out["total_accepted_draft_tokens"].reshape(-1)[0]) if draft and "total_accepted_draft_tokens" in out else 0
            tokens = tokens[: max_new - len(generated)]
            generated += tokens
            emit(tokens, accepted, len(draft))
            if not tokens or len(tokens) <= accepted:  # no progress, or the end id (not part of the output) ended it
                break
        return len(generated)

    def _spec_outputs(self, steps, totals):
        accepted, drafted = totals[0], totals[1]
        return {"accepted_draft_tokens": np.array([steps], dtype=np.int32).reshape(1, len(steps)),
                "total_accepted_draft_tokens": np.array([[accepted]], dtype=np.int32),
                "total_draft_tokens": np.array([[drafted]], dtype=np.int32),
                "acceptance_rate": np.array([[accepted / drafted if drafted else 0.0]], dtype=np.float32)}

    def _run(self, request, send):
        """Answer one request; ``send(response, final)`` delivers each response."""
        stream = _flag(request, "stream")
        if stream and not self.decoupled:
            raise text.RequestError("stream=true needs the decoupled deployment (yitrt deploy --streaming); send stream=false")
        k = self._draft_tokens(request)
        if k and any(pb_utils.get_input_tensor_by_name(request, n) is not None for n in ("lora_task_id", "lora_weights", "lora_config")):
            raise text.RequestError("LoRA adapters are not served with draft-target speculation (the draft has no adapter); send num_draft_tokens 0")
        pre = self._preprocess(request)
        stop_words = text.strings(text.array(request, "stop_words")) if text.array(request, "stop_words") is not None else []
        answer = text.TextStream(self.tokenizer, stop_words, self.skip)
        generated, pieces, steps, totals = 0, [], [], [0, 0, 0]
        if k:
            count_rounds = _flag(request, "return_num_output_tokens")

            def emit(tokens, accepted, drafted):
                steps.append(accepted)
                totals[0] += accepted
                totals[1] += drafted
                totals[2] += len(tokens)
                delta = answer.add(tokens)
                if stream:  # one response per target step; with its running output count when counts are asked for
                    counts = {"num_output_tokens": totals[2]} if count_rounds else None
                    send(self._reply(delta, counts, self._spec_outputs([accepted], totals)), False)
                    steps.clear()
                elif delta:
                    pieces.append(delta)

            generated = self._speculate(request, pre, k, answer, emit)
        else:
            engine = pb_utils.InferenceRequest(model_name=self.engine, inputs=self._engine_inputs(request, pre, stream and self.engine_decoupled),
                                               requested_output_names=["output_ids", "sequence_length"])
            responses = engine.exec(decoupled=True) if self.engine_decoupled else [engine.exec()]
            for response in responses:
                tokens = self._tokens(response)
                generated += len(tokens)
                delta = answer.add(tokens)
                if stream and delta:
                    send(self._reply(delta), False)
                elif delta:
                    pieces.append(delta)
        pieces.append(answer.finish())
        if not stream and text.scalar(request, "exclude_input_in_output", bool) is False:
            # asked for the prompt too, as the ensemble gives it: its tokens decoded, before the answer
            prompt = pre["INPUT_ID"].reshape(-1)[: int(pre["REQUEST_INPUT_LEN"].reshape(-1)[0])].tolist()
            pieces.insert(0, self.tokenizer.decode(prompt, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False))
        counts = {}
        if _flag(request, "return_num_input_tokens"):
            counts["num_input_tokens"] = int(pre["REQUEST_INPUT_LEN"].reshape(-1)[0])
        if _flag(request, "return_num_output_tokens"):
            counts["num_output_tokens"] = generated
        send(self._reply("".join(pieces), counts, self._spec_outputs(steps, totals) if k else None), True)

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
