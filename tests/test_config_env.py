"""GPOPD_* environment overrides and the defaults section."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpopd.config import load_config
from gpopd.errors import ConfigError

BASE = """\
defaults:
  poll_interval: 5m
  max_message_size: 10MB
  delivery: {type: maildir, path: /srv/mail/shared}
accounts:
  Alice:
    host: pop.gmail.com
    username: alice@gmail.com
    password: {env: ALICE_PW}
    delivery:
      type: maildir
      path: /srv/mail/alice
  bob:
    host: pop.example.org
    username: bob
    password: {env: BOB_PW}
    poll_interval: 1h
"""
SECRETS = {"ALICE_PW": "pw-a", "BOB_PW": "pw-b"}


def write(tmp_path: Path, text: str = BASE, mode: int = 0o600) -> Path:
    path = tmp_path / "gpopd.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


def problems(path: Path, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    return caught.value.problems


def test_defaults_are_merged_and_overridden_per_account(tmp_path: Path) -> None:
    """Accounts inherit defaults they do not set and keep the values they set."""
    settings = load_config(write(tmp_path), environ=SECRETS)
    alice, bob = settings.accounts["Alice"], settings.accounts["bob"]
    assert alice.poll_interval == 300.0
    assert bob.poll_interval == 3600.0
    assert alice.max_message_size == bob.max_message_size == 10 * 1024 * 1024
    assert alice.delivery.path == Path("/srv/mail/alice")
    assert bob.delivery.path == Path("/srv/mail/shared")
    assert alice.timeout == 120.0  # neither set: the built-in default
    assert settings.defaults.poll_interval == 300.0


def test_null_in_an_account_undoes_an_inherited_default(tmp_path: Path) -> None:
    """An account can set an optional key to null to drop the default's value."""
    text = BASE.replace("  poll_interval: 5m\n", "  poll_interval: 5m\n  delete_after: 30d\n")
    text = text.replace("    poll_interval: 1h\n", "    keep: false\n    delete_after: null\n")
    settings = load_config(write(tmp_path, text), environ=SECRETS)
    assert settings.accounts["Alice"].delete_after == 30 * 86400.0
    assert settings.accounts["bob"].delete_after is None


def test_bad_default_is_reported_once_at_defaults(tmp_path: Path) -> None:
    """A bad value in defaults is reported at its own line, not again per account."""
    path = write(tmp_path, BASE.replace("max_message_size: 10MB", "max_message_size: lots"))
    assert problems(path, SECRETS) == [
        f"{path}:3:21: defaults.max_message_size: must be a size such as 512KB, 50MB, 1GB or bytes"
    ]


def test_inherited_default_that_conflicts_points_at_defaults(tmp_path: Path) -> None:
    """A default that is wrong only for one account is reported for that account, at defaults."""
    text = BASE.replace("  poll_interval: 5m\n", "  poll_interval: 5m\n  tls: none\n")
    text = text.replace("    poll_interval: 1h\n", "    allow_plaintext: true\n")
    path = write(tmp_path, text)
    assert problems(path, SECRETS) == [
        f"{path}:3:8: accounts.Alice.tls: tls: none sends the password unencrypted; "
        "set allow_plaintext: true to allow it"
    ]


@pytest.mark.parametrize("key", ["host: x", "username: x", "password: {env: X}"])
def test_per_account_keys_are_not_defaults(tmp_path: Path, key: str) -> None:
    """host, username and password cannot be given in defaults."""
    path = write(tmp_path, BASE.replace("  poll_interval: 5m\n", f"  poll_interval: 5m\n  {key}\n"))
    name = key.split(":", maxsplit=1)[0]
    assert problems(path, SECRETS) == [
        f"{path}:3:3: defaults.{name}: is set per account and cannot be a default"
    ]


def test_env_override_deep_merges(tmp_path: Path) -> None:
    """An env variable replaces one nested value and keeps every other one."""
    environ = {**SECRETS, "GPOPD_ACCOUNTS__ALICE__PORT": "1995", "GPOPD_STATE_DIR": "/srv/st"}
    settings = load_config(write(tmp_path), environ=environ)
    alice = settings.accounts["Alice"]
    assert alice.port == 1995
    assert alice.host == "pop.gmail.com"
    assert alice.delivery.path == Path("/srv/mail/alice")
    assert alice.poll_interval == 300.0
    assert settings.accounts["bob"].port is None
    assert settings.state_dir == Path("/srv/st")


def test_env_override_of_nested_and_json_values(tmp_path: Path) -> None:
    """Variables reach into delivery and secrets, and mappings can be given as JSON."""
    environ = {
        **SECRETS,
        "GPOPD_ACCOUNTS__BOB__DELIVERY__PATH": "/srv/bob",
        "GPOPD_ACCOUNTS__ALICE__PASSWORD": '{"env": "OTHER_PW"}',
        "OTHER_PW": "pw-other",
        "GPOPD_DEFAULTS__TIMEOUT": "45s",
        "gpopd_max_sessions": "4",
    }
    settings = load_config(write(tmp_path), environ=environ)
    bob, alice = settings.accounts["bob"], settings.accounts["Alice"]
    assert bob.delivery.path == Path("/srv/bob")
    assert bob.delivery.type == "maildir"
    assert alice.password is not None
    assert alice.password.secret.get_secret_value() == "pw-other"
    assert alice.timeout == bob.timeout == 45.0
    assert settings.max_sessions == 4


def test_env_values_stay_text(tmp_path: Path) -> None:
    """A numeric-looking variable stays text where text is wanted: 0123 keeps its zero."""
    environ = {
        **SECRETS,
        "GPOPD_ACCOUNTS__BOB__PASSWORD": "0123",
        "GPOPD_ACCOUNTS__BOB__USERNAME": "007",
    }
    bob = load_config(write(tmp_path), environ=environ).accounts["bob"]
    assert bob.password is not None
    assert bob.password.secret.get_secret_value() == "0123"
    assert bob.username == "007"


def test_env_inline_secret_ignores_file_mode(tmp_path: Path) -> None:
    """An inline secret from the environment is accepted even if the file is world-readable."""
    environ = {**SECRETS, "GPOPD_ACCOUNTS__BOB__PASSWORD": "from-env"}
    bob = load_config(write(tmp_path, mode=0o644), environ=environ).accounts["bob"]
    assert bob.password is not None
    assert bob.password.secret.get_secret_value() == "from-env"


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    """A bad value from the environment is reported with the variable's name."""
    path = write(tmp_path)
    environ = {**SECRETS, "GPOPD_ACCOUNTS__ALICE__PORT": "many"}
    assert problems(path, environ) == [
        "environment variable GPOPD_ACCOUNTS__ALICE__PORT: accounts.Alice.port: "
        "Input should be a valid integer, unable to parse string as an integer"
    ]


def test_env_unknown_key_and_bad_json(tmp_path: Path) -> None:
    """An unknown key or unparsable JSON from the environment names the variable."""
    path = write(tmp_path)
    environ = {
        **SECRETS,
        "GPOPD_ACCOUNTS__BOB__HOTS": "x",
        "GPOPD_ACCOUNTS__BOB__DELIVERY": "{not json",
    }
    assert problems(path, environ) == [
        # delivery is a union of models: pydantic-settings keeps a value that is
        # not JSON as text, and validation then names the variable and the key.
        "environment variable GPOPD_ACCOUNTS__BOB__DELIVERY: accounts.bob.delivery: "
        "Input should be a valid dictionary or object to extract fields from",
        "environment variable GPOPD_ACCOUNTS__BOB__HOTS: accounts.bob.hots: "
        "Extra inputs are not permitted",
    ]


def test_env_creating_a_new_account_reports_missing_keys(tmp_path: Path) -> None:
    """A variable naming an account that the file lacks creates it, and its gaps are named."""
    path = write(tmp_path)
    environ = {**SECRETS, "GPOPD_ACCOUNTS__CAROL__HOST": "pop.example.net"}
    assert problems(path, environ) == [
        "environment variable GPOPD_ACCOUNTS__CAROL__HOST: accounts.carol.username: Field required",
    ]


def test_unrelated_gpopd_variables_are_ignored(tmp_path: Path) -> None:
    """GPOPD_CONFIG and other non-setting variables do not disturb loading."""
    environ = {**SECRETS, "GPOPD_CONFIG": "/elsewhere.yaml", "GPOPD_LOG_LEVEL": "debug"}
    settings = load_config(write(tmp_path), environ=environ)
    assert set(settings.accounts) == {"Alice", "bob"}


def test_env_override_wins_over_file_error(tmp_path: Path) -> None:
    """A value replaced from the environment is validated as replaced, not as written."""
    path = write(tmp_path, BASE.replace("    poll_interval: 1h\n", "    port: bad\n"))
    environ = {**SECRETS, "GPOPD_ACCOUNTS__BOB__PORT": "2110"}
    assert load_config(path, environ=environ).accounts["bob"].port == 2110


def test_account_delivery_is_completed_from_defaults(tmp_path: Path) -> None:
    """An account's delivery without a type takes the rest from the default delivery."""
    text = BASE.replace("    poll_interval: 1h\n", "    delivery: {path: /srv/mail/bob}\n")
    bob = load_config(write(tmp_path, text), environ=SECRETS).accounts["bob"]
    assert (bob.delivery.type, bob.delivery.path) == ("maildir", Path("/srv/mail/bob"))


def test_error_in_inherited_delivery_points_at_defaults(tmp_path: Path) -> None:
    """A bad value that an account's delivery inherits is located in defaults."""
    text = BASE.replace("path: /srv/mail/shared", "path: relative/dir")
    text = text.replace("    poll_interval: 1h\n", "    delivery: {type: maildir}\n")
    path = write(tmp_path, text)
    assert problems(path, SECRETS) == [
        f"{path}:4:35: defaults.delivery.path: must be an absolute path (or start with ~)"
    ]
