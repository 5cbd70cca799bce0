"""
The durable event log of one session: every event gets the session's next sequence number and is stored
as the SSE frame that carries it (``id: <seq>\\ndata: <event>\\n\\n``), so a replay is a copy of bytes.

The log is a folder of segment files under the data directory (never in the workspace the CLI can write);
each segment starts with a turn, holds whole turns, and is named after the first sequence number in it.
Positions are byte offsets that grow for the life of the log object; followers are told of every append
and of every turn end, and read what they missed from disk. When the log grows past its bound the oldest
whole turns are dropped, but never a segment a follower is still reading.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import dataclass
from typing import Any, Protocol

SUFFIX = ".sse"
SEGMENT_BYTES = 1 << 20  # turns share a segment until it holds this much
ID = b"id: "


class Follower(Protocol):
    position: int

    def log_grew(self, data: bytes, start: int) -> None:
        """C{data} was appended at offset C{start}."""

    def turn_ended(self) -> None:
        """The turn that was running has written its last event."""

    def log_closed(self, why: str) -> None:
        """The session was deleted (C{why} = "deleted") or the server stops ("server_shutdown")."""


@dataclass
class Segment:
    first_seq: int
    start: int
    size: int
    path: str

    @property
    def end(self) -> int:
        return self.start + self.size


def frame(seq: int, line: bytes) -> bytes:
    return b"id: %d\ndata: %b\n\n" % (seq, line)


def event_line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class EventLog:
    """The log of one session; create it with L{EventLog.open}."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segments: list[Segment] = []
        self.next_seq = 1
        self.end = 0
        self.followers: list[Follower] = []
        self.closed = False
        self._fd = -1
        self._segment_due = False

    @classmethod
    def open(cls, directory: str, max_bytes: int) -> EventLog:
        """The log in C{directory}, as a previous daemon left it (a frame cut off by a crash is dropped)."""
        log = cls(directory, max_bytes)
        try:
            names = sorted((int(n[:-len(SUFFIX)]), n) for n in os.listdir(directory)
                           if n.endswith(SUFFIX) and n[:-len(SUFFIX)].isdigit())
        except FileNotFoundError:
            names = []
        for first_seq, name in names:
            path = os.path.join(directory, name)
            size = os.path.getsize(path)
            log.segments.append(Segment(first_seq, log.end, size, path))
            log.end += size
        if log.segments:
            log.next_seq = log._repair_tail() + 1
        return log

    def _repair_tail(self) -> int:
        """Cut the last segment after its last whole frame; the last sequence number in the log."""
        while self.segments:
            seg = self.segments[-1]
            cut, seq = 0, None
            if seg.size:
                with open(seg.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    cut = max(m.rfind(b"\n\n") + 2, 0) if m.rfind(b"\n\n") >= 0 else 0
                    if cut:
                        head = m.rfind(b"\n\n", 0, cut - 2)
                        head = head + 2 if head >= 0 else 0
                        seq = int(m[head + len(ID):m.find(b"\n", head)])
            if cut != seg.size:
                os.truncate(seg.path, cut)
                self.end -= seg.size - cut
                seg.size = cut
            if seq is not None:
                return seq
            if len(self.segments) == 1:
                return seg.first_seq - 1
            self.segments.pop()
            os.remove(seg.path)
        return 0

    # ------------------------------------------------------------------ writing

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def start(self) -> int:
        """The offset of the oldest byte still on disk."""
        return self.segments[0].start if self.segments else self.end

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still on disk (next_seq when the log is empty)."""
        return self.segments[0].first_seq if self.segments else self.next_seq

    def begin_turn(self, now: bool = False) -> int:
        """
        A turn starts; its start offset. It gets a new segment unless the current one is still small (so a
        session of many short turns is not a folder of many tiny files). The segment's file is made with
        the turn's first event, or C{now}.
        """
        if self._fd >= 0 and self.segments and self.segments[-1].size < min(SEGMENT_BYTES, self.max_bytes // 8):
            return self.end
        self._close_fd()
        self._segment_due = True
        if now:
            self._open_segment()
        return self.end

    def _ready(self) -> None:
        """A segment to append to, made before the sequence numbers it is named after are taken."""
        if (self._fd < 0 or self._segment_due) and not self.closed:
            self._open_segment()

    def _open_segment(self) -> None:
        if self.closed:  # destroyed meanwhile (a new session given up while its folders were being made)
            return
        self._segment_due = False
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, f"{self.next_seq:012d}{SUFFIX}")
        if self.segments and self.segments[-1].path == path:  # an empty segment left by the last daemon
            self.segments.pop()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self.segments.append(Segment(self.next_seq, self.end, 0, path))
        self._trim()

    def append_lines(self, lines: list[bytes]) -> int:
        """Lines (without their newlines), one event each; the last sequence number given."""
        self._ready()
        seq = self.next_seq
        self.next_seq += len(lines)
        # [id 1, line 1, "\n\n" + id 2, line 2, ..., "\n\n"]: one join, no per-line copy
        parts = [b""] * (2 * len(lines))
        parts[0::2] = [b"\n\nid: %d\ndata: " % n for n in range(seq, self.next_seq)]
        parts[0] = parts[0][2:]
        parts[1::2] = lines
        parts.append(b"\n\n")
        self._write(b"".join(parts))
        return self.next_seq - 1

    def append(self, line: bytes) -> int:
        """One event (a line without its newline); its sequence number."""
        self._ready()
        seq = self.next_seq
        self.next_seq += 1
        self._write(frame(seq, line))
        return seq

    def append_event(self, payload: dict[str, Any]) -> int:
        return self.append(event_line(payload))

    def append_piece(self, piece: bytes, first: bool, last: bool) -> None:
        """A piece of one long event, stored and relayed as it comes (the event is never held whole)."""
        if first:
            self._ready()
            seq = self.next_seq
            self.next_seq += 1
            piece = b"id: %d\ndata: %b" % (seq, piece)
        if last:
            piece += b"\n\n"
        if piece:
            self._write(piece)

    def turn_ended(self) -> None:
        for follower in list(self.followers):
            follower.turn_ended()

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        start = self.end
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.segments[-1].size += len(data)
        self.end += len(data)
        if self.end - self.start > self.max_bytes:
            self._trim()
        for follower in list(self.followers):
            follower.log_grew(data, start)

    def _trim(self) -> None:
        """Drop the oldest whole turns while the log is over its bound; never the newest, never one being read."""
        pinned = min((f.position for f in self.followers), default=self.end)
        while (len(self.segments) > 1 and self.end - self.start > self.max_bytes
               and self.segments[0].end <= pinned):
            seg = self.segments.pop(0)
            try:
                os.remove(seg.path)
            except FileNotFoundError:
                pass

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ reading

    def offset_after(self, seq: int) -> int | None:
        """The offset of the first event after C{seq}, or None if events after it are no longer on disk."""
        if seq >= self.last_seq:
            return self.end
        want = seq + 1
        if want < self.first_seq:
            return None
        seg = next(s for s in reversed(self.segments) if s.first_seq <= want and s.size)
        needle = ID + b"%d\n" % want
        with open(seg.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:len(needle)] == needle:
                return seg.start
            at = m.find(b"\n" + needle)
        return seg.start + at + 1 if at >= 0 else None

    def read(self, position: int, limit: int) -> bytes:
        """Up to C{limit} bytes from C{position} (inside one segment; the caller asks again for more)."""
        for seg in self.segments:
            if seg.start <= position < seg.end:
                fd = os.open(seg.path, os.O_RDONLY)
                try:
                    return os.pread(fd, min(limit, seg.end - position), position - seg.start)
                finally:
                    os.close(fd)
        return b""

    def size(self) -> int:
        return self.end - self.start

    # ------------------------------------------------------------------ followers and the end

    def follow(self, follower: Follower) -> None:
        self.followers.append(follower)

    def unfollow(self, follower: Follower) -> None:
        if follower in self.followers:
            self.followers.remove(follower)

    def close(self, why: str) -> None:
        """No more events: tell the followers (the files stay)."""
        self._close_fd()
        for follower in list(self.followers):
            follower.log_closed(why)
        self.followers.clear()

    def destroy(self) -> None:
        """The session is deleted: its followers are told, its files removed."""
        self.closed = True
        self.close("deleted")
        shutil.rmtree(self.directory, ignore_errors=True)
