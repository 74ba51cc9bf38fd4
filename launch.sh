#!/usr/bin/env bash
# Launch ft under torchrun, on one node or many.
#
#   ./launch.sh                               # the demo: configs/demo.yaml
#   ./launch.sh CONFIG.yaml [section.key=value ...]
#   ./launch.sh [section.key=value ...]       # the demo config, overridden
#   ./launch.sh --help                        # this text
#
# CONFIG.yaml is a config file (configs/demo.yaml when none is given); each
# section.key=value overrides one of its keys (train.max_steps=10, model.path=...).
#
# The topology comes from the environment, so the same script serves every node of a
# multi-node job (run it once per node, with that node's NODE_RANK):
#   NPROC_PER_NODE  processes on this node (default: the GPU count, or 2 without GPUs)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0. Unset on one node (NNODES=1): torchrun
#                   --standalone picks a free port itself, so several jobs can share a
#                   node. Unset on several nodes: 29500, as every node must agree on it
#   MAX_RESTARTS    times torchrun restarts the whole group after a rank dies (default 3);
#                   each restart resumes from the newest complete checkpoint
#   PYTHON          interpreter with ft installed (default: .venv/bin/python if present)
#   HF_HUB_OFFLINE, TOKENIZERS_PARALLELISM, OMP_NUM_THREADS
#                   passed to the workers; defaults 1, false and 1 (one thread per process)
#   TMPDIR          where the refusal file of this run goes (default /tmp)
#
# SIGTERM, SIGUSR1 (SLURM's pre-preemption signal) and Ctrl-C are passed to the training
# processes, not to torchrun: they finish the current step, write a checkpoint and exit
# 0, and so does this script. A second Ctrl-C stops everything at once. torchrun ignores
# SIGUSR1, so SLURM may send it to every process of the job (examples/slurm.sbatch).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # The usage is the comment above: from line 2 to the first line that is not a comment.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  exit 0
fi
cd "$(dirname "$0")"

if [[ -n "${PYTHON:-}" ]]; then
  :
elif [[ -x .venv/bin/python ]]; then
  PYTHON=.venv/bin/python
else
  PYTHON=python3
fi

CONFIG=configs/demo.yaml
if [[ $# -gt 0 && "$1" != *=* ]]; then
  CONFIG=$1
  shift
fi
if [[ ! -f "$CONFIG" ]]; then
  echo "launch.sh: config file '$CONFIG' not found" >&2
  exit 2
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" ]]; then
  # One node and no port asked for: torchrun's own rendezvous on a free localhost port
  # (--standalone), so a second job on this node does not fail with EADDRINUSE.
  # --local-addr: the workers reach that store at 127.0.0.1, not at the host's FQDN,
  # which a container or a laptop may not resolve.
  RENDEZVOUS=(--standalone --local-addr 127.0.0.1)
  MASTER="localhost:free port"
else
  MASTER_PORT=${MASTER_PORT:-29500}
  RENDEZVOUS=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  MASTER="$MASTER_ADDR:$MASTER_PORT"
fi

# The demo never needs the network: W&B logs offline unless an API key is configured
# (see wandb.mode), and nothing is fetched from the Hugging Face Hub.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# One intra-op thread per process on CPU unless told otherwise: N processes on N cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

MAX_RESTARTS=${MAX_RESTARTS:-3}

# Fail fast, once: a typo in a key or a bad value is refused here (ft.config_load, the
# config's one validation), before torchrun starts any worker (and before any restart
# could repeat it).
"$PYTHON" -m ft.config_load "$CONFIG" "$@" >/dev/null || exit 2
# A refusal found later (bad data, a checkpoint that cannot be resumed, a wrap plan that
# does not fit) is printed once by rank 0 and written here; the workers then exit 0 so
# that torchrun neither restarts them nor prints its own traceback, and this script
# exits 2.
FT_EXIT_FILE=$(mktemp "${TMPDIR:-/tmp}/ft-exit.XXXXXX")
export FT_EXIT_FILE
trap 'rm -f "$FT_EXIT_FILE"' EXIT

echo "[launch] $NNODES node(s) x $NPROC_PER_NODE process(es), node rank $NODE_RANK, master $MASTER, max restarts $MAX_RESTARTS, config $CONFIG"
# torchrun in its own session: a signal sent to this script's process group (Ctrl-C,
# a scheduler's kill) must reach the workers through the trap below, not torchrun,
# which would kill them 30 s later and exit with an error. And torchrun with SIGUSR1
# ignored: SLURM sends a signal to every process of a job step, and torchrun does not
# handle SIGUSR1, so it would die of it and leave the workers to be killed mid-checkpoint.
# The workers inherit the ignore until ft installs its own handler (ft.loop.setup).
trap '' USR1
setsid "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  "${RENDEZVOUS[@]}" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --max-restarts "$MAX_RESTARTS" \
  -m ft.loop "$CONFIG" "$@" &
TORCHRUN=$!

workers() {  # torchrun starts its workers as direct children
  if command -v pgrep >/dev/null; then
    pgrep -P "$TORCHRUN" || true
  else  # no procps (slim images): the kernel's list
    cat /proc/"$TORCHRUN"/task/*/children 2>/dev/null || true
  fi
}
stop_gracefully() {
  echo "[launch] $1: asking the workers to checkpoint and stop" >&2
  for pid in $(workers); do kill -TERM "$pid" 2>/dev/null || true; done
}
INTERRUPTS=0
on_interrupt() {
  INTERRUPTS=$((INTERRUPTS + 1))
  if [[ $INTERRUPTS -ge 2 ]]; then
    echo "[launch] second Ctrl-C: stopping now, without a checkpoint" >&2
    kill -TERM "$TORCHRUN" 2>/dev/null || true
  else
    stop_gracefully "Ctrl-C"
  fi
}
trap 'stop_gracefully SIGTERM' TERM
trap 'stop_gracefully SIGUSR1' USR1
trap on_interrupt INT

# `wait` returns early whenever a trap runs; wait again until torchrun has exited.
while true; do
  RC=0
  wait "$TORCHRUN" || RC=$?
  kill -0 "$TORCHRUN" 2>/dev/null || break
done
if [[ -s "$FT_EXIT_FILE" ]]; then
  exit 2  # rank 0 printed why
fi
exit "$RC"
