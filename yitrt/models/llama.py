"""The declarative tensor table of the Llama family (Yi included): HF tensor ↔ TensorRT-LLM checkpoint tensor.

One row per TensorRT-LLM tensor: its HF source(s) with legacy aliases, the shape of each source in config
symbols, the tensor-parallel split rule, where it lives in a pipeline (every layer, first stage, last stage),
what kind of tensor it is (quantizable linear, bias, norm, embedding, lm_head), and the config flag that
enables it. Facts: reference/trtllm-checkpoint-and-build.md §1.3 (names, shapes), §2.2-2.4 (splits).

Notable rows:
- ``mlp.fc`` ← ``gate_proj`` (the SiLU-activated branch) and ``mlp.gate`` ← ``up_proj``: TensorRT-LLM's GatedMLP
  computes ``proj(act(fc(x)) * gate(x))`` (layers/mlp.py), HF computes ``down(act(gate_proj(x)) * up_proj(x))``.
- ``attention.qkv`` concatenates q, k and v rows per rank, each split by heads (never the fused block as one).
- Row-parallel biases are not split: TensorRT-LLM adds the full bias once after the all-reduce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from yitrt.errors import CheckpointError
from yitrt.models.config import ModelConfig


class Split(str, Enum):
    """How a tensor is divided across tensor-parallel ranks."""

    REPLICATE = "replicate"  # every rank holds the whole tensor
    COLUMN = "column"  # dim 0 (output features) in tp equal chunks
    ROW = "row"  # dim 1 (input features) in tp equal chunks
    QKV = "qkv"  # q, k, v each split by heads (KV heads repeated when tp > kv heads), then concatenated
    VOCAB = "vocab"  # rows zero-padded to a multiple of tp, then dim 0 in tp chunks


class Scope(str, Enum):
    """Which pipeline stage holds a tensor."""

    LAYER = "layer"  # the stage owning layer {i}, renumbered locally
    FIRST = "first"  # the first stage only
    LAST = "last"  # the last stage only


class Kind(str, Enum):
    """What a tensor is, which decides what quantization schemes do to it."""

    LINEAR = "linear"  # a GEMM weight [out, in]: quantized by weight schemes
    BIAS = "bias"
    NORM = "norm"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"


@dataclass(frozen=True)
class Source:
    """An HF tensor feeding a TensorRT-LLM tensor.

    Attributes:
        name: canonical HF name template (``{i}`` = global layer index).
        shape: dims as config symbols (hidden, inter, vocab, q, kv).
        aliases: other spellings of the same tensor in older checkpoints, with their origin in a comment.
        role: "q", "k" or "v" for the parts of a QKV row, else "".
        lora: the TensorRT-LLM LoRA module adapting this tensor (``attn_q``, ``mlp_h_to_4h``...), "" for none;
            ``yitrt.lora.modules`` derives its table from this column (trtllm-serving-features.md §2.2).
    """

    name: str
    shape: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    role: str = ""
    lora: str = ""


@dataclass(frozen=True)
class TensorRule:
    """One TensorRT-LLM checkpoint tensor and how to make it."""

    target: str
    sources: tuple[Source, ...]
    split: Split
    scope: Scope
    kind: Kind
    when: str | None = None  # a boolean ModelConfig attribute that must be true for the tensor to exist
    tied_source: str | None = None  # used instead when tie_word_embeddings and the source is absent


_L = "model.layers.{i}."
_T = "transformer.layers.{i}."

#: The table. Order is the order tensors are written to each rank file.
LLAMA_TENSORS: tuple[TensorRule, ...] = (
    TensorRule("transformer.vocab_embedding.weight", (Source("model.embed_tokens.weight", ("vocab", "hidden")),), Split.VOCAB, Scope.FIRST, Kind.EMBEDDING),
    TensorRule(
        _T + "input_layernorm.weight",
        (Source(_L + "input_layernorm.weight", ("hidden",), aliases=(_L + "ln1.weight",)),),  # ln1: legacy YiForCausalLM
        Split.REPLICATE, Scope.LAYER, Kind.NORM,
    ),
    TensorRule(
        _T + "attention.qkv.weight",
        (
            Source(_L + "self_attn.q_proj.weight", ("q", "hidden"), role="q", lora="attn_q"),
            Source(_L + "self_attn.k_proj.weight", ("kv", "hidden"), role="k", lora="attn_k"),
            Source(_L + "self_attn.v_proj.weight", ("kv", "hidden"), role="v", lora="attn_v"),
        ),
        Split.QKV, Scope.LAYER, Kind.LINEAR,
    ),
    TensorRule(
        _T + "attention.qkv.bias",
        (
            Source(_L + "self_attn.q_proj.bias", ("q",), role="q"),
            Source(_L + "self_attn.k_proj.bias", ("kv",), role="k"),
            Source(_L + "self_attn.v_proj.bias", ("kv",), role="v"),
        ),
        Split.QKV, Scope.LAYER, Kind.BIAS, when="attention_bias",
    ),
    TensorRule(_T + "attention.dense.weight", (Source(_L + "self_attn.o_proj.weight", ("hidden", "q"), lora="attn_dense"),), Split.ROW, Scope.LAYER, Kind.LINEAR),
    TensorRule(_T + "attention.dense.bias", (Source(_L + "self_attn.o_proj.bias", ("hidden",)),), Split.REPLICATE, Scope.LAYER, Kind.BIAS, when="attention_bias"),
    TensorRule(
        _T + "post_layernorm.weight",
        (Source(_L + "post_attention_layernorm.weight", ("hidden",), aliases=(_L + "ln2.weight",)),),  # ln2: legacy YiForCausalLM
        Split.REPLICATE, Scope.LAYER, Kind.NORM,
    ),
    TensorRule(_T + "mlp.fc.weight", (Source(_L + "mlp.gate_proj.weight", ("inter", "hidden"), lora="mlp_h_to_4h"),), Split.COLUMN, Scope.LAYER, Kind.LINEAR),
    TensorRule(_T + "mlp.fc.bias", (Source(_L + "mlp.gate_proj.bias", ("inter",)),), Split.COLUMN, Scope.LAYER, Kind.BIAS, when="mlp_bias"),
    TensorRule(_T + "mlp.gate.weight", (Source(_L + "mlp.up_proj.weight", ("inter", "hidden"), lora="mlp_gate"),), Split.COLUMN, Scope.LAYER, Kind.LINEAR),
    TensorRule(_T + "mlp.gate.bias", (Source(_L + "mlp.up_proj.bias", ("inter",)),), Split.COLUMN, Scope.LAYER, Kind.BIAS, when="mlp_bias"),
    TensorRule(_T + "mlp.proj.weight", (Source(_L + "mlp.down_proj.weight", ("hidden", "inter"), lora="mlp_4h_to_h"),), Split.ROW, Scope.LAYER, Kind.LINEAR),
    TensorRule(_T + "mlp.proj.bias", (Source(_L + "mlp.down_proj.bias", ("hidden",)),), Split.REPLICATE, Scope.LAYER, Kind.BIAS, when="mlp_bias"),
    TensorRule("transformer.ln_f.weight", (Source("model.norm.weight", ("hidden",)),), Split.REPLICATE, Scope.LAST, Kind.NORM),
    TensorRule(
        "lm_head.weight", (Source("lm_head.weight", ("vocab", "hidden")),), Split.VOCAB, Scope.LAST, Kind.LM_HEAD,
        tied_source="model.embed_tokens.weight",
    ),
)

#: HF tensors that are not weights and are deliberately not converted, with the reason.
IGNORED_SOURCES: dict[str, str] = {
    # Older transformers saved RoPE's inverse frequencies as a buffer; TensorRT-LLM recomputes them from rotary_base.
    _L + "self_attn.rotary_emb.inv_freq": "RoPE buffer, recomputed from rotary_base",
}


def dims(cfg: ModelConfig) -> dict[str, int]:
    """Values of the shape symbols used in the table."""
    return {"hidden": cfg.hidden_size, "inter": cfg.intermediate_size, "vocab": cfg.vocab_size, "q": cfg.q_size, "kv": cfg.kv_size}


@dataclass(frozen=True)
class ResolvedPart:
    """A concrete HF tensor feeding a part of a resolved target."""

    name: str
    shape: tuple[int, ...]
    role: str


@dataclass(frozen=True)
class ResolvedTensor:
    """A table row bound to a model: concrete target name, concrete sources, global layer (or None)."""

    rule: TensorRule
    target: str
    layer: int | None
    parts: tuple[ResolvedPart, ...]


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def resolve_tensors(cfg: ModelConfig, available: dict[str, tuple[int, ...]]) -> list[ResolvedTensor]:
    """Bind the table to a model's config and the tensors present in its files.

    Every source tensor must be used exactly once (or be in ``IGNORED_SOURCES``); every expected tensor must be
    present with the shape the config implies.

    Args:
        cfg: the normalised config.
        available: HF tensor name → shape, as found in the weight files.

    Returns:
        Resolved tensors in table order, layers ascending.

    Raises:
        CheckpointError: missing, duplicated (canonical and alias), mis-shaped or unknown tensors; every
            problem is listed in one message.
    """
    sym = dims(cfg)
    used: set[str] = set()
    missing: list[str] = []
    misshaped: list[str] = []
    duplicated: list[str] = []
    out: list[ResolvedTensor] = []

    def pick(source: Source, layer: int | None) -> str | None:
        names = [n.format(i=layer) for n in (source.name, *source.aliases)]
        present = [n for n in names if n in available]
        if len(present) > 1:
            duplicated.append(" and ".join(present))
        return present[0] if present else None

    def layer_rows(rule: TensorRule):
        if rule.scope is Scope.LAYER:
            for i in range(cfg.num_layers):
                yield rule, i
        else:
            yield rule, None

    for rule in LLAMA_TENSORS:
        if rule.when and not getattr(cfg, rule.when):
            continue
        for rule_, layer in layer_rows(rule):
            parts = []
            for source in rule_.sources:
                name = pick(source, layer)
                if name is None and rule_.tied_source and cfg.tie_word_embeddings:
                    name = rule_.tied_source if rule_.tied_source in available else None
                    if name is not None:  # shared with the embedding row: not "used" a second time
                        parts.append(ResolvedPart(name, tuple(available[name]), source.role))
                        continue
                if name is None:
                    missing.append(source.name.format(i=layer))
                    continue
                expected = tuple(sym[s] for s in source.shape)
                if tuple(available[name]) != expected:
                    misshaped.append(f"{name} is {list(available[name])}, config implies {list(expected)}")
                used.add(name)
                parts.append(ResolvedPart(name, expected, source.role))
            target = rule_.target.format(i=layer) if layer is not None else rule_.target
            out.append(ResolvedTensor(rule_, target, layer, tuple(parts)))

    ignored = [_template_regex(t) for t in IGNORED_SOURCES]
    unknown = sorted(n for n in available if n not in used and not any(r.match(n) for r in ignored))
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensor(s) do not match config.json: {'; '.join(misshaped[:3])}")
    if duplicated:
        problems.append(f"tensors stored under two names: {', '.join(duplicated[:3])}")
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) yitrt does not know how to convert, e.g. {', '.join(unknown[:3])}")
    if problems:
        raise CheckpointError(
            "; ".join(problems),
            "the weights do not match a Llama-family config; check the model folder (or report the layout if it is a real Yi/Llama checkpoint)",
        )
    return out
