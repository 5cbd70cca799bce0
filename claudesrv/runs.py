"""
Runs: one turn of one session, from the queue to the terminal event and the last process reaped.

The promises kept here:
 - every stream ends with exactly one ``result`` event: the CLI's own, or one we write in its shape;
 - a session id reaches the client only after its row is committed;
 - one turn per session at a time, at most C{max_runs} CLI processes, a FIFO queue behind them;
 - a run that must stop is interrupted (SIGINT), then terminated (SIGTERM), then killed (SIGKILL),
   and afterwards no process it started is left, even ones that left its process group;
 - a slow client pauses the CLI's stdout instead of growing the server's memory.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from claudesrv import sse
from claudesrv.command import ClaudeRequest, build_argv, build_env
from claudesrv.process import ClaudeProcess, Spawner, kill_marked
from claudesrv.store import SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

RESULT_MARK = b'"type":"result"'
SESSION_MARK = b'"session_id"'
TERM_GRACE = 2.0


class Busy(Exception):
    """The session already has a turn running or waiting."""


class QueueFull(Exception):
    """Every run slot and every queue place is taken."""


class Stream(Protocol):
    """Where a run's events go: the Twisted request, seen only through these methods."""

    def write(self, data: bytes) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@dataclass
class Limits:
    max_runs: int = 4
    max_queue: int = 32
    run_timeout: float = 3600.0
    idle_timeout: float = 600.0
    keepalive: float = 15.0
    kill_grace: float = 5.0
    max_line: int = 1 << 20
    deny_tools: tuple[str, ...] = ()
    sandboxed: bool = False


@dataclass
class Counters:
    """What /metrics and the logs report; plain numbers owned by the run manager."""

    started: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    bytes_relayed: int = 0
    lines_relayed: int = 0


def _session_id(line: bytes) -> str | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    sid = obj.get("session_id") if isinstance(obj, dict) else None
    return sid if isinstance(sid, str) and sid else None


def _is_result(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("type") == "result" else None


@implementer(IPushProducer)
class Run:
    """One turn. Created by L{RunManager.submit}; the HTTP route returns L{Run.response}."""

    def __init__(self, manager: RunManager, request: ClaudeRequest, workspace: str | None,
                 stream: Stream) -> None:
        self.manager = manager
        self.clock = manager.clock
        self.request = request
        self.workspace = workspace
        self.new_session = workspace is None
        self.stream = stream
        self.run_id = uuid.uuid4().hex
        self.reported_id: str | None = None
        self.state = "queued"
        self.response: Deferred[bytes] = Deferred(self._client_gone)
        self.done: Deferred[None] = Deferred()
        self.interrupt_reason: str | None = None
        self.timeout_kind: str | None = None
        self.outcome = "ok"
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.bytes_relayed = 0
        self.lines_relayed = 0
        self.started_at = self.clock.seconds()
        self.last_write = self.started_at
        self.last_stdout = self.started_at
        self.process: ClaudeProcess | None = None
        self._stream_open = True
        self.result_sent = False
        self._client_paused = False
        self._producing = False
        self._held: list[Callable[[], None]] | None = None
        self._long_head = b""
        self._long_tail = b""
        self._long_result = False
        self._timers: dict[str, IDelayedCall] = {}
        self._paused_since = 0.0
        self._swept: Deferred[None] | None = None
        self.previous: Run | None = None
        self.marker = b"CLAUDESRV_RUN_ID=" + self.run_id.encode()

    # ---------------------------------------------------------------- lifecycle

    @property
    def session_id(self) -> str | None:
        return self.reported_id or self.request.session_id

    def open(self) -> None:
        """Headers out at once; keepalives while queued or silent."""
        sse.start(self.stream)  # type: ignore[arg-type]
        self._schedule("keepalive", self.manager.limits.keepalive, self._keepalive)

    def start(self) -> None:
        limits = self.manager.limits
        self.state = "running"
        self.manager.counters.started += 1
        self.started_at = self.last_stdout = self.clock.seconds()
        try:
            if self.workspace is None:
                self.workspace = self.manager.workspaces.create()
        except OSError as e:
            self._fail_before_spawn(f"could not create the workspace: {e.strerror}")
            return
        argv = build_argv(self.manager.executable(), self.request, limits.deny_tools)
        env = build_env(self.manager.environ, self.run_id, limits.sandboxed)
        self.process = ClaudeProcess(self, self.request.prompt.encode("utf-8"), limits.max_line)
        try:
            self.manager.spawn(self.process, argv, env, self.workspace)
        except Exception as e:
            self.process = None
            if not isinstance(e, OSError):
                log.failure("run {run_id}: spawning the CLI failed", run_id=self.run_id)
            reason = e.strerror if isinstance(e, OSError) else type(e).__name__
            self._fail_before_spawn(f"could not start the Claude CLI {argv[0]!r}: {reason}")
            return
        if self._stream_open:
            self.stream.registerProducer(self, True)
            self._producing = True
        self._schedule("run_timeout", limits.run_timeout, lambda: self.interrupt("timeout", "run"))
        self._schedule("idle", limits.idle_timeout, self._idle_check)

    def _fail_before_spawn(self, message: str) -> None:
        self._end_stream_with_error(message, "spawn_failed")
        self.outcome = "error"
        self._ended()

    def interrupt(self, reason: str, timeout_kind: str | None = None) -> None:
        """Stop this turn: SIGINT now, SIGTERM after the grace, SIGKILL after that."""
        if self.state == "ended" or self.interrupt_reason is not None:
            return
        self.interrupt_reason = reason
        self.timeout_kind = timeout_kind
        log.info("run {run_id} interrupted: {reason}", run_id=self.run_id,
                 reason=reason + (f" ({timeout_kind})" if timeout_kind else ""))
        if self.state == "queued":
            self.manager.leave_queue(self)
            self._end_stream_with_error(f"the turn was stopped before it started: {reason}", reason)
            self.outcome = self._error_outcome()
            self._ended()
            return
        assert self.process is not None
        self.process.signal_group(signal.SIGINT)
        grace = self.manager.limits.kill_grace
        self._schedule("sigterm", grace, self._terminate, always=True)
        self._schedule("sigkill", grace + TERM_GRACE, self._kill)

    def _terminate(self) -> None:
        if self.process is not None:
            self.process.signal_group(signal.SIGTERM)

    def _kill(self) -> None:
        if self.process is None or self.process.ended:
            return
        self.process.signal_group(signal.SIGKILL)
        self.manager.sweep(self.marker)
        # a killed child whose stdout we had paused must still be read to its end
        self.process.resume_reading()

    def _client_gone(self, _: object) -> None:
        """The route's Deferred was cancelled: the HTTP client went away."""
        self._stream_open = False
        if self._client_paused:
            self._client_paused = False
            if self.process is not None:
                self.process.resume_reading()
        if self.state != "ended":
            self.interrupt("disconnected")

    # ---------------------------------------------------------------- timers

    def _schedule(self, name: str, delay: float, fn: Callable[[], object], always: bool = False) -> None:
        if delay > 0 or always:
            self._timers[name] = self.clock.callLater(delay, self._fire, name, fn)

    def _fire(self, name: str, fn: Callable[[], object]) -> None:
        self._timers.pop(name, None)
        fn()

    def _cancel_timers(self, *names: str) -> None:
        for name in names or list(self._timers):
            call = self._timers.pop(name, None)
            if call is not None and call.active():
                call.cancel()

    def _keepalive(self) -> None:
        if not self._stream_open:
            return
        interval = self.manager.limits.keepalive
        silent = self.clock.seconds() - self.last_write
        if silent >= interval:
            self._write(sse.KEEPALIVE)
            silent = 0
        self._schedule("keepalive", interval - silent, self._keepalive)

    def _idle_check(self) -> None:
        """No stdout for the idle limit ends the run; so does a client that stopped reading that long."""
        limit = self.manager.limits.idle_timeout
        since = self._paused_since if self._client_paused else self.last_stdout
        quiet = self.clock.seconds() - since
        if quiet >= limit and self._client_paused:
            # the client will not read a result either: end its stream now and drop the rest of the output
            self.interrupt("timeout", "client_stalled")
            self._end_stream_with_error("the client read nothing for the idle limit", "timeout")
        elif quiet >= limit:
            self.interrupt("timeout", "idle")
        else:
            self._schedule("idle", limit - quiet, self._idle_check)

    # ---------------------------------------------------------------- IPushProducer (the HTTP side)

    def pauseProducing(self) -> None:
        if not self._client_paused:
            self._paused_since = self.clock.seconds()
        self._client_paused = True
        if self.process is not None:
            self.process.pause_reading()

    def resumeProducing(self) -> None:
        if self._client_paused:
            self.last_stdout = self.clock.seconds()  # time spent waiting for the client is not CLI silence
        self._client_paused = False
        if self.process is not None and self._held is None:
            self.process.resume_reading()

    def stopProducing(self) -> None:
        self._client_gone(None)

    # ---------------------------------------------------------------- LineSink (the CLI side)

    def lines_received(self, block: bytes) -> None:
        self.last_stdout = self.clock.seconds()
        if not self._stream_open:
            return
        if self._held is not None:
            self._held.append(lambda: self.lines_received(block))
            return
        if self.reported_id is None or RESULT_MARK in block:
            self._line_by_line(block)
            return
        self.lines_relayed += block.count(b"\n")
        self._write(sse.frames(block))

    def _line_by_line(self, block: bytes) -> None:
        lines = block.split(b"\n")
        lines.pop()
        for i, line in enumerate(lines):
            if self.reported_id is None and SESSION_MARK in line:
                sid = _session_id(line)
                if sid is not None:
                    rest = b"".join(rest_line + b"\n" for rest_line in lines[i + 1:])
                    self._record_session(sid, line, rest)
                    return
            result = _is_result(line) if RESULT_MARK in line else None
            if result is not None:
                self._send_result(line, result)
                return
            self.lines_relayed += 1
            self._write(sse.frames(line + b"\n"))

    def _record_session(self, sid: str, line: bytes, rest: bytes) -> None:
        """
        The first line that names the session: commit its row, then send the line. Everything
        behind it waits (and the CLI's stdout is paused) until the row is on disk.
        """
        self.reported_id = sid
        self._held = [lambda: self.lines_received(rest)] if rest else []
        if self.process is not None:
            self.process.pause_reading()
        assert self.workspace is not None
        d = self.manager.store.record(sid, self.workspace)
        if self.request.session_id is not None and self.request.session_id != sid:
            d.addCallback(lambda _: self.manager.store.touch(self.request.session_id or ""))
        d.addCallbacks(lambda _: self._recorded(line), self._record_failed)

    def _recorded(self, line: bytes) -> None:
        held, self._held = self._held or [], None
        self.manager.session_reported(self)
        self.lines_received(line + b"\n")
        for fn in held:
            fn()
        if self.process is not None and not self._client_paused:
            self.process.resume_reading()

    def _record_failed(self, failure: Failure) -> None:
        log.failure("run {run_id}: could not record session {sid}", failure, run_id=self.run_id,
                    sid=self.reported_id)
        self.reported_id = None
        held, self._held = self._held or [], None
        self._end_stream_with_error("the server could not record the session in its database", "database_error")
        self.outcome = "error"
        self.interrupt("error")
        for fn in held:  # the stream is closed: only a held process end still matters
            fn()
        if self.process is not None:
            self.process.resume_reading()

    def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A line too long to hold: relayed as it arrives, classified from its head and a sliding window."""
        self.last_stdout = self.clock.seconds()
        if not self._stream_open:
            return
        if self._held is not None:
            self._held.append(lambda: self.line_piece(piece, first, last))
            return
        if first:
            self._long_head = piece[:32]
            self._long_tail = b""
            self._long_result = False
            self._write(b"data: ")
        window = self._long_tail + piece[:len(RESULT_MARK)]
        if RESULT_MARK in window or RESULT_MARK in piece:
            self._long_result = True
        self._long_tail = (self._long_tail + piece[-len(RESULT_MARK):])[-len(RESULT_MARK):]
        if last:
            self._write(piece + b"\n\n")
            self.lines_relayed += 1
            head = self._long_head
            if head.startswith(b'{"type":"'):
                is_result = head.startswith(b'{"type":"result"')
            else:
                is_result = self._long_result
            if is_result:
                self._close_stream("result")
        elif piece:
            self._write(piece)

    def process_ended(self, exit_code: int | None, signal_number: int | None, stderr: bytes) -> None:
        if self._held is not None:
            self._held.append(lambda: self.process_ended(exit_code, signal_number, stderr))
            return
        self.exit_code = exit_code
        self.signal = signal_number
        self._cancel_timers("run_timeout", "idle", "sigterm", "sigkill")
        if self._stream_open:
            if exit_code is not None:
                how = f"exited with code {exit_code}"
            else:
                how = f"was killed by signal {signal_number}"
            text = stderr.decode("utf-8", "replace").strip()
            message = f"the Claude CLI {how} without a result"
            if text:
                message += ": " + text.splitlines()[-1]
            self._end_stream_with_error(message, self.interrupt_reason or "cli_failed",
                                        exit_code=exit_code, signal=signal_number,
                                        stderr=stderr.decode("utf-8", "replace"))
        if self._swept is None:
            self.process_exited()
        assert self._swept is not None
        self._swept.addBoth(lambda _: self._ended())

    def process_exited(self) -> None:
        """
        The CLI is gone: kill what it left, its group and the tool processes in sessions of their own.
        A survivor holding the CLI's stdout would otherwise keep the run (and its slot) open; the output
        already in the pipe is still read to its end.
        """
        if self._swept is not None or self.process is None:
            return
        self.process.signal_group(signal.SIGKILL)
        self._swept = self.manager.sweep(self.marker)

    # ---------------------------------------------------------------- the terminal event

    def _send_result(self, line: bytes, result: dict[str, Any]) -> None:
        if self.interrupt_reason in ("timeout", "server_shutdown", "cancelled"):
            result["cli_terminal_reason"] = result.get("terminal_reason")
            result["terminal_reason"] = self.interrupt_reason
            if self.timeout_kind:
                result["timeout"] = self.timeout_kind
            line = json.dumps(result, separators=(",", ":")).encode()
        if result.get("is_error"):
            self.outcome = self._error_outcome()
        self.lines_relayed += 1
        self._write(sse.frames(line + b"\n"))
        self._close_stream("result")

    def _error_outcome(self) -> str:
        reason = self.interrupt_reason
        if reason in ("timeout", "cancelled", "disconnected", "server_shutdown"):
            return reason
        return "error"

    def _end_stream_with_error(self, message: str, reason: str, **extra: Any) -> None:
        """The result event the CLI did not write, in the CLI's own shape."""
        if not self._stream_open:
            return
        payload: dict[str, Any] = {
            "type": "result",
            "subtype": "error_during_execution",
            "is_error": True,
            "session_id": self.session_id,
            "terminal_reason": reason,
            "errors": [message],
            "exit_code": None,
            "signal": None,
            "stderr": "",
        }
        if self.timeout_kind:
            payload["timeout"] = self.timeout_kind
        payload.update(extra)
        self.outcome = self._error_outcome()
        self._write(sse.event(payload))
        self._close_stream("error")

    def _write(self, data: bytes) -> None:
        self.last_write = self.clock.seconds()
        self.bytes_relayed += len(data)
        self.stream.write(data)

    def _close_stream(self, why: str) -> None:
        if not self._stream_open:
            return
        self._stream_open = False
        self.result_sent = why == "result"
        self._cancel_timers("keepalive")
        if self._producing:
            self._producing = False
            self.stream.unregisterProducer()
        if self._client_paused and self.process is not None:
            self._client_paused = False
            self.process.resume_reading()
        self.response.callback(b"")

    def _ended(self) -> None:
        self.state = "ended"
        self._cancel_timers()
        if self.new_session and self.reported_id is None and self.workspace is not None:
            self.manager.workspaces.remove_if_empty(self.workspace)
        if not self._stream_open and self.interrupt_reason == "disconnected":
            self.outcome = "disconnected"
        duration = self.clock.seconds() - self.started_at
        log.info(
            "run {run_id} session {session_id}: {outcome}, exit {exit_code} signal {signal}, "
            "{duration:.3f}s, {bytes} bytes {lines} lines relayed",
            run_id=self.run_id, session_id=self.session_id, outcome=self.outcome,
            exit_code=self.exit_code, signal=self.signal, duration=duration,
            bytes=self.bytes_relayed, lines=self.lines_relayed)
        self.manager.run_ended(self)
        self.previous = None
        self.done.callback(None)


class RunManager:
    """Admission, the per-session locks, the run slots and the FIFO queue."""

    def __init__(self, clock: IReactorTime, spawn: Spawner, store: SessionStore, workspaces: Workspaces,
                 executable: Callable[[], str], environ: dict[str, str], limits: Limits) -> None:
        self.clock = clock
        self.spawn = spawn
        self.store = store
        self.workspaces = workspaces
        self.executable = executable
        self.environ = environ
        self.limits = limits
        self.counters = Counters()
        self.running: dict[str, Run] = {}
        self.queue: deque[Run] = deque()
        self.by_session: dict[str, Run] = {}
        self.deleting: set[str] = set()
        self.accepting = True
        self._sweep_pending: list[tuple[bytes, Deferred[None]]] = []
        self._sweeping = False

    def sweep(self, marker: bytes) -> Deferred[None]:
        """
        Kill whatever still carries C{marker} once the run's CLI has exited. A scan reads every process's
        environment (3-4 ms with 200 runs alive), so runs that end while a scan is under way share the next.
        """
        d: Deferred[None] = Deferred()
        self._sweep_pending.append((marker, d))
        if not self._sweeping:
            self._sweep_next()
        return d

    def _sweep_next(self) -> None:
        batch, self._sweep_pending = self._sweep_pending, []
        self._sweeping = bool(batch)
        if not batch:
            return

        def fire(result: object) -> None:
            if isinstance(result, Failure):
                log.failure("process sweep failed", result)
            for _, d in batch:
                d.callback(None)
            self._sweep_next()

        deferToThread(kill_marked, [marker for marker, _ in batch]).addBoth(fire)

    def busy(self, *session_ids: str) -> bool:
        """Whether any of these ids (a session's ids) has a turn, or is being deleted."""
        return any(sid in self.by_session or sid in self.deleting for sid in session_ids)

    def submit(self, request: ClaudeRequest, workspace: str | None, stream: Stream) -> Run:
        """
        Admit a turn or raise L{Busy} / L{QueueFull} having started nothing. The caller returns
        C{run.response} to Klein.

        A session whose previous turn has already sent its result, but whose CLI has not exited yet,
        is not busy: the new turn waits for that exit and then starts.
        """
        if not self.accepting:
            raise QueueFull("the server is shutting down")
        if request.session_id in self.deleting:
            raise Busy(request.session_id)
        previous = self.by_session.get(request.session_id) if request.session_id else None
        if previous is not None and not previous.result_sent:
            raise Busy(request.session_id)
        if len(self.running) >= self.limits.max_runs and len(self.queue) >= self.limits.max_queue:
            raise QueueFull("all run slots and queue places are taken")
        run = Run(self, request, workspace, stream)
        if request.session_id is not None:
            self.by_session[request.session_id] = run
        run.open()
        if previous is not None:
            run.previous = previous
            previous.done.addCallback(lambda _: self._admit(run))
        else:
            self._admit(run)
        return run

    def _admit(self, run: Run) -> None:
        run.previous = None
        if run.state == "queued":
            self.queue.append(run)
            self._start_queued()

    def _start_queued(self) -> None:
        while self.queue and len(self.running) < self.limits.max_runs and self.accepting:
            run = self.queue.popleft()
            self.running[run.run_id] = run
            run.start()

    def session_reported(self, run: Run) -> None:
        if run.reported_id is not None:
            self.by_session.setdefault(run.reported_id, run)

    def leave_queue(self, run: Run) -> None:
        try:
            self.queue.remove(run)
        except ValueError:
            pass

    def run_ended(self, run: Run) -> None:
        self.running.pop(run.run_id, None)
        for sid in (run.request.session_id, run.reported_id):
            if sid is not None and self.by_session.get(sid) is run:
                if run.previous is not None and run.previous.state != "ended":
                    self.by_session[sid] = run.previous  # a waiting turn gave up: the lock goes back
                else:
                    del self.by_session[sid]
        c = self.counters
        c.ended[run.outcome] = c.ended.get(run.outcome, 0) + 1
        if run.exit_code is not None or run.signal is not None:
            key = str(run.exit_code) if run.exit_code is not None else f"signal {run.signal}"
            c.exit_codes[key] = c.exit_codes.get(key, 0) + 1
        c.bytes_relayed += run.bytes_relayed
        c.lines_relayed += run.lines_relayed
        self._start_queued()

    def cancel(self, session_id: str) -> bool:
        """Interrupt the session's running or waiting turn; False if it has none."""
        run = self.by_session.get(session_id)
        if run is None:
            return False
        run.interrupt("cancelled")
        return True

    def shutdown(self) -> Deferred[Any]:
        """Stop admitting, interrupt everything, and fire once every run has ended."""
        self.accepting = False
        runs = {*self.queue, *self.running.values(), *self.by_session.values()}
        for run in runs:
            run.interrupt("server_shutdown")
        pending = [run.done for run in runs if run.state != "ended"]
        if not pending:
            return succeed(None)
        return DeferredList(pending)
