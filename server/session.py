"""The web page's session cookie: an HMAC of its issue time under the API key, so a browser can load images.

A page cannot put ``Authorization: Bearer KEY`` on ``<img src>`` requests. ``POST /api/login`` with the key
sets an HttpOnly, SameSite=Strict cookie that :class:`~dsocr_server.guard.Guard` accepts in place of the
header. The token holds no secret (the key never leaves the server) and dies when the key changes.
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE = "dsocr_session"
MAX_AGE = 7 * 24 * 3600  # seconds a login lasts


def _mac(key: str, issued: int) -> str:
    return hmac.new(key.encode(), f"dsocr-session-v1.{issued}".encode(), hashlib.sha256).hexdigest()


def make_token(key: str, now: float | None = None) -> str:
    """A session token for ``key``, issued now."""
    issued = int(time.time() if now is None else now)
    return f"v1.{issued}.{_mac(key, issued)}"


def valid_token(token: str, key: str, now: float | None = None) -> bool:
    """Whether ``token`` was made with ``key`` less than :data:`MAX_AGE` seconds ago (compared in constant time)."""
    version, _, rest = token.partition(".")
    issued_text, _, mac = rest.partition(".")
    if version != "v1" or not issued_text.isascii() or not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    age = (time.time() if now is None else now) - issued
    return 0 <= age < MAX_AGE and hmac.compare_digest(mac.encode(), _mac(key, issued).encode())


def cookie_token(header: str) -> str:
    """The session token in a ``Cookie`` header ("" when there is none)."""
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value.strip()
    return ""


def set_cookie_header(token: str, secure: bool = False) -> str:
    """The ``Set-Cookie`` value for ``token`` (an empty token with max-age 0 logs out)."""
    age = MAX_AGE if token else 0
    return f"{COOKIE}={token}; Max-Age={age}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
