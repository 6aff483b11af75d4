// Paged decode attention (one query token per sequence), split-K ("flash-decoding"):
//   kvq_decode_split  one CTA per (split, KV head, sequence); its warps stream 16-token tiles of
//                     the split's range straight from the packed blocks, dequantize in
//                     registers and run both products on the tensor cores (mma.sync), for every
//                     query head of the GQA group at once, with an online softmax;
//   kvq_decode_reduce merges the splits, normalizes and, for a Hadamard-domain V side (TurboQuant,
//                     Lloyd-Max, rotated int), rotates the output back to the model domain.
// The K and V sides are compiled separately (KVQ_KS, KVQ_VS): any K side pairs with any V side.
//
// Precision: as in every production decode kernel, the tensor-core operands are single f16
// values (bf16 for a bf16 policy-0 cache) and the products accumulate in f32. Quantized codes
// enter centred (c - 128, c - 8) and are exact in f16; the query (scaled per head by a power of
// two into f16's range) and the probabilities are rounded to f16 once; the TurboQuant centroids
// are f16 constants. Per-token scales and zero points are applied in f32 outside the products:
//   PyTorch int:  q.k = scale (q.c - zero sum(q))      p.v = sum(p scale c) - sum(p scale zero)
//   TurboMind:    q.k = scale q.c + min sum(q)          p.v = sum(p scale c) + sum(p min)
//   TurboQuant:   q.k = n (sigma q.C3[i] + g q.sign)     p.v = sigma sum(p n C2[i])   (2-bit V)
// The online softmax runs relative to the running maximum of score + log2 |V scale| (not of the
// score alone), so the V weights p * scale that enter the f16 products are at most 1 whatever
// the scales' range; the probabilities and the normaliser stay in f32.
//
// Fragment layouts are those of mma.m16n8k16 (A row-major 16x16, B 16x8, C 16x8; lane = 4 group
// + thread-in-group). The head dim and the token order inside a product are free as long as A
// and B agree, so each lane reads contiguous 16-byte pieces of a row and the q fragments are
// built with the same permutation. The 8 columns are the 8 query heads of a GQA group (fewer
// heads leave columns unused).
//   K side: S[16 tokens x 8 heads] = K[16 tokens x D] . Qᵀ
//   V side: Oᵀ[16 dims x 8 heads] += Vᵀ[16 dims x 16 tokens] . Pᵀ
// A lane holds the scores and outputs of heads 2 tig and 2 tig + 1.

#ifndef KVQ_G
#define KVQ_G 4
#endif
#define DEC_WARPS 4
// Most blocks one split may span: the split's block-table entries are staged in shared memory
// once, so a tile's address never waits on a global load (spec.rs MAX_SPLIT_BLOCKS).
#define DEC_MAX_BLOCKS 512

// Code bits per element of each side; PPW = K slot pairs per 32-bit word.
#if KVQ_KS == SIDE_FLOAT
#define KBITS 16
#define PPW 1
#elif IS_INT8(KVQ_KS)
#define KBITS 8
#define PPW 2
#else
#define KBITS 4
#define PPW 4
#endif
#if KVQ_VS == SIDE_FLOAT
#define VBITS 16
#elif IS_INT8(KVQ_VS)
#define VBITS 8
#elif IS_INT4(KVQ_VS) || IS_LM4(KVQ_VS)
#define VBITS 4
#else
#define VBITS 2
#endif
#if IS_LM2(KVQ_KS) || KVQ_VS == SIDE_TQ3S
#error "no decode kernel for a 2-bit Lloyd-Max K or a TurboQuant V side"
#endif

// Tiles per loop step (KVQ_TPI, 16 tokens each) and resident CTAs per multiprocessor
// (KVQ_CTAS, the `__launch_bounds__` minimum): set by the launcher (spec.rs, `decode_tuning`);
// two steps are in registers at a time (software pipeline).
#ifndef KVQ_TPI
#define KVQ_TPI 1
#endif
#ifndef KVQ_CTAS
#define KVQ_CTAS 2
#endif

#define KB (KVQ_DK * KBITS / 32)  // bytes of a K row per lane (4 lanes share a row)
#define VB (KVQ_DV * VBITS / 64)  // bytes of a V row per lane (8 lanes share a row)
#define KP (KB < 16 ? KB : 16)
#define VP (VB < 16 ? VB : 16)
#define KW (KB / 4)
#define VW ((VB + 3) / 4)
#define KT (KVQ_DK / 16)  // k-tiles of the K product
#define MT (KVQ_DV / 16)  // m-tiles of the V product

#if KVQ_KS == SIDE_FLOAT && KVQ_VS == SIDE_FLOAT && KVQ_DTYPE == 1
#define MMA_BF16 1
#elif (KVQ_KS == SIDE_FLOAT || KVQ_VS == SIDE_FLOAT) && KVQ_DTYPE == 1
#error "a bf16 float side next to a quantized side: the products take one operand type"
#else
#define MMA_BF16 0
#endif

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
__device__ __forceinline__ u32 pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }
// Two f32 as one operand register {lo, hi}, rounded to nearest.
__device__ __forceinline__ u32 op_pack(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
#if MMA_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
#else
    return pack2(op_bits(lo), op_bits(hi));
#endif
}

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

// V side: integer codes enter the products centred, c - CODE_OFF (exact in f16): the output
// accumulates over a whole split, and a large common offset there would cost precision when the
// zero point cancels it afterwards. Conversions use the f16 bit pattern 0x6400 | c = 1024 + c.
#if VBITS == 8
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
// K side: one instruction per two codes, offset kept: {1024 + c} (low nibbles, bytes) or
// {1024 + 16 c} (high nibbles, whose query slots carry q / 16). Each tile's scores are a fresh
// accumulator chain, so the offset's share, K_OFF = sum over slots of q * (1024 or 64), is
// removed in f32 per tile (sum q . offset is a constant of the head).
#define K_OFF_LO 1024.0f
#define K_OFF_HI 64.0f

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

// N pieces of P bytes of a row, STEP bytes apart, into dst (zeros when !live).
template <int P, int N, int STEP>
__device__ __forceinline__ void load_row(const u8* row, bool live, u32* dst) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (live) {
            load_piece<P>(row + STEP * i, dst + i * (P / 4));
        } else {
#pragma unroll
            for (int w = 0; w < P / 4; ++w) dst[i * (P / 4) + w] = 0u;
        }
    }
}

// One side's metadata of a token: BYTES = 4 (two values), 2 (a norm) or 0 (a float side);
// zero when !ok.
#define KMETA_BYTES (KVQ_KS == SIDE_FLOAT ? 0 : (IS_LM4(KVQ_KS) ? 2 : 4))
#define VMETA_BYTES (KVQ_VS == SIDE_FLOAT ? 0 : (IS_LM(KVQ_VS) ? 2 : 4))
template <int BYTES>
__device__ __forceinline__ u32 load_meta(const u8* p, bool ok) {
    if constexpr (BYTES == 4) return ok ? __ldg((const unsigned int*)p) : 0u;
    else if constexpr (BYTES == 2) return ok ? (u32)__ldg((const unsigned short*)p) : 0u;
    else return 0u;
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
#if KVQ_KS == SIDE_FLOAT
    d0 = off / 2; d1 = d0 + 1;
    (void)j;
#elif IS_INT8(KVQ_KS)
    d0 = off + j; d1 = d0 + 2;
#elif KVQ_KS == SIDE_PT4
    const int b = off + (j >> 1);
    d0 = b + ((j & 1) ? KVQ_DK / 2 : 0); d1 = d0 + 2;
#elif KVQ_KS == SIDE_TM4
    d0 = 2 * off + 2 * j; d1 = d0 + 1;
#elif IS_LM4(KVQ_KS)
    d0 = 2 * (off + j); d1 = d0 + 1;  // byte off + j: sequential nibbles
#else
    d0 = off + j; d1 = d0 + KVQ_DK / 2;
#endif
}

// Head dim of row `m` (0 .. DV/8) of the lane's V rows: m-tile m/2, row g (m even) or g+8 (odd).
__device__ __forceinline__ int v_row_dim(int g, int m) {
    const int mt = m >> 1, r = m & 1;
#if KVQ_VS == SIDE_FLOAT
    return v_word_off(g, mt) / 2 + r;
#elif IS_INT8(KVQ_VS)
    return v_word_off(g, mt >> 1) + 2 * (mt & 1) + r;
#elif KVQ_VS == SIDE_PT4
    const int sub = mt & 3;
    return v_word_off(g, mt >> 2) + ((sub & 2) ? 2 : 0) + (sub & 1) + r * (KVQ_DV / 2);
#elif KVQ_VS == SIDE_TM4
    const int sub = mt & 3;
    return 2 * v_word_off(g, mt >> 2) + ((sub & 1) ? 4 : 0) + ((sub & 2) ? 1 : 0) + 2 * r;
#elif IS_LM4(KVQ_VS)
    // byte mt % 4 of word mt / 4: low nibble -> row g, high nibble -> row g + 8
    return 2 * (v_word_off(g, mt >> 2) + (mt & 3)) + r;
#else
    // m-tile mt: field mt % 4 (bits 2f, 2f+1: dim byte + f D/4) of bytes 2 (mt / 4) + r
    return v_word_off(g, 0) + 2 * (mt >> 2) + r + (mt & 3) * (KVQ_DV / 4);
#endif
}

// ---- K-side A operands: pair p of one token's words ----
__device__ __forceinline__ u32 k_a(const u32* w, int p) {
    const int wi = p / PPW, j = p % PPW;
    const u32 x = w[wi];
#if KVQ_KS == SIDE_FLOAT
    (void)j;
    return x;
#elif IS_INT8(KVQ_KS)
    return __byte_perm(x, 0x64646464u, j ? 0x4341u : 0x4240u);  // j: 0 -> (e0, e2), 1 -> (e1, e3)
#elif IS_INT4(KVQ_KS)
    // nibbles (j, j+4) of the word: PyTorch j = 0 (b0.lo, b2.lo), 1 (b0.hi, b2.hi), 2 (b1.lo,
    // b3.lo), 3 (b1.hi, b3.hi); TurboMind slots (j, j+4) = elements (2j, 2j+1)
    const u32 y = (j & 2) ? (x >> 8) : x;
    return (j & 1) ? and_or_magic<0x00F000F0u>(y) : and_or_magic<0x000F000Fu>(y);
#else
    (void)x; (void)j;
    return 0u;  // TurboQuant uses tq_k_word below
#endif
}

// Query scaling and offset of K pair p's slots: high-nibble pairs (odd p of a 4-bit codec) hold
// 1024 + 16 c, so their query is q / 16 and their offset 64 q.
__device__ __forceinline__ bool k_pair_hi(int p) {
#if IS_INT4(KVQ_KS)
    return (p & 1) != 0;
#else
    (void)p;
    return false;
#endif
}

// 8-entry f16 table as byte planes: lo[0], lo[1] = low bytes of entries 0-3, 4-7; hi likewise.
struct Lut8 {
    u32 lo0, lo1, hi0, hi1;
};
__device__ __forceinline__ Lut8 lut8_of(const float* c) {
    Lut8 t = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const u16 hb = f32_to_f16(c[i]);
        const int sh = 8 * (i & 3);
        if (i < 4) {
            t.lo0 |= (u32)(hb & 0xFF) << sh;
            t.hi0 |= (u32)(hb >> 8) << sh;
        } else {
            t.lo1 |= (u32)(hb & 0xFF) << sh;
            t.hi1 |= (u32)(hb >> 8) << sh;
        }
    }
    return t;
}

#if IS_LM4(KVQ_KS) || IS_LM4(KVQ_VS)
// 4-bit Lloyd-Max codes n of an odd codebook: C4[n] = M[n - 8] for n >= 8, -M[7 - n] below,
// so a nibble's magnitude index is n & 7, complemented when bit 3 is clear, and bit 3 its sign.
// Magnitude indices of every nibble of x (bit 3 of each cleared).
__device__ __forceinline__ u32 lm4_mag(u32 x) {
    const u32 neg = ((x >> 3) & 0x11111111u) ^ 0x11111111u;  // 1 where bit 3 is clear
    return (x ^ (neg * 7u)) & 0x77777777u;
}
// f16 pair p signed by bits 15 and 31 of sg (the codes' bit 3): a clear bit negates that
// half, p ^ (~sg & 0x80008000) in one LOP3.
__device__ __forceinline__ u32 lm4_sign(u32 p, u32 sg) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xc6;" : "=r"(r) : "r"(sg), "r"(p), "n"(0x80008000u));
    return r;
}
#endif

#if IS_LM4(KVQ_KS)
// The 8 K elements of word x (sequential nibbles): pair j = byte j (low nibble -> low half).
__device__ __forceinline__ void lm4_k_word(u32 x, const Lut8& L, u32* c) {
    const u32 m = lm4_mag(x);
    const u32 sa = m & 0x7777u, sb = (m >> 16) & 0x7777u;
    const u32 la = __byte_perm(L.lo0, L.lo1, sa), ha = __byte_perm(L.hi0, L.hi1, sa);
    const u32 lb = __byte_perm(L.lo0, L.lo1, sb), hb = __byte_perm(L.hi0, L.hi1, sb);
    const u32 y = x << 4;
    c[0] = lm4_sign(__byte_perm(la, ha, 0x5140), __byte_perm(x, y, 0x0040u));
    c[1] = lm4_sign(__byte_perm(la, ha, 0x7362), __byte_perm(x, y, 0x1151u));
    c[2] = lm4_sign(__byte_perm(lb, hb, 0x5140), __byte_perm(x, y, 0x2262u));
    c[3] = lm4_sign(__byte_perm(lb, hb, 0x7362), __byte_perm(x, y, 0x3373u));
}
#endif

#if IS_LM4(KVQ_VS)
// Byte k of tokens t0 (byte 0 of u) and t1 (byte 1): low nibbles -> {t0, t1} pair `lo`, high
// nibbles -> pair `hi`.
__device__ __forceinline__ void lm4_v_pair(u32 u, const Lut8& L, u32& lo, u32& hi) {
    const u32 m = lm4_mag(u) & 0x7777u;
    const u32 la = __byte_perm(L.lo0, L.lo1, m), ha = __byte_perm(L.hi0, L.hi1, m);
    lo = lm4_sign(__byte_perm(la, ha, 0x6240), __byte_perm(u, u << 4, 0x5040u));
    hi = lm4_sign(__byte_perm(la, ha, 0x7351), __byte_perm(u, u, 0x1000u));
}
#endif

#if KVQ_KS == SIDE_TQ3S
// The 8 K elements of word x (pair j = byte j: low nibble -> low half, high nibble -> high half)
// as centroid pairs c[j] and residual-sign pairs s[j] (+-1; bit 3 of a nibble set = positive).
// Four elements per table lookup: the nibbles' low 3 bits are prmt selectors.
__device__ __forceinline__ void tq_k_word(u32 x, const Lut8& L, u32* c, u32* s) {
    const u32 sa = x & 0x7777u, sb = (x >> 16) & 0x7777u;
    const u32 la = __byte_perm(L.lo0, L.lo1, sa), ha = __byte_perm(L.hi0, L.hi1, sa);
    const u32 lb = __byte_perm(L.lo0, L.lo1, sb), hb = __byte_perm(L.hi0, L.hi1, sb);
    c[0] = __byte_perm(la, ha, 0x5140);
    c[1] = __byte_perm(la, ha, 0x7362);
    c[2] = __byte_perm(lb, hb, 0x5140);
    c[3] = __byte_perm(lb, hb, 0x7362);
    const u32 y = x << 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 v = __byte_perm(x, y, 0x0040u + 0x1010u * j);
        s[j] = (v & 0x80008000u) ^ 0xBC00BC00u;
    }
}
#endif
#if IS_LM2(KVQ_VS)
// V: four 2-bit codes at bits 0, 8, 16, 24 of f -> f16 pairs {C2[b0], C2[b1]} and {C2[b2], C2[b3]}
// from the table t01 = {C2[0], C2[1]}, t23 = {C2[2], C2[3]} (entry c at bytes 2c, 2c + 1).
__device__ __forceinline__ void tq_v_quad(u32 f, u32 t01, u32 t23, u32& lo, u32& hi) {
    const u32 sel = f * 0x22u + 0x10101010u;
    lo = __byte_perm(t01, t23, sel);
    hi = __byte_perm(t01, t23, sel >> 16);
}
#endif

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, KVQ_CTAS)
kvq_decode_split(const float* __restrict__ q, const u8* __restrict__ cache, CacheParams p, int layer,
                 const int* __restrict__ block_tables, int bt_stride, const int* __restrict__ ctx_lens,
                 int num_kv_heads, int tokens_per_split, float qk_scale, float* __restrict__ part_o,
                 float* __restrict__ part_ml, int num_splits) {
    __shared__ float s_q[KVQ_G][KVQ_DK];
    __shared__ float s_qsum[KVQ_G], s_qmul[KVQ_G], s_koff[KVQ_G];
    __shared__ float s_m[DEC_WARPS][KVQ_G], s_l[DEC_WARPS][KVQ_G];
    __shared__ float s_o[DEC_WARPS][KVQ_G][KVQ_DV];
    __shared__ int s_blk[DEC_MAX_BLOCKS];

    // KV heads vary fastest over the grid: CTAs that run side by side read the same tokens of
    // neighbouring heads, which a token-major block ([token][head][bytes]) stores contiguously.
    const int kvh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
    const int hq = num_kv_heads * KVQ_G;
    const int bs = (int)p.block_size;
    const int ctx = ctx_lens[b];
    const int t_begin = split * tokens_per_split;
    const int t_end = min(ctx, t_begin + tokens_per_split);

    // ---- the group's queries: rotated (a Hadamard-domain K) and scaled by softmax scale * log2(e) ----
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DK; i += blockDim.x)
        s_q[i / KVQ_DK][i % KVQ_DK] = q[((i64)b * hq + (i64)kvh * KVQ_G) * KVQ_DK + i];
    // The split's block-table entries (the host keeps a split within DEC_MAX_BLOCKS blocks).
    const int bs_shift = __ffs(bs) - 1;  // the block size is a power of two (checked on the host)
    const int* btab = block_tables + (i64)b * bt_stride;
    const int blk_first = t_begin >> bs_shift;
    const int blk_count = t_end > t_begin ? min(((t_end - 1) >> bs_shift) - blk_first + 1, DEC_MAX_BLOCKS) : 0;
    for (int i = threadIdx.x; i < blk_count; i += blockDim.x) s_blk[i] = btab[blk_first + i];
    __syncthreads();

    // Addresses: a block's base in 64 bits, everything inside a block (< layer_bytes) in 32.
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
            const int blk = live ? s_blk[(tt >> bs_shift) - blk_first] : 0;
            const u32 off0 = (u32)(tt & (bs - 1));
            const u8* bp = layer_ptr + (i64)blk * block_stride;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                T.kval[ti][r] = live && (tt + g + 8 * r < t_end);
                load_row<KP, KB / KP, 4 * KP>(bp + (k_off[r] + off0 * kts), live, T.kr[ti][r]);
                T.kmeta[ti][r] = load_meta<KMETA_BYTES>(bp + (km_off[r] + off0 * kmts), live);
                // a masked token's V metadata is zero: its weight is 0 * 0, never 0 * NaN
                T.vmeta[ti][r] = load_meta<VMETA_BYTES>(bp + (vm_off[r] + off0 * vmts), T.kval[ti][r]);
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const bool ok = live && (tt + tv[r] < t_end);
                const u8* row = bp + (v_off[r] + off0 * vts);
                if constexpr (VP >= 4) {
                    load_row<VP, VB / VP, 8 * VP>(row, live, T.vr[ti][r]);
                } else {
                    T.vr[ti][r][0] = live ? (u32)__ldg((const unsigned short*)row) : 0u;
                }
#if KVQ_VS == SIDE_FLOAT
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
    // The first tile's loads need no query: they fly while the query is prepared.
    const int step = 16 * KVQ_TPI, stride = DEC_WARPS * step;
    Tile ta, tb;
    int t0 = t_begin + warp * step;
    if (t0 < t_end) load_iter(ta, t0);

#if KVQ_KROT
    block_wht<KVQ_DK>(&s_q[0][0], KVQ_G);
    const float rot = 1.0f / sqrtf((float)KVQ_DK);
#else
    const float rot = 1.0f;
#endif
    for (int i = threadIdx.x; i < KVQ_G * KVQ_DK; i += blockDim.x) {
        float* x = &s_q[i / KVQ_DK][i % KVQ_DK];
        *x = __fmul_rn(__fmul_rn(*x, rot), qk_scale);
    }
    __syncthreads();
    // Each head's query times the power of two 2^-e that brings its largest element to [1, 2):
    // no overflow and no subnormals in f16; the scores are multiplied back by 2^e in f32. The
    // sum of q (for the zero points) is taken over the rounded operands the products use.
    for (int h = warp; h < KVQ_G; h += DEC_WARPS) {
        float amax = 0.0f;
        for (int d = lane; d < KVQ_DK; d += 32) amax = fmaxf(amax, fabsf(s_q[h][d]));
        amax = warp_max(amax);
        const int e = (amax > 0.0f && amax < 3.0e38f) ? min(max(ilogbf(amax), -100), 100) : 0;
        const float down = __int_as_float((127 - e) << 23);
        float s = 0.0f;
        for (int d = lane; d < KVQ_DK; d += 32) {
            const float x = op_val(op_bits(s_q[h][d] * down));
            s_q[h][d] = x;
            s += x;
        }
        __syncwarp();
        // sum over the K slots of q times the slot's code offset (integer codecs)
        float ko = 0.0f;
        for (int i = lane; i < 4 * 2 * KT; i += 32) {
            const int t = i / (2 * KT), pp = i % (2 * KT);
            int d0, d1;
            k_pair_dims(t, pp, d0, d1);
            ko += (s_q[h][d0] + s_q[h][d1]) * (k_pair_hi(pp) ? K_OFF_HI : K_OFF_LO);
        }
        for (int o = 16; o > 0; o >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, o);
            ko += __shfl_xor_sync(0xffffffffu, ko, o);
        }
        if (lane == 0) {
            s_qsum[h] = s;
            s_qmul[h] = __int_as_float((127 + e) << 23);
            s_koff[h] = ko;
        }
    }
    __syncthreads();

    // B fragments of the K product: column g = head g.
    u32 bq[KT][2];
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            int d0, d1;
            k_pair_dims(tig, 2 * kk + r, d0, d1);
            const float f = k_pair_hi(2 * kk + r) ? 0.0625f : 1.0f;
            const float x0 = g < KVQ_G ? s_q[g][d0] * f : 0.0f, x1 = g < KVQ_G ? s_q[g][d1] * f : 0.0f;
            bq[kk][r] = pack2(op_bits(x0), op_bits(x1));
        }
    }
    // This lane's heads 2 tig + hh: sum of q, and the factor that undoes the query's scaling.
    float qsum[2], qmul[2], koff[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int h = 2 * tig + hh;
        qsum[hh] = h < KVQ_G ? s_qsum[h] : 0.0f;
        qmul[hh] = h < KVQ_G ? s_qmul[h] : 1.0f;
        koff[hh] = h < KVQ_G ? s_koff[h] : 0.0f;
    }

#if KVQ_KS == SIDE_TQ3S
    const float c3[8] = {-2.1519456f, -1.3439093f, -0.7560052f, -0.2450942f,
                         0.2450942f,  0.7560052f,  1.3439093f,  2.1519456f};
    const Lut8 kc = lut8_of(c3);
    const float sigma_k = (float)(1.0 / sqrt((double)KVQ_DK));
#endif
#if IS_LM4(KVQ_KS) || IS_LM4(KVQ_VS)
    const float c4[16] = KVQ_C4_INIT;
    const Lut8 m4 = lut8_of(c4 + 8);  // the magnitudes
#endif
#if IS_LM4(KVQ_KS)
    const float sigma_k = (float)(1.0 / sqrt((double)KVQ_DK));
#endif
#if IS_LM4(KVQ_VS)
    const float sigma_v = (float)(1.0 / sqrt((double)KVQ_DV));
#endif
#if IS_LM2(KVQ_VS)
    const float c2[4] = {-1.5104176f, -0.4527808f, 0.4527808f, 1.5104176f};
    const u32 vc01 = pack2(f32_to_f16(c2[0]), f32_to_f16(c2[1]));
    const u32 vc23 = pack2(f32_to_f16(c2[2]), f32_to_f16(c2[3]));
    const float sigma_v = (float)(1.0 / sqrt((double)KVQ_DV));
#endif

    // ---- running state of this lane's heads 2 tig + hh (all relative to 2^m_run) ----
    float m_run[2], l_run[2], corr[2];
    float o[MT][4];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        m_run[hh] = -f_inf();
        l_run[hh] = 0.0f;
        corr[hh] = 0.0f;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[mt][i] = 0.0f;

    auto compute_iter = [&](const Tile& T) {
        // ---- scores: sc[ti][i], i = 2 r + hh: token g + 8 r, head 2 tig + hh ----
        float sc[KVQ_TPI][4];
#if KVQ_VS != SIDE_FLOAT
        float lv[KVQ_TPI][2];  // log2 |V scale| of tokens g, g + 8 (clamped: finite)
#endif
#pragma unroll
        for (int ti = 0; ti < KVQ_TPI; ++ti) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if KVQ_KS == SIDE_TQ3S
            float acc_s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int wi = 0; wi < KW; ++wi) {
                u32 c0[4], s0[4], c1[4], s1[4];
                tq_k_word(T.kr[ti][0][wi], kc, c0, s0);
                tq_k_word(T.kr[ti][1][wi], kc, c1, s1);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int kk = 2 * wi + h;
                    mma16816(acc, c0[2 * h], c1[2 * h], c0[2 * h + 1], c1[2 * h + 1], bq[kk][0], bq[kk][1]);
                    mma16816(acc_s, s0[2 * h], s1[2 * h], s0[2 * h + 1], s1[2 * h + 1], bq[kk][0], bq[kk][1]);
                }
            }
#elif IS_LM4(KVQ_KS)
#pragma unroll
            for (int wi = 0; wi < KW; ++wi) {
                u32 c0[4], c1[4];
                lm4_k_word(T.kr[ti][0][wi], m4, c0);
                lm4_k_word(T.kr[ti][1][wi], m4, c1);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int kk = 2 * wi + h;
                    mma16816(acc, c0[2 * h], c1[2 * h], c0[2 * h + 1], c1[2 * h + 1], bq[kk][0], bq[kk][1]);
                }
            }
#else
#pragma unroll
            for (int kk = 0; kk < KT; ++kk) {
                const u32 a0 = k_a(T.kr[ti][0], 2 * kk), a1 = k_a(T.kr[ti][1], 2 * kk);
                const u32 a2 = k_a(T.kr[ti][0], 2 * kk + 1), a3 = k_a(T.kr[ti][1], 2 * kk + 1);
                mma16816(acc, a0, a1, a2, a3, bq[kk][0], bq[kk][1]);
            }
#endif
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const u32 km = T.kmeta[ti][r];
                const float m0 = t_load((u16)(km & 0xFFFFu)), m1 = t_load((u16)(km >> 16));
#if KVQ_VS != SIDE_FLOAT
                const float vs = fabsf(t_load((u16)(T.vmeta[ti][r] & 0xFFFFu)));
                lv[ti][r] = __log2f(fminf(fmaxf(vs, 1.0e-30f), 1.0e30f));
#endif
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const float raw = acc[2 * r + hh];
#if KVQ_KS == SIDE_FLOAT
                    float s = raw;
                    (void)m0; (void)m1;
#elif IS_PT(KVQ_KS)
                    // scale (q.c - zero sum q); raw = q.c + K_OFF
                    float s = m0 * ((raw - koff[hh]) - m1 * qsum[hh]);
#elif IS_TM(KVQ_KS)
                    // scale q.c + min sum q; raw = q.c + K_OFF
                    float s = m0 * (raw - koff[hh]) + m1 * qsum[hh];
#elif IS_LM4(KVQ_KS)
                    float s = m0 * (sigma_k * raw);  // norm . sigma . q.C4[i]
                    (void)m1;
#else
                    float s = m0 * (sigma_k * raw + m1 * acc_s[2 * r + hh]);
#endif
                    sc[ti][2 * r + hh] = T.kval[ti][r] ? s * qmul[hh] : -f_inf();
                }
            }
        }

        // ---- online softmax over the iteration's tokens ----
        // One running maximum per head of score + log2 |V scale|: the V weights p * scale are
        // then at most 1, and the probabilities themselves (kept in f32 for the normaliser) at
        // most 2^100 by the clamp of lv.
        float wv[KVQ_TPI][4];  // weights of the V product (f32, before rounding to f16)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float mx = -f_inf();
#pragma unroll
            for (int ti = 0; ti < KVQ_TPI; ++ti) {
#if KVQ_VS == SIDE_FLOAT
                mx = fmaxf(mx, fmaxf(sc[ti][hh], sc[ti][2 + hh]));
#else
                mx = fmaxf(mx, fmaxf(sc[ti][hh] + lv[ti][0], sc[ti][2 + hh] + lv[ti][1]));
#endif
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_new = fmaxf(m_run[hh], mx);
            const float m_use = (m_new == -f_inf()) ? 0.0f : m_new;  // exp2(-inf - m_use) = 0
            float sum = 0.0f, csum = 0.0f;
#pragma unroll
            for (int ti = 0; ti < KVQ_TPI; ++ti)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const float s = sc[ti][2 * r + hh];
                    const float pr = exp2f(s - m_use);
                    sum += pr;
#if KVQ_VS == SIDE_FLOAT
                    wv[ti][2 * r + hh] = pr;
#else
                    const u32 vm = T.vmeta[ti][r];
                    const float m0 = t_load((u16)(vm & 0xFFFFu)), m1 = t_load((u16)(vm >> 16));
                    // (a masked token's metadata was zeroed at load: pr = 0 and finite factors)
                    const float w = pr * m0;
                    wv[ti][2 * r + hh] = w;
#if IS_PT(KVQ_VS)
                    csum += w * (m1 - (float)CODE_OFF);  // sum p scale (zero - OFF)
#elif IS_TM(KVQ_VS)
                    csum += pr * (m1 + (float)CODE_OFF * m0);  // sum p (min + OFF scale)
#else
                    (void)m1;
#endif
#endif
                }
            // Rescale only when the maximum grew (rarely, once a split is under way).
            if (m_new > m_run[hh]) {
                const float alpha = (m_run[hh] == -f_inf()) ? 0.0f : exp2f(m_run[hh] - m_new);
                l_run[hh] *= alpha;
                corr[hh] *= alpha;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    o[mt][hh] *= alpha;
                    o[mt][2 + hh] *= alpha;
                }
                m_run[hh] = m_new;
            }
            l_run[hh] += sum;
            corr[hh] += csum;
        }

        // ---- V product ----
        const int sa = (2 * tig) * 4 + (g >> 1), sb = sa + 4;
        const u32 psel = (g & 1) ? 0x7632u : 0x5410u;
#pragma unroll
        for (int ti = 0; ti < KVQ_TPI; ++ti) {
            // B: rows = tokens (2 tig, 2 tig + 1 | 2 tig + 8, 2 tig + 9), column = head g; the lane
            // holding token t's weights is (t % 8) * 4 + head / 2.
            const u32 src0 = op_pack(wv[ti][0], wv[ti][1]), src1 = op_pack(wv[ti][2], wv[ti][3]);
            const u32 x0 = __shfl_sync(0xffffffffu, src0, sa), y0 = __shfl_sync(0xffffffffu, src0, sb);
            const u32 x1 = __shfl_sync(0xffffffffu, src1, sa), y1 = __shfl_sync(0xffffffffu, src1, sb);
            const u32 b0 = __byte_perm(x0, y0, psel), b1 = __byte_perm(x1, y1, psel);
            const u32* v0 = T.vr[ti][0];
            const u32* v1 = T.vr[ti][1];
            const u32* v8 = T.vr[ti][2];
            const u32* v9 = T.vr[ti][3];
#if IS_LM2(KVQ_VS)
            // bytes k, k+1 of tokens (t0, t1) interleaved: [t0.k, t1.k, t0.k+1, t1.k+1]
            u32 u01[VW * 2], u89[VW * 2];
#pragma unroll
            for (int ub = 0; ub < (VB >= 4 ? 2 : 1); ++ub) {
                const u32 sel = ub ? 0x7362u : 0x5140u;
                u01[ub] = __byte_perm(v0[0], v1[0], sel);
                u89[ub] = __byte_perm(v8[0], v9[0], sel);
            }
#endif
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#if KVQ_VS == SIDE_FLOAT
                const u32 a0 = __byte_perm(v0[mt], v1[mt], 0x5410), a1 = __byte_perm(v0[mt], v1[mt], 0x7632);
                const u32 a2 = __byte_perm(v8[mt], v9[mt], 0x5410), a3 = __byte_perm(v8[mt], v9[mt], 0x7632);
#elif IS_INT8(KVQ_VS)
                // bytes k, k+1 of tokens (t0, t1): u = [t0.k, t1.k, t0.k+1, t1.k+1]
                const int wi = mt >> 1;
                const u32 sel = (mt & 1) ? 0x7362u : 0x5140u;
                const u32 u01 = __byte_perm(v0[wi], v1[wi], sel), u89 = __byte_perm(v8[wi], v9[wi], sel);
                const u32 a0 = bytes_to_h2(u01, 0x4140u), a1 = bytes_to_h2(u01, 0x4342u);
                const u32 a2 = bytes_to_h2(u89, 0x4140u), a3 = bytes_to_h2(u89, 0x4342u);
#elif IS_INT4(KVQ_VS)
                // byte k of tokens (t0, t1) at bytes 0 and 2: low nibble -> row g, high -> row g+8
                const int wi = mt >> 2, sub = mt & 3;
                const u32 k = (u32)(((sub & 2) ? 2 : 0) + (sub & 1));
                const u32 sel = k * 0x11u + (k + 4u) * 0x1100u;
                const u32 u01 = __byte_perm(v0[wi], v1[wi], sel), u89 = __byte_perm(v8[wi], v9[wi], sel);
                const u32 a0 = nib_lo(u01), a1 = nib_hi(u01);
                const u32 a2 = nib_lo(u89), a3 = nib_hi(u89);
#elif IS_LM4(KVQ_VS)
                // byte k of tokens (t0, t1) at bytes 0 and 1: low nibble -> row g, high -> row g+8
                const int wi = mt >> 2, k = mt & 3;
                const u32 sel = (u32)k | ((u32)(k + 4) << 4);
                u32 a0, a1, a2, a3;
                lm4_v_pair(__byte_perm(v0[wi], v1[wi], sel), m4, a0, a1);
                lm4_v_pair(__byte_perm(v8[wi], v9[wi], sel), m4, a2, a3);
#else
                // field f = mt % 4 of bytes (2 ub, 2 ub + 1), ub = mt / 4: rows g and g + 8
                const int ub = mt >> 2, f = mt & 3;
                u32 a0, a1, a2, a3;
                tq_v_quad((u01[ub] >> (2 * f)) & 0x03030303u, vc01, vc23, a0, a1);
                tq_v_quad((u89[ub] >> (2 * f)) & 0x03030303u, vc01, vc23, a2, a3);
#endif
                mma16816(o[mt], a0, a1, a2, a3, b0, b1);
            }
        }
    };

    // Software pipeline: the next iteration's loads are in flight while this one computes.
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
    for (int hh = 0; hh < 2; ++hh) {
        float l = l_run[hh], c = corr[hh];
        for (int off = 4; off < 32; off <<= 1) {
            l += __shfl_xor_sync(0xffffffffu, l, off);
            c += __shfl_xor_sync(0xffffffffu, c, off);
        }
        const int h = 2 * tig + hh;
        if (h < KVQ_G) {
            if (g == 0) {
                s_m[warp][h] = m_run[hh];
                s_l[warp][h] = l;
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float val = o[mt][2 * r + hh];
#if IS_PT(KVQ_VS)
                    val -= c;
#elif IS_TM(KVQ_VS)
                    val += c;
#elif IS_LM(KVQ_VS)
                    val *= sigma_v;
                    (void)c;
#else
                    (void)c;
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

// One CTA of RED_WAYS x KVQ_DV threads per (sequence, query head): way w sums splits w,
// w + RED_WAYS, ... of every dimension, so each thread has only a few independent loads in
// flight and the merge costs about one memory round trip, not one per split.
#define RED_WAYS (512 / KVQ_DV)
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

extern "C" __global__ void __launch_bounds__(512)
kvq_decode_reduce(const float* __restrict__ part_o, const float* __restrict__ part_ml, int num_splits,
                  float* __restrict__ out) {
    __shared__ float s_acc[RED_WAYS][KVQ_DV];
    __shared__ float s_l[RED_WAYS];
    __shared__ float s_scratch[32];
    const i64 bh = blockIdx.x;
    const int d = threadIdx.x % KVQ_DV, way = threadIdx.x / KVQ_DV;
    const float* ml = part_ml + 2 * bh * num_splits;
    const float* po = part_o + bh * num_splits * KVQ_DV;
    float mx = -f_inf();
    for (int s = threadIdx.x; s < num_splits; s += blockDim.x) mx = fmaxf(mx, ml[2 * s]);
    mx = block_reduce(mx, true, s_scratch);
    // a warp shares its way, so the (m, l) loads are broadcasts and the partials coalesce
    float l = 0.0f, acc = 0.0f;
#pragma unroll 4
    for (int s = way; s < num_splits; s += RED_WAYS) {
        const float m = ml[2 * s];
        const float f = (m == -f_inf()) ? 0.0f : exp2f(m - mx);
        l += f * ml[2 * s + 1];
        acc += f * po[(i64)s * KVQ_DV + d];
    }
    s_acc[way][d] = acc;
    if (d == 0) s_l[way] = l;
    __syncthreads();
    float val = 0.0f;
    if (way == 0) {
        float lt = 0.0f;
#pragma unroll
        for (int w = 0; w < RED_WAYS; ++w) {
            lt += s_l[w];
            val += s_acc[w][d];
        }
        val = lt > 0.0f ? val * (1.0f / lt) : 0.0f;
    }
#if KVQ_VROT
    __syncthreads();
    if (way == 0) s_acc[0][d] = val;
    __syncthreads();
    for (int h = 1; h < KVQ_DV; h <<= 1) {
        if (way == 0 && d < KVQ_DV / 2) {
            const int i = (d / h) * 2 * h + (d % h);
            const float x0 = s_acc[0][i], x1 = s_acc[0][i + h];
            s_acc[0][i] = x0 + x1;
            s_acc[0][i + h] = x0 - x1;
        }
        __syncthreads();
    }
    val = __fmul_rn(s_acc[0][d], 1.0f / sqrtf((float)KVQ_DV));
#endif
    if (way == 0) out[bh * KVQ_DV + d] = val;
}
