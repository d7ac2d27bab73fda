"""SSH connection set-up against the suite's real loopback sshd (tests/ssh_fixtures.py):
known_hosts marker lines (@revoked, @cert-authority) and hashed names, ~/.ssh/config ProxyJump
(one hop, through a second sshd) and ProxyCommand tokens under profile overrides.

Every refusal must be one line (a UserError) naming the file or field and the fix.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hat_edge.devices.transport import (
    ConnectionLost,
    HostKeyError,
    TransportError,
    open_transport,
    resolve_ssh_target,
)

pytestmark = pytest.mark.ssh


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _fingerprint(server) -> str:
    """The server's host key fingerprint, as OpenSSH prints it (independent of hat-edge's code)."""
    out = subprocess.run(["ssh-keygen", "-lf", f"{server.host_key}.pub"], check=True,
                         capture_output=True, text=True).stdout
    return out.split()[1]


def _key_fields(server) -> str:
    """'kind base64' of the server's host key."""
    return " ".join(Path(f"{server.host_key}.pub").read_text().split()[:2])


def _accepted(server) -> int:
    """Logins the server has accepted so far (its sshd log, LogLevel VERBOSE)."""
    return server.log.read_text(errors="replace").count("Accepted publickey")


@pytest.fixture
def ssh_config(tmp_path: Path, monkeypatch):
    """ssh_config(text) -> path of a private ~/.ssh/config (HAT_EDGE_SSH_CONFIG)."""

    def write(text: str) -> Path:
        cfg = tmp_path / "ssh_config"
        cfg.write_text(text)
        monkeypatch.setenv("HAT_EDGE_SSH_CONFIG", str(cfg))
        return cfg

    return write


# ---------------------------------------------------------------------------------------------
# known_hosts markers
# ---------------------------------------------------------------------------------------------
def test_revoked_key_refused_even_when_also_a_plain_line(sshd_server, ssh_profile) -> None:
    p = ssh_profile(sshd_server)
    known = Path(p.known_hosts)
    plain = sshd_server.known_hosts_line()
    known.write_text(f"@revoked [127.0.0.1]:{sshd_server.port} {_key_fields(sshd_server)}\n" + plain)
    before = _accepted(sshd_server)
    for trust in (False, True):
        with pytest.raises(HostKeyError) as ei:
            open_transport(p, trust_new_host=trust, retries=0)
        msg = _one_line(ei.value)
        assert str(known) in msg and _fingerprint(sshd_server) in msg and "@revoked" in msg, msg
        assert "line 1" in msg and p.name in msg
    assert _accepted(sshd_server) == before  # refused before authenticating
    assert known.read_text().endswith(plain) and known.read_text().count("\n") == 2  # left alone


def test_revoked_wildcard_or_hashed_name_refused_and_never_trusted(sshd_server, ssh_profile) -> None:
    from paramiko.hostkeys import HostKeys

    p = ssh_profile(sshd_server, trusted=False)
    known = Path(p.known_hosts)
    hashed = HostKeys.hash_host(f"[127.0.0.1]:{sshd_server.port}")
    for names in ("*", hashed, f"!other,[127.0.0.?]:{sshd_server.port}"):
        text = f"# a comment\n@revoked {names} {_key_fields(sshd_server)}\n"
        known.write_text(text)
        with pytest.raises(HostKeyError, match="@revoked") as ei:
            open_transport(p, trust_new_host=True, retries=0)  # unknown + revoked: never added
        assert "line 2" in _one_line(ei.value)
        assert known.read_text() == text


def test_revoked_for_another_host_or_negated_does_not_refuse(sshd_server, ssh_profile) -> None:
    p = ssh_profile(sshd_server)
    known = Path(p.known_hosts)
    plain = sshd_server.known_hosts_line()
    for names in ("other.example.com", f"*,![127.0.0.1]:{sshd_server.port}"):
        known.write_text(f"@revoked {names} {_key_fields(sshd_server)}\n" + plain)
        with open_transport(p, retries=0) as t:
            assert t.run(["true"]).returncode == 0


def test_malformed_revoked_line_fails_closed_with_one_line(sshd_server, ssh_profile) -> None:
    p = ssh_profile(sshd_server)
    known = Path(p.known_hosts)
    known.write_text(sshd_server.known_hosts_line() + "@revoked * ssh-ed25519 not!base64\n")
    with pytest.raises(HostKeyError) as ei:
        open_transport(p, retries=0)
    msg = _one_line(ei.value)
    assert f"{known}:2" in msg and "@revoked" in msg and "fix or remove" in msg


def test_cert_authority_line_skipped_with_warning(sshd_server, ssh_profile, ssh_user_key, caplog) -> None:
    p = ssh_profile(sshd_server)
    known = Path(p.known_hosts)
    ca = " ".join(Path(f"{ssh_user_key}.pub").read_text().split()[:2])  # any key will do as the "CA"
    known.write_text(
        f"@cert-authority *.example.com,[127.0.0.1]:{sshd_server.port} {ca}\n" + sshd_server.known_hosts_line()
    )
    with caplog.at_level(logging.WARNING, logger="hat_edge.devices.transport"):
        with open_transport(p, retries=0) as t:
            assert t.run(["true"]).returncode == 0
    warned = [r.getMessage() for r in caplog.records if "@cert-authority" in r.getMessage()]
    assert len(warned) == 1 and f"{known}:1" in warned[0] and "plain host keys only" in warned[0], warned


def test_cert_authority_alone_is_not_trust(sshd_server, ssh_profile, ssh_user_key) -> None:
    p = ssh_profile(sshd_server, trusted=False)
    known = Path(p.known_hosts)
    known.write_text(f"@cert-authority * {_key_fields(sshd_server)}\n")  # even the host's own key as "CA"
    with pytest.raises(HostKeyError, match=rf"\[127.0.0.1\]:{sshd_server.port} is not in") as ei:
        open_transport(p, retries=0)
    _one_line(ei.value)


def test_hashed_names_and_malformed_lines(sshd_server, ssh_profile, caplog) -> None:
    from paramiko.hostkeys import HostKeys

    p = ssh_profile(sshd_server)
    known = Path(p.known_hosts)
    hashed = HostKeys.hash_host(f"[127.0.0.1]:{sshd_server.port}")
    known.write_text(
        "garbage\n"
        "somehost ssh-ed25519 %%%not-base64%%%\n"
        "@frobnicate * ssh-ed25519 AAAA\n"
        "otherhost ssh-unknown-type AAAAB3NzaC1yc2EAAAADAQABAAABAQ\n"
        f"{hashed} {_key_fields(sshd_server)}\n"
    )
    with caplog.at_level(logging.WARNING, logger="hat_edge.devices.transport"):
        with open_transport(p, retries=0) as t:
            assert t.run(["true"]).returncode == 0
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{known}:1: malformed" in msgs and f"{known}:2: malformed" in msgs and "@frobnicate" in msgs


# ---------------------------------------------------------------------------------------------
# ProxyJump
# ---------------------------------------------------------------------------------------------
def _jump_config(ssh_config, target, jump, spec: str | None = None) -> Path:
    return ssh_config(
        "Host board\n"
        "  HostName 127.0.0.1\n"
        f"  Port {target.port}\n"
        f"  ProxyJump {spec or 'jumpy'}\n"
        "Host jumpy\n"
        "  HostName 127.0.0.1\n"
        f"  Port {jump.port}\n"
    )


def test_proxyjump_goes_through_the_jump_host(sshd_server, make_sshd, ssh_profile, ssh_config) -> None:
    jump = make_sshd()
    _jump_config(ssh_config, sshd_server, jump)
    base = ssh_profile(sshd_server)  # known_hosts: the target's key only
    known = Path(base.known_hosts)
    p = replace(base, host=None, port=None, ssh_config_host="board")

    # The jump host is contacted first, its key checked against the same known_hosts: unknown, refused.
    with pytest.raises(HostKeyError) as ei:
        open_transport(p, retries=0)
    msg = _one_line(ei.value)
    assert "ProxyJump host" in msg and f"[127.0.0.1]:{jump.port} is not in {known}" in msg, msg

    known.write_text(known.read_text() + jump.known_hosts_line())
    jumps, targets = _accepted(jump), _accepted(sshd_server)
    with open_transport(p, retries=0) as t:
        assert t.target.proxy_jump is not None and t.target.proxy_jump.port == jump.port
        assert t.target.port == sshd_server.port
        r = t.run(["sh", "-c", "echo via-jump"])
        assert r.returncode == 0 and r.stdout.strip() == "via-jump"
    assert _accepted(jump) == jumps + 1 and _accepted(sshd_server) == targets + 1

    # With the jump host down the device (still up) cannot be reached: the jump is the only path used.
    jump.kill()
    with pytest.raises(ConnectionLost, match=rf"ProxyJump host.*cannot connect to .*:{jump.port}") as ei:
        open_transport(p, retries=0)
    _one_line(ei.value)
    with open_transport(replace(p, ssh_config_host=None, host="127.0.0.1", port=sshd_server.port), retries=0) as t:
        assert t.run(["true"]).returncode == 0  # ... while a direct connection still works


def test_proxyjump_target_key_checked_and_spec_form(sshd_server, make_sshd, ssh_profile, ssh_config) -> None:
    jump = make_sshd()
    base = ssh_profile(sshd_server, trusted=False)
    known = Path(base.known_hosts)
    known.write_text(jump.known_hosts_line())  # the jump host known, the target not
    _jump_config(ssh_config, sshd_server, jump, spec=f"{base.user}@127.0.0.1:{jump.port}")
    p = replace(base, host=None, port=None, ssh_config_host="board")
    with pytest.raises(HostKeyError) as ei:
        open_transport(p, retries=0)
    msg = _one_line(ei.value)
    assert "ProxyJump" not in msg and f"[127.0.0.1]:{sshd_server.port} is not in {known}" in msg, msg
    known.write_text(known.read_text() + sshd_server.known_hosts_line())
    with open_transport(p, retries=0) as t:
        assert t.target.proxy_jump.user == base.user and t.run(["true"]).returncode == 0


def test_proxyjump_revoked_jump_key_refused(sshd_server, make_sshd, ssh_profile, ssh_config) -> None:
    jump = make_sshd()
    _jump_config(ssh_config, sshd_server, jump)
    base = ssh_profile(sshd_server)
    known = Path(base.known_hosts)
    known.write_text(known.read_text() + jump.known_hosts_line() + f"@revoked * {_key_fields(jump)}\n")
    with pytest.raises(HostKeyError) as ei:
        open_transport(replace(base, host=None, port=None, ssh_config_host="board"), retries=0)
    msg = _one_line(ei.value)
    assert "ProxyJump host" in msg and _fingerprint(jump) in msg and str(known) in msg


def test_proxyjump_multi_hop_and_conflicts_refused(sshd_server, ssh_profile, ssh_config) -> None:
    base = ssh_profile(sshd_server)
    p = replace(base, host=None, port=None, ssh_config_host="board")
    cfg = ssh_config(f"Host board\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n  ProxyJump a,b\n")
    with pytest.raises(TransportError) as ei:
        resolve_ssh_target(p)
    msg = _one_line(ei.value)
    assert str(cfg) in msg and "Host board" in msg and "ProxyJump 'a,b' has 2 hops" in msg and "one jump host" in msg

    ssh_config(f"Host board\n  Port {sshd_server.port}\n  ProxyJump a\nHost a\n  ProxyJump b\n")
    with pytest.raises(TransportError, match="Host a .*has its own ProxyJump 'b'.*one jump host") as ei:
        resolve_ssh_target(p)
    _one_line(ei.value)

    ssh_config(f"Host board\n  ProxyJump jumpy\n  ProxyCommand nc %h %p\n  Port {sshd_server.port}\n")
    with pytest.raises(TransportError, match="both ProxyCommand and ProxyJump") as ei:
        resolve_ssh_target(p)
    _one_line(ei.value)

    ssh_config("Host board\n  ProxyJump user@host:99999\n")
    with pytest.raises(TransportError, match=r"not \[user@\]host\[:port\] \(port '99999'") as ei:
        resolve_ssh_target(p)
    _one_line(ei.value)


def test_proxyjump_none_and_proxycommand_none_mean_direct(sshd_server, ssh_profile, ssh_config) -> None:
    base = ssh_profile(sshd_server)
    ssh_config(
        "Host board\n  HostName 127.0.0.1\n  ProxyJump none\n  ProxyCommand none\n"
        "Host *\n  ProxyJump elsewhere\n  ProxyCommand false\n"
    )
    p = replace(base, host=None, ssh_config_host="board")
    t0 = resolve_ssh_target(p)
    assert t0.proxy_jump is None and t0.proxy_command is None
    with open_transport(p, retries=0) as t:
        assert t.run(["true"]).returncode == 0


def test_jump_host_ssh_config_fields(ssh_config, ssh_profile, sshd_server, tmp_path: Path) -> None:
    base = ssh_profile(sshd_server)
    ssh_config(
        "Host board\n  HostName 10.0.0.7\n  Port 2200\n  ProxyJump ops@[::1]:2222\n"
        "Host ::1\n  IdentityFile ~/jump_key\n  UserKnownHostsFile /etc/jump_known\n"
    )
    t = resolve_ssh_target(replace(base, host=None, port=None, ssh_config_host="board"))
    j = t.proxy_jump
    assert (t.hostname, t.port) == ("10.0.0.7", 2200)
    assert (j.hostname, j.port, j.user, j.known_hosts) == ("::1", 2222, "ops", "/etc/jump_known")
    assert j.identity_files == (str(Path("~/jump_key").expanduser()),)
    ssh_config("Host board\n  ProxyJump jh\n")  # jump host without a Host block: shares the device's files
    t = resolve_ssh_target(replace(base, host=None, port=None, ssh_config_host="board"))
    assert t.proxy_jump.known_hosts == base.known_hosts and t.proxy_jump.identity_files == (base.identity_file,)
    assert (t.proxy_jump.hostname, t.proxy_jump.port) == ("jh", 22)


# ---------------------------------------------------------------------------------------------
# ProxyCommand tokens follow the profile's host/port overrides
# ---------------------------------------------------------------------------------------------
RELAY = r"""
import json, os, select, socket, sys
log, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[2:]) + "\n")
s = socket.create_connection((host, port))
while True:
    r, _, _ = select.select([0, s], [], [])
    if 0 in r:
        d = os.read(0, 65536)
        if not d:
            break
        s.sendall(d)
    if s in r:
        d = s.recv(65536)
        if not d:
            break
        os.write(1, d)
"""


def test_proxycommand_gets_the_overridden_host_and_port(sshd_server, ssh_profile, ssh_config, tmp_path) -> None:
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    log = tmp_path / "relay.log"
    ssh_config(
        "Host viaproxy\n"
        "  HostName 192.0.2.1\n"  # TEST-NET-1: never reachable; the profile overrides it
        "  Port 9\n"
        f"  ProxyCommand {sys.executable} {relay} {log} %h %p %r %%\n"
    )
    base = ssh_profile(sshd_server, trusted=False)
    p = replace(base, ssh_config_host="viaproxy")  # keeps host 127.0.0.1 and port of the sshd
    # The host key is checked for the name the proxy reached (unknown here, so refused).
    with pytest.raises(HostKeyError, match=rf"host \[127.0.0.1\]:{sshd_server.port} is not in") as ei:
        open_transport(p, retries=0)
    _one_line(ei.value)
    assert json.loads(log.read_text().splitlines()[-1]) == ["127.0.0.1", str(sshd_server.port), base.user, "%"]

    Path(base.known_hosts).write_text(sshd_server.known_hosts_line())
    with open_transport(p, retries=0) as t:
        assert t.target.proxy_command is not None and "192.0.2.1" not in t.target.proxy_command
        assert t.run(["sh", "-c", "echo proxied"]).stdout.strip() == "proxied"
    assert len(log.read_text().splitlines()) == 2


def test_proxycommand_tokens_from_config_without_overrides(ssh_profile, sshd_server, ssh_config) -> None:
    base = ssh_profile(sshd_server)
    ssh_config("Host b\n  HostName real.example\n  Port 2022\n  User pi\n  ProxyCommand ~/bin/px %h:%p %r %n 100%%h\n")
    t = resolve_ssh_target(replace(base, host=None, port=None, user=None, ssh_config_host="b"))
    assert t.proxy_command == f"{Path('~').expanduser()}/bin/px real.example:2022 pi b 100%h"
    assert t.known_hosts_name == "[real.example]:2022"


def test_proxycommand_refuses_unsafe_overrides_and_unknown_tokens(ssh_profile, sshd_server, ssh_config) -> None:
    base = ssh_profile(sshd_server)
    cfg = ssh_config("Host b\n  ProxyCommand nc %h %p\n")
    with pytest.raises(TransportError) as ei:
        resolve_ssh_target(replace(base, host="127.0.0.1;touch /tmp/pwned", ssh_config_host="b"))
    msg = _one_line(ei.value)
    assert "field 'host'" in msg and "ProxyCommand would receive as %h" in msg
    ssh_config("Host b\n  ProxyCommand nc %h %p %C\n")
    with pytest.raises(TransportError) as ei:
        resolve_ssh_target(replace(base, ssh_config_host="b"))
    msg = _one_line(ei.value)
    assert str(cfg) in msg and "uses %C" in msg and "allowed tokens" in msg
    ssh_config("Host b\n  ProxyCommand nc 'unbalanced %h\n")
    with pytest.raises(TransportError, match="fix its quoting") as ei:
        resolve_ssh_target(replace(base, ssh_config_host="b"))
    _one_line(ei.value)


def test_proxycommand_that_cannot_start_is_one_line(ssh_profile, sshd_server, ssh_config, tmp_path) -> None:
    ssh_config(f"Host b\n  ProxyCommand {tmp_path}/no-such-proxy %h %p\n")
    with pytest.raises(TransportError, match="ProxyCommand .*could not start") as ei:
        open_transport(replace(ssh_profile(sshd_server), ssh_config_host="b"), retries=0)
    _one_line(ei.value)
