"""
A live session: one session's CLI process in SDK streaming mode, the turn it runs, and its event log.

The process lives through an explicit state machine (L{TRANSITIONS}): cold -> starting -> idle <-> running
-> stopping -> cold. A turn is one user message written to the process and every line the CLI prints up
to and including that turn's ``result``; every line becomes an event in the session's log, and nothing
here knows who reads it. The promises kept here:
 - every turn ends with exactly one ``result`` event: the CLI's own, or one we write in its shape;
 - stopping a turn asks the CLI first (the ``interrupt`` control request keeps the process warm), then
   SIGINT, SIGTERM and SIGKILL to its process group, and afterwards no process it started is left;
 - a tool that needs approval is put to L{Approvals} (a person over HTTP, or a denial), and what waits
   for a person is resolved as cancelled when its turn stops.
"""

from __future__ import annotations

import json
import signal
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from claudesrv import command
from claudesrv.approvals import Approvals
from claudesrv.command import ClaudeRequest, SpawnOptions
from claudesrv.eventlog import EventLog, event_line
from claudesrv.process import CliProcess
from claudesrv.timers import Timers

log = Logger()

COLD, STARTING, IDLE, RUNNING, STOPPING = "cold", "starting", "idle", "running", "stopping"

#: (state, event) -> next state. Any other pair is a bug, and raises.
TRANSITIONS: dict[tuple[str, str], str] = {
    (COLD, "spawn"): STARTING,
    (STARTING, "ready"): IDLE,
    (STARTING, "begin"): RUNNING,
    (IDLE, "begin"): RUNNING,
    (RUNNING, "ready"): RUNNING,  # initialize answered while the first turn already runs
    (RUNNING, "result"): IDLE,
    (STARTING, "stop"): STOPPING,
    (IDLE, "stop"): STOPPING,
    (RUNNING, "stop"): STOPPING,
    (STOPPING, "stop"): STOPPING,
    (STOPPING, "ready"): STOPPING,
    (STOPPING, "result"): STOPPING,
    (STARTING, "gone"): COLD,
    (IDLE, "gone"): COLD,
    (RUNNING, "gone"): COLD,
    (STOPPING, "gone"): COLD,
}

RESULT_MARK = b'"type":"result"'
TERM_GRACE = 2.0
STOP_REASONS = ("cancelled", "timeout", "server_shutdown")
NOT_AUTHENTICATED = "cli_not_authenticated"
LOGIN_HINT = ("set ANTHROPIC_API_KEY in the daemon's environment, or log the CLI in with `claude /login` as the "
              "daemon's user (with the daemon's HOME and CLAUDE_CONFIG_DIR)")


@dataclass
class Limits:
    """The operator's limits (see the options in L{claudesrv.tap})."""

    max_runs: int = 4
    max_queue: int = 32
    max_live: int = 8
    spares: int = 1
    warm_idle: float = 600.0
    run_timeout: float = 3600.0
    idle_timeout: float = 600.0
    keepalive: float = 15.0
    kill_grace: float = 5.0
    max_line: int = 1 << 20
    log_max_bytes: int = 256 << 20
    on_disconnect: str = "cancel"
    deny_tools: tuple[str, ...] = ()
    sandboxed: bool = False
    approval_timeout: float = 300.0
    allow_input_edits: tuple[str, ...] = ("AskUserQuestion",)


class Host(Protocol):
    """What a live session needs from the registry that owns it."""

    clock: IReactorTime
    limits: Limits
    approvals: Approvals

    def spawn_cli(self, session: LiveSession, options: SpawnOptions, resume: bool) -> CliProcess: ...

    def sweep(self, marker: bytes) -> Deferred[None]: ...

    def turn_ended(self, session: LiveSession, turn: Turn) -> None: ...

    def became_idle(self, session: LiveSession) -> None: ...

    def turn_output(self, session: LiveSession, turn: Turn) -> None: ...

    def process_gone(self, session: LiveSession, unexpected: bool) -> None: ...

    def forget_new_session(self, session: LiveSession) -> Deferred[None]: ...

    def remove_workspace(self, session: LiveSession) -> None: ...


class Turn:
    """One user message and its events; L{Turn.ended} fires once its result is in the log."""

    def __init__(self, request: ClaudeRequest, session_id: str, new_session: bool, now: float) -> None:
        self.request = request
        self.session_id = session_id
        self.new_session = new_session  # this turn made the session: a CLI that says nothing takes it back
        self.turn_id = uuid.uuid4().hex
        self.state = "queued"
        self.kind = "cold"  # warm, spare or cold: how its process was found
        self.start_offset = 0
        self.end_offset: int | None = None
        self.ended: Deferred[None] = Deferred()
        self.prepared: Deferred[None] = succeed(None)  # a new session's workspace and log exist
        self.stop_reason: str | None = None
        self.timeout_kind: str | None = None
        self.outcome = "ok"
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.output_seen = False
        self.began = False
        self.lines = 0
        self.usage: dict[str, dict[str, float]] = {}  # model -> cost_usd and tokens, from its result
        self.accepted_at = self.last_stdout = now


class LiveSession:
    """One session (or a spare waiting to become one): its process, its running turn, its log."""

    def __init__(self, host: Host, session_id: str, workspace: str, log_: EventLog, spare: bool = False) -> None:
        self.host = host
        self.clock = host.clock
        self.session_id = session_id
        self.workspace = workspace
        self.log = log_
        self.spare = spare
        self.known_to_cli = not spare  # False: the CLI has no transcript yet, start it with --session-id
        self.state = COLD
        self.process: CliProcess | None = None
        self.options: SpawnOptions | None = None
        self.model: str | None = None  # what the live process runs with now (None: the CLI's default)
        self.permission_mode = "default"
        self.turn: Turn | None = None
        self.marker = b""
        self.last_used = self.clock.seconds()
        self.timers = Timers(self.clock)
        self.forgotten = False  # a new session that never came to be: no row, its files go with the process
        self.on_gone: list[Deferred[None]] = []
        self._swept: Deferred[None] | None = None
        self._stopping_on_purpose = False
        self._piece_head = b""
        self._piece_tail = b""
        self._piece_result = False

    def _move(self, event: str) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise RuntimeError(f"session {self.session_id}: no transition from {self.state} on {event}") from None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def can_take(self, options: SpawnOptions) -> bool:
        """A turn with these options can be written to the live process now."""
        return self.state in (STARTING, IDLE) and self.options == options and self.turn is None

    # ---------------------------------------------------------------- the process

    def spawn(self, options: SpawnOptions, model: str | None = None, permission_mode: str = "default") -> None:
        """
        Start the CLI: resume the session if the CLI knows it, else create it under our id. Raises what
        the spawn raised (the session stays cold). A spare is sent ``initialize`` so that it does its
        start-up now and says when it is ready; a process started for a waiting turn gets the turn.
        """
        self.marker = b"CLAUDESRV_RUN_ID=" + uuid.uuid4().hex.encode()
        self.model, self.permission_mode = model, permission_mode
        self.process = self.host.spawn_cli(self, options, self.known_to_cli)
        self._move("spawn")
        self.options = options
        self._swept = None
        self._stopping_on_purpose = False
        if self.spare:
            self.process.request("initialize", hooks=None).addCallback(self._initialized)

    def _initialized(self, response: dict[str, Any]) -> None:
        if self.state in (STARTING, RUNNING, STOPPING) and self.process is not None and not self.process.ended:
            was = self.state
            self._move("ready")
            if was == STARTING:
                self.host.became_idle(self)

    def sleep(self, reason: str) -> None:
        """Put an idle process to sleep: close its stdin, and if it does not exit, the signal ladder."""
        if self.state not in (STARTING, IDLE) or self.process is None:
            return
        log.info("session {session_id}: CLI {pid} put to sleep ({reason})", session_id=self.session_id,
                 pid=self.pid, reason=reason)
        self._stop_process()

    def _stop_process(self) -> None:
        """Close stdin; if the CLI does not exit, SIGTERM after the grace and SIGKILL after that (a ladder
        already under way, that of an interrupted turn, goes on as it is)."""
        assert self.process is not None
        if self.state != STOPPING:
            self._move("stop")
        self._stopping_on_purpose = True
        self.timers.cancel("warm_idle")
        if not self.timers.active("sigkill"):
            grace = self.host.limits.kill_grace
            self.timers.set("sigterm", grace, lambda: self._signal(signal.SIGTERM))
            self.timers.set("sigkill", grace + TERM_GRACE, self._kill)
        self.process.close_stdin()  # may end it at once

    def shutdown(self, reason: str = "server_shutdown") -> None:
        """The daemon stops (or the session is abandoned): interrupt the turn, close stdin, then the ladder."""
        if self.turn is not None:
            self.interrupt(reason)
        if self.process is not None and self.state != COLD:
            self._stop_process()

    def _signal(self, signal_number: int) -> None:
        if self.process is not None:
            self.process.signal_group(signal_number)

    def _kill(self) -> None:
        if self.process is None or self.process.ended:
            return
        self.process.signal_group(signal.SIGKILL)
        self._sweep()

    def _sweep(self) -> None:
        if self._swept is None:
            self._swept = self.host.sweep(self.marker)

    # ---------------------------------------------------------------- turns

    def begin(self, turn: Turn) -> None:
        """Write the turn's message to the live process (which may still be starting)."""
        assert self.process is not None and self.turn is None
        self._move("begin")
        self.timers.cancel("warm_idle")
        self.turn = turn
        turn.state = "running"
        turn.began = True
        turn.last_stdout = self.clock.seconds()
        self._configure(turn)
        limits = self.host.limits
        self.timers.set_if("run_timeout", limits.run_timeout, lambda: self.interrupt("timeout", "run"))
        self.timers.set_if("idle", limits.idle_timeout, self._idle_check)

    def _configure(self, turn: Turn) -> None:
        """Switch the warm process to the turn's model and permission mode (control requests, answered in
        milliseconds), then write the turn's message. The process's own options were chosen at spawn."""
        assert self.process is not None
        request = turn.request
        changes = []
        if request.model != self.model:
            fields = {"model": request.model} if request.model else {}  # none: back to the CLI's default
            changes.append(self.process.request("set_model", **fields).addCallback(
                self._changed, "model", request.model))
        if request.permission_mode and request.permission_mode != self.permission_mode:
            changes.append(self.process.request("set_permission_mode", mode=request.permission_mode).addCallback(
                self._changed, "permission_mode", request.permission_mode))
        if not changes:
            self.process.send(command.user_message(request.prompt))
            return
        gatherResults(changes).addCallback(self._configured, turn)

    def _changed(self, response: dict[str, Any], name: str, value: str | None) -> str | None:
        """A set_model or set_permission_mode answered: what the process runs with now, or why it refused."""
        if response.get("subtype") == "success":
            setattr(self, name, value)
            return None
        return f"{name} {value!r}: {response.get('error')}"

    def _configured(self, refusals: list[str | None], turn: Turn) -> None:
        if self.turn is not turn or self.process is None or self.process.ended:
            return  # the process died meanwhile: its turn ends with its synthetic result
        refused = [r for r in refusals if r]
        if refused:
            self.write_error_result(turn, f"the Claude CLI refused the turn's {refused[0]}", "invalid_option")
            return
        if turn.stop_reason is not None:  # stopped before its message was written
            self.write_error_result(turn, "the turn was stopped before it began", turn.stop_reason)
            return
        self.process.send(command.user_message(turn.request.prompt))

    def _idle_check(self) -> None:
        turn = self.turn
        if turn is None:
            return
        limit = self.host.limits.idle_timeout
        if self.host.approvals.waiting(self):  # the CLI is quiet because it waits for a person
            turn.last_stdout = self.clock.seconds()
        quiet = self.clock.seconds() - turn.last_stdout
        if quiet >= limit:
            self.interrupt("timeout", "idle")
        else:
            self.timers.set("idle", limit - quiet, self._idle_check)

    def interrupt(self, reason: str, timeout_kind: str | None = None) -> None:
        """Stop the running turn: the interrupt request now; SIGINT, SIGTERM, SIGKILL if it does not end."""
        turn = self.turn
        if turn is None or turn.stop_reason is not None:
            return
        turn.stop_reason = reason
        turn.timeout_kind = timeout_kind
        log.info("turn {turn_id} of session {session_id} interrupted: {reason}", turn_id=turn.turn_id,
                 session_id=self.session_id, reason=reason + (f" ({timeout_kind})" if timeout_kind else ""))
        assert self.process is not None
        self.host.approvals.cancel(self)
        grace = self.host.limits.kill_grace
        self.timers.set("sigint", grace, lambda: self._signal(signal.SIGINT))
        self.timers.set("sigterm", grace + TERM_GRACE, lambda: self._signal(signal.SIGTERM))
        self.timers.set("sigkill", grace + 2 * TERM_GRACE, self._kill)
        self.process.request("interrupt")  # its result may end the turn (and these timers) at once

    def _end_turn(self) -> None:
        """The turn's result is in the log."""
        turn = self.turn
        assert turn is not None
        self.turn = None
        self.host.approvals.cancel(self)
        self.timers.cancel("run_timeout", "idle")
        if self.state != STOPPING:  # a process being stopped keeps its ladder: it may ignore stdin EOF
            self.timers.cancel("sigint", "sigterm", "sigkill")
        turn.state = "ended"
        turn.end_offset = self.log.end
        self.last_used = self.clock.seconds()
        if self.state == RUNNING:
            self._move("result")
        self.log.turn_ended()
        self.host.turn_ended(self, turn)
        turn.ended.callback(None)
        if self.state == IDLE:
            self.host.became_idle(self)

    # ---------------------------------------------------------------- what the CLI says (CliOwner)

    def cli_lines(self, lines: list[bytes], joined: bytes) -> None:
        turn = self.turn
        if turn is None:
            self.log.append_lines(lines)
            return
        turn.last_stdout = self.clock.seconds()
        if not turn.output_seen:
            turn.output_seen = True
            self.host.turn_output(self, turn)
        if RESULT_MARK not in joined:  # one C-level scan, not a Python loop over the lines
            turn.lines += len(lines)
            self.log.append_lines(lines)
            return
        for i, line in enumerate(lines):
            result = _result_of(line) if RESULT_MARK in line else None
            if result is None:
                continue
            if i:
                self.log.append_lines(lines[:i])
            turn.lines += i + 1
            turn.usage = usage_of(result)
            self.host.approvals.cancel(self)  # what still waits is resolved before the turn's last event
            self.log.append(self._rewrite(turn, line, result))
            self._end_turn()
            if i + 1 < len(lines):
                rest = lines[i + 1:]
                self.cli_lines(rest, b"\n".join(rest))
            return
        turn.lines += len(lines)
        self.log.append_lines(lines)

    def _rewrite(self, turn: Turn, line: bytes, result: dict[str, Any]) -> bytes:
        """A result of a turn we stopped says why; one of a CLI without (valid) credentials says so and what to
        set, in ``errors``. The CLI's own reason is kept beside ours, its text as it was."""
        if result.get("is_error"):
            turn.outcome = turn.stop_reason if turn.stop_reason in (*STOP_REASONS, "disconnected") else "error"
        stopped = turn.stop_reason in STOP_REASONS
        problem = auth_problem(result) if result.get("is_error") and not stopped else None
        if not stopped and problem is None:
            return line
        result["cli_terminal_reason"] = result.get("terminal_reason")
        result["terminal_reason"] = turn.stop_reason if stopped else NOT_AUTHENTICATED
        if turn.timeout_kind:
            result["timeout"] = turn.timeout_kind
        if problem is not None:
            errors = result.get("errors")
            result["errors"] = [*(errors if isinstance(errors, list) else []), problem]
            log.warn("turn {turn_id} of session {session_id}: {reason}: {problem}", turn_id=turn.turn_id,
                     session_id=self.session_id, reason=NOT_AUTHENTICATED, problem=problem)
        return json.dumps(result, separators=(",", ":")).encode()

    def cli_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A long line, logged as it arrives; a result is recognised from its head or a sliding window."""
        turn = self.turn
        if turn is not None:
            turn.last_stdout = self.clock.seconds()
            turn.output_seen = True
        if first:
            self._piece_head = piece[:32]
            self._piece_tail = b""
            self._piece_result = False
        window = self._piece_tail + piece[:len(RESULT_MARK)]
        if RESULT_MARK in window or RESULT_MARK in piece:
            self._piece_result = True
        self._piece_tail = (self._piece_tail + piece[-len(RESULT_MARK):])[-len(RESULT_MARK):]
        self.log.append_piece(piece, first, last)
        if last and turn is not None:
            turn.lines += 1
            head = self._piece_head
            is_result = head.startswith(b'{"type":"result"') if head.startswith(b'{"type":"') else self._piece_result
            if is_result:
                self._end_turn()

    def cli_control(self, message: dict[str, Any]) -> None:
        """The CLI asks us something (only tool approvals are served), or gives up asking."""
        if self.process is None:
            return
        request_id = str(message.get("request_id"))
        if message.get("type") == "control_cancel_request":
            self.host.approvals.cancel(self, request_id)
            return
        if message.get("type") != "control_request":
            return
        request = message.get("request") or {}
        if request.get("subtype") != "can_use_tool":
            self.process.send(command.control_error(
                request_id, f"claudesrv does not serve {request.get('subtype')!r} requests"))
            return
        self.host.approvals.ask(self, request_id, request)

    def cli_exited(self) -> None:
        """The CLI is gone: kill what it left (its group, and tools in sessions of their own). No turn may be
        written to it from now on, though its last output may still be on the way."""
        if self.state in (STARTING, IDLE, RUNNING):
            self._move("stop")
        if self.process is not None:
            self.process.signal_group(signal.SIGKILL)
        self._sweep()

    def cli_ended(self, exit_code: int | None, signal_number: int | None, stderr: bytes) -> None:
        self.timers.cancel("sigint", "sigterm", "sigkill", "warm_idle")
        self._sweep()
        assert self._swept is not None
        unexpected = not self._stopping_on_purpose
        if b"already in use" in stderr:  # the CLI has this session after all: resume it from now on
            self.known_to_cli = True
        if self.state != STOPPING:  # no turn may be written to it while it is swept
            self._move("stop")
        self.host.approvals.cancel(self)
        turn = self.turn
        if turn is not None:
            turn.exit_code = exit_code
            turn.signal = signal_number
            turn.outcome = "error"
            if turn.new_session and not turn.output_seen:
                d = self.host.forget_new_session(self)
                d.addBoth(lambda _: self._synthetic_result(turn, exit_code, signal_number, stderr))
                self._swept.addBoth(lambda _: d)
            else:
                self._synthetic_result(turn, exit_code, signal_number, stderr)
        if turn is None and unexpected:
            log.warn("session {session_id}: the idle CLI {pid} exited ({how}); the next turn resumes it cold",
                     session_id=self.session_id, pid=self.pid,
                     how=f"code {exit_code}" if exit_code is not None else f"signal {signal_number}")
        self._swept.addBoth(lambda _: self._gone(unexpected))

    def _synthetic_result(self, turn: Turn, exit_code: int | None, signal_number: int | None,
                          stderr: bytes) -> None:
        if self.turn is not turn:
            return
        how = f"exited with code {exit_code}" if exit_code is not None else f"was killed by signal {signal_number}"
        text = stderr.decode("utf-8", "replace").strip()
        message = f"the Claude CLI {how} without a result"
        if text:
            message += ": " + text.splitlines()[-1]
        self.write_error_result(turn, message, turn.stop_reason or "cli_failed", exit_code=exit_code,
                                signal=signal_number, stderr=stderr.decode("utf-8", "replace"))

    def write_error_result(self, turn: Turn, message: str, reason: str, **extra: Any) -> None:
        """The result event the CLI did not write, in the CLI's own shape; it ends the turn."""
        payload: dict[str, Any] = {
            "type": "result", "subtype": "error_during_execution", "is_error": True,
            # a session that never came to be (and is removed) is not named: nobody should try to resume it
            "session_id": None if self.never_came_to_be(turn) else self.session_id,
            "terminal_reason": reason, "errors": [message],
            "exit_code": None, "signal": None, "stderr": "",
        }
        if turn.timeout_kind:
            payload["timeout"] = turn.timeout_kind
        payload.update(extra)
        if turn.stop_reason in (*STOP_REASONS, "disconnected"):
            turn.outcome = turn.stop_reason
        else:
            turn.outcome = "error"
        if turn.state == "queued":  # never reached a process
            turn.state = "running"
            self.turn = turn
        if self.never_came_to_be(turn):  # nothing of it may be left once its client has the result
            self.host.remove_workspace(self)
        self.host.approvals.cancel(self)  # what still waits is resolved before the turn's last event
        self.log.append(event_line(payload))
        self._end_turn()

    def never_came_to_be(self, turn: Turn) -> bool:
        """A new session whose first turn ends with no CLI having said anything: it is removed."""
        return self.forgotten or (turn.new_session and not turn.output_seen and self.process is None)

    def _gone(self, unexpected: bool) -> None:
        self.timers.cancel()
        pid = self.process.pgid if self.process is not None else None
        self.process = None
        self.options = None
        if self.state != COLD:
            self._move("gone")
        log.debug("session {session_id}: CLI {pid} gone", session_id=self.session_id, pid=pid)
        self.host.process_gone(self, unexpected)
        waiters, self.on_gone = self.on_gone, []
        for d in waiters:
            d.callback(None)


USAGE_KEYS = {"costUSD": "cost_usd", "inputTokens": "input_tokens", "outputTokens": "output_tokens",
              "cacheReadInputTokens": "cache_read_tokens", "cacheCreationInputTokens": "cache_creation_tokens"}


def usage_of(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A turn's cost and tokens by model, from its result: ``model_usage_since_last_result`` (the process's
    ``modelUsage`` counts from its start, so it is the turn's only for a CLI without the former)."""
    by_model = result.get("model_usage_since_last_result")
    if not isinstance(by_model, dict):
        by_model = result.get("modelUsage")
    usage: dict[str, dict[str, float]] = {}
    for model, figures in (by_model or {}).items():
        if isinstance(figures, dict):
            usage[str(model)] = {ours: float(figures.get(theirs) or 0) for theirs, ours in USAGE_KEYS.items()
                                 if isinstance(figures.get(theirs, 0), (int, float))}
    return usage


def auth_problem(result: dict[str, Any]) -> str | None:
    """What to do about an error result that says the CLI has no credentials (CLI 2.1.330: ``Not logged in ·
    Please run /login``) or that the API refused them (a 401: ``Invalid API key · Fix external API key``, recording
    g3_FAIL401_retries0); None for any other result."""
    errors = result.get("errors")
    said = " ".join(text for text in [result.get("result"), *(errors if isinstance(errors, list) else [])]
                    if isinstance(text, str))
    if "Not logged in" in said or "Please run /login" in said:
        return f"the Claude CLI has no credentials: {LOGIN_HINT}"
    if result.get("api_error_status") == 401 or result.get("api_error_type") == "authentication_error":
        return ("the API refused the Claude CLI's credentials (HTTP 401): check ANTHROPIC_API_KEY in the daemon's "
                "environment, or log the CLI in again with `claude /login` as the daemon's user")
    return None


def _result_of(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("type") == "result" else None
