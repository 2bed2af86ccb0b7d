#!/usr/bin/env bash
# Issue 19's side-by-side on one GPU, in one call: the Hugging Face peer as its users build it
# (`python -m bench compare --variants peer_compiled`) and our user command
# (`python -m train experiment=gpu_<model>`) in bf16 and fp8, one model after the other.
# The user-command runs double as the numerics runs (same seed, same data, STEPS steps; their
# metrics.jsonl are the loss curves; `python -m bench curves` compares and plots them).
# Run from the repository root; wheels the image lacks (hydra-core, omegaconf, antlr4, torchao)
# may be supplied in .whl/. Everything lands in /tmp/sbs and is packed into $OUT/sbs.tgz after
# every stage (a time limit loses at most the stage it cut).
set -uo pipefail
source bench/gpu_env.sh  # wheels, PYTHONPATH, $OUT, prec_args
R=/tmp/sbs; mkdir -p $R
STEPS=${STEPS:-150}; SPECS=${SPECS:-"dsv3_mini:16 llama_1b:8"}; PRECS=${PRECS:-"bf16 fp8"}
# PROFILES="dsv3_mini:16:bf16 dsv3_mini:16:fp8 dsv3_mini:16:fp8dense": `python -m bench train --profile-top 40`
# first (component figures: where the step's device time goes; they also warm the compile cache).
PROFILES=${PROFILES:-}; SKIP_PEER=${SKIP_PEER:-0}
# PRECS entries are NAME or NAME:STEPS (a shorter speed-only run). TRAIN_EXTRA: more overrides for every
# user-command run (e.g. "optim.warmup_steps=60 trainer.seed=7"); TAG: a suffix for their run names and files.
PEER_VARIANTS=${PEER_VARIANTS:-peer_compiled}
# PEER_STEPS: the peer's timed steps (default 5, as every figure so far; its per-step range was up to 6%
# on one call, so 20 narrows the median for ~5 s more)
pack() { tar czf "$OUT/sbs.tgz" -C $R . ; }
for p in $PROFILES; do
  IFS=: read -r m b prec <<< "$p"
  case $prec in bf16) fa="";; fp8) fa="--fp8 tensorwise";; fp8dense) fa="--fp8 tensorwise --fp8-experts off";; esac
  echo "=== profile $m b$b $prec $(date +%T)"
  timeout ${PROFILE_TIMEOUT:-200} python3 -m bench train --model $m --batch $b --compile --steps 6 --warmup 3 \
    --profile-top 40 $fa --tag _$prec --out $R > $R/profile_${m}_$prec.txt 2>&1; echo "profile $m $prec rc=$?"
  grep -E "step_s_median|^ +[0-9.]+%" $R/profile_${m}_$prec.txt | cut -c1-200 | head -14; pack
done
python3 -c "import torch, transformers, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())" 2>&1 | grep -v "Failed to load" | tee $R/versions.txt
for spec in $SPECS; do
  m=${spec%%:*}; b=${spec##*:}
  if [ "$SKIP_PEER" != 1 ]; then
  echo "=== peer $m b$b $(date +%T)"
  timeout ${PEER_TIMEOUT:-240} python3 -m bench compare --model $m --batch $b --variants $PEER_VARIANTS \
    --steps ${PEER_STEPS:-5} --warmup 2 ${PEER_ARGS:-} --out $R > $R/peer_$m.txt 2>&1; echo "peer $m rc=$?"
  grep -E "^\| peer|^peer:" $R/peer_$m.txt | cut -c1-600; pack
  fi
  for entry in $PRECS; do
    prec=${entry%%:*}; steps=$STEPS; [ "$entry" != "$prec" ] && steps=${entry##*:}
    echo "=== train $m $prec $steps steps $(date +%T)"
    timeout ${TRAIN_TIMEOUT:-240} python3 -m train experiment=gpu_$m $(prec_args $prec) trainer.max_steps=$steps \
      ${TRAIN_EXTRA:-} output_dir=/tmp/mf_runs run_name=${m}_$prec${TAG:-} health.preflight=off checkpoint.save_final=false \
      > $R/train_${m}_$prec${TAG:-}.txt 2>&1; echo "train $m $prec${TAG:-} rc=$?"
    cp /tmp/mf_runs/${m}_$prec${TAG:-}/metrics.jsonl $R/metrics_${m}_$prec${TAG:-}.jsonl 2>/dev/null
    grep -E "^fp8|rror|^step=(10|50|100|150|200|300) " $R/train_${m}_$prec${TAG:-}.txt | cut -c1-300 | tail -8; pack
  done
  peer_json=$(ls $R/compare_${m}_s*.json 2>/dev/null | head -1); runs=""
  for entry in $PRECS; do f=$R/metrics_${m}_${entry%%:*}${TAG:-}.jsonl; [ -f "$f" ] && runs="$runs --run ${entry%%:*}=$f"; done
  # the table PERFORMANCE.md reports: medians from step 15 on, each beside this call's peer
  [ "$SKIP_PEER" != 1 ] && [ -n "$peer_json" ] && [ -n "$runs" ] && python3 -m bench table --peer "$peer_json" $runs \
    --out $R --name table_${m}${TAG:-} 2>&1 | tee $R/table_${m}${TAG:-}.md; pack
done
echo "=== end $(date +%T)"
