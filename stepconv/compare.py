"""Bit-exact comparison of two HF checkpoints (the round-trip proof users can run themselves)."""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .hf_io import HFCheckpoint, pread_into
from .safety import LIBC

CHUNK_BYTES = 16 << 20  # compared per task; each thread reuses one buffer pair of this size
_libc = LIBC if LIBC is not None else ctypes.CDLL(None)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _memcmp(a: int, b: int, n: int) -> int:
    """libc memcmp: 4.2 GB/s where torch.equal of two uint8 tensors ran at 0.28 GB/s (measured, one thread)."""
    return _libc.memcmp(a, b, n) if n else 0


@dataclass
class Comparison:
    tensors: int = 0
    bytes: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    differ: list[str] = field(default_factory=list)
    config_equal: bool = True

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.differ) and self.config_equal


def compare_hf(a: str | os.PathLike, b: str | os.PathLike, *, jobs: int | None = None) -> Comparison:
    """Names, dtypes, shapes and bytes of every tensor, plus config.json equality.

    The bytes are read in 16 MB pieces with pread into buffers each thread allocates once (fresh memory costs
    more to fault in than to compare), on `jobs` threads (default: the CPU count, at most 8): preadv and
    memcmp release the GIL, so the pieces are compared in parallel."""
    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    out = Comparison()
    out.only_a = sorted(set(ca.tensors) - set(cb.tensors))
    out.only_b = sorted(set(cb.tensors) - set(ca.tensors))
    out.config_equal = ca.config.raw == cb.config.raw
    tasks: list[tuple[str, tuple, tuple]] = []  # (name, (fd, offset, n) in a, the same in b)
    for name in sorted(set(ca.tensors) & set(cb.tensors)):
        ia, ib = ca.tensors[name], cb.tensors[name]
        if ia.dtype != ib.dtype or ia.shape != ib.shape:
            out.differ.append(f"{name} ({ia.dtype} {list(ia.shape)} vs {ib.dtype} {list(ib.shape)})")
            continue
        (fa, oa, n), = ca.lazy(name, rows_only=True)[:].pieces or [(0, 0, 0)]
        (fb, ob, _), = cb.lazy(name, rows_only=True)[:].pieces or [(0, 0, 0)]
        tasks += [(name, (fa, oa + k, min(CHUNK_BYTES, n - k)), (fb, ob + k, min(CHUNK_BYTES, n - k)))
                  for k in range(0, n, CHUNK_BYTES)]
        out.tensors += 1
        out.bytes += ia.nbytes
    local = threading.local()

    def same(task) -> bool:
        name, ra, rb = task
        if not hasattr(local, "bufs"):
            local.bufs = (torch.empty(CHUNK_BYTES, dtype=torch.uint8), torch.empty(CHUNK_BYTES, dtype=torch.uint8))
        xs = []
        for (fd, off, n), buf in zip((ra, rb), local.bufs):
            pread_into(fd, memoryview(buf.numpy())[:n], off, name)
            xs.append(buf[:n])
        return _memcmp(xs[0].data_ptr(), xs[1].data_ptr(), n) == 0

    workers = max(1, min(jobs or os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        differ = {t[0] for t, ok in zip(tasks, pool.map(same, tasks)) if not ok}
    out.differ += [f"{n} (bytes differ)" for n in sorted(differ)]
    return out
