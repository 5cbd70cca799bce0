"""
``twistd claudesrv``: the options and the one place where the parts are wired together.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service, strports
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from claudesrv.app import INSTALL_HINT, ClaudeAPI, ClaudeExecutable
from claudesrv.process import spawner
from claudesrv.runs import Limits, RunManager
from claudesrv.store import SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

DEFAULT_LISTEN = "tcp:3000:interface=127.0.0.1"


def _seconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve the Claude Code CLI over HTTP: POST /api/claude streams a session as "
                "Server-Sent Events. Sessions are kept in <data-dir>/sessions.db, workspaces in "
                "<data-dir>/Workspace/.")

    optParameters = [
        ["data-dir", None, ".", "Folder that holds sessions.db and Workspace/."],
        ["claude", None, "claude", "The Claude CLI: a name looked up on PATH, or a path."],
        ["max-runs", None, 4, "Most CLI processes at once.", _positive],
        ["max-queue", None, 32, "Most requests waiting for a run slot; beyond that 503.", int],
        ["run-timeout", None, 3600.0, "Seconds a run may take in all (0: no limit).", _seconds],
        ["idle-timeout", None, 600.0, "Seconds a run may print nothing (0: no limit).", _seconds],
        ["keepalive", None, 15.0, "Seconds of silence before an SSE keepalive comment (0: none).", _seconds],
        ["kill-grace", None, 5.0, "Seconds between SIGINT and SIGTERM when a run is stopped; "
                                  "SIGKILL follows 2 s later.", _seconds],
        ["max-prompt", None, 1 << 20, "Largest prompt in bytes.", _positive],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:3000:interface=127.0.0.1 (repeatable;
        default tcp:3000:interface=127.0.0.1)."""
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["max-queue"] < 0:
            raise usage.UsageError("--max-queue must be 0 or more")


class ClaudeService(service.Service):
    """Owns the database and the runs: opens one at start, ends the other cleanly at stop."""

    def __init__(self, store: SessionStore, runs: RunManager, workspaces: Workspaces,
                 cli: ClaudeExecutable) -> None:
        self.store = store
        self.runs = runs
        self.workspaces = workspaces
        self.cli = cli
        self.ready: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self.workspaces.ensure_root()
        if self.cli.find() is None:
            log.warn("the Claude CLI {name!r} was not found; requests get 503 until it is: {hint}",
                     name=self.cli.name, hint=INSTALL_HINT)
        self.ready = self.store.start()
        self.ready.addErrback(lambda f: log.failure("could not open the session database", f))

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield self.runs.shutdown()
        # let the last result events leave the socket before the reactor closes connections
        yield deferLater(self.runs.clock, 0.1, lambda: None)
        self.store.close()


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    reactor = reactor or global_reactor
    data_dir = os.path.abspath(options["data-dir"])
    os.makedirs(data_dir, exist_ok=True)
    environ = dict(os.environ)
    store = SessionStore(os.path.join(data_dir, "sessions.db"))
    workspaces = Workspaces(os.path.join(data_dir, "Workspace"))
    cli = ClaudeExecutable(options["claude"], environ)
    limits = Limits(
        max_runs=options["max-runs"], max_queue=options["max-queue"],
        run_timeout=options["run-timeout"], idle_timeout=options["idle-timeout"],
        keepalive=options["keepalive"], kill_grace=options["kill-grace"],
    )
    runs = RunManager(reactor, spawner(reactor), store, workspaces, cli.path, environ, limits)
    api = ClaudeAPI(runs, store, workspaces, cli, max_prompt=options["max-prompt"])

    top = service.MultiService()
    ClaudeService(store, runs, workspaces, cli).setServiceParent(top)
    site = Site(api.resource())
    site.displayTracebacks = False
    for description in options["listen"]:
        strports.service(description, site).setServiceParent(top)
    return top
