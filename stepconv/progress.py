"""Progress reporting: a rich bar on a terminal, plain lines otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

Report = Callable[[int, str], None]


@contextmanager
def progress(total: int, label: str, *, quiet: bool = False) -> Iterator[Report | None]:
    if quiet:
        yield None
        return
    if sys.stderr.isatty():
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(label, total=total or None)
            yield lambda n, what: bar.update(task, advance=n)
        return
    done, last, t0 = 0, 0.0, time.time()

    def report(n: int, what: str) -> None:
        nonlocal done, last
        done += n
        now = time.time()
        if now - last >= 5:
            last = now
            line(now)

    def line(now: float) -> None:
        rate = done / max(now - t0, 1e-9) / 1e6
        if total:
            eta = (total - done) / (rate * 1e6) if rate > 0 else 0.0
            print(f"{label}: {100.0 * done / total:5.1f}% {done / 1e9:.2f}/{total / 1e9:.2f} GB {rate:.0f} MB/s "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)
        else:
            print(f"{label}: {done / 1e9:.2f} GB {rate:.0f} MB/s", file=sys.stderr, flush=True)

    last = t0
    yield report
    line(time.time())
