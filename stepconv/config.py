"""The Step-3.5-Flash config.json, the geometry derived from it, and Megatron's args for it.

Everything a conversion needs to know about the model comes from here, so that per-layer
facts (64 vs 96 heads, MoE vs dense, MTP) are computed in one place.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import StepconvError
from .safety import CONFIG_LIMIT, read_json

__all__ = ["StepconvError", "Step35Config", "names_text"]


def names_text(names, limit: int = 8) -> str:
    """The first `limit` names of a list for an error line, and how many more there are."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


MODEL_TYPE = "step3p5"
DEFAULT_EPS = 1e-5
DEFAULT_VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class AttnShape:
    heads: int
    groups: int
    head_dim: int

    @property
    def q_rows(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.groups * self.head_dim


@dataclass(frozen=True)
class Step35Config:
    raw: dict = field(repr=False)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Step35Config":
        mt = raw.get("model_type")
        if mt != MODEL_TYPE:
            raise StepconvError(f"{source}: model_type is {mt!r}; stepconv converts Step-3.5-Flash (model_type {MODEL_TYPE!r})")
        required = ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_attention_groups",
                    "head_dim", "intermediate_size", "layer_types"]
        missing = [k for k in required if k not in raw]
        if missing:
            raise StepconvError(f"{source}: missing required field(s) {', '.join(missing)}")
        problem = config_value_problem(raw)
        if problem:
            raise StepconvError(f"{source}: {problem}")
        cfg = cls(raw=raw)
        if not cfg.head_wise_gate:
            raise StepconvError(f"{source}: use_head_wise_attn_gate is {raw.get('use_head_wise_attn_gate')!r}; "
                                f"Step-3.5-Flash's attention has a head-wise gate (g_proj), expected true")
        n = cfg.num_layers + cfg.num_mtp
        for key in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
            v = raw.get(key)
            if isinstance(v, list) and len(v) < n:
                raise StepconvError(f"{source}: {key} has {len(v)} entries; expected {n} "
                                    f"(num_hidden_layers {cfg.num_layers} + num_nextn_predict_layers {cfg.num_mtp})")
        return cfg

    @classmethod
    def of(cls, cfg: "Step35Config | dict") -> "Step35Config":
        """`cfg` itself, or the config of a config.json dict (APIs accept either)."""
        return cfg if isinstance(cfg, Step35Config) else cls.from_dict(cfg)

    @classmethod
    def from_megatron_args(cls, args: Any, where: str, hf_config: str | Path | None = None) -> "Step35Config":
        """The config a Megatron checkpoint carries (args.step35_config), or `hf_config` when given."""
        if hf_config is not None:
            return cls.from_file(hf_config)
        if isinstance(getattr(args, "step35_config", None), dict):
            return cls.from_dict(args.step35_config, source=f"{where}: args.step35_config")
        raise StepconvError(f"{where}: args carry no Step-3.5 config (not written by stepconv); "
                            f"pass --hf-config path/to/config.json")

    def torch_dtype(self) -> torch.dtype:
        """config.json's torch_dtype (bf16 when absent or unknown)."""
        return {"float32": torch.float32, "float16": torch.float16}.get(str(self.raw.get("torch_dtype")),
                                                                        torch.bfloat16)

    @classmethod
    def from_file(cls, path: str | Path) -> "Step35Config":
        path = Path(path)
        if not path.exists():
            raise StepconvError(f"{path}: not found; expected a Step-3.5-Flash config.json")
        raw = read_json(path, "Step-3.5-Flash config.json", limit=CONFIG_LIMIT)
        if not isinstance(raw, dict):
            raise StepconvError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    # --- scalar geometry ----------------------------------------------------------------
    @property
    def hidden(self) -> int:
        return int(self.raw["hidden_size"])

    @property
    def vocab(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.raw["num_hidden_layers"])

    @property
    def num_mtp(self) -> int:
        return int(self.raw.get("num_nextn_predict_layers", 0) or 0)

    @property
    def ffn(self) -> int:
        return int(self.raw["intermediate_size"])

    @property
    def num_experts(self) -> int:
        return int(self.raw.get("moe_num_experts", 0) or 0)

    @property
    def moe_ffn(self) -> int:
        return int(self.raw.get("moe_intermediate_size", 0) or 0)

    @property
    def shared_ffn(self) -> int:
        return int(self.raw.get("share_expert_dim", 0) or 0)

    @property
    def eps(self) -> float:
        return float(self.raw.get("rms_norm_eps", DEFAULT_EPS))

    @property
    def tied(self) -> bool:
        return bool(self.raw.get("tie_word_embeddings", False))

    # --- model options, with one set of defaults -------------------------------------------------
    # A key absent from config.json takes the default of StepFun's `Step3p5Config` (configuration_step3p5.py, as
    # vLLM ships it), because that class is what reads the file for HF, vLLM and the remote code. The real
    # checkpoint sets every one of them (fixtures/step3p5-flash-config.json).
    @property
    def router_activation(self) -> str:
        return str(self.raw.get("moe_router_activation", "softmax"))

    @property
    def router_scaling(self) -> float:
        return float(self.raw.get("moe_router_scaling_factor", 1.0) or 1.0)

    @property
    def router_bias(self) -> bool:
        return bool(self.raw.get("use_moe_router_bias", True))

    @property
    def fp32_router(self) -> bool:
        return bool(self.raw.get("need_fp32_gate", True))

    @property
    def top_k(self) -> int:
        return int(self.raw.get("moe_top_k", 4))

    @property
    def norm_expert_weight(self) -> bool:
        return bool(self.raw.get("norm_expert_weight", True))

    @property
    def head_wise_gate(self) -> bool:
        return bool(self.raw.get("use_head_wise_attn_gate", False))

    @property
    def att_impl_type(self) -> str:
        return str(self.raw.get("att_impl_type", "GQA"))

    @property
    def sink(self) -> bool:
        return bool(self.raw.get("sink", False))

    @property
    def zero_centered(self) -> bool:
        """Norm weights stored as gamma-1 (the HF modeling code applies 1+w unconditionally)."""
        return bool(self.raw.get("zero_centered", True))

    @property
    def qk_norm(self) -> bool:
        """The HF modeling code builds q_norm/k_norm whatever the flag says."""
        return bool(self.raw.get("use_qk_norm", True))

    @property
    def sliding_window(self) -> int | None:
        w = self.raw.get("sliding_window")
        return int(w) if w else None

    @property
    def max_positions(self) -> int:
        return int(self.raw.get("max_position_embeddings") or self.raw.get("max_seq_len") or 4096)

    @property
    def rope_scaling(self) -> dict:
        return dict(self.raw.get("rope_scaling") or {})

    @property
    def yarn_only_types(self) -> tuple[str, ...]:
        """Layer types that get `rope_scaling` (absent: none; Step-3.5 lists full_attention)."""
        return tuple(self.raw.get("yarn_only_types") or ())

    def per_layer(self, key: str, i: int, default: Any = None) -> Any:
        """A per-layer list's entry i (or the scalar the key holds, or `default` when absent)."""
        v = self.raw.get(key, default)
        if v is None:
            return default
        if isinstance(v, (list, tuple)):
            if i >= len(v):
                raise StepconvError(f"config {key} has {len(v)} entries, layer {i} requested")
            return v[i]
        return v

    def rope_theta(self, i: int) -> float:
        return float(self.per_layer("rope_theta", i, 10000.0))

    def rotary_factor(self, i: int) -> float:
        return float(self.per_layer("partial_rotary_factors", i, 1.0) or 1.0)

    def uses_rope(self, i: int) -> bool:
        flags = self.raw.get("use_rope_layers") or []
        return bool(flags[i]) if flags else True

    def swiglu_limit(self, i: int) -> float:
        return float(self.per_layer("swiglu_limits", i, 0.0) or 0.0)

    def swiglu_limit_shared(self, i: int) -> float:
        return float(self.per_layer("swiglu_limits_shared", i, 0.0) or 0.0)

    @property
    def moe_layers(self) -> frozenset[int]:
        enum = self.raw.get("moe_layers_enum")
        if enum is None:
            if not (self.raw.get("use_moe") or self.num_experts):
                return frozenset()
            return frozenset(range(1, self.num_layers))  # HF remote code's fallback
        if isinstance(enum, str):
            return frozenset(int(x) for x in enum.split(",") if x.strip())
        return frozenset(int(x) for x in enum)

    # --- per-layer geometry (index i: 0..L-1 main, L..L+M-1 MTP) --------------------------
    def layer_type(self, i: int) -> str:
        types = self.raw.get("layer_types")
        if not types:
            return "full_attention"
        if i >= len(types):
            raise StepconvError(f"config layer_types has {len(types)} entries, layer {i} requested")
        return types[i]

    def attn(self, i: int) -> AttnShape:
        other = self.raw.get("attention_other_setting") or {}
        if other and self.layer_type(i) == other.get("attention_type"):
            return AttnShape(int(other["num_attention_heads"]), int(other["num_attention_groups"]),
                             int(other.get("head_dim", self.raw["head_dim"])))
        return AttnShape(int(self.raw["num_attention_heads"]), int(self.raw["num_attention_groups"]),
                         int(self.raw["head_dim"]))

    def is_moe(self, i: int) -> bool:
        return i < self.num_layers and i in self.moe_layers

    def attn_shapes(self) -> set[AttnShape]:
        return {self.attn(i) for i in range(self.num_layers + self.num_mtp)}

    # --- parallel layout -------------------------------------------------------------------
    def padded_vocab(self, tp: int, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
        return padded_vocab_size(self.vocab, tp, divisor)

    def validate_parallel(self, tp: int, pp: int, ep: int, **pipeline: int | None) -> None:
        """Reject layouts Megatron (with the fused head-wise gate) cannot express, naming the valid values."""
        problems = self.parallel_problems(tp, pp, ep, **pipeline)
        if problems:
            raise StepconvError(problems[0])

    def parallel_problems(self, tp: int, pp: int, ep: int, *, etp: int | None = None, pp_first: int | None = None,
                          pp_last: int | None = None, vpp: int | None = None) -> list[str]:
        """One line per invalid dimension (TP, PP and its stages, EP, ETP in that order), each listing the valid
        values. `etp` None is Megatron's default (= TP); `pp_first`/`pp_last` are Megatron's
        decoder_first/last_pipeline_num_layers, `vpp` its virtual pipeline stages per PP rank."""
        sizes = (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp), ("--pp-first", pp_first),
                 ("--pp-last", pp_last), ("--vpp", vpp))
        out = [f"{name} must be >= 1, got {v}" for name, v in sizes if v is not None and v < 1]
        if out:
            return out
        shapes = sorted(self.attn_shapes(), key=lambda s: (s.heads, s.groups))
        heads = sorted({s.heads for s in shapes})
        groups = sorted({s.groups for s in shapes})
        ok_tp = [t for t in range(1, max(groups) + 1)
                 if all(g % t == 0 for g in groups) and all(h % t == 0 for h in heads)]
        # dense MLPs and shared experts are split over TP, routed experts over ETP (TP unless given)
        ffns = [f for f in [self.ffn] + ([self.shared_ffn] + [self.moe_ffn] * (etp is None) if self.moe_layers else [])
                if f]
        if tp not in ok_tp:
            what = " and ".join([f"{'/'.join(map(str, groups))} query groups", f"{'/'.join(map(str, heads))} heads"])
            out.append(f"--tp must divide {what} (the head-wise gate needs query groups >= TP): "
                       f"valid values {', '.join(map(str, ok_tp))}; got {tp}")
        elif any(f % tp for f in ffns):
            out.append(f"--tp {tp} must divide the FFN width {next(f for f in ffns if f % tp)}")
        out += pipeline_problems(self.num_layers, pp, vpp, pp_first, pp_last)
        if self.moe_layers:
            ok_ep = [e for e in range(1, self.num_experts + 1) if self.num_experts % e == 0]
            if ep not in ok_ep:
                out.append(f"--ep must divide {self.num_experts} experts: valid values {', '.join(map(str, ok_ep))}; "
                           f"got {ep}")
            if etp is not None and self.moe_ffn % etp:
                ok = [e for e in range(1, self.moe_ffn + 1) if self.moe_ffn % e == 0]
                out.append(f"--etp must divide the routed experts' FFN width {self.moe_ffn}: valid values "
                           f"{names_text(map(str, ok))}; got {etp}")
        elif ep != 1:
            out.append(f"--ep must be 1 for a model without MoE layers; got {ep}")
        return out

    # --- Megatron args ---------------------------------------------------------------------
    def megatron_args(self, *, tp: int, pp: int, ep: int, params_dtype: torch.dtype, spec: str,
                      window_convention: str = "hf", extra: dict[str, Any] | None = None, etp: int | None = None,
                      pp_first: int | None = None, pp_last: int | None = None,
                      vpp: int | None = None) -> argparse.Namespace:
        """argparse.Namespace with Megatron-LM's own names, plus step35_* fields for what Megatron lacks.

        The layout fields are what Megatron-LM's validate_args leaves: expert_tensor_parallel_size (= TP unless
        `etp`), decoder_first/last_pipeline_num_layers (None when not given), virtual_pipeline_model_parallel_size
        and num_virtual_stages_per_pipeline_rank (None without VPP)."""
        base = self.attn(0) if self.layer_type(0) == "full_attention" else self.attn_full()
        full_i = next((i for i in range(self.num_layers) if self.layer_type(i) == "full_attention"), 0)
        window = self.sliding_window
        has_sliding = any(self.layer_type(i) == "sliding_attention" for i in range(self.num_layers + self.num_mtp))
        rope_scaling = self.rope_scaling
        ns = argparse.Namespace(
            # model geometry
            num_layers=self.num_layers,
            hidden_size=self.hidden,
            ffn_hidden_size=self.ffn,
            num_attention_heads=base.heads,
            num_query_groups=base.groups,
            group_query_attention=base.groups != base.heads,
            kv_channels=base.head_dim,
            max_position_embeddings=self.max_positions,
            seq_length=self.max_positions,
            position_embedding_type="rope",
            rotary_base=self.rope_theta(full_i),
            rotary_percent=self.rotary_factor(full_i),
            rotary_interleaved=False,
            use_rope_scaling=rope_scaling.get("rope_type") == "llama3",
            rope_scaling_factor=float(rope_scaling.get("factor", 1.0)),
            normalization="RMSNorm",
            norm_epsilon=self.eps,
            apply_layernorm_1p=self.zero_centered,
            qk_layernorm=self.qk_norm,
            swiglu=True,
            untie_embeddings_and_output_weights=not self.tied,
            add_bias_linear=False,
            add_qkv_bias=False,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            head_wise_attn_gate=self.head_wise_gate,
            window_size=None if not (window and has_sliding) else
            ((window - 1, 0) if window_convention == "hf" else (window, 0)),
            # vocab
            vocab_size=self.vocab,
            padded_vocab_size=self.padded_vocab(tp),
            make_vocab_size_divisible_by=DEFAULT_VOCAB_DIVISOR,
            # MoE
            num_experts=self.num_experts or None,
            moe_router_topk=self.top_k,
            moe_ffn_hidden_size=self.moe_ffn or None,
            moe_shared_expert_intermediate_size=self.shared_ffn or None,
            moe_layer_freq=[1 if self.is_moe(i) else 0 for i in range(self.num_layers)],
            moe_router_score_function=self.router_activation,
            moe_router_enable_expert_bias=self.router_bias,
            moe_router_topk_scaling_factor=self.router_scaling,
            moe_router_dtype="fp32" if self.fp32_router else None,
            moe_router_load_balancing_type="none",
            moe_grouped_gemm=spec == "te",
            moe_token_dispatcher_type="alltoall",
            mtp_num_layers=self.num_mtp or None,
            # parallelism and precision
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=tp if etp is None else etp,
            decoder_first_pipeline_num_layers=pp_first,
            decoder_last_pipeline_num_layers=pp_last,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
            num_virtual_stages_per_pipeline_rank=vpp if vpp and vpp > 1 else None,
            num_layers_per_virtual_pipeline_stage=None,
            sequence_parallel=False,
            transformer_impl="transformer_engine" if spec == "te" else "local",
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            ckpt_format="torch",
            use_dist_ckpt=False,
            # Step-3.5 facts Megatron-LM has no argument for
            step35_config=self.raw,
            step35_window_convention=window_convention,
            step35_sliding_window=window,
        )
        for k, v in (extra or {}).items():
            setattr(ns, k, v)
        return ns

    def attn_full(self) -> AttnShape:
        return AttnShape(int(self.raw["num_attention_heads"]), int(self.raw["num_attention_groups"]),
                         int(self.raw["head_dim"]))


# --- pipeline stages: the one home of the layer arithmetic -------------------------------------------------
def layer_chunks(num_layers: int, pp_size: int, vpp_size: int | None = None, first: int | None = None,
                 last: int | None = None) -> tuple[tuple[range, ...], ...]:
    """The global decoder layers each PP rank builds in each of its virtual stages: `out[pp_rank][vp_stage]`.

    megatron-core's `get_transformer_layer_offset` (a range's start) and `get_num_layers_to_build` (its length)
    for `num_layers_in_first/last_pipeline_stage` = `first`/`last` (Megatron-LM's
    --decoder-first/last-pipeline-num-layers) and `virtual_pipeline_model_parallel_size` = `vpp_size` (None or 1:
    one chunk per rank). The stages not named split the remaining layers evenly; with V virtual stages, stage p's
    layers form V equal chunks and the chunks interleave: chunk c of stage p starts after c whole rounds
    (num_layers / V layers each) and after chunk c of every earlier stage. Example: 8 layers, PP=2, VPP=2:
    ((range(0, 2), range(4, 6)), (range(2, 4), range(6, 8))). Raises ValueError naming what megatron-core
    rejects (its TransformerConfig checks).
    """
    v = vpp_size or 1
    if pp_size < 1 or v < 1 or num_layers < 1:
        raise ValueError(f"sizes must be >= 1 (layers {num_layers}, PP {pp_size}, VPP {v})")
    if pp_size > num_layers:
        raise ValueError(f"{pp_size} stages for {num_layers} layers (each stage holds one at least)")
    if pp_size == 1 and (v > 1 or first is not None or last is not None):
        raise ValueError("virtual pipeline stages and uneven stages need PP > 1")
    named = {0: first} if first is not None else {}
    if last is not None:
        named[pp_size - 1] = last
    if any(n < 1 for n in named.values()):
        raise ValueError("the first and last stages must hold at least one layer")
    rest, stages = num_layers - sum(named.values()), pp_size - len(named)
    if rest < 0 or bool(rest) != bool(stages):
        raise ValueError(f"{rest} layers remain for {stages} middle stage(s)")
    if stages and rest % stages:
        raise ValueError(f"{rest} layers do not split evenly over {stages} stage(s)")
    counts = [named.get(p, rest // stages if stages else 0) for p in range(pp_size)]
    if any(c % v for c in counts):
        raise ValueError(f"stage layer counts {counts} are not all divisible by VPP {v}")
    if v > 1 and not stages:  # megatron-core 0.16's interleaved offset divides by the middle stage count
        raise ValueError("virtual stages with both the first and the last stage given need a middle stage (PP > 2)")
    per_round = num_layers // v
    return tuple(tuple(range(c * per_round + sum(counts[:p]) // v, c * per_round + (sum(counts[:p]) + counts[p]) // v)
                       for c in range(v)) for p in range(pp_size))


def pipeline_problems(num_layers: int, pp_size: int, vpp_size: int | None = None, first: int | None = None,
                      last: int | None = None) -> list[str]:
    """Why `layer_chunks` rejects a split, as one line naming the values that would work (empty when it works)."""
    def ok(**kw) -> bool:
        a = {**dict(vpp_size=vpp_size, first=first, last=last), **kw}
        try:
            layer_chunks(num_layers, pp_size, **a)
            return True
        except ValueError:
            return False

    if ok():
        return []
    L, pp = num_layers, pp_size
    if pp == 1:
        given = [n for n, v in (("--vpp", vpp_size if vpp_size != 1 else None), ("--pp-first", first),
                                ("--pp-last", last)) if v is not None]
        return [f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --pp > 1 (pipeline stages to split)"]
    if first is None and last is None and not ok(vpp_size=None):
        divisors = [p for p in range(1, L + 1) if L % p == 0]
        firsts = [f for f in range(1, L) if ok(first=f)]
        lasts = [x for x in range(1, L) if ok(last=x)]
        uneven = " or ".join(f"{n} {compress(vs)}" for n, vs in (("--pp-first", firsts), ("--pp-last", lasts)) if vs)
        return [f"--pp must divide {L} layers: valid values {', '.join(map(str, divisors))}; got {pp}"
                + (f"; or uneven stages with --pp {pp}: {uneven}" if uneven else "")]
    if not ok(vpp_size=None):
        named = [(n, v, k) for n, v, k in (("--pp-first", first, "first"), ("--pp-last", last, "last")) if v is not None]
        name, value, key = named[-1]
        valid = [x for x in range(1, L) if ok(vpp_size=None, **{key: x})]
        rest, others = L - sum(v for _, v, _ in named), pp - len(named)
        ctx = f"--pp {pp}" + "".join(f" {n} {v}" for n, v, k in named if k != key)
        return [f"{name} {value} leaves {rest} layer(s) for the {others} other stage(s), which must split them evenly: "
                f"valid {name} values with {ctx}: {compress(valid) or 'none'}"]
    if first is not None and last is not None and pp == 2:
        return ["--vpp with both --pp-first and --pp-last needs --pp > 2: megatron-core places the virtual stages by "
                "the middle stages' share; give one of them"]
    counts = sorted({len(r[0]) for r in layer_chunks(L, pp, None, first, last)})
    valid = [v for v in range(1, max(counts) + 1) if all(c % v == 0 for c in counts)]
    return [f"--vpp {vpp_size} must divide every stage's layer count ({'/'.join(map(str, counts))}): "
            f"valid --vpp values {', '.join(map(str, valid))}"]


def compress(nums: Iterable[int]) -> str:
    """{0..2}, {3..44}, {0..44 step 4}, {1..43 except 4..40 step 4}: the shortest of a direct and a complement form."""
    s = sorted(set(nums))
    if not s:
        return ""
    direct = _runs(s)
    span = set(range(s[0], s[-1] + 1))
    holes = sorted(span - set(s))
    if holes:
        alt = f"{s[0]}..{s[-1]} except {_runs(holes)}"
        if len(alt) < len(direct):
            return alt
    return direct


def _runs(s: list[int]) -> str:
    parts, i = [], 0
    while i < len(s):
        j = i
        if i + 1 < len(s):
            step = s[i + 1] - s[i]
            while j + 1 < len(s) and s[j + 1] - s[j] == step:
                j += 1
            if j - i >= 2 or (step == 1 and j > i):
                parts.append(f"{s[i]}..{s[j]}" + (f" step {step}" if step != 1 else ""))
                i = j + 1
                continue
        parts.append(str(s[i]))
        i += 1
    return ",".join(parts)


def padded_vocab_size(vocab: int, tp: int, divisor: int = DEFAULT_VOCAB_DIVISOR) -> int:
    """megatron.training's `_vocab_size_with_padding`: a multiple of divisor x TP."""
    m = divisor * tp
    return -(-vocab // m) * m


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# --- config values: types, ranges and cheap upper bounds, checked before anything is sized from them ------------
# Bounds far above any real model (Step-3.5-Flash: hidden 4096, 45 layers, 288 experts, vocab 128896) and far below
# what would make planning allocate or loop without end (10^9 experts: a plan of 10^9 entries).
_INT_FIELDS = {  # key: (lowest, highest)
    "hidden_size": (1, 1 << 17), "num_hidden_layers": (1, 4096), "vocab_size": (1, 1 << 24),
    "num_attention_heads": (1, 4096), "num_attention_groups": (1, 4096), "head_dim": (1, 8192),
    "intermediate_size": (1, 1 << 20), "moe_num_experts": (0, 1 << 14), "moe_intermediate_size": (0, 1 << 20),
    "share_expert_dim": (0, 1 << 20), "moe_top_k": (1, 1 << 14), "num_nextn_predict_layers": (0, 64),
    "sliding_window": (1, 1 << 31),  # (0 or negative: no window, or a window Megatron writes as (-6, 0))
    "max_position_embeddings": (1, 1 << 31), "max_seq_len": (1, 1 << 31),
}
_FLOAT_FIELDS = ("rms_norm_eps", "moe_router_scaling_factor", "rope_theta", "partial_rotary_factors",
                 "swiglu_limits", "swiglu_limits_shared")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _int_ok(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _number_ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_value_problem(raw: dict) -> str | None:
    """The first config value of the wrong type, out of range, not finite, or inconsistent (heads not a multiple of
    query groups, top-k above the expert count, a MoE layer index out of range); None when all are sound."""
    for key, (lo, hi) in _INT_FIELDS.items():
        v = raw.get(key)
        if v is None:
            continue
        if not _int_ok(v, lo, hi):
            return f"{key} is {v!r}; expected an integer from {lo} to {hi}"
    for key in _FLOAT_FIELDS:
        v = raw.get(key)
        vals = v if isinstance(v, list) else [v]
        if v is not None and not all(x is None or _number_ok(x) for x in vals):
            return f"{key} is {str(v)[:80]}; expected a finite number" + (" per layer" if isinstance(v, list) else "")
    for key in ("rms_norm_eps",):
        if key in raw and not raw[key] > 0:
            return f"{key} is {raw[key]!r}; expected a positive number"
    types = raw.get("layer_types")
    if not (isinstance(types, list) and all(t in _LAYER_TYPES for t in types)):
        return f"layer_types must be a list of {' / '.join(_LAYER_TYPES)}; got {str(types)[:80]}"
    heads, groups = raw["num_attention_heads"], raw["num_attention_groups"]
    if heads % groups:
        return f"num_attention_heads {heads} is not a multiple of num_attention_groups {groups}"
    other = raw.get("attention_other_setting")
    if other is not None:
        if not isinstance(other, dict):
            return f"attention_other_setting must be an object; got {type(other).__name__}"
        for key in ("num_attention_heads", "num_attention_groups", "head_dim"):
            if key in other and not _int_ok(other[key], *_INT_FIELDS[key]):
                return f"attention_other_setting.{key} is {other[key]!r}; expected an integer from 1 to " \
                       f"{_INT_FIELDS[key][1]}"
        if other.get("num_attention_heads", 1) % other.get("num_attention_groups", 1):
            return "attention_other_setting: num_attention_heads is not a multiple of num_attention_groups"
    experts = raw.get("moe_num_experts") or 0
    if experts and raw.get("moe_top_k", 4) > experts:
        return f"moe_top_k {raw.get('moe_top_k', 4)} exceeds moe_num_experts {experts}"
    enum = raw.get("moe_layers_enum")
    if enum is not None:
        try:
            idx = [int(x) for x in enum.split(",") if x.strip()] if isinstance(enum, str) else \
                [x if _int_ok(x, -1 << 62, 1 << 62) else int("not an index") for x in enum]
        except (ValueError, TypeError, AttributeError):
            return f"moe_layers_enum is {str(enum)[:80]}; expected layer indices (a list or a comma-separated string)"
        bad = [i for i in idx if not 0 <= i < raw["num_hidden_layers"]]
        if bad:
            return f"moe_layers_enum names layer {bad[0]}; layers are 0..{raw['num_hidden_layers'] - 1}"
    for key in ("rope_scaling",):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            return f"{key} must be an object or null; got {type(raw[key]).__name__}"
    for key in ("use_rope_layers", "yarn_only_types"):
        if raw.get(key) is not None and not isinstance(raw[key], list):
            return f"{key} must be a list; got {type(raw[key]).__name__}"
    return None
