"""build_step35_model: state_dict names equal released megatron-core's GPTModel (local spec) per rank, and
every decoder layer equals a direct implementation of the spec's formulas written in this file."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_fixture
from stepconv.mcore.run import run_ranks


# ------------------------------------------------------------------------------------------ names

def _released_gptmodel(cfg: dict):
    """GPTModel exactly as released megatron-core builds it with the local spec."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_layer_local_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.transformer import TransformerConfig

    L = cfg["num_hidden_layers"]
    moe = {int(x) for x in cfg["moe_layers_enum"].split(",")}
    tp = ps.get_tensor_model_parallel_world_size()
    tc = TransformerConfig(
        num_layers=L, hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_attention_groups"], kv_channels=cfg["head_dim"],
        ffn_hidden_size=cfg["intermediate_size"], tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(), use_cpu_initialization=True,
        normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, num_moe_experts=cfg["moe_num_experts"], moe_router_topk=cfg["moe_top_k"],
        moe_ffn_hidden_size=cfg["moe_intermediate_size"], moe_shared_expert_intermediate_size=cfg["share_expert_dim"],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_layer_freq=[int(i in moe) for i in range(L)], mtp_num_layers=cfg["num_nextn_predict_layers"],
        moe_token_dispatcher_type="allgather", moe_router_dtype="fp32", params_dtype=torch.float32,
        pipeline_dtype=torch.float32)
    block = get_gpt_decoder_block_spec(tc, use_transformer_engine=False)
    mtp = get_gpt_mtp_block_spec(tc, get_gpt_layer_local_spec(qk_layernorm=True), use_transformer_engine=False)
    vocab = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    return GPTModel(config=tc, transformer_layer_spec=block, vocab_size=vocab, max_sequence_length=64,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False, mtp_block_spec=mtp,
                    pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def _describe(sd: dict) -> list:
    return [(k, None if v is None else (tuple(v.shape), str(v.dtype))) for k, v in sd.items()]


def _names_worker(cfg: dict) -> dict:
    from megatron.core import parallel_state as ps

    from stepconv.mcore.model import build_step35_model
    from stepconv.mcore.runtime import cpu_tensor_cuda_is_identity

    with cpu_tensor_cuda_is_identity():
        released = _describe(_released_gptmodel(cfg).state_dict())
    mine = _describe(build_step35_model(cfg).state_dict())
    return {"tp": ps.get_tensor_model_parallel_world_size(), "released": released, "mine": mine,
            "coords": (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                       ps.get_expert_model_parallel_rank())}


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 2, 2), (4, 1, 1)])
def test_state_dict_names_match_released_gptmodel(tp, pp, ep):
    cfg = make_fixture.tiny_config(uniform=True)
    nh = cfg["num_attention_heads"]
    results = run_ranks(_names_worker, cfg, tp=tp, pp=pp, ep=ep, start_method="forkserver")
    assert len({r["coords"] for r in results}) == tp * pp * ep
    for r in results:
        released, mine = r["released"], r["mine"]
        assert [k for k, _ in mine] == [k for k, _ in released]  # same keys, same order
        for (k, a), (_, b) in zip(mine, released):
            if a is None or b is None:
                assert a is None and b is None and k.endswith("._extra_state"), k
            elif k.endswith("self_attention.linear_qkv.weight"):
                assert a == ((b[0][0] + nh // tp, b[0][1]), b[1]), k  # + this rank's gate rows
            else:
                assert a == b, k
        assert any(k.endswith("mlp.router.expert_bias") and v[1] == "torch.float32" for k, v in mine) or \
            not any("router" in k for k, _ in mine)


# ------------------------------------------------------------------------------------------ one layer

def _layer_worker(cfg: dict, hf: dict, seq: int) -> dict:
    from megatron.core import parallel_state as ps

    from stepconv.mcore.model import build_step35_model
    from stepconv.mcore.testing import hf_to_mcore_rank_state_dicts

    tp = ps.get_tensor_model_parallel_world_size()
    sds = hf_to_mcore_rank_state_dicts(cfg, hf, tp=tp, dtype=torch.float32)
    model = build_step35_model(cfg, perform_initialization=False)
    model.load_state_dict(sds[(ps.get_tensor_model_parallel_rank(), 0, 0)], strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(7)
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        x = torch.randn(seq, 2, cfg["hidden_size"], generator=gen)
        with torch.no_grad():
            out[i] = (x, layer(hidden_states=x, attention_mask=None)[0])
    return out


def _norm(x, w, eps=1e-5):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())


def _inv_freq(cfg, i, rot):
    """RoPE frequencies of layer i over the rotary dim, llama3-scaled for yarn_only_types (spec 3.2.4)."""
    inv = [cfg["rope_theta"][i] ** (-2 * j / rot) for j in range(rot // 2)]
    if cfg["layer_types"][i] in cfg["yarn_only_types"]:
        s = cfg["rope_scaling"]
        fac, lo, hi, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        scaled = []
        for f in inv:
            wl = 2 * math.pi / f
            if wl < orig / hi:
                scaled.append(f)
            elif wl > orig / lo:
                scaled.append(f / fac)
            else:
                sm = (orig / wl - lo) / (hi - lo)
                scaled.append((1 - sm) * f / fac + sm * f)
        inv = scaled
    return torch.tensor(inv, dtype=torch.float64)


def _rope(x, inv):
    """x [b, s, heads, d]: rotate channel pairs (j, j + rot/2) of the first rot channels by angle t*inv_j."""
    rot = 2 * len(inv)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv[None]  # [s, rot/2]
    c, s_ = ang.cos().float()[None, :, None], ang.sin().float()[None, :, None]
    a, b = x[..., : rot // 2], x[..., rot // 2: rot]
    return torch.cat([a * c - b * s_, b * c + a * s_, x[..., rot:]], -1)


def _swiglu(x, wg, wu, wd, limit):
    g, u = F.silu(x @ wg.T), x @ wu.T
    if limit:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (g * u) @ wd.T


def formula_layer(cfg: dict, hf: dict, i: int, h: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Step-3.5 decoder layer i on h [b, s, H] (fp32), straight from the spec."""
    t = {k[len(f"model.layers.{i}."):]: v.float() for k, v in hf.items() if k.startswith(f"model.layers.{i}.")}
    other = cfg["attention_other_setting"]
    sliding = cfg["layer_types"][i] == other["attention_type"]
    nh = other["num_attention_heads"] if sliding else cfg["num_attention_heads"]
    ng, hd = cfg["num_attention_groups"], cfg["head_dim"]
    b, s, H = h.shape
    x = _norm(h, t["input_layernorm.weight"])
    q = _norm((x @ t["self_attn.q_proj.weight"].T).view(b, s, nh, hd), t["self_attn.q_norm.weight"])
    k = _norm((x @ t["self_attn.k_proj.weight"].T).view(b, s, ng, hd), t["self_attn.k_norm.weight"])
    v = (x @ t["self_attn.v_proj.weight"].T).view(b, s, ng, hd)
    inv = _inv_freq(cfg, i, int(hd * cfg["partial_rotary_factors"][i]))
    q, k = _rope(q, inv), _rope(k, inv)
    k, v = k.repeat_interleave(nh // ng, 2), v.repeat_interleave(nh // ng, 2)  # query head j uses group j // (nh/ng)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    tq, tk = torch.arange(s)[:, None], torch.arange(s)[None]
    allowed = tk <= tq
    if sliding:
        allowed &= tq - tk < cfg["sliding_window"]  # HF: the window counts the query itself
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v) * torch.sigmoid(x @ t["self_attn.g_proj.weight"].T)[..., None]
    h = h + o.reshape(b, s, nh * hd) @ t["self_attn.o_proj.weight"].T
    x = _norm(h, t["post_attention_layernorm.weight"])
    lim_sh = cfg["swiglu_limits_shared"][i] if clamp else 0
    moe = {int(j) for j in cfg["moe_layers_enum"].split(",")}
    if i not in moe:
        return h + _swiglu(x, t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"], lim_sh)
    lim = cfg["swiglu_limits"][i] if clamp else 0
    score = torch.sigmoid(x @ t["moe.gate.weight"].T)  # [b, s, E]
    top = torch.topk(score + t["moe.router_bias"], cfg["moe_top_k"], -1).indices  # bias only selects
    w = torch.gather(score, -1, top)
    w = w / w.sum(-1, keepdim=True) * cfg["moe_router_scaling_factor"]
    routed = torch.zeros_like(x)
    for e in range(cfg["moe_num_experts"]):
        we = (w * (top == e)).sum(-1, keepdim=True)
        routed = routed + we * _swiglu(x, t["moe.gate_proj.weight"][e], t["moe.up_proj.weight"][e],
                                       t["moe.down_proj.weight"][e], lim)
    shared = _swiglu(x, t["share_expert.gate_proj.weight"], t["share_expert.up_proj.weight"],
                     t["share_expert.down_proj.weight"], lim_sh)
    return h + routed + shared


@pytest.mark.parametrize("tp", [1, 2])
def test_each_layer_matches_spec_formula(fixture_dir, fixture_tensors, tp):
    import json

    cfg = json.loads((fixture_dir / "config.json").read_text())
    seq = 20  # > sliding_window (8)
    results = run_ranks(_layer_worker, cfg, fixture_tensors, seq, tp=tp, start_method="forkserver")
    for i, (x, y) in results[0].items():
        want = formula_layer(cfg, fixture_tensors, i, x.transpose(0, 1)).transpose(0, 1)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=2e-5, msg=f"layer {i}")
        if cfg["swiglu_limits"][i] or cfg["swiglu_limits_shared"][i]:  # the clamps bite on this input
            loose = formula_layer(cfg, fixture_tensors, i, x.transpose(0, 1), clamp=False).transpose(0, 1)
            assert (loose - y).abs().max() > 1e-2, f"layer {i}: clamp had no effect"
