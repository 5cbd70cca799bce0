#!/usr/bin/env python3
"""The fake ``claude`` CLI (see ``fake_claude_impl.py`` for what it does and how to drive it).

Only a launcher: a script is compiled at every start (some 40 ms for the fake's 2000 lines), an imported
module is not, so the fake lives in a module whose bytecode is cached, also where the environment says
PYTHONDONTWRITEBYTECODE (when the directory cannot be written, Python compiles it as before).
"""

import sys

sys.dont_write_bytecode = False
from fake_claude_impl import main  # noqa: E402  (after the flag, so its bytecode is cached)

main(sys.argv)
