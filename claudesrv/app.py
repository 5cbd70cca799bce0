"""
The HTTP API: Klein routes that parse, validate and hand a turn to the run manager.

Routes know nothing of processes. Every error before streaming is an HTTP status with a JSON body
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable
from typing import Any, cast

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from claudesrv import files, sse
from claudesrv.anthropic_api import AnthropicEndpoint
from claudesrv.approvals import parse_answer
from claudesrv.command import ClaudeRequest, is_canonical_uuid, parse_request
from claudesrv.compat import Conversations
from claudesrv.errors import ApiError, error_body, json_body, session_busy, unknown_session
from claudesrv.live import Turn
from claudesrv.openai_api import OpenAIEndpoints
from claudesrv.openapi import OPENAPI, openapi_document
from claudesrv.policy import TurnPolicy
from claudesrv.projects import GitError, Placement, Projects
from claudesrv.registry import Busy, ProjectBusy, QueueFull, SessionRegistry
from claudesrv.schema import BodyLimits
from claudesrv.sessions import Readiness, Sessions
from claudesrv.store import SessionGroup, SessionStore
from claudesrv.workspaces import WorkspaceError, Workspaces

log = Logger()

Respond = Callable[[IRequest, Turn], Any]  # writes a turn's answer; fires when it is written

INSTALL_HINT = ("install it with `npm install -g @anthropic-ai/claude-code`, "
                "or start the daemon with --claude /path/to/claude")


class ClaudeExecutable:
    """The CLI named by ``--claude``: a path, or a name looked up on PATH (again, until found)."""

    def __init__(self, name: str, environ: dict[str, str]) -> None:
        self.name = name
        self.environ = environ
        self._found: str | None = None

    def find(self) -> str | None:
        if self._found is None or not os.access(self._found, os.X_OK):
            if os.sep in self.name:
                path = os.path.abspath(self.name)
                self._found = path if os.path.isfile(path) and os.access(path, os.X_OK) else None
            else:
                self._found = shutil.which(self.name, path=self.environ.get("PATH", os.defpath))
        return self._found

    def path(self) -> str:
        return self._found or self.name

    def missing(self) -> ApiError:
        """Why the CLI cannot be run: not there, or there but not executable."""
        path = os.path.abspath(self.name) if os.sep in self.name else None
        if path is not None and os.path.isfile(path):
            return ApiError(503, "cli_not_executable", f"the Claude CLI {path!r} exists but is not executable: "
                                                       f"chmod +x it, or start the daemon with another --claude")
        return ApiError(503, "cli_not_found", f"the Claude CLI {self.name!r} was not found: {INSTALL_HINT}")


def _iso(stored: str) -> str:
    """A time as SQLite keeps it (UTC, ``YYYY-MM-DD HH:MM:SS``) in ISO 8601 with its offset."""
    return stored.replace(" ", "T") + "+00:00" if stored and "T" not in stored else stored


def _int_arg(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name.encode(), [None])[0]
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_query", f"{name} must be a whole number", name) from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_query", f"{name} must be between {low} and {high}", name)
    return value


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o{offset}".encode()).decode()


def _cursor(request: IRequest) -> int:
    raw = request.args.get(b"cursor", [None])[0]
    if not raw:
        return 0
    try:
        text = base64.urlsafe_b64decode(raw).decode()
        if text.startswith("o") and text[1:].isdigit() and int(text[1:]) < 1 << 31:
            return int(text[1:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise ApiError(400, "invalid_query", "cursor is not one this server gave out", "cursor")


class ClaudeAPI:
    """The routes of the daemon, with their collaborators injected."""

    app = Klein()

    def __init__(self, live: SessionRegistry, store: SessionStore, workspaces: Workspaces,
                 cli: ClaudeExecutable, sessions: Sessions, readiness: Readiness, metrics: CollectorRegistry,
                 policy: TurnPolicy | None = None, body_limits: BodyLimits | None = None,
                 tool_activity: str = "reasoning", projects: Projects | None = None) -> None:
        self.live = live
        self.sessions = sessions
        self.readiness = readiness
        self.collectors = metrics
        self.policy = policy or TurnPolicy()
        self.body_limits = body_limits or BodyLimits()
        self.projects = projects or Projects([], os.path.join(workspaces.root, os.pardir, "worktrees"))
        conversations = Conversations(store)
        self.openai = OpenAIEndpoints(self, conversations, tool_activity)
        self.anthropic = AnthropicEndpoint(self, conversations, tool_activity)
        self.store = store
        self.workspaces = workspaces
        self.cli = cli

    def resource(self) -> Any:
        return self.app.resource()

    # ------------------------------------------------------------------ routes

    @app.route("/api/claude", methods=["POST"])
    def claude(self, request: IRequest) -> Any:
        """Start or resume a session; the answer is the CLI's stream as Server-Sent Events."""
        assert request.content is not None
        turn = self.policy.apply(parse_request(request.content.read(), self.body_limits))
        return self.run(request, turn, self.stream)

    def run(self, request: IRequest, turn: ClaudeRequest, respond: Respond) -> Any:
        """Start or resume the turn's session (the policy was applied), and answer with C{respond}."""
        if self.cli.find() is None:
            raise self.cli.missing()
        if turn.session_id is None:
            placement = None
            if turn.project is not None:
                placement = Placement(self.projects, self.projects.get(turn.project), turn.worktree, turn.base)
            return self._submit(request, turn, None, respond, placement)
        live = self.live.sessions.get(turn.session_id)
        if live is not None and not live.forgotten and os.path.isdir(live.workspace):
            return self._submit(request, turn, live.workspace, respond)  # known and warm: no database round trip
        d: Deferred[Any] = self.store.lookup(turn.session_id)
        d.addCallback(self._resume, request, turn, respond)
        return d

    def _resume(self, stored: str | None, request: IRequest, turn: ClaudeRequest, respond: Respond) -> Any:
        if stored is None:
            raise unknown_session(turn.session_id or "", "session_id")
        try:
            workspace = self.workspaces.resolve(stored)
        except WorkspaceError as e:
            status = 410 if e.code == "workspace_missing" else 500
            raise ApiError(status, e.code, e.message, "session_id") from None
        return self._submit(request, turn, workspace, respond)

    def _submit(self, request: IRequest, turn_request: ClaudeRequest, workspace: str | None,
                respond: Respond, placement: Placement | None = None) -> Any:
        """Admit the turn; a new session's row is committed before the first byte of the answer."""
        try:
            turn = self.live.admit(turn_request, workspace, placement)
        except Busy:
            raise session_busy() from None
        except ProjectBusy:
            raise ApiError(409, "project_busy", "another session runs a turn in this project's folder; wait for it, "
                                                "or work in a worktree of your own (\"worktree\": true)") from None
        except QueueFull as e:
            request.setHeader(b"Retry-After", b"5")
            raise ApiError(503, "server_busy", f"{e}; try again later") from None
        except OSError as e:
            raise ApiError(500, "workspace_error", f"could not create the workspace: {e.strerror}") from None
        if not turn.new_session:
            return respond(request, turn)  # marked used when the turn ends
        workspace = self.live.sessions[turn.session_id].workspace
        # a plain Deferred in front: Klein's cancel (the client left) must reach the stream chained to it
        d: Deferred[Any] = Deferred()
        made = [turn.prepared, self.store.record(turn.session_id, workspace)]
        recorded = gatherResults(made, consumeErrors=True)
        if placement is not None:  # once its worktree (and so its base commit) exists
            recorded.addCallback(lambda _: self.store.record_project(
                turn.session_id, placement.project.name, workspace if placement.worktree else None,
                placement.commit))
        recorded.chainDeferred(d)

        def give_up(_: object) -> None:
            self.live.abandon(turn)
            self.store.delete_sessions([turn.session_id]).addErrback(lambda f: None)  # the row may have been written

        def not_recorded(failure: Failure) -> None:
            # once the folders and the row are done (or failed) they are undone, in that order
            DeferredList(made, consumeErrors=True).addCallback(give_up)
            if failure.check(FirstError):
                failure = failure.value.subFailure
            if failure.check(CancelledError):  # the client left meanwhile
                return None
            if failure.check(ApiError):  # a worktree's base that is no commit
                raise failure.value
            if failure.check(GitError):
                raise ApiError(500, "worktree_error", f"could not make the worktree: {failure.value}")
            if failure.check(OSError):
                raise ApiError(500, "workspace_error", f"could not create the workspace: {failure.value.strerror}")
            log.failure("could not record session {sid}", failure, sid=turn.session_id)
            raise ApiError(500, "database_error", "the server could not record the session in its database")

        return d.addCallbacks(lambda _: respond(request, turn), not_recorded)

    def stream(self, request: IRequest, turn: Turn, client: sse.Client | None = None,
               event_stream: bool = True) -> Deferred[bytes]:
        """The turn's events, from its first event to its result: as SSE, or to C{client}, which writes them in
        another shape (the OpenAI and Anthropic endpoints; C{event_stream} False: one JSON answer at the end)."""
        session = self.live.sessions[turn.session_id]
        request.setHeader(b"X-Session-Id", turn.session_id.encode())
        if event_stream:
            sse.start(cast(sse.Client, request))  # the headers, X-Session-Id with them, go now
        client = client or cast(sse.Client, request)
        limits = self.live.limits
        sink = sse.SseSink(client, session.log, turn.start_offset, self.live.clock, lambda: turn.end_offset,
                           limits.keepalive, limits.idle_timeout,
                           on_gone=lambda why: self.live.client_left(turn, why))
        sink.open()
        self.live.start(turn)
        sink.done.addBoth(self._count_relayed, sink)
        return sink.done

    def _count_relayed(self, result: Any, sink: sse.SseSink) -> Any:
        self.live.counters.bytes_relayed += sink.written
        return result

    @app.route("/api/sessions/<session_id>/events", methods=["GET"])
    def events(self, request: IRequest, session_id: str) -> Any:
        """Replay a session's events after Last-Event-ID (or ?after=), then follow the running turn
        (?follow=session: every later turn too, until the client leaves)."""
        raw = request.getHeader(b"last-event-id")
        name = "Last-Event-ID"
        if raw is None:
            raw = (request.args.get(b"after") or [None])[0]
            name = "after"
        after = 0
        if raw is not None:
            text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            if not text.isdigit() or len(text) > 18:
                raise ApiError(400, "invalid_query", f"{name} must be a non-negative whole number", name)
            after = int(text)
        follow = (request.args.get(b"follow") or [b"turn"])[0]
        if follow not in (b"turn", b"session"):
            raise ApiError(400, "invalid_query", "follow must be turn or session", "follow")
        return self._group(session_id).addCallback(
            lambda group: self._replay(request, group.session_id, after, follow == b"session"))

    def _replay(self, request: IRequest, session_id: str, after: int, whole_session: bool) -> Deferred[bytes]:
        event_log = self.live.log_for(session_id)
        position = event_log.offset_after(after)
        first = b""
        if position is None:
            first = sse.event({"type": "claudesrv", "subtype": "gap", "from": after + 1,
                               "to": event_log.first_seq - 1,
                               "message": "these events are no longer in the session's log (--log-max-bytes)"})
            position = event_log.start
        turn = self.live.turns.get(session_id)
        end = event_log.end
        if whole_session:
            def until() -> int | None:
                return None
        elif turn is not None:
            def until() -> int | None:
                return turn.end_offset
        else:
            def until() -> int | None:
                return end
        request.setHeader(b"X-Session-Id", session_id.encode())
        client = cast(sse.Client, request)
        sse.start(client)
        limits = self.live.limits
        sink = sse.SseSink(client, event_log, position, self.live.clock, until, limits.keepalive,
                           limits.idle_timeout, on_gone=lambda why: self.live.release_log(session_id))
        sink.open(first)

        def done(result: Any) -> Any:
            self.live.release_log(session_id)
            return self._count_relayed(result, sink)

        sink.done.addBoth(done)
        return sink.done

    @app.route("/api/sessions/<session_id>/cancel", methods=["POST"])
    def cancel(self, request: IRequest, session_id: str) -> Any:
        """Interrupt the session's running turn (the interrupt request first, as a client disconnect does),
        or drop its queued one."""
        if self.live.cancel(session_id):
            return json_body(request, 202, {"session_id": session_id, "status": "cancelling"})

        def not_running(_: SessionGroup) -> bytes:
            raise ApiError(409, "not_running", "this session has no running turn")

        return self._group(session_id).addCallback(not_running)

    @app.route("/v1/models", methods=["GET"])
    def openai_models(self, request: IRequest) -> bytes:
        """The models, in OpenAI's list shape."""
        return self.openai.models(request)

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat_completions(self, request: IRequest) -> Any:
        """A turn in OpenAI's Chat Completions shape (claudesrv.openai_api)."""
        return self.openai.completions(request)

    @app.route("/v1/messages", methods=["POST"])
    def anthropic_messages(self, request: IRequest) -> Any:
        """A turn in Anthropic's Messages shape (claudesrv.anthropic_api)."""
        return self.anthropic.messages(request)

    @app.route("/api/sessions/<session_id>/permissions/<request_id>", methods=["POST"])
    def answer_permission(self, request: IRequest, session_id: str, request_id: str) -> Any:
        """A person's answer to a ``permission_request`` event: the tool may run (perhaps with other input), or not."""
        assert request.content is not None
        self.live.approvals.pending_of(session_id, request_id)  # 404 or 409 before the body is judged
        d = self.live.approvals.answer(session_id, request_id, parse_answer(request.content.read()))

        def failed(failure: Failure) -> Failure:
            if not failure.check(ApiError):
                log.failure("could not remember the tool of approval {request_id}", failure, request_id=request_id)
                raise ApiError(500, "database_error", "the server could not record the answer; try again")
            return failure

        return d.addCallbacks(lambda resolution: json_body(request, 200, resolution), failed)

    @app.route("/api/sessions", methods=["GET"])
    def list_sessions(self, request: IRequest) -> Any:
        """Sessions, most recently used first, a page at a time."""
        limit = _int_arg(request, "limit", 50, 1, 500)
        offset = _cursor(request)
        d = self.store.groups(limit + 1, offset)

        def page(groups: list[SessionGroup]) -> bytes:
            more = len(groups) > limit
            body: dict[str, Any] = {"sessions": [self._item(g) for g in groups[:limit]],
                                    "next_cursor": _encode_cursor(offset + limit) if more else None}
            return json_body(request, 200, body)

        return d.addCallback(page)

    @app.route("/api/sessions/<session_id>", methods=["GET"])
    def get_session(self, request: IRequest, session_id: str) -> Any:
        """One session: its ids, times, live state (with the options its process runs with) and what it cost."""
        def answer(group: SessionGroup) -> Deferred[bytes]:
            parts: list[Deferred[Any]] = [self.store.usage(group.session_ids), self.store.project_of(group.session_id)]
            d: Deferred[list[Any]] = gatherResults(parts)

            def body(found: list[Any]) -> bytes:
                usage, project = found
                where = None if project is None else {"name": project[0], "worktree": project[1],
                                                      "branch": f"claudesrv/{group.session_id}" if project[1] else None,
                                                      "base": project[2]}
                return json_body(request, 200, {**self._item(group), "usage": usage, "project": where})

            return d.addCallback(body)

        return self._group(session_id).addCallback(answer)

    @app.route("/api/projects", methods=["GET"])
    def list_projects(self, request: IRequest) -> Any:
        """The operator's projects: name, path, whether each is a git repository, and its branch."""
        d = self.sessions.blocking(self.projects.describe)
        return d.addCallback(lambda projects: json_body(request, 200, {"projects": projects}))

    @app.route("/api/sessions/<session_id>/diff", methods=["GET"])
    def diff(self, request: IRequest, session_id: str) -> Any:
        """What a worktree session changed since its base commit (text/x-diff)."""
        def found(group: SessionGroup) -> Deferred[tuple[str, str | None, str | None] | None]:
            return self.store.project_of(group.session_id)

        def answer(info: tuple[str, str | None, str | None] | None) -> Any:
            if info is None or info[1] is None or info[2] is None:
                raise ApiError(400, "not_a_worktree_session", "only a session in a worktree of its own has a diff")
            d = self.sessions.blocking(self.projects.diff, session_id, info[2])

            def text(diff: str) -> bytes:
                request.setHeader(b"Content-Type", b"text/x-diff; charset=utf-8")
                return diff.encode("utf-8", "surrogateescape")

            return d.addCallback(text)

        return self._group(session_id).addCallback(found).addCallback(answer)

    @app.route("/api/sessions/<session_id>/files", methods=["GET"])
    def list_files(self, request: IRequest, session_id: str) -> Any:
        """A folder of the session's (?path=, default its top; ?hidden=true shows .git)."""
        path = (request.args.get(b"path") or [b""])[0].decode("utf-8", "surrogateescape")
        hidden = (request.args.get(b"hidden") or [b"false"])[0].lower() == b"true"

        def answer(group: SessionGroup) -> Deferred[bytes]:
            d = self.sessions.blocking(files.listing, self._folder(group), path, hidden)
            return d.addCallback(lambda entries: json_body(request, 200, {"path": path, "entries": entries}))

        return self._group(session_id).addCallback(answer)

    @app.route("/api/sessions/<session_id>/files/<path:file_path>", methods=["GET", "PUT", "DELETE"])
    def file(self, request: IRequest, session_id: str, file_path: str) -> Any:
        """Download (ranges too), upload (the raw body) or delete one file of the session's folder. Writes wait
        for no running turn (409)."""
        files.check_relative(file_path)
        method = request.method

        def act(group: SessionGroup) -> Any:
            root = self._folder(group)
            if method == b"GET":
                return self.sessions.blocking(files.readable_file, root, file_path).addCallback(
                    self._download, request)
            if self.live.busy(*group.session_ids) or self.live.folder_busy(root):
                raise ApiError(409, "session_busy", "a turn is running in this session's folder; files can be "
                                                    "written once it has ended")
            if method == b"DELETE":
                d = self.sessions.blocking(files.delete_file, root, file_path)
                return d.addCallback(lambda _: json_body(request, 200, {"deleted": file_path}))
            assert request.content is not None
            size = request.content.seek(0, os.SEEK_END)
            d = self.sessions.blocking(files.write_file, root, file_path, request.content, size)
            return d.addCallback(lambda written: json_body(request, 201, written))

        return self._group(session_id).addCallback(act)

    def _download(self, real: str, request: IRequest) -> Resource:
        """The file, streamed by Twisted's static.File (Range, Content-Length, a type from its name); a page
        from a session is never run as one of ours."""
        request.setHeader(b"Content-Security-Policy", b"sandbox")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.postpath = []  # the file itself, not a child of it
        return static.File(real, defaultType="application/octet-stream")

    def _folder(self, group: SessionGroup) -> str:
        """The session's folder as a checked real path."""
        try:
            return self.workspaces.resolve(group.workspace)
        except WorkspaceError as e:
            raise ApiError(410 if e.code == "workspace_missing" else 500, e.code, e.message) from None

    @app.route("/api/sessions/<session_id>", methods=["DELETE"])
    def delete_session(self, request: IRequest, session_id: str) -> Any:
        """Remove every id of the session's workspace and the workspace itself (409 while a turn runs)."""
        purge_arg = request.args.get(b"purge_transcript", [b"false"])[0].lower()
        if purge_arg not in (b"true", b"false"):
            raise ApiError(400, "invalid_query", "purge_transcript must be true or false", "purge_transcript")
        purge = purge_arg == b"true"
        delete_branch = (request.args.get(b"delete_branch") or [b"false"])[0].lower()
        if delete_branch not in (b"true", b"false"):
            raise ApiError(400, "invalid_query", "delete_branch must be true or false", "delete_branch")

        def delete(group: SessionGroup) -> Any:
            if self.live.busy(*group.session_ids):
                raise ApiError(409, "session_busy", "a turn of this session is running; cancel it first")
            d = self.sessions.delete(group, purge, delete_branch == b"true")
            return d.addCallback(lambda removed: json_body(request, 200, removed))

        return self._group(session_id).addCallback(delete)

    def _group(self, session_id: str) -> Deferred[SessionGroup]:
        if not is_canonical_uuid(session_id):
            raise unknown_session(session_id)
        d = self.store.group_of(session_id)

        def found(group: SessionGroup | None) -> SessionGroup:
            if group is None:
                raise unknown_session(session_id)
            return group

        return d.addCallback(found)

    def _item(self, group: SessionGroup) -> dict[str, Any]:
        return {"session_id": group.session_id, "session_ids": group.session_ids, "workspace": group.workspace,
                "created_at": _iso(group.created_at), "last_used_at": _iso(group.last_used_at),
                "running": self.live.busy(*group.session_ids), **self.live.state_of(group.session_id)}

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        """What this server is, and where to go from here."""
        return json_body(request, 200, {
            "name": "claudesrv", "version": OPENAPI["info"]["version"],
            "links": {"openapi": "/openapi.json", "turn": "/api/claude", "sessions": "/api/sessions",
                      "health": "/healthz", "ready": "/readyz", "metrics": "/metrics",
                      "openai": "/v1/chat/completions", "anthropic": "/v1/messages"}})

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        """Liveness: the reactor answers. No auth, no data."""
        return json_body(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> Any:
        """Readiness: the CLI answers --version and has credentials, the database answers, workspaces can be
        written, and there is room for another request."""
        def answer(checks: dict[str, dict[str, Any]]) -> bytes:
            ready = all(c["ok"] for c in checks.values())
            return json_body(request, 200 if ready else 503,
                             {"status": "ready" if ready else "not_ready", "checks": checks})

        return self.readiness.check().addCallback(answer)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.collectors)

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return json_body(request, 200, openapi_document(self.body_limits))

    # ------------------------------------------------------------------ errors

    @app.handle_errors(ApiError)
    def bad_request(self, request: IRequest, failure: Failure) -> bytes:
        assert isinstance(failure.value, ApiError)
        return error_body(request, failure.value)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return error_body(request, ApiError(404, "not_found", f"no route {request.path.decode('latin-1')}"))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode())
        return error_body(request, ApiError(
            405, "method_not_allowed",
            f"{request.method.decode('latin-1')} is not allowed here; use {', '.join(allowed)}"))

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unhandled error in {path}", failure, path=request.path.decode("latin-1"))
        return error_body(request, ApiError(500, "internal_error", "the server failed; see its log"))
