"""Per-layer facts of a Step-3.5 ``config.json`` (no megatron imports here).

Spec: /work/shared/spec/step35-architecture.md sections 1, 3-5. Layer indices are HF's: main decoder
layers are ``0 .. num_hidden_layers-1``; MTP layer ``k`` is ``num_hidden_layers + k`` and reads the
per-layer lists at that index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Step35Config, padded_vocab_size  # noqa: F401  (one source for config facts)

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


def _per_layer(cfg: dict, key: str, i: int, default=None):
    v = cfg.get(key, default)
    if isinstance(v, (list, tuple)):
        if i >= len(v):
            raise ValueError(f"config[{key!r}] has {len(v)} entries, layer {i} requested")
        return v[i]
    return v


def moe_layer_set(cfg: dict) -> set[int]:
    """HF/vLLM read only ``moe_layers_enum``; without it they fall back to range(1, num_hidden_layers)."""
    return set(Step35Config(raw=cfg).moe_layers)


def num_mtp_layers(cfg: dict) -> int:
    return Step35Config(raw=cfg).num_mtp


def rms_norm_eps(cfg: dict) -> float:
    return Step35Config(raw=cfg).eps


def attention_shape(cfg: dict, i: int) -> tuple[str, int, int, int]:
    """(layer_type, num_heads, num_kv_groups, head_dim) of HF layer i."""
    c = Step35Config(raw=cfg)
    a = c.attn(i)
    return (c.layer_type(i), a.heads, a.groups, a.head_dim)


def layer_info(cfg: dict, i: int, window_convention: str = "hf") -> Step35LayerInfo:
    if window_convention not in WINDOW_CONVENTIONS:
        raise ValueError(f"window_convention must be one of {WINDOW_CONVENTIONS}, got {window_convention!r}")
    L = int(cfg["num_hidden_layers"])
    layer_type, nh, ng, hd = attention_shape(cfg, i)
    theta = float(_per_layer(cfg, "rope_theta", i, 10000.0))
    prf = float(_per_layer(cfg, "partial_rotary_factors", i, 1.0) or 1.0)
    rotary_dim = int(hd * prf)  # HF: int(head_dim * partial_rotary_factor)
    if rotary_dim % 2:
        raise ValueError(f"layer {i}: odd rotary dim {rotary_dim}")
    use_rope_layers = cfg.get("use_rope_layers") or []
    if use_rope_layers and not use_rope_layers[i]:
        rotary_dim = 0
    rs = cfg.get("rope_scaling") or None
    scaling = None
    if rs and layer_type in (cfg.get("yarn_only_types") or []):
        rtype = rs.get("rope_type", rs.get("type"))
        if rtype != "llama3":
            raise NotImplementedError(f"rope_scaling type {rtype!r} (only llama3 is used by Step-3.5)")
        scaling = Llama3RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                    float(rs["high_freq_factor"]),
                                    int(rs["original_max_position_embeddings"]))
    window = None
    if layer_type == "sliding_attention" and cfg.get("sliding_window"):
        w = int(cfg["sliding_window"])
        window = w if window_convention == "hf" else w + 1
    is_moe = i < L and i in moe_layer_set(cfg)
    lim = float(_per_layer(cfg, "swiglu_limits", i, 0.0) or 0.0)
    lim_sh = float(_per_layer(cfg, "swiglu_limits_shared", i, 0.0) or 0.0)
    return Step35LayerInfo(index=i, is_mtp=i >= L, layer_type=layer_type, num_heads=nh, num_groups=ng,
                           head_dim=hd, rope_theta=theta, rotary_dim=rotary_dim, rope_scaling=scaling,
                           window_keys=window, is_moe=is_moe, swiglu_limit=lim,
                           swiglu_limit_shared=lim_sh)


def all_layer_infos(cfg: dict, window_convention: str = "hf") -> list[Step35LayerInfo]:
    n = int(cfg["num_hidden_layers"]) + num_mtp_layers(cfg)
    return [layer_info(cfg, i, window_convention) for i in range(n)]


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
