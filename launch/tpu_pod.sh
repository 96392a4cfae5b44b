#!/usr/bin/env bash
# nvila-jax on a Cloud TPU pod slice: the same command on every TPU VM worker (one process per host, each
# driving its host's chips), through gcloud (an existing TPU VM) or xpk (a GKE cluster).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a CONFIG=configs/nvila/stage2.py WORKDIR=gs://bucket/runs/s2 \
#     launch/tpu_pod.sh [--config.key=value ...]
#   LAUNCHER=xpk CLUSTER=my-cluster TPU_TYPE=v5p-64 DOCKER_IMAGE=gcr.io/proj/nvila-jax CONFIG=... WORKDIR=... \
#     launch/tpu_pod.sh
#
# Variables:
#   CONFIG, WORKDIR  training config and run directory (WORKDIR must be shared by all hosts: gs:// or NFS)
#   LAUNCHER       gcloud (default) or xpk
#   gcloud:  TPU_NAME, ZONE (required), PROJECT (optional), REPO_DIR (checkout on the VMs, default
#            ~/nvila_jax), VENV (optional, activated on every host), SETUP=1 to `pip install -e` REPO_DIR first
#   xpk:     CLUSTER, TPU_TYPE (e.g. v5p-64), DOCKER_IMAGE (with nvila_jax installed) required;
#            NUM_SLICES (default 1), WORKLOAD (default nvila-<user>-<time>), PROJECT, ZONE optional
#   COMMAND        run something else instead of training (e.g. "nvila-jax eval ...")
#   DRY_RUN=1      print the launch command instead of running it
# jax.distributed is started with NVILA_DISTRIBUTED=on: on TPU VMs JAX finds the hosts by itself.
set -euo pipefail

LAUNCHER="${LAUNCHER:-gcloud}"
if [ -z "${COMMAND:-}" ]; then
  : "${CONFIG:?set CONFIG to a training config (configs/...py)}"
  : "${WORKDIR:?set WORKDIR to a run directory shared by every host}"
  COMMAND="nvila-jax train --config $(printf %q "$CONFIG") --workdir $(printf %q "$WORKDIR")"
  if [ "$#" -gt 0 ]; then
    COMMAND+=" $(printf '%q ' "$@")"
  fi
fi
REMOTE="export NVILA_DISTRIBUTED=on; ${COMMAND}"

run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

case "$LAUNCHER" in
  gcloud)
    : "${TPU_NAME:?set TPU_NAME}"
    : "${ZONE:?set ZONE}"
    REPO_DIR="${REPO_DIR:-~/nvila_jax}"
    PREFIX="cd ${REPO_DIR} && "
    if [ -n "${VENV:-}" ]; then
      PREFIX+=". ${VENV}/bin/activate && "
    fi
    GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
    if [ -n "${PROJECT:-}" ]; then
      GCLOUD+=(--project "$PROJECT")
    fi
    if [ "${SETUP:-0}" = "1" ]; then
      run "${GCLOUD[@]}" --command "${PREFIX}pip install -e ."
    fi
    run "${GCLOUD[@]}" --command "${PREFIX}${REMOTE}"
    ;;
  xpk)
    : "${CLUSTER:?set CLUSTER}"
    : "${TPU_TYPE:?set TPU_TYPE (e.g. v5p-64)}"
    : "${DOCKER_IMAGE:?set DOCKER_IMAGE (an image with nvila_jax installed)}"
    XPK=(xpk workload create --cluster "$CLUSTER" --workload "${WORKLOAD:-nvila-${USER:-user}-$(date +%m%d-%H%M)}"
         --tpu-type "$TPU_TYPE" --num-slices "${NUM_SLICES:-1}" --docker-image "$DOCKER_IMAGE")
    if [ -n "${PROJECT:-}" ]; then
      XPK+=(--project "$PROJECT")
    fi
    if [ -n "${ZONE:-}" ]; then
      XPK+=(--zone "$ZONE")
    fi
    run "${XPK[@]}" --command "$REMOTE"
    ;;
  *)
    echo "tpu_pod.sh: LAUNCHER=$LAUNCHER; expected gcloud or xpk" >&2
    exit 2
    ;;
esac
