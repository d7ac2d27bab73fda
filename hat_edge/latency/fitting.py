"""Small numeric tools for latency predictors: non-negative least squares (scipy), a robust
(Huber) relative-error fit on top of it, a tiny gradient-boosted regression-tree ensemble, and
the accuracy metrics the predictor room reports (rank correlations from scipy.stats).

Why non-negative: every term of the analytic cost model is work the device does (a matmul, a
kernel launch), so its cost per unit cannot be negative. The constraint is a strong prior that
keeps a fit on 30 rows physically sensible where plain least squares would trade a large positive
coefficient against a large negative one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# --------------------------------------------------------------------------------------------
# Non-negative least squares
# --------------------------------------------------------------------------------------------
def nnls(A: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin_x ||A x - b||_2 subject to x >= 0.  A: (m, n), b: (m,) -> x: (n,).

    scipy.optimize.nnls (Lawson & Hanson's active-set method, the field's tested implementation).
    It replaced a hand-written one: 34x faster on the predictor's matrices and never a worse
    residual (200 random fits of HAT's Xeon terms, 5-1,600 rows: at most 0.1% *lower* residual
    than the hand-written one). Columns are rescaled to unit norm first (the solution is invariant
    to positive column scaling; the active-set tolerances are not).
    """
    from scipy.optimize import nnls as _scipy_nnls

    A = np.asarray(A, dtype=float)
    b = np.asarray(b, dtype=float)
    norms = np.linalg.norm(A, axis=0)
    norms[norms == 0] = 1.0
    kw = {} if max_iter is None else {"maxiter": int(max_iter)}
    try:
        x = _scipy_nnls(A / norms, b, **kw)[0]
    except RuntimeError:  # iteration limit: fall back to a longer run
        x = _scipy_nnls(A / norms, b, maxiter=50 * A.shape[1] + 100)[0]
    return x / norms


def independent_columns(A: np.ndarray, rtol: float = 1e-7) -> list[int]:
    """Indices of columns of A (in order) that are not in the span of the columns kept before.

    HAT's data fixes the encoder depth and qkv width, so several analytic terms are exact
    multiples of each other there; keeping one of each family makes the fit well-posed.
    """
    kept: list[int] = []
    basis = np.zeros((A.shape[0], 0))
    for j in range(A.shape[1]):
        col = A[:, j].astype(float)
        nrm = np.linalg.norm(col)
        if nrm == 0:
            continue
        col = col / nrm
        if basis.shape[1]:
            col = col - basis @ (basis.T @ col)
            col = col - basis @ (basis.T @ col)  # twice: Gram-Schmidt loses orthogonality
        r = np.linalg.norm(col)
        if r > rtol ** 0.5:
            kept.append(j)
            basis = np.concatenate([basis, (col / r)[:, None]], axis=1)
    return kept


def huber_weights(r: np.ndarray, huber_k: float) -> np.ndarray:
    """Square roots of Huber's IRLS weights for residuals `r`, on a robust scale (1.4826 x MAD):
    1 within `huber_k` scales, k/|u| beyond (row multipliers for a weighted least squares)."""
    scale = 1.4826 * np.median(np.abs(r - np.median(r))) + 1e-9
    u = np.abs(r) / scale
    return np.sqrt(np.where(u <= huber_k, 1.0, huber_k / np.maximum(u, 1e-12)))


def fit_relative(
    A: np.ndarray,
    y: np.ndarray,
    huber_k: float | None = 2.0,
    iters: int = 30,
) -> np.ndarray:
    """Non-negative coefficients c minimising a robust loss of the relative error (A c - y) / y.

    Relative, because latencies span 10x and a predictor is judged by relative error. Huber
    weights (iteratively reweighted, scale from the median absolute deviation) make single slow
    measurements (a throttled run, a background job) pull the fit less than a squared loss would;
    `huber_k=None` is plain relative least squares.

    Kept hand-written rather than scipy.optimize.least_squares(loss="huber", bounds=(0, inf)): the
    two give the same acc10 on HAT's three files at N = 10, 30, 100 and 1,600 (Xeon N = 10 74.5 vs
    75.0, every other cell equal; bench/predictor_fitters.py), and on noise-free rows, where the
    robust scale collapses to ~0, least_squares's solution differed in the last digits enough to
    flip a tie in the loop's search (tests/test_loop.py's calibration test picked a measured arch).
    """
    A = np.asarray(A, float)
    y = np.asarray(y, float)
    Ar = A / y[:, None]  # relative error is the residual of (A/y) c ~ 1
    ones = np.ones(len(y))
    w = np.ones(len(y))
    c = nnls(Ar, ones)
    if huber_k is None:
        return c
    for _ in range(iters):
        w_new = huber_weights(Ar @ c - 1.0, huber_k)
        if np.allclose(w_new, w, atol=1e-6):
            break
        w = w_new
        c = nnls(Ar * w[:, None], w)
    return c


# --------------------------------------------------------------------------------------------
# Gradient-boosted regression trees (squared loss), small and deterministic
# --------------------------------------------------------------------------------------------
# Kept hand-written rather than scikit-learn's HistGradientBoostingRegressor: a predictor file is
# untrusted JSON and these trees are plain arrays in it, while a scikit-learn model is saved by
# pickle (code on load). It changes no figure either: on HAT's three files the cross-validation
# keeps 0 trees at N = 30, 100 and 1,600 (bench/results/predictor_scipy_nnls.json,
# `correction_rounds`).
@dataclass(frozen=True)
class Tree:
    """A regression tree as flat arrays; node i is a leaf when feature[i] < 0."""

    feature: tuple[int, ...]
    threshold: tuple[float, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    value: tuple[float, ...]

    def predict(self, X: np.ndarray) -> np.ndarray:
        node = np.zeros(len(X), dtype=int)
        feat = np.asarray(self.feature)
        thr = np.asarray(self.threshold)
        left, right, value = np.asarray(self.left), np.asarray(self.right), np.asarray(self.value)
        for _ in range(64):  # depth bound; trees here are 2-3 deep
            f = feat[node]
            inner = f >= 0
            if not inner.any():
                break
            go_left = X[np.arange(len(X)), np.where(inner, f, 0)] <= thr[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)
        return value[node]

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("feature", "threshold", "left", "right", "value")}

    @classmethod
    def from_dict(cls, d: dict) -> "Tree":
        return cls(
            feature=tuple(int(v) for v in d["feature"]),
            threshold=tuple(float(v) for v in d["threshold"]),
            left=tuple(int(v) for v in d["left"]),
            right=tuple(int(v) for v in d["right"]),
            value=tuple(float(v) for v in d["value"]),
        )


def fit_tree(X: np.ndarray, g: np.ndarray, depth: int, min_leaf: int) -> Tree:
    """Least-squares regression tree of `g` on `X` (exhaustive best split per node)."""
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    value: list[float] = []

    def build(ix: np.ndarray, d: int) -> int:
        nid = len(feature)
        feature.append(-1), threshold.append(0.0), left.append(-1), right.append(-1)
        value.append(float(g[ix].mean()))
        n = len(ix)
        if d == 0 or n < 2 * min_leaf:
            return nid
        total = g[ix].sum()
        best_gain, best_j, best_t = 1e-12, -1, 0.0
        k = np.arange(1, n)
        for j in range(X.shape[1]):
            order = np.argsort(X[ix, j], kind="stable")
            xs, gs = X[ix, j][order], g[ix][order]
            cs = np.cumsum(gs)[:-1]
            ok = (xs[1:] != xs[:-1]) & (k >= min_leaf) & (n - k >= min_leaf)
            if not ok.any():
                continue
            # SSE reduction of splitting after position k: S_l^2/n_l + S_r^2/n_r - S^2/n
            gain = np.where(ok, cs**2 / k + (total - cs) ** 2 / (n - k) - total**2 / n, -np.inf)
            b = int(np.argmax(gain))
            if gain[b] > best_gain:
                best_gain, best_j, best_t = float(gain[b]), j, float((xs[b] + xs[b + 1]) / 2)
        if best_j < 0:
            return nid
        mask = X[ix, best_j] <= best_t
        feature[nid], threshold[nid] = best_j, best_t
        left[nid] = build(ix[mask], d - 1)
        right[nid] = build(ix[~mask], d - 1)
        return nid

    build(np.arange(len(g)), depth)
    return Tree(tuple(feature), tuple(threshold), tuple(left), tuple(right), tuple(value))


@dataclass(frozen=True)
class Boosted:
    """Sum of shrunken trees: f(x) = lr * sum_t tree_t(x)."""

    trees: tuple[Tree, ...]
    lr: float

    def predict(self, X: np.ndarray, rounds: int | None = None) -> np.ndarray:
        out = np.zeros(len(X))
        for t in self.trees[: len(self.trees) if rounds is None else rounds]:
            out += self.lr * t.predict(X)
        return out

    def staged(self, X: np.ndarray) -> np.ndarray:
        """(rounds + 1, n): the prediction after 0, 1, ..., len(trees) trees."""
        out = np.zeros((len(self.trees) + 1, len(X)))
        for i, t in enumerate(self.trees):
            out[i + 1] = out[i] + self.lr * t.predict(X)
        return out


def fit_boosted(X: np.ndarray, y: np.ndarray, rounds: int, lr: float = 0.1, depth: int = 2,
                min_leaf: int = 10) -> Boosted:
    f = np.zeros(len(y))
    trees = []
    for _ in range(rounds):
        t = fit_tree(X, y - f, depth, min_leaf)
        trees.append(t)
        f += lr * t.predict(X)
    return Boosted(tuple(trees), lr)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (ties handled; scipy.stats.kendalltau). NaN below 2 rows or for a constant."""
    return _rank_stat("kendalltau", a, b)


def spearman_rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, ties at their average rank (scipy.stats.spearmanr)."""
    return _rank_stat("spearmanr", a, b)


def _rank_stat(name: str, a: np.ndarray, b: np.ndarray) -> float:
    import warnings

    import scipy.stats

    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if len(a) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: NaN, said by the value
        return float(getattr(scipy.stats, name)(a, b)[0])


def accuracy_metrics(pred_ms: np.ndarray, true_ms: np.ndarray) -> dict[str, float]:
    """RMSE and MAPE (ms, %), share within 5% / 10% (%, HAT's 'acc10'), Kendall tau, Spearman rho."""
    p = np.asarray(pred_ms, float)
    y = np.asarray(true_ms, float)
    rel = np.abs(p - y) / y
    return {
        "n": int(len(y)),
        "rmse_ms": float(np.sqrt(np.mean((p - y) ** 2))),
        "mape_pct": float(100 * rel.mean()),
        "acc5_pct": float(100 * (rel <= 0.05).mean()),
        "acc10_pct": float(100 * (rel <= 0.10).mean()),
        "kendall_tau": kendall_tau(p, y),
        "spearman_rho": spearman_rho(p, y),
    }


__all__ = [
    "nnls",
    "independent_columns",
    "fit_relative",
    "Tree",
    "Boosted",
    "fit_tree",
    "fit_boosted",
    "kendall_tau",
    "spearman_rho",
    "accuracy_metrics",
]
