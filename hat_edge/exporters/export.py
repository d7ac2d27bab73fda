"""Make bundles: a SubTransformer exported to ONNX or TorchScript, optionally int8, sealed.

    export_bundle(sub, out_dir, fmt="onnx"|"torchscript", quantize=None|"int8", tokenizer=None) -> Path
    quantize_bundle(fp32_dir, out_dir, sub=None) -> Path

Both write into a temp dir next to `out_dir` and publish it with a rename, so a crash leaves the old
bundle or the new one, never a mix (`hat_edge.exporters.bundle`).
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import onnx
import torch

from hat_edge import __version__
from hat_edge.errors import UserError
from hat_edge.exporters.bundle import (
    EXPORTER_NAMES,
    Bundle,
    _prepare_out_dir,
    _publish,
    leave_weights_to_device,
    load_bundle,
    weightless_fields,
    write_manifest,
)
from hat_edge.exporters.graphs import io_description
from hat_edge.exporters.onnx_export import DEFAULT_OPSET, export_onnx
from hat_edge.exporters.quantize import quantize_int8
from hat_edge.exporters.torchscript_export import export_torchscript
from hat_edge.exporters.verify import graph_parity
from hat_edge.runtime.bundle import bundle_files
from hat_edge.runtime.formats import BUNDLE_FORMAT, BUNDLE_VERSION, FORMATS, QUANTIZE, RUNTIME_OF_FORMAT, precision_of

if TYPE_CHECKING:
    from hat_edge.data.tokenizer import Tokenizer
    from hat_edge.model import SubTransformer


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out



def export_bundle(
    sub: "SubTransformer",
    out_dir: str | Path,
    fmt: str = "onnx",
    quantize: Optional[str] = None,
    tokenizer: "Tokenizer | None" = None,
    opset: Optional[int] = None,
    exporter: str = "dynamo",
    parity_check: bool = True,
    weightless_seed: Optional[int] = None,
) -> Path:
    """Export a SubTransformer to a bundle directory; returns its path.

    fmt "onnx" (onnxruntime) or "torchscript"; quantize None or "int8" (ONNX only); tokenizer: a
    hat_edge Tokenizer saved into the bundle; opset: ONNX opset (default 18). The export-time parity
    check (encoder outputs and one decoder step against eager PyTorch) is recorded in the manifest.
    weightless_seed (ONNX only): a *measurement* bundle, as `make_weightless(seed=...)` makes one,
    in the same pass: its float weights are left to the device (written from that seed), never
    saved here; no parity check (random weights).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize!r}: allowed: int8")
    if quantize and fmt != "onnx":
        raise UserError("--quantize int8 needs --format onnx (onnxruntime dynamic quantization)")
    if opset is not None and fmt != "onnx":
        raise UserError("--opset applies to --format onnx only")
    if weightless_seed is not None and fmt != "onnx":
        raise UserError("only ONNX bundles can leave their weights to the device")
    if tokenizer is not None and tokenizer.vocab_size != sub.cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                        f"{sub.cfg.vocab_size}")
    if tokenizer is not None and getattr(tokenizer, "src_vocab_size", tokenizer.vocab_size) != sub.cfg.encoder_vocab_size:
        raise UserError(f"tokenizer's source side has {tokenizer.src_vocab_size} symbols but the model's encoder "
                        f"vocabulary is {sub.cfg.encoder_vocab_size}")
    out_dir = Path(out_dir)
    tmp = _prepare_out_dir(out_dir)
    try:
        sub = sub.eval()
        generated: dict[str, dict] = {}

        def leave_weights(name: str, model: Any) -> None:
            generated.update(leave_weights_to_device(model, name, weightless_seed or 0))

        if fmt == "onnx":
            opset = opset or DEFAULT_OPSET
            if quantize == "int8":
                fp32 = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fp32-", dir=tmp.parent))  # outside the bundle
                try:
                    graphs = export_onnx(sub, fp32, opset=opset, exporter=exporter)
                    for f in graphs.values():
                        quantize_int8(fp32 / f, tmp / f)
                finally:
                    shutil.rmtree(fp32, ignore_errors=True)
                if weightless_seed is not None:  # the int8 weights exist only once quantized
                    for f in graphs.values():
                        model = onnx.load(str(tmp / f))
                        leave_weights(f, model)
                        onnx.save(model, str(tmp / f))
            else:
                graphs = export_onnx(sub, tmp, opset=opset, exporter=exporter,
                                     finish=leave_weights if weightless_seed is not None else None)
            exporter_name = f"torch.onnx.export(dynamo={exporter == 'dynamo'})"
        else:
            graphs = export_torchscript(sub, tmp)
            exporter_name = "torch.jit.trace+freeze"
        assert exporter_name in EXPORTER_NAMES, exporter_name
        tok_info = None
        if tokenizer is not None:
            tok_path = tokenizer.save(tmp)
            tok_info = {"file": tok_path.name, "kind": getattr(tokenizer, "kind", "sentencepiece"),
                        "vocab_size": tokenizer.vocab_size}
        io = io_description(sub, topk=fmt == "onnx")
        cfg = sub.cfg
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "hat_edge_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "runtime": RUNTIME_OF_FORMAT[fmt],
            "precision": precision_of(quantize),
            "exporter": exporter_name,
            "opset": opset if fmt == "onnx" else None,
            "exported_with": _versions(),
            "arch": sub.arch.to_dict(),
            "model": {
                "vocab_size": cfg.vocab_size,
                **({"src_vocab_size": cfg.src_vocab_size} if cfg.src_vocab_size is not None else {}),
                "pad_id": cfg.pad_id,
                "bos_id": cfg.bos_id,
                "eos_id": cfg.eos_id,
                "max_positions": cfg.max_positions,
                "share_all_embeddings": cfg.share_all_embeddings,
                "decoder_layers": len(sub.decoder_layers),
                "self_cache": [[int(c.shape[1]), int(c.shape[3])] for c in sub.cache_spec().self_attn[::2]],
            },
            "graphs": {name: {"file": graphs[name], **io[name]} for name in ("encoder", "decoder_step")},
            "tokenizer": tok_info,
            "parity": None,
        }
        if weightless_seed is not None:
            manifest.update(weightless_fields(generated))
        _seal(tmp, out_dir, manifest, sub if parity_check and weightless_seed is None else None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _seal(tmp: Path, out_dir: Path, manifest: dict[str, Any], sub: "SubTransformer | None") -> None:
    """Hash the files into the manifest, record the parity with `sub` when given, publish."""
    manifest = write_manifest(tmp, manifest)
    if sub is not None:
        manifest["parity"] = graph_parity(sub, Bundle(tmp, manifest))
        write_manifest(tmp, manifest)
    _publish(tmp, out_dir)


def quantize_bundle(src: str | Path, out_dir: str | Path, sub: "SubTransformer | None" = None) -> Path:
    """An int8 copy of an fp32 ONNX bundle (no re-export); parity recorded when `sub` is given."""
    b = load_bundle(src)
    if b.runtime != "onnxruntime" or b.precision != "fp32":
        raise UserError(f"bundle {src}: int8 quantization needs an fp32 ONNX bundle "
                        f"(this one is {b.runtime}, {b.precision})")
    out_dir = Path(out_dir)
    tmp = _prepare_out_dir(out_dir)
    try:
        for name in bundle_files(b.path):
            g = next((g for g in b.manifest["graphs"].values() if g["file"] == name), None)
            if g is not None:
                quantize_int8(b.path / name, tmp / name)
            else:
                shutil.copy2(b.path / name, tmp / name)
        manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "manifest_sha256")}
        manifest.update(precision="int8", parity=None,
                        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        _seal(tmp, out_dir, manifest, sub)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = ["export_bundle", "quantize_bundle"]
