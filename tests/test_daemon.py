"""
The core, end to end: a real ``twistd -n claudesrv``, real HTTP, the fake CLI in SDK streaming mode as a real
child process (and what only needs HTTP semantics in process, in the harness).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import utils
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests import harness
from tests.support import Daemon, Since, SSEParser, get_json, pid_alive, post, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
UNKNOWN = "00000000-0000-4000-8000-000000000000"
SDK = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json",
       "--permission-prompt-tool", "stdio"]


def session_flag(argv: list[str]) -> str:
    """The --session-id=/--resume= element of an argv."""
    [flag] = [a for a in argv if a.startswith(("--session-id=", "--resume="))]
    return flag


class CoreTests(TestCase):
    """One real daemon per set of options; where a test makes several checks on one daemon, each check sees
    only what the daemon did from its own start on (L{Since}), as if the daemon were its alone."""

    timeout = 60

    @inlineCallbacks
    def start(self, *args: str) -> Any:
        """A daemon without spares, so each CLI started is a turn's."""
        self.daemon = yield Daemon(self, *args).start()
        return self.daemon

    def claude(self, **fields: Any) -> Any:
        return post(self.daemon.url + "/api/claude", fields)

    @inlineCallbacks
    def test_turns(self) -> Any:
        """One daemon without spares, turn after turn: a new session in SDK streaming mode under an id the
        server chose; prompts and tool patterns that reach the CLI byte for byte; a tool needing approval
        denied by the server; lines split across reads, 64 KiB blocks and an 8 MiB line relayed intact; CLI
        failures ending with one result (and no leftovers); the README's curl example (each check's own
        docstring says exactly what it proves)."""
        yield self.start()
        for check in (self.new_session, self.prompts_arrive_byte_exact, self.tool_patterns_arrive_intact,
                      self.tool_needing_approval_is_denied, self.lines_split_across_reads_and_giant_line,
                      self.failures_end_with_one_result, self.readme_curl_example):
            yield check(self.daemon.since())

    @inlineCallbacks
    def test_warm_idle(self) -> Any:
        """With --warm-idle 0.2: follow-up turns go to the warm process and, once it is put to sleep, resume
        the session in a new one; an error result the CLI writes itself passes through untouched (each check's
        own docstring says exactly what it proves)."""
        yield self.start("--warm-idle", "0.2")
        for check in (self.follow_up_turns_warm_then_resumed, self.cli_error_results_pass_through):
            yield check(self.daemon.since())

    @inlineCallbacks
    def test_spare_answers_a_new_session(self) -> Any:
        """With --spares 1 a CLI is started ahead in a workspace of its own, under an id of its own; the next
        new session with default options is that process and that id, its follow-up turns go to that same
        warm process, and a new spare takes its place under an id of its own. A session asking for other tool
        options gets a process of its own and leaves the spare alone."""
        daemon = yield Daemon(self, spares=1).start()
        yield wait_for(lambda: len(daemon.invocations()) == 1)
        [spare] = daemon.invocations()
        spare_id = session_flag(spare["argv"]).split("=", 1)[1]
        self.assertEqual(daemon.workspaces(), [f"session-{spare_id}"])
        self.assertEqual((daemon.rows(), daemon.turns()), ([], []))
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hello"})
        self.assertEqual(reply.session_id, spare_id)
        self.assertIn(f"--session-id={spare_id}", spare["argv"])
        self.assertEqual({e["session_id"] for e in reply.sse.events()}, {spare_id})
        self.assertEqual([t["pid"] for t in daemon.turns()], [spare["pid"]])
        self.assertEqual([row[0] for row in daemon.rows()], [spare_id])
        for prompt in ("two", "three"):
            follow_up = yield post(daemon.url + "/api/claude", {"prompt": prompt, "session_id": spare_id})
            self.assertEqual([e["type"] for e in follow_up.sse.events()][-1], "result")
        self.assertEqual([t["pid"] for t in daemon.turns()], [spare["pid"]] * 3)
        self.assertEqual([t["prompt"] for t in daemon.turns()], ["hello", "two", "three"])
        yield wait_for(lambda: len(daemon.invocations()) == 2)
        second_spare = daemon.invocations()[1]
        self.assertNotEqual(session_flag(second_spare["argv"]), session_flag(spare["argv"]))
        self.assertNotIn(f"--session-id={spare_id}", second_spare["argv"])
        tools = yield post(daemon.url + "/api/claude", {"prompt": "hi", "allowedTools": ["Edit"]})
        self.assertNotIn(tools.session_id, (spare_id, session_flag(second_spare["argv"]).split("=", 1)[1]))
        calls = daemon.invocations()
        self.assertEqual(len(calls), 3)
        self.assertIn("--allowedTools", calls[2]["argv"])
        self.assertEqual([t["pid"] for t in daemon.turns()], [spare["pid"]] * 3 + [calls[2]["pid"]])
        self.assertTrue(pid_alive(second_spare["pid"]))

    @inlineCallbacks
    def new_session(self, daemon: Since) -> Any:
        """A prompt without session_id starts the CLI in SDK streaming mode under a session id the server
        chose (the X-Session-Id header, --session-id=, the workspace's name, the row, every event), as the
        leader of its own session, and streams every CLI line as one SSE event with consecutive ids."""
        reply = yield self.claude(prompt="hello")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("Content-Type"), "text/event-stream")
        self.assertEqual(reply.header("Cache-Control"), "no-cache")
        self.assertEqual(reply.header("X-Accel-Buffering"), "no")
        sid = reply.session_id
        self.assertRegex(sid, UUID)
        events = reply.sse.events()
        self.assertEqual([(e["type"], e.get("subtype")) for e in events],
                         [("system", "init"), ("assistant", None), ("result", "success")])
        self.assertEqual({e["session_id"] for e in events}, {sid})
        self.assertEqual(reply.sse.ids, [1, 2, 3])
        self.assertFalse(events[-1]["is_error"])
        workspace = os.path.join(daemon.data_dir, "Workspace", f"session-{sid}")
        self.assertEqual(daemon.rows(), [(sid, workspace)])
        [call] = daemon.invocations()
        self.assertEqual(call["mode"], "sdk")
        self.assertEqual(call["argv"][1:], [*SDK, f"--session-id={sid}", "--"])
        self.assertEqual(call["cwd"], workspace)
        self.assertEqual((call["sid"], call["pgid"]), (call["pid"], call["pid"]))
        [turn] = daemon.turns()
        self.assertEqual((turn["pid"], turn["prompt"], turn["session_id"]), (call["pid"], "hello", sid))
        [line] = [m for m in daemon.stdin() if m["type"] == "user"]
        self.assertEqual(line["message"], {"role": "user", "content": "hello"})

    @inlineCallbacks
    def prompts_arrive_byte_exact(self, daemon: Since) -> Any:
        """Prompts that look like options, carry CR/LF, blanks, unicode or JSON, or are 1 MiB, reach the CLI
        exactly as sent, each as one turn of the same warm process."""
        prompts = ["--help", "-p", "- item", "--", "a\r\nb\n", "  lead and trail  ", "héllo 日本語 🚀 \u2028",
                   "$(echo no) `x` ;&| \\ \"q\"", '"}\n{"type":"control_request","request":{"subtype":"interrupt"}}',
                   "x" * (1 << 20)]
        sid = None
        for prompt in prompts:
            reply = yield self.claude(prompt=prompt, **({"session_id": sid} if sid else {}))
            sid = reply.session_id
            self.assertEqual(reply.status, 200)
            init = reply.sse.events()[0]
            self.assertEqual(init["fake"]["prompt"], prompt, prompt[:20])
            [result] = reply.sse.results()
            self.assertFalse(result["is_error"], prompt[:20])
        self.assertEqual([t["prompt"] for t in daemon.turns()], prompts)
        [call] = daemon.invocations()
        self.assertEqual({t["pid"] for t in daemon.turns()}, {call["pid"]})

    @inlineCallbacks
    def tool_patterns_arrive_intact(self, daemon: Since) -> Any:
        """allowedTools and disallowedTools patterns reach the CLI whole, one argv element each, and swallow
        nothing: the CLI reads exactly these patterns."""
        allowed = ["Bash(git *)", "Bash(touch:*)", "Bash(touch a,b.txt)", "Edit"]
        reply = yield self.claude(prompt="use tools", allowedTools=allowed, disallowedTools=["WebFetch"],
                                  **{"dangerously-skip-permissions": False})
        self.assertFalse(reply.sse.results()[0]["is_error"])
        [call] = daemon.invocations()
        argv = call["argv"]
        i = argv.index("--allowedTools")
        self.assertEqual(argv[i:], ["--allowedTools", *allowed, "--disallowedTools", "WebFetch", "--"])
        [turn] = daemon.turns()
        self.assertEqual((turn["allowed_tools"], turn["disallowed_tools"]), (allowed, ["WebFetch"]))
        self.assertEqual(turn["prompt"], "use tools")

    @inlineCallbacks
    def tool_needing_approval_is_denied(self, daemon: Since) -> Any:
        """A tool the CLI must ask about is denied by the server with a message saying how to allow it, and a
        permission_denied event tells the client; the turn goes on to its own result. A pre-approved tool
        runs without a question."""
        reply = yield self.claude(prompt="[[fake tool=Bash]] make a file")
        events = reply.sse.events()
        [denied] = [e for e in events if e["type"] == "claudesrv"]
        self.assertEqual((denied["subtype"], denied["tool_name"]), ("permission_denied", "Bash"))
        self.assertIn("allowedTools", denied["message"])
        self.assertFalse([e for e in events if e["type"].startswith("control_")])
        [tool_result] = [e for e in events if e["type"] == "user"]
        self.assertEqual(tool_result["message"]["content"][0]["content"], denied["message"])
        [result] = reply.sse.results()
        self.assertEqual((result["subtype"], len(result["permission_denials"])), ("success", 1))
        answers = [m for m in daemon.stdin() if m["type"] == "control_response"]
        self.assertEqual([a["response"]["response"]["behavior"] for a in answers], ["deny"])
        allowed = yield self.claude(prompt="[[fake tool=Bash]] make a file", allowedTools=["Bash"])
        self.assertFalse([e for e in allowed.sse.events() if e["type"] == "claudesrv"])
        self.assertFalse(allowed.sse.results()[0]["permission_denials"])
        self.assertEqual(len([m for m in daemon.stdin() if m["type"] == "control_response"]), 1)

    @inlineCallbacks
    def lines_split_across_reads_and_giant_line(self, daemon: Since) -> Any:
        """Lines written in small pieces, in 64 KiB blocks, and an 8 MiB line (relayed in pieces, never held
        whole) arrive intact and in order; a result line longer than the 1 MiB line limit still ends its turn's
        stream, as its only result."""
        reply = yield self.claude(prompt="[[fake lines=20 line_bytes=3000 split=1]]")
        lines = [e for e in reply.sse.events() if e["type"] == "assistant"]
        self.assertEqual(len(lines), 20)
        self.assertEqual({len(f) for f in reply.sse.frames[1:-1]}, {3000})
        sid = reply.session_id
        reply = yield self.claude(prompt="[[fake lines=3000 line_bytes=700 block=1]]", session_id=sid)
        self.assertEqual(len(reply.sse.frames), 3002)
        self.assertEqual(len(reply.sse.results()), 1)
        reply = yield self.claude(prompt=f"[[fake giant={8 << 20}]]", session_id=sid)
        sizes = [len(f) for f in reply.sse.frames]
        self.assertIn(8 << 20, sizes)
        self.assertEqual(reply.sse.events()[-1]["type"], "result")
        self.assertEqual(reply.sse.ids, list(range(reply.sse.ids[0], reply.sse.ids[0] + len(sizes))))
        reply = yield self.claude(prompt="y" * ((1 << 20) - 100), session_id=sid)  # echoed in the result
        self.assertEqual(len(reply.sse.results()), 1)
        self.assertEqual(reply.sse.events()[-1]["type"], "result")
        self.assertGreater(len(reply.sse.frames[-1]), 1 << 20)

    @inlineCallbacks
    def follow_up_turns_warm_then_resumed(self, daemon: Since) -> Any:
        """A follow-up turn goes to the session's warm process (no new CLI); once --warm-idle puts it to
        sleep (stdin closed, no signal), the next turn resumes the session with --resume=<id> in the same
        workspace, under the same id, and the session keeps one row."""
        first = yield self.claude(prompt="first")
        sid = first.session_id
        second = yield self.claude(prompt="second", session_id=sid)
        self.assertEqual(second.status, 200)
        self.assertEqual(second.sse.events()[0]["session_id"], sid)
        [call] = daemon.invocations()
        self.assertEqual([t["pid"] for t in daemon.turns()], [call["pid"]] * 2)
        yield wait_for(lambda: not pid_alive(call["pid"]))
        self.assertEqual(daemon.signals(), [])
        third = yield self.claude(prompt="third", session_id=sid)
        self.assertEqual({e["session_id"] for e in third.sse.events()}, {sid})
        self.assertEqual(third.sse.ids[0], second.sse.ids[-1] + 1)
        calls = daemon.invocations()
        self.assertEqual(session_flag(calls[1]["argv"]), f"--resume={sid}")
        self.assertEqual(calls[1]["cwd"], call["cwd"])
        self.assertEqual(daemon.rows(), [(sid, call["cwd"])])

    @inlineCallbacks
    def cli_error_results_pass_through(self, daemon: Since) -> Any:
        """An error result the CLI writes itself (here: it refuses to resume a session whose transcript is
        gone) is relayed untouched as the turn's one result, and the session stays."""
        first = yield self.claude(prompt="first")
        sid = first.session_id
        [call] = daemon.invocations()
        yield wait_for(lambda: not pid_alive(call["pid"]))
        os.remove(os.path.join(daemon.state_dir, "sessions", sid))
        reply = yield self.claude(prompt="again", session_id=sid)
        [result] = reply.sse.events()
        self.assertTrue(result["is_error"])
        self.assertEqual(result["errors"], [f"No conversation found with session ID: {sid}"])
        self.assertNotIn("exit_code", result)
        self.assertEqual([row[0] for row in daemon.rows()], [sid])

    @inlineCallbacks
    def failures_end_with_one_result(self, daemon: Since) -> Any:
        """A CLI that prints only stderr, crashes, or dies mid-turn ends the stream with exactly one result
        event that carries the exit code or signal and the stderr; a new session whose CLI never said
        anything leaves no row and no workspace; a crashed CLI's grandchild in a session of its own is
        killed, and the session's next turn resumes it in a new process."""
        reply = yield self.claude(prompt="[[fake no_init=1 exit=3 stderr=boom_went_the_cli]]")
        [result] = reply.sse.results()
        self.assertEqual(len(reply.sse.frames), 1)
        self.assertTrue(result["is_error"])
        self.assertEqual(result["subtype"], "error_during_execution")
        self.assertEqual((result["exit_code"], result["signal"]), (3, None))
        self.assertIn("boom went the cli", result["stderr"])
        yield wait_for(lambda: daemon.workspaces() == [])
        self.assertEqual(daemon.rows(), [])

        reply = yield self.claude(prompt="[[fake grandchild=1 init_delay_ms=100 crash=1]]")
        [result] = reply.sse.results()
        self.assertEqual(reply.sse.events()[-1], result)
        self.assertEqual((result["signal"], result["exit_code"]), (11, None))
        self.assertEqual(result["session_id"], reply.sse.events()[0]["session_id"])
        [grandchild] = daemon.grandchildren()
        yield wait_for(lambda: not pid_alive(grandchild))
        again = yield self.claude(prompt="after the crash", session_id=reply.session_id)
        self.assertFalse(again.sse.results()[0]["is_error"])
        self.assertEqual(session_flag(daemon.invocations()[-1]["argv"]), f"--resume={reply.session_id}")

        reply = yield self.claude(prompt="[[fake die=2 stderr=half_way]]")
        [result] = reply.sse.results()
        self.assertEqual([e["type"] for e in reply.sse.events()], ["system", "assistant", "result"])
        self.assertEqual(result["exit_code"], 2)
        self.assertIn("half way", result["stderr"])

    @inlineCallbacks
    def readme_curl_example(self, daemon: Since) -> Any:
        """The README's curl -N example, run as written (but on the test's port), streams a session."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        command = next(line for line in readme.splitlines() if line.startswith("curl -N "))
        command = command.replace("localhost:3000", f"127.0.0.1:{daemon.port}")
        out, _, code = yield utils.getProcessOutputAndValue("sh", ["-c", command], env=os.environ)
        self.assertEqual(code, 0)
        sse = SSEParser()
        sse.feed(out)
        self.assertEqual(sse.ids, [1, 2, 3])
        self.assertEqual([json.loads(f)["type"] for f in sse.frames], ["system", "assistant", "result"])


class InProcessCore(harness.DaemonTestCase):
    """What only needs HTTP semantics, in process (the harness: real routes, registry and SQL, a Clock; CLIs
    played in memory)."""

    def test_unknown_and_malformed_session_ids(self) -> None:
        """An unknown id is 404 and a non-UUID is 400, both JSON, and no CLI starts and no workspace is made."""
        d = self.daemon()
        code, body = d.call("POST", "/api/claude", json={"prompt": "x", "session_id": UNKNOWN})
        self.assertEqual((code, body["error"]["code"]), (404, "session_not_found"))
        code, body = d.call("POST", "/api/claude", json={"prompt": "x", "session_id": "not-a-uuid"})
        self.assertEqual((code, body["error"]["field"]), (400, "session_id"))
        self.assertEqual(d.world.clis, [])
        self.assertEqual(os.listdir(os.path.join(self.base, "Workspace")), [])

    def test_errors_before_streaming_are_json(self) -> None:
        """Malformed JSON, a schema break and a wrong method get their status and a JSON error."""
        d = self.daemon()
        code, body = d.call("POST", "/api/claude", data=b"{nope", headers={"Content-Type": "application/json"})
        self.assertEqual((code, body["error"]["code"]), (400, "invalid_json"))
        code, body = d.call("POST", "/api/claude", json={"prompt": "x", "allowedTools": "Bash"})
        self.assertEqual((code, body["error"]["field"]), (400, "allowedTools"))
        code, body = d.call("GET", "/api/claude")
        self.assertEqual((code, body["error"]["code"]), (405, "method_not_allowed"))
        self.assertEqual(d.world.clis, [])

    def test_stream_ends_at_result(self) -> None:
        """The stream ends with the turn's result while the CLI stays up, idle, for the session's next turn."""
        d = self.daemon()
        stream = d.post({"prompt": "hello"})
        self.assertTrue(stream.done)
        self.assertEqual(stream.types()[-1], "result")
        [cli] = d.world.clis
        self.assertTrue(cli.alive)
        code, item = d.call("GET", f"/api/sessions/{stream.session_id}")
        self.assertEqual((item["state"], item["pid"], item["running"]), ("idle", cli.pid, False))

    def test_workspace_gone(self) -> None:
        """A session whose workspace was removed from disk gets a clear 410 (here once its CLI was put to sleep),
        not a turn elsewhere."""
        d = self.daemon(warm_idle=5)
        first = d.post({"prompt": "first"})
        [cli] = d.world.clis
        d.clock.advance(5)
        self.assertFalse(cli.alive)
        shutil.rmtree(cli.cwd)
        code, body = d.call("POST", "/api/claude", json={"prompt": "again", "session_id": first.session_id})
        self.assertEqual((code, body["error"]["code"]), (410, "workspace_missing"))
        self.assertEqual(len(d.world.clis), 1)

    def test_session_that_never_came_to_be_is_not_named(self) -> None:
        """The one result of a new session whose CLI exited before saying anything names no session (the
        server removed it: its id in the response header is unknown from then on), as in round one."""
        d = self.daemon()
        d.world.silent = True
        stream = d.post({"prompt": "hi"})
        d.world.clis[-1].exit(3)
        d.pump()
        [result] = stream.events()
        self.assertEqual((result["type"], result["exit_code"]), ("result", 3))
        self.assertEqual(d.call("GET", f"/api/sessions/{stream.session_id}")[0], 404)
        self.assertIsNone(result["session_id"])

    def test_workspace_gone_under_a_warm_process(self) -> None:
        """A session whose workspace was removed while its CLI is still warm also gets 410: no turn runs in
        a directory that no longer exists."""
        d = self.daemon()
        first = d.post({"prompt": "first"})
        [cli] = d.world.clis
        shutil.rmtree(cli.cwd)
        again = d.post({"prompt": "again", "session_id": first.session_id})
        self.assertEqual(again.code, 410)
        self.assertEqual(json.loads(bytes(again.sse.raw))["error"]["code"], "workspace_missing")
        self.assertEqual(cli.turns, 1)



class MissingCliTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_missing_cli_is_503(self) -> Any:
        """A CLI that cannot be found leaves the daemon up (no spare is tried), logs a warning and answers 503
        with a hint; /readyz is 503 and names the failing check (the database's passes)."""
        daemon = yield Daemon(self, claude="no-such-claude-cli").start()
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        self.assertEqual(reply.status, 503)
        error = reply.json()["error"]
        self.assertEqual(error["code"], "cli_not_found")
        self.assertIn("--claude", error["message"])
        self.assertIn("was not found", daemon.log)
        self.assertEqual(daemon.workspaces(), [])
        code, ready = yield get_json(daemon.url + "/readyz")
        self.assertEqual(code, 503)
        self.assertFalse(ready["checks"]["cli"]["ok"])
        self.assertTrue(ready["checks"]["database"]["ok"])


class PackagingTests(TestCase):
    def test_plugin_listed(self) -> None:
        """The installed package makes twistd list the claudesrv plugin."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "--help"], capture_output=True, text=True, check=False).stdout
        self.assertIn("claudesrv", out)
