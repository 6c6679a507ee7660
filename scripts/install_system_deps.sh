#!/usr/bin/env bash
# Install the Debian packages the test suite drives for real, when they are missing:
# redis-server (shared state tests), chromium + chromium-driver (browser tests) and prometheus (its promtool
# lints the /metrics output), wrk (the benchmark's load generator for plain HTTP) and postgresql (its initdb and
# postgres binaries start the tests' throw-away clusters, tests/postgres_server.py), docker-compose (parses and
# checks docker-compose.yml without a Docker engine), nginx (runs docker-compose's proxy config in front of two
# real replicas) and kubectl (builds the Kubernetes overlays; the machine
# image has Google's build, Debian's kubernetes-client is the fallback).
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: apt-get not available; missing: ${missing[*]} (the tests that need them will skip)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_system_deps: not root and no sudo; missing: ${missing[*]} (the tests that need them will skip)" >&2
    exit 0
  fi
fi
echo "install_system_deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
