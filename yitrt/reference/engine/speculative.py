"""The speculative step of the reference slot: draft-target verification and lookahead decoding.

**Draft-target** (``draft_tokens_external``; reference/trtllm-serving-features.md §1.1): a request carries K draft
tokens. The target computes the prompt's uncached tail and the K draft tokens in one pass, takes the logits of the last
prompt position and of every draft position (K + 1 rows) and keeps the accepted prefix plus one token of its own:

- without draft logits, token-by-token exact match (EDTK ``acceptDraftTokensKernel``): draft token *i* is accepted iff it
  equals the token the target picks at that position (greedy: its argmax; sampled: a draw from its filtered
  distribution). The first mismatch is replaced by the target's token, which ends the step;
- with draft logits, speculative sampling: accept iff ``p_target(x) > u · p_draft(x)`` with ``u`` uniform from the
  request's seeded generator (or the request's constant ``draft_acceptance_threshold``); on rejection the token is drawn
  from ``normalise(max(0, p_target − p_draft))``; after K acceptances a bonus token is drawn from ``p_target``.
  Under greedy sampling ``p_target`` is one-hot, so both rules give the target's greedy tokens.

**Lookahead** (§1.2, after Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding"): each
step feeds, besides the sequence's pending tokens, a *lookahead branch* — a window of W columns and N − 1 levels of
Jacobi-iteration guesses (level 0, column 0 is the last real token) — and a *verification branch* of up to G candidate
(N − 1)-grams from the request's n-gram pool that start after the last real token. Every fed token is one row of the
packed step whose keys are the real prefix plus its own chain of ancestors (the tree TensorRT-LLM builds with its
mask), so its logits are exactly the target's for that chain. The longest candidate prefix that matches the target's
own greedy tokens is accepted (plus the target's next token); the window's diagonals give new N-grams for the pool; the
levels shift up by one. With W, N, G this feeds ``(W + G)(N − 1)`` tokens per step — TensorRT-LLM's
``maxDecodingTokens = max_draft_len + 1`` (``LookaheadSizes.decoding_tokens``). Lookahead is greedy only here: a
sampled request on a lookahead model decodes one token per step.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from yitrt.speculation import LookaheadSizes

#: n-grams kept per key token in a request's pool (oldest dropped first)
POOL_PER_KEY = 16


@dataclass(frozen=True)
class DraftTokens:
    """A draft-target verification request's draft (``draft_input_ids``, optional ``draft_logits`` [K, vocab] as a
    float32 tensor, optional ``draft_acceptance_threshold``)."""

    tokens: tuple[int, ...]
    logits: object = None
    threshold: float | None = None


def accept_greedy(picks: list[int], draft: tuple[int, ...]) -> list[int]:
    """Tokens a verification step emits from the target's greedy picks at the K + 1 positions: the draft's matching
    prefix, then the target's own token at the first mismatch (or after the whole draft)."""
    out = []
    for i, token in enumerate(picks):
        out.append(token)
        if i >= len(draft) or token != draft[i]:
            break
    return out


def accept_sampled(rows, draft: DraftTokens, sampling, generator) -> list[int]:
    """Tokens a verification step emits from the target's logits rows [K + 1, vocab] of a sampled (or draft-logits)
    request, by the rule of the module docstring."""
    import torch

    from yitrt.reference.runtime import filtered_scores

    p_target = filtered_scores(rows, sampling).softmax(dim=-1)  # [K+1, V]
    out: list[int] = []
    if draft.logits is None:
        for i in range(len(draft.tokens) + 1):
            token = int(torch.multinomial(p_target[i], 1, generator=generator)) if not sampling.greedy else int(p_target[i].argmax())
            out.append(token)
            if i >= len(draft.tokens) or token != draft.tokens[i]:
                break
        return out
    p_draft = filtered_scores(draft.logits.to(torch.float32), sampling).softmax(dim=-1)
    for i, token in enumerate(draft.tokens):
        u = draft.threshold if draft.threshold is not None else float(torch.rand((), generator=generator))
        if float(p_target[i, token]) > u * float(p_draft[i, token]):
            out.append(token)
            continue
        residual = (p_target[i] - p_draft[i]).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = p_target[i]
        out.append(int(residual.argmax()) if sampling.greedy else int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    last = p_target[len(draft.tokens)]
    out.append(int(last.argmax()) if sampling.greedy else int(torch.multinomial(last, 1, generator=generator)))
    return out


@dataclass
class LookaheadState:
    """One request's lookahead window and n-gram pool (greedy requests only).

    ``levels[0]`` holds columns 1 .. W−1 of level 0 (column 0 is the last real token, fed as the root); ``levels[l]`` for
    l ≥ 1 holds columns l .. l+W−1. A row ``(level l, column j)`` follows ``(l−1, j−1)``; level 0's column j follows
    column j−1; so every row's chain is level 0 up to column j−l, then one token per level along the diagonal.
    """

    sizes: LookaheadSizes
    levels: list[list[int]] = field(default_factory=list)
    pool: dict[int, collections.OrderedDict] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def start(cls, sizes: LookaheadSizes, prompt: list[int]) -> LookaheadState:
        """The initial window: guesses drawn from the prompt's tokens (deterministically, last tokens first), as the
        paper initialises it from the prompt."""
        w, n = sizes.window, sizes.ngram
        counts = [w - 1] + [w] * (n - 2)
        state = cls(sizes)
        i = 0
        for count in counts if n > 1 else []:
            level = []
            for _ in range(count):
                level.append(prompt[-1 - (i % len(prompt))])
                i += 1
            state.levels.append(level)
        return state

    @property
    def active(self) -> bool:
        return self.sizes.ngram > 1

    def rows(self, root: int, budget: int) -> tuple[list[tuple[int, int]], list[tuple[int, ...]]]:
        """The tree rows to feed after the root: ``(token, parent)`` with parent −1 for the root, else an index into the
        returned list; plus the verification candidates in the order their rows appear. Nothing when ``budget`` (rows
        the iteration has room for) cannot take the whole lookahead branch."""
        if not self.active:
            return [], []
        w, n = self.sizes.window, self.sizes.ngram
        window_rows = w * (n - 1) - 1
        if budget < window_rows:
            return [], []
        rows: list[tuple[int, int]] = []
        index: dict[tuple[int, int], int] = {}  # (level, column) → row; (0, 0) is the root
        for j, token in enumerate(self.levels[0], start=1):
            index[(0, j)] = len(rows)
            rows.append((token, index.get((0, j - 1), -1)))
        for level in range(1, n - 1):
            for j, token in enumerate(self.levels[level], start=level):
                index[(level, j)] = len(rows)
                rows.append((token, index.get((level - 1, j - 1), -1)))
        self._window_index = index
        candidates = list(self.pool.get(root, {}))[-self.sizes.verification_set:] if self.sizes.verification_set else []
        room = budget - window_rows
        chosen = []
        for cand in reversed(candidates):  # most recent first
            if room < len(cand):
                break
            parent = -1
            for token in cand:
                rows.append((token, parent))
                parent = len(rows) - 1
            chosen.append(cand)
            room -= len(cand)
        return rows, chosen

    def advance(self, root: int, root_pick: int, rows: list[tuple[int, int]], picks: list[int],
                candidates: list[tuple[int, ...]]) -> tuple[list[int], int]:
        """Take one step's greedy picks (``root_pick`` for the root, ``picks`` per row of ``rows``). Returns the tokens
        to emit (the longest verified candidate prefix + the target's next token) and the accepted draft count; updates
        the pool and shifts the window."""
        w, n = self.sizes.window, self.sizes.ngram
        self.steps += 1
        window_rows = w * (n - 1) - 1
        # verification: candidates' rows follow the window's, in order
        best: list[int] = [root_pick]
        at = window_rows
        for cand in candidates:
            out, expect = [root_pick], root_pick
            for k, token in enumerate(cand):
                if token != expect:
                    break
                expect = picks[at + k]
                out.append(expect)
            if len(out) > len(best):
                best = out
            at += len(cand)
        if not rows:
            return best, 0
        index = self._window_index
        pick = {key: picks[i] for key, i in index.items()}
        token_at = {(0, 0): root, **{key: rows[i][0] for key, i in index.items()}}
        pick[(0, 0)] = root_pick
        top = n - 2
        for s in range(w):  # the diagonal from level 0 column s up to the top level, plus the top row's pick
            gram = [token_at[(level, s + level)] for level in range(top + 1)] + [pick[(top, s + top)]]
            self._remember(gram[0], tuple(gram[1:]))
        # shift one Jacobi iteration (one position, as the paper's window does whatever was accepted): level l ← level
        # l+1, the top level ← the top rows' picks; level 0's first column is the next root, so it drops one guess
        new_top = [pick[(top, j)] for j in range(top, top + w)]
        if n == 2:
            self.levels = [new_top[1:]]
        else:
            shifted = [self.levels[level + 1] for level in range(1, n - 2)]
            self.levels = [self.levels[1][1:]] + shifted + [new_top]
        return best, len(best) - 1

    def _remember(self, key: int, gram: tuple[int, ...]) -> None:
        grams = self.pool.setdefault(key, collections.OrderedDict())
        grams.pop(gram, None)
        grams[gram] = None
        while len(grams) > POOL_PER_KEY:
            grams.popitem(last=False)
