"""Run Step-3.5 megatron checkpoints (legacy ``mp_rank_*`` files) over tp*pp*ep local processes.

``megatron_forward`` starts one process per rank (torch.multiprocessing, gloo on CPU), builds
``build_step35_model`` for the rank, loads its state dict with ``strict=True``, runs one forward
(pipeline stages connected by plain p2p send/recv, experts through megatron's allgather
dispatcher) and gathers logits / per-layer hidden states / MTP outputs on the caller.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .ckpt import RankLoader, as_rank_loader
from .hfconfig import num_mtp_layers


def _worker(rank: int, world: int, tp: int, pp: int, ep: int, port: int, loader, hf_config: dict,
            input_ids: torch.Tensor, window_convention: str, dtype: torch.dtype, result_dir: str,
            threads: int) -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    import torch.distributed as dist

    from megatron.core import parallel_state as ps

    from .model import build_step35_model
    from .runtime import cpu_patches, destroy_parallel, init_parallel

    cpu_patches()
    t_import = time.perf_counter() - t0
    init_parallel(rank, world, tp, pp, ep, port, backend="gloo")
    try:
        tp_rank = ps.get_tensor_model_parallel_rank()
        pp_rank = ps.get_pipeline_model_parallel_rank()
        ep_rank = ps.get_expert_model_parallel_rank()
        dp_rank = ps.get_data_parallel_rank()
        if ps.get_expert_tensor_parallel_rank() != tp_rank:
            raise RuntimeError("expert-TP rank differs from TP rank; unsupported layout")
        t1 = time.perf_counter()
        sd = loader(tp_rank, pp_rank, ep_rank)
        t_load = time.perf_counter() - t1
        t1 = time.perf_counter()
        model = build_step35_model(hf_config, params_dtype=dtype, window_convention=window_convention,
                                   parallel_output=False, perform_initialization=False)
        model.load_state_dict(sd, strict=True)
        del sd
        model.eval()
        t_build = time.perf_counter() - t1

        hidden: dict[int, torch.Tensor] = {}
        hooks = []
        if model.pre_process:
            # first call only: the MTP block calls the embedding again on rolled ids
            def _emb_hook(_m, _a, out):
                if 0 not in hidden:
                    hidden[0] = out.detach().transpose(0, 1).clone()

            hooks.append(model.embedding.register_forward_hook(_emb_hook))
        for layer in model.decoder.layers:
            idx = layer.layer_number  # global, 1-based == HF index + 1
            hooks.append(layer.register_forward_hook(
                lambda _m, _a, out, idx=idx: hidden.__setitem__(
                    idx, (out[0] if isinstance(out, tuple) else out).detach().transpose(0, 1).clone())))

        t1 = time.perf_counter()
        b, s = input_ids.shape
        H = int(hf_config["hidden_size"])
        with torch.no_grad():
            if not model.pre_process:
                buf = torch.empty(s, b, H, dtype=dtype)
                dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(buf)
            out = model(input_ids, return_dict=True)
            if not model.post_process:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        t_fwd = time.perf_counter() - t1
        for h in hooks:
            h.remove()

        if tp_rank == 0 and dp_rank == 0:
            res: dict = {"hidden": hidden, "stage": pp_rank}
            if model.post_process:
                res["logits"] = out["logits"].clone()
                res["mtp_block_outputs"] = [h.transpose(0, 1).clone() for h in out["mtp_block_outputs"]]
                res["mtp_logits"] = [x.clone() for x in out["mtp_logits"]]
            res["timings"] = {"import": t_import, "load": t_load, "build": t_build, "forward": t_fwd,
                              "total": time.perf_counter() - t0}
            torch.save(res, os.path.join(result_dir, f"stage_{pp_rank:03d}.pt"))
    finally:
        destroy_parallel()


def megatron_forward(rank_state_dicts_loader: RankLoader, hf_config: dict, input_ids: torch.Tensor, *,
                     tp: int = 1, pp: int = 1, ep: int = 1, window_convention: str = "hf",
                     dtype: torch.dtype = torch.float32, start_method: str = "spawn",
                     threads_per_rank: Optional[int] = None, port: Optional[int] = None) -> dict:
    """Forward ``input_ids`` [b, s] through a Step-3.5 megatron checkpoint on tp*pp*ep CPU processes.

    ``rank_state_dicts_loader``: a checkpoint directory (root with ``latest_checkpointed_iteration.txt``
    or ``release/``, or the ``release``/``iter_*`` folder itself) holding
    ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``; or a mapping ``{(tp_rank, pp_rank, ep_rank):
    state_dict}``; or a picklable callable ``(tp_rank, pp_rank, ep_rank) -> state_dict``.

    Returns (on the caller, all float tensors in ``dtype``):
      ``logits`` [b, s, vocab_size] (padding stripped);
      ``hidden_states``: list of num_hidden_layers+1 tensors [b, s, H] (after the embedding and after
      each main decoder layer, before the final norm);
      ``mtp_hidden``: per MTP layer k, its block output before its final_layernorm, [b, s-k-1, H];
      ``mtp_logits``: per MTP layer, megatron's shared ``output_layer`` applied after the MTP final
      norm, [b, s-k-1, vocab_size] (HF has a separate ``shared_head.output`` per MTP layer);
      ``timings``: seconds (``wall`` on the caller, per-stage worker phases).
    """
    import torch.multiprocessing as mp

    from .runtime import free_port

    world = tp * pp * ep
    L = int(hf_config["num_hidden_layers"])
    if L % pp:
        raise ValueError(f"num_hidden_layers {L} not divisible by pp={pp}")
    loader = as_rank_loader(rank_state_dicts_loader, pp=pp, ep=ep)
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be [batch, seq]")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world)
    if start_method == "forkserver":
        # Import torch/megatron once in the fork server; every rank then forks from it (the
        # server persists, so later calls in this process start ranks almost instantly).
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["torch", "stepconv.mcore.model", "stepconv.mcore.run"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stepconv_mcore_") as rd:
        mp.start_processes(_worker, args=(world, tp, pp, ep, port or free_port(), loader, hf_config, input_ids,
                                          window_convention, dtype, rd, threads_per_rank),
                           nprocs=world, join=True, start_method=start_method)
        stages = [torch.load(Path(rd) / f"stage_{p:03d}.pt", weights_only=True) for p in range(pp)]
    wall = time.perf_counter() - t0

    V = int(hf_config["vocab_size"])
    s = input_ids.shape[1]
    hidden: dict[int, torch.Tensor] = {}
    for st in stages:
        hidden.update(st["hidden"])
    missing = [i for i in range(L + 1) if i not in hidden]
    if missing:
        raise RuntimeError(f"hidden states missing for indices {missing}")
    last = stages[-1]
    n_mtp = num_mtp_layers(hf_config)
    return {
        "logits": last["logits"][..., :V].contiguous(),
        "hidden_states": [hidden[i] for i in range(L + 1)],
        "mtp_hidden": [last["mtp_block_outputs"][k][:, : s - k - 1].contiguous() for k in range(n_mtp)],
        "mtp_logits": [last["mtp_logits"][k][:, : s - k - 1, :V].contiguous() for k in range(n_mtp)],
        "timings": {"wall": wall, "stages": [st["timings"] for st in stages]},
    }
