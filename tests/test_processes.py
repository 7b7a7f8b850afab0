"""Units in worker processes (stepconv.processes): hf-to-mcore's ordered units and mcore-to-hf's entries in parts
write the same bytes as threads, every unit's state is handed back, failures are reported as one line with nothing
published, and no worker outlives its parent."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_fixture, tree_digest as digest
from stepconv import processes, safety
from stepconv.config import StepconvError
from stepconv.convert import hf_to_mcore, mcore_to_hf
from stepconv.engine import ByteCount
from stepconv.hf_io import HFCheckpoint, HFReader, HFWriter, SafetensorsWriter
from stepconv.megatron_io import LegacyWriter
from stepconv.publish import Journal
from stepconv.torch_dist import TorchDistWriter

pytestmark = pytest.mark.skipif(not processes.available(), reason="worker processes need fork and Linux")


@pytest.fixture
def unit_pids(tmp_path, monkeypatch):
    """(unit name, pid) of each unit the writers end, from whichever process ran it (a file: a worker process's
    lists die with it)."""
    log = tmp_path / "units.log"
    for cls in (LegacyWriter, TorchDistWriter):
        def end(self, unit, _end=cls.end):
            with open(log, "a") as f:
                f.write(f"{unit.name}\t{os.getpid()}\n")
            return _end(self, unit)
        monkeypatch.setattr(cls, "end", end)

    def read():
        return [tuple(line.split("\t")) for line in log.read_text().splitlines()] if log.exists() else []
    return read


ONE, LAST = {"stage 0 ep 0"}, {"stage 1 ep 0"}


@pytest.mark.parametrize("options, cut_units", [
    (dict(tp=2, ep=2), set()), (dict(tp=2, pp=2), LAST), (dict(tp=4), ONE), (dict(tp=2, pp=2, vpp=2), LAST),
    (dict(tp=2, etp=1), ONE), (dict(tp=1), ONE), (dict(tp=2, format="torch_dist"), set())],
    ids=["tp2-ep2", "tp2-pp2", "tp4", "tp2-pp2-vpp2", "tp2-etp1", "tp1", "torch_dist"])
def test_worker_processes_write_the_bytes_threads_write(tmp_path, fixture_dir, options, cut_units, unit_pids):
    """A lone large rank-file group runs in parts (each part's records in its byte range of every file of the
    group, laid out ahead), ended by the main process once all its parts are in; two large groups (EP=2) run whole,
    and so do torch_dist's units (a layer each). (At PP=2 the tiny fixture's stage 0 holds under 2 x
    MIN_PART_ENTRIES entries: stage 1 is the lone large group.)"""
    progress = {}

    def counter(key):
        progress[key] = 0

        def report(n, label):
            progress[key] += n
        return report

    a = hf_to_mcore(fixture_dir, tmp_path / "threads", jobs=3, processes=False, progress=counter("threads"),
                    **options)
    ran_threads = unit_pids()
    b = hf_to_mcore(fixture_dir, tmp_path / "procs", jobs=3, processes=True, progress=counter("procs"), **options)
    ran_procs = unit_pids()[len(ran_threads):]
    me = str(os.getpid())
    assert {pid for _, pid in ran_threads} == {me}
    parts = [(n, pid) for n, pid in ran_procs if " (part " in n]
    wholes = [(n, pid) for n, pid in ran_procs if " (part " not in n]
    cut = {n.split(" (part ")[0] for n, _ in parts}
    assert me not in {pid for _, pid in parts}  # every part ran in a worker process, and every unit not cut
    assert all((pid == me) == (n in cut) for n, pid in wholes)  # (a cut unit's files are ended by the parent)
    assert cut == cut_units
    assert len({pid for _, pid in ran_procs} - {me}) >= 2
    assert sorted(n for n, _ in wholes) == sorted(n for n, _ in ran_threads)

    assert digest(tmp_path / "procs") == digest(tmp_path / "threads")  # torch_dist's index (.metadata) included
    source = sum(t.nbytes for t in HFCheckpoint(fixture_dir).tensors.values())
    assert progress == {"threads": source, "procs": source}  # each source byte reported once, from any process
    assert (b.bytes_read, b.bytes_written, b.tensors, b.files) == (a.bytes_read, a.bytes_written, a.tensors, a.files)
    assert b.bytes_read > 0
    assert any(n.startswith("3 worker process(es)") for n in b.notes), b.notes
    assert any(" worker thread(s)" in n for n in a.notes), a.notes  # (threads: at most one a unit)


@pytest.fixture(scope="module")
def mcore_sources(tmp_path_factory, fixture_dir):
    """The fixture as TP=2 x PP=2 legacy rank files and as TP=2 torch_dist."""
    root = tmp_path_factory.mktemp("sources")
    hf_to_mcore(fixture_dir, root / "torch", tp=2, pp=2)
    hf_to_mcore(fixture_dir, root / "torch_dist", tp=2, format="torch_dist")
    return root


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_export_in_worker_processes_writes_the_bytes_threads_write(tmp_path, mcore_sources, fmt, monkeypatch):
    """mcore-to-hf's entries in parts in worker processes: the same HF files as threads, each byte reported and
    counted once. Two PP stages (legacy) run as two rounds of workers, the second starting from the first's counts."""
    log = tmp_path / "puts.log"

    def put(self, unit, entry, tensors, _put=HFWriter.put):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return _put(self, unit, entry, tensors)
    monkeypatch.setattr(HFWriter, "put", put)
    progress = {"threads": 0, "procs": 0}

    def counter(key):
        def report(n, label):
            progress[key] += n
        return report

    a = mcore_to_hf(mcore_sources / fmt, tmp_path / "threads", jobs=2, processes=False, progress=counter("threads"))
    threads = log.read_text().split()
    b = mcore_to_hf(mcore_sources / fmt, tmp_path / "procs", jobs=2, processes=True, progress=counter("procs"))
    procs = log.read_text().split()[len(threads):]
    assert set(threads) == {str(os.getpid())}
    assert len(set(procs) - {str(os.getpid())}) >= 2 and len(procs) == len(threads)
    assert digest(tmp_path / "procs") == digest(tmp_path / "threads")
    written = sum(t.nbytes for t in HFCheckpoint(tmp_path / "threads").tensors.values())
    assert progress == {"threads": written, "procs": written}  # each HF byte reported once, from any process
    assert (b.bytes_read, b.bytes_written, b.tensors, b.files) == (a.bytes_read, a.bytes_written, a.tensors, a.files)
    assert b.bytes_read > 0
    assert "2 worker process(es)" in b.notes and "2 worker thread(s)" in a.notes


def test_export_counts_and_windows_come_back_from_the_workers(tmp_path, mcore_sources, monkeypatch):
    """Each worker's per-tensor byte counts reach the parent's exactly-once check, and each part's gathered windows
    are written by the worker that gathered them: dropping either fails (the check, or the bytes)."""
    monkeypatch.setattr(HFWriter, "take_over", lambda self, unit, written: None)
    with pytest.raises(StepconvError, match="not fully written"):
        mcore_to_hf(mcore_sources / "torch", tmp_path / "uncounted", jobs=2, processes=True)
    monkeypatch.undo()
    mcore_to_hf(mcore_sources / "torch", tmp_path / "threads", jobs=2, processes=False)
    monkeypatch.setattr(SafetensorsWriter, "flush", lambda self: None)
    mcore_to_hf(mcore_sources / "torch", tmp_path / "unflushed", jobs=2, processes=True)
    assert digest(tmp_path / "unflushed") != digest(tmp_path / "threads")


def test_export_of_large_entries_stays_in_threads(tmp_path, mcore_sources, monkeypatch):
    """Entries averaging PARTED_BELOW or more are copies, where processes only add page faults: threads."""
    import stepconv.convert as convert

    monkeypatch.setattr(convert, "PARTED_BELOW", 1)
    s = mcore_to_hf(mcore_sources / "torch", tmp_path / "o", jobs=2, processes=True)
    assert "2 worker thread(s)" in s.notes


def test_only_a_lone_large_group_is_cut_in_parts():
    """`cut_into`: a lone large ordered unit (small ones beside it) is cut, 2 parts per PART_WRITERS, fewer where it
    has fewer than MIN_PART_ENTRIES entries a part; two large units, one worker or none large: none cut.
    `most_at_once` counts PART_WRITERS for the cut one."""
    from stepconv.engine import MIN_PART_ENTRIES, PART_WRITERS, Unit, cut_into, most_at_once
    from stepconv.kinds import REPLICATE, SplitContext
    from stepconv.mapping import Entry

    def unit(name, n, ordered=True):
        return Unit(name, [Entry((f"t{i}",), f"k{i}", REPLICATE, 0, SplitContext(1)) for i in range(n)],
                    ordered=ordered)
    big, small, heads = unit("big", 100 * MIN_PART_ENTRIES), unit("small", 2 * MIN_PART_ENTRIES - 1), unit("h", 1)
    assert cut_into([big, small, heads], 16) == 2 * PART_WRITERS
    assert most_at_once([big, small, heads]) == PART_WRITERS + 2
    assert cut_into([unit("few", 3 * MIN_PART_ENTRIES), heads], 16) == 3
    assert cut_into([big, unit("big 2", 2 * MIN_PART_ENTRIES), heads], 16) == 0
    assert most_at_once([big, unit("big 2", 2 * MIN_PART_ENTRIES), heads]) == 3
    assert cut_into([big, heads], 1) == 0
    assert cut_into([small, heads, unit("export", 10 ** 4, ordered=False)], 16) == 0


def test_rank_file_groups_of_large_tensors_are_not_cut(tmp_path, fixture_dir, monkeypatch, unit_pids):
    """Tensors averaging PARTED_BELOW or more (the real widths) keep a rank-file group whole, in one worker."""
    import stepconv.convert as convert

    monkeypatch.setattr(convert, "PARTED_BELOW", 1)
    hf_to_mcore(fixture_dir, tmp_path / "o", tp=2, jobs=3, processes=True)
    ran = unit_pids()
    assert ran and not any(" (part " in n for n, _ in ran)
    assert str(os.getpid()) not in {pid for _, pid in ran}


@pytest.mark.parametrize("options", [dict(tp=2, ep=2, jobs=2), dict(tp=2, jobs=3)], ids=["units", "parts"])
def test_rank_file_digests_come_back_from_the_workers(tmp_path, fixture_dir, monkeypatch, options):
    """The resume journal digests each rank file from the CRCs its writer folded in while writing, in whichever
    process that ran, a file written in parts from its parts' CRCs joined: rereading the file instead (what a lost
    or broken `BlockCrcs` would cause) fails here. The digests are those of the files rereread."""
    def reread(path):
        raise AssertionError(f"{path} was reread for its digest")
    journal = {}
    monkeypatch.setattr(safety, "_block_crcs", reread)
    monkeypatch.setattr(Journal, "remove", lambda self: journal.update(self.done))
    hf_to_mcore(fixture_dir, tmp_path / "o", processes=True, **options)
    with pytest.raises(AssertionError, match="reread"):  # (the check itself: a file digested without its CRCs)
        safety.file_digest(next((tmp_path / "o").rglob("model_optim_rng.pt")))
    monkeypatch.undo()
    files = {rel: f["digest"] for u in journal.values() for rel, f in u["files"].items() if rel.endswith(".pt")}
    assert len(files) == (4 if "ep" in options else 2)
    for rel, d in files.items():
        assert d == safety.file_digest(tmp_path / "o" / rel)


def test_a_part_that_writes_other_records_than_laid_out_stops_the_run(tmp_path, fixture_dir, monkeypatch):
    """The parts' byte ranges come from a layout of the step's meta targets; a part whose real tensors differ from
    it (here: the layout told a wrong dtype) stops the run with an internal error, nothing published."""
    read = HFReader.read

    def wrong(self, entry):
        srcs = read(self, entry)
        return [s.to(torch.float16) for s in srcs] if self.meta and entry.expert is not None else srcs
    monkeypatch.setattr(HFReader, "read", wrong)
    with pytest.raises(StepconvError, match="wrote records other than laid out"):
        hf_to_mcore(fixture_dir, tmp_path / "o", tp=2, jobs=3, processes=True)
    assert not (tmp_path / "o").exists()


def test_an_error_in_a_worker_process_is_the_units_own_one_line_error(tmp_path, fixture_dir, monkeypatch):
    def put(self, unit, entry, tensors, _put=LegacyWriter.put):
        if unit.ep_rank == 1 and "linear_fc2" in (entry.key or ""):
            raise StepconvError(f"{entry.key}: a bad tensor (injected)")
        _put(self, unit, entry, tensors)
    monkeypatch.setattr(LegacyWriter, "put", put)
    with pytest.raises(StepconvError, match=r"linear_fc2.*: a bad tensor \(injected\)$") as e:
        hf_to_mcore(fixture_dir, tmp_path / "o", tp=2, ep=2, jobs=2, processes=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_worker_process_that_dies_stops_the_run_and_says_so(tmp_path, fixture_dir, monkeypatch):
    pids = tmp_path / "pids"

    def put(self, unit, entry, tensors, _put=LegacyWriter.put):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        if unit.ep_rank == 1:
            os._exit(7)  # (what the kernel's OOM killer leaves: no message, no cleanup)
        _put(self, unit, entry, tensors)
    monkeypatch.setattr(LegacyWriter, "put", put)
    t = time.time()
    with pytest.raises(StepconvError, match=r"worker process converting stage 0 ep 1 died \(exit code 7\)"):
        hf_to_mcore(fixture_dir, tmp_path / "o", tp=2, ep=2, jobs=2, processes=True)
    assert time.time() - t < 60
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    workers = {int(p) for p in pids.read_text().split()}
    assert len(workers) == 2 and os.getpid() not in workers
    assert not [p for p in workers if _alive(p)]  # the other worker was stopped, not left running


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not this one")


@pytest.mark.parametrize("exc", [KeyError("an internal bug (injected)"), OSError(27, "File too large", "x.pt"),
                                 KeyboardInterrupt(), Unpicklable("an internal bug (injected)")],
                         ids=["KeyError", "OSError", "KeyboardInterrupt", "unpicklable"])
def test_a_worker_processs_exception_is_raised_again_with_where_it_came_from(tmp_path, fixture_dir, monkeypatch,
                                                                             exc):
    """The CLI words a StepconvError, an OSError (errno, path) and an interrupt as it does without workers; any
    other exception carries the worker's traceback."""
    def put(self, unit, entry, tensors, _put=LegacyWriter.put):
        if unit.ep_rank == 1:
            raise exc
        _put(self, unit, entry, tensors)
    monkeypatch.setattr(LegacyWriter, "put", put)
    with pytest.raises(BaseException) as e:
        hf_to_mcore(fixture_dir, tmp_path / "o", tp=2, ep=2, jobs=2, processes=True)
    if isinstance(exc, Unpicklable):
        assert type(e.value) is RuntimeError
        assert "converting stage 0 ep 1 failed:" in str(e.value) and "Unpicklable: an internal bug" in str(e.value)
    else:
        assert type(e.value) is type(exc) and e.value.args == exc.args
        assert "converting stage 0 ep 1:" in e.value.__notes__[0] and "in put" in e.value.__notes__[0]
    if isinstance(exc, OSError):
        assert (e.value.errno, e.value.filename) == (27, "x.pt")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_byte_count_take_is_what_was_added_since():
    c = ByteCount()
    c.add(5)
    assert c.take() == 5
    c.add(3)
    c.add(4)
    assert (c.take(), c.take(), c.total) == (7, 0, 12)


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(x) for x in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_9(proc, workers: list[int]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.01)
    assert not any(_alive(p) for p in workers), "a worker process outlived its killed parent"


SLEEPER = """
import os, sys, time
from stepconv import processes

def run(unit, report):
    print(os.getpid(), flush=True)
    time.sleep(120)

processes.run_units(["a", "b"], 2, run, reader=None, writer=None, report=None, done=lambda *a: None)
"""


def test_worker_processes_die_with_their_parent(tmp_path):
    """A killed conversion's workers die with it, mid-unit: else they would finish their units into the `.partial`
    folder while a `--resume` started at once writes the same files."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    workers = [int(proc.stdout.readline()) for _ in range(2)]
    assert all(_alive(p) for p in workers)
    _kill_9(proc, workers)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tp", "2", "--pp", "2", "--ep", "2", "--jobs", "2"], ["--tp", "2", "--jobs", "3"]],
                         ids=["units", "parts"])
def test_kill_9_then_resume_with_worker_processes_is_byte_identical(tmp_path, layout):
    """kill -9 of a conversion running units (or a unit's parts) in worker processes: its workers go too, and
    `--resume` completes it byte for byte as an uninterrupted run."""
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("no /proc/<pid>/task/<tid>/children here")
    hf = make_fixture.make_checkpoint(tmp_path / "hf", num_layers=8, hidden=1024, ffn=1024, moe_ffn=512, experts=8)
    cli = [sys.executable, "-m", "stepconv.cli", "hf-to-mcore", str(hf)]
    opts = [*layout, "-q"]
    ref = tmp_path / "ref"
    assert subprocess.run([*cli, "-o", ref, *opts, "--threads"], capture_output=True).returncode == 0

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    journal = partial / ".stepconv-journal.json"
    proc = subprocess.Popen([*cli, "-o", out, *opts])
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 2 and journal.exists() and journal.read_text().count('"outputs"') >= 1:
            break
        time.sleep(0.005)
    assert proc.poll() is None and len(workers) >= 2, "conversion finished before it could be killed"
    _kill_9(proc, workers)
    assert not out.exists()

    r = subprocess.run([*cli, "-o", out, "--resume", *opts], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "already complete" in r.stdout
    assert digest(out) == digest(ref)


def test_the_cli_runs_units_in_processes_unless_told_threads(tmp_path, fixture_dir):
    """`--threads` is the library's processes=False; the summary says which ran, and the outputs are the same."""
    cli = [sys.executable, "-m", "stepconv.cli", "hf-to-mcore", "-q", "--tp", "2", "--ep", "2", "-j", "2",
           str(fixture_dir)]
    procs = subprocess.run([*cli, "-o", str(tmp_path / "p")], capture_output=True, text=True)
    threads = subprocess.run([*cli, "-o", str(tmp_path / "t"), "--threads"], capture_output=True, text=True)
    assert procs.returncode == 0 and threads.returncode == 0, procs.stderr + threads.stderr
    assert "2 worker process(es)" in procs.stdout and "2 worker thread(s)" in threads.stdout
    assert digest(tmp_path / "p") == digest(tmp_path / "t")
    export = [sys.executable, "-m", "stepconv.cli", "mcore-to-hf", "-q", "-j", "2", str(tmp_path / "p")]
    procs = subprocess.run([*export, "-o", str(tmp_path / "hp")], capture_output=True, text=True)
    threads = subprocess.run([*export, "-o", str(tmp_path / "ht"), "--threads"], capture_output=True, text=True)
    assert procs.returncode == 0 and threads.returncode == 0, procs.stderr + threads.stderr
    assert "2 worker process(es)" in procs.stdout and "2 worker thread(s)" in threads.stdout
    assert digest(tmp_path / "hp") == digest(tmp_path / "ht")
