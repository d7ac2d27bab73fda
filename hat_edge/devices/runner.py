"""The on-device runner. ONE self-contained file: standard library + numpy + the chosen runtime.

hat_edge is not installed on a device; this file is copied there and run as a script. Everything it
needs (bundle loading, the decoding loop, timing statistics) lives here, and the host imports the
same functions, so host and device decode with the very same code.

    python runner.py env                            one JSON object describing this machine
    python runner.py run JOB.json --out RES.jsonl   measure every bundle of a job, one line each
    python runner.py translate BUNDLE --src "5 9 3" decode token ids with a bundle (parity checks)
    python runner.py check BUNDLE                   verify a bundle's manifest and hashes

Sections:
  1. decoding: greedy and beam search over a `step` function (numpy only)
  2. bundles: manifest.json, sha256 of every file (stdlib only)
  3. runtimes: an exported model as `encode` + a step function (onnxruntime or TorchScript)
  4. measurement: warm-up until stable, repeats until min_repeats and min_time_s, statistics
  5. environment: OS, CPU, memory, versions, governor, Raspberry Pi temperature and throttling
  6. command line

Runtime modules (onnxruntime, torch) are imported lazily, after the job's environment variables
are set, so a job can set OMP_NUM_THREADS and friends before the runtime reads them, and a board
needs only the runtime it uses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

RUNNER_VERSION = 1
BUNDLE_FORMAT = "hat-edge-bundle"
BUNDLE_VERSION = 1
JOB_FORMAT = "hat-edge-job"
JOB_VERSION = 1
RESULT_VERSION = 1
MANIFEST = "manifest.json"

# A step function: given the last token of every row (N,) and, from the second step on, which
# previous row each row continues (N,) so the callee can reorder its key/value cache, it returns
# log-probabilities (N, V) for the next token.
StepFn = Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]


class RunnerError(Exception):
    """A problem with a job, a bundle or the runtime; the message is one line, ready to print.

    The host turns it into hat_edge's UserError (this file may not import hat_edge).
    """


# ------------------------------------------------------------------------------------------------
# 1. decoding
# ------------------------------------------------------------------------------------------------
def greedy_search(
    step: StepFn,
    batch: int,
    bos: int,
    eos: int,
    max_len: int,
    fixed_steps: bool = False,
) -> list[list[int]]:
    """Greedy decoding of `batch` sentences; returns token ids without BOS, up to and without EOS.

    fixed_steps: run exactly `max_len` steps and never stop at EOS (latency measurement, where
    random weights would otherwise end at an arbitrary step).
    """
    tokens = np.full((batch,), bos, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    order: Optional[np.ndarray] = None
    for t in range(max_len):
        lprobs = step(tokens, order)
        if fixed_steps:
            lprobs = lprobs.copy()
            lprobs[:, eos] = -np.inf
        nxt = lprobs.argmax(axis=-1).astype(np.int64)
        if t == max_len - 1 and not fixed_steps:
            nxt = np.where(done, nxt, eos)
        for i in range(batch):
            if not done[i]:
                if nxt[i] == eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if done.all():
            break
        tokens = nxt
        order = np.arange(batch, dtype=np.int64)
    return out


def _topk_stable(cand: np.ndarray, k: int) -> np.ndarray:
    """Per row, the flat indices of the k largest values, ordered by (-value, index).

    Same result as `np.argsort(-cand, kind="stable")[:, :k]`, but O(M) instead of O(M log M): a
    full sort of beam 5 x 32k candidates took ~90 ms per step on a busy core, more than a decoder
    step, and used to inflate every beam-search latency. Ties at the k-th value keep the lowest
    indices, as the full sort would.
    """
    rows, m = cand.shape
    if k >= m:
        return np.argsort(-cand, axis=1, kind="stable")[:, :k]
    out = np.empty((rows, k), dtype=np.int64)
    part = np.argpartition(cand, m - k, axis=1)[:, m - k :]  # the k largest, in no order
    for r in range(rows):
        kth = cand[r, part[r]].min()
        idx = np.flatnonzero(cand[r] >= kth)  # ascending, includes every tie at the k-th value
        if idx.size < k:  # only when NaNs are present: fall back to the full sort
            out[r] = np.argsort(-cand[r], kind="stable")[:k]
            continue
        out[r] = idx[np.argsort(-cand[r, idx], kind="stable")[:k]]
    return out


def _beam_candidates(row_scores: np.ndarray, lprobs: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The k best (hypothesis, token) extensions of one sentence, as flat indices (row * V + token)
    and float64 scores, ordered by (-score, flat index).

    Exactly what a stable sort of all beam * V sums would give, at a fraction of the cost: the
    score of row j's extensions is row_scores[j] + lprobs[j] with a per-row constant, so the best k
    overall lie among each live row's own best k, found with an O(V) partition. Dead rows (score
    -inf) contribute nothing; at the first step only one row per sentence is live.
    row_scores (beam,) float64; lprobs (beam, V).
    """
    vocab = lprobs.shape[1]
    live = np.flatnonzero(np.isfinite(row_scores))
    if live.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    rows = lprobs if live.size == lprobs.shape[0] else lprobs[live]  # (L, V); no copy when all live
    top = _topk_stable(rows, min(k, vocab))  # (L, k') per row, ties to the lower token id
    picked = np.take_along_axis(rows, top, axis=1).astype(np.float64)
    sc = (row_scores[live][:, None] + picked).ravel()
    flat = (live[:, None] * vocab + top).ravel()
    best = np.lexsort((flat, -sc))[:k]  # by score, then by flat index
    return flat[best], sc[best]


def beam_search(
    step: StepFn,
    batch: int,
    beam: int,
    bos: int,
    eos: int,
    max_len: int,
    len_penalty: float = 1.0,
    fixed_steps: bool = False,
) -> list[list[int]]:
    """Beam search; rows are laid out sentence-major (row = sentence * beam + k).

    The step function sees N = batch * beam rows from the first step. A hypothesis that emits EOS
    is finished with score sum(logp) / len**len_penalty (len counts EOS); a sentence is done when it
    has `beam` finished hypotheses (fairseq's rule), or at max_len (EOS forced). Ties are broken by
    the lower flat index, so any two backends with equal log-probs pick equal tokens.
    """
    n = batch * beam
    tokens = np.full((n,), bos, dtype=np.int64)
    # Only the first beam row of each sentence is live at step 0 (all rows are identical).
    scores = np.full((batch, beam), -np.inf, dtype=np.float64)
    scores[:, 0] = 0.0
    hyps: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    order: Optional[np.ndarray] = None
    for t in range(max_len):
        lprobs = np.asarray(step(tokens, order))  # (n, V), float32 from every backend
        vocab = lprobs.shape[-1]
        if fixed_steps:
            lprobs = lprobs.copy()
            lprobs[:, eos] = -np.inf
        elif t == max_len - 1:  # force EOS on the last step
            forced = np.full_like(lprobs, -np.inf)
            forced[:, eos] = lprobs[:, eos]
            lprobs = forced
        k = min(2 * beam, beam * vocab)
        new_tokens = np.full((n,), eos if not fixed_steps else bos, dtype=np.int64)
        new_order = np.zeros((n,), dtype=np.int64)
        new_scores = np.full((batch, beam), -np.inf, dtype=np.float64)
        new_hyps: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
        for b in range(batch):
            if done[b]:
                new_order[b * beam : (b + 1) * beam] = b * beam
                continue
            filled = 0
            flats, cands = _beam_candidates(scores[b], lprobs[b * beam : (b + 1) * beam], k)
            for flat, sc in zip(flats, cands):
                if not np.isfinite(sc):
                    break
                src, tok = divmod(int(flat), vocab)
                if tok == eos and not fixed_steps:
                    length = len(hyps[b][src]) + 1
                    if len(finished[b]) < beam:
                        finished[b].append((sc / (length**len_penalty), hyps[b][src]))
                    continue
                new_tokens[b * beam + filled] = tok
                new_order[b * beam + filled] = b * beam + src
                new_scores[b, filled] = sc
                new_hyps[b][filled] = hyps[b][src] + [tok]
                filled += 1
                if filled == beam:
                    break
            for j in range(filled, beam):  # dead rows: keep shape, never selected again
                new_order[b * beam + j] = b * beam
            # fairseq's rule: a sentence is done once it has `beam` finished hypotheses. (An earlier
            # version also had an "early stop" branch that could never fire; removed.)
            if len(finished[b]) >= beam or filled == 0:
                done[b] = True
        scores, hyps, tokens, order = new_scores, new_hyps, new_tokens, new_order
        if done.all():
            break
    out: list[list[int]] = []
    for b in range(batch):
        if finished[b]:
            out.append(max(finished[b], key=lambda x: x[0])[1])
        else:  # fixed_steps: the best live hypothesis
            out.append(hyps[b][int(np.argmax(scores[b]))])
    return out


def decode(
    step: StepFn,
    batch: int,
    beam: int,
    bos: int,
    eos: int,
    max_len: int,
    len_penalty: float = 1.0,
    fixed_steps: bool = False,
) -> list[list[int]]:
    """Greedy when beam == 1, beam search otherwise (the step function then sees batch*beam rows)."""
    if beam <= 1:
        return greedy_search(step, batch, bos, eos, max_len, fixed_steps=fixed_steps)
    return beam_search(step, batch, beam, bos, eos, max_len, len_penalty, fixed_steps=fixed_steps)


# ------------------------------------------------------------------------------------------------
# 2. bundles
# ------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def bundle_files(bundle_dir: Path) -> list[str]:
    """Every file of a bundle dir except manifest.json and hidden files, as sorted posix paths."""
    out = []
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir)
        if p.is_dir() or rel.as_posix() == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(rel.as_posix())
    return out


_REQUIRED_MANIFEST = ("format", "version", "runtime", "arch", "model", "graphs", "files", "manifest_sha256")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own `manifest_sha256` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> dict:
    """Read and check `bundle_dir/manifest.json`; raise RunnerError (one line) when anything is off.

    Checks: format and version; required fields; every listed file present with its sha256; no
    unlisted file (a file dropped into a bundle is as suspicious as an edited one).
    """
    d = Path(bundle_dir)
    where = f"bundle {d}"
    if not d.is_dir():
        raise RunnerError(f"{where}: not a directory")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise RunnerError(f"{where}: missing {MANIFEST} (not a hat-edge bundle, or incomplete)")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise RunnerError(f"{where}: field 'files' must map file names to their sha256")
    for name, entry in files.items():
        p = d / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise RunnerError(f"{where}: file name {name!r} leaves the bundle")
        if not p.is_file():
            raise RunnerError(f"{where}: missing file '{name}' (incomplete bundle)")
        if verify_hashes:
            want = entry.get("sha256") if isinstance(entry, dict) else None
            if not isinstance(want, str):
                raise RunnerError(f"{where}: file '{name}' has no sha256 in {MANIFEST}")
            if sha256_file(p) != want:
                raise RunnerError(f"{where}: sha256 of '{name}' does not match {MANIFEST} (modified or corrupt)")
    generated = _check_generated(manifest.get("generated"), where)
    extra = [f for f in bundle_files(d) if f not in files and f not in generated]
    if extra:
        raise RunnerError(f"{where}: file '{extra[0]}' is not listed in {MANIFEST}")
    for g in ("encoder", "decoder_step"):
        gf = manifest["graphs"].get(g, {}).get("file") if isinstance(manifest["graphs"], dict) else None
        if gf not in files:
            raise RunnerError(f"{where}: graph '{g}' names no file listed in {MANIFEST}")
    return manifest


# Measurement bundles may leave their weights to the device: latency does not depend on weight
# values, so `hat-edge measure` ships the graphs (a few hundred kB, hashed like any bundle file)
# and the device writes random weights of the right sizes into the external-data files the graphs
# name, instead of receiving ~100 MB of random numbers per model over the link. The manifest's
# `generated` field ({file: {"bytes", "seed", "tensors": [[offset, nbytes, dtype], ...]}}) is
# covered by manifest_sha256; the generated files themselves are random by design and unhashed.
GENERATED_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8}


def _check_generated(gen: Any, where: str) -> dict:
    if gen is None:
        return {}
    if not isinstance(gen, dict):
        raise RunnerError(f"{where}: field 'generated' must map file names to their layout")
    for name, spec in gen.items():
        if not isinstance(name, str) or ".." in Path(name).parts or Path(name).is_absolute() or "/" in name:
            raise RunnerError(f"{where}: generated file name {name!r} is not a plain file name")
        ok = isinstance(spec, dict) and isinstance(spec.get("bytes"), int) and isinstance(spec.get("tensors"), list)
        if ok:
            for t in spec["tensors"]:
                ok = ok and isinstance(t, list) and len(t) == 3 and isinstance(t[0], int) and isinstance(t[1], int) \
                    and t[2] in GENERATED_DTYPES and 0 <= t[0] and t[0] + t[1] <= spec["bytes"]
        if not ok:
            raise RunnerError(f"{where}: generated file '{name}' has a malformed layout in {MANIFEST}")
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


def materialize_generated(bundle_dir: str | Path, manifest: dict) -> int:
    """Write the random weight files of a measurement bundle that are missing or of the wrong
    size (atomically: temp file, then rename). Returns the bytes written (0: all were there)."""
    d = Path(bundle_dir)
    written = 0
    for name, spec in _check_generated(manifest.get("generated"), f"bundle {d}").items():
        path = d / name
        if path.is_file() and path.stat().st_size == spec["bytes"]:
            continue
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        tmp = d / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
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


# ------------------------------------------------------------------------------------------------
# 3. runtimes
# ------------------------------------------------------------------------------------------------
RUNTIMES = ("onnxruntime", "torchscript")
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")


class Model:
    """An exported SubTransformer: `encode` once per source, then a step function per decode.

    encode(src (B,S) int64) -> list of encoder outputs [src_bias, cross_k_0, cross_v_0, ...] in the
    runtime's own array type; stepper(enc, rows_per_sentence) -> StepFn over B*rows rows, holding
    the self-attention key/value cache (per layer (N, H_l, t, hd_l)) between calls.
    """

    runtime: str = ""

    def __init__(self, manifest: dict):
        m = manifest["model"]
        self.manifest = manifest
        self.vocab_size = int(m["vocab_size"])
        self.pad_id = int(m.get("pad_id", 0))
        self.bos_id = int(m.get("bos_id", 2))
        self.eos_id = int(m.get("eos_id", 3))
        # per decoder layer (heads, head_dim) of the self-attention cache
        self.cache_spec: list[tuple[int, int]] = [(int(h), int(hd)) for h, hd in m["self_cache"]]

    def encode(self, src: np.ndarray) -> list:
        raise NotImplementedError

    def stepper(self, enc: list, rows: int) -> StepFn:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (CUDA); a no-op on CPU."""


class OrtModel(Model):
    runtime = "onnxruntime"

    def __init__(self, bundle_dir: Path, manifest: dict, threads: Optional[int] = None,
                 device: str = "cpu", opt_level: str = "all"):
        super().__init__(manifest)
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed on this machine (pip install onnxruntime)") from None
        self.ort = ort
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1  # one graph at a time: parallelism within ops only
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RunnerError("device 'cuda' needs onnxruntime-gpu with CUDAExecutionProvider; "
                                  f"available: {', '.join(ort.get_available_providers())}")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        g = manifest["graphs"]
        try:
            self.enc = ort.InferenceSession(str(bundle_dir / g["encoder"]["file"]), so, providers=providers)
            self.dec = ort.InferenceSession(str(bundle_dir / g["decoder_step"]["file"]), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RunnerError(f"onnxruntime cannot load bundle {bundle_dir}: {str(e).splitlines()[0]}") from None
        self.enc_in = [i.name for i in self.enc.get_inputs()]
        self.dec_in = [i.name for i in self.dec.get_inputs()]

    def encode(self, src: np.ndarray) -> list:
        return self.enc.run(None, {self.enc_in[0]: np.ascontiguousarray(src, dtype=np.int64)})

    def stepper(self, enc: list, rows: int) -> StepFn:
        # Encoder outputs are per sentence; every beam row of a sentence reads the same ones.
        fixed = [np.repeat(x, rows, axis=0) if rows > 1 else x for x in enc]
        n = fixed[0].shape[0]
        cache = [np.zeros((n, h, 0, hd), dtype=np.float32) for h, hd in self.cache_spec for _ in (0, 1)]
        names = self.dec_in
        feed: Dict[str, np.ndarray] = {names[2 + i]: x for i, x in enumerate(fixed)}
        first_cache = 2 + len(fixed)
        position = np.zeros((1,), dtype=np.int64)
        identity = np.arange(n, dtype=np.int64)
        sess = self.dec

        def step(tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
            nonlocal cache
            if order is not None and not np.array_equal(order, identity):
                cache = [np.take(c, order, axis=0) for c in cache]
            feed[names[0]] = tokens.reshape(n, 1).astype(np.int64, copy=False)
            feed[names[1]] = position
            for i, c in enumerate(cache):
                feed[names[first_cache + i]] = c
            out = sess.run(None, feed)
            cache = out[1:]
            position[0] += 1
            return out[0]

        return step


class TorchScriptModel(Model):
    runtime = "torchscript"

    def __init__(self, bundle_dir: Path, manifest: dict, threads: Optional[int] = None, device: str = "cpu"):
        super().__init__(manifest)
        try:
            import torch
        except ImportError:
            raise RunnerError("torch is not installed on this machine (needed for TorchScript bundles)") from None
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        if device == "cuda" and not torch.cuda.is_available():
            raise RunnerError("device 'cuda' requested but torch.cuda.is_available() is False")
        self.device = torch.device(device)
        g = manifest["graphs"]
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* says "use torch.export"
                self.enc = torch.jit.load(str(bundle_dir / g["encoder"]["file"]), map_location=self.device).eval()
                self.dec = torch.jit.load(str(bundle_dir / g["decoder_step"]["file"]), map_location=self.device).eval()
        except Exception as e:  # torch raises RuntimeError with multi-line text
            raise RunnerError(f"torch cannot load bundle {bundle_dir}: {str(e).splitlines()[0]}") from None

    def encode(self, src: np.ndarray) -> list:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(src, dtype=np.int64)).to(self.device)
            return list(self.enc(x))

    def stepper(self, enc: list, rows: int) -> StepFn:
        torch = self.torch
        fixed = [x.repeat_interleave(rows, dim=0) if rows > 1 else x for x in enc]
        n = fixed[0].shape[0]
        dev = self.device
        cache = [torch.zeros((n, h, 0, hd), dtype=torch.float32, device=dev)
                 for h, hd in self.cache_spec for _ in (0, 1)]
        position = torch.zeros((1,), dtype=torch.long, device=dev)
        identity = np.arange(n, dtype=np.int64)
        dec = self.dec

        def step(tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
            nonlocal cache, position
            with torch.inference_mode():
                if order is not None and not np.array_equal(order, identity):
                    idx = torch.from_numpy(order).to(dev)
                    cache = [c.index_select(0, idx) for c in cache]
                tok = torch.from_numpy(tokens.reshape(n, 1).astype(np.int64)).to(dev)
                out = dec(tok, position, *fixed, *cache)
                cache = list(out[1:])
                position = position + 1
                return out[0].float().cpu().numpy()

        return step

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def open_model(bundle_dir: str | Path, threads: Optional[int] = None, device: str = "cpu",
               runtime: Optional[str] = None, ort_opt_level: str = "all",
               manifest: Optional[dict] = None) -> Model:
    """Load a checked bundle into its runtime. `runtime`, when given, must match the bundle's."""
    d = Path(bundle_dir)
    if manifest is None:
        manifest = read_manifest(d)
    have = manifest["runtime"]
    if runtime is not None and runtime != have:
        raise RunnerError(f"bundle {d} is for runtime '{have}', the job asks for '{runtime}'")
    if device not in ("cpu", "cuda"):
        raise RunnerError(f"device '{device}' is not supported; allowed: cpu, cuda")
    if have == "onnxruntime":
        if ort_opt_level not in ORT_OPT_LEVELS:
            raise RunnerError(f"ort_opt_level '{ort_opt_level}' not allowed: {', '.join(ORT_OPT_LEVELS)}")
        materialize_generated(d, manifest)
        return OrtModel(d, manifest, threads=threads, device=device, opt_level=ort_opt_level)
    if have == "torchscript":
        return TorchScriptModel(d, manifest, threads=threads, device=device)
    raise RunnerError(f"bundle {d}: field 'runtime' is {have!r}, allowed: {', '.join(RUNTIMES)}")


def pad_batch(sources: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """(B, S) int64, right-padded with pad_id (the model masks pad keys with its src_bias)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise RunnerError("every source needs at least one token")
    width = max(len(s) for s in sources)
    out = np.full((len(sources), width), pad_id, dtype=np.int64)
    for i, s in enumerate(sources):
        out[i, : len(s)] = np.asarray(s, dtype=np.int64)
    return out


def translate(model: Model, sources: Sequence[Sequence[int]] | np.ndarray, beam: int = 5,
              max_len: Optional[int] = None, len_penalty: float = 1.0,
              fixed_steps: bool = False) -> list[list[int]]:
    """Decode token-id sources (each ending with EOS) into target ids (no BOS, no EOS).

    max_len defaults to 2 * longest source + 10 steps, capped at the model's max_positions (as the
    host's hat_edge.model.decode).
    """
    src = sources if isinstance(sources, np.ndarray) else pad_batch(sources, model.pad_id)
    if max_len is None:
        max_len = min(2 * src.shape[1] + 10, int(model.manifest["model"].get("max_positions", 512)))
    enc = model.encode(src)
    step = model.stepper(enc, max(1, beam))
    return decode(step, src.shape[0], beam, model.bos_id, model.eos_id, max_len, len_penalty, fixed_steps)


# ------------------------------------------------------------------------------------------------
# 4. measurement
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How to measure; defaults follow HAT (batch 1, 30 source tokens, 30 steps, beam 5)."""

    runtime: Optional[str] = None  # None: the bundle's own runtime
    threads: Optional[int] = None  # intra-op threads; None: the runtime's default
    src_len: int = 30
    steps: int = 30
    beam: int = 5  # 1 = greedy
    warmup: int = 5  # at least this many warm-up runs, then until stable
    max_warmup: Optional[int] = None  # cap on warm-up runs; default max(3 * warmup, warmup + 10)
    min_repeats: int = 10
    min_time_s: float = 2.0
    max_repeats: int = 1000
    cooldown_s: float = 0.0  # sleep before each bundle (not before the first)
    device: str = "cpu"  # cpu | cuda
    env: Dict[str, str] = field(default_factory=dict)  # set before the runtime is imported
    cpu_affinity: Optional[List[int]] = None  # pin the process to these CPUs
    ort_opt_level: str = "all"
    seed: int = 0  # source tokens of the measurement
    # Time the job's bundles in rotation (one run of each in turn) instead of one after another:
    # a machine whose speed drifts then slows all of them alike, and their ratios are measured
    # side by side. Results arrive together at the end of the job.
    interleave: bool = False

    @classmethod
    def from_dict(cls, data: dict, where: str = "settings") -> Tuple["Settings", List[str]]:
        """Validated settings and the list of unknown keys (reported, not fatal)."""
        if not isinstance(data, dict):
            raise RunnerError(f"{where}: must be a JSON object")
        known = {f.name for f in cls.__dataclass_fields__.values()}
        unknown = sorted(k for k in data if k not in known)
        kw = {k: v for k, v in data.items() if k in known}
        ints = ("src_len", "steps", "beam", "warmup", "min_repeats", "max_repeats", "seed")
        for k in ints + ("threads", "max_warmup"):
            if k in kw and kw[k] is not None:
                v = kw[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k in ("warmup", "seed") else 1):
                    raise RunnerError(f"{where}: field '{k}' must be a positive integer, got {v!r}")
        for k in ("min_time_s", "cooldown_s"):
            if k in kw:
                v = kw[k]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise RunnerError(f"{where}: field '{k}' must be a number >= 0, got {v!r}")
                kw[k] = float(v)
        if kw.get("runtime") is not None and kw["runtime"] not in RUNTIMES:
            raise RunnerError(f"{where}: field 'runtime' is {kw['runtime']!r}, allowed: {', '.join(RUNTIMES)}")
        if kw.get("device", "cpu") not in ("cpu", "cuda"):
            raise RunnerError(f"{where}: field 'device' is {kw['device']!r}, allowed: cpu, cuda")
        if kw.get("ort_opt_level", "all") not in ORT_OPT_LEVELS:
            raise RunnerError(f"{where}: field 'ort_opt_level' is {kw['ort_opt_level']!r}, "
                              f"allowed: {', '.join(ORT_OPT_LEVELS)}")
        env = kw.get("env", {})
        if env is None:
            kw["env"] = {}
        elif not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
            raise RunnerError(f"{where}: field 'env' must map variable names to strings")
        else:
            kw["env"] = {k: str(v) for k, v in env.items()}
        if not isinstance(kw.get("interleave", False), bool):
            raise RunnerError(f"{where}: field 'interleave' must be true or false, got {kw['interleave']!r}")
        aff = kw.get("cpu_affinity")
        if aff is not None:
            if not isinstance(aff, list) or not aff or not all(isinstance(c, int) and c >= 0 for c in aff):
                raise RunnerError(f"{where}: field 'cpu_affinity' must be a non-empty list of CPU numbers")
        return cls(**kw), unknown

    def warmup_cap(self) -> int:
        return self.max_warmup if self.max_warmup is not None else max(3 * self.warmup, self.warmup + 10)


def percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return float(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


def summarize(values_ms: Sequence[float]) -> Dict[str, float]:
    """median, mean of the 10-90% range (HAT's statistic), p90, IQR and CV of timed runs."""
    v = sorted(float(x) for x in values_ms)
    n = len(v)
    if n == 0:
        raise RunnerError("no timed runs")
    # HAT: sort, drop the lowest 10% and the highest max(1, 10%) when there are enough runs.
    lo = int(n * 0.1)
    hi = n - max(1, int(n * 0.1)) if n >= 3 else n
    mid = v[lo:hi] or v
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {
        "median_ms": percentile(v, 50),
        "mean_10_90_ms": sum(mid) / len(mid),
        "p90_ms": percentile(v, 90),
        "iqr_ms": percentile(v, 75) - percentile(v, 25),
        "cv": std / mean if mean > 0 else 0.0,
        "min_ms": v[0],
        "max_ms": v[-1],
    }


def warmed_up(totals: Sequence[float], window: int = 3, tol: float = 0.02) -> bool:
    """True when the last `window` runs no longer improve on the best before them by > tol."""
    if len(totals) <= window:
        return True  # too few runs to compare: the requested minimum warm-up decides
    best_before = min(totals[:-window])
    return min(totals[-window:]) >= best_before * (1.0 - tol)


def measurement_source(src_len: int, vocab_size: int, eos: int, seed: int = 0) -> np.ndarray:
    """(1, src_len) fixed source: seeded ids from the non-special range, ending with EOS."""
    rng = np.random.default_rng(seed)
    lo = 4 if vocab_size > 8 else 0
    ids = rng.integers(lo, vocab_size, size=(1, src_len), dtype=np.int64)
    ids[0, -1] = eos
    return ids


def _time_once(model: Model, src: np.ndarray, s: Settings, cuda_events: Optional[Any]) -> Tuple[float, float]:
    """One full translation at fixed length: (encoder_ms, decode_ms)."""
    if cuda_events is not None:  # CUDA events: device-side timing, no host clock jitter
        e0, e1, e2 = cuda_events
        e0.record()
        enc = model.encode(src)
        e1.record()
        decode(model.stepper(enc, s.beam), 1, s.beam, model.bos_id, model.eos_id, s.steps, fixed_steps=True)
        e2.record()
        e2.synchronize()
        return float(e0.elapsed_time(e1)), float(e1.elapsed_time(e2))
    t0 = time.perf_counter()
    enc = model.encode(src)
    model.synchronize()
    t1 = time.perf_counter()
    decode(model.stepper(enc, s.beam), 1, s.beam, model.bos_id, model.eos_id, s.steps, fixed_steps=True)
    model.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1000.0, (t2 - t1) * 1000.0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so each bundle reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0  # bytes on macOS


def _warm_up(model: Model, src: np.ndarray, s: Settings, cuda_events: Optional[Any]) -> list:
    warm: list[float] = []
    if s.warmup > 0:
        while len(warm) < s.warmup_cap():
            e, dcd = _time_once(model, src, s, cuda_events)
            warm.append(e + dcd)
            if len(warm) >= s.warmup and warmed_up(warm):
                break
    return warm


def _cuda_events(model: Model, s: Settings) -> Optional[Any]:
    if s.device == "cuda" and isinstance(model, TorchScriptModel):
        torch = model.torch
        return tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
    return None


def _result(runs: list, warm: list, s: Settings, timing: str) -> dict:
    stats = summarize([r["total_ms"] for r in runs])
    return {
        "runs": runs,
        "warmup": len(warm),
        "warmup_ms": warm,
        "warmup_stable": bool(s.warmup == 0 or warmed_up(warm)),
        **stats,
        "encoder_median_ms": percentile(sorted(r["encoder_ms"] for r in runs), 50),
        "decoder_median_ms": percentile(sorted(r["decode_ms"] for r in runs), 50),
        "timing": timing,
    }


def measure(model: Model, s: Settings) -> dict:
    """Warm up until stable, then time full translations until min_repeats AND min_time_s."""
    src = measurement_source(s.src_len, model.vocab_size, model.eos_id, s.seed)
    cuda_events = _cuda_events(model, s)
    warm = _warm_up(model, src, s, cuda_events)
    runs: list[dict] = []
    t_start = time.perf_counter()
    while len(runs) < s.max_repeats:
        e, dcd = _time_once(model, src, s, cuda_events)
        runs.append({"encoder_ms": e, "decode_ms": dcd, "total_ms": e + dcd})
        if len(runs) >= s.min_repeats and time.perf_counter() - t_start >= s.min_time_s:
            break
    return _result(runs, warm, s, "cuda_events" if cuda_events is not None else "perf_counter")


def measure_interleaved(models: Sequence[Model], s: Settings) -> list:
    """Several models timed in rotation: each warmed up, then one timed run of each in turn until
    every model has min_repeats runs and the rotation has lasted min_time_s per model. A drift in
    the machine's speed (a neighbour on a shared host, a clock change) then hits every model alike,
    so their ratios hold even when the absolute times move."""
    srcs = [measurement_source(s.src_len, m.vocab_size, m.eos_id, s.seed) for m in models]
    events = [_cuda_events(m, s) for m in models]
    warms = [_warm_up(m, src, s, ev) for m, src, ev in zip(models, srcs, events)]
    runs: list[list] = [[] for _ in models]
    t_start = time.perf_counter()
    while len(runs[0]) < s.max_repeats:
        for m, src, ev, rr in zip(models, srcs, events, runs):
            e, dcd = _time_once(m, src, s, ev)
            rr.append({"encoder_ms": e, "decode_ms": dcd, "total_ms": e + dcd})
        if len(runs[0]) >= s.min_repeats and time.perf_counter() - t_start >= s.min_time_s * len(models):
            break
    return [
        {**_result(rr, w, s, "cuda_events" if ev is not None else "perf_counter"), "interleaved_with": len(models)}
        for rr, w, ev in zip(runs, warms, events)
    ]


# ------------------------------------------------------------------------------------------------
# 5. environment
# ------------------------------------------------------------------------------------------------
def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n\t") or None
    except OSError:
        return None


def _cmd(argv: List[str], timeout: float = 5.0) -> Optional[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _cpu_model() -> Optional[str]:
    info = _read("/proc/cpuinfo") or ""
    fields: Dict[str, str] = {}
    for line in info.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if fields.get(key):
            return fields[key]
    if sys.platform == "darwin":
        return _cmd(["sysctl", "-n", "machdep.cpu.brand_string"])
    return platform.processor() or None


def _memory_mb() -> Optional[float]:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    if sys.platform == "darwin":
        v = _cmd(["sysctl", "-n", "hw.memsize"])
        return round(int(v) / 2**20, 1) if v and v.isdigit() else None
    return None


def _pkg_version(module: str) -> Optional[str]:
    try:
        from importlib import metadata

        for dist in (module, f"{module}-gpu"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    except ImportError:
        pass
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", None))
    except ImportError:
        return None


def raspberry_pi_model() -> Optional[str]:
    model = _read("/proc/device-tree/model")
    return model if model and "Raspberry Pi" in model else None


def temperature_c() -> Optional[float]:
    """SoC temperature: `vcgencmd measure_temp` on a Pi, else thermal zone 0 when Linux has one."""
    out = _cmd(["vcgencmd", "measure_temp"]) if raspberry_pi_model() else None
    if out and "=" in out:
        try:
            return float(out.split("=")[1].split("'")[0])
        except ValueError:
            pass
    raw = _read("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(raw) / 1000.0, 1) if raw else None
    except ValueError:
        return None


def get_throttled() -> Optional[int]:
    """The Pi firmware's throttle bits (`vcgencmd get_throttled`), or None off a Pi."""
    if not raspberry_pi_model():
        return None
    out = _cmd(["vcgencmd", "get_throttled"])
    if not out or "=" not in out:
        return None
    try:
        return int(out.split("=")[1], 16)
    except ValueError:
        return None


def throttled_during(before: Optional[int], after: Optional[int]) -> Optional[bool]:
    """Throttling seen during a measurement: a 'now' bit (0-3) set before or after, or a sticky
    'since boot' bit (16-19) that turned on in between. None when the board cannot tell."""
    if before is None or after is None:
        return None
    return bool(((before | after) & 0xF) or ((after & ~before) & 0xF0000))


def collect_env(probe_runtimes: bool = True) -> dict:
    """One JSON-able object describing this machine (absent facts are null)."""
    uname = platform.uname()
    try:
        usable = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = os.cpu_count()
    env: Dict[str, Any] = {
        "version": RUNNER_VERSION,
        "os": f"{uname.system} {uname.release}",
        "platform": platform.platform(),
        "machine": uname.machine,
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_mb": _memory_mb(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": None,
        "onnxruntime_providers": None,
        "torch": None,
        "cuda_device": None,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_max_mhz": None,
        "raspberry_pi": raspberry_pi_model(),
        "temperature_c": temperature_c(),
        "throttled": None,
    }
    maxf = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if maxf and maxf.isdigit():
        env["cpu_max_mhz"] = int(maxf) // 1000
    t = get_throttled()
    env["throttled"] = hex(t) if t is not None else None
    if probe_runtimes:
        try:
            import onnxruntime as ort

            env["onnxruntime"] = ort.__version__
            env["onnxruntime_providers"] = list(ort.get_available_providers())
        except ImportError:
            pass
        env["torch"] = _pkg_version("torch")
        if env["torch"] and os.environ.get("HAT_EDGE_ENV_NO_TORCH") != "1":
            try:
                import torch

                if torch.cuda.is_available():
                    env["cuda_device"] = torch.cuda.get_device_name(0)
            except Exception:  # a broken torch install must not break `env`
                pass
    return env


# ------------------------------------------------------------------------------------------------
# 6. jobs and command line
# ------------------------------------------------------------------------------------------------
def read_job(path: str | Path) -> Tuple[List[dict], dict]:
    """(bundles, raw settings) of a job file, checked; RunnerError names the bad field."""
    p = Path(path)
    try:
        job = json.loads(p.read_text())
    except FileNotFoundError:
        raise RunnerError(f"{p}: no such job file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunnerError(f"{p}: not a readable JSON job file ({e.__class__.__name__})") from None
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise RunnerError(f"{p}: field 'format' must be '{JOB_FORMAT}'")
    if job.get("version") != JOB_VERSION:
        raise RunnerError(f"{p}: field 'version' is {job.get('version')!r}, this runner reads version {JOB_VERSION}")
    bundles = job.get("bundles")
    if not isinstance(bundles, list):
        raise RunnerError(f"{p}: field 'bundles' must be a list of {{\"id\", \"path\"}}")
    seen = set()
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not isinstance(b.get("id"), str) or not isinstance(b.get("path"), str):
            raise RunnerError(f"{p}: bundles[{i}] needs string fields 'id' and 'path'")
        if b["id"] in seen:
            raise RunnerError(f"{p}: bundles[{i}] repeats id {b['id']!r}")
        seen.add(b["id"])
    settings = job.get("settings", {})
    if not isinstance(settings, dict):
        raise RunnerError(f"{p}: field 'settings' must be an object")
    return bundles, settings


def done_ids(out_path: Path) -> set:
    """Ids with a finished (non-error) result line in an existing results file."""
    ids = set()
    if not out_path.is_file():
        return ids
    for line in out_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and "error" not in rec and "id" in rec:
            ids.add(rec["id"])
    return ids


def run_job(job_path: str | Path, out_path: str | Path, resume: bool = False,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> int:
    """Measure every bundle of a job; append one JSON line per bundle, flushed and fsynced at once.

    Returns the number of bundles that failed. A job-level problem raises RunnerError.
    """
    job_path = Path(job_path)
    bundles, raw = read_job(job_path)
    settings, unknown = Settings.from_dict(raw, f"{job_path}: settings")
    if unknown:
        log(f"runner: ignoring unknown settings: {', '.join(unknown)}")
    os.environ.update(settings.env)  # before any runtime import
    if settings.cpu_affinity is not None:
        try:
            os.sched_setaffinity(0, settings.cpu_affinity)  # type: ignore[attr-defined]
        except (AttributeError, OSError) as e:
            raise RunnerError(f"{job_path}: cannot pin to CPUs {settings.cpu_affinity} ({e})") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(out) if resume else set()
    env = collect_env()
    settings_out = asdict(settings)
    failures = 0
    with open(out, "a") as f:

        def emit(rec: dict) -> None:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a board that reboots keeps every finished line

        def record(bid: str, model: Model, manifest: dict, res: dict, rss_scope: str, thr: tuple, temps: tuple) -> dict:
            rec = {
                "version": RESULT_VERSION,
                "id": bid,
                "runtime": model.runtime,
                "precision": manifest.get("precision", "fp32"),
                "arch": manifest.get("arch"),
                "settings": settings_out,
                **res,
                "peak_rss_mb": peak_rss_mb(),
                "peak_rss_scope": rss_scope,
                "throttled": throttled_during(*thr),
                "throttle_bits": [hex(x) if x is not None else None for x in thr],
                "temperature_c": list(temps),
                "env": env,
                "ignored_settings": unknown,
            }
            if rec["cv"] > 0.1:
                log(f"runner: {bid}: CV {rec['cv']:.2f} is high; the machine may be busy")
            return rec

        def fail(i: int, bid: str, e: Exception) -> None:
            nonlocal failures
            failures += 1
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            if not isinstance(e, RunnerError):
                msg = f"{e.__class__.__name__}: {msg}"
            emit({"id": bid, "error": msg})
            log(f"runner: [{i + 1}/{len(bundles)}] {bid}: error: {msg}")

        def load(b: dict) -> Tuple[Model, dict]:
            path = Path(b["path"])
            if not path.is_absolute():
                path = (job_path.parent / path).resolve() if not path.exists() else path
            manifest = read_manifest(path)
            return open_model(path, settings.threads, settings.device, settings.runtime,
                              settings.ort_opt_level, manifest=manifest), manifest

        todo = [(i, b) for i, b in enumerate(bundles) if b["id"] not in skip]
        for i, b in enumerate(bundles):
            if b["id"] in skip:
                log(f"runner: [{i + 1}/{len(bundles)}] {b['id']}: already in {out}, skipped")

        if settings.interleave:
            opened = []
            for i, b in todo:
                try:
                    opened.append((i, b["id"], *load(b)))
                except Exception as e:  # one bad bundle must not stop the others
                    fail(i, b["id"], e)
            if opened:
                rss_scope = "process"  # all models are loaded together
                thr0, temp0 = get_throttled(), temperature_c()
                try:
                    results = measure_interleaved([m for _, _, m, _ in opened], settings)
                except Exception as e:
                    for i, bid, _, _ in opened:
                        fail(i, bid, e)
                    return failures
                thr1, temp1 = get_throttled(), temperature_c()
                for (i, bid, model, manifest), res in zip(opened, results):
                    emit(record(bid, model, manifest, res, rss_scope, (thr0, thr1), (temp0, temp1)))
                    log(f"runner: [{i + 1}/{len(bundles)}] {bid}: median {res['median_ms']:.1f} ms "
                        f"({len(res['runs'])} runs in rotation with {len(opened) - 1} other(s))")
            return failures

        for n, (i, b) in enumerate(todo):
            bid = b["id"]
            if settings.cooldown_s > 0 and n > 0:
                time.sleep(settings.cooldown_s)
            try:
                model, manifest = load(b)
                rss_scope = "bundle" if _reset_peak_rss() else "process"
                thr0, temp0 = get_throttled(), temperature_c()
                res = measure(model, settings)
                thr1, temp1 = get_throttled(), temperature_c()
                emit(record(bid, model, manifest, res, rss_scope, (thr0, thr1), (temp0, temp1)))
                log(f"runner: [{i + 1}/{len(bundles)}] {bid}: median {res['median_ms']:.1f} ms "
                    f"({len(res['runs'])} runs, {res['warmup']} warm-up)")
                del model
            except Exception as e:  # one bad bundle must not stop the batch
                fail(i, bid, e)
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print one JSON object describing this machine")
    r = sub.add_parser("run", help="measure the bundles of a job file")
    r.add_argument("job")
    r.add_argument("--out", required=True, help="results file (JSON lines, appended)")
    r.add_argument("--resume", action="store_true", help="skip ids already measured in --out")
    t = sub.add_parser("translate", help="decode token ids with a bundle, print JSON")
    t.add_argument("bundle")
    t.add_argument("--src", action="append", required=True, help="space-separated ids (repeatable)")
    t.add_argument("--beam", type=int, default=5)
    t.add_argument("--max-len", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    c = sub.add_parser("check", help="verify a bundle's manifest and hashes, print JSON")
    c.add_argument("bundle")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "env":
            print(json.dumps(collect_env()))
            return 0
        if args.cmd == "run":
            failures = run_job(args.job, args.out, resume=args.resume)
            return 1 if failures else 0
        if args.cmd == "check":
            m = read_manifest(args.bundle)
            print(json.dumps({"ok": True, "runtime": m["runtime"], "files": sorted(m["files"])}))
            return 0
        if args.cmd == "translate":
            model = open_model(args.bundle, threads=args.threads)
            try:
                srcs = [[int(x) for x in s.split()] for s in args.src]
            except ValueError:
                raise RunnerError("--src takes space-separated integer token ids") from None
            out = translate(model, srcs, beam=args.beam, max_len=args.max_len)
            print(json.dumps({"tokens": out}))
            return 0
    except RunnerError as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
