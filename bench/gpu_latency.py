"""GPU latency with CUDA events: the `local-gpu` profile measured end to end, in one short call.

Prepared for a session that is lent a GPU machine (the project's tests and CI have none): the
same 5 demo archs as bench/measurement.py, measured --runs times each with the `local-gpu`
profile (TorchScript on torch.cuda, timed with CUDA events by the on-device runner), then once
side by side (in rotation, one runner process). Prints, per arch, the medians of each run, their
spread across runs, the within-run CV and the timing method the runner recorded; writes JSON.

    python3 bench/gpu_latency.py --out $OUT/gpu_latency.json        # on the GPU machine, ~2 min
    .venv/bin/python bench/gpu_latency.py --profile local-cpu --quick  # the same path on a CPU

Needs torch with CUDA for local-gpu; hat_edge is imported from this checkout (no install).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)
from measurement import demo_archs, timed_measure  # noqa: E402  (the measurement bench's archs and call)

from hat_edge.devices.profiles import load_profile  # noqa: E402

RESULT_FORMAT = "hat-edge-bench-gpu-latency"
RESULT_VERSION = 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local-gpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="min_repeats 5, min_time_s 0.3, warm-up 2")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_latency.json"))
    args = ap.parse_args(argv)

    import torch

    profile = load_profile(args.profile)
    if profile.device == "cuda" and not torch.cuda.is_available():
        print(f"{args.profile}: torch.cuda.is_available() is False on this machine; nothing measured "
              "(run it where a GPU is, or pass --profile local-cpu to try the path)", file=sys.stderr)
        return 2
    meas = profile.measurement
    if args.quick:
        meas = replace(meas, min_repeats=5, min_time_s=0.3, warmup=2)
    work = Path(tempfile.mkdtemp(prefix="hat-edge-gpu-"))
    profile = replace(profile, measurement=meas, work_dir=str(work / "work"))
    archs = demo_archs()
    cache = work / "cache"

    runs, walls = [], []
    for i in range(args.runs):
        recs, wall = timed_measure(profile, archs, cache)
        runs.append(recs)
        walls.append(wall)
        print(f"run {i + 1}: {wall:.1f} s, medians {[round(r.median_ms, 2) for r in recs]}", file=sys.stderr)
    side, side_wall = timed_measure(profile, archs, cache, interleave=True)
    env = runs[0][0].env
    per_arch = []
    for j, a in enumerate(archs):
        meds = [run[j].median_ms for run in runs]
        per_arch.append({
            "arch": a.describe(),
            "medians_ms": meds,
            "spread": (max(meds) - min(meds)) / statistics.mean(meds),
            "cv_within_run": statistics.median(run[j].cv for run in runs),
            "encoder_ms": statistics.median(run[j].encoder_ms or 0.0 for run in runs),
            "side_by_side_median_ms": side[j].median_ms,
            "timing": run_timing(runs[0][j]),
        })
    result = {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "profile": profile.name,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cuda_device": env.get("cuda_device"), "torch": env.get("torch_version") or torch.__version__},
        "settings": profile.measure_spec().to_job() | {"vocab_size": meas.vocab_size},
        "quick": args.quick,
        "per_arch": per_arch,
        "median_spread_across_runs": statistics.median(p["spread"] for p in per_arch),
        "max_spread_across_runs": max(p["spread"] for p in per_arch),
        "wall_s": walls,
        "side_by_side_wall_s": side_wall,
    }
    out = write_json(args.out, result)
    print(f"\n{profile.name} ({result['machine']['cuda_device'] or 'no CUDA device'}), {args.runs} runs of "
          f"{len(archs)} demo archs (src {meas.src_len}, steps {meas.steps}, beam {meas.beam}, vocab {meas.vocab_size})")
    print(f"  {'arch':70s} {'medians ms':>26s} {'spread':>7s} {'CV':>6s} {'rotation':>9s}  timing")
    for p in per_arch:
        print(f"  {p['arch'][:70]:70s} {' / '.join(f'{m:.2f}' for m in p['medians_ms']):>26s} "
              f"{100 * p['spread']:6.1f}% {100 * p['cv_within_run']:5.1f}% {p['side_by_side_median_ms']:9.2f}  {p['timing']}")
    print(f"  spread of medians across runs: median {100 * result['median_spread_across_runs']:.1f}%, "
          f"max {100 * result['max_spread_across_runs']:.1f}%")
    print(f"wrote {out}")
    return 0


def run_timing(rec) -> str:
    """How the runner timed this record: 'cuda_events' on a GPU, 'perf_counter' on a CPU."""
    m = rec.env.get("measurement", {}) if isinstance(rec.env, dict) else {}
    return str(m.get("timing", "?"))


if __name__ == "__main__":
    sys.exit(main())
