# Sourced by the GPU-call scripts (bench/side_by_side.sh, bench/profile_runs.sh): installs the wheels
# the GPU image lacks from .whl/ (hydra-core, omegaconf, antlr4, torchao), if any, into /tmp/site,
# puts them and the repository on PYTHONPATH, and prepares $OUT and the precision variants.
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# A precision variant's name -> the trainer's overrides (bf16, fp8, fp8dense take optim.master_weights=auto,
# which is on for these one-GPU runs; *mw forces it on, *nomw off).
prec_args() { case $1 in fp8dense) echo "trainer.precision=fp8 trainer.fp8.experts=false";;
  bf16mw) echo "trainer.precision=bf16 optim.master_weights=true";;
  bf16nomw) echo "trainer.precision=bf16 optim.master_weights=false";;
  fp8nomw) echo "trainer.precision=fp8 optim.master_weights=false";;
  fp8densenomw) echo "trainer.precision=fp8 trainer.fp8.experts=false optim.master_weights=false";;
  fp8mw) echo "trainer.precision=fp8 optim.master_weights=true";;
  fp8densemw) echo "trainer.precision=fp8 trainer.fp8.experts=false optim.master_weights=true";;
  *) echo "trainer.precision=$1";; esac; }
