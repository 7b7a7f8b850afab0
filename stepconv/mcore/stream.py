"""Step-3.5 on megatron-core one piece at a time, for ``stepconv verify``: the embedding, each decoder layer, the final
norm and output layer, each MTP layer, built alone from the same specs ``build_step35_model`` uses and loaded strictly
with only that piece's weights.

Pieces (``Piece``): ``("embedding", "first" | "mtp")``, ``("layer", i)`` (HF index; MTP layer k is ``L + k``),
``("norm",)``, ``("output",)``. ``RankFileWeights`` reads a piece from legacy rank files saved at the run's TP and EP
(any PP: the piece's stage file and local index come from the plan); ``ResplitWeights`` builds it from a checkpoint
of any format or layout (torch_dist, another TP/EP) through ``convert.MegatronSource``. Both are picklable and
called inside the rank processes as ``weights(piece, tp_rank, ep_rank)`` -> the module's state dict.

The run itself is a TP x EP world with PP = 1 (one piece at a time needs no pipeline); see ``stepconv.verify``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..config import Step35Config, StepconvError, names_text
from ..kinds import EXTRA
from ..mapping import MTP_BLOCK, Entry, Layout, plan
from ..megatron_io import RANK_FILE, load_rank_file, mapped_range, rank_dir_name, release_range

Piece = tuple

_MODULE_PREFIX = re.compile(r"^(decoder\.layers\.\d+\.|mtp\.layers\.\d+\.|embedding\.|decoder\.final_layernorm\.|"
                            r"output_layer\.)")


def piece_name(piece: Piece, num_layers: int) -> str:
    if piece[0] == "layer":
        i = piece[1]
        return f"layer {i}" if i < num_layers else f"MTP layer {i - num_layers} (HF layer {i})"
    return {"embedding": "embedding", "norm": "final norm", "output": "output layer"}[piece[0]] + (
        f" ({piece[1]} stage copy)" if piece[0] == "embedding" else "")


def piece_entries(entries: list[Entry], piece: Piece, ep_rank: int, pp_size: int) -> list[Entry]:
    """The plan entries of one piece on one EP rank (weights and `_extra_state`s; no MTP-head sidecar)."""
    kind = piece[0]
    if kind == "layer":
        sel = [e for e in entries if e.layer == piece[1]]
    elif kind == "embedding":
        emb = [e for e in entries if e.key.startswith("embedding.")]
        replica = [e for e in emb if e.replica]
        sel = replica if piece[1] == "mtp" and replica else [e for e in emb if not e.replica]
    elif kind == "norm":
        sel = [e for e in entries if e.key.startswith("decoder.final_layernorm.")]
    elif kind == "output":
        sel = [e for e in entries if e.key.startswith("output_layer.")]
    else:
        raise ValueError(f"unknown piece {piece!r}")
    return [e for e in sel if e.kind.megatron and e.on(ep_rank)]


def module_key(key: str) -> str:
    """A rank-file key inside its piece's module (`decoder.layers.3.mlp...` -> `mlp...`)."""
    m = _MODULE_PREFIX.match(key)
    if m is None:
        raise ValueError(f"internal: {key} belongs to no piece")
    return key[m.end():]


class RankFileWeights:
    """Pieces from legacy rank files saved at the run's TP and EP (any PP, TE or local spec, either MTP block name).

    Each stage's rank file is mapped once (mmap, safe loading) and the pages a piece touched are handed back to the
    kernel after it is read, so what stays resident is the piece being built, not the file.
    """

    def __init__(self, itdir: Path, cfg: dict, layout: Layout, spec: str, mtp_block: str = MTP_BLOCK):
        self.itdir, self.cfg, self.layout, self.spec, self.mtp_block = Path(itdir), cfg, layout, spec, mtp_block
        self.num_layers = Step35Config.from_dict(cfg).num_layers
        self._files: dict[tuple[int, int, int], dict] = {}
        self._plans = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_plans")} | {"_files": {},
                                                                                            "_plans": None}

    def _plan(self):
        if self._plans is None:
            cfg = Step35Config.from_dict(self.cfg)
            self._plans = (plan(cfg, self.layout, self.spec, self.mtp_block), plan(cfg, self.layout, "local"))
        return self._plans

    def _model(self, tp_rank: int, stage: int, ep_rank: int) -> dict:
        key = (tp_rank, stage, ep_rank)
        if key not in self._files:
            lay = self.layout
            path = self.itdir / rank_dir_name(tp_rank, stage, ep_rank, lay.pp_size, lay.ep_size) / RANK_FILE
            self._files[key] = load_rank_file(path)["model"]
        return self._files[key]

    def __call__(self, piece: Piece, tp_rank: int, ep_rank: int) -> dict:
        src_plan, local_plan = self._plan()
        src = piece_entries(src_plan, piece, ep_rank, self.layout.pp_size)
        loc = piece_entries(local_plan, piece, ep_rank, self.layout.pp_size)
        src_w = [e for e in src if e.kind is not EXTRA]
        loc_w = [e for e in loc if e.kind is not EXTRA]
        out: dict = {module_key(e.key): None for e in loc if e.kind is EXTRA}
        touched = set()
        for s, d in zip(src_w, loc_w, strict=True):
            model = self._model(tp_rank, s.stage, ep_rank)
            touched.add((tp_rank, s.stage, ep_rank))
            if s.key not in model:
                path = self.itdir / rank_dir_name(tp_rank, s.stage, ep_rank, self.layout.pp_size, self.layout.ep_size)
                raise StepconvError(f"{path / RANK_FILE}: lacks {s.key} ({piece_name(piece, self.num_layers)})")
            out[module_key(d.key)] = model[s.key]
        return out

    def release(self) -> None:
        """Hand the mapped pages read so far back to the kernel (call once the piece's tensors are copied)."""
        for m in self._files.values():
            release_range(*mapped_range(m))


class ResplitWeights:
    """Pieces at the run's TP and EP from a Megatron checkpoint of any format or layout: each piece's HF tensors
    are merged from the source (``convert.MegatronSource``) and split again for this rank."""

    def __init__(self, mcore_dir: Path, iteration: Optional[str], hf_config: Path, tp: int, ep: int):
        self.mcore_dir, self.iteration, self.hf_config, self.tp, self.ep = mcore_dir, iteration, hf_config, tp, ep
        self._state = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_state"} | {"_state": None}

    def __call__(self, piece: Piece, tp_rank: int, ep_rank: int) -> dict:
        from ..convert import ImportOptions, MegatronSource, plan_export, plan_import

        if self._state is None:
            src = plan_export(self.mcore_dir, iteration=self.iteration, hf_config=self.hf_config)
            pl = plan_import(src.cfg, {i.name: i.dtype for i in src.infos},
                             ImportOptions(self.tp, 1, self.ep, "local"))
            self._state = (MegatronSource(src), pl)
        source, pl = self._state
        out = {}
        for e in piece_entries(pl.entries, piece, ep_rank, 1):
            out[module_key(e.key)] = pl.step(e, source.read(e) if e.kind.sources else [])[tp_rank]
        return out

    def release(self) -> None:
        pass


def load_piece(module: torch.nn.Module, sd: dict, what: str) -> None:
    """Strict load: every module tensor filled, no tensor left over; names listed when not."""
    want, have = set(module.state_dict()), set(sd)
    if want != have:
        miss, unexp = sorted(want - have), sorted(have - want)
        raise StepconvError(f"{what}: " + "; ".join(x for x in (f"missing {names_text(miss)}" if miss else "",
                                                                 f"unexpected {names_text(unexp)}" if unexp else "")
                                                     if x))
    module.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------- builders
# Each builder makes the module GPTModel / TransformerBlock / MultiTokenPredictionBlock would make for the piece,
# with the same spec and arguments (released megatron-core 0.16.1), for the current parallel state.


def piece_config(cfg: Step35Config, dtype: torch.dtype):
    from .model import build_transformer_config

    return build_transformer_config(cfg, params_dtype=dtype, perform_initialization=False)


def build_embedding(cfg: Step35Config, config):
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    return LanguageModelEmbedding(config=config, vocab_size=cfg.padded_vocab(config.tensor_model_parallel_size),
                                  max_sequence_length=cfg.max_positions, position_embedding_type="none")


def build_layer(cfg: Step35Config, config, i: int, window_convention: str):
    """Main decoder layer i (HF index), as TransformerBlock builds it (global 1-based layer number)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from .hfconfig import layer_info
    from .model import layer_transformer_config, step35_layer_spec

    info = layer_info(cfg, i, window_convention)
    spec = step35_layer_spec(info, layer_transformer_config(config, info))
    return build_module(spec, config=config, layer_number=i + 1,
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def build_mtp_layer(cfg: Step35Config, config, k: int, window_convention: str):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from .model import step35_block_specs

    _, mtp = step35_block_specs(cfg, config, window_convention=window_convention)
    return build_module(mtp.layer_specs[k], config=config, layer_number=k + 1,
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def build_norm(config):
    from .modules import Step35RMSNorm

    return Step35RMSNorm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


def build_output(cfg: Step35Config, config):
    """GPTModel's output_layer, gathering the vocab shards (parallel_output=False)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.ColumnParallelLinear(
        config.hidden_size, cfg.padded_vocab(config.tensor_model_parallel_size), config=config,
        init_method=config.init_method, bias=False, skip_bias_add=False, gather_output=True)


# --------------------------------------------------------------------------------------------- the rank loop


class StreamJob:
    """What every rank of a streamed verify run needs (picklable): the config, one weights source per checkpoint
    checked against the same HF pass, the exchange folder where the caller leaves the HF side's per-piece files
    (``hf_<tag>.pt``), and which pieces to run."""

    def __init__(self, cfg: dict, weights: list, dtype: torch.dtype, window_convention: str, exchange: str,
                 first: int, last: int, full: bool):
        self.cfg, self.weights, self.dtype, self.window_convention = cfg, weights, dtype, window_convention
        self.exchange, self.first, self.last, self.full = exchange, first, last, full


def _wait_for(job: StreamJob, tag: str) -> dict:
    import time

    path = Path(job.exchange) / f"hf_{tag}.pt"
    while not path.exists():
        if (Path(job.exchange) / "abort").exists():
            raise StepconvError("stopped by the caller")
        time.sleep(0.02)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _forced_routed(moe, x: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """megatron's own dispatch -> experts -> combine with a routing we choose (weight 1 per selected expert)."""
    probs = routing_map.to(torch.float32)
    h, p = moe.preprocess(x, probs, routing_map)
    h, p = moe.dispatch(h, p)
    out, _ = moe.routed_experts_compute(h, p)
    return moe.postprocess(moe.combine(out), None)


def stream_rank(job: StreamJob) -> dict:
    """One rank of a streamed verify (see ``stepconv.verify``). Rank 0 compares and returns, per weights source,
    the per-piece metrics; every rank returns its peak RSS and seconds per piece."""
    import resource
    import time

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ..verify import compare_logits, diff_stats, expert_stats

    torch.set_grad_enabled(False)
    tp_rank, ep_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    lead = dist.get_rank() == 0
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = Step35Config.from_dict(job.cfg)
    L, dtype, n_src = cfg.num_layers, job.dtype, len(job.weights)
    config = piece_config(cfg, dtype)
    ex = Path(job.exchange)
    outs: list[dict] = [{"rows": [], "mtp_normed": []} for _ in job.weights]
    seconds: dict[str, float] = {}
    done = [0]

    def finished(tag: str, t0: float) -> None:
        dist.barrier()
        done[0] += 1
        seconds[tag] = time.perf_counter() - t0
        if lead:
            (ex / f"hf_{tag}.pt").unlink(missing_ok=True)
            tmp = ex / "progress.tmp"
            tmp.write_text(str(done[0]))
            tmp.replace(ex / "progress")

    def load(module, piece, s: int):
        load_piece(module, job.weights[s](piece, tp_rank, ep_rank), piece_name(piece, L))
        job.weights[s].release()
        return module.eval()

    def sb(x: torch.Tensor) -> torch.Tensor:  # [B, S, H] (HF) -> [S, B, H] (megatron) on this rank's device
        return x.to(dev).transpose(0, 1).contiguous()

    def bs(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).cpu()

    t0 = time.perf_counter()
    start = _wait_for(job, "start")
    ids = start["ids"].to(dev)
    bsz, seq = ids.shape
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(bsz, -1)
    chains = []  # each source's free-running hidden state
    for s in range(n_src):
        emb = load(build_embedding(cfg, config), ("embedding", "first"), s)
        m = emb(input_ids=ids, position_ids=pos)
        if lead:
            outs[s]["rows"].append({"name": "embedding", "index": None, "chain": diff_stats(start["h"], bs(m), None)})
        chains.append(sb(start["h"]) if job.first > 0 else m)  # a slice: both sides start from the same input
        del emb
    finished("start", t0)

    for i in range(job.first, job.last):
        t0 = time.perf_counter()
        f = _wait_for(job, f"layer_{i}")
        h_in, mid = sb(f["in"]), sb(f["mid"])
        for s in range(n_src):
            layer = load(build_layer(cfg, config, i, job.window_convention), ("layer", i), s)
            r_m, _ = layer._forward_attention(hidden_states=h_in, attention_mask=None)
            o_tf = layer._forward_mlp(r_m)
            o_mlp = layer._forward_mlp(mid)
            chains[s], _ = layer(hidden_states=chains[s], attention_mask=None)
            row = {"name": f"layer {i}", "index": i, "moe": cfg.is_moe(i)}
            if cfg.is_moe(i):
                moe = layer.mlp
                x = f["x"].reshape(-1, 1, f["x"].shape[-1]).to(dev)  # tokens in HF's (batch, position) order
                idx = f["idx"].to(dev)
                _, routing_map = moe.route(x)
                hf_map = torch.zeros_like(routing_map).scatter_(1, idx, True)
                row["router_agreement"] = (routing_map == hf_map).all(-1).double().mean().item()
                slots = []
                for j in range(idx.shape[1]):
                    one = torch.zeros_like(routing_map).scatter_(1, idx[:, j:j + 1], True)
                    slots.append(_forced_routed(moe, x, one).reshape(-1, x.shape[-1]).cpu())
                if lead:
                    row["expert"] = expert_stats(f["slots"], slots, f["idx"])
                del slots, x
            if lead:
                row["attn"] = diff_stats(f["mid"], bs(r_m), f["in"])
                row["mlp"] = diff_stats(f["out"], bs(o_mlp), f["mid"])
                row["layer"] = diff_stats(f["out"], bs(o_tf), f["in"])
                row["chain"] = diff_stats(f["out"], bs(chains[s]), None)
                outs[s]["rows"].append(row)
            del layer, r_m, o_tf, o_mlp
        del f, h_in, mid
        finished(f"layer_{i}", t0)

    if job.full:
        t0 = time.perf_counter()
        f = _wait_for(job, "final")
        V = cfg.vocab
        for s in range(n_src):
            norm, head = load(build_norm(config), ("norm",), s), load(build_output(cfg, config), ("output",), s)
            logits_fr = bs(head(norm(chains[s]))[0])[..., :V]
            logits_tf = bs(head(norm(sb(f["h"])))[0])[..., :V]
            if lead:
                outs[s]["logits"] = compare_logits(f["logits"], logits_fr)
                outs[s]["head"] = compare_logits(f["logits"], logits_tf)
            del norm, head, logits_fr, logits_tf
        del f
        finished("final", t0)
        mtp_ids = [(ids, pos)] * n_src
        for k in range(cfg.num_mtp):
            t0 = time.perf_counter()
            f = _wait_for(job, f"mtp_{k}")
            h_hf = torch.zeros(bsz, seq, cfg.hidden, dtype=f["in"].dtype)
            h_hf[:, :f["in"].shape[1]] = f["in"]  # (positions past the input are never read by earlier ones)
            n = f["out"].shape[1]
            for s in range(n_src):
                emb = load(build_embedding(cfg, config), ("embedding", "mtp"), s)
                layer = load(build_mtp_layer(cfg, config, k, job.window_convention), ("layer", L + k), s)
                seen = {}
                hook = layer.final_layernorm.register_forward_pre_hook(lambda _m, a: seen.update(pre=a[0]))
                ids_k, pos_k = mtp_ids[s]
                layer(input_ids=ids_k, position_ids=pos_k, hidden_states=sb(h_hf), attention_mask=None,
                      embedding=emb)
                pre_tf = seen["pre"]
                post, next_ids, next_pos = layer(input_ids=ids_k, position_ids=pos_k, hidden_states=chains[s],
                                                 attention_mask=None, embedding=emb)
                hook.remove()
                chains[s] = seen["pre"]  # the next MTP layer reads the pre-norm block output, as HF does
                mtp_ids[s] = (next_ids, next_pos)
                if lead:
                    outs[s]["rows"].append({"name": f"MTP {k}", "index": L + k, "moe": cfg.is_moe(L + k),
                                            "layer": diff_stats(f["out"], bs(pre_tf)[:, :n], None),
                                            "chain": diff_stats(f["out"], bs(chains[s])[:, :n], None)})
                    outs[s]["mtp_normed"].append(bs(post)[:, :n].clone())
                del layer, emb
            del f
            finished(f"mtp_{k}", t0)
    return {"sources": outs if lead else None, "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
