"""
The fake CLI (tests/fake_claude.py) behaves like the recordings of the real one, so tests built on it
do not pass against a kinder CLI than the one in production.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_claude.py")
FIXTURES = os.path.join(HERE, "fixtures", "claude-cli")
STREAM = ["-p", "--verbose", "--output-format", "stream-json"]


def recording(name: str) -> dict[str, Any]:
    with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
        meta: dict[str, Any] = json.load(f)
    return meta


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class Result:
    def __init__(self, code: int, stdout: bytes, stderr: bytes) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr.decode()

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]


class FakeClaudeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)
        self.env = dict(os.environ, FAKE_STATE_DIR=self.state)
        self.env.pop("FAKE_SCENARIO", None)
        self.env.pop("IS_SANDBOX", None)

    def run_fake(self, *args: str, stdin: bytes | None = None, **env: str) -> Result:
        proc = subprocess.run(
            [sys.executable, FAKE, *args],
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            env={**self.env, **env},
            timeout=20,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, FAKE, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            bufsize=0,
        )
        self.addCleanup(self.reap, proc)
        return proc

    def reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)

    def kill_if_alive(self, pid: int) -> None:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def read_line(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> dict[str, Any]:
        assert proc.stdout is not None
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))
            self.assertTrue(ready, f"no line from the fake within {timeout} s")
            chunk = os.read(proc.stdout.fileno(), 1)
            self.assertTrue(chunk, "the fake closed stdout")
            data += chunk
        line: dict[str, Any] = json.loads(data)
        return line

    def invocations(self) -> list[dict[str, Any]]:
        with open(os.path.join(self.state, "invocations.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def state_file(self, name: str) -> str:
        with open(os.path.join(self.state, name), encoding="utf-8") as f:
            return f.read()

    # ---- argv

    def test_default_run(self) -> None:
        """A plain run prints a_hello's init/assistant/result with one fresh session id and the cwd, exit 0,
        reports what it got in init's "fake" key, and logs the invocation and the session."""
        r = self.run_fake(*STREAM, "hello")
        self.assertEqual(r.code, 0)
        self.assertEqual([line["type"] for line in r.lines], ["system", "assistant", "result"])
        sid = r.lines[0]["session_id"]
        self.assertEqual({line["session_id"] for line in r.lines}, {sid})
        self.assertEqual(r.lines[0]["cwd"], os.getcwd())
        self.assertEqual(
            r.lines[0]["fake"], {"prompt": "hello", "argv": [FAKE, *STREAM, "hello"], "prompt_source": "arg"}
        )
        [call] = self.invocations()
        self.assertEqual((call["session_id"], call["prompt"], call["stdin_kind"]), (sid, "hello", "devnull"))
        self.assertEqual(call["argv"], [FAKE, *STREAM, "hello"])
        self.assertEqual(call["sid"], os.getsid(0))
        self.assertEqual(self.state_file(f"sessions/{sid}"), os.getcwd())

    def test_variadic_option_swallows_the_prompt(self) -> None:
        """--allowedTools takes every following non-option argument, so a prompt after it is lost: exit 1,
        nothing on stdout, the stderr of recording d1_allowed_comma to the byte."""
        r = self.run_fake(*STREAM, "--allowedTools", "Bash,Edit", "USE_BASH d1")
        self.assertEqual((r.code, r.stdout), (1, b""))
        self.assertEqual(r.stderr, recording("d1_allowed_comma")["stderr"])

    def test_dashdash_and_equals_keep_the_prompt(self) -> None:
        """After `--` the prompt arrives verbatim even when it looks like an option; `--allowedTools=a,b`
        takes one value; tool values are recorded as given."""
        r = self.run_fake(*STREAM, "--allowedTools", "Bash(git *)", "Edit", "--", "--help", "ignored")
        self.assertEqual(r.code, 0)
        self.assertEqual(r.lines[0]["fake"]["prompt"], "--help")
        r = self.run_fake(*STREAM, "--allowedTools=Bash,Edit", "USE_BASH d3")
        self.assertEqual((r.code, r.lines[0]["fake"]["prompt"]), (0, "USE_BASH d3"))

    def test_option_errors(self) -> None:
        """The prompt `--help` without `--` prints the help and exits 0; an unknown option, and stream-json
        without --verbose, fail with the real messages and nothing on stdout."""
        r = self.run_fake(*STREAM, "--help")
        self.assertEqual(r.code, 0)
        self.assertTrue(r.stdout.startswith(b"Usage: claude [options] [prompt]"))
        r = self.run_fake(*STREAM, "--bogus", "x")
        self.assertEqual((r.code, r.stdout, r.stderr), (1, b"", "error: unknown option '--bogus'\n"))
        r = self.run_fake("-p", "--output-format", "stream-json", "x")
        self.assertEqual((r.code, r.stdout), (1, b""))
        self.assertIn("requires --verbose", r.stderr)
        r = self.run_fake("--version")
        self.assertEqual((r.code, r.stdout), (0, b"2.1.330 (Claude Code)\n"))

    def test_root_refusal(self) -> None:
        """As root, --dangerously-skip-permissions is refused like recording c1_dsp_root unless IS_SANDBOX
        is exactly "1"."""
        if os.geteuid() != 0:
            self.skipTest("needs root")
        r = self.run_fake(*STREAM, "--dangerously-skip-permissions", "hi", IS_SANDBOX="true")
        c1 = recording("c1_dsp_root")
        self.assertEqual((r.code, r.stdout, r.stderr), (c1["exit_code"], b"", c1["stderr"]))
        self.assertEqual(self.run_fake(*STREAM, "--dangerously-skip-permissions", "hi", IS_SANDBOX="1").code, 0)

    # ---- stdin

    def test_stdin_joins_the_argument(self) -> None:
        """stdin and a prompt argument are joined as "<arg>\\n<stdin>", byte-exact; stdin alone works, also
        for a 1 MiB prompt; an empty or whitespace-only prompt fails with exit 1."""
        r = self.run_fake(*STREAM, "first", stdin="zweite Zeile ünïcode 🚀\r\n ".encode())
        self.assertEqual(r.lines[0]["fake"]["prompt"], "first\nzweite Zeile ünïcode 🚀\r\n ")
        self.assertEqual(r.lines[0]["fake"]["prompt_source"], "both")
        big = ("x" * 1023 + "\n") * 1024
        r = self.run_fake(*STREAM, "--", stdin=big.encode())
        self.assertEqual((r.lines[0]["fake"]["prompt"], r.lines[0]["fake"]["prompt_source"]), (big, "stdin"))
        r = self.run_fake(*STREAM, stdin=b"")
        self.assertEqual((r.code, r.stdout), (1, b""))
        self.assertIn("Input must be provided", r.stderr)
        r = self.run_fake(*STREAM, stdin=b" \n\t")
        self.assertEqual((r.code, r.stdout), (1, b""))
        self.assertIn("only whitespace", r.stderr)

    def test_open_stdin_pipe_warns(self) -> None:
        """A stdin pipe that stays open and silent is given up after FAKE_STDIN_WAIT_MS with the warning of
        recording g11; the run goes on with the argument."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        try:
            proc = subprocess.run(
                [sys.executable, FAKE, *STREAM, "open pipe"],
                stdin=read_end,
                capture_output=True,
                env={**self.env, "FAKE_STDIN_WAIT_MS": "200"},
                timeout=20,
            )
        finally:
            os.close(read_end)
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(proc.stderr.decode(), recording("g11_stdin_pipe_open_with_prompt")["stderr"])
        self.assertEqual(json.loads(proc.stdout.splitlines()[0])["fake"]["prompt_source"], "arg")

    # ---- sessions

    def test_resume(self) -> None:
        """--resume of a known id keeps it (--fork-session gives a new one); an unknown UUID (ids are
        case-sensitive) answers like b4 with that id, a non-UUID like b5 with a new id; both exit 1."""
        sid = self.run_fake(*STREAM, "first").lines[0]["session_id"]
        r = self.run_fake(*STREAM, "--resume", sid, "next")
        self.assertEqual((r.code, r.lines[0]["session_id"]), (0, sid))
        r = self.run_fake(*STREAM, "--resume", sid, "--fork-session", "next")
        self.assertNotEqual(r.lines[0]["session_id"], sid)
        self.assertTrue(os.path.exists(os.path.join(self.state, "sessions", r.lines[0]["session_id"])))

        r = self.run_fake(*STREAM, "--resume", sid.upper(), "next")
        self.assertEqual(r.code, 1)
        [line] = r.lines
        self.assertEqual((line["type"], line["subtype"], line["is_error"]), ("result", "error_during_execution", True))
        self.assertEqual(line["session_id"], sid.upper())
        self.assertEqual(line["errors"], [f"No conversation found with session ID: {sid.upper()}"])
        self.assertEqual(r.stderr, f"No conversation found with session ID: {sid.upper()}\n")

        r = self.run_fake(*STREAM, "--resume", "not-a-uuid", "next")
        self.assertEqual(r.code, 1)
        [line] = r.lines
        self.assertEqual(line["subtype"], "error_during_execution")
        self.assertNotIn(line["session_id"], (sid, "ac67ad53-7db8-48ea-a256-c554f55742ce"))
        self.assertEqual(r.stderr, recording("b5_resume_malformed")["stderr"])

    # ---- signals and failures

    def test_sigint_aborts_gracefully(self) -> None:
        """SIGINT mid-stream: aborted assistant line, "[Request interrupted by user]", a result with
        error_during_execution / aborted_streaming / is_error and the same session id; exit 0; logged."""
        proc = self.start(*STREAM, "[[fake hang=1]]")
        sid = self.read_line(proc)["session_id"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(proc.returncode, 0)
        self.assertEqual([line["type"] for line in lines], ["assistant", "user", "result"])
        self.assertTrue(lines[0]["aborted"])
        self.assertEqual(lines[1]["message"]["content"][0]["text"], "[Request interrupted by user]")
        result = lines[2]
        self.assertEqual(
            (result["subtype"], result["terminal_reason"], result["is_error"], result["session_id"]),
            ("error_during_execution", "aborted_streaming", True, sid),
        )
        self.assertEqual(self.state_file("signals.log"), f"{proc.pid} SIGINT\n")

    def test_sigterm_kills_grandchildren_sigkill_does_not(self) -> None:
        """SIGTERM: the fake kills its Bash-tool-like grandchild (own session) and exits 143 without a result
        line. SIGKILL of the fake's process group leaves such a grandchild running."""
        proc = self.start(*STREAM, "[[fake hang=1 grandchild=1]]")
        self.read_line(proc)
        grandchild = int(self.state_file("grandchildren"))
        self.assertEqual(os.getsid(grandchild), grandchild)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        self.assertEqual((proc.returncode, out), (143, b""))
        self.assertFalse(pid_alive(grandchild))

        os.remove(os.path.join(self.state, "grandchildren"))
        proc = subprocess.Popen(
            [sys.executable, FAKE, *STREAM, "[[fake hang=1 grandchild=1]]"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=self.env,
            bufsize=0,
            start_new_session=True,
        )
        self.addCleanup(self.reap, proc)
        self.read_line(proc)
        grandchild = int(self.state_file("grandchildren"))
        self.addCleanup(self.kill_if_alive, grandchild)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.assertTrue(pid_alive(grandchild))

    def test_stderr_only_failure(self) -> None:
        """no_init=1 exit=N stderr=TEXT: nothing on stdout (no session id), TEXT on stderr, exit N."""
        r = self.run_fake(*STREAM, "[[fake no_init=1 exit=3 stderr=boom_went_the_cli]]")
        self.assertEqual((r.code, r.stdout, r.stderr), (3, b"", "boom went the cli\n"))

    def test_shapes(self) -> None:
        """lines/line_bytes give exact line sizes, session_line delays the session id, block=1 still yields
        the same lines, replay=NAME replays a recording with its exit code under the current session id."""
        r = self.run_fake(*STREAM, "[[fake lines=3 line_bytes=4000 session_line=2 block=1]]")
        self.assertEqual(r.code, 0)
        self.assertNotIn("session_id", r.lines[0])
        self.assertEqual([len(line) for line in r.stdout.splitlines()[2:5]], [4000] * 3)
        self.assertEqual([line["message"]["id"] for line in r.lines[2:5]], [f"msg_fake_{i:08d}" for i in (1, 2, 3)])
        r = self.run_fake(*STREAM, "[[fake replay=g2_fail500_maxretries0]]")
        self.assertEqual((r.code, r.lines[-1]["is_error"], r.lines[-1]["subtype"]), (1, True, "success"))
        self.assertEqual(len({line["session_id"] for line in r.lines}), 1)
        self.assertNotEqual(r.lines[0]["session_id"], "159defd6-8b45-4966-87f4-f8dc97dceba8")

    # ---- credentials

    def test_auth_status(self) -> None:
        """`auth status` answers JSON as JSON.stringify(x, null, 2) writes it, exit 0 when logged in: api_key from
        ANTHROPIC_API_KEY, oauth_token from CLAUDE_CODE_OAUTH_TOKEN, else a /login managed key; FAKE_LOGGED_OUT=1:
        loggedIn false, authMethod none, exit 1. --text says the same in words; other `auth` commands and options
        are refused; the invocation is logged with mode auth."""
        clean = {"ANTHROPIC_API_KEY": "", "ANTHROPIC_AUTH_TOKEN": "", "CLAUDE_CODE_OAUTH_TOKEN": "",
                 "FAKE_LOGGED_OUT": "0", "CLAUDE_CONFIG_DIR": "/cfg"}
        r = self.run_fake("auth", "status", **{**clean, "ANTHROPIC_API_KEY": "sk-ant-x"})
        self.assertEqual(r.code, 0)
        self.assertEqual(r.stdout.decode(), (
            '{\n  "loggedIn": true,\n  "authMethod": "api_key",\n  "apiProvider": "firstParty",\n'
            '  "analyticsDisabled": false,\n  "projectsDirectory": "/cfg/projects",\n  "configDirectory": "/cfg",\n'
            '  "loginExpiresAt": null,\n  "apiKeySource": "ANTHROPIC_API_KEY"\n}\n'))
        r = self.run_fake("auth", "status", "--json", **{**clean, "CLAUDE_CODE_OAUTH_TOKEN": "t"})
        self.assertEqual((r.code, json.loads(r.stdout)["authMethod"], "apiKeySource" in json.loads(r.stdout)),
                         (0, "oauth_token", False))
        status = json.loads(self.run_fake("auth", "status", **clean).stdout)
        self.assertEqual((status["authMethod"], status["apiKeySource"], status["email"]),
                         ("api_key", "/login managed key", None))
        r = self.run_fake("auth", "status", **{**clean, "ANTHROPIC_API_KEY": "sk-ant-x", "FAKE_LOGGED_OUT": "1"})
        status = json.loads(r.stdout)
        self.assertEqual((r.code, status["loggedIn"], status["authMethod"], "apiKeySource" in status),
                         (1, False, "none", False))
        r = self.run_fake("auth", "status", "--text", **{**clean, "FAKE_LOGGED_OUT": "1"})
        self.assertEqual((r.code, r.stdout), (1, b"Not logged in. Run claude auth login to authenticate.\n"))
        r = self.run_fake("auth", "status", "--text", **{**clean, "ANTHROPIC_API_KEY": "sk-ant-x"})
        self.assertEqual((r.code, r.stdout), (0, b"API key: ANTHROPIC_API_KEY\n"))
        self.assertEqual(self.run_fake("auth", "login").code, 1)
        r = self.run_fake("auth", "status", "--verbose")
        self.assertEqual((r.code, r.stderr), (1, "error: unknown option '--verbose'\n"))
        self.assertEqual({call["mode"] for call in self.invocations()}, {"auth"})

    def test_logged_out_print_mode(self) -> None:
        """FAKE_LOGGED_OUT=1 (or auth=none): recording g3's lines (an API 401) as the CLI writes them without
        credentials: init with apiKeySource none, a synthetic assistant line "Not logged in · Please run /login"
        with error authentication_failed, a result success, is_error, api_error, with that text; exit 1."""
        for how in ({"FAKE_LOGGED_OUT": "1"}, {"FAKE_SCENARIO": "auth=none"}):
            r = self.run_fake(*STREAM, "hi [[fake lines=3]]", **how)
            self.assertEqual(r.code, 1, how)
            init, assistant, result = r.lines
            self.assertEqual(init["apiKeySource"], "none")
            self.assertEqual((assistant["message"]["model"], assistant["message"]["content"], assistant["error"],
                              assistant["is_api_error_message"], "api_error_status" in assistant),
                             ("<synthetic>", [{"type": "text", "text": "Not logged in · Please run /login"}],
                              "authentication_failed", True, False))
            self.assertEqual((result["subtype"], result["is_error"], result["terminal_reason"],
                              result["api_error_status"], result["result"], result["total_cost_usd"]),
                             ("success", True, "api_error", None, "Not logged in · Please run /login", 0))
            self.assertEqual({line["session_id"] for line in r.lines}, {init["session_id"]})
        self.assertEqual(self.run_fake(*STREAM, "[[fake auth=some]]").code, 2)


# ---------------------------------------------------------------- SDK streaming mode

SDK_FIXTURES = os.path.join(HERE, "fixtures", "claude-cli-sdk")
SDK = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json"]
STDIO = ["--permission-prompt-tool", "stdio"]
TOOLU = re.compile(r"toolu_[0-9a-f]{24}")
# the recordings' mock magic words, as the fake's knobs (SLOW: see translate)
MAGIC = (
    ("USE_BASH", "tool=Bash"),
    ("TWO_BASH", "tool=Bash,Bash"),
    ("ASK_USER", "tool=AskUserQuestion"),
    ("HANG", "hang=1"),
)


def kind(obj: dict[str, Any]) -> str:
    """type/subtype of a stdout line; for control lines, the subtype of the request or response inside."""
    inner = obj.get({"control_response": "response", "control_request": "request"}.get(obj.get("type", ""), ""))
    sub = inner.get("subtype") if isinstance(inner, dict) else obj.get("subtype")
    return f"{obj.get('type')}/{sub}" if sub else str(obj.get("type"))


def sdk_events(name: str) -> list[dict[str, Any]]:
    with open(os.path.join(SDK_FIXTURES, name + ".jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sdk_meta(name: str) -> dict[str, Any]:
    with open(os.path.join(SDK_FIXTURES, name + ".json"), encoding="utf-8") as f:
        meta: dict[str, Any] = json.load(f)
    return meta


def translate(line: str, slow: str) -> str:
    """A recorded stdin line with the mock's magic words turned into the fake's knobs; SLOW (a reply that
    takes seconds) becomes SLOW."""
    try:
        msg = json.loads(line)
    except ValueError:
        return line
    content = msg.get("message", {}).get("content") if isinstance(msg, dict) else None
    if msg.get("type") != "user" or not isinstance(content, str):
        return line
    knobs = [knob for word, knob in MAGIC if word in content] + ([slow] if "SLOW" in content else [])
    if content.startswith("BASH_CMD: "):
        knobs.append("tool=Bash cmd=" + content[len("BASH_CMD: ") :].replace(" ", "_"))
        if "time.sleep(" in content:  # a command that runs for a while
            knobs.append("tool_ms=30000")
    if not knobs:
        return line
    msg["message"]["content"] = f"{content} [[fake {' '.join(knobs)}]]"
    return json.dumps(msg, separators=(",", ":"))


class SdkProc:
    """One fake in SDK mode over pipes; stdout is read with select, line by line, in the test's thread."""

    def __init__(self, test: SynchronousTestCase, args: list[str], env: dict[str, str], cwd: str) -> None:
        self.test = test
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            bufsize=0,
        )
        test.addCleanup(self.kill)
        self.t0 = time.monotonic()
        self.raw: list[bytes] = []
        self.lines: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.buf = b""
        self.eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except BrokenPipeError:
                pass

    def read(self, timeout: float) -> None:
        """Read what stdout has within TIMEOUT (one chunk)."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        if not ready:
            return
        chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        if not chunk:
            self.eof = True
        self.buf += chunk
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            self.raw.append(line)
            self.lines.append(json.loads(line))
            self.times.append(time.monotonic() - self.t0)

    def wait_lines(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and not self.eof and time.monotonic() < deadline:
            self.read(deadline - time.monotonic())
        self.test.assertGreaterEqual(
            len(self.lines), n, f"{n} lines expected, got {[kind(x) for x in self.lines]} (eof={self.eof})"
        )

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], start: int = 0, timeout: float = 10) -> int:
        """The index of the first line from START on for which PRED holds."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.lines):
                if pred(self.lines[i]):
                    return i
                i += 1
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                self.test.fail(f"no such line from {start} on: {[kind(x) for x in self.lines[start:]]}")
            self.read(left)

    def wait_kind(self, k: str, start: int = 0, timeout: float = 10) -> dict[str, Any]:
        return self.lines[self.wait_for(lambda o: kind(o) == k, start, timeout)]

    def quiet(self, seconds: float) -> bool:
        """True if nothing came on stdout for SECONDS."""
        n = len(self.lines)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.eof:
            self.read(deadline - time.monotonic())
        return len(self.lines) == n and not self.buf

    def send(self, data: str | dict[str, Any]) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
        except BrokenPipeError:
            pass

    def user(self, text: str, uuid: str | None = None) -> None:
        msg: dict[str, Any] = {
            "type": "user",
            "message": {"role": "user", "content": text},
            "parent_tool_use_id": None,
            "session_id": "default",
        }
        if uuid:
            msg["uuid"] = uuid
        self.send(msg)

    def control(self, request_id: str, subtype: str, **fields: Any) -> None:
        self.send({"type": "control_request", "request_id": request_id, "request": {"subtype": subtype, **fields}})

    def answer(self, request_id: str, response: dict[str, Any]) -> None:
        self.send(
            {
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": response},
            }
        )

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def finish(self, timeout: float = 10) -> tuple[int, str]:
        """Close stdin, read stdout to EOF; (exit code, stderr)."""
        self.close()
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self.read(deadline - time.monotonic())
        self.test.assertTrue(self.eof, "stdout still open")
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read()
        return self.proc.wait(timeout=timeout), stderr.decode()

    def results(self) -> list[dict[str, Any]]:
        return [x for x in self.lines if x.get("type") == "result"]


class FakeSdkModeTests(SynchronousTestCase):
    """SDK streaming mode (no -p, --input-format stream-json) against the recordings of the real CLI."""

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.state)
        os.makedirs(self.cwd)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
        self.env.update(FAKE_STATE_DIR=self.state, IS_SANDBOX="1")

    def start(self, *args: str, **env: str) -> SdkProc:
        return SdkProc(self, list(args), {**self.env, **env}, self.cwd)

    def state_file(self, name: str) -> str:
        with open(os.path.join(self.state, name), encoding="utf-8") as f:
            return f.read()

    def invocations(self) -> list[dict[str, Any]]:
        return self.state_lines("invocations.jsonl")

    def kill_if_alive(self, pid: int) -> None:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    def state_lines(self, name: str) -> list[dict[str, Any]]:
        path = os.path.join(self.state, name)
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    # ---- conformance with the recordings

    def replay(self, name: str) -> tuple[SdkProc, list[dict[str, Any]]]:
        """Drive the fake with recording NAME's stdin, in the recording's order relative to its stdout, and
        hold its stdout, stderr and exit code to the recording's. Thread-safe: own state directory and cwd.
        The fake (ended) and the recorded stdout lines, for more checks."""
        state, cwd = os.path.join(self.state, name), os.path.join(self.cwd, name)
        os.makedirs(os.path.join(state, "sessions"))
        os.makedirs(cwd)
        process = sdk_meta(name)["processes"][-1]  # s06: the SDK process after a -p run
        events = sdk_events(name)
        spawns = [i for i, e in enumerate(events) if e["dir"] == "event" and '"spawn"' in e["line"]]
        events = events[spawns[-1] :]
        workspace = json.dumps(cwd)[1:-1]
        expected = [json.loads(e["line"].replace("<WORKSPACE>", workspace)) for e in events if e["dir"] == "out"]
        expected_err = "".join(e["line"] + "\n" for e in events if e["dir"] == "err")
        argv = process["argv"][1:]
        flagged = [a.split("=", 1)[1] for a in argv if a.startswith("--session-id=")]
        resumed = [a.split("=", 1)[1] for a in argv if a.startswith("--resume=")]
        for known in resumed + (flagged if name == "s11c_session_id_reuse" else []):  # sessions that exist
            with open(os.path.join(state, "sessions", known), "w") as f:
                f.write(cwd)
        # SLOW turns: a hang where the recording interrupts them, else a reply that takes 0.3 s per line
        interrupted = any('"interrupt"' in e["line"] for e in events if e["dir"] == "in")
        slow = "hang=1" if interrupted else "delay_ms=300"
        fake = SdkProc(self, argv, {**self.env, "FAKE_STATE_DIR": state}, cwd)
        ids: dict[str, str] = {}
        seen = 0
        for event in events:
            if event["dir"] == "out":
                seen += 1
                continue
            if event["dir"] == "err":
                continue
            what = json.loads(event["line"])["event"] if event["dir"] == "event" else "in"
            if what not in ("in", "signal_sent", "stdin_closed"):
                continue
            if process["exit_code"] == 0 or seen:
                fake.wait_lines(seen)
            for recorded_line, fake_line in zip(expected[:seen], fake.lines, strict=False):
                if recorded_line.get("type") == "control_request":
                    ids[recorded_line["request_id"]] = fake_line["request_id"]
            if what == "in":
                line = translate(event["line"], slow)
                for recorded, mine in ids.items():
                    line = line.replace(recorded, mine)
                fake.send(line)
            elif what == "signal_sent":
                fake.proc.send_signal(getattr(signal, json.loads(event["line"])["signal"]))
            else:
                fake.close()
        code, stderr = fake.finish()
        got = fake.lines
        self.assertEqual([kind(x) for x in got], [kind(x) for x in expected], name)
        self.assertEqual((code, stderr), (process["exit_code"], expected_err), name)
        for want, have in zip(expected, got, strict=True):
            where = f"{name}: {kind(want)}"
            self.assertEqual(set(have) - {"fake"}, set(want), where)
            if kind(want).startswith(("control_response/", "control_request/")):
                inner = "response" if want["type"] == "control_response" else "request"
                self.assertEqual(set(have[inner]), set(want[inner]), where)
                if isinstance(want[inner].get("response"), dict):
                    self.assertEqual(set(have[inner]["response"]), set(want[inner]["response"]), where)
                if "pending_permission_requests" in want[inner]:  # initialize: this process, its open request
                    self.assertEqual(have[inner]["response"]["pid"], fake.pid, where)
                    asked = [x for x in got if kind(x) == "control_request/can_use_tool"]
                    self.assertEqual(
                        have[inner]["pending_permission_requests"],
                        asked[-1:] if want[inner]["pending_permission_requests"] else [],
                        where,
                    )
            if kind(want) == "system/init":
                self.assertEqual(have["tools"], want["tools"], where)
                self.assertEqual(have["cwd"], cwd, where)
                self.assertEqual(have["fake"]["pid"], fake.pid, where)
            if want.get("type") == "user":  # tool results and interruption markers, word for word
                self.assertEqual(
                    TOOLU.sub("toolu_X", json.dumps([have["message"], have.get("tool_use_result")])),
                    TOOLU.sub("toolu_X", json.dumps([want["message"], want.get("tool_use_result")])),
                    where,
                )
            if want.get("type") == "assistant":
                parts = [{k: v for k, v in c.items() if k != "id"} for c in want["message"]["content"]]
                if parts[0]["type"] == "tool_use" or want.get("aborted"):
                    self.assertEqual(
                        [{k: v for k, v in c.items() if k not in ("id", "text")} for c in have["message"]["content"]],
                        [{k: v for k, v in c.items() if k != "text"} for c in parts],
                        where,
                    )
            if kind(want) == "control_request/can_use_tool":
                self.assertEqual(
                    {k: v for k, v in have["request"].items() if k != "tool_use_id"},
                    {k: v for k, v in want["request"].items() if k != "tool_use_id"},
                    where,
                )
            if want.get("type") == "result":
                for key in ("subtype", "is_error", "terminal_reason", "stop_reason", "num_turns", "errors"):
                    self.assertEqual(have.get(key), want.get(key), f"{where} {key}")
                self.assertEqual(
                    [d["tool_name"] for d in have["permission_denials"]],
                    [d["tool_name"] for d in want["permission_denials"]],
                    where,
                )
        results, recorded_results = fake.results(), [x for x in expected if x.get("type") == "result"]
        self.assertEqual([r["result_index"] for r in results], [r["result_index"] for r in recorded_results], name)
        costs = [r["total_cost_usd"] for r in results]
        self.assertEqual(costs, sorted(set(costs)), f"{name}: total_cost_usd grows with every result")
        per_turn = [next(iter(r["model_usage_since_last_result"].values()))["costUSD"] for r in results]
        for i, cost in enumerate(costs):
            self.assertAlmostEqual(cost, sum(per_turn[: i + 1]), 9)
        sids = {x["session_id"] for x in got if "session_id" in x}
        self.assertLessEqual(len(sids), 1, name)
        if (flagged or resumed) and sids:
            self.assertEqual(sids, {(flagged or resumed)[0]}, name)
        return fake, expected

    def test_conformance(self) -> None:
        """For every replayable SDK recording, the fake answers the recorded stdin (magic words as knobs)
        with the same sequence of line kinds, the same keys in every line (and inside control lines),
        the same tool inputs, permission requests, tool results and result fields, the same result_index
        sequence, a cumulative total_cost_usd, one session id (the --session-id one when given), and the
        same exit code and stderr."""
        names = (
            "s01_init_three_turns",
            "s01b_no_initialize",
            "s01c_idle_before_first_message",
            "s02a_cut_allow_updated_input",
            "s02b_cut_deny_message",
            "s02b2_cut_deny_interrupt",
            "s02c_cut_no_answer_70s",
            "s02c2_cut_no_answer_600s",
            "s02d_cut_interrupt_pending",
            "s02e_cut_allow_updated_permissions",
            "s02e2_cut_allow_session_rule",
            "s02e3_cut_allow_whole_tool_rule",
            "s02f_cut_bare_allow",
            "s02g_cut_two_tools",
            "s02h_no_ppt_tool_use",
            "s02i_cut_reinitialize_pending",
            "s03a_interrupt_slow",
            "s03b_interrupt_hang_partial",
            "s03c_interrupt_idle",
            "s03d_interrupt_during_bash",
            "s04a_queued_message",
            "s04b_two_queued_with_uuid",
            "s04c_queued_then_interrupt",
            "s04d_interrupt_cancel_queued",
            "s05_set_mode_model_misc",
            "s05b_bypass_as_root",
            "s06_resume_warm",
            "s07a_eof_after_result",
            "s07b_eof_midturn",
            "s07c_sigint_idle",
            "s07d_sigterm_idle",
            "s07e_sigint_midturn",
            "s07f_eof_pending_permission",
            "s09_ask_user_question",
            "s10_bad_stdin_lines",
            "s10b_blank_and_unknown_type",
            "s11a_session_id_flag",
            "s11b_session_id_resume",
            "s11c_session_id_reuse",
        )
        with ThreadPoolExecutor(max_workers=6) as pool:
            for future in [pool.submit(self.replay, name) for name in names]:
                future.result()

    # ---- knobs and behaviour the daemon's tests rely on

    def test_hang_interrupt_then_next_turn(self) -> None:
        """hang=1 stops after system/init; an interrupt request gets {"still_queued":[]}, then the aborted
        assistant line, "[Request interrupted by user]" and an aborted_streaming result; the same process
        (same pid, same session) then takes the next turn, whose prompt the model sees after the marker."""
        fake = self.start(*SDK)
        fake.user("wait [[fake hang=1]]")
        init = fake.wait_kind("system/init")
        self.assertTrue(fake.quiet(0.2))
        fake.control("req_1", "interrupt")
        n = fake.wait_for(lambda x: x.get("type") == "result")
        self.assertEqual(
            [kind(x) for x in fake.lines[1:]],
            ["control_response/success", "assistant", "user", "result/error_during_execution"],
        )
        self.assertEqual(
            fake.lines[1]["response"], {"subtype": "success", "request_id": "req_1", "response": {"still_queued": []}}
        )
        self.assertTrue(fake.lines[2]["aborted"])
        self.assertEqual(
            fake.lines[3]["message"]["content"], [{"type": "text", "text": "[Request interrupted by user]"}]
        )
        aborted = fake.lines[n]
        self.assertEqual(
            (aborted["terminal_reason"], aborted["is_error"], aborted["result_index"]), ("aborted_streaming", True, 0)
        )
        self.assertIsNone(fake.proc.poll())
        fake.user("again")
        second = fake.wait_kind("system/init", n + 1)
        result = fake.wait_kind("result/success", n + 1)
        self.assertEqual((second["fake"]["pid"], second["fake"]["turn"], init["fake"]["pid"]), (fake.pid, 1, fake.pid))
        self.assertEqual(result["result_index"], 1)
        self.assertTrue(result["result"].startswith("MOCK-REPLY: [Request interrupted by user]\n\nagain [len="))
        self.assertEqual({x["session_id"] for x in fake.lines if "session_id" in x}, {init["session_id"]})
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual(
            [(t["pid"], t["turn"]) for t in self.state_lines("turns.jsonl")], [(fake.pid, 0), (fake.pid, 1)]
        )

    def test_die_crash_and_no_result(self) -> None:
        """die=N exits N right after the turn's first assistant line (no result); no_result=1 writes the
        turn without its result and exits 0; crash=1 dies by SIGSEGV after system/init, leaving its
        grandchild (grandchild=1: `sleep 1000` in its own session) running."""
        fake = self.start(*SDK)
        fake.user("first [[fake die=3 lines=2]]")
        self.assertEqual(fake.finish(), (3, ""))
        self.assertEqual([kind(x) for x in fake.lines], ["system/init", "assistant"])
        fake = self.start(*SDK)
        fake.user("ok")
        fake.wait_kind("result/success")
        fake.user("then [[fake no_result=1]]")
        code, _ = fake.finish()
        self.assertEqual(
            (code, [kind(x) for x in fake.lines]),
            (0, ["system/init", "assistant", "result/success", "system/init", "assistant"]),
        )
        fake = self.start(*SDK)
        fake.user("boom [[fake crash=1 grandchild=1]]")
        self.assertEqual(fake.finish()[0], -signal.SIGSEGV)
        grandchild = int(self.state_file("grandchildren"))
        self.addCleanup(self.kill_if_alive, grandchild)
        self.assertTrue(pid_alive(grandchild))

    def test_tool_permission_allow_and_deny(self) -> None:
        """tool=Bash with --permission-prompt-tool stdio: assistant text, tool_use, then a can_use_tool
        request (UUID id) that waits for the host. allow + updatedInput runs the changed input (tools.jsonl)
        and ends success with 2 model calls; deny + message gives an error tool_result with exactly that
        message and the call in permission_denials; cmd= sets the command ('_' = space)."""
        fake = self.start(*SDK, *STDIO, "--session-id=6a1e1ee5-0000-4000-8000-000000000001")
        fake.user("do it [[fake tool=Bash]]")
        request = fake.wait_kind("control_request/can_use_tool")
        self.assertRegex(
            request["request_id"], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
        )
        self.assertEqual(
            request["request"]["input"], {"command": "echo hi > file.txt", "description": "Write hi to file.txt"}
        )
        self.assertEqual(
            [kind(x) for x in fake.lines], ["system/init", "assistant", "assistant", "control_request/can_use_tool"]
        )
        self.assertTrue(fake.quiet(0.3))  # no time-out, no heartbeat
        changed = {"command": "echo changed", "description": "host"}
        fake.answer(request["request_id"], {"behavior": "allow", "updatedInput": changed})
        result = fake.wait_kind("result/success")
        tool_result = fake.lines[4]
        self.assertEqual(tool_result["message"]["content"][0]["content"], "(Bash completed with no output)")
        self.assertEqual((result["num_turns"], result["permission_denials"]), (2, []))
        [ran] = self.state_lines("tools.jsonl")
        self.assertEqual((ran["tool_name"], ran["input"]), ("Bash", changed))

        fake.user("again [[fake tool=Bash cmd=rm_-rf_build]]")
        request = fake.wait_kind("control_request/can_use_tool", 6)
        self.assertEqual(request["request"]["input"], {"command": "rm -rf build", "description": "mock command"})
        fake.answer(request["request_id"], {"behavior": "deny", "message": "Host says no"})
        result = fake.wait_kind("result/success", 7)
        denied = fake.lines[-3]["message"]["content"][0]
        self.assertEqual((denied["content"], denied["is_error"]), ("Host says no", True))
        self.assertEqual(
            result["permission_denials"],
            [{"tool_name": "Bash", "tool_use_id": denied["tool_use_id"], "tool_input": request["request"]["input"]}],
        )
        self.assertEqual(result["result_index"], 1)
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual(len(self.state_lines("tools.jsonl")), 1)

        # stdin closed right after the message, before (or while) the request is open: s07f's ending
        fake = self.start(*SDK, *STDIO)
        fake.user("last [[fake tool=Bash delay_ms=50]]")
        fake.close()
        self.assertEqual(fake.finish(), (0, ""))
        closed = fake.lines[-3]["message"]["content"][0]["content"]
        self.assertEqual(
            closed, "Tool permission request failed: AbortError: Tool permission stream closed before response received"
        )
        self.assertEqual(fake.results()[0]["subtype"], "success")

    def test_two_tools_in_one_message(self) -> None:
        """s02g (tool=Bash,Bash), driven by the recording's stdin: the same line kinds in the same order (the
        first can_use_tool before the second tool_use line, the second only after the first tool_result), two
        tool_use ids in one message, the recorded inputs, one request per call in order, and a final line and
        result listing both results; permissions.jsonl and tools.jsonl get one line per call."""
        fake, expected = self.replay("s02g_cut_two_tools")
        inputs = []
        for lines in (fake.lines, expected):
            blocks = [(x["message"]["id"], c) for x in lines if kind(x) == "assistant" for c in x["message"]["content"]]
            self.assertEqual(len({msg for msg, _ in blocks[:3]}), 1)  # text and both tool_uses: one message
            tool_uses = [c for _, c in blocks if c["type"] == "tool_use"]
            ids = [c["id"] for c in tool_uses]
            self.assertEqual(len(set(ids)), 2)
            inputs.append([c["input"] for c in tool_uses])
            asked = [i for i, x in enumerate(lines) if kind(x) == "control_request/can_use_tool"]
            ran = [i for i, x in enumerate(lines) if kind(x) == "user"]
            self.assertLess(ran[0], asked[1])  # the second request only after the first tool_result
            self.assertEqual([lines[i]["request"]["tool_use_id"] for i in asked], ids)
            self.assertEqual([lines[i]["message"]["content"][0]["tool_use_id"] for i in ran], ids)
        self.assertEqual(inputs[0], inputs[1])
        final = [TOOLU.sub("toolu_X", lines[-2]["message"]["content"][0]["text"]) for lines in (fake.lines, expected)]
        self.assertEqual(final[0], final[1])
        state = os.path.join(self.state, "s02g_cut_two_tools")
        with open(os.path.join(state, "permissions.jsonl"), encoding="utf-8") as f:
            self.assertEqual([json.loads(line)["tool_name"] for line in f], ["Bash", "Bash"])
        with open(os.path.join(state, "tools.jsonl"), encoding="utf-8") as f:
            self.assertEqual([json.loads(line)["input"] for line in f], inputs[1])

    def test_two_tools_deny_interrupt_and_interrupt_pending(self) -> None:
        """tool=Bash,Bash: a deny + interrupt of the first call ends the turn (aborted_tools, the first call
        denied) without asking about the second; cmd= is the first Bash's command, the second keeps s02g's.
        An interrupt while the first request is open cancels it and ends the turn the same way. A first call
        allowed without asking prints both tool_use lines before its tool_result, then the second is asked."""
        fake = self.start(*SDK, *STDIO)
        fake.user("go [[fake tool=Bash,Bash cmd=rm_-rf_build]]")
        request = fake.wait_kind("control_request/can_use_tool")
        self.assertEqual(request["request"]["input"], {"command": "rm -rf build", "description": "mock command"})
        fake.wait_lines(5)
        second = fake.lines[4]["message"]["content"][0]
        self.assertEqual(second["input"], {"command": "echo two > two.txt", "description": "write two.txt"})
        fake.answer(request["request_id"], {"behavior": "deny", "message": "no", "interrupt": True})
        n = fake.wait_for(lambda x: x.get("type") == "result")
        self.assertEqual(
            [kind(x) for x in fake.lines],
            ["system/init", "assistant", "assistant", "control_request/can_use_tool", "assistant"]
            + ["user", "user", "result/error_during_execution"],
        )
        result = fake.lines[n]
        self.assertEqual(result["terminal_reason"], "aborted_tools")
        self.assertEqual([d["tool_use_id"] for d in result["permission_denials"]], [request["request"]["tool_use_id"]])

        fake.user("again [[fake tool=Bash,Bash]]")
        request = fake.wait_kind("control_request/can_use_tool", n + 1)
        fake.control("req_1", "interrupt")
        m = fake.wait_for(lambda x: x.get("type") == "result", n + 1)
        self.assertEqual(
            [kind(x) for x in fake.lines[n + 1 :]],
            ["system/init", "assistant", "assistant", "control_request/can_use_tool", "assistant"]
            + ["control_cancel_request", "control_response/success", "user", "user", "result/error_during_execution"],
        )
        self.assertEqual(fake.lines[n + 6]["request_id"], request["request_id"])
        self.assertEqual(fake.lines[m]["terminal_reason"], "aborted_tools")
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual(len(self.state_lines("permissions.jsonl")), 2)
        self.assertEqual(self.state_lines("tools.jsonl"), [])

        fake = self.start(*SDK, *STDIO, "--allowedTools=Read")
        fake.user("mixed [[fake tool=Read,Bash]]")
        request = fake.wait_kind("control_request/can_use_tool")
        self.assertEqual(
            [kind(x) for x in fake.lines],
            ["system/init", "assistant", "assistant", "assistant", "user", "control_request/can_use_tool"],
        )
        fake.answer(request["request_id"], {"behavior": "allow"})
        result = fake.wait_kind("result/success")
        self.assertEqual((result["num_turns"], result["permission_denials"]), (3, []))
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual([t["tool_name"] for t in self.state_lines("tools.jsonl")], ["Read", "Bash"])

    def test_tool_allowed_without_asking(self) -> None:
        """A tool named in --allowedTools (=VALUE, repeated, or the variadic form ended by --) or any tool
        under --dangerously-skip-permissions runs with no can_use_tool; without --permission-prompt-tool
        stdio a tool is auto-denied (system/permission_denied + an error tool_result, s02h)."""
        variants = (
            ["--allowedTools=Read", "--allowedTools=Bash"],
            ["--allowedTools", "Read", "Bash", "--"],
            ["--allowedTools=Read,Bash"],
            ["--dangerously-skip-permissions"],
        )
        fakes = [self.start(*SDK, *STDIO, *args) for args in variants]
        for fake in fakes:
            fake.user("go [[fake tool=Bash]]")
        for args, fake in zip(variants, fakes, strict=True):
            fake.wait_kind("result/success")
            self.assertEqual(fake.finish(), (0, ""))
            self.assertEqual(
                [kind(x) for x in fake.lines],
                ["system/init", "assistant", "assistant", "user", "assistant", "result/success"],
                args,
            )
            meta = fake.lines[3]["tool_result_meta"][0]["permission_decision"]
            self.assertEqual(meta["source"], "config", args)
        turns = {t["pid"]: t for t in self.state_lines("turns.jsonl")}
        self.assertEqual([turns[f.pid]["allowed_tools"] for f in fakes], [["Read", "Bash"]] * 3 + [[]])
        self.assertEqual([turns[f.pid]["skip_permissions"] for f in fakes], [False] * 3 + [True])
        fake = self.start(*SDK)
        fake.user("go [[fake tool=Bash]]")
        result = fake.wait_kind("result/success")
        self.assertIn("system/permission_denied", [kind(x) for x in fake.lines])
        self.assertEqual([d["tool_name"] for d in result["permission_denials"]], ["Bash"])
        self.assertEqual(fake.finish(), (0, ""))

    def test_queued_messages_merge_into_one_turn(self) -> None:
        """Messages written while a turn runs are queued; when it ends they run as ONE turn whose prompt is
        their texts joined by a newline (list content: the text blocks), with one result; stdin EOF lets
        the queued turn finish before exit 0."""
        fake = self.start(*SDK)
        fake.user("slow [[fake delay_ms=300]]")
        fake.wait_kind("system/init")
        fake.user("A")
        fake.send({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": "B"}]}})
        fake.close()
        code, _ = fake.finish()
        self.assertEqual(code, 0)
        inits = [x for x in fake.lines if kind(x) == "system/init"]
        self.assertEqual([i["fake"]["prompt"] for i in inits], ["slow [[fake delay_ms=300]]", "A\nB"])
        self.assertEqual([r["result_index"] for r in fake.results()], [0, 1])
        self.assertEqual([t["prompt"] for t in self.state_lines("turns.jsonl")], ["slow [[fake delay_ms=300]]", "A\nB"])

    def test_logged_out_turn(self) -> None:
        """auth=none makes one turn the answer without credentials (init with apiKeySource none, the synthetic
        assistant line, an error result that costs nothing, the message's uuid keys where the CLI puts them); the
        process takes the next turn as usual. FAKE_LOGGED_OUT=1 makes every turn so."""
        fake = self.start(*SDK)
        fake.user("one")
        fake.user("two [[fake auth=none tool=Bash]]", uuid="11111111-1111-4111-8111-111111111111")
        fake.wait_for(lambda x: x.get("type") == "result", fake.wait_for(lambda x: x.get("type") == "result") + 1)
        fake.user("three")
        self.assertEqual(fake.finish(), (0, ""))
        first, second, third = fake.results()
        self.assertEqual((second["is_error"], second["terminal_reason"], second["result"], second["result_index"]),
                         (True, "api_error", "Not logged in · Please run /login", 1))
        self.assertEqual((second["total_cost_usd"], second["modelUsage"], second["model_usage_since_last_result"]),
                         (first["total_cost_usd"], {}, {}))
        self.assertEqual(second["user_message_uuids"], ["11111111-1111-4111-8111-111111111111"])
        self.assertEqual(list(second)[list(second).index("uuid") + 1], "user_message_uuid")
        at = fake.lines.index(second)
        init, assistant = fake.lines[at - 2 : at]
        self.assertEqual((kind(init), init["apiKeySource"]), ("system/init", "none"))
        self.assertEqual((assistant["message"]["model"], assistant["error"], assistant["user_message_uuid"]),
                         ("<synthetic>", "authentication_failed", "11111111-1111-4111-8111-111111111111"))
        self.assertEqual((third["is_error"], third["result_index"]), (False, 2))
        self.assertEqual(fake.lines[fake.lines.index(third) - 2]["apiKeySource"], "ANTHROPIC_API_KEY")
        out = self.start(*SDK, FAKE_LOGGED_OUT="1")
        out.user("a")
        out.user("b")
        self.assertEqual(out.finish(), (0, ""))
        self.assertEqual([r["result"] for r in out.results()], ["Not logged in · Please run /login"] * 2)
        self.assertEqual([r["total_cost_usd"] for r in out.results()], [0, 0])

    def test_state_files(self) -> None:
        """invocations.jsonl gets one line per process (mode sdk, argv, session id, CLAUDESRV_* markers) at
        start; stdin.jsonl every stdin line as received; turns.jsonl one line per turn with the tool options;
        sessions/<id> appears with the first turn. Nothing is printed before the host writes."""
        fake = self.start(*SDK, "--allowedTools=Bash(git *)", "--disallowedTools", "Write", "--", CLAUDESRV_MARK="m1")
        self.assertTrue(fake.quiet(0.3))
        [call] = self.invocations()
        self.assertEqual(
            (call["mode"], call["pid"], call["argv"][1:], call["env"]["CLAUDESRV_MARK"]),
            ("sdk", fake.pid, [*SDK, "--allowedTools=Bash(git *)", "--disallowedTools", "Write", "--"], "m1"),
        )
        sid = call["session_id"]
        fake.control("r1", "initialize")
        fake.wait_kind("control_response/success")
        self.assertFalse(os.path.exists(os.path.join(self.state, "sessions", sid)))
        fake.send("")
        fake.send('{"type":"user","message":{"role":"user","content":"one"}}\r')
        fake.wait_kind("result/success")
        self.assertEqual(self.state_file(f"sessions/{sid}"), self.cwd)
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual(
            self.state_lines("stdin.jsonl"),
            [
                {
                    "pid": fake.pid,
                    "line": '{"type": "control_request", "request_id": "r1", "request": {"subtype": "initialize"}}',
                },
                {"pid": fake.pid, "line": ""},
                {"pid": fake.pid, "line": '{"type":"user","message":{"role":"user","content":"one"}}\r'},
            ],
        )
        [turn] = self.state_lines("turns.jsonl")
        self.assertEqual(
            {
                k: turn[k]
                for k in (
                    "pid",
                    "session_id",
                    "prompt",
                    "turn",
                    "allowed_tools",
                    "disallowed_tools",
                    "skip_permissions",
                )
            },
            {
                "pid": fake.pid,
                "session_id": sid,
                "prompt": "one",
                "turn": 0,
                "allowed_tools": ["Bash(git *)"],
                "disallowed_tools": ["Write"],
                "skip_permissions": False,
            },
        )
        self.assertNotIn("Write", fake.lines[1]["tools"])

    def test_session_ids(self) -> None:
        """--session-id=ID is used as given and recorded at the first turn; a second process with the same
        --session-id is refused (stderr, exit 1, no stdout: s11c); --resume=ID keeps ID; --resume of an
        unknown UUID prints nothing until the host writes, then b4's one error result line, exit 1."""
        sid = "5e551011-0000-4000-8000-00000000abcd"
        fake = self.start(*SDK, f"--session-id={sid}")
        fake.user("hello")
        self.assertEqual(fake.wait_kind("result/success")["session_id"], sid)
        self.assertEqual(fake.finish(), (0, ""))
        again = self.start(*SDK, f"--session-id={sid}")
        self.assertEqual(again.finish(), (1, f"Error: Session ID {sid} is already in use.\n"))
        self.assertEqual(again.raw, [])
        resumed = self.start(*SDK, f"--resume={sid}")
        resumed.user("more")
        self.assertEqual(resumed.wait_kind("result/success")["session_id"], sid)
        self.assertEqual(resumed.finish(), (0, ""))
        unknown = "0bad0bad-0000-4000-8000-000000000000"
        refused = self.start(*SDK, f"--resume={unknown}")
        self.assertTrue(refused.quiet(0.3))
        refused.user("hello")
        code, stderr = refused.finish()
        [line] = refused.lines
        self.assertEqual((code, line["type"], line["is_error"], line["session_id"]), (1, "result", True, unknown))
        self.assertEqual(stderr, f"No conversation found with session ID: {unknown}\n")

    def test_signals_and_grandchildren(self) -> None:
        """SIGTERM exits 143 and SIGHUP 129 with nothing printed, killing the grandchild; with
        ignore_signals=1 (from that turn on) SIGINT/SIGTERM are only logged and an interrupt request
        still ends the hung turn; SIGINT idle exits 0 silently."""
        fake = self.start(*SDK)
        fake.user("bg [[fake grandchild=1]]")
        fake.wait_kind("result/success")
        grandchild = int(self.state_file("grandchildren"))
        self.addCleanup(self.kill_if_alive, grandchild)
        self.assertEqual(os.getsid(grandchild), grandchild)
        fake.proc.send_signal(signal.SIGTERM)
        self.assertEqual(fake.finish(), (143, ""))
        self.assertFalse(pid_alive(grandchild))
        fake = self.start(*SDK)
        fake.control("r1", "initialize")
        fake.wait_kind("control_response/success")
        fake.proc.send_signal(signal.SIGHUP)
        self.assertEqual(fake.finish()[0], 129)
        fake = self.start(*SDK)
        fake.user("stubborn [[fake hang=1 ignore_signals=1]]")
        fake.wait_kind("system/init")
        fake.proc.send_signal(signal.SIGTERM)
        fake.proc.send_signal(signal.SIGINT)
        self.assertTrue(fake.quiet(0.2))
        self.assertIsNone(fake.proc.poll())
        fake.control("r2", "interrupt")
        self.assertEqual(fake.wait_kind("result/error_during_execution")["terminal_reason"], "aborted_streaming")
        fake.proc.send_signal(signal.SIGTERM)
        self.assertTrue(fake.quiet(0.2))
        fake.proc.kill()
        logged = [line for line in self.state_file("signals.log").splitlines() if line.startswith(f"{fake.pid} ")]
        self.assertEqual(sorted(logged), [f"{fake.pid} SIGINT", f"{fake.pid} SIGTERM", f"{fake.pid} SIGTERM"])
        fake = self.start(*SDK)
        fake.user("hi")
        fake.wait_kind("result/success")
        fake.proc.send_signal(signal.SIGINT)
        fake.wait_lines(3)
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual(len(fake.lines), 3)

    def test_output_shapes_and_startup(self) -> None:
        """lines/line_bytes/giant give exact line sizes (block=1 and split=1 change only the writes),
        reply= sets the final text; FAKE_STARTUP_MS delays the first answer (from spawn), which comes
        within a few tens of ms without it."""
        fake = self.start(*SDK)
        started = time.monotonic()
        fake.control("r1", "initialize")
        fake.wait_lines(1)
        fast = time.monotonic() - started
        fake.user("[[fake lines=3 line_bytes=3000 block=1]]")
        fake.user("[[fake giant=3000000 split=1 reply=all_done]]")
        fake.close()
        self.assertEqual(fake.finish(), (0, ""))
        sizes = [len(line) for line in fake.raw]
        self.assertEqual(sizes[2:5], [3000] * 3)
        self.assertEqual(sizes[7], 3000000)
        self.assertEqual([r["result"] for r in fake.results()][1], "all done")
        self.assertEqual(fake.lines[8]["message"]["content"][0]["text"], "all done")
        slow = self.start(*SDK, FAKE_STARTUP_MS="400")
        slow.control("r1", "initialize")
        slow.wait_lines(1)
        self.assertGreaterEqual(slow.times[0], 0.4)
        self.assertLess(fast, 0.4)
        self.assertEqual(slow.finish(), (0, ""))

    def test_argv_errors(self) -> None:
        """SDK mode needs --output-format stream-json and --verbose, and a UUID for --session-id; the errors
        are the real CLI's, with nothing on stdout and exit 1."""
        cases = (
            (
                ["--input-format", "stream-json", "--output-format", "text", "--verbose"],
                "Error: --input-format=stream-json requires output-format=stream-json.\n",
            ),
            (
                ["--input-format", "stream-json", "--output-format", "stream-json"],
                "Error: When using --print, --output-format=stream-json requires --verbose\n",
            ),
            ([*SDK, "--session-id", "nope"], "Error: Invalid session ID. Must be a valid UUID.\n"),
        )
        fakes = [self.start(*args) for args, _ in cases]
        for (args, message), fake in zip(cases, fakes, strict=True):
            self.assertEqual(fake.finish(), (1, message), args)
            self.assertEqual(fake.raw, [])

    # ---- the daemon's spawn options (--model ... --include-partial-messages) and image blocks

    def test_spawn_options_recorded(self) -> None:
        """Every spawn option in --option=value form (values may start with '-') is accepted and shown in
        system/init's "fake" key and in turns.jsonl; --model and --permission-mode set init's model and mode;
        image blocks of a user message are recorded by media type while the reply is computed from the text
        blocks alone. A process without them records the defaults."""
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
        options = [
            "--model=sonnet",
            "--permission-mode=acceptEdits",
            "--effort=xhigh",
            "--system-prompt=-You are terse.",
            "--append-system-prompt=--and kind",
            "--system-prompt-snapshot=off",
            "--max-turns=3",
            "--max-budget-usd=2.5",
            f"--json-schema={json.dumps(schema)}",
            "--include-partial-messages",
        ]
        fake = self.start(*SDK, *STDIO, "--session-id=0b7e0000-0000-4000-8000-000000000001", *options, "--")
        plain = self.start(*SDK)
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        jpeg = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
        content = [{"type": "text", "text": "look"}, image, {"type": "text", "text": "here"}, jpeg]
        fake.send({"type": "user", "message": {"role": "user", "content": content}})
        plain.user("hi")
        result = fake.wait_kind("result/success")
        plain.wait_kind("result/success")
        self.assertEqual((fake.finish(), plain.finish()), ((0, ""), (0, "")))
        shown = {
            "effort": "xhigh",
            "system_prompt": "-You are terse.",
            "append_system_prompt": "--and kind",
            "system_prompt_snapshot": "off",
            "max_turns": 3,
            "max_budget_usd": 2.5,
            "json_schema": schema,
            "include_partial_messages": True,
            "images": ["image/png", "image/jpeg"],
        }
        init = fake.lines[0]
        self.assertEqual({k: init["fake"][k] for k in shown}, shown)
        self.assertEqual((init["model"], init["permissionMode"]), ("claude-sonnet-5-5", "acceptEdits"))
        reply = fake.wait_kind("assistant")
        self.assertEqual(reply["message"]["model"], "claude-sonnet-5-5")
        self.assertTrue(result["result"].startswith("MOCK-REPLY: look\nhere [len=9 sha256="))
        self.assertEqual(reply["message"]["content"][0]["text"], result["result"])
        rows = {row["pid"]: row for row in self.state_lines("turns.jsonl")}
        row = rows[fake.pid]
        self.assertEqual({k: row[k] for k in shown}, shown)
        self.assertEqual(
            (row["prompt"], row["model"], row["permission_mode"]), ("look\nhere", "claude-sonnet-5-5", "acceptEdits")
        )
        defaults = {k: rows[plain.pid][k] for k in shown}
        self.assertEqual(
            defaults, {**dict.fromkeys(shown), "include_partial_messages": False, "images": []}, "plain process"
        )
        self.assertNotIn("stream_event", [x["type"] for x in plain.lines])
        self.assertNotIn("begun_message_ids", plain.results()[0])

    def test_include_partial_messages_like_s03b(self) -> None:
        """--include-partial-messages, driven like recording s03b (initialize, a hung reply interrupted, the
        next turn): the same line kinds and stream_event types in the same order, the same keys in every line
        and in every event, 40-character text deltas (the next turn's word for word), message ids tying the
        events to their assistant line, the aborted line holding what was streamed, message_stop's
        abandoned_blocks after the interrupt, and begun_message_ids in the results. A tool turn streams each
        content block (a guess: not recorded) and a system/status requesting line before each model call."""
        recorded = [json.loads(e["line"]) for e in sdk_events("s03b_interrupt_hang_partial") if e["dir"] == "out"]
        fake = self.start(*SDK, "--include-partial-messages")
        fake.control("req_1", "initialize")
        fake.user("HANG please [[fake hang=1]]")
        fake.wait_for(lambda x: x.get("event", {}).get("type") == "content_block_delta")
        fake.control("req_2", "interrupt")
        n = fake.wait_for(lambda x: x.get("type") == "result")
        fake.user("hello after interrupting a hang")
        fake.wait_for(lambda x: x.get("type") == "result", n + 1)
        self.assertEqual(fake.finish(), (0, ""))

        def shape(line: dict[str, Any]) -> tuple[Any, ...]:
            event = line.get("event", {})
            return kind(line), event.get("type"), event.get("delta", {}).get("type"), sorted(event)

        got = fake.lines
        self.assertEqual([shape(x) for x in got], [shape(x) for x in recorded])
        for have, want in zip(got, recorded, strict=True):
            self.assertEqual(set(have) - {"fake"}, set(want), kind(want))
            for key in ("message", "delta", "content_block", "usage"):
                if key in want.get("event", {}):
                    self.assertEqual(set(have["event"][key]), set(want["event"][key]), key)

        def deltas(lines: list[dict[str, Any]], start: int) -> list[str]:
            found = []
            for x in lines[start:]:
                if x.get("event", {}).get("type") == "content_block_delta":
                    found.append(x["event"]["delta"]["text"])
                if x.get("type") == "assistant":
                    return found
            return found

        first = deltas(got, 0)
        self.assertEqual([len(t) for t in first], [40])
        aborted = next(x for x in got if x.get("aborted"))
        self.assertEqual(aborted["message"]["content"][0]["text"], first[0])
        stop = got[n - 1]
        self.assertEqual(stop["abandoned_blocks"], {"api_message_id": aborted["message"]["id"], "from_block_index": 1})
        second = deltas(got, n + 1)
        self.assertEqual(second, deltas(recorded, n + 1))
        reply = next(x for x in got[n + 1 :] if x.get("type") == "assistant")
        self.assertEqual("".join(second), reply["message"]["content"][0]["text"])
        ids = {x["api_message_id"] for x in got[n + 1 :] if x["type"] == "stream_event"}
        self.assertEqual(ids, {reply["message"]["id"]})
        self.assertEqual(
            [r["begun_message_ids"] for r in fake.results()], [[aborted["message"]["id"]], [reply["message"]["id"]]]
        )

        fake = self.start(*SDK, "--include-partial-messages", "--dangerously-skip-permissions")
        fake.user("go [[fake tool=Bash]]")
        result = fake.wait_kind("result/success")
        self.assertEqual(fake.finish(), (0, ""))
        events = [x["event"]["type"] if x["type"] == "stream_event" else kind(x) for x in fake.lines]
        block = ["content_block_start", "content_block_delta", "assistant", "content_block_stop"]
        final = ["message_start", "content_block_start", *["content_block_delta"] * 4, "assistant"]
        self.assertEqual(
            events,
            ["system/init", "system/status", "message_start", *block, *block, "message_delta", "message_stop"]
            + ["user", "system/status", *final, "content_block_stop", "message_delta", "message_stop"]
            + ["result/success"],
        )
        stops = [
            x["event"]["delta"]["stop_reason"] for x in fake.lines if x.get("event", {}).get("type") == "message_delta"
        ]
        self.assertEqual(stops, ["tool_use", "end_turn"])
        self.assertEqual(len(result["begun_message_ids"]), 2)

    def test_max_turns_ends_a_tool_turn(self) -> None:
        """--max-turns=1 and a tool turn (2 model calls): the tool runs, then the turn ends like print-mode
        recording i6_max_turns_1_tool (same line kinds, result keys, error_max_turns, is_error, errors,
        num_turns 2, the cost of one call); the process stays and its next turn works; a turn of one call
        is not limited."""
        i6 = [json.loads(line) for line in open(os.path.join(FIXTURES, "i6_max_turns_1_tool.jsonl"), "rb")]
        fake = self.start(*SDK, "--max-turns=1", "--dangerously-skip-permissions")
        fake.user("USE_BASH i6 [[fake tool=Bash]]")
        n = fake.wait_for(lambda x: x.get("type") == "result")
        fake.user("next")
        result = fake.wait_kind("result/success", n + 1)
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual([kind(x) for x in fake.lines[: n + 1]], [kind(x) for x in i6])
        stopped, want = fake.lines[n], i6[-1]
        self.assertEqual(set(stopped), set(want))
        for key in ("subtype", "is_error", "terminal_reason", "stop_reason", "num_turns", "errors"):
            self.assertEqual(stopped[key], want[key], key)
        one_call = next(iter(stopped["model_usage_since_last_result"].values()))["costUSD"]
        self.assertAlmostEqual(stopped["total_cost_usd"], one_call)
        self.assertEqual(len(self.state_lines("tools.jsonl")), 1)
        self.assertEqual((result["result_index"], result["num_turns"], result["is_error"]), (1, 1, False))
        self.assertEqual({t["pid"] for t in self.state_lines("turns.jsonl")}, {fake.pid})

    def test_json_schema_structured_output(self) -> None:
        """--json-schema: the result gets structured_output, right after "result": the simplest object the
        schema allows (a guess: every property, required or not; the first enum value; nested objects filled
        in). A value that is not a JSON object is refused with exit 1 and nothing on stdout (a guess)."""
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "count": {"type": "integer"},
                "score": {"type": "number"},
                "ok": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "mood": {"enum": ["calm", "busy"]},
                "inner": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
            },
            "required": ["name"],
        }
        fake = self.start(*SDK, f"--json-schema={json.dumps(schema)}")
        bad = self.start(*SDK, "--json-schema={not json")
        fake.user("structured")
        result = fake.wait_kind("result/success")
        self.assertEqual(fake.finish(), (0, ""))
        self.assertEqual(
            result["structured_output"],
            {"name": "MOCK", "count": 0, "score": 0, "ok": False, "tags": [], "mood": "calm", "inner": {"x": "MOCK"}},
        )
        keys = list(result)
        self.assertEqual(keys.index("structured_output"), keys.index("result") + 1)
        code, stderr = bad.finish()
        self.assertEqual((code, bad.raw), (1, []))
        self.assertTrue(stderr.startswith("Error: Invalid JSON in --json-schema: "), stderr)

    def test_max_budget_usd(self) -> None:
        """--max-budget-usd=X (a guess, not recorded): when total_cost_usd after a model call exceeds X the turn
        ends with result subtype error_max_budget_usd, is_error true, the process staying; a tool turn whose
        first call exceeds it ends before its tools run."""
        fake = self.start(*SDK, "--max-budget-usd=0.015")
        tools = self.start(*SDK, "--max-budget-usd=0.005", "--dangerously-skip-permissions")
        fake.user("one")
        fake.user("two")
        tools.user("go [[fake tool=Bash]]")
        fake.close()
        self.assertEqual((fake.finish(), tools.finish()), ((0, ""), (0, "")))
        first, second = fake.results()
        self.assertEqual((first["subtype"], first["is_error"]), ("success", False))
        self.assertEqual(
            (second["subtype"], second["is_error"], second["result_index"]), ("error_max_budget_usd", True, 1)
        )
        self.assertGreater(second["total_cost_usd"], 0.015)
        self.assertEqual(second["errors"], ["Reached maximum budget ($0.015)"])
        self.assertEqual(
            [kind(x) for x in tools.lines], ["system/init", "assistant", "assistant", "result/error_max_budget_usd"]
        )
        self.assertEqual(self.state_lines("tools.jsonl"), [])

    def test_spawn_option_errors(self) -> None:
        """Bad values are refused before anything is printed, exit 1: --effort and --system-prompt-snapshot
        like commander refuses other choices (--effort's text is a guess, its help lists the levels without
        "choices:"), --max-turns and --max-budget-usd that are not positive numbers (guessed texts). The same
        options are accepted in print mode."""
        cases = (
            (
                "--effort=extreme",
                "error: option '--effort <level>' argument 'extreme' is invalid. Allowed choices are low, medium, "
                "high, xhigh, max.\n",
            ),
            (
                "--system-prompt-snapshot=maybe",
                "error: option '--system-prompt-snapshot <on|off>' argument 'maybe' is invalid. Allowed choices are "
                "on, off.\n",
            ),
            (
                "--max-turns=0",
                "error: option '--max-turns <turns>' argument '0' is invalid. --max-turns must be a positive integer\n",
            ),
            (
                "--max-budget-usd=lots",
                "error: option '--max-budget-usd <amount>' argument 'lots' is invalid. --max-budget-usd must be a "
                "positive number\n",
            ),
        )
        fakes = [self.start(*SDK, arg) for arg, _ in cases]
        printed = self.start("-p", "--verbose", "--output-format=stream-json", "--effort=low", "--max-turns=2")
        for (arg, message), fake in zip(cases, fakes, strict=True):
            self.assertEqual(fake.finish(), (1, message), arg)
            self.assertEqual(fake.raw, [], arg)
        printed.send("hello")
        code, _ = printed.finish()
        self.assertEqual((code, kind(printed.lines[-1])), (0, "result/success"))
