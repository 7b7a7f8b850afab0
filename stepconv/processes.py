"""Units run in worker processes forked after the plan: the engine's other executor (hf-to-mcore's ordered units or
parts of them, mcore-to-hf's entries in parts).

Why: at small tensor sizes a conversion is Python per record (a record's split, its zip head and tail, its read),
and the worker threads of one process share one interpreter lock. py-spy on the 16-core device put each unit thread
of a 1/8-scale torch_dist conversion (16 units at once) at its GIL-bound Python; processes take the lock away.

How: `run_units` forks up to `n` processes (the `fork` start method: each inherits the plan, the open source files
and the writer as they are, and imports nothing), hands each a unit index at a time over a pipe, and gets back per
unit the engine's `(consumed, UnitResult)` and what the reader and the writer learned that the parent needs
(`handover`/`take_over`: bytes read, torch_dist's chunk index). Progress comes back as byte counts, a few a second.
The parent alone journals units and reports progress, so a process that dies loses no more than its unit: it is
reported, the others are stopped, and nothing is published.

Forking a process that has threads (a progress bar's refresh thread) is safe here because the child only runs the
unit: no locks of those threads (stdout, the progress bar's) are taken in the child, and it ends with `os._exit`
(multiprocessing's), without running the parent's `finally` blocks or atexit handlers.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import time
import traceback
import warnings
from collections import Counter
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from .config import StepconvError

REPORT_SECONDS = 0.1  # progress sent to the parent at most this often per process


def available() -> bool:
    """Can units run in forked processes here? Linux only: a worker must die with its parent (`_die_with_parent`),
    and macOS's system libraries are not safe to use after fork."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _die_with_parent(parent: int) -> None:
    """SIGKILL this worker when the process that forked it dies (prctl PR_SET_PDEATHSIG). A killed conversion's
    workers would otherwise finish their units into the `.partial` folder, where a `--resume` started at once writes
    the same files."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # (it died before the prctl)
        os._exit(1)


def _handover(part, unit) -> Any:
    f = getattr(part, "handover", None)
    return f(unit) if f is not None else None


def _take_over(part, unit, state) -> None:
    f = getattr(part, "take_over", None)
    if f is not None and state is not None:
        f(unit, state)


class _Reporter:
    """Progress in the worker process: bytes summed and sent to the parent at most every REPORT_SECONDS."""

    def __init__(self, conn: Connection):
        self.conn, self.n, self.label, self.sent = conn, 0, "", time.monotonic()

    def __call__(self, n: int, label: str) -> None:
        self.n += n
        self.label = label
        now = time.monotonic()
        if now - self.sent >= REPORT_SECONDS:
            self.flush()
            self.sent = now

    def flush(self) -> None:
        if self.n:
            self.conn.send(("progress", self.n, self.label))
            self.n = 0


def _worker(parent: int, conn: Connection, others: list[Connection], units: Sequence, run: Callable, reader,
            writer, progress: bool) -> None:
    """A worker process: run the units the parent names until it sends None. `progress`: the parent shows it (else
    `run` gets no reporter, and nothing is counted or sent per entry)."""
    _die_with_parent(parent)
    for c in others:  # the parent's ends of the pipes: only the parent may hold them, so a child sees it die (EOF)
        c.close()
    report = _Reporter(conn) if progress else None
    _handover(reader, None)  # (what the parent had done before the fork is the parent's: start counting from here)
    _handover(writer, None)
    while True:
        try:
            i = conn.recv()
        except EOFError:  # the parent is gone
            return
        if i is None:
            return
        unit = units[i]
        try:
            consumed, res = run(unit, report)
            if report is not None:
                report.flush()
            conn.send(("done", i, consumed, res, _handover(reader, unit), _handover(writer, unit)))
        except BaseException as e:  # the exception itself, raised again by the parent (KeyboardInterrupt too)
            try:
                raised = pickle.loads(pickle.dumps(e))
            except Exception:
                raised = None
            conn.send(("raise", i, raised, traceback.format_exc()))
            return


def run_units(units: Sequence, n: int, run: Callable, *, reader, writer,
              report: Callable[[int, str], None] | None,
              done: Callable[[Any, Counter, Any], None]) -> list[tuple[Counter, Any]]:
    """`run(unit, report) -> (consumed, result)` for each of `units` in up to `n` forked processes (`report` None
    there when this process's `report` is None); `done(unit, consumed, result)` in this process as each completes.
    Returns the results in unit order. A unit that fails raises here (its StepconvError as is) once every process
    has stopped."""
    ctx = multiprocessing.get_context("fork")
    procs: list[tuple[Any, Connection]] = []
    busy: dict[Connection, int] = {}  # a process's pipe -> the unit it runs
    out: list[tuple[Counter, Any] | None] = [None] * len(units)
    todo = list(range(len(units)))[::-1]
    failure: BaseException | None = None
    finished = False

    def hand_out(conn: Connection) -> None:
        if todo:
            busy[conn] = todo.pop()
            conn.send(busy[conn])
        else:
            conn.send(None)

    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns on fork() while threads run; the child touches none of their locks (module doc)
            warnings.simplefilter("ignore", DeprecationWarning)
            for _ in range(max(1, min(n, len(units)))):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(os.getpid(), there, [c for _, c in procs] + [here], units, run,
                                                      reader, writer, report is not None), daemon=True,
                                name="stepconv-unit")
                p.start()
                there.close()
                procs.append((p, here))
        for _, conn in procs:
            hand_out(conn)
        while busy and failure is None:
            for conn in wait(list(busy)):
                try:
                    msg = conn.recv()
                except EOFError:
                    p = next(p for p, c in procs if c is conn)
                    p.join(5)
                    failure = StepconvError(
                        f"the worker process converting {units[busy[conn]].name} died (exit code {p.exitcode}"
                        f"{', killed: out of memory?' if p.exitcode == -9 else ''}); nothing was published; if "
                        f"memory ran out, lower --jobs or --max-memory")
                    break
                kind = msg[0]
                if kind == "progress":
                    if report is not None:
                        report(msg[1], msg[2])
                elif kind == "done":
                    _, i, consumed, res, read_state, write_state = msg
                    unit = units[i]
                    _take_over(reader, unit, read_state)
                    _take_over(writer, unit, write_state)
                    out[i] = (consumed, res)
                    del busy[conn]
                    done(unit, consumed, res)
                    hand_out(conn)
                else:  # "raise": the unit's exception (a StepconvError or OSError the CLI words as one line)
                    _, i, failure, tb = msg
                    if failure is None:  # (one that does not pickle)
                        failure = RuntimeError(f"the worker process converting {units[i].name} failed:\n{tb}")
                    elif not isinstance(failure, StepconvError):  # (--debug shows where, in the worker)
                        failure.add_note(f"raised in the worker process converting {units[i].name}:\n{tb}")
                    break
        finished = failure is None
    finally:
        if not finished:  # a failure, or an interrupt: the others stop mid-unit, and nothing of this run is published
            for p, _ in procs:
                p.terminate()
        for p, conn in procs:
            p.join()
            conn.close()
    if failure is not None:
        raise failure
    return out  # type: ignore[return-value]
