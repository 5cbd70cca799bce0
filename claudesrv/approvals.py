"""
Tool approvals: a tool the CLI may not use without asking is put to a person over HTTP, and their answer
goes back to the CLI.

With ``--permission-prompt-tool stdio`` the CLI sends a ``can_use_tool`` control request and waits, with no
time limit of its own, for the host's answer. L{Approvals} decides each one:
 - a tool the operator or the turn disallowed is denied and never reaches a person;
 - a tool a person allowed with ``"remember": "tool"`` is allowed for the rest of the session (kept in the
   database, so a process that sleeps and resumes still has it);
 - in a turn started with ``"approvals": true`` the request becomes a ``permission_request`` event in the
   session's log, and waits for ``POST /api/sessions/<id>/permissions/<request_id>``, the approval timeout,
   or the end of its turn;
 - otherwise it is denied with a message that says how to allow it.
Every decision is logged (request id, tool, behaviour, who), never the tool's input.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from claudesrv import command
from claudesrv.errors import ApiError, invalid

if TYPE_CHECKING:
    from claudesrv.live import LiveSession

log = Logger()

ASK_USER = "AskUserQuestion"
ANSWER_FIELDS = ("behavior", "updated_input", "remember", "answers", "message", "interrupt")
MAX_MESSAGE = 64 << 10
KEEP_RESOLVED = 10_000  # answers remembered for a 409 to a late or second answer


def iso(seconds: float) -> str:
    """A clock time as ISO 8601 with its UTC offset, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(seconds))


@dataclass(frozen=True)
class Answer:
    """A validated answer body."""

    behavior: str
    updated_input: dict[str, Any] | None = None
    remember: bool = False
    answers: dict[str, str] | None = None
    message: str | None = None
    interrupt: bool = False


def parse_answer(raw: bytes) -> Answer:
    """Validate a POST .../permissions/<request_id> body; raise L{ApiError} naming the offending field."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    unknown = sorted(set(body) - set(ANSWER_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}; known: {', '.join(ANSWER_FIELDS)}",
                       unknown[0])
    behavior = body.get("behavior")
    if behavior not in ("allow", "deny"):
        raise invalid("behavior", "behavior must be \"allow\" or \"deny\"")
    only = ("updated_input", "remember", "answers") if behavior == "allow" else ("message", "interrupt")
    for name in ANSWER_FIELDS[1:]:
        if name in body and name not in only:
            raise invalid(name, f"{name} does not go with behavior {behavior!r}")
    updated = body.get("updated_input")
    if updated is not None and not isinstance(updated, dict):
        raise invalid("updated_input", "updated_input must be a JSON object: the tool's whole new input")
    remember = body.get("remember")
    if remember is not None and remember != "tool":
        raise invalid("remember", "remember must be \"tool\" (allow this tool for the rest of the session)")
    answers = body.get("answers")
    if answers is not None:
        if not isinstance(answers, dict) or not answers or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in answers.items()):
            raise invalid("answers", "answers must map each question's text to the answer's text")
        if updated is not None:
            raise invalid("answers", "give answers or updated_input, not both")
    message = body.get("message")
    if message is not None and (not isinstance(message, str) or "\0" in message
                                or len(message.encode("utf-8", "replace")) > MAX_MESSAGE):
        raise invalid("message", f"message must be a string of at most {MAX_MESSAGE} bytes")
    interrupt = body.get("interrupt", False)
    if not isinstance(interrupt, bool):
        raise invalid("interrupt", "interrupt must be true or false")
    return Answer(behavior, updated, remember == "tool", answers, message, interrupt)


class Pending:
    """One can_use_tool request waiting for a person."""

    def __init__(self, session: LiveSession, cli_request_id: str, tool_name: str, tool_input: dict[str, Any],
                 event: dict[str, Any]) -> None:
        self.session = session
        self.cli_request_id = cli_request_id
        self.tool_name = tool_name
        self.input = tool_input
        self.event = event
        self.timer: IDelayedCall | None = None
        self.answering = False  # a "remember" answer is being written to the database

    @property
    def request_id(self) -> str:
        return str(self.event["request_id"])


class Approvals:
    """Every session's pending requests, the answers given lately, and the tools remembered per session."""

    def __init__(self, clock: IReactorTime, timeout: float, input_edits: Sequence[str],
                 remembered_in: Callable[[str], Deferred[set[str]]],
                 remember: Callable[[str, str], Deferred[None]], forget: Callable[[str, str], Deferred[None]]) -> None:
        self.clock = clock
        self.timeout = timeout
        self.input_edits = frozenset(input_edits)
        self._load_remembered = remembered_in
        self._remember = remember
        self._forget = forget
        self.pending: dict[str, Pending] = {}
        self.resolved: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self.remembered: dict[str, set[str]] = {}
        self.decisions: dict[tuple[str, str], int] = {}  # (behavior, by) -> count, for /metrics

    # ------------------------------------------------------------------ the CLI asks

    def ask(self, session: LiveSession, cli_request_id: str, request: dict[str, Any]) -> None:
        """Decide a can_use_tool request, now or once a person answers."""
        tool = str(request.get("tool_name"))
        turn = session.turn
        refused = session.host.limits.deny_tools + (turn.request.options.disallowed_tools if turn else ())
        if tool in refused:
            self._deny_unasked(session, cli_request_id, request, f"claudesrv: the tool {tool} is not allowed here.")
            return
        sid = session.session_id
        known = self.remembered.get(sid)
        if known is None:
            d = self._load_remembered(sid).addCallback(self._loaded, sid)
            d.addErrback(self._not_loaded, sid)
            d.addCallback(lambda _: self._decide(session, cli_request_id, request))
            return
        self._decide(session, cli_request_id, request)

    def _loaded(self, tools: set[str], session_id: str) -> None:
        self.remembered.setdefault(session_id, set()).update(tools)

    def _not_loaded(self, failure: Failure, session_id: str) -> None:
        log.failure("could not read the remembered tools of session {sid}; it is asked as if none were",
                    failure, sid=session_id)

    def _decide(self, session: LiveSession, cli_request_id: str, request: dict[str, Any]) -> None:
        if session.process is None or session.process.ended:
            return
        tool = str(request.get("tool_name"))
        given = request.get("input")
        tool_input: dict[str, Any] = given if isinstance(given, dict) else {}
        turn = session.turn
        if tool in self.remembered.get(session.session_id, ()):
            request_id = uuid.uuid4().hex
            session.process.send(command.control_response(cli_request_id,
                                                          {"behavior": "allow", "updatedInput": tool_input}))
            self._record(session, request_id, tool, {"behavior": "allow", "by": "remembered"})
            return
        if turn is None or not turn.request.approvals or turn.stop_reason is not None:
            text = (f"claudesrv: the tool {tool} needs approval, and nobody can be asked during this turn. "
                    f"Pre-approve it with allowedTools (for example [\"{tool}\"]), start the turn with "
                    "\"approvals\": true to be asked, or with dangerously-skip-permissions.")
            self._deny_unasked(session, cli_request_id, request, text)
            return
        request_id = uuid.uuid4().hex
        now = self.clock.seconds()
        event: dict[str, Any] = {
            "type": "claudesrv", "subtype": "permission_request", "request_id": request_id, "tool_name": tool,
            "input": tool_input, "tool_use_id": request.get("tool_use_id"),
            "description": request.get("description"), "suggestions": request.get("permission_suggestions") or [],
            "expires_at": iso(now + self.timeout) if self.timeout else None,
        }
        if tool == ASK_USER:
            event["questions"] = tool_input.get("questions") or []
        pending = Pending(session, cli_request_id, tool, tool_input, event)
        self.pending[request_id] = pending
        if self.timeout:
            pending.timer = self.clock.callLater(self.timeout, self._expire, pending)
        session.log.append_event(event)
        log.info("approval {request_id} of session {session_id}: {tool} asked", request_id=request_id,
                 session_id=session.session_id, tool=tool)

    def _deny_unasked(self, session: LiveSession, cli_request_id: str, request: dict[str, Any], text: str) -> None:
        assert session.process is not None
        tool = str(request.get("tool_name"))
        session.process.send(command.control_response(cli_request_id, {"behavior": "deny", "message": text}))
        session.log.append_event({"type": "claudesrv", "subtype": "permission_denied", "tool_name": tool,
                                  "tool_use_id": request.get("tool_use_id"), "message": text})
        self._count("deny", "policy")
        log.info("approval of session {session_id}: {tool} denied by policy", session_id=session.session_id,
                 tool=tool)

    # ------------------------------------------------------------------ a person answers

    def answer(self, session_id: str, request_id: str, answer: Answer) -> Deferred[dict[str, Any]]:
        """Check an answer against its request and send it to the CLI; raises L{ApiError} (404, 409, 403, 400)."""
        pending = self.pending_of(session_id, request_id)
        if pending.answering:
            raise ApiError(409, "already_resolved", "another answer to this request is being recorded")
        response = self._response(pending, answer)
        d: Deferred[None] = Deferred()
        if answer.remember:
            pending.answering = True
            tool = pending.tool_name
            known = tool in self.remembered.get(session_id, set())

            def recorded(result: Any) -> Any:
                pending.answering = False
                if request_id not in self.pending and not known:  # a timeout or cancel came first: not remembered
                    self._forget(session_id, tool).addErrback(
                        lambda f: log.failure("could not forget the tool {tool} of session {sid}", f, tool=tool,
                                              sid=session_id))
                return result

            d = self._remember(session_id, tool).addBoth(recorded)
        else:
            d.callback(None)

        def send(_: object) -> dict[str, Any]:
            pending_now = self.pending_of(session_id, request_id)  # a timeout or cancel may have come first
            if answer.remember:
                self.remembered.setdefault(session_id, set()).add(pending_now.tool_name)
            resolution: dict[str, Any] = {"behavior": answer.behavior, "by": "client"}
            if answer.remember:
                resolution["remember"] = "tool"
            if answer.interrupt:
                resolution["interrupt"] = True
            return self._resolve(pending_now, resolution, response)

        return d.addCallback(send)

    def pending_of(self, session_id: str, request_id: str) -> Pending:
        """The request waiting for an answer; raises L{ApiError} 409 if it was resolved, 404 if unknown."""
        pending = self.pending.get(request_id)
        if pending is not None and pending.session.session_id == session_id:
            return pending
        done = self.resolved.get(request_id)
        if done is not None and done[0] == session_id:
            how = done[1]
            raise ApiError(409, "already_resolved",
                           f"this request was already resolved: {how['behavior']} by {how['by']}",
                           extra={"resolution": how})
        raise ApiError(404, "permission_request_not_found", f"no pending permission request {request_id} "
                                                            f"in session {session_id}")

    def _response(self, pending: Pending, answer: Answer) -> dict[str, Any]:
        """The CLI's answer: the input to run the tool with, or the denial."""
        if answer.behavior == "deny":
            response: dict[str, Any] = {"behavior": "deny", "message": answer.message or
                                        f"The user denied the use of {pending.tool_name}."}
            if answer.interrupt:
                response["interrupt"] = True
            return response
        asks_user = pending.tool_name == ASK_USER
        if answer.updated_input is not None and pending.tool_name not in self.input_edits:
            raise ApiError(403, "input_edit_denied",
                           f"this server does not let an answer change the input of {pending.tool_name} "
                           "(--allow-input-edits)", "updated_input")
        if answer.remember and asks_user:
            raise invalid("remember", "a question to the user cannot be remembered")
        if answer.answers is not None:
            if not asks_user:
                raise invalid("answers", f"answers are for {ASK_USER}, not {pending.tool_name}")
            questions = {q.get("question") for q in pending.input.get("questions") or [] if isinstance(q, dict)}
            strange = sorted(set(answer.answers) - questions)
            if strange:
                raise invalid("answers", f"no question {strange[0]!r} was asked")
            return {"behavior": "allow", "updatedInput": {**pending.input, "answers": answer.answers}}
        if asks_user and answer.updated_input is None:
            raise invalid("answers", f"an answer to {ASK_USER} needs answers: {{\"<question>\": \"<answer>\"}}")
        return {"behavior": "allow", "updatedInput": answer.updated_input or pending.input}

    # ------------------------------------------------------------------ nobody answers

    def _expire(self, pending: Pending) -> None:
        pending.timer = None
        text = (f"claudesrv: nobody answered the request to use {pending.tool_name} within {self.timeout:g} s, "
                "so it was denied.")
        self._resolve(pending, {"behavior": "deny", "by": "timeout", "message": text},
                      {"behavior": "deny", "message": text})

    def cancel(self, session: LiveSession, cli_request_id: str | None = None) -> None:
        """The turn ends, is interrupted, or the CLI cancelled its request: what waits is resolved as cancelled
        (the CLI is told nothing: it has given up on these requests itself)."""
        for pending in [p for p in self.pending.values() if p.session is session]:
            if cli_request_id is None or pending.cli_request_id == cli_request_id:
                self._resolve(pending, {"behavior": "deny", "by": "cancel"}, None)

    def waiting(self, session: LiveSession) -> list[dict[str, Any]]:
        """The permission_request events of a session that wait for an answer."""
        return [p.event for p in self.pending.values() if p.session is session]

    def forget(self, session_id: str) -> None:
        """The session is deleted."""
        self.remembered.pop(session_id, None)

    # ------------------------------------------------------------------ every decision ends here

    def _count(self, behavior: str, by: str) -> None:
        self.decisions[(behavior, by)] = self.decisions.get((behavior, by), 0) + 1

    def _resolve(self, pending: Pending, resolution: dict[str, Any], response: dict[str, Any] | None) -> dict[str, Any]:
        del self.pending[pending.request_id]
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        session = pending.session
        if response is not None and session.process is not None and not session.process.ended:
            session.process.send(command.control_response(pending.cli_request_id, response))
        if session.turn is not None:
            session.turn.last_stdout = self.clock.seconds()  # waiting for a person is not a silent CLI
        return self._record(session, pending.request_id, pending.tool_name, resolution)

    def _record(self, session: LiveSession, request_id: str, tool: str, resolution: dict[str, Any]) -> dict[str, Any]:
        resolution = {**resolution, "resolved_at": iso(self.clock.seconds())}
        self.resolved[request_id] = (session.session_id, resolution)
        self._count(resolution["behavior"], resolution["by"])
        while len(self.resolved) > KEEP_RESOLVED:
            self.resolved.popitem(last=False)
        session.log.append_event({"type": "claudesrv", "subtype": "permission_resolved", "request_id": request_id,
                                  "tool_name": tool, **resolution})
        log.info("approval {request_id} of session {session_id}: {tool} {behavior} by {by}", request_id=request_id,
                 session_id=session.session_id, tool=tool, behavior=resolution["behavior"], by=resolution["by"])
        return {"request_id": request_id, "session_id": session.session_id, "tool_name": tool, **resolution}
