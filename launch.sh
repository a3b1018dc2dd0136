#!/usr/bin/env bash
# Starts smog.py on one GPU, on every GPU of this node, on several nodes, or under SLURM; prints the command first.
#
#   bash launch.sh single    [smog.py flags]   # one process, one GPU (or the CPU)
#   bash launch.sh node      [smog.py flags]   # every GPU of this node: torchrun --standalone --nproc_per_node=gpu
#   bash launch.sh multinode [smog.py flags]   # run on every node with NNODES, MASTER_ADDR (and MASTER_PORT) set
#   sbatch --nodes=8 --gres=gpu:8 --ntasks-per-node=1 --requeue --signal=B:USR1@120 launch.sh slurm [flags]
#
# The mode defaults to `node` when GPUs are present. Without a GPU it says so and runs the CPU command instead.
# DRY_RUN=1 prints the command without running it.
#
# Faults: when a process dies (out of memory, a GPU lost, a node rebooted), torchrun restarts the whole group up to
# MAX_RESTARTS times (default 3) and the new group resumes from out_dir/checkpoint.pt; what is lost is the work since
# that checkpoint (--checkpoint-every N bounds it to N steps). A process that stops answering makes the others fail
# within --dist-timeout seconds (default 300), which triggers the same restart.
#
# Batch size: --batch-size is per process and forward pass, so the global batch is batch_size × GPUs × nodes ×
# accumulate. --lr is per 256 images of global batch (linear scaling): keep --lr and the global batch to keep a recipe
# on a different GPU count, e.g. the paper's 4096 = 64 GPUs × 64 = 8 GPUs × 64 × --accumulate 8.
#
# Examples:
#   bash launch.sh node --preset imagenet-r50 --data /data/imagenet --out-dir runs/r50
#   NNODES=4 MASTER_ADDR=node001 bash launch.sh multinode --preset imagenet-r50 --data /data/imagenet
set -euo pipefail
# Under sbatch this script runs as a spooled copy in the node's spool folder: smog.py is in the folder the job was
# submitted from. Otherwise it is next to this script.
here=${SLURM_SUBMIT_DIR:-$(dirname "$0")}
[ -f "$here/smog.py" ] || here=$(dirname "$0")
if [ ! -f "$here/smog.py" ]; then
  echo "launch.sh: smog.py not found in ${SLURM_SUBMIT_DIR:+$SLURM_SUBMIT_DIR (SLURM_SUBMIT_DIR) or }$(dirname "$0"); run sbatch from the folder that holds smog.py" >&2
  exit 1
fi
cd "$here"

mode=node
case "${1:-}" in single|node|multinode|slurm) mode=$1; shift ;; esac

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
fi

run() {
  echo "+ $*"
  [ "${DRY_RUN:-0}" = 1 ] || exec "$@"
}

if [ "$gpus" -eq 0 ] && [ "$mode" != slurm ]; then
  echo "launch.sh: no GPU found (nvidia-smi lists none); running on the CPU in one process instead."
  run python smog.py "$@"
  exit 0
fi

port=${MASTER_PORT:-29500}
restarts=--max-restarts=${MAX_RESTARTS:-3}
case "$mode" in
  single)
    run python smog.py "$@" ;;
  node)
    run torchrun --standalone --nproc_per_node=gpu "$restarts" smog.py "$@" ;;
  multinode)
    : "${NNODES:?set NNODES (number of nodes) for multinode}" "${MASTER_ADDR:?set MASTER_ADDR (host of node 0)}"
    run torchrun --nnodes="$NNODES" --nproc_per_node=gpu "$restarts" --rdzv-backend=c10d \
      --rdzv-endpoint="$MASTER_ADDR:$port" --rdzv-id="${RDZV_ID:-smog}" smog.py "$@" ;;
  slurm)
    # One task per node; torchrun starts one process per GPU. sbatch's --signal=B:USR1@120 reaches this shell two
    # minutes before the time limit (SLURM's preemption sends TERM): it is passed on as SIGTERM (srun and torchrun
    # forward it), every smog.py process finishes its step, rank 0 writes out_dir/checkpoint.pt and all exit 0;
    # then this script requeues the job, which resumes mid-epoch from that checkpoint (--resume auto).
    : "${SLURM_JOB_NODELIST:?slurm mode runs inside an sbatch allocation}"
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    cmd=(srun torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node=gpu "$restarts" --rdzv-backend=c10d
         --rdzv-endpoint="$head:$port" --rdzv-id="$SLURM_JOB_ID" smog.py "$@")
    echo "+ ${cmd[*]}"
    [ "${DRY_RUN:-0}" = 1 ] && exit 0
    set +e
    "${cmd[@]}" &
    pid=$!
    preempted=0
    trap 'preempted=1; echo "launch.sh: preemption signal; smog.py writes a checkpoint"; kill -TERM "$pid"' USR1 TERM
    wait "$pid"
    status=$?
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done  # a trap interrupts the first wait
    if [ "$preempted" = 1 ]; then
      echo "launch.sh: requeueing job $SLURM_JOB_ID"
      scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$status" ;;
esac
