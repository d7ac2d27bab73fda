"""TorchScript export of a SubTransformer: `encoder.pt` and `decoder_step.pt` (torch.jit.trace).

Which path, and why (torch 2.13; measured numbers in docs/export.md):

- `torch.jit.trace` (used). The SubTransformer's export split is straight-line tensor code
  (layer count, heads and encoder-decoder fan-in are Python constants of one arch), so tracing
  records it exactly, and every shape is read with `size()`, which the tracer keeps symbolic: the
  traced graphs accept any batch/beam rows, source length and past length (verified against eager
  PyTorch at shapes other than the trace's). The saved `.pt` files load with `torch.jit.load` on any
  device with a torch build, no Python model code needed: that is what a board running the
  `torchscript` runtime has. The modules are frozen (`torch.jit.freeze`: weights become constants,
  attribute lookups go); measured, that is within noise of the plain trace (2014-2134 vs
  2092-2206 ms, HAT_wmt14ende_raspberrypi@6.9s, beam 5), and it keeps the files free of module
  structure. TorchScript runs 1.04-1.15x faster than eager PyTorch with beam 5, 1.09-1.22x greedy.
- `torch.jit.script`: not needed (no data-dependent control flow) and stricter about the model
  code's typing; tracing is enough.
- `torch.export` (tried; not used for the runtime). `torch.export.export` handles the same split
  with `Dim.AUTO` dynamic axes (the ONNX exporter uses exactly that program), and
  `torch.export.save/load` round-trips it (`.pt2`). But a loaded ExportedProgram runs as a Python
  fx GraphModule: it needs a matching torch on the device, gives no speed over eager PyTorch on CPU,
  and the compiled form (AOTInductor) needs a C++ toolchain and builds for the host's CPU, so it
  is no artifact to push to an ARM board (measured: the .pt2 program runs at eager speed or slower,
  2379-2443 vs 2197-2419 ms). TorchScript is deprecated upstream but still ships and is
  the only torch-native, Python-free, portable artifact in 2.13; the ONNX path is the long-term
  deployment format.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from hat_edge.exporters.graphs import DecoderStepGraph, EncoderGraph, example_decoder_inputs, example_source
from hat_edge.model.sub import SubTransformer

ENCODER_FILE = "encoder.pt"
DECODER_FILE = "decoder_step.pt"


def _trace(module: torch.nn.Module, args: tuple, freeze: bool) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about size() -> int conversions
        traced = torch.jit.trace(module, args, check_trace=False)
        if freeze:
            traced = torch.jit.freeze(traced.eval())
    return traced


@torch.no_grad()
def export_torchscript(sub: SubTransformer, out_dir: Path, freeze: bool = True) -> dict[str, str]:
    """Write encoder.pt and decoder_step.pt into out_dir; returns {"encoder": file, ...}."""
    sub = sub.eval()
    params = [p.requires_grad for p in sub.parameters()]
    for p in sub.parameters():
        p.requires_grad_(False)  # a traced graph must not carry autograd state
    try:
        enc = _trace(EncoderGraph(sub).eval(), (example_source(sub),), freeze)
        dec = _trace(DecoderStepGraph(sub).eval(), example_decoder_inputs(sub), freeze)
        # Save before requires_grad is restored: frozen constants ARE the parameter tensors, and a
        # constant saved with requires_grad=True cannot be loaded back ("Unsupported value kind").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see the module doc: chosen knowingly
            torch.jit.save(enc, str(out_dir / ENCODER_FILE))
            torch.jit.save(dec, str(out_dir / DECODER_FILE))
    finally:
        for p, rg in zip(sub.parameters(), params):
            p.requires_grad_(rg)
    return {"encoder": ENCODER_FILE, "decoder_step": DECODER_FILE}
