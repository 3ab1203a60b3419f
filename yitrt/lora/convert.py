"""`yitrt lora convert`: a PEFT LoRA adapter → TensorRT-LLM's ``lora_weights`` / ``lora_config`` arrays, with a manifest.

The adapter is checked whole first (``yitrt.lora.adapter.check_adapter``: every problem in one message, nothing
written). Then each module's A and B·scale are packed in TensorRT-LLM's row layout (``yitrt.lora.format``) and
written, atomically (``yitrt.manifest.ArtifactWriter``: a failed conversion leaves nothing and never touches a
previous good output), as

    DIR/model.lora_weights.npy    [1, rows, max_row_len]  (float16; float32 for float32 engines and — numpy has no
                                                            bf16 — for bfloat16 engines, holding bf16-rounded values)
    DIR/model.lora_config.npy     [1, rows, 3] int32      ([module_id, layer, r]; layers ascending, then module id)
    DIR/hf/adapter_config.json, DIR/hf/adapter_model.safetensors   (the adapter as ``trtllm-build --lora_dir`` reads it)
    DIR/yitrt-manifest.json

Scaling (trtllm-serving-features.md §2.3, §2.4): B is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``). Unlike TensorRT-LLM's ``hf_lora_convert.py``, which applies one global scale and so ignores PEFT's
``rank_pattern`` / ``alpha_pattern``, each module gets its own rank and alpha here: every ``lora_config`` row carries
its own adapter size, so per-module ranks are representable and the scale is the one PEFT applied to that module.

Weights are full (unsplit) for every TP rank — the runtime slices them — except that at tp > num_kv_heads the k/v
B rows are repeated per KV head exactly as the base k/v weights are (``yitrt.checkpoint.sharding``), because
TensorRT-LLM's runtime then sizes k/v as ``local_kv_heads · tp · head_dim`` rows (§2.6: inferred from GJC/LMOD-cpp,
UNCONFIRMED).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yitrt import __version__
from yitrt.errors import LoraError
from yitrt.lora import CONFIG_NAME, HF_DIR, WEIGHTS_NAME
from yitrt.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModel, check_adapter, load_tensors
from yitrt.lora.format import pack
from yitrt.lora.modules import LORA_MODULES, STORE_DTYPES, LoraModule, by_trtllm

STAGE = "lora-convert"


def _kv_repeated(base: BaseModel, module: LoraModule, b: np.ndarray, tp: int) -> np.ndarray:
    """B's rows for k/v at tp > num_kv_heads: each rank's KV head, rank by rank, picked by the base weights' own
    sharding rule (``rank_segments`` of ``attention.qkv``), so adapter and base weights agree on which head a rank
    holds. UNCONFIRMED (trtllm-serving-features.md §2.6): inferred from the runtime's k/v size
    ``local_kv_heads · tp · head_dim``."""
    from yitrt.checkpoint.sharding import rank_segments
    from yitrt.models.llama import LLAMA_TENSORS, ResolvedPart, ResolvedTensor

    rule = next(r for r in LLAMA_TENSORS if r.target.endswith(module.target + ".weight"))
    parts = tuple(ResolvedPart(s.role, (0, 0), s.role) for s in rule.sources)  # names = roles: only the rows are used
    tensor = ResolvedTensor(rule, rule.target, 0, parts)
    blocks = []
    for tp_rank in range(tp):
        seg = next(s for s in rank_segments(base, tensor, tp, tp_rank) if s.source == module.role)
        blocks.append(b[seg.rows[0] : seg.rows[1]])
    return np.concatenate(blocks)


@dataclass(frozen=True)
class ConvertedAdapter:
    """A converted adapter read back: the two request arrays and the manifest.

    Attributes:
        path: the folder.
        weights: ``lora_weights`` [1, rows, max_row_len] (float16 or float32; see ``dtype``).
        config: ``lora_config`` [1, rows, 3] int32.
        manifest: the manifest as JSON (``manifest["extra"]`` holds the adapter facts: ``dtype``, ``tp``, ``r``,
            ``alpha``, ``rslora``, ``hf_modules``, ``trtllm_modules``, ``module_ids``, ``ranks``, ``max_rank``, ``rows``,
            ``max_row_len``, ``adapter_name``, ``adapter_source``, ``base_fingerprint``...).
    """

    path: Path
    weights: np.ndarray
    config: np.ndarray
    manifest: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        """The adapter facts recorded at conversion (the manifest's ``extra``)."""
        return self.manifest.get("extra", {})

    @property
    def dtype(self) -> str:
        """The engine dtype the weights are for (``bfloat16`` weights are stored as bf16-exact float32)."""
        return self.info["dtype"]

    @property
    def tp(self) -> int:
        """The tensor-parallel size converted for (decides k/v rows at tp > num_kv_heads)."""
        return self.info["tp"]

    @property
    def modules(self) -> list[str]:
        """The TensorRT-LLM modules the adapter adapts."""
        return list(self.info["trtllm_modules"])

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (the engine's max_lora_rank must be at least this)."""
        return int(self.info["max_rank"])


def read_converted(out: str | Path) -> ConvertedAdapter:
    """Read the output of :func:`convert_adapter`.

    Raises:
        LoraError: not a converted adapter, or its files do not match the manifest.
    """
    from yitrt.manifest import find_reusable, read_manifest

    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None or manifest.stage != STAGE:
        raise LoraError(f"{out} is not a converted LoRA adapter (no {STAGE} manifest)", "convert the adapter with `yitrt lora convert`")
    if find_reusable(out, STAGE, manifest.key) is None:
        raise LoraError(f"{out}: the files do not match its manifest (changed or incomplete)", "convert the adapter again")
    try:
        weights = np.load(out / WEIGHTS_NAME, allow_pickle=False)
        config = np.load(out / CONFIG_NAME, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LoraError(f"{out}: cannot read the LoRA arrays ({exc})", "convert the adapter again") from None
    if weights.ndim != 3 or config.ndim != 3 or config.shape[2] != 3 or config.dtype != np.int32 or weights.shape[:2] != config.shape[:2] \
            or weights.dtype.kind != "f":
        raise LoraError(f"{out}: lora arrays of shapes {list(weights.shape)} ({weights.dtype}) and {list(config.shape)} ({config.dtype})",
                        "convert the adapter again")
    converted = ConvertedAdapter(out, weights, config, manifest.to_json())
    info = converted.info  # the manifest's own fields are not covered by its file hashes: what readers use is checked
    ok = isinstance(info, dict) and info.get("dtype") in STORE_DTYPES and _count(info.get("tp")) and _count(info.get("max_rank")) \
        and isinstance(info.get("trtllm_modules"), list) and all(by_trtllm(m) is not None for m in info["trtllm_modules"] if isinstance(m, str)) \
        and all(isinstance(m, str) for m in info["trtllm_modules"])
    if not ok:
        raise LoraError(f"{out}: its manifest does not describe a converted adapter (dtype, tp, max_rank, trtllm_modules)",
                        "convert the adapter again")
    return converted


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def convert_adapter(adapter: str | Path, base: str | Path, out: str | Path, tp: int | None = None, dtype: str | None = None,
                    max_lora_rank: int | None = None, target_modules: Any = None, allow_pickle: bool = False, *,
                    revision: str | None = None, base_revision: str | None = None, force: bool = False) -> Path:
    """Convert a PEFT LoRA adapter for a base model into TensorRT-LLM's request arrays (see the module docstring).

    Args:
        adapter: a PEFT adapter folder or a Hub repo id.
        base: the base model: an HF model folder or Hub id (config only), or a TensorRT-LLM checkpoint folder.
        out: the output folder (an artifact: created atomically; a previous one is replaced only when this succeeds).
        tp: the engine's tensor-parallel size (default: the checkpoint's, or 1).
        dtype: the engine dtype (default: the base's); anything else is refused, as the engine would.
        max_lora_rank: the engine's max_lora_rank (None: not checked).
        target_modules: the engine's lora_target_modules (TensorRT-LLM or HF names; list or comma-separated); None:
            not restricted.
        allow_pickle: accept ``adapter_model.bin`` (torch.load(weights_only=True)).
        revision, base_revision: Hub revisions of the adapter and of the base.
        force: convert again even if ``out`` already holds this conversion.

    Returns:
        ``out``.

    Raises:
        LoraError: every problem of the adapter against the base and the options, in one message.
        UsageError, HubError, CheckpointError: an unusable reference or base. ArtifactError: ``out`` cannot be written.
    """
    from yitrt.manifest import (
        ArtifactWriter,
        artifact_digest,
        artifact_key,
        check_output_folder,
        digest_json,
        find_reusable,
        hash_file,
    )
    from yitrt.userfiles import copy_into

    out = Path(out)
    checked = check_adapter(adapter, base, tp, dtype, max_lora_rank, target_modules, allow_pickle,
                            revision=revision, base_revision=base_revision)
    check_output_folder(out, STAGE)
    source, base_model, entries, tp, dtype = checked.source, checked.base, checked.modules, checked.tp, checked.dtype
    enabled = checked.enabled

    files = [source.folder / ADAPTER_CONFIG, source.weights_file]
    adapter_digest = digest_json([[p.name, hash_file(p)] for p in files])
    params = {"tp": tp, "dtype": dtype, "max_lora_rank": max_lora_rank, "target_modules": sorted(enabled) if enabled is not None else None,
              "allow_pickle": allow_pickle}
    inputs = {"adapter": adapter_digest, "base_config": base_model.config_sha256}
    if not force and find_reusable(out, STAGE, artifact_key(STAGE, params, inputs)) is not None:
        return out

    tensors = load_tensors(source)
    bad = sorted(n for e in entries for n in (e.a_name, e.b_name) if not np.isfinite(tensors[n]).all())
    if bad:
        raise LoraError(f"cannot convert {adapter}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]}", "the adapter is damaged; train or save it again")
    rslora = checked.rslora
    repeat_kv = tp > base_model.num_kv_heads
    modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for entry in entries:
        a = tensors[entry.a_name]
        with np.errstate(over="ignore"):  # an overflow becomes Inf: refused below, with the adapter named
            b = (tensors[entry.b_name].astype(np.float64) * checked.scale(entry)).astype(np.float32)
        if repeat_kv and entry.module.role in ("k", "v"):
            b = _kv_repeated(base_model, entry.module, b, tp)
        modules[(entry.layer, entry.module.trtllm)] = (a, b)
    weights, config = pack(modules, dtype)
    if np.isinf(weights).any():  # finite inputs (checked above), but B · alpha/r (or A) beyond what the engine dtype holds
        peak = max(float(np.abs(m).max()) for pair in modules.values() for m in pair)
        raise LoraError(f"cannot convert {adapter}: its scaled weights (largest |value| {peak:.4g}) overflow {dtype}",
                        "the adapter is damaged, or (beyond float16 only) serve it on a bfloat16 or float32 engine")

    used = sorted({e.module.module_id for e in entries})
    ranks: dict[str, list[int]] = {}
    for entry in sorted(entries, key=lambda e: e.module.module_id):
        ranks.setdefault(entry.module.trtllm, []).append(entry.rank)
    name = source.repo_id or source.folder.resolve().name
    with ArtifactWriter(out, STAGE, params, inputs, {"yitrt": __version__, "numpy": np.__version__}) as art:
        art.extra = {
            "adapter_name": name,
            "adapter_source": f"{source.repo_id}@{source.revision}" if source.repo_id else str(source.folder.resolve()),
            "base": str(base_model.path.resolve()) if base_model.repo_id is None else base_model.repo_id,
            "base_kind": base_model.kind,
            "base_fingerprint": artifact_digest(base_model.path) or base_model.config_sha256,
            "r": source.config["r"],
            "alpha": source.config["lora_alpha"],
            "rslora": rslora,
            "rank_pattern": source.config.get("rank_pattern") or {},
            "alpha_pattern": source.config.get("alpha_pattern") or {},
            "ranks": {m: sorted(set(r)) for m, r in ranks.items()},
            "max_rank": max(e.rank for e in entries),
            "hf_modules": [m.hf for m in LORA_MODULES if m.module_id in used],
            "peft_target_modules": source.config.get("target_modules"),  # as the adapter declares them (list or regex)
            "peft_base_model": source.config.get("base_model_name_or_path"),  # what it was trained on, as PEFT recorded it
            "trtllm_modules": [m.trtllm for m in LORA_MODULES if m.module_id in used],
            "module_ids": used,
            "layers": sorted({e.layer for e in entries}),
            "num_layers": base_model.num_layers,
            "dtype": dtype,
            "stored_as": weights.dtype.name,
            "tp": tp,
            "kv_heads_repeated": repeat_kv and any(e.module.role in ("k", "v") for e in entries),
            "rows": int(config.shape[1]),
            "max_row_len": int(weights.shape[2]),
        }
        np.save(art.path / WEIGHTS_NAME, weights, allow_pickle=False)
        np.save(art.path / CONFIG_NAME, config, allow_pickle=False)
        hf_dir = art.path / HF_DIR
        copy_into(source.folder, [ADAPTER_CONFIG] + ([ADAPTER_WEIGHTS] if source.pickled is None else []), hf_dir, "adapter file", LoraError)
        if source.pickled is not None:  # the --lora_dir copy is safetensors only
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in source.pickled.items()}, str(hf_dir / ADAPTER_WEIGHTS))
    return out
