"""
Approvals over HTTP, in process: the CLI's can_use_tool requests become permission_request events, a
person's answer goes back to the CLI, and nothing waits for ever.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from claudesrv.approvals import KEEP_RESOLVED, iso
from tests import support
from tests.harness import Daemon, DaemonTestCase, ScriptedCli, Stream, recording
from tests.support import SSEParser, pid_alive, post, state_lines, wait_for

S02A_INPUT = {"command": "echo hi > file.txt", "description": "Write hi to file.txt"}


class ApprovalTestCase(DaemonTestCase):
    def asking(self, **limits: Any) -> tuple[Daemon, Stream, ScriptedCli, dict[str, Any]]:
        """A turn with approvals on, held open, whose CLI asked about Bash: the daemon, the turn's stream,
        its CLI and the permission_request event."""
        d = self.daemon(**limits)
        d.world.hold_turns = True
        stream = d.post({"prompt": "make a file", "approvals": True})
        [cli] = d.world.clis
        cli.ask()
        return d, stream, cli, self.last(stream, "permission_request")

    def last(self, stream: Stream, subtype: str) -> dict[str, Any]:
        return [e for e in stream.events() if e.get("subtype") == subtype][-1]

    def answer(self, d: Daemon, session_id: str, request_id: str, body: Any) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return d.call("POST", f"/api/sessions/{session_id}/permissions/{request_id}", data=raw,
                      headers={"Content-Type": "application/json"})

    def response(self, cli: ScriptedCli) -> dict[str, Any]:
        """What the CLI was last answered."""
        answer = cli.answers[-1]
        self.assertEqual(answer["subtype"], "success")
        return dict(answer["response"])


class Asking(ApprovalTestCase):
    def test_request_is_an_event_and_waits(self) -> None:
        """The request is one event with the tool, its input, the CLI's description and suggestions and when it
        expires; the CLI gets no answer yet; the session lists it as pending."""
        d, stream, cli, event = self.asking()
        self.assertEqual(len(event["request_id"]), 32)
        self.assertEqual((event["tool_name"], event["input"], event["description"]),
                         ("Bash", S02A_INPUT, "Write hi to file.txt"))
        self.assertTrue(event["tool_use_id"].startswith("toolu_"))
        self.assertEqual(event["suggestions"][0]["type"], "addRules")
        self.assertEqual(event["expires_at"], iso(d.clock.seconds() + 300))
        self.assertEqual(cli.answers, [])
        self.assertEqual(stream.types(), ["init", "permission_request"])
        code, body = d.call("GET", f"/api/sessions/{stream.session_id}")
        self.assertEqual((code, body["pending_permissions"]), (200, [event]))

    def test_allow_runs_the_tool_with_its_own_input(self) -> None:
        """A bare allow sends the CLI the tool's original input; the resolution is an event and the answer's
        body; the turn goes on to its result; the session has nothing pending."""
        d, stream, cli, event = self.asking()
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})
        self.assertEqual((code, body["behavior"], body["by"], body["tool_name"]), (200, "allow", "client", "Bash"))
        self.assertEqual(self.response(cli), {"behavior": "allow", "updatedInput": S02A_INPUT})
        resolved = self.last(stream, "permission_resolved")
        self.assertEqual((resolved["request_id"], resolved["behavior"], resolved["by"]),
                         (event["request_id"], "allow", "client"))
        cli.end_turn()
        self.assertEqual(stream.types(), ["init", "permission_request", "permission_resolved", "assistant", "result"])
        self.assertTrue(stream.done)
        self.assertEqual(d.call("GET", f"/api/sessions/{stream.session_id}")[1]["pending_permissions"], [])

    def test_deny_with_message_and_with_interrupt(self) -> None:
        """A deny's message reaches the CLI as the tool's error; interrupt: true goes with it."""
        d, stream, cli, event = self.asking()
        code, body = self.answer(d, stream.session_id, event["request_id"],
                                 {"behavior": "deny", "message": "not in my home directory"})
        self.assertEqual((code, body["behavior"]), (200, "deny"))
        self.assertEqual(self.response(cli), {"behavior": "deny", "message": "not in my home directory"})
        second = cli.ask()
        event = self.last(stream, "permission_request")
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "deny", "interrupt": True})
        self.assertEqual((code, body["interrupt"]), (200, True))
        self.assertEqual(cli.answers[-1]["request_id"], second)
        self.assertEqual(self.response(cli), {"behavior": "deny", "interrupt": True,
                                              "message": "The user denied the use of Bash."})
        self.assertTrue(self.last(stream, "permission_resolved")["interrupt"])

    def test_two_requests_one_after_another(self) -> None:
        """Each request has its own id, and each answer goes to its own CLI request."""
        d, stream, cli, first = self.asking()
        self.assertEqual(self.answer(d, stream.session_id, first["request_id"], {"behavior": "allow"})[0], 200)
        cli_second = cli.ask()
        second = self.last(stream, "permission_request")
        self.assertNotEqual(second["request_id"], first["request_id"])
        self.assertEqual(self.answer(d, stream.session_id, second["request_id"], {"behavior": "deny"})[0], 200)
        self.assertEqual([(a["request_id"], a["response"]["behavior"]) for a in cli.answers][1:],
                         [(cli_second, "deny")])

    def test_second_client_answers_after_reattaching(self) -> None:
        """A detached turn's request waits without its client; a client that reattaches sees it in the replay
        and answers it."""
        d, stream, cli, event = self.asking()
        stream.disconnect()  # not detached: the turn is interrupted and its request cancelled
        self.assertEqual(self.last(d.events(stream.session_id, "?after=0"), "permission_resolved")["by"], "cancel")
        cli.end_turn()
        detached = d.post({"prompt": "again", "approvals": True, "session_id": stream.session_id, "detach": True})
        cli.ask()
        detached.disconnect()
        follower = d.events(stream.session_id, "?after=0")
        event = self.last(follower, "permission_request")
        self.assertNotIn("permission_resolved", [e.get("subtype") for e in follower.events()][-1:])
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})
        self.assertEqual((code, body["by"]), (200, "client"))
        self.assertEqual(self.response(cli)["behavior"], "allow")
        self.assertEqual(self.last(follower, "permission_resolved")["request_id"], event["request_id"])


class AskUserQuestion(ApprovalTestCase):
    def question(self) -> tuple[Daemon, Stream, ScriptedCli, dict[str, Any]]:
        d = self.daemon()
        d.world.hold_turns = True
        stream = d.post({"prompt": "ask me", "approvals": True})
        [cli] = d.world.clis
        cli.ask("AskUserQuestion")
        return d, stream, cli, self.last(stream, "permission_request")

    def test_answers_become_the_updated_input_the_cli_expects(self) -> None:
        """The event carries the questions; the answer's answers become exactly the updatedInput the real
        client sent in recording s09."""
        d, stream, cli, event = self.question()
        self.assertEqual([q["question"] for q in event["questions"]], ["Which format?"])
        self.assertEqual(event["questions"][0]["options"][0]["label"], "Summary")
        code, _ = self.answer(d, stream.session_id, event["request_id"],
                              {"behavior": "allow", "answers": {"Which format?": "Summary"}})
        self.assertEqual(code, 200)
        recorded = next(json.loads(line) for direction, line in recording("s09_ask_user_question")
                        if direction == "in" and '"control_response"' in line)
        self.assertEqual(self.response(cli), recorded["response"]["response"])

    def test_wrong_answers_are_refused(self) -> None:
        d, stream, cli, event = self.question()
        for body, code, field in [
            ({"behavior": "allow", "answers": {"Which colour?": "red"}}, 400, "answers"),
            ({"behavior": "allow"}, 400, "answers"),
            ({"behavior": "allow", "answers": {"Which format?": "Summary"}, "remember": "tool"}, 400, "remember"),
        ]:
            status, error = self.answer(d, stream.session_id, event["request_id"], body)
            self.assertEqual((status, error["error"]["field"]), (code, field), body)
        self.assertEqual(cli.answers, [])
        edited = {**event["input"], "answers": {"Which format?": "Detailed"}}
        self.assertEqual(self.answer(d, stream.session_id, event["request_id"],
                                     {"behavior": "allow", "updated_input": edited})[0], 200)
        self.assertEqual(self.response(cli)["updatedInput"], edited)


class NobodyAnswers(ApprovalTestCase):
    def test_timeout_denies_and_later_answers_get_409(self) -> None:
        """Unanswered for --approval-timeout, a request is denied with a message that says why; an answer after
        that, or a second answer, is 409 with how it was resolved."""
        d, stream, cli, event = self.asking(approval_timeout=30)
        d.clock.advance(29)
        self.assertEqual(cli.answers, [])
        d.clock.advance(1)
        response = self.response(cli)
        self.assertEqual(response["behavior"], "deny")
        self.assertIn("nobody answered", response["message"])
        self.assertEqual(self.last(stream, "permission_resolved")["by"], "timeout")
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})
        self.assertEqual((code, body["error"]["code"], body["error"]["resolution"]["by"]),
                         (409, "already_resolved", "timeout"))
        self.assertEqual(len(cli.answers), 1)

    def test_answered_twice(self) -> None:
        d, stream, cli, event = self.asking()
        self.assertEqual(self.answer(d, stream.session_id, event["request_id"], {"behavior": "deny"})[0], 200)
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})
        self.assertEqual((code, body["error"]["resolution"]["behavior"]), (409, "deny"))
        self.assertEqual(len(cli.answers), 1)

    def test_metrics_count_decisions_and_what_waits(self) -> None:
        d, stream, cli, event = self.asking(approval_timeout=30)
        d.clock.advance(30)
        cli.ask()
        self.answer(d, stream.session_id, self.last(stream, "permission_request")["request_id"], {"behavior": "deny"})
        cli.ask()
        figures: dict[Any, float] = {}
        for family in text_string_to_metric_families(self.scrape(d)):
            for sample in family.samples:
                if sample.name == "claudesrv_permission_decisions_total":
                    figures[(sample.labels["behavior"], sample.labels["by"])] = sample.value
                elif sample.name == "claudesrv_permissions_pending":
                    figures["pending"] = sample.value
        self.assertEqual(figures, {("deny", "timeout"): 1, ("deny", "client"): 1, "pending": 1})

    def scrape(self, d: Daemon) -> str:
        response = self.successResultOf(d.http.get("http://localhost/metrics"))
        return str(self.successResultOf(d.http.text_content(response)))

    def test_cancel_while_pending(self) -> None:
        """A cancel interrupts the turn: the CLI cancels its own request (s02d), the request is resolved as
        cancelled, the CLI is sent no answer to it, and a late answer is 409."""
        d, stream, cli, event = self.asking()
        code, _ = d.call("POST", f"/api/sessions/{stream.session_id}/cancel")
        self.assertEqual(code, 202)
        resolved = self.last(stream, "permission_resolved")
        self.assertEqual((resolved["behavior"], resolved["by"]), ("deny", "cancel"))
        self.assertEqual([m["request"]["subtype"] for m in cli.stdin if m["type"] == "control_request"],
                         ["interrupt"])
        self.assertEqual(cli.answers, [])
        self.assertEqual(stream.events()[-1]["terminal_reason"], "cancelled")
        self.assertEqual(self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})[0], 409)

    def test_cancel_resolves_at_once_even_if_the_cli_is_slow_to_stop(self) -> None:
        """The request is cancelled when the turn is stopped, not when (or if) the CLI gets round to it."""
        d, stream, cli, event = self.asking()
        cli.ignore_interrupt = True
        d.call("POST", f"/api/sessions/{stream.session_id}/cancel")
        self.assertEqual(self.last(stream, "permission_resolved")["by"], "cancel")
        self.assertEqual(self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})[0], 409)
        self.assertEqual(cli.answers, [])

    def test_a_result_while_a_request_waits_comes_last(self) -> None:
        """A turn that ends while a request waits (the CLI sent no cancel) resolves it before its result."""
        d, stream, cli, event = self.asking()
        cli.asking = None
        cli.end_turn()
        self.assertEqual(stream.types()[-2:], ["permission_resolved", "result"])

    def test_the_clis_own_cancel_is_honoured(self) -> None:
        d, stream, cli, event = self.asking()
        cli.say(json.dumps({"type": "control_cancel_request", "request_id": cli.asking}))
        self.assertEqual(self.last(stream, "permission_resolved")["by"], "cancel")
        self.assertEqual(d.call("GET", f"/api/sessions/{stream.session_id}")[1]["pending_permissions"], [])

    def test_run_timeout_and_shutdown_cancel(self) -> None:
        d, stream, cli, _ = self.asking(run_timeout=60)
        d.clock.advance(60)
        self.assertEqual(self.last(stream, "permission_resolved")["by"], "cancel")
        self.assertEqual(stream.events()[-1]["terminal_reason"], "timeout")
        again = d.post({"prompt": "b", "approvals": True, "session_id": stream.session_id})
        cli.ask()
        d.registry.shutdown()
        d.pump()
        self.assertEqual(self.last(again, "permission_resolved")["by"], "cancel")
        self.assertEqual(again.events()[-1]["terminal_reason"], "server_shutdown")

    def test_waiting_for_a_person_is_not_an_idle_cli(self) -> None:
        """The idle timeout does not end a turn whose CLI is quiet because it waits for an answer; once
        answered, silence counts again."""
        d, stream, cli, event = self.asking(idle_timeout=60, approval_timeout=0)
        self.assertIsNone(event["expires_at"])
        d.clock.advance(150)
        self.assertEqual(stream.types(), ["init", "permission_request"])
        self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})
        d.clock.advance(61)
        self.assertEqual(stream.events()[-1]["terminal_reason"], "timeout")


class Policy(ApprovalTestCase):
    def test_without_approvals_the_server_denies(self) -> None:
        d = self.daemon()
        d.world.hold_turns = True
        stream = d.post({"prompt": "a"})
        [cli] = d.world.clis
        cli.ask()
        self.assertEqual(self.response(cli)["behavior"], "deny")
        self.assertIn("\"approvals\": true", self.response(cli)["message"])
        self.assertEqual(stream.types(), ["init", "permission_denied"])

    def test_denied_tools_never_reach_a_person(self) -> None:
        """A tool the operator (--deny-tool) or the turn (disallowedTools) refuses is denied unasked."""
        for limits, extra in [({"deny_tools": ("Bash",)}, {}), ({}, {"disallowedTools": ["Bash"]})]:
            d = self.daemon(**limits)
            d.world.hold_turns = True
            stream = d.post({"prompt": "a", "approvals": True, **extra})
            [cli] = d.world.clis
            cli.ask()
            self.assertEqual(self.response(cli)["behavior"], "deny")
            self.assertEqual(stream.types(), ["init", "permission_denied"])

    def test_approvals_deny_refuses_the_field(self) -> None:
        d = self.daemon()
        d.api.policy.approvals = "deny"
        stream = d.post({"prompt": "a", "approvals": True})
        self.assertEqual(stream.code, 403)
        self.assertEqual(d.world.clis, [])

    def test_input_edits_only_where_allowed(self) -> None:
        """updated_input for a tool outside --allow-input-edits is 403 and changes nothing; listed, it runs."""
        d, stream, cli, event = self.asking()
        rm = {"command": "rm -rf ~", "description": "clean up"}
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow", "updated_input": rm})
        self.assertEqual((code, body["error"]["code"]), (403, "input_edit_denied"))
        self.assertEqual(cli.answers, [])
        d, stream, cli, event = self.asking(allow_input_edits=("Bash",))
        self.assertEqual(self.answer(d, stream.session_id, event["request_id"],
                                     {"behavior": "allow", "updated_input": rm})[0], 200)
        self.assertEqual(self.response(cli)["updatedInput"], rm)

    def test_bad_bodies_and_unknown_ids(self) -> None:
        d, stream, cli, event = self.asking()
        sid, rid = stream.session_id, event["request_id"]
        table: list[tuple[Any, int, str | None]] = [
            (b"{", 400, None),
            ([], 400, None),
            ({}, 400, "behavior"),
            ({"behavior": "maybe"}, 400, "behavior"),
            ({"behavior": "allow", "why": 1}, 400, "why"),
            ({"behavior": "allow", "message": "x"}, 400, "message"),
            ({"behavior": "allow", "interrupt": True}, 400, "interrupt"),
            ({"behavior": "deny", "updated_input": {}}, 400, "updated_input"),
            ({"behavior": "deny", "remember": "tool"}, 400, "remember"),
            ({"behavior": "allow", "updated_input": "ls"}, 400, "updated_input"),
            ({"behavior": "allow", "remember": "forever"}, 400, "remember"),
            ({"behavior": "allow", "answers": {"q": 1}}, 400, "answers"),
            ({"behavior": "allow", "answers": {"q": "a"}}, 400, "answers"),
            ({"behavior": "allow", "answers": {"q": "a"}, "updated_input": {}}, 400, "answers"),
            ({"behavior": "deny", "interrupt": "yes"}, 400, "interrupt"),
            ({"behavior": "deny", "message": 5}, 400, "message"),
            ({"behavior": "deny", "message": "x" * (65 << 10)}, 400, "message"),
        ]
        for body, code, field in table:
            status, error = self.answer(d, sid, rid, body)
            self.assertEqual((status, error["error"].get("field")), (code, field), body)
        other = d.post({"prompt": "another session"})
        for session_id, request_id in [(sid, "0" * 32), ("not-a-uuid", rid), (other.session_id, rid)]:
            status, error = self.answer(d, session_id, request_id, {"behavior": "allow"})
            self.assertEqual(status, 404, (session_id, request_id))
        self.assertEqual(cli.answers, [])
        self.assertEqual(self.answer(d, sid, rid, {"behavior": "allow"})[0], 200)

    def test_resolved_answers_are_kept_within_a_bound(self) -> None:
        d, stream, cli, event = self.asking()
        approvals = d.registry.approvals
        self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})
        for n in range(KEEP_RESOLVED):
            approvals.resolved[str(n)] = (stream.session_id, {})
        cli.ask()
        self.answer(d, stream.session_id, self.last(stream, "permission_request")["request_id"], {"behavior": "allow"})
        self.assertEqual(len(approvals.resolved), KEEP_RESOLVED)
        self.assertEqual(self.answer(d, stream.session_id, event["request_id"], {"behavior": "allow"})[0], 404)


class Remember(ApprovalTestCase):
    def test_a_remember_that_loses_the_race_is_not_remembered(self) -> None:
        """An allow + remember whose database write is overtaken (here by the timeout) is 409 and leaves nothing
        remembered; a second answer while the first is being written is 409 too."""
        d, stream, cli, event = self.asking(approval_timeout=30)
        d.db.held = True
        answer = d.http.request("POST", f"http://localhost/api/sessions/{stream.session_id}/permissions/"
                                f"{event['request_id']}", data=json.dumps({"behavior": "allow", "remember": "tool"}),
                                headers={"Content-Type": "application/json"})
        d.pump()
        code, body = self.answer(d, stream.session_id, event["request_id"], {"behavior": "deny"})
        self.assertEqual((code, body["error"]["code"]), (409, "already_resolved"))
        d.clock.advance(30)
        d.db.release()
        d.pump()
        self.assertEqual(self.successResultOf(answer).code, 409)
        self.assertEqual(self.response(cli)["behavior"], "deny")  # the timeout's
        with sqlite3.connect(os.path.join(self.base, "sessions.db")) as db:
            self.assertEqual(list(db.execute("SELECT * FROM remembered_tools")), [])
        cli.ask()
        self.assertEqual(self.last(stream, "permission_request")["tool_name"], "Bash")  # asked again

    def test_remembered_tool_is_allowed_for_the_rest_of_the_session(self) -> None:
        """allow + remember: later requests for the tool are allowed without asking, in this process, after
        it slept and resumed, and after a restart of the daemon; deleting the session forgets it."""
        d, stream, cli, event = self.asking(warm_idle=60)
        sid = stream.session_id
        code, body = self.answer(d, sid, event["request_id"], {"behavior": "allow", "remember": "tool"})
        self.assertEqual((code, body["remember"]), (200, "tool"))
        cli.ask()
        self.assertEqual(self.response(cli), {"behavior": "allow", "updatedInput": S02A_INPUT})
        self.assertEqual(self.last(stream, "permission_resolved")["by"], "remembered")
        self.assertEqual([e.get("subtype") for e in stream.events()].count("permission_request"), 1)
        cli.end_turn()
        d.clock.advance(60)  # put to sleep
        d.pump()
        self.assertFalse(cli.alive)
        resumed = d.post({"prompt": "again", "session_id": sid})  # approvals off: remembered all the same
        cli2 = d.world.clis[-1]
        self.assertIn(f"--resume={sid}", cli2.argv)
        cli2.ask()
        self.assertEqual(self.response(cli2)["behavior"], "allow")
        cli2.end_turn()
        self.assertEqual(resumed.types()[-1], "result")
        self.assertTrue(resumed.done)
        d.registry.shutdown()
        d.pump()
        restarted = Daemon(self.base, d.limits)
        self.addCleanup(restarted.close)
        restarted.world.hold_turns = True
        restarted.post({"prompt": "after a restart", "session_id": sid})
        [cli3] = restarted.world.clis
        cli3.ask()
        self.assertEqual(self.response(cli3)["behavior"], "allow")
        cli3.ask("AskUserQuestion")  # another tool is still asked about (here: denied, approvals off)
        self.assertEqual(self.response(cli3)["behavior"], "deny")
        cli3.end_turn()
        restarted.pump()
        self.assertEqual(restarted.call("DELETE", f"/api/sessions/{sid}")[0], 200)
        with sqlite3.connect(os.path.join(self.base, "sessions.db")) as db:
            self.assertEqual(list(db.execute("SELECT * FROM remembered_tools")), [])


def tool_results(reply: Any) -> list[str]:
    """The text of each tool_result in a stream."""
    return [block["content"] for e in reply.sse.events() if e["type"] == "user"
            for block in e["message"]["content"] if isinstance(block, dict) and block.get("type") == "tool_result"]


class ThroughTwistd(TestCase):
    """A real daemon with the fake CLI as its child: a person allows a tool and answers a question over HTTP
    while the turn's stream is open, and a shutdown ends a turn that waits for a person."""

    timeout = 60

    @inlineCallbacks
    def turn_with_answers(self, daemon: support.Daemon, prompt: str, *answers: dict[str, Any],
                          session_id: str | None = None) -> Any:
        """POST a turn with approvals on; answer its permission requests as they arrive, in order, with
        C{answers} (one left unanswered when they run out); the whole stream, and each answer's status and body."""
        answered: list[Deferred[Any]] = []

        def on_frame(sse: SSEParser) -> None:
            for frame in sse.frames[len(seen):]:
                event = json.loads(frame)
                seen.append(event)
                if event.get("subtype") == "permission_request" and len(answered) < len(answers):
                    url = f"{daemon.url}/api/sessions/{seen[0]['session_id']}/permissions/{event['request_id']}"
                    answered.append(post(url, answers[len(answered)]))

        seen: list[dict[str, Any]] = []
        body = {"prompt": prompt, "approvals": True, **({"session_id": session_id} if session_id else {})}
        reply = yield post(daemon.url + "/api/claude", body, on_frame=on_frame)
        results = yield gatherResults(answered)
        return reply, [(r.status, r.json()) for r in results]

    @inlineCallbacks
    def test_allow_and_answer_then_shutdown_while_pending(self) -> Any:
        """Allow; answer a question; two tools, the first allowed and the second denied with a message; a deny that
        ends the turn; a request nobody answers (--approval-timeout); a remembered tool after the process slept
        (--warm-idle); and a shutdown while a request waits."""
        daemon = yield support.Daemon(self, "--approval-timeout", "1", "--warm-idle", "1").start()
        reply, [(status, body)] = yield self.turn_with_answers(daemon, "[[fake tool=Bash]] make a file",
                                                               {"behavior": "allow"})
        self.assertEqual((status, body["behavior"], body["by"]), (200, "allow", "client"))
        subtypes = [e.get("subtype") for e in reply.sse.events() if e["type"] == "claudesrv"]
        self.assertEqual(subtypes, ["permission_request", "permission_resolved"])
        [result] = reply.sse.results()
        self.assertEqual((result["subtype"], result["permission_denials"]), ("success", []))
        [ran] = state_lines(daemon.state_dir, "tools.jsonl")
        self.assertEqual((ran["tool_name"], ran["input"]["command"]), ("Bash", "echo hi > file.txt"))

        answers = {"behavior": "allow", "answers": {"Which format?": "Summary"}}
        reply, [(status, _)] = yield self.turn_with_answers(daemon, "[[fake tool=AskUserQuestion]] ask me", answers)
        self.assertEqual(status, 200)
        self.assertIn('"Which format?"="Summary"', tool_results(reply)[0])

        reply, statuses = yield self.turn_with_answers(
            daemon, "[[fake tool=Bash,Bash]] two files", {"behavior": "allow"},
            {"behavior": "deny", "message": "one file is enough"})
        self.assertEqual([s for s, _ in statuses], [200, 200])
        self.assertEqual(tool_results(reply), ["(Bash completed with no output)", "one file is enough"])
        self.assertEqual(state_lines(daemon.state_dir, "tools.jsonl")[-1]["input"]["command"], "echo one > one.txt")

        reply, _ = yield self.turn_with_answers(daemon, "[[fake tool=Bash]] stop", {"behavior": "deny",
                                                                                    "interrupt": True})
        self.assertEqual(reply.sse.results()[-1]["terminal_reason"], "aborted_tools")

        reply, _ = yield self.turn_with_answers(daemon, "[[fake tool=Bash]] nobody there")
        self.assertEqual([e["by"] for e in reply.sse.events() if e.get("subtype") == "permission_resolved"],
                         ["timeout"])
        self.assertIn("nobody answered", tool_results(reply)[0])

        reply, _ = yield self.turn_with_answers(daemon, "[[fake tool=Bash]] a", {"behavior": "allow",
                                                                                 "remember": "tool"})
        sid = reply.session_id
        pid = state_lines(daemon.state_dir, "invocations.jsonl")[-1]["pid"]
        yield wait_for(lambda: not pid_alive(pid))  # put to sleep after --warm-idle
        reply, _ = yield self.turn_with_answers(daemon, "[[fake tool=Bash]] b", session_id=sid)
        self.assertEqual([(e["subtype"], e.get("by")) for e in reply.sse.events() if e["type"] == "claudesrv"],
                         [("permission_resolved", "remembered")])
        self.assertNotEqual(state_lines(daemon.state_dir, "invocations.jsonl")[-1]["pid"], pid)
        self.assertEqual(tool_results(reply), ["(Bash completed with no output)"])

        pending: Deferred[None] = Deferred()

        def on_frame(sse: SSEParser) -> None:
            if any(b'"permission_request"' in frame for frame in sse.frames) and not pending.called:
                pending.callback(None)

        stream = post(daemon.url + "/api/claude", {"prompt": "[[fake tool=Bash]] again", "approvals": True},
                      on_frame=on_frame)
        yield pending
        pid = state_lines(daemon.state_dir, "invocations.jsonl")[-1]["pid"]
        daemon.signal(signal.SIGTERM)
        reply = yield stream
        events = reply.sse.events()
        resolved = [e for e in events if e.get("subtype") == "permission_resolved"]
        self.assertEqual([(e["behavior"], e["by"]) for e in resolved], [("deny", "cancel")])
        self.assertEqual(reply.sse.results()[-1]["terminal_reason"], "server_shutdown")
        yield daemon.proto.ended
        self.assertFalse(pid_alive(pid))
        self.assertIn("Bash deny by cancel", daemon.log)
        self.assertNotIn("echo hi", daemon.log)  # decisions are logged, inputs never
