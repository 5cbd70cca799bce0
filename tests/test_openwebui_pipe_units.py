"""
Unit tests of the Open WebUI pipe ``open-webui/claude-code.py``, loaded by path the way Open WebUI
loads a Function: the text (after Open WebUI's import rewrite) executed in a fresh module.
The server is replaced by ``httpx.MockTransport``; coroutines run under ``asyncio.run``. Open WebUI's
``__event_call__`` is replaced by L{Dialogs}, which answers as Open WebUI does: True or False for a
confirmation, the typed text, True (confirmed empty) or False for an input.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import itertools
import json
import logging
import re
import struct
import sys
import types
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from twisted.trial.unittest import SynchronousTestCase

PIPE_PATH = Path(__file__).resolve().parent.parent / "open-webui" / "claude-code.py"

# Open WebUI 0.12.4 (open_webui/utils/plugin.py) runs str.replace with these before exec.
OPEN_WEBUI_REWRITES = {
    "from utils": "from open_webui.utils",
    "from apps": "from open_webui.apps",
    "from main": "from open_webui.main",
    "from config": "from open_webui.config",
}

SESSION_A = "11111111-2222-4333-8444-555555555555"
SESSION_B = "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11"
SESSION_C = "39e17708-71a8-4fa3-a385-da6100d2e057"


def load_pipe_module() -> Any:
    """Execute the pipe file in a fresh module namespace, as Open WebUI's loader does."""
    text = PIPE_PATH.read_text(encoding="utf-8")
    for old, new in OPEN_WEBUI_REWRITES.items():
        text = text.replace(old, new)
    name = f"function_claude_code_{uuid.uuid4().hex}"
    module = types.ModuleType(name)
    module.__dict__["__file__"] = str(PIPE_PATH)
    sys.modules[name] = module
    try:
        exec(compile(text, str(PIPE_PATH), "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    # what the pipe logs goes to Open WebUI's log; in tests, not to stderr (passing tests print no tracebacks)
    module.log.addHandler(logging.NullHandler())
    module.log.propagate = False
    return module


pipe_module = load_pipe_module()


def valves(**overrides: Any) -> Any:
    return pipe_module.Pipe.Valves(**overrides)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# A real 1x1 PNG, and the first bytes of the other image types Claude takes.
PNG = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))
       + png_chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00\xff")) + png_chunk(b"IEND", b""))
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20
GIF = b"GIF89a\x01\x00\x01\x00" + b"\x00" * 20
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8 " + b"\x00" * 20
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"/>'


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{b64(data)}"


def image_part(url: str) -> dict[str, Any]:
    """An image attached in Open WebUI, as its messages carry it."""
    return {"type": "image_url", "image_url": {"url": url}}


def image_block(media_type: str, data: bytes) -> dict[str, Any]:
    """An image content block as the server takes it."""
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": b64(data)}}


PNG_URL = data_url("image/png", PNG)


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


# Events shaped like the recorded CLI runs in ../shared/fixtures/claude-cli/.
INIT = {"type": "system", "subtype": "init", "session_id": SESSION_C}
TEXT_BEFORE = {"type": "assistant", "session_id": SESSION_C,
               "message": {"content": [{"type": "text", "text": "I will use Bash."}]}}
TOOL_USE = {"type": "assistant", "session_id": SESSION_C,
            "message": {"content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                     "input": {"command": "echo hi > file.txt", "description": "Write hi"}}]}}
TOOL_RESULT = {"type": "user", "session_id": SESSION_C,
               "message": {"content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                        "content": "hi written", "is_error": False}]}}
TEXT_AFTER = {"type": "assistant", "session_id": SESSION_C,
              "message": {"content": [{"type": "text", "text": "Done: file.txt holds hi."}]}}
RESULT_OK = {"type": "result", "subtype": "success", "is_error": False, "result": "Done: file.txt holds hi.",
             "session_id": SESSION_C, "total_cost_usd": 0.0248, "duration_ms": 3200,
             "terminal_reason": "completed"}
RESULT_API_ERROR = {"type": "result", "subtype": "success", "is_error": True,
                    "result": "Invalid API key · Fix external API key", "session_id": SESSION_C,
                    "terminal_reason": "api_error", "api_error_status": 401, "total_cost_usd": 0}
RESULT_CLI_FAILED = {"type": "result", "subtype": "error_during_execution", "is_error": True,
                     "session_id": SESSION_C, "terminal_reason": "cli_failed",
                     "errors": ["the Claude CLI exited with code 1 without a result: boom"],
                     "exit_code": 1, "signal": None, "stderr": "line one\nboom\n"}
FULL_RUN = (INIT, TEXT_BEFORE, TOOL_USE, TOOL_RESULT, TEXT_AFTER, RESULT_OK)


class ChunkStream(httpx.AsyncByteStream):
    """A response body given as chunks; optionally it hangs after them until closed."""

    def __init__(self, chunks: list[bytes], hang: bool = False) -> None:
        self.chunks = chunks
        self.hang = hang
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


class FakeServer:
    """Answers every request with one canned response (or exception) and records the requests."""

    def __init__(self, status: int = 200, body: bytes = b"", chunks: list[bytes] | None = None,
                 hang: bool = False, error: Exception | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.error = error
        content_type = "text/event-stream" if status == 200 else "application/json"
        self.headers = {"Content-Type": content_type}
        self.stream = ChunkStream(chunks if chunks is not None else [body], hang)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status, headers=self.headers, stream=self.stream)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def payload(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


def make_pipe(server: FakeServer | None = None, **valve_values: Any) -> Any:
    pipe = pipe_module.Pipe()
    pipe.valves = valves(**valve_values)
    if server is not None:
        pipe.transport = server.transport()
    return pipe


T = TypeVar("T")
LOOP_LIMIT = 30  # seconds any one event loop of these tests may run


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, bounded: a pipe that never ends fails its test (TimeoutError) instead of hanging the run."""
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, LOOP_LIMIT)

    return asyncio.run(bounded())


def run_pipe(pipe: Any, body: dict[str, Any], **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
    """The pipe's whole answer and the status events it emitted."""
    events: list[dict[str, Any]] = []

    async def emitter(event: dict[str, Any]) -> None:
        events.append(event)

    async def collect() -> str:
        return "".join([piece async for piece in pipe.pipe(body, __event_emitter__=emitter, **kwargs)])

    return run_async(collect()), events


class NoClient:
    """Stands in for httpx.AsyncClient where no HTTP call may happen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the pipe made an HTTP call")


# --------------------------------------------------------------------------- the file itself


class PipeFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = PIPE_PATH.read_text(encoding="utf-8")

    def test_first_line_opens_front_matter(self) -> None:
        """The first line is exactly three double quotes, so Open WebUI reads the front matter."""
        self.assertEqual(self.text.split("\n", 1)[0], '"""')

    def test_front_matter_fields(self) -> None:
        """The front matter names title, author, version, license and description, one line each."""
        block = self.text.split('"""', 2)[1]
        fields = dict(line.split(":", 1) for line in block.strip().splitlines())
        for key in ("title", "author", "version", "license", "description"):
            self.assertTrue(fields.get(key, "").strip(), key)

    def test_no_requirements_line(self) -> None:
        """No requirements line: Open WebUI would pip-install it at every start; the pipe needs none."""
        self.assertIsNone(re.search(r"^\s*requirements\s*:", self.text, re.MULTILINE | re.IGNORECASE))

    def test_no_phrases_open_webui_rewrites(self) -> None:
        """None of the four phrases Open WebUI rewrites appears anywhere, so its rewrite is a no-op."""
        for phrase in OPEN_WEBUI_REWRITES:
            self.assertNotIn(phrase, self.text)

    def test_imports_only_stdlib_httpx_pydantic(self) -> None:
        """Every import is the standard library, httpx or pydantic: what Open WebUI ships."""
        allowed = set(sys.stdlib_module_names) | {"httpx", "pydantic"}
        for node in ast.walk(ast.parse(self.text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                self.assertEqual(node.level, 0)
                names = [node.module or ""]
            else:
                continue
            for name in names:
                self.assertIn(name.split(".")[0], allowed)

    def test_loads_and_constructs_without_arguments(self) -> None:
        """The file loads by path, and Pipe() with no arguments has the documented valve defaults."""
        pipe = load_pipe_module().Pipe()
        self.assertEqual(pipe.valves.base_url, "http://localhost:3000")
        self.assertEqual(pipe.valves.api_token, "")
        self.assertFalse(pipe.valves.default_skip_permissions)
        self.assertTrue(pipe.valves.show_tools)
        self.assertEqual(pipe.chat_sessions, {})

    def test_valves_can_be_reapplied(self) -> None:
        """Valves are a pydantic model Open WebUI (or a test) can replace with new values."""
        pipe = pipe_module.Pipe()
        pipe.valves = pipe.Valves(**{**pipe.valves.model_dump(), "base_url": "http://127.0.0.1:9"})
        self.assertEqual(pipe.valves.base_url, "http://127.0.0.1:9")

    def test_pipe_is_async_generator_function(self) -> None:
        """pipe is an async generator: it never blocks Open WebUI's event loop."""
        self.assertTrue(__import__("inspect").isasyncgenfunction(pipe_module.Pipe.pipe))


# --------------------------------------------------------------------------- SSE


SAMPLE_STREAM = (
    b": keepalive\n\n"
    b'data: {"type":"system","subtype":"init"}\n\n'
    b"data: first line\ndata: second line \xc3\xa9\xf0\x9f\x99\x82\n\n"
    b": keepalive\r\n\r\n"
    b"event: ignored\r\nid: 7\r\ndata:no-space\r\n\r\n"
    b"data: cr only\r\r"
)
SAMPLE_EVENTS = [
    '{"type":"system","subtype":"init"}',
    "first line\nsecond line é🙂",
    "no-space",
    "cr only",
]


class SSEDecoderTests(SynchronousTestCase):
    def decode(self, chunks: list[bytes]) -> list[str]:
        return list(pipe_module.parse_sse(chunks))

    def test_one_event(self) -> None:
        """One data line and a blank line make one event."""
        self.assertEqual(self.decode([b'data: {"a": 1}\n\n']), ['{"a": 1}'])

    def test_keepalive_comments_are_skipped(self) -> None:
        """Comment lines such as ': keepalive' yield nothing, before, between or after events."""
        self.assertEqual(self.decode([b": keepalive\n\ndata: x\n\n: keepalive\n\n"]), ["x"])
        self.assertEqual(self.decode([b": keepalive\n\n" * 3]), [])

    def test_event_ids_are_not_data(self) -> None:
        """The daemon's `id:` lines (event numbers for reattaching) are not part of the data."""
        self.assertEqual(self.decode([b'id: 7\ndata: {"a": 1}\n\nid: 8\ndata: x\n\n']), ['{"a": 1}', "x"])

    def test_multiline_data_is_joined(self) -> None:
        """Several data lines of one event join with a newline."""
        self.assertEqual(self.decode([b"data: a\ndata: b\ndata: c\n\n"]), ["a\nb\nc"])

    def test_crlf_and_cr_line_ends(self) -> None:
        """CRLF and lone CR end lines just like LF."""
        self.assertEqual(self.decode([b"data: a\r\n\r\ndata: b\r\rdata: c\n\n"]), ["a", "b", "c"])

    def test_crlf_split_between_chunks(self) -> None:
        """A CR at the end of one chunk and the LF starting the next are one line end, not two."""
        self.assertEqual(self.decode([b"data: a\r", b"\ndata: b\r\n\r\n"]), ["a\nb"])

    def test_unfinished_event_waits(self) -> None:
        """An event is not given out before its blank line arrives."""
        decoder = pipe_module.SSEDecoder()
        self.assertEqual(decoder.feed(b"data: a\n"), [])
        self.assertEqual(decoder.feed(b"data: b"), [])
        self.assertEqual(decoder.feed(b"\n\n"), ["a\nb"])

    def test_single_space_after_colon_is_dropped(self) -> None:
        """Only the one space after 'data:' is dropped; other fields are ignored."""
        self.assertEqual(self.decode([b"data:x\n\ndata:  y\n\nevent: e\nid: 1\nretry: 5\ndata: z\n\n"]),
                         ["x", " y", "z"])

    def test_sample_in_one_chunk(self) -> None:
        """The sample stream (keepalives, multi-line, UTF-8, CRLF, CR) decodes to its events."""
        self.assertEqual(self.decode([SAMPLE_STREAM]), SAMPLE_EVENTS)

    def test_split_at_every_offset(self) -> None:
        """Splitting the stream into two chunks at any byte offset gives the same events."""
        for offset in range(len(SAMPLE_STREAM) + 1):
            chunks = [SAMPLE_STREAM[:offset], SAMPLE_STREAM[offset:]]
            self.assertEqual(self.decode(chunks), SAMPLE_EVENTS, f"split at {offset}")

    def test_split_at_every_pair_of_offsets(self) -> None:
        """Three chunks cut at any two offsets give the same events."""
        size = len(SAMPLE_STREAM)
        for first in range(0, size + 1, 3):
            for second in range(first, size + 1):
                chunks = [SAMPLE_STREAM[:first], SAMPLE_STREAM[first:second], SAMPLE_STREAM[second:]]
                self.assertEqual(self.decode(chunks), SAMPLE_EVENTS, f"split at {first}, {second}")

    def test_byte_at_a_time(self) -> None:
        """Feeding one byte at a time (splitting UTF-8 characters too) gives the same events."""
        chunks = [SAMPLE_STREAM[i:i + 1] for i in range(len(SAMPLE_STREAM))]
        self.assertEqual(self.decode(chunks), SAMPLE_EVENTS)

    def test_long_line_over_many_chunks(self) -> None:
        """A megabyte-long data line arriving in many chunks is one event."""
        payload = json.dumps({"type": "assistant", "text": "x" * (1 << 20)}).encode()
        stream = b"data: " + payload + b"\n\n"
        chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
        self.assertEqual(self.decode(chunks), [payload.decode()])


# --------------------------------------------------------------------------- parameters


class ParseParamsTests(SynchronousTestCase):
    def test_known_keys(self) -> None:
        """The known keys are read and removed; the remaining lines are the prompt."""
        params, prompt = pipe_module.parse_params(
            'dangerously-skip-permissions=true\nallowedTools=["Bash","Edit"]\n'
            'disallowedTools=["WebFetch"]\nFix the failing test.\nThen run it.'
        )
        self.assertEqual(params, {"dangerously-skip-permissions": True, "allowedTools": ["Bash", "Edit"],
                                  "disallowedTools": ["WebFetch"]})
        self.assertEqual(prompt, "Fix the failing test.\nThen run it.")

    def test_unknown_assignments_stay_in_prompt(self) -> None:
        """Any other x=y line (other names, other case) is part of the prompt, untouched."""
        text = ("temperature=0.2\nx = 1\nDangerously-Skip-Permissions=true\nModel=opus\nsession_id=" + SESSION_A
                + "\nhello")
        params, prompt = pipe_module.parse_params(text)
        self.assertEqual(params, {})
        self.assertEqual(prompt, text)

    def test_parameters_anywhere_in_message(self) -> None:
        """Parameter lines are read wherever they stand, one per line."""
        params, prompt = pipe_module.parse_params("Please fix it.\n  new_session = yes\nThanks")
        self.assertEqual(params, {"new_session": True})
        self.assertEqual(prompt, "Please fix it.\nThanks")

    def test_prompt_key_takes_rest_verbatim(self) -> None:
        """prompt= takes its value and every later line verbatim, parameter-looking lines included."""
        params, prompt = pipe_module.parse_params(
            'allowedTools=Bash\nprompt=line one\nallowedTools=["Edit"]\nline three'
        )
        self.assertEqual(params, {"allowedTools": ["Bash"]})
        self.assertEqual(prompt, 'line one\nallowedTools=["Edit"]\nline three')

    def test_values_starting_with_dash_refused(self) -> None:
        """A value, or a tool name in a list, that starts with '-' is refused with a readable error."""
        for text in ("dangerously-skip-permissions=--yes", "allowedTools=-Bash", 'allowedTools=["--help"]',
                     "disallowedTools=Bash,-x", "prompt=--help", "new_session=-1", "allowedTools= --model x"):
            error = self.assertRaises(pipe_module.ParamError, pipe_module.parse_params, text + "\nhi")
            self.assertIn("-", str(error))

    def test_bad_values_refused(self) -> None:
        """Values that are not booleans or tool lists are refused, never guessed."""
        for text in ("dangerously-skip-permissions=maybe", 'allowedTools=["Bash"', "allowedTools=[1, 2]",
                     'disallowedTools=[""]', "new_session="):
            self.assertRaises(pipe_module.ParamError, pipe_module.parse_params, text)

    def test_tool_list_forms(self) -> None:
        """Tool lists are JSON lists, or names split at commas outside parentheses."""
        parse = pipe_module.parse_params
        self.assertEqual(parse('allowedTools=["Bash(git *)", "Edit"]')[0], {"allowedTools": ["Bash(git *)", "Edit"]})
        self.assertEqual(parse("allowedTools=Bash(touch a,b.txt), Edit")[0],
                         {"allowedTools": ["Bash(touch a,b.txt)", "Edit"]})
        self.assertEqual(parse("disallowedTools=[]")[0], {"disallowedTools": []})

    def test_crlf_message(self) -> None:
        """Parameter lines ending in CRLF are read; the prompt keeps its own line ends."""
        params, prompt = pipe_module.parse_params("dangerously-skip-permissions=true\r\nline a\r\nline b")
        self.assertEqual(params, {"dangerously-skip-permissions": True})
        self.assertEqual(prompt, "line a\r\nline b")


# The model, effort, system prompt and budget when neither the valves nor the chat set them: not sent.
UNSET = {"model": None, "effort": None, "system_prompt": None, "max_budget_usd": None}


class CollectParamsTests(SynchronousTestCase):
    def test_valve_defaults(self) -> None:
        """With nothing said in the chat, the valves' defaults apply."""
        params, prompt = pipe_module.collect_params(
            [user("hi")], valves(default_skip_permissions=True, default_allowed_tools="Bash,Edit",
                                 default_disallowed_tools='["WebFetch"]'))
        self.assertEqual(params, {"dangerously-skip-permissions": True, "allowedTools": ["Bash", "Edit"],
                                  "disallowedTools": ["WebFetch"], **UNSET})
        self.assertEqual(prompt, "hi")

    def test_settings_carry_over(self) -> None:
        """Settings from earlier user messages (string or list content) apply to later turns."""
        messages = [
            user('dangerously-skip-permissions=true\nallowedTools=["Bash"]\nfirst'),
            assistant("ok\n\nsession_id=" + SESSION_A),
            user([{"type": "text", "text": "disallowedTools=WebFetch\nsecond"}, {"type": "image_url"}]),
            assistant("ok"),
            user("third"),
        ]
        params, prompt = pipe_module.collect_params(messages, valves())
        self.assertEqual(params, {"dangerously-skip-permissions": True, "allowedTools": ["Bash"],
                                  "disallowedTools": ["WebFetch"], **UNSET})
        self.assertEqual(prompt, "third")

    def test_newer_settings_override(self) -> None:
        """A later message overrides an earlier one, and the newest message overrides them all."""
        messages = [
            user("dangerously-skip-permissions=true\nallowedTools=Bash\nfirst"),
            assistant("ok"),
            user("allowedTools=Edit\nsecond"),
            assistant("ok"),
            user("dangerously-skip-permissions=false\nthird"),
        ]
        params, _ = pipe_module.collect_params(messages, valves(default_skip_permissions=True))
        self.assertEqual(params["dangerously-skip-permissions"], False)
        self.assertEqual(params["allowedTools"], ["Edit"])

    def test_prompt_and_new_session_do_not_carry_over(self) -> None:
        """new_session and prompt apply only to the message that holds them."""
        messages = [user("new_session=true\nprompt=old"), assistant("ok"), user("new")]
        params, prompt = pipe_module.collect_params(messages, valves())
        self.assertNotIn("new_session", params)
        self.assertEqual(prompt, "new")

    def test_refused_earlier_message_counts_for_nothing(self) -> None:
        """An earlier message that was refused (a '-' value) sets nothing for later turns."""
        messages = [user("dangerously-skip-permissions=true\nallowedTools=-x\nhi"), assistant("Not sent"),
                    user("again")]
        params, _ = pipe_module.collect_params(messages, valves())
        self.assertFalse(params["dangerously-skip-permissions"])

    def test_newest_message_refused(self) -> None:
        """A refused value in the newest message raises ParamError."""
        self.assertRaises(pipe_module.ParamError, pipe_module.collect_params,
                          [user("allowedTools=--help\nhi")], valves())

    def test_payload_carries_only_what_is_set(self) -> None:
        """The request body has the prompt, and the session and options only when they are set."""
        build = pipe_module.build_payload
        self.assertEqual(build("hi", {"dangerously-skip-permissions": False, "allowedTools": []}, None),
                         {"prompt": "hi"})
        self.assertEqual(
            build("hi", {"dangerously-skip-permissions": True, "allowedTools": ["Bash"],
                         "disallowedTools": ["Edit"], "new_session": True}, SESSION_A),
            {"prompt": "hi", "session_id": SESSION_A, "dangerously-skip-permissions": True,
             "allowedTools": ["Bash"], "disallowedTools": ["Edit"]})
        self.assertEqual(build("hi", {}, None, approvals=True), {"prompt": "hi", "approvals": True})


class ModelSettingsTests(SynchronousTestCase):
    """model=, effort=, system_prompt= and max_budget_usd=: typed in a message or set as valves."""

    def test_read_from_a_message(self) -> None:
        """Each is read and removed from the prompt; effort in any case, a budget with or without a $."""
        params, prompt = pipe_module.parse_params(
            "model=sonnet\n effort = HIGH\nsystem_prompt=You are terse. Answer in = signs only.\n"
            "max_budget_usd=$0.50\nWhat is 2+2?")
        self.assertEqual(params, {"model": "sonnet", "effort": "high",
                                  "system_prompt": "You are terse. Answer in = signs only.", "max_budget_usd": 0.5})
        self.assertEqual(prompt, "What is 2+2?")

    def test_model_names(self) -> None:
        """Aliases and full model names as the server takes them (letters, digits, . - _ : [ ])."""
        for model in ("opus", "haiku", "claude-sonnet-4-5-20250929", "claude-opus-4-1[1m]",
                      "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "m" * 100):
            self.assertEqual(pipe_module.parse_params(f"model={model}\nhi")[0], {"model": model})

    def test_system_prompt_as_json_string(self) -> None:
        """A system prompt starting with a double quote is a JSON string: it can hold several lines."""
        params, _ = pipe_module.parse_params('system_prompt="Be terse.\\nUse \\"quotes\\" freely."\nhi')
        self.assertEqual(params, {"system_prompt": 'Be terse.\nUse "quotes" freely.'})

    def test_empty_value_means_the_default(self) -> None:
        """An empty value is None: back to the valve's default, or nothing sent."""
        params, prompt = pipe_module.parse_params("model=\neffort=  \nsystem_prompt=\nmax_budget_usd=\nhi")
        self.assertEqual(params, UNSET)
        self.assertEqual(prompt, "hi")

    def test_bad_values_refused(self) -> None:
        """Values the server would refuse are refused here, each with a message saying what is wanted."""
        cases = {
            "model=claude sonnet": "`model` must be a model alias such as sonnet, opus or haiku, or a full model",
            "model=sonnet;rm": "not `sonnet;rm`",
            "model=" + "m" * 101: "at most 100 characters",
            "model=_sonnet": "`model` must be a model alias",
            "model=--help": "`model` must not start with `-`",
            "effort=extreme": "`effort` must be one of low, medium, high, xhigh, max, not `extreme`.",
            "max_budget_usd=0": "`max_budget_usd` must be a number of US dollars above 0 and at most 1,000,000",
            "max_budget_usd=-1": "must not start with `-`",
            "max_budget_usd=five": "not `five`",
            "max_budget_usd=nan": "not `nan`",
            "max_budget_usd=inf": "not `inf`",
            "max_budget_usd=1000001": "at most 1,000,000",
            'system_prompt="unterminated': "`system_prompt` starts with a double quote, so it must be one JSON string",
            'system_prompt=["a"]': None,  # not a JSON string: an ordinary text, starting with [
            'system_prompt="-x"': "`system_prompt` must not start with `-`",
            'system_prompt="a\\u0000b"': "`system_prompt` must not contain NUL characters",
        }
        for line, message in cases.items():
            if message is None:
                self.assertEqual(pipe_module.parse_params(line)[0], {"system_prompt": '["a"]'})
                continue
            error = self.assertRaises(pipe_module.ParamError, pipe_module.parse_params, line + "\nhi")
            self.assertIn(message, str(error), line)

    def test_valves(self) -> None:
        """The default_model, default_effort, default_system_prompt and default_max_budget_usd valves give the
        defaults; empty (as shipped) they are not sent."""
        shipped = pipe_module.Pipe().valves
        self.assertEqual((shipped.default_model, shipped.default_effort, shipped.default_system_prompt,
                          shipped.default_max_budget_usd), ("", "", "", ""))
        given = valves(default_model="opus", default_effort="Low", default_system_prompt="  Be brief.\nVery.  ",
                       default_max_budget_usd="1.5")
        params, _ = pipe_module.collect_params([user("hi")], given)
        self.assertEqual({key: params[key] for key in UNSET},
                         {"model": "opus", "effort": "low", "system_prompt": "Be brief.\nVery.", "max_budget_usd": 1.5})
        self.assertEqual(pipe_module.build_payload("hi", params, None),
                         {"prompt": "hi", "model": "opus", "effort": "low", "system_prompt": "Be brief.\nVery.",
                          "max_budget_usd": 1.5})
        params, _ = pipe_module.collect_params([user("hi")], valves())
        self.assertEqual(pipe_module.build_payload("hi", params, None), {"prompt": "hi"})

    def test_bad_valves_refused(self) -> None:
        """A valve the server would refuse is refused, naming the valve."""
        for name, value in (("default_model", "bad model"), ("default_effort", "extreme"),
                            ("default_max_budget_usd", "0"), ("default_system_prompt", "-x")):
            error = self.assertRaises(pipe_module.ParamError, pipe_module.collect_params, [user("hi")],
                                      valves(**{name: value}))
            self.assertIn(f"`{name} valve`", str(error))

    def test_carry_over_and_back_to_default(self) -> None:
        """Set in earlier messages, they apply to later ones until changed; an empty value goes back to the
        valve's default; a refused earlier message sets nothing."""
        given = valves(default_model="haiku")
        messages = [user("model=opus\neffort=high\nfirst"), assistant("ok\n\nsession_id=" + SESSION_A),
                    user([{"type": "text", "text": "system_prompt=Be terse.\nmax_budget_usd=2\nsecond"},
                          image_part(PNG_URL)]),
                    assistant("ok"), user("effort=banana\nmodel=sonnet\nrefused"), assistant("**Not sent:** ..."),
                    user("third")]
        params, prompt = pipe_module.collect_params(messages, given)
        self.assertEqual({key: params[key] for key in UNSET},
                         {"model": "opus", "effort": "high", "system_prompt": "Be terse.", "max_budget_usd": 2.0})
        self.assertEqual(prompt, "third")
        params, _ = pipe_module.collect_params([*messages, assistant("ok"), user("model=\neffort=\nfourth")], given)
        self.assertEqual((params["model"], params["effort"], params["system_prompt"]), ("haiku", None, "Be terse."))

    def test_settings_only_message_repeats_them(self) -> None:
        """A message holding only settings is answered with what now applies, as it would be typed back."""
        messages = [user('model=sonnet\nmax_budget_usd=0.5\nsystem_prompt="Two\\nlines"')]
        params, prompt = pipe_module.collect_params(messages, valves())
        self.assertEqual(prompt, "")
        reply = pipe_module.empty_prompt_reply(messages, params)
        self.assertIn('model=sonnet\nsystem_prompt="Two\\nlines"\nmax_budget_usd=0.5', reply)
        self.assertNotIn("effort", reply)
        typed_back = pipe_module.describe_params(params)
        self.assertEqual(pipe_module.collect_params([user(typed_back)], valves())[0], params)


# --------------------------------------------------------------------------- images


class ImageTests(SynchronousTestCase):
    """Images attached in Open WebUI (``image_url`` parts holding ``data:`` URLs) become image blocks."""

    def test_each_type_claude_takes(self) -> None:
        """PNG, JPEG, GIF and WebP data URLs become base64 image blocks with their data as given."""
        for media_type, data in (("image/png", PNG), ("image/jpeg", JPEG), ("image/gif", GIF),
                                 ("image/webp", WEBP)):
            blocks, skipped = pipe_module.message_images([image_part(data_url(media_type, data))])
            self.assertEqual((blocks, skipped), ([image_block(media_type, data)], []))

    def test_media_type_from_the_bytes(self) -> None:
        """The media type is the one the bytes show, whatever the URL says (the server checks it the same way)."""
        blocks, _ = pipe_module.message_images([image_part(data_url("image/png", JPEG)),
                                                image_part(data_url("application/octet-stream", GIF))])
        self.assertEqual(blocks, [image_block("image/jpeg", JPEG), image_block("image/gif", GIF)])

    def test_forms_open_webui_uses(self) -> None:
        """image_url as an object or a plain string, and input_image parts; text parts and strings are not images;
        whitespace in the base64 is dropped."""
        wrapped = "data:image/png;base64," + "\n".join(b64(PNG)[i:i + 20] for i in range(0, len(b64(PNG)), 20))
        content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": PNG_URL},
                   {"type": "input_image", "image_url": wrapped}, image_part(" " + PNG_URL + " "), "a string"]
        blocks, skipped = pipe_module.message_images(content)
        self.assertEqual((blocks, skipped), ([image_block("image/png", PNG)] * 3, []))
        self.assertEqual(pipe_module.message_images("just text"), ([], []))
        self.assertEqual(pipe_module.message_images(None), ([], []))

    def test_what_cannot_be_sent_is_said(self) -> None:
        """A link (not data), another type (SVG, PDF), data that is not base64 or not valid base64, or no URL at
        all: not sent, each said in a few words."""
        content = [image_part("https://example.com/cat.png"), image_part(data_url("image/svg+xml", SVG)),
                   image_part("data:image/png,not-base64"), image_part("data:image/png;base64,@@@@"),
                   {"type": "image_url", "image_url": {}}, image_part(data_url("application/pdf", b"%PDF-1.7"))]
        blocks, skipped = pipe_module.message_images(content)
        self.assertEqual(blocks, [])
        self.assertEqual(skipped, [
            "an image given as a link, not as data (https://example.com/cat.png)",
            "an attachment of type image/svg+xml (Claude takes PNG, JPEG, GIF and WebP images)",
            "an attachment of type image/png that is not base64 data",
            "an attachment of type image/png whose data is not valid base64",
            "an attachment without image data",
            "an attachment of type application/pdf (Claude takes PNG, JPEG, GIF and WebP images)",
        ])
        self.assertEqual(pipe_module.skipped_note(skipped[:1] * 2 + skipped[1:2]),
                         "_Not sent to Claude: an image given as a link, not as data (https://example.com/cat.png) "
                         "(×2); an attachment of type image/svg+xml (Claude takes PNG, JPEG, GIF and WebP images)._")

    def test_at_most_99_images(self) -> None:
        """The server takes at most 100 blocks: 99 images and the text; the rest are said not sent."""
        blocks, skipped = pipe_module.message_images([image_part(PNG_URL)] * 101)
        self.assertEqual(len(blocks), 99)
        self.assertEqual(skipped, ["an image past the first 99 of the message"] * 2)


# --------------------------------------------------------------------------- sessions


class FindSessionIdTests(SynchronousTestCase):
    def test_newest_assistant_message_first(self) -> None:
        """The marker of the newest assistant message wins over older ones."""
        messages = [user("a"), assistant("x\n\nsession_id=" + SESSION_A), user("b"),
                    assistant("y\n\nsession_id=" + SESSION_B), user("c")]
        self.assertEqual(pipe_module.find_session_id(messages), SESSION_B)

    def test_older_marker_when_newest_has_none(self) -> None:
        """An answer without a marker (stopped, or a local reply) is skipped."""
        messages = [assistant("x\nsession_id=" + SESSION_A), user("b"), assistant("stopped half-way"), user("c")]
        self.assertEqual(pipe_module.find_session_id(messages), SESSION_A)

    def test_list_content(self) -> None:
        """Assistant content given as a list of parts is searched too."""
        messages = [assistant([{"type": "text", "text": "hello"}, {"type": "text", "text": "session_id=" + SESSION_B}])]
        self.assertEqual(pipe_module.find_session_id(messages), SESSION_B)

    def test_last_marker_within_a_message(self) -> None:
        """Within one message the last marker (the pipe's own, at the end) wins."""
        messages = [assistant(f"session_id={SESSION_A}\ntext\n\nsession_id={SESSION_B}")]
        self.assertEqual(pipe_module.find_session_id(messages), SESSION_B)

    def test_marker_inside_details_ignored(self) -> None:
        """A marker inside a <details> block (tool output), nested or unclosed, is not a marker."""
        inside = (f"<details>\n<summary>Tool result</summary>\n\n```\nsession_id={SESSION_B}\n```\n\n</details>\n\n"
                  f"<details><summary>outer</summary>\n<details>\ninner\n</details>\nsession_id={SESSION_B}\n</details>")
        messages = [assistant("old\n\nsession_id=" + SESSION_A), user("b"), assistant(inside)]
        self.assertEqual(pipe_module.find_session_id(messages), SESSION_A)
        unclosed = [assistant(f"<details>\n<summary>x</summary>\nsession_id={SESSION_B}")]
        self.assertIsNone(pipe_module.find_session_id(unclosed))

    def test_only_whole_lines_of_assistant_messages(self) -> None:
        """A marker must be a line of its own, in an assistant message, with a lower-case UUID."""
        messages = [user("session_id=" + SESSION_A),
                    assistant(f"the id is session_id={SESSION_A} here"),
                    assistant("session_id=" + SESSION_B.upper()),
                    assistant(f"session_id={SESSION_A} ")]
        self.assertIsNone(pipe_module.find_session_id(messages))

    def test_chat_id_fallback(self) -> None:
        """Without a marker the pipe resumes the session it last saw in the same chat; a marker wins."""
        pipe = pipe_module.Pipe()
        pipe.remember("chat-1", SESSION_B)
        self.assertEqual(pipe.session_to_resume([user("hi")], "chat-1"), SESSION_B)
        self.assertIsNone(pipe.session_to_resume([user("hi")], "chat-2"))
        self.assertIsNone(pipe.session_to_resume([user("hi")], None))
        with_marker = [assistant("session_id=" + SESSION_A), user("hi")]
        self.assertEqual(pipe.session_to_resume(with_marker, "chat-1"), SESSION_A)


# --------------------------------------------------------------------------- rendering


class RenderTests(SynchronousTestCase):
    def test_assistant_text_as_is(self) -> None:
        """Assistant text is shown exactly as Claude wrote it."""
        self.assertEqual(pipe_module.render_event(TEXT_BEFORE, valves()), "I will use Bash.")

    def test_tool_use_and_result_collapsed(self) -> None:
        """Tool calls and results are closed <details> blocks with a one-line summary."""
        use = pipe_module.render_event(TOOL_USE, valves())
        self.assertTrue(use.startswith("<details>\n<summary>Tool: Bash: echo hi > file.txt</summary>\n"))
        self.assertTrue(use.endswith("</details>"))
        self.assertIn('"command": "echo hi > file.txt"', use)
        result = pipe_module.render_event(TOOL_RESULT, valves())
        self.assertTrue(result.startswith("<details>\n<summary>Tool result: hi written</summary>"))
        self.assertTrue(result.endswith("</details>"))

    def test_tool_error_and_list_content(self) -> None:
        """A failed tool result says so; list content is shown as its text."""
        event = {"type": "user", "message": {"content": [{"type": "tool_result", "is_error": True,
                                                          "content": [{"type": "text", "text": "denied"}]}]}}
        self.assertIn("<summary>Tool error: denied</summary>", pipe_module.render_event(event, valves()))

    def test_tools_hidden(self) -> None:
        """With show_tools off, tool calls and results show nothing."""
        self.assertEqual(pipe_module.render_event(TOOL_USE, valves(show_tools=False)), "")
        self.assertEqual(pipe_module.render_event(TOOL_RESULT, valves(show_tools=False)), "")

    def test_tool_output_truncated(self) -> None:
        """Tool output is cut to tool_output_max_chars, saying how much was left out; 0 shows only the summary."""
        event = {"type": "user", "message": {"content": [{"type": "tool_result", "content": "y" * 500}]}}
        shown = pipe_module.render_event(event, valves(tool_output_max_chars=100))
        self.assertIn("y" * 100 + "\n… (400 more characters)", shown)
        self.assertNotIn("y" * 101, shown)
        self.assertEqual(pipe_module.render_event(event, valves(tool_output_max_chars=0)).count("\n"), 2)

    def test_output_cannot_break_out_of_its_block(self) -> None:
        """Tags and fences inside tool output stay inside the block, and a marker in it is ignored."""
        nasty = f"```\n</details>\n</summary>\nsession_id={SESSION_B}\n<details>"
        event = {"type": "user", "message": {"content": [{"type": "tool_result", "content": nasty}]}}
        shown = pipe_module.render_event(event, valves())
        self.assertEqual(shown.count("<details>"), 1)
        self.assertEqual(shown.count("</details>"), 1)
        self.assertIn("\n````\n", shown)
        answer = f"text\n\n{shown}\n\nsession_id={SESSION_A}"
        self.assertEqual(pipe_module.find_session_id([assistant(answer)]), SESSION_A)
        self.assertEqual(pipe_module.find_session_id([assistant(f"text\n\n{shown}")]), None)

    def test_error_result_readable(self) -> None:
        """A failed result shows its message, errors, reason, API status, exit code and stderr."""
        api = pipe_module.render_event(RESULT_API_ERROR, valves())
        self.assertIn("Invalid API key", api)
        self.assertIn("api_error", api)
        self.assertIn("401", api)
        cli = pipe_module.render_event(RESULT_CLI_FAILED, valves())
        self.assertIn("exited with code 1 without a result: boom", cli)
        self.assertIn("exit code 1", cli)
        self.assertIn("<summary>stderr</summary>", cli)
        bare = pipe_module.render_event({"type": "result", "is_error": True}, valves())
        self.assertIn("ended with an error", bare)

    def test_successful_result_and_system_events_add_nothing(self) -> None:
        """A successful result repeats the last text, so it adds nothing; nor do system events."""
        self.assertEqual(pipe_module.render_event(RESULT_OK, valves()), "")
        self.assertEqual(pipe_module.render_event(INIT, valves()), "")

    def test_server_events_become_status_lines(self) -> None:
        """claudesrv's own events (a queued turn, a tool denied by the server) show as status lines."""
        self.assertIn("position 2", pipe_module.status_for_event({"type": "claudesrv", "subtype": "queued",
                                                                   "position": 2}))
        denied = {"type": "claudesrv", "subtype": "permission_denied", "tool_name": "Bash"}
        self.assertEqual(pipe_module.status_for_event(denied), "Permission denied: Bash")
        self.assertEqual(pipe_module.render_event(denied, valves()), "")

    def test_thinking_in_open_webui_reasoning_block(self) -> None:
        """Thinking is shown as Open WebUI writes a model's reasoning: a done reasoning block with its duration in
        whole seconds, the lines quoted and HTML-escaped, so no tag in it opens or closes a block."""
        thinking = "First I look.\n\nThen <b>act</b> & say \"</details>\".\n> quoted already\n"
        event = {"type": "assistant", "message": {"content": [{"type": "thinking", "thinking": thinking,
                                                               "signature": "abc"}]}}
        self.assertEqual(
            pipe_module.render_event(event, valves(), 12.9),
            '<details type="reasoning" done="true" duration="12">\n<summary>Thought for 12 seconds</summary>\n'
            "&gt; First I look.\n&gt; \n&gt; Then &lt;b&gt;act&lt;/b&gt; &amp; say &quot;&lt;/details&gt;&quot;.\n"
            "&gt; quoted already\n</details>")
        self.assertIn('duration="0"', pipe_module.render_event(event, valves()))

    def test_reasoning_block_as_open_webui_reads_it(self) -> None:
        """Open WebUI's Markdown reads a block that starts a line as ``<details ...>\\n``, then
        ``<summary>...</summary>\\n``, to the matching ``</details>``; the thinking, unescaped, is a blockquote.
        Text before and after it stays outside, and a marker line in the thinking is not a marker."""
        thinking = f"Plan.\nsession_id={SESSION_B}\n<details>"
        events = [TEXT_BEFORE, {"type": "assistant", "message": {"content": [{"type": "thinking",
                                                                              "thinking": thinking}]}}, TEXT_AFTER]
        answer = "\n\n".join(pipe_module.render_event(event, valves(), 3) for event in events)
        answer += f"\n\nsession_id={SESSION_A}"
        start = answer.index("<details")
        self.assertEqual(answer[:start], "I will use Bash.\n\n")
        block = re.match(r'<details(\s+[^>]*)?>\n<summary>(.*?)</summary>\n(.*?)</details>', answer[start:], re.DOTALL)
        assert block is not None
        self.assertEqual(dict(re.findall(r'(\w+)="(.*?)"', block.group(1))),
                         {"type": "reasoning", "done": "true", "duration": "3"})
        self.assertEqual(block.group(2), "Thought for 3 seconds")
        self.assertNotIn("<", block.group(3))
        self.assertEqual(__import__("html").unescape(block.group(3)),
                         f"> Plan.\n> session_id={SESSION_B}\n> <details>\n")
        self.assertEqual(answer[start + block.end():], f"\n\nDone: file.txt holds hi.\n\nsession_id={SESSION_A}")
        self.assertEqual(pipe_module.find_session_id([assistant(answer)]), SESSION_A)

    def test_thinking_valve(self) -> None:
        """Thinking shows by default; with show_thinking off, or when empty, it adds nothing."""
        event = {"type": "assistant", "message": {"content": [{"type": "thinking", "thinking": "hmm"}]}}
        self.assertTrue(pipe_module.Pipe().valves.show_thinking)
        self.assertIn('<details type="reasoning"', pipe_module.render_event(event, valves()))
        self.assertEqual(pipe_module.render_event(event, valves(show_thinking=False)), "")
        empty = {"type": "assistant", "message": {"content": [{"type": "thinking", "thinking": " \n"},
                                                              {"type": "redacted_thinking", "data": "x"}]}}
        self.assertEqual(pipe_module.render_event(empty, valves()), "")

    def test_http_error_readable(self) -> None:
        """A refusal before streaming shows its status, code, message and a hint."""
        body = json.dumps({"error": {"code": "session_busy", "message": "a turn is running"}}).encode()
        text = pipe_module.render_http_error(409, body)
        self.assertIn("409 session_busy", text)
        self.assertIn("a turn is running", text)
        self.assertIn("api_token", pipe_module.render_http_error(401, b'{"error":{"code":"unauthorized"}}'))
        self.assertIn("new_session=true", pipe_module.render_http_error(
            404, b'{"error":{"code":"session_not_found","message":"no session"}}'))
        self.assertIn("<html>bad gateway", pipe_module.render_http_error(502, b"<html>bad gateway"))
        self.assertIn("`approvals` valve", pipe_module.render_http_error(
            403, b'{"error":{"code":"approvals_denied","message":"this server does not ask people about tools"}}'))

    def test_policy_refusals_readable(self) -> None:
        """The server's policy refusals (403) show the code and the server's message (which names its option),
        and say how to change the setting: in a message, or, when the default is refused, in the valve."""
        def refusal(code: str, message: str, field: str) -> str:
            body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
            return str(pipe_module.render_http_error(403, body))

        text = refusal("model_not_allowed", "this server does not offer the model 'opus' (--allow-model sonnet*)",
                       "model")
        self.assertTrue(text.startswith("**claudesrv refused the request** (HTTP 403 model_not_allowed): this server "
                                        "does not offer the model 'opus' (--allow-model sonnet*)\n\n"), text)
        self.assertIn("Send `model=` with a model this server offers, or with nothing after it to go back to the "
                      "default (alone or with your request); the setting stays in force", text)
        self.assertIn("this function's `default_model` valve", text)
        text = refusal("budget_over_limit", "max_budget_usd may be at most 5 here (--max-budget-usd)", "max_budget_usd")
        self.assertIn("(HTTP 403 budget_over_limit): max_budget_usd may be at most 5 here (--max-budget-usd)", text)
        self.assertIn("Send `max_budget_usd=` with a smaller amount", text)
        text = refusal("system_prompt_denied", "this server does not let a request replace the system prompt "
                                               "(--allow-system-prompt append)", "system_prompt")
        self.assertIn("(--allow-system-prompt append)", text)
        self.assertIn("Send `system_prompt=` with nothing after it to go back to the default", text)
        self.assertIn("`default_system_prompt` valve", text)
        text = refusal("max_turns_over_limit", "max_turns may be at most 10 here (--max-turns-limit)", "max_turns")
        self.assertTrue(text.endswith("(HTTP 403 max_turns_over_limit): max_turns may be at most 10 here "
                                      "(--max-turns-limit)"), text)
        invalid = {"error": {"code": "invalid_field", "message": 'effort must be one of "low", "high"',
                             "field": "effort"}}
        text = str(pipe_module.render_http_error(400, json.dumps(invalid).encode()))
        self.assertIn("Send `effort=` with another level", text)


# --------------------------------------------------------------------------- tasks


class TaskTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(pipe_module.httpx, "AsyncClient", NoClient)

    def answer(self, task: str, **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
        body = {"messages": [user("### Task: make a title ...")], "stream": False}
        return run_pipe(pipe_module.Pipe(), body, __task__=task, **kwargs)

    def test_title_without_http(self) -> None:
        """A title task is answered at once with a JSON title from the first user message, no HTTP call."""
        task_body = {"messages": [user("allowedTools=Bash\n\nFix the flaky test in   tests/test_x.py\nmore"),
                                  assistant("...")]}
        text, events = self.answer("title_generation", __task_body__=task_body)
        self.assertEqual(json.loads(text), {"title": "Fix the flaky test in tests/test_x.py"})
        self.assertEqual(events, [])

    def test_title_fallback(self) -> None:
        """Without the chat's messages the title is a fixed one."""
        text, _ = self.answer("title_generation")
        self.assertEqual(json.loads(text), {"title": "Claude Code"})

    def test_follow_ups_and_tags(self) -> None:
        """Follow-up and tag tasks get empty lists; any other task gets an empty string."""
        self.assertEqual(json.loads(self.answer("follow_up_generation")[0]), {"follow_ups": []})
        self.assertEqual(json.loads(self.answer("tags_generation")[0]), {"tags": []})
        for task in ("query_generation", "emoji_generation", "autocomplete_generation", "memory"):
            self.assertEqual(self.answer(task)[0], "")


# --------------------------------------------------------------------------- the pipe against a fake server


class PipeStreamTests(SynchronousTestCase):
    def assertClosedStatus(self, events: list[dict[str, Any]]) -> str:
        """Status events end with exactly one done=True, the last; return its description."""
        self.assertTrue(events)
        for event in events:
            self.assertEqual(event["type"], "status")
        self.assertEqual([e["data"]["done"] for e in events], [False] * (len(events) - 1) + [True])
        return str(events[-1]["data"]["description"])

    def test_full_run(self) -> None:
        """Text, tool blocks and a final marker line outside any <details>; the request is well formed."""
        server = FakeServer(body=b": keepalive\n\n" + sse(*FULL_RUN))
        pipe = make_pipe(server, api_token="s3cret", base_url="http://claudesrv.test:3000/")
        text, events = run_pipe(pipe, {"messages": [user("allowedTools=Bash\nwrite hi to file.txt")]},
                                __chat_id__="chat-1")
        self.assertTrue(text.startswith("I will use Bash.\n\n<details>"))
        self.assertIn("Done: file.txt holds hi.", text)
        self.assertTrue(text.endswith("\n\nsession_id=" + SESSION_C))
        self.assertEqual(pipe_module.find_session_id([assistant(text)]), SESSION_C)
        self.assertEqual(text.count("<details>"), 2)
        request = server.requests[0]
        self.assertEqual(str(request.url), "http://claudesrv.test:3000/api/claude")
        self.assertEqual(request.method, "POST")
        self.assertEqual(request.headers["Authorization"], "Bearer s3cret")
        self.assertEqual(request.headers["Content-Type"], "application/json")
        self.assertEqual(server.payload(), {"prompt": "write hi to file.txt", "allowedTools": ["Bash"]})
        self.assertEqual(pipe.chat_sessions, {"chat-1": SESSION_C})
        self.assertIn("$0.0248", self.assertClosedStatus(events))
        self.assertTrue(server.stream.closed)

    def test_no_token_no_authorization(self) -> None:
        """Without a token no Authorization header is sent."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        run_pipe(make_pipe(server), {"messages": [user("hi")]})
        self.assertNotIn("Authorization", server.requests[0].headers)

    def test_split_frames_from_server(self) -> None:
        """Events split across many small chunks are rendered the same."""
        stream = sse(*FULL_RUN)
        whole, _ = run_pipe(make_pipe(FakeServer(body=stream)), {"messages": [user("hi")]})
        chunks = [stream[i:i + 7] for i in range(0, len(stream), 7)]
        split, _ = run_pipe(make_pipe(FakeServer(chunks=chunks)), {"messages": [user("hi")]})
        self.assertEqual(split, whole)

    def test_resumes_marker_session(self) -> None:
        """The session in the newest marker is sent as session_id."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        messages = [user("a"), assistant("x\n\nsession_id=" + SESSION_A), user("b")]
        run_pipe(make_pipe(server), {"messages": messages})
        self.assertEqual(server.payload()["session_id"], SESSION_A)

    def test_resumes_chat_session_without_marker(self) -> None:
        """With the marker gone, the session this pipe saw in the chat is resumed."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        pipe = make_pipe(server)
        pipe.remember("chat-9", SESSION_B)
        run_pipe(pipe, {"messages": [user("a"), assistant("summary of earlier turns"), user("b")]},
                 __metadata__={"chat_id": "chat-9"})
        self.assertEqual(server.payload()["session_id"], SESSION_B)

    def test_new_session(self) -> None:
        """new_session=true sends no session_id even when a marker exists."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        messages = [assistant("session_id=" + SESSION_A), user("new_session=true\nstart over")]
        run_pipe(make_pipe(server), {"messages": messages})
        self.assertEqual(server.payload(), {"prompt": "start over"})

    def test_carried_settings_sent(self) -> None:
        """Settings from earlier user messages are sent with later turns."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        messages = [user("dangerously-skip-permissions=true\nfirst"), assistant("session_id=" + SESSION_A),
                    user("second")]
        run_pipe(make_pipe(server), {"messages": messages})
        self.assertEqual(server.payload(), {"prompt": "second", "session_id": SESSION_A,
                                            "dangerously-skip-permissions": True})

    def test_error_result(self) -> None:
        """An is_error result becomes readable text, still followed by the marker."""
        server = FakeServer(body=sse(INIT, RESULT_CLI_FAILED))
        text, events = run_pipe(make_pipe(server), {"messages": [user("hi")]})
        self.assertIn("**Claude Code failed:**", text)
        self.assertIn("boom", text)
        self.assertTrue(text.endswith("session_id=" + SESSION_C))
        self.assertIn("Failed", self.assertClosedStatus(events))

    def test_http_error(self) -> None:
        """An HTTP refusal shows its JSON message; the resumed session's marker is kept."""
        body = json.dumps({"error": {"code": "session_busy", "message": "a turn is still running"}}).encode()
        server = FakeServer(status=409, body=body)
        messages = [assistant("session_id=" + SESSION_A), user("hi")]
        text, events = run_pipe(make_pipe(server), {"messages": messages})
        self.assertIn("HTTP 409 session_busy", text)
        self.assertIn("a turn is still running", text)
        self.assertTrue(text.endswith("session_id=" + SESSION_A))
        self.assertIn("409", self.assertClosedStatus(events))

    def test_unknown_session(self) -> None:
        """A 404 for the resumed session suggests new_session=true and gives no marker for it."""
        body = json.dumps({"error": {"code": "session_not_found", "message": "no session"}}).encode()
        server = FakeServer(status=404, body=body)
        text, _ = run_pipe(make_pipe(server), {"messages": [assistant("session_id=" + SESSION_A), user("hi")]})
        self.assertIn("new_session=true", text)
        self.assertNotIn("\nsession_id=", text)

    def test_connection_refused(self) -> None:
        """A server that is down gives a readable message, not an exception."""
        server = FakeServer(error=httpx.ConnectError("[Errno 111] Connection refused"))
        text, events = run_pipe(make_pipe(server), {"messages": [user("hi")]})
        self.assertIn("Could not connect to claudesrv", text)
        self.assertIn("Connection refused", text)
        self.assertEqual(self.assertClosedStatus(events), "Failed")

    def test_real_connection_refused(self) -> None:
        """A real refused TCP connection (nothing listening) is readable text too."""
        pipe = make_pipe(None, base_url="http://127.0.0.1:9", connect_timeout=5)
        text, _ = run_pipe(pipe, {"messages": [user("hi")]})
        self.assertIn("Could not connect to claudesrv", text)

    def test_timeouts(self) -> None:
        """Connect and idle-read timeouts give readable messages naming the valve."""
        text, _ = run_pipe(make_pipe(FakeServer(error=httpx.ReadTimeout("slow"))), {"messages": [user("hi")]})
        self.assertIn("idle_timeout", text)
        text, _ = run_pipe(make_pipe(FakeServer(error=httpx.ConnectTimeout("slow"))), {"messages": [user("hi")]})
        self.assertIn("Could not connect", text)

    def test_stream_without_result(self) -> None:
        """A stream that ends before the result event says so."""
        server = FakeServer(body=sse(INIT, TEXT_BEFORE))
        text, events = run_pipe(make_pipe(server), {"messages": [user("hi")]})
        self.assertIn("ended before Claude Code finished", text)
        self.assertTrue(text.endswith("session_id=" + SESSION_C))
        self.assertEqual(self.assertClosedStatus(events), "Failed")

    def test_refused_parameter_makes_no_call(self) -> None:
        """A '-' value is refused in the answer and nothing is sent to the server."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        text, events = run_pipe(make_pipe(server), {"messages": [user("allowedTools=--help\nhi")]})
        self.assertIn("must not start with `-`", text)
        self.assertEqual(server.requests, [])
        self.assertEqual(events, [])

    def test_settings_only_message_makes_no_call(self) -> None:
        """A message holding only settings is acknowledged without calling the server."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        text, _ = run_pipe(make_pipe(server), {"messages": [user("dangerously-skip-permissions=true")]})
        self.assertIn("dangerously-skip-permissions=true", text)
        self.assertEqual(server.requests, [])

    def test_no_event_emitter(self) -> None:
        """Without an event emitter (not a browser chat) the pipe still answers."""
        server = FakeServer(body=sse(*FULL_RUN))

        async def collect() -> str:
            pipe = make_pipe(server)
            return "".join([piece async for piece in pipe.pipe({"messages": [user("hi")]}, __event_emitter__=None)])

        self.assertIn("Done: file.txt holds hi.", run_async(collect()))

    def test_failing_event_emitter_ignored(self) -> None:
        """An event emitter that raises does not break the answer."""
        server = FakeServer(body=sse(*FULL_RUN))

        async def broken(event: dict[str, Any]) -> None:
            raise RuntimeError("socket gone")

        async def collect() -> str:
            pipe = make_pipe(server)
            return "".join([piece async for piece in pipe.pipe({"messages": [user("hi")]}, __event_emitter__=broken)])

        self.assertTrue(run_async(collect()).endswith("session_id=" + SESSION_C))


THINKING = {"type": "assistant", "session_id": SESSION_C,
            "message": {"content": [{"type": "thinking", "thinking": "The user wants hi in file.txt.\nUse Bash.",
                                     "signature": "sig"}]}}


class PipeOptionsTests(SynchronousTestCase):
    """The new settings, attached images and Claude's thinking, through the whole pipe against a fake server."""

    def test_settings_and_valves_sent(self) -> None:
        """model, effort, system_prompt and max_budget_usd from the chat and the valves reach the request body as
        the server names them; the setting lines are not part of the prompt."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        pipe = make_pipe(server, default_effort="low", default_max_budget_usd="3")
        messages = [user("model=opus\nsystem_prompt=Answer in French.\nfirst"), assistant("session_id=" + SESSION_A),
                    user("max_budget_usd=0.25\nsecond")]
        run_pipe(pipe, {"messages": messages})
        self.assertEqual(server.payload(), {"prompt": "second", "session_id": SESSION_A, "model": "opus",
                                            "effort": "low", "system_prompt": "Answer in French.",
                                            "max_budget_usd": 0.25})

    def test_refused_setting_makes_no_call(self) -> None:
        """A value the server would refuse is explained in the answer and nothing is sent."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        text, events = run_pipe(make_pipe(server), {"messages": [user("effort=extreme\nhi")]})
        self.assertEqual(text, "**Not sent:** `effort` must be one of low, medium, high, xhigh, max, not `extreme`.")
        text, _ = run_pipe(make_pipe(server, default_model="no such model"), {"messages": [user("hi")]})
        self.assertIn("`default_model valve` must be a model alias", text)
        self.assertEqual((server.requests, events), ([], []))

    def test_policy_refusal_rendered(self) -> None:
        """A 403 from the server's policy is readable text with the hint, and the status says refused."""
        body = json.dumps({"error": {"code": "model_not_allowed", "field": "model", "message":
                                     "this server does not offer the model 'opus' (--allow-model sonnet*)"}}).encode()
        server = FakeServer(status=403, body=body)
        text, events = run_pipe(make_pipe(server), {"messages": [user("model=opus\nhi")]})
        self.assertIn("(HTTP 403 model_not_allowed): this server does not offer the model 'opus'", text)
        self.assertIn("Send `model=` with a model this server offers", text)
        self.assertNotIn("session_id=", text)
        self.assertEqual(events[-1]["data"], {"description": "Refused (HTTP 403)", "done": True})

    def test_images_sent_as_blocks(self) -> None:
        """The images of the newest message become image blocks, then its text (settings removed) as a text block."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        content = [{"type": "text", "text": "model=sonnet\nWhat is in these?"}, image_part(PNG_URL),
                   image_part(data_url("image/jpeg", JPEG))]
        text, _ = run_pipe(make_pipe(server), {"messages": [user(content)]})
        self.assertEqual(server.payload(), {"prompt": [image_block("image/png", PNG), image_block("image/jpeg", JPEG),
                                                       {"type": "text", "text": "What is in these?"}],
                                            "model": "sonnet"})
        self.assertNotIn("Not sent", text)

    def test_image_alone(self) -> None:
        """A message with an image and no text sends the image alone."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        run_pipe(make_pipe(server), {"messages": [user([image_part(PNG_URL)])]})
        self.assertEqual(server.payload(), {"prompt": [image_block("image/png", PNG)]})

    def test_without_images_the_prompt_stays_a_string(self) -> None:
        """Text parts only, or images only in earlier messages (already sent with them): the prompt is a string."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        run_pipe(make_pipe(server), {"messages": [user([{"type": "text", "text": "hi"}])]})
        self.assertEqual(server.payload(), {"prompt": "hi"})
        earlier = [user([{"type": "text", "text": "look"}, image_part(PNG_URL)]),
                   assistant("A cat.\n\nsession_id=" + SESSION_A), user("and now?")]
        run_pipe(make_pipe(server), {"messages": earlier})
        self.assertEqual(server.payload(), {"prompt": "and now?", "session_id": SESSION_A})

    def test_images_not_sent_are_noted(self) -> None:
        """An attachment that cannot be sent is said in a short note first; the rest goes as usual."""
        server = FakeServer(body=sse(INIT, TEXT_AFTER, RESULT_OK))
        content = [{"type": "text", "text": "describe"}, image_part("https://example.com/cat.png"),
                   image_part(data_url("image/svg+xml", SVG))]
        text, _ = run_pipe(make_pipe(server), {"messages": [user(content)]})
        self.assertEqual(server.payload(), {"prompt": "describe"})
        self.assertTrue(text.startswith(
            "_Not sent to Claude: an image given as a link, not as data (https://example.com/cat.png); an attachment "
            "of type image/svg+xml (Claude takes PNG, JPEG, GIF and WebP images)._\n\nDone: file.txt holds hi."), text)
        self.assertTrue(text.endswith("\n\nsession_id=" + SESSION_C))

    def test_nothing_sendable(self) -> None:
        """Only an attachment that cannot be sent, and no text: the note and nothing sent."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        text, _ = run_pipe(make_pipe(server), {"messages": [user([image_part(data_url("image/svg+xml", SVG))])]})
        self.assertEqual(text, "_Not sent to Claude: an attachment of type image/svg+xml (Claude takes PNG, JPEG, GIF "
                               "and WebP images)._\n\nThere is nothing to send: the message has no text.")
        self.assertEqual(server.requests, [])

    def test_thinking_streamed_in_reasoning_block(self) -> None:
        """Thinking comes in Open WebUI's reasoning block, lasting the time since the event before it; the text
        around it streams as before, in the same pieces, and the marker still ends the answer."""
        times = itertools.chain([100.0, 100.2, 112.9], itertools.count(113.0, 0.1))
        self.patch(pipe_module, "clock", lambda: next(times))
        server = FakeServer(body=sse(INIT, THINKING, TEXT_BEFORE, TOOL_USE, TOOL_RESULT, TEXT_AFTER, RESULT_OK))
        pieces: list[str] = []

        async def collect() -> None:
            async for piece in make_pipe(server).pipe({"messages": [user("write hi")]}):
                pieces.append(piece)

        run_async(collect())
        text = "".join(pieces)
        self.assertEqual(pieces[0], '<details type="reasoning" done="true" duration="12">\n'
                                    "<summary>Thought for 12 seconds</summary>\n"
                                    "&gt; The user wants hi in file.txt.\n&gt; Use Bash.\n</details>")
        self.assertEqual(pieces[1], "\n\nI will use Bash.")
        self.assertTrue(pieces[2].startswith("\n\n<details>\n<summary>Tool: Bash"), pieces[2])
        self.assertEqual(pieces[-2:], ["\n\nDone: file.txt holds hi.", "\n\nsession_id=" + SESSION_C])
        self.assertEqual(pipe_module.find_session_id([assistant(text)]), SESSION_C)
        without, _ = run_pipe(make_pipe(FakeServer(body=sse(INIT, THINKING, TEXT_AFTER, RESULT_OK)),
                                        show_thinking=False), {"messages": [user("hi")]})
        self.assertEqual(without, "Done: file.txt holds hi.\n\nsession_id=" + SESSION_C)


class StopTests(SynchronousTestCase):
    def start(self) -> tuple[FakeServer, Any, list[dict[str, Any]], Callable[[dict[str, Any]], Any]]:
        server = FakeServer(chunks=[sse(INIT, TEXT_BEFORE)], hang=True)
        events: list[dict[str, Any]] = []

        async def emitter(event: dict[str, Any]) -> None:
            events.append(event)

        return server, make_pipe(server), events, emitter

    def test_aclose_closes_stream(self) -> None:
        """Closing the generator mid-run (Open WebUI's Stop) closes the HTTP stream and the status."""
        server, pipe, events, emitter = self.start()

        async def scenario() -> str:
            answer = pipe.pipe({"messages": [user("hi")]}, __chat_id__="c", __event_emitter__=emitter)
            first = str(await answer.__anext__())
            await answer.aclose()
            return first

        self.assertEqual(run_async(scenario()), "I will use Bash.")
        self.assertTrue(server.stream.closed)
        self.assertEqual(events[-1]["data"], {"description": "Stopped", "done": True})
        self.assertEqual(pipe.chat_sessions, {"c": SESSION_C})

    def test_cancel_propagates_and_closes_stream(self) -> None:
        """Cancelling the task reading the pipe closes the stream and the CancelledError is not swallowed."""
        server, pipe, events, emitter = self.start()
        pieces: list[str] = []

        async def consume() -> None:
            async for piece in pipe.pipe({"messages": [user("hi")]}, __event_emitter__=emitter):
                pieces.append(piece)

        async def scenario() -> bool:
            task = asyncio.ensure_future(consume())
            while not pieces:
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        self.assertTrue(run_async(scenario()))
        self.assertEqual(pieces, ["I will use Bash."])
        self.assertTrue(server.stream.closed)
        self.assertEqual(events[-1]["data"]["done"], True)


# --------------------------------------------------------------------------- approvals

REQUEST_ID = "0123456789abcdef0123456789abcdef"
REQUEST_ID_2 = "fedcba9876543210fedcba9876543210"
BASH_REQUEST = {"type": "claudesrv", "subtype": "permission_request", "request_id": REQUEST_ID, "tool_name": "Bash",
                "input": {"command": "echo hi > file.txt", "description": "Write hi to file.txt"},
                "tool_use_id": "toolu_1", "description": "Write hi to file.txt", "suggestions": [],
                "expires_at": "2026-12-02T04:10:00Z"}
QUESTION = {"question": "Which format?", "header": "Format",
            "options": [{"label": "Summary", "description": "a short summary"},
                        {"label": "Detailed", "description": "a long answer"}],
            "multiSelect": False}
ASK_REQUEST = {"type": "claudesrv", "subtype": "permission_request", "request_id": REQUEST_ID,
               "tool_name": "AskUserQuestion", "input": {"questions": [QUESTION]}, "tool_use_id": "toolu_2",
               "questions": [QUESTION], "expires_at": "2026-12-02T04:10:00Z"}
ANSWER_PATH = re.compile(r"/api/sessions/([^/]+)/permissions/([^/]+)")

HANG = object()  # a dialog closed without a button (Escape, a click beside it): Open WebUI never answers


class Dialogs:
    """
    An ``__event_call__``: records every dialog and gives the next of its answers (an exception is
    raised, HANG never answers); with no answers left it gives None.
    """

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []
        self.server: ApprovalServer | None = None
        self.answers_posted: list[int] = []  # how many answers the server had when each dialog opened

    async def __call__(self, event: dict[str, Any]) -> Any:
        self.calls.append(event)
        if self.server is not None:
            self.answers_posted.append(len(self.server.answers))
        answer = self.answers.pop(0) if self.answers else None
        if answer is HANG:
            await asyncio.Event().wait()
        if isinstance(answer, BaseException):
            raise answer
        return answer


class ScriptStream(httpx.AsyncByteStream):
    """A response body produced by an async generator as it goes."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


class ApprovalServer:
    """
    A claudesrv asked for approvals: its turn sends a tool call and the given permission requests (all at
    once), then, for each in turn, waits for its answer and says how it was resolved, then ends. An answer
    refused with C{answer_status} (409: too late), or a request of C{expire}, is resolved as timed out; a
    request to expire is resolved once its dialog is open, without waiting for an answer.
    """

    def __init__(self, *requests: dict[str, Any], answer_status: int = 200, expire: bool = False,
                 dialogs: Dialogs | None = None) -> None:
        self.permission_requests = requests or (BASH_REQUEST,)
        self.answer_status = answer_status
        self.expire = expire
        self.dialogs = dialogs
        self.requests: list[httpx.Request] = []
        self.answers: list[tuple[str, str, dict[str, Any]]] = []  # session, request id, body
        self.answered: dict[str, asyncio.Event] = {}
        self.stream: ScriptStream | None = None

    async def script(self) -> AsyncIterator[bytes]:
        yield b": keepalive\n\n" + sse(INIT, TOOL_USE, *self.permission_requests)
        for index, request in enumerate(self.permission_requests):
            request_id = request["request_id"]
            if self.expire:
                assert self.dialogs is not None
                while len(self.dialogs.calls) <= index:
                    await asyncio.sleep(0.001)
                behavior, by = "deny", "timeout"
            else:
                await self.answered.setdefault(request_id, asyncio.Event()).wait()
                body = next(body for _, rid, body in self.answers if rid == request_id)
                behavior, by = (body["behavior"], "client") if self.answer_status == 200 else ("deny", "timeout")
            yield b": keepalive\n\n"
            yield sse({"type": "claudesrv", "subtype": "permission_resolved", "request_id": request_id,
                       "tool_name": request["tool_name"], "behavior": behavior, "by": by})
        yield sse(TOOL_RESULT, TEXT_AFTER, RESULT_OK)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/api/claude":
            self.stream = ScriptStream(self.script())
            return httpx.Response(200, headers={"Content-Type": "text/event-stream", "X-Session-Id": SESSION_C},
                                  stream=self.stream)
        answer = ANSWER_PATH.fullmatch(request.url.path)
        if request.method == "POST" and answer is not None:
            session_id, request_id = answer.groups()
            self.answers.append((session_id, request_id, json.loads(request.content)))
            self.answered.setdefault(request_id, asyncio.Event()).set()
            if self.answer_status == 409:
                return httpx.Response(409, json={"error": {"code": "already_resolved",
                                                           "message": "the request was already resolved"}})
            if self.answer_status != 200:
                return httpx.Response(self.answer_status, json={"error": {"code": "x", "message": "no"}})
            return httpx.Response(200, json={"request_id": request_id, "session_id": session_id, "by": "client",
                                             "tool_name": "Bash", "behavior": json.loads(request.content)["behavior"]})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such route"}})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def payload(self) -> Any:
        return json.loads(self.requests[0].content)

    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, _, body in self.answers]


def run_with_dialogs(server: ApprovalServer, dialogs: Dialogs | None, message: str = "write hi to file.txt",
                     **valve_values: Any) -> tuple[str, list[str]]:
    """The pipe's answer with the approvals valve on, and its status lines; it must end within 10 s."""
    pipe = make_pipe(None, **{"approvals": True, **valve_values})
    pipe.transport = server.transport()
    events: list[dict[str, Any]] = []

    async def emitter(event: dict[str, Any]) -> None:
        events.append(event)

    async def collect() -> str:
        answer = pipe.pipe({"messages": [user(message)]}, __event_emitter__=emitter, __event_call__=dialogs)
        return "".join([piece async for piece in answer])

    async def bounded() -> str:
        return await asyncio.wait_for(collect(), 10)

    text = run_async(bounded())
    return text, [str(e["data"]["description"]) for e in events]


class ApprovalDialogTests(SynchronousTestCase):
    """What the dialogs say and how typed answers are read."""

    def test_bash_shows_command_and_description(self) -> None:
        """A Bash request shows its command in a code block, then its description as escaped plain text."""
        text = pipe_module.describe_tool_request(BASH_REQUEST)
        self.assertEqual(text, "Claude wants to run:\n\n```sh\necho hi > file.txt\n```\n\n"
                               "Claude says: Write hi to file\\.txt")

    def test_description_cannot_pose_as_the_command(self) -> None:
        """Markdown in the description (a code block of a harmless command) stays inert text after the real one."""
        event = {**BASH_REQUEST, "input": {"command": "rm -rf ~", "description": "```sh\nls\n```"}}
        text = pipe_module.describe_tool_request(event)
        self.assertTrue(text.startswith("Claude wants to run:\n\n```sh\nrm -rf ~\n```"), text)
        self.assertEqual(text.count("```"), 2)

    def test_long_command_cut(self) -> None:
        """A very long command, or one of many lines, is cut, saying how much was left out."""
        event = {**BASH_REQUEST, "input": {"command": "x" * 5000}, "description": ""}
        text = pipe_module.describe_tool_request(event)
        self.assertIn("(3800 more characters)", text)
        self.assertLess(len(text), 1400)
        event = {**BASH_REQUEST, "input": {"command": "echo\n" * 40}, "description": ""}
        text = pipe_module.describe_tool_request(event)
        self.assertEqual(text.count("echo"), 25)
        self.assertIn("(76 more characters)", text)

    def test_write_shows_path_and_head_of_content(self) -> None:
        """A Write request shows the file and the first lines of its content."""
        content = "".join(f"line {i}\n" for i in range(100))
        event = {"tool_name": "Write", "input": {"file_path": "/w/notes.md", "content": content},
                 "description": "Write"}
        text = pipe_module.describe_tool_request(event)
        self.assertTrue(text.startswith("Claude wants to write `/w/notes.md`"), text)
        self.assertIn("line 0\nline 1\n", text)
        self.assertIn("line 11\n…", text)
        self.assertNotIn("line 12", text)
        self.assertIn("more characters)", text)

    def test_edit_shows_old_and_new_text(self) -> None:
        """An Edit request shows the file, the text replaced and the new text."""
        event = {"tool_name": "Edit", "input": {"file_path": "a.py", "old_string": "x = 1", "new_string": "x = 2"}}
        text = pipe_module.describe_tool_request(event)
        self.assertIn("Claude wants to edit `a.py`", text)
        self.assertIn("Replacing:\n\n```\nx = 1\n```", text)
        self.assertIn("With:\n\n```\nx = 2\n```", text)

    def test_other_tools_compact_json_cut(self) -> None:
        """Any other tool shows its input as compact JSON, cut to a sane length."""
        event = {"tool_name": "WebFetch", "input": {"url": "https://example.com", "prompt": "p" * 3000}}
        text = pipe_module.describe_tool_request(event)
        self.assertIn('```json\n{"url":"https://example.com","prompt":"ppp', text)
        self.assertIn("more characters)", text)
        self.assertLess(len(text), 1400)
        self.assertIn("```json\n{}\n```", pipe_module.describe_tool_request({"tool_name": "X", "input": None}))

    def test_question_dialog(self) -> None:
        """A question becomes an input dialog: header as title, the question and its options numbered."""
        dialog = pipe_module.question_dialog(QUESTION)
        self.assertEqual(dialog["type"], "input")
        self.assertEqual(dialog["data"]["title"], "Format")
        self.assertEqual(dialog["data"]["message"],
                         "Which format?\n\n1. **Summary**: a short summary\n2. **Detailed**: a long answer")
        self.assertIn("1-2", dialog["data"]["placeholder"])
        self.assertEqual(pipe_module.question_dialog({"question": "Why?"})["data"]["title"], "Claude asks")

    def test_typed_answers_matched_to_options(self) -> None:
        """An option's number or label (any case) gives its label; other text is kept as typed."""
        match = pipe_module.match_answer
        self.assertEqual(match(" 2 ", QUESTION), "Detailed")
        self.assertEqual(match("summary", QUESTION), "Summary")
        self.assertEqual(match("3", QUESTION), "3")
        self.assertEqual(match("Something else, please", QUESTION), "Something else, please")
        multi = {**QUESTION, "multiSelect": True}
        self.assertEqual(match("1, detailed", multi), "Summary, Detailed")
        self.assertEqual(match("1, and more", multi), "1, and more")

    def test_input_dialog_values(self) -> None:
        """Only typed text is an answer: Open WebUI gives True for an empty confirmed input, False for Cancel."""
        self.assertEqual(pipe_module.typed_answer("Detailed"), "Detailed")
        for value in (True, False, None, "", "  ", {"x": 1}):
            self.assertIsNone(pipe_module.typed_answer(value), value)

    def test_status_lines(self) -> None:
        """Requests and resolutions become status lines naming the tool and, unless the user decided, why."""
        status = pipe_module.status_for_event
        self.assertEqual(status(BASH_REQUEST), "Waiting for your approval: Bash")
        self.assertEqual(status(ASK_REQUEST), "Claude asks you a question")
        resolved = {"type": "claudesrv", "subtype": "permission_resolved", "tool_name": "Bash"}
        self.assertEqual(status({**resolved, "behavior": "allow", "by": "client"}), "Allowed Bash")
        self.assertEqual(status({**resolved, "behavior": "deny", "by": "timeout"}), "Denied Bash (timeout)")
        self.assertEqual(status({**resolved, "behavior": "allow", "by": "remembered"}), "Allowed Bash (remembered)")
        self.assertEqual(status({**resolved, "tool_name": "AskUserQuestion", "behavior": "allow", "by": "client"}),
                         "Question answered")
        self.assertEqual(pipe_module.render_event(BASH_REQUEST, valves()), "")


class ApprovalTests(SynchronousTestCase):
    """The pipe with the approvals valve on, against a server that asks."""

    def test_confirmed_is_allowed(self) -> None:
        """A confirmed dialog posts allow to the request's route (with the token), the turn goes on to its end,
        and the status lines tell the request and its resolution."""
        dialogs = Dialogs(True)
        server = ApprovalServer()
        text, statuses = run_with_dialogs(server, dialogs, api_token="s3cret")
        self.assertEqual(server.payload(), {"prompt": "write hi to file.txt", "approvals": True})
        [dialog] = dialogs.calls
        self.assertEqual(dialog["type"], "confirmation")
        self.assertEqual(dialog["data"]["title"], "Allow Bash?")
        self.assertIn("echo hi > file.txt", dialog["data"]["message"])
        self.assertEqual(server.answers, [(SESSION_C, REQUEST_ID, {"behavior": "allow"})])
        answer = server.requests[1]
        self.assertEqual(answer.headers["Authorization"], "Bearer s3cret")
        self.assertEqual(answer.headers["Content-Type"], "application/json")
        self.assertIn("Done: file.txt holds hi.", text)
        self.assertTrue(text.endswith("session_id=" + SESSION_C))
        self.assertIn("Waiting for your approval: Bash", statuses)
        self.assertIn("Allowed Bash", statuses)
        self.assertTrue(statuses[-1].startswith("Done"), statuses)

    def test_cancelled_is_denied(self) -> None:
        """Cancel (False), or no value at all, posts a deny saying the user declined in Open WebUI."""
        for value in (False, None):
            server = ApprovalServer()
            _, statuses = run_with_dialogs(server, Dialogs(value))
            self.assertEqual(server.bodies(),
                             [{"behavior": "deny", "message": "The user declined this tool use in Open WebUI."}])
            self.assertIn("Denied Bash", statuses)

    def test_failed_dialog_is_denied(self) -> None:
        """A dialog that fails (Open WebUI's wait for the browser timed out) posts a deny."""
        server = ApprovalServer()
        text, _ = run_with_dialogs(server, Dialogs(TimeoutError()))
        [body] = server.bodies()
        self.assertEqual(body["behavior"], "deny")
        self.assertIn("declined", body["message"])
        self.assertIn("TimeoutError", body["message"])
        self.assertIn("Done: file.txt holds hi.", text)

    def test_closed_dialog_ends_with_server_timeout(self) -> None:
        """A dialog closed without a button never answers: when the server times the request out, the pipe
        stops waiting for it, posts nothing, shows the denial and reads the turn to its end."""
        dialogs = Dialogs(HANG)
        server = ApprovalServer(expire=True, dialogs=dialogs)
        text, statuses = run_with_dialogs(server, dialogs)
        self.assertEqual(len(dialogs.calls), 1)
        self.assertEqual(server.answers, [])
        self.assertIn("Denied Bash (timeout)", statuses)
        self.assertIn("Done: file.txt holds hi.", text)
        self.assertTrue(statuses[-1].startswith("Done"), statuses)

    def test_too_late(self) -> None:
        """An answer the server refuses with 409 (already resolved) is reported as too late, and the stream is
        read on to the end."""
        server = ApprovalServer(answer_status=409)
        text, statuses = run_with_dialogs(server, Dialogs(True))
        self.assertEqual(server.bodies(), [{"behavior": "allow"}])
        self.assertIn("Too late to answer for Bash: the request had already ended", statuses)
        self.assertIn("Denied Bash (timeout)", statuses)
        self.assertIn("Done: file.txt holds hi.", text)
        self.assertTrue(statuses[-1].startswith("Done"), statuses)

    def test_answer_refused(self) -> None:
        """Another refusal of the answer is a status line; the pipe does not fail."""
        server = ApprovalServer(answer_status=500)
        text, statuses = run_with_dialogs(server, Dialogs(True))
        self.assertIn("Could not send your answer for Bash (HTTP 500)", statuses)
        self.assertIn("Done: file.txt holds hi.", text)

    def test_question_answered(self) -> None:
        """An AskUserQuestion is an input dialog; the typed text, an option's label or its number, is posted
        as the answer to that question's text, the number as its label."""
        for typed, expected in (("Detailed", "Detailed"), ("2", "Detailed"), ("summary", "Summary"),
                                ("JSON, please", "JSON, please")):
            dialogs = Dialogs(typed)
            server = ApprovalServer(ASK_REQUEST)
            _, statuses = run_with_dialogs(server, dialogs)
            [dialog] = dialogs.calls
            self.assertEqual(dialog["type"], "input")
            self.assertEqual(dialog["data"]["title"], "Format")
            self.assertIn("2. **Detailed**", dialog["data"]["message"])
            self.assertEqual(server.bodies(), [{"behavior": "allow", "answers": {"Which format?": expected}}])
            self.assertIn("Claude asks you a question", statuses)
            self.assertIn("Question answered", statuses)

    def test_question_not_answered(self) -> None:
        """An input dialog cancelled (False), confirmed empty (True), or failing denies the question."""
        for value in (False, True, "   ", RuntimeError("socket gone")):
            server = ApprovalServer(ASK_REQUEST)
            _, statuses = run_with_dialogs(server, Dialogs(value))
            self.assertEqual(server.bodies(),
                             [{"behavior": "deny", "message": "The user did not answer the question in Open WebUI."}])
            self.assertIn("Question not answered", statuses)

    def test_several_questions(self) -> None:
        """One input dialog per question, all answers in one post; one unanswered question denies them all."""
        second = {"question": "Which language?", "header": "", "options": [], "multiSelect": False}
        request = {**ASK_REQUEST, "questions": [QUESTION, second], "input": {"questions": [QUESTION, second]}}
        dialogs = Dialogs("1", "French")
        server = ApprovalServer(request)
        run_with_dialogs(server, dialogs)
        self.assertEqual([d["data"]["title"] for d in dialogs.calls], ["Format", "Claude asks"])
        self.assertEqual(server.bodies(),
                         [{"behavior": "allow", "answers": {"Which format?": "Summary", "Which language?": "French"}}])
        server = ApprovalServer(request)
        run_with_dialogs(server, Dialogs("1", False))
        self.assertEqual(server.bodies()[0]["behavior"], "deny")

    def test_dialogs_take_turns(self) -> None:
        """Two requests at once (two tool calls): Open WebUI shows one dialog at a time, so the second opens
        only after the first was answered; each gets its own answer."""
        second = {**BASH_REQUEST, "request_id": REQUEST_ID_2, "input": {"command": "ls"}}
        dialogs = Dialogs(True, False)
        server = ApprovalServer(BASH_REQUEST, second)
        dialogs.server = server
        text, statuses = run_with_dialogs(server, dialogs)
        self.assertEqual(dialogs.answers_posted, [0, 1])
        self.assertEqual([(rid, body["behavior"]) for _, rid, body in server.answers],
                         [(REQUEST_ID, "allow"), (REQUEST_ID_2, "deny")])
        self.assertIn("Allowed Bash", statuses)
        self.assertIn("Denied Bash", statuses)
        self.assertIn("Done: file.txt holds hi.", text)

    def test_valve_off_sends_no_approvals(self) -> None:
        """With the valve off (the default) the request has no approvals field, even with dialogs available."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        run_pipe(make_pipe(server), {"messages": [user("hi")]}, __event_call__=Dialogs())
        self.assertEqual(server.payload(), {"prompt": "hi"})
        self.assertFalse(pipe_module.Pipe().valves.approvals)

    def test_no_dialogs_sends_no_approvals(self) -> None:
        """With the valve on but no __event_call__ (not a browser chat) nobody can be asked: no approvals field,
        so the server denies such tools itself."""
        server = FakeServer(body=sse(INIT, RESULT_OK))
        run_pipe(make_pipe(server, approvals=True), {"messages": [user("hi")]})
        self.assertEqual(server.payload(), {"prompt": "hi"})

    def test_request_without_dialogs_denied(self) -> None:
        """A request that comes anyway when there are no dialogs is denied at once."""
        server = ApprovalServer()
        text, statuses = run_with_dialogs(server, None)
        [body] = server.bodies()
        self.assertEqual(body["behavior"], "deny")
        self.assertIn("could not show a dialog", body["message"])
        self.assertIn("Done: file.txt holds hi.", text)

    def test_stop_while_dialog_open(self) -> None:
        """Open WebUI's Stop (cancelling the task that reads the pipe) while a dialog is open closes the stream
        and ends the dialog's wait: nothing is posted, no task is left behind, the status says Stopped."""
        dialogs = Dialogs(HANG)
        server = ApprovalServer()
        pipe = make_pipe(None, approvals=True)
        pipe.transport = server.transport()
        events: list[dict[str, Any]] = []

        async def emitter(event: dict[str, Any]) -> None:
            events.append(event)

        async def consume() -> None:
            async for _ in pipe.pipe({"messages": [user("hi")]}, __event_emitter__=emitter, __event_call__=dialogs):
                pass

        async def scenario() -> None:
            before = asyncio.all_tasks()  # this one, and the one bounding it
            task = asyncio.ensure_future(consume())
            for _ in range(10_000):
                if dialogs.calls:
                    break
                await asyncio.sleep(0.001)
            self.assertEqual(len(dialogs.calls), 1)
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            self.assertEqual(asyncio.all_tasks() - before, set())

        run_async(scenario())
        self.assertEqual(server.answers, [])
        assert server.stream is not None
        self.assertTrue(server.stream.closed)
        self.assertEqual(events[-1]["data"], {"description": "Stopped", "done": True})


# --------------------------------------------------------------------------- files: attachments in, changed files out


WORKSPACE = "/srv/claudesrv/Workspace/11111111"
INIT_CWD = {**INIT, "cwd": WORKSPACE}


def edit_call(tool_id: str, name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "assistant", "session_id": SESSION_C,
            "message": {"content": [{"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}]}}


def tool_result(tool_id: str, is_error: bool = False) -> dict[str, Any]:
    return {"type": "user", "session_id": SESSION_C,
            "message": {"content": [{"type": "tool_result", "tool_use_id": tool_id, "content": "ok",
                                     "is_error": is_error}]}}


WRITE_RUN = (INIT_CWD, edit_call("toolu_w", "Write", {"file_path": f"{WORKSPACE}/file.txt", "content": "hi\n"}),
             tool_result("toolu_w"), TEXT_AFTER, RESULT_OK)


class FakeOpenWebUI:
    """
    Open WebUI's file table and storage as the pipe finds them inside Open WebUI: modules already loaded in
    sys.modules (removed again when the test ends). ``add`` stores a file as an upload does and gives the
    attachment as the browser sends it (Open WebUI 0.12.4: the upload's answer under "file").
    """

    def __init__(self, test: Any) -> None:
        self.folder = Path(test.mktemp())
        self.folder.mkdir()
        self.records: dict[str, Any] = {}
        self.fetched: list[str] = []
        files_module = types.ModuleType("open_webui.models.files")
        files_module.__dict__["Files"] = self
        storage_module = types.ModuleType("open_webui.storage.provider")
        storage_module.__dict__["Storage"] = types.SimpleNamespace(get_file=self.get_file)
        for module in (files_module, storage_module):
            sys.modules[module.__name__] = module
            test.addCleanup(sys.modules.pop, module.__name__, None)

    def add(self, name: str, data: bytes, content_type: str = "text/plain", owner: str = "user-1",
            file_id: str | None = None) -> dict[str, Any]:
        file_id = file_id or str(uuid.uuid4())
        path = self.folder / f"{file_id}_{name.replace('/', '_')}"
        path.write_bytes(data)
        self.records[file_id] = types.SimpleNamespace(id=file_id, user_id=owner, filename=name, path=str(path))
        return {"type": "file", "id": file_id, "url": file_id, "name": name, "content_type": content_type,
                "status": "uploaded", "size": len(data), "collection_name": "", "itemId": str(uuid.uuid4()),
                "file": {"id": file_id, "user_id": owner, "filename": name, "path": str(path),
                         "meta": {"name": name, "content_type": content_type, "size": len(data)},
                         "data": {"status": "pending"}, "status": True}}

    async def get_file_by_id(self, file_id: str) -> Any:
        return self.records.get(file_id)

    def get_file(self, path: str) -> str:
        self.fetched.append(path)
        return path


USER = {"id": "user-1", "role": "user", "name": "Ann"}


def with_files(*files: dict[str, Any], text: str = "look at this") -> dict[str, Any]:
    """Open WebUI's __metadata__ for a message with these attachments."""
    return {"chat_id": "chat-f", "user_message": {"id": "m1", "role": "user", "content": text, "files": list(files)}}


class FilesServer:
    """A claudesrv whose file uploads answer C{put_status} and whose turns stream C{events}; records requests."""

    def __init__(self, *events: dict[str, Any], put_status: int = 201) -> None:
        self.events = events or (INIT_CWD, TEXT_AFTER, RESULT_OK)
        self.put_status = put_status
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "PUT":
            if self.put_status == 201:
                return httpx.Response(201, json={"path": request.url.path, "size": len(request.content)})
            return httpx.Response(self.put_status, json={"error": {"code": "session_busy", "message": "busy"}})
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=sse(*self.events))

    def puts(self) -> list[tuple[str, bytes]]:
        return [(request.url.raw_path.decode(), request.content)
                for request in self.requests if request.method == "PUT"]

    def payloads(self) -> list[Any]:
        return [json.loads(request.content) for request in self.requests if request.method == "POST"]


def run_files(server: FilesServer, messages: list[dict[str, Any]], metadata: dict[str, Any] | None = None,
              files: list[dict[str, Any]] | None = None, **valve_values: Any) -> tuple[str, list[str]]:
    pipe = make_pipe(None, **valve_values)
    pipe.transport = httpx.MockTransport(server.handle)
    text, events = run_pipe(pipe, {"messages": messages}, __user__=USER, __metadata__=metadata, __files__=files)
    return text, [str(e["data"]["description"]) for e in events]


RESUMED = [user("hello"), assistant("Hi.\n\nsession_id=" + SESSION_A)]


class AttachmentUnitTests(SynchronousTestCase):
    """Which attachments count, the names they get, and how their bytes are had."""

    def test_safe_names(self) -> None:
        """The last part of the name, a limited set of characters, no leading dot or dash, at most 100 characters
        with the extension kept, never the same twice (ignoring case)."""
        taken: set[str] = set()
        names = [pipe_module.safe_name(name, taken) for name in (
            "notes.txt", "Notes.TXT", "../../etc/passwd", "C:\\Users\\ann\\report final (2).pdf", ".bashrc",
            "-rf", "...", "résumé.md", "a" * 300 + ".tar", "x." + "y" * 40, "notes.txt")]
        self.assertEqual(names, ["notes.txt", "Notes-2.TXT", "passwd", "report_final_2_.pdf", "bashrc", "rf", "file",
                                 "r_sum_.md", "a" * 96 + ".tar", "x." + "y" * 40, "notes-3.txt"])
        for name in names:
            self.assertRegex(name, r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,99}\Z")

    def test_which_attachments(self) -> None:
        """The newest message's own files (Open WebUI's user_message), once each; raster images (sent as image
        blocks) and things that are no files are left out; SVG is a file. Without user_message, __files__."""
        text_file = {"type": "file", "id": "f1", "name": "a.txt", "content_type": "text/plain"}
        items: list[dict[str, Any]] = [
            text_file, dict(text_file),
            {"type": "file", "id": "f2", "name": "cat.png", "content_type": "image/png"},
            {"type": "file", "id": "f3", "name": "cat.jpg", "file": {"meta": {"content_type": "image/jpeg"}}},
            {"type": "file", "id": "f4", "name": "logo.svg", "content_type": "image/svg+xml"},
            {"type": "image", "url": PNG_URL}, {"type": "collection", "id": "kb"}, {"type": "note", "id": "n"},
            {"type": "web_search", "name": "q"}, {"type": "text", "name": "tmp.md", "content": "x", "id": "t"}]
        found = pipe_module.attachment_items(with_files(*items), [{"type": "file", "id": "old"}])
        self.assertEqual([item["id"] for item in found], ["f1", "f4", "t"])
        self.assertEqual([i["id"] for i in pipe_module.attachment_items({}, [text_file])], ["f1"])
        self.assertEqual(pipe_module.attachment_items({"user_message": {"content": "hi"}}, [text_file]), [])
        self.assertEqual(pipe_module.attachment_items(None, None), [])

    def test_read_through_open_webui(self) -> None:
        """An upload is read from the path in Open WebUI's own file table, through its storage, when it is the
        user's (or the user is an admin); the path the browser sent is never used."""
        owui = FakeOpenWebUI(self)
        item = owui.add("notes.txt", b"my notes\n")
        self.assertEqual(run_async(pipe_module.read_attachment(item, USER)), (b"my notes\n", ""))
        self.assertEqual(owui.fetched, [item["file"]["path"]])
        forged = {**item, "file": {**item["file"], "path": "/etc/passwd"}}
        self.assertEqual(run_async(pipe_module.read_attachment(forged, USER)), (b"my notes\n", ""))
        theirs = owui.add("secret.txt", b"secret", owner="user-2")
        self.assertEqual(run_async(pipe_module.read_attachment(theirs, USER)),
                         (None, "not a file of yours in Open WebUI"))
        self.assertEqual(run_async(pipe_module.read_attachment(theirs, {"id": "admin-1", "role": "admin"})),
                         (b"secret", ""))
        self.assertEqual(run_async(pipe_module.read_attachment(theirs, None))[1], "not a file of yours in Open WebUI")
        unknown = {**item, "id": "no-such-id"}
        self.assertEqual(run_async(pipe_module.read_attachment(unknown, USER))[1], "not a file of yours in Open WebUI")
        self.assertEqual(run_async(pipe_module.read_attachment({"type": "file", "id": None}, USER))[1],
                         "an upload Open WebUI had not finished")
        self.patch(pipe_module, "MAX_ATTACHMENT_BYTES", 4)
        self.assertEqual(run_async(pipe_module.read_attachment(item, USER)), (None, str(pipe_module.TooLarge())))
        Path(owui.records[item["id"]].path).unlink()
        self.patch(pipe_module, "MAX_ATTACHMENT_BYTES", 1024)
        self.assertEqual(run_async(pipe_module.read_attachment(item, USER)),
                         (None, "Open WebUI could not give its content (FileNotFoundError)"))

    def test_outside_open_webui(self) -> None:
        """Outside Open WebUI (no file table loaded) an upload cannot be read; a temporary chat's file is its
        text."""
        item = {"type": "file", "id": "f1", "name": "a.txt", "file": {"path": str(PIPE_PATH)}}
        self.assertEqual(run_async(pipe_module.read_attachment(item, USER)),
                         (None, "Open WebUI's file store is not reachable from this pipe"))
        self.assertEqual(run_async(pipe_module.read_attachment({"type": "text", "content": "é"}, USER)),
                         ("é".encode(), ""))

    def test_inline_for_a_new_session(self) -> None:
        """A new session's text files go into its prompt in fences longer than any backticks inside; binary
        files and text past the limit are left out."""
        Attachment = pipe_module.Attachment
        prompt, left_out = pipe_module.inline_attachments("Summarise.", [
            Attachment("a.md", b"# Title\n```sh\nls\n```\n"), Attachment("b.bin", b"\x00\x01"),
            Attachment("c.pdf", b"%PDF-\xe2\x28\xa1"), Attachment("d.txt", b"x" * 100_001)])
        self.assertEqual(prompt, "Summarise.\n\nAttached file a.md:\n````\n# Title\n```sh\nls\n```\n````")
        self.assertEqual(left_out, ["b.bin", "c.pdf", "d.txt"])
        self.assertEqual(pipe_module.inline_attachments("", [Attachment("e.txt", b"hi")]),
                         ("Attached file e.txt:\n```\nhi\n```", []))


class ChangedFilesTests(SynchronousTestCase):
    """The files Claude wrote or edited in a turn, relative to the session's folder, and their links."""

    def test_only_edits_that_worked_inside_the_folder(self) -> None:
        """Write, Edit, MultiEdit and NotebookEdit calls whose result is no error count, once each, in order;
        Bash, failed or unanswered calls and paths outside the folder do not."""
        changed = pipe_module.ChangedFiles()
        events = [
            INIT_CWD,
            edit_call("t1", "Write", {"file_path": f"{WORKSPACE}/src/new file.py"}),
            edit_call("t2", "Edit", {"file_path": f"{WORKSPACE}/README.md"}),
            edit_call("t3", "MultiEdit", {"file_path": "/etc/hosts"}),
            edit_call("t4", "NotebookEdit", {"notebook_path": f"{WORKSPACE}/nb/a.ipynb"}),
            edit_call("t5", "Bash", {"command": "echo hi > bash.txt"}),
            edit_call("t6", "Write", {"file_path": f"{WORKSPACE}/never.txt"}),
            edit_call("t7", "Edit", {"file_path": f"{WORKSPACE}/src/../README.md"}),
            edit_call("t8", "Write", {"file_path": f"{WORKSPACE}x/sibling.txt"}),
            tool_result("t1"), tool_result("t2", is_error=True), tool_result("t3"), tool_result("t4"),
            tool_result("t5"), tool_result("t7"), tool_result("t8"), tool_result("t1"),
        ]
        for event in events:
            changed.see(event)
        self.assertEqual(changed.relative(), ["src/new file.py", "nb/a.ipynb", "README.md"])
        without_init = pipe_module.ChangedFiles()
        for event in events[1:]:
            without_init.see(event)
        self.assertEqual(without_init.relative(), [])

    def test_workspace_path(self) -> None:
        """Paths are made relative to the folder; the folder itself and anything outside it are None."""
        relative = pipe_module.workspace_path
        self.assertEqual(relative("/w/a/../b.txt", "/w/"), "b.txt")
        self.assertEqual(relative("sub/c.txt", "/w"), "sub/c.txt")
        for path in ("/w", "/w/", "/wx/a", "../x", "/w/../etc/passwd", ""):
            self.assertIsNone(relative(path, "/w"), path)
        self.assertEqual(relative("/etc/hosts", "/"), "etc/hosts")

    def test_links(self) -> None:
        """Each file a link to claudesrv's download route, its path URL-quoted and shown as code; with a token,
        a note that a browser alone gets 401."""
        text = pipe_module.render_file_links(["src/a b#1?.py", "ü.txt", "`x`"], "http://h:3000/", SESSION_C, False)
        base = f"http://h:3000/api/sessions/{SESSION_C}/files/"
        self.assertEqual(text, "**Files changed:**\n"
                               f"- [`src/a b#1?.py`]({base}src/a%20b%231%3F.py)\n"
                               f"- [`ü.txt`]({base}%C3%BC.txt)\n"
                               f"- [`` `x` ``]({base}%60x%60)")
        self.assertIn("gets 401", pipe_module.render_file_links(["a"], "http://h", SESSION_C, True))


class PipeFilesTests(SynchronousTestCase):
    """Attachments and changed files through the whole pipe against a fake server."""

    def test_resumed_session_gets_the_files(self) -> None:
        """A resumed session's attachments are put under uploads/ (raw bytes, the token, octet-stream) before
        the turn, and the prompt names them; the image goes as an image block, not as a file."""
        owui = FakeOpenWebUI(self)
        notes = owui.add("my notes.txt", b"line 1\n")
        data = owui.add("data.bin", b"\x00\xff")
        image = owui.add("cat.png", PNG, content_type="image/png")
        server = FilesServer()
        messages = [*RESUMED, user([{"type": "text", "text": "look at this"}, image_part(PNG_URL)])]
        text, statuses = run_files(server, messages, with_files(notes, data, image), api_token="tok")
        self.assertEqual(server.puts(), [(f"/api/sessions/{SESSION_A}/files/uploads/my_notes.txt", b"line 1\n"),
                                         (f"/api/sessions/{SESSION_A}/files/uploads/data.bin", b"\x00\xff")])
        for request in server.requests:
            self.assertEqual(request.headers["Authorization"], "Bearer tok")
        self.assertEqual(server.requests[0].headers["Content-Type"], "application/octet-stream")
        [payload] = server.payloads()
        self.assertEqual(payload["prompt"], [image_block("image/png", PNG), {
            "type": "text", "text": "look at this\n\nAttached files are in uploads/: my_notes.txt, data.bin"}])
        self.assertEqual(payload["session_id"], SESSION_A)
        self.assertEqual(statuses[:2], ["Putting 2 attached files in the session's folder…",
                                        "Resuming the Claude Code session…"])
        self.assertEqual(text, "Done: file.txt holds hi.\n\nsession_id=" + SESSION_C)

    def test_files_alone(self) -> None:
        """A message with only a file (no text) is sent, the prompt being the line naming it; __files__ serves
        when Open WebUI gives no user_message; a temporary chat's file is its text."""
        server = FilesServer()
        tmp = {"type": "text", "id": "t1", "name": "draft.md", "content": "# Draft\n"}
        run_files(server, [*RESUMED, user("")], metadata={}, files=[tmp])
        self.assertEqual(server.puts(), [(f"/api/sessions/{SESSION_A}/files/uploads/draft.md", b"# Draft\n")])
        self.assertEqual(server.payloads()[0]["prompt"], "Attached files are in uploads/: draft.md")

    def test_refused_uploads(self) -> None:
        """An upload the server refuses is noted and not named in the prompt; with nothing else to send, nothing
        is sent, and the answer keeps the session's marker."""
        owui = FakeOpenWebUI(self)
        server = FilesServer(put_status=409)
        text, _ = run_files(server, [*RESUMED, user("and this?")], with_files(owui.add("a.txt", b"a")))
        self.assertTrue(text.startswith("_Not put in the session's folder: a.txt (HTTP 409 session_busy)._\n\n"), text)
        self.assertEqual(server.payloads()[0]["prompt"], "and this?")
        server = FilesServer(put_status=409)
        text, statuses = run_files(server, [*RESUMED, user("")], with_files(owui.add("a.txt", b"a")))
        self.assertEqual(server.payloads(), [])
        self.assertIn("There is nothing to send", text)
        self.assertTrue(text.endswith("\n\nsession_id=" + SESSION_A), text)
        self.assertEqual(statuses[-1], "Not sent")

    def test_unreadable_attachment_noted(self) -> None:
        """A file that cannot be had (another user's) is noted and not put anywhere; the turn goes on."""
        owui = FakeOpenWebUI(self)
        server = FilesServer()
        text, _ = run_files(server, [*RESUMED, user("read it")],
                            with_files(owui.add("secret.txt", b"s", owner="user-2")))
        self.assertTrue(text.startswith("_Not sent to Claude: secret.txt (not a file of yours in Open WebUI)._"), text)
        self.assertEqual((server.puts(), server.payloads()[0]["prompt"]), ([], "read it"))

    def test_new_session_inlines_text(self) -> None:
        """A chat's first message: text files go into the prompt, nothing is uploaded, and the answer first says
        which files were left out and why."""
        owui = FakeOpenWebUI(self)
        server = FilesServer()
        files = with_files(owui.add("a.txt", b"alpha\n"), owui.add("b.pdf", b"%PDF-1.7\n\x00\x93"))
        text, _ = run_files(server, [user("compare")], files)
        self.assertEqual(server.puts(), [])
        self.assertEqual(server.payloads()[0]["prompt"], "compare\n\nAttached file a.txt:\n```\nalpha\n```")
        self.assertTrue(text.startswith("_Not sent to Claude: b.pdf. A new chat has no folder for files before "
                                        "Claude's first answer"), text)
        self.assertIn("attach the others again with your next message._\n\nDone:", text)

    def test_new_session_binary_only(self) -> None:
        """A first message with only a binary file has nothing to send: the note says why, and no call is made."""
        owui = FakeOpenWebUI(self)
        server = FilesServer()
        text, _ = run_files(server, [user("")], with_files(owui.add("b.pdf", b"\x00")))
        self.assertEqual(server.requests, [])
        self.assertIn("_Not sent to Claude: b.pdf.", text)
        self.assertIn("There is nothing to send", text)

    def test_changed_files_listed(self) -> None:
        """The files Claude wrote are listed after the answer, before the marker, as links to public_base_url (or
        base_url); the file_links valve switches them off."""
        text, _ = run_files(FilesServer(*WRITE_RUN), [user("write it")], base_url="http://claudesrv:3000")
        links = f"**Files changed:**\n- [`file.txt`](http://claudesrv:3000/api/sessions/{SESSION_C}/files/file.txt)"
        self.assertTrue(text.endswith(f"Done: file.txt holds hi.\n\n{links}\n\nsession_id={SESSION_C}"), text)
        self.assertEqual(pipe_module.find_session_id([assistant(text)]), SESSION_C)
        text, _ = run_files(FilesServer(*WRITE_RUN), [user("write it")], public_base_url="https://code.example/")
        self.assertIn(f"(https://code.example/api/sessions/{SESSION_C}/files/file.txt)", text)
        text, _ = run_files(FilesServer(*WRITE_RUN), [user("write it")], file_links=False)
        self.assertNotIn("Files changed", text)
        text, _ = run_files(FilesServer(*WRITE_RUN), [user("write it")], api_token="tok")
        self.assertIn("gets 401", text)
        failed = (INIT_CWD, edit_call("toolu_w", "Write", {"file_path": f"{WORKSPACE}/file.txt"}),
                  tool_result("toolu_w", is_error=True), TEXT_AFTER, RESULT_OK)
        text, _ = run_files(FilesServer(*failed), [user("write it")])
        self.assertNotIn("Files changed", text)
