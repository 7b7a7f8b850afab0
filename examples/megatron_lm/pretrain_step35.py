"""Megatron-LM's training loop on stepconv's Step-3.5 model: run from the Megatron-LM source root, e.g.

    cd Megatron-LM && torchrun --nproc-per-node 2 /path/to/stepconv/examples/megatron_lm/pretrain_step35.py \
        --use-checkpoint-args --load CKPT --finetune --ckpt-format torch ...   (see finetune.sh beside this file)

Everything Step-3.5-specific is in stepconv.megatron_lm (model_provider, forward_step, main).
"""

import os
import sys

sys.path.insert(0, os.getcwd())  # pretrain_gpt.py and megatron/ of the Megatron-LM source root

from stepconv.megatron_lm import main  # noqa: E402

if __name__ == "__main__":
    main()
