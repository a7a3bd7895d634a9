"""Checks on the URLs users give the agent (model sources, output URLs). Pure: no I/O.

A URL that passes the CRD's pattern can still be unusable: an IDNA label that does not
encode, a port out of range, user info, an empty host. Every such problem is found here,
before anything is downloaded or generated, and reported as a `URLError` whose message
names the problem but never the query string (a presigned URL's signature).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

import httpx

__all__ = ["URLError", "ascii_host", "host_allowed", "parse_http_url", "redact_url"]

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class URLError(ValueError):
    """The URL cannot be used; the message says why, without the query string."""


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: no user info, no query (it may hold a signature), no fragment."""
    try:
        parsed = httpx.URL(url)
        port = f":{parsed.port}" if parsed.port else ""
        return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"
    except (httpx.InvalidURL, TypeError, ValueError):
        parts = urllib.parse.urlsplit(str(url)) if isinstance(url, str) else None
        if parts is None or not parts.scheme:
            return "<invalid url>"
        host = (parts.netloc.rpartition("@")[2] or "")[:253]
        return f"{parts.scheme}://{host}{parts.path[:200]}"


def ascii_host(url: httpx.URL) -> str:
    """The URL's host as sent on the wire (IDNA-encoded, lower case): the form allowlists compare."""
    return url.raw_host.decode("ascii", "replace").lower()


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether `host` is one of `allowed` (exact, or `.example.com` for the domain and its subdomains)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and (host.endswith(entry) or host == entry[1:]):
            return True
        if host == entry:
            return True
    return False


def parse_http_url(url: str, *, what: str = "URL") -> httpx.URL:
    """Parse an http(s) URL and check that a request to it can be made; raises `URLError`.

    Scheme and host allowlists are the caller's business: this checks only that the URL is
    well formed (host name or IP literal, port 1-65535, no user info, no whitespace)."""
    if not isinstance(url, str) or not url:
        raise URLError(f"{what} is empty")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise URLError(f"{what} {redact_url(url)} contains whitespace or control characters")
    try:
        parsed = httpx.URL(url)
        parsed.host  # noqa: B018 - decodes IDNA labels, which fails for invalid ones
    except (httpx.InvalidURL, TypeError, ValueError) as exc:  # IDNA errors are ValueErrors
        raise URLError(f"{what} {redact_url(url)} is not a valid URL ({_short(exc)})") from None
    shown = redact_url(url)
    if parsed.scheme not in ("http", "https"):
        raise URLError(f"{what} {shown} must use https (or http where allowed), not {parsed.scheme or 'no scheme'}")
    if parsed.userinfo:
        raise URLError(f"{what} {shown} carries a user name or password; put credentials in a Secret instead")
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise URLError(f"{what} {shown} has port {port}, outside 1-65535")
    host = ascii_host(parsed)
    if not host:
        raise URLError(f"{what} {shown} has no host")
    if not _is_ip(host) and not _is_hostname(host):
        raise URLError(f"{what} {shown} has an invalid host name {host[:100]!r}")
    return parsed


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_hostname(host: str) -> bool:
    name = host.rstrip(".")
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _short(exc: BaseException) -> str:
    # idna and httpx quote the offending part of the host; never more than that
    return str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
