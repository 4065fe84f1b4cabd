#!/usr/bin/env bash
# Start a stage on every node of the current Slurm allocation: one `accelerate launch` per node, all joining
# one process group led by the first node. Use it as params.yaml's `launch`, e.g.
#   launch: scripts/launch-slurm.sh configs/accelerate/ddp.yaml
# with num_processes in the config = GPUs per node x nodes. DVC itself runs once, on the first node.
set -euo pipefail
config=$1
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --nodes "$SLURM_NNODES" --ntasks-per-node 1 bash -c \
  "accelerate launch --config_file '$config' --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID \
   --main_process_ip $head_node --main_process_port 29500 -m stages $*"
