"""``yitrt.hub`` against a test double of the Hugging Face Hub (tests/hub_double.py); no network beyond 127.0.0.1.

huggingface_hub reads HF_ENDPOINT/HF_HOME/HF_HUB_OFFLINE when it is imported, so every call runs in a fresh
``python -c`` subprocess with those variables set, as a user's shell would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_double import HubDouble
from yitrt.manifest import read_manifest
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO = "01-ai/Yi-tiny"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
#: What a fetch of the fixture repo must bring: config, generation config, shards, index, tokenizer files.
EXPECTED = {"config.json", "generation_config.json", SHARD1, SHARD2, INDEX, "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"}
#: What it must never ask for.
NEVER = ("pytorch_model.bin", "README.md", "modeling_yi.py", "original/consolidated.00.pth")

_RUNNER = r"""
import json, sys
from pathlib import Path
from yitrt import hub
from yitrt.errors import YitrtError

def run(args):
    call = args.pop("call")
    calls = []
    if args.pop("progress", False):
        args["progress"] = lambda done, total: calls.append([done, total])
    try:
        if call == "fetch":
            out = args.pop("out", None)
            result = hub.fetch_model(args.pop("repo_id"), out=Path(out) if out else None, **args).to_json()
        else:
            r = hub.resolve_model(args.pop("ref"), **args)
            result = {"path": str(r.path), "repo_id": r.repo_id, "revision": r.revision}
        return {"ok": result, "progress": calls}
    except YitrtError as exc:
        return {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}

print(json.dumps([run(args) for args in json.loads(sys.argv[1])]))
"""


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory) -> Path:
    """A Yi-shaped tiny model as uploaded to the Hub: 2 shards + index, tokenizer files, and things never fetched."""
    folder = write_synthetic_model(tmp_path_factory.mktemp("src") / "repo", SyntheticSpec(shards=2, layers=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05dummy sentencepiece")
    (folder / "pytorch_model.bin").write_bytes(b"decoy pickle: must never be requested")
    (folder / "README.md").write_text("# Yi tiny\n")
    (folder / "modeling_yi.py").write_text("raise SystemExit('remote code must never be fetched')\n")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.00.pth").write_bytes(b"another pickle")
    return folder


@pytest.fixture
def hub():
    with HubDouble() as double:
        yield double


def calls(hub: HubDouble, home: Path, batch: list[dict], *, token: str | None = None, offline: bool = False) -> list[dict]:
    """Run yitrt.hub calls, in order, in one subprocess pointed at the double; each answer is {"ok"} or {"error"}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()}
    env.update(hub.env(home, token=token, offline=offline))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(batch)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def call(hub: HubDouble, home: Path, *, token: str | None = None, offline: bool = False, **args) -> dict:
    """One call of :func:`calls`."""
    return calls(hub, home, [args], token=token, offline=offline)[0]


def no_partials(out: Path) -> bool:
    return not list(out.parent.glob(out.name + ".partial-*"))


def test_fetch_to_out_brings_only_safe_files_and_reuses(hub, source_repo, tmp_path):
    sha = hub.add_repo(REPO, source_repo)
    out = tmp_path / "yi"
    first = call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(out), progress=True)
    result = first["ok"]
    assert result["revision"] == sha and not result["reused"]
    assert set(result["files"]) == EXPECTED
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == EXPECTED | {"yitrt-manifest.json"}  # no huggingface_hub bookkeeping (.cache/) left in it
    for name in EXPECTED:
        assert (out / name).read_bytes() == (source_repo / name).read_bytes(), name
    for name in NEVER:
        assert not hub.requests_for(name), f"{name} was requested"
    assert hub.downloaded() == EXPECTED
    manifest = read_manifest(out)
    assert manifest.stage == "fetch" and manifest.inputs == {"commit": sha}
    assert manifest.parameters == {"repo_id": REPO, "revision": sha, "allow_pickle": False}
    assert {f["path"] for f in manifest.files} == EXPECTED
    total = sum((source_repo / n).stat().st_size for n in EXPECTED)
    assert result["bytes"] == total
    progress = first["progress"]
    assert progress[0] == [0, total] and progress[-1] == [total, total]
    assert any(0 < done < total for done, _ in progress), "no intermediate byte progress"
    assert no_partials(out)

    hub.clear_log()
    second = call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(out))["ok"]
    assert second["reused"] and second["revision"] == sha
    assert not hub.requests("resolve") and not hub.requests("cdn"), "a reused fetch downloaded files"


def test_allow_pickle_still_prefers_safetensors(hub, source_repo, tmp_path):
    hub.add_repo(REPO, source_repo)
    result = call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(tmp_path / "yi"), allow_pickle=True)["ok"]
    assert set(result["files"]) == EXPECTED
    assert not hub.requests_for("pytorch_model.bin")


def test_fetch_into_cache_then_offline(hub, source_repo, tmp_path):
    sha = hub.add_repo(REPO, source_repo)
    home, out = tmp_path / "hf", tmp_path / "yi"
    online, fetched = calls(hub, home, [{"call": "resolve", "ref": REPO}, {"call": "fetch", "repo_id": REPO, "out": str(out)}])
    snapshot = home / "hub" / "models--01-ai--Yi-tiny" / "snapshots" / sha
    assert online["ok"] == {"path": str(snapshot), "repo_id": REPO, "revision": sha}
    assert {p.name for p in snapshot.iterdir()} == EXPECTED
    assert fetched["ok"]["revision"] == sha

    hub.clear_log()
    offline, meta, reused, by_sha, missing = calls(hub, home, [
        {"call": "resolve", "ref": REPO},
        {"call": "resolve", "ref": REPO, "metadata_only": True},
        {"call": "fetch", "repo_id": REPO, "out": str(out)},
        {"call": "fetch", "repo_id": REPO, "revision": sha},
        {"call": "fetch", "repo_id": "01-ai/other", "out": str(tmp_path / "other")},
    ], offline=True)
    assert offline["ok"] == online["ok"]
    assert meta["ok"] == online["ok"]
    assert reused["ok"]["reused"] and reused["ok"]["revision"] == sha and reused["ok"]["path"] == str(out)
    assert by_sha["ok"]["path"] == str(snapshot) and by_sha["ok"]["reused"]
    assert missing["error"] == "HubError" and "HF_HUB_OFFLINE" in missing["message"]
    assert "HF_HUB_OFFLINE" in missing["hint"]
    assert not (tmp_path / "other").exists()
    assert hub.log == [], "offline mode made requests"


def test_metadata_only_downloads_no_weights(hub, source_repo, tmp_path):
    sha = hub.add_repo(REPO, source_repo)
    meta = call(hub, tmp_path / "hf", call="resolve", ref=REPO, metadata_only=True)["ok"]
    assert meta["revision"] == sha and meta["repo_id"] == REPO
    assert {p.name for p in Path(meta["path"]).iterdir()} == {
        "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", INDEX,
    }
    assert hub.downloaded() == {"config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", INDEX}
    # metadata in the cache is not a fetched model: offline, a full resolve says so instead of half-working
    offline = call(hub, tmp_path / "hf", offline=True, call="resolve", ref=REPO)
    assert offline.get("error") == "HubError" and "HF_HUB_OFFLINE" in offline["message"]


def test_metadata_with_tokenizer_brings_the_tokenizer_files_and_no_weights(hub, source_repo, tmp_path):
    # what `yitrt inspect TARGET --draft DRAFT` resolves: enough to compare two tokenizers, no weights
    hub.add_repo(REPO, source_repo)
    meta = call(hub, tmp_path / "hf", call="resolve", ref=REPO, metadata_only=True, tokenizer=True)["ok"]
    assert {p.name for p in Path(meta["path"]).iterdir()} == {
        "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", INDEX, "tokenizer.model",
    }
    assert not any(name.endswith((".safetensors", ".bin", ".pth")) for name in hub.downloaded())


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        ("hidden", "CheckpointError", "missing"),  # index names a shard the repo does not have
        ("unavailable", "HubError", "cannot serve"),  # listed, but the Hub answers 404
        ("corrupt", "HubError", "sha256"),  # bytes changed in transit, same length
        ("truncated", "CheckpointError", "truncated"),  # uploaded truncated (listing agrees with the bytes)
    ],
)
def test_broken_repo_leaves_no_artifact(hub, source_repo, tmp_path, damage, error, words):
    folder = tmp_path / "repo"
    shutil.copytree(source_repo, folder)
    if damage == "truncated":
        data = (folder / SHARD2).read_bytes()
        (folder / SHARD2).write_bytes(data[: len(data) // 2])
        hub.add_repo(REPO, folder)
    else:
        hub.add_repo(REPO, folder, **{damage: (SHARD2,)})
    out = tmp_path / "yi"
    answer = call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(out))
    assert answer.get("error") == error, answer
    assert words in answer["message"].lower() and "\n" not in answer["message"]
    assert answer["hint"]
    assert not out.exists() and no_partials(out)


def test_failed_refetch_keeps_previous_artifact(hub, source_repo, tmp_path):
    hub.add_repo(REPO, source_repo)
    out = tmp_path / "yi"
    call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(out))
    before = read_manifest(out)
    hub.add_repo(REPO, source_repo, corrupt=(SHARD1,))  # same commit, now served damaged
    answer = call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(out), force=True)
    assert answer.get("error") == "HubError"
    assert read_manifest(out) == before and no_partials(out)


def test_unknown_repo_revision_and_ref(hub, source_repo, tmp_path):
    hub.add_repo(REPO, source_repo)
    unknown, bad_rev, usage = calls(hub, tmp_path / "hf", [
        {"call": "fetch", "repo_id": "01-ai/nope", "out": str(tmp_path / "x")},
        {"call": "fetch", "repo_id": REPO, "revision": "v9"},
        {"call": "resolve", "ref": "no/such/folder"},
    ])
    assert unknown["error"] == "HubError" and "01-ai/nope" in unknown["message"]
    assert "repo id" in unknown["hint"] and "HF_TOKEN" in unknown["hint"]
    assert bad_rev["error"] == "HubError" and "v9" in bad_rev["message"] and "--revision" in bad_rev["hint"]
    assert usage["error"] == "UsageError" and "not a folder and not a Hugging Face repo id" in usage["message"]
    assert not hub.requests("resolve") and not (tmp_path / "x").exists()


def test_gated_repo_needs_token(hub, source_repo, tmp_path):
    sha = hub.add_repo(REPO, source_repo, gated=True)
    hub.tokens.add("hf_good")
    out = tmp_path / "yi"
    refused = call(hub, tmp_path / "hf", call="fetch", repo_id=REPO, out=str(out))
    assert refused["error"] == "HubError" and "gated" in refused["message"] and "no Hugging Face token" in refused["message"]
    assert "HF_TOKEN" in refused["hint"] and "licence" in refused["hint"]
    assert not out.exists() and no_partials(out)
    wrong = call(hub, tmp_path / "hf", token="hf_bad", call="fetch", repo_id=REPO, out=str(out))
    assert wrong["error"] == "HubError" and "not been granted" in wrong["message"]
    ok = call(hub, tmp_path / "hf", token="hf_good", call="fetch", repo_id=REPO, out=str(out))["ok"]
    assert ok["revision"] == sha and set(ok["files"]) == EXPECTED
    # the token goes to the Hub, never to the CDN the large files redirect to
    assert all(r.authorized for r in hub.requests("resolve") if r.status in (200, 302))
    assert not any(r.authorized for r in hub.requests("cdn"))


def test_pickle_only_repo(hub, tmp_path):
    import torch

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"model.norm.weight": torch.ones(8)}, folder / "pytorch_model.bin")
    hub.add_repo(REPO, folder)
    out = tmp_path / "yi"
    refused, allowed = calls(hub, tmp_path / "hf", [
        {"call": "fetch", "repo_id": REPO, "out": str(out)},
        {"call": "fetch", "repo_id": REPO, "out": str(out), "allow_pickle": True},
    ])
    assert refused["error"] == "CheckpointError" and "pickle" in refused["message"]
    assert "--allow-pickle" in refused["hint"]
    # the refusal came from the listing alone: the only file requests are those of the allowed fetch after it
    first_file_request = next(i for i, r in enumerate(hub.log) if r.kind in ("resolve", "cdn"))
    assert [r.kind for r in hub.log[:first_file_request]] == ["info", "info", "tree"]
    allowed = allowed["ok"]
    assert allowed["files"] == ["config.json", "pytorch_model.bin"]
    assert read_manifest(out).parameters["allow_pickle"] is True and no_partials(out)


def test_cli_inspect_fetch_and_convert_by_repo_id(hub, source_repo, tmp_path):
    """The user's path: repo ids on the command line, through the real CLI process, against the Hub double."""
    hub.add_repo(REPO, source_repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()}
    env.update(hub.env(tmp_path / "hf"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "yitrt", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    inspected = cli("inspect", REPO, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["valid_tp"] == [1, 2, 4, 8]
    assert not hub.downloaded() & {SHARD1, SHARD2}  # inspect reads metadata only

    fetched = cli("fetch", REPO, "--out", str(tmp_path / "yi"), "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert set(json.loads(fetched.stdout)["files"]) >= {SHARD1, SHARD2, INDEX}

    converted = cli("convert", REPO, "--tp", "2", "--out", str(tmp_path / "ckpt"), "--json")
    assert converted.returncode == 0, converted.stderr
    assert json.loads(converted.stdout)["world_size"] == 2
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest.parameters["model_ref"] == REPO

    missing = cli("convert", "01-ai/does-not-exist", "--out", str(tmp_path / "none"))
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()
