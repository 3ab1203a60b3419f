"""Hand-written lying and damaged safetensors files: one rewrite per class of lie, shared by the validator's unit
tests and the hostile-input suite (tests/integration/test_hostile_weights.py).

Each lie takes a real file (written by the safetensors library) and rewrites its header and data with
``struct`` + ``json`` exactly as an attacker or a broken writer would, leaving everything else as it was.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path


def split(path: Path) -> tuple[dict, bytes]:
    """(header as an ordered dict, data section) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def assemble(header: bytes | dict, data: bytes, length: int | None = None) -> bytes:
    """A file of a header (JSON text as bytes, or a dict), padded with spaces to 8 bytes, and a data section;
    ``length`` overrides the 8-byte length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _tensors(header: dict) -> list[str]:
    """Tensor names in data order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _pairs_text(pairs: list[tuple[str, object]]) -> bytes:
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


def _overlap(h, d):
    _, b = _tensors(h)[:2]
    begin, end = h[b]["data_offsets"]
    h[b]["data_offsets"] = [begin - 2, end - 2]  # b now starts inside the tensor before it
    return assemble(h, d), b


def _negative(h, d):
    name = _tensors(h)[0]
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [begin - 4, end - 4]
    return assemble(h, d), name


def _reversed(h, d):
    name = _tensors(h)[1]
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [end, begin]
    return assemble(h, d), name


def _gap(h, d):
    name = _tensors(h)[-1]
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [begin + 2, end + 2]
    return assemble(h, d + b"\0\0"), name


def _trailing(h, d):
    return assemble(h, d + b"\0" * 8), None


def _byte_count(h, d):
    name = next(n for n in _tensors(h) if len(h[n]["shape"]) == 2)
    h[name]["shape"] = [h[name]["shape"][0], h[name]["shape"][1] - 1]
    return assemble(h, d), name


def _unknown_dtype(h, d):
    name = _tensors(h)[0]
    h[name]["dtype"] = "Q4_K"
    return assemble(h, d), name


def _not_utf8(h, d):
    name = _tensors(h)[0]
    raw = json.dumps(h, separators=(",", ":")).encode().replace(name.encode(), b"\xff" + name.encode()[1:], 1)
    return assemble(raw, d), None


def _utf16(h, d):
    return assemble(json.dumps(h).encode("utf-16-le"), d), None


def _array(h, d):
    return assemble(json.dumps([h]).encode(), d), None


def _string(h, d):
    return assemble(json.dumps(json.dumps(h)).encode(), d), None


def _duplicate(h, d):
    pairs = list(h.items())
    return assemble(_pairs_text(pairs[:1] + pairs), d), None


def _duplicate_in_entry(h, d):
    name = _tensors(h)[0]
    entry = h.pop(name)
    inner = _pairs_text([("dtype", "F32"), *entry.items()]).decode()
    # found while parsing, before entries have names: the message names the key
    return assemble((f'{{{json.dumps(name)}:{inner},' + _pairs_text(list(h.items())).decode()[1:]).encode(), d), None


def _metadata_nested(h, d):
    h["__metadata__"] = {"format": {"pt": "yes"}}
    return assemble(h, d), None


def _metadata_not_string(h, d):
    h["__metadata__"] = {"format": 1}
    return assemble(h, d), None


def _length_beyond_file(h, d):
    raw = json.dumps(h).encode()
    return assemble(raw, d, length=len(raw) + len(d) + 8), None


def _length_huge(h, d):
    return assemble(h, d, length=1 << 62), None


def _length_zero(h, d):
    return assemble(b"", d, length=0), None


def _nan_literal(h, d):
    name = _tensors(h)[0]
    end = h[name]["data_offsets"][1]
    raw = json.dumps(h, separators=(",", ":")).encode().replace(f"[0,{end}]".encode(), f"[NaN,{end}]".encode(), 1)
    return assemble(raw, d), None


def _float_offset(h, d):
    name = _tensors(h)[0]
    h[name]["data_offsets"] = [float(x) for x in h[name]["data_offsets"]]
    return assemble(h, d), name


def _bool_offset(h, d):
    name = _tensors(h)[0]
    begin, end = h[name]["data_offsets"]
    h[name]["data_offsets"] = [False, end] if begin == 0 else [begin, end]
    return assemble(h, d), name


def _string_shape(h, d):
    name = _tensors(h)[0]
    h[name]["shape"] = str(h[name]["shape"])
    return assemble(h, d), name


def _extra_key(h, d):
    name = _tensors(h)[0]
    h[name]["offsets"] = h[name]["data_offsets"]
    return assemble(h, d), name


def _leading_space(h, d):
    return assemble(b" " + json.dumps(h).encode(), d), None


def _deep_json(h, d):
    return assemble(b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", d), None


def _control_name(h, d):
    name = _tensors(h)[0]
    h["evil\nname"] = h.pop(name)
    return assemble(h, d), None


#: lie → (rewrite(header, data) → (file bytes, tensor the error must name or None), a fragment of the message)
LIES: dict[str, tuple[Callable, str]] = {
    "overlap": (_overlap, "overlap"),
    "negative_offset": (_negative, "negative"),
    "reversed_offsets": (_reversed, "reversed"),
    "gap": (_gap, "gap"),
    "trailing_bytes": (_trailing, "follow the last tensor"),
    "wrong_byte_count": (_byte_count, "needs"),
    "unknown_dtype": (_unknown_dtype, "q4_k"),
    "not_utf8": (_not_utf8, "not utf-8"),
    "utf16": (_utf16, "json"),
    "json_array": (_array, "json array"),
    "json_string": (_string, "json string"),
    "duplicate_key": (_duplicate, "appears twice"),
    "duplicate_key_in_entry": (_duplicate_in_entry, "appears twice"),
    "metadata_nested": (_metadata_nested, "__metadata__"),
    "metadata_not_string": (_metadata_not_string, "__metadata__"),
    "length_beyond_file": (_length_beyond_file, "truncated"),
    "length_huge": (_length_huge, "limit"),
    "length_zero": (_length_zero, "empty"),
    "nan_literal": (_nan_literal, "nan"),
    "float_offset": (_float_offset, "data_offsets"),
    "bool_offset": (_bool_offset, "data_offsets"),
    "string_shape": (_string_shape, "shape"),
    "extra_entry_key": (_extra_key, "keys"),
    "leading_whitespace": (_leading_space, "start with"),
    "deeply_nested": (_deep_json, "nested too deeply"),
    "control_char_name": (_control_name, "control characters"),
}


def lie(path: Path, kind: str) -> tuple[str | None, str]:
    """Rewrite ``path`` with lie ``kind``; return (the tensor the refusal must name or None, message fragment)."""
    rewrite, says = LIES[kind]
    header, data = split(path)
    raw, tensor = rewrite(header, data)
    Path(path).write_bytes(raw)
    return tensor, says
