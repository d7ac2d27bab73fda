"""Encoded sentence pairs and length-bucketed batches by token budget.

Batches are built much as fairseq does: shuffle, stable-sort by length, cut into
batches whose padded size `max(len) * n` stays within `max_tokens`, then shuffle the batch order.
Sentences of similar length share a batch, so little compute is spent on padding. Everything is a
pure function of (seed, epoch): a resumed run rebuilds the same epoch and skips to its position,
and every DDP rank builds the same list and takes its own share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hat_edge.data.corpus import ParallelCorpus
from hat_edge.data.tokenizer import BOS_ID, PAD_ID, Tokenizer
from hat_edge.errors import UserError


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of a corpus: each source and target ends with EOS (no BOS)."""

    src: tuple[np.ndarray, ...]
    tgt: tuple[np.ndarray, ...]
    pad_id: int = PAD_ID
    start_id: int = BOS_ID  # the decoder's first input token (fairseq's models start with EOS)

    def __len__(self) -> int:
        return len(self.src)

    @classmethod
    def from_corpus(cls, corpus: ParallelCorpus, tokenizer: Tokenizer) -> "EncodedPairs":
        """Both sides through the tokenizer, at the corpus's text level (raw, or HAT's BPE'd text)."""
        def enc(texts: Sequence[str], side: str) -> tuple[np.ndarray, ...]:
            ids = tokenizer.encode_batch(texts, side=side, level=corpus.level)
            return tuple(np.asarray(x, dtype=np.int32) for x in ids)

        return cls(enc(corpus.src, "src"), enc(corpus.tgt, "tgt"), int(tokenizer.pad_id),
                   int(getattr(tokenizer, "decoder_start_id", BOS_ID)))

    @property
    def src_lens(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.src), dtype=np.int64, count=len(self.src))

    @property
    def tgt_lens(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.tgt), dtype=np.int64, count=len(self.tgt))

    def filter_max_len(self, max_len: int) -> "EncodedPairs":
        """Drop pairs with a side longer than `max_len` tokens (training only; never for test)."""
        keep = [i for i in range(len(self)) if len(self.src[i]) <= max_len and len(self.tgt[i]) <= max_len]
        return self.select(keep)

    def truncate(self, max_len: int) -> "EncodedPairs":
        """Cut both sides to `max_len` tokens, keeping the final EOS (validation loss on long lines)."""
        def cut(x: np.ndarray) -> np.ndarray:
            return x if len(x) <= max_len else np.concatenate([x[: max_len - 1], x[-1:]])
        return EncodedPairs(tuple(cut(x) for x in self.src), tuple(cut(x) for x in self.tgt), self.pad_id, self.start_id)

    def select(self, indices: Sequence[int]) -> "EncodedPairs":
        return EncodedPairs(tuple(self.src[i] for i in indices), tuple(self.tgt[i] for i in indices),
                            self.pad_id, self.start_id)


@dataclass(frozen=True)
class Batch:
    """One padded batch. The decoder input `prev` is BOS + target without its last token (EOS)."""

    src: torch.Tensor  # (B, S) long, right-padded with PAD
    prev: torch.Tensor  # (B, T) long
    target: torch.Tensor  # (B, T) long, PAD where there is no token
    indices: tuple[int, ...]  # positions in the EncodedPairs
    pad_id: int = PAD_ID

    @property
    def ntokens(self) -> int:
        """Target tokens (the unit of the loss)."""
        return int((self.target != self.pad_id).sum())

    @property
    def nsentences(self) -> int:
        return int(self.src.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.src.to(device), self.prev.to(device), self.target.to(device), self.indices, self.pad_id)


def collate(pairs: EncodedPairs, indices: Sequence[int]) -> Batch:
    """Pad the pairs at `indices` into one Batch."""
    if not indices:
        raise ValueError("empty batch")
    srcs = [pairs.src[i] for i in indices]
    tgts = [pairs.tgt[i] for i in indices]
    B, S, T = len(indices), max(len(s) for s in srcs), max(len(t) for t in tgts)
    pad = pairs.pad_id
    src = np.full((B, S), pad, dtype=np.int64)
    prev = np.full((B, T), pad, dtype=np.int64)
    target = np.full((B, T), pad, dtype=np.int64)
    for b, (s, t) in enumerate(zip(srcs, tgts)):
        src[b, : len(s)] = s
        target[b, : len(t)] = t
        prev[b, 0] = pairs.start_id
        prev[b, 1 : len(t)] = t[:-1]
    return Batch(torch.from_numpy(src), torch.from_numpy(prev), torch.from_numpy(target), tuple(int(i) for i in indices),
                 pad)


def make_batches(
    src_lens: np.ndarray,
    tgt_lens: np.ndarray,
    max_tokens: int,
    max_sentences: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[tuple[int, ...]]:
    """Index batches, each with padded size `max(src, tgt length) * n <= max_tokens`.

    shuffle=False gives a fixed, length-sorted order (validation). A single pair longer than the
    budget gets a batch of its own rather than being dropped.
    """
    if max_tokens <= 0:
        raise UserError(f"max tokens per batch must be positive, got {max_tokens}")
    n = len(src_lens)
    lens = np.maximum(src_lens, tgt_lens)
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
    else:
        order = np.arange(n)
    # Stable sort by the longer side (what the budget counts), ties by total length; equal keys
    # keep the shuffled order. This pads less than sorting by one side (91.6% vs 89% real tokens
    # on the demo corpus).
    order = order[np.argsort((src_lens + tgt_lens)[order], kind="stable")]
    order = order[np.argsort(lens[order], kind="stable")]
    batches: list[tuple[int, ...]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order.tolist():
        new_max = max(cur_max, int(lens[i]))
        full = new_max * (len(cur) + 1) > max_tokens or (max_sentences is not None and len(cur) >= max_sentences)
        if cur and full:
            batches.append(tuple(cur))
            cur, new_max = [], int(lens[i])
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(tuple(cur))
    if shuffle:
        rng = np.random.default_rng([seed, epoch, 1])
        perm = rng.permutation(len(batches))
        batches = [batches[j] for j in perm]
    return batches


class EpochBatches:
    """The batches of one training step, for one rank: a pure function of (seed, epoch, step).

    Each optimizer step uses `update_freq` micro-batches on each of `world_size` ranks, taken from
    the epoch's batch list in order (step s, micro u, rank r -> batch (s * U + u) * W + r); the tail
    that does not fill a whole step is dropped (a different tail each epoch, as the order reshuffles).
    """

    def __init__(
        self,
        pairs: EncodedPairs,
        max_tokens: int,
        max_sentences: int | None = None,
        seed: int = 0,
        update_freq: int = 1,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if len(pairs) == 0:
            raise UserError("no training pairs left (all longer than the length limit?)")
        self.pairs = pairs
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences
        self.seed = seed
        self.update_freq = update_freq
        self.world_size = world_size
        self.rank = rank
        self._src_lens = pairs.src_lens
        self._tgt_lens = pairs.tgt_lens
        self._cache: tuple[int, list[tuple[int, ...]]] | None = None

    def epoch_batches(self, epoch: int) -> list[tuple[int, ...]]:
        if self._cache is None or self._cache[0] != epoch:
            b = make_batches(self._src_lens, self._tgt_lens, self.max_tokens, self.max_sentences, self.seed, epoch)
            self._cache = (epoch, b)
        return self._cache[1]

    def steps_in_epoch(self, epoch: int) -> int:
        n = len(self.epoch_batches(epoch)) // (self.update_freq * self.world_size)
        if n == 0:
            raise UserError(
                f"one epoch has {len(self.epoch_batches(epoch))} batches, fewer than update_freq x ranks = "
                f"{self.update_freq * self.world_size}: lower --max-tokens or --update-freq"
            )
        return n

    def step_indices(self, epoch: int, step_in_epoch: int) -> list[tuple[int, ...]]:
        """The `update_freq` index batches this rank uses for one optimizer step."""
        b = self.epoch_batches(epoch)
        U, W = self.update_freq, self.world_size
        return [b[(step_in_epoch * U + u) * W + self.rank] for u in range(U)]

    def step_batches(self, epoch: int, step_in_epoch: int) -> list[Batch]:
        return [collate(self.pairs, idx) for idx in self.step_indices(epoch, step_in_epoch)]
