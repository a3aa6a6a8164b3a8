"""URL rules of the trust boundary, written once: which URLs the service accepts and where a token may go.

The issuers file, a token's ``jku``, a hook's ``fhirServer`` and the SMART backend's token
endpoint are all checked here. A URL is acceptable configuration when it is absolute ``https``
(plain ``http`` only on a loopback host) with no credentials, query, fragment, backslash or dot
segment (literal or percent-encoded, which a server could resolve outside the allowed path). One
URL lies under another when scheme, host and port are equal and its path is at or below the other's
path at a ``/`` boundary.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

DOT_SEGMENT = re.compile(r"(?:\.|%2e){1,2}", re.IGNORECASE)
"""A path segment that is ``.`` or ``..``, also percent-encoded (``%2e``, ``.%2E``)."""

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}


def has_dot_segment(path: str) -> bool:
    """Whether a URL path has a ``.`` or ``..`` segment, also percent-encoded."""
    return any(DOT_SEGMENT.fullmatch(segment) for segment in path.split("/"))


def origin(parts: SplitResult) -> tuple[str, str | None, int]:
    """(scheme, host, port) of a split URL, the port defaulted; ValueError for a bad port."""
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme, 0)


def is_loopback_host(host: str) -> bool:
    """localhost, an address in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL on this machine (localhost, 127.0.0.0/8 or ::1)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in DEFAULT_PORTS or not host or parts.username or parts.password:
        return False
    return is_loopback_host(host)


def url_problem(value: str) -> str | None:
    """Why ``value`` is no acceptable configuration URL (module docstring), or ``None`` when it is."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return "is not an http(s) URL"
    if parts.username or parts.password:
        return "must not carry credentials"
    if parts.scheme != "https" and not is_loopback_host(parts.hostname):
        return "must use https (plain http only on a loopback host)"
    if parts.query or parts.fragment or "?" in value or "#" in value:
        return "must not carry a query or fragment"
    if has_dot_segment(parts.path) or "\\" in value:
        return "must not contain dot segments or backslashes"
    return None


def url_has_prefix(url: str, prefix: str) -> bool:
    """Whether ``url`` lies under ``prefix``: same scheme, host and port, path at or under its path.

    ``url`` must carry no credentials, query, fragment, backslash or dot segment.
    """
    try:
        u, p = urlsplit(url), urlsplit(prefix)
        if u.scheme not in DEFAULT_PORTS or not u.hostname or u.username or u.password:
            return False
        if u.query or u.fragment or "?" in url or "#" in url or "\\" in url or has_dot_segment(u.path):
            return False
        if origin(u) != origin(p):
            return False
    except ValueError:
        return False
    base = p.path if p.path.endswith("/") else p.path + "/"
    path = u.path if u.path.endswith("/") else u.path + "/"
    return path.startswith(base)
