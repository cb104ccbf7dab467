"""How falip warns: one helper that attributes a warning to the caller's code (the first frame outside
falip, so no call site counts its own ``stacklevel``), and other libraries' log lines during a call
folded into falip's own message. The CLI shows each warning as one ``falip: warning: …`` line."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Union

_FALIP_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside_falip(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_FALIP_DIR)


def warn(message: Union[str, Warning], category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the falip package."""
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame is not None and _inside_falip(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class _Collect(logging.Filter):
    """Takes the records of ``package``'s modules (WARNING and above) off the root logger, keeping their text."""

    def __init__(self, package: str) -> None:
        super().__init__()
        module = sys.modules.get(package)
        self.prefix = os.path.dirname(os.path.abspath(module.__file__)) + os.sep if module and module.__file__ else None
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefix is None or not os.path.abspath(record.pathname).startswith(self.prefix):
            return True
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())
        return False


@contextmanager
def folded_logs(package: str) -> Iterator[list[str]]:
    """The messages (WARNING and above) that ``package`` (imported already) logs to the root logger inside
    the block, kept out of the log: the caller says them in its own warning.

    Libraries such as open_clip call ``logging.warning`` on the root logger, which also configures logging
    for the whole process (``WARNING:root:…`` lines) when it has no handler; inside the block it does not."""
    root = logging.getLogger()
    collect = _Collect(package)
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)  # so logging.warning() does not call basicConfig()
    root.addFilter(collect)
    try:
        yield collect.messages
    finally:
        root.removeFilter(collect)
        if placeholder is not None:
            root.removeHandler(placeholder)


def cli_warning_line(message: Union[str, Warning]) -> str:
    """The one line the CLI prints for a warning: ``falip: warning: <message on one line>``."""
    return "falip: warning: " + " ".join(str(message).split())
