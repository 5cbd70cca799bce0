"""
Run lifecycle: disconnect, cancel, one turn per session, capacity, timeouts, keepalive, backpressure,
shutdown, and no process left behind.

Timer behaviour is driven by a Clock against real child processes (RunManager in-process); the rest
goes through a real twistd.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from claudesrv.command import ClaudeRequest
from claudesrv.process import spawner
from claudesrv.runs import Limits, RunManager
from claudesrv.store import SessionStore
from claudesrv.workspaces import Workspaces
from tests.support import FAKE, Daemon, SSEParser, grandchildren, pid_alive, post, signals, sleep, wait_for


class RecordingStream:
    """Stands where the Twisted request would: records what a run writes."""

    def __init__(self) -> None:
        self.sse = SSEParser()
        self.producer: Any = None
        self.code = 0

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.sse.feed(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


class InProcessRuns(TestCase):
    """A RunManager with real child processes and a Clock for every timer."""

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        base = os.path.abspath(self.mktemp())
        self.state_dir = os.path.join(base, "fake-state")
        os.makedirs(self.state_dir)
        self.clock = Clock()
        self.store = SessionStore(os.path.join(base, "sessions.db"))
        yield self.store.start()
        self.addCleanup(self.store.close)
        env = dict(os.environ, FAKE_STATE_DIR=self.state_dir)
        self.limits = Limits(kill_grace=5, keepalive=15, run_timeout=0, idle_timeout=0)
        self.runs = RunManager(self.clock, spawner(reactor), self.store,  # type: ignore[arg-type]
                               Workspaces(os.path.join(base, "Workspace")), lambda: FAKE, env, self.limits)

    def submit(self, prompt: str) -> tuple[Any, RecordingStream]:
        stream = RecordingStream()
        run = self.runs.submit(ClaudeRequest(prompt), None, stream)
        self.addCleanup(self.kill_leftovers, run)
        return run, stream

    def kill_leftovers(self, run: Any) -> None:
        """Timers run on a Clock here, so a test that fails early must kill its CLI itself."""
        if run.process is not None and not run.process.ended:
            run.process.signal_group(signal.SIGKILL)

    def signals(self) -> list[str]:
        return signals(self.state_dir)

    def grandchildren(self) -> list[int]:
        return grandchildren(self.state_dir)

    @inlineCallbacks
    def test_escalation_kills_whole_tree(self) -> Any:
        """A CLI that ignores SIGINT and SIGTERM gets SIGINT, SIGTERM after the grace, then SIGKILL;
        afterwards neither it nor its grandchild in a session of its own is alive."""
        run, stream = self.submit("[[fake hang=1 ignore_signals=1 grandchild=1]]")
        yield wait_for(lambda: stream.sse.frames)
        pid = run.process.pid
        [grandchild] = self.grandchildren()
        self.assertNotEqual(os.getsid(grandchild), os.getsid(pid))
        run.interrupt("cancelled")
        yield wait_for(lambda: self.signals() == ["SIGINT"])
        self.clock.advance(4.9)
        yield sleep(0.3)
        self.assertEqual(self.signals(), ["SIGINT"])
        self.clock.advance(0.1)
        yield wait_for(lambda: self.signals() == ["SIGINT", "SIGTERM"])
        self.assertTrue(pid_alive(pid))
        self.clock.advance(2)
        yield run.done
        self.assertFalse(pid_alive(pid))
        self.assertFalse(pid_alive(grandchild))
        [result] = stream.sse.results()
        self.assertEqual(result["terminal_reason"], "cancelled")
        self.assertEqual(result["signal"], signal.SIGKILL)

    @inlineCallbacks
    def test_child_is_session_leader_with_default_signals(self) -> Any:
        """The CLI leads a session of its own and does not inherit ignored SIGINT or SIGHUP, also when
        the daemon was started with them ignored (as `nohup ... &` does)."""
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write("#!/bin/sh\n"
                    "ign=$(grep SigIgn /proc/self/status | cut -f2)\n"
                    "sid=$(cut -d' ' -f6 /proc/$$/stat)\n"
                    'echo "{\\"type\\":\\"system\\",\\"session_id\\":\\"s$$\\",\\"ign\\":\\"$ign\\",'
                    '\\"pid\\":$$,\\"sid\\":$sid}"\n'
                    'echo \'{"type":"result","is_error":false}\'\n')
        os.chmod(script, 0o755)
        self.runs.executable = lambda: script
        for ignored in (False, True):
            if ignored:
                previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
                self.addCleanup(signal.signal, signal.SIGHUP, previous)
            run, stream = self.submit("hi")
            yield run.done
            init = stream.sse.events()[0]
            self.assertEqual(init["sid"], init["pid"])
            for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                self.assertFalse(int(init["ign"], 16) & (1 << (signum - 1)), (ignored, signum))

    @inlineCallbacks
    def test_prompt_larger_than_a_pipe(self) -> Any:
        """A prompt too large to sit in a pipe is written by the reactor instead, and arrives whole."""
        prompt = "é" * (3 << 20)
        run, stream = self.submit(prompt)
        yield run.done
        self.assertEqual(stream.sse.events()[0]["fake"]["prompt"], prompt)

    @inlineCallbacks
    def test_survivors_holding_stdout_are_killed(self) -> Any:
        """Processes the CLI leaves behind holding its stdout (in its group, or in a session of their own)
        are killed when the CLI exits, so the run ends and frees its slot."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        pids = os.path.join(base, "pids")
        script = os.path.join(base, "cli.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n"
                    "echo '{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s-'$$'\"}'\n"
                    "sleep 1000 &\necho $! >> " + pids + "\n"
                    "setsid sleep 1000 &\necho $! >> " + pids + "\n"
                    "echo '{\"type\":\"result\",\"is_error\":false}'\n")
        os.chmod(script, 0o755)
        self.runs.executable = lambda: script
        run, stream = self.submit("hi")
        yield run.done
        with open(pids) as f:
            survivors = [int(p) for p in f.read().split()]
        self.assertEqual(len(survivors), 2)
        yield wait_for(lambda: not any(pid_alive(p) for p in survivors))
        self.assertEqual(len(stream.sse.results()), 1)
        self.assertEqual(self.runs.running, {})

    @inlineCallbacks
    def test_session_id_only_after_commit_and_failed_commit(self) -> Any:
        """No frame leaves before the session's row is committed; if the commit fails the stream ends with
        one error result without the id, and the run still ends even though the CLI exited meanwhile."""
        held: Deferred[None] = Deferred()
        self.patch(self.store, "record", lambda sid, workspace: held)
        run, stream = self.submit("[[fake lines=3]]")
        pid = run.process.pid
        yield wait_for(lambda: not pid_alive(pid))
        yield sleep(0.2)
        self.assertEqual(stream.sse.frames, [])
        held.errback(RuntimeError("database is locked"))
        yield run.done
        [result] = stream.sse.results()
        self.assertEqual(len(stream.sse.frames), 1)
        self.assertEqual(result["terminal_reason"], "database_error")
        self.assertIsNone(result["session_id"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.runs.running, {})

    @inlineCallbacks
    def test_waiting_turn_that_gives_up_returns_the_lock(self) -> Any:
        """A turn waiting for the previous CLI to exit, then cancelled, hands the session lock back to
        that still-running CLI instead of freeing the session."""
        first, stream = self.submit("[[fake result_then_linger_ms=1500]]")
        yield first.response
        sid = first.reported_id
        second = self.runs.submit(ClaudeRequest("next", sid), first.workspace, RecordingStream())
        self.assertEqual(second.state, "queued")
        second.interrupt("cancelled")
        yield second.done
        self.assertIs(self.runs.by_session[sid], first)
        self.assertTrue(self.runs.busy(sid))
        yield first.done
        self.assertFalse(self.runs.busy(sid))

    @inlineCallbacks
    def test_stalled_client_ends_run(self) -> Any:
        """A client that stops reading for the idle limit ends the run (it would hold a slot forever)."""
        self.limits.idle_timeout = 10
        run, stream = self.submit("[[fake lines=1 hang=1]]")
        yield wait_for(lambda: stream.producer is not None and stream.sse.frames)
        stream.producer.pauseProducing()
        self.clock.advance(10)
        yield run.done
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["timeout"]), ("timeout", "client_stalled"))

    @inlineCallbacks
    def test_zero_grace_still_sends_sigterm(self) -> Any:
        """With --kill-grace 0, SIGTERM follows SIGINT at once, before SIGKILL."""
        self.limits.kill_grace = 0
        run, stream = self.submit("[[fake hang=1 ignore_signals=1]]")
        yield wait_for(lambda: stream.sse.frames)
        run.interrupt("cancelled")
        self.clock.advance(0)
        yield wait_for(lambda: self.signals() == ["SIGINT", "SIGTERM"])
        self.clock.advance(2)
        yield run.done

    @inlineCallbacks
    def test_run_timeout(self) -> Any:
        """--run-timeout interrupts the run; its result says the run limit ended it."""
        self.limits.run_timeout = 30
        run, stream = self.submit("[[fake hang=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(30)
        yield run.done
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["timeout"]), ("timeout", "run"))
        self.assertEqual(result["cli_terminal_reason"], "aborted_streaming")
        self.assertEqual(run.outcome, "timeout")

    @inlineCallbacks
    def test_idle_timeout(self) -> Any:
        """--idle-timeout counts from the last stdout, and interrupts a silent run."""
        self.limits.idle_timeout = 10
        run, stream = self.submit("[[fake hang=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(9)
        yield sleep(0.1)
        self.assertEqual(stream.sse.results(), [])
        self.clock.advance(1)
        yield run.done
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["timeout"]), ("timeout", "idle"))

    @inlineCallbacks
    def test_keepalive(self) -> Any:
        """A silent stream gets an SSE comment every --keepalive seconds, and only while silent."""
        run, stream = self.submit("[[fake hang=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(14)
        self.assertEqual(stream.sse.comments, [])
        self.clock.advance(1)
        self.assertEqual(stream.sse.comments, [b": keepalive"])
        self.clock.advance(15)
        self.assertEqual(len(stream.sse.comments), 2)
        run.interrupt("cancelled")
        yield run.done

    @inlineCallbacks
    def test_backpressure_pauses_stdout(self) -> Any:
        """While the client side is paused, the CLI's stdout is not read; on resume all of it arrives."""
        run, stream = self.submit("[[fake lines=100000 line_bytes=1000]]")
        yield wait_for(lambda: stream.producer is not None and stream.sse.frames)
        stream.producer.pauseProducing()
        yield sleep(0.3)
        seen = len(stream.sse.raw)
        yield sleep(0.5)
        self.assertEqual(len(stream.sse.raw), seen)
        self.assertLess(seen, 50_000_000)
        stream.producer.resumeProducing()
        yield run.response
        self.assertEqual(len(stream.sse.frames), 100002)
        yield run.done


class RawClient(Protocol):
    """An HTTP client that can stop reading or vanish mid-stream."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.got_data: Deferred[None] = Deferred()
        self.closed = False

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"data: " in self.data and not self.got_data.called:
            self.got_data.callback(None)


@inlineCallbacks
def raw_post(port: int, body: dict[str, Any]) -> Any:
    payload = json.dumps(body).encode()
    proto = RawClient()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(  # type: ignore[union-attr]
        b"POST /api/claude HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return proto


class DaemonLifecycle(TestCase):
    timeout = 60

    @inlineCallbacks
    def start(self, *args: str) -> Any:
        self.daemon = yield Daemon(self, *args).start()
        return self.daemon

    @inlineCallbacks
    def test_disconnect_stops_tree(self) -> Any:
        """A client that goes away gets its run interrupted with SIGINT; the CLI and its grandchild in a
        session of its own are gone afterwards, and the session stays resumable."""
        daemon = yield self.start("--kill-grace", "1")
        client = yield raw_post(daemon.port, {"prompt": "[[fake hang=1 grandchild=1]]"})
        yield client.got_data
        [call] = daemon.invocations()
        [grandchild] = daemon.grandchildren()
        client.transport.abortConnection()
        yield wait_for(lambda: not pid_alive(call["pid"]) and not pid_alive(grandchild))
        self.assertEqual(daemon.signals()[0], "SIGINT")
        yield wait_for(lambda: "disconnected" in daemon.log)
        sid = daemon.rows()[0][0]
        reply = yield post(daemon.url + "/api/claude", {"prompt": "back", "session_id": sid})
        self.assertEqual(reply.status, 200)

    @inlineCallbacks
    def test_cancel_endpoint(self) -> Any:
        """POST /api/sessions/<id>/cancel interrupts the running turn, whose stream ends with its result;
        404 for an unknown session, 409 when nothing runs."""
        daemon = yield self.start()
        frames: list[bytes] = []
        streaming = post(daemon.url + "/api/claude", {"prompt": "[[fake hang=1]]"},
                         on_frame=lambda sse: frames.extend(sse.frames[len(frames):]))
        yield wait_for(lambda: frames)
        sid = json.loads(frames[0])["session_id"]
        reply = yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        self.assertEqual(reply.status, 202)
        stream = yield streaming
        [result] = stream.sse.results()
        self.assertEqual(result["terminal_reason"], "cancelled")
        yield wait_for(lambda: not pid_alive(daemon.invocations()[0]["pid"]))
        yield wait_for(lambda: ": cancelled, exit" in daemon.log)
        reply = yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (409, "not_running"))
        reply = yield post(f"{daemon.url}/api/sessions/00000000-0000-4000-8000-000000000000/cancel", {})
        self.assertEqual(reply.status, 404)

    @inlineCallbacks
    def test_one_turn_per_session(self) -> Any:
        """A second turn for a session whose turn is running is refused with 409 session_busy at once,
        and starts nothing; once the turn is over the session takes turns again."""
        daemon = yield self.start()
        first = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        sid = first.sse.events()[0]["session_id"]
        frames: list[bytes] = []
        running = post(daemon.url + "/api/claude", {"prompt": "[[fake hang=1]]", "session_id": sid},
                       on_frame=lambda sse: frames.extend(sse.frames[len(frames):]))
        yield wait_for(lambda: frames)
        busy = yield post(daemon.url + "/api/claude", {"prompt": "me too", "session_id": sid})
        self.assertEqual((busy.status, busy.json()["error"]["code"]), (409, "session_busy"))
        self.assertEqual(len(daemon.invocations()), 2)
        yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        yield running
        after = yield post(daemon.url + "/api/claude", {"prompt": "now", "session_id": sid})
        self.assertEqual(after.status, 200)

    @inlineCallbacks
    def test_back_to_back_turns(self) -> Any:
        """A turn sent right after the previous result, while that CLI is still exiting, waits for the
        exit instead of failing, and the two CLIs never overlap."""
        daemon = yield self.start()
        first = yield post(daemon.url + "/api/claude", {"prompt": "[[fake result_then_linger_ms=700]]"})
        sid = first.sse.events()[0]["session_id"]
        second = yield post(daemon.url + "/api/claude", {"prompt": "next", "session_id": sid})
        self.assertEqual(second.status, 200)
        a, b = daemon.invocations()
        self.assertGreaterEqual(b["started_at"], a["started_at"] + 0.7)

    @inlineCallbacks
    def test_capacity_and_queue(self) -> Any:
        """With --max-runs 1 --max-queue 1 a second request waits, a third gets 503 with Retry-After,
        and the waiting one starts when the first ends; a waiting client that leaves frees its place."""
        daemon = yield self.start("--max-runs", "1", "--max-queue", "1")
        frames: list[bytes] = []
        first = post(daemon.url + "/api/claude", {"prompt": "[[fake hang=1]]"},
                     on_frame=lambda sse: frames.extend(sse.frames[len(frames):]))
        yield wait_for(lambda: frames)
        waiting = yield raw_post(daemon.port, {"prompt": "queued"})
        yield wait_for(lambda: b"200 OK" in waiting.data)
        full = yield post(daemon.url + "/api/claude", {"prompt": "no room"})
        self.assertEqual(full.status, 503)
        self.assertEqual(full.header("Retry-After"), "5")
        self.assertEqual(full.json()["error"]["code"], "server_busy")
        self.assertEqual(len(daemon.invocations()), 1)
        waiting.transport.abortConnection()
        yield wait_for(lambda: "interrupted: disconnected" in daemon.log)
        queued = post(daemon.url + "/api/claude", {"prompt": "queued again"})
        yield sleep(0.2)
        self.assertEqual(len(daemon.invocations()), 1)
        sid = json.loads(frames[0])["session_id"]
        yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        reply = yield queued
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.sse.events()[0]["fake"]["prompt"], "queued again")
        self.assertEqual(len(daemon.invocations()), 2)
        yield first

    @inlineCallbacks
    def test_shutdown_ends_streams_and_processes(self) -> Any:
        """SIGTERM to twistd sends each open stream a result with terminal_reason server_shutdown,
        leaves no CLI process behind (even one that ignores signals), and exits within the grace + 5 s."""
        daemon = yield self.start("--kill-grace", "1")
        streams = []
        for prompt in ("[[fake hang=1]]", "[[fake hang=1 ignore_signals=1 grandchild=1]]"):
            frames: list[bytes] = []
            streams.append(post(daemon.url + "/api/claude", {"prompt": prompt},
                                on_frame=lambda sse, frames=frames: frames.extend(sse.frames[len(frames):])))
            yield wait_for(lambda frames=frames: frames)
        pids = [c["pid"] for c in daemon.invocations()] + daemon.grandchildren()
        started = time.monotonic()
        yield daemon.stop()
        self.assertLess(time.monotonic() - started, 1 + 5)
        self.assertTrue(daemon.exited_cleanly(), daemon.log)
        self.assertNotIn("Traceback", daemon.log)
        for streaming in streams:
            reply = yield streaming
            [result] = reply.sse.results()
            self.assertEqual(result["terminal_reason"], "server_shutdown")
        for pid in pids:
            self.assertFalse(pid_alive(pid), pid)

    @inlineCallbacks
    def test_sessions_survive_kill_9(self) -> Any:
        """After kill -9 of the daemon and a restart on the same data dir, every session is resumable."""
        daemon = yield self.start()
        sids = []
        for _ in range(3):
            reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
            sids.append(reply.sse.events()[0]["session_id"])
        daemon.signal(signal.SIGKILL)
        yield daemon.proto.ended
        again = Daemon(self)
        again.data_dir = daemon.data_dir
        again.args[again.args.index("--data-dir") + 1] = daemon.data_dir
        yield again.start()
        for sid in sids:
            reply = yield post(again.url + "/api/claude", {"prompt": "back", "session_id": sid})
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.sse.events()[0]["session_id"], sid)
