#!/usr/bin/env bash
# Runs an nvila-jax command on one host.
#
#   launch/single_host.sh nvila-jax train --config configs/tiny.py --workdir /tmp/run
#   NUM_PROCESSES=8 launch/single_host.sh nvila-jax train ...     # one process per GPU
#   NUM_PROCESSES=2 CPU_DEVICES=4 launch/single_host.sh ...        # 2 CPU processes x 4 fake devices (testing)
#
# Variables:
#   NUM_PROCESSES  processes to start (default 1: one process drives every local accelerator)
#   PORT           coordinator port on 127.0.0.1 when NUM_PROCESSES > 1 (default 12321)
#   CPU_DEVICES    run on CPU with this many fake devices per process (gloo collectives between processes)
#   GPUS_PER_PROCESS  GPUs each process drives when NUM_PROCESSES > 1 (default 1; process i gets GPUs
#                  i*G .. i*G+G-1)
# Output of process 0 goes to the terminal; process i > 0 writes to ${LOG_DIR:-.}/process_<i>.log.
set -euo pipefail

if [ "$#" -eq 0 ]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
NUM_PROCESSES="${NUM_PROCESSES:-1}"
PORT="${PORT:-12321}"
GPUS_PER_PROCESS="${GPUS_PER_PROCESS:-1}"
LOG_DIR="${LOG_DIR:-.}"

if [ -n "${CPU_DEVICES:-}" ]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${CPU_DEVICES} ${XLA_FLAGS:-}"
  export NVILA_CPU_COLLECTIVES=gloo
fi

if [ "$NUM_PROCESSES" -le 1 ]; then
  exec "$@"
fi

export NVILA_NUM_PROCESSES="$NUM_PROCESSES" JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = NUM_PROCESSES - 1; i >= 0; i--)); do
  ids=""
  if [ -z "${CPU_DEVICES:-}" ]; then
    ids=$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))
  fi
  if [ "$i" -eq 0 ]; then
    NVILA_PROCESS_ID=0 JAX_LOCAL_DEVICE_IDS="$ids" "$@" &
  else
    NVILA_PROCESS_ID="$i" JAX_LOCAL_DEVICE_IDS="$ids" "$@" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
# Wait for all; when one fails, stop the others (they would otherwise wait for it at the next collective).
status=0
for _ in "${pids[@]}"; do
  rc=0
  wait -n || rc=$?
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    cleanup
  fi
done
exit "$status"
