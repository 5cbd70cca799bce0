"""
Running it as a daemon: the sessions API, delete, expiry, health, metrics, JSON logs and the OpenAPI document.

The sessions API and expiry only need HTTP and a clock, so they run in the in-process harness (the real routes,
registry and SQL, CLIs played in memory); the rest runs against a real twistd.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import TimerService
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.trial.unittest import TestCase

from claudesrv.app import ClaudeAPI
from claudesrv.live import IDLE
from claudesrv.schema import BodyLimits, problem
from tests import harness
from tests.rawhttp import raw_post
from tests.support import Daemon, Since, get_json, pid_alive, post, wait_for

TOKEN = "ops-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LEGACY_ID = "00000000-0000-4000-8000-0000000000aa"


class InProcess(harness.DaemonTestCase):
    """The daemon in process (tests/harness.py)."""


class SessionsApi(InProcess):
    def test_list_get_page(self) -> None:
        """GET /api/sessions lists sessions most recently used first, in pages with an opaque cursor, each with
        its live state (idle, its pid, its last event id); ids that share a workspace (a round-one database
        where a resume got a new id) are one item; GET /api/sessions/<id> returns that item."""
        d = self.daemon()
        sids = []
        for _ in range(3):
            sids.append(d.post({"prompt": "hi"}).session_id)
            d.clock.advance(2)
        first_workspace = d.registry.sessions[sids[0]].workspace
        with sqlite3.connect(os.path.join(self.base, "sessions.db")) as db:
            db.execute("INSERT INTO sessions (claude_session_id, workspace_path, created_at, last_used_at) "
                       "VALUES (?, ?, ?, ?)", (LEGACY_ID, first_workspace, d.store.now(), d.store.now()))
        code, page = d.call("GET", "/api/sessions?limit=2")
        self.assertEqual(code, 200)
        self.assertEqual([s["session_id"] for s in page["sessions"]], [LEGACY_ID, sids[2]])
        self.assertEqual(page["sessions"][0]["session_ids"], [LEGACY_ID, sids[0]])
        newest = page["sessions"][1]
        self.assertEqual(set(newest), {"session_id", "session_ids", "workspace", "created_at", "last_used_at",
                                       "running", "state", "pid", "last_event_id", "queued",
                                       "pending_permissions", "live_options"})
        [cli] = d.world.of(sids[2])
        self.assertEqual((newest["state"], newest["pid"], newest["last_event_id"], newest["running"],
                          newest["queued"]), (IDLE, cli.pid, 3, False, False))
        self.assertEqual(newest["workspace"], os.path.join(self.base, "Workspace", f"session-{sids[2]}"))
        code, rest = d.call("GET", "/api/sessions?limit=2&cursor=" + page["next_cursor"])
        self.assertEqual([s["session_id"] for s in rest["sessions"]], [sids[1]])
        self.assertIsNone(rest["next_cursor"])
        code, item = d.call("GET", f"/api/sessions/{sids[0]}")
        usage = item.pop("usage")
        self.assertIsNone(item.pop("project"))
        self.assertEqual((code, item), (200, page["sessions"][0]))
        [recorded] = json.loads(harness.TURN[-1])["model_usage_since_last_result"].values()  # its one turn's
        self.assertEqual((usage["turns"], usage["input_tokens"], usage["output_tokens"]),
                         (1, recorded["inputTokens"], recorded["outputTokens"]))
        self.assertAlmostEqual(usage["cost_usd"], recorded["costUSD"])


class Expiry(InProcess):
    """The expiry sweep, driven by the harness's Clock (the store's times come from it too)."""

    def test_idle_sessions_expire_running_ones_stay(self) -> None:
        """Sessions idle longer than the TTL are removed with their workspaces, event logs and warm processes;
        one with a running turn is kept however old it is; a failed sweep is logged and the next sweep still
        runs."""
        d = self.daemon(warm_idle=0)
        idle = [d.post({"prompt": "hi"}).session_id for _ in range(2)]
        d.world.hold_turns = True
        busy = d.post({"prompt": "hold"})
        calls: list[int] = []
        sweeper = TimerService(60, lambda: d.sessions.expire(3600).addCallback(calls.append))
        sweeper.clock = d.clock
        sweeper.startService()
        self.addCleanup(sweeper.stopService)
        self.assertEqual(calls, [0])
        workspaces = {sid: d.registry.sessions[sid].workspace for sid in (*idle, busy.session_id)}
        d.clock.advance(3600 + 60)
        self.assertEqual(calls, [0, 2])
        for sid in idle:
            self.assertFalse(os.path.exists(workspaces[sid]))
            self.assertFalse(os.path.exists(os.path.join(self.base, "events", sid)))
            self.assertFalse([cli for cli in d.world.of(sid) if cli.alive])
        self.assertTrue(os.path.exists(workspaces[busy.session_id]))
        groups = d.store.groups(10, 0)
        self.assertEqual([g.session_id for g in self.successResultOf(groups)], [busy.session_id])
        self.patch(d.store, "idle_since", lambda cutoff: fail(RuntimeError("the disk went away")))
        d.clock.advance(60)
        d.clock.advance(60)
        self.assertEqual(calls[2:], [0, 0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        [cli] = d.world.of(busy.session_id)
        self.assertTrue(cli.alive)


class Delete(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_delete(self) -> Any:
        """DELETE of a session, through a real twistd: refused while a turn runs, then the session's CLI, its
        tools, rows, workspace, event log and (on request) transcripts are gone (each check's own docstring
        says exactly what it proves)."""
        config = os.path.abspath(self.mktemp())
        daemon = yield Daemon(self, env={"CLAUDE_CONFIG_DIR": config}).start()
        yield self.delete_removes_everything(daemon.since(), config)
        yield self.disconnect_then_delete_leaves_no_process(daemon.since())

    @inlineCallbacks
    def delete_removes_everything(self, daemon: Since, config: str) -> Any:
        """DELETE is refused with 409 while a turn runs; afterwards it stops the session's warm CLI and removes
        every row of the workspace, the workspace and the session's event log, and with purge_transcript=true
        only the CLI transcripts of those ids."""
        first = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        sid = first.session_id
        other = yield post(daemon.url + "/api/claude", {"prompt": "hi"})
        other_sid = other.session_id
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
        self.assertEqual((item["running"], item["state"]), (True, "running"))
        response = yield treq.delete(f"{daemon.url}/api/sessions/{sid}", persistent=False)
        self.assertEqual(response.code, 409)
        self.assertEqual((yield response.json())["error"]["code"], "session_busy")
        yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        yield running
        pids = {t["session_id"]: t["pid"] for t in daemon.turns()}
        workspace = dict(daemon.rows())[sid]
        events = os.path.join(daemon.data_dir, "events", sid)
        self.assertTrue(os.path.isdir(events))
        response = yield treq.delete(f"{daemon.url}/api/sessions/{sid}?purge_transcript=true", persistent=False)
        removed = json.loads((yield response.content()))
        self.assertEqual((response.code, removed["session_ids"], removed["transcripts_removed"]), (200, [sid], 1))
        self.assertNotIn(sid, dict(daemon.rows()))
        self.assertIn(other_sid, dict(daemon.rows()))
        self.assertFalse(os.path.exists(workspace))
        self.assertFalse(os.path.exists(events))
        self.assertEqual(os.listdir(project), [f"{other_sid}.jsonl"])
        self.assertFalse(pid_alive(pids[sid]))
        self.assertTrue(pid_alive(pids[other_sid]))
        code, _ = yield get_json(f"{daemon.url}/api/sessions/{sid}")
        self.assertEqual(code, 404)

    @inlineCallbacks
    def disconnect_then_delete_leaves_no_process(self, daemon: Since) -> Any:
        """A client that drops a hung turn interrupts it (the CLI stays warm); deleting the session then
        ends the CLI and the tool process it left in a session of its own."""
        first = yield post(daemon.url + "/api/claude", {"prompt": "start"})
        sid = first.header("X-Session-Id")
        client = yield raw_post(daemon.port, {"prompt": "[[fake hang=1 grandchild=1]]", "session_id": sid})
        yield client.got_data
        yield wait_for(lambda: len(daemon.grandchildren()) == 1)
        client.transport.abortConnection()
        pid = daemon.turns()[0]["pid"]
        yield wait_for(lambda: daemon.interrupts() == [pid])
        yield wait_for(lambda: f"session {sid}: disconnected" in daemon.log)
        self.assertTrue(pid_alive(pid))
        deleted = yield treq.delete(f"{daemon.url}/api/sessions/{sid}", persistent=False)
        self.assertEqual(deleted.code, 200)
        yield wait_for(lambda: not pid_alive(pid))
        yield wait_for(lambda: not any(pid_alive(g) for g in daemon.grandchildren()))


class HealthAndMetrics(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_health_ready_metrics(self) -> Any:
        """/healthz answers without a token; /readyz reports its checks (the CLI's --version among them);
        /metrics needs the token and parses with prometheus_client's own parser, counting turns, outcomes,
        how turns found their process, CLI exits, live processes, relayed lines and HTTP requests."""
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
        yield wait_for(lambda: len(re.findall(r"session \S+: (ok|error), ", daemon.log)) == 2)
        yield wait_for(lambda: len(daemon.workspaces()) == 1)  # the failed new session is gone
        code, text = yield get_json(daemon.url + "/metrics", headers=AUTH)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text.decode()) for s in family.samples}
        self.assertEqual(samples[("claudesrv_turns_started_total", ())], 2)
        self.assertEqual(samples[("claudesrv_turns_ended_total", (("outcome", "ok"),))], 1)
        self.assertEqual(samples[("claudesrv_turns_ended_total", (("outcome", "error"),))], 1)
        self.assertEqual(samples[("claudesrv_turn_starts_total", (("kind", "cold"),))], 2)
        self.assertEqual(samples[("claudesrv_cli_spawns_total", ())], 2)
        self.assertEqual(samples[("claudesrv_cli_exits_total", (("code", "3"),))], 1)
        self.assertEqual(samples[("claudesrv_live_processes", (("state", "idle"),))], 1)
        self.assertEqual(samples[("claudesrv_turns_running", ())], 0)
        self.assertEqual(samples[("claudesrv_http_requests_total",
                                  (("route", "/api/claude"), ("status", "200")))], 2)
        self.assertEqual(samples[("claudesrv_relayed_lines_total", ())], 3)
        self.assertGreater(samples[("claudesrv_relayed_bytes_total", ())], 0)


class Logs(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_json_logs_with_turn_line(self) -> Any:
        """With --logger claudesrv.logs.json_stdout every log event is a JSON object, and each turn logs one
        line with its session id, outcome, how it found its process, duration, exit code and lines; the
        prompt is never logged."""
        daemon = Daemon(self)
        daemon.args[:0] = ["--logger", "claudesrv.logs.json_stdout"]
        yield daemon.start()
        reply = yield post(daemon.url + "/api/claude", {"prompt": "a prompt that stays private"})
        sid = reply.session_id
        yield wait_for(lambda: '"outcome"' in daemon.log)
        events = [json.loads(line.strip("\x1e")) for line in daemon.log.splitlines() if line.strip("\x1e")]
        [turn] = [e for e in events if e.get("outcome")]
        self.assertEqual((turn["session_id"], turn["outcome"], turn["kind"], turn["exit_code"], turn["lines"]),
                         (sid, "ok", "cold", None, 3))
        self.assertIn("duration", turn)
        self.assertNotIn("stays private", daemon.log)


class OpenApi(InProcess):
    def test_the_served_schema_is_the_one_requests_are_held_to(self) -> None:
        """Every field of the served Turn schema is a field requests may send, with this daemon's limits in it, and
        a body the schema refuses is refused the same way by the route."""
        d = self.daemon()
        d.api.body_limits = BodyLimits(max_prompt=50, max_system_prompt=10, max_image_bytes=64)
        turn = d.call("GET", "/openapi.json")[1]["components"]["schemas"]["Turn"]
        self.assertEqual(turn["properties"]["system_prompt"]["x-maxBytes"], 10)
        for name, example in [("model", "sonnet"), ("effort", "low"), ("max_turns", 2), ("json_schema", {}),
                              ("system_prompt", "x" * 11), ("temperature", 1)]:
            stream = d.post({"prompt": "a", name: example})
            known = name in turn["properties"]
            found = problem(turn["properties"][name], example, name) if known else "unknown"
            error = json.loads(bytes(stream.sse.raw))["error"]["message"] if stream.code != 200 else None
            self.assertEqual(error is not None, found is not None, name)
            if known and found:
                self.assertEqual(error, found)


    def test_every_route_documented_and_answering(self) -> None:
        """Each route the app serves is in /openapi.json with its methods, and each documented route
        answers (not 404 or 405; 404 for an unknown session). (/readyz's CLI probe is played here: it spawns
        the CLI, which a Clock cannot; HealthAndMetrics runs it for real.)"""
        d = self.daemon()
        self.patch(d.api.readiness, "_cli", lambda: succeed({"ok": True, "version": "played"}))
        code, spec = d.call("GET", "/openapi.json")
        self.assertEqual(code, 200)
        served = set()
        for rule in ClaudeAPI.app.url_map.iter_rules():
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
                served.add((path, method.lower()))
        documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
        self.assertEqual(served, documented)
        self.assertIn(("/api/sessions/{session_id}/events", "get"), documented)
        sid = "00000000-0000-4000-8000-000000000000"
        for path, method in sorted(documented):
            answer = d.http.request(method.upper(), "http://localhost" + path.replace("{session_id}", sid),
                                    json={"prompt": "hi"} if method == "post" else None)
            d.pump()
            code = self.successResultOf(answer).code
            if "{session_id}" not in path:
                self.assertNotIn(code, (404, 405), (path, method))
            else:
                self.assertEqual(code, 404, (path, method))
