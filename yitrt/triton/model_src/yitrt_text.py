"""Text handling shared by yitrt's Triton Python models (preprocessing, postprocessing, tensorrt_llm_bls).

`yitrt deploy` copies this file next to each model's ``model.py``. It runs inside Triton's Python backend, so it
needs only the standard library, NumPy and transformers (the TensorRT-LLM containers have both), never yitrt.

What it fixes compared with the stock templates (reference/triton-repository.md §4, §8):
- chat messages are rendered with the tokenizer's own chat template (stock: none);
- BOS is never doubled: a chat template's rendering is tokenized without special tokens, and plain text that
  already starts with the BOS text gets none added (stock: ``add_special_tokens`` always, #2 in §8);
- end id and extra stop ids come from the model's generation_config.json eos list, written into the config by
  deploy (stock: the tokenizer's eos only, so Yi-Chat never stops, #1);
- stop words are tokenized with and without a leading space, since the model emits the word mid-sentence (#11);
  the preprocessing parameter ``yitrt_words_encoding: stock`` encodes each word alone, as the stock model does;
- streamed text is detokenized incrementally, so no space is lost and no UTF-8 character is split (#4).
"""

from __future__ import annotations

import json
import os
import site
import sys
from pathlib import Path

import numpy as np

#: Set by `yitrt serve` for CPU test servers only: site-packages folders appended to the stub's sys.path (the
#: stub embeds a Python with NumPy 1.x but without transformers; NumPy is already imported when this runs).
SITE_DIRS_ENV = "YITRT_STUB_SITE_DIRS"
ROLES = ("system", "user", "assistant")
#: How stop/bad words become token sequences (preprocessing parameter ``yitrt_words_encoding``): ``with_space``
#: (yitrt's default) adds each word's leading-space variant; ``stock`` encodes the word alone, as NVIDIA's does.
WORDS_ENCODINGS = ("with_space", "stock")


def add_site_dirs() -> None:
    """Append the folders named by ``YITRT_STUB_SITE_DIRS`` to sys.path (processing their .pth files)."""
    for folder in os.environ.get(SITE_DIRS_ENV, "").split(os.pathsep):
        if folder and folder not in sys.path:
            site.addsitedir(folder)


class RequestError(ValueError):
    """A bad request: its message goes back to the client as the error text."""


def param(model_config: dict, key: str, default: str | None = None) -> str | None:
    """A ``parameters`` string value of a model config (None/default when missing or an unfilled ``${...}``)."""
    value = (model_config.get("parameters") or {}).get(key, {}).get("string_value")
    if value is None or value == "" or value.startswith("${"):
        return default
    return value


def flag(model_config: dict, key: str, default: bool) -> bool:
    """A boolean parameter (``true``/``false``, any case)."""
    value = param(model_config, key)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def resolve_dir(value: str, model_dir: str) -> str:
    """A folder parameter: absolute as given, relative to the model repository's root otherwise."""
    return value if os.path.isabs(value) else str(Path(model_dir).parent / value)


def load_tokenizer(folder: str):
    """The tokenizer of ``folder`` (never remote code)."""
    add_site_dirs()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, legacy=False, padding_side="left", trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def int_list(text: str | None) -> list[int]:
    """``"7,2"`` → [7, 2]."""
    return [int(part) for part in (text or "").split(",") if part.strip()]


def parse_messages(raw: str) -> list[dict[str, str]]:
    """The ``messages`` input: a JSON list of ``{"role": system|user|assistant, "content": str}``.

    Raises:
        RequestError: anything else, with what is wrong.
    """
    try:
        messages = json.loads(raw)
    except ValueError as exc:
        raise RequestError(f"messages is not valid JSON ({exc}); send a JSON list of {{\"role\", \"content\"}} objects") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty JSON list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, \"content\": string}}, got {json.dumps(m)[:80]}")
    return messages


class Encoder:
    """Request text → token ids, stop/bad word lists, with the deployment's limits and end ids."""

    def __init__(self, tokenizer, end_id: int | None, stop_ids: list[int], max_input_len: int | None,
                 add_special_tokens: bool = True, words_encoding: str = "with_space") -> None:
        if words_encoding not in WORDS_ENCODINGS:
            raise ValueError(f"yitrt_words_encoding must be one of {', '.join(WORDS_ENCODINGS)}, got {words_encoding!r}")
        self.tokenizer = tokenizer
        self.words_encoding = words_encoding
        self.add_special_tokens = add_special_tokens
        self.end_id = end_id if end_id is not None else tokenizer.eos_token_id
        self.stop_ids = [i for i in stop_ids if i != self.end_id]
        self.max_input_len = max_input_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

    def encode(self, text: str, messages: str | None) -> list[int]:
        """Token ids of a request: ``messages`` (JSON) rendered with the chat template, ``text`` appended as a
        user turn when both are given; plain ``text`` otherwise.

        Raises:
            RequestError: no text, malformed messages, no chat template, or a prompt over ``max_input_len``.
        """
        tok = self.tokenizer
        if messages:
            turns = parse_messages(messages)
            if text:
                turns = [*turns, {"role": "user", "content": text}]
            if not tok.chat_template:
                raise RequestError("this model's tokenizer has no chat template; send text_input without messages")
            rendered = tok.apply_chat_template(turns, add_generation_prompt=turns[-1]["role"] != "assistant", tokenize=False)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]  # the template wrote any BOS itself
        elif text:
            bos = tok.bos_token
            add = self.add_special_tokens and not (bos and text.startswith(bos))
            ids = tok(text, add_special_tokens=add)["input_ids"]
        else:
            raise RequestError("no text: send a non-empty text_input (or chat messages)")
        if tok.bos_token_id is not None and ids[:2] == [tok.bos_token_id] * 2:
            ids = ids[1:]
        if not ids:
            raise RequestError("the prompt encodes to no tokens")
        if self.max_input_len and len(ids) > self.max_input_len:
            raise RequestError(f"the prompt is {len(ids)} tokens; this engine takes at most {self.max_input_len} "
                               "(max_input_len): shorten it or rebuild with a larger --max-input-len")
        return ids

    def word_sequences(self, words: list[str]) -> list[list[int]]:
        """Token sequences of stop/bad words: each word alone and, with the ``with_space`` encoding (the default),
        also after a space — how it appears mid-text, where a SentencePiece/BPE tokenizer gives it other ids. The
        stock preprocessing encodes each word alone only (``stock``). Empty words mean none."""
        seqs: list[list[int]] = []
        for word in words:
            if not word:
                continue
            spaced = self.words_encoding == "with_space" and not word[0].isspace()
            for variant in (word, " " + word) if spaced else (word,):
                ids = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def stop_sequences(self, words: list[str], ignore_end: bool = False) -> list[list[int]]:
        """The request's stop words plus each extra stop id of the model (generation_config eos list), which
        ``ignore_end`` leaves out: a request that sends end_id -1 asks to ignore every end token (TensorRT-LLM's
        ignore_eos sends end_id -1 and no stop words, tensorrt_llm/executor/base_worker.py)."""
        seqs = self.word_sequences(words)
        return seqs if ignore_end else seqs + [[i] for i in self.stop_ids if [i] not in seqs]


def to_words_list(seqs: list[list[int]]) -> np.ndarray:
    """TensorRT-LLM's ``[2, N]`` words list: row 0 the concatenated ids, row 1 each word's end offset, padded
    with 0 and -1 (reference §4). No words → shape [2, 0]."""
    flat = [i for s in seqs for i in s]
    offsets = np.cumsum([len(s) for s in seqs]).tolist() if seqs else []
    width = len(flat)
    out = np.zeros((2, width), dtype=np.int32)
    out[0, :width] = flat
    out[1, :] = -1
    out[1, : len(offsets)] = offsets
    return out


def from_words_list(array: np.ndarray, name: str = "words list") -> list[list[int]]:
    """The inverse of ``to_words_list``, for any batch-of-one shape (``[2, N]`` or ``[1, 2, N]``) and any padding.

    Offsets of -1 are unused slots: the stock preprocessing turns ``""`` into ``[[[0], [-1]]]`` (one padded slot,
    no word), so a list whose offsets are all -1 means "no words" (reference §4).

    Raises:
        RequestError: not two rows, or offsets that are not increasing end positions inside the ids row.
    """
    array = np.asarray(array)
    if array.size == 0:
        return []
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[0] != 2:
        raise RequestError(f"{name} must be [2, N] (ids; end offsets padded with -1), got shape {list(array.shape)}")
    ids, offsets = array[0].tolist(), [int(o) for o in array[1].tolist() if o != -1]
    if any(not 0 < b <= len(ids) for b in offsets) or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise RequestError(f"{name}: end offsets {offsets} must be increasing positions in 1..{len(ids)} (pad with -1)")
    starts = [0, *offsets][: len(offsets)]
    return [ids[a:b] for a, b in zip(starts, offsets, strict=True)]


def array(request, name: str):
    """A request's input as a NumPy array, or None when the request does not carry it (Python backend only)."""
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def scalar(request, name: str, kind=int):
    """The first value of a request's input as ``kind``, or None when absent or empty."""
    value = array(request, name)
    return None if value is None or value.size == 0 else kind(np.asarray(value).reshape(-1)[0])


def first_string(request, name: str) -> str | None:
    """The first string of a request's STRING input, or None."""
    value = array(request, name)
    values = [] if value is None else strings(value)
    return values[0] if values else None


def strings(tensor_value) -> list[str]:
    """A STRING tensor's values as Python strings (bytes decoded as UTF-8)."""
    out = []
    for v in np.asarray(tensor_value).reshape(-1):
        out.append(v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v))
    return out


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted as deltas that concatenate to ``decode(all tokens)``.

    Each call decodes a window that starts a few tokens back (so a word's leading space, which SentencePiece keeps
    on the token, is seen in context), and holds text back while it ends in an incomplete UTF-8 character (the
    replacement character U+FFFD) — the usual prefix/read-offset method of streaming detokenizers.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text they complete (possibly empty)."""
        self.ids.extend(tokens)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end comes out as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if text.startswith(prefix) else text


class TextStream:
    """Detokenized output of one request with stop strings applied: deltas to send, the same for streamed and
    non-streamed answers (a non-streamed answer is the join of the deltas of all its tokens).

    Text that could be the start of a stop word is held back until it is known not to be one; a stop word found
    in the text ends the answer there (the engine also stops on its token ids, but a word can tokenize
    differently in context than alone).
    """

    def __init__(self, tokenizer, stop_words: list[str], skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop_words = [w for w in stop_words if w]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _hold(self) -> int:
        """How many trailing characters might begin a stop word."""
        hold = 0
        for word in self.stop_words:
            for n in range(min(len(word) - 1, len(self.text)), 0, -1):
                if self.text.endswith(word[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def _emit(self, final: bool) -> str:
        for word in self.stop_words:
            at = self.text.find(word, max(0, self.sent - len(word)))
            if at >= 0:
                self.text, self.stopped, final = self.text[:at], True, True
        end = len(self.text) if final else len(self.text) - self._hold()
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    def add(self, tokens: list[int]) -> str:
        """New tokens → the text that can be sent now ("" after a stop word)."""
        if self.stopped:
            return ""
        self.text += self.detok.add(tokens)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the answer."""
        if self.stopped:
            return ""
        self.text += self.detok.flush()
        return self._emit(final=True)
