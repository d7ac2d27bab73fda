"""ONNX export of a SubTransformer: an encoder graph and a decoder-step graph with its caches.

Exporter choice (torch 2.13): `torch.onnx.export(..., dynamo=True)`, the torch.export-based
exporter, with `Dim.AUTO` on every dynamic axis (numbers: docs/export.md, bench/export_speed.py):

- dynamo (default): clean graphs (HAT_wmt14ende_xeon@137.9ms: 209 encoder / 60 decoder-step nodes
  against 871 / 223 from the TorchScript-based exporter), real static head counts and head dims in
  the graph signature, symbolic shapes that keep the relation between the source length and the
  concatenated encoder-decoder keys (`src_len*2` for HAT's ende = 1), opset 18, the onnxscript
  optimizer. It is the maintained path upstream. Its cost: export time (4-6x the TorchScript
  exporter's: 38-58 s for a HAT model with a 32k vocabulary on a busy core).
- TorchScript-based (`exporter="torchscript"`, `dynamo=False`): deprecated upstream, exports in
  seconds, head dims come out symbolic. After onnxruntime's own optimizer both graphs run equally
  fast (within noise), so mass latency measurement may use it (hat_edge.devices.measure does).

Both match eager PyTorch to ~5e-6. The graphs are saved un-optimised (portable across onnxruntime
versions and CPUs); the runner picks onnxruntime's graph optimisation level when it loads them
(`ort_opt_level`, default "all"; measured, the levels differ by less than 10% and their order
changes between runs, "disable" being the slowest for int8 graphs).

Pitfall handled in graphs.py: torch.export de-duplicates aliased example inputs, so example
caches must be distinct tensors (an aliased k/v pair once produced a graph reading k for v).

Dynamic axes: batch/beam rows, source length, past length; each graph input/output dim gets a
readable name (`batch`, `src_len`, `src_len*2`, `past_len`, `past_len+1`).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from hat_edge.errors import UserError
from hat_edge.exporters.graphs import (
    DecoderStepGraph,
    EncoderGraph,
    example_decoder_inputs,
    example_source,
    input_names,
)
from hat_edge.model.sub import SubTransformer
from hat_edge.runtime.formats import TOPK_IDS, TOPK_INPUT, TOPK_VALUES

DEFAULT_OPSET = 18
# The decoder step's search outputs (added after export, `add_topk`): a graph input `topk` (k, a
# 1-element int64 tensor) and, per row, the k best log-probs and their token ids, ordered by
# (-log-prob, id) as ONNX TopK guarantees. A beam-search step then receives N x k values instead
# of N x V (V = 32k: 640 kB per beam-5 step, and a numpy partial sort over them); the full
# `log_probs` output stays for parity checks, greedy search and beam's forced-EOS last step. A runner that does not
# know these names ignores them (it asks for outputs by name). The names: hat_edge.runtime.formats.
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder_step.onnx"
EXPORTERS = ("dynamo", "torchscript")


def _export_one(module: nn.Module, args: tuple, path: Path, in_names: list[str], out_names: list[str],
                dynamic: dict[str, dict[int, str]], opset: int, exporter: str) -> None:
    # The exporter's chatter: warnings (deprecations) and log lines ("torchvision is not installed").
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _export_quietly(module, args, path, in_names, out_names, dynamic, opset, exporter)
        finally:
            quiet.setLevel(level)


def _export_quietly(module: nn.Module, args: tuple, path: Path, in_names: list[str], out_names: list[str],
                    dynamic: dict[str, dict[int, str]], opset: int, exporter: str) -> None:
    from torch.export import Dim

    if exporter == "dynamo":
        # dynamic_shapes mirror forward's signature: positional args, then *caches as one tuple
        per_arg = [{ax: Dim.AUTO for ax in dynamic.get(n, {})} or None for n in in_names]
        n_fixed = 3 if len(in_names) > 1 else 1
        shapes: tuple = tuple(per_arg[:n_fixed])
        if len(in_names) > n_fixed:
            shapes = shapes + (tuple(per_arg[n_fixed:]),)
        prog = torch.onnx.export(
            module, args, None, input_names=in_names, output_names=out_names,
            dynamic_shapes=shapes, dynamo=True, opset_version=opset, external_data=False,
            verbose=False, optimize=True,
        )
        prog.save(str(path), external_data=False)
    else:
        torch.onnx.export(
            module, args, str(path), input_names=in_names, output_names=out_names,
            dynamic_axes=dynamic, dynamo=False, opset_version=opset, do_constant_folding=True,
        )


def _name_dims(model: onnx.ModelProto, known: dict[str, dict[int, str]]) -> None:
    """Replace the exporter's symbol names (s17, 2*s18) by ours (batch, src_len*2) everywhere."""
    rename: dict[str, str] = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        for ax, want in known.get(vi.name, {}).items():
            dims = vi.type.tensor_type.shape.dim
            if ax < len(dims):
                sym = dims[ax].dim_param
                if sym and re.fullmatch(r"[A-Za-z_]\w*", sym):
                    rename.setdefault(sym, want)
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in rename) + r")\b")

    def fix(expr: str) -> str:
        out = pattern.sub(lambda m: rename[m.group(1)], expr)
        # "2*src_len" reads better as "src_len*2"
        m = re.fullmatch(r"(\d+)\*(\w+)", out)
        return f"{m.group(2)}*{m.group(1)}" if m else out.replace(" ", "")

    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = fix(d.dim_param)


def add_topk(model: onnx.ModelProto) -> None:
    """Append TopK(log_probs, topk) to a decoder-step graph: input `topk`, outputs
    `topk_log_probs` (batch, k) float32 and `topk_ids` (batch, k) int64, sorted, ties to the
    lower id (ONNX TopK's contract, the same rule as the numpy search)."""
    from onnx import TensorProto, helper

    g = model.graph
    if any(i.name == TOPK_INPUT for i in g.input):
        return
    if not g.output or g.output[0].name != "log_probs":
        raise RuntimeError("decoder-step graph: the first output is not log_probs")
    g.input.append(helper.make_tensor_value_info(TOPK_INPUT, TensorProto.INT64, [1]))
    g.node.append(helper.make_node("TopK", ["log_probs", TOPK_INPUT], [TOPK_VALUES, TOPK_IDS], name="search_topk",
                                   axis=-1, largest=1, sorted=1))
    g.output.append(helper.make_tensor_value_info(TOPK_VALUES, TensorProto.FLOAT, ["batch", "k"]))
    g.output.append(helper.make_tensor_value_info(TOPK_IDS, TensorProto.INT64, ["batch", "k"]))


def dynamic_axes(sub: SubTransformer) -> dict[str, dict[int, str]]:
    axes = sub.cache_spec().dynamic_axes()
    axes["src_bias"] = {0: "batch", 1: "src_len"}
    return axes


@torch.no_grad()
def export_onnx(sub: SubTransformer, out_dir: Path, opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo",
                finish: Callable[[str, onnx.ModelProto], None] | None = None) -> dict[str, str]:
    """Write encoder.onnx and decoder_step.onnx into out_dir; returns {"encoder": file, ...}.

    Each graph passes `onnx.checker.check_model(full_check=True)` (with shape inference).
    `finish(file name, model)`, when given, may change each checked graph before it is saved.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"ONNX exporter '{exporter}' is not known; allowed: {', '.join(EXPORTERS)}")
    if opset < 18 and exporter == "dynamo":
        raise UserError(f"--opset {opset}: the dynamo ONNX exporter needs opset 18 or newer")
    sub = sub.eval()
    enc_in, enc_out, dec_in, dec_out = input_names(sub)
    axes = dynamic_axes(sub)
    enc_path, dec_path = out_dir / ENCODER_FILE, out_dir / DECODER_FILE
    _export_one(EncoderGraph(sub).eval(), (example_source(sub),), enc_path, enc_in, enc_out, axes, opset, exporter)
    _export_one(DecoderStepGraph(sub).eval(), example_decoder_inputs(sub), dec_path, dec_in, dec_out, axes,
                opset, exporter)
    for path, names in ((enc_path, (enc_in, enc_out)), (dec_path, (dec_in, dec_out))):
        model = onnx.load(str(path))
        got_in = [i.name for i in model.graph.input]
        got_out = [o.name for o in model.graph.output]
        if got_in != names[0] or got_out != names[1]:
            raise RuntimeError(f"{path.name}: exported graph has inputs {got_in} / outputs {got_out}, "
                               f"expected {names[0]} / {names[1]}")
        _name_dims(model, axes)
        if path == dec_path:
            add_topk(model)
        onnx.checker.check_model(model, full_check=True)
        if finish is not None:
            finish(path.name, model)
        onnx.save(model, str(path))
    return {"encoder": ENCODER_FILE, "decoder_step": DECODER_FILE}
