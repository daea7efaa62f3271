"""Pull progress: one event type, shaped like Ollama's pull lines, and two ways to show it.

In a terminal: one tqdm bar per stage (bytes and rate for the download). Anywhere else (the
systemd journal, CI, a pipe): one plain line when a stage starts, at every 10 %, and when it ends;
never a carriage return.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

STAGES = ("resolve", "download", "convert", "quantize", "verify", "install")


@dataclass(frozen=True)
class Progress:
    stage: str  # one of STAGES, or "done" / "error"
    status: str  # Ollama's `status`: "pulling manifest", "pulling <digest>", "success", ...
    completed: int | None = None
    total: int | None = None
    digest: str | None = None
    error: str | None = None
    model: str | None = None

    def line(self) -> dict[str, Any]:
        """One NDJSON line: Ollama's pull fields (only those set), plus our stage."""
        data: dict[str, Any] = {"status": self.status, "stage": self.stage}
        for key in ("digest", "total", "completed", "error", "model"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data


Reporter = Callable[[Progress], None]


def ignore(_: Progress) -> None:
    pass


class Throttle:
    """Passes byte progress on at most every `interval` seconds (stage changes always)."""

    def __init__(self, report: Reporter, interval: float = 0.25) -> None:
        self.report = report
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, event: Progress, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.interval and event.total and \
                    (event.completed or 0) < event.total:
                return
            self._last = now
        self.report(event)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class LogLines:
    """Plain lines for logs: a stage's start, each 10 % step, its end."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self._stage: str | None = None
        self._tenth = -1
        self._started = time.monotonic()

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def __call__(self, event: Progress) -> None:
        if event.stage != self._stage:
            self._stage, self._tenth, self._started = event.stage, -1, time.monotonic()
            if event.stage not in ("done", "error"):
                size = f" ({_human(event.total)})" if event.total and event.stage == "download" \
                    else ""
                self._print(f"{event.stage}: {event.status}{size}")
        if event.stage == "error":
            return  # the CLI prints the error line itself
        if event.stage == "done":
            self._print(event.status)
            return
        if event.total:
            tenth = min(10, (event.completed or 0) * 10 // event.total)
            if tenth > self._tenth:
                if self._tenth >= 0 or tenth > 0:
                    elapsed = max(time.monotonic() - self._started, 1e-6)
                    rate = ""
                    if event.stage == "download":
                        rate = f", {_human((event.completed or 0) / elapsed)}/s"
                    self._print(f"{event.stage}: {tenth * 10} % ({_human(event.completed or 0)} "
                                f"of {_human(event.total)}{rate})" if event.stage == "download"
                                else f"{event.stage}: {tenth * 10} %")
                self._tenth = tenth


class TerminalBars:
    """One tqdm bar per stage, in a terminal."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self._stage: str | None = None
        self._bar: Any = None

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __call__(self, event: Progress) -> None:
        from tqdm import tqdm

        if event.stage != self._stage:
            self._close()
            self._stage = event.stage
            if event.stage in ("done", "error"):
                if event.stage == "done":
                    print(event.status, file=self.out, flush=True)
                return
            download = event.stage == "download"
            self._bar = tqdm(total=event.total, desc=f"{event.stage:<8}", file=self.out,
                             unit="B" if download else "it", unit_scale=download,
                             unit_divisor=1024 if download else 1000,
                             bar_format=None if download or event.total else "{desc}: {elapsed}")
        if self._bar is not None and event.total:
            if self._bar.total != event.total:
                self._bar.total = event.total
            self._bar.n = event.completed or 0
            self._bar.refresh()


def for_stream(out: TextIO | None = None) -> Reporter:
    """Bars in a terminal, plain lines everywhere else."""
    stream = out or sys.stderr
    return TerminalBars(stream) if stream.isatty() else LogLines(stream)
