"""The text handling of yitrt's Triton Python models (yitrt/triton/model_src/yitrt_text.py), run here in-process
with the demo model's real tokenizer (byte-level BPE, ChatML template) and a SentencePiece-style Llama tokenizer
built in the test: incremental detokenization, stop words, BOS, messages, words lists."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import yitrt.triton

TEXT = "Paris is the capital of France. Café, naïve — 東京タワー 🙂🚀 ok!\n\n  Two spaces."


def _module():
    path = Path(yitrt.triton.__file__).parent / "model_src" / "yitrt_text.py"
    spec = importlib.util.spec_from_file_location("yitrt_text_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


text = _module()


@pytest.fixture(scope="module")
def demo_tokenizer(demo_build):
    return text.load_tokenizer(str(demo_build[0].path))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A SentencePiece-style tokenizer like Llama's/Yi's (▁ for spaces, byte fallback), trained in the test on a few
    ASCII lines: CJK and emoji become byte-fallback tokens, several per character."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Paris is the capital of France. Cafe, naive -- ok!", "the capital of France is Paris", "hello world, how are you today?"] * 20
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    base.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    full.normalizer = base.normalizer
    full.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    full.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    folder = tmp_path_factory.mktemp("sp")
    PreTrainedTokenizerFast(tokenizer_object=full, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return text.load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    """A real SentencePiece model file alone (``tokenizer.model``, LlamaTokenizer), as Yi's repositories ship it:
    loading it needs sentencepiece and protobuf to agree (they did not with sentencepiece 0.2.1+ and protobuf 6)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(["Paris is the capital of France. Cafe, naive -- ok!", "the capital of France is Paris"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=300, byte_fallback=True,
                                   character_coverage=1.0, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>", "add_bos_token": True}))
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    return text.load_tokenizer(str(folder))


@pytest.mark.parametrize("which", ["demo_tokenizer", "sp_tokenizer", "spm_tokenizer"])
def test_incremental_detokenization_concatenates_to_the_whole_decode(which, request):
    tok = request.getfixturevalue(which)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    whole = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for chunk in (1, 2, 3):  # streamed one, two, three tokens per response
        detok = text.IncrementalDetokenizer(tok)
        pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
        assert "".join(pieces) == whole
        assert all("\ufffd" not in p for p in pieces)  # no broken UTF-8 character is ever sent
    naive = "".join(tok.decode([i], skip_special_tokens=True) for i in ids)
    if which != "demo_tokenizer":
        assert any(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids))  # byte fallback is exercised
        assert naive != whole  # the stock per-token decode loses spaces / splits characters: what this fixes


def test_text_stream_stops_at_a_stop_word_and_never_sends_part_of_it(demo_tokenizer):
    tok = demo_tokenizer
    ids = tok("The answer is Paris. END of story", add_special_tokens=False)["input_ids"]
    stream = text.TextStream(tok, ["END"])
    sent = [stream.add([i]) for i in ids] + [stream.finish()]
    assert "".join(sent) == "The answer is Paris. " and stream.stopped
    assert not any("E" in p for p in sent)
    held = text.TextStream(tok, ["Paris!"])  # a prefix is held back, then released when it is not the stop word
    out = [held.add([i]) for i in ids] + [held.finish()]
    assert "".join(out) == "The answer is Paris. END of story" and not held.stopped


def test_encoder_never_doubles_bos_and_applies_the_chat_template(sp_tokenizer, demo_tokenizer):
    enc = text.Encoder(sp_tokenizer, 2, [], None)
    ids = enc.encode("hello world", None)
    assert ids[0] == 1 and ids[1] != 1
    assert enc.encode("<s>hello world", None).count(1) == 1  # the client's own BOS text is not doubled
    chat = text.Encoder(demo_tokenizer, 2, [0], 50)
    rendered = chat.encode("What is the capital of France?", json.dumps([{"role": "system", "content": "Be brief."}]))
    decoded = demo_tokenizer.decode(rendered)
    assert decoded.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert decoded.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(text.RequestError, match="at most 50"):
        chat.encode("word " * 200, None)
    with pytest.raises(text.RequestError, match="no text"):
        chat.encode("", None)


@pytest.mark.parametrize("raw, match", [("{not json", "not valid JSON"), ("[]", "non-empty"), ('{"role": "user"}', "non-empty"),
                                        ('[{"role": "robot", "content": "x"}]', "messages\\[0\\]"), ('[{"role": "user"}]', "messages\\[0\\]")])
def test_malformed_messages_are_request_errors(raw, match):
    with pytest.raises(text.RequestError, match=match):
        text.parse_messages(raw)


def test_words_list_round_trip_and_stop_ids(demo_tokenizer):
    enc = text.Encoder(demo_tokenizer, 2, [2, 0], None)
    assert enc.stop_ids == [0]  # the end id is not repeated as a stop id
    seqs = enc.stop_sequences(["Paris", " end"])
    assert [0] in seqs and demo_tokenizer(" Paris", add_special_tokens=False)["input_ids"] in seqs  # mid-text variant too
    array = text.to_words_list(seqs)
    assert array.shape[0] == 2 and array.dtype.name == "int32"
    assert text.from_words_list(array) == seqs
    assert text.to_words_list([]).shape == (2, 0)


def test_end_id_minus_one_drops_the_models_extra_stop_ids(demo_tokenizer):
    """A request with end_id -1 (bench's ignore-EOS) must not stop at the deployment's extra eos ids either."""
    encoder = _module().Encoder(demo_tokenizer, end_id=2, stop_ids=[3, 4], max_input_len=None)
    assert encoder.stop_sequences([]) == [[3], [4]]
    assert encoder.stop_sequences([], ignore_end=True) == []


def test_words_encodings_with_space_adds_the_mid_text_variant_and_stock_does_not(demo_tokenizer):
    """The documented difference from NVIDIA's preprocessing (parameter yitrt_words_encoding): with_space encodes
    " Paris" too, stock only "Paris"; an empty word is no word in both."""
    alone = demo_tokenizer("Paris", add_special_tokens=False)["input_ids"]
    spaced = demo_tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert alone != spaced  # byte-level BPE: the mid-text word has other ids
    ours = text.Encoder(demo_tokenizer, 2, [], None).word_sequences(["Paris", ""])
    stock = text.Encoder(demo_tokenizer, 2, [], None, words_encoding="stock").word_sequences(["Paris", ""])
    assert ours == [alone, spaced] and stock == [alone]
    with pytest.raises(ValueError, match="yitrt_words_encoding must be one of"):
        text.Encoder(demo_tokenizer, 2, [], None, words_encoding="spaced")


@pytest.mark.parametrize("array", [[[[0], [-1]]], [[0], [-1]], [[0, 0], [-1, -1]], [[[]]]], ids=["stock-empty", "2d", "two-slots", "empty"])
def test_words_lists_with_only_unused_slots_mean_no_words(array):
    """The stock preprocessing turns "" into [[[0], [-1]]]: one padded slot, offset -1, no word."""
    import numpy as np

    assert text.from_words_list(np.array(array, dtype=np.int32)) == []


@pytest.mark.parametrize("array, match", [
    ([[1, 2, 3]], "must be \\[2, N\\]"),
    ([[5, 6], [3, -1]], "increasing positions in 1..2"),
    ([[5, 6], [2, 1]], "increasing positions"),
    ([[5, 6], [0, 2]], "increasing positions"),
])
def test_malformed_words_lists_are_request_errors(array, match):
    import numpy as np

    with pytest.raises(text.RequestError, match=match):
        text.from_words_list(np.array(array, dtype=np.int32), "stop_words_list")


def test_words_list_with_padding_after_the_last_offset_keeps_every_word():
    import numpy as np

    assert text.from_words_list(np.array([[[7, 8, 9, 0], [2, 3, -1, -1]]], dtype=np.int32)) == [[7, 8], [9]]
