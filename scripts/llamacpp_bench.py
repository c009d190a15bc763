#!/usr/bin/env python3
"""One llama.cpp measurement (llama-cpp-python): prompt processing of a
PROMPT_TOKENS-token prompt and greedy decoding of GEN tokens, like
`osprey chat --raw --ignore-eos --json` reports them. Prints one JSON line.

usage: llamacpp_bench.py MODEL.gguf THREADS PROMPT_FILE GEN
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama

model, threads, prompt_file, gen = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
text = open(prompt_file, encoding="utf-8").read()
llm = Llama(model_path=model, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
            n_batch=512, n_ubatch=512, verbose=False)
toks = llm.tokenize(text.encode(), add_bos=False, special=False)
vocab = llm.n_vocab()


def last_argmax():
    """Argmax of the logits of the last evaluated token."""
    return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())


t0 = time.perf_counter()
llm.eval(toks)
t1 = time.perf_counter()
tok = last_argmax()
t2 = time.perf_counter()
for _ in range(gen - 1):
    llm.eval([tok])
    tok = last_argmax()
t3 = time.perf_counter()
print(json.dumps({
    "prompt_tokens": len(toks),
    "prefill_tok_s": len(toks) / (t1 - t0),
    "ttft_ms": (t2 - t0) * 1e3,
    "decode_tok_s": (gen - 1) / (t3 - t2),
}))
