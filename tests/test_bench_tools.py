"""bench/ helpers whose numbers the docs quote: they must measure what they say they measure."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _kernel_floor  # noqa: E402  (bench/)

from hat_edge.model import SubTransformer  # noqa: E402
from hat_edge.space import Arch  # noqa: E402

SMALL = Arch(
    encoder_embed_dim=64, decoder_embed_dim=48, encoder_layer_num=3, decoder_layer_num=2,
    encoder_ffn_embed_dim=(128, 64, 128), encoder_self_attention_heads=(4, 2, 4),
    decoder_ffn_embed_dim=(96, 128), decoder_self_attention_heads=(2, 4),
    decoder_ende_attention_heads=(4, 2), decoder_arbitrary_ende_attn=(2, -1), qkv_dim=64,
)


def test_kernel_floor_is_every_weight_matmul_of_a_translation_once_or_per_step(tmp_path: Path) -> None:
    sub = SubTransformer.random(SMALL, vocab_size=300, seed=0).eval()
    once, step = _kernel_floor._linears(sub)
    n_enc = sum(isinstance(m, torch.nn.Linear) for lay in sub.encoder_layers for m in lay.modules())
    n_dec = sum(isinstance(m, torch.nn.Linear) for lay in sub.decoder_layers for m in lay.modules())
    assert len(once) == n_enc + 2 * SMALL.decoder_layer_num  # + each layer's encoder-decoder k, v
    assert len(step) == n_dec - 2 * SMALL.decoder_layer_num + 1  # + the d x V output projection
    assert step[-1][0].shape == (SMALL.decoder_embed_dim, 300)
    linears = [m for lays in (sub.encoder_layers, sub.decoder_layers) for lay in lays for m in lay.modules()
               if isinstance(m, torch.nn.Linear)]
    assert sum(w.size for w, _ in once + step) == sum(m.weight.numel() for m in linears) + 300 * 48  # nothing twice

    # the fp32 step graph computes x @ W + b of the model's own decoder linears
    once_p, step_p = _kernel_floor.build(sub, tmp_path / "fp32", int8=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(step_p), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal((5, int(i.name[1:]))).astype(np.float32) for i in sess.get_inputs()}
    outs = sess.run(None, feeds)
    for (w, b), y in zip(step, outs):
        ref = feeds[f"x{w.shape[0]}"] @ w + (0 if b is None else b)
        assert np.allclose(y, ref, atol=1e-4)
    # int8: the deployed quantizer's kernels
    _, q = _kernel_floor.build(sub, tmp_path / "int8", int8=True)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "MatMul" not in ops
    run = _kernel_floor.runner(sub, tmp_path / "run", int8=True, src_len=7, steps=3)
    run(5)
    run(1)
