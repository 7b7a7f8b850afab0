"""Reused tensor memory for the conversion hot path (reads, split copies, merges).

Why: on the virtual machines measured, the first touch of freshly mapped memory costs more than the work done
with it. Filling 64 MiB: 0.4 GB/s into a fresh mmap (what `torch.empty` of a tensor >= the 64 KiB mmap threshold
gets, see memory.py) vs 2.4 GB/s into memory touched before; `torch.cat` of two 5 MB expert halves: 0.74 GB/s
into a new tensor vs 3.7 GB/s with `out=` a touched one. So buffers are kept and handed out again once nothing
refers to them any more.

A buffer is free when its storage's reference count (C++ side, which counts every tensor and view of it, numpy
arrays and memoryviews included) is 1, i.e. only the pool holds it: there is no "release" call to forget, and a
tensor that escapes (returned to a library caller, kept in a cache) is simply never reused while it lives.
Active only inside `pooled()` (the engine's `execute`); elsewhere `empty` is `torch.empty`.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

# Smaller buffers come from malloc's heap, which reuses them; from 64 KiB up (memory.py's fixed mmap threshold) each
# torch.empty is a fresh mapping that faults in on first touch. (Pooling only from 256 KiB left the 64-256 KiB
# pieces of 1/8 width, e.g. an expert's fc1 shard at TP=4, to fresh mappings: with the unpooled read-ahead runs,
# ~90% of hf-to-mcore's 0.8M page faults at 1/8, TP=4, per `perf record -e page-faults`.)
MIN_POOLED = 64 << 10
DEFAULT_POOL = 256 << 20
STALE_TAKES = 64  # a size not asked for in this many takes drops its idle buffers
# `scratch`'s own pool holds at most this much (`pooled(scratch=...)`): reads of many sizes, by size class. Its own,
# because in the shared pool a read-ahead run's class, asked for once a batch between hundreds of per-expert takes,
# went stale and was dropped: 1.6 GB of fresh buffers at 1/8, TP=4.
SCRATCH_POOL = 64 << 20

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class BufferPool:
    """Buffers of exact byte sizes (a conversion repeats a few dozen sizes thousands of times), at most `limit`
    bytes held in all, in use or idle; idle buffers are dropped (oldest first) to make room for a new size."""

    def __init__(self, limit: int, stale: int | None = STALE_TAKES):
        """`stale` None: idle buffers are dropped only to make room (oldest first)."""
        self.limit, self.stale = limit, stale
        self.held = 0
        self._free: dict[int, list[torch.UntypedStorage]] = {}  # nbytes -> storages, oldest first
        self._lock = threading.Lock()
        self._tick = 0
        self._used: dict[int, int] = {}  # nbytes -> tick of its last take
        self.hits = self.misses = 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor of `nbytes` over a pooled storage; None when it does not fit the limit."""
        with self._lock:
            self._tick += 1
            self._used[nbytes] = self._tick
            for st in self._free.get(nbytes, ()):
                if _use_count(st._cdata) == 1:  # only the pool refers to it
                    self.hits += 1
                    return torch.empty(0, dtype=torch.uint8).set_(st)
            # sizes not asked for lately (an earlier layer's shapes) give their idle buffers back, so what the pool
            # holds follows the current working set instead of filling up to the limit as the model goes on
            if self.stale is not None:
                for size in [z for z, t in self._used.items() if t < self._tick - self.stale and z in self._free]:
                    self._drop_idle(size)
            if self.held + nbytes > self.limit:
                self._evict(self.held + nbytes - self.limit)
            if self.held + nbytes > self.limit or nbytes > self.limit // 2:
                return None
            st = torch.UntypedStorage(nbytes)
            self._free.setdefault(nbytes, []).append(st)
            self.held += nbytes
            self.misses += 1
            return torch.empty(0, dtype=torch.uint8).set_(st)

    def _drop_idle(self, size: int) -> None:
        keep = [st for st in self._free[size] if _use_count(st._cdata) != 1]
        self.held -= size * (len(self._free[size]) - len(keep))
        if keep:
            self._free[size] = keep
        else:
            del self._free[size]

    def _evict(self, need: int) -> None:
        for size in list(self._free):
            keep = []
            for st in self._free[size]:
                if need > 0 and _use_count(st._cdata) == 1:
                    need -= size
                    self.held -= size
                else:
                    keep.append(st)
            if keep:
                self._free[size] = keep
            else:
                del self._free[size]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.held = 0


_pool: BufferPool | None = None
_scratch: BufferPool | None = None


@contextmanager
def pooled(limit: int = DEFAULT_POOL, scratch: int = SCRATCH_POOL) -> Iterator[BufferPool | None]:
    """Hand out reused buffers from `empty` (at most `limit` bytes held) and `scratch` (at most `scratch`) until exit
    (nested uses share the outer pools)."""
    global _pool, _scratch
    if _pool is not None or _use_count is None:
        yield _pool
        return
    _pool, _scratch = BufferPool(limit), BufferPool(scratch, stale=None)
    try:
        yield _pool
    finally:
        _pool.clear()
        _scratch.clear()
        _pool = _scratch = None


def _after_fork_in_child() -> None:
    """A forked worker (processes.py) keeps the parent's pools, with fresh locks: a thread of the parent may have
    held one at the fork, and the child's copy of that lock would stay held forever."""
    for pool in (_pool, _scratch):
        if pool is not None:
            pool._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype)` (uninitialised), from the pool when one is active."""
    nbytes = math.prod(shape) * dtype.itemsize
    pool = _pool
    if pool is not None and nbytes >= MIN_POOLED:
        buf = pool.take(nbytes)
        if buf is not None:
            return buf.view(dtype).view(tuple(shape))
    return torch.empty(tuple(shape), dtype=dtype)


def scratch(nbytes: int) -> torch.Tensor:
    """`nbytes` uninitialised bytes (a uint8 tensor) for a read of any size, such as a read-ahead batch's runs:
    a view of a pooled buffer of `nbytes` rounded up to a size class (4 a doubling, so at most 25% over), where
    exact sizes would each keep idle buffers of their own (peak RSS grew with depth, see hf_io.pread_tensor)."""
    pool = _scratch
    if nbytes < MIN_POOLED or pool is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    step = 1 << max(nbytes.bit_length() - 3, 0)  # (a quarter of the power of two below nbytes)
    buf = pool.take(-(-nbytes // step) * step)
    return buf[:nbytes] if buf is not None else torch.empty(nbytes, dtype=torch.uint8)


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t.contiguous()`, the copy (when one is needed) into a pooled buffer."""
    if t.is_contiguous() or t.is_meta:
        return t
    return empty(t.shape, t.dtype).copy_(t)
