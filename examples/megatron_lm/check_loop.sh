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
$PY - "$WORK/train.log" <<'PYEOF'
import re, sys
losses = [float(m) for m in re.findall(r"\| lm loss: ([0-9.Ee+-]+)", open(sys.argv[1]).read())]
print(f"megatron lm loss: iteration 1 {losses[0]:.8f}, iteration {len(losses)} {losses[-1]:.8f}")
PYEOF
$PY "$HERE/hf_loss.py" "$HF" "$WORK/batch0.pt"
exit $rc
