"""Training progress on stderr: a live bar on a terminal, plain lines everywhere else.

A tqdm bar redraws one line with carriage returns, which is unreadable in a log file, so
tqdm hides itself when its stream is not a terminal -- and a job in CI or behind
``| tee`` then shows nothing for minutes. :class:`Progress` keeps the bar on a terminal
and otherwise prints one line every ``interval_s`` seconds of wall time (and at the end)::

    train teacher (mlp): step 300/1500 (20%) loss 0.4132 12.3 steps/s

Everything goes to stderr: stdout carries the CLI's JSON result.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm.auto import tqdm

#: How often (wall seconds) the bar's loss figure is renewed: often enough to look live,
#: rarely enough that formatting it costs nothing next to a training step.
BAR_LOSS_EVERY_S = 0.5


class Progress:
    """Reports a loop's progress: ``update(done, loss)`` after each step, ``close()`` at the end.

    ``enabled=False`` prints nothing. Otherwise the mode follows ``stream`` (default
    ``sys.stderr``): a tqdm bar when it is a terminal (``tty`` overrides the check), else
    plain lines every ``interval_s`` seconds of ``clock`` time, and one at the end. The
    loss shown is the mean of the losses passed since the previous line (or bar refresh),
    the speed the steps per second since then. ``clock`` and ``stream`` are injectable so
    that tests need not sleep.
    """

    def __init__(
        self,
        *,
        total: int,
        initial: int = 0,
        description: str = "train",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.total, self.description, self.interval_s, self.clock = total, description, interval_s, clock
        # Resolved now, not at import: pytest and the CLI may swap sys.stderr in between.
        self.stream = stream if stream is not None else sys.stderr
        if not enabled:
            self.mode = "off"
        else:
            self.mode = "bar" if (tty if tty is not None else _is_terminal(self.stream)) else "lines"
        self.done = self._shown_done = initial
        self._shown_at = clock()
        self._printed = False
        self._loss_sum, self._loss_count = 0.0, 0
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=initial, desc=description, file=self.stream, dynamic_ncols=True,
                             mininterval=0.5, disable=False)

    def update(self, done: int, loss: float | None = None) -> None:
        """Record that ``done`` steps (of ``total``) are complete, the last with ``loss``."""
        if self.mode == "off":
            return
        if loss is not None:
            self._loss_sum += loss
            self._loss_count += 1
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            now = self.clock()
            if self._loss_count and now - self._shown_at >= BAR_LOSS_EVERY_S:
                # refresh=False: tqdm redraws at its own pace; forcing it here would cost a write per call.
                self._bar.set_postfix(loss=f"{self._take_loss():.4f}", refresh=False)
                self._shown_at = now
            return
        self.done = done
        if self.clock() - self._shown_at >= self.interval_s:
            self._print_line()

    def close(self) -> None:
        """End the report: the bar is closed; in line mode a last line is printed unless the
        previous one already showed the final step."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and (self.done != self._shown_done or not self._printed):
            self._print_line()
        self.mode = "off"  # a second close() prints nothing

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_loss(self) -> float:
        mean = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = 0.0, 0
        return mean

    def _print_line(self) -> None:
        now = self.clock()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f"{self.description}: step {self.done}/{self.total} ({pct:.0f}%)"
        if self._loss_count:
            line += f" loss {self._take_loss():.4f}"
        elapsed = now - self._shown_at
        if self.done > self._shown_done and elapsed > 0:
            line += f" {(self.done - self._shown_done) / elapsed:.1f} steps/s"
        self.stream.write(line + "\n")
        self.stream.flush()  # a line that waits in a buffer is no progress report
        self._shown_at, self._shown_done, self._printed = now, self.done, True


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
