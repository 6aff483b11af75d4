// Paged decode attention (one query token per sequence), split-K ("flash-decoding"):
//   kvq_decode_split  one CTA per (split, KV head, sequence); its warps stream 16-token tiles of
//                     the split's range straight from the packed blocks, dequantize in
//                     registers and run both products on the tensor cores (mma.sync), for every
//                     query head of the GQA group at once, with an online softmax;
//   kvq_decode_reduce merges the splits, normalizes and, for TurboQuant, rotates the output
//                     back to the model domain.
//
// Exactness: tensor-core operands are f16 (bf16 for a bf16 policy-0 cache). Quantized codes are
// small integers, exact in f16; the query, the probabilities and the TurboQuant centroids are
// split into a high and a scaled low part (two B columns or two A tiles), so every product is
// carried to ~22 bits and accumulated in f32. Per-token scales and zero points are applied in
// f32 outside the products:
//   PyTorch int:  q.k = scale (q.c - zero sum(q))      p.v = sum(p scale c) - sum(p scale zero)
//   TurboMind:    q.k = scale q.c + min sum(q)          p.v = sum(p scale c) + sum(p min)
//   TurboQuant:   q.k = n (sigma q.C3[i] + g q.sign)     p.v = sigma sum(p n C2[i])
//
// Fragment layouts are those of mma.m16n8k16 (A row-major 16x16, B 16x8, C 16x8; lane = 4 group
// + thread-in-group). The head dim and the token order inside a product are free as long as A
// and B agree, so each lane reads contiguous 16-byte pieces of a row and the q fragments are
// built with the same permutation.
//   K side: S[16 tokens x 8 cols] = K[16 tokens x D] . Qᵀ, cols = 4 heads x (hi, lo)
//   V side: Oᵀ[16 dims x 8 cols] += Vᵀ[16 dims x 16 tokens] . Pᵀ, cols = 4 heads x (hi, lo)

#ifndef KVQ_G
#define KVQ_G 4
#endif
#define NT ((KVQ_G + 3) / 4)
#define DEC_WARPS 4

#if KVQ_CODEC == CODEC_FLOAT
#define KBITS 16
#define VBITS 16
#define PPW 1
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_TM_INT8
#define KBITS 8
#define VBITS 8
#define PPW 2
#elif KVQ_CODEC == CODEC_PT_INT4 || KVQ_CODEC == CODEC_TM_INT4
#define KBITS 4
#define VBITS 4
#define PPW 4
#else
#define KBITS 4
#define VBITS 2
#define PPW 4
#endif

// Tiles per loop step; two steps are in registers at a time (software pipeline).
#ifndef KVQ_TPI
#if KVQ_CODEC == CODEC_FLOAT
#define KVQ_TPI (KVQ_DK >= 128 ? 1 : 2)
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_TM_INT8
#define KVQ_TPI (KVQ_DK >= 128 ? 1 : 2)
#else
#define KVQ_TPI (KVQ_DK >= 128 ? 2 : 4)
#endif
#endif

#define KB (KVQ_DK * KBITS / 32)  // bytes of a K row per lane (4 lanes share a row)
#define VB (KVQ_DV * VBITS / 64)  // bytes of a V row per lane (8 lanes share a row)
#define KP (KB < 16 ? KB : 16)
#define VP (VB < 16 ? VB : 16)
#define KW (KB / 4)
#define VW ((VB + 3) / 4)
#define KT (KVQ_DK / 16)  // k-tiles of the K product
#define MT (KVQ_DV / 16)  // m-tiles of the V product

#if KVQ_CODEC == CODEC_FLOAT && KVQ_DTYPE == 1
#define MMA_BF16 1
#define LO_SCALE 256.0f
#else
#define MMA_BF16 0
#define LO_SCALE 2048.0f
#endif
#define INV_LO (1.0f / LO_SCALE)

// ---- operand helpers ----
__device__ __forceinline__ u16 op_bits(float x) {
#if MMA_BF16
    return f32_to_bf16(x);
#else
    return f32_to_f16(x);
#endif
}
__device__ __forceinline__ float op_val(u16 h) {
#if MMA_BF16
    return bf16_to_f32(h);
#else
    return f16_to_f32(h);
#endif
}
// x ~ hi + lo / LO_SCALE
__device__ __forceinline__ void split_hl(float x, u16& hi, u16& lo) {
    hi = op_bits(x);
    lo = op_bits((x - op_val(hi)) * LO_SCALE);
}
__device__ __forceinline__ u32 pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if MMA_BF16
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("trap;");  // bf16 tensor cores need sm_80; the launcher refuses this case
#endif
#else
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a2), "r"(a3), "r"(b1));
#endif
#endif
}

// c += A.B computed into a zeroed accumulator and added in f32: the tensor cores' f32
// accumulation truncates, which over a long chain of products biases the sums; one product's
// worth of truncation is far below f32 accumulation noise.
// `f` is an exact power of two that undoes a scaling of the B operand.
__device__ __forceinline__ void mma_add(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1, float f) {
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma16816(t, a0, a1, a2, a3, b0, b1);
    c[0] = fmaf(t[0], f, c[0]);
    c[1] = fmaf(t[1], f, c[1]);
    c[2] = fmaf(t[2], f, c[2]);
    c[3] = fmaf(t[3], f, c[3]);
}

// Integer codes enter the products centred, c - CODE_OFF (exact in f16), so the sums carry
// no large common offset that the zero point would cancel afterwards. Conversions use the
// f16 bit pattern 0x6400 | c = 1024 + c.
#if KBITS == 8
#define CODE_OFF 128
#else
#define CODE_OFF 8
#endif
#define MAGIC 0x64006400u
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
// (x & mask) | MAGIC in one LOP3.
template <u32 MASK>
__device__ __forceinline__ u32 and_or_magic(u32 x) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(x), "n"(MASK), "r"(MAGIC));
    return r;
}
// Codes in bits 0-3 of each half-word -> {c - CODE_OFF}.
__device__ __forceinline__ u32 nib_lo(u32 x) {
    return hsub2(and_or_magic<0x000F000Fu>(x), MAGIC + CODE_OFF * 0x10001u);
}
// Codes in bits 4-7 of each half-word -> {c - CODE_OFF}: (1024 + 16c) / 16 - (64 + CODE_OFF).
__device__ __forceinline__ u32 nib_hi(u32 x) {
    // 0x2C00 = 1/16; 0xD480 = -72 = -(64 + 8)
    return hfma2(and_or_magic<0x00F000F0u>(x), 0x2C002C00u, 0xD480D480u);
}
// Bytes 0 and 2 of x (selected by prmt selector `sel` of the form 0x4?4?) -> {c - CODE_OFF}.
__device__ __forceinline__ u32 bytes_to_h2(u32 x, u32 sel) {
    return hsub2(__byte_perm(x, 0x64646464u, sel), MAGIC + CODE_OFF * 0x10001u);
}

template <int P>
__device__ __forceinline__ void load_piece(const u8* src, u32* dst) {
    if constexpr (P == 16) {
        uint4 v = __ldg((const uint4*)src);
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    } else if constexpr (P == 8) {
        uint2 v = __ldg((const uint2*)src);
        dst[0] = v.x; dst[1] = v.y;
    } else if constexpr (P == 4) {
        dst[0] = __ldg((const unsigned int*)src);
    } else {
        dst[0] = (u32)__ldg((const unsigned short*)src);
    }
}

// Byte offset inside a row of a lane's word `wi` (K: lane tig of 4, V: lane g of 8).
__device__ __forceinline__ int k_word_off(int tig, int wi) {
    return KP * (tig + 4 * (wi / (KP / 4))) + 4 * (wi % (KP / 4));
}
__device__ __forceinline__ int v_word_off(int g, int wi) {
    if constexpr (VP >= 4) return VP * (g + 8 * (wi / (VP / 4))) + 4 * (wi % (VP / 4));
    else return VP * g;
}

// Head dims (d0, d1) of the lane's K pair `p` (pair = two k-slots of one A register).
__device__ __forceinline__ void k_pair_dims(int tig, int p, int& d0, int& d1) {
    const int wi = p / PPW, j = p % PPW, off = k_word_off(tig, wi);
#if KVQ_CODEC == CODEC_FLOAT
    d0 = off / 2; d1 = d0 + 1;
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_TM_INT8
    d0 = off + j; d1 = d0 + 2;
#elif KVQ_CODEC == CODEC_PT_INT4
    const int b = off + (j >> 1);
    d0 = b + ((j & 1) ? KVQ_DK / 2 : 0); d1 = d0 + 2;
#elif KVQ_CODEC == CODEC_TM_INT4
    d0 = 2 * off + 2 * j; d1 = d0 + 1;
#else
    d0 = off + j; d1 = d0 + KVQ_DK / 2;
#endif
}

// Head dim of row `m` (0 .. DV/8) of the lane's V rows: m-tile m/2, row g (m even) or g+8 (odd).
__device__ __forceinline__ int v_row_dim(int g, int m) {
    const int mt = m >> 1, r = m & 1;
#if KVQ_CODEC == CODEC_FLOAT
    return v_word_off(g, mt) / 2 + r;
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_TM_INT8
    return v_word_off(g, mt >> 1) + 2 * (mt & 1) + r;
#elif KVQ_CODEC == CODEC_PT_INT4
    const int sub = mt & 3;
    return v_word_off(g, mt >> 2) + ((sub & 2) ? 2 : 0) + (sub & 1) + r * (KVQ_DV / 2);
#elif KVQ_CODEC == CODEC_TM_INT4
    const int sub = mt & 3;
    return 2 * v_word_off(g, mt >> 2) + ((sub & 1) ? 4 : 0) + ((sub & 2) ? 1 : 0) + 2 * r;
#else
    const int jb = mt >> 1;
    const int byte = v_word_off(g, jb >> 2) + (jb & 3);
    return byte + (2 * (mt & 1) + r) * (KVQ_DV / 4);
#endif
}

// ---- K-side A operands: pair p of one token's words ----
__device__ __forceinline__ u32 k_a(const u32* w, int p) {
    const int wi = p / PPW, j = p % PPW;
    const u32 x = w[wi];
#if KVQ_CODEC == CODEC_FLOAT
    return x;
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_TM_INT8
    return bytes_to_h2(x, j ? 0x4341u : 0x4240u);  // j: 0 -> (e0, e2), 1 -> (e1, e3)
#elif KVQ_CODEC == CODEC_PT_INT4 || KVQ_CODEC == CODEC_TM_INT4
    // nibbles (j, j+4) of the word: PyTorch j = 0 (b0.lo, b2.lo), 1 (b0.hi, b2.hi), 2 (b1.lo,
    // b3.lo), 3 (b1.hi, b3.hi); TurboMind slots (j, j+4) = elements (2j, 2j+1)
    const u32 y = (j & 2) ? (x >> 8) : x;
    return (j & 1) ? nib_hi(y) : nib_lo(y);
#else
    return 0u;  // TurboQuant uses tq_k_* below
#endif
}

#if KVQ_CODEC == CODEC_TQ
// Tables of f16 bytes: t[0], t[1] = low bytes of entries 0-3, 4-7; t[2], t[3] = high bytes.
struct Lut8 {
    u32 t[4];
};
__device__ __forceinline__ u32 lut8_pair(const Lut8& L, u32 sel, int second) {
    const u32 lo = __byte_perm(L.t[0], L.t[1], sel), hi = __byte_perm(L.t[2], L.t[3], sel);
    return __byte_perm(lo, hi, second ? 0x7362 : 0x5140);
}
// Centroid (high or low part) of K pair p: nibble indices of word byte (j>>1)... see k_pair_dims.
__device__ __forceinline__ u32 tq_k_c(const u32* w, int p, const Lut8& L) {
    const int wi = p >> 2, j = p & 3;
    const u32 sel = ((j < 2) ? w[wi] : (w[wi] >> 16)) & 0x7777u;
    return lut8_pair(L, sel, j & 1);
}
// +-1 of the residual-sign bits of K pair p (bit 3 of each nibble; 1 = positive).
__device__ __forceinline__ u32 tq_k_s(const u32* w, int p) {
    const int wi = p >> 2, j = p & 3;
    const u32 x = w[wi];
    const u32 v = __byte_perm(x, x << 4, 0x0040u + 0x1010u * j);
    return (v & 0x80008000u) ^ 0xBC00BC00u;
}
// V: 4-entry table, low bytes in t0, high bytes in t1; f = two 2-bit codes at bits 0 and 16.
__device__ __forceinline__ u32 lut4_pair(u32 t0, u32 t1, u32 f) {
    const u32 t = f * 0x11u;
    return __byte_perm(t0, t1, t + (t >> 8) + 0x4040u);
}
#endif

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, 2)
kvq_decode_split(const float* __restrict__ q, const u8* __restrict__ cache, CacheParams p, int layer,
                 const int* __restrict__ block_tables, int bt_stride, const int* __restrict__ ctx_lens,
                 int num_kv_heads, int tokens_per_split, float qk_scale, float* __restrict__ part_o,
                 float* __restrict__ part_ml, int num_splits) {
    __shared__ float s_q[KVQ_G][KVQ_DK];
    __shared__ float s_qsum[KVQ_G];
    __shared__ float s_m[DEC_WARPS][KVQ_G], s_l[DEC_WARPS][KVQ_G];
    __shared__ float s_o[DEC_WARPS][KVQ_G][KVQ_DV];

    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int hq = num_kv_heads * KVQ_G;
    const int bs = (int)p.block_size;
    const int ctx = ctx_lens[b];
    const int t_begin = split * tokens_per_split;
    const int t_end = min(ctx, t_begin + tokens_per_split);

    // ---- the group's queries: rotated (TurboQuant) and scaled by softmax scale * log2(e) ----
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DK; i += blockDim.x)
        s_q[i / KVQ_DK][i % KVQ_DK] = q[((i64)b * hq + (i64)kvh * KVQ_G) * KVQ_DK + i];
    __syncthreads();
#if KVQ_CODEC == CODEC_TQ
    for (int h = 1; h < KVQ_DK; h <<= 1) {
        for (int i = threadIdx.x; i < KVQ_G * KVQ_DK / 2; i += blockDim.x) {
            const int head = i / (KVQ_DK / 2), qq = i % (KVQ_DK / 2);
            const int j = (qq / h) * 2 * h + (qq % h);
            const float x0 = s_q[head][j], x1 = s_q[head][j + h];
            s_q[head][j] = x0 + x1;
            s_q[head][j + h] = x0 - x1;
        }
        __syncthreads();
    }
    const float rot = 1.0f / sqrtf((float)KVQ_DK);
#else
    const float rot = 1.0f;
#endif
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DK; i += blockDim.x) {
        float* x = &s_q[i / KVQ_DK][i % KVQ_DK];
        *x = __fmul_rn(__fmul_rn(*x, rot), qk_scale);
    }
    __syncthreads();
    for (int h = warp; h < KVQ_G; h += DEC_WARPS) {
        float s = 0.0f;
        for (int d = lane; d < KVQ_DK; d += 32) s += s_q[h][d];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) s_qsum[h] = s;
    }
    __syncthreads();

    // B fragments of the K product: column g = head (nt*4 + g/2), part g%2.
    u32 bq[NT][KT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int h = nt * 4 + (g >> 1);
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                int d0, d1;
                k_pair_dims(tig, 2 * kk + r, d0, d1);
                const float x0 = h < KVQ_G ? s_q[h][d0] : 0.0f, x1 = h < KVQ_G ? s_q[h][d1] : 0.0f;
                u16 h0, l0, h1, l1;
                split_hl(x0, h0, l0);
                split_hl(x1, h1, l1);
                bq[nt][kk][r] = (g & 1) ? pack2(l0, l1) : pack2(h0, h1);
            }
        }
    }
    float qsum[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) qsum[nt] = (nt * 4 + tig < KVQ_G) ? s_qsum[nt * 4 + tig] : 0.0f;

#if KVQ_CODEC == CODEC_TQ
    const float c3[8] = {-2.1519456f, -1.3439093f, -0.7560052f, -0.2450942f,
                         0.2450942f,  0.7560052f,  1.3439093f,  2.1519456f};
    const float c2[4] = {-1.5104176f, -0.4527808f, 0.4527808f, 1.5104176f};
    Lut8 kc_hi, kc_lo;
#pragma unroll
    for (int i = 0; i < 4; ++i) { kc_hi.t[i] = 0; kc_lo.t[i] = 0; }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u16 hb = f32_to_f16(c3[i]);
        const u16 lb = f32_to_f16((c3[i] - f16_to_f32(hb)) * 2048.0f);
        const int sh = 8 * (i & 3), t = i >> 2;
        kc_hi.t[t] |= (u32)(hb & 0xFF) << sh;
        kc_hi.t[2 + t] |= (u32)(hb >> 8) << sh;
        kc_lo.t[t] |= (u32)(lb & 0xFF) << sh;
        kc_lo.t[2 + t] |= (u32)(lb >> 8) << sh;
    }
    u32 vc_hi0 = 0, vc_hi1 = 0, vc_lo0 = 0, vc_lo1 = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u16 hb = f32_to_f16(c2[i]);
        const u16 lb = f32_to_f16((c2[i] - f16_to_f32(hb)) * 2048.0f);
        vc_hi0 |= (u32)(hb & 0xFF) << (8 * i);
        vc_hi1 |= (u32)(hb >> 8) << (8 * i);
        vc_lo0 |= (u32)(lb & 0xFF) << (8 * i);
        vc_lo1 |= (u32)(lb >> 8) << (8 * i);
    }
    const float sigma_k = (float)(1.0 / sqrt((double)KVQ_DK));
    const float sigma_v = (float)(1.0 / sqrt((double)KVQ_DV));
#endif

    // ---- running state: per n-tile, this lane's head is nt*4 + tig ----
    float m_run[NT], l_run[NT], corr[NT];
    float o[NT][MT][4];
#if KVQ_CODEC == CODEC_TQ
    float o2[NT][MT][4];  // products with the low part of the V centroids
#endif
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        m_run[nt] = -f_inf();
        l_run[nt] = 0.0f;
        corr[nt] = 0.0f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                o[nt][mt][i] = 0.0f;
#if KVQ_CODEC == CODEC_TQ
                o2[nt][mt][i] = 0.0f;
#endif
            }
    }

    // Addresses: a block's base in 64 bits, everything inside a block (< layer_bytes) in 32.
    const int bs_shift = __ffs(bs) - 1;  // the block size is a power of two (checked on the host)
    const u8* layer_ptr = cache + (p.layer_major ? (i64)layer * p.num_blocks * p.layer_bytes : (i64)layer * p.layer_bytes);
    const i64 block_stride = p.layer_major ? p.layer_bytes : p.num_layers * p.layer_bytes;
    const u32 kts = (u32)p.kd.token_stride, vts = (u32)p.vd.token_stride;
    const u32 kmts = (u32)p.km.token_stride, vmts = (u32)p.vm.token_stride;
    u32 k_off[2], km_off[2], vm_off[2], v_off[4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const u32 tok = (u32)(g + 8 * r);
        k_off[r] = (u32)(p.kd.offset + kvh * p.kd.head_stride) + tok * kts + (u32)(KP * tig);
        km_off[r] = (u32)(p.km.offset + kvh * p.km.head_stride) + tok * kmts;
        vm_off[r] = (u32)(p.vm.offset + kvh * p.vm.head_stride) + tok * vmts;
    }
    const int tv[4] = {2 * tig, 2 * tig + 1, 2 * tig + 8, 2 * tig + 9};  // V-side tokens of the lane
#pragma unroll
    for (int r = 0; r < 4; ++r)
        v_off[r] = (u32)(p.vd.offset + kvh * p.vd.head_stride) + (u32)tv[r] * vts + (u32)(VP * g);
    const int* btab = block_tables + (i64)b * bt_stride;

    // Raw bytes of one iteration (KVQ_TPI tiles of 16 tokens), as this lane reads them.
    struct Tile {
        u32 kr[KVQ_TPI][2][KW];
        u32 vr[KVQ_TPI][4][VW];
        u32 kmeta[KVQ_TPI][2], vmeta[KVQ_TPI][2];
        bool kval[KVQ_TPI][2];
    };
    auto load_iter = [&](Tile& T, const int t0) {
#pragma unroll
        for (int ti = 0; ti < KVQ_TPI; ++ti) {
            const int tt = t0 + 16 * ti;
            const bool live = tt < t_end;
            const int blk = live ? btab[tt >> bs_shift] : 0;
            const u32 off0 = (u32)(tt & (bs - 1));
            const u8* bp = layer_ptr + (i64)blk * block_stride;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                T.kval[ti][r] = live && (tt + g + 8 * r < t_end);
                const u8* row = bp + (k_off[r] + off0 * kts);
#pragma unroll
                for (int i = 0; i < KB / KP; ++i) {
                    if (live) {
                        load_piece<KP>(row + 4 * KP * i, &T.kr[ti][r][i * (KP / 4)]);
                    } else {
#pragma unroll
                        for (int w = 0; w < KP / 4; ++w) T.kr[ti][r][i * (KP / 4) + w] = 0u;
                    }
                }
#if KVQ_CODEC != CODEC_FLOAT
                const u8* km = bp + (km_off[r] + off0 * kmts);
                const u8* vm = bp + (vm_off[r] + off0 * vmts);
                T.kmeta[ti][r] = live ? __ldg((const unsigned int*)km) : 0u;
#if KVQ_CODEC == CODEC_TQ
                T.vmeta[ti][r] = live ? (u32)__ldg((const unsigned short*)vm) : 0u;
#else
                T.vmeta[ti][r] = live ? __ldg((const unsigned int*)vm) : 0u;
#endif
#else
                T.kmeta[ti][r] = 0u;
                T.vmeta[ti][r] = 0u;
#endif
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const bool ok = live && (tt + tv[r] < t_end);
                const u8* row = bp + (v_off[r] + off0 * vts);
                if constexpr (VP >= 4) {
#pragma unroll
                    for (int i = 0; i < VB / VP; ++i) {
                        if (live) {
                            load_piece<VP>(row + 8 * VP * i, &T.vr[ti][r][i * (VP / 4)]);
                        } else {
#pragma unroll
                            for (int w = 0; w < VP / 4; ++w) T.vr[ti][r][i * (VP / 4) + w] = 0u;
                        }
                    }
                } else {
                    T.vr[ti][r][0] = live ? (u32)__ldg((const unsigned short*)row) : 0u;
                }
#if KVQ_CODEC == CODEC_FLOAT
                // a masked token's value may be anything (NaN): 0 * NaN would poison the sums
                if (!ok) {
#pragma unroll
                    for (int w = 0; w < VW; ++w) T.vr[ti][r][w] = 0u;
                }
#else
                (void)ok;
#endif
            }
        }
    };
    auto compute_iter = [&](const Tile& T) {
        // ---- scores ----
        float sc[NT][KVQ_TPI][2];
#pragma unroll
        for (int ti = 0; ti < KVQ_TPI; ++ti) {
            // Two short accumulator chains (even and odd k-tiles), summed in f32: the tensor
            // cores' accumulation truncates, so long chains would bias the scores.
            float acc[NT][4], acc2[NT][4];
#if KVQ_CODEC == CODEC_TQ
            float acc_lo[NT][4], acc_s[NT][4];
#endif
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    acc[nt][i] = 0.0f;
                    acc2[nt][i] = 0.0f;
#if KVQ_CODEC == CODEC_TQ
                    acc_lo[nt][i] = 0.0f;
                    acc_s[nt][i] = 0.0f;
#endif
                }
#pragma unroll
            for (int kk = 0; kk < KT; ++kk) {
#if KVQ_CODEC == CODEC_TQ
                const u32 a0 = tq_k_c(T.kr[ti][0], 2 * kk, kc_hi), a1 = tq_k_c(T.kr[ti][1], 2 * kk, kc_hi);
                const u32 a2 = tq_k_c(T.kr[ti][0], 2 * kk + 1, kc_hi), a3 = tq_k_c(T.kr[ti][1], 2 * kk + 1, kc_hi);
                const u32 l0 = tq_k_c(T.kr[ti][0], 2 * kk, kc_lo), l1 = tq_k_c(T.kr[ti][1], 2 * kk, kc_lo);
                const u32 l2 = tq_k_c(T.kr[ti][0], 2 * kk + 1, kc_lo), l3 = tq_k_c(T.kr[ti][1], 2 * kk + 1, kc_lo);
                const u32 s0 = tq_k_s(T.kr[ti][0], 2 * kk), s1 = tq_k_s(T.kr[ti][1], 2 * kk);
                const u32 s2 = tq_k_s(T.kr[ti][0], 2 * kk + 1), s3 = tq_k_s(T.kr[ti][1], 2 * kk + 1);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma16816((kk & 1) ? acc2[nt] : acc[nt], a0, a1, a2, a3, bq[nt][kk][0], bq[nt][kk][1]);
                    mma16816(acc_lo[nt], l0, l1, l2, l3, bq[nt][kk][0], bq[nt][kk][1]);
                    mma16816(acc_s[nt], s0, s1, s2, s3, bq[nt][kk][0], bq[nt][kk][1]);
                }
#else
                const u32 a0 = k_a(T.kr[ti][0], 2 * kk), a1 = k_a(T.kr[ti][1], 2 * kk);
                const u32 a2 = k_a(T.kr[ti][0], 2 * kk + 1), a3 = k_a(T.kr[ti][1], 2 * kk + 1);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma16816((kk & 1) ? acc2[nt] : acc[nt], a0, a1, a2, a3, bq[nt][kk][0], bq[nt][kk][1]);
#endif
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float raw = (acc[nt][2 * r] + acc2[nt][2 * r]) + (acc[nt][2 * r + 1] + acc2[nt][2 * r + 1]) * INV_LO;
                    const u32 km = T.kmeta[ti][r];
                    const float m0 = t_load((u16)(km & 0xFFFFu)), m1 = t_load((u16)(km >> 16));
#if KVQ_CODEC == CODEC_FLOAT
                    float s = raw;
                    (void)m0; (void)m1;
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_PT_INT4
                    // scale (q.(c - OFF) + (OFF - zero) sum q)
                    float s = m0 * (raw + ((float)CODE_OFF - m1) * qsum[nt]);
#elif KVQ_CODEC == CODEC_TM_INT8 || KVQ_CODEC == CODEC_TM_INT4
                    // scale q.(c - OFF) + (min + OFF scale) sum q
                    float s = m0 * raw + (m1 + (float)CODE_OFF * m0) * qsum[nt];
#else
                    raw += (acc_lo[nt][2 * r] + acc_lo[nt][2 * r + 1] * INV_LO) * INV_LO;
                    const float sg = acc_s[nt][2 * r] + acc_s[nt][2 * r + 1] * INV_LO;
                    float s = m0 * (sigma_k * raw + m1 * sg);
#endif
                    sc[nt][ti][r] = T.kval[ti][r] ? s : -f_inf();
                }
            }
        }

        // ---- online softmax over the iteration's tokens ----
        float pw[NT][KVQ_TPI][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            float mx = -f_inf();
#pragma unroll
            for (int ti = 0; ti < KVQ_TPI; ++ti) mx = fmaxf(mx, fmaxf(sc[nt][ti][0], sc[nt][ti][1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_new = fmaxf(m_run[nt], mx);
            const float alpha = (m_new == -f_inf()) ? 1.0f : exp2f(m_run[nt] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int ti = 0; ti < KVQ_TPI; ++ti)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float s = sc[nt][ti][r];
                    const float pr = (s == -f_inf()) ? 0.0f : exp2f(s - m_new);
                    pw[nt][ti][r] = pr;
                    sum += pr;
                }
            l_run[nt] = l_run[nt] * alpha + sum;
            corr[nt] *= alpha;
            m_run[nt] = m_new;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    o[nt][mt][i] *= alpha;
#if KVQ_CODEC == CODEC_TQ
                    o2[nt][mt][i] *= alpha;
#endif
                }
        }

        // ---- V product ----
#pragma unroll
        for (int ti = 0; ti < KVQ_TPI; ++ti) {
            u32 b0[NT], b1[NT];
            // Integer codecs: the weights p * scale of the tile go into the products times a power
            // of two that brings the tile's largest scale to [1, 2), so small scales do not fall
            // into f16's subnormal range; the product is scaled back exactly when it is added.
            float up = 1.0f, down = 1.0f;
#if KVQ_CODEC != CODEC_FLOAT && KVQ_CODEC != CODEC_TQ
            {
                float smax = 0.0f;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float m0 = fabsf(t_load((u16)(T.vmeta[ti][r] & 0xFFFFu)));
                    if (T.kval[ti][r] && m0 < 3.0e38f) smax = fmaxf(smax, m0);
                }
                smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 4));
                smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 8));
                smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 16));
                if (smax > 0.0f) {
                    const int e = min(max(-ilogbf(smax), -100), 100);
                    up = __int_as_float((127 + e) << 23);
                    down = __int_as_float((127 - e) << 23);
                }
            }
#endif
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const bool head_ok = nt * 4 + tig < KVQ_G;
                u16 hw[2], lw[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float pr = pw[nt][ti][r];
                    const u32 vm = T.vmeta[ti][r];
                    const float m0 = t_load((u16)(vm & 0xFFFFu)), m1 = t_load((u16)(vm >> 16));
                    float w = 0.0f;
                    if (T.kval[ti][r] && head_ok) {
#if KVQ_CODEC == CODEC_FLOAT
                        w = pr;
                        (void)m0; (void)m1;
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_PT_INT4
                        w = pr * m0;
                        corr[nt] += w * (m1 - (float)CODE_OFF);  // sum p scale (zero - OFF)
#elif KVQ_CODEC == CODEC_TM_INT8 || KVQ_CODEC == CODEC_TM_INT4
                        w = pr * m0;
                        corr[nt] += pr * (m1 + (float)CODE_OFF * m0);  // sum p (min + OFF scale)
#else
                        w = pr * m0;
                        (void)m1;
#endif
                    }
                    split_hl(w * up, hw[r], lw[r]);
                }
                const u32 src_hi = pack2(hw[0], hw[1]), src_lo = pack2(lw[0], lw[1]);
                const int sa = (2 * tig) * 4 + (g >> 1), sb = (2 * tig + 1) * 4 + (g >> 1);
                const u32 xh = __shfl_sync(0xffffffffu, src_hi, sa), xl = __shfl_sync(0xffffffffu, src_lo, sa);
                const u32 yh = __shfl_sync(0xffffffffu, src_hi, sb), yl = __shfl_sync(0xffffffffu, src_lo, sb);
                const u32 x = (g & 1) ? xl : xh, y = (g & 1) ? yl : yh;
                b0[nt] = __byte_perm(x, y, 0x5410);
                b1[nt] = __byte_perm(x, y, 0x7632);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const u32* v0 = T.vr[ti][0];
                const u32* v1 = T.vr[ti][1];
                const u32* v8 = T.vr[ti][2];
                const u32* v9 = T.vr[ti][3];
#if KVQ_CODEC == CODEC_FLOAT
                const u32 a0 = __byte_perm(v0[mt], v1[mt], 0x5410), a1 = __byte_perm(v0[mt], v1[mt], 0x7632);
                const u32 a2 = __byte_perm(v8[mt], v9[mt], 0x5410), a3 = __byte_perm(v8[mt], v9[mt], 0x7632);
#elif KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_TM_INT8
                // bytes k, k+1 of tokens (t0, t1): u = [t0.k, t1.k, t0.k+1, t1.k+1]
                const int wi = mt >> 1;
                const u32 sel = (mt & 1) ? 0x7362u : 0x5140u;
                const u32 u01 = __byte_perm(v0[wi], v1[wi], sel), u89 = __byte_perm(v8[wi], v9[wi], sel);
                const u32 a0 = bytes_to_h2(u01, 0x4140u), a1 = bytes_to_h2(u01, 0x4342u);
                const u32 a2 = bytes_to_h2(u89, 0x4140u), a3 = bytes_to_h2(u89, 0x4342u);
#elif KVQ_CODEC == CODEC_PT_INT4 || KVQ_CODEC == CODEC_TM_INT4
                // byte k of tokens (t0, t1) at bytes 0 and 2: low nibble -> row g, high -> row g+8
                const int wi = mt >> 2, sub = mt & 3;
                const u32 k = (u32)(((sub & 2) ? 2 : 0) + (sub & 1));
                const u32 sel = k * 0x11u + (k + 4u) * 0x1100u;
                const u32 u01 = __byte_perm(v0[wi], v1[wi], sel), u89 = __byte_perm(v8[wi], v9[wi], sel);
                const u32 a0 = nib_lo(u01), a1 = nib_hi(u01);
                const u32 a2 = nib_lo(u89), a3 = nib_hi(u89);
#else
                const int jb = mt >> 1, wi = jb >> 2;
                const u32 k = (u32)(jb & 3);
                const u32 sel = k * 0x11u + (k + 4u) * 0x1100u;
                const int sh = 4 * (mt & 1);
                const u32 u01 = __byte_perm(v0[wi], v1[wi], sel) >> sh, u89 = __byte_perm(v8[wi], v9[wi], sel) >> sh;
                const u32 f0 = u01 & 0x00030003u, f1 = (u01 >> 2) & 0x00030003u;
                const u32 f2 = u89 & 0x00030003u, f3 = (u89 >> 2) & 0x00030003u;
                const u32 a0 = lut4_pair(vc_hi0, vc_hi1, f0), a1 = lut4_pair(vc_hi0, vc_hi1, f1);
                const u32 a2 = lut4_pair(vc_hi0, vc_hi1, f2), a3 = lut4_pair(vc_hi0, vc_hi1, f3);
                const u32 l0 = lut4_pair(vc_lo0, vc_lo1, f0), l1 = lut4_pair(vc_lo0, vc_lo1, f1);
                const u32 l2 = lut4_pair(vc_lo0, vc_lo1, f2), l3 = lut4_pair(vc_lo0, vc_lo1, f3);
#endif
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma_add(o[nt][mt], a0, a1, a2, a3, b0[nt], b1[nt], down);
#if KVQ_CODEC == CODEC_TQ
                    mma16816(o2[nt][mt], l0, l1, l2, l3, b0[nt], b1[nt]);  // weight 2^-11: chained
#endif
                }
            }
        }
    };

    // Software pipeline: the next iteration's loads are in flight while this one computes.
    const int step = 16 * KVQ_TPI, stride = DEC_WARPS * step;
    Tile ta, tb;
    int t0 = t_begin + warp * step;
    if (t0 < t_end) load_iter(ta, t0);
    for (; t0 < t_end; t0 += 2 * stride) {
        const int t1 = t0 + stride;
        if (t1 < t_end) load_iter(tb, t1);
        compute_iter(ta);
        if (t1 >= t_end) break;
        if (t1 + stride < t_end) load_iter(ta, t1 + stride);
        compute_iter(tb);
    }

    // ---- merge the warps of the CTA ----
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        float l = l_run[nt], c = corr[nt];
        for (int off = 4; off < 32; off <<= 1) {
            l += __shfl_xor_sync(0xffffffffu, l, off);
            c += __shfl_xor_sync(0xffffffffu, c, off);
        }
        const int h = nt * 4 + tig;
        if (h < KVQ_G) {
            if (g == 0) {
                s_m[warp][h] = m_run[nt];
                s_l[warp][h] = l;
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float val = o[nt][mt][2 * r] + o[nt][mt][2 * r + 1] * INV_LO;
#if KVQ_CODEC == CODEC_PT_INT8 || KVQ_CODEC == CODEC_PT_INT4
                    val -= c;
#elif KVQ_CODEC == CODEC_TM_INT8 || KVQ_CODEC == CODEC_TM_INT4
                    val += c;
#elif KVQ_CODEC == CODEC_TQ
                    val += (o2[nt][mt][2 * r] + o2[nt][mt][2 * r + 1] * INV_LO) * INV_LO;
                    val *= sigma_v;
#endif
                    s_o[warp][h][v_row_dim(g, 2 * mt + r)] = val;
                }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DV; i += blockDim.x) {
        const int h = i / KVQ_DV, d = i % KVQ_DV;
        float mx = -f_inf();
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, s_m[w][h]);
        float l = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float f = (s_m[w][h] == -f_inf()) ? 0.0f : exp2f(s_m[w][h] - mx);
            l += f * s_l[w][h];
            acc += f * s_o[w][h][d];
        }
        const i64 row = ((i64)b * hq + (i64)kvh * KVQ_G + h) * num_splits + split;
        part_o[row * KVQ_DV + d] = acc;
        if (d == 0) {
            part_ml[2 * row] = mx;
            part_ml[2 * row + 1] = l;
        }
    }
}

// One CTA of KVQ_DV threads per (sequence, query head). The splits' weights are computed once
// into shared memory, then each thread sums its dimension with many loads in flight.
#define RED_CHUNK 256
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    v = scratch[0];
    for (int w = 1; w < nw; ++w) v = is_max ? fmaxf(v, scratch[w]) : v + scratch[w];
    return v;
}

extern "C" __global__ void kvq_decode_reduce(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                             int num_splits, float* __restrict__ out) {
    __shared__ float s_v[KVQ_DV];
    __shared__ float s_f[RED_CHUNK];
    __shared__ float s_scratch[32];
    const i64 bh = blockIdx.x;
    const int d = threadIdx.x;
    const float* ml = part_ml + 2 * bh * num_splits;
    const float* po = part_o + bh * num_splits * KVQ_DV;
    float mx = -f_inf();
    for (int s = d; s < num_splits; s += KVQ_DV) mx = fmaxf(mx, ml[2 * s]);
    mx = block_reduce(mx, true, s_scratch);
    float l = 0.0f, acc = 0.0f;
    for (int c = 0; c < num_splits; c += RED_CHUNK) {
        const int n = min(RED_CHUNK, num_splits - c);
        __syncthreads();
        for (int i = d; i < n; i += KVQ_DV) {
            const float m = ml[2 * (c + i)];
            const float f = (m == -f_inf()) ? 0.0f : exp2f(m - mx);
            s_f[i] = f;
            l += f * ml[2 * (c + i) + 1];
        }
        __syncthreads();
#pragma unroll 8
        for (int i = 0; i < n; ++i) acc += s_f[i] * po[(i64)(c + i) * KVQ_DV + d];
    }
    l = block_reduce(l, false, s_scratch);
    float val = l > 0.0f ? acc * (1.0f / l) : 0.0f;
#if KVQ_CODEC == CODEC_TQ
    s_v[d] = val;
    __syncthreads();
    for (int h = 1; h < KVQ_DV; h <<= 1) {
        if (d < KVQ_DV / 2) {
            const int i = (d / h) * 2 * h + (d % h);
            const float x0 = s_v[i], x1 = s_v[i + h];
            s_v[i] = x0 + x1;
            s_v[i + h] = x0 - x1;
        }
        __syncthreads();
    }
    val = __fmul_rn(s_v[d], 1.0f / sqrtf((float)KVQ_DV));
#else
    (void)s_v;
#endif
    out[bh * KVQ_DV + d] = val;
}
