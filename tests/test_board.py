"""One runner per board: interrupted, killed and concurrent commands, against the suite's real
sshd on loopback and the local profile. Each test runs the real `hat-edge measure` command in a
subprocess (the way a user's terminal does), interrupts or kills it, and looks at the board's
process list, its lock and the latency store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MEAS = {"warmup": 1, "min_repeats": 3, "min_time_s": 1.0, "vocab_size": 1000, "timeout_s": 120.0}


def _toml(fields: dict, meas: dict) -> str:
    def v(x):
        return json.dumps(x) if isinstance(x, str) else str(x)
    lines = [f"{k} = {v(x)}" for k, x in fields.items() if x is not None]
    return "\n".join(lines + ["", "[measurement]"] + [f"{k} = {v(x)}" for k, x in meas.items()]) + "\n"


@pytest.fixture
def board(request, tmp_path, sshd_server, ssh_profile):
    """(profile file, work dir) for 'ssh' (the loopback sshd, the board venv) or 'local'."""
    work = tmp_path / "board-work"
    if request.param == "ssh":
        p = ssh_profile(sshd_server)
        fields = {"name": "loop", "transport": "ssh", "host": p.host, "port": p.port, "user": p.user,
                  "identity_file": p.identity_file, "known_hosts": p.known_hosts, "python": p.python,
                  "work_dir": str(work), "threads": 1}
    else:
        fields = {"name": "loop", "transport": "local", "work_dir": str(work), "threads": 1}
    path = tmp_path / "loop.toml"
    path.write_text(_toml(fields, MEAS))
    return path, work


def _terminal_signals() -> None:
    """The child starts with Ctrl-C's default disposition, as from a terminal: a test session
    started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and
    every child with it, so the Ctrl-C these tests send would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _measure(tmp: Path, profile: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HAT_EDGE_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "hat_edge", "measure", "--profile", str(profile), "--store", str(tmp / "lat.sqlite"),
           "--batch-size", "2", "--no-progress", "--json", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=_terminal_signals)


def _rows(store: Path) -> list[tuple]:
    if not store.exists():
        return []
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT arch_key, settings_json, env_json FROM latency").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


def _wait_rows(store: Path, n: int, proc: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while len(_rows(store)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no rows stored in time"
        time.sleep(0.2)


def _runners(work: Path) -> list[int]:
    """Runner processes timing on this board: `... runner-*.pyz run JOB ...` under its work dir."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 3 and b"runner-" in argv[1] and argv[2] == b"run" and str(work).encode() in argv[3]:
            out.append(int(d.name))
    return out


def _gone_within(work: Path, seconds: float) -> bool:
    """No runner of the board is left by `seconds` from now (polled, not slept: it returns as soon
    as the last one is gone; a command that has exited starts no new one)."""
    deadline = time.monotonic() + seconds
    while _runners(work):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _ppid(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[1].decode()
    except (OSError, IndexError):
        return "gone"


def _no_overlap(rows: list[tuple]) -> None:
    spans = sorted((m["timed_from"], m["timed_to"]) for m in (json.loads(r[2])["measurement"] for r in rows))
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert b0 >= a1, f"two models timed at once: {a0:.2f}-{a1:.2f} and {b0:.2f}-{b1:.2f}"


@pytest.mark.parametrize("board", ["ssh", "local"], indirect=True)
def test_ctrl_c_stops_the_runner_keeps_rows_and_a_rerun_measures_the_rest(board, tmp_path) -> None:
    profile, work = board
    store = tmp_path / "lat.sqlite"
    proc = _measure(tmp_path, profile, "-n", "4")
    _wait_rows(store, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
    proc.communicate(timeout=60)
    assert _gone_within(work, 5.0), "a runner is still timing 5 s after the command stopped"
    kept = len(_rows(store))
    assert 1 <= kept < 4
    assert not list((work / "jobs").iterdir()) if (work / "jobs").exists() else True
    again = _measure(tmp_path, profile, "-n", "4")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    summary = json.loads(out)[0]
    assert summary["stored_before"] == kept and summary["measured"] == 4 - kept
    rows = _rows(store)
    assert len(rows) == 4 == len({(r[0], r[1]) for r in rows})


@pytest.mark.parametrize("board", ["ssh", "local"], indirect=True)
def test_sigterm_and_sighup_stop_the_runner_like_ctrl_c(board, tmp_path) -> None:
    profile, work = board
    store = tmp_path / "lat.sqlite"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = _measure(tmp_path, profile, "-n", "6", "--seed", str(sig))
        _wait_rows(store, len(_rows(store)) + 1, proc)
        os.kill(proc.pid, sig)  # a closed terminal or `kill`: the command itself, not its group
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert _gone_within(work, 3.0), sig


@pytest.mark.parametrize("board", ["ssh", "local"], indirect=True)
def test_kill_9_then_rerun_at_once_never_runs_two_and_loses_nothing(board, tmp_path) -> None:
    """kill -9 of the host mid-batch, then the same command again at once, while a watcher samples
    the process table. The killed command's runner notices its host's end of its stdin close (the
    local pipe, or the SSH channel with the connection) and stops by itself within seconds: no
    orphan goes on timing (it did for 12-20 s before #27). The rerun stores what that job finished
    (its result lines are on disk), measures only the rest, and at no moment do two runner
    processes of the board exist, a waiting one included."""
    profile, work = board
    profile.write_text(profile.read_text().replace("min_time_s = 1.0", "min_time_s = 1.5"))
    store = tmp_path / "lat.sqlite"
    proc = _measure(tmp_path, profile, "-n", "6", "--batch-size", "4")  # 4 models in one runner: >= 6 s
    _wait_rows(store, 1, proc)
    orphan = _runners(work)
    assert orphan, "the batch's runner should be timing"
    seen: list[int] = []
    done = threading.Event()

    pids: list[list[tuple[int, str]]] = []

    def watch() -> None:
        while not done.is_set():
            now = _runners(work)
            seen.append(len(now))
            if len(now) > 1:  # who: (pid, parent pid): a runner's own child would name the runner
                pids.append([(p, _ppid(p)) for p in now])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t_kill = time.monotonic()
    before = len(_rows(store))
    again = _measure(tmp_path, profile, "-n", "6")  # at once
    deadline = t_kill + 5
    while set(orphan) & set(_runners(work)):
        assert time.monotonic() < deadline, "the killed command's runner is still timing 5 s later"
        time.sleep(0.05)
    out, err = again.communicate(timeout=600)
    done.set()
    watcher.join()
    assert again.returncode == 0, err
    assert max(seen) == 1, (pids[:3], orphan, err[-2000:])  # never two at once
    adopted = sum(int(n) for n in re.findall(r"stored (\d+) result\(s\) a stopped command left", err))
    summary = json.loads(out)[0]
    rows = _rows(store)
    assert len(rows) == 6 == len({(r[0], r[1]) for r in rows})  # nothing lost, no duplicate row
    # What the killed job finished was stored (by it, or adopted by the rerun), not measured again.
    assert summary["stored_before"] == before and summary["adopted"] == adopted
    assert summary["measured"] == 6 - before - adopted >= 1
    _no_overlap(rows)


@pytest.mark.parametrize("board", ["local"], indirect=True)
@pytest.mark.parametrize("delay", [0.0, 0.4])
def test_ctrl_c_the_moment_a_runner_starts_leaves_none(board, tmp_path, delay: float) -> None:
    """Ctrl-C as a terminal sends it (SIGINT to the whole foreground group) right as a runner has
    started, when the host may still be inside the code that spawns it: within 5 s no runner of the
    job is left, and the rows stored stay stored."""
    profile, work = board
    store = tmp_path / "lat.sqlite"
    proc = _measure(tmp_path, profile, "-n", "4", "--batch-size", "4")
    deadline = time.monotonic() + 240
    while not _runners(work):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(delay)
    kept = len(_rows(store))
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    while _runners(work):
        assert time.monotonic() - t0 < 5, "a runner is still timing 5 s after Ctrl-C"
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert len(_rows(store)) >= kept


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def test_runner_stops_by_itself_when_its_host_is_killed(tmp_path) -> None:
    """The runner's own side of it: started by a host process that is then killed with -9, a
    runner with --watch-host stops within 2 s (exit status 3, its finished lines kept), one
    without it goes on timing."""
    from hat_edge.exporters import export_bundle
    from hat_edge.model import SubTransformer
    from hat_edge.runtime import pack
    from hat_edge.runtime.job import MeasureSpec, write_job
    from hat_edge.space import get_space

    b = export_bundle(SubTransformer.random(get_space("demo").smallest(), 500, seed=0), tmp_path / "b", fmt="onnx",
                      exporter="torchscript")
    spec = MeasureSpec(warmup=1, min_repeats=200, min_time_s=30.0, max_repeats=10_000, src_len=8, steps=8, beam=1)
    job = write_job(tmp_path / "job.json", [("m0", str(b)), ("m1", str(b))], spec)
    runner = str(pack.build_runner())
    for watch in (True, False):
        out = tmp_path / f"res-{watch}.jsonl"
        # the "host": a python that starts the runner with a pipe as its stdin, then sleeps
        host = subprocess.Popen([sys.executable, "-c", (
            "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE); "
            "print(p.pid, flush=True); time.sleep(600)"), sys.executable, runner, "run", str(job), "--out", str(out),
            *(["--watch-host"] if watch else [])], stdout=subprocess.PIPE, text=True)
        pid = int(host.stdout.readline())
        time.sleep(1.0)
        host.kill()
        host.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4 and _alive(pid):
            time.sleep(0.05)
        alive = _alive(pid)
        if watch:
            assert not alive and time.monotonic() - t0 < 2.5
        else:
            assert alive, "without --watch-host the runner should outlive its host"
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("board", ["ssh"], indirect=True)
def test_two_commands_on_one_board_take_turns_or_refuse(board, tmp_path) -> None:
    profile, work = board
    profile.write_text(profile.read_text().replace("min_time_s = 1.0", "min_time_s = 2.5"))
    store = tmp_path / "lat.sqlite"
    # A times >= 15 s in one runner: room for the --no-wait command's start-up on a loaded machine
    a = _measure(tmp_path, profile, "-n", "6", "--seed", "1", "--batch-size", "6")
    deadline = time.monotonic() + 240
    while not _runners(work):
        assert a.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    # --no-wait: refused at once, one line naming the runner that holds the board.
    r = subprocess.run([sys.executable, "-m", "hat_edge", "measure", "--profile", str(profile), "--store",
                        str(tmp_path / "other.sqlite"), "-n", "1", "--seed", "9", "--no-progress", "--no-wait"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HAT_EDGE_CACHE": str(tmp_path / "cache2")})
    assert r.returncode != 0
    msg = r.stderr.strip().splitlines()[-1]
    assert "the board is busy" in msg and "runner pid" in msg and str(work) in msg
    assert not (tmp_path / "cache2" / "bundles").exists()  # refused before exporting anything
    # Without it: the second command waits for its turn (on the same board, at 0.3 s a model).
    quick = tmp_path / "quick.toml"
    quick.write_text(profile.read_text().replace("min_time_s = 2.5", "min_time_s = 0.3"))
    b = _measure(tmp_path, quick, "-n", "3", "--seed", "2")
    for p in (a, b):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    rows = _rows(store)
    assert len(rows) == len({(r[0], r[1]) for r in rows}) >= 5  # seeds may share an arch
    _no_overlap(rows)


@pytest.mark.parametrize("board", ["ssh", "local"], indirect=True)
def test_ctrl_c_during_deploys_benchmark_stops_the_runner(board, tmp_path) -> None:
    """Every path that starts a runner stops it: here deploy's on-device benchmark."""
    from hat_edge.exporters import export_bundle
    from hat_edge.model import SubTransformer
    from hat_edge.space import get_space

    profile, work = board
    arch = get_space("demo").sample_n(1, seed=3)[0]
    bundle = export_bundle(SubTransformer.random(arch, 1000, seed=0), tmp_path / "bundle", fmt="onnx",
                           exporter="torchscript")
    proc = subprocess.Popen([sys.executable, "-m", "hat_edge", "deploy", "--profile", str(profile), "--bundle",
                             str(bundle)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_terminal_signals,
                            env={**os.environ, "HAT_EDGE_CACHE": str(tmp_path / "cache")})
    deadline = time.monotonic() + 240
    while not _runners(work):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _gone_within(work, 3.0)
    assert not any((work / "jobs").iterdir())  # the benchmark's job dir was removed too
