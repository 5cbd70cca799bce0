"""
The CLI as a child process: stdout cut into whole lines, stderr kept, signals to its whole tree.

Nothing here knows about HTTP. Lines go to a L{LineSink} in blocks: every complete line that one read
brought, in one call, so the relay costs a few C-level operations per read rather than Python work per
line. A line longer than C{max_line} is not held whole in memory: it is passed on in pieces as it
arrives, so a 64 MiB line costs the server no more memory than a short one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Protocol

from twisted.internet import process
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

STDERR_KEEP = 4096


class LineSink(Protocol):
    def lines_received(self, block: bytes) -> None:
        """One or more complete lines, each ending in a newline."""

    def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A piece of one long line, without its newline; C{last} once the newline has been seen."""

    def process_ended(self, exit_code: int | None, signal_number: int | None, stderr: bytes) -> None:
        """The CLI has exited and its stdout is fully delivered."""


class LineSplitter:
    """
    Cuts a byte stream into lines. A partial line is carried to the next read, and bytes once scanned
    for a newline are never scanned again.
    """

    def __init__(self, sink: LineSink, max_line: int = 1 << 20) -> None:
        self.sink = sink
        self.max_line = max_line
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._streaming = False

    def feed(self, data: bytes) -> None:
        end = data.rfind(b"\n")
        if end < 0:
            self._carry(data)
            return
        if self._streaming:
            first_nl = data.find(b"\n")
            self.sink.line_piece(data[:first_nl], False, True)
            self._streaming = False
            start = first_nl + 1
            if start <= end:
                self.sink.lines_received(data[start:end + 1])
        elif self._partial:
            self._partial.append(data[:end + 1])
            block = b"".join(self._partial)
            self._partial = []
            self._partial_len = 0
            self.sink.lines_received(block)
        else:
            self.sink.lines_received(data if end == len(data) - 1 else data[:end + 1])
        if end + 1 < len(data):
            self._carry(data[end + 1:])

    def _carry(self, data: bytes) -> None:
        if self._streaming:
            self.sink.line_piece(data, False, False)
            return
        self._partial.append(data)
        self._partial_len += len(data)
        if self._partial_len > self.max_line:
            head = b"".join(self._partial)
            self._partial = []
            self._partial_len = 0
            self._streaming = True
            self.sink.line_piece(head, True, False)

    def flush(self) -> None:
        """At EOF: a last line without a newline is still a line."""
        if self._streaming:
            self._streaming = False
            self.sink.line_piece(b"", False, True)
        elif self._partial:
            line = b"".join(self._partial) + b"\n"
            self._partial = []
            self._partial_len = 0
            self.sink.lines_received(line)


class ClaudeProcess(ProcessProtocol):
    """The protocol of one CLI process. It writes the prompt to stdin and closes it at once."""

    def __init__(self, sink: LineSink, stdin: bytes, max_line: int = 1 << 20) -> None:
        self.sink = sink
        self.splitter = LineSplitter(sink, max_line)
        self.stdin = stdin
        self.stderr = bytearray()
        self.ended = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()
        self.stdin = b""

    def outReceived(self, data: bytes) -> None:
        self.splitter.feed(data)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        if len(self.stderr) > 2 * STDERR_KEEP:
            del self.stderr[:-STDERR_KEEP]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.splitter.flush()
        value = reason.value
        exit_code = getattr(value, "exitCode", None)
        signal_number = getattr(value, "signal", None)
        self.sink.process_ended(exit_code, signal_number, bytes(self.stderr[-STDERR_KEEP:]))

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    def signal_group(self, signal_number: int) -> None:
        """Signal the CLI's process group (the CLI leads it, see L{spawn})."""
        pid = self.pid
        if pid is None or self.ended:
            return
        try:
            os.killpg(pid, signal_number)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warn("no permission to signal process group {pid}", pid=pid)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.resumeProducing()  # type: ignore[attr-defined]


class _SessionLeaderProcess(process.Process):
    """
    A child that calls setsid() before exec: the CLI leads its own process group (so one killpg
    reaches it and its children) and does not share the daemon's terminal signals.
    """

    def _trySpawnInsteadOfFork(self, *args: object) -> bool:
        return False

    def _execChild(self, path: str | None, uid: int | None, gid: int | None, executable: str,
                   args: list[str], environment: dict[str, str]) -> None:
        os.setsid()
        super()._execChild(path, uid, gid, executable, args, environment)


Spawner = Callable[[ClaudeProcess, list[str], dict[str, str], str], None]


def spawner(reactor: IReactorProcess) -> Spawner:
    """A function that starts the CLI as a session leader with the given argv, env and cwd."""

    def spawn(protocol: ClaudeProcess, argv: list[str], env: dict[str, str], cwd: str) -> None:
        _SessionLeaderProcess(reactor, argv[0], argv, env, cwd, protocol)

    return spawn


def pids_with_marker(marker: bytes) -> list[int]:
    """
    Every process whose environment holds C{marker} (``NAME=value``). A run's children inherit it,
    so this finds the CLI's tool processes even after they moved to sessions of their own and were
    re-parented.
    """
    found = []
    needle = b"\0" + marker + b"\0"
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = b"\0" + f.read()
        except OSError:
            continue
        if needle in environ or environ.endswith(b"\0" + marker):
            found.append(int(name))
    return found


def kill_marked(marker: bytes) -> list[int]:
    """SIGKILL every process that carries C{marker}; the pids it signalled."""
    killed = []
    for pid in pids_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed
