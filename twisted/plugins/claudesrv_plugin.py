"""twistd plugin: ``twistd -n claudesrv`` (the ``claudesrv`` command runs the same). Everything else lives in
claudesrv.tap."""

from twisted.application.service import ServiceMaker

claudesrv = ServiceMaker(
    "claudesrv",
    "claudesrv.tap",
    "Claude Code CLI over HTTP: POST /api/claude streams the session as Server-Sent Events.",
    "claudesrv",
)
