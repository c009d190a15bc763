#!/usr/bin/env bash
# INT8 engines against our FP32 engines, side by side in one run.
# For each model (EfficientNet-Lite0, CenterNet): calibrate on
# ../shared/fixtures/images (entropy), then per thread count build
#   * fp32        `osprey build`
#   * int8        `osprey build --precision int8` (INT8 timed as a tactic:
#                 each layer takes INT8 only where it was faster)
#   * int8-strict the same with --strict-int8 (every permitted layer INT8)
#   * strict+dw   --strict-int8 --int8-depthwise (depthwise layers INT8 too,
#                 so whole blocks pass INT8 tensors)
#   * qdq         our engine built from onnxruntime's QDQ model below (no
#                 calibration cache: the scales come from its QDQ nodes)
#   * ort-int8    the same ONNX model quantized by onnxruntime.quantization
#                 (quantize_static, QDQ, per-channel INT8 weights, its
#                 default U8 activations and MinMax calibration) on the same
#                 fixture images (their preprocessed tensors,
#                 ../shared/fixtures/reference/<model>__*__input.npy), run by
#                 onnxruntime 1.32.0 (scripts/ort_bench.py, same threads)
# and time them in alternating rounds (A B C D A B C D ...).
# Prints a markdown table: medians of the per-round medians, and ratios
# (median of per-round ratios): int8/fp32 (ours) and int8/ort-int8.
# Needs: python3 with venv and PyPI access on first run (onnxruntime, onnx, numpy).
#
# usage: scripts/bench-int8.sh [--iterations N] [--rounds R] [--threads "1 2"] [--models "efficientnet_lite0 centernet_mbv3_coco_512"]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
iterations=30
rounds=3
threads="1 2"
models="efficientnet_lite0 centernet_mbv3_coco_512"
shared="$root/../shared"
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -d "$shared/models" ] || { echo "$shared/models not found (../shared)" >&2; exit 1; }
venv="$root/.venv-bench"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c "import onnxruntime, onnx, numpy" 2>/dev/null \
  || "$venv/bin/pip" install -q --disable-pip-version-check "onnxruntime==1.32.0" "onnx==1.23.2" numpy
cargo build --release -q -p osprey-daemon --bin osprey
osprey="$root/target/release/osprey"
out="$root/bench-out/int8"
mkdir -p "$out"
per=$(( (iterations + rounds - 1) / rounds ))
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "| model | threads | fp32 ms | int8 ms | int8-strict ms | strict+dw ms | qdq ms | ort-int8 ms | int8/fp32 | strict/fp32 | strict+dw/fp32 | int8/ort-int8 | strict+dw/ort-int8 | qdq/ort-int8 | INT8 layers (tuned/strict/+dw) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for m in $models; do
  onnx="$shared/models/$m.onnx"; desc="$root/models/zoo/$m.toml"; imgs="$shared/fixtures/images"
  "$osprey" calibrate --onnx "$onnx" --images "$imgs" --model-desc "$desc" --out "$out/$m.calib" >/dev/null 2>&1
  "$venv/bin/python" "$root/scripts/ort_quantize.py" --onnx "$onnx" --out "$out/$m.ort-int8.onnx" \
    --npy "$shared"/fixtures/reference/"$m"__*__input.npy 2>/dev/null
  for t in $threads; do
    "$osprey" build --onnx "$onnx" --out "$out/$m.t$t.fp32.engine" --threads "$t" --timing-cache "$out/timing.cache" >/dev/null
    common=(--onnx "$onnx" --precision int8 --calib "$out/$m.calib" --images "$imgs" --model-desc "$desc" --threads "$t" --timing-cache "$out/timing.cache" --json)
    tuned=$("$osprey" build "${common[@]}" --out "$out/$m.t$t.int8.engine" 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print(sum(l['tactic'].startswith('int8') for l in d['layers']))")
    "$osprey" build --onnx "$out/$m.ort-int8.onnx" --precision int8 --threads "$t" --timing-cache "$out/timing.cache" \
      --out "$out/$m.t$t.qdq.engine" --json >/dev/null 2>&1
    strict=$("$osprey" build "${common[@]}" --strict-int8 --out "$out/$m.t$t.int8s.engine" 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print(sum(l['tactic'].startswith('int8') for l in d['layers']))")
    withdw=$("$osprey" build "${common[@]}" --strict-int8 --int8-depthwise --out "$out/$m.t$t.int8dw.engine" 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print(sum(l['tactic'].startswith('int8') for l in d['layers']))")
    : > "$out/f"; : > "$out/q"; : > "$out/s"; : > "$out/w"; : > "$out/o"; : > "$out/d"; : > "$out/rq"; : > "$out/rs"; : > "$out/rw"; : > "$out/ro"; : > "$out/rd"; : > "$out/rwo"
    for r in $(seq "$rounds"); do
      for e in fp32 int8 int8s int8dw qdq; do
        # Output to a file first: piped, the parser's interpreter would start
        # while osprey times and take a core from it (at 2 threads on 2 cores
        # that made short INT8 runs 2-3x slower than they are).
        "$osprey" bench --engine "$out/$m.t$t.$e.engine" --threads "$t" --iterations "$per" --warmup 3 --json > "$out/cur.$e.json"
        python3 -c "import json,sys; print(json.load(sys.stdin)['latency_ms']['median'])" < "$out/cur.$e.json" > "$out/cur.$e"
      done
      "$venv/bin/python" "$root/scripts/ort_bench.py" --onnx "$out/$m.ort-int8.onnx" --threads "$t" \
        --iterations "$per" --warmup 3 > "$out/cur.ort.json"
      python3 -c "import json,sys; print(json.load(sys.stdin)['latency_ms']['median'])" < "$out/cur.ort.json" > "$out/cur.ort"
      f=$(cat "$out/cur.fp32"); q=$(cat "$out/cur.int8"); s=$(cat "$out/cur.int8s"); w=$(cat "$out/cur.int8dw"); o=$(cat "$out/cur.ort"); dq=$(cat "$out/cur.qdq")
      echo "$f" >> "$out/f"; echo "$q" >> "$out/q"; echo "$s" >> "$out/s"; echo "$w" >> "$out/w"; echo "$o" >> "$out/o"; echo "$dq" >> "$out/d"
      python3 -c "print($w/$f)" >> "$out/rw"
      python3 -c "print($w/$o)" >> "$out/rwo"
      python3 -c "print($dq/$o)" >> "$out/rd"
      python3 -c "print($q/$f)" >> "$out/rq"; python3 -c "print($s/$f)" >> "$out/rs"; python3 -c "print($q/$o)" >> "$out/ro"
    done
    printf "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %s / %s / %s |\n" "$m" "$t" \
      "$(median < "$out/f")" "$(median < "$out/q")" "$(median < "$out/s")" "$(median < "$out/w")" "$(median < "$out/d")" "$(median < "$out/o")" \
      "$(median < "$out/rq")" "$(median < "$out/rs")" "$(median < "$out/rw")" "$(median < "$out/ro")" "$(median < "$out/rwo")" "$(median < "$out/rd")" "$tuned" "$strict" "$withdw"
  done
done
