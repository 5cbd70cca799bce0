"""
The OpenAI-compatible endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions``, over real sessions.

A request names its session as L{claudesrv.compat} describes; its last user message is the turn's prompt, its
system messages the session's ``append_system_prompt``, and a ``claudesrv`` object (the OpenAI SDK's
``extra_body``) carries the options of ``/api/claude``, validated and policed exactly as there. The answer is
the assistant's text; Claude's thinking and its tool activity go to ``reasoning_content`` (or into the
text, or nowhere: ``--openai-tool-activity``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from claudesrv import compat
from claudesrv.compat import Message
from claudesrv.errors import ApiError, invalid, json_body, shaped
from claudesrv.live import Turn

DEFAULT_MODEL = "claude-code"
ALIASES = ("sonnet", "opus", "haiku")
#: accepted and ignored: the CLI chooses these itself
IGNORED = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
           "stop", "seed", "user", "logit_bias", "logprobs", "top_logprobs", "parallel_tool_calls", "tool_choice",
           "metadata", "store", "response_format", "service_tier", "prediction", "modalities", "reasoning_effort",
           "verbosity", "web_search_options", "prompt_cache_key", "safety_identifier")
FIELDS = ("model", "messages", "stream", "stream_options", "n", "tools", "functions", "function_call", "claudesrv",
          *IGNORED)
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def model_choice(name: Any) -> str | None:
    """A request's model: claude-code (the server's default: None), claude-code/<model>, or a model name."""
    if name is None or name == DEFAULT_MODEL:
        return None
    if not isinstance(name, str) or not name:
        raise invalid("model", "model must be a string such as claude-code or claude-code/sonnet")
    return name.removeprefix(DEFAULT_MODEL + "/")


def image_of(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An image_url part (a base64 data: URL) as an image block."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise invalid("messages", f"{where}: images must be base64 data: URLs (data:image/png;base64,...)")
    media_type, data = url[5:].split(";base64,", 1)
    if media_type not in DATA_URL_TYPES:
        raise invalid("messages", f"{where}: images must be PNG, JPEG, GIF or WebP, not {media_type!r}")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def messages_of(value: Any) -> tuple[str | None, list[Message]]:
    """The system text and the conversation of a request's messages."""
    if not isinstance(value, list) or not value:
        raise invalid("messages", "messages must be a non-empty array")
    system: list[str] = []
    conversation: list[Message] = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise invalid("messages", f"{where} must be an object with role system, user or assistant")
        if m["role"] == "tool" or m.get("tool_calls"):
            raise invalid("messages", f"{where}: function calling is not offered (Claude Code runs its own tools)")
        content = m.get("content")
        text, images = "", []
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind == "image_url":
                    images.append(image_of(part, where))
                else:
                    raise invalid("messages", f"{where}: content parts must be text or image_url")
        elif content is not None or m["role"] != "assistant":
            raise invalid("messages", f"{where}: content must be a string or an array of parts")
        if m["role"] in ("system", "developer"):
            system.append(text)
        else:
            conversation.append(Message(m["role"], text, images))
    return ("\n\n".join(system) or None), conversation


class Completion:
    """One answer being written: the chunks of a stream, or the parts of one chat.completion."""

    def __init__(self, turn: Turn, model: str, streaming: bool, include_usage: bool, activity: str,
                 created: int) -> None:
        self.id = "chatcmpl-" + turn.turn_id
        self.model = model
        self.streaming = streaming
        self.include_usage = include_usage
        self.activity = activity
        self.created = created
        self.content = ""
        self.reasoning = ""
        self.result: dict[str, Any] | None = None
        self.started = False

    def on_event(self, event: dict[str, Any]) -> bytes:
        if event.get("type") == "result":
            self.result = event
            return self._end() if self.streaming else b""
        found = compat.pieces_of(event)
        text, reasoning = found.text, found.thinking
        if found.activity and self.activity == "reasoning":
            reasoning += "".join(line + "\n" for line in found.activity)
        elif found.activity and self.activity == "content":
            text = "".join(f"> {line}\n" for line in found.activity) + "\n" + text
        if text and self.content and not self.content.endswith("\n"):
            text = "\n\n" + text  # the text of the next message
        self.content += text
        self.reasoning += reasoning
        if not self.streaming or not (text or reasoning):
            return b""
        delta: dict[str, Any] = {}
        if text:
            delta["content"] = text
        if reasoning:
            delta["reasoning_content"] = reasoning
        return self._chunk(delta)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, usage: Any = None,
               choices: bool = True) -> bytes:
        if not self.started:
            self.started = True
            delta = {"role": "assistant", **delta}
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    def failure(self) -> str | None:
        return compat.failure_of(self.result)

    def reply(self) -> str:
        return self.content

    def usage(self) -> dict[str, int]:
        prompt, completion = compat.usage_tokens(self.result or {})
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finish_reason(self) -> str:
        return "length" if (self.result or {}).get("subtype") == "error_max_turns" else "stop"

    def _end(self) -> bytes:
        failure = self.failure()
        if failure is not None:
            error = shaped(b"/v1/chat/completions", ApiError(500, "turn_failed", failure))
            return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
        out = self._chunk({}, self.finish_reason())
        if self.include_usage:
            out += self._chunk({}, usage=self.usage(), choices=False)
        return out + b"data: [DONE]\n\n"

    def whole(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason()}],
                "usage": self.usage()}


class OpenAIEndpoints(compat.ChatEndpoint):
    def models(self, request: IRequest) -> bytes:
        """claude-code (the default model) and one entry per model the operator allows (aliases if any)."""
        policy = self.api.policy
        names = [p for p in policy.allow_models if not any(c in p for c in "*?[")] if policy.allow_models \
            else list(ALIASES)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "claudesrv"}
                for name in [DEFAULT_MODEL, *(f"{DEFAULT_MODEL}/{n}" for n in names)]]
        return json_body(request, 200, {"object": "list", "data": data})

    def completions(self, request: IRequest) -> Any:
        body = compat.read_body(request, FIELDS, "unrecognized request argument: {}")
        if body.get("n") not in (None, 1):
            raise invalid("n", "n must be 1: one answer per request")
        for name in ("tools", "functions"):
            if body.get(name):
                raise invalid(name, "function calling is not offered: Claude Code runs its own tools")
        options = body.get("stream_options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise invalid("stream_options", "stream_options must be an object")
        system, conversation = messages_of(body.get("messages"))
        name = str(body.get("model") or DEFAULT_MODEL)

        def answer(turn: Turn) -> Completion:
            return Completion(turn, name, bool(body.get("stream")), bool(options.get("include_usage")),
                              self.activity, int(self.api.live.clock.seconds()))

        return self.run_chat(request, system, conversation, body, model_choice(body.get("model")), answer)
