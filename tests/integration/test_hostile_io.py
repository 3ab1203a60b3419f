"""Hostile input and a hostile environment, class by class (issue #17 items 3-5 and stale partials of item 6).

Each case asserts a clean refusal (tests/hostile.py: exit code, exactly one stderr line, no traceback, the output's
parent folder unchanged and earlier artifacts byte-identical), or, for the repair cases, that the folder ends up
exactly as it was before a killed writer touched it. Disk-full and read-only destinations are real mounts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli
from tests.hostile import assert_refused, read_only, small_disk, tree
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

NOT_UTF8 = b'{"a": "caf\xe9"}\n'  # Latin-1, as an editor on another system may save it


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Yi-shaped model with a tokenizer (read only by the tests)."""
    return write_synthetic_model(tmp_path_factory.mktemp("hostile") / "hf", SyntheticSpec(tokenizer=True, layers=1))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    from yitrt.checkpoint.convert import ConvertRequest, convert

    out = tmp_path_factory.mktemp("hostile-ckpt") / "ckpt"
    convert(ConvertRequest(model, out))
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- item 3: every OS-level failure is a user error -------------------------------------------------------------------


def test_disk_full_for_a_fresh_output(cli, model, tmp_path):
    with small_disk(tmp_path, "256k") as disk:
        before = tree(disk)
        result = cli("convert", str(model), "--out", str(disk / "ckpt"))
        assert_refused(result, parent=disk, before=before, code=7, says="no space left")


def test_disk_full_while_replacing_keeps_the_previous_artifact(cli, model, checkpoint, tmp_path):
    size = folder_bytes(checkpoint)
    with small_disk(tmp_path, f"{size * 3 // 2 // 1024}k") as disk:  # room for one copy, not two
        out = disk / "ckpt"
        assert cli("convert", str(model), "--out", str(out)).returncode == 0
        before = tree(disk)
        result = cli("convert", str(model), "--out", str(out), "--force")
        assert_refused(result, parent=disk, before=before, code=7, says="no space left")


def test_read_only_destination_fresh_and_replacing(cli, model, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    assert cli("convert", str(model), "--out", str(dest / "old")).returncode == 0
    with read_only(dest):
        before = tree(dest)
        assert_refused(cli("convert", str(model), "--out", str(dest / "new")), parent=dest, before=before, code=7, says="read-only")
        assert_refused(cli("convert", str(model), "--out", str(dest / "old"), "--force"), parent=dest, before=before, code=7)
        assert_refused(cli("convert", str(model), "--out", str(dest / "a" / "b" / "new")), parent=dest, before=before, code=7)
        # a run's work folder and a file written outside any artifact (the CLI's last resort maps the OSError)
        assert_refused(cli("run", "demo", "--work-dir", str(dest / "work")), parent=dest, before=before, code=7)
        assert_refused(cli("recipe", "new", str(dest / "mine.yaml")), parent=dest, before=before, code=7)


@pytest.mark.parametrize("below", ["ckpt", "sub/ckpt"])
def test_parent_that_is_a_file(cli, model, tmp_path, below):
    (tmp_path / "afile").write_text("not a folder")
    before = tree(tmp_path)
    result = cli("convert", str(model), "--out", str(tmp_path / "afile" / below))
    assert_refused(result, parent=tmp_path, before=before, code=7, says="is a file")


@pytest.mark.parametrize("length", [300, 250])  # 250 fits NAME_MAX, its ".partial-<pid>" sibling does not
def test_name_too_long(cli, model, tmp_path, length):
    before = tree(tmp_path)
    result = cli("convert", str(model), "--out", str(tmp_path / "new" / ("x" * length)))
    assert_refused(result, parent=tmp_path, before=before, code=7, says="too long")


def test_output_that_is_a_symbolic_link_is_refused(cli, model, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    before = tree(tmp_path)
    assert_refused(cli("convert", str(model), "--out", str(tmp_path / "link")), parent=tmp_path, before=before, code=7,
                   says="symbolic link")


def test_fetch_to_a_full_disk(tmp_path):
    """fetch --out on a full disk through the real process and huggingface_hub (its disk-space warnings silenced)."""
    from tests.hub_double import HubDouble

    source = write_synthetic_model(tmp_path / "src", SyntheticSpec(layers=1, shards=2))
    with HubDouble() as hub, small_disk(tmp_path, "256k") as disk:
        hub.add_repo("o/tiny", source)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(hub.env(tmp_path / "hf-home"))
        before = tree(disk)
        assert_refused(run_cli("fetch", "o/tiny", "--out", str(disk / "model"), env=env), parent=disk, before=before, code=7,
                       says="no space left")


def _not_utf8_cases(model: Path, checkpoint: Path, tmp: Path) -> list[tuple[str, list[str], int]]:
    bad_model = tmp / "bad-model"
    bad_model.mkdir()
    (bad_model / "config.json").write_bytes(NOT_UTF8)
    for name, suffix in (("prompts", ".txt"), ("calib", ".jsonl"), ("data", ".jsonl"), ("recipe", ".yaml"), ("profile", ".yaml"),
                         ("eval", ".txt")):
        (tmp / f"{name}{suffix}").write_bytes(b"caf\xe9\n")
    return [
        ("config.json (inspect)", ["inspect", str(bad_model)], 5),
        ("config.json (convert)", ["convert", str(bad_model), "--out", str(tmp / "out")], 5),
        ("prompts", ["verify", str(checkpoint), "--against", str(model), "--prompts", str(tmp / "prompts.txt")], 2),
        ("evaluation text", ["verify", str(checkpoint), "--against", str(model), "--eval-text", str(tmp / "eval.txt")], 2),
        ("calibration data", ["quantize", str(model), "--scheme", "fp8", "--out", str(tmp / "out"), "--device", "cpu",
                              "--calib", str(tmp / "calib.jsonl")], 2),
        ("dataset", ["bench", "localhost:1", "--dataset", str(tmp / "data.jsonl"), "--out", str(tmp / "out")], 2),
        ("recipe", ["recipe", "validate", str(tmp / "recipe.yaml")], 2),
        ("recipe (run)", ["run", str(tmp / "recipe.yaml"), "--work-dir", str(tmp / "work")], 2),
        ("plugin profile", ["recipe", "validate", "demo", "--set", f"build.plugins={tmp / 'profile.yaml'}"], 3),
    ]


def test_user_files_that_are_not_utf8(cli, model, checkpoint, tmp_path):
    cases = _not_utf8_cases(model, checkpoint, tmp_path)
    before = tree(tmp_path)
    for what, args, code in cases:
        result = cli(*args)
        line = assert_refused(result, parent=tmp_path, before=before, code=code)
        assert "UTF-8" in line, (what, line)


def test_user_files_that_are_not_regular_files(cli, model, checkpoint, tmp_path):
    folder = tmp_path / "m"
    (folder / "config.json").mkdir(parents=True)  # a folder where config.json should be
    fifo_model = tmp_path / "f"
    fifo_model.mkdir()
    os.mkfifo(fifo_model / "config.json")  # reading it would block forever
    os.mkfifo(tmp_path / "prompts.txt")
    (tmp_path / "array").mkdir()
    (tmp_path / "array" / "config.json").write_text("[1, 2]")  # valid JSON of the wrong shape
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "model.safetensors.index.json").write_text('{"weight_map": "nope"}')
    before = tree(tmp_path)
    assert_refused(cli("inspect", str(folder)), parent=tmp_path, before=before, code=5, says="is a folder")
    assert_refused(cli("inspect", str(fifo_model)), parent=tmp_path, before=before, code=5, says="FIFO")
    assert_refused(cli("verify", str(checkpoint), "--against", str(model), "--prompts", str(tmp_path / "prompts.txt")),
                   parent=tmp_path, before=before, code=2, says="FIFO")
    assert_refused(cli("inspect", str(tmp_path / "array")), parent=tmp_path, before=before, code=5, says="not an object")
    assert_refused(cli("verify", str(checkpoint), "--against", str(model), "--prompts", str(tmp_path / "missing.txt")),
                   parent=tmp_path, before=before, code=2, says="does not exist")


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999999999"])
def test_ports_out_of_range(cli, tmp_path, port):
    before = tree(tmp_path)
    assert_refused(cli("serve", str(tmp_path), "--http-port", port), parent=tmp_path, before=before, code=2)
    assert_refused(cli("serve", str(tmp_path), "--metrics-port", port), parent=tmp_path, before=before, code=2)
    assert_refused(cli("chat", f"localhost:{port}", "hi"), parent=tmp_path, before=before, code=2)
    assert_refused(cli("bench", f"localhost:{port}", "--out", str(tmp_path / "b")), parent=tmp_path, before=before, code=2)


def test_the_same_port_twice_and_urls_without_a_port(cli, tmp_path):
    before = tree(tmp_path)
    assert_refused(cli("serve", str(tmp_path), "--http-port", "8001"), parent=tmp_path, before=before, code=2, says="both 8001")
    for url in ("localhost", "grpc://localhost:8001", "localhost:80/v2", ""):
        assert_refused(cli("chat", url, "hi"), parent=tmp_path, before=before, code=2, says="HOST:PORT")


# -- item 4: recipes cannot exhaust memory ----------------------------------------------------------------------------

_BOMB = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))  # 10**10 strings when expanded
_YAML_CASES = {
    "alias bomb": (_BOMB, "alias bomb"),
    "deep nesting": ("name: x\nmodel: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper"),
    "duplicate keys": ("name: x\nparallelism:\n  tp: 1\n  tp: 8\n", "given twice"),
    "several documents": ("name: x\n---\nname: y\n", "several YAML documents"),
    "python tag": ("name: !!python/object/apply:os.system ['touch /tmp/yitrt-pwned']\n", "tag"),
    "recursive alias": ("name: &n [*n]\n", "recursive"),
    "huge integer": ("parallelism:\n  tp: " + "9" * 5000 + "\n", "digits"),
    "not a mapping": ("- name: x\n", "not a mapping"),
    "unprintable character": ("name: x\x00\n", "not allowed"),
}


@pytest.mark.parametrize("case", sorted(_YAML_CASES))
def test_hostile_recipes_are_refused_in_one_line(cli, tmp_path, case):
    text, says = _YAML_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    before = tree(tmp_path)
    for args in (["recipe", "validate", str(recipe)], ["recipe", "plan", str(recipe)], ["recipe", "show", str(recipe)],
                 ["run", str(recipe), "--work-dir", str(tmp_path / "work")]):
        assert_refused(cli(*args), parent=tmp_path, before=before, code=3, says=says)
    assert not Path("/tmp/yitrt-pwned").exists()


def test_set_values_go_through_the_same_loader(cli, tmp_path):
    before = tree(tmp_path)
    assert_refused(cli("recipe", "validate", "demo", "--set", "serve=*x"), parent=tmp_path, before=before, code=2, says="alias")
    assert_refused(cli("recipe", "validate", "demo", "--set", "build.max_batch_size=" + "[" * 5000), parent=tmp_path,
                   before=before, code=2)
    assert_refused(cli("recipe", "validate", "demo", "--set", "serve.kv_fraction=.nan"), parent=tmp_path, before=before, code=3)


def test_anchors_within_the_budget_still_work(tmp_path):
    """Anchors are allowed (merge keys are a normal way to share settings): only their expansion is bounded."""
    from yitrt.recipe import load_recipe

    recipe = tmp_path / "shared.yaml"
    recipe.write_text("name: shared\nmodel: {demo: true}\ntarget: &t {gpu: L4, engine: reference}\n"
                      "precision: {scheme: none}\nparallelism: {tp: 1}\n"
                      "verify: &v {enabled: false, device: cpu}\nserve:\n  smoke: {enabled: false}\n")
    loaded = load_recipe(recipe, check_model=False)
    assert loaded.spec.target.engine == "reference" and loaded.spec.verify.enabled is False


# -- item 5: no path escapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "/abs/x", ".", "..", "a/b", "x" * 200, "ensemble", "Preprocessing", "a\nb"])
def test_model_names_that_would_leave_the_repository(cli, checkpoint, tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path)
    result = cli("deploy", str(checkpoint), "--engine", "reference", "--out", str(work / "repo"), "--model-name", name)
    assert_refused(result, parent=tmp_path, before=before, code=2)
    assert not Path("/abs/x").exists()


def test_recipe_names_that_become_folders(cli, tmp_path):
    before = tree(tmp_path)
    for name, model_name in (("../escape", "../../x"), ("n" * 300, "/abs")):  # every problem is reported at once
        line = assert_refused(cli("run", "demo", "--set", f"name={name}", "--set", f"serve.model_name={model_name}",
                                  "--work-dir", str(tmp_path / "w")), parent=tmp_path, before=before, code=3)
        assert line.count("not a valid name") == 2, line


def _tokenizer_copy(model: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        (folder / name).write_bytes((model / name).read_bytes())
    return folder


def test_tokenizer_symlink_pointing_outside_is_refused(cli, model, checkpoint, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("api key")
    tok = _tokenizer_copy(model, tmp_path / "tok")
    (tok / "special_tokens_map.json").symlink_to(secret)
    before = tree(tmp_path)
    result = cli("deploy", str(checkpoint), "--engine", "reference", "--out", str(tmp_path / "repo"), "--tokenizer", str(tok))
    line = assert_refused(result, parent=tmp_path, before=before, code=2, says="special_tokens_map.json")
    assert "outside" in line
    (tok / "special_tokens_map.json").unlink()
    (tok / "vocab.json").symlink_to(tmp_path / "gone")  # dangling
    assert_refused(cli("deploy", str(checkpoint), "--engine", "reference", "--out", str(tmp_path / "repo"), "--tokenizer", str(tok)),
                   parent=tmp_path, before=tree(tmp_path), code=2, says="vocab.json")


def test_hugging_face_cache_snapshot_of_symlinks_deploys(cli, model, checkpoint, tmp_path):
    """The HF cache layout (models--o--n/snapshots/<sha>/file → ../../blobs/<hash>) is the normal case: it works, and
    the repository gets the files' bytes, never links."""
    import hashlib

    repo_dir = tmp_path / "hub" / "models--o--n"
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        data = (model / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    out = tmp_path / "repo"
    result = cli("deploy", str(checkpoint), "--engine", "reference", "--out", str(out), "--tokenizer", str(snapshot))
    assert result.returncode == 0, result.stderr
    copied = out / "preprocessing" / "tokenizer" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == (model / "tokenizer.json").read_bytes()
    # a link out of the snapshot into another repo's blobs is not the cache layout: refused
    other = tmp_path / "hub" / "models--x--y" / "blobs"
    other.mkdir(parents=True)
    (other / "b").write_text("{}")
    (snapshot / "special_tokens_map.json").symlink_to(other / "b")
    before = tree(tmp_path)
    assert_refused(cli("deploy", str(checkpoint), "--engine", "reference", "--out", str(tmp_path / "repo2"), "--tokenizer", str(snapshot)),
                   parent=tmp_path, before=before, code=2, says="outside")


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors"])
def test_index_naming_files_outside_the_folder(cli, model, tmp_path, entry):
    folder = tmp_path / "m"
    folder.mkdir()
    for p in model.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": entry}}))
    before = tree(tmp_path)
    assert_refused(cli("convert", str(folder), "--out", str(tmp_path / "out")), parent=tmp_path, before=before, code=5, says="of this folder")


def test_a_pickle_that_would_run_code_is_refused_in_one_line(cli, model, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((model / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"model.embed_tokens.weight": Evil()}}, "{folder / 'pytorch_model.bin'}")
    """)], check=True, cwd=REPO_ROOT)
    before = tree(tmp_path)
    line = assert_refused(cli("convert", str(folder), "--out", str(tmp_path / "out"), "--allow-pickle"), parent=tmp_path,
                          before=before, code=5, says="cannot be loaded safely")
    assert "GLOBAL" in line and not marker.exists()


# -- item 6 (stale partials): what killed writers leave is repaired on every path --------------------------------------

_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from yitrt import manifest

out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "publish":  # the file system cannot exchange: die between "move the old one aside" and "move the new one in"
    manifest._exchange = lambda a, b: False
    real_rename = os.rename
    def rename(src, dst):
        if str(src) == str(out):
            real_rename(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
    os.rename = rename
with manifest.ArtifactWriter(out, "convert", {"other": "parameters"}, {}) as art:
    (art.path / "half-written").write_bytes(b"x" * 1000)
    if mode == "write":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_a_writer(out: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out), mode], cwd=REPO_ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_stale_partial_of_a_killed_writer_is_removed_on_a_cache_hit(cli, model, tmp_path):
    out = tmp_path / "ckpt"
    assert cli("convert", str(model), "--out", str(out)).returncode == 0
    clean = tree(tmp_path)
    _kill_a_writer(out, "write")  # a real process, SIGKILLed while its partial folder was half-written
    (tmp_path / "ckpt.partial-1").mkdir()  # PID 1 is alive, but holds no lock on it: stale all the same
    assert len(list(tmp_path.glob("ckpt.partial-*"))) == 2
    hit = cli("convert", str(model), "--out", str(out))
    assert hit.returncode == 0 and "up to date" in hit.stdout
    assert tree(tmp_path) == clean


def test_a_live_writers_partial_is_left_alone(cli, model, tmp_path):
    import fcntl

    out = tmp_path / "ckpt"
    assert cli("convert", str(model), "--out", str(out)).returncode == 0
    live = tmp_path / "ckpt.partial-999999"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running writer holds
    try:
        assert cli("convert", str(model), "--out", str(out)).returncode == 0
        assert live.is_dir()
    finally:
        os.close(fd)


def test_a_replacement_killed_between_its_renames_is_restored(cli, model, tmp_path):
    out = tmp_path / "ckpt"
    assert cli("convert", str(model), "--out", str(out)).returncode == 0
    clean = tree(tmp_path)
    _kill_a_writer(out, "publish")
    assert not out.exists() and list(tmp_path.glob("ckpt.old-*"))  # the previous artifact is only in .old-<pid>
    hit = cli("convert", str(model), "--out", str(out))  # the same inputs: the restored artifact is a cache hit
    assert hit.returncode == 0 and "up to date" in hit.stdout
    assert tree(tmp_path) == clean


def test_a_failed_swap_puts_the_old_artifact_back(model, tmp_path, monkeypatch):
    """Without an atomic exchange, a failure of the second rename moves the old artifact back (never no ``out``)."""
    from yitrt import manifest
    from yitrt.checkpoint.convert import ConvertRequest, convert

    out = tmp_path / "ckpt"
    convert(ConvertRequest(model, out))
    clean = tree(tmp_path)
    monkeypatch.setattr(manifest, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):
            raise KeyboardInterrupt  # Ctrl-C at the worst moment
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertRequest(model, out, force=True))
    assert tree(tmp_path) == clean
    monkeypatch.setattr(os, "rename", real_rename)
    convert(ConvertRequest(model, out, dtype="float16", force=True))  # the two-rename path itself works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_killed_replacement_is_repaired_for_a_cached_run_stage(tmp_path):
    """`yitrt run` skips a cached stage without calling it; the repair happens there too."""
    from yitrt.manifest import ArtifactWriter, settle_output
    from yitrt.pipeline import RunOptions, _Run
    from yitrt.recipe import load_recipe

    artifact = tmp_path / "work" / "checkpoint"
    with ArtifactWriter(artifact, "convert", {}, {}) as art:
        (art.path / "f").write_text("previous")
    os.rename(artifact, tmp_path / "work" / "checkpoint.old-999999")
    run = _Run(load_recipe("demo", check_model=False), RunOptions(work_dir=tmp_path / "work"))
    assert run._intact({"artifact": str(artifact), "digest": "x"}) is False  # the digest differs, but the folder is back
    assert (artifact / "f").read_text() == "previous" and not list((tmp_path / "work").glob("*.old-*"))
    settle_output(artifact)  # idempotent


def test_folders_beside_the_output_that_are_not_yitrts_are_never_touched(cli, model, tmp_path):
    """Only ``.partial-<pid>`` folders and ``.old-<pid>`` artifacts are repaired: a user's backup named like them stays."""
    for name in ("ckpt.old-backup", "ckpt.old-123", "ckpt.partial-mine"):  # .old-123 holds no yitrt manifest
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep").write_text("the user's")
    before = tree(tmp_path)
    assert cli("convert", str(model), "--out", str(tmp_path / "ckpt")).returncode == 0
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("ckpt/") and k != "ckpt"} == before
