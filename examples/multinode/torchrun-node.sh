#!/usr/bin/env bash
# One node's part of a multi-node rae job: SLURM's environment → one `torchrun … -m rae_cli COMMAND ARGS` (c10d
# rendezvous, elastic restarts). Run it once per node: `srun --ntasks-per-node=1 bash torchrun-node.sh train-dit …`
# (rae.sbatch does). Every node must compute the same endpoint: rae.sbatch exports RAE_RDZV_HOST/RAE_RDZV_PORT
# once, on the first node; without them the first host of the allocation and port 29500 are used.
#
#   RAE_RDZV_HOST       rendezvous host (default: first of `scontrol show hostnames $SLURM_JOB_NODELIST`)
#   RAE_RDZV_PORT       rendezvous port on that host (default 29500)
#   RAE_NPROC_PER_NODE  processes per node (default: $SLURM_GPUS_ON_NODE, else 1)
#   RAE_NNODES          torchrun --nnodes (default: $SLURM_NNODES; "MIN:MAX" lets the job go on with fewer nodes)
#   RAE_MAX_RESTARTS    whole-job restarts after a worker fails (default 3); each resumes from the last checkpoint
#   RAE_TORCHRUN        the torchrun command (default: torchrun; e.g. "python -m torch.distributed.run")
set -euo pipefail
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (run under sbatch/srun, or use two-hosts.sh)}"
: "${SLURM_NNODES:?not inside a SLURM allocation}"
if [ $# -eq 0 ]; then
  echo "usage: torchrun-node.sh COMMAND [ARGS...]   (a rae command: train-dit, sample, ...)" >&2
  exit 2
fi

host=${RAE_RDZV_HOST:-}
if [ -z "$host" ]; then
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # not `| head -n 1`: SIGPIPE would fail the pipe
  host=${hosts%%$'\n'*}
fi
if [ -z "$host" ]; then
  echo "torchrun-node.sh: scontrol listed no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
  exit 2
fi
port=${RAE_RDZV_PORT:-29500}
nnodes=${RAE_NNODES:-$SLURM_NNODES}
nproc=${RAE_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
restarts=${RAE_MAX_RESTARTS:-3}
read -r -a torchrun <<< "${RAE_TORCHRUN:-torchrun}"

echo "torchrun-node.sh: node ${SLURM_NODEID:-?} of $nnodes, $nproc process(es), rendezvous $host:$port" >&2
exec "${torchrun[@]}" --nnodes="$nnodes" --nproc-per-node="$nproc" \
  --rdzv-backend=c10d --rdzv-endpoint="$host:$port" --rdzv-id="rae-${SLURM_JOB_ID:-0}" \
  --max-restarts="$restarts" -m rae_cli "$@"
