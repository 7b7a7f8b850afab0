"""The HF reference's LM loss on a batch Megatron-LM trained on (recorded with STEPCONV_RECORD_BATCH=path):
compare it with the "lm loss" Megatron-LM logs at iteration 1 (the loss before the first update).

    python hf_loss.py HF_DIR batch.pt        # prints: hf lm loss <value> over <n> tokens

The reference is transformers' own Step-3.5 text model (stepconv.hf_reference), fp32 on CPU; the loss is the
mean cross entropy over the loss mask's tokens, over the true vocabulary, as Megatron-LM's "lm loss".
"""

import sys

import torch
import torch.nn.functional as F

from stepconv.hf_reference import load_hf_reference


def main(hf_dir: str, batch_path: str) -> None:
    batch = torch.load(batch_path, weights_only=True)
    ref = load_hf_reference(hf_dir, dtype=torch.float32)
    logits = ref(batch["tokens"])["logits"].float()
    mask = batch["loss_mask"].float().flatten()
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    loss = float((ce * mask).sum() / mask.sum())
    print(f"hf lm loss {loss:.8f} over {int(mask.sum())} tokens")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: hf_loss.py HF_DIR BATCH_PT")
    main(sys.argv[1], sys.argv[2])
