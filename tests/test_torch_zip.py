"""Rank files laid out by our own code (`torch_zip.ZipLayout`) are the bytes torch's zip writer writes."""

import argparse
import io
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from stepconv import megatron_io, torch_zip
from stepconv.hf_io import FileRows
from stepconv.megatron_io import RankFileWriter, load_rank_file


class _Sparse(io.RawIOBase):
    """A file that keeps what was written where (a record's skipped bytes are a hole): torch lays out archives of
    many GiB here without writing them."""

    def __init__(self):
        self.pos, self.image = 0, {}

    def writable(self):
        return True

    def seekable(self):
        return True

    def write(self, b):
        b = bytes(b)
        self.image[self.pos] = b
        self.pos += len(b)
        return len(b)

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else self.pos + off
        return self.pos

    def tell(self):
        return self.pos


def _runs(image: dict[int, bytes]) -> list[tuple[int, bytes]]:
    out = []
    for p in sorted(image):
        if out and out[-1][0] + len(out[-1][1]) == p:
            out[-1] = (out[-1][0], out[-1][1] + image[p])
        elif image[p]:
            out.append((p, image[p]))
    return out


_TAIL = [("data.pkl", b"\x80\x02}q\x00." * 9), (".format_version", b"1"), (".storage_alignment", b"64"),
         ("byteorder", sys.byteorder.encode())]


def _torch_layout(sizes):
    f = _Sparse()
    w = torch._C.PyTorchFileWriter(f, False)
    for i, n in enumerate(sizes):
        w.write_record_metadata(f"data/{i}", n)
    for name, data in _TAIL:
        w.write_record(name, data, len(data))
    w.write_end_of_file()
    return _runs(f.image)


def _our_layout(sizes):
    z, image = torch_zip.ZipLayout(), {}
    for i, n in enumerate(sizes):
        at = z.pos
        head, tail = z.record(f"data/{i}", n)
        image[at], image[at + len(head) + n] = head, tail
    for name, data in _TAIL:
        at = z.pos
        head, tail = z.record(name, len(data))
        image[at] = head + data + tail
    at = z.pos
    image[at] = z.end()
    assert z.pos == at + len(image[at])
    return _runs(image)


G = 1 << 30
U32 = 0xFFFFFFFF


@pytest.mark.parametrize("sizes", [
    [], [0], [1], [100, 0, 7, 64], [random.Random(0).randrange(0, 9000) for _ in range(300)],
    [3 * G, 2 * G, 5 * G, 10, 0],  # zip64: sizes and header offsets past 4 GiB, an empty record past them
    [U32 - 200, 5, 0], [U32, 3], [U32 - 1, 1, 2], [4 * G - 100 + i for i in range(3)],
], ids=lambda s: f"{len(s)}-records")
def test_layout_is_torch_writers_byte_for_byte(sizes):
    assert _our_layout(sizes) == _torch_layout(sizes)


def test_layout_past_65535_records_is_torch_writers():
    sizes = [0, 2560] * 33000  # (the end record's 16-bit counts saturate; the zip64 record holds them)
    assert _our_layout(sizes) == _torch_layout(sizes)


def test_whole_archive_with_data_and_self_check():
    recs = [(f"data/{i}", os.urandom(n)) for i, n in enumerate((2560, 0, 5000, 1))] + _TAIL
    assert torch_zip.layout_bytes(recs) == torch_zip.torch_bytes(recs)
    assert torch_zip.layout_matches_torch()


def _write(path: Path, items) -> bytes:
    w = RankFileWriter(path)
    for k, t in items:
        w.add(k, t)
    w.finish(argparse.Namespace(tensor_model_parallel_size=1))
    return path.read_bytes()


def _file_rows(tmp: Path, t: torch.Tensor, name: str) -> FileRows:
    p = tmp / name
    p.write_bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    fd = os.open(p, os.O_RDONLY)
    return FileRows(t.shape, t.dtype, [(fd, 0, t.numel() * t.element_size())])


def test_rank_file_is_torch_writers_and_loads(tmp_path, monkeypatch):
    """Every kind of record (contiguous, strided, empty, `_extra_state`, FileRows small and large, a tensor past the
    buffer) through our layout and through torch's writer (the fallback): the same bytes, and they load."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(700, 1024, generator=g).bfloat16()  # 1.4 MB: past the gathering buffer
    wide = torch.randn(64, 80, generator=g)

    def items():
        return [("a", torch.randn(64, 32, generator=g).bfloat16()), ("strided", wide[:, 40:]),
                ("empty", torch.empty(0, 4)), ("x._extra_state", None), ("rows", _file_rows(tmp_path, big[:3], "r")),
                ("big_rows", _file_rows(tmp_path, big, "b")), ("big", big * 2), ("f16", torch.arange(7).half())]

    g.manual_seed(1)
    ours = _write(tmp_path / "ours" / "model_optim_rng.pt", items())
    monkeypatch.setattr(megatron_io, "layout_matches_torch", lambda: False)
    g.manual_seed(1)
    theirs = _write(tmp_path / "torch" / "model_optim_rng.pt", items())
    assert ours == theirs
    g.manual_seed(1)
    m = load_rank_file(tmp_path / "ours" / "model_optim_rng.pt")["model"]
    for k, t in items():
        if t is None:
            assert m[k] is None
        else:
            assert torch.equal(m[k], t.materialise() if isinstance(t, FileRows) else t), k


@pytest.mark.parametrize("sizes", [[], [0], [100, 0, 7, 64], [3 * G, 2 * G, 5 * G, 10, 0], [U32 - 200, 5, 0],
                                   [U32, 3]], ids=lambda s: f"{len(s)}-records")
def test_central_directory_is_zipfiles_reading(tmp_path, sizes):
    """`central_directory` (check_zip_sizes' one-pass read) lists what zipfile lists, past 4 GiB too (a sparse
    file); a comment, a cut archive or bytes after it: None (zipfile then decides)."""
    import zipfile

    path = tmp_path / "a.pt"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        for at, data in _our_layout(sizes):
            os.pwrite(fd, data, at)
    finally:
        os.close(fd)
    size = path.stat().st_size
    want = [(i.filename, i.header_offset, i.file_size) for i in zipfile.ZipFile(path).infolist()]
    assert torch_zip.central_directory(path, size) == want
    assert torch_zip.central_directory(path, size, io.BytesIO(path.read_bytes()) if size < G else None) == want
    if size < G:
        raw = path.read_bytes()
        for bad in (raw[:-1], raw + b"x", raw[:-2] + b"\x01\x00x"):
            assert torch_zip.central_directory(None, len(bad), io.BytesIO(bad)) is None


def test_central_directory_refuses_what_check_zip_sizes_must_see(tmp_path):
    src = tmp_path / "s.pt"
    torch.save({"w": torch.zeros(64)}, src)
    assert torch_zip.central_directory(src, src.stat().st_size) is not None
    deflated = tmp_path / "d.pt"
    import zipfile
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
    assert torch_zip.central_directory(deflated, deflated.stat().st_size) is None

