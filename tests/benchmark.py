#!/usr/bin/env python3
"""
claudesrv benchmark: a real ``twistd -n claudesrv`` with a fast fake CLI, against the same fake spawned
directly (the floor), in the same run.

    .venv/bin/python tests/benchmark.py [--repeat 3] [--quick] [--measures latency,throughput,...]

Not part of the test run: trial collects ``tests/test_*.py`` only, and nothing here is a TestCase.

The fake is the shared C stand-in ``../shared/bench/fake-claude.c`` (``--fake-src``), compiled with gcc
into the work dir; every request carries its shape as a ``[[fake ...]]`` tag in the prompt, so one daemon
serves every shape. Each measure runs the floor first, then a fresh daemon (``--max-runs 256 --max-queue
1024``, its own data dir, ``tcp:0`` on loopback; the port comes from its ``Site starting on N`` log line).

Every stream is checked, not just timed: HTTP 200, chunked framing to its terminating chunk, one
``data:`` line per frame, the first frame ``system/init`` with a session id, the assistant ids
``msg_fake_00000001..N`` in order, and the fake's own ``fake_digest`` (lines, bytes, crc32 of every line
before the result line) recomputed over what arrived. The floor reads the fake's stdout through the same
checker.

Measures (full size; ``--quick`` shrinks them), each against its floor:
  latency      200 sequential requests, a fresh connection each: time to the first frame and to the end of
               the stream (floor: spawn the fake, prompt on stdin, first stdout byte / EOF and exit)
  throughput   200 MB of 1 kB lines in one stream: MB/s, lines lost, server and client CPU seconds; also
               this client's own ceiling (the same bytes, framed as claudesrv frames them, from sendfile())
  giant        one 64 MiB line: time, intact, server RSS growth (VmHWM after a reset minus VmRSS before)
  concurrency  200 requests at once, each ~2 s (4 lines, 400 ms apart): completion p50/p99 from the launch,
               failures, server peak RSS, listen-queue overflows (floor: the 200 fakes spawned back to back,
               each given its prompt and EOF at once, all read from one event loop)
  slow_reader  a 100 MB stream whose client stops reading for 5 s after the first frame: RSS growth
  idle         the daemon's RSS after start-up and 5 warm-up requests (measured in every daemon started)

Output: a table (medians over the repeats, [min-max] when they differ), then one ``JSON {...}`` line per
measure (also appended to ``--json-out``); the exit status is 1 when a target is missed. ``--py-spy``
records each daemon with py-spy (raw collapsed stacks, all threads, idle included) into the work dir;
``--listen`` and ``--daemon-arg`` change how the daemon is started (e.g. ``--listen
tcp:0:interface=127.0.0.1:backlog=1024``).
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
import zlib
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_FAKE_SRC = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench", "fake-claude.c"))
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
FAKE_ARGV = ["-p", "--verbose", "--output-format", "stream-json", "--"]  # what the daemon passes (prompt: stdin)
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")



@dataclass(frozen=True)
class Sizes:
    latency_n: int = 200  # sequential requests
    warmup: int = 5  # requests before measuring (each daemon, and the floor's spawns)
    tp_mb: float = 200.0  # throughput stream, MB of stdout
    line_bytes: int = 1024
    giant_mib: int = 64
    conc: int = 200  # streams at once
    conc_lines: int = 4  # 4 lines 400 ms apart: 5 gaps, about 2 s
    conc_delay_ms: int = 400
    slow_mb: float = 100.0  # slow-reader stream
    stall_s: float = 5.0  # how long the slow reader does not read


FULL = Sizes()
QUICK = Sizes(latency_n=50, warmup=3, tp_mb=50.0, giant_mib=16, conc=50, slow_mb=25.0, stall_s=2.0)
MEASURES = ("latency", "throughput", "giant", "concurrency", "slow_reader")


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


# ------------------------------------------------------------------------------------------- the fake

def build_fake(src: str, work: str) -> str:
    """Compile fake-claude.c (static if possible) into the work dir, once per source change."""
    if not os.path.isfile(src):
        raise SystemExit(f"fake CLI source not found: {src} (give --fake-src PATH/fake-claude.c or --fake BINARY)")
    out = os.path.join(work, "fake-claude")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
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


# ------------------------------------------------------------------------------------------- checking

ASSISTANT = b'{"type":"assistant","message":{"id":"msg_fake_'  # the fake's assistant lines start so
BIG = ASSISTANT + b'big"'  # the giant line's id is not numbered
ID_RE = re.compile(rb'\{"type":"assistant","message":\{"id":"msg_fake_(\d{8})"')
SEQ_AT = len(ASSISTANT)


class Verifier:
    """
    The integrity check of one stream of lines: the fake's digest (line count, bytes, crc32 of every
    line before the result line, each with its newline) recomputed over what arrived, the first line
    system/init with a session id, the last line the result, and the assistant ids 1..N in order.
    The newest line is always held back: when the stream ends it must be the result line.
    """

    def __init__(self, lines: int, big: bool) -> None:
        self.expect_lines, self.expect_big = lines, big
        self.crc = self.nlines = self.nbytes = 0
        self.first: bytes | None = None
        self.pend: bytes | None = None
        self.seq_next = 1
        self.seq_bad = 0
        self.big_seen = False

    @property
    def payload_bytes(self) -> int:
        return self.nbytes + (len(self.pend) + 1 if self.pend is not None else 0)

    def sse(self, buf: bytes, start: int, end: int) -> list[bytes]:
        """
        Complete SSE frames buf[start:end] (end just after a blank line). A one-line ``data:`` frame
        is checked where it lies: its payload and the first of its two newlines are exactly the line
        with its newline, so the crc runs over the buffer without a copy. Other frames (comments)
        are returned. A frame with more than one data line breaks the digest.
        """
        odd = []
        find, sw, c32 = buf.find, buf.startswith, zlib.crc32
        crc, nl, nb = self.crc, self.nlines, self.nbytes
        ps = pe = -1  # the newest data frame's payload in buf, held back
        first_num = last_num = -1
        nnum = 0
        pos = start
        with memoryview(buf) as mv:
            while pos < end:
                e = find(b"\n\n", pos, end)
                if not sw(b"data: ", pos):
                    odd.append(buf[pos:e])
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
                ps, pe = pos + 6, e
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

    def lines(self, buf: bytes, start: int = 0, end: int | None = None) -> None:
        """Raw lines buf[start:end], joined by '\\n' without a trailing one (the fake's stdout)."""
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
        self.nlines += buf.count(b"\n", start, j + 1)
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

    def verdict(self) -> list[str]:
        """The problems; an empty list means the stream is exactly what the fake wrote."""
        problems = []
        try:
            init = json.loads(self.first) if self.first else None
        except ValueError:
            init = None
        if not (isinstance(init, dict) and init.get("type") == "system" and init.get("subtype") == "init"
                and init.get("session_id")):
            problems.append("first line is not system/init with a session_id")
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
        return problems

    def lines_received(self) -> int:
        return max(0, self.seq_next - 1 - self.seq_bad)


class Result:
    """One request: timings (perf_counter), status, the verdict."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.t_headers: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.status: int | None = None
        self.complete = False
        self.error: str | None = None
        self.problems: list[str] = []
        self.comments = 0
        self.verifier: Verifier | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t0

    def end_s(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t0


class SSEClient(asyncio.Protocol):
    """
    HTTP/1.1 response parsing (chunked, or close-delimited), SSE framing, and the Verifier, in bulk:
    chunk data is collected as memoryview slices and framed once enough has arrived (always at once
    until the first frame, so its time is exact).
    """

    BATCH = 256 << 10

    def __init__(self, res: Result, verifier: Verifier, loop: asyncio.AbstractEventLoop) -> None:
        self.res, self.v = res, verifier
        res.verifier = verifier
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
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            self.mode = "chunked" if "chunked" in headers.get("transfer-encoding", "").lower() else "close"
            if self.mode == "close" and "content-length" in headers:
                self.mode, self.rem = "length", int(headers["content-length"])
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
        if i < n:
            self.leftover = bytes(mv[i:])

    def _frames(self, final: bool) -> None:
        """Split the complete SSE frames off what arrived and feed their payloads to the verifier.
        Data without a frame end is only collected (a 64 MiB line is joined once, not once a batch)."""
        new = b"".join(self.pieces) if len(self.pieces) != 1 else bytes(self.pieces[0])
        self.pieces = []
        self.npend = 0
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
                self.res.problems.append(f"stream ended inside a frame: {b''.join(self.tail)[:80]!r}")
            return
        body = b"".join(self.tail) if len(self.tail) > 1 else self.tail[0]
        rest = body[end:]
        self.tail = [rest] if rest else []
        self.tail_len = len(rest)
        self.tail_nl = rest.endswith(b"\n")
        if final and rest.strip():
            self.res.problems.append(f"stream ended inside a frame: {rest[:80]!r}")
        for frame in self.v.sse(body, 0, end):
            if frame.startswith(b":"):
                self.res.comments += 1
            else:
                self.res.problems.append(f"frame that is not one data line: {frame[:80]!r}")
        if self.res.t_first is None and self.v.first is not None:
            self.res.t_first = time.perf_counter()
            if not self.first.done():
                self.first.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.res.complete:
            self._frames(final=True)
            self._finish("connection closed before the end of the stream" + (f": {exc}" if exc else ""))
        else:
            self._finish()


async def post(port: int, shape: dict[str, Any], timeout: float, stall_s: float = 0.0) -> Result:
    """One POST /api/claude on a fresh connection, read and checked to the end."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"prompt": prompt_for(shape)}).encode()
    req = (b"POST /api/claude HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (port, len(body))
           + body)
    res = Result(time.perf_counter())
    v = Verifier(int(shape.get("lines", 1)), int(shape.get("big_line_bytes", 0)) > 0)
    try:
        tr, pr = await asyncio.wait_for(
            loop.create_connection(lambda: SSEClient(res, v, loop), "127.0.0.1", port), timeout)
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
    res.problems += v.verdict()
    return res


# ------------------------------------------------------------------------------------------- the floor

def spawn_fake(fake: str, cwd: str, stdin: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return subprocess.Popen([fake, *FAKE_ARGV], cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0)


def direct_one(fake: str, cwd: str, shape: dict[str, Any]) -> Result:
    """Spawn the fake as the daemon does (prompt on stdin, then EOF), read its stdout through the
    checker: time to the first byte, to EOF and exit."""
    res = Result(time.perf_counter())
    v = Verifier(int(shape.get("lines", 1)), int(shape.get("big_line_bytes", 0)) > 0)
    p = spawn_fake(fake, cwd)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(prompt_for(shape).encode())
    p.stdin.close()
    fd = p.stdout.fileno()
    pend: list[bytes] = []  # a partial line, in pieces (a 64 MiB line is joined once)
    while True:
        data = os.read(fd, MIB)
        if not data:
            break
        if res.t_first is None:
            res.t_first = time.perf_counter()
        j = data.rfind(b"\n")
        if j < 0:
            pend.append(data)
            continue
        if pend:
            pend.append(data[:j])
            v.lines(b"".join(pend))
        else:
            v.lines(data, 0, j)
        pend = [data[j + 1:]] if j + 1 < len(data) else []
    p.stdout.close()
    rc = p.wait()
    res.t_end = time.perf_counter()
    res.status, res.complete = rc, True
    res.problems = v.verdict() + ([f"trailing bytes without newline: {pend[0][:80]!r}"] if pend else []) + (
        [f"exit code {rc}"] if rc else [])
    res.verifier = v
    return res


async def direct_concurrent(fake: str, cwd: str, shape: dict[str, Any], c: int) -> tuple[list[Result], float]:
    """
    The floor for C streams at once: spawn the fakes one after another as fast as this process can
    (prompt written and stdin closed at once), then read every stdout from the event loop. A stream
    is complete at its EOF.
    """
    loop = asyncio.get_running_loop()
    prompt = prompt_for(shape).encode()
    t0 = time.perf_counter()
    results: list[Result] = []
    pending = c
    all_done: asyncio.Future[None] = loop.create_future()

    def reader(fd: int, res: Result, v: Verifier, parts: list[bytes], p: subprocess.Popen[bytes]) -> None:
        nonlocal pending
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                break
            parts.append(data)
        res.t_end = time.perf_counter()
        loop.remove_reader(fd)
        out = b"".join(parts)
        v.lines(out, 0, len(out) - 1 if out.endswith(b"\n") else len(out))
        res.problems = v.verdict()
        assert p.stdout is not None
        p.stdout.close()
        pending -= 1
        if not pending and not all_done.done():
            all_done.set_result(None)

    procs = []
    for _ in range(c):
        res = Result(t0)
        results.append(res)
        try:
            p = spawn_fake(fake, cwd)
        except OSError as e:
            res.problems = [f"spawn: {e!r}"]
            pending -= 1
            continue
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(prompt)
        p.stdin.close()
        fd = p.stdout.fileno()
        os.set_blocking(fd, False)
        loop.add_reader(fd, reader, fd, res, Verifier(int(shape.get("lines", 1)), False), [], p)
        procs.append(p)
    if pending:
        await all_done
    wall = time.perf_counter() - t0
    for p in procs:
        p.wait()
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


def framed_like_claudesrv(stdout: bytes, path: str) -> None:
    """The HTTP response claudesrv sends for this stdout: it reads the pipe 8 KiB at a time and writes
    the complete lines of each read as one chunk of SSE frames."""
    with open(path, "wb") as out:
        out.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        carry = b""
        for i in range(0, len(stdout), 8192):
            data = carry + stdout[i:i + 8192]
            j = data.rfind(b"\n")
            if j < 0:
                carry = data
                continue
            frames = b"data: " + data[:j].replace(b"\n", b"\n\ndata: ") + b"\n\n"
            out.write(b"%x\r\n" % len(frames) + frames + b"\r\n")
            carry = data[j + 1:]
        out.write(b"0\r\n\r\n")


async def client_ceiling(fake: str, cwd: str, shape: dict[str, Any], work: str, timeout: float) -> Result:
    """This client against the same bytes served by sendfile() from another process: its own ceiling."""
    p = spawn_fake(fake, cwd)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(prompt_for(shape).encode())
    p.stdin.close()
    stdout = p.stdout.read()
    p.wait()
    path = os.path.join(work, "ceiling.http")
    framed_like_claudesrv(stdout, path)
    del stdout
    b = subprocess.Popen([sys.executable, "-c", BLASTER, path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert b.stdout is not None
        port = int(b.stdout.readline())
        return await post(port, shape, timeout)
    finally:
        b.wait(10)
        os.unlink(path)


# ------------------------------------------------------------------------------------------- the daemon

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


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    try:
        with open("/proc/net/netstat") as f:
            rows = [line.split() for line in f if line.startswith("TcpExt:")]
        return int(rows[1][rows[0].index("ListenOverflows")])
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


class Daemon:
    """``twistd -n claudesrv`` in a process group of its own, with a data dir of its own."""

    def __init__(self, args: argparse.Namespace, fake: str, label: str) -> None:
        self.args, self.fake, self.label = args, fake, label
        self.p: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        a = self.args
        self.data = tempfile.mkdtemp(prefix="daemon-", dir=a.work_dir)
        self.logfile = os.path.join(self.data, "twistd.log")
        cmd = [*TWISTD, "-n", "--pidfile=", f"--logfile={self.logfile}", "claudesrv", "--listen", a.listen,
               "--claude", self.fake, "--data-dir", self.data, "--max-runs", "256", "--max-queue", "1024",
               *a.daemon_arg]
        self.out = open(os.path.join(self.data, "stdout.log"), "wb")
        self.p = subprocess.Popen(cmd, cwd=self.data, stdin=subprocess.DEVNULL, stdout=self.out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        while not self.port:
            if self.p.poll() is not None:
                raise SystemExit(f"twistd exited with {self.p.returncode}; see {self.logfile}")
            if time.perf_counter() - t0 > 30:
                self.stop()
                raise SystemExit(f"twistd did not log 'Site starting on' within 30 s; see {self.logfile}")
            time.sleep(0.05)
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

    def stop(self) -> None:
        """SIGTERM to the group we created (the daemon, and any fake it left), SIGKILL what stays."""
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
        pg = self.p.pid
        try:
            os.killpg(pg, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pg, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()
        self.p = None
        self.out.close()
        if not self.args.keep:
            shutil.rmtree(self.data, ignore_errors=True)


# ------------------------------------------------------------------------------------------- measures

class Bench:
    def __init__(self, args: argparse.Namespace, fake: str) -> None:
        self.a = args
        self.fake = fake
        self.s = QUICK if args.quick else FULL
        self.direct_cwd = tempfile.mkdtemp(prefix="direct-", dir=args.work_dir)
        self.timeout = args.timeout

    def shapes(self) -> dict[str, dict[str, Any]]:
        s = self.s
        return {
            "latency": {"lines": 1},
            "throughput": {"lines": int(s.tp_mb * 1e6 // s.line_bytes), "line_bytes": s.line_bytes},
            "giant": {"lines": 1, "big_line_bytes": s.giant_mib * MIB},
            "concurrency": {"lines": s.conc_lines, "delay_ms": s.conc_delay_ms},
            "slow_reader": {"lines": int(s.slow_mb * 1e6 // s.line_bytes), "line_bytes": s.line_bytes},
        }

    async def daemon(self, label: str) -> tuple[Daemon, dict[str, Any]]:
        d = Daemon(self.a, self.fake, label).start()
        bad = 0
        for _ in range(self.s.warmup):
            r = await post(d.port, {"lines": 1}, self.timeout)
            bad += not r.ok
        await asyncio.sleep(0.5)
        st = proc_status(d.pid)
        return d, {"idle_rss_mb": round(st.get("VmRSS", 0) / 1024, 1), "start_s": round(d.start_s, 3),
                   "warmup_failed": bad}

    # -- latency
    async def latency(self, rep: int) -> dict[str, Any]:
        shape = self.shapes()["latency"]
        n = self.s.latency_n
        for _ in range(self.s.warmup):
            direct_one(self.fake, self.direct_cwd, shape)
        floor = [direct_one(self.fake, self.direct_cwd, shape) for _ in range(n)]
        d, idle = await self.daemon(f"latency-{rep}")
        try:
            w = RssWatch(d.pid)
            srv = [await post(d.port, shape, self.timeout) for _ in range(n)]
            rss = w.stop()
        finally:
            d.stop()

        def block(rs: list[Result]) -> dict[str, Any]:
            first = timings(rs, "first")
            end = timings(rs, "end")
            return {"requests": len(rs), "failed": sum(1 for r in rs if not r.ok),
                    "first_p50_ms": ms(pct(first, 50)), "first_p99_ms": ms(pct(first, 99)),
                    "end_p50_ms": ms(pct(end, 50)), "end_p99_ms": ms(pct(end, 99)),
                    "problems": problems(rs)}
        return {"floor": block(floor), "claudesrv": {**block(srv), **rss}, "idle": idle}

    # -- throughput, giant, slow reader: one big stream
    async def one_stream(self, name: str, rep: int, stall_s: float = 0.0) -> dict[str, Any]:
        shape = self.shapes()[name]
        c0 = time.process_time()
        fr = direct_one(self.fake, self.direct_cwd, shape)
        floor = {**stream_metrics(fr), "client_cpu_s": r3(time.process_time() - c0)}
        d, idle = await self.daemon(f"{name}-{rep}")
        try:
            w = RssWatch(d.pid)
            c0 = time.process_time()
            r = await post(d.port, shape, self.a.long_timeout, stall_s=stall_s)
            client_cpu = time.process_time() - c0
            rss = w.stop()
            await asyncio.sleep(0.3)
            rss["rss_after_mb"] = round(proc_status(d.pid).get("VmRSS", 0) / 1024, 1)
        finally:
            d.stop()
        srv = {**stream_metrics(r), **rss, "client_cpu_s": r3(client_cpu)}
        if stall_s:
            srv["stall_s"] = stall_s
        return {"floor": floor, "claudesrv": srv, "idle": idle}

    async def throughput(self, rep: int) -> dict[str, Any]:
        r = await self.one_stream("throughput", rep)
        ceiling = await client_ceiling(self.fake, self.direct_cwd, self.shapes()["throughput"], self.a.work_dir,
                                       self.a.long_timeout)
        r["ceiling"] = stream_metrics(ceiling)
        return r

    async def giant(self, rep: int) -> dict[str, Any]:
        return await self.one_stream("giant", rep)

    async def slow_reader(self, rep: int) -> dict[str, Any]:
        return await self.one_stream("slow_reader", rep, stall_s=self.s.stall_s)

    # -- concurrency
    async def concurrency(self, rep: int) -> dict[str, Any]:
        shape = self.shapes()["concurrency"]
        c = self.s.conc
        frs, fwall = await direct_concurrent(self.fake, self.direct_cwd, shape, c)
        d, idle = await self.daemon(f"concurrency-{rep}")
        try:
            w = RssWatch(d.pid)
            lo0 = listen_overflows()
            t0 = time.perf_counter()
            rs = await asyncio.gather(*[post(d.port, shape, self.timeout) for _ in range(c)])
            wall = time.perf_counter() - t0
            rss = w.stop()
            lo1 = listen_overflows()
            rss["listen_overflows"] = lo1 - lo0 if lo0 is not None and lo1 is not None else None
            await asyncio.sleep(1.0)
            rss["rss_after_mb"] = round(proc_status(d.pid).get("VmRSS", 0) / 1024, 1)
            for r in rs:
                r.t0 = t0  # completion is counted from the moment all requests were launched
        finally:
            d.stop()

        def block(rs: list[Result], wall: float) -> dict[str, Any]:
            done = timings(rs, "end")
            first = timings(rs, "first")
            return {"clients": c, "failed": sum(1 for r in rs if not r.ok),
                    "completion_p50_ms": ms(pct(done, 50)), "completion_p99_ms": ms(pct(done, 99)),
                    "completion_max_ms": ms(max(done) if done else None),
                    "first_p50_ms": ms(pct(first, 50)), "first_p99_ms": ms(pct(first, 99)),
                    "wall_s": r3(wall), "problems": problems(rs)}
        return {"floor": block(frs, fwall), "claudesrv": {**block(rs, wall), **rss}, "idle": idle}


def timings(rs: list[Result], which: str) -> list[float]:
    """Seconds from each good request's start to its first frame or its end."""
    out = []
    for r in rs:
        t = r.first_s() if which == "first" else r.end_s()
        if r.ok and t is not None:
            out.append(t)
    return out


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


def problems(rs: list[Result], limit: int = 4) -> list[str]:
    seen: dict[str, int] = {}
    for r in rs:
        for p in r.problems:
            seen[p[:100]] = seen.get(p[:100], 0) + 1
    return [f"{k} (x{v})" for k, v in sorted(seen.items(), key=lambda kv: -kv[1])[:limit]]


def stream_metrics(r: Result) -> dict[str, Any]:
    v = r.verifier
    assert v is not None
    secs = r.end_s()
    return {"ok": r.ok, "seconds": r3(secs), "payload_mb": round(v.payload_bytes / 1e6, 3),
            "mb_per_s": round(v.payload_bytes / 1e6 / secs, 1) if secs else None,
            "first_ms": ms(r.first_s()), "lines_expected": v.expect_lines, "lines_received": v.lines_received(),
            "lines_lost": v.expect_lines - v.lines_received(), "problems": r.problems[:4]}


# ------------------------------------------------------------------------------------------- report

def dig(d: dict[str, Any], path: str) -> Any:
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def med(runs: list[dict[str, Any]], path: str) -> float | None:
    vals = [dig(r, path) for r in runs]
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def span(runs: list[dict[str, Any]], path: str) -> tuple[float, float] | None:
    vals = [dig(r, path) for r in runs]
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (min(vals), max(vals)) if vals else None


def fmt(x: Any, runs: list[dict[str, Any]] | None = None, path: str | None = None) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    s = f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    if runs and path and len(runs) > 1:
        sp = span(runs, path)
        if sp and sp[0] != sp[1]:
            lo, hi = sp
            f = (lambda v: f"{v:.0f}") if abs(x) >= 100 else (lambda v: f"{v:.1f}") if abs(x) >= 10 else \
                (lambda v: f"{v:.2f}")
            s += f" [{f(lo)}-{f(hi)}]"
    return s


# (label, floor path, server path, target text, check(server median, floor median) -> bool | None)
Check = Any
ROWS: dict[str, list[tuple[str, str | None, str, str, Check]]] = {
    "latency": [
        ("first frame p50 ms", "floor.first_p50_ms", "claudesrv.first_p50_ms", "<= floor + 3",
         lambda s, f: s is not None and f is not None and s <= f + 3),
        ("first frame p99 ms", "floor.first_p99_ms", "claudesrv.first_p99_ms", "", None),
        ("end of stream p50 ms", "floor.end_p50_ms", "claudesrv.end_p50_ms", "", None),
        ("end of stream p99 ms", "floor.end_p99_ms", "claudesrv.end_p99_ms", "", None),
        ("failed requests", "floor.failed", "claudesrv.failed", "0", lambda s, f: s == 0),
    ],
    "throughput": [
        ("MB/s, every line checked", "floor.mb_per_s", "claudesrv.mb_per_s", ">= 100",
         lambda s, f: s is not None and s >= 100),
        ("lines lost", "floor.lines_lost", "claudesrv.lines_lost", "0", lambda s, f: s == 0),
        ("client ceiling MB/s (same bytes, sendfile)", None, "ceiling.mb_per_s", "", None),
        ("server CPU s", None, "claudesrv.server_cpu_s", "", None),
        ("client CPU s", "floor.client_cpu_s", "claudesrv.client_cpu_s", "", None),
        ("seconds", "floor.seconds", "claudesrv.seconds", "", None),
    ],
    "giant": [
        ("seconds", "floor.seconds", "claudesrv.seconds", "<= 1.5", lambda s, f: s is not None and s <= 1.5),
        ("server RSS growth MB", None, "claudesrv.rss_growth_mb", "<= 100", lambda s, f: s is not None and s <= 100),
        ("server CPU s", None, "claudesrv.server_cpu_s", "", None),
    ],
    "concurrency": [
        ("failures", "floor.failed", "claudesrv.failed", "0", lambda s, f: s == 0),
        ("completion p50 ms", "floor.completion_p50_ms", "claudesrv.completion_p50_ms", "<= floor + 50",
         lambda s, f: s is not None and f is not None and s <= f + 50),
        ("completion p99 ms", "floor.completion_p99_ms", "claudesrv.completion_p99_ms", "<= 2500",
         lambda s, f: s is not None and s <= 2500),
        ("first frame p50 ms", None, "claudesrv.first_p50_ms", "", None),
        ("server peak RSS MB", None, "claudesrv.rss_peak_mb", "<= 80", lambda s, f: s is not None and s <= 80),
        ("listen queue overflows (SYNs dropped)", None, "claudesrv.listen_overflows", "", None),
        ("server CPU s", None, "claudesrv.server_cpu_s", "", None),
    ],
    "slow_reader": [
        ("server RSS growth MB", None, "claudesrv.rss_growth_mb", "<= 16", lambda s, f: s is not None and s <= 16),
        ("stream intact (runs)", None, "claudesrv.ok", "all", None),
        ("seconds (incl. stall)", "floor.seconds", "claudesrv.seconds", "", None),
    ],
}


def report(all_runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> int:
    rows: list[list[str]] = [["measure", "floor", "claudesrv", "target", "met?"]]
    missed = 0
    json_lines = []
    for name, runs in all_runs.items():
        if not runs:
            continue
        summary: dict[str, Any] = {"bench": "claudesrv", "measure": name, "repeats": len(runs),
                                   "quick": bool(args.quick), "loadavg": os.getloadavg()[0], "metrics": {}}
        for label, fpath, spath, target, check in ROWS[name]:
            met: bool | None
            if spath == "claudesrv.ok":
                oks = [bool(dig(r, spath)) for r in runs]
                met = all(oks)
                rows.append([f"{name}: {label}", "-", f"{sum(oks)}/{len(oks)}", target, "yes" if met else "NO"])
                summary["metrics"][label] = {"claudesrv": f"{sum(oks)}/{len(oks)}", "met": met}
                missed += not met
                continue
            sval = med(runs, spath)
            fval = med(runs, fpath) if fpath else None
            met = check(sval, fval) if check else None
            if met is False:
                missed += 1
            rows.append([f"{name}: {label}", fmt(fval, runs, fpath), fmt(sval, runs, spath), target or "",
                         "" if met is None else ("yes" if met else "NO")])
            summary["metrics"][label] = {"floor": fval, "claudesrv": sval, "target": target or None, "met": met,
                                         "claudesrv_range": span(runs, spath),
                                         "floor_range": span(runs, fpath) if fpath else None}
        summary["runs"] = runs
        json_lines.append(summary)
    idle = [r["idle"]["idle_rss_mb"] for runs in all_runs.values() for r in runs if r.get("idle")]
    if idle:
        v = statistics.median(idle)
        met = v <= 50
        missed += not met
        rows.append([f"idle: RSS MB (n={len(idle)} daemons)", "-",
                     f"{v:.1f} [{min(idle):.1f}-{max(idle):.1f}]" if min(idle) != max(idle) else f"{v:.1f}",
                     "<= 50", "yes" if met else "NO"])
        json_lines.append({"bench": "claudesrv", "measure": "idle", "repeats": len(idle),
                           "metrics": {"idle RSS MB": {"claudesrv": v, "target": "<= 50", "met": met,
                                                       "claudesrv_range": [min(idle), max(idle)]}}})
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    print(f"claudesrv benchmark: medians of {args.repeat} run(s){' (quick sizes)' if args.quick else ''}, "
          f"[min-max] across runs; floor = the same fake spawned directly, in the same run")
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print()
    jf = open(args.json_out, "a") if args.json_out else None
    for j in json_lines:
        line = json.dumps(j, separators=(",", ":"))
        print("JSON " + line)
        if jf:
            jf.write(line + "\n")
    if jf:
        jf.close()
    return 1 if missed else 0


async def run(args: argparse.Namespace) -> int:
    fake = args.fake or build_fake(args.fake_src, args.work_dir)
    bench = Bench(args, fake)
    all_runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.measures}
    for rep in range(1, args.repeat + 1):
        for name in args.measures:
            log(f"[rep {rep}/{args.repeat}] {name} ...")
            t0 = time.perf_counter()
            r = await getattr(bench, name)(rep)
            r["rep"] = rep
            r["loadavg"] = os.getloadavg()[0]
            all_runs[name].append(r)
            log(f"  {time.perf_counter() - t0:.1f}s  floor {brief(r['floor'])}")
            log(f"  claudesrv {brief(r['claudesrv'])}")
            if "ceiling" in r:
                log(f"  client ceiling {brief(r['ceiling'])}")
    shutil.rmtree(bench.direct_cwd, ignore_errors=True)
    return report(all_runs, args)


def brief(d: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in d.items() if v not in (None, [], "")}, separators=(",", ":"))[:600]


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
    ap.add_argument("--repeat", type=int, default=3, help="runs of every measure (the table shows medians)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a quick check")
    ap.add_argument("--measures", default=",".join(MEASURES), help="comma list of: " + ", ".join(MEASURES))
    ap.add_argument("--fake-src", default=DEFAULT_FAKE_SRC, help="fake-claude.c to compile (default %(default)s)")
    ap.add_argument("--fake", help="a fake-claude binary already built (skips gcc)")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), f"claudesrv-bench-{os.getuid()}"),
                    help="the fake's build, daemon data dirs and logs, py-spy output (default %(default)s)")
    ap.add_argument("--listen", default="tcp:0:interface=127.0.0.1", help="the daemon's --listen")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra twistd claudesrv option (repeatable)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request limit, s")
    ap.add_argument("--long-timeout", type=float, default=300.0, help="per-request limit for the big streams, s")
    ap.add_argument("--json-out", help="also append the JSON lines to this file")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' data dirs and logs")
    ap.add_argument("--py-spy", nargs="?", const="py-spy", default=None,
                    help="record every daemon with py-spy (optionally its path) into the work dir")
    args = ap.parse_args(argv)
    args.measures = [m for m in args.measures.split(",") if m]
    for m in args.measures:
        if m not in MEASURES:
            ap.error(f"unknown measure {m!r}; known: {', '.join(MEASURES)}")
    if args.py_spy:
        found = shutil.which(args.py_spy) or shutil.which(args.py_spy, path=os.path.dirname(sys.executable))
        if not found:
            ap.error(f"py-spy not found ({args.py_spy}); pip install py-spy")
        args.py_spy = found
    os.makedirs(args.work_dir, exist_ok=True)
    tune_malloc()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 200 streams: sockets and pipes on both sides
    if soft < 4096 <= hard or (soft < 4096 and hard == resource.RLIM_INFINITY):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
