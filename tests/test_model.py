"""SuperTransformer, extracted SubTransformer, the encode/decode_step split, random SubTransformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hat_edge.errors import UserError
from hat_edge.model import ModelConfig, SubTransformer, SuperTransformer
from hat_edge.model.elastic import ElasticAttention, ElasticEmbedding, ElasticLayerNorm, ElasticLinear
from hat_edge.model.sub import next_token_log_probs, repeat_rows
from hat_edge.space import PRESETS, TRANSFORMER_BASE, TRANSFORMER_BIG, Arch, SearchSpace, SpaceError

torch.set_num_threads(1)

VOCAB = 100
TOL = 1e-5

# A small space whose encoder and decoder super widths differ (shared table sliced both ways).
UNEVEN = SearchSpace(
    name="uneven",
    encoder_embed_choice=(64, 48),
    decoder_embed_choice=(80, 32),
    encoder_ffn_embed_dim_choice=(96, 64),
    decoder_ffn_embed_dim_choice=(128, 48),
    encoder_layer_num_choice=(3,),
    decoder_layer_num_choice=(3, 2, 1),
    encoder_self_attention_heads_choice=(4, 2),
    decoder_self_attention_heads_choice=(4, 2),
    decoder_ende_attention_heads_choice=(4, 1),
    qkv_dim=32,
)


def _perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Noise on every parameter (biases, LayerNorm gains too), so a wrong slice cannot hide
    behind zero-initialised biases or unit gains."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _batch(seed: int, b: int = 2, s: int = 6, t: int = 5, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, s), generator=g)
    src[:, -1] = 3  # EOS
    src[-1, s - 2 :] = 0  # right padding in the last row
    src[-1, s - 3] = 3
    prev = torch.randint(4, vocab, (b, t), generator=g)
    prev[:, 0] = 2  # BOS
    prev[-1, -1] = 0  # target padding
    return src, prev


class _Supers(dict):
    """One SuperTransformer per preset, built on first use and reused across archs and tests
    (hat-wmt is ~100M parameters)."""

    def __missing__(self, name: str) -> SuperTransformer:
        torch.manual_seed(list(PRESETS).index(name))
        self[name] = _perturb(SuperTransformer(ModelConfig(vocab_size=VOCAB), PRESETS[name]), seed=len(self)).eval()
        return self[name]


@pytest.fixture(scope="module")
def supers() -> dict[str, SuperTransformer]:
    return _Supers()


def _parity_archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    archs = [space.largest(), space.smallest()] + space.sample_n(n - 2, seed=seed)
    # the draw must cover what the parity claim is about
    assert any(a.decoder_layer_num < space.max_decoder_layers for a in archs)
    assert any(any(c == 1 for c in a.decoder_arbitrary_ende_attn) for a in archs)
    assert any(any(c == 2 for c in a.decoder_arbitrary_ende_attn) for a in archs)
    assert any(any(c == -1 for c in a.decoder_arbitrary_ende_attn) for a in archs)
    return archs


# ------------------------------------------------------------------------------------------------
# SuperTransformer == extracted SubTransformer
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset",
    # hat-wmt copies ~45M weights per extract: ~15-25 s on a shared core
    [pytest.param(p, marks=pytest.mark.slow) if p == "hat-wmt" else p for p in PRESETS],
)
def test_extract_parity_50_archs(supers: dict[str, SuperTransformer], preset: str) -> None:
    sup = supers[preset]
    src, prev = _batch(1)
    worst = 0.0
    with torch.no_grad():
        for arch in _parity_archs(sup.space, 50, seed=11):
            want = sup(src, prev, arch)
            sub = sup.extract(arch).eval()
            got = sub(src, prev)
            assert got.shape == (2, 5, VOCAB)
            worst = max(worst, (want - got).abs().max().item())
            del sub
    assert worst <= TOL, f"{preset}: max abs diff {worst}"


def test_extract_parity_uneven_widths_and_untied_embeddings() -> None:
    for share in (True, False):
        torch.manual_seed(1)
        sup = _perturb(SuperTransformer(ModelConfig(vocab_size=50, share_all_embeddings=share), UNEVEN)).eval()
        src, prev = _batch(2, b=3, vocab=50)
        with torch.no_grad():
            for arch in _parity_archs(UNEVEN, 20, seed=3):
                diff = (sup(src, prev, arch) - sup.extract(arch).eval()(src, prev)).abs().max().item()
                assert diff <= TOL, (share, arch.describe(), diff)


def test_train_mode_dropout_matches_between_super_and_sub() -> None:
    # Same RNG stream, same dropout calls in the same order with the same scaled probabilities.
    sup = _perturb(SuperTransformer(ModelConfig(vocab_size=50, dropout=0.3, attention_dropout=0.1), UNEVEN))
    sup.train()
    src, prev = _batch(3, vocab=50)
    arch = UNEVEN.sample_n(3, seed=4)[2]
    sub = sup.extract(arch)
    assert sub.training
    assert sub.encoder_dropout == pytest.approx(0.3 * arch.encoder_embed_dim / 64)
    assert sub.decoder_dropout == pytest.approx(0.3 * arch.decoder_embed_dim / 80)
    with torch.no_grad():
        torch.manual_seed(7)
        want = sup(src, prev, arch)
        torch.manual_seed(7)
        got = sub(src, prev)
        torch.manual_seed(8)
        other = sub(src, prev)
    assert (want - got).abs().max().item() <= TOL
    assert (got - other).abs().max().item() > 1e-3  # dropout really is active


def test_extract_is_an_independent_copy_with_hat_param_count(supers: dict[str, SuperTransformer]) -> None:
    sup = supers["demo"]
    arch = sup.space.sample_n(5, seed=2)[4]
    before = sup.arch
    sub = sup.extract(arch)
    assert sup.arch == before  # extract leaves the active arch alone
    # every layer tensor is its own storage
    super_ptrs = {p.data_ptr() for p in sup.parameters()}
    assert not any(p.data_ptr() in super_ptrs for p in sub.parameters())
    # plain torch.nn layers only
    kinds = {type(m) for m in sub.modules()}
    assert not any(k.__module__.endswith("elastic") for k in kinds)
    assert {torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding} <= kinds
    # HAT's count (embeddings excluded) equals the layers' parameters
    layers = sum(p.numel() for n, p in sub.named_parameters() if "_layers." in n)
    assert layers == arch.params()
    # exact widths of a few layers
    d0 = sub.decoder_layers[0]
    assert d0.encoder_attn.k_proj.weight.shape == (arch.qkv_dim, arch.encoder_embed_dim)
    assert d0.ffn.fc1.weight.shape == (arch.decoder_ffn_embed_dim[0], arch.decoder_embed_dim)
    assert d0.encoder_attn.heads == arch.decoder_ende_attention_heads[0]


# ------------------------------------------------------------------------------------------------
# encode / decode_step
# ------------------------------------------------------------------------------------------------
def _step_through(sub: SubTransformer, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    enc = sub.encode(src)
    kv = sub.init_self_cache(src.size(0))
    outs = []
    for t in range(prev.size(1)):
        lp, *kv = sub.decode_step(prev[:, t : t + 1], torch.tensor([t]), *enc, *kv)
        assert all(k.size(2) == t + 1 for k in kv)
        outs.append(lp)
    return torch.stack(outs, dim=1)  # (B, T, V)


def test_forward_equals_stepping(supers: dict[str, SuperTransformer]) -> None:
    sup = supers["demo"]
    src, prev = _batch(5, b=3, t=7)
    prev[-1, -1] = 9  # no pad inside a decoded prefix
    with torch.no_grad():
        for arch in _parity_archs(sup.space, 8, seed=6):
            sub = sup.extract(arch).eval()
            full = next_token_log_probs(sub(src, prev), sub.pad_penalty)
            stepped = _step_through(sub, src, prev)
            assert stepped.dtype == torch.float32
            assert (full - stepped).abs().max().item() <= TOL, arch.describe()
            assert (stepped[..., sub.cfg.pad_id] < -1000).all()  # pad is never chosen


def test_encode_outputs_and_cache_spec(supers: dict[str, SuperTransformer]) -> None:
    sup = supers["demo"]
    arch = next(a for a in sup.space.sample_n(30, seed=9) if len(set(a.decoder_arbitrary_ende_attn)) > 1)
    sub = sup.extract(arch).eval()
    src, _ = _batch(4, b=2, s=7)
    with torch.no_grad():
        enc = sub.encode(src)
    spec = sub.cache_spec()
    assert len(enc) == 1 + len(spec.cross) == 1 + 2 * arch.decoder_layer_num
    bias = enc[0]
    assert bias.shape == (2, 7) and bias.dtype == torch.float32
    assert torch.isfinite(bias).all() and bias.min() < -1000 and bias[0].eq(0).all()
    for t, c in zip(enc[1:], spec.cross):
        n = arch.ende_layers(c.layer)
        assert t.shape == (2, c.shape[1], 7 * n, c.shape[3])
        assert c.shape[1] * c.shape[3] == arch.qkv_dim
    kv = sub.init_self_cache(2)
    for t, c in zip(kv, spec.self_attn):
        assert t.shape == (2, c.shape[1], 0, c.shape[3])
    assert spec.decode_inputs[:3] == ["tokens", "position", "src_bias"]
    assert len(spec.decode_inputs) == 3 + 4 * arch.decoder_layer_num
    assert spec.decode_outputs == ["log_probs"] + ["new_" + c.name for c in spec.self_attn]
    assert set(spec.dynamic_axes()) >= set(spec.decode_inputs[:1] + spec.decode_inputs[2:] + spec.decode_outputs)


def test_beam_rows_share_the_source_encoding(supers: dict[str, SuperTransformer]) -> None:
    sub = supers["demo"].extract(PRESETS["demo"].sample_n(2, seed=1)[1]).eval()
    src, _ = _batch(6, b=2)
    with torch.no_grad():
        enc = repeat_rows(sub.encode(src), 3)  # (6, ...) rows: sentence * 3 + k
        enc_direct = sub.encode(src.repeat_interleave(3, dim=0))
    for a, b in zip(enc, enc_direct):
        assert (a - b).abs().max().item() <= TOL


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace: still what exporters use
def test_trace_reuses_one_graph_across_shapes(supers: dict[str, SuperTransformer]) -> None:
    # No data-dependent Python control flow: a graph traced at (N=2, S=6, t=1) must give the same
    # numbers at other batch sizes, source lengths and cache lengths, including t = 0.
    arch = next(a for a in PRESETS["demo"].sample_n(20, seed=5) if 2 in a.decoder_arbitrary_ende_attn)
    sub = supers["demo"].extract(arch).eval()

    class Step(torch.nn.Module):
        def __init__(self, m: SubTransformer) -> None:
            super().__init__()
            self.m = m

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.m.decode_step(*args)

    class Enc(torch.nn.Module):
        def __init__(self, m: SubTransformer) -> None:
            super().__init__()
            self.m = m

        def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.m.encode(src)

    with torch.no_grad():
        src, _ = _batch(1, b=2, s=6)
        enc = sub.encode(src)
        first = sub.decode_step(torch.full((2, 1), 2), torch.tensor([0]), *enc, *sub.init_self_cache(2))
        args = (torch.full((2, 1), 7), torch.tensor([1]), *enc, *first[1:])
        traced_step = torch.jit.trace(Step(sub).eval(), args, check_trace=False)
        traced_enc = torch.jit.trace(Enc(sub).eval(), (src,), check_trace=False)

        src2, prev2 = _batch(2, b=3, s=9, t=4)
        prev2[-1, -1] = 5
        enc_e, enc_t = sub.encode(src2), traced_enc(src2)
        assert max((a - b).abs().max().item() for a, b in zip(enc_e, enc_t)) <= TOL
        kv_e = kv_t = sub.init_self_cache(3)
        for t in range(4):
            tok, pos = prev2[:, t : t + 1], torch.tensor([t])
            out_e = sub.decode_step(tok, pos, *enc_e, *kv_e)
            out_t = traced_step(tok, pos, *enc_t, *kv_t)
            assert (out_e[0] - out_t[0]).abs().max().item() <= TOL
            kv_e, kv_t = out_e[1:], out_t[1:]


# ------------------------------------------------------------------------------------------------
# SubTransformer.random
# ------------------------------------------------------------------------------------------------
def test_random_transformer_base_runs_all_paths() -> None:
    sub = SubTransformer.random(TRANSFORMER_BASE, vocab_size=120, seed=3)
    assert not sub.training
    assert sub.arch.qkv_dim == 512 and sub.decoder_layers[0].self_attn.heads == 8
    assert sum(p.numel() for n, p in sub.named_parameters() if "_layers." in n) == TRANSFORMER_BASE.params()
    src, prev = _batch(0, b=1, s=5, t=3, vocab=120)
    with torch.no_grad():
        logits = sub(src, prev)
        stepped = _step_through(sub, src, prev)
    assert logits.shape == (1, 3, 120)
    assert (next_token_log_probs(logits, sub.pad_penalty) - stepped).abs().max().item() <= TOL
    # positions are the model's own width (no SuperTransformer above it), standard scale
    assert sub.encoder_scale == math.sqrt(512) and sub.encoder_dropout == sub.cfg.dropout


def test_random_is_seeded_and_leaves_global_rng_alone() -> None:
    arch = PRESETS["demo"].smallest()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = SubTransformer.random(arch, 60, seed=5)
    after = torch.rand(1)
    assert before.item() == after.item()
    b = SubTransformer.random(arch, 60, seed=5)
    c = SubTransformer.random(arch, 60, seed=6)
    wa, wb, wc = (m.decoder_layers[0].ffn.fc1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_random_transformer_big_shapes() -> None:
    # One short forward only: Big has ~176M layer parameters.
    sub = SubTransformer.random(TRANSFORMER_BIG, vocab_size=64)
    assert sub.decoder_layers[5].encoder_attn.q_proj.weight.shape == (1024, 1024)
    assert sub.encoder_layers[0].ffn.fc1.weight.shape == (4096, 1024)
    assert sub.cache_spec().self_attn[0].shape == ("batch", 16, "past_len", 64)
    with torch.no_grad():
        logits = sub(torch.tensor([[5, 6, 7, 3]]), torch.tensor([[2, 5]]))
    assert logits.shape == (1, 2, 64) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------
# elastic behaviour
# ------------------------------------------------------------------------------------------------
def test_gradients_reach_only_the_active_slice() -> None:
    torch.manual_seed(2)
    sup = _perturb(SuperTransformer(ModelConfig(vocab_size=40, dropout=0.0), UNEVEN))
    arch = Arch(
        encoder_embed_dim=48, decoder_embed_dim=32, encoder_layer_num=3, decoder_layer_num=2,
        encoder_ffn_embed_dim=(64, 96, 64), encoder_self_attention_heads=(2, 4, 2),
        decoder_ffn_embed_dim=(48, 128), decoder_self_attention_heads=(4, 2),
        decoder_ende_attention_heads=(1, 4), decoder_arbitrary_ende_attn=(2, -1), qkv_dim=32,
    )
    src, prev = _batch(3, vocab=40)
    F.cross_entropy(sup(src, prev, arch).reshape(-1, 40), torch.randint(4, 40, (10,))).backward()

    def check(mod: torch.nn.Module, rows: int, cols: int, name: str) -> None:
        g = mod.weight.grad
        assert g is not None and g[:rows, :cols].abs().sum() > 0, name
        mask = torch.ones_like(g, dtype=torch.bool)
        mask[:rows, :cols] = False
        assert g[mask].abs().sum() == 0, name

    e, d = 48, 32
    for i, layer in enumerate(sup.encoder_layers):
        f = arch.encoder_ffn_embed_dim[i]
        check(layer.ffn.fc1, f, e, f"enc{i}.fc1")
        check(layer.ffn.fc2, e, f, f"enc{i}.fc2")
        check(layer.self_attn.q_proj, 32, e, f"enc{i}.q")
        check(layer.self_attn.out_proj, e, 32, f"enc{i}.out")
        assert layer.final_layer_norm.weight.grad[e:].abs().sum() == 0
        assert layer.ffn.fc1.bias.grad[f:].abs().sum() == 0
    for i in range(2):
        layer = sup.decoder_layers[i]
        check(layer.encoder_attn.k_proj, 32, e, f"dec{i}.cross_k")
        check(layer.encoder_attn.q_proj, 32, d, f"dec{i}.cross_q")
        check(layer.ffn.fc1, arch.decoder_ffn_embed_dim[i], d, f"dec{i}.fc1")
    # the third decoder layer is inactive: untouched
    assert all(p.grad is None for p in sup.decoder_layers[2].parameters())
    # shared table: only the first max(e, d) columns (the pad row does get gradient, through the
    # tied output projection's pad logit, as in fairseq)
    g = sup.embed_tokens.weight.grad
    assert g[:, max(e, d):].abs().sum() == 0 and g[:, :e].abs().sum() > 0


def test_elastic_layers_copy_their_active_slice() -> None:
    lin = ElasticLinear(10, 8)
    lin.set_active(6, 5)
    x = torch.randn(3, 6)
    assert torch.allclose(lin.to_static()(x), lin(x))
    assert lin.to_static().weight.shape == (5, 6)
    with pytest.raises(ValueError):
        lin.set_active(11, 5)
    ln = ElasticLayerNorm(10)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    ln.set_active(7)
    y = torch.randn(2, 7)
    assert torch.allclose(ln.to_static()(y), ln(y))
    att = _perturb(ElasticAttention(max_embed=16, max_kv_embed=12, qkv_dim=8, dropout=0.0)).eval()
    att.set_active(embed=10, kv_embed=6, heads=4)
    plain = att.to_static().eval()
    q_in, mem = torch.randn(2, 3, 10), torch.randn(2, 5, 6)
    assert plain.q_proj.weight.shape == (8, 10) and plain.k_proj.weight.shape == (8, 6) and plain.heads == 4
    assert torch.allclose(plain(q_in, *plain.project_kv(mem), None), att(q_in, *att.project_kv(mem), None))
    emb = ElasticEmbedding(20, 12, padding_idx=0)
    tok = torch.tensor([[0, 3, 19]])
    assert torch.equal(emb.to_static(5)(tok), emb(tok, 5))
    assert emb(tok, 5)[0, 0].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# errors and config
# ------------------------------------------------------------------------------------------------
def test_set_arch_outside_space_names_the_field(supers: dict[str, SuperTransformer]) -> None:
    sup = supers["demo"]
    before = sup.arch
    ok = sup.space.smallest()
    bad_embed = Arch.from_dict({**ok.to_dict(), "encoder_embed_dim": 320})
    with pytest.raises(SpaceError, match=r"encoder_embed_dim.*320.*allowed: \[192, 256\]"):
        sup.set_arch(bad_embed)
    bad_ffn = Arch.from_dict({**ok.to_dict(), "decoder_ffn_embed_dim": [1024]})
    with pytest.raises(SpaceError, match=r"decoder_ffn_embed_dim\[0\]"):
        sup(torch.tensor([[5, 3]]), torch.tensor([[2]]), bad_ffn)
    with pytest.raises(SpaceError, match="qkv_dim"):
        sup.set_arch(TRANSFORMER_BASE)
    assert sup.arch == before  # a rejected arch changes nothing


def test_model_config_round_trip_and_errors() -> None:
    cfg = ModelConfig(vocab_size=300, share_all_embeddings=False, dropout=0.1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown field 'hidden'"):
        ModelConfig.from_dict({"vocab_size": 10, "hidden": 3}, source="ckpt/meta.json")
    with pytest.raises(UserError, match="missing field 'vocab_size'"):
        ModelConfig.from_dict({})
    with pytest.raises(UserError, match="dropout"):
        ModelConfig(vocab_size=10, dropout=1.5)
