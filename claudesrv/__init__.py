"""claudesrv: the Claude Code CLI behind an HTTP API, as a Twisted daemon."""
