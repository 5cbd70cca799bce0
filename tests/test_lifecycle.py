"""
Turn lifecycle: interrupt, cancel, disconnect, one turn per session, capacity, timeouts, keepalive, slow
clients, shutdown, and no process left behind.

Timer behaviour is driven by a Clock against real CLI processes (the session registry in-process, the fake in
SDK streaming mode, the daemon's own spawner); what only HTTP shows runs in the in-process harness; the rest
goes through a real twistd.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudesrv.command import ClaudeRequest, SpawnOptions
from claudesrv.live import IDLE, Limits, Turn
from claudesrv.process import spawner
from claudesrv.registry import SessionRegistry
from claudesrv.sse import SseSink
from claudesrv.store import InlineSqlite, SessionStore
from claudesrv.workspaces import Workspaces
from tests import harness
from tests.rawhttp import raw_post
from tests.support import (
    FAKE,
    Daemon,
    Since,
    SSEParser,
    fake_env,
    get_stream,
    grandchildren,
    interrupts,
    pid_alive,
    post,
    signalled,
    signals,
    sleep,
    state_lines,
    wait_for,
)


class RecordingStream:
    """Stands where the Twisted request would: records what a stream writes."""

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


class InProcessSessions(TestCase):
    """The session registry with real CLI processes (the fake, started by the daemon's spawner) and a Clock for
    every timer; each turn is streamed to a L{RecordingStream} as the route streams it to a client."""

    timeout = 30

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.state_dir = os.path.join(base, "fake-state")
        os.makedirs(self.state_dir)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        db = InlineSqlite(os.path.join(base, "sessions.db"))
        self.addCleanup(db.close)
        self.store = SessionStore(db, self.clock)
        self.store.start()
        workspaces = Workspaces(os.path.join(base, "Workspace"))
        workspaces.ensure_root()
        env = fake_env(self.state_dir)
        self.limits = Limits(spares=0, kill_grace=5, keepalive=15, run_timeout=0, idle_timeout=0)
        self.executable = FAKE
        self.registry = SessionRegistry(self.clock, spawner(reactor), self.store,
                                        workspaces, lambda: self.executable, env, self.limits,
                                        os.path.join(base, "events"), blocking=maybeDeferred)
        self.addCleanup(self.end_processes)

    def submit(self, prompt: str, session_id: str | None = None) -> tuple[Turn, RecordingStream]:
        """Admit a turn, record a new session's row, and stream the turn from its first event."""
        workspace = self.registry.sessions[session_id].workspace if session_id else None
        turn = self.registry.admit(ClaudeRequest(prompt, session_id, SpawnOptions()), workspace)
        session = self.registry.sessions[turn.session_id]
        if turn.new_session:
            self.successResultOf(turn.prepared)  # the workspace, made inline here
            self.successResultOf(self.store.record(turn.session_id, session.workspace))
        stream = RecordingStream()
        sink = SseSink(stream, session.log, turn.start_offset, self.clock, lambda: turn.end_offset,
                       self.limits.keepalive, self.limits.idle_timeout,
                       on_gone=lambda why: self.registry.client_left(turn, why))
        sink.open()
        self.registry.start(turn)
        return turn, stream

    def pid_of(self, turn: Turn) -> int:
        pid = self.registry.sessions[turn.session_id].pid
        assert pid is not None
        return pid

    @inlineCallbacks
    def end_processes(self) -> Any:
        """Timers run on a Clock here, so a test that fails early must end its CLIs (and their tools) itself."""
        for session in list(self.registry.live):
            if session.process is not None:
                session.process.signal_group(signal.SIGKILL)

        def gone() -> bool:
            self.clock.advance(0)  # whatever the registry put off to "right after this"
            return not self.registry.live

        yield wait_for(gone)
        for pid in grandchildren(self.state_dir):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def signals(self) -> list[str]:
        return signals(self.state_dir)

    def grandchildren(self) -> list[int]:
        return grandchildren(self.state_dir)

    @inlineCallbacks
    def test_ladder_kills_whole_tree(self) -> Any:
        """A CLI that ignores the interrupt request, SIGINT and SIGTERM gets the interrupt, SIGINT after the
        kill grace, SIGTERM 2 s later and SIGKILL 2 s after that; afterwards neither it nor its grandchild in
        a session of its own is alive, and the turn ends with one result saying it was cancelled."""
        turn, stream = self.submit("[[fake hang=1 ignore_interrupt=1 ignore_signals=1 grandchild=1]]")
        yield wait_for(lambda: stream.sse.frames)
        pid = self.pid_of(turn)
        [grandchild] = self.grandchildren()
        self.assertNotEqual(os.getsid(grandchild), os.getsid(pid))
        self.assertTrue(self.registry.cancel(turn.session_id))
        yield wait_for(lambda: interrupts(self.state_dir) == [pid])
        self.clock.advance(4.9)
        yield sleep(0.2)
        self.assertEqual(self.signals(), [])
        self.clock.advance(0.1)
        yield wait_for(lambda: self.signals() == ["SIGINT"])
        self.clock.advance(1.9)
        yield sleep(0.2)
        self.assertEqual(self.signals(), ["SIGINT"])
        self.clock.advance(0.1)
        yield wait_for(lambda: self.signals() == ["SIGINT", "SIGTERM"])
        self.assertTrue(pid_alive(pid))
        self.clock.advance(2)
        yield turn.ended
        self.assertFalse(pid_alive(pid))
        yield wait_for(lambda: not pid_alive(grandchild))
        yield wait_for(lambda: not self.registry.live)
        [result] = stream.sse.results()
        self.assertEqual(stream.sse.events()[-1], result)
        self.assertEqual((result["terminal_reason"], result["signal"], result["exit_code"]),
                         ("cancelled", signal.SIGKILL, None))
        self.assertEqual(turn.outcome, "cancelled")

    @inlineCallbacks
    def test_zero_grace_still_sends_every_signal(self) -> Any:
        """With --kill-grace 0, SIGINT follows the interrupt request at once, and SIGTERM and SIGKILL still
        come 2 s apart."""
        self.limits.kill_grace = 0
        turn, stream = self.submit("[[fake hang=1 ignore_interrupt=1 ignore_signals=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.registry.cancel(turn.session_id)
        self.clock.advance(0)
        yield wait_for(lambda: self.signals() == ["SIGINT"])
        self.clock.advance(1.9)
        yield sleep(0.2)
        self.assertEqual(self.signals(), ["SIGINT"])
        self.clock.advance(0.1)
        yield wait_for(lambda: self.signals() == ["SIGINT", "SIGTERM"])
        self.clock.advance(2)
        yield turn.ended
        self.assertEqual(stream.sse.results()[0]["signal"], signal.SIGKILL)

    @inlineCallbacks
    def test_interrupt_keeps_the_process_warm(self) -> Any:
        """A cancelled turn ends with the CLI's own aborted result (saying cancelled) after the interrupt
        request alone: no signal, the tool it ran is gone, the process stays up, no stop timer is left, and
        the session's next turn runs in the same process."""
        turn, stream = self.submit("[[fake hang=1 grandchild=1]]")
        yield wait_for(lambda: stream.sse.frames)
        pid = self.pid_of(turn)
        [grandchild] = self.grandchildren()
        self.registry.cancel(turn.session_id)
        yield turn.ended
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["cli_terminal_reason"]), ("cancelled", "aborted_streaming"))
        self.assertNotIn("signal", result)
        self.assertFalse(pid_alive(grandchild))
        self.clock.advance(60)
        yield sleep(0.2)
        self.assertEqual(self.signals(), [])
        self.assertTrue(pid_alive(pid))
        self.assertEqual(self.registry.sessions[turn.session_id].state, IDLE)
        second, stream = self.submit("next", turn.session_id)
        yield second.ended
        self.assertEqual(stream.sse.events()[0]["fake"]["pid"], pid)
        self.assertFalse(stream.sse.results()[0]["is_error"])
        self.assertEqual(second.kind, "warm")

    @inlineCallbacks
    def test_child_is_session_leader_with_default_signals(self) -> Any:
        """The CLI leads a session of its own and does not inherit ignored SIGINT or SIGHUP, also when the
        daemon was started with them ignored (as `nohup ... &` does)."""
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write("#!/bin/sh\n"
                    "ign=$(grep SigIgn /proc/self/status | cut -f2)\n"
                    "sid=$(cut -d' ' -f6 /proc/$$/stat)\n"
                    'echo "{\\"type\\":\\"system\\",\\"ign\\":\\"$ign\\",\\"pid\\":$$,\\"sid\\":$sid}"\n'
                    'echo \'{"type":"result","is_error":false}\'\n')
        os.chmod(script, 0o755)
        self.executable = script
        for ignored in (False, True):
            if ignored:
                previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
                self.addCleanup(signal.signal, signal.SIGHUP, previous)
            turn, stream = self.submit("hi")
            yield turn.ended
            init = stream.sse.events()[0]
            self.assertEqual(init["sid"], init["pid"])
            for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
                self.assertFalse(int(init["ign"], 16) & (1 << (signum - 1)), (ignored, signum))
            yield wait_for(lambda: not self.registry.live)

    @inlineCallbacks
    def test_prompt_larger_than_a_pipe(self) -> Any:
        """A prompt far larger than a pipe holds is written by the reactor as one JSON line, and reaches the CLI
        whole."""
        prompt = "é" * (1 << 20)
        turn, stream = self.submit(prompt)
        yield turn.ended
        self.assertEqual(stream.sse.events()[0]["fake"]["prompt"], prompt)
        [row] = state_lines(self.state_dir, "turns.jsonl")
        self.assertEqual(row["prompt"], prompt)

    @inlineCallbacks
    def test_survivors_holding_stdout_are_killed(self) -> Any:
        """Processes the CLI leaves behind holding its stdout (in its group, or in a session of their own) are
        killed when the CLI exits, so the process is seen to end and frees its place."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        pids = os.path.join(base, "pids")
        script = os.path.join(base, "cli.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\n"
                    "echo '{\"type\":\"system\",\"subtype\":\"init\"}'\n"
                    "sleep 1000 &\necho $! >> " + pids + "\n"
                    "setsid sleep 1000 &\necho $! >> " + pids + "\n"
                    "echo '{\"type\":\"result\",\"is_error\":false}'\n")
        os.chmod(script, 0o755)
        self.executable = script
        turn, stream = self.submit("hi")
        yield turn.ended
        with open(pids) as f:
            survivors = [int(p) for p in f.read().split()]
        self.assertEqual(len(survivors), 2)
        yield wait_for(lambda: not any(pid_alive(p) for p in survivors))
        yield wait_for(lambda: not self.registry.live)
        self.assertEqual(len(stream.sse.results()), 1)
        self.assertEqual((self.registry.running, self.registry.turns), (0, {}))

    @inlineCallbacks
    def test_stalled_client_ends_turn(self) -> Any:
        """A client that reads nothing for the idle limit, while the CLI still prints, is dropped and its turn
        interrupted; the turn's result in the log says the stalled client ended it, and the CLI stays warm."""
        self.limits.idle_timeout = 10
        turn, stream = self.submit("[[fake lines=1 delay_ms=600 hang=1]]")
        yield wait_for(lambda: stream.producer is not None and stream.sse.frames)
        stream.producer.pauseProducing()
        self.clock.advance(5)
        yield wait_for(lambda: turn.lines == 2)  # the CLI printed at +5 s: the turn itself is not idle
        self.clock.advance(5)
        yield turn.ended
        log = SSEParser()
        session = self.registry.sessions[turn.session_id]
        log.feed(session.log.read(turn.start_offset, 1 << 20))
        [result] = log.results()
        self.assertEqual((result["terminal_reason"], result["timeout"]), ("timeout", "client_stalled"))
        self.assertEqual(turn.outcome, "timeout")
        self.assertEqual(stream.sse.results(), [])
        self.assertTrue(pid_alive(self.pid_of(turn)))

    @inlineCallbacks
    def test_run_timeout(self) -> Any:
        """--run-timeout interrupts the turn; its result says the run limit ended it, and the CLI stays warm
        with no stop timer left."""
        self.limits.run_timeout = 30
        turn, stream = self.submit("[[fake hang=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(29.9)
        yield sleep(0.1)
        self.assertEqual(interrupts(self.state_dir), [])
        self.clock.advance(0.1)
        yield turn.ended
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["timeout"]), ("timeout", "run"))
        self.assertEqual(result["cli_terminal_reason"], "aborted_streaming")
        self.assertEqual(turn.outcome, "timeout")
        self.clock.advance(60)
        yield sleep(0.1)
        self.assertEqual(self.signals(), [])
        self.assertTrue(pid_alive(self.pid_of(turn)))

    @inlineCallbacks
    def test_idle_timeout(self) -> Any:
        """--idle-timeout counts from the CLI's last line, and interrupts a turn that stays silent that long."""
        self.limits.idle_timeout = 10
        turn, stream = self.submit("[[fake lines=1 delay_ms=600 hang=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(6)
        yield wait_for(lambda: len(stream.sse.frames) == 2)
        self.clock.advance(6)
        yield sleep(0.1)
        self.assertEqual((stream.sse.results(), interrupts(self.state_dir)), ([], []))
        self.clock.advance(4)
        yield turn.ended
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["timeout"]), ("timeout", "idle"))

    @inlineCallbacks
    def test_keepalive(self) -> Any:
        """A silent stream gets an SSE comment every --keepalive seconds, and only while silent."""
        turn, stream = self.submit("[[fake hang=1]]")
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(14)
        self.assertEqual(stream.sse.comments, [])
        self.clock.advance(1)
        self.assertEqual(stream.sse.comments, [b": keepalive"])
        self.clock.advance(15)
        self.assertEqual(len(stream.sse.comments), 2)
        self.registry.cancel(turn.session_id)
        yield turn.ended

    @inlineCallbacks
    def test_slow_client_never_holds_the_cli_back(self) -> Any:
        """While a client reads nothing, the CLI's whole turn still goes into the session's log (nothing is
        written to the client meanwhile); when the client reads again it gets every event from disk, in order,
        exactly once."""
        turn, stream = self.submit("[[fake lines=10000 line_bytes=1000]]")
        stream.producer.pauseProducing()
        yield turn.ended
        self.assertEqual(bytes(stream.sse.raw), b"")
        self.assertGreater(self.registry.sessions[turn.session_id].log.size(), 10_000_000)
        stream.producer.resumeProducing()
        self.assertEqual(len(stream.sse.frames), 10002)
        self.assertEqual(stream.sse.ids, list(range(1, 10003)))
        self.assertEqual(len(stream.sse.results()), 1)
        self.assertIsNone(stream.producer)

    @inlineCallbacks
    def test_shutdown_ladder(self) -> Any:
        """Shutdown interrupts every running turn and closes every stdin: a CLI that obeys ends its turn with its
        own result and exits, an idle one exits, and one that ignores the interrupt, SIGINT and SIGTERM gets
        them all and then SIGKILL, with its tool in a session of its own; every turn ends with one result
        saying server_shutdown and the shutdown completes once no process is left."""
        idle, _ = self.submit("hi")
        yield idle.ended
        obeys, first = self.submit("[[fake hang=1]]")
        stuck, second = self.submit("[[fake hang=1 ignore_interrupt=1 ignore_signals=1 grandchild=1]]")
        yield wait_for(lambda: first.sse.frames and second.sse.frames)
        pids = [self.pid_of(t) for t in (idle, obeys, stuck)] + self.grandchildren()
        done = self.registry.shutdown()
        yield obeys.ended
        yield wait_for(lambda: not pid_alive(pids[0]) and not pid_alive(pids[1]))
        self.assertEqual(first.sse.results()[0]["cli_terminal_reason"], "aborted_streaming")
        self.clock.advance(5)
        yield wait_for(lambda: self.signals() == ["SIGINT"])
        self.clock.advance(2)
        yield wait_for(lambda: self.signals() == ["SIGINT", "SIGTERM"])
        self.assertFalse(done.called)
        self.clock.advance(2)
        yield done
        yield wait_for(lambda: not any(pid_alive(pid) for pid in pids), 2)  # SIGKILL is delivered, not awaited
        for stream in (first, second):
            [result] = stream.sse.results()
            self.assertEqual(result["terminal_reason"], "server_shutdown")
        self.assertEqual(second.sse.results()[0]["signal"], signal.SIGKILL)


class CommitBeforeTheId(SynchronousTestCase):
    """The route in process (the harness: real routes, registry and SQL; CLIs played in memory)."""

    def daemon(self, **limits: Any) -> harness.Daemon:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        values: dict[str, Any] = {"spares": 1, "keepalive": 0, "idle_timeout": 0, "run_timeout": 0}
        values.update(limits)
        d = harness.Daemon(base, Limits(**values))
        self.addCleanup(d.close)
        return d

    def test_session_id_only_after_commit_and_failed_commit(self) -> None:
        """No byte of the answer leaves before the new session's row is committed; if the commit fails the
        answer is a 500 JSON error, and the spare it took is stopped with its workspace removed; the next
        new session works."""
        d = self.daemon()
        [spare] = d.world.clis
        held: Deferred[None] = Deferred()
        record = d.store.record
        self.patch(d.store, "record", lambda sid, workspace: held if not held.called else record(sid, workspace))
        stream = d.post({"prompt": "hi"})
        self.assertEqual((stream.code, bytes(stream.sse.raw)), (0, b""))
        self.assertEqual([m for m in spare.stdin if m["type"] == "user"], [])
        held.errback(RuntimeError("database is locked"))
        d.pump()
        self.assertEqual(stream.code, 500)
        self.assertEqual(json.loads(bytes(stream.sse.raw))["error"]["code"], "database_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(spare.alive)
        self.assertFalse(os.path.exists(spare.cwd))
        self.assertNotIn(spare.session_id, d.registry.sessions)
        again = d.post({"prompt": "again"})
        self.assertEqual((again.code, again.types()), (200, ["init", "assistant", "result"]))

    def test_failed_commit_frees_its_place(self) -> None:
        """A new session whose row could not be recorded gives its admission place back, whether it took a spare
        or not: with one run slot and no queue, the next request is served, not refused with 503."""
        for spares in (0, 1):
            d = self.daemon(spares=spares, max_runs=1, max_queue=0, max_live=3)
            record = d.store.record
            self.patch(d.store, "record", lambda sid, workspace: fail(RuntimeError("database is locked")))
            self.assertEqual(d.post({"prompt": "hi"}).code, 500)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            self.patch(d.store, "record", record)
            self.assertEqual(d.registry.turns, {}, f"spares={spares}")
            self.assertEqual(d.post({"prompt": "again"}).code, 200, f"spares={spares}")



class ShutdownOfAStuckProcess(SynchronousTestCase):
    """Shutdown against a CLI played in memory (the harness), where the order of its answers is ours to choose."""

    def test_ladder_goes_on_after_the_interrupted_turn_ends(self) -> None:
        """At shutdown, a process whose interrupted turn ends but which does not exit when its stdin is closed
        still gets SIGTERM and SIGKILL, so the shutdown completes."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        d = harness.Daemon(base, Limits(spares=0, keepalive=0, idle_timeout=0, run_timeout=0, kill_grace=5))
        self.addCleanup(d.close)
        d.world.hold_turns = True
        stream = d.post({"prompt": "hi"})
        [cli] = d.world.clis
        cli.ignore_interrupt = True  # it answers a moment later, as a real process does
        cli.stdin_closed = lambda: None  # type: ignore[method-assign]  # and it ignores stdin EOF
        done = d.registry.shutdown()
        d.pump()
        cli.end_turn(interrupted=True)
        d.pump()
        self.assertEqual(stream.types()[-1], "result")
        d.clock.advance(5 + 2 + 2)
        self.assertIn(signal.SIGKILL, cli.signals)
        self.assertFalse(cli.alive)
        self.successResultOf(done)



def streaming(url: str, body: dict[str, Any], frames: list[bytes]) -> Deferred[Any]:
    """POST and read the answer, appending each frame to C{frames} as it arrives."""
    return post(url + "/api/claude", body, on_frame=lambda sse: frames.extend(sse.frames[len(frames):]))


class InProcessTurns(harness.DaemonTestCase):
    """One turn per session and capacity, which only need HTTP semantics: in process (the harness: real routes,
    registry and SQL; CLIs played in memory)."""

    def test_one_turn_per_session(self) -> None:
        """A second turn for a session whose turn is running is refused with 409 session_busy at once and
        reaches no CLI; once the turn is over the session takes turns again, in the same process."""
        d = self.daemon()
        sid = d.post({"prompt": "hi"}).session_id
        [cli] = d.world.clis
        cli.hold()
        running = d.post({"prompt": "hold on", "session_id": sid})
        self.assertFalse(running.done)
        code, body = d.call("POST", "/api/claude", json={"prompt": "me too", "session_id": sid})
        self.assertEqual((code, body["error"]["code"]), (409, "session_busy"))
        self.assertEqual(cli.turns, 2)
        d.call("POST", f"/api/sessions/{sid}/cancel", headers={"Content-Type": "application/json"})
        self.assertTrue(running.done)
        cli.holding = False
        after = d.post({"prompt": "now", "session_id": sid})
        self.assertEqual(after.code, 200)
        self.assertEqual([m["message"]["content"] for m in cli.stdin if m["type"] == "user"],
                         ["hi", "hold on", "now"])
        self.assertEqual(len(d.world.clis), 1)

    def test_capacity_and_queue(self) -> None:
        """With --max-runs 1 --max-queue 1 a second turn waits (its stream says it is queued), a third gets
        503 with Retry-After, and the waiting one starts when the first ends; a waiting client that leaves
        frees its place without a CLI ever being started for it, and its new session leaves nothing."""
        d = self.daemon(max_runs=1, max_queue=1)
        d.world.hold_turns = True
        first = d.post({"prompt": "first"})
        waiting = d.post({"prompt": "queued"})
        self.assertIn(b'"subtype":"queued","position":1', bytes(waiting.sse.raw))
        full = d.post({"prompt": "no room"})
        self.assertEqual(full.code, 503)
        self.assertEqual(full.header("Retry-After"), "5")
        self.assertEqual(json.loads(bytes(full.sse.raw))["error"]["code"], "server_busy")
        waiting.disconnect()
        self.assertEqual(len(d.world.clis), 1)
        with sqlite3.connect(os.path.join(self.base, "sessions.db")) as db:
            rows = list(db.execute("SELECT claude_session_id FROM sessions"))
        workspaces = os.listdir(os.path.join(self.base, "Workspace"))
        self.assertEqual((len(rows), len(workspaces)), (1, 1))  # the one that left is gone
        queued = d.post({"prompt": "queued again"})
        self.assertEqual(len(d.world.clis), 1)
        d.world.hold_turns = False
        d.call("POST", f"/api/sessions/{first.session_id}/cancel", headers={"Content-Type": "application/json"})
        self.assertTrue(first.done)
        self.assertEqual(queued.code, 200)
        self.assertEqual(queued.types()[:2], ["queued", "init"])
        self.assertEqual(d.world.clis[1].stdin[-1]["message"]["content"], "queued again")
        self.assertTrue(queued.done)
        self.assertEqual(len(d.world.clis), 2)


class DaemonLifecycle(TestCase):
    """What only real processes show, through a real twistd; where a test makes several checks on one daemon,
    each check sees only what the daemon did from its own start on (L{Since})."""

    timeout = 60

    @inlineCallbacks
    def start(self, *args: str, spares: int = 0) -> Any:
        self.daemon = yield Daemon(self, *args, spares=spares).start()
        return self.daemon

    @inlineCallbacks
    def test_turns_stopped_and_resumed(self) -> Any:
        """One daemon without spares: a client that goes away, and the cancel endpoint, interrupt the turn and
        the CLI stays warm for the next; back-to-back turns go to the warm process, and other spawn options
        put it to sleep first (each check's own docstring says exactly what it proves)."""
        yield self.start()
        for check in (self.disconnect_interrupts_the_turn, self.cancel_endpoint, self.back_to_back_turns):
            yield check(self.daemon.since())

    @inlineCallbacks
    def disconnect_interrupts_the_turn(self, daemon: Since) -> Any:
        """A client that goes away gets its turn interrupted with the interrupt request (no signal): the tool
        it ran in a session of its own is gone, the CLI stays warm, and the session's next turn runs in it."""
        client = yield raw_post(daemon.port, {"prompt": "[[fake hang=1 grandchild=1]]"})
        yield client.got_data
        [call] = daemon.invocations()
        [grandchild] = daemon.grandchildren()
        client.transport.abortConnection()
        yield wait_for(lambda: daemon.interrupts() == [call["pid"]] and not pid_alive(grandchild))
        yield wait_for(lambda: ": disconnected," in daemon.log)
        self.assertTrue(pid_alive(call["pid"]))
        self.assertEqual(daemon.signals(), [])
        sid = daemon.rows()[0][0]
        reply = yield post(daemon.url + "/api/claude", {"prompt": "back", "session_id": sid})
        self.assertEqual(reply.status, 200)
        self.assertEqual([t["pid"] for t in daemon.turns()], [call["pid"]] * 2)

    @inlineCallbacks
    def cancel_endpoint(self, daemon: Since) -> Any:
        """POST /api/sessions/<id>/cancel interrupts the running turn, whose stream ends with its one result
        saying cancelled, and the CLI stays warm; 409 when nothing runs, 404 for an unknown session."""
        frames: list[bytes] = []
        running = streaming(daemon.url, {"prompt": "[[fake hang=1]]"}, frames)
        yield wait_for(lambda: frames)
        sid = json.loads(frames[0])["session_id"]
        reply = yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        self.assertEqual((reply.status, reply.json()), (202, {"session_id": sid, "status": "cancelling"}))
        stream = yield running
        [result] = stream.sse.results()
        self.assertEqual((result["terminal_reason"], result["cli_terminal_reason"]), ("cancelled", "aborted_streaming"))
        yield wait_for(lambda: f"{sid}: cancelled," in daemon.log)
        [call] = daemon.invocations()
        self.assertTrue(pid_alive(call["pid"]))
        self.assertEqual((daemon.interrupts(), daemon.signals()), ([call["pid"]], []))
        reply = yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (409, "not_running"))
        reply = yield post(f"{daemon.url}/api/sessions/00000000-0000-4000-8000-000000000000/cancel", {})
        self.assertEqual(reply.status, 404)

    @inlineCallbacks
    def back_to_back_turns(self, daemon: Since) -> Any:
        """A turn sent right after the previous result goes to the same warm process at once; a turn that
        needs other spawn options waits until that process has been put to sleep (stdin closed, no signal),
        then resumes the session in a new process with those options."""
        first = yield post(daemon.url + "/api/claude", {"prompt": "one"})
        sid = first.session_id
        second = yield post(daemon.url + "/api/claude", {"prompt": "two", "session_id": sid})
        self.assertEqual(second.status, 200)
        [call] = daemon.invocations()
        self.assertEqual([t["pid"] for t in daemon.turns()], [call["pid"]] * 2)
        third = yield post(daemon.url + "/api/claude", {"prompt": "three", "session_id": sid,
                                                        "allowedTools": ["Edit"]})
        self.assertFalse(third.sse.results()[0]["is_error"])
        old, new = daemon.invocations()
        self.assertFalse(pid_alive(old["pid"]))
        self.assertEqual(daemon.signals(), [])
        self.assertIn(f"--resume={sid}", new["argv"])
        self.assertEqual(daemon.turns()[-1]["allowed_tools"], ["Edit"])
        self.assertEqual(third.sse.ids[0], second.sse.ids[-1] + 1)

    @inlineCallbacks
    def test_shutdown_restart_and_kill_9(self) -> Any:
        """SIGTERM to twistd ends each open stream with one result saying server_shutdown (the CLI's own after
        the interrupt request, or after SIGINT for a CLI that ignores the request), leaves no CLI process
        behind (idle, spare, running, and the tool one left in a session of its own) and exits cleanly and
        promptly, within --kill-grace + 5 s. (The whole ladder, up to SIGKILL, is proved on a Clock in
        L{InProcessSessions}.) A daemon restarted on the same data dir replays a session's events byte-exact,
        a line larger than the in-memory limit and the shutdown's result among them. After kill -9 of the
        daemon its CLIs exit on their own (stdin closed), and a daemon restarted on the same data dir resumes
        every session under its id, with event ids going on from the old log."""
        daemon = yield self.start("--kill-grace", "0.2", spares=1)
        idle = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        self.assertEqual(idle.status, 200)
        giant = yield post(daemon.url + "/api/claude", {"prompt": "[[fake giant=3000000]]"})
        giant_sid = giant.session_id
        giant_frames = bytes(giant.sse.raw)
        self.assertIn(3000000, [len(f) for f in giant.sse.frames])
        streams = []
        for body in ({"prompt": "[[fake hang=1]]", "session_id": giant_sid},
                     {"prompt": "[[fake hang=1 ignore_interrupt=1 grandchild=1]]"}):
            frames: list[bytes] = []
            streams.append(streaming(daemon.url, body, frames))
            yield wait_for(lambda frames=frames: frames)
        yield wait_for(lambda: len(daemon.invocations()) == 4)  # three sessions and a spare
        pids = [c["pid"] for c in daemon.invocations()] + daemon.grandchildren()
        started = time.monotonic()
        yield daemon.stop()
        self.assertLess(time.monotonic() - started, 3)
        self.assertTrue(daemon.exited_cleanly(), daemon.log)
        self.assertNotIn("Traceback", daemon.log)
        results = []
        for stream in streams:
            reply = yield stream
            [result] = reply.sse.results()
            self.assertEqual(reply.sse.events()[-1], result)
            self.assertEqual(result["terminal_reason"], "server_shutdown")
            results.append(result)
        self.assertEqual([r["cli_terminal_reason"] for r in results], ["aborted_streaming"] * 2)
        stuck = next(t["pid"] for t in daemon.turns() if "ignore_interrupt" in t["prompt"])
        self.assertIn((stuck, "SIGINT"), signalled(daemon.state_dir))
        for pid in pids:
            self.assertFalse(pid_alive(pid), pid)

        restarted = daemon.again(spares=1)
        since = restarted.since()
        yield restarted.start()
        code, replay = yield get_stream(f"{restarted.url}/api/sessions/{giant_sid}/events", {"Last-Event-ID": "0"})
        self.assertEqual(code, 200)
        self.assertEqual(bytes(replay.raw)[:len(giant_frames)], giant_frames)
        self.assertEqual(replay.ids, list(range(1, len(replay.ids) + 1)))
        self.assertEqual(replay.results()[-1]["terminal_reason"], "server_shutdown")

        sids = []
        for _ in range(2):
            reply = yield post(restarted.url + "/api/claude", {"prompt": "hi"})
            sids.append(reply.session_id)
        yield wait_for(lambda: len(since.invocations()) == 3)  # two sessions and a spare
        old = [c["pid"] for c in since.invocations()]
        restarted.signal(signal.SIGKILL)
        yield restarted.proto.ended
        yield wait_for(lambda: not any(pid_alive(pid) for pid in old))
        again = restarted.again()
        yield again.start()
        for sid in sids:
            reply = yield post(again.url + "/api/claude", {"prompt": "back", "session_id": sid})
            self.assertEqual(reply.status, 200)
            self.assertEqual({e["session_id"] for e in reply.sse.events()}, {sid})
            self.assertEqual(reply.sse.ids, [4, 5, 6])
            self.assertIn(f"--resume={sid}", again.invocations()[-1]["argv"])
