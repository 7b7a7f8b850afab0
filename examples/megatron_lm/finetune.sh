#!/usr/bin/env bash
# The whole loop on stepconv's Step-3.5 model:
#   stepconv hf-to-mcore -> Megatron-LM fine-tuning (--load ... --finetune) -> save -> stepconv mcore-to-hf
#   -> stepconv verify (the exported HF checkpoint against the trained Megatron one).
#
# Environment (the first three are required):
#   HF           Step-3.5 HF checkpoint folder
#   MEGATRON_LM  Megatron-LM source root (has pretrain_gpt.py and megatron/training)
#   WORK         output folder (mcore/, trained/, hf-trained/, logs)
#   NPROC=2  TP=$NPROC  PP=1  EP=1  FORMAT=torch (or torch_dist)  DTYPE=fp32 (or bf16)
#   ITERS=20  SEQ=64  MBS=4  GBS=4  LR=1e-3  DATA="--mock-data" (or "--data-path PREFIX")
#   PORT=29500   torchrun's master port (two runs at once on one machine need two ports)
#   VOCAB_ARG    --vocab-size for NullTokenizer [default: the config's vocab_size (Megatron-LM dev);
#                core_v0.16's NullTokenizer adds an end-of-document token: pass vocab_size - 1 there]
#   EXTRA        more Megatron-LM flags
# STEPCONV_RECORD_BATCH=path records the first microbatch (see hf_loss.py beside this file).
set -euo pipefail
: "${HF:?set HF}" "${MEGATRON_LM:?set MEGATRON_LM}" "${WORK:?set WORK}"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
NPROC=${NPROC:-2}; TP=${TP:-$NPROC}; PP=${PP:-1}; EP=${EP:-1}; FORMAT=${FORMAT:-torch}; DTYPE=${DTYPE:-fp32}
ITERS=${ITERS:-20}; SEQ=${SEQ:-64}; MBS=${MBS:-4}; GBS=${GBS:-4}; LR=${LR:-1e-3}; DATA=${DATA:---mock-data}
VOCAB=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$HF/config.json")
VOCAB_ARG=${VOCAB_ARG:-$VOCAB}
mkdir -p "$WORK"

$PY -m stepconv.cli hf-to-mcore "$HF" -o "$WORK/mcore" --tp "$TP" --pp "$PP" --ep "$EP" --spec local \
    --format "$FORMAT" --dtype "$DTYPE" --overwrite

PREC=(); [ "$DTYPE" = bf16 ] && PREC=(--bf16)
SP=(); [ "$TP" -gt 1 ] && SP=(--sequence-parallel)   # megatron's MoE layer trains at TP > 1 only with it
# Megatron-LM's argument validation refuses TP > 1 without it (its own example scripts export it)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
cd "$MEGATRON_LM"
$PY -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "${PORT:-29500}" "$HERE/pretrain_step35.py" \
    --use-checkpoint-args --load "$WORK/mcore" --finetune --no-load-optim --no-load-rng \
    --ckpt-format "$FORMAT" --save "$WORK/trained" --save-interval "$ITERS" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP" \
    "${SP[@]}" "${PREC[@]}" --transformer-impl local --moe-token-dispatcher-type allgather \
    --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-swiglu-fusion --no-rope-fusion \
    --no-persist-layer-norm --attention-dropout 0 --hidden-dropout 0 \
    --train-iters "$ITERS" --eval-iters 0 --eval-interval 1000000 --log-interval 1 \
    --micro-batch-size "$MBS" --global-batch-size "$GBS" --seq-length "$SEQ" \
    --lr "$LR" --lr-decay-style constant --weight-decay 0 --clip-grad 1.0 \
    $DATA --tokenizer-type NullTokenizer --vocab-size "$VOCAB_ARG" --split 100,0,0 \
    --mtp-loss-scaling-factor 0.1 ${EXTRA:-} 2>&1 | tee "$WORK/train.log"
cd - >/dev/null

# the trained weights in the dtype they were trained in (fp32 rounded to the config's bf16 fails verify's fp32 gate)
$PY -m stepconv.cli mcore-to-hf "$WORK/trained" -o "$WORK/hf-trained" --dtype "$DTYPE" --overwrite
$PY -m stepconv.cli verify "$WORK/hf-trained" "$WORK/trained" --dtype fp32 --json "$WORK/verify.json"
