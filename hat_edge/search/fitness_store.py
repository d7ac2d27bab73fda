"""Validation losses kept across runs: a second `hat-edge run` into the same output directory (or
any search with the same fitness) reads the losses it already computed instead of computing them
again (the fitness is most of a rerun's search time).

    store = FitnessStore(out_dir / "fitness.sqlite")
    fit = CachedFitness(valid_loss, persist=store.bind(valid_loss.fingerprint()))

A loss is stored under the fitness's *fingerprint* (`evaluate.ValidLoss.fingerprint`: every
weight of the SuperTransformer, the validation batches' token ids, the loss's definition and the
device kind) and the arch's key, so a changed checkpoint, subset or definition never reads an old
value: it simply finds none. The file is untrusted like any other: a link is refused, a foreign or
damaged file is a one-line error naming it, and a stored value is used only if it is a finite,
non-negative number.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path

from hat_edge.errors import UserError
from hat_edge.space import Arch

FORMAT = "hat-edge-fitness"
VERSION = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fitness (fingerprint TEXT NOT NULL, arch_key TEXT NOT NULL, loss REAL NOT NULL, "
    "created_at TEXT NOT NULL, PRIMARY KEY (fingerprint, arch_key))",
)
_BUSY_TIMEOUT_S = 30.0


class FitnessStore:
    """An SQLite file of (fingerprint, arch) -> validation loss. Thread-safe (one lock); several
    processes may share it (SQLite's locking, a busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise UserError(f"{self.path}: is {what}; the fitness cache must be a plain file hat-edge made "
                            "(remove it, or use another --out-dir)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            db = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(f"{self.path}: cannot open the fitness cache ({e})") from None
        try:
            self._init(db)
        except sqlite3.DatabaseError as e:
            db.close()
            raise UserError(f"{self.path}: not a hat-edge fitness cache, or a damaged one ({e}); left unchanged: "
                            "remove it (it only saves time) or use another --out-dir") from None
        except BaseException:
            db.close()
            raise
        self._db = db

    def _init(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                               [("format", FORMAT), ("version", str(VERSION))])
            else:
                fmt = db.execute("SELECT value FROM meta WHERE key='format'").fetchone() if "meta" in tables else None
                ver = db.execute("SELECT value FROM meta WHERE key='version'").fetchone() if fmt else None
                if fmt is None or fmt[0] != FORMAT or "fitness" not in tables:
                    raise UserError(f"{self.path}: not a hat-edge fitness cache (an SQLite file with other tables); "
                                    "left unchanged: use another --out-dir")
                if ver is None or ver[0] != str(VERSION):
                    raise UserError(f"{self.path}: fitness cache version {ver[0] if ver else '?'} is not supported "
                                    f"(this hat-edge reads version {VERSION}); remove it, it only saves time")
            db.commit()
        except BaseException:
            db.rollback()
            raise

    def get(self, fingerprint: str, arch: Arch) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT loss FROM fitness WHERE fingerprint=? AND arch_key=?",
                                   (fingerprint, arch.to_json())).fetchone()
        if row is None:
            return None
        v = row[0]
        # a value someone wrote into the file by hand is not a loss: computed again instead
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return None
        return float(v)

    def put(self, fingerprint: str, arch: Arch, loss: float) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO fitness (fingerprint, arch_key, loss, created_at) "
                             "VALUES (?, ?, ?, ?)", (fingerprint, arch.to_json(), float(loss), now))
            self._db.commit()

    def count(self, fingerprint: str | None = None) -> int:
        with self._lock:
            if fingerprint is None:
                return int(self._db.execute("SELECT COUNT(*) FROM fitness").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM fitness WHERE fingerprint=?",
                                        (fingerprint,)).fetchone()[0])

    def bind(self, fingerprint: str) -> BoundFitnessStore:
        return BoundFitnessStore(self, fingerprint)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class BoundFitnessStore:
    """One fitness's view of a `FitnessStore` (`CachedFitness(persist=...)`)."""

    def __init__(self, store: FitnessStore, fingerprint: str) -> None:
        self.store, self.fingerprint = store, fingerprint

    def get(self, arch: Arch) -> float | None:
        return self.store.get(self.fingerprint, arch)

    def put(self, arch: Arch, loss: float) -> None:
        self.store.put(self.fingerprint, arch, loss)
