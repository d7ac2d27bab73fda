"""Remove what measurements and deployments leave on a board, and stored exports on the host.

    clean(profile, dry_run=True)              # -> CleanReport: what is (or would be) removed, and kept
    clean_stale_uploads(t, older_than_s)      # partial uploads only; at the start of each push

On the device, under the profile's work dir, and only there:

    deployed/<name>     deployed bundles: all but those in use and the `keep_deployed` newest
    jobs/<id>           job dirs: all but active ones (see below)
    .incoming/<file>    partial uploads (a killed push): those untouched for `UPLOAD_AGE_S`
    bundles/<key>       measurement bundles: all but those an active job names
    runner-*.pyz|.py    runners other than this host's (`measure.push_runner`)

On the host: entries of the export cache (`measure.default_cache_dir()`) whose arch is stored in
the latency store for this profile at its settings (nothing left to measure with them).

Active job: the one of the runner holding the board lock (`runtime.lock`: `work_dir/runner.lock`,
its holder's `job`), and any job dir written to in the last `RECENT_JOB_S` seconds (a runner about
to start, one waiting for the lock, which logs every 30 s, or one started without the lock). The
bundles and deployed dirs an active job's `job.json` names are in use; while any job is active
every runner file is kept (which one it runs is not known). A held lock whose job cannot be read
keeps everything a job could use.

Nothing is followed: every directory is listed with lstat (`Transport.list_dir`), a link is removed
as the link, a linked `deployed`/`jobs`/`.incoming`/`bundles` dir is left alone, and only entries of
those dirs (and the runner files) are ever removed. Ages are taken on the device's clock.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import shutil
import stat as statmod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hat_edge.devices.profiles import DeviceProfile
from hat_edge.devices.transport import UPLOAD_AGE_S, ConnectionLost, Transport, TransportError, open_transport
from hat_edge.devices import measure
from hat_edge.devices.measure import push_runner, runner_remote_path
from hat_edge.errors import UserError
from hat_edge.latency.store import LatencyStore
from hat_edge.runtime.errors import RunnerError
from hat_edge.runtime.formats import JOB_FILE
from hat_edge.runtime.job import parse_job
from hat_edge.runtime.lock import LOCK_FILE, describe
from hat_edge.space import Arch

log = logging.getLogger(__name__)

RECENT_JOB_S = 600.0  # a job dir written to within this is active
RUNNER_PATTERNS = ("runner-*.pyz", "runner-*.py")

# Kinds, in report order: (key, heading).
KINDS: tuple[tuple[str, str], ...] = (
    ("deployed", "deployed bundles (work_dir/deployed)"),
    ("jobs", "job dirs (work_dir/jobs)"),
    ("uploads", "partial uploads (work_dir/.incoming)"),
    ("bundles", "measurement bundles (work_dir/bundles)"),
    ("runners", "runners (work_dir/runner-*.pyz, runner-*.py)"),
    ("cache", "local export cache"),
)
_DIRS = {"deployed": "deployed", "jobs": "jobs", "uploads": ".incoming", "bundles": "bundles"}


@dataclass(frozen=True)
class CleanItem:
    """One entry removed (or to be removed), or kept, with why."""

    kind: str  # a key of KINDS
    path: str  # device path (kind "cache": a local path)
    bytes: int  # files and links in it, by their own size (links not followed)
    mtime: float  # the newest mtime in it, on its machine's clock
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "bytes": self.bytes, "mb": round(_mb(self.bytes), 3),
                "mtime": self.mtime, "reason": self.reason}


@dataclass
class CleanReport:
    profile: str
    work_dir: str
    dry_run: bool
    lock: dict[str, Any] = field(default_factory=lambda: {"held": False, "holder": None})
    removed: list[CleanItem] = field(default_factory=list)  # with dry_run: what would be
    kept: list[CleanItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # dirs left alone, failures
    cache_dir: str | None = None
    store: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.removed)

    def to_dict(self) -> dict[str, Any]:
        by_kind = {k: {"count": sum(i.kind == k for i in self.removed),
                       "bytes": sum(i.bytes for i in self.removed if i.kind == k)} for k, _ in KINDS}
        return {
            "profile": self.profile, "work_dir": self.work_dir, "dry_run": self.dry_run,
            "cache_dir": self.cache_dir, "store": self.store, "lock": self.lock,
            "removed": [i.to_dict() for i in self.removed], "kept": [i.to_dict() for i in self.kept],
            "by_kind": by_kind, "total_bytes": self.total_bytes, "total_mb": round(_mb(self.total_bytes), 3),
            "notes": list(self.notes),
        }


def _mb(n: int) -> float:
    return n / 2**20


# --------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------
def device_now(t: Transport) -> float:
    """The device's clock (ages of device files are measured against it, not the host's)."""
    return t.device_time()


def board_lock_status(t: Transport) -> dict[str, Any]:
    """{"held": bool, "holder": {...} | None} of the board lock, read as every command reads it
    (`measure.board_state`: the runner's `list-jobs`)."""
    mode = t._lstat_mode(t.join(t.work_dir, LOCK_FILE))
    if mode is None or not statmod.S_ISREG(mode):  # the runner refuses a link (O_NOFOLLOW): nobody holds it
        return {"held": False, "holder": None}
    return measure.lock_of(measure.board_state(t, push_runner(t), f"{t.profile.name}: the board lock"))


def _entries(t: Transport, path: str) -> Iterable[tuple[str, int, int, float]]:
    for name, mode, size, mtime in t.list_dir(path):
        if name in (".", "..") or "/" in name:
            continue
        yield name, mode, size, mtime


def _tree(t: Transport, path: str, mode: int, size: int, mtime: float) -> tuple[int, float]:
    """(bytes of the files and links under path, newest mtime), walked without following links."""
    if not statmod.S_ISDIR(mode):
        return size, mtime
    total, newest = 0, mtime
    for name, m, s, mt in _entries(t, path):
        b, n = _tree(t, t.join(path, name), m, s, mt)
        total += b
        newest = max(newest, n)
    return total, newest


@dataclass
class _Entry:
    path: str
    name: str
    mode: int
    bytes: int
    mtime: float

    @property
    def is_dir(self) -> bool:
        return statmod.S_ISDIR(self.mode)

    def item(self, kind: str, reason: str) -> CleanItem:
        return CleanItem(kind, self.path, self.bytes, self.mtime, reason)


def _scan(t: Transport, kind: str, report: CleanReport) -> list[_Entry]:
    """The entries of work_dir/<kind's dir>, each with its tree's size and newest mtime. A dir
    that is a link (or not a dir) is left alone, with a note."""
    path = t.join(t.work_dir, _DIRS[kind])
    mode = t._lstat_mode(path)
    if mode is None:
        return []
    if not statmod.S_ISDIR(mode):
        what = "a symbolic link" if statmod.S_ISLNK(mode) else "not a directory"
        report.notes.append(f"{path} is {what}: not followed, left alone")
        return []
    out = []
    for name, m, s, mt in _entries(t, path):
        p = t.join(path, name)
        b, n = _tree(t, p, m, s, mt)
        out.append(_Entry(p, name, m, b, n))
    return out


def _norm(p: str) -> str:
    return posixpath.normpath(p) if p else ""


def _within(path: str, top: str) -> bool:
    path, top = _norm(path), _norm(top)
    return path == top or path.startswith(top.rstrip("/") + "/")


def _job_bundles(t: Transport, job_dir: str) -> list[str] | None:
    """The bundle paths a job's job.json names; None when it cannot be read."""
    path = t.join(job_dir, JOB_FILE)
    try:
        bundles, _ = parse_job(t.read_from(path).decode("utf-8"), path)
    except ConnectionLost:
        raise
    except (TransportError, UnicodeDecodeError, RunnerError):
        return None
    return [b["path"] for b in bundles]


def _uploads(t: Transport, older_than_s: float, all_uploads: bool, report: CleanReport,
             now: float | None = None) -> list[_Entry]:
    """Partial uploads to remove; the younger ones go to report.kept."""
    entries = _scan(t, "uploads", report)
    if not entries:
        return []
    cutoff = (device_now(t) if now is None else now) - older_than_s
    out = []
    for e in entries:
        if all_uploads or e.mtime < cutoff:
            out.append(e)
        else:
            report.kept.append(e.item("uploads", f"written to in the last {older_than_s / 60:g} min: "
                                                  "may be an upload in progress; --all-uploads removes it"))
    return out


def _remove(t: Transport, entries: list[tuple[_Entry, str, str]], report: CleanReport, dry_run: bool) -> None:
    """Remove each (entry, kind, reason); record it as removed only once it is gone."""
    for e, kind, reason in entries:
        if not dry_run:
            try:
                t.remove(e.path)
            except ConnectionLost:
                raise
            except TransportError as err:
                report.notes.append(f"could not remove {e.path}: {err}")
                continue
            if t._lstat_mode(e.path) is not None:
                report.notes.append(f"could not remove {e.path} completely (permissions?)")
                continue
        report.removed.append(e.item(kind, reason))


def clean_device(t: Transport, *, dry_run: bool = False, keep_deployed: int = 1, all_uploads: bool = False,
                 report: CleanReport | None = None) -> CleanReport:
    """Clean the work dir of an open transport's device (see the module doc); returns the report
    (`report`, when given, is filled in)."""
    if keep_deployed < 0:
        raise UserError(f"--keep-deployed must be >= 0, got {keep_deployed}")
    rep = report or CleanReport(t.profile.name, t.work_dir, dry_run)
    t._incoming_checked = True  # partial uploads are this command's to list (and a dry run removes nothing)
    rep.lock = board_lock_status(t)
    holder = rep.lock.get("holder") if rep.lock.get("held") else None
    held = bool(rep.lock.get("held"))
    now = device_now(t)

    # Active jobs: the lock holder's, and those written to lately.
    jobs = _scan(t, "jobs", rep)
    live_job = _norm(str(holder.get("job") or "")) if isinstance(holder, dict) else ""
    active: dict[str, str] = {}  # job dir -> why it is active
    if held:
        who = (f"runner pid {holder.get('pid', '?')} of host {holder.get('host', '?')}"
               if isinstance(holder, dict) else "a runner")
        for e in jobs:
            if live_job and (_within(live_job, e.path) or (posixpath.basename(live_job) == e.name
                             and posixpath.basename(posixpath.dirname(live_job)) == "jobs")):
                active[e.path] = f"the job of {who}, which holds the board lock"
    for e in jobs:
        if e.path not in active and e.is_dir and e.mtime >= now - RECENT_JOB_S:
            active[e.path] = (f"written to {max(0.0, now - e.mtime):.0f} s ago: may be a runner starting, waiting "
                              f"for the board lock or run without it (kept for {RECENT_JOB_S / 60:g} min)")
    # What the active jobs use; None: unknown (keep every bundle).
    used: list[str] | None = []
    unknown_why = ""
    if held and not live_job:
        used, unknown_why = None, "a runner holds the board lock but names no job"
    job_dirs = list(active)
    if held and live_job and not any(_within(live_job, p) or posixpath.basename(live_job) == posixpath.basename(p)
                                     for p in job_dirs):
        job_dirs.append(live_job)  # a job outside jobs/: still read what it uses
    for d in job_dirs:
        got = _job_bundles(t, d)
        if got is None:
            used, unknown_why = None, f"the job file of active job {d} cannot be read"
            break
        assert used is not None
        used += got

    plan: list[tuple[_Entry, str, str]] = []
    for e in jobs:
        if e.path in active:
            rep.kept.append(e.item("jobs", active[e.path]))
        else:
            plan.append((e, "jobs", f"untouched for {RECENT_JOB_S / 60:g} min or more, no runner holds it"
                                    if e.is_dir else "not a job dir"))

    for kind in ("deployed", "bundles"):
        entries = _scan(t, kind, rep)
        dirs = sorted((e for e in entries if e.is_dir), key=lambda e: e.mtime, reverse=True)
        newest = {e.path for e in dirs[:keep_deployed]} if kind == "deployed" else set()
        for e in entries:
            if not e.is_dir:
                plan.append((e, kind, "not a bundle directory"))
            elif used is None:
                rep.kept.append(e.item(kind, f"in use? {unknown_why}"))
            elif any(_within(u, e.path) or (posixpath.basename(_norm(u)) == e.name
                                            and posixpath.basename(posixpath.dirname(_norm(u))) == _DIRS[kind])
                     for u in used):
                rep.kept.append(e.item(kind, "in use by an active job"))
            elif e.path in newest:
                which = "the most recently modified" if keep_deployed == 1 else \
                    f"one of the {keep_deployed} most recently modified"
                rep.kept.append(e.item(kind, f"{which} (--keep-deployed {keep_deployed})"))
            else:
                plan.append((e, kind, "not in use" + (f"; older than the {keep_deployed} kept" if kind == "deployed"
                                                       and keep_deployed else "")))

    plan += [(e, "uploads", f"untouched for {UPLOAD_AGE_S / 60:g} min or more" if not all_uploads else "--all-uploads")
             for e in _uploads(t, UPLOAD_AGE_S, all_uploads, rep, now)]

    current = posixpath.basename(runner_remote_path(t))
    for name, mode, size, mtime in _entries(t, t.work_dir.rstrip("/") + "/."):  # the work dir itself may be a link
        if not any(fnmatch.fnmatchcase(name, pat) for pat in RUNNER_PATTERNS) or statmod.S_ISDIR(mode):
            continue
        e = _Entry(t.join(t.work_dir, name), name, mode, size, mtime)
        if name == current:
            rep.kept.append(e.item("runners", "this host's runner"))
        elif active or held:
            rep.kept.append(e.item("runners", "a job is active: its runner may be this one"))
        else:
            plan.append((e, "runners", "another hat-edge version's runner"))

    order = {k: i for i, (k, _) in enumerate(KINDS)}
    plan.sort(key=lambda x: (order[x[1]], x[0].path))
    _remove(t, plan, rep, dry_run)
    return rep


# --------------------------------------------------------------------------------------------
# Host side: the export cache
# --------------------------------------------------------------------------------------------
def _local_tree(path: Path) -> tuple[int, float]:
    st = os.lstat(path)
    total, newest = 0, st.st_mtime
    if not statmod.S_ISDIR(st.st_mode):
        return st.st_size, st.st_mtime
    for root, dirs, files in os.walk(path):  # os.walk does not follow links to directories
        for name in dirs + files:
            try:
                s = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            newest = max(newest, s.st_mtime)
            if not statmod.S_ISDIR(s.st_mode):
                total += s.st_size
    return total, newest


def _read_manifest(entry: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(entry / "manifest.json", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(4 << 20)
        out = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return out if isinstance(out, dict) else None


def clean_cache(profile: DeviceProfile, store_path: str | Path, cache_dir: str | Path | None = None, *,
                dry_run: bool = False, report: CleanReport | None = None) -> CleanReport:
    """Remove export cache entries whose measurement is stored for `profile` (same arch, runtime,
    precision, vocabulary and the profile's settings). Entries in use by a measurement of this
    process, without a readable manifest (an export in progress) or not real dirs are kept."""

    rep = report or CleanReport(profile.name, "", dry_run)
    cache = Path(cache_dir) if cache_dir else measure.default_cache_dir()
    rep.cache_dir, rep.store = str(cache), str(store_path)
    if not Path(store_path).is_file():
        rep.notes.append(f"no latency store at {store_path}: the export cache is left alone (--store)")
        return rep
    if not os.path.lexists(cache):
        return rep
    if not cache.is_dir() or cache.is_symlink():
        rep.notes.append(f"{cache} is not a directory (or is a link): not followed, left alone")
        return rep
    store = LatencyStore(store_path)
    try:
        for entry in sorted(cache.iterdir()):
            try:
                size, mtime = _local_tree(entry)
            except FileNotFoundError:  # removed meanwhile
                continue

            def keep(why: str, entry: Path = entry, size: int = size, mtime: float = mtime) -> None:
                rep.kept.append(CleanItem("cache", str(entry), size, mtime, why))

            if entry.is_symlink() or not entry.is_dir():
                keep("not an export directory")
                continue
            if entry.name.startswith(".partial-"):  # an export being written (measure._export)
                pid = _partial_pid(entry.name)
                if pid is None or _pid_alive(pid):
                    keep("an export in progress" + (f" (pid {pid})" if pid else ""))
                    continue
                if not dry_run:
                    shutil.rmtree(entry, ignore_errors=True)  # rmtree does not follow links inside
                    if os.path.lexists(entry):
                        keep(f"left by a stopped export (pid {pid}), could not be removed completely")
                        continue
                rep.removed.append(CleanItem("cache", str(entry), size, mtime,
                                             f"left by a stopped export (pid {pid} is gone)"))
                continue
            m = _read_manifest(entry)
            if m is None:
                keep("no readable manifest.json: an export in progress, or damaged")
                continue
            try:
                arch = Arch.from_dict(m["arch"], f"{entry}/manifest.json")
                precision = m.get("precision", "fp32")
                quantize = None if precision == "fp32" else str(precision)
                vocab = (m.get("model") or {}).get("vocab_size")
            except (UserError, KeyError, TypeError, AttributeError):
                keep("manifest without a readable arch")
                continue
            settings = profile.measure_spec(quantize).identity()
            if m.get("runtime") != profile.runtime:
                keep(f"runtime {m.get('runtime')}, the profile's is {profile.runtime}")
                continue
            if vocab != settings.get("vocab_size"):
                keep(f"vocabulary {vocab}, the profile measures {settings.get('vocab_size')}")
                continue
            if not store.has(profile.name, arch, profile.runtime, settings):
                keep(f"not stored for {profile.name} yet")
                continue
            if dry_run:
                with measure._IN_USE_LOCK:
                    if entry in measure._IN_USE:
                        keep("in use by a measurement in this process")
                        continue
            elif not measure.remove_export_if_unused(entry):
                if os.path.lexists(entry) and entry in measure._IN_USE:
                    keep("in use by a measurement in this process")
                elif os.path.lexists(entry):
                    keep("in use by another hat-edge process, or could not be removed completely")
                continue
            rep.removed.append(CleanItem("cache", str(entry), size, mtime,
                                         f"stored for {profile.name} in {store.path}"))
    finally:
        store.close()
    return rep


def _partial_pid(name: str) -> int | None:
    """The pid in `.partial-<key>-<pid>-<8 hex>` (measure._export's temporary name), else None."""
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and len(parts[2]) == 8:
        return int(parts[1])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


# --------------------------------------------------------------------------------------------
def clean(profile: DeviceProfile, *, dry_run: bool = False, keep_deployed: int = 1, all_uploads: bool = False,
          store_path: str | Path | None = None, cache_dir: str | Path | None = None,
          trust_new_host: bool = False) -> CleanReport:
    """Clean the device's work dir, then the host's export cache (skipped without `store_path`)."""
    with open_transport(profile, trust_new_host=trust_new_host) as t:
        rep = clean_device(t, dry_run=dry_run, keep_deployed=keep_deployed, all_uploads=all_uploads)
    if store_path is not None:
        clean_cache(profile, store_path, cache_dir, dry_run=dry_run, report=rep)
    return rep


def render_clean(rep: CleanReport) -> str:
    """One line per item, grouped by kind; kept items with their reason; the total."""
    verb = "would remove" if rep.dry_run else "removed"
    lines = [f"{rep.profile}: {rep.work_dir}" + ("  (dry run: nothing removed)" if rep.dry_run else "")]
    holder = rep.lock.get("holder")
    if rep.lock.get("held"):
        lines.append(f"board lock: held by {describe(holder)}")
    else:
        lines.append("board lock: free")
    for kind, heading in KINDS:
        items = [(verb, i) for i in rep.removed if i.kind == kind] + [("kept", i) for i in rep.kept if i.kind == kind]
        if not items:
            continue
        if kind == "cache" and rep.cache_dir:
            heading = f"{heading} ({rep.cache_dir})"
        lines.append(heading)
        w = max(len(v) for v, _ in items)
        for v, i in items:
            why = f"  ({i.reason})" if v == "kept" else ""
            lines.append(f"  {v:<{w}} {_mb(i.bytes):9.2f} MB  {i.path}{why}")
    for n in rep.notes:
        lines.append(f"note: {n}")
    lines.append(f"total: {_mb(rep.total_bytes):.2f} MB in {len(rep.removed)} item(s) "
                 + ("would be removed" if rep.dry_run else "removed"))
    return "\n".join(lines)


__all__ = [
    "CleanItem",
    "CleanReport",
    "KINDS",
    "RECENT_JOB_S",
    "UPLOAD_AGE_S",
    "board_lock_status",
    "clean",
    "clean_cache",
    "clean_device",
    "device_now",
    "render_clean",
]
