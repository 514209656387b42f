#!/bin/bash
# The architecture search as a SLURM job array: rank (importance, every candidate pruned and evaluated, the
# finalists saved) -> one array task per finalist (its short distillation + evaluation, in parallel) ->
# report (the ranked table), each job starting only after the previous succeeded (--dependency=afterok).
#   slurm/submit_search.sh [--dry-run] [sbatch options ...] -- model=.. output=.. data.calibration=.. \
#       data.train=.. data.validation=.. search.params=4.5B search.top_k=4 search.distill_steps=400 ...
# Prints the three job ids. The array has search.top_k (+1 with search.baseline) tasks; a task without a
# finalist (the baseline was already in the top K) does nothing. GPUS_PER_NODE as in submit.sh.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry=0; [[ "${1:-}" == "--dry-run" ]] && { dry=1; shift; }
opts=(); while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
PY=${NEMO_MINITRON_PYTHON:-$REPO/.venv/bin/python}; [[ -x "$PY" ]] || PY=python3
# validates the overrides (exit 2 with the reason) and sizes the array
n=$(cd "$REPO" && "$PY" -c 'import sys
from nemo_minitron import config
from nemo_minitron.errors import UserError
try:
    c = config.load("search", sys.argv[1:])
except UserError as e:
    sys.exit(f"error: {e}")
print(c.search.top_k + (c.search.baseline is not None))' "$@")
if [[ $dry -eq 1 ]]; then
  cd "$REPO" && "$PY" -m nemo_minitron.cli search "$@" --dry-run
  echo "would submit: rank -> distill array 0-$((n - 1)) -> report"
  exit 0
fi
gpu=(); [[ "${GPUS_PER_NODE:-8}" -gt 0 ]] && gpu=(--gpus-per-node="${GPUS_PER_NODE:-8}")
mkdir -p "$REPO/logs"
cd "$REPO"
j1=$(sbatch --parsable "${gpu[@]}" "${opts[@]}" --job-name=minitron-search-rank slurm/search.sbatch "$@" search.phase=rank)
echo "rank: $j1"
j2=$(sbatch --parsable "${gpu[@]}" "${opts[@]}" --job-name=minitron-search-distill --array=0-$((n - 1)) \
     --dependency=afterok:$j1 slurm/search.sbatch "$@" search.phase=distill)
echo "distill: $j2 (array 0-$((n - 1)), after $j1)"
j3=$(sbatch --parsable "${gpu[@]}" "${opts[@]}" --job-name=minitron-search-report --ntasks-per-node=1 \
     --dependency=afterok:$j2 slurm/search.sbatch "$@" search.phase=report)
echo "report: $j3 (after $j2)"
