"""What `yitrt inspect` reports about a model: sizes, memory per token, valid parallel layouts, Yi facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt.checkpoint.sharding import kv_heads_per_rank, pp_problems, tp_problems
from yitrt.errors import CheckpointError
from yitrt.models.config import ModelConfig, load_config
from yitrt.models.registry import RegistryMatch, load_registry
from yitrt.quant.schemes import KV_BYTES_FP16, KV_CACHE_FORMATS, SCHEMES

#: Sizes checked for TP and PP (a single node holds at most 8 GPUs; 16 shows what two nodes would allow).
TP_CANDIDATES = tuple(range(1, 17))
PP_CANDIDATES = tuple(range(1, 9))

#: The scheme whose storage each dtype column of `inspect` shows (int4: AWQ, with one fp16 scale per group).
#: Embedding, lm_head and norms stay 16-bit under every scheme.
WEIGHT_DTYPE_SCHEMES = {"bf16": "none", "fp8": "fp8", "int8": "int8-sq", "int4": "int4-awq"}


@dataclass
class ModelReport:
    """Everything `yitrt inspect` shows."""

    source: str
    cfg: ModelConfig
    match: RegistryMatch
    chat_end_id: int | None
    chat_end_source: str
    valid_tp: list[int] = field(default_factory=list)
    invalid_tp: dict[int, list[str]] = field(default_factory=dict)
    valid_pp: list[int] = field(default_factory=list)
    invalid_pp: dict[int, list[str]] = field(default_factory=dict)
    weights: dict[str, Any] | None = None  # the checked safetensors files (None: none are here, e.g. metadata only)

    @property
    def params(self) -> int:
        """Parameter count."""
        return self.cfg.param_count()

    def weight_bytes(self) -> dict[str, int]:
        """Weight bytes when the decoder linears are stored in each dtype (embedding/lm_head/norms 16-bit)."""
        cfg = self.cfg
        embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size
        linear = self.params - embed - norms
        return {
            column: int(linear * SCHEMES[scheme].weight_bytes + (embed + norms) * 2)
            for column, scheme in WEIGHT_DTYPE_SCHEMES.items()
        }

    def kv_bytes_per_token(self) -> dict[str, dict[int, int]]:
        """KV-cache bytes per token per GPU (pp = 1), per KV dtype and valid TP size.

        2 (K and V) × layers × ceil(kv_heads / tp) × head_dim × bytes (reference §6, kvCacheManager).
        """
        per_dtype = {"fp16": KV_BYTES_FP16, **{k: v.bytes_per_element for k, v in KV_CACHE_FORMATS.items() if k == "fp8"}}
        return {
            name: {tp: 2 * self.cfg.num_layers * kv_heads_per_rank(self.cfg, tp) * self.cfg.head_dim * nbytes for tp in self.valid_tp}
            for name, nbytes in per_dtype.items()
        }

    def to_json(self) -> dict[str, Any]:
        """The JSON object of `yitrt inspect --json`."""
        cfg = self.cfg
        ckpt = self.match.checkpoint
        return {
            "source": self.source,
            "architecture": cfg.architecture,
            "legacy_yi_layout": cfg.legacy_yi,
            "params": self.params,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_position_embeddings,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling,
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "dtype": cfg.dtype,
            "weight_bytes": self.weight_bytes(),
            "kv_bytes_per_token": {k: {str(tp): b for tp, b in v.items()} for k, v in self.kv_bytes_per_token().items()},
            "valid_tp": self.valid_tp,
            "invalid_tp": {str(k): v for k, v in self.invalid_tp.items()},
            "valid_pp": self.valid_pp,
            "invalid_pp": {str(k): v for k, v in self.invalid_pp.items()},
            "kv_head_duplication": {str(tp): tp // cfg.num_kv_heads for tp in self.valid_tp if tp > cfg.num_kv_heads},
            "chat_end_id": self.chat_end_id,
            "chat_end_id_source": self.chat_end_source,
            "yi": {
                "matched_by": self.match.how,
                "repo_id": ckpt.repo_id if ckpt else None,
                "series": ckpt.series if ckpt else None,
                "shape": self.match.shape,
                "candidates": [c.repo_id for c in self.match.candidates],
                "tokenizer": ckpt.tokenizer if ckpt else None,
                # known checkpoints that can draft for this one (speculative decoding; `yitrt inspect --draft` checks a pair)
                "draft_candidates": [c.repo_id for c in load_registry().draft_candidates(ckpt.repo_id)] if ckpt else [],
            },
            "pitfalls": [{"id": p.id, "text": p.text, "source": p.source} for p in self.pitfalls()],
            "weights": self.weights,
        }

    def pitfalls(self):
        """Known pitfalls of the matched checkpoint (shared by every candidate when ambiguous)."""
        if self.match.checkpoint:
            return list(self.match.checkpoint.pitfalls)
        if not self.match.candidates:
            return []
        common = set.intersection(*({p.id for p in c.pitfalls} for c in self.match.candidates))
        return [p for p in self.match.candidates[0].pitfalls if p.id in common]


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON file of the model folder ({} when absent); present but broken is an error, never ignored."""
    from yitrt.userfiles import read_json_if_present

    return read_json_if_present(path, path.name, error=CheckpointError, fix="re-download the model") or {}


def _token_contents(model_dir: Path) -> dict[int, str]:
    """Special-token id → text, from tokenizer_config.json's added_tokens_decoder (or tokenizer.json)."""
    tok = _read_json(model_dir / "tokenizer_config.json")
    decoder = tok.get("added_tokens_decoder")
    # entries of another shape are skipped: these files are the user's, and only well-formed ids can be matched
    table = {int(k): v["content"] for k, v in (decoder.items() if isinstance(decoder, dict) else ())
             if isinstance(k, str) and k.isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str)}
    if not table:
        added = _read_json(model_dir / "tokenizer.json").get("added_tokens")
        table = {t["id"]: t["content"] for t in (added if isinstance(added, list) else ())
                 if isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("content"), str)}
    return table


def find_chat_end_id(model_dir: Path, cfg: ModelConfig, match: RegistryMatch) -> tuple[int | None, str]:
    """The token id that ends a generated turn, and where the fact came from.

    A known Yi checkpoint answers from the registry (Yi-Chat ends turns with <|im_end|> = 7 whatever config.json
    says). Otherwise the candidates are the eos ids of generation_config.json, the tokenizer and config.json, in
    that order; when the model has a chat template, the candidate whose token the template itself writes after
    each turn wins (official Yi-34B-Chat files: tokenizer eos <|endoftext|> = 2, generation_config eos 7 =
    <|im_end|>, which the template emits).
    """
    if match.checkpoint is not None:
        return match.checkpoint.end_id, f"yitrt registry ({match.checkpoint.repo_id})"
    candidates: list[tuple[int, str]] = []
    gen = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    for token_id in gen if isinstance(gen, list) else ([gen] if gen is not None else []):
        if type(token_id) is int:
            candidates.append((token_id, "generation_config.json"))
    contents = _token_contents(model_dir)
    tok = _read_json(model_dir / "tokenizer_config.json")
    eos = tok.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos = eos if isinstance(eos, str) else None
    candidates += [(i, "tokenizer eos") for i, text in contents.items() if eos and text == eos]
    candidates += [(i, "config.json") for i in cfg.eos_token_ids]
    if not candidates:
        return None, "unknown"
    template = tok.get("chat_template") or ""
    if isinstance(template, list):  # several named templates
        template = " ".join(t["template"] for t in template if isinstance(t, dict) and isinstance(t.get("template"), str))
    if not isinstance(template, str):
        template = ""
    template_file = model_dir / "chat_template.jinja"
    if not template and template_file.is_file():
        from yitrt.userfiles import read_text

        template = read_text(template_file, "chat_template.jinja", error=CheckpointError, fix="re-download the model")
    if template:
        for token_id, origin in candidates:
            if contents.get(token_id) and contents[token_id] in template:
                return token_id, f"{origin}, written by the chat template as {contents[token_id]!r}"
    return candidates[0][0], candidates[0][1]


def weight_files_summary(model_dir: Path) -> dict[str, Any] | None:
    """Check the safetensors weights of a folder without reading tensor data — every header proven
    (``safetensors_io.validate_header``) and the index against the shards — and summarise them; None when the
    folder holds no ``*.safetensors`` file (a metadata-only download).

    Raises:
        CheckpointError: a damaged or lying header, index or shard set.
    """
    from yitrt.checkpoint.source import SourceCheckpoint

    if not any(Path(model_dir).glob("*.safetensors")):
        return None
    with SourceCheckpoint(model_dir) as source:
        by_dtype: dict[str, int] = {}
        for tensor in source.tensors.values():
            by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + 1
        return {"files": source.files, "tensors": len(source.tensors), "dtypes": by_dtype,
                "bytes": source.data_bytes}


def describe_model(model_dir: Path, repo_id: str | None = None) -> ModelReport:
    """Build the inspect report of a model folder (config and tokenizer files, and the safetensors headers —
    checked, no tensor data is read).

    Args:
        model_dir: local folder with config.json.
        repo_id: the HF repo id it came from, for the registry lookup.

    Raises:
        CheckpointError, UnsupportedModelError: see ``load_config``.
    """
    cfg = load_config(model_dir)
    match = load_registry().match(cfg, repo_id)
    end_id, end_source = find_chat_end_id(Path(model_dir), cfg, match)
    report = ModelReport(str(repo_id or model_dir), cfg, match, end_id, end_source, weights=weight_files_summary(Path(model_dir)))
    for tp in TP_CANDIDATES:
        if problems := tp_problems(cfg, tp):
            report.invalid_tp[tp] = problems
        else:
            report.valid_tp.append(tp)
    for pp in PP_CANDIDATES:
        if problems := pp_problems(cfg, pp):
            report.invalid_pp[pp] = problems
        else:
            report.valid_pp.append(pp)
    return report
