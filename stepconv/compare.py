"""Bit-exact comparison of two HF checkpoints (the round-trip proof users can run themselves)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .hf_io import HFCheckpoint

CHUNK_ROWS_BYTES = 64 << 20


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


def compare_hf(a: str | os.PathLike, b: str | os.PathLike) -> Comparison:
    """Names, dtypes, shapes and bytes of every tensor, plus config.json equality; streams in chunks."""
    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    out = Comparison()
    out.only_a = sorted(set(ca.tensors) - set(cb.tensors))
    out.only_b = sorted(set(cb.tensors) - set(ca.tensors))
    out.config_equal = ca.config.raw == cb.config.raw
    for name in sorted(set(ca.tensors) & set(cb.tensors)):
        ia, ib = ca.tensors[name], cb.tensors[name]
        if ia.dtype != ib.dtype or ia.shape != ib.shape:
            out.differ.append(f"{name} ({ia.dtype} {list(ia.shape)} vs {ib.dtype} {list(ib.shape)})")
            continue
        rows = ia.shape[0] if ia.shape else 1
        step = max(1, CHUNK_ROWS_BYTES // max(1, ia.nbytes // max(rows, 1)))
        la, lb = ca.lazy(name), cb.lazy(name)
        same = True
        for lo in range(0, rows, step):
            x, y = (la[lo:lo + step], lb[lo:lo + step]) if ia.shape else (la[:], lb[:])
            if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                same = False
                break
        if not same:
            out.differ.append(f"{name} (bytes differ)")
        out.tensors += 1
        out.bytes += ia.nbytes
    return out
