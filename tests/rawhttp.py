"""An HTTP client on a raw TCP connection: it can stop reading or vanish mid-stream, as real clients do."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol


class RawClient(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.got_data: Deferred[None] = Deferred()
        self.closed = False

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"data: " in self.data and not self.got_data.called:
            self.got_data.callback(None)


@inlineCallbacks
def raw_post(port: int, body: dict[str, Any]) -> Any:
    payload = json.dumps(body).encode()
    proto = RawClient()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(  # type: ignore[union-attr]
        b"POST /api/claude HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return proto
