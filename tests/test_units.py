"""
Unit tests of the pure parts: request validation, the argv, the stdin lines, line splitting and SSE framing.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from claudesrv import command, sse
from claudesrv.command import ApiError, ClaudeRequest, SpawnOptions, build_argv, build_env, parse_request
from claudesrv.eventlog import frame
from claudesrv.process import LineSplitter

SID = "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11"
SDK = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json",
       "--permission-prompt-tool", "stdio"]


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


class ParseRequestTests(SynchronousTestCase):
    def test_full_request(self) -> None:
        """Every field of the schema is read into the request; the spawn-time ones into its options."""
        r = parse_request(body(prompt="hi", session_id=SID, **{"dangerously-skip-permissions": True},
                               allowedTools=["Bash(git *)"], disallowedTools=["WebFetch"], detach=True), 1000)
        self.assertEqual(r, ClaudeRequest("hi", SID, SpawnOptions(True, ("Bash(git *)",), ("WebFetch",)), True))
        self.assertEqual(parse_request(body(prompt="hi"), 1000), ClaudeRequest("hi"))

    def assertRefused(self, raw: bytes, code: str, field: str | None) -> None:
        e = self.assertRaises(ApiError, parse_request, raw, 100)
        self.assertEqual((e.status, e.code, e.field), (400, code, field))

    def test_refusals_name_the_field(self) -> None:
        """Each kind of bad body is a 400 whose error names the field at fault."""
        self.assertRefused(b"{", "invalid_json", None)
        self.assertRefused(b"[]", "invalid_json", None)
        self.assertRefused(body(prompt="x", extra=1), "unknown_field", "extra")
        self.assertRefused(body(), "missing_field", "prompt")
        self.assertRefused(body(prompt=3), "invalid_field", "prompt")
        self.assertRefused(body(prompt=" \n\t"), "invalid_field", "prompt")
        self.assertRefused(body(prompt="a\0b"), "invalid_field", "prompt")
        self.assertRefused(body(prompt="x" * 101), "prompt_too_large", "prompt")
        self.assertRefused(body(prompt="x", session_id="not-a-uuid"), "invalid_field", "session_id")
        self.assertRefused(body(prompt="x", session_id=SID.upper()), "invalid_field", "session_id")
        self.assertRefused(body(prompt="x", **{"dangerously-skip-permissions": "yes"}),
                           "invalid_field", "dangerously-skip-permissions")
        self.assertRefused(body(prompt="x", detach="yes"), "invalid_field", "detach")
        self.assertRefused(body(prompt="x", allowedTools="Bash"), "invalid_field", "allowedTools")
        self.assertRefused(body(prompt="x", allowedTools=[""]), "invalid_field", "allowedTools")
        self.assertRefused(body(prompt="x", disallowedTools=["--model"]), "invalid_field", "disallowedTools")
        self.assertRefused(body(prompt="x", disallowedTools=["Bash\n"]), "invalid_field", "disallowedTools")


class ArgvTests(SynchronousTestCase):
    def test_new_and_resumed_sessions(self) -> None:
        """SDK streaming mode always; a new session gets our id with --session-id=, a known one --resume=,
        each as one element; no prompt and no -p anywhere, and '--' closes the argv."""
        self.assertEqual(build_argv("claude", SpawnOptions(), SID, False),
                         ["claude", *SDK, f"--session-id={SID}", "--"])
        self.assertEqual(build_argv("claude", SpawnOptions(), SID, True), ["claude", *SDK, f"--resume={SID}", "--"])

    def test_tools_each_one_element_and_closed_by_dashdash(self) -> None:
        """Tool patterns stay whole (commas and spaces included), the operator's denied tools are added once,
        and '--' ends the variadic lists."""
        options = SpawnOptions(True, ("Bash(git *)", "Bash(touch a,b.txt)"), ("WebFetch",))
        argv = build_argv("claude", options, SID, True, deny_tools=("WebSearch", "WebFetch"))
        self.assertEqual(argv, [
            "claude", *SDK, f"--resume={SID}", "--dangerously-skip-permissions",
            "--allowedTools", "Bash(git *)", "Bash(touch a,b.txt)",
            "--disallowedTools", "WebFetch", "WebSearch", "--"])

    def test_env_is_explicit(self) -> None:
        """The child gets the daemon's environment less the API tokens, the run marker, and IS_SANDBOX only
        when asked."""
        env = build_env({"PATH": "/bin", "IS_SANDBOX": "1", "CLAUDESRV_AUTH_TOKENS": "t"}, "abc")
        self.assertEqual(env, {"PATH": "/bin", "CLAUDESRV_RUN_ID": "abc"})
        self.assertEqual(build_env({}, "abc", sandboxed=True)["IS_SANDBOX"], "1")


class StdinLineTests(SynchronousTestCase):
    def test_prompt_is_one_json_line(self) -> None:
        """Whatever a prompt holds (an option, newlines, U+2028, a JSON line of its own), the turn is one
        ASCII line of JSON that gives the prompt back exactly."""
        for prompt in ("--help", "-p", "a\r\nb\n", "\u2028\u2029 h\u00e9llo \U0001f680",
                       '"}\n{"type":"control_request"}', "\x1b[31m\x7f"):
            line = command.user_message(prompt)
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(line.count(b"\n"), 1, prompt)
            line.decode("ascii")
            message = json.loads(line)
            self.assertEqual(message, {"type": "user", "message": {"role": "user", "content": prompt},
                                       "parent_tool_use_id": None, "session_id": "default"})

    def test_control_lines(self) -> None:
        """Control requests and both kinds of response are single JSON lines in the CLI's envelope."""
        self.assertEqual(json.loads(command.control_request("r1", "interrupt")),
                         {"type": "control_request", "request_id": "r1", "request": {"subtype": "interrupt"}})
        self.assertEqual(json.loads(command.control_response("r2", {"behavior": "deny", "message": "no\n"})),
                         {"type": "control_response", "response": {"subtype": "success", "request_id": "r2",
                                                                   "response": {"behavior": "deny",
                                                                                "message": "no\n"}}})
        self.assertEqual(json.loads(command.control_error("r3", "x")),
                         {"type": "control_response", "response": {"subtype": "error", "request_id": "r3",
                                                                   "error": "x"}})
        for line in (command.control_request("r1", "interrupt"), command.control_error("r3", "a\nb")):
            self.assertEqual(line.count(b"\n"), 1)


class RecordingSink:
    def __init__(self) -> None:
        self.out = bytearray()
        self.blocks: list[bytes] = []

    def lines_received(self, lines: list[bytes]) -> None:
        assert lines and not any(b"\n" in line for line in lines)
        self.blocks.append(b"".join(line + b"\n" for line in lines))
        self.out += self.blocks[-1]

    def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
        self.out += piece + (b"\n" if last else b"")

    def process_ended(self, exit_code: int | None, signal_number: int | None, stderr: bytes) -> None:
        pass


class LineSplitterTests(SynchronousTestCase):
    def test_every_split_point(self) -> None:
        """However the pipe cuts the stream, the same bytes come out as whole lines."""
        data = b'{"a":1}\n{"b":"\xc3\xa9"}\n\n{"c":3}\n'
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1):
                sink = RecordingSink()
                splitter = LineSplitter(sink)
                for part in (data[:i], data[i:j], data[j:]):
                    if part:
                        splitter.feed(part)
                splitter.flush()
                self.assertEqual(bytes(sink.out), data)

    def test_last_line_without_newline(self) -> None:
        """A final line with no newline is still delivered at EOF."""
        sink = RecordingSink()
        splitter = LineSplitter(sink)
        splitter.feed(b'{"a":1}\n{"b":2}')
        splitter.flush()
        self.assertEqual(sink.blocks, [b'{"a":1}\n', b'{"b":2}\n'])

    def test_long_line_streamed_in_pieces(self) -> None:
        """A line over the limit is passed on in pieces, never held whole, and arrives intact."""
        pieces: list[tuple[int, bool, bool]] = []

        class Sink(RecordingSink):
            def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
                pieces.append((len(piece), first, last))
                super().line_piece(piece, first, last)

        sink = Sink()
        splitter = LineSplitter(sink, max_line=100)
        line = b"x" * 1000
        for k in range(0, 1000, 64):
            splitter.feed(line[k:k + 64])
        splitter.feed(b"\nnext\n")
        self.assertEqual(bytes(sink.out), line + b"\nnext\n")
        self.assertTrue(pieces[0][1] and not pieces[0][2])
        self.assertTrue(pieces[-1][2])
        self.assertLessEqual(max(n for n, _, _ in pieces), 164)


class FramingTests(SynchronousTestCase):
    def test_event_frames(self) -> None:
        """A logged event is an 'id:' line with its sequence number and one 'data:' line; an event of the
        server's own that is not in the log has no id."""
        self.assertEqual(frame(7, b'{"a":1}'), b'id: 7\ndata: {"a":1}\n\n')
        self.assertEqual(sse.event({"type": "claudesrv", "subtype": "gap"}),
                         b'data: {"type":"claudesrv","subtype":"gap"}\n\n')
