"""Whatever the file or the environment holds, loading ends in Settings or ConfigError."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from gpopd.config import Settings, load_config
from gpopd.errors import ConfigError

KEYS = [
    "state_dir", "log_file", "max_sessions", "max_sessions_per_host", "defaults", "accounts",
    "host", "port", "tls", "allow_plaintext", "ca_file", "username", "password", "auth", "keep",
    "max_messages_per_poll", "max_message_size", "delete_after", "poll_interval",
    "connect_timeout", "timeout", "delivery", "type", "path", "file", "env", "credential",
    "name", "alice", "Alice", "<<",
]  # fmt: skip
WORDS = [
    "10m", "1h30m", "0", "-1", "50MB", "1GiB", "/tmp", "~/x", "~nobody/x", "maildir", "none",
    "implicit", "starttls", "pop.example.org", "user", "plain", "auto", "true", "no", "0123",
    "/dev/null", "/proc", "", " ", "\x00", "a\nb", "é", "1e999", ".inf",
]  # fmt: skip
# Plain text, without the surrogates that no file can hold.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.sampled_from(WORDS)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=5)
    ),
    max_leaves=25,
)
# Valid accounts with a few keys set to anything, so that loading sometimes succeeds.
NEAR_VALID_ACCOUNT = st.fixed_dictionaries(
    {
        "host": st.just("pop.example.org"),
        "username": st.just("u"),
        "password": st.just({"env": "ALICE"}),
        "delivery": st.just({"type": "maildir", "path": "/srv/m"}),
    },
    optional=dict.fromkeys(
        ["port", "tls", "allow_plaintext", "keep", "auth", "poll_interval", "timeout",
         "max_message_size", "delete_after", "max_messages_per_poll"],
        SCALARS,
    ),
)  # fmt: skip
ACCOUNT = NEAR_VALID_ACCOUNT | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=10)
DOCUMENT = st.fixed_dictionaries(
    {"accounts": st.dictionaries(st.sampled_from(["alice", "Alice", "b c"]) | TEXT, ACCOUNT)},
    optional=dict.fromkeys(KEYS[:5], VALUES),
)
# Secrets are resolved, so no command runs: "command" is not among KEYS.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def dump(data: Any) -> str:
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, out)
    return out.getvalue()


def load_outcome(path: Path, environ: dict[str, str]) -> Settings | ConfigError:
    """Load, returning the ConfigError instead of raising it; anything else propagates."""
    try:
        return load_config(path, environ=environ)
    except ConfigError as exc:
        return exc


def assert_sane(outcome: Settings | ConfigError) -> None:
    """A ConfigError lists at least one non-empty problem; Settings has an account."""
    if isinstance(outcome, ConfigError):
        assert outcome.problems
        assert all(isinstance(p, str) and p for p in outcome.problems)
    else:
        assert isinstance(outcome, Settings)
        assert outcome.accounts


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "gpopd.yaml"


@FUZZ
@given(text=st.text())
def test_any_text_gives_settings_or_config_error(config_file: Path, text: str) -> None:
    """Arbitrary text (even invalid UTF-8) only ever yields Settings or ConfigError."""
    config_file.write_bytes(text.encode("utf-8", "surrogatepass"))
    config_file.chmod(0o600)
    assert_sane(load_outcome(config_file, {}))


@FUZZ
@given(text=st.text(alphabet="ab0:{}[]-&*!|>'\"#\n \t?%@`,.~<=\\", max_size=80))
def test_yaml_punctuation_gives_settings_or_config_error(config_file: Path, text: str) -> None:
    """Text made of YAML's special characters only ever yields Settings or ConfigError."""
    config_file.write_text(text)
    config_file.chmod(0o600)
    assert_sane(load_outcome(config_file, {}))


@FUZZ
@given(data=DOCUMENT, mode=st.sampled_from([0o600, 0o644]))
def test_any_structure_gives_settings_or_config_error(
    config_file: Path, data: dict[str, Any], mode: int
) -> None:
    """Generated nested mappings dumped to YAML only ever yield Settings or ConfigError."""
    config_file.write_text(dump(data))
    config_file.chmod(mode)
    assert_sane(load_outcome(config_file, {"ALICE": "pw"}))


@FUZZ
@given(
    variables=st.dictionaries(
        st.lists(st.sampled_from(KEYS) | TEXT, min_size=1, max_size=4).map(
            lambda parts: "GPOPD_" + "__".join(parts).upper()
        ),
        st.sampled_from(WORDS) | TEXT | st.just('{"type": "maildir"}') | st.just("[1, 2]"),
        max_size=4,
    )
)
def test_any_environment_gives_settings_or_config_error(
    config_file: Path, variables: dict[str, str]
) -> None:
    """Arbitrary GPOPD_* variables over a valid file only ever yield Settings or ConfigError."""
    config_file.write_text(
        "accounts:\n  alice:\n    host: h\n    username: u\n    password: {env: PW}\n"
        "    delivery: {type: maildir, path: /srv/m}\n"
    )
    config_file.chmod(0o600)
    environ = {k: v.replace("\x00", "") for k, v in variables.items()}
    assert_sane(load_outcome(config_file, {**environ, "PW": "pw"}))
