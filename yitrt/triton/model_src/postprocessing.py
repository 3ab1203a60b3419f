"""yitrt's ``postprocessing`` model: output token ids → text (the ensemble's last step).

Written by `yitrt deploy` into ``postprocessing/1/model.py`` with ``yitrt_text.py`` beside it. Tensors follow
TensorRT-LLM's contract (reference/triton-repository.md §1.3). Each response is decoded on its own, as the stock
model does: through the ensemble a streamed chunk carries only its new tokens and this model cannot see the ones
before (Triton refuses an ensemble step that mixes the decoupled engine's tensors with the request's own, so not even
the ``stream`` flag can reach it), so a SentencePiece tokenizer's leading spaces and characters split across chunks
are lost there. Stream through ``tensorrt_llm_bls`` instead: it detokenizes incrementally per request.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
import yitrt_text as text


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = text.resolve_dir(text.param(config, "tokenizer_dir", "tokenizer"), args["model_repository"])
        self.tokenizer = text.load_tokenizer(folder)
        self.skip = text.flag(config, "skip_special_tokens", True)

    def _one(self, request):
        tokens = text.array(request, "TOKENS_BATCH")
        lengths = np.asarray(text.array(request, "SEQUENCE_LENGTH")).reshape(-1)
        tokens = tokens[0] if tokens.ndim == 3 else tokens.reshape(1, -1) if tokens.ndim == 1 else tokens  # [beams, tokens]
        texts = [self.tokenizer.decode(beam[: int(length)].tolist(), skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
                 for beam, length in zip(tokens, lengths, strict=True)]
        # 1-D [beams], as the stock model answers (clients index text_output[0].decode()), reference §1.3
        out = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # noqa: BLE001 - this request's error; the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocessing failed: {type(exc).__name__}: {exc}")))
        return responses
