"""LoRA adapters: the module table, TensorRT-LLM's request format, and PEFT → TensorRT-LLM conversion (issue #20)."""
