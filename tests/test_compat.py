"""
The OpenAI- and Anthropic-compatible endpoints (``/v1/models``, ``/v1/chat/completions``, ``/v1/messages``) with
the real ``openai`` and ``anthropic`` SDKs against a real ``twistd -n claudesrv`` and the fake CLI in SDK mode.

The SDKs are blocking clients and the test runs the Twisted reactor, so every SDK call runs in a reactor thread
(``deferToThread``) while the daemon is a separate process. Each SDK client has a read timeout (L{READ_LIMIT}) and
no retries, so a thread waits for the daemon at most that long at each step and a stuck daemon fails the test
instead of keeping trial's thread pool busy for ever. The SDKs are imported in a thread too, while the first
daemon starts: importing ``anthropic`` costs seconds of CPU.

Where a test makes several checks on one daemon, each check sees only what the daemon did from its own start on
(L{Since}), and each uses prompts of its own: the fake answers a prompt the same way every time, so two checks
with the same prompts would have the same conversations.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import treq
from twisted.internet.defer import CancelledError, gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived

from tests.support import Daemon, Since, get_json, pid_alive, post, signalled, state_lines, wait_for
from tests.test_openwebui_pipe_units import JPEG, PNG, b64, data_url

if TYPE_CHECKING:
    import anthropic
    import openai

TOKEN = "compat-test-token-4f1d9a"
READ_LIMIT = 20.0  # seconds an SDK waits for the daemon at each step (connect, each read)
CHUNK = "Fake reply line 1 of 1."  # the fake's generated line (knob lines=1)
BRANCH_HEAD = "This conversation began elsewhere; here it is so far, for context:"
# What a turn that waited for a process shows first (as activity): a new session waits while the daemon puts the
# least recently used idle process to sleep to make room (--max-live), which a shared daemon does at times.
QUEUED = "claudesrv: queued\n"
QUEUED_BLOCK = {"type": "thinking", "thinking": QUEUED, "signature": ""}


def mock_reply(prompt: str) -> str:
    """The start of the fake's answer to a prompt (the recordings' mock API)."""
    return f"MOCK-REPLY: {prompt} [len={len(prompt)} "


def branch_prompt(earlier: list[tuple[str, str]], last: str) -> str:
    """The first prompt of a session that branches off a conversation it did not have."""
    lines = [BRANCH_HEAD, "", *(f"{role}: {text}" for role, text in earlier), "", "The user now says:", "", last]
    return "\n".join(lines)


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def load_sdks() -> Any:
    """Import the two SDKs in a thread (a Deferred of the modules)."""
    return deferToThread(lambda: (importlib.import_module("openai"), importlib.import_module("anthropic")))


def openai_client(daemon: Daemon | Since, token: str = "no-token") -> openai.OpenAI:
    import openai
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=token, max_retries=0, timeout=READ_LIMIT)


def anthropic_client(daemon: Daemon | Since, token: str | None = None) -> anthropic.Anthropic:
    """A client that sends C{token} as ``Authorization: Bearer`` (the SDK's C{auth_token}), as claudesrv wants."""
    import anthropic
    return anthropic.Anthropic(base_url=daemon.url, api_key=None if token else "no-key", auth_token=token,
                               max_retries=0, timeout=READ_LIMIT)


@dataclass
class Answer:
    """What a client made of one answer, streamed or not."""

    session: str | None  # the X-Session-Id response header
    text: str = ""
    reasoning: str = ""  # reasoning_content (OpenAI), the thinking blocks (Anthropic)
    back: Any = None  # the assistant message's content as the client sends it back in the history
    usage: Any = None
    stop: str | None = None  # finish_reason / stop_reason
    frames: list[Any] = field(default_factory=list)  # the chunks, the events, or the one object
    error: Exception | None = None  # what the SDK raised while reading the stream
    queued: bool = False  # the answer began with the queued notice, which text and reasoning leave out

    def unqueued(self) -> Answer:
        """Without the queued notice a turn that waited for its process begins with."""
        for kind, notice in (("reasoning", QUEUED), ("text", "> " + QUEUED + "\n")):
            if getattr(self, kind).startswith(notice):
                setattr(self, kind, getattr(self, kind)[len(notice):])
                self.queued = True
        return self

    def kinds(self) -> list[str]:
        """The types of the answer's blocks (Anthropic), without the queued notice's."""
        return [b["type"] for b in self.back[1 if self.back[:1] == [QUEUED_BLOCK] else 0:]]


def openai_turn(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool = False,
                include_usage: bool = False, headers: dict[str, str] | None = None,
                options: dict[str, Any] | None = None, model: str = "claude-code", until: str | None = None,
                failing: bool = False, **params: Any) -> Answer:
    """One chat completion, read whole (or, streamed, until a chunk's content contains C{until}: then the
    stream is closed). When C{failing}, the error the SDK raises while reading the stream is kept in the
    answer."""
    import openai
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "extra_headers": headers or {}, **params}
    if options is not None:
        kwargs["extra_body"] = {"claudesrv": options}
    if not stream:
        raw = client.chat.completions.with_raw_response.create(**kwargs)
        completion = raw.parse()
        [choice] = completion.choices
        return Answer(raw.headers.get("x-session-id"), choice.message.content or "",
                      getattr(choice.message, "reasoning_content", None) or "", choice.message.content,
                      completion.usage, choice.finish_reason, [completion]).unqueued()
    if include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    raw = client.chat.completions.with_raw_response.create(stream=True, **kwargs)
    answer = Answer(raw.headers.get("x-session-id"))
    chunks = raw.parse()
    try:
        for chunk in chunks:
            answer.frames.append(chunk)
            for choice in chunk.choices:
                answer.text += choice.delta.content or ""
                answer.reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                answer.stop = choice.finish_reason or answer.stop
            answer.usage = chunk.usage or answer.usage
            if until is not None and until in answer.text:
                break
    except openai.APIError as e:  # the SDK raises the error object a failed stream ends with
        if not failing:
            raise
        answer.error = e
    finally:
        chunks.close()
    answer.back = answer.text
    return answer.unqueued()


def anthropic_turn(client: anthropic.Anthropic, messages: list[dict[str, Any]], stream: bool = False,
                   system: str | None = None, headers: dict[str, str] | None = None,
                   options: dict[str, Any] | None = None, model: str = "claude-code",
                   until: str | None = None, failing: bool = False) -> Answer:
    """One message, read whole, as L{openai_turn}; its blocks (thinking included) are what goes back."""
    import anthropic
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 1024, "messages": messages,
                              "extra_headers": headers or {}}
    if system is not None:
        kwargs["system"] = system
    if options is not None:
        kwargs["extra_body"] = {"claudesrv": options}
    if not stream:
        raw = client.messages.with_raw_response.create(**kwargs)
        message = raw.parse()
        blocks = [b.model_dump(exclude_none=True) for b in message.content]
        answer = Answer(raw.headers.get("x-session-id"), usage=message.usage, stop=message.stop_reason,
                        frames=[message])
    else:
        raw = client.messages.with_raw_response.create(stream=True, **kwargs)
        answer = Answer(raw.headers.get("x-session-id"))
        blocks = []
        events = raw.parse()
        try:
            for event in events:
                answer.frames.append(event)
                if event.type == "content_block_start":
                    assert event.index == len(blocks), event
                    blocks.append(event.content_block.model_dump(exclude_none=True))
                elif event.type == "content_block_delta":
                    kind = event.delta.type.removesuffix("_delta")
                    blocks[event.index][kind] += getattr(event.delta, kind)
                elif event.type == "message_delta":
                    answer.usage, answer.stop = event.usage, event.delta.stop_reason
                if until is not None and any(until in b.get("text", "") for b in blocks):
                    break
        except anthropic.APIStatusError as e:  # the SDK raises the error event a failed stream ends with
            if not failing:
                raise
            answer.error = e
        finally:
            events.close()
    answer.text = "\n\n".join(b["text"] for b in blocks if b["type"] == "text")
    answer.reasoning = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
    answer.back = blocks
    return answer.unqueued()


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return deferToThread(function, *args, **kwargs)


def raises(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """In a thread: what C{function} raises (a Deferred of the exception; it fails if nothing is raised)."""
    def call() -> Exception:
        try:
            function(*args, **kwargs)
        except Exception as e:
            return e
        raise AssertionError(f"{function.__name__} raised nothing")

    return deferToThread(call)


# Bodies refused before anything runs, with the status and the OpenAI error (type, param, code) each gets; the
# last item is a piece of the message.
U = user("hi")
OPENAI_REFUSALS: list[tuple[str, Any, dict[str, str], int, tuple[str, str | None, str], str]] = [
    ("not JSON", b"{", {}, 400, ("invalid_request_error", None, "invalid_json"), "not valid JSON"),
    ("not an object", [U], {}, 400, ("invalid_request_error", None, "invalid_json"), "JSON object"),
    ("unknown parameter", {"messages": [U], "foo": 1}, {}, 400,
     ("invalid_request_error", "foo", "unknown_parameter"), "unrecognized request argument: foo"),
    ("n 2", {"messages": [U], "n": 2}, {}, 400, ("invalid_request_error", "n", "invalid_field"), "n must be 1"),
    ("tools", {"messages": [U], "tools": [{"type": "function", "function": {"name": "f"}}]}, {}, 400,
     ("invalid_request_error", "tools", "invalid_field"), "function calling"),
    ("functions", {"messages": [U], "functions": [{"name": "f"}]}, {}, 400,
     ("invalid_request_error", "functions", "invalid_field"), "function calling"),
    ("no messages", {"model": "claude-code"}, {}, 400, ("invalid_request_error", "messages", "invalid_field"),
     "non-empty array"),
    ("empty messages", {"messages": []}, {}, 400, ("invalid_request_error", "messages", "invalid_field"),
     "non-empty array"),
    ("assistant last", {"messages": [U, assistant("x")]}, {}, 400,
     ("invalid_request_error", "messages", "invalid_field"), "must be the user's message"),
    ("tool message", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}, U]}, {}, 400,
     ("invalid_request_error", "messages", "invalid_field"), "messages[0]: function calling"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}, U]}, {}, 400,
     ("invalid_request_error", "messages", "invalid_field"), "messages[0]"),
    ("content a number", {"messages": [user(5)]}, {}, 400,
     ("invalid_request_error", "messages", "invalid_field"), "content must be a string"),
    ("audio part", {"messages": [user([{"type": "input_audio", "input_audio": {}}])]}, {}, 400,
     ("invalid_request_error", "messages", "invalid_field"), "text or image_url"),
    ("image by link", {"messages": [user([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}])]}, {},
     400, ("invalid_request_error", "messages", "invalid_field"), "base64 data: URLs"),
    ("SVG image", {"messages": [user([{"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,AA=="}}])]},
     {}, 400, ("invalid_request_error", "messages", "invalid_field"), "PNG, JPEG, GIF or WebP"),
    ("stream not a boolean", {"messages": [U], "stream": "yes"}, {}, 400,
     ("invalid_request_error", "stream", "invalid_field"), "true or false"),
    ("model a number", {"messages": [U], "model": 5}, {}, 400,
     ("invalid_request_error", "model", "invalid_field"), "model must be a string"),
    ("model an option", {"messages": [U], "model": "claude-code/--help"}, {}, 400,
     ("invalid_request_error", "model", "invalid_field"), "model"),
    ("claudesrv not an object", {"messages": [U], "claudesrv": "x"}, {}, 400,
     ("invalid_request_error", "claudesrv", "invalid_field"), "claudesrv must be an object"),
    ("claudesrv prompt", {"messages": [U], "claudesrv": {"prompt": "x"}}, {}, 400,
     ("invalid_request_error", "claudesrv", "invalid_field"), "without prompt or model"),
    ("claudesrv model", {"messages": [U], "claudesrv": {"model": "opus"}}, {}, 400,
     ("invalid_request_error", "claudesrv", "invalid_field"), "without prompt or model"),
    ("claudesrv unknown field", {"messages": [U], "claudesrv": {"bogus": 1}}, {}, 400,
     ("invalid_request_error", "bogus", "unknown_field"), "unknown field 'bogus'"),
    ("claudesrv bad effort", {"messages": [U], "claudesrv": {"effort": "huge"}}, {}, 400,
     ("invalid_request_error", "effort", "invalid_field"), "effort must be one of"),
    ("claudesrv max_turns 0", {"messages": [U], "claudesrv": {"max_turns": 0}}, {}, 400,
     ("invalid_request_error", "max_turns", "invalid_field"), "max_turns"),
    ("claudesrv allowed_tools a string", {"messages": [U], "claudesrv": {"allowed_tools": "Read"}}, {}, 400,
     ("invalid_request_error", "allowed_tools", "invalid_field"), "allowed_tools must be an array"),
    ("bad X-Session-Id", {"messages": [U]}, {"X-Session-Id": "not-a-uuid"}, 400,
     ("invalid_request_error", None, "invalid_header"), "X-Session-Id"),
    ("unknown X-Session-Id", {"messages": [U]}, {"X-Session-Id": "00000000-0000-4000-8000-000000000000"}, 404,
     ("not_found_error", "session_id", "session_not_found"), "no session"),
    ("text/plain", {"messages": [U]}, {"Content-Type": "text/plain"}, 415,
     ("invalid_request_error", None, "unsupported_media_type"), "application/json"),
    ("foreign Host (the guard)", {"messages": [U]}, {"Host": "evil.example"}, 403,
     ("permission_error", None, "host_not_allowed"), "--allowed-host"),
]

# The same for /v1/messages: status, Anthropic's error type, a piece of the message.
ANTHROPIC_REFUSALS: list[tuple[str, Any, dict[str, str], int, str, str]] = [
    ("not JSON", b"{", {}, 400, "invalid_request_error", "not valid JSON"),
    ("not an object", "x", {}, 400, "invalid_request_error", "JSON object"),
    ("unknown parameter", {"messages": [U], "foo": 1}, {}, 400, "invalid_request_error",
     "foo: Extra inputs are not permitted"),
    ("tools", {"messages": [U], "tools": [{"name": "f", "input_schema": {}}]}, {}, 400, "invalid_request_error",
     "tool use is not offered"),
    ("no messages", {"max_tokens": 5}, {}, 400, "invalid_request_error", "non-empty array"),
    ("system role", {"messages": [{"role": "system", "content": "x"}, U]}, {}, 400, "invalid_request_error",
     "role user or assistant"),
    ("assistant last", {"messages": [U, assistant("x")]}, {}, 400, "invalid_request_error",
     "must be the user's message"),
    ("tool_result block", {"messages": [user([{"type": "tool_result", "tool_use_id": "t"}])]}, {}, 400,
     "invalid_request_error", "tool use is not offered"),
    ("document block", {"messages": [user([{"type": "document"}])]}, {}, 400, "invalid_request_error",
     "text or image"),
    ("image by URL", {"messages": [user([{"type": "image", "source": {"type": "url", "url": "https://x"}}])]}, {},
     400, "invalid_request_error", "base64 PNG, JPEG, GIF or WebP"),
    ("image in system", {"messages": [U], "system": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": b64(PNG)}}]}, {}, 400, "invalid_request_error",
     "system must be text"),
    ("stream not a boolean", {"messages": [U], "stream": 1}, {}, 400, "invalid_request_error", "true or false"),
    ("claudesrv bad budget", {"messages": [U], "claudesrv": {"max_budget_usd": -1}}, {}, 400,
     "invalid_request_error", "max_budget_usd"),
    ("claudesrv bad effort", {"messages": [U], "claudesrv": {"effort": "huge"}}, {}, 400,
     "invalid_request_error", "effort must be one of"),
    ("unknown X-Session-Id", {"messages": [U]}, {"X-Session-Id": "00000000-0000-4000-8000-000000000000"}, 404,
     "not_found_error", "no session"),
    ("foreign Host (the guard)", {"messages": [U]}, {"Host": "evil.example"}, 403, "permission_error",
     "--allowed-host"),
]


def usage_of(result: dict[str, Any]) -> tuple[int, int]:
    """A result's (input including cache reads and writes, output) tokens: what a turn's usage must say."""
    usage = result["usage"]
    return (usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
            + usage.get("cache_creation_input_tokens", 0), usage["output_tokens"])


class CompatTests(TestCase):
    """One real daemon per set of options, shared by several checks (each check's docstring says exactly what it
    proves)."""

    timeout = 60

    @inlineCallbacks
    def start(self, *args: str, env: dict[str, str] | None = None) -> Any:
        """A daemon without spares (so each CLI started is a turn's), and the SDKs imported meanwhile."""
        daemon, _ = yield gatherResults([Daemon(self, *args, env=env).start(), load_sdks()], consumeErrors=True)
        return daemon

    @inlineCallbacks
    def result_of(self, daemon: Daemon | Since, session: str) -> Any:
        """The last result line of a session's log."""
        code, body = yield get_json(f"{daemon.url}/api/sessions/{session}/events?after=0",
                                    headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(code, 200)
        frames = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
        return [f for f in frames if f.get("type") == "result"][-1]

    # ------------------------------------------------------------------ tests

    @inlineCallbacks
    def test_default_options(self) -> Any:
        """One daemon with the default options. OpenAI's endpoints with the openai SDK: models; answers streamed
        and not, with usage; errors before and during a stream; three-turn conversations through X-Session-Id,
        X-OpenWebUI-Chat-Id and the history, in one warm process; edited and regenerated histories branching;
        images; extra_body options; the disconnect, and detach; a table of refused bodies. /v1/messages with the
        anthropic SDK: the same, with tool activity as thinking blocks and the SDK's blocks sent back."""
        daemon = yield self.start()
        self.oai, self.claude = openai_client(daemon), anthropic_client(daemon)
        for check in (self.models, self.openai_answers, self.openai_failures, self.openai_by_header,
                      self.openai_by_chat_id, self.openai_by_history, self.openai_branches, self.openai_images,
                      self.openai_options, self.openai_disconnect, self.openai_detach, self.openai_refusals,
                      self.anthropic_answers, self.anthropic_failures, self.anthropic_three_ways,
                      self.anthropic_images_and_options, self.anthropic_disconnect, self.anthropic_refusals,
                      self.review_fixes):
            yield check(daemon.since())

    @inlineCallbacks
    def test_daemon_options(self) -> Any:
        """Two daemons started at once: one with a token, --allow-model sonnet, --allow-model claude-haiku-*,
        --max-budget-usd 1 and --openai-tool-activity hidden (the policy and the guard in each API's shape, and
        activity hidden), one with --openai-tool-activity content (each check's docstring says what it proves)."""
        guarded, content, _ = yield gatherResults([
            Daemon(self, "--allow-model", "sonnet", "--allow-model", "claude-haiku-*", "--max-budget-usd", "1",
                   "--openai-tool-activity", "hidden", env={"CLAUDESRV_AUTH_TOKENS": TOKEN}).start(),
            Daemon(self, "--openai-tool-activity", "content").start(), load_sdks()], consumeErrors=True)
        yield self.policy_and_tokens(guarded.since())
        yield self.activity_in_content(content)
        yield self.activity_hidden(guarded.since())

    @inlineCallbacks
    def policy_and_tokens(self, daemon: Since) -> Any:
        """A daemon with a token, --allow-model sonnet and claude-haiku-* and --max-budget-usd 1: /v1/models lists
        claude-code and claude-code/sonnet only (not the glob); both SDKs get their own 401 without the token
        (AuthenticationError), and 403 (PermissionDeniedError, naming the field and the option) for model
        claude-code/opus and for a max_budget_usd of 5 in extra_body, streamed or not, before anything runs; what
        the policy allows runs (a model the glob matches too), with the operator's budget unless the request asks
        for less."""
        import anthropic
        import openai
        oai, claude = openai_client(daemon, TOKEN), anthropic_client(daemon, TOKEN)
        models = yield in_thread(oai.models.list)
        self.assertEqual([m.id for m in models.data], ["claude-code", "claude-code/sonnet"])

        # no token (or a wrong one): 401 in each API's shape, which each SDK raises as AuthenticationError
        wrong = yield raises(openai_turn, openai_client(daemon, "wrong"), [user("policy hi")])
        self.assertIsInstance(wrong, openai.AuthenticationError)
        self.assertEqual((wrong.status_code, wrong.body["type"], wrong.code),
                         (401, "authentication_error", "unauthorized"))
        wrong = yield raises(anthropic_turn, anthropic_client(daemon, "wrong"), [user("policy hi")])
        self.assertIsInstance(wrong, anthropic.AuthenticationError)
        self.assertEqual(wrong.body["error"]["type"], "authentication_error")
        reply = yield post(daemon.url + "/v1/chat/completions", {"messages": [user("policy hi")]})
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.json(), {"error": {"message": reply.json()["error"]["message"],
                                                  "type": "authentication_error", "param": None,
                                                  "code": "unauthorized"}})
        reply = yield post(daemon.url + "/v1/messages", {"messages": [user("policy hi")]})
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.json(), {"type": "error", "error": {"type": "authentication_error",
                                                                   "message": reply.json()["error"]["message"]}})
        code, _ = yield get_json(daemon.url + "/v1/models")
        self.assertEqual(code, 401)

        # the policy: 403 naming the field and the option, before anything runs, streamed or not
        for stream in (False, True):
            denied = yield raises(openai_turn, oai, [user("policy opus")], stream=stream, model="claude-code/opus")
            self.assertIsInstance(denied, openai.PermissionDeniedError)
            self.assertEqual((denied.body["type"], denied.param, denied.code),
                             ("permission_error", "model", "model_not_allowed"))
            self.assertIn("--allow-model sonnet", denied.message)
            denied = yield raises(openai_turn, oai, [user("policy budget")], stream=stream,
                                  options={"max_budget_usd": 5})
            self.assertIsInstance(denied, openai.PermissionDeniedError)
            self.assertEqual((denied.param, denied.code), ("max_budget_usd", "budget_over_limit"))
            self.assertIn("--max-budget-usd", denied.message)
            denied = yield raises(anthropic_turn, claude, [user("policy opus")], stream=stream, model="opus")
            self.assertIsInstance(denied, anthropic.PermissionDeniedError)
            self.assertEqual(denied.body["error"]["type"], "permission_error")
            self.assertIn("--allow-model sonnet", denied.body["error"]["message"])
            denied = yield raises(anthropic_turn, claude, [user("policy budget")], stream=stream,
                                  options={"max_budget_usd": 5})
            self.assertIsInstance(denied, anthropic.PermissionDeniedError)
            self.assertIn("--max-budget-usd", denied.body["error"]["message"])
        self.assertEqual(daemon.turns(), [])

        # what the policy allows runs: the operator's budget unless the request asks for less
        answer = yield in_thread(openai_turn, oai, [user("policy sonnet")], model="claude-code/sonnet",
                                 options={"max_budget_usd": 0.5})
        self.assertIn(mock_reply("policy sonnet"), answer.text)
        answer = yield in_thread(anthropic_turn, claude, [user("policy default")])
        self.assertIn(mock_reply("policy default"), answer.text)
        answer = yield in_thread(openai_turn, oai, [user("policy glob")], model="claude-code/claude-haiku-4-5")
        self.assertIn(mock_reply("policy glob"), answer.text)
        [sonnet, default, glob] = daemon.turns()
        self.assertIn("sonnet", sonnet["model"])
        self.assertEqual(glob["model"], "claude-haiku-4-5")
        self.assertEqual((sonnet["max_budget_usd"], default["max_budget_usd"]), (0.5, 1.0))

    @inlineCallbacks
    def activity_in_content(self, daemon: Daemon) -> Any:
        """--openai-tool-activity content: tool activity comes in the OpenAI answer's text as quoted lines, not as
        reasoning, and a history with that text resumes the session; Anthropic's answer still has it as
        thinking."""
        prompt = "look [[fake tool=Read]]"
        shown = yield in_thread(openai_turn, openai_client(daemon), [user(prompt)], stream=True)
        self.assertEqual(shown.reasoning, "")
        self.assertTrue(shown.text.startswith("I will use Read.\n\n> Read: {}\n"), shown.text)
        for line in ("> claudesrv: permission_denied Read\n", ">   ⎿ error: claudesrv: the tool Read needs approval",
                     "\nMOCK-FINAL after tool: "):
            self.assertIn(line, shown.text)
        again = yield in_thread(openai_turn, openai_client(daemon),
                                [user(prompt), assistant(shown.text), user("and then")])
        [first, second] = daemon.turns()
        self.assertEqual((first["prompt"], second["prompt"], second["pid"]), (prompt, "and then", first["pid"]))
        self.assertEqual(again.session, first["session_id"])
        thinking = yield in_thread(anthropic_turn, anthropic_client(daemon), [user(prompt)])
        self.assertEqual(thinking.kinds(), ["text", "thinking", "text"])

    @inlineCallbacks
    def activity_hidden(self, daemon: Since) -> Any:
        """--openai-tool-activity hidden: tool activity is nowhere, in neither API (no reasoning_content, no
        thinking block), and the answer's text is all there."""
        prompt = "look [[fake tool=Read]]"
        for turn, client in ((openai_turn, openai_client(daemon, TOKEN)),
                             (anthropic_turn, anthropic_client(daemon, TOKEN))):
            quiet = yield in_thread(turn, client, [user(prompt)], stream=True)
            self.assertEqual((quiet.reasoning, quiet.queued), ("", False))
            self.assertTrue(quiet.text.startswith("I will use Read."), quiet.text)
            self.assertIn("MOCK-FINAL after tool: ", quiet.text)
            self.assertNotIn("Read: {}", quiet.text)
        self.assertEqual(quiet.kinds(), ["text"])  # the Anthropic answer: no thinking block

    # ------------------------------------------------------------------ OpenAI checks

    @inlineCallbacks
    def models(self, daemon: Since) -> Any:
        """GET /v1/models: claude-code (the server's default) and claude-code/<alias> for sonnet, opus and haiku,
        in OpenAI's list shape, as the SDK reads it."""
        models = yield in_thread(self.oai.models.list)
        self.assertEqual([m.id for m in models.data],
                         ["claude-code", "claude-code/sonnet", "claude-code/opus", "claude-code/haiku"])
        self.assertEqual({(m.object, m.owned_by) for m in models.data}, {("model", "claudesrv")})

    @inlineCallbacks
    def openai_answers(self, daemon: Since) -> Any:
        """A chat completion without and with streaming: the assistant's text; the X-Session-Id header naming the
        new session; usage as the turn's result gives it (cache reads and writes count as input); sampling parameters
        accepted and ignored; a stream of chat.completion.chunk objects with one id, the role first, the text
        in delta.content, tool activity in delta.reasoning_content, finish_reason stop in the last choice, and a
        usage chunk only with stream_options.include_usage; system and developer messages as the session's
        append_system_prompt."""
        plain = yield in_thread(openai_turn, self.oai,
                                [{"role": "system", "content": "Be terse."},
                                 {"role": "developer", "content": "No lists."}, user("oa plain")],
                                temperature=0.2, top_p=0.9, max_tokens=50, seed=7, stop=["\n\n\n"], user="u1",
                                presence_penalty=0, frequency_penalty=0)
        [completion] = plain.frames
        self.assertTrue(plain.text.startswith(mock_reply("oa plain")), plain.text)
        self.assertEqual((completion.object, completion.model, plain.stop, plain.reasoning),
                         ("chat.completion", "claude-code", "stop", ""))
        self.assertTrue(completion.id.startswith("chatcmpl-"), completion.id)
        [turn] = daemon.turns()
        self.assertEqual((plain.session, turn["prompt"], turn["append_system_prompt"]),
                         (turn["session_id"], "oa plain", "Be terse.\n\nNo lists."))
        result = yield self.result_of(daemon, turn["session_id"])
        prompt_tokens, completion_tokens = usage_of(result)
        self.assertEqual((plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens),
                         (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens))

        streamed = yield in_thread(openai_turn, self.oai, [user("oa streamed [[fake tool=Read]]")], stream=True,
                                   include_usage=True)
        chunks = streamed.frames
        self.assertEqual({(c.id, c.object, c.model) for c in chunks},
                         {(chunks[0].id, "chat.completion.chunk", "claude-code")})
        self.assertEqual([c.choices[0].delta.role for c in chunks[:-1]], ["assistant"] + [None] * (len(chunks) - 2))
        self.assertEqual([c.choices[0].finish_reason for c in chunks[:-1]], [None] * (len(chunks) - 2) + ["stop"])
        self.assertEqual((chunks[-1].choices, streamed.stop), ([], "stop"))
        self.assertEqual([c.usage for c in chunks[:-1]], [None] * (len(chunks) - 1))
        session = daemon.turns()[-1]["session_id"]
        self.assertEqual(streamed.session, session)
        self.assertTrue(streamed.text.startswith("I will use Read.\n\nMOCK-FINAL after tool: "), streamed.text)
        self.assertIn("Read: {}\nclaudesrv: permission_denied Read\n  ⎿ error: claudesrv: the tool Read needs "
                      "approval", streamed.reasoning)
        result = yield self.result_of(daemon, session)
        self.assertEqual((streamed.usage.prompt_tokens, streamed.usage.completion_tokens), usage_of(result))

        quiet = yield in_thread(openai_turn, self.oai, [user("oa no usage")], stream=True)
        self.assertTrue(quiet.text.startswith(mock_reply("oa no usage")), quiet.text)
        self.assertEqual((quiet.usage, quiet.frames[-1].choices[0].finish_reason), (None, "stop"))

    @inlineCallbacks
    def openai_failures(self, daemon: Since) -> Any:
        """A CLI that dies during the turn: without streaming, 500 in OpenAI's error shape (InternalServerError,
        code turn_failed); streamed, the chunks sent so far, then an error object the SDK raises as APIError.
        A request refused before its stream starts (an unknown X-Session-Id) raises NotFoundError at once."""
        import openai
        failed = yield raises(openai_turn, self.oai, [user("oa crash [[fake crash=1]]")])
        self.assertIsInstance(failed, openai.InternalServerError)
        self.assertEqual((failed.status_code, failed.body["type"], failed.param, failed.code),
                         (500, "server_error", None, "turn_failed"))
        self.assertIn("cli_failed", failed.message)
        streamed = yield in_thread(openai_turn, self.oai, [user("oa crash later [[fake lines=1 crash=1]]")],
                                   stream=True, failing=True)
        self.assertEqual(streamed.text, CHUNK)
        self.assertIsInstance(streamed.error, openai.APIError)
        assert isinstance(streamed.error, openai.APIError)
        self.assertEqual((streamed.error.code, streamed.error.type), ("turn_failed", "server_error"))
        self.assertIn("killed by signal 11", streamed.error.message)
        unknown = yield raises(openai_turn, self.oai, [user("oa unknown")], stream=True,
                               headers={"X-Session-Id": "00000000-0000-4000-8000-000000000000"})
        self.assertIsInstance(unknown, openai.NotFoundError)
        self.assertEqual(unknown.code, "session_not_found")
        self.assertEqual(len(daemon.turns()), 2)

    @inlineCallbacks
    def conversation(self, daemon: Since, turn: Callable[..., Answer], prompts: list[str],
                     history: Callable[[list[dict[str, Any]], Answer], list[dict[str, Any]]],
                     headers: Callable[[Answer | None], dict[str, str]], **kwargs: Any) -> Any:
        """Three turns, the second streamed: each sends C{history}(what came before, the previous answer) and the
        next prompt with C{headers}(the first answer). The three went to one session, in one warm process,
        each with only its own prompt."""
        messages: list[dict[str, Any]] = []
        answers: list[Answer] = []
        for i, prompt in enumerate(prompts):
            if answers:
                messages = history(messages, answers[-1])
            messages = [*messages, user(prompt)]
            answer = yield in_thread(turn, self.oai if turn is openai_turn else self.claude, messages, stream=i == 1,
                                     headers=headers(answers[0] if answers else None), **kwargs)
            self.assertIn("MOCK-FINAL after tool: " if "tool=" in prompt else mock_reply(prompt), answer.text)
            answers.append(answer)
        turns = daemon.turns()
        self.assertEqual([t["prompt"] for t in turns], prompts)
        self.assertEqual({(t["session_id"], t["pid"]) for t in turns}, {(answers[0].session, turns[0]["pid"])})
        self.assertEqual([a.session for a in answers], [answers[0].session] * 3)
        self.assertEqual(len(daemon.invocations()), 1)
        return answers

    def openai_by_header(self, daemon: Since) -> Any:
        """X-Session-Id (the SDK's extra_headers) resumes that session, whatever the history says: a history
        that matches nothing still gives only the new message to the session's warm process."""
        return self.conversation(daemon, openai_turn, ["oa header 1", "oa header 2", "oa header 3"],
                                 lambda before, answer: [*before, assistant("something else entirely")],
                                 lambda first: {"X-Session-Id": first.session} if first and first.session else {})

    def openai_by_chat_id(self, daemon: Since) -> Any:
        """X-OpenWebUI-Chat-Id binds to the session its first turn made: later turns of the chat resume it (only
        the new message, the same process) though the history was rewritten (as a compacted chat is)."""
        return self.conversation(daemon, openai_turn, ["oa chat 1", "oa chat 2", "oa chat 3"],
                                 lambda before, answer: [*before, assistant("A summary of the chat so far.")],
                                 lambda first: {"X-OpenWebUI-Chat-Id": "chat-oa"})

    @inlineCallbacks
    def openai_by_history(self, daemon: Since) -> Any:
        """Without either header, a history that is the session's conversation so far (the system message and
        each answer exactly as returned; reasoning kept as Open WebUI keeps it, in a <details> block, and
        whitespace aside) resumes it with only the new message. The first answer used a tool, so its text is
        two messages and its reasoning holds the activity."""
        def history(before: list[dict[str, Any]], answer: Answer) -> list[dict[str, Any]]:
            details = f'<details type="reasoning" done="true">\n<summary>Thought</summary>\n{answer.reasoning}' \
                      "</details>\n" if answer.reasoning else ""
            return [*before, assistant(details + answer.text.rstrip() + "\n")]

        answers = yield self.conversation(
            daemon, openai_turn, ["oa history 1 [[fake tool=Read]]", "oa history 2", "oa history 3"], history,
            lambda first: {}, )
        self.assertIn("Read: {}", answers[0].reasoning)

    @inlineCallbacks
    def openai_branches(self, daemon: Since) -> Any:
        """Histories a session did not have start new sessions (new processes) whose first prompt carries the
        earlier messages as context, and never feed a session a turn twice: an edited earlier message; the same
        history sent again after the session moved on (a regenerated answer), which branches, and whose
        branch then goes on warm from its own answer; another system message. The original session still goes
        on from its own latest answer."""
        system = {"role": "system", "content": "Branches."}
        a, b, c = "oa branch A", "oa branch B", "oa branch C"
        r1 = yield in_thread(openai_turn, self.oai, [system, user(a)])
        r2 = yield in_thread(openai_turn, self.oai, [system, user(a), assistant(r1.text), user(b)])
        third = [system, user(a), assistant(r1.text), user(b), assistant(r2.text), user(c)]
        r3 = yield in_thread(openai_turn, self.oai, third)
        original = r1.session
        self.assertEqual([r2.session, r3.session], [original, original])

        edited = yield in_thread(openai_turn, self.oai, [system, user(a + " (edited)"), assistant(r1.text),
                                                            user(b)])
        regenerated = yield in_thread(openai_turn, self.oai, third, stream=True)
        regenerated_on = yield in_thread(openai_turn, self.oai, [*third, assistant(regenerated.text),
                                                                    user("oa branch D")])
        other_system = yield in_thread(openai_turn, self.oai, [{"role": "system", "content": "Other."}, user(a),
                                                                  assistant(r1.text), user(b)])
        original_on = yield in_thread(openai_turn, self.oai, [*third, assistant(r3.text), user("oa branch E")])

        sessions = [edited.session, regenerated.session, other_system.session]
        self.assertEqual(len({original, *sessions}), 4, sessions)
        self.assertEqual((regenerated_on.session, original_on.session), (regenerated.session, original))
        turns = daemon.turns()
        by_session = {s: [t for t in turns if t["session_id"] == s] for s in [original, *sessions]}
        self.assertEqual([t["prompt"] for t in by_session[original]], [a, b, c, "oa branch E"])
        self.assertEqual(len({t["pid"] for t in by_session[original]}), 1)
        [edit_turn] = by_session[edited.session]
        self.assertEqual(edit_turn["prompt"], branch_prompt([("User", a + " (edited)"), ("Assistant", r1.text)], b))
        self.assertEqual(edit_turn["append_system_prompt"], "Branches.")
        regenerate_turns = by_session[regenerated.session]
        self.assertEqual([t["prompt"] for t in regenerate_turns],
                         [branch_prompt([("User", a), ("Assistant", r1.text), ("User", b), ("Assistant", r2.text)],
                                        c), "oa branch D"])
        self.assertEqual(len({t["pid"] for t in regenerate_turns}), 1)
        [other_turn] = by_session[other_system.session]
        self.assertEqual(other_turn["append_system_prompt"], "Other.")
        self.assertTrue(other_turn["prompt"].startswith(BRANCH_HEAD))
        self.assertEqual(len({t["pid"] for t in turns}), 4)
        self.assertEqual(len(daemon.invocations()), 4)

    @inlineCallbacks
    def openai_images(self, daemon: Since) -> Any:
        """An image_url part with a base64 data: URL reaches the CLI as an image block (before the text); a later
        turn whose history holds that image resumes the session with only its new message; a history with
        another image in its place is another conversation, whose branch says the image is not repeated. An
        image that is not what its data: URL says is refused (400)."""
        import openai
        picture = user([{"type": "text", "text": "oa image"}, {"type": "image_url", "image_url": {
            "url": data_url("image/png", PNG)}}])
        first = yield in_thread(openai_turn, self.oai, [picture])
        follow = yield in_thread(openai_turn, self.oai, [picture, assistant(first.text), user("oa image 2")])
        other = dict(picture, content=[picture["content"][0], {"type": "image_url", "image_url": {
            "url": data_url("image/jpeg", JPEG), "detail": "low"}}])
        branch = yield in_thread(openai_turn, self.oai, [other, assistant(first.text),
                                                            user([{"type": "text", "text": "oa image 3"}])])
        self.assertEqual(follow.session, first.session)
        self.assertNotEqual(branch.session, first.session)
        turns = daemon.turns()
        self.assertEqual([(t["prompt"], t["images"]) for t in turns],
                         [("oa image", ["image/png"]), ("oa image 2", []),
                          (branch_prompt([("User", "oa image [1 image(s) not repeated]"),
                                          ("Assistant", first.text)], "oa image 3"), [])])
        self.assertEqual(turns[0]["pid"], turns[1]["pid"])
        lying = user([{"type": "image_url", "image_url": {"url": data_url("image/png", JPEG)}}])
        refused = yield raises(openai_turn, self.oai, [lying])
        self.assertIsInstance(refused, openai.BadRequestError)
        self.assertIn("image/png", refused.message)
        self.assertEqual(len(daemon.turns()), 3)

    @inlineCallbacks
    def openai_options(self, daemon: Since) -> Any:
        """extra_body={"claudesrv": {...}} takes /api/claude's fields: allowed_tools, effort, max_turns and
        permission_mode reach the CLI with the model from claude-code/<model> (a pre-approved tool runs, shown as
        reasoning); a turn cut by max_turns ends with finish_reason length; a bad field is 400 naming it
        (BadRequestError, param), validated by /api/claude's schema, before anything runs."""
        import openai
        options = {"allowed_tools": ["Read"], "effort": "high", "max_turns": 5, "permission_mode": "acceptEdits"}
        answer = yield in_thread(openai_turn, self.oai, [user("oa options [[fake tool=Read]]")],
                                 model="claude-code/haiku", options=options)
        [turn] = daemon.turns()
        self.assertEqual({k: turn[k] for k in options}, options)
        self.assertIn("haiku", turn["model"])
        self.assertIn("Read: {}\n  ⎿ ", answer.reasoning)
        self.assertNotIn("permission_denied", answer.reasoning)
        tools = state_lines(daemon.state_dir, "tools.jsonl")
        self.assertEqual([t["tool_name"] for t in tools if t["pid"] == turn["pid"]], ["Read"])

        cut = yield in_thread(openai_turn, self.oai, [user("oa cut [[fake tool=Read]]")],
                              options={"max_turns": 1, "allowed_tools": ["Read"]})
        self.assertEqual(cut.stop, "length")
        for bad, field_name in (({"effort": "huge"}, "effort"), ({"max_turns": 0}, "max_turns"),
                                    ({"permission_mode": "yolo"}, "permission_mode"), ({"detach": "yes"}, "detach"),
                                    ({"allowedTools": ["Read"], "allowed_tools": ["Read"]}, None)):
            refused = yield raises(openai_turn, self.oai, [user("oa bad option")], options=bad)
            self.assertIsInstance(refused, openai.BadRequestError)
            if field_name is not None:
                self.assertEqual(refused.param, field_name)
        self.assertEqual(len(daemon.turns()), 2)

    @inlineCallbacks
    def openai_disconnect(self, daemon: Since) -> Any:
        """A client that closes a stream before the answer ends interrupts the turn as /api/claude's would: the
        CLI gets the interrupt request (no signal), its process stays up, and the session's next turn goes to
        it. A client that leaves before a non-streamed answer comes interrupts its turn too."""
        prompt = "oa leave [[fake lines=1 hang=1]]"
        answer = yield in_thread(openai_turn, self.oai, [user(prompt)], stream=True, until=CHUNK)
        [turn] = daemon.turns()
        yield self.stopped(daemon, turn)
        again = yield in_thread(openai_turn, self.oai, [user("oa back")],
                                headers={"X-Session-Id": turn["session_id"]})
        self.assertEqual((answer.session, again.session), (turn["session_id"], turn["session_id"]))
        self.assertEqual(daemon.turns()[-1]["pid"], turn["pid"])

        later = daemon.since()
        waiting = treq.post(daemon.url + "/v1/chat/completions", json.dumps({"messages": [user(
            "oa leave unstreamed [[fake hang=1]]")]}).encode(), headers={"Content-Type": "application/json"},
            persistent=False)
        waiting.addErrback(lambda failure: failure.trap(CancelledError, ResponseNeverReceived))
        yield wait_for(lambda: len(later.turns()) == 1)
        waiting.cancel()  # the connection is closed before any answer
        yield self.stopped(later, later.turns()[0])

    @inlineCallbacks
    def stopped(self, daemon: Since, turn: dict[str, Any]) -> Any:
        """The turn of C{turn}'s process was interrupted because its client left, with no signal, and the
        process is up for the session's next turn."""
        yield wait_for(lambda: daemon.interrupts() == [turn["pid"]])
        yield wait_for(lambda: f"{turn['session_id']}: disconnected," in daemon.log)
        self.assertEqual([name for pid, name in signalled(daemon.state_dir) if pid == turn["pid"]], [])
        self.assertTrue(pid_alive(turn["pid"]))

    @inlineCallbacks
    def openai_detach(self, daemon: Since) -> Any:
        """With claudesrv.detach true the turn goes on without its client (no interrupt) until it is cancelled."""
        yield in_thread(openai_turn, self.oai, [user("oa detached [[fake lines=1 hang=1]]")], stream=True,
                        until=CHUNK, options={"detach": True})
        [turn] = daemon.turns()
        yield wait_for(lambda: f"of session {turn['session_id']} goes on without its client" in daemon.log)
        self.assertEqual(daemon.interrupts(), [])
        code, _ = yield get_json(f"{daemon.url}/api/sessions/{turn['session_id']}")
        cancel = yield post(f"{daemon.url}/api/sessions/{turn['session_id']}/cancel", {})
        self.assertEqual((code, cancel.status), (200, 202))
        yield wait_for(lambda: daemon.interrupts() == [turn["pid"]])

    @inlineCallbacks
    def openai_refusals(self, daemon: Since) -> Any:
        """Each refused body of the table gets its status and OpenAI's error object, exactly
        {"error": {"message", "type", "param", "code"}}, and runs nothing; so does a GET."""
        for name, body, headers, status, (kind, param, code), message in OPENAI_REFUSALS:
            raw = body if isinstance(body, bytes) else None
            reply = yield post(daemon.url + "/v1/chat/completions", body, headers=headers, raw=raw)
            error = reply.json()
            self.assertIn("error", error, name)
            self.assertEqual((reply.status, error), (status, {"error": {
                "message": error["error"]["message"], "type": kind, "param": param, "code": code}}), name)
            self.assertIn(message, error["error"]["message"], name)
        code, body = yield get_json(daemon.url + "/v1/chat/completions")
        self.assertEqual((code, sorted(body["error"])), (405, ["code", "message", "param", "type"]))
        self.assertEqual(daemon.turns(), [])

    # ------------------------------------------------------------------ Anthropic checks

    @inlineCallbacks
    def anthropic_answers(self, daemon: Since) -> Any:
        """A message without and with streaming: text blocks; the X-Session-Id header; usage from the turn's
        result; stop_reason end_turn; the system text as append_system_prompt; streamed, message_start,
        then each block's content_block_start, content_block_delta (text_delta, or thinking_delta for tool
        activity) and content_block_stop, then message_delta (stop_reason, usage) and message_stop."""
        plain = yield in_thread(anthropic_turn, self.claude, [user("an plain")], system="Be brief.")
        [message] = plain.frames
        self.assertEqual((message.type, message.role, message.model, plain.stop), ("message", "assistant",
                                                                                    "claude-code", "end_turn"))
        self.assertEqual(plain.kinds(), ["text"])
        self.assertTrue(plain.text.startswith(mock_reply("an plain")), plain.text)
        [turn] = daemon.turns()
        self.assertEqual((plain.session, turn["prompt"], turn["append_system_prompt"]),
                         (turn["session_id"], "an plain", "Be brief."))
        result = yield self.result_of(daemon, turn["session_id"])
        self.assertEqual((plain.usage.input_tokens, plain.usage.output_tokens), usage_of(result))

        streamed = yield in_thread(anthropic_turn, self.claude, [user("an streamed [[fake tool=Read]]")], stream=True,
                                   system=[{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}])
        kinds = [e.type if e.type != "content_block_delta" else e.delta.type for e in streamed.frames]
        self.assertEqual(streamed.kinds(), ["text", "thinking", "text"])  # text; the tool; the final text
        expected = ["message_start"]
        for block in streamed.back:
            deltas = 1 if block["type"] == "text" else block["thinking"].count("\n")
            expected += ["content_block_start", *[f"{block['type']}_delta"] * deltas, "content_block_stop"]
        self.assertEqual(kinds, [*expected, "message_delta", "message_stop"])
        self.assertTrue(streamed.frames[0].message.id.startswith("msg_"), streamed.frames[0])
        self.assertEqual(streamed.stop, "end_turn")
        self.assertIn("Read: {}\nclaudesrv: permission_denied Read\n", streamed.reasoning)
        self.assertTrue(streamed.text.startswith("I will use Read.\n\nMOCK-FINAL after tool: "), streamed.text)
        session = daemon.turns()[-1]["session_id"]
        self.assertEqual((streamed.session, daemon.turns()[-1]["append_system_prompt"]), (session, "Be\n\nbrief."))
        result = yield self.result_of(daemon, session)
        self.assertEqual((streamed.usage.input_tokens, streamed.usage.output_tokens), usage_of(result))

    @inlineCallbacks
    def anthropic_failures(self, daemon: Since) -> Any:
        """A CLI that dies during the turn: without streaming, 500 in Anthropic's error shape
        (InternalServerError, api_error); streamed, the events so far, then an ``error`` event the SDK raises.
        A request refused before its stream starts raises NotFoundError at once."""
        import anthropic
        failed = yield raises(anthropic_turn, self.claude, [user("an crash [[fake crash=1]]")])
        self.assertIsInstance(failed, anthropic.InternalServerError)
        self.assertEqual((failed.status_code, failed.body["type"], failed.body["error"]["type"]),
                         (500, "error", "api_error"))
        self.assertIn("cli_failed", failed.body["error"]["message"])
        streamed = yield in_thread(anthropic_turn, self.claude, [user("an crash later [[fake lines=1 crash=1]]")],
                                   stream=True, failing=True)
        self.assertEqual(streamed.text, CHUNK)
        self.assertIsInstance(streamed.error, anthropic.APIStatusError)
        assert isinstance(streamed.error, anthropic.APIStatusError)
        self.assertEqual((streamed.error.body["type"], streamed.error.body["error"]["type"]), ("error", "api_error"))
        self.assertIn("killed by signal 11", streamed.error.body["error"]["message"])
        unknown = yield raises(anthropic_turn, self.claude, [user("an unknown")], stream=True,
                               headers={"X-Session-Id": "00000000-0000-4000-8000-000000000000"})
        self.assertIsInstance(unknown, anthropic.NotFoundError)
        self.assertEqual(unknown.body["error"]["type"], "not_found_error")
        self.assertEqual(len(daemon.turns()), 2)

    @inlineCallbacks
    def anthropic_three_ways(self, daemon: Since) -> Any:
        """Three-turn conversations that each stay in one session and one warm process, each later turn sending
        only its new message: through X-Session-Id (whatever the history), X-OpenWebUI-Chat-Id (a rewritten
        history), and the history alone, with the SDK's content blocks sent back as they came (a thinking block
        with the tool activity among them). Then an edited first message branches."""
        other = [assistant("A summary of the chat so far.")]
        yield self.conversation(daemon.since(), anthropic_turn, ["an header 1", "an header 2", "an header 3"],
                                lambda before, answer: [*before, *other],
                                lambda first: {"X-Session-Id": first.session} if first and first.session else {},
                                system="S")
        yield self.conversation(daemon.since(), anthropic_turn, ["an chat 1", "an chat 2", "an chat 3"],
                                lambda before, answer: [*before, *other],
                                lambda first: {"X-OpenWebUI-Chat-Id": "chat-an"}, system="S")
        since = daemon.since()
        answers = yield self.conversation(since, anthropic_turn, ["an hist 1 [[fake tool=Read]]", "an hist 2",
                                                                  "an hist 3"],
                                          lambda before, answer: [*before, assistant(answer.back)],
                                          lambda first: {}, system="S")
        self.assertEqual(answers[0].kinds(), ["text", "thinking", "text"])
        edited = yield in_thread(anthropic_turn, self.claude, [user("an hist 1 (edited)"),
                                                               assistant(answers[0].back), user("an hist 2")],
                                 system="S")
        self.assertNotEqual(edited.session, answers[0].session)
        self.assertEqual(daemon.turns()[-1]["prompt"],
                         branch_prompt([("User", "an hist 1 (edited)"), ("Assistant", answers[0].text)], "an hist 2"))

    @inlineCallbacks
    def anthropic_images_and_options(self, daemon: Since) -> Any:
        """An image block reaches the CLI as one (its media type in the fake's record), with the text; extra_body
        options (allowedTools, effort, permission_mode) reach the CLI with the model; a bad one is 400
        (BadRequestError) naming the field."""
        import anthropic
        picture = user([{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                     "data": b64(JPEG)}}, {"type": "text", "text": "an image"}])
        yield in_thread(anthropic_turn, self.claude, [picture], model="claude-code/sonnet",
                        options={"allowedTools": ["Read"], "effort": "low", "permission_mode": "plan"})
        [turn] = daemon.turns()
        self.assertEqual((turn["prompt"], turn["images"], turn["allowed_tools"], turn["effort"],
                          turn["permission_mode"]), ("an image", ["image/jpeg"], ["Read"], "low", "plan"))
        self.assertIn("sonnet", turn["model"])
        refused = yield raises(anthropic_turn, self.claude, [user("an bad")], options={"effort": "huge"})
        self.assertIsInstance(refused, anthropic.BadRequestError)
        self.assertIn("effort", refused.body["error"]["message"])
        self.assertEqual(len(daemon.turns()), 1)

    @inlineCallbacks
    def anthropic_disconnect(self, daemon: Since) -> Any:
        """A client that closes the stream after the first text interrupts the turn as /api/claude's would."""
        yield in_thread(anthropic_turn, self.claude, [user("an leave [[fake lines=1 hang=1]]")], stream=True,
                        until=CHUNK)
        [turn] = daemon.turns()
        yield self.stopped(daemon, turn)

    @inlineCallbacks
    def anthropic_refusals(self, daemon: Since) -> Any:
        """Each refused body of the table gets its status and Anthropic's error object, exactly
        {"type": "error", "error": {"type", "message"}}, and runs nothing."""
        for name, body, headers, status, kind, message in ANTHROPIC_REFUSALS:
            raw = body if isinstance(body, bytes) else None
            reply = yield post(daemon.url + "/v1/messages", body, headers=headers, raw=raw)
            error = reply.json()
            self.assertIn("error", error, name)
            self.assertEqual((reply.status, error), (status, {"type": "error", "error": {
                "type": kind, "message": error["error"]["message"]}}), name)
            self.assertIn(message, error["error"]["message"], name)
        self.assertEqual(daemon.turns(), [])

    @inlineCallbacks
    def review_fixes(self, daemon: Since) -> Any:
        """What a first review found: Anthropic text of consecutive messages is separated as OpenAI's is;
        claudesrv.append_system_prompt is applied (and refused beside system messages); a branch whose history
        is over --max-prompt is refused as /api/claude refuses a long prompt; client errors are typed as such."""
        a = yield in_thread(anthropic_turn, anthropic_client(daemon), [user("two [[fake lines=2]]")])
        self.assertEqual(a.text, "Fake reply line 1 of 2.\n\nFake reply line 2 of 2.")
        url = daemon.url + "/v1/chat/completions"
        r = yield post(url, {"messages": [user("asp")], "claudesrv": {"append_system_prompt": "From claudesrv."}})
        self.assertEqual((r.status, daemon.turns()[-1]["append_system_prompt"]), (200, "From claudesrv."))
        r = yield post(url, {"messages": [{"role": "system", "content": "S"}, user("asp")],
                             "claudesrv": {"append_system_prompt": "From claudesrv."}})
        self.assertEqual((r.status, r.json()["error"]["param"]), (400, "claudesrv"))
        r = yield post(url, {"messages": [user("x" * 1_100_000), assistant("ok"), user("max prompt")]})
        self.assertEqual((r.status, r.json()["error"]["code"]), (400, "prompt_too_large"))
        r = yield post(daemon.url + "/v1/messages", {"messages": [user("x")]}, headers={"Content-Type": "text/plain"})
        self.assertEqual((r.status, r.json()["error"]["type"]), (415, "invalid_request_error"))
