"""
The session registry: session id -> live session, and who may run when.

Admission: one turn per session; at most C{max_runs} turns running and C{max_live} CLI processes alive
(idle, running, starting, spare, stopping); a FIFO queue behind them. A turn that needs a process when
none is free puts a spare, else the least recently used idle session, to sleep first. Spares are started
ahead of time, each in a fresh workspace under its own pre-chosen session id, and become sessions when a
new session's options match theirs. Idle processes sleep after C{warm_idle} seconds.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from claudesrv.approvals import Approvals
from claudesrv.batches import Batches
from claudesrv.command import ClaudeRequest, SpawnOptions, build_argv, build_env
from claudesrv.eventlog import EventLog
from claudesrv.live import COLD, IDLE, RUNNING, STARTING, STOPPING, Limits, LiveSession, Turn
from claudesrv.process import CliProcess, Spawner, kill_marked
from claudesrv.projects import Placement
from claudesrv.store import SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

SPARE_RETRY = 30.0  # seconds before a spare is tried again after one died on its own


class Busy(Exception):
    """The session already has a turn running or waiting, or is being deleted."""


class QueueFull(Exception):
    """Every run slot and every queue place is taken."""


class ProjectBusy(Exception):
    """Another session runs a turn in the same project folder."""


@dataclass
class Counters:
    """What /metrics and the logs report; plain numbers owned by the registry."""

    turns_started: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)  # warm, spare, cold
    sleeps: dict[str, int] = field(default_factory=dict)  # idle, lru, options, deleted, shutdown
    spawns: int = 0
    bytes_relayed: int = 0
    lines_logged: int = 0
    usage: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> cost_usd and tokens, summed


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


class SessionRegistry:
    """Owns every live session, the queue and the spares; the routes talk only to this."""

    def __init__(self, clock: IReactorTime, spawn: Spawner, store: SessionStore, workspaces: Workspaces,
                 executable: Callable[[], str], environ: dict[str, str], limits: Limits,
                 events_dir: str, kill: Callable[[list[bytes]], Deferred[None]] | None = None,
                 killpg: Callable[[int, int], None] = os.killpg,
                 blocking: Callable[..., Deferred[Any]] = deferToThread) -> None:
        self.clock = clock
        self.spawn = spawn
        self.store = store
        self.workspaces = workspaces
        self.executable = executable
        self.environ = environ
        self.limits = limits
        self.events_dir = events_dir
        self.kill = kill or (lambda markers: deferToThread(kill_marked, markers))
        self.killpg = killpg
        self.blocking = blocking  # file-system work off the reactor thread (inline in tests)
        self.counters = Counters()
        self.plain_turn = ClaudeRequest(prompt="")  # what a new session that asks for nothing runs with
        self.sessions: dict[str, LiveSession] = {}
        self.spares: list[LiveSession] = []
        self.live: set[LiveSession] = set()
        self.turns: dict[str, Turn] = {}
        self.queue: deque[Turn] = deque()
        self.running = 0
        self.deleting: set[str] = set()
        self.logs: dict[str, EventLog] = {}
        self.accepting = True
        self._spare_retry_at = 0.0
        self._dispatching = False
        self._dispatch_again = False
        self._all_gone: list[Deferred[None]] = []
        self._sweeps: Batches[bytes] = Batches(self._kill_logged)
        self.approvals = Approvals(clock, limits.approval_timeout, limits.allow_input_edits, store.remembered,
                                   store.remember, store.forget)

    def _kill_logged(self, markers: list[bytes]) -> Deferred[object]:
        return self.kill(markers).addErrback(lambda f: log.failure("process sweep failed", f))

    def open(self) -> None:
        """The daemon is up: start the spares."""
        self._fill_spares()

    # ------------------------------------------------------------------ what routes read

    def log_for(self, session_id: str) -> EventLog:
        log_ = self.logs.get(session_id)
        if log_ is None:
            log_ = self.logs[session_id] = EventLog.open(os.path.join(self.events_dir, session_id),
                                                         self.limits.log_max_bytes)
        return log_

    def release_log(self, session_id: str) -> None:
        """Forget a log nobody follows and no session uses (it is on disk)."""
        log_ = self.logs.get(session_id)
        if log_ is not None and not log_.followers and session_id not in self.sessions:
            log_.close("released")
            del self.logs[session_id]

    def folder_busy(self, folder: str) -> bool:
        """Whether a turn of any session runs (or waits) in this folder (a project's is shared). Folders are kept as
        real paths (Workspaces, Projects), so they compare as strings: no file-system call on admission."""
        return any(self.sessions[sid].workspace == folder for sid in self.turns if sid in self.sessions)

    def busy(self, *session_ids: str) -> bool:
        """Whether any of these ids has a turn, or is being deleted."""
        return any(sid in self.turns or sid in self.deleting for sid in session_ids)

    def state_of(self, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        turn = self.turns.get(session_id)
        state = session.state if session is not None else COLD
        if turn is not None and turn.state == "running":
            state = RUNNING
        log_ = self.logs.get(session_id) or EventLog.open(os.path.join(self.events_dir, session_id), 0)
        return {"state": state, "pid": session.pid if session is not None else None,
                "last_event_id": log_.last_seq, "queued": turn is not None and turn.state == "queued",
                "pending_permissions": self.approvals.waiting(session) if session is not None else [],
                "live_options": None if session is None or session.options is None else {
                    **session.options.shown(), "model": session.model, "permission_mode": session.permission_mode}}

    def live_by_state(self) -> dict[str, int]:
        counts = {STARTING: 0, IDLE: 0, RUNNING: 0, STOPPING: 0}
        for session in self.live:
            counts[session.state] = counts.get(session.state, 0) + 1
        return counts

    def log_bytes(self) -> int:
        return sum(log_.size() for log_ in self.logs.values())

    # ------------------------------------------------------------------ admission

    def admit(self, request: ClaudeRequest, workspace: str | None, placement: Placement | None = None) -> Turn:
        """
        Take a turn in, or raise L{Busy} / L{QueueFull} / L{ProjectBusy} having changed nothing. A new session
        gets a spare, or a fresh workspace (or its project's folder or worktree: C{placement}) and log folder
        made in a thread (C{turn.prepared} fires when they exist: a burst of new sessions must not wait for
        each other's file-system round trips); the caller records its row, then calls L{start} (or
        L{abandon}). Two turns never run in one folder at once (sessions in a project's own folder).
        """
        if not self.accepting:
            raise QueueFull("the server is shutting down")
        sid = request.session_id
        if sid is not None and self.busy(sid):
            raise Busy(sid)
        if len(self.turns) >= self.limits.max_runs + self.limits.max_queue:
            raise QueueFull("all run slots and queue places are taken")
        new_id = str(uuid.uuid4())
        folder = workspace or (placement.path(new_id) if placement is not None else None)
        if folder is not None and self.folder_busy(folder):  # (a turn of this session itself is Busy above)
            raise ProjectBusy(folder)
        kind = "cold"
        if sid is None:
            session = self._take_spare(request.options) if placement is None else None
            if session is not None:
                kind = "spare"
            else:
                session = LiveSession(self, new_id, folder or self.workspaces.path_for(new_id), self.log_for(new_id))
                session.known_to_cli = False
            self.logs[session.session_id] = session.log
            self.sessions[session.session_id] = session
        else:
            assert workspace is not None
            session = self.sessions.get(sid) or LiveSession(self, sid, workspace, self.log_for(sid))
            self.sessions[sid] = session
        turn = Turn(request, session.session_id, sid is None, self.clock.seconds())
        turn.kind = kind
        turn.start_offset = session.log.begin_turn()
        if sid is None and kind == "cold":  # the thread is the only one to touch the new log until it is done
            turn.prepared = self.blocking(self._prepare, session, placement)
        self.turns[session.session_id] = turn
        return turn

    def _prepare(self, session: LiveSession, placement: Placement | None) -> None:
        """In a thread, before anyone else sees the new session: its folder, and its log's first file."""
        if placement is None:
            self.workspaces.create(session.session_id)
        else:
            placement.create(session.session_id)
        session.log.begin_turn(now=True)

    def start(self, turn: Turn) -> None:
        """Queue an admitted turn and start what can start; a turn that must wait says so in its log."""
        if turn.state != "queued":
            return
        session = self.sessions[turn.session_id]
        if not self.accepting:  # shutdown began while its row was being written
            session.write_error_result(turn, "the server is shutting down", "server_shutdown")
            return
        self.queue.append(turn)
        self._dispatch()
        if turn.state == "queued" and turn in self.queue and not (self.queue[0] is turn and session.state == STOPPING):
            # (a turn first in line that only waits for its own session's process to finish exiting is not
            # told: that takes milliseconds)
            session.log.append_event(
                {"type": "claudesrv", "subtype": "queued", "position": self.queue.index(turn) + 1})

    def abandon(self, turn: Turn) -> None:
        """A new session whose row could not be recorded: its turn is stopped, and it leaves nothing."""
        session = self.sessions.get(turn.session_id)
        if session is None or not turn.new_session:
            return
        session.forgotten = True
        if turn in self.queue:
            self._unqueue(session, turn, "the session could not be recorded", "error")
        elif turn.state == "queued":  # admitted, never started
            self.turns.pop(turn.session_id, None)
            turn.state = "ended"
        if session.process is not None:
            session.shutdown("error")  # the process goes, and the session's files with it
        elif turn.state == "ended" and self.sessions.get(session.session_id) is session:
            self._discard(session)

    def _take_spare(self, options: SpawnOptions) -> LiveSession | None:
        for spare in self.spares:
            if spare.can_take(options):
                self.spares.remove(spare)
                spare.spare = False  # replaced once its first turn has printed (or ended): not before
                return spare
        return None

    def _dispatch(self) -> None:
        """Start queued turns in order while a run slot and a process can be had."""
        if self._dispatching:
            self._dispatch_again = True  # something changed while dispatching (a process went at once)
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                while self.queue and self.accepting and self.running < self.limits.max_runs:
                    if not self._start_head():
                        break
        finally:
            self._dispatching = False

    def _start_head(self) -> bool:
        turn = self.queue[0]
        session = self.sessions[turn.session_id]
        options = turn.request.options
        if session.can_take(options):
            if turn.kind != "spare":
                turn.kind = "warm"
        elif session.state in (STARTING, IDLE):
            self._sleep(session, "options")  # other spawn-time options: resume with the new ones
            return False
        elif session.state != COLD:
            return False  # stopping: wait until it is gone
        elif len(self.live) >= self.limits.max_live:
            victim = self._evictable()
            if victim is not None:
                self._sleep(victim, "spare" if victim.spare else "lru")
            return False
        else:
            turn.kind = "cold"
            try:
                session.spawn(options, turn.request.model, turn.request.permission_mode or "default")
            except Exception as e:
                self.queue.popleft()
                if not isinstance(e, OSError):
                    log.failure("session {session_id}: spawning the CLI failed", session_id=session.session_id)
                reason = e.strerror if isinstance(e, OSError) else type(e).__name__
                message = f"could not start the Claude CLI {self.executable()!r}: {reason}"

                def fail(_: object = None) -> None:
                    if turn.state != "ended":  # (its client may have left meanwhile)
                        session.write_error_result(turn, message, "spawn_failed")

                if turn.new_session:  # its row goes before its client hears of it
                    self.forget_new_session(session).addBoth(fail)
                else:
                    fail()
                return True
        self.queue.popleft()
        self.running += 1
        self.counters.turns_started += 1
        _bump(self.counters.starts, turn.kind)
        session.begin(turn)
        return True

    def _evictable(self) -> LiveSession | None:
        """A spare, else the least recently used idle session without a turn waiting."""
        spares = [s for s in self.spares if s.state in (STARTING, IDLE)]
        if spares:
            return spares[0]
        idle = [s for s in self.live if s.state == IDLE and not s.spare and s.session_id not in self.turns]
        return min(idle, key=lambda s: s.last_used, default=None)

    def _sleep(self, session: LiveSession, reason: str) -> None:
        _bump(self.counters.sleeps, reason)
        session.sleep(reason)

    # ------------------------------------------------------------------ spares

    def _fill_spares(self) -> None:
        while (self.accepting and not self.queue and len(self.spares) < self.limits.spares
               and len(self.live) < self.limits.max_live and self.clock.seconds() >= self._spare_retry_at):
            new_id = str(uuid.uuid4())
            try:
                workspace = self.workspaces.create(new_id)
            except OSError as e:
                log.error("could not create a spare's workspace: {error}", error=e.strerror)
                return
            spare = LiveSession(self, new_id, workspace,
                                EventLog(os.path.join(self.events_dir, new_id), self.limits.log_max_bytes),
                                spare=True)
            spare.log.begin_turn(now=True)  # its folder and first segment now, not when a client waits
            try:
                plain = self.plain_turn  # a new session that asks for nothing special
                spare.spawn(plain.options, plain.model, plain.permission_mode or "default")
            except Exception as e:
                log.error("could not start a spare CLI: {error}", error=str(e))
                spare.log.destroy()
                self.workspaces.remove_if_empty(workspace)
                self._spare_retry_at = self.clock.seconds() + SPARE_RETRY
                return
            self.spares.append(spare)

    # ------------------------------------------------------------------ the Host of each live session

    def spawn_cli(self, session: LiveSession, options: SpawnOptions, resume: bool) -> CliProcess:
        limits = self.limits
        argv = build_argv(self.executable(), options, session.session_id, resume, limits.deny_tools,
                          session.model, session.permission_mode)
        env = build_env(self.environ, session.marker.split(b"=", 1)[1].decode(), limits.sandboxed)
        process = CliProcess(session, limits.max_line, self.killpg)
        self.spawn(process, argv, env, session.workspace)
        self.live.add(session)
        self.counters.spawns += 1
        return process

    def sweep(self, marker: bytes) -> Deferred[None]:
        """
        Kill whatever still carries C{marker} once a CLI has exited. A scan reads every process's
        environment, so processes that end while a scan is under way share the next.
        """
        return self._sweeps.add(marker)

    def turn_ended(self, session: LiveSession, turn: Turn) -> None:
        if self.turns.get(turn.session_id) is turn:
            del self.turns[turn.session_id]
        if turn.began:
            self.running -= 1
        if turn.output_seen:
            session.known_to_cli = True
        c = self.counters
        _bump(c.ended, turn.outcome)
        if turn.exit_code is not None or turn.signal is not None:
            _bump(c.exit_codes, str(turn.exit_code) if turn.exit_code is not None else f"signal {turn.signal}")
        c.lines_logged += turn.lines
        if session.process is None and self.sessions.get(turn.session_id) is session:
            if session.never_came_to_be(turn):
                self.forget_new_session(session).addBoth(lambda _: self._discard(session))
            else:
                del self.sessions[turn.session_id]
                self.release_log(turn.session_id)
        self._after_io(self._after_turn, session, turn)

    def _after_io(self, fn: Callable[..., object], *args: Any) -> None:
        """
        Call C{fn} once the reactor has done its next round of I/O: the client's last frames leave
        before the bookkeeping (and a spawn, which takes milliseconds) runs. A plain callLater(0) would
        run before the writes.
        """
        self.clock.callLater(0, self.clock.callLater, 0, fn, *args)

    def _after_turn(self, session: LiveSession, turn: Turn) -> None:
        cost = sum(u.get("cost_usd", 0) for u in turn.usage.values())
        tokens = {m: int(u.get("input_tokens", 0) + u.get("output_tokens", 0)) for m, u in turn.usage.items()}
        log.info("turn {turn_id} session {session_id}: {outcome}, {kind}, exit {exit_code} signal {signal}, "
                 "{duration:.3f}s, {lines} lines, ${cost_usd:.6f}, tokens {tokens}", turn_id=turn.turn_id,
                 session_id=turn.session_id, outcome=turn.outcome, kind=turn.kind, exit_code=turn.exit_code,
                 signal=turn.signal, duration=self.clock.seconds() - turn.accepted_at, lines=turn.lines,
                 cost_usd=cost, tokens=tokens, usage=turn.usage)
        for model, figures in turn.usage.items():
            counted = self.counters.usage.setdefault(model, {})
            for name, value in figures.items():
                counted[name] = counted.get(name, 0) + value
        if not session.forgotten:
            self.store.touch(turn.session_id, turn.usage).addErrback(
                lambda f: log.failure("could not mark session {sid} used", f, sid=turn.session_id))
        self._dispatch()
        self._fill_spares()

    def turn_output(self, session: LiveSession, turn: Turn) -> None:
        """A turn's first line: a spare it took may be replaced now without delaying it."""
        if turn.kind == "spare":
            self._after_io(self._fill_spares)

    def became_idle(self, session: LiveSession) -> None:
        if not session.spare:
            session.timers.set_if("warm_idle", self.limits.warm_idle, lambda: self._sleep(session, "idle"))
        self._dispatch()

    def process_gone(self, session: LiveSession, unexpected: bool) -> None:
        self.live.discard(session)
        if session in self.spares:
            self.spares.remove(session)
            if unexpected:
                log.warn("a spare CLI exited on its own; spares pause for {s:g} s", s=SPARE_RETRY)
                self._spare_retry_at = self.clock.seconds() + SPARE_RETRY
                self.clock.callLater(SPARE_RETRY, self._fill_spares)
            session.log.destroy()
            self.workspaces.remove_if_empty(session.workspace)
        elif session.forgotten:
            self._discard(session)
        elif session.session_id not in self.turns and self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
            self.release_log(session.session_id)
        if not self.live:
            waiters, self._all_gone = self._all_gone, []
            for d in waiters:
                d.callback(None)
        self._dispatch()
        self._fill_spares()

    def remove_workspace(self, session: LiveSession) -> None:
        """A new session's folder: its empty workspace at once; a worktree (a whole checkout) in a thread."""
        if session.workspace.startswith(self.workspaces.root + os.sep):
            self.workspaces.remove(session.workspace)
        else:
            self.blocking(self.workspaces.remove, session.workspace).addErrback(
                lambda f: log.failure("could not remove {path}", f, path=session.workspace))

    def _discard(self, session: LiveSession) -> None:
        """A new session that never came to be: its log and its (empty) workspace go."""
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        self.logs.pop(session.session_id, None)
        session.log.destroy()
        self.remove_workspace(session)

    def forget_new_session(self, session: LiveSession) -> Deferred[None]:
        """A new session whose CLI died before saying anything: its row goes now, the rest when it is gone."""
        session.forgotten = True
        d = self.store.delete_sessions([session.session_id])
        d.addErrback(lambda f: log.failure("could not remove the row of session {sid}", f, sid=session.session_id))
        return d

    # ------------------------------------------------------------------ clients, cancel, delete, shutdown

    def client_left(self, turn: Turn, why: str = "disconnected") -> None:
        """The client of a turn's stream went away (or stopped reading: C{why} "stalled"): a queued turn
        leaves; a running one is interrupted unless it was detached."""
        if turn.state == "ended":
            return
        session = self.sessions.get(turn.session_id)
        if session is None:
            return
        if turn.state == "queued":
            self._unqueue(session, turn, "the client left before the turn started", "disconnected")
        elif turn.request.detach or self.limits.on_disconnect == "continue":
            log.info("turn {turn_id} of session {session_id} goes on without its client", turn_id=turn.turn_id,
                     session_id=turn.session_id)
        elif why == "stalled":
            session.interrupt("timeout", "client_stalled")
        else:
            session.interrupt("disconnected")

    def _unqueue(self, session: LiveSession, turn: Turn, message: str, reason: str) -> None:
        if turn in self.queue:
            self.queue.remove(turn)
        turn.stop_reason = reason
        session.write_error_result(turn, message, reason)

    def cancel(self, session_id: str) -> bool:
        """Interrupt the session's running or waiting turn; False if it has none."""
        turn = self.turns.get(session_id)
        session = self.sessions.get(session_id)
        if turn is None or session is None or turn.state == "ended":
            return False
        if turn.state == "queued":
            self._unqueue(session, turn, "the turn was cancelled before it started", "cancelled")
        else:
            session.interrupt("cancelled")
        return True

    def stop_sessions(self, session_ids: list[str]) -> Deferred[None]:
        """Put the live processes of these ids to sleep (for a delete); fires when they are gone."""
        waits = []
        for sid in session_ids:
            session = self.sessions.get(sid)
            if session is not None and session.process is not None:
                d: Deferred[None] = Deferred()
                session.on_gone.append(d)
                waits.append(d)
                self._sleep(session, "deleted")
        return gatherResults(waits).addCallback(lambda _: None)

    def destroy_log(self, session_id: str) -> None:
        """The session is deleted: followers get a ``deleted`` event, the files go."""
        self.sessions.pop(session_id, None)
        self.approvals.forget(session_id)
        log_ = self.logs.pop(session_id, None) or EventLog.open(os.path.join(self.events_dir, session_id), 0)
        log_.destroy()

    def shutdown(self) -> Deferred[None]:
        """Stop admitting, end queued turns, interrupt running ones, stop every process; fires when all are gone."""
        self.accepting = False
        for turn in list(self.queue):
            self._unqueue(self.sessions[turn.session_id], turn, "the server is shutting down", "server_shutdown")
        for session in list(self.live):
            _bump(self.counters.sleeps, "shutdown")
            session.shutdown()
        d: Deferred[None] = succeed(None) if not self.live else Deferred()
        if not d.called:
            self._all_gone.append(d)

        def close_logs(_: object) -> None:
            for log_ in list(self.logs.values()):
                log_.close("server_shutdown")

        return d.addCallback(close_logs)
