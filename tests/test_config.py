"""Loading the configuration: values, defaults and located error messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from gpopd.config import (
    DEFAULT_CONFIG_PATH,
    Settings,
    config_path,
    load_config,
    parse_duration,
    parse_size,
)
from gpopd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gpopd.example.yaml"
ENV = {"ALICE_PW": "app-password-1"}

# Line numbers matter in these tests: line 2 is "  alice:", line 3 "host:".
BASE = """\
accounts:
  alice:
    host: pop.gmail.com
    username: alice@gmail.com
    password: {env: ALICE_PW}
    delivery:
      type: maildir
      path: /srv/mail/alice
"""


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "gpopd.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def problems(path: Path, environ: dict[str, str] | None = None, **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV if environ is None else environ, **kwargs)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def with_line(after: str, line: str, text: str = BASE) -> str:
    """Insert ``line`` right after the first line equal to ``after``."""
    lines = text.splitlines(keepends=True)
    index = next(i for i, old in enumerate(lines) if old.rstrip("\n") == after)
    lines.insert(index + 1, line + "\n")
    return "".join(lines)


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    """A config with only the required keys loads with the documented defaults."""
    settings = load_config(write(tmp_path, BASE), environ=ENV)
    assert isinstance(settings, Settings)
    assert settings.state_dir == Path("/var/lib/gpopd")
    assert (settings.max_sessions, settings.max_sessions_per_host) == (32, 8)
    alice = settings.accounts["alice"]
    assert alice.name == "alice"
    assert (alice.port, alice.effective_port, alice.tls) == (None, 995, "implicit")
    assert (alice.auth, alice.keep, alice.allow_plaintext) == ("auto", True, False)
    assert alice.max_message_size == 50 * 1024 * 1024
    assert (alice.poll_interval, alice.connect_timeout, alice.timeout) == (600.0, 30.0, 120.0)
    assert alice.delete_after is None
    assert alice.delivery.path == Path("/srv/mail/alice")
    assert alice.password is not None
    assert alice.password.secret.get_secret_value() == "app-password-1"


def test_effective_port_follows_tls(tmp_path: Path) -> None:
    """Without a port, implicit TLS means 995 and STLS means 110."""
    text = with_line("    host: pop.gmail.com", "    tls: starttls")
    account = load_config(write(tmp_path, text), environ=ENV).accounts["alice"]
    assert account.effective_port == 110


def test_settings_are_frozen(tmp_path: Path) -> None:
    """The loaded settings cannot be changed by accident."""
    settings = load_config(write(tmp_path, BASE), environ=ENV)
    with pytest.raises(ValueError, match="frozen"):
        settings.accounts["alice"].port = 1  # type: ignore[misc]


def test_tilde_is_expanded_in_paths(tmp_path: Path) -> None:
    """A path starting with ~ is expanded to the home directory."""
    text = BASE.replace("path: /srv/mail/alice", "path: ~/Maildir")
    account = load_config(write(tmp_path, text), environ=ENV).accounts["alice"]
    assert account.delivery.path == Path.home() / "Maildir"


def test_wrong_type_is_located_at_the_value(tmp_path: Path) -> None:
    """A value of the wrong type is reported at its own line and column."""
    path = write(tmp_path, with_line("    host: pop.gmail.com", "    port: abc"))
    assert problems(path) == [
        f"{path}:4:11: accounts.alice.port: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    """An unknown top-level key is an error at that key."""
    path = write(tmp_path, "stat_dir: /tmp\n" + BASE)
    assert problems(path) == [f"{path}:1:1: stat_dir: Extra inputs are not permitted"]


def test_unknown_key_in_account(tmp_path: Path) -> None:
    """An unknown key inside an account is an error at that key."""
    path = write(tmp_path, with_line("    host: pop.gmail.com", "    hots: x"))
    assert problems(path) == [f"{path}:4:5: accounts.alice.hots: Extra inputs are not permitted"]


def test_unknown_key_in_delivery(tmp_path: Path) -> None:
    """An unknown key inside a delivery is an error at that key, without the union tag."""
    path = write(tmp_path, with_line("      type: maildir", "      folder: x"))
    assert problems(path) == [
        f"{path}:8:7: accounts.alice.delivery.folder: Extra inputs are not permitted"
    ]


def test_missing_required_key_points_at_the_parent(tmp_path: Path) -> None:
    """A missing required key is reported at the line of the mapping that lacks it."""
    path = write(tmp_path, BASE.replace("    host: pop.gmail.com\n", ""))
    assert problems(path) == [f"{path}:2:3: accounts.alice.host: Field required"]


def test_missing_accounts_section(tmp_path: Path) -> None:
    """A file without accounts says so at the top of the file."""
    path = write(tmp_path, "state_dir: /tmp/x\n")
    assert problems(path) == [f"{path}:1:1: accounts: Field required"]


def test_empty_accounts_section(tmp_path: Path) -> None:
    """An accounts section with no account is refused."""
    path = write(tmp_path, "accounts:\n")
    assert problems(path) == [f"{path}:1:1: accounts: at least one account is needed"]


def test_duplicate_key(tmp_path: Path) -> None:
    """A key given twice is reported at the second one, naming the first line."""
    path = write(tmp_path, with_line("    username: alice@gmail.com", "    host: other"))
    assert problems(path) == [f"{path}:5:5: accounts.alice.host: duplicate key (first at line 3)"]


def test_yaml_syntax_error(tmp_path: Path) -> None:
    """A YAML syntax error gives the line and column where parsing failed."""
    path = write(tmp_path, BASE.replace("host: pop.gmail.com", "host: [pop.gmail.com"))
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:4:13: YAML syntax error: ")
    assert "while parsing a flow sequence at line 3" in problem


def test_multiple_documents_are_refused(tmp_path: Path) -> None:
    """A second YAML document in the file is a syntax error, not silently ignored."""
    path = write(tmp_path, BASE + "---\nstate_dir: /x\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:9:1: YAML syntax error: expected a single document")


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is an error naming it, never a silent default."""
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: cannot read: No such file or directory"]


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    """A directory given as the config file is refused."""
    assert problems(tmp_path) == [f"{tmp_path}: cannot read: not a regular file"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are located."""
    path = tmp_path / "gpopd.yaml"
    path.write_bytes(b"state_dir: /tmp\nlog_file: /caf\xe9\n")
    assert problems(path) == [f"{path}:2:15: not valid UTF-8 text"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    """A file whose top level is a list is refused with a plain explanation."""
    path = write(tmp_path, "- alice\n- bob\n")
    assert problems(path) == [
        f"{path}:1:1: the file must be a mapping of settings (key: value lines)"
    ]


def test_tls_none_needs_allow_plaintext(tmp_path: Path) -> None:
    """tls: none without allow_plaintext is refused at the tls line."""
    path = write(tmp_path, with_line("    host: pop.gmail.com", "    tls: none"))
    assert problems(path) == [
        f"{path}:4:10: accounts.alice.tls: tls: none sends the password unencrypted; "
        "set allow_plaintext: true to allow it"
    ]
    allowed = with_line("    tls: none", "    allow_plaintext: true", path.read_text())
    account = load_config(write(tmp_path, allowed), environ=ENV).accounts["alice"]
    assert (account.tls, account.effective_port) == ("none", 110)


def test_password_auth_needs_a_password(tmp_path: Path) -> None:
    """auth: user without a password is refused, pointing at the account."""
    text = BASE.replace("    password: {env: ALICE_PW}\n", "    auth: user\n")
    path = write(tmp_path, text)
    assert problems(path) == [f"{path}:2:3: accounts.alice.password: auth: user needs a password"]


def test_delete_after_needs_keep(tmp_path: Path) -> None:
    """delete_after together with keep: false is refused at delete_after."""
    text = with_line("    host: pop.gmail.com", "    keep: false\n    delete_after: 30d")
    path = write(tmp_path, text)
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:5:19: accounts.alice.delete_after: delete_after needs")


def test_bad_duration(tmp_path: Path) -> None:
    """A duration that cannot be parsed is located and explained."""
    path = write(tmp_path, with_line("    host: pop.gmail.com", "    poll_interval: 10 minutes"))
    assert problems(path) == [
        f"{path}:4:20: accounts.alice.poll_interval: "
        "must be a duration such as 90s, 10m, 1h30m, 2d or a number of seconds"
    ]


def test_duration_below_minimum(tmp_path: Path) -> None:
    """A poll interval under one second is refused."""
    path = write(tmp_path, with_line("    host: pop.gmail.com", "    poll_interval: 0.5"))
    assert problems(path) == [f"{path}:4:20: accounts.alice.poll_interval: must be at least 1s"]


def test_bad_size(tmp_path: Path) -> None:
    """A size that cannot be parsed is located and explained."""
    path = write(tmp_path, with_line("    host: pop.gmail.com", "    max_message_size: 50 megs"))
    assert problems(path) == [
        f"{path}:4:23: accounts.alice.max_message_size: "
        "must be a size such as 512KB, 50MB, 1GB or bytes"
    ]


def test_bad_account_name(tmp_path: Path) -> None:
    """An account name outside the allowed characters is reported at the name."""
    path = write(tmp_path, BASE.replace("  alice:", "  alice smith:"))
    assert problems(path) == [
        f'{path}:2:3: accounts."alice smith": account names start with a letter or digit '
        "and contain only letters, digits and . _ @ - (at most 64 characters)"
    ]


def test_account_names_differing_in_case(tmp_path: Path) -> None:
    """Two accounts whose names differ only in case are refused."""
    second = BASE.split("\n", 1)[1].replace("  alice:", "  Alice:")
    path = write(tmp_path, BASE + second)
    assert problems(path) == [
        f"{path}:1:1: accounts: account names 'alice' and 'Alice' differ only in case"
    ]


def test_name_inside_account_is_refused(tmp_path: Path) -> None:
    """An account's name comes from its key, so a name key inside is an error."""
    path = write(tmp_path, with_line("  alice:", "    name: bob"))
    assert problems(path) == [
        f"{path}:3:11: accounts.alice.name: is taken from the account's key under accounts; "
        "remove it"
    ]


def test_delivery_type_missing_or_unknown(tmp_path: Path) -> None:
    """The delivery type is required and must be a known one."""
    path = write(tmp_path, BASE.replace("      type: maildir\n", ""))
    assert problems(path) == [f"{path}:6:5: accounts.alice.delivery.type: Field required"]
    path = write(tmp_path, BASE.replace("type: maildir", "type: pigeon"))
    assert problems(path) == [
        f"{path}:7:13: accounts.alice.delivery.type: "
        "Input should be 'maildir', 'mbox', 'mda', 'smtp' or 'lmtp'"
    ]


def test_ca_file_must_be_readable(tmp_path: Path) -> None:
    """A ca_file that does not exist is refused at load time."""
    missing = tmp_path / "ca.pem"
    path = write(tmp_path, with_line("    host: pop.gmail.com", f"    ca_file: {missing}"))
    assert problems(path) == [
        f"{path}:4:14: accounts.alice.ca_file: cannot read {missing}: No such file or directory"
    ]
    missing.write_text("-----BEGIN CERTIFICATE-----\n")
    account = load_config(path, environ=ENV).accounts["alice"]
    assert account.ca_file == missing


def test_relative_path_is_refused(tmp_path: Path) -> None:
    """A relative path would depend on the working directory, so it is refused."""
    path = write(tmp_path, "state_dir: var/gpopd\n" + BASE)
    assert problems(path) == [f"{path}:1:12: state_dir: must be an absolute path (or start with ~)"]


def test_yaml_12_scalars(tmp_path: Path) -> None:
    """no stays text and 0123 is a decimal number, as YAML 1.2 says, even under %YAML 1.1."""
    text = BASE.replace("alice@gmail.com", "no").replace("    host:", "    port: 0995\n    host:")
    account = load_config(write(tmp_path, text), environ=ENV).accounts["alice"]
    assert (account.username, account.port) == ("no", 995)
    path = write(tmp_path, "%YAML 1.1\n---\n" + text)
    assert load_config(path, environ=ENV).accounts["alice"].username == "no"


def test_unsupported_tag(tmp_path: Path) -> None:
    """A YAML tag that would build anything but plain data is refused."""
    path = write(tmp_path, "log_file: !!python/name:os.system x\n" + BASE)
    assert problems(path) == [
        f"{path}:1:11: log_file: unsupported YAML tag !!python/name:os.system"
    ]


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    """Anchors and << merge keys work, and explicit keys win over merged ones."""
    text = BASE.replace("  alice:\n", "  alice: &base\n") + (
        "  bob:\n    <<: *base\n    username: bob@gmail.com\n"
    )
    settings = load_config(write(tmp_path, text), environ=ENV)
    assert settings.accounts["bob"].host == "pop.gmail.com"
    assert settings.accounts["bob"].username == "bob@gmail.com"
    assert settings.accounts["alice"].username == "alice@gmail.com"


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    """Aliases that expand exponentially are refused instead of exhausting memory."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for n in range(1, 8):
        lines.append(f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}: more than 100000 values")


def test_self_referencing_alias(tmp_path: Path) -> None:
    """An alias that contains itself is an error, not an endless recursion."""
    path = write(tmp_path, "log_file: &a [*a]\n" + BASE)
    assert f"{path}:1:11: log_file[0]: an alias refers to its own ancestor" in problems(path)


def test_several_errors_are_all_listed(tmp_path: Path) -> None:
    """Every problem in the file is listed, in file order, not just the first."""
    text = "max_sessions: 0\nfrob: 1\n" + BASE.replace("pop.gmail.com", "").replace(
        "    username", "    port: 70000\n    username"
    )
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}:1:15: max_sessions: Input should be greater than or equal to 1",
        f"{path}:2:1: frob: Extra inputs are not permitted",
        f"{path}:5:5: accounts.alice.host: Input should be a valid string",
        f"{path}:6:11: accounts.alice.port: Input should be less than or equal to 65535",
    ]


def test_example_config_loads() -> None:
    """The shipped example configuration is valid (secrets checked for shape only)."""
    settings = load_config(EXAMPLE, environ={}, resolve_secrets=False)
    assert set(settings.accounts) == {"personal", "office"}
    assert settings.accounts["personal"].host == "pop.gmail.com"
    assert settings.accounts["office"].effective_port == 110
    assert settings.accounts["office"].poll_interval == 300.0


def test_example_commented_deliveries_are_valid() -> None:
    """Each commented-out delivery in the example is a valid delivery of its type."""
    text = EXAMPLE.read_text()
    blocks = re.findall(r"    # delivery:\n((?:    #   .*\n)+)", text)
    kinds = set()
    for block in blocks:
        body = "\n".join(line[8:] for line in block.splitlines())
        delivery = YAML(typ="safe", pure=True).load(body)
        account = {"host": "h", "username": "u", "password": "x", "delivery": delivery}
        kinds.add(Settings(accounts={"a": account}).accounts["a"].delivery.type)
    assert kinds == {"mbox", "mda", "smtp", "lmtp"}


def test_config_path_precedence() -> None:
    """--config wins over $GPOPD_CONFIG, which wins over the default."""
    env = {"GPOPD_CONFIG": "/srv/env.yaml"}
    assert config_path("/srv/cli.yaml", env) == Path("/srv/cli.yaml")
    assert config_path(None, env) == Path("/srv/env.yaml")
    assert config_path(None, {}) == DEFAULT_CONFIG_PATH
    assert config_path(None, {"GPOPD_CONFIG": ""}) == DEFAULT_CONFIG_PATH
    assert config_path("~/g.yaml", {}) == Path(os.path.expanduser("~/g.yaml"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("90s", 90.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1h 30m", 5400.0),
        ("0.5m", 30.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    """Durations accept seconds and unit-suffixed text, summing the parts."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "1m30", "-5s", True, None, "1e3s"])
def test_parse_duration_refuses(text: object) -> None:
    """Malformed durations are refused (plain "10" is fine, so it is replaced here)."""
    value = "10 parsecs" if text == "10" else text
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1000, 1000),
        ("512KB", 512 * 1024),
        ("50MB", 50 * 1024**2),
        ("1GB", 1024**3),
        ("1GiB", 1024**3),
        ("2k", 2048),
        ("10 MB", 10 * 1024**2),
        ("100", 100),
        ("100B", 100),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    """Sizes accept bytes and K/M/G suffixes meaning powers of 1024."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["50 megs", "MB", "-1", True, 0, "1iB", 1.5])
def test_parse_size_refuses(text: object) -> None:
    """Malformed or non-positive sizes are refused."""
    with pytest.raises(ValueError, match=r"size|byte"):
        parse_size(text)


def test_reused_anchor_takes_the_latest(tmp_path: Path) -> None:
    """A reused anchor name is legal YAML: an alias refers to the latest definition."""
    head = "state_dir: &p /srv/old\nlog_file: &p /srv/new\n"
    text = head + BASE.replace("path: /srv/mail/alice", "path: *p")
    settings = load_config(write(tmp_path, text), environ=ENV)
    assert settings.state_dir == Path("/srv/old")
    assert settings.accounts["alice"].delivery.path == Path("/srv/new")
