"""
Authentication problems are named: /readyz asks the CLI whether it has credentials (``claude auth status``) and
says what to set when it has none; a turn the CLI answers "Not logged in · Please run /login" (or an API 401) ends
with ``terminal_reason: "cli_not_authenticated"`` and a message saying what to set; a CLI that exits non-zero on
``--version`` makes /readyz say so, with its code and stderr.

/readyz's probes and the turns run in process first (the harness's Clock, with the CLI's answers played), then the
probes start real processes (the fake CLI, a broken one), and last a real twistd runs the fake without credentials
(FAKE_LOGGED_OUT=1).
"""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from claudesrv.app import ClaudeExecutable
from claudesrv.sessions import CREDENTIALS_CHECK_EVERY, PROBE_TIMEOUT, VERSION_CHECK_EVERY, Readiness
from tests import harness
from tests.fake_claude_impl import AUTH_RECORDING, NOT_LOGGED_IN, without_credentials
from tests.support import FAKE, Daemon, fake_env, get_json, post, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = (b"2.1.330 (Claude Code)\n", b"", 0)
LOGGED_IN = (b'{\n  "loggedIn": true,\n  "authMethod": "api_key",\n  "apiProvider": "firstParty",\n'
             b'  "configDirectory": "/home/claudesrv/.claude",\n  "apiKeySource": "ANTHROPIC_API_KEY"\n}\n', b"", 0)
LOGGED_OUT = (b'{\n  "loggedIn": false,\n  "authMethod": "none",\n  "apiProvider": "firstParty",\n'
              b'  "configDirectory": "/home/claudesrv/.claude"\n}\n', b"", 1)


def print_mode_lines(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(HERE, "fixtures", "claude-cli", name + ".jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class _ProbeTransport:
    """Where the process transport of a /readyz probe stands."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.signals: list[str] = []
        self.done = False

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)
        self.finish(b"", b"", None, 9)

    def finish(self, out: bytes, err: bytes, code: int | None, signal: int | None = None) -> None:
        """Its output, then its end: exit C{code}, or killed by C{signal}."""
        if self.done:
            return
        self.done = True
        if out:
            self.protocol.outReceived(out)
        if err:
            self.protocol.errReceived(err)
        self.protocol.processEnded(Failure(ProcessDone(0)) if code == 0 else
                                   Failure(ProcessTerminated(exitCode=code, signal=signal)))


class ScriptedProbes:
    """The harness Clock's spawnProcess for /readyz: each command (``--version``, ``auth status``) answers what
    C{answers} holds for it, (stdout, stderr, exit code[, signal]), on the next tick; None: never (until killed)."""

    def __init__(self, d: harness.Daemon, **answers: tuple[Any, ...] | None) -> None:
        self.clock = d.clock
        self.answers: dict[str, tuple[Any, ...] | None] = {"--version": VERSION, "auth status": LOGGED_IN}
        self.answers.update({k.replace("_", " "): v for k, v in answers.items()})
        self.started: list[tuple[str, dict[str, str], str]] = []
        self.transports: list[_ProbeTransport] = []
        d.clock.spawnProcess = self.spawnProcess  # type: ignore[attr-defined]

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str], path: str,
                     childFDs: dict[int, str]) -> _ProbeTransport:
        command = " ".join(args[1:])
        self.started.append((command, env, path))
        transport = _ProbeTransport(protocol)
        self.transports.append(transport)
        protocol.makeConnection(transport)
        answer = self.answers[command]
        if answer is not None:
            self.clock.callLater(0, transport.finish, *answer)
        return transport

    def commands(self) -> list[str]:
        return [command for command, _, _ in self.started]


class ReadyzInProcess(harness.DaemonTestCase):
    def test_logged_in_is_ready(self) -> None:
        """/readyz runs `auth status` beside `--version`, in the daemon's environment and the workspace root, and
        reports the credentials check ok with how the CLI authenticates (never more of its answer)."""
        d = self.daemon()
        probes = ScriptedProbes(d)
        code, ready = d.call("GET", "/readyz")
        self.assertEqual((code, ready["status"]), (200, "ready"))
        self.assertEqual(ready["checks"]["credentials"], {
            "ok": True, "auth_method": "api_key", "api_key_source": "ANTHROPIC_API_KEY",
            "api_provider": "firstParty", "config_directory": "/home/claudesrv/.claude"})
        self.assertEqual(ready["checks"]["cli"], {"ok": True, "version": "2.1.330 (Claude Code)"})
        self.assertEqual(sorted(probes.commands()), ["--version", "auth status"])
        self.assertEqual({(repr(env), path) for _, env, path in probes.started},
                         {(repr(d.registry.environ), d.workspaces.root)})

    def test_no_credentials_is_not_ready(self) -> None:
        """A CLI that says it is not logged in (exit 1) makes /readyz 503 not_ready; the check names
        ANTHROPIC_API_KEY and `claude /login`."""
        d = self.daemon()
        ScriptedProbes(d, auth_status=LOGGED_OUT)
        code, ready = d.call("GET", "/readyz")
        self.assertEqual((code, ready["status"]), (503, "not_ready"))
        credentials = ready["checks"]["credentials"]
        self.assertEqual((credentials["ok"], credentials["auth_method"]), (False, "none"))
        self.assertIn("ANTHROPIC_API_KEY", credentials["error"])
        self.assertIn("claude /login", credentials["error"])
        self.assertTrue(all(c["ok"] for name, c in ready["checks"].items() if name != "credentials"))

    def test_answers_are_kept_for_a_while(self) -> None:
        """Two /readyz at once share one probe of each; `auth status` is asked again after 30 s, --version after a
        minute, so /readyz stays cheap and a fixed login shows within 30 s."""
        d = self.daemon()
        probes = ScriptedProbes(d, auth_status=LOGGED_OUT)
        d.call("GET", "/readyz")
        d.call("GET", "/readyz")
        self.assertEqual(sorted(probes.commands()), ["--version", "auth status"])
        probes.answers["auth status"] = LOGGED_IN
        d.clock.advance(CREDENTIALS_CHECK_EVERY - 1)
        self.assertEqual(d.call("GET", "/readyz")[0], 503)
        d.clock.advance(1)
        self.assertEqual(d.call("GET", "/readyz")[0], 200)
        self.assertEqual(sorted(probes.commands()), ["--version", "auth status", "auth status"])
        d.clock.advance(VERSION_CHECK_EVERY - CREDENTIALS_CHECK_EVERY)
        d.call("GET", "/readyz")
        self.assertEqual(probes.commands().count("--version"), 2)

    def test_cli_that_fails_is_named(self) -> None:
        """--version that exits non-zero: the cli check says the exit code and the end of its stderr; one that
        is killed says the signal; `auth status` that answers no JSON says so; one that hangs is killed after
        10 s and the check says it did not answer."""
        d = self.daemon()
        probes = ScriptedProbes(d, **{"--version": (b"", b"npm warn\nclaude: broken install\n", 3),
                                      "auth_status": (b"Usage: claude [options]\n", b"", 0)})
        code, ready = d.call("GET", "/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(ready["checks"]["cli"], {
            "ok": False, "version": "",
            "error": "the Claude CLI exited with code 3 on `--version`: npm warn\nclaude: broken install"})
        self.assertEqual(ready["checks"]["credentials"]["ok"], False)
        self.assertIn("`auth status` printed no JSON with loggedIn", ready["checks"]["credentials"]["error"])

        d.clock.advance(VERSION_CHECK_EVERY)
        probes.answers.update({"--version": (b"", b"", None, 9), "auth status": None})  # killed; hangs
        d.http.get("http://localhost/readyz")
        d.pump()
        self.assertEqual(probes.transports[-1].signals, [])
        d.clock.advance(PROBE_TIMEOUT)
        self.assertEqual(probes.transports[-1].signals, ["KILL"])
        code, ready = d.call("GET", "/readyz")
        self.assertEqual(ready["checks"]["cli"]["error"], "the Claude CLI was killed by signal 9 on `--version`")
        self.assertEqual(ready["checks"]["credentials"]["error"],
                         f"the Claude CLI did not answer `auth status` within {PROBE_TIMEOUT:g} s")


class NotAuthenticatedTurns(harness.DaemonTestCase):
    def turn_with(self, lines: list[dict[str, Any]]) -> tuple[harness.Stream, list[Any]]:
        """A turn whose CLI says C{lines} (the assistant and result lines of a recording) after system/init;
        its stream and what was logged meanwhile."""
        d = self.daemon()
        d.world.hold_turns = True
        with capturedLogs() as logged:
            stream = d.post({"prompt": "hi"})
            [cli] = d.world.clis
            for line in lines:
                line["session_id"] = cli.session_id
                cli.say(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
            cli.in_turn = False
            d.pump()
        self.assertTrue(stream.done)
        return stream, list(logged)

    def test_not_logged_in(self) -> None:
        """The CLI's answer without credentials (as the fake plays it) ends with terminal_reason
        cli_not_authenticated, the CLI's own reason in cli_terminal_reason and its text kept, and a message in
        errors that says what to set; the log has a warning naming it."""
        lines = [without_credentials(line) for line in print_mode_lines(AUTH_RECORDING)[1:]]
        stream, logged = self.turn_with(lines)
        result = stream.events()[-1]
        self.assertEqual((result["terminal_reason"], result["cli_terminal_reason"], result["result"],
                          result["is_error"]), ("cli_not_authenticated", "api_error", NOT_LOGGED_IN, True))
        [message] = result["errors"]
        self.assertIn("set ANTHROPIC_API_KEY in the daemon's environment", message)
        self.assertIn("claude /login", message)
        [warning] = [e for e in logged if e.get("reason") == "cli_not_authenticated"]
        self.assertEqual((warning["log_level"].name, warning["problem"]), ("warn", message))

    def test_api_refused_the_key(self) -> None:
        """An API 401 (recording g3_FAIL401_retries0: "Invalid API key · Fix external API key") is named the same
        way, with a message about the key."""
        stream, _ = self.turn_with(print_mode_lines("g3_FAIL401_retries0")[1:])
        result = stream.events()[-1]
        self.assertEqual((result["terminal_reason"], result["result"], result["api_error_status"]),
                         ("cli_not_authenticated", "Invalid API key · Fix external API key", 401))
        self.assertIn("HTTP 401", result["errors"][0])

    def test_other_api_errors_untouched(self) -> None:
        """Any other API error (a 500: g2_fail500_maxretries0) is relayed as the CLI wrote it, and logged as
        nothing more than the turn's line."""
        lines = print_mode_lines("g2_fail500_maxretries0")[1:]
        stream, logged = self.turn_with(lines)
        result = stream.events()[-1]
        self.assertEqual((result["terminal_reason"], "cli_terminal_reason" in result), ("api_error", False))
        self.assertEqual([e for e in logged if e.get("reason") == "cli_not_authenticated"], [])


class RealProcesses(TestCase):
    """/readyz's probes starting real processes with the reactor: the fake CLI, and a broken one. (A whole twistd
    costs over a second to start, so only WithTheFake starts one; HealthAndMetrics in test_operations has a
    logged-in fake's /readyz through twistd.)"""

    timeout = 20

    def readiness(self, claude: str, **env: str) -> Readiness:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        environ = {**fake_env(root), "FAKE_LOGGED_OUT": "0", **env}
        registry: Any = SimpleNamespace(clock=reactor, environ=environ)
        workspaces: Any = SimpleNamespace(root=root)
        store: Any = None
        return Readiness(store, workspaces, registry, ClaudeExecutable(claude, environ))

    @inlineCallbacks
    def test_fake_logged_in_and_out(self) -> Any:
        """The fake's `auth status`: with ANTHROPIC_API_KEY, api_key from that variable (and never the key);
        with FAKE_LOGGED_OUT=1, not ok with what to set."""
        readiness = self.readiness(FAKE, ANTHROPIC_API_KEY="sk-ant-test")
        cli, credentials = yield gatherResults([readiness._cli(), readiness._credentials()])
        self.assertEqual(cli, {"ok": True, "version": "2.1.330 (Claude Code)"})
        self.assertEqual((credentials["ok"], credentials["auth_method"], credentials["api_key_source"]),
                         (True, "api_key", "ANTHROPIC_API_KEY"))
        self.assertNotIn("sk-ant-test", json.dumps(credentials))
        credentials = yield self.readiness(FAKE, FAKE_LOGGED_OUT="1")._credentials()
        self.assertEqual((credentials["ok"], credentials["auth_method"]), (False, "none"))
        self.assertIn("ANTHROPIC_API_KEY", credentials["error"])

    @inlineCallbacks
    def test_version_exits_non_zero(self) -> Any:
        """A CLI that exits 3 on --version: the cli check says exit code 3 and its stderr."""
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho 'claude: cannot find module cli.js' >&2\nexit 3\n")
        os.chmod(script, stat.S_IRWXU)
        readiness = self.readiness(script)
        cli, credentials = yield gatherResults([readiness._cli(), readiness._credentials()])
        self.assertEqual(cli, {"ok": False, "version": "",
                               "error": "the Claude CLI exited with code 3 on `--version`: "
                                        "claude: cannot find module cli.js"})
        self.assertIn("exited with code 3 on `auth status`", credentials["error"])


class WithTheFake(TestCase):
    """A real twistd with the fake CLI without credentials."""

    timeout = 30

    @inlineCallbacks
    def test_logged_out(self) -> Any:
        """A CLI without credentials: /readyz is 503 naming ANTHROPIC_API_KEY (the daemon asked `auth status`); a
        turn answers 200 with the CLI's "Not logged in" result, renamed cli_not_authenticated with what to set; the
        log says so."""
        daemon = yield Daemon(self, env={"FAKE_LOGGED_OUT": "1"}).start()
        code, ready = yield get_json(daemon.url + "/readyz")
        self.assertEqual((code, ready["status"]), (503, "not_ready"))
        credentials = ready["checks"]["credentials"]
        self.assertEqual((credentials["ok"], credentials["auth_method"]), (False, "none"))
        self.assertIn("ANTHROPIC_API_KEY", credentials["error"])
        self.assertTrue(ready["checks"]["cli"]["ok"])
        self.assertIn(["auth", "status"], [call["argv"][1:] for call in daemon.invocations()])
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        self.assertEqual(reply.status, 200)
        [result] = reply.sse.results()
        self.assertEqual((result["terminal_reason"], result["cli_terminal_reason"], result["result"]),
                         ("cli_not_authenticated", "api_error", NOT_LOGGED_IN))
        self.assertIn("ANTHROPIC_API_KEY", result["errors"][0])
        yield wait_for(lambda: "cli_not_authenticated: the Claude CLI has no credentials" in daemon.log)
