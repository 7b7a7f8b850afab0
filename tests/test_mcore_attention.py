"""Head-wise gated attention (megatron-core dev ``head_wise_attn_gate`` semantics) at TP 1 and 2.

Step has no qkv bias, so the gate pre-activation is set through the gate weight rows: every row is zero
except column 0, and the input's channel 0 is constant 1, so each head's pre-activation is exactly the
value put in column 0 (0, +1e4 or -1e4: sigmoid 0.5, 1, 0 exactly in fp32). The output must then be
exactly 0.5x, 1x, 0x of the same attention with the gate removed. A per-head pattern checks that gate
row i of TP rank r gates global head r*nh/tp + i (a slice landing on q/k/v rows would not pass).
"""

import pytest
import torch

from conftest import make_fixture
from stepconv.mcore.run import run_ranks

S, B = 12, 2
GATES = {"zero": 0.0, "pos": 1e4, "neg": -1e4}


def _gate_worker(cfg: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType

    from stepconv.mcore import hfconfig, modules
    from stepconv.mcore.model import build_transformer_config, layer_transformer_config
    from stepconv.mcore.testing import qkvg_rank_rows

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    base = build_transformer_config(cfg)
    H = cfg["hidden_size"]
    results = {"native": modules.native_head_wise_gate_available()}
    for li in (0, 1):  # full attention (8 heads, partial RoPE + llama3), sliding (12 heads, window 8)
        info = hfconfig.layer_info(cfg, li)
        nh, ng, hd = info.num_heads, info.num_groups, info.head_dim
        np_ = nh // tp
        attn = modules.Step35SelfAttention(
            layer_transformer_config(base, info),
            SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=modules.Step35CoreAttention,
                                    linear_proj=RowParallelLinear, q_layernorm=modules.Step35RMSNorm,
                                    k_layernorm=modules.Step35RMSNorm),
            layer_number=li + 1, attn_mask_type=AttnMaskType.causal, step_layer=info).eval()
        gen = torch.Generator().manual_seed(100 + li)
        q, k, v = (torch.randn(n * hd, H, generator=gen) / 8 for n in (nh, ng, ng))
        o = torch.randn(H, nh * hd, generator=gen) / 8
        x = torch.randn(S, B, H, generator=gen)
        x[..., 0] = 1.0  # constant input channel carries the gate pre-activation
        with torch.no_grad():
            attn.q_layernorm.weight.copy_(0.2 * torch.randn(hd, generator=gen))
            attn.k_layernorm.weight.copy_(0.2 * torch.randn(hd, generator=gen))
            attn.linear_proj.weight.copy_(torch.chunk(o, tp, dim=1)[r])

        seen = {}
        orig = modules.apply_head_wise_gate

        def capture(out, gate):
            seen["core"], seen["gate"] = out.detach().clone(), gate.detach().clone()
            return orig(out, gate)

        def run(col0: torch.Tensor, gated: bool = True):
            gw = torch.zeros(nh, H)
            gw[:, 0] = col0
            with torch.no_grad():
                attn.linear_qkv.weight.copy_(qkvg_rank_rows(q, k, v, gw, nh, ng, hd, tp, r))
            modules.apply_head_wise_gate = capture if gated else (lambda out, gate: out)
            try:
                with torch.no_grad():
                    return attn(x, None)[0]
            finally:
                modules.apply_head_wise_gate = orig

        res = {"ungated": run(torch.zeros(nh), gated=False)}
        for name, c in GATES.items():
            res[name] = run(torch.full((nh,), c))
            res[name + "_gate_ok"] = bool(torch.all(seen["gate"] == c))
        pattern = torch.tensor([1e4 if h % 3 == 0 else -1e4 for h in range(nh)])  # keep heads 0, 3, 6, ...
        res["mixed"] = run(pattern)
        res["mixed_gate_ok"] = bool(torch.equal(seen["gate"], pattern[r * np_:(r + 1) * np_].expand(S, B, np_)))
        keep = (pattern[r * np_:(r + 1) * np_] > 0).float()
        core = seen["core"].view(S, B, np_, hd) * keep[:, None]
        with torch.no_grad():
            res["mixed_expected"] = attn.linear_proj(core.view(S, B, np_ * hd))[0]
        res["qkv_rows"] = attn.linear_qkv.weight.shape[0]
        results[li] = res
    return results


@pytest.fixture(scope="module")
def runs():
    cfg = make_fixture.tiny_config()
    return {tp: run_ranks(_gate_worker, cfg, tp=tp, start_method="forkserver") for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layer", [0, 1])
def test_saturated_gates_scale_exactly(runs, tp, layer):
    for rank_result in runs[tp]:
        if rank_result["native"]:
            pytest.skip("installed megatron-core has the native head_wise_attn_gate")
        res = rank_result[layer]
        ref = res["ungated"]
        assert ref.abs().max() > 0.1
        assert torch.equal(res["zero"], 0.5 * ref)
        assert torch.equal(res["pos"], ref)
        assert torch.equal(res["neg"], torch.zeros_like(ref))
        assert res["zero_gate_ok"] and res["pos_gate_ok"] and res["neg_gate_ok"]
        assert res["mixed_gate_ok"]
        assert torch.equal(res["mixed"], res["mixed_expected"])


@pytest.mark.parametrize("layer,heads", [(0, 8), (1, 12)])
def test_linear_qkv_rows_and_tp_consistency(runs, layer, heads):
    groups, hd = 4, 16
    for tp in (1, 2):
        for rank_result in runs[tp]:
            assert rank_result[layer]["qkv_rows"] == (heads * hd + 2 * groups * hd) // tp + heads // tp
    for name in ("ungated", "zero", "mixed"):
        torch.testing.assert_close(runs[2][0][layer][name], runs[1][0][layer][name], rtol=1e-5, atol=1e-5)
