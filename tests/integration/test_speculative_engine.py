"""Speculative decoding on the reference slot's engine loop (tiny model): draft-target rounds and lookahead decoding
give exactly the target's own greedy answer — whatever the draft, the draft length, the (W, N, G), the batch, the
chunking, and wherever the answer ends (end id, stop sequence, max tokens, also inside an accepted run) — and the
acceptance they report is what the token streams show.

The draft-target rounds are driven here the way yitrt's BLS drives them over Triton (a draft request of K tokens, then
a target verification request with ``draft_input_ids``); ``test_speculative_serving`` runs the real BLS.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from yitrt.checkpoint.convert import ConvertRequest, convert
from yitrt.errors import UsageError
from yitrt.reference.engine.scheduler import EngineConfig
from yitrt.reference.engine.speculative import DraftTokens, accept_greedy, accept_sampled
from yitrt.reference.runtime import ReferenceRuntime, Sampling, StopRule
from yitrt.speculation import LookaheadSizes
from yitrt.synthetic import SyntheticSpec, write_synthetic_model

pytestmark = pytest.mark.integration

TARGET = EngineConfig(max_batch_size=8, max_num_tokens=512, tokens_per_block=16, primary_blocks=300, max_draft_len=6)
CHUNKED = dataclasses.replace(TARGET, max_num_tokens=16, chunked_context=True)
DRAFT = EngineConfig(max_batch_size=8, max_num_tokens=512, tokens_per_block=16, primary_blocks=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    convert(ConvertRequest(write_synthetic_model(root / "hf", SyntheticSpec(seed=5, dtype="float32")), root / "target"))
    convert(ConvertRequest(write_synthetic_model(root / "hf-other", SyntheticSpec(seed=9, dtype="float32")), root / "other"))
    return root


@pytest.fixture(scope="module")
def target(models):
    with ReferenceRuntime(models / "target", device="cpu") as rt:
        yield rt


@pytest.fixture(scope="module")
def self_draft(models):
    """The target's own checkpoint as the draft: every draft token is the target's, so runs are accepted whole."""
    with ReferenceRuntime(models / "target", device="cpu") as rt:
        yield rt


@pytest.fixture(scope="module")
def other_draft(models):
    """An unrelated model with the same vocabulary: a draft that is nearly always wrong."""
    with ReferenceRuntime(models / "other", device="cpu") as rt:
        yield rt


def _prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


_ALONE: dict = {}


def _alone(runtime, prompt, rule) -> list[int]:
    """The target's greedy answer to one request decoded alone (memoised: tests share prompts)."""
    key = (tuple(prompt), rule)
    if key not in _ALONE:
        _ALONE[key] = next(iter(_run_plain(runtime, [prompt], [rule]).values()))
    return _ALONE[key]


def _run_plain(runtime, prompts, rules) -> dict[int, list[int]]:
    loop = runtime.engine(DRAFT)
    for i, (prompt, rule) in enumerate(zip(prompts, rules, strict=True)):
        loop.add(str(i), prompt, rule, Sampling())
    out = {i: [] for i in range(len(prompts))}
    while not loop.idle:
        for key, token, _ in loop.step():
            out[int(key)].append(token)
    return out


def _draft_target(target, draft, prompts, rules, k, config=TARGET):
    """Draft-target rounds for all prompts at once (as concurrent BLS requests): the draft loop proposes
    min(k, left − 1) tokens per prompt, then the target loop verifies them. Returns (answers, per-round records
    (emitted tokens, accepted, offered))."""
    tl, dl = target.engine(config), draft.engine(DRAFT)
    answers = {i: [] for i in range(len(prompts))}
    rounds = {i: [] for i in range(len(prompts))}
    active = set(answers)
    while active:
        drafts = {}
        for i in sorted(active):
            n = min(k, rules[i].max_new - len(answers[i]) - 1)
            drafts[i] = []
            if n > 0:
                dl.add(str(i), prompts[i] + answers[i], StopRule(n, min_new=n), Sampling())  # min_tokens = K, as the BLS
        while not dl.idle:
            for key, token, _ in dl.step():
                drafts[int(key)].append(token)
        for i in sorted(active):
            rule = rules[i]
            left = StopRule(min(len(drafts[i]) + 1, rule.max_new - len(answers[i])), rule.end_ids, rule.stop_sequences)
            tl.add(str(i), prompts[i] + answers[i], left, Sampling(), draft=DraftTokens(tuple(drafts[i])) if drafts[i] else None)
        got, reasons = {i: [] for i in active}, {}
        while not tl.idle:
            for key, token, reason in tl.step():
                got[int(key)].append(token)
                reasons[int(key)] = reason
            for key, record in tl.speculation.items():
                rounds[int(key)].append(record)
        for i in sorted(active):
            answers[i] += got[i]
            rule = rules[i]
            if rule.finish_reason(answers[i]) is not None:
                active.discard(i)
    return answers, rounds


@pytest.mark.parametrize("k", [1, 4])
def test_draft_target_answers_are_the_target_greedy_answers(target, self_draft, other_draft, k):
    prompts = _prompts(4)
    rules = [StopRule(13) for _ in prompts]
    alone = {i: _alone(target, p, r) for i, (p, r) in enumerate(zip(prompts, rules, strict=True))}
    for draft, whole in ((self_draft, True), (other_draft, False)):
        answers, rounds = _draft_target(target, draft, prompts, rules, k)
        assert answers == alone
        accepted = sum(a for r in rounds.values() for a, _ in r)
        offered = sum(o for r in rounds.values() for _, o in r)
        if whole:  # every round accepts its whole draft: 13 // (k + 1) rounds of k, then one of what is left − 1
            assert accepted == offered == len(prompts) * (13 // (k + 1) * k + max(0, 13 % (k + 1) - 1))
        else:
            assert accepted < offered


def test_verification_spans_chunks_and_cached_prefixes(target, self_draft):
    """Chunked context with 16-token iterations: the K + 1 logits rows of a verification step come from two chunks;
    a later round reuses the blocks an earlier one cached (its draft included)."""
    prompts = _prompts(4, seed=3)
    rules = [StopRule(20) for _ in prompts]
    alone = {i: _alone(target, p, r) for i, (p, r) in enumerate(zip(prompts, rules, strict=True))}
    answers, _ = _draft_target(target, self_draft, prompts, rules, 6, CHUNKED)
    assert answers == alone


def test_answers_end_inside_an_accepted_run(target, self_draft):
    """End id, stop sequence and max tokens falling inside a run the self-draft gets accepted whole."""
    prompts = _prompts(3, seed=7)
    base = {i: _alone(target, p, StopRule(24)) for i, p in enumerate(prompts)}
    cases = []
    for i, p in enumerate(prompts):
        out = base[i]
        at = next(j for j in range(2, len(out)) if out[j] not in out[:j])  # first occurrence: the end lands there
        cases.append((p, StopRule(24, end_ids=(out[at],))))
        cases.append((p, StopRule(24, stop_sequences=(tuple(out[at - 1 : at + 1]),))))
        cases.append((p, StopRule(7 + i)))  # 7..11 tokens: not a multiple of a round
    prompts2, rules = [c[0] for c in cases], [c[1] for c in cases]
    alone = {i: _alone(target, p, r) for i, (p, r) in enumerate(cases)}
    answers, rounds = _draft_target(target, self_draft, prompts2, rules, 5)
    assert answers == alone
    assert any(len(alone[i]) < 24 for i in range(0, len(cases), 3))  # the end ids did end answers early


def test_verification_refusals(target):
    loop = target.engine(dataclasses.replace(TARGET, max_draft_len=2))
    with pytest.raises(UsageError, match=r"Number of draft tokens \(3\) is larger than maximum number of draft tokens \(2\)"):
        loop.add("a", [5, 6, 7], StopRule(4), Sampling(), draft=DraftTokens((1, 2, 3)))
    with pytest.raises(UsageError, match="outside the vocab"):
        loop.add("a", [5, 6, 7], StopRule(2), Sampling(), draft=DraftTokens((10**6,)))
    vocab = target.spec.vocab_size
    with pytest.raises(UsageError, match=r"NaN or \+inf"):  # refused alone: a NaN would fail the whole iteration
        loop.add("a", [5, 6, 7], StopRule(2), Sampling(), draft=DraftTokens((1,), torch.full((1, vocab), float("nan"))))
    masked = torch.zeros(1, vocab)
    masked[0, 2] = float("-inf")  # a masked token (a draft under min_tokens) is fine
    loop.add("ok", [5, 6, 7], StopRule(2), Sampling(), draft=DraftTokens((1,), masked))
    assert loop.cancel("ok")
    with pytest.raises(UsageError, match=r"shape \[2, "):
        loop.add("a", [5, 6, 7], StopRule(2), Sampling(), draft=DraftTokens((1,), torch.zeros(2, vocab)))
    with pytest.raises(UsageError, match="threshold must be in"):
        loop.add("a", [5, 6, 7], StopRule(2), Sampling(), draft=DraftTokens((1,), torch.zeros(1, vocab), threshold=float("nan")))
    with pytest.raises(UsageError, match="lookahead parameters are not set"):
        loop.add("a", [5, 6, 7], StopRule(2), Sampling(), lookahead=LookaheadSizes(2, 2, 1))


LOOKAHEADS = [(4, 3, 4), (2, 2, 1), (3, 5, 2), (1, 1, 0)]


@pytest.mark.parametrize("sizes", LOOKAHEADS)
def test_lookahead_answers_are_the_target_greedy_answers(target, sizes):
    la = LookaheadSizes(*sizes)
    prompts = _prompts(4, seed=11)
    rules = []
    for i, p in enumerate(prompts):
        out = _alone(target, p, StopRule(24))
        end = next((out[j] for j in range(3, len(out)) if out[j] not in out[:j]), None)
        rules.append([StopRule(24), StopRule(24, end_ids=(end,) if end is not None else ()),
                      StopRule(24, stop_sequences=(tuple(out[10:12]),)), StopRule(13 + i)][i % 4])
    alone = {i: _alone(target, p, r) for i, (p, r) in enumerate(zip(prompts, rules, strict=True))}
    loop = target.engine(dataclasses.replace(TARGET, max_draft_len=0, lookahead=la))
    for i, (p, r) in enumerate(zip(prompts, rules, strict=True)):
        loop.add(str(i), p, r, Sampling())
    out = {i: [] for i in range(len(prompts))}
    per_step: dict[int, list[tuple[int, int, int]]] = {i: [] for i in out}
    steps = 0
    while not loop.idle:
        got: dict[int, list[int]] = {}
        for key, token, _ in loop.step():
            got.setdefault(int(key), []).append(token)
        for key, tokens in got.items():
            out[key] += tokens
            accepted, offered = loop.speculation.get(str(key), (0, 0))
            per_step[key].append((len(tokens), accepted, offered))
        steps += 1
    assert out == alone
    for records in per_step.values():
        for count, accepted, offered in records:  # a step emits its accepted run + 1 (less where the answer ends)
            assert count <= accepted + 1 and accepted <= offered <= la.ngram - 1
    if la.ngram > 1:  # the tiny model's greedy answers repeat: the n-gram pool gets runs accepted
        assert sum(a for r in per_step.values() for _, a, _ in r) > 0
        assert steps < max(len(v) for v in alone.values())
    else:
        assert all(a == o == 0 for r in per_step.values() for _, a, o in r)


def test_lookahead_per_request_sizes_and_sampled_requests(target):
    la = LookaheadSizes(4, 3, 4)
    prompts = _prompts(3, seed=13)
    loop = target.engine(dataclasses.replace(TARGET, max_draft_len=0, lookahead=la))
    loop.add("small", prompts[0], StopRule(20), Sampling(), lookahead=LookaheadSizes(2, 2, 1))
    loop.add("off", prompts[1], StopRule(20), Sampling(), lookahead=LookaheadSizes(1, 1, 0))
    loop.add("sampled", prompts[2], StopRule(20), Sampling(greedy=False, temperature=0.9, top_k=30, seed=4))
    with pytest.raises(UsageError, match="exceeds the model's"):
        loop.add("big", prompts[0], StopRule(20), Sampling(), lookahead=LookaheadSizes(5, 3, 4))
    out: dict[str, list[int]] = {"small": [], "off": [], "sampled": []}
    offered = {"small": 0, "off": 0, "sampled": 0}
    while not loop.idle:
        for key, token, _ in loop.step():
            out[key].append(token)
        for key, (_, o) in loop.speculation.items():
            offered[key] += o
    assert out["small"] == _alone(target, prompts[0], StopRule(20))
    assert out["off"] == _alone(target, prompts[1], StopRule(20))
    assert offered["off"] == 0 and offered["sampled"] == 0  # (1, 1, 0) and sampled requests decode one token a step
    assert out["sampled"] == target.generate([prompts[2]], 20, Sampling(greedy=False, temperature=0.9, top_k=30, seed=4))[0]


def test_acceptance_rules():
    assert accept_greedy([4, 5, 6, 7], (4, 5, 6)) == [4, 5, 6, 7]
    assert accept_greedy([4, 9, 6, 7], (4, 5, 6)) == [4, 9]
    assert accept_greedy([1], ()) == [1]
    vocab = 8
    target = torch.full((3, vocab), -5.0)
    target[0, 2], target[1, 3], target[2, 1] = 5.0, 5.0, 5.0
    same = DraftTokens((2, 3), target[:2].clone())
    g = torch.Generator().manual_seed(0)
    # greedy: p_target is one-hot, so draft logits cannot change the target's tokens
    assert accept_sampled(target, same, Sampling(), g) == [2, 3, 1]
    wrong = DraftTokens((2, 5), target[:2].clone())
    assert accept_sampled(target, wrong, Sampling(), g) == [2, 3]
    # sampled, draft distribution = target distribution: p_t(x) > u·p_d(x) for every u < 1, all accepted
    sampling = Sampling(greedy=False, temperature=1.0, seed=0)
    flat = torch.zeros(3, vocab)
    assert accept_sampled(flat, DraftTokens((2, 3), flat[:2].clone()), sampling, torch.Generator().manual_seed(1))[:2] == [2, 3]
    # a draft token the target's top-k removes (p_t = 0) is always rejected, and the replacement is one the target allows
    top1 = Sampling(greedy=False, top_k=1, seed=0)
    for seed in range(5):
        out = accept_sampled(target, DraftTokens((6, 3), torch.zeros(2, vocab)), top1, torch.Generator().manual_seed(seed))
        assert out == [2]
    # a constant threshold 0 accepts whatever the target allows at all
    assert accept_sampled(flat, DraftTokens((2, 3), torch.zeros(2, vocab), threshold=0.0), sampling, g)[:2] == [2, 3]


def test_lookahead_under_pauses_and_a_small_pool(target):
    """max_utilization with a 14-block pool pauses requests mid-answer (their context recomputed on resume): the
    lookahead window survives, the answers stay the greedy ones."""
    la = LookaheadSizes(3, 3, 2)
    config = EngineConfig(max_batch_size=6, max_num_tokens=128, tokens_per_block=8, primary_blocks=14,
                          policy="max_utilization", lookahead=la)
    prompts = _prompts(6, seed=17)
    loop = target.engine(config)
    for i, p in enumerate(prompts):
        loop.add(str(i), p, StopRule(20), Sampling())
    out = {str(i): [] for i in range(len(prompts))}
    while not loop.idle:
        for key, token, _ in loop.step():
            out[key].append(token)
    assert sum(len(r.paused) for r in loop.records) > 0  # the pool was too small: requests were paused
    assert out == {str(i): _alone(target, p, StopRule(20)) for i, p in enumerate(prompts)}
