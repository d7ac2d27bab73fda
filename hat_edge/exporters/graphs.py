"""The two graphs every export produces, as small nn.Modules, and the example inputs to trace them.

    EncoderGraph      src_tokens (B,S) -> src_bias (B,S), cross_k_0, cross_v_0, ... (B,H_l,S*n_l,hd_l)
    DecoderStepGraph  tokens (N,1), position (1,), src_bias (N,S), *cross_kv, *self_kv (N,H_l,t,hd_l)
                      -> log_probs (N,V), new_self_k_0, new_self_v_0, ... (N,H_l,t+1,hd_l)

The example sizes are chosen so tracers keep every dynamic axis symbolic: no 0 or 1 (torch.export
specialises those), and no two dynamic axes of equal size (a tracer could tie them together).
Every example tensor is a distinct object: torch.export de-duplicates aliased inputs, which once
made an exported decoder read self_k where it should read self_v.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hat_edge.model.sub import SubTransformer
from hat_edge.runtime.formats import TOPK_IDS, TOPK_INPUT, TOPK_VALUES

# example sizes for tracing: batch, source length, decoder rows, past length
EX_BATCH, EX_SRC, EX_ROWS, EX_PAST = 2, 7, 3, 5


class EncoderGraph(nn.Module):
    def __init__(self, sub: SubTransformer) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, src_tokens: Tensor) -> tuple[Tensor, ...]:
        return self.sub.encode(src_tokens)


class DecoderStepGraph(nn.Module):
    def __init__(self, sub: SubTransformer) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, tokens: Tensor, position: Tensor, src_bias: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        return self.sub.decode_step(tokens, position, src_bias, *caches)


def example_source(sub: SubTransformer, batch: int = EX_BATCH, src_len: int = EX_SRC, seed: int = 0) -> Tensor:
    """(batch, src_len) ids from the non-special range, EOS last, the second row right-padded."""
    g = torch.Generator().manual_seed(seed)
    V = sub.cfg.encoder_vocab_size
    src = torch.randint(4 if V > 8 else 0, V, (batch, src_len), generator=g)
    src[:, -1] = sub.cfg.eos_id
    if batch > 1 and src_len > 3:  # exercise the padding mask
        src[1, -2] = sub.cfg.eos_id
        src[1, -1] = sub.cfg.pad_id
    return src


@torch.no_grad()
def example_decoder_inputs(sub: SubTransformer, rows: int = EX_ROWS, past: int = EX_PAST,
                           src_len: int = EX_SRC, seed: int = 0) -> tuple[Tensor, ...]:
    """Realistic decoder-step inputs: encoder outputs of a real source, random past caches."""
    g = torch.Generator().manual_seed(seed + 1)
    enc = sub.encode(example_source(sub, batch=rows, src_len=src_len, seed=seed))
    tokens = torch.randint(4, sub.cfg.vocab_size, (rows, 1), generator=g)
    position = torch.tensor([past], dtype=torch.long)
    caches = []
    for c in sub.cache_spec().self_attn:
        _, h, _, hd = c.shape
        caches.append(torch.randn(rows, int(h), past, int(hd), generator=g))
    return (tokens, position, *[t.clone() for t in enc], *caches)


def input_names(sub: SubTransformer) -> tuple[list[str], list[str], list[str], list[str]]:
    """(encoder inputs, encoder outputs, decoder inputs, decoder outputs) names, in order."""
    spec = sub.cache_spec()
    return spec.encode_inputs, spec.encode_outputs, spec.decode_inputs, spec.decode_outputs


def io_description(sub: SubTransformer, topk: bool = False) -> dict:
    """Names, symbolic shapes and dtypes of both graphs, for manifest.json (`topk`: the ONNX
    decoder step's search input and outputs, onnx_export.add_topk)."""
    spec = sub.cache_spec()
    V = sub.cfg.vocab_size

    def t(name: str, shape: list, dtype: str) -> dict:
        return {"name": name, "shape": [s if isinstance(s, int) else str(s) for s in shape], "dtype": dtype}

    cross = [t(c.name, list(c.shape), "float32") for c in spec.cross]
    past = [t(c.name, list(c.shape), "float32") for c in spec.self_attn]
    new = [t("new_" + c.name, [c.shape[0], c.shape[1], "past_len+1", c.shape[3]], "float32") for c in spec.self_attn]
    return {
        "encoder": {
            "inputs": [t("src_tokens", ["batch", "src_len"], "int64")],
            "outputs": [t("src_bias", ["batch", "src_len"], "float32"), *cross],
        },
        "decoder_step": {
            "inputs": [t("tokens", ["batch", 1], "int64"), t("position", [1], "int64"),
                       t("src_bias", ["batch", "src_len"], "float32"), *cross, *past,
                       *([t(TOPK_INPUT, [1], "int64")] if topk else [])],
            "outputs": [t("log_probs", ["batch", V], "float32"), *new,
                        *([t(TOPK_VALUES, ["batch", "k"], "float32"), t(TOPK_IDS, ["batch", "k"], "int64")]
                          if topk else [])],
        },
    }
