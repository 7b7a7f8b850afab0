"""Hugging Face reference forward for Step-3.5-Flash, used by ``stepconv verify``.

The main model is transformers' own ``Step3p7TextModel`` (``transformers.models.step3p7``); its text config
keeps ``model_type = "step3p5"`` and parses a Step-3.5 ``config.json`` (per-layer heads through
``attention_other_setting``, head-wise ``g_proj`` gate, per-layer RoPE, zero-centred (+1) fp32 RMSNorm,
sigmoid router with a selection-only bias, shared expert, SwiGLU clamp after SiLU). Every choice stepconv makes
about the config (defaults included) comes from ``Step35Config``. Differences between what Step3p7 does and the
Step-3.5 spec, and how they are handled here:

* RoPE: Step3p7 keys RoPE by layer *type* and always puts ``rope_scaling`` on ``"full_attention"``. We build
  ``rope_parameters`` per type ourselves from the per-layer lists (MTP indices included), apply the scaling
  only to the types in ``yarn_only_types`` and raise if two layers of one type disagree.
* MoE: Step3p7's own defaults for an absent ``moe_top_k`` / ``moe_layers_enum`` differ from StepFun's, so the
  top-k and the MoE layer set are passed from ``Step35Config``.
* Router: Step3p7 computes router logits in the router weight's dtype. Step-3.5 requires fp32 router logits
  (``need_fp32_gate``), so while it is set the router weight and bias stay fp32 even when the model runs in bf16.
* Heads: Step3p7 makes only ``num_attention_heads`` per-layer; we raise if ``attention_other_setting``
  changes the KV-group count or head_dim (it does not in Step-3.5-Flash).
* MTP: Step3p7 does not run Step-3.5's MTP layers (each has its own ``shared_head``); they are built here from
  Step3p7's own decoder-layer class at index ``num_hidden_layers + k`` plus plain enorm/hnorm/eh_proj/head.
* Precision (bf16 only): HF's remote code runs routed experts in fp32; Step3p7 runs them in the model dtype.

Checkpoint names are mapped by transformers' own conversion mapping for Step3p7 (the one ``from_pretrained``
applies: ``moe.router_bias`` becomes ``mlp.gate.e_score_correction_bias``, gate and up expert stacks are fused
into ``mlp.experts.gate_up_proj``, ...), onto a module tree laid out like ``Step3p7ForConditionalGeneration``'s
text part; MTP layers keep the checkpoint's own names. Loading is strict.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.step3p7.configuration_step3p7 import Step3p7Config, Step3p7TextConfig
from transformers.models.step3p7.modeling_step3p7 import (Step3p7DecoderLayer, Step3p7RMSNorm, Step3p7SparseMoeBlock,
                                                          Step3p7RotaryEmbedding, Step3p7TextModel)

from .config import Step35Config
from .hf_io import HFCheckpoint
from .reference import LayerTrace, mtp_step

__all__ = ["HFReference", "load_hf_reference", "build_text_config", "StreamedReference", "LayerTrace"]

_LAYER_RE = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")  # a decoder layer, as transformers names it
_ROUTER_FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
# config.json keys that Step3p7TextConfig must not read: checkpoint metadata, and what build_text_config passes
# from Step35Config instead.
_NOT_FOR_STEP3P7 = ("model_type", "architectures", "auto_map", "transformers_version", "rope_theta",
                    "partial_rotary_factors", "rope_scaling", "yarn_only_types", "moe_top_k", "moe_layers_enum")


# --------------------------------------------------------------------------------------------- config


def _rope_parameters(cfg: Step35Config) -> dict[str, dict]:
    """Per-layer-type RoPE parameters from Step-3.5's per-layer lists (main + MTP indices)."""
    scaling = cfg.rope_scaling
    if scaling:
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
    out: dict[str, dict] = {}
    for i in range(cfg.num_layers + cfg.num_mtp):
        kind = cfg.layer_type(i)
        params = {"rope_type": "default", "rope_theta": cfg.rope_theta(i),
                  "partial_rotary_factor": cfg.rotary_factor(i)}
        if scaling and kind in cfg.yarn_only_types:
            params.update(scaling)
        if out.setdefault(kind, params) != params:
            raise NotImplementedError(f"layer {i} ({kind}) has RoPE {params}, other {kind} layers have {out[kind]}; "
                                      "Step3p7 shares RoPE parameters per layer type")
    return out


def _check_supported(cfg: Step35Config) -> None:
    n, full = cfg.num_layers + cfg.num_mtp, cfg.attn_full()
    for i in range(n):
        shape = cfg.attn(i)
        if (shape.groups, shape.head_dim) != (full.groups, full.head_dim):
            raise NotImplementedError(f"layer {i} has {shape.groups} KV groups of head_dim {shape.head_dim}, "
                                      f"not {full.groups} of {full.head_dim}; Step3p7 only varies "
                                      "num_attention_heads per layer")
    checks = {"moe_router_activation": (cfg.router_activation, "sigmoid"),
              "use_moe_router_bias": (cfg.router_bias, True), "norm_expert_weight": (cfg.norm_expert_weight, True),
              "use_head_wise_attn_gate": (cfg.head_wise_gate, True), "att_impl_type": (cfg.att_impl_type, "GQA"),
              "sink": (cfg.sink, False), "zero_centered": (cfg.zero_centered, True)}
    for key, (value, want) in checks.items():
        if value != want:
            raise NotImplementedError(f"{key}={value!r} is not supported by the Step3p7 reference (needs {want!r})")
    if not all(cfg.uses_rope(i) for i in range(n)):
        raise NotImplementedError("use_rope_layers with RoPE disabled on some layers is not supported")


def build_text_config(cfg: Step35Config | dict, *, with_mtp_layers: bool = False) -> Step3p7TextConfig:
    """A ``Step3p7TextConfig`` (eager attention) from a Step-3.5 config (or its config.json dict).

    ``with_mtp_layers=True`` returns a config whose ``num_hidden_layers`` covers the MTP layers too, so that
    ``Step3p7DecoderLayer(config, num_hidden_layers + k)`` reads the MTP entries of the per-layer lists
    (layer type, heads, dense/MoE, swiglu limits).

    Example: ``build_text_config(Step35Config.from_file("ckpt/config.json")).rope_parameters["full_attention"]``.
    """
    cfg = Step35Config.of(cfg)
    _check_supported(cfg)
    n = cfg.num_layers + cfg.num_mtp
    kw = {k: v for k, v in cfg.raw.items() if k not in _NOT_FOR_STEP3P7}
    kw.update(rope_parameters=_rope_parameters(cfg), num_experts_per_tok=cfg.top_k,
              mlp_layer_types=["sparse" if cfg.is_moe(i) else "dense" for i in range(n)])
    if with_mtp_layers:
        kw.update(num_hidden_layers=n, num_nextn_predict_layers=0)
    text_cfg = Step3p7TextConfig(**kw)
    text_cfg._attn_implementation = "eager"
    return text_cfg


# --------------------------------------------------------------------------------------------- modules


class _SharedHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.norm = Step3p7RMSNorm(hidden, eps=eps)
        self.output = nn.Linear(hidden, vocab, bias=False)


class _MTPLayer(Step3p7DecoderLayer):
    """Step-3.5 MTP layer: eh_proj(cat[enorm(embed), hnorm(h)]) -> this decoder block -> own shared_head.

    The extra modules carry the checkpoint's names (``transformer.shared_head`` included), so an MTP tensor's
    name inside its layer needs no rename of ours.
    """

    def __init__(self, ext_config: Step3p7TextConfig, layer_idx: int):
        super().__init__(ext_config, layer_idx)
        hidden, eps = ext_config.hidden_size, ext_config.rms_norm_eps
        self.enorm = Step3p7RMSNorm(hidden, eps=eps)
        self.hnorm = Step3p7RMSNorm(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.transformer = nn.Module()
        self.transformer.shared_head = _SharedHead(hidden, ext_config.vocab_size, eps)


class _Step35Reference(nn.Module):
    """The modules to load: ``model.language_model`` and ``lm_head`` as in ``Step3p7ForConditionalGeneration``
    (the names transformers' conversion mapping produces), and ``mtp.{k}``."""

    def __init__(self, config: Step3p7TextConfig, ext_config: Step3p7TextConfig, num_mtp: int):
        super().__init__()
        self.model = nn.Module()
        self.model.language_model = Step3p7TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(_MTPLayer(ext_config, config.num_hidden_layers + k) for k in range(num_mtp))


# --------------------------------------------------------------------------------------------- weights


class _Routes:
    """Where every checkpoint tensor goes in the reference's module tree, decided from names alone.

    Names go through transformers' conversion mapping for Step3p7 as its loader applies it: every renaming,
    then at most one converter, whose operations build the fused tensor (gate/up expert stacks). MTP layers,
    which that mapping leaves at ``model.language_model.layers.{L + k}``, are then moved to ``mtp.{k}``. ``problems``
    lists, strictly,
    every checkpoint name without a destination and every destination without a source; ``read`` then fills any
    subset of destinations (one decoder layer at a time when streaming).
    """

    def __init__(self, ckpt: HFCheckpoint, expected: set[str]):
        mapping = get_checkpoint_conversion_mapping(Step3p7Config.model_type)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.ckpt = ckpt
        cfg = ckpt.config
        self._fp32 = _ROUTER_FP32 if cfg.fp32_router else ()
        self.sources: dict[str, list[tuple[str, str | None]]] = {}  # target -> [(checkpoint name, pattern)]
        leftover: list[str] = []
        for name in ckpt.tensors:
            target, pattern = rename_source_key(name, renamings, converters)
            if (m := _LAYER_RE.match(target)) and cfg.num_layers <= int(m[1]) < cfg.num_layers + cfg.num_mtp:
                target = f"mtp.{int(m[1]) - cfg.num_layers}.{m[2]}"
            if target not in expected:
                leftover.append(name if target == name else f"{name} (as {target})")
                continue
            self.sources.setdefault(target, []).append((name, pattern))
        self.problems: list[str] = []
        for target, srcs in self.sources.items():
            pattern = srcs[0][1]
            if pattern is not None:
                have = {p for _, p in srcs}
                absent = [p for p in self._by_pattern[pattern].source_patterns if p not in have]
                if absent:
                    self.problems.append(f"{target} has {sorted(n for n, _ in srcs)} but no tensor for {absent}")
        if leftover:
            self.problems.append(f"checkpoint tensors with no Step3p7 destination: {sorted(leftover)}")
        if missing := sorted(expected - set(self.sources)):
            self.problems.append(f"parameters not filled from the checkpoint: {missing}")

    def check(self) -> None:
        if self.problems:
            raise ValueError("strict load of the HF reference failed; " + "; ".join(self.problems))

    def read(self, targets, dtype: torch.dtype, strip: str = "") -> dict[str, torch.Tensor]:
        """The tensors of `targets` (names in the reference tree), `strip` removed from their front. A fused
        tensor is built in the stored dtype and cast once (the cast is elementwise: same values, less memory)."""
        sd: dict[str, torch.Tensor] = {}
        for target in targets:
            srcs = self.sources[target]
            dt = torch.float32 if target.endswith(self._fp32) else dtype
            if srcs[0][1] is None:
                t = self.ckpt.lazy(srcs[0][0])[:].to(dt)
                sd[target[len(strip):]] = t
                continue
            conv = deepcopy(self._by_pattern[srcs[0][1]])  # each fused target its own instance, as transformers does
            for name, pattern in srcs:
                conv.add_tensor(target, name, pattern, self.ckpt.lazy(name)[:])
            for k, v in conv.convert(target).items():
                sd[k[len(strip):]] = v.to(dt)
            del conv
        return sd


def _load_checkpoint(ref: _Step35Reference, ckpt: HFCheckpoint, dtype: torch.dtype) -> None:
    """Fill ``ref`` from the checkpoint; raise ValueError listing every name without a counterpart."""
    expected = set(ref.state_dict())
    routes = _Routes(ckpt, expected)
    routes.check()
    ref.load_state_dict(routes.read(sorted(expected), dtype), strict=True, assign=True)


# --------------------------------------------------------------------------------------------- public


@dataclass
class HFReference:
    """Reference forward of a Step-3.5 HF checkpoint (CPU, eager attention, ``torch.no_grad``)."""

    config: Step35Config  # the checkpoint's config
    dtype: torch.dtype
    model: nn.Module  # Step3p7TextModel
    lm_head: nn.Module
    mtp: nn.ModuleList
    text_config: Any = None  # Step3p7TextConfig of the main stack
    mtp_config: Any = None  # Step3p7TextConfig extended over the MTP indices
    _mtp_rotary: nn.Module | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> dict[str, Any]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        input_ids = input_ids.long()
        backbone = self.model
        layers = list(backbone.layers)[: self.num_layers]
        captured: dict[int, torch.Tensor] = {}

        def hook(idx):
            def fn(_mod, _inp, out):
                captured[idx] = out[0] if isinstance(out, (tuple, list)) else out
            return fn

        handles = [backbone.embed_tokens.register_forward_hook(hook(-1))]
        handles += [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
        try:
            last = self.model(input_ids=input_ids, use_cache=False).last_hidden_state  # post final norm
            logits = self.lm_head(last)
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
        head = self.mtp[k].transformer.shared_head
        return head.output(head.norm(hidden)).float()

    def _mtp_forward(self, input_ids, h, embed) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        bsz, seq = input_ids.shape
        logits_out, hidden_out = [], []
        for k, layer in enumerate(self.mtp):
            n = seq - k - 1  # positions t whose token t+k+1 exists
            if n <= 0:
                logits_out.append(torch.empty(bsz, 0, self.config.vocab))
                hidden_out.append(torch.empty(bsz, 0, self.config.hidden, dtype=h.dtype))
                continue
            e = layer.enorm(embed(input_ids[:, k + 1:]))
            z = layer.eh_proj(torch.cat([e, layer.hnorm(h[:, :n])], dim=-1))  # embedding first, hidden second
            pos = torch.arange(n).unsqueeze(0).expand(bsz, -1)
            make_mask = create_sliding_window_causal_mask if layer.attention_type == "sliding_attention" \
                else create_causal_mask
            mask = make_mask(config=self.mtp_config, inputs_embeds=z, attention_mask=None, cache=None,
                             position_ids=pos)
            pe = self._mtp_rotary(z, pos, layer.attention_type)
            z = layer(z, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            hidden_out.append(z)
            logits_out.append(self.mtp_logits(k, z))
            h = z  # next MTP step reads this block output (pre shared_head.norm)
        return logits_out, hidden_out


def load_hf_reference(hf_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> HFReference:
    """Load a Step-3.5 HF checkpoint folder as a CPU reference model: transformers' in-tree Step3p7 text model plus
    MTP layers, loaded strictly from the safetensors. (The checkpoint's own modeling_step3p5.py runs in verify,
    streamed: ``remote_reference.RemoteReference``.)

    Example: ``load_hf_reference("ckpt", dtype=torch.bfloat16).forward(ids)["logits"]`` (ids: [B, S] token ids).
    """
    hf_dir = Path(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.config
    text_config = build_text_config(cfg)
    ext_config = build_text_config(cfg, with_mtp_layers=True)

    with torch.device("meta"):  # no random init; real tensors are assigned by the strict load
        ref = _Step35Reference(text_config, ext_config, cfg.num_mtp)
    _load_checkpoint(ref, ckpt, dtype)
    model, lm_head = ref.model.language_model, ref.lm_head
    model.rotary_emb = Step3p7RotaryEmbedding(config=text_config)  # non-persistent buffers were on meta
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"expected eager attention, got {model.config._attn_implementation}")

    mtp_rotary = Step3p7RotaryEmbedding(config=ext_config)
    ref.eval()
    for mod in (ref, model):
        meta = [n for n, t in [*mod.named_parameters(), *mod.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"tensors left uninitialised after loading: {meta}")
    return HFReference(config=cfg, dtype=dtype, model=model, lm_head=lm_head, mtp=ref.mtp, text_config=text_config,
                       mtp_config=ext_config, _mtp_rotary=mtp_rotary)


# --------------------------------------------------------------------------------------------- streamed


class StreamedReference:
    """The HF reference run one decoder layer at a time: each layer is built on the meta device, filled strictly
    from that layer's safetensors (and nothing else), run, and dropped, so memory holds one layer, not the model.

    Every checkpoint name is routed up front (``_Routes`` on a meta skeleton of the whole model), so a tensor with
    no destination or a parameter with no tensor is an error before anything runs. Call order: ``start(ids)``
    (embedding, masks, RoPE), ``layer(i, h)`` for consecutive layers, ``final(h)``, ``mtp(k, h)``.

    Example: ``r = StreamedReference("ckpt"); h = r.start(ids); t = r.layer(0, h); logits = r.final(t.out)``.
    """

    def __init__(self, hf_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.ckpt = HFCheckpoint(hf_dir)
        self.config = cfg = self.ckpt.config
        self.dtype, self.device = dtype, torch.device(device)
        self.description = f"transformers {transformers.__version__} in-tree Step3p7 layers"
        self.text_config = build_text_config(cfg)
        self.mtp_config = build_text_config(cfg, with_mtp_layers=True)
        with torch.device("meta"):
            skeleton = _Step35Reference(self.text_config, self.mtp_config, cfg.num_mtp)
        self.routes = _Routes(self.ckpt, set(skeleton.state_dict()))
        self.routes.check()
        del skeleton
        self._embeddings: torch.Tensor | None = None

    def _fill(self, module: nn.Module, prefix: str) -> nn.Module:
        targets = [t for t in self.routes.sources if t.startswith(prefix)]
        module.load_state_dict(self.routes.read(targets, self.dtype, strip=prefix), strict=True, assign=True)
        meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"tensors left uninitialised after loading {prefix}: {meta}")
        return module.to(self.device).eval()

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed `input_ids` [B, S]; prepare masks and RoPE for the layers. Returns the embeddings [B, S, H]."""
        cfg = self.config
        with torch.device("meta"):
            embed = nn.Embedding(cfg.vocab, cfg.hidden)
        embed = self._fill(embed, "model.language_model.embed_tokens.")
        ids = input_ids.long().to(self.device)
        h = embed(ids)
        del embed
        self._embeddings = h
        bsz, seq = ids.shape
        pos = torch.arange(seq, device=self.device).unsqueeze(0).expand(bsz, -1)
        self._pos = pos
        self._masks, self._pe = {}, {}
        for conf, store in ((self.text_config, "main"), (self.mtp_config, "mtp")):
            rotary = Step3p7RotaryEmbedding(config=conf).to(self.device)
            for kind in set(conf.layer_types):
                make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                self._masks[(store, kind)] = make(config=conf, inputs_embeds=h, attention_mask=None, cache=None,
                                                  position_ids=pos)
                self._pe[(store, kind)] = rotary(h, pos, kind)
        return h

    @torch.no_grad()
    def layer(self, i: int, h: torch.Tensor) -> LayerTrace:
        """Main decoder layer `i` on `h` [B, S, H], with what its sublayers saw (see LayerTrace)."""
        with torch.device("meta"):
            layer = Step3p7DecoderLayer(self.text_config, i)
        layer = self._fill(layer, f"model.language_model.layers.{i}.")
        kind = layer.attention_type
        seen: dict[str, Any] = {}
        hooks = [layer.post_attention_layernorm.register_forward_hook(
            lambda _m, args, out: seen.update(mid=args[0], x=out))]
        moe = isinstance(layer.mlp, Step3p7SparseMoeBlock)
        if moe:
            hooks.append(layer.mlp.gate.register_forward_hook(lambda _m, _a, out: seen.update(route=out)))
        try:
            out = layer(h, attention_mask=self._masks[("main", kind)], position_ids=self._pos,
                        position_embeddings=self._pe[("main", kind)])
        finally:
            for hk in hooks:
                hk.remove()
        trace = LayerTrace(out=out, mid=seen["mid"])
        if moe:
            _, weights, idx = seen["route"]
            x = seen["x"]
            flat = x.reshape(-1, x.shape[-1])
            ones = torch.ones(idx.shape[0], 1, dtype=weights.dtype, device=weights.device)
            slots = torch.stack([layer.mlp.experts(flat, idx[:, j:j + 1], ones) for j in range(idx.shape[1])])
            trace = LayerTrace(out=out, mid=seen["mid"], x=x, idx=idx, weights=weights, slots=slots)
        del layer
        return trace

    @torch.no_grad()
    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last layer's output: logits [B, S, V] (fp32)."""
        cfg = self.config
        with torch.device("meta"):
            norm = Step3p7RMSNorm(cfg.hidden, eps=self.text_config.rms_norm_eps)
            head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        norm = self._fill(norm, "model.language_model.norm.")
        head = self._fill(head, "lm_head.")
        return head(norm(h)).float()

    @torch.no_grad()
    def mtp(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP layer k on `h` (the last main layer's output for k = 0, else MTP layer k-1's block output; the
        first S-k positions are read): its block output [B, S-k-1, H] and its own head's logits (fp32)."""
        L = self.config.num_layers
        with torch.device("meta"):
            layer = _MTPLayer(self.mtp_config, L + k)
        layer = self._fill(layer, f"mtp.{k}.")
        kind = layer.attention_type
        cos, sin = self._pe[("mtp", kind)]

        def block(z, n):
            return layer(z, attention_mask=self._masks[("mtp", kind)][..., :n, :n], position_ids=self._pos[:, :n],
                         position_embeddings=(cos[:, :n], sin[:, :n]))

        return mtp_step(layer, self._embeddings, h, k, block)

    @torch.no_grad()
    def mtp_logits(self, k: int, normed: torch.Tensor) -> torch.Tensor:
        """MTP layer k's own output head (shared_head.output only) on an already normalised block output."""
        cfg = self.config
        with torch.device("meta"):
            head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        head = self._fill(head, f"mtp.{k}.transformer.shared_head.output.")
        return head(normed.to(self.device, self.dtype)).float()
