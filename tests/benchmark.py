#!/usr/bin/env python3
"""
claudesrv benchmark: a real ``twistd -n claudesrv`` with a fast fake CLI in SDK streaming mode, against
the same fake driven directly over pipes (the floor), in the same run.

    .venv/bin/python tests/benchmark.py [--repeat 3] [--quick] [--measures warm,spare,...] [--markdown]

Not part of the test run: trial collects ``tests/test_*.py`` only, and nothing here is a TestCase.

The fake is the C stand-in vendored in ``tests/bench/fake-claude.c`` (``--fake-src``), compiled with gcc
into the work dir. Every request carries its shape as a ``[[fake ...]]`` tag in the prompt, so one
daemon serves every shape. Each measure runs its floor first, then a fresh daemon with the options the
measure needs (its own data dir, ``tcp:0`` on loopback; the port comes from its ``Site starting on N``
log line; ``PYTHONPATH`` is this checkout, so the daemon is the code here, not an installed copy).

Every stream is checked, not just timed: HTTP 200, chunked framing to its terminating chunk, every frame
``id: <seq>`` + one ``data:`` line, the ids increasing, the first CLI frame ``system/init`` with a
session id, the assistant ids ``msg_fake_00000001..N`` in order, and the fake's own ``fake_digest``
(lines, bytes, crc32 of every line of the turn before its result line) recomputed over what arrived.
Events of type ``claudesrv`` (``queued``) are counted and left out of the digest. The floor reads the
fake's stdout through the same checker.

Measures (full size; ``--quick`` shrinks them), each against a floor measured in the same run:
  warm         follow-up turns on one warm session, sequential, a fresh connection each: POST to the
               first frame, and to the end of the turn; every turn must come from the same CLI process
               (the init line's fake_pid). Floor: one fake in SDK mode over pipes, after initialize: a
               user line written, to its first stdout line / its result line. For reference, also this
               client against a minimal asyncio server that answers at once with a canned turn: what a
               fresh loopback HTTP request costs before any daemon work.
  spare        new sessions one after another (--spares 1, --max-live with room for all of them), each
               sent once /metrics shows a spare again (--spare-metric,
               --spare-settle; without such a metric, after --spare-wait): POST to the first frame; and
               whether the session's CLI (the init line's fake_pid) was among the daemon's children
               before the POST, i.e. came from a spare. Floor: as for warm.
  throughput   200 MB of 1 kB lines in one turn, through the log and the SSE sink: MB/s, lines lost,
               daemon and client CPU; the client's own ceiling (the very bytes the daemon sent, served
               by sendfile() from another process). Floor: the fake's pipe read through the checker.
  giant        one 64 MiB line: time, intact, daemon RSS growth (VmHWM after a reset minus VmRSS before)
  replay       a 100 MB turn, then GET /api/sessions/<id>/events with Last-Event-ID: 0 once it ended:
               MB/s, and byte-exact with what the POST stream delivered (whole body crc32 and length).
               Floor: the client ceiling on the same bytes.
  idle         100 sessions after one turn each, --max-live 100 + spares: the daemon's VmRSS (floor: its
               VmRSS at start), the live CLI processes, then one more turn on every session: still warm
               (same fake_pid)?
  concurrency  200 new sessions at once, --spares 0 (and no per-address connection cap: every client is
               127.0.0.1), each ~2 s (4 lines 400 ms apart): completion
               p50/p99 from the launch, failures, daemon peak RSS (floor: 200 fakes in SDK mode spawned
               back to back, each given initialize and its user line at once, all read from one loop)
  slow_reader  a 100 MB turn whose client stops reading for 5 s after the first frame: RSS growth

Every daemon is stopped with SIGTERM to its process group; CLIs of it still alive 5 s later are counted
(``leftover_clis``) and killed by pid. ``--floor-only`` measures the floors alone; ``--size NAME=VALUE``
changes one size.

Output: a table (medians over the repeats, [min-max] when they differ; ``--markdown`` for the README),
then one ``JSON {...}`` line per measure (also appended to ``--json-out``); the exit status is 1 when a
target is missed. ``--py-spy`` records each daemon with py-spy into the work dir; ``--listen`` and
``--daemon-arg`` change how the daemon is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from itertools import repeat
from operator import itemgetter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_FAKE_SRC = os.path.join(HERE, "bench", "fake-claude.c")
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
# what the daemon passes (the session id varies); the fake then waits for JSON lines on stdin
SDK_ARGV = ["--output-format", "stream-json", "--verbose", "--input-format", "stream-json",
            "--permission-prompt-tool", "stdio"]
INITIALIZE = b'{"type":"control_request","request_id":"req_1_bench","request":{"subtype":"initialize","hooks":null}}\n'
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sizes:
    warm_n: int = 200  # follow-up turns (and the floor's turns)
    spare_n: int = 40  # new sessions, one after another
    warmup: int = 5  # turns before measuring (each daemon, and the floor)
    tp_mb: float = 200.0  # throughput turn, MB of stdout
    line_bytes: int = 1024
    giant_mib: int = 64
    replay_mb: float = 100.0
    idle_sessions: int = 100
    conc: int = 200  # new sessions at once
    conc_lines: int = 4  # 4 lines 400 ms apart: 5 gaps, about 2 s
    conc_delay_ms: int = 400
    slow_mb: float = 100.0  # slow-reader turn
    stall_s: float = 5.0  # how long the slow reader does not read


FULL = Sizes()
QUICK = Sizes(warm_n=50, spare_n=10, warmup=3, tp_mb=50.0, giant_mib=16, replay_mb=25.0, conc=50,
              slow_mb=25.0, stall_s=2.0)
MEASURES = ("warm", "spare", "throughput", "giant", "replay", "idle", "concurrency", "slow_reader")


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float | None:
    """Percentile by linear interpolation (p in 0..100)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


# ------------------------------------------------------------------------------------------- the fake

def build_fake(src: str, work: str) -> str:
    """Compile fake-claude.c (static if possible) into the work dir, once per source change."""
    if not os.path.isfile(src):
        raise SystemExit(f"fake CLI source not found: {src} (give --fake-src PATH/fake-claude.c or --fake BINARY)")
    out = os.path.join(work, "fake-claude")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        log(f"compiling {src} ...")
        tmp = out + ".tmp"
        r = subprocess.run(["gcc", "-O2", "-static", "-o", tmp, src], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["gcc", "-O2", "-o", tmp, src], check=True)
        os.replace(tmp, out)
    return out


def tag(shape: dict[str, Any]) -> str:
    return "[[fake " + " ".join(f"{k}={v}" for k, v in sorted(shape.items())) + "]]"


def prompt_for(shape: dict[str, Any]) -> str:
    return "hello " + tag(shape)


def user_line(prompt: str) -> bytes:
    """The stdin line the daemon writes for one turn."""
    return (json.dumps({"type": "user", "message": {"role": "user", "content": prompt},
                        "parent_tool_use_id": None, "session_id": "default"}) + "\n").encode()


def expect(shape: dict[str, Any]) -> tuple[int, bool]:
    return int(shape.get("lines", 1)), int(shape.get("big_line_bytes", 0)) > 0


# ------------------------------------------------------------------------------------------- checking

ASSISTANT = b'{"type":"assistant","message":{"id":"msg_fake_'  # the fake's assistant lines start so
BIG = ASSISTANT + b'big"'  # the giant line's id is not numbered
ID_RE = re.compile(rb'\{"type":"assistant","message":\{"id":"msg_fake_(\d{8})"')
SEQ_AT = len(ASSISTANT)
OWN = b'{"type":"claudesrv"'  # the daemon's own events (queued, ...): not CLI lines
PAYLOAD = itemgetter(slice(6, None))  # "data: LINE" -> LINE
RESULT = b'"type":"result"'


class Verifier:
    """
    The integrity check of one turn's stream of lines: the fake's digest (line count, bytes, crc32 of
    every line before the result line, each with its newline) recomputed over what arrived, the first
    line system/init with a session id, the last line the result, and the assistant ids 1..N in order.
    The newest line is always held back: when the stream ends it must be the result line. For SSE it
    also checks the event ids: present on every CLI frame, increasing.
    """

    def __init__(self, lines: int, big: bool) -> None:
        self.expect_lines, self.expect_big = lines, big
        self.crc = self.nlines = self.nbytes = 0
        self.first: bytes | None = None
        self.pend: bytes | None = None
        self.seq_next = 1
        self.seq_bad = 0
        self.big_seen = False
        self.first_id: int | None = None
        self.last_id: int | None = None
        self.id_gaps = 0  # ids skipped (a missing number between two frames)
        self.id_bad = 0  # ids not above the previous one
        self.no_id = 0  # CLI frames without an id
        self.own: list[bytes] = []  # the daemon's own events (first few)
        self.nown = 0

    @property
    def payload_bytes(self) -> int:
        return self.nbytes + (len(self.pend) + 1 if self.pend is not None else 0)

    def sse(self, buf: bytes, start: int, end: int) -> list[bytes]:
        """
        Complete SSE frames buf[start:end] (start at a frame, end just after a blank line); returns
        the frames that are not one data line (comments, ...). The usual batch, nothing but frames
        ``id: N\\ndata: LINE\\n\\n`` with ids counting up by one and no event of the daemon's own, is
        checked in bulk: the framing is taken off with C-level bytes operations (a CLI line holds no raw
        newline) and the lines go to L{lines}. Anything else takes the frame-by-frame path.
        """
        if self._sse_fast(buf, start, end):
            return []
        return self._sse_slow(buf, start, end)

    def _sse_fast(self, buf: bytes, start: int, end: int) -> bool:
        if not buf.startswith(b"id: ", start) or buf.find(OWN, start, end) >= 0:
            return False
        parts = buf[start:end].split(b"\n")  # id, data, "" per frame, then the "" after the last newline
        n, odd = divmod(len(parts) - 1, 3)
        if odd or not n or parts[-1] or b"".join(parts[2::3]):
            return False
        data = parts[1::3]
        if not all(map(bytes.startswith, data, repeat(b"data: ", n))):
            return False
        try:
            i0 = int(parts[0][4:])
        except ValueError:
            return False
        if self.last_id is not None and i0 != self.last_id + 1:
            return False
        if b"\n".join(parts[0:3 * n:3]) != ("id: " + "\nid: ".join(map(str, range(i0, i0 + n)))).encode():
            return False
        if self.first_id is None:
            self.first_id = i0
        self.last_id = i0 + n - 1
        del parts
        self.lines(b"\n".join(map(PAYLOAD, data)), newlines=n - 1)
        return True

    def _sse_slow(self, buf: bytes, start: int, end: int) -> list[bytes]:
        """Frame by frame: each CLI frame's payload and the first of its two newlines are exactly the
        line with its newline, so the crc runs over the buffer without a copy."""
        odd = []
        find, sw, c32 = buf.find, buf.startswith, zlib.crc32
        crc, nl, nb = self.crc, self.nlines, self.nbytes
        ps = pe = -1  # the newest CLI frame's payload in buf, held back
        first_num = last_num = -1
        nnum = 0
        pos = start
        with memoryview(buf) as mv:
            while pos < end:
                e = find(b"\n\n", pos, end)
                if sw(b"id: ", pos):
                    d = find(b"\ndata: ", pos, e)
                    if d < 0:
                        odd.append(buf[pos:e])
                        pos = e + 2
                        continue
                    try:
                        i = int(buf[pos + 4:d])
                    except ValueError:
                        i = -1
                    if self.first_id is None:
                        self.first_id = i
                    elif self.last_id is not None:
                        if i <= self.last_id:
                            self.id_bad += 1
                        elif i > self.last_id + 1:
                            self.id_gaps += i - self.last_id - 1
                    self.last_id = i
                    p0 = d + 7
                elif sw(b"data: ", pos):
                    p0 = pos + 6
                    if not sw(OWN, p0):
                        self.no_id += 1
                else:
                    odd.append(buf[pos:e])
                    pos = e + 2
                    continue
                if sw(OWN, p0):
                    self.nown += 1
                    if len(self.own) < 5:
                        self.own.append(buf[p0:min(e, p0 + 300)])
                    pos = e + 2
                    continue
                if ps >= 0:
                    crc = c32(mv[ps:pe + 1], crc)
                    nl += 1
                    nb += pe + 1 - ps
                    if sw(ASSISTANT, ps):
                        if pe - ps > 65536 and sw(BIG, ps):
                            self.big_seen = True
                        else:
                            if first_num < 0:
                                first_num = ps
                            last_num = ps
                            nnum += 1
                elif self.pend is not None:
                    self.crc, self.nlines, self.nbytes = crc, nl, nb
                    self._count_pend()
                    crc, nl, nb = self.crc, self.nlines, self.nbytes
                ps, pe = p0, e
                if self.first is None:
                    self.first = buf[ps:pe]
                pos = e + 2
        self.crc, self.nlines, self.nbytes = crc, nl, nb
        if ps >= 0:
            self.pend = buf[ps:pe]
        if nnum:
            try:
                s0 = int(buf[first_num + SEQ_AT:first_num + SEQ_AT + 8])
                s1 = int(buf[last_num + SEQ_AT:last_num + SEQ_AT + 8])
            except ValueError:
                s0, s1 = -1, -2
            if s0 == self.seq_next and s1 - s0 + 1 == nnum:
                self.seq_next = s1 + 1
            else:  # a gap or disorder: look at every id
                self._ids(buf, first_num, last_num + SEQ_AT + 9)
        return odd

    def lines(self, buf: bytes, start: int = 0, end: int | None = None, newlines: int | None = None) -> None:
        """Raw lines buf[start:end], joined by '\\n' without a trailing one (the fake's stdout); newlines
        is their count of newlines when the caller knows it."""
        if end is None:
            end = len(buf)
        if self.first is None:
            j = buf.find(b"\n", start, end)
            self.first = buf[start:end if j < 0 else j]
        j = buf.rfind(b"\n", start, end)
        if self.pend is not None:
            self._count_pend()
        if j < 0:
            self.pend = buf[start:end]
            return
        with memoryview(buf) as mv:
            self.crc = zlib.crc32(mv[start:j + 1], self.crc)
        self.nlines += buf.count(b"\n", start, j + 1) if newlines is None else newlines
        self.nbytes += j + 1 - start
        self.pend = buf[j + 1:end]
        n = buf.count(ASSISTANT, start, j)
        if not n:
            return
        if buf.find(BIG, start, j) >= 0:
            self.big_seen = True
            self._ids(buf, start, j)
            return
        i0 = buf.find(ASSISTANT, start, j) + SEQ_AT
        i1 = buf.rfind(ASSISTANT, start, j) + SEQ_AT
        try:
            s0, s1 = int(buf[i0:i0 + 8]), int(buf[i1:i1 + 8])
        except ValueError:
            s0, s1 = -1, -2
        if s0 == self.seq_next and s1 - s0 + 1 == n:
            self.seq_next = s1 + 1
        else:
            self._ids(buf, start, j)

    def _count_pend(self) -> None:
        """The held-back line turned out not to be the last one: count it."""
        pend = self.pend
        assert pend is not None
        self.crc = zlib.crc32(b"\n", zlib.crc32(pend, self.crc))
        self.nlines += 1
        self.nbytes += len(pend) + 1
        if pend.startswith(BIG):
            self.big_seen = True
        else:
            self._ids(pend, 0, len(pend))
        self.pend = None

    def _ids(self, buf: bytes, start: int, end: int) -> None:
        for m in ID_RE.finditer(buf, start, end):
            s = int(m.group(1))
            if s != self.seq_next:
                self.seq_bad += 1
            self.seq_next = s + 1

    def at_result(self) -> bool:
        """The newest complete line is a result line (a turn on the fake's stdout has ended)."""
        return self.pend is not None and RESULT in self.pend

    def init(self) -> dict[str, Any]:
        try:
            d = json.loads(self.first) if self.first else None
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}

    def verdict(self) -> list[str]:
        """The problems; an empty list means the stream is exactly what the fake wrote."""
        problems = []
        init = self.init()
        if not (init.get("type") == "system" and init.get("subtype") == "init" and init.get("session_id")):
            problems.append(f"first line is not system/init with a session_id: {(self.first or b'')[:200]!r}")
        try:
            result = json.loads(self.pend) if self.pend else None
        except ValueError:
            result = None
        if not (isinstance(result, dict) and result.get("type") == "result"):
            problems.append(f"last line is not a result: {(self.pend or b'')[:200]!r}")
        else:
            mine = {"lines": self.nlines, "bytes": self.nbytes, "crc32": self.crc}
            if result.get("fake_digest") != mine:
                problems.append(f"digest mismatch: fake {result.get('fake_digest')}, received {mine}")
        got = self.seq_next - 1
        if self.seq_bad or got != self.expect_lines:
            problems.append(f"assistant lines: last id {got} of {self.expect_lines}, {self.seq_bad} out of order")
        if self.expect_big and not self.big_seen:
            problems.append("giant line missing")
        if self.id_bad:
            problems.append(f"event ids not increasing ({self.id_bad} frames)")
        if self.no_id:
            problems.append(f"CLI frames without an id: {self.no_id}")
        return problems

    def lines_received(self) -> int:
        return max(0, self.seq_next - 1 - self.seq_bad)


class Result:
    """One request (or one floor turn): timings (perf_counter), status, headers, the verdict."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.t_headers: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.complete = False
        self.error: str | None = None
        self.problems: list[str] = []
        self.comments = 0
        self.verifier: Verifier | None = None
        self.body_crc: int | None = None  # of the whole de-chunked body, when asked for
        self.body_len = 0
        self.chunks = 0  # HTTP chunks (how the server batched its writes)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def session_id(self) -> str | None:
        return self.headers.get("x-session-id")

    def first_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t0

    def end_s(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t0


class SSEClient(asyncio.Protocol):
    """
    HTTP/1.1 response parsing (chunked, or close-delimited), SSE framing, and the Verifier, in bulk:
    chunk data is collected as memoryview slices and framed once enough has arrived (always at once
    until the first frame, so its time is exact). Optionally: the crc32 of the whole body, and the
    body's pieces kept in a list (for the client ceiling).
    """

    BATCH = 256 << 10

    def __init__(self, res: Result, verifier: Verifier, loop: asyncio.AbstractEventLoop,
                 body_crc: bool = False, save: list[bytes] | None = None) -> None:
        self.res, self.v = res, verifier
        res.verifier = verifier
        if body_crc:
            res.body_crc = 0
        self.save = save
        self.head = bytearray()
        self.mode: str | None = None
        self.rem = 0
        self.crlf = False
        self.trailer = False
        self.leftover = b""
        self.pieces: list[Any] = []
        self.npend = 0
        self.tail: list[bytes] = []
        self.tail_len = 0
        self.tail_nl = False
        self.done: asyncio.Future[None] = loop.create_future()
        self.first: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _finish(self, error: str | None = None) -> None:
        res = self.res
        if res.t_end is None:
            res.t_end = time.perf_counter()
        if error and not res.error:
            res.error = error
        for f in (self.first, self.done):
            if not f.done():
                f.set_result(None)

    def data_received(self, data: bytes) -> None:
        res = self.res
        if self.mode is None:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            res.t_headers = time.perf_counter()
            head = bytes(self.head[:i]).decode("latin-1").split("\r\n")
            data = bytes(self.head[i + 4:])
            self.head = bytearray()
            try:
                res.status = int(head[0].split()[1])
            except (IndexError, ValueError):
                self._fail(f"bad status line {head[0][:80]!r}")
                return
            res.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            self.mode = "chunked" if "chunked" in res.headers.get("transfer-encoding", "").lower() else "close"
            if self.mode == "close" and "content-length" in res.headers:
                self.mode, self.rem = "length", int(res.headers["content-length"])
                res.complete = self.rem == 0
        if self.mode == "chunked":
            self._dechunk(data)
        elif data:
            if self.mode == "length":
                data = data[:self.rem]
                self.rem -= len(data)
                res.complete = self.rem == 0
            self.pieces.append(data)
            self.npend += len(data)
        if res.error:
            return
        if res.t_first is None or self.npend >= self.BATCH or res.complete:
            self._frames(final=res.complete)
        if res.complete:
            self._finish()
            assert self.transport is not None
            self.transport.close()

    def _fail(self, error: str) -> None:
        self._finish(error)
        assert self.transport is not None
        self.transport.abort()

    def _dechunk(self, data: bytes) -> None:
        if self.leftover:
            data = self.leftover + data
            self.leftover = b""
        n = len(data)
        i = 0
        mv = memoryview(data)
        while i < n:
            if self.rem:
                take = self.rem if self.rem <= n - i else n - i
                self.pieces.append(mv[i:i + take])
                self.npend += take
                i += take
                self.rem -= take
                if not self.rem:
                    self.crlf = True
            elif self.crlf:
                if n - i < 2:
                    break
                if data[i:i + 2] != b"\r\n":
                    self._fail("chunk data not followed by CRLF")
                    return
                i += 2
                self.crlf = False
            else:
                e = data.find(b"\r\n", i)
                if e < 0:
                    break
                if self.trailer:  # after the last chunk: trailer lines, then an empty line
                    empty = e == i
                    i = e + 2
                    if empty:
                        self.res.complete = True
                        return
                    continue
                try:
                    size = int(data[i:e].split(b";")[0], 16)
                except ValueError:
                    self._fail(f"bad chunk size {data[i:e][:20]!r}")
                    return
                i = e + 2
                if size == 0:
                    self.trailer = True
                else:
                    self.rem = size
                    self.res.chunks += 1
        if i < n:
            self.leftover = bytes(mv[i:])

    def _frames(self, final: bool) -> None:
        """Split the complete SSE frames off what arrived and feed their payloads to the verifier.
        Data without a frame end is only collected (a 64 MiB line is joined once, not once a batch)."""
        new = b"".join(self.pieces) if len(self.pieces) != 1 else bytes(self.pieces[0])
        self.pieces = []
        self.npend = 0
        res = self.res
        if new:
            res.body_len += len(new)
            if res.body_crc is not None:
                res.body_crc = zlib.crc32(new, res.body_crc)
            if self.save is not None:
                self.save.append(new)
        e = new.rfind(b"\n\n")
        if e >= 0:
            end = self.tail_len + e + 2
        elif self.tail_nl and new.startswith(b"\n"):
            end = self.tail_len + 1
        else:
            end = -1
        if new:
            self.tail.append(new)
            self.tail_len += len(new)
            self.tail_nl = new.endswith(b"\n")
        if end < 0:
            if final and self.tail_len and b"".join(self.tail).strip():
                res.problems.append(f"stream ended inside a frame: {b''.join(self.tail)[:80]!r}")
            return
        body = b"".join(self.tail) if len(self.tail) > 1 else self.tail[0]
        rest = body[end:]
        self.tail = [rest] if rest else []
        self.tail_len = len(rest)
        self.tail_nl = rest.endswith(b"\n")
        if final and rest.strip():
            res.problems.append(f"stream ended inside a frame: {rest[:80]!r}")
        for frame in self.v.sse(body, 0, end):
            if frame.startswith(b":"):
                res.comments += 1
            else:
                res.problems.append(f"frame that is not one data line: {frame[:80]!r}")
        if res.t_first is None and self.v.first is not None:
            res.t_first = time.perf_counter()
            if not self.first.done():
                self.first.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.res.complete:
            self._frames(final=True)
            self._finish("connection closed before the end of the stream" + (f": {exc}" if exc else ""))
        else:
            self._finish()


async def request(port: int, method: str, path: str, verifier: Verifier, timeout: float, body: bytes = b"",
                  headers: dict[str, str] | None = None, stall_s: float = 0.0, body_crc: bool = False,
                  save: list[bytes] | None = None) -> Result:
    """One request on a fresh connection, its SSE response read and checked to the end."""
    loop = asyncio.get_running_loop()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{extra}"
            + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else "")
            + "Connection: close\r\n\r\n")
    req = head.encode("latin-1") + body
    res = Result(time.perf_counter())
    try:
        tr, pr = await asyncio.wait_for(
            loop.create_connection(lambda: SSEClient(res, verifier, loop, body_crc, save), "127.0.0.1", port),
            timeout)
    except (OSError, TimeoutError) as e:
        res.error = f"connect: {e!r}"
        res.t_end = time.perf_counter()
        res.problems.append(res.error)
        return res
    tr.write(req)
    try:
        if stall_s:
            await asyncio.wait_for(asyncio.shield(pr.first), timeout)
            tr.pause_reading()
            await asyncio.sleep(stall_s)
            tr.resume_reading()
        await asyncio.wait_for(asyncio.shield(pr.done), timeout)
    except TimeoutError:
        res.error = f"timeout after {timeout}s"
        tr.abort()
        res.t_end = res.t_end or time.perf_counter()
    if res.error:
        res.problems.insert(0, res.error)
    if res.status != 200:
        res.problems.insert(0, f"HTTP status {res.status}")
    elif not res.complete:
        res.problems.append("no terminating chunk")
    res.problems += verifier.verdict()
    return res


async def post(port: int, shape: dict[str, Any], timeout: float, session_id: str | None = None,
               **kw: Any) -> Result:
    """One POST /api/claude: a turn (a new session, or a follow-up with session_id)."""
    payload: dict[str, Any] = {"prompt": prompt_for(shape)}
    if session_id:
        payload["session_id"] = session_id
    r = await request(port, "POST", "/api/claude", Verifier(*expect(shape)), timeout, json.dumps(payload).encode(),
                      **kw)
    if r.status == 200 and not r.session_id:
        r.problems.append("no X-Session-Id header")
    return r


async def events(port: int, session_id: str, after: int, shape: dict[str, Any], timeout: float,
                 **kw: Any) -> Result:
    """GET /api/sessions/<id>/events with Last-Event-ID: the logged events after it, as SSE."""
    return await request(port, "GET", f"/api/sessions/{session_id}/events", Verifier(*expect(shape)), timeout,
                         headers={"Last-Event-ID": str(after)}, **kw)


async def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A small GET: status and (de-chunked) body."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    if any(h.lower().startswith(b"transfer-encoding:") and b"chunked" in h.lower() for h in lines[1:]):
        out, i = bytearray(), 0
        while True:
            e = body.find(b"\r\n", i)
            size = int(body[i:e].split(b";")[0], 16)
            if not size:
                break
            out += body[e + 2:e + 2 + size]
            i = e + 4 + size
        body = bytes(out)
    return status, body


# ------------------------------------------------------------------------------------------- the floor

class SdkFake:
    """The fake in SDK streaming mode over pipes, driven as the daemon drives it: initialize, then one
    user line per turn, each read (through the checker) up to its result line."""

    def __init__(self, fake: str, cwd: str) -> None:
        self.t0 = time.perf_counter()
        self.p = subprocess.Popen([fake, *SDK_ARGV, f"--session-id={uuid.uuid4()}"], cwd=cwd,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        assert self.p.stdin is not None and self.p.stdout is not None
        self.w, self.r = self.p.stdin.fileno(), self.p.stdout.fileno()

    def initialize(self) -> float:
        os.write(self.w, INITIALIZE)
        buf = b""
        while not buf.endswith(b"\n"):
            data = os.read(self.r, MIB)
            if not data:
                raise RuntimeError("the fake ended before answering initialize")
            buf += data
        if not buf.startswith(b'{"type":"control_response"'):
            raise RuntimeError(f"unexpected answer to initialize: {buf[:200]!r}")
        return time.perf_counter() - self.t0

    def turn(self, shape: dict[str, Any]) -> Result:
        """One turn: time to its first stdout line and to its result line."""
        msg = user_line(prompt_for(shape))
        v = Verifier(*expect(shape))
        res = Result(time.perf_counter())
        res.verifier = v
        os.write(self.w, msg)
        pend: list[bytes] = []  # a partial line, in pieces (a 64 MiB line is joined once)
        while True:
            data = os.read(self.r, MIB)
            if not data:
                res.problems.append("the fake ended mid-turn")
                break
            j = data.rfind(b"\n")
            if j < 0:
                pend.append(data)
                continue
            if res.t_first is None:
                res.t_first = time.perf_counter()
            if pend:
                pend.append(data[:j])
                v.lines(b"".join(pend))
            else:
                v.lines(data, 0, j)
            pend = [data[j + 1:]] if j + 1 < len(data) else []
            if not pend and v.at_result():
                break
        res.t_end = time.perf_counter()
        res.status, res.complete = 200, True
        res.problems += v.verdict()
        return res

    def close(self) -> int:
        """stdin EOF: the fake exits."""
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.close()
        while os.read(self.r, MIB):
            pass
        self.p.stdout.close()
        try:
            return self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()


def sdk_turns(fake: str, cwd: str, shape: dict[str, Any], n: int, warmup: int) -> tuple[list[Result], float]:
    """The warm-turn floor: one fake, initialize, warmup + n turns one after another."""
    f = SdkFake(fake, cwd)
    try:
        init_s = f.initialize()
        for _ in range(warmup):
            f.turn(shape)
        rs = [f.turn(shape) for _ in range(n)]
    finally:
        f.close()
    return rs, init_s


def sdk_one(fake: str, cwd: str, shape: dict[str, Any]) -> Result:
    """One big turn on a fresh, initialized fake (the floor of the stream measures)."""
    f = SdkFake(fake, cwd)
    try:
        f.initialize()
        return f.turn(shape)
    finally:
        f.close()


async def direct_concurrent(fake: str, cwd: str, shape: dict[str, Any], c: int) -> tuple[list[Result], float]:
    """
    The floor for C new sessions at once: spawn the fakes one after another as fast as this process
    can, each given initialize and its user line at once, then read every stdout from the event loop.
    A stream is complete at its result line; then stdin is closed and the fakes exit.
    """
    loop = asyncio.get_running_loop()
    msg = INITIALIZE + user_line(prompt_for(shape))
    t0 = time.perf_counter()
    results: list[Result] = []
    pending = c
    all_done: asyncio.Future[None] = loop.create_future()

    def reader(fd: int, res: Result, v: Verifier, parts: list[bytes]) -> None:
        nonlocal pending
        eof = False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            parts.append(data)
        out = b"".join(parts)
        if res.t_first is None and out.find(b"\n", out.find(b'{"type":"control_response"') + 1) >= 0:
            res.t_first = time.perf_counter()  # a line after the answer to initialize
        if not eof:
            if not out.endswith(b"\n"):
                return
            k = out.rfind(b"\n", 0, len(out) - 1)
            if RESULT not in out[k + 1:]:
                return
        res.t_end = time.perf_counter()
        loop.remove_reader(fd)
        while out.startswith(b'{"type":"control_'):  # the answer to initialize: not part of the turn
            out = out[out.find(b"\n") + 1:]
        v.lines(out, 0, len(out) - 1 if out.endswith(b"\n") else len(out))
        res.problems = v.verdict() + (["the fake ended mid-turn"] if eof else [])
        res.verifier = v
        pending -= 1
        if not pending and not all_done.done():
            all_done.set_result(None)

    procs = []
    for _ in range(c):
        res = Result(t0)
        results.append(res)
        try:
            p = subprocess.Popen([fake, *SDK_ARGV, f"--session-id={uuid.uuid4()}"], cwd=cwd, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        except OSError as e:
            res.problems = [f"spawn: {e!r}"]
            pending -= 1
            continue
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(msg)
        fd = p.stdout.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, reader, fd, res, Verifier(*expect(shape)), [])
        procs.append(p)
    if pending:
        await all_done
    wall = time.perf_counter() - t0
    for p in procs:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
    for p in procs:
        p.wait()
        p.stdout.close()  # type: ignore[union-attr]
    return results, wall


BLASTER = """
import os, socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept(); head = b""
while b"\\r\\n\\r\\n" not in head:
    head += c.recv(65536)
with open(sys.argv[1], "rb") as f:
    c.sendfile(f)
c.close()
"""


async def client_ceiling(pieces: list[bytes], shape: dict[str, Any], work: str, timeout: float) -> Result:
    """This client against the very bytes the daemon sent (the body's pieces, as they arrived, each
    one chunk), served by sendfile() from another process: its own ceiling."""
    path = os.path.join(work, "ceiling.http")
    with open(path, "wb") as f:
        f.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            f.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        f.write(b"0\r\n\r\n")
    pieces.clear()
    b = subprocess.Popen([sys.executable, "-c", BLASTER, path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert b.stdout is not None
        port = int(b.stdout.readline())
        return await request(port, "GET", "/", Verifier(*expect(shape)), timeout)
    finally:
        b.wait(30)
        os.unlink(path)


CANNED = """
import asyncio, sys
answer = open(sys.argv[1], "rb").read()
async def reply(r, w):
    head = await r.readuntil(b"\\r\\n\\r\\n")
    n = [int(h.split(b":")[1]) for h in head.split(b"\\r\\n") if h.lower().startswith(b"content-length:")]
    await r.readexactly(n[0] if n else 0)
    w.write(answer)
    await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(reply, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""


async def canned_http(fake: str, cwd: str, shape: dict[str, Any], n: int, work: str, timeout: float) -> list[Result]:
    """This client's POSTs against a minimal asyncio server that answers each at once with a canned SSE
    turn (the fake's lines, framed as claudesrv frames them): what a fresh loopback HTTP round trip and
    this client cost, before any daemon work."""
    out = subprocess.run([fake, *SDK_ARGV], input=INITIALIZE + user_line(prompt_for(shape)), cwd=cwd,
                         capture_output=True, check=True).stdout
    frames = b"".join(b"id: %d\ndata: %b\n\n" % (i + 1, line) for i, line in enumerate(out.split(b"\n")[1:-1]))
    path = os.path.join(work, "canned.http")
    with open(path, "wb") as f:
        f.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Session-Id: canned\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(frames), frames))
    srv = subprocess.Popen([sys.executable, "-c", CANNED, path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        return [await post(port, shape, timeout) for _ in range(n)]
    finally:
        srv.kill()
        srv.wait()
        os.unlink(path)


# ------------------------------------------------------------------------------------------- processes

def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def proc_stat(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat fields after the command name (field 3 = state is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(b")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    f = proc_stat(pid)
    return None if f is None else (int(f[11]) + int(f[12])) / CLK_TCK


def children(pid: int, exe: str | None = None) -> list[int]:
    """The live children of pid (optionally only those running exe), from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = proc_stat(int(d))
        if f is None or int(f[1]) != pid or f[0] == b"Z":
            continue
        if exe is not None:
            try:
                if os.readlink(f"/proc/{d}/exe") != exe:
                    continue
            except OSError:
                continue
        out.append(int(d))
    return out


def rss_mb(pids: list[int]) -> float:
    return round(sum(proc_status(p).get("VmRSS", 0) for p in pids) / 1024, 1)


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    try:
        with open("/proc/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(rows[1][rows[0].index("ListenOverflows")])
    except (OSError, ValueError, IndexError):
        return None


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


class RssWatch:
    """RSS of a pid over a measure: VmRSS before, VmHWM after resetting it (clear_refs 5)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_kb = proc_status(pid).get("VmRSS", 0)
        self.cpu0 = cpu_seconds(pid)
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self.hwm_ok = True
        except OSError:
            self.hwm_ok = False

    def stop(self) -> dict[str, Any]:
        st = proc_status(self.pid)
        peak = max(st.get("VmHWM", 0) if self.hwm_ok else 0, st.get("VmRSS", 0))
        cpu1 = cpu_seconds(self.pid)
        return {"rss_start_mb": round(self.start_kb / 1024, 1), "rss_peak_mb": round(peak / 1024, 1),
                "rss_growth_mb": round((peak - self.start_kb) / 1024, 1),
                "rss_end_mb": round(st.get("VmRSS", 0) / 1024, 1), "peak_from": "VmHWM" if self.hwm_ok else "VmRSS",
                "server_cpu_s": r3(cpu1 - self.cpu0) if cpu1 is not None and self.cpu0 is not None else None}


class ChildWatch:
    """Samples the daemon's live CLI children every 200 ms: the most at once."""

    def __init__(self, pid: int, exe: str) -> None:
        self.pid, self.exe, self.most = pid, exe, 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.most = max(self.most, len(children(self.pid, self.exe)))
            await asyncio.sleep(0.2)

    def stop(self) -> int:
        self.task.cancel()
        return self.most


class Daemon:
    """``twistd -n claudesrv`` in a process group of its own, with a data dir of its own."""

    def __init__(self, args: argparse.Namespace, fake: str, label: str, opts: list[str]) -> None:
        self.args, self.fake, self.label, self.opts = args, fake, label, opts
        self.p: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.spy: subprocess.Popen[bytes] | None = None
        self.leftover_clis = 0

    def start(self) -> Daemon:
        a = self.args
        self.data = tempfile.mkdtemp(prefix=f"daemon-{self.label}-", dir=a.work_dir)
        self.logfile = os.path.join(self.data, "twistd.log")
        os.makedirs(os.path.join(self.data, "state"))
        cmd = [*TWISTD, "-n", "--pidfile=", f"--logfile={self.logfile}", "claudesrv", "--listen", a.listen,
               "--claude", self.fake, "--data-dir", os.path.join(self.data, "state"), *self.opts, *a.daemon_arg]
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.out = open(os.path.join(self.data, "stdout.log"), "wb")
        self.p = subprocess.Popen(cmd, cwd=self.data, stdin=subprocess.DEVNULL, stdout=self.out, env=env,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        while not self.port:
            if self.p.poll() is not None:
                raise SystemExit(f"twistd exited with {self.p.returncode}; see {self.logfile} "
                                 f"and {self.out.name}; command: {' '.join(cmd[3:])}")
            if time.perf_counter() - t0 > 30:
                self.stop()
                raise SystemExit(f"twistd did not log 'Site starting on' within 30 s; see {self.logfile}")
            time.sleep(0.02)
            try:
                with open(self.logfile, "rb") as f:
                    m = re.search(rb"Site starting on (\d+)", f.read())
            except OSError:
                m = None
            if m:
                self.port = int(m.group(1))
        self.start_s = time.perf_counter() - t0
        if a.py_spy:
            out = os.path.join(a.work_dir, f"py-spy-{self.label}.txt")
            self.spy = subprocess.Popen([a.py_spy, "record", "--pid", str(self.p.pid), "--format", "raw",
                                         "--threads", "--idle", "--nonblocking", "--rate", "200", "-o", out],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            log(f"  py-spy recording daemon pid {self.p.pid} into {out}")
        return self

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def clis(self) -> list[int]:
        return children(self.pid, self.fake)

    def stop(self) -> None:
        """SIGTERM to the group we created; SIGKILL what stays; then any CLI of this daemon still alive
        (the daemon may start its CLIs in sessions of their own) is counted and killed by pid."""
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)
            try:
                self.spy.wait(15)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
            self.spy = None
        if self.p is None:
            return
        clis = self.clis()
        pg = self.p.pid
        try:
            os.killpg(pg, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            log(f"  daemon {self.label} still running 15 s after SIGTERM: SIGKILL")
        try:
            os.killpg(pg, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()
        self.p = None
        self.out.close()
        deadline = time.perf_counter() + 5
        while True:  # the CLIs get EOF on stdin when the daemon is gone, and exit
            alive = [c for c in clis if proc_stat(c) is not None and proc_stat(c)[0] != b"Z"]  # type: ignore[index]
            if not alive or time.perf_counter() > deadline:
                break
            time.sleep(0.05)
        self.leftover_clis = len(alive)
        for c in alive:
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if alive:
            log(f"  {len(alive)} CLI(s) of daemon {self.label} still alive 5 s after it stopped: killed")
        if not self.args.keep:
            shutil.rmtree(self.data, ignore_errors=True)


METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", re.M)
METRIC_TYPE = re.compile(r"^# TYPE (\S+) (\w+)", re.M)


def spare_samples(text: str, pattern: re.Pattern[str] | None) -> tuple[list[tuple[str, float]], bool]:
    """
    The /metrics samples that count spares, and whether they count ready ones only: those matching
    --spare-metric (taken as ready), else the gauges whose name or labels mention "spare" (ready only
    if some mention "ready" too: then just those).
    """
    gauges = {m.group(1) for m in METRIC_TYPE.finditer(text) if m.group(2) == "gauge"}
    out = []
    for m in METRIC_LINE.finditer(text):
        name = m.group(1) + (m.group(2) or "")
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if pattern is not None:
            if pattern.search(name):
                out.append((name, value))
        elif m.group(1) in gauges and "spare" in name.lower():
            out.append((name, value))
    if pattern is not None:
        return out, True
    ready = [(n, v) for n, v in out if "ready" in n.lower()]
    return (ready, True) if ready else (out, False)


# ------------------------------------------------------------------------------------------- measures

def timings(rs: list[Result], which: str) -> list[float]:
    """Seconds from each good request's start to its first frame or its end."""
    out = []
    for r in rs:
        t = r.first_s() if which == "first" else r.end_s()
        if r.ok and t is not None:
            out.append(t)
    return out


def problems(rs: list[Result], limit: int = 4) -> list[str]:
    seen: dict[str, int] = {}
    for r in rs:
        for p in r.problems:
            seen[p[:160]] = seen.get(p[:160], 0) + 1
    return [f"{k} (x{v})" for k, v in sorted(seen.items(), key=lambda kv: -kv[1])[:limit]]


def latency_block(rs: list[Result]) -> dict[str, Any]:
    first = timings(rs, "first")
    end = timings(rs, "end")
    return {"turns": len(rs), "failed": sum(1 for r in rs if not r.ok),
            "first_p50_ms": ms(pct(first, 50)), "first_p90_ms": ms(pct(first, 90)),
            "first_p99_ms": ms(pct(first, 99)), "end_p50_ms": ms(pct(end, 50)), "end_p99_ms": ms(pct(end, 99)),
            "problems": problems(rs)}


def stream_metrics(r: Result) -> dict[str, Any]:
    v = r.verifier
    assert v is not None
    secs = r.end_s()
    return {"ok": r.ok, "seconds": r3(secs), "payload_mb": round(v.payload_bytes / 1e6, 3),
            "mb_per_s": round(v.payload_bytes / 1e6 / secs, 1) if secs else None,
            "first_ms": ms(r.first_s()), "lines_expected": v.expect_lines, "lines_received": v.lines_received(),
            "lines_lost": v.expect_lines - v.lines_received(), "own_events": v.nown,
            "http_chunks": r.chunks, "problems": r.problems[:4]}


class Bench:
    def __init__(self, args: argparse.Namespace, fake: str) -> None:
        self.a = args
        self.fake = fake
        self.s = replace(QUICK if args.quick else FULL, **args.size_overrides)
        self.direct_cwd = tempfile.mkdtemp(prefix="direct-", dir=args.work_dir)
        self.timeout = args.timeout
        self.spare_re = re.compile(args.spare_metric) if args.spare_metric else None

    def mb_shape(self, mb: float) -> dict[str, Any]:
        return {"lines": int(mb * 1e6 // self.s.line_bytes), "line_bytes": self.s.line_bytes}

    async def daemon(self, label: str, opts: list[str]) -> Daemon:
        d = Daemon(self.a, self.fake, label, opts).start()
        await asyncio.sleep(0.3)  # let the spares start
        return d

    async def with_daemon(self, label: str, opts: list[str],
                          body: Callable[[Daemon], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        if self.a.floor_only:
            return {}
        d = await self.daemon(label, opts)
        try:
            out = await body(d)
        finally:
            d.stop()
        out["daemon_start_s"] = round(d.start_s, 3)
        out["leftover_clis"] = d.leftover_clis
        return out

    async def spares_ready(self, port: int) -> tuple[float, bool] | None:
        """Spares by /metrics, and whether the figure counts ready ones only; None: no such metric."""
        try:
            status, body = await http_get(port, "/metrics")
        except (OSError, TimeoutError, ValueError, IndexError):
            return None
        if status != 200:
            return None
        samples, ready = spare_samples(body.decode("utf-8", "replace"), self.spare_re)
        return (sum(v for _, v in samples), ready) if samples else None

    # -- follow-up turns on a warm session
    async def warm(self, rep: int) -> dict[str, Any]:
        shape = {"lines": 1}
        s = self.s
        floor, init_s = sdk_turns(self.fake, self.direct_cwd, shape, s.warm_n, s.warmup)

        async def body(d: Daemon) -> dict[str, Any]:
            first = await post(d.port, shape, self.timeout)
            sid = first.session_id
            if not first.ok or not sid:
                return {"claudesrv": {"failed": s.warm_n, "problems": ["first turn: " + "; ".join(first.problems)]}}
            pid0 = first.verifier.init().get("fake_pid") if first.verifier else None
            for _ in range(s.warmup):
                await post(d.port, shape, self.timeout, sid)
            w = RssWatch(d.pid)
            rs = [await post(d.port, shape, self.timeout, sid) for _ in range(s.warm_n)]
            rss = w.stop()
            other_pid = id_regress = 0
            gaps: list[int] = []
            prev_last = None
            for r in rs:
                v = r.verifier
                assert v is not None
                if v.init().get("fake_pid") != pid0:
                    other_pid += 1
                    r.problems.append(f"turn ran in another CLI process ({v.init().get('fake_pid')}, not {pid0})")
                if prev_last is not None and v.first_id is not None:
                    if v.first_id <= prev_last:
                        id_regress += 1
                        r.problems.append(f"first event id {v.first_id} not above the last turn's {prev_last}")
                    else:
                        gaps.append(v.first_id - prev_last - 1)
                prev_last = v.last_id
            last = rs[-1].verifier if rs else None
            per_turn = (last.last_id - last.first_id + 1 if last and last.first_id is not None
                        and last.last_id is not None else None)
            return {"claudesrv": {**latency_block(rs), **rss, "other_process": other_pid,
                                  "id_regressions": id_regress, "id_gap_between_turns_max": max(gaps, default=None),
                                  "events_per_turn": per_turn}}

        canned = await canned_http(self.fake, self.direct_cwd, shape, s.warm_n, self.a.work_dir, self.timeout)
        out = await self.with_daemon(f"warm-{rep}", [], body)
        return {"floor": {**latency_block(floor), "cold_initialize_ms": ms(init_s)},
                "canned_http": latency_block(canned), **out}

    # -- new sessions from a spare
    async def spare(self, rep: int) -> dict[str, Any]:
        shape = {"lines": 1}
        s = self.s
        floor, _ = sdk_turns(self.fake, self.direct_cwd, shape, s.warm_n, s.warmup)

        async def wait_spare(port: int) -> tuple[float, str]:
            """Until /metrics shows a spare (then --spare-settle more, if the metric counts starting ones
            too), or --spare-wait if it has no such metric."""
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < self.a.spare_timeout:
                got = await self.spares_ready(port)
                if got is None:
                    await asyncio.sleep(self.a.spare_wait)
                    return time.perf_counter() - t0, "slept"
                n, ready = got
                if n >= 1:
                    if not ready:
                        await asyncio.sleep(self.a.spare_settle)
                    return time.perf_counter() - t0, "ready" if ready else "spare+settle"
                await asyncio.sleep(0.01)
            return time.perf_counter() - t0, "timeout"

        async def body(d: Daemon) -> dict[str, Any]:
            for _ in range(s.warmup):
                await wait_spare(d.port)
                await post(d.port, shape, self.timeout)
            w = RssWatch(d.pid)
            rs, waits, how = [], [], {"ready": 0, "spare+settle": 0, "slept": 0, "timeout": 0}
            prestarted = 0
            for _ in range(s.spare_n):
                wt, why = await wait_spare(d.port)
                waits.append(wt)
                how[why] += 1
                before = set(d.clis())  # the CLIs alive before the POST: a spare is one of them
                r = await post(d.port, shape, self.timeout)
                rs.append(r)
                prestarted += bool(r.verifier and r.verifier.init().get("fake_pid") in before)
            rss = w.stop()
            ids = {r.session_id for r in rs if r.session_id}
            return {"claudesrv": {**latency_block(rs), **rss, "distinct_sessions": len(ids),
                                  "spare_wait_p50_ms": ms(pct(waits, 50)), "spare_wait_max_ms": ms(max(waits)),
                                  "paced_by": how, "cli_prestarted": prestarted,
                                  "cli_not_prestarted": len(rs) - prestarted, "live_clis_end": len(d.clis())}}

        # room for every session and the spare: at --max-live the daemon starts no spare (it would have to
        # put an idle session to sleep for it), so new sessions would be cold, not what is measured here
        opts = ["--max-live", str(s.spare_n + s.warmup + 10)]
        out = await self.with_daemon(f"spare-{rep}", opts, body)
        return {"floor": latency_block(floor), **out}

    # -- one big turn: throughput, giant, slow reader
    async def one_stream(self, name: str, rep: int, shape: dict[str, Any], stall_s: float = 0.0,
                         ceiling: bool = False) -> dict[str, Any]:
        c0 = time.process_time()
        fr = sdk_one(self.fake, self.direct_cwd, shape)
        floor = {**stream_metrics(fr), "client_cpu_s": r3(time.process_time() - c0)}

        async def body(d: Daemon) -> dict[str, Any]:
            await post(d.port, {"lines": 1}, self.timeout)  # the daemon's first turn, so imports are done
            await asyncio.sleep(0.2)
            w = RssWatch(d.pid)
            save: list[bytes] | None = [] if ceiling else None
            c0 = time.process_time()
            r = await post(d.port, shape, self.a.long_timeout, stall_s=stall_s, save=save)
            client_cpu = time.process_time() - c0
            rss = w.stop()
            await asyncio.sleep(0.3)
            rss["rss_after_mb"] = round(proc_status(d.pid).get("VmRSS", 0) / 1024, 1)
            srv = {**stream_metrics(r), **rss, "client_cpu_s": r3(client_cpu),
                   "data_dir_mb": round(dir_bytes(os.path.join(d.data, "state")) / 1e6, 1)}
            if stall_s:
                srv["stall_s"] = stall_s
            out: dict[str, Any] = {"claudesrv": srv}
            if save is not None:
                out["ceiling"] = stream_metrics(await client_ceiling(save, shape, self.a.work_dir,
                                                                     self.a.long_timeout))
            return out

        out = await self.with_daemon(f"{name}-{rep}", [], body)
        return {"floor": floor, **out}

    async def throughput(self, rep: int) -> dict[str, Any]:
        return await self.one_stream("throughput", rep, self.mb_shape(self.s.tp_mb), ceiling=True)

    async def giant(self, rep: int) -> dict[str, Any]:
        return await self.one_stream("giant", rep, {"lines": 1, "big_line_bytes": self.s.giant_mib * MIB})

    async def slow_reader(self, rep: int) -> dict[str, Any]:
        return await self.one_stream("slow_reader", rep, self.mb_shape(self.s.slow_mb), stall_s=self.s.stall_s)

    # -- replay of a session log to a client that reattaches
    async def replay(self, rep: int) -> dict[str, Any]:
        shape = self.mb_shape(self.s.replay_mb)

        async def body(d: Daemon) -> dict[str, Any]:
            await post(d.port, {"lines": 1}, self.timeout)  # warm the daemon up (another session)
            save: list[bytes] = []
            p = await post(d.port, shape, self.a.long_timeout, body_crc=True, save=save)
            sid = p.session_id
            pv = p.verifier
            assert pv is not None
            if not p.ok or not sid:
                return {"claudesrv": {"ok": False, "problems": ["POST: " + "; ".join(p.problems[:3])]}}
            await asyncio.sleep(0.2)
            w = RssWatch(d.pid)
            g = await events(d.port, sid, 0, shape, self.a.long_timeout, body_crc=True)
            rss = w.stop()
            gv = g.verifier
            assert gv is not None
            exact = g.body_len == p.body_len and g.body_crc == p.body_crc
            if not exact:
                g.problems.append(f"replay differs from the POST stream: {g.body_len} bytes crc {g.body_crc} "
                                  f"ids {gv.first_id}..{gv.last_id}, POST {p.body_len} bytes crc {p.body_crc} "
                                  f"ids {pv.first_id}..{pv.last_id}")
            ceiling = await client_ceiling(save, shape, self.a.work_dir, self.a.long_timeout)
            return {"claudesrv": {**stream_metrics(g), "byte_exact": exact, "body_bytes": g.body_len,
                                  "post_body_bytes": p.body_len, "post_mb_per_s": stream_metrics(p)["mb_per_s"],
                                  "first_id": gv.first_id, "last_id": gv.last_id, **rss,
                                  "log_mb": round(dir_bytes(os.path.join(d.data, "state")) / 1e6, 1)},
                    "ceiling": stream_metrics(ceiling)}

        out = await self.with_daemon(f"replay-{rep}", [], body)
        out["floor"] = out.get("ceiling", {})
        return out

    # -- many idle warm sessions
    async def idle(self, rep: int) -> dict[str, Any]:
        shape = {"lines": 1}
        n = self.s.idle_sessions

        async def body(d: Daemon) -> dict[str, Any]:
            start_rss = proc_status(d.pid).get("VmRSS", 0) / 1024
            sem = asyncio.Semaphore(4)

            async def one(sid: str | None = None) -> Result:
                async with sem:
                    return await post(d.port, shape, self.timeout, sid)

            t0 = time.perf_counter()
            firsts = await asyncio.gather(*[one() for _ in range(n)])
            create_s = time.perf_counter() - t0
            await asyncio.sleep(1.0)
            clis = d.clis()
            st = proc_status(d.pid)
            rss = st.get("VmRSS", 0) / 1024
            again = await asyncio.gather(*[one(r.session_id) for r in firsts if r.ok and r.session_id])
            warm = 0
            for r0, r1 in zip([r for r in firsts if r.ok and r.session_id], again, strict=True):
                p0 = r0.verifier.init().get("fake_pid") if r0.verifier else None
                p1 = r1.verifier.init().get("fake_pid") if r1.verifier else None
                warm += r1.ok and p0 is not None and p0 == p1
            return {"claudesrv": {"sessions": n, "failed": sum(1 for r in firsts if not r.ok),
                                  "rss_mb": round(rss, 1), "rss_start_mb": round(start_rss, 1),
                                  "rss_per_session_kb": round((rss - start_rss) * 1024 / n, 1),
                                  "live_clis": len(clis), "clis_rss_mb": rss_mb(clis),
                                  "create_s": r3(create_s), "still_warm": warm, "not_warm": n - warm,
                                  "second_turn_failed": sum(1 for r in again if not r.ok),
                                  "problems": problems(list(firsts) + list(again))},
                    "floor": {"rss_mb": round(start_rss, 1)}}

        opts = ["--max-live", str(n + 10)]
        return await self.with_daemon(f"idle-{rep}", opts, body)

    # -- new sessions at once
    async def concurrency(self, rep: int) -> dict[str, Any]:
        s = self.s
        shape = {"lines": s.conc_lines, "delay_ms": s.conc_delay_ms}
        c = s.conc
        frs, fwall = await direct_concurrent(self.fake, self.direct_cwd, shape, c)

        def block(rs: list[Result], wall: float) -> dict[str, Any]:
            done = timings(rs, "end")
            first = timings(rs, "first")
            return {"clients": c, "failed": sum(1 for r in rs if not r.ok),
                    "completion_p50_ms": ms(pct(done, 50)), "completion_p99_ms": ms(pct(done, 99)),
                    "completion_max_ms": ms(max(done) if done else None),
                    "first_p50_ms": ms(pct(first, 50)), "first_p99_ms": ms(pct(first, 99)),
                    "wall_s": r3(wall), "problems": problems(rs)}

        async def body(d: Daemon) -> dict[str, Any]:
            w = RssWatch(d.pid)
            cw = ChildWatch(d.pid, self.fake)
            lo0 = listen_overflows()
            t0 = time.perf_counter()
            rs = await asyncio.gather(*[post(d.port, shape, self.timeout) for _ in range(c)])
            wall = time.perf_counter() - t0
            rss = w.stop()
            most = cw.stop()
            lo1 = listen_overflows()
            rss["listen_overflows"] = lo1 - lo0 if lo0 is not None and lo1 is not None else None
            await asyncio.sleep(1.0)
            rss["rss_after_mb"] = round(proc_status(d.pid).get("VmRSS", 0) / 1024, 1)
            for r in rs:
                r.t0 = t0  # completion is counted from the moment all requests were launched
            queued = sum(1 for r in rs if r.verifier and r.verifier.nown)
            return {"claudesrv": {**block(rs, wall), **rss, "most_clis": most, "queued_events": queued}}

        n = str(max(c, 200))
        # all the clients connect from 127.0.0.1: the per-address connection cap (default 64) is lifted
        opts = ["--spares", "0", "--max-runs", n, "--max-live", n, "--max-queue", str(2 * int(n)),
                "--max-connections-per-ip", "0"]
        out = await self.with_daemon(f"concurrency-{rep}", opts, body)
        return {"floor": block(frs, fwall), **out}


# ------------------------------------------------------------------------------------------- report

def dig(d: dict[str, Any], path: str) -> Any:
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def nums(runs: list[dict[str, Any]], path: str) -> list[float]:
    vals = [dig(r, path) for r in runs]
    return [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]


def med(runs: list[dict[str, Any]], path: str) -> float | None:
    vals = nums(runs, path)
    return statistics.median(vals) if vals else None


def span(runs: list[dict[str, Any]], path: str) -> tuple[float, float] | None:
    vals = nums(runs, path)
    return (min(vals), max(vals)) if vals else None


def fnum(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def fmt(x: Any, runs: list[dict[str, Any]] | None = None, path: str | None = None) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    s = fnum(x)
    if runs and path and len(runs) > 1:
        sp = span(runs, path)
        if sp and sp[0] != sp[1]:
            s += f" [{fnum(sp[0])}-{fnum(sp[1])}]"
    return s


def le(limit: float) -> Callable[[Any, Any], bool]:
    return lambda s, f: s is not None and s <= limit


def ge(limit: float) -> Callable[[Any, Any], bool]:
    return lambda s, f: s is not None and s >= limit


def floor_plus(extra: float) -> Callable[[Any, Any], bool]:
    return lambda s, f: s is not None and f is not None and s <= f + extra


def zero(s: Any, f: Any) -> bool:
    return s == 0


ALL = "all"  # target of boolean rows: true in every run

# (label, floor path, claudesrv path, target text, check(claudesrv median, floor median) -> bool, or ALL)
Row = tuple[str, str | None, str, str, Any]
ROWS: dict[str, list[Row]] = {
    "warm": [
        ("follow-up turn: POST to first frame p50 ms", "floor.first_p50_ms", "claudesrv.first_p50_ms",
         "<= floor + 3", floor_plus(3)),
        ("follow-up turn: first frame p99 ms", "floor.first_p99_ms", "claudesrv.first_p99_ms", "", None),
        ("(any HTTP server: a canned answer to this client, p50 ms)", "canned_http.first_p50_ms", "-", "", None),
        ("follow-up turn: end of turn p50 ms", "floor.end_p50_ms", "claudesrv.end_p50_ms", "", None),
        ("follow-up turn: failed", "floor.failed", "claudesrv.failed", "0", zero),
        ("follow-up turn: run by another CLI process", None, "claudesrv.other_process", "0", zero),
    ],
    "spare": [
        ("new session (spare): POST to first frame p50 ms", "floor.first_p50_ms", "claudesrv.first_p50_ms",
         "<= floor + 5", floor_plus(5)),
        ("new session (spare): first frame p99 ms", "floor.first_p99_ms", "claudesrv.first_p99_ms", "", None),
        ("new session (spare): failed", "floor.failed", "claudesrv.failed", "0", zero),
        ("new session (spare): CLI not started before the POST", None, "claudesrv.cli_not_prestarted", "0", zero),
        ("new session (spare): wait for a ready spare p50 ms", None, "claudesrv.spare_wait_p50_ms", "", None),
    ],
    "throughput": [
        ("200 MB in 1 kB lines: MB/s, every line checked", "floor.mb_per_s", "claudesrv.mb_per_s", ">= 100",
         ge(100)),
        ("200 MB in 1 kB lines: lines lost", "floor.lines_lost", "claudesrv.lines_lost", "0", zero),
        ("200 MB in 1 kB lines: client ceiling MB/s (same bytes, sendfile)", None, "ceiling.mb_per_s", "", None),
        ("200 MB in 1 kB lines: daemon CPU s", None, "claudesrv.server_cpu_s", "", None),
        ("200 MB in 1 kB lines: daemon RSS growth MB", None, "claudesrv.rss_growth_mb", "", None),
    ],
    "giant": [
        ("64 MiB line: seconds", "floor.seconds", "claudesrv.seconds", "<= 1.5", le(1.5)),
        ("64 MiB line: intact", "floor.ok", "claudesrv.ok", "yes", ALL),
        ("64 MiB line: daemon RSS growth MB", None, "claudesrv.rss_growth_mb", "<= 100", le(100)),
    ],
    "replay": [
        ("replay of a 100 MB log: MB/s (floor: client ceiling)", "floor.mb_per_s", "claudesrv.mb_per_s",
         ">= 150", ge(150)),
        ("replay: byte-exact with the POST stream", None, "claudesrv.byte_exact", "yes", ALL),
        ("replay: lines lost", None, "claudesrv.lines_lost", "0", zero),
        ("replay: daemon RSS growth MB", None, "claudesrv.rss_growth_mb", "", None),
    ],
    "idle": [
        ("100 idle warm sessions: daemon RSS MB (floor: at start)", "floor.rss_mb", "claudesrv.rss_mb", "<= 120",
         le(120)),
        ("100 idle warm sessions: live CLI processes", None, "claudesrv.live_clis", "", None),
        ("100 idle warm sessions: next turn not in the same CLI", None, "claudesrv.not_warm", "0", zero),
        ("100 idle warm sessions: failed turns", None, "claudesrv.failed", "0", zero),
    ],
    "concurrency": [
        ("200 new sessions at once (--spares 0): failures", "floor.failed", "claudesrv.failed", "0", zero),
        ("200 new sessions at once: completion p99 ms", "floor.completion_p99_ms", "claudesrv.completion_p99_ms",
         "<= 2500", le(2500)),
        ("200 new sessions at once: completion p50 ms", "floor.completion_p50_ms", "claudesrv.completion_p50_ms",
         "", None),
        ("200 new sessions at once: first frame p50 ms", "floor.first_p50_ms", "claudesrv.first_p50_ms", "", None),
        ("200 new sessions at once: daemon peak RSS MB", None, "claudesrv.rss_peak_mb", "", None),
    ],
    "slow_reader": [
        ("100 MB to a reader stalled 5 s: daemon RSS growth MB", None, "claudesrv.rss_growth_mb", "<= 16", le(16)),
        ("100 MB to a reader stalled 5 s: intact", None, "claudesrv.ok", "yes", ALL),
    ],
}


def all_true(runs: list[dict[str, Any]], path: str | None) -> str:
    """A boolean over the runs: "yes" when true in every run, else how many."""
    if not path:
        return "-"
    vals = [dig(r, path) for r in runs]
    return "yes" if all(v is True for v in vals) else f"{sum(v is True for v in vals)}/{len(vals)}"


def report(all_runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, s: Sizes) -> int:
    rows: list[list[str]] = [["measure", "floor", "claudesrv", "target", "met?"]]
    missed = 0
    json_lines = []
    sizes = {"200 MB": f"{s.tp_mb:g} MB", "64 MiB": f"{s.giant_mib} MiB", "100 MB log": f"{s.replay_mb:g} MB log",
             "100 idle": f"{s.idle_sessions} idle", "200 new": f"{s.conc} new", "100 MB to": f"{s.slow_mb:g} MB to",
             "stalled 5 s": f"stalled {s.stall_s:g} s"}
    for name, runs in all_runs.items():
        if not runs:
            continue
        summary: dict[str, Any] = {"bench": "claudesrv", "measure": name, "repeats": len(runs),
                                   "quick": bool(args.quick), "loadavg": os.getloadavg()[0], "metrics": {}}
        for label, fpath, spath, target, check in ROWS[name]:
            for k, v in sizes.items():
                label = label.replace(k, v)
            met: bool | None
            if check is ALL:
                sval_s, fval_s = all_true(runs, spath), all_true(runs, fpath)
                met = sval_s == "yes"
                missed += not met
                rows.append([label, fval_s, sval_s, target, "yes" if met else "NO"])
                summary["metrics"][label] = {"floor": fval_s, "claudesrv": sval_s, "target": target, "met": met}
                continue
            sval = med(runs, spath)
            fval = med(runs, fpath) if fpath else None
            met = check(sval, fval) if check else None
            if met is False:
                missed += 1
            rows.append([label, fmt(fval, runs, fpath), fmt(sval, runs, spath), target or "",
                         "" if met is None else ("yes" if met else "NO")])
            summary["metrics"][label] = {"floor": fval, "claudesrv": sval, "target": target or None, "met": met,
                                         "claudesrv_range": span(runs, spath),
                                         "floor_range": span(runs, fpath) if fpath else None}
        summary["runs"] = runs
        json_lines.append(summary)
    print()
    print(f"claudesrv benchmark: medians of {args.repeat} run(s){' (quick sizes)' if args.quick else ''}, "
          f"[min-max] across runs; floor = the same fake driven directly over pipes, in the same run; "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    if args.markdown:
        print()
        print("| " + " | ".join(rows[0]) + " |")
        print("| " + " | ".join("---" for _ in rows[0]) + " |")
        for r in rows[1:]:
            print("| " + " | ".join(c or " " for c in r) + " |")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for i, r in enumerate(rows):
            print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
            if i == 0:
                print("-+-".join("-" * w for w in widths))
    print()
    jf = open(args.json_out, "a") if args.json_out else None
    for j in json_lines:
        line = json.dumps(j, separators=(",", ":"))
        if not args.quiet_json:
            print("JSON " + line)
        if jf:
            jf.write(line + "\n")
    if jf:
        jf.close()
    return 1 if missed else 0


async def run(args: argparse.Namespace) -> int:
    fake = os.path.abspath(args.fake or build_fake(args.fake_src, args.work_dir))
    bench = Bench(args, fake)
    all_runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.measures}
    t_all = time.perf_counter()
    for rep in range(1, args.repeat + 1):
        for name in args.measures:
            log(f"[rep {rep}/{args.repeat}] {name} ...")
            t0 = time.perf_counter()
            r = await getattr(bench, name)(rep)
            r["rep"] = rep
            r["loadavg"] = os.getloadavg()[0]
            all_runs[name].append(r)
            log(f"  {time.perf_counter() - t0:.1f}s  floor {brief(r.get('floor', {}))}")
            log(f"  claudesrv {brief(r.get('claudesrv', {}))}")
            if "ceiling" in r:
                log(f"  client ceiling {brief(r['ceiling'])}")
            if r.get("leftover_clis"):
                log(f"  CLIs left alive by the daemon after SIGTERM: {r['leftover_clis']}")
    log(f"all measures: {time.perf_counter() - t_all:.0f}s")
    shutil.rmtree(bench.direct_cwd, ignore_errors=True)
    return report(all_runs, args, bench.s)


def brief(d: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in d.items() if v not in (None, [], "")}, separators=(",", ":"))[:700]


def tune_malloc() -> None:
    """
    The client's big, short-lived buffers (256 KiB batches) would otherwise be handed back to the
    kernel and faulted in again on every batch (glibc trims the heap top and mmaps large blocks):
    that costs this client more than all its checking. Keep them (this process only).
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_top_pad, 16 << 20)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=None, help="runs of every measure (the table shows medians); "
                    "default 3, or 1 with --quick")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a quick check")
    ap.add_argument("--measures", default=",".join(MEASURES), help="comma list of: " + ", ".join(MEASURES))
    ap.add_argument("--size", action="append", default=[], metavar="NAME=VALUE",
                    help="override one size (" + ", ".join(Sizes.__dataclass_fields__) + "), repeatable")
    ap.add_argument("--fake-src", default=DEFAULT_FAKE_SRC, help="fake-claude.c to compile (default %(default)s)")
    ap.add_argument("--fake", help="a fake-claude binary already built (skips gcc)")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), f"claudesrv-bench-{os.getuid()}"),
                    help="the fake's build, daemon data dirs and logs, py-spy output (default %(default)s)")
    ap.add_argument("--listen", default="tcp:0:interface=127.0.0.1", help="the daemon's --listen")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra twistd claudesrv option (repeatable)")
    ap.add_argument("--spare-metric", help="regex for the /metrics sample(s) that count ready spares "
                    "(default: gauges whose name or labels mention 'spare', and 'ready' if any does)")
    ap.add_argument("--spare-settle", type=float, default=0.05,
                    help="when the spare metric also counts starting spares, wait this much more, s")
    ap.add_argument("--spare-wait", type=float, default=0.3,
                    help="without such a metric, sleep this long before each new session, s")
    ap.add_argument("--spare-timeout", type=float, default=3.0, help="longest wait for a ready spare, s")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request limit, s")
    ap.add_argument("--long-timeout", type=float, default=300.0, help="per-request limit for the big streams, s")
    ap.add_argument("--floor-only", action="store_true", help="measure the floors only (no daemon)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--json-out", help="also append the JSON lines to this file")
    ap.add_argument("--quiet-json", action="store_true", help="do not print the JSON lines")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' data dirs and logs")
    ap.add_argument("--py-spy", nargs="?", const="py-spy", default=None,
                    help="record every daemon with py-spy (optionally its path) into the work dir")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.measures = [m for m in args.measures.split(",") if m]
    for m in args.measures:
        if m not in MEASURES:
            ap.error(f"unknown measure {m!r}; known: {', '.join(MEASURES)}")
    args.size_overrides = {}
    for item in args.size:
        k, _, v = item.partition("=")
        if k not in Sizes.__dataclass_fields__:
            ap.error(f"unknown size {k!r}")
        args.size_overrides[k] = float(v) if k in ("tp_mb", "replay_mb", "slow_mb", "stall_s") else int(v)
    if args.py_spy:
        found = shutil.which(args.py_spy) or shutil.which(args.py_spy, path=os.path.dirname(sys.executable))
        if not found:
            ap.error(f"py-spy not found ({args.py_spy}); pip install py-spy")
        args.py_spy = found
    os.makedirs(args.work_dir, exist_ok=True)
    args.work_dir = os.path.abspath(args.work_dir)
    tune_malloc()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 200 streams: sockets and pipes on both sides
    if soft < 4096 <= hard or (soft < 4096 and hard == resource.RLIM_INFINITY):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
