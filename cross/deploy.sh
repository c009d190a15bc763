#!/usr/bin/env bash
# Copies the aarch64 osprey binary to a Jetson over ssh, keeping the previous
# one for roll-back, then runs `osprey doctor` on the board.
# usage: cross/deploy.sh USER@BOARD [BINARY]
set -euo pipefail
board=${1:?usage: cross/deploy.sh USER@BOARD [BINARY]}
bin=${2:-target/aarch64-unknown-linux-gnu/release/osprey}
[ -x "$bin" ] || { echo "$bin not found: build it first (see cross/README.md)" >&2; exit 1; }
file "$bin" | grep -q 'ARM aarch64' || { echo "$bin is not an aarch64 binary" >&2; exit 1; }
scp "$bin" "$board:/tmp/osprey.new"
ssh "$board" 'set -e
  if [ -x /usr/local/bin/osprey ]; then sudo cp /usr/local/bin/osprey /usr/local/bin/osprey.prev; fi
  sudo install -m 0755 /tmp/osprey.new /usr/local/bin/osprey
  rm -f /tmp/osprey.new
  osprey doctor || true'
echo "deployed to $board (roll back: sudo mv /usr/local/bin/osprey.prev /usr/local/bin/osprey)"
