"""The speculative-decoding facts every stage shares (yitrt/speculation.py): lookahead's max_draft_len formula against
the reference's worked examples, the legality rules of TensorRT-LLM's LookaheadDecodingConfig, draft lengths, modes."""

from __future__ import annotations

import pytest

from yitrt.errors import UsageError
from yitrt.speculation import (
    ENGINE_MODE_FLAGS,
    LookaheadSizes,
    check_draft_len,
    engine_mode,
    lookahead_max_draft_len,
    parse_lookahead,
    unsupported_reason,
)


@pytest.mark.parametrize("sizes, draft_len", [
    ((7, 7, 7), 83),  # examples/lookahead README's build example: --max_draft_len=83
    ((4, 3, 4), 15),  # the executor defaults
    ((7, 5, 3), 39),
    ((1, 1, 0), 0),  # plain decoding
    ((2, 2, 1), 2),  # the smallest meaningful configuration
    ((5, 2, 0), 4),  # N = 2: N − 2 = 0, (W − 1 + G)(N − 1) = 4
])
def test_max_draft_len_is_the_references_formula(sizes, draft_len):
    assert lookahead_max_draft_len(*sizes) == draft_len
    la = LookaheadSizes(*sizes)
    assert la.max_draft_len == draft_len and la.decoding_tokens == draft_len + 1
    w, n, g = sizes
    assert la.decoding_tokens == max(1, (w + g) * (n - 1))  # the tokens one step feeds: (W + G)(N − 1)


@pytest.mark.parametrize("sizes, message", [
    ((0, 3, 4), "window must be >= 1"),
    ((4, 0, 4), "ngram must be >= 1"),
    ((4, 3, -1), "verification_set must be >= 0"),
    ((4, 1, 0), "ngram 1 needs window 1 and verification_set 0"),
    ((1, 1, 2), "ngram 1 needs window 1 and verification_set 0"),
    ((4, 3, True), "verification_set must be an integer"),
])
def test_illegal_lookahead_sizes_are_refused(sizes, message):
    with pytest.raises(UsageError, match=message):
        LookaheadSizes(*sizes)


def test_request_sizes_must_fit_the_models():
    model = LookaheadSizes(4, 3, 4)
    assert model.covers(LookaheadSizes(2, 2, 1)) and model.covers(LookaheadSizes(1, 1, 0)) and model.covers(model)
    assert not model.covers(LookaheadSizes(5, 3, 4)) and not model.covers(LookaheadSizes(4, 4, 4))


def test_parse_and_draft_lengths():
    assert parse_lookahead(" 4, 3 ,4") == LookaheadSizes(4, 3, 4)
    with pytest.raises(UsageError, match="not three integers"):
        parse_lookahead("4,3")
    assert check_draft_len(4) == 4
    for bad in (0, 65, True, 2.0):
        with pytest.raises(UsageError, match="from 1 to 64"):
            check_draft_len(bad)


def test_engine_modes_and_unsupported_ones():
    assert engine_mode(2) == "draft_tokens_external" and engine_mode(8) == "lookahead_decoding" and engine_mode(1) is None
    assert engine_mode("SpeculativeDecodingMode.LOOKAHEAD_DECODING") == "lookahead_decoding"
    with pytest.raises(ValueError):
        engine_mode(3)
    assert set(ENGINE_MODE_FLAGS.values()) >= {None, "draft_tokens_external", "lookahead_decoding", "medusa", "eagle"}
    assert "no EAGLE heads exist for Yi" in unsupported_reason("eagle") and unsupported_reason("draft_tokens_external") is None
