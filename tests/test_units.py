"""
Unit tests of the pure parts: request validation, the argv, line splitting and SSE framing.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from claudesrv import sse
from claudesrv.command import ApiError, ClaudeRequest, build_argv, build_env, parse_request
from claudesrv.process import LineSplitter


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


class ParseRequestTests(SynchronousTestCase):
    def test_full_request(self) -> None:
        """Every field of the seed's schema is read into the request."""
        r = parse_request(body(prompt="hi", session_id="6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11",
                               **{"dangerously-skip-permissions": True},
                               allowedTools=["Bash(git *)"], disallowedTools=["WebFetch"]), 1000)
        self.assertEqual(r, ClaudeRequest("hi", "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11", True,
                                          ("Bash(git *)",), ("WebFetch",)))

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
        self.assertRefused(body(prompt="x", session_id="6A1C5E0E-3B8C-4A57-9D7E-6AD0A39B8C11"),
                           "invalid_field", "session_id")
        self.assertRefused(body(prompt="x", **{"dangerously-skip-permissions": "yes"}),
                           "invalid_field", "dangerously-skip-permissions")
        self.assertRefused(body(prompt="x", allowedTools="Bash"), "invalid_field", "allowedTools")
        self.assertRefused(body(prompt="x", allowedTools=[""]), "invalid_field", "allowedTools")
        self.assertRefused(body(prompt="x", disallowedTools=["--model"]), "invalid_field", "disallowedTools")
        self.assertRefused(body(prompt="x", disallowedTools=["Bash\n"]), "invalid_field", "disallowedTools")


class ArgvTests(SynchronousTestCase):
    def test_prompt_never_in_argv(self) -> None:
        """The prompt goes to stdin, so even '--help' cannot become an option."""
        argv = build_argv("claude", ClaudeRequest("--help"))
        self.assertEqual(argv, ["claude", "-p", "--verbose", "--output-format", "stream-json", "--"])

    def test_tools_each_one_element_and_closed_by_dashdash(self) -> None:
        """Tool patterns stay whole (commas and spaces included) and '--' ends the variadic lists."""
        argv = build_argv("claude", ClaudeRequest("p", "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11", True,
                                                  ("Bash(git *)", "Bash(touch a,b.txt)"), ("WebFetch",)),
                          deny_tools=("WebSearch", "WebFetch"))
        self.assertEqual(argv, [
            "claude", "-p", "--verbose", "--output-format", "stream-json",
            "--resume", "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11", "--dangerously-skip-permissions",
            "--allowedTools", "Bash(git *)", "Bash(touch a,b.txt)",
            "--disallowedTools", "WebFetch", "WebSearch", "--"])

    def test_env_is_explicit(self) -> None:
        """The child gets the daemon's environment, the run marker, and IS_SANDBOX only when asked."""
        env = build_env({"PATH": "/bin", "IS_SANDBOX": "1"}, "abc")
        self.assertEqual(env, {"PATH": "/bin", "CLAUDESRV_RUN_ID": "abc"})
        self.assertEqual(build_env({}, "abc", sandboxed=True)["IS_SANDBOX"], "1")


class RecordingSink:
    def __init__(self) -> None:
        self.out = bytearray()
        self.blocks: list[bytes] = []

    def lines_received(self, block: bytes) -> None:
        assert block.endswith(b"\n")
        self.blocks.append(block)
        self.out += block

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
    def test_frames_of_a_block(self) -> None:
        """A block of lines becomes one 'data:' frame per line, in order."""
        self.assertEqual(sse.frames(b'{"a":1}\n{"b":2}\n'), b'data: {"a":1}\n\ndata: {"b":2}\n\n')
