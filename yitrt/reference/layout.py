"""What every rank file of a TensorRT-LLM Llama checkpoint must hold, derived from its ``config.json`` alone.

This is the consumer's view (the parameters TensorRT-LLM's LLaMA model declares for a rank, per quant_algo),
written independently of yitrt's converter so that it can catch the converter's mistakes. Sources:
reference/trtllm-checkpoint-and-build.md §1.3 (names, shapes), §2 (TP/PP), §3.3 (tensors per algo), §3.5.
TensorRT-LLM itself fails on a missing or mis-shaped parameter and only warns on an extra tensor; so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from yitrt.checkpoint.safetensors_io import TensorInfo, read_header
from yitrt.errors import CheckpointError
from yitrt.reference.spec import CheckpointSpec

_FLOATS = frozenset({"BF16", "F16", "F32"})
_FP8_BITS = frozenset({"F8_E4M3", "I8"})  # the build re-views int8 bits as float8_e4m3fn (§3.2)
_INT8 = frozenset({"I8"})


@dataclass(frozen=True)
class Expected:
    """One parameter a rank must provide."""

    shape: tuple[int, ...]
    dtypes: frozenset[str]
    scalar: bool = False  # a [1] scale; a 0-d tensor is accepted too (TensorRT-LLM reshapes it)

    def problem(self, name: str, info: TensorInfo) -> str | None:
        """Why a stored tensor does not fit, or None."""
        shape_ok = info.shape == self.shape or (self.scalar and info.shape in ((), (1,)))
        if not shape_ok:
            return f"{name} is {list(info.shape)}, expected {list(self.shape)}"
        if info.dtype not in self.dtypes:
            return f"{name} is {info.dtype}, expected {' or '.join(sorted(self.dtypes))}"
        return None


_SCALE = Expected((1,), _FLOATS, scalar=True)


def is_quantized(spec: CheckpointSpec, module: str) -> bool:
    """Whether a linear module (e.g. ``transformer.layers.3.mlp.fc``, ``lm_head``) is quantized: the algo is set
    and no ``exclude_modules`` pattern matches its name (``fnmatchcase``, as TensorRT-LLM's quantize_layers)."""
    if spec.quant_algo is None:
        return False
    return not any(fnmatchcase(module, pattern) for pattern in spec.exclude_modules)


def linear_tensors(spec: CheckpointSpec, module: str, out: int, inp: int, model_dtype: str) -> dict[str, Expected]:
    """Tensors of one linear layer of local shape [out, in], by the checkpoint's quant_algo (§3.3).

    W8A16/W4A16 checkpoints hold full-precision weights (the build quantizes them); a pre-quantized int8 weight
    would be the arch-specific kernel layout and is refused by the loader.
    """
    dense = {module + ".weight": Expected((out, inp), frozenset({model_dtype}))}
    if not is_quantized(spec, module):
        return dense
    algo, g = spec.quant_algo, spec.group_size
    if algo in ("W8A16", "W4A16"):
        return dense
    if algo == "FP8":
        return {module + ".weight": Expected((out, inp), _FP8_BITS), module + ".weights_scaling_factor": _SCALE, module + ".activation_scaling_factor": _SCALE}
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return {module + ".weight": Expected((out, inp), _FP8_BITS), module + ".per_channel_scale": Expected((out,), _FLOATS)}
    if algo == "W8A8_SQ_PER_CHANNEL":
        return {
            module + ".weight": Expected((out, inp), _INT8),
            module + ".weights_scaling_factor": Expected((out,), _FLOATS),
            module + ".activation_scaling_factor": _SCALE,
            module + ".prequant_scaling_factor": Expected((inp,), _FLOATS),
        }
    # W4A16_AWQ / W4A8_AWQ: int4 packed two per int8 along the output dim, group scales over the input dim
    tensors = {
        module + ".weight": Expected((out // 2, inp), _INT8),
        module + ".weights_scaling_factor": Expected((out, inp // g), _FLOATS),
    }
    if spec.pre_quant_scale:
        tensors[module + ".prequant_scaling_factor"] = Expected((inp,), _FLOATS)
    if algo == "W4A8_AWQ":
        tensors[module + ".weights_scaling_factor_2"] = _SCALE
        tensors[module + ".activation_scaling_factor"] = _SCALE
    return tensors


def shape_problems(spec: CheckpointSpec) -> list[str]:
    """Config-level reasons no rank layout can exist (heads, GQA rule, intermediate, AWQ groups)."""
    tp, problems = spec.tp, []
    if spec.num_heads % tp:
        problems.append(f"tp {tp} does not divide {spec.num_heads} attention heads")
    kv = spec.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        problems.append(f"tp {tp} and {kv} KV heads break the GQA rule (kv % tp == 0 or tp % kv == 0)")
    if spec.intermediate_size % tp:
        problems.append(f"tp {tp} does not divide intermediate_size {spec.intermediate_size}")
    if spec.quant_algo in ("W4A16_AWQ", "W4A8_AWQ"):
        for what, size in (("hidden", spec.hidden_size), ("intermediate/tp", spec.intermediate_size // tp), ("q/tp", spec.num_heads * spec.head_size // tp)):
            if size % spec.group_size:
                problems.append(f"{what} {size} is not a multiple of group_size {spec.group_size}")
    return problems


def expected_tensors(spec: CheckpointSpec, rank: int) -> dict[str, Expected]:
    """Every parameter rank ``rank`` must provide (layer names local to its pipeline stage)."""
    tp, d, h = spec.tp, spec.head_size, spec.hidden_size
    pp_rank = rank // tp  # every TP rank of a stage has the same shapes
    dt = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[spec.dtype]
    model = frozenset({dt})
    vocab_rows = -(-spec.vocab_size // tp)
    out: dict[str, Expected] = {}
    if pp_rank == 0:
        if not spec.parallel_embedding:
            shape = (spec.vocab_size, h)
        elif spec.embedding_sharding_dim == 0:
            shape = (vocab_rows, h)
        else:
            shape = (spec.vocab_size, h // tp)
        out["transformer.vocab_embedding.weight"] = Expected(shape, model)
    q_local, kv_local, i_local = spec.num_heads // tp * d, spec.kv_heads_local() * d, spec.intermediate_size // tp
    for local in range(len(spec.stage_layers(pp_rank))):
        p = f"transformer.layers.{local}."
        out[p + "input_layernorm.weight"] = Expected((h,), model)
        out[p + "post_layernorm.weight"] = Expected((h,), model)
        out |= linear_tensors(spec, p + "attention.qkv", q_local + 2 * kv_local, h, dt)
        out |= linear_tensors(spec, p + "attention.dense", h, q_local, dt)
        out |= linear_tensors(spec, p + "mlp.fc", i_local, h, dt)
        out |= linear_tensors(spec, p + "mlp.gate", i_local, h, dt)
        out |= linear_tensors(spec, p + "mlp.proj", h, i_local, dt)
        if spec.attn_bias:
            out[p + "attention.qkv.bias"] = Expected((q_local + 2 * kv_local,), model)
            out[p + "attention.dense.bias"] = Expected((h,), model)
        if spec.mlp_bias:
            out[p + "mlp.fc.bias"] = Expected((i_local,), model)
            out[p + "mlp.gate.bias"] = Expected((i_local,), model)
            out[p + "mlp.proj.bias"] = Expected((h,), model)
        if spec.kv_cache_quant_algo:
            out[p + "attention.kv_cache_scaling_factor"] = _SCALE
    if pp_rank == spec.pp - 1:
        out["transformer.ln_f.weight"] = Expected((h,), model)
        out |= linear_tensors(spec, "lm_head", vocab_rows, h, dt)
    return out


def lm_head_shares_embedding(spec: CheckpointSpec, tensors: dict[str, TensorInfo]) -> bool:
    """Whether a rank without ``lm_head.weight`` gets the embedding as its lm_head: TensorRT-LLM allows the
    omission and shares the table only when both live on the rank with the same shape and dtype (one pipeline
    stage; tp 1, or vocab-row parallel embedding with V % tp == 0). Otherwise the engine's lm_head would stay
    uninitialized (reference §1.3, §2.4)."""
    if "lm_head.weight" in tensors or spec.pp != 1 or is_quantized(spec, "lm_head"):
        return False
    embedding = tensors.get("transformer.vocab_embedding.weight")
    rows = -(-spec.vocab_size // spec.tp)
    return embedding is not None and embedding.shape == (rows, spec.hidden_size) and (spec.tp == 1 or spec.vocab_size % spec.tp == 0)


#: tensors TensorRT-LLM accepts in place of expected ones (the build derives the expected one from them, §3.2)
_ALTERNATIVES = {"kv_cache_scaling_factor": ("k_cache_scaling_factor", "v_cache_scaling_factor")}
#: optional tensors the build reads when present
_OPTIONAL_SUFFIXES = ("kv_cache_rcp_scaling_factor",)


def check_rank_file(spec: CheckpointSpec, rank: int, tensors: dict[str, TensorInfo]) -> tuple[list[str], list[str]]:
    """Compare one rank file's tensor table with what its rank must provide.

    Returns:
        (problems, extra tensor names). Problems are missing or mis-shaped/mis-typed tensors.
    """
    problems, used = [], set()
    for name, exp in expected_tensors(spec, rank).items():
        info = tensors.get(name)
        if info is None and name == "lm_head.weight" and lm_head_shares_embedding(spec, tensors):
            continue
        if info is None:
            stem, _, suffix = name.rpartition(".")
            alternatives = [f"{stem}.{a}" for a in _ALTERNATIVES.get(suffix, ())]
            if alternatives and all(a in tensors for a in alternatives):
                for alt in alternatives:
                    used.add(alt)
                    if (p := exp.problem(alt, tensors[alt])) is not None:
                        problems.append(p)
                continue
            problems.append(f"{name} is missing")
            continue
        used.add(name)
        stem, _, suffix = name.rpartition(".")
        used.update(a for a in (f"{stem}.{alt}" for alt in _ALTERNATIVES.get(suffix, ())) if a in tensors)  # merged by the build
        if (p := exp.problem(name, info)) is not None:
            problems.append(p)
    extras = sorted(n for n in tensors if n not in used and not n.endswith(_OPTIONAL_SUFFIXES))
    return problems, extras


def check_checkpoint(spec: CheckpointSpec) -> list[str]:
    """Check every rank file of a checkpoint against its config.

    Returns:
        Warnings (extra tensors, which TensorRT-LLM ignores with a warning).

    Raises:
        CheckpointError: missing rank files, impossible shapes, or missing/mis-shaped/mis-typed tensors; all
            problems listed (first few per rank).
    """
    problems = [f"config: {p}" for p in shape_problems(spec)]
    if problems:
        raise CheckpointError(f"{spec.path}: " + "; ".join(problems), "re-create the checkpoint with a valid tp/pp")
    warnings = []
    for rank in range(spec.world_size):
        path = Path(spec.path) / f"rank{rank}.safetensors"
        if not path.is_file():
            problems.append(f"rank{rank}.safetensors is missing")
            continue
        tensors, _, _ = read_header(path)
        rank_problems, extras = check_rank_file(spec, rank, tensors)
        problems += [f"rank{rank}: {p}" for p in rank_problems[:4]]
        if len(rank_problems) > 4:
            problems.append(f"rank{rank}: … and {len(rank_problems) - 4} more")
        if extras:
            warnings.append(f"rank{rank}: {len(extras)} tensor(s) TensorRT-LLM would ignore, e.g. {', '.join(extras[:3])}")
    if problems:
        raise CheckpointError(f"{spec.path}: checkpoint does not match its config.json: " + "; ".join(problems), "re-create the checkpoint (yitrt convert/quantize --force)")
    return warnings


def check_rank_headers(folder: Path, world_size: int) -> None:
    """Validate the header of every rank file of a checkpoint (``safetensors_io.validate_header``; no tensor data
    is read), for paths that hand the files to a runtime later (``yitrt deploy --engine reference``).

    Raises:
        CheckpointError: a rank file is missing, damaged or lies in its header.
    """
    for rank in range(world_size):
        read_header(Path(folder) / f"rank{rank}.safetensors")
