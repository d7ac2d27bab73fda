"""The bundle format: DIR/manifest.json + the files it lists, each with its sha256.

This module is the one reader of a bundle's manifest (`read_manifest`); the host's `load_bundle`
and the device's runner both call it, so both refuse the same things with the same one line.
Every field a reader uses is checked here: the format and version, the closed sets (runtime,
precision), file names (plain names in the bundle dir, listed once), the graphs, and the layout of
generated weight files.

    DIR/
      manifest.json          format "hat-edge-bundle", version BUNDLE_VERSION
      encoder.onnx           | encoder.pt          (+ external-data weight files for ONNX)
      decoder_step.onnx      | decoder_step.pt
      tokenizer.model        when the export was given a tokenizer
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .errors import RunnerError
from .formats import BUNDLE_FORMAT, BUNDLE_VERSION, GRAPHS, MANIFEST, PRECISIONS, RUNTIMES

_REQUIRED_MANIFEST = ("format", "version", "runtime", "arch", "model", "graphs", "files", "manifest_sha256")
# Generated (random) weights of a measurement bundle: at most this much per file. The largest
# space's largest model at a 64k vocabulary is ~1 GiB of fp32 weights.
MAX_GENERATED_BYTES = 4 << 30


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def plain_name(name: Any) -> bool:
    """A file name that can only mean a file directly inside its directory: a non-empty string
    with no path separator, no NUL, not '.', '..' or hidden (leading '.')."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith("."))


def _own_temp(name: str, generated: Dict[str, dict]) -> bool:
    """A generated file's temp name (`.NAME.PID.tmp`) left by a writer that was killed: the only
    hidden file a bundle dir may hold; it is written again, never read."""
    parts = name.split(".")
    return (len(parts) >= 4 and parts[0] == "" and parts[-1] == "tmp" and parts[-2].isdigit()
            and ".".join(parts[1:-2]) in generated)


def bundle_files(bundle_dir: Path) -> List[str]:
    """Every visible file of a bundle dir except manifest.json, sorted. Hidden files (an atomic
    write's temp file) are not the bundle's."""
    return sorted(p.name for p in Path(bundle_dir).iterdir()
                  if p.name != MANIFEST and not p.name.startswith(".") and not p.is_dir())


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(bundle_dir: "str | Path", verify_hashes: bool = True) -> dict:
    """Read and check `bundle_dir/manifest.json`; raise RunnerError (one line) when anything is off.

    Checks: format and version; required fields; runtime and precision in their closed sets;
    every listed file a plain name, present, a regular file (not a link) with its sha256; the
    graphs name listed files; no unlisted file, link or subdirectory in the bundle dir (a file
    dropped into a bundle is as suspicious as an edited one; a hidden file too, but for a
    generated file's temp name); generated files well formed.
    """
    d = Path(bundle_dir)
    where = f"bundle {d}"
    if d.is_symlink() or not d.is_dir():
        raise RunnerError(f"{where}: not a directory")
    mpath = d / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise RunnerError(f"{where}: missing {MANIFEST} (not a hat-edge bundle, or incomplete)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5,000-digit number, deep nesting
        raise RunnerError(f"{where}: {MANIFEST} is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise RunnerError(f"{where}: {MANIFEST} must hold a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise RunnerError(f"{where}: field 'format' is {manifest.get('format')!r}, expected '{BUNDLE_FORMAT}'")
    if manifest.get("version") != BUNDLE_VERSION:
        raise RunnerError(
            f"{where}: field 'version' is {manifest.get('version')!r}, this runner reads version {BUNDLE_VERSION}"
        )
    for key in _REQUIRED_MANIFEST:
        if key not in manifest:
            raise RunnerError(f"{where}: {MANIFEST} lacks field '{key}'")
    if verify_hashes and manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise RunnerError(f"{where}: {MANIFEST} was modified after export (manifest_sha256 does not match)")
    if manifest["runtime"] not in RUNTIMES:
        raise RunnerError(f"{where}: field 'runtime' is {manifest['runtime']!r}, allowed: {', '.join(RUNTIMES)}")
    if manifest.get("precision", "fp32") not in PRECISIONS:
        raise RunnerError(f"{where}: field 'precision' is {manifest.get('precision')!r}, "
                          f"allowed: {', '.join(PRECISIONS)}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise RunnerError(f"{where}: field 'files' must map file names to their sha256")
    for name, entry in files.items():
        if not plain_name(name) or name == MANIFEST:
            raise RunnerError(f"{where}: field 'files' names {name!r}, not a plain file name in the bundle")
        p = d / name
        if p.is_symlink():
            raise RunnerError(f"{where}: file '{name}' is a symbolic link (bundles hold regular files only)")
        if not p.is_file():
            raise RunnerError(f"{where}: missing file '{name}' (incomplete bundle)")
        if verify_hashes:
            want = entry.get("sha256") if isinstance(entry, dict) else None
            if not isinstance(want, str):
                raise RunnerError(f"{where}: file '{name}' has no sha256 in {MANIFEST}")
            if sha256_file(p) != want:
                raise RunnerError(f"{where}: sha256 of '{name}' does not match {MANIFEST} (modified or corrupt)")
    generated = check_generated(manifest.get("generated"), where, files)
    for p in sorted(d.iterdir()):
        if p.name == MANIFEST or (_own_temp(p.name, generated) and not p.is_symlink() and p.is_file()):
            continue
        if p.is_symlink() or p.is_dir():
            raise RunnerError(f"{where}: '{p.name}' is a {'link' if p.is_symlink() else 'directory'}; "
                              "bundles hold regular files only")
        if p.name not in files and p.name not in generated:
            raise RunnerError(f"{where}: file '{p.name}' is not listed in {MANIFEST}")
    graphs = manifest["graphs"]
    for g in GRAPHS:
        gf = graphs.get(g, {}).get("file") if isinstance(graphs, dict) and isinstance(graphs.get(g), dict) else None
        if gf not in files:
            raise RunnerError(f"{where}: graph '{g}' names no file listed in {MANIFEST}")
    tok = manifest.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and tok.get("file") in files):
        raise RunnerError(f"{where}: field 'tokenizer' names no file listed in {MANIFEST}")
    return manifest


# Measurement bundles may leave their weights to the device: latency does not depend on weight
# values, so `hat-edge measure` ships the graphs (a few hundred kB, hashed like any bundle file)
# and the device writes random weights of the right sizes into the external-data files the graphs
# name, instead of receiving ~100 MB of random numbers per model over the link. The manifest's
# `generated` field ({file: {"bytes", "seed", "tensors": [[offset, nbytes, dtype], ...]}}) is
# covered by manifest_sha256; the generated files themselves are random by design and unhashed.
GENERATED_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_generated(gen: Any, where: str, files: Any = ()) -> Dict[str, dict]:
    """The `generated` field, checked: plain file names not among the hashed `files`, a declared
    size within MAX_GENERATED_BYTES, tensors inside it."""
    if gen is None:
        return {}
    if not isinstance(gen, dict):
        raise RunnerError(f"{where}: field 'generated' must map file names to their layout")
    for name, spec in gen.items():
        if not plain_name(name) or name == MANIFEST:
            raise RunnerError(f"{where}: generated file name {name!r} is not a plain file name")
        if name in files:
            raise RunnerError(f"{where}: generated file '{name}' is also a hashed file of the bundle")
        ok = (isinstance(spec, dict) and _is_int(spec.get("bytes")) and 0 <= spec["bytes"] <= MAX_GENERATED_BYTES
              and isinstance(spec.get("tensors"), list) and _is_int(spec.get("seed", 0)))
        if ok:
            for t in spec["tensors"]:
                ok = ok and isinstance(t, list) and len(t) == 3 and _is_int(t[0]) and _is_int(t[1]) \
                    and t[2] in GENERATED_DTYPES and 0 <= t[0] and 0 <= t[1] and t[0] + t[1] <= spec["bytes"]
        if not ok:
            raise RunnerError(f"{where}: generated file '{name}' has a malformed layout in {MANIFEST} "
                              f"(bytes at most {MAX_GENERATED_BYTES}, tensors inside it)")
    return gen


_GEN_BLOCK = 1 << 16  # distinct random values; longer tensors repeat them (latency cannot tell)


def _random_block(rng: "np.random.Generator", count: int, dtype: str) -> bytes:
    """min(count, 64k) random values of `dtype`. Drawing every value of a demo model at a 32k
    vocabulary cost ~0.15 s, most of the device-side price of shipping a model without its
    weights; repeating a block costs only the writes."""
    n = min(count, _GEN_BLOCK)
    if dtype in ("float32", "float16"):
        v = rng.random(n, dtype=np.float32)
        v *= 0.1
        v -= 0.05  # small uniform weights: no overflow, no denormals
        return v.astype(GENERATED_DTYPES[dtype], copy=False).tobytes()
    lo, hi = (-127, 128) if dtype == "int8" else (0, 256)
    return rng.integers(lo, hi, size=n, dtype=GENERATED_DTYPES[dtype]).tobytes()


def materialize_generated(bundle_dir: "str | Path", manifest: dict) -> int:
    """Write the random weight files of a measurement bundle that are missing or of the wrong
    size (atomically: temp file, then rename). Returns the bytes written (0: all were there)."""
    d = Path(bundle_dir)
    written = 0
    for name, spec in check_generated(manifest.get("generated"), f"bundle {d}", manifest.get("files", {})).items():
        path = d / name
        if path.is_symlink():
            raise RunnerError(f"bundle {d}: generated file '{name}' is a symbolic link")
        if path.is_file() and path.stat().st_size == spec["bytes"]:
            continue
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        tmp = d / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.unlink(missing_ok=True)  # a leftover of a killed writer with this pid
            # O_EXCL | O_NOFOLLOW: never write through a link planted at the temp name
            fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                f.truncate(spec["bytes"])
                for off, nbytes, dtype in spec["tensors"]:
                    size = np.dtype(GENERATED_DTYPES[dtype]).itemsize
                    block = _random_block(rng, nbytes // size, dtype)
                    f.seek(off)
                    left = nbytes
                    while left > 0:
                        piece = block if left >= len(block) else block[:left]
                        f.write(piece)
                        left -= len(piece)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RunnerError(f"bundle {d}: cannot write generated weights '{name}': {e.strerror or e}") from None
        written += spec["bytes"]
    return written
