"""yitrt.hub pieces that need no Hub: file selection, repo-id rules, local folders, error mapping."""

from __future__ import annotations

import json

import pytest

from yitrt import hub
from yitrt.errors import CheckpointError, HubError, UsageError

REPO_FILES = [
    ".gitattributes", "README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer_config.json",
    "tokenization_yi.py", "modeling_yi.py", "original/model.safetensors", "chat_template.jinja",
]


def test_select_prefers_safetensors_even_with_allow_pickle():
    expected = [
        "chat_template.jinja", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json",
    ]
    assert hub.select_files(REPO_FILES) == expected
    assert hub.select_files(REPO_FILES, allow_pickle=True) == expected


def test_select_pickles_only_when_allowed_and_no_safetensors():
    names = [n for n in REPO_FILES if not n.endswith((".safetensors", "safetensors.index.json"))]
    assert hub.select_files(names) == ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"]
    assert "pytorch_model-00001-of-00002.bin" in hub.select_files(names, allow_pickle=True)
    assert "pytorch_model.bin.index.json" in hub.select_files(names, allow_pickle=True)


def test_plan_refuses_pickle_only_and_weightless_repos():
    with pytest.raises(CheckpointError, match="pickle") as info:
        hub._plan_files("o/n", "a" * 40, ["config.json", "pytorch_model.bin"], allow_pickle=False)
    assert "--allow-pickle" in info.value.hint
    with pytest.raises(CheckpointError, match="no weights"):
        hub._plan_files("o/n", "a" * 40, ["config.json", "README.md"], allow_pickle=True)
    with pytest.raises(CheckpointError, match="no config.json"):
        hub._plan_files("o/n", "a" * 40, ["model.safetensors"], allow_pickle=False)


@pytest.mark.parametrize("ref", ["01-ai/Yi-1.5-6B-Chat", "a/b", "user_1/model.v2"])
def test_repo_ids(ref):
    assert hub.is_repo_id(ref)


@pytest.mark.parametrize("ref", ["/abs/path", "./rel/x", "a/b/c", "noslash", "a--b/c", "a/b..c", "-a/b", "a/ b"])
def test_not_repo_ids(ref):
    assert not hub.is_repo_id(ref)


def test_resolve_local_folder_and_fetch_manifest(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert hub.resolve_model(str(plain)) == hub.ResolvedModel(plain, None, None)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / "yitrt-manifest.json").write_text(json.dumps({
        "stage": "fetch", "key": "k", "parameters": {"repo_id": "01-ai/Yi-6B", "revision": "b" * 40, "allow_pickle": False},
    }))
    assert hub.resolve_model(str(fetched)) == hub.ResolvedModel(fetched, "01-ai/Yi-6B", "b" * 40)


def test_resolve_rejects_what_is_neither(tmp_path):
    with pytest.raises(UsageError, match="not a folder and not a Hugging Face repo id"):
        hub.resolve_model(str(tmp_path / "missing" / "deeper" / "x"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        hub.resolve_model(str(tmp_path / "file.txt"))
    with pytest.raises(UsageError, match="not a Hugging Face repo id"):
        hub.fetch_model("not a repo")


def test_unknown_exceptions_are_not_mapped():
    assert hub.map_hub_error(ValueError("bug"), "o/n") is None
    mapped = hub.map_hub_error(OSError("Consistency check failed: file should be of size 3 but has size 2"), "o/n")
    assert isinstance(mapped, HubError) and "incomplete" in mapped.message
