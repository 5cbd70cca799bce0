"""
The body of ``POST /api/claude`` as one JSON Schema: served in ``/openapi.json`` and used, as it is, to
validate every request, so the two cannot disagree.

L{validate} knows the keywords the schema uses and refuses any other (a test walks the schema), so no rule
can be written down and silently not enforced. ``x-maxBytes`` bounds a string's UTF-8 size, or an object's
size as compact JSON. Limits the operator sets (prompt and system prompt sizes) are filled in per daemon by
L{turn_schema}.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from claudesrv.errors import ApiError, invalid

MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.\-_:\[\]]{0,99}$"
EFFORTS = ["low", "medium", "high", "xhigh", "max"]
PERMISSION_MODES = ["default", "acceptEdits", "plan", "dontAsk", "auto", "bypassPermissions"]
IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"]
TOOL_PATTERN = r"^[^\-\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"  # no option look-alike, no control characters
MAX_JSON_SCHEMA = 64 << 10

#: the seed's field names, and the snake_case names accepted for the same fields (one of each, not both)
ALIASES = {"allowed_tools": "allowedTools", "disallowed_tools": "disallowedTools",
           "dangerously_skip_permissions": "dangerously-skip-permissions"}

KNOWN = {"type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
         "items", "minItems", "maxItems", "properties", "required", "additionalProperties", "oneOf", "x-maxBytes",
         "description", "format", "default"}


def _tools(what: str) -> dict[str, Any]:
    return {"type": "array", "description": f"{what} tool patterns such as \"Bash(git *)\", one argument each",
            "items": {"type": "string", "minLength": 1, "pattern": TOOL_PATTERN}}


@dataclass(frozen=True)
class BodyLimits:
    """The operator's size limits of a request body."""

    max_prompt: int = 1 << 20
    max_system_prompt: int = 64 << 10
    max_image_bytes: int = 5 << 20


@functools.lru_cache(maxsize=8)
def turn_schema(limits: BodyLimits = BodyLimits()) -> dict[str, Any]:
    """The request body's schema with this daemon's limits (shared: never change what it returns)."""
    max_prompt, max_system_prompt, max_image_bytes = limits.max_prompt, limits.max_system_prompt, \
        limits.max_image_bytes
    text = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string", "x-maxBytes": max_prompt}}}
    image = {"type": "object", "required": ["type", "source"], "additionalProperties": False, "properties": {
        "type": {"enum": ["image"]},
        "source": {"type": "object", "required": ["type", "media_type", "data"], "additionalProperties": False,
                   "properties": {"type": {"enum": ["base64"]}, "media_type": {"enum": IMAGE_TYPES},
                                  "data": {"type": "string", "description": "base64; at most "
                                           f"{max_image_bytes} bytes decoded (--max-image-bytes)",
                                           "x-maxBytes": (max_image_bytes + 2) // 3 * 4 + 4}}}}}
    system = {"type": "string", "x-maxBytes": max_system_prompt}
    return {
        "type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
            "prompt": {"description": "the user message: text, or content blocks (text and base64 images)",
                       "oneOf": [{"type": "string", "minLength": 1, "x-maxBytes": max_prompt},
                                 {"type": "array", "minItems": 1, "maxItems": 100,
                                  "items": {"oneOf": [text, image]}}]},
            "session_id": {"type": "string", "format": "uuid", "description": "resume this session"},
            "detach": {"type": "boolean", "description": "keep the turn running if the client goes away"},
            "approvals": {"type": "boolean", "description": "ask over HTTP (permission_request events) about "
                                                            "tools that need approval, instead of denying them"},
            "dangerously-skip-permissions": {"type": "boolean"},
            "dangerously_skip_permissions": {"type": "boolean"},
            "allowedTools": _tools("pre-approved"), "allowed_tools": _tools("pre-approved"),
            "disallowedTools": _tools("refused"), "disallowed_tools": _tools("refused"),
            "model": {"type": "string", "pattern": MODEL_PATTERN,
                      "description": "an alias (sonnet, opus, haiku) or a full model name"},
            "effort": {"enum": EFFORTS},
            "system_prompt": {**system, "description": "replaces the system prompt"},
            "append_system_prompt": {**system, "description": "is added to the system prompt"},
            "max_turns": {"type": "integer", "minimum": 1, "maximum": 1000},
            "max_budget_usd": {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000},
            "json_schema": {"type": "object", "x-maxBytes": MAX_JSON_SCHEMA,
                            "description": "JSON Schema of a structured answer (structured_output in the result)"},
            "include_partial_messages": {"type": "boolean", "description": "stream token-level stream_event lines"},
            "permission_mode": {"enum": PERMISSION_MODES},
            "project": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]*$",
                        "description": "a new session works in this project's folder (GET /api/projects)"},
            "worktree": {"type": "boolean", "description": "with project (a git one): in a git worktree of its own "
                                                          "on a new branch claudesrv/<session id>"},
            "base": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^[^\-\s][^\s]*$",
                     "description": "with worktree: the ref its branch starts from (default the project's HEAD)"},
        }}


_TYPES: dict[str, Any] = {"string": str, "boolean": bool, "object": dict, "array": list}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
            and value not in (float("inf"), float("-inf"))
    return isinstance(value, _TYPES[kind])


def _ecma(pattern: str) -> str:
    """A pattern's final ``$`` as JSON Schema means it (the very end; Python's also matches before a final newline)."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern


def _fits(option: dict[str, Any], value: Any) -> bool:
    """Whether a oneOf option is the one meant for this value: its type, and for objects its "type" field."""
    if not _type_ok(option.get("type", "object"), value):
        return False
    tag = option.get("properties", {}).get("type", {}).get("enum")
    return tag is None or (isinstance(value, dict) and value.get("type") in tag)


def _kind(option: dict[str, Any]) -> str:
    tag = option.get("properties", {}).get("type", {}).get("enum")
    return f"a {tag[0]} block" if tag else f"a {option['type']}"


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    return len(json.dumps(value, separators=(",", ":")).encode())


class Problem(str):
    """What is wrong with a value; C{too_large} when only its size is."""

    too_large = False


def _too_large(message: str) -> Problem:
    found = Problem(message)
    found.too_large = True
    return found


def problem(schema: dict[str, Any], value: Any, where: str) -> Problem | None:
    """What is wrong with C{value} (at C{where}) by C{schema}, or None."""
    unknown = set(schema) - KNOWN
    if unknown:
        raise ValueError(f"schema keyword {sorted(unknown)[0]!r} is not enforced")
    if "oneOf" in schema:
        fitting = [option for option in schema["oneOf"] if _fits(option, value)]
        if len(fitting) == 1:
            return problem(fitting[0], value, where)
        return Problem(f"{where} must be " + " or ".join(_kind(option) for option in schema["oneOf"]))
    if "enum" in schema and value not in schema["enum"]:
        return Problem(f"{where} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}")
    kind = schema.get("type")
    if kind and not _type_ok(kind, value):
        return Problem(f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return Problem(f"{where} must not be empty")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return Problem(f"{where} must be at most {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(_ecma(schema["pattern"]), value):
            return Problem(f"{where} is not allowed: {schema.get('description') or 'see /openapi.json'}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high) or (
                "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]):
            lower = f"more than {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema else f"from {low}"
            return Problem(f"{where} must be {lower} to {high}")
    if "x-maxBytes" in schema and _size(value) > schema["x-maxBytes"]:
        return _too_large(f"{where} is larger than {schema['x-maxBytes']} bytes")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return Problem(f"{where} must not be empty")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return Problem(f"{where} may hold at most {schema['maxItems']} items")
        for i, item in enumerate(value):
            found = problem(schema.get("items", {}), item, f"{where}[{i}]")
            if found:
                return found
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                return Problem(f"{where}.{name} is required")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return Problem(f"{where} has an unknown field {extra[0]!r}")
        for name, sub in props.items():
            if name in value:
                found = problem(sub, value[name], f"{where}.{name}")
                if found:
                    return found
    return None


def validate(schema: dict[str, Any], body: Any) -> dict[str, Any]:
    """
    The request body checked against the schema; raises L{ApiError} 400 naming the field: ``unknown_field``,
    ``missing_field``, or ``invalid_field``. Each seed name and its snake_case alias may not both be given.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    props = schema["properties"]
    unknown = sorted(set(body) - set(props))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}; known: {', '.join(props)}", unknown[0])
    for name in schema["required"]:
        if name not in body:
            raise ApiError(400, "missing_field", f"{name} is required", name)
    for alias, seed in ALIASES.items():
        if alias in body and seed in body:
            raise invalid(alias, f"give {seed} or {alias}, not both")
    for name, value in body.items():
        found = problem(props[name], value, name)
        if found:
            raise ApiError(400, f"{name}_too_large" if found.too_large else "invalid_field", found, name)
    return body
