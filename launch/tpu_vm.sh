#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this checkout, install, run the same train
# command on every worker, and delete it. Idempotent: each step skips what already exists.
#
#   launch/tpu_vm.sh create  NAME ZONE ACCELERATOR            # e.g. my-tpu us-east5-a v5litepod-16
#   launch/tpu_vm.sh setup   NAME ZONE [BUCKET]               # copy the code, pip install, mount gs://BUCKET
#   launch/tpu_vm.sh train   NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh delete  NAME ZONE
#
# Every worker must see the same workdir: `setup NAME ZONE BUCKET` mounts gs://BUCKET at /gcs/BUCKET
# on all workers (gcsfuse), so use WORKDIR=/gcs/BUCKET/runs/NAME. Rerunning `train` resumes.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail
VERSION="${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5-lite}"
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$1" --zone="$2" --worker=all --command="$3"; }

cmd="${1:?usage: launch/tpu_vm.sh create|setup|train|delete NAME ZONE ...}"
name="${2:?NAME required}"
zone="${3:?ZONE required}"
case "$cmd" in
  create)
    accelerator="${4:?ACCELERATOR (e.g. v5litepod-16) required}"
    if [[ "${DRY_RUN:-0}" != 1 ]] && gcloud compute tpus tpu-vm describe "$name" --zone="$zone" >/dev/null 2>&1; then
      echo "$name exists"; exit 0
    fi
    run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$VERSION"
    ;;
  setup)
    root="$(cd "$(dirname "$0")/.." && pwd)"
    run gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$root" "$name":~/diffusion_lm
    ssh_all "$name" "$zone" "cd ~/diffusion_lm && pip install -q -r requirements-tpu.txt"
    if [[ -n "${4:-}" ]]; then
      ssh_all "$name" "$zone" "sudo mkdir -p /gcs/$4 && sudo chown \$USER /gcs/$4 && (mountpoint -q /gcs/$4 || gcsfuse --implicit-dirs $4 /gcs/$4)"
    fi
    ;;
  train)
    config="${4:?CONFIG required}"
    workdir="${5:?WORKDIR (shared by all workers, e.g. /gcs/BUCKET/runs/x) required}"
    shift 5
    extra="$(printf ' %q' "$@")"
    ssh_all "$name" "$zone" "cd ~/diffusion_lm && python -m diffusion_lm.train --config=$config --workdir=$workdir --distributed$extra"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *)
    echo "error: unknown command '$cmd'; allowed: create, setup, train, delete" >&2; exit 2;;
esac
