#!/usr/bin/env bash
# Two machines without a scheduler: run the same line on both, with HEAD = a hostname/IP of the first machine that
# the second can reach (it hosts the c10d rendezvous on PORT) and NODE_RANK 0 on the first, 1 on the second:
#
#   host-a$ HEAD=host-a NODE_RANK=0 bash examples/multinode/two-hosts.sh train-dit -p tiny --cache C --out R
#   host-b$ HEAD=host-a NODE_RANK=1 bash examples/multinode/two-hosts.sh train-dit -p tiny --cache C --out R
#
# C and R must be the same paths on both machines (NFS or a parallel filesystem). NPROC = processes per machine.
set -euo pipefail
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
source "$here/env.sh"
: "${HEAD:?set HEAD to the hostname or IP of the first machine}"
: "${NODE_RANK:?set NODE_RANK to 0 on the first machine, 1 on the second}"
read -r -a torchrun <<< "${RAE_TORCHRUN:-torchrun}"
exec "${torchrun[@]}" --nnodes=2 --node-rank="$NODE_RANK" --nproc-per-node="${NPROC:-8}" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${PORT:-29500}" --rdzv-id="${RDZV_ID:-rae}" \
  --max-restarts="$RAE_MAX_RESTARTS" -m rae_cli "$@"
