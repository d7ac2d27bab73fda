"""Elastic layers: each owns the SuperTransformer-sized weight and uses its leading slice.

Once-for-All style: an elastic layer keeps the full weight, `get_active_weight()` returns the slice
for the active size (one small method, so the slicing rule lives in one place), `forward` computes
with that slice, and `copy_to(plain)` / `to_static()` copy the slice into a plain `torch.nn` module
for the standalone SubTransformer. Training and search use the elastic form; export and
measurement use the plain form.

The math both forms share (`attend`, `split_heads`, `merge_heads`, ...) is in `functional.py`, so
the SuperTransformer and the SubTransformer compute exactly the same thing. The plain forms are
torch's and `sub.Attention`, so this module sits above `sub` (order: functional, config < sub <
elastic < super).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hat_edge.model.functional import attend, merge_heads, split_heads
from hat_edge.model.sub import Attention


# ------------------------------------------------------------------------------------------------
# elastic layers
# ------------------------------------------------------------------------------------------------
class ElasticLinear(nn.Module):
    """y = x W[:out, :in]^T + b[:out], with W sized (max_out, max_in)."""

    def __init__(self, max_in: int, max_out: int, bias: bool = True) -> None:
        super().__init__()
        self.max_in, self.max_out = max_in, max_out
        self.weight = nn.Parameter(torch.empty(max_out, max_in))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        self.active_in, self.active_out = max_in, max_out
        nn.init.xavier_uniform_(self.weight)

    def set_active(self, in_features: int, out_features: int) -> None:
        if not (0 < in_features <= self.max_in and 0 < out_features <= self.max_out):
            raise ValueError(
                f"active size {in_features}x{out_features} exceeds {self.max_in}x{self.max_out}"
            )
        self.active_in, self.active_out = in_features, out_features

    def get_active_weight(self) -> Tensor:
        return self.weight[: self.active_out, : self.active_in]

    def get_active_bias(self) -> Optional[Tensor]:
        return None if self.bias is None else self.bias[: self.active_out]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.get_active_weight(), self.get_active_bias())

    @torch.no_grad()
    def copy_to(self, plain: nn.Linear) -> nn.Linear:
        plain.weight.copy_(self.get_active_weight())
        if self.bias is not None:
            plain.bias.copy_(self.get_active_bias())
        return plain

    def to_static(self) -> nn.Linear:
        w = self.weight
        lin = nn.Linear(self.active_in, self.active_out, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        return self.copy_to(lin)

    def extra_repr(self) -> str:
        return f"max={self.max_in}->{self.max_out}, active={self.active_in}->{self.active_out}"


class ElasticLayerNorm(nn.Module):
    """LayerNorm over the first `active` features with the leading slice of gamma/beta."""

    def __init__(self, max_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.max_dim, self.eps = max_dim, eps
        self.weight = nn.Parameter(torch.ones(max_dim))
        self.bias = nn.Parameter(torch.zeros(max_dim))
        self.active = max_dim

    def set_active(self, dim: int) -> None:
        if not 0 < dim <= self.max_dim:
            raise ValueError(f"active size {dim} exceeds {self.max_dim}")
        self.active = dim

    def get_active_weight(self) -> tuple[Tensor, Tensor]:
        return self.weight[: self.active], self.bias[: self.active]

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.get_active_weight()
        return F.layer_norm(x, (self.active,), w, b, self.eps)

    @torch.no_grad()
    def copy_to(self, plain: nn.LayerNorm) -> nn.LayerNorm:
        w, b = self.get_active_weight()
        plain.weight.copy_(w)
        plain.bias.copy_(b)
        return plain

    def to_static(self) -> nn.LayerNorm:
        ln = nn.LayerNorm(self.active, eps=self.eps, device=self.weight.device, dtype=self.weight.dtype)
        return self.copy_to(ln)

    def extra_repr(self) -> str:
        return f"max={self.max_dim}, active={self.active}"


class ElasticEmbedding(nn.Module):
    """Token table (vocab, max_dim); a user takes its leading `dim` columns.

    With shared embeddings the encoder and decoder read the same table at different widths, so
    the active width is an argument rather than state: `forward(tokens, dim)`.
    """

    def __init__(self, vocab_size: int, max_dim: int, padding_idx: int) -> None:
        super().__init__()
        self.vocab_size, self.max_dim, self.padding_idx = vocab_size, max_dim, padding_idx
        self.weight = nn.Parameter(torch.empty(vocab_size, max_dim))
        # fairseq/HAT init: N(0, dim^-1/2), padding row zero
        nn.init.normal_(self.weight, mean=0.0, std=max_dim**-0.5)
        with torch.no_grad():
            self.weight[padding_idx].zero_()

    def get_active_weight(self, dim: int) -> Tensor:
        return self.weight[:, :dim]

    def forward(self, tokens: Tensor, dim: int) -> Tensor:
        return F.embedding(tokens, self.get_active_weight(dim), self.padding_idx)

    @torch.no_grad()
    def copy_to(self, plain: nn.Embedding, dim: Optional[int] = None) -> nn.Embedding:
        plain.weight.copy_(self.get_active_weight(dim or plain.embedding_dim))
        return plain

    def to_static(self, dim: int) -> nn.Embedding:
        emb = nn.Embedding(self.vocab_size, dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        return self.copy_to(emb, dim)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}x{self.max_dim}, padding_idx={self.padding_idx}"


class ElasticAttention(nn.Module):
    """Multi-head attention with a fixed q/k/v width, as in HAT.

    The projections always produce `qkv_dim` features whatever the head count; only the head
    split changes (head dim = qkv_dim / heads). Elastic are the input widths (query side
    `embed`, key/value side `kv_embed`, which is the encoder width for encoder-decoder attention)
    and the output width of `out_proj`.
    """

    def __init__(self, max_embed: int, max_kv_embed: int, qkv_dim: int, dropout: float) -> None:
        super().__init__()
        self.qkv_dim, self.dropout = qkv_dim, dropout
        self.q_proj = ElasticLinear(max_embed, qkv_dim)
        self.k_proj = ElasticLinear(max_kv_embed, qkv_dim)
        self.v_proj = ElasticLinear(max_kv_embed, qkv_dim)
        self.out_proj = ElasticLinear(qkv_dim, max_embed)
        self.heads = 1

    def set_active(self, embed: int, kv_embed: int, heads: int) -> None:
        if self.qkv_dim % heads:
            raise ValueError(f"{heads} heads do not divide qkv_dim {self.qkv_dim}")
        self.q_proj.set_active(embed, self.qkv_dim)
        self.k_proj.set_active(kv_embed, self.qkv_dim)
        self.v_proj.set_active(kv_embed, self.qkv_dim)
        self.out_proj.set_active(self.qkv_dim, embed)
        self.heads = heads

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, S, kv_embed) -> k, v (B, H, S, hd)."""
        return split_heads(self.k_proj(memory), self.heads), split_heads(self.v_proj(memory), self.heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> Tensor:
        """x (B, T, embed) attends to k/v (B, H, S, hd); returns (B, T, embed)."""
        q = split_heads(self.q_proj(x), self.heads)  # (B, H, T, hd)
        y = attend(q, k, v, bias, self.qkv_dim // self.heads, self.dropout, self.training)
        return self.out_proj(merge_heads(y))

    @torch.no_grad()
    def copy_to(self, plain: nn.Module) -> nn.Module:
        """Copy into a module with plain `q_proj/k_proj/v_proj/out_proj` nn.Linear children."""
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(self, name).copy_to(getattr(plain, name))
        return plain

    def to_static(self) -> Attention:
        w = self.q_proj.weight
        plain = Attention(self.q_proj.active_in, self.k_proj.active_in, self.qkv_dim, self.heads,
                          self.dropout).to(device=w.device, dtype=w.dtype)
        return self.copy_to(plain)

    def extra_repr(self) -> str:
        return f"qkv_dim={self.qkv_dim}, heads={self.heads}"


__all__ = [
    "ElasticLinear",
    "ElasticLayerNorm",
    "ElasticEmbedding",
    "ElasticAttention",
]
