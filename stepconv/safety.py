"""Input checks shared by every command, and the file primitives publication relies on.

Inputs: `regular_file` (no FIFOs, devices or folders where a file is expected: a FIFO hangs a reader),
`bounded_text` (a small text file read with a byte cap: a tracker pointing at /dev/zero cannot fill memory),
`validate_safetensors_header` (the format's rules, as the safetensors library applies them), `check_zip_sizes`
(a rank file's declared record sizes, before torch inflates anything). Outputs: `GuardedFile` (torch's zip writer
writes through it, so a full disk is a Python error, not an abort), `fsync_dir`, `file_digest`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import stat
import sys
import threading
import zipfile
import zlib
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .errors import StepconvError

TEXT_LIMIT = 1 << 20  # a tracker, a config.json or an index is far smaller than this
CONFIG_LIMIT = 16 << 20


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """`path`'s stat (links followed) when it is a regular file; a one-line error when it is missing or a FIFO,
    device, socket or folder (opening a FIFO blocks forever; a device has no end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StepconvError(f"{path}: not found; expected a {what}") from None
    except NotADirectoryError:
        raise StepconvError(f"{path}: a parent of it is not a folder; expected a {what}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise StepconvError(f"{path}: is {kind}; expected a {what} (a regular file)")
    return st


def bounded_bytes(path: Path, what: str, limit: int = TEXT_LIMIT) -> bytes:
    regular_file(path, what)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StepconvError(f"{path}: larger than {limit} bytes; a {what} is small (is it the right file?)")
    return data


def bounded_text(path: Path, what: str, limit: int = TEXT_LIMIT) -> str:
    """A small UTF-8 text file, at most `limit` bytes read."""
    try:
        return bounded_bytes(path, what, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise StepconvError(f"{path}: not UTF-8 text (byte {e.start}); expected a {what}") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are not allowed)")


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(text: str | bytes, path: Path | str, what: str):
    """Strict JSON: no NaN/Infinity, no duplicate keys; a one-line error naming the file."""
    try:
        return json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise StepconvError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected a {what}") from None
    except (ValueError, RecursionError) as e:
        raise StepconvError(f"{path}: not a valid {what} ({str(e).splitlines()[0]})") from None


def read_json(path: Path, what: str, limit: int = TEXT_LIMIT):
    return parse_json(bounded_text(path, what, limit), path, what)


# --- safetensors ---------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_safetensors_header(path: Path, header, data_size: int, dtype_sizes: dict[str, int]) -> None:
    """The safetensors format's rules (as the safetensors library enforces them): a JSON object whose entries
    each have a known dtype, a shape of non-negative integers and data_offsets [begin, end] with
    end - begin = shape x dtype size; sorted by offset they tile the data area exactly (from 0, contiguous,
    no overlap, no gap) up to its end, `data_size` bytes. `__metadata__`, if present, maps strings to strings."""
    if not isinstance(header, dict):
        raise StepconvError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an object)")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise StepconvError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    spans = []
    for name, m in header.items():
        if name == "__metadata__":
            continue
        bad = None
        if not isinstance(m, dict) or set(m) != {"dtype", "shape", "data_offsets"}:
            bad = "needs exactly dtype, shape and data_offsets"
        elif m["dtype"] not in dtype_sizes:
            bad = f"dtype {m['dtype']!r} is not one of {', '.join(dtype_sizes)}"
        elif not (isinstance(m["shape"], list) and all(_is_int(d) and d >= 0 for d in m["shape"])):
            bad = f"shape {m['shape']!r} is not a list of non-negative integers"
        elif not (isinstance(m["data_offsets"], list) and len(m["data_offsets"]) == 2
                  and all(_is_int(o) for o in m["data_offsets"]) and 0 <= m["data_offsets"][0] <= m["data_offsets"][1]):
            bad = f"data_offsets {m['data_offsets']!r} is not [begin, end] with 0 <= begin <= end"
        elif m["data_offsets"][1] - m["data_offsets"][0] != math.prod(m["shape"]) * dtype_sizes[m["dtype"]]:
            bad = (f"spans {m['data_offsets'][1] - m['data_offsets'][0]} bytes, its dtype and shape need "
                   f"{math.prod(m['shape']) * dtype_sizes[m['dtype']]}")
        if bad:
            raise StepconvError(f"{path}: corrupt safetensors header entry for {name!r}: {bad}")
        spans.append((m["data_offsets"][0], m["data_offsets"][1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise StepconvError(f"{path}: corrupt safetensors header: {name!r} starts at byte {begin} of the data, "
                                f"expected {pos} (tensor data must be contiguous, in order, not overlapping)")
        pos = end
    if pos > data_size:
        raise StepconvError(f"{path}: truncated safetensors file (the header describes {pos} bytes of data, the file "
                            f"holds {data_size})")
    if pos < data_size:
        raise StepconvError(f"{path}: corrupt safetensors file: {data_size - pos} bytes after the last tensor's data")


# --- zip (torch.save) archives ----------------------------------------------------------------------------
def check_zip_sizes(path: Path, size: int, data=None) -> None:
    """Refuse a torch.save archive before torch reads it when a record is compressed or declares more bytes than
    the file holds: torch inflates a record into memory of its declared size (a 2 MB file can declare GBs).
    `data`: the archive as a file object (a torch_dist chunk read into memory), else read from `path`.
    An archive laid out as torch's writer lays it out is checked from one read of its central directory
    (`torch_zip.central_directory`); anything else, and any refusal, goes through `zipfile` as before."""
    from .torch_zip import central_directory  # (torch_zip imports torch)

    records = central_directory(path, size, data)
    if records is not None and all(ofs + n <= size for _, ofs, n in records) and sum(n for *_, n in records) <= size:
        return
    try:
        with zipfile.ZipFile(data if data is not None else path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise StepconvError(f"{path}: corrupt or truncated rank file (not a zip archive: {str(e).splitlines()[0]})") \
            from None
    total = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            raise StepconvError(f"{path}: record {i.filename} is compressed; torch.save stores records uncompressed "
                                f"(refusing to inflate it)")
        if i.file_size != i.compress_size or i.header_offset + i.file_size > size:
            raise StepconvError(f"{path}: record {i.filename} declares {i.file_size} bytes beyond the file's {size}")
        total += i.file_size
    if total > size:
        raise StepconvError(f"{path}: records declare {total} bytes, more than the file's {size}")


# --- writing ----------------------------------------------------------------------------------------------
WRITEBACK_BYTES = 64 << 20  # written between two starts of writeback (`start_writeback`)
# libc, for every module that calls it: the process's own symbols (glibc's among them). (`find_library("c")` runs
# `ldconfig -p`: 7-50 ms of each conversion's start.) ctypes calls release the GIL.
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_sync_file_range = getattr(LIBC, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Have the kernel start writing `fd`'s dirty pages in [offset, offset + nbytes) (0: to the end) to the disk now,
    without waiting (sync_file_range SYNC_FILE_RANGE_WRITE; a hint: errors are ignored, fsync still decides).

    Why: every output file is fsynced before it is published, and left alone the kernel writes a file's pages back
    only when told or much later, so the whole writeback came at the end of a run, after the work (the 16-core host:
    11.85 GB took 6.3 s to write back after cp too); started as the bytes are produced, it overlaps the work."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class GuardedFile:
    """The file torch's zip writer writes a rank file through.

    torch's `PyTorchStreamWriter`, given a file name, raises on a failed write but then writes the end of the
    archive from its destructor, which throws again; a C++ exception from a destructor aborts the interpreter
    (measured: exit 134 with `ulimit -f`, and on a full disk). Given this object instead, torch never sees a
    failure: the first OSError is kept, later writes are dropped, and `check()` raises it in Python.
    """

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb", buffering=1 << 20)
        self.error: OSError | None = None
        self._written_back = 0  # where the last `writeback` started

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if self.error is None:
            try:
                self.f.write(b)
            except OSError as e:
                self.error = e
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:  # (dry run: a record's bytes skipped)
        if self.error is None:
            try:
                return self.f.seek(offset, whence)
            except OSError as e:
                self.error = e
        return 0

    def tell(self) -> int:
        return self.f.tell()

    def writeback(self) -> None:
        """Every WRITEBACK_BYTES of file: start writing the bytes before them to the disk (`start_writeback`; from
        1 MiB before the last start, as that much may have still been in the buffer then)."""
        pos = self.f.tell()
        if pos - self._written_back >= WRITEBACK_BYTES and self.error is None:
            start = max(0, self._written_back - (1 << 20))
            start_writeback(self.f.fileno(), start, pos - start)
            self._written_back = pos

    def flush(self) -> None:  # (torch.save flushes a file-like when done; close() flushes for real)
        pass

    def check(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(self.path)) from None

    def close(self) -> None:
        """Flush, fsync and close; raises the first write error."""
        if self.error is None:
            try:
                self.f.flush()
                os.fsync(self.f.fileno())
            except OSError as e:
                self.error = e
        try:
            self.f.close()
        except OSError:
            pass
        self.check()


@contextmanager
def named_os_errors(path: Path) -> Iterator[None]:
    """An OSError from a call on a file descriptor (pwrite, ftruncate, fsync carry no file name) names `path`."""
    try:
        yield
    except OSError as e:
        raise named_os_error(e, path) from None


def named_os_error(e: OSError, path: Path) -> OSError:
    """`e`, naming `path` if it names no file."""
    return e if e.filename is not None else OSError(e.errno, e.strerror, str(path))


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (the files stepconv writes whole with write_text and the like)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


DIGEST_BLOCK = 64 << 20  # a rank file's digest: one CRC-32 per block, blocks on several threads


def file_digest(path: Path, crcs: "BlockCrcs | None" = None) -> str:
    """What a journal records of a finished file, for `--resume` to check a reused file against.

    A rank file (zip archive): its directory of record names and sizes plus a CRC-32 of every 64 MiB block of the
    file. Rank files are written without torch's per-record CRC-32 (issue 11: its miniz CRC ran at ~300 MB/s and was
    half the import's CPU), so the record CRCs are 0 and the archive itself cannot vouch for its bytes. The writer
    folds the blocks in as it writes (`crcs`, a `BlockCrcs` of the whole file, on a thread of its own: from the
    gather buffers, and large pieces reread just after they were written); without them every block is reread
    here, on up to the CPU count of threads (`_block_crcs`), which at the end of a unit cost whole seconds: 8.1 of a
    28 s TP=2 run at real width on the 2-core machine (11.85 GB, the output's pages partly evicted by then). The
    directory is read in one pass where torch laid the archive out (`torch_zip.central_directory`).
    Any other file (the MTP-head sidecar, torch_dist data: rereading them would double the I/O): size and mtime."""
    if path.suffix == ".pt":
        from .torch_zip import central_directory  # (torch_zip imports torch)

        try:
            size = os.stat(path).st_size
            records = central_directory(path, size)
            if records is None:
                with zipfile.ZipFile(path) as z:
                    records = [(i.filename, 0, i.file_size) for i in z.infolist()]
            d = hashlib.sha256()
            for name, _, n in records:
                d.update(f"{name}:{n};".encode())
            blocks = crcs.blocks() if crcs is not None and crcs.covers(size) else _block_crcs(path)
            return f"zipdir:{d.hexdigest()}:crc32x64M:{hashlib.sha256(b''.join(blocks)).hexdigest()}"
        except (zipfile.BadZipFile, OSError, ValueError):
            return "unreadable"
    st = os.stat(path)
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def _crc_range(fd: int, buf: memoryview, pos: int, end: int, crc: int, path) -> int:
    """`crc` continued over bytes [pos, end) of `fd`, read with pread into `buf`."""
    while pos < end:
        got = os.preadv(fd, [buf[:min(len(buf), end - pos)]], pos)
        if got <= 0:
            raise OSError(errno.EIO, f"{path}: truncated while reading")
        crc = zlib.crc32(buf[:got], crc)
        pos += got
    return crc


class BlockCrcs:
    """`file_digest`'s block CRC-32s of a file being written front to back, folded in range by range as each is
    written (`fold`, called in file order), from the bytes' buffer when the writer still holds it, else by
    rereading the range from `fd` (just written: from the page cache).
    A range out of order, or a failed read, leaves it incomplete: `covers` is then False and `file_digest` rereads
    the whole file, as before."""

    __slots__ = ("fd", "path", "done", "crc", "pos", "buf", "broken", "start")

    def __init__(self, fd: int, path, start: int = 0):
        """`start`: where the bytes folded in begin (a part of a file: its first block's CRC is then of the block's
        bytes from `start` on, `segments`)."""
        self.fd, self.path = fd, path
        self.done: list[bytes] = []  # the complete blocks' CRCs
        self.crc = 0  # the current block's CRC so far
        self.pos = self.start = start  # the end of the bytes folded
        self.buf: memoryview | None = None
        self.broken = False

    def fold(self, at: int, nbytes: int, data=None) -> None:
        """Bytes [at, at + nbytes) of the file: `data` (their buffer, still in memory), or reread."""
        if self.broken or at != self.pos:
            self.broken = True
            return
        if self.buf is None and data is None:
            self.buf = memoryview(bytearray(1 << 20))  # (one per file being written: kept small)
        try:
            pos, end = at, at + nbytes
            while pos < end:
                stop = min(end, (pos // DIGEST_BLOCK + 1) * DIGEST_BLOCK)
                if data is None:
                    self.crc = _crc_range(self.fd, self.buf, pos, stop, self.crc, self.path)
                else:
                    self.crc = zlib.crc32(data[pos - at:stop - at], self.crc)
                pos = stop
                if pos % DIGEST_BLOCK == 0:
                    self.done.append(self.crc.to_bytes(4, "little"))
                    self.crc = 0
            self.pos = end
        except OSError:
            self.broken = True

    def __getstate__(self):
        """(Sent back from a worker process: the CRCs, not the buffer or the writer's descriptor.)"""
        return None, {"fd": -1, "path": self.path, "done": self.done, "crc": self.crc, "pos": self.pos,
                      "buf": None, "broken": self.broken, "start": self.start}

    def covers(self, size: int) -> bool:
        """Were all of a `size`-byte file's bytes folded in?"""
        return not self.broken and self.start == 0 and self.pos == size

    def segments(self) -> list[tuple[int, int]]:
        """(CRC, length) of the bytes folded, in file order, cut at the block boundaries."""
        out, at = [], self.start
        for c in self.done:
            end = (at // DIGEST_BLOCK + 1) * DIGEST_BLOCK
            out.append((int.from_bytes(c, "little"), end - at))
            at = end
        if self.pos > at:
            out.append((self.crc, self.pos - at))
        return out

    @classmethod
    def joined(cls, parts: "list[BlockCrcs | None]", path) -> "BlockCrcs":
        """The CRCs of a file whose consecutive ranges were folded in by `parts` (several processes: a rank file
        written in parts, `megatron_io.LegacyWriter.parts`), blocks that span two parts combined (`crc32_combine`).
        Broken if any part is missing, broken, or not where the one before it ended."""
        out = cls(-1, path)
        for p in parts:
            if p is None or p.broken or p.start != out.pos:
                out.broken = True
                return out
            for crc, n in p.segments():
                out.crc = crc32_combine(out.crc, crc, n) if out.pos % DIGEST_BLOCK else crc
                out.pos += n
                if out.pos % DIGEST_BLOCK == 0:
                    out.done.append(out.crc.to_bytes(4, "little"))
                    out.crc = 0
        return out

    def blocks(self) -> list[bytes]:
        return self.done + ([self.crc.to_bytes(4, "little")] if self.pos % DIGEST_BLOCK else [])


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@lru_cache(maxsize=1)
def _zero_ops() -> list[list[int]]:
    """zlib's crc32_combine operators: entry k appends 2**k zero bytes to a CRC-32 (k < 48)."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]
    op = one_bit
    for _ in range(3):  # 1 -> 2 -> 4 -> 8 zero bits: one zero byte
        op = [_gf2_times(op, op[n]) for n in range(32)]
    ops = [op]
    for _ in range(47):
        op = [_gf2_times(op, op[n]) for n in range(32)]
        ops.append(op)
    return ops


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len(b) (zlib's crc32_combine, which
    Python's zlib does not expose)."""
    ops, k = _zero_ops(), 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def _block_crcs(path: Path) -> list[bytes]:
    """CRC-32 of each DIGEST_BLOCK of `path` (4 bytes each), read with pread in 4 MiB pieces into one reused
    buffer per thread, blocks spread over up to os.cpu_count() threads (zlib.crc32 and preadv release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size

        def block(start: int) -> bytes:
            if not hasattr(local, "buf"):
                local.buf = memoryview(bytearray(4 << 20))
            return _crc_range(fd, local.buf, start, min(start + DIGEST_BLOCK, size), 0, path).to_bytes(4, "little")

        starts = range(0, size, DIGEST_BLOCK)
        if len(starts) <= 1:
            return [block(s) for s in starts]
        with ThreadPoolExecutor(max_workers=max(1, min(len(starts), os.cpu_count() or 1))) as pool:
            return list(pool.map(block, starts))
    finally:
        os.close(fd)
