"""Prior knowledge for a new board's latency predictor: what the boards already measured teach.

A *prior* is a set of per-device cost models: for each device measured before, the non-negative
cost per unit of every analytic cost term (`features.ENCODER_TERMS`, `features.DECODER_TERMS`),
fitted on that device's whole latency dataset. hat-edge ships one built from HAT's three measured
datasets (Raspberry Pi, Xeon, TITAN Xp; MIT licence, `assets/latency_prior/`); users build their
own from HAT-format CSVs or their stores (`prior_from_data`, `build_prior`,
`scripts/build_latency_prior.py`).

Transfer (`fit_with_prior`), for one side (encoder or decoder) with cost terms T (n, p), measured
y (n,) and the prior devices' coefficients C (K, p):

1. Low-rank start: the new device is first modelled as a non-negative combination of the prior
   devices' cost models, each split into its matmul (`COMPUTE_TERMS`) and its other costs:
   y ~ sum_k (a_k T C_k^compute + b_k T C_k^other). 2K weights fix the scale and the balance of
   matmul work and fixed, per-layer and per-head costs from a handful of rows, so a GPU (launch
   overheads) is within reach of CPU priors (`prior_basis`).
2. Correction: the per-term coefficients c >= 0 are then fitted to the new rows with a Gaussian
   prior centred on c0 (step 1's fit): minimise sum_i ((T_i c - y_i) / y_i)^2 (Huber-reweighted) +
   lam * sum_j ((c_j - c0_j) * s_j)^2, where s_j = mean_i(T_ij / y_i) turns a coefficient into the
   share of the latency that term explains. So `lam` says how many rows' worth of evidence the prior
   is worth per term, in units of "share of latency"; the data term grows with the number of rows,
   so the prior fades as measurements accumulate.

`lam` (the prior strength) is chosen per fit by cross-validation on the new device's own rows
(leave-one-out below 13 rows) from `PRIOR_STRENGTHS`, 0 (no prior) included, unless fixed: the
strongest prior whose error is within one standard error of the lowest (the predictor's default
rule), so the prior holds while a few rows cannot tell it from a free fit and fades as they can.

Choosing what to measure first (`choose_informative`): greedy expected reduction of the total
predictive variance over a candidate pool (I-optimal design), first (min(K, n // 2) rows, K prior
devices) for the low-rank start's K weights, then for the per-term linear model, with the prior
devices' mean prediction standing in for the still-unknown latency. Chosen over random rows, a
D-optimal (extremes-first) design and other sizes of the first phase by leave-one-device-out on
HAT's training rows only (bench/predictor_transfer.py `--select`, rounds 1-3).

Prior files are untrusted input: `load_prior` validates every field and raises a one-line
`UserError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hat_edge.errors import UserError
from hat_edge.latency.features import DECODER_TERMS, ENCODER_TERMS, LatencyData, cost_terms
from hat_edge.latency.fitting import fit_relative, huber_weights, independent_columns, nnls
from hat_edge.runtime.files import read_text
from hat_edge.space import Arch

PRIOR_FORMAT = "hat-edge-latency-prior"
PRIOR_VERSION = 1
# Candidate prior strengths (lam above); chosen by cross-validation on the new device's rows.
# 0 is "no prior" (the plain fit), so a prior that does not fit the new board can be turned down.
PRIOR_STRENGTHS = (0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
# Design ridge of `choose_informative` in standardised term units (chosen with the training rows
# only, see the module docstring).
DESIGN_RIDGE = 10.0
PACKAGED_PRIOR = Path(__file__).resolve().parents[1] / "assets" / "latency_prior" / "hat_wmt14ende.json"
MAX_PRIOR_DEVICES = 256
MAX_PRIOR_BYTES = 4 * 1024 * 1024
# A cost coefficient is milliseconds per unit of its term; the largest real ones are ~40 (a GPU's
# per-layer launch cost). The cap keeps sums of coefficients finite.
MAX_COEF = 1e6


@dataclass(frozen=True)
class DevicePrior:
    """One measured device: its cost per unit of every term (non-negative; 0 = not used)."""

    name: str
    encoder: tuple[float, ...]  # len(ENCODER_TERMS)
    decoder: tuple[float, ...]  # len(DECODER_TERMS)
    rows: int = 0
    source: str = ""
    # 5% and 95% quantiles of log(measured / fitted) over its rows: the device's noise band
    # (skewed: interference only slows a run). None when unknown.
    noise: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "source": self.source,
                "encoder": list(self.encoder), "decoder": list(self.decoder),
                "noise_log_q05_q95": None if self.noise is None else list(self.noise)}


@dataclass(frozen=True)
class Prior:
    """Prior devices, in order. `notice`: licence/attribution text carried with the numbers."""

    devices: tuple[DevicePrior, ...]
    notice: str = ""
    origin: str = ""  # where it was read from (messages only)

    def __len__(self) -> int:
        return len(self.devices)

    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def without(self, name: str) -> "Prior":
        """The prior minus one device (a device's own entry must not be its prior)."""
        return Prior(tuple(d for d in self.devices if d.name != name), self.notice, self.origin)

    def for_device(self, name: str) -> "Prior | None":
        """The prior for device `name`: without its own entry; None when nothing else is left."""
        rest = self.without(name)
        return rest if len(rest) else None

    def merged(self, other: "Prior") -> "Prior":
        seen = set(self.names())
        devs = self.devices + tuple(d for d in other.devices if d.name not in seen)
        notice = "\n\n".join(n for n in (self.notice, other.notice) if n)
        return Prior(devs, notice, self.origin or other.origin)

    def noise_band(self) -> tuple[float, float] | None:
        """(down, up) >= 0: the mean of the prior devices' 5%/95% log-residual quantiles."""
        bands = [d.noise for d in self.devices if d.noise is not None]
        if not bands:
            return None
        return max(0.0, -float(np.mean([b[0] for b in bands]))), max(0.0, float(np.mean([b[1] for b in bands])))

    def coef(self, side: str) -> np.ndarray:
        """(K, p) coefficients of `side`: "encoder", "decoder" or "joint" (columns as `term_names`)."""
        E = np.array([d.encoder for d in self.devices], float).reshape(-1, len(ENCODER_TERMS))
        D = np.array([d.decoder for d in self.devices], float).reshape(-1, len(DECODER_TERMS))
        if side == "encoder":
            return E
        if side == "decoder":
            return D
        J = np.concatenate([E, D[:, 1:]], axis=1)
        J[:, 0] += D[:, 0]  # the joint model has one constant column for both constants
        return J

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PRIOR_FORMAT,
            "version": PRIOR_VERSION,
            "encoder_terms": list(ENCODER_TERMS),
            "decoder_terms": list(DECODER_TERMS),
            "notice": self.notice,
            "devices": [d.to_dict() for d in self.devices],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


# --------------------------------------------------------------------------------------------
# Reading (untrusted) and building
# --------------------------------------------------------------------------------------------
def prior_from_dict(doc: Any, where: str) -> Prior:
    """Validate a prior document; every failure is one line naming `where` and the field."""

    def bad(fld: str, msg: str) -> UserError:
        return UserError(f"{where}: field '{fld}' {msg}")

    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a JSON object (a hat-edge latency prior), got {type(doc).__name__}")
    if doc.get("format") != PRIOR_FORMAT:
        raise bad("format", f"is {_short(doc.get('format'))}, expected '{PRIOR_FORMAT}'")
    if doc.get("version") != PRIOR_VERSION:
        raise bad("version", f"is {_short(doc.get('version'))}, this hat-edge reads version {PRIOR_VERSION}")
    for key, names in (("encoder_terms", ENCODER_TERMS), ("decoder_terms", DECODER_TERMS)):
        if doc.get(key) != list(names):
            raise bad(key, f"does not list this hat-edge's cost terms ({', '.join(names)}); rebuild the prior")
    notice = doc.get("notice", "")
    if not isinstance(notice, str) or len(notice) > 20000:
        raise bad("notice", "must be a string (at most 20,000 characters)")
    devs = doc.get("devices")
    if not isinstance(devs, list) or not devs:
        raise bad("devices", "must be a non-empty list of device cost models")
    if len(devs) > MAX_PRIOR_DEVICES:
        raise bad("devices", f"has {len(devs)} entries, at most {MAX_PRIOR_DEVICES}")
    out: list[DevicePrior] = []
    seen: set[str] = set()
    for i, d in enumerate(devs):
        at = f"devices[{i}]"
        if not isinstance(d, dict):
            raise bad(at, "must be an object with name, encoder, decoder")
        name = d.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise bad(f"{at}.name", "must be a non-empty string (at most 200 characters)")
        if name in seen:
            raise bad(f"{at}.name", f"repeats device '{name}'")
        seen.add(name)
        rows = d.get("rows", 0)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise bad(f"{at}.rows", f"is {_short(rows)}, expected a non-negative integer")
        source = d.get("source", "")
        if not isinstance(source, str) or len(source) > 1000:
            raise bad(f"{at}.source", "must be a string (at most 1,000 characters)")
        vecs = []
        for key, names in (("encoder", ENCODER_TERMS), ("decoder", DECODER_TERMS)):
            v = d.get(key)
            if not isinstance(v, list) or len(v) != len(names):
                raise bad(f"{at}.{key}", f"must be a list of {len(names)} numbers (one per cost term)")
            for j, x in enumerate(v):
                if not _number_in(x, 0.0, MAX_COEF):
                    raise bad(f"{at}.{key}[{j}]", f"is {_short(x)}, expected a non-negative finite number "
                                                  f"at most {MAX_COEF:g} (ms per unit of '{names[j]}')")
            vecs.append(tuple(float(x) for x in v))
        if not any(vecs[0]) and not any(vecs[1]):
            raise bad(at, "has every coefficient 0 (a device that costs nothing)")
        noise = d.get("noise_log_q05_q95")
        if noise is not None:
            ok = (isinstance(noise, list) and len(noise) == 2
                  and _number_in(noise[0], -2.0, 0.0) and _number_in(noise[1], 0.0, 2.0))
            if not ok:
                raise bad(f"{at}.noise_log_q05_q95", f"is {_short(noise)}, expected [q05, q95] with -2 <= q05 <= 0 <= q95 <= 2")
            noise = (float(noise[0]), float(noise[1]))
        out.append(DevicePrior(name, vecs[0], vecs[1], rows, source, noise))
    return Prior(tuple(out), notice, where)


def _number_in(x: Any, lo: float, hi: float) -> bool:
    """x is a JSON number (not a bool) with lo <= x <= hi; a 400-digit integer is out of range, not
    an OverflowError."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        f = float(x)
    except OverflowError:
        return False
    return math.isfinite(f) and lo <= f <= hi


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def load_prior(path: str | Path) -> Prior:
    """Read and validate a prior JSON file (`Prior.save`'s format)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PRIOR_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes, a latency prior is at most {MAX_PRIOR_BYTES}")
    except OSError:
        pass  # read_text names the problem
    text = read_text(path, error=UserError)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, nesting too deep
        raise UserError(f"{path}: not a readable JSON prior ({e.__class__.__name__})") from None
    return prior_from_dict(doc, str(path))


def packaged_prior() -> Prior:
    """The prior shipped with hat-edge (HAT's three devices, MIT; see its `notice`)."""
    return load_prior(PACKAGED_PRIOR)


def device_prior_from_data(data: LatencyData, name: str, huber_k: float | None = 4.0) -> DevicePrior:
    """Fit one device's cost model on all its rows (analytic terms only, no correction).

    With an encoder/decoder split each side is fitted on its own; otherwise the joint fit's
    coefficients are split back onto the two sides (the joint constant goes to the encoder).
    Terms dropped as linearly dependent on the data (e.g. HAT's fixed encoder depth) get 0: their
    cost is carried by the term kept in their place.
    """
    if data.latency_ms is None or len(data) < 5:
        raise UserError(f"{data.source}: a device prior needs at least 5 rows with latencies")
    TE, TD = cost_terms(data.features, data.archs)

    def fit(T: np.ndarray, y: np.ndarray) -> np.ndarray:
        cols = independent_columns(T)
        c = np.zeros(T.shape[1])
        c[cols] = fit_relative(T[:, cols], y, huber_k=huber_k)
        return c

    if data.encoder_ms is not None and data.decoder_ms is not None:
        ce, cd = fit(TE, data.encoder_ms), fit(TD, data.decoder_ms)
    else:
        cj = fit(np.concatenate([TE, TD[:, 1:]], axis=1), data.latency_ms)
        ce = cj[: len(ENCODER_TERMS)]
        cd = np.concatenate([[0.0], cj[len(ENCODER_TERMS):]])
    fitted = np.maximum(TE @ ce + TD @ cd, 1e-9)
    r = np.log(data.latency_ms / fitted)
    noise = (min(0.0, float(np.quantile(r, 0.05))), max(0.0, float(np.quantile(r, 0.95))))
    return DevicePrior(name, tuple(float(v) for v in ce), tuple(float(v) for v in cd), len(data),
                       Path(data.source).name if data.source else "", noise)


def build_prior(sources: Sequence[tuple[str, LatencyData]], notice: str = "") -> Prior:
    """A prior from (device name, its latency data) pairs."""
    names = [n for n, _ in sources]
    if len(set(names)) != len(names):
        raise UserError(f"device names of a prior must differ, got {', '.join(names)}")
    return Prior(tuple(device_prior_from_data(d, n) for n, d in sources), notice)


def prior_from_store(path: str | Path, min_rows: int = 5) -> Prior:
    """One device prior per (device, runtime, measurement settings) of a latency store with at
    least `min_rows` records (anchored records on their anchors' scale, as the predictor reads them).
    A device measured under one setting is named as in the store, else `device[runtime]#k`."""
    import json as _json

    from hat_edge.latency.store import LatencyStore

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such latency store")
    store = LatencyStore(path)
    try:
        groups: dict[tuple[str, str, str], list] = {}
        for r in store.records():
            groups.setdefault((r.device, r.runtime, _json.dumps(dict(r.settings), sort_keys=True)), []).append(r)
    finally:
        store.close()
    per_device: dict[str, int] = {}
    for dev, _, _ in groups:
        per_device[dev] = per_device.get(dev, 0) + 1
    devices = []
    for k, ((dev, runtime, _), recs) in enumerate(sorted(groups.items(), key=lambda kv: kv[0])):
        if len(recs) < min_rows:
            continue
        data = LatencyData.from_records(recs, f"{path} [{dev}]")
        name = dev if per_device[dev] == 1 else f"{dev}[{runtime}]#{k}"
        devices.append(device_prior_from_data(data, name))
    if not devices:
        raise UserError(f"{path}: no device with at least {min_rows} measurements to make a prior from")
    return Prior(tuple(devices), origin=str(path))


def resolve_priors(items: Sequence[str | Path], exclude: str | None = None) -> Prior | None:
    """Priors named on a command line, merged: "builtin" (the packaged prior), a prior JSON file,
    a latency CSV (HAT's or hat-edge's; one device named after the file), or a latency store
    (.sqlite: each device in it). `exclude`: the target device's own name, dropped from the prior.
    None when nothing is left."""
    from hat_edge.latency.features import read_latency_csv

    merged: Prior | None = None
    for item in items:
        if str(item) == "builtin":
            p = packaged_prior()
        elif str(item).lower().endswith((".sqlite", ".sqlite3", ".db")):
            p = prior_from_store(item)
        elif str(item).lower().endswith(".csv"):
            path = Path(item)
            p = Prior((device_prior_from_data(read_latency_csv(path), path.stem),), origin=str(path))
        else:
            p = load_prior(item)
        merged = p if merged is None else merged.merged(p)
    if merged is None:
        return None
    return merged.for_device(exclude) if exclude else (merged if len(merged) else None)


# --------------------------------------------------------------------------------------------
# Transfer fit
# --------------------------------------------------------------------------------------------
# Terms that are matmul work (multiply-adds). A device's costs per unit of these move together from
# one device to the next (a faster matmul unit speeds every matmul); the other terms (fixed,
# per-layer, per-head and elementwise costs) move together too, but not with the first group: a
# GPU's kernel launches cost far more per FLOP than a CPU's. So the low-rank start gives each prior
# device's two groups their own weights (`prior_basis`); chosen on validation rows only
# (bench/predictor_transfer.py --select --round 4).
COMPUTE_TERMS = frozenset({
    "enc_proj", "enc_ffn", "enc_attn",
    "dec_out", "dec_proj", "dec_ffn", "dec_self_attn", "dec_cross_len", "dec_cross_kv",
})


def term_names(side: str) -> tuple[str, ...]:
    """The cost terms of `side` ("encoder", "decoder" or "joint"), in column order."""
    if side == "encoder":
        return ENCODER_TERMS
    if side == "decoder":
        return DECODER_TERMS
    if side == "joint":
        return ENCODER_TERMS + DECODER_TERMS[1:]
    raise ValueError(f"side must be 'encoder', 'decoder' or 'joint', got {side!r}")


def prior_basis(C: np.ndarray, side: str | None = None) -> np.ndarray:
    """(B, p) coefficient vectors the low-rank start mixes: each prior device's compute terms and
    its other terms as two vectors (`COMPUTE_TERMS`), or each device whole when `side` is None."""
    C = np.asarray(C, float)
    if side is None:
        return C
    compute = np.array([n in COMPUTE_TERMS for n in term_names(side)])
    if len(compute) != C.shape[1]:
        raise ValueError(f"{C.shape[1]} coefficients for the {len(compute)} terms of side {side!r}")
    parts = [np.where(mask, c, 0.0) for c in C for mask in (compute, ~compute)]
    return np.array([v for v in parts if np.any(v > 0)]).reshape(-1, C.shape[1])


def prior_mean(T: np.ndarray, y: np.ndarray, C: np.ndarray, huber_k: float | None = 4.0,
               side: str | None = None) -> np.ndarray:
    """c0 = w B with w >= 0 the robust relative fit of y on the predictions T B_b of the prior
    basis B = `prior_basis(C, side)` (each device whole when `side` is None)."""
    B = prior_basis(C, side)
    P = T @ B.T  # (n, len(B))
    keep = np.flatnonzero(np.abs(P).sum(axis=0) > 0)
    w = np.zeros(len(B))
    if len(keep):
        w[keep] = fit_relative(P[:, keep], y, huber_k=huber_k)
    return w @ B


def fit_with_prior(
    T: np.ndarray,
    y: np.ndarray,
    C: np.ndarray,
    lam: float,
    huber_k: float | None = 4.0,
    iters: int = 20,
    side: str | None = None,
) -> np.ndarray:
    """Non-negative coefficients (p,) for one side; see the module docstring (steps 1 and 2).
    `side` ("encoder", "decoder", "joint") splits each prior device into its compute and other
    terms for step 1 (`prior_basis`); None mixes the devices whole."""
    T = np.asarray(T, float)
    y = np.asarray(y, float)
    c0 = prior_mean(T, y, C, huber_k, side)
    share = (T / y[:, None]).mean(axis=0)  # latency share per unit coefficient
    s = np.where(share > 0, share, 1.0)
    n = len(y)
    A = np.vstack([T / y[:, None], math.sqrt(lam) * np.diag(s)])
    b = np.concatenate([np.ones(n), math.sqrt(lam) * c0 * s])
    c = nnls(A, b)
    if huber_k is None:
        return c
    # Reweighted by hand, not scipy's least_squares(loss="huber") as in `fit_relative`: its loss
    # would apply to the prior's penalty rows too, and those must stay quadratic.
    w = np.ones(n)
    for _ in range(iters):
        w_new = huber_weights((T @ c) / y - 1.0, huber_k)
        if np.allclose(w_new, w, atol=1e-6):
            break
        w = w_new
        Aw, bw = A.copy(), b.copy()
        Aw[:n] *= w[:, None]
        bw[:n] *= w
        c = nnls(Aw, bw)
    return c


# --------------------------------------------------------------------------------------------
# Which archs to measure first
# --------------------------------------------------------------------------------------------
def choose_informative(
    X: Sequence[Arch] | np.ndarray,
    n: int,
    prior: Prior | None = None,
    ridge: float = DESIGN_RIDGE,
    already: Sequence[int] = (),
    lowrank: int | None = None,
) -> list[int]:
    """Indices of the `n` rows of a candidate pool X to measure first (greedy, in order).

    Each step takes the row whose measurement would most reduce the summed predictive variance
    of the encoder and decoder cost models over the whole pool (I-optimal design; Bayesian linear
    model with a ridge prior on standardised relative term columns). Relative: each row's terms are
    divided by the latency the prior devices predict for it (their mean, each device scaled to mean
    1), so the design is in the units the fit works in. Without a prior the plain term sum stands in.

    With a prior of K devices the design first pins down the low-rank start of the transfer fit
    (the weights of the K devices' predictions): the first min(K, total // 2) rows of the whole
    design (`already` included) are the I-optimal design for those K columns per side, the rest
    the I-optimal design for the per-term costs, given every row before. `lowrank` sets that count
    (0: the per-term design alone). Chosen over the per-term design alone on validation rows only
    (bench/predictor_transfer.py --select --round 3), when the start mixed the devices whole; round 4
    split the start into 2K weights (`prior_basis`) and kept this design (a split phase 1 is untried).
    `already`: pool rows measured before (they count as chosen and are not returned).
    """
    from hat_edge.latency.features import as_features

    archs, F = as_features(X)
    N = len(F)
    done = list(dict.fromkeys(int(i) for i in already))
    n = max(0, min(int(n), N - len(done)))
    TE, TD = cost_terms(F, archs)
    terms, low = [], []
    for T, side in ((TE, "encoder"), (TD, "decoder")):
        if prior is not None and len(prior):
            P = T @ prior.coef(side).T
            P = P[:, P.mean(axis=0) > 0]
            yh = (P / P.mean(axis=0)).mean(axis=1) if P.shape[1] else T.sum(axis=1)
            if P.shape[1]:
                low.append(_standardised(P / np.maximum(yh, 1e-12)[:, None]))
        else:
            yh = T.sum(axis=1)
        terms.append(_standardised(T / np.maximum(yh, 1e-12)[:, None]))
    k = len(prior) if prior is not None and low else 0
    if lowrank is None:
        lowrank = max(0, min(k, (len(done) + n) // 2) - len(done))
    first = _greedy_design(low, LOWRANK_RIDGE, min(int(lowrank), n), done) if low and lowrank > 0 else []
    return first + _greedy_design(terms, ridge, n - len(first), done + first)


# Ridge of the low-rank phase of `choose_informative` (K standardised columns per side: nearly an
# unregularised I-optimal design; only keeps the first step's inverse finite).
LOWRANK_RIDGE = 1e-3


def _standardised(A: np.ndarray) -> np.ndarray:
    sd = A.std(axis=0)
    return A[:, sd > 1e-12] / sd[sd > 1e-12]


def _greedy_design(mats: list[np.ndarray], ridge: float, n: int, already: Sequence[int]) -> list[int]:
    """Greedy I-optimal design: `n` rows, each reducing most the summed predictive variance over
    all rows of the linear models with design matrices `mats` (ridge prior), given `already`."""
    N = len(mats[0]) if mats else 0
    Hinv = [np.eye(A.shape[1]) / ridge for A in mats]

    def take(i: int) -> None:
        for k, A in enumerate(mats):
            a = A[i]
            Ha = Hinv[k] @ a
            Hinv[k] = Hinv[k] - np.outer(Ha, Ha) / (1.0 + a @ Ha)

    taken = np.zeros(N, dtype=bool)
    for i in already:
        if not taken[i]:
            taken[i] = True
            take(i)
    chosen: list[int] = []
    for _ in range(min(n, N - int(taken.sum()))):
        score = np.zeros(N)
        for A, Hi in zip(mats, Hinv):
            G = A @ Hi  # (N, p)
            # Reduction of sum_x var(x) from measuring row i: ||A Hinv a_i||^2 / (1 + a_i' Hinv a_i)
            num = np.zeros(N)
            for s in range(0, N, 2048):  # (N, N) in blocks: the pool may hold thousands of rows
                M = G[s:s + 2048] @ A.T
                num += (M**2).sum(axis=0)
            score += num / (1.0 + np.einsum("ij,ij->i", G, A))
        score[taken] = -np.inf
        i = int(np.argmax(score))
        chosen.append(i)
        taken[i] = True
        take(i)
    return chosen


__all__ = [
    "DevicePrior",
    "Prior",
    "PRIOR_FORMAT",
    "PRIOR_VERSION",
    "PRIOR_STRENGTHS",
    "PACKAGED_PRIOR",
    "load_prior",
    "prior_from_dict",
    "packaged_prior",
    "device_prior_from_data",
    "build_prior",
    "resolve_priors",
    "prior_from_store",
    "COMPUTE_TERMS",
    "term_names",
    "prior_basis",
    "prior_mean",
    "fit_with_prior",
    "choose_informative",
]
