"""The latency store: every measurement hat-edge makes, in one SQLite file.

One row per (device, arch, runtime, settings). Each row keeps the arch JSON, HAT's 10 features
(one column each, so plain SQL can read them), the timing statistics, every timed run, the encoder
and decoder split and the device's environment. Each model is committed the moment it is measured,
so a killed process loses at most the model in flight. WAL mode lets a report read the store while
a measurement writes it.

Opening checks before it writes: an existing file must pass `PRAGMA quick_check` (on a read-only
connection) and carry this format and version, else a one-line UserError names it and the file is
left as it was; any SQLite error later is one line too. A new store's schema is created in one
`BEGIN IMMEDIATE` transaction (idempotent statements, checked under the write lock), so any number
of processes may open the same new path at once. Every value goes into SQL as a bound parameter.

Rows imported from HAT's latency CSVs carry features only (`arch` is None): HAT published the 10
averaged features, not the per-layer lists.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sqlite3
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from hat_edge.latency.drift import corrected
from hat_edge.errors import UserError
from hat_edge.runtime.files import read_text
from hat_edge.space import FEATURE_NAMES, Arch

STORE_FORMAT = "hat-edge-latency-store"
STORE_VERSION = 1

# HAT's latency CSV: the 10 features, then these four columns (milliseconds).
HAT_CSV_LATENCY_COLUMNS = (
    "latency_mean_encoder",
    "latency_mean_decoder",
    "latency_std_encoder",
    "latency_std_decoder",
)
HAT_CSV_COLUMNS = FEATURE_NAMES + HAT_CSV_LATENCY_COLUMNS
# HAT's own measurement settings; imported rows are stored under them.
HAT_SETTINGS: dict[str, Any] = {"src_len": 30, "steps": 30, "beam": 5}
HAT_RUNTIME = "hat-pytorch"
# How long a connection waits for another process's lock before giving up.
_BUSY_TIMEOUT_S = 30.0
# Where `hat-edge measure` keeps its store unless told otherwise (per project directory).
DEFAULT_STORE_PATH = os.environ.get("HAT_EDGE_STORE", ".hat-edge/latency.sqlite")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces: equal settings give equal strings (part of the unique key)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LatencyRecord:
    """One measured (or imported) model on one device. Durations in milliseconds.

    runs: every timed run as the runner reports it, `{"encoder_ms", "decode_ms", "total_ms"}`.
    encoder_ms / decoder_ms: medians of the encoder pass and of the full decode loop.
    p90_ms / iqr_ms / cv are None for imported HAT rows (HAT published means and stds only).
    """

    device: str
    arch: Arch | None
    features: tuple[float, ...]
    runtime: str
    settings: Mapping[str, Any]
    median_ms: float
    mean_10_90_ms: float
    p90_ms: float | None
    iqr_ms: float | None
    cv: float | None
    runs: tuple[Mapping[str, float], ...]
    encoder_ms: float | None
    decoder_ms: float | None
    env: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now)
    # Spread of the encoder / decoder timings (HAT's CSV has them); None when unknown.
    encoder_std_ms: float | None = None
    decoder_std_ms: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(float(x) for x in self.features))
        object.__setattr__(self, "runs", tuple(dict(r) for r in self.runs))
        if len(self.features) != len(FEATURE_NAMES):
            raise ValueError(f"features must have {len(FEATURE_NAMES)} numbers, got {len(self.features)}")

    @property
    def total_runs_ms(self) -> list[float]:
        """Total milliseconds of each timed run."""
        return [float(r["total_ms"]) for r in self.runs]

    def arch_key(self) -> str:
        return self.arch.to_json() if self.arch is not None else ""

    @property
    def drift_factor(self) -> float:
        """How much slower the device ran, when this was measured, than on the scale the record is
        anchored to: archs measured earlier, timed again side by side with this one (env
        `drift_factor`, set by the devices room's anchored measurement). 1.0 when not anchored.
        The stored runs and statistics are raw; divide by this for the corrected latency."""
        f = self.env.get("drift_factor") if isinstance(self.env, Mapping) else None
        return float(f) if isinstance(f, (int, float)) and math.isfinite(f) and f > 0 else 1.0

    @property
    def corrected_ms(self) -> float:
        """The median on the anchored scale (`median_ms / drift_factor`)."""
        return corrected(self.median_ms, self.drift_factor)

    def corrected_split(self) -> tuple[float | None, float | None]:
        """Encoder and decode-loop medians on the anchored scale (None where unknown)."""
        f = self.drift_factor
        return (None if self.encoder_ms is None else corrected(self.encoder_ms, f),
                None if self.decoder_ms is None else corrected(self.decoder_ms, f))


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"""
CREATE TABLE IF NOT EXISTS latency (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    arch_key TEXT NOT NULL,          -- canonical arch JSON, or 'hat-csv:FILE#ROW' for imported rows
    arch_json TEXT,                  -- NULL for imported rows (features only)
    runtime TEXT NOT NULL,
    settings_json TEXT NOT NULL,     -- canonical JSON of the settings latency depends on
    {", ".join(f"{n} REAL NOT NULL" for n in FEATURE_NAMES)},
    median_ms REAL NOT NULL,
    mean_10_90_ms REAL NOT NULL,
    p90_ms REAL,
    iqr_ms REAL,
    cv REAL,
    runs_json TEXT NOT NULL,
    encoder_ms REAL,
    decoder_ms REAL,
    encoder_std_ms REAL,
    decoder_std_ms REAL,
    env_json TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (device, arch_key, runtime, settings_json)
)""",
    "CREATE INDEX IF NOT EXISTS latency_device ON latency (device, runtime)",
)

_COLUMNS = (
    "device", "arch_key", "arch_json", "runtime", "settings_json", *FEATURE_NAMES,
    "median_ms", "mean_10_90_ms", "p90_ms", "iqr_ms", "cv", "runs_json", "encoder_ms", "decoder_ms",
    "encoder_std_ms", "decoder_std_ms", "env_json", "created_at",
)


class LatencyStore:
    """SQLite latency store (WAL). Safe to share between threads of one process (one lock) and
    between processes (SQLite's own locking, with a busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise UserError(f"{self.path}: is a directory, expected a latency store file (.sqlite)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        db = None
        try:
            if self.path.exists() and self.path.stat().st_size > 0:
                self._check_existing()  # read-only: a damaged or foreign file is refused unchanged
            db = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
            _retry_while_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.execute("PRAGMA synchronous=FULL")  # one commit per model: cheap, and survives power loss
            self._init_schema(db)
        except BaseException as e:
            if db is not None:
                db.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise UserError(f"{self.path}: not a hat-edge latency store, or a damaged one ({_one_line(e)})") from None
            raise
        self._db = db

    # ---- integrity, schema and version ----
    def _check_existing(self) -> None:
        """quick_check, format and version on a read-only connection (which can neither write the
        file nor checkpoint a WAL into it on close). Runs before the read-write connection exists."""
        ro = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S)
        try:
            problems = [line.strip() for r in ro.execute("PRAGMA quick_check") for line in str(r[0]).splitlines()
                        if line.strip() and not line.startswith("***")]  # '*** in database main ***'
            if problems != ["ok"]:
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                raise UserError(
                    f"{self.path}: damaged latency store (PRAGMA quick_check: {_one_line(problems[0])!r}{more}); "
                    "left unchanged: restore it from a copy or use a new --store"
                )
            self._check_schema_snapshot(ro)
        except sqlite3.DatabaseError as e:  # quick_check itself may fail: 'database disk image is malformed'
            raise UserError(
                f"{self.path}: not a hat-edge latency store, or a damaged one ({_one_line(e)}); left unchanged"
            ) from None
        finally:
            ro.close()

    def _check_schema_snapshot(self, db: sqlite3.Connection) -> bool:
        """`_check_schema` on one read snapshot (another process may be creating the store)."""
        db.execute("BEGIN")
        try:
            return self._check_schema(db)
        finally:
            db.rollback()

    def _check_schema(self, db: sqlite3.Connection) -> bool:
        """True: a hat-edge store of this version. False: an empty database (a new store). Else UserError."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and not tables:
            return False
        fmt = None
        if "meta" in tables:
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            fmt = row[0] if row else None
        if fmt != STORE_FORMAT:
            raise UserError(f"{self.path}: not a hat-edge latency store (an SQLite file with other tables)")
        if version != STORE_VERSION:
            raise UserError(
                f"{self.path}: latency store version {version} is not supported "
                f"(this hat-edge reads version {STORE_VERSION}); use a matching hat-edge or a new --store"
            )
        return True

    def _init_schema(self, db: sqlite3.Connection) -> None:
        """Create the schema of a new store: check and create in one BEGIN IMMEDIATE transaction,
        so of several processes opening the same new file, one creates and the others then see it."""
        if self._check_schema_snapshot(db):
            return  # an existing store: nothing to write
        db.execute("BEGIN IMMEDIATE")  # the write lock (waits up to the busy timeout)
        try:
            if not self._check_schema(db):  # still empty now that this connection holds the lock
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("format", STORE_FORMAT), ("version", str(STORE_VERSION))],
                )
                db.execute(f"PRAGMA user_version = {int(STORE_VERSION)}")
                self._check_schema(db)
            db.commit()
        except BaseException:
            db.rollback()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "LatencyStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing ----
    def add(self, rec: LatencyRecord, replace: bool = False) -> bool:
        """Store one record and commit at once. Returns False if an equal key was already stored
        (and `replace` is False): a resumed run never duplicates a row."""
        return self._insert([(rec, rec.arch_key())], replace) == 1

    def _insert(self, items: Sequence[tuple[LatencyRecord, str]], replace: bool) -> int:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        sql = f"{verb} INTO latency ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        rows = [self._row(rec, key) for rec, key in items]
        with self._lock, self._sql_errors("cannot write to"), self._db:
            before = self._db.total_changes
            self._db.executemany(sql, rows)
            return self._db.total_changes - before

    @contextmanager
    def _sql_errors(self, doing: str) -> Iterator[None]:
        """Any SQLite error (a damaged page, a full disk, a lock held too long) as one line."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: {doing} the latency store ({_one_line(e)})") from None

    @staticmethod
    def _row(rec: LatencyRecord, key: str) -> tuple[Any, ...]:
        return (
            rec.device, key, rec.arch.to_json() if rec.arch is not None else None, rec.runtime,
            canonical_json(dict(rec.settings)), *rec.features,
            rec.median_ms, rec.mean_10_90_ms, _num(rec.p90_ms), _num(rec.iqr_ms), _num(rec.cv),
            json.dumps([dict(r) for r in rec.runs]), _num(rec.encoder_ms), _num(rec.decoder_ms),
            _num(rec.encoder_std_ms), _num(rec.decoder_std_ms), canonical_json(dict(rec.env)), rec.created_at,
        )

    # ---- reading ----
    def has(self, device: str, arch: Arch, runtime: str, settings: Mapping[str, Any]) -> bool:
        return self.get(device, arch, runtime, settings) is not None

    def get(self, device: str, arch: Arch, runtime: str, settings: Mapping[str, Any]) -> LatencyRecord | None:
        rows = self._select(
            "device=? AND arch_key=? AND runtime=? AND settings_json=?",
            (device, arch.to_json(), runtime, canonical_json(dict(settings))),
        )
        return rows[0] if rows else None

    def records(
        self,
        device: str | None = None,
        runtime: str | None = None,
        settings: Mapping[str, Any] | None = None,
        with_arch: bool | None = None,
    ) -> list[LatencyRecord]:
        """Records in insertion order, filtered by any of device, runtime, settings, and whether
        they carry an arch (`with_arch=False`: imported HAT rows only)."""
        where, args = ["1=1"], []
        if device is not None:
            where.append("device=?"), args.append(device)
        if runtime is not None:
            where.append("runtime=?"), args.append(runtime)
        if settings is not None:
            where.append("settings_json=?"), args.append(canonical_json(dict(settings)))
        if with_arch is not None:
            where.append("arch_json IS NOT NULL" if with_arch else "arch_json IS NULL")
        return self._select(" AND ".join(where), tuple(args))

    def count(self, device: str | None = None) -> int:
        with self._lock, self._sql_errors("cannot read"):
            if device is None:
                return self._db.execute("SELECT COUNT(*) FROM latency").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM latency WHERE device=?", (device,)).fetchone()[0]

    def devices(self) -> list[str]:
        with self._lock, self._sql_errors("cannot read"):
            return [r[0] for r in self._db.execute("SELECT DISTINCT device FROM latency ORDER BY device")]

    def _select(self, where: str, args: tuple[Any, ...]) -> list[LatencyRecord]:
        sql = f"SELECT id, {', '.join(_COLUMNS)} FROM latency WHERE {where} ORDER BY id"
        with self._lock, self._sql_errors("cannot read"):
            rows = self._db.execute(sql, args).fetchall()
        out = []
        for r in rows:
            try:
                out.append(self._record(dict(zip(_COLUMNS, r[1:]))))
            except (ValueError, TypeError, KeyError) as e:  # JSON damaged in place (quick_check reads no values)
                raise UserError(f"{self.path}: latency row {r[0]} is damaged ({e.__class__.__name__})") from None
        return out

    @staticmethod
    def _record(r: dict[str, Any]) -> LatencyRecord:
        arch = Arch.from_dict(json.loads(r["arch_json"])) if r["arch_json"] else None
        return LatencyRecord(
            device=r["device"], arch=arch, features=tuple(r[n] for n in FEATURE_NAMES),
            runtime=r["runtime"], settings=json.loads(r["settings_json"]),
            median_ms=r["median_ms"], mean_10_90_ms=r["mean_10_90_ms"], p90_ms=r["p90_ms"],
            iqr_ms=r["iqr_ms"], cv=r["cv"], runs=tuple(json.loads(r["runs_json"])),
            encoder_ms=r["encoder_ms"], decoder_ms=r["decoder_ms"], env=json.loads(r["env_json"]),
            created_at=r["created_at"], encoder_std_ms=r["encoder_std_ms"], decoder_std_ms=r["decoder_std_ms"],
        )

    # ---- HAT's CSV format ----
    def import_hat_csv(
        self,
        path: str | Path,
        device: str,
        runtime: str = HAT_RUNTIME,
        settings: Mapping[str, Any] | None = None,
    ) -> int:
        """Import one of HAT's latency CSVs (features only; arch=None). Returns the rows added.

        The latency is HAT's `latency_mean_encoder + latency_mean_decoder` (each a 10-90% mean), so
        both `median_ms` and `mean_10_90_ms` hold it. Importing the same file again adds nothing.
        """
        path = Path(path)
        settings = dict(HAT_SETTINGS if settings is None else settings)
        text = read_text(path, error=UserError)
        reader = csv.DictReader(text.splitlines())
        missing = [c for c in HAT_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column '{missing[0]}' (HAT latency CSV columns: {', '.join(HAT_CSV_COLUMNS)})")
        items: list[tuple[LatencyRecord, str]] = []
        now = utc_now()
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            try:
                vals = {c: float(row[c]) for c in HAT_CSV_COLUMNS}
            except (TypeError, ValueError):
                bad = next(c for c in HAT_CSV_COLUMNS if not _is_float(row.get(c)))
                raise UserError(f"{path}: line {i}, column '{bad}' is {row.get(bad)!r}, expected a number") from None
            enc, dec = vals["latency_mean_encoder"], vals["latency_mean_decoder"]
            rec = LatencyRecord(
                device=device, arch=None, features=tuple(vals[n] for n in FEATURE_NAMES), runtime=runtime,
                settings=settings, median_ms=enc + dec, mean_10_90_ms=enc + dec, p90_ms=None, iqr_ms=None,
                cv=None, runs=(), encoder_ms=enc, decoder_ms=dec, env={"source": path.name, "line": i},
                created_at=now, encoder_std_ms=vals["latency_std_encoder"], decoder_std_ms=vals["latency_std_decoder"],
            )
            items.append((rec, f"hat-csv:{path.name}#{i}"))
        return self._insert(items, replace=False)

    def export_hat_csv(
        self,
        path: str | Path,
        device: str,
        runtime: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> int:
        """Write `device`'s records as HAT's latency CSV (what HAT's predictor trains on).

        latency_mean_encoder/decoder are 10-90% means of the per-run encoder and decode-loop times
        (HAT's statistic), their std the population std of the same runs; records measured
        against anchors are divided by their drift factor (`LatencyRecord.drift_factor`).
        """
        recs = self.records(device=device, runtime=runtime, settings=settings)
        if not recs:
            raise UserError(f"{self.path}: no records for device '{device}' (devices: {', '.join(self.devices()) or 'none'})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HAT_CSV_COLUMNS)
            for r in recs:
                enc_runs = [float(x["encoder_ms"]) for x in r.runs if "encoder_ms" in x]
                dec_runs = [float(x["decode_ms"]) for x in r.runs if "decode_ms" in x]
                enc = mean_10_90(enc_runs) if enc_runs else (r.encoder_ms or 0.0)
                dec = mean_10_90(dec_runs) if dec_runs else (r.decoder_ms if r.decoder_ms is not None else r.mean_10_90_ms - enc)
                enc_std = statistics.pstdev(enc_runs) if len(enc_runs) > 1 else (r.encoder_std_ms or 0.0)
                dec_std = statistics.pstdev(dec_runs) if len(dec_runs) > 1 else (r.decoder_std_ms or 0.0)
                f = r.drift_factor
                w.writerow([_fmt(x) for x in (*r.features, enc / f, dec / f, enc_std / f, dec_std / f)])
        return len(recs)


def mean_10_90(xs: Iterable[float]) -> float:
    """HAT's statistic: the mean of the timed runs between the 10th and 90th percentile."""
    s = sorted(xs)
    if not s:
        raise ValueError("no values")
    lo, hi = int(len(s) * 0.1), int(math.ceil(len(s) * 0.9))
    part = s[lo:hi] or s
    return sum(part) / len(part)


def _retry_while_locked(op: Callable[[], Any], timeout_s: float | None = None) -> Any:
    """Run `op`, retrying while SQLite answers 'database is locked' without waiting itself: switching
    a new file to WAL while other processes open it returns SQLITE_BUSY at once (the busy handler
    is skipped where waiting could deadlock)."""
    deadline = time.monotonic() + (_BUSY_TIMEOUT_S if timeout_s is None else timeout_s)
    delay = 0.005
    while True:
        try:
            return op()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.2)


def _one_line(e: object) -> str:
    """An SQLite message (quick_check's can span lines) as one short line."""
    return " ".join(str(e).split())[:300]


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _is_float(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


__all__ = [
    "LatencyRecord",
    "LatencyStore",
    "HAT_CSV_COLUMNS",
    "HAT_SETTINGS",
    "HAT_RUNTIME",
    "DEFAULT_STORE_PATH",
    "STORE_FORMAT",
    "STORE_VERSION",
    "canonical_json",
    "mean_10_90",
]
