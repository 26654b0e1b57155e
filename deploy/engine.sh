#!/usr/bin/env bash
# A Docker engine for `make image` / `make image-test`: uses the running one, or installs Debian's docker.io and
# starts dockerd without a bridge network (containers run with --network host only; no systemd needed).
# Fails with a clear message when no engine can run here: image-test never skips silently.
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
# Compose for docker-compose.host.yml (image-test): the v2 plugin when present, else Debian's docker-compose 1.29
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  echo "engine: installing Debian's docker-compose"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null
fi
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null; then
  echo "engine: installing Debian's docker.io"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io >/dev/null
fi
log=${TMPDIR:-/tmp}/modalink-dockerd.log
echo "engine: starting dockerd --bridge=none --iptables=false (log: $log)"
$SUDO setsid nohup dockerd --bridge=none --iptables=false >"$log" 2>&1 < /dev/null &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && { echo "engine: $(docker version --format 'server {{.Server.Version}}')"; exit 0; }
  sleep 1
done
echo "engine: dockerd did not come up in 60 s; the last lines of $log:" >&2
tail -20 "$log" >&2
exit 1
