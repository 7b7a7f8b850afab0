"""The conversion hot paths of issue 11: reused buffers, rows moved file to file (`FileRows`), rank files without
CRC32, the parallel `compare`. Each is checked against the plain path it replaces."""

import os
import random

import pytest
import torch

from stepconv import buffers, compare, safety
from stepconv.convert import hf_to_mcore, mcore_to_hf
from stepconv.hf_io import FileRows, HFCheckpoint
from stepconv.kinds import SWIGLU, VOCAB, SplitContext
from stepconv.megatron_io import RankFileWriter, load_rank_file


def test_pool_reuses_a_buffer_only_when_nothing_refers_to_it():
    with buffers.pooled(64 << 20) as pool:
        a = buffers.empty((1 << 20,), torch.uint8)
        view = a[10:20].view(torch.int16)
        ptr = a.data_ptr()
        del a
        b = buffers.empty((1 << 20,), torch.uint8)  # a view of the first is alive: a new buffer
        assert b.data_ptr() != ptr
        del view
        c = buffers.empty((512, 1024), torch.bfloat16)  # same byte count, nothing refers to the first: reused
        assert c.data_ptr() == ptr and c.shape == (512, 1024) and c.dtype == torch.bfloat16
        assert pool.hits == 1 and pool.misses == 2
        big = buffers.empty((40 << 20,), torch.uint8)  # over half the limit: not pooled
        assert pool.held == 2 << 20 and big.numel() == 40 << 20
    assert buffers.empty((1 << 20,), torch.uint8).data_ptr() not in (ptr, b.data_ptr())  # no pool outside


def test_scratch_reuses_buffers_by_size_class_and_stays_bounded():
    """Reads of many sizes (`buffers.scratch`) share a buffer per size class (at most 25% over the size asked), in
    their own pool, which a size asked for once between many other takes does not lose, and which holds at most
    SCRATCH_POOL bytes however many sizes come."""
    with buffers.pooled(64 << 20):
        a = buffers.scratch(5_000_000)
        ptr = a.data_ptr()
        del a
        for _ in range(2 * buffers.STALE_TAKES):  # (the shared pool would drop a size this long unasked)
            buffers.empty((300_000,), torch.uint8)
        b = buffers.scratch(4_500_000)  # same class as 5 MB: the same buffer, viewed to the size asked
        assert b.data_ptr() == ptr and b.numel() == 4_500_000
        c = buffers.scratch(5_000_000)  # b is alive: another
        assert c.data_ptr() != ptr
        del b, c
        for n in range(1 << 20, 40 << 20, 777_777):
            t = buffers.scratch(n)
            assert t.numel() == n and n <= t.untyped_storage().nbytes() <= 1.25 * n
            assert buffers._scratch.held <= buffers.SCRATCH_POOL
        assert buffers.scratch(1000).numel() == 1000  # (below MIN_POOLED: not pooled)
    assert buffers._scratch is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_takes_buffers_though_a_parent_thread_held_the_pool_lock():
    """A pool lock held at the fork (by another thread of the parent) is not held in the child."""
    import signal

    with buffers.pooled():
        for lock in (buffers._pool._lock, buffers._scratch._lock):
            with lock:
                pid = os.fork()
                if pid == 0:  # (the child: a held lock would block here until the alarm kills it)
                    signal.alarm(10)
                    ok = buffers.empty((1 << 20,), torch.uint8).numel() + buffers.scratch(1 << 20).numel()
                    os._exit(0 if ok == 2 << 20 else 1)
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0


def _file_rows(path, t: torch.Tensor) -> FileRows:
    path.write_bytes(b"xyz" + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    fd = os.open(path, os.O_RDONLY)
    return FileRows(t.shape, t.dtype, [(fd, 3, t.numel() * t.element_size())])


def test_file_rows_split_and_merge_like_tensors(tmp_path):
    gate, up = torch.randn(8, 6).bfloat16(), torch.randn(8, 6).bfloat16()
    fg, fu = _file_rows(tmp_path / "g", gate), _file_rows(tmp_path / "u", up)
    ctx = SplitContext(2)
    for r in range(2):
        lazy = SWIGLU.split([fg, fu], ctx, r)
        assert isinstance(lazy, FileRows) and torch.equal(lazy.materialise(), SWIGLU.split([gate, up], ctx, r))
    shards = [SWIGLU.split([gate, up], ctx, r) for r in range(2)]
    lazy_shards = [_file_rows(tmp_path / f"s{r}", s) for r, s in enumerate(shards)]
    for got, want in zip(SWIGLU.merge(lazy_shards, ctx), (gate, up)):
        assert isinstance(got, FileRows) and torch.equal(got.materialise(), want)
    emb = torch.randn(10, 4).bfloat16()  # vocab 10 padded to 12: the last rank's pad rows are a tensor piece
    vctx = SplitContext(2, vocab=10, padded_vocab=12)
    last = VOCAB.split([_file_rows(tmp_path / "e", emb)], vctx, 1)
    assert isinstance(last, FileRows) and torch.equal(last.materialise(), VOCAB.split([emb], vctx, 1))
    assert torch.equal(last[:, 1:3], VOCAB.split([emb], vctx, 1)[:, 1:3])  # a column slice reads the rows
    want = VOCAB.split([emb], vctx, 1).reshape(-1).view(torch.uint8).numpy().tobytes()
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    last.write_to(out, 5)
    assert (tmp_path / "out").read_bytes()[5:] == want


def test_file_rows_across_filesystems_go_through_memory(tmp_path, monkeypatch):
    import errno

    def exdev(*a):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", exdev)
    t = torch.randn(6, 4).bfloat16()
    rows = _file_rows(tmp_path / "t", t)[1:5]
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT)
    rows.write_to(out, 3)
    assert (tmp_path / "out").read_bytes()[3:] == t[1:5].reshape(-1).view(torch.uint8).numpy().tobytes()


def test_rank_file_from_file_rows_is_the_tensor_path_byte_for_byte(tmp_path):
    ts = {"a": torch.randn(64, 32).bfloat16(), "b": torch.randn(3, 5), "c": torch.randn(7).bfloat16()}
    files = {}
    for mode in ("tensor", "rows"):
        w = RankFileWriter(tmp_path / mode / "model_optim_rng.pt")
        for k, t in ts.items():
            w.add(k, _file_rows(tmp_path / f"{mode}-{k}", t) if mode == "rows" and k != "b" else t)
        w.add("x._extra_state", None)
        w.finish(__import__("argparse").Namespace(tensor_model_parallel_size=1))
        files[mode] = w.path.read_bytes()
    assert files["rows"] == files["tensor"]
    m = load_rank_file(tmp_path / "rows" / "model_optim_rng.pt")["model"]
    assert all(torch.equal(m[k], t) for k, t in ts.items()) and m["x._extra_state"] is None
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):  # plain torch.load, no mmap
        assert torch.load(tmp_path / "rows" / "model_optim_rng.pt", weights_only=True)["model"].keys() == m.keys()


def test_round_trip_through_the_fast_paths_is_bit_exact(fixture_dir, tmp_path):
    """hf-to-mcore TP=2 (FileRows into rank files) and back (FileRows out of mapped rank files): the HF files are
    the ones the plain path writes (file_rows off), byte for byte."""
    hf_to_mcore(fixture_dir, tmp_path / "m", tp=2)
    mcore_to_hf(tmp_path / "m", tmp_path / "back")
    assert compare.compare_hf(fixture_dir, tmp_path / "back").identical
    from stepconv import convert

    plain = convert.ExportPlan.reader
    try:
        convert.ExportPlan.reader = lambda self, meta=False, file_rows=False: plain(self, meta=meta, file_rows=False)
        mcore_to_hf(tmp_path / "m", tmp_path / "plain")
    finally:
        convert.ExportPlan.reader = plain
    for f in sorted(p.name for p in (tmp_path / "plain").iterdir()):
        assert (tmp_path / "back" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_compare_finds_one_byte_in_any_piece(fixture_dir, tmp_path, monkeypatch, where):
    import shutil

    monkeypatch.setattr(compare, "CHUNK_BYTES", 4096)  # many pieces per tensor
    shutil.copytree(fixture_dir, tmp_path / "b")
    ck = HFCheckpoint(tmp_path / "b")
    name = max(ck.tensors, key=lambda n: ck.tensors[n].nbytes)
    (fd, off, n), = ck.lazy(name, rows_only=True)[:].pieces
    pos = off + {"first": 0, "middle": n // 2 + 1, "last": n - 1}[where]
    path = tmp_path / "b" / ck.tensors[name].file
    data = bytearray(path.read_bytes())
    data[pos] ^= 1
    path.write_bytes(bytes(data))
    c = compare.compare_hf(fixture_dir, tmp_path / "b", jobs=3)
    assert c.differ == [f"{name} (bytes differ)"] and not c.identical


def test_progress_counts_each_byte_once(fixture_dir, tmp_path):
    """hf-to-mcore at TP=2 x EP=2 reads the non-expert tensors once per EP rank (it showed 142.6%), mcore-to-hf
    merges replicated shards and vocab padding: both end at exactly the total they announce."""
    total = sum(t.nbytes for t in HFCheckpoint(fixture_dir).tensors.values())
    got = {"in": 0, "out": 0, "out_total": None}
    hf_to_mcore(fixture_dir, tmp_path / "m", tp=2, ep=2, progress=lambda n, what: got.__setitem__("in", got["in"] + n))

    def out(n, what):
        got["out"] += n
    out.set_total = lambda n: got.__setitem__("out_total", n)
    mcore_to_hf(tmp_path / "m", tmp_path / "back", progress=out)
    assert got["in"] == total and got["out"] == got["out_total"] == total


def test_distcp_chunks_from_templates_are_torch_save_byte_for_byte(tmp_path):
    """A `.distcp` chunk written from its blob template (tensor, or rows copied file to file) is the blob torch.save
    writes (CRC32 off), and loads."""
    import io

    from stepconv.torch_dist import _Sink, _save

    t = torch.randn(3, 5, 7).bfloat16()
    sink = _Sink(tmp_path / "a.distcp")
    spans = [sink.save(t[1:]), sink.save(_file_rows(tmp_path / "src", t[0]).unsqueeze(0))]
    sink.close()
    ref = io.BytesIO()
    _save(t[1:].clone(), ref)
    _save(t[0:1].clone(), ref)
    data = (tmp_path / "a.distcp").read_bytes()
    assert data == ref.getvalue()
    for (start, n), want in zip(spans, (t[1:], t[0:1])):
        assert torch.equal(torch.load(io.BytesIO(data[start:start + n]), weights_only=True), want)


def test_distcp_dry_run_lays_out_what_the_writer_writes(tmp_path):
    """A dry `.distcp` (no file: meta chunks) gives every chunk the offset and length the real file gives it, for
    chunks gathered in the buffer, chunks larger than it (written from memory and file to file) and strided views;
    each real chunk loads as the tensor it came from."""
    import io

    from stepconv.hf_io import GatherFile
    from stepconv.torch_dist import _Sink

    big = torch.randn(GatherFile.BUFFER // 4 + 3, 2)  # fp32: > BUFFER bytes
    chunks = [torch.randn(2, 3).bfloat16(), big, torch.randn(5, 4).bfloat16()[:, 1:3], torch.randn(1, 7),
              _file_rows(tmp_path / "src", big.bfloat16().clone())]
    real, dry = _Sink(tmp_path / "a.distcp"), _Sink(None)
    spans = [real.save(c) for c in chunks]
    assert [dry.save(torch.empty(c.shape, dtype=c.dtype, device="meta")) for c in chunks] == spans
    assert real.close() == dry.close()
    data = (tmp_path / "a.distcp").read_bytes()
    assert spans[-1][0] + spans[-1][1] == len(data)
    for (start, n), c in zip(spans, chunks):
        want = c.materialise() if isinstance(c, FileRows) else c
        assert torch.equal(torch.load(io.BytesIO(data[start:start + n]), weights_only=True), want)


def test_gather_file_writes_behind_in_place_and_reports_errors(tmp_path, monkeypatch):
    """Large pieces written behind (more than IN_FLIGHT pending, so the writer waits on them) land at their offsets
    between gathered small ones; a failed write behind is raised by `close`, naming the file, and leaves no
    descriptor open."""
    from stepconv.hf_io import GatherFile

    monkeypatch.setattr(GatherFile, "IN_FLIGHT", 3 * GatherFile.BUFFER)
    g = GatherFile(tmp_path / "a.tmp", tmp_path / "a")
    want = bytearray()
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        small = torch.randint(0, 255, (1000 + i,), dtype=torch.uint8, generator=gen)
        big = torch.randint(0, 255, (GatherFile.BUFFER + 4096 * i,), dtype=torch.uint8, generator=gen)
        rows = _file_rows(tmp_path / f"src{i}", big.flip(0).clone()) if i % 2 else big
        g.put(b"h%d" % i)
        g.put_data(small, small.numel())
        g.put_data(rows, big.numel())
        want += b"h%d" % i + small.numpy().tobytes() + (big.flip(0) if i % 2 else big).numpy().tobytes()
    assert g.pos == len(want)
    g.close()
    assert (tmp_path / "a.tmp").read_bytes() == bytes(want) and g.fd == -1

    bad = GatherFile(tmp_path / "b.tmp", tmp_path / "b")
    bad.put_data(FileRows((2 * GatherFile.BUFFER,), torch.uint8, [(987654, 0, 2 * GatherFile.BUFFER)]),
                 2 * GatherFile.BUFFER)  # no such source descriptor
    with pytest.raises(OSError) as e:
        bad.close()
    assert str(tmp_path / "b") in str(e.value) and bad.fd == -1


def test_gather_file_writes_full_buffers_behind_in_order_and_reports_errors(tmp_path, monkeypatch):
    """Small pieces only, many buffers' worth: each full buffer is written behind while the next fills, buffers are
    reused (at most BUFFERS of them, waiting on IN_FLIGHT), and the file is the pieces (tensors, strided views, rows
    of a source file) in order; a failed buffer write is raised by `close`, naming the file, with no descriptor left
    open."""
    import errno

    from stepconv import hf_io
    from stepconv.hf_io import GatherFile

    monkeypatch.setattr(GatherFile, "IN_FLIGHT", 2 * GatherFile.BUFFER)
    g = GatherFile(tmp_path / "a.tmp", tmp_path / "a")
    want = bytearray()
    gen = torch.Generator().manual_seed(1)
    while len(want) < 12 * GatherFile.BUFFER:
        n = int(torch.randint(1, 300_000, (1,), generator=gen))
        t = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=gen)
        piece = t[::2] if n % 3 == 0 else t  # (a strided view is gathered too)
        want += piece.numpy().tobytes()
        if n % 3 == 1:  # (and rows of a source file)
            piece = _file_rows(tmp_path / f"src{len(want)}", piece)
        g.put_data(piece, piece.numel())
        g.put(b"|%d|" % n)
        want += b"|%d|" % n
    assert g._made <= GatherFile.BUFFERS and g.pos == len(want)
    g.close()
    assert (tmp_path / "a.tmp").read_bytes() == bytes(want) and g.fd == -1

    def full(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    bad = GatherFile(tmp_path / "b.tmp", tmp_path / "b")
    monkeypatch.setattr(hf_io, "pwrite_view", full)
    for _ in range(3):
        bad.put_data(torch.zeros(GatherFile.BUFFER - 10, dtype=torch.uint8), GatherFile.BUFFER - 10)
    with pytest.raises(OSError) as e:
        bad.close()
    assert str(tmp_path / "b") in str(e.value) and "No space" in str(e.value) and bad.fd == -1
def test_gather_file_digest_is_the_whole_file_reread(tmp_path, monkeypatch):
    """The block CRCs a GatherFile folds in while writing (small pieces gathered, from memory, from their files or
    strided, and digested from the buffer; large pieces and `FileRows` written behind and reread; blocks smaller
    than many pieces) are exactly `file_digest`'s full reread, and the bytes are the pieces'; a byte changed
    afterwards changes the digest; ranges folded out of order leave them incomplete, and the reread decides."""
    from stepconv.hf_io import GatherFile

    monkeypatch.setattr(safety, "DIGEST_BLOCK", 100_003)  # (a prime: boundaries fall inside pieces)
    g = GatherFile(tmp_path / "a.pt", tmp_path / "a.pt", digest=True)
    gen = torch.Generator().manual_seed(2)
    expect = []
    for i in range(10):
        g.put(b"head%d" % i)
        small = torch.randint(0, 255, (30_000 + 7 * i,), dtype=torch.uint8, generator=gen)
        if i % 3 == 0:  # (whole from a file)
            g.put_data(_file_rows(tmp_path / f"small{i}", small), small.numel())
        elif i % 3 == 1:  # (a file's range between two tensors, as vocab padding joins a file's rows)
            rows = _file_rows(tmp_path / f"small{i}", small[100:-50])
            g.put_data(FileRows(small.shape, small.dtype, [small[:100], *rows.pieces, small[-50:]]), small.numel())
        elif i % 2:  # (a strided view: an fc2 column slice)
            wide = torch.randint(-9999, 9999, (small.numel() // 20, 20), dtype=torch.int16, generator=gen)
            small = wide[:, 5:15].contiguous().view(torch.uint8).reshape(-1)
            g.put_data(wide[:, 5:15], small.numel())
        else:
            g.put_data(small, small.numel())
        expect += [b"head%d" % i, small.numpy().tobytes()]
        big = torch.randint(0, 255, (GatherFile.BUFFER + 999 * i,), dtype=torch.uint8, generator=gen)
        g.put_data(_file_rows(tmp_path / f"src{i}", big) if i % 2 else big, big.numel())
        expect.append(big.numpy().tobytes())
    g.put(bytes(GatherFile.BUFFER + 5))  # (a large `put`, written behind in order too)
    g.close()
    path, size = tmp_path / "a.pt", (tmp_path / "a.pt").stat().st_size
    assert path.read_bytes() == b"".join(expect) + bytes(GatherFile.BUFFER + 5)
    assert g.crcs.covers(size) and len(g.crcs.blocks()) == -(-size // 100_003)
    assert g.crcs.blocks() == safety._block_crcs(path)
    data = bytearray(path.read_bytes())
    data[size // 2] ^= 1
    path.write_bytes(bytes(data))
    assert g.crcs.blocks() != safety._block_crcs(path)

    w = RankFileWriter(tmp_path / "r" / "model_optim_rng.pt", digest=True)  # a rank file: the journal's digest
    for i in range(6):
        w.add(f"w{i}", torch.randn(300 + 200_000 * (i % 2), generator=gen))
    w.finish(__import__("argparse").Namespace(tensor_model_parallel_size=1))
    written = safety.file_digest(w.path, w.crcs)
    assert written.startswith("zipdir:") and written == safety.file_digest(w.path)
    data = bytearray(w.path.read_bytes())
    data[len(data) // 2] ^= 1
    w.path.write_bytes(bytes(data))
    assert safety.file_digest(w.path) != written

    c = safety.BlockCrcs(os.open(path, os.O_RDONLY), path)
    try:
        c.fold(0, 1000)
        c.fold(2000, 1000)  # (a gap)
        assert not c.covers(3000) and not c.covers(size)
    finally:
        os.close(c.fd)


def _writer_case(tmp_path):
    """Tensors of one safetensors file and the chunks that fill it: a stack of small expert slices (tensors, strided
    tensors, `FileRows` of several pieces), small whole tensors, and one tensor larger than the gathering limit."""
    from stepconv.hf_io import TensorInfo

    g = torch.Generator().manual_seed(0)
    stack = torch.randn(24, 6, 10, generator=g).bfloat16()  # 120 B an expert
    small = [torch.randn(5 + i, generator=g) for i in range(4)]
    big = torch.randn(700, generator=g)  # 2800 B: written directly, across windows
    infos = [TensorInfo("s0", "", torch.float32, (5,)), TensorInfo("stack", "", torch.bfloat16, (24, 6, 10)),
             TensorInfo("s1", "", torch.float32, (6,)), TensorInfo("big", "", torch.float32, (700,)),
             TensorInfo("s2", "", torch.float32, (7,)), TensorInfo("s3", "", torch.float32, (8,))]
    chunks = [("s0", 0, small[0]), ("s1", 0, small[1]), ("s2", 0, small[2]), ("s3", 0, small[3]),
              ("big", 0, big)]
    for e in range(24):
        t = stack[e]
        if e % 3 == 1:  # a strided view with the same values
            t = stack[e].t().contiguous().t()
        elif e % 3 == 2:  # rows from a file and a tensor piece, like a merged SwiGLU half
            t = FileRows.cat([_file_rows(tmp_path / f"r{e}", t[:4]), t[4:]], t.shape, t.dtype)
        chunks.append(("stack", e * t.numel() * 2, t))
    want = {"s0": small[0], "s1": small[1], "s2": small[2], "s3": small[3], "big": big, "stack": stack}
    return infos, chunks, want


def _write_all(path, infos, chunks, *, threads=1, seed=0):
    import random
    from concurrent.futures import ThreadPoolExecutor

    from stepconv.hf_io import SafetensorsWriter

    w = SafetensorsWriter(path, infos)
    order = list(chunks)
    random.Random(seed).shuffle(order)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda c: w.write(*c), order))
    return w.close()


@pytest.mark.parametrize("seed", range(4))
def test_gathered_writes_from_many_threads_are_the_direct_writes_byte_for_byte(tmp_path, monkeypatch, seed):
    """Small chunks gather in windows (here 256 B, so chunks straddle windows, and at most 3 buffers held, so
    windows are written before they are full and gather again), written from 4 threads in a random order: the file
    is the one chunk-by-chunk direct writes give, loads with safetensors, and took fewer writes."""
    from safetensors.torch import load_file

    from stepconv.hf_io import SafetensorsWriter

    infos, chunks, want = _writer_case(tmp_path)
    monkeypatch.setattr(SafetensorsWriter, "GATHER_BELOW", 0)  # nothing gathered: one write per chunk
    assert _write_all(tmp_path / "direct.safetensors", infos, chunks) == []
    monkeypatch.setattr(SafetensorsWriter, "GATHER_BELOW", 1000)
    monkeypatch.setattr(SafetensorsWriter, "WINDOW", 256)
    monkeypatch.setattr(SafetensorsWriter, "HELD", 3 * 256)
    assert _write_all(tmp_path / "gathered.safetensors", infos, chunks, threads=4, seed=seed) == []
    assert (tmp_path / "gathered.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()
    got = load_file(tmp_path / "gathered.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    # in file order (as a plan's entries come) a write per window, the header and the large tensor
    calls, pwrite = [], os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda *a: calls.append(a[2]) or pwrite(*a))
    w = SafetensorsWriter(tmp_path / "ordered.safetensors", infos)
    for name, off, t in sorted(chunks, key=lambda c: w.offsets[c[0]] + c[1]):
        w.write(name, off, t)
    assert w.close() == [] and len(calls) <= -(-w.end // 256) + 2 < len(chunks)
    assert (tmp_path / "ordered.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()
    # in any order, the buffers held stay within HELD once a write returns
    w = SafetensorsWriter(tmp_path / "shuffled.safetensors", infos)
    for name, off, t in sorted(chunks, key=lambda c: hash((seed, c[0], c[1]))):
        w.write(name, off, t)
        assert w._held <= w.HELD
    assert w.close() == []
    assert (tmp_path / "shuffled.safetensors").read_bytes() == (tmp_path / "direct.safetensors").read_bytes()


@pytest.mark.parametrize("fault", ["missing", "twice"])
def test_gathered_writes_still_report_a_missing_or_duplicate_chunk(tmp_path, monkeypatch, fault):
    """The completeness check counts each tensor's bytes: a slice left out, or one written twice, names the tensor,
    and the bytes that did arrive are on disk where they belong (written at close, their window never complete)."""
    from safetensors import safe_open

    from stepconv.hf_io import SafetensorsWriter

    monkeypatch.setattr(SafetensorsWriter, "WINDOW", 256)
    infos, chunks, want = _writer_case(tmp_path)
    at = next(i for i, c in enumerate(chunks) if c[0] == "stack" and c[1] == 120 * 7)
    chunks = chunks[:at] + chunks[at + 1:] if fault == "missing" else chunks + [chunks[at]]
    assert _write_all(tmp_path / "x.safetensors", infos, chunks, threads=3) == ["stack"]
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        stack = f.get_tensor("stack")
        assert all(torch.equal(f.get_tensor(k), v) for k, v in want.items() if k != "stack")
    for e in range(24):
        assert torch.equal(stack[e], want["stack"][e]) or (fault == "missing" and e == 7 and not stack[e].any())


def test_unordered_unit_runs_each_entry_once_and_stops_at_a_failure():
    """`engine.execute`'s unordered units (mcore-to-hf: a PP stage) hand their entries to the worker threads from
    one shared iterator: every entry is put exactly once and counted for the audit; after a failing entry the
    workers stop taking entries and the failure surfaces as a one-line StepconvError naming it."""
    import threading
    import time
    from collections import Counter

    from stepconv.config import StepconvError
    from stepconv.engine import ReaderBase, Unit, UnitResult, execute
    from stepconv.kinds import REPLICATE
    from stepconv.mapping import Entry

    entries = [Entry((f"t{i}",), f"k{i}", REPLICATE, 0, SplitContext(1)) for i in range(60)]

    class Reader(ReaderBase):
        def read(self, entry):
            return [torch.ones(int(entry.key[1:]) + 1)]

    class Writer:
        def __init__(self):
            self.puts, self.threads = Counter(), set()

        def begin(self):
            pass

        def start(self, unit):
            pass

        def put(self, unit, entry, tensors):
            self.puts[entry.key] += 1
            self.threads.add(threading.get_ident())

        def end(self, unit):
            return UnitResult()

    def step(bad):
        def run(entry, srcs):
            time.sleep(0.002)
            if entry.key == bad:
                raise ValueError("shapes cannot be joined\nsecond line")
            return srcs
        return run

    w = Writer()
    consumed, _ = execute([Unit("stage 0", entries, ordered=False)], Reader(), w, step(None), workers=3)
    assert w.puts == Counter({e.key: 1 for e in entries})
    assert consumed == Counter({f"t{i}": i + 1 for i in range(60)})
    w = Writer()
    with pytest.raises(StepconvError, match=r"^k10 <-> t10: shapes cannot be joined$"):
        execute([Unit("stage 0", entries, ordered=False)], Reader(), w, step("k10"), workers=3)
    assert "k10" not in w.puts and sum(w.puts.values()) < 30


def test_the_collector_stays_paused_while_any_unit_runs():
    """engine.execute pauses the garbage collector once around all units (from before the writer begins): the
    first of two ordered units to finish (on its own worker thread) does not turn it back on under the other, and it
    is on again afterwards."""
    import gc
    import threading

    from stepconv.engine import ReaderBase, Unit, UnitResult, execute
    from stepconv.kinds import REPLICATE
    from stepconv.mapping import Entry

    short_done, seen, begun = threading.Event(), [], []

    class Reader(ReaderBase):
        def read(self, entry):
            return [torch.ones(2)]

    class Writer:
        def begin(self):
            begun.append(gc.isenabled())

        def start(self, unit):
            pass

        def put(self, unit, entry, tensors):
            if unit.name == "long":
                short_done.wait(5) if entry.key == "k1" else None
                seen.append(gc.isenabled())

        def end(self, unit):
            if unit.name == "short":
                short_done.set()
            return UnitResult()

    def units():
        return [Unit(name, [Entry((f"t{i}",), f"k{i}", REPLICATE, 0, SplitContext(1)) for i in range(n)])
                for name, n in (("short", 1), ("long", 4))]

    assert gc.isenabled()
    execute(units(), Reader(), Writer(), lambda entry, srcs: srcs, workers=2)
    assert begun == [False] and short_done.is_set() and seen == [False] * 4 and gc.isenabled()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8, torch.float64])
def test_strided_tensors_are_written_as_their_contiguous_bytes(tmp_path, dtype):
    """`gather` (GatherFile's small pieces) and `pwrite_all` (large ones) pack a strided tensor exactly as
    `contiguous()` would: column slices (each row one numpy void element), a column slice of a 3-D stack, a
    transposed matrix and a one-column slice (element by element)."""
    from stepconv.hf_io import gather, pwrite_all

    base = torch.arange(7 * 48 * 3, dtype=torch.float64).reshape(7, 48, 3).to(dtype)
    views = [base[0][:, 1:3], base[:, 12:24, 1], base[2].t(), base[1][5:40:2, :2], base[:, :, :2], base[3][:, 2:3]]
    for i, v in enumerate(views):
        want = v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dest = bytearray(len(want))
        gather(v, memoryview(dest))
        assert bytes(dest) == want, i
        fd = os.open(tmp_path / f"w{i}", os.O_RDWR | os.O_CREAT)
        try:
            assert pwrite_all(fd, v, 5) == len(want)
        finally:
            os.close(fd)
        assert (tmp_path / f"w{i}").read_bytes() == bytes(5) + want, i


def test_crc32_combine_is_zlibs():
    import zlib

    rng = random.Random(0)
    for n in (0, 1, 2, 63, 64, 1000, 65537, 200_003):
        a, b = rng.randbytes(rng.randint(0, 3000)), rng.randbytes(n)
        assert safety.crc32_combine(zlib.crc32(a), zlib.crc32(b), n) == zlib.crc32(a + b)


def test_block_crcs_of_parts_joined_are_the_files(tmp_path, monkeypatch):
    """A file folded in by several writers, each from where the one before ended (a rank file written in parts),
    joins to the blocks of the whole file: blocks spanning parts, parts inside one block, empty parts. A gap, an
    overlap or a missing part leaves the join broken (the digest then rereads the file)."""
    monkeypatch.setattr(safety, "DIGEST_BLOCK", 1000)
    rng = random.Random(1)
    data = rng.randbytes(10_500)
    path = tmp_path / "f"
    path.write_bytes(data)

    def part(a, b):
        c = safety.BlockCrcs(-1, path, a)
        k = a
        while k < b:  # (folded in pieces, from memory)
            n = min(b - k, rng.randint(1, 1500))
            c.fold(k, n, memoryview(data)[k:k + n])
            k += n
        return c

    for trial in range(50):
        cuts = sorted({0, len(data), *(rng.randint(0, len(data)) for _ in range(rng.randint(0, 12)))})
        if trial % 5 == 0:
            cuts += [len(data)]  # (an empty last part)
        parts = [part(a, b) for a, b in zip(cuts, cuts[1:])]
        joined = safety.BlockCrcs.joined(parts, path)
        assert joined.covers(len(data)) and joined.blocks() == safety._block_crcs(path), cuts
    assert not safety.BlockCrcs.joined([part(0, 3000), part(3500, len(data))], path).covers(len(data))
    assert not safety.BlockCrcs.joined([part(0, 3000), part(2500, len(data))], path).covers(len(data))
    assert not safety.BlockCrcs.joined([part(0, 3000), None, part(3000, len(data))], path).covers(len(data))
    assert not part(500, len(data)).covers(len(data))  # (a part alone does not cover the file)
