"""The CPU reference slot's engine loop: an executable model of TensorRT-LLM's batch manager.

``scheduler`` decides each iteration (in-flight batching under ``max_batch_size`` / ``max_num_tokens``, chunked
context, the ``guaranteed_no_evict`` and ``max_utilization`` capacity policies), ``kv_pool`` keeps the paged KV
cache's block accounting (primary pool, optional host pool) and its tensors on each rank, ``prefix_tree`` finds
reusable blocks of shared prefixes (per LoRA task), ``adapters`` is the LoRA adapter cache keyed by task id (host and
device tiers of pages, as TensorRT-LLM's PEFT cache), and ``loop`` runs iterations on a ``ReferenceRuntime``. The arithmetic is the
reference runtime's, arranged so that a sequence's answer does not depend on what it was batched with (see
``RankModel.forward_packed``). This is for tests and the demo: it is not TensorRT-LLM and its speed says nothing
about a GPU's.
"""
