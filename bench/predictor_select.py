"""Choosing the default predictor's configuration with the training rows only (nested validation).

The final table (bench/predictor.py) scores on test = idx[1800:] of HAT's seed-0 shuffle; that
table must not choose anything. This script sees only the seed-0 training pool idx[:1600] of each
of HAT's three latency files, and compares a short list of AnalyticPredictor configurations,
fixed before any number was looked at:

    current : AnalyticPredictor()                  (centre_max=0, the default so far)
    centre  : AnalyticPredictor(centre_max=0.03)   (the `_centre` acc10 rescaling switched on)

Inner splits: for seed s in 1..10, perm = numpy.random.default_rng(s).permutation(1600); the inner
held-out part is pool[perm[1400:]] (200 rows, the size of the outer test set); the inner training
part is pool[perm[:n]] for n in {100, 1400} (the outer N=100 and, at the pool size left after
holding out 200, the outer N=1600). Every config is fitted on the same inner rows and scored on the
same held-out rows (acc10 = share within 10%, RMSE in ms). bootstrap=0 in these fits: the bootstrap
ensemble only widens intervals, it runs after every point-prediction choice and does not change
the predictions.

Decision rule (written before running):
  A(cfg) = mean inner acc10 over the 3 files x 2 sizes x 10 splits.
  R(cfg) = mean over the 6 (file, size) cells of mean-RMSE(cfg) / mean-RMSE(current) - 1
           (relative, because the files' RMSE scales differ ~30x).
  The config with the highest A becomes the default, unless its R > +1% (then the one with the next
  highest A that passes, and so on). A tie on A keeps `current`.

    .venv/bin/python bench/predictor_select.py      # ~10-20 min on one busy core

Writes bench/results/predictor_select.json and prints the table and the decision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hat_edge.latency.features import read_latency_csv  # noqa: E402
from hat_edge.latency.fitting import accuracy_metrics  # noqa: E402
from hat_edge.latency.predictor import AnalyticPredictor  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)
from predictor import DATA, FILES, split  # noqa: E402

CONFIGS = {"current": {}, "centre": {"centre_max": 0.03}}
BASELINE = "current"
SIZES = (100, 1400)
HELD_OUT = 200
SEEDS = tuple(range(1, 11))
RMSE_TOLERANCE = 0.01


def decide(summary: dict) -> tuple[str, dict, dict]:
    """Apply the docstring's rule to {cfg: {(dev, n): {"acc10": [...], "rmse": [...]}}}."""
    cells = list(summary[BASELINE])
    A = {c: float(np.mean([v for cell in cells for v in summary[c][cell]["acc10"]])) for c in summary}
    R = {
        c: float(np.mean([np.mean(summary[c][cell]["rmse"]) / np.mean(summary[BASELINE][cell]["rmse"]) for cell in cells]) - 1)
        for c in summary
    }
    order = sorted(summary, key=lambda c: (-A[c], c != BASELINE))  # ties: the baseline first
    chosen = next(c for c in order if R[c] <= RMSE_TOLERANCE)
    return chosen, A, R


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predictor_select.json"))
    args = ap.parse_args(argv)

    summary: dict[str, dict] = {c: {} for c in CONFIGS}
    rows = []
    for dev, fname in FILES.items():
        data = read_latency_csv(DATA / fname)
        pool, _test = split(len(data))  # the test rows are never read here
        pool = np.asarray(pool)
        for n in SIZES:
            for c in CONFIGS:
                summary[c][(dev, n)] = {"acc10": [], "rmse": []}
            for s in SEEDS:
                perm = np.random.default_rng(s).permutation(len(pool))
                held = data.subset(pool[perm[len(pool) - HELD_OUT:]].tolist())
                train = data.subset(pool[perm[:n]].tolist())
                for c, params in CONFIGS.items():
                    t0 = time.perf_counter()
                    pred = AnalyticPredictor(bootstrap=0, **params).fit_data(train, device=dev)
                    m = accuracy_metrics(pred.predict(held.X), held.latency_ms)
                    summary[c][(dev, n)]["acc10"].append(m["acc10_pct"])
                    summary[c][(dev, n)]["rmse"].append(m["rmse_ms"])
                    rows.append({"device": dev, "n_train": n, "seed": s, "config": c, "scale": pred.scale,
                                 "rounds": pred.rounds, "acc10_pct": m["acc10_pct"], "rmse_ms": m["rmse_ms"],
                                 "fit_s": round(time.perf_counter() - t0, 2)})
                    print(f"{dev:<12} n={n:<5} seed={s:<3} {c:<8} acc10 {m['acc10_pct']:5.1f} "
                          f"RMSE {m['rmse_ms']:8.2f} scale {pred.scale:.4f}", file=sys.stderr, flush=True)

    chosen, A, R = decide(summary)
    table = []
    print(f"\n{'config':<8} {'device':<12} {'n':>5} {'acc10 mean':>10} {'sd':>5} {'RMSE mean':>10} {'RMSE sd':>8}")
    for c in CONFIGS:
        for (dev, n), v in summary[c].items():
            a, r = np.asarray(v["acc10"]), np.asarray(v["rmse"])
            table.append({"config": c, "device": dev, "n_train": n, "acc10_mean": float(a.mean()),
                          "acc10_sd": float(a.std(ddof=1)), "rmse_mean": float(r.mean()), "rmse_sd": float(r.std(ddof=1))})
            print(f"{c:<8} {dev:<12} {n:>5} {a.mean():>10.2f} {a.std(ddof=1):>5.2f} {r.mean():>10.2f} {r.std(ddof=1):>8.2f}")
    print()
    for c in CONFIGS:
        print(f"{c:<8} A (mean inner acc10) {A[c]:.3f}   R (RMSE vs {BASELINE}) {100 * R[c]:+.2f}%")
    print(f"decision: {chosen}")

    doc = {
        "format": "hat-edge-bench-predictor-select",
        "version": 1,
        "pool": "seed-0 idx[:1600] of each file (test rows idx[1800:] unused)",
        "inner": f"seeds {SEEDS[0]}..{SEEDS[-1]}: perm=default_rng(s).permutation(1600); held-out perm[1400:], train perm[:n], n in {list(SIZES)}",
        "configs": CONFIGS,
        "rule": "highest mean inner acc10 over files x sizes x seeds, unless mean relative RMSE vs current > +1%; ties keep current",
        "mean_acc10": A,
        "rel_rmse_vs_current": R,
        "decision": chosen,
        "table": table,
        "rows": rows,
    }
    out = write_json(args.out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
