"""What a latency predictor learns from: rows of (arch or HAT's 10 features, measured latency),
read from CSV files, and the analytic cost terms of an arch.

CSV inputs (one row per measured SubTransformer):
- HAT's latency CSV: the 10 feature columns (`FEATURE_NAMES`), `latency_mean_encoder`,
  `latency_mean_decoder` (ms; the target is their sum), optional std columns.
- hat-edge's own CSV: an `arch` column (an Arch as JSON, `Arch.to_json()`) and/or the 10 feature
  columns, a `latency_ms` (or `median_ms`) column, optional `encoder_ms` / `decoder_ms`. The
  output of `hat-edge predictor predict` keeps the input columns, so it reads back the same way.
Bad rows raise `UserError` naming the file, the data row (1 = first row after the header) and
the column, in one line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hat_edge.errors import UserError
from hat_edge.runtime.files import read_text
from hat_edge.space import FEATURE_NAMES, Arch, n_ende_layers

# The target, by column name, in order of preference.
LATENCY_COLUMNS = ("latency_ms", "median_ms")
HAT_ENCODER_COLUMN = "latency_mean_encoder"
HAT_DECODER_COLUMN = "latency_mean_decoder"
ARCH_COLUMN = "arch"
# qkv width of HAT's design spaces; the 10 averaged features do not carry it.
HAT_QKV_DIM = 512


@dataclass(frozen=True, eq=False)
class LatencyData:
    """Rows of a latency dataset. Arrays are numpy; durations in milliseconds.

    features: (n, 10) HAT features. archs: the per-layer Arch of each row when every row has one
    (richer cost terms), else None. latency_ms: (n,) target, None for predict-only input.
    encoder_ms / decoder_ms: (n,) split of the target when every row has it, else None.
    """

    features: np.ndarray
    latency_ms: np.ndarray | None
    encoder_ms: np.ndarray | None = None
    decoder_ms: np.ndarray | None = None
    archs: tuple[Arch, ...] | None = None
    source: str = ""
    columns: tuple[str, ...] = ()
    rows: tuple[dict[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def from_records(cls, recs: Sequence[Any], source: str) -> "LatencyData":
        """The rows of a latency store's records (`store.LatencyRecord`), anchored ones on their
        anchors' scale (`corrected_ms`); the encoder/decoder split when every record has one.
        A record whose latency is not a positive finite number is a UserError naming it (a store
        is a file anyone can edit)."""
        for i, r in enumerate(recs, start=1):
            ms = r.corrected_ms
            if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
                raise UserError(f"{source}: record {i}: median_ms is {r.median_ms!r} (drift factor "
                                f"{r.drift_factor:g}), expected a positive number")
        split = all(r.encoder_ms and r.decoder_ms and r.encoder_ms > 0 and r.decoder_ms > 0 for r in recs)
        archs = [r.arch for r in recs]
        return cls(
            features=np.array([r.features for r in recs], float),
            latency_ms=np.array([r.corrected_ms for r in recs], float),
            encoder_ms=np.array([r.corrected_split()[0] for r in recs], float) if split else None,
            decoder_ms=np.array([r.corrected_split()[1] for r in recs], float) if split else None,
            archs=tuple(archs) if all(a is not None for a in archs) else None,
            source=source,
        )

    @property
    def X(self) -> list[Arch] | np.ndarray:
        """What `Predictor.fit/predict` take: the archs when known, else the feature matrix."""
        return list(self.archs) if self.archs is not None else self.features

    def subset(self, idx: Sequence[int] | np.ndarray) -> "LatencyData":
        idx = np.asarray(idx, dtype=int)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return LatencyData(
            features=self.features[idx],
            latency_ms=pick(self.latency_ms),
            encoder_ms=pick(self.encoder_ms),
            decoder_ms=pick(self.decoder_ms),
            archs=None if self.archs is None else tuple(self.archs[i] for i in idx),
            source=self.source,
            columns=self.columns,
            rows=tuple(self.rows[i] for i in idx) if self.rows else (),
        )

    @classmethod
    def from_arrays(
        cls,
        X: Sequence[Arch] | np.ndarray,
        latency_ms: Sequence[float] | np.ndarray | None,
        encoder_ms: Sequence[float] | np.ndarray | None = None,
        decoder_ms: Sequence[float] | np.ndarray | None = None,
        source: str = "<arrays>",
    ) -> "LatencyData":
        archs, feats = as_features(X)
        y = None if latency_ms is None else _check_target(np.asarray(latency_ms, float), "latency_ms", source)
        enc = None if encoder_ms is None else _check_target(np.asarray(encoder_ms, float), "encoder_ms", source)
        dec = None if decoder_ms is None else _check_target(np.asarray(decoder_ms, float), "decoder_ms", source)
        for name, a in (("latency_ms", y), ("encoder_ms", enc), ("decoder_ms", dec)):
            if a is not None and len(a) != len(feats):
                raise UserError(f"{source}: {name} has {len(a)} values for {len(feats)} archs")
        return cls(feats, y, enc, dec, archs, source)


def as_features(X: Sequence[Arch] | np.ndarray) -> tuple[tuple[Arch, ...] | None, np.ndarray]:
    """(archs or None, (n, 10) features) from a list of Arch or an (n, 10) array."""
    if isinstance(X, np.ndarray) or (len(X) and not isinstance(X[0], Arch)):
        F = np.asarray(X, dtype=float)
        if F.ndim != 2 or F.shape[1] != len(FEATURE_NAMES):
            raise UserError(f"features must be an (n, {len(FEATURE_NAMES)}) array, got shape {F.shape}")
        return None, F
    archs = tuple(X)
    for a in archs:
        if not isinstance(a, Arch):
            raise UserError(f"expected a list of Arch or an (n, 10) feature array, got {type(a).__name__}")
    F = np.array([a.features() for a in archs], dtype=float).reshape(-1, len(FEATURE_NAMES))
    return archs, F


def _check_target(a: np.ndarray, name: str, source: str) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(a) | (a <= 0))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{source}: row {i + 1}: {name} is {float(a[i])!r}, expected a positive number of milliseconds")
    return a


# --------------------------------------------------------------------------------------------
# Reading CSV files
# --------------------------------------------------------------------------------------------
def read_latency_csv(path: str | Path, require_latency: bool = True) -> LatencyData:
    """Read a HAT latency CSV or a hat-edge latency CSV (see the module docstring)."""
    path = Path(path)
    text = read_text(path, error=UserError)
    reader = csv.DictReader(text.splitlines())
    columns = tuple(reader.fieldnames or ())
    if not columns:
        raise UserError(f"{path}: empty file, expected a header row")
    has_arch = ARCH_COLUMN in columns
    missing_feats = [c for c in FEATURE_NAMES if c not in columns]
    if missing_feats and not has_arch:
        raise UserError(
            f"{path}: missing column '{missing_feats[0]}' (need HAT's 10 feature columns "
            f"{', '.join(FEATURE_NAMES)} or an '{ARCH_COLUMN}' column)"
        )
    hat_target = HAT_ENCODER_COLUMN in columns or HAT_DECODER_COLUMN in columns
    target_col = next((c for c in LATENCY_COLUMNS if c in columns), None)
    if hat_target and target_col is None:
        for c in (HAT_ENCODER_COLUMN, HAT_DECODER_COLUMN):
            if c not in columns:
                raise UserError(f"{path}: missing column '{c}' (HAT's CSV needs both "
                                f"'{HAT_ENCODER_COLUMN}' and '{HAT_DECODER_COLUMN}')")
    if require_latency and not hat_target and target_col is None:
        raise UserError(
            f"{path}: missing column '{LATENCY_COLUMNS[0]}' (the measured latency: "
            f"'{LATENCY_COLUMNS[0]}', '{LATENCY_COLUMNS[1]}', or HAT's "
            f"'{HAT_ENCODER_COLUMN}' + '{HAT_DECODER_COLUMN}')"
        )
    enc_col = HAT_ENCODER_COLUMN if HAT_ENCODER_COLUMN in columns else ("encoder_ms" if "encoder_ms" in columns else None)
    dec_col = HAT_DECODER_COLUMN if HAT_DECODER_COLUMN in columns else ("decoder_ms" if "decoder_ms" in columns else None)

    rows: list[dict[str, str]] = []
    feats: list[list[float]] = []
    archs: list[Arch | None] = []
    ys: list[float] = []
    encs: list[float | None] = []
    decs: list[float | None] = []
    for k, row in enumerate(reader, start=1):
        where = f"{path}: row {k} (line {reader.line_num})"
        if None in row:  # more cells than header columns
            raise UserError(f"{where}: {len(columns) + len(row[None])} cells, the header has {len(columns)}")
        arch = None
        if has_arch and (row.get(ARCH_COLUMN) or "").strip():
            try:
                arch = Arch.from_any(json.loads(row[ARCH_COLUMN]))
            except UserError as e:  # before ValueError: a UserError is one
                raise UserError(f"{where}: column '{ARCH_COLUMN}': {e}") from None
            except (ValueError, RecursionError) as e:
                raise UserError(f"{where}: column '{ARCH_COLUMN}' is not JSON "
                                f"({getattr(e, 'msg', e.__class__.__name__)})") from None
            except (TypeError, AttributeError):
                raise UserError(f"{where}: column '{ARCH_COLUMN}' must be a JSON object of Arch fields") from None
        if arch is not None:
            f = arch.features()
        elif missing_feats:
            raise UserError(f"{where}: column '{ARCH_COLUMN}' is empty and the file has no feature columns")
        else:
            f = [_positive(row, c, where) for c in FEATURE_NAMES]
        if target_col is not None:
            enc = _positive(row, enc_col, where, optional=True) if enc_col else None
            dec = _positive(row, dec_col, where, optional=True) if dec_col else None
            y = _positive(row, target_col, where, optional=not require_latency)
        elif hat_target:
            enc = _positive(row, HAT_ENCODER_COLUMN, where, optional=not require_latency)
            dec = _positive(row, HAT_DECODER_COLUMN, where, optional=not require_latency)
            y = enc + dec if enc is not None and dec is not None else None
        else:
            enc = dec = y = None
        rows.append(dict(row))
        feats.append(f)
        archs.append(arch)
        ys.append(math.nan if y is None else y)
        encs.append(enc)
        decs.append(dec)
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    y_arr = np.array(ys, float)
    have_y = bool(np.isfinite(y_arr).all())
    split_ok = all(e is not None for e in encs) and all(d is not None for d in decs)
    return LatencyData(
        features=np.array(feats, float),
        latency_ms=y_arr if have_y else None,
        encoder_ms=np.array(encs, float) if split_ok and have_y else None,
        decoder_ms=np.array(decs, float) if split_ok and have_y else None,
        archs=tuple(archs) if all(a is not None for a in archs) else None,  # type: ignore[arg-type]
        source=str(path),
        columns=columns,
        rows=tuple(rows),
    )


def _positive(row: dict[str, str], col: str, where: str, optional: bool = False) -> float | None:
    raw = (row.get(col) or "").strip()
    if not raw:
        if optional:
            return None
        raise UserError(f"{where}: column '{col}' is empty, expected a positive number")
    try:
        v = float(raw)
    except ValueError:
        raise UserError(f"{where}: column '{col}' is {raw!r}, expected a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{where}: column '{col}' is {raw!r}, expected a positive finite number")
    return v


# --------------------------------------------------------------------------------------------
# Analytic cost terms
# --------------------------------------------------------------------------------------------
# Each term is a count of some kind of work; the predictor learns a non-negative cost per unit.
# Encoder (one pass over S source tokens; S is a measurement constant, absorbed in the cost):
ENCODER_TERMS = (
    "enc_const",          # 1: run overhead, embedding lookup
    "enc_embed",          # e: embedding scale + positions over S tokens
    "enc_layers",         # L: per-layer fixed overhead (kernel launches)
    "enc_norm",           # L*e: layer norms, residual adds
    "enc_proj",           # L*e*qkv: q, k, v, out projections
    "enc_ffn",            # sum_i e*ffn_i: fc1 + fc2
    "enc_heads",          # sum_i heads_i: per-head reshapes, softmax over S*S
    "enc_attn",           # L*qkv: q.k and attn.v products (S*S*qkv)
)
# Decoder (steps x beam absorbed; one generation = steps decoder passes):
DECODER_TERMS = (
    "dec_const",          # 1: search loop overhead per step
    "dec_out",            # d: output projection d*V and embedding (V is a measurement constant)
    "dec_layers",         # L: per-layer fixed overhead
    "dec_norm",           # L*d: 3 layer norms, residual adds
    "dec_proj",           # L*d*qkv: self q,k,v,out + cross q,out projections
    "dec_ffn",            # sum_i d*ffn_i
    "dec_self_heads",     # sum_i self_heads_i
    "dec_self_attn",      # L*qkv: self-attention over the cached steps
    "dec_cross_heads",    # sum_i ende_heads_i
    "dec_cross_len",      # sum_i n_i*qkv: cross attention over n_i*S encoder states
    "dec_cross_kv",       # sum_i n_i*e*qkv: k/v projections of the attended encoder states
    "dec_cross_softmax",  # sum_i n_i*ende_heads_i: per-head softmax over n_i*S keys (per-layer)
)
# Scales keep every column O(1) (numerics only; the fit is invariant to them).
_K = 1e-3
_M = 1e-6


def cost_terms(features: np.ndarray, archs: Sequence[Arch] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(encoder terms (n, 8), decoder terms (n, 12)) for each row.

    From full archs the sums run over the real layers. From HAT's 10 averaged features a sum of
    a per-layer quantity is depth x average (exact), a per-layer product (n_i * heads_i) is
    approximated by the product of averages, and qkv is HAT's fixed 512.
    """
    F = np.asarray(features, float)
    n = len(F)
    enc = np.zeros((n, len(ENCODER_TERMS)))
    dec = np.zeros((n, len(DECODER_TERMS)))
    if archs is not None:
        for r, a in enumerate(archs):
            enc[r], dec[r] = _arch_terms(a)
        return enc, dec
    e, Le, fe, he, d, Ld, fd, hd, hx, nx = F.T
    q = float(HAT_QKV_DIM)
    enc[:] = np.stack([
        np.ones(n), e * _K, Le, Le * e * _K, Le * e * q * _M, Le * e * fe * _M, Le * he, Le * q * _K,
    ], axis=1)
    dec[:] = np.stack([
        np.ones(n), d * _K, Ld, Ld * d * _K, Ld * d * q * _M, Ld * d * fd * _M, Ld * hd, Ld * q * _K,
        Ld * hx, Ld * nx * q * _K, Ld * nx * e * q * _M, Ld * nx * hx,
    ], axis=1)
    return enc, dec


def _arch_terms(a: Arch) -> tuple[list[float], list[float]]:
    e, d, q = float(a.encoder_embed_dim), float(a.decoder_embed_dim), float(a.qkv_dim)
    Le, Ld = float(a.encoder_layer_num), float(a.decoder_layer_num)
    ns = [float(n_ende_layers(c)) for c in a.decoder_arbitrary_ende_attn]
    enc = [
        1.0, e * _K, Le, Le * e * _K, Le * e * q * _M,
        sum(e * f for f in a.encoder_ffn_embed_dim) * _M,
        float(sum(a.encoder_self_attention_heads)),
        Le * q * _K,
    ]
    dec = [
        1.0, d * _K, Ld, Ld * d * _K, Ld * d * q * _M,
        sum(d * f for f in a.decoder_ffn_embed_dim) * _M,
        float(sum(a.decoder_self_attention_heads)),
        Ld * q * _K,
        float(sum(a.decoder_ende_attention_heads)),
        sum(ns) * q * _K,
        sum(ns) * e * q * _M,
        float(sum(n * h for n, h in zip(ns, a.decoder_ende_attention_heads))),
    ]
    return enc, dec


def normalized_features(features: np.ndarray) -> np.ndarray:
    """HAT's normalisation of the 10 features (each divided by its HAT maximum)."""
    from hat_edge.space import HAT_FEATURE_NORM

    return np.asarray(features, float) / np.asarray(HAT_FEATURE_NORM, float)


def describe_data(data: LatencyData) -> dict[str, Any]:
    return {
        "source": data.source,
        "rows": len(data),
        "per_layer_archs": data.archs is not None,
        "encoder_decoder_split": data.encoder_ms is not None,
    }


__all__ = [
    "LatencyData",
    "read_latency_csv",
    "as_features",
    "cost_terms",
    "normalized_features",
    "ENCODER_TERMS",
    "DECODER_TERMS",
    "HAT_QKV_DIM",
]
