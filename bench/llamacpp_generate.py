#!/usr/bin/env python3
"""Prefill and greedy-decode speed of llama.cpp (through llama-cpp-python) on a GGUF model.

Mirrors `kvq bench generate`: the prompt is the first N tokens of a text file (no BOS, no
template), generation is greedy and ignores EOS, prefill time is the time to the first token,
and decode speed counts the tokens after the first one (N_new - 1 tokens over the time from
the first to the last). Prints one JSON object with the medians over the timed runs.

    python3 -m pip install llama-cpp-python numpy   # builds llama.cpp from source
    python3 bench/llamacpp_generate.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --threads 2 --prompt-tokens 512 --new-tokens 128 --runs 5

With --serve it loads the model, prints {"ready": true, "prompt_fingerprint": ...} and then
times one run per line "run" read from stdin, printing one JSON line each ("quit" ends it):
`kvq bench generate --llama-cpp-python PYTHON` drives it that way to interleave its own runs
with llama.cpp's, so both see the same machine load.
"""

import argparse
import json
import statistics
import sys
import time


def fingerprint(ids):
    """FNV-1a (64-bit) of the ids written as decimal numbers joined by commas; kvq prints the same."""
    h = 0xCBF29CE484222325
    for b in ",".join(str(i) for i in ids).encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--text", default="texts/gpl-3.0.txt", help="prompt source text")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="llama.cpp KV cache type (K and V; quantized V needs flash attention)")
    p.add_argument("--serve", action="store_true", help="time one run per 'run' line on stdin")
    a = p.parse_args()

    import llama_cpp
    import numpy as np

    kw = {}
    if a.kv_type != "f16":
        ggml_type = {"q8_0": 8, "q4_0": 2}[a.kv_type]
        kw = dict(type_k=ggml_type, type_v=ggml_type, flash_attn=True)
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_ctx=a.prompt_tokens + a.new_tokens + 16,
        n_batch=a.prompt_tokens,
        n_ubatch=a.prompt_tokens,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
        **kw,
    )
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[: a.prompt_tokens]
    if len(ids) < a.prompt_tokens:
        sys.exit(f"{a.text} has only {len(ids)} tokens")
    n_vocab = llm.n_vocab()

    def last_argmax():
        # Logits of the last evaluated token (llama-cpp-python keeps only that row).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def run():
        llm.reset()
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = last_argmax()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(a.new_tokens - 1):
            llm.eval([tok])
            tok = last_argmax()
            out.append(tok)
        t2 = time.perf_counter()
        return {
            "prefill_tok_s": a.prompt_tokens / (t1 - t0),
            "decode_tok_s": (a.new_tokens - 1) / (t2 - t1),
            "first_tokens": out[:16],
        }

    info = {
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "model": a.model,
        "threads": a.threads,
        "kv_type": a.kv_type,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "prompt_fingerprint": fingerprint(ids),
    }
    if a.serve:
        print(json.dumps({"ready": True, **info}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            if cmd == "run":
                print(json.dumps(run()), flush=True)
        return

    run()  # warm-up
    runs = [run() for _ in range(a.runs)]
    prefill = [r["prefill_tok_s"] for r in runs]
    decode = [r["decode_tok_s"] for r in runs]
    print(json.dumps({
        **info,
        "runs": a.runs,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "prefill_tok_s_all": [round(x, 1) for x in prefill],
        "decode_tok_s_all": [round(x, 1) for x in decode],
        "first_tokens": runs[0]["first_tokens"],
    }, indent=2))


if __name__ == "__main__":
    main()
