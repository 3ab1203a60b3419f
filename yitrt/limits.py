"""Upper bounds that several layers enforce on sizes a user sets (one owner for each number).

A bound here is what the consumer of the value can hold, never a guess about what is sensible: Triton's config
fields and TensorRT-LLM's sizes are 32-bit, and every instance of a Python model is a process of its own.
"""

from __future__ import annotations

#: Triton's ModelConfig integers (max_batch_size, instance_group count) and TensorRT-LLM's SizeType32 sizes.
INT32_MAX = (1 << 31) - 1
#: Instances of each Python model of a repository: every one is a stub process with its own interpreter and
#: tokenizer (~0.3 GB resident), so more than this is a typo, not a deployment.
MAX_INSTANCES = 128
