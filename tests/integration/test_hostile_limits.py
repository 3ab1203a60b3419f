"""Hostile numbers: lengths and sizes past what any engine, Triton config or the reference runtime takes are refused
up front with one line (never a run until memory is gone, never an internal error from a 32-bit field)."""

from __future__ import annotations

import pytest

from tests.hostile import assert_refused, tree
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF folder with tokenizer, its checkpoint), once per module; context 4096 tokens."""
    base = tmp_path_factory.mktemp("limits")
    hf = write_synthetic_model(base / "hf", SyntheticSpec(tokenizer=True, seed=1))
    convert(ConvertRequest(hf, base / "ckpt"))
    return hf, base / "ckpt"


@pytest.mark.parametrize("args", [["generate", "{ckpt}", "-p", "hi", "--max-new-tokens", "99999999999"],
                                  ["verify", "{ckpt}", "--against", "{hf}", "--max-new-tokens", "99999999999"],
                                  ["verify", "{ckpt}", "--against", "{hf}", "--max-new-tokens", "4096"]])
def test_more_new_tokens_than_the_context_is_refused_before_any_model_runs(cli, tiny, args):
    hf, ckpt = tiny
    result = cli(*[a.format(hf=hf, ckpt=ckpt) for a in args])
    assert_refused(result, code=2, says="context of 4096 tokens")


@pytest.mark.parametrize(("option", "says"), [("--instances=99999999999", "--instances"), ("--max-batch-size=99999999999", "32 bits"),
                                              ("--max-kv-tokens=99999999999", "32 bits"), ("--max-seq-len=99999999999", "context of 4096"),
                                              ("--max-input-len=99999999999", "max_input_len")])
def test_deploy_refuses_sizes_no_config_can_hold(cli, tiny, tmp_path, option, says):
    _, ckpt = tiny
    before = tree(tmp_path)
    result = cli("deploy", str(ckpt), "--engine", "reference", "--out", str(tmp_path / "repo"), option)
    assert_refused(result, parent=tmp_path, before=before, code=3, says=says)


def test_the_runtime_refuses_ids_outside_the_vocab_and_sequences_past_the_context(tiny):
    from yitrt.errors import UsageError
    from yitrt.reference.runtime import check_tokens
    from yitrt.reference.spec import load_spec

    spec = load_spec(tiny[1])
    check_tokens(spec, [[0, spec.vocab_size - 1]], 4094)  # exactly the context: fine
    for seqs, new, says in (([[1, spec.vocab_size]], 0, "outside the vocab"), ([[-1]], 0, "outside the vocab"),
                            ([[1, True]], 0, "outside the vocab"), ([[1, 2]], 4095, "context of 4096")):
        with pytest.raises(UsageError, match=says):
            check_tokens(spec, seqs, new)


@pytest.mark.parametrize(("gpu", "says"), [("sm89", "architecture only"), ("sm999", "unknown GPU architecture"), ("sm0", "unknown GPU architecture")])
def test_plan_needs_a_gpu_whose_memory_is_known(cli, tiny, gpu, says):
    """An ``smNN`` target names an architecture for format checks; planning it printed a plan of 0 GB and 0 tokens."""
    assert_refused(cli("plan", str(tiny[0]), "--gpu", gpu), code=2, says=says)


def test_run_refuses_a_bad_stage_range_before_saying_anything_else(cli, tmp_path):
    """The demo recipe warns (tp 3 on a PCIe GPU); a bad --from must still be the only line."""
    for args, says in ((["--from", "nope"], "not a stage"), (["--from", "deploy", "--until", "fetch"], "comes after")):
        before = tree(tmp_path)
        result = cli("run", "demo", "--work-dir", str(tmp_path / "w"), *args)
        assert_refused(result, parent=tmp_path, before=before, code=2, says=says)


def test_recipe_refuses_an_instance_count_deploy_would_refuse(cli):
    assert_refused(cli("recipe", "validate", "demo", "--set", "serve.instances=99999999999"), code=3, says="serve.instances")
