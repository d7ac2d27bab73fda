"""Device profiles, transports (a real OpenSSH server on 127.0.0.1), measurement and CLI.

The "board" is a separate virtualenv holding only numpy + onnxruntime; the SSH tests log in to a
real sshd started by the test suite (tests/ssh_fixtures.py), with a generated host and user key.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hat_edge.devices.profiles import (
    PACKAGE_PROFILES,
    ProfileError,
    list_profiles,
    load_profile,
    load_profile_file,
)
from hat_edge.devices.transport import (
    CommandTimeout,
    HostKeyError,
    SSHTransport,
    TransportError,
    open_transport,
    quote_argv,
)

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------
def test_shipped_profiles_load_with_hat_settings() -> None:
    for name in ("local-cpu", "local-gpu", "raspberrypi4", "jetson-nano"):
        p = load_profile_file(REPO / "device_profiles" / f"{name}.toml")
        assert p.name == name
        m = p.measurement
        assert (m.src_len, m.steps, m.beam, m.warmup) == (30, 30, 5, 5)  # HAT's settings
    assert load_profile_file(REPO / "device_profiles" / "local-gpu.toml").device == "cuda"
    assert load_profile_file(REPO / "device_profiles" / "raspberrypi4.toml").transport == "ssh"


def test_embedded_profiles_match_repo_and_work_without_it(tmp_path: Path, monkeypatch) -> None:
    for name in ("local-cpu", "local-gpu"):
        assert (PACKAGE_PROFILES / f"{name}.toml").read_text() == (REPO / "device_profiles" / f"{name}.toml").read_text()
    monkeypatch.chdir(tmp_path)  # no ./device_profiles here: the embedded copy is found
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HAT_EDGE_PROFILE_PATH", raising=False)
    p = load_profile("local-cpu")
    assert p.source == str(PACKAGE_PROFILES / "local-cpu.toml")
    assert {e.name for e in list_profiles()} == {"local-cpu", "local-gpu"}


def test_profile_search_path_and_unknown_name(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mine.toml").write_text('transport = "local"\nthreads = 2\n')
    monkeypatch.setenv("HAT_EDGE_PROFILE_PATH", str(tmp_path))
    p = load_profile("mine")
    assert p.name == "mine" and p.threads == 2  # name defaults to the file name
    with pytest.raises(ProfileError, match=r"unknown profile 'nope', allowed: .*local-cpu.*mine"):
        load_profile("nope")


BAD_FIELDS = [
    ('transport = "telnet"', "field 'transport' is 'telnet', allowed: local, ssh"),
    ('runtime = "tensorrt"', "field 'runtime' is 'tensorrt', allowed: onnxruntime, torchscript"),
    ('transport = "ssh"\nhost = "h"\nport = 70000', "field 'port' is 70000, allowed: an integer 1-65535"),
    ('transport = "ssh"\nhost = "h"\nport = "22"', "field 'port' is '22', allowed: an integer 1-65535"),
    ("threads = -1", "field 'threads' is -1, allowed: an integer >= 0"),
    ("cpu_affinity = []", "field 'cpu_affinity' is [], allowed: a non-empty list"),
    ('colour = "red"', "unknown field 'colour', allowed: name, description, transport"),
    ("[measurement]\nbeam = 0", "field 'measurement.beam' is 0, allowed: an integer >= 1"),
    ("[measurement]\ntimeout_s = 0", "field 'measurement.timeout_s' is 0, allowed: a number > 0"),
    ("[measurement]\nwarm_up = 3", "unknown field 'measurement.warm_up', allowed: src_len, steps"),
    ('transport = "ssh"', "field 'host' is missing"),
    ('host = "pi"', "field 'host' is set but transport is 'local'"),
    ('device = "cuda"', "field 'runtime' is 'onnxruntime' with device 'cuda', allowed: 'torchscript'"),
    ('[env]\n"BAD-NAME" = "x"', "field 'env' is {'BAD-NAME': 'x'}, allowed: a table"),
    ('name = "has space"', "field 'name' is 'has space', allowed: letters, digits"),
    ("threads = [", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD_FIELDS, ids=[m.split(",")[0] for _, m in BAD_FIELDS])
def test_bad_profile_fields_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ProfileError) as ei:
        load_profile_file(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert message in msg


def test_bad_profile_via_cli_is_one_line(tmp_path: Path) -> None:
    from hat_edge.cli import cli

    path = tmp_path / "bad.toml"
    path.write_text('transport = "ssh"\nhost = "h"\nport = 0\n')
    res = CliRunner().invoke(cli, ["profile", "show", str(path)])
    assert res.exit_code != 0
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "field 'port' is 0, allowed: an integer 1-65535" in lines[0]
    assert "Traceback" not in res.output


def test_quote_argv_neutralises_shell_syntax() -> None:
    hostile = ["/w d;touch /tmp/pwned", "$(reboot)", "`id`", "a'b", "x && y"]
    q = quote_argv(hostile)
    import shlex

    assert shlex.split(q) == hostile


# ---------------------------------------------------------------------------------------------
# Local transport
# ---------------------------------------------------------------------------------------------
def test_local_transport_push_run_timeout(tmp_path: Path) -> None:
    from hat_edge.devices.profiles import profile_from_dict

    p = profile_from_dict({"name": "l", "work_dir": str(tmp_path / "w ;d")}, "<t>")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    with open_transport(p) as t:
        dst = t.join(t.work_dir, "sub", "f.bin")
        assert t.push(src, dst) is True and t.push(src, dst) is False  # skipped: same sha256
        assert Path(dst).read_bytes() == src.read_bytes()
        assert t.read_from(dst, 990) == src.read_bytes()[990:]
        r = t.run(["sh", "-c", 'echo "$X"'], env={"X": "v;1"})
        assert r.returncode == 0 and r.stdout == "v;1\n"
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match="timed out after 0.5 s"):
            t.run(["sleep", "30"], timeout=0.5)
        assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------------------------------------
# SSH transport against a real sshd
# ---------------------------------------------------------------------------------------------


@pytest.mark.ssh
def test_ssh_run_push_fetch_and_hostile_work_dir(sshd_server, ssh_profile, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    work = tmp_path / f"board dir;touch {marker};$(touch {marker})"
    p = ssh_profile(sshd_server, work_dir=str(work), env={"HOSTILE": f"x; touch {marker}"})
    src = tmp_path / "model.onnx"
    src.write_bytes(os.urandom(200_000))
    with open_transport(p) as t:
        assert isinstance(t, SSHTransport) and t.work_dir == str(work)
        dst = t.join(t.work_dir, "b 1", "model.onnx")
        assert t.push(src, dst) is True
        assert t.push(src, dst) is False  # present with the same sha256: skipped
        assert (work / "b 1" / "model.onnx").read_bytes() == src.read_bytes()
        src.write_bytes(os.urandom(1000))
        assert t.push(src, dst) is True  # changed: uploaded again
        got = t.fetch(dst, tmp_path / "back.onnx")
        assert got.read_bytes() == src.read_bytes()
        r = t.run(["sh", "-c", 'printf %s "$HOSTILE"; printf %s "$1"', "sh", "a'b $(id)"], env=p.env_dict)
        assert r.returncode == 0 and r.stdout == f"x; touch {marker}a'b $(id)"
        assert not list((work / ".incoming").iterdir())  # uploads went through temp names, none left
        assert sorted(x.name for x in (work / "b 1").iterdir()) == ["model.onnx"]
        t.remove(t.join(t.work_dir, "b 1"))
        assert not (work / "b 1").exists()
    assert not marker.exists()  # nothing in a profile value ever ran as a command


@pytest.mark.ssh
def test_ssh_remove_walks_trees_over_sftp_without_following_links(sshd_server, ssh_profile, tmp_path: Path) -> None:
    work = tmp_path / "board"
    keep = tmp_path / "outside"
    keep.mkdir()
    (keep / "precious").write_text("x")
    p = ssh_profile(sshd_server, work_dir=str(work))
    with open_transport(p) as t:
        t.makedirs(t.join(t.work_dir, "job", "deep", "er"))
        (work / "job" / "deep" / "er" / "f.bin").write_bytes(b"1")
        (work / "job" / "top.json").write_text("{}")
        (work / "job" / "link-to-outside").symlink_to(keep, target_is_directory=True)
        (work / "lone").write_text("y")
        t.remove(t.join(t.work_dir, "job"), t.join(t.work_dir, "lone"), t.join(t.work_dir, "never-there"))
        assert sorted(x.name for x in work.iterdir()) == []
        assert (keep / "precious").read_text() == "x"  # the link was removed, not what it points to
        # A removed directory is made again on the next upload (the known-directories cache forgot it).
        src = tmp_path / "m.onnx"
        src.write_bytes(b"abc")
        assert t.push(src, t.join(t.work_dir, "job", "deep", "m.onnx")) is True
        assert (work / "job" / "deep" / "m.onnx").read_bytes() == b"abc"
        # Removed behind the connection's back (by hand on the board): made again, not an error.
        shutil.rmtree(work / "job")
        shutil.rmtree(work / ".incoming")
        assert t.push(src, t.join(t.work_dir, "job", "deep", "m.onnx")) is True
        assert (work / "job" / "deep" / "m.onnx").read_bytes() == b"abc"


@pytest.mark.ssh
def test_ssh_command_timeout_kills_the_command(sshd_server, ssh_profile, tmp_path: Path) -> None:
    p = ssh_profile(sshd_server)
    flag = tmp_path / "still-running"
    with open_transport(p) as t:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match=r"timed out after 1 s and was killed"):
            t.run(["sh", "-c", f'sleep 2; touch "{flag}"'], timeout=1)
        assert time.monotonic() - t0 < 10
        assert t.run(["true"]).returncode == 0  # the connection is still usable
    time.sleep(2.5)
    assert not flag.exists()  # the remote command was killed, not left running


@pytest.mark.ssh
def test_ssh_unknown_host_refused_then_trusted_explicitly(sshd_server, ssh_profile) -> None:
    p = ssh_profile(sshd_server, trusted=False)
    known = Path(p.known_hosts)
    with pytest.raises(HostKeyError) as ei:
        open_transport(p)
    msg = str(ei.value)
    assert f"[127.0.0.1]:{sshd_server.port} is not in {known}" in msg
    assert "ssh-keyscan" in msg and "--trust-new-host" in msg and "SHA256:" in msg
    assert known.read_text() == ""
    with open_transport(p, trust_new_host=True) as t:
        assert t.run(["true"]).returncode == 0
    assert known.read_text() == sshd_server.known_hosts_line()
    with open_transport(p) as t:  # now known: no flag needed
        assert t.run(["true"]).returncode == 0


@pytest.mark.ssh
def test_ssh_changed_host_key_refused_even_with_trust(make_sshd, ssh_profile, tmp_path: Path) -> None:
    from ssh_fixtures import keygen

    server = make_sshd()
    p = ssh_profile(server)
    known = Path(p.known_hosts)
    other = keygen(tmp_path / "impostor_key")
    kind, b64 = Path(f"{other}.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{server.port} {kind} {b64}\n")  # a different key for this host
    for trust in (False, True):
        with pytest.raises(HostKeyError, match=r"has CHANGED .* refusing to connect.*ssh-keygen -R"):
            open_transport(p, trust_new_host=trust)
    assert known.read_text() == f"[127.0.0.1]:{server.port} {kind} {b64}\n"  # left alone


@pytest.mark.ssh
def test_ssh_config_alias_is_honoured(sshd_server, ssh_profile, ssh_user_key, tmp_path: Path, monkeypatch) -> None:
    base = ssh_profile(sshd_server)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        "Host myboard\n"
        "  HostName 127.0.0.1\n"
        f"  Port {sshd_server.port}\n"
        f"  IdentityFile {ssh_user_key}\n"
        f"  UserKnownHostsFile {base.known_hosts}\n"
    )
    monkeypatch.setenv("HAT_EDGE_SSH_CONFIG", str(cfg))
    from dataclasses import replace

    p = replace(base, host=None, port=None, identity_file=None, known_hosts=None, ssh_config_host="myboard")
    with open_transport(p) as t:
        assert t.target.port == sshd_server.port and t.target.known_hosts == base.known_hosts
        assert t.run(["true"]).returncode == 0


@pytest.mark.ssh
def test_ssh_refused_connection_retries_then_fails(ssh_profile, sshd_server, tmp_path: Path) -> None:
    from dataclasses import replace

    from ssh_fixtures import free_port

    p = replace(ssh_profile(sshd_server), port=free_port())  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        open_transport(p, retries=2, backoff_s=0.2)
    assert time.monotonic() - t0 >= 0.6  # 0.2 + 0.4 s of backoff


# ---------------------------------------------------------------------------------------------
# Measurement: export, runner, store (local and over SSH)
# ---------------------------------------------------------------------------------------------
# Small settings keep each model well under a second; exports are shared by the tests below.
FAST = {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0, "vocab_size": 1000, "timeout_s": 120.0}


@pytest.fixture(scope="module")
def demo_archs():
    from hat_edge.space import PRESETS

    return PRESETS["demo"].sample_n(4, seed=0)


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory) -> Path:
    """One export cache for this module (kept across tests: exporting is the slow part)."""
    return tmp_path_factory.mktemp("exports")


def _local_profile(tmp_path: Path, **meas):
    from hat_edge.devices.profiles import profile_from_dict

    return profile_from_dict({"name": "local-test", "threads": 1, "work_dir": str(tmp_path / "work"),
                              "measurement": {**FAST, **meas}}, "<local test profile>")


def _distinct_rows(store) -> tuple[int, int]:
    rows = store._db.execute("SELECT COUNT(*), COUNT(DISTINCT device || arch_key || settings_json) FROM latency")
    return tuple(rows.fetchone())


def test_measure_local_stores_and_skips_stored(tmp_path: Path, demo_archs, export_cache) -> None:
    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    p = _local_profile(tmp_path)
    store = LatencyStore(tmp_path / "lat.sqlite")
    seen = []
    recs = measure_archs(p, demo_archs[:3], store, progress=False, batch_size=2, cache_dir=export_cache,
                         keep_exports=True, on_record=seen.append)
    assert [r.arch for r in recs] == demo_archs[:3] and len(seen) == 3
    for r in recs:
        assert r.device == "local-test" and r.runtime == "onnxruntime" and r.settings == p.measure_spec().identity()
        assert len(r.runs) >= 3 and r.median_ms > 0 and r.p90_ms >= r.median_ms * 0.5
        assert r.encoder_ms is not None and r.decoder_ms is not None
        assert r.features == tuple(r.arch.features())
    # Again, with one more arch: only the new one is measured.
    seen.clear()
    recs2 = measure_archs(p, demo_archs, store, progress=False, cache_dir=export_cache, keep_exports=True,
                          on_record=seen.append)
    assert [r.arch for r in seen] == [demo_archs[3]] and len(recs2) == 4
    assert recs2[0].median_ms == recs[0].median_ms  # the stored record, not a new measurement
    assert _distinct_rows(store) == (4, 4)
    assert list((tmp_path / "work" / "jobs").iterdir()) == []  # job files removed


def _board_leftovers(work: Path) -> list[str]:
    # The runner's own files stay by design: its zipapp and the board lock (runner.lock).
    return sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and not p.name.startswith("runner"))


@pytest.mark.ssh
def test_measure_batch_over_ssh(sshd_server, ssh_profile, tmp_path: Path, demo_archs, export_cache) -> None:
    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    p = ssh_profile(sshd_server, measurement=FAST)
    store = LatencyStore(tmp_path / "lat.sqlite")
    recs = measure_archs(p, demo_archs[:3], store, progress=False, batch_size=3, cache_dir=export_cache,
                         keep_exports=True)
    assert len(recs) == 3 and store.count() == 3
    env = recs[0].env
    # measured by the board's python: numpy + onnxruntime only
    assert env["numpy"] and env["onnxruntime"] and env["torch"] is None
    assert env["measurement"]["timing"] == "perf_counter"
    work = Path(p.work_dir)
    assert _board_leftovers(work) == []  # bundles, job files and upload temps all removed
    assert len(list(work.glob("runner-*.pyz"))) == 1


def _runner_processes(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd and b"runner" in cmd and b"pytest" not in cmd:
                out.append(int(d.name))
    return out


@pytest.mark.ssh
def test_sshd_killed_mid_batch_then_resumed_run_completes(make_sshd, ssh_profile, tmp_path: Path, demo_archs,
                                                         export_cache) -> None:
    from hat_edge.devices.measure import measure_archs
    from hat_edge.devices.transport import ConnectionLost
    from hat_edge.latency.store import LatencyStore

    server = make_sshd()
    # each model takes >= 1.5 s, so the plug is pulled while the second one is still running
    p = ssh_profile(server, measurement=dict(FAST, min_time_s=1.5))
    store = LatencyStore(tmp_path / "lat.sqlite")

    def pull_the_plug(rec) -> None:
        if store.count() == 1:
            server.kill(sessions_too=True)  # the board loses power after its first model

    with pytest.raises(ConnectionLost, match="run the same command again to resume"):
        measure_archs(p, demo_archs, store, progress=False, batch_size=4, cache_dir=export_cache,
                      keep_exports=True, on_record=pull_the_plug, reconnect_tries=1, backoff_s=0.1)
    assert store.count() == 1  # the finished model was committed before the link went
    server.start()
    resumed = []
    recs = measure_archs(p, demo_archs, store, progress=False, batch_size=4, cache_dir=export_cache,
                         keep_exports=True, on_record=resumed.append)
    assert len(resumed) == 3  # only the missing ones
    assert sorted(r.arch.to_json() for r in recs) == sorted(a.to_json() for a in demo_archs)
    assert _distinct_rows(store) == (4, 4)  # no duplicate, no lost row


@pytest.mark.ssh
def test_link_drop_mid_batch_is_recovered_in_the_same_run(make_sshd, ssh_profile, tmp_path: Path, demo_archs,
                                                          export_cache, caplog) -> None:
    import threading

    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    server = make_sshd()
    p = ssh_profile(server, measurement=FAST)
    store = LatencyStore(tmp_path / "lat.sqlite")
    dropped = threading.Event()
    restart = threading.Timer(1.0, server.start)

    def drop_link(rec) -> None:
        if not dropped.is_set():
            dropped.set()
            server.kill(sessions_too=False)  # connections die; the runner is orphaned, still running
            restart.start()

    try:
        recs = measure_archs(p, demo_archs, store, progress=False, batch_size=4, cache_dir=export_cache,
                             keep_exports=True, on_record=drop_link, reconnect_tries=5, backoff_s=0.5)
    finally:
        restart.cancel()
        if restart.is_alive():
            restart.join()  # never restart the server after the fixture has stopped it
    assert dropped.is_set()
    assert "reconnecting in 0.5 s" in caplog.text
    assert len(recs) == 4 and _distinct_rows(store) == (4, 4)
    assert _runner_processes(str(p.work_dir)) == []  # the orphan was stopped
    assert _board_leftovers(Path(p.work_dir)) == []


def test_model_past_timeout_is_killed_and_reported(tmp_path: Path, demo_archs, export_cache) -> None:
    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    # A 30 s minimum time per model against a 1 s timeout: each model is killed in flight.
    p = _local_profile(tmp_path, min_time_s=30.0, timeout_s=1.0)
    store = LatencyStore(tmp_path / "lat.sqlite")
    errors = []
    t0 = time.monotonic()
    recs = measure_archs(p, demo_archs[:2], store, progress=False, batch_size=2, cache_dir=export_cache,
                         keep_exports=True, on_error=errors.append)
    assert recs == [] and store.count() == 0
    assert len(errors) == 2 and all("timed out after 1 s" in e.error for e in errors)
    assert time.monotonic() - t0 < 30
    assert _runner_processes(str(tmp_path / "work")) == []


def test_cancel_stops_the_runner_and_keeps_what_is_stored(tmp_path: Path, demo_archs, export_cache) -> None:
    import threading

    from hat_edge.devices.measure import MeasureCancelled, measure_archs
    from hat_edge.latency.store import LatencyStore

    p = _local_profile(tmp_path, min_time_s=1.0)
    store = LatencyStore(tmp_path / "lat.sqlite")
    cancel = threading.Event()  # what measure_many sets on Ctrl-C
    with pytest.raises(MeasureCancelled):
        measure_archs(p, demo_archs[:3], store, progress=False, batch_size=3, cache_dir=export_cache,
                      keep_exports=True, cancel=cancel, on_record=lambda rec: cancel.set())
    assert store.count() == 1
    assert list((tmp_path / "work" / "jobs").iterdir()) == []
    assert _runner_processes(str(tmp_path / "work")) == []  # the runner was killed, not left running
    from hat_edge.devices import measure

    # the unfinished models' exports stay in the cache, no longer held by this process
    assert not any(str(d).startswith(str(export_cache)) for d in measure._IN_USE), measure._IN_USE


def test_result_line_of_unknown_version_is_refused(tmp_path: Path, demo_archs) -> None:
    from hat_edge.devices.measure import record_from_result
    from hat_edge.errors import UserError

    p = _local_profile(tmp_path)
    line = {"version": 1, "id": "m0", "runs": [{"encoder_ms": 1.0, "decode_ms": 9.0, "total_ms": 10.0}],
            "median_ms": 10.0, "mean_10_90_ms": 10.0, "p90_ms": 10.0, "iqr_ms": 0.0, "cv": 0.0,
            "encoder_median_ms": 1.0, "decoder_median_ms": 9.0, "env": {"cores": 2}, "warmup": 5}
    rec = record_from_result(p, demo_archs[0], line, p.measure_spec().identity())
    assert rec.median_ms == 10.0 and rec.total_runs_ms == [10.0] and rec.env["measurement"]["warmup"] == 5
    with pytest.raises(UserError, match="runner result version 2 is not supported"):
        record_from_result(p, demo_archs[0], {**line, "version": 2}, p.measure_spec().identity())


def test_runner_that_cannot_start_is_one_clear_error(tmp_path: Path, demo_archs, export_cache) -> None:
    from dataclasses import replace

    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    fake = tmp_path / "python-without-numpy"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'numpy'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    p = replace(_local_profile(tmp_path), python=str(fake))
    with pytest.raises(TransportError, match=r"runner failed before measuring anything \(exit 1\): "
                                             r"ModuleNotFoundError.*hat-edge profile check local-test"):
        measure_archs(p, demo_archs[:1], LatencyStore(tmp_path / "lat.sqlite"), progress=False,
                      cache_dir=export_cache, keep_exports=True)
    assert list((tmp_path / "work" / "jobs").iterdir()) == []  # tidied up all the same


@pytest.mark.ssh
def test_several_devices_measured_at_once(sshd_server, ssh_profile, tmp_path: Path, demo_archs) -> None:
    from hat_edge.devices.measure import measure_many
    from hat_edge.latency.store import LatencyStore

    cache = tmp_path / "cache"  # shared by both workers; each export deleted once both stored it
    local = _local_profile(tmp_path)
    remote = ssh_profile(sshd_server, measurement=FAST)
    store = LatencyStore(tmp_path / "lat.sqlite")
    out = measure_many([local, remote], demo_archs[:2], store, progress=False, cache_dir=cache, batch_size=1)
    assert {k: len(v) for k, v in out.items()} == {"local-test": 2, "loopback": 2}
    assert store.devices() == ["local-test", "loopback"] and _distinct_rows(store) == (4, 4)
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_local_gpu_profile_uses_cuda_events(tmp_path: Path, demo_archs, export_cache) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: local-gpu (CUDA events) not measured")
    from dataclasses import replace

    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    p = load_profile_file(REPO / "device_profiles" / "local-gpu.toml")
    p = replace(p, work_dir=str(tmp_path / "work"), measurement=replace(p.measurement, **FAST))
    recs = measure_archs(p, demo_archs[:1], LatencyStore(tmp_path / "lat.sqlite"), progress=False,
                         cache_dir=export_cache, keep_exports=True)
    assert len(recs) == 1
    assert recs[0].env["measurement"]["timing"] == "cuda_events" and recs[0].env["cuda_device"]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "fast.toml"
    meas = "\n".join(f"{k} = {v!r}" if isinstance(v, float) else f"{k} = {v}" for k, v in FAST.items())
    path.write_text(f'name = "fast"\nthreads = 1\nwork_dir = "{tmp_path / "work"}"\n\n[measurement]\n{meas}\n')
    return path


def test_cli_bench_json_and_measure_resume(tmp_path: Path, demo_archs, export_cache, monkeypatch) -> None:
    from hat_edge.cli import cli

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    prof = _profile_file(tmp_path)
    arch_file = tmp_path / "a.json"
    demo_archs[0].save(arch_file)
    runner = CliRunner()
    res = runner.invoke(cli, ["bench", "--profile", str(prof), str(arch_file), "smallest", "--space", "demo", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [o["arch"] for o in out] == [str(arch_file), "smallest"]
    for o in out:
        assert o["median_ms"] > 0 and o["p90_ms"] > 0 and o["cv"] >= 0
        assert len(o["runs"]) >= 3 and all(isinstance(x, float) for x in o["runs"])
    # --side-by-side: the same archs timed in rotation, one run of each in turn.
    res = runner.invoke(cli, ["bench", "--profile", str(prof), str(arch_file), "smallest", "--space", "demo",
                              "--json", "--side-by-side"])
    assert res.exit_code == 0, res.output
    side = json.loads(res.stdout)
    assert len(side[0]["runs"]) == len(side[1]["runs"]) >= 3 and side[0]["settings"] == out[0]["settings"]
    res = runner.invoke(cli, ["bench", "--profile", str(prof), "smallest", "smallest", "--space", "demo",
                              "--side-by-side"])
    assert res.exit_code != 0 and "twice" in res.output and "Traceback" not in res.output

    store = tmp_path / "lat.sqlite"
    args = ["measure", "--profile", str(prof), "-n", "2", "--seed", "5", "--store", str(store), "--json", "--no-progress"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)[0]
    assert (s["device"], s["archs"], s["stored_before"], s["measured"], s["failed"]) == ("fast", 2, 0, 2, 0)
    res = runner.invoke(cli, args)
    s = json.loads(res.stdout)[0]
    assert (s["stored_before"], s["measured"]) == (2, 0)
    assert not any((tmp_path / "cache" / "bundles").iterdir())  # exports removed once stored

    # --side-by-side: 3 more (the same seed's first 2 are stored), in groups of 3 with the 2 anchors
    # taken from the stored ones, timed again beside each new arch: 3 runner jobs, 3 new records,
    # each with its drift factor; the anchors' re-timing is not stored.
    res = runner.invoke(cli, ["measure", "--profile", str(prof), "-n", "5", "--seed", "5", "--store", str(store),
                              "--json", "--no-progress", "--side-by-side", "--group", "3"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)[0]
    assert (s["archs"], s["stored_before"], s["measured"], s["failed"]) == (5, 2, 3, 0)
    from hat_edge.latency.store import LatencyStore

    recs = LatencyStore(store).records(device="fast")
    anchored = [r for r in recs if "drift_factor" in r.env]
    assert len(recs) == 5 and len(anchored) == 3
    assert all(len(r.env["anchors"]) == 2 and r.corrected_ms == r.median_ms / r.drift_factor for r in anchored)
    res = runner.invoke(cli, ["measure", "--profile", str(prof), "-n", "5", "--seed", "5", "--store", str(store),
                              "--side-by-side", "--group", "2"])
    assert res.exit_code != 0 and "--group" in res.output and "Traceback" not in res.output


@pytest.mark.ssh
def test_cli_profile_check_over_ssh(sshd_server, ssh_profile, tmp_path: Path) -> None:
    from hat_edge.cli import cli

    p = ssh_profile(sshd_server, trusted=False)
    path = tmp_path / "board.toml"
    path.write_text(
        f'name = "board"\ntransport = "ssh"\nhost = "127.0.0.1"\nport = {p.port}\nuser = "{p.user}"\n'
        f'identity_file = "{p.identity_file}"\nknown_hosts = "{p.known_hosts}"\npython = "{p.python}"\n'
        f'work_dir = "{p.work_dir}"\n'
    )
    runner = CliRunner()
    res = runner.invoke(cli, ["profile", "check", str(path), "--json"])
    assert res.exit_code != 0 and "--trust-new-host" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["profile", "check", str(path), "--trust-new-host", "--json"])
    assert res.exit_code == 0, res.output
    env = json.loads(res.stdout)
    assert env["cores"] >= 1 and env["onnxruntime"] and env["os"].startswith("Linux")
    assert env["host"] == f"{p.user}@127.0.0.1:{p.port}"


def test_profile_list_flags_a_name_that_differs_from_its_file(tmp_path: Path, monkeypatch) -> None:
    """A copy of raspberrypi4.toml saved as mypi.toml still says name = "raspberrypi4"."""
    import json as _json

    from click.testing import CliRunner

    from hat_edge.cli import cli

    d = tmp_path / "profiles"
    d.mkdir()
    (d / "mypi.toml").write_text((REPO / "device_profiles" / "raspberrypi4.toml").read_text())
    monkeypatch.setenv("HAT_EDGE_PROFILE_PATH", str(d))
    r = CliRunner().invoke(cli, ["profile", "list", "--json"])
    assert r.exit_code == 0, r.output
    item = next(i for i in _json.loads(r.output) if i["path"] == str(d / "mypi.toml"))
    assert "field 'name' is 'raspberrypi4' but the file is mypi.toml" in item["error"]
    assert 'set name = "mypi"' in item["error"]


def test_profile_check_names_a_board_python_older_than_the_runner_needs() -> None:
    from hat_edge.commands.devices import _env_warnings
    from hat_edge.devices.profiles import load_profile_file

    p = load_profile_file(REPO / "device_profiles" / "jetson-nano.toml")
    old = _env_warnings(p, {"python": "3.6.9", "onnxruntime": "1.10.0", "governor": "performance"})
    assert any("python is 3.6.9; the runner needs 3.8 or newer" in w and "field 'python'" in w for w in old)
    assert not any("python is" in w for w in _env_warnings(p, {"python": "3.9.2", "onnxruntime": "1.18"}))


def test_export_cache_is_shared_safely_between_processes(tmp_path: Path, demo_archs) -> None:
    """Two hat-edge processes on one host share ~/.cache/hat-edge/bundles: an export appears whole
    (written beside, renamed into place; a manifest-less leftover is replaced), and a process done
    with an export does not delete it while another process holds it."""
    import subprocess
    import sys

    from hat_edge.devices import measure

    prof = _local_profile(tmp_path)
    cache = tmp_path / "cache"
    arch = demo_archs[0]
    stale = cache / measure.bundle_key(arch, prof)
    stale.mkdir(parents=True)
    (stale / "encoder.onnx").write_bytes(b"half-written by a crashed export")
    path = measure.export_for_measurement(arch, prof, cache)
    assert path == stale and (path / "manifest.json").is_file() and not (path / "encoder.onnx").read_bytes().startswith(b"half")
    assert not [p for p in cache.iterdir() if p.name.startswith(".partial-")]

    # Another process holds the export as measure._acquire does (a shared flock on the dir).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        measure._release(path, delete=True)  # this process is done with it, the other is not
        assert (path / "manifest.json").is_file()
        assert not measure.remove_export_if_unused(path)  # nor does a clean take it
    finally:
        holder.kill()
        holder.wait()
    assert measure.remove_export_if_unused(path) and not path.exists()


def test_local_work_dir_default_follows_hat_edge_cache(tmp_path: Path, monkeypatch) -> None:
    """A local profile without work_dir keeps its runner's files beside the export cache: under
    $HAT_EDGE_CACHE when set (tests and CI never write to the home directory), else ~/.cache."""
    from hat_edge.devices.profiles import profile_from_dict

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    local = profile_from_dict({"name": "l"}, "<test>")
    assert local.resolved_work_dir == str(tmp_path / "cache" / "work")
    ssh = profile_from_dict({"name": "s", "transport": "ssh", "host": "h"}, "<test>")
    assert ssh.resolved_work_dir == "~/.hat-edge"
    monkeypatch.delenv("HAT_EDGE_CACHE")
    assert profile_from_dict({"name": "l"}, "<test>").resolved_work_dir == "~/.cache/hat-edge/work"
