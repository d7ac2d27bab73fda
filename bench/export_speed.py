"""How much faster is an exported SubTransformer than HAT's way of running it? On this CPU.

Same arch, same weights, same input, in one process: batch 1, a 30-token source, 30 decoding steps
(`fixed_steps`: EOS is never taken, so every method does the same work), beam 5 as HAT measured,
and greedy. Every method runs the same numpy search loop (`decoding.beam_search` / `greedy_search`,
the device's code); only the model behind the step function changes:

  hat        HAT's way: the eager SuperTransformer with the arch active (elastic layers slice the
             shared weights on every call), decoded like fairseq's incremental decoding, which HAT's
             `latency_dataset.py` uses: the encoder once, then one decoder call per token with an
             incremental state holding self-attention keys/values and the encoder-decoder keys/values
             (computed at the first step, then cached), reordered every step as fairseq's beam search
             does. HAT never re-runs the whole prefix; `--full-prefix` adds that (much slower) variant.
  eager      the standalone SubTransformer (plain nn layers, own weights) with its cache
             (`hat_edge.model.decode`).
  torchscript  the bundle's traced + frozen TorchScript graphs (runner).
  ort_fp32   the bundle's ONNX graphs in onnxruntime (runner; graph optimisation level "all").
  ort_int8   the same graphs after onnxruntime dynamic int8 quantization.
  ort_*_numpy_topk  the same bundles run the way before issue #17: every step returns the N x V
             log-probs to numpy and the search takes its top-k there; beam search now asks the
             graph's TopK for N x k values (the tokens are the same, checked). Greedy search runs
             the same code in both (numpy's argmax beat the graph's TopK there).

Vocabulary: 32,768 (HAT's WMT'14 En-De model uses fairseq's joint ~32k BPE dictionary), shared
embeddings. All methods use ONE thread (torch.set_num_threads(1), onnxruntime intra-op 1): the
comparison is per core, and other work on this shared machine disturbs one thread least.
Measurement: a warm-up round, then --rounds rounds; each round runs every (method, beam/greedy)
once in a shuffled order, so load changes on the machine hit all methods alike; medians reported.

  ct2_float32, ct2_int8  CTranslate2 (optional: `pip install -e .[bench]`) on the same weights, for
             the archs it can express (uniform: Transformer-Base/Big); its tokens are checked
             against eager's (bench/_ct2.py).

  floor_fp32, floor_int8  the kernel floor (bench/_kernel_floor.py): only the translation's weight
             matmuls (the same weights, the same int8 quantizer), as independent MatMul nodes in
             onnxruntime: the encoder and encoder-decoder k/v once on 30 rows, then each step's
             decoder linears and the d x V projection on beam (or 1) rows. No attention, softmax,
             norms, caches or search: what onnxruntime's matmul kernels alone need on this CPU.

The bandwidth bound: the bytes of weights a translation must read (every decoder layer and the
d x V output projection once per step, whatever the beam; the encoder and the encoder-decoder k/v
projections once), fp32 or int8 (matrices 1 byte), divided by the single-thread copy bandwidth
measured with numpy in the same run (before the first arch and after each; the median). Each
method's median is reported as a multiple of the bound of its precision.

A second part (`export_paths`, on HAT_wmt14ende_raspberrypi@6.9s) measures the export choices
behind the defaults: dynamo vs TorchScript-based ONNX exporter, onnxruntime optimisation levels
(fp32, int8), TorchScript traced vs frozen, and a torch.export program run as-is.

    .venv/bin/python bench/export_speed.py              # ~15-25 minutes on a busy 2-core machine
    .venv/bin/python bench/export_speed.py --quick      # 2 archs, few rounds: a smoke test
    .venv/bin/python bench/export_speed.py --no-slow --no-paths   # the deployed engines only

Writes bench/results/export_speed.json and prints the tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

# one thread everywhere, numpy's BLAS included (set before numpy is imported)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import _ct2  # noqa: E402  (bench/: the CTranslate2 peer, optional)
import _kernel_floor  # noqa: E402  (bench/: the weight matmuls alone)
from _results import write_json  # noqa: E402  (bench/, the script's own folder)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hat_edge.runtime import backends, decoding, envinfo, formats, timing  # noqa: E402
from hat_edge.exporters import export_bundle, load_bundle, quantize_bundle  # noqa: E402
from hat_edge.model import ModelConfig, SuperTransformer, decode  # noqa: E402
from hat_edge.model.sub import ende_memory, next_token_log_probs, padding_bias, repeat_bias  # noqa: E402
from hat_edge.space import PRESETS, TRANSFORMER_BASE, TRANSFORMER_BIG, Arch, SearchSpace  # noqa: E402

RESULT_FORMAT = "hat-edge-bench-export-speed"
RESULT_VERSION = 2  # 2: CTranslate2 peer, copy bandwidth and the bandwidth bound
VOCAB = 32768
SRC_LEN, STEPS, BEAM = 30, 30, 5

# HAT's published SubTransformers (configs/wmt14.en-de/subtransformer/*.yml), as data.
ARCHS: dict[str, Arch] = {
    "HAT_wmt14ende_xeon@137.9ms": Arch(
        encoder_embed_dim=512, decoder_embed_dim=512, encoder_layer_num=6, decoder_layer_num=1,
        encoder_ffn_embed_dim=(3072,) * 6, encoder_self_attention_heads=(4, 8, 8, 8, 8, 8),
        decoder_ffn_embed_dim=(3072,), decoder_self_attention_heads=(8,),
        decoder_ende_attention_heads=(8,), decoder_arbitrary_ende_attn=(1,)),
    "HAT_wmt14ende_raspberrypi@6.9s": Arch(
        encoder_embed_dim=512, decoder_embed_dim=512, encoder_layer_num=6, decoder_layer_num=5,
        encoder_ffn_embed_dim=(3072,) * 6, encoder_self_attention_heads=(8, 4, 8, 8, 8, 8),
        decoder_ffn_embed_dim=(2048, 2048, 3072, 3072, 2048), decoder_self_attention_heads=(8, 8, 8, 4, 8),
        decoder_ende_attention_heads=(4, 8, 8, 8, 8), decoder_arbitrary_ende_attn=(-1, 1, 1, 1, -1)),
    "Transformer-Base": TRANSFORMER_BASE,
    "Transformer-Big": TRANSFORMER_BIG,
}
PI = "HAT_wmt14ende_raspberrypi@6.9s"
METHODS = ("hat", "eager", "torchscript", "ort_fp32", "ort_int8")


def space_for(arch: Arch) -> SearchSpace:
    """HAT's WMT space, widened just enough to hold `arch` (Transformer-Big is outside it)."""
    base = PRESETS["hat-wmt"]
    if base.contains(arch):
        return base

    def widen(field: str, values: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(getattr(base, field)) | set(values), reverse=True))

    return SearchSpace(
        name="hat-wmt+baseline",
        encoder_embed_choice=widen("encoder_embed_choice", (arch.encoder_embed_dim,)),
        decoder_embed_choice=widen("decoder_embed_choice", (arch.decoder_embed_dim,)),
        encoder_ffn_embed_dim_choice=widen("encoder_ffn_embed_dim_choice", arch.encoder_ffn_embed_dim),
        decoder_ffn_embed_dim_choice=widen("decoder_ffn_embed_dim_choice", arch.decoder_ffn_embed_dim),
        encoder_layer_num_choice=widen("encoder_layer_num_choice", (arch.encoder_layer_num,)),
        decoder_layer_num_choice=widen("decoder_layer_num_choice", (arch.decoder_layer_num,)),
        encoder_self_attention_heads_choice=widen("encoder_self_attention_heads_choice", arch.encoder_self_attention_heads),
        decoder_self_attention_heads_choice=widen("decoder_self_attention_heads_choice", arch.decoder_self_attention_heads),
        decoder_ende_attention_heads_choice=widen("decoder_ende_attention_heads_choice", arch.decoder_ende_attention_heads),
        qkv_dim=arch.qkv_dim,
    )


# ------------------------------------------------------------------------------------------------
# HAT's way: fairseq-style incremental decoding on the elastic SuperTransformer
# ------------------------------------------------------------------------------------------------
class HatIncrementalStep:
    """Step function over the active SuperTransformer, with fairseq's incremental state."""

    def __init__(self, sup: SuperTransformer, src: torch.Tensor, rows: int) -> None:
        a = sup.arch
        self.sup, self.rows = sup, rows
        pad = sup.cfg.pad_id
        bias = padding_bias(src, pad)  # (B, S)
        x = sup._embed(src, "encoder", a.encoder_embed_dim)
        outs = []
        for layer in sup.encoder_layers[: a.encoder_layer_num]:
            x = layer(x, bias[:, None, None, :])
            outs.append(x)
        # fairseq's reorder_encoder_out: every beam row gets its sentence's encoder output
        self.enc_outs = [o.repeat_interleave(rows, 0) for o in outs]
        self.src_bias = bias.repeat_interleave(rows, 0)
        self.layers = sup.decoder_layers[: a.decoder_layer_num]
        # per layer (k, v) (N, H, t, hd); None before the first step
        self.self_kv: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(self.layers)
        self.cross: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(self.layers)
        self.t = 0
        d = a.decoder_embed_dim
        self.d, self.scale = d, d ** 0.5
        self.pad_penalty = torch.zeros(sup.cfg.vocab_size)
        self.pad_penalty[pad] = -1.0e4

    def __call__(self, tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
        sup = self.sup
        if order is not None:  # fairseq reorders every cached state, static encoder k/v included
            idx = torch.from_numpy(order)
            self.self_kv = [None if kv is None else (kv[0].index_select(0, idx), kv[1].index_select(0, idx))
                            for kv in self.self_kv]
            self.cross = [None if kv is None else (kv[0].index_select(0, idx), kv[1].index_select(0, idx))
                          for kv in self.cross]
        tok = torch.from_numpy(tokens).view(-1, 1)
        table = sup.embed_tokens if sup.cfg.share_all_embeddings else sup.decoder_embed_tokens
        pos = sup.decoder_pos[self.t + sup.cfg.pad_id + 1, : self.d]
        x = self.scale * table(tok, self.d) + pos  # (N, 1, d)
        for i, layer in enumerate(self.layers):
            k_new, v_new = layer.self_attn.project_kv(x)
            if self.self_kv[i] is None:
                k, v = k_new, v_new
            else:
                k = torch.cat([self.self_kv[i][0], k_new], dim=2)
                v = torch.cat([self.self_kv[i][1], v_new], dim=2)
            self.self_kv[i] = (k, v)
            x = layer.self_attn_layer_norm(x + layer.self_attn(x, k, v, None))
            if self.cross[i] is None:  # static_kv: computed at the first step, then kept
                self.cross[i] = layer.encoder_attn.project_kv(ende_memory(self.enc_outs, layer.ende))
            ck, cv = self.cross[i]
            x = layer.encoder_attn_layer_norm(x + layer.encoder_attn(x, ck, cv, repeat_bias(self.src_bias, layer.ende)))
            x = layer.final_layer_norm(x + layer.ffn(x))
        self.t += 1
        return next_token_log_probs(sup.output_layer(x[:, 0]), self.pad_penalty).numpy()


class FullPrefixStep:
    """The SuperTransformer's own forward over the whole prefix (and source) at every step."""

    def __init__(self, sup: SuperTransformer, src: torch.Tensor, rows: int) -> None:
        self.sup, self.src = sup, src.repeat_interleave(rows, 0)
        self.prefix: Optional[torch.Tensor] = None
        self.pad_penalty = torch.zeros(sup.cfg.vocab_size)
        self.pad_penalty[sup.cfg.pad_id] = -1.0e4

    def __call__(self, tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
        tok = torch.from_numpy(tokens).view(-1, 1)
        if self.prefix is None:
            self.prefix = tok
        else:
            prev = self.prefix if order is None else self.prefix.index_select(0, torch.from_numpy(order))
            self.prefix = torch.cat([prev, tok], dim=1)
        return next_token_log_probs(self.sup(self.src, self.prefix)[:, -1], self.pad_penalty).numpy()


# ------------------------------------------------------------------------------------------------
# one translation per call, for every method
# ------------------------------------------------------------------------------------------------
def search(step: Callable, beam: int, bos: int = 2, eos: int = 3) -> list[list[int]]:
    return decoding.decode(step, 1, beam, bos, eos, STEPS, fixed_steps=True)


def torch_runner(make_step: Callable, src: torch.Tensor) -> Callable[[int], list[list[int]]]:
    def run(beam: int) -> list[list[int]]:
        with torch.inference_mode():
            return search(make_step(src, beam), beam)

    return run


def eager_runner(sub: Any, src: torch.Tensor) -> Callable[[int], list[list[int]]]:
    def run(beam: int) -> list[list[int]]:
        if beam == 1:
            return decode.greedy(sub, src, max_len=STEPS, fixed_steps=True)
        return decode.beam(sub, src, beam=beam, max_len=STEPS, fixed_steps=True)

    return run


def ct2_runner(peer: Any, src: np.ndarray) -> Callable[[int], list[list[int]]]:
    def run(beam: int) -> list[list[int]]:
        return peer.translate(src, beam, STEPS)

    return run


# ------------------------------------------------------------------------------------------------
# the bandwidth bound: weights read once per step, at the copy bandwidth measured in this run
# ------------------------------------------------------------------------------------------------
def copy_bandwidth(mib: int = 256, repeats: int = 7) -> dict[str, Any]:
    """Single-thread memory copy bandwidth (STREAM's convention: bytes read + bytes written per
    second), numpy `copyto` of a buffer far larger than any cache; median of `repeats`."""
    n = mib << 18  # float32 elements
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        rates.append(2 * src.nbytes / (time.perf_counter() - t0))
    reads = []
    mat, vec = src.reshape(-1, 4096), np.ones(4096, dtype=np.float32)
    for _ in range(repeats):  # for reference: a matrix-vector product (numpy's BLAS), bytes read / s
        t0 = time.perf_counter()
        mat @ vec
        reads.append(src.nbytes / (time.perf_counter() - t0))
    return {"gb_per_s": float(np.median(rates)) / 1e9, "runs_gb_per_s": [r / 1e9 for r in rates], "buffer_mib": mib,
            "read_gb_per_s": float(np.median(reads)) / 1e9}


def weight_bytes(sub: Any) -> dict[str, Any]:
    """Bytes of weights a translation must read, fp32 and int8 (matrices 1 byte, the rest 4).

    per_step: every decoder layer (self-attention q/k/v/out, encoder-decoder q/out, FFN, norms)
    and the output projection (d x V), read once per step whatever the beam (beam rows share
    them); once: the encoder and every layer's encoder-decoder k/v projections (computed once per
    source). Token and position embedding rows (one per row) are negligible and left out.
    """
    def size(mods: list, int8: bool) -> int:
        total = 0
        for m in mods:
            for p in m.parameters():
                total += p.numel() * (1 if int8 and p.dim() == 2 else 4)
        return total

    once_mods = list(sub.encoder_layers) + [x for lay in sub.decoder_layers
                                           for x in (lay.encoder_attn.k_proj, lay.encoder_attn.v_proj)]
    out: dict[str, Any] = {}
    V, d = sub.cfg.vocab_size, sub.arch.decoder_embed_dim
    for prec, int8 in (("fp32", False), ("int8", True)):
        step = 0
        for lay in sub.decoder_layers:
            step += size([lay], int8) - size([lay.encoder_attn.k_proj, lay.encoder_attn.v_proj], int8)
        step += V * d * (1 if int8 else 4)
        out[prec] = {"per_step": step, "once": size(once_mods, int8)}
    return out


def bound_ms(wb: dict[str, Any], prec: str, bw_gb_s: float) -> float:
    w = wb[prec]
    return (STEPS * w["per_step"] + w["once"]) / (bw_gb_s * 1e9) * 1e3


def model_runner(model: backends.Model, src: np.ndarray) -> Callable[[int], list[list[int]]]:
    def run(beam: int) -> list[list[int]]:
        return backends.translate(model, src, beam=beam, max_len=STEPS, fixed_steps=True)

    return run


def interleaved(runners: dict[str, Callable[[int], Any]], modes: tuple[int, ...], rounds: int,
                seed: int = 0, label: str = "", cpu: Optional[dict] = None) -> tuple[dict[str, dict[int, list[float]]], dict]:
    """Time every (runner, mode) once per round in a shuffled order; one untimed warm-up round.

    `cpu`, when given, receives the process CPU time of each call as well ({runner: {mode: [ms]}}):
    with one thread it is the work done, less disturbed than wall time by other processes
    competing for the cores (memory-bandwidth contention still shows)."""
    rng = random.Random(seed)
    times: dict[str, dict[int, list[float]]] = {k: {m: [] for m in modes} for k in runners}
    if cpu is not None:
        cpu.update({k: {m: [] for m in modes} for k in runners})
    outputs: dict[str, dict[int, Any]] = {k: {} for k in runners}
    combos = [(k, m) for k in runners for m in modes]
    for r in range(rounds + 1):
        rng.shuffle(combos)
        for k, m in combos:
            c0 = time.process_time()
            t0 = time.perf_counter()
            out = runners[k](m)
            dt = (time.perf_counter() - t0) * 1e3
            dc = (time.process_time() - c0) * 1e3
            if r == 0:
                outputs[k][m] = out
            else:
                times[k][m].append(dt)
                if cpu is not None:
                    cpu[k][m].append(dc)
        print(f"  {label} round {r}/{rounds} done", file=sys.stderr, flush=True)
    return times, outputs


def stats(ms: list[float]) -> dict[str, Any]:
    s = timing.summarize(ms)
    return {"median_ms": s["median_ms"], "iqr_ms": s["iqr_ms"], "cv": s["cv"], "n": len(ms), "runs_ms": ms}


# ------------------------------------------------------------------------------------------------
# the main comparison
# ------------------------------------------------------------------------------------------------
def bench_arch(name: str, arch: Arch, work: Path, rounds: int, full_prefix: bool, ct2: bool = True,
               slow: bool = True, variants: bool = True, floor: bool = True) -> dict[str, Any]:
    print(f"{name}: building and exporting ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    sup = SuperTransformer(ModelConfig(vocab_size=VOCAB), space_for(arch)).eval()
    sup.set_arch(arch)
    sub = sup.extract(arch).eval()
    d = work / name
    b_onnx = export_bundle(sub, d / "onnx", fmt="onnx", parity_check=True)
    b_int8 = quantize_bundle(b_onnx, d / "int8", sub=sub)
    b_ts = export_bundle(sub, d / "ts", fmt="torchscript", parity_check=True) if slow else None
    export_s = time.perf_counter() - t0
    src_np = timing.measurement_source(SRC_LEN, VOCAB, 3, seed=0)  # (1, 30), EOS last
    src = torch.from_numpy(src_np)
    runners: dict[str, Callable[[int], Any]] = {}
    if slow:
        runners["hat"] = torch_runner(lambda s, b: HatIncrementalStep(sup, s, b), src)
    reference = eager_runner(sub, src)  # the tokens every fp32 method must decode
    if slow:
        runners["eager"] = reference
    if slow:
        runners["torchscript"] = model_runner(load_bundle(b_ts).open(threads=1), src_np)
    runners["ort_fp32"] = model_runner(load_bundle(b_onnx).open(threads=1), src_np)
    runners["ort_int8"] = model_runner(load_bundle(b_int8).open(threads=1), src_np)
    if variants:  # each decode-path change alone: the same bundles run the older way
        for prec, b in (("fp32", b_onnx), ("int8", b_int8)):
            m = load_bundle(b).open(threads=1)
            m.search_in_graph = False  # N x V log-probs to numpy, the numpy top-k (before #17)
            runners[f"ort_{prec}_numpy_topk"] = model_runner(m, src_np)
    if floor:  # the weight matmuls alone, in onnxruntime's kernels (bench/_kernel_floor.py)
        for prec in ("fp32", "int8"):
            runners[f"floor_{prec}"] = _kernel_floor.runner(sub, d / f"floor_{prec}", prec == "int8", SRC_LEN, STEPS)
    ct2_why = None if ct2 else "--no-ct2"
    if ct2 and _ct2.available() is None:
        ct2_why = "ctranslate2 is not installed (pip install -e .[bench])"
    ct2_why = ct2_why or _ct2.expressible(arch)
    if ct2_why is None:
        ct2_dir = _ct2.build(sub, d / "ct2")
        cfg = sub.cfg
        for ct in ("float32", "int8"):
            peer = _ct2.Peer(ct2_dir, ct, cfg.vocab_size, cfg.pad_id, cfg.bos_id, cfg.eos_id, threads=1)
            runners[f"ct2_{ct}"] = ct2_runner(peer, src_np)
    if full_prefix:
        runners["hat_full_prefix"] = torch_runner(lambda s, b: FullPrefixStep(sup, s, b), src)
    cpu: dict = {}
    times, outputs = interleaved(runners, (BEAM, 1), rounds, label=name, cpu=cpu)
    # sanity: same weights and inputs -> the fp32 methods decode the same tokens
    ref = {m: outputs["eager"][m] if "eager" in outputs else reference(m) for m in (BEAM, 1)}
    same = {k: {str(m): outputs[k][m] == ref[m] for m in (BEAM, 1)} for k in runners if not k.startswith("floor_")}
    wb = weight_bytes(sub)
    res: dict[str, Any] = {
        "arch": arch.to_dict(),
        "params": arch.params(),
        "export_s": export_s,
        "weight_bytes": wb,
        "ct2": {"version": _ct2.available(), "skipped": ct2_why},
        "parity": {k: load_bundle(b).manifest["parity"] for k, b in (("onnx", b_onnx), ("int8", b_int8), ("ts", b_ts))
                   if b is not None},
        "tokens_equal_to_eager": same,
        "methods": {k: {"beam": stats(times[k][BEAM]), "greedy": stats(times[k][1])} for k in runners},
    }
    for k in runners:
        for mode, m in (("beam", BEAM), ("greedy", 1)):
            res["methods"][k][mode]["cpu_median_ms"] = float(np.median(cpu[k][m]))
            res["methods"][k][mode]["cpu_runs_ms"] = cpu[k][m]
    for mode in ("beam", "greedy"):
        hat = res["methods"]["hat"][mode]["median_ms"] if "hat" in res["methods"] else None
        for k in runners:
            if hat is not None:
                res["methods"][k][mode]["speedup_vs_hat"] = hat / res["methods"][k][mode]["median_ms"]
    del runners  # the step functions hold the models: free them before the next arch
    sup = sub = None
    gc.collect()
    return res


# ------------------------------------------------------------------------------------------------
# export paths (one arch): which exporter, which optimisation level, frozen or not, torch.export
# ------------------------------------------------------------------------------------------------
def bench_export_paths(work: Path, rounds: int) -> dict[str, Any]:
    from torch.export import Dim, export

    from hat_edge.exporters.graphs import DecoderStepGraph, EncoderGraph, example_decoder_inputs, example_source
    from hat_edge.exporters.torchscript_export import export_torchscript

    arch = ARCHS[PI]
    print(f"export paths on {PI} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    sub = SuperTransformer(ModelConfig(vocab_size=VOCAB), space_for(arch)).eval().extract(arch).eval()
    d = work / "paths"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    b_dyn = export_bundle(sub, d / "dynamo", fmt="onnx", parity_check=False)
    timings["onnx_dynamo_export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    b_tse = export_bundle(sub, d / "ts_exporter", fmt="onnx", exporter="torchscript", parity_check=False)
    timings["onnx_torchscript_exporter_export_s"] = time.perf_counter() - t0
    b_q = quantize_bundle(b_dyn, d / "int8")
    t0 = time.perf_counter()
    b_ts = export_bundle(sub, d / "ts", fmt="torchscript", parity_check=False)
    timings["torchscript_export_s"] = time.perf_counter() - t0
    # TorchScript without freezing: same bundle, graphs re-traced unfrozen in place of the frozen ones
    unfrozen = d / "ts_unfrozen"
    unfrozen.mkdir(parents=True, exist_ok=True)
    export_torchscript(sub, unfrozen, freeze=False)
    ts_plain = backends.TorchScriptModel.__new__(backends.TorchScriptModel)
    backends.Model.__init__(ts_plain, load_bundle(b_ts).manifest)
    ts_plain.torch, ts_plain.device = torch, torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts_plain.enc = torch.jit.load(str(unfrozen / "encoder.pt")).eval()
        ts_plain.dec = torch.jit.load(str(unfrozen / "decoder_step.pt")).eval()
    # torch.export programs run as they are (an fx GraphModule in Python)
    A = Dim.AUTO
    n_cache = len(sub.cache_spec().self_attn) * 2
    with torch.no_grad():
        ep_enc = export(EncoderGraph(sub), (example_source(sub),), dynamic_shapes=({0: A, 1: A},))
        ep_dec = export(DecoderStepGraph(sub), example_decoder_inputs(sub),
                        dynamic_shapes=({0: A}, None, {0: A, 1: A}, tuple({0: A, 2: A} for _ in range(n_cache))))
    pt2 = backends.TorchScriptModel.__new__(backends.TorchScriptModel)
    backends.Model.__init__(pt2, load_bundle(b_ts).manifest)
    pt2.torch, pt2.device = torch, torch.device("cpu")
    pt2.enc, pt2.dec = ep_enc.module(), ep_dec.module()

    src_np = timing.measurement_source(SRC_LEN, VOCAB, 3, seed=0)
    runners: dict[str, Callable[[int], Any]] = {}
    for level in formats.ORT_OPT_LEVELS:
        runners[f"ort_fp32_dynamo_{level}"] = model_runner(load_bundle(b_dyn).open(threads=1, ort_opt_level=level), src_np)
        runners[f"ort_int8_{level}"] = model_runner(load_bundle(b_q).open(threads=1, ort_opt_level=level), src_np)
    for level in ("basic", "all"):
        runners[f"ort_fp32_tsexporter_{level}"] = model_runner(load_bundle(b_tse).open(threads=1, ort_opt_level=level), src_np)
    runners["torchscript_frozen"] = model_runner(load_bundle(b_ts).open(threads=1), src_np)
    runners["torchscript_traced"] = model_runner(ts_plain, src_np)
    runners["torch_export_pt2"] = model_runner(pt2, src_np)
    runners["eager"] = eager_runner(sub, torch.from_numpy(src_np))
    times, _ = interleaved(runners, (BEAM,), rounds, seed=1, label="paths")
    return {"arch": PI, "export_timings": timings,
            "methods": {k: stats(v[BEAM]) for k, v in times.items()}}


# ------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per arch (after one warm-up round)")
    ap.add_argument("--quick", action="store_true", help="HAT xeon + Pi archs only, 3 rounds, no export paths")
    ap.add_argument("--full-prefix", action="store_true", help="also time the SuperTransformer re-running the prefix")
    ap.add_argument("--no-paths", action="store_true", help="skip the export-path comparison")
    ap.add_argument("--no-ct2", action="store_true", help="leave CTranslate2 out even when it is installed")
    ap.add_argument("--no-variants", action="store_true", help="leave out the decode path's older ways")
    ap.add_argument("--no-floor", action="store_true", help="leave out the kernel floor (the weight matmuls alone)")
    ap.add_argument("--no-slow", action="store_true",
                    help="leave HAT's way and TorchScript out, and run eager only once for its tokens")
    ap.add_argument("--only", nargs="*", default=None, help="arch names to run (default: all four)")
    ap.add_argument("--work", default=None, help="where bundles go (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "export_speed.json"))
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="recompute the summary of a result file (no timing) and print its tables")
    args = ap.parse_args()
    if args.report:
        return report_again(args.report)
    torch.set_num_threads(1)
    rounds = 3 if args.quick else args.rounds
    names = args.only or (list(ARCHS)[:2] if args.quick else list(ARCHS))
    tmp = tempfile.TemporaryDirectory(prefix="hat-edge-export-speed-") if args.work is None else None
    work = Path(args.work) if args.work else Path(tmp.name)  # type: ignore[union-attr]
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    bandwidth = [copy_bandwidth()]
    for name in names:
        results[name] = bench_arch(name, ARCHS[name], work, rounds, args.full_prefix, ct2=not args.no_ct2,
                                   slow=not args.no_slow, variants=not args.no_variants, floor=not args.no_floor)
        bandwidth.append(copy_bandwidth())
    paths = None if (args.quick or args.no_paths) else bench_export_paths(work, rounds)
    bw = {"gb_per_s": float(np.median([b["gb_per_s"] for b in bandwidth])), "measurements": bandwidth,
          "archs": names,
          "how": "numpy copyto of 256 MiB, 1 thread, (read + written bytes) / s; measured before the first "
                 "arch and after each; an arch's bound uses the mean of the two measurements around its rounds"}
    summary = summarize_results(results, arch_bandwidth(bw))
    doc = {
        "format": RESULT_FORMAT, "version": RESULT_VERSION,
        "settings": {"vocab_size": VOCAB, "src_len": SRC_LEN, "steps": STEPS, "beam": BEAM, "threads": 1,
                     "rounds": rounds, "fixed_steps": True},
        "env": envinfo.collect_env(),
        "wall_s": time.perf_counter() - t_start,
        "copy_bandwidth": bw,
        "archs": results,
        "summary": summary,
        "export_paths": paths,
    }
    out = write_json(args.out, doc)
    print_tables(doc)
    print(f"\nwrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def arch_bandwidth(bw: dict[str, Any]) -> dict[str, float]:
    """Each arch's copy bandwidth: the mean of the measurements just before and just after its
    rounds (the machine's load changes over a run; the bound should see the arch's conditions)."""
    m = [x["gb_per_s"] for x in bw["measurements"]]
    return {name: (m[i] + m[i + 1]) / 2 for i, name in enumerate(bw["archs"])}


def report_again(path: str) -> int:
    """Recompute the summary of a result file (same timings) and print its tables."""
    doc = json.loads(Path(path).read_text())
    doc["copy_bandwidth"].setdefault("archs", list(doc["archs"]))
    doc["summary"] = summarize_results(doc["archs"], arch_bandwidth(doc["copy_bandwidth"]))
    write_json(path, doc)
    print_tables(doc)
    return 0


def precision_of_method(method: str) -> str:
    return "int8" if "int8" in method else "fp32"


PEER_OF = {"ort_fp32": "ct2_float32", "ort_int8": "ct2_int8"}
# issue #17's targets: median as a multiple of the bandwidth bound (Transformer-Base)
BOUND_TARGETS = {("beam", "ort_int8"): 1.5, ("beam", "ort_fp32"): 1.25, ("greedy", "ort_int8"): 1.2,
                 ("greedy", "ort_fp32"): 1.2}


def summarize_results(results: dict[str, Any], bw_gb_s: dict[str, float]) -> dict[str, Any]:
    s: dict[str, Any] = {"bound_targets": {f"{m} {k}": v for (m, k), v in BOUND_TARGETS.items()},
                         "bandwidth_gb_per_s": bw_gb_s, "bound_ms": {}, "x_bound": {}, "vs_ct2": {}, "targets_met": {}}
    for name, r in results.items():
        wb = r["weight_bytes"]
        s["bound_ms"][name] = {p: bound_ms(wb, p, bw_gb_s[name]) for p in ("fp32", "int8")}
        s["x_bound"][name], s["vs_ct2"][name], s["targets_met"][name] = {}, {}, {}
        for mode in ("beam", "greedy"):
            xb = {k: v[mode]["median_ms"] / s["bound_ms"][name][precision_of_method(k)]
                  for k, v in r["methods"].items()}
            s["x_bound"][name][mode] = xb
            s["vs_ct2"][name][mode] = {k: r["methods"][k][mode]["median_ms"] / r["methods"][p][mode]["median_ms"]
                                       for k, p in PEER_OF.items() if p in r["methods"] and k in r["methods"]}
            s.setdefault("x_floor", {}).setdefault(name, {})[mode] = {
                k: r["methods"][k][mode]["median_ms"] / r["methods"][f"floor_{p}"][mode]["median_ms"]
                for k, p in (("ort_fp32", "fp32"), ("ort_int8", "int8"))
                if k in r["methods"] and f"floor_{p}" in r["methods"]}
            for k in PEER_OF:
                if k not in xb:
                    continue
                met = {"x_bound": xb[k] <= BOUND_TARGETS[(mode, k)]}
                if k in s["vs_ct2"][name][mode]:
                    met["ahead_of_ct2"] = s["vs_ct2"][name][mode][k] < 1.0
                s["targets_met"][name][f"{mode} {k}"] = met
    return s


def print_tables(doc: dict[str, Any]) -> None:
    bw = doc["copy_bandwidth"]["gb_per_s"]
    ms = doc["copy_bandwidth"]["measurements"]
    rd = float(np.median([b["read_gb_per_s"] for b in ms]))
    print(f"\ncopy bandwidth (1 thread, this run, read + written bytes / s): median {bw:.1f} GB/s, measured "
          + ", ".join(f"{b['gb_per_s']:.1f}" for b in ms) + " (before the first arch, after each); "
          f"a matrix-vector product's weight reads: {rd:.1f} GB/s")
    print("each arch's bound uses the mean bandwidth measured around its rounds: " + ", ".join(
        f"{k} {v:.1f}" for k, v in doc["summary"]["bandwidth_gb_per_s"].items()))
    methods: list[str] = []
    for r in doc["archs"].values():
        methods += [m for m in r["methods"] if m not in methods]
    for mode in ("beam", "greedy"):
        label = f"beam {BEAM}" if mode == "beam" else "greedy"
        print(f"\nmedian ms per translation ({label}, {SRC_LEN} source tokens, {STEPS} steps, 1 thread) "
              "and as a multiple of the bandwidth bound of its precision")
        print(f"{'arch':32s}{'bound fp32/int8':>18s}" + "".join(f"{m:>21s}" for m in methods))
        for name, r in doc["archs"].items():
            b = doc["summary"]["bound_ms"][name]
            cells = []
            for m in methods:
                if m not in r["methods"]:
                    cells.append("-")
                    continue
                x = r["methods"][m][mode]["median_ms"]
                cells.append(f"{x:8.1f} ({doc['summary']['x_bound'][name][mode][m]:4.2f}x)")
            print(f"{name:32s}{b['fp32']:9.1f}/{b['int8']:<8.1f}" + "".join(f"{c:>21s}" for c in cells))
    for mode in ("beam", "greedy"):
        label = f"beam {BEAM}" if mode == "beam" else "greedy"
        print(f"\nprocess CPU ms per translation ({label}; the same calls as above)")
        print(f"{'arch':32s}{'':18s}" + "".join(f"{m:>21s}" for m in methods))
        for name, r in doc["archs"].items():
            cells = [f"{r['methods'][m][mode]['cpu_median_ms']:8.1f}" if m in r["methods"] else "-" for m in methods]
            print(f"{name:32s}{'':18s}" + "".join(f"{c:>21s}" for c in cells))
    print("\nours / CTranslate2 at the same compute type (median ratio; < 1: ours faster), tokens equal to eager:")
    for name, r in doc["archs"].items():
        v = doc["summary"]["vs_ct2"][name]
        eq = {k: x for k, x in r["tokens_equal_to_eager"].items() if k.startswith("ct2") or k.startswith("ort")}
        if not v["beam"]:
            print(f"  {name}: CTranslate2 skipped ({r['ct2']['skipped']})")
            continue
        print(f"  {name}: " + ", ".join(f"{mode} {k} {x:.2f}" for mode in ("beam", "greedy")
                                        for k, x in v[mode].items()) + f"; tokens equal {eq}")
    if any(doc["summary"].get("x_floor", {}).values()):
        print("\nours / the kernel floor of its precision (the weight matmuls alone in onnxruntime; > 1: what the "
              "rest of a step costs), and the floor / the bandwidth bound (how far the kernels are from it):")
        for name, v in doc["summary"]["x_floor"].items():
            xb = doc["summary"]["x_bound"][name]
            print(f"  {name}: " + ", ".join(
                f"{mode} {k} {x:.2f} (floor {xb[mode]['floor_' + precision_of_method(k)]:.2f}x bound)"
                for mode in ("beam", "greedy") for k, x in v.get(mode, {}).items()))
    print("\ntargets (issue #17): " + ", ".join(f"{k} <= {x}x bound" for k, x in doc["summary"]["bound_targets"].items()))
    for name, t in doc["summary"]["targets_met"].items():
        print(f"  {name}: " + ", ".join(f"{k} {'/'.join(f'{c}={ok}' for c, ok in v.items())}" for k, v in t.items()))
    if doc.get("export_paths"):
        p = doc["export_paths"]
        print(f"\nexport paths on {p['arch']} (beam {BEAM}, median ms): ")
        for k, v in sorted(p["methods"].items(), key=lambda kv: kv[1]["median_ms"]):
            print(f"  {k:32s} {v['median_ms']:9.1f}  (IQR {v['iqr_ms']:.1f}, n {v['n']})")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in p["export_timings"].items()))


if __name__ == "__main__":
    sys.exit(main())
