"""The outermost layer of the server: API key, body limit, access log, and errors in OpenAI's shape."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from .protocol import APIError
from .session import cookie_token, valid_token
from .worker import JobCancelled, JobTimeout, ModelLoadError, QueueFull, ServerStopping

logger = logging.getLogger("dsocr_server")
access_log = logging.getLogger("dsocr_server.access")


class BodyTooLarge(Exception):
    pass


def as_api_error(e: BaseException) -> APIError:
    """Map library and worker exceptions to HTTP errors; anything unexpected stays a generic 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, JobTimeout):
        return APIError(504, "the request took longer than the server's request_timeout", "timeout_error", "timeout")
    if isinstance(e, ServerStopping):
        return APIError(503, str(e), "server_error", "shutting_down", headers={"Retry-After": "10"})
    if isinstance(e, ModelLoadError):
        return APIError(503, str(e), "server_error", "model_unavailable")
    if isinstance(e, JobCancelled):
        return APIError(499, "the client closed the request", code="client_closed")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, "internal server error", "server_error")


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name in a Host header, without the port (``[::1]:8000`` -> ``::1``), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(names: list[str]) -> frozenset[str] | None:
    """The host names the server answers besides IP addresses (which DNS rebinding cannot use): the
    loopback names plus ``names``. None (``"*"`` in ``names``) means any."""
    if "*" in names:
        return None
    return LOOPBACK_NAMES | {n.lower() for n in names}


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` names this server as the ``Host`` header does."""
    return urlsplit(origin).netloc.lower() == host.strip().lower()


def check_api_key(key: str) -> None:
    """Refuse a key that clients cannot send: HTTP headers carry printable ASCII only."""
    if key and not (key.isascii() and key.isprintable() and " " not in key):
        raise ValueError("the API key must be printable ASCII with no spaces (HTTP headers cannot carry others)")


# What a browser may load without a key: the web page's shell (it asks for the key), and the login itself.
PUBLIC_PATHS = frozenset({"/health", "/", "/api/login", "/favicon.ico"})
PUBLIC_PREFIX = "/static/"
# On every response: no inline script, nothing loaded from elsewhere (even past a sanitiser bug), no framing.
# Inline style attributes only: KaTeX positions its glyphs with them (model HTML never keeps one).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; style-src-elem 'self'; "
    "style-src-attr 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """Outermost checks: API key (constant-time, or the web page's session cookie), body size, security
    headers, one access-log line, and no traceback out."""

    def __init__(
        self,
        app: Any,
        api_key: str,
        max_body: int,
        allowed_hosts: frozenset[str] | None = None,
        cors_origins: list[str] | tuple[str, ...] = (),
    ):
        self.app, self.api_key, self.max_body, self.allowed_hosts = app, api_key, max_body, allowed_hosts
        self.cors_origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, received = time.perf_counter(), [0], [0]

        async def send_logged(message: dict) -> None:
            status[0] = message.get("status", status[0])
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        async def receive_limited() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body:
                raise BodyTooLarge()
            return message

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme, _, key = headers.get("authorization", "").partition(" ")
        try:
            name = host_name(headers.get("host", ""))
            if self.allowed_hosts is not None and name not in self.allowed_hosts and not is_ip(name):
                # A page elsewhere whose name was re-pointed at this machine (DNS rebinding) sends its own name.
                raise APIError(
                    403,
                    f"this server does not answer to the host name {name[:60]!r}; add it to [server] allowed_hosts",
                    code="host_not_allowed",
                )
            origin = headers.get("origin", "")
            if (
                scope["method"] not in ("GET", "HEAD", "OPTIONS")
                and origin
                and not same_origin(origin, headers.get("host", ""))
                and origin.rstrip("/").lower() not in self.cors_origins
            ):
                # A page on another site can post a form here without asking first; the browser says so.
                raise APIError(403, "cross-site requests are refused; add the site to cors_origins", code="cross_site")
            if (
                self.api_key
                and scope["path"] not in PUBLIC_PATHS
                and not scope["path"].startswith(PUBLIC_PREFIX)
                and not (scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), self.api_key.encode()))
                and not valid_token(cookie_token(headers.get("cookie", "")), self.api_key)
            ):
                raise APIError(
                    401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key"
                )
            if int(headers.get("content-length") or 0) > self.max_body:
                raise BodyTooLarge()
            await self.app(scope, receive_limited, send_logged)
        except Exception as e:  # noqa: BLE001 - the last line of defence: log it, answer in OpenAI's shape
            error = as_api_error(
                APIError(413, f"the request body is larger than {self.max_body} bytes", code="body_too_large")
                if isinstance(e, BodyTooLarge)
                else e
            )
            if error.status == 500:
                logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not status[0]:
                # Read (and drop) a bounded rest of the body first: a client still sending would get a reset.
                drained, more = 0, error.status in (401, 413)
                while more and drained <= self.max_body:
                    message = await receive()
                    drained, more = drained + len(message.get("body", b"")), message.get("more_body", False)
                await error_response(error, scope["path"])(scope, receive, send_logged)
        finally:
            access_log.info(
                '%s "%s %s" %d %.0fms tokens=%s',
                (scope.get("client") or ("-",))[0],
                scope["method"],
                scope["path"],
                status[0],
                1000 * (time.perf_counter() - start),
                scope.get("state", {}).get("tokens", "-"),
            )


# Ollama's routes answer errors in Ollama's shape, {"error": "message"}.
OLLAMA_ROUTES = frozenset({"/api/tags", "/api/chat", "/api/generate", "/api/show", "/api/ps", "/api/version"})


def error_response(e: APIError, path: str = "") -> JSONResponse:
    if path in OLLAMA_ROUTES:
        body = {"error": e.message}
    elif path.startswith("/api/"):  # the web page's REST API answers as FastAPI does, {"detail": "..."}
        body = {"detail": e.message, "code": e.code}
    else:
        body = e.body()
    return JSONResponse(body, e.status, headers=e.headers)
