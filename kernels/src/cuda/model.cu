// The dense parts of a Llama forward pass around the cuBLAS GEMMs: embedding gather, RMSNorm
// (fused with the residual add), rotary embedding (fused with splitting the QKV GEMM output),
// SwiGLU (on the fused gate|up GEMM output), f32 -> f16 casts, greedy argmax.
// Activations are f32 (the residual stream and the GEMM outputs); GEMM inputs are f16.
// Each kernel follows the CPU op's arithmetic (engine_core::ops), in f32.

#define NORM_THREADS 256

__device__ __forceinline__ float block_sum(float v, float* shm) {
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += shm[w];
    __syncthreads();
    return t;
}

// x[r, :] = table[tokens[r], :] (f16 table), one CTA per row.
extern "C" __global__ void kvq_embed(const u16* __restrict__ table, const int* __restrict__ tokens,
                                     float* __restrict__ x, int hidden) {
    const int r = blockIdx.x;
    const u16* row = table + (i64)tokens[r] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(i64)r * hidden + i] = f16_to_f32(row[i]);
}

// Optionally x[r] += o[r] (the residual add), then out[r] = f16(x[r] / rms(x[r]) * w).
// One CTA of NORM_THREADS per row; `src[r]` picks the row of x (identity when src is null).
extern "C" __global__ void kvq_add_rmsnorm(float* __restrict__ x, const float* __restrict__ o,
                                           int add, const int* __restrict__ src,
                                           const float* __restrict__ w, u16* __restrict__ out,
                                           int hidden, float eps) {
    __shared__ float shm[NORM_THREADS / 32];
    const int r = blockIdx.x;
    const i64 xr = (i64)(src ? src[r] : r) * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = x[xr + i];
        if (add) {
            v += o[xr + i];
            x[xr + i] = v;
        }
        ss += v * v;
    }
    const float ms = block_sum(ss, shm) / (float)hidden;
    const float inv = 1.0f / sqrtf(ms + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(i64)r * hidden + i] = f32_to_f16(x[xr + i] * (inv * w[i]));
}

// x += o over n elements.
extern "C" __global__ void kvq_add(float* __restrict__ x, const float* __restrict__ o, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        x[i] += o[i];
}

// Splits the fused QKV GEMM output (`qkv`, [rows, q_dim + k_dim + v_dim]) into q ([rows, heads,
// 2·half]), k ([rows, kv_heads, 2·half]) and v ([rows, v_dim]), with rotate-half RoPE applied to
// q and k at each row's position (the host's cos/sin tables, [positions, half]). Splitting here
// keeps q, k and v contiguous for the store and decode kernels without a launch of its own.
// One CTA per row.
extern "C" __global__ void kvq_rope(const float* __restrict__ qkv, float* __restrict__ q,
                                    float* __restrict__ k, float* __restrict__ v,
                                    const int* __restrict__ pos, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, int heads, int kv_heads,
                                    int half, int v_dim) {
    const int r = blockIdx.x;
    const int qk_dim = (heads + kv_heads) * 2 * half;
    const float* src = qkv + (i64)r * (qk_dim + v_dim);
    const float* c = cos_t + (i64)pos[r] * half;
    const float* s = sin_t + (i64)pos[r] * half;
    const int total = (heads + kv_heads) * half;
    for (int t = threadIdx.x; t < total; t += blockDim.x) {
        int h = t / half, i = t - h * half;
        // The fused row holds the q heads, then the k heads, each 2·half wide.
        const float* in = src + (i64)h * 2 * half;
        float* out = h < heads ? q + ((i64)r * heads + h) * 2 * half
                               : k + ((i64)r * kv_heads + (h - heads)) * 2 * half;
        float x0 = in[i], x1 = in[i + half];
        out[i] = x0 * c[i] - x1 * s[i];
        out[i + half] = x1 * c[i] + x0 * s[i];
    }
    for (int i = threadIdx.x; i < v_dim; i += blockDim.x) v[(i64)r * v_dim + i] = src[qk_dim + i];
}

// out[r, i] = f16(silu(gate[r, i]) * up[r, i]) over n = rows · ff elements, gate and up read
// from the fused gate|up GEMM output `gu` ([rows, 2·ff]: a row's gate, then its up).
extern "C" __global__ void kvq_silu_mul(const float* __restrict__ gu, u16* __restrict__ out, int ff,
                                        i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / ff, j = i - r * ff;
        const float* row = gu + r * 2 * ff;
        float g = row[j];
        out[i] = f32_to_f16(g / (1.0f + expf(-g)) * row[ff + j]);
    }
}

// out = f16(x) over n elements.
extern "C" __global__ void kvq_to_f16(const float* __restrict__ x, u16* __restrict__ out, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = f32_to_f16(x[i]);
}

// out[r] = the first index of the largest logit of row r (NaN never wins). One CTA per row.
extern "C" __global__ void kvq_argmax(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
    __shared__ float best_v[NORM_THREADS];
    __shared__ int best_i[NORM_THREADS];
    const float* row = logits + (i64)blockIdx.x * vocab;
    float bv = -f_inf();
    int bi = vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > bv) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            float ov = best_v[threadIdx.x + s];
            int oi = best_i[threadIdx.x + s];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] < vocab ? best_i[0] : 0;
}
