#!/usr/bin/env python3
"""Perplexity of llama.cpp (through llama-cpp-python) on one window of a text, scored exactly
as `kvq eval` scores it: teacher-forced, every position predicting the next token, f16 KV
cache. Prints JSON. Compare with the reference row of `kvq eval --json`.

    python3 -m pip install llama-cpp-python numpy   # builds llama.cpp from source
    python3 bench/llamacpp_perplexity.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text texts/gpl-3.0.txt --ctx 2048
"""
import argparse
import json

import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    llm = Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, n_ubatch=512,
                logits_all=True, n_threads=a.threads, verbose=False)
    text = open(a.text, encoding="utf-8").read()
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    window = ids[a.offset:a.offset + a.ctx]
    if len(window) < a.ctx:
        raise SystemExit(f"text has {len(ids)} tokens; offset+ctx do not fit")
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[:len(window)], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    nll = logz[:-1] - logits[np.arange(len(window) - 1), window[1:]]
    print(json.dumps({
        "engine": "llama.cpp",
        "text": a.text,
        "ctx": a.ctx,
        "offset": a.offset,
        "positions": len(window) - 1,
        "perplexity": float(np.exp(nll.mean())),
        "first_tokens": window[:8],
    }))


if __name__ == "__main__":
    main()
