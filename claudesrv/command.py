"""
From an HTTP request body to what the CLI gets: its argv, its environment and its stdin lines. Pure
functions, no I/O.

The argv is built here and nowhere else. The CLI runs in SDK streaming mode: stdin stays open and every
turn is one JSON line written to it, so a prompt never travels in argv (no option injection, no E2BIG),
and every line we write comes from ``json.dumps`` (one non-JSON line kills the CLI). The variadic tool
options are closed by ``--`` so they swallow nothing.
"""

from __future__ import annotations

import binascii
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from claudesrv.errors import ApiError, invalid
from claudesrv.schema import ALIASES, BodyLimits, turn_schema, validate

Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class SpawnOptions:
    """What a CLI process is started with and cannot change later: a turn that needs others needs a new one."""

    skip_permissions: bool = False
    allowed_tools: tuple[str, ...] = ()
    disallowed_tools: tuple[str, ...] = ()
    system_prompt: str | None = None
    append_system_prompt: str | None = None
    effort: str | None = None
    max_turns: int | None = None
    max_budget_usd: float | None = None
    json_schema: str | None = None  # compact JSON
    include_partial_messages: bool = False

    def shown(self) -> dict[str, Any]:
        """The options that differ from a plain start, for GET /api/sessions/<id>."""
        plain = SpawnOptions()
        return {name: (list(value) if isinstance(value, tuple) else
                       json.loads(value) if name == "json_schema" and value else value)
                for name, value in vars(self).items() if value != getattr(plain, name)}


@dataclass(frozen=True)
class ClaudeRequest:
    """One validated turn: what the client asked for, nothing more (the operator's defaults come later)."""

    prompt: Prompt
    session_id: str | None = None
    options: SpawnOptions = SpawnOptions()
    detach: bool = False
    approvals: bool = False  # ask a person (over HTTP) about tools that need approval, instead of denying them
    model: str | None = None  # set on a warm process with set_model
    permission_mode: str | None = None  # set on a warm process with set_permission_mode
    project: str | None = None  # a new session's project (claudesrv.projects)
    worktree: bool = False
    base: str | None = None


def is_canonical_uuid(value: str) -> bool:
    """True for the lower-case 8-4-4-4-12 form the CLI reports, the only form we store."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


IMAGE_MAGIC = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",),
               "image/gif": (b"GIF87a", b"GIF89a")}


def _is_image(data: bytes, media_type: str) -> bool:
    if media_type == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return data.startswith(IMAGE_MAGIC[media_type])


def _check_text(field: str, text: str) -> None:
    if "\0" in text:
        raise invalid(field, f"{field} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(field, f"{field} must be valid Unicode (no lone surrogates)") from None


def _check_prompt(prompt: Prompt, limits: BodyLimits) -> None:
    """What the schema cannot say: real text somewhere, no NUL, valid Unicode, images that are images."""
    blocks = [{"type": "text", "text": prompt}] if isinstance(prompt, str) else prompt
    texts = [b["text"] for b in blocks if b["type"] == "text"]
    for text in texts:
        _check_text("prompt", text)
    if sum(len(t.encode()) for t in texts) > limits.max_prompt:
        raise ApiError(400, "prompt_too_large", f"prompt is larger than {limits.max_prompt} bytes", "prompt")
    if not any(t.strip() for t in texts) and len(texts) == len(blocks):
        raise invalid("prompt", "prompt must not be empty or whitespace only")
    for i, block in enumerate(blocks):
        if block["type"] != "image":
            continue
        source = block["source"]
        try:
            data = binascii.a2b_base64(source["data"], strict_mode=True)
        except binascii.Error:
            raise invalid("prompt", f"prompt[{i}].source.data is not valid base64") from None
        if len(data) > limits.max_image_bytes:
            raise ApiError(400, "prompt_too_large", f"prompt[{i}] is larger than {limits.max_image_bytes} bytes "
                                                    "(--max-image-bytes)", "prompt")
        if not _is_image(data, source["media_type"]):
            raise invalid("prompt", f"prompt[{i}] is not a {source['media_type']} image")


def read_json(raw: bytes) -> Any:
    """A request body as JSON; raise L{ApiError} 400 ``invalid_json`` if it is not."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body nests too deeply") from None


def parse_request(raw: bytes, limits: BodyLimits) -> ClaudeRequest:
    """Validate a POST /api/claude body by its schema (L{claudesrv.schema}); raise L{ApiError} naming the field."""
    return parse_body(read_json(raw), limits)


def parse_body(body: Any, limits: BodyLimits) -> ClaudeRequest:
    """Validate a turn's fields, however they came (L{parse_request}, or the OpenAI and Anthropic endpoints)."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if v is not None}  # null: as if not given
    body = validate(turn_schema(limits), body)
    _check_prompt(body["prompt"], limits)
    session_id = body.get("session_id")
    if session_id is not None and not is_canonical_uuid(session_id):
        raise invalid("session_id", "session_id must be a lower-case UUID as reported by the CLI")
    for field in ("system_prompt", "append_system_prompt"):
        if field in body:
            _check_text(field, body[field])
    if ("worktree" in body or "base" in body) and "project" not in body:
        raise invalid("worktree" if "worktree" in body else "base", "worktree and base go with project")
    if "base" in body and not body.get("worktree"):
        raise invalid("base", "base is the ref a worktree starts from: give worktree: true too")
    if "project" in body and session_id is not None:
        raise invalid("project", "a session keeps the project it began in: give project only for a new session")
    if "system_prompt" in body and "append_system_prompt" in body:
        raise invalid("append_system_prompt", "give system_prompt (replaces) or append_system_prompt (adds), "
                                              "not both")

    def given(name: str) -> Any:
        return body.get(name, body.get(ALIASES.get(name, name)))

    schema = body.get("json_schema")
    options = SpawnOptions(
        skip_permissions=bool(given("dangerously_skip_permissions")),
        allowed_tools=tuple(given("allowed_tools") or ()), disallowed_tools=tuple(given("disallowed_tools") or ()),
        system_prompt=body.get("system_prompt"), append_system_prompt=body.get("append_system_prompt"),
        effort=body.get("effort"), max_turns=body.get("max_turns"),
        max_budget_usd=float(body["max_budget_usd"]) if "max_budget_usd" in body else None,
        json_schema=json.dumps(schema, separators=(",", ":"), sort_keys=True) if schema is not None else None,
        include_partial_messages=bool(body.get("include_partial_messages")))
    return ClaudeRequest(prompt=body["prompt"], session_id=session_id, options=options,
                         detach=bool(body.get("detach")), approvals=bool(body.get("approvals")),
                         model=body.get("model"), permission_mode=body.get("permission_mode"),
                         project=body.get("project"), worktree=bool(body.get("worktree")), base=body.get("base"))


def build_argv(executable: str, options: SpawnOptions, session_id: str, resume: bool,
               deny_tools: Sequence[str] = (), model: str | None = None, permission_mode: str | None = None
               ) -> list[str]:
    """
    The CLI's argv for a live process of one session: ``--session-id`` for a session the CLI has not seen
    (so its id is ours from the start), ``--resume`` for one it has. The model and permission mode are the
    first turn's (later turns change them with control requests).

    Every value is given as ``--option=value`` (a system prompt starting with ``-`` stays a value), each tool
    pattern is its own argv element (so ``Bash(touch a,b.txt)`` stays whole), and the trailing ``--`` ends the
    variadic tool options. A resumed session given a system prompt renders it afresh
    (``--system-prompt-snapshot=off``): otherwise the CLI would send the one recorded at its first request.
    """
    argv = [executable, "--output-format", "stream-json", "--verbose", "--input-format", "stream-json",
            "--permission-prompt-tool", "stdio", ("--resume=" if resume else "--session-id=") + session_id]
    if options.skip_permissions:
        argv.append("--dangerously-skip-permissions")
    if model:
        argv.append(f"--model={model}")
    if permission_mode and permission_mode != "default" and not (
            permission_mode == "bypassPermissions" and options.skip_permissions):
        argv.append(f"--permission-mode={permission_mode}")
    if options.effort:
        argv.append(f"--effort={options.effort}")
    for flag, text in (("--system-prompt", options.system_prompt),
                       ("--append-system-prompt", options.append_system_prompt)):
        if text is not None:
            argv.append(f"{flag}={text}")
    if resume and (options.system_prompt is not None or options.append_system_prompt is not None):
        argv.append("--system-prompt-snapshot=off")
    if options.max_turns is not None:
        argv.append(f"--max-turns={options.max_turns}")
    if options.max_budget_usd is not None:
        argv.append(f"--max-budget-usd={options.max_budget_usd!r}")
    if options.json_schema is not None:
        argv.append(f"--json-schema={options.json_schema}")
    if options.include_partial_messages:
        argv.append("--include-partial-messages")
    if options.allowed_tools:
        argv += ["--allowedTools", *options.allowed_tools]
    disallowed = list(options.disallowed_tools) + [t for t in deny_tools if t not in options.disallowed_tools]
    if disallowed:
        argv += ["--disallowedTools", *disallowed]
    argv.append("--")
    return argv


def user_message(prompt: Prompt) -> bytes:
    """One turn's stdin line: the text, or the content blocks (text and images) as given."""
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
