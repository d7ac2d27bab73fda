"""The on-device runner. ONE self-contained file: standard library + numpy + the chosen runtime.

hat_edge is not installed on a device; this file is copied there and run as a script. Everything it
needs (bundle loading, the decoding loop, timing statistics) lives here, and the host imports the
same functions, so host and device decode with the very same code.

Sections:
  1. decoding: greedy and beam search over a `step` function (numpy only)
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

# A step function: given the last token of every row (N,) and, from the second step on, which
# previous row each row continues (N,) so the callee can reorder its key/value cache, it returns
# log-probabilities (N, V) for the next token.
StepFn = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]


# ------------------------------------------------------------------------------------------------
# 1. decoding
# ------------------------------------------------------------------------------------------------
def greedy_search(
    step: StepFn,
    batch: int,
    bos: int,
    eos: int,
    max_len: int,
    fixed_steps: bool = False,
) -> list[list[int]]:
    """Greedy decoding of `batch` sentences; returns token ids without BOS, up to and without EOS.

    fixed_steps: run exactly `max_len` steps and never stop at EOS (latency measurement, where
    random weights would otherwise end at an arbitrary step).
    """
    tokens = np.full((batch,), bos, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    order: Optional[np.ndarray] = None
    for t in range(max_len):
        lprobs = step(tokens, order)
        if fixed_steps:
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


def beam_search(
    step: StepFn,
    batch: int,
    beam: int,
    bos: int,
    eos: int,
    max_len: int,
    len_penalty: float = 1.0,
    fixed_steps: bool = False,
) -> list[list[int]]:
    """Beam search; rows are laid out sentence-major (row = sentence * beam + k).

    The step function sees N = batch * beam rows from the first step. A hypothesis that emits EOS
    is finished with score sum(logp) / len**len_penalty (len counts EOS); a sentence is done when it
    has `beam` finished hypotheses whose best cannot be beaten, or at max_len (EOS forced). Ties are
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
    for t in range(max_len):
        lprobs = step(tokens, order).astype(np.float64)
        vocab = lprobs.shape[-1]
        if fixed_steps:
            lprobs[:, eos] = -np.inf
        elif t == max_len - 1:  # force EOS on the last step
            forced = np.full_like(lprobs, -np.inf)
            forced[:, eos] = lprobs[:, eos]
            lprobs = forced
        cand = (scores[:, :, None] + lprobs.reshape(batch, beam, vocab)).reshape(batch, beam * vocab)
        k = min(2 * beam, beam * vocab)
        # stable top-k: sort by (-score, index) so ties go to the lower flat index
        top = np.argsort(-cand, axis=1, kind="stable")[:, :k]
        new_tokens = np.full((n,), eos if not fixed_steps else bos, dtype=np.int64)
        new_order = np.zeros((n,), dtype=np.int64)
        new_scores = np.full((batch, beam), -np.inf, dtype=np.float64)
        new_hyps: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
        for b in range(batch):
            if done[b]:
                new_order[b * beam : (b + 1) * beam] = b * beam
                continue
            filled = 0
            for flat in top[b]:
                sc = cand[b, flat]
                if not np.isfinite(sc):
                    break
                src, tok = divmod(int(flat), vocab)
                if tok == eos and not fixed_steps:
                    length = len(hyps[b][src]) + 1
                    if len(finished[b]) < beam:
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
            if len(finished[b]) >= beam or filled == 0:
                done[b] = True
            elif finished[b] and not fixed_steps:
                # Early stop: the best live score can only drop; compare with its best normalised
                # value, reached at max_len for len_penalty > 0.
                best_done = max(s for s, _ in finished[b])
                best_live = new_scores[b, 0] / (max_len**len_penalty if len_penalty > 0 else 1)
                if best_done >= best_live and len(finished[b]) >= beam:
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
