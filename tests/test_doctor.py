"""`hat-edge profile check` as a doctor: each connection failure is one line naming the profile
field to change, fast. Against the suite's real sshd on loopback."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from hat_edge.cli import cli
from ssh_fixtures import free_port


def _write(tmp_path, profile) -> str:
    import json

    d = {k: v for k, v in profile.to_dict().items() if k not in ("measurement", "source", "env", "cpu_affinity")
         and v is not None and not (k == "description" and not v)}
    path = tmp_path / "doctor.toml"
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "\n")
    return str(path)


def _check(tmp_path, profile) -> tuple[str, float]:
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["profile", "check", _write(tmp_path, profile)])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0], time.monotonic() - t0


@pytest.mark.ssh
def test_no_key_names_identity_file_and_ssh_agent(tmp_path, sshd_server, ssh_profile, monkeypatch) -> None:
    import dataclasses

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* keys to find
    p = dataclasses.replace(ssh_profile(sshd_server), identity_file=None)
    msg, _ = _check(tmp_path, p)
    assert "field 'identity_file'" in msg and "ssh-add" in msg


@pytest.mark.ssh
def test_wrong_port_names_host_and_port_at_once(tmp_path, sshd_server, ssh_profile) -> None:
    import dataclasses

    p = dataclasses.replace(ssh_profile(sshd_server), port=free_port())
    msg, took = _check(tmp_path, p)
    assert "fields 'host' and 'port'" in msg and "connection refused" in msg
    assert took < 6


@pytest.mark.ssh
def test_unreachable_host_fails_within_the_connect_timeout(tmp_path, sshd_server, ssh_profile) -> None:
    import dataclasses

    # TEST-NET-1 (RFC 5737): never routed; the SYN goes nowhere (or the network says unreachable).
    p = dataclasses.replace(ssh_profile(sshd_server), host="192.0.2.1", connect_timeout_s=3.0)
    msg, took = _check(tmp_path, p)
    assert "'host'" in msg and took <= 6


@pytest.mark.ssh
def test_wrong_python_names_the_python_field(tmp_path, sshd_server, ssh_profile) -> None:
    import dataclasses

    p = dataclasses.replace(ssh_profile(sshd_server), python="/nonexistent/hat-venv/bin/python")
    msg, _ = _check(tmp_path, p)
    assert "field 'python' is '/nonexistent/hat-venv/bin/python'" in msg and "on the device" in msg


def test_wrong_python_for_the_local_profile(tmp_path) -> None:
    from hat_edge.devices.profiles import profile_from_dict

    p = profile_from_dict({"name": "lp", "python": "/nonexistent/python3", "work_dir": str(tmp_path / "w")}, "<t>")
    msg, _ = _check(tmp_path, p)
    assert "field 'python' is '/nonexistent/python3'" in msg and "on this machine" in msg


@pytest.mark.ssh
@pytest.mark.parametrize("command", ["measure", "deploy"])
def test_torchscript_profile_on_a_board_without_torch_fails_before_any_export(tmp_path, sshd_server, ssh_profile,
                                                                              monkeypatch, command) -> None:
    """The suite's board venv has numpy + onnxruntime only: a TorchScript profile is refused once,
    naming the device, before anything is exported or uploaded."""
    import dataclasses

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    base = ssh_profile(sshd_server)
    p = dataclasses.replace(base, measurement=dataclasses.replace(base.measurement, runtime="torchscript"))
    path = _write(tmp_path, p)
    assert 'runtime = "torchscript"' in open(path).read()
    args = (["measure", "--profile", path, "-n", "2", "--store", str(tmp_path / "s.sqlite"), "--no-progress"]
            if command == "measure" else ["deploy", "--profile", path, "smallest", "--checkpoint", "demo",
                                          "--out-dir", str(tmp_path / "bundle")])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0
    errors = [x for x in r.output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and r.output.count("is not installed") == 1, r.output
    assert "runtime 'torchscript' is not installed" in errors[0] and f"on the device '{p.name}'" in errors[0]
    assert not (tmp_path / "cache" / "bundles").exists() and not (tmp_path / "bundle").exists()
    assert not (tmp_path / "board-work" / "bundles").exists() and not (tmp_path / "board-work" / "deployed").exists()


def test_profile_new_writes_a_named_copy_of_an_example(tmp_path, monkeypatch) -> None:
    from hat_edge.devices.profiles import EXAMPLE_PROFILES, list_examples, load_profile_file

    monkeypatch.chdir(tmp_path)  # no clone here: the examples come from the package
    monkeypatch.setenv("HOME", str(tmp_path))
    assert {e.name for e in list_examples()} == {"raspberrypi4", "jetson-nano"}
    r = CliRunner().invoke(cli, ["profile", "list"])
    assert r.exit_code == 0 and "examples to copy: jetson-nano, raspberrypi4" in r.output
    r = CliRunner().invoke(cli, ["profile", "new", "mypi", "--host", "10.0.0.7", "--user", "alice", "--port", "2222",
                                 "--python", "/home/alice/hat-venv/bin/python", "--no-check"])
    assert r.exit_code == 0, r.output
    path = tmp_path / ".config" / "hat-edge" / "profiles" / "mypi.toml"
    p = load_profile_file(path)
    assert (p.name, p.host, p.user, p.port, p.python) == ("mypi", "10.0.0.7", "alice", 2222,
                                                          "/home/alice/hat-venv/bin/python")
    assert p.measurement == load_profile_file(EXAMPLE_PROFILES / "raspberrypi4.toml").measurement
    assert "# Example: a Raspberry Pi 4" in path.read_text()  # the example's comments kept
    r = CliRunner().invoke(cli, ["profile", "new", "mypi", "--host", "x", "--no-check"])
    assert r.exit_code != 0 and "exists" in r.output
    r = CliRunner().invoke(cli, ["profile", "new", "bad name", "--host", "x", "--no-check"])
    assert r.exit_code != 0 and "NAME 'bad name'" in r.output


def test_profile_new_values_cannot_break_out_of_their_toml_string(tmp_path, monkeypatch) -> None:
    """Backslashes, quotes and newlines in a value are escaped, never TOML syntax: a Windows-style
    user name round-trips, and a value that tries to close its string and add a key stays one value."""
    from hat_edge.devices.profiles import load_profile_file

    monkeypatch.chdir(tmp_path)  # not the clone: `profile new` writes to ./device_profiles there
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, user in (("corp", "CORP\\alice"), ("sneaky", 'bob"\nwork_dir = "/tmp/elsewhere')):
        r = CliRunner().invoke(cli, ["profile", "new", name, "--host", "h", "--user", user, "--no-check"])
        assert r.exit_code == 0, r.output
        p = load_profile_file(tmp_path / ".config" / "hat-edge" / "profiles" / f"{name}.toml")
        assert p.user == user and p.work_dir != "/tmp/elsewhere"


def test_example_profiles_in_the_package_match_the_repo() -> None:
    from pathlib import Path

    from hat_edge.devices.profiles import EXAMPLE_PROFILES

    repo = Path(__file__).resolve().parent.parent / "device_profiles"
    for name in ("raspberrypi4", "jetson-nano"):
        assert (EXAMPLE_PROFILES / f"{name}.toml").read_text() == (repo / f"{name}.toml").read_text()


@pytest.mark.ssh
def test_profile_new_checks_the_board(tmp_path, sshd_server, ssh_profile, monkeypatch) -> None:
    p = ssh_profile(sshd_server)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "device_profiles").mkdir()
    r = CliRunner().invoke(cli, ["profile", "new", "loopy", "--host", "127.0.0.1", "--port", str(p.port),
                                 "--user", p.user, "--python", p.python])
    # The example has no identity_file / known_hosts for this test server: the check names the fix.
    assert r.exit_code != 0 and (tmp_path / "device_profiles" / "loopy.toml").exists()
    assert "then: hat-edge profile check" in r.output and r.output.count("Error:") == 1


def test_doctor_warnings_name_the_fix() -> None:
    from hat_edge.commands.devices import _env_warnings
    from hat_edge.devices.profiles import EXAMPLE_PROFILES, load_profile_file

    p = load_profile_file(EXAMPLE_PROFILES / "raspberrypi4.toml")
    w = " | ".join(_env_warnings(p, {"python": "3.11.2", "machine": "armv7l", "onnxruntime": None,
                                     "raspberry_pi": "Raspberry Pi 4 Model B", "throttled": None}))
    assert "32-bit OS (armv7l)" in w and "64-bit" in w
    assert "python3 -m venv ~/hat-venv" in w and "field 'python'" in w
    assert "vcgencmd" in w and "libraspberrypi-bin" in w
    w = " | ".join(_env_warnings(p, {"python": "3.11.2", "machine": "aarch64", "onnxruntime": "1.10.0"}))
    assert "onnxruntime 1.10.0" in w and ">= 1.14" in w
    assert _env_warnings(p, {"python": "3.11.2", "machine": "aarch64", "onnxruntime": "1.20.1",
                             "governor": "performance", "throttled": "0x0"}) == []


def _silent_server(mode: str):
    """A loopback server that accepts TCP and then never speaks SSH ('mute'), or closes at once
    ('close'), or sends a banner very late ('slow'). Bounded: it stops with the test."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()
    held: list = []

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            if mode == "close":
                c.close()
            elif mode == "slow":  # a banner, then nothing: stuck in the key exchange
                c.sendall(b"SSH-2.0-OpenSSH_9.2 stuck\r\n")
                held.append(c)
            else:
                held.append(c)  # mute: accepted, never answered

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv.getsockname()[1], stop, held, srv


@pytest.mark.parametrize("mode", ["mute", "close", "slow"])
def test_a_host_that_accepts_tcp_but_never_speaks_ssh_fails_in_one_line_within_6_s(tmp_path, mode) -> None:
    """#27: `profile check` against a port that accepts TCP and stays silent (a stuck sshd, another
    service, a tarpit) fails within the default connect_timeout (5 s; under 6 s in all), in one
    line naming the profile fields and what was seen, never paramiko's own text."""
    from hat_edge.devices.profiles import profile_from_dict

    port, stop, held, srv = _silent_server(mode)
    key = tmp_path / "key"
    key.write_text("unused: the connection never gets as far as authentication\n")
    try:
        p = profile_from_dict({"name": "mute", "transport": "ssh", "host": "127.0.0.1", "port": port, "user": "pi",
                               "identity_file": str(key), "known_hosts": str(tmp_path / "known")}, "mute.toml")
        line, took = _check(tmp_path, p)
    finally:
        stop.set()
        for c in held:
            c.close()
        srv.close()
    assert took < 6.0, took
    assert "'host'" in line and "'port'" in line and f"127.0.0.1:{port}" in line
    if mode == "mute":
        assert "TCP open, no SSH banner in 5.0 s" in line and "'connect_timeout_s'" in line
    elif mode == "slow":
        assert "key exchange and login did not finish in 5." in line and "'connect_timeout_s'" in line
    else:
        assert "closed the connection without an SSH banner" in line
    for raw in ("Exception (client)", "Error reading SSH protocol banner", "Bad file descriptor", "Traceback",
                "No existing session"):
        assert raw not in line
