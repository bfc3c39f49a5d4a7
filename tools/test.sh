#!/usr/bin/env bash
# Runs every test: the notebooks (nbdev_test, default flags only) and then pytest on tests/.
# Extra arguments go to nbdev_test, e.g. `bash tools/test.sh --flags "slow cuda"`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg TRITON_INTERPRET=${TRITON_INTERPRET:-1}
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
# Two notebooks run at once on a 2-core machine: one thread each avoids the oversubscription that makes small torch
# models many times slower. Override with OMP_NUM_THREADS=... on a bigger machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
echo "== nbdev_test (notebooks) =="
nbdev_test --n_workers ${NBDEV_WORKERS:-2} --timing "$@"
echo "== pytest (tests/) =="
python -m pytest tests -q -p no:cacheprovider
