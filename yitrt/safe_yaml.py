"""The one YAML loader of yitrt, for every YAML a user can hand it: recipes, ``--set`` values, plugin profiles.

``yaml.safe_load`` refuses Python tags but builds whatever else a document describes, so a few lines of anchors
and aliases ("billion laughs": each level repeats the one before nine times) expand to more objects than memory
holds, a deeply nested flow sequence exhausts the interpreter's stack, and a repeated key silently keeps its last
value (``tp: 1`` then ``tp: 8`` is a tp-8 recipe). This loader parses the document into YAML's node graph first
and checks the graph before anything is constructed:

- anchors and aliases are allowed (``<<: *defaults`` is a common way to share settings), but the document's size
  *with every alias expanded* is bounded by :data:`MAX_NODES`, and an alias that contains itself is refused;
- nesting is bounded by :data:`MAX_DEPTH` (checked while composing, long before Python's recursion limit);
- a mapping may not repeat a key (merged keys from ``<<`` may be overridden, as YAML's merge spec intends);
- only plain values: strings, numbers, booleans, null, dates, lists and mappings; any other tag (``!!python/...``,
  ``!!binary``, ``!!set``, ``!custom``) is refused;
- integers of more than :data:`MAX_INT_DIGITS` digits, a file larger than :data:`MAX_BYTES`, text that is not
  UTF-8, and a stream of several documents are refused.

Every refusal is one line naming the file, the line and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from yitrt.errors import UsageError, ValidationError, YitrtError
from yitrt.userfiles import decode_text, read_bytes

#: The largest YAML file read (a recipe or profile is a few KB).
MAX_BYTES = 1 << 20
#: Nodes of the document with every alias expanded (a recipe has about a hundred).
MAX_NODES = 10_000
#: Levels of nesting (a recipe has four).
MAX_DEPTH = 64
#: Digits of an integer (no yitrt setting needs more than 64-bit values; Python refuses > 4300 digits anyway).
MAX_INT_DIGITS = 20

_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "str", "timestamp", "seq", "map")}
_MERGE = _TAG + "merge"


class _Refused(Exception):
    def __init__(self, problem: str, node: Node | None = None, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark if mark is not None else (node.start_mark if node is not None else None)


class _Loader(yaml.SafeLoader):
    """SafeLoader whose composer counts nesting depth (the only recursive step of PyYAML's parsing)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_graph(loader: _Loader, root: Node) -> None:
    """Walk the node graph once per distinct node: tags, keys, integer sizes, and the expanded size."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Refused("an alias refers to the node that contains it (a recursive structure)", node)
        active.add(key)
        if node.tag not in _PLAIN_TAGS and node.tag != _MERGE:
            raise _Refused(f"tag {node.tag.replace(_TAG, '!!')} is not accepted (only plain strings, numbers, booleans, "
                           "null, lists and mappings)", node)
        total = 1
        if isinstance(node, ScalarNode):
            if node.tag == _TAG + "int" and sum(c.isdigit() for c in node.value) > MAX_INT_DIGITS:
                raise _Refused(f"the integer {node.value[:24]}... has more than {MAX_INT_DIGITS} digits", node)
        elif isinstance(node, SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_NODES:
                    break
        elif isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode):
                    raise _Refused("a mapping key must be a plain value, not a list or mapping", key_node)
                if key_node.tag != _MERGE:
                    try:
                        value = loader.construct_object(key_node, deep=True)
                    except (yaml.YAMLError, ValueError, TypeError) as exc:
                        raise _Refused(f"key {key_node.value!r} cannot be read ({exc})".splitlines()[0], key_node) from None
                    marker = value  # keys Python's dict merges (1, 1.0, true) are the same key
                    if marker in seen:
                        raise _Refused(f"key {key_node.value!r} is given twice (also at line {seen[marker].start_mark.line + 1}; "
                                       "YAML would silently keep the last)", key_node)
                    seen[marker] = key_node
                total += size(key_node) + size(value_node)
                if total > MAX_NODES:
                    break
        active.discard(key)
        if total > MAX_NODES:
            raise _Refused(f"with its aliases expanded the document holds more than {MAX_NODES} values "
                           "(an alias bomb?); refused", node)
        sizes[key] = total
        return total

    size(root)


def _where(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "mark", None) or getattr(exc, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character #x{exc.character:04x} is not allowed in YAML" if isinstance(exc.character, int) else str(exc.reason)
    text = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context and "expected a single document" in context:
        return "it holds several YAML documents (---); give one"
    return " ".join(f"{context + ': ' if context else ''}{text}".split())


def loads(text: str, source: str, *, mapping: bool = True, error: type[YitrtError] = ValidationError,
          fix: str = "fix the YAML") -> Any:
    """Parse one YAML document with the checks of this module.

    Args:
        text: the document.
        source: what it is, for messages ("recipe r.yaml", "--set serve.model_name=...").
        mapping: the document must be a mapping (an empty document counts as none).
        error: the error type of a refused document (a ValidationError takes one problem line).
        fix: the hint.

    Returns:
        Plain Python data: dict, list, str, int, float, bool, None, date.

    Raises:
        ``error``: the document is refused (syntax, alias bomb, nesting, duplicate key, tag, several documents, huge
            integer, not a mapping).
    """
    try:
        loader = _Loader(text)  # the reader checks for unprintable characters here
        try:
            root = loader.get_single_node()
            if root is not None:
                _check_graph(loader, root)
                loader.constructed_objects.clear()
                data = loader.construct_document(root)
            else:
                data = None
        finally:
            loader.dispose()
    except _Refused as exc:
        at = f" line {exc.mark.line + 1}, column {exc.mark.column + 1}" if exc.mark is not None else ""
        raise _error(error, f"{source}{at}: {exc.problem}", fix) from None
    except yaml.YAMLError as exc:
        raise _error(error, f"{source} is not valid YAML{_where(exc)}: {_problem(exc)}", fix) from None
    except (ValueError, TypeError, RecursionError) as exc:  # a value PyYAML's constructors cannot build
        raise _error(error, f"{source}: cannot read a value ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})", fix) from None
    if mapping and not isinstance(data, dict):
        kind = "empty" if data is None else f"a YAML {type(data).__name__}"
        raise _error(error, f"{source} is {kind}, not a mapping of keys", fix)
    return data


def _error(cls: type[YitrtError], message: str, fix: str) -> YitrtError:
    return cls([message], fix) if issubclass(cls, ValidationError) else cls(message, fix)


def load_file(path: Path, what: str, *, mapping: bool = True, error: type[YitrtError] = ValidationError,
              read_error: type[YitrtError] = UsageError, fix: str = "fix the YAML") -> Any:
    """Read and parse a user-named YAML file: a regular UTF-8 file of at most :data:`MAX_BYTES`, then :func:`loads`.

    Raises:
        ``read_error``: missing, unreadable, not a regular file, too large, not UTF-8.
        ``error``: the document is refused.
    """
    path = Path(path)
    raw = read_bytes(path, what, MAX_BYTES, read_error, f"give a readable {what} (YAML)")
    return loads(decode_text(raw, path, what, read_error), f"{what} {path}", mapping=mapping, error=error, fix=fix)
