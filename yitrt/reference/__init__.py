"""The reference runtime: TensorRT-LLM checkpoints computed with torch (CPU or CUDA), and ``yitrt verify``.

Import-light on purpose (no torch here): the CLI builds its choices from these names.
"""

#: devices the runtime runs on; auto = CUDA when available
DEVICES = ("auto", "cpu", "cuda")
#: the evaluation `yitrt verify` scores by default (tokens of the text, tokens per window); `yitrt quantize`
#: records its calibrated model on the same, so that a plain verify can run the pipeline check
EVAL_TOKENS = 1024
EVAL_WINDOW = 512
#: arithmetic dtypes of the runtime (and of the original during verification); float32 adds no rounding of its own
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
