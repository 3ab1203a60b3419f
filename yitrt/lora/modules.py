"""The LoRA module table: HF PEFT module name ↔ TensorRT-LLM LoRA module, its id, base tensor, split and dims.

Derived from the ``lora`` column of the tensor table (``yitrt.models.llama.LLAMA_TENSORS``), so there is one
list of adaptable linears: the TensorRT-LLM module names and ids are LMOD-h ``ModuleType`` / LMGR
``LORA_MODULE_IDS`` (trtllm-serving-features.md §2.2). Note the fc/gate naming, the same as for base weights:
``mlp_h_to_4h`` (id 5) adapts HF ``gate_proj`` (the SiLU branch, ``mlp.fc``) and ``mlp_gate`` (id 7) adapts
``up_proj`` (``mlp.gate``).

Dims follow TensorRT-LLM's runtime (LMOD-cpp ``createLoraModules``): it computes every module's in/out from
the per-rank model config multiplied back by tp, so the sizes are global except for k/v when tp > num_kv_heads:
the runtime then expects ``local_kv_heads · tp · head_dim`` rows of B (the KV heads repeated per rank, like the
base weights) — trtllm-serving-features.md §2.6, UNCONFIRMED there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yitrt.models.llama import LLAMA_TENSORS, Kind, Split

#: Every TensorRT-LLM LoRA module id → name (LMOD-h ``ModuleType``, newest LMGR ``LORA_MODULE_IDS``; §2.2),
#: including those no Yi model has: messages about request tensors name the module an id stands for.
TRTLLM_MODULE_IDS: dict[str, int] = {
    "attn_qkv": 0, "attn_q": 1, "attn_k": 2, "attn_v": 3, "attn_dense": 4,
    "mlp_h_to_4h": 5, "mlp_4h_to_h": 6, "mlp_gate": 7,
    "cross_attn_qkv": 8, "cross_attn_q": 9, "cross_attn_k": 10, "cross_attn_v": 11, "cross_attn_dense": 12,
    "moe_h_to_4h": 13, "moe_4h_to_h": 14, "moe_gate": 15, "moe_router": 16,
    "mlp_router": 17, "mlp_gate_up": 18,
    "shared_expert_h_to_4h": 19, "shared_expert_4h_to_h": 20, "shared_expert_gate": 21,
    "mamba_in_proj": 22, "mamba_out_proj": 23, "moe_latent_fc1": 24, "moe_latent_fc2": 25,
}
_NAMES_BY_ID = {v: k for k, v in TRTLLM_MODULE_IDS.items()}

#: dtypes ``lora_weights`` may have: the engine dtype (TensorRT-LLM refuses any other, §2.3); bfloat16 is stored as
#: bf16-rounded float32 values (numpy has no bf16).
STORE_DTYPES = ("float16", "bfloat16", "float32")

#: Adapter targets that exist in PEFT adapters of Llama-family models but cannot be served on a Yi engine, each
#: with the reason (the refusal names them instead of calling them unknown).
REFUSED_HF_MODULES: dict[str, str] = {
    "qkv_proj": "a fused qkv_proj adapter (TensorRT-LLM attn_qkv, id 0) does not fit Yi, whose q_proj/k_proj/v_proj are separate",
    "gate_up_proj": "a fused gate_up_proj adapter (mlp_gate_up) does not fit Yi, whose gate_proj/up_proj are separate",
    "embed_tokens": "embedding adapters are not supported by TensorRT-LLM's LoRA plugin (it adapts linear layers only)",
    "lm_head": "lm_head adapters are not supported by TensorRT-LLM's LoRA plugin (it adapts decoder linears only)",
}


def module_name(module_id: int) -> str:
    """The TensorRT-LLM name of a module id (as its messages print it), or ``INVALID`` for an unknown id."""
    return _NAMES_BY_ID.get(int(module_id), "INVALID")


def _sym(cfg: Any, tp: int) -> dict[str, int]:
    """Shape symbols of the tensor table for a ModelConfig or a CheckpointSpec (``head_dim`` vs ``head_size``)."""
    head = getattr(cfg, "head_dim", None) or cfg.head_size
    local_kv = -(-cfg.num_kv_heads // tp)  # ceil: 1 per rank when the heads are repeated (sharding.kv_heads_per_rank)
    return {
        "hidden": cfg.hidden_size,
        "inter": cfg.intermediate_size,
        "q": cfg.num_heads * head,
        # k/v rows as TensorRT-LLM's runtime sizes them: local KV heads × tp × head_dim (= num_kv_heads × head_dim
        # when tp ≤ num_kv_heads; tp × head_dim when the heads are repeated) — §2.6, UNCONFIRMED
        "kv": local_kv * tp * head,
    }


@dataclass(frozen=True)
class LoraModule:
    """One adaptable linear of the Llama/Yi decoder layer.

    Attributes:
        hf: the PEFT module name (``q_proj``), the last part of ``model.layers.N.<parent>.<hf>``.
        parent: the HF block holding it (``self_attn`` or ``mlp``).
        trtllm: TensorRT-LLM's LoRA module name (``attn_q``).
        module_id: TensorRT-LLM's module id (the first column of a ``lora_config`` row).
        target: the TensorRT-LLM base tensor it adapts, without layer prefix and ``.weight`` (``attention.qkv``).
        role: "q", "k" or "v" inside ``attention.qkv``, else "".
        split: "column" (B is split on its out rows across TP ranks) or "row" (A is split on its in columns).
        shape: the base weight's [out, in] as tensor-table symbols.
    """

    hf: str
    parent: str
    trtllm: str
    module_id: int
    target: str
    role: str
    split: str
    shape: tuple[str, str]

    def in_dim(self, cfg: Any, tp: int = 1) -> int:
        """Columns of A (the base weight's input features, global)."""
        return _sym(cfg, tp)[self.shape[1]]

    def out_dim(self, cfg: Any, tp: int = 1) -> int:
        """Rows of B as the engine at ``tp`` expects them (global; k/v repeated per rank when tp > KV heads)."""
        return _sym(cfg, tp)[self.shape[0]]

    def flat_size(self, cfg: Any, tp: int, rank: int) -> int:
        """Values of one ``lora_weights`` row for this module at ``rank``: r·in + out·r (LMOD-h flattenedInOutSize)."""
        return rank * (self.in_dim(cfg, tp) + self.out_dim(cfg, tp))


def _derive() -> tuple[LoraModule, ...]:
    """The table from the ``lora`` column of ``LLAMA_TENSORS``, ordered by module id."""
    modules = []
    for rule in LLAMA_TENSORS:
        if rule.kind is not Kind.LINEAR:
            continue
        for source in rule.sources:
            if not source.lora:
                continue
            # "model.layers.{i}.self_attn.q_proj.weight" → parent "self_attn", hf "q_proj"
            parent, hf = source.name.split(".")[-3:-1]
            # "transformer.layers.{i}.attention.qkv.weight" → "attention.qkv"
            target = rule.target.removeprefix("transformer.layers.{i}.").removesuffix(".weight")
            split = "row" if rule.split is Split.ROW else "column"  # QKV and COLUMN both split the out rows
            modules.append(LoraModule(hf, parent, source.lora, TRTLLM_MODULE_IDS[source.lora], target, source.role, split,
                                      (source.shape[0], source.shape[1])))
    return tuple(sorted(modules, key=lambda m: m.module_id))


#: The adaptable modules, by module id: attn_q 1, attn_k 2, attn_v 3, attn_dense 4, mlp_h_to_4h 5, mlp_4h_to_h 6,
#: mlp_gate 7.
LORA_MODULES: tuple[LoraModule, ...] = _derive()
_BY_HF = {m.hf: m for m in LORA_MODULES}
_BY_TRTLLM = {m.trtllm: m for m in LORA_MODULES}
_BY_ID = {m.module_id: m for m in LORA_MODULES}


def by_hf(name: str) -> LoraModule | None:
    """The module a PEFT target name (``q_proj``) stands for, or None."""
    return _BY_HF.get(name)


def by_trtllm(name: str) -> LoraModule | None:
    """The module a TensorRT-LLM LoRA module name (``attn_q``) stands for, or None."""
    return _BY_TRTLLM.get(name)


def by_id(module_id: int) -> LoraModule | None:
    """The module a TensorRT-LLM module id stands for, or None (also for ids that exist but not in Yi)."""
    return _BY_ID.get(int(module_id))
