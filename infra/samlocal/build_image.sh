#!/usr/bin/env bash
# `make sam-image`: the Docker engine and the python3.12 Lambda base image that `sam local` runs, built here.
#
# Nothing can be pulled on these machines, so the image SAM asks for (public.ecr.aws/lambda/python:3.12-x86_64)
# is made locally: a Debian rootfs from Debian's archive (debootstrap), this machine's CPython 3.12 copied to
# /var/lang, awslambdaric and boto3 from PyPI in /var/runtime, and the bootstrap + entry point beside this file.
# Idempotent: the image carries a hash of its recipe; it is rebuilt (and SAM's derived images with it)
# only when the recipe or the interpreter changes. Installs and starts the engine when absent (needs root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=${SAM_BASE_IMAGE:-public.ecr.aws/lambda/python:3.12-x86_64}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "sam-image: $*" >&2; }

ensure_engine() {
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    log "installing docker.io and debootstrap from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    nohup dockerd >/var/log/minichat-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && return 0
      sleep 0.5
    done
    log "dockerd did not start (see /var/log/minichat-dockerd.log)"
    exit 1
  fi
}

ensure_engine
python312=$("${PYTHON:-python3}" -c 'import runpy; print(runpy.run_path("'"$root"'/infra/deploy/build_artifacts.py")["python312"]())')
prefix=$("$python312" -c 'import sys; print(sys.base_prefix)')
version=$("$python312" -c 'import platform; print(platform.python_version())')
recipe=$(cat "$here/build_image.sh" "$here/Dockerfile" "$here/bootstrap" "$here/lambda-entrypoint.sh" \
  "$here/runtime-requirements.txt" <(echo "$version $prefix $suite") | sha256sum | cut -c1-16)

if [[ $(docker image inspect "$tag" --format '{{ index .Config.Labels "minichat.recipe" }}' 2>/dev/null) == "$recipe" ]]; then
  log "$tag is current ($recipe)"
  exit 0
fi

work=$(mktemp -d /var/tmp/minichat-lambda-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
log "debootstrap $suite into $rootfs"
# The libraries CPython's extension modules link against, and CA certificates for TLS to AWS.
debootstrap --variant=minbase \
  --include=ca-certificates,libssl3,libffi8,libsqlite3-0,zlib1g,libbz2-1.0,liblzma5,libreadline8,libncursesw6,libexpat1,libuuid1,libgdbm6 \
  "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

log "CPython $version from $prefix into /var/lang"
mkdir -p "$rootfs/var/lang" "$rootfs/var/runtime" "$rootfs/var/task" "$rootfs/opt"
tar -C "$prefix" \
  --exclude='lib/python3.12/test' --exclude='lib/python3.12/idlelib' --exclude='lib/python3.12/tkinter' \
  --exclude='lib/python3.12/site-packages/*' --exclude='__pycache__' --exclude='*.a' \
  -cf - bin lib include | tar -C "$rootfs/var/lang" -xf -

log "awslambdaric and boto3 into /var/runtime"
PIP_ROOT_USER_ACTION=ignore "$python312" -m pip install -q --disable-pip-version-check --no-compile \
  --target "$rootfs/var/runtime" -r "$here/runtime-requirements.txt" >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; exit 1; }
install -m 0755 "$here/bootstrap" "$rootfs/var/runtime/bootstrap"
install -m 0755 "$here/lambda-entrypoint.sh" "$rootfs/lambda-entrypoint.sh"

log "docker import + build $tag"
tar -C "$rootfs" -c . | docker import - "minichat/lambda-rootfs:$recipe" >/dev/null
docker build -q -t "$tag" --build-arg "ROOTFS=minichat/lambda-rootfs:$recipe" --build-arg "RECIPE=$recipe" \
  "$here" >/dev/null 2>"$work/build.log" || { cat "$work/build.log" >&2; exit 1; }
# SAM derives an image (its emulator added) from the base; a stale one would keep the old base.
docker images --format '{{.Repository}}:{{.Tag}}' | grep '^samcli/lambda-python' | xargs -r docker rmi -f >/dev/null 2>&1 || true
docker image prune -f >/dev/null 2>&1 || true
log "$tag built ($recipe)"
