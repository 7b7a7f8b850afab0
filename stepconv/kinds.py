"""Tensor kinds: how one family of HF tensors becomes Megatron tensors, per TP rank and globally, and back.

A `Kind` holds both directions of one layout family:

* `split(sources, ctx, tp_rank)`: one TP rank's Megatron tensor from the HF tensors (legacy rank files);
* `merge(shards, ctx)`: the HF tensors from all TP ranks' tensors (exact inverse of `split`);
* `fragments(source_shapes, ctx, tp_rank)`: where the rows of that rank's tensor sit in the *global*,
  layout-independent tensor(s) Megatron's `torch_dist` format stores (e.g. `linear_qkv.weight._qkv` and
  `._gate`), so a format that stores global tensors needs no second description of the layout.

Per-rank shapes are never restated: `rank_shape` runs `split` on meta tensors. `split` only needs basic
slicing of its sources (`t[a:b]`, `t[:, a:b]`), so lazy readers work as well as tensors and only the rows a
rank needs are read. Every kind is in `KINDS`; adding one is one class and one registry row
(tests/test_kinds.py checks every registered kind: split/merge inverse, fragments tile the global tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import torch

from . import buffers
from .config import AttnShape


class Sliceable(Protocol):
    shape: Sequence[int]
    dtype: torch.dtype

    def __getitem__(self, idx) -> torch.Tensor: ...


@dataclass(frozen=True)
class SplitContext:
    """What a kind needs besides the tensors: the TP size and the model facts its layout depends on."""

    tp_size: int
    attn: AttnShape | None = None  # qkvg: heads, query groups, head_dim of this layer
    vocab: int = 0  # vocab: true rows ...
    padded_vocab: int = 0  # ... and the padded row count over all TP ranks


@dataclass(frozen=True)
class Fragment:
    """Rows `rows` of one TP rank's tensor sit in global tensor `<key><suffix>` at `offsets`."""

    suffix: str  # "" or a sub-key such as "._qkv" / "._gate"
    global_shape: tuple[int, ...]
    rows: slice  # along dim 0 of the rank tensor
    offsets: tuple[int, ...]  # of the fragment's first element in the global tensor


def _cat(parts: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat into a reused buffer (`buffers.empty`: fresh memory costs more to fault in than the copy), with
    meta tensors (dry runs, shape planning) joined by shape arithmetic: torch's own meta kernel for cat imports
    torch._dynamo on first use (measured 1.6-2.9 s), which a conversion would pay just to size its thread pool.
    (One pass over the parts: at the real tensor count mcore-to-hf joins ~36k routed-expert halves, where the checks
    in Python cost more than torch.cat's ~10 us.)"""
    parts = list(parts)
    if not parts:
        return torch.cat(parts, dim=dim)
    first = parts[0]
    device, fshape, dtype = first.device, first.shape, first.dtype
    size, lazy = 0, False
    for p in parts:
        shape = p.shape
        if p.device != device:
            return torch.cat(parts, dim=dim)
        if len(shape) != len(fshape) or shape[:dim] != fshape[:dim] or shape[dim + 1:] != fshape[dim + 1:]:
            raise ValueError(f"Sizes of tensors must match except in dimension {dim}: {list(fshape)} "
                             f"and {list(shape)}")
        size += shape[dim]
        if p.dtype != dtype:
            dtype = torch.promote_types(dtype, p.dtype)
        if not isinstance(p, torch.Tensor):  # hf_io.FileRows: rows still in their files
            lazy = True
    shape = [*fshape[:dim], size, *fshape[dim + 1:]]
    if first.is_meta:
        return torch.empty(shape, dtype=dtype, device="meta")
    if lazy:
        rows = next(p for p in parts if not isinstance(p, torch.Tensor))
        if dim == 0 and all(p.dtype == dtype for p in parts):
            return type(rows).cat(parts, shape, dtype)  # stays unread: the writer copies file to file
        parts = [p if isinstance(p, torch.Tensor) else p.materialise() for p in parts]
    if device.type != "cpu" or math.prod(shape) * dtype.itemsize < buffers.MIN_POOLED:  # (from the heap anyway)
        return torch.cat(parts, dim=dim)
    return torch.cat(parts, dim=dim, out=buffers.empty(shape, dtype))


def _part(n: int, tp: int, rank: int) -> slice:
    if n % tp:
        raise ValueError(f"dimension {n} is not divisible by TP {tp}")
    step = n // tp
    return slice(rank * step, (rank + 1) * step)


class Kind:
    """One layout family. Subclasses define `split`, `merge` and `fragments`; see the module docstring."""

    name: str = ""
    sources: int = 1  # HF tensors per Megatron tensor
    dtype: torch.dtype | None = None  # a dtype Megatron keeps whatever --dtype says (fp32 router expert bias)
    replicated: bool = False  # every TP rank holds the same tensor (merge checks they agree)
    megatron: bool = True  # False: kept beside the Megatron files (no Megatron slot)
    # split and merge only take dim-0 slices (and chunks) of their inputs and join them along dim 0, so inputs
    # may be rows still in their files (hf_io.FileRows), moved file to file by the writers
    row_slices: bool = False
    how: str = ""  # for `inspect`'s mapping table

    def split(self, srcs: Sequence[Sliceable], ctx: SplitContext, tp_rank: int) -> torch.Tensor | None:
        raise NotImplementedError

    def split_all(self, srcs: Sequence[Sliceable], ctx: SplitContext) -> list[torch.Tensor | None]:
        """`split` for every TP rank, in rank order (a kind may take them all in one pass)."""
        return [self.split(srcs, ctx, r) for r in range(ctx.tp_size)]

    def merge(self, shards: Sequence[torch.Tensor], ctx: SplitContext) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def fragments(self, shapes: Sequence[tuple[int, ...]], ctx: SplitContext, tp_rank: int) -> list[Fragment]:
        raise NotImplementedError

    def out_dtype(self, src_dtypes: Sequence[torch.dtype], target: torch.dtype | None) -> torch.dtype:
        """The Megatron dtype: the kind's own, else --dtype, else the sources' (promoted)."""
        if self.dtype is not None:
            return self.dtype
        if target is not None:
            return target
        dt = src_dtypes[0]
        for d in src_dtypes[1:]:
            if d is not dt:  # (torch.promote_types costs ~1 us; an entry's sources share a dtype)
                dt = torch.promote_types(dt, d)
        return dt

    def rank_shape(self, shapes: Sequence[tuple[int, ...]], ctx: SplitContext, tp_rank: int = 0) -> tuple[int, ...]:
        """The shape `split` produces, computed by running it on meta tensors (cached per signature)."""
        return _meta_shape(self, shapes if isinstance(shapes, tuple) else tuple(map(tuple, shapes)), ctx, tp_rank)

    def __repr__(self) -> str:
        return f"<kind {self.name}>"


@lru_cache(maxsize=65536)
def _meta_shape(kind: Kind, shapes: tuple, ctx: SplitContext, tp_rank: int) -> tuple[int, ...]:
    metas = [torch.empty(s, dtype=torch.bfloat16, device="meta") for s in shapes]
    return tuple(kind.split(metas, ctx, tp_rank).shape)


class Replicate(Kind):
    """Norms, router weight: every TP rank holds the whole tensor."""

    name, replicated, how = "replicate", True, "replicated"

    def __init__(self, name: str = "replicate", dtype: torch.dtype | None = None):
        self.name, self.dtype = name, dtype
        if dtype is not None:
            self.how = f"replicated, kept {str(dtype).removeprefix('torch.')}"

    def split(self, srcs, ctx, tp_rank):
        return srcs[0][:]

    def merge(self, shards, ctx):
        for r, s in enumerate(shards[1:], 1):  # (meta tensors of a dry run: shapes and dtypes only)
            if s.shape != shards[0].shape or s.dtype != shards[0].dtype or not (s.is_meta or torch.equal(s, shards[0])):
                raise ValueError(f"replicated tensor differs between TP rank 0 and TP rank {r}")
        return (shards[0],)

    def fragments(self, shapes, ctx, tp_rank):
        return [Fragment("", tuple(shapes[0]), slice(0, shapes[0][0] if shapes[0] else 1), (0,) * len(shapes[0]))]


class Column(Kind):
    """Column-parallel linear (MTP eh_proj): rows split over TP."""

    name, how = "column", "TP-split rows"
    row_slices = True

    def split(self, srcs, ctx, tp_rank):
        return srcs[0][_part(srcs[0].shape[0], ctx.tp_size, tp_rank)]

    def merge(self, shards, ctx):
        return (_cat(list(shards), dim=0),)

    def fragments(self, shapes, ctx, tp_rank):
        rows = _part(shapes[0][0], ctx.tp_size, tp_rank)
        return [Fragment("", tuple(shapes[0]), slice(0, rows.stop - rows.start), (rows.start, 0))]


class Row(Kind):
    """Row-parallel linear (o_proj, down_proj, experts' fc2): columns split over TP."""

    name, how = "row", "TP-split columns"

    # a rank's row narrower than this many bytes: every rank's columns are taken in one copy (below)
    NARROW = 128

    def split(self, srcs, ctx, tp_rank):
        return srcs[0][:, _part(srcs[0].shape[1], ctx.tp_size, tp_rank)]

    def split_all(self, srcs, ctx):
        """Narrow column slices (a 1/8-width expert's fc2, 512 x 160 bf16, is 80 bytes a row at TP=4, 40 at TP=8) are
        copied for all ranks at once, in one pass over the source, into contiguous [tp, rows, cols/tp], each part then
        one memmove into the writer's buffer. Per expert, split and packed, source out of cache (2-core machine):
        TP=4 72-122 us vs 106-190 packing each rank's strided slice row by row, TP=8 112-182 vs 165-383; at TP=2 (160
        bytes a row) it was no faster (74-95 vs 62-98), and on the 16-core device TP=2 x EP=2 ran 8% slower with it
        (ABBA, 1/8), so wider rows keep the writer's row-wise gather (4096 x 1280, TP=4: 2.3 ms vs 2.8 this way)."""
        t, tp = srcs[0], ctx.tp_size
        if (tp > 1 and type(t) is torch.Tensor and t.dim() == 2 and t.device.type == "cpu" and t.stride(1) == 1
                and t.shape[1] % tp == 0 and t.shape[1] // tp * t.element_size() < self.NARROW):
            rows, w = t.shape[0], t.shape[1] // tp
            out = buffers.empty((tp, rows, w), t.dtype)
            out.copy_(t.view(rows, tp, w).transpose(0, 1))
            return list(out.unbind(0))
        return super().split_all(srcs, ctx)

    def merge(self, shards, ctx):
        return (_cat(list(shards), dim=1),)

    def fragments(self, shapes, ctx, tp_rank):
        cols = _part(shapes[0][1], ctx.tp_size, tp_rank)
        return [Fragment("", tuple(shapes[0]), slice(0, shapes[0][0]), (0, cols.start))]


class Vocab(Kind):
    """Embedding and LM head: rows padded with zeros to the padded vocab, then split over TP.

    The global tensor is the unpadded one (Megatron loads it with `allow_shape_mismatch`), so pad rows
    belong to no fragment."""

    name, how = "vocab", "vocab-padded, TP-split rows"
    row_slices = True

    def split(self, srcs, ctx, tp_rank):
        t = srcs[0]
        vocab, hidden = t.shape[0], t.shape[1]
        if ctx.padded_vocab < vocab:
            raise ValueError(f"padded vocab {ctx.padded_vocab} < vocab {vocab}")
        rows = _part(ctx.padded_vocab, ctx.tp_size, tp_rank)
        lo, hi = rows.start, min(rows.stop, vocab)
        if hi <= lo:
            return torch.zeros(rows.stop - rows.start, hidden, dtype=t.dtype, device=_device(t))
        real = t[lo:hi]
        pad = rows.stop - hi
        return real if pad == 0 else _cat([real, real.new_zeros(pad, hidden)], dim=0)

    def merge(self, shards, ctx):
        return (_cat(list(shards), dim=0)[:ctx.vocab],)

    def fragments(self, shapes, ctx, tp_rank):
        vocab = shapes[0][0]
        rows = _part(ctx.padded_vocab, ctx.tp_size, tp_rank)
        real = max(0, min(rows.stop, vocab) - rows.start)
        return [Fragment("", tuple(shapes[0]), slice(0, real), (rows.start, 0))] if real else []


class SwiGLU(Kind):
    """Gated MLP fc1 (dense, shared expert, one routed expert): rank r holds [gate_r; up_r].

    Global (torch_dist): one tensor [gate; up]; rank r's halves sit at fragments r and tp + r of 2·tp."""

    name, sources, how = "swiglu", 2, "TP-split rows as [gate_r; up_r]"
    row_slices = True

    def split(self, srcs, ctx, tp_rank):
        gate, up = srcs
        return _cat([gate[_part(gate.shape[0], ctx.tp_size, tp_rank)],
                          up[_part(up.shape[0], ctx.tp_size, tp_rank)]], dim=0)

    def merge(self, shards, ctx):
        halves = [s.chunk(2, dim=0) for s in shards]
        return _cat([h[0] for h in halves], dim=0), _cat([h[1] for h in halves], dim=0)

    def fragments(self, shapes, ctx, tp_rank):
        f, cols = shapes[0][0], shapes[0][1]
        rows = _part(f, ctx.tp_size, tp_rank)
        n = rows.stop - rows.start
        full = (2 * f, cols)
        return [Fragment("", full, slice(0, n), (rows.start, 0)), Fragment("", full, slice(n, 2 * n), (f + rows.start, 0))]


class QKVG(Kind):
    """Fused QKV with the head-wise gate (Megatron-LM PR #4841), per TP rank:
    [q,k,v rows of each of rank r's query groups ; gate rows of heads r·nh/tp .. (r+1)·nh/tp-1].

    Global (torch_dist): `._qkv` = the TP=1 per-group [q…q, k, v] rows, `._gate` = g_proj."""

    name, sources, how = "qkvg", 4, "TP-split rows per query group + the rank's gate rows"

    def split(self, srcs, ctx, tp_rank):
        q, k, v, g = srcs
        hd, nh, ng = ctx.attn.head_dim, ctx.attn.heads, ctx.attn.groups
        if nh % ctx.tp_size or ng % ctx.tp_size:
            raise ValueError(f"TP {ctx.tp_size} must divide {nh} heads and {ng} query groups")
        hpg, ng_p = nh // ng, ng // ctx.tp_size
        parts: list[torch.Tensor] = []
        for j in range(tp_rank * ng_p, (tp_rank + 1) * ng_p):
            parts += [q[j * hpg * hd:(j + 1) * hpg * hd], k[j * hd:(j + 1) * hd], v[j * hd:(j + 1) * hd]]
        parts.append(g[_part(nh, ctx.tp_size, tp_rank)])
        return _cat(parts, dim=0)

    def merge(self, shards, ctx):
        tp = len(shards)
        hd, nh, ng = ctx.attn.head_dim, ctx.attn.heads, ctx.attn.groups
        hpg, ng_p, nh_p = nh // ng, ng // tp, nh // tp
        qkv_rows = ng_p * (hpg + 2) * hd
        qs, ks, vs, gs = [], [], [], []
        for s in shards:
            if s.shape[0] != qkv_rows + nh_p:
                raise ValueError(f"linear_qkv shard has {s.shape[0]} rows; expected {qkv_rows + nh_p} "
                                 f"({qkv_rows} q/k/v + {nh_p} gate) for {nh} heads, {ng} groups at TP {tp}")
            groups = s[:qkv_rows].view(ng_p, (hpg + 2) * hd, *s.shape[1:])
            qs.append(groups[:, :hpg * hd].reshape(-1, *s.shape[1:]))
            ks.append(groups[:, hpg * hd:(hpg + 1) * hd].reshape(-1, *s.shape[1:]))
            vs.append(groups[:, (hpg + 1) * hd:].reshape(-1, *s.shape[1:]))
            gs.append(s[qkv_rows:])
        return tuple(_cat(x, dim=0) for x in (qs, ks, vs, gs))

    def fragments(self, shapes, ctx, tp_rank):
        hd, nh, ng = ctx.attn.head_dim, ctx.attn.heads, ctx.attn.groups
        cols = shapes[0][1]
        qkv = (nh + 2 * ng) * hd
        qkv_rows, gate = _part(qkv, ctx.tp_size, tp_rank), _part(nh, ctx.tp_size, tp_rank)
        n = qkv_rows.stop - qkv_rows.start
        return [Fragment("._qkv", (qkv, cols), slice(0, n), (qkv_rows.start, 0)),
                Fragment("._gate", (nh, cols), slice(n, n + gate.stop - gate.start), (gate.start, 0))]


class ExtraState(Kind):
    """Megatron's `_extra_state` entries (TE/local linears): no HF source, written as None."""

    name, sources, megatron, how = "extra", 0, True, "Megatron _extra_state (None)"

    def split(self, srcs, ctx, tp_rank):
        return None

    def merge(self, shards, ctx):
        return ()

    def fragments(self, shapes, ctx, tp_rank):
        return []


class Sidecar(Kind):
    """A tensor Megatron has no slot for (each MTP layer's own shared_head.output): kept whole beside the
    Megatron files and restored from there."""

    name, megatron = "sidecar", False
    row_slices = True
    how = "no Megatron slot: kept beside the rank files"

    def out_dtype(self, src_dtypes, target):
        return src_dtypes[0]  # kept bit-exact, whatever --dtype says

    def split(self, srcs, ctx, tp_rank):
        return srcs[0][:]

    def merge(self, shards, ctx):
        return (shards[0],)

    def fragments(self, shapes, ctx, tp_rank):
        return []


def _device(t: Sliceable) -> torch.device:
    return getattr(t, "device", torch.device("cpu"))


REPLICATE = Replicate()
REPLICATE_FP32 = Replicate("replicate_fp32", torch.float32)  # router expert bias: Megatron keeps it fp32
COLUMN, ROW, VOCAB, SWIGLU, QKVG_, EXTRA, SIDECAR = Column(), Row(), Vocab(), SwiGLU(), QKVG(), ExtraState(), Sidecar()

KINDS: dict[str, Kind] = {k.name: k for k in (REPLICATE, REPLICATE_FP32, COLUMN, ROW, VOCAB, SWIGLU, QKVG_, EXTRA,
                                              SIDECAR)}
