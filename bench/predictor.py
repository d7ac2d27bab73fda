"""Latency predictors on HAT's three measured datasets: HAT's MLP vs hat-edge's default.

Protocol (HAT data README): `idx = list(range(2000)); random.Random(0).shuffle(idx)`;
test = idx[1800:] (200 rows); train = the first N of idx[:1600], N in {30, 100, 1600}. Each
predictor sees only its training rows (the default's choices are cross-validated inside them,
and its configuration was chosen by nested validation inside the training pools,
bench/predictor_select.py); the test rows are used for this table only.

    .venv/bin/python bench/predictor.py                 # full run (HAT's 5,000 MLP steps)
    .venv/bin/python bench/predictor.py --kinds default # the default only (seconds)

Writes bench/results/predictor.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)

from hat_edge.latency.features import read_latency_csv  # noqa: E402
from hat_edge.latency.fitting import accuracy_metrics  # noqa: E402
from hat_edge.latency.predictor import HAT_LAT_NORM, make_predictor  # noqa: E402



def _shared() -> Path:
    """HAT's shared data: $HAT_EDGE_SHARED, else ../shared beside the checkout, else /work/shared."""
    env = os.environ.get("HAT_EDGE_SHARED")
    for c in ([Path(env)] if env else [REPO.parent / "shared", Path("/work/shared")]):
        if (c / "data" / "hat").is_dir():
            return c
    return Path(env) if env else REPO.parent / "shared"


DATA = _shared() / "data" / "hat" / "latency"
FILES = {
    "raspberrypi": "wmt14ende_cpu_raspberrypi_all.csv",
    "xeon": "wmt14ende_cpu_xeon_all.csv",
    "titanxp": "wmt14ende_gpu_titanxp_all.csv",
}
SIZES = (30, 100, 1600)
# Named variants of a kind ("kind+name"): the default with its acc10 centring switched off (the
# default before bench/predictor_select.py chose centre_max=0.03 on training rows only); shown for
# reference, the targets are about `default`.
VARIANTS = {"default+nocentre": {"centre_max": 0.0}}
# HAT's MLP on these files and this split, as the data README reports it (N=1600 acc10).
README_HAT_ACC10_1600 = {"raspberrypi": 96.0, "xeon": 91.5, "titanxp": 88.5}


def split(n_rows: int = 2000, seed: int = 0) -> tuple[list[int], list[int]]:
    idx = list(range(n_rows))
    random.Random(seed).shuffle(idx)
    return idx[:1600], idx[1800:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="hat-mlp,default,default+nocentre",
                    help="comma-separated predictor kinds (and variants: default+nocentre)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--devices", default=",".join(FILES))
    ap.add_argument("--mlp-steps", type=int, default=5000, help="HAT: 5000")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the MLP")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predictor.json"))
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    devices = args.devices.split(",")
    if "hat-mlp" in kinds:
        import torch

        torch.set_num_threads(args.threads)

    results = []
    for dev in devices:
        data = read_latency_csv(DATA / FILES[dev])
        train_pool, test = split(len(data))
        test_data = data.subset(test)
        for n in sizes:
            train = data.subset(train_pool[:n])
            for kind in kinds:
                params = VARIANTS.get(kind, {})
                if kind == "hat-mlp":
                    params = {"lat_norm": HAT_LAT_NORM[dev], "steps": args.mlp_steps}
                t0 = time.perf_counter()
                pred = make_predictor(kind.split("+")[0], **params).fit_data(train, device=dev)
                fit_s = time.perf_counter() - t0
                p = pred.predict(test_data.X)
                lo, hi = pred.predict_interval(test_data.X)
                y = test_data.latency_ms
                m = accuracy_metrics(p, y)
                m["interval90_coverage_pct"] = float(100 * np.mean((y >= lo) & (y <= hi)))
                m["interval90_rel_width_pct"] = float(100 * np.median((hi - lo) / p))
                row = {"device": dev, "n_train": n, "kind": kind, "fit_s": round(fit_s, 2), **m}
                if kind.startswith("default"):
                    row["scale"] = getattr(pred, "scale", None)
                    row["correction_rounds"] = getattr(pred, "rounds", None)
                results.append(row)
                print(
                    f"{dev:<12} N={n:<5} {kind:<14} acc10 {m['acc10_pct']:5.1f}  acc5 {m['acc5_pct']:5.1f}  "
                    f"RMSE {m['rmse_ms']:8.2f}  MAPE {m['mape_pct']:5.2f}  tau {m['kendall_tau']:.3f}  "
                    f"cover90 {m['interval90_coverage_pct']:5.1f}  fit {fit_s:6.1f}s",
                    file=sys.stderr,
                    flush=True,
                )

    checks = _targets(results, devices, kinds, sizes)
    _table(results, checks)
    doc = {
        "format": "hat-edge-bench-predictor",
        "version": 1,
        "protocol": "idx=list(range(2000)); random.Random(0).shuffle(idx); test=idx[1800:]; train=idx[:1600][:N]",
        "mlp_steps": args.mlp_steps,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "results": results,
        "targets": checks,
    }
    out = write_json(args.out, doc)
    print(f"\nwrote {out}")
    return 0


def _get(results, dev, n, kind):
    return next((r for r in results if r["device"] == dev and r["n_train"] == n and r["kind"] == kind), None)


def _targets(results, devices, kinds, sizes) -> list[dict]:
    """The issue's targets, checked for the default (variants are in the table for reference)."""
    checks = []
    if "hat-mlp" not in kinds:
        return checks
    for kind in (k for k in kinds if k == "default"):
        for dev in devices:
            mlp = _get(results, dev, 1600, "hat-mlp")
            dft = _get(results, dev, 1600, kind)
            if mlp and dft:
                checks.append({
                    "target": f"{dev}: N=1600 {kind} beats hat-mlp on RMSE and acc10",
                    "kind": kind,
                    "default": [dft["rmse_ms"], dft["acc10_pct"]], "hat_mlp": [mlp["rmse_ms"], mlp["acc10_pct"]],
                    "pass": dft["rmse_ms"] < mlp["rmse_ms"] and dft["acc10_pct"] > mlp["acc10_pct"],
                })
            d100 = _get(results, dev, 100, kind)
            if mlp and d100:
                checks.append({
                    "target": f"{dev}: N=100 {kind} acc10 within 2 points of hat-mlp N=1600 acc10",
                    "kind": kind,
                    "default_100": d100["acc10_pct"], "hat_mlp_1600": mlp["acc10_pct"],
                    "readme_hat_mlp_1600": README_HAT_ACC10_1600[dev],
                    "pass": d100["acc10_pct"] >= mlp["acc10_pct"] - 2.0,
                })
    return checks


def _table(results, checks) -> None:
    head = f"{'device':<12} {'N':>5} {'predictor':<14} {'acc10%':>7} {'acc5%':>6} {'RMSE ms':>9} {'MAPE%':>6} {'tau':>6} {'cov90%':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['device']:<12} {r['n_train']:>5} {r['kind']:<14} {r['acc10_pct']:>7.1f} {r['acc5_pct']:>6.1f} "
            f"{r['rmse_ms']:>9.2f} {r['mape_pct']:>6.2f} {r['kendall_tau']:>6.3f} {r['interval90_coverage_pct']:>7.1f}"
        )
    if checks:
        print()
        for c in checks:
            print(f"[{'PASS' if c['pass'] else 'FAIL'}] {c['target']}")


if __name__ == "__main__":
    sys.exit(main())
