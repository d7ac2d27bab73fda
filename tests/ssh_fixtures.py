"""A real OpenSSH server on 127.0.0.1 and a "board" virtualenv, for the device tests.

The server runs as the current user (root in CI) from a private sshd_config in a temp dir: its own
host key, an authorized_keys file holding a generated user key, `UsePAM no`, `StrictModes no`.
The board is a separate virtualenv with only numpy + onnxruntime (no hat_edge), made once and
cached under ~/.cache/hat-edge-test, keyed by the versions it holds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SETUP_HINT = "run `bash scripts/setup_test_env.sh` (installs openssh-server)"


def find_sshd() -> str | None:
    for cand in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    """A passphrase-less key pair at path / path.pub (OpenSSH format; RSA in PEM so paramiko reads it)."""
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "hat-edge-test", "-f", str(path)]
    if kind == "rsa":
        args += ["-b", "2048", "-m", "PEM"]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)
    return path


class SSHServer:
    """sshd -D on 127.0.0.1:port. `kill()` drops every connection (listener and sessions) at once,
    as a board that loses power or network; `start()` brings it back with the same host key."""

    def __init__(self, root: Path, authorized_pub: Path, port: int | None = None, host_key: Path | None = None) -> None:
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError(f"OpenSSH server (sshd) not found: {SETUP_HINT}")
        self.sshd = sshd
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = host_key or keygen(root / "ssh_host_ed25519_key")
        shutil.copy(authorized_pub, root / "authorized_keys")
        self.config = root / "sshd_config"
        self.log = root / "sshd.log"
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "MaxSessions 50\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel VERBOSE\n"
        )
        self.proc: subprocess.Popen | None = None

    def known_hosts_line(self) -> str:
        kind, b64 = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}\n"

    def start(self) -> "SSHServer":
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir (root only)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.sshd, "-D", "-e", "-f", str(self.config)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with status {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.settimeout(2)
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not start on port {self.port}: {self.log.read_text()[-2000:]}")

    def _tree(self) -> list[int]:
        """The listener and all its descendants (per-connection sshd processes and their commands)."""
        if self.proc is None:
            return []
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def kill(self, sessions_too: bool = True) -> None:
        """SIGKILL the listener and every connection; with sessions_too, the commands they ran
        as well (a board losing power), else those are left orphaned (a dropped link)."""
        if self.proc is None:
            return
        pids = self._tree()
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if sessions_too or comm.startswith("sshd"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill(sessions_too=True)


def board_venv(cache_root: Path | None = None) -> Path:
    """Python of a virtualenv holding only numpy + onnxruntime, pinned to this interpreter's
    versions (so pip finds them in the local wheel cache). Built once, reused across runs."""
    import numpy
    import onnxruntime

    key = f"py{sys.version_info[0]}{sys.version_info[1]}-np{numpy.__version__}-ort{onnxruntime.__version__}"
    root = (cache_root or Path(os.environ.get("HAT_EDGE_TEST_CACHE", "~/.cache/hat-edge-test")).expanduser())
    venv = root / f"board-venv-{key}"
    py = venv / "bin" / "python"
    ok = venv / ".complete"
    if ok.exists() and py.exists():
        return py
    root.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers start together on a fresh machine: one builds, the others wait for it
    with open(root / f"board-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ok.exists() and py.exists():
            return py
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
            check=True,
        )
        ok.write_text(key + "\n")
    return py
