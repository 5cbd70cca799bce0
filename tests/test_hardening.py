"""
What a hostile client or a failing CLI found (issue 15): nothing of a failed new session is left when its
client hears of it; slow-header clients are cut off; connections per address are capped; a socket handed over
by systemd on loopback needs no token; and the papercuts of the API.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase

from tests.harness import DaemonTestCase
from tests.rawhttp import RawClient, raw_post
from tests.support import Daemon, fake_env, get_json, sleep, wait_for


class FailedNewSession(DaemonTestCase):
    def watch_result(self, d: Any) -> list[tuple[bool, bool]]:
        """(workspace on disk, row in the database) at the moment each result event is logged."""
        seen: list[tuple[bool, bool]] = []
        registry = d.registry
        original = registry.admit

        def admit(*args: Any) -> Any:
            turn = original(*args)
            session = registry.sessions[turn.session_id]
            append = session.log.append

            def checked(line: bytes) -> Any:
                if b'"type":"result"' in line:
                    with sqlite3.connect(os.path.join(self.base, "sessions.db")) as db:
                        rows = list(db.execute("SELECT 1 FROM sessions WHERE claude_session_id = ?",
                                               (turn.session_id,)))
                    seen.append((os.path.exists(session.workspace), bool(rows)))
                return append(line)

            session.log.append = checked  # type: ignore[method-assign]
            return turn

        registry.admit = admit
        return seen

    def test_cli_that_dies_before_output(self) -> None:
        """Its row and workspace are gone before the result that ends the stream is written."""
        d = self.daemon()
        d.world.silent = True
        seen = self.watch_result(d)
        stream = d.post({"prompt": "a"})
        [cli] = d.world.clis
        cli.exit(1)
        d.pump()
        self.assertEqual(stream.events()[-1]["terminal_reason"], "cli_failed")
        self.assertEqual(seen, [(False, False)])
        self.assertEqual(os.listdir(os.path.join(self.base, "Workspace")), [])

    def test_cli_that_cannot_start(self) -> None:
        d = self.daemon()
        d.world.fail_spawn = PermissionError(13, "Permission denied")
        seen = self.watch_result(d)
        stream = d.post({"prompt": "a"})
        self.assertEqual(stream.events()[-1]["terminal_reason"], "spawn_failed")
        self.assertEqual(seen, [(False, False)])


class Papercuts(DaemonTestCase):
    def test_index_and_times(self) -> None:
        """GET / names the server and its routes; times carry their UTC offset."""
        d = self.daemon()
        code, index = d.call("GET", "/")
        self.assertEqual((code, index["name"]), (200, "claudesrv"))
        self.assertIn("/openapi.json", index["links"].values())
        sid = d.post({"prompt": "a"}).session_id
        code, item = d.call("GET", f"/api/sessions/{sid}")
        self.assertRegex(item["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")

    def test_purge_transcript_is_true_or_false_and_delete_says_what_went(self) -> None:
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        code, error = d.call("DELETE", f"/api/sessions/{sid}?purge_transcript=yes")
        self.assertEqual((code, error["error"]["field"]), (400, "purge_transcript"))
        code, body = d.call("DELETE", f"/api/sessions/{sid}?purge_transcript=false")
        self.assertEqual((code, body["session_ids"], body["transcripts_removed"]), (200, [sid], 0))
        self.assertTrue(body["workspace"])

    def test_cli_that_is_not_executable(self) -> None:
        d = self.daemon()
        path = os.path.join(self.base, "claude")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n")
        d.api.cli.name = path
        stream = d.post({"prompt": "a"})
        error = json.loads(bytes(stream.sse.raw))["error"]
        self.assertEqual((stream.code, error["code"]), (503, "cli_not_executable"))
        self.assertIn("chmod", error["message"])


class Connection(RawClient):
    """A raw client connection that can send slowly, or nothing at all."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


@inlineCallbacks
def connect(port: int) -> Any:
    proto = Connection()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return proto


class SlowClients(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_slow_headers_cut_streams_kept_and_connections_capped(self) -> Any:
        """A client that sends its request line and headers a byte at a time is answered 408 and cut at
        --header-timeout, while an SSE stream opened before goes on past it; a client address gets at most
        --max-connections-per-ip connections, the next is answered 429 and closed."""
        daemon = yield Daemon(self, "--header-timeout", "1", "--max-connections-per-ip", "3").start()
        stream = yield raw_post(daemon.port, {"prompt": "[[fake hang=1]] wait"})
        yield stream.got_data
        slow = yield connect(daemon.port)
        request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
        for byte in request:
            if slow.closed:
                break
            slow.transport.write(bytes([byte]))
            yield sleep(0.05)
        yield slow.lost
        self.assertTrue(bytes(slow.data).startswith(b"HTTP/1.1 408"), bytes(slow.data))
        self.assertFalse(stream.closed)
        idle = yield gatherResults([connect(daemon.port) for _ in range(2)])
        refused = yield connect(daemon.port)
        yield refused.lost
        self.assertTrue(bytes(refused.data).startswith(b"HTTP/1.1 429"), bytes(refused.data))
        self.assertIn(b"--max-connections-per-ip", bytes(refused.data))
        self.assertFalse(stream.closed)
        for proto in (*idle, stream):
            proto.transport.loseConnection()
        yield gatherResults([p.lost for p in idle])
        later = yield connect(daemon.port)  # the count went down with them; a trailing slash is the same route
        later.transport.write(b"GET /api/sessions/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        yield later.lost
        self.assertTrue(bytes(later.data).startswith(b"HTTP/1.1 200 OK"), bytes(later.data))
        self.assertIn(b'"sessions"', bytes(later.data))


class _Twistd(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class SocketActivation(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_loopback_socket_needs_no_token_and_an_open_one_does(self) -> Any:
        """A socket handed over by systemd (socket activation) is judged by the address it listens on: on
        loopback the daemon starts without a token and serves on it; on a wildcard address it refuses."""
        for host, serves in (("127.0.0.1", True), ("0.0.0.0", False)):
            listener = socket.socket()
            listener.bind((host, 0))
            listener.listen()
            port = listener.getsockname()[1]
            script = ("import os, sys\n"
                      "os.environ['LISTEN_FDS'] = '1'\n"
                      "os.environ['LISTEN_FDNAMES'] = 'claudesrv'\n"  # systemd 227 on sets both
                      "os.environ['LISTEN_PID'] = str(os.getpid())\n"
                      "from twisted.scripts.twistd import run\n"
                      "sys.argv = ['twistd', '-n', '--pidfile=', 'claudesrv', '--listen', "
                      f"'systemd:domain=INET:index=0', '--data-dir', {os.path.abspath(self.mktemp())!r}, "
                      "'--spares', '0']\n"
                      "run()\n")
            twistd = started = _Twistd()
            env = fake_env(os.path.abspath(self.mktemp()))
            env.pop("CLAUDESRV_AUTH_TOKENS", None)
            process = reactor.spawnProcess(twistd, sys.executable, [sys.executable, "-c", script], env=env,
                                           childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()})
            listener.close()
            if serves:
                yield wait_for(lambda p=started: b"Site starting" in p.output or p.ended.called, 10)
                code, body = yield get_json(f"http://127.0.0.1:{port}/healthz")
                self.assertEqual((code, body), (200, {"status": "ok"}), bytes(twistd.output))
                process.signalProcess("TERM")
            yield twistd.ended
            if not serves:
                self.assertIn(b"refusing to listen on 'systemd:domain=INET:index=0'", bytes(twistd.output))
