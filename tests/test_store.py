"""The latency store: unique rows, immediate commits, versions, HAT's CSV format."""

from __future__ import annotations

import csv
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from hat_edge.errors import UserError
from hat_edge.latency.store import (
    HAT_CSV_COLUMNS,
    HAT_SETTINGS,
    LatencyRecord,
    LatencyStore,
    STORE_VERSION,
    mean_10_90,
)
from hat_edge.space import PRESETS

from shared_data import HAT_LATENCY as HAT_DATA  # noqa: E402
SETTINGS = {"src_len": 30, "steps": 30, "beam": 5, "threads": 1}


def _rec(arch, device="dev", median=10.0, settings=SETTINGS, runtime="onnxruntime") -> LatencyRecord:
    runs = [{"encoder_ms": 1.0 + i * 0.1, "decode_ms": median - 1.0 + i * 0.1, "total_ms": median + i * 0.2}
            for i in range(10)]
    return LatencyRecord(
        device=device, arch=arch, features=arch.features(), runtime=runtime, settings=settings,
        median_ms=median, mean_10_90_ms=median + 0.1, p90_ms=median + 1, iqr_ms=0.5, cv=0.02, runs=runs,
        encoder_ms=1.0, decoder_ms=median - 1.0, env={"cpu": "test"},
    )


@pytest.fixture
def archs():
    return PRESETS["demo"].sample_n(4, seed=1)


def test_add_get_unique_and_roundtrip(tmp_path: Path, archs) -> None:
    store = LatencyStore(tmp_path / "lat.sqlite")
    assert store.add(_rec(archs[0])) is True
    assert store.add(_rec(archs[0], median=99.0)) is False  # same key: kept once, first value wins
    assert store.add(_rec(archs[0], settings={**SETTINGS, "beam": 1})) is True  # other settings: new row
    assert store.add(_rec(archs[0], device="pi")) is True
    assert store.count() == 3
    got = store.get("dev", archs[0], "onnxruntime", SETTINGS)
    assert got is not None and got.median_ms == 10.0 and got.arch == archs[0]
    assert got.runs == _rec(archs[0]).runs and got.env == {"cpu": "test"}
    assert got.features == tuple(archs[0].features())
    # settings are keyed canonically: key order does not matter
    assert store.has("dev", archs[0], "onnxruntime", dict(reversed(list(SETTINGS.items()))))
    assert not store.has("dev", archs[1], "onnxruntime", SETTINGS)
    assert store.add(_rec(archs[0], median=99.0), replace=True) is True
    assert store.get("dev", archs[0], "onnxruntime", SETTINGS).median_ms == 99.0
    assert [r.device for r in store.records(device="pi")] == ["pi"]
    assert store.devices() == ["dev", "pi"]


def test_wal_and_each_add_is_committed(tmp_path: Path, archs) -> None:
    path = tmp_path / "lat.sqlite"
    store = LatencyStore(path)
    store.add(_rec(archs[0]))
    # Another connection (as another process would) sees the row at once, without a close.
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT COUNT(*) FROM latency").fetchone()[0] == 1
    assert other.execute("PRAGMA user_version").fetchone()[0] == STORE_VERSION
    other.close()


def _add_then_die(path: str, arch_json: str) -> None:
    import os

    from hat_edge.space import Arch

    store = LatencyStore(path)
    store.add(_rec(Arch.from_dict(__import__("json").loads(arch_json))))
    os._exit(1)  # killed right after: no close, no cleanup


def test_row_survives_a_killed_process(tmp_path: Path, archs) -> None:
    path = tmp_path / "lat.sqlite"
    p = mp.get_context("spawn").Process(target=_add_then_die, args=(str(path), archs[0].to_json()))
    p.start()
    p.join(60)
    assert p.exitcode == 1
    assert LatencyStore(path).count() == 1


def test_unknown_version_and_foreign_files_refused(tmp_path: Path, archs) -> None:
    path = tmp_path / "lat.sqlite"
    LatencyStore(path).add(_rec(archs[0]))
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(UserError, match=r"lat.sqlite: latency store version 99 is not supported"):
        LatencyStore(path)
    foreign = tmp_path / "other.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="not a hat-edge latency store"):
        LatencyStore(foreign)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UserError, match="junk.sqlite: not a hat-edge latency store"):
        LatencyStore(junk)


def test_import_hat_csv_real_file(tmp_path: Path) -> None:
    src = HAT_DATA / "wmt14ende_cpu_xeon_all.csv"
    store = LatencyStore(tmp_path / "lat.sqlite")
    assert store.import_hat_csv(src, device="xeon") == 2000
    assert store.import_hat_csv(src, device="xeon") == 0  # idempotent
    recs = store.records(device="xeon")
    assert len(recs) == 2000 and all(r.arch is None for r in recs)
    with src.open() as f:
        first = next(csv.DictReader(f))
    r0 = recs[0]
    want = float(first["latency_mean_encoder"]) + float(first["latency_mean_decoder"])
    assert r0.mean_10_90_ms == pytest.approx(want) and r0.settings == HAT_SETTINGS
    assert r0.features[0] == float(first["encoder_embed_dim"])
    # export -> same 14 columns, same numbers
    out = tmp_path / "out.csv"
    assert store.export_hat_csv(out, device="xeon") == 2000
    with src.open() as a, out.open() as b:
        ra, rb = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert list(rb[0]) == list(HAT_CSV_COLUMNS)
    for x, y in zip(ra[:50], rb[:50]):
        for c in HAT_CSV_COLUMNS:
            assert float(x[c]) == pytest.approx(float(y[c]))


def test_export_measured_rows_as_hat_csv(tmp_path: Path, archs) -> None:
    store = LatencyStore(tmp_path / "lat.sqlite")
    for i, a in enumerate(archs):
        store.add(_rec(a, median=10.0 + i))
    out = tmp_path / "m.csv"
    assert store.export_hat_csv(out, device="dev") == 4
    rows = list(csv.DictReader(out.open()))
    r = rows[1]
    enc = mean_10_90([1.0 + i * 0.1 for i in range(10)])
    assert float(r["latency_mean_encoder"]) == pytest.approx(enc)
    assert float(r["latency_mean_decoder"]) == pytest.approx(mean_10_90([10.0 + i * 0.1 for i in range(10)]))
    assert float(r["decoder_layer_num"]) == archs[1].decoder_layer_num
    assert float(r["latency_std_encoder"]) > 0
    with pytest.raises(UserError, match="no records for device 'nope'"):
        store.export_hat_csv(out, device="nope")


def test_anchored_record_is_corrected_everywhere_it_is_read(tmp_path: Path, archs) -> None:
    """A record measured while the device ran 2x slow (drift_factor 2 in its env, as anchored
    measurement stores it) keeps its raw runs, and is read at half: corrected_ms, the split and
    the HAT CSV export."""
    from dataclasses import replace

    store = LatencyStore(tmp_path / "lat.sqlite")
    raw = _rec(archs[0], median=20.0)
    store.add(replace(raw, env={**raw.env, "drift_factor": 2.0}))
    store.add(_rec(archs[1], median=20.0))
    got = {r.arch: r for r in store.records(device="dev")}
    slow, plain = got[archs[0]], got[archs[1]]
    assert slow.median_ms == 20.0 and slow.runs == raw.runs  # raw kept
    assert (slow.drift_factor, slow.corrected_ms, slow.corrected_split()) == (2.0, 10.0, (0.5, 9.5))
    assert (plain.drift_factor, plain.corrected_ms) == (1.0, 20.0)
    out = tmp_path / "m.csv"
    store.export_hat_csv(out, device="dev")
    enc = [float(r["latency_mean_encoder"]) for r in csv.DictReader(out.open())]
    assert sorted(enc) == pytest.approx(sorted([mean_10_90([1.0 + i * 0.1 for i in range(10)]) / f for f in (1, 2)]))


def test_import_bad_csv_names_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(HAT_CSV_COLUMNS[:-1]) + "\n" + ",".join(["1"] * 13) + "\n")
    store = LatencyStore(tmp_path / "lat.sqlite")
    with pytest.raises(UserError, match="bad.csv: missing column 'latency_std_decoder'"):
        store.import_hat_csv(bad, device="x")
    bad.write_text(",".join(HAT_CSV_COLUMNS) + "\n" + ",".join(["1"] * 13 + ["oops"]) + "\n")
    with pytest.raises(UserError, match="bad.csv: line 2, column 'latency_std_decoder' is 'oops'"):
        store.import_hat_csv(bad, device="x")
    assert store.count() == 0


# ------------------------------------------------------------------------------------------------
# integrity: a damaged file is refused in one line and left as it was
# ------------------------------------------------------------------------------------------------
def _filled_store(path: Path, archs) -> int:
    """A real store of a few hundred pages (HAT's CSV plus measured rows); returns its page size."""
    with LatencyStore(path) as store:
        store.import_hat_csv(HAT_DATA / "wmt14ende_cpu_xeon_all.csv", device="xeon")
        for a in archs:
            store.add(_rec(a))
    assert not Path(f"{path}-wal").exists()  # the last close checkpointed everything into the file
    db = sqlite3.connect(path)
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return page


def _damage_middle_pages(path: Path, page: int, how: str = "third") -> None:
    """Overwrite with 0xA5 the middle third of the file (whole pages: a fresh store has no free
    pages, each is a table, index or overflow page), or the cells of the latency table's root page
    (its 12-byte page header kept: quick_check then lists what it finds instead of failing)."""
    pages = path.stat().st_size // page
    assert pages >= 30
    if how == "third":
        start, end = (pages // 3) * page, 2 * (pages // 3) * page
    else:
        db = sqlite3.connect(path)
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name='latency'").fetchone()[0]
        db.close()
        start, end = (root - 1) * page + 12, root * page
    with path.open("r+b") as f:
        f.seek(start)
        f.write(bytes([0xA5]) * (end - start))


def _assert_one_line(msg: str, path: Path) -> None:
    assert str(path) in msg and "\n" not in msg
    assert "Traceback" not in msg and "sqlite3." not in msg and "File \"" not in msg


@pytest.mark.parametrize("how, says", [
    ("root", r"damaged latency store \(PRAGMA quick_check: 'On tree page \d+ cell \d+: .+' and \d+ more\)"),
    ("third", r"not a hat-edge latency store, or a damaged one \(database disk image is malformed\)"),
])
def test_a_store_with_damaged_pages_is_refused_unchanged(tmp_path: Path, archs, how, says) -> None:
    """quick_check either lists the damage or fails outright: refused in one line naming the file
    either way, before anything is written to it."""
    path = tmp_path / "lat.sqlite"
    page = _filled_store(path, archs)
    _damage_middle_pages(path, page, how)
    before = path.read_bytes()
    with pytest.raises(UserError, match=rf"lat.sqlite: {says}; left unchanged") as e:
        LatencyStore(path)
    _assert_one_line(str(e.value), path)
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chain shown
    assert path.read_bytes() == before  # nothing written: not even the WAL switch or a checkpoint


def test_a_store_damaged_after_opening_fails_reads_in_one_line(tmp_path: Path, archs) -> None:
    path = tmp_path / "lat.sqlite"
    page = _filled_store(path, archs)
    store = LatencyStore(path)  # passes quick_check; the table's pages are not cached yet
    _damage_middle_pages(path, page)
    for read in (store.records, store.count, lambda: store.records(device="xeon")):
        with pytest.raises(UserError, match="cannot read the latency store") as e:
            read()
        _assert_one_line(str(e.value), path)
    store.close()


def test_a_damaged_header_is_refused_unchanged(tmp_path: Path, archs) -> None:
    path = tmp_path / "lat.sqlite"
    _filled_store(path, archs)
    raw = bytearray(path.read_bytes())
    raw[0:16] = b"not SQLite 3....."[:16]
    path.write_bytes(raw)
    with pytest.raises(UserError, match="not a hat-edge latency store, or a damaged one") as e:
        LatencyStore(path)
    _assert_one_line(str(e.value), path)
    assert path.read_bytes() == raw


# ------------------------------------------------------------------------------------------------
# creation under concurrency
# ------------------------------------------------------------------------------------------------
N_PROCS, N_ROUNDS = 8, 20


def _open_at_once(worker: int, paths: list[str], barrier, results) -> None:
    arch = PRESETS["demo"].sample_n(1, seed=worker)[0]
    for path in paths:
        try:
            barrier.wait()  # all processes open the same new file at the same moment
            with LatencyStore(path) as store:
                store.add(_rec(arch, device=f"w{worker}"))
            results.put((worker, path, None))
        except BaseException as e:  # reported to the parent, which fails the test
            results.put((worker, path, f"{e.__class__.__name__}: {e}"))


def test_processes_creating_the_same_new_store_at_once(tmp_path: Path) -> None:
    """8 processes open one new path at once, 20 times (a fresh path each round): every open
    succeeds and the store is whole afterwards (was: 'UNIQUE constraint failed: meta.key' or
    'an SQLite file with other tables' in most rounds, the schema check racing its creation)."""
    ctx = mp.get_context("spawn")
    paths = [str(tmp_path / f"round{i}.sqlite") for i in range(N_ROUNDS)]
    barrier, results = ctx.Barrier(N_PROCS, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(w, paths, barrier, results)) for w in range(N_PROCS)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(N_PROCS * N_ROUNDS)]
    for p in procs:
        p.join(60)
    assert [g for g in got if g[2] is not None] == []
    assert all(p.exitcode == 0 for p in procs)
    for path in paths:
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA user_version").fetchone()[0] == STORE_VERSION
        assert db.execute("SELECT key, value FROM meta ORDER BY key").fetchall() == [
            ("format", "hat-edge-latency-store"), ("version", str(STORE_VERSION))]
        db.close()
        with LatencyStore(path) as store:
            assert store.devices() == [f"w{w}" for w in range(N_PROCS)]
