"""A GET whose request line goes out exactly as written, for probing endpoints with paths an
HTTP client would normalise (dot segments, encoded slashes). Loopback only."""

from __future__ import annotations

import http.client
import ipaddress
import urllib.parse


def raw_get(base_url: str, path: str, token: str | None = None, *, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of `GET path` on `base_url` (http://<loopback address>:<port>), with a bearer
    `token` when given."""
    url = urllib.parse.urlsplit(base_url)
    host = url.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: never resolved here
        loopback = False
    if url.scheme != "http" or url.port is None or not loopback:
        raise ValueError(f"raw_get sends only to http://<loopback address>:<port>, not {base_url!r}")
    conn = http.client.HTTPConnection(host, url.port, timeout=timeout_s)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        if token is not None:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
