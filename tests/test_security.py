"""
Security and bad input, against a real twistd (the workspace containment check, which only needs the route
and the database, in the in-process harness): every bad request gets its status and a JSON error and leaves
nothing behind; the daemon is closed by default and opens only on purpose.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import signal
import sqlite3
from typing import Any

import treq
from twisted.internet import reactor, ssl, utils
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseNeverReceived

from claudesrv.tap import Options
from tests import harness
from tests.rawhttp import RawClient
from tests.support import TWISTD, Daemon, SSEParser, post, wait_for
from tests.test_units import BAD_OPTIONS

UUID = "6a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11"
TOKEN = "s3cret-token-value"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


def j(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# (name, method, path, headers, body) -> (status, error code)
BAD_REQUESTS: list[tuple[str, bytes, str, dict[str, str], bytes, int, str]] = [
    ("no token", b"POST", "/api/claude", JSON, j(prompt="x"), 401, "unauthorized"),
    ("wrong token", b"POST", "/api/claude", {**JSON, "Authorization": "Bearer nope"}, j(prompt="x"),
     401, "unauthorized"),
    ("basic auth", b"POST", "/api/claude", {**JSON, "Authorization": f"Basic {TOKEN}"}, j(prompt="x"),
     401, "unauthorized"),
    ("foreign host", b"POST", "/api/claude", {**AUTH, **JSON, "Host": "evil.com"}, j(prompt="x"),
     403, "host_not_allowed"),
    ("rebinding host", b"POST", "/api/claude", {**AUTH, **JSON, "Host": "127.0.0.1.evil.com:3000"},
     j(prompt="x"), 403, "host_not_allowed"),
    ("no content type", b"POST", "/api/claude", AUTH, j(prompt="x"), 415, "unsupported_media_type"),
    ("text/plain", b"POST", "/api/claude", {**AUTH, "Content-Type": "text/plain"}, j(prompt="x"),
     415, "unsupported_media_type"),
    ("form post", b"POST", "/api/claude", {**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
     b"prompt=x", 415, "unsupported_media_type"),
    ("GET claude", b"GET", "/api/claude", AUTH, b"", 405, "method_not_allowed"),
    ("PUT claude", b"PUT", "/api/claude", {**AUTH, **JSON}, j(prompt="x"), 405, "method_not_allowed"),
    ("DELETE claude", b"DELETE", "/api/claude", AUTH, b"", 405, "method_not_allowed"),
    ("no route", b"POST", "/api/nope", {**AUTH, **JSON}, j(prompt="x"), 404, "not_found"),
    ("broken json", b"POST", "/api/claude", {**AUTH, **JSON}, b"{nope", 400, "invalid_json"),
    ("deep nesting", b"POST", "/api/claude", {**AUTH, **JSON}, b"[" * 3000, 400, "invalid_json"),
    ("not utf-8", b"POST", "/api/claude", {**AUTH, **JSON}, b'{"prompt":"\xff"}', 400, "invalid_json"),
    ("array body", b"POST", "/api/claude", {**AUTH, **JSON}, b"[]", 400, "invalid_json"),
    ("string body", b"POST", "/api/claude", {**AUTH, **JSON}, b'"hi"', 400, "invalid_json"),
    ("null body", b"POST", "/api/claude", {**AUTH, **JSON}, b"null", 400, "invalid_json"),
    ("empty body", b"POST", "/api/claude", {**AUTH, **JSON}, b"", 400, "invalid_json"),
    ("no prompt", b"POST", "/api/claude", {**AUTH, **JSON}, j(), 400, "missing_field"),
    ("prompt number", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt=3), 400, "invalid_field"),
    ("prompt list", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt=["x"]), 400, "invalid_field"),
    ("prompt empty", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt=""), 400, "invalid_field"),
    ("prompt blank", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt=" \r\n\t"), 400, "invalid_field"),
    ("prompt NUL", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="a\0b"), 400, "invalid_field"),
    ("prompt too big", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x" * 2001), 400, "prompt_too_large"),
    ("lone surrogate", b"POST", "/api/claude", {**AUTH, **JSON}, b'{"prompt":"\\ud800"}', 400, "invalid_field"),
    ("unknown field", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", temperature=0.5), 400, "unknown_field"),
    ("session number", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", session_id=5), 400, "invalid_field"),
    ("session not uuid", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", session_id="abc"),
     400, "invalid_field"),
    ("session upper", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", session_id=UUID.upper()),
     400, "invalid_field"),
    ("session braces", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", session_id="{" + UUID + "}"),
     400, "invalid_field"),
    ("session option", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", session_id="--help"),
     400, "invalid_field"),
    ("skip as string", b"POST", "/api/claude", {**AUTH, **JSON},
     j(prompt="x", **{"dangerously-skip-permissions": "true"}), 400, "invalid_field"),
    ("skip as number", b"POST", "/api/claude", {**AUTH, **JSON},
     j(prompt="x", **{"dangerously-skip-permissions": 1}), 400, "invalid_field"),
    ("skip denied", b"POST", "/api/claude", {**AUTH, **JSON},
     j(prompt="x", **{"dangerously-skip-permissions": True}), 403, "skip_permissions_denied"),
    ("tools string", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", allowedTools="Bash"),
     400, "invalid_field"),
    ("tools numbers", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", allowedTools=[1]), 400, "invalid_field"),
    ("tools empty item", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", allowedTools=[""]),
     400, "invalid_field"),
    ("tools option", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", allowedTools=["--model"]),
     400, "invalid_field"),
    ("tools newline", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", allowedTools=["Bash\nEdit"]),
     400, "invalid_field"),
    ("disallowed object", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", disallowedTools={}),
     400, "invalid_field"),
    ("disallowed dash", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", disallowedTools=["-p"]),
     400, "invalid_field"),
    ("disallowed NUL", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", disallowedTools=["a\0"]),
     400, "invalid_field"),
    ("body too large", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x" * 5000), 413, "body_too_large"),
    ("unknown session", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", session_id=UUID),
     404, "session_not_found"),
    ("cancel unknown", b"POST", f"/api/sessions/{UUID}/cancel", {**AUTH, **JSON}, b"{}", 404, "session_not_found"),
    ("cancel garbage", b"POST", "/api/sessions/..%2f..%2fetc/cancel", {**AUTH, **JSON}, b"{}", 404, "not_found"),
    ("cancel not uuid", b"POST", "/api/sessions/abc/cancel", {**AUTH, **JSON}, b"{}", 404, "session_not_found"),
    ("limit zero", b"GET", "/api/sessions?limit=0", AUTH, b"", 400, "invalid_query"),
    ("limit huge", b"GET", "/api/sessions?limit=501", AUTH, b"", 400, "invalid_query"),
    ("bad cursor", b"GET", "/api/sessions?cursor=zzz", AUTH, b"", 400, "invalid_query"),
    ("huge cursor", b"GET", "/api/sessions?cursor=" + base64.urlsafe_b64encode(b"o" + b"9" * 20).decode(), AUTH,
     b"", 400, "invalid_query"),
    ("get unknown", b"GET", f"/api/sessions/{UUID}", AUTH, b"", 404, "session_not_found"),
    ("delete unknown", b"DELETE", f"/api/sessions/{UUID}", AUTH, b"", 404, "session_not_found"),
    ("detach as string", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", detach="yes"), 400, "invalid_field"),
    ("events unknown", b"GET", f"/api/sessions/{UUID}/events", AUTH, b"", 404, "session_not_found"),
    ("events not uuid", b"GET", "/api/sessions/abc/events", AUTH, b"", 404, "session_not_found"),
    ("events bad after", b"GET", f"/api/sessions/{UUID}/events?after=-1", AUTH, b"", 400, "invalid_query"),
    ("events huge after", b"GET", f"/api/sessions/{UUID}/events?after=" + "9" * 30, AUTH, b"", 400, "invalid_query"),
    ("events bad Last-Event-ID", b"GET", f"/api/sessions/{UUID}/events", {**AUTH, "Last-Event-ID": "1e3"}, b"",
     400, "invalid_query"),
    ("events bad follow", b"GET", f"/api/sessions/{UUID}/events?follow=all", AUTH, b"", 400, "invalid_query"),
    ("events POST", b"POST", f"/api/sessions/{UUID}/events", {**AUTH, **JSON}, b"{}", 405, "method_not_allowed"),
    ("events no token", b"GET", f"/api/sessions/{UUID}/events", {}, b"", 401, "unauthorized"),
    ("preflight foreign origin", b"OPTIONS", "/api/claude",
     {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}, b"", 403, "origin_not_allowed"),
    # turn options against the policy of the table's daemon (--allow-model, --max-budget-usd, ...)
    ("model not allowed", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", model="opus"), 403,
     "model_not_allowed"),
    ("budget over limit", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", max_budget_usd=2), 403,
     "budget_over_limit"),
    ("turns over limit", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", max_turns=11), 403,
     "max_turns_over_limit"),
    ("system prompt denied", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", system_prompt="x"), 403,
     "system_prompt_denied"),
    ("bypass denied", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", permission_mode="bypassPermissions"),
     403, "skip_permissions_denied"),
    ("approvals denied", b"POST", "/api/claude", {**AUTH, **JSON}, j(prompt="x", approvals=True), 403,
     "approvals_denied"),
    # answers to permission requests
    ("answer unknown session", b"POST", f"/api/sessions/{UUID}/permissions/{'0' * 32}", {**AUTH, **JSON},
     j(behavior="allow"), 404, "permission_request_not_found"),
    ("answer not uuid", b"POST", f"/api/sessions/abc/permissions/{'0' * 32}", {**AUTH, **JSON},
     j(behavior="allow"), 404, "permission_request_not_found"),
    ("answer no token", b"POST", f"/api/sessions/{UUID}/permissions/{'0' * 32}", JSON, j(behavior="allow"), 401,
     "unauthorized"),
    ("answer not json", b"POST", f"/api/sessions/{UUID}/permissions/{'0' * 32}", AUTH, j(behavior="allow"), 415,
     "unsupported_media_type"),
    ("answer GET", b"GET", f"/api/sessions/{UUID}/permissions/{'0' * 32}", AUTH, b"", 405, "method_not_allowed"),
    *[(f"option {json.dumps(fields)[:50]}", b"POST", "/api/claude", {**AUTH, **JSON}, j(**{"prompt": "x", **fields}),
       400, code) for fields, code, _ in BAD_OPTIONS
      if len(j(**{"prompt": "x", **fields})) < 4096 and code != "prompt_too_large"],
]


class BadRequestTable(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_table(self) -> Any:
        """Each bad request gets its status and a JSON error naming the problem; afterwards the data dir holds
        nothing from the bad ones (no row, no event log, no workspace and no CLI but the spare's, no turn), and a
        good request still works, in the spare, whose environment has no API token."""
        daemon = yield Daemon(self, "--skip-permissions", "deny", "--max-prompt", "2000", "--max-body", "4096",
                              "--max-system-prompt", "50", "--max-image-bytes", "64", "--allow-model", "sonnet",
                              "--max-budget-usd", "1", "--max-turns-limit", "10", "--allow-system-prompt", "append",
                              "--approvals", "deny",
                              env={"CLAUDESRV_AUTH_TOKENS": f"other,{TOKEN}"}, spares=1).start()
        self.assertGreaterEqual(len(BAD_REQUESTS), 60 + 30)
        yield wait_for(lambda: len(daemon.invocations()) == 1)
        [spare] = daemon.invocations()
        for name, method, path, headers, body, status, code in BAD_REQUESTS:
            hdrs: dict[bytes | str, bytes | str] = {"Host": f"127.0.0.1:{daemon.port}"}
            for key, value in headers.items():
                hdrs[key] = value
            response = yield treq.request(method.decode(), daemon.url + path, headers=hdrs, data=body or None,
                                          persistent=False)
            content = yield response.content()
            self.assertEqual(response.code, status, f"{name}: {content[:200]!r}")
            error = json.loads(content)["error"]
            self.assertEqual(error["code"], code, name)
            self.assertTrue(error["message"], name)
            if status == 401:
                self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ['Bearer realm="claudesrv"'])
        self.assertEqual(daemon.rows(), [])
        self.assertEqual(daemon.workspaces(), [os.path.basename(spare["cwd"])])
        events = os.path.join(daemon.data_dir, "events")
        spare_id = os.path.basename(spare["cwd"])[len("session-"):]
        self.assertLessEqual(set(os.listdir(events) if os.path.isdir(events) else []), {spare_id})
        self.assertEqual(daemon.invocations(), [spare])
        self.assertEqual([m["request"]["subtype"] for m in daemon.stdin()], ["initialize"])
        self.assertEqual(daemon.turns(), [])
        good = yield post(daemon.url + "/api/claude", {"prompt": "hello"}, headers=AUTH)
        self.assertEqual(good.status, 200)
        self.assertEqual(len(good.sse.results()), 1)
        self.assertEqual(daemon.rows(), [(good.session_id, spare["cwd"])])
        self.assertEqual([t["pid"] for t in daemon.turns()], [spare["pid"]])
        self.assertNotIn(TOKEN, daemon.log)
        env = spare["env"]
        self.assertIn("CLAUDESRV_RUN_ID", env)
        self.assertNotIn("CLAUDESRV_AUTH_TOKENS", env, "the CLI and its tools must not see the API tokens")


class ListeningPolicy(TestCase):
    timeout = 60

    @inlineCallbacks
    def run_twistd(self, *args: str, env: dict[str, str] | None = None) -> Any:
        full_env = {k: v for k, v in os.environ.items() if k != "CLAUDESRV_AUTH_TOKENS"}
        full_env.update(env or {})
        out, err, code = yield utils.getProcessOutputAndValue(
            TWISTD[0], [*TWISTD[1:], "-n", "--pidfile=", "claudesrv", "--data-dir", self.mktemp(), *args],
            env=full_env)
        return out.decode() + err.decode(), code

    @inlineCallbacks
    def test_refuses_open_listener_without_token(self) -> Any:
        """A listener beyond loopback (wildcard, external, TLS, unix) without a token stops the daemon
        at start with a message that names the options to use: twistd exits at once, non-zero (shown once,
        for a wildcard listener), because the options of ``twistd claudesrv`` refuse each of them."""
        text, code = yield self.run_twistd("--listen", "tcp:0")
        self.assertNotEqual(code, 0)
        self.assertIn("--auth-token-file", text)
        self.assertIn("--insecure-no-auth", text)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CLAUDESRV_AUTH_TOKENS"})
        for listen in ("tcp:0", "tcp:0:interface=0.0.0.0", "unix:/tmp/claudesrv-test.sock",
                       "ssl:0:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1"):
            with self.assertRaises(usage.UsageError) as refused:
                Options().parseOptions(["--data-dir", self.mktemp(), "--listen", listen])
            self.assertIn("--auth-token-file", str(refused.exception), listen)
            self.assertIn("--insecure-no-auth", str(refused.exception), listen)

    @inlineCallbacks
    def test_open_listener_with_token_or_on_purpose(self) -> Any:
        """Two daemons listening beyond loopback, one with a token (on all interfaces and on TLS), one with
        --insecure-no-auth: both start and serve; the one with a token serves TLS and throttles repeated
        failures (each check's own docstring says exactly what it proves)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca_pem, key_path, cert_path = make_tls_files(directory)
        with_token, on_purpose = yield gatherResults([
            Daemon(self, "--listen", f"ssl:0:privateKey={key_path}:certKey={cert_path}:interface=127.0.0.1",
                   listen="tcp:0", env={"CLAUDESRV_AUTH_TOKENS": TOKEN}).start(),
            Daemon(self, "--insecure-no-auth", listen="tcp:0").start()])
        yield self.open_listener_with_token_or_on_purpose(with_token, on_purpose)
        yield self.tls_listener(with_token, ca_pem)
        yield self.repeated_failures_throttled(with_token)

    @inlineCallbacks
    def open_listener_with_token_or_on_purpose(self, with_token: Daemon, on_purpose: Daemon) -> Any:
        """With a token, or with --insecure-no-auth, the daemon listens on all interfaces."""
        reply = yield post(with_token.url + "/api/claude", {"prompt": "hi"}, headers=AUTH)
        self.assertEqual(reply.status, 200)
        reply = yield post(on_purpose.url + "/api/claude", {"prompt": "hi"})
        self.assertEqual(reply.status, 200)
        self.assertNotIn("--auth-token-file", on_purpose.log)

    @inlineCallbacks
    def tls_listener(self, daemon: Daemon, ca_pem: bytes) -> Any:
        """--listen ssl:... serves the API over TLS; a client that trusts our CA verifies the hostname."""
        [port] = [port for port, tls in daemon.proto.ports if tls]
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca_pem))
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy))
        auth: dict[bytes | str, bytes | str] = {"Authorization": f"Bearer {TOKEN}"}
        response = yield client.post(f"https://localhost:{port}/api/claude", json={"prompt": "hi"},
                                     headers=auth)
        self.assertEqual(response.code, 200)
        sse = SSEParser()
        sse.feed((yield response.content()))
        self.assertEqual(len(sse.results()), 1)
        untrusting = treq.client.HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS()))
        outcome = yield untrusting.get(f"https://localhost:{port}/healthz").addCallbacks(
            lambda _: [], lambda f: [f])
        self.assertEqual(len(outcome), 1, "a client that does not trust our CA must refuse the certificate")
        self.assertTrue(outcome[0].check(ResponseNeverReceived))

    @inlineCallbacks
    def repeated_failures_throttled(self, daemon: Daemon) -> Any:
        """After 10 failed authentications in a minute from one address, its further failures get 429,
        while a valid token still works."""
        for _ in range(10):
            reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers={"Authorization": "Bearer x"})
            self.assertEqual(reply.status, 401)
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers={"Authorization": "Bearer y"})
        self.assertEqual((reply.status, reply.phrase), (429, b"Too Many Requests"))  # Twisted knows no phrase for it
        self.assertEqual(reply.json()["error"]["code"], "too_many_auth_failures")
        self.assertEqual(reply.header("Retry-After"), "60")
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers=AUTH)
        self.assertEqual(reply.status, 200)


class Tokens(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_token_file_reloaded_on_sighup(self) -> Any:
        """Tokens come from --auth-token-file; SIGHUP re-reads it, so a replaced token stops working at once.
        /healthz needs no token. No token ever reaches the log."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("# tokens\nfirst-token\n")
        daemon = yield Daemon(self, "--auth-token-file", path).start()
        ok = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers={"Authorization": "Bearer first-token"})
        self.assertEqual(ok.status, 200)
        health = yield treq.get(daemon.url + "/healthz", persistent=False)
        self.assertEqual((health.code, (yield health.json())), (200, {"status": "ok"}))
        with open(path, "w") as f:
            f.write("second-token\n")
        daemon.signal(signal.SIGHUP)
        yield wait_for(lambda: "reloaded 1 auth token" in daemon.log)
        old = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers={"Authorization": "Bearer first-token"})
        self.assertEqual(old.status, 401)
        new = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers={"Authorization": "Bearer second-token"})
        self.assertEqual(new.status, 200)
        self.assertNotIn("first-token", daemon.log)
        self.assertNotIn("second-token", daemon.log)


class SlowClients(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_slow_request_timed_out(self) -> Any:
        """A connection that sends half a request and then nothing is closed after --http-timeout."""
        daemon = yield Daemon(self, "--http-timeout", "0.3").start()
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), client)
        client.transport.write(b"POST /api/claude HTTP/1.1\r\nHost: localhost\r\n")  # type: ignore[union-attr]
        yield wait_for(lambda: client.closed, timeout=5)
        self.assertIn("Timing out client", daemon.log)


class HostsAndOrigins(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_hosts_and_origins(self) -> Any:
        """On loopback, localhost, 127.0.0.1, [::1] (any port) and --allowed-host names are accepted as Host,
        others are refused with 403; only a --cors-origin origin, compared whole, gets CORS headers and
        preflight answers."""
        origin = "http://127.0.0.1:8080"
        daemon = yield Daemon(self, "--allowed-host", "claude.internal", "--cors-origin", origin).start()
        sid: dict[str, str] = {}
        for host in ("localhost", "localhost:1", "127.0.0.1", f"127.0.0.1:{daemon.port}", "[::1]:3000",
                     "claude.internal", "CLAUDE.internal:8080"):
            reply = yield post(daemon.url + "/api/claude", {"prompt": "hi", **sid}, headers={"Host": host})
            self.assertEqual(reply.status, 200, host)
            sid = {"session_id": str(reply.session_id)}
        for host in ("evil.com", "localhost.evil.com", "[::2]"):
            reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers={"Host": host})
            self.assertEqual(reply.status, 403, host)
        preflight: dict[bytes | str, bytes | str] = {
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}
        pre = yield treq.request("OPTIONS", daemon.url + "/api/claude", persistent=False, headers=preflight)
        self.assertEqual(pre.code, 204)
        self.assertEqual(pre.headers.getRawHeaders("Access-Control-Allow-Origin"), [origin])
        self.assertIn("Authorization", pre.headers.getRawHeaders("Access-Control-Allow-Headers")[0])
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi", **sid}, headers={"Origin": origin})
        self.assertEqual(reply.header("Access-Control-Allow-Origin"), origin)
        for evil in ("http://127.0.0.1:8080.evil.com", "http://127.0.0.1", "null"):
            reply = yield post(daemon.url + "/api/claude", {"prompt": "hi", **sid}, headers={"Origin": evil})
            self.assertEqual(reply.status, 200, evil)
            self.assertIsNone(reply.header("Access-Control-Allow-Origin"), evil)


class PermissionPolicy(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_deny_tool_always_added(self) -> Any:
        """--deny-tool names reach the disallowed tools of every CLI, spares included, whatever the request
        says."""
        daemon = yield Daemon(self, "--deny-tool", "WebFetch", "--deny-tool", "Bash(rm *)", spares=1).start()
        yield wait_for(lambda: len(daemon.invocations()) == 1)
        [spare] = daemon.invocations()
        self.assertEqual(spare["argv"][-4:], ["--disallowedTools", "WebFetch", "Bash(rm *)", "--"])
        yield post(daemon.url + "/api/claude", {"prompt": "hi", "disallowedTools": ["Edit"]})
        yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        own, taken = daemon.turns()
        self.assertEqual(own["disallowed_tools"], ["Edit", "WebFetch", "Bash(rm *)"])
        self.assertEqual((taken["pid"], taken["disallowed_tools"]), (spare["pid"], ["WebFetch", "Bash(rm *)"]))
        for call in daemon.invocations():
            argv = call["argv"]
            self.assertEqual(argv[argv.index("--disallowedTools"):][-3:], ["WebFetch", "Bash(rm *)", "--"])

    @inlineCallbacks
    def test_skip_permissions_as_root(self) -> Any:
        """As root, dangerously-skip-permissions is refused with an explanation unless --sandboxed, which
        gives the CLI IS_SANDBOX=1 so that the run works."""
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        plain, daemon = yield gatherResults([Daemon(self).start(), Daemon(self, "--sandboxed").start()])
        reply = yield post(plain.url + "/api/claude", {"prompt": "hi", "dangerously-skip-permissions": True})
        self.assertEqual(reply.status, 403)
        self.assertIn("--sandboxed", reply.json()["error"]["message"])
        self.assertEqual(plain.invocations(), [])
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi", "dangerously-skip-permissions": True})
        self.assertFalse(reply.sse.results()[0]["is_error"])
        [call] = daemon.invocations()
        self.assertEqual(call["env"]["IS_SANDBOX"], "1")
        self.assertIn("--dangerously-skip-permissions", call["argv"])


class WorkspaceContainment(SynchronousTestCase):
    """In process (the harness: the real routes, registry and SQL; CLIs played in memory)."""

    def test_row_outside_root_is_never_a_cwd(self) -> None:
        """A stored workspace outside <data-dir>/Workspace/ (a sibling 'Workspace-evil' included) is an
        error, and no CLI runs there."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        d = harness.Daemon(base)
        self.addCleanup(d.close)
        self.assertEqual(d.post({"prompt": "hi"}).code, 200)
        evil = os.path.join(base, "Workspace-evil", "session-x")
        os.makedirs(evil)
        for sid, path in ((UUID, evil), ("7a1c5e0e-3b8c-4a57-9d7e-6ad0a39b8c11", "/tmp")):
            with sqlite3.connect(os.path.join(base, "sessions.db")) as db:
                db.execute("INSERT INTO sessions (claude_session_id, workspace_path) VALUES (?, ?)", (sid, path))
            code, body = d.call("POST", "/api/claude", json={"prompt": "hi", "session_id": sid})
            self.assertEqual((code, body["error"]["code"]), (500, "workspace_outside_root"))
        [cli] = d.world.clis
        self.assertEqual(cli.cwd, os.path.join(base, "Workspace", f"session-{cli.session_id}"))


def make_tls_files(directory: str) -> tuple[bytes, str, str]:
    """A CA of our own and a server certificate for localhost/127.0.0.1 signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "claudesrv test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path = os.path.join(directory, "server.key")
    cert_path = os.path.join(directory, "server.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return ca.public_bytes(serialization.Encoding.PEM), key_path, cert_path
