"""
``twistd claudesrv``: the options and the one place where the parts are wired together.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from typing import Any

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from claudesrv.app import INSTALL_HINT, ClaudeAPI, ClaudeExecutable
from claudesrv.guard import (
    Guard,
    LimitedChannel,
    Policy,
    env_tokens,
    is_loopback_listener,
    read_token_file,
    request_factory,
)
from claudesrv.live import Limits
from claudesrv.metrics import registry_for
from claudesrv.policy import TurnPolicy
from claudesrv.process import spawner
from claudesrv.registry import SessionRegistry
from claudesrv.schema import MODEL_PATTERN, BodyLimits
from claudesrv.sessions import Readiness, Sessions
from claudesrv.store import PooledSqlite, SessionStore
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
    longdesc = ("Serve the Claude Code CLI over HTTP: POST /api/claude streams a session's turn as "
                "Server-Sent Events, from one warm CLI process per session. Sessions are kept in "
                "<data-dir>/sessions.db, workspaces in <data-dir>/Workspace/, event logs in <data-dir>/events/.")

    optParameters = [
        ["data-dir", None, ".", "Folder that holds sessions.db, Workspace/ and events/."],
        ["claude", None, "claude", "The Claude CLI: a name looked up on PATH, or a path."],
        ["max-runs", None, 4, "Most turns running at once.", _positive],
        ["max-queue", None, 32, "Most turns waiting for a run slot or a process; beyond that 503.", int],
        ["max-live", None, 8, "Most live CLI processes (idle, running, starting, spare); the least recently "
                              "used idle one is put to sleep when a turn needs room.", _positive],
        ["spares", None, 1, "CLI processes kept started ahead of time for new sessions (0: none).", int],
        ["warm-idle", None, 600.0, "Seconds an idle CLI process stays warm before it is put to sleep "
                                   "(0: until it is needed elsewhere).", _seconds],
        ["run-timeout", None, 3600.0, "Seconds a turn may take in all (0: no limit).", _seconds],
        ["idle-timeout", None, 600.0, "Seconds a turn may print nothing, or a client may read nothing "
                                      "(0: no limit).", _seconds],
        ["keepalive", None, 15.0, "Seconds of silence before an SSE keepalive comment (0: none).", _seconds],
        ["kill-grace", None, 5.0, "Seconds a stopped turn has to end after the interrupt request before "
                                  "SIGINT; SIGTERM and SIGKILL follow 2 s apart.", _seconds],
        ["log-max-bytes", None, 256 << 20, "Most bytes of events kept per session; the oldest whole turns "
                                           "go first.", _positive],
        ["on-disconnect", None, "cancel", "What a turn does when its client goes away: cancel (interrupt "
                                          "it) or continue (its events stay in the log).", str],
        ["max-prompt", None, 1 << 20, "Largest prompt in bytes (its text).", _positive],
        ["max-system-prompt", None, 64 << 10, "Largest system_prompt or append_system_prompt in bytes.", _positive],
        ["max-image-bytes", None, 5 << 20, "Largest image in a prompt, in bytes (decoded).", _positive],
        ["default-model", None, None, "The model of turns that name none (default: the CLI's)."],
        ["max-budget-usd", None, None, "The most a turn may spend (max_budget_usd), and what a turn that sets "
                                       "no budget gets.", float],
        ["max-turns-limit", None, None, "The most model turns a turn may take (max_turns), and what a turn that "
                                        "sets no limit gets.", _positive],
        ["openai-tool-activity", None, "reasoning", "Where /v1/ answers show Claude's tool activity: reasoning "
                                                    "(reasoning_content, thinking blocks), content (in the text) "
                                                    "or hidden."],
        ["allow-system-prompt", None, "yes", "yes, append (only append_system_prompt) or no: whether requests may "
                                             "set the system prompt."],
        ["http-timeout", None, 60.0, "Seconds an HTTP connection may sit idle or send its request slowly "
                                     "before it is closed (open streams are not cut).", _seconds],
        ["max-body", None, 32 << 20, "Largest request body in bytes (413 beyond; images count).", _positive],
        ["auth-token-file", None, None, "File of bearer tokens, one a line (re-read on SIGHUP). Tokens can "
                                        "also come from the CLAUDESRV_AUTH_TOKENS environment variable "
                                        "(comma-separated); never from the command line."],
        ["session-ttl", None, 0.0, "Delete sessions (rows and workspaces) idle this many seconds (0: keep).",
         _seconds],
        ["skip-permissions", None, "allow", "allow or deny requests for dangerously-skip-permissions."],
        ["approvals", None, "allow", "allow or deny turns that ask a person about tools (\"approvals\": true)."],
        ["approval-timeout", None, 300.0, "Seconds a tool approval waits for an answer before it is denied "
                                          "(0: no limit).", _seconds],
    ]
    optFlags = [
        ["insecure-no-auth", None, "Allow listening beyond loopback without any token (dangerous)."],
        ["sandboxed", None, "Say the host is a container or VM: sets IS_SANDBOX=1 for the CLI, which lets a "
                            "root daemon use dangerously-skip-permissions. Never on a real machine."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allowed-host"] = []
        self["cors-origin"] = []
        self["deny-tool"] = []
        self["allow-input-edits"] = []
        self["allow-model"] = []
        self["tokens"] = []

    def opt_allowed_host(self, host: str) -> None:
        """A Host name to accept besides localhost while listening on loopback only (repeatable)."""
        self["allowed-host"].append(host.lower())

    def opt_cors_origin(self, origin: str) -> None:
        """An origin that gets CORS headers, e.g. http://localhost:8080 (repeatable; '*' allows any,
        dangerous without a token)."""
        self["cors-origin"].append(origin)

    def opt_deny_tool(self, tool: str) -> None:
        """A tool always added to the CLI's disallowed tools, whatever the request says (repeatable)."""
        self["deny-tool"].append(tool)

    def opt_allow_input_edits(self, tool: str) -> None:
        """A tool whose input a person's answer may change (repeatable; default AskUserQuestion only). An
        answer that edits another tool's input is refused: a stolen token must not turn an approved ls
        into rm."""
        self["allow-input-edits"].append(tool)

    def opt_allow_model(self, pattern: str) -> None:
        """A model (or a glob such as claude-sonnet-*) that requests may ask for (repeatable; default: any)."""
        self["allow-model"].append(pattern)

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:3000:interface=127.0.0.1 (repeatable;
        default tcp:3000:interface=127.0.0.1)."""
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["max-queue"] < 0:
            raise usage.UsageError("--max-queue must be 0 or more")
        if self["spares"] < 0:
            raise usage.UsageError("--spares must be 0 or more")
        if self["spares"] >= self["max-live"]:
            raise usage.UsageError("--spares must be less than --max-live, or no turn could get a process")
        if self["on-disconnect"] not in ("cancel", "continue"):
            raise usage.UsageError("--on-disconnect must be cancel or continue")
        if self["skip-permissions"] not in ("allow", "deny"):
            raise usage.UsageError("--skip-permissions must be allow or deny")
        if self["approvals"] not in ("allow", "deny"):
            raise usage.UsageError("--approvals must be allow or deny")
        if self["openai-tool-activity"] not in ("reasoning", "content", "hidden"):
            raise usage.UsageError("--openai-tool-activity must be reasoning, content or hidden")
        if self["allow-system-prompt"] not in ("yes", "append", "no"):
            raise usage.UsageError("--allow-system-prompt must be yes, append or no")
        model = self["default-model"]
        if model is not None and not re.match(MODEL_PATTERN, model):
            raise usage.UsageError(f"--default-model {model!r} is not a model name")
        budget = self["max-budget-usd"]
        if budget is not None and not 0 < budget <= 1_000_000:
            raise usage.UsageError("--max-budget-usd must be more than 0")
        if not self["allow-input-edits"]:
            self["allow-input-edits"] = ["AskUserQuestion"]
        self["tokens"] = load_tokens(self["auth-token-file"], os.environ)
        exposed = [d for d in self["listen"] if not is_loopback_listener(d)]
        if exposed and not self["tokens"] and not self["insecure-no-auth"]:
            raise usage.UsageError(
                f"refusing to listen on {exposed[0]!r} without authentication: anyone who can reach it could "
                "run commands on this machine. Give --auth-token-file PATH or set CLAUDESRV_AUTH_TOKENS, "
                "or pass --insecure-no-auth if you really mean it.")


def load_tokens(path: str | None, environ: Mapping[str, str]) -> list[str]:
    tokens = env_tokens(dict(environ))
    if path:
        try:
            tokens += read_token_file(path)
        except OSError as e:
            raise usage.UsageError(f"cannot read --auth-token-file {path}: {e.strerror}") from None
    return tokens


class ClaudeService(service.Service):
    """Owns the database and the live sessions: opens them at start, ends them cleanly at stop."""

    def __init__(self, store: SessionStore, registry: SessionRegistry, sessions: Sessions,
                 workspaces: Workspaces, cli: ClaudeExecutable, policy: Policy, token_file: str | None) -> None:
        self.sessions = sessions
        self.policy = policy
        self.token_file = token_file
        self.store = store
        self.registry = registry
        self.workspaces = workspaces
        self.cli = cli
        self.ready: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self.workspaces.ensure_root()
        if self.cli.find() is None:
            log.warn("the Claude CLI {name!r} was not found; requests get 503 until it is: {hint}",
                     name=self.cli.name, hint=INSTALL_HINT)
        reactor: Any = self.registry.clock
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload_tokens))
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # started as `twistd ... &` from a script: keep ignoring SIGINT, but with a handler, which exec
            # resets, so the CLIs get SIGINT's default and can be spawned without forking the daemon
            signal.signal(signal.SIGINT, lambda *_: None)
        self.ready = self.store.start()
        self.ready.addErrback(lambda f: log.failure("could not open the session database", f))
        self.ready.addCallback(lambda _: self.sessions.remove_orphans())
        self.ready.addCallback(lambda _: self.registry.open() if self.cli.find() is not None else None)

    def reload_tokens(self) -> None:
        """SIGHUP: read the token file again; on error keep the tokens in force."""
        if not self.token_file:
            log.info("SIGHUP: no --auth-token-file to reload")
            return
        try:
            tokens = load_tokens(self.token_file, os.environ)
        except usage.UsageError as e:
            log.error("keeping the current tokens: {error}", error=str(e))
            return
        if not tokens and not self.policy.loopback_only:
            log.error("keeping the current tokens: the token file is now empty")
            return
        self.policy.tokens = tokens
        log.info("reloaded {n} auth token(s)", n=len(tokens))

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield self.registry.shutdown()
        # let the last result events leave the socket before the reactor closes connections
        yield deferLater(self.registry.clock, 0.1, lambda: None)
        self.store.close()


def with_backlog(description: str, requests: int) -> str:
    """
    A TCP or TLS listener gets a listen queue as long as the requests it may hold (Twisted's default is
    50: a burst beyond that loses SYNs, and the kernel retries them only after a second).
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={max(50, min(requests, 4096))}"


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    reactor = reactor or global_reactor
    data_dir = os.path.abspath(options["data-dir"])
    os.makedirs(data_dir, exist_ok=True)
    environ = dict(os.environ)
    environ.pop("CLAUDESRV_AUTH_TOKENS", None)  # read already; no child process gets the clients' tokens
    store = SessionStore(PooledSqlite(os.path.join(data_dir, "sessions.db")), reactor)
    workspaces = Workspaces(os.path.join(data_dir, "Workspace"))
    cli = ClaudeExecutable(options["claude"], environ)
    limits = Limits(
        max_runs=options["max-runs"], max_queue=options["max-queue"], max_live=options["max-live"],
        spares=options["spares"], warm_idle=options["warm-idle"],
        run_timeout=options["run-timeout"], idle_timeout=options["idle-timeout"],
        keepalive=options["keepalive"], kill_grace=options["kill-grace"],
        log_max_bytes=options["log-max-bytes"], on_disconnect=options["on-disconnect"],
        deny_tools=tuple(options["deny-tool"]), sandboxed=bool(options["sandboxed"]),
        approval_timeout=options["approval-timeout"], allow_input_edits=tuple(options["allow-input-edits"]),
    )
    live = SessionRegistry(reactor, spawner(reactor), store, workspaces, cli.path, environ, limits,
                           os.path.join(data_dir, "events"))
    sessions = Sessions(store, workspaces, live, environ)
    turn_policy = TurnPolicy(
        skip_permissions=options["skip-permissions"], as_root=os.geteuid() == 0, sandboxed=bool(options["sandboxed"]),
        approvals=options["approvals"], allow_models=tuple(options["allow-model"]),
        default_model=options["default-model"], max_budget_usd=options["max-budget-usd"],
        max_turns_limit=options["max-turns-limit"], allow_system_prompt=options["allow-system-prompt"])
    live.plain_turn = turn_policy.defaults()
    metrics, http_metrics = registry_for(live)
    body_limits = BodyLimits(max_prompt=options["max-prompt"], max_system_prompt=options["max-system-prompt"],
                             max_image_bytes=options["max-image-bytes"])
    api = ClaudeAPI(live, store, workspaces, cli, sessions, Readiness(store, workspaces, live, cli), metrics,
                    policy=turn_policy, body_limits=body_limits, tool_activity=options["openai-tool-activity"])
    policy = Policy(
        tokens=options["tokens"],
        loopback_only=all(is_loopback_listener(d) for d in options["listen"]),
        allowed_hosts=set(options["allowed-host"]),
        cors_origins=set(options["cors-origin"]),
    )

    top = service.MultiService()
    ClaudeService(store, live, sessions, workspaces, cli, policy, options["auth-token-file"]).setServiceParent(top)
    ttl = options["session-ttl"]
    if ttl > 0:
        expiry = TimerService(min(ttl, 60.0), sessions.expire, ttl)
        expiry.clock = reactor
        expiry.setServiceParent(top)
    guard = Guard(api.resource(), policy, reactor, http_metrics)
    # the API takes JSON only: no form parsing (Twisted parses each POST's Content-Type with the email package)
    site = Site(guard, requestFactory=request_factory(options["max-body"]), parsePOSTFormSubmission=False,
                timeout=options["http-timeout"] or None)
    site.protocol = LimitedChannel  # type: ignore[method-assign, assignment]
    site.displayTracebacks = False
    for description in options["listen"]:
        strports.service(with_backlog(description, options["max-runs"] + options["max-queue"]),
                         site).setServiceParent(top)
    return top
