//! Activation rows quantized to 8-bit blocks for the integer dot products (llama.cpp's `Q8_0` /
//! `Q8_1` activations, with an f32 scale), each block followed by a second 8-bit block of its
//! rounding residual.
//!
//! Block `b` of a row holds 32 values `x` as codes `q = round_half_even(x / d)` with
//! `d = max|x| / 127` (so `|q| ≤ 127`), plus `s = d · Σq`, which the formats with an offset
//! (`Q4_0`'s `−8`, `Q4_1`'s minimum) need. A weight row's dot product with the quantized
//! activation is then exact integer arithmetic per block times one float scale.
//!
//! One 8-bit block moves an element by up to `d/2 = max|x|/254`; on SmolLM2 that alone flips
//! the most likely next token at 1–2.5% of positions against the f32 model. So every input
//! row becomes two quantized rows: the codes above, and the same quantization applied to the
//! residual `x − q·d` (at most `d/2`, so its scale is at most `d/254`). The kernels compute
//! both dot products on the same unpacked weights and add them: the activation is then exact
//! to `max|x|/(254 · 254)` per element, about 15 bits, for roughly 1.4x the arithmetic of one
//! row (decode stays bound by reading the weights).
//!
//! Non-finite input: a block holding NaN gets `d = NaN`, a block holding ±∞ gets `d = ∞`, both
//! with zero codes, so the dot products come out NaN rather than finite garbage. A block whose
//! scale would be subnormal (every `|x| < 127 · f32::MIN_POSITIVE`) is stored as zero.

/// Elements per block.
pub const QK: usize = 32;

/// Quantized activation rows: input row `r` is row `2r` (codes) and row `2r + 1` (codes of the
/// residual), each `[blocks · 32]` in blocks of [`QK`].
#[derive(Debug, Default, Clone)]
pub struct ActQ8 {
    /// Quantized rows: twice the input rows.
    pub rows: usize,
    /// Blocks per row.
    pub blocks: usize,
    /// Codes, `[rows, blocks · 32]`.
    pub qs: Vec<i8>,
    /// Scales, `[rows, blocks]`.
    pub d: Vec<f32>,
    /// `d · Σq` per block, `[rows, blocks]`.
    pub s: Vec<f32>,
}

/// One row of an [`ActQ8`].
#[derive(Debug, Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

impl ActQ8 {
    /// Resizes the buffers for `inputs` input rows of `in_dim` values (a multiple of 32).
    fn reset(&mut self, inputs: usize, in_dim: usize) {
        debug_assert_eq!(in_dim % QK, 0);
        self.rows = 2 * inputs;
        self.blocks = in_dim / QK;
        self.qs.resize(self.rows * in_dim, 0);
        self.d.resize(self.rows * self.blocks, 0.0);
        self.s.resize(self.rows * self.blocks, 0.0);
    }

    pub fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.blocks;
        ActRow {
            qs: &self.qs[r * nb * QK..][..nb * QK],
            d: &self.d[r * nb..][..nb],
            s: &self.s[r * nb..][..nb],
        }
    }

    /// Quantizes `x` (`[rows, in_dim]`) with the scalar reference code.
    pub fn quantize_scalar(&mut self, x: &[f32], in_dim: usize) {
        let inputs = x.len() / in_dim;
        self.reset(inputs, in_dim);
        let nb = self.blocks;
        let mut res = [0f32; QK];
        for r in 0..inputs {
            for b in 0..nb {
                let xb = &x[(r * nb + b) * QK..][..QK];
                let (main, resid) = ((2 * r) * nb + b, (2 * r + 1) * nb + b);
                let q = &mut self.qs[main * QK..][..QK];
                let (d, s) = quantize_block_scalar(xb, q);
                for ((o, &v), &c) in res.iter_mut().zip(xb).zip(q.iter()) {
                    *o = v - c as f32 * d;
                }
                (self.d[main], self.s[main]) = (d, s);
                let (d, s) = quantize_block_scalar(&res, &mut self.qs[resid * QK..][..QK]);
                (self.d[resid], self.s[resid]) = (d, s);
            }
        }
    }

    /// Quantizes `x` with the fastest code this CPU runs; the result is bit-identical to
    /// [`ActQ8::quantize_scalar`].
    pub fn quantize(&mut self, x: &[f32], in_dim: usize) {
        #[cfg(target_arch = "x86_64")]
        if super::Kernel::Avx2.available() {
            self.reset(x.len() / in_dim, in_dim);
            // SAFETY: the CPU has AVX2 (checked above); the buffers hold two rows of codes and
            // scales per input row (reset above).
            unsafe { self.quantize_avx2(x) };
            return;
        }
        self.quantize_scalar(x, in_dim);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let nb = self.blocks;
        for (blk, xb) in x.chunks_exact(QK).enumerate() {
            let (r, b) = (blk / nb, blk % nb);
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let (main, resid) = ((2 * r) * nb + b, (2 * r + 1) * nb + b);
            let (d, s, codes) = x86::quantize_block(v, self.qs.as_mut_ptr().add(main * QK));
            (self.d[main], self.s[main]) = (d, s);
            // The residual x − q·d, multiply then subtract as in the reference.
            let dv = _mm256_set1_ps(d);
            let mut res = v;
            for (r, c) in res.iter_mut().zip(codes) {
                *r = _mm256_sub_ps(*r, _mm256_mul_ps(_mm256_cvtepi32_ps(c), dv));
            }
            let (d, s, _) = x86::quantize_block(res, self.qs.as_mut_ptr().add(resid * QK));
            (self.d[resid], self.s[resid]) = (d, s);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::scale_of;

    /// One block of 32 values (four vectors) to codes at `out`; returns `(d, d · Σq)` and the
    /// codes as 32-bit lanes (zero when the scale is zero or not finite).
    #[inline(always)]
    pub unsafe fn quantize_block(v: [__m256; 4], out: *mut i8) -> (f32, f32, [__m256i; 4]) {
        let sign = _mm256_set1_ps(-0.0);
        let nan = _mm256_or_ps(
            _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[0], v[0]),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[1], v[1]),
            ),
            _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[2], v[2]),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(v[3], v[3]),
            ),
        );
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
            _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
        );
        let amax = if _mm256_movemask_ps(nan) != 0 {
            f32::NAN
        } else {
            let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_max_ss(h, _mm_movehdup_ps(h));
            _mm_cvtss_f32(h)
        };
        let (d, id) = scale_of(amax);
        let out = out as *mut __m256i;
        if id == 0.0 {
            // Zero, NaN or infinite scale: zero codes (the reference's choice).
            _mm256_storeu_si256(out, _mm256_setzero_si256());
            return (d, d * 0.0, [_mm256_setzero_si256(); 4]);
        }
        let idv = _mm256_set1_ps(id);
        // Round to nearest even (the MXCSR default), as `round_ties_even` in the reference.
        let i = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], idv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], idv)),
        ];
        // Σq from the 32-bit codes, before packing.
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01_00_11_10>(sum));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b10_11_00_01>(sum));
        let isum = _mm_cvtsi128_si32(sum);
        // Pack 32-bit → 16-bit → 8-bit; the packs interleave 128-bit lanes, the permute
        // restores element order.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out, p);
        (d, d * isum as f32, i)
    }
}

/// `(d, 1/d)` for a block whose largest magnitude is `amax` (NaN when the block holds NaN).
#[inline(always)]
fn scale_of(amax: f32) -> (f32, f32) {
    if amax.is_nan() {
        return (f32::NAN, 0.0);
    }
    let d = amax / 127.0;
    if d < f32::MIN_POSITIVE {
        (0.0, 0.0)
    } else if d.is_infinite() {
        (d, 0.0)
    } else {
        (d, 1.0 / d)
    }
}

/// The reference quantizer of one block; returns `(d, d · Σq)`.
pub fn quantize_block_scalar(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let mut amax = 0f32;
    let mut nan = false;
    for &v in x {
        nan |= v.is_nan();
        amax = amax.max(v.abs());
    }
    let (d, id) = scale_of(if nan { f32::NAN } else { amax });
    if id == 0.0 {
        q.fill(0);
        return (d, d * 0.0);
    }
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        // |v · id| ≤ 127 (up to rounding of id), so the cast never saturates for finite input.
        let c = (v * id).round_ties_even() as i32;
        *o = c as i8;
        sum += c;
    }
    (d, d * sum as f32)
}
