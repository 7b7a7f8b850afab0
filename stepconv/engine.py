"""One plan, several executors: the reader/writer protocol every conversion (and `inspect`) runs through.

A conversion is a plan (`mapping.plan` entries grouped into `Unit`s), a `Reader` that yields each entry's
source tensors, a `step` that turns them into target tensors (`kind.split` per TP rank, or `kind.merge`),
and a `Writer` that puts them somewhere. `execute` drives them in this order:

    writer.begin()
    for each unit (ordered units run concurrently, one thread or one worker process each (`processes`), a lone
                   large one in parts laid out ahead (`writer.parts`, `cut_into`);
                   unordered units one after the other, their entries on the threads or, in parts, the processes):
        reader.open(unit); writer.start(unit)
        for each entry of the unit (ordered: in plan order, sources read ahead on a second thread;
                                     unordered: in any order, on the worker threads):
            targets = step(entry, reader.read(entry)); writer.put(unit, entry, targets)
        result = writer.end(unit); reader.close(unit)
        (a worker process: reader.handover(unit), writer.handover(unit); the parent: take_over(unit, state);
         a unit in parts: the parts as above in the workers, then writer.end(unit) in the parent)
    writer.finish()  (not by `execute`: the caller writes its metadata last, then publishes)

Implementations: legacy rank files (`megatron_io.LegacyWriter` / `LegacyReader`), HF safetensors
(`hf_io.HFReader` / `HFWriter`), and dry runs of both (`dry=True` writers fed meta tensors by a `MetaReader`),
which is what `stepconv inspect` runs, so it reports what the conversion code itself produces.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from . import buffers
from . import processes as forked
from .config import StepconvError
from .mapping import Entry

Progress = Callable[[int, str], None]
Step = Callable[[Entry, list], Sequence]
Measure = Callable[[Entry, list, Sequence], int]  # (entry, sources, targets) -> bytes of progress

READ_AHEAD_BYTES = 32 << 20  # sources read per batch on the reader thread
# Memory two read-ahead batches take (`buffers.scratch` rounds each run up to a size class, at most 25%): what the
# worker plan counts for them, and what the scratch pool may hold.
READ_AHEAD_HELD = 2 * READ_AHEAD_BYTES * 5 // 4
PARTS_PER_WORKER = 8  # an unordered unit in processes: parts handed out one at a time, so uneven parts even out
MIN_PART_ENTRIES = 32  # a part of an ordered unit (`cut_into`): each part's files cost a few syscalls to set up
# Parts of one ordered unit running at once: each writes every file of its unit, and several writers of one file
# serialise on its inode lock and spin there. Eighth pass, threads writing one file (TP=2, 16-core device): 2 / 4 / 8
# / 16 of them, system CPU 9.6 / 11.9 / 18.8 / 23.1 s, no faster. This pass, 16 processes writing TP=4's four files
# in 32 parts (1/8 width, same device): wall 11.9 -> 9.2 s, but system CPU 6.5-7.3 -> 24.7-26.6 s.
PART_WRITERS = 4
FIXED_OVERHEAD = 300 * 10**6  # interpreter, torch, the plan, I/O buffers (the CLI on the tiny fixture peaks at 0.24 GB)


class ByteCount:
    """A count of bytes that many threads add to without a shared lock: each thread adds to its own slot (dict
    operations are atomic under the GIL), and `total` sums them. (A lock taken per expert read convoyed the 16
    workers' read-ahead threads of a torch_dist conversion: with --idle, py-spy put 4.9k of the read threads' samples
    at that lock, 16-core device, 1/8.)"""

    __slots__ = ("_slots", "_taken")

    def __init__(self):
        self._slots: dict[int, int] = {}
        self._taken = 0

    def add(self, n: int) -> None:
        k = threading.get_ident()
        self._slots[k] = self._slots.get(k, 0) + n

    @property
    def total(self) -> int:
        return sum(list(self._slots.values()))

    def take(self) -> int:
        """Bytes added since the last `take` (a worker process hands its count over unit by unit)."""
        total = self.total
        n, self._taken = total - self._taken, total
        return n


class ReadCount:
    """A reader's bytes read (`_read`, a ByteCount its `__init__` makes), handed over unit by unit from worker
    processes to the parent (`handover`/`take_over`)."""

    _read: ByteCount

    @property
    def bytes_read(self) -> int:
        return self._read.total

    def handover(self, unit) -> int:
        """(engine, worker processes) The bytes this process read since the last handover."""
        return self._read.take()

    def take_over(self, unit, n: int) -> None:
        self._read.add(n)


@dataclass
class Unit:
    """Entries written together by one writer thread (ordered) or spread over the pool (unordered).

    hf-to-mcore: one PP stage x one EP rank (all its TP rank files), plus the MTP-head sidecar; each is
    journaled when complete so that `--resume` skips it. A non-expert tensor is counted as consumed (for the
    audit) by the unit with `primary` set (EP rank 0). mcore-to-hf: one PP stage (its rank files mapped at once).
    """

    name: str
    entries: list[Entry]
    outputs: list[str] = field(default_factory=list)  # files it produces, relative to the output root
    stage: int | None = None
    ep_rank: int | None = None
    ordered: bool = True
    primary: bool = True

    def split(self, n: int) -> list["Unit"]:
        """Its entries, in order, in `n` parts (fewer where they do not divide), each a unit named for its place."""
        size = -(-len(self.entries) // max(1, n))
        starts = range(0, len(self.entries), size)
        return [replace(self, name=f"{self.name} (part {i + 1} of {len(starts)})", entries=self.entries[a:a + size])
                for i, a in enumerate(starts)]

    def counts(self, entry: Entry) -> bool:
        """Does this unit consume `entry`'s sources for the audit (each source element exactly once overall)?"""
        return not entry.replica and entry.kind.sources > 0 and (entry.ep_rank is not None or self.primary)


@dataclass(frozen=True)
class FileStat:
    """One written file: its size, the tensor bytes in it, its tensors and keys (`_extra_state` included), and the
    block CRCs its writer folded in (`safety.BlockCrcs`, rank files; for the resume journal's digest)."""

    bytes: int
    data_bytes: int
    tensors: int
    keys: int
    crcs: Any = field(default=None, compare=False, repr=False)


@dataclass
class UnitResult:
    files: dict[str, FileStat] = field(default_factory=dict)  # output-relative path -> what it holds

    @property
    def bytes_written(self) -> int:
        return sum(f.bytes for f in self.files.values())


class Reader(Protocol):
    def open(self, unit: Unit) -> None:
        """Before the unit's first read (e.g. map its rank files)."""

    def read(self, entry: Entry) -> list[torch.Tensor]:
        """The entry's source tensors; thread-safe."""

    def nbytes(self, entry: Entry) -> int:
        """Bytes `read(entry)` materialises (read-ahead batches, memory sizing)."""

    def close(self, unit: Unit) -> None:
        """After the unit's last read."""


class ReaderBase:
    """Defaults for readers with nothing to do per unit and nothing worth reading ahead."""

    prefetch = False

    def open(self, unit: Unit) -> None:
        pass

    def close(self, unit: Unit) -> None:
        pass

    def nbytes(self, entry: Entry) -> int:
        return 0


class Writer(Protocol):
    def begin(self) -> None:
        """Once, before any unit."""

    def start(self, unit: Unit) -> None:
        """Before the unit's first put (e.g. open its rank files)."""

    def put(self, unit: Unit, entry: Entry, tensors: Sequence) -> None:
        """The entry's target tensors (one per TP rank, or the HF tensors); called from the unit's threads."""

    def end(self, unit: Unit) -> UnitResult:
        """After the unit's last put: complete its files (renamed into place) and check what they hold."""


def runs(items: Sequence, size: Callable[[Any], int], limit: int) -> list[list]:
    """`items` cut, in order, into runs of at most `limit` total `size` (or one larger item alone)."""
    out: list[list] = [[]]
    total = 0
    for x in items:
        n = size(x)
        if out[-1] and total + n > limit:
            out.append([])
            total = 0
        out[-1].append(x)
        total += n
    return out


def _read_ahead(reader: Reader, entries: Sequence[Entry]) -> Iterator[tuple[Entry, list[torch.Tensor]]]:
    """Yield (entry, its sources) while a second thread reads the next batch, so disk reads overlap the
    splitting and writing. Batches (up to the reader's `read_ahead_bytes`, default READ_AHEAD_BYTES, or one larger entry) keep the thread hand-off off
    the per-expert hot path; two batches are in memory at most. A reader with `read_batch(entries)` (the list of
    `read(e)`) reads a whole batch at once (HFReader: a run of experts of one stack in one pread)."""
    batches = runs(entries, reader.nbytes, getattr(reader, "read_ahead_bytes", READ_AHEAD_BYTES))
    if not entries:
        return
    if not getattr(reader, "prefetch", True):  # nothing to overlap (a dry run's meta tensors)
        for e in entries:
            yield e, reader.read(e)
        return

    read_batch = getattr(reader, "read_batch", None)

    def load(batch: list[Entry]) -> list[list[torch.Tensor] | None]:
        return read_batch(batch) if read_batch is not None else [reader.read(e) for e in batch]

    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, batches[0])
        for i, batch in enumerate(batches):
            loaded = nxt.result()
            if i + 1 < len(batches):
                nxt = pool.submit(load, batches[i + 1])
            for k, entry in enumerate(batch):
                srcs, loaded[k] = loaded[k], None
                yield entry, srcs
                del srcs


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op threads for the duration: one. The converter's tensor work is copies of a few MB (splits,
    merges), where torch's thread pool costs more than it gives: `torch.cat` of two 5 MB expert halves ran at
    0.27 GB/s with 2 threads on a loaded 2-core machine vs 3.7 GB/s with one, and a 32-core host burned 13
    CPU-minutes on 24 GB with threads spinning. Parallelism comes from the engine's worker threads instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The converter builds no reference cycles; the collector's passes over a large plan cost ~5% of the time.
    Held once around all the units, from the calling thread: a pause per unit, with units on several threads, let
    the first unit to finish turn the collector back on for the others (9% of the CPU samples were the collector's,
    perf, 2-core machine, 1/8, torch_dist)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def execute(units: Sequence[Unit], reader: Reader, writer: Writer, step: Step, *, workers: int = 1,
            progress: Progress | None = None, largest_bytes: int = 0,
            unit_done: Callable[[Unit, Counter, UnitResult], None] | None = None,
            measure: Measure | None = None, processes: bool = False,
            meta: Reader | None = None) -> tuple[Counter, list[UnitResult]]:
    """Run `units` through reader -> step -> writer (call order in the module docstring), with one intra-op
    thread and reused buffers (`buffers.pooled`, at most max(256 MiB, 2 x `largest_bytes`) held, and READ_AHEAD_HELD
    for read-ahead runs).

    `progress` gets each entry's bytes: `measure(entry, sources, targets)`, by default the sources' bytes of the
    entries the audit counts (each source byte once, so the total is the source's size).
    `processes`: run the ordered units in up to `workers` forked processes (`processes.run_units`) where there are
    two or more and fork exists, and a large unordered unit's entries there in parts (`parted`); the reader and
    writer then hand their state back (`handover`/`take_over`). `meta`: a reader of meta tensors; with it, in
    processes, a lone large ordered unit is cut in parts (`cut_into`) where the writer can lay its
    files out ahead (`writer.parts(unit, n, targets)`, the targets being `step` on meta sources): the parts run in
    the workers, and the parent ends the unit (`writer.end(unit)`) once all its parts are in.
    Returns the source elements consumed per HF name (for the audit) and each unit's result."""
    pools = buffers.pooled(max(buffers.DEFAULT_POOL, 2 * largest_bytes), READ_AHEAD_HELD)
    with one_intra_op_thread(), pools, gc_paused():
        return _execute(units, reader, writer, step, workers=workers, progress=progress, unit_done=unit_done,
                        measure=measure, processes=processes, meta=meta)


def in_processes(units: Sequence[Unit], workers: int, processes: bool, cuttable: bool = False) -> bool:
    """Does `execute(..., processes=processes)` run these units (any of them) in worker processes? (`cuttable`: the
    writer can cut units in parts, and `execute` is given a meta reader to lay them out.)"""
    return (ordered_in_processes(units, workers, processes, cuttable)
            or any(parted(u, workers, processes) for u in units))


def ordered_in_processes(units: Sequence[Unit], workers: int, processes: bool, cuttable: bool = False) -> bool:
    """Does `execute(..., processes=processes)` run the ordered units in worker processes? Where asked, with two or
    more workers and ordered units (or parts of them), and fork is available."""
    return (processes and workers > 1 and forked.available()
            and (sum(u.ordered for u in units) > 1 or (cuttable and cut_into(units, workers) > 1)))


def lone_large(units: Sequence[Unit]) -> Unit | None:
    """The one ordered unit of at least 2 x MIN_PART_ENTRIES entries, if there is exactly one (what `cut_into` cuts)."""
    big = [u for u in units if u.ordered and len(u.entries) >= 2 * MIN_PART_ENTRIES]
    return big[0] if len(big) == 1 else None


def cut_into(units: Sequence[Unit], workers: int) -> int:
    """Parts to cut a lone large ordered unit into (at least MIN_PART_ENTRIES entries each), with two or more
    workers: 2 per PART_WRITERS (uneven parts even out); 0: none cut. (TP=2 or TP=4 at PP=1, EP=1 is one rank-file
    group: one process wrote every record of it, which bounded the conversion at small record sizes. Two groups
    already run at once: cutting TP=2 x EP=2's two in parts was slower, 16-core device, 1/8, ABBA: 6.37 / 6.54 s
    whole vs 7.34 / 6.90 s in parts, 17.5-18.2 vs 20.3-21.2 CPU-s.)"""
    big = lone_large(units)
    if big is None or workers < 2:
        return 0
    return min(2 * PART_WRITERS, len(big.entries) // MIN_PART_ENTRIES)


def most_at_once(units: Sequence[Unit]) -> int:
    """Ordered units (and parts of a lone large one, PART_WRITERS of them) that can run at once, where it is cut."""
    return sum(u.ordered for u in units) + (PART_WRITERS - 1 if lone_large(units) is not None else 0)


def parted(unit: Unit, workers: int, processes: bool) -> bool:
    """Does `execute(..., processes=processes)` run this unordered unit's entries in worker processes, in parts?
    Where asked, with two or more workers, fork available, and entries enough for PARTS_PER_WORKER parts per
    worker (not a few MTP heads)."""
    return (processes and workers > 1 and not unit.ordered and len(unit.entries) >= PARTS_PER_WORKER * workers
            and forked.available())


def _execute(units: Sequence[Unit], reader: Reader, writer: Writer, step: Step, *, workers: int,
             progress: Progress | None, unit_done: Callable[[Unit, Counter, UnitResult], None] | None,
             measure: Measure | None, processes: bool, meta: Reader | None) -> tuple[Counter, list[UnitResult]]:
    progress_lock = threading.Lock()
    consumed: Counter = Counter()
    results: list[UnitResult] = []

    def locked(n: int, label: str) -> None:
        with progress_lock:
            progress(n, label)

    report: Callable[[int, str], None] | None = locked if progress is not None else None

    def one(unit: Unit, entry: Entry, srcs, mine: Counter, report=report) -> None:
        try:
            targets = step(entry, srcs)
        except (ValueError, RuntimeError) as e:  # a kind's layout check, or shapes torch cannot join
            where = " <-> ".join(x for x in (entry.key, ", ".join(entry.hf)) if x)
            raise StepconvError(f"{where}: {str(e).splitlines()[0]}") from None
        writer.put(unit, entry, targets)
        counted = unit.counts(entry)
        if counted:  # (`mine` is the calling thread's own)
            for h, t in zip(entry.hf, srcs):
                mine[h] += t.numel()
        if report is not None:
            # by default what the audit counts, each source byte once: EP units read the non-expert tensors again
            # and replicas are read once per copy (hf-to-mcore TP=2 x EP=2 showed 142.6%)
            if measure is not None:
                report(measure(entry, srcs, targets), entry.key or entry.hf[0])
            elif counted:
                report(sum(s.numel() * s.element_size() for s in srcs), entry.key or entry.hf[0])

    def done(unit: Unit, mine: Counter, res: UnitResult) -> None:
        if unit_done:
            unit_done(unit, mine, res)

    def end(unit: Unit) -> UnitResult:
        res = writer.end(unit)
        reader.close(unit)
        return res

    def run(unit: Unit, report) -> tuple[Counter, UnitResult]:
        """An ordered unit, start to end, on the calling thread (of this process or of a worker process)."""
        mine: Counter = Counter()
        reader.open(unit)
        writer.start(unit)
        for entry, srcs in _read_ahead(reader, unit.entries):
            one(unit, entry, srcs, mine, report)
        return mine, end(unit)

    def ordered(unit: Unit) -> tuple[Counter, UnitResult]:
        mine, res = run(unit, report)
        done(unit, mine, res)
        return mine, res

    def unordered_in_processes(unit: Unit) -> Counter:
        """The unit's entries cut, in order, into PARTS_PER_WORKER parts per worker, handed out to worker processes
        a part at a time (`processes.run_units`); the unit is opened here, before the fork, so the workers inherit
        it (a legacy checkpoint's stage: mapped and checked once). A worker hands the reader's and writer's state
        back after each part (`handover(part)`: bytes read, the HF files' windows written out and their counts)."""
        parts = unit.split(min(len(unit.entries), PARTS_PER_WORKER * workers))

        def run_part(part: Unit, report) -> tuple[Counter, UnitResult]:
            mine: Counter = Counter()
            for entry in part.entries:
                one(unit, entry, reader.read(entry), mine, report)
            return mine, UnitResult()

        mine: Counter = Counter()
        for c, _ in forked.run_units(parts, workers, run_part, reader=reader, writer=writer, report=report,
                                     done=lambda part, c, res: None):
            mine.update(c)
        return mine

    def unordered(pool: ThreadPoolExecutor, unit: Unit) -> Counter:
        """The unit's entries taken one at a time from a shared iterator by one task per worker thread, each
        counting into its own Counter. (A future per entry, `pool.map`, cost ~40 us an entry in futures, wake-ups
        and a shared Counter's lock: ~1 s of mcore-to-hf's 24.7k entries at 1/64 width, 2-core machine.) After a
        failure the other workers stop at their next entry."""
        entries, take, failed = iter(unit.entries), threading.Lock(), threading.Event()

        def drain() -> Counter:
            mine: Counter = Counter()
            while not failed.is_set():
                with take:
                    entry = next(entries, None)
                if entry is None:
                    break
                try:
                    one(unit, entry, reader.read(entry), mine)
                except BaseException:
                    failed.set()
                    raise
            return mine

        tasks = [pool.submit(drain) for _ in range(min(max(1, workers), len(unit.entries)))]
        wait(tasks)  # (a failure is raised once every task has stopped)
        mine: Counter = Counter()
        for t in tasks:
            mine.update(t.result())
        return mine

    def in_parts(in_order: list[Unit]) -> Iterator[tuple[Counter, UnitResult]]:
        """The ordered units in worker processes, the lone large one in parts (`execute`'s `meta`)."""
        known: dict[tuple, Sequence] = {}

        def targets(e: Entry) -> Sequence:
            """`step` on meta sources, once per signature (the experts of a stack are alike: a meta tensor costs
            ~6 us to make, 25k entries a rank-file group)."""
            key = (e.kind, e.hf, e.source_shapes, e.ctx)
            t = known.get(key)
            if t is None:
                t = known[key] = step(e, meta.read(e))
            return t

        big, n = lone_large(in_order), cut_into(in_order, workers)
        parts = (writer.parts(big, n, targets) if n else None) or []
        # its first part where the unit was, the others after every unit: about PART_WRITERS of its parts at once
        items = [parts[0] if u is big and parts else u for u in in_order] + parts[1:]
        cut = {p.name for p in parts}
        left = set(cut)
        got: Counter = Counter()
        ended: list[tuple[Counter, UnitResult]] = []

        def item_done(item: Unit, c: Counter, res: UnitResult) -> None:
            if item.name not in cut:
                return done(item, c, res)
            got.update(c)
            left.discard(item.name)
            if not left:  # (the last part is in: the unit's files are ended here)
                res = end(big)
                ended.append((got, res))
                done(big, got, res)

        ran = forked.run_units(items, workers, run, reader=reader, writer=writer, report=report, done=item_done)
        yield from (r for item, r in zip(items, ran) if item.name not in cut)
        yield from ended

    writer.begin()
    in_order = [u for u in units if u.ordered]
    cuttable = meta is not None and hasattr(writer, "parts")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        if ordered_in_processes(units, workers, processes, cuttable):
            ran = in_parts(in_order) if cuttable else forked.run_units(in_order, workers, run, reader=reader,
                                                                      writer=writer, report=report, done=done)
        else:
            ran = pool.map(ordered, in_order)
        for c, res in ran:
            consumed.update(c)
            results.append(res)
        for unit in (u for u in units if not u.ordered):
            reader.open(unit)
            writer.start(unit)
            mine = unordered_in_processes(unit) if parted(unit, workers, processes) else unordered(pool, unit)
            consumed.update(mine)
            res = end(unit)
            done(unit, mine, res)
            results.append(res)
    return consumed, results


# --- memory: the one function that sizes the workers and that `inspect` prints ------------------------
@dataclass(frozen=True)
class WorkerPlan:
    """How many units run at once and the memory that takes: `workers x per_worker + fixed`."""

    workers: int
    largest_bytes: int  # the largest set of tensors one entry materialises
    largest_name: str
    factor: int  # copies of it one worker holds at once
    extra_bytes: int  # per worker besides those copies (read-ahead batches)
    fixed_bytes: int = FIXED_OVERHEAD
    write_bytes: int = 0  # per worker: the most its unit's output files hold while written behind

    @property
    def per_worker(self) -> int:
        return self.factor * self.largest_bytes + self.extra_bytes + self.write_bytes

    @property
    def total(self) -> int:
        return self.workers * self.per_worker + self.fixed_bytes

    def formula(self, size: Callable[[int], str]) -> str:
        extra = f" + {size(self.extra_bytes)} read-ahead" if self.extra_bytes else ""
        extra += f" + {size(self.write_bytes)} write-behind" if self.write_bytes else ""
        return (f"{size(self.total)} = {self.workers} worker(s) x ({self.factor} x {size(self.largest_bytes)}{extra})"
                f" + {size(self.fixed_bytes)} fixed")


def plan_workers(units: Sequence[Unit], entry_bytes: Callable[[Entry], int], *, factor: int, read_ahead: bool,
                 jobs: int | None, budget: int | None, write_bytes: Callable[[Unit], int] | None = None,
                 cuttable: bool = False) -> WorkerPlan:
    """Workers within `budget` bytes (default half the RAM) and `jobs` threads (default the CPU count).

    hf-to-mcore holds, per worker, the entry being split, its TP shards and the batch read ahead (factor 3,
    two read-ahead batches), and what its unit's files hold while they are written behind (`write_bytes` of the
    largest unit); mcore-to-hf holds an entry's TP shards and the merged tensor (factor 2)."""
    best, name = 0, ""
    for u in units:
        for e in u.entries:
            n = entry_bytes(e)
            if n > best:
                best, name = n, " + ".join(e.hf) + (f" (expert {e.expert})" if e.expert is not None else "")
    extra = READ_AHEAD_HELD if read_ahead else 0
    writes = max((write_bytes(u) for u in units), default=0) if write_bytes is not None else 0
    budget = budget if budget is not None else default_max_memory()
    one = WorkerPlan(1, best, name, factor, extra, write_bytes=writes)
    if budget < one.per_worker:
        raise StepconvError(f"--max-memory {budget / 2**30:.2f} GiB is below the largest tensor working set "
                            f"{one.per_worker / 2**30:.2f} GiB; allow at least that much")
    parallel = len([u for u in units if u.ordered]) or 1
    if cuttable:  # (units cut in parts, `cut_into`)
        parallel = max(parallel, most_at_once(units))
    if any(not u.ordered for u in units):
        parallel = max(parallel, max(len(u.entries) for u in units if not u.ordered))
    workers = max(1, min(jobs or os.cpu_count() or 1, parallel, budget // max(one.per_worker, 1)))
    return WorkerPlan(workers, best, name, factor, extra, write_bytes=writes)


def default_max_memory() -> int:
    """Half the machine's RAM."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30
