#!/usr/bin/env bash
# Side-by-side FP32 latency: `osprey bench` vs onnxruntime on the shared models,
# same thread counts, same iteration counts, in one run. Prints a markdown table
# with the ratio (osprey median / onnxruntime median; < 1 means osprey is faster).
#
# usage: scripts/bench-vs-onnxruntime.sh [--iterations N] [--threads "1 2"] [--models DIR]
# Needs: python3 with venv, network access to PyPI on first run (onnxruntime, numpy).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
iterations=30
threads="1 2"
models="$root/../shared/models"
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -d "$models" ] || { echo "models folder $models not found (../shared/models)" >&2; exit 1; }

venv="$root/.venv-bench"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "onnxruntime==1.32.0" numpy
fi
(cd "$root" && cargo build --release -q -p osprey-daemon --bin osprey)
osprey="$root/target/release/osprey"

# model file stem and the input shape used for the dynamic-shape models
declare -A shape=(
  [efficientnet_lite0]=""
  [centernet_mbv3_coco_512]=""
  [ppocr_cls_v2]="x=1,3,48,192"
  [ppocr_det_v4]="x=1,3,640,640"
)
order="efficientnet_lite0 centernet_mbv3_coco_512 ppocr_cls_v2 ppocr_det_v4"

echo "| model | threads | osprey median ms | onnxruntime median ms | ratio (osprey/ort) | osprey p99 ms | ort p99 ms |"
echo "|---|---|---|---|---|---|---|"
for m in $order; do
  f="$models/$m.onnx"
  [ -f "$f" ] || { echo "| $m | - | missing | | | | |"; continue; }
  sh_args=()
  [ -n "${shape[$m]}" ] && sh_args=(--input-shape "${shape[$m]}")
  for t in $threads; do
    o=$("$osprey" bench --onnx "$f" "${sh_args[@]}" --threads "$t" --iterations "$iterations" --warmup 5 --json)
    r=$("$venv/bin/python" "$root/scripts/ort_bench.py" --onnx "$f" "${sh_args[@]}" --threads "$t" --iterations "$iterations" --warmup 5)
    "$venv/bin/python" - "$m" "$t" "$o" "$r" <<'PY'
import json, sys
m, t, o, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
om, rm = o["latency_ms"]["median"], r["latency_ms"]["median"]
print(f"| {m} | {t} | {om:.2f} | {rm:.2f} | {om/rm:.2f} | {o['latency_ms']['p99']:.2f} | {r['latency_ms']['p99']:.2f} |")
PY
  done
done
