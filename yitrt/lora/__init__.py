"""LoRA adapters: the module table, TensorRT-LLM's request format, and PEFT → TensorRT-LLM conversion (issue #20)."""

#: the request arrays of one converted adapter, as TensorRT-LLM's tools name them (hf_lora_convert.py, lora_prefetch_dir)
WEIGHTS_NAME = "model.lora_weights.npy"
CONFIG_NAME = "model.lora_config.npy"
NPY_FILES = (WEIGHTS_NAME, CONFIG_NAME)
#: the PEFT copy inside a converted adapter's folder (what ``trtllm-build --lora_dir`` reads)
HF_DIR = "hf"
