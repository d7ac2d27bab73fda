"""CTranslate2 as a peer in the bench: the same SubTransformer's weights in a CTranslate2 model.

Optional bench dependency (`pip install -e .[bench]`, or `pip install ctranslate2`); never a
runtime one. CTranslate2 expresses classic uniform Transformers: one head count for every
attention, q/k/v width = embed dim, encoder and decoder of one width, each decoder layer attending
to the last encoder layer only (HAT's ende choice -1), post-norm here. For such an arch the
SubTransformer maps 1:1 onto `TransformerSpec` (fairseq's layout, as CTranslate2's own fairseq
converter does it): fused q/k/v, post-norm, embeddings scaled by sqrt(d), our sinusoidal table
(sliced from the SuperTransformer's width, HAT's way) given as the position encodings, the
output projection tied to the embedding table. The vocabulary is made of placeholder pieces
("t<id>") with our special ids named as CTranslate2 expects; translating id lists goes through it.

Differences that do not change tokens in the bench: our log-probs push pad down by 1e4
(CTranslate2 does not; pad's embedding row is zero, so its logit is 0 and never among the best
with these weights); fixed-length decoding is min = max decoding length, so EOS is masked at every
step, as `fixed_steps` does in our search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from hat_edge.space import Arch


def available() -> Optional[str]:
    """CTranslate2's version, or None when it is not installed."""
    try:
        import ctranslate2
    except ImportError:
        return None
    return str(ctranslate2.__version__)


def expressible(arch: Arch) -> Optional[str]:
    """None when CTranslate2 can run `arch` exactly, else why not (one line)."""
    heads = set(arch.encoder_self_attention_heads) | set(arch.decoder_self_attention_heads) | set(
        arch.decoder_ende_attention_heads)
    if len(heads) != 1:
        return f"attention heads differ between layers ({sorted(heads)})"
    if arch.encoder_embed_dim != arch.decoder_embed_dim:
        return "encoder and decoder widths differ"
    if arch.qkv_dim != arch.encoder_embed_dim:
        return f"q/k/v width {arch.qkv_dim} differs from the embed dim {arch.encoder_embed_dim}"
    if any(arch.ende_layers(i) != 1 for i in range(arch.decoder_layer_num)):
        return "a decoder layer attends to more than the last encoder layer (HAT's arbitrary ende attention)"
    return None


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def vocabulary(vocab_size: int, pad: int, bos: int, eos: int) -> list[str]:
    names = [f"t{i}" for i in range(vocab_size)]
    names[pad], names[bos], names[eos] = "<blank>", "<s>", "</s>"
    if "<unk>" not in names:  # CTranslate2 needs an unknown token; any non-special id serves
        names[next(i for i in range(vocab_size) if i not in (pad, bos, eos))] = "<unk>"
    return names


def build(sub: Any, out_dir: str | Path) -> Path:
    """Write `sub` (a uniform SubTransformer, weights as they are) as a float32 CTranslate2 model."""
    from ctranslate2.specs import common_spec, transformer_spec

    arch, cfg = sub.arch, sub.cfg
    why = expressible(arch)
    if why:
        raise ValueError(f"CTranslate2 cannot express this arch: {why}")
    heads = arch.encoder_self_attention_heads[0]
    spec = transformer_spec.TransformerSpec.from_config(
        (arch.encoder_layer_num, arch.decoder_layer_num), heads, pre_norm=False,
        activation=common_spec.Activation.RELU)
    spec.config.layer_norm_epsilon = float(sub.encoder_layers[0].final_layer_norm.eps)

    def linear(s: Any, m: Any) -> None:
        s.weight = _np(m.weight)
        if m.bias is not None:
            s.bias = _np(m.bias)

    def fused(s: Any, mods: list) -> None:
        s.weight = np.concatenate([_np(m.weight) for m in mods], axis=0)
        s.bias = np.concatenate([_np(m.bias) for m in mods], axis=0)

    def norm(s: Any, m: Any) -> None:
        s.gamma, s.beta = _np(m.weight), _np(m.bias)

    def ffn(s: Any, layer: Any) -> None:
        norm(s.layer_norm, layer.final_layer_norm)
        linear(s.linear_0, layer.ffn.fc1)
        linear(s.linear_1, layer.ffn.fc2)

    off = sub.pos_offset
    enc_table, dec_table = _np(sub._encoder_embed_weight()), _np(sub._decoder_embed_weight())
    spec.encoder.embeddings[0].weight = enc_table
    spec.encoder.scale_embeddings = True
    spec.encoder.position_encodings.encodings = _np(sub.encoder_pos[off:])
    for s, layer in zip(spec.encoder.layer, sub.encoder_layers):
        a = layer.self_attn
        fused(s.self_attention.linear[0], [a.q_proj, a.k_proj, a.v_proj])
        linear(s.self_attention.linear[1], a.out_proj)
        norm(s.self_attention.layer_norm, layer.self_attn_layer_norm)
        ffn(s.ffn, layer)
    spec.decoder.embeddings.weight = dec_table
    spec.decoder.scale_embeddings = True
    spec.decoder.position_encodings.encodings = _np(sub.decoder_pos[off:])
    if cfg.share_all_embeddings:
        spec.decoder.projection.weight = dec_table
    else:
        spec.decoder.projection.weight = _np(sub.output_projection.weight)
    for s, layer in zip(spec.decoder.layer, sub.decoder_layers):
        a, c = layer.self_attn, layer.encoder_attn
        fused(s.self_attention.linear[0], [a.q_proj, a.k_proj, a.v_proj])
        linear(s.self_attention.linear[1], a.out_proj)
        norm(s.self_attention.layer_norm, layer.self_attn_layer_norm)
        linear(s.attention.linear[0], c.q_proj)
        fused(s.attention.linear[1], [c.k_proj, c.v_proj])
        linear(s.attention.linear[2], c.out_proj)
        norm(s.attention.layer_norm, layer.encoder_attn_layer_norm)
        ffn(s.ffn, layer)
    names = vocabulary(cfg.vocab_size, cfg.pad_id, cfg.bos_id, cfg.eos_id)
    spec.register_source_vocabulary(names)
    spec.register_target_vocabulary(names)
    spec.config.bos_token, spec.config.eos_token = "<s>", "</s>"
    spec.config.decoder_start_token = "<s>"  # our BOS starts the decoder (fairseq's would be EOS)
    spec.config.add_source_bos = spec.config.add_source_eos = False  # our sources end with EOS already
    spec.validate()
    spec.optimize(quantization="float32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(str(out))
    return out


class Peer:
    """A CTranslate2 translator over a model `build` wrote; compute_type "float32" or "int8"."""

    def __init__(self, model_dir: str | Path, compute_type: str, vocab_size: int, pad: int, bos: int,
                 eos: int, threads: int = 1) -> None:
        import ctranslate2

        self.tr = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                         inter_threads=1, intra_threads=threads)
        self.names = vocabulary(vocab_size, pad, bos, eos)
        self.ids = {n: i for i, n in enumerate(self.names)}

    def translate(self, src: np.ndarray, beam: int, steps: int) -> list[list[int]]:
        """Fixed-length decoding of (B, S) ids: exactly `steps` tokens, EOS never taken."""
        source = [[self.names[int(t)] for t in row] for row in src]
        res = self.tr.translate_batch(source, beam_size=beam, max_decoding_length=steps,
                                      min_decoding_length=steps, length_penalty=1.0)
        return [[self.ids[t] for t in r.hypotheses[0]] for r in res]
