"""Gmail's rules as gpopd applies them: error hints, config defaults, batches."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from gpopd import pop3
from gpopd.config import load_config
from gpopd.daemon import report_for
from gpopd.errors import (
    AuthError,
    ConfigError,
    MailboxBusyError,
    RateLimitedError,
    ServerError,
)
from gpopd.fetch import PollResult
from gpopd.gmail import hint_for, is_recent_mode, own_address
from gpopd.scheduler import Outcome
from gpopd.session import bearer_status, error_for

GMAIL_ERRORS = [
    (
        "[AUTH] Username and password not accepted.",
        AuthError,
        "app password",
    ),
    (
        "[AUTH] Web login required: https://support.google.com/mail/answer/78754",
        AuthError,
        "app password",
    ),
    (
        "[AUTH] Application-specific password required: "
        "https://support.google.com/accounts/answer/185833",
        AuthError,
        "apppasswords",
    ),
    (
        "[SYS/PERM] Your account is not enabled for POP access. Please visit your "
        "Gmail settings page and enable your account for POP access.",
        ServerError,
        "enable POP in Gmail",
    ),
    (
        "[SYS/TEMP] Account exceeded POP command or bandwidth limits",
        RateLimitedError,
        "backing off for an hour",
    ),
    (
        "We are still working on enabling pop for your account so windowed mode is "
        "not available, please try again later.",
        MailboxBusyError,
        "still enabling POP",
    ),
]


def _err(line: str) -> pop3.Err:
    """Parse ``-ERR line`` the way the engine does, response code included."""
    conn = pop3.Connection()
    conn.receive_data(f"-ERR {line}\r\n".encode())
    event = conn.next_event()
    assert isinstance(event, pop3.Err)
    return event


@pytest.mark.parametrize(("text", "kind", "hint"), GMAIL_ERRORS)
def test_each_gmail_error_text_maps_to_its_hint(
    text: str, kind: type[ServerError], hint: str
) -> None:
    """Each of Gmail's known -ERR texts becomes its error class with a hint naming the fix."""
    error = error_for(pop3.Pass("x"), _err(text), during_login=True)
    assert type(error) is kind
    assert error.hint is not None
    assert hint in error.hint
    assert hint in str(error)
    assert "PASS failed" in str(error)


def test_unknown_error_text_gets_no_hint() -> None:
    """A -ERR text gpopd does not know keeps the plain mapping, without a hint."""
    error = error_for(pop3.Pass("x"), _err("[AUTH] nope"), during_login=True)
    assert type(error) is AuthError
    assert error.hint is None
    assert hint_for("nope") is None


def test_rate_limit_backs_off_at_least_an_hour() -> None:
    """ "Exceeded POP command or bandwidth limits" delays the next poll by at least an hour."""
    error = error_for(None, _err("[SYS/TEMP] Account exceeded POP command or bandwidth limits"))
    result = PollResult("alice", outcome="MailboxBusyError", error=error, login_delay=300.0)
    report = report_for(result)
    assert report.outcome is Outcome.BUSY
    assert report.login_delay is not None
    assert report.login_delay >= 3600


def test_app_password_error_needs_a_person() -> None:
    """An app-password error is not retried quickly: it needs the user."""
    error = error_for(
        pop3.Pass("x"), _err("[AUTH] Application-specific password required"), during_login=True
    )
    report = report_for(PollResult("alice", outcome="AuthError", error=error))
    assert report.outcome is Outcome.NEEDS_PERSON


@pytest.mark.parametrize(
    ("challenge", "status"),
    [
        (
            base64.b64encode(
                b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'
            ).decode(),
            "400",
        ),
        (base64.b64encode(b'{"status":401}').decode(), "401"),
        ("not base64 !", None),
        (base64.b64encode(b"[1,2]").decode(), None),
    ],
)
def test_bearer_status_reads_the_json_challenge(challenge: str, status: str | None) -> None:
    """The status of an OAuth2 error challenge is read when present, never guessed."""
    assert bearer_status(challenge) == status


def test_recent_prefix_and_own_address() -> None:
    """`recent:` marks recent mode and is not part of the account's own address."""
    assert is_recent_mode("recent:Alice@Gmail.com")
    assert not is_recent_mode("alice@gmail.com")
    assert own_address("recent:Alice@Gmail.com") == "alice@gmail.com"


GMAIL_CONFIG = """\
accounts:
  alice:
    host: pop.gmail.com
    username: alice@gmail.com
    password: {env: ALICE_PW}
    poll_interval: 1m
    delivery:
      type: maildir
      path: /srv/mail/alice
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpopd.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_gmail_refuses_polls_under_five_minutes(tmp_path: Path) -> None:
    """A Gmail account polled every minute is a config error naming poll_interval."""
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, GMAIL_CONFIG), environ={"ALICE_PW": "pw"})
    (problem,) = caught.value.problems
    assert "gpopd.yaml:6:" in problem
    assert "accounts.alice.poll_interval" in problem
    assert "allow_fast_polling" in problem


def test_allow_fast_polling_lets_the_user_insist(tmp_path: Path) -> None:
    """allow_fast_polling: true accepts a short interval for Gmail."""
    text = GMAIL_CONFIG.replace(
        "    poll_interval: 1m\n", "    poll_interval: 1m\n    allow_fast_polling: true\n"
    )
    account = load_config(_write(tmp_path, text), environ={"ALICE_PW": "pw"}).accounts["alice"]
    assert account.poll_interval == 60.0
    assert account.effective_port == 995
    assert account.tls == "implicit"


def test_batch_sessions_default_to_gmail_hosts_only(tmp_path: Path) -> None:
    """Gmail gets follow-up batch sessions by default; another host only when it asks."""
    text = GMAIL_CONFIG.replace("poll_interval: 1m", "poll_interval: 10m")
    gmail_account = load_config(_write(tmp_path, text), environ={"ALICE_PW": "pw"})
    assert gmail_account.accounts["alice"].batch_threshold == 200
    other = text.replace("pop.gmail.com", "pop.example.org")
    asked = other.replace("poll_interval: 10m", "poll_interval: 10m\n    gmail_batch_threshold: 50")
    assert "gmail_batch_threshold: 50" in asked
    account = load_config(_write(tmp_path, asked), environ={"ALICE_PW": "pw"}).accounts["alice"]
    assert account.batch_threshold == 50


def test_other_hosts_may_poll_fast(tmp_path: Path) -> None:
    """The five-minute floor is Gmail's, not every server's."""
    text = GMAIL_CONFIG.replace("pop.gmail.com", "pop.example.org")
    account = load_config(_write(tmp_path, text), environ={"ALICE_PW": "pw"}).accounts["alice"]
    assert account.poll_interval == 60.0
    assert account.batch_threshold is None  # only Gmail lists in batches
    assert account.max_sessions_per_poll == 100
