// Quantize-and-store: one launch per layer per step writes every new K and V token of the batch
// into the paged cache, K through side KVQ_KS and V through side KVQ_VS (rotated first when
// KVQ_KROT / KVQ_VROT), at the byte positions of CacheParams. Each
// warp encodes one (token, KV head, side) vector; the arithmetic follows the CPU codecs
// operation for operation so the bytes agree (int codes to within one near ties).

#define STORE_WARPS 4
#define DMAX (KVQ_DK > KVQ_DV ? KVQ_DK : KVQ_DV)

// ---- policy 0: the model dtype, stored unchanged (NaN and inf included) ----
template <int D>
__device__ void enc_float(const float* x, u8* data, int lane) {
    u16* out = (u16*)data;
    for (int i = lane; i < D; i += 32) out[i] = t_store(x[i]);
}

__device__ __forceinline__ void store_meta2(u8* meta, float a, float b) {
    u16* m = (u16*)meta;
    m[0] = t_store(a);
    m[1] = t_store(b);
}

// ---- PyTorch engine int8/int4 (backend-pytorchlike affine.rs) ----
template <int D, int LEVELS>
__device__ void enc_pt(const float* x, u8* data, u8* meta, u8* codes, int lane) {
    float mn = f_inf(), mx = -f_inf();
    for (int i = lane; i < D; i += 32) {
        float v = sanitize(x[i]);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
    mn = warp_min(mn);
    mx = warp_max(mx);
    float scale = (mx - mn) / (float)LEVELS;
    float zero = -mn / scale;
    float ss = t_round(scale), sz = t_round(zero);
    bool fallback = !(ss > 0.0f && !isinf(ss) && !isnan(ss) && !isinf(sz) && !isnan(sz));
    if (fallback) {
        ss = 1.0f;
        sz = t_round_sat(-mn);
    }
    for (int i = lane; i < D; i += 32) {
        u32 c = 0;
        if (!fallback) {
            float q = sanitize(x[i]) / scale + zero + 0.5f;
            // Rust's `as u8`: truncation toward zero, saturating, NaN -> 0.
            c = (isnan(q) || q <= 0.0f) ? 0u : (q >= 255.0f ? 255u : (u32)q);
            c = c < (u32)LEVELS ? c : (u32)LEVELS;
        }
        codes[i] = (u8)c;
    }
    __syncwarp();
    if (LEVELS == 255) {
        for (int i = lane; i < D; i += 32) data[i] = codes[i];
    } else {
        // half-split: byte j = code j | code (j + D/2) << 4
        for (int j = lane; j < D / 2; j += 32) data[j] = (u8)(codes[j] | (codes[j + D / 2] << 4));
    }
    if (lane == 0) store_meta2(meta, ss, sz);
}

// ---- TurboMind int8/int4 (backend-turbomind quant.rs), arithmetic rounded to T ----
template <int D, int BITS>
__device__ void enc_tm(const float* x, u8* data, u8* meta, u8* codes, int lane) {
    const float limit = fminf(T_MAX, 8.50705917e37f);  // min(T::MAX, 2^126)
    const u32 max_code = (1u << BITS) - 1u;
    float mn = f_inf(), mx = -f_inf();
    for (int i = lane; i < D; i += 32) {
        float v = t_round(fminf(fmaxf(sanitize(x[i]), -limit), limit));
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
    mn = warp_min(mn);
    mx = warp_max(mx);
    float scale = t_round((mx - mn) * (1.0f / (float)((1 << BITS) - 1)));
    float inv = t_round(1.0f / scale);
    for (int i = lane; i < D; i += 32) {
        float xt = t_round(fminf(fmaxf(sanitize(x[i]), -limit), limit));
        float d = t_round(xt - mn);
        float v = t_round(d * inv);
        u32 c = isnan(v) ? 0u : (u32)fminf(fmaxf(rintf(v), 0.0f), 255.0f);
        codes[i] = (u8)(c < max_code ? c : max_code);
    }
    __syncwarp();
    if (BITS == 8) {
        for (int i = lane; i < D; i += 32) data[i] = codes[i];
    } else {
        // eight codes per little-endian word, nibble order e0 e2 e4 e6 e1 e3 e5 e7 (LSB first)
        for (int w = lane; w < D / 8; w += 32) {
            u32 word = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) word |= (u32)(codes[8 * w + j] & 0xF) << (4 * (4 * (j & 1) + (j >> 1)));
            data[4 * w + 0] = (u8)word;
            data[4 * w + 1] = (u8)(word >> 8);
            data[4 * w + 2] = (u8)(word >> 16);
            data[4 * w + 3] = (u8)(word >> 24);
        }
    }
    if (lane == 0) store_meta2(meta, scale, mn);
}

// ---- TurboQuant (backend-pytorchlike turbo_quant.rs behind engine_core Rotated) ----
// Sanitize, normalised Walsh-Hadamard transform (same butterflies as the CPU), round to T.
template <int D>
__device__ void rotate_to_t(const float* x, float* y, int lane) {
    for (int i = lane; i < D; i += 32) y[i] = sanitize(x[i]);
    __syncwarp();
    for (int h = 1; h < D; h <<= 1) {
        for (int q = lane; q < D / 2; q += 32) {
            int i = (q / h) * 2 * h + (q % h);
            float a = y[i], b = y[i + h];
            y[i] = a + b;
            y[i + h] = a - b;
        }
        __syncwarp();
    }
    const float s = 1.0f / sqrtf((float)D);
    for (int i = lane; i < D; i += 32) y[i] = t_round(__fmul_rn(y[i], s));
    __syncwarp();
}

template <int D>
__device__ double tq_norm(const float* y, int lane) {
    double s = 0.0;
    for (int i = lane; i < D; i += 32) {
        double v = (double)sanitize(y[i]);
        s += v * v;
    }
    return sqrt(warp_sum_d(s) + 1e-8);
}

template <int D>
__device__ void enc_tq_k(const float* x, u8* data, u8* meta, float* y, u8* codes, int lane) {
    rotate_to_t<D>(x, y, lane);
    const double n = tq_norm<D>(y, lane);
    const float sigma = (float)(1.0 / sqrt((double)D));
    double r2 = 0.0;
    for (int i = lane; i < D; i += 32) {
        float u = (float)((double)sanitize(y[i]) / n);
        u32 idx = 0;
#pragma unroll
        for (int k = 0; k < 7; ++k) idx += u > __fmul_rn(KVQ_B3[k], sigma) ? 1u : 0u;
        // __fmul_rn: the CPU rounds the scaled centroid before subtracting (no FMA).
        float r = u - __fmul_rn(KVQ_C3[idx], sigma);
        codes[i] = (u8)(idx | ((r >= 0.0f ? 1u : 0u) << 3));
        r2 += (double)r * (double)r;
    }
    r2 = warp_sum_d(r2);
    __syncwarp();
    for (int j = lane; j < D / 2; j += 32) data[j] = (u8)(codes[j] | (codes[j + D / 2] << 4));
    if (lane == 0) {
        double g = sqrt(r2 + 1e-8) / sqrt((double)D);
        store_meta2(meta, t_round_sat((float)n), t_round_sat((float)g));
    }
}

// BITS-bit Lloyd-Max side (2: policy 42's V, quarter-split crumbs; 4: sequential nibbles as
// packing.rs `pack_bits`). UNSHRINK (lm2u, lm4u): store n / <u, c^> instead of n, so that the
// decoded vector's projection on the input is the input's norm (turbo_quant.rs `unshrunk_norm`).
template <int D, int BITS, bool UNSHRINK>
__device__ void enc_lm(const float* x, u8* data, u8* meta, float* y, u8* codes, int lane) {
    rotate_to_t<D>(x, y, lane);
    double n = tq_norm<D>(y, lane);
    const float sigma = (float)(1.0 / sqrt((double)D));
    const float* bounds = BITS == 2 ? KVQ_B2 : KVQ_B4;
    const float* cents = BITS == 2 ? KVQ_C2 : KVQ_C4;
    double proj = 0.0;
    for (int i = lane; i < D; i += 32) {
        float u = (float)((double)sanitize(y[i]) / n);
        u32 idx = 0;
#pragma unroll
        for (int k = 0; k < (1 << BITS) - 1; ++k) idx += u > __fmul_rn(bounds[k], sigma) ? 1u : 0u;
        codes[i] = (u8)idx;
        proj += (double)u * (double)__fmul_rn(cents[idx], sigma);
    }
    if (UNSHRINK) {
        proj = warp_sum_d(proj);
        if (proj > 1e-3) n = n / proj;
    }
    __syncwarp();
    if (BITS == 2) {
        const int q = D / 4;
        for (int j = lane; j < q; j += 32)
            data[j] = (u8)(codes[j] | (codes[j + q] << 2) | (codes[j + 2 * q] << 4) | (codes[j + 3 * q] << 6));
    } else {
        for (int j = lane; j < D / 2; j += 32) data[j] = (u8)(codes[2 * j] | (codes[2 * j + 1] << 4));
    }
    if (lane == 0) ((u16*)meta)[0] = t_store(t_round_sat((float)n));
}

// One vector of side S (SIDE_*), rotated first when ROT (the Lloyd-Max and TurboQuant encoders
// rotate themselves).
template <int D, int S, int ROT>
__device__ void encode_side(const float* x, u8* data, u8* meta, float* y, u8* codes, int lane) {
    if constexpr (ROT && S != SIDE_TQ3S && !IS_LM(S)) {
        rotate_to_t<D>(x, y, lane);
        x = y;
    }
    if constexpr (S == SIDE_FLOAT) enc_float<D>(x, data, lane);
    else if constexpr (S == SIDE_PT8) enc_pt<D, 255>(x, data, meta, codes, lane);
    else if constexpr (S == SIDE_PT4) enc_pt<D, 15>(x, data, meta, codes, lane);
    else if constexpr (S == SIDE_TM8) enc_tm<D, 8>(x, data, meta, codes, lane);
    else if constexpr (S == SIDE_TM4) enc_tm<D, 4>(x, data, meta, codes, lane);
    else if constexpr (S == SIDE_TQ3S) enc_tq_k<D>(x, data, meta, y, codes, lane);
    else if constexpr (S == SIDE_LM2) enc_lm<D, 2, false>(x, data, meta, y, codes, lane);
    else if constexpr (S == SIDE_LM2U) enc_lm<D, 2, true>(x, data, meta, y, codes, lane);
    else if constexpr (S == SIDE_LM4) enc_lm<D, 4, false>(x, data, meta, y, codes, lane);
    else enc_lm<D, 4, true>(x, data, meta, y, codes, lane);
}

// k: [num_tokens, num_kv_heads, KVQ_DK] f32, v: [num_tokens, num_kv_heads, KVQ_DV] f32,
// slots[t] = block * block_size + offset, or negative to skip the token.
extern "C" __global__ void __launch_bounds__(STORE_WARPS * 32)
kvq_store_kv(const float* __restrict__ k, const float* __restrict__ v, const int* __restrict__ slots,
             int num_tokens, int num_kv_heads, int layer, u8* __restrict__ cache, CacheParams p) {
    __shared__ float s_y[STORE_WARPS][DMAX];
    __shared__ u8 s_codes[STORE_WARPS][DMAX];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const i64 item = (i64)blockIdx.x * STORE_WARPS + warp;  // (token * H + head) * 2 + side
    if (item >= (i64)num_tokens * num_kv_heads * 2) return;
    const int side = (int)(item & 1);
    const i64 row = item >> 1;
    const int head = (int)(row % num_kv_heads);
    const i64 tok = row / num_kv_heads;
    const int slot = slots[tok];
    if (slot < 0 || (i64)slot >= p.num_blocks * p.block_size) return;  // skipped or outside the cache
    const i64 block = slot / p.block_size, off = slot % p.block_size;
    u8* base = cache + layer_block_base(p, layer, block);
    if (side == 0) {
        u8* data = base + p.kd.offset + head * p.kd.head_stride + off * p.kd.token_stride;
        u8* meta = base + p.km.offset + head * p.km.head_stride + off * p.km.token_stride;
        encode_side<KVQ_DK, KVQ_KS, KVQ_KROT>(k + row * KVQ_DK, data, meta, s_y[warp], s_codes[warp], lane);
    } else {
        u8* data = base + p.vd.offset + head * p.vd.head_stride + off * p.vd.token_stride;
        u8* meta = base + p.vm.offset + head * p.vm.head_stride + off * p.vm.token_stride;
        encode_side<KVQ_DV, KVQ_VS, KVQ_VROT>(v + row * KVQ_DV, data, meta, s_y[warp], s_codes[warp], lane);
    }
}

// Standard normal values from a counter hash (Box-Muller), for filling benchmark caches on the
// device: out[i] for i in [0, n).
__device__ __forceinline__ u32 kvq_hash(u64 x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (u32)x;
}
extern "C" __global__ void kvq_fill_normal(float* __restrict__ out, i64 n, u64 seed) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const u64 key = seed * 0x9e3779b97f4a7c15ull + (u64)i * 2;
        const float u1 = ((float)(kvq_hash(key) >> 8) + 0.5f) * (1.0f / 16777216.0f);
        const float u2 = (float)(kvq_hash(key + 1) >> 8) * (1.0f / 16777216.0f);
        out[i] = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    }
}
