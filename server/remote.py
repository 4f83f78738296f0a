"""Untrusted image input for the server: ``data:`` URLs and an SSRF-safe http(s) fetcher.

Nothing here reads a local path: requests name images by content or by a public URL only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit


def decode_data_url(url: str) -> tuple[str, bytes]:
    """``data:image/png;base64,...`` -> ``("image/png", bytes)``; only base64 data URLs are accepted."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError("a data URL must look like data:<type>;base64,<data>")
    try:
        return head[5:-7], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data URL is not valid base64") from None


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IP literals resolve to themselves, with no DNS query)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ValueError(f"cannot resolve {host!r}") from None
    return [info[4][0] for info in infos]


_EMBEDDING_IPV4 = (
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated): ::a.b.c.d
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated: ::ffff:0:a.b.c.d
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, well-known prefix
)
# NAT64 for local use: a local translator may map any of it anywhere, so none of it is public.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, shared, multicast, reserved, unspecified and site-local
    addresses, and for IPv6 addresses that carry a non-public IPv4 address (mapped, compatible,
    translated, NAT64, 6to4) or hide one (Teredo)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        if ip.is_site_local or ip.teredo is not None or ip in _LOCAL_NAT64:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _EMBEDDING_IPV4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)  # the last 32 bits
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not ip.is_multicast


def normalise_host(host: str) -> str:
    """The ASCII form of a host name (IDNA, as the resolver sees it: "①②⑦.⓪.⓪.①" is 127.0.0.1)."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("the image URL's host is not a valid host name") from None


class _Expiring:
    """A connection that a watchdog can end at any moment: before its socket exists (it then refuses to
    connect), during the TLS handshake, or while reading."""

    raw: socket.socket | None = None
    expired = False

    def expire(self) -> None:
        self.expired = True
        if self.raw is not None:
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_RDWR)

    def _open(self, address: str, port: int, timeout: float) -> socket.socket:
        if self.expired:
            raise TimeoutError("the fetch's deadline passed")
        self.raw = socket.create_connection((address, port), timeout)
        if self.expired:  # the watchdog fired while connecting
            self.raw.close()
            raise TimeoutError("the fetch's deadline passed")
        return self.raw


class _PinnedHTTPConnection(_Expiring, http.client.HTTPConnection):
    """Connects to an address checked beforehand, so a second DNS answer cannot redirect it (DNS rebinding)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self._open(self.address, self.port, self.timeout)


class _PinnedHTTPSConnection(_Expiring, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = self._open(self.address, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # certificate checked for the name


def _resolve_before(deadline: float, resolve: Callable[[str, int], list[str]], host: str, port: int) -> list[str]:
    """``resolve(host, port)``, given up at the deadline (a name server can be as slow as its owner likes)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["addresses"] = resolve(host, port)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="dsocr-resolve")
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise TimeoutError("resolving the host took past the fetch's deadline")
    if "error" in box:
        raise box["error"]
    return box["addresses"]


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 10.0,
    max_redirects: int = 3,
    resolve: Callable[[str, int], list[str]] | None = None,
    allowed: Callable[[str], bool] | None = None,
) -> bytes:
    """GET a public http(s) URL with size and time limits, checking every hop against SSRF.

    Each hop's host is resolved once (``resolve``, by default :func:`resolve_host`); every address must
    pass ``allowed`` (by default :func:`is_public_address`), and the connection goes to that checked
    address. Redirects are followed up to ``max_redirects``, each re-checked the same way.

    Raises:
        ValueError: a refused scheme or address, a bad status, too many redirects, a body over
            ``max_bytes`` or a fetch slower than ``timeout`` seconds in all.
    """
    resolve, allowed = resolve or resolve_host, allowed or is_public_address  # looked up now, so tests can patch
    deadline = time.monotonic() + timeout
    for _ in range(max_redirects + 1):
        if time.monotonic() >= deadline:
            raise ValueError(f"fetching the image URL took longer than {timeout:g}s")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("image URLs must be data:, http: or https: URLs")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError("the image URL has an invalid port") from None
        host = normalise_host(parts.hostname)
        try:
            addresses = _resolve_before(deadline, resolve, host, port)
        except TimeoutError:
            raise ValueError(f"fetching the image URL took longer than {timeout:g}s") from None
        if not addresses or not all(allowed(a) for a in addresses):
            raise ValueError(f"the image URL's host {host!r} resolves to a private or local address")
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = cls(host, port, addresses[0], timeout=max(0.1, deadline - time.monotonic()))
        # Socket timeouts bound each read, not the fetch: a server dripping a byte at a time would hold it
        # for ever. At the deadline the socket is shut down, which ends any read in progress.
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), conn.expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~") + (
                f"?{quote(parts.query, safe='/%:@!$&()*+,;=-._~?')}" if parts.query else ""
            )
            conn.request("GET", path, headers={"User-Agent": "dsocr-mlx", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ValueError(f"fetching the image URL gave HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"the image at the URL is larger than {max_bytes} bytes")
            body = bytearray()
            while chunk := response.read1(65536):
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(f"the image at the URL is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    break
            if time.monotonic() > deadline:
                raise ValueError(f"fetching the image URL took longer than {timeout:g}s")
            return bytes(body)
        except (OSError, http.client.HTTPException, ValueError) as e:
            if time.monotonic() >= deadline:
                raise ValueError(f"fetching the image URL took longer than {timeout:g}s") from None
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"cannot fetch the image URL ({type(e).__name__})") from None
        finally:
            watchdog.cancel()
            conn.close()
    raise ValueError(f"the image URL redirects more than {max_redirects} times")
