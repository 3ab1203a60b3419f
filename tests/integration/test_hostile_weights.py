"""Hostile weights and configs (issue #17, items 1 and 2): lying safetensors headers, NaN/Inf weights, impossible
config values and verdicts over numbers that cannot be right.

Every refusal is clean (tests/hostile.py): an exit code that is not 0 or 70, exactly one stderr line, no traceback,
nothing left in the output's parent folder, earlier artifacts byte-identical. Lies are written by hand
(tests/safetensors_lies.py) into copies of one tiny synthetic model; commands run in-process (the ``cli`` fixture)
except fetch, whose Hub double needs a fresh process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests.hostile import assert_refused, tree
from tests.hub_double import HubDouble
from tests.safetensors_lies import LIES, lie
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration

CHECKPOINT_ERROR = 5
VERIFY_FAILED = 10
WEIGHTS = "model.safetensors"
#: a tiny model small enough to convert, quantize and verify in a second or two
SPEC = SyntheticSpec(layers=1, tokenizer=True, head_std=0.25, seed=5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("hostile-weights") / "hf", SPEC)


@pytest.fixture(scope="module")
def good_ckpt(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "ckpt"
    convert(ConvertRequest(base, out))
    return out


@pytest.fixture
def model(base, tmp_path) -> Path:
    """A fresh copy of the tiny model to damage."""
    return Path(shutil.copytree(base, tmp_path / "src" / "hf"))


def _set(model: Path, name: str, index: tuple[int, ...], value: float) -> None:
    tensors = load_file(str(model / WEIGHTS))
    tensors[name][index] = value
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})


def _line_names(line: str, tensor: str | None, file: Path) -> None:
    assert str(file) in line, line
    if tensor is not None:
        assert tensor in line, line


# ---- item 1: lying headers, through every path that opens weights ---------------------------------------------

@pytest.mark.parametrize("kind", sorted(LIES))
def test_convert_refuses_a_lying_header(cli, model, tmp_path, kind):
    tensor, says = lie(model / WEIGHTS, kind)
    parent = tmp_path / "out"
    parent.mkdir()
    before = tree(parent)
    line = assert_refused(cli("convert", str(model), "--out", str(parent / "ckpt")), parent=parent, before=before,
                          code=CHECKPOINT_ERROR, says=says)
    _line_names(line, tensor, model / WEIGHTS)


@pytest.mark.parametrize("kind", sorted(LIES))
def test_verify_against_refuses_a_lying_original(cli, model, good_ckpt, kind):
    tensor, says = lie(model / WEIGHTS, kind)
    before = tree(good_ckpt.parent)
    line = assert_refused(cli("verify", str(good_ckpt), "--against", str(model), "--device", "cpu"), parent=good_ckpt.parent,
                          before=before, code=CHECKPOINT_ERROR, says=says)
    _line_names(line, tensor, model / WEIGHTS)


@pytest.mark.parametrize("kind", ["overlap", "negative_offset", "not_utf8", "json_array", "duplicate_key", "length_beyond_file"])
def test_inspect_and_quantize_refuse_a_lying_header(cli, model, tmp_path, kind):
    tensor, says = lie(model / WEIGHTS, kind)
    line = assert_refused(cli("inspect", str(model)), code=CHECKPOINT_ERROR, says=says)
    _line_names(line, tensor, model / WEIGHTS)
    parent = tmp_path / "q"
    parent.mkdir()
    before = tree(parent)
    pytest.importorskip("modelopt.torch.quantization")
    line = assert_refused(cli("quantize", str(model), "--scheme", "fp8", "--device", "cpu", "--out", str(parent / "ckpt")),
                          parent=parent, before=before, code=CHECKPOINT_ERROR, says=says)
    _line_names(line, tensor, model / WEIGHTS)


def test_a_lying_source_leaves_the_previous_artifact_byte_identical(cli, model, good_ckpt, tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    shutil.copytree(good_ckpt, parent / "ckpt")
    lie(model / WEIGHTS, "overlap")
    before = tree(parent)
    assert_refused(cli("convert", str(model), "--out", str(parent / "ckpt"), "--force"), parent=parent, before=before,
                   code=CHECKPOINT_ERROR, says="overlap")


@pytest.mark.parametrize("kind", ["overlap", "trailing_bytes", "wrong_byte_count"])
def test_lying_rank_file_is_refused_by_verify_generate_and_deploy(cli, good_ckpt, base, tmp_path, kind):
    ckpt = Path(shutil.copytree(good_ckpt, tmp_path / "ckpt"))
    tensor, says = lie(ckpt / "rank0.safetensors", kind)
    before = tree(tmp_path)
    for args in (("verify", str(ckpt), "--against", str(base), "--device", "cpu"),
                 ("generate", str(ckpt), "-p", "hello", "--tokenizer", str(base), "--device", "cpu"),
                 ("deploy", str(ckpt), "--engine", "reference", "--tokenizer", str(base), "--out", str(tmp_path / "repo"))):
        line = assert_refused(cli(*args), parent=tmp_path, before=before, code=CHECKPOINT_ERROR, says=says)
        _line_names(line, tensor, ckpt / "rank0.safetensors")


@pytest.mark.parametrize("damage", ["shard_header", "index_escapes", "index_not_an_object"])
def test_fetch_refuses_lying_shards_and_indexes(base, tmp_path, damage):
    repo = Path(shutil.copytree(base, tmp_path / "repo"))
    weights = load_file(str(repo / WEIGHTS))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    (repo / WEIGHTS).unlink()
    for file, members in shards.items():
        save_file({n: weights[n] for n in members}, str(repo / file), metadata={"format": "pt"})
    weight_map = {n: f for f, members in shards.items() for n in members}
    if damage == "shard_header":
        lie(repo / "model-00002-of-00002.safetensors", "overlap")
    if damage == "index_escapes":
        weight_map[names[0]] = "../model-00001-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": weight_map if damage != "index_not_an_object" else list(weight_map)}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    says = {"shard_header": "overlap", "index_escapes": "not a *.safetensors file of this folder", "index_not_an_object": "weight_map"}[damage]
    parent = tmp_path / "fetched"
    parent.mkdir()
    with HubDouble() as hub:
        hub.add_repo("01-ai/Yi-lies", repo)
        before = tree(parent)
        result = run_cli("fetch", "01-ai/Yi-lies", "--out", str(parent / "yi"), env=hub.env(tmp_path / "hf-home"))
    assert_refused(result, parent=parent, before=before, code=CHECKPOINT_ERROR, says=says)


# ---- item 2: NaN/Inf weights ----------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
#: (what, tensor, index, value, extra convert options, words of the refusal): the bytes go through every mover —
#: a kernel copy (bf16 → bf16), preadv column blocks (a row-parallel weight at tp 2), a cast, FP8's clamp
NONFINITE = [
    ("nan-copied", Q, (3, 5), math.nan, [], "holds NaN or Inf"),
    ("inf-copied-row-parallel", O_PROJ, (7, 200), math.inf, ["--tp", "2"], "holds NaN or Inf"),
    ("nan-cast", Q, (0, 0), math.nan, ["--dtype", "float16"], "holds NaN or Inf"),
    ("inf-cast", "model.norm.weight", (9,), -math.inf, ["--dtype", "float16"], "holds NaN or Inf"),
    ("overflow-cast", Q, (1, 1), 1e6, ["--dtype", "float16"], "become Inf in float16"),
]


@pytest.mark.parametrize("what, tensor, index, value, options, says", NONFINITE, ids=[c[0] for c in NONFINITE])
def test_convert_refuses_nonfinite_weights_unless_allowed(cli, model, tmp_path, what, tensor, index, value, options, says):
    _set(model, tensor, index, value)
    parent = tmp_path / "out"
    parent.mkdir()
    before = tree(parent)
    line = assert_refused(cli("convert", str(model), "--out", str(parent / "ckpt"), *options), parent=parent, before=before,
                          code=CHECKPOINT_ERROR, says=says)
    _line_names(line, tensor, model / WEIGHTS)
    kept = cli("convert", str(model), "--out", str(parent / "ckpt"), *options, "--allow-nonfinite")
    assert kept.returncode == 0, kept.stderr
    warnings = [ln for ln in kept.stderr.splitlines() if "NaN or Inf" in ln]
    assert len(warnings) == 1 and "--allow-nonfinite" in warnings[0], kept.stderr
    again = cli("convert", str(model), "--out", str(parent / "ckpt"), *options)  # the kept artifact is never reused by a strict run
    assert again.returncode == CHECKPOINT_ERROR and (parent / "ckpt" / "rank0.safetensors").is_file()


def test_data_free_quantize_refuses_inf_hidden_by_the_fp8_clamp(cli, model, tmp_path):
    _set(model, Q, (2, 2), math.inf)  # FP8 rowwise clamps to ±1200 before scaling: only its input shows the Inf
    parent = tmp_path / "out"
    parent.mkdir()
    before = tree(parent)
    line = assert_refused(cli("quantize", str(model), "--scheme", "fp8-rowwise", "--out", str(parent / "ckpt")), parent=parent,
                          before=before, code=CHECKPOINT_ERROR, says="holds NaN or Inf")
    _line_names(line, Q, model / WEIGHTS)
    kept = cli("quantize", str(model), "--scheme", "fp8-rowwise", "--out", str(parent / "ckpt"), "--allow-nonfinite")
    assert kept.returncode == 0 and "NaN or Inf" in kept.stderr, kept.stderr


def test_calibrated_quantize_refuses_nonfinite_weights_unless_allowed(cli, model, tmp_path):
    pytest.importorskip("modelopt.torch.quantization")
    _set(model, Q, (4, 4), math.nan)
    parent = tmp_path / "out"
    parent.mkdir()
    before = tree(parent)
    small = ("--device", "cpu", "--calib-size", "4", "--calib-seq-len", "32", "--eval-tokens", "64", "--eval-window", "32")
    line = assert_refused(cli("quantize", str(model), "--scheme", "fp8", "--out", str(parent / "ckpt"), *small), parent=parent,
                          before=before, code=CHECKPOINT_ERROR, says="holds NaN or Inf")
    _line_names(line, Q, model / WEIGHTS)
    # kept: a NaN in the embedding row of <unk> (id 0), which no text tokenizes to, so calibration still converges
    _set(model, Q, (4, 4), 0.0)
    _set(model, "model.embed_tokens.weight", (0, 3), math.nan)
    kept = cli("quantize", str(model), "--scheme", "fp8", "--out", str(parent / "ckpt"), *small, "--allow-nonfinite")
    assert kept.returncode == 0, kept.stderr
    assert "NaN or Inf" in kept.stderr and "--allow-nonfinite" in kept.stderr, kept.stderr


def test_verify_fails_a_checkpoint_whose_metrics_are_nan(cli, model, base, tmp_path):
    _set(model, "model.layers.0.mlp.down_proj.weight", (0, 0), math.nan)  # every logit becomes NaN
    ckpt = tmp_path / "nan-ckpt"
    assert cli("convert", str(model), "--out", str(ckpt), "--allow-nonfinite").returncode == 0
    result = cli("verify", str(ckpt), "--against", str(base), "--device", "cpu", "--json", "--eval-tokens", "64",
                 "--window", "32", "--max-new-tokens", "2")
    assert result.returncode == VERIFY_FAILED, result.stderr
    report = json.loads(result.stdout)  # strict JSON: NaN became null
    assert report["passed"] is False and report["nonfinite_positions"] == report["positions_compared"] > 0
    assert report["ppl_checkpoint"] is None and report["max_abs_logit_diff"] is None and report["ppl_reference"] > 0
    failures = " ".join(report["failures"])
    assert "NaN or Inf" in failures and "perplexity delta" in failures and "not a number" in failures


# ---- item 2: configs that cannot be right, through inspect and plan -------------------------------------------

BAD_CONFIGS = [
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"head_dim": -32}, "head_dim"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": -512}, "vocab_size"),
    ({"num_hidden_layers": 10**7}, "num_hidden_layers"),
    ({"rope_theta": math.nan}, "NaN"),  # the NaN literal Python's json writes: refused by the strict reader of config.json
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"rope_scaling": {"type": "linear", "factor": 0.0}}, "factor"),
]


@pytest.mark.parametrize("change, key", BAD_CONFIGS, ids=[next(iter(c)) + "-" + str(next(iter(c.values())))[:20] for c, _ in BAD_CONFIGS])
def test_inspect_and_plan_refuse_impossible_configs(cli, model, change, key):
    config = json.loads((model / "config.json").read_text())
    config.update(change)
    (model / "config.json").write_text(json.dumps(config))
    for args in (("inspect", str(model)), ("plan", str(model), "--gpu", "H100")):
        result = cli(*args)
        line = assert_refused(result, code=CHECKPOINT_ERROR, says=key)
        assert str(model / "config.json") in line and not result.stdout.strip()


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_inspect_and_plan_print_no_negative_or_nan_count(cli, base):
    for args in (("inspect", str(base), "--json"), ("plan", str(base), "--gpu", "L4", "--json"),
                 ("plan", str(base), "--gpu", "L4", "--compare", "--json")):
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        numbers = list(_numbers(json.loads(result.stdout)))
        assert numbers and all(math.isfinite(n) and n >= 0 for n in numbers), args


@pytest.mark.parametrize("option, value", [("--kv-fraction", "nan"), ("--kv-fraction", "inf")])
def test_plan_refuses_a_nan_workload(cli, base, option, value):
    assert_refused(cli("plan", str(base), "--gpu", "H100", option, value), code=2, says="kv")  # the CLI option or Workload itself
