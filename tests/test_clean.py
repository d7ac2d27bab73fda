"""`hat-edge device clean` (hat_edge/devices/clean.py): leftovers removed from a device's work dir,
locally and over a real sshd on 127.0.0.1, and stored exports from the host's cache.

Every test builds a work dir with each kind of leftover next to things that must survive (a file
in the work dir, a file beside it, the target of a link planted in jobs/), cleans it with a dry run
first (nothing may change) and then for real, and checks that exactly the listed items are gone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hat_edge.devices.clean import UPLOAD_AGE_S, clean, clean_cache, clean_device
from hat_edge.devices.profiles import profile_from_dict
from hat_edge.devices.transport import open_transport
from hat_edge.runtime.lock import BoardLock

HOUR = 3600.0


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch) -> None:
    """The runner build and the export cache in this test's dir, not the user's."""
    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "hat-cache"))


def _age(path: Path, seconds_ago: float) -> None:
    """Set the mtime of path and everything under it (links themselves, not their targets)."""
    t = time.time() - seconds_ago
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in dirs + files:
                os.utime(os.path.join(root, name), (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


def _bundle_dir(path: Path, size: int = 3000) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}\n")
    (path / "encoder.onnx").write_bytes(b"e" * size)
    return path


def _job_dir(path: Path, bundles: list[str]) -> Path:
    path.mkdir(parents=True)
    job = {"format": "hat-edge-job", "version": 1, "bundles": [{"id": f"m{i}", "path": b} for i, b in enumerate(bundles)],
           "settings": {}}
    (path / "job.json").write_text(json.dumps(job))
    (path / "results.jsonl").write_text('{"id": "m0"}\n')
    (path / "runner.log").write_text("log\n")
    return path


def _leftovers(work: Path) -> dict[str, Path]:
    """A work dir holding every kind of leftover, and what must survive; returns them by role."""
    outside = work.parent / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    p = {
        "deployed_old": _bundle_dir(work / "deployed" / "aaaa-onnxruntime-fp32"),
        "deployed_new": _bundle_dir(work / "deployed" / "bbbb-onnxruntime-fp32"),
        "bundle": _bundle_dir(work / "bundles" / "0123456789abcdef0123"),
        "bundle_live": _bundle_dir(work / "bundles" / "fedcba9876543210fedc"),
        "upload_old": work / ".incoming" / "3f2a-encoder.onnx",
        "upload_new": work / ".incoming" / "9c1b-decoder.onnx",
        "runner_py": work / "runner-0123456789ab.py",
        "runner_pyz": work / "runner-ba9876543210.pyz",
        "link_target": outside / "target.txt",
        "keep": work / "keep.txt",
        "beside": work.parent / "beside-the-work-dir.txt",
        "lock": work / "runner.lock",
    }
    p["job_a"] = _job_dir(work / "jobs" / "20240101-000000-aaaaaaaa", [str(p["bundle"])])
    p["job_b"] = _job_dir(work / "jobs" / "20240101-000100-bbbbbbbb", [str(p["deployed_old"])])
    p["job_live"] = _job_dir(work / "jobs" / "20240102-000000-cccccccc",
                             [str(p["bundle_live"]), str(p["deployed_old"])])
    p["upload_old"].parent.mkdir()
    p["upload_old"].write_bytes(b"u" * 5000)
    p["upload_new"].write_bytes(b"n" * 700)
    p["runner_py"].write_text("# an old runner script\n")
    p["runner_pyz"].write_bytes(b"PK old runner")
    p["link_target"].write_text("outside the work dir: must survive\n")
    p["link"] = work / "jobs" / "evil-link"
    p["link"].symlink_to(p["link_target"])
    (outside / "dir").mkdir()
    (outside / "dir" / "precious.bin").write_bytes(b"p" * 10)
    p["dir_link"] = work / "bundles" / "linked-dir"
    p["dir_link"].symlink_to(outside / "dir", target_is_directory=True)
    p["job_odd"] = _job_dir(work / "jobs" / "old job; $(touch PWNED)", [])
    # A dead runner's holder record (its flock died with it): names job_live but protects nothing.
    p["lock"].write_text(json.dumps({"host": "gone", "pid": 1, "started": 0, "job": str(p["job_live"]), "out": ""}))
    p["keep"].write_text("not hat-edge's\n")
    p["beside"].write_text("beside the work dir\n")
    for k, v in p.items():
        if k not in ("upload_new", "deployed_new", "link_target", "keep", "beside", "lock"):
            _age(v, 2 * HOUR)
    _age(p["deployed_new"], 1 * HOUR)  # newer than deployed_old; both older than any age rule
    return p


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_mode, st.st_size)
    return out


def _removed(rep) -> set[str]:
    return {i.path for i in rep.removed}


def _check_clean(run, work: Path, with_lock: bool) -> None:
    """Dry run then the real one on a work dir built by `_leftovers`; `run(dry_run)` cleans it."""
    p = _leftovers(work)
    expected = {p[k] for k in ("deployed_old", "bundle", "bundle_live", "dir_link", "job_a", "job_b", "job_live",
                               "job_odd", "link", "upload_old", "runner_py", "runner_pyz")}
    lock = None
    if with_lock:  # a live runner of job_live holds the board: its job and what it names stay
        lock = BoardLock(str(p["lock"]), job=str(p["job_live"]), out=str(p["job_live"] / "results.jsonl"),
                         host="tester").acquire(wait=False)
        expected -= {p["job_live"], p["bundle_live"], p["deployed_old"], p["runner_py"], p["runner_pyz"]}
    try:
        before = _snapshot(work.parent)
        dry = run(True)
        after = _snapshot(work.parent)
        pushed = {k for k in after if k not in before}  # over SSH with a lock: the current runner
        assert all(Path(k).name.startswith("runner-") for k in pushed), pushed
        assert {k: v for k, v in after.items() if k not in pushed} == before  # the dry run removed nothing
        assert dry.dry_run and _removed(dry) == {str(x) for x in expected}
        assert dry.lock["held"] is with_lock
        kept = {i.path: i.reason for i in dry.kept}
        assert kept[str(p["deployed_new"])] == "the most recently modified (--keep-deployed 1)"
        assert "upload in progress" in kept[str(p["upload_new"])]
        sizes = {i.path: i.bytes for i in dry.removed}
        assert sizes[str(p["upload_old"])] == 5000 and sizes[str(p["bundle"])] == 3000 + 3
        if with_lock:
            assert "holds the board lock" in kept[str(p["job_live"])]
            assert kept[str(p["bundle_live"])] == kept[str(p["deployed_old"])] == "in use by an active job"
            assert "may be this one" in kept[str(p["runner_py"])]

        rep = run(False)
        assert not rep.dry_run and _removed(rep) == _removed(dry) and rep.notes == []
        assert rep.total_bytes == dry.total_bytes > 0
        for x in expected:
            assert not os.path.lexists(x), x
        for k in ("deployed_new", "upload_new", "keep", "beside", "link_target", "lock"):
            assert p[k].exists(), k
        assert p["link_target"].read_text().startswith("outside the work dir")
        assert (work.parent / "outside" / "dir" / "precious.bin").read_bytes() == b"p" * 10
        assert not any(x.name == "PWNED" for x in work.parent.rglob("*"))
        if with_lock:
            assert (p["job_live"] / "job.json").is_file() and (p["bundle_live"] / "encoder.onnx").is_file()
        # Nothing left to do: a second run removes nothing.
        assert run(False).removed == []
    finally:
        if lock is not None:
            lock.release()


def _local_profile(work: Path):
    return profile_from_dict({"name": "local-clean", "threads": 1, "work_dir": str(work)}, "<clean test>")


@pytest.mark.parametrize("with_lock", [False, True], ids=["no-runner", "live-runner"])
def test_clean_local_work_dir(tmp_path: Path, with_lock: bool) -> None:
    work = tmp_path / "board" / "work"
    prof = _local_profile(work)

    def run(dry_run: bool):
        with open_transport(prof) as t:
            return clean_device(t, dry_run=dry_run, keep_deployed=1)

    _check_clean(run, work, with_lock)


@pytest.mark.ssh
@pytest.mark.parametrize("with_lock", [False, True], ids=["no-runner", "live-runner"])
def test_clean_over_ssh(sshd_server, ssh_profile, tmp_path: Path, with_lock: bool) -> None:
    work = tmp_path / "board" / "work"
    prof = ssh_profile(sshd_server, work_dir=str(work))

    def run(dry_run: bool):
        with open_transport(prof) as t:
            assert not t.is_local
            return clean_device(t, dry_run=dry_run, keep_deployed=1)

    _check_clean(run, work, with_lock)


def test_recent_jobs_their_bundles_and_linked_dirs_are_left_alone(tmp_path: Path) -> None:
    work = tmp_path / "work"
    prof = _local_profile(work)
    used = _bundle_dir(work / "bundles" / "aaaaaaaaaaaaaaaaaaaa")
    stale = _bundle_dir(work / "bundles" / "bbbbbbbbbbbbbbbbbbbb")
    recent = _job_dir(work / "jobs" / "20240101-000000-recent00", [str(used)])  # a runner without the lock
    _age(used, 2 * HOUR)
    _age(stale, 2 * HOUR)
    runner = work / "runner-0123456789ab.pyz"
    runner.write_bytes(b"PK")
    _age(runner, 2 * HOUR)
    elsewhere = tmp_path / "elsewhere"
    _bundle_dir(elsewhere / "x")
    (work / "deployed").symlink_to(elsewhere)  # a linked kind dir: never listed, never followed
    fresh_link = work / "jobs" / "fresh-link"  # a new link is no job: removed as a link at once
    fresh_link.symlink_to(elsewhere, target_is_directory=True)
    with open_transport(prof) as t:
        rep = clean_device(t, keep_deployed=0)
    assert _removed(rep) == {str(stale), str(fresh_link)}
    kept = {i.path: i.reason for i in rep.kept}
    assert "s ago" in kept[str(recent)] and kept[str(used)] == "in use by an active job"
    assert "may be this one" in kept[str(runner)]
    assert any("deployed is a symbolic link" in n for n in rep.notes)
    assert (elsewhere / "x" / "encoder.onnx").is_file() and recent.is_dir() and used.is_dir()


def test_keep_deployed_zero_and_all_uploads(tmp_path: Path) -> None:
    work = tmp_path / "work"
    p = _leftovers(work)
    with open_transport(_local_profile(work)) as t:
        rep = clean_device(t, dry_run=True, keep_deployed=0, all_uploads=True)
    gone = _removed(rep)
    assert {str(p["deployed_new"]), str(p["deployed_old"]), str(p["upload_new"]), str(p["upload_old"])} <= gone


def test_clean_incoming_only_touches_old_partial_uploads(tmp_path: Path) -> None:
    work = tmp_path / "work"
    p = _leftovers(work)
    with open_transport(_local_profile(work)) as t:
        removed = t.clean_incoming(UPLOAD_AGE_S)
        assert removed == [str(p["upload_old"])]
        assert t.clean_incoming(UPLOAD_AGE_S) == []
    assert p["upload_new"].is_file() and p["deployed_old"].is_dir() and p["job_a"].is_dir() and p["bundle"].is_dir()
    empty = tmp_path / "empty"
    with open_transport(_local_profile(empty)) as t:
        assert t.clean_incoming(0) == []  # no .incoming at all: nothing, no error


# ---------------------------------------------------------------------------------------------
# The local export cache
# ---------------------------------------------------------------------------------------------
def _record(prof, arch):
    from hat_edge.latency.store import LatencyRecord

    runs = [{"encoder_ms": 1.0, "decode_ms": 9.0, "total_ms": 10.0 + i * 0.1} for i in range(5)]
    return LatencyRecord(device=prof.name, arch=arch, features=arch.features(), runtime=prof.runtime,
                         settings=prof.measure_spec().identity(), median_ms=10.0, mean_10_90_ms=10.1, p90_ms=10.4,
                         iqr_ms=0.2, cv=0.01, runs=runs, encoder_ms=1.0, decoder_ms=9.0)


def _export(path: Path, arch, prof, precision: str = "fp32") -> Path:
    path.mkdir(parents=True)
    manifest = {"format": "hat-edge-bundle", "version": 1, "runtime": prof.runtime, "precision": precision,
                "arch": arch.to_dict(), "model": {"vocab_size": prof.measurement.vocab_size}, "files": {}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "encoder.onnx").write_bytes(b"x" * 1000)
    return path


def test_cache_entries_of_stored_archs_are_removed(tmp_path: Path) -> None:
    from hat_edge.devices import measure
    from hat_edge.latency.store import LatencyStore
    from hat_edge.space import PRESETS

    prof = _local_profile(tmp_path / "work")
    stored, other = PRESETS["demo"].sample_n(2, seed=3)
    store_path = tmp_path / "lat.sqlite"
    store = LatencyStore(store_path)
    assert store.add(_record(prof, stored))
    store.close()
    cache = tmp_path / "cache"
    done = _export(cache / "stored000000000000000", stored, prof)
    todo = _export(cache / "notstored00000000000", other, prof)
    int8 = _export(cache / "stored-int8000000000", stored, prof, precision="int8")  # stored at fp32 only
    busy = _export(cache / "stored-busy000000000", stored, prof)
    outside = _export(tmp_path / "outside-export", stored, prof)
    (cache / "linked00000000000000").symlink_to(outside)
    (cache / "half-written00000000").mkdir()  # an export in progress: no manifest yet

    dry = clean_cache(prof, store_path, cache, dry_run=True)
    assert _removed(dry) == {str(done), str(busy)} and done.is_dir()
    measure._acquire(busy)
    try:
        rep = clean_cache(prof, store_path, cache)
    finally:
        measure._release(busy, delete=False)
    assert _removed(rep) == {str(done)} and rep.removed[0].bytes > 1000
    assert not done.exists()
    for d in (todo, int8, busy, outside, cache / "linked00000000000000", cache / "half-written00000000"):
        assert os.path.lexists(d), d
    kept = {Path(i.path).name: i.reason for i in rep.kept}
    assert kept == {
        "notstored00000000000": "not stored for local-clean yet",
        "stored-int8000000000": "not stored for local-clean yet",
        "stored-busy000000000": "in use by a measurement in this process",
        "linked00000000000000": "not an export directory",
        "half-written00000000": "no readable manifest.json: an export in progress, or damaged",
    }
    # Without a store, the cache is left alone (and no store file is created).
    rep = clean_cache(prof, tmp_path / "none.sqlite", cache)
    assert rep.removed == [] and "no latency store" in rep.notes[0] and not (tmp_path / "none.sqlite").exists()


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def test_cli_device_clean_lines_and_json(tmp_path: Path, monkeypatch) -> None:
    from hat_edge.cli import cli
    from hat_edge.latency.store import LatencyStore
    from hat_edge.space import PRESETS

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "board" / "work"
    p = _leftovers(work)
    prof_file = tmp_path / "board.toml"
    prof_file.write_text(f'name = "board"\nthreads = 1\nwork_dir = "{work}"\n')
    from hat_edge.devices.profiles import load_profile

    prof = load_profile(str(prof_file))
    arch = PRESETS["demo"].sample_n(1, seed=4)[0]
    store = LatencyStore(tmp_path / "lat.sqlite")
    store.add(_record(prof, arch))
    store.close()
    export = _export(tmp_path / "hat-cache" / "bundles" / "k0000000000000000000", arch, prof)

    runner = CliRunner()
    res = runner.invoke(cli, ["device", "clean", "--profile", str(prof_file), "--dry-run", "--store", "lat.sqlite"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].endswith("(dry run: nothing removed)") and lines[1] == "board lock: free"
    would = [line for line in lines if line.lstrip().startswith("would remove")]
    assert len(would) == 13  # the 12 device leftovers and the stored export
    for k in ("deployed_old", "job_a", "link", "upload_old", "runner_py", "bundle"):
        assert any(line.endswith(f" MB  {p[k]}") for line in would), k
    assert any(line.endswith(f" MB  {export}") for line in would)
    headings = [line for line in lines[2:] if not line.startswith((" ", "total", "note"))]
    assert headings[0].startswith("deployed bundles") and headings[-1].startswith("local export cache")
    assert lines[-1].startswith("total: ") and lines[-1].endswith("in 13 item(s) would be removed")
    assert export.is_dir() and p["deployed_old"].is_dir()

    res = runner.invoke(cli, ["device", "clean", "--profile", str(prof_file), "--json", "--store", "lat.sqlite"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["dry_run"] is False and out["lock"]["held"] is False  # a dead runner's record
    assert out["by_kind"]["jobs"]["count"] == 5 and out["by_kind"]["cache"]["count"] == 1
    assert out["by_kind"]["runners"]["count"] == 2 and out["by_kind"]["deployed"]["count"] == 1
    assert out["total_bytes"] == sum(i["bytes"] for i in out["removed"]) and out["total_mb"] > 0
    assert not export.exists() and not p["deployed_old"].exists() and p["deployed_new"].is_dir()
    assert p["keep"].is_file() and p["beside"].is_file() and p["link_target"].is_file()

    # The default store (as `hat-edge measure`'s) is not there in this dir: the cache is left alone.
    res = runner.invoke(cli, ["device", "clean", "--profile", str(prof_file)])
    assert res.exit_code == 0 and "note: no latency store at" in res.output
    assert res.output.splitlines()[-1] == "total: 0.00 MB in 0 item(s) removed"
    res = runner.invoke(cli, ["device", "clean", "--help"])
    assert res.exit_code == 0 and "--keep-deployed" in res.output and "10 minutes" in res.output


@pytest.mark.ssh
def test_clean_over_ssh_through_clean_entry_point(sshd_server, ssh_profile, tmp_path: Path) -> None:
    """`clean()`: the device over SSH, then the local cache (no store given: left alone)."""
    work = tmp_path / "board" / "work"
    p = _leftovers(work)
    prof = ssh_profile(sshd_server, work_dir=str(work))
    rep = clean(prof, dry_run=False, keep_deployed=1)
    assert str(p["job_a"]) in _removed(rep) and rep.cache_dir is None and not p["job_a"].exists()
    assert p["link_target"].is_file() and p["deployed_new"].is_dir()


def test_each_push_first_removes_partial_uploads_a_killed_push_left(tmp_path) -> None:
    """Uploads go to work_dir/.incoming and are renamed into place; a killed push leaves its
    partial file there. The next push removes those untouched for UPLOAD_AGE_S, not younger ones."""
    from hat_edge.devices.profiles import profile_from_dict
    from hat_edge.devices.transport import UPLOAD_AGE_S, open_transport

    profile = profile_from_dict({"name": "local-push", "work_dir": str(tmp_path / "work")}, "<test>")
    with open_transport(profile) as t:
        incoming = Path(t.work_dir) / ".incoming"
        incoming.mkdir(parents=True)
        old, young = incoming / "dead-encoder.onnx", incoming / "live-decoder.onnx"
        old.write_bytes(b"x" * 100)
        young.write_bytes(b"y" * 100)
        past = time.time() - UPLOAD_AGE_S - 60
        os.utime(old, (past, past))
        src = tmp_path / "file.bin"
        src.write_bytes(b"payload")
        assert t.push_many([(src, t.join(t.work_dir, "file.bin"))]) == 1
        assert not old.exists() and young.exists()
        assert (Path(t.work_dir) / "file.bin").read_bytes() == b"payload"


def test_cache_partial_exports_are_kept_while_their_process_lives(tmp_path: Path) -> None:
    """An export being written (`.partial-<key>-<pid>-<id>`, measure._export) is never a cache entry:
    kept while its process lives, removed once that process is gone (a killed export's leftover)."""
    import subprocess
    import sys

    from hat_edge.latency.store import LatencyStore
    from hat_edge.space import PRESETS

    prof = _local_profile(tmp_path / "work")
    store_path = tmp_path / "lat.sqlite"
    LatencyStore(store_path).close()
    cache = tmp_path / "cache"
    arch = PRESETS["demo"].sample_n(1, seed=4)[0]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    live = _export(cache / f".partial-key-a-{os.getpid()}-0123abcd", arch, prof)
    dead = _export(cache / f".partial-key-b-{dead_pid}-4567abcd", arch, prof)
    dry = clean_cache(prof, store_path, cache, dry_run=True)
    assert _removed(dry) == {str(dead)} and dead.is_dir()
    rep = clean_cache(prof, store_path, cache)
    assert _removed(rep) == {str(dead)} and not os.path.lexists(dead) and live.is_dir()
    assert {Path(i.path).name: i.reason for i in rep.kept} == {live.name: f"an export in progress (pid {os.getpid()})"}


def test_an_export_that_cannot_be_moved_into_the_cache_is_one_clear_error(tmp_path: Path) -> None:
    """A file where the export's cache directory should go: a one-line error naming it, not an OSError."""
    from hat_edge.devices import measure
    from hat_edge.errors import UserError

    src = tmp_path / ".partial-k-1-0123abcd"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    final = tmp_path / "k"
    final.write_text("not a directory")
    with pytest.raises(UserError, match=r"k: in the way of an export .*remove it") as e:
        measure._move_into_place(src, final)
    assert isinstance(e.value, measure.ExportCacheError) and "\n" not in str(e.value)
    assert final.read_text() == "not a directory" and src.is_dir()  # nothing lost
