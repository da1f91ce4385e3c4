"""The status line of a long command (`fuzzfarm fuzz`, `fuzzfarm minimize`), drawn with rich.

On a terminal the line is redrawn in place, cut to the terminal's width. Anywhere else (a pipe,
a log file, a CI runner) a plain line is printed now and then instead, so that a log reads as
one status per line without control characters. A missing stream (stderr closed) or one that
goes away (the reader of a pipe exited) only ends the status line: no status is worth failing
a campaign or a minimization for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

# seconds between plain lines: often enough to see progress in a log, rare enough to read it
PLAIN_EVERY = 10.0
# seconds between redraws of the live line: faster is invisible and costs the caller's time
LIVE_EVERY = 0.1


class ProgressLine:
    """One status line on `stream`, live when the stream is an interactive terminal.

    `live` forces either form (True needs a stream that understands cursor movement). Use it
    as a context manager, or call `close` at the end: a live line is left in place with its
    last text and the cursor moves past it.
    """

    def __init__(self, stream: TextIO | None, *, live: bool | None = None,
                 every: float = PLAIN_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last_shown: float | None = None
        self._pending: str | None = None
        self._live: Live | None = None
        self._console: Console | None = None
        self.live = False
        self.every = every
        if stream is None:
            return
        try:
            # the stream decides, not FORCE_COLOR and the like: a CI log is not a terminal
            # however it likes its colours
            terminal = stream.isatty() if live is None else live
        except (OSError, ValueError):  # a closed file says so when asked
            return
        console = _console(stream, terminal)
        if live is None and console.is_dumb_terminal:  # one that cannot move the cursor
            terminal = False
            console = _console(stream, terminal)
        self._console = console
        self.live = terminal
        if terminal:
            self.every = LIVE_EVERY

    @property
    def active(self) -> bool:
        """False once there is nowhere to write to."""
        return self._console is not None

    def due(self) -> bool:
        """Whether an update now would be shown; lets a caller skip building the text."""
        if self._console is None:
            return False
        return self._last_shown is None or self._clock() - self._last_shown >= self.every

    def update(self, text: str) -> None:
        """Show `text` as the status, now or (for a live line) at the next redraw or close."""
        if self._console is None:
            return
        if not self.due():
            if self.live:
                self._pending = text
            return
        self._show(text)

    def close(self) -> None:
        if self._console is None:
            return
        if self._pending is not None:
            self._show(self._pending)
        if self._live is not None:
            live, self._live = self._live, None
            self._guarded(live.stop)
        self._console = None

    def _show(self, text: str) -> None:
        self._last_shown = self._clock()
        self._pending = None
        if self.live:
            line = Text(text, no_wrap=True, overflow="ellipsis")
            if self._live is None:
                live = Live(line, console=self._console, auto_refresh=False,
                            redirect_stdout=False, redirect_stderr=False)
                self._live = live
                self._guarded(lambda: live.start(refresh=True))
            else:
                live = self._live
                self._guarded(lambda: live.update(line, refresh=True))
        else:
            console = self._console
            assert console is not None
            self._guarded(lambda: console.print(Text(text)))

    def _guarded(self, write: Callable[[], object]) -> None:
        try:
            write()
        except (OSError, ValueError):  # the reader went away, or the stream was closed
            self._console = self._live = None

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


class _StatusConsole(Console):
    def on_broken_pipe(self) -> None:
        # rich's default ends the program (SystemExit) and points stdout at /dev/null: here
        # the reader of stderr going away ends the status line and nothing else
        self.quiet = True
        raise BrokenPipeError


def _console(stream: TextIO, terminal: bool) -> Console:
    # plain text only: a status holds brackets and numbers, neither markup nor highlighting
    return _StatusConsole(file=stream, force_terminal=terminal, highlight=False, markup=False,
                          emoji=False, soft_wrap=True)
