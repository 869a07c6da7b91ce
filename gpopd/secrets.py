"""Secret sources: where a password (and later a token) comes from.

A secret is configured as one of ``{file: PATH}``, ``{env: VAR}``,
``{command: [argv...]}``, ``{credential: NAME}`` (systemd ``LoadCredential=``)
or an inline string.  ``SecretSource`` validates that shape; when the
configuration is loaded with a ``SecretContext`` asking for it, the secret is
read during validation so that every unreadable secret is reported together
with every other configuration problem.

No message built here ever contains a secret value or a command's output:
failures name the source (a path, a variable, ``argv[0]``) and the reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gpopd.errors import ConfigError

# A password manager that prompts or hangs must not stall start-up forever.
SECRET_COMMAND_TIMEOUT = 10.0
# Secrets are short; the cap keeps a mistaken path (a log, an image) cheap.
SECRET_MAX_BYTES = 64 * 1024
CREDENTIALS_DIRECTORY_VAR = "CREDENTIALS_DIRECTORY"
# The key under which ``SecretContext`` travels in pydantic's validation context.
CONTEXT_KEY = "gpopd"

SOURCE_KINDS = ("file", "env", "command", "credential")
_SHAPE_MESSAGE = (
    "must be a quoted string or a mapping with exactly one key: file, env, command or credential"
)


class UnreadableFile(Exception):
    """A file could not be read; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_regular_file(path: Path, limit: int) -> tuple[bytes, int]:
    """Return the bytes and ``st_mode`` of the regular file ``path`` (at most ``limit`` bytes).

    The file is opened non-blocking and checked with ``fstat`` so that a FIFO
    or a device named by mistake fails at once instead of hanging start-up.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or type(exc).__name__) from None
    except ValueError:  # a NUL byte in the path
        raise UnreadableFile("the path contains a NUL character") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnreadableFile(f"larger than {limit} bytes")
    return data, mode


@dataclass(frozen=True, slots=True)
class SecretContext:
    """What validating a secret needs to know about the load in progress."""

    environ: Mapping[str, str]
    resolve: bool
    inline_allowed: bool
    config_file: Path


class EnvironmentSecret(str):
    """An inline secret given in an environment variable rather than in the file.

    The file's permissions say nothing about who can read it, so the inline
    rule does not apply.
    """

    __slots__ = ()


# pydantic-settings validates through ``BaseSettings.__init__``, which takes
# no validation context, so the loader also publishes it here.
_ACTIVE: ContextVar[SecretContext | None] = ContextVar("gpopd_secret_context", default=None)


@contextlib.contextmanager
def secret_context(context: SecretContext) -> Iterator[None]:
    """Make ``context`` apply to every secret validated inside the ``with`` block."""
    token = _ACTIVE.set(context)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _context(info: ValidationInfo) -> SecretContext | None:
    context = info.context
    if isinstance(context, Mapping):
        found = context.get(CONTEXT_KEY)
        if isinstance(found, SecretContext):
            return found
    return _ACTIVE.get()


def _expand_path(value: Any) -> Any:
    if isinstance(value, str):
        if "\0" in value:
            raise PydanticCustomError("path_nul", "must not contain a NUL character")
        if not value:
            raise PydanticCustomError("path_empty", "must not be empty")
        try:
            return Path(value).expanduser()
        except RuntimeError:  # unknown user in ~user, or no home directory
            raise PydanticCustomError("path_home", "cannot expand ~ here") from None
    return value


def _require_absolute(path: Path) -> Path:
    if not path.is_absolute():
        # A daemon's working directory is "/", so a relative path would
        # silently mean something else under systemd than in a shell.
        raise PydanticCustomError("path_relative", "must be an absolute path (or start with ~)")
    return path


AbsolutePath = Annotated[Path, BeforeValidator(_expand_path), AfterValidator(_require_absolute)]
"""A ``Path`` with ``~`` expanded that must be absolute."""


def _check_credential_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise PydanticCustomError(
            "credential_name", "must be a credential name, not a path (no '/', not '.' or '..')"
        )
    return name


def _check_argument(arg: str) -> str:
    if "\0" in arg:
        raise PydanticCustomError("argument_nul", "must not contain a NUL character")
    return arg


EnvVarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
CredentialName = Annotated[str, AfterValidator(_check_credential_name)]
Argument = Annotated[str, AfterValidator(_check_argument)]


def _decode(data: bytes, what: str) -> SecretStr:
    """Turn raw secret bytes into a ``SecretStr``, refusing what no server would accept."""
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not valid UTF-8") from None
    if not text:
        raise ConfigError(f"{what} is empty")
    if any(ch in text for ch in "\r\n\0"):
        # A line break would end the POP3 command early and inject the rest.
        raise ConfigError(f"{what} contains a line break or a NUL character")
    return SecretStr(text)


def _read_secret_file(path: Path, what: str) -> SecretStr:
    try:
        data, _ = read_regular_file(path, SECRET_MAX_BYTES)
    except UnreadableFile as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.reason}") from None
    return _decode(data, f"{what} {path}")


def _run_secret_command(argv: tuple[str, ...], environ: Mapping[str, str]) -> SecretStr:
    name = argv[0]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            # stderr may echo what the command read; it is never shown.
            stderr=subprocess.DEVNULL,
            env=dict(environ),
            close_fds=True,
            # Its own process group, so a timeout also kills what it started.
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "invalid argument"
        raise ConfigError(f"cannot run command {name!r}: {reason}") from None
    try:
        out, _ = proc.communicate(timeout=SECRET_COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        raise ConfigError(
            f"command {name!r} did not finish within {SECRET_COMMAND_TIMEOUT:g}s"
        ) from None
    if proc.returncode < 0:
        raise ConfigError(f"command {name!r} was killed by signal {-proc.returncode}")
    if proc.returncode != 0:
        raise ConfigError(f"command {name!r} exited with status {proc.returncode}")
    first_line = out.split(b"\n", 1)[0]
    return _decode(first_line, f"the first line printed by command {name!r}")


class SecretSource(BaseModel):
    """Where one secret comes from; ``secret`` is the value once resolved.

    Exactly one of the four fields is set, except for an inline secret, which
    has none set and carries its value from the start (``kind == "inline"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    file: AbsolutePath | None = None
    env: EnvVarName | None = None
    command: Annotated[tuple[Argument, ...], Field(min_length=1)] | None = None
    credential: CredentialName | None = None

    _value: SecretStr | None = PrivateAttr(default=None)
    _inline: bool = PrivateAttr(default=False)

    @classmethod
    def inline(cls, value: str) -> SecretSource:
        """A secret written directly in the configuration."""
        source = cls.model_construct()
        source._value = _decode(value.encode("utf-8"), "the inline secret")
        source._inline = True
        return source

    @property
    def kind(self) -> str:
        """``"inline"`` or the one key that was given (``"file"``, ``"env"``...)."""
        if self._inline:
            return "inline"
        return next((k for k in SOURCE_KINDS if getattr(self, k) is not None), "inline")

    @property
    def resolved(self) -> bool:
        """Whether ``secret`` is available."""
        return self._value is not None

    @property
    def secret(self) -> SecretStr:
        """The secret value; only after loading with ``resolve_secrets=True``."""
        if self._value is None:
            raise RuntimeError(f"the {self.kind} secret was not resolved when loading")
        return self._value

    def resolve(self, environ: Mapping[str, str]) -> SecretStr:
        """Read the secret now (not cached); raise ``ConfigError`` without the value."""
        if self._inline and self._value is not None:
            return self._value
        if self.file is not None:
            return _read_secret_file(self.file, "secret file")
        if self.env is not None:
            value = environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} is not set")
            return _decode(
                value.encode("utf-8", "surrogateescape"), f"environment variable {self.env}"
            )
        if self.command is not None:
            return _run_secret_command(self.command, environ)
        if self.credential is not None:
            directory = environ.get(CREDENTIALS_DIRECTORY_VAR)
            if not directory:
                raise ConfigError(
                    f"credential {self.credential!r}: ${CREDENTIALS_DIRECTORY_VAR} is not set "
                    "(gpopd must run under systemd with LoadCredential=)"
                )
            return _read_secret_file(Path(directory) / self.credential, "credential")
        raise RuntimeError("a secret source without a source")

    @model_validator(mode="after")
    def _exactly_one_and_resolve(self, info: ValidationInfo) -> Self:
        if self._inline:  # built by _secret_input, which has checked it
            return self
        if sum(getattr(self, k) is not None for k in SOURCE_KINDS) != 1:
            raise PydanticCustomError("secret_source", _SHAPE_MESSAGE)
        context = _context(info)
        if context is not None and context.resolve:
            try:
                self._value = self.resolve(context.environ)
            except ConfigError as exc:
                raise PydanticCustomError(
                    "secret_unavailable", "{reason}", {"reason": str(exc)}
                ) from None
        return self

    def __repr_args__(self) -> Any:
        if self._inline:
            return [("inline", "**********")]
        return [(k, v) for k, v in super().__repr_args__() if v is not None]


def _secret_input(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, SecretSource | Mapping):
        return value
    if not isinstance(value, str):
        # YAML reads an unquoted 0123 as the number 123: refuse rather than
        # send a password that silently lost its leading zero.
        raise PydanticCustomError("secret_type", _SHAPE_MESSAGE)
    context = _context(info)
    if (
        context is not None
        and not context.inline_allowed
        and not isinstance(value, EnvironmentSecret)
    ):
        raise PydanticCustomError(
            "inline_secret_exposed",
            "{reason}",
            {
                "reason": "inline secret in a file readable by others; "
                f"chmod 600 {context.config_file} or use {{file: ...}}"
            },
        )
    try:
        return SecretSource.inline(str(value))
    except ConfigError as exc:
        raise PydanticCustomError("secret_invalid", "{reason}", {"reason": str(exc)}) from None


Secret = Annotated[SecretSource, BeforeValidator(_secret_input)]
"""A configured secret: an inline string or a ``{file|env|command|credential: ...}`` mapping."""
