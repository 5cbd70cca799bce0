"""
Live sessions through a real ``twistd -n claudesrv`` and real CLI processes (the fake in SDK mode): what
only real processes show: one warm pid across turns, spares, processes and their children gone after a
disconnect, a delete and a shutdown, and a log that outlives the daemon.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.rawhttp import raw_post
from tests.support import Daemon, SSEParser, pid_alive, post, wait_for


def turns(daemon: Daemon) -> list[dict[str, Any]]:
    path = os.path.join(daemon.state_dir, "turns.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stdin_of(daemon: Daemon, pid: int) -> list[dict[str, Any]]:
    path = os.path.join(daemon.state_dir, "stdin.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [json.loads(r["line"]) for r in rows if r["pid"] == pid and r["line"].strip()]


@inlineCallbacks
def get_stream(url: str, headers: dict[str | bytes, str | bytes] | None = None) -> Any:
    response = yield treq.get(url, headers=headers or {}, persistent=False)
    sse = SSEParser()
    yield treq.collect(response, sse.feed)
    return response.code, sse


class LiveDaemonTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_warm_process_across_turns_and_spare(self) -> Any:
        """A new session takes the spare (its pre-chosen id is the session's), a spare is started in its
        place, and follow-up turns go to the same warm pid."""
        daemon = yield Daemon(self, "--spares", "1").start()
        yield wait_for(lambda: len(daemon.invocations()) == 1)
        [spare] = daemon.invocations()
        first = yield post(daemon.url + "/api/claude", {"prompt": "one"})
        sid = first.header("X-Session-Id")
        self.assertIn(f"--session-id={sid}", spare["argv"])
        for prompt in ("two", "three"):
            reply = yield post(daemon.url + "/api/claude", {"prompt": prompt, "session_id": sid})
            self.assertEqual([e["type"] for e in reply.sse.events()][-1], "result")
        self.assertEqual([t["pid"] for t in turns(daemon)], [spare["pid"]] * 3)
        self.assertEqual([t["prompt"] for t in turns(daemon)], ["one", "two", "three"])
        yield wait_for(lambda: len(daemon.invocations()) == 2)
        self.assertNotIn(f"--session-id={sid}", daemon.invocations()[1]["argv"])

    @inlineCallbacks
    def test_disconnect_interrupts_then_delete_leaves_no_process(self) -> Any:
        """A client that drops a hung turn interrupts it (the CLI stays warm); deleting the session then
        ends the CLI and the tool process it left in a session of its own."""
        daemon = yield Daemon(self, "--spares", "0").start()
        first = yield post(daemon.url + "/api/claude", {"prompt": "start"})
        sid = first.header("X-Session-Id")
        client = yield raw_post(daemon.port, {"prompt": "[[fake hang=1 grandchild=1]]", "session_id": sid})
        yield client.got_data
        yield wait_for(lambda: len(daemon.grandchildren()) == 1)
        client.transport.abortConnection()
        yield wait_for(lambda: any(m.get("request", {}).get("subtype") == "interrupt"
                                   for m in stdin_of(daemon, turns(daemon)[0]["pid"])))
        pid = turns(daemon)[0]["pid"]
        yield wait_for(lambda: f"session {sid}: disconnected" in daemon.log)
        self.assertTrue(pid_alive(pid))
        deleted = yield treq.delete(f"{daemon.url}/api/sessions/{sid}", persistent=False)
        self.assertEqual(deleted.code, 204)
        yield wait_for(lambda: not pid_alive(pid))
        yield wait_for(lambda: not any(pid_alive(g) for g in daemon.grandchildren()))

    @inlineCallbacks
    def test_log_outlives_the_daemon_and_shutdown_is_prompt(self) -> Any:
        """A turn's events, a line larger than the in-memory limit among them, are replayed byte-exact by
        a restarted daemon; shutdown with a hung turn ends it and every process within kill-grace + 5 s."""
        daemon = yield Daemon(self, "--spares", "0", "--kill-grace", "1").start()
        first = yield post(daemon.url + "/api/claude", {"prompt": "[[fake giant=3000000]]"})
        sid = first.header("X-Session-Id")
        frames = bytes(first.sse.raw)
        self.assertIn(3000000, [len(f) for f in first.sse.frames])
        hung = post(daemon.url + "/api/claude", {"prompt": "[[fake hang=1]]", "session_id": sid})
        yield wait_for(lambda: len(turns(daemon)) == 2)
        pid = turns(daemon)[1]["pid"]
        started = time.monotonic()
        yield daemon.stop()
        self.assertLess(time.monotonic() - started, 1 + 5)
        self.assertTrue(daemon.exited_cleanly())
        reply = yield hung
        self.assertEqual([r["terminal_reason"] for r in reply.sse.results()], ["server_shutdown"])
        self.assertFalse(pid_alive(pid))

        again = Daemon(self, "--spares", "0")
        again.data_dir, again.state_dir = daemon.data_dir, daemon.state_dir
        again.args[again.args.index("--data-dir") + 1] = daemon.data_dir
        again.env["FAKE_STATE_DIR"] = daemon.state_dir
        yield again.start()
        code, replay = yield get_stream(f"{again.url}/api/sessions/{sid}/events", {"Last-Event-ID": "0"})
        self.assertEqual(code, 200)
        self.assertEqual(bytes(replay.raw)[:len(frames)], frames)
        self.assertEqual(replay.ids, list(range(1, len(replay.ids) + 1)))
        self.assertEqual(replay.results()[-1]["terminal_reason"], "server_shutdown")

