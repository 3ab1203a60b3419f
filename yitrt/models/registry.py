"""The registry of known Yi checkpoints (data in ``yi_checkpoints.yaml``), looked up by HF repo id or by shape.

A local folder has no repo id, so it is matched by its dims (the shape families of reference/yi-models.md
§1.2) and narrowed by context length and rope base. A non-Yi Llama model simply has no match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from yitrt.models.config import ModelConfig, parse_config

_SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class Pitfall:
    """A reported problem, its source, and the request that triggers it (empty: always relevant)."""

    id: str
    text: str
    source: str
    trigger: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class YiCheckpoint:
    """One known Yi repo and the facts yitrt needs about it."""

    repo_id: str
    shape: str
    series: str
    tokenizer: str  # the tokenizer group: checkpoints of one group draft for each other (speculative decoding)
    chat: bool
    context: int
    rope_theta: float
    end_id: int
    pitfalls: tuple[Pitfall, ...]


@dataclass(frozen=True)
class TokenizerGroup:
    """Checkpoints that ship one tokenizer (same pieces, merges and special ids), with the source of the fact."""

    id: str
    text: str
    source: str


@dataclass(frozen=True)
class RegistryMatch:
    """Result of a lookup: the checkpoint (when unambiguous), every candidate, and how it was found."""

    checkpoint: YiCheckpoint | None
    candidates: tuple[YiCheckpoint, ...]
    how: str  # "repo id", "shape", or "none"

    @property
    def shape(self) -> str | None:
        """Shape family name shared by the candidates, if any."""
        return self.candidates[0].shape if self.candidates else None


@dataclass(frozen=True)
class Registry:
    """Parsed registry tables."""

    shapes: dict[str, dict[str, int]]
    pitfalls: dict[str, Pitfall]
    checkpoints: dict[str, YiCheckpoint]
    unsupported: dict[str, str]
    tokenizers: dict[str, TokenizerGroup] = field(default_factory=dict)

    def draft_candidates(self, repo_id: str) -> list[YiCheckpoint]:
        """Known checkpoints that can draft for ``repo_id`` (speculative decoding): the same tokenizer group, the
        same turn end id (a chat draft for a chat target), fewer parameters; those with the target's context
        first, then the smallest. Empty for an unknown repo."""
        target = self.by_repo_id(repo_id)
        if target is None:
            return []
        params = {c.repo_id: self.config_of(c.repo_id).param_count() for c in self.checkpoints.values() if c.tokenizer == target.tokenizer}
        found = [c for c in self.checkpoints.values() if c.tokenizer == target.tokenizer and c.end_id == target.end_id
                 and params[c.repo_id] < params[target.repo_id]]
        return sorted(found, key=lambda c: (c.context < target.context, c.context != target.context, params[c.repo_id], c.repo_id))

    def by_repo_id(self, repo_id: str) -> YiCheckpoint | None:
        """Exact (case-insensitive) repo id lookup."""
        return self.checkpoints.get(repo_id.lower())

    def config_of(self, repo_id: str) -> ModelConfig | None:
        """The ModelConfig of a known repo built from the registry's facts (dims, context, rope base; Yi weights
        are bfloat16 and untied, reference/yi-models.md §1.2), or None for an unknown id. Lets ``yitrt plan``
        size a known Yi model without downloading anything."""
        ckpt = self.by_repo_id(repo_id)
        if ckpt is None:
            return None
        dims = self.shapes[ckpt.shape]
        raw = {
            "architectures": ["LlamaForCausalLM"], "hidden_size": dims["hidden_size"],
            "num_hidden_layers": dims["num_layers"], "num_attention_heads": dims["num_heads"],
            "num_key_value_heads": dims["num_kv_heads"], "intermediate_size": dims["intermediate_size"],
            "vocab_size": dims["vocab_size"], "max_position_embeddings": ckpt.context, "rope_theta": ckpt.rope_theta,
            "torch_dtype": "bfloat16", "tie_word_embeddings": False, "hidden_act": "silu",
        }
        return parse_config(raw, f"registry entry {ckpt.repo_id}")

    def shape_of(self, cfg: ModelConfig) -> str | None:
        """Name of the shape family whose dims equal ``cfg``'s, or None."""
        dims = {k: getattr(cfg, k) for k in _SHAPE_KEYS}
        for name, shape in self.shapes.items():
            if shape == dims:
                return name
        return None

    def match(self, cfg: ModelConfig, repo_id: str | None = None) -> RegistryMatch:
        """Find the checkpoint a config belongs to.

        Args:
            cfg: the model's normalised config.
            repo_id: the HF repo id, when the model came from the Hub.

        Returns:
            A RegistryMatch; ``checkpoint`` is None when no single entry fits.
        """
        if repo_id:
            hit = self.by_repo_id(repo_id)
            if hit is not None:
                return RegistryMatch(hit, (hit,), "repo id")
        shape = self.shape_of(cfg)
        if shape is None:
            return RegistryMatch(None, (), "none")
        candidates = tuple(c for c in self.checkpoints.values() if c.shape == shape)
        narrowed = tuple(
            c for c in candidates if c.context == cfg.max_position_embeddings and c.rope_theta == cfg.rope_theta
        )
        chosen = narrowed[0] if len(narrowed) == 1 else None
        return RegistryMatch(chosen, narrowed or candidates, "shape")


def request_pitfalls(cfg: ModelConfig, repo_id: str | None, request: dict[str, object]) -> list[str]:
    """Warnings for known-bad combinations: the pitfalls with a trigger that the request matches.

    A model matched by repo id (or by a unique shape + context + rope base) uses its own pitfalls; a local
    folder that fits several registry entries gets the pitfalls every candidate shares (e.g. INT8 KV on any
    Yi-6B-shaped model).

    Args:
        cfg: the model's config.
        repo_id: the HF repo id, when known.
        request: the request's values by trigger key (``pp``, ``kv_cache``, ``scheme``).
    """
    registry = load_registry()
    match = registry.match(cfg, repo_id)
    if match.checkpoint is not None:
        pitfalls, name = match.checkpoint.pitfalls, match.checkpoint.repo_id
    elif match.candidates:
        shared = set.intersection(*({p.id for p in c.pitfalls} for c in match.candidates))
        pitfalls = [p for p in match.candidates[0].pitfalls if p.id in shared]
        name = f"{match.shape}-shaped model"
    else:
        return []
    return [
        f"{name}: {p.text} ({p.source})"
        for p in pitfalls
        if p.trigger and all(request.get(k) == v for k, v in p.trigger.items())
    ]


@lru_cache(maxsize=1)
def load_registry() -> Registry:
    """Load and cross-check ``yi_checkpoints.yaml`` (cached).

    Raises:
        ValueError: the packaged table is inconsistent (a bug in yitrt, caught by the unit tests).
    """
    raw = yaml.safe_load(resources.files("yitrt.models").joinpath("yi_checkpoints.yaml").read_text())
    pitfalls = {
        key: Pitfall(id=key, text=val["text"], source=val["source"], trigger=dict(val.get("trigger") or {}))
        for key, val in raw["pitfalls"].items()
    }
    shapes = {name: dict(dims) for name, dims in raw["shapes"].items()}
    tokenizers = {key: TokenizerGroup(id=key, text=val["text"], source=val["source"]) for key, val in raw["tokenizers"].items()}
    checkpoints: dict[str, YiCheckpoint] = {}
    for repo_id, val in raw["checkpoints"].items():
        if val["shape"] not in shapes:
            raise ValueError(f"registry: {repo_id} names unknown shape {val['shape']}")
        unknown = [p for p in val["pitfalls"] if p not in pitfalls]
        if unknown:
            raise ValueError(f"registry: {repo_id} names unknown pitfalls {unknown}")
        if val["tokenizer"] not in tokenizers:
            raise ValueError(f"registry: {repo_id} names unknown tokenizer group {val['tokenizer']}")
        checkpoints[repo_id.lower()] = YiCheckpoint(
            repo_id=repo_id,
            shape=val["shape"],
            series=val["series"],
            tokenizer=val["tokenizer"],
            chat=bool(val["chat"]),
            context=int(val["context"]),
            rope_theta=float(val["rope_theta"]),
            end_id=int(val["end_id"]),
            pitfalls=tuple(pitfalls[p] for p in val["pitfalls"]),
        )
    unsupported = {k.lower(): v for k, v in raw["unsupported"].items()}
    return Registry(shapes=shapes, pitfalls=pitfalls, checkpoints=checkpoints, unsupported=unsupported, tokenizers=tokenizers)
