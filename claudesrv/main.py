"""
The ``claudesrv`` command: the daemon in the foreground with the defaults a person or a container wants (no
pidfile, no saved state, logs on stdout), run by twistd's own machinery. ``claudesrv ARGS`` is
``twistd -n --pidfile= claudesrv ARGS``, plus ``--log-format json`` for JSON Lines, and with its errors said in
one line: a bad option, a port in use, a data dir it cannot create.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from twisted.application.service import ServiceMaker
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions, runApp

from claudesrv.tap import ListenFailed, Options, usage_line

EXIT_USAGE = 2


class CommandOptions(Options):
    synopsis = "Usage: claudesrv [options]"
    longdesc = (Options.longdesc + " Runs in the foreground and logs to stdout; `twistd -n claudesrv` takes the "
                "same options (but --log-format).")

    optParameters = [
        ["log-format", None, "text", "text (a line per event, for people) or json (JSON Lines: one JSON object "
                                     "per line, with time, level, event and message)."],
    ]

    def postOptions(self) -> None:
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format: must be text or json, not {self['log-format']!r}")
        super().postOptions()


def main(argv: list[str] | None = None) -> None:
    """Parse the options (one line and exit 2 if they are wrong), then run the daemon until it is stopped."""
    options = CommandOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as e:
        _fail(usage_line(e), EXIT_USAGE)

    config = ServerOptions()
    twistd = ["--nodaemon", "--pidfile=", "--no_save"]
    if options["log-format"] == "json":
        twistd += ["--logger", "claudesrv.logs.json_stdout"]
    config.parseOptions(twistd)
    config.subCommand = "claudesrv"
    config.subOptions = options
    # what the twistd plugin (twisted/plugins/claudesrv_plugin.py) is, without a scan of the plugins
    config.loadedPlugins = {"claudesrv": ServiceMaker("claudesrv", "claudesrv.tap", "", "claudesrv")}
    try:
        runApp(config)
    except ListenFailed as e:
        _fail(str(e.code), 1)
    except usage.UsageError as e:  # what makeService could not do, e.g. create --data-dir
        _fail(str(e), 1)


def _fail(message: str, status: int) -> NoReturn:
    # the real stderr: once twistd has started logging, sys.stderr is a logger
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"claudesrv: {message}\n")
    stream.flush()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
