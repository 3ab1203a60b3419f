"""The reference runtime computes what transformers computes, from TensorRT-LLM checkpoints yitrt writes.

Bound for unquantized checkpoints (bf16 weights, both sides computing in float32): max |Δlogit| ≤ 2^-8 ·
max |logit| — one bf16 ulp at the largest logit, i.e. less than rounding the logits themselves to bf16 would
change them. Measured: ~1e-6 of the scale (only the order of float32 sums differs, e.g. across TP all-reduces).
"""

from __future__ import annotations

import os

import pytest
import torch

from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.reference.original import greedy_original, load_original, score_original
from yitrt.reference.runtime import ReferenceRuntime, Sampling, StopRule
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration
BF16_BOUND = 2.0**-8


def _sequences(n: int = 3, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in (23, 9, 40)[:n]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Yi-shaped model (8 heads, 2 KV heads) with its transformers logits and greedy continuations."""
    root = tmp_path_factory.mktemp("tiny")
    hf = write_synthetic_model(root / "hf", SyntheticSpec(seed=3))
    model = load_original(hf, torch.device("cpu"), torch.float32)
    seqs = _sequences()
    logits = score_original(model, seqs)
    greedy = [greedy_original(model, s, 6) for s in seqs]
    return {"root": root, "hf": hf, "seqs": seqs, "logits": logits, "greedy": greedy}


def _convert(tiny, name: str, **kw):
    out = tiny["root"] / name
    if not out.exists():
        convert(ConvertRequest(tiny["hf"], out, **kw))
    return out


def _assert_reproduces(reference: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    for ref, out in zip(reference, got, strict=True):
        assert torch.equal(ref.argmax(-1), out.argmax(-1))  # top-1 agreement 100%
        assert (ref - out).abs().max() <= BF16_BOUND * ref.abs().max()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_checkpoint_reproduces_transformers(tiny, tp):
    ckpt = _convert(tiny, f"tp{tp}", tp=tp)
    with ReferenceRuntime(ckpt, device="cpu") as runtime:
        got = runtime.score(tiny["seqs"])
        greedy = runtime.generate(tiny["seqs"], 6)  # a batch of three prompts of different lengths
        ranks = runtime.ranks
    _assert_reproduces(tiny["logits"], got)
    assert greedy == tiny["greedy"]
    pids = {r["pid"] for r in ranks}
    assert len(ranks) == tp and len(pids) == tp  # one process per TP rank …
    if tp > 1:
        assert os.getpid() not in pids  # … none of them this one


def test_tp4_rank_files_hold_one_repeated_kv_head(tiny):
    # 2 KV heads at tp 4: every rank holds one KV head, repeated; the rank files say so
    from safetensors import safe_open

    ckpt = _convert(tiny, "tp4", tp=4)
    with safe_open(str(ckpt / "rank1.safetensors"), "pt") as f:
        rows = f.get_slice("transformer.layers.0.attention.qkv.weight").get_shape()[0]
    assert rows == (8 // 4 + 2 * 1) * 32  # 2 q heads + 1 k + 1 v head of 32


def test_pipeline_stages_in_order_equal_one_stage(tiny):
    seqs = tiny["seqs"]
    with ReferenceRuntime(_convert(tiny, "tp1", tp=1), device="cpu") as one:
        single = one.score(seqs)
    with ReferenceRuntime(_convert(tiny, "tp1pp2", tp=1, pp=2), device="cpu") as two:
        staged = two.score(seqs)
    for a, b in zip(single, staged, strict=True):
        assert torch.equal(a, b)
    with ReferenceRuntime(_convert(tiny, "tp2pp2", tp=2, pp=2), device="cpu") as both:
        _assert_reproduces(tiny["logits"], both.score(seqs))


def test_kv_cache_decoding_equals_the_context_pass(tiny):
    seqs = tiny["seqs"]
    with ReferenceRuntime(_convert(tiny, "tp2", tp=2), device="cpu") as runtime:
        context = runtime.score(seqs)
        decoded = runtime.score(seqs, decode_tail=8)  # last 8 tokens one at a time through the cache
    for a, b in zip(context, decoded, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    seqs = tiny["seqs"]
    with ReferenceRuntime(_convert(tiny, "tp1", tp=1), device="cpu") as runtime:
        hot = Sampling(greedy=False, temperature=5.0, seed=7)
        first = runtime.generate(seqs, 8, hot)
        again = runtime.generate(seqs, 8, hot)
        other = runtime.generate(seqs, 8, Sampling(greedy=False, temperature=5.0, seed=8))
        top1 = runtime.generate(seqs, 6, Sampling(greedy=False, temperature=5.0, top_k=1, seed=9))
        stopped = runtime.generate(seqs, 6, Sampling(), end_ids=(tiny["greedy"][0][2],))
    assert first == again and first != other
    assert top1 == tiny["greedy"]
    end = tiny["greedy"][0][2]
    assert stopped[0] == tiny["greedy"][0][: tiny["greedy"][0].index(end) + 1]  # stops after emitting the end id


@pytest.mark.parametrize("tp", [1, 2])
def test_generate_stream_steps_each_sequence_under_its_own_stop_rule(tiny, tp):
    """What the CPU reference engine slot relies on: per-request limits, end ids and stop sequences in one batch,
    streamed step by step from rank 0 (tp 2: across processes)."""
    seqs, greedy = tiny["seqs"], tiny["greedy"]
    rules = [StopRule(6), StopRule(3), StopRule(6, stop_sequences=(tuple(greedy[2][1:3]),))]
    steps = []
    with ReferenceRuntime(_convert(tiny, f"tp{tp}", tp=tp), device="cpu") as runtime:
        for events in runtime.generate_stream(seqs, rules):
            steps.append(events)
        again = runtime.generate(seqs[:1], 2)  # the runtime still answers after a stream
    tokens = [[e[0] for e in (step[b] for step in steps) if e is not None] for b in range(3)]
    reasons = [[e[1] for e in (step[b] for step in steps) if e is not None][-1] for b in range(3)]
    assert tokens == [greedy[0][:6], greedy[1][:3], greedy[2][:3]]
    assert reasons == ["length", "length", "stop_words"]
    assert len(steps) == 6 and steps[3][1] is None  # a finished sequence yields None while the others go on
    assert again == [greedy[0][:2]]


def test_min_new_masks_the_end_id_until_that_many_tokens(tiny):
    """TensorRT-LLM's min_tokens: the end id's logit is masked for the first min_new steps, so the greedy pick is the
    next best token there, and the end id may end the sequence only afterwards."""
    seqs, greedy = tiny["seqs"], tiny["greedy"]
    end = greedy[0][0]  # the first greedy token: without min_new the sequence ends at once
    with ReferenceRuntime(_convert(tiny, "tp1", tp=1), device="cpu") as runtime:
        plain = [e for events in runtime.generate_stream(seqs[:1], [StopRule(6, (end,))]) for e in events if e is not None]
        held = [e for events in runtime.generate_stream(seqs[:1], [StopRule(6, (end,), min_new=3)]) for e in events if e is not None]
    assert plain == [(end, "end_id")]
    assert len(held) >= 3 and all(token != end for token, _ in held[:3])
    assert held[-1][1] in ("end_id", "length") and (held[-1][1] == "length") == (len(held) == 6)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_types_match_transformers(tmp_path, scaling):
    # max_position_embeddings 16 with sequences up to 40 tokens: dynamic NTK really rescales
    hf = write_synthetic_model(tmp_path / "hf", SyntheticSpec(overrides=(("rope_scaling", scaling), ("max_position_embeddings", 16), ("rope_theta", 10000.0))))
    seqs = _sequences()
    reference = score_original(load_original(hf, torch.device("cpu"), torch.float32), seqs)
    convert(ConvertRequest(hf, tmp_path / "ckpt", tp=2))
    with ReferenceRuntime(tmp_path / "ckpt", device="cpu") as runtime:
        _assert_reproduces(reference, runtime.score(seqs))


def test_legacy_yi_layout_is_loaded_as_llama(tmp_path):
    hf = write_synthetic_model(tmp_path / "hf", SyntheticSpec(legacy_yi=True, seed=5))
    seqs = _sequences(2)
    reference = score_original(load_original(hf, torch.device("cpu"), torch.float32), seqs)
    convert(ConvertRequest(hf, tmp_path / "ckpt"))
    with ReferenceRuntime(tmp_path / "ckpt", device="cpu") as runtime:
        _assert_reproduces(reference, runtime.score(seqs))


def test_fp8_kv_cache_changes_only_what_goes_through_the_cache(tiny):
    seqs = tiny["seqs"]
    with ReferenceRuntime(_convert(tiny, "tp1-kvfp8", tp=1, kv_cache="fp8"), device="cpu") as runtime:
        context = runtime.score(seqs)
        decoded = runtime.score(seqs, decode_tail=8)
    for ref, a, b in zip(tiny["logits"], context, decoded, strict=True):
        _assert_reproduces([ref], [a])  # the prompt attends to its own unquantized K/V
        assert not torch.allclose(a[-8:], b[-8:], atol=1e-4)  # generation reads FP8 K/V back
        assert torch.allclose(a[:-8], b[:-8], atol=1e-5, rtol=0)
