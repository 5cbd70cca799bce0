"""
Server-Sent Events: the headers, and the sink that feeds one HTTP client the frames of a session's log.

The log stores each event already framed (``id: <seq>\\ndata: <line>\\n\\n``), so the sink only copies
bytes: live ones as they are appended, and from disk whatever the client could not take at once. A slow
client therefore never holds the CLI back and never grows the server's memory; it reads the log at its
own pace.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from zope.interface import implementer

from claudesrv.eventlog import EventLog
from claudesrv.timers import Timers

KEEPALIVE = b": keepalive\n\n"
CHUNK = 1 << 20

HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"Connection", b"keep-alive"),
    (b"X-Accel-Buffering", b"no"),
)


class Client(Protocol):
    """The Twisted request, seen only through what a stream needs."""

    def setResponseCode(self, code: int) -> None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


def start(request: Client) -> None:
    """Send status 200 and the SSE headers now, before any event exists."""
    request.setResponseCode(200)
    for name, value in HEADERS:
        request.setHeader(name, value)
    request.write(b"")


def event(payload: dict[str, Any]) -> bytes:
    """One frame of our own that is not in the log (no ``id:``: it is this client's alone)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@implementer(IPushProducer)
class SseSink:
    """
    One client's view of a log from C{position} on. It ends when C{until()} gives an offset it has reached
    (the end of a turn), when the log is closed, or when the client goes: L{done} fires (or is cancelled by
    Klein when the client leaves, and C{on_gone} is told why).
    """

    def __init__(self, request: Client, log: EventLog, position: int, clock: IReactorTime,
                 until: Callable[[], int | None], keepalive: float = 15.0, stall_limit: float = 0.0,
                 on_gone: Callable[[str], None] = lambda why: None) -> None:
        self.request = request
        self.log = log
        self.position = position
        self.clock = clock
        self.until = until
        self.keepalive = keepalive
        self.stall_limit = stall_limit
        self.on_gone = on_gone
        self.done: Deferred[bytes] = Deferred(self._cancelled)
        self.written = 0
        self.finished = False
        self.paused = False
        self.timers = Timers(clock)
        self.last_write = clock.seconds()

    def open(self, first: bytes = b"") -> None:
        """Start: C{first} (our own frames, such as a gap notice), then the log."""
        self.request.registerProducer(self, True)
        self.log.follow(self)
        if first:
            self._write(first)
        self.timers.set_if("keepalive", self.keepalive, self._keepalive)
        self._catch_up()

    # ---------------------------------------------------------------- the log's side

    def log_grew(self, data: bytes, start: int) -> None:
        if self.finished or self.paused or start != self.position:
            return  # behind: the rest comes from disk when the client can take it
        limit = self.until()
        if limit is not None and start + len(data) > limit:
            data = data[:max(limit - start, 0)]
        self.position += len(data)
        self._write(data)
        self._check_end()

    def turn_ended(self) -> None:
        self._check_end()

    def log_closed(self, why: str) -> None:
        if self.finished:
            return
        if why == "deleted":
            self._write(event({"type": "claudesrv", "subtype": "deleted", "message": "the session was deleted"}))
        elif why == "server_shutdown":
            self._write(event({"type": "claudesrv", "subtype": "server_shutdown",
                               "message": "the server is shutting down; reattach with Last-Event-ID"}))
        self._finish()

    # ---------------------------------------------------------------- the client's side (IPushProducer)

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.timers.set_if("stall", self.stall_limit, self._stalled)

    def resumeProducing(self) -> None:
        self.paused = False
        self.timers.cancel("stall")
        self._catch_up()

    def stopProducing(self) -> None:
        self._gone("disconnected")

    def _catch_up(self) -> None:
        """Send from disk what the client has not had, while it can take it."""
        while not self.finished and not self.paused:
            limit = self.until()
            end = self.log.end if limit is None else min(limit, self.log.end)
            if self.position >= end:
                break
            data = self.log.read(self.position, min(CHUNK, end - self.position))
            if not data:
                break
            self.position += len(data)
            self._write(data)
        self._check_end()

    def _check_end(self) -> None:
        limit = self.until()
        if not self.finished and limit is not None and self.position >= limit:
            self._finish()

    def _write(self, data: bytes) -> None:
        self.last_write = self.clock.seconds()
        self.written += len(data)
        self.request.write(data)

    def _keepalive(self) -> None:
        if self.finished:
            return
        silent = self.clock.seconds() - self.last_write
        if silent >= self.keepalive:
            if not self.paused:  # a paused client has unread bytes already
                self._write(KEEPALIVE)
            silent = 0
        self.timers.set("keepalive", self.keepalive - silent, self._keepalive)

    def _stalled(self) -> None:
        """A client that read nothing for the stall limit: its connection is dropped."""
        self._gone("stalled")
        transport = getattr(self.request, "transport", None)
        if transport is not None:
            transport.abortConnection()  # Klein then cancels L{done}

    # ---------------------------------------------------------------- the end

    def _release(self) -> None:
        self.finished = True
        self.timers.cancel()
        self.log.unfollow(self)

    def _finish(self) -> None:
        if self.finished:
            return
        self._release()
        self.request.unregisterProducer()
        self.done.callback(b"")

    def _gone(self, why: str) -> None:
        """The connection is gone (or going): nothing more is written, and nothing is unregistered."""
        if not self.finished:
            self._release()
            self.on_gone(why)

    def _cancelled(self, _: object) -> None:
        """Klein cancels the route's Deferred when the client goes away."""
        self._gone("disconnected")
