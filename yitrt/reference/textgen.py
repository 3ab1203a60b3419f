"""``yitrt generate``: a quick look at what a checkpoint writes, through the reference runtime.

The tokenizer comes from the model folder recorded in the checkpoint's manifest (``extra.source``, written by
``convert``/``quantize``) unless one is given. With ``chat`` the prompt is rendered with the tokenizer's chat
template and generation stops at the chat end id (Yi-Chat: ``<|im_end|>``), else at the tokenizer's eos.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import UsageError
from yitrt.manifest import read_manifest


def recorded_source(checkpoint: Path) -> Path | None:
    """The HF model folder a checkpoint was made from, as its manifest records it (None if unknown or gone)."""
    manifest = read_manifest(checkpoint)
    source = (manifest.extra or {}).get("source") if manifest else None
    return Path(source) if source and Path(source).is_dir() else None


def resolve_tokenizer_dir(checkpoint: Path, tokenizer: Path | None) -> Path:
    """The tokenizer folder: the one given, else the checkpoint's recorded source.

    Raises:
        UsageError: none given and none recorded (or the recorded folder is gone).
    """
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise UsageError(f"tokenizer folder {tokenizer} does not exist", "pass the HF model folder with --tokenizer")
        return Path(tokenizer)
    source = recorded_source(checkpoint)
    if source is None:
        raise UsageError(f"{checkpoint} records no model folder to take the tokenizer from", "pass --tokenizer MODEL_DIR")
    return source


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate.

    Attributes:
        checkpoint: TensorRT-LLM checkpoint folder.
        prompts: one or more prompts (batched together).
        chat: render each prompt as a user turn with the chat template.
        max_new_tokens: generation length limit.
        temperature: 0 = greedy; else sampling with ``top_k``/``top_p`` and ``seed``.
        tokenizer: tokenizer folder (default: the manifest's source).
        device, compute_dtype: as for the reference runtime.
    """

    checkpoint: Path
    prompts: tuple[str, ...]
    chat: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    tokenizer: Path | None = None
    device: str = "auto"
    compute_dtype: str = "float32"


def end_ids(tokenizer_dir: Path, tokenizer, chat: bool) -> tuple[int, ...]:
    """Ids that end generation: the chat end id (registry/template, see `yitrt inspect`) with ``chat``, plus eos."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat:
        from yitrt.models.summary import describe_model

        end = describe_model(tokenizer_dir).chat_end_id
        if end is not None:
            ids.insert(0, end)
    return tuple(dict.fromkeys(ids))


def generate_text(req: GenerateRequest) -> dict[str, Any]:
    """Generate from a checkpoint.

    Returns:
        ``{"checkpoint", "tokenizer", "completions": [{"prompt", "text", "tokens", "stopped"}], "seconds", "ranks"}``.

    Raises:
        UsageError: no prompt, no tokenizer, or a chat request for a tokenizer without a chat template.
        CheckpointError / UnsupportedModelError: from the reference runtime.
    """
    from yitrt.reference.runtime import ReferenceRuntime, Sampling
    from yitrt.reference.verify import load_tokenizer

    started = time.perf_counter()
    if not req.prompts:
        raise UsageError("no prompt given", "pass --prompt TEXT")
    tok_dir = resolve_tokenizer_dir(req.checkpoint, req.tokenizer)
    tokenizer = load_tokenizer(tok_dir)
    if req.chat:
        if not tokenizer.chat_template:
            raise UsageError(f"the tokenizer in {tok_dir} has no chat template", "drop --chat, or pass a chat model's --tokenizer")
        ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for p in req.prompts]
    else:
        ids = [tokenizer(p)["input_ids"] for p in req.prompts]
    stop = end_ids(tok_dir, tokenizer, req.chat)
    sampling = Sampling(greedy=req.temperature <= 0, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
    with ReferenceRuntime(req.checkpoint, req.device, req.compute_dtype) as runtime:
        outputs = runtime.generate(ids, req.max_new_tokens, sampling, stop)
        ranks = runtime.ranks
    completions = []
    for prompt, new in zip(req.prompts, outputs, strict=True):
        stopped = bool(new) and new[-1] in stop
        text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=False)
        completions.append({"prompt": prompt, "text": text, "tokens": new, "stopped": stopped})
    return {"checkpoint": str(req.checkpoint), "tokenizer": str(tok_dir), "completions": completions,
            "seconds": round(time.perf_counter() - started, 2), "ranks": ranks}
