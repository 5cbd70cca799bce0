"""The OpenAPI description served at /openapi.json; a test checks it against the routes the app serves."""

from __future__ import annotations

import copy
import functools
from typing import Any

from claudesrv.schema import BodyLimits, turn_schema

_ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request (the error names the field)", 401: "Missing or wrong bearer token",
            403: "Refused by policy (Host, origin, skip-permissions, approvals, input edits)",
            404: "Unknown session (or permission request)", 405: "Wrong method",
            409: "The session is busy, has no running turn, or the request was already resolved",
            410: "Workspace gone",
            413: "Body too large", 415: "Body is not application/json", 429: "Too many failed authentications",
            503: "CLI missing, or no run slot or queue place (Retry-After)"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


_COMMON = (401, 403, 405, 429)
_SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_SESSION = {"$ref": "#/components/schemas/Session"}
_FILE_PATH = {"name": "file_path", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "relative to the session's folder; may hold slashes"}

def _chat_route(summary: str, fields: dict[str, Any], answer: str) -> dict[str, Any]:
    """One of the /v1 chat routes: the same session headers, body frame, answers and errors."""
    properties = {"model": {"type": "string", "default": "claude-code"},
                  "messages": {"type": "array", "items": {"type": "object"}}, "stream": {"type": "boolean"},
                  "claudesrv": {"type": "object", "description": "fields of the Turn schema but prompt and model"},
                  **fields}
    return {"post": {
        "summary": summary,
        "parameters": [{"name": "X-Session-Id", "in": "header", "schema": {"type": "string", "format": "uuid"}},
                       {"name": "X-OpenWebUI-Chat-Id", "in": "header", "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["messages"], "properties": properties}}}},
        "responses": {"200": {"description": answer,
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                      **_errors(400, 404, 409, 410, 413, 415, 503, *_COMMON)}}}


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "claudesrv", "version": "0.1.0",
             "description": "The Claude Code CLI behind HTTP: each turn streams the CLI's stream-json lines as SSE."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                               "field": {"type": "string"},
                               "resolution": {"type": "object", "description": "already_resolved: how"}}}}},
            "Turn": "the request body's schema, per daemon (its size limits)",
            "PermissionAnswer": {"type": "object", "required": ["behavior"], "additionalProperties": False,
                                 "properties": {
                "behavior": {"type": "string", "enum": ["allow", "deny"]},
                "updated_input": {"type": "object", "description": "allow: the tool's new input (only tools in "
                                                                   "--allow-input-edits)"},
                "remember": {"type": "string", "enum": ["tool"],
                             "description": "allow: no more questions about this tool in this session"},
                "answers": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "allow, AskUserQuestion: question text -> answer"},
                "message": {"type": "string", "description": "deny: what Claude is told"},
                "interrupt": {"type": "boolean", "description": "deny: also end the turn"}}},
            "PermissionResolution": {"type": "object", "properties": {
                "request_id": {"type": "string"}, "session_id": {"type": "string"},
                "tool_name": {"type": "string"}, "behavior": {"type": "string", "enum": ["allow", "deny"]},
                "by": {"type": "string", "enum": ["client", "timeout", "cancel", "remembered"]},
                "remember": {"type": "string"}, "interrupt": {"type": "boolean"},
                "resolved_at": {"type": "string", "format": "date-time"}}},
            "Session": {"type": "object", "properties": {
                "session_id": {"type": "string"}, "session_ids": {"type": "array", "items": {"type": "string"}},
                "workspace": {"type": "string"}, "created_at": {"type": "string"},
                "last_used_at": {"type": "string"}, "running": {"type": "boolean"},
                "state": {"type": "string", "enum": ["cold", "starting", "idle", "running", "stopping"]},
                "pid": {"type": ["integer", "null"]}, "last_event_id": {"type": "integer"},
                "queued": {"type": "boolean"},
                "pending_permissions": {"type": "array", "description": "permission_request events that wait "
                                                                       "for an answer",
                                        "items": {"type": "object"}},
                "live_options": {"type": ["object", "null"], "description": "what its live process runs with: "
                                                                            "model, permission_mode and the "
                                                                            "options that differ from a plain start"},
                "usage": {"type": "object", "description": "GET of one session: what its turns cost in all",
                          "properties": {name: {"type": "number"} for name in (
                              "turns", "cost_usd", "input_tokens", "output_tokens", "cache_read_tokens",
                              "cache_creation_tokens")}}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/claude": {"post": {
            "summary": "Start (no session_id) or resume a session; streams the CLI's lines as SSE",
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Turn"}}}},
            "responses": {"200": {"description": "id: <n> + data: <stream-json line> events, ending with one "
                                                 "result; the session id is in the X-Session-Id header",
                                  "headers": {"X-Session-Id": {"schema": {"type": "string", "format": "uuid"}}},
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 404, 409, 410, 413, 415, 503, *_COMMON)}}},
        "/api/sessions": {"get": {
            "summary": "Sessions, most recently used first",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                        "maximum": 500, "default": 50}},
                           {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "A page", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"sessions": {"type": "array", "items": _SESSION},
                                                 "next_cursor": {"type": ["string", "null"]}}}}}},
                          **_errors(400, *_COMMON)}}},
        "/api/sessions/{session_id}": {
            "get": {"summary": "One session", "parameters": [_SESSION_ID],
                    "responses": {"200": {"description": "The session",
                                          "content": {"application/json": {"schema": _SESSION}}},
                                  **_errors(404, *_COMMON)}},
            "delete": {"summary": "Delete a session, its ids and its workspace (a worktree too; never a project's "
                                  "own folder)", "parameters": [
                _SESSION_ID, {"name": "purge_transcript", "in": "query", "schema": {"type": "boolean"}},
                {"name": "delete_branch", "in": "query", "schema": {"type": "boolean"},
                 "description": "a worktree session's branch too"}],
                       "responses": {"200": {"description": "Deleted: {session_id, session_ids, workspace, "
                                                             "event_log, transcripts_removed, transcripts}"},
                                     **_errors(400, 404, 409, *_COMMON)}}},
        "/api/sessions/{session_id}/events": {"get": {
            "summary": "Replay the session's events after Last-Event-ID (or ?after=), then follow the running turn",
            "parameters": [_SESSION_ID,
                           {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                           {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                           {"name": "follow", "in": "query",
                            "schema": {"type": "string", "enum": ["turn", "session"], "default": "turn"}}],
            "responses": {"200": {"description": "id: <n> + data: <event> frames; a gap event first if older "
                                                 "events were dropped",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 404, *_COMMON)}}},
        "/api/sessions/{session_id}/cancel": {"post": {
            "summary": "Interrupt the session's running (or queued) turn", "parameters": [_SESSION_ID],
            "responses": {"202": {"description": "Cancelling; the stream ends with its result"},
                          **_errors(404, 409, *_COMMON)}}},
        "/api/sessions/{session_id}/permissions/{request_id}": {"post": {
            "summary": "Answer a permission_request event: allow the tool (perhaps remembered, or with answers), "
                       "or deny it",
            "parameters": [_SESSION_ID, {"name": "request_id", "in": "path", "required": True,
                                         "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/PermissionAnswer"}}}},
            "responses": {"200": {"description": "Resolved; the answer went to the CLI",
                                  "content": {"application/json": {
                                      "schema": {"$ref": "#/components/schemas/PermissionResolution"}}}},
                          **_errors(400, 404, 409, 413, 415, *_COMMON)}}},
        "/api/projects": {"get": {
            "summary": "The operator's projects (--project NAME=DIR): name, path, git, branch",
            "responses": {"200": {"description": "{projects: [{name, path, git, branch}]}"}, **_errors(*_COMMON)}}},
        "/api/sessions/{session_id}/diff": {"get": {
            "summary": "What a worktree session changed since its base commit (text/x-diff)",
            "parameters": [_SESSION_ID],
            "responses": {"200": {"description": "The diff", "content": {"text/x-diff": {"schema": {
                "type": "string"}}}}, **_errors(400, 404, *_COMMON)}}},
        "/api/sessions/{session_id}/files": {"get": {
            "summary": "A folder of the session's: name, type, size and modified time of each entry",
            "parameters": [_SESSION_ID, {"name": "path", "in": "query", "schema": {"type": "string"}},
                           {"name": "hidden", "in": "query", "schema": {"type": "boolean"},
                            "description": "also .git"}],
            "responses": {"200": {"description": "{path, entries: [{name, type, size, modified}]}"},
                          **_errors(400, 403, 404, 410, *_COMMON)}}},
        "/api/sessions/{session_id}/files/{file_path}": {
            "get": {"summary": "Download a file of the session's (Range requests too)",
                    "parameters": [_SESSION_ID, _FILE_PATH],
                    "responses": {"200": {"description": "The file"}, "206": {"description": "A range of it"},
                                  **_errors(400, 403, 404, 410, *_COMMON)}},
            "put": {"summary": "Upload a file (the raw body; parent folders made; 409 while a turn runs)",
                    "parameters": [_SESSION_ID, _FILE_PATH],
                    "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                         "format": "binary"}}}},
                    "responses": {"201": {"description": "{path, size}"},
                                  **_errors(400, 403, 404, 409, 410, 413, *_COMMON)}},
            "delete": {"summary": "Delete a file (a symlink: the link only; 409 while a turn runs)",
                       "parameters": [_SESSION_ID, _FILE_PATH],
                       "responses": {"200": {"description": "{deleted}"}, **_errors(400, 403, 404, 409, 410,
                                                                                     *_COMMON)}}},
        "/v1/models": {"get": {
            "summary": "OpenAI-compatible: claude-code (the default model) and claude-code/<model> per allowed model",
            "responses": {"200": {"description": "{object: list, data: [{id, object: model, created, owned_by}]}"},
                          **_errors(*_COMMON)}}},
        "/v1/chat/completions": _chat_route(
            "OpenAI-compatible Chat Completions over a real session (X-Session-Id, X-OpenWebUI-Chat-Id, or the "
            "conversation itself); /api/claude's options in a claudesrv object",
            {"stream_options": {"type": "object"}},
            "a chat.completion, or chat.completion.chunk events and [DONE]; X-Session-Id names the session"),
        "/v1/messages": _chat_route(
            "Anthropic-compatible Messages over a real session (the same session rules and options)",
            {"system": {"type": "string"}}, "a message, or message_start ... message_stop events"),
        "/": {"get": {"summary": "What this server is: name, version and links",
                      "responses": {"200": {"description": "{name, version, links}"}, **_errors(*_COMMON)}}},
        "/healthz": {"get": {"summary": "Liveness (no auth)", "security": [],
                             "responses": {"200": {"description": "{\"status\": \"ok\"}"}}}},
        "/readyz": {"get": {"summary": "Readiness checks: the CLI answers --version and has credentials (auth status), "
                                       "the database, the workspace root, capacity",
                            "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"},
                                          **_errors(*_COMMON)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text/plain exposition format"},
                                           **_errors(*_COMMON)}}},
        "/openapi.json": {"get": {"summary": "This document",
                                  "responses": {"200": {"description": "OpenAPI 3"}, **_errors(*_COMMON)}}},
    },
}


@functools.lru_cache(maxsize=4)
def openapi_document(limits: BodyLimits) -> dict[str, Any]:
    """The document, with the request body's schema exactly as requests are validated by it."""
    document = copy.deepcopy(_DOCUMENT)
    document["components"]["schemas"]["Turn"] = turn_schema(limits)
    return document


OPENAPI = openapi_document(BodyLimits())
