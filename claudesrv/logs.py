"""
What the daemon's log looks like: JSON Lines for machines, and one access line per HTTP request.

``claudesrv --log-format json`` (or ``twistd --logger claudesrv.logs.json_stdout claudesrv``) writes each log
event as one plain JSON object per line (JSON Lines: ``json.loads`` reads each line, no record separators),
with ``time`` (ISO 8601, UTC), ``level``, ``event`` (where it comes from, e.g. ``claudesrv.access``),
``message`` (the text a person reads) and the event's own fields.

Twisted's access log writes the whole request URI, so a query string such as ``?token=...`` would end up in
the log; here each request gets one line of our own, with its path only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, Logger, formatEvent
from twisted.web.server import Request, Site

access_log = Logger(namespace="claudesrv.access")

# fields of Twisted's legacy log events (twisted.python.log) that the JSON line says in its own words
_LEGACY_FIELDS = frozenset({"message", "format", "isError", "system", "time", "failure", "why"})


def json_stdout() -> ILogObserver:
    """The observer for ``twistd --logger claudesrv.logs.json_stdout``: JSON Lines on stdout."""
    return json_lines(sys.stdout)


def json_lines(out: IO[str]) -> ILogObserver:
    return FileLogObserver(out, event_as_json)


def event_as_json(event: LogEvent) -> str:
    """
    One log event as one line of JSON: time, level, event and message first, then every field of the event
    that JSON can hold (Twisted's own ``log_*`` bookkeeping aside). A failure adds ``error`` and ``traceback``.
    """
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": iso_time(event.get("log_time")),
        "level": getattr(level, "name", "info"),
        "event": event_name(event),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        line["traceback"] = failure.getTraceback()
    legacy = event.get("log_namespace") == "log_legacy"
    for key, value in event.items():
        if key.startswith("log_") or key in line or (legacy and key in _LEGACY_FIELDS):
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        line[key] = value
    return json.dumps(line, allow_nan=False) + "\n"


def iso_time(timestamp: float | None) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2026-12-02T04:10:00.123Z."""
    when = datetime.fromtimestamp(timestamp if timestamp is not None else 0, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_name(event: LogEvent) -> str:
    namespace = event.get("log_namespace") or "-"
    if namespace == "log_legacy":  # twisted.python.log: the Twisted code that logged it says where, if anything
        system = event.get("log_system")
        return system if system and system != "-" else "twisted"
    return str(namespace)


_NO_METHOD = Request.method  # what a request's method is until its request line is read


class AccessLoggedRequest(Request):
    """
    A request that logs one line when it ends, answered or not (a client that goes away mid-stream is logged
    too): method, path (never the query string), status, bytes, duration, client address, and for a request
    that ran a turn, its session id, how its CLI process was found (``start``: warm, spare or cold) and the
    CLI's exit code (known when the process ended during the turn; a warm process lives on). The turn's own
    line (claudesrv.registry) has its outcome, lines, cost and tokens.

    A turn's route sets ``X-Session-Id`` on a POST once the turn is admitted and before it starts: the
    request takes the turn from the registry's running turns (C{turns}) at that moment.
    """

    turns: Mapping[str, Any] = {}
    clock: IReactorTime | None = None
    turn: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received_at = self._now()
        self.notifyFinish().addCallbacks(self._log_access, self._log_access, errbackArgs=(True,))

    def _now(self) -> float:
        if self.clock is None:
            from twisted.internet import reactor

            return float(reactor.seconds())
        return self.clock.seconds()

    def setHeader(self, name: Any, value: Any) -> None:
        super().setHeader(name, value)
        if self.method == b"POST" and self.turn is None and _text(name).lower() == "x-session-id":
            self.turn = self.turns.get(_text(value))

    _request_line = (b"-", b"-")

    def connectionLost(self, reason: Any) -> None:
        # a request refused before it was read (413) knows its method and path only from its connection
        if getattr(self, "refused_early", False) and self.channel is not None:
            self._request_line = (getattr(self.channel, "_command", None) or b"-",
                                  (getattr(self.channel, "_path", None) or b"-").split(b"?", 1)[0])
        super().connectionLost(reason)

    def _log_access(self, _: object, gone: bool = False) -> None:
        method, path, status = self.method, getattr(self, "path", None), self.code
        if getattr(self, "refused_early", False):  # 413 from the headers alone (guard.LimitedChannel)
            method, path = self._request_line
            status, gone = 413, False
        elif method == _NO_METHOD:
            return  # the connection closed before a request line was complete: nothing was asked
        fields: dict[str, Any] = {
            "method": _text(method),
            "path": _text(path) or "-",
            "status": status,
            "bytes": self.sentLength,
            "duration": round(self._now() - self.received_at, 6),
            "peer": getattr(self.getClientAddress(), "host", None),
            "gone": gone,
        }
        form = "{method} {path} {status} {bytes}B {duration:.3f}s"
        session = self.responseHeaders.getRawHeaders(b"x-session-id")
        if session:
            fields["session_id"] = _text(session[0])
            form += " session {session_id}"
        turn = self.turn
        if turn is not None:
            fields.update(start=turn.kind, exit_code=turn.exit_code)
            form += " {start} exit {exit_code}"
        if gone:
            form += " (client gone)"
        access_log.info(form, **fields)


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value or ""


def access_logged(request_class: type[Request], turns: Mapping[str, Any], clock: IReactorTime) -> type[Request]:
    """C{request_class} with L{AccessLoggedRequest}'s one line per request, turns taken from C{turns}."""
    return type("AccessLoggedRequest", (AccessLoggedRequest, request_class), {"turns": turns, "clock": clock})


class QuietSite(Site):
    """A Site without Twisted's access log (it logs each request's full URI, query string and all);
    L{AccessLoggedRequest} logs each request instead."""

    def log(self, request: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "Site"  # "Site starting on 3000", as before
