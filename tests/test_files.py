"""
A session's files over HTTP, through a real daemon (Twisted's static.File streams downloads): list, download
with ranges, upload, delete; and a table of hostile paths and bodies, each with its status, after which nothing
outside the session's folder has changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from tests.support import Daemon, post, wait_for


class _Exchange(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.done: Deferred[tuple[int, dict[str, str], bytes]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        head, _, body = bytes(self.data).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines and lines[0] else 0
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = _unchunk(body)
        self.done.callback((status, headers, body))


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if not n:
            break
        out, data = out + rest[:n], rest[n + 2:]
    return out


@inlineCallbacks
def raw(port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
    """One request with the target exactly as given (no client-side normalising of '..' or '%2e')."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    proto = _Exchange(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    return (yield proto.done)


def snapshot(folder: str) -> dict[str, str]:
    """Every path under a folder with what it is (a file's digest, a link's target)."""
    found = {}
    for base, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(base, name)
            if os.path.islink(path):
                found[path] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[path] = "dir"
    return found


class FilesTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_files_and_hostile_table(self) -> Any:
        daemon = yield Daemon(self, "--max-body", "40000", "--max-upload", "50000").start()
        reply = yield post(daemon.url + "/api/claude", {"prompt": "make a session"})
        sid = reply.session_id
        base = f"/api/sessions/{sid}/files"
        root = os.path.join(daemon.data_dir, "Workspace", f"session-{sid}")
        outside = os.path.join(daemon.dir, "outside")
        os.makedirs(outside)
        with open(os.path.join(outside, "victim.txt"), "w") as f:
            f.write("do not touch")
        os.symlink(outside, os.path.join(root, "out"))
        os.symlink(os.path.join(outside, "victim.txt"), os.path.join(root, "pw"))
        os.mkfifo(os.path.join(root, "fifo"))
        os.makedirs(os.path.join(root, ".git"))
        port = daemon.port

        # the plain uses
        status, _, body = yield raw(port, "PUT", base + "/docs/notes.txt", b"hello world")
        self.assertEqual((status, json.loads(body)), (201, {"path": "docs/notes.txt", "size": 11}))
        status, headers, body = yield raw(port, "GET", base + "/docs/notes.txt", headers={"Range": "bytes=6-10"})
        self.assertEqual((status, body, headers["content-range"], headers["content-type"]),
                         (206, b"world", "bytes 6-10/11", "text/plain"))
        status, headers, body = yield raw(port, "GET", base + "/docs/notes.txt")
        self.assertEqual((status, body, headers["content-length"]), (200, b"hello world", "11"))
        self.assertEqual(headers["content-security-policy"], "sandbox")
        status, _, body = yield raw(port, "GET", base + "?path=docs")
        self.assertEqual([e["name"] for e in json.loads(body)["entries"]], ["notes.txt"])
        status, _, body = yield raw(port, "GET", base)
        names = [e["name"] for e in json.loads(body)["entries"]]
        self.assertNotIn(".git", names)
        self.assertEqual([e["type"] for e in json.loads(body)["entries"] if e["name"] == "out"], ["symlink"])
        status, _, body = yield raw(port, "GET", base + "?hidden=true")
        self.assertIn(".git", [e["name"] for e in json.loads(body)["entries"]])

        before = snapshot(outside)
        long_name = "a" * 300
        table: list[tuple[str, str, str, bytes, int, str | None]] = [
            ("dot-dot", "GET", base + "/../../../etc/passwd", b"", 400, "invalid_path"),
            ("encoded dot-dot", "GET", base + "/%2e%2e/%2e%2e/etc/passwd", b"", 400, "invalid_path"),
            ("encoded slash", "GET", base + "/..%2f..%2fetc%2fpasswd", b"", 400, "invalid_path"),
            ("double-encoded", "GET", base + "/%252e%252e/etc/passwd", b"", 404, "file_not_found"),
            ("backslashes", "GET", base + "/..%5c..%5cetc%5cpasswd", b"", 400, "invalid_path"),
            ("drive letter", "GET", base + "/C:/Windows", b"", 400, "invalid_path"),
            ("NUL", "GET", base + "/a%00b", b"", 400, "invalid_path"),
            ("long name", "GET", base + "/" + long_name, b"", 400, "invalid_path"),
            ("symlinked folder out", "GET", base + "/out/victim.txt", b"", 403, "path_outside_session"),
            ("symlinked file out", "GET", base + "/pw", b"", 403, "path_outside_session"),
            ("a folder", "GET", base + "/docs", b"", 400, "not_a_file"),
            ("a fifo", "GET", base + "/fifo", b"", 400, "not_a_file"),
            ("absent", "GET", base + "/nothing.txt", b"", 404, "file_not_found"),
            ("list dot-dot", "GET", base + "?path=../..", b"", 400, "invalid_path"),
            ("list absolute", "GET", base + "?path=/etc", b"", 400, "invalid_path"),
            ("list through a symlink", "GET", base + "?path=out", b"", 403, "path_outside_session"),
            ("list a file", "GET", base + "?path=docs/notes.txt", b"", 400, "not_a_folder"),
            ("unknown session", "GET", f"/api/sessions/{'0' * 8}-0000-4000-8000-{'0' * 12}/files", b"", 404,
             "session_not_found"),
            ("put dot-dot", "PUT", base + "/../escape.txt", b"x", 400, "invalid_path"),
            ("put through a symlinked folder", "PUT", base + "/out/new.txt", b"x", 403, "path_outside_session"),
            ("put onto a folder", "PUT", base + "/docs", b"x", 409, "not_a_file"),
            ("put onto a fifo", "PUT", base + "/fifo", b"x", 409, "not_a_file"),
            ("put NUL", "PUT", base + "/a%00b", b"x", 400, "invalid_path"),
            ("put over --max-upload", "PUT", base + "/big.bin", b"x" * 50001, 413, "body_too_large"),
            ("delete a folder", "DELETE", base + "/docs", b"", 409, "not_a_file"),
            ("delete absent", "DELETE", base + "/nothing.txt", b"", 404, "file_not_found"),
            ("write .git/config", "PUT", base + "/.git/config", b"[core]\n\tfsmonitor = sh -c id\n", 403,
             "git_metadata"),
            ("write a .git file", "PUT", base + "/sub/.GIT", b"gitdir: /tmp/x\n", 403, "git_metadata"),
            ("delete dot-dot", "DELETE", base + "/../../victim.txt", b"", 400, "invalid_path"),
            ("delete through a symlinked folder", "DELETE", base + "/out/victim.txt", b"", 403,
             "path_outside_session"),
        ]
        self.assertGreaterEqual(len(table), 25)
        for name, method, target, body, expected, code in table:
            status, _, answer = yield raw(port, method, target, body)
            self.assertEqual(status, expected, f"{name}: {answer[:200]!r}")
            if code is not None:
                self.assertEqual(json.loads(answer)["error"]["code"], code, name)
        self.assertEqual(snapshot(outside), before)

        # writes replace a symlink, never what it points to; deleting one removes only the link
        status, _, _ = yield raw(port, "PUT", base + "/pw", b"replaced")
        self.assertEqual((status, os.path.islink(os.path.join(root, "pw"))), (201, False))
        status, _, _ = yield raw(port, "DELETE", base + "/out")
        self.assertEqual((status, os.path.exists(outside)), (200, True))
        self.assertEqual(snapshot(outside), before)

        # two writers at once: the file is one body or the other, whole
        bodies = [b"a" * 45000, b"b" * 45000]  # over --max-body, within --max-upload
        results = yield gatherResults([raw(port, "PUT", base + "/race.bin", b) for b in bodies])
        self.assertEqual([r[0] for r in results], [201, 201])
        with open(os.path.join(root, "race.bin"), "rb") as f:
            self.assertIn(f.read(), bodies)
        self.assertEqual([n for n in os.listdir(root) if n.startswith(".upload-")], [])

        # writes wait for no running turn; reads do not
        stream = post(daemon.url + "/api/claude", {"prompt": "[[fake hang=1]] busy", "session_id": sid})
        yield wait_for(lambda: bool(daemon.turns()) and daemon.turns()[-1]["prompt"].endswith("busy"))
        status, _, body = yield raw(port, "PUT", base + "/docs/notes.txt", b"changed")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (409, "session_busy"))
        status, _, body = yield raw(port, "GET", base + "/docs/notes.txt")
        self.assertEqual((status, body), (200, b"hello world"))
        yield raw(port, "POST", f"/api/sessions/{sid}/cancel", b"{}", {"Content-Type": "application/json"})
        yield stream
