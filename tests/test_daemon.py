"""
The core, end to end: a real ``twistd -n claudesrv``, real HTTP, the fake CLI as a real child process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import utils
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import Daemon, pid_alive, post, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class CoreTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.daemon = yield Daemon(self).start()

    def claude(self, **fields: Any) -> Any:
        return post(self.daemon.url + "/api/claude", fields)

    @inlineCallbacks
    def test_new_session(self) -> Any:
        """A prompt without session_id runs the CLI in a fresh workspace, streams every line as SSE and
        records the reported session id against that workspace."""
        reply = yield self.claude(prompt="hello")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("Content-Type"), "text/event-stream")
        self.assertEqual(reply.header("Cache-Control"), "no-cache")
        self.assertEqual(reply.header("X-Accel-Buffering"), "no")
        events = reply.sse.events()
        self.assertEqual(events[0]["type"], "system")
        sid = events[0]["session_id"]
        self.assertRegex(sid, UUID)
        self.assertEqual([e["type"] for e in events[-1:]], ["result"])
        self.assertEqual(len(reply.sse.results()), 1)
        self.assertFalse(events[-1]["is_error"])
        [(row_id, workspace)] = self.daemon.rows()
        self.assertEqual(row_id, sid)
        self.assertEqual(os.path.dirname(workspace), os.path.join(self.daemon.data_dir, "Workspace"))
        self.assertRegex(os.path.basename(workspace), r"^session-[0-9a-f-]{36}$")
        [call] = self.daemon.invocations()
        self.assertEqual(call["cwd"], workspace)
        self.assertEqual(call["argv"][1:5], ["-p", "--verbose", "--output-format", "stream-json"])
        self.assertEqual(call["stdin_kind"] != "tty", True)

    @inlineCallbacks
    def test_prompts_arrive_byte_exact(self) -> Any:
        """Prompts that look like options, carry CR/LF, blanks or unicode, or are 1 MiB, reach the CLI
        exactly as sent."""
        prompts = ["--help", "-p", "- item", "--", "a\r\nb\n", "  lead and trail  ", "héllo 日本語 🚀 \u2028",
                   "$(echo no) `x` ;&| \\ \"q\"", "x" * (1 << 20)]
        for prompt in prompts:
            reply = yield self.claude(prompt=prompt)
            self.assertEqual(reply.status, 200)
            init = reply.sse.events()[0]
            self.assertEqual(init["fake"]["prompt"], prompt, prompt[:20])
            self.assertEqual(len(reply.sse.results()), 1)
            self.assertFalse(reply.sse.results()[0]["is_error"], prompt[:20])

    @inlineCallbacks
    def test_tool_patterns_arrive_intact(self) -> Any:
        """allowedTools and disallowedTools patterns reach the CLI whole, and swallow nothing."""
        allowed = ["Bash(git *)", "Bash(touch:*)", "Bash(touch a,b.txt)", "Edit"]
        reply = yield self.claude(prompt="use tools", allowedTools=allowed, disallowedTools=["WebFetch"],
                                  **{"dangerously-skip-permissions": False})
        self.assertFalse(reply.sse.results()[0]["is_error"])
        [call] = self.daemon.invocations()
        argv = call["argv"]
        i = argv.index("--allowedTools")
        self.assertEqual(argv[i + 1:i + 5], allowed)
        j = argv.index("--disallowedTools")
        self.assertEqual(argv[j + 1], "WebFetch")
        self.assertEqual(call["prompt"], "use tools")

    @inlineCallbacks
    def test_lines_split_across_reads_and_giant_line(self) -> Any:
        """Lines written in small pieces, in 64 KiB blocks, and one 64 MiB line arrive intact and in order."""
        reply = yield self.claude(prompt="[[fake lines=200 line_bytes=3000 split=1]]")
        lines = [e for e in reply.sse.events() if e["type"] == "assistant"]
        self.assertEqual(len(lines), 200)
        self.assertEqual({len(f) for f in reply.sse.frames[1:-1]}, {3000})
        reply = yield self.claude(prompt="[[fake lines=3000 line_bytes=700 block=1]]")
        self.assertEqual(len(reply.sse.frames), 3002)
        self.assertEqual(len(reply.sse.results()), 1)
        reply = yield self.claude(prompt=f"[[fake giant={64 << 20}]]")
        sizes = [len(f) for f in reply.sse.frames]
        self.assertIn(64 << 20, sizes)
        self.assertEqual(reply.sse.events()[-1]["type"], "result")

    @inlineCallbacks
    def test_big_result_line_ends_stream(self) -> Any:
        """The real 1 MiB reply (assistant and result lines over 1 MB) ends with its own result."""
        reply = yield self.claude(prompt="[[fake replay=g21_big_reply_1mb]]")
        results = reply.sse.results()
        self.assertEqual(len(results), 1)
        self.assertGreater(len(reply.sse.frames[-1]), 1 << 20)

    @inlineCallbacks
    def test_resume_same_workspace(self) -> Any:
        """A known session_id runs --resume <id> in the session's workspace and updates its row."""
        first = yield self.claude(prompt="first")
        sid = first.sse.events()[0]["session_id"]
        second = yield self.claude(prompt="second", session_id=sid)
        self.assertEqual(second.status, 200)
        self.assertEqual(second.sse.events()[0]["session_id"], sid)
        calls = self.daemon.invocations()
        self.assertEqual(calls[1]["cwd"], calls[0]["cwd"])
        argv = calls[1]["argv"]
        self.assertEqual(argv[argv.index("--resume") + 1], sid)
        self.assertEqual(len(self.daemon.rows()), 1)

    @inlineCallbacks
    def test_resume_records_new_id(self) -> Any:
        """When the CLI answers a resume with a new session id, that id is recorded for the same
        workspace and can itself be resumed."""
        first = yield self.claude(prompt="first")
        sid = first.sse.events()[0]["session_id"]
        second = yield self.claude(prompt="[[fake new_id=1]] second", session_id=sid)
        new_sid = second.sse.events()[0]["session_id"]
        self.assertNotEqual(new_sid, sid)
        rows = dict(self.daemon.rows())
        self.assertEqual(rows[new_sid], rows[sid])
        third = yield self.claude(prompt="third", session_id=new_sid)
        self.assertEqual(third.status, 200)
        self.assertEqual(self.daemon.invocations()[2]["cwd"], rows[sid])

    @inlineCallbacks
    def test_unknown_and_malformed_session_ids(self) -> Any:
        """An unknown id is 404 and a non-UUID is 400, both JSON, and no CLI runs."""
        reply = yield self.claude(prompt="x", session_id="00000000-0000-4000-8000-000000000000")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.json()["error"]["code"], "session_not_found")
        reply = yield self.claude(prompt="x", session_id="not-a-uuid")
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.json()["error"]["field"], "session_id")
        self.assertEqual(self.daemon.invocations(), [])
        self.assertEqual(self.daemon.workspaces(), [])

    @inlineCallbacks
    def test_workspace_gone(self) -> Any:
        """A session whose workspace was removed from disk gets a clear 410, not a CLI run elsewhere."""
        first = yield self.claude(prompt="first")
        sid = first.sse.events()[0]["session_id"]
        [(_, workspace)] = self.daemon.rows()
        shutil.rmtree(workspace)
        reply = yield self.claude(prompt="again", session_id=sid)
        self.assertEqual(reply.status, 410)
        self.assertEqual(reply.json()["error"]["code"], "workspace_missing")
        self.assertEqual(len(self.daemon.invocations()), 1)

    @inlineCallbacks
    def test_failures_end_with_one_result(self) -> Any:
        """A CLI that prints only stderr, crashes, or refuses ends the stream with exactly one result
        event that carries the exit code or signal and the stderr; a new session that never reported an
        id leaves no row and no workspace."""
        reply = yield self.claude(prompt="[[fake no_init=1 exit=3 stderr=boom_went_the_cli]]")
        [result] = reply.sse.results()
        self.assertEqual(len(reply.sse.frames), 1)
        self.assertTrue(result["is_error"])
        self.assertEqual(result["subtype"], "error_during_execution")
        self.assertEqual(result["exit_code"], 3)
        self.assertIn("boom went the cli", result["stderr"])
        yield wait_for(lambda: self.daemon.workspaces() == [])
        self.assertEqual(self.daemon.rows(), [])

        reply = yield self.claude(prompt="[[fake crash=1]]")
        [result] = reply.sse.results()
        self.assertEqual(reply.sse.events()[-1], result)
        self.assertEqual(result["signal"], 11)
        self.assertIsNone(result["exit_code"])
        self.assertEqual(result["session_id"], reply.sse.events()[0]["session_id"])

        reply = yield self.claude(prompt="[[fake exit=2 no_result=1 stderr=half_way]]")
        [result] = reply.sse.results()
        self.assertEqual(result["exit_code"], 2)

    @inlineCallbacks
    def test_cli_error_results_pass_through(self) -> Any:
        """An API error reported by the CLI (is_error result, exit 1) is relayed as the one result."""
        for name in ("g2_fail500_maxretries0", "g3_FAIL401_retries0", "i6_max_turns_1_tool"):
            reply = yield self.claude(prompt=f"[[fake replay={name}]]")
            [result] = reply.sse.results()
            self.assertTrue(result["is_error"], name)
            self.assertNotIn("exit_code", result, name)

    @inlineCallbacks
    def test_stream_ends_at_result(self) -> Any:
        """The stream ends when the result line is sent, while the CLI may still be exiting."""
        reply = yield self.claude(prompt="[[fake result_then_linger_ms=3000]]")
        [call] = self.daemon.invocations()
        self.assertEqual(len(reply.sse.results()), 1)
        self.assertTrue(pid_alive(call["pid"]), "the stream waited for the CLI to exit")

    @inlineCallbacks
    def test_errors_before_streaming_are_json(self) -> Any:
        """Malformed JSON, a schema break and a wrong method get their status and a JSON error."""
        reply = yield post(self.daemon.url + "/api/claude", None, raw=b"{nope")
        self.assertEqual((reply.status, reply.json()["error"]["code"]), (400, "invalid_json"))
        reply = yield self.claude(prompt="x", allowedTools="Bash")
        self.assertEqual((reply.status, reply.json()["error"]["field"]), (400, "allowedTools"))
        out, _, _ = yield utils.getProcessOutputAndValue("curl", ["-s", "-i", self.daemon.url + "/api/claude"],
                                                         env=os.environ)
        self.assertIn(b"405 Method Not Allowed", out)
        self.assertIn(b'"method_not_allowed"', out)

    @inlineCallbacks
    def test_readme_curl_example(self) -> Any:
        """The README's curl -N example, run as written (but on the test's port), streams a session."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        command = next(line for line in readme.splitlines() if line.startswith("curl -N "))
        command = command.replace("localhost:3000", f"127.0.0.1:{self.daemon.port}")
        out, _, code = yield utils.getProcessOutputAndValue("sh", ["-c", command], env=os.environ)
        self.assertEqual(code, 0)
        frames = [f for f in out.split(b"\n\n") if f.startswith(b"data: ")]
        self.assertIn(b'"type":"system"', frames[0])
        self.assertIn(b'"type":"result"', frames[-1])


class MissingCliTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_missing_cli_is_503(self) -> Any:
        """A CLI that cannot be found leaves the daemon up, logs a warning and answers 503 with a hint."""
        daemon = yield Daemon(self, claude="no-such-claude-cli").start()
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        self.assertEqual(reply.status, 503)
        error = reply.json()["error"]
        self.assertEqual(error["code"], "cli_not_found")
        self.assertIn("--claude", error["message"])
        self.assertIn("was not found", daemon.log)
        self.assertEqual(daemon.workspaces(), [])


class PackagingTests(TestCase):
    def test_plugin_listed(self) -> None:
        """The installed package makes twistd list the claudesrv plugin."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "--help"], capture_output=True, text=True, check=False).stdout
        self.assertIn("claudesrv", out)
