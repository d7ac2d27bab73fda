"""Hand-written numerics vs scipy's in the default predictor (#16): do the figures hold?

`latency.fitting.fit_relative` (the robust relative fit under every analytic predictor) is a
hand-written iteratively reweighted NNLS (Huber weights, scale re-estimated each step). The field's
library alternative is scipy.optimize.least_squares with Huber's loss and bounds c >= 0, defined
here (started from the NNLS solution, threshold huber_k robust sds of its residuals). Both fit the
default predictor on HAT's three files, HAT's protocol
(`idx = list(range(2000)); random.Random(0).shuffle(idx)`; train = idx[:1600][:N]; test =
idx[1800:]), N in {10, 30, 100, 1600}; acc10 and fit time, side by side in one run.

The figures are equal (bench/results/predictor_fitters.json), so the hand-written one stays (see
its docstring for the one place they differed: noise-free rows). The prior's transfer fit
(`latency.prior.fit_with_prior`) could not use least_squares anyway: its robust loss would apply to
the prior's penalty rows too, and those must stay quadratic.

    .venv/bin/python bench/predictor_fitters.py     # ~1 minute

Writes bench/results/predictor_fitters.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)
from predictor import DATA, FILES, split  # noqa: E402

import hat_edge.latency.predictor as predictor_mod  # noqa: E402
from hat_edge.latency.features import read_latency_csv  # noqa: E402
from hat_edge.latency.fitting import accuracy_metrics, fit_relative, nnls  # noqa: E402
from hat_edge.latency.predictor import AnalyticPredictor  # noqa: E402

SIZES = (10, 30, 100, 1600)


def irls_relative(A: np.ndarray, y: np.ndarray, huber_k: float | None = 2.0) -> np.ndarray:
    """The package's hand-written fit (iteratively reweighted NNLS)."""
    return fit_relative(A, y, huber_k=huber_k)


def least_squares_relative(A: np.ndarray, y: np.ndarray, huber_k: float | None = 2.0) -> np.ndarray:
    """scipy.optimize.least_squares(loss="huber", bounds=(0, inf)) on the relative residuals."""
    from scipy.optimize import least_squares

    A = np.asarray(A, float)
    y = np.asarray(y, float)
    norms = np.linalg.norm(A / y[:, None], axis=0)
    norms[norms == 0] = 1.0
    Ar = A / y[:, None] / norms
    c = nnls(Ar, np.ones(len(y)))
    if huber_k is None or len(y) < 2:
        return c / norms
    r = Ar @ c - 1.0
    scale = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    if scale <= 1e-12:
        return c / norms
    res = least_squares(lambda x: Ar @ x - 1.0, c, jac=lambda x: Ar, bounds=(0.0, np.inf),
                        loss="huber", f_scale=huber_k * scale, method="trf")
    return np.maximum(res.x, 0.0) / norms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "predictor_fitters.json"))
    args = ap.parse_args(argv)
    datas = {d: read_latency_csv(DATA / f) for d, f in FILES.items()}
    results = []
    for name, fn in (("irls (hand-written)", irls_relative), ("scipy least_squares", least_squares_relative)):
        predictor_mod.fit_relative = fn  # the analytic predictor's fit, for this comparison only
        for dev, data in datas.items():
            pool, test_idx = split(len(data))
            test = data.subset(test_idx)
            for n in SIZES:
                t0 = time.perf_counter()
                pred = AnalyticPredictor().fit_data(data.subset(pool[:n]), device=dev)
                fit_s = time.perf_counter() - t0
                m = accuracy_metrics(pred.predict(test.X), test.latency_ms)
                results.append({"fitter": name, "device": dev, "n_train": n, "fit_s": round(fit_s, 3), **m})
                print(f"{name:<20} {dev:<12} N={n:<5} acc10 {m['acc10_pct']:5.1f}  mape {m['mape_pct']:5.2f}  "
                      f"fit {fit_s:6.2f} s", file=sys.stderr, flush=True)
    predictor_mod.fit_relative = fit_relative
    print(f"\n{'device':<12} {'N':>5} {'acc10 irls':>11} {'acc10 scipy':>12} {'fit s irls':>11} {'fit s scipy':>12}")
    for dev in FILES:
        for n in SIZES:
            a, b = (next(r for r in results if r["fitter"] == f and r["device"] == dev and r["n_train"] == n)
                    for f in ("irls (hand-written)", "scipy least_squares"))
            print(f"{dev:<12} {n:>5} {a['acc10_pct']:>11.1f} {b['acc10_pct']:>12.1f} {a['fit_s']:>11.2f} {b['fit_s']:>12.2f}")
    doc = {"format": "hat-edge-bench-predictor-fitters", "version": 1,
           "protocol": "HAT's: idx=list(range(2000)); random.Random(0).shuffle(idx); train=idx[:1600][:N]; test=idx[1800:]",
           "command": "bench/predictor_fitters.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"python": platform.python_version(), "platform": platform.platform()},
           "results": results}
    print(f"\nwrote {write_json(args.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
