"""trtllm-build: argv per TensorRT-LLM version, plugin profiles, the runner, engine manifests, doctor."""
