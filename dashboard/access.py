"""Who may read the dashboard.

Off by default (the dashboard listens on localhost). Reading is guarded when either is set:

- FUZZFARM_DASHBOARD_READ_TOKEN: every page but /healthz needs the token, given once in the
  login form or as `?token=` (the answer sets a cookie and sends the browser on to the same
  address without the token), or with every request as `Authorization: Bearer <token>` (for
  Prometheus and scripts). The cookie holds an HMAC of the token, never the token itself.
- FUZZFARM_DASHBOARD_TRUST_HEADER=<Header-Name>: a request carrying that header, which an
  authenticating reverse proxy sets, counts as read access, and its value is shown as the
  user. Anyone who can reach the dashboard without the proxy can send the header too, so the
  dashboard must then be reachable through the proxy only.

The action token (FUZZFARM_DASHBOARD_TOKEN, in `X-Fuzzfarm-Token`) opens the pages as well: a
client that may send work may read. Neither token is ever written into a page.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import urlencode

from flask import Request

READ_TOKEN_ENV = "FUZZFARM_DASHBOARD_READ_TOKEN"
TRUST_HEADER_ENV = "FUZZFARM_DASHBOARD_TRUST_HEADER"
COOKIE = "fuzzfarm_read"
HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")
# what of a proxy's user name is shown: printable, and not a page long
USER_SHOWN = 120
# pages anyone may see: the health check, the login form and what it needs to look right
OPEN_ENDPOINTS = frozenset({"healthz", "login", "logout", "static"})


class AccessError(ValueError):
    """The read-protection settings cannot be used (one line for the user)."""


@dataclass(frozen=True)
class Reader:
    name: str  # the proxy's user, or "token"
    via: str  # "proxy" or "token"


@dataclass(frozen=True)
class ReadAccess:
    read_token: str | None = None
    trust_header: str | None = None
    action_token: str | None = None

    def __post_init__(self) -> None:
        if self.trust_header is not None and not HEADER_NAME.match(self.trust_header):
            raise AccessError(f"{TRUST_HEADER_ENV}: {self.trust_header!r:.80} is not a header "
                              "name (letters, digits and '-')")

    @property
    def guarded(self) -> bool:
        return bool(self.read_token or self.trust_header)

    def cookie_value(self) -> str:
        """What the cookie holds: an HMAC of the read token, so a leaked cookie does not give
        the token away, and a new token ends every session."""
        assert self.read_token
        return hmac.new(self.read_token.encode(), b"fuzzfarm dashboard reader",
                        hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return bool(self.read_token and given) and hmac.compare_digest(
            str(given).encode(), str(self.read_token).encode())

    def reader(self, request: Request) -> Reader | None:
        """Who is reading: the proxy's user, or a holder of the read or action token; None if
        the request shows neither."""
        if self.trust_header:
            user = request.headers.get(self.trust_header, "").strip()
            if user:
                shown = "".join(c for c in user if c.isprintable())[:USER_SHOWN]
                return Reader(shown or "?", "proxy")
        if self.read_token:
            cookie = request.cookies.get(COOKIE, "")
            if cookie and hmac.compare_digest(cookie.encode(), self.cookie_value().encode()):
                return Reader("token", "token")
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and self.token_ok(given.strip()):
                return Reader("token", "token")
        action = request.headers.get("X-Fuzzfarm-Token", "")
        if self.action_token and action and hmac.compare_digest(action.encode(),
                                                                self.action_token.encode()):
            return Reader("token", "token")
        return None


def without_token(request: Request) -> str:
    """The request's path and query with any `token` parameter left out."""
    query = [(k, v) for k, values in request.args.lists() for v in values if k != "token"]
    return request.path + (f"?{urlencode(query)}" if query else "")


def local_path(target: str | None) -> str:
    """`target` if it is a path on this server (after a login, the browser goes there), else
    "/": never another site (`//evil.example`, `https://…`, a backslash some browsers read as
    a slash)."""
    if not target or not target.startswith("/") or target.startswith("//") or \
            "\\" in target or any(not c.isprintable() for c in target):
        return "/"
    return target
