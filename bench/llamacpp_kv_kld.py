#!/usr/bin/env python3
"""Accuracy of llama.cpp's quantized KV caches against its own f16 cache, scored exactly as
`kvq eval` scores kvq's: one window of a text, teacher-forced, and for each of the first
ctx - 1 positions the KL divergence KL(f16 || quantized) of the next-token distributions, its
mean and 99th percentile, top-1 agreement and perplexity. Prints one JSON object per cache type.

    python3 -m pip install llama-cpp-python numpy   # builds llama.cpp from source
    python3 bench/llamacpp_kv_kld.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text texts/gpl-3.0.txt --ctx 2048 --types f16,q8_0,q4_0

llama.cpp (since April 2026) rotates Q, K and V with a Hadamard matrix whenever the cache is
quantized; LLAMA_ATTN_ROT_DISABLE=1 in the environment turns that off, which `--no-rotation`
sets for the quantized runs. Quantized V caches need flash attention, so every run (the f16
reference too) uses it.
"""
import argparse
import json
import os

import numpy as np
from llama_cpp import Llama

# ggml type ids (ggml.h) and bits per element including the f16 block scale (and min).
GGML_TYPES = {
    "f16": (1, 16.0),
    "q8_0": (8, 8.5),
    "q5_1": (7, 6.0),
    "q5_0": (6, 5.5),
    "q4_1": (3, 5.0),
    "q4_0": (2, 4.5),
}


def log_probs(model, text, ctx, offset, threads, cache_type):
    """Teacher-forced log-probabilities of the window, [ctx, vocab] f64, and the window ids."""
    ty = GGML_TYPES[cache_type][0]
    llm = Llama(model_path=model, n_ctx=ctx, n_batch=ctx, n_ubatch=512, logits_all=True,
                n_threads=threads, flash_attn=True, type_k=ty, type_v=ty, verbose=False)
    ids = llm.tokenize(open(text, encoding="utf-8").read().encode("utf-8"), add_bos=False,
                       special=False)
    window = ids[offset:offset + ctx]
    if len(window) < ctx:
        raise SystemExit(f"text has {len(ids)} tokens; offset+ctx do not fit")
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
    del llm
    m = logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(axis=1, keepdims=True)) + m
    return logits - logz, window


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f16,q8_0,q4_0",
                    help="comma-separated cache types; the first is the reference")
    ap.add_argument("--no-rotation", action="store_true",
                    help="set LLAMA_ATTN_ROT_DISABLE=1 (llama.cpp's Hadamard rotation off)")
    a = ap.parse_args()
    if a.no_rotation:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    types = a.types.split(",")
    unknown = [t for t in types if t not in GGML_TYPES]
    if unknown:
        raise SystemExit(f"unknown cache types {unknown}; known: {sorted(GGML_TYPES)}")
    ref, window = log_probs(a.model, a.text, a.ctx, a.offset, a.threads, types[0])
    n = len(window) - 1  # the last position predicts nothing we can score
    targets = np.asarray(window[1:])
    for t in types:
        lp = ref if t == types[0] else log_probs(a.model, a.text, a.ctx, a.offset, a.threads, t)[0]
        kld = np.maximum((np.exp(ref[:n]) * (ref[:n] - lp[:n])).sum(axis=1), 0.0)
        top1 = float((lp[:n].argmax(axis=1) == ref[:n].argmax(axis=1)).mean())
        nll = -lp[np.arange(n), targets]
        print(json.dumps({
            "engine": "llama.cpp",
            "cache_type": t,
            "rotation": t != "f16" and not a.no_rotation,
            "bits_per_element": GGML_TYPES[t][1],
            "text": a.text,
            "ctx": a.ctx,
            "offset": a.offset,
            "positions": n,
            "perplexity": float(np.exp(nll.mean())),
            "mean_kld": float(kld.mean()),
            "p99_kld": float(np.sort(kld)[int(np.ceil(n * 0.99)) - 1]),
            "top1_agreement": top1,
        }), flush=True)


if __name__ == "__main__":
    main()
