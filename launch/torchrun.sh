#!/usr/bin/env bash
# Launch megatron_regdpo training with torchrun: one process per GPU on this node.
#
#   single node:  launch/torchrun.sh RECIPE [key.sub=value ...]
#   multi node:   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> [MASTER_PORT=29500] \
#                   launch/torchrun.sh RECIPE [key.sub=value ...]          (run the same line on every node)
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: the number of GPUs nvidia-smi lists, else 1)
#   NNODES          nodes in the job (default 1: --standalone, no rendezvous setup)
#   NODE_RANK       this node's rank; node 0 hosts the c10d rendezvous store (ranks are assigned by the
#                   rendezvous itself: torchrun ignores --node-rank with c10d)
#   MASTER_ADDR, MASTER_PORT   the rendezvous endpoint, on node 0 (port default 29500)
#   RDZV_ID         job id shared by all nodes (default $SLURM_JOB_ID, else "regdpo")
#   TORCHRUN        the launcher command (default: PYTHON -m megatron_regdpo.launcher: torchrun's options and
#                   run, but a user error ends as the workers' one line; torchrun itself works too)
#   PYTHON          its interpreter (default: python on PATH when it has torch, else the project's .venv)
# Extra arguments after RECIPE go to megatron_regdpo.train (config overrides such as optim.lr=1e-5).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
RECIPE=$1
shift
if [[ ! -f $RECIPE ]]; then
    echo "torchrun.sh: recipe not found: $RECIPE (paths are relative to $(pwd))" >&2
    exit 2
fi

if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
# The launcher: torchrun's own, run in-process by megatron_regdpo/launcher.py, with python from the active
# environment, else the project's own (make install), else a clear error
ROOT=$(cd "$(dirname "$0")/.." && pwd)
has_torch() { "$1" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' 2>/dev/null; }
if [[ -z ${TORCHRUN:-} ]]; then
    if [[ -z ${PYTHON:-} ]]; then
        if command -v python >/dev/null 2>&1 && has_torch python; then PYTHON=python
        elif [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python
        else
            echo "torchrun.sh: no python with torch found: activate the environment that has megatron_regdpo," \
                 "or run 'make install' in $ROOT" >&2
            exit 2
        fi
    fi
    TORCHRUN="$PYTHON -m megatron_regdpo.launcher"
fi

# Megatron's TP/SP communication overlap relies on kernels being launched in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# torchrun sets 1 thread per process when unset; give each process its share of the cores instead.
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}
export PYTHONUNBUFFERED=1

TRAIN=(-m megatron_regdpo.train --config "$RECIPE" "$@")
if (( NNODES == 1 )); then
    LAUNCH=(--standalone --nproc-per-node="$NPROC_PER_NODE")
else
    : "${MASTER_ADDR:?multi-node (NNODES=$NNODES) needs MASTER_ADDR, the host of node 0}"
    : "${NODE_RANK:?multi-node (NNODES=$NNODES) needs NODE_RANK (0..$(( NNODES - 1 )))}"
    MASTER_PORT=${MASTER_PORT:-29500}
    IS_HOST=$([[ $NODE_RANK == 0 ]] && echo 1 || echo 0)
    LAUNCH=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
            --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-regdpo}}" --rdzv-conf="is_host=$IS_HOST")
fi

# Stop signals (docs/reliability.md, "Signals and locks"). A scheduler signals the whole job: its process
# group (kill -TERM -- -PGID) or every process (SLURM's scancel). The workers must get SIGTERM, save at the
# next step boundary and exit 0. torchrun, given a SIGTERM, would send the workers another, SIGKILL them
# after 30 s and exit 1 whatever they did. So torchrun runs in a process group of its own (set -m) with
# SIGTERM/SIGINT ignored and, where it has the option, not handled; this script forwards the first
# TERM/INT to the workers (torchrun's children), and torchrun then exits with the workers' status.
# (torchrun without --signals-to-handle, before torch 2.9, still handles a signal sent to it directly.)
if $TORCHRUN --help 2>/dev/null | grep -q -- --signals-to-handle; then
    LAUNCH+=(--signals-to-handle=SIGHUP,SIGQUIT)
fi
LAUNCHER= FORWARDED=
forward() {
    local pid=${LAUNCHER:-$!}          # $!: the signal came between the launch and LAUNCHER=$!
    [[ -n $pid ]] || exit $(( 128 + $2 ))   # before the launch: nothing started, nothing to save
    [[ -z $FORWARDED ]] || return 0    # once: a scheduler may signal again; the workers are already stopping
    FORWARDED=$1
    if pkill "-$1" -P "$pid"; then
        echo "torchrun.sh: SIG$1: the workers save at the next step boundary and exit" >&2
    else  # no worker yet (rendezvous): nothing to save; torchrun handles SIGHUP: it stops (exit 129)
        echo "torchrun.sh: SIG$1 before the workers started: stopping torchrun" >&2
        kill -HUP "$pid" 2>/dev/null || true
    fi
}
trap 'forward TERM 15' TERM
trap 'forward INT 2' INT
set -m
set -x
( trap '' TERM INT; exec $TORCHRUN "${LAUNCH[@]}" "${TRAIN[@]}" ) &
{ set +x; } 2>/dev/null
LAUNCHER=$!
while :; do
    RC=0
    wait "$LAUNCHER" || RC=$?
    kill -0 "$LAUNCHER" 2>/dev/null || break   # else wait was cut short by a trapped signal: wait again
done
exit "$RC"
