"""Pure HF <-> Megatron tensor layouts, one `split`/`merge` pair per tensor kind.

`split(...)` builds one TP rank's Megatron tensor from the HF tensors; `merge(...)` takes all
TP ranks' tensors back to the HF tensors. Each pair is an exact inverse (tests/test_layout.py).
Inputs to `split` only need basic slicing (`t[a:b]`, `t[:, a:b]`), so lazy safetensors slices
work as well as torch tensors and only the rows a rank needs are ever read.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .config import AttnShape


class Sliceable(Protocol):
    shape: Sequence[int]

    def __getitem__(self, idx) -> torch.Tensor: ...


def _part(n: int, tp: int, rank: int) -> slice:
    if n % tp:
        raise ValueError(f"dimension {n} is not divisible by TP {tp}")
    step = n // tp
    return slice(rank * step, (rank + 1) * step)


# --- replicated (norms, router, expert bias) -------------------------------------------------
def replicate_split(t: Sliceable, tp: int, rank: int) -> torch.Tensor:
    return t[:]


def replicate_merge(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    return shards[0]


# --- column parallel: split dim 0 -------------------------------------------------------------
def column_split(t: Sliceable, tp: int, rank: int) -> torch.Tensor:
    return t[_part(t.shape[0], tp, rank)]


def column_merge(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(shards), dim=0)


# --- row parallel: split dim 1 ----------------------------------------------------------------
def row_split(t: Sliceable, tp: int, rank: int) -> torch.Tensor:
    return t[:, _part(t.shape[1], tp, rank)]


def row_merge(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(shards), dim=1)


# --- vocab parallel: pad rows to padded_vocab, then split dim 0 -------------------------------
def vocab_split(t: Sliceable, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    vocab, hidden = t.shape[0], t.shape[1]
    if padded_vocab < vocab:
        raise ValueError(f"padded vocab {padded_vocab} < vocab {vocab}")
    rows = _part(padded_vocab, tp, rank)
    lo, hi = rows.start, min(rows.stop, vocab)
    real = t[lo:hi] if hi > lo else None
    pad = rows.stop - max(hi, lo)
    if real is None:
        return torch.zeros(rows.stop - rows.start, hidden, dtype=_dtype(t))
    if pad == 0:
        return real
    return torch.cat([real, real.new_zeros(pad, hidden)], dim=0)


def vocab_merge(shards: Sequence[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.cat(list(shards), dim=0)[:vocab]


def _dtype(t: Sliceable) -> torch.dtype:
    return t.dtype  # type: ignore[attr-defined]


# --- SwiGLU fc1: per rank [gate_r; up_r] -------------------------------------------------------
def swiglu_split(gate: Sliceable, up: Sliceable, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([column_split(gate, tp, rank), column_split(up, tp, rank)], dim=0)


def swiglu_merge(shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)


# --- fused QKV + head-wise gate (Megatron-LM PR #4841, megatron-formats.md 1.9) ----------------
def qkvg_split(q: Sliceable, k: Sliceable, v: Sliceable, g: Sliceable, shape: AttnShape,
               tp: int, rank: int) -> torch.Tensor:
    """Rank r: [q,k,v of each of its query groups ; gate rows of heads r*nh/tp .. (r+1)*nh/tp-1]."""
    hd, nh, ng = shape.head_dim, shape.heads, shape.groups
    if nh % tp or ng % tp:
        raise ValueError(f"TP {tp} must divide {nh} heads and {ng} query groups")
    hpg = nh // ng
    ng_p = ng // tp
    parts: list[torch.Tensor] = []
    for j in range(rank * ng_p, (rank + 1) * ng_p):
        parts.append(q[j * hpg * hd:(j + 1) * hpg * hd])
        parts.append(k[j * hd:(j + 1) * hd])
        parts.append(v[j * hd:(j + 1) * hd])
    parts.append(g[_part(nh, tp, rank)])
    return torch.cat(parts, dim=0)


def qkvg_merge(shards: Sequence[torch.Tensor], shape: AttnShape) -> tuple[torch.Tensor, ...]:
    """Inverse of qkvg_split over all ranks: (q, k, v, g) in HF row order."""
    tp = len(shards)
    hd, nh, ng = shape.head_dim, shape.heads, shape.groups
    hpg, ng_p, np_ = nh // ng, ng // tp, nh // tp
    qkv_rows = ng_p * (hpg + 2) * hd
    qs, ks, vs, gs = [], [], [], []
    for s in shards:
        if s.shape[0] != qkv_rows + np_:
            raise ValueError(f"linear_qkv shard has {s.shape[0]} rows; expected {qkv_rows + np_} "
                             f"({qkv_rows} q/k/v + {np_} gate) for {nh} heads, {ng} groups at TP {tp}")
        groups = s[:qkv_rows].view(ng_p, (hpg + 2) * hd, *s.shape[1:])
        qs.append(groups[:, :hpg * hd].reshape(-1, *s.shape[1:]))
        ks.append(groups[:, hpg * hd:(hpg + 1) * hd].reshape(-1, *s.shape[1:]))
        vs.append(groups[:, (hpg + 1) * hd:].reshape(-1, *s.shape[1:]))
        gs.append(s[qkv_rows:])
    return tuple(torch.cat(x, dim=0) for x in (qs, ks, vs, gs))


class ExpertView:
    """Expert `e` of a stacked [E, out, in] tensor, sliceable like a 2-D tensor (reads lazily)."""

    def __init__(self, stack: Sliceable, e: int):
        self.stack, self.e = stack, e
        self.shape = tuple(stack.shape[1:])
        self.dtype = _dtype(stack)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = idx if isinstance(idx, tuple) else (idx,)
        return self.stack[(slice(self.e, self.e + 1), *idx)][0]
