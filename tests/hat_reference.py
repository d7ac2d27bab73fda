"""An independent re-implementation of HAT's TransformerSuperModel and fairseq's generator, for tests.

Written from HAT's code (mit-han-lab/hardware-aware-transformers, MIT; read, not copied):
`fairseq/models/transformer_super.py` (encoder/decoder, set_sample_config, arbitrary
encoder-decoder attention with `encoder_out_all`), `fairseq/modules/multihead_attention_super.py`
(fused `in_proj_weight` sliced as `weight[start:end, :sample_dim]`, scaling (qkv_dim/heads)^-0.5,
-inf key padding), `fairseq/modules/embedding_super.py`, fairseq's `SinusoidalPositionalEmbedding`
and `make_positions` (left-padded sources, as fairseq's translation task pads them), and
`fairseq/sequence_generator.py` (beam search: 2*beam candidates, EOS finalized among the first
beam only, min_len 1, EOS forced at max_len, score / len**lenpen).

It works in fairseq's (T, B, C) layout on HAT's own state-dict keys, so it shares no code and no
layout with hat-edge's model: a test that compares the two compares two implementations.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F

BOS, PAD, EOS, UNK = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------
# a HAT checkpoint: args and a state dict with HAT's keys
# ------------------------------------------------------------------------------------------------
def hat_args(**over: Any) -> argparse.Namespace:
    a = dict(
        arch="transformersuper_wmt_en_de", encoder_embed_dim=64, decoder_embed_dim=64,
        encoder_ffn_embed_dim=128, decoder_ffn_embed_dim=128, encoder_layers=3, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, qkv_dim=64,
        encoder_embed_choice=[64, 48], decoder_embed_choice=[64, 48],
        encoder_ffn_embed_dim_choice=[128, 96, 64], decoder_ffn_embed_dim_choice=[128, 96, 64],
        encoder_layer_num_choice=[3], decoder_layer_num_choice=[3, 2, 1],
        encoder_self_attention_heads_choice=[4, 2], decoder_self_attention_heads_choice=[4, 2],
        decoder_ende_attention_heads_choice=[4, 2], decoder_arbitrary_ende_attn_choice=[-1, 1, 2],
        share_all_embeddings=True, share_decoder_input_output_embed=True, dropout=0.3, attention_dropout=0.1,
        activation_dropout=0.0, activation_fn="relu", encoder_normalize_before=False, decoder_normalize_before=False,
        encoder_learned_pos=False, decoder_learned_pos=False, no_token_positional_embeddings=False,
        adaptive_softmax_cutoff=None, vocab_original_scaling=False, max_source_positions=1024,
        max_target_positions=1024, decoder_output_dim=64, source_lang="en", target_lang="de", lr=[1e-7],
    )
    a.update(over)
    return argparse.Namespace(**a)


def hat_state(args: argparse.Namespace, src_v: int, tgt_v: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under HAT's key names and super shapes (layer norms away from 1/0, so a
    mix-up of any tensor changes the outputs)."""
    g = torch.Generator().manual_seed(seed)
    E, D, q = args.encoder_embed_dim, args.decoder_embed_dim, args.qkv_dim

    def r(*shape: int, scale: float | None = None) -> torch.Tensor:
        s = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
        return torch.randn(*shape, generator=g) * s

    st: dict[str, torch.Tensor] = {}
    emb = r(src_v, E, scale=E**-0.5)
    emb[PAD] = 0
    st["encoder.embed_tokens.weight"] = emb
    if args.share_all_embeddings:
        st["decoder.embed_tokens.weight"] = emb.clone()
    else:
        d = r(tgt_v, D, scale=D**-0.5)
        d[PAD] = 0
        st["decoder.embed_tokens.weight"] = d
        if not args.share_decoder_input_output_embed:
            st["decoder.embed_out"] = r(tgt_v, D)
    st["encoder.version"] = torch.tensor([3.0])
    st["decoder.version"] = torch.tensor([3.0])
    st["encoder.embed_positions._float_tensor"] = torch.zeros(1)
    st["decoder.embed_positions._float_tensor"] = torch.zeros(1)

    def attn(p: str, qin: int, kvin: int) -> None:
        if qin == kvin:
            st[f"{p}.in_proj_weight"] = r(3 * q, qin)
        else:
            st[f"{p}.q_proj_weight"], st[f"{p}.k_proj_weight"], st[f"{p}.v_proj_weight"] = r(q, qin), r(q, kvin), r(q, kvin)
        st[f"{p}.in_proj_bias"] = r(3 * q)
        st[f"{p}.out_proj.weight"], st[f"{p}.out_proj.bias"] = r(qin, q), r(qin)

    def norm(p: str, dim: int) -> None:
        st[f"{p}.weight"], st[f"{p}.bias"] = 1.0 + r(dim), r(dim)

    for i in range(args.encoder_layers):
        p = f"encoder.layers.{i}"
        attn(f"{p}.self_attn", E, E)
        st[f"{p}.fc1.weight"], st[f"{p}.fc1.bias"] = r(args.encoder_ffn_embed_dim, E), r(args.encoder_ffn_embed_dim)
        st[f"{p}.fc2.weight"], st[f"{p}.fc2.bias"] = r(E, args.encoder_ffn_embed_dim), r(E)
        norm(f"{p}.self_attn_layer_norm", E)
        norm(f"{p}.final_layer_norm", E)
    for i in range(args.decoder_layers):
        p = f"decoder.layers.{i}"
        attn(f"{p}.self_attn", D, D)
        attn(f"{p}.encoder_attn", D, E)
        st[f"{p}.fc1.weight"], st[f"{p}.fc1.bias"] = r(args.decoder_ffn_embed_dim, D), r(args.decoder_ffn_embed_dim)
        st[f"{p}.fc2.weight"], st[f"{p}.fc2.bias"] = r(D, args.decoder_ffn_embed_dim), r(D)
        for n in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            norm(f"{p}.{n}", D)
    return st


def hat_config(arch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """HAT's set_sample_config dict from a hat-edge arch dict."""
    return {
        "encoder": {k: arch[k] for k in ("encoder_embed_dim", "encoder_layer_num", "encoder_ffn_embed_dim",
                                         "encoder_self_attention_heads")},
        "decoder": {k: arch[k] for k in ("decoder_embed_dim", "decoder_layer_num", "decoder_ffn_embed_dim",
                                         "decoder_self_attention_heads", "decoder_ende_attention_heads",
                                         "decoder_arbitrary_ende_attn")},
    }


# ------------------------------------------------------------------------------------------------
# the reference model
# ------------------------------------------------------------------------------------------------
def _sinusoids(num: int, dim: int) -> torch.Tensor:
    half = dim // 2
    f = math.log(10000) / (half - 1)
    f = torch.exp(torch.arange(half, dtype=torch.float) * -f)
    a = torch.arange(num, dtype=torch.float).unsqueeze(1) * f.unsqueeze(0)
    t = torch.cat([torch.sin(a), torch.cos(a)], dim=1).view(num, -1)
    if dim % 2 == 1:
        t = torch.cat([t, torch.zeros(num, 1)], dim=1)
    t[PAD, :] = 0
    return t


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    """fairseq's make_positions: pad + 1, pad + 2, ... over the non-pad tokens; pad stays pad."""
    mask = tokens.ne(PAD).long()
    return torch.cumsum(mask, dim=1) * mask + PAD


class HatReference:
    """HAT's TransformerSuperModel forward in eval mode, on HAT's state dict."""

    def __init__(self, args: argparse.Namespace, state: dict[str, torch.Tensor]) -> None:
        self.a, self.s = args, {k: v.float() for k, v in state.items()}
        self.q = args.qkv_dim
        self.enc_pos = _sinusoids(1024 + PAD + 1, args.encoder_embed_dim)
        self.dec_pos = _sinusoids(1024 + PAD + 1, args.decoder_embed_dim)
        self.c: dict[str, dict[str, Any]] = {}

    def set_sample_config(self, config: dict[str, dict[str, Any]]) -> None:
        self.c = config

    def _attn(self, p: str, query: torch.Tensor, kv: torch.Tensor, heads: int, qdim: int, kvdim: int,
              key_pad: torch.Tensor | None, attn_mask: torch.Tensor | None, self_attn: bool) -> torch.Tensor:
        s, q = self.s, self.q
        T, B, _ = query.shape
        bias = s[f"{p}.in_proj_bias"]
        if f"{p}.in_proj_weight" in s:
            w = s[f"{p}.in_proj_weight"]
            if self_attn:
                qq, kk, vv = F.linear(query, w[:, :qdim], bias).chunk(3, dim=-1)
            else:
                qq = F.linear(query, w[:q, :qdim], bias[:q])
                kk = F.linear(kv, w[q : 2 * q, :kvdim], bias[q : 2 * q])
                vv = F.linear(kv, w[2 * q :, :kvdim], bias[2 * q :])
        else:
            qq = F.linear(query, s[f"{p}.q_proj_weight"][..., :qdim], bias[:q])
            kk = F.linear(kv, s[f"{p}.k_proj_weight"][..., :kvdim], bias[q : 2 * q])
            vv = F.linear(kv, s[f"{p}.v_proj_weight"][..., :kvdim], bias[2 * q :])
        hd = q // heads
        qq = qq * hd**-0.5
        qq = qq.contiguous().view(T, B * heads, hd).transpose(0, 1)
        kk = kk.contiguous().view(-1, B * heads, hd).transpose(0, 1)
        vv = vv.contiguous().view(-1, B * heads, hd).transpose(0, 1)
        S = kk.size(1)
        w_ = torch.bmm(qq, kk.transpose(1, 2))
        if attn_mask is not None:
            w_ = w_ + attn_mask.unsqueeze(0)
        if key_pad is not None:
            w_ = w_.view(B, heads, T, S).masked_fill(key_pad.unsqueeze(1).unsqueeze(2), float("-inf")).view(B * heads, T, S)
        w_ = torch.softmax(w_.float(), dim=-1)
        o = torch.bmm(w_, vv).transpose(0, 1).contiguous().view(T, B, q)
        return F.linear(o, s[f"{p}.out_proj.weight"][:qdim, :], s[f"{p}.out_proj.bias"][:qdim])

    def _ln(self, p: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        return F.layer_norm(x, (dim,), self.s[f"{p}.weight"][:dim], self.s[f"{p}.bias"][:dim])

    def _ffn(self, p: str, x: torch.Tensor, dim: int, ffn: int) -> torch.Tensor:
        h = F.relu(F.linear(x, self.s[f"{p}.fc1.weight"][:ffn, :dim], self.s[f"{p}.fc1.bias"][:ffn]))
        return F.linear(h, self.s[f"{p}.fc2.weight"][:dim, :ffn], self.s[f"{p}.fc2.bias"][:dim])

    @torch.no_grad()
    def encode(self, src: torch.Tensor) -> dict[str, Any]:
        e = self.c["encoder"]
        E = e["encoder_embed_dim"]
        x = math.sqrt(E) * F.embedding(src, self.s["encoder.embed_tokens.weight"][:, :E], PAD)
        x = x + self.enc_pos.index_select(0, _positions(src).view(-1)).view(*src.shape, -1)[..., :E]
        x = x.transpose(0, 1)
        pad = src.eq(PAD)
        pad = pad if pad.any() else None
        outs = []
        for i in range(self.a.encoder_layers):
            if i < e["encoder_layer_num"]:
                p = f"encoder.layers.{i}"
                r = x
                x = self._attn(f"{p}.self_attn", x, x, e["encoder_self_attention_heads"][i], E, E, pad, None, True)
                x = self._ln(f"{p}.self_attn_layer_norm", r + x, E)
                r = x
                x = self._ln(f"{p}.final_layer_norm", r + self._ffn(p, x, E, e["encoder_ffn_embed_dim"][i]), E)
            outs.append(x)
        return {"out": x, "all": outs, "pad": pad}

    @torch.no_grad()
    def decode(self, prev: torch.Tensor, enc: dict[str, Any]) -> torch.Tensor:
        """prev (B, T) -> log-probs (B, T, V)."""
        d, E = self.c["decoder"], self.c["encoder"]["encoder_embed_dim"]
        D = d["decoder_embed_dim"]
        table = self.s["decoder.embed_tokens.weight"]
        x = math.sqrt(D) * F.embedding(prev, table[:, :D], PAD)
        x = x + self.dec_pos.index_select(0, _positions(prev).view(-1)).view(*prev.shape, -1)[..., :D]
        x = x.transpose(0, 1)
        T = x.size(0)
        future = torch.triu(torch.full((T, T), float("-inf")), 1)
        for i in range(self.a.decoder_layers):
            if i >= d["decoder_layer_num"]:
                continue
            n = {-1: 1, 1: 2, 2: 3}[d["decoder_arbitrary_ende_attn"][i]]
            mem = torch.cat([enc["out"]] + [enc["all"][-1 - j] for j in range(1, n)], dim=0)
            mpad = None if enc["pad"] is None else torch.cat([enc["pad"]] * n, dim=1)
            p = f"decoder.layers.{i}"
            r = x
            x = self._attn(f"{p}.self_attn", x, x, d["decoder_self_attention_heads"][i], D, D, None, future, True)
            x = self._ln(f"{p}.self_attn_layer_norm", r + x, D)
            r = x
            x = self._attn(f"{p}.encoder_attn", x, mem, d["decoder_ende_attention_heads"][i], D, E, mpad, None, False)
            x = self._ln(f"{p}.encoder_attn_layer_norm", r + x, D)
            r = x
            x = self._ln(f"{p}.final_layer_norm", r + self._ffn(p, x, D, d["decoder_ffn_embed_dim"][i]), D)
        x = x.transpose(0, 1)
        out = self.s.get("decoder.embed_out", table)
        return torch.log_softmax(F.linear(x, out[:, :D]).float(), dim=-1)

    def log_probs(self, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.decode(prev, self.encode(src))

    # ---- fairseq's SequenceGenerator (one sentence at a time) ----
    @torch.no_grad()
    def generate(self, src: list[int], beam: int, lenpen: float = 1.0, max_len_b: int = 200,
                 min_len: int = 1) -> list[int]:
        enc = self.encode(torch.tensor([src]))
        enc_b = {"out": enc["out"].repeat(1, beam, 1), "all": [t.repeat(1, beam, 1) for t in enc["all"]], "pad": None}
        return fairseq_beam(lambda tokens: self.decode(tokens, enc_b)[:, -1, :], beam, lenpen, max_len_b, min_len)


@torch.no_grad()
def fairseq_beam(step, beam: int, lenpen: float = 1.0, max_len: int = 200, min_len: int = 1) -> list[int]:
    """fairseq's SequenceGenerator for one sentence over `step(tokens (beam, t)) -> log-probs (beam, V)`.

    max_len is fairseq's (max_len_a * src_len + max_len_b): it runs max_len + 1 steps, the last
    one EOS only. Returns the best finalized hypothesis without its EOS."""
    tokens = torch.full((beam, 1), EOS, dtype=torch.long)
    scores = torch.zeros(beam, dtype=torch.float64)
    finalized: list[tuple[float, list[int]]] = []
    for t in range(max_len + 1):
        lp = torch.as_tensor(step(tokens), dtype=torch.float64).clone()  # (beam, V)
        V = lp.size(1)
        lp[:, PAD] = float("-inf")
        if t >= max_len:
            keep = lp[:, EOS].clone()
            lp[:] = float("-inf")
            lp[:, EOS] = keep
        elif t < min_len:
            lp[:, EOS] = float("-inf")
        cand = lp[:1].reshape(-1) if t == 0 else (lp + scores.unsqueeze(1)).reshape(-1)
        k = min(2 * beam, cand.numel() - 1)
        top_s, top_i = torch.topk(cand, k)
        beams, toks = top_i // V, top_i % V
        for j in range(min(beam, k)):  # only an EOS among the first `beam` candidates is finalized
            if toks[j] == EOS and torch.isfinite(top_s[j]) and len(finalized) < beam:
                finalized.append((float(top_s[j]) / (t + 1) ** lenpen, tokens[beams[j], 1:].tolist()))
        if len(finalized) >= beam:
            break
        act = [j for j in range(k) if toks[j] != EOS][:beam]
        tokens = torch.cat([tokens[beams[act]], toks[act].unsqueeze(1)], dim=1)
        scores = top_s[act]
    return max(finalized, key=lambda x: x[0])[1]
