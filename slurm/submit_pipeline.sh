#!/bin/bash
# prune -> distill -> export as three dependent SLURM jobs (each starts only after the previous succeeded:
# --dependency=afterok). Prints the job ids.
#   slurm/submit_pipeline.sh RUN_DIR TEACHER_CKPT [--dry-run] \
#       --prune "data.calibration=PREFIX prune.hidden_size=3072 ..." --prune-sbatch "--nodes=1" \
#       --distill "data.train=PREFIX trainer.max_steps=.. trainer.strategy.tensor_model_parallel_size=8 ..." \
#       --distill-sbatch "--nodes=4" --export "format=hf"
# Outputs: RUN_DIR/pruned (checkpoint), RUN_DIR/distill (run dir; student/), RUN_DIR/export.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=$1; teacher=$2; shift 2
dry=0; prune=""; distill=""; export_args="format=hf"; prune_sb=""; distill_sb=""; export_sb=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1; shift;;
    --prune) prune=$2; shift 2;;        --prune-sbatch) prune_sb=$2; shift 2;;
    --distill) distill=$2; shift 2;;    --distill-sbatch) distill_sb=$2; shift 2;;
    --export) export_args=$2; shift 2;; --export-sbatch) export_sb=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
# shellcheck disable=SC2086
if [[ $dry -eq 1 ]]; then
  "$REPO/slurm/submit.sh" distill --dry-run -- teacher="$teacher" student="$teacher" output="$run_dir/distill" $distill
  exit 0
fi
# shellcheck disable=SC2086
j1=$("$REPO/slurm/submit.sh" prune $prune_sb -- model="$teacher" output="$run_dir/pruned" $prune)
echo "prune: $j1"
# shellcheck disable=SC2086
j2=$("$REPO/slurm/submit.sh" distill --dependency=afterok:$j1 $distill_sb -- teacher="$teacher" \
     student="$run_dir/pruned" output="$run_dir/distill" $distill)
echo "distill: $j2 (after $j1)"
# shellcheck disable=SC2086
j3=$("$REPO/slurm/submit.sh" export --dependency=afterok:$j2 --ntasks-per-node=1 $export_sb -- \
     model="$run_dir/distill" output="$run_dir/export" $export_args)
echo "export: $j3 (after $j2)"
