"""Hugging Face reference forward for Step-3.5-Flash, used by ``stepconv verify``.

The main model is transformers' own ``Step3p7TextModel`` (``transformers/models/step3p7``); its text config
keeps ``model_type = "step3p5"`` and parses a Step-3.5 ``config.json`` (per-layer heads through
``attention_other_setting``, head-wise ``g_proj`` gate, per-layer RoPE, zero-centred (+1) fp32 RMSNorm,
sigmoid router with a selection-only bias, shared expert, SwiGLU clamp after SiLU). Differences between
what Step3p7 does and the Step-3.5 spec, and how they are handled here:

* RoPE: Step3p7 keys RoPE by layer *type* and always puts ``rope_scaling`` on ``"full_attention"``. We build
  ``rope_parameters`` per type ourselves from the per-layer lists (MTP indices included), apply the scaling
  only to the types in ``yarn_only_types`` and raise if two layers of one type disagree.
* Router: Step3p7 computes router logits in the router weight's dtype. Step-3.5 requires fp32 router logits
  (``need_fp32_gate``), so the router weight and bias are kept in fp32 even when the model runs in bf16.
* Heads: Step3p7 makes only ``num_attention_heads`` per-layer; we raise if ``attention_other_setting``
  changes the KV-group count or head_dim (it does not in Step-3.5-Flash).
* MTP: Step3p7 does not run Step-3.5's MTP layers (each has its own ``shared_head``); they are built here from
  Step3p7's own decoder-layer class at index ``num_hidden_layers + k`` plus plain enorm/hnorm/eh_proj/head.
* Precision (bf16 only): HF's remote code runs routed experts in fp32; Step3p7 runs them in the model dtype.

Checkpoint tensors are mapped onto Step3p7 names/layouts (gate and up experts are fused into
``experts.gate_up_proj`` = cat([gate, up], dim=1), ``moe.router_bias`` becomes
``gate.e_score_correction_bias``, ``share_expert`` becomes ``mlp.shared_experts``) and loaded strictly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HFReference", "load_hf_reference", "build_text_config"]

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ROUTER_FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


# --------------------------------------------------------------------------------------------- config


def _per_layer(value: Any, i: int, default: Any = None) -> Any:
    if value is None:
        return default
    return value[i] if isinstance(value, (list, tuple)) else value


def _rope_parameters(cfg: dict) -> dict[str, dict]:
    """Per-layer-type RoPE parameters from Step-3.5's per-layer lists (main + MTP indices)."""
    n = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
    types = cfg.get("layer_types") or ["full_attention"] * n
    scaling = dict(cfg.get("rope_scaling") or {})
    if scaling:
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
    # Step-3.5: scaling only on `yarn_only_types` (absent -> Step3p7's own choice: full layers only).
    scaled_types = set(cfg.get("yarn_only_types", ["full_attention"]))
    out: dict[str, dict] = {}
    for i in range(min(n, len(types))):
        params = {
            "rope_type": "default",
            "rope_theta": float(_per_layer(cfg.get("rope_theta"), i, 10000.0)),
            "partial_rotary_factor": float(_per_layer(cfg.get("partial_rotary_factors"), i, 1.0)),
        }
        if scaling and types[i] in scaled_types:
            params.update(scaling)
        if out.setdefault(types[i], params) != params:
            raise NotImplementedError(
                f"layer {i} ({types[i]}) has RoPE {params}, other {types[i]} layers have {out[types[i]]}; "
                "Step3p7 shares RoPE parameters per layer type")
    return out


def _check_supported(cfg: dict) -> None:
    other = cfg.get("attention_other_setting") or {}
    for key, glob in (("num_attention_groups", cfg.get("num_attention_groups")), ("head_dim", cfg.get("head_dim"))):
        if key in other and other[key] != glob:
            raise NotImplementedError(f"attention_other_setting.{key}={other[key]} differs from {glob}; "
                                      "Step3p7 only varies num_attention_heads per layer")
    checks = {
        "moe_router_activation": ("sigmoid", "sigmoid"), "use_moe_router_bias": (True, True),
        "norm_expert_weight": (True, True), "use_head_wise_attn_gate": (True, True),
        "att_impl_type": ("GQA", "GQA"), "sink": (False, False), "zero_centered": (True, True),
    }
    for key, (default, want) in checks.items():
        if cfg.get(key, default) != want:
            raise NotImplementedError(f"{key}={cfg[key]!r} is not supported by the Step3p7 reference (needs {want!r})")
    if any(v is False or v == 0 for v in cfg.get("use_rope_layers") or []):
        raise NotImplementedError("use_rope_layers with RoPE disabled on some layers is not supported")


def build_text_config(cfg: dict, *, with_mtp_layers: bool = False):
    """A ``Step3p7TextConfig`` (eager attention) from a Step-3.5 config.json dict.

    ``with_mtp_layers=True`` returns a config whose ``num_hidden_layers`` covers the MTP layers too, so that
    ``Step3p7DecoderLayer(config, num_hidden_layers + k)`` reads the MTP entries of the per-layer lists
    (layer type, heads, dense/MoE, swiglu limits).
    """
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    _check_supported(cfg)
    kw = {k: v for k, v in cfg.items()
          if k not in ("model_type", "architectures", "auto_map", "rope_theta", "partial_rotary_factors",
                       "rope_scaling", "transformers_version")}
    kw["rope_parameters"] = _rope_parameters(cfg)
    if with_mtp_layers:
        kw["num_hidden_layers"] = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
        kw["num_nextn_predict_layers"] = 0
    text_cfg = Step3p7TextConfig(**kw)
    text_cfg._attn_implementation = "eager"
    return text_cfg


# --------------------------------------------------------------------------------------------- weights


def _read_safetensors(hf_dir: Path, select: Callable[[str], bool] = lambda n: True) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {hf_dir}")
    out: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(hf_dir / fname), framework="pt") as f:
            for name in f.keys():
                if select(name):
                    if name in out:
                        raise ValueError(f"tensor {name} appears in more than one shard")
                    out[name] = f.get_tensor(name)
    return out


def _map_layer_key(rest: str) -> tuple[str, str | None]:
    """Step-3.5 decoder-layer key (after ``model.layers.N.``) -> (Step3p7 key, fused half or None)."""
    if rest == "moe.gate.weight":
        return "mlp.gate.weight", None
    if rest == "moe.router_bias":
        return "mlp.gate.e_score_correction_bias", None
    if rest in ("moe.gate_proj.weight", "moe.up_proj.weight"):  # [E, I, H] each -> gate_up_proj [E, 2I, H]
        return "mlp.experts.gate_up_proj", rest.split(".")[1].split("_")[0]
    if rest == "moe.down_proj.weight":  # [E, H, I], same layout
        return "mlp.experts.down_proj", None
    if rest.startswith("share_expert."):
        return "mlp.shared_experts." + rest[len("share_expert."):], None
    return rest, None  # input_layernorm, post_attention_layernorm, self_attn.*, mlp.* (dense)


_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "transformer.shared_head.norm.weight": "shared_head.norm.weight",
            "transformer.shared_head.output.weight": "shared_head.output.weight"}


def _convert(tensors: dict[str, torch.Tensor], num_layers: int, num_mtp: int, *, main: bool,
             dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Step-3.5 checkpoint tensors -> state dict of ``_Step35Reference`` (keys ``model.*``, ``lm_head.*``,
    ``mtp.K.*``). Returns (state dict, unused checkpoint names)."""
    sd: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    leftover: list[str] = []
    for name in list(tensors):
        target, half = None, None
        if main and name in ("model.embed_tokens.weight", "model.norm.weight"):
            target = name
        elif main and name == "lm_head.weight":
            target = name
        elif m := _LAYER_RE.match(name):
            i, rest = int(m.group(1)), m.group(2)
            if i < num_layers and main:
                key, half = _map_layer_key(rest)
                target = f"model.layers.{i}.{key}"
            elif num_layers <= i < num_layers + num_mtp:
                k = i - num_layers
                if rest in _MTP_OWN:
                    target = f"mtp.{k}.{_MTP_OWN[rest]}"
                else:
                    key, half = _map_layer_key(rest)
                    target = f"mtp.{k}.block.{key}"
        if target is None:
            leftover.append(name)
            continue
        t = tensors.pop(name)
        t = t.float() if target.endswith(_ROUTER_FP32) else t.to(dtype)  # fp32 router (need_fp32_gate)
        if half is None:
            sd[target] = t
        else:
            fused.setdefault(target, {})[half] = t
    for target, parts in fused.items():
        if set(parts) != {"gate", "up"}:
            raise ValueError(f"{target}: only {sorted(parts)} of gate/up expert tensors present in the checkpoint")
        sd[target] = torch.cat([parts["gate"], parts["up"]], dim=1)  # Step3p7 chunks gate first, up second
    return sd, leftover


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], leftover: list[str]) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    problems = []
    if leftover:
        problems.append(f"checkpoint tensors with no Step3p7 destination: {sorted(leftover)}")
    if missing:
        problems.append(f"parameters not filled from the checkpoint: {missing}")
    if unexpected:
        problems.append(f"mapped tensors that the model does not have: {unexpected}")
    if problems:
        raise ValueError("strict load of the HF reference failed; " + "; ".join(problems))
    module.load_state_dict(sd, strict=True, assign=True)


# --------------------------------------------------------------------------------------------- modules


class _SharedHead(nn.Module):
    def __init__(self, norm: nn.Module, hidden: int, vocab: int):
        super().__init__()
        self.norm = norm
        self.output = nn.Linear(hidden, vocab, bias=False)


class _MTPLayer(nn.Module):
    """Step-3.5 MTP layer: eh_proj(cat[enorm(embed), hnorm(h)]) -> decoder block -> own shared_head."""

    def __init__(self, ext_config, layer_idx: int):
        super().__init__()
        from transformers.models.step3p7.modeling_step3p7 import Step3p7DecoderLayer, Step3p7RMSNorm

        hidden, eps = ext_config.hidden_size, ext_config.rms_norm_eps
        self.layer_idx = layer_idx
        self.layer_type = ext_config.layer_types[layer_idx]
        self.enorm = Step3p7RMSNorm(hidden, eps=eps)
        self.hnorm = Step3p7RMSNorm(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = Step3p7DecoderLayer(ext_config, layer_idx)
        self.shared_head = _SharedHead(Step3p7RMSNorm(hidden, eps=eps), hidden, ext_config.vocab_size)


class _Step35Reference(nn.Module):
    def __init__(self, config, ext_config, num_mtp: int, *, backbone: bool = True):
        super().__init__()
        if backbone:
            from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

            self.model = Step3p7TextModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(_MTPLayer(ext_config, config.num_hidden_layers + k) for k in range(num_mtp))


# --------------------------------------------------------------------------------------------- public


@dataclass
class HFReference:
    """Reference forward of a Step-3.5 HF checkpoint (CPU, eager attention, ``torch.no_grad``)."""

    config: dict  # the checkpoint's config.json
    dtype: torch.dtype
    backend: str  # "step3p7" (transformers in-tree) or "remote" (checkpoint's modeling_step3p5.py)
    model: nn.Module  # Step3p7TextModel, or the remote ...ForCausalLM
    lm_head: nn.Module | None
    mtp: nn.ModuleList
    text_config: Any = None  # Step3p7TextConfig of the main stack
    mtp_config: Any = None  # Step3p7TextConfig extended over the MTP indices
    _mtp_rotary: nn.Module | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

    def _backbone(self) -> nn.Module:
        return self.model if self.backend == "step3p7" else self.model.model

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> dict[str, Any]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        input_ids = input_ids.long()
        backbone = self._backbone()
        layers = list(backbone.layers)[: self.num_layers]
        captured: dict[int, torch.Tensor] = {}

        def hook(idx):
            def fn(_mod, _inp, out):
                captured[idx] = out[0] if isinstance(out, (tuple, list)) else out
            return fn

        handles = [backbone.embed_tokens.register_forward_hook(hook(-1))]
        handles += [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            if self.backend == "step3p7":
                last = self.model(input_ids=input_ids, use_cache=False).last_hidden_state  # post final norm
                logits = self.lm_head(last)
            else:
                logits = self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        hidden_states = [captured[i] for i in range(-1, self.num_layers)]
        mtp_logits, mtp_hidden = self._mtp_forward(input_ids, hidden_states[-1], backbone.embed_tokens)
        return {"logits": logits.float(), "hidden_states": hidden_states,
                "mtp_logits": mtp_logits, "mtp_hidden": mtp_hidden}

    __call__ = forward

    @torch.no_grad()
    def mtp_logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """MTP layer k's own head (shared_head.norm then .output) applied to a block output [B, S, H]."""
        head = self.mtp[k].shared_head
        return head.output(head.norm(hidden)).float()

    def _mtp_forward(self, input_ids, h, embed) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        bsz, seq = input_ids.shape
        logits_out, hidden_out = [], []
        for k, layer in enumerate(self.mtp):
            n = seq - k - 1  # positions t whose token t+k+1 exists
            if n <= 0:
                logits_out.append(torch.empty(bsz, 0, self.config["vocab_size"]))
                hidden_out.append(torch.empty(bsz, 0, self.config["hidden_size"], dtype=h.dtype))
                continue
            e = layer.enorm(embed(input_ids[:, k + 1:]))
            z = layer.eh_proj(torch.cat([e, layer.hnorm(h[:, :n])], dim=-1))  # embedding first, hidden second
            pos = torch.arange(n).unsqueeze(0).expand(bsz, -1)
            make_mask = create_sliding_window_causal_mask if layer.layer_type == "sliding_attention" \
                else create_causal_mask
            mask = make_mask(config=self.mtp_config, inputs_embeds=z, attention_mask=None, cache=None,
                             position_ids=pos)
            pe = self._mtp_rotary(z, pos, layer.layer_type)
            z = layer.block(z, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            hidden_out.append(z)
            logits_out.append(layer.shared_head.output(layer.shared_head.norm(z)).float())
            h = z  # next MTP step reads this block output (pre shared_head.norm)
        return logits_out, hidden_out


def load_hf_reference(hf_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False) -> HFReference:
    """Load a Step-3.5 HF checkpoint folder as a CPU reference model.

    Default: transformers' in-tree Step3p7 text model plus MTP layers, loaded strictly from the safetensors.
    With ``trust_remote_code=True`` and a ``modeling_step3p5.py`` in the folder, the main model comes from
    ``AutoModelForCausalLM`` (remote code, which ignores MTP weights); the MTP layers are still built here.
    """
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    num_layers, num_mtp = cfg["num_hidden_layers"], cfg.get("num_nextn_predict_layers", 0)
    text_config = build_text_config(cfg)
    ext_config = build_text_config(cfg, with_mtp_layers=True)
    remote = trust_remote_code and (hf_dir / "modeling_step3p5.py").exists()

    with torch.device("meta"):  # no random init; real tensors are assigned by the strict load
        ref = _Step35Reference(text_config, ext_config, num_mtp, backbone=not remote)
    if remote:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype,
                                                     attn_implementation="eager").eval()

        def is_mtp(name):
            m = _LAYER_RE.match(name)
            return m is not None and int(m.group(1)) >= num_layers

        sd, leftover = _convert(_read_safetensors(hf_dir, is_mtp), num_layers, num_mtp, main=False, dtype=dtype)
        _load_strict(ref, sd, leftover)
        lm_head = None
    else:
        sd, leftover = _convert(_read_safetensors(hf_dir), num_layers, num_mtp, main=True, dtype=dtype)
        _load_strict(ref, sd, leftover)
        from transformers.models.step3p7.modeling_step3p7 import Step3p7RotaryEmbedding

        ref.model.rotary_emb = Step3p7RotaryEmbedding(config=text_config)  # non-persistent buffers were on meta
        model, lm_head = ref.model, ref.lm_head
        if model.config._attn_implementation != "eager":
            raise RuntimeError(f"expected eager attention, got {model.config._attn_implementation}")

    from transformers.models.step3p7.modeling_step3p7 import Step3p7RotaryEmbedding

    mtp_rotary = Step3p7RotaryEmbedding(config=ext_config)
    ref.eval()
    for mod in (ref, model):
        meta = [n for n, t in [*mod.named_parameters(), *mod.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"tensors left uninitialised after loading: {meta}")
    return HFReference(config=cfg, dtype=dtype, backend="remote" if remote else "step3p7", model=model,
                       lm_head=lm_head, mtp=ref.mtp, text_config=text_config, mtp_config=ext_config,
                       _mtp_rotary=mtp_rotary)
