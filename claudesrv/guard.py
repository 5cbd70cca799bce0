"""
The door in front of the API: Host check, CORS, bearer tokens, failed-auth throttling, body limits.

It runs before Klein routes a request, so a refused request reaches no route, creates nothing and
starts nothing. Every refusal is a JSON error like the API's own.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import _SystemdParser
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request

from claudesrv.errors import ApiError, error_body
from claudesrv.metrics import HttpMetrics, route_of

log = Logger()

UPLOAD_PATH = re.compile(rb"^/api/sessions/[^/]+/files/.")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}
OPEN_PATHS = {b"/healthz"}
AUTH_FAILURES_PER_MINUTE = 10
MAX_TRACKED_PEERS = 10000


def read_token_file(path: str) -> list[str]:
    """One token a line; blank lines and lines starting with '#' are ignored."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def env_tokens(environ: dict[str, str]) -> list[str]:
    return [t.strip() for t in environ.get("CLAUDESRV_AUTH_TOKENS", "").split(",") if t.strip()]


def is_loopback_listener(description: str) -> bool:
    """
    True only for a TCP endpoint bound to a loopback interface, or a systemd socket (socket activation) that
    is one: its address is read from the inherited socket. A wildcard, an external interface, TLS and unix
    sockets count as reachable from elsewhere.
    """
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].lower() if len(parts) > 1 else "tcp"
    if kind == "systemd":
        return _is_loopback(_inherited_address(parts[1:]))
    if kind not in ("tcp", "tcp6"):
        return False
    interface = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("interface=")), "")
    return _is_loopback(interface.replace("\\:", ":").strip("[]"))


def _is_loopback(host: str | None) -> bool:
    host = (host or "").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _inherited_address(arguments: list[str]) -> str | None:
    """
    The host a socket handed over by systemd listens on; None if there is none. The sockets are the ones
    Twisted's systemd endpoint will use: it reads (and removes) LISTEN_FDS and its kin when it is imported.
    """
    given = dict(a.split("=", 1) for a in arguments if "=" in a)
    inherited = _SystemdParser._sddaemon
    try:
        fd = inherited.inheritedDescriptors()[int(given["index"])] if "index" in given else \
            inherited.inheritedNamedDescriptors()[given["name"]]
        with socket.socket(fileno=os.dup(fd)) as listener:
            address = listener.getsockname()
    except (KeyError, ValueError, IndexError, OSError):
        return None
    return str(address[0]) if isinstance(address, tuple) else None


@dataclass
class Policy:
    """What the operator configured; tokens can be replaced at run time (SIGHUP)."""

    tokens: list[str] = field(default_factory=list)
    loopback_only: bool = True
    allowed_hosts: set[str] = field(default_factory=set)
    cors_origins: set[str] = field(default_factory=set)


class Guard(Resource):
    """Wraps the Klein resource; every request passes here first."""

    isLeaf = True

    def __init__(self, inner: Resource, policy: Policy, clock: IReactorTime,
                 metrics: HttpMetrics | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.metrics = metrics
        self.policy = policy
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}

    def render(self, request: IRequest) -> Any:
        if self.metrics is not None:
            started = self.clock.seconds()
            metrics = self.metrics
            request.notifyFinish().addBoth(lambda _: metrics.observe(  # type: ignore[attr-defined]
                route_of(request.path), request.code, self.clock.seconds() - started))  # type: ignore[attr-defined]
        refusal = self._check(request)
        if refusal is not None:
            return refusal
        postpath = getattr(request, "postpath", None)
        if postpath and len(postpath) > 1 and postpath[-1] == b"":  # /api/sessions/ is /api/sessions
            request.postpath = postpath[:-1]
        return self.inner.render(request)

    def _check(self, request: IRequest) -> bytes | None:
        policy = self.policy
        host = _host_name(request.getHeader(b"host") or b"")
        if policy.loopback_only and host not in LOOPBACK_HOSTS and host not in policy.allowed_hosts:
            return _refuse(request, 403, "host_not_allowed",
                           "this server only answers requests for localhost; add --allowed-host to allow others")
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        allowed_origin = origin and (origin in policy.cors_origins or "*" in policy.cors_origins)
        if allowed_origin:
            request.setHeader(b"Access-Control-Allow-Origin",
                              b"*" if "*" in policy.cors_origins and origin not in policy.cors_origins
                              else origin.encode("latin-1"))
            request.setHeader(b"Vary", b"Origin")
        if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
            if not allowed_origin:
                return _refuse(request, 403, "origin_not_allowed",
                               "this origin may not call the API (see --cors-origin)")
            request.setResponseCode(204)
            request.setHeader(b"Access-Control-Allow-Methods", b"GET, POST, PUT, DELETE, OPTIONS")
            request.setHeader(b"Access-Control-Allow-Headers", b"Authorization, Content-Type")
            request.setHeader(b"Access-Control-Max-Age", b"600")
            return b""
        if policy.tokens and request.path not in OPEN_PATHS:
            refusal = self._authenticate(request)
            if refusal is not None:
                return refusal
        if isinstance(request, LimitedRequest) and request.body_too_large:
            return error_body(request, too_large(request.max_body))
        if request.method == b"POST":
            ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return _refuse(request, 415, "unsupported_media_type",
                               "send the body as Content-Type: application/json")
        return None

    def _authenticate(self, request: IRequest) -> bytes | None:
        """
        A valid token always passes. Failures are counted per address: past 10 in a minute, further
        attempts without a valid token get 429, so guessing is slow while real clients are not locked out.
        """
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and _token_matches(presented.strip(), self.policy.tokens):
            return None
        peer = getattr(request.getClientAddress(), "host", "?")
        now = self.clock.seconds()
        recent = self.failures.get(peer)
        if recent is None:
            if len(self.failures) >= MAX_TRACKED_PEERS:
                self._forget_old(now)
            recent = self.failures[peer] = deque()
        while recent and recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= AUTH_FAILURES_PER_MINUTE:
            request.setHeader(b"Retry-After", b"60")
            return _refuse(request, 429, "too_many_auth_failures", "too many failed authentications; wait a minute")
        recent.append(now)
        log.info("authentication failed from {peer}", peer=peer)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="claudesrv"')
        return _refuse(request, 401, "unauthorized", "send Authorization: Bearer <token>")

    def _forget_old(self, now: float) -> None:
        for peer in [p for p, times in self.failures.items() if not times or times[-1] < now - 60]:
            del self.failures[peer]
        while len(self.failures) >= MAX_TRACKED_PEERS:
            del self.failures[next(iter(self.failures))]


def _token_matches(presented: str, tokens: Iterable[str]) -> bool:
    """Constant time in the token's content: every configured token is compared."""
    presented_bytes = presented.encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented_bytes, token.encode())
    return matched and bool(presented)


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[: text.find("]") + 1] if "]" in text else text
    return text.rsplit(":", 1)[0] if ":" in text else text


def _refuse(request: IRequest, status: int, code: str, message: str) -> bytes:
    return error_body(request, ApiError(status, code, message))


def too_large(max_body: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body is larger than {max_body} bytes")


class LimitedRequest(Request):
    """A request that stops keeping its body once it passes C{max_body} bytes (chunked uploads)."""

    max_body = 2 << 20
    body_too_large = False
    refused_early = False
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self.refused_early:
            super().process()


def request_factory(max_body: int) -> type[LimitedRequest]:
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})


def _refuse_connection(transport: Any, status: bytes, error: ApiError) -> None:
    """An answer to a connection we will not serve, written whole, then the connection closed."""
    body = json.dumps(error.as_json()).encode()
    transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    transport.loseConnection()


class LimitedChannel(HTTPChannel):
    """
    An HTTP connection with limits Twisted's own do not give: 413 as soon as the headers declare a body over
    the limit, without reading it; a total deadline for a request's line and headers (the idle timeout starts
    again at every byte, so a client sending a byte every few seconds would never be cut); and at most
    C{max_per_address} open connections per client address. Requests being answered (SSE streams) are not
    affected by the deadline. The limits are the site's (set by the daemon), else these defaults.
    """

    header_timeout = 30.0
    max_per_address = 64
    max_upload = 100 << 20
    _deadline: Any = None
    _awaiting_headers = True
    _counted: str | None = None

    def _site_setting(self, name: str) -> Any:
        return getattr(getattr(self, "site", None), name, getattr(self, name))

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        host = getattr(self.transport.getPeer(), "host", None)
        site = getattr(self, "site", None)
        if host is not None and site is not None:
            counts = site.__dict__.setdefault("connections_per_address", {})
            limit = self._site_setting("max_per_address")
            if limit and counts.get(host, 0) >= limit:
                log.info("refused a connection from {peer}: {n} are open", peer=host, n=counts[host])
                _refuse_connection(self.transport, b"429 Too Many Requests", ApiError(
                    429, "too_many_connections", f"at most {limit} connections from one address "
                                                 "(--max-connections-per-ip)"))
                return
            counts[host] = counts.get(host, 0) + 1
            self._counted = host

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_headers and self._deadline is None and data:
            timeout = self._site_setting("header_timeout")
            if timeout:
                self._deadline = self.callLater(timeout, self._too_slow)
        super().dataReceived(data)

    def _too_slow(self) -> None:
        self._deadline = None
        if self._awaiting_headers and self.transport is not None:
            log.info("closed a connection that sent no complete request headers in {s:g} s",
                     s=self._site_setting("header_timeout"))
            _refuse_connection(self.transport, b"408 Request Timeout", ApiError(
                408, "request_timeout", "the request line and headers took too long (--header-timeout)"))

    def _headers_done(self) -> None:
        self._awaiting_headers = False
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._awaiting_headers = True  # the next request's deadline starts with its first byte

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._headers_done()
        if self._counted is not None:
            counts = getattr(self, "site", None).__dict__.get("connections_per_address", {})
            counts[self._counted] -= 1
            if counts[self._counted] <= 0:
                del counts[self._counted]
            self._counted = None
        super().connectionLost(reason)

    def allHeadersReceived(self) -> None:
        self._headers_done()
        request = self.requests[-1]
        upload = self._site_setting("max_upload")
        command, path = getattr(self, "_command", b""), getattr(self, "_path", b"")
        if upload and command == b"PUT" and UPLOAD_PATH.match(path.split(b"?")[0]):
            request.max_body = upload  # a file's body, not a JSON request: its own limit (--max-upload)
        max_body = getattr(request, "max_body", None)
        if max_body is not None and self.length is not None and self.length > max_body:
            request.refused_early = True
            body = json.dumps(too_large(max_body).as_json()).encode()
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.loseConnection()
            return
        super().allHeadersReceived()
