"""The one table that names every Step-3.5-Flash tensor on both sides, and the plan it expands to.

A `Rule` says: these HF tensors (with these shapes, in the config's dimensions) <-> this Megatron key,
through this tensor kind (stepconv.kinds). `plan()` expands the table for one model and parallel layout
into `Entry`s (one per Megatron key per PP stage; routed experts one per expert); conversions, `inspect`
and `verify` all walk the same plan, and `hf_shapes()` is the plan's HF side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

from .config import AttnShape, Step35Config, StepconvError
from .kinds import (COLUMN, EXTRA, QKVG_, REPLICATE, REPLICATE_FP32, ROW, SIDECAR, SWIGLU, VOCAB, Kind,
                    SplitContext)

SPECS = ("te", "local")

# where: layer (every decoder block incl. MTP blocks) | dense | moe | mtp | first | last
# shapes: one tuple of dimension names per HF tensor, resolved per layer by `_dims`


@dataclass(frozen=True)
class Rule:
    where: str
    hf: tuple[str, ...]
    local: str
    kind: Kind
    shapes: tuple[tuple[str, ...], ...] = ()
    te: str | None = None  # TE-spec key when it differs; "" = absent in that spec

    def key(self, spec: str) -> str:
        return self.local if spec == "local" or self.te is None else self.te


def _r(where: str, hf: tuple[str, ...] | str, local: str, kind: Kind, *shapes: tuple[str, ...],
       te: str | None = None) -> Rule:
    return Rule(where, (hf,) if isinstance(hf, str) else hf, local, kind, shapes, te)


def _x(where: str, local: str, te: str | None = None) -> Rule:
    return Rule(where, (), local, EXTRA, (), te)


RULES: tuple[Rule, ...] = (
    _r("first", "model.embed_tokens.weight", "embedding.word_embeddings.weight", VOCAB, ("V", "H")),
    # decoder block (main layers and MTP transformer_layer)
    _r("layer", "input_layernorm.weight", "input_layernorm.weight", REPLICATE, ("H",),
       te="self_attention.linear_qkv.layer_norm_weight"),
    _r("layer", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.g_proj.weight"), "self_attention.linear_qkv.weight", QKVG_,
       ("Q", "H"), ("KV", "H"), ("KV", "H"), ("NH", "H")),
    _x("layer", "self_attention.linear_qkv._extra_state"),
    _x("layer", "", te="self_attention.core_attention._extra_state"),
    _r("layer", "self_attn.q_norm.weight", "self_attention.q_layernorm.weight", REPLICATE, ("HD",)),
    _r("layer", "self_attn.k_norm.weight", "self_attention.k_layernorm.weight", REPLICATE, ("HD",)),
    _r("layer", "self_attn.o_proj.weight", "self_attention.linear_proj.weight", ROW, ("H", "Q")),
    _x("layer", "self_attention.linear_proj._extra_state"),
    # dense FFN
    _r("dense", "post_attention_layernorm.weight", "pre_mlp_layernorm.weight", REPLICATE, ("H",),
       te="mlp.linear_fc1.layer_norm_weight"),
    _r("dense", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.linear_fc1.weight", SWIGLU, ("F", "H"), ("F", "H")),
    _x("dense", "mlp.linear_fc1._extra_state"),
    _r("dense", "mlp.down_proj.weight", "mlp.linear_fc2.weight", ROW, ("H", "F")),
    _x("dense", "mlp.linear_fc2._extra_state"),
    # MoE FFN (TE keeps a standalone pre-MLP norm on MoE layers); {e} = expert, one entry each
    _r("moe", "post_attention_layernorm.weight", "pre_mlp_layernorm.weight", REPLICATE, ("H",)),
    _r("moe", "moe.gate.weight", "mlp.router.weight", REPLICATE, ("E", "H")),
    _r("moe", "moe.router_bias", "mlp.router.expert_bias", REPLICATE_FP32, ("E",)),
    _r("moe", ("moe.gate_proj.weight", "moe.up_proj.weight"), "mlp.experts.local_experts.{e}.linear_fc1.weight",
       SWIGLU, ("E", "Fm", "H"), ("E", "Fm", "H"), te="mlp.experts.linear_fc1.weight{e}"),
    _x("moe", "mlp.experts.local_experts.{e}.linear_fc1._extra_state", te="mlp.experts.linear_fc1._extra_state"),
    _r("moe", "moe.down_proj.weight", "mlp.experts.local_experts.{e}.linear_fc2.weight", ROW, ("E", "H", "Fm"),
       te="mlp.experts.linear_fc2.weight{e}"),
    _x("moe", "mlp.experts.local_experts.{e}.linear_fc2._extra_state", te="mlp.experts.linear_fc2._extra_state"),
    _r("moe", ("share_expert.gate_proj.weight", "share_expert.up_proj.weight"), "mlp.shared_experts.linear_fc1.weight",
       SWIGLU, ("Fs", "H"), ("Fs", "H")),
    _x("moe", "mlp.shared_experts.linear_fc1._extra_state"),
    _r("moe", "share_expert.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", ROW, ("H", "Fs")),
    _x("moe", "mlp.shared_experts.linear_fc2._extra_state"),
    # MTP block inputs and head (HF index num_hidden_layers + k -> mtp.layers.k)
    _r("mtp", "enorm.weight", "enorm.weight", REPLICATE, ("H",)),
    _r("mtp", "hnorm.weight", "hnorm.weight", REPLICATE, ("H",)),
    _r("mtp", "eh_proj.weight", "eh_proj.weight", COLUMN, ("H", "H2")),
    _x("mtp", "eh_proj._extra_state"),
    _r("mtp", "transformer.shared_head.norm.weight", "final_layernorm.weight", REPLICATE, ("H",)),
    _r("mtp", "transformer.shared_head.output.weight", "", SIDECAR, ("V", "H")),
    # last stage
    _r("last", "model.norm.weight", "decoder.final_layernorm.weight", REPLICATE, ("H",)),
    _r("last", "lm_head.weight", "output_layer.weight", VOCAB, ("V", "H")),
    _x("last", "output_layer._extra_state"),
)

MTP_BLOCK = "transformer_layer"  # megatron-core 0.16 name; >= 0.17 state_dict() says mtp_model_layer
MTP_BLOCK_ALIASES = ("transformer_layer", "mtp_model_layer")


def _dims(cfg: Step35Config, attn: AttnShape | None) -> dict[str, int]:
    d = {"H": cfg.hidden, "H2": 2 * cfg.hidden, "V": cfg.vocab, "E": cfg.num_experts, "F": cfg.ffn,
         "Fm": cfg.moe_ffn, "Fs": cfg.shared_ffn}
    if attn is not None:
        d.update(Q=attn.q_rows, KV=attn.kv_rows, NH=attn.heads, HD=attn.head_dim)
    return d


def detect_spec(keys) -> str:
    """TE fuses the input norm into linear_qkv; the local spec keeps input_layernorm."""
    return "te" if any(k.endswith("linear_qkv.layer_norm_weight") for k in keys) else "local"


def detect_mtp_block(keys) -> str:
    for alias in MTP_BLOCK_ALIASES:
        if any(f".{alias}." in k for k in keys):
            return alias
    return MTP_BLOCK


MAX_PARALLEL = 1 << 14  # far above any real layout, far below a per-rank list that exhausts memory


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout: tensor-, pipeline- and expert-parallel sizes."""

    tp_size: int = 1
    pp_size: int = 1
    ep_size: int = 1

    @classmethod
    def from_args(cls, args: Any, where: str) -> "Layout":
        """The layout a Megatron checkpoint's args record (the one place it is read)."""
        try:
            lay = cls(int(args.tensor_model_parallel_size), int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
                      int(getattr(args, "expert_model_parallel_size", 1) or 1))
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise StepconvError(f"{where}: args lack tensor_model_parallel_size; not a Megatron checkpoint") from None
        if not all(1 <= n <= MAX_PARALLEL for n in (lay.tp_size, lay.pp_size, lay.ep_size)):  # before any per-rank list
            raise StepconvError(f"{where}: args record {lay}; each size must be from 1 to {MAX_PARALLEL}")
        return lay

    def ranks(self) -> Iterator[tuple[int, int, int]]:
        """(tp_rank, pp_rank, ep_rank) of every rank file, in file order."""
        for p in range(self.pp_size):
            for e in range(self.ep_size):
                for t in range(self.tp_size):
                    yield t, p, e

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.ep_size

    def __str__(self) -> str:
        return f"TP={self.tp_size} PP={self.pp_size} EP={self.ep_size}"


@dataclass(frozen=True)
class Entry:
    """One Megatron key on one PP stage (on every EP rank unless `ep_rank` is set), built from `hf`."""

    hf: tuple[str, ...]
    key: str
    kind: Kind
    stage: int  # PP rank holding it
    ctx: SplitContext = field(compare=False)
    hf_shapes: tuple[tuple[int, ...], ...] = ()  # whole HF tensors (expert stacks included)
    ep_rank: int | None = None  # None: on every EP rank
    expert: int | None = None  # global expert index: sources are expert `expert` of each stack
    layer: int | None = None  # global HF layer index, for messages and ordering
    replica: bool = False  # a second copy of a tensor another entry already carries (embedding on the MTP stage)

    @cached_property
    def source_shapes(self) -> tuple[tuple[int, ...], ...]:
        """What `kind.split` receives: the HF tensors, or one expert's slice of each stack."""
        return tuple(s[1:] for s in self.hf_shapes) if self.expert is not None else self.hf_shapes

    def rank_shape(self) -> tuple[int, ...] | None:
        """This entry's per-TP-rank Megatron shape (None for `_extra_state`)."""
        if self.kind is EXTRA:
            return None
        return self.kind.rank_shape(self.source_shapes, self.ctx)

    def on(self, ep_rank: int) -> bool:
        return self.ep_rank is None or self.ep_rank == ep_rank


def plan(cfg: Step35Config, layout: Layout, spec: str = "local", mtp_block: str = MTP_BLOCK) -> list[Entry]:
    """Expand RULES for this model and layout, in HF order."""
    if spec not in SPECS:
        raise StepconvError(f"--spec must be one of {', '.join(SPECS)}; got {spec!r}")
    L, M = cfg.num_layers, cfg.num_mtp
    per_stage = L // layout.pp_size
    last = layout.pp_size - 1
    e_local = cfg.num_experts // layout.ep_size if cfg.num_experts else 0
    base = SplitContext(layout.tp_size, None, cfg.vocab, cfg.padded_vocab(layout.tp_size))
    out: list[Entry] = []

    def emit(rule: Rule, hf_prefix: str, mc_prefix: str, stage: int, layer: int | None, attn: AttnShape | None,
             replica: bool = False):
        key = rule.key(spec)
        if rule.kind is EXTRA and not key:
            return
        dims = _dims(cfg, attn)
        hf = tuple(hf_prefix + h for h in rule.hf)
        shapes = tuple(tuple(dims[d] for d in s) for s in rule.shapes)
        ctx = SplitContext(base.tp_size, attn, base.vocab, base.padded_vocab) if rule.kind is QKVG_ else base
        common = dict(hf=hf, kind=rule.kind, stage=stage, ctx=ctx, hf_shapes=shapes, layer=layer)
        if "{e}" in key:
            for e in range(cfg.num_experts):
                out.append(Entry(key=mc_prefix + key.format(e=e % e_local), ep_rank=e // e_local, expert=e, **common))
        elif rule.kind is EXTRA and spec == "te" and "experts.linear_fc" in key:
            for p in range(layout.ep_size):  # TEGroupedMLP: one extra state per EP rank
                out.append(Entry(key=mc_prefix + key, ep_rank=p, **common))
        else:
            out.append(Entry(key=mc_prefix + key if key else "", replica=replica, **common))

    for rule in RULES:
        if rule.where == "first":
            emit(rule, "", "", 0, None, None)
            if M and last != 0:  # megatron-core builds the embedding on the MTP stage too
                emit(rule, "", "", last, None, None, replica=True)
    for i in range(L + M):
        is_mtp = i >= L
        stage = last if is_mtp else i // per_stage
        hf_prefix = f"model.layers.{i}."
        mc_prefix = f"mtp.layers.{i - L}.{mtp_block}." if is_mtp else f"decoder.layers.{i - stage * per_stage}."
        ffn = "moe" if cfg.is_moe(i) else "dense"
        for rule in RULES:
            if rule.where in ("layer", ffn):
                emit(rule, hf_prefix, mc_prefix, stage, i, cfg.attn(i))
            elif rule.where == "mtp" and is_mtp:
                emit(rule, hf_prefix, f"mtp.layers.{i - L}.", stage, i, cfg.attn(i))
    for rule in RULES:
        if rule.where == "last" and not (cfg.tied and rule.local in ("output_layer.weight", "output_layer._extra_state")):
            emit(rule, "", "", last, None, None)
    return out


def rank_keys(entries: list[Entry], layout: Layout) -> dict[tuple[int, int, int], list[str]]:
    """Expected `model` keys of every rank file, in write order."""
    out: dict[tuple[int, int, int], list[str]] = {r: [] for r in layout.ranks()}
    for e in entries:
        if not e.kind.megatron:
            continue
        for p in range(layout.ep_size) if e.ep_rank is None else (e.ep_rank,):
            for t in range(layout.tp_size):
                out[(t, e.stage, p)].append(e.key)
    return out


def hf_shapes(cfg: Step35Config, entries: list[Entry] | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (what a complete checkpoint holds): the plan's HF side
    (of `entries` when a plan is at hand; every layout's plan names the same HF tensors)."""
    out: dict[str, tuple[int, ...]] = {}
    for e in entries if entries is not None else plan(cfg, Layout(), "local"):
        if not e.replica:
            out.update(zip(e.hf, e.hf_shapes))
    return out


def respec_state_dict(sd: dict, cfg: Step35Config, layout: Layout, stage: int, ep_rank: int, *,
                      src: str, dst: str, src_mtp: str = MTP_BLOCK, dst_mtp: str = MTP_BLOCK) -> dict:
    """One rank's state dict renamed from spec `src` to spec `dst` (TE <-> local): tensors kept,
    `_extra_state` entries made what `dst` expects (None). Used to run a TE-spec checkpoint on the
    local spec (CPU) and to read megatron >= 0.17 `mtp_model_layer` names."""
    def keyed(spec: str, mtp: str) -> tuple[list[Entry], list[Entry]]:
        es = [e for e in plan(cfg, layout, spec, mtp) if e.stage == stage and e.on(ep_rank) and e.kind.megatron]
        return [e for e in es if e.kind is not EXTRA], [e for e in es if e.kind is EXTRA]

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
