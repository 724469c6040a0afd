"""A quiet terminal for long commands (``raybm pipeline --quiet``, ``make demo``): raybm's
headlines on the terminal, and everything else written to this process's standard output
and error (Ray's and its workers' logs, Tune's status tables, ONNX's tracer warnings, C++
libraries' messages) in a log file. Errors still reach the terminal in full."""

from __future__ import annotations

import os
import sys
import time
import traceback
from types import TracebackType
from typing import TextIO

from raybm.errors import RaybmError


class QuietConsole:
    """``with QuietConsole(path) as console``: file descriptors 1 and 2 point at the log
    file from here on (so that Ray's log monitor, which writes until the process ends, never
    reaches the terminal again); ``say`` writes a headline to the terminal and the log,
    ``log`` to the log only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.terminal: TextIO = sys.stdout  # the terminal itself once entered
        self.file: TextIO | None = None

    def __enter__(self) -> QuietConsole:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.file = file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")
        file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if error is not None:
            if isinstance(error, RaybmError):
                self.say(f"error: {error}")
            else:
                self.say("".join(traceback.format_exception(kind, error, tb)).rstrip())
            self.say(f"The whole output is in {self.path}")
        # None: the error goes on up (the CLI exits with its code)

    def say(self, line: str) -> None:
        """A headline: on the terminal and in the log."""
        self.terminal.write(f"{line}\n")
        self.terminal.flush()
        self.log(line)

    def log(self, line: str) -> None:
        """A detail: in the log only."""
        if self.file is not None:
            self.file.write(f"{line}\n")
