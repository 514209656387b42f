#!/bin/bash
# Shared launcher for slurm/*.sbatch (sourced). Usage inside a batch script:
#     source "$NEMO_MINITRON_REPO/slurm/common.sh"; launch <command> "$@"
# Launches `nemo-minitron <command> "$@"` with one task per GPU on every allocated node through srun; the
# overrides are passed through unchanged. Rank, world size, master address/port come from SLURM
# (nemo_minitron.parallel maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; Lightning reads SLURM too).
#
# Environment:
#   NEMO_MINITRON_REPO        project checkout (default: the directory sbatch was called from)
#   NEMO_MINITRON_PYTHON      python with the project installed (default: $REPO/.venv/bin/python, else python3)
#   NEMO_MINITRON_CONTAINER   run inside this container image (pyxis/enroot: srun --container-image)
#   NEMO_MINITRON_MOUNTS      --container-mounts for it (default: $REPO:$REPO; add data and checkpoint paths)
#   NEMO_MINITRON_LOG_ROOT    where per-job log directories go (default: $REPO/logs)
set -euo pipefail

REPO=${NEMO_MINITRON_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [[ -n "${NEMO_MINITRON_CONTAINER:-}" ]]; then
  PY=${NEMO_MINITRON_PYTHON:-python}
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY=${NEMO_MINITRON_PYTHON:-$REPO/.venv/bin/python}
else
  PY=${NEMO_MINITRON_PYTHON:-python3}
fi
LOG_DIR=${NEMO_MINITRON_LOG_ROOT:-$REPO/logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}
mkdir -p "$LOG_DIR"

# ---- the environment a Megatron job on H100 nodes needs (as NeMo's performance plugin / Megatron-LM set)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # TP/SP comm-compute overlap needs in-order kernel launch (Hopper)
export TORCH_NCCL_AVOID_RECORD_STREAMS=1            # free NCCL buffers promptly (megatron's async grad reduce)
export TORCH_NCCL_HIGH_PRIORITY=1                   # NCCL streams at high priority (NeMo PerfEnvPlugin)
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}      # NVLink SHARP costs memory unless user buffers are registered
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}       # tolerate transient InfiniBand hiccups on large jobs
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}               # INFO when diagnosing hangs
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1            # a failed collective ends the job instead of hanging it
export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}  # leave SMs for comm overlap (TE)
export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}
export PYTHONUNBUFFERED=1                           # progress lines reach the log as they happen
export NEMO_MINITRON_TERMINAL=raw                  # per-task logs are files: they keep NeMo's and megatron's lines too
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# master = first node of the allocation; port from the job id (two jobs on one node do not collide),
# kept below Linux's ephemeral range (32768+) so no outgoing connection can already hold it
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 12000))}

# Each task runs through a small wrapper (inside the container too: it needs only bash) that writes the task's
# own exit status for this attempt to $LOG_DIR/restart-<SLURM_RESTART_COUNT>.task-<SLURM_PROCID>.exit; the
# requeue decision reads only those. srun's exit code cannot tell: with --kill-on-bad-exit the first task that
# exits nonzero gets the others killed (TERM, KILL after KillWait) and srun reports the largest status, often
# 143 (SIGTERM) rather than the first task's 3 or 4. A killed task writes nothing (or its own status, when it
# exited by itself just as the kill came): the wrapper ignores USR1 (the warning is for the task), notes
# TERM/INT, and when the task died of a signal it first waits up to 2 s, because SLURM signals the processes of
# a step one by one and the wrapper's TERM can come just after the task's. It always exits with the task's status.
_TASK_WRAPPER='status=$1; shift; killed=; trap : USR1; trap killed=1 TERM INT
"$@"; rc=$?
if (( rc > 128 )) && [[ -z $killed ]]; then
  sleep 2 & s=$!; while [[ -z $killed ]] && kill -0 $s 2>/dev/null; do wait $s; done; kill $s 2>/dev/null
fi
[[ -n $killed ]] || echo "$rc" > "$status.task-${SLURM_PROCID:-0}.exit" || true
exit "$rc"'

# why a job ends with a given status (one line in launch.txt and the batch log)
_why() {
  case $1 in
    2) echo "a bad setting or input: the error line in the task log" ;;
    4) echo "trainer.max_nonfinite_steps: non-finite stop, it would recur; see the task log" ;;
    *) if (( $1 > 128 )); then echo "a task was killed by SIG$(kill -l $(($1 - 128)) 2>/dev/null || echo $(($1 - 128))) (e.g. out of memory)"
       else echo "a task failed: see its log"; fi ;;
  esac
}

launch() {
  local command=$1; shift
  {
    echo "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES:-1} node(s)," \
         "${SLURM_NTASKS:-1} task(s), nodes ${SLURM_JOB_NODELIST:-?}, master $MASTER_ADDR:$MASTER_PORT"
    echo "nemo-minitron $command $*"
  } | tee -a "$LOG_DIR/launch.txt"
  # the resolved config, written before anything runs (also validates the overrides)
  "$PY" -m nemo_minitron.cli "$command" "$@" --print-config > "$LOG_DIR/config.yaml"
  # per-task logs are appended to, so they hold every attempt of a requeued job; exit statuses are per attempt
  local status="$LOG_DIR/restart-${SLURM_RESTART_COUNT:-0}"
  rm -f "$status".task-*.exit
  local srun_args=(--kill-on-bad-exit=1 --output="$LOG_DIR/%N-%t.log" --open-mode=append)
  if [[ -n "${NEMO_MINITRON_CONTAINER:-}" ]]; then
    # the log directory is mounted too: the wrapper writes the exit statuses from inside the container
    srun_args+=(--container-image="$NEMO_MINITRON_CONTAINER"
                --container-mounts="${NEMO_MINITRON_MOUNTS:-$REPO:$REPO},$LOG_DIR:$LOG_DIR" --container-workdir="$REPO")
  fi
  # a warning signal (--signal=B:USR1@T) or scancel's TERM reaches this shell: pass it to every task,
  # which saves a checkpoint and exits with status 3 (after USR1, the job then requeues itself)
  srun "${srun_args[@]}" bash -c "$_TASK_WRAPPER" nemo-minitron-task "$status" "$PY" -m nemo_minitron.cli "$command" "$@" &
  local pid=$!
  trap "echo 'signal: forwarding USR1 to the tasks' | tee -a '$LOG_DIR/launch.txt'; kill -USR1 $pid 2>/dev/null || true" USR1
  trap "kill -TERM $pid 2>/dev/null || true" TERM
  local rc=0
  while true; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returned early because a trap ran: keep waiting
  done
  trap - USR1 TERM
  cat "$LOG_DIR"/*-0.log 2>/dev/null | tail -n 5 || true
  # the decision, from this attempt's statuses only: requeue iff a task exited with 3 (preempted) and no task
  # exited with another nonzero status; otherwise the job ends with the status of the task that failed first
  # (the oldest status file), or srun's exit code when no task wrote one
  local f s preempted=0 failed="" first="" written=""
  local -A count=()
  for f in "$status".task-*.exit; do
    [[ -r $f ]] && read -r s < "$f" || continue
    count[$s]=$(( ${count[$s]:-0} + 1 ))
    if [[ $s == 3 ]]; then preempted=1
    elif [[ $s != 0 && ( -z $failed || $f -ot $first ) ]]; then failed=$s; first=$f
    fi
  done
  if [[ $preempted == 1 && -z $failed ]]; then
    echo "preempted (exit status 3): requeueing job ${SLURM_JOB_ID}" | tee -a "$LOG_DIR/launch.txt"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  for s in "${!count[@]}"; do written+="${written:+, }$s x${count[$s]}"; done
  if [[ -n $failed ]]; then
    rc=$failed; first=${first#"$status".task-}; first="task ${first%.exit} first; statuses written: $written"
  else
    first="srun's exit code; ${written:+statuses written: $written}${written:-no task wrote a status}"
  fi
  if [[ $rc -eq 0 ]]; then
    echo "exit status 0" | tee -a "$LOG_DIR/launch.txt"
  else
    echo "exit status $rc: not requeued ($(_why "$rc"); $first)" | tee -a "$LOG_DIR/launch.txt"
  fi
  return "$rc"
}

# An orchestrating command (pipeline, search) runs in this batch shell, not under srun: it starts each
# parallel stage itself as an srun step over the allocation (launcher.command), and the other stages
# (import, preprocess, export, reports) as plain child processes. A re-run of the same command skips
# every completed stage, so a requeued or resubmitted job continues where it stopped.
# In container mode the driver needs the project importable on the node itself (NEMO_MINITRON_PYTHON);
# the stages run in the container.
drive() {
  local command=$1; shift
  local launcher="srun --kill-on-bad-exit=1"
  if [[ -n "${NEMO_MINITRON_CONTAINER:-}" ]]; then
    launcher+=" --container-image=$NEMO_MINITRON_CONTAINER --container-mounts=${NEMO_MINITRON_MOUNTS:-$REPO:$REPO}"
    launcher+=" --container-workdir=$REPO"
  fi
  local args=("$@") a
  for a in "$@"; do [[ $a == launcher.command=* ]] && launcher=""; done
  [[ -n "$launcher" ]] && args+=("launcher.command=$launcher")
  {
    echo "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) array task ${SLURM_ARRAY_TASK_ID:--}: ${SLURM_JOB_NUM_NODES:-1} node(s)," \
         "${SLURM_NTASKS:-1} task(s), nodes ${SLURM_JOB_NODELIST:-?}"
    echo "nemo-minitron $command ${args[*]}"
  } | tee -a "$LOG_DIR/launch.txt"
  "$PY" -m nemo_minitron.cli "$command" "${args[@]}" --print-config > "$LOG_DIR/config.yaml"
  local rc=0
  "$PY" -m nemo_minitron.cli "$command" "${args[@]}" || rc=$?
  echo "exit status $rc" | tee -a "$LOG_DIR/launch.txt"
  return "$rc"
}
