#!/usr/bin/env python3
"""A stand-in for the ``claude`` CLI (Claude Code 2.1.330) that replays real recordings.

The recordings are in ``tests/fixtures/claude-cli/`` (``NAME.jsonl``: the real CLI's stdout, ``NAME.json``:
its argv, exit code, stderr and timings; see ``/work/shared/docs/claude-cli.md``). Python 3.11 standard
library only; start-up does nothing heavy before the first line.

Arguments, parsed the way the real CLI's commander parser does
--------------------------------------------------------------
``-p/--print``, ``--verbose``, ``--output-format FMT`` (text|json|stream-json), ``--input-format FMT``
(text|stream-json), ``-r/--resume [ID]``, ``--fork-session``, ``--dangerously-skip-permissions``,
``--permission-mode MODE``, ``--allowedTools/--allowed-tools`` and ``--disallowedTools/--disallowed-tools``
(VARIADIC: every following argument that does not start with ``-`` is one more value; ``--opt=value`` takes
exactly one value), ``--model X``, ``--max-turns N``, ``--include-partial-messages``, ``-v/--version``
(prints ``2.1.330 (Claude Code)``, exit 0), ``-h/--help`` (the real help text of recording
e1_prompt_dashdash_help, exit 0, also when it stands where a prompt was meant), ``--`` (everything after it
is an operand). ``--opt=value`` and ``-rVALUE`` work as in commander. The prompt is the first operand;
further operands are ignored (so is everything after ``-- PROMPT``).

Errors, with the real CLI's texts (nothing on stdout):
  unknown option                 ``error: unknown option '<opt>'``, exit 1
  option value missing           ``error: option '<flags>' argument missing``, exit 1
  value not among the choices    ``error: option '<flags>' argument '<v>' is invalid. Allowed ...``, exit 1
  stream-json without --verbose  ``Error: When using --print, --output-format=stream-json requires --verbose``
  no prompt at all               ``Error: Input must be provided either through stdin or as a prompt ...``,
                                 preceded by ``"<v>" was read as a value of --allowedTools, not as a
                                 prompt · put a prompt before --allowedTools or after --`` when a variadic
                                 tool option swallowed a value after its first one (recording
                                 d1_allowed_comma), exit 1
  whitespace-only prompt         ``Error: Input contained only whitespace. ...``, exit 1
  root + --dangerously-skip-permissions (or --permission-mode bypassPermissions) without IS_SANDBOX=1
                                 stderr and exit code of recording c1_dsp_root
  fake limitations               no ``-p``, or an output format other than stream-json: a ``fake_claude:``
                                 message and exit 2; so do bad knob values (below)

Prompt: the operand and/or stdin. Stdin is read to EOF unless it is a TTY; with an operand too the prompt
is ``<operand>\\n<stdin>``. A pipe or socket that delivers nothing (not even EOF) for FAKE_STDIN_WAIT_MS
gets the real CLI's warning (recording g11) and the run goes on without stdin; a pipe with data that is
never closed blocks for ever, as with the real CLI. Bytes that are not UTF-8 become U+FFFD.
``--input-format stream-json``: every stdin line ``{"type":"user","message":{"content":...}}`` is one turn
answered with its own init ... result (recording i10), all with one session id; exit code of the last turn.

Sessions
--------
New runs get a fresh uuid4. ``--resume ID``: a value that is not a UUID (8-4-4-4-12 hex, any case) is
answered like recording b5_resume_malformed (one result line with a NEW random session_id, stderr, exit 1);
a UUID not in ``$FAKE_STATE_DIR/sessions/`` (case-sensitive) like b4_resume_unknown_uuid (the id as given,
exit 1); a known one keeps its id (``--fork-session`` or knob new_id=1: a new id). Without FAKE_STATE_DIR
every UUID counts as known. ``--resume`` with no value is treated as the malformed value "" (a guess).

Output
------
Lines of a recording (default a_hello: init, assistant text, result), each written with ONE os.write like
the real CLI, with session_id replaced by the current id, the recording's cwd by os.getcwd(), and fresh
``uuid`` and ``timestamp`` values. Every ``system/init`` line gets an extra key
``"fake": {"prompt": ..., "argv": [...the whole argv...], "prompt_source": "arg"|"stdin"|"both"}``.
A broken stdout pipe is ignored and the run goes on (like the real CLI).

State (all optional, under ``$FAKE_STATE_DIR``)
------------------------------------------------
``invocations.jsonl``  one JSON line per run, written before the first stdout line (or at exit): argv
                       (the whole argv, argv[0] too), cwd, prompt, prompt_source, stdin_kind (tty, devnull, chr, fifo,
                       sock, file, closed, other), stdin_timed_out, pid, ppid, pgid, sid, env (IS_SANDBOX,
                       CLAUDE_CONFIG_DIR, every CLAUDESRV_* and FAKE_MARK* variable), scenario (the knobs),
                       session_id, resume, started_at (time.time() at start).
``sessions/<id>``      one file per session id handed out (content: the cwd).
``signals.log``        ``<pid> <SIGNAME>`` per signal received (SIGINT, SIGTERM, SIGHUP).
``grandchildren``      one pid per line (knob grandchild).

Signals
-------
SIGINT: like recording g23_sigINT_midstream_hang: an aborted assistant line, a user line
``[Request interrupted by user]``, a result with ``subtype: error_during_execution``,
``terminal_reason: aborted_streaming``, ``is_error: true``; grandchildren killed; exit 0 (after the result
line was written: no more lines, exit 0). SIGTERM: grandchildren killed, exit 143, no result line.
SIGHUP: grandchildren killed, exit 129. SIGKILL leaves grandchildren running (their own session).

Environment
-----------
FAKE_STATE_DIR       state directory (above); unset: no state is kept
FAKE_TIME_SCALE      0 (default): no pauses; S: sleep S x the recording's own gaps before each line and
                     after the last one (line_times_s of NAME.json, else the lines evenly spread over the
                     first 80 % of the time between first_stdout_line_s and wall_s_to_exit)
FAKE_STDIN_WAIT_MS   3000: how long an open, silent stdin pipe is waited for
FAKE_SCENARIO        knobs as ``key=value key=value`` (``[[fake ...]]`` around it is optional)
FAKE_FIXTURES_DIR    where the recordings are (default: fixtures/claude-cli next to this file)

Knobs (scenario)
----------------
A tag ``[[fake key=value ...]]`` anywhere in the prompt (the first tag counts), merged key by key over
FAKE_SCENARIO; the prompt wins. Unknown keys and non-integer values: message on stderr, exit 2.
  replay=NAME              replay recording NAME instead of a_hello: its lines, stderr and exit code
  lines=N                  N generated assistant lines (id ``msg_fake_%08d``) in place of the recording's
                           lines between init and result
  line_bytes=B             each generated line exactly B bytes without the newline (at least ~530: shorter
                           asks give the bare frame); default a short text. line_bytes alone means lines=1
  delay_ms=D               sleep D ms before each line after the init line
  init_delay_ms=D          sleep D ms before the first line
  giant=BYTES              one more assistant line of exactly BYTES bytes (id msg_fake_00000000) right after
                           init, written in 1 MiB os.write pieces
  split=1                  write each line in up to 9 pieces (the newline alone) with 1 ms sleeps between
  block=1                  buffer stdout and write 64 KiB chunks regardless of line boundaries (the rest is
                           flushed before every pause, hang, crash and exit); wins over split
  hang=1                   after the init line and any generated lines (the recording's other lines are
                           left out), wait for ever (until a signal)
  no_init=1                nothing at all on stdout (no session id); exit code default 1
  exit=N                   exit code (default: the recording's); with exit != 0 the result says is_error
  stderr=TEXT              TEXT ('_' stands for a space) written to stderr before the first stdout line
  no_result=1              no result line
  crash=1                  like hang, but die by SIGSEGV instead of waiting (grandchildren survive)
  ignore_signals=1         SIGINT, SIGTERM and SIGHUP are only logged; only SIGKILL stops the fake
  grandchild=1             before the first line, start ``sleep 1000`` in a new session with stdio on
                           /dev/null (like the real CLI's Bash tool); killed on SIGINT, SIGTERM, SIGHUP
                           and normal exit, not on SIGKILL or crash
  result_then_linger_ms=D  stay alive D ms after the result line (the real CLI: 100-600 ms)
  session_line=K           the session id first appears on line K: K-1 ``system/status`` lines without a
                           session_id come first
  new_id=1                 ``--resume`` of a known id answers with a new id (as CLI versions before 2.1.330
                           did, and --fork-session still does); the new id is recorded as a session too
"""

import json
import os
import re
import select
import signal
import stat
import sys
import time
from bisect import bisect_right
from typing import NoReturn

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get("FAKE_FIXTURES_DIR") or os.path.join(HERE, "fixtures", "claude-cli")
VERSION = "2.1.330 (Claude Code)"
DEFAULT_RECORDING = "a_hello"

MSG_NO_INPUT = "Error: Input must be provided either through stdin or as a prompt argument when using --print"
MSG_WHITESPACE = (
    "Error: Input contained only whitespace. Provide a prompt with text through stdin or as a prompt "
    "argument when using --print"
)
MSG_NEEDS_VERBOSE = "Error: When using --print, --output-format=stream-json requires --verbose"

INT_KNOBS = frozenset(
    (
        "lines",
        "line_bytes",
        "delay_ms",
        "init_delay_ms",
        "giant",
        "split",
        "block",
        "hang",
        "no_init",
        "exit",
        "no_result",
        "crash",
        "ignore_signals",
        "grandchild",
        "result_then_linger_ms",
        "session_line",
        "new_id",
    )
)
STR_KNOBS = frozenset(("replay", "stderr"))

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SID_RE = re.compile(rb'"session_id":"([0-9a-f-]{36})"')
CWD_RE = re.compile(rb'"cwd":"((?:[^"\\]|\\.)*)"')
LINE_UUID_RE = re.compile(rb'"uuid":"[0-9a-f-]{36}"')
STAMP_RE = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"')
INIT_PREFIX = b'{"type":"system","subtype":"init"'

MIB = 1 << 20
BLOCK = 64 * 1024


# ---------------------------------------------------------------- small helpers


def jdump(obj: object) -> bytes:
    """Compact JSON as the CLI writes it: UTF-8, with U+2028/U+2029 escaped."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode("utf-8")


def jstr(text: str) -> bytes:
    """A JSON string's inside (no quotes)."""
    return jdump(text)[1:-1]


def new_uuid() -> str:
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def stamp() -> bytes:
    now = time.time()
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z".encode()


def write_fd(fd: int, data: bytes | bytearray | memoryview) -> bool:
    """Write everything (one os.write unless the kernel takes less). False if the fd is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            return False
        view = view[n:]
    return True


def err(text: str) -> None:
    if text:
        write_fd(2, (text if text.endswith("\n") else text + "\n").encode("utf-8", "replace"))


def getcwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return os.environ.get("PWD", "/")


# ---------------------------------------------------------------- run state, output, signals


class Out:
    """stdout: one os.write per line (``line``), small pieces (``split``) or 64 KiB chunks (``block``)."""

    def __init__(self) -> None:
        self.mode = "line"
        self.buf = bytearray()
        self.dead = False

    def raw(self, data: bytes | bytearray | memoryview) -> None:
        if not self.dead and not write_fd(1, data):
            self.dead = True  # like the real CLI: ignore EPIPE and run to the end

    def line(self, data: bytes, piece: int = 0) -> None:
        """Write one line (``data`` ends with a newline)."""
        log_invocation()
        if self.mode == "block":
            self.buf += data
            full = len(self.buf) // BLOCK * BLOCK
            if full:
                with memoryview(self.buf) as view:
                    for off in range(0, full, BLOCK):
                        self.raw(view[off : off + BLOCK])
                del self.buf[:full]
        elif self.mode == "split" and len(data) > 1:
            body = len(data) - 1
            step = max(64, -(-body // 8))
            cuts = list(range(0, body, step)) + [body]
            for a, b in zip(cuts, cuts[1:] + [len(data)], strict=True):
                self.raw(data[a:b])
                if b < len(data):
                    time.sleep(0.001)
        elif piece:
            with memoryview(data) as view:
                for off in range(0, len(data), piece):
                    self.raw(view[off : off + piece])
        else:
            self.raw(data)

    def flush(self) -> None:
        if self.buf:
            self.raw(self.buf)
            self.buf.clear()


class Run:
    """Everything the signal handlers need to see."""

    def __init__(self) -> None:
        self.state_dir = os.environ.get("FAKE_STATE_DIR") or None
        self.out = Out()
        self.interrupted = False
        self.ignore_signals = False
        self.result_written = False
        self.silent = False
        self.logged = False
        self.grandchildren: list[int] = []
        self.record: dict[str, object] = {}
        self.wake_fd = -1


RUN = Run()


def state_path(*parts: str) -> str | None:
    if RUN.state_dir is None:
        return None
    path = os.path.join(RUN.state_dir, *parts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def append_state(name: str, data: bytes) -> None:
    path = state_path(name)
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_fd(fd, data)
        finally:
            os.close(fd)


def log_invocation() -> None:
    """Append the invocation record once, before the first stdout line or at exit."""
    if RUN.logged:
        return
    RUN.logged = True
    append_state("invocations.jsonl", jdump(RUN.record) + b"\n")


def kill_grandchildren() -> None:
    while RUN.grandchildren:
        pid = RUN.grandchildren.pop()
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass


def finish(code: int) -> NoReturn:
    RUN.out.flush()
    log_invocation()
    kill_grandchildren()
    os._exit(code)


def fail(message: str, code: int = 1) -> NoReturn:
    err(message)
    finish(code)


def on_signal(signum: int, frame: object) -> None:
    append_state("signals.log", f"{os.getpid()} {signal.Signals(signum).name}\n".encode())
    if RUN.ignore_signals:
        return
    if signum == signal.SIGINT:
        RUN.interrupted = True
        return
    kill_grandchildren()
    log_invocation()
    os._exit(143 if signum == signal.SIGTERM else 129)


def setup_signals() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    RUN.wake_fd = r
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def nap(seconds: float) -> None:
    """Sleep; return early when a SIGINT asks for an abort. Ignored signals do not cut it short."""
    if seconds <= 0:
        return
    RUN.out.flush()
    deadline = time.monotonic() + seconds
    while not RUN.interrupted:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select([RUN.wake_fd], [], [], None if left == float("inf") else left)
        if ready:
            try:
                os.read(RUN.wake_fd, 512)
            except OSError:
                pass


def spawn_grandchild() -> None:
    """``sleep 1000`` in a new session, stdio on /dev/null: the real CLI's Bash tool processes."""
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            fd = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(fd, target)
            os.closerange(3, 65536)
            os.execvp("sleep", ["sleep", "1000"])
        finally:
            os._exit(127)
    RUN.grandchildren.append(pid)
    append_state("grandchildren", f"{pid}\n".encode())


# ---------------------------------------------------------------- recordings


class Recording:
    def __init__(self, name: str) -> None:
        paths = [os.path.join(FIXTURES, name + ext) for ext in (".json", ".jsonl")]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not all(os.path.isfile(p) for p in paths):
            fail(f"fake_claude: no recording named {name!r} in {FIXTURES}", 2)
        with open(paths[0], encoding="utf-8") as f:
            self.meta: dict[str, object] = json.load(f)
        with open(paths[1], "rb") as f:
            data = f.read()
        self.lines = data.split(b"\n")
        if self.lines and self.lines[-1] == b"":
            self.lines.pop()
        found = SID_RE.search(data)
        self.session_id = found.group(1) if found else None
        found = CWD_RE.search(data)
        self.cwd = found.group(1) if found else None

    @property
    def stderr(self) -> str:
        return str(self.meta.get("stderr") or "")

    @property
    def exit_code(self) -> int:
        value = self.meta.get("exit_code")
        return value if isinstance(value, int) else 0

    def times(self) -> tuple[list[float], float]:
        """Seconds from start to each line, and to the exit."""
        n = len(self.lines)
        first = self.meta.get("first_stdout_line_s")
        first_s = float(first) if isinstance(first, (int, float)) else 0.0
        wall = self.meta.get("wall_s_to_exit")
        wall_s = max(first_s, float(wall)) if isinstance(wall, (int, float)) else first_s
        given = self.meta.get("line_times_s")
        if isinstance(given, list) and len(given) == n:
            return [float(t) for t in given], wall_s
        if n <= 1:
            return [first_s] * n, wall_s
        span = (wall_s - first_s) * 0.8
        return [first_s + span * i / (n - 1) for i in range(n)], wall_s

    def personalize(self, line: bytes, sid: str, fake: bytes | None = None) -> bytes:
        """The line with this run's session id, cwd, uuids and timestamps (and the fake key on init)."""
        if self.session_id:
            line = line.replace(self.session_id, sid.encode())
        if self.cwd:
            line = line.replace(self.cwd, jstr(getcwd()))
        line = LINE_UUID_RE.sub(lambda _: b'"uuid":"' + new_uuid().encode() + b'"', line)
        line = STAMP_RE.sub(lambda _: b'"timestamp":"' + stamp() + b'"', line)
        if fake is not None and line.startswith(INIT_PREFIX) and line.endswith(b"}"):
            line = line[:-1] + b',"fake":' + fake + b"}"
        return line


# ---------------------------------------------------------------- generated lines

_WORDS = (
    "the relay streams every line from stdout to the client as an event session workspace resume tool "
    "result assistant bytes chunk buffer pipe frame server process exit code"
).split()
_WORDS += ["\\n", '\\"quoted\\"', "\\\\path", "\\t", "\\u2028", "café", "naïve", "日本語", "こんにちは", "🚀", "λ", "→"]


class Filler:
    """Deterministic JSON-string filler, cut only between tokens (valid UTF-8 and valid JSON)."""

    def __init__(self) -> None:
        parts: list[bytes] = []
        self.bounds = [0]
        size, x = 0, 2463534242
        while size < BLOCK:
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            token = _WORDS[(x >> 8) % len(_WORDS)].encode() + (b". " if x % 11 == 0 else b" ")
            parts.append(token)
            size += len(token)
            self.bounds.append(size)
        self.pattern = b"".join(parts)

    def make(self, n: int, seq: int) -> bytes:
        out: list[bytes] = []
        pos = self.bounds[(seq * 7919) % (len(self.bounds) - 1)]
        size = len(self.pattern)
        while n > 0:
            if n >= size - pos:
                out.append(self.pattern[pos:])
                n -= size - pos
                pos = 0
            else:
                cut = self.bounds[bisect_right(self.bounds, pos + n) - 1]
                out.append(self.pattern[pos:cut] + b" " * (pos + n - cut))
                n = 0
        return b"".join(out)


_FILLER: list[Filler] = []


def assistant_line(seq: int, size: int | None, total: int, sid: str) -> bytes:
    """An assistant text line shaped like a_hello's; exactly ``size`` bytes when given (and large enough)."""
    head = (
        b'{"type":"assistant","message":{"id":"msg_fake_%08d","type":"message","role":"assistant",'
        b'"model":"claude-opus-5-5","content":[{"type":"text","text":"' % seq
    )
    tail = (
        b'"}],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":2723,"output_tokens":1,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0},"context_management":null},'
        b'"parent_tool_use_id":null,"session_id":"'
        + sid.encode()
        + b'","uuid":"'
        + new_uuid().encode()
        + b'","timestamp":"'
        + stamp()
        + b'","request_id":"req_fake_%08d"}' % seq
    )
    if size is None:
        text = b"Fake reply line %d of %d." % (seq, total)
    else:
        if not _FILLER:
            _FILLER.append(Filler())
        text = _FILLER[0].make(max(0, size - len(head) - len(tail)), seq)
    return head + text + tail


def status_line() -> bytes:
    return b'{"type":"system","subtype":"status","status":"requesting","uuid":"' + new_uuid().encode() + b'"}'


# ---------------------------------------------------------------- argv


class Opts:
    def __init__(self) -> None:
        self.print_mode = False
        self.verbose = False
        self.output_format = "text"
        self.input_format = "text"
        self.resume: str | None = None
        self.resume_given = False
        self.fork_session = False
        self.skip_permissions = False
        self.permission_mode: str | None = None
        self.allowed_tools: list[str] | None = None
        self.disallowed_tools: list[str] | None = None
        self.model: str | None = None
        self.max_turns: str | None = None
        self.include_partial_messages = False
        self.operands: list[str] = []
        self.unknown: list[str] = []
        self.swallowed: tuple[str, str] | None = None  # (value, option) a variadic option took after its first


class Spec:
    def __init__(self, attr: str, kind: str, label: str, choices: tuple[str, ...] = (), listed: str = "") -> None:
        self.attr, self.kind, self.label, self.choices = attr, kind, label, choices
        self.listed = listed or ", ".join(choices)


_PERMISSION_MODES = ("default", "acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan")
SPECS: dict[str, Spec] = {}
for _flags, _spec in (
    (("-p", "--print"), Spec("print_mode", "bool", "-p, --print")),
    (("--verbose",), Spec("verbose", "bool", "--verbose")),
    (("--output-format",), Spec("output_format", "value", "--output-format <format>", ("text", "json", "stream-json"))),
    (("--input-format",), Spec("input_format", "value", "--input-format <format>", ("text", "stream-json"))),
    (("-r", "--resume"), Spec("resume", "optional", "-r, --resume [value]")),
    (("--fork-session",), Spec("fork_session", "bool", "--fork-session")),
    (("--dangerously-skip-permissions",), Spec("skip_permissions", "bool", "--dangerously-skip-permissions")),
    (
        ("--permission-mode",),
        Spec(
            "permission_mode", "value", "--permission-mode <mode>", _PERMISSION_MODES, ", ".join(_PERMISSION_MODES[1:])
        ),
    ),
    (
        ("--allowedTools", "--allowed-tools"),
        Spec("allowed_tools", "variadic", "--allowedTools, --allowed-tools <tools...>"),
    ),
    (
        ("--disallowedTools", "--disallowed-tools"),
        Spec("disallowed_tools", "variadic", "--disallowedTools, --disallowed-tools <tools...>"),
    ),
    (("--model",), Spec("model", "value", "--model <model>")),
    (("--max-turns",), Spec("max_turns", "value", "--max-turns <turns>")),
    (("--include-partial-messages",), Spec("include_partial_messages", "bool", "--include-partial-messages")),
    (("-v", "--version"), Spec("version", "version", "-v, --version")),
):
    for _flag in _flags:
        SPECS[_flag] = _spec


def emit_option(opts: Opts, spec: Spec, value: str | None) -> None:
    if spec.kind == "bool":
        setattr(opts, spec.attr, True)
    elif spec.kind == "version":
        log_invocation()
        write_fd(1, (VERSION + "\n").encode())
        finish(0)
    elif spec.kind == "variadic":
        values: list[str] = getattr(opts, spec.attr) or []
        values.append(value or "")
        setattr(opts, spec.attr, values)
    else:
        if spec.choices and value not in spec.choices:
            fail(f"error: option '{spec.label}' argument '{value}' is invalid. Allowed choices are {spec.listed}.")
        setattr(opts, spec.attr, value)
        if spec.attr == "resume":
            opts.resume_given = True


def parse_argv(args: list[str]) -> Opts:
    """commander's parseOptions, for the options above."""
    opts = Opts()
    dest = opts.operands
    rest = list(args)
    variadic: Spec | None = None

    def maybe_option(arg: str) -> bool:
        return len(arg) > 1 and arg[0] == "-"

    while rest:
        arg = rest.pop(0)
        if arg == "--":
            if dest is opts.unknown:
                dest.append(arg)
            dest.extend(rest)
            break
        if variadic is not None and not maybe_option(arg):
            emit_option(opts, variadic, arg)
            opts.swallowed = (arg, variadic.label.split(",")[0])
            continue
        variadic = None
        spec = SPECS.get(arg) if maybe_option(arg) else None
        if spec is not None:
            if spec.kind in ("value", "variadic"):
                if not rest:
                    fail(f"error: option '{spec.label}' argument missing")
                emit_option(opts, spec, rest.pop(0))
            elif spec.kind == "optional":
                emit_option(opts, spec, rest.pop(0) if rest and not maybe_option(rest[0]) else None)
            else:
                emit_option(opts, spec, None)
            variadic = spec if spec.kind == "variadic" else None
            continue
        if len(arg) > 2 and arg[0] == "-" and arg[1] != "-":
            spec = SPECS.get(arg[:2])
            if spec is not None:
                if spec.kind in ("value", "variadic", "optional"):
                    emit_option(opts, spec, arg[2:])
                else:
                    emit_option(opts, spec, None)
                    rest.insert(0, "-" + arg[2:])
                continue
        if arg.startswith("--") and "=" in arg[3:]:
            name, _, value = arg.partition("=")
            spec = SPECS.get(name)
            if spec is not None and spec.kind in ("value", "variadic", "optional"):
                emit_option(opts, spec, value)
                continue
        if maybe_option(arg):
            dest = opts.unknown
        dest.append(arg)
    return opts


# ---------------------------------------------------------------- stdin, prompt, scenario


def read_stdin(wait_ms: int) -> tuple[bytes | None, str, bool]:
    """(data or None, kind, timed out) -- like the real CLI: no TTY, a silent pipe is given up."""
    try:
        st = os.fstat(0)
    except OSError:
        return None, "closed", False
    if os.isatty(0):
        return None, "tty", False
    mode = st.st_mode
    if stat.S_ISCHR(mode):
        kind = "devnull" if (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3) else "chr"
    elif stat.S_ISFIFO(mode):
        kind = "fifo"
    elif stat.S_ISSOCK(mode):
        kind = "sock"
    elif stat.S_ISREG(mode):
        kind = "file"
    else:
        kind = "other"
    if kind in ("fifo", "sock"):
        ready, _, _ = select.select([0], [], [], wait_ms / 1000)
        if not ready:
            err(Recording("g11_stdin_pipe_open_with_prompt").stderr)
            return None, kind, True
    chunks = []
    while True:
        try:
            chunk = os.read(0, MIB)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks), kind, False


def parse_knobs(text: str, where: str) -> dict[str, str]:
    knobs: dict[str, str] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if not eq or (key not in INT_KNOBS and key not in STR_KNOBS):
            fail(f"fake_claude: bad knob {token!r} in {where}; known: {', '.join(sorted(INT_KNOBS | STR_KNOBS))}", 2)
        if key in INT_KNOBS and not re.fullmatch(r"-?\d+", value):
            fail(f"fake_claude: knob {key} wants an integer, got {value!r} in {where}", 2)
        knobs[key] = value
    return knobs


def knobs_of(text: str, where: str) -> dict[str, str]:
    start = text.find("[[fake")
    if start < 0:
        return {}
    end = text.find("]]", start)
    if end < 0:
        return {}
    return parse_knobs(text[start + 6 : end], where)


def env_knobs() -> dict[str, str]:
    text = os.environ.get("FAKE_SCENARIO", "").strip()
    if text.startswith("[[fake") and text.endswith("]]"):
        text = text[6:-2]
    return parse_knobs(text, "FAKE_SCENARIO")


class Scenario:
    def __init__(self, knobs: dict[str, str]) -> None:
        self.knobs = knobs

    def num(self, key: str, default: int = 0) -> int:
        value = self.knobs.get(key)
        return int(value) if value is not None else default

    def flag(self, key: str) -> bool:
        return self.num(key) != 0


def env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        fail(f"fake_claude: {name} must be a number, got {value!r}", 2)


# ---------------------------------------------------------------- the turn


def abort(sid: str) -> NoReturn:
    """SIGINT: what recording g23 shows, then exit 0."""
    if not RUN.result_written and not RUN.silent:
        rec = Recording("g23_sigINT_midstream_hang")
        for line in rec.lines[1:]:
            RUN.out.line(rec.personalize(line, sid) + b"\n")
    finish(0)


def apply_knobs(scn: Scenario) -> None:
    """The knobs the signal handlers and the writer look at."""
    RUN.ignore_signals = scn.flag("ignore_signals")
    RUN.silent = scn.flag("no_init")
    RUN.out.mode = "block" if scn.flag("block") else "split" if scn.flag("split") else "line"


def run_turn(prompt: str, source: str, knobs: dict[str, str], sid: str, argv: list[str]) -> int:
    scn = Scenario(knobs)
    apply_knobs(scn)
    rec = Recording(knobs.get("replay", DEFAULT_RECORDING))
    RUN.result_written = False
    scale = env_number("FAKE_TIME_SCALE", 0.0)
    delay = scn.num("delay_ms") / 1000
    fake = jdump({"prompt": prompt, "argv": argv, "prompt_source": source})

    err(rec.stderr)
    err(knobs.get("stderr", "").replace("_", " "))
    if scn.flag("grandchild"):
        spawn_grandchild()

    times, wall = rec.times()
    lines = rec.lines
    init_at = next((i for i, line in enumerate(lines) if line.startswith(INIT_PREFIX)), None)
    tail_at = len(lines) - 1 if lines and b'"type":"result"' in lines[-1] else None
    head = 0 if init_at is None else init_at + 1
    body_end = len(lines) if tail_at is None else tail_at

    def gap(i: int) -> float:
        return scale * (times[i] - (times[i - 1] if i > 0 else 0.0))

    def emit(line: bytes, pause: float, piece: int = 0) -> None:
        nap(pause)
        if RUN.interrupted:
            abort(sid)
        if not RUN.silent:
            RUN.out.line(line + b"\n", piece)

    nap(scn.num("init_delay_ms") / 1000 + (gap(0) if lines else 0.0))
    for _ in range(scn.num("session_line", 1) - 1):
        emit(status_line(), 0)
    for i in range(head):
        emit(rec.personalize(lines[i], sid, fake), gap(i) if i else 0.0)
    if scn.num("giant") > 0:
        emit(assistant_line(0, scn.num("giant"), 0, sid), delay, MIB)
    if "lines" in knobs or "line_bytes" in knobs:
        count = scn.num("lines", 1)
        size = scn.num("line_bytes") if "line_bytes" in knobs else None
        for seq in range(1, count + 1):
            emit(assistant_line(seq, size, count, sid), delay)
    elif not (scn.flag("hang") or scn.flag("crash")):
        for i in range(head, body_end):
            emit(rec.personalize(lines[i], sid, fake), delay + (gap(i) if i else 0.0))
    if scn.flag("crash"):
        RUN.out.flush()
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
    if scn.flag("hang"):
        nap(float("inf"))
        abort(sid)
    code = scn.num("exit", 1 if RUN.silent else rec.exit_code)
    if tail_at is not None and not scn.flag("no_result"):
        line = rec.personalize(lines[tail_at], sid, fake)
        if code != 0:
            line = line.replace(b'"is_error":false', b'"is_error":true')
        emit(line, delay + gap(tail_at))
        RUN.result_written = True
    linger = (
        scn.num("result_then_linger_ms") / 1000
        if "result_then_linger_ms" in knobs
        else scale * (wall - (times[-1] if times else 0.0))
    )
    nap(linger)
    if RUN.interrupted:
        abort(sid)
    RUN.out.flush()
    return code


def stream_turns(sid: str, base: dict[str, str], argv: list[str]) -> int:
    """--input-format stream-json: one turn per user line on stdin, until EOF."""
    code, pending = 0, b""
    while True:
        chunk = os.read(0, MIB)
        pending += chunk
        while b"\n" in pending or (not chunk and pending.strip()):
            line, _, pending = pending.partition(b"\n")
            if not line.strip():
                continue
            try:
                message = json.loads(line)
                content = message["message"]["content"] if message.get("type") == "user" else None
            except (ValueError, KeyError, TypeError, AttributeError):
                fail(f"fake_claude: not a stream-json user message: {line[:200]!r}", 1)
            if content is None:
                continue
            if isinstance(content, list):
                content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            prompt = str(content)
            if not RUN.logged:
                RUN.record.update(prompt=prompt, prompt_source="stdin")
            code = run_turn(prompt, "stdin", {**base, **knobs_of(prompt, "the prompt")}, sid, argv)
        if not chunk:
            return code


# ---------------------------------------------------------------- main


def resume_refused(name: str, sid: str, value: str) -> NoReturn:
    """Recordings b4/b5 with ``value`` for the recorded --resume value: stderr, one result line, exit 1."""
    rec = Recording(name)
    words = str(rec.meta["argv"]).split()
    recorded = words[words.index("--resume") + 1]
    err(rec.stderr.replace(recorded, value))
    line = rec.personalize(rec.lines[0], sid).replace(jstr(recorded), jstr(value))
    RUN.out.line(line + b"\n")
    finish(rec.exit_code)


def main(argv: list[str]) -> NoReturn:
    setup_signals()
    full_argv = [os.fsencode(a).decode("utf-8", "replace") for a in argv]
    cwd = getcwd()
    env: dict[str, str | None] = {k: v for k, v in os.environ.items() if k.startswith(("CLAUDESRV_", "FAKE_MARK"))}
    env.update(IS_SANDBOX=os.environ.get("IS_SANDBOX"), CLAUDE_CONFIG_DIR=os.environ.get("CLAUDE_CONFIG_DIR"))
    RUN.record = {
        "argv": full_argv,
        "started_at": time.time(),
        "cwd": cwd,
        "prompt": None,
        "prompt_source": None,
        "stdin_kind": None,
        "stdin_timed_out": False,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "env": env,
        "scenario": {},
        "session_id": None,
        "resume": None,
    }
    base = env_knobs()
    RUN.record["scenario"] = base
    apply_knobs(Scenario(base))

    opts = parse_argv(full_argv[1:])
    if any(a in ("-h", "--help") for a in opts.unknown):
        log_invocation()
        with open(os.path.join(FIXTURES, "e1_prompt_dashdash_help.jsonl"), "rb") as f:
            write_fd(1, f.read())
        finish(0)
    if opts.unknown:
        fail(f"error: unknown option '{opts.unknown[0]}'")
    if not opts.print_mode:
        fail("fake_claude: only print mode (-p/--print) is supported", 2)
    if opts.output_format == "stream-json" and not opts.verbose:
        fail(MSG_NEEDS_VERBOSE)
    if opts.output_format != "stream-json":
        fail(f"fake_claude: only --output-format stream-json is supported, not {opts.output_format!r}", 2)
    bypass = opts.skip_permissions or opts.permission_mode == "bypassPermissions"
    if bypass and os.geteuid() == 0 and os.environ.get("IS_SANDBOX") != "1":
        refusal = Recording("c1_dsp_root")
        fail(refusal.stderr, refusal.exit_code)

    prompt, source = "", ""
    if opts.input_format != "stream-json":
        arg = os.fsencode(opts.operands[0]) if opts.operands and opts.operands[0] else None
        data, kind, timed_out = read_stdin(int(env_number("FAKE_STDIN_WAIT_MS", 3000)))
        RUN.record.update(stdin_kind=kind, stdin_timed_out=timed_out)
        if data and arg is not None:
            raw, source = arg + b"\n" + data, "both"
        elif data:
            raw, source = data, "stdin"
        elif arg is not None:
            raw, source = arg, "arg"
        else:
            if opts.swallowed:
                value, option = opts.swallowed
                err(
                    f'"{value}" was read as a value of {option}, not as a prompt · '
                    f"put a prompt before {option} or after --"
                )
            fail(MSG_NO_INPUT)
        prompt = raw.decode("utf-8", "replace")
        RUN.record.update(prompt=prompt, prompt_source=source)
        if not prompt.replace("\ufeff", "").strip():
            fail(MSG_WHITESPACE)
        base = {**base, **knobs_of(prompt, "the prompt")}
        RUN.record["scenario"] = base
    apply_knobs(Scenario(base))

    sid = new_uuid()
    if opts.resume_given:
        given = opts.resume or ""
        RUN.record["resume"] = given
        if not UUID_RE.fullmatch(given):
            RUN.record["session_id"] = sid
            resume_refused("b5_resume_malformed", sid, given)
        known_path = state_path("sessions", given)
        if known_path is not None and not os.path.isfile(known_path):
            RUN.record["session_id"] = given
            resume_refused("b4_resume_unknown_uuid", given, given)
        if not opts.fork_session and base.get("new_id", "0") == "0":
            sid = given
    RUN.record["session_id"] = sid
    session_file = state_path("sessions", sid)
    if session_file is not None and not RUN.silent:
        with open(session_file, "w", encoding="utf-8") as f:
            f.write(cwd)

    if opts.input_format == "stream-json":
        finish(stream_turns(sid, base, full_argv))
    finish(run_turn(prompt, source, base, sid, full_argv))


if __name__ == "__main__":
    main(sys.argv)
