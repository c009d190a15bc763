#!/usr/bin/env bash
# One command from a fresh machine to osprey running the bundled detector:
# installs Rust if needed, builds in release mode, shows what the model is and
# measures it (trtexec-style report).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v cargo >/dev/null 2>&1; then
  if [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release -p osprey-daemon --bin osprey
model=models/zoo/centernet_mbv3_coco_512.onnx
./target/release/osprey inspect --onnx "$model"
echo
./target/release/osprey bench --onnx "$model" --iterations 20 --warmup 3
