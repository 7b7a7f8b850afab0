"""stepconv.mcore building blocks against formulas written here from the Step-3.5 architecture notes ("the
spec" below; section numbers are its). In-process, no torch.distributed."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from stepconv.config import StepconvError, padded_vocab_size
from stepconv.megatron_io import rank_dir_name, resolve_iteration
from stepconv.mcore import hfconfig
from stepconv.mcore.ckpt import as_rank_loader
from stepconv.mcore.testing import qkvg_rank_rows, write_mcore_checkpoint

modules = pytest.importorskip("stepconv.mcore.modules")


def real_config() -> dict:
    """Step-3.5-Flash's own config.json (spec 1.1): 45 layers + 3 MTP."""
    return json.loads((ROOT / "fixtures" / "step3p5-flash-config.json").read_text())


# ---------------------------------------------------------------------------------------- norms / MLP

def test_zero_centered_rmsnorm_formula():
    torch.manual_seed(0)
    norm = modules.Step35RMSNorm(None, hidden_size=32, eps=1e-5)
    assert list(norm.state_dict()) == ["weight"]
    x = torch.randn(5, 3, 32) * 3
    assert torch.allclose(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # w=0: gain 1
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(32))
    w = norm.weight.detach()
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 + w.double())
    assert torch.allclose(norm(x).double(), want, atol=1e-6, rtol=1e-6)
    # bf16 input: computed in fp32, cast back once
    xb = x.bfloat16()
    xf = xb.float()
    want_b = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * (w.float() + 1)).bfloat16()
    assert norm(xb).dtype == torch.bfloat16 and torch.equal(norm(xb), want_b)


def test_swiglu_clamp_is_after_silu():
    torch.manual_seed(0)
    g, u = torch.randn(7, 40) * 6, torch.randn(7, 40) * 6
    for L in (0.0, 0.5, 7.0):
        act = modules.Step35SwiGLU(limit=L)
        got = act(torch.cat([g, u], -1))
        want = F.silu(g) * u if L == 0 else torch.minimum(F.silu(g), torch.tensor(L)) * u.clamp(-L, L)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), L  # (SiLU on a strided chunk: ulp-level)
    # megatron-core's activation_func_clamp_value clamps before the SiLU: a different function
    g1, u1 = torch.tensor([[10.0]]), torch.tensor([[1.0]])
    after = modules.Step35SwiGLU(limit=7.0)(torch.cat([g1, u1], -1))
    before = F.silu(g1.clamp(max=7.0)) * u1.clamp(-7.0, 7.0)
    assert after.item() == 7.0 and abs(before.item() - 7.0) > 1e-3


# ---------------------------------------------------------------------------------------- RoPE

def _llama3_spec(inv, factor, low, high, orig):
    """spec 3.2.4 / HF _compute_llama3_parameters, written out per frequency."""
    out = []
    for f in inv.tolist():
        wl = 2 * math.pi / f
        if wl < orig / high:
            out.append(f)
        elif wl > orig / low:
            out.append(f / factor)
        else:
            s = (orig / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out)


def test_rope_frequencies_per_layer_real_config():
    cfg = real_config()
    full, sliding = hfconfig.layer_info(cfg, 0), hfconfig.layer_info(cfg, 1)
    assert (full.rotary_dim, full.rope_theta, full.rope_scaling is not None) == (64, 5e6, True)
    assert (sliding.rotary_dim, sliding.rope_theta, sliding.rope_scaling) == (128, 1e4, None)
    inv_s = hfconfig.rope_inv_freq(sliding).double()
    j = torch.arange(64, dtype=torch.float64)
    assert torch.allclose(inv_s, 1e4 ** (-2 * j / 128), rtol=1e-6)
    base = 5e6 ** (-2 * torch.arange(32, dtype=torch.float64) / 64)
    inv_f = hfconfig.rope_inv_freq(full).double()
    assert torch.allclose(inv_f, _llama3_spec(base, 2.0, 1.0, 32.0, 131072).double(), rtol=1e-5)
    ratio = base / inv_f  # spec: j 0..13 unchanged, 14..20 interpolated (1.14 -> 1.98), 21..31 / 2
    assert torch.allclose(ratio[:14], torch.ones(14, dtype=torch.float64), atol=1e-5)
    assert 1.10 < ratio[14] < 1.2 and 1.95 < ratio[20] < 2.0 and torch.all(ratio[14:21] > 1.05)
    assert torch.allclose(ratio[21:], torch.full((11,), 2.0, dtype=torch.float64), rtol=1e-5)


def test_partial_rotate_half():
    torch.manual_seed(0)
    s, hd, rot = 6, 16, 8
    info = hfconfig.Step35LayerInfo(0, False, "full_attention", 2, 1, hd, 5e6, rot, None, None, False, 0, 0)
    freqs = hfconfig.rope_freqs(info, torch.arange(s))[:, None, None, :]
    x = torch.randn(s, 1, 2, hd)
    y = modules.apply_rotary_neox(x, freqs)
    assert torch.equal(y[..., rot:], x[..., rot:])  # pass-through channels
    inv = 5e6 ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    for t in range(s):
        for j in range(rot // 2):  # NeoX pairs (j, j + rot/2) rotate by t * inv_j
            a, b = x[t, 0, :, j].double(), x[t, 0, :, j + rot // 2].double()
            c, sn = math.cos(t * inv[j]), math.sin(t * inv[j])
            assert torch.allclose(y[t, 0, :, j].double(), a * c - b * sn, atol=1e-5)
            assert torch.allclose(y[t, 0, :, j + rot // 2].double(), b * c + a * sn, atol=1e-5)


def test_window_conventions():
    cfg = real_config()
    hf, mg = hfconfig.layer_info(cfg, 1, "hf"), hfconfig.layer_info(cfg, 1, "megatron")
    assert (hf.window_keys, mg.window_keys) == (512, 513)
    assert hfconfig.layer_info(cfg, 0).window_keys is None
    m = hfconfig.window_mask(10, 10, 3)  # True = masked; query t sees t-2..t (3 keys incl. itself)
    for t in range(10):
        assert [k for k in range(10) if not m[t, k]] == list(range(max(0, t - 2), t + 1))
    m = hfconfig.window_mask(4, 10, None)  # the last 4 of 10 positions, causal
    assert [int((~m[i]).sum()) for i in range(4)] == [7, 8, 9, 10]


# ---------------------------------------------------------------------------------------- config parsing

def test_layer_infos_real_config():
    cfg = real_config()
    infos = hfconfig.all_layer_infos(cfg)
    assert len(infos) == 48
    assert [i.num_heads for i in infos[:5]] == [64, 96, 96, 96, 64]
    assert all((i.num_groups, i.head_dim) == (8, 128) for i in infos)
    assert [i.index for i in infos if i.is_moe] == list(range(3, 45))
    assert [(i.index, i.swiglu_limit) for i in infos if i.swiglu_limit] == [(43, 7.0), (44, 7.0)]
    assert [(i.index, i.swiglu_limit_shared) for i in infos if i.swiglu_limit_shared] == [(44, 16.0)]
    for i in infos[45:]:  # MTP: dense sliding layers
        assert i.is_mtp and not i.is_moe and i.layer_type == "sliding_attention" and i.num_heads == 96
    assert padded_vocab_size(128896, 8) == 129024 and padded_vocab_size(1100, 4) == 1536


def test_qkvg_rank_rows_layout():
    nh, ng, hd, tp = 12, 4, 2, 2
    tag = lambda base, n: torch.arange(base, base + n, dtype=torch.float32)[:, None]  # noqa: E731
    q, k, v, g = tag(1000, nh * hd), tag(2000, ng * hd), tag(3000, ng * hd), tag(4000, nh)
    rows = [qkvg_rank_rows(q, k, v, g, nh, ng, hd, tp, r)[:, 0].int().tolist() for r in range(tp)]
    hpg = nh // ng
    for r in range(tp):
        want = []
        for grp in range(r * ng // tp, (r + 1) * ng // tp):
            want += list(range(1000 + grp * hpg * hd, 1000 + (grp + 1) * hpg * hd))
            want += list(range(2000 + grp * hd, 2000 + (grp + 1) * hd))
            want += list(range(3000 + grp * hd, 3000 + (grp + 1) * hd))
        want += list(range(4000 + r * nh // tp, 4000 + (r + 1) * nh // tp))
        assert rows[r] == want
    from stepconv.config import AttnShape  # the converter's own splitter must agree
    from stepconv.kinds import QKVG_, SplitContext

    for r in range(tp):
        assert QKVG_.split([q, k, v, g], SplitContext(tp, AttnShape(nh, ng, hd)), r)[:, 0].int().tolist() == rows[r]


def test_build_transformer_config_real_config_and_refusals():
    from stepconv.mcore.model import build_transformer_config

    cfg = real_config()
    tc = build_transformer_config(cfg, tp=1, pp=1, ep=1)
    assert (tc.num_layers, tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (45, 64, 8, 128)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_router_score_function) == (288, 8, "sigmoid")
    assert (tc.moe_router_enable_expert_bias, tc.moe_router_topk_scaling_factor, tc.moe_router_dtype) == \
        (True, 3.0, "fp32")
    assert tc.moe_layer_freq == [0, 0, 0] + [1] * 42 and tc.mtp_num_layers == 3
    # absent keys take Step35Config's defaults (softmax router), which this model refuses rather than
    # silently assuming sigmoid
    for change in ({"moe_router_activation": None}, {"moe_router_activation": "softmax"}, {"moe_top_k": 1},
                   {"use_moe_router_bias": False}, {"norm_expert_weight": False}, {"att_impl_type": "MFA"},
                   {"sink": True}, {"tie_word_embeddings": True}):
        bad = {k: v for k, v in {**cfg, **change}.items() if v is not None}
        with pytest.raises(NotImplementedError):
            build_transformer_config(bad, tp=1, pp=1, ep=1)
    # a dense model has no router: its options are not checked
    dense = {k: v for k, v in cfg.items() if not k.startswith(("moe_", "use_moe"))} | {"num_nextn_predict_layers": 0}
    assert build_transformer_config(dense, tp=1, pp=1, ep=1).num_moe_experts is None


def test_rank_dir_names_and_iteration_folders(tmp_path):
    """The runner names rank folders and finds the iteration folder through stepconv.megatron_io."""
    assert rank_dir_name(1, 2, 3, 4, 8) == "mp_rank_01_002_003"
    assert rank_dir_name(1, 0, 3, 1, 8) == "mp_rank_01_003"
    assert rank_dir_name(0, 1, 0, 2, 1) == "mp_rank_00_001"
    sds = {(r, p, 0): {"who": torch.tensor([r, p])} for r in range(2) for p in range(2)}
    write_mcore_checkpoint(tmp_path, sds, tp=2, pp=2, ep=1)  # release/ + tracker
    (tmp_path / "iter_0000007").mkdir()
    for path in (tmp_path, tmp_path / "release"):  # the root (tracker) and the iteration folder itself
        assert resolve_iteration(path).path == tmp_path / "release"
        load = as_rank_loader(path, pp=2, ep=1)
        assert [load(r, p, 0)["who"].tolist() for r in range(2) for p in range(2)] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert resolve_iteration(tmp_path).path == tmp_path / "iter_0000007"
    (tmp_path / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(StepconvError):  # a root needs its tracker
        as_rank_loader(tmp_path, pp=2, ep=1)
