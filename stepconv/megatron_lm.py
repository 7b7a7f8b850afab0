"""Megatron-LM entry for Step-3.5-Flash on stepconv's model: train a stepconv checkpoint with ``pretrain``.

Megatron-LM has no Step-3.5 model (per-layer heads and RoPE, zero-centred q/k norms, clamp-after-SiLU SwiGLU,
the fp32 selection-only router bias, MTP layers with their own heads); ``stepconv.mcore.build_step35_model``
has, and this module plugs it into Megatron-LM's own training loop, checkpoint loading and saving:

- ``model_provider(pre_process, post_process, vp_stage, config, pg_collection)``: the model for this rank. The
  Step-3.5 config comes from the checkpoint's args (``args.step35_config``, which stepconv writes), read from
  ``--load`` (or ``--pretrained-checkpoint``), or from ``--step35-hf-config config.json``; it is put back on
  Megatron-LM's args so every checkpoint Megatron-LM saves carries it (``stepconv mcore-to-hf`` reads it there).
  Training options (MTP loss factor, recompute, gradient-accumulation fusion, sequence parallelism...) come from
  Megatron-LM's own ``core_transformer_config_from_args``; the architecture only from the Step-3.5 config.
- ``forward_step(data_iterator, model)``: the batch as Megatron-LM's ``pretrain_gpt.get_batch`` reads it (MTP
  ranks get the tokens too), the model's per-token loss over the true vocabulary with Megatron's MTP loss
  attached (``--mtp-loss-scaling-factor``), reduced by ``stepconv.mcore.train.loss_func``.
- ``main()``: ``pretrain`` with ``pretrain_gpt``'s dataset provider and embedding ranks; run it from the
  Megatron-LM source root, where ``pretrain_gpt.py`` lives (examples/megatron_lm/pretrain_step35.py).

Works with the Megatron-LM source tree of core_v0.16.x (``pretrain(datasets_provider, model_provider, ...)``)
and of the ``dev`` branch (``pretrain(cfg_container, ...)``, tried at commit bd5c98f779); ``main`` picks the
call by ``pretrain``'s signature. Importing this module needs no ``megatron.training``; calling it does.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from functools import partial
from typing import Optional

from .config import Step35Config, StepconvError

# TransformerConfig fields taken from Megatron-LM's command line (training behaviour, not architecture).
TRAINING_FIELDS = (
    "mtp_loss_scaling_factor", "calculate_per_token_loss", "gradient_accumulation_fusion",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "distribute_saved_activations", "deallocate_pipeline_outputs", "barrier_with_L1_time",
    "moe_router_bias_update_rate", "moe_per_layer_logging", "overlap_p2p_comm", "batch_p2p_comm",
    "variable_seq_lengths", "virtual_pipeline_model_parallel_size", "microbatch_group_size_per_vp_stage",
    "cross_entropy_loss_fusion", "cross_entropy_fusion_impl", "init_method_std", "num_microbatches_with_partial_activation_checkpoints",
    "tp_comm_overlap", "defer_embedding_wgrad_compute", "wgrad_deferral_limit",
)


def add_step35_args(parser):
    """Megatron-LM ``extra_args_provider``: the two Step-3.5 options Megatron-LM has no flag for."""
    g = parser.add_argument_group("Step-3.5 (stepconv)")
    g.add_argument("--step35-hf-config", default=None,
                   help="config.json of the model; default: args.step35_config of the checkpoint at --load")
    g.add_argument("--step35-window-convention", default=None, choices=("hf", "megatron"),
                   help="sliding-window width convention (default: the checkpoint's, else hf)")
    return parser


def _checkpoint_args(path: str):
    """The args a Megatron checkpoint (legacy or torch_dist) records, read with stepconv's safe loader."""
    from .convert import plan_export

    return plan_export(path).args


def step35_config(args) -> Step35Config:
    """The Step-3.5 config for a Megatron-LM run; also records it on ``args`` (saved with every checkpoint)."""
    if isinstance(getattr(args, "step35_config", None), dict):
        cfg = Step35Config.from_dict(args.step35_config, source="args.step35_config")
    elif getattr(args, "step35_hf_config", None):
        cfg = Step35Config.from_file(args.step35_hf_config)
    else:
        path = getattr(args, "load", None) or getattr(args, "pretrained_checkpoint", None)
        if not path:
            raise StepconvError("no Step-3.5 config: pass --load (a stepconv checkpoint) or --step35-hf-config")
        ckpt_args = _checkpoint_args(path)
        cfg = Step35Config.from_megatron_args(ckpt_args, str(path))
        if getattr(args, "step35_window_convention", None) is None:
            args.step35_window_convention = getattr(ckpt_args, "step35_window_convention", None)
    args.step35_config = cfg.raw
    return cfg


def _training_overrides(args, config) -> dict:
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    ours = {f.name for f in dataclasses.fields(type(config))}
    from megatron.core.transformer.transformer_config import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)} & ours
    return {k: getattr(config, k) for k in TRAINING_FIELDS if k in known}


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """Megatron-LM model provider: ``Step35GPTModel`` for this rank (see the module docstring)."""
    from megatron.training import get_args

    from .mcore.model import build_step35_model

    args = get_args()
    cfg = step35_config(args)
    tp = args.tensor_model_parallel_size
    padded = cfg.padded_vocab(tp, args.make_vocab_size_divisible_by)
    if getattr(args, "padded_vocab_size", None) not in (None, padded):
        raise StepconvError(f"Megatron-LM padded the vocabulary to {args.padded_vocab_size}, the checkpoint has "
                            f"{padded} rows ({cfg.vocab} padded for TP {tp}); use a tokenizer of {cfg.vocab} tokens "
                            f"(NullTokenizer: --vocab-size {cfg.vocab} on Megatron-LM dev, {cfg.vocab - 1} on "
                            f"core_v0.16, whose NullTokenizer adds an end-of-document token)")
    if getattr(args, "context_parallel_size", 1) != 1:
        raise StepconvError("--context-parallel-size > 1: not implemented for Step-3.5 (attention sees the "
                            "whole sequence on each rank)")
    return build_step35_model(
        cfg, pre_process=pre_process, post_process=post_process, params_dtype=args.params_dtype,
        window_convention=getattr(args, "step35_window_convention", None) or "hf", parallel_output=True,
        perform_initialization=bool(getattr(args, "perform_initialization", True)),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        sequence_parallel=bool(args.sequence_parallel), config_overrides=_training_overrides(args, config),
        vp_stage=vp_stage)


def forward_step(data_iterator, model):
    """Megatron-LM forward step: ``pretrain_gpt.get_batch``, the model's loss, ``stepconv.mcore.train.loss_func``."""
    from megatron.core.utils import get_attr_wrapped_model

    from pretrain_gpt import get_batch  # Megatron-LM's source root (where training is started)

    from .mcore.train import loss_func

    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids, packed = get_batch(data_iterator, vp_stage)
    if packed is not None:
        raise StepconvError("packed sequences (--sft / THD batches) are not implemented for Step-3.5")
    _record_first_batch(tokens, labels, loss_mask)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


_RECORDED = False


def _record_first_batch(tokens, labels, loss_mask) -> None:
    """With ``STEPCONV_RECORD_BATCH=path``, global rank 0 saves its first microbatch (tokens, labels, loss mask)
    there, so the loss Megatron-LM logs at iteration 1 can be recomputed by the HF reference on the same batch."""
    global _RECORDED
    path = os.environ.get("STEPCONV_RECORD_BATCH")
    if _RECORDED or not path or tokens is None:
        return
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    _RECORDED = True
    torch.save({"tokens": tokens.cpu(), "labels": labels.cpu(), "loss_mask": loss_mask.cpu()}, path)


def main() -> None:
    """``pretrain`` Step-3.5 with Megatron-LM (run from its source root; Megatron-LM's usual command line)."""
    import pretrain_gpt
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    datasets = pretrain_gpt.train_valid_test_datasets_provider
    datasets.is_distributed = True
    common = dict(get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
    if next(iter(inspect.signature(pretrain).parameters)) == "cfg_container":  # Megatron-LM dev
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=add_step35_args,
                                       args_defaults={"tokenizer_type": "NullTokenizer"})
        pretrain(pretrain_cfg_container_from_args(args), datasets, model_provider, ModelType.encoder_or_decoder,
                 forward_step, **common)
    else:  # core_v0.16.x
        pretrain(datasets, model_provider, ModelType.encoder_or_decoder, forward_step,
                 args_defaults={"tokenizer_type": "NullTokenizer"}, extra_args_provider=add_step35_args, **common)
