"""
Running it as a daemon: the sessions API, expiry, health, metrics, JSON logs and the OpenAPI document.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import TimerService
from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from claudesrv.app import ClaudeAPI
from claudesrv.command import ClaudeRequest
from claudesrv.process import spawner
from claudesrv.runs import Limits, RunManager
from claudesrv.sessions import Sessions
from claudesrv.store import SessionStore
from claudesrv.workspaces import Workspaces
from tests.support import FAKE, Daemon, post, wait_for
from tests.test_lifecycle import RecordingStream

TOKEN = "ops-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@inlineCallbacks
def get_json(url: str, **kwargs: Any) -> Any:
    response = yield treq.get(url, persistent=False, **kwargs)
    body = yield response.content()
    return response.code, (json.loads(body) if body and body.startswith(b"{") else body)


class SessionsApi(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_list_get_page(self) -> Any:
        """GET /api/sessions lists sessions newest first in pages with an opaque cursor; ids that share a
        workspace (a resume that got a new id) are one item; GET /api/sessions/<id> returns that item."""
        daemon = yield Daemon(self).start()
        sids = []
        for _ in range(3):
            reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
            sids.append(reply.sse.events()[0]["session_id"])
            time.sleep(1.05)  # last_used_at has a resolution of one second
        forked = yield post(daemon.url + "/api/claude", {"prompt": "[[fake new_id=1]]", "session_id": sids[0]})
        new_id = forked.sse.events()[0]["session_id"]
        code, page = yield get_json(daemon.url + "/api/sessions?limit=2")
        self.assertEqual(code, 200)
        self.assertEqual([s["session_id"] for s in page["sessions"]], [new_id, sids[2]])
        self.assertEqual(page["sessions"][0]["session_ids"], [new_id, sids[0]])
        self.assertEqual(set(page["sessions"][0]), {"session_id", "session_ids", "workspace", "created_at",
                                                    "last_used_at", "running"})
        code, rest = yield get_json(daemon.url + "/api/sessions?limit=2&cursor=" + page["next_cursor"])
        self.assertEqual([s["session_id"] for s in rest["sessions"]], [sids[1]])
        self.assertIsNone(rest["next_cursor"])
        code, item = yield get_json(f"{daemon.url}/api/sessions/{sids[0]}")
        self.assertEqual((code, item), (200, page["sessions"][0]))

    @inlineCallbacks
    def test_delete(self) -> Any:
        """DELETE is refused with 409 while a turn runs; afterwards it removes every row of the workspace
        and the workspace, and with purge_transcript=true only the CLI transcripts of those ids."""
        config = os.path.abspath(self.mktemp())
        daemon = yield Daemon(self, env={"CLAUDE_CONFIG_DIR": config}).start()
        first = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        sid = first.sse.events()[0]["session_id"]
        other = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        other_sid = other.sse.events()[0]["session_id"]
        project = os.path.join(config, "projects", "-srv-claudesrv-Workspace-x")
        os.makedirs(project)
        for name in (sid, other_sid):
            with open(os.path.join(project, f"{name}.jsonl"), "w") as f:
                f.write("{}\n")
        frames: list[bytes] = []
        running = post(daemon.url + "/api/claude", {"prompt": "[[fake hang=1]]", "session_id": sid},
                       on_frame=lambda sse: frames.extend(sse.frames[len(frames):]))
        yield wait_for(lambda: frames)
        code, item = yield get_json(f"{daemon.url}/api/sessions/{sid}")
        self.assertTrue(item["running"])
        response = yield treq.delete(f"{daemon.url}/api/sessions/{sid}", persistent=False)
        self.assertEqual(response.code, 409)
        self.assertEqual((yield response.json())["error"]["code"], "session_busy")
        yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        yield running
        yield wait_for(lambda: ": cancelled, exit" in daemon.log)
        workspace = dict(daemon.rows())[sid]
        response = yield treq.delete(f"{daemon.url}/api/sessions/{sid}?purge_transcript=true", persistent=False)
        self.assertEqual(response.code, 204)
        self.assertNotIn(sid, dict(daemon.rows()))
        self.assertIn(other_sid, dict(daemon.rows()))
        self.assertFalse(os.path.exists(workspace))
        self.assertEqual(os.listdir(project), [f"{other_sid}.jsonl"])
        code, _ = yield get_json(f"{daemon.url}/api/sessions/{sid}")
        self.assertEqual(code, 404)


class Expiry(TestCase):
    """The expiry sweep, driven by a Clock."""

    timeout = 30

    @inlineCallbacks
    def setUp(self) -> Any:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.clock = Clock()
        self.clock.advance(time.time())
        self.store = SessionStore(os.path.join(base, "sessions.db"))
        yield self.store.start()
        self.workspaces = Workspaces(os.path.join(base, "Workspace"))
        env = dict(os.environ, FAKE_STATE_DIR=base)
        self.runs = RunManager(self.clock, spawner(reactor), self.store, self.workspaces,  # type: ignore[arg-type]
                               lambda: FAKE, env, Limits(run_timeout=0, idle_timeout=0))
        self.sessions = Sessions(self.store, self.workspaces, self.runs, {})

    def tearDown(self) -> None:
        self.store.close()

    @inlineCallbacks
    def test_idle_sessions_expire_running_ones_stay(self) -> Any:
        """Sessions idle longer than the TTL are removed with their workspaces; one with a running turn
        is kept however old it is; a failed sweep is logged and the next sweep still runs."""
        spaces = [self.workspaces.create() for _ in range(3)]
        for i, path in enumerate(spaces):
            yield self.store.record(f"00000000-0000-4000-8000-00000000000{i}", path)
        os.makedirs(os.path.join(self.runs.environ["FAKE_STATE_DIR"], "sessions"))
        with open(os.path.join(self.runs.environ["FAKE_STATE_DIR"], "sessions",
                               "00000000-0000-4000-8000-000000000002"), "w") as f:
            f.write(spaces[2])
        stream = RecordingStream()
        busy = self.runs.submit(ClaudeRequest("[[fake hang=1]]", "00000000-0000-4000-8000-000000000002"),
                                spaces[2], stream)
        calls = []
        sweeper = TimerService(60, lambda: self.sessions.expire(3600).addCallback(calls.append))
        sweeper.clock = self.clock
        sweeper.startService()
        yield wait_for(lambda: calls == [0])
        yield wait_for(lambda: stream.sse.frames)
        self.clock.advance(3600 + 60)
        yield wait_for(lambda: len(calls) == 2)
        self.assertEqual(calls[1], 2)
        self.assertFalse(os.path.exists(spaces[0]) or os.path.exists(spaces[1]))
        self.assertTrue(os.path.exists(spaces[2]))
        groups = yield self.store.groups(10, 0)
        self.assertEqual([g.session_id for g in groups], ["00000000-0000-4000-8000-000000000002"])
        self.patch(self.store, "idle_since", lambda cutoff: fail(RuntimeError("the disk went away")))
        self.clock.advance(60)
        yield wait_for(lambda: len(calls) == 3)
        self.clock.advance(60)
        yield wait_for(lambda: len(calls) == 4)
        self.assertEqual(calls[2:], [0, 0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        busy.interrupt("cancelled")
        yield busy.done
        sweeper.stopService()


class HealthAndMetrics(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_health_ready_metrics(self) -> Any:
        """/healthz answers without a token; /readyz reports its checks; /metrics needs the token and
        parses with prometheus_client's own parser, counting runs, outcomes and HTTP requests."""
        daemon = yield Daemon(self, env={"CLAUDESRV_AUTH_TOKENS": TOKEN}).start()
        code, body = yield get_json(daemon.url + "/healthz")
        self.assertEqual((code, body), (200, {"status": "ok"}))
        code, _ = yield get_json(daemon.url + "/readyz")
        self.assertEqual(code, 401)
        code, ready = yield get_json(daemon.url + "/readyz", headers=AUTH)
        self.assertEqual(code, 200)
        self.assertEqual(ready["checks"]["cli"]["version"], "2.1.330 (Claude Code)")
        self.assertTrue(all(c["ok"] for c in ready["checks"].values()))
        yield post(daemon.url + "/api/claude", {"prompt": "hi"}, headers=AUTH)
        yield post(daemon.url + "/api/claude", {"prompt": "[[fake no_init=1 exit=3]]"}, headers=AUTH)
        code, _ = yield get_json(daemon.url + "/metrics")
        self.assertEqual(code, 401)
        yield wait_for(lambda: len(re.findall(r"session \S+: (ok|error), exit", daemon.log)) == 2)
        code, text = yield get_json(daemon.url + "/metrics", headers=AUTH)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text.decode()) for s in family.samples}
        self.assertEqual(samples[("claudesrv_runs_started_total", ())], 2)
        self.assertEqual(samples[("claudesrv_runs_ended_total", (("outcome", "ok"),))], 1)
        self.assertEqual(samples[("claudesrv_runs_ended_total", (("outcome", "error"),))], 1)
        self.assertEqual(samples[("claudesrv_cli_exits_total", (("code", "3"),))], 1)
        self.assertEqual(samples[("claudesrv_runs_running", ())], 0)
        self.assertEqual(samples[("claudesrv_http_requests_total",
                                  (("route", "/api/claude"), ("status", "200")))], 2)
        self.assertEqual(samples[("claudesrv_relayed_lines_total", ())], 3)

    @inlineCallbacks
    def test_not_ready_without_cli(self) -> Any:
        """/readyz is 503 and names the failing check when the CLI is missing."""
        daemon = yield Daemon(self, claude="no-such-claude").start()
        code, ready = yield get_json(daemon.url + "/readyz")
        self.assertEqual(code, 503)
        self.assertFalse(ready["checks"]["cli"]["ok"])
        self.assertTrue(ready["checks"]["database"]["ok"])


class Logs(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_json_logs_with_run_line(self) -> Any:
        """With --logger claudesrv.logs.json_stdout every log event is a JSON object, and each run logs
        one line with its session id, outcome, duration, exit code and bytes relayed."""
        daemon = Daemon(self)
        daemon.args[:0] = ["--logger", "claudesrv.logs.json_stdout"]
        yield daemon.start()
        reply = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        sid = reply.sse.events()[0]["session_id"]
        yield wait_for(lambda: "bytes_relayed" in daemon.log or '"outcome"' in daemon.log)
        events = [json.loads(line.strip("\x1e")) for line in daemon.log.splitlines() if line.strip("\x1e")]
        [run] = [e for e in events if e.get("outcome")]
        self.assertEqual((run["session_id"], run["outcome"], run["exit_code"]), (sid, "ok", 0))
        self.assertGreater(run["bytes"], 0)
        self.assertIn("duration", run)


class OpenApi(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_every_route_documented_and_answering(self) -> Any:
        """Each route the app serves is in /openapi.json with its methods, and each documented route
        answers (not 404 or 405)."""
        daemon = yield Daemon(self).start()
        code, spec = yield get_json(daemon.url + "/openapi.json")
        self.assertEqual(code, 200)
        served = set()
        for rule in ClaudeAPI.app.url_map.iter_rules():
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                served.add((path, method.lower()))
        documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
        self.assertEqual(served, documented)
        sid = "00000000-0000-4000-8000-000000000000"
        for path, method in sorted(documented):
            url = daemon.url + path.replace("{session_id}", sid)
            response = yield treq.request(method.upper(), url, persistent=False, json={"prompt": "hi"}
                                          if method == "post" else None)
            yield response.content()
            if "{session_id}" not in path:
                self.assertNotIn(response.code, (404, 405), (path, method))
            else:
                self.assertEqual(response.code, 404, (path, method))
