"""Each split/merge pair is an exact inverse, and the fused QKV+gate layout is Megatron's per-rank one."""

import itertools

import pytest
import torch

from stepconv import layout as L
from stepconv.config import AttnShape

TPS = [1, 2, 4, 8]


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp", TPS)
def test_column_row_replicate_roundtrip(tp):
    t = rnd(8 * 3, 16)
    assert torch.equal(L.column_merge([L.column_split(t, tp, r) for r in range(tp)]), t)
    assert torch.equal(L.row_merge([L.row_split(t.T.contiguous(), tp, r) for r in range(tp)]), t.T)
    assert torch.equal(L.replicate_merge([L.replicate_split(t, tp, r) for r in range(tp)]), t)
    shards = [rnd(3, 16, seed=r) for r in range(tp)]
    again = [L.column_split(L.column_merge(shards), tp, r) for r in range(tp)]
    assert all(torch.equal(a, b) for a, b in zip(again, shards))


@pytest.mark.parametrize("tp,vocab", list(itertools.product(TPS, [1100, 1024, 1])))
def test_vocab_roundtrip_pads_with_zero_rows(tp, vocab):
    t = rnd(vocab, 8)
    padded = -(-vocab // (128 * tp)) * 128 * tp
    shards = [L.vocab_split(t, tp, r, padded) for r in range(tp)]
    assert all(s.shape == (padded // tp, 8) for s in shards)
    full = torch.cat(shards)
    assert torch.equal(full[vocab:], torch.zeros(padded - vocab, 8))
    assert torch.equal(L.vocab_merge(shards, vocab), t)


@pytest.mark.parametrize("tp", TPS)
def test_swiglu_per_rank_gate_then_up(tp):
    gate, up = rnd(32, 4, seed=1), rnd(32, 4, seed=2)
    shards = [L.swiglu_split(gate, up, tp, r) for r in range(tp)]
    for r, s in enumerate(shards):
        n = 32 // tp
        assert torch.equal(s[:n], gate[r * n:(r + 1) * n]) and torch.equal(s[n:], up[r * n:(r + 1) * n])
    g2, u2 = L.swiglu_merge(shards)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    again = [L.swiglu_split(g2, u2, tp, r) for r in range(tp)]
    assert all(torch.equal(a, b) for a, b in zip(again, shards))


def tagged_qkvg(shape: AttnShape, hidden=3):
    """q/k/v/g whose column 0 says (kind, head, row-in-head), so the layout can be read off."""
    hd = shape.head_dim
    q = torch.zeros(shape.heads * hd, hidden)
    k = torch.zeros(shape.groups * hd, hidden)
    v = torch.zeros(shape.groups * hd, hidden)
    g = torch.zeros(shape.heads, hidden)
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


SHAPES = [AttnShape(64, 8, 4), AttnShape(96, 8, 4), AttnShape(8, 4, 16), AttnShape(12, 4, 16), AttnShape(8, 8, 2)]


@pytest.mark.parametrize("shape,tp", [(s, t) for s in SHAPES for t in TPS if s.groups % t == 0 and s.heads % t == 0])
def test_qkvg_layout_and_roundtrip(shape, tp):
    q, k, v, g = tagged_qkvg(shape)
    shards = [L.qkvg_split(q, k, v, g, shape, tp, r) for r in range(tp)]
    for r, s in enumerate(shards):
        assert s[:, 0].tolist() == expected_rank_rows(shape, tp, r)
        assert s.shape[0] == (shape.heads * shape.head_dim + 2 * shape.groups * shape.head_dim) // tp + shape.heads // tp
    back = L.qkvg_merge(shards, shape)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v, g)))
    again = [L.qkvg_split(*back, shape, tp, r) for r in range(tp)]
    assert all(torch.equal(a, b) for a, b in zip(again, shards))


def test_moving_a_gate_row_to_the_wrong_rank_is_caught():
    shape, tp = AttnShape(8, 4, 4), 2
    q, k, v, g = tagged_qkvg(shape)
    shards = [L.qkvg_split(q, k, v, g, shape, tp, r) for r in range(tp)]
    bad = [s.clone() for s in shards]
    bad[0][-1], bad[1][-1] = shards[1][-1], shards[0][-1]  # swap one gate row across ranks
    assert bad[0][:, 0].tolist() != expected_rank_rows(shape, tp, 0)
    # and the naive layout (an even chunk of [QKV; G], Megatron-Bridge's) is not Megatron's either
    naive = torch.cat([torch.cat([q.view(4, 2 * 4, 3), k.view(4, 4, 3), v.view(4, 4, 3)], 1).reshape(-1, 3), g]).chunk(tp)
    assert naive[0][:, 0].tolist() != expected_rank_rows(shape, tp, 0)
    _, _, _, g_back = L.qkvg_merge(bad, shape)
    assert not torch.equal(g_back, g)


def test_qkvg_rejects_wrong_row_count():
    shape = AttnShape(8, 4, 4)
    with pytest.raises(ValueError, match="expected"):
        L.qkvg_merge([torch.zeros(10, 3), torch.zeros(10, 3)], shape)


def test_expert_view_slices_lazily_like_a_2d_tensor():
    stack = rnd(4, 6, 5)
    ev = L.ExpertView(stack, 2)
    assert ev.shape == (6, 5)
    assert torch.equal(ev[1:3], stack[2, 1:3]) and torch.equal(ev[:, 2:4], stack[2, :, 2:4])


def test_every_table_kind_has_one_split_merge_pair():
    from stepconv.convert import TRANSFORMS
    from stepconv.mapping import RULES

    kinds = {r.kind for r in RULES} - {"extra", "sidecar"}
    assert kinds <= set(TRANSFORMS), kinds - set(TRANSFORMS)
