"""Test oracles for stepconv.mcore (pure torch, no megatron imports).

- ``reference_forward``: the HF Step-3.5 forward written directly from the Step-3.5 architecture notes,
  for small models.
- ``hf_to_mcore_rank_state_dicts``: HF tensors -> per-rank megatron state dicts in the layout
  ``build_step35_model`` expects (legacy ``mp_rank_*`` files), built here independently of
  ``stepconv.kinds`` on purpose (the tests' second opinion on the converter). Test scaffolding; the
  production converter is ``stepconv.convert``.
- ``write_mcore_checkpoint``: write those as ``<dir>/release/mp_rank_*/model_optim_rng.pt``.

Config facts (shapes, MoE layers, router options) are read through ``stepconv.config.Step35Config``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import Step35Config
from ..megatron_io import CHECKPOINT_VERSION, RANK_FILE, TRACKER, rank_dir_name
from . import hfconfig


# ----------------------------------------------------------------------------------------------
# Reference forward (HF semantics)
# ----------------------------------------------------------------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (w.float() + 1)).to(dtype)


def _swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    g = F.silu(g)
    if limit:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    return g * u


def _rope(x: torch.Tensor, info: hfconfig.Step35LayerInfo) -> torch.Tensor:
    """x: [b, heads, s, d]."""
    rd = info.rotary_dim
    if rd == 0:
        return x
    s = x.shape[2]
    inv = hfconfig.rope_inv_freq(info, device=x.device)
    pos = torch.arange(s, device=x.device, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rot = torch.cat((-x2, x1), -1)
    return torch.cat((xr * cos + rot * sin, xp), -1)


def reference_layer(h: torch.Tensor, t: dict, cfg: Step35Config | dict, info: hfconfig.Step35LayerInfo
                    ) -> torch.Tensor:
    """One HF Step3p5DecoderLayer on h [b, s, H]; ``t`` maps names relative to ``model.layers.{i}.``."""
    cfg = Step35Config.of(cfg)
    eps = cfg.eps
    b, s, H = h.shape
    nh, ng, hd = info.num_heads, info.num_groups, info.head_dim
    x = _rms(h, t["input_layernorm.weight"], eps)
    q = (x @ t["self_attn.q_proj.weight"].T).view(b, s, nh, hd)
    k = (x @ t["self_attn.k_proj.weight"].T).view(b, s, ng, hd)
    v = (x @ t["self_attn.v_proj.weight"].T).view(b, s, ng, hd)
    g = x @ t["self_attn.g_proj.weight"].T  # [b, s, nh]
    q = _rms(q, t["self_attn.q_norm.weight"], eps).transpose(1, 2)
    k = _rms(k, t["self_attn.k_norm.weight"], eps).transpose(1, 2)
    v = v.transpose(1, 2)
    q, k = _rope(q, info), _rope(k, info)
    k = k.repeat_interleave(nh // ng, dim=1)
    v = v.repeat_interleave(nh // ng, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    scores = scores.masked_fill(hfconfig.window_mask(s, s, info.window_keys), float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = (p @ v).transpose(1, 2)  # [b, s, nh, hd]
    o = o * torch.sigmoid(g.float()).to(o.dtype).unsqueeze(-1)
    h = h + o.reshape(b, s, nh * hd) @ t["self_attn.o_proj.weight"].T
    x = _rms(h, t["post_attention_layernorm.weight"], eps)
    if info.is_moe:
        E, topk = cfg.num_experts, cfg.top_k
        xf = x.reshape(-1, H)
        logits = xf.float() @ t["moe.gate.weight"].float().T
        probs = torch.sigmoid(logits)
        _, idx = torch.topk(probs + t["moe.router_bias"].float(), topk, dim=-1)
        w = torch.gather(probs, 1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * cfg.router_scaling
        out = torch.zeros_like(xf, dtype=torch.float32)
        for e in range(E):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = xf[rows].float()
            y = _swiglu(xe @ t["moe.gate_proj.weight"][e].float().T, xe @ t["moe.up_proj.weight"][e].float().T,
                        info.swiglu_limit) @ t["moe.down_proj.weight"][e].float().T
            out.index_add_(0, rows, y * w[rows, slot, None])
        ffn = out.to(x.dtype).view(b, s, H)
        if "share_expert.gate_proj.weight" in t:
            ffn = ffn + _swiglu(x @ t["share_expert.gate_proj.weight"].T, x @ t["share_expert.up_proj.weight"].T,
                                info.swiglu_limit_shared) @ t["share_expert.down_proj.weight"].T
    else:
        ffn = _swiglu(x @ t["mlp.gate_proj.weight"].T, x @ t["mlp.up_proj.weight"].T,
                      info.swiglu_limit_shared) @ t["mlp.down_proj.weight"].T
    return h + ffn


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@torch.no_grad()
def reference_forward(cfg: Step35Config | dict, tensors: dict[str, torch.Tensor], input_ids: torch.Tensor, *,
                      window_convention: str = "hf", dtype: torch.dtype = torch.float32) -> dict:
    """HF Step-3.5 forward. Returns ``logits`` [b,s,V], ``hidden_states`` (embedding + each main
    layer, pre final norm), ``mtp_hidden`` (pre-norm MTP block outputs, [b, s-k-1, H]),
    ``mtp_logits_hf`` (own ``shared_head``), ``mtp_logits_shared`` (main ``lm_head`` after the MTP
    layer's ``shared_head.norm``, i.e. megatron's shared-output semantics)."""
    return reference_forward_graph(cfg, tensors, input_ids, window_convention=window_convention, dtype=dtype)


def reference_forward_graph(cfg: Step35Config | dict, tensors: dict[str, torch.Tensor], input_ids: torch.Tensor, *,
                            window_convention: str = "hf", dtype: torch.dtype = torch.float32) -> dict:
    """``reference_forward`` under autograd (gradient checks: leaf ``tensors`` already in ``dtype`` receive
    the gradients)."""
    tensors = {k: (v.to(dtype) if v.is_floating_point() and k.endswith("weight") else v) for k, v in tensors.items()}
    cfg = Step35Config.of(cfg)
    eps, L = cfg.eps, cfg.num_layers
    infos = hfconfig.all_layer_infos(cfg, window_convention)
    emb = tensors["model.embed_tokens.weight"]
    h = emb[input_ids]
    hidden = [h]
    for i in range(L):
        h = reference_layer(h, _sub(tensors, f"model.layers.{i}."), cfg, infos[i])
        hidden.append(h)
    logits = _rms(h, tensors["model.norm.weight"], eps) @ tensors["lm_head.weight"].T
    out = {"logits": logits, "hidden_states": hidden, "mtp_hidden": [], "mtp_logits_hf": [],
           "mtp_logits_shared": []}
    s = input_ids.shape[1]
    h_prev = h
    for k in range(cfg.num_mtp):
        n = s - k - 1
        if n <= 0:
            break
        t = _sub(tensors, f"model.layers.{L + k}.")
        e = _rms(emb[input_ids[:, k + 1:k + 1 + n]], t["enorm.weight"], eps)
        hh = _rms(h_prev[:, :n], t["hnorm.weight"], eps)
        z = torch.cat((e, hh), -1) @ t["eh_proj.weight"].T
        z = reference_layer(z, t, cfg, infos[L + k])
        out["mtp_hidden"].append(z)
        zn = _rms(z, t["transformer.shared_head.norm.weight"], eps)
        out["mtp_logits_hf"].append(zn @ t["transformer.shared_head.output.weight"].T)
        out["mtp_logits_shared"].append(zn @ tensors["lm_head.weight"].T)
        h_prev = z
    return out


# ----------------------------------------------------------------------------------------------
# HF -> megatron per-rank layout (legacy mp_rank_* state dicts)
# ----------------------------------------------------------------------------------------------

def _chunk(t: torch.Tensor, n: int, r: int, dim: int = 0) -> torch.Tensor:
    return torch.chunk(t, n, dim=dim)[r].clone()


def qkvg_rank_rows(q, k, v, g, nh: int, ng: int, hd: int, tp: int, r: int) -> torch.Tensor:
    """linear_qkv rows of TP rank r: its query groups ``[q x hpg, k, v]``, then its heads' gate rows."""
    H = q.shape[-1]
    hpg = nh // ng
    qkv = torch.cat([q.reshape(ng, hpg * hd, H), k.reshape(ng, hd, H), v.reshape(ng, hd, H)], dim=1)
    ng_p, np_ = ng // tp, nh // tp
    return torch.cat([qkv[r * ng_p:(r + 1) * ng_p].reshape(-1, H), g[r * np_:(r + 1) * np_]], dim=0)


def _glu_fc1(gate: torch.Tensor, up: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    return torch.cat([_chunk(gate, tp, r), _chunk(up, tp, r)], dim=0)


def _layer_sd(t: dict, cfg: Step35Config, info, tp: int, r: int, ep: int, e_rank: int, dtype) -> dict:
    c = lambda x: x.to(dtype).contiguous()  # noqa: E731
    sd = {
        "input_layernorm.weight": c(t["input_layernorm.weight"]),
        "self_attention.linear_proj.weight": c(_chunk(t["self_attn.o_proj.weight"], tp, r, dim=1)),
        "self_attention.linear_proj._extra_state": None,
        "self_attention.linear_qkv.weight": c(qkvg_rank_rows(
            t["self_attn.q_proj.weight"], t["self_attn.k_proj.weight"], t["self_attn.v_proj.weight"],
            t["self_attn.g_proj.weight"], info.num_heads, info.num_groups, info.head_dim, tp, r)),
        "self_attention.linear_qkv._extra_state": None,
        "self_attention.q_layernorm.weight": c(t["self_attn.q_norm.weight"]),
        "self_attention.k_layernorm.weight": c(t["self_attn.k_norm.weight"]),
        "pre_mlp_layernorm.weight": c(t["post_attention_layernorm.weight"]),
    }
    if info.is_moe:
        el = cfg.num_experts // ep
        sd["mlp.router.weight"] = c(t["moe.gate.weight"])
        sd["mlp.router.expert_bias"] = t["moe.router_bias"].float().contiguous()
        for j in range(el):
            e = e_rank * el + j
            p = f"mlp.experts.local_experts.{j}."
            sd[p + "linear_fc1.weight"] = c(_glu_fc1(t["moe.gate_proj.weight"][e], t["moe.up_proj.weight"][e], tp, r))
            sd[p + "linear_fc1._extra_state"] = None
            sd[p + "linear_fc2.weight"] = c(_chunk(t["moe.down_proj.weight"][e], tp, r, dim=1))
            sd[p + "linear_fc2._extra_state"] = None
        if "share_expert.gate_proj.weight" in t:
            sd["mlp.shared_experts.linear_fc1.weight"] = c(_glu_fc1(
                t["share_expert.gate_proj.weight"], t["share_expert.up_proj.weight"], tp, r))
            sd["mlp.shared_experts.linear_fc1._extra_state"] = None
            sd["mlp.shared_experts.linear_fc2.weight"] = c(_chunk(t["share_expert.down_proj.weight"], tp, r, dim=1))
            sd["mlp.shared_experts.linear_fc2._extra_state"] = None
    else:
        sd["mlp.linear_fc1.weight"] = c(_glu_fc1(t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], tp, r))
        sd["mlp.linear_fc1._extra_state"] = None
        sd["mlp.linear_fc2.weight"] = c(_chunk(t["mlp.down_proj.weight"], tp, r, dim=1))
        sd["mlp.linear_fc2._extra_state"] = None
    return sd


def _vocab_shard(w: torch.Tensor, vpad: int, tp: int, r: int) -> torch.Tensor:
    if w.shape[0] < vpad:
        w = torch.cat([w, w.new_zeros(vpad - w.shape[0], w.shape[1])], 0)
    return _chunk(w, tp, r)


def hf_to_mcore_rank_state_dicts(cfg: Step35Config | dict, tensors: dict[str, torch.Tensor], *, tp: int = 1,
                                 pp: int = 1, ep: int = 1, dtype: Optional[torch.dtype] = None,
                                 window_convention: str = "hf",
                                 make_vocab_size_divisible_by: int = 128) -> dict[tuple[int, int, int], dict]:
    """{(tp_rank, pp_rank, ep_rank): state_dict} for an even PP split (all MTP layers on the last stage)."""
    cfg = Step35Config.of(cfg)
    L, n_mtp = cfg.num_layers, cfg.num_mtp
    if L % pp:
        raise ValueError(f"num_hidden_layers {L} not divisible by pp {pp}")
    infos = hfconfig.all_layer_infos(cfg, window_convention)
    vpad = cfg.padded_vocab(tp, make_vocab_size_divisible_by)
    per = L // pp
    out = {}
    for p in range(pp):
        for e_rank in range(ep):
            for r in range(tp):
                dt = dtype or tensors["model.embed_tokens.weight"].dtype
                sd: dict = {}
                first, last = p == 0, p == pp - 1
                if first or (last and n_mtp):
                    sd["embedding.word_embeddings.weight"] = _vocab_shard(
                        tensors["model.embed_tokens.weight"], vpad, tp, r).to(dt)
                for j in range(per):
                    i = p * per + j
                    for k, v in _layer_sd(_sub(tensors, f"model.layers.{i}."), cfg, infos[i], tp, r, ep,
                                          e_rank, dt).items():
                        sd[f"decoder.layers.{j}.{k}"] = v
                if last:
                    sd["decoder.final_layernorm.weight"] = tensors["model.norm.weight"].to(dt)
                    for k in range(n_mtp):
                        t = _sub(tensors, f"model.layers.{L + k}.")
                        pre = f"mtp.layers.{k}."
                        sd[pre + "enorm.weight"] = t["enorm.weight"].to(dt)
                        sd[pre + "hnorm.weight"] = t["hnorm.weight"].to(dt)
                        sd[pre + "eh_proj.weight"] = _chunk(t["eh_proj.weight"], tp, r).to(dt)
                        sd[pre + "eh_proj._extra_state"] = None
                        for kk, v in _layer_sd(t, cfg, infos[L + k], tp, r, ep, e_rank, dt).items():
                            sd[pre + "transformer_layer." + kk] = v
                        sd[pre + "final_layernorm.weight"] = t["transformer.shared_head.norm.weight"].to(dt)
                    sd["output_layer.weight"] = _vocab_shard(tensors["lm_head.weight"], vpad, tp, r).to(dt)
                    sd["output_layer._extra_state"] = None
                out[(r, p, e_rank)] = sd
    return out


def write_mcore_checkpoint(out_dir, rank_state_dicts: dict, *, tp: int, pp: int, ep: int) -> Path:
    """Write ``<out_dir>/release/<rank dir>/model_optim_rng.pt`` + ``latest_checkpointed_iteration.txt``."""
    out_dir = Path(out_dir)
    args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep)
    for (r, p, e), sd in rank_state_dicts.items():
        d = out_dir / "release" / rank_dir_name(r, p, e, pp, ep)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"model": sd, "args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
                   d / RANK_FILE)
    (out_dir / TRACKER).write_text("release")
    return out_dir

