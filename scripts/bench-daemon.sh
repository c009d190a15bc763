#!/usr/bin/env bash
# Daemon latency benchmark: frame in (capture time stamped by the camera) to
# detections out on loopback, through the real zenoh topics of
# `ospreyd --demo`, at 30 FPS with a 100 ms deadline — without and with the
# assistant streaming answers the whole time (rounds alternate, so both see
# the same machine noise). Reports the median over rounds of each run's
# p50 / p99 / max, the queue wait, the pipeline (preprocess + engine +
# decode) and the daemon's overhead (end to end - queue - pipeline).
#
#   scripts/bench-daemon.sh [ROUNDS] [SECONDS]      (default 3 rounds of 20 s)
#   OSPREY_BENCH_ONNX / OSPREY_BENCH_DESC choose the model (default
#   EfficientNet-Lite0 from ../shared/models: 19 ms per frame on one core).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
secs=${2:-20}
onnx=${OSPREY_BENCH_ONNX:-../shared/models/efficientnet_lite0.onnx}
desc=${OSPREY_BENCH_DESC:-models/zoo/efficientnet_lite0.toml}
bash scripts/fetch-llm.sh >/dev/null
cargo build --release -q -p osprey-daemon --bins
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  for mode in no-assistant keep-asking; do
    ./target/release/ospreyd --demo --duration "$secs" --fps 30 --deadline-ms 100 \
      --onnx "$onnx" --model-desc "$desc" "--$mode" 2>/dev/null | tail -1 >> "$out/$mode.jsonl"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys, os
out = sys.argv[1]
print(f"{'assistant':<10} {'frames':>7} {'misses':>7} {'dropped':>8} | {'e2e p50':>8} {'p99':>7} {'max':>7} | {'queue p99':>9} | {'pipe p50':>8} | {'overhead p50':>12} {'p99':>6} {'max':>6}")
for mode, label in [("no-assistant", "off"), ("keep-asking", "streaming")]:
    runs = [json.loads(l)["summary"] for l in open(os.path.join(out, mode + ".jsonl"))]
    med = lambda f: statistics.median(f(r) for r in runs)
    print(f"{label:<10} {med(lambda r: r['frames']):>7.0f} {med(lambda r: r['deadline_misses']):>7.0f} {med(lambda r: r['dropped_frames']):>8.0f} | "
          f"{med(lambda r: r['latency_ms']['p50']):>8.2f} {med(lambda r: r['latency_ms']['p99']):>7.2f} {med(lambda r: r['latency_ms']['max']):>7.2f} | "
          f"{med(lambda r: r['queue_ms']['p99']):>9.2f} | {med(lambda r: r['pipeline_ms']['p50']):>8.2f} | "
          f"{med(lambda r: r['overhead_ms']['p50']):>12.3f} {med(lambda r: r['overhead_ms']['p99']):>6.3f} {med(lambda r: r['overhead_ms']['max']):>6.3f}")
    if runs[0].get("assistant"):
        print(f"{'':<10} assistant answers per run: {med(lambda r: r['assistant']['answers']):.0f}, decode {med(lambda r: r['assistant']['decode_tok_s']):.1f} tok/s, first token {med(lambda r: r['assistant']['ttft_ms']):.0f} ms")
print(f"(median over {len(runs)} rounds of {sys.argv[0] and ''}each run's figures, ms)")
PY
