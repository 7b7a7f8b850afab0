"""Step-3.5-Flash as a megatron-core GPTModel (released megatron-core >= 0.16, local spec, CPU or GPU).

Public API (imported lazily, so ``import stepconv.mcore`` does not import megatron-core):

- ``cpu_patches()``, ``init_parallel(rank, world_size, tp, pp, ep, port)``, ``destroy_parallel()``
  (``stepconv.mcore.runtime``)
- ``build_step35_model(hf_config, *, pre_process, post_process, spec="local", params_dtype,
  window_convention="hf")`` -> ``Step35GPTModel`` (a ``GPTModel``) (``stepconv.mcore.model``)
- ``megatron_forward(loader, hf_config, input_ids, *, tp, pp, ep, ...)``, ``run_ranks`` and ``start_ranks``
  (``stepconv.mcore.run``)
- the model one piece at a time (embedding, a decoder layer, head, an MTP layer) for the streamed verify, with
  per-piece weights from rank files or any checkpoint (``stepconv.mcore.stream``)
- rank loaders (checkpoint folder, mapping, callable) in ``stepconv.mcore.ckpt``; per-layer facts, derived
  from ``stepconv.config.Step35Config``, in ``stepconv.mcore.hfconfig``; test oracles (reference forward,
  HF->rank layout) in ``stepconv.mcore.testing``. Rank folder names and iteration folders are
  ``stepconv.megatron_io``'s (``rank_dir_name``, ``resolve_iteration``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "cpu_patches": "runtime",
    "init_parallel": "runtime",
    "destroy_parallel": "runtime",
    "free_port": "runtime",
    "build_step35_model": "model",
    "build_transformer_config": "model",
    "Step35GPTModel": "model",
    "megatron_forward": "run",
    "run_ranks": "run",
    "start_ranks": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
