"""What verify's two HF references (``hf_reference.StreamedReference``, in-tree; ``remote_reference.RemoteReference``,
the checkpoint's own modeling file) share: what one layer did (``LayerTrace``) and Step-3.5's MTP wiring around a
decoder block (``mtp_step``). No transformers import: the remote reference also runs on transformers 4.x."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["LayerTrace", "mtp_step"]


@dataclass
class LayerTrace:
    """What one HF decoder layer did to its input (all [B, S, H] unless noted; on the reference's device).

    ``mid``: the residual stream after attention (the MLP's input); ``out``: the layer output. MoE layers also:
    ``x`` the MLP's normalised input, ``idx``/``weights`` [B*S, top_k] the router's selection and its normalised
    weights, ``slots`` [top_k, B*S, H] the selected experts' own outputs (selection j of every token, weight 1).
    """

    out: torch.Tensor
    mid: torch.Tensor
    x: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    slots: torch.Tensor | None = None


def mtp_step(layer: nn.Module, embeddings: torch.Tensor, h: torch.Tensor, k: int,
             block: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP layer k: ``eh_proj(cat[enorm(embedding of token t+k+1), hnorm(h_t)])`` through `block` (z and the number
    of positions n -> block output), then its own ``transformer.shared_head`` (norm, output). `h` is the last main
    layer's output for k = 0, else MTP layer k-1's block output; its first S-k-1 positions are read. Returns the
    block output [B, S-k-1, H] and the logits (fp32)."""
    n = embeddings.shape[1] - k - 1  # positions t whose token t+k+1 exists
    e = layer.enorm(embeddings[:, k + 1:])
    z = layer.eh_proj(torch.cat([e, layer.hnorm(h[:, :n])], dim=-1))  # embedding first, hidden second
    z = block(z, n)
    head = layer.transformer.shared_head
    return z, head.output(head.norm(z)).float()
