#!/usr/bin/env bash
# One short GPU lease, used twice: the GPU suite (bench/gpu_suite.sh: build, cuda tests, benchmarks) runs
# while the zoo trains beside it, and the benchmarks wait for the training (BENCH_WAIT_FILE) so their
# timings are taken alone. Training: two lineages in parallel (a small ViT leaves an H100 mostly idle):
#   A: teacher from scratch (EA epochs) -> distill (S1 + S2 epochs: the zoo recipe, scripts/train_zoo.sh)
#      -> prune (PH + PF epochs) -> distill it (P1 + P2); and from the same student: prune to the xs budget -> distill it (XS1 + XS2)
#   C: the bundled teacher continued (EC epochs) -> distill -> prune -> distill -> xs -> distill
# Checkpoints land in $OUT (the device tool's folder) as each step ends, logs in $OUT/logs.tgz; training
# is stopped at TRAIN_DEADLINE seconds. Data: FAR_FASHION_MNIST, default .data/fashion-mnist, which the
# device has not: here, `mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >>.git/info/exclude`
# once, then carry .data in the call.
#   bash scripts/gpu_zoo_session.sh                              # on the device (~10 min)
#   R=/tmp/zt NO_SUITE=1 LIMIT=300 AMP=bf16 EA=1 EC=1 S1=1 S2=1 PH=1 PF=1 P1=1 P2=1 XS1=1 XS2=1 bash scripts/gpu_zoo_session.sh  # CPU check
set -u
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
R=${R:-/tmp/zoo}; mkdir -p "$R"; OUTD=${OUT:-$R/out}; mkdir -p "$OUTD"
export FAR_FASHION_MNIST=${FAR_FASHION_MNIST:-$PWD/.data/fashion-mnist} PYTHONUNBUFFERED=1
TRAIN_DEADLINE=${TRAIN_DEADLINE:-400}
L="${LIMIT:+--limit $LIMIT --eval-limit $LIMIT} ${AMP:+--amp $AMP}"
EA=${EA:-60}; EC=${EC:-24}; S1=${S1:-8}; S2=${S2:-4}; PH=${PH:-1}; PF=${PF:-2}; P1=${P1:-4}; P2=${P2:-3}; XS1=${XS1:-4}; XS2=${XS2:-10}
far() { FAR_BACKEND=torch PYTHONPATH=$PWD/python:$PWD python3 -m far.cli "$@" --data fashion-mnist --seed 0 --threads 2 -q --ckpt-every 2000 $L; }
stage() { local name=$1; shift; echo "[$(el)s] start $name" >>"$R/stages.log"; "$@" >"$R/$name.log" 2>&1; local rc=$?
          echo "[$(el)s] end $name rc=$rc" >>"$R/stages.log"; [ $rc = 0 ] && cp "$R/$name.safetensors" "$OUTD/" 2>/dev/null; return $rc; }
lineage() {
  local x=$1
  if [ "$x" = A ]; then
    stage teacher_A far train-teacher fmnist_deit_tiny --epochs "$EA" --batch-size 256 --lr 1.5e-3 --warmup-epochs 3 \
      --out-dir "$R/run_teacher_A" -o "$R/teacher_A.safetensors" || return
  else
    stage teacher_C far finetune python/far/zoo/fmnist_deit_tiny.safetensors --epochs "$EC" --lr 5e-4 --warmup-epochs 0.5 \
      --batch-size 128 --out-dir "$R/run_teacher_C" -o "$R/teacher_C.safetensors" || return
  fi
  stage far_$x far distill "$R/teacher_$x.safetensors" --epochs "$S1" --lr 1e-2 --warmup-epochs 0.1 --stage2-epochs "$S2" \
    --stage2-lr 2e-4 --ema 0.999 --batch-size 64 --out-dir "$R/run_far_$x" -o "$R/far_$x.safetensors" || return
  stage prunedft_$x far prune "$R/far_$x.safetensors" --hoyer 5e-4 --epochs "$PH" --lr 3e-4 --warmup-epochs 0.1 --prune-ratio 0.3 \
    --finetune-epochs "$PF" --finetune-lr 3e-4 --batch-size 128 --out-dir "$R/run_prunedft_$x" -o "$R/prunedft_$x.safetensors" || return
  stage pruned_$x far distill "$R/teacher_$x.safetensors" --student "$R/prunedft_$x.safetensors" --epochs "$P1" --lr 1e-2 \
    --warmup-epochs 0.1 --stage2-epochs "$P2" --stage2-lr 2e-4 --ema 0.999 --batch-size 64 --out-dir "$R/run_pruned_$x" \
    -o "$R/pruned_$x.safetensors" || return
  # the extra-small student (zoo fmnist_far_tiny_xs): token mixers <= 0.78x the teacher attention's parameters, no
  # (head, direction) with 1-3 units, distilled again in one run (scripts/train_zoo.sh step 3b)
  stage xsft_$x far prune "$R/far_$x.safetensors" --hoyer 5e-4 --epochs "$PH" --lr 3e-4 --warmup-epochs 0.05 \
    --budget mixer-params=116213 --balance --min-units 4 --rounds 3 --finetune-epochs "$PF" --finetune-lr 3e-4 --batch-size 128 \
    --out-dir "$R/run_xsft_$x" -o "$R/xsft_$x.safetensors" || return
  stage xs_$x far distill "$R/teacher_$x.safetensors" --student "$R/xsft_$x.safetensors" --epochs "$XS1" --lr 1e-2 \
    --warmup-epochs 0.1 --stage2-epochs "$XS2" --stage2-lr 2e-4 --ema 0.999 --batch-size 64 --out-dir "$R/run_xs_$x" \
    -o "$R/xs_$x.safetensors"
}
( lineage A ) & pa=$!
( lineage C ) & pc=$!
( while kill -0 $pa 2>/dev/null || kill -0 $pc 2>/dev/null; do
    if [ "$(el)" -ge "$TRAIN_DEADLINE" ]; then echo "[$(el)s] deadline: killing training" >>"$R/stages.log"; pkill -f "far.cli" ; break; fi
    sleep 2; done; wait; touch "$R/DONE" ) &
pw=$!
if [ "${NO_SUITE:-0}" = 1 ]; then wait $pw; touch "$R/DONE"
else OUT=$R/suite_out SUITE_BUDGET=${SUITE_BUDGET:-540} BENCH_WAIT_FILE=$R/DONE BENCH_WAIT_MAX=${BENCH_WAIT_MAX:-200} QUICK=${QUICK:-1} BILSTM_TIMEOUT=${BILSTM_TIMEOUT:-60} \
   CUDA_SCAN_TIMEOUT=${CUDA_SCAN_TIMEOUT:-40} XBAR_TIMEOUT=${XBAR_TIMEOUT:-40} TESTS_TIMEOUT=${TESTS_TIMEOUT:-250} bash bench/gpu_suite.sh; fi
wait $pa $pc 2>/dev/null
echo "[$(el)s] all done" >>"$R/stages.log"
cp "$R"/suite_out/gpu_suite-*.json "$OUTD/" 2>/dev/null
tar -czf "$OUTD/logs.tgz" -C "$R" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.json.tmp' . 2>/dev/null
cat "$R/stages.log"
python3 - "$R" <<'PY'
import json, sys, pathlib
for m in sorted(pathlib.Path(sys.argv[1]).glob("run_*/**/metrics.jsonl")):
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
    acc = [round(100 * r["accuracy"], 2) for r in rows if r.get("kind") == "epoch" and r.get("accuracy") is not None]
    print(m.parent, acc)
PY
