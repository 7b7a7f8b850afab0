"""Training Step-3.5 with megatron-core's own pipeline schedules, DDP and gradient finalisation.

``forward_step`` and ``loss_func`` follow Megatron-LM's ``pretrain_gpt.py`` contract (``forward_step(data_iterator,
model) -> (output, partial(loss_func, loss_mask))``; ``loss_func`` returns ``(loss_sum, num_tokens, report)``), so
megatron-core's ``get_forward_backward_func()`` runs them on every pipeline layout and Megatron-LM's ``pretrain``
can use them (``stepconv.megatron_lm`` adds the batch reading through ``megatron.training``). The model's forward
(``Step35GPTModel``) returns the per-token loss over the true vocabulary and attaches the MTP loss as megatron
does, so the gradient of one step is the gradient of

    mean_t CE(logits_t, label_t) + mtp_loss_scaling_factor / mtp_num_layers * sum_k mean_t CE(mtp_k_logits_t,
    label_{t+k+1})

with every token counted (loss mask of ones) — what ``tests/test_backward.py`` checks against the HF reference.
No ``megatron.training`` import here: this module runs on released megatron-core alone.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Optional

import torch


def batch_from_tokens(data: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Megatron-LM GPT batch from ``data`` [b, s+1] token ids: ``tokens`` = data[:, :-1], ``labels`` =
    data[:, 1:], ``loss_mask`` of ones, ``position_ids`` 0..s-1 (no attention mask: causal is built in)."""
    data = torch.as_tensor(data, dtype=torch.long)
    if data.dim() != 2 or data.shape[1] < 2:
        raise ValueError(f"data must be [batch, seq+1] token ids, got shape {tuple(data.shape)}")
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
            "position_ids": pos}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's GPT loss function: the masked sum of per-token losses, the token count, and a report
    ``{"lm loss": [sum, count]}`` (the schedule divides by the count and the number of microbatches)."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[dict], model, device: Optional[torch.device] = None):
    """One microbatch: ``next(data_iterator)`` is a ``batch_from_tokens`` dict (every stage reads it: the MTP
    stage needs the token ids too). Returns ``(output, partial(loss_func, loss_mask))``."""
    batch = next(data_iterator)
    if device is None:
        device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    output = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    return output, partial(loss_func, b["loss_mask"])


@contextlib.contextmanager
def cuda_literal_is_cpu():
    """Within the block, ``torch.zeros(..., device="cuda")`` allocates on the CPU when CUDA is unavailable.

    megatron-core 0.16.1's pipeline schedules (``forward_backward_no_pipelining`` and the pipelined ones)
    allocate their token counter with a literal ``device="cuda"``; nothing else in one training step on CPU
    needs CUDA once ``stepconv.mcore.runtime.cpu_patches`` is in effect. Scoped to the step, not process-wide.
    """
    if torch.cuda.is_available():
        yield
        return
    orig = torch.zeros

    def zeros(*args, device=None, **kwargs):
        return orig(*args, device="cpu" if device == "cuda" else device, **kwargs)

    torch.zeros = zeros
    try:
        yield
    finally:
        torch.zeros = orig
