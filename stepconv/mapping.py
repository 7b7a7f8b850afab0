"""The one table that names every Step-3.5-Flash tensor on both sides, and the plan it expands to.

A `Rule` says: these HF tensors <-> this Megatron key, through this layout kind. `plan()`
expands the table for one model and parallel layout into `Entry`s (one per Megatron key
per PP stage, experts per EP rank); both conversions and `inspect` walk the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .config import AttnShape, Step35Config, StepconvError

SPECS = ("te", "local")

# where: layer (every decoder block incl. MTP blocks) | dense | moe | mtp | first | last
# kind: replicate | column | row | vocab | swiglu | qkvg | expert_fc1 | expert_fc2 | extra (Megatron `_extra_state`)
#       | sidecar (kept beside the rank files)


@dataclass(frozen=True)
class Rule:
    where: str
    hf: tuple[str, ...]
    local: str
    kind: str
    te: str | None = None  # TE-spec key when it differs; "" = absent in that spec

    def key(self, spec: str) -> str:
        return self.local if spec == "local" or self.te is None else self.te


def _x(where: str, local: str, te: str | None = None) -> Rule:
    return Rule(where, (), local, "extra", te)


RULES: tuple[Rule, ...] = (
    Rule("first", ("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab"),
    # decoder block (main layers and MTP transformer_layer)
    Rule("layer", ("input_layernorm.weight",), "input_layernorm.weight", "replicate",
         te="self_attention.linear_qkv.layer_norm_weight"),
    Rule("layer", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.g_proj.weight"), "self_attention.linear_qkv.weight", "qkvg"),
    _x("layer", "self_attention.linear_qkv._extra_state"),
    _x("layer", "", te="self_attention.core_attention._extra_state"),
    Rule("layer", ("self_attn.q_norm.weight",), "self_attention.q_layernorm.weight", "replicate"),
    Rule("layer", ("self_attn.k_norm.weight",), "self_attention.k_layernorm.weight", "replicate"),
    Rule("layer", ("self_attn.o_proj.weight",), "self_attention.linear_proj.weight", "row"),
    _x("layer", "self_attention.linear_proj._extra_state"),
    # dense FFN
    Rule("dense", ("post_attention_layernorm.weight",), "pre_mlp_layernorm.weight", "replicate",
         te="mlp.linear_fc1.layer_norm_weight"),
    Rule("dense", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", "swiglu"),
    _x("dense", "mlp.linear_fc1._extra_state"),
    Rule("dense", ("mlp.down_proj.weight",), "mlp.linear_fc2.weight", "row"),
    _x("dense", "mlp.linear_fc2._extra_state"),
    # MoE FFN (TE keeps a standalone pre-MLP norm on MoE layers)
    Rule("moe", ("post_attention_layernorm.weight",), "pre_mlp_layernorm.weight", "replicate"),
    Rule("moe", ("moe.gate.weight",), "mlp.router.weight", "replicate"),
    Rule("moe", ("moe.router_bias",), "mlp.router.expert_bias", "replicate"),
    Rule("moe", ("moe.gate_proj.weight", "moe.up_proj.weight"), "mlp.experts.local_experts.{e}.linear_fc1.weight",
         "expert_fc1", te="mlp.experts.linear_fc1.weight{e}"),
    _x("moe", "mlp.experts.local_experts.{e}.linear_fc1._extra_state", te="mlp.experts.linear_fc1._extra_state"),
    Rule("moe", ("moe.down_proj.weight",), "mlp.experts.local_experts.{e}.linear_fc2.weight", "expert_fc2",
         te="mlp.experts.linear_fc2.weight{e}"),
    _x("moe", "mlp.experts.local_experts.{e}.linear_fc2._extra_state", te="mlp.experts.linear_fc2._extra_state"),
    Rule("moe", ("share_expert.gate_proj.weight", "share_expert.up_proj.weight"),
         "mlp.shared_experts.linear_fc1.weight", "swiglu"),
    _x("moe", "mlp.shared_experts.linear_fc1._extra_state"),
    Rule("moe", ("share_expert.down_proj.weight",), "mlp.shared_experts.linear_fc2.weight", "row"),
    _x("moe", "mlp.shared_experts.linear_fc2._extra_state"),
    # MTP block inputs and head (HF index num_hidden_layers + k -> mtp.layers.k)
    Rule("mtp", ("enorm.weight",), "enorm.weight", "replicate"),
    Rule("mtp", ("hnorm.weight",), "hnorm.weight", "replicate"),
    Rule("mtp", ("eh_proj.weight",), "eh_proj.weight", "column"),
    _x("mtp", "eh_proj._extra_state"),
    Rule("mtp", ("transformer.shared_head.norm.weight",), "final_layernorm.weight", "replicate"),
    Rule("mtp", ("transformer.shared_head.output.weight",), "", "sidecar"),
    # last stage
    Rule("last", ("model.norm.weight",), "decoder.final_layernorm.weight", "replicate"),
    Rule("last", ("lm_head.weight",), "output_layer.weight", "vocab"),
    _x("last", "output_layer._extra_state"),
)

MTP_BLOCK = "transformer_layer"  # megatron-core 0.16 name; >= 0.17 state_dict() says mtp_model_layer
MTP_BLOCK_ALIASES = ("transformer_layer", "mtp_model_layer")


def detect_spec(keys) -> str:
    """TE fuses the input norm into linear_qkv; the local spec keeps input_layernorm."""
    return "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else "local"


def detect_mtp_block(keys) -> str:
    for alias in MTP_BLOCK_ALIASES:
        if any(f".{alias}." in k for k in keys):
            return alias
    return MTP_BLOCK


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def ranks(self) -> Iterator[tuple[int, int, int]]:
        for p in range(self.pp):
            for e in range(self.ep):
                for t in range(self.tp):
                    yield t, p, e

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} EP={self.ep}"


@dataclass(frozen=True)
class Entry:
    """One Megatron key on one PP stage (every EP rank unless `ep` is set), built from `hf`."""

    hf: tuple[str, ...]
    key: str
    kind: str
    pp: int
    ep: int | None = None
    expert: int | None = None
    attn: AttnShape | None = None
    layer: int | None = None  # global HF layer index, for messages and ordering
    replica: bool = False  # a second copy of a tensor another entry already carries (embedding on the MTP stage)


def plan(cfg: Step35Config, layout: Layout, spec: str = "local", mtp_block: str = MTP_BLOCK) -> list[Entry]:
    """Expand RULES for this model and layout, in HF order."""
    if spec not in SPECS:
        raise StepconvError(f"--spec must be one of {', '.join(SPECS)}; got {spec!r}")
    L, M = cfg.num_layers, cfg.num_mtp
    per_stage = L // layout.pp
    last = layout.pp - 1
    e_local = cfg.num_experts // layout.ep if cfg.num_experts else 0
    out: list[Entry] = []

    def emit(rule: Rule, hf_prefix: str, mc_prefix: str, stage: int, layer: int | None, attn: AttnShape | None,
             replica: bool = False):
        key = rule.key(spec)
        if rule.kind == "extra" and not key:
            return
        hf = tuple(hf_prefix + h for h in rule.hf)
        if "{e}" in key:
            for e in range(cfg.num_experts):
                k = mc_prefix + key.format(e=e % e_local)
                out.append(Entry(hf, k, rule.kind, stage, ep=e // e_local, expert=e, layer=layer))
            return
        if rule.kind == "extra" and spec == "te" and "experts.linear_fc" in key:
            for p in range(layout.ep):
                out.append(Entry(hf, mc_prefix + key, "extra", stage, ep=p, layer=layer))
            return
        out.append(Entry(hf, mc_prefix + key if key else "", rule.kind, stage, attn=attn, layer=layer, replica=replica))

    for rule in RULES:
        if rule.where == "first":
            emit(rule, "", "", 0, None, None)
            if M and last != 0:  # megatron-core builds the embedding on the MTP stage too
                emit(rule, "", "", last, None, None, replica=True)
    for i in range(L + M):
        is_mtp = i >= L
        stage = last if is_mtp else i // per_stage
        hf_prefix = f"model.layers.{i}."
        if is_mtp:
            mc_prefix = f"mtp.layers.{i - L}.{mtp_block}."
        else:
            mc_prefix = f"decoder.layers.{i - stage * per_stage}."
        ffn = "moe" if cfg.is_moe(i) else "dense"
        for rule in RULES:
            if rule.where in ("layer", ffn):
                emit(rule, hf_prefix, mc_prefix, stage, i, cfg.attn(i))
            elif rule.where == "mtp" and is_mtp:
                emit(rule, hf_prefix, f"mtp.layers.{i - L}.", stage, i, None)
    for rule in RULES:
        if rule.where == "last":
            if rule.hf == ("lm_head.weight",) and cfg.tied:
                continue
            if rule.kind == "extra" and cfg.tied:
                continue
            emit(rule, "", "", last, None, None)
    return out


def rank_keys(entries: list[Entry], layout: Layout) -> dict[tuple[int, int, int], list[str]]:
    """Expected `model` keys of every rank file, in write order."""
    out: dict[tuple[int, int, int], list[str]] = {r: [] for r in layout.ranks()}
    for e in entries:
        if e.kind == "sidecar":
            continue
        eps = range(layout.ep) if e.ep is None else (e.ep,)
        for p in eps:
            for t in range(layout.tp):
                out[(t, e.pp, p)].append(e.key)
    return out


def hf_shapes(cfg: Step35Config) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (what a complete checkpoint holds)."""
    H, V = cfg.hidden, cfg.vocab
    E, Fm, Fs, F = cfg.num_experts, cfg.moe_ffn, cfg.shared_ffn, cfg.ffn
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_layers + cfg.num_mtp):
        a = cfg.attn(i)
        p = f"model.layers.{i}."
        if i >= cfg.num_layers:
            out.update({p + "enorm.weight": (H,), p + "hnorm.weight": (H,), p + "eh_proj.weight": (H, 2 * H),
                        p + "transformer.shared_head.norm.weight": (H,),
                        p + "transformer.shared_head.output.weight": (V, H)})
        out.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                    p + "self_attn.q_proj.weight": (a.q_rows, H), p + "self_attn.k_proj.weight": (a.kv_rows, H),
                    p + "self_attn.v_proj.weight": (a.kv_rows, H), p + "self_attn.g_proj.weight": (a.heads, H),
                    p + "self_attn.o_proj.weight": (H, a.q_rows), p + "self_attn.q_norm.weight": (a.head_dim,),
                    p + "self_attn.k_norm.weight": (a.head_dim,)})
        if cfg.is_moe(i):
            out.update({p + "moe.gate.weight": (E, H), p + "moe.router_bias": (E,),
                        p + "moe.gate_proj.weight": (E, Fm, H), p + "moe.up_proj.weight": (E, Fm, H),
                        p + "moe.down_proj.weight": (E, H, Fm), p + "share_expert.gate_proj.weight": (Fs, H),
                        p + "share_expert.up_proj.weight": (Fs, H), p + "share_expert.down_proj.weight": (H, Fs)})
        else:
            out.update({p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                        p + "mlp.down_proj.weight": (H, F)})
    out["model.norm.weight"] = (H,)
    if not cfg.tied:
        out["lm_head.weight"] = (V, H)
    return out


def respec_state_dict(sd: dict, cfg: Step35Config, layout: Layout, stage: int, ep_rank: int, *,
                      src: str, dst: str, src_mtp: str = MTP_BLOCK, dst_mtp: str = MTP_BLOCK) -> dict:
    """One rank's state dict renamed from spec `src` to spec `dst` (TE <-> local): tensors kept,
    `_extra_state` entries made what `dst` expects (None). Used to run a TE-spec checkpoint on the
    local spec (CPU) and to read megatron >= 0.17 `mtp_model_layer` names."""
    def keyed(spec: str, mtp: str) -> tuple[list[Entry], list[Entry]]:
        es = [e for e in plan(cfg, layout, spec, mtp) if e.pp == stage and (e.ep is None or e.ep == ep_rank)]
        return [e for e in es if e.kind not in ("extra", "sidecar")], [e for e in es if e.kind == "extra"]

    a, _ = keyed(src, src_mtp)
    b, b_extra = keyed(dst, dst_mtp)
    out = {}
    for x, y in zip(a, b):
        if x.key not in sd:
            raise StepconvError(f"rank file (stage {stage}, EP rank {ep_rank}) lacks {x.key} for spec {src}")
        out[y.key] = sd[x.key]
    for e in b_extra:
        out[e.key] = None
    return out
