"""Hugging Face side I/O: lazy, validated safetensors reading and streaming safetensors writing.

Reading never materialises more than the slice asked for (safe_open + get_slice). Writing
lays out each file's header up front, then places every chunk at its final offset with
pwrite, so a 3 GB expert stack can be written one expert at a time.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import shutil
import stat
import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy
import torch

from . import buffers
from .config import DTYPE_NAMES, SAFETENSORS_DTYPES, Step35Config, StepconvError, names_text
from .engine import READ_AHEAD_BYTES, ByteCount
from .safety import (WRITEBACK_BYTES, BlockCrcs, named_os_error, named_os_errors, parse_json, read_json,
                     regular_file, start_writeback, validate_safetensors_header)

DTYPE_SIZES = {name: dt.itemsize for name, dt in SAFETENSORS_DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header (stepconv.safety: the format's rules, as the safetensors library
    applies them); catches truncated, corrupt and hostile files before any tensor is read."""
    size = regular_file(path, "safetensors file").st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StepconvError(f"{path}: corrupt safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise StepconvError(f"{path}: corrupt or truncated safetensors file (header length {n}, file size {size})")
        text = f.read(n)
    try:
        header = parse_json(text.decode("utf-8"), path, "safetensors header")
    except (UnicodeDecodeError, StepconvError):
        raise StepconvError(f"{path}: corrupt safetensors file (header is not valid JSON)") from None
    validate_safetensors_header(path, header, size - 8 - n, DTYPE_SIZES)
    return header


def pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill `view` (bytes) with `fd`'s bytes at `offset` (preadv may return fewer than asked)."""
    pos, n = 0, view.nbytes
    while pos < n:
        got = os.preadv(fd, [view[pos:]], offset + pos)
        if got <= 0:
            raise StepconvError(f"{what}: truncated while reading at byte {offset + pos}")
        pos += got


def pwrite_view(fd: int, view: memoryview, offset: int) -> int:
    """Write all of `view` (bytes) at `offset` of `fd` (pwrite may write less than asked); returns the count."""
    pos, n = 0, view.nbytes
    while pos < n:
        pos += os.pwrite(fd, view[pos:], offset + pos)
    return n


SMALL_READ = 64 << 10  # reads below this go into a bytearray (heap memory: below memory.py's mmap threshold)


def pread_tensor(fd: int, offset: int, nbytes: int, dtype: torch.dtype, what: str,
                 shape: Sequence[int] | None = None, pooled: bool = True) -> torch.Tensor:
    """`nbytes` at `offset` into a new tensor of `dtype`, 1-D or of `shape`. From SMALL_READ bytes up into a reused
    buffer (`buffers.empty`: uninitialised, no zero-fill, no fresh pages); below it into a bytearray, whose zero-fill
    costs less than torch's calls here: 5 vs 17 us for a 2.5 KB expert (torch.empty, .numpy(), two views; 2-core
    machine), which hf-to-mcore does ~12k times per rank file at 1/64 width. Reads of many sizes, such as
    `HFReader.read_batch`'s runs cut where the read-ahead batches end, are not `pooled` by exact size (the pool kept
    each size's idle buffers for a while, and peak RSS grew with depth, 257 -> 309 MB from 4 to 16 layers in
    tests/test_streaming.py) but by size class (`buffers.scratch`). (They were bytearrays, zero-filled in fresh
    mappings: 60% of hf-to-mcore's page faults at 1/8, TP=4, per `perf record -e page-faults`.)"""
    if 0 < nbytes < SMALL_READ:
        raw = bytearray(nbytes)
        pread_into(fd, memoryview(raw), offset, what)
        t = torch.frombuffer(raw, dtype=dtype)
    else:
        buf = buffers.empty((nbytes,), torch.uint8) if pooled else buffers.scratch(nbytes)
        pread_into(fd, memoryview(buf.numpy()), offset, what)
        t = buf.view(dtype)
    return t if shape is None else t.view(shape)


def read_safetensors_tensor(path: Path, name: str) -> torch.Tensor:
    """One whole tensor of a safetensors file, read with pread (no lingering memory map)."""
    header = read_safetensors_header(path)
    if name not in header:
        raise StepconvError(f"{path}: lacks {name}")
    meta = header[name]
    with open(path, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0] + int(meta["data_offsets"][0])
        n = int(meta["data_offsets"][1]) - int(meta["data_offsets"][0])
        t = pread_tensor(f.fileno(), start, n, SAFETENSORS_DTYPES[meta["dtype"]], f"{path}: {name}")
    return t.view(*meta["shape"])


class FileRows:
    """Rows of tensors still in their files: a dim-0 concatenation of byte ranges (fd, offset, nbytes) and, for
    what no file holds (vocab padding), tensors. The hot path of hf-to-mcore: a split that only takes row ranges
    and joins them (most kinds) yields a `FileRows`, and the rank-file writer moves its ranges with
    `copy_file_range`, file to file inside the kernel as `cp` does, instead of reading them into memory and
    writing them back (two copies through user space, and page faults on the buffers). Anything else (column
    slices, dtype casts) reads the rows first (`materialise`)."""

    is_meta = False
    device = torch.device("cpu")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, pieces: list):
        self.shape, self.dtype, self.pieces = torch.Size(shape), dtype, pieces  # piece: (fd, offset, nbytes) | tensor

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def dim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, tuple) and len(idx) == 1:
            idx = idx[0]
        if type(idx) is not slice or not self.shape:
            return self.materialise()[idx]
        lo, hi, step = idx.indices(self.shape[0])
        if step != 1:
            return self.materialise()[idx]
        return self._rows(lo, max(hi, lo))

    def _rows(self, lo: int, hi: int) -> "FileRows":
        """Rows [lo, hi) (0 <= lo <= hi <= len), still where they are."""
        rb = self.row_bytes
        start, stop = lo * rb, hi * rb
        pieces = self.pieces
        if len(pieces) == 1 and type(pieces[0]) is tuple:  # (a rank file's tensor: one range, the common case)
            fd, off, _ = pieces[0]
            out = [(fd, off + start, stop - start)] if stop > start else []
        else:
            out = [(p[0], p[1] + a, n) if type(p) is tuple else p[a // rb:(a + n) // rb]
                   for p, a, n, _ in self.spans(start, stop)]
        return FileRows((hi - lo, *self.shape[1:]), self.dtype, out)

    def spans(self, start: int, stop: int) -> Iterator[tuple]:
        """(piece, first byte of it, bytes, where they begin in [start, stop)) of each piece overlapping bytes
        [start, stop) of these rows."""
        pos = 0
        for p in self.pieces:
            n = p[2] if type(p) is tuple else p.numel() * p.element_size()
            a, b = max(start, pos), min(stop, pos + n)
            if a < b:
                yield p, a - pos, b - a, a - start
            pos += n

    @staticmethod
    def cat(parts: Sequence, shape: Sequence[int], dtype: torch.dtype) -> "FileRows":
        pieces = []
        for p in parts:
            pieces += p.pieces if isinstance(p, FileRows) else [p.contiguous()]
        return FileRows(tuple(shape), dtype, pieces)

    def chunk(self, n: int, dim: int = 0) -> list:
        if dim != 0 or self.shape[0] % n:
            return list(self.materialise().chunk(n, dim))
        step = self.shape[0] // n
        return [self._rows(i * step, (i + 1) * step) for i in range(n)]

    def unsqueeze(self, dim: int) -> "FileRows":
        if dim != 0:
            raise ValueError("FileRows.unsqueeze: dim 0 only")
        return FileRows((1, *self.shape), self.dtype, self.pieces)

    def new_zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.dtype)

    def materialise(self) -> torch.Tensor:
        """The rows read into memory (a reused buffer)."""
        out = buffers.empty((self.numel() * self.dtype.itemsize,), torch.uint8)
        pos = 0
        for p in self.pieces:
            if isinstance(p, tuple):
                pread_into(p[0], memoryview(out[pos:pos + p[2]].numpy()), p[1], "source file")
                pos += p[2]
            else:
                n = p.numel() * p.element_size()
                out[pos:pos + n] = p.reshape(-1).view(torch.uint8)
                pos += n
        return out.view(self.dtype).view(self.shape)

    def to(self, dtype: torch.dtype) -> torch.Tensor:
        return self.materialise().to(dtype)

    def write_to(self, fd: int, offset: int) -> None:
        """Place these bytes at `offset` of `fd`: ranges by copy_file_range (in the kernel), tensors by pwrite."""
        for p in self.pieces:
            if isinstance(p, tuple):
                src, off, n = p
                while n > 0:
                    try:
                        got = os.copy_file_range(src, fd, n, off, offset)
                    except OSError as e:  # another filesystem (EXDEV) or no support: through memory instead
                        if e.errno not in _NO_COPY_RANGE:
                            raise
                        offset += pwrite_all(fd, FileRows((n,), torch.uint8, [(src, off, n)]).materialise(), offset)
                        break
                    if got <= 0:
                        raise StepconvError(f"source file truncated while copying at byte {off}")
                    off, offset, n = off + got, offset + got, n - got
            else:
                offset += pwrite_all(fd, p, offset)


def write_piece(fd: int, piece, at: int) -> None:
    """`piece` (bytes in a memoryview, a tensor, or `FileRows`: file to file) at `at` of `fd`."""
    if type(piece) is memoryview:
        pwrite_view(fd, piece, at)
    elif type(piece) is FileRows:
        piece.write_to(fd, at)
    else:
        pwrite_all(fd, piece, at)


def _place(fd: int, path: Path, piece, at: int, nbytes: int, writeback: tuple[int, int] | None = None,
           check=None):
    """A piece's bytes at `at` of `fd` (on a write-behind thread), then writeback started: of the piece, or of
    `writeback` (offset, bytes) for a gather buffer; then `check(at, nbytes[, bytes])` (the file's digest) if
    given, whose result (a future) is returned."""
    with named_os_errors(path):
        write_piece(fd, piece, at)
    if writeback is None:
        start_writeback(fd, at, nbytes)
    elif writeback[1]:
        start_writeback(fd, *writeback)
    if check is None:
        return None
    # bytes still in memory are digested from there (their buffer is reused only once the digest is done)
    return check(at, nbytes, piece) if type(piece) is memoryview else check(at, nbytes)


class GatherFile:
    """A file written front to back: small pieces are gathered in a buffer, and a full buffer, like every piece of at
    least BUFFER bytes, is written behind, in order, by the file's own thread, at the offsets they were given (file
    to file with copy_file_range for `FileRows`, from memory otherwise), while the next buffer fills. The rank files'
    zip records (`megatron_io`) and torch_dist's `.distcp` blobs are written through it. Why:
    * at the real tensor count a file holds ~25k records whose bytes, at small widths, are a few KB each, and a
      syscall or two per piece was the cost;
    * at the real widths the pieces are MBs, and the one thread of a unit (one PP stage x EP rank: all of TP=4's four
      rank files) spent 60% of its time in copy_file_range and 5% starting writeback (py-spy, 16-core device, TP=4,
      11.85 GB), one kernel copy at a time; with a thread per file the files are written at once while the unit's
      thread reads and splits. One thread per file, not a shared pool: several threads writing one file serialise
      on its inode lock and spin there (same device, TP=2: 2 / 4 / 8 / 16 pool threads, system CPU 9.6 / 11.9 /
      18.8 / 23.1 s, no faster);
    * at small widths (1/8: every expert piece is under 1 MiB) all the bytes pass through the gather buffers, and
      the unit's thread spent 35% of its time in their pwrites (py-spy, same device, TP=2, 6.8 GB), so full buffers
      are written behind too (BUFFERS of them per file, reused). (Filling the buffers on the file's thread
      instead, the unit's thread only listing what goes where, was slower: the threads then take turns at the
      GIL per piece. 16-core device, 1/8, TP=4: 11.3 -> 12.9 s with pieces of 32 KiB and up; 2-core machine, 1/64,
      every piece: system CPU 1.1 -> 2.6 s.)
    A piece written behind keeps its tensor (or the source descriptor of its `FileRows`) alive until written; at
    most IN_FLIGHT bytes are pending per file, gather buffers included. `close` waits for them, and so does
    `abandon`, before the descriptor is closed (its number could otherwise be reused while a write is pending).
    `digest`: the file's `safety.BlockCrcs` (`crcs`) are folded in as it is written, on a third thread of the
    file's, for the resume journal (which otherwise rereads the whole file at the end of the unit): from the gather
    buffer (which is reused only once that is done: the reread of every byte cost 8.8-13.5 s of system CPU where
    this costs 5.4-5.9, 16-core device, 1/8, TP=4), or by rereading a range written from elsewhere.
    `tmp` None: a dry run's file, which only counts (no descriptor)."""

    # (buffers are allocated once per file and reused: fresh pages fault on first touch, which is slow on these
    # virtual machines.) FileRows below BUFFER are read into one: per record, fsync included, 2-core machine:
    # pread 43 / 146 / 654 us vs copy_file_range 65 / 222 / 928 us for 2.5 / 40 / 256 KB
    BUFFER = 1 << 20
    BUFFERS = 4  # gather buffers per file: one filling, the others being written behind
    DIGESTING = 16  # with a digest, as many while digests hold buffers (at most IN_FLIGHT pending still)
    IN_FLIGHT = 64 << 20  # pending write-behind bytes per file (memory held by pending tensors is at most this)
    __slots__ = ("path", "fd", "buf", "view", "n", "at", "_addr", "_written_back", "_gathered", "_pending",
                 "_in_flight", "_lane", "_free", "_made", "crcs", "_check", "_checker")

    def __init__(self, tmp: Path | None, path: Path | None = None, *, digest: bool = False, at: int = 0):
        """`at` > 0: write on from that offset of an existing `tmp` (a part of the file; it is not truncated)."""
        self.path = path or tmp  # (errors name the final name: the temporary one is ours)
        self.fd = -1
        self._pending: deque = deque()  # (future, bytes, gather buffer or None) written behind, oldest first
        self._in_flight = 0
        self._lane: ThreadPoolExecutor | None = None  # the thread that writes this file's buffers and large pieces
        self.crcs: BlockCrcs | None = None
        self._check = self._checker = None  # the digest's thread; what the writing thread calls after a write
        if tmp is not None:
            with named_os_errors(self.path):  # (read too: the digest rereads what was written)
                mode = os.O_RDWR if digest else os.O_WRONLY
                self.fd = os.open(tmp, mode | os.O_CREAT | (0 if at else os.O_TRUNC) | os.O_CLOEXEC, 0o666)
            if digest:
                self.crcs = BlockCrcs(self.fd, self.path, at)
                self._check = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepconv-digest")
                self._checker = partial(self._check.submit, self.crcs.fold)
        self._free: list = []  # (gather buffer, its digest's future or None) whose writes are done
        self._made = 1
        self.buf, self.view, self._addr = self._new_buffer()
        self.n = 0  # bytes gathered in buf
        self.at = at  # file offset of buf[0]
        self._written_back = at  # where the gathered bytes' last writeback ended
        self._gathered = 0  # bytes flushed from the buffers since

    @classmethod
    def most_held(cls, digest: bool) -> int:
        """The most memory one file holds for its writes: IN_FLIGHT bytes pending (the tensors written behind and
        the gather buffers being written), plus the gather buffers not pending (free, or held for their digest).
        (The worker plan counts it per output file: up to 80 MiB for a rank file, which TP=8's eight files made
        640 MiB a worker outside the plan.)"""
        return cls.IN_FLIGHT + (cls.DIGESTING if digest else cls.BUFFERS) * cls.BUFFER

    def _new_buffer(self) -> tuple:
        buf = bytearray(self.BUFFER)
        return buf, memoryview(buf), ctypes.addressof(ctypes.c_char.from_buffer(buf))

    @property
    def pos(self) -> int:
        """Bytes put so far (the file's size once closed)."""
        return self.at + self.n

    def _submit(self, piece, at: int, nbytes: int, buffer: tuple | None = None, writeback=None) -> None:
        """`piece` written behind at `at` (waits first while IN_FLIGHT bytes are pending)."""
        while self._pending and self._in_flight + nbytes > self.IN_FLIGHT:
            self._reap()
        if self._lane is None:
            self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepconv-write")
        self._pending.append((self._lane.submit(_place, self.fd, self.path, piece, at, nbytes, writeback,
                                                self._checker), nbytes, buffer))
        self._in_flight += nbytes

    def _flush(self) -> None:
        """The gathered bytes written behind; gathering goes on in a free buffer."""
        if self.n and self.fd >= 0:
            self._gathered += self.n
            writeback = (0, 0)
            if self._gathered >= WRITEBACK_BYTES:  # (pieces written behind start their own)
                writeback = (self._written_back, self.at + self.n - self._written_back)
                self._written_back, self._gathered = self.at + self.n, 0
            self._submit(self.view[:self.n], self.at, self.n, (self.buf, self.view, self._addr), writeback)
            self.buf, self.view, self._addr = self._free_buffer()
        self.at += self.n
        self.n = 0

    def _room(self, m: int) -> int:
        """Where `m` (<= BUFFER) bytes go in the buffer, flushed first if they do not fit."""
        if self.n + m > self.BUFFER:
            self._flush()
        return self.n

    def put(self, b: bytes) -> None:
        if len(b) > self.BUFFER:
            self._flush()
            if self.fd >= 0:  # (behind too, after what is pending: the digest folds the file in order)
                self._submit(memoryview(b), self.at, len(b))
            self.at += len(b)
            return
        at = self._room(len(b))
        self.view[at:at + len(b)] = b
        self.n = at + len(b)

    def put_data(self, tensor, nbytes: int) -> None:
        """A tensor's or `FileRows`' `nbytes` bytes; a meta tensor's (or a dry run's) are a hole."""
        if not nbytes:
            return
        if tensor.is_meta or self.fd < 0:  # dry run: a hole (a sparse file)
            self._flush()
            self.at += nbytes
        elif nbytes < self.BUFFER:
            at = self._room(nbytes)
            try:  # (not `with named_os_errors`: a generator per record)
                copy_bytes(tensor, 0, nbytes, self.view[at:at + nbytes], self._addr + at)
            except OSError as e:
                raise named_os_error(e, self.path) from None
            self.n = at + nbytes
        else:
            self._flush()
            self._submit(tensor, self.at, nbytes)
            self.at += nbytes

    def _free_buffer(self) -> tuple:
        """A gather buffer to fill: one whose write (and digest) is done, else a new one while fewer than BUFFERS
        exist (DIGESTING while a digest holds some), else the oldest once done. (The digest thread, rereading the
        large pieces written from elsewhere, runs behind the writes at real widths. Waiting for it before reusing a
        buffer that only held a record's header, EP=2 at real width ran 10.5-11.9 s in three rounds where the code
        before the digest from memory ran 9.7-10.7; not holding buffers for it, 10.0 vs 10.7 in one round; 16-core
        device.)"""
        while True:
            for i, (buffer, digest) in enumerate(self._free):
                if digest is None or digest.done():
                    del self._free[i]
                    return buffer
            if self._made < (self.DIGESTING if self._check is not None else self.BUFFERS):
                self._made += 1
                return self._new_buffer()
            if self._free:
                buffer, digest = self._free.pop(0)
                digest.result()
                return buffer
            self._reap()

    def _reap(self) -> None:
        """Wait for the oldest piece written behind (its error, if any, is raised here); a gather buffer it wrote
        is free to fill again once its digest (if any) is done."""
        fut, nbytes, buffer = self._pending.popleft()
        self._in_flight -= nbytes
        digest = fut.result()
        if buffer is not None:
            self._free.append((buffer, digest))

    def close(self, sync: bool = True) -> None:
        """Write what is gathered, wait for what is written behind, fsync (a file under its final name is on the
        disk; `sync=False`: the caller syncs it later, before anything vouches for it) and close."""
        try:
            self._flush()
            while self._pending:
                self._reap()
            if self.fd >= 0 and sync:
                with named_os_errors(self.path):
                    os.fsync(self.fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close the descriptor once no write is pending on it (errors of abandoned writes are dropped)."""
        if self._pending:
            wait([f for f, *_ in self._pending])
            self._pending.clear()
            self._in_flight = 0
        if self._lane is not None:
            self._lane.shutdown()
            self._lane = None
        if self._check is not None:  # (its rereads done before the descriptor is closed)
            self._check.shutdown()
            self._check = self._checker = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):  # (a writer abandoned by a failed or interrupted unit does not keep its file open)
        if getattr(self, "fd", -1) >= 0:
            self.abandon()


_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM}


def pwrite_all(fd: int, t: torch.Tensor, offset: int) -> int:
    """Write `t`'s bytes at `offset` (a strided `t` is copied into a reused buffer first); returns the count."""
    n = t.numel() * t.element_size()
    if not n:
        return 0
    if t.is_contiguous() or t.element_size() not in _SAME_SIZE_INT:
        return pwrite_view(fd, memoryview(buffers.contiguous(t).reshape(-1).view(torch.uint8).numpy()), offset)
    packed = buffers.empty((n,), torch.uint8)
    view = memoryview(packed.numpy())
    gather(t, view)
    return pwrite_view(fd, view, offset)


class LazyTensor:
    """One tensor of a safetensors file; indexing reads only the dim-0 rows asked for.

    Reads go through pread at the offsets of the (validated) header rather than safe_open's
    memory map: mapped pages stay in the process's RSS once touched, which made peak memory
    grow with the checkpoint (measured: +113 MB after streaming 160 MB of experts).
    """

    def __init__(self, ckpt: "HFCheckpoint", info: TensorInfo, rows_only: bool = False):
        self.ckpt, self.info = ckpt, info
        self.shape, self.dtype = info.shape, info.dtype
        self.rows_only = rows_only  # indexing by rows gives `FileRows` (not read)

    def __getitem__(self, idx) -> torch.Tensor:
        if type(idx) is int and self.shape and 0 <= idx < self.shape[0]:  # (one expert of a stack: the hot path)
            return self.ckpt.row(self.info, idx, self.rows_only)
        idx = idx if isinstance(idx, tuple) else (idx,)
        first, rest = idx[0], idx[1:]
        n0 = self.shape[0] if self.shape else 1
        if isinstance(first, int):
            first = slice(first, first + 1)
            squeeze = True
        else:
            squeeze = False
        lo, hi, step = first.indices(n0)
        if step != 1:
            raise IndexError("LazyTensor supports unit-step slices only")
        t = self.ckpt._read_rows(self.info, lo, max(hi, lo), lazy=self.rows_only and not rest)
        if squeeze:
            t = FileRows(t.shape[1:], t.dtype, t.pieces) if isinstance(t, FileRows) else t[0]
        if rest:
            t = t[(slice(None), *rest) if not squeeze else rest].contiguous()
        return t


class HFCheckpoint:
    """A Step-3.5-Flash HF folder: config, index and lazily opened safetensors files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StepconvError(f"{self.path}: not a directory; expected a Hugging Face checkpoint folder")
        self.config = Step35Config.from_file(self.path / "config.json")
        self.tensors: dict[str, TensorInfo] = {}
        self._data_start: dict[str, int] = {}  # file -> byte offset of the data area
        self._offsets: dict[str, int] = {}  # tensor -> byte offset inside the data area
        self._fds: dict[str, int] = {}
        self._located: dict[str, tuple[int, int, int, str]] = {}  # tensor -> `_where`
        self._lock = threading.Lock()
        self._read = ByteCount()
        self._scan()

    @property
    def bytes_read(self) -> int:
        return self._read.total

    def _scan(self) -> None:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = _weight_map(index, read_json(index, "safetensors index", limit=256 << 20))
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_NAME).exists():
            weight_map, files = None, [SINGLE_NAME]
        else:
            found = sorted(p.name for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            raise StepconvError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}"
                                + (f" (found {', '.join(found[:5])}; only safetensors are supported)" if found else ""))
        missing = [f for f in files if not (self.path / f).exists()]
        if missing:
            raise StepconvError(f"{self.path}: index names missing file(s) {', '.join(missing)}")
        for fname in files:
            header = read_safetensors_header(self.path / fname)
            with open(self.path / fname, "rb") as f:
                self._data_start[fname] = 8 + struct.unpack("<Q", f.read(8))[0]
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != fname:
                    raise StepconvError(f"{self.path / fname}: holds {name!r}, which {INDEX_NAME} "
                                        f"maps to {weight_map.get(name)!r}")
                info = TensorInfo(name, fname, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]))
                begin, end = meta["data_offsets"]
                if end - begin != info.nbytes:
                    raise StepconvError(f"{self.path / fname}: corrupt header: {name} spans {end - begin} bytes, "
                                        f"its dtype and shape need {info.nbytes}")
                self.tensors[name] = info
                self._offsets[name] = int(begin)
        if weight_map is not None:
            absent = sorted(n for n in weight_map if n not in self.tensors)
            if absent:
                raise StepconvError(f"{self.path}: {len(absent)} tensor(s) in {INDEX_NAME} are not in their files: "
                                    f"{names_text(absent)}")

    def _where(self, info: TensorInfo) -> tuple[int, int, int, str]:
        """(fd, file offset of the tensor's data, bytes a row, name for errors), opened and computed once per tensor:
        an expert's read is a few microseconds of work, which building its error message (a path join) tripled."""
        where = self._located.get(info.name)
        if where is None:
            with self._lock:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
            rows = info.shape[0] if info.shape else 1
            where = self._located[info.name] = (fd, self._data_start[info.file] + self._offsets[info.name],
                                                info.nbytes // rows if rows else 0, f"{self.path / info.file}: {info.name}")
        return where

    def _read_rows(self, info: TensorInfo, lo: int, hi: int, lazy: bool = False,
                   pooled: bool = True) -> torch.Tensor | FileRows:
        """Rows [lo, hi) of dim 0, read with pread into a reused buffer (`lazy`: where they are, unread; not
        `pooled`: into memory of their own, see `pread_tensor`)."""
        fd, at, row_bytes, what = self._where(info)
        n = (hi - lo) * row_bytes
        start = at + lo * row_bytes
        self._read.add(n)
        if lazy:
            return FileRows((hi - lo, *info.shape[1:]), info.dtype, [(fd, start, n)] if n else [])
        return pread_tensor(fd, start, n, info.dtype, what, (hi - lo, *info.shape[1:]) if info.shape else (),
                            pooled=pooled)

    def row(self, info: TensorInfo, index: int, lazy: bool = False) -> torch.Tensor | FileRows:
        """Row `index` of dim 0 (one expert of a stack), its shape the rest of the tensor's: `_read_rows(info, index,
        index + 1, lazy)[0]` without the indexing."""
        fd, at, row_bytes, what = self._where(info)
        start = at + index * row_bytes
        self._read.add(row_bytes)
        if lazy:
            return FileRows(info.shape[1:], info.dtype, [(fd, start, row_bytes)] if row_bytes else [])
        return pread_tensor(fd, start, row_bytes, info.dtype, what, info.shape[1:])

    def lazy(self, name: str, rows_only: bool = False) -> LazyTensor:
        return LazyTensor(self, self.tensors[name], rows_only)

    def extra_files(self) -> list[Path]:
        """Non-weight files to carry along: only names on the allow-list (tokenizer, generation config, remote code,
        docs), only regular files inside the folder (`carried_files`)."""
        return carried_files(self.path)


# --- writing ---------------------------------------------------------------------------------
def _header_bytes(tensors: Sequence[TensorInfo]) -> tuple[bytes, dict[str, int]]:
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = pos
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def gather(t: torch.Tensor, dest: memoryview) -> None:
    """A strided tensor's bytes (an fc2 column slice, at any width), packed into `dest` by numpy, in fewer calls
    than torch's copy_ into a view of `dest`. Rows whose elements are contiguous (a column slice) are copied as
    one numpy void element each, a memcpy per row, instead of element by element: a TP=4 column slice of a 1/8-width
    fc2 (512 x 40 bf16) 6.3 -> 3.8 us, of a real one (4096 x 320) 189 -> 106 us, where torch's contiguous()
    took 8.2 and 239 (2-core machine)."""
    arr = t.view(_SAME_SIZE_INT[t.element_size()]).numpy()
    if arr.ndim >= 2 and arr.strides[-1] == arr.itemsize and arr.shape[-1] > 1:
        arr = arr.view(numpy.dtype((numpy.void, arr.shape[-1] * arr.itemsize)))  # (shape [..., 1])
    numpy.frombuffer(dest, dtype=arr.dtype, count=arr.size).reshape(arr.shape)[...] = arr


def copy_bytes(chunk, lo: int, hi: int, dest: memoryview, dest_addr: int) -> None:
    """Bytes [lo, hi) of `chunk` (a tensor, or `FileRows`: its ranges read with preadv) into `dest` (bytes, at
    address `dest_addr`)."""
    if type(chunk) is FileRows:
        for p, a, n, at in chunk.spans(lo, hi):
            if type(p) is tuple:
                pread_into(p[0], dest[at:at + n], p[1] + a, "source file")
            else:
                t = buffers.contiguous(p)  # (held while its bytes are copied)
                ctypes.memmove(dest_addr + at, t.data_ptr() + a, n)
    elif (lo == 0 and hi == chunk.numel() * chunk.element_size() and not chunk.is_contiguous()
          and chunk.element_size() in _SAME_SIZE_INT):
        gather(chunk, dest)
    else:
        t = buffers.contiguous(chunk)
        ctypes.memmove(dest_addr, t.data_ptr() + lo, hi - lo)


class _Window:
    """A fixed WINDOW-sized stretch of a file whose small chunks gather in memory before one pwrite."""

    __slots__ = ("size", "done", "pending", "buf", "view", "addr", "runs")

    def __init__(self, size: int):
        self.size = size  # bytes of the file in this window (the data area's part of it)
        self.done = 0  # bytes placed: gathered in `buf`, or written directly by a larger chunk
        self.pending = 0  # chunks being copied into `buf` now (outside the writer's lock)
        self.buf = self.view = None
        self.addr = 0
        self.runs: list[tuple[int, int]] = []  # gathered byte ranges of `buf`, not yet written


class SafetensorsWriter:
    """A safetensors file whose layout is fixed up front; chunks land at their offsets in any order, from any thread.

    Chunks under GATHER_BELOW bytes are gathered: the file is cut into WINDOW-sized windows at fixed offsets, a
    small chunk's bytes are copied (a `FileRows` read with preadv) into its window's reused buffer, and a window is
    written with one pwrite once every byte of it has been placed. Consecutive experts' slices of a stack are
    adjacent bytes, so at the real tensor count, where a routed expert's slices are a few KB, mcore-to-hf wrote
    with ~5 syscalls an expert (copy_file_range per rank-file piece, pwrite per joined tensor; 1/64 width, 2-core
    machine: ~105 us of writing an expert, fc1 and fc2) instead of one per MiB. Every byte is still placed exactly
    where it belongs: windows still held when their buffers pass HELD are written as far as they are filled, the
    rest at `close`; the per-tensor byte counts `close` checks are kept as before."""

    WINDOW = 1 << 20
    GATHER_BELOW = 256 << 10
    HELD = 32 << 20

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], *, dry: bool = False):
        self.path, self.dry = path, dry
        self.infos = {t.name: t for t in tensors}
        self.shapes = {t.name: (tuple(t.shape), tuple(t.shape[1:])) for t in tensors}
        head, offsets = _header_bytes(tensors)
        self.data_start = len(head)
        self.offsets = offsets
        self.end = self.data_start + sum(t.nbytes for t in tensors)
        self.written: dict[str, int] = {t.name: 0 for t in tensors}
        self._lock = threading.Lock()
        self._windows: dict[int, _Window] = {}  # window index -> its state, while not complete
        self._held = 0  # bytes of window buffers
        self.bytes_written = self._written_back = len(head)
        if not dry:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            with named_os_errors(path):
                os.pwrite(self.fd, head, 0)
                os.ftruncate(self.fd, self.end)

    def write(self, name: str, byte_offset: int, chunk: torch.Tensor) -> None:
        """Place `chunk` (a whole tensor, or one of the equal dim-0 pieces at `byte_offset`); its shape must be
        the tensor's own or its trailing dims (one expert of a stack)."""
        info = self.infos[name]
        if chunk.shape not in self.shapes[name]:
            raise StepconvError(f"{name}: got shape {list(chunk.shape)}, expected {list(info.shape)}"
                                + (f" or one {list(info.shape[1:])} slice" if len(info.shape) > 1 else ""))
        if chunk.dtype != info.dtype:
            chunk = chunk.to(info.dtype)
        n = chunk.numel() * chunk.element_size()
        if byte_offset + n > info.nbytes:
            raise StepconvError(f"internal: chunk overflows {name} ({byte_offset}+{n} > {info.nbytes})")
        if n and not (self.dry or chunk.is_meta):  # a meta chunk (dry run) leaves its range a hole in the sparse file
            start = self.data_start + self.offsets[name] + byte_offset
            try:  # (not `named_os_errors`: a context manager costs ~2 us, a few % of a small chunk's write)
                if n < self.GATHER_BELOW:
                    self._gather(chunk, start, n)
                else:
                    write_piece(self.fd, chunk, start)
                    self._placed(start, n)
            except OSError as e:
                raise named_os_error(e, self.path) from None
        with self._lock:  # chunks of one file may come from several threads
            self.written[name] += n
            self.bytes_written += n
            kick = not self.dry and self.bytes_written - self._written_back >= WRITEBACK_BYTES
            if kick:
                self._written_back = self.bytes_written
        if kick:  # (chunks land anywhere in the file: the whole file's dirty pages)
            start_writeback(self.fd)

    def _window(self, k: int) -> _Window:
        """Window `k` (under the lock)."""
        w = self._windows.get(k)
        if w is None:
            lo, hi = max(k * self.WINDOW, self.data_start), min((k + 1) * self.WINDOW, self.end)
            w = self._windows[k] = _Window(hi - lo)
        return w

    def _gather(self, chunk, start: int, n: int) -> None:
        """Copy `chunk` into its window(s); write each window it completes."""
        size = self.WINDOW
        parts = []
        with self._lock:
            for k in range(start // size, (start + n - 1) // size + 1):
                w = self._window(k)
                if w.buf is None:
                    w.buf = buffers.empty((size,), torch.uint8)
                    w.view, w.addr = memoryview(w.buf.numpy()), w.buf.data_ptr()
                    self._held += size
                w.pending += 1
                parts.append((k, w, max(start, k * size) - k * size, min(start + n, (k + 1) * size) - k * size))
        done = []
        try:
            for k, w, a, b in parts:  # (outside the lock: the chunks of one window come from several threads)
                copy_bytes(chunk, k * size + a - start, k * size + b - start, w.view[a:b], w.addr + a)
                done.append((k, w, a, b))
        finally:
            with self._lock:
                for k, w, a, b in parts:
                    w.pending -= 1
                for k, w, a, b in done:
                    w.done += b - a
                    w.runs.append((a, b))
                ready = [self._take(k, w) for k, w, a, b in parts if w.done >= w.size and not w.pending]
                if self._held > self.HELD:  # (the oldest windows not being copied into: as far as they are filled)
                    for k, w in list(self._windows.items()):
                        if self._held <= self.HELD:
                            break
                        if w.buf is not None and not w.pending:
                            ready.append(self._detach(k, w))
            self._write_runs(ready)

    def _placed(self, start: int, n: int) -> None:
        """Bytes [start, start + n) were written directly: count them in the windows they fill only in part."""
        size = self.WINDOW
        with self._lock:
            ready = []
            for k in {start // size, (start + n - 1) // size}:
                w = self._window(k)
                w.done += min(start + n, (k + 1) * size) - max(start, k * size)
                if w.done >= w.size and not w.pending:
                    ready.append(self._take(k, w))
        self._write_runs(ready)

    def _take(self, k: int, w: _Window) -> tuple:
        """A complete window leaves (under the lock)."""
        del self._windows[k]
        return self._detach(k, w)

    def _detach(self, k: int, w: _Window) -> tuple:
        """Window `k`'s gathered runs and buffer, to be written (under the lock); it gathers in a new buffer after."""
        out = (k, w.view, w.runs)
        if w.buf is not None:
            self._held -= self.WINDOW
        w.buf = w.view = None
        w.runs = []
        return out

    def _write_runs(self, ready: list) -> None:
        """Write detached windows' runs, adjacent runs joined into one pwrite (their buffers are then free)."""
        for k, view, runs in ready:
            runs.sort()
            at = 0
            while at < len(runs):
                a, b = runs[at]
                at += 1
                while at < len(runs) and runs[at][0] == b:
                    b = runs[at][1]
                    at += 1
                pwrite_view(self.fd, view[a:b], k * self.WINDOW + a)

    def flush(self) -> None:
        """Write out every gathered window as far as it is filled. A worker process does so at the end of each part
        it writes (`HFWriter.handover`): a window whose other bytes other processes write never fills here."""
        if self.dry:
            return
        with self._lock:
            ready = [self._take(k, w) for k, w in list(self._windows.items()) if not w.pending]
        with named_os_errors(self.path):
            self._write_runs(ready)

    def counted(self, written: dict[str, int]) -> None:
        """Bytes per tensor that another process wrote into this file (`HFWriter.take_over`)."""
        with self._lock:
            for name, n in written.items():
                self.written[name] += n
                self.bytes_written += n

    def close(self) -> list[str]:
        """Write what is still gathered, close, and return the names whose byte count is not exactly their size
        (empty when complete)."""
        if not self.dry:
            try:
                with named_os_errors(self.path):
                    self._write_runs([self._take(k, w) for k, w in list(self._windows.items())])
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
        return [n for n, b in self.written.items() if b != self.infos[n].nbytes]


def plan_shards(tensors: Sequence[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_name(k: int, n: int) -> str:
    return SINGLE_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_index(out: Path, shards: Sequence[Sequence[TensorInfo]]) -> None:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        for t in shard:
            weight_map[t.name] = shard_name(k, len(shards))
            total += t.nbytes
    if len(shards) > 1:
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """'5GB' -> bytes (decimal units, like transformers' max_shard_size)."""
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    value = None
    for u, m in units.items():
        if s.endswith(u):
            try:
                value = float(s[: -len(u)]) * m
            except ValueError:
                pass
            break
    if value is None and re.fullmatch(r"[0-9]{1,20}", s):
        value = int(s)
    if value is None or not math.isfinite(value) or not 1 <= value <= MAX_SIZE:
        raise StepconvError(f"{option} {text[:40]!r} is not a size between 1 byte and 1 EB; use e.g. 5GB, 500MB or "
                            f"2GiB")
    return int(value)


MAX_SIZE = 10**18


def _weight_map(index: Path, data) -> dict[str, str]:
    """The index's weight_map, checked: tensor name -> a safetensors file name in the same folder."""
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise StepconvError(f"{index}: not a valid safetensors index (needs a non-empty weight_map object)")
    for name, f in wm.items():
        if not isinstance(f, str) or not f.endswith(".safetensors") or "/" in f or "\\" in f or f.startswith("."):
            raise StepconvError(f"{index}: weight_map maps {name!r} to {f!r}; expected a .safetensors file name in "
                                f"the same folder")
    return wm


# Files a HF folder may carry besides weights and config.json: copied (streamed) into conversions' outputs.
CARRIED_NAMES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "preprocessor_config.json", "README.md", "LICENSE", "NOTICE")
CARRIED_SUFFIXES = (".py", ".md", ".txt", ".jinja", ".tiktoken")
CARRY_LIMIT = 256 << 20  # a tokenizer is a few MB; anything near this is not one


def carried_files(folder: Path) -> list[Path]:
    """The allow-listed non-weight files of `folder`: names in CARRIED_NAMES or with CARRIED_SUFFIXES, regular files
    whose real path is inside `folder` (a link out of it is skipped), at most CARRY_LIMIT bytes each."""
    out, real = [], folder.resolve()
    for p in sorted(folder.iterdir()):
        if not (p.name in CARRIED_NAMES or p.suffix in CARRIED_SUFFIXES) or p.name.startswith("."):
            continue
        try:
            inside = p.resolve().parent == real
            st = os.stat(p)
        except OSError:
            continue
        if inside and stat.S_ISREG(st.st_mode) and st.st_size <= CARRY_LIMIT:
            out.append(p)
    return out


def copy_files(files: Iterable[Path], dest: Path) -> None:
    """Stream `files` into `dest`, never over a file already there (what the conversion wrote)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        if (dest / f.name).exists():
            continue
        with open(f, "rb") as src, open(dest / f.name, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


# --- the HF format as an engine reader and writer --------------------------------------------------------
def hf_tensor_problems(have: dict[str, TensorInfo], want: dict[str, tuple[int, ...]], where: Path) -> list[str]:
    """Every tensor the config implies, nothing else, each with the right shape and a float dtype: one line per
    kind of problem (conversions raise the first, `inspect` lists them all)."""
    errs = []
    missing = [n for n in want if n not in have]
    unexpected = sorted(n for n in have if n not in want)
    if missing:
        errs.append(f"{where}: {len(missing)} tensor(s) missing for this config: {names_text(missing)}")
    if unexpected:
        errs.append(f"{where}: {len(unexpected)} unexpected tensor(s) not in the Step-3.5 layout for this config: "
                    f"{names_text(unexpected)}")
    bad = [f"{n} {list(have[n].shape)} (expected {list(s)})" for n, s in want.items()
           if n in have and tuple(have[n].shape) != s]
    if bad:
        errs.append(f"{where}: {len(bad)} tensor(s) with wrong shape: {names_text(bad, 4)}")
    nonfloat = [n for n in want if n in have and not have[n].dtype.is_floating_point]
    if nonfloat:
        errs.append(f"{where}: non-float tensor(s) {names_text(nonfloat)}; expected bf16/fp16/fp32 weights")
    return errs


class HFReader:
    """engine.Reader over a HF folder: an entry's HF tensors, or one expert's slice of each stack, read with pread.

    `meta=True` (or no checkpoint: a bare config) gives meta tensors of the same shapes and dtypes."""

    def __init__(self, dtypes: dict[str, torch.dtype], ckpt: HFCheckpoint | None = None, *, meta: bool = False,
                 file_rows: bool = False):
        self.ckpt, self.dtypes, self.meta = ckpt, dtypes, meta or ckpt is None
        self.prefetch = not self.meta  # engine: read the next batch on a second thread
        # `FileRows` (left in the file) for kinds whose split only takes rows, when the writer can place them
        self.file_rows = file_rows
        # engine._read_ahead's batch size. With file_rows the read-ahead carries only what is split otherwise (a
        # routed expert's column-split fc2, attention), a third of the bytes, and each worker's window (two
        # batches) filled only once a unit held more than one batch of those: 4 -> 16 layers (TP=2 x EP=2, 2
        # workers) raised peak RSS 303 -> 337 MB with 32 MiB batches, 300 -> 319 MB with 16 MiB, the pool's
        # busy buffers at the peak being read-ahead expert reads (85 x 1 MiB), not per-record state
        self.read_ahead_bytes = READ_AHEAD_BYTES // 2 if file_rows else READ_AHEAD_BYTES

    def open(self, unit) -> None:  # (engine.Reader protocol: nothing to do per unit)
        pass

    close = open

    def handover(self, unit) -> int | None:
        """(engine, worker processes) The bytes this process read since the last handover."""
        return self.ckpt._read.take() if self.ckpt is not None else None

    def take_over(self, unit, n: int) -> None:
        self.ckpt._read.add(n)

    def read(self, entry) -> list[torch.Tensor]:
        if self.meta:
            return [torch.empty(s, dtype=self.dtypes[h], device="meta") for h, s in zip(entry.hf, entry.source_shapes)]
        rows = self.file_rows and entry.kind.row_slices
        if entry.expert is not None:  # (one expert of each stack: ~12k entries a rank file at the real count)
            infos = self.ckpt.tensors
            return [self.ckpt.row(infos[h], entry.expert, rows) for h in entry.hf]
        return [self.ckpt.lazy(h, rows)[:] for h in entry.hf]

    def read_batch(self, entries: Sequence) -> list[list[torch.Tensor]]:
        """`read` of each of `entries` (a read-ahead batch), where a run of consecutive experts of the same stacks
        that are read (not left in their files) is one pread per stack, each expert a view of it: an expert's own
        read cost ~16 us, its view ~2 (2.5 KB experts at 1/64 width, 2-core machine)."""
        out: list[list[torch.Tensor]] = []
        i, n = 0, len(entries)
        while i < n:
            e = entries[i]
            j = i + 1
            if not self.meta and e.expert is not None and e.hf and not (self.file_rows and e.kind.row_slices):
                while j < n and entries[j].hf == e.hf and entries[j].expert == e.expert + j - i:
                    j += 1
            if j - i == 1:
                out.append(self.read(e))
            else:
                stacks = [self.ckpt._read_rows(self.ckpt.tensors[h], e.expert, e.expert + j - i, pooled=False)
                          .unbind(0) for h in e.hf]
                out += [list(views) for views in zip(*stacks)]
            i = j
        return out

    def nbytes(self, entry) -> int:  # bytes `read` materialises (read-ahead batches)
        if self.file_rows and entry.kind.row_slices:
            return 0
        return self.source_bytes(entry)

    def source_bytes(self, entry) -> int:
        return sum(math.prod(s) * self.dtypes[h].itemsize for h, s in zip(entry.hf, entry.source_shapes))


class HFWriter:
    """engine.Writer for a HF folder: sharded safetensors whose layouts are fixed up front (`plan_shards`), each
    tensor (or expert slice, at its offset) placed with pwrite from any thread. `dry=True` writes nothing and
    counts the same bytes."""

    def __init__(self, root: Path, infos: Sequence[TensorInfo], max_shard_bytes: int, *, dry: bool = False):
        self.root, self.dry = root, dry
        self.shards = plan_shards(infos, max_shard_bytes)
        self.files: list[SafetensorsWriter] = []
        self._by_name: dict[str, SafetensorsWriter] = {}
        self._base: dict[int, dict[str, int]] = {}  # a worker process: each file's counts at its last handover

    def begin(self) -> None:
        for k, shard in enumerate(self.shards):
            w = SafetensorsWriter(self.root / shard_name(k, len(self.shards)), shard, dry=self.dry)
            self.files.append(w)
            self._by_name.update((t.name, w) for t in shard)

    def start(self, unit) -> None:
        pass

    def put(self, unit, entry, tensors) -> None:
        """`tensors`: (HF name, tensor) pairs; an expert's slice lands at `entry.expert` x its size."""
        for name, t in tensors:
            self.put_tensor(name, t, entry.expert if name in entry.hf else None)

    def put_tensor(self, name: str, t: torch.Tensor, expert: int | None = None) -> None:
        w = self._by_name[name]
        w.write(name, expert * t.numel() * w.infos[name].dtype.itemsize if expert is not None else 0, t)

    def end(self, unit):
        from .engine import UnitResult

        return UnitResult()

    def handover(self, unit) -> list[tuple[int, dict[str, int]]]:
        """(engine, worker processes) After a part of a unit: this process's gathered windows written out, and the
        bytes per tensor it wrote since the last handover (per file), for the parent's exactly-once check at
        `finish`. `unit` None (a worker's start): only the count's starting point."""
        out = []
        for k, w in enumerate(self.files):
            if unit is not None:
                w.flush()
            base = self._base.get(k, {})
            new = {n: c - base.get(n, 0) for n, c in w.written.items() if c != base.get(n, 0)}
            if new:
                self._base[k] = dict(w.written)
                out.append((k, new))
        return out

    def take_over(self, unit, written: list[tuple[int, dict[str, int]]]) -> None:
        for k, new in written:
            self.files[k].counted(new)

    def finish(self) -> list[str]:
        """Close every file; the names not written exactly once in full (empty when complete). Writes the index."""
        incomplete = []
        for w in self.files:
            incomplete += w.close()
        if not self.dry:
            write_index(self.root, self.shards)
        return incomplete

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.files)

    @property
    def file_sizes(self) -> dict[str, int]:
        return {w.path.name: w.data_start + sum(t.nbytes for t in w.infos.values()) for w in self.files}
