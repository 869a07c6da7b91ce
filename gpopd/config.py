"""The configuration: frozen pydantic models and the loader that fills them.

``load_config`` reads one YAML file (YAML 1.2: ``no`` is a string, ``0123`` is
the number 123), layers ``GPOPD_*`` environment variables over it through
pydantic-settings' own env source, validates everything at once and raises a
single ``ConfigError`` listing every problem as ``FILE:LINE:COL: key.path:
message``.  Line numbers come from ruamel.yaml's node marks, because the YAML
loader built into pydantic-settings has none and accepts duplicate keys.

The field types and their parsers are in ``gpopd.configtypes``, the
``delivery:`` and ``routes:`` models in ``gpopd.configdelivery`` and the
``oauth:`` model in ``gpopd.configoauth``; all are imported from here too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gpopd import gmail
from gpopd.configdelivery import (
    MAX_DESTINATIONS,
    MAX_ROUTES,
    Deliveries,
    Delivery,
    LmtpDelivery,
    MaildirDelivery,
    MboxDelivery,
    MdaDelivery,
    Route,
    Routes,
    SmtpDelivery,
)
from gpopd.configoauth import Endpoint, OAuth
from gpopd.configtypes import (
    MAX_CONFIG_BYTES,
    AccountName,
    AddHeaders,
    ByteSize,
    ConfigModel,
    Count,
    Host,
    PollInterval,
    Port,
    ReadableFile,
    Text,
    Timeout,
    TlsMode,
    parse_duration,
    parse_size,
)
from gpopd.errors import ConfigError
from gpopd.secrets import (
    AbsolutePath,
    EnvironmentSecret,
    Secret,
    SecretContext,
    UnreadableFile,
    read_regular_file,
    secret_context,
)
from gpopd.yamlsource import (
    PER_ACCOUNT_KEYS,
    YamlConfigSource,
    merges_with,
)

# With the models and types of the other config* modules that the rest of
# gpopd imports from here.
__all__ = [
    "CONFIG_PATH_VAR",
    "DEFAULT_CONFIG_PATH",
    "ENV_NESTED_DELIMITER",
    "ENV_PREFIX",
    "MAX_CONFIG_BYTES",
    "MAX_DESTINATIONS",
    "MAX_ROUTES",
    "OAUTH_AUTH_METHODS",
    "PASSWORD_AUTH_METHODS",
    "SECRET_KEYS",
    "Account",
    "AccountDefaults",
    "AuthMethod",
    "Deliveries",
    "Delivery",
    "Endpoint",
    "LmtpDelivery",
    "MaildirDelivery",
    "MboxDelivery",
    "MdaDelivery",
    "OAuth",
    "Route",
    "Routes",
    "Settings",
    "SmtpDelivery",
    "TlsMode",
    "config_path",
    "load_config",
    "parse_duration",
    "parse_size",
]

DEFAULT_CONFIG_PATH = Path("/etc/gpopd/gpopd.yaml")
CONFIG_PATH_VAR = "GPOPD_CONFIG"
ENV_PREFIX = "GPOPD_"
ENV_NESTED_DELIMITER = "__"
# Fields of type ``Secret``: an inline value for them from the environment is
# exempt from the file-permission rule.
SECRET_KEYS = frozenset({"password", "client_secret", "refresh_token", "access_token"})

AuthMethod = Literal["auto", "user", "plain", "xoauth2", "oauthbearer"]
PASSWORD_AUTH_METHODS = frozenset({"auto", "user", "plain"})
OAUTH_AUTH_METHODS = frozenset({"xoauth2", "oauthbearer"})


class _ExplicitName(str):
    """A ``name`` the user wrote inside an account, where only the key may name it."""

    __slots__ = ()


def _name_from_key(value: object) -> object:
    if isinstance(value, _ExplicitName):
        raise PydanticCustomError(
            "name_from_key", "is taken from the account's key under accounts; remove it"
        )
    return value


class AccountDefaults(ConfigModel):
    """``defaults:``: any account key but the per-account ones, merged under each account."""

    port: Port | None = None
    tls: TlsMode | None = None
    allow_plaintext: bool | None = None
    ca_file: ReadableFile | None = None
    auth: AuthMethod | None = None
    keep: bool | None = None
    max_messages_per_poll: Count | None = None
    max_message_size: ByteSize | None = None
    delete_after: Timeout | None = None
    poll_interval: PollInterval | None = None
    connect_timeout: Timeout | None = None
    timeout: Timeout | None = None
    add_headers: AddHeaders | None = None
    quarantine: AbsolutePath | None = None
    allow_fast_polling: bool | None = None
    skip_sent: bool | None = None
    gmail_batch_threshold: Count | None = None
    max_sessions_per_poll: Count | None = None
    routes: Routes | None = None
    delivery: Deliveries | None = None


class Account(ConfigModel):
    """One mailbox to poll and where its messages go; ``name`` is its key under ``accounts``."""

    name: Annotated[str, BeforeValidator(_name_from_key)]
    host: Host
    port: Port | None = None
    tls: TlsMode = "implicit"
    allow_plaintext: bool = False
    ca_file: ReadableFile | None = None
    username: Text
    password: Secret | None = None
    auth: AuthMethod = "auto"
    keep: bool = True
    max_messages_per_poll: Count | None = None
    max_message_size: ByteSize = 50 * 1024**2
    delete_after: Timeout | None = None
    poll_interval: PollInterval = 600.0
    connect_timeout: Timeout = 30.0
    timeout: Timeout = 120.0
    add_headers: AddHeaders = ()
    # A Maildir that also receives every message a destination refuses for good.
    quarantine: AbsolutePath | None = None
    # Gmail: no poll_interval under 5 minutes unless the user insists.
    allow_fast_polling: bool = False
    # Gmail's POP includes sent mail: skip messages From the account itself.
    skip_sent: bool = False
    # A session that listed at least this many messages and fetched them all
    # is followed at once by another one (Gmail offers ~250 per session).
    # Unset: 200 on Gmail's hosts, off elsewhere (see ``batch_threshold``).
    gmail_batch_threshold: Count | None = None
    max_sessions_per_poll: Count = 100
    oauth: OAuth | None = None
    # Tried in order before ``delivery``, which takes what no route matched.
    routes: Routes = ()
    delivery: Deliveries

    @property
    def batch_threshold(self) -> int | None:
        """``gmail_batch_threshold``, or 200 for Gmail's hosts and None (never) elsewhere.

        Another server lists its whole mailbox in each session, so a session
        after a full one would only list the same messages again: on the
        first sync of a large mailbox kept on the server, that is a second
        login and listing for nothing.  Gmail behind a tunnel or a proxy
        sets the threshold explicitly.
        """
        if self.gmail_batch_threshold is not None:
            return self.gmail_batch_threshold
        return gmail.GMAIL_BATCH_THRESHOLD if gmail.is_gmail_host(self.host) else None

    @property
    def effective_port(self) -> int:
        """``port``, or 995 for implicit TLS and 110 otherwise."""
        if self.port is not None:
            return self.port
        return 995 if self.tls == "implicit" else 110

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        # ``gpopd_key`` lets the loader point at the offending key's line.
        if self.tls == "none" and not self.allow_plaintext:
            raise PydanticCustomError(
                "plaintext_refused",
                "tls: none sends the password unencrypted; set allow_plaintext: true to allow it",
                {"gpopd_key": "tls"},
            )
        if self.auth in OAUTH_AUTH_METHODS and self.oauth is None:
            raise PydanticCustomError(
                "oauth_missing",
                f"auth: {self.auth} needs an oauth section (refresh_token or access_token)",
                {"gpopd_key": "oauth"},
            )
        if self.oauth is not None and self.auth not in OAUTH_AUTH_METHODS:
            raise PydanticCustomError(
                "oauth_unused",
                f"oauth is used only with auth: xoauth2 or oauthbearer, not auth: {self.auth}",
                {"gpopd_key": "oauth"},
            )
        if self.auth in PASSWORD_AUTH_METHODS and self.password is None:
            raise PydanticCustomError(
                "password_missing",
                f"auth: {self.auth} needs a password",
                {"gpopd_key": "password"},
            )
        if (
            gmail.is_gmail_host(self.host)
            and self.poll_interval < gmail.GMAIL_MIN_INTERVAL
            and not self.allow_fast_polling
        ):
            raise PydanticCustomError(
                "gmail_poll_interval",
                "Gmail asks clients to wait 5 minutes between logins (LOGIN-DELAY 300) and "
                "answers faster polling with a lockout; use at least 5m, or set "
                "allow_fast_polling: true to insist",
                {"gpopd_key": "poll_interval"},
            )
        if self.delete_after is not None and not self.keep:
            raise PydanticCustomError(
                "delete_after_without_keep",
                "delete_after needs keep: true (with keep: false messages are deleted as "
                "soon as they are delivered); remove one of them, or set delete_after: null",
                {"gpopd_key": "delete_after"},
            )
        return self


def _inherit_defaults(data: Any) -> Any:
    """Merge ``defaults`` under each account and name each account after its key."""
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    defaults = data.get("defaults")
    if defaults is None:
        data.pop("defaults", None)
        defaults = {}
    elif isinstance(defaults, AccountDefaults):
        # Set fields as they are: dumping would flatten secret sources.
        defaults = {k: getattr(defaults, k) for k in defaults.model_fields_set}
    accounts = data.get("accounts")
    if "accounts" in data and accounts is None:  # an empty "accounts:" section
        data["accounts"] = {}
    elif isinstance(accounts, Mapping):
        inherited = (
            {k: v for k, v in defaults.items() if k not in PER_ACCOUNT_KEYS}
            if isinstance(defaults, Mapping)
            else {}
        )
        merged = {}
        for key, account in accounts.items():
            if isinstance(account, Mapping):
                name = _ExplicitName(account["name"]) if "name" in account else key
                own = {**account, "name": name}
                # A delivery of the same kind fills its gaps from the default
                # one; a delivery of another kind replaces it whole.
                if merges_with(inherited.get("delivery"), own.get("delivery")):
                    own["delivery"] = {**inherited["delivery"], **own["delivery"]}
                merged[key] = {**inherited, **own}
            else:
                merged[key] = account
        data["accounts"] = merged
    return data


class Settings(BaseSettings):
    """The whole configuration, as validated at start-up and on each reload.

    ``Settings(...)`` validates its arguments only; ``load_config`` is what
    layers the YAML file and ``GPOPD_*`` variables.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    state_dir: AbsolutePath = Path("/var/lib/gpopd")
    log_file: AbsolutePath | None = None
    max_sessions: Count = 32
    max_sessions_per_host: Count = 8
    defaults: AccountDefaults = Field(default_factory=AccountDefaults)
    accounts: dict[AccountName, Account]

    _inherit = model_validator(mode="before")(_inherit_defaults)

    @field_validator("accounts")
    @classmethod
    def _at_least_one_distinct(cls, accounts: dict[str, Account]) -> dict[str, Account]:
        if not accounts:
            raise PydanticCustomError("no_accounts", "at least one account is needed")
        seen: dict[str, str] = {}
        for name in accounts:
            if (other := seen.setdefault(name.casefold(), name)) != name:
                # Environment variables are upper-case, so names meet case-insensitively.
                raise PydanticCustomError(
                    "account_case", f"account names {other!r} and {name!r} differ only in case"
                )
        return accounts

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """The file to load: ``--config``, else ``$GPOPD_CONFIG``, else the default."""
    chosen = cli_value if cli_value is not None else environ.get(CONFIG_PATH_VAR) or None
    return Path(chosen).expanduser() if chosen is not None else DEFAULT_CONFIG_PATH


class _EnvironmentSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _environment_overrides(doc: YamlConfigSource, environ: Mapping[str, str]) -> None:
    """Deep-merge every ``GPOPD_*`` variable over ``doc``, one variable at a time.

    One at a time so that each value's origin (and each parse error) is known
    by variable name; shallower variables first so deeper ones win, as
    pydantic-settings itself merges them.
    """
    accounts = doc.data.get("accounts") if isinstance(doc.data, dict) else None
    names = {n.casefold(): n for n in accounts} if isinstance(accounts, dict) else {}
    variables = [(k, v) for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)]
    variables.sort(key=lambda kv: (kv[0].count(ENV_NESTED_DELIMITER), kv[0]))
    for var, value in variables:
        try:
            found = _EnvironmentSource(Settings, {var: value})()
        except (SettingsError, ValueError, TypeError):
            doc.add_problem(f"environment variable {var}", "cannot parse the value as JSON")
            continue
        if not found:
            continue  # not a setting (GPOPD_CONFIG, for one)
        path = var[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
        _keep_text(found, path, value)
        if isinstance(found.get("accounts"), dict):
            found["accounts"] = {
                names.get(k.casefold(), k): v for k, v in found["accounts"].items()
            }
        doc.merge(found, var)


def _keep_text(found: dict[str, Any], path: list[str], raw: str) -> None:
    """Undo JSON decoding of scalars: ``PASSWORD=0123`` stays the text ``0123``.

    Only mappings and lists are worth decoding; pydantic converts text to
    numbers and booleans where a field wants them.
    """
    node: Any = found
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    last = path[-1]
    if isinstance(node, dict) and last in node and not isinstance(node[last], dict | list):
        node[last] = EnvironmentSecret(raw) if last in SECRET_KEYS else raw


def load_config(
    path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    resolve_secrets: bool = True,
) -> Settings:
    """Load, merge and validate the configuration; raise ``ConfigError`` listing every problem.

    ``environ`` (default ``os.environ``) supplies the ``GPOPD_*`` overrides,
    ``{env: ...}`` secrets, ``$CREDENTIALS_DIRECTORY`` and the environment of
    secret commands.  With ``resolve_secrets=False`` secret sources are only
    checked for shape and ``SecretSource.secret`` is unavailable.
    """
    environ = os.environ if environ is None else environ
    try:
        raw, mode = read_regular_file(path, MAX_CONFIG_BYTES)
    except UnreadableFile as exc:
        raise ConfigError([f"{path}: cannot read: {exc.reason}"]) from None
    doc = YamlConfigSource(Settings, path, raw)
    _environment_overrides(doc, environ)
    context = SecretContext(
        environ=environ,
        resolve=resolve_secrets,
        inline_allowed=(mode & 0o044) == 0,
        config_file=path,
    )
    settings: Settings | None = None
    try:
        with secret_context(context):
            settings = Settings.model_validate(doc.data)
    except ValidationError as exc:
        doc.add_validation_errors(exc)
    if doc.problems or settings is None:
        raise ConfigError(doc.problems)
    return settings
