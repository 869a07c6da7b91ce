"""The ``oauth:`` section of an account: where its OAuth2 access tokens come from."""

from __future__ import annotations

from typing import Annotated, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, model_validator
from pydantic_core import PydanticCustomError

from gpopd.configtypes import LOOPBACK, ConfigModel, ReadableFile, Text, check_text
from gpopd.secrets import Secret


def _check_endpoint(value: str) -> str:
    check_text(value)
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise PydanticCustomError("url", "must be a URL such as https://host/path") from None
    if parts.scheme not in ("https", "http") or not host or parts.fragment:
        raise PydanticCustomError("url", "must be a URL such as https://host/path")
    if parts.scheme == "http" and host.lower() not in LOOPBACK:
        # Tokens and client secrets travel in the request: only a listener on
        # this machine may go without TLS.
        raise PydanticCustomError(
            "url_https", "must start with https:// (http:// only on loopback)"
        )
    return value


Endpoint = Annotated[str, AfterValidator(_check_endpoint)]


class OAuth(ConfigModel):
    """``oauth:`` of an account using ``auth: xoauth2`` or ``oauthbearer``.

    Either a ``refresh_token`` that gpopd exchanges at ``token_url`` for
    access tokens (``gpopd auth ACCOUNT`` obtains one), or an ``access_token``
    source, typically a command, which is run again for every session.
    """

    client_id: Text | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    access_token: Secret | None = None
    token_url: Endpoint = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
    auth_url: Endpoint = "https://accounts.google.com/o/oauth2/v2/auth"
    scope: Text = "https://mail.google.com/"
    ca_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _token_source(self) -> Self:
        if self.access_token is not None and self.refresh_token is not None:
            raise PydanticCustomError(
                "oauth_token_source",
                "give either access_token or refresh_token, not both",
                {"gpopd_key": "access_token"},
            )
        if self.access_token is None:
            if self.refresh_token is None:
                raise PydanticCustomError(
                    "oauth_token_missing",
                    "needs refresh_token (run `gpopd auth ACCOUNT` to obtain one) or access_token",
                    {"gpopd_key": "refresh_token"},
                )
            if self.client_id is None:
                raise PydanticCustomError(
                    "oauth_client_missing",
                    "refresh_token needs client_id",
                    {"gpopd_key": "client_id"},
                )
        return self
