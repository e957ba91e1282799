#!/usr/bin/env bash
# Trains the bundled model zoo (python/far/zoo/) with the far training commands, exactly as recorded in
# the README's recipe. On a 2-core CPU it takes hours (the README gives each step's time); on a GPU, minutes
# (drop NPROC/--threads, or see scripts/gpu_zoo_session.sh).
#   bash scripts/train_zoo.sh [RUN_DIR]        # default far-runs/zoo; copies the results into python/far/zoo
# Every step is resumable: rerun a killed step with --resume appended (same RUN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-far-runs/zoo}
mkdir -p "$run"
NPROC=${NPROC:-2}  # DDP processes (gloo on CPU, NCCL on GPU); --batch-size is per process (global 128)
ddp=(python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m far.cli)

# 1. attention teacher: DeiT-style ViT, 28x28x1, patch 4 (49 tokens + CLS), embed 96, depth 4, 3 heads
python -m far.cli train-teacher fmnist_deit_tiny --data fashion-mnist --epochs 10 --batch-size 128 --lr 1e-3 \
    --seed 0 --threads 2 --out-dir "$run/teacher" -o "$run/fmnist_deit_tiny_e10.safetensors" --force
# ... continued for 12 more epochs (a second warm-up + cosine cycle)
"${ddp[@]}" finetune "$run/fmnist_deit_tiny_e10.safetensors" --data fashion-mnist --epochs 12 --lr 5e-4 \
    --warmup-epochs 0.5 --batch-size $((128 / NPROC)) --threads 1 --seed 0 \
    --out-dir "$run/teacher2" -o "$run/fmnist_deit_tiny_e22.safetensors" --force
# ... and for 36 more (a third cycle, EMA of the weights, another data order) = the zoo's fmnist_deit_tiny
"${ddp[@]}" finetune "$run/fmnist_deit_tiny_e22.safetensors" --data fashion-mnist --epochs 36 --lr 5e-4 \
    --warmup-epochs 0.5 --ema 0.999 --batch-size $((128 / NPROC)) --threads 1 --seed 1 \
    --out-dir "$run/teacher3" -o "$run/fmnist_deit_tiny.safetensors" --force

# 2. FAR student, one run from the final teacher: stage 1 trains every FAR block alone on the teacher's own
#    block inputs (cos+mse), stage 2 fine-tunes everything with CE + logit distillation + the block losses
#    (far distill's defaults), with an EMA of the weights. One process: the isolated stage keeps one block's
#    activations per step.
python -m far.cli distill "$run/fmnist_deit_tiny.safetensors" --data fashion-mnist --epochs 8 --lr 1e-2 \
    --batch-size 64 --warmup-epochs 0.1 --stage2-epochs 4 --stage2-lr 2e-4 --ema 0.999 --threads 2 --seed 0 \
    --out-dir "$run/distill" -o "$run/fmnist_far_tiny.safetensors" --force

# 2b. the same with block 2 widened to 56 units per head and direction (n = d = 32 elsewhere): at n = d block 2 levels
#     off near isolated cosine 0.94 (README "Longer, or wider?"); this one has every block >= 0.95
python -m far.cli distill "$run/fmnist_deit_tiny.safetensors" --data fashion-mnist --hidden-size 32,32,56,32 \
    --epochs 8 --lr 1e-2 --batch-size 64 --warmup-epochs 0.1 --stage2-epochs 4 --stage2-lr 2e-4 --ema 0.999 \
    --threads 2 --seed 0 --out-dir "$run/distill_wide" -o "$run/fmnist_far_tiny_wide.safetensors" --force

# 2c. the noise-robust FAR student: fmnist_far_tiny distilled 3 more epochs (stage 2 only) with Gaussian noise on
#     every weight matrix during each step's forward and backward (std 0.06 x each row's largest |w|): it loses far
#     less top-1 under crossbar read noise (README "IMC emulation") for 0.8 points of digital top-1
python -m far.cli distill "$run/fmnist_deit_tiny.safetensors" --student "$run/fmnist_far_tiny.safetensors" \
    --data fashion-mnist --epochs 0 --stage2-epochs 3 --stage2-lr 1e-4 --batch-size 64 --weight-noise 0.06 \
    --weight-noise-on '*weight,w_ih,w_hh' --threads 1 --seed 0 --out-dir "$run/distill_nr" \
    -o "$run/fmnist_far_tiny_nr.safetensors" --force

# 3. pruned FAR student: Hoyer-square, one global threshold (30% of the unit groups), masked fine-tune, compaction;
#    then the pruned blocks distilled again from the teacher (isolated stage 1 + stage 2, as in step 2)
python -m far.cli prune "$run/fmnist_far_tiny.safetensors" --data fashion-mnist --hoyer 5e-4 --epochs 1 --lr 3e-4 \
    --warmup-epochs 0.1 --prune-ratio 0.3 --finetune-epochs 1 --finetune-lr 3e-4 --batch-size 128 \
    --threads 2 --seed 0 --out-dir "$run/prune" -o "$run/fmnist_far_tiny_pruned_ft.safetensors" --force
python -m far.cli distill "$run/fmnist_deit_tiny.safetensors" --student "$run/fmnist_far_tiny_pruned_ft.safetensors" \
    --data fashion-mnist --epochs 4 --lr 1e-2 --batch-size 64 --warmup-epochs 0.1 --stage2-epochs 3 \
    --stage2-lr 2e-4 --ema 0.999 --threads 2 --seed 0 --out-dir "$run/distill_pruned" \
    -o "$run/fmnist_far_tiny_pruned.safetensors" --force

# 3b. the extra-small FAR student: pruned to a budget — token mixers at most 0.78x the teacher attention's 148,992
#     parameters (116,213), in 3 rounds of Hoyer training + pruning + masked fine-tune (budgets shrinking
#     geometrically; --balance ranks units within their block, so no block is emptied; --min-units 4 leaves no
#     (head, direction) with 1-3 units, whose few-row products a full-range ADC resolves badly), then distilled
#     again in one run with a longer stage 2
python -m far.cli prune "$run/fmnist_far_tiny.safetensors" --data fashion-mnist --hoyer 5e-4 --epochs 0.5 --lr 3e-4 \
    --warmup-epochs 0.05 --budget mixer-params=116213 --balance --min-units 4 --rounds 3 --finetune-epochs 0.5 \
    --finetune-lr 3e-4 --batch-size 128 --threads 2 --seed 0 --out-dir "$run/prune_xs" \
    -o "$run/fmnist_far_tiny_xs_ft.safetensors" --force
python -m far.cli distill "$run/fmnist_deit_tiny.safetensors" --student "$run/fmnist_far_tiny_xs_ft.safetensors" \
    --data fashion-mnist --epochs 4 --lr 1e-2 --batch-size 64 --warmup-epochs 0.1 --stage2-epochs 10 \
    --stage2-lr 2e-4 --ema 0.999 --threads 2 --seed 0 --out-dir "$run/distill_xs" \
    -o "$run/fmnist_far_tiny_xs.safetensors" --force

# 4. TReX-style attention reuse (the rival method): the cost model picks the reusing encoders for an 850 us
#    latency budget (one encoder reuses its predecessor's attention), then transformation block + fine-tune
python -m far.cli reuse "$run/fmnist_deit_tiny.safetensors" --data fashion-mnist --latency-budget 850 --epochs 2 \
    --stage2-epochs 20 --stage2-lr 2e-4 --ema 0.999 --threads 1 --seed 0 --out-dir "$run/reuse" \
    -o "$run/fmnist_trex_tiny.safetensors" --force

cp "$run"/fmnist_deit_tiny.safetensors "$run"/fmnist_far_tiny.safetensors "$run"/fmnist_far_tiny_pruned.safetensors \
    "$run"/fmnist_far_tiny_xs.safetensors "$run"/fmnist_far_tiny_wide.safetensors "$run"/fmnist_far_tiny_nr.safetensors \
    "$run"/fmnist_trex_tiny.safetensors \
    python/far/zoo/
# far.models.ZOO pins each zoo file's sha256 (zoo_path refuses any other file): paste the new pins into
# python/far/models/pretrained.py before the zoo names (and the demo) load the new files
python -c 'import json; from far.checkpoint import DIGEST_KEY, read_config; from far.models import ZOO, pretrained
for n, e in ZOO.items():
    print("   ", json.dumps(n) + ":", json.dumps(read_config(pretrained.ZOO_DIR / e["file"])[DIGEST_KEY]) + ",")'
echo "re-pin them, then: python -m far.cli demo --out-dir $run/demo"
