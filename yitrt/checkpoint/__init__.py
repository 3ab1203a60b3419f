"""TensorRT-LLM checkpoints: safetensors streaming I/O, sharding rules, the checkpoint config, conversion."""
