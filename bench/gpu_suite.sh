#!/usr/bin/env bash
# The GPU session script behind docs/PERFORMANCE.md: run from the repository root on a GPU machine;
# results land under $OUT (default ./bench_out). Pure-Python wheels the image lacks (hydra-core,
# omegaconf, antlr4) may be supplied in .whl/. STAGES picks what runs; each stage is time-boxed.
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
MOE=${MOE:-dsv3_mini}; DRILL_EXP=${DRILL_EXP:-gpu_dsv3_mini}; DENSE=${DENSE:-llama_1b}; SEQ=${SEQ:-2048}; NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
TRAIN_STEPS=${TRAIN_STEPS:-20}; TR=${TR:-"torchrun --nproc-per-node $NGPU --local-addr 127.0.0.1 --master-addr 127.0.0.1 --master-port 29611"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
STAGES=${STAGES:-"smoke ep train ckpt health"}
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    smoke) timeout 300 python3 -m bench smoke --compile --out "$OUT" 2>&1 | tail -12;;
    ep)  # one GPU vs two: FSDP2 only, and FSDP2 + EP=2; bf16, same per-GPU batch
      timeout 150 env CUDA_VISIBLE_DEVICES=0 python3 -m bench train --model $MOE --seq $SEQ --out "$OUT" 2>&1 | grep "^{" 
      if [ "$NGPU" -ge 2 ]; then
        timeout 150 $TR -m bench train --model $MOE --seq $SEQ --ep 1 --out "$OUT" 2>&1 | grep "^{"
        timeout 150 $TR -m bench train --model $MOE --seq $SEQ --ep $NGPU --out "$OUT" 2>&1 | grep "^{"
      fi;;
    train)  # the user command on one GPU: bf16, MFU on the metric line
      for exp in ${TRAIN_EXPS:-gpu_llama_1b gpu_dsv3_mini}; do
        timeout 200 env CUDA_VISIBLE_DEVICES=0 python3 -m train experiment=$exp trainer.max_steps=$TRAIN_STEPS \
          output_dir=/tmp/mf_runs health.preflight=off > "$OUT/train_$exp.txt" 2>&1
        echo "$exp rc=$?"; grep -E "^step=|device|rror" "$OUT/train_$exp.txt" | tail -4
      done;;
    attn) timeout 330 python3 -m bench attn --reps ${ATTN_REPS:-10} ${ATTN_ARGS:-} --out "$OUT" > "$OUT/attn.txt" 2>&1; echo "attn rc=$?"
          grep "^|" "$OUT/attn.txt";;
    profile)  # where one GPU's step time goes: top device ops of 3 profiled steps
      for spec in ${PROFILE_SPECS:-"$MOE:4:--compile" "$DENSE:4:--compile"}; do
        IFS=: read -r m b flag <<< "$spec"
        timeout 150 env CUDA_VISIBLE_DEVICES=0 python3 -m bench train --model $m --seq $SEQ --batch $b $flag \
          --profile-top 25 --tag "_b$b" --out "${PROFILE_JSON_OUT:-$OUT}" > "$OUT/profile_${m}_b$b.txt" 2>&1; echo "$m b$b rc=$?"
        grep -A25 "^{" "$OUT/profile_${m}_b$b.txt" | cut -c1-400
      done;;
    ckpt) timeout 300 env CUDA_VISIBLE_DEVICES=0 python3 -m bench ckpt --model $MOE --modes process:device,thread:device \
            --saves ${CKPT_SAVES:-2} --every ${CKPT_EVERY:-50} --out "$OUT" 2>&1 | tail -6;;
    drill)  # the user command: saves 150 steps apart, a spot notice when none is writing (docs/PERFORMANCE.md)
      df -h /tmp /dev/shm | tee "$OUT/disk.txt"; rm -rf /tmp/mf_drill
      timeout ${DRILL_TIMEOUT:-540} env CUDA_VISIBLE_DEVICES=0 python3 -m bench ckpt_drill --notice-at ${NOTICE_AT:-430} \
        --out "$OUT" -- experiment=$DRILL_EXP trainer.max_steps=3000 trainer.log_every=1 checkpoint.every_steps=${DRILL_EVERY:-150} \
        checkpoint.keep_last=1 checkpoint.async_mode=${DRILL_MODE:-process} checkpoint.staging=device \
        checkpoint.write_bandwidth_gbps=1.3 output_dir=/tmp/mf_drill health.preflight=off > "$OUT/drill.txt" 2>&1
      echo "drill rc=$?"; grep -E "^step=[0-9]*00 |ckpt_stall|emergency|checkpoint due|host buffers|committed in|goodput" "$OUT/drill.txt" | cut -c1-400 | tail -30;;
    health)
      timeout 360 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -4  # ~4 min on an H100 (compiles)
      timeout 90 python3 -m health preflight --expected-gpus $NGPU 2>&1 | tail -14 | tee "$OUT/preflight.txt";;
  esac
done
echo "=== end $(date +%T)"
