#!/usr/bin/env bash
# Installs the tools the operations tests (tests/deploy.rs) run: promtool and the
# prometheus server, nginx, openssl, systemd-analyze and curl; and libfaketime, which
# tests/clock_step.rs preloads into enrolld to step its clock. Idempotent: when every tool
# is already there it changes nothing and runs no apt-get at all; otherwise it runs
# `apt-get update` once and installs only the missing Debian packages (Debian 12, as root
# or through sudo).
#
# The packages' services (a system nginx on :80, a system prometheus on :9090) are kept
# from starting while they are installed: the tests run their own instances on free
# loopback ports with their own configs.
set -euo pipefail

log() { echo "ops-tools: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# tool on PATH (or in an sbin directory a non-root PATH may lack) -> Debian package
have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ] || [ -x "/sbin/$1" ]
}

missing=()
{ have promtool && have prometheus; } || missing+=(prometheus)
have nginx || missing+=(nginx-light)
have openssl || missing+=(openssl)
have systemd-analyze || missing+=(systemd)
have curl || missing+=(curl)
# The preload library itself (package libfaketime) comes with the `faketime` command.
libfaketime() { compgen -G '/usr/lib/*/faketime/libfaketimeMT.so.1' >/dev/null; }
{ have faketime && libfaketime; } || missing+=(faketime)

if [ "${#missing[@]}" = 0 ]; then
  exit 0
fi

log "installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  # Debian's documented way to keep maintainer scripts from starting services.
  printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
  as_root chmod 0755 "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then as_root rm -f "$policy"; fi; }
trap cleanup EXIT

as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null

for t in promtool prometheus nginx openssl systemd-analyze curl faketime; do
  have "$t" || { log "$t is still missing after installing ${missing[*]}"; exit 1; }
done
libfaketime || { log "libfaketimeMT.so.1 is still missing after installing ${missing[*]}"; exit 1; }
log "ready: promtool prometheus nginx openssl systemd-analyze curl faketime"
