"""
From an HTTP request body to the CLI's argv and environment: pure functions, no I/O.

The argv is built here and nowhere else, so the traps of the real CLI (claude-cli.md) are handled once:
the prompt never travels in argv (it goes to stdin, which is then closed), so a prompt that starts with
``-`` cannot become an option, a prompt of any size avoids E2BIG, and the variadic tool options are
closed by ``--`` so they swallow nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FIELDS = ("prompt", "session_id", "dangerously-skip-permissions", "allowedTools", "disallowedTools")


class ApiError(Exception):
    """A request refused before anything runs: the HTTP status, an error code, a message, maybe the field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def as_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


@dataclass(frozen=True)
class ClaudeRequest:
    """One validated turn: what the client asked for, nothing more."""

    prompt: str
    session_id: str | None = None
    skip_permissions: bool = False
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", message, field)


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
        raise _invalid(field, f"{field} must be an array of tool names, such as [\"Bash\", \"Edit\"]")
    tools = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise _invalid(field, f"{field} must hold non-empty strings")
        if any(ord(c) < 32 or ord(c) == 127 for c in item):
            raise _invalid(field, f"{field} items must not contain control characters")
        if item.startswith("-"):
            raise _invalid(field, f"{field} items must not start with '-'")
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
        raise _invalid("prompt", "prompt must be a string")
    if not prompt.strip():
        raise _invalid("prompt", "prompt must not be empty or whitespace only")
    if "\0" in prompt:
        raise _invalid("prompt", "prompt must not contain NUL characters")
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError:
        raise _invalid("prompt", "prompt must be valid Unicode (no lone surrogates)") from None
    if size > max_prompt:
        raise ApiError(400, "prompt_too_large", f"prompt is larger than {max_prompt} bytes", "prompt")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not is_canonical_uuid(session_id)):
        raise _invalid("session_id", "session_id must be a lower-case UUID as reported by the CLI")
    skip = body.get("dangerously-skip-permissions", False)
    if not isinstance(skip, bool):
        raise _invalid("dangerously-skip-permissions", "dangerously-skip-permissions must be true or false")
    return ClaudeRequest(
        prompt=prompt,
        session_id=session_id,
        skip_permissions=skip,
        allowed_tools=_tool_list(body, "allowedTools"),
        disallowed_tools=_tool_list(body, "disallowedTools"),
    )


def build_argv(executable: str, request: ClaudeRequest, deny_tools: Sequence[str] = ()) -> list[str]:
    """
    The CLI's argv for one turn. The prompt is not in it: it is written to the CLI's stdin.

    Each tool pattern is its own argv element (so ``Bash(touch a,b.txt)`` stays whole) and the
    trailing ``--`` ends the variadic tool options.
    """
    argv = [executable, "-p", "--verbose", "--output-format", "stream-json"]
    if request.session_id is not None:
        argv += ["--resume", request.session_id]
    if request.skip_permissions:
        argv.append("--dangerously-skip-permissions")
    if request.allowed_tools:
        argv += ["--allowedTools", *request.allowed_tools]
    disallowed = list(request.disallowed_tools) + [t for t in deny_tools if t not in request.disallowed_tools]
    if disallowed:
        argv += ["--disallowedTools", *disallowed]
    argv.append("--")
    return argv


def build_env(base: Mapping[str, str], run_id: str, sandboxed: bool = False) -> dict[str, str]:
    """
    The CLI's environment: the daemon's own (spawnProcess would otherwise give it none) less the API
    tokens, a marker
    that every descendant inherits so the run's processes can be found even after they leave the
    process group, and ``IS_SANDBOX=1`` only when the operator said the host is a sandbox.
    """
    env = dict(base)
    env.pop("CLAUDESRV_AUTH_TOKENS", None)  # the CLI's tools must not see the clients' tokens
    env["CLAUDESRV_RUN_ID"] = run_id
    env.pop("IS_SANDBOX", None)
    if sandboxed:
        env["IS_SANDBOX"] = "1"
    return env
