"""Which models can draft for which (draft-target speculative decoding): the draft's token ids must mean the target's.

The BLS hands the target's token ids to the draft and the draft's proposals back to the target, so the two models
must share one tokenizer: the same vocabulary size in config.json (the draft's logits and ids index the target's
vocabulary), the same pieces and merges (``tokenizer.json``, ``vocab.json``/``merges.txt``) or SentencePiece model
(``tokenizer.model``), the same special tokens and ids, and the same id that ends a chat turn (reference
trtllm-serving-features.md §1.1: "same tokenizer/vocab as target"). :func:`check_draft_pair` compares the files of
two model folders and names every difference; :func:`registry_pair_problems` answers for two known Yi repos without
any file (the registry's tokenizer groups, ``yi_checkpoints.yaml``). The files are the proof; the registry is what
is known before they are fetched.

EAGLE, Medusa and ReDrafter are not draft models: they need trained heads that do not exist for Yi
(:data:`yitrt.speculation.UNSUPPORTED_MODES` says why).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yitrt.errors import CheckpointError, UsageError
from yitrt.models.config import load_config
from yitrt.models.registry import load_registry
from yitrt.models.summary import find_chat_end_id
from yitrt.userfiles import read_bytes, read_json_if_present, read_text

#: Special tokens compared by role (their text and id).
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")
#: Tokenizer files that define the ids, by how they are compared.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
#: At most this many differing entries are quoted in one problem.
_SHOWN = 3
#: The hint of a refused pair.
PAIR_FIX = "pick a draft with the target's tokenizer: a smaller checkpoint of the same family (Yi 1.0, Yi-1.5, Yi-Coder), chat for chat"


@dataclass
class PairReport:
    """The comparison of a target's and a draft's tokenizers.

    Attributes:
        target: the target folder (or repo id).
        draft: the draft folder (or repo id).
        problems: every difference, named (empty: the draft can draft for the target).
        checked: what was compared and found identical.
        notes: facts that do not stop the pair (e.g. a file only one side has).
        sizes: parameters and decoder layers of each side (``{"target": {...}, "draft": {...}}``).
    """

    target: str
    draft: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing differs."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The ``draft_pair`` object of ``yitrt inspect --draft --json``."""
        return {"target": self.target, "draft": self.draft, "ok": self.ok, "problems": self.problems,
                "checked": self.checked, "notes": self.notes, "sizes": self.sizes}


def check_draft_pair(target_dir: Path, draft_dir: Path, *, target_repo: str | None = None, draft_repo: str | None = None) -> list[str]:
    """Every reason the model in ``draft_dir`` cannot draft for the one in ``target_dir`` (empty: it can).

    Args:
        target_dir: the target's model folder (config.json and tokenizer files).
        draft_dir: the draft's model folder.
        target_repo: the target's HF repo id when known (the registry then answers for its chat end id).
        draft_repo: the draft's HF repo id when known.

    Raises:
        CheckpointError: a folder without config.json, or a tokenizer file that is there but broken.
    """
    return compare_tokenizers(target_dir, draft_dir, target_repo=target_repo, draft_repo=draft_repo).problems


def require_draft_pair(target_dir: Path, draft_dir: Path, *, target_repo: str | None = None, draft_repo: str | None = None,
                       what: str = "draft") -> PairReport:
    """:func:`compare_tokenizers`, raising when the pair does not match (for stages that fetched both models).

    Raises:
        UsageError: the first difference (and how many more), with the fix.
        CheckpointError: see :func:`check_draft_pair`.
    """
    report = compare_tokenizers(target_dir, draft_dir, target_repo=target_repo, draft_repo=draft_repo)
    if not report.ok:
        raise UsageError(pair_error_message(report, what), PAIR_FIX)
    return report


def pair_error_message(report: PairReport, what: str = "draft") -> str:
    """One line for a refused pair: the first difference and how many more."""
    more = f" (and {len(report.problems) - 1} more: `yitrt inspect {report.target} --draft {report.draft}` lists them)" \
        if len(report.problems) > 1 else ""
    return f"{what} {report.draft} cannot draft for {report.target}: {report.problems[0]}{more}"


def compare_tokenizers(target_dir: Path, draft_dir: Path, *, target_repo: str | None = None,
                       draft_repo: str | None = None) -> PairReport:
    """Compare two model folders' vocabulary size, tokenizer files, special tokens and chat end id.

    Args and Raises: see :func:`check_draft_pair`.

    Returns:
        A PairReport naming every difference, what was found identical, and notes.
    """
    target, draft = _Side.read(Path(target_dir), target_repo), _Side.read(Path(draft_dir), draft_repo)
    report = PairReport(str(target_repo or target_dir), str(draft_repo or draft_dir))
    report.sizes = {name: {"params": side.cfg.param_count(), "num_layers": side.cfg.num_layers} for name, side in (("target", target), ("draft", draft))}
    if report.sizes["draft"]["params"] >= report.sizes["target"]["params"]:
        report.notes.append(f"the draft ({report.sizes['draft']['params']:,} parameters) is not smaller than the target "
                            f"({report.sizes['target']['params']:,}): drafting saves nothing unless it runs only some of its layers")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        report.problems.append(f"vocab_size differs: {target.cfg.vocab_size} in the target's config.json, {draft.cfg.vocab_size} in the draft's")
    else:
        report.checked.append(f"config.json vocab_size {target.cfg.vocab_size}")
    _compare_files(target, draft, report)
    _compare_specials(target, draft, report)
    if target.chat_end[0] != draft.chat_end[0]:
        report.problems.append(f"chat end id differs: the target ends a turn with {_id_text(target, target.chat_end[0])} "
                               f"(from {target.chat_end[1]}), the draft with {_id_text(draft, draft.chat_end[0])} (from {draft.chat_end[1]})")
    else:
        report.checked.append(f"chat end {_id_text(target, target.chat_end[0])}")
    if target_repo and draft_repo and not report.problems and (known := registry_pair_problems(target_repo, draft_repo)):
        report.notes.append(f"the files are identical, so the pair is fine; the registry alone would refuse it: {known[0]}")
    return report


def registry_pair_problems(target_repo: str, draft_repo: str) -> list[str]:
    """What the registry knows against ``draft_repo`` drafting for ``target_repo`` without reading any file: a
    different tokenizer group (identity across Yi 1.0, Yi-1.5 and Yi-Coder is unconfirmed) or a different turn end
    id (a base draft for a chat target). Empty when both agree, or when either repo is unknown to the registry
    (then only their files can tell: :func:`check_draft_pair`)."""
    registry = load_registry()
    target, draft = registry.by_repo_id(target_repo), registry.by_repo_id(draft_repo)
    if target is None or draft is None:
        return []
    candidates = [c.repo_id for c in registry.draft_candidates(target.repo_id)]
    use = f"; known drafts for {target.repo_id}: {', '.join(candidates)}" if candidates else f"; no known Yi checkpoint drafts for {target.repo_id}"
    problems = []
    if target.tokenizer != draft.tokenizer:
        problems.append(f"{draft.repo_id} ({draft.series}) and {target.repo_id} ({target.series}) are of different tokenizer families, "
                        f"whose identity is unconfirmed (yitrt pairs within one family){use}")
    if target.end_id != draft.end_id:
        kind = {True: "chat", False: "base"}
        problems.append(f"{draft.repo_id} ({kind[draft.chat]}) ends a turn with id {draft.end_id}, {target.repo_id} "
                        f"({kind[target.chat]}) with {target.end_id}{use}")
    return problems


# -- one side's facts ------------------------------------------------------------------------------------------------


@dataclass
class _Side:
    folder: Path
    cfg: Any
    files: dict[str, Path]
    tokenizer_json: dict[str, Any] | None
    config: dict[str, Any]  # tokenizer_config.json merged over special_tokens_map.json
    raw_config: dict[str, Any]  # config.json
    chat_end: tuple[int | None, str]
    table: dict[str, int] = field(default_factory=dict)  # token text → id, from every file that names ids

    @classmethod
    def read(cls, folder: Path, repo_id: str | None) -> _Side:
        cfg = load_config(folder)
        files = {name: folder / name for name in (*_VOCAB_FILES, "merges.txt") if (folder / name).is_file()}
        tok = _json(folder / "tokenizer.json") if "tokenizer.json" in files else None
        config = {**(_json(folder / "special_tokens_map.json") or {}), **(_json(folder / "tokenizer_config.json") or {})}
        match = load_registry().match(cfg, repo_id)
        side = cls(folder, cfg, files, tok, config, _json(folder / "config.json") or {}, find_chat_end_id(folder, cfg, match))
        side.table = side._token_table()
        return side

    def _token_table(self) -> dict[str, int]:
        table: dict[str, int] = {}
        if self.tokenizer_json is not None:
            table.update(_vocab_of(self.tokenizer_json))
            table.update({t: i for i, t in _added_of(self.tokenizer_json).items()})
        if "vocab.json" in self.files and not table:
            table.update(_plain_vocab(_json(self.files["vocab.json"]) or {}))
        table.update({text: i for i, text in self.added_decoder().items()})
        return table

    def added_decoder(self) -> dict[int, str]:
        """id → text of tokenizer_config.json's ``added_tokens_decoder`` (and the older ``added_tokens.json``)."""
        decoder = self.config.get("added_tokens_decoder")
        table = {int(k): v["content"] for k, v in (decoder.items() if isinstance(decoder, dict) else ())
                 if isinstance(k, str) and k.isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str)}
        legacy = _json(self.folder / "added_tokens.json") or {}
        table.update({v: k for k, v in legacy.items() if isinstance(k, str) and type(v) is int})
        return table

    def extra_specials(self) -> list[tuple[str, int | None]]:
        """The additional special tokens (transformers 4: ``additional_special_tokens``, 5: ``extra_special_tokens``)
        with their ids, sorted."""
        found: set[tuple[str, int | None]] = set()
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = self.config.get(key)
            items = value.values() if isinstance(value, dict) else (value if isinstance(value, list) else ())
            for item in items:
                text = item.get("content") if isinstance(item, dict) else item
                if isinstance(text, str):
                    found.add((text, self.table.get(text)))
        return sorted(found, key=lambda x: (x[1] is None, x[1] or 0, x[0]))

    def special(self, role: str) -> tuple[str | None, int | None]:
        """(text, id) of a special token role: the tokenizer's token, its id in the vocabulary; config.json's
        ``<role>_token_id`` when the tokenizer names none."""
        value = self.config.get(f"{role}_token")
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str):
            return text, self.table.get(text)
        raw = self.raw_config.get(f"{role}_token_id")
        return None, raw if type(raw) is int else None


def _json(path: Path) -> dict[str, Any] | None:
    return read_json_if_present(path, path.name, error=CheckpointError, fix="re-download the model")


def _vocab_of(tok: dict[str, Any]) -> dict[str, int]:
    vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok.get("model"), dict) else None
    if isinstance(vocab, dict):
        return _plain_vocab(vocab)
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the index is the id
        return {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry and isinstance(entry[0], str)}
    return {}


def _plain_vocab(vocab: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in vocab.items() if isinstance(k, str) and type(v) is int}


def _added_of(tok: dict[str, Any]) -> dict[int, str]:
    added = tok.get("added_tokens")
    return {t["id"]: t["content"] for t in (added if isinstance(added, list) else ())
            if isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("content"), str)}


def _merges_of(tok: dict[str, Any]) -> list[str] | None:
    merges = (tok.get("model") or {}).get("merges") if isinstance(tok.get("model"), dict) else None
    if not isinstance(merges, list):
        return None
    # tokenizers writes a merge as "a b" (older files) or ["a", "b"] (0.20+): one form for comparing
    return [m if isinstance(m, str) else " ".join(map(str, m)) for m in merges]


def _id_text(side: _Side, token_id: int | None) -> str:
    if token_id is None:
        return "no id"
    names = [t for t, i in side.table.items() if i == token_id]
    return f"id {token_id} ({_shown(names[0])})" if names else f"id {token_id}"


# -- comparisons -----------------------------------------------------------------------------------------------------


def _compare_files(target: _Side, draft: _Side, report: PairReport) -> None:
    common = [n for n in _VOCAB_FILES if n in target.files and n in draft.files]
    if not common:
        report.problems.append(f"no tokenizer file to compare: the target has {', '.join(n for n in _VOCAB_FILES if n in target.files) or 'none'}, "
                               f"the draft {', '.join(n for n in _VOCAB_FILES if n in draft.files) or 'none'}")
        return
    for name in _VOCAB_FILES:
        if (name in target.files) != (name in draft.files):
            report.notes.append(f"{name} only in the {'target' if name in target.files else 'draft'}: not compared")
    if "tokenizer.json" in common:
        _compare_tokenizer_json(target.tokenizer_json or {}, draft.tokenizer_json or {}, report)
    if "tokenizer.model" in common:
        _compare_sentencepiece(target.files["tokenizer.model"], draft.files["tokenizer.model"], report)
    if "vocab.json" in common:
        _compare_ids("vocab.json vocab", _plain_vocab(_json(target.files["vocab.json"]) or {}),
                     _plain_vocab(_json(draft.files["vocab.json"]) or {}), report)
        if "merges.txt" in target.files and "merges.txt" in draft.files:
            _compare_merges("merges.txt", _merges_txt(target.files["merges.txt"]), _merges_txt(draft.files["merges.txt"]), report)


def _compare_tokenizer_json(t: dict[str, Any], d: dict[str, Any], report: PairReport) -> None:
    t_type, d_type = (x.get("model", {}).get("type") if isinstance(x.get("model"), dict) else None for x in (t, d))
    if t_type != d_type:
        report.problems.append(f"tokenizer.json model type differs: {t_type} in the target, {d_type} in the draft")
        return
    _compare_ids("tokenizer.json vocab", _vocab_of(t), _vocab_of(d), report)
    t_merges, d_merges = _merges_of(t), _merges_of(d)
    if t_merges is not None or d_merges is not None:
        _compare_merges("tokenizer.json merges", t_merges or [], d_merges or [], report)
    _compare_ids("tokenizer.json added tokens", {v: k for k, v in _added_of(t).items()}, {v: k for k, v in _added_of(d).items()}, report)


def _compare_ids(what: str, t: dict[str, int], d: dict[str, int], report: PairReport) -> None:
    """Compare two token → id tables by id (what a draft's id means to the target)."""
    t_by_id, d_by_id = {i: tok for tok, i in t.items()}, {i: tok for tok, i in d.items()}
    differ = sorted(i for i in t_by_id.keys() | d_by_id.keys() if t_by_id.get(i) != d_by_id.get(i))
    if not differ:
        report.checked.append(f"{what} ({len(t)} entries)")
        return
    shown = "; ".join(f"id {i}: {_shown(t_by_id.get(i))} in the target, {_shown(d_by_id.get(i))} in the draft" for i in differ[:_SHOWN])
    sizes = f", {len(t)} entries in the target and {len(d)} in the draft" if len(t) != len(d) else ""
    report.problems.append(f"{what} differs at {len(differ)} id(s){sizes} ({shown}{'; …' if len(differ) > _SHOWN else ''})")


def _compare_merges(what: str, t: list[str], d: list[str], report: PairReport) -> None:
    if t == d:
        report.checked.append(f"{what} ({len(t)})")
        return
    differ = [k for k in range(max(len(t), len(d))) if (t[k] if k < len(t) else None) != (d[k] if k < len(d) else None)]
    first = differ[0]
    sizes = f", {len(t)} in the target and {len(d)} in the draft" if len(t) != len(d) else ""
    report.problems.append(f"{what} differ at {len(differ)} position(s){sizes} (first #{first}: "
                           f"{_shown(t[first] if first < len(t) else None)} in the target, {_shown(d[first] if first < len(d) else None)} in the draft)")


def _merges_txt(path: Path) -> list[str]:
    lines = read_text(path, "merges.txt", error=CheckpointError, fix="re-download the model").splitlines()
    return [line for line in lines if line and not line.startswith("#version")]


def _shown(token: str | None) -> str:
    """A token as one line can quote it: repr (control characters escaped, printable text as it is), cut short."""
    if token is None:
        return "nothing"
    text = repr(token)
    return text if len(text) <= 42 else text[:40] + "…" + text[0]


def _compare_sentencepiece(t_path: Path, d_path: Path, report: PairReport) -> None:
    t_bytes, d_bytes = (read_bytes(p, "tokenizer.model", cap=64 << 20, error=CheckpointError, fix="re-download the model") for p in (t_path, d_path))
    t_sha, d_sha = hashlib.sha256(t_bytes).hexdigest(), hashlib.sha256(d_bytes).hexdigest()
    if t_sha == d_sha:
        report.checked.append(f"tokenizer.model (sha256 {t_sha[:12]}, byte-identical)")
        return
    try:
        import sentencepiece
    except ImportError:
        report.problems.append(f"tokenizer.model differs (sha256 {t_sha[:12]} in the target, {d_sha[:12]} in the draft) and "
                               "sentencepiece is not installed to compare its pieces (pip install sentencepiece)")
        return
    pieces = []
    for raw, side in ((t_bytes, "target"), (d_bytes, "draft")):
        try:
            sp = sentencepiece.SentencePieceProcessor(model_proto=raw)
        except (RuntimeError, OSError, TypeError) as exc:
            raise CheckpointError(f"the {side}'s tokenizer.model is not a SentencePiece model ({str(exc).strip()[:80]})", "re-download the model") from None
        pieces.append([(sp.id_to_piece(i), sp.get_score(i), _piece_kind(sp, i)) for i in range(sp.get_piece_size())])
    t_pieces, d_pieces = pieces
    differ = [i for i in range(max(len(t_pieces), len(d_pieces)))
              if (t_pieces[i] if i < len(t_pieces) else None) != (d_pieces[i] if i < len(d_pieces) else None)]
    if not differ:
        report.checked.append(f"tokenizer.model pieces ({len(t_pieces)}; the files differ in bytes, sha256 {t_sha[:12]} / {d_sha[:12]})")
        report.notes.append("tokenizer.model files differ in bytes but not in pieces, scores or types (trainer or normaliser settings)")
        return

    def piece(p: list, i: int) -> str:
        return f"{_shown(p[i][0])} (score {p[i][1]:g}, {p[i][2]})" if i < len(p) else "nothing"

    sizes = f", {len(t_pieces)} pieces in the target and {len(d_pieces)} in the draft" if len(t_pieces) != len(d_pieces) else ""
    first = differ[0]
    report.problems.append(f"tokenizer.model pieces differ at {len(differ)} id(s){sizes} (first id {first}: {piece(t_pieces, first)} "
                           f"in the target, {piece(d_pieces, first)} in the draft)")


def _piece_kind(sp: Any, i: int) -> str:
    for kind in ("control", "unknown", "byte", "unused"):
        if getattr(sp, f"is_{kind}")(i):
            return kind
    return "normal"


def _compare_specials(target: _Side, draft: _Side, report: PairReport) -> None:
    t_added, d_added = target.added_decoder(), draft.added_decoder()
    if t_added or d_added:
        _compare_ids("tokenizer_config.json added tokens", {v: k for k, v in t_added.items()}, {v: k for k, v in d_added.items()}, report)
    t_extra, d_extra = target.extra_specials(), draft.extra_specials()
    if t_extra != d_extra:
        report.problems.append(f"additional special tokens differ: {_specials_list(t_extra)} in the target, {_specials_list(d_extra)} in the draft")
    elif t_extra:
        report.checked.append(f"additional special tokens {_specials_list(t_extra)}")
    same = []
    for role in SPECIAL_ROLES:
        t, d = target.special(role), draft.special(role)
        if t != d:
            report.problems.append(f"{role} token differs: {_special_text(t)} in the target, {_special_text(d)} in the draft")
        elif t != (None, None):
            same.append(f"{role} {_special_text(t)}")
    if same:
        report.checked.append("special tokens " + ", ".join(same))


def _specials_list(items: list[tuple[str, int | None]]) -> str:
    return "[" + ", ".join(_special_text(item) for item in items) + "]" if items else "none"


def _special_text(value: tuple[str | None, int | None]) -> str:
    text, token_id = value
    if text is None:
        return "none" if token_id is None else f"id {token_id} (config.json)"
    return f"{_shown(text)} (id {token_id if token_id is not None else 'unknown'})"
