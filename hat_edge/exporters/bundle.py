"""The host side of the bundle format: a checked `Bundle`, writing manifests, publishing dirs.

The format itself (fields, versions, closed sets, the reader that checks a manifest) belongs to
`hat_edge.runtime.bundle`; the device and the host reject the same things, each with one line.
`hat_edge.exporters.export` makes bundles (`export_bundle`, `quantize_bundle`); this module only
reads, seals and publishes them.

    DIR/
      manifest.json          format "hat-edge-bundle", version 1
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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx
from onnx import TensorProto, external_data_helper

from hat_edge.errors import UserError
from hat_edge.runtime.backends import Model, open_model
from hat_edge.runtime.bundle import bundle_files, manifest_digest, read_manifest, sha256_file
from hat_edge.runtime.errors import RunnerError
from hat_edge.runtime.formats import FORMATS, MANIFEST, QUANTIZE, RUNTIME_OF_FORMAT
from hat_edge.space import Arch

__all__ = ["Bundle", "load_bundle", "write_manifest", "update_parity", "check_out_dir", "make_weightless",
           "FORMATS", "QUANTIZE", "RUNTIME_OF_FORMAT"]




# The manifest's `exporter` values (`export_bundle`): ONNX by the dynamo or TorchScript-based exporter,
# or TorchScript.
EXPORTER_NAMES = ("torch.onnx.export(dynamo=True)", "torch.onnx.export(dynamo=False)", "torch.jit.trace+freeze")


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
    def exporter(self) -> str:
        """The manifest's `exporter` when it is one that `export_bundle` writes, else "unknown" (a
        bundle's text is not trusted: it is printed and written into reports)."""
        e = self.manifest.get("exporter")
        return e if e in EXPORTER_NAMES else "unknown"

    @property
    def tokenizer_file(self) -> Optional[Path]:
        tok = self.manifest.get("tokenizer")
        return self.path / tok["file"] if tok else None

    def open(self, threads: Optional[int] = None, device: str = "cpu", ort_opt_level: str = "all") -> Model:
        """The bundle's graphs in their runtime, ready for `runtime.backends.translate` / `runtime.timing.measure`."""
        try:
            return open_model(self.path, threads=threads, device=device, ort_opt_level=ort_opt_level,
                                     manifest=self.manifest)
        except RunnerError as e:
            raise UserError(str(e)) from None


def load_bundle(path: str | Path) -> Bundle:
    """Read DIR/manifest.json and check format, version, every file's sha256 and no extra files.

    A tampered, incomplete or foreign bundle raises UserError with one line naming the problem.
    """
    p = Path(path)
    try:
        manifest = read_manifest(p)
    except RunnerError as e:
        raise UserError(str(e)) from None
    return Bundle(p, manifest)


def _manifest_digest(manifest: dict) -> str:
    return manifest_digest(manifest)


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Hash every file, seal the manifest with its own digest, write it; returns the manifest."""
    files = {}
    for rel in bundle_files(bundle_dir):
        f = bundle_dir / rel
        files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["files"] = files
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, bundle_dir / MANIFEST)
    return manifest


def update_parity(bundle: Bundle, parity: dict) -> Bundle:
    """Record verification figures in an existing bundle's manifest (files are unchanged)."""
    m = dict(bundle.manifest)
    m["parity"] = {**(m.get("parity") or {}), **parity}
    m = write_manifest(bundle.path, m)
    return Bundle(bundle.path, m)


def check_out_dir(out_dir: str | Path) -> Path:
    """Fail early (before any slow export) when out_dir cannot become a bundle directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise UserError(f"--out-dir {out_dir}: directory is not empty and holds no bundle; "
                        "choose a new or empty directory (an existing bundle is replaced)")
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out-dir {out_dir}: cannot write there ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK) and not out_dir.is_dir():
                raise UserError(f"--out-dir {out_dir}: cannot write there ({parent} is not writable)")
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
        raise UserError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e.__class__.__name__})") from None


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp; a crash leaves either the old bundle or the new one, never a mix."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ONNX TensorProto data types whose values a measurement bundle may leave to the device.
_GENERATED_TYPES = {1: "float32", 10: "float16", 3: "int8", 2: "uint8"}
_ALIGN = 4096  # external-data offsets page-aligned, so the runtime may map them


def make_weightless(bundle_dir: str | Path, min_bytes: int = 4096, seed: int = 0) -> Bundle:
    """Turn an ONNX bundle into a *measurement* bundle, in place: every float or int8 initializer
    of at least `min_bytes` moves to an external-data file (`<graph>.weights`) that is not shipped:
    the device writes random values of the same sizes there before loading (`hat_edge.
    runtime.bundle.materialize_generated`). Latency does not depend on weight values, and the graphs alone are a
    few hundred kB instead of ~100 MB per demo model at a 32k vocabulary, so measuring over SSH is
    no longer dominated by uploads. Integer tensors (shapes, indices) stay inline, exact.
    (`export_bundle(weightless_seed=...)` does the same while it exports, without writing the
    weights first.)

    Never for deployment: the weights are random; the manifest says so (`weights`)."""
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
        entry = leave_weights_to_device(model, path.name, seed, min_bytes)
        if entry:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(model.SerializeToString())
            os.replace(tmp, path)
            generated.update(entry)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "manifest_sha256")}
    manifest.update(weightless_fields(generated))
    return Bundle(b.path, write_manifest(b.path, manifest))


def leave_weights_to_device(model: onnx.ModelProto, graph_file: str, seed: int = 0,
                            min_bytes: int = 4096) -> dict[str, dict]:
    """`make_weightless` on one graph in memory: its float and int8 initializers of at least
    `min_bytes` become references into `<graph stem>.weights`, which nobody writes here. Returns
    the manifest's `generated` entry for that file ({} when nothing moved)."""
    wname = f"{Path(graph_file).stem}.weights"
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
    return {wname: {"bytes": off, "seed": seed, "tensors": tensors}} if tensors else {}


def weightless_fields(generated: dict[str, dict]) -> dict:
    """The manifest fields of a measurement bundle whose weights are `generated` on the device."""
    return {"generated": generated, "parity": None,
            "weights": "random, written on the device from `generated` (latency measurement only)"}

