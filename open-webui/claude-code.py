"""
title: Claude Code (claudesrv)
author: claudesrv
version: 0.1.0
license: MIT
description: Chat with Claude Code through a claudesrv server, one Claude Code session per chat.
"""

# How to use (for the admin who pastes this file under Admin > Functions):
#   1. Set the valve base_url to the claudesrv server, and api_token if the server wants one.
#   2. Switch the function on; "Claude Code (claudesrv)" appears as a model.
#
# How to use (for the person chatting): type a request. Lines of these forms, one per line,
# are read as settings instead of being sent to Claude:
#   dangerously-skip-permissions=true
#   allowedTools=["Bash","Edit"]         (or allowedTools=Bash,Edit)
#   disallowedTools=["WebFetch"]
#   model=sonnet                         (an alias: sonnet, opus, haiku; or a full model name)
#   effort=high                          (low, medium, high, xhigh or max)
#   system_prompt=You are terse.         (replaces the system prompt; "a JSON string" for several lines)
#   max_budget_usd=0.50                  (the most a turn may spend, in US dollars)
#   new_session=true                     (start a fresh Claude Code session with this message)
#   prompt=...                           (this line's value and every line after it, verbatim)
# Settings given in earlier messages of the chat stay in force until overridden; an empty value
# (model=) goes back to the valve's default. Every other line, including other "x=y" lines, is
# part of the prompt. Images attached to the message are sent with it (PNG, JPEG, GIF, WebP).
#
# Each answer ends with a line "session_id=<uuid>": the next message resumes that session.
# The server enforces what is allowed; this pipe only forwards what the user asked for.
# Claude's thinking shows in Open WebUI's own reasoning block ("Thought for N seconds").
#
# Files: after the answer, the files Claude wrote or edited in the turn (Write, Edit, MultiEdit,
# NotebookEdit) are listed with links to download them from claudesrv (the valves file_links and
# public_base_url). Other files attached to a message are put in the session's folder, under
# uploads/, before the turn, and the prompt names them. The first message of a chat has no folder
# yet: its attached text files go into the prompt itself, and other files must be attached again
# with a later message.
#
# With the valve approvals on, a tool that was not pre-approved is not denied at once: Open WebUI
# shows a confirmation dialog (Confirm allows the tool, Cancel denies it), and a question from
# Claude (AskUserQuestion) becomes an input dialog. A dialog closed without an answer denies, at the
# latest when the server's wait for the answer runs out.

import asyncio
import binascii
import codecs
import html
import inspect
import json
import logging
import math
import posixpath
import re
import sys
import time
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import httpx
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)
clock = time.monotonic  # how long Claude thought is measured with this (tests replace it)

EventEmitter = Callable[[dict[str, Any]], Awaitable[Any]]
EventCall = Callable[[dict[str, Any]], Awaitable[Any]]

UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SESSION_MARKER = re.compile(r"^session_id=(" + UUID_PATTERN + r")$", re.MULTILINE)
SESSION_ID = re.compile(UUID_PATTERN)

SKIP_PERMISSIONS = "dangerously-skip-permissions"
ALLOWED_TOOLS = "allowedTools"
DISALLOWED_TOOLS = "disallowedTools"
NEW_SESSION = "new_session"
PROMPT = "prompt"
MODEL = "model"
EFFORT = "effort"
SYSTEM_PROMPT = "system_prompt"
MAX_BUDGET_USD = "max_budget_usd"
PARAMETER_LINE = re.compile(
    r"^[ \t]*(dangerously-skip-permissions|allowedTools|disallowedTools|model|effort|system_prompt|max_budget_usd"
    r"|new_session|prompt)[ \t]*=(.*)$"
)
# Settings sent as they are when set (None: not sent); an empty value in a message goes back to the valve's.
VALUE_KEYS = (MODEL, EFFORT, SYSTEM_PROMPT, MAX_BUDGET_USD)
# Settings that carry over from earlier messages of a chat (prompt and new_session apply once).
LASTING_KEYS = (SKIP_PERMISSIONS, ALLOWED_TOOLS, DISALLOWED_TOOLS, *VALUE_KEYS)

# What the server accepts (its /openapi.json): checked here too, so a typo is explained before anything is sent.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_:\[\]]{0,99}")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
MAX_BUDGET_LIMIT = 1_000_000

# Images attached in Open WebUI: the types Claude takes, told by their first bytes (Open WebUI's label may be wrong).
IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
MAX_IMAGES = 99  # the server takes at most 100 content blocks: the images and the text
DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),(.*)", re.DOTALL)

# Files attached in Open WebUI, put in the session's folder (or, for a new session, text files into the prompt)
UPLOADS_DIR = "uploads"
MAX_ATTACHMENT_BYTES = 32 * 1024 * 1024  # the server's default --max-body
INLINE_MAX_CHARS = 100_000  # most characters of attached text put into a new session's first prompt
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 100
MAX_EXTENSION_CHARS = 16
ATTACHMENT_TYPES = ("file", "text")  # Open WebUI's uploaded files, and a temporary chat's files (their text)

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")

STDERR_MAX_CHARS = 4000
SUMMARY_MAX_CHARS = 80
TITLE_MAX_CHARS = 60
MAX_REMEMBERED_CHATS = 10_000

NEW_SESSION_HINT = "Send your message again with a line `new_session=true` to start a fresh session."

# Approval dialogs (the approvals valve)
# (Open WebUI's dialog does not scroll: what does not fit is cut, saying how much was left out.)
APPROVAL_COMMAND_LINES = 25  # of a Bash command, in a dialog
APPROVAL_INPUT_MAX_CHARS = 1200  # most characters of a command, or of a tool's input as JSON, in a dialog
APPROVAL_HEAD_LINES = 12  # of a file's new content, in a dialog
APPROVAL_HEAD_CHARS = 600
ASK_USER_QUESTION = "AskUserQuestion"
EDIT_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
DECLINED = "The user declined this tool use in Open WebUI."
NOT_ANSWERED = "The user did not answer the question in Open WebUI."
REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")


class ParamError(ValueError):
    """A parameter line in the user's message has a value the pipe refuses to send."""


class NothingToSend(Exception):
    """The message had only files, and none of them could be put in the session's folder."""


# --------------------------------------------------------------------------- Server-Sent Events


class SSEDecoder:
    """
    Turns the bytes of a text/event-stream into the data of each event, as the bytes arrive.

    Follows the SSE rules: lines end in CRLF, LF or CR; a blank line ends an event; lines
    starting with ":" (keepalives) are comments; several "data:" lines join with "\\n". Frames
    may be split anywhere across chunks, even inside a UTF-8 character or between CR and LF.
    """

    _LINE_END = re.compile(r"\r\n|\r|\n")

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial: list[str] = []  # pieces of the line not yet ended
        self._data: list[str] = []  # the data lines of the event not yet ended
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it

    def feed(self, chunk: bytes) -> list[str]:
        """Take the next chunk; return the data of every event it completes."""
        text = self._utf8.decode(chunk)
        if not text:
            return []
        events: list[str] = []
        position = 0
        if self._skip_lf and text.startswith("\n"):
            position = 1
        self._skip_lf = False
        for end in self._LINE_END.finditer(text, position):
            line = "".join(self._partial) + text[position:end.start()]
            self._partial.clear()
            position = end.end()
            if end.group() == "\r" and position == len(text):
                self._skip_lf = True
            data = self._line(line)
            if data is not None:
                events.append(data)
        if position < len(text):
            self._partial.append(text[position:])
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data.clear()
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def parse_sse(chunks: Iterable[bytes]) -> Iterator[str]:
    """The data of each complete event in a stream given as chunks of bytes."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)


def decode_event(data: str) -> dict[str, Any] | None:
    """One event's data as the CLI's JSON object, or None when it is not one."""
    try:
        event = json.loads(data)
    except ValueError:
        log.warning("claudesrv sent an event that is not JSON: %.200s", data)
        return None
    return event if isinstance(event, dict) else None


# --------------------------------------------------------------------------- messages and parameters


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts of which the text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return ""


def parse_bool(key: str, value: str) -> bool:
    """A yes/no parameter value."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ParamError(f"`{key}` must be true or false, not `{value}`.")


def split_tools(value: str) -> list[str]:
    """Split ``Bash,Edit`` at the commas outside parentheses, so ``Bash(touch a,b)`` stays whole."""
    tools: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "," and depth == 0:
            tools.append("".join(current))
            current = []
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth > 0:
            depth -= 1
        current.append(char)
    tools.append("".join(current))
    return [tool.strip() for tool in tools if tool.strip()]


def parse_tools(key: str, value: str) -> list[str]:
    """A tool list: a JSON list of strings (``["Bash","Edit"]``) or names separated by commas."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            raise ParamError(f'`{key}` must be a JSON list of tool names, such as ["Bash","Edit"].') from None
        if not isinstance(items, list) or not all(isinstance(item, str) and item.strip() for item in items):
            raise ParamError(f'`{key}` must be a list of non-empty tool names, such as ["Bash","Edit"].')
        tools = [item.strip() for item in items]
    else:
        tools = split_tools(value)
    for tool in tools:
        if tool.startswith("-"):
            raise ParamError(f"`{key}` holds `{tool}`: tool names must not start with `-`.")
        if any(ord(char) < 32 or ord(char) == 127 for char in tool):
            raise ParamError(f"`{key}` holds a tool name with control characters.")
    return tools


def parse_text(key: str, value: str) -> str | None:
    """
    A text value: as typed (trimmed), or, when it starts with a double quote, a JSON string (which can hold
    several lines, ``"line one\\nline two"``). Empty: None, which means the default.
    """
    value = value.strip()
    if value.startswith('"'):
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = None
        if not isinstance(decoded, str):
            raise ParamError(f'`{key}` starts with a double quote, so it must be one JSON string, such as '
                             f'"first line\\nsecond line".')
        value = decoded
    return check_text(key, value)


def check_text(key: str, value: str) -> str | None:
    """A text setting as it will be sent: None when empty; refused when it starts with ``-`` or holds NUL."""
    if not value.strip():
        return None
    if value.startswith("-"):
        raise ParamError(f"`{key}` must not start with `-`.")
    if "\0" in value:
        raise ParamError(f"`{key}` must not contain NUL characters.")
    return value


def parse_model(key: str, value: str) -> str | None:
    """A model: an alias (sonnet, opus, haiku) or a full name, as the server accepts them; empty: None."""
    model = parse_text(key, value)
    if model is not None and not MODEL_NAME.fullmatch(model):
        raise ParamError(f"`{key}` must be a model alias such as sonnet, opus or haiku, or a full model name "
                         f"(letters, digits and . - _ : [ ], at most 100 characters), not `{one_line(model)}`.")
    return model


def parse_effort(key: str, value: str) -> str | None:
    """An effort level (any case); empty: None."""
    effort = parse_text(key, value)
    if effort is None:
        return None
    if effort.strip().lower() not in EFFORTS:
        raise ParamError(f"`{key}` must be one of {', '.join(EFFORTS)}, not `{one_line(effort)}`.")
    return effort.strip().lower()


def parse_budget(key: str, value: str) -> float | None:
    """A budget in US dollars (``0.50``, ``$2``), above 0 and at most the server's limit; empty: None."""
    text = parse_text(key, value)
    if text is None:
        return None
    try:
        budget = float(text.strip().removeprefix("$"))
    except ValueError:
        budget = math.nan
    if not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_LIMIT):
        raise ParamError(f"`{key}` must be a number of US dollars above 0 and at most {MAX_BUDGET_LIMIT:,}, "
                         f"such as 0.50, not `{one_line(text)}`.")
    return budget


VALUE_PARSERS: dict[str, Callable[[str, str], Any]] = {
    MODEL: parse_model, EFFORT: parse_effort, SYSTEM_PROMPT: parse_text, MAX_BUDGET_USD: parse_budget,
}


def parse_params(text: str) -> tuple[dict[str, Any], str]:
    """
    Split a user's message into its parameter lines and its prompt.

    Only the known keys are read (dangerously-skip-permissions, allowedTools, disallowedTools,
    model, effort, system_prompt, max_budget_usd, new_session, prompt), one per line; every other
    line, ``x=y`` lines included, stays in the prompt. ``prompt=`` takes its own value and every
    line after it verbatim, after any other text before it. A value starting with ``-``, or one
    the server would refuse, is refused with L{ParamError}; an empty model, effort, system_prompt
    or max_budget_usd is None (back to the default).
    Returns the parameters (keyed as the server names them) and the prompt, trimmed.
    """
    params: dict[str, Any] = {}
    kept: list[str] = []
    lines = text.split("\n")
    for index, line in enumerate(lines):
        match = PARAMETER_LINE.match(line.rstrip("\r"))
        if match is None:
            kept.append(line)
            continue
        key, value = match.group(1), match.group(2)
        if key == PROMPT:
            value = "\n".join([line[match.start(2):], *lines[index + 1:]]).lstrip(" \t")
            if value.startswith("-"):
                raise ParamError("`prompt` must not start with `-`.")
            kept.append(value)
            break
        value = value.strip()
        if value.startswith("-"):
            raise ParamError(f"`{key}` must not start with `-` (got `{value}`).")
        if key in (SKIP_PERMISSIONS, NEW_SESSION):
            params[key] = parse_bool(key, value)
        elif key in VALUE_PARSERS:
            params[key] = VALUE_PARSERS[key](key, value)
        else:
            params[key] = parse_tools(key, value)
    return params, "\n".join(kept).strip()


def user_messages(messages: list[dict[str, Any]]) -> list[str]:
    """The text of every user message, oldest first."""
    return [message_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]


def valve_defaults(valves: Any) -> dict[str, Any]:
    """The settings the valves give (raises L{ParamError} naming the valve when one is refused)."""
    return {
        SKIP_PERMISSIONS: bool(valves.default_skip_permissions),
        ALLOWED_TOOLS: parse_tools("default_allowed_tools valve", valves.default_allowed_tools),
        DISALLOWED_TOOLS: parse_tools("default_disallowed_tools valve", valves.default_disallowed_tools),
        MODEL: parse_model("default_model valve", valves.default_model),
        EFFORT: parse_effort("default_effort valve", valves.default_effort),
        SYSTEM_PROMPT: check_text("default_system_prompt valve", valves.default_system_prompt.strip()),
        MAX_BUDGET_USD: parse_budget("default_max_budget_usd valve", valves.default_max_budget_usd),
    }


def collect_params(messages: list[dict[str, Any]], valves: Any) -> tuple[dict[str, Any], str]:
    """
    The parameters in force for the newest user message, and its prompt.

    The valves give the defaults; settings from earlier user messages carry over (a message that
    was refused counts for nothing); the newest message overrides them. An empty model, effort,
    system_prompt or max_budget_usd goes back to the valve's default. Raises L{ParamError} when the
    newest message, or a valve, has a refused value.
    """
    defaults = valve_defaults(valves)
    params = dict(defaults)

    def apply(given: dict[str, Any], keys: Iterable[str]) -> None:
        for key in keys:
            if key in given:
                params[key] = defaults[key] if key in VALUE_KEYS and given[key] is None else given[key]

    texts = user_messages(messages)
    if not texts:
        return params, ""
    for earlier in texts[:-1]:
        try:
            given, _ = parse_params(earlier)
        except ParamError:
            continue
        apply(given, LASTING_KEYS)
    given, prompt = parse_params(texts[-1])
    apply(given, given.keys())
    return params, prompt


def build_payload(prompt: str | list[dict[str, Any]], params: dict[str, Any], session_id: str | None,
                  approvals: bool = False) -> dict[str, Any]:
    """
    The JSON body of POST /api/claude: the prompt (a string, or content blocks when images come with it),
    and the session and settings that are set (``approvals``: ask this pipe about tools that are not
    pre-approved).
    """
    payload: dict[str, Any] = {"prompt": prompt}
    if session_id is not None:
        payload["session_id"] = session_id
    if params.get(SKIP_PERMISSIONS):
        payload[SKIP_PERMISSIONS] = True
    for key in (ALLOWED_TOOLS, DISALLOWED_TOOLS):
        if params.get(key):
            payload[key] = list(params[key])
    for key in VALUE_KEYS:
        if params.get(key) is not None:
            payload[key] = params[key]
    if approvals:
        payload["approvals"] = True
    return payload


def setting_line(key: str, value: Any) -> str:
    """One setting as the user would type it (a text that would not read back the same as a JSON string)."""
    if isinstance(value, str) and (value != value.strip() or "\n" in value or value.startswith('"')):
        return f"{key}={json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def describe_params(params: dict[str, Any]) -> str:
    """The lasting settings as the user would type them (the model, effort, ... only when set)."""
    return "\n".join(setting_line(key, params[key]) for key in LASTING_KEYS
                     if key in params and not (key in VALUE_KEYS and params[key] is None))


def has_parameters(text: str) -> bool:
    """Whether the text holds at least one parameter line."""
    return any(PARAMETER_LINE.match(line.rstrip("\r")) for line in text.split("\n"))


def empty_prompt_reply(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """What to answer, without calling the server, when the newest message has no prompt."""
    texts = user_messages(messages)
    if params.get(NEW_SESSION):
        return "Put your request in the same message as `new_session=true`."
    if texts and has_parameters(texts[-1]):
        return ("These settings apply to your next messages in this chat:\n\n"
                + code_block(describe_params(params)))
    return "There is nothing to send: the message has no text."


# --------------------------------------------------------------------------- images


def sniff_image(data: bytes) -> str | None:
    """The media type of image data Claude takes (PNG, JPEG, GIF, WebP), told by its first bytes; else None."""
    for magic, media_type in IMAGE_MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_block(url: Any) -> tuple[dict[str, Any] | None, str]:
    """
    An attached image's URL as an image content block, or None and why it cannot be sent. Only ``data:`` URLs
    in base64 of a PNG, JPEG, GIF or WebP image are sent, with the media type their bytes show.
    """
    if not isinstance(url, str) or not url.strip():
        return None, "an attachment without image data"
    found = DATA_URL.fullmatch(url.strip())
    if found is None:
        return None, f"an image given as a link, not as data ({one_line(url, 60)})"
    declared = found.group(1).strip().lower() or "text/plain"
    if "base64" not in [part.strip().lower() for part in found.group(2).split(";")]:
        return None, f"an attachment of type {declared} that is not base64 data"
    encoded = re.sub(r"\s+", "", found.group(3))
    try:
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):
        return None, f"an attachment of type {declared} whose data is not valid base64"
    media_type = sniff_image(data)
    if media_type is None:
        return None, f"an attachment of type {declared} (Claude takes PNG, JPEG, GIF and WebP images)"
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": encoded}}, ""


def message_images(content: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """
    The image content blocks of a message's content (Open WebUI's ``image_url`` parts, which it fills with
    ``data:`` URLs), and what could not be sent, said in a few words each.
    """
    blocks: list[dict[str, Any]] = []
    skipped: list[str] = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict) or part.get("type") not in ("image_url", "input_image"):
            continue
        url = part.get("image_url")
        block, why = image_block(url.get("url") if isinstance(url, dict) else url)
        if block is None:
            skipped.append(why)
        elif len(blocks) < MAX_IMAGES:
            blocks.append(block)
        else:
            skipped.append(f"an image past the first {MAX_IMAGES} of the message")
    return blocks, skipped


def last_user_content(messages: list[dict[str, Any]]) -> Any:
    """The content of the newest user message (None without one)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content")
    return None


def skipped_note(skipped: list[str], what: str = "Not sent to Claude") -> str:
    """A short note on the attachments that were not sent (or, as C{what} says, what else befell them)."""
    counts: dict[str, int] = {}
    for why in skipped:
        counts[why] = counts.get(why, 0) + 1
    said = "; ".join(why if n == 1 else f"{why} (×{n})" for why, n in counts.items())
    return f"_{what}: {said}._"


# --------------------------------------------------------------------------- attached files


class Attachment:
    """A file attached to the newest message: the name it is put in the workspace under, and its bytes."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data


def is_raster_image(content_type: Any) -> bool:
    """Whether Open WebUI sends a file of this type as an image (in the message) rather than as a file: any
    image but SVG, as Open WebUI decides it."""
    base = str(content_type or "").split(";")[0].strip().lower()
    return base.startswith("image/") and base != "image/svg+xml"


def attachment_record(item: dict[str, Any]) -> dict[str, Any]:
    """The file record Open WebUI's browser put in an attachment (its upload's answer), or {}."""
    record = item.get("file")
    return record if isinstance(record, dict) else {}


def attachment_content_type(item: dict[str, Any]) -> str:
    meta = attachment_record(item).get("meta")
    found = item.get("content_type") or (meta.get("content_type") if isinstance(meta, dict) else None)
    return found if isinstance(found, str) else ""


def attachment_name(item: dict[str, Any]) -> str:
    """The name the user saw for an attachment."""
    record = attachment_record(item)
    meta = record.get("meta")
    for name in (item.get("name"), record.get("filename"), meta.get("name") if isinstance(meta, dict) else None):
        if isinstance(name, str) and name.strip():
            return name.strip()
    return "file"


def attachment_items(metadata: dict[str, Any] | None, files: Any) -> list[dict[str, Any]]:
    """
    The files attached to the newest message, as Open WebUI describes them: the ``files`` of its
    ``user_message`` (in ``__metadata__``) when Open WebUI gives that message, else ``__files__`` (which in
    Open WebUI 0.12 also holds the files of the chat's earlier messages). Only uploaded files and a temporary
    chat's text files count: images go with the message as image blocks, and knowledge collections, notes,
    chats and web searches are not files.
    """
    user_message = (metadata or {}).get("user_message")
    items = user_message.get("files") if isinstance(user_message, dict) else files
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or item.get("type") not in ATTACHMENT_TYPES:
            continue
        if is_raster_image(attachment_content_type(item)):
            continue
        key = str(item.get("id") or "") or json.dumps(item, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            found.append(item)
    return found


def safe_name(name: str, taken: set[str]) -> str:
    """
    A file name to put an attachment under: the last part of the name, its characters outside letters,
    digits, ``.``, ``_`` and ``-`` replaced by ``_``, no leading dot or dash, at most MAX_NAME_CHARS, and
    not one of C{taken} (compared ignoring case; ``a-2.txt`` after ``a.txt``), which it is added to.
    """
    base = re.split(r"[\\/]", name)[-1]
    base = UNSAFE_NAME_CHARS.sub("_", base).lstrip(".-")
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem or len(extension) > MAX_EXTENSION_CHARS:
        stem, dot, extension = base, "", ""
    stem = stem[:MAX_NAME_CHARS - len(dot + extension)] or "file"
    candidate, number = stem + dot + extension, 1
    while candidate.lower() in taken:
        number += 1
        candidate = f"{stem[:MAX_NAME_CHARS - len(dot + extension) - 1 - len(str(number))]}-{number}{dot}{extension}"
    taken.add(candidate.lower())
    return candidate


def openwebui_object(module: str, name: str) -> Any:
    """An object of Open WebUI's own, from its module already loaded in this process; None elsewhere (nothing is
    imported: outside Open WebUI there is no such module)."""
    return getattr(sys.modules.get(module), name, None)


class TooLarge(Exception):
    """An attachment holds more than MAX_ATTACHMENT_BYTES."""

    def __str__(self) -> str:
        return f"larger than {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MiB"


def read_local_file(path: str) -> bytes:
    """A file's bytes; L{TooLarge} when it holds more than MAX_ATTACHMENT_BYTES."""
    with open(path, "rb") as f:
        data = f.read(MAX_ATTACHMENT_BYTES + 1)
    if len(data) > MAX_ATTACHMENT_BYTES:
        raise TooLarge()
    return data


async def read_attachment(item: dict[str, Any], user: dict[str, Any] | None) -> tuple[bytes | None, str]:
    """
    An attachment's bytes, or None and why they could not be had. A temporary chat's file is its text. An
    uploaded file is read through Open WebUI's own file table and storage (loaded in its process), and only
    when it belongs to the user (or the user is an admin), as Open WebUI's own download checks: the path in
    the attachment comes from the browser and is never trusted.
    """
    if item.get("type") == "text":
        content = item.get("content")
        if not isinstance(content, str):
            return None, "a temporary chat's file without its text"
        data = content.encode("utf-8", "surrogatepass")
        return (data, "") if len(data) <= MAX_ATTACHMENT_BYTES else (None, str(TooLarge()))
    file_id = item.get("id") or attachment_record(item).get("id")
    if not isinstance(file_id, str) or not file_id.strip():
        return None, "an upload Open WebUI had not finished"
    files_table = openwebui_object("open_webui.models.files", "Files")
    if files_table is None:
        return None, "Open WebUI's file store is not reachable from this pipe"
    user = user or {}
    try:
        record = files_table.get_file_by_id(file_id)
        if inspect.isawaitable(record):
            record = await record
        owner = getattr(record, "user_id", None)
        if record is None or not ((owner is not None and owner == user.get("id")) or user.get("role") == "admin"):
            return None, "not a file of yours in Open WebUI"
        path = getattr(record, "path", None)
        if not isinstance(path, str) or not path:
            return None, "Open WebUI has no content for it"
        storage = openwebui_object("open_webui.storage.provider", "Storage")
        local = await asyncio.to_thread(storage.get_file, path) if storage is not None else path
        return await asyncio.to_thread(read_local_file, str(local)), ""
    except TooLarge as e:
        return None, str(e)
    except Exception as e:
        log.warning("claude-code pipe: reading the attachment %r failed: %s: %s", file_id, type(e).__name__, e)
        return None, f"Open WebUI could not give its content ({type(e).__name__})"


async def read_attachments(items: list[dict[str, Any]], user: dict[str, Any] | None
                           ) -> tuple[list[Attachment], list[str]]:
    """The attachments that could be read, each under a safe name of its own, and what could not, in a few
    words each."""
    attachments: list[Attachment] = []
    skipped: list[str] = []
    taken: set[str] = set()
    for item in items:
        name = attachment_name(item)
        data, why = await read_attachment(item, user)
        if data is None:
            skipped.append(f"{one_line(name, 60)} ({why})")
        else:
            attachments.append(Attachment(safe_name(name, taken), data))
    return attachments, skipped


def prompt_fence(text: str) -> str:
    """A code fence longer than any backtick run in the text (which is kept as it is, for Claude)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def inline_attachments(prompt: str, attachments: list[Attachment]) -> tuple[str, list[str]]:
    """
    A new session's prompt with its attached text files in it (UTF-8 without NUL bytes, at most
    INLINE_MAX_CHARS in all), and the names of the files left out: a new session has no folder to put them in
    before its first turn.
    """
    parts = [prompt] if prompt else []
    left_out: list[str] = []
    used = 0
    for attachment in attachments:
        try:
            text = attachment.data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text or used + len(text) > INLINE_MAX_CHARS:
            left_out.append(attachment.name)
            continue
        used += len(text)
        fence = prompt_fence(text)
        parts.append(f"Attached file {attachment.name}:\n{fence}\n{text.rstrip(chr(10))}\n{fence}")
    return "\n\n".join(parts), left_out


def left_out_note(names: list[str]) -> str:
    """What a new session's first message could not take along."""
    return (f"_Not sent to Claude: {', '.join(names)}. A new chat has no folder for files before Claude's first "
            "answer, so only text files go with the first message (in it): attach the others again with your "
            "next message._")


def uploaded_line(names: list[str]) -> str:
    """The line added to the prompt naming the files put in the workspace."""
    return f"Attached files are in {UPLOADS_DIR}/: {', '.join(names)}"


# --------------------------------------------------------------------------- files changed in a turn


class ChangedFiles:
    """
    The files Claude wrote or edited in a turn, from its tool calls: each Write, Edit, MultiEdit or
    NotebookEdit call whose tool result is not an error counts (files changed otherwise, by Bash say, do not
    show). Their paths are made relative to the session's folder, the CLI's working directory, which
    system/init gives.
    """

    def __init__(self) -> None:
        self.cwd: str | None = None
        self.calls: dict[str, str] = {}  # tool_use id -> the file's path, until its result
        self.paths: list[str] = []  # as Claude gave them, oldest first, each once

    def see(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            cwd = event.get("cwd")
            if isinstance(cwd, str) and cwd.startswith("/"):
                self.cwd = cwd
            return
        message = event.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) and kind in ("assistant", "user") else []:
            if not isinstance(block, dict):
                continue
            if kind == "assistant" and block.get("type") == "tool_use" and block.get("name") in EDIT_TOOLS:
                tool_input = block.get("input")
                path = next((tool_input[key] for key in ("file_path", "notebook_path")
                             if isinstance(tool_input, dict) and isinstance(tool_input.get(key), str)), None)
                if path and isinstance(block.get("id"), str):
                    self.calls[block["id"]] = path
            elif kind == "user" and block.get("type") == "tool_result":
                path = self.calls.pop(str(block.get("tool_use_id")), None)
                if path is not None and not block.get("is_error") and path not in self.paths:
                    self.paths.append(path)

    def relative(self) -> list[str]:
        """The changed files inside the session's folder, relative to it (none without its folder)."""
        if self.cwd is None:
            return []
        found: list[str] = []
        for path in self.paths:
            relative = workspace_path(path, self.cwd)
            if relative is not None and relative not in found:
                found.append(relative)
        return found


def workspace_path(path: str, cwd: str) -> str | None:
    """A path Claude gave (absolute, or relative to C{cwd}) relative to the folder C{cwd}; None outside it."""
    root = posixpath.normpath(cwd)
    full = posixpath.normpath(posixpath.join(root, path))
    prefix = root if root.endswith("/") else root + "/"
    if not full.startswith(prefix) or full == root:
        return None
    return full[len(prefix):]


def file_url(base_url: str, session_id: str, path: str) -> str:
    """The claudesrv URL that downloads a file of a session's folder."""
    return (f"{base_url.rstrip('/')}/api/sessions/{session_id}/files/"
            f"{urllib.parse.quote(path, safe='/')}")


def render_file_links(paths: list[str], base_url: str, session_id: str, token: bool) -> str:
    """The list of changed files, each a link that downloads it; with C{token}, a word on why a browser alone
    cannot open them."""
    lines = ["**Files changed:**"]
    lines += [f"- [{defuse_tags(inline_code(path))}]({file_url(base_url, session_id, path)})" for path in paths]
    text = "\n".join(lines)
    if token:
        text += ("\n\n_claudesrv wants its token for these links too, so a browser alone gets 401: download them "
                 "with an `Authorization: Bearer` header._")
    return text


# --------------------------------------------------------------------------- sessions

_DETAILS_INNERMOST = re.compile(r"<details\b[^>]*>(?:(?!<details\b).)*?</details\s*>", re.IGNORECASE | re.DOTALL)
_DETAILS_UNCLOSED = re.compile(r"<details\b.*", re.IGNORECASE | re.DOTALL)


def strip_details(text: str) -> str:
    """The text without its ``<details>`` blocks (nested ones too; an unclosed one runs to the end)."""
    while True:
        stripped = _DETAILS_INNERMOST.sub("", text)
        if stripped == text:
            break
        text = stripped
    return _DETAILS_UNCLOSED.sub("", text)


def find_session_id(messages: list[dict[str, Any]]) -> str | None:
    """
    The session to resume: the newest ``session_id=<uuid>`` line outside ``<details>`` blocks in
    the assistant messages, searching the newest message first (the last marker within it wins).
    """
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        found = SESSION_MARKER.findall(strip_details(message_text(message.get("content"))))
        if found:
            return str(found[-1])
    return None


# --------------------------------------------------------------------------- rendering


def truncate(text: str, limit: int) -> str:
    """At most ``limit`` characters of the text, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters)"


def truncate_start(text: str, limit: int) -> str:
    """The last ``limit`` characters of the text (where error messages usually are)."""
    if len(text) <= limit:
        return text
    return f"({len(text) - limit} characters before) …\n" + text[-limit:]


def defuse_tags(text: str) -> str:
    """
    Keep ``<details>`` and ``<summary>`` tags in shown output from opening or closing our
    collapsible blocks (Open WebUI matches them even inside code blocks): a zero-width space
    after the ``<`` leaves them looking the same but inert.
    """
    return re.sub(r"<(/?(?:details|summary))", "<\u200b\\1", text, flags=re.IGNORECASE)


def code_block(text: str, language: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run inside the text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{defuse_tags(text)}\n{fence}"


def collapsible(summary: str, body: str) -> str:
    """A closed ``<details>`` block: a one-line plain-text summary and a Markdown body."""
    head = f"<details>\n<summary>{defuse_tags(one_line(summary, 2 * SUMMARY_MAX_CHARS))}</summary>"
    if not body:
        return head + "\n</details>"
    return f"{head}\n\n{body}\n\n</details>"


def one_line(text: str, limit: int = SUMMARY_MAX_CHARS) -> str:
    """Text squeezed onto one line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tool_hint(tool_input: Any) -> str:
    """The most telling argument of a tool call, for its one-line summary."""
    if isinstance(tool_input, dict):
        for key in ("command", "file_path", "path", "pattern", "url", "query", "description", "prompt"):
            value = tool_input.get(key)
            if isinstance(value, str) and value.strip():
                return one_line(value)
    return ""


def tool_result_text(content: Any) -> str:
    """A tool result's content as text: a string, or a list of text (and image) parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") == "image":
                texts.append("[image]")
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(texts)
    if content is None:
        return ""
    return json.dumps(content, ensure_ascii=False)


def render_tool_use(block: dict[str, Any], valves: Any) -> str:
    """A tool call as a collapsed block: name and main argument, then the arguments as JSON."""
    name = str(block.get("name") or "tool")
    hint = tool_hint(block.get("input"))
    summary = f"Tool: {name}" + (f": {hint}" if hint else "")
    body = ""
    if valves.tool_output_max_chars > 0:
        arguments = json.dumps(block.get("input", {}), indent=2, ensure_ascii=False)
        body = code_block(truncate(arguments, valves.tool_output_max_chars), "json")
    return collapsible(summary, body)


def render_tool_result(block: dict[str, Any], valves: Any) -> str:
    """A tool result as a collapsed block: a preview in the summary, then the (truncated) output."""
    text = tool_result_text(block.get("content"))
    summary = "Tool error" if block.get("is_error") else "Tool result"
    summary += f": {one_line(text)}" if text.strip() else " (empty)"
    body = ""
    if valves.tool_output_max_chars > 0 and text.strip():
        body = code_block(truncate(text, valves.tool_output_max_chars))
    return collapsible(summary, body)


def render_error(event: dict[str, Any]) -> str:
    """A readable account of a ``result`` event whose ``is_error`` is true."""
    messages: list[str] = []
    result = event.get("result")
    if isinstance(result, str) and result.strip():
        messages.append(result.strip())
    errors = event.get("errors")
    if isinstance(errors, list):
        messages.extend(str(error) for error in errors if str(error).strip())
    if not messages:
        messages.append("the run ended with an error")
    facts: list[str] = []
    reason = event.get("terminal_reason")
    if reason:
        timeout = event.get("timeout")
        facts.append(f"reason: {reason}" + (f" ({timeout})" if timeout else ""))
    if event.get("api_error_status") is not None:
        facts.append(f"API status {event['api_error_status']}")
    if event.get("exit_code") is not None:
        facts.append(f"exit code {event['exit_code']}")
    if event.get("signal") is not None:
        facts.append(f"signal {event['signal']}")
    text = "**Claude Code failed:** " + "\n".join(messages)
    if facts:
        text += f"\n\n_({', '.join(facts)})_"
    stderr = event.get("stderr")
    if isinstance(stderr, str) and stderr.strip():
        text += "\n\n" + collapsible("stderr", code_block(truncate_start(stderr.strip(), STDERR_MAX_CHARS)))
    return text


def render_thinking(thinking: str, seconds: int) -> str:
    """
    Claude's thinking in Open WebUI's own reasoning block, written as Open WebUI writes it for a model's
    reasoning: ``<details type="reasoning" done="true" duration="N">``, a summary, then the lines quoted
    with ``> `` and HTML-escaped (Open WebUI unescapes them to show them; so nothing in them can close
    the block). Open WebUI shows it collapsed, titled "Thought for N seconds".
    """
    quoted = "\n".join(line if line.startswith(">") else f"> {line}" for line in thinking.strip().splitlines())
    return (f'<details type="reasoning" done="true" duration="{seconds}">\n'
            f"<summary>Thought for {seconds} seconds</summary>\n{html.escape(quoted)}\n</details>")


def render_event(event: dict[str, Any], valves: Any, elapsed: float = 0.0) -> str:
    """
    The Markdown one CLI event adds to the answer ("" for none): assistant text as it is, thinking in
    Open WebUI's reasoning block (``elapsed``: the seconds since the event before, which the CLI spent
    on it), tool calls and results as collapsed ``<details>`` blocks when the valves show them, and a
    readable error for a failed ``result``. Blocks are separated by blank lines.
    """
    kind = event.get("type")
    message = event.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    pieces: list[str] = []
    if kind == "assistant" and isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str) and block["text"]:
                pieces.append(block["text"])
            elif block.get("type") == "tool_use" and valves.show_tools:
                pieces.append(render_tool_use(block, valves))
            elif block.get("type") == "thinking" and valves.show_thinking:
                thinking = str(block.get("thinking") or "")
                if thinking.strip():
                    pieces.append(render_thinking(thinking, max(0, int(elapsed))))
    elif kind == "user" and isinstance(content, list) and valves.show_tools:
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                pieces.append(render_tool_result(block, valves))
    elif kind == "result" and event.get("is_error"):
        pieces.append(render_error(event))
    return "\n\n".join(pieces)


def status_for_event(event: dict[str, Any]) -> str | None:
    """A status line for an event worth announcing, or None."""
    kind, subtype = event.get("type"), event.get("subtype")
    if kind == "system" and subtype == "init":
        return "Claude Code is working…"
    if kind == "system" and subtype == "api_retry":
        return (f"API error {event.get('error_status', '')}, retrying "
                f"({event.get('attempt', '?')}/{event.get('max_retries', '?')})…")
    if kind in ("system", "claudesrv") and subtype == "permission_denied":
        return f"Permission denied: {event.get('tool_name', 'a tool')}"
    if kind == "claudesrv" and subtype == "queued":
        return f"Waiting for a free Claude Code process (position {event.get('position', '?')})…"
    if kind == "claudesrv" and subtype == "permission_request":
        tool = str(event.get("tool_name") or "a tool")
        return "Claude asks you a question" if tool == ASK_USER_QUESTION else f"Waiting for your approval: {tool}"
    if kind == "claudesrv" and subtype == "permission_resolved":
        return resolution_status(event)
    if kind == "assistant":
        message = event.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                hint = tool_hint(block.get("input"))
                return f"Running {block.get('name', 'a tool')}" + (f": {hint}" if hint else "") + "…"
    if kind == "user":
        return "Claude Code is working…"
    return None


def resolution_status(event: dict[str, Any]) -> str:
    """The status line for a ``permission_resolved`` event: "Allowed Bash", "Denied Bash (timeout)", ..."""
    tool = str(event.get("tool_name") or "a tool")
    allowed = event.get("behavior") == "allow"
    by = event.get("by")
    if tool == ASK_USER_QUESTION:
        text = "Question answered" if allowed else "Question not answered"
    else:
        text = f"{'Allowed' if allowed else 'Denied'} {tool}"
    return text + (f" ({by})" if by and by != "client" else "")


def result_status(event: dict[str, Any]) -> str:
    """The closing status line for a run's ``result`` event."""
    if event.get("is_error"):
        return f"Failed: {event.get('terminal_reason') or event.get('subtype') or 'error'}"
    facts: list[str] = []
    if isinstance(event.get("duration_ms"), (int, float)):
        facts.append(f"{event['duration_ms'] / 1000:.1f} s")
    if isinstance(event.get("total_cost_usd"), (int, float)):
        facts.append(f"${event['total_cost_usd']:.4f}")
    return "Done" + (f" ({', '.join(facts)})" if facts else "")


SETTING_OTHER_VALUES = {MODEL: "a model this server offers", EFFORT: "another level",
                        MAX_BUDGET_USD: "a smaller amount"}


def setting_hint(field: str) -> str:
    """How to change a setting the server refused (a message setting, or the valve behind it)."""
    other = SETTING_OTHER_VALUES.get(field)
    change = f"`{field}=` with {other}, or with nothing after it to go back to the default" if other else \
        f"`{field}=` with nothing after it to go back to the default"
    return (f"Send {change} (alone or with your request); the setting stays in force for the rest of this chat. "
            f"If the default (this function's `default_{field}` valve) is what was refused, an admin has to "
            "change it.")


def render_http_error(status: int, body: bytes) -> str:
    """A readable account of a refusal before streaming: ``{"error": {"code", "message"}}`` or any body."""
    code, message, field = "", "", ""
    try:
        error = json.loads(body).get("error", {})
        code, message = str(error.get("code", "")), str(error.get("message", ""))
        field = str(error.get("field") or "")
    except (ValueError, AttributeError, UnicodeDecodeError):
        message = body.decode("utf-8", "replace").strip()[:500]
    text = f"**claudesrv refused the request** (HTTP {status}{' ' + code if code else ''})"
    if message:
        text += f": {message}"
    if status == 401:
        text += "\n\nCheck the `api_token` valve of this function."
    elif code.startswith("skip_permissions"):
        text += ("\n\nSend `dangerously-skip-permissions=false` (alone or with your request): "
                 "the setting stays in force for the rest of this chat.")
    elif code == "approvals_denied":
        text += "\n\nThis server asks nobody about tools: switch off the `approvals` valve of this function."
    elif field in VALUE_KEYS:
        text += "\n\n" + setting_hint(field)
    elif code in ("session_not_found", "workspace_missing") or status == 410:
        text += "\n\n" + NEW_SESSION_HINT
    elif code == "session_busy":
        text += "\n\nWait for the running turn to finish, then send again."
    elif status in (429, 503):
        text += "\n\nThe server is busy; try again in a moment."
    return text


# --------------------------------------------------------------------------- approval dialogs


def inline_code(text: str) -> str:
    """Text as one Markdown code span, whatever backticks it holds."""
    text = " ".join(text.split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def plain(text: str, limit: int = 300) -> str:
    """Text from Claude shown as plain text on one line in Markdown: its Markdown characters escaped, so it
    cannot pass itself off as part of the dialog (a code block of a harmless command, say)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", one_line(text, limit))


def text_head(text: str, lines: int = APPROVAL_HEAD_LINES, chars: int = APPROVAL_HEAD_CHARS) -> str:
    """The start of a text (its first lines, at most ``chars`` characters), saying how much was left out."""
    shown = "\n".join(text.split("\n")[:lines])[:chars]
    if len(shown) >= len(text):
        return text
    return shown + f"\n… ({len(text) - len(shown)} more characters)"


def describe_tool_request(event: dict[str, Any]) -> str:
    """
    A readable account, in Markdown, of what a ``permission_request`` asks: for Bash the command (and
    its description), for Write and Edit the file and the start of the new text, else the input as
    compact JSON, cut to a sane length. What the tool does comes first; the description (Claude's own
    words) last, as escaped plain text.
    """
    tool = str(event.get("tool_name") or "a tool")
    raw_input = event.get("input")
    tool_input: dict[str, Any] = raw_input if isinstance(raw_input, dict) else {}
    description = event.get("description")
    if not isinstance(description, str) or description.strip() == tool:
        description = ""
    own = tool_input.get("description")
    if tool == "Bash" and isinstance(own, str) and own.strip():
        description = own
    parts: list[str] = []
    command = tool_input.get("command")
    path = next((tool_input[key] for key in ("file_path", "notebook_path", "path")
                 if isinstance(tool_input.get(key), str) and tool_input[key].strip()), None)
    if tool == "Bash" and isinstance(command, str):
        shown = text_head(command, APPROVAL_COMMAND_LINES, APPROVAL_INPUT_MAX_CHARS)
        parts.append(f"Claude wants to run:\n\n{code_block(shown, 'sh')}")
    elif tool in EDIT_TOOLS and path is not None:
        verb = "write" if tool == "Write" else "edit"
        parts.append(f"Claude wants to {verb} {inline_code(path)}")
        new_text = next((tool_input[key] for key in ("content", "new_string", "new_source")
                         if isinstance(tool_input.get(key), str)), None)
        old_text = tool_input.get("old_string")
        edits = tool_input.get("edits")
        if isinstance(old_text, str) and old_text:
            parts.append(f"Replacing:\n\n{code_block(text_head(old_text).rstrip(chr(10)))}")
        if new_text is not None:
            parts.append(("With:" if isinstance(old_text, str) and old_text else "New text:")
                         + f"\n\n{code_block(text_head(new_text).rstrip(chr(10)))}")
        elif isinstance(edits, list):
            parts.append(f"{len(edits)} edit{'' if len(edits) == 1 else 's'}")
    else:
        compact = json.dumps(tool_input, ensure_ascii=False, separators=(",", ":"))
        parts.append(f"Claude wants to use {plain(tool, 100)} with:\n\n"
                     f"{code_block(truncate(compact, APPROVAL_INPUT_MAX_CHARS), 'json')}")
    if description.strip():
        parts.append(f"Claude says: {plain(description)}")
    return "\n\n".join(parts)


def option_labels(question: dict[str, Any]) -> list[str]:
    """The labels of a question's options."""
    options = question.get("options")
    labels: list[str] = []
    for option in options if isinstance(options, list) else []:
        label = option.get("label") if isinstance(option, dict) else option
        if isinstance(label, str) and label.strip():
            labels.append(label.strip())
    return labels


def question_dialog(question: dict[str, Any]) -> dict[str, Any]:
    """Open WebUI's input dialog for one AskUserQuestion question: the question and its options, numbered."""
    lines = [str(question.get("question") or "Claude asks you a question.").strip()]
    options = question.get("options")
    numbered: list[str] = []
    for option in options if isinstance(options, list) else []:
        label = option.get("label") if isinstance(option, dict) else option
        if not isinstance(label, str) or not label.strip():
            continue
        about = option.get("description") if isinstance(option, dict) else None
        numbered.append(f"{len(numbered) + 1}. **{one_line(label, 200)}**"
                        + (f": {one_line(about, 300)}" if isinstance(about, str) and about.strip() else ""))
    if numbered:
        lines.append("\n".join(numbered))
    if question.get("multiSelect"):
        placeholder = "Numbers or names of the options, separated by commas, or your own answer"
    elif numbered:
        placeholder = f"A number (1-{len(numbered)}), an option's name, or your own answer"
    else:
        placeholder = "Your answer"
    header = question.get("header")
    title = header.strip() if isinstance(header, str) and header.strip() else "Claude asks"
    return {"type": "input", "data": {"title": title, "message": "\n\n".join(lines), "placeholder": placeholder}}


def match_answer(text: str, question: dict[str, Any]) -> str:
    """
    What the user typed as the answer to a question: an option's number or label (any case) becomes
    the label; with ``multiSelect``, a comma-separated list of them becomes the labels joined by ", ";
    anything else is the user's own answer, as typed (trimmed).
    """
    labels = option_labels(question)

    def option(piece: str) -> str | None:
        piece = piece.strip()
        if re.fullmatch(r"[0-9]+", piece) and 1 <= int(piece) <= len(labels):
            return labels[int(piece) - 1]
        return next((label for label in labels if label.casefold() == piece.casefold()), None)

    text = text.strip()
    if question.get("multiSelect") and "," in text:
        picked = [option(piece) for piece in text.split(",") if piece.strip()]
        if picked and all(picked):
            return ", ".join(label for label in picked if label)
    return option(text) or text


def typed_answer(value: Any) -> str | None:
    """The text an input dialog gave back, or None when there is none (cancelled, closed, or confirmed empty:
    Open WebUI then gives True)."""
    if isinstance(value, str) and value.strip():
        return value
    return None


def request_questions(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The questions of an AskUserQuestion request (top-level ``questions``, else the input's)."""
    questions = event.get("questions")
    if not isinstance(questions, list):
        tool_input = event.get("input")
        questions = tool_input.get("questions") if isinstance(tool_input, dict) else None
    return [q for q in questions if isinstance(q, dict)] if isinstance(questions, list) else []


# --------------------------------------------------------------------------- tasks


def task_answer(task: str, task_body: dict[str, Any] | None = None) -> str:
    """
    The answer to an Open WebUI background task (title, follow-ups, tags, ...), made without
    running Claude: a title from the first user message, no follow-ups, no tags, else "".
    """
    if task == "title_generation":
        title = "Claude Code"
        messages = (task_body or {}).get("messages")
        texts = user_messages(messages) if isinstance(messages, list) else []
        if texts:
            try:
                _, prompt = parse_params(texts[0])
            except ParamError:
                prompt = ""
            first = next((line for line in prompt.splitlines() if line.strip()), "")
            if first:
                title = one_line(first, TITLE_MAX_CHARS)
        return json.dumps({"title": title})
    if task == "follow_up_generation":
        return json.dumps({"follow_ups": []})
    if task == "tags_generation":
        return json.dumps({"tags": []})
    return ""


# --------------------------------------------------------------------------- the pipe


class Status:
    """Status lines under the answer; does nothing when Open WebUI gave no event emitter."""

    def __init__(self, emitter: EventEmitter | None) -> None:
        self.emitter = emitter

    async def __call__(self, description: str, done: bool = False) -> None:
        if self.emitter is None:
            return
        try:
            await self.emitter({"type": "status", "data": {"description": description, "done": done}})
        except Exception:
            log.warning("claude-code pipe: the status event could not be sent", exc_info=True)


class Paragraphs:
    """Puts a blank line between the pieces of an answer, none before the first."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str) -> str:
        joined = ("\n\n" if self.started else "") + text
        self.started = True
        return joined


class Approvals:
    """
    Answers the server's ``permission_request`` events with Open WebUI dialogs while the pipe goes on
    reading the stream. Each request is settled by a task of its own: its dialog(s), then the answer
    posted to the server. Open WebUI shows one dialog at a time, so the dialogs take turns. A request the
    server settles first (its wait timed out, the turn was cancelled) ends its task, open dialog or not:
    a dialog closed without a button (Escape, a click beside it) never answers, and this is how its wait
    ends. Nothing here raises: failures become status lines, and an unanswered request is denied.
    """

    def __init__(self, client: httpx.AsyncClient, base_url: str, headers: dict[str, str],
                 event_call: EventCall | None, status: Status) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.event_call = event_call
        self.status = status
        self.session_id: str | None = None
        self.turns = asyncio.Lock()  # one dialog at a time
        self.tasks: dict[str, asyncio.Future[None]] = {}
        self.undecided: set[str] = set()  # requests whose dialog is open or waits for its turn

    def request(self, event: dict[str, Any]) -> None:
        """A ``permission_request``: start settling it."""
        request_id = event.get("request_id")
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id) or request_id in self.tasks:
            log.warning("claude-code pipe: a permission request without a usable request_id: %.200r", request_id)
            return
        self.undecided.add(request_id)
        self.tasks[request_id] = asyncio.ensure_future(self.settle(request_id, event))

    def resolved(self, event: dict[str, Any]) -> None:
        """A ``permission_resolved``: a dialog still waiting for it is no longer needed."""
        request_id = event.get("request_id")
        task = self.tasks.get(request_id) if isinstance(request_id, str) else None
        if task is not None and request_id in self.undecided:
            self.undecided.discard(str(request_id))
            task.cancel()

    async def close(self) -> None:
        """End every task still running (the turn is over, or the pipe is being closed)."""
        running = [task for task in self.tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def settle(self, request_id: str, event: dict[str, Any]) -> None:
        tool = str(event.get("tool_name") or "a tool")
        try:
            async with self.turns:
                answer = await self.decide(tool, event)
            self.undecided.discard(request_id)
            await self.send(request_id, tool, answer)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("claude-code pipe: answering a permission request failed")
            await self.status(f"Could not answer for {tool}: {type(e).__name__}")

    async def decide(self, tool: str, event: dict[str, Any]) -> dict[str, Any]:
        """The answer to post: the user's, from the dialogs; a deny when there is none."""
        if self.event_call is None:
            return {"behavior": "deny", "message": DECLINED + " (Open WebUI could not show a dialog here)"}
        if tool == ASK_USER_QUESTION:
            return await self.ask(event)
        dialog = {"type": "confirmation",
                  "data": {"title": f"Allow {tool}?", "message": describe_tool_request(event)}}
        try:
            value = await self.event_call(dialog)
        except Exception as e:  # Open WebUI's wait for the browser timed out, or the socket is gone
            log.warning("claude-code pipe: the confirmation dialog failed: %s: %s", type(e).__name__, e)
            return {"behavior": "deny", "message": DECLINED + f" (the dialog gave no answer: {type(e).__name__})"}
        return {"behavior": "allow"} if value else {"behavior": "deny", "message": DECLINED}

    async def ask(self, event: dict[str, Any]) -> dict[str, Any]:
        """An AskUserQuestion: one input dialog per question; an empty or closed one denies."""
        assert self.event_call is not None
        questions = request_questions(event)
        if not questions:
            return {"behavior": "deny", "message": "Open WebUI could not read the question."}
        answers: dict[str, str] = {}
        for question in questions:
            try:
                typed = typed_answer(await self.event_call(question_dialog(question)))
            except Exception as e:
                log.warning("claude-code pipe: the input dialog failed: %s: %s", type(e).__name__, e)
                typed = None
            if typed is None:
                return {"behavior": "deny", "message": NOT_ANSWERED}
            answers[str(question.get("question") or "")] = match_answer(typed, question)
        return {"behavior": "allow", "answers": answers}

    async def send(self, request_id: str, tool: str, answer: dict[str, Any]) -> None:
        """Post the answer; a request that has already ended (404, 409) is only reported."""
        if not self.session_id:
            await self.status(f"Could not answer for {tool}: the server named no session")
            return
        url = f"{self.base_url}/api/sessions/{self.session_id}/permissions/{request_id}"
        try:
            response = await self.client.post(url, json=answer, headers=self.headers)
        except httpx.HTTPError as e:
            await self.status(f"Could not send your answer for {tool}: {type(e).__name__}")
            return
        if response.status_code in (404, 409):
            await self.status(f"Too late to answer for {tool}: the request had already ended")
        elif response.status_code != 200:
            await self.status(f"Could not send your answer for {tool} (HTTP {response.status_code})")


class Pipe:
    class Valves(BaseModel):
        base_url: str = Field(default="http://localhost:3000", description="The claudesrv server's base URL.")
        api_token: str = Field(default="", description="Sent as 'Authorization: Bearer <token>' when set.")
        connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait for a connection.")
        idle_timeout: float = Field(
            default=120.0, gt=0,
            description="Seconds without any data (keepalives count) before giving up; "
                        "keep it above the server's --keepalive.",
        )
        show_tools: bool = Field(default=True, description="Show tool calls and results as collapsed blocks.")
        tool_output_max_chars: int = Field(
            default=2000, ge=0,
            description="Most characters of each tool call's arguments or result to show (0: summary line only).",
        )
        show_thinking: bool = Field(
            default=True, description="Show Claude's thinking in Open WebUI's reasoning block (collapsed)."
        )
        default_skip_permissions: bool = Field(
            default=False, description="Send dangerously-skip-permissions unless the chat says otherwise."
        )
        default_allowed_tools: str = Field(
            default="", description='Default allowedTools: Bash,Edit or ["Bash","Edit"].'
        )
        default_disallowed_tools: str = Field(
            default="", description='Default disallowedTools: WebFetch or ["WebFetch"].'
        )
        default_model: str = Field(
            default="", description="Default model: an alias (sonnet, opus, haiku) or a full model name. "
                                    "Empty: the server's default."
        )
        default_effort: str = Field(
            default="", description="Default effort: low, medium, high, xhigh or max. Empty: the server's default."
        )
        default_system_prompt: str = Field(
            default="", description="Default system prompt, replacing Claude Code's own. Empty: Claude Code's own."
        )
        default_max_budget_usd: str = Field(
            default="", description="Default most US dollars a turn may spend, such as 0.50. Empty: the server's "
                                    "default."
        )
        approvals: bool = Field(
            default=False,
            description="Ask in the chat (a confirmation dialog) before Claude uses a tool that was not "
                        "pre-approved, and show Claude's questions as input dialogs. Off: the server denies "
                        "such tools.",
        )
        file_links: bool = Field(
            default=True,
            description="After the answer, list the files Claude wrote or edited in the turn, with links that "
                        "download them from claudesrv.",
        )
        public_base_url: str = Field(
            default="",
            description="claudesrv's base URL as the browser reaches it, for the file links. Empty: base_url. "
                        "(A server with tokens answers a browser's link with 401.)",
        )

    def __init__(self) -> None:
        self.valves = self.Valves()
        # The last session of each chat, for when the marker is gone from the history.
        self.chat_sessions: dict[str, str] = {}
        # For tests: an httpx transport to use instead of the network.
        self.transport: httpx.AsyncBaseTransport | None = None

    def remember(self, chat_id: str | None, session_id: str) -> None:
        """Note a chat's session (newest last, oldest forgotten past MAX_REMEMBERED_CHATS)."""
        if not chat_id:
            return
        self.chat_sessions.pop(chat_id, None)
        self.chat_sessions[chat_id] = session_id
        while len(self.chat_sessions) > MAX_REMEMBERED_CHATS:
            del self.chat_sessions[next(iter(self.chat_sessions))]

    def session_to_resume(self, messages: list[dict[str, Any]], chat_id: str | None) -> str | None:
        """The marker in the history, else the session this pipe last saw in the chat."""
        return find_session_id(messages) or (self.chat_sessions.get(chat_id) if chat_id else None)

    def headers(self, stream: bool = True) -> dict[str, str]:
        """The request headers, with the bearer token when one is set."""
        headers = {"Content-Type": "application/json"}
        if stream:
            headers["Accept"] = "text/event-stream"
        if self.valves.api_token:
            headers["Authorization"] = f"Bearer {self.valves.api_token}"
        return headers

    async def upload(self, client: httpx.AsyncClient, session_id: str, attachments: list[Attachment]
                     ) -> tuple[list[str], list[str]]:
        """
        Put each attachment in the session's folder, under uploads/ (a file of the same name is replaced).
        Returns the names put there, and the others with the server's reason ("HTTP 409 session_busy").
        """
        headers = {**self.headers(stream=False), "Content-Type": "application/octet-stream"}
        put: list[str] = []
        failed: list[str] = []
        for attachment in attachments:
            url = file_url(self.valves.base_url, session_id, f"{UPLOADS_DIR}/{attachment.name}")
            response = await client.put(url, content=attachment.data, headers=headers)
            if response.status_code in (200, 201):
                put.append(attachment.name)
                continue
            try:
                code = str(json.loads(response.content)["error"]["code"])
            except (ValueError, KeyError, TypeError):
                code = ""
            failed.append(f"{attachment.name} (HTTP {response.status_code}{' ' + code if code else ''})")
        return put, failed

    async def pipe(
        self,
        body: dict[str, Any],
        __user__: dict[str, Any] | None = None,
        __metadata__: dict[str, Any] | None = None,
        __chat_id__: str | None = None,
        __task__: str | None = None,
        __task_body__: dict[str, Any] | None = None,
        __event_emitter__: EventEmitter | None = None,
        __event_call__: EventCall | None = None,
        __files__: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """
        Answer one chat turn by streaming a claudesrv run; errors become readable text.
        Closing this generator (Open WebUI's Stop) closes the HTTP stream, which stops the run.
        With the approvals valve on (and dialogs to show them in), tools that need approval are asked about.
        Files attached to the message go into the session's folder first (a new session's text files into the
        prompt); the files Claude wrote or edited are listed after the answer, with download links.
        """
        if __task__:
            yield task_answer(__task__, __task_body__)
            return
        valves = self.valves
        status = Status(__event_emitter__)
        chat_id = __chat_id__ or (__metadata__ or {}).get("chat_id")
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        paragraph = Paragraphs()

        try:
            params, prompt = collect_params(messages, valves)
        except ParamError as e:
            yield f"**Not sent:** {e}"
            return
        images, skipped = message_images(last_user_content(messages))
        resume = None if params.get(NEW_SESSION) else self.session_to_resume(messages, chat_id)
        attachments, unreadable = await read_attachments(attachment_items(__metadata__, __files__), __user__)
        skipped += unreadable
        left_out: list[str] = []
        if attachments and resume is None:  # no folder before the first turn: text files go into the prompt
            prompt, left_out = inline_attachments(prompt, attachments)
            attachments = []
        if skipped:
            yield paragraph(skipped_note(skipped))
        if left_out:
            yield paragraph(left_out_note(left_out))
        if not prompt and not images and not attachments:
            yield paragraph(empty_prompt_reply(messages, params))
            return

        marker: str | None = resume  # the session this answer belongs to
        changed = ChangedFiles()
        url = valves.base_url.rstrip("/") + "/api/claude"
        final_status = "Stopped"  # unless the run ends otherwise
        try:
            timeout = httpx.Timeout(valves.idle_timeout, connect=valves.connect_timeout)
            async with httpx.AsyncClient(timeout=timeout, transport=self.transport) as client:
                if attachments and resume is not None:
                    count = len(attachments)
                    await status(f"Putting {count} attached file{'' if count == 1 else 's'} in the session's folder…")
                    put, failed = await self.upload(client, resume, attachments)
                    if failed:
                        yield paragraph(skipped_note(failed, "Not put in the session's folder"))
                    if put:
                        prompt = "\n\n".join(part for part in (prompt, uploaded_line(put)) if part)
                # Images first, then the text (as Anthropic advises); without images the prompt stays a string.
                content: str | list[dict[str, Any]] = prompt
                if images:
                    content = images + ([{"type": "text", "text": prompt}] if prompt else [])
                # Without __event_call__ (not a browser chat) nobody can be asked: the server denies as without
                # the valve.
                payload = build_payload(content, params, resume,
                                        approvals=valves.approvals and __event_call__ is not None)
                await status("Resuming the Claude Code session…" if resume else "Starting Claude Code…")
                approvals = Approvals(client, valves.base_url, self.headers(stream=False), __event_call__, status)
                try:
                    if not content:
                        raise NothingToSend()
                    async with client.stream("POST", url, json=payload, headers=self.headers()) as response:
                        if response.status_code != 200:
                            refusal = render_http_error(response.status_code, await response.aread())
                            final_status = f"Refused (HTTP {response.status_code})"
                            if response.status_code in (404, 410):
                                marker = None
                            yield paragraph(refusal)
                        else:
                            header = response.headers.get("X-Session-Id", "")
                            if SESSION_ID.fullmatch(header):
                                approvals.session_id = header
                            decoder = SSEDecoder()
                            result: dict[str, Any] | None = None
                            last_event_at = clock()  # thinking takes the time since the event before
                            async for chunk in response.aiter_bytes():
                                for data in decoder.feed(chunk):
                                    event = decode_event(data)
                                    if event is None:
                                        continue
                                    now = clock()
                                    elapsed, last_event_at = now - last_event_at, now
                                    changed.see(event)
                                    reported = event.get("session_id")
                                    if isinstance(reported, str) and SESSION_ID.fullmatch(reported):
                                        marker = reported
                                        self.remember(chat_id, reported)
                                        approvals.session_id = approvals.session_id or reported
                                    note = status_for_event(event)
                                    if note:
                                        await status(note)
                                    if event.get("type") == "claudesrv":
                                        if event.get("subtype") == "permission_request":
                                            approvals.request(event)
                                        elif event.get("subtype") == "permission_resolved":
                                            approvals.resolved(event)
                                    text = render_event(event, valves, elapsed)
                                    if text:
                                        yield paragraph(text)
                                    if event.get("type") == "result":
                                        result = event
                                        break
                                if result is not None:
                                    break
                            if result is None:
                                final_status = "Failed"
                                yield paragraph("**The connection to claudesrv ended before Claude Code finished.**")
                            else:
                                final_status = result_status(result)
                finally:
                    await approvals.close()
        except NothingToSend:
            final_status = "Not sent"
            yield paragraph("There is nothing to send: the message has no text, and its files could not be put in "
                            "the session's folder.")
        except httpx.ConnectTimeout:
            final_status = "Failed"
            yield paragraph(f"**Could not connect to claudesrv** at {url} within {valves.connect_timeout:g} s.")
        except httpx.ConnectError as e:
            final_status = "Failed"
            yield paragraph(f"**Could not connect to claudesrv** at {url}: {str(e) or 'connection refused'}. "
                            "Is the server running, and is the `base_url` valve right?")
        except httpx.ReadTimeout:
            final_status = "Failed"
            yield paragraph(f"**claudesrv sent nothing for {valves.idle_timeout:g} s**, so the pipe stopped waiting "
                            "(the `idle_timeout` valve).")
        except httpx.TimeoutException as e:
            final_status = "Failed"
            yield paragraph(f"**Talking to claudesrv timed out:** {type(e).__name__}.")
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as e:
            final_status = "Failed"
            yield paragraph(f"**The `base_url` valve is not usable** ({valves.base_url!r}): {e}")
        except httpx.HTTPError as e:
            final_status = "Failed"
            yield paragraph(f"**The connection to claudesrv failed:** {type(e).__name__}: {e}")
        except Exception as e:
            final_status = "Failed"
            log.exception("claude-code pipe: unexpected error")
            yield paragraph(f"**The pipe failed unexpectedly:** {type(e).__name__}: {e}")
        finally:
            await status(final_status, done=True)
        changed_paths = changed.relative() if marker and valves.file_links else []
        if marker and changed_paths:
            links_base = valves.public_base_url.strip() or valves.base_url
            yield paragraph(render_file_links(changed_paths, links_base, marker, bool(valves.api_token)))
        if marker:
            yield paragraph(f"session_id={marker}")
