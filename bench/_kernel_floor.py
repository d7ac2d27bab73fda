"""The kernel floor of a translation: only its weight matmuls, in onnxruntime, nothing else.

For the bench (`export_speed.py`): what onnxruntime's own matmul kernels need, on this CPU, for
the weights a translation reads, with none of the rest of the model (attention products, softmax,
layer norms, caches, the search, session plumbing per node). Two graphs built from a
SubTransformer's own weights:

  once: every encoder linear and each decoder layer's encoder-decoder k/v projection, on
        SRC_LEN rows (computed once per source, as the bundle does);
  step: every other decoder linear (self-attention q/k/v/out, encoder-decoder q/out, FFN) and
        the d x V output projection, on `rows` rows (beam or 1); run once per decoding step.

Each linear is an independent MatMul (+ bias Add) from a graph input of its input width, so the
graph is the kernels alone. int8: the same graphs through the bundle's quantizer
(`exporters.quantize.quantize_int8`: dynamic int8, MatMulInteger + activation quantization),
so the floor has the deployed int8 path's kernels. The median of this floor against the bandwidth
bound says how far the matmul kernels themselves are from it; the engine against the floor says
what the rest of a decoding step costs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _linears(sub: Any) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], list[tuple[np.ndarray, np.ndarray | None]]]:
    """(once, per-step) lists of (W^T (in, out) float32, bias or None)."""
    import torch.nn as nn

    def wb(m: nn.Linear) -> tuple[np.ndarray, np.ndarray | None]:
        w = np.ascontiguousarray(m.weight.detach().float().numpy().T)
        b = None if m.bias is None else m.bias.detach().float().numpy().copy()
        return w, b

    once = [wb(m) for lay in sub.encoder_layers for m in lay.modules() if isinstance(m, nn.Linear)]
    step = []
    for lay in sub.decoder_layers:
        cross_kv = {id(lay.encoder_attn.k_proj), id(lay.encoder_attn.v_proj)}
        once += [wb(lay.encoder_attn.k_proj), wb(lay.encoder_attn.v_proj)]
        step += [wb(m) for m in lay.modules() if isinstance(m, nn.Linear) and id(m) not in cross_kv]
    # the output projection: the decoder's (sliced) embedding table when tied, its own otherwise
    e = sub._decoder_embed_weight() if sub.cfg.share_all_embeddings else sub.output_projection.weight
    step.append((np.ascontiguousarray(e.detach().float().numpy().T), None))
    return once, step


def _graph(linears: list[tuple[np.ndarray, np.ndarray | None]], name: str):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    widths = sorted({w.shape[0] for w, _ in linears})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["rows", k]) for k in widths]
    for i, (w, b) in enumerate(linears):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        y = f"y{i}"
        if b is None:
            nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [y]))
        else:
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"{y}_mm"]))
            nodes.append(helper.make_node("Add", [f"{y}_mm", f"b{i}"], [y]))
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", w.shape[1]]))
    g = helper.make_graph(nodes, name, inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def build(sub: Any, work: Path, int8: bool) -> tuple[Path, Path]:
    """The once and step graphs of `sub` as ONNX files under `work` (int8: quantized)."""
    import onnx

    from hat_edge.exporters.quantize import quantize_int8

    work.mkdir(parents=True, exist_ok=True)
    once, step = _linears(sub)
    paths = []
    for name, lin in (("once", once), ("step", step)):
        p = work / f"{name}.onnx"
        onnx.save(_graph(lin, name), str(p))
        if int8:
            q = work / f"{name}.int8.onnx"
            quantize_int8(p, q)
            p = q
        paths.append(p)
    return paths[0], paths[1]


def runner(sub: Any, work: Path | None, int8: bool, src_len: int, steps: int) -> Callable[[int], None]:
    """run(rows): the once graph on `src_len` rows, then the step graph `steps` times on `rows`
    rows; one thread, optimisation level "all" (the bundle's session settings)."""
    import onnxruntime as ort

    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="hat-edge-floor-")
        work = Path(tmp.name)
    once_p, step_p = build(sub, work, int8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    once = ort.InferenceSession(str(once_p), so, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(step_p), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def feeds(sess: Any, rows: int) -> dict[str, np.ndarray]:
        return {i.name: rng.standard_normal((rows, int(i.name[1:]))).astype(np.float32) for i in sess.get_inputs()}

    once_feed = feeds(once, src_len)
    step_feeds: dict[int, dict[str, np.ndarray]] = {}

    def run(rows: int) -> None:
        if rows not in step_feeds:
            step_feeds[rows] = feeds(step, rows)
        once.run(None, once_feed)
        f = step_feeds[rows]
        for _ in range(steps):
            step.run(None, f)

    run.tmp = tmp  # type: ignore[attr-defined]  (keeps the graphs' directory alive with the runner)
    return run
