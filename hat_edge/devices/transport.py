"""Transports: how hat-edge reaches a device. Local (a subprocess) or SSH (paramiko).

A transport only moves files and runs commands; what is measured lives in the runner (the TVM RPC
split). Both transports offer the same calls, so local and remote measurement share one code path:

    with open_transport(profile) as t:
        t.push_many([(local_file, t.join(t.work_dir, "runner.pyz"))])   # sha256-checked, skipped if present
        proc = t.spawn([t.python, runner, "run", job, "--out", out])
        while proc.poll() is None: new = t.read_from(out, offset)    # results as they are written
        t.run(argv, timeout=30)                                        # -> Result, CommandTimeout

SSH safety: host keys are checked against known_hosts and an unknown or changed key is refused
(`trust_new_host=True` adds an unknown key, never a changed one); a key marked `@revoked` in
known_hosts is always refused, `@cert-authority` lines are skipped (plain host keys only); a
ProxyJump host (one hop) is checked the same way; every remote command is built
from an argv list with shlex.quote, so no profile value reaches a shell unquoted; environment
values are never logged (they may hold secrets).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import stat as statmod
import subprocess
import tempfile
import time
import weakref
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Collection, Iterable, Mapping, Sequence

from hat_edge.devices.profiles import DeviceProfile
from hat_edge.errors import UserError
from hat_edge.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 20.0
DEFAULT_COMMAND_TIMEOUT_S = 120.0

# Small helpers run by the device's python (always there: the runner needs it). Passed as argv to
# `python -c`, quoted like any other argument.
_HASH_SCRIPT = (
    "import hashlib,json,sys\n"
    "out={}\n"
    "for p in sys.argv[1:]:\n"
    "    try:\n"
    "        h=hashlib.sha256()\n"
    "        with open(p,'rb') as f:\n"
    "            for b in iter(lambda:f.read(1<<20),b''): h.update(b)\n"
    "        out[p]=h.hexdigest()\n"
    "    except OSError: out[p]=None\n"
    "print(json.dumps(out))\n"
)
_REMOVE_SCRIPT = (
    "import shutil,sys,os\n"
    "for p in sys.argv[1:]:\n"
    "    if os.path.isdir(p) and not os.path.islink(p): shutil.rmtree(p,ignore_errors=True)\n"
    "    elif os.path.lexists(p): os.remove(p)\n"
)
# Kill PID only if its command line still mentions MARKER (guards against a reused pid).
_KILL_SCRIPT = (
    "import os,signal,sys,time\n"
    "pid,marker=int(sys.argv[1]),sys.argv[2].encode()\n"
    "try: cmd=open('/proc/%d/cmdline'%pid,'rb').read()\n"
    "except OSError: sys.exit(0)\n"
    "if marker not in cmd: sys.exit(0)\n"
    "os.kill(pid,signal.SIGTERM)\n"
    "for _ in range(20):\n"
    "    time.sleep(0.1)\n"
    "    if not os.path.exists('/proc/%d'%pid): sys.exit(0)\n"
    "os.kill(pid,signal.SIGKILL)\n"
)


_PLAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UPLOAD_AGE_S = 600.0  # a partial upload untouched this long was left by a killed push
_OWN_HIDDEN = (".incoming",)  # hidden dirs hat-edge itself makes in the work dir


class TransportError(UserError):
    """The device could not be reached or a command on it failed; one line for the user."""


class HostKeyError(TransportError):
    """The device's host key is unknown or has changed: never connect silently."""


class CommandTimeout(TransportError):
    """A command ran past its timeout and was killed."""


class ConnectionLost(TransportError):
    """The link dropped in the middle of a command; reconnect and resume."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_ms: float

    def check(self, what: str = "") -> "Result":
        if self.returncode != 0:
            tail = " | ".join(self.stderr.strip().splitlines()[-3:])
            raise TransportError(f"{what or self.argv[0]}: exit status {self.returncode}: {tail or 'no output'}")
        return self


def python_missing(res: Result, t: "Transport") -> None:
    """A command that could not start the profile's python (exit 127, "not found"): one line naming
    the field to change, not the shell's words."""
    err = res.stderr or ""
    if res.returncode == 127 or (res.returncode != 0 and "not found" in err and t.python in err):
        where = "on the device" if not t.is_local else "on this machine"
        raise TransportError(
            f"{t.profile.name}: the profile's field 'python' is '{t.python}', which cannot be run {where}; "
            "set it to the board's python >= 3.8 with numpy and onnxruntime (e.g. /home/pi/hat-venv/bin/python)")


class Process(ABC):
    """A command started with `Transport.spawn`."""

    marker: str  # a string in its command line (for a safe kill after reconnecting)
    pid: int | None

    @abstractmethod
    def poll(self) -> int | None:
        """The exit status, or None while it runs. Raises ConnectionLost if the link dropped."""

    @abstractmethod
    def kill(self) -> None: ...

    @abstractmethod
    def output(self) -> tuple[str, str]:
        """(stdout, stderr) collected so far."""

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                return rc
            if time.monotonic() > deadline:
                self.kill()
                raise CommandTimeout(f"command timed out after {timeout:g} s")
            time.sleep(0.05)


def quote_argv(argv: Sequence[str]) -> str:
    """One shell word per argument: nothing in a value can start another command."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def _env_argv(env: Mapping[str, str] | None) -> list[str]:
    return ["env", *[f"{k}={v}" for k, v in env.items()]] if env else []


class Transport(ABC):
    """Files and commands on one device. Use as a context manager; `close()` releases the link."""

    profile: DeviceProfile
    work_dir: str  # absolute path on the device
    _incoming_checked: bool = False  # stale partial uploads removed on this connection already

    @property
    def python(self) -> str:
        return self.profile.remote_python

    @property
    def is_local(self) -> bool:
        return self.profile.is_local

    @staticmethod
    def join(*parts: str) -> str:
        return str(PurePosixPath(*parts))

    # ---- commands ----
    @abstractmethod
    def run(self, argv: Sequence[str], timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        """Run argv to completion; CommandTimeout (the command killed) past `timeout` seconds."""

    @abstractmethod
    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log_path: str | None = None) -> Process:
        """Start argv and return at once. With `log_path`, its stdout and stderr are appended to
        that device file instead of the connection, so the command outlives a dropped link
        (a closed pipe would otherwise kill it at its next log line)."""

    # ---- files ----
    @abstractmethod
    def _upload(self, local: Path, remote: str) -> None: ...

    @abstractmethod
    def fetch(self, remote: str, local: str | Path) -> Path: ...

    @abstractmethod
    def read_from(self, remote: str, offset: int = 0) -> bytes:
        """Bytes of a device file from `offset` on (b"" if the file does not exist yet)."""

    @abstractmethod
    def write_bytes(self, remote: str, data: bytes, private: bool = False) -> None:
        """Write a device file; `private`: created 0600 before any byte is written (job files:
        their env may hold values the board's owner keeps to themselves)."""

    @abstractmethod
    def _lstat_mode(self, path: str) -> int | None:
        """lstat's st_mode of a device path, None when it does not exist."""

    def work_path(self, *parts: str) -> str:
        """A device path under the work dir, built from plain names only (each checked: no '/',
        no '..', not hidden unless ours) and checked to hold no symbolic link between the work dir
        and itself, before anything is written there."""
        for part in parts:
            if not (part in _OWN_HIDDEN or _PLAIN_RE.match(part or "")):
                raise TransportError(f"{self.profile.name}: refusing device path part {part!r} "
                                     "(allowed: letters, digits, '.', '_', '-'; not '..', not hidden)")
        path = self.join(self.work_dir, *parts)
        cur = self.work_dir
        for part in parts:
            cur = self.join(cur, part)
            mode = self._lstat_mode(cur)
            if mode is None:
                break
            if statmod.S_ISLNK(mode):
                raise TransportError(f"{self.profile.name}: {cur} on the device is a symbolic link; "
                                     f"hat-edge writes only into directories under {self.work_dir} that it made")
        return path

    @abstractmethod
    def makedirs(self, remote: str) -> None: ...

    def remote_hashes(self, paths: Sequence[str]) -> dict[str, str | None]:
        """sha256 of device files (None where missing), one command for all of them."""
        if not paths:
            return {}
        res = self.run([self.python, "-c", _HASH_SCRIPT, *paths], timeout=DEFAULT_COMMAND_TIMEOUT_S)
        python_missing(res, self)
        res.check(f"{self.profile.name}: hashing files with {self.python}")
        try:
            return json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, RecursionError, IndexError):
            raise TransportError(f"{self.profile.name}: unexpected output hashing files: {res.stdout[:200]!r}") from None

    def _incoming_name(self, remote: str) -> str:
        """Temporary upload name, outside the target directory (a bundle directory must hold only
        its listed files), on the same file system so the final rename is atomic."""
        return self.join(self.work_dir, ".incoming", f"{uuid.uuid4().hex}-{PurePosixPath(remote).name}")

    def push_many(
        self,
        pairs: Iterable[tuple[str | Path, str]],
        known_sha256: Mapping[Path, str] | None = None,
        verify: bool | Collection[str] = True,
    ) -> int:
        """Upload (local file, device path) pairs. A file already there with the same sha256 is
        skipped; each upload goes to a temporary name and is renamed into place, and its sha256 is
        checked on the device afterwards: every uploaded file's with `verify=True`, none with False,
        or those among the given device paths. `known_sha256` gives local hashes already known (a
        bundle manifest's) so big files are not read twice. Returns the files uploaded."""
        pairs = [(Path(a), b) for a, b in pairs]
        if not self._incoming_checked:  # once per connection: what killed pushes left behind
            self._incoming_checked = True
            self.clean_incoming()
        known = known_sha256 or {}
        want = {remote: known.get(local) or sha256_file(local) for local, remote in pairs}
        have = self.remote_hashes(list(want))
        todo = [(local, remote) for local, remote in pairs if have.get(remote) != want[remote]]
        for local, remote in todo:
            self.makedirs(str(PurePosixPath(remote).parent))  # cheap when known (SSH caches them)
            self._upload(local, remote)
        check = [r for _, r in todo if verify is True or (verify is not False and r in verify)]
        if check:
            got = self.remote_hashes(check)
            bad = [r for r in check if got.get(r) != want[r]]
            if bad:
                raise TransportError(f"{self.profile.name}: sha256 mismatch after upload of {bad[0]}")
        return len(todo)

    def push(self, local: str | Path, remote: str) -> bool:
        """Upload one file (sha256-checked, skipped if present). True if it was uploaded."""
        return self.push_many([(local, remote)]) == 1

    def push_dir(self, local_dir: str | Path, remote_dir: str) -> int:
        local_dir = Path(local_dir)
        pairs = [(p, self.join(remote_dir, *p.relative_to(local_dir).parts))
                 for p in sorted(local_dir.rglob("*")) if p.is_file()]
        return self.push_many(pairs)

    def remove(self, *paths: str) -> None:
        """Remove device files or directory trees; missing ones are fine."""
        if paths:
            self.run([self.python, "-c", _REMOVE_SCRIPT, *paths], timeout=DEFAULT_COMMAND_TIMEOUT_S).check(
                f"{self.profile.name}: removing files"
            )

    def kill_stale(self, pid: int, marker: str) -> None:
        """Kill a process left from a dropped connection, if its command line mentions `marker`."""
        self.run([self.python, "-c", _KILL_SCRIPT, str(pid), marker], timeout=30)

    # ---- lifecycle ----
    def close(self) -> None:  # noqa: B027 (optional hook: a local transport holds nothing to release)
        """Release the connection."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_dir(self, path: str) -> list[tuple[str, int, int, float]]:
        """(name, st_mode, size, mtime) of each entry of a device directory, as lstat sees them:
        a link is reported as the link, never its target. [] when `path` does not exist;
        TransportError when it is a symbolic link or not a directory (nothing behind it is listed)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list directories")

    def _listable(self, path: str) -> bool:
        """False when `path` does not exist; TransportError when it is a link or not a directory."""
        mode = self._lstat_mode(path)
        if mode is None:
            return False
        if not statmod.S_ISDIR(mode):
            what = "a symbolic link" if statmod.S_ISLNK(mode) else "not a directory"
            raise TransportError(f"{self.profile.name}: {path} is {what}; not listed")
        return True

    def device_time(self) -> float:
        """The device's clock (epoch seconds): file ages on the device are measured by it."""
        if self.is_local:
            return time.time()
        res = self.run([self.python, "-c", "import time; print(repr(time.time()))"], timeout=60)
        res.check(f"{self.profile.name}: reading the device's clock with {self.python}")
        try:
            return float(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TransportError(f"{self.profile.name}: unexpected clock output {res.stdout[:100]!r}") from None

    def clean_incoming(self, older_than_s: float = UPLOAD_AGE_S) -> list[str]:
        """Remove partial uploads a killed push left in work_dir/.incoming, untouched for
        `older_than_s` (by the device's clock); a push in progress elsewhere is younger. One
        directory listing when there is nothing to remove. Returns the removed paths. (The one
        place partial uploads are cleaned at push time; `hat-edge device clean` reports them too.)"""
        incoming = self.join(self.work_dir, ".incoming")
        try:
            entries = self.list_dir(incoming)
        except TransportError:  # a link in its place: `hat-edge device clean` reports it
            return []
        if not entries:
            return []
        cutoff = self.device_time() - older_than_s
        old = [self.join(incoming, name) for name, _mode, _size, mtime in entries
               if mtime < cutoff and _PLAIN_RE.match(name)]
        self.remove(*old)
        return old


# --------------------------------------------------------------------------------------------
# Local
# --------------------------------------------------------------------------------------------
# Local processes started and not yet reaped: `kill_live_processes` stops them on the way out of
# an interrupted command, whatever code path the interrupt landed in (between the spawn and the
# code that would have killed it, for one).
_LIVE: "weakref.WeakSet[_LocalProcess]" = weakref.WeakSet()


def kill_live_processes() -> int:
    """Kill every local process this process started and has not reaped; returns how many."""
    n = 0
    for p in list(_LIVE):
        if p.poll() is None:
            p.kill()
            n += 1
    return n


class _LocalProcess(Process):
    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None, log_path: str | None = None) -> None:
        self._out = tempfile.TemporaryFile()
        self._err = open(log_path, "ab+") if log_path else tempfile.TemporaryFile()
        self.marker = str(argv[-1]) if argv else ""
        # stdin: a pipe the host holds open and never writes. A runner started with --watch-host
        # stops when it closes, i.e. when this process dies however it dies (kill -9 included).
        self._p = subprocess.Popen(
            list(argv), stdout=self._out, stderr=self._err, stdin=subprocess.PIPE,
            env={**os.environ, **(env or {})}, start_new_session=True,  # own group: kill takes children
        )
        self.pid = self._p.pid
        _LIVE.add(self)

    def poll(self) -> int | None:
        rc = self._p.poll()
        if rc is not None:
            _LIVE.discard(self)
            self._close_stdin()
        return rc

    def kill(self) -> None:
        _LIVE.discard(self)
        if self._p.poll() is None:
            try:
                os.killpg(self._p.pid, signal.SIGTERM)
                self._p.wait(timeout=2)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self._p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._p.wait()
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self._p.stdin is not None:
            try:
                self._p.stdin.close()
            except OSError:
                pass

    def output(self) -> tuple[str, str]:
        res = []
        for f in (self._out, self._err):
            f.seek(0)
            res.append(f.read().decode("utf-8", "replace"))
        return res[0], res[1]


class LocalTransport(Transport):
    """This machine: commands in subprocesses, files copied (or used in place)."""

    def __init__(self, profile: DeviceProfile) -> None:
        self.profile = profile
        self.work_dir = str(Path(os.path.expanduser(profile.resolved_work_dir)).resolve())
        Path(self.work_dir).mkdir(parents=True, exist_ok=True)

    def run(self, argv: Sequence[str], timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        timeout = DEFAULT_COMMAND_TIMEOUT_S if timeout is None else timeout
        t0 = time.perf_counter()
        p = self.spawn(argv, env)
        try:
            rc = p.wait(timeout)
        except CommandTimeout:
            raise CommandTimeout(
                f"{self.profile.name}: command '{argv[0]}' timed out after {timeout:g} s and was killed"
            ) from None
        except BaseException:  # Ctrl-C, SIGTERM/SIGHUP: the command stops with us
            p.kill()
            raise
        out, err = p.output()
        return Result(tuple(argv), rc, out, err, (time.perf_counter() - t0) * 1e3)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log_path: str | None = None) -> Process:
        try:
            return _LocalProcess(argv, env, log_path)
        except (FileNotFoundError, PermissionError) as e:
            if argv and argv[0] == self.python:
                raise TransportError(
                    f"{self.profile.name}: the profile's field 'python' is '{self.python}', which cannot be run "
                    f"on this machine ({e.strerror}); set it to a python >= 3.8 with numpy and onnxruntime") from None
            raise TransportError(f"{self.profile.name}: cannot run {argv[0]!r} ({e.strerror})") from None

    def remote_hashes(self, paths: Sequence[str]) -> dict[str, str | None]:
        return {p: sha256_file(p) if os.path.isfile(p) else None for p in paths}

    def _upload(self, local: Path, remote: str) -> None:
        if Path(remote).resolve() == local.resolve():
            return
        tmp = self._incoming_name(remote)
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, remote)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def fetch(self, remote: str, local: str | Path) -> Path:
        local = Path(local)
        if Path(remote).resolve() != local.resolve():
            shutil.copyfile(remote, local)
        return local

    def read_from(self, remote: str, offset: int = 0) -> bytes:
        try:
            with open(remote, "rb") as f:
                f.seek(offset)
                return f.read()
        except FileNotFoundError:
            return b""

    def write_bytes(self, remote: str, data: bytes, private: bool = False) -> None:
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(remote, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as f:
            if private:
                os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
            f.write(data)

    def _lstat_mode(self, path: str) -> int | None:
        try:
            return os.lstat(path).st_mode
        except FileNotFoundError:
            return None

    def makedirs(self, remote: str) -> None:
        Path(remote).mkdir(parents=True, exist_ok=True)

    def remove(self, *paths: str) -> None:
        for p in paths:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.remove(p)

    def kill_stale(self, pid: int, marker: str) -> None:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if marker.encode() in cmd:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def list_dir(self, path: str) -> list[tuple[str, int, int, float]]:
        if not self._listable(path):
            return []
        out = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed meanwhile
                        continue
                    out.append((e.name, st.st_mode, st.st_size, st.st_mtime))
        except FileNotFoundError:
            return []
        return out


# --------------------------------------------------------------------------------------------
# SSH
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SSHTarget:
    """Where and as whom to connect, after merging the profile with ~/.ssh/config."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts: str
    proxy_command: str | None = None  # ProxyCommand, its %h/%p/%r already this target's
    proxy_jump: "SSHTarget | None" = None  # ProxyJump: one jump host, reached directly

    @property
    def display(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The host's name in known_hosts (OpenSSH writes [host]:port for a port other than 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def ssh_config_path() -> Path:
    return Path(os.environ.get("HAT_EDGE_SSH_CONFIG", "~/.ssh/config")).expanduser()


# Values put into a ProxyCommand / ProxyJump by %h, %n, %r: as OpenSSH (>= 9.6) does for names
# from the command line, nothing a shell or an argument splitter would read as syntax.
_HOST_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_USER_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.@+-]+$")
_UNEXPANDED = ("proxycommand", "proxyjump")


def _read_ssh_config(path: Path):
    """~/.ssh/config, parsed by paramiko, except that ProxyCommand and ProxyJump keep their %
    tokens: paramiko would fill %h/%p/%r from the config's HostName/Port/User, while the
    profile's `host`/`port`/`user` may override those (`_expand_tokens` fills them at the end)."""
    import paramiko

    class _Config(paramiko.SSHConfig):
        def _allowed_tokens(self, key):  # noqa: ANN001, ANN202 (paramiko's hook)
            return [] if key in _UNEXPANDED else super()._allowed_tokens(key)

    try:
        return _Config.from_path(str(path))
    except Exception as e:  # paramiko raises several types for a malformed config
        raise TransportError(f"{path}: cannot parse ({e.__class__.__name__}: {e})") from None


def _lookup(config, path: Path, alias: str) -> dict:
    try:
        return dict(config.lookup(alias))
    except Exception as e:  # Match exec, canonicalisation: several types
        raise TransportError(f"{path}: cannot look up Host {alias} ({e.__class__.__name__}: {e})") from None


def _checked_token(value: str, pattern: re.Pattern, origin: str, key: str, token: str) -> str:
    if not pattern.match(value) or value.startswith("-"):
        raise TransportError(
            f"{origin} is {value!r}, which {key} would receive as {token}; allowed there: letters, digits "
            f"and {'. _ - : % [ ]' if pattern is _HOST_TOKEN_RE else '. _ - + @'} (no spaces or shell characters)"
        )
    return value


def _expand_tokens(value: str, key: str, where: str, *, host: str, host_origin: str, port: int,
                   user: str, user_origin: str, alias: str) -> str:
    """OpenSSH's %%, %h, %n, %p, %r in ProxyCommand / ProxyJump, from the host, port and user
    actually connected to; any other % token is refused."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        tok = value[i + 1:i + 2]
        if tok == "%":
            out.append("%")
        elif tok == "h":
            out.append(_checked_token(host, _HOST_TOKEN_RE, host_origin, key, "%h"))
        elif tok == "n":
            out.append(_checked_token(alias, _HOST_TOKEN_RE, f"{where} (the Host alias)", key, "%n"))
        elif tok == "p":
            out.append(str(port))
        elif tok == "r":
            out.append(_checked_token(user, _USER_TOKEN_RE, user_origin, key, "%r"))
        else:
            raise TransportError(f"{where}: {key} {value!r} uses {'%' + tok if tok else 'a lone %'}, "
                                 "allowed tokens: %%, %h, %n, %p, %r (write %% for a literal %)")
        i += 2
    return "".join(out)


def _parse_jump_spec(spec: str, where: str) -> tuple[str | None, str, int | None]:
    """ProxyJump's `[user@]host[:port]` (or ssh://...) -> (user, host, port); one hop only."""
    hops = [h for h in spec.split(",") if h.strip()]
    if len(hops) > 1:
        raise TransportError(
            f"{where}: ProxyJump {spec!r} has {len(hops)} hops; hat-edge goes through one jump host only: "
            "set ProxyJump to a single [user@]host[:port] that can reach the device"
        )
    s = spec.strip()
    if s.lower().startswith("ssh://"):
        s = s[len("ssh://"):].rstrip("/")
    user, _, hostport = s.rpartition("@")
    port_s: str | None = None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                host = ""
            port_s = rest[1:]
    elif hostport.count(":") == 1:
        host, port_s = hostport.split(":")
    else:
        host = hostport
    bad = f"{where}: ProxyJump {spec!r} is not [user@]host[:port]"
    if not host or not _HOST_TOKEN_RE.match(host) or host.startswith("-"):
        raise TransportError(f"{bad} (bad host {host!r})")
    if user and (not _USER_TOKEN_RE.match(user) or user.startswith("-")):
        raise TransportError(f"{bad} (bad user {user!r})")
    port: int | None = None
    if port_s is not None:
        if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise TransportError(f"{bad} (port {port_s!r}, allowed: 1-65535)")
        port = int(port_s)
    return user or None, host, port


def _resolve_jump(spec: str, config, path: Path, alias: str, known_hosts: str,
                  identity_files: tuple[str, ...]) -> SSHTarget:
    """The ProxyJump host, as `ssh -J` would take it: its own Host block in the config gives
    HostName, Port, User, IdentityFile, UserKnownHostsFile; user/port in the spec win. Without its
    own IdentityFile / UserKnownHostsFile it shares the device's."""
    where = f"{path}: Host {alias}"
    juser, jname, jport = _parse_jump_spec(spec, where)
    jcfg = _lookup(config, path, jname)
    own_jump = (jcfg.get("proxyjump") or "").strip()
    if own_jump and own_jump.lower() != "none" and own_jump != spec.strip() and own_jump != jname:
        raise TransportError(
            f"{path}: Host {jname} (the ProxyJump host of {alias}) has its own ProxyJump {own_jump!r}; "
            "hat-edge goes through one jump host only (add `ProxyJump none` to Host " + jname + ")"
        )
    if jcfg.get("proxycommand"):
        raise TransportError(
            f"{path}: Host {jname} (the ProxyJump host of {alias}) sets ProxyCommand; hat-edge reaches a jump "
            "host directly: remove it there or add `ProxyCommand none` to Host " + jname
        )
    ids = tuple(os.path.expanduser(p) for p in jcfg.get("identityfile", [])) or identity_files
    known = (jcfg.get("userknownhostsfile", "").split() or [known_hosts])[0]
    return SSHTarget(
        hostname=str(jcfg.get("hostname") or jname), port=int(jport or jcfg.get("port", 22)),
        user=str(juser or jcfg.get("user") or getpass.getuser()), identity_files=ids,
        known_hosts=os.path.expanduser(known),
    )


def resolve_ssh_target(profile: DeviceProfile) -> SSHTarget:
    """Profile fields win; `ssh_config_host` fills the rest from ~/.ssh/config (HostName, Port,
    User, IdentityFile, UserKnownHostsFile, ProxyCommand, ProxyJump), as `ssh ALIAS` would.
    ProxyCommand's %h/%p/%r are the host, port and user actually used (profile overrides
    included), so the proxy reaches the host whose key is checked. ProxyJump takes one jump host."""
    cfg: dict = {}
    config = None
    path = ssh_config_path()
    src = profile.source or profile.name
    if profile.ssh_config_host:
        if not path.is_file():
            raise TransportError(f"{src}: field 'ssh_config_host' is "
                                 f"'{profile.ssh_config_host}' but {path} does not exist")
        config = _read_ssh_config(path)
        cfg = _lookup(config, path, profile.ssh_config_host)
    hostname = profile.host or cfg.get("hostname") or profile.ssh_config_host
    port = profile.port or int(cfg.get("port", 22))
    user = profile.user or cfg.get("user") or getpass.getuser()
    if profile.identity_file:
        ids: tuple[str, ...] = (os.path.expanduser(profile.identity_file),)
    else:
        ids = tuple(os.path.expanduser(p) for p in cfg.get("identityfile", []))
    known = os.path.expanduser(
        profile.known_hosts or (cfg.get("userknownhostsfile", "").split() or ["~/.ssh/known_hosts"])[0])

    proxy_command = cfg.get("proxycommand")  # None when unset or `ProxyCommand none`
    proxy_jump = (cfg.get("proxyjump") or "").strip()
    if proxy_jump.lower() == "none":
        proxy_jump = ""
    jump: SSHTarget | None = None
    if proxy_command or proxy_jump:
        where = f"{path}: Host {profile.ssh_config_host}"
        if proxy_command and proxy_jump:
            raise TransportError(
                f"{where} gets both ProxyCommand and ProxyJump; keep one (add `ProxyCommand none` or "
                "`ProxyJump none` to that Host block)"
            )
        tokens = dict(
            host=str(hostname), port=int(port), user=str(user), alias=str(profile.ssh_config_host),
            host_origin=f"{src}: field 'host'" if profile.host else f"{where}: HostName",
            user_origin=(f"{src}: field 'user'" if profile.user else
                         f"{where}: User" if cfg.get("user") else "the local user name"),
        )
        if proxy_command:
            raw = re.sub(r"(?<!\S)~(?=/|\s|$)", lambda _: os.path.expanduser("~"), str(proxy_command))
            proxy_command = _expand_tokens(raw, "ProxyCommand", where, **tokens)
            try:
                if not shlex.split(proxy_command):
                    raise ValueError("empty command")
            except ValueError as e:
                raise TransportError(f"{where}: ProxyCommand {proxy_command!r} cannot be split into a "
                                     f"command ({e}); fix its quoting") from None
        else:
            spec = _expand_tokens(proxy_jump, "ProxyJump", where, **tokens)
            jump = _resolve_jump(spec, config, path, str(profile.ssh_config_host), known, ids)
    return SSHTarget(
        hostname=str(hostname), port=int(port), user=str(user), identity_files=ids,
        known_hosts=known, proxy_command=proxy_command or None, proxy_jump=jump,
    )


def key_fingerprint(key) -> str:
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# ---- known_hosts ----
_warned_lines: set[tuple[str, str]] = set()  # (file, line) warned about once per process


def _warn_line_once(path: str, line: str, msg: str, *args: object) -> None:
    if (path, line) not in _warned_lines:
        _warned_lines.add((path, line))
        log.warning(msg, *args)


def _host_matches(name: str, patterns: Sequence[str]) -> bool:
    """OpenSSH's known_hosts host patterns: `*`, `?`, `!negation`, hashed `|1|salt|hash` names."""
    from paramiko.hostkeys import HostKeys

    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        if pat.startswith("|1|"):
            try:
                m = HostKeys.hash_host(name, pat) == pat
            except Exception:  # a corrupt salt: matches nothing
                m = False
        else:
            rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pat)
            m = re.fullmatch(rx, name, re.IGNORECASE) is not None
        if m and neg:
            return False
        hit = hit or m
    return hit


def _load_known_hosts(path: str, into) -> list[tuple[tuple[str, ...], object, int]]:
    """Read an OpenSSH known_hosts file: plain lines go into `into` (paramiko HostKeys; hashed
    names kept as they are); `@revoked` lines come back as (host patterns, key, line number);
    `@cert-authority` lines are skipped with a warning (hat-edge verifies plain host keys only);
    a malformed plain line is skipped with a warning (its host stays unknown: fail closed), a
    malformed `@revoked` line is an error (a revocation must never be lost)."""
    from paramiko.hostkeys import HostKeyEntry

    revoked: list[tuple[tuple[str, ...], object, int]] = []
    seen: set[tuple[str, str]] = set()  # (host name, key type): the first line wins, as in HostKeys.load
    if not os.path.isfile(path):
        return revoked
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace")
    except OSError as e:
        raise HostKeyError(f"{path}: cannot read known_hosts ({e.strerror or e}); make it readable or "
                           "point the profile's 'known_hosts' at another file") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker = ""
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            marker, line = marker.split("\t")[0], line.strip()
            if marker == "@cert-authority":
                _warn_line_once(path, raw, "%s:%d: @cert-authority line skipped: hat-edge verifies plain host "
                                "keys only, not host certificates; add the device's own host key to %s",
                                path, lineno, path)
                continue
            if marker != "@revoked":
                _warn_line_once(path, raw, "%s:%d: unknown marker %s, line skipped (known markers: @revoked, "
                                "@cert-authority)", path, lineno, marker[:40])
                continue
        fields = re.split(r"[ \t]+", line)
        err = "fewer than 3 fields" if len(fields) < 3 else ""
        entry = None
        if not err:
            try:
                entry = HostKeyEntry.from_line(line, lineno)
            except Exception as e:  # bad base64 or key bytes: paramiko raises several types
                err = f"{e.__class__.__name__}: {str(e)[:80]}"
        if marker == "@revoked":
            if err:
                raise HostKeyError(f"{path}:{lineno}: cannot read this @revoked line ({err}); fix or remove it "
                                   "(hat-edge refuses to connect while a revocation is unreadable)")
            if entry is not None:  # None: a key type paramiko cannot negotiate, so never offered
                revoked.append((tuple(entry.hostnames), entry.key, lineno))
            continue
        if err:
            _warn_line_once(path, raw, "%s:%d: malformed known_hosts line skipped (%s)", path, lineno, err)
            continue
        if entry is None:
            continue
        names = [n for n in entry.hostnames if (n, entry.key.get_name()) not in seen]
        seen.update((n, entry.key.get_name()) for n in names)
        if names and isinstance(getattr(into, "_entries", None), list):
            into._entries.append(HostKeyEntry(names, entry.key))  # what HostKeys.load does, in linear time
        else:
            for name in names:
                into.add(name, entry.key.get_name(), entry.key)
    return revoked


def _revoked_msg(target: SSHTarget, profile_name: str, key, lineno: int) -> str:
    return (
        f"{profile_name}: host {target.known_hosts_name} offers {key.get_name()} {key_fingerprint(key)}, a key "
        f"marked @revoked in {target.known_hosts} (line {lineno}); refusing to connect (a revoked key is never "
        "trusted, also when listed as a plain line). Ask the device's administrator for its new host key"
    )


def _revocation_check(target: SSHTarget, revoked: list, profile_name: str):
    """check(key): HostKeyError if `key` is marked @revoked for the target's name."""

    def check(key) -> None:  # noqa: ANN001
        for patterns, rkey, lineno in revoked:
            if rkey.asbytes() == key.asbytes() and _host_matches(target.known_hosts_name, patterns):
                raise HostKeyError(_revoked_msg(target, profile_name, key, lineno))

    return check


def _revocation_checked_transport(check):  # noqa: ANN001, ANN202
    """A paramiko Transport class that refuses a revoked host key as soon as the server offers it
    (SSHClient asks for it before the known/unknown check and before authentication)."""
    import paramiko

    class _Checked(paramiko.Transport):
        def get_remote_server_key(self):  # noqa: ANN202
            key = super().get_remote_server_key()
            check(key)
            return key

    return _Checked


def _host_key_policy(target: SSHTarget, trust_new_host: bool, profile_name: str):
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):  # noqa: ANN001 (paramiko's signature)
            fp = key_fingerprint(key)
            known = client.get_host_keys().lookup(hostname)
            if known:  # known under another key type: treat as a changed key, never trust it
                raise HostKeyError(_changed_msg(target, profile_name, key, next(iter(known.values()))))
            if not trust_new_host:
                raise HostKeyError(
                    f"{profile_name}: host {target.known_hosts_name} is not in {target.known_hosts} "
                    f"(it offers {key.get_name()} {fp}); check that fingerprint on the device, then add it with "
                    f"`mkdir -p {shlex.quote(str(Path(target.known_hosts).parent))} && ssh-keyscan -p {target.port} "
                    f"{shlex.quote(target.hostname)} >> {shlex.quote(target.known_hosts)}` "
                    f"or rerun with --trust-new-host"
                )
            client.get_host_keys().add(hostname, key.get_name(), key)
            path = Path(target.known_hosts)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(path, "a") as f:
                os.chmod(path, 0o600)
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            log.warning("%s: trusted new host key %s %s for %s (added to %s)",
                        profile_name, key.get_name(), fp, hostname, path)

    return Policy()


def _changed_msg(target: SSHTarget, profile_name: str, got, expected) -> str:
    return (
        f"{profile_name}: host key for {target.known_hosts_name} has CHANGED (known "
        f"{expected.get_name()} {key_fingerprint(expected)}, offered {got.get_name()} {key_fingerprint(got)}); "
        f"refusing to connect. If the device was reinstalled, remove the old key with "
        f"`ssh-keygen -R {shlex.quote(target.known_hosts_name)} -f {shlex.quote(target.known_hosts)}` and connect again"
    )


class _SSHProcess(Process):
    """A command on an SSH channel. The remote shell prints its pid first (to stderr), then execs
    the command, so the pid is the command's own and a timeout can kill it."""

    PID_TAG = "HAT_EDGE_PID "

    def __init__(self, transport: "SSHTransport", argv: Sequence[str], env: Mapping[str, str] | None,
                 log_path: str | None = None) -> None:
        self._t = transport
        self.argv = list(argv)
        self.marker = str(argv[-1]) if argv else ""
        self.pid = None
        # sh -c keeps the wrapper POSIX whatever the login shell is; every argument is quoted.
        if log_path:
            # fd 3 keeps the channel's stdout open in the command, unused: the channel then reaches
            # EOF exactly when the command exits (a prompt wake-up), and a dropped link can never
            # break a pipe the command writes to.
            inner = 'l=$1; shift; echo "' + self.PID_TAG + '$$" >&2; exec "$@" 3>&1 >>"$l" 2>&1'
            cmd = quote_argv(["sh", "-c", inner, "sh", log_path, *_env_argv(env), *argv])
        else:
            inner = 'echo "' + self.PID_TAG + '$$" >&2; exec "$@"'
            cmd = quote_argv(["sh", "-c", inner, "sh", *_env_argv(env), *argv])
        self._chan = transport._ssh_transport().open_session(timeout=CONNECT_TIMEOUT_S)
        self._chan.exec_command(cmd)
        self._out: list[bytes] = []
        self._err = b""
        self._rc: int | None = None

    def _drain(self) -> None:
        c = self._chan
        while c.recv_ready():
            self._out.append(c.recv(65536))
        while c.recv_stderr_ready():
            self._err += c.recv_stderr(65536)
        if self.pid is None and b"\n" in self._err and self._err.startswith(self.PID_TAG.encode()):
            line, _, rest = self._err.partition(b"\n")
            self.pid = int(line[len(self.PID_TAG):])
            self._err = rest

    def poll(self) -> int | None:
        if self._rc is not None:
            return self._rc
        self._drain()
        if self._chan.exit_status_ready():
            self._drain()
            self._rc = self._chan.recv_exit_status()
            self._chan.close()
            return self._rc
        if self._chan.closed or not self._t.alive():
            raise ConnectionLost(f"{self._t.profile.name}: connection to {self._t.target.display} lost")
        return None

    def wait_io(self, timeout: float) -> None:
        """Block until output, exit or `timeout` seconds (select on the channel's pipe)."""
        c = self._chan
        if c.recv_ready() or c.recv_stderr_ready() or c.exit_status_ready():
            return
        if c.eof_received:  # the pipe stays readable after EOF: the exit status is on its way
            time.sleep(min(timeout, 0.01))
            return
        select.select([c], [], [], timeout)

    def kill(self) -> None:
        if self._rc is not None:
            return
        self._drain()
        if self.pid is not None and self._t.alive():
            try:
                self._t.run([self._t.python, "-c", "import os,sys; os.kill(int(sys.argv[1]), 9)", str(self.pid)],
                            timeout=30)
            except TransportError:
                pass
        self._chan.close()

    def output(self) -> tuple[str, str]:
        return b"".join(self._out).decode("utf-8", "replace"), self._err.decode("utf-8", "replace")


def _short_reason(e: BaseException) -> str:
    """An exception's text, one line and short (a library's message may span lines)."""
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _quiet_paramiko() -> None:
    """paramiko's transport thread logs a failed handshake with a traceback at ERROR level, which
    Python prints to stderr when nothing handles it; hat-edge says what went wrong in one line of
    its own instead (the exception still reaches the code that reports it)."""
    lg = logging.getLogger("paramiko")
    if not any(isinstance(h, logging.NullHandler) for h in lg.handlers):
        lg.addHandler(logging.NullHandler())
    lg.propagate = False


def _open_ssh_socket(target: "SSHTarget", who: str, timeout: float) -> socket.socket:
    """TCP to the target, then wait (peeking, nothing consumed) for the first bytes of the server's
    SSH banner: a port that accepts TCP but never speaks SSH (a stuck sshd, another service, a
    firewall's tarpit) fails after `timeout` seconds with what was seen, naming the profile fields."""
    t0 = time.monotonic()
    where = f"{target.hostname}:{target.port}"
    fields = "check the profile's fields 'host' and 'port' (or 'ssh_config_host')"
    try:
        s = socket.create_connection((target.hostname, target.port), timeout=timeout)
    except (TimeoutError, socket.timeout):
        raise ConnectionLost(f"{who}: no answer from {where} within {timeout:g} s (field 'connect_timeout_s'): {fields}, "
                             "and that the device is on and reachable") from None
    except ConnectionRefusedError:
        raise ConnectionLost(f"{who}: cannot connect to {target.display}: connection refused (no sshd answers there); "
                             f"{fields}") from None
    except OSError as e:
        raise ConnectionLost(f"{who}: cannot connect to {where} ({e.strerror or e.__class__.__name__}); {fields}") from None
    try:
        left = max(0.0, timeout - (time.monotonic() - t0))
        ready, _, _ = select.select([s], [], [], left)
        first = s.recv(4, socket.MSG_PEEK) if ready else None
    except OSError as e:
        s.close()
        raise ConnectionLost(f"{who}: {where} dropped the connection before the SSH banner ({e.strerror or e}); "
                             f"{fields}") from None
    waited = time.monotonic() - t0
    if first is None:
        s.close()
        raise ConnectionLost(f"{who}: {where}: TCP open, no SSH banner in {waited:.1f} s: not an SSH server, or a stuck "
                             f"one; {fields}, or raise 'connect_timeout_s' for a slow device") from None
    if first == b"":
        s.close()
        raise ConnectionLost(f"{who}: {where} closed the connection without an SSH banner (TCP open, then closed): "
                             f"{fields}") from None
    s.settimeout(timeout)
    return s


class SSHTransport(Transport):
    """One SSH connection (and one SFTP session) to a device, via paramiko."""

    def __init__(self, profile: DeviceProfile, trust_new_host: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        import paramiko

        self.profile = profile
        self.target = resolve_ssh_target(profile)
        self._trust_new_host = trust_new_host
        self._client = paramiko.SSHClient()
        self._jump: paramiko.SSHClient | None = None  # the ProxyJump host's connection, if any
        self._connect(connect_timeout)
        self._sftp = self._client.open_sftp()
        self._sftp.get_channel().settimeout(max(connect_timeout, 60.0))
        self._dirs: set[str] = set()  # device directories known to exist (one stat each, not one per upload)
        self.work_dir = self._resolve_dir(profile.resolved_work_dir)

    def _connect(self, timeout: float) -> None:
        """Connect the target: directly, through its ProxyCommand, or over a `direct-tcpip`
        channel of an SSH connection to its ProxyJump host (whose host key is checked the same way)."""
        t = self.target
        sock = None
        try:
            if t.proxy_jump is not None:
                import paramiko

                self._jump = paramiko.SSHClient()
                self._open_client(self._jump, t.proxy_jump, f"{self.profile.name} (ProxyJump host)", timeout)
                sock = self._jump_channel(timeout)
            elif t.proxy_command:
                sock = self._proxy_command(t.proxy_command)
            self._open_client(self._client, t, self.profile.name, timeout, sock)
        except BaseException:
            if sock is not None:
                try:
                    sock.close()
                except OSError:  # already closed with the client
                    pass
            if self._jump is not None:
                self._jump.close()
            raise
        self._ssh_transport().set_keepalive(15)  # notice a dead link between commands
        if self._jump is not None:
            self._jump.get_transport().set_keepalive(15)

    def _open_client(self, client, target: SSHTarget, who: str, timeout: float, sock=None) -> None:  # noqa: ANN001
        """Connect and authenticate one paramiko client; the host key checked against the
        target's known_hosts (revoked keys refused, unknown ones refused unless trust_new_host)."""
        import paramiko

        revoked = _load_known_hosts(target.known_hosts, client.get_host_keys())
        check = _revocation_check(target, revoked, who)
        client.set_missing_host_key_policy(_host_key_policy(target, self._trust_new_host, who))
        _quiet_paramiko()
        if sock is None:  # direct: our own socket, so a host that never speaks SSH fails in one line
            sock = _open_ssh_socket(target, who, timeout)
        t0 = time.monotonic()
        try:
            client.connect(
                target.hostname, port=target.port, username=target.user,
                key_filename=list(target.identity_files) or None,
                look_for_keys=not target.identity_files, allow_agent=True,
                timeout=timeout, banner_timeout=timeout, auth_timeout=timeout, sock=sock,
                transport_factory=_revocation_checked_transport(check) if revoked else None,
            )
            tr = client.get_transport()
            if revoked and tr is not None:  # belt and braces: the transport class checked it already
                check(tr.get_remote_server_key())
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyError(_changed_msg(target, who, e.key, e.expected_key)) from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise TransportError(f"{who}: the key for {target.display} is passphrase-protected; "
                                 "load it into ssh-agent (ssh-add) and retry") from None
        except paramiko.AuthenticationException as e:
            client.close()
            raise TransportError(
                f"{who}: authentication failed for {target.display} ({e}); put your public key in "
                "~/.ssh/authorized_keys on the device, or set identity_file / use ssh-agent"
            ) from None
        except paramiko.SSHException as e:
            client.close()
            if "No authentication methods" in str(e):
                raise TransportError(
                    f"{who}: no SSH key to log in to {target.display}: set the profile's field 'identity_file' "
                    "to your private key (e.g. ~/.ssh/id_ed25519), or load one into ssh-agent (ssh-add)"
                ) from None
            took = time.monotonic() - t0
            if took >= 0.9 * timeout:  # paramiko's words for a handshake that ran out of time vary
                raise ConnectionLost(
                    f"{who}: {target.hostname}:{target.port}: an SSH server answered, but the key exchange and "
                    f"login did not finish in {took:.1f} s: a stuck or overloaded sshd; raise the profile's field "
                    "'connect_timeout_s' for a slow device, or check 'host' and 'port'") from None
            raise ConnectionLost(f"{who}: cannot connect to {target.display}: the SSH handshake failed "
                                 f"({_short_reason(e)}); check the profile's fields 'host' and 'port'") from None
        except (TimeoutError, socket.timeout):
            client.close()
            raise ConnectionLost(
                f"{who}: no answer from {target.hostname}:{target.port} within {timeout:g} s: check the profile's "
                "fields 'host' and 'port' (or 'ssh_config_host'), and that the device is on and reachable") from None
        except (OSError, EOFError) as e:
            client.close()
            refused = isinstance(e, ConnectionRefusedError) or "Unable to connect" in str(e)
            raise ConnectionLost(
                f"{who}: cannot connect to {target.display}: connection refused (no sshd answers there); check the "
                "profile's fields 'host' and 'port' (or 'ssh_config_host')"
                if refused else f"{who}: cannot connect to {target.display} ({e.__class__.__name__}: {e}); check the "
                "profile's fields 'host' and 'port' (or 'ssh_config_host')") from None

    def _jump_channel(self, timeout: float):  # noqa: ANN202 (a paramiko Channel)
        """A `direct-tcpip` channel from the jump host to the target's host and port."""
        import paramiko
        from paramiko.common import OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

        t, j = self.target, self.target.proxy_jump
        assert self._jump is not None and j is not None
        try:
            return self._jump.get_transport().open_channel(
                "direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as e:
            if e.code == OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                raise TransportError(
                    f"{self.profile.name}: ProxyJump host {j.display} refuses to forward to {t.hostname}:{t.port} "
                    f"({e.text}); allow TCP forwarding there (sshd_config AllowTcpForwarding yes) or drop ProxyJump "
                    f"from {ssh_config_path()}"
                ) from None
            raise ConnectionLost(f"{self.profile.name}: ProxyJump host {j.display} cannot reach "
                                 f"{t.hostname}:{t.port} ({e.text})") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise ConnectionLost(f"{self.profile.name}: connection to ProxyJump host {j.display} lost "
                                 f"({e.__class__.__name__}: {e})") from None

    def _proxy_command(self, command: str):  # noqa: ANN202 (a paramiko ProxyCommand)
        import paramiko

        try:
            return paramiko.ProxyCommand(command)
        except (OSError, ValueError) as e:
            raise TransportError(f"{self.profile.name}: ProxyCommand {command!r} (from {ssh_config_path()}) could "
                                 f"not start ({getattr(e, 'strerror', None) or e})") from None

    def _ssh_transport(self):
        tr = self._client.get_transport()
        if tr is None or not tr.is_active():
            raise ConnectionLost(f"{self.profile.name}: connection to {self.target.display} lost")
        return tr

    def alive(self) -> bool:
        tr = self._client.get_transport()
        return tr is not None and tr.is_active()

    def _resolve_dir(self, path: str) -> str:
        """`~`, `~/x` and relative paths are taken from the login directory (SFTP's start dir)."""
        home = self._sftp.normalize(".")
        if path == "~":
            return home
        if path.startswith("~/"):
            return self.join(home, path[2:])
        if not path.startswith("/"):
            return self.join(home, path)
        return path

    # ---- commands ----
    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log_path: str | None = None) -> _SSHProcess:
        import paramiko

        try:
            return _SSHProcess(self, argv, env, log_path)
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise ConnectionLost(f"{self.profile.name}: connection to {self.target.display} lost ({e})") from None

    def run(self, argv: Sequence[str], timeout: float | None = None, env: Mapping[str, str] | None = None) -> Result:
        timeout = DEFAULT_COMMAND_TIMEOUT_S if timeout is None else timeout
        t0 = time.perf_counter()
        p = self.spawn(argv, env)
        deadline = time.monotonic() + timeout
        try:
            while (rc := p.poll()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    p.kill()
                    raise CommandTimeout(
                        f"{self.profile.name}: command '{argv[0]}' on {self.target.display} timed out after "
                        f"{timeout:g} s and was killed"
                    )
                p.wait_io(min(left, 0.5))
        except CommandTimeout:
            raise
        except BaseException:  # Ctrl-C, SIGTERM/SIGHUP: the command on the device stops with us
            try:
                p.kill()
            except Exception:  # a dead link: the device's runner finds no lock holder to wait for
                pass
            raise
        out, err = p.output()
        return Result(tuple(argv), rc, out, err, (time.perf_counter() - t0) * 1e3)

    # ---- files ----
    def _sftp_call(self, fn, *args):
        import paramiko

        try:
            return fn(*args)
        except (EOFError, socket.timeout, paramiko.SSHException) as e:
            raise ConnectionLost(f"{self.profile.name}: connection to {self.target.display} lost ({e.__class__.__name__})") from None
        except OSError as e:
            if not self.alive():
                raise ConnectionLost(f"{self.profile.name}: connection to {self.target.display} lost ({e})") from None
            if isinstance(e, FileNotFoundError):
                raise  # callers test for absence
            what = " ".join(str(a) for a in args if isinstance(a, str))
            raise TransportError(f"{self.profile.name}: SFTP on {self.target.display} failed for {what}: "
                                 f"{e.strerror or e}") from None

    def _upload(self, local: Path, remote: str) -> None:
        tmp = self._incoming_name(remote)
        try:
            for attempt in (1, 2):
                self.makedirs(str(PurePosixPath(tmp).parent))
                self.makedirs(str(PurePosixPath(remote).parent))
                try:
                    self._sftp_call(self._sftp.put, str(local), tmp)
                    self._sftp_call(self._sftp.posix_rename, tmp, remote)
                    return
                except FileNotFoundError:
                    if attempt == 2:
                        raise
                    # A directory this connection had seen was removed meanwhile (by hand, another
                    # host): forget the known ones and make them again.
                    self._dirs.clear()
        except BaseException:
            if self.alive():
                try:
                    self._sftp.remove(tmp)
                except OSError:
                    pass
            raise

    def fetch(self, remote: str, local: str | Path) -> Path:
        local = Path(local)
        self._sftp_call(self._sftp.get, remote, str(local))
        return local

    def read_from(self, remote: str, offset: int = 0) -> bytes:
        def read() -> bytes:
            try:
                with self._sftp.open(remote, "rb") as f:
                    f.seek(offset)
                    return f.read()
            except FileNotFoundError:
                return b""
        return self._sftp_call(read)

    def write_bytes(self, remote: str, data: bytes, private: bool = False) -> None:
        def write() -> None:
            with self._sftp.open(remote, "wb") as f:
                if private:
                    f.chmod(0o600)  # before the data: never readable by others, not even briefly
                f.write(data)
        self._sftp_call(write)

    def _lstat_mode(self, path: str) -> int | None:
        def lstat() -> int | None:
            try:
                return self._sftp.lstat(path).st_mode
            except FileNotFoundError:
                return None
        return self._sftp_call(lstat)

    def makedirs(self, remote: str) -> None:
        if remote in self._dirs:
            return
        parts = PurePosixPath(remote).parts
        cur = PurePosixPath(parts[0])
        for part in parts[1:]:
            cur = cur / part
            if str(cur) in self._dirs:
                continue
            try:
                self._sftp_call(self._sftp.stat, str(cur))
            except FileNotFoundError:
                self._sftp_call(self._sftp.mkdir, str(cur))
            self._dirs.add(str(cur))

    def remove(self, *paths: str) -> None:
        """Removed over SFTP, a directory tree walked without following links: a round trip per
        file instead of a `python -c` on the device (an interpreter start, 0.1-0.15 s on this
        project's VM and slower on a board, once per batch)."""
        for path in paths:
            self._sftp_call(self._remove_tree, path)
            self._dirs = {d for d in self._dirs if d != path and not d.startswith(path.rstrip("/") + "/")}

    def _remove_tree(self, path: str) -> None:
        sftp = self._sftp
        try:
            st = sftp.lstat(path)
        except FileNotFoundError:
            return
        try:
            if statmod.S_ISDIR(st.st_mode or 0):
                for entry in sftp.listdir_attr(path):  # the server's attributes are lstat's
                    self._remove_tree(self.join(path, entry.filename))
                sftp.rmdir(path)
            else:
                sftp.remove(path)
        except FileNotFoundError:  # gone meanwhile: what was asked for
            pass

    def close(self) -> None:
        try:
            self._sftp.close()
        except Exception:  # closing a dead link must not mask the error being handled
            pass
        self._client.close()
        if self._jump is not None:
            self._jump.close()

    def list_dir(self, path: str) -> list[tuple[str, int, int, float]]:
        if not self._listable(path):
            return []

        def listing() -> list[tuple[str, int, int, float]]:
            try:  # the server's attributes are lstat's: a link is not followed
                return [(a.filename, a.st_mode or 0, a.st_size or 0, float(a.st_mtime or 0))
                        for a in self._sftp.listdir_attr(path)]
            except FileNotFoundError:
                return []
        return self._sftp_call(listing)


# --------------------------------------------------------------------------------------------
def open_transport(
    profile: DeviceProfile,
    trust_new_host: bool = False,
    retries: int = 3,
    backoff_s: float = 1.0,
    connect_timeout: float | None = None,
) -> Transport:
    """Connect to the profile's device. Transient failures (refused, reset, timed out) are retried
    `retries` times with exponential backoff (backoff_s, 2x, 4x, ...); host key and authentication
    problems fail at once. `connect_timeout`: per try; default the profile's `connect_timeout_s`."""
    if profile.is_local:
        return LocalTransport(profile)
    connect_timeout = profile.connect_timeout_s if connect_timeout is None else connect_timeout
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return SSHTransport(profile, trust_new_host=trust_new_host, connect_timeout=connect_timeout)
        except ConnectionLost as e:
            if attempt == retries:
                raise
            log.info("%s; retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


__all__ = [
    "CommandTimeout",
    "ConnectionLost",
    "HostKeyError",
    "LocalTransport",
    "Process",
    "Result",
    "SSHTarget",
    "SSHTransport",
    "Transport",
    "TransportError",
    "open_transport",
    "quote_argv",
    "resolve_ssh_target",
    "sha256_file",
]
