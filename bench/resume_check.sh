#!/usr/bin/env bash
# Resume on the GPU through the user command: MODEL trained STEPS steps straight, and the same run
# stopped at SPLIT (its checkpoint) and resumed to STEPS; prints the largest relative loss difference
# over the resumed steps. Constant LR after warmup, so the split run's schedule is the straight one's.
# EXTRA: more overrides for all three runs (e.g. optim.master_weights=true). Run from the repo root.
set -uo pipefail
source bench/gpu_env.sh
MODEL=${MODEL:-llama_1b}; STEPS=${STEPS:-60}; SPLIT=${SPLIT:-40}; EXTRA=${EXTRA:-}
R=/tmp/resume_check; rm -rf $R; mkdir -p $R
common="experiment=gpu_$MODEL optim.schedule=constant trainer.log_every=1 health.preflight=off checkpoint.save_final=true $EXTRA"
python3 -m train $common trainer.max_steps=$STEPS output_dir=$R/a run_name=r > $R/straight.txt 2>&1; echo "straight rc=$?"
python3 -m train $common trainer.max_steps=$SPLIT output_dir=$R/b run_name=r > $R/first.txt 2>&1; echo "first rc=$?"
python3 -m train $common trainer.max_steps=$STEPS output_dir=$R/b run_name=r > $R/resumed.txt 2>&1; echo "resumed rc=$?"
grep -h -E "resumed from|master_weights" $R/*.txt | sort | uniq -c | cut -c1-200
python3 - "$R" "$SPLIT" "$STEPS" <<'PY'
import json, sys
R, split, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def losses(p):
    out = {}
    for line in open(p):
        r = json.loads(line)
        if "loss" in r and "step" in r:
            out[r["step"]] = r["loss"]
    return out
a, b = losses(f"{R}/a/r/metrics.jsonl"), losses(f"{R}/b/r/metrics.jsonl")
rel = {s: (b[s] - a[s]) / a[s] for s in range(split + 1, steps + 1) if s in a and s in b}
print(f"resumed steps compared: {len(rel)}; max |rel diff| {max(abs(v) for v in rel.values()):.4%}; "
      f"mean rel diff {sum(rel.values()) / len(rel):+.4%}; straight loss at {steps}: {a[steps]:.4f}, resumed: {b[steps]:.4f}")
before = {s: (b[s] - a[s]) / a[s] for s in range(1, split + 1) if s in a and s in b}
print(f"steps before the split: max |rel diff| {max(abs(v) for v in before.values()):.4%} (run-to-run noise)")
PY
mkdir -p $OUT/resume_check && cp $R/*.txt $OUT/resume_check/ && cp $R/a/r/metrics.jsonl $OUT/resume_check/straight.jsonl && cp $R/b/r/metrics.jsonl $OUT/resume_check/resumed.jsonl
