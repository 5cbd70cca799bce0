"""
The daemon in process: the real routes, registry, live sessions, event logs and SQL, with a Clock for
every timer, StubTreq for HTTP, and CLI processes played in memory from the real CLI's recordings
(``tests/fixtures/claude-cli-sdk``).

A L{ScriptedCli} answers the way the recordings show CLI 2.1.330 answering in SDK streaming mode:
``initialize`` gets the recorded response, a user message gets the recorded ``system/init``,
``assistant`` and ``result`` lines, an ``interrupt`` the recorded aborted ending, stdin EOF an exit 0,
SIGINT/SIGTERM what s07c/s07d/s07e show. A test can also hold a turn open (L{ScriptedCli.hold}) and
write lines itself.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import uuid
from typing import Any

from klein import Klein  # noqa: F401  (the resource under test is Klein's)
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from claudesrv.app import ClaudeAPI, ClaudeExecutable
from claudesrv.live import Limits
from claudesrv.metrics import registry_for
from claudesrv.process import CliProcess
from claudesrv.registry import SessionRegistry
from claudesrv.sessions import Readiness, Sessions
from claudesrv.store import InlineSqlite, SessionStore
from claudesrv.workspaces import Workspaces
from tests.support import SSEParser

HERE = os.path.dirname(os.path.abspath(__file__))
SDK_FIXTURES = os.path.join(HERE, "fixtures", "claude-cli-sdk")


def recording(name: str) -> list[tuple[str, str]]:
    """(direction, line) of a recording, in order."""
    with open(os.path.join(SDK_FIXTURES, name + ".jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [(row["dir"], row["line"]) for row in rows if row["dir"] in ("in", "out")]


def _outputs_between(name: str, after_in: int, count_in: int = 1) -> list[str]:
    """The stdout lines that followed the C{after_in}-th stdin line (0-based), up to the next stdin line."""
    seen = -1
    out: list[str] = []
    for direction, line in recording(name):
        if direction == "in":
            seen += 1
            if seen > after_in + count_in - 1:
                break
        elif seen >= after_in:
            out.append(line)
    return out


# the lines the real CLI wrote, kept as templates
INIT_RESPONSE = _outputs_between("s01_init_three_turns", 0)[0]
TURN = _outputs_between("s01_init_three_turns", 1)  # system/init, assistant, result
INTERRUPTED = [line for line in _outputs_between("s03a_interrupt_slow", 2)
               if not line.startswith('{"type":"control_response"')]  # aborted assistant, user, result
TEMPLATE_SID = json.loads(TURN[0])["session_id"]
INTERRUPT_SID = json.loads(INTERRUPTED[-1])["session_id"]


class FakeTransport:
    """Stands where Twisted's process transport stands."""

    def __init__(self, cli: ScriptedCli, pid: int) -> None:
        self.cli = cli
        self.pid: int | None = pid

    def write(self, data: bytes) -> None:
        self.cli.stdin_data(data)

    def closeStdin(self) -> None:
        self.cli.stdin_closed()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class ScriptedCli:
    """One CLI process in memory."""

    def __init__(self, world: FakeWorld, protocol: CliProcess, argv: list[str], env: dict[str, str], cwd: str,
                 pid: int) -> None:
        self.world = world
        self.protocol = protocol
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.pid = pid
        self.session_id = next(a.split("=", 1)[1] for a in argv if a.startswith(("--session-id=", "--resume=")))
        self.stdin: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.buffer = b""
        self.alive = True
        self.turns = 0
        self.in_turn = False
        self.holding = world.hold_turns
        self.signals: list[int] = []
        self.ignore_signals = False
        self.ignore_interrupt = False
        self.asking: str | None = None  # the id of our open can_use_tool request
        self.refuse: str | None = None  # the error of every control request but initialize and interrupt
        self.transport = FakeTransport(self, pid)

    # ---------------------------------------------------------------- what the host writes

    def stdin_data(self, data: bytes) -> None:
        assert self.alive, "a write to a CLI that has exited"
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)  # the real CLI dies on a non-JSON line: so does the test
            self.stdin.append(message)
            self._answer(message)

    def _answer(self, message: dict[str, Any]) -> None:
        if self.world.silent:
            return
        if message["type"] == "control_request":
            request_id = message["request_id"]
            subtype = message["request"]["subtype"]
            if subtype == "initialize":
                self.say(INIT_RESPONSE.replace('"req_1_2935e6d0"', json.dumps(request_id)))
            elif subtype == "interrupt":
                if self.ignore_interrupt:
                    return
                if self.asking is not None:  # s02d: the open request is cancelled first
                    self.say(json.dumps({"type": "control_cancel_request", "request_id": self.asking}))
                    self.asking = None
                self.say(json.dumps({"type": "control_response", "response": {
                    "subtype": "success", "request_id": request_id, "response": {"still_queued": []}}},
                    separators=(",", ":")))
                if self.in_turn:
                    self.end_turn(interrupted=True)
            elif self.refuse is not None:
                self.respond(request_id, None, self.refuse)
            elif subtype == "set_model":  # s05: a replayed user line, then the model
                model = message["request"].get("model") or "claude-opus-5-5"
                self.say(json.dumps({"type": "user", "message": {"role": "user", "content": (
                    f"<local-command-stdout>Set model to `{model}`</local-command-stdout>")}, "isReplay": True}))
                self.respond(request_id, {"model": model})
            elif subtype == "set_permission_mode":
                mode = message["request"]["mode"]
                if mode == "bypassPermissions" and "--dangerously-skip-permissions" not in self.argv:
                    self.respond(request_id, None, "Cannot set permission mode to bypassPermissions because the "
                                 "session was not launched with --dangerously-skip-permissions")
                else:
                    self.respond(request_id, {"mode": mode})
            return
        if message["type"] == "control_response":
            if message["response"]["request_id"] == self.asking:
                self.asking = None
            self.answers.append(message["response"])
            return
        if message["type"] == "user":
            self.turns += 1
            self.in_turn = True
            self.say(TURN[0].replace(TEMPLATE_SID, self.session_id))
            if not self.holding:
                self.end_turn()

    def respond(self, request_id: str, response: dict[str, Any] | None, error: str | None = None) -> None:
        if error is not None:
            body: dict[str, Any] = {"subtype": "error", "request_id": request_id, "error": error}
        else:
            body = {"subtype": "success", "request_id": request_id, "response": response}
        self.say(json.dumps({"type": "control_response", "response": body}))

    def stdin_closed(self) -> None:
        """stdin EOF: an idle CLI exits 0 (s07a); a busy one finishes its turn first (s07b)."""
        if self.in_turn:
            self.end_turn()
        self.exit(0)

    # ---------------------------------------------------------------- what the CLI prints

    def say(self, line: str) -> None:
        if self.alive:
            self.protocol.outReceived(line.encode() + b"\n")

    def end_turn(self, interrupted: bool = False) -> None:
        lines = INTERRUPTED if interrupted else TURN[1:]
        sid = INTERRUPT_SID if interrupted else TEMPLATE_SID
        for line in lines:
            self.say(line.replace(sid, self.session_id))
        self.in_turn = False

    def ask(self, tool: str = "Bash") -> str:
        """A can_use_tool request as s02a (Bash) or s09 (AskUserQuestion) shows it, under a fresh id; that id."""
        name = "s09_ask_user_question" if tool == "AskUserQuestion" else "s02a_cut_allow_updated_input"
        line = next(text for direction, text in recording(name)
                    if direction == "out" and '"subtype":"can_use_tool"' in text)
        message = json.loads(line)
        request_id = self.asking = message["request_id"] = str(uuid.uuid4())
        self.say(json.dumps(message))  # may be answered at once
        return request_id

    def hold(self) -> None:
        """Later turns stay open (after their system/init) until L{end_turn} or an interrupt."""
        self.holding = True

    # ---------------------------------------------------------------- signals and the end

    def signal(self, signal_number: int) -> None:
        self.signals.append(signal_number)
        if not self.alive or self.ignore_signals:
            return
        if signal_number == signal.SIGINT:
            if self.in_turn:
                self.end_turn(interrupted=True)
            self.exit(0)
        elif signal_number == signal.SIGTERM:
            self.exit(None, signal.SIGTERM)
        elif signal_number == signal.SIGKILL:
            self.exit(None, signal.SIGKILL)

    def exit(self, code: int | None, signal_number: int | None = None) -> None:
        if not self.alive:
            return
        self.alive = False
        self.transport.pid = None
        if code == 0:
            reason: Failure = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=code, signal=signal_number))
        self.protocol.processExited(reason)
        self.protocol.processEnded(reason)


class FakeWorld:
    """The spawner, the process groups and the marker sweep, all in memory."""

    def __init__(self) -> None:
        self.clis: list[ScriptedCli] = []
        self.next_pid = 40000
        self.hold_turns = False
        self.silent = False  # new CLIs print nothing at all
        self.fail_spawn: Exception | None = None
        self.swept: list[bytes] = []

    def spawn(self, protocol: CliProcess, argv: list[str], env: dict[str, str], cwd: str) -> None:
        if self.fail_spawn is not None:
            raise self.fail_spawn
        self.next_pid += 1
        cli = ScriptedCli(self, protocol, argv, env, cwd, self.next_pid)
        self.clis.append(cli)
        protocol.makeConnection(cli.transport)

    def killpg(self, pgid: int, signal_number: int) -> None:
        for cli in self.clis:
            if cli.pid == pgid:
                cli.signal(signal_number)
                return
        raise ProcessLookupError(pgid)

    def kill(self, markers: list[bytes]) -> Deferred[None]:
        self.swept += markers
        return succeed(None)

    def alive(self) -> list[ScriptedCli]:
        return [c for c in self.clis if c.alive]

    def of(self, session_id: str) -> list[ScriptedCli]:
        return [c for c in self.clis if c.session_id == session_id]


class HeldSqlite(InlineSqlite):
    """The database as slow as a test wants: while C{held}, interactions wait, in order, for L{release}."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.held = False
        self.waiting: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(self, interaction: Any, *args: Any) -> Deferred[Any]:
        if not self.held:
            return super().run(interaction, *args)
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, interaction, args))
        return d

    def release(self) -> None:
        """Run what waits, in order, like a pool of one connection: work asked for meanwhile queues behind."""
        while self.waiting:
            d, interaction, args = self.waiting.pop(0)
            super().run(interaction, *args).chainDeferred(d)
        self.held = False


class Daemon:
    """The whole daemon in process."""

    def __init__(self, base: str, limits: Limits | None = None, world: FakeWorld | None = None,
                 clock: Clock | None = None) -> None:
        self.base = base
        self.clock = clock or Clock()
        self.clock.advance(1_800_000_000)  # a plausible date for the timestamps
        self.world = world or FakeWorld()
        self.limits = limits or Limits(spares=0, keepalive=0, idle_timeout=0, run_timeout=0)
        self.db = HeldSqlite(os.path.join(base, "sessions.db"))
        self.store = SessionStore(self.db, self.clock)
        self.store.start()
        self.workspaces = Workspaces(os.path.join(base, "Workspace"))
        self.workspaces.ensure_root()
        self.registry = SessionRegistry(self.clock, self.world.spawn, self.store, self.workspaces,
                                        lambda: "/usr/bin/claude", {"PATH": "/usr/bin"}, self.limits,
                                        os.path.join(base, "events"), kill=self.world.kill,
                                        killpg=self.world.killpg, blocking=maybeDeferred)
        self.sessions = Sessions(self.store, self.workspaces, self.registry, {"HOME": base},
                                 blocking=maybeDeferred)
        cli = ClaudeExecutable("/bin/sh", {})
        registry, _ = registry_for(self.registry)
        self.api = ClaudeAPI(self.registry, self.store, self.workspaces, cli, self.sessions,
                             Readiness(self.store, self.workspaces, self.registry, cli), registry)
        self.http: Any = StubTreq(self.api.resource())
        self.registry.open()

    def close(self) -> None:
        self.db.close()

    def post(self, body: dict[str, Any]) -> Stream:
        """Start a POST /api/claude and read what has arrived so far."""
        return self._stream(lambda: self.http.post("http://localhost/api/claude", json=body))

    def events(self, session_id: str, query: str = "", headers: dict[str, str] | None = None) -> Stream:
        return self._stream(lambda: self.http.get(f"http://localhost/api/sessions/{session_id}/events{query}",
                                                  headers=headers or {}))

    def _stream(self, send: Any) -> Stream:
        stream = Stream(self)
        pumps = self._pumps()
        before = set(pumps)
        d = send()
        stream.pump = next(iter(set(pumps) - before))
        d.addCallbacks(stream.response, stream.never_answered)
        self.pump()
        return stream

    def _pumps(self) -> Any:
        return self.http._agent._pumps

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """A plain JSON request, answered at once."""
        d = self.http.request(method, "http://localhost" + path, **kwargs)
        self.pump()
        results: list[Any] = []
        d.addCallback(lambda r: self.http.content(r).addCallback(lambda body: results.append((r.code, body))))
        self.pump()
        code, body = results[0]
        return code, json.loads(body) if body else None

    def pump(self) -> None:
        """Deliver what is in flight, and run what the daemon left for after its I/O."""
        for _ in range(3):
            self.http.flush()
            self.clock.advance(0)
        self.http.flush()


class Stream:
    """One HTTP answer read as it arrives."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon: Any = daemon
        self.code = 0
        self.headers: Any = None
        self.sse = SSEParser()
        self.done = False
        self.body: Deferred[Any] | None = None
        self.pump: Any = None

    def response(self, response: Any) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = self.daemon.http.collect(response, self.sse.feed)
        self.body.addBoth(self._ended)

    def _ended(self, result: Any) -> None:
        self.done = True

    def never_answered(self, failure: Any) -> None:
        """The connection went before the response began (a client that left early)."""
        self.done = True
        self.failure = failure

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name) if self.headers is not None else None
        return values[0] if values else None

    @property
    def session_id(self) -> str:
        sid = self.header("X-Session-Id")
        assert sid is not None
        return sid

    def events(self) -> list[dict[str, Any]]:
        self.daemon.pump()
        return self.sse.events()

    def types(self) -> list[Any]:
        return [e.get("subtype") if e.get("type") in ("claudesrv", "system") and e.get("subtype") else e["type"]
                for e in self.events()]

    def disconnect(self) -> None:
        """The client's connection drops."""
        self.pump.clientIO.abortConnection()
        self.daemon.pump()


class DaemonTestCase(SynchronousTestCase):
    """A test with the daemon in process: C{self.daemon(**limits)} makes one in a fresh data dir."""

    def daemon(self, **limits: Any) -> Daemon:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        values: dict[str, Any] = {"spares": 0, "keepalive": 0, "idle_timeout": 0, "run_timeout": 0, "kill_grace": 5}
        values.update(limits)
        daemon = Daemon(self.base, Limits(**values))
        self.addCleanup(daemon.close)
        return daemon

    def rows(self) -> list[tuple[str, str]]:
        with sqlite3.connect(os.path.join(self.base, "sessions.db")) as db:
            return list(db.execute("SELECT claude_session_id, workspace_path FROM sessions"))
