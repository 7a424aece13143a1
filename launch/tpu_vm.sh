#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this project, install, run the same train
# command on every worker, and delete it. Idempotent: rerunning a step redoes or skips it safely.
#
#   launch/tpu_vm.sh create  NAME ZONE ACCELERATOR         # e.g. my-tpu us-east5-a v5litepod-16
#   launch/tpu_vm.sh setup   NAME ZONE                     # copy the project, install Python + packages
#   launch/tpu_vm.sh train   NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh delete  NAME ZONE
#
# WORKDIR is a gs:// folder (gs://BUCKET/runs/NAME), read and written directly by every worker: no
# gcsfuse mount. Rerunning `train` resumes from the latest checkpoint there.
#
# Python: the TPU software versions for JAX (v2-alpha-tpuv6e, v2-alpha-tpuv5, v2-alpha-tpuv5-lite,
# tpu-ubuntu2204-base) are Ubuntu 22.04 images whose python3 is 3.10, older than the 3.11 that
# jax >= 0.10 (requirements.txt) needs. `setup` therefore installs uv with the image's pip and lets uv
# put a standalone CPython PYTHON_VERSION into a virtual environment at VENV; `train` runs that Python.
#
# Settings (environment variables):
#   TPU_SOFTWARE_VERSION  runtime image for `create`; default by ACCELERATOR: v6e* -> v2-alpha-tpuv6e,
#                         v5p* -> v2-alpha-tpuv5, v5litepod* / v5e* -> v2-alpha-tpuv5-lite,
#                         anything else (v4, v3, v2) -> tpu-ubuntu2204-base
#   TPU_PROJECT           Google Cloud project for every gcloud call (default: gcloud's configured one)
#   PYTHON_VERSION        Python that `setup` installs into VENV (default 3.12; 3.11 or newer)
#   REMOTE_DIR            where the project goes on each worker (default diffusion_lm, under $HOME)
#   VENV                  the virtual environment on each worker (default .venvs/diffusion_lm, under $HOME)
#   BACKGROUND            1: `train` starts the run under nohup on every worker, logging to
#                         REMOTE_DIR/train.log, and returns (default 0: it streams the output and waits)
#   DRY_RUN               1: print the commands (tar, gcloud) instead of running them
#
# The project goes over as one tarball of this checkout without .git, runs/, build outputs and caches.
set -euo pipefail
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
REMOTE_DIR="${REMOTE_DIR:-diffusion_lm}"
VENV="${VENV:-.venvs/diffusion_lm}"
project=()
if [[ -n "${TPU_PROJECT:-}" ]]; then project=(--project="$TPU_PROJECT"); fi
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$1" --zone="$2" ${project[@]+"${project[@]}"} --worker=all --command="$3"; }

runtime_for() {  # the TPU software version for an accelerator type
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e;;
    v5p*) echo v2-alpha-tpuv5;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite;;
    *) echo tpu-ubuntu2204-base;;
  esac
}

cmd="${1:?usage: launch/tpu_vm.sh create|setup|train|delete NAME ZONE ...}"
name="${2:?NAME required}"
zone="${3:?ZONE required}"
case "$cmd" in
  create)
    accelerator="${4:?ACCELERATOR (e.g. v5litepod-16) required}"
    if [[ "${DRY_RUN:-0}" != 1 ]] && gcloud compute tpus tpu-vm describe "$name" --zone="$zone" ${project[@]+"${project[@]}"} \
        >/dev/null 2>&1; then
      echo "$name exists"; exit 0
    fi
    run gcloud compute tpus tpu-vm create "$name" --zone="$zone" ${project[@]+"${project[@]}"} --accelerator-type="$accelerator" \
      --version="${TPU_SOFTWARE_VERSION:-$(runtime_for "$accelerator")}"
    ;;
  setup)
    if [[ ! "$PYTHON_VERSION" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]]; then
      echo "error: PYTHON_VERSION=$PYTHON_VERSION; allowed: 3.11 or newer (jax >= 0.10 needs it)" >&2; exit 2
    fi
    root="$(cd "$(dirname "$0")/.." && pwd)"
    tarball="${TMPDIR:-/tmp}/diffusion_lm-$name.tgz"
    run tar -czf "$tarball" -C "$root" --exclude=./.git --exclude=./runs --exclude=./build --exclude=./dist \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.benchmarks .
    run gcloud compute tpus tpu-vm scp --zone="$zone" ${project[@]+"${project[@]}"} --worker=all "$tarball" "$name":diffusion_lm.tgz
    ssh_all "$name" "$zone" "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/diffusion_lm.tgz -C ~/$REMOTE_DIR && rm ~/diffusion_lm.tgz \
&& python3 -m pip install --user --quiet --upgrade uv \
&& ~/.local/bin/uv venv --allow-existing --python $PYTHON_VERSION ~/$VENV \
&& cd ~/$REMOTE_DIR && ~/.local/bin/uv pip install --quiet --python ~/$VENV/bin/python -e '.[tpu,gcs]'"
    ;;
  train)
    config="${4:?CONFIG required}"
    workdir="${5:?WORKDIR (shared by all workers, e.g. gs://BUCKET/runs/x) required}"
    shift 5
    if [[ "$workdir" != gs://* ]]; then
      echo "warning: WORKDIR=$workdir is not gs://...; every worker of a pod must see the same workdir" >&2
    fi
    extra=""
    if (( $# )); then extra="$(printf ' %q' "$@")"; fi
    train="~/$VENV/bin/python -m diffusion_lm.train --config=$config --workdir=$workdir --distributed$extra"
    if [[ "${BACKGROUND:-0}" == 1 ]]; then
      ssh_all "$name" "$zone" "cd ~/$REMOTE_DIR && nohup $train > train.log 2>&1 < /dev/null &"
    else
      ssh_all "$name" "$zone" "cd ~/$REMOTE_DIR && $train"
    fi
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" ${project[@]+"${project[@]}"} --quiet
    ;;
  *)
    echo "error: unknown command '$cmd'; allowed: create, setup, train, delete" >&2; exit 2;;
esac
