"""Every tensor kind: split/merge are exact inverses, fragments tile the global tensor, meta shapes are real ones,
and the fused QKV+gate layout is Megatron's per-rank one (checked by an oracle that is shown to catch mutants)."""

import itertools

import pytest
import torch

from stepconv.config import AttnShape
from stepconv.kinds import KINDS, QKVG_, SplitContext

TPS = [1, 2, 4, 8]
ATTN = AttnShape(16, 8, 4)  # 16 heads, 8 groups, head_dim 4: divisible at every TP above


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# one example per registered kind: source shapes and the context (a new kind without an example fails below)
EXAMPLES = {
    "replicate": ([(16,)], {}),
    "replicate_fp32": ([(24,)], {}),
    "column": ([(32, 6)], {}),
    "row": ([(6, 32)], {}),
    "vocab": ([(1100, 8)], {"vocab": 1100}),
    "swiglu": ([(32, 5), (32, 5)], {}),
    "qkvg": ([(ATTN.q_rows, 5), (ATTN.kv_rows, 5), (ATTN.kv_rows, 5), (ATTN.heads, 5)], {"attn": ATTN}),
    "extra": ([], {}),
    "sidecar": ([(40, 8)], {}),
}


def ctx_for(name, tp):
    kw = dict(EXAMPLES[name][1])
    if "vocab" in kw:
        kw["padded_vocab"] = -(-kw["vocab"] // (128 * tp)) * 128 * tp
    return SplitContext(tp, **kw)


def sources(name, seed=0):
    return [rnd(*s, seed=seed + i) for i, s in enumerate(EXAMPLES[name][0])]


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(KINDS)


@pytest.mark.parametrize("name,tp", list(itertools.product(sorted(KINDS), TPS)))
def test_split_merge_are_exact_inverses(name, tp):
    kind, ctx = KINDS[name], ctx_for(name, tp)
    srcs = sources(name)
    ranks = tp if kind.megatron else 1
    shards = [kind.split(srcs, ctx, r) for r in range(ranks)]
    if kind.megatron:  # (what conversions call: every rank at once)
        every = kind.split_all(srcs, ctx)
        assert len(every) == ranks and all(a is b is None or torch.equal(a, b) for a, b in zip(every, shards))
    if not srcs:
        assert shards == [None] * ranks and kind.merge(shards, ctx) == ()
        return
    back = kind.merge(shards, ctx)
    assert len(back) == len(srcs) and all(torch.equal(a, b) for a, b in zip(back, srcs))
    again = [kind.split(back, ctx, r) for r in range(ranks)]
    assert all(torch.equal(a, b) for a, b in zip(again, shards))
    # the dry run's shapes (split on meta tensors) are the real ones
    assert all(kind.rank_shape([tuple(s.shape) for s in srcs], ctx, r) == tuple(shards[r].shape) for r in range(ranks))


@pytest.mark.parametrize("cols", [96, 640])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_row_split_all_takes_narrow_columns_in_one_copy(dtype, cols):
    """Narrow rank columns come back contiguous (one copy for all ranks) and equal to each rank's slice; wide ones
    stay views of the source; a strided source (a column slice itself) gives the same values."""
    row = KINDS["row"]
    src = (rnd(24, cols) * 50).to(dtype)
    paths = set()
    for tp in (2, 4, 8):
        ctx = SplitContext(tp)
        narrow = cols // tp * src.element_size() < row.NARROW
        paths.add(narrow)
        parts = row.split_all([src], ctx)
        assert [torch.equal(p, row.split([src], ctx, r)) for r, p in enumerate(parts)] == [True] * tp
        assert all(p.is_contiguous() for p in parts) == narrow, (tp, dtype)
        assert all(p.data_ptr() != src.data_ptr() for p in parts) if narrow else parts[0].data_ptr() == src.data_ptr()
        assert torch.equal(row.merge(parts, ctx)[0], src)
        view = src[:, 1:cols // 2 + 1]  # (not contiguous)
        assert [torch.equal(p, row.split([view], ctx, r)) for r, p in enumerate(row.split_all([view], ctx))] == [True] * tp
    assert True in paths if cols == 96 else (paths == {False}) == (dtype != torch.int8)  # (both paths are tested)


def assemble(kind, srcs, ctx, tp):
    """Global tensors {suffix: tensor} built only from rank tensors and their fragments; coverage counts each element."""
    shapes = [tuple(s.shape) for s in srcs]
    out, cover = {}, {}
    for r in range(tp):
        t = kind.split(srcs, ctx, r)
        for f in kind.fragments(shapes, ctx, r):
            g = out.setdefault(f.suffix, torch.zeros(f.global_shape))
            c = cover.setdefault(f.suffix, torch.zeros(f.global_shape, dtype=torch.int64))
            piece = t[f.rows]
            idx = tuple(slice(o, o + n) for o, n in zip(f.offsets, piece.shape))
            g[idx] = piece
            c[idx] += 1
    return out, cover


@pytest.mark.parametrize("name,tp", [(n, t) for n in sorted(KINDS) for t in TPS if KINDS[n].megatron and EXAMPLES[n][0]])
def test_fragments_tile_the_global_tensor(name, tp):
    kind, srcs = KINDS[name], sources(name)
    glob, cover = assemble(kind, srcs, ctx_for(name, tp), tp)
    for suffix, c in cover.items():
        want = 1 if not kind.replicated else tp  # every replica maps onto the same global tensor
        assert torch.equal(c, torch.full_like(c, want)), (suffix, c.unique())
    ref, _ = assemble(kind, srcs, ctx_for(name, 1), 1)  # the global tensor does not depend on TP
    assert glob.keys() == ref.keys() and all(torch.equal(glob[k], ref[k]) for k in ref)


def test_global_tensors_are_megatrons():
    """torch_dist's global tensors: [gate; up] for SwiGLU, the unpadded vocab, `_qkv` per group and `_gate` = g."""
    s = sources("swiglu")
    assert torch.equal(assemble(KINDS["swiglu"], s, ctx_for("swiglu", 4), 4)[0][""], torch.cat(s))
    v = sources("vocab")
    assert torch.equal(assemble(KINDS["vocab"], v, ctx_for("vocab", 8), 8)[0][""], v[0])
    q, k, v, g = tagged_qkvg(ATTN)
    glob, _ = assemble(QKVG_, [q, k, v, g], SplitContext(4, ATTN), 4)
    assert torch.equal(glob["._gate"], g)
    assert glob["._qkv"][:, 0].tolist() == expected_rank_rows(ATTN, 1, 0)[:-ATTN.heads]


def test_replicated_shards_must_agree():
    kind = KINDS["replicate"]
    with pytest.raises(ValueError, match="differs between TP rank 0 and TP rank 1"):
        kind.merge([torch.zeros(3), torch.ones(3)], SplitContext(2))


def test_vocab_pads_with_zero_rows():
    v = sources("vocab")[0]
    for tp in TPS:
        ctx = ctx_for("vocab", tp)
        full = torch.cat([KINDS["vocab"].split([v], ctx, r) for r in range(tp)])
        assert full.shape[0] == ctx.padded_vocab and torch.equal(full[1100:], torch.zeros(ctx.padded_vocab - 1100, 8))


def test_swiglu_rank_holds_its_gate_then_its_up_rows():
    gate, up = sources("swiglu")
    for tp in TPS:
        n = 32 // tp
        for r in range(tp):
            s = KINDS["swiglu"].split([gate, up], SplitContext(tp), r)
            assert torch.equal(s[:n], gate[r * n:(r + 1) * n]) and torch.equal(s[n:], up[r * n:(r + 1) * n])


# --- the fused QKV + head-wise gate layout ----------------------------------------------------------------
def tagged_qkvg(shape: AttnShape, hidden=3):
    """q/k/v/g whose column 0 says (kind, head, row-in-head), so the layout can be read off."""
    hd = shape.head_dim
    q, g = torch.zeros(shape.heads * hd, hidden), torch.zeros(shape.heads, hidden)
    k, v = torch.zeros(shape.groups * hd, hidden), torch.zeros(shape.groups * hd, hidden)
    for h in range(shape.heads):
        for i in range(hd):
            q[h * hd + i, 0] = 1_000_000 + h * 1000 + i
        g[h, 0] = 4_000_000 + h
    for j in range(shape.groups):
        for i in range(hd):
            k[j * hd + i, 0] = 2_000_000 + j * 1000 + i
            v[j * hd + i, 0] = 3_000_000 + j * 1000 + i
    return q, k, v, g


def expected_rank_rows(shape: AttnShape, tp: int, r: int) -> list[float]:
    """Megatron-LM dev (PR #4841) per-rank layout written out row by row, independent of the code under test."""
    hd, hpg = shape.head_dim, shape.heads // shape.groups
    rows = []
    groups_per_rank, heads_per_rank = shape.groups // tp, shape.heads // tp
    for j in range(r * groups_per_rank, (r + 1) * groups_per_rank):
        for h in range(j * hpg, (j + 1) * hpg):
            rows += [1_000_000 + h * 1000 + i for i in range(hd)]
        rows += [2_000_000 + j * 1000 + i for i in range(hd)]
        rows += [3_000_000 + j * 1000 + i for i in range(hd)]
    rows += [4_000_000 + h for h in range(r * heads_per_rank, (r + 1) * heads_per_rank)]
    return rows


def layout_errors(split, shape: AttnShape, tp: int) -> list[int]:
    """TP ranks whose tensor (from `split(q, k, v, g, tp, r)`) is not Megatron's layout."""
    q, k, v, g = tagged_qkvg(shape)
    return [r for r in range(tp) if split(q, k, v, g, tp, r)[:, 0].tolist() != expected_rank_rows(shape, tp, r)]


def ours(shape):
    return lambda q, k, v, g, tp, r: QKVG_.split([q, k, v, g], SplitContext(tp, shape), r)


SHAPES = [AttnShape(64, 8, 4), AttnShape(96, 8, 4), AttnShape(8, 4, 16), AttnShape(12, 4, 16), AttnShape(8, 8, 2)]


@pytest.mark.parametrize("shape,tp", [(s, t) for s in SHAPES for t in TPS if s.groups % t == 0 and s.heads % t == 0])
def test_qkvg_is_megatrons_per_rank_layout(shape, tp):
    assert layout_errors(ours(shape), shape, tp) == []
    for r in range(tp):
        s = ours(shape)(*tagged_qkvg(shape), tp, r)
        assert s.shape[0] == (shape.heads * shape.head_dim + 2 * shape.groups * shape.head_dim) // tp + shape.heads // tp


def test_the_layout_oracle_catches_wrong_layouts():
    """Negative controls: the check above rejects an even split of [QKV; G] (Megatron-Bridge's) and a gate row
    moved to the neighbouring rank, so its passing the real split means something."""
    shape, tp = AttnShape(8, 4, 4), 2

    def naive(q, k, v, g, tp, r):
        per_group = torch.cat([q.view(4, 2 * 4, 3), k.view(4, 4, 3), v.view(4, 4, 3)], 1).reshape(-1, 3)
        return torch.cat([per_group, g]).chunk(tp)[r]

    def gate_swapped(q, k, v, g, tp, r):
        t = ours(shape)(q, k, v, g, tp, r).clone()
        t[-1] = ours(shape)(q, k, v, g, tp, 1 - r)[-1]
        return t

    assert layout_errors(naive, shape, tp) == [0, 1]
    assert layout_errors(gate_swapped, shape, tp) == [0, 1]


def test_qkvg_merge_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="expected"):
        QKVG_.merge([torch.zeros(10, 3), torch.zeros(10, 3)], SplitContext(2, AttnShape(8, 4, 4)))


def test_every_table_kind_is_registered():
    from stepconv.mapping import RULES

    assert {r.kind.name for r in RULES} <= set(KINDS) and all(KINDS[r.kind.name] is r.kind for r in RULES)
