"""torch.save's zip layout, laid out by our own code: the bytes torch's `PyTorchFileWriter` (miniz, CRC32 off) writes
around each record, computed in Python without a call into torch per record.

torch's writer lays out each record through Python file callbacks (local header, name, padding, data descriptor:
several `write`/`seek` calls a record); at 1/64 of the real widths a TP=2 conversion writes 49k records of ~2.5 KB.
Here a record's head and tail are a few `struct.pack`s, and the caller writes them with the record's bytes through one
buffer (`megatron_io._OwnRecords`): 31-66 -> 13-25 us a record on the 2-core machine (docs/BENCHMARKS.md).

The layout, as torch 2.13 writes it with `compute_crc32=False` (checked byte for byte against torch's writer, by
`layout_matches_torch` once per process and by tests/test_torch_zip.py, >4 GiB offsets included):
- each record `archive/<name>`: a local header (version 0, flags 0x0808 = data descriptor + UTF-8, stored, time 0,
  CRC and sizes 0), the name, a zip64 extra field (0x0001: the size twice if >= 4 GiB, the header's offset if
  >= 4 GiB), then torch's padding field `FB` + length + `Z`s so that the data starts at a multiple of 64; after the
  data a descriptor `PK\\x07\\x08`, CRC 0, sizes (8-byte sizes when the record has the zip64 field). An empty record
  has flags 0x0800 and no descriptor.
- at the end torch adds `version` ("3\\n") and `.data/serialization_id`, then the central directory (0xFFFFFFFF and
  a zip64 field where a size or offset does not fit 32 bits), the zip64 end record and locator (always), and the end
  record.
- `.data/serialization_id` is 20 digits of a hash of the record names and 20 of the CRCs combined. The names are
  combined in the iteration order of a C++ `std::unordered_set` (its buckets and rehashes), so torch computes it:
  the same names written as empty or 1-byte records to a writer on /dev/null (no Python callback: 25k records in
  ~70 ms, once per record count).
"""

from __future__ import annotations

import io
import os
import struct
import sys
from functools import lru_cache

import torch

ALIGN = 64  # torch's kFieldAlignment
U32 = 0xFFFFFFFF
U16 = 0xFFFF
PREFIX = "archive/"  # the archive name torch uses when it writes to a file object

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_DESC = struct.Struct("<IIII")
_DESC64 = struct.Struct("<IIQQ")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_FLAGS, _FLAGS_EMPTY = 0x0808, 0x0800
VERSION_RECORD = ("version", b"3\n")  # what PyTorchFileWriter adds when no version record was written (version 3)
SERIALIZATION_ID = ".data/serialization_id"


class ZipLayout:
    """The bytes of one torch.save zip, record by record: `record(name, size)` gives what goes before a record's data
    (the data starts right after it) and what follows the data; `end()` the closing records and directory. It keeps
    the position itself (`pos`: the end of what it laid out), so a record's bytes may be skipped (a dry run) or placed
    by the caller (copy_file_range)."""

    def __init__(self):
        self.pos = 0
        self._records: list[tuple[bytes, int, int]] = []  # (full name, size, local header offset)

    def record(self, name: str, size: int) -> tuple[bytes, bytes]:
        """(head, tail) of record `name` of `size` bytes; its data goes at `pos` after the head."""
        full = (PREFIX + name).encode()
        ofs = self.pos
        self._records.append((full, size, ofs))
        if size < U32 and ofs < U32:  # (the common case, kept short: ~25k records a rank file)
            start = ofs + 34 + len(full)  # (local header 30 + "FB" and its length 4)
            pad = -start % ALIGN
            self.pos = start + pad + size
            if not size:
                return _LOCAL.pack(0x04034B50, 0, _FLAGS_EMPTY, 0, 0, 0, 0, 0, 0, len(full), 4 + pad) + full + \
                    b"FB" + pad.to_bytes(2, "little") + b"Z" * pad, b""
            self.pos += 16
            return (_LOCAL.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(full), 4 + pad) + full + b"FB"
                    + pad.to_bytes(2, "little") + b"Z" * pad, _DESC.pack(0x08074B50, 0, size, size))
        z64 = _zip64_extra(size, ofs, local=True)
        start = ofs + 34 + len(full) + len(z64)
        pad = -start % ALIGN
        head = _LOCAL.pack(0x04034B50, 0, _FLAGS if size else _FLAGS_EMPTY, 0, 0, 0, 0, 0, 0, len(full),
                           len(z64) + 4 + pad) + full + z64 + b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
        tail = _DESC64.pack(0x08074B50, 0, size, size) if size else b""
        self.pos = start + pad + size + len(tail)
        return head, tail

    def end(self) -> bytes:
        """torch's closing records (`version`, `.data/serialization_id`), the central directory and end records:
        the rest of the file, from `pos`."""
        out = []
        for name, data in (VERSION_RECORD, (SERIALIZATION_ID, None)):
            if data is None:
                data = serialization_id(tuple((full[len(PREFIX):].decode(), size > 0) for full, size, _ in self._records))
            head, tail = self.record(name, len(data))
            out += (head, data, tail)
        cd_at = self.pos
        cd = []
        for full, size, ofs in self._records:
            big_size, big_ofs = size >= U32, ofs >= U32
            extra = _zip64_extra(size, ofs)
            n = U32 if big_size else size
            cd.append(_CENTRAL.pack(0x02014B50, 0, 0, _FLAGS if size else _FLAGS_EMPTY, 0, 0, 0, 0, n, n, len(full),
                                    len(extra), 0, 0, 0, 0, U32 if big_ofs else ofs) + full + extra)
        cd_bytes = b"".join(cd)
        n, cd_size = len(self._records), len(cd_bytes)
        end64_at = cd_at + cd_size
        out += (cd_bytes,
                _END64.pack(0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_at),
                _LOCATOR.pack(0x07064B50, 0, end64_at, 1),
                _END.pack(0x06054B50, 0, 0, min(n, U16), min(n, U16), min(cd_size, U32), min(cd_at, U32), 0))
        blob = b"".join(out[3 * 2:])
        self.pos += len(blob)
        return b"".join(out[:6]) + blob

def _zip64_extra(size: int, ofs: int, local: bool = False) -> bytes:
    """The zip64 extended-information field, as miniz writes it: the sizes if they do not fit 32 bits (in the local
    header the compressed size is still 0: it follows in the descriptor), then the local header's offset if it
    does not."""
    big_size, big_ofs = size >= U32, ofs >= U32
    if not (big_size or big_ofs):
        return b""
    return struct.pack("<HH", 1, 16 * big_size + 8 * big_ofs) + (
        struct.pack("<QQ", size, 0 if local else size) if big_size else b"") + (
        struct.pack("<Q", ofs) if big_ofs else b"")


def central_directory(path, size: int, data=None) -> list[tuple[str, int, int]] | None:
    """(name, local header offset, size) of every record of a zip laid out as torch's writer lays it out (one end
    record without comment, zip64 end records where present, the central directory right before them, records
    stored), read in one pass: ~25 ms for 24,675 records where `zipfile` takes ~320 ms. None for anything else (a
    compressed record, sizes that differ, any field out of place): the caller then asks `zipfile`. `data`: the
    archive as a file object, else read from `path`."""
    def read(ofs: int, n: int) -> bytes:
        if data is not None:
            data.seek(ofs)
            return data.read(n)
        return os.pread(fd, n, ofs)

    fd = os.open(path, os.O_RDONLY) if data is None else None
    try:
        if size < _END.size:
            return None
        sig, disk, cd_disk, n_disk, n, cd_size, cd_ofs, comment = _END.unpack(read(size - _END.size, _END.size))
        if sig != 0x06054B50 or comment or disk or cd_disk or n_disk != n:
            return None
        end = locator = size - _END.size
        if locator >= _LOCATOR.size + _END64.size:
            locator -= _LOCATOR.size
            lsig, ldisk, end64, ndisks = _LOCATOR.unpack(read(locator, _LOCATOR.size))
            if lsig == 0x07064B50:
                if end64 + _END64.size != locator or ldisk or ndisks != 1:
                    return None
                esig, _, _, _, edisk, ecd_disk, en_disk, n, cd_size, cd_ofs = _END64.unpack(read(end64, _END64.size))
                if esig != 0x06064B50 or edisk or ecd_disk or en_disk != n:
                    return None
                end = end64
        if cd_ofs + cd_size != end:
            return None
        cd = read(cd_ofs, cd_size)
        if len(cd) != cd_size:
            return None
        out, pos = [], 0
        for _ in range(n):
            sig, _, _, flags, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, _, ofs = _CENTRAL.unpack_from(cd, pos)
            pos += _CENTRAL.size
            if sig != 0x02014B50 or method or pos + nlen + xlen + clen > cd_size:
                return None
            name = cd[pos:pos + nlen].decode("utf-8" if flags & 0x800 else "cp437")
            if U32 in (usize, csize, ofs):  # zip64 field: the values that did not fit, in this order
                big = _zip64_values(cd[pos + nlen:pos + nlen + xlen])
                usize, csize, ofs = (big.pop(0) if v == U32 else v for v in (usize, csize, ofs))
            pos += nlen + xlen + clen
            if csize != usize:
                return None
            out.append((name, ofs, usize))
        return out if pos == cd_size else None
    except (OSError, struct.error, UnicodeDecodeError, ValueError, IndexError):
        return None
    finally:
        if fd is not None:
            os.close(fd)


def _zip64_values(extra: bytes) -> list[int]:
    values = None
    while extra:
        tag, n = struct.unpack_from("<HH", extra)
        if n + 4 > len(extra):
            raise ValueError("corrupt extra field")
        if tag == 1:
            values = list(struct.unpack_from(f"<{n // 8}Q", extra, 4))
        extra = extra[4 + n:]
    if values is None:
        raise ValueError("no zip64 field")
    return values


@lru_cache(maxsize=64)
def serialization_id(records: tuple[tuple[str, bool], ...]) -> bytes:
    """torch's `.data/serialization_id` for these records (name, has data), computed by torch's own writer: only the
    names and which records have a data descriptor (each folds its CRC, 0 here, in) matter, not the sizes."""
    w = torch._C.PyTorchFileWriter(os.devnull, False)
    for name, data in records:
        w.write_record(name, b"\0" if data else b"", int(data))
    w.write_end_of_file()
    return w.serialization_id().encode()


def torch_bytes(records: list[tuple[str, bytes]]) -> bytes:
    """What torch's own writer (CRC32 off, on a file object: archive name `archive`) writes for these records."""
    f = io.BytesIO()
    w = torch._C.PyTorchFileWriter(f, False)
    for name, data in records:
        w.write_record(name, data, len(data))
    w.write_end_of_file()
    return f.getvalue()


def layout_bytes(records: list[tuple[str, bytes]]) -> bytes:
    """The same archive laid out by `ZipLayout`."""
    z = ZipLayout()
    out = []
    for name, data in records:
        head, tail = z.record(name, len(data))
        out += (head, data, tail)
    out.append(z.end())
    return b"".join(out)


@lru_cache(maxsize=None)
def layout_matches_torch() -> bool:
    """Does `ZipLayout` write what this torch's writer writes? (Checked once per process on a small archive: records
    of several sizes, an empty one, one that needs no padding; False sends rank files through torch's writer.)"""
    records = [(f"data/{i}", bytes([i]) * n) for i, n in enumerate((2560, 0, 7, 64, 1, 4096 + 3))]
    records += [("data.pkl", b"\x80\x02}q\x00."), (".format_version", b"1"), (".storage_alignment", b"64"),
                ("byteorder", sys.byteorder.encode())]
    try:
        return layout_bytes(records) == torch_bytes(records)
    except (RuntimeError, AttributeError, TypeError, ValueError, OSError):
        return False
