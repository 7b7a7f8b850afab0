"""Run Step-3.5 megatron checkpoints (legacy ``mp_rank_*`` files) over tp*pp*ep local processes.

``megatron_forward`` starts one process per rank (torch.multiprocessing; gloo on CPU, nccl with
``device="cuda"``), builds ``build_step35_model`` for the rank, loads its state dict with
``strict=True``, runs one forward (pipeline stages connected by plain p2p send/recv, experts through
megatron's allgather dispatcher) and gathers logits / per-layer hidden states / MTP outputs on the
caller. ``run_ranks`` is the generic launcher underneath (also used by the tests); ``start_ranks`` starts the
ranks and returns at once (``RankGroup``), so the caller can work beside them (the streamed verify runs the HF
side meanwhile). A failing rank reports one line (``RankError``; its traceback in ``RankError.traceback``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import Step35Config, StepconvError
from .ckpt import RankLoader, as_rank_loader

START_METHODS = ("spawn", "forkserver")


def _rank_entry(rank: int, world: int, tp: int, pp: int, ep: int, port: int, device: str,
                threads: int, result_dir: str) -> None:
    """One rank: run the payload; on failure write its one-line cause (and the traceback beside it) for the
    caller and exit 1 without printing a traceback."""
    try:
        if device == "cpu":
            if torch.cuda.is_available():
                raise RuntimeError("device='cpu' rank sees CUDA (fork server started elsewhere without "
                                   "CUDA_VISIBLE_DEVICES=''?); use start_method='spawn'")
            torch.set_num_threads(threads)
        from .runtime import destroy_parallel, init_parallel

        with open(os.path.join(result_dir, "payload.pkl"), "rb") as f:
            fn, args, kwargs = pickle.load(f)

        init_parallel(rank, world, tp, pp, ep, port, backend="gloo" if device == "cpu" else "nccl")
        try:
            res = fn(*args, **kwargs)
        finally:
            destroy_parallel()
        with open(os.path.join(result_dir, f"rank_{rank:05d}.pkl"), "wb") as f:
            pickle.dump(res, f)
    except BaseException as e:  # noqa: BLE001 (reported to the caller as one line, the traceback kept in a file)
        import traceback

        line = str(e).splitlines()[0] if str(e) else ""
        kind = "" if type(e).__name__ == "StepconvError" else f"{type(e).__name__}: "
        try:
            Path(result_dir, f"traceback_{rank:05d}.txt").write_text(traceback.format_exc())
            Path(result_dir, f"error_{rank:05d}.txt").write_text(f"{kind}{line}")
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(1)


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update({k: v for k, v in kv.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RankError(StepconvError, RuntimeError):
    """A rank process failed; the message is its one-line cause (``traceback`` holds the rank's traceback). A
    StepconvError, so the CLI's error boundary prints it as its one line (exit 2)."""

    def __init__(self, message: str, traceback: str = ""):
        super().__init__(message)
        self.traceback = traceback


class RankGroup:
    """``tp*pp*ep`` rank processes started by ``start_ranks``; the caller keeps working while they run.

    ``poll()`` raises ``RankError`` (and stops the others) as soon as one rank has failed, and returns True once
    all have finished; ``results()`` waits and returns the per-rank results; ``stop()`` ends every rank still
    running (only the processes this group started). ``workdir`` is a folder the ranks and the caller share.
    """

    def __init__(self, ctx, world: int, workdir: str, cleanup):
        self.ctx, self.world, self.workdir, self._cleanup = ctx, world, workdir, cleanup

    def _failed(self) -> RankError | None:
        errs = sorted(Path(self.workdir).glob("error_*.txt"))
        if not errs:
            return None
        rank = int(errs[0].stem.split("_")[1])
        tb = Path(self.workdir, f"traceback_{rank:05d}.txt")
        return RankError(f"rank {rank}: {errs[0].read_text()}", tb.read_text() if tb.exists() else "")

    def poll(self, timeout: float = 0.0) -> bool:
        try:
            done = self.ctx.join(timeout=timeout)
        except Exception as e:  # a rank exited non-zero: torch has stopped the others
            failed = self._failed()  # (read before stop(), which removes the folder holding the rank's error)
            self.stop()
            lines = [x for x in str(e).splitlines() if x.strip()]  # (a raised exception's text ends in its message)
            raise failed or RankError(f"a rank process failed: {lines[-1] if lines else type(e).__name__}",
                                              str(e)) from None
        err = self._failed()
        if err is not None:
            self.stop()
            raise err
        return done

    def results(self, poll: Optional[Callable[[], None]] = None, interval: float = 0.2) -> list:
        while not self.poll(interval):
            if poll is not None:
                poll()
        out = []
        for r in range(self.world):
            with open(Path(self.workdir) / f"rank_{r:05d}.pkl", "rb") as f:
                out.append(pickle.load(f))
        self.stop()
        return out

    def stop(self) -> None:
        for p in self.ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in self.ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def start_ranks(fn: Callable, *args: Any, tp: int = 1, pp: int = 1, ep: int = 1, start_method: str = "spawn",
                device: str = "cpu", threads_per_rank: Optional[int] = None, port: Optional[int] = None,
                **kwargs: Any) -> RankGroup:
    """Start ``fn(*args, **kwargs)`` on ``tp*pp*ep`` local ranks (see ``run_ranks``) without waiting for them."""
    import torch.multiprocessing as mp

    from .runtime import free_port

    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}")
    if device not in ("cpu", "cuda"):
        raise ValueError("device must be 'cpu' or 'cuda'")
    if device == "cuda" and start_method != "spawn":
        raise ValueError("device='cuda' needs start_method='spawn'")
    world = tp * pp * ep
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world)
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" and torch.cuda.is_available() else {}
    if start_method == "forkserver":
        # The fork server is `python -c ...`: its sys.path starts with the working directory, and it ignores the
        # sys.path multiprocessing hands it, so a `stepconv` folder in the cwd (another checkout) would be what it
        # preloads and what every rank runs (seen: "No module named stepconv.mcore.stream"). It gets ours instead.
        env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONSAFEPATH="1")
        # (on a CUDA machine the server, if started here, inherits CUDA_VISIBLE_DEVICES="" below)
        import multiprocessing

        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["torch", "stepconv.mcore.model", "stepconv.mcore.run"])
    tmp = tempfile.TemporaryDirectory(prefix="stepconv_mcore_")
    rd = tmp.name
    # (fn, args, kwargs) go through a plain pickle file rather than the process arguments: tensors in
    # process arguments are shared through one file descriptor each, which the fork server caps.
    with open(os.path.join(rd, "payload.pkl"), "wb") as f:
        pickle.dump((fn, args, kwargs), f, protocol=pickle.HIGHEST_PROTOCOL)
    with _env(**env):
        ctx = mp.start_processes(_rank_entry, args=(world, tp, pp, ep, port or free_port(), device, threads_per_rank,
                                                    rd), nprocs=world, join=False, start_method=start_method)
    return RankGroup(ctx, world, rd, tmp.cleanup)


def run_ranks(fn: Callable, *args: Any, tp: int = 1, pp: int = 1, ep: int = 1,
              start_method: str = "spawn", device: str = "cpu", threads_per_rank: Optional[int] = None,
              port: Optional[int] = None, **kwargs: Any) -> list:
    """Run ``fn(*args, **kwargs)`` on ``tp*pp*ep`` local ranks, each with torch.distributed and
    megatron's parallel_state initialised (data-parallel size = ep); return the per-rank results
    (pickled; ordered by global rank). ``fn`` must be importable by the child processes; ``args`` and
    ``kwargs`` are pickled once to a temporary file that every rank reads. A failed rank raises ``RankError``
    with its one-line cause.

    ``start_method``: "spawn" (default), or "forkserver", which imports torch/megatron once in a
    fork server that persists for this process (rank start-up then costs ~0.2 s instead of seconds;
    CPU only). ``device="cuda"``: nccl, one GPU per rank (``rank % device_count``).
    """
    group = start_ranks(fn, *args, tp=tp, pp=pp, ep=ep, start_method=start_method, device=device,
                        threads_per_rank=threads_per_rank, port=port, **kwargs)
    try:
        return group.results()
    finally:
        group.stop()


def _forward_rank(loader, cfg: Step35Config, input_ids: torch.Tensor, window_convention: str,
                  dtype: torch.dtype) -> Optional[dict]:
    """One rank of ``megatron_forward``; returns the stage's results on tp_rank 0 / dp_rank 0."""
    import torch.distributed as dist

    from megatron.core import parallel_state as ps

    from .model import build_step35_model

    t0 = time.perf_counter()
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    if ps.get_expert_tensor_parallel_rank() != tp_rank:
        raise RuntimeError("expert-TP rank differs from TP rank; unsupported layout")
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    sd = loader(tp_rank, pp_rank, ep_rank)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    model = build_step35_model(cfg, params_dtype=dtype, window_convention=window_convention,
                               parallel_output=False, perform_initialization=False)
    model.load_state_dict(sd, strict=True)
    del sd
    model.eval()
    t_build = time.perf_counter() - t1

    hidden: dict[int, torch.Tensor] = {}
    hooks = []
    if model.pre_process:
        def _emb_hook(_m, _a, out):
            if 0 not in hidden:  # first call only: MTP calls the embedding again on rolled ids
                hidden[0] = out.detach().transpose(0, 1).cpu().clone()

        hooks.append(model.embedding.register_forward_hook(_emb_hook))

    def _layer_hook(idx):
        def hook(_m, _a, out):
            hidden[idx] = (out[0] if isinstance(out, tuple) else out).detach().transpose(0, 1).cpu().clone()
        return hook

    for layer in model.decoder.layers:
        hooks.append(layer.register_forward_hook(_layer_hook(layer.layer_number)))  # global, 1-based

    t1 = time.perf_counter()
    ids = input_ids.to(dev)
    b, s = ids.shape
    with torch.no_grad():
        if not model.pre_process:
            buf = torch.empty(s, b, cfg.hidden, dtype=dtype, device=dev)
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        out = model(ids, return_dict=True)
        if not model.post_process:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    t_fwd = time.perf_counter() - t1
    for h in hooks:
        h.remove()
    if tp_rank != 0 or dp_rank != 0:
        return None
    res: dict = {"stage": pp_rank, "hidden": hidden,
                 "timings": {"load": t_load, "build": t_build, "forward": t_fwd}}
    if model.post_process:
        res["logits"] = out["logits"].cpu()
        res["mtp_block_outputs"] = [h.transpose(0, 1).cpu() for h in out["mtp_block_outputs"]]
        res["mtp_logits"] = [x.cpu() for x in out["mtp_logits"]]
    return res


def megatron_forward(rank_state_dicts_loader: RankLoader, hf_config: Step35Config | dict,
                     input_ids: torch.Tensor, *, tp: int = 1, pp: int = 1, ep: int = 1, window_convention: str = "hf",
                     dtype: torch.dtype = torch.float32, start_method: str = "spawn", device: str = "cpu",
                     threads_per_rank: Optional[int] = None) -> dict:
    """Forward ``input_ids`` [b, s] through a Step-3.5 megatron checkpoint on tp*pp*ep processes.

    ``rank_state_dicts_loader``: a checkpoint folder (root with ``latest_checkpointed_iteration.txt``,
    or the ``release``/``iter_*`` folder itself; see ``stepconv.megatron_io.resolve_iteration``) holding
    ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``; or a mapping ``{(tp_rank, pp_rank, ep_rank):
    state_dict}``; or a picklable callable ``(tp_rank, pp_rank, ep_rank) -> state_dict``. Each rank
    loads only its own file. Layers are split evenly over PP stages (MTP on the last stage); the
    world is tp*pp*ep ranks (data-parallel = ep, expert-TP = tp), every rank sees the same batch.

    Returns, on the caller (CPU tensors in ``dtype``):
      ``logits`` [b, s, vocab_size] (vocab padding stripped);
      ``hidden_states``: num_hidden_layers+1 tensors [b, s, H]: after the embedding and after each main
      decoder layer (the last one before the final norm);
      ``mtp_hidden``: per MTP layer k, its block output before its final_layernorm, [b, s-k-1, H]
      (positions whose token t+k+1 exists);
      ``mtp_logits``: per MTP layer, megatron's shared ``output_layer`` after the MTP final norm,
      [b, s-k-1, vocab_size] (HF has a separate ``shared_head.output`` per MTP layer);
      ``timings``: seconds (``wall`` on the caller; per stage load/build/forward).
    """
    cfg = Step35Config.of(hf_config)
    cfg.validate_parallel(tp, pp, ep)
    L = cfg.num_layers
    loader = as_rank_loader(rank_state_dicts_loader, pp=pp, ep=ep)
    input_ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be [batch, seq]")
    t0 = time.perf_counter()
    results = run_ranks(_forward_rank, loader, cfg, input_ids, window_convention, dtype, tp=tp, pp=pp,
                        ep=ep, start_method=start_method, device=device, threads_per_rank=threads_per_rank)
    wall = time.perf_counter() - t0
    stages = sorted((r for r in results if r is not None), key=lambda r: r["stage"])
    if [st["stage"] for st in stages] != list(range(pp)):
        raise RuntimeError(f"expected one result per pipeline stage, got {[st['stage'] for st in stages]}")
    V, s = cfg.vocab, input_ids.shape[1]
    hidden: dict[int, torch.Tensor] = {}
    for st in stages:
        hidden.update(st["hidden"])
    missing = [i for i in range(L + 1) if i not in hidden]
    if missing:
        raise RuntimeError(f"hidden states missing for indices {missing}")
    last, n_mtp = stages[-1], cfg.num_mtp
    return {
        "logits": last["logits"][..., :V].contiguous(),
        "hidden_states": [hidden[i] for i in range(L + 1)],
        "mtp_hidden": [last["mtp_block_outputs"][k][:, : s - k - 1].contiguous() for k in range(n_mtp)],
        "mtp_logits": [last["mtp_logits"][k][:, : s - k - 1, :V].contiguous() for k in range(n_mtp)],
        "timings": {"wall": wall, "stages": [st["timings"] for st in stages]},
    }
