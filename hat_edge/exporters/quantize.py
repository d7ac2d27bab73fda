"""int8: onnxruntime dynamic quantization of both ONNX graphs.

Weights of every MatMul with a constant weight, and the embedding table (Gather), become int8;
activations are quantized on the fly per call (`DynamicQuantizeLinear` + `MatMulInteger`). No
calibration data needed, which suits random-weight latency work and trained checkpoints alike.

Two details matter for this model:
- The tied output projection comes out of the exporter as `Gemm(x, E, transB=1)` on the embedding
  table E, and onnxruntime's dynamic quantizer skips Gemm. It is the largest matrix of a decoder
  step (d x vocab), so we rewrite it first as `MatMul(x, E^T)` with its own (transposed)
  initializer; the embedding lookup keeps E.
- `MatMulConstBOnly`: only weight matmuls are quantized; the attention products (q.k, p.v) stay
  fp32 (quantizing both activations costs accuracy and buys nothing at these sizes).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, B_const[, C]) (alpha = beta = 1, transA = 0) as MatMul (+ Add); returns count."""
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    count = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        w_name = f"{node.input[1]}__matmul_{count}"
        model.graph.initializer.append(numpy_helper.from_array(w, w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__mm" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        # drop initializers nobody reads any more
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return count


def quantize_int8(src: Path, dst: Path, per_channel: bool = False) -> None:
    """Dynamic int8 quantization of one ONNX graph (weights int8, activations uint8 per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    gemm_to_matmul(model)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice about static pre-processing on root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quantize_dynamic(
                model, str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.setLevel(level)
    onnx.checker.check_model(str(dst))
