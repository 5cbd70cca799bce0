"""
The CLI as a child process in SDK streaming mode: JSON lines in both directions, stdout cut into whole
lines, stderr kept, signals to its whole tree.

Nothing here knows about HTTP or sessions. Lines go to a L{LineSink} as the list of every complete line
that one read brought, in one call, so the relay costs a few C-level operations per read rather than
Python work per line. A line longer than C{max_line} is not held whole in memory: it is passed on in pieces as it
arrives, so a 64 MiB line costs the server no more memory than a short one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import process
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from claudesrv import command

log = Logger()

STDERR_KEEP = 4096
READ_SIZE = 1 << 18  # Twisted's ProcessReader reads 8 KiB a call
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LineSink(Protocol):
    def lines_received(self, lines: list[bytes]) -> None:
        """One or more complete lines, without their newlines."""

    def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A piece of one long line, without its newline; C{last} once the newline has been seen."""


class LineSplitter:
    """
    Cuts a byte stream into lines: one C{split} per read, and only the line cut by a read's end is
    copied again. A line longer than C{max_line} is passed on in pieces instead of being held.
    """

    def __init__(self, sink: LineSink, max_line: int = 1 << 20) -> None:
        self.sink = sink
        self.max_line = max_line
        self._partial: list[bytes] = []
        self._partial_len = 0
        self._streaming = False

    def feed(self, data: bytes) -> None:
        lines = data.split(b"\n")
        rest = lines.pop()  # after the last newline: the start of a line still to come (or b"")
        if lines:
            if self._streaming:
                self._streaming = False
                self.sink.line_piece(lines.pop(0), False, True)
            elif self._partial:
                self._partial.append(lines[0])
                lines[0] = b"".join(self._partial)
                self._partial = []
                self._partial_len = 0
            if lines:
                self.sink.lines_received(lines)
        if rest:
            self._carry(rest)

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
            line = b"".join(self._partial)
            self._partial = []
            self._partial_len = 0
            self.sink.lines_received([line])


class CliOwner(Protocol):
    """Who hears from a CLI process: its events, its control messages, its end."""

    def cli_lines(self, lines: list[bytes], joined: bytes) -> None:
        """Complete event lines (control protocol frames taken out), without their newlines; C{joined} is
        them joined by newlines, made once per read for the scans of both sides."""

    def cli_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A piece of one event line too long to hold; C{last} once its newline has been seen."""

    def cli_control(self, message: dict[str, Any]) -> None:
        """A control_request or control_cancel_request the CLI sent us."""

    def cli_exited(self) -> None:
        """The CLI itself has exited; its output may still be in the pipe."""

    def cli_ended(self, exit_code: int | None, signal_number: int | None, stderr: bytes) -> None:
        """The CLI has exited and its stdout is fully delivered."""


CONTROL = (b'{"type":"control_', b'{"type": "control_')


class CliProcess(ProcessProtocol):
    """
    One CLI in SDK streaming mode: stdin stays open for JSON lines, the control protocol's frames are
    kept apart from the events, and our control requests get their answers as Deferreds.
    """

    def __init__(self, owner: CliOwner, max_line: int = 1 << 20,
                 killpg: Callable[[int, int], None] = os.killpg) -> None:
        self.owner = owner
        self.killpg = killpg
        self.splitter = LineSplitter(self, max_line)
        self.stderr = bytearray()
        self.ended = False
        self.stdin_open = True
        self.pgid: int | None = None
        self.pending: dict[str, Deferred[dict[str, Any]]] = {}
        self._queued: list[bytes] = []
        self._requests = 0
        self._control_pieces: list[bytes] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pgid = self.transport.pid  # the CLI leads its own group; kept after the CLI is reaped
        queued, self._queued = self._queued, []
        for line in queued:
            self.send(line)

    # ---------------------------------------------------------------- writing to the CLI

    def send(self, line: bytes) -> None:
        """One line that L{claudesrv.command} made; dropped once stdin is closed."""
        if self.transport is None:
            self._queued.append(line)
        elif self.stdin_open and not self.ended:
            self.transport.write(line)

    def request(self, subtype: str, **fields: Any) -> Deferred[dict[str, Any]]:
        """A control request; fires with the CLI's response envelope (``subtype`` success or error)."""
        self._requests += 1
        request_id = f"req_{self._requests}_{os.urandom(4).hex()}"
        d: Deferred[dict[str, Any]] = Deferred()
        self.pending[request_id] = d
        self.send(command.control_request(request_id, subtype, **fields))
        return d

    def close_stdin(self) -> None:
        if self.stdin_open:
            self.stdin_open = False
            if self.transport is not None and not self.ended:
                self.transport.closeStdin()

    # ---------------------------------------------------------------- reading from the CLI

    def outReceived(self, data: bytes) -> None:
        self.splitter.feed(data)

    def lines_received(self, lines: list[bytes]) -> None:
        joined = b"\n".join(lines)  # one C-level scan of a copy is cheaper than a Python loop over the lines
        if CONTROL[0] not in joined and CONTROL[1] not in joined:
            self.owner.cli_lines(lines, joined)
            return
        events: list[bytes] = []
        for line in lines:
            if line.startswith(CONTROL):
                self._events(events)
                events = []
                self._control(line)
            else:
                events.append(line)
        self._events(events)

    def _events(self, lines: list[bytes]) -> None:
        if lines:
            self.owner.cli_lines(lines, b"\n".join(lines))

    def line_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A long line: an event goes on in pieces; a control frame (a large can_use_tool) is gathered."""
        if first and piece.startswith(CONTROL):
            self._control_pieces = [piece]
        elif self._control_pieces is not None:
            self._control_pieces.append(piece)
        else:
            self.owner.cli_piece(piece, first, last)
            return
        if last:
            line, self._control_pieces = b"".join(self._control_pieces), None
            self._control(line)

    def _control(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warn("an unreadable control frame from the CLI was dropped: {head!r}", head=line[:200])
            return
        if message.get("type") == "control_response":
            response = message.get("response") or {}
            d = self.pending.pop(str(response.get("request_id")), None)
            if d is not None:
                d.callback(response)
        else:
            self.owner.cli_control(message)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        if len(self.stderr) > 2 * STDERR_KEEP:
            del self.stderr[:-STDERR_KEEP]

    def processExited(self, reason: Failure) -> None:
        self.owner.cli_exited()

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.stdin_open = False
        self.splitter.flush()
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.callback({"subtype": "error", "error": "the CLI exited"})
        value = reason.value
        exit_code = getattr(value, "exitCode", None)
        signal_number = getattr(value, "signal", None)
        self.owner.cli_ended(exit_code, signal_number, bytes(self.stderr[-STDERR_KEEP:]))

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None)

    def signal_group(self, signal_number: int) -> None:
        """Signal the CLI's process group (the CLI leads it), also after the CLI itself has exited."""
        if self.pgid is None or self.ended:
            return
        try:
            self.killpg(self.pgid, signal_number)
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warn("no permission to signal process group {pgid}", pgid=self.pgid)


# The signals the CLI must not inherit as ignored: the stop ladder's. (A daemon started with `cmd &` from a
# script also ignores SIGQUIT; that one may stay ignored, and must not cost every spawn a fork of the daemon.)
_WATCHED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)


def _ignored_signals() -> list[int]:
    """Signals this process ignores and subprocess would leave ignored in the child."""
    return [s for s in _WATCHED_SIGNALS if signal.getsignal(s) == signal.SIG_IGN]


class _LargeReader(process.ProcessReader):
    """
    Reads the CLI's stdout and stderr C{READ_SIZE} bytes at a time, from a pipe that can hold that much
    (a CLI writes a line per write: a larger pipe means fewer wake-ups of both sides per megabyte).
    """

    def __init__(self, reactor: Any, proc: Any, name: Any, fileno: int) -> None:
        super().__init__(reactor, proc, name, fileno)
        try:
            fcntl.fcntl(fileno, F_SETPIPE_SZ, READ_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size works too

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


Spawner = Callable[[CliProcess, list[str], dict[str, str], str], None]


def spawner(reactor: IReactorProcess) -> Spawner:
    """A function that starts the CLI as a session leader with the given argv, env and cwd, stdin a pipe."""

    def spawn(protocol: CliProcess, argv: list[str], env: dict[str, str], cwd: str) -> None:
        _SessionLeaderProcess(reactor, argv[0], argv, env, cwd, protocol, childFDs={0: "w", 1: "r", 2: "r"})

    return spawn


def kill_marked(markers: list[bytes]) -> None:
    """
    SIGKILL every process whose environment holds one of C{markers} (``NAME=value``). A CLI's children
    inherit its marker, so this finds its tool processes even after they moved to sessions of their own and
    were re-parented. One pass over /proc serves every marker; passes repeat until one finds nothing, since a
    process caught mid-fork or mid-exec reads as having no environment.
    """
    needles = [b"\0" + m + b"\0" for m in markers]
    me = os.getpid()
    killed: set[int] = set()
    for _ in range(5):
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me or int(name) in killed:
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = b"\0" + f.read() + b"\0"
            except OSError:
                continue
            if any(n in environ for n in needles):
                found = True
                killed.add(int(name))
                try:
                    os.kill(int(name), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
