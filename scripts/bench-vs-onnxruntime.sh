#!/usr/bin/env bash
# Side-by-side FP32 latency on the shared models, same thread counts and
# iteration counts, in one run:
#   * osprey from ONNX (imported and fused now, default tactics),
#   * osprey from an engine built by `osprey build` for that thread count
#     (tactics timed on this machine, shared timing cache in bench-out/; the
#     build's --layout auto picks NCHW or channels-last, shown per row),
#   * onnxruntime (graph optimisations ORT_ENABLE_ALL).
# Prints a markdown table; ratio = osprey engine median / onnxruntime median
# (< 1 means osprey is faster). Shared machines drift (we have seen the same
# binary run 1.7x slower a minute later), so each configuration runs in
# --rounds rounds that alternate the three runners (A B C A B C ...), each
# round timing iterations/rounds inferences. The latency columns are medians
# of the per-round medians; the ratio is the median of the per-round ratios,
# each taken between runs seconds apart, which cancels most of the drift.
#
# usage: scripts/bench-vs-onnxruntime.sh [--iterations N] [--threads "1 2"] [--models DIR]
# Needs: python3 with venv, network access to PyPI on first run (onnxruntime, numpy).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
iterations=30
rounds=6
threads="1 2"
models="$root/../shared/models"
while [ $# -gt 0 ]; do
  case "$1" in
    --iterations) iterations=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
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

out="$root/bench-out"
mkdir -p "$out"
echo "| model | threads | osprey onnx median ms | osprey engine median ms | engine layout | onnxruntime median ms | ratio engine/ort (median of per-round ratios) | engine p99 ms | ort p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|"
for m in $order; do
  f="$models/$m.onnx"
  [ -f "$f" ] || { echo "| $m | - | missing | | | | |"; continue; }
  sh_args=()
  [ -n "${shape[$m]}" ] && sh_args=(--input-shape "${shape[$m]}")
  for t in $threads; do
    eng="$out/$m-t$t.engine"
    "$osprey" build --onnx "$f" "${sh_args[@]}" --threads "$t" --out "$eng" --timing-cache "$out/timing-cache.json" --json > "$out/$m-t$t.build.json"
    per=$(( (iterations + rounds - 1) / rounds ))
    o=""; e=""; r=""
    for _ in $(seq "$rounds"); do
      o="$o$("$osprey" bench --onnx "$f" "${sh_args[@]}" --threads "$t" --iterations "$per" --warmup 3 --json)"$'\n'
      e="$e$("$osprey" bench --engine "$eng" --threads "$t" --iterations "$per" --warmup 3 --json)"$'\n'
      r="$r$("$venv/bin/python" "$root/scripts/ort_bench.py" --onnx "$f" "${sh_args[@]}" --threads "$t" --iterations "$per" --warmup 3)"$'\n'
    done
    "$venv/bin/python" - "$m" "$t" "$o" "$e" "$r" "$out/$m-t$t.build.json" <<'PY'
import json, statistics, sys
m, t = sys.argv[1], sys.argv[2]
runs = [[json.loads(l) for l in a.splitlines() if l.strip()] for a in sys.argv[3:6]]
layout = json.load(open(sys.argv[6])).get("layout", {}).get("layout", "?")
med = lambda rs, k: statistics.median(x["latency_ms"][k] for x in rs)
om, em, rm = med(runs[0], "median"), med(runs[1], "median"), med(runs[2], "median")
ratio = statistics.median(e["latency_ms"]["median"] / r["latency_ms"]["median"] for e, r in zip(runs[1], runs[2]))
print(f"| {m} | {t} | {om:.2f} | {em:.2f} | {layout} | {rm:.2f} | {ratio:.2f} | {med(runs[1], 'p99'):.2f} | {med(runs[2], 'p99'):.2f} |")
PY
  done
done
