#!/bin/bash
# Builds every image docker-compose.yml uses on a machine that cannot pull from a registry,
# with podman, from bases made on the machine:
#
#   bash docker/build-local.sh
#
# then `docker-compose -f docker-compose.yml -f docker-compose.cpu.yml --profile cpu up -d`
# uses them as they are (no pull, no build). The published Dockerfiles are the ones built;
# only their bases are swapped, through build args:
#   sweeper-rootfs:<recipe>      Debian bookworm minbase + python3 (mmdebstrap, podman import)
#   sweeper-base:local           + a venv on PATH: the stand-in for python:3.x-slim
#   sweeper-base-torch:local     + CPU-only torch: for pytorch/pytorch (CUDA)
#   sweeper-base-postgres:local  + Debian's postgresql: for postgres:16 (same entrypoint contract)
# and the images the compose file names:
#   sweeper:latest (or $SWEEPER_IMAGE), sweeper-mlflow:latest, sweeper-dashboard:latest,
#   sweeper-postgres:latest, sweeper-pgbouncer:latest
#
# Needs: podman, mmdebstrap (only while the rootfs of this recipe is missing), and python3.
# pip inside the builds uses this machine's pip configuration (`pip config list`: index,
# find-links, constraints, CA bundle): the files it names are mounted into the build steps
# (`podman build -v`), read-only, and are in no image.
#
# Idempotent and fast when warm: the rootfs is made only when no image of the same recipe
# exists, and podman's layer cache skips every step whose inputs did not change.
#
# Environment:
#   SWEEPER_IMAGE               tag of the sweeper image [sweeper:latest]
#   SWEEPER_TORCH_REQUIREMENTS  what the torch base installs
#                               [torch==2.13.0+cpu: the CPU wheel here]
#   SWEEPER_DEBIAN_MIRROR       mirror for mmdebstrap [Debian's default]
set -euo pipefail

cd "$(dirname "$0")/.."

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
TORCH_REQUIREMENTS="${SWEEPER_TORCH_REQUIREMENTS:-torch==2.13.0+cpu}"
IMAGE="${SWEEPER_IMAGE:-sweeper:latest}"

log() { printf 'build-local: %s\n' "$*" >&2; }

command -v podman > /dev/null || { log "podman is not installed (apt-get install podman)"; exit 2; }

start=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- 1. the root filesystem, once per recipe ----------------------------------------------------
recipe="mmdebstrap --variant=minbase --include=$PACKAGES $SUITE ${SWEEPER_DEBIAN_MIRROR:-}"
rootfs="localhost/sweeper-rootfs:$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
if podman image exists "$rootfs"; then
    log "$rootfs exists ($recipe)"
else
    command -v mmdebstrap > /dev/null || { log "mmdebstrap is not installed (apt-get install mmdebstrap)"; exit 2; }
    log "making $rootfs: $recipe"
    # shellcheck disable=SC2086  # the mirror is optional
    mmdebstrap --quiet --variant=minbase --include="$PACKAGES" "$SUITE" "$work/rootfs.tar" ${SWEEPER_DEBIAN_MIRROR:-}
    podman import --quiet --message "$recipe" "$work/rootfs.tar" "$rootfs" > /dev/null
    rm -f "$work/rootfs.tar"
fi

# --- 2. this machine's pip configuration, for the build steps only ------------------------------
# `pip config list` prints e.g. global.find-links='/opt/wheels' and :env:.cert='/etc/ssl/...';
# the local files and directories it names (the folder of a file:// index) are mounted at the
# same paths, read-only.
mounts=()
pip_list="$(python3 -m pip config list 2> /dev/null || true)"
PIP_LIST="$pip_list" python3 - "$work/pip.conf" "$work/mounts" <<'EOF'
import os, shlex, sys

keys = ("index-url", "extra-index-url", "find-links", "cert", "constraint", "trusted-host", "default-timeout")
settings = {}
for line in os.environ["PIP_LIST"].splitlines():
    name, _, value = line.partition("=")
    key = name.rpartition(".")[2]
    if key in keys and value:
        settings[key] = shlex.split(value)[0] if value.startswith("'") else value
paths = set()
for value in settings.values():
    for token in value.split():
        # A file:// index (.../simple) links to its files through ../../files: mount its parent.
        path = os.path.dirname(token[len("file://"):].rstrip("/")) if token.startswith("file://") else token
        if path.startswith("/") and os.path.exists(path):
            paths.add(os.path.realpath(path) if os.path.isfile(path) else path)
            if os.path.islink(path) or os.path.realpath(path) != path:
                paths.add(path)
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
with open(sys.argv[2], "w") as f:
    f.write("".join(p + "\n" for p in sorted(paths)))
EOF
mounts+=(-v "$work/pip.conf:/etc/pip.conf:ro")
while IFS= read -r path; do
    # A symlink is mounted as what it points to, at its own path.
    mounts+=(-v "$(realpath "$path"):$path:ro")
done < "$work/mounts"
log "pip configuration for the builds: $(tr '\n' ' ' < "$work/pip.conf")"

build() {  # build TAG DOCKERFILE CONTEXT [podman build args...]
    local tag="$1" dockerfile="$2" context="$3"
    shift 3
    local t0
    t0=$(date +%s)
    podman build --quiet --pull=never --layers "${mounts[@]}" -f "$dockerfile" -t "$tag" "$@" "$context" > /dev/null
    log "$tag ready ($(($(date +%s) - t0)) s)"
}

# --- 3. the bases --------------------------------------------------------------------------------
build sweeper-base:local docker/local/base.Dockerfile docker/local --build-arg ROOTFS="$rootfs"
build sweeper-base-torch:local docker/local/torch.Dockerfile docker/local \
    --build-arg BASE_IMAGE=sweeper-base:local --build-arg TORCH_REQUIREMENTS="$TORCH_REQUIREMENTS"
build sweeper-base-postgres:local docker/local/postgres.Dockerfile docker/local \
    --build-arg BASE_IMAGE=sweeper-base:local

# --- 4. the images of docker-compose.yml, from the published Dockerfiles --------------------------
build sweeper-postgres:latest docker/postgres.Dockerfile docker --build-arg POSTGRES_BASE=sweeper-base-postgres:local
build sweeper-mlflow:latest docker/mlflow.Dockerfile docker --build-arg MLFLOW_BASE_IMAGE=sweeper-base:local
build sweeper-dashboard:latest docker/dashboard.Dockerfile docker --build-arg PYTHON_IMAGE=sweeper-base:local
# Debian's pgbouncer: one apt layer on the local base (no new root filesystem).
build sweeper-pgbouncer:latest docker/pgbouncer.Dockerfile docker --build-arg BASE_IMAGE=sweeper-base:local
build "$IMAGE" docker/worker.Dockerfile . --build-arg BASE_IMAGE=sweeper-base-torch:local

# Images left untagged by earlier builds (the layers still in use stay cached).
podman image prune --force > /dev/null

log "done in $(($(date +%s) - start)) s"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E '/sweeper(-postgres|-pgbouncer|-mlflow|-dashboard)?:latest|/sweeper-base' >&2 || true
