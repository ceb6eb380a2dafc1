"""Progress people can see: Rich bars on a terminal, a plain line every ~30 s in a log.

Rich draws a bar only on a terminal; under SLURM, CI or `2> log` it would print the bar once,
at the end. `RateProgress` keeps the bars for a terminal and otherwise writes one plain line
per task every `LOG_EVERY_S` seconds (and one when the task ends), with documents/s and
tokens/s, so a long job shows it is alive. `Throttle` is the timer both use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from layermoe.core.console import err_console
from layermoe.core.numbers import human, human_bytes

LOG_EVERY_S = 30.0


class Throttle:
    """`due()` is true at most once every `interval` seconds (first after `interval`)."""

    def __init__(self, interval: float | None = None):
        self.interval = LOG_EVERY_S if interval is None else interval
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False


@dataclass
class _Task:
    label: str
    total: float | None  # in `unit`s (bytes of the source, or a token budget)
    unit: str
    started: float = field(default_factory=time.monotonic)
    completed: float = 0
    documents: int = 0
    tokens: int = 0
    rich_id: int | None = None

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        if self.total:
            done = human_bytes(self.completed) if self.unit == "bytes" else human(self.completed)
            whole = human_bytes(self.total) if self.unit == "bytes" else human(self.total)
            where = f"{min(100.0, 100 * self.completed / self.total):.0f}% ({done} of {whole})"
        else:
            where = human_bytes(self.completed) if self.unit == "bytes" and self.completed else ""
        parts = [f"{self.label}:", where,
                 f"{human(self.documents)} documents ({human(self.documents / elapsed)}/s),",
                 f"{human(self.tokens)} tokens ({human(self.tokens / elapsed)}/s),",
                 f"{elapsed:.0f} s"]
        return " ".join(p for p in parts if p)


class RateProgress:
    """Tasks that count source units, documents and tokens. Use as a context manager."""

    def __init__(self, console: Console, interval: float | None = None, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.throttle = Throttle(interval)
        self.tasks: list[_Task] = []
        self.bars = None
        if self.live:
            self.bars = progress_bars(console, TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[rates]}"))

    def __enter__(self) -> "RateProgress":
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.stop()

    def add(self, label: str, total: float | None = None, unit: str = "bytes") -> _Task:
        task = _Task(label, total, unit)
        if self.bars is not None:
            task.rich_id = self.bars.add_task(label, total=total, rates="")
        self.tasks.append(task)
        return task

    def update(self, task: _Task, *, completed: float | None = None, documents: int = 0, tokens: int = 0) -> None:
        """Add `documents` and `tokens`; set `completed` (source units) when given."""
        if completed is not None:
            task.completed = completed
        task.documents += documents
        task.tokens += tokens
        if not self.enabled:
            return
        if self.bars is not None:
            elapsed = max(time.monotonic() - task.started, 1e-9)
            rates = f"{human(task.documents)} docs {human(task.documents / elapsed)}/s · " \
                    f"{human(task.tokens)} tok {human(task.tokens / elapsed)}/s"
            self.bars.update(task.rich_id, completed=task.completed, rates=rates)
        elif self.throttle.due():
            self.console.print(task.line(), highlight=False, soft_wrap=True)

    def finish(self, task: _Task, note: str = "done") -> None:
        if not self.enabled:
            return
        if self.bars is not None:
            self.update(task)
        else:
            self.console.print(f"{task.line()} — {note}", highlight=False, soft_wrap=True)


def progress_bars(console: Console, *middle: ProgressColumn, elapsed: bool = True) -> Progress:
    """The one shape of every Rich progress display here: bold description, bar, `middle`, times."""
    times = [TimeElapsedColumn()] if elapsed else []
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *middle, *times, TimeRemainingColumn(),
                    console=console, transient=False)


@contextmanager
def token_progress(description: str) -> Iterator:
    """A Rich progress bar on stderr; yields `update(task_label, done, total)`."""
    progress = progress_bars(err_console, MofNCompleteColumn(), TextColumn("{task.fields[rate]}"))
    tasks: dict[str, int] = {}
    started: dict[str, float] = {}
    last_event = [time.perf_counter()]

    def update(label: str, done: int, total: int) -> None:
        # The first report of a label comes after its first batch: its clock starts at the previous report.
        now = time.perf_counter()
        if label not in tasks:
            tasks[label] = progress.add_task(f"{description} {label}", total=total, rate="")
            started[label] = last_event[0]
        last_event[0] = now
        elapsed = now - started[label]
        rate = f"{done / elapsed:,.0f} tok/s" if elapsed > 0 else ""
        progress.update(tasks[label], completed=done, total=total, rate=rate)

    with progress:
        yield update
