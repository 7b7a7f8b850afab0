"""The one table that names every Step-3.5-Flash tensor on both sides, and the plan it expands to.

A `Rule` says: these HF tensors (with these shapes, in the config's dimensions) <-> this Megatron key,
through this tensor kind (stepconv.kinds). `plan()` expands the table for one model and parallel layout
into `Entry`s (one per Megatron key per PP stage and model chunk; routed experts one per expert); conversions,
`inspect` and `verify` all walk the same plan, and `hf_shapes()` is the plan's HF side. `Layout` is the parallel
layout the plan is for, and everything layout-shaped (stages, chunks, rank folders, shard indices) derives from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from .config import AttnShape, Step35Config, StepconvError, layer_chunks
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
MAX_WORLD = 1 << 18  # ranks of megatron-core's grid (`Layout.grid`): a few tens of MB of tuples at most


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout: tensor-, pipeline- and expert-parallel sizes, the expert tensor-parallel size,
    uneven first/last pipeline stages and virtual pipeline stages (Megatron-LM's expert_tensor_parallel_size,
    decoder_first/last_pipeline_num_layers and virtual_pipeline_model_parallel_size).

    Everything layout-shaped derives from here: which global layer sits in which stage, chunk and local index
    (`place`, from `config.layer_chunks`), which rank folders exist and which expert shard each holds (`ranks`,
    `expert_tp_rank`, from megatron-core's rank grid), and under which state-dict key a chunk lives (`model_key`).
    `etp_size` None means Megatron's default (= TP) and `vpp_size` 1 means none; both are normalised, so
    `Layout(2) == Layout(2, etp_size=2)`.
    """

    tp_size: int = 1
    pp_size: int = 1
    ep_size: int = 1
    etp_size: int | None = None  # routed experts' TP size; None -> tp_size (so always an int once built)
    pp_first: int | None = None  # layers on the first PP stage (None: an even share)
    pp_last: int | None = None  # layers on the last PP stage
    vpp_size: int | None = None  # virtual stages (model chunks) per PP rank; None without VPP

    def __post_init__(self):
        if self.etp_size is None:
            object.__setattr__(self, "etp_size", self.tp_size)
        if self.vpp_size == 1:
            object.__setattr__(self, "vpp_size", None)

    @classmethod
    def from_args(cls, args: Any, where: str) -> "Layout":
        """The layout a Megatron checkpoint's args record (the one place it is read). Megatron-LM's validate_args
        stores virtual_pipeline_model_parallel_size; a run may instead have set num_virtual_stages_per_pipeline_rank
        or num_layers_per_virtual_pipeline_stage (VPP = layers per stage / that)."""
        def get(name: str) -> int | None:
            v = getattr(args, name, None)
            return None if v is None else int(v)

        try:
            tp = int(args.tensor_model_parallel_size)
            pp, ep = get("pipeline_model_parallel_size") or 1, get("expert_model_parallel_size") or 1
            etp = get("expert_tensor_parallel_size")
            first, last = get("decoder_first_pipeline_num_layers"), get("decoder_last_pipeline_num_layers")
            vpp = get("virtual_pipeline_model_parallel_size") or get("num_virtual_stages_per_pipeline_rank")
            per_chunk = get("num_layers_per_virtual_pipeline_stage")
            num_layers = get("num_layers")
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise StepconvError(f"{where}: args lack tensor_model_parallel_size; not a Megatron checkpoint") from None
        for name in ("pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                     "account_for_loss_in_pipeline_split"):
            if getattr(args, name, None):
                raise StepconvError(f"{where}: args set {name}; stepconv reads even, first/last-stage "
                                    f"(decoder_first/last_pipeline_num_layers) and virtual-stage pipeline layouts")
        sizes = [n for n in (tp, pp, ep, etp, vpp, per_chunk) if n is not None]
        if not all(1 <= n <= MAX_PARALLEL for n in sizes):  # before any per-rank list
            raise StepconvError(f"{where}: args record parallel sizes {sizes}; each must be from 1 to {MAX_PARALLEL}")
        if vpp is None and per_chunk and pp > 1:
            if first is not None or last is not None or not num_layers or num_layers % pp or (num_layers // pp) % per_chunk:
                raise StepconvError(f"{where}: args set num_layers_per_virtual_pipeline_stage {per_chunk}, which does "
                                    f"not split {num_layers} layers over PP {pp} evenly (Megatron-LM rejects it)")
            vpp = num_layers // pp // per_chunk
        lay = cls(tp, pp, ep, etp, first, last, vpp)
        if lay.world_size > MAX_WORLD:
            raise StepconvError(f"{where}: args record {lay}: {lay.world_size} ranks; stepconv plans up to {MAX_WORLD}")
        return lay

    # --- pipeline: which stage, chunk and local index each layer has ---------------------------
    @property
    def chunks_per_stage(self) -> int:
        return self.vpp_size or 1

    def model_key(self, chunk: int) -> str:
        """The rank file's state-dict key of one model chunk: `model`, or `model0`.. with VPP (Megatron-LM's)."""
        return "model" if self.vpp_size is None else f"model{chunk}"

    def model_keys(self) -> list[str]:
        return [self.model_key(c) for c in range(self.chunks_per_stage)]

    def chunks(self, num_layers: int) -> tuple[tuple[range, ...], ...]:
        """`[pp_rank][vp_stage]` -> the global layers that chunk builds (config.layer_chunks; ValueError if none)."""
        return layer_chunks(num_layers, self.pp_size, self.vpp_size, self.pp_first, self.pp_last)

    def place(self, num_layers: int) -> list[tuple[int, int, int]]:
        """(pp_rank, vp_stage, local index) of every global decoder layer."""
        return _placement(self, num_layers)

    def problems(self, cfg: Step35Config, *, legacy: bool = True) -> list[str]:
        """Everything invalid about this layout for `cfg`, one line each naming the valid values; `legacy`: also
        what per-rank files cannot hold (`rank_problems`)."""
        etp = self.etp_size if self.etp_size != self.tp_size else None  # (following TP: checked as TP)
        out = cfg.parallel_problems(self.tp_size, self.pp_size, self.ep_size, etp=etp,
                                    pp_first=self.pp_first, pp_last=self.pp_last, vpp=self.vpp_size)
        if not out and self.world_size > MAX_WORLD:  # (before any per-rank list)
            out.append(f"{self} needs {self.world_size} ranks; stepconv plans layouts of up to {MAX_WORLD}")
        return out + (self.rank_problems() if legacy and not out else [])

    def describe(self, num_layers: int) -> list[str]:
        """Where the layers sit, one line per PP stage: "stage 1: layers 2..3 (model0), 6..7 (model1)"."""
        out = []
        for p, stage in enumerate(self.chunks(num_layers)):
            parts = [(f"{r.start}..{r.stop - 1}" if len(r) > 1 else str(r.start)) + (f" (model{c})" if self.vpp_size
                                                                                       else "")
                     for c, r in enumerate(stage)]
            out.append(f"stage {p}: layers {', '.join(parts)}")
        return out

    # --- ranks: megatron-core's grid and the rank folders Megatron-LM writes --------------------------
    @property
    def world_size(self) -> int:
        """Processes megatron-core needs for this layout (data-parallel 1 where it can be): lcm(TP, ETP x EP) x PP."""
        return math.lcm(self.tp_size, self.etp_size * self.ep_size) * self.pp_size

    def grid(self) -> list[tuple[int, int, int, int]]:
        """(tp_rank, pp_rank, ep_rank, etp_rank) of every global rank of a `world_size` world, in rank order:
        megatron-core's default order tp-cp-ep-dp-pp (CP 1), where dense parts are grouped TP x DP x PP and
        experts ETP x EP x EDP x PP over the same ranks."""
        return _grid(self)

    def ranks(self) -> list[tuple[int, int, int]]:
        """(tp_rank, pp_rank, ep_rank) of every rank file, in file order: the distinct ones of `grid()` (each is
        one `mp_rank_TT[_PPP][_EEE]` folder). Megatron-LM writes each from one rank of that grid, so with ETP
        unlike TP only some TP x EP pairs exist (TP=2 EP=2 ETP=1: (0, 0) and (1, 1))."""
        return list(_ranks(self))

    def tp_ranks(self, pp_rank: int, ep_rank: int) -> tuple[int, ...]:
        """The TP ranks with a rank folder at this PP stage and EP rank."""
        return _tp_ranks(self, pp_rank, ep_rank)

    def expert_tp_rank(self, tp_rank: int, pp_rank: int, ep_rank: int) -> int:
        """The ETP shard of the routed experts in rank folder (tp_rank, pp_rank, ep_rank)."""
        shards = _expert_shards(self)[(tp_rank, pp_rank, ep_rank)]
        if len(shards) != 1:
            raise StepconvError(f"internal: rank folder {(tp_rank, pp_rank, ep_rank)} of {self} holds ETP shards "
                                f"{sorted(shards)}")
        return next(iter(shards))

    def shard_index(self, routed: bool, tp_rank: int, pp_rank: int, ep_rank: int) -> int:
        """Which of an entry's shards (TP shards; ETP shards for a routed expert) rank folder (tp, pp, ep) holds."""
        return self.expert_tp_rank(tp_rank, pp_rank, ep_rank) if routed else tp_rank

    def shard_sources(self, pp_rank: int, ep_rank: int | None) -> list[tuple[int, int, int]]:
        """For each shard of a tensor on this PP stage, a rank folder that holds it: TP ranks (ep_rank None, lowest
        EP index) or, for EP rank `ep_rank`'s routed experts, ETP ranks (lowest TP index)."""
        return _shard_sources(self, pp_rank, ep_rank)

    def rank_problems(self) -> list[str]:
        """Legacy per-rank files: a folder must hold one ETP shard. When ranks of one (tp, pp, ep) differ in ETP
        index (ETP not a divisor of TP), Megatron-LM's ranks would overwrite each other's file."""
        clash = next((r for r, s in _expert_shards(self).items() if len(s) > 1), None)
        if clash is None:
            return []
        ok = [e for e in range(1, self.tp_size + 1) if not Layout(self.tp_size, self.pp_size, self.ep_size, e)
              .rank_problems()]
        t, _, e = clash
        return [f"--etp {self.etp_size} with --tp {self.tp_size}: the ranks of TP index {t} and EP index {e} hold "
                f"different expert shards, which one legacy rank file cannot hold: valid --etp values with --tp "
                f"{self.tp_size} --ep {self.ep_size}: {', '.join(map(str, ok))} (or --format torch_dist)"]

    def __str__(self) -> str:
        extra = [f"ETP={self.etp_size}"] if self.etp_size != self.tp_size else []
        extra += [f"PP-first={self.pp_first}"] if self.pp_first is not None else []
        extra += [f"PP-last={self.pp_last}"] if self.pp_last is not None else []
        extra += [f"VPP={self.vpp_size}"] if self.vpp_size else []
        return " ".join([f"TP={self.tp_size} PP={self.pp_size} EP={self.ep_size}"] + extra)


@lru_cache(maxsize=64)
def _placement(layout: Layout, num_layers: int) -> list[tuple[int, int, int]]:
    try:
        chunks = layout.chunks(num_layers)
    except ValueError as e:
        raise StepconvError(f"{layout}: no pipeline split of {num_layers} layers ({e})") from None
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * num_layers
    for p, stage in enumerate(chunks):
        for c, layers in enumerate(stage):
            for j, i in enumerate(layers):
                out[i] = (p, c, j)
    return out


@lru_cache(maxsize=64)
def _grid(layout: Layout) -> list[tuple[int, int, int, int]]:
    tp, etp, ep = layout.tp_size, layout.etp_size, layout.ep_size
    per_stage = layout.world_size // layout.pp_size
    # global rank = tp + TP * dp + TP * DP * pp (dense) = etp + ETP * (ep + EP * edp) + ETP * EP * EDP * pp (experts)
    return [(r % tp, r // per_stage, (r % per_stage) // etp % ep, r % etp) for r in range(layout.world_size)]


@lru_cache(maxsize=64)
def _ranks(layout: Layout) -> tuple[tuple[int, int, int], ...]:
    return tuple(sorted({g[:3] for g in layout.grid()}, key=lambda r: (r[1], r[2], r[0])))


@lru_cache(maxsize=1024)
def _tp_ranks(layout: Layout, pp_rank: int, ep_rank: int) -> tuple[int, ...]:
    return tuple(t for t, p, e in _ranks(layout) if p == pp_rank and e == ep_rank)


@lru_cache(maxsize=64)
def _expert_shards(layout: Layout) -> dict[tuple[int, int, int], frozenset[int]]:
    out: dict[tuple[int, int, int], set[int]] = {}
    for t, p, e, k in layout.grid():
        out.setdefault((t, p, e), set()).add(k)
    return {r: frozenset(s) for r, s in out.items()}


@lru_cache(maxsize=256)
def _shard_sources(layout: Layout, pp_rank: int, ep_rank: int | None) -> list[tuple[int, int, int]]:
    ranks = [r for r in layout.ranks() if r[1] == pp_rank]
    if ep_rank is None:
        return [min((r for r in ranks if r[0] == t), key=lambda r: r[2]) for t in range(layout.tp_size)]
    return [min((r for r in ranks if r[2] == ep_rank and layout.expert_tp_rank(*r) == k), key=lambda r: r[0])
            for k in range(layout.etp_size)]


@dataclass(frozen=True)
class Entry:
    """One Megatron key on one PP stage (on every EP rank unless `ep_rank` is set), built from `hf`."""

    hf: tuple[str, ...]
    key: str
    kind: Kind
    stage: int  # PP rank holding it
    ctx: SplitContext = field(compare=False)  # tp_size: the TP size, or ETP for a routed expert
    hf_shapes: tuple[tuple[int, ...], ...] = ()  # whole HF tensors (expert stacks included)
    ep_rank: int | None = None  # None: on every EP rank
    expert: int | None = None  # global expert index: sources are expert `expert` of each stack
    layer: int | None = None  # global HF layer index, for messages and ordering
    replica: bool = False  # a second copy of a tensor another entry already carries (embedding on the MTP stage)
    chunk: int = 0  # virtual pipeline stage (model chunk) within the PP rank

    @property
    def routed(self) -> bool:
        """A routed expert's tensor: held by one EP rank and split over ETP ranks (not TP)."""
        return self.ep_rank is not None

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
    where = layout.place(L)  # global layer -> (PP stage, chunk, local index)
    last = (layout.pp_size - 1, layout.chunks_per_stage - 1)  # final norm, output layer and MTP: the last chunk
    e_local = cfg.num_experts // layout.ep_size if cfg.num_experts else 0
    base = SplitContext(layout.tp_size, None, cfg.vocab, cfg.padded_vocab(layout.tp_size))
    experts = SplitContext(layout.etp_size)
    out: list[Entry] = []

    def emit(rule: Rule, hf_prefix: str, mc_prefix: str, at: tuple[int, int], layer: int | None,
             attn: AttnShape | None, replica: bool = False):
        key = rule.key(spec)
        if rule.kind is EXTRA and not key:
            return
        dims = _dims(cfg, attn)
        hf = tuple(hf_prefix + h for h in rule.hf)
        shapes = tuple(tuple(dims[d] for d in s) for s in rule.shapes)
        ctx = SplitContext(base.tp_size, attn, base.vocab, base.padded_vocab) if rule.kind is QKVG_ else base
        common = dict(hf=hf, kind=rule.kind, stage=at[0], chunk=at[1], hf_shapes=shapes, layer=layer)
        if "{e}" in key:
            for e in range(cfg.num_experts):
                out.append(Entry(key=mc_prefix + key.format(e=e % e_local), ep_rank=e // e_local, expert=e,
                                 ctx=experts, **common))
        elif rule.kind is EXTRA and spec == "te" and "experts.linear_fc" in key:
            for p in range(layout.ep_size):  # TEGroupedMLP: one extra state per EP rank
                out.append(Entry(key=mc_prefix + key, ep_rank=p, ctx=experts, **common))
        else:
            out.append(Entry(key=mc_prefix + key if key else "", replica=replica, ctx=ctx, **common))

    for rule in RULES:
        if rule.where == "first":
            emit(rule, "", "", (0, 0), None, None)
            if M and last != (0, 0):  # megatron-core builds the embedding on the MTP stage too
                emit(rule, "", "", last, None, None, replica=True)
    for i in range(L + M):
        is_mtp = i >= L
        at = last if is_mtp else where[i][:2]
        hf_prefix = f"model.layers.{i}."
        mc_prefix = f"mtp.layers.{i - L}.{mtp_block}." if is_mtp else f"decoder.layers.{where[i][2]}."
        ffn = "moe" if cfg.is_moe(i) else "dense"
        for rule in RULES:
            if rule.where in ("layer", ffn):
                emit(rule, hf_prefix, mc_prefix, at, i, cfg.attn(i))
            elif rule.where == "mtp" and is_mtp:
                emit(rule, hf_prefix, f"mtp.layers.{i - L}.", at, i, cfg.attn(i))
    for rule in RULES:
        if rule.where == "last" and not (cfg.tied and rule.local in ("output_layer.weight", "output_layer._extra_state")):
            emit(rule, "", "", last, None, None)
    return out


def rank_keys(entries: list[Entry], layout: Layout) -> dict[tuple[int, int, int], dict[str, list[str]]]:
    """Expected keys of every rank file, per model chunk (`model`, or `model0`.. with VPP), in write order."""
    out: dict[tuple[int, int, int], dict[str, list[str]]] = {r: {m: [] for m in layout.model_keys()}
                                                           for r in layout.ranks()}
    by_stage: dict[int, list[tuple[int, int, int]]] = {}
    for r in layout.ranks():
        by_stage.setdefault(r[1], []).append(r)
    for e in entries:
        if e.kind.megatron:
            for r in by_stage[e.stage]:
                if e.on(r[2]):
                    out[r][layout.model_key(e.chunk)].append(e.key)
    return out


def hf_shapes(cfg: Step35Config, entries: list[Entry] | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (what a complete checkpoint holds): the plan's HF side
    (of `entries` when a plan is at hand; every layout's plan names the same HF tensors)."""
    out: dict[str, tuple[int, ...]] = {}
    for e in entries if entries is not None else plan(cfg, Layout(), "local"):
        if not e.replica:
            out.update(zip(e.hf, e.hf_shapes))
    return out
