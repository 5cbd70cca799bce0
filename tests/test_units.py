"""
Unit tests of the pure parts: request validation, the argv, the stdin lines, line splitting and SSE framing.
"""

from __future__ import annotations

import base64
import json

from twisted.trial.unittest import SynchronousTestCase

from claudesrv import command, sse
from claudesrv.command import ApiError, ClaudeRequest, SpawnOptions, build_argv, build_env, parse_request
from claudesrv.eventlog import frame
from claudesrv.process import LineSplitter
from claudesrv.schema import KNOWN, BodyLimits, problem, turn_schema

SID = "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11"
SDK = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json",
       "--permission-prompt-tool", "stdio"]


LIMITS = BodyLimits(max_prompt=100, max_system_prompt=50, max_image_bytes=64)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def image(media_type: str, data: bytes) -> dict[str, object]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                        "data": base64.b64encode(data).decode()}}


#: (fields besides the prompt, error code, field named)
BAD_OPTIONS: list[tuple[dict[str, object], str, str]] = [
    ({"model": ""}, "invalid_field", "model"),
    ({"model": "opus 4"}, "invalid_field", "model"),
    ({"model": "m" * 101}, "invalid_field", "model"),
    ({"model": "--help"}, "invalid_field", "model"),
    ({"model": 4}, "invalid_field", "model"),
    ({"effort": "extreme"}, "invalid_field", "effort"),
    ({"effort": 1}, "invalid_field", "effort"),
    ({"system_prompt": 5}, "invalid_field", "system_prompt"),
    ({"system_prompt": "x" * 51}, "system_prompt_too_large", "system_prompt"),
    ({"append_system_prompt": "é" * 26}, "append_system_prompt_too_large", "append_system_prompt"),
    ({"system_prompt": "a", "append_system_prompt": "b"}, "invalid_field", "append_system_prompt"),
    ({"system_prompt": "a\0b"}, "invalid_field", "system_prompt"),
    ({"max_turns": 0}, "invalid_field", "max_turns"),
    ({"max_turns": 1001}, "invalid_field", "max_turns"),
    ({"max_turns": 2.5}, "invalid_field", "max_turns"),
    ({"max_turns": True}, "invalid_field", "max_turns"),
    ({"max_turns": "3"}, "invalid_field", "max_turns"),
    ({"max_budget_usd": 0}, "invalid_field", "max_budget_usd"),
    ({"max_budget_usd": -1}, "invalid_field", "max_budget_usd"),
    ({"max_budget_usd": "1"}, "invalid_field", "max_budget_usd"),
    ({"max_budget_usd": 1e300}, "invalid_field", "max_budget_usd"),
    ({"json_schema": "{}"}, "invalid_field", "json_schema"),
    ({"json_schema": []}, "invalid_field", "json_schema"),
    ({"json_schema": {"description": "x" * (65 << 10)}}, "json_schema_too_large", "json_schema"),
    ({"include_partial_messages": "yes"}, "invalid_field", "include_partial_messages"),
    ({"permission_mode": "manual"}, "invalid_field", "permission_mode"),
    ({"permission_mode": "Plan"}, "invalid_field", "permission_mode"),
    ({"approvals": 1}, "invalid_field", "approvals"),
    ({"allowedTools": ["Edit"], "allowed_tools": ["Edit"]}, "invalid_field", "allowed_tools"),
    ({"dangerously_skip_permissions": True, "dangerously-skip-permissions": True}, "invalid_field",
     "dangerously_skip_permissions"),
    ({"disallowed_tools": [" Bash"]}, "invalid_field", "disallowed_tools"),
    ({"prompt": []}, "invalid_field", "prompt"),
    ({"prompt": [{"type": "text"}]}, "invalid_field", "prompt"),
    ({"prompt": [{"type": "text", "text": " "}]}, "invalid_field", "prompt"),
    ({"prompt": [{"type": "text", "text": "a", "cache_control": {}}]}, "invalid_field", "prompt"),
    ({"prompt": [{"type": "video", "source": {}}]}, "invalid_field", "prompt"),
    ({"prompt": [{"type": "text", "text": "x" * 60}, {"type": "text", "text": "y" * 60}]}, "prompt_too_large",
     "prompt"),
    ({"prompt": [image("image/bmp", PNG)]}, "invalid_field", "prompt"),
    ({"prompt": [image("image/jpeg", PNG)]}, "invalid_field", "prompt"),
    ({"prompt": [image("image/png", b"GIF89a")]}, "invalid_field", "prompt"),
    ({"prompt": [image("image/png", PNG + b"\x00" * 50)]}, "prompt_too_large", "prompt"),
    ({"prompt": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR*"}}]},
     "invalid_field", "prompt"),
    ({"prompt": [{"type": "image", "source": {"type": "url", "media_type": "image/png", "data": "x"}}]},
     "invalid_field", "prompt"),
]


class ParseRequestTests(SynchronousTestCase):
    def test_full_request(self) -> None:
        """Every field of the schema is read into the request; the spawn-time ones into its options."""
        r = parse_request(body(prompt="hi", session_id=SID, **{"dangerously-skip-permissions": True},
                               allowedTools=["Bash(git *)"], disallowedTools=["WebFetch"], detach=True), LIMITS)
        self.assertEqual(r, ClaudeRequest("hi", SID, SpawnOptions(True, ("Bash(git *)",), ("WebFetch",)), True))
        self.assertEqual(parse_request(body(prompt="hi"), LIMITS), ClaudeRequest("hi"))
        schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
        options = {"allowed_tools": ["Edit"], "disallowed_tools": ["Bash"], "dangerously_skip_permissions": True,
                   "model": "claude-sonnet-5-5[1m]", "effort": "xhigh", "append_system_prompt": "Be brief.",
                   "max_turns": 3, "max_budget_usd": 0.5, "json_schema": schema, "include_partial_messages": True,
                   "permission_mode": "plan", "approvals": True}
        r = parse_request(body(prompt="hi", **options), LIMITS)
        self.assertEqual(r.options, SpawnOptions(
            skip_permissions=True, allowed_tools=("Edit",), disallowed_tools=("Bash",),
            append_system_prompt="Be brief.", effort="xhigh", max_turns=3, max_budget_usd=0.5,
            json_schema='{"properties":{"a":{"type":"string"},"b":{"type":"integer"}},"type":"object"}',
            include_partial_messages=True))
        self.assertEqual((r.model, r.permission_mode, r.approvals), ("claude-sonnet-5-5[1m]", "plan", True))
        self.assertEqual(parse_request(body(prompt="hi", session_id=None, model=None), LIMITS), ClaudeRequest("hi"))

    def test_prompt_blocks(self) -> None:
        """A prompt may be content blocks: text, and base64 images that are what their media type says."""
        blocks = [{"type": "text", "text": "what is this?"}, image("image/png", PNG)]
        self.assertEqual(parse_request(body(prompt=blocks), LIMITS).prompt, blocks)
        for media_type, data in [("image/jpeg", b"\xff\xd8\xff\xe0rest"), ("image/gif", b"GIF89a..."),
                                 ("image/webp", b"RIFF\x10\x00\x00\x00WEBPVP8 ")]:
            self.assertEqual(parse_request(body(prompt=[image(media_type, data)]), LIMITS).prompt[0]["source"]
                             ["media_type"], media_type)

    def assertRefused(self, raw: bytes, code: str, field: str | None) -> None:
        e = self.assertRaises(ApiError, parse_request, raw, LIMITS)
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
        for fields, code, field in BAD_OPTIONS:
            self.assertRefused(body(**{"prompt": "x", **fields}), code, field)

    def test_schema_keywords_are_all_enforced(self) -> None:
        """Every keyword in the served schema is one the validator checks (none is written and ignored)."""
        def walk(node: object) -> None:
            if isinstance(node, dict):
                self.assertIsNone(problem({k: v for k, v in node.items() if k in KNOWN}, None, "x") and None)
                self.assertLessEqual(set(node) - {"properties"}, KNOWN, node)
                for key, value in node.items():
                    walk(value if key != "properties" else list(value.values()))
            elif isinstance(node, list):
                for item in node:
                    walk(item)
        walk(turn_schema(LIMITS))
        self.assertRaises(ValueError, problem, {"type": "string", "uniqueItems": True}, "a", "x")


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
