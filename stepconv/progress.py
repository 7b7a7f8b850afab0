"""Progress reporting: a rich bar on a terminal, plain lines otherwise, nothing with --quiet.

The reporter is a callable `report(nbytes, what)`; `report.set_total(n)` lets a conversion that only
learns its size after reading the checkpoint (mcore-to-hf) turn on the percentage and ETA.
"""

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

            def advance(n: int, what: str) -> None:
                bar.update(task, advance=n)

            advance.set_total = lambda n: bar.update(task, total=n)  # type: ignore[attr-defined]
            yield advance
        return
    state = {"done": 0, "total": total, "last": time.time()}
    t0 = state["last"]

    def line(now: float) -> None:
        done, tot = state["done"], state["total"]
        rate = done / max(now - t0, 1e-9) / 1e6
        if tot:
            eta = (tot - done) / (rate * 1e6) if rate > 0 else 0.0
            print(f"{label}: {100.0 * done / tot:5.1f}% {done / 1e9:.2f}/{tot / 1e9:.2f} GB {rate:.0f} MB/s "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)
        else:
            print(f"{label}: {done / 1e9:.2f} GB {rate:.0f} MB/s", file=sys.stderr, flush=True)

    def report(n: int, what: str) -> None:
        state["done"] += n
        now = time.time()
        if now - state["last"] >= 5:
            state["last"] = now
            line(now)

    report.set_total = lambda n: state.__setitem__("total", n)  # type: ignore[attr-defined]
    yield report
    line(time.time())


@contextmanager
def steps(total: int, label: str, *, quiet: bool = False) -> Iterator[Callable[[int, str], None] | None]:
    """A progress bar over `total` steps (layers, not bytes) with an ETA; `report(done, what)` sets the count."""
    if quiet:
        yield None
        return
    if sys.stderr.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda done, what: bar.update(task, completed=done, description=f"{label}: {what}")
        return
    t0 = time.time()
    state = {"last": 0.0, "done": 0}

    def report(done: int, what: str) -> None:
        now = time.time()
        if done != state["done"] and (now - state["last"] >= 5 or done == total):
            state["last"], state["done"] = now, done
            eta = (now - t0) / done * (total - done) if done else 0.0
            print(f"{label}: {done}/{total} {what}, eta {eta:.0f}s", file=sys.stderr, flush=True)

    yield report
