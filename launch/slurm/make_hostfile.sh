#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("host slots=N" per line) for the current Slurm allocation.
#
#   launch/slurm/make_hostfile.sh [OUT] [SLOTS]     (inside sbatch/salloc)
#   deepspeed --hostfile OUT --launcher slurm --no_ssh_check --master_addr HOST launch/pretrain.py --config ...
#
# OUT defaults to hostfile-$SLURM_JOB_ID. SLOTS (processes per node) defaults to the GPUs
# Slurm gave each node (SLURM_GPUS_ON_NODE), else the tasks per node. With --launcher slurm
# DeepSpeed starts the ranks with srun inside the allocation; its default backend (pdsh)
# reaches the other nodes with ssh instead. See launch/slurm/README.md.
set -euo pipefail
: "${SLURM_JOB_NODELIST:?not inside a Slurm allocation (SLURM_JOB_NODELIST is unset)}"
out=${1:-hostfile-${SLURM_JOB_ID:-slurm}}
per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
slots=${2:-${SLURM_GPUS_ON_NODE:-${per_node%%(*}}}
[[ $slots =~ ^[1-9][0-9]*$ ]] || { echo "make_hostfile: bad slot count '$slots'" >&2; exit 2; }
scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v s="$slots" 'NF {print $1 " slots=" s}' >"$out.tmp"
[[ -s $out.tmp ]] || { echo "make_hostfile: no hosts in '$SLURM_JOB_NODELIST'" >&2; exit 1; }
mv "$out.tmp" "$out"
echo "$out: $(wc -l <"$out") hosts x $slots slots"
