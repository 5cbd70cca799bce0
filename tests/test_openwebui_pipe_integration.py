"""
The Open WebUI pipe ``open-webui/claude-code.py`` against a real ``twistd -n claudesrv`` with the fake CLI.

The pipe file is loaded by path and executed in a fresh module, as Open WebUI's loader does, and
``Pipe().pipe(...)`` is driven with bodies shaped like Open WebUI's. The pipe is asyncio code and the
test runs the Twisted reactor, so each conversation with the pipe runs under ``asyncio.run`` in a
thread of its own (``deferToThread``); the daemon is a separate process either way.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

import httpx
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import Daemon, Since, pid_alive, post, state_lines, wait_for
from tests.test_openwebui_pipe_units import (
    HANG,
    PNG,
    PNG_URL,
    USER,
    Dialogs,
    FakeOpenWebUI,
    image_block,
    image_part,
    load_pipe_module,
    with_files,
)

MARKER = re.compile(r"\nsession_id=([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\Z")


def reply_to(prompt: str) -> str:
    """The start of the fake's answer to a prompt (the recordings' mock API: ``MOCK-REPLY: <prompt> [...]``)."""
    return f"MOCK-REPLY: {prompt} [len={len(prompt)} "


UNKNOWN_SESSION = "0b9e7c1a-6f2d-4c3b-9a8e-1d2c3b4a5f60"


pipe_module = load_pipe_module()


def make_pipe(**valves: Any) -> Any:
    """A Pipe as Open WebUI makes one: no arguments, then the admin's valves applied."""
    pipe = pipe_module.Pipe()
    pipe.valves = pipe_module.Pipe.Valves(**valves)
    return pipe


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def chat(*messages: dict[str, Any], stream: bool = True) -> dict[str, Any]:
    """A body shaped like the one Open WebUI hands a pipe."""
    return {"model": "claude_code.claude-code", "stream": stream, "messages": list(messages)}


class Recorder:
    """An ``__event_emitter__``: records every event it is awaited with."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def statuses(self) -> list[tuple[str, bool]]:
        return [(e["data"]["description"], e["data"]["done"]) for e in self.events if e.get("type") == "status"]


class Turn:
    """What one call of the pipe produced: the text chunks and the status events."""

    def __init__(self, chunks: list[str], recorder: Recorder) -> None:
        self.chunks = chunks
        self.recorder = recorder

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def stored(self) -> str:
        """The answer as it comes back in Open WebUI's history: trailing whitespace trimmed."""
        return self.text.rstrip()

    def session_id(self) -> str | None:
        m = MARKER.search(self.stored)
        return m.group(1) if m else None

    def statuses(self) -> list[tuple[str, bool]]:
        return self.recorder.statuses()


# Longest a conversation with the pipe may take, below the tests' timeout: a thread still running when the test
# gives up would keep the reactor's thread pool, and so trial, from ever finishing.
THREAD_LIMIT = 45


def in_thread(coroutine_function: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run an asyncio coroutine function under asyncio.run in a reactor thread, for at most THREAD_LIMIT seconds
    (then it is cancelled and the Deferred fails with TimeoutError); a Deferred of its result."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine_function(), THREAD_LIMIT)

    return deferToThread(asyncio.run, bounded())


def run_pipe(pipe: Any, body: dict[str, Any], **dunders: Any) -> Any:
    """Call pipe.pipe like Open WebUI (only named dunder arguments) and read the whole answer."""
    recorder = Recorder()

    async def consume() -> Turn:
        answer = pipe.pipe(body, __event_emitter__=recorder, **dunders)
        if isinstance(answer, AsyncGenerator):
            chunks = [chunk async for chunk in answer]
        else:
            chunks = [await answer]
        for chunk in chunks:
            assert isinstance(chunk, str), chunk
        return Turn(chunks, recorder)

    return in_thread(consume)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@inlineCallbacks
def wait_stopped(test: TestCase, daemon: Daemon | Since, pid: int) -> Any:
    """The turn of CLI C{pid} was interrupted because its client left: the interrupt request reached it, the
    turn ended, no signal was needed, and the process is still up for the session's next turn."""
    sid = next(t["session_id"] for t in daemon.turns() if t["pid"] == pid)
    yield wait_for(lambda: daemon.interrupts().count(pid) == 1)
    yield wait_for(lambda: f"{sid}: disconnected," in daemon.log)
    test.assertEqual(daemon.signals(), [])
    test.assertTrue(pid_alive(pid))
    reply = yield post(daemon.url + "/api/claude", {"prompt": "still there?", "session_id": sid})
    test.assertEqual((reply.status, daemon.turns()[-1]["pid"]), (200, pid))


class PipeAgainstDaemon(TestCase):
    """Conversations through the pipe with a real claudesrv and the fake CLI. Where a test makes several checks
    on one daemon, each check sees only what the daemon did from its own start on (L{Since})."""

    timeout = 60

    def check_finished(self, turn: Turn) -> None:
        """Status lines were shown and the last one, and only it, says done."""
        statuses = turn.statuses()
        self.assertTrue(statuses, "no status events")
        self.assertTrue(statuses[-1][1], statuses)
        self.assertEqual([done for _, done in statuses[:-1]], [False] * (len(statuses) - 1), statuses)

    @inlineCallbacks
    def test_conversations(self) -> Any:
        """One daemon (refusing dangerously-skip-permissions: as root by default, else with --skip-permissions
        deny): background tasks answered without a request; a refused request rendered readable; a first
        message starting a session; later messages resuming it from the history or, without a marker, from
        the chat id; Open WebUI's Stop interrupting the turn (each check's own docstring says exactly what it
        proves)."""
        as_root = os.geteuid() == 0
        daemon = yield Daemon(self, *(() if as_root else ("--skip-permissions", "deny"))).start()
        yield self.task_answered_without_request(daemon.since())  # first: its log has no request at all
        yield self.skip_permissions_refused(daemon.since(), as_root)
        for check in (self.new_session, self.second_turn_resumes_from_history, self.chat_id_fallback,
                      self.stop_interrupts_the_turn):
            yield check(daemon.since())

    @inlineCallbacks
    def test_parameters_carry_over(self) -> Any:
        """allowedTools and dangerously-skip-permissions typed in an earlier user message reach the
        CLI on that turn and on later turns (the same process, started with them); the parameter lines are not
        part of the prompt."""
        daemon = yield Daemon(self, "--sandboxed").start()
        opening = 'allowedTools=["Bash","Edit"]\ndangerously-skip-permissions=true\nlist the files'
        first = yield run_pipe(make_pipe(base_url=daemon.url), chat(user(opening)))
        self.assertIn(reply_to("list the files"), first.text)
        second = yield run_pipe(make_pipe(base_url=daemon.url),
                                chat(user(opening), assistant(first.stored), user("and now the dirs")))
        self.assertIn(reply_to("and now the dirs"), second.text)
        turns = daemon.turns()
        self.assertEqual([t["prompt"] for t in turns], ["list the files", "and now the dirs"])
        for turn in turns:
            self.assertEqual((turn["allowed_tools"], turn["skip_permissions"]), (["Bash", "Edit"], True))
            self.assertEqual(turn["session_id"], first.session_id())
        [call] = daemon.invocations()
        argv = call["argv"]
        self.assertIn("--dangerously-skip-permissions", argv)
        at = argv.index("--allowedTools")
        self.assertEqual(argv[at + 1:at + 3], ["Bash", "Edit"])
        self.assertEqual(call["env"].get("IS_SANDBOX"), "1")

    @inlineCallbacks
    def new_session(self, daemon: Since) -> Any:
        """A first message starts a session: the assistant's text streams, the answer ends with a
        ``session_id=<uuid>`` line for that session, and the status line ends with done True."""
        turn = yield run_pipe(make_pipe(base_url=daemon.url), chat(user("hello")), __chat_id__="chat-1")
        self.assertIn(reply_to("hello"), turn.text)
        session = turn.session_id()
        self.assertIsNotNone(session, turn.text)
        [call] = daemon.invocations()
        self.assertIn(f"--session-id={session}", call["argv"])
        [sent] = daemon.turns()
        self.assertEqual((sent["session_id"], sent["prompt"]), (session, "hello"))
        self.check_finished(turn)
        self.assertEqual(turn.statuses()[0], ("Starting Claude Code…", False))
        self.assertTrue(turn.statuses()[-1][0].startswith("Done"), turn.statuses())

    @inlineCallbacks
    def second_turn_resumes_from_history(self, daemon: Since) -> Any:
        """A later message resumes the session named by the marker in the history (string or
        list-of-parts content alike), in the session's own warm CLI process; a fresh Pipe finds it, so it
        comes from the history and not from the pipe's memory. An image given by link is not sent, and the
        answer says so first."""
        first = yield run_pipe(make_pipe(base_url=daemon.url), chat(user("hello")))
        session = first.session_id()
        self.assertIsNotNone(session)

        history = [user("hello"), assistant(first.stored)]
        second = yield run_pipe(make_pipe(base_url=daemon.url), chat(*history, user("again")))
        self.assertEqual(second.session_id(), session)
        self.assertEqual(second.statuses()[0], ("Resuming the Claude Code session…", False))
        self.check_finished(second)

        parts = [user([{"type": "text", "text": "hello"}]),
                 assistant([{"type": "text", "text": first.stored}]),
                 user([{"type": "text", "text": "again"}]),
                 assistant(second.stored),
                 user([{"type": "text", "text": "third"}, {"type": "image_url", "image_url": {"url": "x"}}])]
        third = yield run_pipe(make_pipe(base_url=daemon.url), chat(*parts))
        self.assertIn(reply_to("third"), third.text)
        self.assertTrue(third.text.startswith("_Not sent to Claude: an image given as a link, not as data (x)._\n\n"),
                        third.text)
        self.assertEqual(third.session_id(), session)

        turns = daemon.turns()
        self.assertEqual([t["prompt"] for t in turns], ["hello", "again", "third"])
        [call] = daemon.invocations()
        self.assertEqual({(t["session_id"], t["pid"]) for t in turns}, {(session, call["pid"])})

    @inlineCallbacks
    def chat_id_fallback(self, daemon: Since) -> Any:
        """When the marker is gone from the history (context compaction), the same Pipe resumes the
        session it last saw in that chat (``__chat_id__``, or ``chat_id`` in ``__metadata__``)."""
        pipe = make_pipe(base_url=daemon.url)
        first = yield run_pipe(pipe, chat(user("hello")), __metadata__={"chat_id": "chat-7"})
        session = first.session_id()
        summary = [user("hello"), assistant("A summary of the chat so far."), user("again")]
        second = yield run_pipe(pipe, chat(*summary), __chat_id__="chat-7")
        self.assertEqual(second.session_id(), session)
        other = yield run_pipe(pipe, chat(*summary), __chat_id__="chat-8")
        self.assertNotEqual(other.session_id(), session)
        self.assertEqual([t["session_id"] for t in daemon.turns()], [session, session, other.session_id()])
        self.assertEqual(len(daemon.invocations()), 2)

    @inlineCallbacks
    def skip_permissions_refused(self, daemon: Since, as_root: bool) -> Any:
        """A server that refuses dangerously-skip-permissions (HTTP 403) is rendered as readable text
        naming the refusal, with no session marker and no CLI run; it does not blame the api_token
        valve. The setting carries over, so the next message is refused too, until a message says
        ``dangerously-skip-permissions=false``, as the answer tells the user."""
        asked = user("dangerously-skip-permissions=true\nrm -rf build")
        turn = yield run_pipe(make_pipe(base_url=daemon.url), chat(asked))
        code = "skip_permissions_as_root" if as_root else "skip_permissions_denied"
        self.assertIn(f"**claudesrv refused the request** (HTTP 403 {code})", turn.text)
        self.assertIn("Send `dangerously-skip-permissions=false`", turn.text)
        self.assertNotIn("api_token", turn.text)
        self.assertIsNone(turn.session_id())
        self.assertEqual(turn.statuses()[-1], ("Refused (HTTP 403)", True))

        again = yield run_pipe(make_pipe(base_url=daemon.url),
                               chat(asked, assistant(turn.stored), user("rm -rf build")))
        self.assertIn(f"(HTTP 403 {code})", again.text)
        self.assertEqual(daemon.invocations(), [])

        off = yield run_pipe(make_pipe(base_url=daemon.url),
                             chat(asked, assistant(turn.stored), user("dangerously-skip-permissions=false\nls")))
        self.assertIn(reply_to("ls"), off.text)
        [call] = daemon.invocations()
        self.assertNotIn("--dangerously-skip-permissions", call["argv"])

    @inlineCallbacks
    def task_answered_without_request(self, daemon: Since) -> Any:
        """Open WebUI's background tasks (title, follow-ups, tags, others) are answered at once,
        with a non-streaming body, and the server never runs the CLI for them."""
        pipe = make_pipe(base_url=daemon.url)
        body = chat(user("allowedTools=Bash\nFix the failing build please"), stream=False)
        title = yield run_pipe(pipe, body, __task__="title_generation", __task_body__=body)
        self.assertEqual(json.loads(title.text), {"title": "Fix the failing build please"})
        follow = yield run_pipe(pipe, body, __task__="follow_up_generation", __task_body__=body)
        self.assertEqual(json.loads(follow.text), {"follow_ups": []})
        tags = yield run_pipe(pipe, body, __task__="tags_generation", __task_body__=body)
        self.assertEqual(json.loads(tags.text), {"tags": []})
        other = yield run_pipe(pipe, body, __task__="query_generation", __task_body__=body)
        self.assertEqual(other.text, "")
        self.assertEqual(daemon.turns(), [])
        self.assertNotIn("/api/claude", daemon.log)

    @inlineCallbacks
    def stop_interrupts_the_turn(self, daemon: Since) -> Any:
        """Closing the pipe's generator after the first text (``aclose``), or cancelling the task that reads
        it while it waits for data (no text yet, as when Open WebUI cancels a chat's task), closes the HTTP
        stream: the turn is interrupted (the CLI stays up), and the status line ends as Stopped, done."""
        pipe = make_pipe(base_url=daemon.url)
        closing = Recorder()

        async def stop_after_first_text() -> str:
            answer = pipe.pipe(chat(user("[[fake lines=1 hang=1]] work")), __event_emitter__=closing)
            first: str = await answer.__anext__()
            await answer.aclose()
            return first

        first = yield in_thread(stop_after_first_text)
        self.assertTrue(first.strip(), first)
        [call] = daemon.invocations()
        yield wait_stopped(self, daemon, call["pid"])
        self.assertEqual(closing.statuses()[-1], ("Stopped", True))

        cancelling = Recorder()

        async def cancel_when_working() -> bool:
            async def consume() -> list[str]:
                return [c async for c in pipe.pipe(chat(user("[[fake hang=1]] work")), __event_emitter__=cancelling)]

            task = asyncio.ensure_future(consume())
            while ("Claude Code is working…", False) not in cancelling.statuses():
                await asyncio.sleep(0.02)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        cancelled = yield in_thread(cancel_when_working)
        self.assertTrue(cancelled)
        second = daemon.invocations()[-1]
        self.assertNotEqual(second["pid"], call["pid"])
        yield wait_stopped(self, daemon, second["pid"])
        self.assertEqual(cancelling.statuses()[-1], ("Stopped", True))


class OptionsThroughDaemon(TestCase):
    """model=, effort=, system_prompt=, max_budget_usd= and attached images, through a real daemon to the fake CLI,
    whose turns.jsonl records what each turn got; and the daemon's policy refusals as the user reads them."""

    timeout = 60

    @inlineCallbacks
    def test_settings_and_image_reach_the_cli(self) -> Any:
        """A message with model=sonnet, effort, a system prompt, a budget and an attached PNG: the CLI is started
        with that model and those options, and its turn gets the image block and then the text; the next message
        of the chat, without an image, keeps the settings and sends its text alone."""
        daemon = yield Daemon(self).start()
        settings = "model=sonnet\neffort=high\nsystem_prompt=Answer briefly.\nmax_budget_usd=0.5\n"
        first_message = user([{"type": "text", "text": settings + "what is in the picture?"}, image_part(PNG_URL)])
        first = yield run_pipe(make_pipe(base_url=daemon.url), chat(first_message))
        self.assertIn(reply_to("what is in the picture?"), first.text)
        self.assertIsNotNone(first.session_id())
        [call] = daemon.invocations()
        self.assertIn("--model=sonnet", call["argv"])
        for option in ("--effort=high", "--system-prompt=Answer briefly.", "--max-budget-usd=0.5"):
            self.assertIn(option, call["argv"])
        [stdin] = [line for line in daemon.stdin() if line.get("type") == "user"]
        self.assertEqual(stdin["message"]["content"],
                         [image_block("image/png", PNG), {"type": "text", "text": "what is in the picture?"}])
        [turn] = daemon.turns()
        self.assertEqual(turn["prompt"], "what is in the picture?")
        self.assertIn("sonnet", turn["model"])  # the alias, as the CLI resolves it
        self.assertEqual({key: turn[key] for key in ("images", "effort", "system_prompt", "max_budget_usd")},
                         {"images": ["image/png"], "effort": "high", "system_prompt": "Answer briefly.",
                          "max_budget_usd": 0.5})

        second = yield run_pipe(make_pipe(base_url=daemon.url),
                                chat(first_message, assistant(first.stored), user("and the colours?")))
        self.assertIn(reply_to("and the colours?"), second.text)
        self.assertEqual(second.session_id(), first.session_id())
        later = daemon.turns()[1]
        self.assertEqual((later["prompt"], later["pid"]), ("and the colours?", call["pid"]))
        self.assertIn("sonnet", later["model"])
        self.assertEqual((later["images"], later["effort"], later["max_budget_usd"]), ([], "high", 0.5))
        [_, stdin] = [line for line in daemon.stdin() if line.get("type") == "user"]
        self.assertEqual(stdin["message"]["content"], "and the colours?")

    @inlineCallbacks
    def test_policy_refusals_readable(self) -> Any:
        """A daemon that offers only sonnet models, at most $1 a turn and no replaced system prompt: each refusal
        is readable text naming the daemon's option and saying how to change the setting; no CLI runs; a message
        dropping the refused setting goes through."""
        daemon = yield Daemon(self, "--allow-model", "sonnet*", "--max-budget-usd", "1",
                              "--allow-system-prompt", "append").start()
        for line, code, option in (("model=opus", "model_not_allowed", "--allow-model"),
                                    ("max_budget_usd=5", "budget_over_limit", "--max-budget-usd"),
                                    ("system_prompt=Be terse.", "system_prompt_denied", "--allow-system-prompt")):
            turn = yield run_pipe(make_pipe(base_url=daemon.url), chat(user(f"{line}\nhello")))
            self.assertIn(f"**claudesrv refused the request** (HTTP 403 {code}): ", turn.text)
            self.assertIn(option, turn.text)
            key = line.split("=")[0]
            self.assertIn(f"Send `{key}=` with", turn.text)
            self.assertIsNone(turn.session_id())
            self.assertEqual(turn.statuses()[-1], ("Refused (HTTP 403)", True))
        self.assertEqual(daemon.invocations(), [])
        refused = user("model=opus\nhello")
        fixed = yield run_pipe(make_pipe(base_url=daemon.url),
                               chat(refused, assistant("**claudesrv refused the request**"), user("model=\nhello")))
        self.assertIn(reply_to("hello"), fixed.text)


class ErrorsRendered(TestCase):
    """Every way a turn can fail ends as readable text and a final status, never as an exception. Where a test
    makes several checks on one daemon, each check sees only what the daemon did from its own start on
    (L{Since})."""

    timeout = 60

    def assertFailedStatus(self, turn: Turn, prefix: str = "Failed") -> None:
        last = turn.statuses()[-1]
        self.assertTrue(last[1], last)
        self.assertTrue(last[0].startswith(prefix), last)

    @inlineCallbacks
    def test_failures_rendered(self) -> Any:
        """One daemon without keepalives: an unknown session, a CLI failing with only stderr, a new session
        that never came to be, and a run that goes silent longer than the idle_timeout valve, each rendered as
        readable text (each check's own docstring says exactly what it proves)."""
        daemon = yield Daemon(self, "--keepalive", "0").start()
        for check in (self.unknown_session, self.cli_failure_with_only_stderr,
                      self.no_marker_for_a_session_that_never_came_to_be, self.idle_timeout):
            yield check(daemon.since())

    @inlineCallbacks
    def test_is_error_result(self) -> Any:
        """A turn whose result from the CLI says is_error (here the CLI refuses to resume a session whose
        transcript is gone) shows the CLI's message and the result's subtype, and still ends with the session
        marker."""
        daemon = yield Daemon(self, "--warm-idle", "0.2").start()
        first = yield run_pipe(make_pipe(base_url=daemon.url), chat(user("hello")))
        session = first.session_id()
        [call] = daemon.invocations()
        yield wait_for(lambda: not pid_alive(call["pid"]))
        os.remove(os.path.join(daemon.state_dir, "sessions", str(session)))
        turn = yield run_pipe(make_pipe(base_url=daemon.url),
                              chat(user("hello"), assistant(first.stored), user("again")))
        self.assertIn(f"**Claude Code failed:** No conversation found with session ID: {session}", turn.text)
        self.assertEqual(turn.session_id(), session)
        self.assertFailedStatus(turn, "Failed: error_during_execution")

    @inlineCallbacks
    def test_bearer_token(self) -> Any:
        """Against a server that wants a token, a wrong or missing ``api_token`` valve gives a
        readable 401 pointing at the valve; the right one gets the answer."""
        daemon = yield Daemon(self, env={"CLAUDESRV_AUTH_TOKENS": "secret"}).start()
        for token in ("wrong", ""):
            turn = yield run_pipe(make_pipe(base_url=daemon.url, api_token=token), chat(user("hello")))
            self.assertIn("**claudesrv refused the request** (HTTP 401", turn.text)
            self.assertIn("`api_token` valve", turn.text)
            self.assertIsNone(turn.session_id())
            self.assertEqual(turn.statuses()[-1], ("Refused (HTTP 401)", True))
        self.assertEqual(daemon.turns(), [])
        good = yield run_pipe(make_pipe(base_url=daemon.url, api_token="secret"), chat(user("hello")))
        self.assertIn(reply_to("hello"), good.text)
        self.assertIsNotNone(good.session_id())

    @inlineCallbacks
    def test_server_down(self) -> Any:
        """Nothing listening at base_url: a readable "could not connect" naming the URL."""
        url = f"http://127.0.0.1:{closed_port()}"
        turn = yield run_pipe(make_pipe(base_url=url, connect_timeout=5), chat(user("hello")))
        self.assertIn(f"**Could not connect to claudesrv** at {url}/api/claude", turn.text)
        self.assertIn("`base_url` valve", turn.text)
        self.assertIsNone(turn.session_id())
        self.assertFailedStatus(turn)

    @inlineCallbacks
    def cli_failure_with_only_stderr(self, daemon: Since) -> Any:
        """A CLI that prints nothing on stdout and exits 3 with ``boom`` on stderr: the answer says
        Claude Code failed, with the exit code and the stderr text."""
        turn = yield run_pipe(make_pipe(base_url=daemon.url),
                              chat(user("[[fake no_init=1 exit=3 stderr=boom]] hi")))
        self.assertIn("**Claude Code failed:**", turn.text)
        self.assertIn("exit code 3", turn.text)
        self.assertIn("<summary>stderr</summary>", turn.text)
        self.assertIn("boom", turn.text)
        self.assertFailedStatus(turn)

    @inlineCallbacks
    def no_marker_for_a_session_that_never_came_to_be(self, daemon: Since) -> Any:
        """When the CLI of a chat's first message fails before saying anything, the server removes the new
        session, so the answer carries no session marker and the chat's next message starts a new session
        (it is not refused as an unknown session)."""
        failed = yield run_pipe(make_pipe(base_url=daemon.url), chat(user("[[fake no_init=1 exit=3]] hi")))
        self.assertIsNone(failed.session_id(), failed.text)
        again = yield run_pipe(make_pipe(base_url=daemon.url),
                               chat(user("[[fake no_init=1 exit=3]] hi"), assistant(failed.stored), user("hello")))
        self.assertIn(reply_to("hello"), again.text)
        self.assertIsNotNone(again.session_id())

    @inlineCallbacks
    def unknown_session(self, daemon: Since) -> Any:
        """A history marker naming a session the server does not know: HTTP 404 rendered with the
        hint to start a new session, and the stale marker is not repeated."""
        turn = yield run_pipe(make_pipe(base_url=daemon.url),
                              chat(user("hello"), assistant(f"Hi.\n\nsession_id={UNKNOWN_SESSION}"), user("again")))
        self.assertIn("**claudesrv refused the request** (HTTP 404 session_not_found)", turn.text)
        self.assertIn("new_session=true", turn.text)
        self.assertNotIn(f"session_id={UNKNOWN_SESSION}", turn.text)
        self.assertIsNone(turn.session_id())
        self.assertEqual(turn.statuses()[-1], ("Refused (HTTP 404)", True))
        self.assertEqual(daemon.invocations(), [])

    @inlineCallbacks
    def idle_timeout(self, daemon: Since) -> Any:
        """A run that goes silent (no keepalives) longer than the idle_timeout valve: the pipe stops
        waiting, says so, keeps the session marker, and closing the stream interrupts the turn (the CLI
        stays up for the session's next turn)."""
        turn = yield run_pipe(make_pipe(base_url=daemon.url, idle_timeout=0.5), chat(user("[[fake hang=1]] hi")))
        self.assertIn("**claudesrv sent nothing for 0.5 s**", turn.text)
        self.assertIn("`idle_timeout` valve", turn.text)
        [call] = daemon.invocations()
        self.assertEqual(turn.session_id(), call["session_id"])
        self.assertFailedStatus(turn)
        yield wait_stopped(self, daemon, call["pid"])


class ApprovalsAsked(TestCase):
    """With the approvals valve on, tools that need approval are asked about in Open WebUI's dialogs (a fake
    ``__event_call__``), through a real daemon and the fake CLI, whose ``tools.jsonl`` says which tools ran."""

    timeout = 60

    def tools_ran(self, daemon: Daemon) -> list[dict[str, Any]]:
        return state_lines(daemon.state_dir, "tools.jsonl")

    @inlineCallbacks
    def test_approvals(self) -> Any:
        """One daemon: a confirmed dialog lets Bash run, a cancelled one denies it with the pipe's message, and
        Claude's question gets the option the user typed the number of (each check's own docstring says
        exactly what it proves). Another daemon with a 1 s approval timeout: a dialog closed without an
        answer ends as the server's timeout."""
        daemon = yield Daemon(self).start()
        for check in (self.confirmed_runs_the_tool, self.cancelled_denies_the_tool, self.question_answered):
            yield check(daemon)
        quick = yield Daemon(self, "--approval-timeout", "1").start()
        yield self.closed_dialog_times_out(quick)

    @inlineCallbacks
    def confirmed_runs_the_tool(self, daemon: Daemon) -> Any:
        """The turn asks for approvals; the Bash call becomes a confirmation dialog showing the command; Confirm
        lets the tool run (the fake's tools.jsonl), Claude's final text follows, and the status lines show the
        request and its resolution."""
        before = len(self.tools_ran(daemon))
        dialogs = Dialogs(True)
        turn = yield run_pipe(make_pipe(base_url=daemon.url, approvals=True),
                              chat(user("[[fake tool=Bash]] write hi to file.txt")), __event_call__=dialogs)
        [dialog] = dialogs.calls
        self.assertEqual((dialog["type"], dialog["data"]["title"]), ("confirmation", "Allow Bash?"))
        self.assertIn("echo hi > file.txt", dialog["data"]["message"])
        ran = self.tools_ran(daemon)[before:]
        self.assertEqual([tool["tool_name"] for tool in ran], ["Bash"])
        self.assertIn("MOCK-FINAL after tool:", turn.text)
        self.assertIn("(Bash completed with no output)", turn.text)
        self.assertIsNotNone(turn.session_id())
        statuses = turn.statuses()
        self.assertIn(("Waiting for your approval: Bash", False), statuses)
        self.assertIn(("Allowed Bash", False), statuses)
        self.assertTrue(statuses[-1][0].startswith("Done") and statuses[-1][1], statuses)

    @inlineCallbacks
    def cancelled_denies_the_tool(self, daemon: Daemon) -> Any:
        """Cancel denies the tool: it does not run, and Claude gets the pipe's message as the tool's error."""
        before = len(self.tools_ran(daemon))
        turn = yield run_pipe(make_pipe(base_url=daemon.url, approvals=True),
                              chat(user("[[fake tool=Bash]] write hi to file.txt")), __event_call__=Dialogs(False))
        self.assertEqual(self.tools_ran(daemon)[before:], [])
        self.assertIn("MOCK-FINAL after tool:", turn.text)
        self.assertIn("The user declined this tool use in Open WebUI.", turn.text)
        self.assertIn(("Denied Bash", False), turn.statuses())

    @inlineCallbacks
    def question_answered(self, daemon: Daemon) -> Any:
        """Claude's AskUserQuestion is an input dialog listing the options; the number typed becomes that
        option's label in the answers the tool gets."""
        before = len(self.tools_ran(daemon))
        dialogs = Dialogs("2")
        turn = yield run_pipe(make_pipe(base_url=daemon.url, approvals=True),
                              chat(user("[[fake tool=AskUserQuestion]] ask me")), __event_call__=dialogs)
        [dialog] = dialogs.calls
        self.assertEqual((dialog["type"], dialog["data"]["title"]), ("input", "Format"))
        self.assertIn("2. **Detailed**", dialog["data"]["message"])
        [ran] = self.tools_ran(daemon)[before:]
        self.assertEqual(ran["tool_name"], "AskUserQuestion")
        self.assertEqual(ran["input"]["answers"], {"Which format?": "Detailed"})
        self.assertIn("MOCK-FINAL after tool:", turn.text)
        self.assertIn(("Question answered", False), turn.statuses())

    @inlineCallbacks
    def closed_dialog_times_out(self, daemon: Daemon) -> Any:
        """A dialog closed without a button never answers: the server's approval timeout denies the tool, the
        pipe stops waiting for the dialog, and the turn ends normally."""
        dialogs = Dialogs(HANG)
        turn = yield run_pipe(make_pipe(base_url=daemon.url, approvals=True),
                              chat(user("[[fake tool=Bash]] write hi to file.txt")), __event_call__=dialogs)
        self.assertEqual(len(dialogs.calls), 1)
        self.assertEqual(self.tools_ran(daemon), [])
        self.assertIn("MOCK-FINAL after tool:", turn.text)
        self.assertIn(("Denied Bash (timeout)", False), turn.statuses())
        self.assertTrue(turn.statuses()[-1][0].startswith("Done"), turn.statuses())


def download(url: str) -> Any:
    """GET a URL as a browser following a link would (no token): a Deferred of (status, Content-Type, body)."""
    async def get() -> tuple[int, str, bytes]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(url)
            return response.status_code, response.headers.get("Content-Type", ""), response.content

    return in_thread(get)


class FilesThroughDaemon(TestCase):
    """Files both ways through a real daemon and the fake CLI: what Claude wrote, listed with links that download
    it; a file attached in Open WebUI (its file table faked as the pipe finds it there), put in the session's
    folder before the turn."""

    timeout = 60

    @inlineCallbacks
    def test_files_in_and_out(self) -> Any:
        """A first turn whose Write (pre-approved) the fake reports: the answer lists file.txt with a link to the
        daemon's download route, which answers 404 with a JSON error until the file exists (the fake writes
        nothing) and then its bytes. A second message with an attached text file: the file lands in the
        session's uploads/ folder on disk, and the prompt the CLI gets names it."""
        owui = FakeOpenWebUI(self)
        daemon = yield Daemon(self).start()
        opening = user('allowedTools=["Write"]\n[[fake tool=Write]] write the file')
        first = yield run_pipe(make_pipe(base_url=daemon.url), chat(opening))
        session = first.session_id()
        self.assertIsNotNone(session, first.text)
        link = f"{daemon.url}/api/sessions/{session}/files/file.txt"
        self.assertIn(f"\n\n**Files changed:**\n- [`file.txt`]({link})\n\nsession_id={session}", first.text)
        [call] = daemon.invocations()
        workspace = call["cwd"]
        self.assertEqual(os.path.dirname(os.path.realpath(workspace)),
                         os.path.realpath(os.path.join(daemon.data_dir, "Workspace")))

        status, content_type, body = yield download(link)
        self.assertEqual((status, content_type), (404, "application/json"))
        self.assertEqual(json.loads(body)["error"]["code"], "file_not_found")
        with open(os.path.join(workspace, "file.txt"), "wb") as f:
            f.write(b"written by the fake\n")
        status, _, body = yield download(link)
        self.assertEqual((status, body), (200, b"written by the fake\n"))

        attached = owui.add("my notes.txt", b"remember the milk\n")
        second = yield run_pipe(make_pipe(base_url=daemon.url),
                                chat(opening, assistant(first.stored), user("read my notes")),
                                __user__=USER, __metadata__=with_files(attached, text="read my notes"))
        self.assertEqual(second.session_id(), session)
        with open(os.path.join(workspace, "uploads", "my_notes.txt"), "rb") as f:
            self.assertEqual(f.read(), b"remember the milk\n")
        prompt = "read my notes\n\nAttached files are in uploads/: my_notes.txt"
        self.assertEqual(daemon.turns()[-1]["prompt"], prompt)
        self.assertIn(reply_to(prompt), second.text)
        self.assertNotIn("Files changed", second.text)
        self.assertEqual(second.statuses()[0], ("Putting 1 attached file in the session's folder…", False))
