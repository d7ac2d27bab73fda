"""Timing: warm up until stable, repeat until `min_repeats` and `min_time_s`, then statistics.

As torch.utils.benchmark: every timed run is kept and reported, with the median, HAT's mean of the
10-90% range, p90, IQR and CV; never a single run. On CUDA (TorchScript) CUDA events time the
device's own work.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .backends import Model, TorchScriptModel
from .decoding import decode
from .errors import RunnerError
from .job import MeasureSpec


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


def _time_once(model: Model, src: np.ndarray, s: MeasureSpec, cuda_events: Optional[Any]) -> Tuple[float, float]:
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


def _warm_up(model: Model, src: np.ndarray, s: MeasureSpec, cuda_events: Optional[Any]) -> list:
    warm: list[float] = []
    if s.warmup > 0:
        while len(warm) < s.warmup_cap():
            e, dcd = _time_once(model, src, s, cuda_events)
            warm.append(e + dcd)
            if len(warm) >= s.warmup and warmed_up(warm):
                break
    return warm


def _cuda_events(model: Model, s: MeasureSpec) -> Optional[Any]:
    if s.device == "cuda" and isinstance(model, TorchScriptModel):
        torch = model.torch
        return tuple(torch.cuda.Event(enable_timing=True) for _ in range(3))
    return None


def _result(runs: list, warm: list, s: MeasureSpec, timing: str) -> dict:
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


def measure(model: Model, s: MeasureSpec) -> dict:
    """Warm up until stable, then time full translations until min_repeats AND min_time_s."""
    src = measurement_source(s.src_len, model.src_vocab_size, model.eos_id, s.seed)
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


def measure_interleaved(models: Sequence[Model], s: MeasureSpec) -> list:
    """Several models timed in rotation: each warmed up, then one timed run of each in turn until
    every model has min_repeats runs and the rotation has lasted min_time_s per model. A drift in
    the machine's speed (a neighbour on a shared host, a clock change) then hits every model alike,
    so their ratios hold even when the absolute times move."""
    srcs = [measurement_source(s.src_len, m.src_vocab_size, m.eos_id, s.seed) for m in models]
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
