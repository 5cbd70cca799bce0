"""
Turn options in process: what reaches the CLI's argv and stdin, what a warm process is switched to without a
restart, what restarts it, and what the operator's policy refuses or fills in.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from claudesrv.policy import TurnPolicy
from tests import harness
from tests.harness import TURN, DaemonTestCase, ScriptedCli
from tests.support import Daemon, get_json, post

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def controls(cli: ScriptedCli) -> list[tuple[str, Any]]:
    """The control requests a CLI got (subtype and model or mode), and its user messages, in order."""
    seen: list[tuple[str, Any]] = []
    for message in cli.stdin:
        if message["type"] == "control_request":
            request = message["request"]
            seen.append((request["subtype"], request.get("model", request.get("mode"))))
        elif message["type"] == "user":
            seen.append(("user", None))
    return seen


class WarmChanges(DaemonTestCase):
    def test_model_and_mode_change_without_a_restart(self) -> None:
        """A model or permission mode other than the live process's is set with a control request before the
        turn's message, on the same process; a silent turn goes back to the default model; GET shows what the
        process runs with."""
        d = self.daemon()
        first = d.post({"prompt": "a"})
        sid = first.session_id
        [cli] = d.world.clis
        self.assertFalse([a for a in cli.argv if a.startswith(("--model", "--permission-mode"))])
        second = d.post({"prompt": "b", "session_id": sid, "model": "sonnet", "permission_mode": "plan"})
        self.assertEqual(second.types()[-1], "result")
        self.assertEqual(d.world.clis, [cli])
        self.assertEqual(controls(cli), [("user", None), ("set_model", "sonnet"), ("set_permission_mode", "plan"),
                                         ("user", None)])
        options = d.call("GET", f"/api/sessions/{sid}")[1]["live_options"]
        self.assertEqual((options["model"], options["permission_mode"]), ("sonnet", "plan"))
        d.post({"prompt": "c", "session_id": sid, "model": "sonnet", "permission_mode": "plan"})
        self.assertEqual(controls(cli)[-1:], [("user", None)])  # nothing to change
        d.post({"prompt": "d", "session_id": sid})
        self.assertEqual(controls(cli)[-3:], [("set_model", None), ("set_permission_mode", "default"), ("user", None)])
        self.assertEqual(d.world.clis, [cli])

    def test_a_refused_change_ends_the_turn_with_a_result(self) -> None:
        """A change the CLI refuses ends the turn (no message is written) with a result that says why; the
        process stays, and the next turn asks again."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        [cli] = d.world.clis
        cli.refuse = "Unknown model"
        stream = d.post({"prompt": "b", "session_id": sid, "model": "claude-nonesuch"})
        result = stream.events()[-1]
        self.assertEqual((result["type"], result["terminal_reason"]), ("result", "invalid_option"))
        self.assertIn("model 'claude-nonesuch': Unknown model", result["errors"][0])
        self.assertEqual(controls(cli)[-2:], [("user", None), ("set_model", "claude-nonesuch")])
        cli.refuse = None
        self.assertEqual(d.post({"prompt": "c", "session_id": sid, "model": "claude-nonesuch"}).types()[-1], "result")
        self.assertEqual(controls(cli)[-2:], [("set_model", "claude-nonesuch"), ("user", None)])
        self.assertEqual(d.world.clis, [cli])

    def test_bypass_mode_starts_a_process_that_may_bypass(self) -> None:
        """bypassPermissions needs the launch flag (the CLI refuses it otherwise: s05b): the process restarts
        with --dangerously-skip-permissions."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        d.post({"prompt": "b", "session_id": sid, "permission_mode": "bypassPermissions"})
        first, second = d.world.clis
        self.assertIn("--dangerously-skip-permissions", second.argv)
        self.assertFalse([a for a in second.argv if a.startswith("--permission-mode")])

    def test_spawn_time_options_restart_the_process(self) -> None:
        """A system prompt, effort, limits, a schema or partial messages start the session's process anew with
        --resume and the flags; the model and mode of that first turn are flags too."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        stream = d.post({"prompt": "b", "session_id": sid, "system_prompt": "-You are terse.", "effort": "high",
                         "max_turns": 5, "max_budget_usd": 0.25, "json_schema": schema,
                         "include_partial_messages": True, "model": "opus", "permission_mode": "acceptEdits"})
        self.assertEqual(stream.types()[-1], "result")
        first, second = d.world.clis
        self.assertFalse(first.alive)
        flags = second.argv[second.argv.index(f"--resume={sid}") + 1:]
        self.assertEqual(flags, ["--model=opus", "--permission-mode=acceptEdits", "--effort=high",
                                 "--system-prompt=-You are terse.", "--system-prompt-snapshot=off", "--max-turns=5",
                                 "--max-budget-usd=0.25", '--json-schema={"properties":{"answer":{"type":"string"}},'
                                 '"type":"object"}', "--include-partial-messages", "--"])
        self.assertEqual(controls(second), [("user", None)])
        options = d.call("GET", f"/api/sessions/{sid}")[1]["live_options"]
        self.assertEqual((options["system_prompt"], options["json_schema"], options["max_turns"]),
                         ("-You are terse.", schema, 5))

    def test_images_reach_the_cli_as_content_blocks(self) -> None:
        d = self.daemon()
        blocks = [{"type": "text", "text": "what is this?"},
                  {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                               "data": base64.b64encode(PNG).decode()}}]
        d.post({"prompt": blocks})
        [cli] = d.world.clis
        [message] = [m for m in cli.stdin if m["type"] == "user"]
        self.assertEqual(message["message"]["content"], blocks)


class OperatorPolicy(DaemonTestCase):
    def refused(self, d: harness.Daemon, body: dict[str, Any]) -> dict[str, Any]:
        stream = d.post({"prompt": "a", **body})
        self.assertEqual(stream.code, 403, body)
        return dict(json.loads(bytes(stream.sse.raw))["error"])

    def test_refusals_name_the_option(self) -> None:
        d = self.daemon()
        d.api.policy = TurnPolicy(allow_models=("sonnet", "claude-sonnet-*"), max_budget_usd=1.0,
                                  max_turns_limit=10, allow_system_prompt="append", skip_permissions="deny")
        for body, code, field, option in [
            ({"model": "opus"}, "model_not_allowed", "model", "--allow-model"),
            ({"max_budget_usd": 1.5}, "budget_over_limit", "max_budget_usd", "--max-budget-usd"),
            ({"max_turns": 11}, "max_turns_over_limit", "max_turns", "--max-turns-limit"),
            ({"system_prompt": "x"}, "system_prompt_denied", "system_prompt", "--allow-system-prompt"),
            ({"permission_mode": "bypassPermissions"}, "skip_permissions_denied", "permission_mode",
             "--skip-permissions"),
            ({"dangerously_skip_permissions": True}, "skip_permissions_denied", "dangerously-skip-permissions",
             "--skip-permissions"),
        ]:
            error = self.refused(d, body)
            self.assertEqual((error["code"], error["field"]), (code, field), body)
            self.assertIn(option, error["message"])
        self.assertEqual(d.world.clis, [])
        d.api.policy.allow_system_prompt = "no"
        self.assertEqual(self.refused(d, {"append_system_prompt": "x"})["field"], "append_system_prompt")

    def test_defaults_apply_when_the_request_is_silent(self) -> None:
        d = self.daemon()
        d.api.policy = TurnPolicy(allow_models=("claude-sonnet-*",), default_model="haiku", max_budget_usd=2.0,
                                  max_turns_limit=20)
        d.post({"prompt": "a"})
        d.post({"prompt": "b", "model": "claude-sonnet-5-5", "max_budget_usd": 0.5, "max_turns": 3})
        silent, explicit = d.world.clis
        self.assertIn("--model=haiku", silent.argv)
        self.assertIn("--max-budget-usd=2.0", silent.argv)
        self.assertIn("--max-turns=20", silent.argv)
        self.assertIn("--model=claude-sonnet-5-5", explicit.argv)
        self.assertIn("--max-budget-usd=0.5", explicit.argv)
        self.assertIn("--max-turns=3", explicit.argv)


class Cost(DaemonTestCase):
    def test_cost_and_tokens_by_model(self) -> None:
        """Each turn's cost and tokens (its result's per-turn usage) are summed per session and per model."""
        d = self.daemon()
        sid = d.post({"prompt": "a"}).session_id
        d.post({"prompt": "b", "session_id": sid})
        [(model, recorded)] = json.loads(TURN[-1])["model_usage_since_last_result"].items()
        usage = d.call("GET", f"/api/sessions/{sid}")[1]["usage"]
        self.assertEqual((usage["turns"], usage["output_tokens"]), (2, 2 * recorded["outputTokens"]))
        self.assertAlmostEqual(usage["cost_usd"], 2 * recorded["costUSD"])
        response = self.successResultOf(d.http.get("http://localhost/metrics"))
        text = self.successResultOf(d.http.text_content(response))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        self.assertAlmostEqual(samples[("claudesrv_cost_usd_total", (("model", model),))], 2 * recorded["costUSD"])
        self.assertEqual(samples[("claudesrv_tokens_total", (("kind", "input"), ("model", model)))],
                         2 * recorded["inputTokens"])


class ThroughTwistd(TestCase):
    """The options against a real daemon and the fake CLI, which reports the argv and control requests it got."""

    timeout = 60

    @inlineCallbacks
    def test_options_end_to_end(self) -> Any:
        daemon = yield Daemon(self, "--default-model", "haiku").start()
        url = daemon.url + "/api/claude"
        first = yield post(url, {"prompt": "hello"})
        sid = first.session_id
        [call] = daemon.invocations()
        self.assertIn("--model=haiku", call["argv"])

        warm = yield post(url, {"prompt": "again", "session_id": sid, "model": "sonnet", "permission_mode": "plan"})
        self.assertFalse(warm.sse.results()[0]["is_error"])
        turns = daemon.turns()
        self.assertEqual({t["pid"] for t in turns}, {call["pid"]})  # switched, not restarted
        self.assertEqual((turns[-1]["model"], turns[-1]["permission_mode"]), ("claude-sonnet-5-5", "plan"))
        asked = [m["request"] for m in daemon.stdin() if m["type"] == "control_request"]
        self.assertEqual([(r["subtype"], r.get("model", r.get("mode"))) for r in asked][-2:],
                         [("set_model", "sonnet"), ("set_permission_mode", "plan")])

        schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
        png = base64.b64encode(PNG).decode()
        restarted = yield post(url, {
            "session_id": sid, "system_prompt": "You are terse.", "json_schema": schema,
            "include_partial_messages": True, "effort": "low",
            "prompt": [{"type": "text", "text": "what is this?"},
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]})
        [result] = restarted.sse.results()
        self.assertEqual(result["structured_output"], {"answer": "MOCK"})
        self.assertIn("stream_event", [e["type"] for e in restarted.sse.events()])
        turn = daemon.turns()[-1]
        self.assertNotEqual(turn["pid"], call["pid"])
        self.assertEqual((turn["system_prompt"], turn["effort"], turn["images"], turn["prompt"]),
                         ("You are terse.", "low", ["image/png"], "what is this?"))
        argv = daemon.invocations()[-1]["argv"]
        self.assertIn(f"--resume={sid}", argv)
        self.assertIn("--system-prompt-snapshot=off", argv)

        limited = yield post(url, {"prompt": "[[fake tool=Read]] read it", "session_id": sid, "max_turns": 1,
                                   "allowed_tools": ["Read"], "append_system_prompt": "Be brief.",
                                   "max_budget_usd": 5})
        self.assertEqual(limited.sse.results()[0]["subtype"], "error_max_turns")
        turn = daemon.turns()[-1]
        self.assertEqual((turn["append_system_prompt"], turn["max_budget_usd"], turn["system_prompt"]),
                         ("Be brief.", 5.0, None))

        code, session = yield get_json(f"{daemon.url}/api/sessions/{sid}")
        self.assertEqual((code, session["usage"]["turns"]), (200, 4))
        self.assertGreater(session["usage"]["cost_usd"], 0)
        self.assertEqual(session["live_options"]["max_turns"], 1)
        self.assertIn("tokens", daemon.log)
