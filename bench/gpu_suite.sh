#!/usr/bin/env bash
# The GPU session script used for docs/PERFORMANCE.md figures: run from the repository root on a
# GPU machine, with results under $OUT (default ./bench_out). Pure-Python wheels the image lacks
# (hydra-core, omegaconf, antlr4) may be supplied in .whl/.
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.csv"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
STAGES=${STAGES:-"tests smoke train"}
for stage in $STAGES; do
  case $stage in
    tests) python3 -m pytest -q -p no:cacheprovider tests/gpu tests/moe tests/model 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt";;
    smoke) python3 -m bench smoke --compile --out "$OUT" 2>&1 | tee "$OUT/smoke.txt" | tail -12;;
    train)
      for exp in gpu_llama_1b gpu_dsv3_mini; do
        python3 -m train experiment=$exp trainer.max_steps=${TRAIN_STEPS:-30} output_dir=/tmp/mf_runs \
          2>&1 | tee "$OUT/train_$exp.txt" | grep -E "step=|run |error|Error" | tail -8
      done;;
  esac
done
