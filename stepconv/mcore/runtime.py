"""Running released megatron-core (>= 0.16) in-process, on CPU (gloo) or GPU (nccl).

megatron-core 0.16.1 assumes CUDA in a few places even with the local (non-TE) spec; ``cpu_patches``
papers over exactly those (its docstring lists them), and only when CUDA is unavailable.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_PATCHED = False


def _noop(*_args, **_kwargs):
    return None


_COMPAT_PATCHED = False


def compat_patches() -> None:
    """Patches needed whenever TransformerEngine is absent, CPU or GPU (idempotent).

    megatron-core 0.16.x imports ``te_general_gemm`` inside a ``try`` without an ``else`` fallback, so the
    MoE router GEMM raises NameError without TE (fixed upstream on main: ``te_general_gemm = None``).
    """
    global _COMPAT_PATCHED
    if _COMPAT_PATCHED:
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _COMPAT_PATCHED = True


def cpu_patches() -> bool:
    """Apply the in-process patches megatron-core needs on a machine without CUDA.

    Idempotent. Returns True when the patches are (or already were) in effect, False when CUDA is
    available and nothing was patched.

    - ``torch.cuda.current_device`` -> ``torch.device("cpu")``: rotary/global-buffer/router/TP-mapping
      allocations use it as a device.
    - ``torch.cuda.synchronize`` -> no-op (dist-checkpoint preload, timers).
    - inference RNG tracker: ``get_cuda_rng_tracker().fork()`` becomes a no-op context (there is no
      CUDA RNG to fork; dropout is 0 for inference anyway).
    - ``compat_patches()``: ``moe_utils.te_general_gemm = None`` when TransformerEngine is absent
      (0.16.1 lacks the fallback and raises NameError in the router GEMM; also needed on GPU).
    """
    global _PATCHED
    compat_patches()
    if torch.cuda.is_available():
        return False
    if _PATCHED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = _noop

    from megatron.core.tensor_parallel import random as tp_random

    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _PATCHED = True
    return True


@contextlib.contextmanager
def cpu_tensor_cuda_is_identity():
    """Within the block, ``Tensor.cuda()`` returns the tensor itself when CUDA is unavailable.

    megatron-core 0.16.1 ``LanguageModule.setup_embeddings_and_output_layer`` moves the duplicated
    MTP/tied embedding with ``.cuda()`` before all-reducing it between the first and last PP stage.
    Scoped to model construction rather than patched process-wide.
    """
    if torch.cuda.is_available():
        yield
        return
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(rank: int, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1,
                  port: Optional[int] = None, *, etp: Optional[int] = None, seed: int = 1234,
                  backend: Optional[str] = None, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl on GPU) and megatron's parallel_state.

    ``world_size`` must be a multiple of ``tp * pp``; data-parallel size is ``world_size/(tp*pp)`` and
    experts use ``etp`` (default: megatron's default, = tp) x ``ep``. The usual converter runs use
    ``world_size = tp * pp * ep`` (so data-parallel size = ep, expert-data-parallel size 1).
    """
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available() and backend != "gloo"
    compat_patches()
    if not cuda:
        cpu_patches()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if world_size % (tp * pp):
        raise ValueError(f"world_size {world_size} not divisible by tp*pp={tp * pp}")
    if port is None:
        port = int(os.environ.get("MASTER_PORT", "29500"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    torch.manual_seed(seed)
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
