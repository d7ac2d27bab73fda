"""Greedy and beam search over a `step` function, numpy only.

The host (`hat_edge.model.decode`, the exporters' parity checks) and the device run this very code,
so a bundle decodes the same on both.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

# A step function: given the last token of every row (N,) and, from the second step on, which
# previous row each row continues (N,) so the callee can reorder its key/value cache, it returns
# log-probabilities (N, V) for the next token.
StepFn = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]
# A step function may also offer the search's part of the work: `step.topk(tokens, order, k)` runs
# the same step and returns, per row, only the k best log-probs (N, k) float32 and their token
# ids (N, k) int64, ordered by (-log-prob, id) (the graph's TopK), with `step.vocab_size` set.
# Beam search uses it when present and the full log-probs otherwise (and on its forced-EOS last
# step); the tokens chosen are the same either way. Each step calls exactly one of the two.
# Greedy search keeps the full log-probs: numpy's argmax over one row (~8 us at 32k) is cheaper
# than onnxruntime's TopK (~130 us), measured (docs/export.md).
TopKFn = Callable[[np.ndarray, Optional[np.ndarray], int], Tuple[np.ndarray, np.ndarray]]


def step_topk(step: StepFn) -> Optional[TopKFn]:
    """The step's top-k form, or None."""
    fn = getattr(step, "topk", None)
    return fn if callable(fn) else None


def greedy_search(
    step: StepFn,
    batch: int,
    bos: int,
    eos: int,
    max_len: int,
    fixed_steps: bool = False,
    min_len: int = 0,
) -> list[list[int]]:
    """Greedy decoding of `batch` sentences; returns token ids without BOS, up to and without EOS.

    fixed_steps: run exactly `max_len` steps and never stop at EOS (latency measurement, where
    random weights would otherwise end at an arbitrary step). min_len: EOS is banned for the first
    `min_len` steps (fairseq's --min-len, 1 in fairseq's generator: never an empty translation).
    """
    tokens = np.full((batch,), bos, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    order: Optional[np.ndarray] = None
    for t in range(max_len):
        lprobs = step(tokens, order)
        if fixed_steps or (t < min_len and t < max_len - 1):
            lprobs = lprobs.copy()
            lprobs[:, eos] = -np.inf
        nxt = lprobs.argmax(axis=-1).astype(np.int64)
        if t == max_len - 1 and not fixed_steps:
            nxt = np.where(done, nxt, eos)
        for i in range(batch):
            if not done[i]:
                if nxt[i] == eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if done.all():
            break
        tokens = nxt
        order = np.arange(batch, dtype=np.int64)
    return out


def _topk_stable(cand: np.ndarray, k: int) -> np.ndarray:
    """Per row, the flat indices of the k largest values, ordered by (-value, index).

    Same result as `np.argsort(-cand, kind="stable")[:, :k]`, but O(M) instead of O(M log M): a
    full sort of beam 5 x 32k candidates took ~90 ms per step on a busy core, more than a decoder
    step, and used to inflate every beam-search latency. Ties at the k-th value keep the lowest
    indices, as the full sort would.
    """
    rows, m = cand.shape
    if k >= m:
        return np.argsort(-cand, axis=1, kind="stable")[:, :k]
    out = np.empty((rows, k), dtype=np.int64)
    part = np.argpartition(cand, m - k, axis=1)[:, m - k :]  # the k largest, in no order
    for r in range(rows):
        kth = cand[r, part[r]].min()
        idx = np.flatnonzero(cand[r] >= kth)  # ascending, includes every tie at the k-th value
        if idx.size < k:  # only when NaNs are present: fall back to the full sort
            out[r] = np.argsort(-cand[r], kind="stable")[:k]
            continue
        out[r] = idx[np.argsort(-cand[r, idx], kind="stable")[:k]]
    return out


def _beam_candidates(row_scores: np.ndarray, lprobs: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k best (hypothesis, token) extensions of one sentence, as flat indices (row * V + token)
    and float64 scores, ordered by (-score, flat index).

    Exactly what a stable sort of all beam * V sums would give, at a fraction of the cost: the
    score of row j's extensions is row_scores[j] + lprobs[j] with a per-row constant, so the best k
    overall lie among each live row's own best k, found with an O(V) partition. Dead rows (score
    -inf) contribute nothing; at the first step only one row per sentence is live.
    row_scores (beam,) float64; lprobs (beam, V).
    """
    vocab = lprobs.shape[1]
    live = np.flatnonzero(np.isfinite(row_scores))
    if live.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    rows = lprobs if live.size == lprobs.shape[0] else lprobs[live]  # (L, V); no copy when all live
    top = _topk_stable(rows, min(k, vocab))  # (L, k') per row, ties to the lower token id
    picked = np.take_along_axis(rows, top, axis=1).astype(np.float64)
    sc = (row_scores[live][:, None] + picked).ravel()
    flat = (live[:, None] * vocab + top).ravel()
    best = np.lexsort((flat, -sc))[:k]  # by score, then by flat index
    return flat[best], sc[best]


def _beam_candidates_topk(row_scores: np.ndarray, values: np.ndarray, ids: np.ndarray, vocab: int, k: int,
                          ban: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """`_beam_candidates` from each row's own sorted top-k' (k' >= k, k' >= k + 1 when a token is
    banned): the same flat indices and scores, since the best k overall lie among each live row's
    best k that are not banned, and TopK orders ties by id as `_topk_stable` does."""
    live = np.flatnonzero(np.isfinite(row_scores))
    if live.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    v = values[live].astype(np.float64)
    i = ids[live].astype(np.int64)
    if ban is not None:
        v[i == ban] = -np.inf
    sc = (row_scores[live][:, None] + v).ravel()
    flat = (live[:, None] * vocab + i).ravel()
    best = np.lexsort((flat, -sc))[:k]
    return flat[best], sc[best]


def beam_search(
    step: StepFn,
    batch: int,
    beam: int,
    bos: int,
    eos: int,
    max_len: int,
    len_penalty: float = 1.0,
    fixed_steps: bool = False,
    min_len: int = 0,
) -> list[list[int]]:
    """Beam search; rows are laid out sentence-major (row = sentence * beam + k).

    fairseq's SequenceGenerator, step for step: the step function sees N = batch * beam rows from
    the first step; each step takes the 2 * beam best (hypothesis, token) candidates; an EOS among
    the first `beam` of them finishes that hypothesis with score sum(logp) / len**len_penalty (len
    counts EOS), an EOS further down is dropped; the next beam is the first `beam` non-EOS
    candidates; a sentence is done when it has `beam` finished hypotheses, or at max_len (EOS
    forced). EOS is banned for the first `min_len` steps (fairseq's generator uses 1). Ties are
    broken by the lower flat index, so any two backends with equal log-probs pick equal tokens.
    """
    n = batch * beam
    tokens = np.full((n,), bos, dtype=np.int64)
    # Only the first beam row of each sentence is live at step 0 (all rows are identical).
    scores = np.full((batch, beam), -np.inf, dtype=np.float64)
    scores[:, 0] = 0.0
    hyps: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    order: Optional[np.ndarray] = None
    topk = step_topk(step)
    vocab = int(getattr(step, "vocab_size", 0))
    for t in range(max_len):
        top: Optional[Tuple[np.ndarray, np.ndarray]] = None
        if topk is not None and vocab > 0 and (fixed_steps or t < max_len - 1):
            k = min(2 * beam, beam * vocab)
            banned = fixed_steps or t < min_len
            top = topk(tokens, order, min(vocab, k + 1 if banned else k))
        else:
            lprobs = np.asarray(step(tokens, order))  # (n, V), float32 from every backend
            vocab = lprobs.shape[-1]
            if fixed_steps or (t < min_len and t < max_len - 1):
                lprobs = lprobs.copy()
                lprobs[:, eos] = -np.inf
            elif t == max_len - 1:  # force EOS on the last step
                forced = np.full_like(lprobs, -np.inf)
                forced[:, eos] = lprobs[:, eos]
                lprobs = forced
            k = min(2 * beam, beam * vocab)
        new_tokens = np.full((n,), eos if not fixed_steps else bos, dtype=np.int64)
        new_order = np.zeros((n,), dtype=np.int64)
        new_scores = np.full((batch, beam), -np.inf, dtype=np.float64)
        new_hyps: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
        for b in range(batch):
            if done[b]:
                new_order[b * beam : (b + 1) * beam] = b * beam
                continue
            filled = 0
            rows = slice(b * beam, (b + 1) * beam)
            if top is not None:
                flats, cands = _beam_candidates_topk(scores[b], top[0][rows], top[1][rows], vocab, k,
                                                     eos if banned else None)
            else:
                flats, cands = _beam_candidates(scores[b], lprobs[rows], k)
            for rank, (flat, sc) in enumerate(zip(flats, cands)):
                if not np.isfinite(sc):
                    break
                src, tok = divmod(int(flat), vocab)
                if tok == eos and not fixed_steps:
                    # fairseq: only an EOS among the first `beam` candidates finishes a hypothesis
                    if rank < beam and len(finished[b]) < beam:
                        length = len(hyps[b][src]) + 1
                        finished[b].append((sc / (length**len_penalty), hyps[b][src]))
                    continue
                new_tokens[b * beam + filled] = tok
                new_order[b * beam + filled] = b * beam + src
                new_scores[b, filled] = sc
                new_hyps[b][filled] = hyps[b][src] + [tok]
                filled += 1
                if filled == beam:
                    break
            for j in range(filled, beam):  # dead rows: keep shape, never selected again
                new_order[b * beam + j] = b * beam
            # fairseq's rule: a sentence is done once it has `beam` finished hypotheses. (An earlier
            # version also had an "early stop" branch that could never fire; removed.)
            if len(finished[b]) >= beam or filled == 0:
                done[b] = True
        scores, hyps, tokens, order = new_scores, new_hyps, new_tokens, new_order
        if done.all():
            break
    out: list[list[int]] = []
    for b in range(batch):
        if finished[b]:
            out.append(max(finished[b], key=lambda x: x[0])[1])
        else:  # fixed_steps: the best live hypothesis
            out.append(hyps[b][int(np.argmax(scores[b]))])
    return out


def decode(step: StepFn, batch: int, beam: int, bos: int, eos: int, max_len: int, len_penalty: float = 1.0,
           fixed_steps: bool = False, min_len: int = 0) -> list[list[int]]:
    """Greedy when beam == 1, beam search otherwise (the step function then sees batch*beam rows)."""
    if beam <= 1:
        return greedy_search(step, batch, bos, eos, max_len, fixed_steps=fixed_steps, min_len=min_len)
    return beam_search(step, batch, beam, bos, eos, max_len, len_penalty, fixed_steps=fixed_steps, min_len=min_len)


# ------------------------------------------------------------------------------------------------
# 2. bundles
