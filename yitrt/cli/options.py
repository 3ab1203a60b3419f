"""Shared option types (``Annotated`` aliases) so every command spells an option the same way.

Choices come from the library's tables (schemes, KV formats, dtypes), never from a second list.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from yitrt.checkpoint.trtllm_config import DTYPES
from yitrt.quant.schemes import KV_CACHE_FORMATS, SCHEMES
from yitrt.reference import COMPUTE_DTYPES, DEVICES

SchemeChoice = Enum("SchemeChoice", {name: name for name in SCHEMES if name != "none"}, type=str)
KvCacheChoice = Enum("KvCacheChoice", {name: name for name in KV_CACHE_FORMATS}, type=str)
DtypeChoice = Enum("DtypeChoice", {name: name for name in DTYPES}, type=str)
DeviceChoice = Enum("DeviceChoice", {name: name for name in DEVICES}, type=str)
ComputeDtypeChoice = Enum("ComputeDtypeChoice", {name: name for name in COMPUTE_DTYPES}, type=str)

ModelArg = Annotated[str, typer.Argument(help="A Hugging Face repo id (owner/name) or a local model folder.", show_default=False)]
RepoIdArg = Annotated[str, typer.Argument(help="A Hugging Face repo id, e.g. 01-ai/Yi-1.5-9B-Chat.", show_default=False)]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of the Hub repo (pin it for reproducible runs).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output artifact folder (created atomically).", show_default=False)]
TpOpt = Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel size (GPUs per pipeline stage).")]
PpOpt = Annotated[int, typer.Option("--pp", min=1, help="Pipeline-parallel size (stages).")]
DtypeOpt = Annotated[DtypeChoice, typer.Option("--dtype", help="Model dtype; auto = the source's (float32 becomes float16).")]
KvCacheOpt = Annotated[KvCacheChoice | None, typer.Option("--kv-cache", help="Quantize the KV cache (convert: fp8 with scale 1.0; quantize: calibrated fp8 or int8).")]
GpuOpt = Annotated[str | None, typer.Option("--gpu", help="Target GPU of the engine (e.g. H100, L40S, A100, sm89): refuse formats it cannot run.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the work even if an identical artifact exists.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt weights (loaded with torch.load(weights_only=True)).")]
ParallelEmbeddingOpt = Annotated[
    bool,
    typer.Option("--parallel-embedding/--no-parallel-embedding", help="Split the embedding table across TP ranks by vocab rows."),
]
CheckpointArg = Annotated[Path, typer.Argument(help="A TensorRT-LLM checkpoint folder (config.json + rank*.safetensors).", show_default=False,
                                               exists=True, file_okay=False, dir_okay=True, readable=True)]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where the reference runtime runs; auto = CUDA if available.")]
ComputeDtypeOpt = Annotated[
    ComputeDtypeChoice,
    typer.Option("--compute-dtype", help="Arithmetic dtype of both models; float32 computes the checkpoint's exact values."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (logs go to stderr).")]

#: Path options that must name an existing file / folder, checked by the option type before any work (a missing
#: --calib found after minutes of loading the model is a wasted run). Readers still refuse FIFOs and devices.
EXISTING_FILE = {"exists": True, "file_okay": True, "dir_okay": False, "readable": True}
EXISTING_DIR = {"exists": True, "file_okay": False, "dir_okay": True, "readable": True}
EXISTING_PATH = {"exists": True, "readable": True}

#: TCP ports: 1..65535 (0 would let the OS pick one nobody knows; a negative or larger one is no port).
PORT_RANGE = {"min": 1, "max": 65535}


def port_option(name: str, help: str) -> typer.models.OptionInfo:
    """A ``--*-port`` option: an integer in 1..65535, refused by the option type otherwise."""
    return typer.Option(name, help=help, **PORT_RANGE)


def check_distinct_ports(ports: dict[str, int]) -> None:
    """Refuse the same port given to two endpoints (``{"--http-port": 8000, ...}``): the server could bind only one.

    Raises:
        UsageError: two options name the same port.
    """
    from yitrt.errors import UsageError

    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port in seen:
            raise UsageError(f"{seen[port]} and {option} are both {port}", "give each endpoint its own port")
        seen[port] = option
AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Keep NaN/Inf weights (and casts that overflow to Inf) instead of refusing them; each is reported as a warning."),
]
KeepLayersOpt = Annotated[
    int | None,
    typer.Option("--keep-layers", min=1, help="Keep only the first N decoder layers (with embedding, final norm and lm_head): a truncated self-draft.", show_default=False),
]
