#!/usr/bin/env bash
# Multi-node training with plain torchrun (no scheduler). Run the SAME command on every node:
#
#   NNODES=2 MASTER_ADDR=node0 RUN_DIR=/shared/outputs/t1_ps_resnet50 \
#     scripts/launch_multinode.sh experiment=psconv_t1_ps_resnet50 data.root=/data/imagenet
#
# The nodes meet through a c10d rendezvous at MASTER_ADDR:MASTER_PORT (any node's address; no node
# ranks to assign). RUN_DIR must be on a filesystem all nodes share; running the command again
# resumes the run from RUN_DIR/checkpoints/last.pt (trainer.resume=auto). data.batch_size is the
# GLOBAL batch: the paper's batch and LR hold for any NNODES x NPROC_PER_NODE.
#
# Environment: NNODES (1), NPROC_PER_NODE (gpu = one process per visible GPU), MASTER_ADDR
# (required when NNODES > 1), MASTER_PORT (29500), RUN_DIR (required), RUN_ID (rendezvous id, default
# from RUN_DIR), MAX_RESTARTS (0; torchrun restarts failed workers, which then resume), DRY_RUN=1
# (print the command instead of running it).
set -euo pipefail

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [[ -z "${RUN_DIR:-}" ]]; then
  echo "error: set RUN_DIR to a run directory on a filesystem shared by all nodes, e.g." >&2
  echo "  RUN_DIR=/shared/outputs/my_run $0 $*" >&2
  exit 2
fi
if [[ "$NNODES" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  echo "error: NNODES=$NNODES needs MASTER_ADDR (the address of one of the nodes, the same on all)" >&2
  exit 2
fi
RUN_ID=${RUN_ID:-$(basename "$RUN_DIR" | tr -c 'A-Za-z0-9_\n-' '_')}
ENDPOINT="${MASTER_ADDR:-localhost}:${MASTER_PORT}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

cmd=(torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --max_restarts="$MAX_RESTARTS"
  --rdzv_backend=c10d --rdzv_endpoint="$ENDPOINT" --rdzv_id="$RUN_ID"
  "$ROOT/train.py" hydra.run.dir="$RUN_DIR" trainer.resume=auto "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
