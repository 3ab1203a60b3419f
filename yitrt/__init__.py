"""yitrt: Yi models from Hugging Face to TensorRT-LLM engines served by Triton Inference Server."""

__version__ = "0.1.0"
