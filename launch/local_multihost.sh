#!/usr/bin/env bash
# Simulates an N-host pod on one machine: N local processes, each with 8/N CPU devices, joined by
# jax.distributed on 127.0.0.1, all running the same train command.
#
#   launch/local_multihost.sh 2 --config=configs/tiny.py --workdir=/tmp/mh
#
# Each process's output goes to WORKDIR/process_<i>.log; the script fails if any process fails.
set -euo pipefail
n="${1:?usage: launch/local_multihost.sh NUM_PROCESSES TRAIN_FLAGS...}"
shift
if (( 8 % n )); then echo "error: NUM_PROCESSES=$n must divide 8 (the simulated devices)" >&2; exit 2; fi
workdir=""
for arg in "$@"; do case "$arg" in --workdir=*) workdir="${arg#--workdir=}";; esac; done
[[ -n "$workdir" ]] || { echo "error: --workdir=DIR is required" >&2; exit 2; }
mkdir -p "$workdir"
port="${PORT:-$((20000 + RANDOM % 20000))}"
cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$((8 / n))" JAX_PLATFORMS=cpu \
    python -m diffusion_lm.train "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
    --process_id="$i" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 3 "$workdir/process_0.log"
exit "$status"
