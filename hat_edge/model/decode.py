"""Greedy and beam decoding of a torch model with the device's own search code.

The search itself (`greedy_search`, `beam_search`) lives in `hat_edge/runtime/decoding.py` and is
numpy-only, so the host and a device decode with the very same code; this module only supplies
torch step functions:

- cached (`use_cache=True`): `encode` once, then one `decode_step` per token; the self-attention
  cache grows and is reordered with the search's `order` (which previous row each row continues);
  cross-attention keys/values are computed once per source.
- uncached (`use_cache=False`): the whole prefix is run through the full teacher-forced decoder at
  every step (the reference the cache must reproduce token for token).

Both turn logits into log-probs the same way (`next_token_log_probs`: pad is never chosen).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from hat_edge.runtime.decoding import beam_search, greedy_search
from hat_edge.model.sub import SubTransformer, next_token_log_probs, repeat_rows
from hat_edge.model.super import SuperTransformer

Model = Union[SubTransformer, SuperTransformer]


def _as_sub(model: Model) -> SubTransformer:
    # A SuperTransformer decodes through its active arch's standalone copy (caches need the
    # SubTransformer's encode/decode_step split).
    return model.extract() if isinstance(model, SuperTransformer) else model


def _default_max_len(sub: SubTransformer, src_tokens: Tensor, max_len: Optional[int]) -> int:
    limit = sub.cfg.max_positions
    n = max_len if max_len is not None else 2 * src_tokens.size(1) + 10
    if n < 1:
        raise ValueError(f"max_len must be at least 1, got {n}")
    return min(n, limit)


class _CachedStep:
    """encode once; decode_step per token with a growing, reorderable self-attention cache."""

    def __init__(self, sub: SubTransformer, src_tokens: Tensor, rows_per_source: int) -> None:
        self.sub = sub
        enc = repeat_rows(sub.encode(src_tokens), rows_per_source)
        self.src_bias, self.cross = enc[0], enc[1:]
        n = src_tokens.size(0) * rows_per_source
        self.self_kv = sub.init_self_cache(n, device=src_tokens.device)
        self.t = 0
        self.device = src_tokens.device

    def __call__(self, tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
        if order is not None:
            idx = torch.from_numpy(order).to(self.device)
            self.self_kv = tuple(c.index_select(0, idx) for c in self.self_kv)
        tok = torch.from_numpy(tokens).to(self.device).view(-1, 1)  # (N, 1)
        pos = torch.tensor([self.t], dtype=torch.long, device=self.device)
        lprobs, *self.self_kv = self.sub.decode_step(tok, pos, self.src_bias, *self.cross, *self.self_kv)
        self.t += 1
        return lprobs.cpu().numpy()


class _FullStep:
    """Recompute the whole decoder over the prefix at every step (no cache)."""

    def __init__(self, sub: SubTransformer, src_tokens: Tensor, rows_per_source: int) -> None:
        self.sub = sub
        self.src = src_tokens.repeat_interleave(rows_per_source, dim=0)  # (N, S)
        self.prefix: Optional[Tensor] = None
        self.device = src_tokens.device

    def __call__(self, tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
        tok = torch.from_numpy(tokens).to(self.device).view(-1, 1)
        if self.prefix is None:
            self.prefix = tok
        else:
            prev = self.prefix
            if order is not None:  # each row continues row order[i] of the previous step
                prev = prev.index_select(0, torch.from_numpy(order).to(self.device))
            self.prefix = torch.cat([prev, tok], dim=1)  # (N, t+1)
        logits = self.sub(self.src, self.prefix)[:, -1]  # (N, V)
        return next_token_log_probs(logits, self.sub.pad_penalty).cpu().numpy()


def _run(model: Model, src_tokens: Tensor, rows_per_source: int, use_cache: bool, search) -> list[list[int]]:
    sub = _as_sub(model)
    was_training = sub.training
    sub.eval()
    try:
        with torch.inference_mode():
            step = (_CachedStep if use_cache else _FullStep)(sub, src_tokens, rows_per_source)
            return search(step, sub)
    finally:
        sub.train(was_training)


def greedy(
    model: Model,
    src_tokens: Tensor,
    max_len: Optional[int] = None,
    use_cache: bool = True,
    fixed_steps: bool = False,
    min_len: int = 0,
) -> list[list[int]]:
    """Greedy decoding of src_tokens (B, S); token ids per sentence without BOS/EOS.

    max_len: steps at most (EOS forced at the last one); None -> 2*S + 10, capped at max_positions.
    fixed_steps: exactly max_len steps, never EOS (latency measurement).
    """
    sub = _as_sub(model)
    n = _default_max_len(sub, src_tokens, max_len)
    return _run(sub, src_tokens, 1, use_cache,
                lambda step, s: greedy_search(step, src_tokens.size(0), s.cfg.bos_id, s.cfg.eos_id, n, fixed_steps,
                                              min_len=min_len))


def beam(
    model: Model,
    src_tokens: Tensor,
    beam: int = 5,
    max_len: Optional[int] = None,
    len_penalty: float = 1.0,
    use_cache: bool = True,
    fixed_steps: bool = False,
    min_len: int = 0,
) -> list[list[int]]:
    """Beam search of src_tokens (B, S); the best hypothesis per sentence without BOS/EOS.

    Scores are sum(log p) / len**len_penalty (runtime.decoding.beam_search); max_len as in `greedy`.
    """
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    sub = _as_sub(model)
    n = _default_max_len(sub, src_tokens, max_len)
    return _run(sub, src_tokens, beam, use_cache,
                lambda step, s: beam_search(step, src_tokens.size(0), beam, s.cfg.bos_id, s.cfg.eos_id, n,
                                            len_penalty, fixed_steps, min_len=min_len))


__all__ = ["greedy", "beam"]
