"""
The ``claudesrv`` command and what the daemon logs: one-line errors, --version, JSON Lines, the startup lines,
one access line per request without its query string, and unix sockets made 0600.

Option errors and --version run ``claudesrv.main.main`` in process (nothing starts); the rest runs the
installed console script (and twistd) in subprocesses, all at once, so the file costs about a daemon start.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudesrv.logs import event_as_json
from claudesrv.main import main
from claudesrv.tap import claudesrv_version, installed_version, listener_description
from tests.support import FAKE, fake_env, get_json, post, wait_for

CLAUDESRV = os.path.join(os.path.dirname(sys.executable), "claudesrv")
TOKEN = "command-test-token-9c2e"
SECRET = "query-secret-5b7a"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")


class OneLineErrors(SynchronousTestCase):
    def fails(self, *argv: str) -> str:
        """Run the command in process; it must exit 2 having written exactly one line to stderr."""
        err = io.StringIO()
        self.patch(sys, "__stderr__", err)
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as exited:
            main(["--data-dir", self.mktemp(), *argv])
        self.assertEqual(exited.exception.code, 2)
        text = err.getvalue()
        self.assertEqual(text.count("\n"), 1, text)
        self.assertEqual(sys.stdout.getvalue(), "")  # type: ignore[attr-defined]
        self.assertTrue(text.startswith("claudesrv: "), text)
        return text.strip()

    def test_option_errors_name_the_option(self) -> None:
        """A bad value is one line naming the option and what is wrong (no help first), exit status 2."""
        self.assertEqual(self.fails("--max-runs", "0"), "claudesrv: --max-runs: must be 1 or more")
        self.assertEqual(self.fails("--max-runs", "many"), "claudesrv: --max-runs: 'many' is not a whole number")
        self.assertEqual(self.fails("--max-queue", "-1"), "claudesrv: --max-queue: must be 0 or more")
        self.assertEqual(self.fails("--warm-idle", "soon"), "claudesrv: --warm-idle: 'soon' is not a number")
        self.assertEqual(self.fails("--on-disconnect", "maybe"),
                         "claudesrv: --on-disconnect: must be cancel or continue, not 'maybe'")
        self.assertEqual(self.fails("--log-format", "xml"), "claudesrv: --log-format: must be text or json, not 'xml'")
        self.assertIn("--spares: must be less than --max-live", self.fails("--spares", "8"))
        self.assertIn("--help", self.fails("--frobnicate"))

    def test_twistd_option_errors_are_one_line_too(self) -> None:
        """Under twistd (`twistd -n claudesrv --max-runs 0`) a bad option is one line naming it, not twistd's
        whole help and then the error; Python prints it to stderr and exits 1."""
        self.patch(sys, "argv", ["twistd"])
        with self.assertRaises(SystemExit) as exited:
            ServerOptions().parseOptions(["-n", "--pidfile=", "claudesrv", "--max-runs", "0"])
        self.assertEqual(exited.exception.code, "twistd claudesrv: --max-runs: must be 1 or more")

    def test_token_file_and_listener_mistakes_have_their_own_messages(self) -> None:
        """An empty token file, a missing one, and a listener type Twisted does not know each say so."""
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("# tokens, one a line\n\n")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CLAUDESRV_AUTH_TOKENS"})
        self.assertIn(f"--auth-token-file {empty} holds no token", self.fails("--auth-token-file", empty))
        self.assertIn("cannot read it: No such file", self.fails("--auth-token-file", empty + ".missing"))
        unknown = self.fails("--listen", "htpp:3000")
        self.assertIn("--listen htpp:3000: unknown listener type 'htpp'", unknown)
        for kind in ("tcp", "ssl", "unix", "systemd"):
            self.assertIn(kind, unknown.split("known types:")[1])
        self.assertIn("--listen tcp:http:interface=127.0.0.1: ", self.fails("--listen", "tcp:http:interface=127.0.0.1"))


class Version(SynchronousTestCase):
    def version(self, *argv: str) -> list[str]:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as exited:
            main([*argv, "--version"])
        self.assertEqual(exited.exception.code, 0)
        return out.getvalue().splitlines()

    def test_version_names_claudesrv_and_the_cli(self) -> None:
        """--version prints claudesrv's version, then the CLI's path and its own --version answer, or that it
        was not found."""
        self.assertEqual(self.version("--claude", FAKE), [f"claudesrv {claudesrv_version()}",
                                                          f"{FAKE}: 2.1.330 (Claude Code)"])
        self.assertNotEqual(claudesrv_version(), "unknown")
        missing = self.version("--claude", "/nonexistent/claude")
        self.assertTrue(missing[1].startswith("/nonexistent/claude: not found"), missing)

    def test_installed_version_without_running_the_cli(self) -> None:
        """The version the daemon logs at start comes from the installation (npm's package.json, the native
        installer's versions/<version> file), not from running the CLI; None when neither says."""
        root = os.path.abspath(self.mktemp())
        package = os.path.join(root, "lib", "node_modules", "@anthropic-ai", "claude-code")
        os.makedirs(package)
        with open(os.path.join(package, "package.json"), "w") as f:
            json.dump({"name": "@anthropic-ai/claude-code", "version": "2.1.330"}, f)
        with open(os.path.join(package, "cli.js"), "w") as f:
            f.write("#!/usr/bin/env node\n")
        os.makedirs(os.path.join(root, "bin"))
        os.symlink(os.path.join(package, "cli.js"), os.path.join(root, "bin", "claude"))
        self.assertEqual(installed_version(os.path.join(root, "bin", "claude")), "2.1.330")
        native = os.path.join(root, "share", "claude", "versions")
        os.makedirs(native)
        with open(os.path.join(native, "2.1.331"), "w") as f:
            f.write("")
        os.symlink(os.path.join(native, "2.1.331"), os.path.join(root, "bin", "claude-native"))
        self.assertEqual(installed_version(os.path.join(root, "bin", "claude-native")), "2.1.331")
        self.assertIsNone(installed_version(FAKE))


class Listeners(SynchronousTestCase):
    def test_unix_sockets_are_private_unless_mode_says(self) -> None:
        """A unix listener gets mode=600 unless its description has a mode; TCP and TLS get a backlog."""
        self.assertEqual(listener_description("unix:/run/c.sock", 36), "unix:/run/c.sock:mode=600")
        self.assertEqual(listener_description("unix:/run/c.sock:mode=660", 36), "unix:/run/c.sock:mode=660")
        self.assertEqual(listener_description("tcp:3000:interface=127.0.0.1", 36),
                         "tcp:3000:interface=127.0.0.1:backlog=50")
        self.assertEqual(listener_description("systemd:domain=INET:index=0", 36), "systemd:domain=INET:index=0")


class JsonLines(SynchronousTestCase):
    def test_each_event_is_one_plain_object(self) -> None:
        """An event is one line that json.loads reads: time (ISO 8601 UTC), level, event, message, and the
        event's fields JSON can hold (others are left out); a failure adds error and traceback; Twisted's legacy
        events keep their text without their bookkeeping."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log = Logger(namespace="claudesrv.test")
        log.info("turn {turn}\nended", turn=7, usage={"m": 1.5}, odd=object(), nan=float("nan"))
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("it failed")
        self.flushLoggedErrors(ZeroDivisionError)
        from twisted.python import log as legacy

        legacy.msg("Site starting on 3000")
        lines = [event_as_json(e) for e in events]
        for line in lines:
            self.assertEqual(line.count("\n"), 1)
            self.assertTrue(line.endswith("}\n"))
        first, failed, old = (json.loads(line) for line in lines)
        self.assertRegex(first["time"], ISO_UTC)
        self.assertEqual({k: first[k] for k in ("level", "event", "message", "turn", "usage")},
                         {"level": "info", "event": "claudesrv.test", "message": "turn 7\nended", "turn": 7,
                          "usage": {"m": 1.5}})
        self.assertNotIn("odd", first)
        self.assertNotIn("nan", first)
        self.assertFalse([k for k in first if k.startswith("log_")])
        self.assertEqual((failed["level"], failed["error"]), ("critical", "ZeroDivisionError: division by zero"))
        self.assertIn("Traceback", failed["traceback"])
        self.assertEqual((old["event"], old["message"], old["level"]), ("twisted", "Site starting on 3000", "info"))
        self.assertEqual(set(old), {"time", "level", "event", "message"})
        self.assertEqual(LogLevel.info.name, "info")


class _Run(ProcessProtocol):
    """A process whose stdout and stderr are kept apart."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def exit_code(self) -> int | None:
        assert self.reason is not None
        return getattr(self.reason.value, "exitCode", None)

    def stopped_cleanly(self) -> bool:
        """Exit 0, or twistd's way of ending a SIGTERM shutdown: the signal raised again on itself."""
        assert self.reason is not None
        return bool(self.reason.check(ProcessDone)) or (
            self.reason.check(ProcessTerminated) is not None and self.reason.value.signal == signal.SIGTERM)


class Command(TestCase):
    timeout = 30

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[_Run, Any]:
        run = _Run()
        transport = reactor.spawnProcess(run, argv[0], argv, env={**fake_env(self.scratch), **(env or {})},
                                         path=self.scratch)

        def stop() -> Deferred[None]:
            if run.reason is None:
                transport.signalProcess("KILL")
            return run.ended

        self.addCleanup(stop)
        return run, transport

    def setUp(self) -> None:
        # a short path: a unix socket's path must fit in 108 bytes
        self.scratch = tempfile.mkdtemp(prefix="cs-")
        self.addCleanup(shutil.rmtree, self.scratch, True)

    @inlineCallbacks
    def test_console_script(self) -> Any:
        """Two runs at once: `claudesrv` with text logs serves and stops on SIGTERM, and a second one on its
        port says so in one line; `claudesrv --log-format json` writes JSON Lines (each check's docstring says
        what it proves)."""
        self.assertTrue(os.access(CLAUDESRV, os.X_OK), f"{CLAUDESRV}: pip install -e . makes it")
        yield gatherResults([self.text_run_and_port_in_use(), self.json_run()])

    @inlineCallbacks
    def text_run_and_port_in_use(self) -> Any:
        """`claudesrv` runs in the foreground without a pidfile, logs text lines to stdout, serves /healthz, says
        where it listens; a second one on the same port ends at once with one line on stderr and a non-zero
        status, not a traceback; SIGTERM stops the first cleanly."""
        data = os.path.join(self.scratch, "text")
        first, transport = self.spawn([CLAUDESRV, "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", data,
                                       "--claude", FAKE, "--spares", "0"])
        yield wait_for(lambda: "listening on http://127.0.0.1:" in first.text or first.reason is not None, 15)
        port = int(re.findall(r"listening on http://127\.0\.0\.1:(\d+) ", first.text)[0])
        code, body = yield get_json(f"http://127.0.0.1:{port}/healthz")
        self.assertEqual((code, body), (200, {"status": "ok"}))
        listen = f"tcp:{port}:interface=127.0.0.1"
        second, _ = self.spawn([CLAUDESRV, "--listen", listen, "--data-dir", data])
        yield second.ended
        self.assertEqual(second.err.decode(), f"claudesrv: cannot listen on {listen}: address already in use\n")
        self.assertEqual(second.exit_code(), 1)
        self.assertNotIn("Traceback", second.text)
        transport.signalProcess("TERM")
        yield first.ended
        self.assertTrue(first.stopped_cleanly(), first.text)
        self.assertFalse(os.path.exists(os.path.join(self.scratch, "twistd.pid")))
        self.assertRegex(first.text, r"\[claudesrv\.access#info\] GET /healthz 200 \d+B ")

    @inlineCallbacks
    def json_run(self) -> Any:
        """With --log-format json every stdout line is one JSON object with time, level, event and message; the
        start says each listening address (the real port of tcp:0, the unix socket), the CLI's path, and that
        tokens are on and how many (never the tokens); a unix socket is made 0600; each request gets one
        access line with its status, duration, session id, warm/cold start and the CLI's exit code; a query
        string (?token=...) is never logged."""
        sock = os.path.join(self.scratch, "c.sock")
        run, transport = self.spawn(
            [CLAUDESRV, "--log-format", "json", "--listen", "tcp:0:interface=127.0.0.1", "--listen", f"unix:{sock}",
             "--data-dir", os.path.join(self.scratch, "json"), "--claude", FAKE, "--spares", "0"],
            env={"CLAUDESRV_AUTH_TOKENS": TOKEN})
        yield wait_for(lambda: run.text.count('"listening on ') == 2 or run.reason is not None, 15)
        self.assertEqual(stat.S_IMODE(os.stat(sock).st_mode), 0o600)
        port = int(re.findall(r'"listening on http://127\.0\.0\.1:(\d+) ', run.text)[0])
        auth = {"Authorization": f"Bearer {TOKEN}"}
        reply = yield post(f"http://127.0.0.1:{port}/api/claude?token={SECRET}", {"prompt": "hi"}, headers=auth)
        self.assertEqual(reply.status, 200)
        yield get_json(f"http://127.0.0.1:{port}/healthz?token={SECRET}")
        yield wait_for(lambda: run.text.count('"event": "claudesrv.access"') == 2)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(sock)  # the daemon's own user may connect
        transport.signalProcess("TERM")
        yield run.ended
        self.assertTrue(run.stopped_cleanly(), run.text)
        lines = [json.loads(line) for line in run.text.splitlines()]
        for line in lines:
            self.assertLessEqual({"time", "level", "event", "message"}, set(line), line)
            self.assertRegex(line["time"], ISO_UTC)
        self.assertNotIn(SECRET, run.text + run.err.decode())
        self.assertNotIn(TOKEN, run.text + run.err.decode())
        said = [line["message"] for line in lines]
        self.assertIn(f"listening on http://127.0.0.1:{port} (tcp:0:interface=127.0.0.1)", said)
        self.assertIn(f"listening on unix:{sock} (unix:{sock})", said)
        [cli] = [line for line in lines if "cli_path" in line]
        self.assertEqual((cli["cli_path"], cli["cli_version"]), (FAKE, None))
        [auth_line] = [line for line in lines if "auth_tokens" in line]
        self.assertEqual((auth_line["auth"], auth_line["auth_tokens"]), (True, 1))
        turn, health = [line for line in lines if line["event"] == "claudesrv.access"]
        self.assertEqual({k: turn[k] for k in ("method", "path", "status", "session_id", "start", "exit_code")},
                         {"method": "POST", "path": "/api/claude", "status": 200, "session_id": reply.session_id,
                          "start": "cold", "exit_code": None})
        self.assertGreater(turn["duration"], 0)
        self.assertEqual((health["path"], health["status"]), ("/healthz", 200))
        self.assertNotIn("session_id", health)
