"""Test data for `stepconv verify --trust-remote-code` (tests/test_remote_code.py copies it into a checkpoint folder).

A remote-code Step-3.5 model in the shape of StepFun's modeling_step3p5.py (the checkpoint's own tensor names:
stacked `moe.gate_proj/up_proj/down_proj`, `moe.gate`, `moe.router_bias`, `share_expert`, `g_proj`; a decoder layer
built as `Step3p5DecoderLayer(config, layer_idx)` that computes its own RoPE from `position_ids`; an MoE block with
`custom_routing_function` and `get_expert_output`), written by stepconv from the Step-3.5 spec in plain torch. It is
not StepFun's file (third-party code stays out of the repository); it runs on transformers 4.x and 5.x.

`WRONG_LAYER`: the tests set it to a layer index to make that layer's MoE weight its experts by the biased
probabilities (the router bias is meant for selection only): a port bug verify must name at that layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_step3p5 import Step3p5Config

WRONG_LAYER = None


class Step3p5RMSNorm(nn.Module):
    """Zero-centred RMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * (1 + w)."""

    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return y.to(x.dtype)


def _inv_freq(config, i, rot):
    """Per-layer RoPE frequencies: rope_theta[i] over `rot` channels; llama3 scaling on yarn_only_types layers."""
    theta = config.step_rope_theta[i] if isinstance(config.step_rope_theta, list) else config.step_rope_theta
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    scaling = config.step_rope_scaling
    if scaling and config.step_layer_types[i] in getattr(config, "yarn_only_types", []):
        fac, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        mid = (1 - smooth) * inv / fac + smooth * inv
        inv = torch.where(wavelen < old / hi, inv, torch.where(wavelen > old / lo, inv / fac, mid))
    return inv.float()


class Step3p5Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        sliding = config.step_layer_types[layer_idx] == "sliding_attention"
        other = config.attention_other_setting
        self.heads = other["num_attention_heads"] if sliding else config.num_attention_heads
        self.groups = other["num_attention_groups"] if sliding else config.num_attention_groups
        self.head_dim = config.head_dim
        self.rot = int(self.head_dim * config.partial_rotary_factors[layer_idx])
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.g_proj = nn.Linear(hidden, self.heads, bias=False)
        self.q_norm = Step3p5RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Step3p5RMSNorm(self.head_dim, config.rms_norm_eps)
        self.register_buffer("inv_freq", _inv_freq(config, layer_idx, self.rot), persistent=False)

    def _rope(self, x, position_ids):  # x [B, heads, S, hd]; rotate-half on the first `rot` channels
        ang = position_ids[:, None, :, None].float() * self.inv_freq  # [1 or B, 1, S, rot/2]
        cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
        r, rest = x[..., :self.rot], x[..., self.rot:]
        half = self.rot // 2
        rotated = torch.cat([-r[..., half:], r[..., :half]], -1)
        return torch.cat([r * cos + rotated * sin, rest], -1)

    def forward(self, x, attention_mask, position_ids):
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, S, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, S, self.groups, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.groups, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, position_ids), self._rope(k, position_ids)
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(2, 3)).float() / math.sqrt(self.head_dim)
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
        o = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2)  # [B, S, heads, hd]
        o = o * torch.sigmoid(self.g_proj(x))[..., None]  # head-wise gate, read from the attention input
        return self.o_proj(o.reshape(B, S, -1))


def _swiglu(x, gate, up, down, limit):
    g, u = F.silu(gate(x)), up(x)
    if limit:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return down(g * u)


class Step3p5MLP(nn.Module):
    def __init__(self, config, size, limit):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, size, bias=False)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=False)
        self.limit = limit

    def forward(self, x):
        return _swiglu(x, self.gate_proj, self.up_proj, self.down_proj, self.limit)


class Step3p5Experts(nn.Module):
    """One stacked projection of every routed expert: weight [experts, out, in]."""

    def __init__(self, experts, inp, out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out, inp))

    def forward(self, x, e):
        return F.linear(x, self.weight[e])


class Step3p5MoE(nn.Module):
    def __init__(self, config, layer_idx, limit):
        super().__init__()
        E, hidden, size = config.moe_num_experts, config.hidden_size, config.moe_intermediate_size
        self.layer_idx, self.top_k, self.limit = layer_idx, config.moe_top_k, limit
        self.scale = config.moe_router_scaling_factor
        self.gate = nn.Linear(hidden, E, bias=False)
        self.router_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32), requires_grad=False)
        self.gate_proj, self.up_proj = Step3p5Experts(E, hidden, size), Step3p5Experts(E, hidden, size)
        self.down_proj = Step3p5Experts(E, size, hidden)
        self.custom_routing_function = self.route

    def route(self, logits, top_k, renormalize=True):
        """Sigmoid scores; the bias only selects; the selected scores, normalised, weight the experts."""
        prob = torch.sigmoid(logits.float())
        idx = torch.topk(prob + self.router_bias.float(), top_k, dim=-1).indices
        weights = (prob + self.router_bias.float() if self.layer_idx == WRONG_LAYER else prob).gather(1, idx)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, idx

    def get_expert_output(self, x, e):
        return _swiglu(x, lambda t: self.gate_proj(t, e), lambda t: self.up_proj(t, e),
                       lambda t: self.down_proj(t, e), self.limit)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = flat.float() @ self.gate.weight.float().t()  # fp32 router
        weights, idx = self.custom_routing_function(logits, self.top_k, renormalize=True)
        weights = weights * self.scale
        out = torch.zeros_like(flat, dtype=torch.float32)
        for e in idx.unique().tolist():
            t, j = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, t, self.get_expert_output(flat[t], e).float() * weights[t, j, None])
        return out.to(x.dtype).view_as(x)


class Step3p5DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_type = config.step_layer_types[layer_idx]
        eps = config.rms_norm_eps
        self.input_layernorm = Step3p5RMSNorm(config.hidden_size, eps)
        self.self_attn = Step3p5Attention(config, layer_idx)
        self.post_attention_layernorm = Step3p5RMSNorm(config.hidden_size, eps)
        moe_layers = {int(x) for x in config.moe_layers_enum.split(",")}
        shared_limit = config.swiglu_limits_shared[layer_idx]
        if layer_idx in moe_layers:
            self.moe = Step3p5MoE(config, layer_idx, config.swiglu_limits[layer_idx])
            self.share_expert = Step3p5MLP(config, config.share_expert_dim, shared_limit)
        else:
            self.mlp = Step3p5MLP(config, config.intermediate_size, shared_limit)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids)
        x = self.post_attention_layernorm(h)
        return h + (self.moe(x) + self.share_expert(x) if hasattr(self, "moe") else self.mlp(x))


class Step3p5PreTrainedModel(PreTrainedModel):
    config_class = Step3p5Config
    base_model_prefix = "model"
    _no_split_modules = ["Step3p5DecoderLayer"]


class Step3p5Model(Step3p5PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Step3p5DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Step3p5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()


class Step3p5ForCausalLM(Step3p5PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = Step3p5Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
