"""The clients under test: how each is configured and started for one run.

Every tool gets the same job: download every message of one or more
mailboxes over implicit TLS (verifying the test CA and the server's name),
keep the mail on the server and deliver each mailbox into a fresh Maildir.
All of a run's configuration and state lives in its own directory, so a new
run directory means a fresh UIDL file, ``.fetchids``, oldmail file or state
database.

Tool-specific choices, and why:

- mpop delivers to a Maildir itself; one configuration file holds every
  account and ``-a`` polls them all (one after another).
- fetchmail cannot write a Maildir; each message goes through
  ``procmail -m DEFAULT=DIR/ /dev/null`` (one process per message, no
  rules), the smallest MDA Debian ships that writes Maildir files.  As root it
  needs ``FETCHMAILHOME``, ``--nosyslog`` and ``-N``.  It checks the server's
  name only against a certificate that has a subject CN, and only as a DNS
  name, so it polls ``localhost`` and the bench's certificate carries
  ``CN=localhost``.
- getmail6 refuses to deliver as root, so as root it runs as ``nobody`` and
  its run directory is handed to that user.
- gpopd gets one configuration file with every account; ``gpopd poll``
  polls them concurrently.
- floor is ``bench/floor.py``: no tool, just the cost of the download.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROCMAIL = "/usr/bin/procmail"
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class Server:
    """Where the POP3S service is and how a client verifies it."""

    port: int
    ca_file: Path
    host: str = "127.0.0.1"
    # For clients that only match DNS names against the certificate.
    name: str = "localhost"


@dataclass(frozen=True)
class Mailbox:
    """One POP3 account on the server."""

    account: str
    user: str
    password: str
    password_file: Path


@dataclass(frozen=True)
class SmtpSink:
    """Where the SMTP scenario's sink listens and where it files each recipient's mail."""

    port: int
    root: Path
    host: str = "127.0.0.1"
    domain: str = "bench.test"


@dataclass(frozen=True)
class Job:
    """One run of one tool: the mailboxes to download and a fresh directory.

    With ``smtp``, every tool forwards to that sink instead of writing a
    Maildir; each mailbox's mail then lands in ``delivered(mailbox)``.
    """

    run_dir: Path
    server: Server
    mailboxes: tuple[Mailbox, ...]
    smtp: SmtpSink | None = None

    def maildir(self, mailbox: Mailbox) -> Path:
        return self.run_dir / "mail" / mailbox.account

    def sink_name(self, mailbox: Mailbox) -> str:
        """The recipient's local part: unique per scenario, tool, run and mailbox."""
        scenario, tool, run = self.run_dir.parts[-3:]
        return f"{scenario}-{tool}-{run}-{mailbox.account}"

    def recipient(self, mailbox: Mailbox) -> str:
        assert self.smtp is not None
        return f"{self.sink_name(mailbox)}@{self.smtp.domain}"

    def delivered(self, mailbox: Mailbox) -> Path:
        """The Maildir-like directory the checks read for ``mailbox``."""
        if self.smtp is not None:
            return self.smtp.root / self.sink_name(mailbox)
        return self.maildir(mailbox)


@dataclass(frozen=True)
class Command:
    """What to start, from where, and as whom."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    uid: int | None = None
    gid: int | None = None


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
    return path


def _make_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def _quote(value: str) -> str:
    # JSON strings are valid YAML 1.2 double-quoted scalars.
    return json.dumps(value)


def base_env() -> dict[str, str]:
    """The environment every tool runs with: the locale and the path, nothing else."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")
    return {key: os.environ[key] for key in keep if key in os.environ}


class Tool:
    """A client the bench can run; subclasses write its configuration."""

    name = ""
    #: Whether every delivered file must equal the corpus's expected delivery.
    byte_exact = False
    #: Whether the tool starts helper processes (an MDA) whose memory is not
    #: the tool's: its peak RSS is then that of its own process alone.
    main_process_rss = False

    def missing(self) -> str | None:
        """Why this tool cannot run here, or None."""
        return None

    def command(self, job: Job) -> Command:
        raise NotImplementedError

    def prepare(self, job: Job) -> Command:
        """Create the run's Maildirs and configuration; return the command."""
        for mailbox in job.mailboxes:
            _make_maildir(job.maildir(mailbox))
        return self.command(job)


def _gpopd_delivery(job: Job, mailbox: Mailbox) -> str:
    if job.smtp is None:
        return f"{{type: maildir, path: {_quote(str(job.maildir(mailbox)))}}}"
    return (
        f"{{type: smtp, host: {_quote(job.smtp.host)}, port: {job.smtp.port}, tls: none, "
        f"recipient: [{_quote(job.recipient(mailbox))}]}}"
    )


# mpop, fetchmail and getmail6 download a message of any size by default;
# gpopd's default limit (50 MiB) would leave a-big's 100 MB message behind.
GPOPD_MAX_MESSAGE_SIZE = 1 << 30


class Gpopd(Tool):
    name = "gpopd"
    byte_exact = True

    def missing(self) -> str | None:
        if not (REPO / "gpopd" / "__main__.py").is_file():
            return "gpopd package not found"
        return None

    def command(self, job: Job) -> Command:
        lines = [f"state_dir: {_quote(str(job.run_dir / 'state'))}", "accounts:"]
        for mailbox in job.mailboxes:
            lines += [
                f"  {mailbox.account}:",
                f"    host: {_quote(job.server.host)}",
                f"    port: {job.server.port}",
                "    tls: implicit",
                f"    ca_file: {_quote(str(job.server.ca_file))}",
                f"    username: {_quote(mailbox.user)}",
                f"    password: {{file: {_quote(str(mailbox.password_file))}}}",
                "    keep: true",
                f"    max_message_size: {GPOPD_MAX_MESSAGE_SIZE}",
                f"    delivery: {_gpopd_delivery(job, mailbox)}",
            ]
        config = _write_private(job.run_dir / "gpopd.yaml", "\n".join(lines) + "\n")
        env = base_env() | {"PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "gpopd", "poll", "--config", str(config), "--log-format"]
        return Command([*argv, "json"], REPO, env)


class Mpop(Tool):
    name = "mpop"

    def missing(self) -> str | None:
        return None if shutil.which("mpop") else "mpop is not installed"

    def command(self, job: Job) -> Command:
        lines = [
            "defaults",
            "tls on",
            "tls_starttls off",
            f"tls_trust_file {job.server.ca_file}",
            "keep on",
        ]
        for mailbox in job.mailboxes:
            lines += [
                "",
                f"account {mailbox.account}",
                f"host {job.server.host}",
                f"port {job.server.port}",
                f"user {mailbox.user}",
                f"password {mailbox.password}",
                f"delivery maildir {job.maildir(mailbox)}",
                f"uidls_file {job.run_dir / 'uidls' / mailbox.account}",
            ]
        config = _write_private(job.run_dir / "mpoprc", "\n".join(lines) + "\n")
        env = base_env() | {"HOME": str(job.run_dir)}
        return Command(["mpop", "-C", str(config), "-a", "-q"], job.run_dir, env)


class Fetchmail(Tool):
    name = "fetchmail"
    # procmail reads a whole message into memory; that is not fetchmail's.
    main_process_rss = True

    def missing(self) -> str | None:
        if not shutil.which("fetchmail"):
            return "fetchmail is not installed"
        if not os.access(PROCMAIL, os.X_OK):
            return f"{PROCMAIL} (the MDA) is not installed"
        return None

    def command(self, job: Job) -> Command:
        home = job.run_dir / "fetchmail"
        home.mkdir(mode=0o700)
        lines = ["set no bouncemail", ""]
        for mailbox in job.mailboxes:
            mda = f"{PROCMAIL} -m DEFAULT={job.maildir(mailbox)}/ /dev/null"
            # Forwarding to SMTP is fetchmail's natural mode; the MDA is
            # only for Maildir.
            destination = (
                [f'  mda "{mda}"']
                if job.smtp is None
                else [
                    f"  smtphost {job.smtp.host}/{job.smtp.port}",
                    f'  smtpname "{job.recipient(mailbox)}"',
                ]
            )
            lines += [
                # The entry's label is the account; "via" is what is contacted
                # and the name the certificate must carry.
                f"poll {mailbox.account} via {job.server.name} protocol pop3"
                f" port {job.server.port}",
                f'  user "{mailbox.user}" password "{mailbox.password}" is root here',
                f'  ssl sslcertck sslcertfile "{job.server.ca_file}"',
                "  keep",
                *destination,
                "",
            ]
        config = _write_private(job.run_dir / "fetchmailrc", "\n".join(lines))
        env = base_env() | {"HOME": str(home), "FETCHMAILHOME": str(home)}
        argv = ["fetchmail", "-f", str(config), "--nosyslog", "-N", "--silent"]
        return Command(argv, job.run_dir, env)


# getmail6 6.18 installs its SIGCHLD handler only after fork(); when the
# delivery child exits first, it waits for the retriever's timeout and then
# gives up on the account (getmail6 issue 226).  The default timeout (180 s)
# turns each such miss into minutes; on 127.0.0.1, 30 s is still generous.
GETMAIL_TIMEOUT = 30


class Getmail(Tool):
    name = "getmail6"

    def missing(self) -> str | None:
        return None if shutil.which("getmail") else "getmail6 is not installed"

    def command(self, job: Job) -> Command:
        state = job.run_dir / "getmail"
        state.mkdir()
        argv = ["getmail", "--getmaildir", str(state)]
        for mailbox in job.mailboxes:
            rc = f"""\
[retriever]
type = SimplePOP3SSLRetriever
server = {job.server.host}
port = {job.server.port}
username = {mailbox.user}
password = {mailbox.password}
ca_certs = {job.server.ca_file}
timeout = {GETMAIL_TIMEOUT}

[destination]
type = Maildir
path = {job.maildir(mailbox)}/

[options]
delete = false
read_all = true
verbose = 0
"""
            path = _write_private(job.run_dir / f"getmailrc-{mailbox.account}", rc)
            argv += ["--rcfile", str(path)]
        env = base_env() | {"HOME": str(state)}
        uid = gid = None
        if os.geteuid() == 0:
            # getmail6 refuses to deliver as root.
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            uid, gid = user.pw_uid, user.pw_gid
            for path in [job.run_dir, *job.run_dir.rglob("*")]:
                os.chown(path, uid, gid)
        return Command(argv, job.run_dir, env, uid, gid)


class Floor(Tool):
    name = "floor"

    def command(self, job: Job) -> Command:
        argv = [
            sys.executable,
            str(REPO / "bench" / "floor.py"),
            "--host",
            job.server.host,
            "--port",
            str(job.server.port),
            "--ca-file",
            str(job.server.ca_file),
        ]
        for mailbox in job.mailboxes:
            argv += ["--user", mailbox.user, "--password-file", str(mailbox.password_file)]
        return Command(argv, job.run_dir, base_env())

    def prepare(self, job: Job) -> Command:
        # The floor writes nothing.
        return self.command(job)


TOOLS: dict[str, Tool] = {
    tool.name: tool for tool in (Gpopd(), Mpop(), Fetchmail(), Getmail(), Floor())
}
CLIENTS = ("gpopd", "mpop", "fetchmail", "getmail6")
