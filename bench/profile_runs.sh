#!/usr/bin/env bash
# The user command with its own profiler (trainer.profile_start/profile_steps), one run per
# precision, one model: where the loop's device time goes and how busy the GPU is, as users run it.
# RUNS="bf16 fp8 fp8dense" MODEL=dsv3_mini STEPS=30 PROFILE_START=20 bash bench/profile_runs.sh
# Wheels the image lacks may be supplied in .whl/; results land in $OUT/prof.tgz.
set -uo pipefail
source bench/gpu_env.sh  # wheels, PYTHONPATH, $OUT, prec_args
R=/tmp/prof; mkdir -p $R
MODEL=${MODEL:-dsv3_mini}; RUNS=${RUNS:-"bf16 fp8"}; STEPS=${STEPS:-30}; PROFILE_START=${PROFILE_START:-20}
for prec in $RUNS; do
  echo "=== $MODEL $prec $(date +%T)"
  timeout ${TRAIN_TIMEOUT:-240} python3 -m train experiment=gpu_$MODEL $(prec_args $prec) trainer.max_steps=$STEPS \
    trainer.profile_start=$PROFILE_START trainer.profile_steps=3 ${EXTRA:-} output_dir=/tmp/mf_prof \
    run_name=${MODEL}_$prec health.preflight=off checkpoint.save_final=false > $R/train_${MODEL}_$prec.txt 2>&1
  echo "rc=$?"
  mkdir -p $R/$prec; cp /tmp/mf_prof/${MODEL}_$prec/profile/top_ops_rank0.txt /tmp/mf_prof/${MODEL}_$prec/metrics.jsonl $R/$prec/ 2>/dev/null
  grep -E "^fp8|rror|^step=" $R/train_${MODEL}_$prec.txt | cut -c1-200 | tail -4
  head -24 $R/$prec/top_ops_rank0.txt 2>/dev/null | cut -c1-150
  tar czf "$OUT/prof.tgz" -C $R .
done
