"""
What the integration tests share: a real ``twistd -n claudesrv`` with the fake CLI, and an SSE client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import sys
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_claude.py")
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class SSEParser:
    """A strict client-side reading of an SSE stream: data frames and comments, in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.frames: list[bytes] = []
        self.comments: list[bytes] = []
        self.ids: list[int] = []
        self.raw = bytearray()

    def feed(self, data: bytes) -> None:
        self.raw += data
        scan = max(0, len(self.buffer) - 1)
        self.buffer += data
        start = 0
        while True:
            end = self.buffer.find(b"\n\n", scan)
            if end < 0:
                break
            block = bytes(self.buffer[start:end])
            if block.startswith(b":"):
                self.comments.append(block)
            else:
                if block.startswith(b"id: "):
                    self.ids.append(int(block[4:block.index(b"\n")]))
                    block = block[block.index(b"\n") + 1:]
                assert block.startswith(b"data: "), block[:80]
                assert b"\n" not in block, "one data line per event"
                self.frames.append(block[len(b"data: "):])
            start = scan = end + 2
        del self.buffer[:start]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]

    def results(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("type") == "result"]


class _DaemonProtocol(ProcessProtocol):
    def __init__(self, listeners: int = 1) -> None:
        self.output = bytearray()
        self.listeners = listeners
        self.ports: list[tuple[int, bool]] = []  # (port, TLS?) of each listener, in the order they started
        self.port: Deferred[int] = Deferred()  # the first listener's, once every listener is up
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.port.called:
            found = re.findall(rb"Site (\(TLS\) )?starting on (\d+)", self.output)
            self.ports = [(int(port), bool(tls)) for tls, port in found]
            if len(self.ports) >= self.listeners:
                self.port.callback(self.ports[0][0])

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError("twistd ended before listening:\n" + self.output.decode(errors="replace")))
        self.reason = reason
        self.ended.callback(None)


def fake_env(state_dir: str) -> dict[str, str]:
    """The environment a daemon (and so the fake CLI) gets in tests: ours, the fake's state dir, and this
    interpreter's directory first on PATH, so the fake's ``#!/usr/bin/env python3`` skips any version shim
    (pyenv's costs ~0.1 s a start)."""
    env = dict(os.environ)
    env["FAKE_STATE_DIR"] = state_dir
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", os.defpath)
    return env


class Daemon:
    """A real ``twistd -n claudesrv`` on a free loopback port, in a data dir of its own."""

    def __init__(self, testcase: TestCase, *args: str, env: dict[str, str] | None = None,
                 claude: str = FAKE, listen: str = "tcp:0:interface=127.0.0.1", spares: int | None = 0) -> None:
        """C{spares}: the --spares given before C{args} (0 unless a test is about spares, so that every CLI
        started is a turn's; None: the daemon's default)."""
        self.testcase = testcase
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        self.data_dir = os.path.join(self.dir, "data")
        self.state_dir = os.path.join(self.dir, "fake-state")
        os.makedirs(self.state_dir)
        self.args = ["-n", "--pidfile=", "claudesrv", "--listen", listen, "--data-dir", self.data_dir,
                     "--claude", claude, *(("--spares", str(spares)) if spares is not None else ()), *args]
        self.env = fake_env(self.state_dir)
        self.env.update(env or {})
        self.proto = _DaemonProtocol(self.args.count("--listen"))
        self.port = 0
        self.pid = 0

    def again(self, *args: str, spares: int | None = 0) -> Daemon:
        """A new daemon (not started yet) on this one's data dir and fake state dir: a restart."""
        other = Daemon(self.testcase, *args, spares=spares)
        other.data_dir, other.state_dir = self.data_dir, self.state_dir
        other.env["FAKE_STATE_DIR"] = self.state_dir
        other.args[other.args.index("--data-dir") + 1] = self.data_dir
        return other

    def since(self) -> Since:
        """This daemon as seen from now on (see L{Since})."""
        return Since(self)

    @inlineCallbacks
    def start(self) -> Any:
        transport = reactor.spawnProcess(
            self.proto, TWISTD[0], TWISTD + self.args, env=self.env, path=self.dir)
        self.pid = transport.pid
        self.testcase.addCleanup(self.stop)
        self.port = yield self.proto.port
        plain = [port for port, tls in self.proto.ports if not tls]
        if plain:  # url is http://: the first plain listener's, when there is one besides TLS
            self.port = plain[0]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.proto.output.decode(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proto.reason is None:
            os.kill(self.pid, signum)

    @inlineCallbacks
    def stop(self) -> Any:
        """SIGTERM, then wait for the exit (SIGKILL if it takes more than 20 s)."""
        if self.proto.reason is None:
            self.signal(signal.SIGTERM)
            killer = reactor.callLater(20, self.signal, signal.SIGKILL)
            yield self.proto.ended
            if killer.active():
                killer.cancel()

    def exited_cleanly(self) -> bool:
        """twistd ends a SIGTERM shutdown by re-raising SIGTERM on itself; anything else is a failure."""
        reason = self.proto.reason
        assert reason is not None
        if reason.check(ProcessDone):
            return True
        return reason.check(ProcessTerminated) is not None and reason.value.signal == signal.SIGTERM

    # ---- what the daemon and the fake left on disk

    def rows(self) -> list[tuple[str, str]]:
        path = os.path.join(self.data_dir, "sessions.db")
        if not os.path.exists(path):
            return []
        with sqlite3.connect(path) as db:
            try:
                return list(db.execute("SELECT claude_session_id, workspace_path FROM sessions"))
            except sqlite3.OperationalError as e:  # a daemon that has just started may not have made it yet
                if "no such table" in str(e):
                    return []
                raise

    def workspaces(self) -> list[str]:
        root = os.path.join(self.data_dir, "Workspace")
        return sorted(os.listdir(root)) if os.path.isdir(root) else []

    def invocations(self) -> list[dict[str, Any]]:
        """One record per CLI process started (spares included), in order."""
        return state_lines(self.state_dir, "invocations.jsonl")

    def turns(self) -> list[dict[str, Any]]:
        """One record per turn a CLI process started: pid, session_id, prompt, tools, ..."""
        return state_lines(self.state_dir, "turns.jsonl")

    def stdin(self) -> list[dict[str, Any]]:
        """Every stdin line the CLI processes received, parsed, with the receiving pid under "pid"."""
        return stdin_messages(self.state_dir)

    def interrupts(self) -> list[int]:
        return interrupts(self.state_dir)

    def grandchildren(self) -> list[int]:
        return grandchildren(self.state_dir)

    def signals(self) -> list[str]:
        return signals(self.state_dir)


class Since:
    """A daemon as seen from one moment on, for tests that share a daemon: its log, the fake's records, the
    rows and the workspaces are only those that came after that moment; everything else is the daemon's."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.skip = {name: len(state_lines(daemon.state_dir, name))
                     for name in ("invocations.jsonl", "turns.jsonl", "stdin.jsonl")}
        self.skip_signals = len(signalled(daemon.state_dir))
        self.skip_grandchildren = len(grandchildren(daemon.state_dir))
        self.skip_log = len(daemon.proto.output)
        self.old_rows = set(daemon.rows())
        self.old_workspaces = set(daemon.workspaces())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.daemon, name)

    @property
    def log(self) -> str:
        return self.daemon.proto.output[self.skip_log:].decode(errors="replace")

    def rows(self) -> list[tuple[str, str]]:
        return [row for row in self.daemon.rows() if row not in self.old_rows]

    def workspaces(self) -> list[str]:
        return [name for name in self.daemon.workspaces() if name not in self.old_workspaces]

    def _lines(self, name: str) -> list[dict[str, Any]]:
        return state_lines(self.daemon.state_dir, name)[self.skip[name]:]

    def invocations(self) -> list[dict[str, Any]]:
        return self._lines("invocations.jsonl")

    def turns(self) -> list[dict[str, Any]]:
        return self._lines("turns.jsonl")

    def stdin(self) -> list[dict[str, Any]]:
        return stdin_messages(self.daemon.state_dir, self.skip["stdin.jsonl"])

    def interrupts(self) -> list[int]:
        return interrupts(self.daemon.state_dir, self.skip["stdin.jsonl"])

    def grandchildren(self) -> list[int]:
        return grandchildren(self.daemon.state_dir)[self.skip_grandchildren:]

    def signals(self) -> list[str]:
        return [name for _, name in signalled(self.daemon.state_dir)[self.skip_signals:]]


def state_lines(state_dir: str, name: str) -> list[dict[str, Any]]:
    """The JSON lines of one of the fake's state files (empty if it was never written)."""
    path = os.path.join(state_dir, name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stdin_messages(state_dir: str, skip: int = 0) -> list[dict[str, Any]]:
    """What the fake read on stdin, one parsed message per line (after the first C{skip} lines), each with the
    reader's "pid" added."""
    return [{**json.loads(row["line"]), "pid": row["pid"]} for row in state_lines(state_dir, "stdin.jsonl")[skip:]
            if row["line"].strip()]


def interrupts(state_dir: str, skip: int = 0) -> list[int]:
    """The pids that were sent an ``interrupt`` control request, once per request."""
    return [m["pid"] for m in stdin_messages(state_dir, skip)
            if m.get("type") == "control_request" and m["request"].get("subtype") == "interrupt"]


def grandchildren(state_dir: str) -> list[int]:
    """Pids of the fake's grandchildren (knob grandchild=1), in their own sessions."""
    path = os.path.join(state_dir, "grandchildren")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def signalled(state_dir: str) -> list[tuple[int, str]]:
    """(pid, signal name) of every signal the fake processes received, in order."""
    path = os.path.join(state_dir, "signals.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(int(pid), name) for pid, name in (line.split() for line in f if line.strip())]


def signals(state_dir: str) -> list[str]:
    """The names of the signals the fake received, in order."""
    path = os.path.join(state_dir, "signals.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split()[1] for line in f if line.strip()]


class Reply:
    """An HTTP answer: status, headers, and the SSE stream (or JSON body) read to its end."""

    def __init__(self, status: int, headers: Any, sse: SSEParser, phrase: bytes = b"") -> None:
        self.status = status
        self.headers = headers
        self.sse = sse
        self.phrase = phrase

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(bytes(self.sse.raw))

    @property
    def session_id(self) -> str | None:
        """The session the server put the turn in (the X-Session-Id header)."""
        return self.header("X-Session-Id")


@inlineCallbacks
def post(url: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None,
         on_frame: Any = None) -> Any:
    """POST JSON (or raw bytes) and read the whole answer."""
    data = raw if raw is not None else json.dumps(body).encode()
    hdrs: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
    for key, value in (headers or {}).items():
        hdrs[key] = value
    response = yield treq.post(url, data=data, headers=hdrs, persistent=False)
    sse = SSEParser()

    def collect(chunk: bytes) -> None:
        before = len(sse.frames)
        sse.feed(chunk)
        if on_frame is not None and len(sse.frames) > before:
            on_frame(sse)

    yield treq.collect(response, collect)
    return Reply(response.code, response.headers, sse, response.phrase)


@inlineCallbacks
def get_json(url: str, **kwargs: Any) -> Any:
    """GET url: (status, the JSON body, or the raw body if it is not a JSON object)."""
    response = yield treq.get(url, persistent=False, **kwargs)
    body = yield response.content()
    return response.code, (json.loads(body) if body and body.startswith(b"{") else body)


@inlineCallbacks
def get_stream(url: str, headers: dict[str | bytes, str | bytes] | None = None) -> Any:
    """GET an SSE stream and read it to its end: (status, L{SSEParser})."""
    response = yield treq.get(url, headers=headers or {}, persistent=False)
    sse = SSEParser()
    yield treq.collect(response, sse.feed)
    return response.code, sse


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@inlineCallbacks
def wait_for(predicate: Any, timeout: float = 10.0, step: float = 0.01) -> Any:
    """Poll until predicate() is true; fail the test after timeout seconds (of the reactor's time)."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        yield sleep(step)
    return True
