"""Calibration data: the shipped set, the user's JSONL/plain text, seeded sampling and packing."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from yitrt.errors import UsageError
from yitrt.quant.calib_data import DEFAULT_CALIB, batch_size_for, load_calibration, read_documents


class CharTokenizer:
    """A test double of a transformers tokenizer: one id per character (eos 0), ChatML-like chat template."""

    eos_token_id = 0
    chat_template = "chatml"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 + 1 for c in text]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_shipped_set_is_bilingual_large_and_documented():
    docs, source, digest = read_documents(None)
    raw = [json.loads(line) for line in resources.files("yitrt").joinpath("data", DEFAULT_CALIB).read_text().splitlines()]
    assert len(docs) >= 512 and source.startswith("shipped") and len(digest) == 64
    langs = {row["lang"] for row in raw}
    assert langs == {"en", "zh"} and sum(r["lang"] == "zh" for r in raw) >= 200 and sum(r["lang"] == "en" for r in raw) >= 200
    sources = resources.files("yitrt").joinpath("data", "SOURCES.txt").read_text()
    for name in {row["source"] for row in raw}:
        assert name in sources, f"{name} has no provenance in SOURCES.txt"
    eval_text = resources.files("yitrt").joinpath("data", "eval_text.txt").read_text()
    assert not any(doc["text"][:40] in eval_text for doc in docs)  # calibration never sees the evaluation text


def test_jsonl_text_and_chat_messages(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "plain document"}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    docs, _, _ = read_documents(path)
    assert docs[0] == {"text": "plain document"} and docs[1]["messages"][1]["content"] == "yo"
    calib = load_calibration(path, CharTokenizer(), size=100, seq_len=8)
    chat = CharTokenizer().apply_chat_template(docs[1]["messages"])
    stream = [t for seq in calib.sequences for t in seq]
    # both documents made it in, the chat one rendered with the template, each followed by eos
    assert calib.documents_used == 2 and len(stream) == (len("plain document") + 1 + len(chat) + 1) // 8 * 8
    assert CharTokenizer()(chat)["input_ids"][:5] in [stream[i : i + 5] for i in range(len(stream) - 4)]


@pytest.mark.parametrize(("line", "needle"), [
    ("not json", ":2:"),
    (json.dumps({"prompt": "x"}), "'text'"),
    (json.dumps({"messages": [{"role": "user"}]}), "'messages'"),
])
def test_bad_jsonl_line_names_the_line(tmp_path, line, needle):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(UsageError) as info:
        read_documents(path)
    assert needle in info.value.message and info.value.hint


def test_plain_text_paragraphs(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first paragraph\nstill first\n\nsecond\n\n\n")
    docs, _, _ = read_documents(path)
    assert docs == [{"text": "first paragraph\nstill first"}, {"text": "second"}]


def test_sampling_is_seeded_and_packs_full_sequences(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 3}) + "\n" for i in range(50)))
    a = load_calibration(path, CharTokenizer(), size=10, seq_len=16, seed=1)
    b = load_calibration(path, CharTokenizer(), size=10, seq_len=16, seed=1)
    c = load_calibration(path, CharTokenizer(), size=10, seq_len=16, seed=2)
    assert a.sequences == b.sequences and a.sequences != c.sequences
    assert len(a.sequences) == 10 and all(len(s) == 16 for s in a.sequences)
    assert a.documents == 50 and a.documents_used < 50  # drawn until enough tokens, not the whole file


def test_too_little_data_and_unreadable_files(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("short")
    with pytest.raises(UsageError) as info:
        load_calibration(path, CharTokenizer(), size=4, seq_len=64)
    assert "fewer than one sequence of 64" in info.value.message
    with pytest.raises(UsageError):
        read_documents(tmp_path / "missing.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError) as info:
        read_documents(tmp_path / "bin.txt")
    assert "UTF-8" in info.value.message


def test_batch_size_fits_memory():
    small = batch_size_for(512, 4096, 11008, free_bytes=8 << 30)
    big = batch_size_for(512, 4096, 11008, free_bytes=64 << 30)
    assert 1 <= small < big <= 64
    assert batch_size_for(4096, 7168, 20480, free_bytes=1 << 20) == 1
