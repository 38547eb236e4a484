"""Credentials for data sources, and the redaction that keeps them out of every output.

A source's credentials come, in this order, from

1. an environment variable: ``ASTROBIO_TOKEN_<HOST>`` (the host name upper-cased, every character
   other than A-Z and 0-9 replaced by ``_``), or the name given by the URI option ``#auth_env=NAME``;
   it holds a bearer token, or ``user:password`` when the URI says ``#auth=basic``;
2. ``user:password@`` in the URI itself (basic auth);
3. the ``.netrc`` file (``$NETRC``, else ``~/.netrc``): the ``machine`` entry for the host gives basic
   auth (login, password), or a bearer token (its password) when the URI says ``#auth=bearer``.

The secret lives only in a :class:`Credentials` object, whose ``repr`` and ``str`` say where it came
from and never what it is, and in the ``Authorization`` header of the request (sent only to the
source's own host: urllib does not forward it across redirects). Everything that names a source for
a human (messages, logs, cache sidecars, configs) goes through :func:`redact_uri`.
"""

from __future__ import annotations

import base64
import netrc
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

ENV_PREFIX = "ASTROBIO_TOKEN_"
AUTH_KINDS = ("auto", "bearer", "basic", "none")
# query parameters whose values are secrets by their name (API keys in the URL)
SECRET_QUERY_KEYS = re.compile(r"(token|key|secret|password|passwd|pwd|signature|sig|auth)", re.IGNORECASE)
REDACTED = "***"


class AuthError(RuntimeError):
    """A source refused our credentials, or wanted some and we had none. Never carries the secret."""


def env_var_for_host(host: str) -> str:
    """The default environment variable of a host: ``data.example.org`` -> ``ASTROBIO_TOKEN_DATA_EXAMPLE_ORG``."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", host.upper())


def redact_uri(uri: str) -> str:
    """The URI with any ``user:password@`` and the values of secret-looking query parameters replaced
    by ``***``; safe to print, log or store. Plain paths come back unchanged."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_QUERY_KEYS.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if SECRET_QUERY_KEYS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class AuthSpec:
    """Where to look for a source's credentials; holds no secret."""

    host: str
    kind: str = "auto"          # auto | bearer | basic | none
    env_var: str = ""           # empty: env_var_for_host(host)

    def __post_init__(self):
        if self.kind not in AUTH_KINDS:
            raise ValueError(f"auth={self.kind!r} is not one of {', '.join(AUTH_KINDS)}; "
                             "write the URI option as #auth=bearer or #auth=basic")
        if not self.env_var:
            object.__setattr__(self, "env_var", env_var_for_host(self.host))

    def hint(self) -> str:
        """How a user gives this source credentials (names the variable, never a value)."""
        basic = "user:password, with #auth=basic in the URI" if self.kind != "basic" else "user:password"
        return (f"set the environment variable {self.env_var} to a bearer token (or {basic}), "
                f"or add a 'machine {self.host} login ... password ...' entry to ~/.netrc")


class Credentials:
    """One secret and where it came from. ``repr``/``str`` show the origin only."""

    __slots__ = ("kind", "origin", "_secret")

    def __init__(self, kind: str, origin: str, secret: str):
        self.kind = kind          # bearer | basic
        self.origin = origin      # e.g. "environment variable ASTROBIO_TOKEN_X"
        self._secret = secret     # the token, or "user:password"

    def header(self) -> str:
        """The value of the ``Authorization`` header."""
        if self.kind == "bearer":
            return f"Bearer {self._secret}"
        return "Basic " + base64.b64encode(self._secret.encode()).decode("ascii")

    def __repr__(self) -> str:
        return f"Credentials({self.kind}, from {self.origin})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("credentials are not picklable: they must never reach a file")


def uri_credentials(uri: str) -> Credentials | None:
    """Basic-auth credentials written into a URI as ``user:password@host`` (percent-decoded), or None;
    also None for the ``***@`` of a redacted URI (a run's saved config), so that .netrc is asked."""
    parts = urlsplit(uri)
    if parts.username is None or (parts.username == REDACTED and parts.password is None):
        return None
    return Credentials("basic", "the URI's user:password", f"{unquote(parts.username)}:{unquote(parts.password or '')}")


def resolve_credentials(spec: AuthSpec, in_uri: Credentials | None = None) -> Credentials | None:
    """The source's credentials, or None (no variable set, none in the URI, no .netrc entry)."""
    if spec.kind == "none":
        return None
    value = os.environ.get(spec.env_var)
    if value:
        kind = "basic" if spec.kind == "basic" else "bearer"
        if kind == "basic" and ":" not in value:
            raise AuthError(f"environment variable {spec.env_var} must hold user:password for #auth=basic "
                            "(its value has no ':'); fix the variable or drop #auth=basic to send a bearer token")
        return Credentials(kind, f"environment variable {spec.env_var}", value)
    if in_uri is not None:
        return in_uri
    return netrc_credentials(spec)


def netrc_path() -> Path:
    return Path(os.environ["NETRC"]) if os.environ.get("NETRC") else Path.home() / ".netrc"


def netrc_credentials(spec: AuthSpec) -> Credentials | None:
    path = netrc_path()
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(spec.host)
    except netrc.NetrcParseError as err:
        # NOTE: the parser's own message quotes the offending token, which may be a password.
        raise AuthError(f"cannot parse {path} (line {err.lineno}); fix its syntax") from None
    if entry is None:
        return None
    login, _, password = entry
    origin = f".netrc entry for machine {spec.host}"
    if spec.kind == "bearer":
        return Credentials("bearer", origin, password or "")
    return Credentials("basic", origin, f"{login or ''}:{password or ''}")
