"""
Server-Sent Events framing: each CLI line becomes ``data: <line>\\n\\n``, byte for byte.

The CLI's JSON escapes every newline inside a value, so a line never needs more than one ``data:``.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.iweb import IRequest

KEEPALIVE = b": keepalive\n\n"

HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"Connection", b"keep-alive"),
    (b"X-Accel-Buffering", b"no"),
)


def start(request: IRequest) -> None:
    """Send status 200 and the SSE headers now, before any event exists."""
    request.setResponseCode(200)
    for name, value in HEADERS:
        request.setHeader(name, value)
    request.write(b"")


def frames(block: bytes) -> bytes:
    """Frame a block of complete lines (each ending in a newline) in one pass."""
    return b"data: " + block[:-1].replace(b"\n", b"\n\ndata: ") + b"\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One frame holding a JSON object of our own (compact, like the CLI's lines)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
