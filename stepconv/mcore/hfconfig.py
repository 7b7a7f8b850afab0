"""Per-layer facts of a Step-3.5 ``config.json`` for the megatron-core model (no megatron imports here).

Every config fact comes from ``stepconv.config.Step35Config`` (the one reader of config.json and home of its
defaults); this module only arranges them per layer, as the Step-3.5 architecture notes describe attention,
RoPE and the MLPs. Layer indices are HF's: main decoder layers are ``0 .. num_hidden_layers-1``; MTP layer
``k`` is ``num_hidden_layers + k`` and reads the per-layer lists at that index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Step35Config

WINDOW_CONVENTIONS = ("hf", "megatron")


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Step35LayerInfo:
    """Everything that differs between Step-3.5 layers."""

    index: int  # HF layer index (MTP layers: num_hidden_layers + k)
    is_mtp: bool
    layer_type: str  # "full_attention" / "sliding_attention"
    num_heads: int
    num_groups: int
    head_dim: int
    rope_theta: float
    rotary_dim: int  # first rotary_dim channels of each head are rotated (NeoX rotate-half)
    rope_scaling: Optional[Llama3RopeScaling]  # llama3 scaling, only for yarn_only_types
    window_keys: Optional[int]  # keys visible to a query incl. itself (None: full causal)
    is_moe: bool
    swiglu_limit: float  # routed experts (0: no clamp)
    swiglu_limit_shared: float  # shared expert and dense MLP (0: no clamp)


def layer_info(hf_config: Step35Config | dict, i: int, window_convention: str = "hf") -> Step35LayerInfo:
    """HF layer i's attention shape, RoPE, window, MoE flag and SwiGLU clamps.

    Example: ``layer_info(cfg, 1).window_keys == 512`` for Step-3.5-Flash (``sliding_window`` 512, "hf"
    convention: the window counts the query itself; "megatron" gives 513).
    """
    if window_convention not in WINDOW_CONVENTIONS:
        raise ValueError(f"window_convention must be one of {WINDOW_CONVENTIONS}, got {window_convention!r}")
    c = Step35Config.of(hf_config)
    layer_type, a = c.layer_type(i), c.attn(i)
    rotary_dim = int(a.head_dim * c.rotary_factor(i)) if c.uses_rope(i) else 0  # HF: int(head_dim * factor)
    if rotary_dim % 2:
        raise ValueError(f"layer {i}: odd rotary dim {rotary_dim}")
    rs = c.rope_scaling
    scaling = None
    if rs and layer_type in c.yarn_only_types:
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype != "llama3":
            raise NotImplementedError(f"rope_scaling type {rtype!r} (only llama3 is used by Step-3.5)")
        scaling = Llama3RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                    float(rs["high_freq_factor"]),
                                    int(rs["original_max_position_embeddings"]))
    window = None
    if layer_type == "sliding_attention" and c.sliding_window:
        window = c.sliding_window if window_convention == "hf" else c.sliding_window + 1
    return Step35LayerInfo(index=i, is_mtp=i >= c.num_layers, layer_type=layer_type, num_heads=a.heads,
                           num_groups=a.groups, head_dim=a.head_dim, rope_theta=c.rope_theta(i),
                           rotary_dim=rotary_dim, rope_scaling=scaling, window_keys=window, is_moe=c.is_moe(i),
                           swiglu_limit=c.swiglu_limit(i), swiglu_limit_shared=c.swiglu_limit_shared(i))


def all_layer_infos(hf_config: Step35Config | dict, window_convention: str = "hf") -> list[Step35LayerInfo]:
    """``layer_info`` of every main layer, then every MTP layer."""
    c = Step35Config.of(hf_config)
    return [layer_info(c, i, window_convention) for i in range(c.num_layers + c.num_mtp)]


def rope_inv_freq(info: Step35LayerInfo, device=None) -> torch.Tensor:
    """HF ``_compute_default_rope_parameters`` / ``_compute_llama3_parameters`` over the rotary dim (fp32)."""
    dim = info.rotary_dim
    if dim == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    base = info.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    s = info.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth_factor = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / s.factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_freqs(info: Step35LayerInfo, positions: torch.Tensor) -> torch.Tensor:
    """Angles ``cat(pos*inv_freq, pos*inv_freq)`` of shape [len(positions), rotary_dim] (fp32)."""
    inv = rope_inv_freq(info, device=positions.device)
    f = positions.to(torch.float32)[:, None] * inv[None, :]
    return torch.cat((f, f), dim=-1)


def window_mask(sq: int, sk: int, window_keys: Optional[int], device=None) -> torch.Tensor:
    """Boolean [sq, sk] mask, True = masked. Queries are the last sq of the sk positions."""
    q = torch.arange(sk - sq, sk, device=device)[:, None]
    k = torch.arange(sk, device=device)[None, :]
    d = q - k
    masked = d < 0
    if window_keys is not None:
        masked = masked | (d >= window_keys)
    return masked
