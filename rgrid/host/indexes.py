"""Where a worker host may fetch packages from, on whose behalf, and what a user may learn.

Requirements name package sources (``--index-url``, ``--extra-index-url``, ``--find-links``,
``name @ URL``); the worker host fetches them. So:

- only the host's own default index and the operator's allow-list (RGRID_ALLOWED_INDEXES)
  are fetched, and a host that resolves to a loopback, private, link-local or metadata
  address is refused unless the operator named it: no account can make the worker host probe
  its neighbours;
- whatever cannot be reached gives one message, whatever listens there (PostgreSQL, Redis and
  a closed port gave three different ones);
- an install that names a source of its own (a private index, credentials, a wheel folder)
  gets a uv cache of its account's own: uv keys its cache by URL without the credentials and
  honours the index's ``Cache-Control``, so in a shared cache another account naming the same
  index without a password got the private package with no request reaching the index;
- on a server, uv's lines that tell what had to be downloaded (and so what another account
  fetched before) never reach a user's log; credentials in URLs are masked wherever shown.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from rgrid.core.errors import BadInput

#: uv's default, when the host configures none.
PYPI = "https://pypi.org/simple"

_SOURCE_OPTIONS = ("--index-url", "--extra-index-url", "--find-links")
_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]*(?::[^/\s@]*)?@")
#: uv's progress lines whose presence or timing depends on what its cache already held.
_CACHE_REVEALING = ("Downloading ", "Downloaded ", "Prepared ", "Building ", "Built ")


def default_index_url(uv_env: dict[str, str]) -> str:
    """The index uv uses when requirements name none: the host's configuration, else PyPI."""
    value = uv_env.get("UV_DEFAULT_INDEX") or uv_env.get("UV_INDEX_URL") or PYPI
    return value.split()[0]


def redact(text: str) -> str:
    """``https://user:secret@host`` as ``https://****@host``."""
    return _CREDENTIALS.sub(r"\1****@", text)


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def source_urls(normalised: str) -> list[str]:
    """Every http(s) URL the requirements would make the worker host fetch."""
    urls = []
    for line in normalised.splitlines():
        flag, _, value = line.partition(" ")
        if flag in _SOURCE_OPTIONS and value.lower().startswith(("http://", "https://")):
            urls.append(value)
        elif not line.startswith("-") and " @ " in line:
            urls.append(line.split(" @ ", 1)[1].split(" ;", 1)[0].strip())
    return urls


def uses_own_sources(normalised: str, default_index: str) -> bool:
    """Whether the set names any package source other than the host's default index (or
    credentials): then it must not share uv's cache with other accounts."""
    for line in normalised.splitlines():
        flag, _, value = line.partition(" ")
        if flag == "--index-url" and _same_url(value, default_index) and "@" not in value:
            continue
        if flag in _SOURCE_OPTIONS or (not line.startswith("-") and " @ " in line):
            return True
    return False


def _refused(host: str) -> BadInput:
    # The same words for every refused host, port left out: the answer must not differ by
    # what listens where.
    return BadInput(
        f"package index {host} is not allowed on this server "
        "(the operator's RGRID_ALLOWED_INDEXES lists the allowed ones)"
    )


def unreachable(host: str) -> str:
    return f"package index {host} could not be reached"


def _public(addresses: list[str]) -> bool:
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            return False
    return bool(addresses)


def _addresses(host: str, port: int) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, port)})
    except (OSError, UnicodeError):
        return []


def check_sources(normalised: str, allowed: tuple[str, ...], default_index: str) -> None:
    """Refuse a set naming a package source this server does not fetch from (BadInput)."""
    default_host = (urlsplit(default_index).hostname or "").lower()
    for url in source_urls(normalised):
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            raise BadInput(f"package source {redact(url)!r} names no host")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise BadInput(f"package source {redact(url)!r} has a bad port") from None
        if host == default_host or host in allowed or f"{host}:{port}" in allowed:
            continue
        if "*" not in allowed:
            raise _refused(host)
        addresses = _addresses(host, port)
        if not addresses:
            raise BadInput(unreachable(host))
        if not _public(addresses):
            raise _refused(host)


def log_line(line: str) -> str | None:
    """One line of uv's progress as the user may see it, or None for the worker's own
    interpreter (it says nothing about the user's packages). Credentials masked."""
    if line.startswith("Using CPython"):
        return None
    return redact(line)


def without_downloads(sink: Callable[[str], None]) -> Callable[[str], None]:
    """A log sink for a server, where the uv cache is shared: uv's lines that tell what it had
    to download (so what other accounts had not fetched before) are dropped. Not for the
    embedded default, whose cache is its one user's."""

    def filtered(line: str) -> None:
        if not line.lstrip().startswith(_CACHE_REVEALING):
            sink(line)

    return filtered


_URL_IN_MESSAGE = re.compile(r"https?://[^\s)`'\"]+")


def failure_message(messages: list[str], returncode: int) -> str:
    """uv's failure as one line in the user's terms. A source that answered 401/403 is an
    authentication failure; one that could not be talked to at all (refused, closed, not
    HTTP, timed out) gets one message whatever listens there."""
    text = " ".join(messages)
    hosts = [urlsplit(u).hostname or "" for u in _URL_IN_MESSAGE.findall(text)]
    host = next((h for h in hosts if h), "a package index")
    auth = re.search(r"\((40[13]) (Unauthorized|Forbidden)\)", text)
    if auth:
        return (
            f"dependency install failed: package index {host} refused access "
            f"({auth.group(1)} {auth.group(2)}): give its credentials in the index URL"
        )
    if re.search(r"error sending request|tcp connect error|dns error|timed out|SendRequest", text):
        return f"dependency install failed: {unreachable(host)}"
    detail = " ".join(m.strip(" ×╰─▶│") for m in messages[-8:] if m.strip(" ×╰─▶│"))
    return f"dependency install failed: {redact(detail) or 'uv exited ' + str(returncode)}"
