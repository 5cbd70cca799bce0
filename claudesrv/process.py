"""
The CLI as a child process: stdout cut into whole lines, stderr kept, signals to its whole tree.

Nothing here knows about HTTP. Lines go to a L{LineSink} in blocks: every complete line that one read
brought, in one call, so the relay costs a few C-level operations per read rather than Python work per
line. A line longer than C{max_line} is not held whole in memory: it is passed on in pieces as it
arrives, so a 64 MiB line costs the server no more memory than a short one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import process
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

STDERR_KEEP = 4096
READ_SIZE = 1 << 16  # Twisted's ProcessReader reads 8 KiB a call
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LineSink(Protocol):
    def lines_received(self, block: bytes) -> None:
        """One or more complete lines, each ending in a newline."""

    def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A piece of one long line, without its newline; C{last} once the newline has been seen."""

    def process_exited(self) -> None:
        """The CLI itself has exited; its output may still be in the pipe."""

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
        self.pgid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pgid = self.transport.pid  # the CLI leads its own group; kept after the CLI is reaped
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

    def processExited(self, reason: Failure) -> None:
        self.sink.process_exited()

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
        """Signal the CLI's process group (the CLI leads it), also after the CLI itself has exited."""
        if self.pgid is None or self.ended:
            return
        try:
            os.killpg(self.pgid, signal_number)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warn("no permission to signal process group {pgid}", pgid=self.pgid)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self.transport is not None and not self.ended:
            self.transport.resumeProducing()  # type: ignore[attr-defined]


# the signals a shell or nohup may leave ignored (subprocess itself restores SIGPIPE and SIGXFSZ)
_WATCHED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGALRM, signal.SIGCHLD, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _ignored_signals() -> list[int]:
    """Signals this process ignores and subprocess would leave ignored in the child."""
    return [s for s in _WATCHED_SIGNALS if signal.getsignal(s) == signal.SIG_IGN]


class _LargeReader(process.ProcessReader):
    """Reads the CLI's stdout and stderr C{READ_SIZE} bytes at a time."""

    def doRead(self) -> Any:
        try:
            output = os.read(self.fd, READ_SIZE)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return CONNECTION_LOST
        if not output:
            return CONNECTION_DONE
        self.dataReceived(output)
        return None


class _SessionLeaderProcess(process.Process):
    """
    The CLI as the leader of a new session (setsid): one killpg reaches it and its children, and it does
    not share the daemon's terminal signals.

    Started with C{subprocess.Popen}: vfork() and exec in C, with the cwd, setsid and the closing of every
    other descriptor done there. Twisted's own path fork()s the whole daemon and runs Python in the
    child before exec, which costs the daemon milliseconds per run in page copies; it is kept for a
    daemon that ignores signals (see L{_ignored_signals}).
    """

    processReaderFactory = _LargeReader
    _popen: subprocess.Popen[bytes] | None = None

    def _fork(self, path: str | None, uid: int | None, gid: int | None, executable: str, args: list[str],
              environment: dict[str, str], **kwargs: Any) -> None:
        if _ignored_signals():
            # an ignored signal stays ignored across exec, and only Twisted's path resets it: the CLI must
            # see SIGINT (a daemon started with `nohup ... &` ignores SIGINT and SIGHUP)
            super()._fork(path, uid, gid, executable, args, environment, **kwargs)
            return
        fdmap: dict[int, int] = kwargs["fdmap"]
        self._popen = subprocess.Popen(args, executable=executable, env=environment, cwd=path,
                                       stdin=fdmap[0], stdout=fdmap[1], stderr=fdmap[2],
                                       close_fds=True, start_new_session=True)
        self.pid = self._popen.pid  # type: ignore[assignment]

    def _trySpawnInsteadOfFork(self, *args: object) -> bool:
        return False

    def _execChild(self, path: str | None, uid: int | None, gid: int | None, executable: str,
                   args: list[str], environment: dict[str, str]) -> None:
        os.setsid()
        super()._execChild(path, uid, gid, executable, args, environment)

    def processEnded(self, status: int) -> None:
        if self._popen is not None:  # Twisted reaped it: subprocess must never wait for it
            self._popen.returncode = status
            self._popen = None
        super().processEnded(status)


Spawner = Callable[[ClaudeProcess, list[str], dict[str, str], str], None]


def _stdin_pipe(data: bytes) -> int | None:
    """A pipe already holding C{data}, its write end closed: the read end, or None if it cannot hold it."""
    r, w = os.pipe()
    try:
        if len(data) > 65536:
            fcntl.fcntl(w, F_SETPIPE_SZ, len(data))
        os.set_blocking(w, False)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    except OSError:
        os.close(r)
        return None
    finally:
        os.close(w)
    return r


def spawner(reactor: IReactorProcess) -> Spawner:
    """
    A function that starts the CLI as a session leader with the given argv, env and cwd. The prompt is
    put in the CLI's stdin pipe before the CLI starts, so its stdin ends at once, without waiting for
    the reactor to flush and close it (a burst of requests would otherwise hold every CLI back).
    """

    def spawn(protocol: ClaudeProcess, argv: list[str], env: dict[str, str], cwd: str) -> None:
        stdin = _stdin_pipe(protocol.stdin)  # None: larger than a pipe may be, written by the reactor
        if stdin is not None:
            protocol.stdin = b""
        try:
            _SessionLeaderProcess(reactor, argv[0], argv, env, cwd, protocol,
                                  childFDs={0: "w" if stdin is None else stdin, 1: "r", 2: "r"})
        finally:
            if stdin is not None:
                os.close(stdin)

    return spawn


def kill_marked(markers: list[bytes]) -> None:
    """
    SIGKILL every process whose environment holds one of C{markers} (``NAME=value``). A run's children
    inherit its marker, so this finds the CLI's tool processes even after they moved to sessions of their
    own and were re-parented. One pass over /proc serves every marker.
    """
    needles = [b"\0" + m + b"\0" for m in markers]
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"
        except OSError:
            continue
        if any(n in environ for n in needles):
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
