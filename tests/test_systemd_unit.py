"""The shipped systemd units: directives, `systemd-analyze verify` and `security`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpopd.config import CONFIG_PATH_VAR, DEFAULT_CONFIG_PATH, Settings
from gpopd.errors import EX_CONFIG

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT_SUFFIXES = {".service", ".socket", ".timer", ".path"}
UNITS = sorted(p for p in SYSTEMD_DIR.iterdir() if p.suffix in UNIT_SUFFIXES)
MAIN_UNIT = SYSTEMD_DIR / "gpopd.service"
# OPERATIONS.md: a fully hardened network client scores 1.1; what remains is
# inherent to opening Internet sockets.
MAX_EXPOSURE = 2.0
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")
# A commented directive meant to be uncommented as is, e.g. "#LoadCredential=...".
COMMENTED_DIRECTIVE = re.compile(r"^#([A-Z][A-Za-z]+=.*)$", re.M)
# The indented "[Service]" drop-in shown in the comments for home directories.
DROPIN_LINE = re.compile(r"^#   ([A-Z][A-Za-z]+=\S.*)$")

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> (key, value) in order, joining backslash continuations."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        assert current is not None, f"directive outside a section: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def last(unit: Unit, key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert found, f"{key}= missing from [{section}]"
    return found[-1]


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: install the Debian package 'systemd' "
            "(apt-get install systemd)"
        )
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def runnable_copy(unit: Path, directory: Path, text: str | None = None) -> Path:
    """The unit under its own name, with ExecStart pointing at this interpreter.

    `systemd-analyze verify` reports an ExecStart binary that does not exist
    ("Command ... is not executable"), and /usr/local/bin/gpopd exists only
    once gpopd is installed.
    """
    text = unit.read_text() if text is None else text
    replaced, count = re.subn(
        r"^ExecStart=\S+", f"ExecStart={sys.executable} -m gpopd", text, flags=re.M
    )
    assert count >= 1, f"{unit.name} has no ExecStart="
    directory.mkdir(parents=True, exist_ok=True)
    copy = directory / unit.name
    copy.write_text(replaced)
    return copy


def assert_verifies(analyze: str, unit: Path) -> None:
    result = run(analyze, "verify", str(unit))
    assert result.stderr == "", f"systemd-analyze verify {unit.name}:\n{result.stderr}"
    assert result.returncode == 0


def assert_secure(analyze: str, unit: Path) -> float:
    threshold = str(round(MAX_EXPOSURE * 10))  # --threshold counts tenths
    result = run(analyze, "security", "--offline=true", f"--threshold={threshold}", str(unit))
    match = EXPOSURE.search(result.stdout)
    assert match is not None, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    score = float(match[1])
    assert score <= MAX_EXPOSURE, f"{unit.name} scores {score}:\n{result.stdout}"
    assert result.returncode == 0, result.stdout + result.stderr
    return score


def home_dropin(text: str) -> list[str]:
    """The directives of the commented home-directory drop-in, in order."""
    lines = text.splitlines()
    start = lines.index("#   [Service]") + 1
    found: list[str] = []
    for line in lines[start:]:
        match = DROPIN_LINE.match(line)
        if match is None:
            break
        found.append(match[1])
    return found


def test_units_found() -> None:
    """systemd/ ships gpopd.service, so the checks below have something to check."""
    assert MAIN_UNIT in UNITS


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_security_score(analyze: str, unit: Path) -> None:
    """Every unit scores at most 2.0 in `systemd-analyze security --offline=true`."""
    assert_secure(analyze, unit)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_verify_is_silent(analyze: str, unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing on stderr for every unit."""
    assert_verifies(analyze, runnable_copy(unit, tmp_path))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_verify_as_shipped_only_misses_binary(analyze: str, unit: Path) -> None:
    """Unmodified, verify complains at most about the ExecStart binary not being installed."""
    binary = last(parse_unit(unit.read_text()), "ExecStart").split()[0]
    result = run(analyze, "verify", str(unit))
    if Path(binary).exists():
        assert result.stderr == ""
    else:
        lines = result.stderr.splitlines()
        assert lines, "verify accepted a missing ExecStart binary"
        assert all(binary in line for line in lines), result.stderr


def test_verify_check_can_fail(analyze: str, tmp_path: Path) -> None:
    """An unknown directive makes verify write to stderr, so the silence check means something."""
    text = MAIN_UNIT.read_text().replace("[Service]\n", "[Service]\nPollHarder=yes\n", 1)
    copy = runnable_copy(MAIN_UNIT, tmp_path, text)
    result = run(analyze, "verify", str(copy))
    assert "PollHarder" in result.stderr


def test_security_check_can_fail(analyze: str, tmp_path: Path) -> None:
    """A unit with only ExecStart scores far above the limit, so the score check means something."""
    unit = tmp_path / "bare.service"
    unit.write_text(f"[Service]\nExecStart={sys.executable} -m gpopd run\n")
    with pytest.raises(AssertionError, match="scores"):
        assert_secure(analyze, unit)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_key_directives(unit: Path) -> None:
    """Every unit is a notify service with reload, watchdog, private umask and state directory."""
    parsed = parse_unit(unit.read_text())
    assert last(parsed, "Type") == "notify"
    assert last(parsed, "NotifyAccess") == "main"
    assert last(parsed, "RestartPreventExitStatus") == str(EX_CONFIG)
    assert last(parsed, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert last(parsed, "WatchdogSec") == "60s"
    assert last(parsed, "UMask") == "0077"
    assert last(parsed, "StateDirectory")


def test_main_unit_settings() -> None:
    """gpopd.service runs `gpopd run` with the documented restart, paths and sandbox."""
    parsed = parse_unit(MAIN_UNIT.read_text())
    expected = {
        "ExecStart": "/usr/local/bin/gpopd run",
        "Restart": "on-failure",
        "RestartSec": "10s",
        "TimeoutStopSec": "30s",
        "StateDirectory": "gpopd",
        "ConfigurationDirectory": "gpopd",
        "LogsDirectory": "gpopd",
        "DynamicUser": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "PrivateUsers": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: last(parsed, key) for key in expected} == expected
    assert values(parsed, "SystemCallFilter") == ["@system-service", "~@privileged @resources"]
    assert last(parsed, "WantedBy", "Install") == "multi-user.target"


def test_main_unit_matches_gpopd_defaults() -> None:
    """The unit's config path and state directory are the ones gpopd uses by default."""
    parsed = parse_unit(MAIN_UNIT.read_text())
    assert f"{CONFIG_PATH_VAR}={DEFAULT_CONFIG_PATH}" in values(parsed, "Environment")
    state_dir = Path("/var/lib") / last(parsed, "StateDirectory")
    assert Settings.model_fields["state_dir"].default == state_dir


def test_credential_examples_work(analyze: str, tmp_path: Path) -> None:
    """Uncommenting the LoadCredential examples keeps verify silent and the score low."""
    text = MAIN_UNIT.read_text()
    examples = COMMENTED_DIRECTIVE.findall(text)
    assert any(e.startswith("LoadCredential=alice.password:") for e in examples)
    assert any(e.startswith("LoadCredentialEncrypted=") for e in examples)
    uncommented = COMMENTED_DIRECTIVE.sub(r"\1", text)
    copy = runnable_copy(MAIN_UNIT, tmp_path, uncommented)
    assert len(values(parse_unit(copy.read_text()), "LoadCredential")) == 2
    assert_verifies(analyze, copy)
    assert_secure(analyze, copy)


def test_home_directory_dropin(analyze: str, tmp_path: Path) -> None:
    """The documented home-directory drop-in verifies cleanly and still scores at most 2.0."""
    text = MAIN_UNIT.read_text()
    dropin = home_dropin(text)
    assert "DynamicUser=no" in dropin
    assert "ProtectHome=read-only" in dropin
    assert any(line.startswith("ReadWritePaths=/home/") for line in dropin)
    # A later assignment of a single-valued setting wins, as in a drop-in.
    combined = text.replace("\n[Install]\n", "\n" + "\n".join(dropin) + "\n\n[Install]\n")
    copy = runnable_copy(MAIN_UNIT, tmp_path, combined)
    parsed = parse_unit(copy.read_text())
    assert last(parsed, "DynamicUser") == "no"
    assert last(parsed, "ProtectHome") == "read-only"
    assert_verifies(analyze, copy)
    assert_secure(analyze, copy)


def test_readme_shows_the_same_dropin() -> None:
    """systemd/README.md gives the same home-directory drop-in as the unit's comments."""
    readme = (SYSTEMD_DIR / "README.md").read_text()
    block = re.search(r"```ini\n\[Service\]\n(.*?)```", readme, re.S)
    assert block is not None
    assert block[1].splitlines() == home_dropin(MAIN_UNIT.read_text())
