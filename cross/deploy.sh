#!/usr/bin/env bash
# Deploys the osprey Debian package to a Jetson over ssh: copies the .deb,
# keeps the installed one for roll-back, installs, builds the engine on the
# board if it is missing (tactics are timed on the device), restarts
# ospreyd and shows its status. Roll back with `cross/deploy.sh --rollback`.
#
# usage: cross/deploy.sh USER@BOARD [PACKAGE.deb]
#        cross/deploy.sh --rollback USER@BOARD
set -euo pipefail
if [ "${1:-}" = --rollback ]; then
  board=${2:?usage: cross/deploy.sh --rollback USER@BOARD}
  ssh "$board" 'set -e
    prev=$(ls -t /var/lib/osprey/packages/osprey_*.deb 2>/dev/null | sed -n 2p)
    [ -n "$prev" ] || { echo "no previous package on the board" >&2; exit 1; }
    sudo dpkg -i "$prev"
    sudo systemctl restart ospreyd
    systemctl --no-pager status ospreyd | head -n 5'
  exit 0
fi
board=${1:?usage: cross/deploy.sh USER@BOARD [PACKAGE.deb]}
deb=${2:-$(ls -t target/deb/osprey_*_arm64.deb 2>/dev/null | head -n1)}
[ -f "$deb" ] || { echo "no arm64 package: build one (see cross/README.md)" >&2; exit 1; }
dpkg-deb --field "$deb" Architecture | grep -qx arm64 || { echo "$deb is not an arm64 package" >&2; exit 1; }
name=$(basename "$deb")
scp "$deb" "$board:/tmp/$name"
ssh "$board" "set -e
  sudo install -d /var/lib/osprey/packages
  sudo mv /tmp/$name /var/lib/osprey/packages/$name
  sudo dpkg -i /var/lib/osprey/packages/$name
  engine=/var/lib/osprey/centernet_mbv3_coco_512.engine
  if [ ! -f \$engine ]; then
    sudo -u osprey osprey build --onnx /usr/share/osprey/models/centernet_mbv3_coco_512.onnx --out \$engine
  fi
  sudo systemctl enable ospreyd >/dev/null
  sudo systemctl restart ospreyd
  systemctl --no-pager status ospreyd | head -n 5
  osprey doctor || true"
echo "deployed $name to $board (roll back: cross/deploy.sh --rollback $board)"
