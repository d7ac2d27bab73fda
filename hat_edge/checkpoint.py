"""The hat-edge checkpoint: one file with everything needed to use or resume a SuperTransformer.

File layout (a `torch.save` dict, read back with `weights_only=True`: plain data and tensors only):

    format        "hat-edge-checkpoint"
    version       1
    model_config  ModelConfig.to_dict()
    space         SearchSpace.to_dict()
    arch          Arch.to_dict() when the run trained one fixed SubTransformer (`--arch`), else None
    state_dict    the SuperTransformer's weights (fp32, or fp16 in a shipped file: `weights_dtype`)
    tokenizer     the SentencePiece model bytes
    meta          dict: data spec (corpus, split sizes and seed), training settings, step, losses,
                  hat-edge version, created_at, weights_dtype
    train_state   None in a shipped file; for resume: optimizer, scheduler, step, epoch position,
                  RNG states, grad-scaler state
    sha256        hex sha256 of every other field (`content_sha256`: a canonical walk of the dict,
                  each tensor as dtype, shape and raw bytes); checked on every read

Integrity: `read_checkpoint` recomputes `sha256` and refuses a file whose contents differ (one flipped
bit in a weight is enough) with a one-line UserError. A file without the field is a legacy
checkpoint (written before hat-edge recorded checksums, like the bundled demo): it is accepted as
it is, with nothing to check against; the bundled demo silently (it is part of the installed
package, trusted like the code), any other legacy file with one warning per path and process.
The field is optional within version 1, so older readers ignore it and newer ones read old files.

Saves are atomic and durable: a unique temp file in the target's directory, fsync, `os.replace`,
fsync of the directory. A save that fails or is killed leaves the previous file as it was.

`load_checkpoint(path | "demo")` returns a ready model; `read_checkpoint(path)` returns the raw,
validated dict (the trainer resumes from it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hat_edge import __version__
from hat_edge.data.tokenizer import Tokenizer, tokenizer_from_bytes
from hat_edge.errors import UserError
from hat_edge.space import Arch, SearchSpace

CHECKPOINT_FORMAT = "hat-edge-checkpoint"
CHECKPOINT_VERSION = 1

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_CHECKPOINT = DEMO_DIR / "demo.pt"

CHECKSUM_FIELD = "sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)
_warned_legacy: set[str] = set()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, fp32, CPU unless asked), its tokenizer and space."""

    model: Any  # hat_edge.model.SuperTransformer (typed loosely: the model room imports torch-heavy code)
    tokenizer: Tokenizer
    space: SearchSpace
    meta: dict[str, Any] = field(default_factory=dict)
    arch: Arch | None = None  # the fixed SubTransformer of an `--arch` run
    path: str = ""

    def default_arch(self, which: str = "largest") -> Arch:
        """The trained fixed arch if there is one, else the space's `largest`/`smallest`."""
        if self.arch is not None:
            return self.arch
        return self.space.largest() if which == "largest" else self.space.smallest()


def resolve_path(path: str | Path) -> Path:
    """`demo` names the bundled demo checkpoint; anything else is a file path."""
    if str(path) == "demo":
        if not DEMO_CHECKPOINT.exists():
            raise UserError(f"the bundled demo checkpoint is missing from this install ({DEMO_CHECKPOINT})")
        return DEMO_CHECKPOINT
    return Path(path)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    space: SearchSpace,
    *,
    arch: Arch | None = None,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write a checkpoint atomically and durably, with the sha256 of its contents (module doc).

    half=True stores floating weights as fp16 (shipped files: half the size, and the loss of
    precision is far below what changes a translation); they load back as fp32.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    meta = dict(meta or {})
    meta.setdefault("hat_edge_version", __version__)
    meta["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta["weights_dtype"] = "float16" if half else "float32"
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model.cfg.to_dict(),
        "space": space.to_dict(),
        "arch": arch.to_dict() if arch is not None else None,
        "state_dict": state,
        "tokenizer": tokenizer.to_bytes(),
        "meta": meta,
        "train_state": train_state,
    }
    doc[CHECKSUM_FIELD] = content_sha256(doc)
    _atomic_torch_save(doc, path)
    return path


def _atomic_torch_save(doc: dict[str, Any], path: Path) -> None:
    """temp file (unique, same directory) -> write -> flush + fsync -> os.replace -> fsync(dir).

    On any failure (or KeyboardInterrupt) the temp file is removed and `path` is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; give the file the mode a plain open() would
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            torch.save(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    """Make the rename itself durable (POSIX; Windows cannot open a directory, and needs no fsync)."""
    if os.name != "posix":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def content_sha256(doc: dict[str, Any]) -> str:
    """The sha256 of a checkpoint dict's contents, every field but `sha256` itself.

    A canonical walk, not the bytes of the file: the zip container torch writes is not
    byte-reproducible, and the digest must be known before the file is written. Dict keys are
    sorted; lists and tuples hash alike (a load may turn one into the other); each tensor is its
    dtype, shape and raw bytes; every item is tagged and length-prefixed, so no two different
    contents share an encoding.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in doc.items() if k != CHECKSUM_FIELD})
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    elif isinstance(x, dict):
        h.update(f"D{len(x)}:".encode())
        for k in sorted(x, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)}:".encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, (bytes, bytearray)):
        h.update(f"B{len(x)}:".encode())
        h.update(bytes(x))
    elif isinstance(x, str):
        b = x.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)}:".encode())
        h.update(b)
    elif x is None or isinstance(x, bool):
        h.update(f"C{x}:".encode())
    elif isinstance(x, int):
        h.update(f"I{x}:".encode())
    elif isinstance(x, float):
        h.update(f"F{x.hex()}:".encode())
    else:  # whatever else a weights_only load can return (torch.dtype, torch.device, ...)
        r = f"{type(x).__name__}:{x!r}".encode()
        h.update(f"R{len(r)}:".encode())
        h.update(r)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, with format and version checked. Missing/corrupt -> UserError."""
    p = resolve_path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory; pass the checkpoint file (e.g. {p / 'checkpoint_best.pt'})")
    try:
        doc = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{p}: not a readable hat-edge checkpoint (corrupt or truncated: {e.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise UserError(f"{p}: field 'format' is {got!r}, expected '{CHECKPOINT_FORMAT}'")
    if doc.get("version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{p}: field 'version' is {doc.get('version')!r}; this hat-edge reads checkpoint version {CHECKPOINT_VERSION}"
        )
    for key in ("model_config", "space", "state_dict", "tokenizer"):
        if key not in doc:
            raise UserError(f"{p}: missing field '{key}'")
    _check_sha256(doc, p)
    return doc


def _check_sha256(doc: dict[str, Any], p: Path) -> None:
    want = doc.get(CHECKSUM_FIELD)
    if want is None:  # legacy: written before checksums (module doc); nothing to check against
        if p.resolve() != DEMO_CHECKPOINT and str(p) not in _warned_legacy:
            _warned_legacy.add(str(p))
            log.warning("%s: legacy checkpoint without a sha256; loaded without an integrity check", p)
        return
    if not isinstance(want, str) or not _HEX64.fullmatch(want):
        raise UserError(f"{p}: field '{CHECKSUM_FIELD}' is {str(want)[:80]!r}, expected 64 lowercase hex digits")
    got = content_sha256(doc)
    if got != want:
        raise UserError(
            f"{p}: integrity check failed: the contents hash to sha256 {got[:16]}..., the file records "
            f"{want[:16]}... (the file was corrupted or changed after it was saved)"
        )


def build_model(doc: dict[str, Any], source: str = "") -> tuple[Any, SearchSpace]:
    """A fp32 SuperTransformer with the checkpoint's weights, and its space."""
    from hat_edge.model import ModelConfig, SuperTransformer

    space = SearchSpace.from_dict(doc["space"], source or None)
    cfg = ModelConfig.from_dict(doc["model_config"])
    model = SuperTransformer(cfg, space)
    state = {k: v.float() if v.is_floating_point() else v for k, v in doc["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(
            f"{source}: weights do not fit this hat-edge's SuperTransformer ({first[0] if first else e})"
        ) from None
    return model, space


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A checkpoint file (or `demo`) as a ready model in eval mode, with tokenizer, space and meta."""
    p = resolve_path(path)
    doc = read_checkpoint(p)
    model, space = build_model(doc, str(p))
    model.to(device).eval()
    tok = tokenizer_from_bytes(doc["tokenizer"], f"{p} (tokenizer)")
    arch = Arch.from_dict(doc["arch"], str(p)) if doc.get("arch") else None
    return Checkpoint(model=model, tokenizer=tok, space=space, meta=dict(doc.get("meta") or {}), arch=arch, path=str(p))


def ship_checkpoint(src: str | Path, dst: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
    """A small, inference-only copy: fp16 weights, no training state (what the package ships)."""
    doc = read_checkpoint(src)
    model, space = build_model(doc, str(src))
    tok = tokenizer_from_bytes(doc["tokenizer"])
    arch = Arch.from_dict(doc["arch"]) if doc.get("arch") else None
    meta = dict(doc.get("meta") or {})
    meta.update(extra_meta or {})
    return save_checkpoint(dst, model, tok, space, arch=arch, meta=meta, train_state=None, half=True)


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEMO_CHECKPOINT",
    "Checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "ship_checkpoint",
    "build_model",
    "content_sha256",
]
