"""The command line's one progress bar (local renders, jobs on a server, uploads)."""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """One line on stderr. On a terminal it is redrawn in place, at most ten times a second, with the rate and the
    time left; elsewhere, a bar with a ``label`` writes a line at every tenth of the way and one at the end, and a
    bar without one stays silent (a local render's output is its files and its summary)."""

    def __init__(self, label: str | None = None, stream=None, width: int = 30):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = self.tty  # worth computing a note for
        self._start = time.monotonic()
        self._drawn = 0.0
        self._decile = -1

    def update(self, done: int, total: int, note: str = "") -> None:
        total = max(total, 1)
        now = time.monotonic()
        if self.tty:
            if done < total and now - self._drawn < 0.1:
                return
            self._drawn = now
            filled = round(self.width * min(done, total) / total)
            rate = (now - self._start) / max(done, 1)
            head = f"{self.label} " if self.label else ""
            tail = f"  {rate:.3f} s/step  eta {rate * (total - done):.0f} s" if done else ""
            self.stream.write(f"\r{head}[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {note}{tail}"
                              "\x1b[K")
            self.stream.flush()
        elif self.label and int(10 * min(done, total) / total) > self._decile:
            self._decile = int(10 * min(done, total) / total)
            self.stream.write(f"{self.label}: {done}/{total} {note}\n")

    def close(self, note: str = "") -> None:
        if self.tty:
            self.stream.write("\n")
        if self.label:
            self.stream.write(f"{self.label}: done in {time.monotonic() - self._start:.1f} s {note}\n")
        self.stream.flush()
