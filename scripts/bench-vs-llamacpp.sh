#!/usr/bin/env bash
# Side-by-side LLM speed on the same GGUF file (SmolLM2-135M-Instruct Q4_1,
# fetched by scripts/fetch-llm.sh): osprey (`osprey chat --raw --json`)
# and llama.cpp (llama-cpp-python from PyPI, built from source in a venv on
# first run: ~15 minutes on 2 cores). For each thread count: prompt
# processing of a ~512-token prompt and greedy decoding of 128 tokens,
# --rounds rounds alternating the two (A B A B ...) so machine drift
# cancels in the per-round ratios. Prints a markdown table (medians of the
# rounds; ratio = osprey / llama.cpp, > 1 means osprey is faster) and the
# decode memory-bandwidth bound: bytes read per token (weights; weights
# plus KV cache) / measured copy bandwidth.
#
# usage: scripts/bench-vs-llamacpp.sh [--rounds N] [--threads "1 2"] [--exact]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=5
threads="1 2"
gen=128
mode=("--int8-activations" "--kv-f16")
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --exact) mode=(); shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
model=$(bash "$root/scripts/fetch-llm.sh")
venv="$root/.venv-llamacpp"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check numpy
  echo "building llama-cpp-python from source (once) ..." >&2
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q --disable-pip-version-check "llama-cpp-python==0.3.36"
fi
(cd "$root" && cargo build --release -q -p osprey-daemon --bin osprey)
osprey="$root/target/release/osprey"
out="$root/bench-out"
mkdir -p "$out"
prompt="$out/llm-prompt.txt"
# ~512 tokens of technician text.
python3 - "$prompt" <<'PY'
import sys
line = "Field technicians inspect the lidar, the wheel encoders, the motors and the wiring harness before each mission. "
open(sys.argv[1], "w").write((line * 40)[:2602])
PY
med() { python3 -c "import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.1f}')" "$@"; }
med2() { python3 -c "import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.2f}')" "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }
echo "| threads | osprey prefill tok/s | llama.cpp prefill tok/s | ratio | osprey decode tok/s | llama.cpp decode tok/s | ratio | prompt tokens (osprey / llama.cpp) |"
echo "|---|---|---|---|---|---|---|---|"
for t in $threads; do
  op=(); od=(); lp=(); ld=(); rp=(); rd=()
  for r in $(seq "$rounds"); do
    o=$("$osprey" chat --model "$model" --raw --prompt "$(cat "$prompt")" --max-tokens "$gen" --ignore-eos --json --threads "$t" "${mode[@]}")
    l=$("$venv/bin/python" "$root/scripts/llamacpp_bench.py" "$model" "$t" "$prompt" "$gen")
    a=$(echo "$o" | field prefill_tok_s); b=$(echo "$l" | field prefill_tok_s)
    c=$(echo "$o" | field decode_tok_s); d=$(echo "$l" | field decode_tok_s)
    op+=("$a"); lp+=("$b"); od+=("$c"); ld+=("$d")
    rp+=("$(python3 -c "print($a/$b)")"); rd+=("$(python3 -c "print($c/$d)")")
    otok=$(echo "$o" | field prompt_tokens); ltok=$(echo "$l" | field prompt_tokens)
  done
  echo "| $t | $(med "${op[@]}") | $(med "${lp[@]}") | $(med2 "${rp[@]}") | $(med "${od[@]}") | $(med "${ld[@]}") | $(med2 "${rd[@]}") | $otok / $ltok |"
  last_t=$t; last_od=$(med "${od[@]}"); last_ld=$(med "${ld[@]}")
done
# Bandwidth bound for decoding: bytes read per token over the machine's
# copy bandwidth (numpy copy of 512 MiB, best of 5). Two numerators: the
# weights alone, and the weights plus the KV cache a step reads (every
# cached position, on average the prompt plus half the generated tokens).
info=$("$osprey" chat --model "$model" --raw --prompt "x" --max-tokens 1 --json --threads 1 "${mode[@]}")
bytes=$(echo "$info" | field weight_bytes_per_token)
kvpos=$(echo "$info" | field kv_bytes_per_position)
bw=$("$venv/bin/python" - <<'PY'
import time, numpy as np
a = np.ones(512 << 18, dtype=np.float32); b = np.empty_like(a)
best = 0
for _ in range(5):
    t = time.perf_counter(); np.copyto(b, a); dt = time.perf_counter() - t
    best = max(best, 2 * a.nbytes / dt)
print(best)
PY
)
python3 - "$bytes" "$bw" "$kvpos" "$otok" "$gen" "$last_t" "$last_od" "$last_ld" <<'PY'
import sys
b, bw, kvpos, ptok, gen = (float(v) for v in sys.argv[1:6])
t, od, ld = sys.argv[6], float(sys.argv[7]), float(sys.argv[8])
kv = kvpos * (ptok + gen / 2)
print(f"\nweights read per token: {b/2**20:.1f} MiB; copy bandwidth {bw/1e9:.1f} GB/s (read+write); decode bound {bw/b:.0f} tok/s")
print(f"with the KV cache a step reads ({kv/2**20:.1f} MiB at {ptok + gen/2:.0f} positions on average): {bw/(b+kv):.0f} tok/s")
print(f"at {t} threads: osprey {100*od*b/bw:.0f}% / {100*od*(b+kv)/bw:.0f}% of the two bounds, llama.cpp {100*ld*b/bw:.0f}% / {100*ld*(b+kv)/bw:.0f}%")
PY
