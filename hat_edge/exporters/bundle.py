"""The deployable bundle: exported graphs + tokenizer + manifest.json, written atomically.

    DIR/
      manifest.json          format "hat-edge-bundle", version 1 (see `MANIFEST_FIELDS` below)
      encoder.onnx           | encoder.pt
      decoder_step.onnx      | decoder_step.pt
      tokenizer.model        when a tokenizer was given (a checkpoint's SentencePiece model)

manifest.json holds: format, version, hat_edge_version, created_at, runtime ("onnxruntime" |
"torchscript"), precision ("fp32" | "int8"), exporter, opset (ONNX only), torch/onnx versions used,
arch (Arch.to_dict()), model (vocab size, special ids, max positions, per-layer self-cache heads and
head dims), graphs (file and input/output names, symbolic shapes, dtypes), tokenizer, files
(sha256 and bytes of every other file), parity (export-time max |diff| against PyTorch, and the
`--verify` figures when run), and manifest_sha256 (over the canonical JSON of everything else, so an
edited manifest is caught too).

Reading (`load_bundle`) uses the runner's own checks (`runner.read_manifest`): the device and the
host reject the same things, each with one line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from hat_edge import __version__
from hat_edge.devices import runner
from hat_edge.errors import UserError
from hat_edge.exporters.graphs import io_description
from hat_edge.space import Arch

FORMATS = ("onnx", "torchscript")
QUANTIZE = (None, "int8")
RUNTIME_OF = {"onnx": "onnxruntime", "torchscript": "torchscript"}


@dataclass(frozen=True)
class Bundle:
    """A checked bundle on disk (hashes verified when it was loaded)."""

    path: Path
    manifest: dict

    @property
    def runtime(self) -> str:
        return self.manifest["runtime"]

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")

    @property
    def arch(self) -> Arch:
        return Arch.from_dict(self.manifest["arch"], f"{self.path}/manifest.json")

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["model"]["vocab_size"])

    @property
    def tokenizer_file(self) -> Optional[Path]:
        tok = self.manifest.get("tokenizer")
        return self.path / tok["file"] if tok else None

    def open(self, threads: Optional[int] = None, device: str = "cpu", ort_opt_level: str = "all") -> runner.Model:
        """The bundle's graphs in their runtime, ready for `runner.translate` / `runner.measure`."""
        try:
            return runner.open_model(self.path, threads=threads, device=device, ort_opt_level=ort_opt_level,
                                     manifest=self.manifest)
        except runner.RunnerError as e:
            raise UserError(str(e)) from None


def load_bundle(path: str | Path) -> Bundle:
    """Read DIR/manifest.json and check format, version, every file's sha256 and no extra files.

    A tampered, incomplete or foreign bundle raises UserError with one line naming the problem.
    """
    p = Path(path)
    try:
        manifest = runner.read_manifest(p)
    except runner.RunnerError as e:
        raise UserError(str(e)) from None
    return Bundle(p, manifest)


def _manifest_digest(manifest: dict) -> str:
    return runner.manifest_digest(manifest)


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Hash every file, seal the manifest with its own digest, write it; returns the manifest."""
    files = {}
    for rel in runner.bundle_files(bundle_dir):
        f = bundle_dir / rel
        files[rel] = {"sha256": runner.sha256_file(f), "bytes": f.stat().st_size}
    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["files"] = files
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    tmp = bundle_dir / (runner.MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, bundle_dir / runner.MANIFEST)
    return manifest


def update_parity(bundle: Bundle, parity: dict) -> Bundle:
    """Record verification figures in an existing bundle's manifest (files are unchanged)."""
    m = dict(bundle.manifest)
    m["parity"] = {**(m.get("parity") or {}), **parity}
    m = write_manifest(bundle.path, m)
    return Bundle(bundle.path, m)


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def check_out_dir(out_dir: str | Path) -> Path:
    """Fail early (before any slow export) when out_dir cannot become a bundle directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / runner.MANIFEST).is_file():
        raise UserError(f"--out {out_dir}: directory is not empty and holds no bundle; "
                        "choose a new or empty directory (an existing bundle is replaced)")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out_dir}: cannot write there ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK) and not out_dir.is_dir():
                raise UserError(f"--out {out_dir}: cannot write there ({parent} is not writable)")
            break
    return out_dir


def _prepare_out_dir(out_dir: Path) -> Path:
    """A fresh temp dir next to out_dir (same filesystem, so publishing is a rename)."""
    check_out_dir(out_dir)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary directory
        return tmp
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write there ({e.strerror or e.__class__.__name__})") from None


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp; a crash leaves either the old bundle or the new one, never a mix."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    sub: Any,
    out_dir: str | Path,
    fmt: str = "onnx",
    quantize: Optional[str] = None,
    tokenizer: Any = None,
    opset: Optional[int] = None,
    exporter: str = "dynamo",
    parity_check: bool = True,
) -> Path:
    """Export a SubTransformer to a bundle directory; returns its path.

    fmt "onnx" (onnxruntime) or "torchscript"; quantize None or "int8" (ONNX only); tokenizer: a
    hat_edge Tokenizer saved into the bundle; opset: ONNX opset (default 18). The export-time parity
    check (encoder outputs and one decoder step against eager PyTorch) is recorded in the manifest.
    """
    from hat_edge.exporters.onnx_export import DEFAULT_OPSET, export_onnx
    from hat_edge.exporters.torchscript_export import export_torchscript

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize {quantize!r}: allowed: int8")
    if quantize and fmt != "onnx":
        raise UserError("--quantize int8 needs --format onnx (onnxruntime dynamic quantization)")
    if opset is not None and fmt != "onnx":
        raise UserError("--opset applies to --format onnx only")
    if tokenizer is not None and tokenizer.vocab_size != sub.cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                        f"{sub.cfg.vocab_size}")
    out_dir = Path(out_dir)
    tmp = _prepare_out_dir(out_dir)
    try:
        sub = sub.eval()
        if fmt == "onnx":
            opset = opset or DEFAULT_OPSET
            if quantize == "int8":
                from hat_edge.exporters.quantize import quantize_int8

                fp32 = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.fp32-", dir=tmp.parent))  # outside the bundle
                try:
                    graphs = export_onnx(sub, fp32, opset=opset, exporter=exporter)
                    for f in graphs.values():
                        quantize_int8(fp32 / f, tmp / f)
                finally:
                    shutil.rmtree(fp32, ignore_errors=True)
            else:
                graphs = export_onnx(sub, tmp, opset=opset, exporter=exporter)
            exporter_name = f"torch.onnx.export(dynamo={exporter == 'dynamo'})"
        else:
            graphs = export_torchscript(sub, tmp)
            exporter_name = "torch.jit.trace+freeze"
        tok_info = None
        if tokenizer is not None:
            tok_path = tokenizer.save(tmp)
            tok_info = {"file": tok_path.name, "kind": "sentencepiece", "vocab_size": tokenizer.vocab_size}
        io = io_description(sub)
        cfg = sub.cfg
        manifest: dict[str, Any] = {
            "format": runner.BUNDLE_FORMAT,
            "version": runner.BUNDLE_VERSION,
            "hat_edge_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "runtime": RUNTIME_OF[fmt],
            "precision": quantize or "fp32",
            "exporter": exporter_name,
            "opset": opset if fmt == "onnx" else None,
            "exported_with": _versions(),
            "arch": sub.arch.to_dict(),
            "model": {
                "vocab_size": cfg.vocab_size,
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
        manifest = write_manifest(tmp, manifest)
        if parity_check:
            from hat_edge.exporters.verify import graph_parity

            manifest["parity"] = graph_parity(sub, Bundle(tmp, manifest))
            manifest = write_manifest(tmp, manifest)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def quantize_bundle(src: str | Path, out_dir: str | Path, sub: Any = None) -> Path:
    """An int8 copy of an fp32 ONNX bundle (no re-export); parity recorded when `sub` is given."""
    from hat_edge.exporters.quantize import quantize_int8

    b = load_bundle(src)
    if b.runtime != "onnxruntime" or b.precision != "fp32":
        raise UserError(f"bundle {src}: int8 quantization needs an fp32 ONNX bundle "
                        f"(this one is {b.runtime}, {b.precision})")
    out_dir = Path(out_dir)
    tmp = _prepare_out_dir(out_dir)
    try:
        for name in runner.bundle_files(b.path):
            g = next((g for g in b.manifest["graphs"].values() if g["file"] == name), None)
            if g is not None:
                quantize_int8(b.path / name, tmp / name)
            else:
                shutil.copy2(b.path / name, tmp / name)
        manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "manifest_sha256")}
        manifest.update(precision="int8", parity=None,
                        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        manifest = write_manifest(tmp, manifest)
        if sub is not None:
            from hat_edge.exporters.verify import graph_parity

            manifest["parity"] = graph_parity(sub, Bundle(tmp, manifest))
            manifest = write_manifest(tmp, manifest)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ONNX TensorProto data types whose values a measurement bundle may leave to the device.
_GENERATED_TYPES = {1: "float32", 10: "float16", 3: "int8", 2: "uint8"}
_ALIGN = 4096  # external-data offsets page-aligned, so the runtime may map them


def make_weightless(bundle_dir: str | Path, min_bytes: int = 4096, seed: int = 0) -> Bundle:
    """Turn an ONNX bundle into a *measurement* bundle, in place: every float or int8 initializer
    of at least `min_bytes` moves to an external-data file (`<graph>.weights`) that is not shipped:
    the device writes random values of the same sizes there before loading (`runner.
    materialize_generated`). Latency does not depend on weight values, and the graphs alone are a
    few hundred kB instead of ~100 MB per demo model at a 32k vocabulary, so measuring over SSH is
    no longer dominated by uploads. Integer tensors (shapes, indices) stay inline, exact.

    Never for deployment: the weights are random; the manifest says so (`weights`)."""
    import onnx
    from onnx import TensorProto, external_data_helper

    b = load_bundle(bundle_dir)
    if b.runtime != "onnxruntime":
        raise UserError(f"bundle {bundle_dir}: only ONNX bundles can leave their weights to the device "
                        f"(this one is {b.runtime})")
    if b.manifest.get("generated"):
        return b
    generated: dict[str, dict] = {}
    for g in b.manifest["graphs"].values():
        path = b.path / g["file"]
        model = onnx.load(str(path))
        wname = f"{Path(g['file']).stem}.weights"
        off, tensors = 0, []
        for t in model.graph.initializer:
            dtype = _GENERATED_TYPES.get(t.data_type)
            if dtype is None or t.data_location == TensorProto.EXTERNAL:
                continue
            nbytes = onnx.numpy_helper.to_array(t).nbytes if not t.HasField("raw_data") else len(t.raw_data)
            if nbytes < min_bytes:
                continue
            off = -(-off // _ALIGN) * _ALIGN
            if not t.HasField("raw_data"):  # typed fields -> raw bytes first (set_external_data needs them)
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
            external_data_helper.set_external_data(t, location=wname, offset=off, length=nbytes)
            t.data_location = TensorProto.EXTERNAL
            for f in ("raw_data", "float_data", "int32_data"):
                t.ClearField(f)
            tensors.append([off, nbytes, dtype])
            off += nbytes
        if tensors:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(model.SerializeToString())
            os.replace(tmp, path)
            generated[wname] = {"bytes": off, "seed": seed, "tensors": tensors}
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "manifest_sha256")}
    manifest.update(generated=generated, parity=None,
                    weights="random, written on the device from `generated` (latency measurement only)")
    return Bundle(b.path, write_manifest(b.path, manifest))

