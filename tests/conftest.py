"""Shared pytest fixtures. Keep each fixture small and documented; rooms add theirs below.

Device room: a real OpenSSH server on 127.0.0.1 (`sshd_server`, `make_sshd`), a user key
(`ssh_user_key`), a "board" virtualenv with only numpy + onnxruntime (`board_python`), and
`ssh_profile(...)`, which builds a DeviceProfile pointing at a server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from ssh_fixtures import SETUP_HINT, SSHServer, board_venv, find_sshd, keygen


# ---------------------------------------------------------------------------------------------
# General
# ---------------------------------------------------------------------------------------------
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's addopts): two workers, one on a one-core machine. The suite is sized
    for 2 cores: more workers on a bigger machine would time boards beside many exports at once.
    HAT_EDGE_TEST_WORKERS sets the number."""
    want = os.environ.get("HAT_EDGE_TEST_WORKERS", "")
    if want:
        if not want.isdigit():
            raise pytest.UsageError(f"HAT_EDGE_TEST_WORKERS={want!r}: expected a whole number (0: one process)")
        return int(want)
    return max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """2 shared CPU cores: every test starts on one torch thread, also after a command run
    in-process with `--threads auto` (its default), which leaves the count its fitness timed
    faster."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Devices room: SSH server and board
# ---------------------------------------------------------------------------------------------
def _require_sshd() -> None:
    if find_sshd() is None:
        pytest.fail(f"OpenSSH server (sshd) is not installed: {SETUP_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def ssh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ssh")


@pytest.fixture(scope="session")
def ssh_user_key(ssh_dir: Path) -> Path:
    """Private key file of the test user (public half in `.pub`), authorized on every test sshd."""
    _require_sshd()
    return keygen(ssh_dir / "id_ed25519")


@pytest.fixture(scope="session")
def sshd_server(ssh_dir: Path, ssh_user_key: Path) -> Iterator[SSHServer]:
    """One sshd for the session. Tests that kill it must use `make_sshd` instead."""
    server = SSHServer(ssh_dir / "sshd-shared", Path(f"{ssh_user_key}.pub")).start()
    yield server
    server.stop()


@pytest.fixture
def make_sshd(tmp_path: Path, ssh_user_key: Path) -> Iterator[Callable[..., SSHServer]]:
    """Factory for a private sshd (killed at the end of the test)."""
    servers: list[SSHServer] = []

    def make(**kw: Any) -> SSHServer:
        s = SSHServer(tmp_path / f"sshd-{len(servers)}", Path(f"{ssh_user_key}.pub"), **kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def board_python() -> str:
    """Python of the "board": a virtualenv holding only numpy + onnxruntime (no hat_edge, no torch)."""
    return str(board_venv())


@pytest.fixture
def ssh_profile(tmp_path: Path, ssh_user_key: Path, board_python: str) -> Callable[..., Any]:
    """ssh_profile(server, trusted=True, **fields) -> DeviceProfile for `server`.

    trusted: write the server's host key into a fresh known_hosts file (else that file is empty).
    Other keyword arguments override profile fields; `measurement={...}` overrides settings.
    """
    from hat_edge.devices.profiles import profile_from_dict

    def make(server: SSHServer, trusted: bool = True, **fields: Any):
        known = tmp_path / f"known_hosts-{server.port}"
        if not known.exists():
            known.write_text(server.known_hosts_line() if trusted else "")
        data: dict[str, Any] = {
            "name": "loopback",
            "transport": "ssh",
            "host": "127.0.0.1",
            "port": server.port,
            "user": os.environ.get("USER") or __import__("getpass").getuser(),
            "identity_file": str(ssh_user_key),
            "known_hosts": str(known),
            "python": board_python,
            "work_dir": str(tmp_path / "board-work"),
            "runtime": "onnxruntime",
            "threads": 1,
            "measurement": {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0, "timeout_s": 120.0},
        }
        meas = fields.pop("measurement", {})
        data.update(fields)
        data["measurement"] = {**data["measurement"], **meas}
        return profile_from_dict(data, source=f"<test profile {server.port}>")

    return make
