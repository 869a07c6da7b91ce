"""A private Dovecot (POP3 + LMTP) for integration tests and benchmarks.

Each instance writes its own ``dovecot.conf`` under ``base_dir`` and never reads
``/etc/dovecot``; it listens on 127.0.0.1 only, on ports picked at start.
Run as root, Dovecot's mail processes use the ``mail`` system user; run as an
ordinary user, every Dovecot process and every Maildir belongs to that user.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import pwd
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

if TYPE_CHECKING:
    from tests.support.certs import TestPKI

CertKind = Literal["good", "wrong_name", "untrusted", "expired"]

# The accounts every test server has unless a test asks for others.
TEST_USERS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw"}
NOT_INSTALLED = "Dovecot is not installed: apt-get install dovecot-core dovecot-pop3d dovecot-lmtpd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 4
LOG_TAIL_LINES = 40
DH_PARAMS = Path("/usr/share/dovecot/dh.pem")
TLS_PROTOCOLS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
DEFAULT_TLS_MIN = "TLSv1.2"
LEGACY_TLS = ("TLSv1", "TLSv1.1")
# A user name or password ends up in a passwd-file line and in a path.
FORBIDDEN_IN_USER = frozenset(":/\n\r\0")
FORBIDDEN_IN_PASSWORD = frozenset(":\n\r\0")

_delivery_counter = itertools.count()

# Runs Dovecot's master in a session of its own and stops it with SIGKILL to
# that whole session: Dovecot's orderly shutdown always sleeps a full second
# (services_monitor_wait_and_kill), too slow for a server per test.  As a child
# subreaper it also reaps the killed children, which would otherwise stay
# zombies wherever PID 1 does not reap.  It stops Dovecot when its stdin
# closes, which also happens when the test process dies in any way.
_SUPERVISOR = """
import ctypes, os, signal, sys, threading
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
pid_file, argv = sys.argv[1], sys.argv[2:]
master = os.fork()
if master == 0:
    os.setsid()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.execv(argv[0], argv)
with open(pid_file, "w") as handle:
    handle.write(str(master))
def kill_all(*_):
    try:
        os.killpg(master, signal.SIGKILL)
    except ProcessLookupError:
        pass
def watch_parent():
    while os.read(0, 4096):
        pass
    kill_all()
signal.signal(signal.SIGTERM, kill_all)
threading.Thread(target=watch_parent, daemon=True).start()
status = 0
while True:
    try:
        pid, wait_status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == master:
        status = os.waitstatus_to_exitcode(wait_status)
        kill_all()
if status in (0, -signal.SIGKILL):
    sys.exit(0)
sys.exit(status if status > 0 else 128 - status)
"""

_CONFIG = string.Template("""\
# Written by tests.support.dovecot; regenerated at every start.
base_dir = $base/run
state_dir = $base/state
instance_name = $instance
log_path = $log
protocols = $protocols
listen = 127.0.0.1
hostname = dovecot.test
postmaster_address = postmaster@dovecot.test
default_internal_user = $internal_user
default_internal_group = $internal_group
default_login_user = $login_user
first_valid_uid = $uid
last_valid_uid = $uid
first_valid_gid = $gid
last_valid_gid = $gid

ssl = yes
ssl_cert = <$cert
ssl_key = <$key
ssl_min_protocol = $tls_min

disable_plaintext_auth = no
auth_mechanisms = plain login
# Dovecot 2.3 still answers a failed login after 0.5 s, but not after 2 s.
auth_failure_delay = 0
passdb {
  driver = passwd-file
  args = scheme=PLAIN $base/users
}
userdb {
  driver = passwd-file
  args = $base/users
}

mail_location = maildir:$base/mail/%u
mail_fsync = optimized
pop3_uidl_format = %08Xu%08Xv
pop3_no_flag_updates = yes
protocol pop3 {
  mail_max_userip_connections = 1000
}
protocol lmtp {
  auth_username_format = $lmtp_format
}

service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $pop3_port
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $pop3s_port
    ssl = yes
  }
  # One long-lived login process serves every connection: no fork per
  # session, which keeps thousands of short sessions cheap.
  service_count = 0
  process_min_avail = 1
}
service pop3 {
  process_limit = 1000
}
# The auth penalty (up to 15 s per failure and IP) is off when the auth
# process cannot reach this socket; it logs one error at start-up instead.
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
$optional
""")
_LMTP_SERVICE = string.Template("""\
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = $port
  }
}""")
# Without root there is nothing to chroot into and no user to switch to.
_UNPRIVILEGED = string.Template("""\
service pop3-login {
  chroot =
}
service anvil {
  chroot =
}
service auth-worker {
  user = $user
}""")


@dataclass(frozen=True)
class _Accounts:
    """Unix identities the Dovecot processes and the mail files run as."""

    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int
    privileged: bool

    @classmethod
    def detect(cls) -> _Accounts:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            group = grp.getgrgid(os.getegid()).gr_name
            return cls(me.pw_name, group, me.pw_name, me.pw_uid, me.pw_gid, privileged=False)
        try:
            mail = pwd.getpwnam("mail")
            pwd.getpwnam("dovecot")
            pwd.getpwnam("dovenull")
        except KeyError as exc:
            raise RuntimeError(f"{NOT_INSTALLED} (system user missing: {exc})") from None
        return cls("dovecot", "dovecot", "dovenull", mail.pw_uid, mail.pw_gid, privileged=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    [port] = free_ports(1)
    return port


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago on 127.0.0.1 (Dovecot cannot bind port 0)."""
    sockets = []
    try:
        # Hold every socket until all are bound so the ports are distinct.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def virtual_size(data: bytes) -> int:
    """Size of ``data`` with every bare LF counted as CRLF, as POP3 LIST reports it."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


class Dovecot:
    """One Dovecot master process serving POP3, POP3S and (optionally) LMTP."""

    host = "127.0.0.1"

    def __init__(
        self,
        base_dir: Path,
        pki: TestPKI,
        *,
        users: dict[str, str],
        cert: CertKind = "good",
        lmtp: bool = True,
        tls_min: str | None = None,
        tls_max: str | None = None,
        binary: str = "dovecot",
    ) -> None:
        for user, password in users.items():
            if not user or FORBIDDEN_IN_USER & set(user) or user.startswith("."):
                raise ValueError(f"unusable user name {user!r}")
            if FORBIDDEN_IN_PASSWORD & set(password):
                raise ValueError(f"unusable password for {user!r}")
        for version in (tls_min, tls_max):
            if version is not None and version not in TLS_PROTOCOLS:
                raise ValueError(f"unknown TLS version {version!r}; use one of {TLS_PROTOCOLS}")
        if tls_min is None:
            # Dovecot's own floor, lowered when the ceiling asks for less.
            tls_min = DEFAULT_TLS_MIN
            if tls_max is not None and TLS_PROTOCOLS.index(tls_max) < TLS_PROTOCOLS.index(tls_min):
                tls_min = tls_max
        if tls_max is not None and TLS_PROTOCOLS.index(tls_max) < TLS_PROTOCOLS.index(tls_min):
            raise ValueError(f"tls_max {tls_max} is below tls_min {tls_min}")
        self.base_dir = Path(base_dir).absolute()
        self.pki = pki
        self.users = dict(users)
        self.cert = cert
        self.lmtp = lmtp
        self.tls_min = tls_min
        self.tls_max = tls_max
        self.binary = binary
        self.cert_file, self.key_file = pki.pair(cert)
        self.pop3_port = 0
        self.pop3s_port = 0
        self.lmtp_port = 0
        self.config_path = self.base_dir / "dovecot.conf"
        self.log_path = self.base_dir / "dovecot.log"
        self.stderr_path = self.base_dir / "dovecot.stderr"
        self.supervisor_pid_path = self.base_dir / "dovecot.pgid"
        self._accounts = _Accounts.detect()
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start Dovecot and wait until POP3 and LMTP greet; RuntimeError with its log if not."""
        if self._process is not None:
            raise RuntimeError("Dovecot is already running")
        # Debian installs it in /usr/sbin, which is not on every user's PATH.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        binary = shutil.which(self.binary, path=search)
        if binary is None:
            raise RuntimeError(NOT_INSTALLED)
        self._prepare_tree()
        failure = ""
        for _ in range(START_ATTEMPTS):
            self.pop3_port, self.pop3s_port, self.lmtp_port = free_ports(3)
            if not self.lmtp:
                self.lmtp_port = 0
            self.config_path.write_text(self._config())
            failure = self._launch(binary)
            if not failure:
                return
            # Another process may have taken a port between the probe and the
            # bind; only that case is worth another try.
            if "in use" not in self.log_tail():
                break
        raise RuntimeError(f"Dovecot did not start: {failure}\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop Dovecot and every process it started; safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.returncode != 0:
            # The supervisor did not get to clean up: kill what it started.
            with contextlib.suppress(OSError, ValueError):
                pgid = int(self.supervisor_pid_path.read_text())
                os.killpg(pgid, signal.SIGKILL)

    def _launch(self, binary: str) -> str:
        """Run the master; return "" once it serves, else why it did not."""
        self.supervisor_pid_path.unlink(missing_ok=True)
        (self.base_dir / "run" / "master.pid").unlink(missing_ok=True)
        argv = [sys.executable, "-I", "-S", "-c", _SUPERVISOR, str(self.supervisor_pid_path)]
        argv += [binary, "-F", "-c", str(self.config_path)]
        with self.stderr_path.open("ab") as stderr:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stderr, stderr=stderr)
        self._process = process
        # A bound port is not proof enough: the master binds its inet listeners
        # before it may still fail on the rest, so wait for real greetings.
        probes = [(self.pop3_port, b"+OK"), (self.pop3s_port, b"")]
        if self.lmtp:
            probes.append((self.lmtp_port, b"220"))
        deadline = time.monotonic() + START_TIMEOUT
        while probes:
            if process.poll() is not None:
                self.stop()
                return f"dovecot exited with status {process.returncode}"
            if time.monotonic() > deadline:
                self.stop()
                return f"no service on port {probes[0][0]} after {START_TIMEOUT:.0f} s"
            if self._greets(*probes[0]):
                probes.pop(0)
            else:
                time.sleep(0.01)
        return ""

    def _greets(self, port: int, greeting: bytes) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1.0) as sock:
                if not greeting:
                    return True
                if not sock.recv(512).startswith(greeting):
                    return False
                # Say goodbye so Dovecot logs a clean disconnect, not a reset.
                sock.sendall(b"QUIT\r\n")
                while sock.recv(512):
                    pass
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of Dovecot's log and of its stderr, for error messages."""
        parts = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(Dovecot wrote no log)"

    # -- mailboxes ---------------------------------------------------------

    def maildir(self, user: str) -> Path:
        """The Maildir Dovecot serves for ``user``."""
        if user not in self.users:
            raise KeyError(f"no such user {user!r}")
        return self.base_dir / "mail" / user

    def add_messages(self, user: str, messages: Iterable[bytes]) -> None:
        """Drop ``messages`` straight into ``user``'s ``new/``, readable by Dovecot."""
        maildir = self._make_maildir(user)
        tmp, new = maildir / "tmp", maildir / "new"
        uid, gid = self._accounts.mail_uid, self._accounts.mail_gid
        chown = os.geteuid() != uid
        seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
        stamp = f"{seconds}.M{micros}P{os.getpid()}"
        for data in messages:
            # Dovecot numbers new mail by the time in the name, then by the name
            # itself: the zero-padded counter keeps POP3 order = call order.
            # S= and W= let Dovecot answer STAT/LIST without reading every file;
            # both must be exact or Dovecot reports the Maildir as corrupted.
            name = (
                f"{stamp}Q{next(_delivery_counter):010d}.gpopd-test"
                f",S={len(data)},W={virtual_size(data)}"
            )
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if chown:
                    os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
            os.rename(tmp / name, new / name)

    def message_count(self, user: str) -> int:
        """Messages in ``user``'s Maildir (``new/`` and ``cur/``)."""
        maildir = self.maildir(user)
        return sum(
            len(os.listdir(maildir / sub)) for sub in ("new", "cur") if (maildir / sub).is_dir()
        )

    def messages(self, user: str) -> list[bytes]:
        """Contents of ``user``'s messages, oldest delivery first."""
        maildir = self.maildir(user)
        paths = [
            path
            for sub in ("new", "cur")
            if (maildir / sub).is_dir()
            for path in (maildir / sub).iterdir()
        ]
        paths.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
        return [path.read_bytes() for path in paths]

    def clear(self, user: str) -> None:
        """Delete every message of ``user``; UIDLs of later messages stay unique."""
        maildir = self.maildir(user)
        for sub in ("new", "cur", "tmp"):
            directory = maildir / sub
            if directory.is_dir():
                for entry in os.scandir(directory):
                    os.unlink(entry.path)

    # -- files -------------------------------------------------------------

    def _make_maildir(self, user: str) -> Path:
        maildir = self.maildir(user)
        for path in (maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            if not path.is_dir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chown(path, self._accounts.mail_uid, self._accounts.mail_gid)
        return maildir

    def _prepare_tree(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        if self._accounts.privileged:
            self._open_path_to_base()
        (self.base_dir / "mail").mkdir(mode=0o755, exist_ok=True)
        (self.base_dir / "home").mkdir(mode=0o755, exist_ok=True)
        for user in self.users:
            self._make_maildir(user)
            home = self.base_dir / "home" / user
            home.mkdir(mode=0o700, exist_ok=True)
            os.chown(home, self._accounts.mail_uid, self._accounts.mail_gid)
        self._write_passwd_file()

    def _open_path_to_base(self) -> None:
        # Dovecot's mail and auth processes run as unprivileged users and must
        # reach files under base_dir; temporary directories (pytest's among
        # them) are often 0700.  Search permission alone lists nothing.
        for directory in (self.base_dir, *self.base_dir.parents):
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def _write_passwd_file(self) -> None:
        uid, gid = self._accounts.mail_uid, self._accounts.mail_gid
        lines = [
            f"{user}:{{PLAIN}}{password}:{uid}:{gid}::{self.base_dir / 'home' / user}::\n"
            for user, password in self.users.items()
        ]
        path = self.base_dir / "users"
        path.write_text("".join(lines))
        if self._accounts.privileged:
            internal = pwd.getpwnam(self._accounts.internal_user)
            os.chown(path, 0, internal.pw_gid)
            path.chmod(0o640)
        else:
            path.chmod(0o600)

    def _config(self) -> str:
        accounts = self._accounts
        optional = []
        if DH_PARAMS.is_file():
            optional.append(f"ssl_dh = <{DH_PARAMS}")
        if self.tls_min in LEGACY_TLS:
            # OpenSSL 3 refuses TLS < 1.2 at its default security level.
            optional.append("ssl_cipher_list = DEFAULT:@SECLEVEL=0")
        if self.tls_max is not None:
            optional.append(f"import_environment = OPENSSL_CONF={self._openssl_conf()}")
        if self.lmtp:
            optional.append(_LMTP_SERVICE.substitute(port=self.lmtp_port))
        if not accounts.privileged:
            optional.append(_UNPRIVILEGED.substitute(user=accounts.internal_user))
        return _CONFIG.substitute(
            base=self.base_dir,
            instance=f"gpopd-test-{os.getpid()}-{id(self):x}",
            log=self.log_path,
            protocols="pop3 lmtp" if self.lmtp else "pop3",
            internal_user=accounts.internal_user,
            internal_group=accounts.internal_group,
            login_user=accounts.login_user,
            uid=accounts.mail_uid,
            gid=accounts.mail_gid,
            cert=self.cert_file,
            key=self.key_file,
            tls_min=self.tls_min,
            lmtp_format="%Ln" if all("@" not in user for user in self.users) else "%Lu",
            pop3_port=self.pop3_port,
            pop3s_port=self.pop3s_port,
            optional="\n".join(optional),
        )

    def _openssl_conf(self) -> Path:
        # Dovecot 2.3 has no ssl_max_protocol; OpenSSL's own configuration
        # caps the version for the whole Dovecot process tree.
        path = self.base_dir / "openssl.cnf"
        path.write_text(
            "openssl_conf = default_conf\n"
            "[default_conf]\n"
            "ssl_conf = ssl_sect\n"
            "[ssl_sect]\n"
            "system_default = system_default_sect\n"
            "[system_default_sect]\n"
            f"MaxProtocol = {self.tls_max}\n"
            "CipherString = DEFAULT:@SECLEVEL=0\n"
        )
        path.chmod(0o644)
        return path


# Starts a Dovecot with Dovecot(...) keyword options (the dovecot_factory fixture).
DovecotFactory = Callable[..., Dovecot]
