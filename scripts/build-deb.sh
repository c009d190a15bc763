#!/usr/bin/env bash
# Builds the osprey Debian package for one architecture from release
# binaries, with dpkg-deb (no other packaging tool needed):
#   /usr/bin/ospreyd, /usr/bin/osprey
#   /lib/systemd/system/ospreyd.service
#   /etc/osprey/ospreyd.toml                      (conffile: the default config)
#   /usr/share/osprey/models/                     (the bundled CenterNet detector,
#                                                  its description and labels)
#   /usr/share/doc/osprey/                        (README, copyright)
# postinst creates the `osprey` system user (groups video, render).
#
# usage: scripts/build-deb.sh [amd64|arm64]   (default: this machine's)
# Expects target/release/{ospreyd,osprey} (amd64) or
# target/aarch64-unknown-linux-gnu/release/{ospreyd,osprey} (arm64).
# Prints the .deb path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
arch=${1:-$(dpkg --print-architecture)}
case "$arch" in
  amd64) bin=target/release ;;
  arm64) bin=target/aarch64-unknown-linux-gnu/release ;;
  *) echo "unsupported architecture $arch (amd64 or arm64)" >&2; exit 2 ;;
esac
for b in ospreyd osprey; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing: build it first (cargo build --release ...)" >&2; exit 1; }
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
# The newest glibc symbol version the binaries need becomes the dependency.
objdump=objdump
[ "$arch" = arm64 ] && command -v aarch64-linux-gnu-objdump >/dev/null && objdump=aarch64-linux-gnu-objdump
glibc=$("$objdump" -T "$bin/ospreyd" "$bin/osprey" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)
out=target/deb
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
install -D -m 0755 "$bin/ospreyd" "$pkg/usr/bin/ospreyd"
install -D -m 0755 "$bin/osprey" "$pkg/usr/bin/osprey"
strip_tool=strip
[ "$arch" = arm64 ] && strip_tool=aarch64-linux-gnu-strip
if command -v "$strip_tool" >/dev/null; then
  "$strip_tool" --strip-debug "$pkg/usr/bin/ospreyd" "$pkg/usr/bin/osprey"
fi
install -D -m 0644 systemd/ospreyd.service "$pkg/lib/systemd/system/ospreyd.service"
install -D -m 0644 systemd/ospreyd.toml "$pkg/etc/osprey/ospreyd.toml"
for f in centernet_mbv3_coco_512.onnx centernet_mbv3_coco_512.toml coco80_labels.txt PROVENANCE.md; do
  install -D -m 0644 "models/zoo/$f" "$pkg/usr/share/osprey/models/$f"
done
install -D -m 0644 README.md "$pkg/usr/share/doc/osprey/README.md"
install -D -m 0644 cross/README.md "$pkg/usr/share/doc/osprey/DEPLOY.md"
printf 'osprey is licensed under the Apache License 2.0.\nThe bundled model: see /usr/share/osprey/models/PROVENANCE.md\n' \
  > "$pkg/usr/share/doc/osprey/copyright"
mkdir -p "$pkg/DEBIAN"
install -m 0755 debian/postinst debian/prerm debian/postrm "$pkg/DEBIAN/"
echo /etc/osprey/ospreyd.toml > "$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: osprey
Version: $version
Architecture: $arch
Maintainer: osprey developers <osprey@example.invalid>
Section: misc
Priority: optional
Installed-Size: $size
Depends: libc6 (>= $glibc), passwd
Recommends: systemd
Description: real-time inference daemon for robots (perception and onboard assistant)
 ospreyd runs perception CNNs and a small onboard LLM on zenoh topics within
 each camera stream's deadline; osprey builds engines, runs and measures
 models, and talks to a running ospreyd (camera, watch, ask, status, doctor).
 CUDA is loaded at run time when present; no CUDA dependency.
CONTROL
mkdir -p "$out"
deb="$out/osprey_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
echo "$deb"
