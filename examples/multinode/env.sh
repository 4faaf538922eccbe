#!/usr/bin/env bash
# Environment knobs of a multi-node run (sourced by rae.sbatch; source it yourself before two-hosts.sh). Each is
# only a default: a value already in the environment wins.

# Network interface the collectives use. Set it when nodes have several (ib0 for InfiniBand IPoIB, eth0, ...);
# a wrong pick shows up as a hang at the first collective. NCCL (GPUs) and gloo (CPU) read their own variable.
# export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ib0}
# export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-ib0}

# NCCL reports a failing or stuck collective by aborting the process (so that torchrun restarts the job) instead
# of hanging until the SLURM time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# How long a collective waits is the rae setting dist_timeout=MINUTES (per command; torch's default: NCCL 10
# min, gloo 30). Raise it where rank 0 does long work the others wait for (e.g. the first checkpoint of
# an XL model on a slow filesystem).

# A fresh rendezvous store for every restart. By default torchrun lends its store to the workers and keeps it
# across restarts, so restarted workers can read the previous attempt's connection keys and fail to connect
# ("Connection refused" / a stale NCCL id), using up the restarts: pytorch/pytorch#135712.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Whole-job restarts after a worker fails, each resuming from the last checkpoint (torchrun --max-restarts).
export RAE_MAX_RESTARTS=${RAE_MAX_RESTARTS:-3}

# One rank per GPU; the CPU threads of each (data loading has its own worker processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
