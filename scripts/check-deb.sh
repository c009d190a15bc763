#!/usr/bin/env bash
# Installs an osprey .deb on this (disposable, root) machine and checks it:
# the files are where the unit expects them, postinst created the user,
# `systemd-analyze verify` accepts the installed unit, the default config
# parses, a missing config exits 78 (EX_CONFIG, which the unit does not
# restart), then purges the package again.
# usage: scripts/check-deb.sh osprey_VERSION_amd64.deb
set -euo pipefail
deb=$1
trap 'dpkg --purge osprey >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb" >/dev/null
for f in /usr/bin/ospreyd /usr/bin/osprey /lib/systemd/system/ospreyd.service \
         /etc/osprey/ospreyd.toml /usr/share/osprey/models/centernet_mbv3_coco_512.toml \
         /usr/share/osprey/models/centernet_mbv3_coco_512.onnx; do
  [ -e "$f" ] || { echo "missing after install: $f" >&2; exit 1; }
done
id osprey >/dev/null || { echo "postinst did not create the osprey user" >&2; exit 1; }
[ "$(stat -c %U /var/lib/osprey)" = osprey ] || { echo "/var/lib/osprey is not the osprey user's" >&2; exit 1; }
systemd-analyze verify /lib/systemd/system/ospreyd.service
echo "systemd-analyze verify: ospreyd.service OK"
grep -q '^RestartPreventExitStatus=78' /lib/systemd/system/ospreyd.service
set +e
/usr/bin/ospreyd --config /etc/osprey/missing.toml 2>/tmp/ospreyd-missing.log
code=$?
set -e
if [ "$code" != 78 ]; then
  echo "a missing config exited $code, expected 78" >&2
  exit 1
fi
echo "missing config -> exit 78: $(tail -n1 /tmp/ospreyd-missing.log)"
# The shipped config parses (its engine is built on the robot, so --check
# stops at loading it, naming the file).
set +e
out=$(/usr/bin/ospreyd --check --config /etc/osprey/ospreyd.toml 2>&1)
code=$?
set -e
echo "$out" | grep -q "centernet_mbv3_coco_512.engine" || { echo "unexpected --check output: $out" >&2; exit 1; }
echo "default config parses; --check names the engine to build: ok (exit $code)"
/usr/bin/osprey --version
echo "package checks passed: $deb"
