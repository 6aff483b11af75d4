#!/usr/bin/env python3
"""Peer anchor for `kvq bench attention`: PyTorch scaled_dot_product_attention decode (one query
token per sequence) over a contiguous bf16 KV cache, with the cuDNN and the flash backends, at the
same shapes. Times with CUDA events (median of many runs after warm-up); when one cache would fit
in L2, several are rotated.

    python3 bench/peer_sdpa.py [--shapes 32/8/128/32/32768,...] [--json out.json]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEFAULT_SHAPES = ["32/8/128/32/32768", "32/8/128/1/32768", "9/3/64/32/32768"]


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn(0)
    torch.cuda.synchronize()
    pairs = []
    for i in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(i)
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


def bench_shape(hq, hkv, d, b, ctx, warmup, iters):
    kv_bytes = b * hkv * ctx * d * 2 * 2
    sets = max(1, min(8, -(-(512 << 20) // kv_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(1234)
    qs = [torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(sets)]
    ks = [torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(sets)]
    vs = [torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(sets)]
    row = {"q_heads": hq, "kv_heads": hkv, "head_dim": d, "batch": b, "context": ctx,
           "kv_bytes": kv_bytes, "rotated_sets": sets}
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        note = ""
        try:
            with sdpa_kernel([backend]):
                def run(i):
                    j = i % sets
                    F.scaled_dot_product_attention(qs[j], ks[j], vs[j], enable_gqa=True)
                times = time_ms(run, warmup, iters)
        except RuntimeError as e:
            # A backend without GQA support: time it on K/V expanded to every query head
            # (reads hq/hkv times the bytes), and say so.
            try:
                g = hq // hkv
                ke = [k.repeat_interleave(g, dim=1) for k in ks[:1]]
                ve = [v.repeat_interleave(g, dim=1) for v in vs[:1]]
                with sdpa_kernel([backend]):
                    def run(i):
                        F.scaled_dot_product_attention(qs[0], ke[0], ve[0])
                    times = time_ms(run, warmup, iters)
                note = f"no GQA ({str(e).splitlines()[0][:80]}); timed on K/V expanded to {hq} heads"
                del ke, ve
            except RuntimeError as e2:
                row[f"{name}_ms"] = None
                row[f"{name}_note"] = str(e2).splitlines()[0][:160]
                continue
        med = statistics.median(times)
        row[f"{name}_ms"] = med
        row[f"{name}_gbps"] = kv_bytes / (med * 1e-3) / 1e9
        if note:
            row[f"{name}_note"] = note
    del qs, ks, vs
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help="QHEADS/KVHEADS/HEADDIM/BATCH/CONTEXT, comma-separated")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    rows = []
    print(f"PyTorch {torch.__version__} SDPA decode on {torch.cuda.get_device_name()}, bf16 contiguous KV, "
          f"median of {a.iters} after {a.warmup} warm-up")
    print(f"{'shape':<22} {'KV GiB':>7} {'cuDNN ms':>9} {'GB/s':>6} {'flash ms':>9} {'GB/s':>6}")
    for s in a.shapes.split(","):
        hq, hkv, d, b, ctx = (int(x) for x in s.split("/"))
        r = bench_shape(hq, hkv, d, b, ctx, a.warmup, a.iters)
        rows.append(r)
        fmt = lambda k: f"{r[k]:.4f}" if r.get(k) is not None else "-"
        gb = lambda k: f"{r[k]:.0f}" if r.get(k) is not None else "-"
        print(f"{s:<22} {r['kv_bytes'] / 2**30:>7.3f} {fmt('cudnn_ms'):>9} {gb('cudnn_gbps'):>6} "
              f"{fmt('flash_ms'):>9} {gb('flash_gbps'):>6}")
        for k in ("cudnn_note", "flash_note"):
            if k in r:
                print(f"  {k.split('_')[0]}: {r[k]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
