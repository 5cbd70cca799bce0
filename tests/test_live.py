"""
Live sessions, in process: the real routes, registry, sessions, logs and SQL, a Clock for every timer,
StubTreq for HTTP, and CLI processes played from the recordings of the real CLI in SDK mode.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from claudesrv.live import COLD, IDLE, Limits
from tests.harness import Daemon, DaemonTestCase, FakeWorld
from tests.harness import recording as harness_recording

JSON = {"Content-Type": "application/json"}


def limits(**overrides: Any) -> Limits:
    values: dict[str, Any] = {"spares": 0, "keepalive": 0, "idle_timeout": 0, "run_timeout": 0, "kill_grace": 5}
    values.update(overrides)
    return Limits(**values)


LiveTestCase = DaemonTestCase


class WarmTurns(LiveTestCase):
    def test_three_turns_in_one_process(self) -> None:
        """Three turns of a session go to one CLI, started with our --session-id, resumed for none; the
        event ids run on across turns and every stream ends with its own result."""
        d = self.daemon()
        first = d.post({"prompt": "one"})
        sid = first.session_id
        later = [d.post({"prompt": p, "session_id": sid}) for p in ("two", "three")]
        for stream in (first, *later):
            self.assertEqual(stream.code, 200)
            self.assertTrue(stream.done)
            self.assertEqual(stream.types(), ["init", "assistant", "result"])
            self.assertEqual(stream.header("X-Session-Id"), sid)
        self.assertEqual(first.sse.ids + later[0].sse.ids + later[1].sse.ids, list(range(1, 10)))
        [cli] = d.world.clis
        self.assertIn(f"--session-id={sid}", cli.argv)
        self.assertFalse([a for a in cli.argv if a.startswith("--resume")])
        self.assertEqual([m["type"] for m in cli.stdin], ["user", "user", "user"])  # no initialize
        self.assertEqual([m["message"]["content"] for m in cli.stdin], ["one", "two", "three"])
        self.assertEqual({e["session_id"] for s in (first, *later) for e in s.events()}, {sid})
        self.assertEqual(cli.cwd, os.path.join(self.base, "Workspace", f"session-{sid}"))
        self.assertEqual(d.registry.counters.starts, {"cold": 1, "warm": 2})

    def test_row_committed_before_the_first_byte(self) -> None:
        """A new session's row is in the database when the response headers arrive."""
        d = self.daemon()
        d.world.hold_turns = True
        stream = d.post({"prompt": "one"})
        self.assertEqual(self.rows(), [(stream.session_id,
                                        os.path.join(self.base, "Workspace", f"session-{stream.session_id}"))])

    def test_prompt_reaches_stdin_as_one_json_line(self) -> None:
        """Newlines, control characters and option-like text in a prompt reach the CLI intact, in one JSON
        line (the scripted CLI, like the real one, dies on anything else)."""
        d = self.daemon()
        prompt = "--help\n\r\u2028 \x1b[31m\"}\n{\"type\":\"control_request\"}"
        stream = d.post({"prompt": prompt})
        self.assertEqual(stream.types(), ["init", "assistant", "result"])
        [cli] = d.world.clis
        self.assertEqual(cli.stdin[-1]["message"]["content"], prompt)

    def test_idle_process_sleeps_and_resumes_cold(self) -> None:
        """After --warm-idle seconds an idle CLI gets stdin EOF and exits; the next turn resumes the session
        in a new process with --resume."""
        d = self.daemon(warm_idle=60)
        sid = d.post({"prompt": "one"}).session_id
        [cli] = d.world.clis
        d.clock.advance(59)
        self.assertTrue(cli.alive)
        d.clock.advance(1)
        d.pump()
        self.assertFalse(cli.alive)
        self.assertEqual(d.registry.state_of(sid)["state"], COLD)
        self.assertEqual(d.registry.counters.sleeps, {"idle": 1})
        stream = d.post({"prompt": "two", "session_id": sid})
        self.assertEqual(stream.types(), ["init", "assistant", "result"])
        second = d.world.clis[1]
        self.assertIn(f"--resume={sid}", second.argv)
        self.assertEqual(d.registry.counters.starts, {"cold": 2})

    def test_least_recently_used_idle_process_sleeps_for_room(self) -> None:
        """With --max-live reached, a turn that needs a process puts the least recently used idle one to sleep."""
        d = self.daemon(max_live=2)
        a = d.post({"prompt": "a"}).session_id
        d.clock.advance(1)
        b = d.post({"prompt": "b"}).session_id
        d.clock.advance(1)
        d.post({"prompt": "a again", "session_id": a})
        c = d.post({"prompt": "c"})
        self.assertEqual(c.types(), ["init", "assistant", "result"])
        self.assertEqual([cli.alive for cli in d.world.of(b)], [False])
        self.assertEqual([cli.alive for cli in d.world.of(a)], [True])
        self.assertEqual(len(d.world.alive()), 2)
        self.assertEqual(d.registry.counters.sleeps, {"lru": 1})

    def test_all_processes_running_means_the_turn_waits(self) -> None:
        """When every live process runs a turn, a new turn waits in the queue (its stream says so) and
        starts when one is free."""
        d = self.daemon(max_live=1, max_runs=4)
        d.world.hold_turns = True
        first = d.post({"prompt": "a"})
        second = d.post({"prompt": "b"})
        self.assertEqual(second.types(), ["queued"])
        self.assertEqual(second.events()[0]["position"], 1)
        d.world.clis[0].end_turn()
        d.pump()
        self.assertTrue(first.done)
        self.assertEqual(len(d.world.clis), 2)
        d.world.clis[1].end_turn()
        self.assertEqual(second.types(), ["queued", "init", "assistant", "result"])

    def test_queued_client_that_leaves_leaves_the_queue(self) -> None:
        """A queued turn whose client goes away is dropped from the queue and never runs."""
        d = self.daemon(max_runs=1)
        d.world.hold_turns = True
        d.post({"prompt": "a"})
        waiting = d.post({"prompt": "b"})
        waiting.disconnect()
        self.assertEqual(len(d.registry.queue), 0)
        self.assertEqual(len(self.rows()), 1)  # the new session that never ran is not left half-made
        d.world.clis[0].end_turn()
        d.pump()
        self.assertEqual(len(d.world.clis), 1)
        self.assertEqual(d.registry.counters.ended.get("disconnected"), 1)

    def test_other_spawn_options_restart_the_process(self) -> None:
        """A turn with other tool lists puts the warm process to sleep and resumes with the new options;
        repeating them then reuses the new process."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        body = {"prompt": "b", "session_id": sid, "allowedTools": ["Bash(git *)"], "disallowedTools": ["Write"]}
        self.assertEqual(d.post(body).types(), ["init", "assistant", "result"])
        first, second = d.world.clis
        self.assertFalse(first.alive)
        self.assertIn(f"--resume={sid}", second.argv)
        self.assertEqual(second.argv[second.argv.index("--allowedTools") + 1], "Bash(git *)")
        self.assertEqual(second.argv[second.argv.index("--disallowedTools") + 1], "Write")
        self.assertEqual(second.argv[-1], "--")
        d.post(dict(body, prompt="c"))
        self.assertEqual(len(d.world.clis), 2)
        self.assertEqual(d.registry.counters.sleeps, {"options": 1})


class Spares(LiveTestCase):
    def test_spare_taken_and_replaced(self) -> None:
        """A spare is started and initialized ahead of time; a new session takes it (its id becomes the
        session's) and another spare is started in the background."""
        d = self.daemon(spares=1)
        [spare] = d.world.clis
        self.assertEqual([m["request"]["subtype"] for m in spare.stdin], ["initialize"])
        stream = d.post({"prompt": "hello"})
        self.assertEqual(stream.types(), ["init", "assistant", "result"])
        self.assertEqual(stream.session_id, spare.session_id)
        self.assertEqual(spare.stdin[-1]["message"]["content"], "hello")
        self.assertEqual(len(d.world.clis), 2)
        self.assertNotEqual(d.world.clis[1].session_id, spare.session_id)
        self.assertEqual(d.registry.counters.starts, {"spare": 1})

    def test_spare_not_used_for_other_options(self) -> None:
        """A new session with its own tool lists does not take the spare (started without them)."""
        d = self.daemon(spares=1)
        [spare] = d.world.clis
        stream = d.post({"prompt": "hello", "allowedTools": ["Read"]})
        self.assertNotEqual(stream.session_id, spare.session_id)
        self.assertTrue(spare.alive)
        self.assertEqual(d.registry.counters.starts, {"cold": 1})

    def test_spare_that_dies_is_swept_and_its_workspace_removed(self) -> None:
        """A spare whose CLI exits is removed with its empty workspace; spares pause before the next try."""
        d = self.daemon(spares=1)
        [spare] = d.world.clis
        spare.exit(1)
        d.pump()
        self.assertEqual(os.listdir(os.path.join(self.base, "Workspace")), [])
        self.assertEqual(os.listdir(os.path.join(self.base, "events")), [])
        self.assertEqual(len(d.world.clis), 1)
        d.clock.advance(31)
        self.assertEqual(len(d.world.clis), 2)


class Stopping(LiveTestCase):
    def test_cancel_interrupts_and_the_process_stays_warm(self) -> None:
        """Cancel sends the interrupt request: the CLI's aborted result ends the stream (marked cancelled),
        no signal is sent, and the same process takes the next turn."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        [cli] = d.world.clis
        cli.hold()
        running = d.post({"prompt": "b", "session_id": sid})
        self.assertFalse(running.done)
        self.assertEqual(d.call("POST", f"/api/sessions/{sid}/cancel", headers=JSON)[0], 202)
        self.assertTrue(running.done)
        result = running.events()[-1]
        self.assertEqual((result["terminal_reason"], result["cli_terminal_reason"]), ("cancelled", "aborted_streaming"))
        self.assertEqual(cli.stdin[-1]["request"]["subtype"], "interrupt")
        d.clock.advance(60)
        self.assertEqual(cli.signals, [])
        cli.holding = False
        self.assertEqual(d.post({"prompt": "c", "session_id": sid}).types(), ["init", "assistant", "result"])
        self.assertEqual(len(d.world.clis), 1)

    def test_ladder_when_the_cli_ignores_the_interrupt(self) -> None:
        """A CLI that ignores the interrupt gets SIGINT after --kill-grace, then SIGTERM and SIGKILL two
        seconds apart; the stream ends with one synthetic result and the marker sweep runs."""
        d = self.daemon(kill_grace=5)
        d.world.hold_turns = True
        stream = d.post({"prompt": "a"})
        [cli] = d.world.clis
        cli.ignore_interrupt = cli.ignore_signals = True
        d.call("POST", f"/api/sessions/{stream.session_id}/cancel", headers=JSON)
        d.clock.advance(4.9)
        self.assertEqual(cli.signals, [])
        d.clock.advance(0.1)
        self.assertEqual(cli.signals, [signal.SIGINT])
        d.clock.advance(2)
        self.assertEqual(cli.signals, [signal.SIGINT, signal.SIGTERM])
        cli.ignore_signals = False
        d.clock.advance(2)
        d.pump()
        self.assertEqual(cli.signals[:3], [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        self.assertEqual(set(cli.signals[3:]), {signal.SIGKILL})  # the group again, once the CLI is gone
        self.assertTrue(stream.done)
        results = [e for e in stream.events() if e["type"] == "result"]
        self.assertEqual(len(results), 1)
        self.assertEqual((results[0]["terminal_reason"], results[0]["signal"]), ("cancelled", signal.SIGKILL))
        self.assertIn(cli.env["CLAUDESRV_RUN_ID"].encode(), b"".join(d.world.swept))

    def test_run_and_idle_timeouts(self) -> None:
        """A turn longer than --run-timeout, or silent for --idle-timeout, is interrupted and says why."""
        d = self.daemon(run_timeout=100, idle_timeout=30)
        d.world.hold_turns = True
        idle = d.post({"prompt": "a"})
        d.clock.advance(30)
        d.pump()
        self.assertEqual(idle.events()[-1]["timeout"], "idle")
        self.assertEqual(idle.events()[-1]["terminal_reason"], "timeout")
        d2 = self.daemon(run_timeout=100, idle_timeout=0)
        d2.world.hold_turns = True
        long = d2.post({"prompt": "a"})
        d2.clock.advance(100)
        d2.pump()
        self.assertEqual(long.events()[-1]["timeout"], "run")

    def test_disconnect_interrupts_unless_detached(self) -> None:
        """A client that goes away interrupts its turn; a detached turn runs on, its events in the log."""
        d = self.daemon()
        d.world.hold_turns = True
        gone = d.post({"prompt": "a"})
        gone.disconnect()
        [cli] = d.world.clis
        self.assertEqual(cli.stdin[-1]["request"]["subtype"], "interrupt")
        self.assertEqual(d.registry.counters.ended, {"disconnected": 1})
        detached = d.post({"prompt": "b", "detach": True})
        detached.disconnect()
        second = d.world.clis[1]
        self.assertNotIn("interrupt", [m.get("request", {}).get("subtype") for m in second.stdin])
        second.end_turn()
        d.pump()
        replay = d.events(detached.session_id)
        self.assertEqual(replay.types(), ["init", "assistant", "result"])
        self.assertTrue(replay.done)

    def test_on_disconnect_continue(self) -> None:
        """Under --on-disconnect continue every turn runs on when its client leaves."""
        d = self.daemon(on_disconnect="continue")
        d.world.hold_turns = True
        d.post({"prompt": "a"}).disconnect()
        [cli] = d.world.clis
        self.assertEqual([m["type"] for m in cli.stdin], ["user"])  # no interrupt followed

    def test_process_dying_mid_turn_and_between_turns(self) -> None:
        """A CLI that dies mid-turn ends the turn with one synthetic result naming the exit; one that dies
        idle is swept, and the next turn resumes the session cold."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        [cli] = d.world.clis
        cli.hold()
        running = d.post({"prompt": "b", "session_id": sid})
        cli.protocol.errReceived(b"boom: something broke\n")
        cli.exit(3)
        d.pump()
        result = running.events()[-1]
        self.assertEqual((result["type"], result["exit_code"], result["terminal_reason"]), ("result", 3, "cli_failed"))
        self.assertIn("boom: something broke", result["errors"][0])
        again = d.post({"prompt": "c", "session_id": sid})
        d.world.clis[1].end_turn()
        self.assertEqual(again.types(), ["init", "assistant", "result"])
        d.world.clis[1].exit(0)
        d.pump()
        self.assertEqual(d.registry.state_of(sid)["state"], COLD)
        d.world.hold_turns = False
        self.assertEqual(d.post({"prompt": "d", "session_id": sid}).types(), ["init", "assistant", "result"])
        self.assertIn(f"--resume={sid}", d.world.clis[2].argv)

    def test_new_session_whose_cli_dies_silently_leaves_nothing(self) -> None:
        """A new session whose CLI exits before printing anything loses its row, workspace and log before
        its stream ends; the stream still ends with one result."""
        d = self.daemon()
        d.world.silent = True
        s = d.post({"prompt": "a"})
        d.world.clis[-1].exit(1)
        d.pump()
        self.assertTrue(s.done)
        self.assertEqual(s.types(), ["result"])
        self.assertEqual(self.rows(), [])
        self.assertEqual(os.listdir(os.path.join(self.base, "Workspace")), [])
        self.assertFalse(os.path.exists(os.path.join(self.base, "events", s.session_id)))
        self.assertEqual(d.call("GET", f"/api/sessions/{s.session_id}")[0], 404)

    def test_spawn_failure_is_a_result(self) -> None:
        """A CLI that cannot be started ends the turn with a spawn_failed result."""
        d = self.daemon()
        d.world.fail_spawn = FileNotFoundError(2, "No such file or directory")
        stream = d.post({"prompt": "a"})
        self.assertTrue(stream.done)
        self.assertEqual(stream.events()[-1]["terminal_reason"], "spawn_failed")
        self.assertEqual((self.rows(), os.listdir(os.path.join(self.base, "Workspace"))), ([], []))

    def test_tool_needing_approval_is_denied_with_a_message(self) -> None:
        """A can_use_tool request is answered deny, with a message saying how to allow the tool, and the
        denial is an event of the turn; the control frames themselves are not events."""
        d = self.daemon()
        d.world.hold_turns = True
        stream = d.post({"prompt": "a"})
        [cli] = d.world.clis
        request_id = cli.ask()
        [answer] = cli.answers
        self.assertEqual(answer["request_id"], request_id)
        self.assertEqual(answer["response"]["behavior"], "deny")
        self.assertIn("allowedTools", answer["response"]["message"])
        cli.end_turn()
        self.assertEqual(stream.types(), ["init", "permission_denied", "assistant", "result"])

    def test_shutdown_interrupts_turns_and_ends_every_process(self) -> None:
        """Shutdown ends queued and running turns with one result each, closes every stdin and waits for
        every process, spares too."""
        d = self.daemon(spares=1, max_runs=1)
        d.world.hold_turns = True
        d.world.clis[0].hold()
        running = d.post({"prompt": "a"})
        queued = d.post({"prompt": "b"})
        done = d.registry.shutdown()
        d.pump()
        self.assertEqual(d.world.alive(), [])
        self.successResultOf(done)
        for stream in (running, queued):
            self.assertTrue(stream.done)
            self.assertEqual([e["terminal_reason"] for e in stream.events() if e["type"] == "result"],
                             ["server_shutdown"])


class Races(LiveTestCase):
    """What arrives in an unusual order, or in unusual sizes."""

    def test_large_permission_request_is_answered_not_relayed(self) -> None:
        """A can_use_tool request longer than the in-memory line limit (a large Write) is still answered, and
        is no event: control frames never reach clients, however they arrive."""
        d = self.daemon(max_line=300)
        d.world.hold_turns = True
        stream = d.post({"prompt": "a"})
        [cli] = d.world.clis
        line = next(text for direction, text in harness_recording("s02a_cut_allow_updated_input")
                    if direction == "out" and '"subtype":"can_use_tool"' in text).encode() + b"\n"
        for at in range(0, len(line), 256):
            cli.protocol.outReceived(line[at:at + 256])
        [answer] = cli.answers
        self.assertEqual(answer["response"]["behavior"], "deny")
        cli.end_turn()
        self.assertEqual(stream.types(), ["init", "permission_denied", "assistant", "result"])

    def test_client_leaving_during_the_row_commit_leaves_nothing(self) -> None:
        """A new session whose client leaves while its row waits behind another session's write leaves no
        row, workspace or log once the writes are done (its removal is not overtaken by its own insert)."""
        d = self.daemon()
        d.db.held = True
        first = d.post({"prompt": "a"})
        gone = d.post({"prompt": "b"})
        gone.disconnect()
        d.db.release()
        d.pump()
        self.assertEqual([row[0] for row in self.rows()], [first.session_id])
        self.assertEqual(os.listdir(os.path.join(self.base, "Workspace")), [f"session-{first.session_id}"])
        self.assertEqual(os.listdir(os.path.join(self.base, "events")), [first.session_id])
        self.assertEqual(list(d.registry.turns), [])

    def test_shutdown_while_a_row_is_written(self) -> None:
        """A turn whose row is still being written when shutdown begins still ends with one result."""
        d = self.daemon()
        d.db.held = True
        stream = d.post({"prompt": "a"})
        done = d.registry.shutdown()
        d.db.release()
        d.pump()
        self.successResultOf(done)
        self.assertTrue(stream.done)
        self.assertEqual([e["terminal_reason"] for e in stream.events() if e["type"] == "result"],
                         ["server_shutdown"])

    def test_result_of_a_session_that_never_came_to_be_names_none(self) -> None:
        """A new session cancelled before any CLI saw it is removed, and its one result names no session."""
        d = self.daemon(max_runs=1)
        d.world.hold_turns = True
        d.post({"prompt": "a"})
        waiting = d.post({"prompt": "b"})
        self.assertEqual(d.call("POST", f"/api/sessions/{waiting.session_id}/cancel", headers=JSON)[0], 202)
        self.assertIsNone(waiting.events()[-1]["session_id"])
        self.assertEqual(d.call("GET", f"/api/sessions/{waiting.session_id}")[0], 404)

    def test_failed_spare_spawns_leave_nothing(self) -> None:
        """A spare that cannot be started leaves no workspace and no event log behind."""
        world = FakeWorld()
        world.fail_spawn = FileNotFoundError(2, "No such file or directory")
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        d = Daemon(base, limits(spares=1), world)
        self.addCleanup(d.close)
        d.clock.advance(31)
        self.assertEqual(os.listdir(os.path.join(base, "Workspace")), [])
        self.assertEqual(os.listdir(os.path.join(base, "events")) if os.path.isdir(os.path.join(base, "events"))
                         else [], [])


class Reattach(LiveTestCase):
    def test_replay_after_the_turn(self) -> None:
        """Last-Event-ID (or ?after=) replays every later event with its id, byte-exact, then ends."""
        d = self.daemon()
        first = d.post({"prompt": "a"})
        sid = first.session_id
        d.post({"prompt": "b", "session_id": sid})
        replay = d.events(sid, headers={"Last-Event-ID": "2"})
        self.assertEqual(replay.sse.ids, [3, 4, 5, 6])
        self.assertTrue(replay.done)
        self.assertEqual(bytes(first.sse.raw).split(b"\n\n")[2] + b"\n\n",
                         bytes(replay.sse.raw)[:bytes(replay.sse.raw).index(b"\n\n") + 2])
        self.assertEqual(d.events(sid, "?after=5").sse.ids, [6])
        self.assertEqual(d.events(sid, "?after=6").sse.ids, [])

    def test_reattach_mid_turn_and_two_followers(self) -> None:
        """A client reattaching mid-turn gets what it missed, then the rest live, and ends with the turn;
        two followers each get every event in order."""
        d = self.daemon()
        d.world.hold_turns = True
        stream = d.post({"prompt": "a", "detach": True})
        sid = stream.session_id
        stream.disconnect()
        one = d.events(sid, headers={"Last-Event-ID": "0"})
        two = d.events(sid, "?after=1")
        self.assertEqual((one.sse.ids, two.sse.ids), ([1], []))
        d.world.clis[0].end_turn()
        d.pump()
        self.assertEqual((one.sse.ids, two.sse.ids), ([1, 2, 3], [2, 3]))
        self.assertTrue(one.done and two.done)

    def test_follow_session_across_turns(self) -> None:
        """?follow=session stays open across turns until the client leaves."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        follower = d.events(sid, "?after=3&follow=session")
        d.post({"prompt": "b", "session_id": sid})
        d.post({"prompt": "c", "session_id": sid})
        self.assertEqual(follower.sse.ids, [4, 5, 6, 7, 8, 9])
        self.assertFalse(follower.done)
        follower.disconnect()
        self.assertEqual(d.registry.logs.get(sid) is None, d.registry.sessions.get(sid) is None)

    def test_gap_after_truncation(self) -> None:
        """When old turns were dropped (--log-max-bytes), a reattach from before them starts with one gap
        event naming the missing ids."""
        d = self.daemon(log_max_bytes=4000)
        sid = d.post({"prompt": "a"}).session_id
        for p in "bcdefgh":
            d.post({"prompt": p, "session_id": sid})
        log = d.registry.log_for(sid)
        self.assertGreater(log.first_seq, 1)
        replay = d.events(sid, "?after=0")
        gap = replay.events()[0]
        self.assertEqual((gap["subtype"], gap["from"], gap["to"]), ("gap", 1, log.first_seq - 1))
        self.assertEqual(replay.sse.ids[0], log.first_seq)
        self.assertEqual(replay.sse.ids[-1], 24)

    def test_replay_after_a_restart(self) -> None:
        """The log survives the daemon: a new one replays it, and new turns go on numbering after it."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        d.registry.shutdown()
        d.pump()
        again = Daemon(self.base, limits(), FakeWorld())
        self.addCleanup(again.close)
        self.assertEqual(again.events(sid).sse.ids, [1, 2, 3])
        self.assertEqual(again.post({"prompt": "b", "session_id": sid}).sse.ids, [4, 5, 6])
        self.assertIn(f"--resume={sid}", again.world.clis[0].argv)

    def test_deleting_a_followed_session(self) -> None:
        """Followers of a deleted session get a deleted event and their streams end; the log is gone."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        follower = d.events(sid, "?after=3&follow=session")
        self.assertEqual(d.call("DELETE", f"/api/sessions/{sid}")[0], 200)
        self.assertEqual(follower.types(), ["deleted"])
        self.assertTrue(follower.done)
        self.assertFalse(os.path.exists(os.path.join(self.base, "events", sid)))
        self.assertEqual(d.world.alive(), [])

    def test_bad_reattach_requests(self) -> None:
        """A Last-Event-ID or after that is not a non-negative integer is 400; an unknown session is 404."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        for query, headers in (("?after=-1", {}), ("?after=x", {}), ("", {"Last-Event-ID": "1.5"}),
                               ("?follow=forever", {})):
            code, body = d.call("GET", f"/api/sessions/{sid}/events{query}", headers=headers)
            self.assertEqual((code, body["error"]["code"]), (400, "invalid_query"), query or headers)
        code, body = d.call("GET", "/api/sessions/00000000-0000-4000-8000-000000000000/events")
        self.assertEqual((code, body["error"]["code"]), (404, "session_not_found"))


class Visibility(LiveTestCase):
    def test_session_shows_its_live_state(self) -> None:
        """GET /api/sessions/<id> gives the state, the last event id and the pid of the live process."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        code, body = d.call("GET", f"/api/sessions/{sid}")
        self.assertEqual((body["state"], body["last_event_id"], body["pid"]), (IDLE, 3, d.world.clis[0].pid))
        d.world.clis[0].hold()
        d.post({"prompt": "b", "session_id": sid})
        self.assertEqual(d.call("GET", f"/api/sessions/{sid}")[1]["state"], "running")

    def test_metrics_show_processes_and_starts(self) -> None:
        """/metrics has live processes by state, spares, warm/spare/cold starts, sleeps and log bytes."""
        d = self.daemon(spares=1)
        sid = d.post({"prompt": "a"}).session_id
        d.post({"prompt": "b", "session_id": sid})
        d.pump()
        response = self.successResultOf(d.http.get("http://localhost/metrics"))
        text = self.successResultOf(d.http.text_content(response))
        for line in ('claudesrv_live_processes{state="idle"} 2.0', "claudesrv_spares 1.0",
                     'claudesrv_turn_starts_total{kind="spare"} 1.0', 'claudesrv_turn_starts_total{kind="warm"} 1.0',
                     'claudesrv_cli_sleeps_total{reason="idle"} 0.0'):
            self.assertIn(line, text)
        self.assertRegex(text, r"claudesrv_event_log_bytes [1-9]")


class Housekeeping(LiveTestCase):
    def test_leftovers_of_sessions_that_never_came_to_be_are_removed(self) -> None:
        """At start, empty workspaces and event logs of an earlier daemon that no row names (a spare or a new
        session cut off by kill -9) are removed; a session's own folders, any workspace with files in it, and
        anything made since the start stay."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        orphan = "00000000-0000-4000-8000-000000000001"
        os.makedirs(os.path.join(self.base, "Workspace", f"session-{orphan}"))
        os.makedirs(os.path.join(self.base, "events", orphan))
        kept = os.path.join(self.base, "Workspace", "session-00000000-0000-4000-8000-000000000002")
        os.makedirs(kept)
        open(os.path.join(kept, "notes.txt"), "w").close()
        for path in (kept, os.path.join(self.base, "Workspace", f"session-{orphan}"),
                     os.path.join(self.base, "events", orphan)):
            os.utime(path, (0, 0))  # left by an earlier daemon
        self.assertEqual(self.successResultOf(d.sessions.remove_orphans()), 2)
        self.assertEqual(sorted(os.listdir(os.path.join(self.base, "Workspace"))),
                         sorted([f"session-{sid}", os.path.basename(kept)]))
        self.assertEqual(os.listdir(os.path.join(self.base, "events")), [sid])
