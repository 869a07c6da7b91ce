"""Secret sources: reading them, refusing them, and never showing their values."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import gpopd.secrets
from gpopd.config import load_config
from gpopd.errors import ConfigError
from gpopd.secrets import SecretSource

SECRET = "Tr0ub4dor-and-3"

# Line 5 is the password line, column 5 its key.
TEMPLATE = """\
accounts:
  alice:
    host: pop.gmail.com
    username: alice@gmail.com
    password: {password}
    delivery:
      type: maildir
      path: /srv/mail/alice
"""


def write(tmp_path: Path, password: str, mode: int = 0o600, extra: str = "") -> Path:
    path = tmp_path / "gpopd.yaml"
    path.write_text(TEMPLATE.format(password=password) + extra)
    path.chmod(mode)
    return path


def password_of(path: Path, environ: dict[str, str] | None = None) -> str:
    account = load_config(path, environ=environ or {}).accounts["alice"]
    assert account.password is not None
    return account.password.secret.get_secret_value()


def problems(path: Path, environ: dict[str, str] | None = None, **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {}, **kwargs)
    return caught.value.problems


def python_command(code: str) -> str:
    return "{command: [%s, -c, %r]}" % (sys.executable, code)  # noqa: UP031 - YAML braces


def test_file_secret_strips_one_line_end(tmp_path: Path) -> None:
    """A password file's single trailing CRLF or LF is removed, nothing else."""
    secret_file = tmp_path / "pw"
    secret_file.write_bytes(f" {SECRET}\r\n".encode())
    path = write(tmp_path, f"{{file: {secret_file}}}")
    assert password_of(path) == f" {SECRET}"


def test_file_secret_with_an_inner_line_break_is_refused(tmp_path: Path) -> None:
    """A second line in a password file would break the POP3 command, so it is refused."""
    secret_file = tmp_path / "pw"
    secret_file.write_text(f"{SECRET}\n\n")
    path = write(tmp_path, f"{{file: {secret_file}}}")
    assert problems(path) == [
        f"{path}:5:5: accounts.alice.password: secret file {secret_file} "
        "contains a line break or a NUL character"
    ]


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_password_file(tmp_path: Path, kind: str) -> None:
    """A missing, non-regular or empty password file is reported at the password key."""
    secret_file = tmp_path / "pw"
    if kind == "directory":
        secret_file.mkdir()
    elif kind == "empty":
        secret_file.write_text("\n")
    path = write(tmp_path, f"{{file: {secret_file}}}")
    reason = {
        "missing": f"cannot read secret file {secret_file}: No such file or directory",
        "directory": f"cannot read secret file {secret_file}: not a regular file",
        "empty": f"secret file {secret_file} is empty",
    }[kind]
    assert problems(path) == [f"{path}:5:5: accounts.alice.password: {reason}"]


def test_env_secret(tmp_path: Path) -> None:
    """An {env: VAR} secret comes from the environ mapping given to load_config."""
    path = write(tmp_path, "{env: ALICE_PW}")
    assert password_of(path, {"ALICE_PW": SECRET}) == SECRET
    assert problems(path) == [
        f"{path}:5:5: accounts.alice.password: environment variable ALICE_PW is not set"
    ]


def test_command_secret_takes_the_first_line(tmp_path: Path) -> None:
    """A command secret is the first line of its output, run without a shell."""
    path = write(tmp_path, python_command(f"print('{SECRET}'); print('second line')"))
    assert password_of(path) == SECRET


def test_command_secret_runs_with_stdin_closed(tmp_path: Path) -> None:
    """A command that reads stdin gets end-of-file at once instead of hanging."""
    code = "import sys; data = sys.stdin.read(); print('got' + repr(data))"
    path = write(tmp_path, python_command(code))
    assert password_of(path) == "got''"


def test_command_secret_gets_the_given_environment(tmp_path: Path) -> None:
    """The command sees the environ mapping passed to load_config."""
    path = write(tmp_path, python_command("import os; print(os.environ['VAULT_TOKEN'])"))
    assert password_of(path, {"VAULT_TOKEN": "t-42"}) == "t-42"


def test_command_secret_failure_names_the_key_not_the_output(tmp_path: Path) -> None:
    """A command exiting non-zero is an error naming the key, without its output."""
    code = f"import sys; print('{SECRET}'); sys.stderr.write('{SECRET}'); sys.exit(3)"
    path = write(tmp_path, python_command(code))
    assert problems(path) == [
        f"{path}:5:5: accounts.alice.password: command {sys.executable!r} exited with status 3"
    ]


def test_command_secret_not_found(tmp_path: Path) -> None:
    """A command that does not exist is an error at the password key."""
    path = write(tmp_path, "{command: [/nonexistent/pass, show]}")
    assert problems(path) == [
        f"{path}:5:5: accounts.alice.password: "
        "cannot run command '/nonexistent/pass': No such file or directory"
    ]


def test_command_secret_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that runs past the time limit is killed and reported."""
    monkeypatch.setattr(gpopd.secrets, "SECRET_COMMAND_TIMEOUT", 0.5)
    path = write(tmp_path, python_command("import time; time.sleep(30)"))
    started = time.monotonic()
    assert problems(path) == [
        f"{path}:5:5: accounts.alice.password: "
        f"command {sys.executable!r} did not finish within 0.5s"
    ]
    assert time.monotonic() - started < 10


def test_credential_secret(tmp_path: Path) -> None:
    """A {credential: NAME} secret is read from $CREDENTIALS_DIRECTORY."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "alice-pw").write_text(SECRET + "\n")
    path = write(tmp_path, "{credential: alice-pw}")
    assert password_of(path, {"CREDENTIALS_DIRECTORY": str(creds)}) == SECRET


def test_credential_secret_failures(tmp_path: Path) -> None:
    """A missing $CREDENTIALS_DIRECTORY or credential file is an error at the key."""
    path = write(tmp_path, "{credential: alice-pw}")
    (problem,) = problems(path)
    assert problem.startswith(
        f"{path}:5:5: accounts.alice.password: credential 'alice-pw': "
        "$CREDENTIALS_DIRECTORY is not set"
    )
    assert problems(path, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == [
        f"{path}:5:5: accounts.alice.password: cannot read credential "
        f"{tmp_path / 'alice-pw'}: No such file or directory"
    ]


def test_credential_name_cannot_be_a_path(tmp_path: Path) -> None:
    """A credential name with a slash is refused, so it cannot leave the directory."""
    path = write(tmp_path, "{credential: ../etc/shadow}")
    (problem,) = problems(path, resolve_secrets=False)
    assert problem.startswith(f"{path}:5:28: accounts.alice.password.credential: must be a")


def test_inline_secret_in_a_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """An inline password in a 0644 file is refused with the fix in the message."""
    path = write(tmp_path, f'"{SECRET}"', mode=0o644)
    assert problems(path) == [
        f"{path}:5:15: accounts.alice.password: inline secret in a file readable by others; "
        f"chmod 600 {path} or use {{file: ...}}"
    ]


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_inline_secret_refused_when_group_or_others_can_read(tmp_path: Path, mode: int) -> None:
    """Read permission for either the group or others is enough to refuse an inline secret."""
    path = write(tmp_path, SECRET, mode=mode)
    (problem,) = problems(path)
    assert "inline secret in a file readable by others" in problem


def test_inline_secret_in_a_private_file_is_accepted(tmp_path: Path) -> None:
    """An inline password in a 0600 file is accepted."""
    path = write(tmp_path, SECRET, mode=0o600)
    assert password_of(path) == SECRET


def test_unquoted_numeric_password_is_refused(tmp_path: Path) -> None:
    """An unquoted password that YAML reads as a number is refused, not mangled."""
    path = write(tmp_path, "0123")
    assert problems(path) == [
        f"{path}:5:15: accounts.alice.password: must be a quoted string or a mapping with "
        "exactly one key: file, env, command or credential"
    ]
    assert password_of(write(tmp_path, '"0123"')) == "0123"


def test_secret_source_needs_exactly_one_key(tmp_path: Path) -> None:
    """A secret mapping with two sources (or an unknown key) is refused."""
    path = write(tmp_path, "{file: /x, env: X}")
    assert problems(path, resolve_secrets=False) == [
        f"{path}:5:5: accounts.alice.password: must be a quoted string or a mapping with "
        "exactly one key: file, env, command or credential"
    ]
    path = write(tmp_path, "{vault: x}")
    assert problems(path, resolve_secrets=False)[0] == (
        f"{path}:5:16: accounts.alice.password.vault: Extra inputs are not permitted"
    )


def test_resolve_secrets_false_checks_shape_only(tmp_path: Path) -> None:
    """Without resolving, a missing file is fine but the value is not available."""
    path = write(tmp_path, "{file: /nonexistent/pw}")
    account = load_config(path, environ={}, resolve_secrets=False).accounts["alice"]
    assert account.password is not None
    assert account.password.kind == "file"
    assert not account.password.resolved
    with pytest.raises(RuntimeError, match="not resolved"):
        _ = account.password.secret


def test_secret_source_resolve_reads_again(tmp_path: Path) -> None:
    """SecretSource.resolve reads the source anew, for callers that refresh secrets."""
    secret_file = tmp_path / "pw"
    secret_file.write_text("one\n")
    source = SecretSource(file=secret_file)
    assert source.resolve({}).get_secret_value() == "one"
    secret_file.write_text("two\n")
    assert source.resolve({}).get_secret_value() == "two"


def _secret_failure(tmp_path: Path, kind: str) -> tuple[str, dict[str, str], int]:
    """A password config for ``kind`` whose source fails while the secret is around."""
    if kind == "file":
        secret_file = tmp_path / "pw"
        secret_file.write_text(f"{SECRET}\nsecond line {SECRET}\n")
        return f"{{file: {secret_file}}}", {}, 0o600
    if kind == "env":
        return "{env: PW}", {"PW": f"{SECRET}\n{SECRET}"}, 0o600
    if kind == "command":
        (tmp_path / "vault").write_text(SECRET)
        code = "import sys; s = open('vault').read(); print(s); sys.stderr.write(s); sys.exit(1)"
        return python_command(code.replace("vault", str(tmp_path / "vault"))), {}, 0o600
    if kind == "credential":
        (tmp_path / "pw").write_text(f"{SECRET}\r{SECRET}")
        return "{credential: pw}", {"CREDENTIALS_DIRECTORY": str(tmp_path)}, 0o600
    return f'"{SECRET}"', {}, 0o644


def _secret_working(tmp_path: Path, kind: str) -> tuple[str, dict[str, str], int]:
    """A password config for ``kind`` whose source yields the secret."""
    if kind == "file":
        (tmp_path / "pw").write_text(SECRET)
        return f"{{file: {tmp_path / 'pw'}}}", {}, 0o600
    if kind == "env":
        return "{env: PW}", {"PW": SECRET}, 0o600
    if kind == "command":
        # The secret lives outside the argv, which is configuration and may be shown.
        (tmp_path / "vault").write_text(SECRET)
        return python_command(f"print(open({str(tmp_path / 'vault')!r}).read())"), {}, 0o600
    if kind == "credential":
        (tmp_path / "pw").write_text(SECRET)
        return "{credential: pw}", {"CREDENTIALS_DIRECTORY": str(tmp_path)}, 0o600
    return f'"{SECRET}"', {}, 0o600


@pytest.mark.parametrize("kind", ["file", "env", "command", "credential", "inline"])
def test_secret_never_appears_in_errors(tmp_path: Path, kind: str) -> None:
    """Neither a failing source nor an error elsewhere ever shows the secret value."""
    bad_port = "    port: not-a-port\n"
    password, environ, mode = _secret_failure(tmp_path, kind)
    path = write(tmp_path, password, mode=mode, extra="")
    path.write_text(path.read_text().replace("    username", bad_port + "    username"))
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert len(caught.value.problems) == 2  # the port and the secret
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)

    password, environ, mode = _secret_working(tmp_path, kind)
    path = write(tmp_path, password, mode=mode)
    path.write_text(path.read_text().replace("    username", bad_port + "    username"))
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    assert len(caught.value.problems) == 1
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("kind", ["file", "env", "command", "credential", "inline"])
def test_secret_never_appears_in_repr(tmp_path: Path, kind: str) -> None:
    """The loaded settings print without the secret, while holding it."""
    password, environ, mode = _secret_working(tmp_path, kind)
    settings = load_config(write(tmp_path, password, mode=mode), environ=environ)
    account = settings.accounts["alice"]
    assert account.password is not None
    assert account.password.secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in settings.model_dump_json()
