"""
JSON logs for ``twistd --logger claudesrv.logs.json_stdout``: one JSON object per line on stdout, the
format that ``twist --log-format=json`` also writes, ready for journald, Loki or jq.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_stdout() -> ILogObserver:
    return jsonFileLogObserver(sys.stdout)
