"""Greedy and beam decoding: the key/value cache reproduces full recomputation token for token."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from hat_edge.model import ModelConfig, SubTransformer, SuperTransformer
from hat_edge.model.decode import beam, greedy
from hat_edge.space import PRESETS, Arch, SearchSpace

torch.set_num_threads(1)

V = 16
TINY = SearchSpace(
    name="tiny",
    encoder_embed_choice=(32, 24),
    decoder_embed_choice=(32, 24),
    encoder_ffn_embed_dim_choice=(64, 32),
    decoder_ffn_embed_dim_choice=(64, 32),
    encoder_layer_num_choice=(3,),
    decoder_layer_num_choice=(3, 2, 1),
    encoder_self_attention_heads_choice=(4, 2),
    decoder_self_attention_heads_choice=(4, 2),
    decoder_ende_attention_heads_choice=(4, 2),
    qkv_dim=32,
)


def _reversal_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded sources ending in EOS; targets are the reversed tokens then EOS."""
    lengths = torch.randint(2, 7, (n,), generator=g)
    s = int(lengths.max()) + 1
    src = torch.zeros(n, s, dtype=torch.long)
    prev = torch.zeros(n, s, dtype=torch.long)
    tgt = torch.zeros(n, s, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        toks = torch.randint(4, V, (length,), generator=g)
        src[i, :length], src[i, length] = toks, 3
        tgt[i, :length], tgt[i, length] = toks.flip(0), 3
        prev[i, 0], prev[i, 1 : length + 1] = 2, toks.flip(0)
    return src, prev, tgt


@pytest.fixture(scope="module")
def trained() -> tuple[SuperTransformer, torch.Tensor]:
    """A tiny SuperTransformer trained for a few seconds on string reversal.

    Random weights decode degenerate sequences (one token repeated to max_len); a little training
    gives varied tokens, EOS at different steps and beams that disagree with greedy, which is what
    makes cached-vs-uncached equality meaningful.
    """
    torch.manual_seed(0)
    model = SuperTransformer(ModelConfig(vocab_size=V, dropout=0.0, attention_dropout=0.0), TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for step in range(100):
        src, prev, tgt = _reversal_batch(g, 32)
        arch = TINY.sample(rng) if step % 2 else TINY.largest()
        opt.zero_grad()
        F.cross_entropy(model(src, prev, arch).reshape(-1, V), tgt.reshape(-1), ignore_index=0).backward()
        opt.step()
    model.eval()
    src, _, _ = _reversal_batch(torch.Generator().manual_seed(1), 6)
    assert (src == 0).any()  # the decoding batch has padding
    return model, src


def _archs() -> list[Arch]:
    archs = [TINY.largest(), TINY.smallest()] + TINY.sample_n(4, seed=3)
    assert any(a.decoder_layer_num < 3 for a in archs)
    assert {1, 2} <= {c for a in archs for c in a.decoder_arbitrary_ende_attn}
    return archs


def test_cached_greedy_equals_full_recomputation(trained: tuple[SuperTransformer, torch.Tensor]) -> None:
    model, src = trained
    lengths = set()
    for arch in _archs():
        sub = model.extract(arch)
        cached = greedy(sub, src, max_len=10)
        full = greedy(sub, src, max_len=10, use_cache=False)
        assert cached == full, arch.describe()
        assert len(cached) == src.size(0)
        assert all(tok not in (0, 2, 3) for hyp in cached for tok in hyp)  # no pad/BOS/EOS inside
        lengths |= {len(h) for h in cached}
    # not degenerate: hypotheses end at different steps, some before max_len (EOS emitted)
    assert len(lengths) >= 3 and min(lengths) < 9


@pytest.mark.parametrize("len_penalty", [1.0, 0.6])
def test_cached_beam_equals_full_recomputation(
    trained: tuple[SuperTransformer, torch.Tensor], len_penalty: float
) -> None:
    model, src = trained
    differs_from_greedy = 0
    for arch in _archs():
        sub = model.extract(arch)
        cached = beam(sub, src, beam=4, max_len=10, len_penalty=len_penalty)
        full = beam(sub, src, beam=4, max_len=10, len_penalty=len_penalty, use_cache=False)
        assert cached == full, arch.describe()
        differs_from_greedy += cached != greedy(sub, src, max_len=10)
    assert differs_from_greedy > 0  # the beams really search


def test_beam_of_one_is_greedy(trained: tuple[SuperTransformer, torch.Tensor]) -> None:
    model, src = trained
    for arch in _archs()[:3]:
        sub = model.extract(arch)
        assert beam(sub, src, beam=1, max_len=10) == greedy(sub, src, max_len=10)


def test_fixed_steps_runs_exactly_max_len(trained: tuple[SuperTransformer, torch.Tensor]) -> None:
    model, src = trained
    sub = model.extract(_archs()[2])
    for use_cache in (True, False):
        g = greedy(sub, src, max_len=7, use_cache=use_cache, fixed_steps=True)
        b = beam(sub, src, beam=3, max_len=7, use_cache=use_cache, fixed_steps=True)
        assert [len(h) for h in g] == [7] * src.size(0)
        assert [len(h) for h in b] == [7] * src.size(0)
    assert greedy(sub, src, max_len=7, fixed_steps=True) == greedy(
        sub, src, max_len=7, use_cache=False, fixed_steps=True
    )
    assert beam(sub, src, beam=3, max_len=7, fixed_steps=True) == beam(
        sub, src, beam=3, max_len=7, use_cache=False, fixed_steps=True
    )


def test_padding_does_not_leak_between_rows(trained: tuple[SuperTransformer, torch.Tensor]) -> None:
    model, src = trained
    sub = model.extract(_archs()[3])
    batched = beam(sub, src, beam=3, max_len=10)
    for i in range(src.size(0)):
        row = src[i : i + 1, : int((src[i] != 0).sum())]  # the sentence alone, unpadded
        assert beam(sub, row, beam=3, max_len=10) == [batched[i]]


def test_super_transformer_decodes_through_extract(trained: tuple[SuperTransformer, torch.Tensor]) -> None:
    model, src = trained
    arch = _archs()[4]
    model.set_arch(arch)
    assert greedy(model, src, max_len=8) == greedy(model.extract(arch), src, max_len=8)
    assert beam(model, src, beam=2, max_len=8, use_cache=False) == beam(model.extract(arch), src, beam=2, max_len=8)
    model.set_arch(TINY.largest())


def test_decoding_runs_in_eval_mode_and_restores_training() -> None:
    sub = SubTransformer.random(PRESETS["demo"].smallest(), vocab_size=40, seed=1, dropout=0.3)
    src = torch.tensor([[5, 9, 11, 3], [7, 8, 3, 0]])
    want = greedy(sub, src, max_len=6)
    sub.train()
    assert greedy(sub, src, max_len=6) == want  # dropout off while decoding
    assert sub.training
    with pytest.raises(ValueError, match="beam"):
        beam(sub, src, beam=0)
