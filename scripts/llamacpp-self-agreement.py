#!/usr/bin/env python3
"""How well does llama.cpp agree with its own reference?

The teacher-forced references in ../shared/fixtures/reference/llm were made
by an AVX-512 build of llama.cpp (llama-cpp-python 0.3.36). This runs the
llama.cpp built on *this* machine (scripts/bench-vs-llamacpp.sh builds it
into .venv-llamacpp) over the same texts, with its default settings and two
variants, and prints the argmax agreement with the reference and the largest
logit difference on the reference's sample rows: the bar an independent
engine can be held to.

usage: .venv-llamacpp/bin/python scripts/llamacpp-self-agreement.py [MODEL.gguf] [SHARED_DIR]
"""
import json
import os
import sys

import llama_cpp
import numpy as np

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
model = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.cache/osprey/llm/SmolLM2-135M-Instruct.Q4_1.gguf")
shared = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "..", "shared")
ref = json.load(open(os.path.join(
    shared, "fixtures/reference/llm/smollm2_llamacpp_reference.json")))

variants = [
    ("default (f16 KV cache)", {}),
    ("KV cache in f32", {"type_k": 0, "type_v": 0}),
    ("flash attention", {"flash_attn": True}),
]
print("| llama.cpp on this machine | argmax agreement with the reference | max logit diff, first 8 positions |")
print("|---|---|---|")
for name, kw in variants:
    m = llama_cpp.Llama(model, n_ctx=256, logits_all=True, verbose=False, n_threads=2, **kw)
    agree = total = 0
    worst = 0.0
    for case in ref["teacher_forced"]:
        ids = case["ids"]
        m.reset()
        m.eval(ids)
        logits = np.array(m.scores[: len(ids)])
        agree += int((logits.argmax(1) == np.array(case["argmax_next"])).sum())
        total += len(ids)
        sample = np.array(case["logits_first8_rows_sample"])
        worst = max(worst, float(np.abs(logits[: len(sample), : sample.shape[1]] - sample).max()))
    print(f"| {name} | {agree}/{total} = {agree / total:.3f} | {worst:.3f} |")
