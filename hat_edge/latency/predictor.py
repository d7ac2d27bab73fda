"""Latency predictors: arch -> milliseconds on one device, with an uncertainty interval.

Two kinds, one interface (`fit`, `predict`, `predict_interval`, `save`; `load_predictor`):

- `default` (`AnalyticPredictor`): an analytic cost model. Each row becomes counts of the work a
  SubTransformer does (`features.cost_terms`: projections e*qkv, FFN e*ffn, per-head overheads,
  cross-attention over 1-3 encoder layers, per-layer and per-step fixed costs, the output
  projection per decoder step). A non-negative, Huber-robust fit of the relative error learns the
  device's cost per unit of each; when the data splits encoder and decoder time, the two sides
  are fitted separately (twice the information per row). A small gradient-boosted correction of
  the log residual is added only when K-fold cross-validation inside the training rows says it
  helps. The predictions are then rescaled by at most 3% when the out-of-fold predictions say a
  scale puts clearly more of them within 10% (`_centre`; chosen by nested validation inside the
  training rows of HAT's files, bench/predictor_select.py). The interval combines the out-of-fold
  residual spread with a bootstrap ensemble's spread at the query point. Tens of measurements
  suffice.
- `hat-mlp` (`HatMLP`): HAT's predictor (Wang et al. 2020, `latency_predictor.py`) as the
  baseline: the 10 features divided by [640, 6, 2048, 6, 640, 6, 2048, 6, 6, 2], latency divided
  by a per-device constant, an MLP 10 -> 400 -> 400 -> 400 -> 400 -> 1 with ReLU (HAT's
  `hidden_layer_num=3` counts the 400x400 layers after the first 10x400 layer, so the README's
  four 400-wide layers and the config's "3" describe the same net), MSE, Adam lr 1e-5, 5,000
  steps of batch 128 drawn without replacement. HAT's `random.sample(k=128)` fails below 128
  rows; here a batch is then the whole training set.

Saved file (JSON): `{"format": "hat-edge-predictor", "version": 1, "kind", "feature_set",
"device", "training_size", "cv", "params", "state", ...}`.
"""

from __future__ import annotations

import base64
import json
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hat_edge import __version__
from hat_edge.errors import UserError
from hat_edge.runtime.files import read_text
from hat_edge.latency.features import (
    DECODER_TERMS,
    ENCODER_TERMS,
    LatencyData,
    as_features,
    cost_terms,
    normalized_features,
)
from hat_edge.latency.fitting import (
    Boosted,
    Tree,
    accuracy_metrics,
    fit_boosted,
    fit_relative,
    independent_columns,
)
from hat_edge.latency.prior import PRIOR_STRENGTHS, Prior, fit_with_prior, prior_from_dict, term_names
from hat_edge.space import HAT_FEATURE_NORM, Arch

PREDICTOR_FORMAT = "hat-edge-predictor"
PREDICTOR_VERSION = 1
KINDS = ("default", "hat-mlp")
# HAT's latency normalisers for its three devices (ms), for reproducing HAT's numbers.
HAT_LAT_NORM = {"raspberrypi": 5000.0, "xeon": 300.0, "titanxp": 200.0}
MIN_ROWS = 5

X_t = Sequence[Arch] | np.ndarray


def _rows(a: np.ndarray | None, ix: np.ndarray) -> np.ndarray | None:
    """The rows `ix` of an optional per-row array (the split encoder/decoder timings may be absent)."""
    return None if a is None else a[ix]


def _t_quantile(p: float, dof: int) -> float:
    """Student-t quantile (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def _z(level: float) -> float:
    """Two-sided standard-normal quantile for a central interval of `level`."""
    # Acklam-free: bisection on erf is plenty for a handful of calls.
    lo, hi = 0.0, 10.0
    target = (1 + level) / 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class Predictor(ABC):
    """Common interface. `fit` returns self; durations are milliseconds."""

    kind: str = ""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self._resid_log: np.ndarray | None = None  # log(y / pred) of held-out (or train) rows

    # ---- fitting ----
    def fit(
        self,
        X: X_t,
        y_ms: Sequence[float] | np.ndarray,
        *,
        encoder_ms: Sequence[float] | np.ndarray | None = None,
        decoder_ms: Sequence[float] | np.ndarray | None = None,
        device: str | None = None,
    ) -> "Predictor":
        """Fit on archs (list of `Arch`) or HAT features ((n, 10) array) and their latency.

        encoder_ms / decoder_ms: the split of y_ms when known (the default predictor uses it).
        """
        data = LatencyData.from_arrays(X, y_ms, encoder_ms, decoder_ms)
        return self.fit_data(data, device=device)

    def fit_data(self, data: LatencyData, device: str | None = None) -> "Predictor":
        if data.latency_ms is None:
            raise UserError(f"{data.source}: no latency column to fit on")
        if len(data) < MIN_ROWS:
            raise UserError(f"{data.source}: {len(data)} rows, a predictor needs at least {MIN_ROWS}")
        self._fit(data)
        self.meta.update(
            device=device or self.meta.get("device") or "unknown",
            training_size=len(data),
            feature_set="arch" if data.archs is not None and self._uses_archs else "hat10",
            source=Path(data.source).name if data.source else "",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        self.meta.setdefault("cv", None)
        return self

    _uses_archs = False

    @abstractmethod
    def _fit(self, data: LatencyData) -> None: ...

    # ---- prediction ----
    def predict(self, X: X_t) -> np.ndarray:
        """(n,) predicted latency in ms."""
        archs, F = as_features(X)
        return self._predict(archs, F)

    @abstractmethod
    def _predict(self, archs: Sequence[Arch] | None, F: np.ndarray) -> np.ndarray: ...

    def predict_interval(self, X: X_t, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) in ms: a central `level` interval for the measured latency of each arch."""
        archs, F = as_features(X)
        p = self._predict(archs, F)
        lo_q, hi_q = self._resid_quantiles(level)
        spread = self._point_spread(archs, F)  # (n,) sd of log prediction, 0 when unknown
        z = _z(level)
        down = np.sqrt(lo_q**2 + (z * spread) ** 2)
        up = np.sqrt(hi_q**2 + (z * spread) ** 2)
        return p * np.exp(-down), p * np.exp(up)

    def _resid_quantiles(self, level: float) -> tuple[float, float]:
        r = self._resid_log
        if r is not None and len(r) >= 3 and self._small_sample:
            # Few rows (a prior-based fit): a t interval on the RMS of the held-out log residuals,
            # pooled with the prior devices' noise band (worth `noise_rows` rows; a handful of a
            # new board's rows cannot show its skewed noise tail), the band scaled to `level`.
            q = _t_quantile((1 + level) / 2, max(1, len(r) - 1)) * float(np.sqrt(np.mean(r**2)))
            band = self._prior_noise()
            if band is None:
                return q, q
            k, n = self.noise_rows, len(r)
            f = _z(level) / _z(0.9)
            return tuple(math.sqrt((k * (f * b) ** 2 + n * q**2) / (k + n)) for b in band)  # type: ignore[return-value]
        if r is None or len(r) < 3:
            return 0.1, 0.1
        a = (1 - level) / 2
        return max(0.0, -float(np.quantile(r, a))), max(0.0, float(np.quantile(r, 1 - a)))

    def _point_spread(self, archs: Sequence[Arch] | None, F: np.ndarray) -> np.ndarray:
        return np.zeros(len(F))

    @property
    def _small_sample(self) -> int:
        return 0

    def _prior_noise(self) -> tuple[float, float] | None:
        return None

    # ---- files ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PREDICTOR_FORMAT,
            "version": PREDICTOR_VERSION,
            "kind": self.kind,
            "feature_set": self.meta.get("feature_set"),
            "device": self.meta.get("device"),
            "training_size": self.meta.get("training_size"),
            "cv": self.meta.get("cv"),
            "source": self.meta.get("source", ""),
            "created_at": self.meta.get("created_at"),
            "hat_edge_version": __version__,
            "params": self.params(),
            "residuals_log": None if self._resid_log is None else [float(v) for v in self._resid_log],
            "state": self._state(),
        }

    def save(self, path: str | Path) -> Path:
        if not self.meta.get("training_size"):
            raise UserError("cannot save a predictor that has not been fitted")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")
        return path

    @abstractmethod
    def params(self) -> dict[str, Any]: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...

    def summary(self) -> dict[str, Any]:
        """The saved header without the fitted state (for `--json` and logs)."""
        d = self.to_dict()
        d.pop("state")
        d.pop("residuals_log")
        return d


# --------------------------------------------------------------------------------------------
# The default: analytic cost model + cross-validated correction
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Linear:
    """Non-negative coefficients over a subset of columns of a term matrix."""

    cols: tuple[int, ...]
    coef: tuple[float, ...]

    def __call__(self, T: np.ndarray) -> np.ndarray:
        return T[:, list(self.cols)] @ np.asarray(self.coef)


class AnalyticPredictor(Predictor):
    """The default predictor (see the module docstring).

    huber_k: Huber threshold in robust standard deviations (None: plain least squares).
    folds: K of the internal cross-validation that picks the correction's size and estimates the
    error. rounds_grid: candidate numbers of boosted trees (0 = analytic model alone).
    min_rows_correction: below this many rows the correction is not tried (too few to learn it).
    bootstrap: size of the bootstrap ensemble of the analytic fit (per-point uncertainty).
    centre_max: 0.03 (default) lets `_centre` rescale the predictions by up to 3% to put more
    out-of-fold rows within 10% (HAT's acc10) where the noise is skewed; 0 leaves the fit's centre
    alone. The default was chosen over 0 with the training rows only: nested validation inside
    HAT's seed-0 training pools (bench/predictor_select.py: mean inner acc10 90.17 vs 89.93,
    RMSE +0.16%). It trades MAPE and within-5% share for acc10 (bench/results/predictor.json).
    prior: cost models of devices measured before (`latency.prior.Prior`); with one, each side's
    coefficients start from a non-negative combination of the prior devices' and are pulled
    towards it with strength `prior_strength` (None: chosen by cross-validation on the rows, see
    `latency.prior`), which makes 5-10 measurements of a new board enough. The prior is saved in
    the predictor file. With a prior and fewer than `small_n` rows, the interval's noise part is a
    Student-t interval on the out-of-fold log residuals' RMS (an empirical 5%/95% quantile of a
    handful of residuals is their min/max, too narrow), pooled with the prior devices' noise band
    (worth `noise_rows` rows). point_spread: "bootstrap" (the ensemble's spread, the default) or
    "posterior" (the penalised fit's Gaussian posterior; it ignores the non-negativity that bounds
    the real uncertainty and gave 1,000%-wide intervals at 5 rows). strengths / strength_rule: the
    candidates and the rule ("1se": the strongest prior within one standard error of the lowest
    cross-validated error; "min": the lowest) of the strength's cross-validation. prior_split: the
    low-rank start mixes each prior device's compute terms and its other terms with their own
    weights (`latency.prior.prior_basis`); False mixes the devices whole. The prior defaults
    (design ridge, strengths, rule, spread, split) were chosen on validation rows only:
    bench/predictor_transfer.py --select (rounds 1-4, bench/results/predictor_transfer_select*.json).
    """

    kind = "default"
    _uses_archs = True

    def __init__(
        self,
        huber_k: float | None = 4.0,
        folds: int = 5,
        rounds_grid: Sequence[int] = (0, 10, 25, 50, 100),
        learning_rate: float = 0.1,
        tree_depth: int = 2,
        min_rows_correction: int = 60,
        bootstrap: int = 20,
        centre_max: float = 0.03,
        centre_z: float = 2.0,
        seed: int = 0,
        prior: Prior | None = None,
        prior_strength: float | None = None,
        small_n: int = 30,
        noise_rows: int = 10,
        strengths: Sequence[float] = PRIOR_STRENGTHS,
        strength_rule: str = "1se",
        point_spread: str = "bootstrap",
        prior_split: bool = True,
    ) -> None:
        super().__init__()
        self.prior = prior if prior is not None and len(prior) else None
        if prior_strength is not None and not (math.isfinite(prior_strength) and prior_strength > 0):
            raise UserError(f"prior strength must be a positive number, got {prior_strength!r}")
        self.prior_strength = prior_strength
        self.small_n = int(small_n)
        self.noise_rows = int(noise_rows)
        self.strengths = tuple(sorted(float(v) for v in strengths))
        if not self.strengths or any(not (math.isfinite(v) and v >= 0) for v in self.strengths):
            raise UserError(f"prior strengths must be non-negative numbers (0: no prior), got {list(strengths)}")
        if point_spread not in ("bootstrap", "posterior"):
            raise UserError(f"point_spread must be 'bootstrap' or 'posterior', got {point_spread!r}")
        self.point_spread = point_spread
        if strength_rule not in ("min", "1se"):
            raise UserError(f"strength_rule must be 'min' or '1se', got {strength_rule!r}")
        self.strength_rule = strength_rule
        self.prior_split = bool(prior_split)
        self.lam: float | None = None  # the prior strength used by the last fit
        self._n_fit = 0
        self.huber_k = huber_k
        self.centre_max = float(centre_max)
        self.centre_z = float(centre_z)
        self.folds = int(folds)
        self.rounds_grid = tuple(sorted(int(r) for r in rounds_grid))
        self.learning_rate = float(learning_rate)
        self.tree_depth = int(tree_depth)
        self.min_rows_correction = int(min_rows_correction)
        self.bootstrap = int(bootstrap)
        self.seed = int(seed)
        # fitted state
        self.split = False
        self.feature_set = "hat10"
        self.enc: _Linear | None = None
        self.dec: _Linear | None = None
        self.joint: _Linear | None = None
        self.correction: Boosted | None = None
        self.rounds = 0
        self.scale = 1.0
        self.boot: list[tuple[_Linear | None, _Linear | None, _Linear | None]] = []
        self.cv_table: dict[int, float] = {}
        self.strength_cv: dict[str, float] = {}
        self.post_cov: dict[str, np.ndarray] = {}

    def params(self) -> dict[str, Any]:
        return {
            "huber_k": self.huber_k,
            "folds": self.folds,
            "rounds_grid": list(self.rounds_grid),
            "learning_rate": self.learning_rate,
            "tree_depth": self.tree_depth,
            "min_rows_correction": self.min_rows_correction,
            "bootstrap": self.bootstrap,
            "centre_max": self.centre_max,
            "centre_z": self.centre_z,
            "seed": self.seed,
            "prior_strength": self.prior_strength,
            "small_n": self.small_n,
            "noise_rows": self.noise_rows,
            "strengths": list(self.strengths),
            "strength_rule": self.strength_rule,
            "point_spread": self.point_spread,
            "prior_split": self.prior_split,
        }

    # ---- the analytic part ----
    def _terms(self, archs: Sequence[Arch] | None, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A model fitted on per-layer archs can still score feature rows (approximate products).
        return cost_terms(F, archs if self.feature_set == "arch" else None)

    @staticmethod
    def _joint_terms(TE: np.ndarray, TD: np.ndarray) -> np.ndarray:
        return np.concatenate([TE, TD[:, 1:]], axis=1)  # one constant column, not two

    def _fit_linear(self, T: np.ndarray, y: np.ndarray, side: str = "joint") -> _Linear:
        lam = self.lam if self.lam is not None else (self.prior_strength or 1.0)
        if self.prior is not None and lam > 0:
            c = fit_with_prior(T, y, self.prior.coef(side), lam, huber_k=self.huber_k,
                               side=side if self.prior_split else None)
            return _Linear(tuple(range(T.shape[1])), tuple(float(v) for v in c))
        cols = independent_columns(T)
        c = fit_relative(T[:, cols], y, huber_k=self.huber_k)
        return _Linear(tuple(cols), tuple(float(v) for v in c))

    def _fit_base(self, TE, TD, y, enc, dec):
        if self.split:
            return self._fit_linear(TE, enc, "encoder"), self._fit_linear(TD, dec, "decoder"), None
        return None, None, self._fit_linear(self._joint_terms(TE, TD), y, "joint")

    def _choose_strength(self, TE, TD, y, enc, dec, rng: np.random.Generator) -> tuple[float, dict[str, float]]:
        """The prior strength with the lowest cross-validated mean absolute log error of the
        analytic part (leave-one-out below 13 rows, else `folds`-fold)."""
        n = len(y)
        k = n if n <= 12 else min(self.folds, n)
        folds = np.array_split(rng.permutation(n), k)
        errs: dict[str, float] = {}
        per_row: dict[float, np.ndarray] = {}
        for lam in self.strengths:
            self.lam = lam
            pred = np.zeros(n)
            for fold in folds:
                rest = np.setdiff1d(np.arange(n), fold)
                m = self._fit_base(TE[rest], TD[rest], y[rest], _rows(enc, rest), _rows(dec, rest))
                pred[fold] = self._base(m, TE[fold], TD[fold])
            per_row[lam] = np.abs(np.log(pred / y))
            errs[repr(lam)] = float(per_row[lam].mean())
        best = min(self.strengths, key=lambda v: errs[repr(v)])  # ties: the weaker prior
        if self.strength_rule == "1se":
            # The strongest prior whose error is within one standard error of the best (a handful
            # of held-out rows cannot tell close strengths apart; the simpler model wins).
            se = float(per_row[best].std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
            best = max(v for v in self.strengths if errs[repr(v)] <= errs[repr(best)] + se)
        return float(best), errs

    def _base(self, models, TE, TD) -> np.ndarray:
        e, d, j = models
        if j is not None:
            out = j(self._joint_terms(TE, TD))
        else:
            out = e(TE) + d(TD)
        return np.maximum(out, 1e-9)

    # ---- fit ----
    def _fit(self, data: LatencyData) -> None:
        y = data.latency_ms
        assert y is not None
        self.feature_set = "arch" if data.archs is not None else "hat10"
        self.split = data.encoder_ms is not None and data.decoder_ms is not None
        self._resid_log = None
        enc, dec = data.encoder_ms, data.decoder_ms
        TE, TD = self._terms(data.archs, data.features)
        Z = normalized_features(data.features)
        n = len(y)
        rng = np.random.default_rng(self.seed)
        self._n_fit = n
        self.strength_cv = {}
        if self.prior is not None:
            if self.prior_strength is not None:
                self.lam = float(self.prior_strength)
            else:
                self.lam, self.strength_cv = self._choose_strength(TE, TD, y, enc, dec, rng)

        # K-fold CV inside the training rows: out-of-fold predictions for every candidate size
        # of the correction; pick the size with the lowest out-of-fold error.
        grid = [r for r in self.rounds_grid if r == 0 or n >= self.min_rows_correction] or [0]
        k = min(self.folds, n)
        oof = None
        if k >= 2:
            perm = rng.permutation(n)
            oof = np.zeros((len(grid), n))
            for fold in np.array_split(perm, k):
                rest = np.setdiff1d(np.arange(n), fold)
                m = self._fit_base(TE[rest], TD[rest], y[rest], _rows(enc, rest), _rows(dec, rest))
                base_rest = self._base(m, TE[rest], TD[rest])
                base_fold = self._base(m, TE[fold], TD[fold])
                if max(grid) > 0:
                    gb = self._fit_correction(Z[rest], np.log(y[rest] / base_rest), max(grid))
                    staged = gb.staged(Z[fold])
                    for gi, r in enumerate(grid):
                        oof[gi, fold] = base_fold * np.exp(staged[r])
                else:
                    oof[0, fold] = base_fold
            errs = [self._cv_error(oof[gi], y) for gi in range(len(grid))]
            self.cv_table = {r: float(e) for r, e in zip(grid, errs)}
            best = int(np.argmin(errs))
            self.rounds = grid[best]
            self.scale = self._centre(oof[best], y)
            oof_best = self.scale * oof[best]
            self._resid_log = np.log(y / oof_best)
            self.meta["cv"] = {
                "folds": k,
                "note": "out-of-fold predictions of the model-selection cross-validation",
                **accuracy_metrics(oof_best, y),
            }
        else:
            self.rounds = 0
            self.scale = 1.0
            self.meta["cv"] = None

        # Final fit on all rows.
        models = self._fit_base(TE, TD, y, enc, dec)
        self.enc, self.dec, self.joint = models
        base = self._base(models, TE, TD)
        self.correction = (
            self._fit_correction(Z, np.log(y / base), self.rounds) if self.rounds > 0 else None
        )
        if self._resid_log is None:
            # No CV (very few rows): in-sample residuals, widened for the parameters fitted.
            p = self._predict(data.archs, data.features)
            r = np.log(y / p)
            ncoef = sum(len(m.cols) for m in models if m is not None)
            self._resid_log = r * math.sqrt(n / max(1, n - ncoef)) if n > ncoef else r * 3

        # With a prior: the coefficients' posterior covariance (Gaussian approximation of the
        # penalised fit), for a per-point spread that widens away from the measured rows.
        self.post_cov = {}
        if self.prior is not None and self.lam and self.point_spread == "posterior":
            sig2 = float(np.mean(self._resid_log**2)) if self._resid_log is not None else 0.01
            sides = (("encoder", TE, enc), ("decoder", TD, dec)) if self.split else (
                ("joint", self._joint_terms(TE, TD), y),)
            for side, T, t in sides:
                Ar = T / t[:, None]
                share = Ar.mean(axis=0)
                sc = np.where(share > 0, share, 1.0)
                H = Ar.T @ Ar + self.lam * np.diag(sc**2)
                self.post_cov[side] = sig2 * np.linalg.pinv(H)

        # Bootstrap ensemble of the analytic part: how much the fit itself could move.
        self.boot = []
        for _ in range(self.bootstrap):
            ix = rng.integers(0, n, n)
            self.boot.append(self._fit_base(TE[ix], TD[ix], y[ix], _rows(enc, ix), _rows(dec, ix)))

    def _fit_correction(self, Z: np.ndarray, target: np.ndarray, rounds: int) -> Boosted:
        min_leaf = max(8, len(target) // 25)
        return fit_boosted(Z, target, rounds, lr=self.learning_rate, depth=self.tree_depth, min_leaf=min_leaf)

    def _centre(self, oof: np.ndarray, y: np.ndarray) -> float:
        """A scale within +-centre_max that puts the most out-of-fold predictions within 10%.

        Measurement noise on a shared or throttling device is skewed (runs are slowed, never
        sped up), so the least-squares centre is not where the most predictions land within 10%
        of the measurement (HAT's accuracy criterion). The scale is a one-parameter "maximum
        consensus" step on held-out predictions, bounded, and kept only when the rows it brings
        inside the 10% band outnumber the rows it pushes out by `centre_z` binomial standard
        deviations; otherwise 1.
        """
        if self.centre_max <= 0:
            return 1.0
        grid = np.round(np.arange(1 - self.centre_max, 1 + self.centre_max + 1e-9, 0.0025), 4)
        inside = np.abs(grid[:, None] * oof[None, :] - y[None, :]) <= 0.1 * y[None, :]  # (G, n)
        counts = inside.sum(axis=1)
        cands = grid[counts == counts.max()]
        s = float(cands[np.argmin(np.abs(cands - 1))])
        at_one = np.abs(oof - y) <= 0.1 * y
        at_s = inside[int(np.argmin(np.abs(grid - s)))]
        gained, lost = int((at_s & ~at_one).sum()), int((~at_s & at_one).sum())
        if gained - lost >= max(1.0, self.centre_z * math.sqrt(gained + lost)):
            return s
        return 1.0

    @property
    def _small_sample(self) -> int:
        return int(self.prior is not None and 0 < self._n_fit < self.small_n)

    def _prior_noise(self) -> tuple[float, float] | None:
        return None if self.prior is None else self.prior.noise_band()

    @staticmethod
    def _cv_error(pred: np.ndarray, y: np.ndarray) -> float:
        # Mean absolute log error: relative (like acc10 / MAPE), symmetric, and continuous.
        return float(np.mean(np.abs(np.log(pred / y))))

    # ---- predict ----
    def _predict(self, archs: Sequence[Arch] | None, F: np.ndarray) -> np.ndarray:
        if self.enc is None and self.joint is None:
            raise UserError("predictor is not fitted")
        TE, TD = self._terms(archs, F)
        p = self._base((self.enc, self.dec, self.joint), TE, TD)
        if self.correction is not None:
            p = p * np.exp(self.correction.predict(normalized_features(F), self.rounds))
        return p * self.scale

    def _point_spread(self, archs: Sequence[Arch] | None, F: np.ndarray) -> np.ndarray:
        if self.post_cov:
            TE, TD = self._terms(archs, F)
            p = self._base((self.enc, self.dec, self.joint), TE, TD)
            mats = {"encoder": TE, "decoder": TD, "joint": self._joint_terms(TE, TD)}
            var = sum(np.einsum("ij,jk,ik->i", mats[k], C, mats[k]) for k, C in self.post_cov.items())
            return np.sqrt(np.maximum(var, 0.0)) / p  # sd of the log prediction (delta method)
        if len(self.boot) < 2:
            return np.zeros(len(F))
        TE, TD = self._terms(archs, F)
        logs = np.stack([np.log(self._base(m, TE, TD)) for m in self.boot])  # (B, n)
        return logs.std(axis=0)

    def breakdown(self, X: X_t) -> dict[str, np.ndarray]:
        """Per-term contribution (ms) of the analytic part for each row: what the device pays for."""
        archs, F = as_features(X)
        TE, TD = self._terms(archs, F)
        out: dict[str, np.ndarray] = {}
        if self.joint is not None:
            names = term_names("joint")
            T = self._joint_terms(TE, TD)
            for c, v in zip(self.joint.cols, self.joint.coef):
                out[names[c]] = T[:, c] * v
        else:
            for names, T, m in ((ENCODER_TERMS, TE, self.enc), (DECODER_TERMS, TD, self.dec)):
                for c, v in zip(m.cols, m.coef):
                    out[names[c]] = T[:, c] * v
        return out

    # ---- state ----
    def _state(self) -> dict[str, Any]:
        lin = lambda m: None if m is None else {"cols": list(m.cols), "coef": list(m.coef)}  # noqa: E731
        return {
            "feature_set": self.feature_set,
            "split": self.split,
            "encoder": lin(self.enc),
            "decoder": lin(self.dec),
            "joint": lin(self.joint),
            "encoder_terms": list(ENCODER_TERMS),
            "decoder_terms": list(DECODER_TERMS),
            "rounds": self.rounds,
            "scale": self.scale,
            "cv_mean_abs_log_error": {str(k): v for k, v in self.cv_table.items()},
            "correction": None if self.correction is None else {
                "lr": self.correction.lr, "trees": [t.to_dict() for t in self.correction.trees]},
            "bootstrap": [[lin(m) for m in b] for b in self.boot],
            "prior": None if self.prior is None else self.prior.to_dict(),
            "prior_strength_used": self.lam if self.prior is not None else None,
            "prior_strength_cv": dict(self.strength_cv) if self.prior is not None else None,
            "n_fit": self._n_fit,
            "posterior_cov": {k: v.tolist() for k, v in self.post_cov.items()},
        }

    def _load_state(self, s: dict[str, Any]) -> None:
        if list(s["encoder_terms"]) != list(ENCODER_TERMS) or list(s["decoder_terms"]) != list(DECODER_TERMS):
            raise UserError("predictor file was written with other cost terms; refit it")
        lin = lambda d: None if d is None else _Linear(tuple(d["cols"]), tuple(d["coef"]))  # noqa: E731
        self.feature_set = s["feature_set"]
        self.split = bool(s["split"])
        self.enc, self.dec, self.joint = lin(s["encoder"]), lin(s["decoder"]), lin(s["joint"])
        self.rounds = int(s["rounds"])
        self.scale = float(s.get("scale", 1.0))
        self.cv_table = {int(k): float(v) for k, v in s.get("cv_mean_abs_log_error", {}).items()}
        c = s.get("correction")
        self.correction = None if c is None else Boosted(tuple(Tree.from_dict(t) for t in c["trees"]), float(c["lr"]))
        self.boot = [tuple(lin(m) for m in b) for b in s.get("bootstrap", [])]  # type: ignore[misc]
        p = s.get("prior")
        self.prior = None if p is None else prior_from_dict(p, "field 'state.prior'")
        self.lam = None if s.get("prior_strength_used") is None else float(s["prior_strength_used"])
        self.strength_cv = dict(s.get("prior_strength_cv") or {})
        self._n_fit = int(s.get("n_fit", 0))
        sizes = {"encoder": len(ENCODER_TERMS), "decoder": len(DECODER_TERMS),
                 "joint": len(ENCODER_TERMS) + len(DECODER_TERMS) - 1}
        self.post_cov = {}
        for k, v in (s.get("posterior_cov") or {}).items():
            C = np.asarray(v, float)
            if k not in sizes or C.shape != (sizes[k], sizes[k]) or not np.isfinite(C).all():
                raise ValueError(f"state.posterior_cov.{k} is not a finite {sizes.get(k, '?')}-square matrix")
            self.post_cov[k] = C


# --------------------------------------------------------------------------------------------
# HAT's MLP
# --------------------------------------------------------------------------------------------
def nice_ceiling(x: float) -> float:
    """x rounded up to two significant digits (12841 -> 13000, 488 -> 490)."""
    if x <= 0:
        return 1.0
    mag = 10 ** (math.floor(math.log10(x)) - 1)
    return float(math.ceil(x / mag - 1e-9) * mag)


class HatMLP(Predictor):
    """HAT's MLP latency predictor (see the module docstring).

    lat_norm: latency normaliser in ms (HAT: 5000 Pi, 300 Xeon, 200 GPU); None: the largest
    training latency rounded up to two significant digits. steps etc.: HAT's defaults; tests
    may use fewer steps.
    """

    kind = "hat-mlp"

    def __init__(
        self,
        lat_norm: float | None = None,
        steps: int = 5000,
        batch_size: int = 128,
        lr: float = 1e-5,
        hidden_dim: int = 400,
        hidden_layers: int = 3,
        seed: int = 0,
        log_every: int = 100,
    ) -> None:
        super().__init__()
        self.lat_norm = lat_norm
        self.steps = int(steps)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.hidden_dim = int(hidden_dim)
        self.hidden_layers = int(hidden_layers)
        self.seed = int(seed)
        self.log_every = int(log_every)
        self.net = None
        self.loss_history: list[float] = []  # mean training MSE (normalised) per log_every steps
        self.progress: Callable[[int], None] | None = None

    def params(self) -> dict[str, Any]:
        return {
            "lat_norm": self.lat_norm,
            "feature_norm": list(HAT_FEATURE_NORM),
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "hidden_dim": self.hidden_dim,
            "hidden_layers": self.hidden_layers,
            "seed": self.seed,
        }

    def _build(self):
        import torch.nn as nn

        # HAT's Net: first layer 10 -> h, `hidden_layers` more h -> h, then h -> 1; ReLU between.
        layers: list[nn.Module] = [nn.Linear(len(HAT_FEATURE_NORM), self.hidden_dim), nn.ReLU()]
        for _ in range(self.hidden_layers):
            layers += [nn.Linear(self.hidden_dim, self.hidden_dim), nn.ReLU()]
        layers.append(nn.Linear(self.hidden_dim, 1))
        return nn.Sequential(*layers)

    def _fit(self, data: LatencyData) -> None:
        import torch

        y = data.latency_ms
        assert y is not None
        if self.lat_norm is None:
            self.lat_norm = nice_ceiling(float(y.max()))
        x = torch.tensor(normalized_features(data.features), dtype=torch.float32)  # (n, 10)
        t = torch.tensor(y / self.lat_norm, dtype=torch.float32)  # (n,)
        n = len(y)
        bs = min(self.batch_size, n)
        batches = random.Random(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self._build()
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        loss_fn = torch.nn.MSELoss()
        self.loss_history = []
        acc = 0.0
        for step in range(self.steps):
            b = torch.tensor(batches.sample(range(n), k=bs))
            loss = loss_fn(net(x[b]).squeeze(1), t[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            acc += loss.item()
            if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
                self.loss_history.append(acc / ((step % self.log_every) + 1))
                acc = 0.0
                if self.progress is not None:
                    self.progress(step + 1)
        self.net = net.eval()
        # HAT's MLP has no uncertainty; the interval uses its training residuals (optimistic).
        self._resid_log = np.log(y / np.maximum(self._predict(None, data.features), 1e-9))

    def _predict(self, archs: Sequence[Arch] | None, F: np.ndarray) -> np.ndarray:
        import torch

        if self.net is None:
            raise UserError("predictor is not fitted")
        with torch.no_grad():
            x = torch.tensor(normalized_features(F), dtype=torch.float32)
            out = self.net(x).squeeze(1).double().numpy() * self.lat_norm
        return out

    def _state(self) -> dict[str, Any]:
        assert self.net is not None
        tensors = {}
        for k, v in self.net.state_dict().items():
            a = v.detach().cpu().numpy().astype("<f4")
            tensors[k] = {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}
        return {"dtype": "float32-le-base64", "tensors": tensors, "loss_history": self.loss_history}

    def _load_state(self, s: dict[str, Any]) -> None:
        import torch

        net = self._build()
        sd = {}
        for k, v in s["tensors"].items():
            a = np.frombuffer(base64.b64decode(v["data"]), dtype="<f4").reshape(v["shape"])
            sd[k] = torch.from_numpy(a.copy())
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"hat-mlp weights do not match its params ({str(e).splitlines()[0]})") from None
        self.net = net.eval()
        self.loss_history = list(s.get("loss_history", []))


# --------------------------------------------------------------------------------------------
# Factory, loading, cross-validation
# --------------------------------------------------------------------------------------------
_CLASSES: dict[str, type[Predictor]] = {"default": AnalyticPredictor, "hat-mlp": HatMLP}


def make_predictor(kind: str = "default", **params: Any) -> Predictor:
    """A fresh predictor of `kind` ("default" or "hat-mlp"); params go to its constructor."""
    if kind not in _CLASSES:
        raise UserError(f"unknown predictor kind '{kind}', allowed: {', '.join(KINDS)}")
    return _CLASSES[kind](**params)


def load_predictor(path: str | Path) -> Predictor:
    path = Path(path)
    try:
        doc = json.loads(read_text(path, error=UserError))
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a predictor file ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != PREDICTOR_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise UserError(f"{path}: field 'format' is {got!r}, expected '{PREDICTOR_FORMAT}'")
    if doc.get("version") != PREDICTOR_VERSION:
        raise UserError(f"{path}: field 'version' is {doc.get('version')!r}, this hat-edge reads version {PREDICTOR_VERSION}")
    kind = doc.get("kind")
    if kind not in _CLASSES:
        raise UserError(f"{path}: field 'kind' is {kind!r}, allowed: {', '.join(KINDS)}")
    params = dict(doc.get("params") or {})
    params.pop("feature_norm", None)
    try:
        pred = _CLASSES[kind](**params)
        pred._load_state(doc["state"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise UserError(f"{path}: damaged predictor file ({e.__class__.__name__}: {e})") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    pred.meta = {k: doc.get(k) for k in ("feature_set", "device", "training_size", "cv", "source", "created_at")}
    r = doc.get("residuals_log")
    pred._resid_log = None if r is None else np.asarray(r, float)
    return pred


@dataclass(frozen=True, eq=False)
class CVResult:
    metrics: dict[str, float]
    oof_ms: np.ndarray  # (n,) out-of-fold prediction of every row
    folds: int


def cross_validate(
    kind: str,
    data: LatencyData,
    folds: int = 5,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    on_fold: Callable[[int], None] | None = None,
) -> CVResult:
    """K-fold cross-validation of a predictor kind on `data` (shuffled with `seed`)."""
    if data.latency_ms is None:
        raise UserError(f"{data.source}: no latency column to evaluate against")
    n = len(data)
    if folds < 2 or folds > n:
        raise UserError(f"--folds must be between 2 and the number of rows ({n}), got {folds}")
    perm = np.random.default_rng(seed).permutation(n)
    oof = np.zeros(n)
    for i, fold in enumerate(np.array_split(perm, folds)):
        rest = np.setdiff1d(np.arange(n), fold)
        pred = make_predictor(kind, **(params or {})).fit_data(data.subset(rest))
        oof[fold] = pred.predict(data.subset(fold).X)
        if on_fold is not None:
            on_fold(i + 1)
    return CVResult(accuracy_metrics(oof, data.latency_ms), oof, folds)


__all__ = [
    "Predictor",
    "AnalyticPredictor",
    "HatMLP",
    "make_predictor",
    "load_predictor",
    "cross_validate",
    "CVResult",
    "KINDS",
    "HAT_LAT_NORM",
    "PREDICTOR_FORMAT",
    "PREDICTOR_VERSION",
    "nice_ceiling",
]
