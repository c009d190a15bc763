#!/usr/bin/env bash
# Fails if a binary needs a glibc newer than the given version (default 2.35,
# Ubuntu 22.04 / JetPack 6). Reads the binary's versioned symbol needs.
# usage: scripts/check-glibc.sh BINARY [MAX_VERSION]
set -euo pipefail
bin=$1
max=${2:-2.35}
objdump=objdump
command -v aarch64-linux-gnu-objdump >/dev/null 2>&1 && objdump=aarch64-linux-gnu-objdump
need=$("$objdump" -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)
if [ -z "$need" ]; then
  echo "$bin: no versioned glibc symbols found" >&2
  exit 1
fi
highest=$(printf '%s\n%s\n' "$need" "$max" | sort -V | tail -n1)
if [ "$highest" != "$max" ]; then
  echo "$bin needs GLIBC_$need, newer than the target's $max" >&2
  exit 1
fi
echo "$bin: needs at most GLIBC_$need (target allows $max)"
