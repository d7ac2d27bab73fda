"""Exporters: SubTransformers to ONNX / TorchScript bundles, int8, parity, the host decoding loop.

    export_bundle(sub, out_dir, fmt="onnx"|"torchscript", quantize=None|"int8", tokenizer=None,
                  opset=None) -> Path
    load_bundle(dir) -> Bundle            (hashes and version checked; UserError otherwise)
    verify_bundle(sub, dir) -> dict       (max_abs_diff, tokens_equal, ...)
    translate(bundle, token_ids, beam=5)  (the device's decoding loop on the host)
    quantize_bundle(fp32_dir, out_dir)    (an int8 copy of an fp32 ONNX bundle, no re-export)

See docs/export.md for the export paths chosen and the measurements behind them.
"""

from hat_edge.exporters.bundle import Bundle, load_bundle
from hat_edge.exporters.export import export_bundle, quantize_bundle
from hat_edge.exporters.ortloop import open_bundle, translate
from hat_edge.exporters.verify import verify_bundle

verify = verify_bundle

__all__ = ["Bundle", "export_bundle", "load_bundle", "quantize_bundle", "verify_bundle", "verify", "translate", "open_bundle"]
