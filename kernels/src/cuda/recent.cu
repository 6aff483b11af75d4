// ---- the recent window (engine.recent_window): each row's last `window` tokens at the model dtype ----
// A sequence's recent tokens live in a device ring, [slot][layer][window][kv head][d] of the
// cache dtype, in the model domain, written by kvq_window_keep after the layer's attention.
// kvq_decode_recent attends a row over its tokens (pos - window, pos] — from the ring for
// positions before this pass's chunk, from the chunk's own K/V rows otherwise — and writes the
// result as one more split-K partial, which kvq_decode_reduce merges with the codec's splits
// (those cover the tokens before the window: the host shortens the row's context).

#define WIN_MAX 256   // engine_core::config::MAX_RECENT_WINDOW
#define WIN_WARPS 4

// Per query row: the sequence's ring slot (-1: no window), its chunk's first position and
// first row in this pass, and the row's position.
struct WinRow {
    int slot, start, first_row, pos;
};

// A K or V value of token t of the row's sequence: this pass's row (rounded to the dtype, as
// the ring stores it) or the ring.
__device__ __forceinline__ float win_value(const float* __restrict__ fresh, const u16* __restrict__ ring,
                                           const WinRow& w, int t, i64 ring_row, int width, int col) {
    if (t >= w.start) return t_round(fresh[(i64)(w.first_row + t - w.start) * width + col]);
    return t_load(ring[ring_row * width + col]);
}

extern "C" __global__ void __launch_bounds__(WIN_WARPS * 32)
kvq_decode_recent(const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new,
                  const u16* __restrict__ ring_k, const u16* __restrict__ ring_v, const WinRow* __restrict__ rows,
                  int window, int num_layers, int layer, int num_kv_heads, float qk_scale,
                  float* __restrict__ part_o, float* __restrict__ part_ml, int num_splits) {
    __shared__ float s_p[KVQ_G][WIN_MAX];
    __shared__ float s_o[KVQ_G][KVQ_DV];
    __shared__ float s_m[KVQ_G], s_l[KVQ_G];
    const int kvh = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hq = num_kv_heads * KVQ_G;
    const WinRow w = rows[b];
    const int lo = max(0, w.pos + 1 - window);
    const int n = w.slot < 0 ? 0 : w.pos + 1 - lo;
    const int kw = num_kv_heads * KVQ_DK, vw = num_kv_heads * KVQ_DV;
    // ring row of position t: ((slot * layers + layer) * window + t % window) * kv heads + kvh
    const i64 ring_base = ((i64)w.slot * num_layers + layer) * window;
    const float* qb = q + ((i64)b * hq + (i64)kvh * KVQ_G) * KVQ_DK;

    // scores, one warp per (head, token), in log2 units like the codec's splits
    for (int i = warp; i < KVQ_G * n; i += WIN_WARPS) {
        const int h = i / n, t = lo + i % n;
        const i64 rr = ring_base + t % window;
        float dot = 0.0f;
        for (int d = lane; d < KVQ_DK; d += 32)
            dot += qb[h * KVQ_DK + d] * win_value(k_new, ring_k, w, t, rr, kw, kvh * KVQ_DK + d);
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (lane == 0) s_p[h][i % n] = dot * qk_scale;
    }
    __syncthreads();
    for (int h = warp; h < KVQ_G; h += WIN_WARPS) {
        float mx = -f_inf();
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, s_p[h][j]);
        mx = warp_max(mx);
        float l = 0.0f;
        for (int j = lane; j < n; j += 32) {
            const float e = exp2f(s_p[h][j] - mx);
            s_p[h][j] = e;
            l += e;
        }
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) {
            s_m[h] = n > 0 ? mx : -f_inf();
            s_l[h] = l;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DV; i += blockDim.x) {
        const int h = i / KVQ_DV, d = i % KVQ_DV;
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) {
            const int t = lo + j;
            acc += s_p[h][j] * win_value(v_new, ring_v, w, t, ring_base + t % window, vw, kvh * KVQ_DV + d);
        }
        s_o[h][d] = acc;
    }
#if KVQ_VROT
    // The reduce rotates the merged V back from the Hadamard domain; the window's values are in
    // the model domain, so rotate them in (the normalized transform is its own inverse).
    __syncthreads();
    block_wht<KVQ_DV>(&s_o[0][0], KVQ_G);
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DV; i += blockDim.x)
        s_o[i / KVQ_DV][i % KVQ_DV] = __fmul_rn(s_o[i / KVQ_DV][i % KVQ_DV], 1.0f / sqrtf((float)KVQ_DV));
#endif
    __syncthreads();
    const int split = num_splits - 1;  // the last partial is the window's
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DV; i += blockDim.x) {
        const int h = i / KVQ_DV, d = i % KVQ_DV;
        const i64 row = ((i64)b * hq + (i64)kvh * KVQ_G + h) * num_splits + split;
        part_o[row * KVQ_DV + d] = s_o[h][d];
        if (d == 0) {
            part_ml[2 * row] = s_m[h];
            part_ml[2 * row + 1] = s_l[h];
        }
    }
}

// Writes this pass's rows into their sequences' rings (rows whose `slot` is -1 are not kept:
// no window, or not among the sequence's last `window` positions). Runs after the layer's
// attention, which read the ring positions these overwrite.
extern "C" __global__ void __launch_bounds__(256)
kvq_window_keep(const float* __restrict__ k_new, const float* __restrict__ v_new, u16* __restrict__ ring_k,
                u16* __restrict__ ring_v, const WinRow* __restrict__ rows, int window, int num_layers, int layer,
                int num_kv_heads) {
    const WinRow w = rows[blockIdx.x];
    if (w.slot < 0) return;
    const i64 rr = ((i64)w.slot * num_layers + layer) * window + w.pos % window;
    const int kw = num_kv_heads * KVQ_DK, vw = num_kv_heads * KVQ_DV;
    for (int i = threadIdx.x; i < kw; i += blockDim.x) ring_k[rr * kw + i] = t_store(k_new[(i64)blockIdx.x * kw + i]);
    for (int i = threadIdx.x; i < vw; i += blockDim.x) ring_v[rr * vw + i] = t_store(v_new[(i64)blockIdx.x * vw + i]);
}
