"""Calibration data: the shipped bilingual set or the user's file, sampled with a seed and packed into
sequences of exactly ``seq_len`` tokens.

Packing (documents joined with the tokenizer's end-of-sequence token, then cut into equal blocks) means no
padding ever reaches the quantizers: ModelOpt's calibrators see every position of a batch, so pad tokens would
skew activation ranges. Documents are drawn in a seeded random order until ``size × seq_len`` tokens are
gathered, so a given seed and file always calibrate on the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from yitrt.errors import UsageError

DEFAULT_CALIB = "calib_text.jsonl"  # in yitrt/data; provenance in SOURCES.txt
#: default calibration (sequences, tokens each) by device: ModelOpt's and TensorRT-LLM's 512 × 512 on GPUs; on a
#: CPU a smaller set, since AWQ's scale search there costs about a minute per 2k tokens for a 135M model
CALIB_DEFAULTS = {"cuda": (512, 512), "cpu": (32, 256)}


@dataclass(frozen=True)
class CalibrationSet:
    """Token sequences for calibration.

    Attributes:
        sequences: ``size`` lists of exactly ``seq_len`` token ids (fewer when the data runs out).
        source: where the documents came from (the file, or the shipped set).
        documents: documents in the data.
        documents_used: documents drawn to fill the sequences.
        digest: sha256 of the raw data file (part of the artifact's cache key).
    """

    sequences: list[list[int]]
    source: str
    documents: int
    documents_used: int
    digest: str


def read_documents(path: Path | None) -> tuple[list[dict], str, str]:
    """Documents of a calibration file: JSONL (``text``, or chat ``messages``) or plain text (paragraphs
    separated by blank lines). None reads the shipped set.

    Returns:
        (documents as {"text": str} or {"messages": list}, source description, sha256 of the bytes).

    Raises:
        UsageError: unreadable file, a bad JSONL line (its number is named), or no document at all.
    """
    if path is None:
        raw = resources.files("yitrt").joinpath("data", DEFAULT_CALIB).read_bytes()
        name, jsonl = f"shipped {DEFAULT_CALIB}", True
    else:
        from yitrt.userfiles import DATA_CAP, read_bytes

        raw = read_bytes(Path(path), "calibration data", DATA_CAP, fix="pass a .jsonl or text file with --calib")
        name, jsonl = str(path), Path(path).suffix.lower() in (".jsonl", ".json")
    from yitrt.userfiles import decode_text

    text = decode_text(raw, Path(name), "calibration data")
    docs = _parse_jsonl(text, name) if jsonl else [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if not docs:
        raise UsageError(f"no calibration documents in {name}", "write one JSON object per line, or paragraphs of text")
    return docs, name, hashlib.sha256(raw).hexdigest()


def _parse_jsonl(text: str, name: str) -> list[dict]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the interpreter's stack
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            if obj["text"].strip():
                docs.append({"text": obj["text"]})
            continue
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            docs.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
            continue
        raise UsageError(
            f"{name}:{n}: not a JSON object with a 'text' string or a 'messages' list of {{role, content}}",
            "fix the line (one JSON object per line)",
        )
    return docs


def document_text(doc: dict, tokenizer) -> str:
    """A document as text: its ``text``, or its ``messages`` rendered with the tokenizer's chat template.

    Raises:
        UsageError: chat messages but the tokenizer has no chat template.
    """
    if "text" in doc:
        return doc["text"]
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the calibration data has chat 'messages' but the tokenizer has no chat template", "pass documents with a 'text' field")
    return tokenizer.apply_chat_template(doc["messages"], tokenize=False)


def load_calibration(path: Path | None, tokenizer, size: int, seq_len: int, seed: int = 0) -> CalibrationSet:
    """Sample and pack calibration sequences.

    Args:
        path: the user's file (None: the shipped bilingual set).
        tokenizer: the model's tokenizer (transformers).
        size: number of sequences wanted.
        seq_len: tokens per sequence.
        seed: order in which documents are drawn.

    Raises:
        UsageError: bad sizes or data, or data that gives not even one full sequence.
    """
    if size < 1 or seq_len < 8:
        raise UsageError("--calib-size must be >= 1 and --calib-seq-len >= 8", "pass larger values")
    docs, source, digest = read_documents(path)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    want = size * seq_len
    stream: list[int] = []
    used = 0
    for index in order:
        if len(stream) >= want:
            break
        ids = tokenizer(document_text(docs[index], tokenizer), add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        stream.append(sep)
        used += 1
    sequences = [stream[i : i + seq_len] for i in range(0, min(len(stream), want), seq_len)]
    sequences = [s for s in sequences if len(s) == seq_len]
    if not sequences:
        raise UsageError(
            f"{source} gives {len(stream)} tokens, fewer than one sequence of {seq_len}",
            "pass more calibration data or a smaller --calib-seq-len",
        )
    return CalibrationSet(sequences, source, len(docs), used, digest)


def batch_size_for(seq_len: int, hidden: int, intermediate: int, free_bytes: int, limit: int = 64) -> int:
    """Sequences per calibration forward pass that fit ``free_bytes``.

    Per sequence and layer the forward pass holds a few hidden-size activations, the MLP's intermediate
    activations and the attention scores; only one layer's worth is live at a time (no gradients). The logits
    are not computed (calibration runs the decoder only). Half the free memory is used, as headroom for the
    allocator and ModelOpt's statistics.
    """
    per_token = 4 * (8 * hidden + 3 * intermediate)  # float32 worst case
    per_sequence = seq_len * per_token + 4 * seq_len * seq_len * 4  # + attention scores of a few heads at once
    return max(1, min(limit, int(free_bytes * 0.5) // max(per_sequence, 1)))
