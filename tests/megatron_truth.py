"""Ground truth for torch_dist checkpoints, taken from released megatron-core (0.16.1) itself.

Each helper spawns ``tp * pp * ep`` gloo CPU processes, builds in every one the real local-spec GPTModel
of ``test_megatron_names`` for the fixture's *uniform* geometry (one attention shape), and asks
megatron-core's ``dist_checkpointing`` what it keys, loads or saves:

- ``sharded_keys``: the global key space the model requests (ShardedTensor keys with global shapes,
  ShardedObject unique keys).
- ``load_with_megatron``: a torch_dist checkpoint loaded into the model at megatron's default strictness,
  then ``load_state_dict(strict=True)``; each rank's resulting state_dict (plus its gate rows).
- ``save_with_megatron``: stepconv's legacy rank files loaded into the model, then saved by
  ``dist_checkpointing.save`` in the layout of a Megatron-LM training save.

The head-wise attention gate. Released megatron-core has no gate: the model's ``linear_qkv.weight`` is
``[(nh + 2 ng) hd / tp, H]`` per rank and its checkpoint key is ``...linear_qkv.weight``. Megatron-LM's
dev branch (``head_wise_attn_gate``) stores the gated projection as two keys, ``...linear_qkv.weight._qkv``
(exactly released megatron's fused qkv global tensor, per query group ``[q.., k, v]``, same TP split) and
``...linear_qkv.weight._gate`` (``g_proj``, ``[nh, H]``, split over TP along axis 0 with the same rank
offset). The load and save helpers bridge the two by renaming the model's qkv key to ``._qkv`` and adding
a ``._gate`` ShardedTensor next to it (same TP fragment and replica id). Nothing else is changed, so every
other key, shape, offset and replica id is megatron-core's own.

Results travel back from the spawned ranks through ``torch.save`` files in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

QKV = "linear_qkv.weight"
QKV_SUFFIX = "._qkv"
GATE_SUFFIX = "._gate"
# What Megatron-LM's save_checkpoint passes as content_metadata (checkpointing.py:
# _build_sharded_state_dict_metadata, cleaned for serialisation) for a model-only save without the
# distributed optimizer; load_with_megatron passes the checkpoint's own value back, as load_checkpoint does.
# Always hand sharded_state_dict() a fresh copy, never None: megatron adds "dp_cp_group" to the dict in place,
# and 0.16.1 GPTModel.sharded_state_dict reads metadata["dp_cp_group"] on an MTP stage that is not the first
# (PP>1), so metadata=None raises TypeError there.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}

Coords = tuple[int, int, int]  # (tp_rank, pp_rank, ep_rank)


# --- running megatron in spawned ranks ----------------------------------------------------------------
def _rank_main(rank: int, world_size: int, tp: int, pp: int, ep: int, port: int, cfg: dict, job: Callable,
               job_args: tuple, out: str) -> None:
    from megatron.core import parallel_state as ps

    from stepconv.mcore.runtime import cpu_tensor_cuda_is_identity, destroy_parallel, init_parallel
    from test_megatron_names import _build_released_model

    init_parallel(rank, world_size, tp, pp, ep, port)
    try:
        with cpu_tensor_cuda_is_identity():  # PP>1: the MTP stage's embedding copy is synced via .cuda()
            model = _build_released_model(cfg, tp, pp, ep)
        coords = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                  ps.get_expert_model_parallel_rank())
        result = job(model, coords, *job_args)
        torch.save((coords, result), os.path.join(out, f"{rank}.pt"))
        torch.distributed.barrier()
    finally:
        destroy_parallel()


def _in_ranks(hf_dir, tp: int, pp: int, ep: int, job: Callable, *job_args) -> dict[Coords, Any]:
    """Run ``job(model, coords, *job_args)`` on every rank of a tp*pp*ep gloo world; results by coords."""
    from stepconv.mcore.runtime import free_port

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    world_size = tp * pp * ep
    with tempfile.TemporaryDirectory(prefix="megatron_truth_") as out:
        mp.start_processes(_rank_main, args=(world_size, tp, pp, ep, free_port(), cfg, job, job_args, out),
                           nprocs=world_size, start_method="spawn")
        results = {}
        for rank in range(world_size):
            coords, result = torch.load(os.path.join(out, f"{rank}.pt"), weights_only=False)
            results[tuple(coords)] = result
    if len(results) != world_size:
        raise AssertionError(f"{len(results)} distinct rank coordinates from {world_size} ranks")
    return results


def _sharded_items(sharded_state_dict) -> list:
    """The ShardedTensors and ShardedObjects of a (nested) sharded state dict, factories applied."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, apply_factories

    apply_factories(sharded_state_dict)  # SwiGLU fc1 factories -> ShardedTensors (one key, two chunks each)
    return [v for v in nested_values(sharded_state_dict) if isinstance(v, ShardedBase)]


def _rename_qkv(sharded_state_dict: dict) -> dict[str, Any]:
    """Rename every model ``...linear_qkv.weight`` ShardedTensor to ``...linear_qkv.weight._qkv`` in place.

    Returns the renamed ShardedTensors by their state-dict name.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    renamed = {}
    for name, sh in sharded_state_dict.items():
        if name.endswith(QKV):
            if not isinstance(sh, ShardedTensor) or not sh.key.endswith(QKV):
                raise AssertionError(f"{name}: expected a ShardedTensor keyed ...{QKV}, got {sh}")
            sh.key += QKV_SUFFIX
            renamed[name] = sh
    if not renamed:
        raise AssertionError(f"no {QKV} in the model's sharded state dict")
    return renamed


# --- (a) the key space --------------------------------------------------------------------------------
def _job_keys(model, coords: Coords) -> dict[str, tuple]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    keys: dict[str, tuple] = {}
    for sh in _sharded_items(model.sharded_state_dict(metadata=dict(CONTENT_METADATA))):
        if isinstance(sh, ShardedTensor):
            entry, key = ("tensor", tuple(sh.global_shape), str(sh.dtype)), sh.key
        elif isinstance(sh, ShardedObject):
            entry, key = ("object",), sh.unique_key
        else:
            raise AssertionError(f"unexpected sharded item {type(sh).__name__} {sh.key}")
        if keys.setdefault(key, entry) != entry:
            raise AssertionError(f"{key}: {keys[key]} and {entry} on one rank")
    return keys


def sharded_keys(hf_dir, tp: int, pp: int, ep: int) -> dict[str, tuple]:
    """The union over all ranks of the real model's ``sharded_state_dict()`` key space.

    ShardedTensor ``key -> ("tensor", global_shape, dtype as str)``; ShardedObject
    ``unique_key`` (``key/shard_<offset>_<shape>``) ``-> ("object",)``. Keys are megatron's checkpoint keys,
    i.e. after the local spec's ``sharded_state_dict_keys_map`` (``input_layernorm.`` ->
    ``self_attention.linear_qkv.layer_norm_``, ``pre_mlp_layernorm.`` -> ``mlp.linear_fc1.layer_norm_``) and
    after the SwiGLU factories are applied. dtype is the model's (built in float32, ``expert_bias`` float32),
    not a checkpoint's. The vocab dimension is megatron's padded vocab for this TP (128 x tp multiple).
    Raises if two ranks disagree on a key's entry. Example: ``sharded_keys(hf, 2, 1, 1)``.
    """
    keys: dict[str, tuple] = {}
    for coords, rank_keys in sorted(_in_ranks(hf_dir, tp, pp, ep, _job_keys).items()):
        for key, entry in rank_keys.items():
            if keys.setdefault(key, entry) != entry:
                raise AssertionError(f"{key}: {keys[key]} on one rank, {entry} on rank {coords}")
    return keys


# --- (b) loading --------------------------------------------------------------------------------------
def _gate_for(qkv, gate_rows, tp_rank: int):
    """The dev branch's ``..._gate`` ShardedTensor beside a (renamed) ``..._qkv`` one: same TP fragment, same
    replica id, so exactly the ranks that own the qkv chunk own the gate chunk."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp_size = qkv.axis_fragmentations[0]
    # released megatron shards linear_qkv along axis 0 only, at fragment tp_rank, with no prepended axis
    if (qkv.prepend_axis_num, qkv.global_offset, qkv.axis_fragmentations) != (
            0, (tp_rank * qkv.local_shape[0], 0), (tp_size, 1)):
        raise AssertionError(f"{qkv.key}: unexpected sharding {qkv}")
    gate_key = qkv.key[:-len(QKV_SUFFIX)] + GATE_SUFFIX
    return ShardedTensor.from_rank_offsets(gate_key, gate_rows, (0, tp_rank, tp_size), replica_id=qkv.replica_id)


def _job_load(model, coords: Coords, iter_dir: str, heads: int) -> dict[str, torch.Tensor]:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_content_metadata(iter_dir)  # as Megatron-LM's load_checkpoint does
    sharded = model.sharded_state_dict(metadata=dict(metadata or {}))
    for name, qkv in _rename_qkv(sharded).items():
        gate_rows = torch.empty(heads // qkv.axis_fragmentations[0], qkv.local_shape[1], dtype=qkv.dtype)
        sharded[name + GATE_SUFFIX] = _gate_for(qkv, gate_rows, coords[0])
    loaded = dist_checkpointing.load({"model": sharded}, iter_dir)  # default strictness
    gates = {name: loaded["model"].pop(name) for name in list(loaded["model"]) if name.endswith(GATE_SUFFIX)}
    model.load_state_dict(loaded["model"], strict=True)
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return {**state, **{k: v.clone() for k, v in gates.items()}}


def load_with_megatron(ckpt_iter_dir, hf_dir, tp: int, pp: int, ep: int) -> dict[Coords, dict[str, torch.Tensor]]:
    """Load a torch_dist iteration folder into the real model on every rank; each rank's state_dict.

    Megatron-LM's order: read ``content_metadata`` from ``common.pt``, build
    ``{"model": model.sharded_state_dict(metadata=...)}``, ``dist_checkpointing.load`` it at the default
    strictness (``assume_ok_unexpected``: every requested key must exist, extra checkpoint keys are
    ignored) with access-integrity validation, then ``model.load_state_dict(loaded["model"], strict=True)``.

    Gate bridge: released megatron-core 0.16.1 has no head-wise gate, so before loading every
    ``...linear_qkv.weight`` ShardedTensor is re-keyed ``...linear_qkv.weight._qkv`` (same global shape,
    offsets and replica id: the dev branch's ``_qkv`` global tensor is exactly released megatron's fused qkv
    layout), and a ``...linear_qkv.weight._gate`` ShardedTensor of this rank's ``nh / tp`` gate rows is
    requested beside it (same TP fragment and replica id), as the dev branch's gated model requests both
    keys. So a checkpoint without ``_gate`` fails the load, like it would on the dev branch.

    Returns ``{(tp_rank, pp_rank, ep_rank): {name: tensor}}``: every tensor of the rank's
    ``model.state_dict()`` (``linear_qkv.weight`` holds megatron's qkv rows only; ``_extra_state`` entries
    that are not tensors are left out) plus ``<...linear_qkv.weight>._gate`` with the rank's gate rows; cloned,
    CPU, in the model's dtype (float32). A gated legacy rank file's ``linear_qkv.weight`` is
    ``cat([linear_qkv.weight, linear_qkv.weight._gate])``.
    Example: ``load_with_megatron(out / "release", hf, 2, 1, 1)``.
    """
    heads = json.loads((Path(hf_dir) / "config.json").read_text())["num_attention_heads"]
    return _in_ranks(hf_dir, tp, pp, ep, _job_load, str(ckpt_iter_dir), heads)


# --- (c) saving ---------------------------------------------------------------------------------------
def _job_save(model, coords: Coords, legacy_dir: str, out_root: str, iter_dir: str, pp: int, ep: int,
              iteration: int) -> None:
    from megatron.core import dist_checkpointing

    from stepconv.megatron_io import (CHECKPOINT_VERSION, RANK_FILE, TRACKER, iteration_dir_name, load_rank_file,
                                      rank_dir_name)

    legacy = Path(legacy_dir)
    tracker = (legacy / TRACKER).read_text().strip()
    ours = load_rank_file(legacy / iteration_dir_name(tracker) / rank_dir_name(*coords, pp, ep) / RANK_FILE)
    expected = model.state_dict()
    own, gates = {}, {}
    for k, v in ours["model"].items():
        if k.endswith(QKV):  # a gated rank file's linear_qkv: megatron's qkv rows, then this rank's gate rows
            rows = expected[k].shape[0]
            own[k], gates[k] = v[:rows], v[rows:]
        else:
            own[k] = v
    # keep the rank files' dtypes (bf16 weights, fp32 expert_bias), as a bf16 training run's model holds them
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in own and own[name] is not None:
            t.data = t.data.to(own[name].dtype)
    model.load_state_dict(own, strict=True)

    sharded = model.sharded_state_dict(metadata=dict(CONTENT_METADATA))
    for name, qkv in _rename_qkv(sharded).items():
        sharded[name + GATE_SUFFIX] = _gate_for(qkv, gates[name].contiguous(), coords[0])

    args = ours["args"]
    for k in ("step35_config", "stepconv"):
        if hasattr(args, k):
            delattr(args, k)
    args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist", "use_dist_ckpt": True})
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
             "num_floating_point_operations_so_far": 0, "model": sharded}
    dist_checkpointing.save(state, iter_dir, content_metadata=dict(CONTENT_METADATA))
    if torch.distributed.get_rank() == 0:
        Path(out_root, TRACKER).write_text(f"{iteration}\n")


def save_with_megatron(hf_dir, legacy_dir, out_root, tp: int, pp: int, ep: int, iteration: int) -> Path:
    """Save stepconv's legacy rank files through the real model with ``dist_checkpointing.save``.

    ``legacy_dir`` is ``hf_to_mcore(hf_dir, legacy_dir, tp=tp, pp=pp, ep=ep, spec="local")``'s output for the
    same layout. Every rank loads its rank file into the model (``load_state_dict(strict=True)``, the
    parameters cast to the rank file's dtypes: bf16 weights, fp32 ``expert_bias``), peeling the gate rows
    off ``linear_qkv.weight`` (as many leading rows as the model's ``linear_qkv.weight`` has are megatron's qkv,
    the rest are this rank's gate rows).

    Gate bridge (the dev branch's head-wise-gate save layout): the model's ``...linear_qkv.weight`` is
    re-keyed ``...linear_qkv.weight._qkv``, and a ``...linear_qkv.weight._gate`` ShardedTensor is added from
    the peeled rows with ``from_rank_offsets(key, gate_rows, (0, tp_rank, tp))`` and the qkv tensor's own
    ``replica_id`` (so exactly the ranks that write qkv also write the gate; megatron's access-integrity
    validation checks that each chunk has one main replica).

    Layout as Megatron-LM's training ``save_checkpoint`` with ``--ckpt-format torch_dist`` (no optimizer,
    no RNG state) lays it out: ``out_root/iter_{iteration:07d}/{common.pt, metadata.json, .metadata,
    __*_*.distcp}`` and ``out_root/latest_checkpointed_iteration.txt`` = ``iteration``. ``common.pt`` holds
    ``args`` (the rank file's Namespace minus ``step35_config`` and ``stepconv``, with ``ckpt_format`` =
    ``torch_dist`` and ``use_dist_ckpt`` = True), ``checkpoint_version`` 3.0, ``iteration``,
    ``num_floating_point_operations_so_far`` 0 and ``content_metadata``. Returns the iteration folder.
    Example: ``save_with_megatron(hf, legacy, out, 2, 1, 1, 5)``.
    """
    from stepconv.megatron_io import iteration_dir_name

    iter_dir = Path(out_root) / iteration_dir_name(iteration)
    iter_dir.mkdir(parents=True, exist_ok=True)  # Megatron-LM's rank 0 creates it before saving
    _in_ranks(hf_dir, tp, pp, ep, _job_save, str(legacy_dir), str(out_root), str(iter_dir), pp, ep, iteration)
    return iter_dir
