"""Step-3.5 building blocks that plug into megatron-core's local (non-TE) GPT spec.

Each module reproduces one piece of the HF forward (as the Step-3.5 architecture notes describe it):

- ``Step35RMSNorm``: zero-centred RMSNorm, ``y = x*rsqrt(mean(x^2)+eps)*(1+w)`` in fp32, parameter
  ``weight`` (stores gamma-1). Used for every norm (input/pre-MLP/q/k/final/MTP enorm, hnorm, final).
- ``Step35SwiGLU``: activation module for megatron's MLP with the clamp AFTER SiLU:
  ``min(silu(g), L) * clamp(u, -L, L)`` (megatron's ``activation_func_clamp_value`` clamps before).
- ``Step35CoreAttention``: causal (+ sliding window) GQA attention, fp32 softmax, like HF eager.
- ``Step35SelfAttention``: megatron SelfAttention with the head-wise sigmoid gate fused as trailing
  per-rank rows of ``linear_qkv`` (megatron-core dev ``head_wise_attn_gate`` layout), per-layer RoPE
  (theta, partial rotary dim, llama3 scaling). Uses the native implementation when the installed
  megatron-core's TransformerConfig has ``head_wise_attn_gate``.
- ``Step35TransformerLayer``: TransformerLayer built from its own per-layer TransformerConfig
  (released megatron-core has one ``num_attention_heads`` per config).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer

from .hfconfig import Step35LayerInfo, rope_freqs, window_mask


def _param_device(config) -> torch.device:
    if getattr(config, "use_cpu_initialization", False) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def native_head_wise_gate_available() -> bool:
    """True when the installed megatron-core's TransformerConfig has the ``head_wise_attn_gate`` field."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return "head_wise_attn_gate" in {f.name for f in dataclasses.fields(TransformerConfig)}


class Step35RMSNorm(torch.nn.Module):
    """Zero-centred RMSNorm (HF ``Step3p5RMSNorm``): fp32 compute, gain ``1 + weight``."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **_kwargs):
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        device = _param_device(config) if config is not None else torch.device("cpu")
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        self.eps = eps
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = normed * (self.weight.float() + 1)
        return normed.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered"


class Step35SwiGLU(torch.nn.Module):
    """``min(silu(gate), L) * clamp(up, -L, L)`` on megatron's per-rank fc1 output ``[gate_r | up_r]``.

    Built by megatron's MLP from ``MLPSubmodules.activation_func`` (requires
    ``config.use_te_activation_func=True``, which only selects "call this module on the fc1 output").
    ``limit`` 0/None means no clamp.
    """

    def __init__(self, config=None, limit: Optional[float] = None, **_kwargs):
        super().__init__()
        self.limit = float(limit) if limit else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        gate = F.silu(gate)
        if self.limit:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        return gate * up

    def extra_repr(self) -> str:
        return f"limit={self.limit}"


def apply_rotary_neox(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``freqs.shape[-1]`` channels (HF ``apply_rotary_pos_emb``).

    ``t``: [s, b, heads, d]; ``freqs``: [s, 1, 1, rot] angles (fp32), cos/sin cast to t's dtype.
    """
    rot = freqs.shape[-1]
    if rot == 0:
        return t
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    cos = freqs.cos().to(t.dtype)
    sin = freqs.sin().to(t.dtype)
    x1, x2 = t_rot[..., : rot // 2], t_rot[..., rot // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


def apply_head_wise_gate(core_attn_out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``out[..., h, :] *= sigmoid(gate[..., h])``; sigmoid in fp32, cast back (megatron dev semantics).

    core_attn_out: [s, b, np*hd]; gate: [s, b, np].
    """
    s, b = gate.shape[:2]
    gate_states = gate.reshape(s, b, -1, 1)
    out = core_attn_out.view(s, b, gate_states.shape[2], -1)
    out = out * torch.sigmoid(gate_states.float()).to(out.dtype)
    return out.view(s, b, -1)


class Step35CoreAttention(MegatronModule):
    """Causal GQA attention with an optional sliding window (HF eager semantics).

    ``window_keys`` = number of keys a query sees including itself (set by Step35SelfAttention;
    None = full causal). Scores ``q.k * scale`` in the input dtype, softmax in fp32, cast back.
    Inputs: query [sq, b, np, hd], key/value [sk, b, ng_p, hd]; output [sq, b, np*hd].
    """

    def __init__(self, config, layer_number: int = 1, attn_mask_type=AttnMaskType.causal,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type=None, pg_collection=None,
                 **_kwargs):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise NotImplementedError("Step35CoreAttention does not support context parallelism")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        hd = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else hd ** -0.5
        self.window_keys: Optional[int] = None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **_kwargs):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by Step35CoreAttention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by Step35CoreAttention")
        sq, b, np_, hd = query.shape
        sk, ng_p = key.shape[0], key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hd]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if np_ != ng_p:
            k = k.repeat_interleave(np_ // ng_p, dim=1)
            v = v.repeat_interleave(np_ // ng_p, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        mask = window_mask(sq, sk, self.window_keys, device=scores.device)
        if attention_mask is not None:
            mask = mask | attention_mask.to(torch.bool)
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # [b, np, sq, hd]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hd)


def _with_extra_output_rows(base_cls: type, extra: int) -> type:
    """A subclass of a column-parallel linear whose global output size is ``output_size + extra``."""

    class _WithGateRows(base_cls):  # type: ignore[misc, valid-type]
        def __init__(self, input_size, output_size, *args, **kwargs):
            super().__init__(input_size, output_size + extra, *args, **kwargs)

    _WithGateRows.__name__ = base_cls.__name__
    _WithGateRows.__qualname__ = base_cls.__qualname__
    return _WithGateRows


class Step35SelfAttention(SelfAttention):
    """SelfAttention + head-wise gate + per-layer RoPE/window.

    ``linear_qkv`` rank r holds ``(nh*hd + 2*ng*hd)/tp`` rows (its query groups, per group
    ``[q x hpg, k, v]``) followed by ``nh/tp`` gate rows for heads ``r*nh/tp .. (r+1)*nh/tp-1``. The
    trailing ``np`` columns of the per-rank output are peeled off before the qkv split; each head's
    core-attention output is multiplied by ``sigmoid(gate)`` (fp32, cast back) before ``linear_proj``.
    """

    def __init__(self, config, submodules, layer_number: int, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type=None, pg_collection=None, *, step_layer: Step35LayerInfo, **kwargs):
        native = bool(getattr(config, "head_wise_attn_gate", False))
        nh = config.num_attention_heads
        if not native:
            submodules = dataclasses.replace(
                submodules, linear_qkv=_with_extra_output_rows(submodules.linear_qkv, nh))
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection, **kwargs)
        if not native:
            self.linear_qkv_out_dim += nh
        tp = self.world_size
        if config.num_query_groups < tp or config.num_query_groups % tp or nh % tp:
            raise ValueError(f"head-wise gate needs num_query_groups ({config.num_query_groups}) >= tp"
                             f" ({tp}), divisible by tp, and num_attention_heads ({nh}) % tp == 0")
        if (step_layer.num_heads, step_layer.num_groups, step_layer.head_dim) != (
                nh, config.num_query_groups, config.kv_channels):
            raise ValueError(f"layer {step_layer.index}: config/layer-info attention shape mismatch")
        self.native_head_wise_gate = native
        self.step_layer = step_layer
        if not hasattr(self.core_attention, "window_keys"):
            if step_layer.window_keys is not None:
                raise NotImplementedError("sliding window needs Step35CoreAttention as core_attention")
        else:
            self.core_attention.window_keys = step_layer.window_keys

    def rotary_freqs(self, seq_len: int, device) -> Optional[torch.Tensor]:
        """[seq_len, 1, 1, rotary_dim] angles for positions 0..seq_len-1 (None if no RoPE)."""
        if self.step_layer.rotary_dim == 0:
            return None
        pos = torch.arange(seq_len, device=device)
        return rope_freqs(self.step_layer, pos)[:, None, None, :]

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None,
                **kwargs):
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("Step35SelfAttention: KV-cache inference is not supported")
        if packed_seq_params is not None:
            raise NotImplementedError("Step35SelfAttention: packed sequences are not supported")
        # Positions 0..S-1 of the full sequence: with sequence parallelism this rank holds S/tp rows, and
        # linear_qkv all-gathers them before RoPE (no context parallelism). The model-level
        # rotary_pos_emb is ignored: theta, rotary dim and scaling are per layer.
        seq_len = hidden_states.shape[0] * (self.world_size if self.config.sequence_parallel else 1)
        freqs = self.rotary_freqs(seq_len, hidden_states.device)
        if self.native_head_wise_gate:
            return super().forward(hidden_states, attention_mask, key_value_states=key_value_states,
                                   rotary_pos_emb=freqs, attention_bias=attention_bias,
                                   sequence_len_offset=sequence_len_offset, **kwargs)

        np_ = self.num_attention_heads_per_partition
        ng_p = self.num_query_groups_per_partition
        hd = self.hidden_size_per_attention_head
        mixed, _ = self.linear_qkv(hidden_states)  # [sq, b, ng_p*(np/ng_p+2)*hd + np], sq = full sequence
        sq, b = mixed.shape[:2]
        mixed, gate = torch.split(mixed, [mixed.shape[-1] - np_, np_], dim=-1)
        mixed = mixed.contiguous().view(sq, b, ng_p, (np_ // ng_p + 2) * hd)
        query, key, value = torch.split(mixed, [np_ // ng_p * hd, hd, hd], dim=3)
        query = query.reshape(sq, b, np_, hd)
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        if freqs is not None:
            query = apply_rotary_neox(query, freqs)
            key = apply_rotary_neox(key, freqs)
        core_attn_out = self.core_attention(query, key, value, attention_mask,
                                            attn_mask_type=self.attn_mask_type,
                                            attention_bias=attention_bias)
        core_attn_out = apply_head_wise_gate(core_attn_out, gate)
        return self.linear_proj(core_attn_out)


class Step35TransformerLayer(TransformerLayer):
    """TransformerLayer built from ``layer_config`` (its own TransformerConfig) instead of the
    block's config; everything else is megatron's TransformerLayer."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, *, layer_config=None,
                 step_layer: Optional[Step35LayerInfo] = None, **kwargs):
        super().__init__(config=layer_config if layer_config is not None else config,
                         submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage, **kwargs)
        self.step_layer = step_layer
        # (MTP inner layers are numbered differently across megatron versions; decoder layers are
        # global 1-based indices everywhere.)
        if step_layer is not None and not step_layer.is_mtp and self.layer_number != step_layer.index + 1:
            raise RuntimeError(f"layer built as megatron layer_number {self.layer_number}, expected "
                               f"HF layer {step_layer.index} (+1)")
