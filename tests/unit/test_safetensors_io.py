"""Streaming safetensors I/O and the HF source folder, checked against the reference `safetensors` library."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.safetensors_lies import LIES, assemble, lie, split
from yitrt.checkpoint.finite import first_nonfinite, tensor_has_nonfinite
from yitrt.checkpoint.safetensors_io import SafetensorsReader, read_header
from yitrt.checkpoint.safetensors_writer import NonFiniteTensor, PlannedTensor, StreamingWriter
from yitrt.checkpoint.source import SourceCheckpoint
from yitrt.errors import CheckpointError


def _sample() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "b.fp8": (torch.randn(4, 6, generator=gen) * 3).to(torch.float8_e4m3fn),
        "c.scale": torch.tensor([0.125], dtype=torch.float32),
        "d.fp16": torch.randn(3, generator=gen).to(torch.float16),
        "e.i8": torch.randint(-128, 127, (2, 7), generator=gen, dtype=torch.int8),
        "f.odd": torch.randn(1, 1, 3, generator=gen).to(torch.bfloat16),  # 6 bytes: later offsets not aligned
        "g.f32": torch.randn(2, 2, generator=gen),
    }


_CODES = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.float16: "F16", torch.int8: "I8"}


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata=None):
    plan = [PlannedTensor(n, _CODES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = StreamingWriter(path, plan, metadata)
    for name, t in tensors.items():
        writer.write(name, t)
    return writer.close()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_streaming_writer_is_read_back_by_safetensors(tmp_path):
    tensors = _sample()
    path = tmp_path / "rank0.safetensors"
    size, digest = _write(path, tensors, {"format": "pt", "yitrt": "1"})
    raw = path.read_bytes()
    assert size == len(raw)
    assert digest == blake3.blake3(raw).hexdigest()
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "yitrt": "1"}
        assert list(fh.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = fh.get_tensor(name)
            assert _same(got, t), name
    # the header (and so the data section) is 8-byte aligned
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header["c.scale"]["dtype"] == "F32" and header["c.scale"]["shape"] == [1]
    assert header["b.fp8"]["dtype"] == "F8_E4M3"


def test_writer_without_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    _write(path, {"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    with safe_open(str(path), framework="pt") as fh:
        assert not fh.metadata()
        assert torch.equal(fh.get_tensor("w"), torch.ones(2, 2, dtype=torch.bfloat16))


def _writer(tmp_path):
    plan = [PlannedTensor("x", "BF16", (2, 3)), PlannedTensor("y", "F32", (4,))]
    return StreamingWriter(tmp_path / "w.safetensors", plan)


def test_writer_accepts_any_order_and_rejects_double_writes(tmp_path):
    writer = _writer(tmp_path)
    writer.write("y", torch.zeros(4))  # offsets are fixed by the header, so order does not matter
    writer.write("x", torch.ones(2, 3, dtype=torch.bfloat16))
    writer.write_at("y", 0, torch.zeros(4).numpy())
    with pytest.raises(ValueError, match="overlapping"):
        writer.close()


def test_writer_rejects_wrong_shape(tmp_path):
    writer = _writer(tmp_path)
    with pytest.raises(ValueError):
        writer.write("x", torch.zeros(3, 2, dtype=torch.bfloat16))
    writer.abort()


def test_writer_rejects_wrong_dtype(tmp_path):
    writer = _writer(tmp_path)
    with pytest.raises(ValueError):
        writer.write("x", torch.zeros(2, 3, dtype=torch.float16))
    writer.abort()


def test_writer_rejects_extra_tensor(tmp_path):
    writer = _writer(tmp_path)
    writer.write("x", torch.zeros(2, 3, dtype=torch.bfloat16))
    writer.write("y", torch.zeros(4))
    with pytest.raises(ValueError, match="planned nothing"):
        writer.write("z", torch.zeros(1))
    writer.close()


def test_close_with_missing_tensor_raises(tmp_path):
    writer = _writer(tmp_path)
    writer.write("x", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="y"):
        writer.close()


def test_writer_accepts_non_contiguous(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    path = tmp_path / "t.safetensors"
    _write(path, {"t": t})
    with safe_open(str(path), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("t"), t)


def test_writer_accepts_0d_scalar(tmp_path):
    # safetensors allows shape [] and ModelOpt-style scales may be 0-d (reference §3.3: "0-d or shape [1]")
    path = tmp_path / "s.safetensors"
    _write(path, {"s": torch.tensor(1.5, dtype=torch.float32)})
    with safe_open(str(path), framework="pt") as fh:
        got = fh.get_tensor("s")
    assert got.shape == () and got.item() == 1.5
    assert SafetensorsReader(path).read("s").item() == 1.5


def test_reader_reads_0d_scalar(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"s": torch.tensor(2.5, dtype=torch.float32)}, str(path))
    reader = SafetensorsReader(path)
    got = reader.read("s")
    assert got.shape == () and got.item() == 2.5
    reader.close()


# ---- reading -----------------------------------------------------------------------------------------------

def test_reader_reads_reference_written_file(tmp_path):
    tensors = _sample()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos, metadata, _ = read_header(path)
    assert metadata == {"format": "pt"}
    assert {n: i.shape for n, i in infos.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    reader = SafetensorsReader(path)
    for name, t in tensors.items():
        assert _same(reader.read(name), t), name
    reader.close()


@pytest.mark.parametrize("rows", [(0, 5), (1, 3), (4, 5), (2, 2), (0, 0)])
def test_reader_row_ranges_equal_slices(tmp_path, rows):
    tensors = _sample()
    path = tmp_path / "r.safetensors"
    save_file(tensors, str(path))
    reader = SafetensorsReader(path)
    a, b = rows
    assert _same(reader.read("a.bf16", rows), tensors["a.bf16"][a:b])
    assert _same(reader.read("b.fp8", (min(a, 4), min(b, 4))), tensors["b.fp8"][min(a, 4) : min(b, 4)])
    reader.close()


def test_reader_rejects_rows_past_the_end(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({"w": torch.zeros(3, 2)}, str(path))
    reader = SafetensorsReader(path)
    with pytest.raises(ValueError):
        reader.read("w", (2, 4))
    reader.close()


def test_read_header_of_truncated_data_section(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


def test_read_header_of_tiny_file(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


def test_read_header_of_file_cut_inside_header(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:20])  # 8-byte length + 12 bytes of JSON
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


def test_read_header_bad_json_and_bad_length(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"not json")
    with pytest.raises(CheckpointError):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError):
        read_header(path)


def test_read_header_byte_range_not_matching_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="w"):
        read_header(path)


def test_read_header_entry_without_offsets(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError):
        read_header(path)


# ---- SourceCheckpoint -------------------------------------------------------------------------------------

def _sharded(folder: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    t = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(4, generator=gen).to(torch.bfloat16),
        "lm_head.weight": torch.randn(10, 4, generator=gen).to(torch.bfloat16),
    }
    names = list(t)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, members in shards.items():
        save_file({n: t[n] for n in members}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in members})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return t


def _edit_index(folder: Path, change) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def test_source_checkpoint_reads_sharded_folder(tmp_path):
    tensors = _sharded(tmp_path)
    with SourceCheckpoint(tmp_path) as src:
        assert set(src.tensors) == set(tensors)
        assert src.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert src.tensors["model.norm.weight"].file == "model-00002-of-00002.safetensors"
        assert src.tensors["lm_head.weight"].dtype == "BF16"
        assert src.tensors["lm_head.weight"].shape == (10, 4)
        for name, t in tensors.items():
            assert torch.equal(src.read(name), t)
        assert torch.equal(src.read("lm_head.weight", (3, 7)), tensors["lm_head.weight"][3:7])


def test_source_missing_shard_is_named(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint(tmp_path)
    assert "model-00002-of-00002.safetensors" in info.value.message


def test_source_tensor_in_index_but_not_in_shard(tmp_path):
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update({"model.layers.0.mlp.down_proj.weight": "model-00001-of-00002.safetensors"}))
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint(tmp_path)
    assert "model.layers.0.mlp.down_proj.weight" in info.value.message


def test_source_tensor_in_index_under_the_wrong_shard(tmp_path):
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update({"model.norm.weight": "model-00001-of-00002.safetensors"}))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        SourceCheckpoint(tmp_path)


def test_source_tensor_in_shard_not_in_index(tmp_path):
    _sharded(tmp_path)
    _edit_index(tmp_path, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint(tmp_path)
    assert "model.norm.weight" in info.value.message


def test_source_single_file_without_index(tmp_path):
    t = {"model.norm.weight": torch.arange(4, dtype=torch.float32)}
    save_file(t, str(tmp_path / "model.safetensors"))
    with SourceCheckpoint(tmp_path) as src:
        assert src.files == ["model.safetensors"]
        assert torch.equal(src.read("model.norm.weight"), t["model.norm.weight"])


def test_source_truncated_shard_is_refused(tmp_path):
    _sharded(tmp_path)
    shard = tmp_path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        SourceCheckpoint(tmp_path)


def test_source_empty_folder(tmp_path):
    with pytest.raises(CheckpointError):
        SourceCheckpoint(tmp_path)


def test_pickle_only_folder_needs_opt_in(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint(tmp_path)
    assert "--allow-pickle" in info.value.hint
    assert "pytorch_model.bin" in info.value.message


def test_pickle_loads_with_opt_in(tmp_path):
    gen = torch.Generator().manual_seed(2)
    state = {
        "model.embed_tokens.weight": torch.randn(6, 3, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(3, generator=gen),
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    with SourceCheckpoint(tmp_path, allow_pickle=True) as src:
        assert src.files == ["pytorch_model.bin"]
        assert src.tensors["model.embed_tokens.weight"].dtype == "BF16"
        assert src.tensors["model.norm.weight"].dtype == "F32"
        assert src.tensors["model.embed_tokens.weight"].shape == (6, 3)
        for name, t in state.items():
            assert torch.equal(src.read(name), t)
        assert torch.equal(src.read("model.embed_tokens.weight", (2, 5)), state["model.embed_tokens.weight"][2:5])


class _NotATensor:
    """Any non-allowlisted class: unpickling it runs arbitrary code under weights_only=False."""


def test_pickle_with_objects_is_refused_even_with_opt_in(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safely"):
        SourceCheckpoint(tmp_path, allow_pickle=True)


# ---- the header validator: every class of lie ---------------------------------------------------------------

def _real_file(path: Path) -> Path:
    gen = torch.Generator().manual_seed(3)
    save_file({
        "model.a.weight": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        "model.b.weight": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        "model.c.bias": torch.randn(5, generator=gen),
    }, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("kind", sorted(LIES))
def test_validator_refuses_each_lie(tmp_path, kind):
    path = _real_file(tmp_path / "model.safetensors")
    tensor, says = lie(path, kind)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = info.value.message
    assert str(path) in message and says in message.lower(), message
    assert "\n" not in message and info.value.hint
    if tensor is not None:
        assert f"tensor {tensor}" in message, message
    with pytest.raises(CheckpointError):  # the reader and the source folder share the validator
        SafetensorsReader(path)
    with pytest.raises(CheckpointError):
        SourceCheckpoint(tmp_path)


def test_validator_accepts_what_the_format_allows(tmp_path):
    """Zero-element tensors, 0-d scalars, names that only look like the metadata key, an empty file of no tensors,
    trailing space padding: all valid safetensors (the reference library reads them), all accepted."""
    path = tmp_path / "ok.safetensors"
    tensors = {"__metadata": torch.zeros(2, dtype=torch.int8), "empty": torch.zeros(0, 4), "also.empty": torch.zeros(3, 0),
               "scalar": torch.tensor(1.5), "w": torch.ones(2, 2, dtype=torch.bfloat16)}
    save_file(tensors, str(path))
    infos, _, _ = read_header(path)
    assert {n: i.shape for n, i in infos.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    with SafetensorsReader(path) as reader:
        assert all(_same(reader.read(n).reshape(-1), t.reshape(-1)) for n, t in tensors.items())
    header, data = split(path)
    path.write_bytes(assemble(json.dumps(header).encode() + b"        ", data))
    assert set(read_header(path)[0]) == set(tensors)
    path.write_bytes(assemble({}, b""))
    assert read_header(path)[0] == {}


def test_validator_refuses_a_header_over_the_format_limit(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{" + b" " * 16)
    with pytest.raises(CheckpointError, match="limit"):
        read_header(path)


@pytest.mark.parametrize("value", ["\\ud800", "\\u0000", ""])
def test_validator_refuses_unprintable_names(tmp_path, value):
    path = tmp_path / "n.safetensors"
    path.write_bytes(assemble(f'{{"{value}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}'.encode(), b"\0" * 4))
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    info.value.message.encode("utf-8")  # printable: a lone surrogate would make stderr raise


def test_huge_integer_literal_is_refused_not_crashing(tmp_path):
    path = tmp_path / "i.safetensors"
    path.write_bytes(assemble(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}", b""))
    with pytest.raises(CheckpointError, match="JSON"):
        read_header(path)


def test_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # an open without O_NONBLOCK would wait for a writer forever
    with pytest.raises(CheckpointError, match="regular file"):
        read_header(fifo)
    fifo.unlink()
    fifo.mkdir()
    with pytest.raises(CheckpointError, match="regular file"):
        SourceCheckpoint(tmp_path)


def test_file_that_changes_after_validation_is_refused(tmp_path):
    path = _real_file(tmp_path / "model.safetensors")
    with SourceCheckpoint(tmp_path) as src:
        src.check_unchanged()
        with open(path, "ab") as fh:  # grows
            fh.write(b"\0" * 16)
        with pytest.raises(CheckpointError, match="changed"):
            src.check_unchanged()
    reader = SafetensorsReader(path := _real_file(tmp_path / "other.safetensors"))
    last = max(reader.tensors.values(), key=lambda i: i.end)
    os.truncate(path, last.end - 4)  # shrinks: the last tensor's bytes are gone
    with pytest.raises(CheckpointError, match="shrank"):
        reader.read(last.name)
    reader.close()
    with pytest.raises(CheckpointError):  # reopening a changed file is refused too
        reader.read("model.a.weight")


# ---- the index ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight_map, says", [
    ("not an object", "weight_map"),
    (["model-00001-of-00002.safetensors"], "weight_map"),
    ({"model.norm.weight": "../model-00002-of-00002.safetensors"}, "not a *.safetensors file of this folder"),
    ({"model.norm.weight": "/tmp/model-00002-of-00002.safetensors"}, "not a *.safetensors file of this folder"),
    ({"model.norm.weight": "sub/x.safetensors"}, "not a *.safetensors file of this folder"),
    ({"model.norm.weight": "model.bin"}, "not a *.safetensors file of this folder"),
    ({"model.norm.weight": 3}, "not a *.safetensors file of this folder"),
])
def test_index_of_the_wrong_shape_or_escaping_the_folder(tmp_path, weight_map, says):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint(tmp_path)
    assert says in info.value.message and "\n" not in info.value.message


@pytest.mark.parametrize("text, says", [
    (b"[]", "weight_map"),
    (b'{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "twice"),
    (b'{"weight_map": {}, "metadata": {"total_size": NaN}}', "NaN"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"{", "JSON"),
])
def test_index_that_is_not_strict_json(tmp_path, text, says):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(CheckpointError, match=says):
        SourceCheckpoint(tmp_path)


def test_shard_named_by_the_index_whose_header_lies(tmp_path):
    _sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    lie(shard, "overlap")
    with pytest.raises(CheckpointError) as info:
        SourceCheckpoint(tmp_path)
    assert str(shard) in info.value.message and "overlap" in info.value.message


# ---- non-finite values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_finds_nan_and_inf_from_the_bits(dtype, bad):
    t = torch.full((37,), torch.finfo(dtype).max, dtype=dtype)  # the largest finite value is not flagged
    t[::2] = -torch.finfo(dtype).max
    code = _CODES.get(dtype) or {torch.float64: "F64", torch.float8_e5m2: "F8_E5M2"}[dtype]
    raw = t.view(torch.uint8).numpy()
    assert first_nonfinite(raw, code) is None and not tensor_has_nonfinite(t)
    t[29] = bad
    assert first_nonfinite(t.view(torch.uint8).numpy(), code) == 29
    assert tensor_has_nonfinite(t)


def test_first_nonfinite_e4m3_has_only_nan():
    t = torch.tensor([448.0, -448.0, 0.0], dtype=torch.float8_e4m3fn)  # its largest values, no Inf encoding
    assert first_nonfinite(t.view(torch.uint8).numpy(), "F8_E4M3") is None
    bits = t.view(torch.uint8).clone()
    bits[1] = 0xFF  # S.1111.111 = NaN
    assert first_nonfinite(bits.numpy(), "F8_E4M3") == 1
    assert first_nonfinite(bytes([0x7F, 0xFF]), "I8") is None  # integers have no NaN


@pytest.mark.parametrize("window, piece", [(8192, 6), (1 << 28, 4 << 20)])
def test_writer_refuses_nonfinite_at_every_window_and_slice_boundary(tmp_path, monkeypatch, window, piece):
    """Windows and check slices cut through tensors, and an odd-sized tensor makes the next one's elements
    unaligned to the file: every element is still checked exactly once and the digest stays the file's."""
    import yitrt.checkpoint.safetensors_writer as writer_module

    monkeypatch.setattr(writer_module, "_HASH_WINDOW", window)
    monkeypatch.setattr(writer_module, "_CHECK_SLICE", piece)
    tensors = {"odd": torch.ones(3, dtype=torch.bfloat16), "f32": torch.arange(5000, dtype=torch.float32),
               "i8": torch.ones(7, dtype=torch.int8), "bf": torch.ones(3001, dtype=torch.bfloat16)}
    size, digest = _write(tmp_path / "ok.safetensors", tensors)
    assert digest == blake3.blake3((tmp_path / "ok.safetensors").read_bytes()).hexdigest()
    for name, index in (("f32", 4999), ("f32", 2047), ("bf", 0), ("bf", 3000), ("odd", 2)):
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[name][index] = float("nan") if index % 2 else float("-inf")
        with pytest.raises(NonFiniteTensor) as info:
            _write(tmp_path / "bad.safetensors", bad)
        assert (info.value.tensor, info.value.element) == (name, index)
    bad["i8"][3] = 127  # bit patterns that would be NaN in a float are plain integers here
    plan = [PlannedTensor(n, _CODES[t.dtype], tuple(t.shape)) for n, t in bad.items()]
    writer = StreamingWriter(tmp_path / "kept.safetensors", plan, allow_nonfinite=True)
    for n, t in bad.items():
        writer.write(n, t)
    writer.close()
    assert writer.nonfinite == {"odd": 2}
