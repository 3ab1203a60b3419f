"""`yitrt verify` and `yitrt generate` end to end (real processes): clean checkpoints pass, damaged ones fail."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration
FAST = ("--eval-tokens", "256", "--window", "128", "--max-new-tokens", "6", "--device", "cpu", "--json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Yi-shaped model with a tokenizer, and clean checkpoints at tp 2 and tp 4 (KV heads repeated)."""
    root = tmp_path_factory.mktemp("verify")
    hf = write_synthetic_model(root / "hf", SyntheticSpec(seed=11, tokenizer=True))
    for tp in (2, 4):
        convert(ConvertRequest(hf, root / f"tp{tp}", tp=tp))
    return root


def _damaged(tiny, source: str, name: str):
    out = tiny / name
    shutil.copytree(tiny / source, out)
    return out


def _edit_ranks(ckpt, edit, ranks=None) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    for rank in ranks if ranks is not None else range(config["mapping"]["world_size"]):
        path = ckpt / f"rank{rank}.safetensors"
        tensors = load_file(str(path))
        edit(tensors, rank)
        save_file(tensors, str(path), metadata={"format": "pt"})


def _verify(ckpt, *extra):
    result = run_cli("verify", str(ckpt), *FAST, *extra)
    data = json.loads(result.stdout) if result.stdout.strip() else {}
    return result, data


def test_clean_tp2_checkpoint_passes_with_every_metric(tiny):
    result, data = _verify(tiny / "tp2")  # the original comes from the manifest's recorded source
    assert result.returncode == 0, result.stderr
    assert data["passed"] is True and data["failures"] == []
    assert data["top1_agreement"] == 1.0
    assert data["max_abs_logit_diff"] <= 2.0**-8 * data["logit_scale"]
    assert abs(data["ppl_delta_pct"]) < 0.01 and data["ppl_reference"] > 1
    assert all(g["matched"] == g["generated"] == 6 for g in data["greedy_match"])
    assert len({r["pid"] for r in data["ranks"]}) == 2


def _swap_fc_gate(t, rank):
    for name in [n for n in t if n.endswith("mlp.fc.weight")]:
        gate = name.replace("mlp.fc", "mlp.gate")
        t[name], t[gate] = t[gate].clone(), t[name].clone()


def _swap_k_v(t, rank):
    q_rows, kv_rows = 4 * 32, 1 * 32  # tp 2 of 8 heads / 2 KV heads, head size 32
    for name in [n for n in t if n.endswith("qkv.weight")]:
        w = t[name]
        t[name] = torch.cat([w[:q_rows], w[q_rows + kv_rows :], w[q_rows : q_rows + kv_rows]]).contiguous()


def _wrong_rotary_base(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["rotary_base"] = 10000.0  # TensorRT-LLM's default, wrong for every Yi
    (ckpt / "config.json").write_text(json.dumps(config))


def test_fc_gate_swap_fails_with_exit_code_10(tiny):
    ckpt = _damaged(tiny, "tp2", "fc_gate_swapped")
    _edit_ranks(ckpt, _swap_fc_gate)
    result, data = _verify(ckpt)
    assert result.returncode == 10, result.stderr
    assert data["passed"] is False and data["failures"]
    assert data["max_abs_logit_diff"] > 2.0**-6 * data["logit_scale"]


def _library_verify(tiny, ckpt):
    from yitrt.reference.verify import VerifyRequest, verify

    return verify(VerifyRequest(ckpt, tiny / "hf", eval_tokens=256, window=128, max_new_tokens=6, device="cpu"))


@pytest.mark.parametrize("damage", ["k_v_order", "wrong_rotary_base"])
def test_damaged_checkpoint_fails(tiny, damage):
    ckpt = _damaged(tiny, "tp2", damage)
    if damage == "k_v_order":
        _edit_ranks(ckpt, _swap_k_v)
    else:
        _wrong_rotary_base(ckpt)
    report = _library_verify(tiny, ckpt)
    assert not report.passed
    assert report.comparison.max_abs > 2.0**-6 * report.comparison.scale


def test_wrongly_duplicated_kv_head_fails(tiny):
    # tp 4 with 2 KV heads: ranks 0-1 must hold KV head 0, ranks 2-3 head 1. Give rank 1 head 1 instead.
    ckpt = _damaged(tiny, "tp4", "kv_dup")
    donor = load_file(str(ckpt / "rank2.safetensors"))
    q_rows = 2 * 32

    def take_head_1(t, rank):
        for name in [n for n in t if n.endswith("qkv.weight")]:
            t[name][q_rows:] = donor[name][q_rows:]

    _edit_ranks(ckpt, take_head_1, ranks=[1])
    report = _library_verify(tiny, ckpt)
    assert not report.passed and any("logit" in f for f in report.failures)


def test_missing_lm_head_padding_row_is_refused_before_any_model_runs(tmp_path):
    # vocab 510 at tp 4: lm_head is padded to 4 × 128 rows, the last rank holding 2 zero rows
    hf = write_synthetic_model(tmp_path / "hf", SyntheticSpec(overrides=(("vocab_size", 510),), tokenizer=True))
    convert(ConvertRequest(hf, tmp_path / "ckpt", tp=4))

    def drop_row(t, rank):
        t["lm_head.weight"] = t["lm_head.weight"][:-1].contiguous()

    _edit_ranks(tmp_path / "ckpt", drop_row, ranks=[3])
    result, data = _verify(tmp_path / "ckpt", "--against", str(hf))
    assert result.returncode == 5
    assert "rank3: lm_head.weight is [127, 256], expected [128, 256]" in data["error"]["message"]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_of_another_model_is_refused(tiny, tmp_path):
    other = write_synthetic_model(tmp_path / "other", SyntheticSpec(layers=2, tokenizer=True))
    result, data = _verify(tiny / "tp2", "--against", str(other))
    assert result.returncode == 5 and "was not made from" in data["error"]["message"]


@pytest.mark.slow  # keeps `make test` near 12 min; thresholds are judged by tests/unit/test_verdicts.py in it
def test_threshold_override_flips_the_verdict(tiny):
    result, data = _verify(tiny / "tp2", "--max-logit-diff", "0")
    assert result.returncode == 10 and any("logit scale" in f for f in data["failures"])


def test_generate_greedy_and_chat(tiny):
    result = run_cli("generate", str(tiny / "tp2"), "--prompt", "北京是", "--prompt", "Four score", "--max-new-tokens", "5", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [len(c["tokens"]) for c in data["completions"]] == [5, 5]
    assert data["tokenizer"].endswith("hf")  # from the manifest
    chat = run_cli("generate", str(tiny / "tp2"), "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--device", "cpu", "--json")
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["completions"][0]["prompt"] == "hi"


@pytest.mark.slow  # keeps `make test` near 12 min: a second full verify for one refusal
def test_model_without_tokenizer_needs_one_named(tiny, tmp_path):
    bare = write_synthetic_model(tmp_path / "bare", SyntheticSpec(seed=11))  # weights only, no tokenizer files
    convert(ConvertRequest(bare, tmp_path / "ckpt"))
    result, data = _verify(tmp_path / "ckpt")
    assert result.returncode == 2 and "--tokenizer" in data["error"]["hint"]
    result, data = _verify(tmp_path / "ckpt", "--tokenizer", str(tiny / "hf"))
    assert result.returncode == 0 and data["passed"] is True
