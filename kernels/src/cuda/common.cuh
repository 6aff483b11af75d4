// Shared by every kvq kernel. Compiled by NVRTC with no system headers: the f16/bf16
// conversions are PTX or bit arithmetic, so nothing needs cuda_fp16.h.
//
// Specialisation macros, set by the launcher with -D:
//   KVQ_KS, KVQ_VS  how the K and the V side are stored (SIDE_* below)
//   KVQ_KROT, KVQ_VROT  1 when that side lives in the Hadamard domain (the query is rotated
//              for K, the output rotated back for V; a rotated int side is encoded after it)
//   KVQ_DTYPE  0 f16, 1 bf16 (the cache's and metadata's model dtype)
//   KVQ_DK, KVQ_DV  head dims of K and V

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define SIDE_FLOAT 0  // the model dtype (policy 0)
#define SIDE_PT8 1    // PyTorch-engine int8: (scale, zero)
#define SIDE_PT4 2    // PyTorch-engine int4, half-split nibbles
#define SIDE_TM8 3    // TurboMind int8: (scale, min)
#define SIDE_TM4 4    // TurboMind int4, interleaved nibbles
#define SIDE_TQ3S 5   // TurboQuant K: 3-bit Lloyd-Max + residual sign, (norm, residual norm)
#define SIDE_LM2 6    // 2-bit Lloyd-Max, norm (policy 42's V)
#define SIDE_LM2U 7   // 2-bit Lloyd-Max, norm with <x^, x> = |x|^2 (decodes as SIDE_LM2)
#define SIDE_LM4 8    // 4-bit Lloyd-Max (sequential nibbles), norm
#define SIDE_LM4U 9   // 4-bit Lloyd-Max, norm with <x^, x> = |x|^2 (decodes as SIDE_LM4)

#ifndef KVQ_KS
#define KVQ_KS SIDE_FLOAT
#endif
#ifndef KVQ_VS
#define KVQ_VS SIDE_FLOAT
#endif
#ifndef KVQ_KROT
#define KVQ_KROT 0
#endif
#ifndef KVQ_VROT
#define KVQ_VROT 0
#endif
#define IS_PT(s) ((s) == SIDE_PT8 || (s) == SIDE_PT4)
#define IS_TM(s) ((s) == SIDE_TM8 || (s) == SIDE_TM4)
#define IS_INT8(s) ((s) == SIDE_PT8 || (s) == SIDE_TM8)
#define IS_INT4(s) ((s) == SIDE_PT4 || (s) == SIDE_TM4)
#define IS_LM2(s) ((s) == SIDE_LM2 || (s) == SIDE_LM2U)
#define IS_LM4(s) ((s) == SIDE_LM4 || (s) == SIDE_LM4U)
#define IS_LM(s) (IS_LM2(s) || IS_LM4(s))

#ifndef KVQ_DTYPE
#define KVQ_DTYPE 0
#endif
#ifndef KVQ_DK
#define KVQ_DK 128
#endif
#ifndef KVQ_DV
#define KVQ_DV 128
#endif

// One of the four per-token arrays of a block: offset + head * head_stride + token * token_stride.
struct Region {
    i64 offset;
    i64 head_stride;
    i64 token_stride;
};

// The byte layout of the cache (engine_core::cache::CacheLayout), flattened.
struct CacheParams {
    Region kd, vd, km, vm;
    i64 layer_bytes;
    i64 num_blocks;
    i64 num_layers;
    i64 block_size;
    i64 layer_major;  // 1: [layer][block][bytes]; 0: [block][layer][bytes]
};

__device__ __forceinline__ i64 layer_block_base(const CacheParams& p, int layer, i64 block) {
    return p.layer_major ? ((i64)layer * p.num_blocks + block) * p.layer_bytes
                         : (block * p.num_layers + layer) * p.layer_bytes;
}

__device__ __forceinline__ float f_inf() { return __int_as_float(0x7f800000); }

// ---- f16 / bf16 <-> f32, round to nearest even, as the `half` crate ----
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

#if KVQ_DTYPE == 0
__device__ __forceinline__ float t_load(u16 h) { return f16_to_f32(h); }
__device__ __forceinline__ u16 t_store(float f) { return f32_to_f16(f); }
#define T_MAX 65504.0f
#else
__device__ __forceinline__ float t_load(u16 h) { return bf16_to_f32(h); }
__device__ __forceinline__ u16 t_store(float f) { return f32_to_bf16(f); }
#define T_MAX 3.38953139e38f
#endif

__device__ __forceinline__ float t_round(float x) { return t_load(t_store(x)); }
// NaN -> 0, +-inf -> +-T_MAX (engine_core::dtype::sanitize).
__device__ __forceinline__ float sanitize(float x) {
    return isnan(x) ? 0.0f : fminf(fmaxf(x, -T_MAX), T_MAX);
}
__device__ __forceinline__ float t_round_sat(float x) { return t_round(fminf(fmaxf(x, -T_MAX), T_MAX)); }

// ---- the Walsh-Hadamard transform of `rows` vectors of D floats in shared memory ----
// Unnormalized (callers scale by 1/sqrt(D)), by the whole block; the vectors must be written
// and synchronized before, and the block is synchronized after.
template <int D>
__device__ __forceinline__ void block_wht(float* x, int rows) {
    for (int h = 1; h < D; h <<= 1) {
        for (int i = threadIdx.x; i < rows * D / 2; i += blockDim.x) {
            float* v = x + (i / (D / 2)) * D;
            const int k = i % (D / 2), j = (k / h) * 2 * h + (k % h);
            const float x0 = v[j], x1 = v[j + h];
            v[j] = x0 + x1;
            v[j + h] = x0 - x1;
        }
        __syncthreads();
    }
}

// ---- warp reductions ----
__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- TurboQuant Lloyd-Max codebooks at sigma = 1 (backend-pytorchlike lloyd_max.rs) ----
__constant__ float KVQ_C2[4] = {-1.5104176f, -0.4527808f, 0.4527808f, 1.5104176f};
__constant__ float KVQ_B2[3] = {-0.9815992f, 0.0f, 0.9815992f};
__constant__ float KVQ_C3[8] = {-2.1519456f, -1.3439093f, -0.7560052f, -0.2450942f,
                                0.2450942f,  0.7560052f,  1.3439093f,  2.1519456f};
__constant__ float KVQ_B3[7] = {-1.7479274f, -1.0499573f, -0.5005497f, 0.0f,
                                0.5005497f,  1.0499573f,  1.7479274f};
// 4-bit: odd-symmetric, C4[15 - i] = -C4[i]; the decoder keeps the magnitudes C4[8..16).
#define KVQ_C4_INIT                                                                                \
    {-2.7325896f, -2.0690172f, -1.6180464f, -1.2562312f, -0.9423405f, -0.6567591f, -0.3880483f,   \
     -0.128395f,  0.128395f,   0.3880483f,  0.6567591f,  0.9423405f,  1.2562312f,  1.6180464f,   \
     2.0690172f,  2.7325896f}
__constant__ float KVQ_C4[16] = KVQ_C4_INIT;
__constant__ float KVQ_B4[15] = {-2.4008034f, -1.8435318f, -1.4371388f, -1.0992858f, -0.7995498f,
                                 -0.5224037f, -0.2582217f, 0.0f,        0.2582217f,  0.5224037f,
                                 0.7995498f,  1.0992858f,  1.4371388f,  1.8435318f,  2.4008034f};
