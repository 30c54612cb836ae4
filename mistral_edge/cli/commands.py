"""The command table: each command lives in its own module under cli/ and is listed here."""

from __future__ import annotations

COMMANDS: dict = {}
# Each cli module registers itself here, e.g. in cli/info.py:
#     from .commands import COMMANDS; COMMANDS["info"] = info
# and is imported below.

from . import info  # noqa: E402,F401
from . import bundle, export, generate  # noqa: E402,F401
from . import compare  # noqa: E402,F401
from . import serve  # noqa: E402,F401
