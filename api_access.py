"""Who may use the API: the Host check, the access token and the origin policy (README, Security).

- A request whose `Host` is not a name of this server is refused first (DNS rebinding).
- A request from a web page (it carries `Origin`, or `Sec-Fetch-Site` says another site sent it) is
  trusted without a token only when it comes from the API's own origin (the `/ui` page) or from an
  origin listed in CORS_ORIGINS; every other page must send `Authorization: Bearer <token>`.
- A request from a program (no `Origin`, no cross-site `Sec-Fetch-Site`: curl, scripts,
  `embed_images.py`) needs the token only when API_TOKEN is set.
- With API_TOKEN unset, the token is a random one made on first start and kept in the database
  folder (`api_token`, mode 0600), so that a page opened from disk can be connected once.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from flask import Request, Response

TOKEN_FILE_NAME = "api_token"
LOCAL_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
CROSS_SITE_FETCHES = frozenset({"cross-site", "same-site"})
ALLOWED_HEADERS = "Authorization, Content-Type, If-None-Match"
EXPOSED_HEADERS = "ETag, Retry-After"
PREFLIGHT_MAX_AGE = "600"


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The names this server answers to: local names, the bound address and ALLOWED_HOSTS."""

    bound_address: str
    allowed: frozenset[str]

    @classmethod
    def from_settings(cls, api_host: str, allowed_hosts: list[str]) -> HostPolicy:
        return cls(api_host.strip().lower().strip("[]"), frozenset(name.lower() for name in allowed_hosts))

    def allows(self, host_header: str) -> bool:
        if "*" in self.allowed:
            return True
        name = host_name(host_header)
        if not name:
            return False
        if name in LOCAL_HOST_NAMES or name == self.bound_address or name in self.allowed:
            return True
        # Bound to every interface, any address of this machine is "the bound address"; an IP
        # literal cannot be rebound, so only host names need to be listed.
        return self.bound_address in WILDCARD_ADDRESSES and is_ip_address(name)


def load_or_create_token(folder: Path) -> str:
    """The token kept in `folder`/api_token, made (random, mode 0600) when the file does not exist."""
    path = folder / TOKEN_FILE_NAME
    folder.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text(encoding="utf-8").strip()
        if token:
            os.chmod(path, 0o600)
            return token
        path.unlink()
        return load_or_create_token(folder)
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(token + "\n")
    return token


def token_matches(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def own_origins(request: Request) -> tuple[str, str]:
    return f"http://{request.host}".lower(), f"https://{request.host}".lower()


def foreign_origin(request: Request) -> str | None:
    """The origin of the web page that sent this request when it is not the API's own, else None.

    A request without `Origin` is a program's, a navigation or an embed; an embed from another site
    is told apart by `Sec-Fetch-Site`, which browsers send and scripts cannot forge.
    """
    origin = request.headers.get("Origin")
    if origin is not None:
        return None if origin.lower() in own_origins(request) else origin
    if request.headers.get("Sec-Fetch-Site", "").lower() in CROSS_SITE_FETCHES:
        return "another site"
    return None


def cors_origin_patterns(origins: list[str]) -> list[str | re.Pattern[str]]:
    """Trusted origins; one given without a port also trusts every port of that host."""
    patterns: list[str | re.Pattern[str]] = []
    for origin in origins:
        if origin == "*":
            patterns.append("*")
        elif re.search(r":\d+$", origin) or origin == "null":
            patterns.append(re.compile(re.escape(origin) + "$", re.IGNORECASE))
        else:
            patterns.append(re.compile(re.escape(origin) + r"(:\d+)?$", re.IGNORECASE))
    return patterns


@dataclass(frozen=True)
class AccessPolicy:
    """The token and the origins trusted without it (CORS_ORIGINS, none by default)."""

    token: str
    token_is_set: bool
    trusted_origins: tuple[str | re.Pattern[str], ...]

    def is_trusted(self, origin: str) -> bool:
        return any(
            pattern == "*" or (isinstance(pattern, re.Pattern) and pattern.match(origin))
            for pattern in self.trusted_origins
        )

    def needs_token(self, request: Request) -> bool:
        """Whether this request must carry the token to be answered."""
        if self.token_is_set:
            return True
        origin = foreign_origin(request)
        return origin is not None and not self.is_trusted(origin)

    def authorised(self, request: Request) -> bool:
        return not self.needs_token(request) or token_matches(
            request.headers.get("Authorization", ""), self.token
        )

    def refusal(self, request: Request) -> str:
        if request.headers.get("Authorization"):
            return "wrong token: send Authorization: Bearer <token>"
        origin = foreign_origin(request)
        if origin is not None and not self.token_is_set:
            return (
                f"a web page from {origin} needs the access token: send Authorization: Bearer <token> "
                "(the token is printed when the server starts; see README, Security)"
            )
        return "missing or wrong token: send Authorization: Bearer <API_TOKEN>"

    def add_cors_headers(self, request: Request, response: Response) -> None:
        """Let a page of another origin read an answer only when its request was authorised.

        A preflight and the refusal itself are readable too: they tell the page that a token is
        needed, and nothing else.
        """
        origin = request.headers.get("Origin")
        response.vary.add("Origin")
        if origin is None:
            return
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        if not (preflight or response.status_code == 401 or self.authorised(request)):
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        if preflight:
            response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        else:
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
