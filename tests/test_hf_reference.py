"""The Step3p7-based HF reference (stepconv.hf_reference) against an independent plain-torch
implementation of the Step-3.5 spec formulas (the Step-3.5 architecture spec, sections 3-5)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stepconv.hf_reference import load_hf_reference  # noqa: E402

FIXTURE = ROOT / "fixtures" / "tiny-step35"
SEQ = 24  # > 2 x sliding_window (8)


# ------------------------------------------------------------------ independent spec implementation


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    w = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        w.update({k: v.float() for k, v in load_file(str(f)).items()})
    return w


def spec_forward(cfg: dict, W: dict[str, torch.Tensor], ids: torch.Tensor, bug: str | None = None) -> dict:
    """Step-3.5 forward written directly from the spec. `bug` injects one deliberate deviation."""
    H, L, eps = cfg["hidden_size"], cfg["num_hidden_layers"], 1e-5
    moe_layers = {int(x) for x in cfg["moe_layers_enum"].split(",")}
    other = cfg["attention_other_setting"]

    def rms(x, w):  # zero-centred: x * rsqrt(mean(x^2) + eps) * (1 + w), fp32
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((0.0 if bug == "norm_no_plus1" else 1.0) + w)

    def inv_freq(i, rot):
        theta = cfg["rope_theta"][i]
        inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
        rs = cfg["rope_scaling"]
        if cfg["layer_types"][i] in cfg["yarn_only_types"] and bug != "no_llama3":
            fac, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], \
                rs["original_max_position_embeddings"]
            out = []
            for f in inv.tolist():
                wl = 2 * math.pi / f
                if wl < old / hi:
                    out.append(f)
                elif wl > old / lo:
                    out.append(f / fac)
                else:
                    s = (old / wl - lo) / (hi - lo)
                    out.append((1 - s) * f / fac + s * f)
            inv = torch.tensor(out, dtype=torch.float64)
        return inv

    def rope(x, i):  # x [B, S, n, hd]; NeoX rotate-half on the first `rot` channels, rest passes through
        hd = x.shape[-1]
        rot = int(hd * cfg["partial_rotary_factors"][i])
        if bug == "rope_full_dim":
            rot = hd
        ang = (torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv_freq(i, rot)[None]).float()
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x1, x2, rest = x[..., : rot // 2], x[..., rot // 2: rot], x[..., rot:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)

    def attention(x, p, i):
        sliding = cfg["layer_types"][i] == other["attention_type"]
        nh = other["num_attention_heads"] if sliding else cfg["num_attention_heads"]
        ng, hd = cfg["num_attention_groups"], cfg["head_dim"]
        B, S, _ = x.shape
        q = rms((x @ W[p + "self_attn.q_proj.weight"].T).view(B, S, nh, hd), W[p + "self_attn.q_norm.weight"])
        k = rms((x @ W[p + "self_attn.k_proj.weight"].T).view(B, S, ng, hd), W[p + "self_attn.k_norm.weight"])
        v = (x @ W[p + "self_attn.v_proj.weight"].T).view(B, S, ng, hd)
        q, k = rope(q, i), rope(k, i)
        rep = nh // ng  # q head h reads kv group h // rep
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        qi, ki = torch.arange(S)[:, None], torch.arange(S)[None]
        allowed = ki <= qi
        if sliding:  # HF semantics: `sliding_window` keys including the current one
            window = cfg["sliding_window"] + (1 if bug == "window_plus1" else 0)
            allowed = allowed & (qi - ki < window)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", probs, v)
        gate = torch.sigmoid(x @ W[p + "self_attn.g_proj.weight"].T)  # [B, S, nh], reads the attention input
        o = (o * gate[..., None]).reshape(B, S, nh * hd)
        return o @ W[p + "self_attn.o_proj.weight"].T

    def swiglu(x, wg, wu, wd, limit):
        g, u = x @ wg.T, x @ wu.T
        if limit and bug == "clamp_before_silu":
            g = g.clamp(max=limit)
        g = F.silu(g)
        if limit and bug != "clamp_before_silu":
            g = g.clamp(max=limit)  # min(silu(g), L)
        if limit:
            u = u.clamp(-limit, limit)
        return (g * u) @ wd.T

    def ffn(x, p, i):
        if i not in moe_layers:  # dense layers read swiglu_limits_shared
            lim = (cfg["swiglu_limits"] if bug == "dense_routed_limit" else cfg["swiglu_limits_shared"])[i]
            return swiglu(x, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"],
                          W[p + "mlp.down_proj.weight"], lim)
        shared = swiglu(x, W[p + "share_expert.gate_proj.weight"], W[p + "share_expert.up_proj.weight"],
                        W[p + "share_expert.down_proj.weight"], cfg["swiglu_limits_shared"][i])
        flat = x.reshape(-1, H)
        prob = torch.sigmoid(flat @ W[p + "moe.gate.weight"].T)  # fp32 sigmoid router
        idx = torch.topk(prob + W[p + "moe.router_bias"], cfg["moe_top_k"], dim=-1).indices  # bias: selection only
        wts = (prob + W[p + "moe.router_bias"] if bug == "biased_weights" else prob).gather(1, idx)
        wts = wts / wts.sum(-1, keepdim=True) * cfg["moe_router_scaling_factor"]
        routed = torch.zeros_like(flat)
        for e in range(cfg["moe_num_experts"]):
            y = swiglu(flat, W[p + "moe.gate_proj.weight"][e], W[p + "moe.up_proj.weight"][e],
                       W[p + "moe.down_proj.weight"][e], cfg["swiglu_limits"][i])
            routed += y * (wts * (idx == e)).sum(-1, keepdim=True)
        return routed.view_as(x) + shared

    def block(h, i):
        p = f"model.layers.{i}."
        h = h + attention(rms(h, W[p + "input_layernorm.weight"]), p, i)
        return h + ffn(rms(h, W[p + "post_attention_layernorm.weight"]), p, i)

    emb = W["model.embed_tokens.weight"]
    h = emb[ids]
    hidden = [h]
    for i in range(L):
        h = block(h, i)
        hidden.append(h)
    logits = rms(h, W["model.norm.weight"]) @ W["lm_head.weight"].T

    mtp_logits, mtp_hidden = [], []
    hp = rms(h, W["model.norm.weight"]) if bug == "mtp_postnorm_input" else h
    S = ids.shape[1]
    for k in range(cfg["num_nextn_predict_layers"]):
        i, n = L + k, S - k - 1
        p = f"model.layers.{i}."
        e = rms(emb[ids[:, k + 1:]], W[p + "enorm.weight"])
        hh = rms(hp[:, :n], W[p + "hnorm.weight"])
        z = torch.cat([hh, e] if bug == "mtp_swap_concat" else [e, hh], -1) @ W[p + "eh_proj.weight"].T
        z = block(z, i)
        mtp_hidden.append(z)
        mtp_logits.append(rms(z, W[p + "transformer.shared_head.norm.weight"])
                          @ W[p + "transformer.shared_head.output.weight"].T)
        hp = z
    return {"logits": logits, "hidden_states": hidden, "mtp_logits": mtp_logits, "mtp_hidden": mtp_hidden}


def max_diff(a: dict, b: dict) -> float:
    d = [(a["logits"] - b["logits"]).abs().max()]
    for key in ("hidden_states", "mtp_logits", "mtp_hidden"):
        assert len(a[key]) == len(b[key])
        d += [(x - y).abs().max() for x, y in zip(a[key], b[key])]
    return max(float(x) for x in d)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cfg():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def weights():
    return _weights(FIXTURE)


@pytest.fixture(scope="module")
def ids(cfg):
    return torch.randint(0, cfg["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="module")
def ref():
    return load_hf_reference(FIXTURE)


@pytest.fixture(scope="module")
def ref_out(ref, ids):
    return ref.forward(ids)


@pytest.fixture(scope="module")
def spec_out(cfg, weights, ids):
    return spec_forward(cfg, weights, ids)


# ------------------------------------------------------------------ tests


def test_shapes_and_dtypes(ref_out, cfg):
    B, S, H, V = 2, SEQ, cfg["hidden_size"], cfg["vocab_size"]
    assert ref_out["logits"].shape == (B, S, V) and ref_out["logits"].dtype == torch.float32
    assert len(ref_out["hidden_states"]) == cfg["num_hidden_layers"] + 1
    assert all(h.shape == (B, S, H) for h in ref_out["hidden_states"])
    n_mtp = cfg["num_nextn_predict_layers"]
    assert [t.shape for t in ref_out["mtp_logits"]] == [(B, S - k - 1, V) for k in range(n_mtp)]
    assert [t.shape for t in ref_out["mtp_hidden"]] == [(B, S - k - 1, H) for k in range(n_mtp)]


def test_model_structure(ref, cfg):
    layers = ref.model.layers
    assert ref.model.config._attn_implementation == "eager"
    heads = [layer.self_attn.num_heads for layer in layers]
    assert heads == [8, 12, 12, 12]
    assert [layer.self_attn.sliding_window for layer in layers] == [None, 8, 8, 8]
    assert ref.mtp[0].self_attn.num_heads == 12 and ref.mtp[0].self_attn.sliding_window == 8
    assert type(ref.mtp[0].mlp).__name__ == "Step3p7MLP"  # MTP layers are dense
    assert [type(layer.mlp).__name__ for layer in layers] == ["Step3p7MLP"] * 2 + ["Step3p7SparseMoeBlock"] * 2


@pytest.mark.parametrize("key", ["logits", "hidden_states", "mtp_logits", "mtp_hidden"])
def test_matches_spec_fp32(ref_out, spec_out, key):
    a, b = ref_out[key], spec_out[key]
    for x, y in (zip(a, b) if isinstance(a, list) else [(a, b)]):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def test_clamps_and_routing_are_exercised(cfg, weights, ids, spec_out):
    """The fixture must make the spec details matter; otherwise the comparison proves little."""
    # routed clamp (layer 3), shared clamp (layer 3) and dense clamp (layer 1) actually bite
    no_clamp = dict(cfg, swiglu_limits=[0.0] * 5, swiglu_limits_shared=[0.0] * 5)
    assert max_diff(spec_forward(no_clamp, weights, ids), spec_out) > 1e-2


BUGS = ["norm_no_plus1", "clamp_before_silu", "window_plus1", "no_llama3", "rope_full_dim", "biased_weights",
        "dense_routed_limit", "mtp_postnorm_input", "mtp_swap_concat"]


@pytest.mark.parametrize("bug", BUGS)
def test_negative_control(ref_out, cfg, weights, ids, bug):
    """A one-detail deviation from the spec breaks the comparison (the check is sensitive)."""
    assert max_diff(ref_out, spec_forward(cfg, weights, ids, bug=bug)) > 1e-3


def test_bf16(ref_out, cfg):
    ref16 = load_hf_reference(FIXTURE, dtype=torch.bfloat16)
    layer = ref16.model.layers[2]
    assert layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert layer.mlp.gate.weight.dtype == torch.float32  # need_fp32_gate
    ids = torch.randint(0, cfg["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1234))
    out = ref16.forward(ids)
    assert out["logits"].dtype == torch.float32 and out["hidden_states"][1].dtype == torch.bfloat16
    # bf16 noise can flip a near-tied routing choice, which then spreads through the window, so compare
    # robustly and relative to the logits' scale: median per-position error, and cosine.
    from stepconv.verify import compare_logits

    for key in ("logits", "mtp_logits"):
        a, b = (out[key], ref_out[key]) if key == "logits" else (out[key][0], ref_out[key][0])
        per_pos = (a - b).abs().amax(-1)
        assert per_pos.median() < 0.02 * b.abs().max(), per_pos
        assert compare_logits(b, a).cosine > 0.999


def _copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, dst)
    return dst


def _edit_checkpoint(ckpt: Path, shard: str, edit) -> None:
    """Apply edit(tensors) to one shard and keep the index in step, so the folder stays valid."""
    t = load_file(str(ckpt / shard))
    edit(t)
    save_file(t, str(ckpt / shard))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard} | dict.fromkeys(t, shard)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_strict_load_missing_tensor(tmp_path):
    ckpt = _copy_fixture(tmp_path)
    _edit_checkpoint(ckpt, "model-00002-of-00002.safetensors", lambda t: t.pop("model.layers.3.moe.router_bias"))
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.gate\.e_score_correction_bias"):
        load_hf_reference(ckpt)


def test_strict_load_missing_fused_half(tmp_path):
    """gate_up_proj is built from both stacks; one alone is an error naming the absent one, not a half tensor."""
    ckpt = _copy_fixture(tmp_path)
    _edit_checkpoint(ckpt, "model-00002-of-00002.safetensors", lambda t: t.pop("model.layers.3.moe.up_proj.weight"))
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.experts\.gate_up_proj has .*moe\.gate_proj.* but no "
                                         r"tensor for \['moe\.up_proj\.weight'\]"):
        load_hf_reference(ckpt)


def test_strict_load_leftover_tensor(tmp_path):
    ckpt = _copy_fixture(tmp_path)

    def add(t):
        t["model.layers.1.self_attn.unknown.weight"] = torch.zeros(3)
        t["model.layers.7.mlp.gate_proj.weight"] = torch.zeros(3)  # beyond the MTP layers

    _edit_checkpoint(ckpt, "model-00001-of-00002.safetensors", add)
    with pytest.raises(ValueError) as err:
        load_hf_reference(ckpt)
    assert "model.layers.1.self_attn.unknown.weight" in str(err.value)
    assert "model.layers.7.mlp.gate_proj.weight" in str(err.value)


def test_two_mtp_layers_chain(tmp_path):
    """k > 0: MTP layer k reads the previous MTP block output (pre shared_head.norm) and token t+k+1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixture", ROOT / "fixtures" / "make_fixture.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    ckpt = mf.make_checkpoint(tmp_path / "mtp2", mtp_layers=2, seed=3)
    cfg = json.loads((ckpt / "config.json").read_text())
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(7))
    out = load_hf_reference(ckpt).forward(ids)
    assert [t.shape[1] for t in out["mtp_logits"]] == [19, 18]
    assert max_diff(out, spec_forward(cfg, _weights(ckpt), ids)) < 2e-5


def test_rope_parameters_follow_yarn_only_types(cfg):
    from stepconv.hf_reference import build_text_config

    rp = build_text_config(dict(cfg, yarn_only_types=["sliding_attention"])).rope_parameters
    assert rp["sliding_attention"]["rope_type"] == "llama3" and rp["full_attention"]["rope_type"] == "default"
    assert rp["full_attention"]["partial_rotary_factor"] == 0.5 and rp["full_attention"]["rope_theta"] == 5e6
    bad = dict(cfg, rope_theta=[5e6, 1e4, 2e4, 1e4, 1e4])  # two sliding layers disagree
    with pytest.raises(NotImplementedError, match="layer 2"):
        build_text_config(bad)


@pytest.mark.parametrize("dropped, name", [
    ("router_bias", "model.layers.2.moe.router_bias"),
    ("share_expert", "model.layers.2.share_expert.up_proj.weight"),
    ("moe.gate_proj", "model.layers.3.moe.gate_proj.weight"),
])
def test_renames_come_from_transformers(monkeypatch, dropped, name):
    """Negative control: without one transform of transformers' Step3p7 conversion mapping the strict load fails
    on the names it renames, so stepconv keeps no second table of these renames."""
    import stepconv.hf_reference as hf_reference

    real = hf_reference.get_checkpoint_conversion_mapping

    def without(model_type):
        return [t for t in real(model_type) if not any(dropped in p for p in t.source_patterns)]

    monkeypatch.setattr(hf_reference, "get_checkpoint_conversion_mapping", without)
    with pytest.raises(ValueError, match="no Step3p7 destination") as err:
        load_hf_reference(FIXTURE)
    assert name in str(err.value)


def test_absent_keys_take_step35config_defaults(cfg):
    """Keys absent from config.json take Step35Config's defaults, not Step3p7TextConfig's own (top-k 8, MoE from
    layer 3, rope_scaling on full-attention layers)."""
    from stepconv.config import Step35Config
    from stepconv.hf_reference import build_text_config

    bare = {k: v for k, v in cfg.items() if k not in ("moe_top_k", "moe_layers_enum", "yarn_only_types")}
    text = build_text_config(bare)
    assert text.num_experts_per_tok == Step35Config.of(bare).top_k == 4
    assert text.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"]  # Step35Config's fallback: layers 1..L-1
    assert [p["rope_type"] for p in text.rope_parameters.values()] == ["default", "default"]  # no type scaled
