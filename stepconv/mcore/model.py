"""Step-3.5-Flash as a megatron-core ``GPTModel`` (local spec), for released megatron-core >= 0.16.

The module tree, and therefore every ``state_dict`` key, is the one released megatron-core 0.16.1
builds for ``GPTModel`` with ``get_gpt_decoder_block_spec(..., use_transformer_engine=False)`` and
``get_gpt_mtp_block_spec``; only the ``linear_qkv`` weights carry ``nh/tp`` extra trailing gate rows
per rank. What differs from a stock GPT is inside the modules (stepconv.mcore.modules) and in
``Step35GPTModel.forward``, which implements the HF forward exactly (MTP included: megatron 0.16.1
feeds MTP the *post*-final-norm hidden state and chains MTP layers on post-norm outputs; HF/vLLM use
pre-norm states, which is what this forward does).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MTPLossLoggingHelper,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_num_layers_to_build,
    roll_tensor,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from ..config import Step35Config
from .hfconfig import Step35LayerInfo, all_layer_infos
from .runtime import compat_patches, cpu_tensor_cuda_is_identity
from .modules import (
    Step35CoreAttention,
    Step35RMSNorm,
    Step35SelfAttention,
    Step35SwiGLU,
    Step35TransformerLayer,
    native_head_wise_gate_available,
)

# Same map as get_gpt_layer_local_spec (torch_dist keys match megatron's own local checkpoints).
_LOCAL_SHARDED_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def build_transformer_config(hf_config: Step35Config | dict, *, params_dtype: torch.dtype = torch.float32,
                             tp: Optional[int] = None, pp: Optional[int] = None,
                             ep: Optional[int] = None, etp: Optional[int] = None,
                             perform_initialization: bool = True, sequence_parallel: bool = False,
                             config_overrides: Optional[dict] = None) -> TransformerConfig:
    """The model-level TransformerConfig (attention shape = full-attention layers).

    Parallel sizes default to the current megatron parallel_state. Refuses configs this model does not
    implement (every fact and default read through ``Step35Config``). ``sequence_parallel`` (TP > 1 only):
    megatron's sequence parallelism, which its MoE layer requires for training at TP > 1.
    ``config_overrides`` may set training options such as ``mtp_loss_scaling_factor``.
    """
    c = Step35Config.of(hf_config)
    if tp is None:
        tp = ps.get_tensor_model_parallel_world_size()
    if pp is None:
        pp = ps.get_pipeline_model_parallel_world_size()
    if ep is None:
        ep = ps.get_expert_model_parallel_world_size()
    if etp is None and ps.model_parallel_is_initialized():
        etp = ps.get_expert_tensor_parallel_world_size()
    if c.att_impl_type != "GQA":
        raise NotImplementedError(f"att_impl_type {c.att_impl_type!r}")
    if c.tied:
        raise NotImplementedError("tied embeddings (Step-3.5-Flash is untied)")
    if c.sink:
        raise NotImplementedError("attention sinks")
    moe = c.moe_layers
    if moe and c.router_activation != "sigmoid":
        raise NotImplementedError(f"moe_router_activation {c.router_activation!r} (only sigmoid is implemented)")
    if moe and c.top_k == 1:
        # megatron does not renormalise a single sigmoid score (HF divides it by itself)
        raise NotImplementedError("moe_top_k == 1")
    if moe and not c.router_bias:
        raise NotImplementedError("use_moe_router_bias=False (HF then routes with a different function)")
    if moe and not c.norm_expert_weight:
        # megatron's sigmoid router always divides the top-k weights by their sum
        raise NotImplementedError("norm_expert_weight=False")
    full = c.attn_full()
    kw = dict(
        num_layers=c.num_layers,
        hidden_size=c.hidden,
        num_attention_heads=full.heads,
        num_query_groups=full.groups,
        kv_channels=full.head_dim,
        ffn_hidden_size=c.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=c.eps,
        # Step35RMSNorm always applies 1+w and q/k norms always exist, as in the HF modeling code whatever
        # zero_centered / use_qk_norm say (see Step35Config); these two flags only document that.
        layernorm_zero_centered_gamma=True,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        # MLP builds MLPSubmodules.activation_func (our clamp-after-SiLU SwiGLU) only with this flag.
        use_te_activation_func=True,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        attention_softmax_in_fp32=True,
        rotary_interleaved=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=bool(sequence_parallel) and tp > 1,
    )
    if moe:
        kw.update(
            num_moe_experts=c.num_experts,
            moe_router_topk=c.top_k,
            moe_ffn_hidden_size=c.moe_ffn,
            moe_shared_expert_intermediate_size=c.shared_ffn or None,
            moe_router_score_function=c.router_activation,
            moe_router_enable_expert_bias=c.router_bias,
            moe_router_topk_scaling_factor=c.router_scaling,
            moe_router_dtype="fp32" if c.fp32_router else None,
            moe_router_pre_softmax=False,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_layer_freq=[1 if c.is_moe(i) else 0 for i in range(c.num_layers)],
        )
    if c.num_mtp:
        kw["mtp_num_layers"] = c.num_mtp
    if native_head_wise_gate_available():  # (Step35Config refuses configs without the head-wise gate)
        kw["head_wise_attn_gate"] = True
    kw.update(config_overrides or {})
    config = TransformerConfig(**kw)
    if config.context_parallel_size != 1:
        raise NotImplementedError("context parallelism (attention assumes the full sequence per rank)")
    return config


def layer_transformer_config(base: TransformerConfig, info: Step35LayerInfo) -> TransformerConfig:
    """Per-layer copy of ``base`` carrying this layer's attention shape."""
    if (base.num_attention_heads, base.num_query_groups, base.kv_channels) == (
            info.num_heads, info.num_groups, info.head_dim):
        return base
    return dataclasses.replace(base, num_attention_heads=info.num_heads,
                               num_query_groups=info.num_groups, kv_channels=info.head_dim)


def _activation(limit: float) -> ModuleSpec:
    return ModuleSpec(module=Step35SwiGLU, params={"limit": limit})


def step35_layer_spec(info: Step35LayerInfo, layer_config: TransformerConfig) -> ModuleSpec:
    """ModuleSpec of one Step-3.5 decoder (or MTP inner) layer, local backend."""
    attention = ModuleSpec(
        module=Step35SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "step_layer": info},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=Step35CoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=Step35RMSNorm,
            k_layernorm=Step35RMSNorm,
        ),
    )
    if info.is_moe:
        experts = ModuleSpec(
            module=SequentialMLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                     activation_func=_activation(info.swiglu_limit),
                                     linear_fc2=RowParallelLinear))
        shared = None
        if layer_config.moe_shared_expert_intermediate_size:
            shared = ModuleSpec(
                module=SharedExpertMLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                         activation_func=_activation(info.swiglu_limit_shared),
                                         linear_fc2=RowParallelLinear))
        mlp = ModuleSpec(module=MoELayer,
                         submodules=MoESubmodules(experts=experts, shared_experts=shared),
                         metainfo={"fuse_pre_mlp_layernorm": False})
    else:
        mlp = ModuleSpec(
            module=MLP,
            params={"ffn_hidden_size": layer_config.ffn_hidden_size},
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                     activation_func=_activation(info.swiglu_limit_shared),
                                     linear_fc2=RowParallelLinear))
    return ModuleSpec(
        module=Step35TransformerLayer,
        params={"layer_config": layer_config, "step_layer": info},
        submodules=TransformerLayerSubmodules(
            input_layernorm=Step35RMSNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Step35RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(_LOCAL_SHARDED_KEYS_MAP),
        ),
    )


def step35_block_specs(hf_config: Step35Config | dict, config: TransformerConfig, *, window_convention: str = "hf",
                       vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
                       ) -> tuple[TransformerBlockSubmodules, Optional[MultiTokenPredictionBlockSubmodules]]:
    """Decoder block spec (layers of this PP stage) and MTP block spec (None off the MTP stage)."""
    infos = all_layer_infos(hf_config, window_convention)
    L = config.num_layers
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if config.pipeline_model_parallel_layout is not None:
        raise NotImplementedError("custom pipeline_model_parallel_layout")
    specs = [step35_layer_spec(infos[i], layer_transformer_config(config, infos[i]))
             for i in range(offset, offset + n)]
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=Step35RMSNorm)
    mtp = None
    n_mtp = config.mtp_num_layers or 0
    if n_mtp and get_mtp_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank) > 0:
        layer_specs = []
        for k in range(n_mtp):
            info = infos[L + k]
            inner = step35_layer_spec(info, layer_transformer_config(config, info))
            inner_field = mtp_inner_layer_name()
            layer_specs.append(ModuleSpec(
                module=MultiTokenPredictionLayer,
                submodules=MultiTokenPredictionLayerSubmodules(
                    enorm=Step35RMSNorm, hnorm=Step35RMSNorm, eh_proj=ColumnParallelLinear,
                    layer_norm=Step35RMSNorm, **{inner_field: inner}),
            ))
        mtp = MultiTokenPredictionBlockSubmodules(layer_specs=layer_specs)
    return block, mtp


def mtp_inner_layer_name() -> str:
    """The installed megatron-core's name of an MTP layer's decoder block: ``transformer_layer`` (0.16.x) or
    ``mtp_model_layer`` (>= 0.17 and dev)."""
    fields = {f.name for f in dataclasses.fields(MultiTokenPredictionLayerSubmodules)}
    return "transformer_layer" if "transformer_layer" in fields else "mtp_model_layer"


def _mtp_names_as_installed(module, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: MTP block keys written under the other megatron-core version's name
    (``mtp.layers.K.transformer_layer.`` <-> ``mtp.layers.K.mtp_model_layer.``) are renamed to the installed one,
    so a checkpoint converted for megatron-core 0.16 loads into a model built with 0.17/dev and back."""
    mine = mtp_inner_layer_name()
    other = "mtp_model_layer" if mine == "transformer_layer" else "transformer_layer"
    head = prefix + "mtp.layers."
    for key in [k for k in state_dict if k.startswith(head) and f".{other}." in k]:
        state_dict[key.replace(f".{other}.", f".{mine}.", 1)] = state_dict.pop(key)


class _PreNormCapture:
    """Forward pre-hook on a final norm: keeps its input (the pre-norm hidden state)."""

    def __init__(self, module: torch.nn.Module):
        self.value: Optional[torch.Tensor] = None
        self._h = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.value = args[0]

    def remove(self) -> None:
        self._h.remove()


class Step35GPTModel(GPTModel):
    """GPTModel whose forward is the exact HF Step-3.5 forward (see module docstring).

    After a forward on the MTP stage, ``last_mtp_hidden_states[k]`` holds MTP layer k's output after
    its ``final_layernorm`` (``[s, b, h]``; apply any head), ``last_mtp_block_outputs[k]`` the same
    before the norm. MTP layer k at position t reads token t+k+1: positions ``t >= s-k-1`` see
    megatron's zero-filled roll and are undefined (they do not influence earlier positions).
    ``true_vocab_size`` (set by ``build_step35_model``): the unpadded vocabulary the loss runs over.
    """

    true_vocab_size: Optional[int] = None

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, decoder_input: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, inference_context=None, packed_seq_params=None,
                extra_block_kwargs: Optional[dict] = None, runtime_gather_output: Optional[bool] = None,
                *, inference_params=None, loss_mask=None, padding_mask=None, return_dict: bool = False):
        """``input_ids`` [b, s]. Returns logits [b, s, V/tp or V] (loss [b, s] if labels), or a dict
        with ``logits``, ``mtp_hidden_states``, ``mtp_block_outputs``, ``mtp_logits`` when
        ``return_dict``. Off the last PP stage, returns the hidden state [s, b, h]."""
        if inference_context is not None or inference_params is not None or packed_seq_params is not None:
            raise NotImplementedError("Step35GPTModel.forward: inference contexts / packed sequences")
        self.last_mtp_hidden_states = []
        self.last_mtp_block_outputs = []
        if position_ids is None and input_ids is not None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)

        capture = None
        if self.mtp_process and self.decoder.final_layernorm is not None:
            capture = _PreNormCapture(self.decoder.final_layernorm)
        try:
            hidden_states = self.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                                         padding_mask=padding_mask, **(extra_block_kwargs or {}))
        finally:
            if capture is not None:
                capture.remove()
        if self.mtp_process:
            if capture is None or capture.value is None:
                raise RuntimeError("MTP stage without the decoder's final layernorm")
            self._run_mtp(input_ids, position_ids, capture.value, attention_mask)
        if not self.post_process:
            return hidden_states

        if labels is not None and self.config.mtp_num_layers:
            hidden_states = self._attach_mtp_loss(hidden_states, labels, loss_mask)
        logits, _ = self.output_layer(hidden_states, weight=None,
                                      runtime_gather_output=runtime_gather_output)
        if return_dict:
            mtp_logits = [self.output_layer(h, weight=None, runtime_gather_output=runtime_gather_output)[0]
                          .transpose(0, 1).contiguous() for h in self.last_mtp_hidden_states]
            return {"logits": logits.transpose(0, 1).contiguous(),
                    "mtp_hidden_states": self.last_mtp_hidden_states,
                    "mtp_block_outputs": self.last_mtp_block_outputs,
                    "mtp_logits": mtp_logits}
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Cross entropy [b, s] over the true vocabulary only: the padded logits (global column >=
        ``true_vocab_size``) are set to -inf before megatron's (vocab-parallel) cross entropy, so they join
        no softmax and their output-layer rows get no gradient. ``logits``: [s, b, V/tp] (or [s, b, V]
        when gathered)."""
        true_vocab = self.true_vocab_size
        part = logits.shape[-1]
        start = 0
        if part != self.vocab_size:  # this rank's vocab shard
            start = ps.get_tensor_model_parallel_rank() * part
        if true_vocab is not None and start + part > true_vocab:
            padded = torch.arange(start, start + part, device=logits.device) >= true_vocab
            logits = logits.masked_fill(padded, float("-inf"))
        return super().compute_language_model_loss(labels, logits)

    def _attach_mtp_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                         loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Megatron's MTP loss (``GPTModel._postprocess``): MTP layer k at position t predicts token t+k+2
        (labels and loss mask rolled left k+1 times, the rolled-in tail masked out); its masked mean cross
        entropy, times ``mtp_loss_scaling_factor / mtp_num_layers``, is attached to the main hidden states by
        ``MTPLossAutoScaler`` (its gradient joins the main loss's backward, scaled by what the pipeline
        schedule sets with ``MTPLossAutoScaler.set_loss_scale``). The head is the shared ``output_layer``."""
        n_mtp = self.config.mtp_num_layers
        if len(self.last_mtp_hidden_states) != n_mtp:
            raise RuntimeError(f"expected {n_mtp} MTP outputs, got {len(self.last_mtp_hidden_states)}")
        mtp_labels = labels.clone()
        if loss_mask is None:
            loss_mask = torch.ones_like(mtp_labels)
        scale = self.config.mtp_loss_scaling_factor / n_mtp
        for k, h in enumerate(self.last_mtp_hidden_states):
            mtp_logits, _ = self.output_layer(h, weight=None)
            mtp_labels, _ = roll_tensor(mtp_labels, shifts=-1, dims=-1, cp_group=self.cp_group)
            loss_mask, num_tokens = roll_tensor(loss_mask, shifts=-1, dims=-1, cp_group=self.cp_group)
            mtp_loss = loss_mask * self.compute_language_model_loss(mtp_labels, mtp_logits)
            if self.training:
                MTPLossLoggingHelper.save_loss_to_tracker(
                    torch.sum(mtp_loss) / num_tokens, k, n_mtp,
                    avg_group=ps.get_data_parallel_group(with_context_parallel=True))
            if self.config.calculate_per_token_loss:
                hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * mtp_loss)
            else:
                hidden_states = MTPLossAutoScaler.apply(hidden_states, scale * mtp_loss / num_tokens)
        return hidden_states

    def _run_mtp(self, input_ids, position_ids, h_prev, attention_mask) -> None:
        ids, pos = input_ids, position_ids
        for layer in self.mtp.layers:
            cap = _PreNormCapture(layer.final_layernorm)
            try:
                out = layer(input_ids=ids, position_ids=pos, hidden_states=h_prev,
                            attention_mask=attention_mask, embedding=self.embedding)
            finally:
                cap.remove()
            post, ids, pos = out[0], out[1], out[2]
            self.last_mtp_hidden_states.append(post)
            self.last_mtp_block_outputs.append(cap.value)
            h_prev = cap.value  # HF/vLLM chain MTP layers on the pre-norm block output


def build_step35_model(hf_config: Step35Config | dict, *, pre_process: Optional[bool] = None,
                       post_process: Optional[bool] = None, spec: str = "local",
                       params_dtype: torch.dtype = torch.float32, window_convention: str = "hf",
                       parallel_output: bool = True, perform_initialization: bool = True,
                       make_vocab_size_divisible_by: int = 128, sequence_parallel: bool = False,
                       config_overrides: Optional[dict] = None, vp_stage: Optional[int] = None
                       ) -> Step35GPTModel:
    """Build Step-3.5 for the current megatron parallel state (call ``init_parallel`` first).

    ``hf_config``: the config.json dict (or its ``Step35Config``). ``pre_process``/``post_process`` default to
    first/last pipeline stage. The embedding lives on the first stage and, with MTP, also on the
    last; MTP layers live on the last stage. ``window_convention``: "hf" = a query sees
    ``sliding_window`` keys including itself (HF/vLLM), "megatron" = one more (TE window (W, 0)).
    ``perform_initialization=False`` skips random init (weights are then loaded).
    ``sequence_parallel``: megatron's sequence parallelism at TP > 1 (needed to train MoE layers at TP > 1).
    With ``labels``, the forward returns the per-token loss [b, s] over the true vocabulary
    (``model.true_vocab_size``) and, with MTP layers, attaches megatron's MTP loss
    (``mtp_loss_scaling_factor``, default 0.1, settable through ``config_overrides``).
    """
    if spec != "local":
        raise NotImplementedError(f"spec={spec!r}: only the local (non-TE) spec is implemented")
    c = Step35Config.of(hf_config)
    compat_patches()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True)
    config = build_transformer_config(c, params_dtype=params_dtype,
                                      perform_initialization=perform_initialization,
                                      sequence_parallel=sequence_parallel, config_overrides=config_overrides)
    block, mtp = step35_block_specs(c, config, window_convention=window_convention,
                                    vp_stage=vp_stage)
    vocab = c.padded_vocab(config.tensor_model_parallel_size, make_vocab_size_divisible_by)
    with cpu_tensor_cuda_is_identity():
        model = Step35GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=vocab,
            max_sequence_length=c.max_positions,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=False,
            position_embedding_type="none",
            mtp_block_spec=mtp,
            vp_stage=vp_stage,
        )
    model.true_vocab_size = c.vocab
    model._register_load_state_dict_pre_hook(_mtp_names_as_installed, with_module=True)
    return model
