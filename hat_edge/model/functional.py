"""The plain math the SuperTransformer, its elastic layers and the SubTransformer share.

Functions only (no modules, no state), so every form computes exactly the same thing: attention
(`attend`, `split_heads`, `merge_heads`), the additive masks (`MASK_VALUE`, `padding_bias`,
`causal_bias`, `repeat_bias`), HAT's arbitrary encoder-decoder memory (`ende_memory`), the sinusoid
position table, and the decoding helpers (`next_token_log_probs`, `repeat_rows`).

Bottom of `hat_edge.model`: imports nothing from the package (order: functional, config < sub <
elastic < super < decode).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Additive attention mask value. Finite on purpose: -inf turns into NaN when a row is fully masked
# and breaks int8/ONNX graphs. exp(-1e4) underflows to exactly 0 in fp32 (so masked keys get weight
# 0, as with -inf), and -1e4 is representable in fp16/bf16, so half-precision exports stay finite.
MASK_VALUE = -1.0e4


# ------------------------------------------------------------------------------------------------
# positions and attention
# ------------------------------------------------------------------------------------------------
def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """fairseq's sinusoidal positions (num_positions, dim): sin of all frequencies, then cos.

    HAT builds this table at the SuperTransformer's width and a SubTransformer uses its leading
    `dim_active` columns, so a smaller arch sees the super table's first columns, not a table
    built at its own width. Callers slice; this only builds.
    """
    half = dim // 2
    # fairseq divides by (half - 1); guard the degenerate half == 1
    step = math.log(10000.0) / max(half - 1, 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -step)  # (half,)
    ang = torch.arange(num_positions, dtype=torch.float32)[:, None] * freq[None, :]  # (P, half)
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)  # (P, 2*half)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


def attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], head_dim: int, dropout_p: float, training: bool
) -> Tensor:
    """Scaled dot-product attention on split heads.

    q (B, H, T, hd), k/v (B, H, S, hd), bias additive, broadcastable to (B, H, T, S) or None.
    Returns (B, H, T, hd). Written out (no fused kernel) so every backend and exporter sees the
    same plain MatMul/Softmax graph. The scale is a Python float computed from the static head
    dim, never from a traced shape (a traced `size ** -0.5` is integer arithmetic: 0).
    """
    w = torch.matmul(q * (head_dim**-0.5), k.transpose(-2, -1))  # (B, H, T, S)
    if bias is not None:
        w = w + bias
    w = torch.softmax(w, dim=-1)
    w = F.dropout(w, p=dropout_p, training=training)
    return torch.matmul(w, v)  # (B, H, T, hd)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, heads*hd) -> (B, heads, T, hd)."""
    return x.view(x.size(0), x.size(1), heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, hd) -> (B, T, H*hd)."""
    return x.transpose(1, 2).reshape(x.size(0), x.size(2), -1)


# ------------------------------------------------------------------------------------------------
# masks and encoder-decoder memory
# ------------------------------------------------------------------------------------------------
def padding_bias(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, S) float32: 0 for tokens, MASK_VALUE for pad."""
    return tokens.eq(pad_id).to(torch.float32) * MASK_VALUE


def causal_bias(t: int, device: torch.device) -> Tensor:
    """(T, T): MASK_VALUE above the diagonal (a position never sees later ones)."""
    return torch.triu(torch.full((t, t), MASK_VALUE, device=device), diagonal=1)


def ende_memory(outs: list[Tensor], n: int) -> Tensor:
    """The last n encoder layer outputs (B, S, E) concatenated along the sequence, last first."""
    return torch.cat([outs[-1 - j] for j in range(n)], dim=1) if n > 1 else outs[-1]


def repeat_bias(src_bias: Tensor, n: int) -> Tensor:
    """(B, S) -> (B, 1, 1, S*n), matching `ende_memory`'s concatenation."""
    b = torch.cat([src_bias] * n, dim=1) if n > 1 else src_bias
    return b[:, None, None, :]


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
def next_token_log_probs(logits: Tensor, pad_penalty: Tensor) -> Tensor:
    """Log-softmax over the vocabulary (float32) with pad pushed down; logits (N, V)."""
    return torch.log_softmax(logits.float(), dim=-1) + pad_penalty


def repeat_rows(tensors: tuple[Tensor, ...], times: int) -> tuple[Tensor, ...]:
    """Each row `times` times in a row (row = sentence * times + k): encode outputs -> beam rows."""
    if times == 1:
        return tuple(tensors)
    return tuple(t.repeat_interleave(times, dim=0) for t in tensors)


__all__ = [
    "MASK_VALUE",
    "sinusoid_table",
    "attend",
    "split_heads",
    "merge_heads",
    "padding_bias",
    "causal_bias",
    "ende_memory",
    "repeat_bias",
    "next_token_log_probs",
    "repeat_rows",
]
