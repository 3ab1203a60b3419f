"""Draft pairing: which models can draft for which (tokenizer identity, registry groups), and `yitrt inspect --draft`."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest

from tests.conftest import weightless_tiny_model
from yitrt.models.draft_pairing import (
    PAIR_FIX,
    check_draft_pair,
    compare_tokenizers,
    registry_pair_problems,
    require_draft_pair,
)
from yitrt.models.registry import load_registry


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return weightless_tiny_model(tmp_path_factory.mktemp("tok") / "base")


@pytest.fixture
def pair(tiny_tokenizer, tmp_path):
    """(target, draft): two copies of the tiny folder, the draft's to be edited by the test."""
    target, draft = tmp_path / "target", tmp_path / "draft"
    shutil.copytree(tiny_tokenizer, target)
    shutil.copytree(tiny_tokenizer, draft)
    return target, draft


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_identical_tokenizers_pair_and_say_what_was_compared(pair):
    target, draft = pair
    report = compare_tokenizers(target, draft)
    assert report.ok and check_draft_pair(target, draft) == []
    checked = "\n".join(report.checked)
    assert "config.json vocab_size 512" in checked
    assert "tokenizer.json vocab (512 entries)" in checked
    assert "tokenizer.json merges (" in checked
    assert "eos '</s>' (id 2)" in checked and "bos '<s>' (id 1)" in checked
    assert "'<|im_end|>' (id 4)" in checked  # the additional special tokens, with their ids
    assert "chat end id 2" in checked
    assert report.to_json()["ok"] is True
    assert require_draft_pair(target, draft).ok


def test_one_changed_merge_is_refused_by_name(pair):
    target, draft = pair
    merges = json.loads(target.joinpath("tokenizer.json").read_text())["model"]["merges"]
    original = " ".join(merges[17]) if isinstance(merges[17], list) else merges[17]

    def change(tok):
        tok["model"]["merges"][17] = ["x", "y"] if isinstance(merges[17], list) else "x y"

    edit_json(draft / "tokenizer.json", change)
    assert check_draft_pair(target, draft) == [
        f"tokenizer.json merges differ at 1 position(s) (first #17: {original!r} in the target, 'x y' in the draft)"]


def test_a_different_special_id_is_refused_by_name(pair):
    target, draft = pair
    edit_json(draft / "tokenizer_config.json", lambda c: c.update(bos_token="<|im_start|>"))
    assert check_draft_pair(target, draft) == ["bos token differs: '<s>' (id 1) in the target, '<|im_start|>' (id 3) in the draft"]


def test_a_special_id_only_config_json_names_is_compared_too(pair):
    target, draft = pair  # the tokenizer names no pad token: config.json's pad_token_id is the fact
    edit_json(draft / "config.json", lambda c: c.update(pad_token_id=1))
    assert check_draft_pair(target, draft) == ["pad token differs: id 0 (config.json) in the target, id 1 (config.json) in the draft"]


def test_a_different_vocab_size_is_refused_by_name(pair):
    target, draft = pair
    edit_json(draft / "config.json", lambda c: c.update(vocab_size=640))
    assert check_draft_pair(target, draft) == ["vocab_size differs: 512 in the target's config.json, 640 in the draft's"]


def test_a_renamed_added_token_is_refused_in_vocab_and_added_tokens(pair):
    target, draft = pair

    def rename(tok):
        tok["added_tokens"][3]["content"] = "<|turn|>"
        tok["model"]["vocab"]["<|turn|>"] = tok["model"]["vocab"].pop("<|im_start|>")

    edit_json(draft / "tokenizer.json", rename)
    problems = check_draft_pair(target, draft)
    assert "tokenizer.json vocab differs at 1 id(s) (id 3: '<|im_start|>' in the target, '<|turn|>' in the draft)" in problems
    assert "tokenizer.json added tokens differs at 1 id(s) (id 3: '<|im_start|>' in the target, '<|turn|>' in the draft)" in problems


def test_a_different_chat_end_id_is_refused_by_name(pair):
    target, draft = pair  # the draft says its turns end with <|im_end|> (generation_config), the target with </s>
    (draft / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    problems = check_draft_pair(target, draft)
    assert problems == ["chat end id differs: the target ends a turn with id 2 ('</s>') (from tokenizer eos), the draft with "
                        "id 4 ('<|im_end|>') (from generation_config.json, written by the chat template as '<|im_end|>')"]


def test_no_common_tokenizer_file_is_refused(pair):
    target, draft = pair
    (draft / "tokenizer.json").unlink()
    problems = check_draft_pair(target, draft)
    assert problems[0] == "no tokenizer file to compare: the target has tokenizer.json, the draft none"


def _sentencepiece_model(vocab_size: int, threads: int = 1) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    from importlib import resources

    text = resources.files("yitrt").joinpath("data", "eval_text.txt").read_text(encoding="utf-8").splitlines()
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=vocab_size, model_type="bpe",
                                   character_coverage=1.0, num_threads=threads, minloglevel=2)
    return out.getvalue()


def test_sentencepiece_models_compare_by_hash_then_by_pieces(pair, monkeypatch):
    target, draft = pair
    for folder in pair:
        (folder / "tokenizer.json").unlink()  # the Yi 1.0 layout: tokenizer.model and tokenizer_config.json
    model = _sentencepiece_model(400)
    target.joinpath("tokenizer.model").write_bytes(model)
    draft.joinpath("tokenizer.model").write_bytes(model)
    report = compare_tokenizers(target, draft)
    assert report.ok and any("tokenizer.model (sha256" in c and "byte-identical" in c for c in report.checked)
    # other trainer settings, the same pieces: other bytes, same ids
    draft.joinpath("tokenizer.model").write_bytes(_sentencepiece_model(400, threads=2))
    report = compare_tokenizers(target, draft)
    assert target.joinpath("tokenizer.model").read_bytes() != draft.joinpath("tokenizer.model").read_bytes()
    assert report.ok and any(c.startswith("tokenizer.model pieces (400;") for c in report.checked)
    # one piece more (which moves others): refused, naming the first differing id
    draft.joinpath("tokenizer.model").write_bytes(_sentencepiece_model(401))
    problems = check_draft_pair(target, draft)
    assert len(problems) == 1 and problems[0].startswith("tokenizer.model pieces differ at ")
    assert ", 400 pieces in the target and 401 in the draft (first id " in problems[0] and "(score " in problems[0]
    # without sentencepiece, differing bytes cannot be proven identical
    draft.joinpath("tokenizer.model").write_bytes(_sentencepiece_model(400, threads=2))
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    problems = check_draft_pair(target, draft)
    assert len(problems) == 1 and "sentencepiece is not installed to compare its pieces" in problems[0]


def test_require_draft_pair_raises_one_line_with_the_fix(pair):
    target, draft = pair
    edit_json(draft / "config.json", lambda c: c.update(vocab_size=640))
    edit_json(draft / "tokenizer_config.json", lambda c: c.update(bos_token="<|im_start|>"))
    from yitrt.errors import UsageError

    with pytest.raises(UsageError) as info:
        require_draft_pair(target, draft)
    assert info.value.message.startswith(f"draft {draft} cannot draft for {target}: vocab_size differs")
    assert "(and 1 more" in info.value.message and info.value.hint == PAIR_FIX


def test_registry_draft_candidates_pair_within_one_family_chat_for_chat():
    registry = load_registry()
    assert [c.repo_id for c in registry.draft_candidates("01-ai/Yi-34B-Chat")] == ["01-ai/Yi-6B-Chat"]
    assert [c.repo_id for c in registry.draft_candidates("01-ai/Yi-Coder-9B-Chat")] == ["01-ai/Yi-Coder-1.5B-Chat"]
    # same context first, then the smallest
    assert [c.repo_id for c in registry.draft_candidates("01-ai/Yi-1.5-34B-Chat-16K")][0] == "01-ai/Yi-1.5-9B-Chat-16K"
    assert registry.draft_candidates("01-ai/Yi-6B-Chat") == []  # nothing smaller in its family
    for target in registry.checkpoints.values():
        for draft in registry.draft_candidates(target.repo_id):
            assert (draft.tokenizer, draft.end_id) == (target.tokenizer, target.end_id)
    assert {c.tokenizer for c in registry.checkpoints.values()} == set(registry.tokenizers) == {"yi", "yi-1.5", "yi-coder"}


def test_registry_pair_problems_name_family_and_turn_end():
    assert registry_pair_problems("01-ai/Yi-34B-Chat", "01-ai/Yi-6B-Chat") == []
    cross = registry_pair_problems("01-ai/Yi-34B-Chat", "01-ai/Yi-1.5-6B-Chat")
    assert cross == ["01-ai/Yi-1.5-6B-Chat (Yi-1.5) and 01-ai/Yi-34B-Chat (Yi 1.0) are of different tokenizer families, whose identity "
                     "is unconfirmed (yitrt pairs within one family); known drafts for 01-ai/Yi-34B-Chat: 01-ai/Yi-6B-Chat"]
    base = registry_pair_problems("01-ai/Yi-1.5-34B-Chat", "01-ai/Yi-1.5-6B")
    assert len(base) == 1 and base[0].startswith("01-ai/Yi-1.5-6B (base) ends a turn with id 2, 01-ai/Yi-1.5-34B-Chat (chat) with 7")
    assert registry_pair_problems("01-ai/Yi-34B-Chat", "someone/unknown") == []  # only the files can tell


# -- yitrt inspect --draft ---------------------------------------------------------------------------------------------


def test_inspect_draft_ok(cli, pair):
    target, draft = pair
    proc = cli("inspect", str(target), "--draft", str(draft))
    assert proc.returncode == 0, proc.stderr
    assert f"draft {draft} (" in proc.stdout and "ok: it can draft for the target" in proc.stdout
    assert "✓ tokenizer.json merges" in proc.stdout
    data = json.loads(cli("inspect", str(target), "--draft", str(draft), "--json").stdout)
    assert data["draft_pair"]["ok"] is True and data["draft_pair"]["problems"] == []
    assert data["draft_pair"]["sizes"]["draft"]["num_layers"] == 4
    assert data["num_layers"] == 4  # the target's own report is still there


def test_inspect_draft_mismatch_exits_2_with_every_reason(cli, pair):
    target, draft = pair
    edit_json(draft / "config.json", lambda c: c.update(vocab_size=640))
    edit_json(draft / "tokenizer_config.json", lambda c: c.update(bos_token="<|im_start|>"))
    proc = cli("inspect", str(target), "--draft", str(draft))
    assert proc.returncode == 2
    assert "refused: 2 difference(s)" in proc.stdout
    assert "✗ vocab_size differs: 512 in the target's config.json, 640 in the draft's" in proc.stdout
    assert "✗ bos token differs" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: draft {draft} cannot draft for {target}: vocab_size differs")
    assert f"(fix: {PAIR_FIX})" in lines[0]
    proc = cli("inspect", str(target), "--draft", str(draft), "--json")
    assert proc.returncode == 2
    data = json.loads(proc.stdout)  # one JSON object on stdout, the error line on stderr
    assert data["draft_pair"]["ok"] is False and len(data["draft_pair"]["problems"]) == 2
    assert proc.stderr.startswith("error: draft ")


def test_inspect_draft_of_a_missing_folder_is_a_usage_error(cli, pair, tmp_path):
    proc = cli("inspect", str(pair[0]), "--draft", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "not a folder and not a Hugging Face repo id" in proc.stderr
