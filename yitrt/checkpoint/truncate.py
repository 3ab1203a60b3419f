"""Keep the first N decoder layers of a TensorRT-LLM checkpoint: a truncated self-draft for draft-target decoding.

The draft keeps the model's embedding, its first N layers, the final norm and ``lm_head`` (config
``num_hidden_layers`` = N): a real, weaker model with the target's tokenizer and vocabulary, so it drafts tokens the
target often accepts. ``yitrt convert --keep-layers N`` writes one from a Hugging Face folder; ``truncate_checkpoint``
makes one from an existing checkpoint folder (the demo's). Rank files are streamed: each kept tensor's bytes are
copied inside the kernel into a header-first file, so memory stays at the headers. The result is an artifact like
every stage's: built in ``<out>.partial-<pid>`` and renamed, with a manifest naming the source's digest and N.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt import __version__
from yitrt.checkpoint.safetensors_io import SafetensorsReader
from yitrt.checkpoint.safetensors_writer import PlannedTensor, StreamingWriter
from yitrt.errors import ArtifactError, CheckpointError, ValidationError
from yitrt.manifest import (
    MANIFEST_NAME,
    RECIPE_NAME,
    ArtifactWriter,
    artifact_digest,
    artifact_key,
    check_output_folder,
    find_reusable,
    fingerprint_files,
)

STAGE = "truncate"
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")
#: files of a checkpoint folder that are not copied: yitrt's own records (a new manifest is written)
_OWN = {MANIFEST_NAME, RECIPE_NAME}


def keep_layers_problems(num_layers: int, keep: int | None, option: str = "--keep-layers") -> list[str]:
    """Why ``keep`` first layers cannot be kept of a model with ``num_layers`` (empty: they can); ``option`` names the
    setting in the message."""
    if keep is None:
        return []
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        return [f"{option} must be a positive integer, got {keep!r}"]
    if keep > num_layers:
        return [f"{option} {keep} exceeds the model's {num_layers} decoder layers"]
    return []


def layer_of(name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to (``transformer.layers.{i}.…``), None for the others."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


@dataclass
class TruncateResult:
    """What ``truncate_checkpoint`` produced."""

    out: Path
    reused: bool
    layers: int
    source_layers: int
    world_size: int
    bytes_written: int
    files: list[str]
    seconds: float
    dropped_tensors: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON object."""
        return {"out": str(self.out), "reused": self.reused, "layers": self.layers, "source_layers": self.source_layers,
                "world_size": self.world_size, "bytes_written": self.bytes_written, "files": self.files,
                "seconds": round(self.seconds, 3), "dropped_tensors": self.dropped_tensors, "warnings": self.warnings}


def _read_config(folder: Path) -> dict[str, Any]:
    from yitrt.userfiles import read_json

    config = read_json(folder / "config.json", "checkpoint config.json", error=CheckpointError,
                       fix="point at a TensorRT-LLM checkpoint folder (yitrt convert/quantize output)")
    if "architecture" not in config or "mapping" not in config:
        raise CheckpointError(f"{folder}/config.json is not a TensorRT-LLM checkpoint config (no architecture/mapping)",
                              "point at a TensorRT-LLM checkpoint folder, not a Hugging Face model or an engine")
    return config


def truncated_config(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """A checkpoint config with ``num_hidden_layers`` = ``layers``; ``exclude_modules`` entries naming a dropped layer
    go too (an entry for a module that is not there is noise)."""
    out = json.loads(json.dumps(config))
    out["num_hidden_layers"] = layers
    quant = out.get("quantization")
    if isinstance(quant, dict) and isinstance(quant.get("exclude_modules"), list):
        quant["exclude_modules"] = [m for m in quant["exclude_modules"]
                                    if not (isinstance(m, str) and (layer := layer_of(m + ".")) is not None and layer >= layers)]
    return out


def truncate_checkpoint(checkpoint: Path, out: Path, layers: int, *, force: bool = False) -> TruncateResult:
    """Write a checkpoint of the first ``layers`` decoder layers of ``checkpoint`` (embedding, final norm and lm_head
    kept), atomically, with a manifest.

    Args:
        checkpoint: a TensorRT-LLM checkpoint folder (config.json + rank{r}.safetensors), pp 1.
        out: the new checkpoint folder.
        layers: decoder layers to keep, 1..num_hidden_layers.
        force: redo it even when an identical artifact exists.

    Returns:
        The result (``reused``: an identical artifact was already there).

    Raises:
        UsageError / ValidationError: bad N, a pp > 1 or mixed-precision checkpoint, ``out`` is the source.
        CheckpointError: the folder is not a checkpoint, or its rank files do not hold the layers its config says.
        ArtifactError: ``out`` cannot be written.
    """
    started = time.perf_counter()
    checkpoint, out = Path(checkpoint), Path(out)
    config = _read_config(checkpoint)
    num_layers = int(config.get("num_hidden_layers") or 0)
    mapping = config["mapping"]
    tp, pp = int(mapping.get("tp_size", 1)), int(mapping.get("pp_size", 1))
    problems = keep_layers_problems(num_layers, layers, "--layers")
    if pp != 1:
        problems.append(f"{checkpoint} is split into {pp} pipeline stages: truncate a pp 1 checkpoint (convert it again with --pp 1)")
    if (checkpoint / "quant_cfg.json").exists() or (config.get("quantization") or {}).get("quant_algo") == "MIXED_PRECISION":
        problems.append("a mixed-precision checkpoint (quant_cfg.json per layer) is not truncated")
    if problems:
        raise ValidationError(problems, "truncate a pp 1 checkpoint to 1..num_hidden_layers layers")
    if out.resolve() == checkpoint.resolve():
        raise ArtifactError(f"{out} is the source checkpoint itself", "write the truncated checkpoint to another --out")
    check_output_folder(out, STAGE)
    world = tp * pp
    ranks = [checkpoint / f"rank{r}.safetensors" for r in range(world)]
    missing = [p.name for p in ranks if not p.is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks {', '.join(missing)} (mapping world size {world})", "re-create the checkpoint")
    extra_files = sorted(p.name for p in checkpoint.iterdir()
                         if p.is_file() and p.name not in _OWN and p.name != "config.json" and p not in ranks)
    digest = artifact_digest(checkpoint) or fingerprint_files(checkpoint, ["config.json", *[p.name for p in ranks], *extra_files])
    params = {"layers": layers, "source_layers": num_layers}
    inputs = {"checkpoint": digest}
    if not force and (manifest := find_reusable(out, STAGE, artifact_key(STAGE, params, inputs))) is not None:
        return TruncateResult(out, True, layers, num_layers, world, 0, [f["path"] for f in manifest.files],
                              time.perf_counter() - started)
    new_config = truncated_config(config, layers)
    total = dropped = 0
    with ArtifactWriter(out, STAGE, params, inputs, {"yitrt": __version__}) as art:
        art.extra = {"source": str(checkpoint.absolute()), "kept_layers": layers, "source_layers": num_layers}
        for path in ranks:
            size, digest_r, gone = _truncate_rank(path, art.path / path.name, layers, num_layers)
            art.record_file(path.name, size, digest_r)
            total += size
            dropped += gone
        for name in extra_files:  # e.g. a tokenizer copied beside the checkpoint: unchanged
            (art.path / name).write_bytes((checkpoint / name).read_bytes())
        (art.path / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    files = [f["path"] for f in art.manifest.files] if art.manifest else []
    return TruncateResult(out, False, layers, num_layers, world, total, files, time.perf_counter() - started, dropped)


def _truncate_rank(source: Path, target: Path, layers: int, num_layers: int) -> tuple[int, str, int]:
    """Copy one rank file's tensors outside the dropped layers; return (size, digest, tensors dropped).

    Raises:
        CheckpointError: the file's layer tensors do not cover 0..num_layers-1.
    """
    with SafetensorsReader(source) as reader:
        infos = sorted(reader.tensors.values(), key=lambda t: t.begin)
        present = {layer for t in infos if (layer := layer_of(t.name)) is not None}
        if present != set(range(num_layers)):
            raise CheckpointError(f"{source}: holds decoder layers {sorted(present)[:3]}…{sorted(present)[-3:] if present else []} "
                                  f"({len(present)}), config.json says {num_layers}", "re-create the checkpoint")
        kept = [t for t in infos if (layer := layer_of(t.name)) is None or layer < layers]
        plan = [PlannedTensor(t.name, t.dtype, t.shape) for t in kept]
        writer = StreamingWriter(target, plan, dict(reader.metadata) or {"format": "pt"}, allow_nonfinite=True)
        try:
            fd = reader.fileno()
            for t in kept:
                if t.nbytes:
                    writer.copy_at(t.name, 0, fd, t.begin, t.nbytes, str(source))
            reader.check_unchanged()
            size, digest = writer.close()
        except BaseException:
            writer.abort()
            raise
    return size, digest, len(infos) - len(kept)

