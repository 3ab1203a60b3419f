"""What `yitrt bench` sends: prompts of controlled token lengths (synthetic) or a JSONL dataset, each with the
number of tokens to generate.

Synthetic prompts are built from the model's own tokenizer: whole-word vocabulary entries (those that decode to a
space and letters) drawn with a seeded generator, then cut and checked so that the prompt encodes to exactly the
drawn number of tokens as the deployment's preprocessing counts them (its special tokens included). Every prompt is
different, so a deployment with KV-cache reuse gets no unearned prefix hits.

Two workloads exercise KV-cache reuse on purpose:
- prefix prompts (``--prefix-tokens N --num-prefixes K``, like genai-perf's ``--prefix-prompt-length`` and
  ``--num-prefix-prompts``): K shared prefixes of exactly N tokens (special tokens included, so the first N tokens
  of every prompt of a group are identical as the deployment tokenizes it), each prompt i using prefix i mod K, then
  its own suffix of exactly the ``--isl`` draw; the groups differ from their first word on.
- multi-turn sessions (``--dataset multiturn:FILE|multiturn:synthetic``): each turn resends the conversation so far
  (see :func:`render_turn`), so every turn after the first starts with the previous turn's prompt and answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yitrt.errors import UsageError

#: JSONL keys that hold a plain prompt (the first one present is used).
TEXT_KEYS = ("text", "prompt", "text_input")
#: JSONL keys that hold the number of tokens to generate for that line.
OUTPUT_KEYS = ("max_tokens", "output_tokens")
#: ``--dataset`` prefix of multi-turn sessions (``multiturn:FILE`` or ``multiturn:synthetic``).
MULTITURN = "multiturn:"
#: What ends every user turn and every answer in a rendered conversation (see render_turn).
TURN_SEPARATOR = "\n"
#: Attempts at drawing a suffix that keeps the prefix's tokens and the exact total length.
SUFFIX_ATTEMPTS = 32
#: Where a yitrt repository keeps its tokenizer (yitrt deploy).
REPOSITORY_TOKENIZER = Path("preprocessing") / "tokenizer"


@dataclass(frozen=True)
class LengthSpec:
    """A token-length distribution: normal with ``mean`` and ``std`` (0: every draw is ``mean``), at least 1."""

    mean: int
    std: float = 0.0

    @classmethod
    def parse(cls, text: str, option: str) -> LengthSpec:
        """``MEAN`` or ``MEAN,STD``.

        Raises:
            UsageError: not two numbers, a mean below 1 or a negative deviation.
        """
        parts = [p.strip() for p in str(text).split(",")]
        try:
            if len(parts) > 2:
                raise ValueError
            mean = int(parts[0])
            std = float(parts[1]) if len(parts) == 2 else 0.0
        except ValueError:
            raise UsageError(f"{option} takes MEAN or MEAN,STD (token counts), got {text!r}", f"e.g. {option} 128,16") from None
        if mean < 1 or std < 0:
            raise UsageError(f"{option}: the mean must be >= 1 and the deviation >= 0, got {text!r}", f"e.g. {option} 128,16")
        return cls(mean, std)

    def draw(self, rng: random.Random, cap: int | None = None) -> int:
        """One length: rounded, at least 1, at most ``cap``."""
        value = self.mean if not self.std else max(1, round(rng.gauss(self.mean, self.std)))
        return min(value, cap) if cap else value

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Prompt:
    """One request's content.

    Attributes:
        text: the plain prompt (sent as ``text_input``); "" when ``messages`` carries the turns.
        messages: chat turns (JSON list of {role, content}), rendered by the deployment's chat template.
        max_tokens: tokens to generate.
        input_tokens: the prompt's token count as the deployment will count it, where known here.
    """

    text: str
    max_tokens: int
    messages: tuple[dict[str, str], ...] = ()
    input_tokens: int | None = None


def resolve_tokenizer_dir(path: Path) -> Path:
    """A tokenizer folder from ``--tokenizer``: a yitrt repository (its ``preprocessing/tokenizer``) or an HF folder.

    Raises:
        UsageError: no such folder, or no tokenizer files in it.
    """
    path = Path(path)
    if (path / REPOSITORY_TOKENIZER).is_dir():
        return path / REPOSITORY_TOKENIZER
    if path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return path
    raise UsageError(f"{path} is neither a yitrt repository nor a folder with tokenizer files",
                     "pass --tokenizer REPO (the folder yitrt deploy wrote) or the HF model folder")


class PromptFactory:
    """Prompts of exact token lengths from a tokenizer's whole-word vocabulary.

    Args:
        tokenizer: the model's transformers tokenizer.
        add_special_tokens: whether the deployment's preprocessing adds special tokens (BOS) to ``text_input``.
        seed: seed of the word draws (the same seed gives the same prompts).
    """

    def __init__(self, tokenizer, add_special_tokens: bool = True, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.rng = random.Random(seed)
        self._words = _word_tokens(tokenizer)
        probe = "hello world"
        self.special = self.count(probe) - len(tokenizer(probe, add_special_tokens=False)["input_ids"])

    @property
    def words(self) -> list[int]:
        """The whole-word token ids synthetic prompts are drawn from.

        Raises:
            UsageError: too few of them. Checked when a synthetic prompt is drawn, not before: a bench over a
                ``--dataset`` only counts and encodes with the tokenizer, whatever its vocabulary.
        """
        if len(self._words) < 100:
            raise UsageError("the tokenizer has too few whole-word tokens to build synthetic prompts",
                             "use --dataset FILE (a JSONL of prompts) instead")
        return self._words

    def count(self, text: str) -> int:
        """Tokens of ``text`` as the deployment's preprocessing counts them (special tokens included)."""
        return len(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def make(self, length: int) -> tuple[str, int]:
        """(text, its token count) with the count equal to ``length`` whenever the tokenizer allows it (a prompt is
        never shorter than the special tokens plus one word)."""
        body = max(1, length - self.special)
        ids: list[int] = []
        text, got = "", 0
        # decode → encode is not always the identity: adjust the number of words until the count matches
        for _ in range(16):
            ids.extend(self.rng.choice(self.words) for _ in range(body - len(ids)))
            text = self.tokenizer.decode(ids[:body])
            got = self.count(text)
            if got == length or (got > length and body == 1):
                break
            body = max(1, body + length - got)
        return text, got

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the deployment's preprocessing produces them."""
        return list(self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"])

    def make_prefix(self, length: int, avoid: set[int]) -> tuple[str, list[int]]:
        """A shared prefix: (text, its ids) of exactly ``length`` tokens (special tokens included) whose first word
        token is not in ``avoid`` (so that two groups share no KV block beyond the special tokens).

        Raises:
            UsageError: ``length`` leaves no room for a word, or the tokenizer cannot give that exact length.
        """
        if length <= self.special:
            raise UsageError(f"--prefix-tokens {length} leaves no room for words after the tokenizer's {self.special} "
                             "special tokens", f"pass --prefix-tokens {self.special + 1} or more")
        for _ in range(SUFFIX_ATTEMPTS):
            text, got = self.make(length)
            ids = self.encode(text)
            if got == length and ids[self.special] not in avoid:
                return text, ids
        raise UsageError(f"cannot draw a prefix of exactly {length} tokens distinct from the others with this tokenizer",
                         "pass another --prefix-tokens, fewer --num-prefixes, or another --seed")

    def extend(self, prefix: str, prefix_ids: list[int], length: int) -> str:
        """``prefix`` + a fresh suffix such that the whole encodes to ``prefix_ids`` followed by exactly ``length``
        more tokens (re-drawn when the tokenizer merges across the boundary or decode → encode changes the count).

        Raises:
            UsageError: no such suffix within SUFFIX_ATTEMPTS draws.
        """
        body = length
        for _ in range(SUFFIX_ATTEMPTS):
            suffix = self.tokenizer.decode([self.rng.choice(self.words) for _ in range(max(1, body))])
            # whole words decode with their leading space, except where a tokenizer strips it (SentencePiece)
            text = prefix + (suffix if suffix[:1].isspace() else " " + suffix)
            ids = self.encode(text)
            if ids[:len(prefix_ids)] == prefix_ids:
                got = len(ids) - len(prefix_ids)
                if got == length:
                    return text
                body = max(1, body + length - got)
        raise UsageError(f"cannot build a {length}-token suffix that keeps the prefix's tokens with this tokenizer",
                         "pass another --isl or --seed")


def _word_tokens(tokenizer) -> list[int]:
    """Ids of vocabulary entries that decode to a space and 3+ ASCII letters (whole words in any BPE/SentencePiece)."""
    special = set(tokenizer.all_special_ids)
    words = []
    for token, index in tokenizer.get_vocab().items():
        if index in special or not token or token[0] not in "Ġ▁":
            continue
        piece = token[1:]
        if len(piece) >= 3 and piece.isascii() and piece.isalpha():
            words.append(index)
    return sorted(words)


def synthetic_prompts(factory: PromptFactory, count: int, isl: LengthSpec, osl: LengthSpec,
                      max_input: int | None = None) -> list[Prompt]:
    """``count`` prompts with input lengths drawn from ``isl`` (capped at ``max_input``) and outputs from ``osl``."""
    prompts = []
    for _ in range(count):
        text, tokens = factory.make(isl.draw(factory.rng, max_input))
        prompts.append(Prompt(text, osl.draw(factory.rng), input_tokens=tokens))
    return prompts


def prefix_prompts(factory: PromptFactory, count: int, prefix_tokens: int, num_prefixes: int, isl: LengthSpec,
                   osl: LengthSpec) -> list[Prompt]:
    """``count`` prompts, prompt i starting with shared prefix i mod ``num_prefixes`` of exactly ``prefix_tokens``
    tokens, then a suffix of exactly an ``isl`` draw of tokens (each prompt has ``prefix_tokens`` + that many).

    Raises:
        UsageError: the tokenizer cannot give such exact prefixes or suffixes (see PromptFactory).
    """
    prefixes: list[tuple[str, list[int]]] = []
    for _ in range(num_prefixes):
        prefixes.append(factory.make_prefix(prefix_tokens, {ids[factory.special] for _, ids in prefixes}))
    prompts = []
    for i in range(count):
        text, ids = prefixes[i % num_prefixes]
        suffix = isl.draw(factory.rng)
        prompts.append(Prompt(factory.extend(text, ids, suffix), osl.draw(factory.rng), input_tokens=prefix_tokens + suffix))
    return prompts


@dataclass(frozen=True)
class Session:
    """A multi-turn conversation: its user turns and the tokens to generate for each answer."""

    turns: tuple[str, ...]
    max_tokens: tuple[int, ...]


def render_turn(history: str, user: str) -> str:
    """A turn's ``text_input``: the conversation so far (``history``: the previous turn's text_input, its answer as
    received and a separator; "" on the first turn), then the new user turn and a separator.

    Plain text, not a chat template, on purpose: every entry model takes it (the ensemble too), the client can count
    its tokens, and turn k+1's prompt is turn k's prompt plus its answer verbatim, so a deployment with KV-cache
    reuse can match everything computed before (a chat template would close each answer with its own markers).
    """
    return history + user + TURN_SEPARATOR


def continue_history(text_input: str, answer: str) -> str:
    """The history the next turn starts with: this turn's prompt, its answer and a separator."""
    return text_input + answer + TURN_SEPARATOR


def synthetic_sessions(factory: PromptFactory, count: int, turns: int, isl: LengthSpec, osl: LengthSpec) -> list[Session]:
    """``count`` sessions of ``turns`` user turns, each of an ``isl`` draw of tokens (counted alone, without
    special tokens), answers of ``osl`` draws."""
    sessions = []
    for _ in range(count):
        texts = []
        for _ in range(turns):
            length = isl.draw(factory.rng)
            texts.append(factory.tokenizer.decode([factory.rng.choice(factory.words) for _ in range(length)]).strip())
        sessions.append(Session(tuple(texts), tuple(osl.draw(factory.rng) for _ in range(turns))))
    return sessions


def load_sessions(path: Path, osl: LengthSpec, seed: int = 0) -> list[Session]:
    """Sessions from a JSONL file: one per line, ``{"turns": ["first user turn", "second", ...]}`` with optionally
    ``"max_tokens"``: one positive integer for every answer or a list with one per turn (else drawn from ``osl``).
    Every line is checked before any request is sent.

    Raises:
        UsageError: the file is missing or empty, or has lines that are not such objects (each one named).
    """
    from yitrt.userfiles import DATA_CAP, read_text

    path = Path(path)
    text = read_text(path, "dataset", DATA_CAP, fix="pass --dataset multiturn:synthetic or a UTF-8 JSONL file")
    rng = random.Random(seed)
    sessions, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            sessions.append(_parse_session(json.loads(line), osl, rng))
        except (ValueError, TypeError, RecursionError) as exc:
            problems.append(f"line {number}: {' '.join(str(exc).split())[:120]}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"dataset {path}: {'; '.join(problems[:3])}{more}",
                         'each line must be {"turns": ["...", "..."]}, optionally with "max_tokens" (a number or one per turn)')
    if not sessions:
        raise UsageError(f"dataset {path} holds no sessions", 'add one {"turns": [...]} object per line')
    return sessions


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _parse_session(item: Any, osl: LengthSpec, rng: random.Random) -> Session:
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    turns = item.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise ValueError('"turns" must be a non-empty list of non-empty strings')
    limit = item.get("max_tokens")
    if limit is None:
        limits = tuple(osl.draw(rng) for _ in turns)
    elif _positive_int(limit):
        limits = (limit,) * len(turns)
    elif isinstance(limit, list) and len(limit) == len(turns) and all(_positive_int(v) for v in limit):
        limits = tuple(limit)
    else:
        raise ValueError(f"max_tokens must be a positive integer or a list of {len(turns)} of them, got {limit!r}")
    return Session(tuple(turns), limits)


def load_dataset(path: Path, osl: LengthSpec, seed: int = 0, counter: PromptFactory | None = None) -> list[Prompt]:
    """Prompts from a JSONL file: one object per line with a prompt (``text``, ``prompt`` or ``text_input``) or chat
    ``messages`` (a list of {role, content}), and optionally ``max_tokens``/``output_tokens`` (else drawn from
    ``osl``). Every line is checked before any request is sent.

    Raises:
        UsageError: the file is missing, empty, or has lines that are not such objects (each one named).
    """
    from yitrt.userfiles import DATA_CAP, read_text

    path = Path(path)
    text = read_text(path, "dataset", DATA_CAP, fix="pass --dataset synthetic or a UTF-8 JSONL file")
    rng = random.Random(seed)
    prompts, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(_parse_line(json.loads(line), osl, rng, counter))
        except (ValueError, TypeError, RecursionError) as exc:
            problems.append(f"line {number}: {' '.join(str(exc).split())[:120]}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"dataset {path}: {'; '.join(problems[:3])}{more}",
                         'each line must be {"text": "..."} or {"messages": [{"role": "user", "content": "..."}]}, '
                         'optionally with "max_tokens"')
    if not prompts:
        raise UsageError(f"dataset {path} holds no prompts", "add one JSON object per line")
    return prompts


def _parse_line(item: Any, osl: LengthSpec, rng: random.Random, counter: PromptFactory | None) -> Prompt:
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    max_tokens = next((item[k] for k in OUTPUT_KEYS if k in item), None)
    if max_tokens is None:
        max_tokens = osl.draw(rng)
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if "messages" in item:
        turns = item["messages"]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns):
            raise ValueError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
        return Prompt("", max_tokens, tuple({"role": t["role"], "content": t["content"]} for t in turns))
    text = next((item[k] for k in TEXT_KEYS if k in item), None)
    if not isinstance(text, str) or not text:
        raise ValueError(f"no prompt: expected a non-empty string under one of {', '.join(TEXT_KEYS)}, or messages")
    return Prompt(text, max_tokens, input_tokens=counter.count(text) if counter else None)
