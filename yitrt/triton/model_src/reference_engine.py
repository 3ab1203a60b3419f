"""The CPU reference engine slot: a ``tensorrt_llm`` model served by yitrt's reference runtime, not TensorRT-LLM.

FOR TESTS AND THE DEMO ON MACHINES WITHOUT A GPU. `yitrt deploy --engine reference CKPT` writes this file into
``tensorrt_llm/1/model.py`` with the same config.pbtxt tensors as the real ``tensorrtllm`` backend model, so the
rest of the repository (ensemble, preprocessing, postprocessing, BLS) runs unchanged. It keeps the backend's
request semantics that the other models rely on:
- decoupled mode: streaming sends one response per new token, then an empty final response; without streaming
  one response with every token, then the final flag;
- ``exclude_input_in_output`` (parameter, per-request input wins), ``end_id`` (the end token is not returned, and not
  chosen before ``min_tokens``/``min_length`` new tokens),
  ``stop_words_list`` (the stop word's tokens are returned, the sequence ends), ``request_output_len`` capped to
  ``max_seq_len`` minus the prompt, prompts over ``max_input_len`` refused;
- greedy unless ``runtime_top_k`` > 1 or ``runtime_top_p`` > 0 (with ``temperature`` and ``seed``/``random_seed``);
- ``stop`` = true cancels the in-flight request with the same Triton request id: it gets its final response with the
  tokens generated so far, the stop request an empty one (the stock client sends input_lengths 0 and
  request_output_len 0 with it);
- words lists whose offsets are all -1 mean "no words" (the stock preprocessing's ``""``); the worker refuses input
  ids outside the vocab per request (the reference runtime's own check);
- LoRA: ``lora_task_id`` selects an adapter; the first request of a task also carries ``lora_weights`` (the data type
  this config declares: FP16, FP32 or BF16 — read through DLPack, numpy has no bfloat16) and ``lora_config``; the
  worker's adapter cache (``yitrt.reference.engine.adapters``, sized by the ``lora_cache_*`` parameters) validates and
  keeps them, and refuses an unknown id with the engine's "LoRA task N not found in cache" message.
Generation runs in a worker process (``python -m yitrt.triton.reference_worker``) started with the interpreter
named by the ``python_executable`` parameter (or ``YITRT_REFERENCE_PYTHON``): Triton's Python stub embeds a Python
without torch. The worker runs yitrt's model of TensorRT-LLM's batch manager (``yitrt.reference.engine``: in-flight
batching, a paged KV pool, KV-block reuse), configured by this model's own parameters (``ENGINE_PARAMETERS``), and
reports its numbers, which this model exports as the C++ backend's custom metrics (``nv_trt_llm_*``) on the server's
metrics port.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils
import yitrt_text as text

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
#: sequence_length of the final response that ends a stream failed after some tokens (read by yitrt's BLS model).
FAILED_LENGTH = -1
#: Sampling inputs the slot does not emulate, with the value that means "off".
_NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "len_penalty": 1.0}
#: Outputs the slot does not compute: asking for them is refused (False, the stock clients' default, is fine).
_NOT_RETURNED = ("return_log_probs", "return_context_logits")
#: The tensorrt_llm parameters that configure the worker's batch manager (yitrt.reference.engine.parameters).
ENGINE_PARAMETERS = ("max_num_tokens", "tokens_per_block", "max_tokens_in_paged_kv_cache", "yitrt_kv_cache_bytes",
                     "kv_cache_host_memory_bytes", "enable_kv_cache_reuse", "enable_chunked_context", "batch_scheduler_policy",
                     "yitrt_max_draft_len", "decoding_mode", "lookahead_window_size", "lookahead_ngram_size",
                     "lookahead_verification_set_size", "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size",
                     "lora_cache_gpu_memory_fraction", "lora_cache_host_memory_bytes", "lora_prefetch_dir",
                     "yitrt_lora_free_memory_bytes", "yitrt_max_lora_rank", "yitrt_lora_target_modules")
#: per-request lookahead inputs: all three or none (T-utils getLookaheadDecodingFromTensors)
_LOOKAHEAD_INPUTS = ("lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size")
_NP_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_BF16": np.float32}
#: Metric families as the C++ backend names them (custom_metrics_reporter): family → (label key, description).
METRIC_FAMILIES = {
    "kv_cache_block": ("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "TRT LLM KV cache block metrics"),
    "request": ("nv_trt_llm_request_metrics", "request_type", "TRT LLM request metrics"),
    "inflight_batcher": ("nv_trt_llm_inflight_batcher_metrics", "inflight_batcher_specific_metric", "TRT LLM inflight_batcher-specific metrics"),
    "general": ("nv_trt_llm_general_metrics", "general_type", "General TRT LLM metrics"),
}
_UNSUPPORTED = ("prompt_embedding_table", "encoder_input_features", "guided_decoding_guide_type", "context_phase_params")
#: lora_weights' declared data type → the worker's name for it
_LORA_DTYPES = {"TYPE_FP16": "float16", "TYPE_FP32": "float32", "TYPE_BF16": "bfloat16"}


class _Pending:
    """One request in flight: where its tokens go, and how its answer is shaped."""

    def __init__(self, sender, prompt, streaming, exclude_input, counts, request_id=""):
        self.sender, self.prompt, self.streaming, self.exclude_input = sender, prompt, streaming, exclude_input
        self.request_id = request_id  # the client's Triton request id: what a stop request names
        self.counts = counts  # which of num_input_tokens / num_output_tokens the request asked for
        self.tokens = []
        self.perf = False  # return_perf_metrics: timing and speculation outputs
        self.logits = None  # return_generation_logits: one float32 row per generated token
        self.accepted = self.drafted = 0
        self.times = {"arrival_time_ns": time.time_ns()}
        self.error = None
        self.done = threading.Event()
        self.response = None


def _no_tokens(length):
    """A response with no output ids and ``sequence_length`` ``length`` (0, or FAILED_LENGTH)."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output_ids", np.zeros((1, 1, 0), dtype=np.int32)),
                                                      pb_utils.Tensor("sequence_length", np.full((1, 1), length, dtype=np.int32))])


def bf16_values(tensor):
    """A BF16 ``pb_utils.Tensor`` (on CPU) as float32 values, read through its DLPack capsule: numpy has no bfloat16 and
    the Python backend's ``as_numpy()`` does not convert it, and this stub has no torch. A bf16 value is the upper half
    of a float32, so shifting the 16 bits up is exact."""
    import ctypes

    class Device(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]

    class DataType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class DLTensor(ctypes.Structure):  # dlpack.h; DLManagedTensor begins with it
        _fields_ = [("data", ctypes.c_void_p), ("device", Device), ("ndim", ctypes.c_int), ("dtype", DataType),
                    ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                    ("byte_offset", ctypes.c_uint64)]

    capsule = tensor.to_dlpack()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    view = DLTensor.from_address(get(capsule, b"dltensor"))
    if view.device.device_type != 1 or view.dtype.bits != 16 or view.dtype.code != 4:  # kDLCPU; kDLBfloat, 16 bits
        raise ValueError(f"lora_weights arrived as DLPack type code {view.dtype.code}/{view.dtype.bits} bits on device "
                         f"type {view.device.device_type}, not BF16 on the CPU")
    shape = [view.shape[i] for i in range(view.ndim)]
    count = int(np.prod(shape)) if shape else 1
    raw = ctypes.string_at(view.data + view.byte_offset, count * 2) if count else b""
    bits = np.frombuffer(raw, dtype=np.uint16).reshape(shape)
    del capsule  # after the copy: the capsule owns the buffer
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _die_with_stub():
    """preexec_fn for the worker: SIGKILL when this stub dies (PR_SET_PDEATHSIG), or at once if it already has.
    What ``yitrt.triton.launcher.die_with_parent`` does for tritonserver; this file runs in the stub, without yitrt."""
    import ctypes
    import signal

    prctl, stub = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up before the fork

    def preexec():
        prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != stub:
            os._exit(1)

    return preexec


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.checkpoint = text.param(config, "gpt_model_path")
        self.max_input_len = int(text.param(config, "max_input_len", "0")) or None
        self.max_seq_len = int(text.param(config, "max_seq_len", "0")) or None
        self.exclude_input = text.flag(config, "exclude_input_in_output", False)
        python = os.environ.get("YITRT_REFERENCE_PYTHON") or text.param(config, "python_executable")
        if not self.checkpoint or not os.path.isdir(self.checkpoint):
            raise pb_utils.TritonModelException(f"reference engine slot: checkpoint folder {self.checkpoint!r} does not exist (parameter gpt_model_path)")
        if not python or not os.path.isfile(python):
            raise pb_utils.TritonModelException(f"reference engine slot: interpreter {python!r} not found; set YITRT_REFERENCE_PYTHON to a Python with yitrt installed")
        params = {key: text.param(config, key) for key in ENGINE_PARAMETERS if text.param(config, key) is not None}
        params["max_batch_size"] = text.param(config, "max_batch_size", str(config.get("max_batch_size") or 8))
        logits_type = next((o.get("data_type") for o in config.get("output", []) if o.get("name") == "generation_logits"), "TYPE_FP32")
        lora_type = next((i.get("data_type") for i in config.get("input", []) if i.get("name") == "lora_weights"), "TYPE_FP16")
        self.lora_dtype = _LORA_DTYPES.get(lora_type)
        self.logits_dtype = _NP_DTYPES.get(logits_type, np.float32)
        argv = [python, "-m", "yitrt.triton.reference_worker", self.checkpoint, "--engine-params", json.dumps(params)]
        self.worker = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                       preexec_fn=_die_with_stub())
        first = self.worker.stdout.readline()
        hello = json.loads(first) if first.strip() else {"ready": False, "error": f"worker exited with code {self.worker.poll()}"}
        if not hello.get("ready"):
            raise pb_utils.TritonModelException(f"reference engine slot: the worker did not start: {hello.get('error')}")
        for warning in hello.get("warnings") or ():
            sys.stderr.write(f"reference engine slot: {warning}\n")
        self.model_name, self.model_version = args.get("model_name", "tensorrt_llm"), str(args.get("model_version", "1"))
        self.metrics = self._metrics()
        self._report(hello.get("stats") or {})  # every gauge exists (at its idle value) before the first request
        self.pending = {}
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _metrics(self):
        """Gauges of every family and label the worker reports, labelled like the C++ backend's (model, version)."""
        gauges = {}
        self.families = []  # kept alive: a family's metrics go away with it
        for group, (name, label, description) in METRIC_FAMILIES.items():
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
            self.families.append(family)
            gauges[group] = (family, label, {})
        return gauges

    def _report(self, stats):
        for group, values in stats.items():
            if group not in self.metrics:
                continue
            family, label, metrics = self.metrics[group]
            for key, value in values.items():
                if key not in metrics:
                    metrics[key] = family.Metric(labels={"model": self.model_name, "version": self.model_version, label: key})
                metrics[key].set(float(value))

    # -- requests ---------------------------------------------------------------------------------------------
    def _stop(self, request):
        """A stop request: cancel every in-flight request with its Triton request id (none may be left: it finished).
        The empty id is an id like any other: the stock client sends both requests without one by default, and the
        C++ backend maps every empty id to the same executor id (0), so its stop cancels them."""
        request_id = request.request_id()
        with self.lock:
            keys = [key for key, item in self.pending.items() if item.request_id == request_id]
        for key in keys:
            self._send({"cancel": key})

    def _send(self, message):
        with self.send_lock:
            self.worker.stdin.write(json.dumps(message) + "\n")
            self.worker.stdin.flush()

    def _submit(self, request, sender):
        for name in _UNSUPPORTED:
            if text.array(request, name) is not None:
                raise ValueError(f"the CPU reference engine slot does not support input '{name}'")
        for name in _NOT_RETURNED:
            if text.scalar(request, name, bool):
                raise ValueError(f"the CPU reference engine slot does not compute what {name} asks for; send it false")
        ids = text.array(request, "input_ids")
        if ids is None:
            raise ValueError("input_ids is required")
        prompt = [int(i) for i in np.asarray(ids).reshape(-1)]
        length = text.scalar(request, "input_lengths")
        if length is not None:
            if not 0 <= length <= len(prompt):
                raise ValueError(f"input_lengths {length} does not fit the {len(prompt)} input_ids sent")
            prompt = prompt[:length]
        if not prompt:
            raise ValueError("empty prompt (input_lengths 0)")
        if self.max_input_len and len(prompt) > self.max_input_len:
            raise ValueError(f"Prompt length ({len(prompt)}) exceeds maximum input length ({self.max_input_len}).")
        max_new = text.scalar(request, "request_output_len")
        if max_new is None or max_new < 1:
            raise ValueError(f"request_output_len must be >= 1, got {max_new}")
        if self.max_seq_len:
            max_new = min(max_new, self.max_seq_len - len(prompt))
            if max_new < 1:
                raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room under max_seq_len ({self.max_seq_len})")
        if (text.scalar(request, "beam_width") or 1) != 1 or (text.scalar(request, "num_return_sequences") or 1) != 1:
            raise ValueError("the CPU reference engine slot generates one sequence per request (beam_width 1)")
        # features the slot does not emulate are refused, never silently ignored (empty tensors mean "none")
        for name, neutral in _NEUTRAL.items():
            value = text.scalar(request, name, float)
            if value is not None and value != neutral:
                raise ValueError(f"the CPU reference engine slot does not support {name} (got {value:g}); leave it unset")
        bad = text.array(request, "bad_words_list")
        if bad is not None and text.from_words_list(bad, "bad_words_list"):  # all offsets -1: no words
            raise ValueError("the CPU reference engine slot does not support bad_words_list; leave it unset")
        bias = text.array(request, "embedding_bias")
        if bias is not None and np.any(bias):  # all zeros adds nothing
            raise ValueError("the CPU reference engine slot does not support embedding_bias; leave it unset")
        min_new = text.scalar(request, "min_tokens")  # min_length before the 1.2 line
        min_new = text.scalar(request, "min_length") if min_new is None else min_new
        if min_new is not None and min_new < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_new}")
        end_id = text.scalar(request, "end_id")
        words = text.array(request, "stop_words_list")
        sequences = [] if words is None else text.from_words_list(words, "stop_words_list")
        top_k = text.scalar(request, "runtime_top_k") or 0
        top_p = text.scalar(request, "runtime_top_p", float) or 0.0
        temperature = text.scalar(request, "temperature", float)
        seed = text.scalar(request, "seed")
        seed = text.scalar(request, "random_seed") if seed is None else seed
        # the executor's SamplingConfig checks (TensorRT-LLM refuses these values the same way)
        if top_k < 0 or not 0.0 <= top_p <= 1.0 or (temperature is not None and temperature <= 0.0):
            raise ValueError(f"invalid sampling: runtime_top_k {top_k} must be >= 0, runtime_top_p {top_p} in [0, 1], "
                             f"temperature {temperature} > 0")
        greedy = top_k <= 1 and top_p <= 0.0
        sampling = {"greedy": greedy, "temperature": 1.0 if temperature is None else temperature,
                    "top_k": int(top_k), "top_p": float(top_p) if top_p > 0 else 1.0, "seed": int(seed or 0)}
        streaming = bool(text.scalar(request, "streaming", bool) or False)
        if streaming and not self.decoupled:
            raise ValueError("Streaming is only supported if model is deployed using decoupled mode.")
        exclude = text.scalar(request, "exclude_input_in_output", bool)
        counts = {name for name in ("num_input_tokens", "num_output_tokens") if text.scalar(request, f"return_{name}", bool)}
        message = {"input_ids": prompt, "max_new": int(max_new), "min_new": int(min_new or 0), "end_ids": [] if end_id is None or end_id < 0 else [end_id],
                   "stop_sequences": sequences, "sampling": sampling}
        message.update(self._speculation(request))
        message.update(self._lora(request))
        item = _Pending(sender, prompt, streaming, self.exclude_input if exclude is None else exclude, counts, request.request_id())
        item.perf = bool(text.scalar(request, "return_perf_metrics", bool))
        if text.scalar(request, "return_generation_logits", bool):
            item.logits, message["return_logits"] = [], True
        key = uuid.uuid4().hex
        with self.lock:
            self.pending[key] = item
        self._send({"id": key, **message})
        return item

    @staticmethod
    def _speculation(request):
        """The request's draft (draft_input_ids, draft_logits, draft_acceptance_threshold) or lookahead sizes, as
        worker fields (the worker checks them against the model)."""
        out = {}
        draft = text.array(request, "draft_input_ids")
        if draft is not None and np.asarray(draft).size:
            out["draft"] = [int(t) for t in np.asarray(draft).reshape(-1)]
            logits = text.array(request, "draft_logits")
            if logits is not None and np.asarray(logits).size:
                rows = np.asarray(logits, dtype=np.float32).reshape(-1, np.asarray(logits).shape[-1])
                if rows.shape[0] != len(out["draft"]):
                    raise ValueError(f"draft_logits has {rows.shape[0]} rows for {len(out['draft'])} draft tokens")
                out["draft_logits"] = base64.b64encode(np.ascontiguousarray(rows).tobytes()).decode()
            threshold = text.scalar(request, "draft_acceptance_threshold", float)
            if threshold is not None:
                out["draft_threshold"] = float(threshold)
        sizes = [text.scalar(request, name) for name in _LOOKAHEAD_INPUTS]
        if any(v is not None for v in sizes):
            if any(v is None for v in sizes):
                raise ValueError("lookahead_window_size, lookahead_ngram_size and lookahead_verification_set_size must be sent together")
            out["lookahead"] = [int(v) for v in sizes]
        return out

    def _lora(self, request):
        """The request's LoRA task id and arrays as worker fields (the worker's adapter cache checks them)."""
        out = {}
        task = text.scalar(request, "lora_task_id")
        tensor = pb_utils.get_input_tensor_by_name(request, "lora_weights")
        config = text.array(request, "lora_config")
        if task is not None:
            out["lora_task_id"] = int(task)
        if tensor is not None:
            if self.lora_dtype is None:
                raise ValueError("lora_weights must be declared TYPE_FP16, TYPE_BF16 or TYPE_FP32 in this model's config")
            values = bf16_values(tensor) if self.lora_dtype == "bfloat16" else tensor.as_numpy()
            if values.size:  # empty: not sent
                out["lora_weights"] = base64.b64encode(np.ascontiguousarray(values).tobytes()).decode()
                out["lora_shape"] = list(values.shape)
                out["lora_dtype"] = self.lora_dtype
        if config is not None and np.asarray(config).size:
            out["lora_config"] = np.asarray(config).astype(np.int64).tolist()
        return out

    def _tensors(self, item, tokens):
        ids = tokens if item.exclude_input or item.streaming else item.prompt + tokens
        tensors = [pb_utils.Tensor("output_ids", np.array([[ids]], dtype=np.int32).reshape(1, 1, len(ids))),
                   pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32))]
        counts = {"num_input_tokens": len(item.prompt), "num_output_tokens": len(item.tokens)}  # generated so far
        tensors += [pb_utils.Tensor(name, np.array([[counts[name]]], dtype=np.int32)) for name in sorted(item.counts)]
        if item.logits is not None:
            rows = item.logits[-len(tokens):] if tokens and item.streaming else item.logits
            vocab = rows[0].size if rows else 0
            block = np.stack(rows).astype(self.logits_dtype) if rows else np.zeros((0, vocab), dtype=self.logits_dtype)
            tensors.append(pb_utils.Tensor("generation_logits", block.reshape(1, 1, len(rows), vocab)))
        if item.perf:
            item.times.setdefault("last_token_time_ns", time.time_ns())
            tensors += [pb_utils.Tensor(name, np.array([[item.times.get(name, 0)]], dtype=np.int64))
                        for name in ("arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns")]
            rate = item.accepted / item.drafted if item.drafted else 0.0
            tensors += [pb_utils.Tensor("acceptance_rate", np.array([[rate]], dtype=np.float32)),
                        pb_utils.Tensor("total_accepted_draft_tokens", np.array([[item.accepted]], dtype=np.int32)),
                        pb_utils.Tensor("total_draft_tokens", np.array([[item.drafted]], dtype=np.int32))]
        return tensors

    def _read(self):
        for line in self.worker.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "stats" in message:
                try:
                    self._report(message["stats"])
                except Exception as exc:  # noqa: BLE001 - metrics never stop the answers
                    sys.stderr.write(f"reference engine slot: metrics not updated: {exc}\n")
                continue
            with self.lock:
                item = self.pending.get(message.get("id"))
            if item is None:
                continue
            if "error" in message:
                item.error = message["error"]
                self._finish(message["id"], item)
                continue
            finish = message["finish"]
            new = list(message["tokens"]) if "tokens" in message else [message["token"]]
            if finish in ("end_id", "cancelled"):
                new = new[:-1]  # the end id is not part of the output, as on the engine
            if "accepted" in message:
                item.accepted += message["accepted"]
                item.drafted += message["drafted"]
            if item.logits is not None and message.get("logits") and new:
                item.logits.append(np.frombuffer(base64.b64decode(message["logits"]), dtype=np.float32))
            now = time.time_ns()
            item.times.setdefault("first_scheduled_time_ns", now)
            if new:
                item.times.setdefault("first_token_time_ns", now)
                item.times["last_token_time_ns"] = now
            item.tokens.extend(new)
            if item.streaming and new:
                item.sender.send(pb_utils.InferenceResponse(output_tensors=self._tensors(item, new)))
            if finish is not None:
                self._finish(message["id"], item)
        with self.lock:  # the worker died: fail whatever is still waiting
            stranded = list(self.pending.items())
        for key, item in stranded:
            item.error = "the reference worker process exited"
            self._finish(key, item)

    def _finish(self, key, item):
        with self.lock:
            self.pending.pop(key, None)
        if item.error is not None:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(item.error))
        elif item.streaming:
            response = None
        else:
            response = pb_utils.InferenceResponse(output_tensors=self._tensors(item, item.tokens))
        if item.sender is not None:
            if response is None:
                item.sender.send(flags=_FINAL)
            elif item.error is not None and item.tokens:
                # an error after streamed responses: the error (clients and the ensemble see it), then a final response
                # with sequence_length FAILED_LENGTH — a BLS caller's response iterator (Python backend of Triton 2.51,
                # seen here) never yields an error response sent at that point, so without it the BLS would end the
                # answer as if it were complete (and with the final flag on the error itself, it waited forever)
                sys.stderr.write(f"reference engine slot: request failed after {len(item.tokens)} tokens: {item.error}\n")
                item.sender.send(response)
                item.sender.send(_no_tokens(FAILED_LENGTH), flags=_FINAL)
            else:
                item.sender.send(response, flags=_FINAL)
        item.response = response
        item.done.set()

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                sender = request.get_response_sender()
                try:
                    if text.scalar(request, "stop", bool):
                        self._stop(request)
                        sender.send(flags=_FINAL)  # the stop request itself: an empty final response
                    else:
                        self._submit(request, sender)
                except Exception as exc:  # noqa: BLE001 - this request's error; the model keeps serving
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=_FINAL)
            return None
        items = []
        for request in requests:
            try:
                if text.scalar(request, "stop", bool):  # nothing else runs on this instance while it waits: nothing to stop
                    self._stop(request)
                    items.append(_no_tokens(0))
                else:
                    items.append(self._submit(request, None))
            except Exception as exc:  # noqa: BLE001
                items.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        responses = []
        for item in items:
            if isinstance(item, _Pending):
                item.done.wait()
                responses.append(item.response)
            else:
                responses.append(item)
        return responses

    def finalize(self):
        worker = getattr(self, "worker", None)
        if worker is not None and worker.poll() is None:
            worker.stdin.close()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()

