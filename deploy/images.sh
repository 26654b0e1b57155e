#!/usr/bin/env bash
# make image: every image built on a local engine with no image registry, from the Dockerfiles users get.
#   1. modalink-debian:bookworm  a Debian base made by mmdebstrap from apt's own mirror (kept once made)
#   2. modalink-base             the root Dockerfile (BASE=that base; torch from the local CPU wheel)
#   3. modalink-{encoder,gateway,llm,worker}  services/<name>/Dockerfile on top of it
#   4. modalink-redis            deploy/redis.Dockerfile (Debian's redis-server), for the chart and compose
# TAG (default latest) tags them all; BASE=python:3.11-slim-bookworm skips step 1 where a registry is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-latest}
DEBIAN_BASE=modalink-debian:bookworm
BASE=${BASE:-$DEBIAN_BASE}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
t0=$SECONDS
say() { printf '[image %4ds] %s\n' $((SECONDS - t0)) "$*"; }

bash deploy/engine.sh

if [ "$BASE" = "$DEBIAN_BASE" ] && ! docker image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null || {
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mmdebstrap >/dev/null; }
  # the mirror apt on this machine uses (deb822 URIs: or a one-line `deb URL suite` entry)
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}')
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  say "base: mmdebstrap bookworm from $mirror"
  tar=$(mktemp -d)/base.tar
  $SUDO mmdebstrap --quiet --variant=minbase --include=python3.11,python3.11-venv,libpython3.11,ca-certificates \
    bookworm "$tar" "$mirror"
  docker import "$tar" "$DEBIAN_BASE" >/dev/null
  rm -rf "$(dirname "$tar")"
fi

# build/image-extra (the build stage's /tmp/extra): the local torch CPU wheel pip's find-links names, and the CA
# bundle pip trusts (a private CA in front of the index is invisible to a container otherwise)
extra=build/image-extra
rm -rf "$extra" && mkdir -p "$extra"
args=(--network host --build-arg "BASE=$BASE")
links=$(pip config get global.find-links 2>/dev/null || true)
for dir in ${PIP_FIND_LINKS:-} $links; do
  wheel=$(ls "$dir"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    cp -l "$wheel" "$extra/" 2>/dev/null || cp "$wheel" "$extra/"
    args+=(--build-arg "TORCH_WHEEL=/tmp/extra/$(basename "$wheel")")
    break
  fi
done
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cp "$cert" "$extra/ca.crt"
  args+=(--build-arg PIP_CERT=/tmp/extra/ca.crt)
fi

say "modalink-base:$TAG (from $BASE; ${args[*]:2})"
docker build "${args[@]}" -t "modalink-base:$TAG" .
for svc in encoder gateway llm worker; do
  say "modalink-$svc:$TAG"
  docker build -q --network host --build-arg "BASE_IMAGE=modalink-base:$TAG" -t "modalink-$svc:$TAG" \
    - < "services/$svc/Dockerfile" >/dev/null
done
say "modalink-redis:$TAG"
docker build -q --network host --build-arg "BASE=$BASE" -t "modalink-redis:$TAG" - < deploy/redis.Dockerfile >/dev/null
rm -rf "$extra"
say "done"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E "^modalink-" | sort
