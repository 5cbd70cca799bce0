"""
The fake CLI (tests/fake_claude.py) behaves like the recordings of the real one, so tests built on it
do not pass against a kinder CLI than the one in production.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
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
