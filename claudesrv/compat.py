"""
What the OpenAI- and Anthropic-compatible endpoints share: which session a stateless chat request continues,
what is sent to Claude, and the session's events read back as parsed objects.

A chat client sends the whole conversation every time. The session it continues is named by an
``X-Session-Id`` header, else by Open WebUI's ``X-OpenWebUI-Chat-Id`` header (bound to the session its first
turn made), else found by the conversation itself: when everything before the last user message is exactly
the conversation a session has had so far (its head), that session is resumed and only the new message is
sent. Any other history (edited, regenerated, or from elsewhere) starts a new session, whose first prompt
carries the earlier messages as context: it branches, and no session is fed a turn twice. (A session named by
a header is the client's choice: a client that regenerates with the same chat id resumes the same session.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from claudesrv.command import ClaudeRequest, Prompt, is_canonical_uuid, parse_body, read_json
from claudesrv.errors import ApiError, invalid, json_body, shaped
from claudesrv.live import Turn
from claudesrv.sse import KEEPALIVE, Client
from claudesrv.store import SessionStore

if TYPE_CHECKING:
    from claudesrv.app import ClaudeAPI

log = Logger()

CHAT_HEADER = b"x-openwebui-chat-id"
REASONING_BLOCK = re.compile(r"<details\b[^>]*>.*?</details>\s*", re.DOTALL)  # what Open WebUI keeps of reasoning
ACTIVITY_HEAD = 200  # characters of a tool's result shown as activity


@dataclass
class Message:
    role: str  # system, user or assistant
    text: str
    images: list[dict[str, Any]] = field(default_factory=list)  # our image blocks


def normalized(text: str) -> str:
    """A message's text as it counts for recognising a conversation: no reasoning blocks, whitespace aside."""
    return " ".join(REASONING_BLOCK.sub("", text).split())


def fingerprint(messages: list[Message]) -> str:
    """The identity of a conversation: its roles, texts (as a client keeps them) and images, in order."""
    digest = hashlib.sha256()
    for m in messages:
        images = [hashlib.sha256(i["source"]["data"].encode()).hexdigest() for i in m.images]
        digest.update(json.dumps([m.role, normalized(m.text), images]).encode() + b"\n")
    return digest.hexdigest()


def prompt_of(text: str, images: list[dict[str, Any]]) -> Prompt:
    """What is sent: the text alone, or the images then the text as content blocks."""
    if not images:
        return text
    return [*images, *([{"type": "text", "text": text}] if text.strip() else [])]


@dataclass
class Chat:
    """One request's conversation: its system text, what came before the last user message, and that message."""

    system: str | None
    earlier: list[Message]
    last: Message
    chat_id: str | None = None
    session_id: str | None = None  # from the X-Session-Id header
    reply: str = ""  # what the client is given as the assistant's text (it sends it back next time)

    @classmethod
    def of(cls, request: IRequest, system: str | None, messages: list[Message], field_name: str) -> Chat:
        """Split a request's messages; the last must be the user's."""
        if not messages or messages[-1].role != "user":
            raise invalid(field_name, f"the last of {field_name} must be the user's message")
        header = request.getHeader(b"x-session-id")
        if header is not None and not is_canonical_uuid(header.decode("latin-1") if isinstance(header, bytes)
                                                         else header):
            raise ApiError(400, "invalid_header", "X-Session-Id must be a lower-case UUID as this server gives out")
        chat_id = request.getHeader(CHAT_HEADER)
        return cls(system, messages[:-1], messages[-1],
                   chat_id=(chat_id.decode("latin-1") if isinstance(chat_id, bytes) else chat_id) or None,
                   session_id=(header.decode("latin-1") if isinstance(header, bytes) else header) or None)

    def head_before(self) -> str:
        """The conversation a session must have had for this request to continue it."""
        return fingerprint(self._with_system(self.earlier))

    def head_after(self) -> str:
        """The conversation once this turn's reply is in it."""
        return fingerprint(self._with_system([*self.earlier, self.last, Message("assistant", self.reply)]))

    def _with_system(self, messages: list[Message]) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + messages

    def prompt(self, resumed: bool) -> Prompt:
        """Only the new message for a resumed session; for a new one, the earlier messages as context too."""
        if resumed or not self.earlier:
            return prompt_of(self.last.text, self.last.images)
        lines = ["This conversation began elsewhere; here it is so far, for context:", ""]
        for m in self.earlier:
            extra = f" [{len(m.images)} image(s) not repeated]" if m.images else ""
            lines.append(f"{m.role.capitalize()}: {m.text}{extra}")
        lines += ["", "The user now says:", "", self.last.text]
        return prompt_of("\n".join(lines), self.last.images)


class Conversations:
    """Finds the session a chat request continues, and remembers each session's head (see the module)."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    def session_of(self, chat: Chat) -> Deferred[str | None]:
        if chat.session_id is not None:
            return succeed(chat.session_id)
        if chat.chat_id is not None:
            return self.store.conversation("chat:" + chat.chat_id)
        if not chat.earlier:
            return succeed(None)
        return self.store.conversation("head:" + chat.head_before())

    def turn_done(self, session_id: str, chat: Chat) -> Deferred[None]:
        """The turn ended with a reply: the session's head moves on (and a chat id is bound to it)."""
        return self.store.advance_conversation(session_id, "head:" + chat.head_after(),
                                               "chat:" + chat.chat_id if chat.chat_id else None)


class EventReader:
    """
    Stands where the HTTP request stands for an L{claudesrv.sse.SseSink}: takes the session log's SSE frames,
    hands each event, parsed, to C{on_event}, and writes what that returns to the real request. Keepalive
    comments pass through only when C{keepalive} is set (a JSON answer has no room for them).
    """

    def __init__(self, request: Client, on_event: Callable[[dict[str, Any]], bytes], keepalive: bool) -> None:
        self.request = request
        self.on_event = on_event
        self.keepalive = keepalive
        self._buffer = b""

    def write(self, data: bytes) -> None:
        self._buffer += data
        *frames, self._buffer = self._buffer.split(b"\n\n")
        out = []
        for frame in frames:
            if frame.startswith(b":"):
                if self.keepalive:
                    out.append(KEEPALIVE)
                continue
            payload = frame[frame.index(b"data: ") + 6:] if b"data: " in frame else b""
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(self.on_event(event))
        if any(out):
            self.request.write(b"".join(out))

    def setResponseCode(self, code: int) -> None:
        self.request.setResponseCode(code)

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.request.setHeader(name, value)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.request.unregisterProducer()


def tool_summary(block: dict[str, Any]) -> str:
    """One line for a tool call: its name and what it acts on."""
    name = str(block.get("name") or "a tool")
    given = block.get("input")
    tool_input: dict[str, Any] = given if isinstance(given, dict) else {}
    for key in ("command", "file_path", "path", "pattern", "url", "query", "description"):
        value = tool_input.get(key)
        if isinstance(value, str) and value.strip():
            return f"{name}: {_one_line(value, 160)}"
    return f"{name}: {_one_line(json.dumps(tool_input, ensure_ascii=False), 160)}"


def tool_result_head(block: dict[str, Any]) -> str:
    """The start of a tool's result, on one line."""
    content = block.get("content")
    if isinstance(content, list):
        content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    prefix = "error: " if block.get("is_error") else ""
    return prefix + _one_line(str(content or ""), ACTIVITY_HEAD)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass
class Pieces:
    """What one event of the session's log gives a chat client: answer text, thinking, tool activity."""

    text: str = ""
    thinking: str = ""
    activity: list[str] = field(default_factory=list)


def pieces_of(event: dict[str, Any]) -> Pieces:
    """The parts of an event a chat client shows (the CLI's assistant and tool-result lines, our notices)."""
    found = Pieces()
    kind = event.get("type")
    message: dict[str, Any] = event["message"] if isinstance(event.get("message"), dict) else {}
    blocks: list[Any] = message["content"] if isinstance(message.get("content"), list) else []
    if kind == "assistant" and not event.get("parent_tool_use_id"):
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                found.text += str(block.get("text") or "")
            elif block.get("type") == "thinking":
                found.thinking += str(block.get("thinking") or "")
            elif block.get("type") == "tool_use":
                found.activity.append(tool_summary(block))
    elif kind == "user":
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                found.activity.append("  ⎿ " + tool_result_head(block))
    elif kind == "claudesrv" and event.get("subtype") in ("permission_denied", "queued", "permission_request"):
        found.activity.append(f"claudesrv: {event.get('subtype')} {event.get('tool_name') or ''}".rstrip())
    return found


def usage_tokens(result: dict[str, Any]) -> tuple[int, int]:
    """The turn's (prompt, completion) tokens from its result: input including cache reads and writes; output."""
    usage: dict[str, Any] = result["usage"] if isinstance(result.get("usage"), dict) else {}

    def count(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) else 0

    prompt = count("input_tokens") + count("cache_read_input_tokens") + count("cache_creation_input_tokens")
    return prompt, count("output_tokens")


def failure_of(result: dict[str, Any] | None) -> str | None:
    """Why a turn failed, from its result; None when it did not (max_turns counts as an ended answer)."""
    if result is None:
        return "the turn ended without a result"
    if not result.get("is_error") or result.get("subtype") == "error_max_turns":
        return None
    errors = result.get("errors")
    reason = result.get("terminal_reason") or result.get("subtype")
    text = "; ".join(str(e) for e in errors) if isinstance(errors, list) and errors else str(result.get("result"))
    return f"the turn failed ({reason}): {text}"


class Answer(Protocol):
    """One protocol's answer to a turn, built from the turn's events (see the two endpoints)."""

    streaming: bool

    def on_event(self, event: dict[str, Any]) -> bytes: ...

    def failure(self) -> str | None: ...

    def reply(self) -> str: ...

    def whole(self) -> dict[str, Any]: ...


def read_body(request: IRequest, fields: tuple[str, ...], unknown: str) -> dict[str, Any]:
    """A /v1 request's JSON object; a field not in C{fields} is 400 with C{unknown} (formatted with its name)."""
    assert request.content is not None
    body = read_json(request.content.read())
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    extra = sorted(set(body) - set(fields))
    if extra:
        raise ApiError(400, "unknown_parameter", unknown.format(extra[0]), extra[0])
    return body


def extra_options(body: dict[str, Any]) -> dict[str, Any]:
    """The ``claudesrv`` object of a request (the SDKs' ``extra_body``): fields of /api/claude."""
    extra = body.get("claudesrv", {})
    if not isinstance(extra, dict) or "prompt" in extra or "model" in extra:
        raise invalid("claudesrv", "claudesrv must be an object of /api/claude's fields, without prompt or model "
                                   "(they come from the messages and model fields)")
    if not isinstance(body.get("stream", False), bool):
        raise invalid("stream", "stream must be true or false")
    return extra


class ChatEndpoint:
    """What both endpoints do once a request is read: find its session, run the turn, answer, remember."""

    def __init__(self, api: ClaudeAPI, conversations: Conversations, activity: str = "reasoning") -> None:
        self.api = api
        self.conversations = conversations
        self.activity = activity

    def run_chat(self, request: IRequest, system: str | None, messages: list[Message], body: dict[str, Any],
                 model: str | None, answer: Callable[[Turn], Answer]) -> Deferred[Any]:
        """Validate the turn as /api/claude would (its schema and policy), then run it in its session."""
        chat = Chat.of(request, system, messages, "messages")
        fields: dict[str, Any] = {"prompt": prompt_of(chat.last.text, chat.last.images), **extra_options(body),
                                  "model": model}
        if system is not None:
            if fields.get("append_system_prompt") is not None:
                raise invalid("claudesrv", "give system messages or claudesrv.append_system_prompt, not both")
            fields["append_system_prompt"] = system
        turn = self.api.policy.apply(parse_body(fields, self.api.body_limits))
        d = self.conversations.session_of(chat)
        return d.addCallback(self._run, request, chat, turn, answer)

    def _run(self, session_id: str | None, request: IRequest, chat: Chat, turn: ClaudeRequest,
             answer: Callable[[Turn], Answer]) -> Any:
        session_id = session_id or turn.session_id  # else one the claudesrv object named
        prompt = chat.prompt(resumed=session_id is not None)
        limit = self.api.body_limits.max_prompt
        text = prompt if isinstance(prompt, str) else "".join(b.get("text", "") for b in prompt)
        if len(text.encode("utf-8", "replace")) > limit:
            raise ApiError(400, "prompt_too_large", f"the conversation so far is larger than {limit} bytes "
                                                    "(--max-prompt): start a new conversation", "messages")
        turn = dataclasses.replace(turn, prompt=prompt, session_id=session_id)

        def respond(request: IRequest, admitted: Turn) -> Deferred[Any]:
            given = answer(admitted)
            reader = EventReader(cast(Client, request), given.on_event, keepalive=given.streaming)
            d = self.api.stream(request, admitted, reader, event_stream=given.streaming)
            return d.addCallback(self._answered, request, admitted, chat, given)

        return self.api.run(request, turn, respond)

    def _answered(self, _: object, request: IRequest, turn: Turn, chat: Chat, answer: Answer) -> bytes:
        failure = answer.failure()
        if failure is None:
            chat.reply = answer.reply()
            self.conversations.turn_done(turn.session_id, chat).addErrback(
                lambda f: log.failure("could not remember the conversation of session {sid}", f, sid=turn.session_id))
        if answer.streaming:
            return b""  # the answer's end was written with its result
        if failure is not None:
            return json_body(request, 500, shaped(request.path, ApiError(500, "turn_failed", failure)))
        return json_body(request, 200, answer.whole())
