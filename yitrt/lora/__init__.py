"""LoRA adapters: the module table, TensorRT-LLM's request format, and PEFT → TensorRT-LLM conversion (issue #20)."""

#: the request arrays of one converted adapter, as TensorRT-LLM's tools name them (hf_lora_convert.py, lora_prefetch_dir)
WEIGHTS_NAME = "model.lora_weights.npy"
CONFIG_NAME = "model.lora_config.npy"
NPY_FILES = (WEIGHTS_NAME, CONFIG_NAME)
#: TensorRT-LLM's defaults for the tensorrt_llm model's unset lora_cache_* parameters (trtllm-serving-features.md §2.5)
#: and trtllm-build's default --max_lora_rank (§2.1): the one place yitrt spells them
DEFAULT_OPTIMAL_ADAPTER_SIZE = 8
DEFAULT_MAX_ADAPTER_SIZE = 64
DEFAULT_GPU_MEMORY_FRACTION = 0.05
DEFAULT_HOST_MEMORY_BYTES = 1 << 30
DEFAULT_MAX_LORA_RANK = 64
#: the PEFT copy inside a converted adapter's folder (what ``trtllm-build --lora_dir`` reads)
HF_DIR = "hf"
