"""The standalone SubTransformer: plain torch.nn layers with its own weights, ready to export.

Same layer layout and math as the SuperTransformer (see `hat_edge/model/super.py` for the
choices: post-norm blocks, embeddings scaled by sqrt(active embed dim), HAT's sliced sinusoidal
positions, arbitrary encoder-decoder attention). Built either from `SuperTransformer.extract(arch)`
(weights copied from the shared ones) or with random weights (`SubTransformer.random`) for latency
work, for any dims, inside or outside HAT's space.

Export split (tensors only, flat tuples, no data-dependent Python control flow; layer count, head
counts and encoder-decoder fan-in are fixed per SubTransformer and unrolled when traced):

    encode(src_tokens (B,S) long)
        -> (src_bias (B,S) float32: 0 for tokens, MASK_VALUE (-1e4) for pad,
            cross_k_0, cross_v_0, ..., cross_k_{L-1}, cross_v_{L-1})
           cross_k_l / cross_v_l: (B, H_l, S*n_l, hd_l), decoder layer l's encoder-decoder keys and
           values, computed ONCE per source. n_l = 1, 2 or 3 encoder layers concatenated along the
           sequence (last layer first, as HAT). src_bias stays (B,S); decode_step repeats it n_l
           times per layer itself, so there is one bias input whatever the fan-in.

    decode_step(tokens (N,1) long, position (1,) long, src_bias (N,S),
                *cross_kv (2L tensors as above with N rows), *self_kv (2L tensors))
        -> (log_probs (N,V) float32, new_self_k_0, new_self_v_0, ...)
           self_k_l / self_v_l: (N, H_l, t, hd_l) with t = position (t = 0 at the first step: pass
           `init_self_cache(N)`); the new ones are (N, H_l, t+1, hd_l). `position` is the 0-based
           index of the token fed (BOS is 0). The pad token's log-prob is pushed down by 1e4 so
           search never emits pad (fairseq does the same with -inf).
           For beam search with N = B*beam rows, repeat each source row `beam` times first
           (row = sentence*beam + k, the layout of runner.beam_search); cross keys/values never need
           reordering because beams only move within their sentence.

`cache_spec()` names every cache tensor and its symbolic shape for the exporter.

Positions: sequences are right-padded (pad only at the end), so position i of a row is simply i
(table row i + pad_id + 1, fairseq's offset). Pad keys are masked in every attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat_edge.model.config import ModelConfig
from hat_edge.model.functional import (
    MASK_VALUE,
    attend,
    causal_bias,
    ende_memory,
    merge_heads,
    next_token_log_probs,
    padding_bias,
    repeat_bias,
    repeat_rows,
    sinusoid_table,
    split_heads,
)
from hat_edge.space import Arch


# ------------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention, fixed q/k/v width `qkv_dim` (head dim = qkv_dim / heads)."""

    def __init__(self, embed_dim: int, kv_dim: int, qkv_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.qkv_dim, self.dropout = heads, qkv_dim, dropout
        self.q_proj = nn.Linear(embed_dim, qkv_dim)
        self.k_proj = nn.Linear(kv_dim, qkv_dim)
        self.v_proj = nn.Linear(kv_dim, qkv_dim)
        self.out_proj = nn.Linear(qkv_dim, embed_dim)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, S, kv_dim) -> k, v (B, H, S, hd)."""
        return split_heads(self.k_proj(memory), self.heads), split_heads(self.v_proj(memory), self.heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
        q = split_heads(self.q_proj(x), self.heads)  # (B, H, T, hd)
        y = attend(q, k, v, bias, self.qkv_dim // self.heads, self.dropout, self.training)  # (B, H, T, hd)
        return self.out_proj(merge_heads(y))  # (B, T, embed)


class FeedForward(nn.Module):
    def __init__(self, embed_dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-norm: x = LN(x + drop(SelfAttn(x))); x = LN(x + drop(FFN(x)))."""

    def __init__(self, embed: int, ffn: int, heads: int, qkv: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.self_attn = Attention(embed, embed, qkv, heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed)
        self.ffn = FeedForward(embed, ffn)
        self.final_layer_norm = nn.LayerNorm(embed)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        k, v = self.self_attn.project_kv(x)
        x = self.self_attn_layer_norm(x + F.dropout(self.self_attn(x, k, v, bias), self.dropout, self.training))
        return self.final_layer_norm(x + F.dropout(self.ffn(x), self.dropout, self.training))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention, encoder-decoder attention over the last `ende` encoder
    layers, FFN; each `x = LN(x + drop(sublayer(x)))`."""

    def __init__(self, embed: int, enc_embed: int, ffn: int, heads: int, ende_heads: int, ende: int,
                 qkv: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.dropout, self.ende = dropout, ende
        self.self_attn = Attention(embed, embed, qkv, heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed)
        self.encoder_attn = Attention(embed, enc_embed, qkv, ende_heads, attn_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(embed)
        self.ffn = FeedForward(embed, ffn)
        self.final_layer_norm = nn.LayerNorm(embed)

    def forward(self, x: Tensor, self_bias: Tensor, cross_k: Tensor, cross_v: Tensor, cross_bias: Tensor) -> Tensor:
        """Whole target sequence: x (B, T, embed), self_bias causal (T, T)."""
        k, v = self.self_attn.project_kv(x)
        return self._sublayers(x, k, v, self_bias, cross_k, cross_v, cross_bias)

    def step(self, x: Tensor, past_k: Tensor, past_v: Tensor, cross_k: Tensor, cross_v: Tensor,
             cross_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One new token x (N, 1, embed) attending to its past (N, H, t, hd) and itself."""
        k_new, v_new = self.self_attn.project_kv(x)
        k = torch.cat([past_k, k_new], dim=2)  # (N, H, t+1, hd)
        v = torch.cat([past_v, v_new], dim=2)
        return self._sublayers(x, k, v, None, cross_k, cross_v, cross_bias), k, v

    def _sublayers(self, x: Tensor, k: Tensor, v: Tensor, self_bias: Optional[Tensor], cross_k: Tensor,
                   cross_v: Tensor, cross_bias: Tensor) -> Tensor:
        drop = lambda y: F.dropout(y, self.dropout, self.training)  # noqa: E731
        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, k, v, self_bias)))
        x = self.encoder_attn_layer_norm(x + drop(self.encoder_attn(x, cross_k, cross_v, cross_bias)))
        return self.final_layer_norm(x + drop(self.ffn(x)))


# ------------------------------------------------------------------------------------------------
# cache description for exporters
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor: `shape` has ints for fixed axes and names for dynamic ones."""

    name: str  # graph input name (decode_step); for self caches the output is "new_" + name
    kind: str  # "cross_k" | "cross_v" | "self_k" | "self_v"
    layer: int
    shape: tuple[int | str, ...]  # ("batch", heads, "src_len*n" | "past_len", head_dim)


@dataclass(frozen=True)
class CacheSpec:
    cross: tuple[CacheTensor, ...]  # encode outputs after src_bias, in order
    self_attn: tuple[CacheTensor, ...]  # decode_step trailing inputs (and outputs), in order

    @property
    def encode_inputs(self) -> list[str]:
        return ["src_tokens"]

    @property
    def encode_outputs(self) -> list[str]:
        return ["src_bias"] + [c.name for c in self.cross]

    @property
    def decode_inputs(self) -> list[str]:
        return ["tokens", "position", "src_bias"] + [c.name for c in self.cross] + [c.name for c in self.self_attn]

    @property
    def decode_outputs(self) -> list[str]:
        return ["log_probs"] + ["new_" + c.name for c in self.self_attn]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export-style dynamic axes for every named input/output."""
        axes: dict[str, dict[int, str]] = {
            "src_tokens": {0: "batch", 1: "src_len"},
            "src_bias": {0: "batch", 1: "src_len"},
            "tokens": {0: "batch"},
            "log_probs": {0: "batch"},
        }
        for c in self.cross:
            axes[c.name] = {0: "batch", 2: str(c.shape[2])}
        for c in self.self_attn:
            axes[c.name] = {0: "batch", 2: "past_len"}
            axes["new_" + c.name] = {0: "batch", 2: "past_len_plus_1"}
        return axes


# ------------------------------------------------------------------------------------------------
# the SubTransformer
# ------------------------------------------------------------------------------------------------
class SubTransformer(nn.Module):
    """One fixed arch as plain torch.nn layers.

    super_dims: (encoder, decoder) widths of the SuperTransformer this arch comes from. They set,
    as HAT does, the width of the sinusoidal tables the positions are sliced from and the dropout
    scaling (dropout * active / super). None: the arch's own widths (a standalone model).
    """

    def __init__(self, arch: Arch, cfg: ModelConfig, super_dims: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.arch, self.cfg = arch, cfg
        e, d = arch.encoder_embed_dim, arch.decoder_embed_dim
        se, sd = super_dims or (e, d)
        self.super_dims = (se, sd)
        self.pad_id = cfg.pad_id
        self.pos_offset = cfg.pad_id + 1  # fairseq: the first token sits at table row pad + 1
        self.encoder_scale, self.decoder_scale = math.sqrt(e), math.sqrt(d)
        self.encoder_dropout = cfg.dropout * e / se
        self.decoder_dropout = cfg.dropout * d / sd
        V = cfg.vocab_size

        if cfg.share_all_embeddings:
            # one table; the encoder reads its first e columns, the decoder (and the tied output
            # projection) its first d columns
            self.embed_tokens = nn.Embedding(V, max(e, d), padding_idx=cfg.pad_id)
        else:
            self.encoder_embed_tokens = nn.Embedding(cfg.encoder_vocab_size, e, padding_idx=cfg.pad_id)
            self.decoder_embed_tokens = nn.Embedding(V, d, padding_idx=cfg.pad_id)
            if not cfg.share_decoder_input_output_embed:
                self.output_projection = nn.Linear(d, V, bias=False)

        self.encoder_layers = nn.ModuleList(
            EncoderLayer(e, f, h, arch.qkv_dim, self.encoder_dropout, cfg.attention_dropout)
            for f, h in zip(arch.encoder_ffn_embed_dim, arch.encoder_self_attention_heads)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d, e, arch.decoder_ffn_embed_dim[i], arch.decoder_self_attention_heads[i],
                         arch.decoder_ende_attention_heads[i], arch.ende_layers(i), arch.qkv_dim,
                         self.decoder_dropout, cfg.attention_dropout)
            for i in range(arch.decoder_layer_num)
        )
        rows = cfg.max_positions + self.pos_offset
        self.register_buffer("encoder_pos", sinusoid_table(rows, se)[:, :e].clone())  # (P, e)
        self.register_buffer("decoder_pos", sinusoid_table(rows, sd)[:, :d].clone())  # (P, d)
        # added to log-probs: pushes pad down so decoding never emits it
        self.register_buffer("pad_penalty", self._pad_penalty(), persistent=False)  # (V,)
        self.reset_parameters()

    def _pad_penalty(self) -> Tensor:
        p = torch.zeros(self.cfg.vocab_size)
        p[self.cfg.pad_id] = MASK_VALUE
        return p

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init in the SuperTransformer's scheme (xavier linears, N(0, d^-1/2) tables)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, m.embedding_dim**-0.5)
                m.weight[self.pad_id].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if hasattr(self, "output_projection"):
            nn.init.normal_(self.output_projection.weight, 0.0, self.arch.decoder_embed_dim**-0.5)

    @classmethod
    def random(cls, arch: Arch, vocab_size: int, seed: int = 0, **cfg_fields: Any) -> "SubTransformer":
        """Random weights for any dims (e.g. Transformer-Base/Big); the global RNG is untouched."""
        cfg = ModelConfig(vocab_size=vocab_size, **cfg_fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(arch, cfg)
        return model.eval()

    # ---- embeddings ----
    def _encoder_embed_weight(self) -> Tensor:
        if self.cfg.share_all_embeddings:
            return self.embed_tokens.weight[:, : self.arch.encoder_embed_dim]
        return self.encoder_embed_tokens.weight

    def _decoder_embed_weight(self) -> Tensor:
        if self.cfg.share_all_embeddings:
            return self.embed_tokens.weight[:, : self.arch.decoder_embed_dim]
        return self.decoder_embed_tokens.weight

    def output_layer(self, x: Tensor) -> Tensor:
        """(..., d) -> logits (..., V); tied to the decoder input table when shared."""
        if self.cfg.share_all_embeddings or self.cfg.share_decoder_input_output_embed:
            return F.linear(x, self._decoder_embed_weight())
        return self.output_projection(x)

    # ---- the export split ----
    def encode(self, src_tokens: Tensor) -> tuple[Tensor, ...]:
        """src_tokens (B, S) -> (src_bias (B, S), cross_k_0, cross_v_0, ...); see the module doc."""
        src_bias = padding_bias(src_tokens, self.pad_id)  # (B, S)
        pos = torch.arange(src_tokens.size(1), device=src_tokens.device) + self.pos_offset
        x = self.encoder_scale * F.embedding(src_tokens, self._encoder_embed_weight(), self.pad_id)
        x = x + self.encoder_pos.index_select(0, pos)  # (B, S, e)
        x = F.dropout(x, self.encoder_dropout, self.training)
        bias = src_bias[:, None, None, :]  # (B, 1, 1, S)
        outs: list[Tensor] = []
        for layer in self.encoder_layers:
            x = layer(x, bias)
            outs.append(x)
        cross: list[Tensor] = []
        for layer in self.decoder_layers:
            k, v = layer.encoder_attn.project_kv(ende_memory(outs, layer.ende))  # (B, H, S*n, hd)
            cross += [k, v]
        return (src_bias, *cross)

    def _embed_target(self, tokens: Tensor, pos_rows: Tensor) -> Tensor:
        x = self.decoder_scale * F.embedding(tokens, self._decoder_embed_weight(), self.pad_id)
        return F.dropout(x + self.decoder_pos.index_select(0, pos_rows), self.decoder_dropout, self.training)

    def decode(self, prev_output_tokens: Tensor, src_bias: Tensor, *cross_kv: Tensor) -> Tensor:
        """Teacher-forced decoder over the whole target: prev (B, T) -> logits (B, T, V)."""
        T = prev_output_tokens.size(1)
        pos = torch.arange(T, device=prev_output_tokens.device) + self.pos_offset
        x = self._embed_target(prev_output_tokens, pos)  # (B, T, d)
        self_bias = causal_bias(T, x.device)  # (T, T)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, self_bias, cross_kv[2 * i], cross_kv[2 * i + 1], repeat_bias(src_bias, layer.ende))
        return self.output_layer(x)

    def decode_step(self, tokens: Tensor, position: Tensor, src_bias: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        """One decoding step with caches; see the module doc for shapes and order."""
        L = len(self.decoder_layers)
        cross, past = caches[: 2 * L], caches[2 * L :]
        x = self._embed_target(tokens, position + self.pos_offset)  # (N, 1, d)
        new: list[Tensor] = []
        for i, layer in enumerate(self.decoder_layers):
            x, k, v = layer.step(x, past[2 * i], past[2 * i + 1], cross[2 * i], cross[2 * i + 1],
                                 repeat_bias(src_bias, layer.ende))
            new += [k, v]
        logits = self.output_layer(x[:, 0]).float()  # (N, V)
        return (next_token_log_probs(logits, self.pad_penalty), *new)

    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor) -> Tensor:
        """(B, S), (B, T) -> logits (B, T, V)."""
        src_bias, *cross = self.encode(src_tokens)
        return self.decode(prev_output_tokens, src_bias, *cross)

    # ---- cache helpers ----
    def cache_spec(self) -> CacheSpec:
        cross, selfs = [], []
        for i, layer in enumerate(self.decoder_layers):
            h_c, h_s = layer.encoder_attn.heads, layer.self_attn.heads
            q = self.arch.qkv_dim
            seq = "src_len" if layer.ende == 1 else f"src_len*{layer.ende}"
            for kv in "kv":
                cross.append(CacheTensor(f"cross_{kv}_{i}", f"cross_{kv}", i, ("batch", h_c, seq, q // h_c)))
            for kv in "kv":
                selfs.append(CacheTensor(f"self_{kv}_{i}", f"self_{kv}", i, ("batch", h_s, "past_len", q // h_s)))
        return CacheSpec(tuple(cross), tuple(selfs))

    def init_self_cache(self, n: int, device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
        """Empty self-attention caches (N, H_l, 0, hd_l) for the first decode_step."""
        out: list[Tensor] = []
        dtype = self.encoder_pos.dtype
        for layer in self.decoder_layers:
            h = layer.self_attn.heads
            out += [torch.zeros(n, h, 0, self.arch.qkv_dim // h, device=device, dtype=dtype)] * 2
        return tuple(out)


# next_token_log_probs and repeat_rows live in functional.py; re-exported here because decode.py
# and the tests import them from this module
__all__ = ["SubTransformer", "CacheSpec", "CacheTensor", "Attention", "next_token_log_probs", "repeat_rows"]
