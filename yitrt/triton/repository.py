"""`yitrt deploy`: a Triton model repository for an engine (or, for tests and the demo, a checkpoint served by the
CPU reference engine slot), written from the contract table as ``ModelConfig`` messages.

The repository holds ``ensemble``, ``preprocessing``, ``tensorrt_llm``, ``postprocessing`` and the BLS model (stock
name ``tensorrt_llm_bls``), yitrt's own Python models, the tokenizer (``preprocessing/tokenizer``; a folder at the
repository root would be taken for a model), ``launch.sh`` and ``README.md``. Everything the configs need is
derived, not typed: batch size, world size, dtypes and limits from the engine's config.json, KV settings from the
plan recorded in the engine manifest (or the options), end and stop ids from the model's generation_config.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from itertools import groupby
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.errors import CheckpointError, UsageError, ValidationError
from yitrt.limits import INT32_MAX, MAX_INSTANCES
from yitrt.lora import NPY_FILES
from yitrt.manifest import ArtifactWriter, find_reusable, fingerprint_files, read_manifest
from yitrt.speculation import LookaheadSizes
from yitrt.triton import contract as contracts
from yitrt.triton import lora as lora_mod
from yitrt.triton import speculative as spec_mod
from yitrt.triton.contract import TRITON_DTYPES
from yitrt.triton.lora import LoraDeployment, LoraRequest
from yitrt.triton.model_src.yitrt_text import WORDS_ENCODINGS
from yitrt.triton.pbtxt import Header, build_config, to_text
from yitrt.triton.speculative import DRAFT_MODEL, Speculation
from yitrt.userfiles import check_name, copy_into, read_json, read_json_if_present, source_file

STAGE = "deploy"
ENGINE_KINDS = ("trtllm", "reference")
MODEL_NAMES = contracts.model_names()
TOKENIZER_FOLDER = "preprocessing/tokenizer"
#: Files taken from the model folder into the repository's tokenizer folder (those that exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "config.json")
#: Template variables left as ``${var}`` in one model although filled elsewhere: the C++ tensorrt_llm backend reads
#: tokenizer_dir only for guided decoding (reference §1.5), and our relative folder means nothing to it.
_LEFT_UNFILLED = {"tensorrt_llm": ("tokenizer_dir",)}
#: Python model sources (yitrt/triton/model_src) installed per model; yitrt_text.py goes beside each.
_SOURCES = {"preprocessing": "preprocessing.py", "postprocessing": "postprocessing.py", "tensorrt_llm_bls": "bls.py"}


@dataclass(frozen=True)
class DeployRequest:
    """What to deploy.

    Attributes:
        source: engine folder (``trtllm``) or TensorRT-LLM checkpoint (``reference``).
        out: repository folder to write.
        tokenizer: HF model folder with the tokenizer (default: the one the checkpoint's manifest records).
        engine: ``trtllm`` (TensorRT-LLM engine, C++ backend) or ``reference`` (CPU reference slot, tests/demo).
        trtllm_version: contract line to write (default: the engine's, else 1.2).
        streaming: decoupled models (streaming) or not.
        max_batch_size: Triton batch size (default and upper bound: the engine's).
        kv_fraction / max_kv_tokens: KV-cache settings (default: the plan in the engine manifest).
        kv_reuse: KV-cache block reuse; None: on where the engine keeps paged context FMHA (the 1.x backend's
            default), which for the reference slot means unless its checkpoint quantizes the KV cache.
        chunked_context: chunked context (checked against the engine's plugins).
        kv_host_cache: ``kv_cache_host_memory_bytes``, the host pool evicted KV blocks move to (0: none).
        scheduler_policy: ``batch_scheduler_policy`` (``guaranteed_no_evict`` or ``max_utilization``).
        max_num_tokens / tokens_per_block / kv_cache_bytes: the reference slot's engine limits (an engine's are
            its build's) and the CPU byte budget of its KV pool (``yitrt_kv_cache_bytes``).
        instances: instance count of the Python models.
        model_name: name of the BLS entry model.
        max_input_len / max_seq_len: limits of the reference slot (an engine's are its own).
        words_encoding: how preprocessing encodes stop/bad words: ``with_space`` (each word and its leading-space
            variant) or ``stock`` (the word alone, as NVIDIA's preprocessing does).
        speculative: ``draft-target``, ``lookahead`` or None (yitrt.triton.speculative checks it against the engines).
        draft: the draft engine folder (``trtllm``) or the draft checkpoint (``reference``) of draft-target.
        num_draft_tokens: K, draft tokens per round when a request names none (default: the target engine's
            max_draft_len; required for the reference slot, whose ``yitrt_max_draft_len`` it becomes).
        use_draft_logits: accept with the draft's logits by default (the draft engine needs generation logits).
        lookahead: (W, N, G) of lookahead decoding (default: TensorRT-LLM's 4, 3, 4); an engine's max_draft_len must
            be theirs.
        draft_kv_fraction: the draft's kv_cache_free_gpu_mem_fraction (default: half of the plan's when both share GPUs).
        gpu_ids / draft_gpu_ids: ``gpu_device_ids`` of target and draft engines (default: the first tp×pp GPUs each).
        lora: LoRA adapters and their cache (``yitrt.triton.lora``; None: none). ``lora_weights`` is typed with the
            engine's dtype either way.
    """

    source: Path
    out: Path
    tokenizer: Path | None = None
    engine: str = "trtllm"
    trtllm_version: str | None = None
    streaming: bool = True
    max_batch_size: int | None = None
    kv_fraction: float | None = None
    max_kv_tokens: int | None = None
    kv_reuse: bool | None = None
    chunked_context: bool = False
    kv_host_cache: int = 0
    scheduler_policy: str = "guaranteed_no_evict"
    max_num_tokens: int | None = None
    tokens_per_block: int | None = None
    kv_cache_bytes: int | None = None
    instances: int = 1
    model_name: str = "tensorrt_llm_bls"
    max_input_len: int | None = None
    max_seq_len: int | None = None
    words_encoding: str = "with_space"
    speculative: str | None = None
    draft: Path | None = None
    num_draft_tokens: int | None = None
    use_draft_logits: bool = False
    lookahead: LookaheadSizes | None = None
    draft_kv_fraction: float | None = None
    gpu_ids: tuple[int, ...] | None = None
    draft_gpu_ids: tuple[int, ...] | None = None
    lora: LoraRequest | None = None
    force: bool = False


@dataclass
class EngineFacts:
    """What the repository needs to know about the engine (or the checkpoint behind the reference slot)."""

    kind: str
    path: Path
    version: str | None
    dtype: str
    logits_dtype: str
    tp: int
    pp: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    plugin_config: dict[str, Any] = field(default_factory=dict)
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    kv_cache_type: str | None = None
    vocab_size: int | None = None
    speculative_mode: str | None = None
    max_draft_len: int = 0
    gather_generation_logits: bool = False
    max_beam_width: int = 1
    lora: dict[str, Any] | None = None  # the engine's LoRA build settings (yitrt.triton.lora.engine_lora; None: no plugin)

    @property
    def world_size(self) -> int:
        """MPI ranks tritonserver needs (1 for the reference slot: its worker runs the TP ranks itself)."""
        return 1 if self.kind == "reference" else self.tp * self.pp


@dataclass
class DeployResult:
    """A written (or reused) repository."""

    out: Path
    reused: bool
    line: str
    engine: EngineFacts
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    speculation: Speculation | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON summary."""
        return {"repository": str(self.out), "reused": self.reused, "trtllm_line": self.line, "engine": self.engine.kind,
                "source": str(self.engine.path), "world_size": self.engine.world_size, **self.summary, "warnings": self.warnings}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent} is not a folder: it is not {what}", f"pass {what} folder")
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"{path.parent} has no {path.name}: it is not {what}", f"pass {what} folder")
    return read_json(path, path.name, error=CheckpointError, fix=f"rebuild {what}")


def _count(section: Any, key: str, default: int, path: Path, low: int = 1, high: int = 1 << 20) -> int:
    """An integer setting of an engine/checkpoint config.json, within [low, high] (never a crash on a bad file)."""
    value = section.get(key, default) if isinstance(section, dict) else default
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{path}: {key} is {value!r}, not an integer in {low}..{high}", "rebuild it (yitrt convert / yitrt build)")
    return value


def _section(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not a mapping", "rebuild it (yitrt convert / yitrt build)")
    return value


def engine_facts(req: DeployRequest) -> EngineFacts:
    """Read the engine's (or checkpoint's) config.json and check its rank files.

    Raises:
        UsageError: not an engine/checkpoint folder, or limits given where the engine fixes them.
        CheckpointError: rank files missing.
    """
    path = Path(req.source).absolute()
    if req.engine == "reference":
        cfg_path = path / "config.json"
        config = _read_json(cfg_path, "a TensorRT-LLM checkpoint")
        mapping = _section(config, "mapping", cfg_path)
        tp, pp = _count(mapping, "tp_size", 1, cfg_path, high=1024), _count(mapping, "pp_size", 1, cfg_path, high=1024)
        missing = [f"rank{r}.safetensors" for r in range(tp * pp) if not (path / f"rank{r}.safetensors").is_file()]
        if "build_config" in config or missing:
            raise CheckpointError(f"{path} is not a complete TensorRT-LLM checkpoint ({', '.join(missing) or 'it is an engine'})",
                                  "the reference slot serves a checkpoint (yitrt convert/quantize output); engines use --engine trtllm")
        from yitrt.models.config import context_length
        from yitrt.reference.layout import check_rank_headers

        check_rank_headers(path, tp * pp)  # the slot loads these files: a lying header is refused now, not at serve time

        scaling = config.get("rotary_scaling") if isinstance(config.get("rotary_scaling"), dict) else None
        context = context_length(_count(config, "max_position_embeddings", 2048, cfg_path, high=1 << 24), scaling)
        if req.max_seq_len and req.max_seq_len > context:
            raise ValidationError([f"--max-seq-len {req.max_seq_len} exceeds the checkpoint's context of {context} tokens "
                                   "(max_position_embeddings × its rotary factor), which the reference runtime refuses to pass"],
                                  f"pass at most --max-seq-len {context}")
        seq = req.max_seq_len or context
        quant = _section(config, "quantization", cfg_path)
        return EngineFacts("reference", path, None, config.get("dtype", "float16"), config.get("logits_dtype", "float32"), tp, pp,
                           req.max_batch_size or 8, req.max_input_len or seq - 1, seq, {}, quant.get("quant_algo"),
                           quant.get("kv_cache_quant_algo"), {}, path, vocab_size=_count(config, "vocab_size", 0, cfg_path, low=0, high=1 << 24) or None)
    if req.max_input_len or req.max_seq_len:
        raise UsageError("--max-input-len/--max-seq-len apply to the reference slot only", "an engine's limits are the ones it was built with")
    cfg_path = path / "config.json"
    config = _read_json(cfg_path, "a TensorRT-LLM engine")
    if "build_config" not in config:
        if "architecture" in config and "mapping" in config:
            raise UsageError(f"{path} holds a checkpoint, not an engine", "build it first (yitrt build), or pass --engine reference for a CPU test deployment")
        raise UsageError(f"{path} is not a TensorRT-LLM engine (its config.json has no build_config)", "pass the folder yitrt build wrote")
    pretrained, build = _section(config, "pretrained_config", cfg_path), _section(config, "build_config", cfg_path)
    mapping = _section(pretrained, "mapping", cfg_path)
    tp, pp = _count(mapping, "tp_size", 1, cfg_path, high=1024), _count(mapping, "pp_size", 1, cfg_path, high=1024)
    world = _count(mapping, "world_size", tp * pp, cfg_path, high=1 << 12)
    missing = [f"rank{r}.engine" for r in range(world) if not (path / f"rank{r}.engine").is_file()]
    if missing:
        raise CheckpointError(f"engine folder {path} lacks {', '.join(missing)}", "rebuild the engine (yitrt build)")
    manifest = read_manifest(path)
    engine_extra = (manifest.extra or {}).get("engine", {}) if manifest else {}
    quant = _section(pretrained, "quantization", cfg_path)
    seq = _count(build, "max_seq_len", _count(pretrained, "max_position_embeddings", 2048, cfg_path, high=1 << 24), cfg_path, high=1 << 24)
    from yitrt.speculation import engine_mode

    try:
        mode = engine_mode(build.get("speculative_decoding_mode"))
    except ValueError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}", "rebuild the engine (yitrt build)") from None
    return EngineFacts("trtllm", path, config.get("version"), pretrained.get("dtype", "float16"), pretrained.get("logits_dtype", "float32"),
                       tp, pp, _count(build, "max_batch_size", 256, cfg_path), _count(build, "max_input_len", seq - 1, cfg_path, high=1 << 24), seq,
                       dict(build.get("plugin_config") or {}), quant.get("quant_algo"), quant.get("kv_cache_quant_algo"),
                       dict((engine_extra.get("build_config") or {}).get("plan") or {}),
                       Path(engine_extra["checkpoint"]) if engine_extra.get("checkpoint") else None, build.get("kv_cache_type"),
                       vocab_size=_count(pretrained, "vocab_size", 0, cfg_path, low=0, high=1 << 24) or None, speculative_mode=mode,
                       max_draft_len=_count(build, "max_draft_len", 0, cfg_path, low=0, high=1 << 16),
                       gather_generation_logits=build.get("gather_generation_logits") is True or build.get("gather_all_token_logits") is True,
                       max_beam_width=_count(build, "max_beam_width", 1, cfg_path, high=1024), lora=lora_mod.engine_lora(build))


def _line(req: DeployRequest, facts: EngineFacts) -> str:
    from yitrt.build.flags import release_line

    if facts.version and req.trtllm_version and release_line(facts.version) != release_line(req.trtllm_version):
        raise ValidationError([f"the engine was built with TensorRT-LLM {facts.version}, the repository is asked for {req.trtllm_version}"],
                              "deploy for the engine's version (drop --trtllm-version): the backend must match the engine")
    return contracts.resolve_line(req.trtllm_version or facts.version)


def _plugins(facts: EngineFacts) -> dict[str, Any]:
    # config.json writes plugin switches as booleans; the rules speak trtllm-build's enable/disable
    return {k: ("enable" if v is True else "disable" if v is False else v) for k, v in facts.plugin_config.items()}


def reuse_possible(facts: EngineFacts) -> bool:
    """Whether KV-cache reuse works with this engine: it needs paged context FMHA, which the build leaves on unless
    the KV cache is quantized without FP8 weights (reference trtllm-serving-features.md §3, checkpoint-and-build §4.3);
    the reference slot turns reuse off for any quantized KV cache."""
    if facts.kind == "reference":
        return not facts.kv_cache_quant_algo
    from yitrt.plan.planner import kv_of_algo, scheme_of_algo
    from yitrt.plan.rules import effective_paged_context_fmha
    from yitrt.quant.schemes import get_kv_cache, get_scheme

    scheme, kv = get_scheme(scheme_of_algo(facts.quant_algo)), get_kv_cache(kv_of_algo(facts.kv_cache_quant_algo))
    return effective_paged_context_fmha(_plugins(facts), scheme, kv)


def _check_serving(req: DeployRequest, facts: EngineFacts, line: str, more: list[str] | None = None) -> list[str]:
    """Every problem of the serving settings against the engine, at once, with ``more`` found before (returns the
    warnings)."""
    from yitrt.plan.planner import kv_of_algo, scheme_of_algo
    from yitrt.plan.rules import check, raise_errors, rule_context
    from yitrt.quant.schemes import get_kv_cache, get_scheme

    problems = list(more or [])
    if req.max_batch_size and facts.kind == "trtllm" and req.max_batch_size > facts.max_batch_size:
        problems.append(f"--max-batch-size {req.max_batch_size} exceeds the engine's max_batch_size {facts.max_batch_size}")
    from yitrt.reference.engine.scheduler import POLICIES

    if req.scheduler_policy not in POLICIES:
        problems.append(f"--scheduler-policy {req.scheduler_policy!r} is not one of {', '.join(POLICIES)}")
    if not 0 <= req.kv_host_cache <= 1 << 50:
        problems.append(f"--kv-host-cache {req.kv_host_cache} must be a byte count >= 0")
    slot_only = [name for name, value in (("--max-num-tokens", req.max_num_tokens), ("--tokens-per-block", req.tokens_per_block),
                                          ("--kv-cache-bytes", req.kv_cache_bytes)) if value is not None]
    if facts.kind == "reference":
        tpb = req.tokens_per_block
        if tpb is not None and not (2 <= tpb <= 1024 and tpb & (tpb - 1) == 0):
            problems.append(f"--tokens-per-block {tpb} must be a power of two in 2..1024 (TensorRT-LLM's KV block rule)")
        for option, value in (("--max-num-tokens", req.max_num_tokens), ("--kv-cache-bytes", req.kv_cache_bytes)):
            if value is not None and not 1 <= value <= (INT32_MAX if option == "--max-num-tokens" else 1 << 50):
                problems.append(f"{option} {value} must be positive")
        if facts.kv_cache_quant_algo and (req.kv_reuse or req.chunked_context):
            problems.append(f"the checkpoint's KV cache is {facts.kv_cache_quant_algo}: the reference slot, like an engine without paged context "
                            "FMHA, neither reuses KV blocks nor chunks the context (pass --no-kv-reuse, no --chunked-context)")
    elif slot_only:
        problems.append(f"{', '.join(slot_only)}: reference slot only (an engine's max_num_tokens and tokens_per_block are its build's)")
    if facts.kind == "trtllm" and req.max_kv_tokens is not None and req.max_kv_tokens < facts.max_seq_len:
        problems.append(f"--max-kv-tokens {req.max_kv_tokens} cannot hold one {facts.max_seq_len}-token sequence (max_seq_len); "
                        "TensorRT-LLM refuses to start (maxTokensInPagedKvCache must be large enough to process at least 1 sequence)")
    if facts.max_input_len >= facts.max_seq_len or facts.max_input_len < 1:
        problems.append(f"max_input_len {facts.max_input_len} must be in 1..max_seq_len-1 ({facts.max_seq_len - 1})")
    if not 1 <= req.instances <= MAX_INSTANCES:
        problems.append(f"--instances {req.instances} must be in 1..{MAX_INSTANCES} (each instance is a Python process of its own)")
    for option, value in (("--max-batch-size", req.max_batch_size), ("--max-kv-tokens", req.max_kv_tokens)):
        if value is not None and not 1 <= value <= INT32_MAX:
            problems.append(f"{option} {value} must be in 1..{INT32_MAX} (Triton and TensorRT-LLM hold it in 32 bits)")
    if facts.kind == "trtllm":
        plugins = _plugins(facts)
        paged = facts.kv_cache_type.upper() == "PAGED" if facts.kv_cache_type else plugins.get("paged_kv_cache", "enable") == "enable"
        if not paged:
            problems.append(f"in-flight batching needs a paged KV cache; this engine has {facts.kv_cache_type or 'paged_kv_cache disabled'}")
        if plugins.get("remove_input_padding", "enable") != "enable":
            problems.append("in-flight batching needs an engine built with remove_input_padding enable")
        scheme, kv = get_scheme(scheme_of_algo(facts.quant_algo)), get_kv_cache(kv_of_algo(facts.kv_cache_quant_algo))
        context = rule_context(scheme=scheme, kv=kv, trtllm=line, tp=facts.tp, pp=facts.pp, plugins=plugins,
                               serve={"kv_reuse": req.kv_reuse, "chunked_context": req.chunked_context})
        return raise_errors(check(context), problems, "change the serving options, or rebuild the engine")
    if problems:
        raise ValidationError(problems, "fix every problem listed")
    return []


def _tokenizer_dir(req: DeployRequest, facts: EngineFacts) -> Path:
    from yitrt.reference.textgen import resolve_tokenizer_dir

    if req.tokenizer is not None:
        return resolve_tokenizer_dir(Path(req.source), req.tokenizer)
    if facts.checkpoint is not None and facts.checkpoint.is_dir():
        return resolve_tokenizer_dir(facts.checkpoint, None)
    raise UsageError(f"{req.source} records no model folder to take the tokenizer from", "pass --tokenizer MODEL_DIR")


def stop_ids(tokenizer_dir: Path) -> tuple[int | None, list[int], bool]:
    """(end id, extra stop ids, has a chat template) of a model folder.

    The end id is the chat end token for chat models (Yi-Chat: ``<|im_end|>`` = 7, see `yitrt inspect`), else the
    first eos of generation_config.json, else the tokenizer's eos. When the chat template closes an assistant turn
    with a special token that none of those names, that token ends generation instead (else a chat answer would run
    on to max_tokens, reference §8 #1). Every other eos id (generation_config.json's list, the tokenizer's) becomes a
    stop id, so generation stops on any of them.
    """
    from yitrt.models.summary import describe_model
    from yitrt.reference.verify import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    gen = read_json_if_present(tokenizer_dir / "generation_config.json", "generation_config.json", error=CheckpointError) or {}
    value = gen.get("eos_token_id")
    eos = [v for v in (value if isinstance(value, list) else [value]) if type(v) is int and v >= 0]
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    chat = bool(tokenizer.chat_template)
    chat_end = describe_model(tokenizer_dir).chat_end_id if chat and (tokenizer_dir / "config.json").is_file() else None
    end = chat_end if chat_end is not None else (eos[0] if eos else None)
    turn_end = _template_turn_end(tokenizer) if chat else None
    if turn_end is not None and turn_end != end and turn_end not in eos:
        if end is not None:
            eos.append(end)
        end = turn_end
    return end, [i for i in dict.fromkeys(eos) if i != end], chat


def _template_turn_end(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (ChatML: ``<|im_end|>``)."""
    marker = "yitrt-turn-marker"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this pair says nothing about its turn end
        return None
    after = rendered.split(marker, 1)[1] if marker in rendered else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) else None


def check_tokenizer_files(src: Path) -> list[str]:
    """The tokenizer files of ``src`` the repository gets, each a regular file inside ``src`` (an HF cache snapshot's
    links into its blobs count as inside; any other symbolic link is refused by name: yitrt.userfiles.source_file).

    Raises:
        UsageError: no tokenizer, or a file that may not be copied.
    """
    present = [name for name in TOKENIZER_FILES if source_file(src, name, "tokenizer file") is not None]
    if not {"tokenizer.json", "tokenizer.model", "vocab.json"} & set(present):
        raise UsageError(f"{src} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)", "pass the HF model folder with --tokenizer")
    return present


def _copy_tokenizer(src: Path, dest: Path) -> list[str]:
    return copy_into(src, check_tokenizer_files(src), dest, "tokenizer file")


def _parameters(model: str, contract: contracts.ModelContract, fill: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The contract's parameter keys with the template variables we know filled, plus yitrt's own keys."""
    out = {}
    for key, template in contract.parameters.items():
        var = template[2:-1] if template.startswith("${") else None
        out[key] = fill.get(var, template) if var and var not in _LEFT_UNFILLED.get(model, ()) else template
    for key, value in extra.items():
        if key in out and not out[key].startswith("${"):
            raise AssertionError(f"{model}: yitrt parameter {key} would overwrite a filled key")
        out[key] = value
    return out


def bls_wiring(models: dict[str, contracts.ModelContract]) -> dict[str, dict]:
    """What the BLS model sends where, derived from the ensemble's wiring on the line (one source of tensor names).

    Returns:
        ``yitrt_preprocessing_inputs``: BLS input → preprocessing input;
        ``yitrt_engine_inputs``: tensorrt_llm input → ``[source, name]``, source ``request`` (a BLS input) or
        ``preprocessing`` (its output).
    """
    steps = {step.model: step for step in models["ensemble"].steps}
    bls_inputs = {t.name for t in models["tensorrt_llm_bls"].inputs}
    produced = {tensor: output for output, tensor in steps["preprocessing"].output_map.items()}
    engine: dict[str, list[str]] = {}
    for engine_input, tensor in steps["tensorrt_llm"].input_map.items():
        if tensor in produced:
            engine[engine_input] = ["preprocessing", produced[tensor]]
        elif tensor in bls_inputs:
            engine[engine_input] = ["request", tensor]
    pre = {tensor: model_input for model_input, tensor in steps["preprocessing"].input_map.items() if tensor in bls_inputs}
    return {"yitrt_preprocessing_inputs": pre, "yitrt_engine_inputs": engine}


def _slot_limits(req: DeployRequest) -> dict[str, str]:
    """The reference slot's stand-ins for an engine's build limits, and its KV byte budget (read by
    yitrt.reference.engine.parameters; their defaults apply when left out: 8192 tokens, 32-token blocks, 1 GiB)."""
    from yitrt.reference.engine.parameters import DEFAULTS

    return {"max_num_tokens": str(req.max_num_tokens or DEFAULTS["max_num_tokens"]),
            "tokens_per_block": str(req.tokens_per_block or DEFAULTS["tokens_per_block"]),
            "yitrt_kv_cache_bytes": str(req.kv_cache_bytes or DEFAULTS["yitrt_kv_cache_bytes"])}


def repository_models(req: DeployRequest, spec: Speculation | None = None) -> list[tuple[str, str]]:
    """(folder name, contract model) of every model the repository holds: the BLS under ``req.model_name``, and the
    draft of draft-target speculation, a second ``tensorrt_llm`` under its own name."""
    out = []
    for model in MODEL_NAMES:
        out.append((req.model_name if model == "tensorrt_llm_bls" else model, model))
        if model == "tensorrt_llm" and spec is not None and spec.draft_target:
            out.append((DRAFT_MODEL, model))
    return out


def render_repository(req: DeployRequest, facts: EngineFacts, line: str, end_id: int | None, stops: list[int],
                      spec: Speculation | None = None, lora: LoraDeployment | None = None) -> dict[str, str]:
    """Every model's config.pbtxt text, by model name (the BLS under ``req.model_name``; the draft of draft-target
    speculation as ``tensorrt_llm_draft``); ``lora``: the adapter cache parameters (and the slot's LoRA limits)."""
    models = contracts.contract(line)
    reference = facts.kind == "reference"
    batch = req.max_batch_size or facts.max_batch_size
    kv_fraction = req.kv_fraction if req.kv_fraction is not None else facts.plan.get("kv_cache_free_gpu_mem_fraction")
    kv_tokens = req.max_kv_tokens if req.max_kv_tokens is not None else facts.plan.get("max_tokens_in_paged_kv_cache")
    fill = {
        "triton_max_batch_size": str(batch), "decoupled_mode": str(req.streaming).lower(),
        "triton_backend": "python" if reference else "tensorrtllm", "batching_strategy": "inflight_fused_batching",
        "engine_dir": str(facts.path), "tokenizer_dir": TOKENIZER_FOLDER, "max_beam_width": "1",
        "exclude_input_in_output": "true", "enable_kv_cache_reuse": str(req.kv_reuse if req.kv_reuse is not None else reuse_possible(facts)).lower(),
        "enable_chunked_context": str(req.chunked_context).lower(), "add_special_tokens": "true", "skip_special_tokens": "true",
        "accumulate_tokens": "false", "tensorrt_llm_model_name": "tensorrt_llm", "max_queue_delay_microseconds": "0", "max_queue_size": "0",
        "preprocessing_instance_count": str(req.instances), "postprocessing_instance_count": str(req.instances),
        "bls_instance_count": str(req.instances),
    }
    if kv_fraction is not None:
        fill["kv_cache_free_gpu_mem_fraction"] = f"{float(kv_fraction):g}"
    if kv_tokens is not None:
        fill["max_tokens_in_paged_kv_cache"] = str(int(kv_tokens))
    fill["batch_scheduler_policy"] = req.scheduler_policy
    if req.kv_host_cache:
        fill["kv_cache_host_memory_bytes"] = str(int(req.kv_host_cache))
    if spec is not None:
        fill.update(spec_mod.target_fill(spec))
    if lora is not None:
        fill.update(lora.fill(req.out))
    # prompt_embedding_table: the ensemble declares TYPE_FP16 and Triton refuses an ensemble whose steps disagree
    # on a tensor's type (seen: "inconsistent data type"), so tensorrt_llm/BLS get FP16 too, as NVIDIA's docs fill it.
    # lora_weights: the engine's dtype in tensorrt_llm, the ensemble and the BLS alike, adapters or not — the engine
    # refuses any other ("Expected lora weights to be the same data type as base model": a bf16 engine and the
    # template's FP16, trtllm-serving-features.md §2.6), and Triton refuses an ensemble whose steps disagree on a type
    types = {"logits_datatype": TRITON_DTYPES.get(facts.logits_dtype, "TYPE_FP32"), "encoder_input_features_data_type": "TYPE_FP16",
             "prompt_embedding_table_data_type": "TYPE_FP16", "lora_weights_data_type": TRITON_DTYPES.get(facts.dtype, "TYPE_FP16")}
    limits = {"max_input_len": str(facts.max_input_len)}
    slot = ({**limits, "max_seq_len": str(facts.max_seq_len), "python_executable": sys.executable, **_slot_limits(req),
             "yitrt_engine_slot": "reference: yitrt's CPU reference runtime, for tests and the demo; not TensorRT-LLM"}
            if reference else {})
    extra = {
        "preprocessing": {**limits, "yitrt_words_encoding": req.words_encoding, **({"end_id": str(end_id)} if end_id is not None else {}),
                          **({"stop_token_ids": ",".join(map(str, stops))} if stops else {})},
        "tensorrt_llm": {**slot, **(spec_mod.target_parameters(spec, facts.kind) if spec else {}),
                         **(lora.slot_parameters() if lora is not None and reference else {})},
        DRAFT_MODEL: slot,  # the draft slot stands in for an engine with the target's limits
        "tensorrt_llm_bls": {"tokenizer_dir": TOKENIZER_FOLDER, "skip_special_tokens": "true", "preprocessing_model_name": "preprocessing",
                             **{key: json.dumps(value, sort_keys=True) for key, value in bls_wiring(models).items()},
                             **(spec_mod.bls_parameters(spec) if spec else {})},
    }
    engine_header = Header(backend=fill["triton_backend"], max_batch_size=batch, decoupled=req.streaming, dynamic_batching="queue")
    headers = {
        "ensemble": Header(platform="ensemble", max_batch_size=batch, instance_count=None),
        "preprocessing": Header(backend="python", max_batch_size=batch, dynamic_batching="queue", instance_count=req.instances),
        "tensorrt_llm": engine_header,
        "postprocessing": Header(backend="python", max_batch_size=batch, dynamic_batching="plain", instance_count=req.instances),
        "tensorrt_llm_bls": Header(backend="python", max_batch_size=batch, decoupled=req.streaming, instance_count=req.instances),
    }
    fills = {}
    what = (f"TensorRT-LLM {line} engine {facts.path}" if not reference else
            f"CPU REFERENCE ENGINE SLOT (tests and the demo only, not TensorRT-LLM): checkpoint {facts.path}")
    whats = {}
    if spec is not None and spec.draft_target:
        draft = spec.draft
        draft_fill = {**fill, **spec_mod.draft_fill(spec)}
        fills[DRAFT_MODEL] = {k: v for k, v in draft_fill.items() if v is not None}
        if draft.kind == "trtllm":  # Triton's batch bound must not exceed the draft engine's own
            headers[DRAFT_MODEL] = dataclasses.replace(engine_header, max_batch_size=min(batch, draft.max_batch_size))
        whats[DRAFT_MODEL] = (f"TensorRT-LLM {line} engine {draft.path} (the draft)" if not reference else
                              f"CPU REFERENCE ENGINE SLOT (tests and the demo only, not TensorRT-LLM): draft checkpoint {draft.path}")
    out = {}
    for name, model in repository_models(req, spec):
        note = spec_mod.model_note(spec, name) if model == "tensorrt_llm" else None
        comment = (f"Written by yitrt {__version__} (yitrt deploy) for the TensorRT-LLM {line} inflight_batcher_llm contract.\n"
                   f"Serves: {whats.get(name, what)}." + (note if note is not None else _NOTES.get(model, "")))
        key = name if name == DRAFT_MODEL else model
        cfg = build_config(name, models[model], headers.get(key, headers[model]), types=types,
                           parameters=_parameters(model, models[model], fills.get(name, fill), extra.get(key, {})))
        out[name] = to_text(cfg, comment)
    return out


#: Where a model differs from NVIDIA's on purpose, said in its config.pbtxt (and the repository README).
_NOTES = {
    "preprocessing": ("\nDiffers from the stock model: with yitrt_words_encoding with_space (the default) each stop/bad word is also\n"
                      "encoded after a space, so a word the model writes mid-sentence (other token ids) still stops it; set it to\n"
                      "stock to encode each word alone, as NVIDIA's preprocessing does."),
    "tensorrt_llm": "\nexclude_input_in_output is true: answers hold only the new tokens (a request's own input overrides it).",
}


def _install_sources(model_dir: Path, source: str | None, with_text: bool) -> None:
    """``1/model.py`` from yitrt's model sources (and ``yitrt_text.py`` beside it); an empty ``1/`` for the C++ backend."""
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    src = resources.files("yitrt.triton").joinpath("model_src")
    if source is not None:
        (version / "model.py").write_text(src.joinpath(source).read_text())
    if with_text:
        (version / "yitrt_text.py").write_text(src.joinpath("yitrt_text.py").read_text())


def _launch_script(facts: EngineFacts, spec: Speculation | None = None) -> str:
    from yitrt.triton.server import ORCHESTRATOR_ENV, Ports, launch_argv, shell_line

    gpus = spec.orchestrator_gpus if spec is not None and spec.orchestrator else None
    world = 1 if gpus is not None else facts.world_size
    argv = launch_argv("$REPO", world, "$TRITONSERVER", Ports("$HTTP_PORT", "$GRPC_PORT", "$METRICS_PORT"), orchestrator_gpus=gpus)
    if world > 1:  # mpirun, then one line per rank's app context
        contexts = [shell_line(list(group)) for sep, group in groupby(argv[2:], key=lambda a: a == ":") if not sep]
        body = shell_line(argv[:2]) + " \\\n    " + " : \\\n    ".join(contexts)
    elif gpus is not None:  # mpirun -n 1, then the server's line
        body = shell_line(argv[:4]) + " \\\n    " + shell_line(argv[4:])
    else:
        body = shell_line(argv)
    if gpus is not None:
        ranks = ("TensorRT-LLM's orchestrator mode (launch_triton_server.py --multi-model): one tritonserver under mpirun -n 1;\n"
                 f"# each engine model spawns its own ranks (tensorrt_llm: {facts.tp}×{facts.pp}, {DRAFT_MODEL}: {spec.draft.tp}×{spec.draft.pp})")
    else:
        ranks = (f"{facts.world_size} ranks through mpirun, exactly tp×pp = {facts.tp}×{facts.pp}: one tritonserver per GPU"
                 if facts.world_size > 1 else "one tritonserver process (world size 1)")
    env = "".join(f"export {key}={value}\n" for key, value in ORCHESTRATOR_ENV.items()) if gpus is not None else ""
    return f"""#!/usr/bin/env bash
# Start Triton for this repository: {ranks}.
# Written by yitrt {__version__}. `yitrt serve REPO` does the same and also waits for readiness and stops cleanly.
# Override: TRITONSERVER (binary), HTTP_PORT, GRPC_PORT, METRICS_PORT.
set -euo pipefail
{env}REPO="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
TRITONSERVER="${{TRITONSERVER:-tritonserver}}"
HTTP_PORT="${{HTTP_PORT:-8000}}"
GRPC_PORT="${{GRPC_PORT:-8001}}"
METRICS_PORT="${{METRICS_PORT:-8002}}"
exec {body}
"""


def _readme(req: DeployRequest, facts: EngineFacts, line: str, end_id: int | None, stops: list[int], spec: Speculation | None = None,
            lora: LoraDeployment | None = None) -> str:
    bls = req.model_name
    stream = "true" if req.streaming else "false"
    reference = ("\n**This repository serves a CPU reference engine slot** (yitrt's reference runtime over the checkpoint "
                 f"`{facts.path}`): for tests and the demo only, not TensorRT-LLM.\n" if facts.kind == "reference" else "")
    draft_target = spec is not None and spec.draft_target
    world = ("orchestrator mode, each engine model spawns its own ranks" if spec is not None and spec.orchestrator
             else f"world size {facts.world_size}")
    models = f"`preprocessing`, `tensorrt_llm`{f', `{DRAFT_MODEL}` (the draft)' if draft_target else ''}, `postprocessing`"
    echo = ("the BLS never echoes the prompt; the ensemble does (see Speculative decoding)" if draft_target else "the prompt is never echoed")
    exclude = ("`exclude_input_in_output: false` on `tensorrt_llm` and the draft, as the stock BLS expects in a draft-target repository "
               "(yitrt's BLS asks for new tokens per request; send `exclude_input_in_output` true to the ensemble to drop the prompt)"
               if draft_target else
               "`exclude_input_in_output: true`, so answers hold only new tokens (send `exclude_input_in_output` false to get the prompt back\n"
               "from `tensorrt_llm`)")
    return f"""# Triton repository (yitrt {__version__}, TensorRT-LLM {line} `inflight_batcher_llm` contract)
{reference}
- engine: `{facts.path}` (tp {facts.tp} × pp {facts.pp}; {world}), max batch {req.max_batch_size or facts.max_batch_size},
  max input {facts.max_input_len} tokens, max sequence {facts.max_seq_len} tokens
- models: `ensemble` (stock wiring) and `{bls}` (recommended: chat template, incremental streaming, stop words);
  {models} behind them; decoupled (streaming): {stream}
- end id {end_id}, extra stop ids {stops or 'none'} (from the model's generation_config.json); {echo}

## Start

    ./launch.sh                       # or: yitrt serve {req.out.name}

## Ask

    yitrt chat localhost:8001 --model {bls} "What is the capital of France?"

gRPC streaming with tritonclient (Python):

    import json, numpy as np, tritonclient.grpc as grpc
    client = grpc.InferenceServerClient("localhost:8001")
    def tensor(name, value, dtype):
        t = grpc.InferInput(name, [1, 1], dtype); t.set_data_from_numpy(np.array([[value]], dtype=object if dtype == "BYTES" else None)); return t
    inputs = [tensor("text_input", "", "BYTES"), tensor("max_tokens", np.int32(64), "INT32"),
              tensor("messages", json.dumps([{{"role": "user", "content": "What is the capital of France?"}}]), "BYTES"),
              tensor("stream", True, "BOOL")]
    client.start_stream(callback=lambda result, error: print(error or result.as_numpy("text_output")[0].decode(), end=""))
    client.async_stream_infer("{bls}", inputs, enable_empty_final_response=True)

HTTP (non-decoupled deployments: `/generate`; decoupled: `/generate_stream`):

    curl -s localhost:8000/v2/models/{bls}/generate_stream -d '{{"text_input": "What is the capital of France?", "max_tokens": 64, "stream": true}}'

Inputs beyond the stock contract (optional): `messages` — a JSON list of `{{"role", "content"}}` chat turns, rendered with the
model's chat template (`text_input`, if not empty, is appended as the last user turn).

Differences from NVIDIA's templates, on purpose: stop/bad words are encoded alone and after a space
(`preprocessing` parameter `yitrt_words_encoding`: `{req.words_encoding}`; `stock` encodes them alone); `tensorrt_llm` has
{exclude}. Shapes are the stock ones: `text_output` is 1-D `[1]` per response (`as_numpy("text_output")[0]`).
{spec_mod.readme_section(spec)}{lora.readme_section(bls) if lora is not None else ""}"""


def deploy(req: DeployRequest) -> DeployResult:
    """Write the repository (atomically; a repository with the same inputs is reused unless ``force``).

    Raises:
        UsageError: bad options or folders. ValidationError: serving settings the engine cannot honour (all listed).
        CheckpointError: an incomplete engine or checkpoint.
    """
    if req.engine not in ENGINE_KINDS:
        raise UsageError(f"unknown engine kind {req.engine!r}", f"use one of: {', '.join(ENGINE_KINDS)}")
    if req.words_encoding not in WORDS_ENCODINGS:
        raise UsageError(f"unknown words encoding {req.words_encoding!r}", f"use one of: {', '.join(WORDS_ENCODINGS)}")
    check_name(req.model_name, "--model-name")  # it becomes a folder of the repository: never a path out of it
    # compared without case: the repository must also work on a case-insensitive file system
    if req.model_name.lower() in {m.lower() for m in (*MODEL_NAMES, DRAFT_MODEL)} - {"tensorrt_llm_bls"}:
        raise UsageError(f"--model-name {req.model_name} clashes with a model of the repository", "choose another name for the BLS model")
    facts = engine_facts(req)
    line = _line(req, facts)
    spec, problems, spec_warnings = spec_mod.resolve(req, facts)
    lora, lora_problems = lora_mod.resolve(req.lora, facts.dtype, facts.kind, facts.lora)
    problems = [*problems, *lora_problems]
    if lora is not None and spec is not None:
        problems.append("yitrt does not combine LoRA adapters with speculative decoding: deploy one or the other")
    if req.kv_reuse is None:  # a speculative target must reuse KV blocks (checked against the engine below)
        needed = (spec is not None and spec.draft_target) or facts.speculative_mode == "draft_tokens_external"
        req = dataclasses.replace(req, kv_reuse=True if needed else reuse_possible(facts))
    warnings = _check_serving(req, facts, line, problems) + spec_warnings
    tok_dir = _tokenizer_dir(req, facts)
    check_tokenizer_files(tok_dir)  # before the tokenizer is loaded from them
    end_id, stops, chat = stop_ids(tok_dir)
    if not chat:
        warnings.append(f"the tokenizer in {tok_dir} has no chat template: requests with chat messages will be refused")
    params = {"line": line, "engine": req.engine, "streaming": req.streaming, "max_batch_size": req.max_batch_size,
              "kv_fraction": req.kv_fraction, "max_kv_tokens": req.max_kv_tokens, "kv_reuse": req.kv_reuse,
              "chunked_context": req.chunked_context, "kv_host_cache": req.kv_host_cache, "scheduler_policy": req.scheduler_policy,
              "max_num_tokens": req.max_num_tokens, "tokens_per_block": req.tokens_per_block, "kv_cache_bytes": req.kv_cache_bytes,
              "instances": req.instances, "model_name": req.model_name,
              "max_input_len": req.max_input_len, "max_seq_len": req.max_seq_len, "words_encoding": req.words_encoding, "python": sys.executable if req.engine == "reference" else None,
              "speculative": spec.to_json() if spec else None, **({"lora": lora.to_json()} if lora is not None else {})}
    inputs = {"source": _source_fingerprint(facts.path),
              "tokenizer": fingerprint_files(tok_dir, [n for n in TOKENIZER_FILES if (tok_dir / n).is_file()])}
    if spec is not None and spec.draft is not None:
        inputs["draft"] = _source_fingerprint(spec.draft.path)
    for adapter in lora.adapters if lora is not None else ():
        inputs[f"lora:{adapter.name}"] = fingerprint_files(adapter.source, list(NPY_FILES))
    out = Path(req.out).absolute()
    orchestrator = spec is not None and spec.orchestrator
    summary = {"max_batch_size": req.max_batch_size or facts.max_batch_size, "streaming": req.streaming, "end_id": end_id,
               "stop_ids": stops, "models": [name for name, _ in repository_models(req, spec)],
               "entry_model": req.model_name, "tp": facts.tp, "pp": facts.pp, "world_size": 1 if orchestrator else facts.world_size,
               "kv_reuse": req.kv_reuse, "chunked_context": req.chunked_context, "scheduler_policy": req.scheduler_policy,
               "speculative": spec.to_json() if spec else None,
               **({"lora": [{"name": a.name, "task_id": a.task_id} for a in lora.adapters]} if lora is not None else {}),
               **({"orchestrator": True, "orchestrator_gpus": spec.orchestrator_gpus} if orchestrator else {})}
    if not req.force:
        reused = find_reusable(out, STAGE, _key(params, inputs))
        if reused is not None:
            return DeployResult(out, True, line, facts, summary, warnings, spec)
    configs = render_repository(req, facts, line, end_id, stops, spec, lora)
    with ArtifactWriter(out, STAGE, params, inputs, {"yitrt": __version__}) as art:
        for name, model in repository_models(req, spec):
            folder = art.path / name
            source = _SOURCES.get(model) or ("reference_engine.py" if model == "tensorrt_llm" and facts.kind == "reference" else None)
            _install_sources(folder, source, with_text=source is not None)
            (folder / "config.pbtxt").write_text(configs[name])
        _copy_tokenizer(tok_dir, art.path / TOKENIZER_FOLDER)
        launch = art.path / "launch.sh"
        launch.write_text(_launch_script(facts, spec))
        launch.chmod(0o755)
        if lora is not None:
            lora.write(art.path)
        (art.path / "README.md").write_text(_readme(req, facts, line, end_id, stops, spec, lora))
        art.extra["deploy"] = {**summary, "line": line, "engine": facts.kind, "source": str(facts.path), "tokenizer": str(tok_dir),
                               "max_input_len": facts.max_input_len, "max_seq_len": facts.max_seq_len}
    return DeployResult(out, False, line, facts, summary, warnings, spec)


def _source_fingerprint(path: Path) -> str:
    """Identity of an engine or checkpoint folder: its config, rank files and manifest, and where it is."""
    files = [p.name for p in path.iterdir() if p.name == "config.json" or p.suffix in (".engine", ".safetensors") or p.name == "yitrt-manifest.json"]
    return fingerprint_files(path, files) + ":" + str(path)


def _key(params: dict[str, Any], inputs: dict[str, str]) -> str:
    from yitrt.manifest import artifact_key

    return artifact_key(STAGE, params, inputs)
