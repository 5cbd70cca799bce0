"""
From an HTTP request body to what the CLI gets: its argv, its environment and its stdin lines. Pure
functions, no I/O.

The argv is built here and nowhere else. The CLI runs in SDK streaming mode: stdin stays open and every
turn is one JSON line written to it, so a prompt never travels in argv (no option injection, no E2BIG),
and every line we write comes from ``json.dumps`` (one non-JSON line kills the CLI). The variadic tool
options are closed by ``--`` so they swallow nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from claudesrv.errors import ApiError, invalid

FIELDS = ("prompt", "session_id", "dangerously-skip-permissions", "allowedTools", "disallowedTools", "detach",
          "approvals")


@dataclass(frozen=True)
class SpawnOptions:
    """What a CLI process is started with and cannot change later: a turn that needs others needs a new one."""

    skip_permissions: bool = False
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaudeRequest:
    """One validated turn: what the client asked for, nothing more."""

    prompt: str
    session_id: str | None = None
    options: SpawnOptions = SpawnOptions()
    detach: bool = False
    approvals: bool = False  # ask a person (over HTTP) about tools that need approval, instead of denying them


def is_canonical_uuid(value: str) -> bool:
    """True for the lower-case 8-4-4-4-12 form the CLI reports, the only form we store."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _tool_list(body: Mapping[str, Any], field: str) -> tuple[str, ...]:
    value = body.get(field)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid(field, f"{field} must be an array of tool names, such as [\"Bash\", \"Edit\"]")
    tools = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise invalid(field, f"{field} must hold non-empty strings")
        if any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise invalid(field, f"{field} items must not contain control characters")
        if item.startswith("-"):
            raise invalid(field, f"{field} items must not start with '-'")
        tools.append(item)
    return tuple(tools)


def parse_request(raw: bytes, max_prompt: int) -> ClaudeRequest:
    """Validate a POST /api/claude body; raise L{ApiError} naming the offending field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body nests too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}; known: {', '.join(FIELDS)}",
                         unknown[0])
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "missing_field", "prompt is required", "prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string")
    if not prompt.strip():
        raise invalid("prompt", "prompt must not be empty or whitespace only")
    if "\0" in prompt:
        raise invalid("prompt", "prompt must not contain NUL characters")
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid("prompt", "prompt must be valid Unicode (no lone surrogates)") from None
    if size > max_prompt:
        raise ApiError(400, "prompt_too_large", f"prompt is larger than {max_prompt} bytes", "prompt")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not is_canonical_uuid(session_id)):
        raise invalid("session_id", "session_id must be a lower-case UUID as reported by the CLI")
    skip = body.get("dangerously-skip-permissions", False)
    if not isinstance(skip, bool):
        raise invalid("dangerously-skip-permissions", "dangerously-skip-permissions must be true or false")
    detach = body.get("detach", False)
    if not isinstance(detach, bool):
        raise invalid("detach", "detach must be true or false")
    approvals = body.get("approvals", False)
    if not isinstance(approvals, bool):
        raise invalid("approvals", "approvals must be true or false")
    options = SpawnOptions(skip, _tool_list(body, "allowedTools"), _tool_list(body, "disallowedTools"))
    return ClaudeRequest(prompt=prompt, session_id=session_id, options=options, detach=detach, approvals=approvals)


def build_argv(executable: str, options: SpawnOptions, session_id: str, resume: bool,
               deny_tools: Sequence[str] = ()) -> list[str]:
    """
    The CLI's argv for a live process of one session: ``--session-id`` for a session the CLI has not seen
    (so its id is ours from the start), ``--resume`` for one it has.

    Each tool pattern is its own argv element (so ``Bash(touch a,b.txt)`` stays whole) and the
    trailing ``--`` ends the variadic tool options.
    """
    argv = [executable, "--output-format", "stream-json", "--verbose", "--input-format", "stream-json",
            "--permission-prompt-tool", "stdio", ("--resume=" if resume else "--session-id=") + session_id]
    if options.skip_permissions:
        argv.append("--dangerously-skip-permissions")
    if options.allowed_tools:
        argv += ["--allowedTools", *options.allowed_tools]
    disallowed = list(options.disallowed_tools) + [t for t in deny_tools if t not in options.disallowed_tools]
    if disallowed:
        argv += ["--disallowedTools", *disallowed]
    argv.append("--")
    return argv


def user_message(prompt: str) -> bytes:
    """One turn's stdin line."""
    return _line({"type": "user", "message": {"role": "user", "content": prompt},
                  "parent_tool_use_id": None, "session_id": "default"})


def control_request(request_id: str, subtype: str, **fields: Any) -> bytes:
    return _line({"type": "control_request", "request_id": request_id, "request": {"subtype": subtype, **fields}})


def control_response(request_id: str, response: dict[str, Any]) -> bytes:
    return _line({"type": "control_response",
                  "response": {"subtype": "success", "request_id": request_id, "response": response}})


def _line(obj: dict[str, Any]) -> bytes:
    """ASCII JSON and a newline: nothing a client sends can break the line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def build_env(base: Mapping[str, str], marker: str, sandboxed: bool = False) -> dict[str, str]:
    """
    The CLI's environment: the daemon's own (spawnProcess would otherwise give it none) less the API
    tokens, a marker
    that every descendant inherits so the run's processes can be found even after they leave the
    process group, and ``IS_SANDBOX=1`` only when the operator said the host is a sandbox.
    """
    env = dict(base)
    env.pop("CLAUDESRV_AUTH_TOKENS", None)  # the CLI's tools must not see the clients' tokens
    env["CLAUDESRV_RUN_ID"] = marker
    env.pop("IS_SANDBOX", None)
    if sandboxed:
        env["IS_SANDBOX"] = "1"
    return env


def control_error(request_id: str, error: str) -> bytes:
    return _line({"type": "control_response",
                  "response": {"subtype": "error", "request_id": request_id, "error": error}})
