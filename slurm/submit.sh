#!/bin/bash
# Submit one stage:  slurm/submit.sh STAGE [sbatch options ...] -- [key=value overrides ...]
#   slurm/submit.sh distill --nodes=4 -- teacher=.. student=.. output=.. trainer.num_nodes=4 trainer.strategy.tensor_model_parallel_size=8
# Adds --gpus-per-node=$GPUS_PER_NODE (default 8; 0 = CPU-only cluster). Prints the job id.
# --dry-run (first option): validate the overrides and print the resolved launch without submitting.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
stage=$1; shift
dry=0; [[ "${1:-}" == "--dry-run" ]] && { dry=1; shift; }
opts=(); while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PY=${NEMO_MINITRON_PYTHON:-$REPO/.venv/bin/python}; [[ -x "$PY" ]] || PY=python3
if [[ $dry -eq 1 ]]; then
  exec "$PY" -m nemo_minitron.cli "$stage" "$@" --dry-run
fi
gpu=(); [[ "$GPUS_PER_NODE" -gt 0 ]] && gpu=(--gpus-per-node="$GPUS_PER_NODE")
mkdir -p "$REPO/logs"
cd "$REPO" && sbatch --parsable "${gpu[@]}" "${opts[@]}" "$REPO/slurm/$stage.sbatch" "$@"
