"""HFReader's batch reads (a run of consecutive experts read with one pread per stack, each expert a view) give
what reading each entry gives: the same tensors (dtype, shape, bytes), the same rows left in their files, the same
byte count; and `HFCheckpoint.row` is `_read_rows(...)[0]`."""

import pytest
import torch

from stepconv import buffers
from stepconv.convert import ImportOptions, plan_import
from stepconv.hf_io import FileRows, HFCheckpoint, HFReader


def _same(a, b) -> bool:
    if isinstance(a, FileRows) or isinstance(b, FileRows):
        return (type(a) is type(b) and a.shape == b.shape and a.dtype == b.dtype  # (each checkpoint its own fds)
                and [p[1:] for p in a.pieces] == [p[1:] for p in b.pieces])
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("file_rows", [True, False])
@pytest.mark.parametrize("options", [dict(tp=2), dict(tp=2, ep=2), dict(tp=2, spec="local")])
def test_read_batch_is_read(fixture_dir, options, file_rows):
    ckpt_a, ckpt_b = HFCheckpoint(fixture_dir), HFCheckpoint(fixture_dir)
    pl = plan_import(ckpt_a.config, {n: i.dtype for n, i in ckpt_a.tensors.items()}, ImportOptions(**options))
    entries = [e for e in pl.entries if e.kind.megatron]  # (local spec: each expert's `_extra_state`, no source)
    one, batch = HFReader(pl.source_dtypes, ckpt_a, file_rows=file_rows), HFReader(pl.source_dtypes, ckpt_b,
                                                                                   file_rows=file_rows)
    with buffers.pooled():
        each = [one.read(e) for e in entries]
        # batches cut anywhere (runs split across them), as engine._read_ahead cuts them by bytes
        got = batch.read_batch(entries[:37]) + batch.read_batch(entries[37:38]) + batch.read_batch(entries[38:])
        assert len(got) == len(each)
        assert all(len(x) == len(y) and all(map(_same, x, y)) for x, y in zip(each, got))
    assert ckpt_a.bytes_read == ckpt_b.bytes_read
    runs = [e for e in entries if e.expert is not None and not (file_rows and e.kind.row_slices)]
    assert len(runs) > 2  # (the runs were there to coalesce)


def test_row_is_rows_indexed(fixture_dir):
    ckpt = HFCheckpoint(fixture_dir)
    info = next(i for i in ckpt.tensors.values() if len(i.shape) == 3)  # an expert stack
    for e in (0, info.shape[0] - 1):
        assert _same(ckpt.row(info, e), ckpt._read_rows(info, e, e + 1)[0])
        lazy = ckpt._read_rows(info, e, e + 1, lazy=True)
        assert _same(ckpt.row(info, e, lazy=True), FileRows(info.shape[1:], info.dtype, lazy.pieces))


@pytest.mark.parametrize("options", [dict(tp=2, jobs=4), dict(tp=2, format="torch_dist", jobs=4)])
def test_bytes_read_counts_every_source_byte_once_from_many_threads(fixture_dir, tmp_path, options):
    """The summary's bytes read, counted by every worker's reads at once (`engine.ByteCount`, no shared lock): each
    source byte once when nothing is read twice (TP only); and a count added to by many threads loses nothing."""
    import threading

    from stepconv.convert import hf_to_mcore
    from stepconv.engine import ByteCount

    total = sum(i.nbytes for i in HFCheckpoint(fixture_dir).tensors.values())
    assert hf_to_mcore(fixture_dir, tmp_path / "m", **options).bytes_read == total
    count = ByteCount()
    threads = [threading.Thread(target=lambda: [count.add(3) for _ in range(20_000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count.total == 8 * 20_000 * 3
