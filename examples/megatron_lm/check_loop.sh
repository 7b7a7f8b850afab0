#!/usr/bin/env bash
# finetune.sh on a checkpoint, then the figures docs/TRAINING.md reports: Megatron-LM's lm loss at iteration 1
# against the HF reference's loss on the same (recorded) batch, the loss after the last iteration, and verify.
# Same environment as finetune.sh (HF, MEGATRON_LM, WORK, ...).
set -euo pipefail
: "${HF:?set HF}" "${WORK:?set WORK}"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
mkdir -p "$WORK"
export STEPCONV_RECORD_BATCH="$WORK/batch0.pt"
rc=0
"$HERE/finetune.sh" 2>&1 | tee "$WORK/loop.log" || rc=$?
HF_LOSS=$($PY "$HERE/hf_loss.py" "$HF" "$WORK/batch0.pt" | awk '{print $4}')
# Tolerance 1e-5 relative: both sides fp32, differing in reduction order only; Megatron-LM logs 7 digits.
$PY - "$WORK/train.log" "$HF_LOSS" <<'PYEOF' || rc=1
import re, sys
losses = [float(m) for m in re.findall(r"\| lm loss: ([0-9.Ee+-]+)", open(sys.argv[1]).read())]
hf = float(sys.argv[2])
print(f"megatron lm loss: iteration 1 {losses[0]:.8f}, iteration {len(losses)} {losses[-1]:.8f}")
print(f"hf reference loss on the iteration-1 batch {hf:.8f} (rel diff {abs(losses[0] - hf) / hf:.1e})")
sys.exit(0 if abs(losses[0] - hf) <= 1e-5 * hf and losses[-1] < losses[0] else 1)
PYEOF
exit $rc
