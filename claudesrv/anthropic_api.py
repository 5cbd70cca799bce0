"""
The Anthropic-compatible endpoint: ``POST /v1/messages`` in the Messages API's shape, over real sessions.

Sessions, options (a ``claudesrv`` object, the SDK's ``extra_body``) and policy are those of the OpenAI
endpoint (L{claudesrv.compat}); ``system`` becomes the session's ``append_system_prompt``. The answer's
``text`` blocks are the assistant's text, and ``thinking`` blocks carry Claude's thinking and its tool
activity (as ``--openai-tool-activity`` says).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

from claudesrv import compat
from claudesrv.compat import Message
from claudesrv.errors import ApiError, invalid, shaped
from claudesrv.live import Turn
from claudesrv.openai_api import DEFAULT_MODEL, model_choice

#: accepted and ignored: the CLI chooses these itself
IGNORED = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "thinking", "tool_choice",
           "service_tier", "container", "context_management", "mcp_servers", "inference_geo")
FIELDS = ("model", "messages", "system", "stream", "tools", "claudesrv", *IGNORED)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def _text_of(value: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    """A content value: a string, or text and image blocks."""
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise invalid("messages", f"{where}: content must be a string or an array of blocks")
    texts, images = [], []
    for block in value:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image":
            source = block.get("source")
            if not isinstance(source, dict) or source.get("type") != "base64" or \
                    source.get("media_type") not in IMAGE_TYPES or not isinstance(source.get("data"), str):
                raise invalid("messages", f"{where}: images must be base64 PNG, JPEG, GIF or WebP")
            images.append({"type": "image", "source": {"type": "base64", "media_type": source["media_type"],
                                                       "data": source["data"]}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the client's copy of an earlier answer's thinking: not part of the conversation
        elif kind in ("tool_use", "tool_result"):
            raise invalid("messages", f"{where}: tool use is not offered (Claude Code runs its own tools)")
        else:
            raise invalid("messages", f"{where}: content blocks must be text or image")
    return "\n\n".join(texts), images  # as an answer's text blocks are joined (Reply.reply)


def messages_of(body: dict[str, Any]) -> tuple[str | None, list[Message]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages", "messages must be a non-empty array")
    conversation = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise invalid("messages", f"messages[{i}] must be an object with role user or assistant")
        text, images = _text_of(m.get("content"), f"messages[{i}]")
        conversation.append(Message(m["role"], text, images))
    system = body.get("system")
    if system is not None:
        system, images = _text_of(system, "system")
        if images:
            raise invalid("system", "system must be text")
    return system or None, conversation


class Reply:
    """One answer being written: the events of a stream, or the parts of one message."""

    def __init__(self, turn: Turn, model: str, streaming: bool, activity: str) -> None:
        self.id = "msg_" + turn.turn_id
        self.model = model
        self.streaming = streaming
        self.activity = activity
        self.blocks: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.started = False

    def reply(self) -> str:
        return "\n\n".join(b["text"] for b in self.blocks if b["type"] == "text")

    def on_event(self, event: dict[str, Any]) -> bytes:
        out = b""
        if self.streaming and not self.started:
            self.started = True
            out = self._start()
        if event.get("type") == "result":
            self.result = event
            return out + (self._end() if self.streaming else b"")
        found = compat.pieces_of(event)
        thinking = found.thinking
        if found.activity and self.activity != "hidden":
            thinking += "".join(line + "\n" for line in found.activity)
        text = found.text
        if text and self.blocks and self.blocks[-1]["type"] == "text" and self.blocks[-1]["text"]:
            text = "\n\n" + text  # the text of the next message, as the OpenAI endpoint joins them
        for kind, piece in (("thinking", thinking), ("text", text)):
            if piece:
                out += self._add(kind, piece)
        return out

    def _start(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return _event("message_start", {"type": "message_start", "message": message})

    def _add(self, kind: str, piece: str) -> bytes:
        out = b""
        if not self.blocks or self.blocks[-1]["type"] != kind:
            if self.blocks and self.streaming:
                out += self._stop_block()
            block = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
            self.blocks.append(block)
            if self.streaming:
                out += _event("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                                      "content_block": block})
        self.blocks[-1][kind] += piece
        if self.streaming:
            delta = {"type": f"{kind}_delta", kind: piece}
            out += _event("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1,
                                                  "delta": delta})
        return out

    def _stop_block(self) -> bytes:
        return _event("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})

    def failure(self) -> str | None:
        return compat.failure_of(self.result)

    def usage(self) -> dict[str, int]:
        prompt, completion = compat.usage_tokens(self.result or {})
        return {"input_tokens": prompt, "output_tokens": completion}

    def stop_reason(self) -> str:
        return "max_tokens" if (self.result or {}).get("subtype") == "error_max_turns" else "end_turn"

    def _end(self) -> bytes:
        failure = self.failure()
        if failure is not None:
            return _event("error", shaped(b"/v1/messages", ApiError(500, "turn_failed", failure)))
        out = self._stop_block() if self.blocks else b""
        out += _event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": self.stop_reason(), "stop_sequence": None},
                                        "usage": self.usage()})
        return out + _event("message_stop", {"type": "message_stop"})

    def whole(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": self.blocks,
                "stop_reason": self.stop_reason(), "stop_sequence": None, "usage": self.usage()}


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class AnthropicEndpoint(compat.ChatEndpoint):
    def messages(self, request: IRequest) -> Any:
        body = compat.read_body(request, FIELDS, "{}: Extra inputs are not permitted")
        if body.get("tools"):
            raise invalid("tools", "tool use is not offered: Claude Code runs its own tools")
        system, conversation = messages_of(body)
        name = str(body.get("model") or DEFAULT_MODEL)

        def answer(turn: Turn) -> Reply:
            return Reply(turn, name, bool(body.get("stream")), self.activity)

        return self.run_chat(request, system, conversation, body, model_choice(body.get("model")), answer)
