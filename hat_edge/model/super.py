"""The SuperTransformer: every SubTransformer of a design space shares its weights (HAT).

Layer layout, checked against HAT's `fairseq/models/transformer_super.py` and the SuperTransformer
configs HAT ships (`configs/*/supertransformer/space*.yml`):

- Norm placement: POST-norm residual blocks, `x = LayerNorm(x + dropout(sublayer(x)))`, and no
  final LayerNorm after the stacks. HAT's configs leave fairseq's `--encoder/decoder-normalize-before`
  off (the paper-default Transformer), and fairseq only adds the final stack norm with pre-norm.
- Embedding scale: sqrt(SAMPLED embed dim), HAT's default (`vocab_original_scaling=False`). With it
  an extracted SubTransformer is exactly a standard Transformer of its own width (scale
  sqrt(d_model)), which is what it is deployed and compared as; sqrt(super dim) is HAT's opt-in
  alternative and would make a 512-wide SubTransformer differ from a plain 512-wide Transformer.
- Positions: fairseq's sinusoids (sin block then cos block) built at the SUPER width, of which a
  SubTransformer uses the leading columns (HAT slices `positions[..., :sample_embed_dim]`);
  the first token sits at table row pad_id + 1 (fairseq's offset). Sequences are right-padded.
- Embeddings: with `share_all_embeddings` one table (vocab, max(enc, dec) super width) serves the
  encoder (first enc-dim columns), the decoder and the tied output projection (first dec-dim
  columns); otherwise separate encoder/decoder tables (the encoder's of `src_vocab_size` rows when
  the dictionaries differ) and an untied output projection (HAT's `embed_out`), or, with
  `share_decoder_input_output_embed`, the decoder's table as its output projection.
- Attention: q/k/v projections are always `qkv_dim` wide (head dim = qkv_dim / heads); the
  encoder-decoder k/v read the encoder width.
- Arbitrary encoder-decoder attention: decoder layer i attends to the last `arch.ende_layers(i)`
  (HAT's -1/1/2 -> 1/2/3) encoder layer outputs, concatenated along the sequence axis in HAT's
  order (last layer first), with the source padding mask repeated the same way.
- Elastic depth: only the first `*_layer_num` layers run.
- Dropout scaled to the sampled width: p = dropout * sampled_dim / super_dim on embeddings and every
  residual branch (HAT's `calc_dropout`; HAT leaves one spot, the encoder self-attention residual,
  unscaled, which we take to be an oversight). Attention dropout is not scaled (as in HAT).

`set_arch(arch)` makes one SubTransformer active; `forward` then computes exactly what
`extract(arch)` (a plain SubTransformer with copied weights, `hat_edge/model/sub.py`) computes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat_edge.model.config import ModelConfig
from hat_edge.model.elastic import ElasticAttention, ElasticEmbedding, ElasticLayerNorm, ElasticLinear
from hat_edge.model.functional import causal_bias, ende_memory, padding_bias, repeat_bias, sinusoid_table
from hat_edge.model.sub import SubTransformer
from hat_edge.space import Arch, SearchSpace


# ------------------------------------------------------------------------------------------------
# blocks (elastic forms of sub.EncoderLayer / sub.DecoderLayer; same names, same math)
# ------------------------------------------------------------------------------------------------
class SuperFeedForward(nn.Module):
    def __init__(self, max_embed: int, max_ffn: int) -> None:
        super().__init__()
        self.fc1 = ElasticLinear(max_embed, max_ffn)
        self.fc2 = ElasticLinear(max_ffn, max_embed)

    def set_active(self, embed: int, ffn: int) -> None:
        self.fc1.set_active(embed, ffn)
        self.fc2.set_active(ffn, embed)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class SuperEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + drop(SelfAttn(x))); x = LN(x + drop(FFN(x)))."""

    def __init__(self, max_embed: int, max_ffn: int, qkv: int, attn_dropout: float) -> None:
        super().__init__()
        self.dropout = 0.0  # set per arch
        self.self_attn = ElasticAttention(max_embed, max_embed, qkv, attn_dropout)
        self.self_attn_layer_norm = ElasticLayerNorm(max_embed)
        self.ffn = SuperFeedForward(max_embed, max_ffn)
        self.final_layer_norm = ElasticLayerNorm(max_embed)

    def set_active(self, embed: int, ffn: int, heads: int, dropout: float) -> None:
        self.dropout = dropout
        self.self_attn.set_active(embed, embed, heads)
        self.self_attn_layer_norm.set_active(embed)
        self.ffn.set_active(embed, ffn)
        self.final_layer_norm.set_active(embed)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # x (B, S, e), bias (B, 1, 1, S)
        k, v = self.self_attn.project_kv(x)
        x = self.self_attn_layer_norm(x + F.dropout(self.self_attn(x, k, v, bias), self.dropout, self.training))
        return self.final_layer_norm(x + F.dropout(self.ffn(x), self.dropout, self.training))


class SuperDecoderLayer(nn.Module):
    """Post-norm: self-attention, encoder-decoder attention, FFN."""

    def __init__(self, max_embed: int, max_enc_embed: int, max_ffn: int, qkv: int, attn_dropout: float) -> None:
        super().__init__()
        self.dropout, self.ende = 0.0, 1  # set per arch
        self.self_attn = ElasticAttention(max_embed, max_embed, qkv, attn_dropout)
        self.self_attn_layer_norm = ElasticLayerNorm(max_embed)
        self.encoder_attn = ElasticAttention(max_embed, max_enc_embed, qkv, attn_dropout)
        self.encoder_attn_layer_norm = ElasticLayerNorm(max_embed)
        self.ffn = SuperFeedForward(max_embed, max_ffn)
        self.final_layer_norm = ElasticLayerNorm(max_embed)

    def set_active(self, embed: int, enc_embed: int, ffn: int, heads: int, ende_heads: int, ende: int,
                   dropout: float) -> None:
        self.dropout, self.ende = dropout, ende
        self.self_attn.set_active(embed, embed, heads)
        self.self_attn_layer_norm.set_active(embed)
        self.encoder_attn.set_active(embed, enc_embed, ende_heads)
        self.encoder_attn_layer_norm.set_active(embed)
        self.ffn.set_active(embed, ffn)
        self.final_layer_norm.set_active(embed)

    def forward(self, x: Tensor, self_bias: Tensor, enc_outs: list[Tensor], src_bias: Tensor) -> Tensor:
        # x (B, T, d); self_bias (T, T) causal; enc_outs: every active encoder layer's (B, S, e)
        drop = lambda y: F.dropout(y, self.dropout, self.training)  # noqa: E731
        k, v = self.self_attn.project_kv(x)
        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, k, v, self_bias)))
        ck, cv = self.encoder_attn.project_kv(ende_memory(enc_outs, self.ende))  # (B, H, S*n, hd)
        x = self.encoder_attn_layer_norm(x + drop(self.encoder_attn(x, ck, cv, repeat_bias(src_bias, self.ende))))
        return self.final_layer_norm(x + drop(self.ffn(x)))


# ------------------------------------------------------------------------------------------------
# the SuperTransformer
# ------------------------------------------------------------------------------------------------
class SuperTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, space: SearchSpace) -> None:
        super().__init__()
        self.cfg, self.space = cfg, space
        E, D, q = space.max_encoder_embed, space.max_decoder_embed, space.qkv_dim
        self.super_dims = (E, D)
        if cfg.share_all_embeddings:
            self.embed_tokens = ElasticEmbedding(cfg.vocab_size, max(E, D), cfg.pad_id)
        else:
            self.encoder_embed_tokens = ElasticEmbedding(cfg.encoder_vocab_size, E, cfg.pad_id)
            self.decoder_embed_tokens = ElasticEmbedding(cfg.vocab_size, D, cfg.pad_id)
            if not cfg.share_decoder_input_output_embed:
                self.output_projection = ElasticLinear(D, cfg.vocab_size, bias=False)
                nn.init.normal_(self.output_projection.weight, 0.0, D**-0.5)  # HAT's embed_out init
        self.encoder_layers = nn.ModuleList(
            SuperEncoderLayer(E, space.max_encoder_ffn, q, cfg.attention_dropout)
            for _ in range(space.max_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            SuperDecoderLayer(D, E, space.max_decoder_ffn, q, cfg.attention_dropout)
            for _ in range(space.max_decoder_layers)
        )
        rows = cfg.max_positions + cfg.pad_id + 1
        # deterministic tables: not saved in checkpoints
        self.register_buffer("encoder_pos", sinusoid_table(rows, E), persistent=False)  # (P, E)
        self.register_buffer("decoder_pos", sinusoid_table(rows, D), persistent=False)  # (P, D)
        self.arch: Arch = space.largest()
        self.set_arch(self.arch)

    # ---- choosing the active SubTransformer ----
    def set_arch(self, arch: Arch) -> None:
        """Activate `arch` (SpaceError, naming the field, if it is outside this space)."""
        self.space.validate(arch)
        E, D = self.super_dims
        e, d = arch.encoder_embed_dim, arch.decoder_embed_dim
        enc_drop, dec_drop = self.cfg.dropout * e / E, self.cfg.dropout * d / D
        for i in range(arch.encoder_layer_num):
            self.encoder_layers[i].set_active(
                e, arch.encoder_ffn_embed_dim[i], arch.encoder_self_attention_heads[i], enc_drop
            )
        for i in range(arch.decoder_layer_num):
            self.decoder_layers[i].set_active(
                d, e, arch.decoder_ffn_embed_dim[i], arch.decoder_self_attention_heads[i],
                arch.decoder_ende_attention_heads[i], arch.ende_layers(i), dec_drop,
            )
        if hasattr(self, "output_projection"):
            self.output_projection.set_active(d, self.cfg.vocab_size)
        self.arch = arch
        self._enc_drop, self._dec_drop = enc_drop, dec_drop

    # ---- embeddings ----
    def _embed(self, tokens: Tensor, side: str, dim: int) -> Tensor:
        table = self.embed_tokens if self.cfg.share_all_embeddings else getattr(self, f"{side}_embed_tokens")
        pos_table = self.encoder_pos if side == "encoder" else self.decoder_pos
        rows = torch.arange(tokens.size(1), device=tokens.device) + self.cfg.pad_id + 1
        x = math.sqrt(dim) * table(tokens, dim) + pos_table.index_select(0, rows)[:, :dim]
        return F.dropout(x, self._enc_drop if side == "encoder" else self._dec_drop, self.training)

    def output_layer(self, x: Tensor) -> Tensor:
        if self.cfg.share_all_embeddings:
            return F.linear(x, self.embed_tokens.get_active_weight(self.arch.decoder_embed_dim))
        if self.cfg.share_decoder_input_output_embed:
            return F.linear(x, self.decoder_embed_tokens.get_active_weight(self.arch.decoder_embed_dim))
        return self.output_projection(x)

    # ---- forward ----
    def forward(self, src_tokens: Tensor, prev_output_tokens: Tensor, arch: Optional[Arch] = None) -> Tensor:
        """src (B, S), prev (B, T) -> logits (B, T, V) of the active (or given) arch."""
        if arch is not None and arch != self.arch:
            self.set_arch(arch)
        a = self.arch
        src_bias = padding_bias(src_tokens, self.cfg.pad_id)  # (B, S)

        x = self._embed(src_tokens, "encoder", a.encoder_embed_dim)  # (B, S, e)
        enc_outs: list[Tensor] = []
        for layer in self.encoder_layers[: a.encoder_layer_num]:
            x = layer(x, src_bias[:, None, None, :])
            enc_outs.append(x)

        y = self._embed(prev_output_tokens, "decoder", a.decoder_embed_dim)  # (B, T, d)
        self_bias = causal_bias(y.size(1), y.device)
        for layer in self.decoder_layers[: a.decoder_layer_num]:
            y = layer(y, self_bias, enc_outs, src_bias)
        return self.output_layer(y)

    # ---- the standalone form ----
    @torch.no_grad()
    def extract(self, arch: Optional[Arch] = None) -> SubTransformer:
        """A plain SubTransformer with its own copy of `arch`'s slice of the shared weights."""
        arch = arch or self.arch
        previous = self.arch
        self.set_arch(arch)
        try:
            dev = self.encoder_pos.device
            # build on the meta device (no random init of weights about to be overwritten)
            with torch.device("meta"):
                sub = SubTransformer(arch, self.cfg, super_dims=self.super_dims)
            sub = sub.to_empty(device=dev)
            e, d = arch.encoder_embed_dim, arch.decoder_embed_dim
            if self.cfg.share_all_embeddings:
                self.embed_tokens.copy_to(sub.embed_tokens)
            else:
                self.encoder_embed_tokens.copy_to(sub.encoder_embed_tokens)
                self.decoder_embed_tokens.copy_to(sub.decoder_embed_tokens)
                if hasattr(self, "output_projection"):
                    self.output_projection.copy_to(sub.output_projection)
            for src, dst in zip(self.encoder_layers, sub.encoder_layers):
                _copy_block(src, dst)
            for src, dst in zip(self.decoder_layers, sub.decoder_layers):
                _copy_block(src, dst)
            sub.encoder_pos.copy_(self.encoder_pos[:, :e])
            sub.decoder_pos.copy_(self.decoder_pos[:, :d])
            sub.pad_penalty.copy_(sub._pad_penalty())
        finally:
            self.set_arch(previous)
        return sub.train(self.training)


def _copy_block(src: nn.Module, dst: nn.Module) -> None:
    """Copy every elastic child of a Super*Layer into the same-named plain child of a sub layer."""
    for name, child in src.named_children():
        target = getattr(dst, name)
        if isinstance(child, SuperFeedForward):
            child.fc1.copy_to(target.fc1)
            child.fc2.copy_to(target.fc2)
        else:
            child.copy_to(target)


__all__ = ["ModelConfig", "SuperTransformer"]  # ModelConfig: re-exported from config.py
