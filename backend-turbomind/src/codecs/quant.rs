//! TurboMind's per-(token, KV head) asymmetric min/max quantizer (`quantization.h`), shared by
//! the int8 and int4 sides: they differ only in the number of levels and in how codes are
//! packed.
//!
//! TurboMind computes in the model dtype T (half or bf16). We emulate that on the CPU by
//! rounding every intermediate to T with [`KvDtype::round`]. One f32 subtraction or
//! multiplication of two T values rounded once to T gives exactly the T operation (f32 carries
//! at least 2p + 2 significand bits for p = 11 and p = 8), so codes match TurboMind's except
//! where its `fast_reciprocal` (an approximate f32 reciprocal) lands on the other side of a T
//! rounding boundary than our exact one.

use engine_core::dtype::{sanitize, KvDtype};

/// Scale and zero point of one vector, both rounded to T: the decoder must use the stored
/// values, never the f32 ones the encoder started from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub scale: f32,
    /// TurboMind's zero point is the vector's minimum itself, not `-min / scale`.
    pub zero: f32,
}

impl Params {
    /// Metadata bytes of one vector: `[scale, zero]` in T (`Array<T, 2>` in TurboMind).
    pub fn bytes(dtype: KvDtype) -> usize {
        2 * dtype.size_bytes()
    }

    pub fn store(self, dtype: KvDtype, meta: &mut [u8]) {
        dtype.store_at(self.scale, meta, 0);
        dtype.store_at(self.zero, meta, 1);
    }

    #[inline]
    pub fn load(dtype: KvDtype, meta: &[u8]) -> Self {
        Self {
            scale: dtype.load_at(meta, 0),
            zero: dtype.load_at(meta, 1),
        }
    }

    /// `q·scale + zero` in f32. TurboMind uses an FMA in T (`__hfma`), which also rounds the
    /// result to T; we keep the f32 value so the fused `dot`/`axpy` forms agree with `decode`
    /// to f32 precision (the two differ by at most half an ulp of T). The decoders compute
    /// exactly this, vectorized (`engine_core::ops::dequant::affine_rows`); the tests hold them to it.
    #[cfg(test)]
    #[inline]
    pub fn decode(self, q: u8) -> f32 {
        f32::from(q) * self.scale + self.zero
    }

    /// `[scale, zero]`: the per-vector coefficients of the vectorized `c · scale + zero`.
    #[inline]
    pub fn mul_add(self) -> [f32; 2] {
        [self.scale, self.zero]
    }

    /// `⟨q, x̂⟩ = scale·Σ qᵢcᵢ + zero·Σ qᵢ`.
    #[inline]
    pub fn dot(self, sums: DotSums) -> f32 {
        self.scale * sums.qc + self.zero * sums.q
    }

    /// Coefficients `(p·scale, p·zero)` so that `out += p·x̂` is `out += a·c + b` per element.
    #[inline]
    pub fn axpy_coefficients(self, p: f32) -> (f32, f32) {
        (p * self.scale, p * self.zero)
    }
}

/// The quantizer for `bits`-bit codes in dtype T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmQuantizer {
    pub bits: u32,
    pub dtype: KvDtype,
}

impl TmQuantizer {
    /// Largest code: `2^bits − 1`.
    pub fn max_code(self) -> u8 {
        ((1u32 << self.bits) - 1) as u8
    }

    /// Largest magnitude an input keeps: T's largest finite value, but at most 2^126 so that
    /// `mx − mn` and the decoded `L·scale + mn` stay finite in f32. Only bf16 and f32 caches
    /// reach that limit, for values no activation has.
    fn limit(self) -> f32 {
        self.dtype.max_finite().min(2f32.powi(126))
    }

    /// An input element as the TurboMind kernel holds it: in T. Non-finite values are first
    /// [`sanitize`]d (NaN → 0, ±inf → ±T::MAX) so one bad activation cannot poison the
    /// vector's scale and with it every later attention output; see also [`Self::limit`].
    #[cfg(test)]
    pub fn to_model_dtype(self, x: f32) -> f32 {
        let limit = self.limit();
        self.dtype
            .round(sanitize(x, self.dtype).clamp(-limit, limit))
    }

    /// Computes the vector's params and returns the per-element encoder: the scalar
    /// reference that [`Self::quantize`] is tested against.
    #[cfg(test)]
    pub fn encoder(self, x: &[f32]) -> Encoder {
        let t: Vec<f32> = x.iter().map(|&v| self.to_model_dtype(v)).collect();
        self.encoder_in_t(&t)
    }

    /// Codes of the vector `x` into `codes` (one per element, unpacked); returns the params
    /// to store. This is `encoder(x).code(xᵢ)` for every element, with T's roundings done a
    /// vector at a time.
    pub fn quantize(self, x: &[f32], codes: &mut [u8]) -> Params {
        let mut t = x.to_vec();
        self.to_model_dtype_in_place(&mut t);
        let enc = self.encoder_in_t(&t);
        enc.codes_in_t(&mut t, codes);
        enc.params
    }

    /// `to_model_dtype` of every element.
    fn to_model_dtype_in_place(self, x: &mut [f32]) {
        let limit = self.limit();
        for v in x.iter_mut() {
            *v = sanitize(*v, self.dtype).clamp(-limit, limit);
        }
        self.dtype.round_slice(x);
    }

    /// [`Self::encoder`] of a vector already in T.
    fn encoder_in_t(self, t: &[f32]) -> Encoder {
        let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in t {
            mn = mn.min(v);
            mx = mx.max(v);
        }
        if t.is_empty() {
            (mn, mx) = (0.0, 0.0);
        }
        // TurboMind: (float(mx) − float(mn)) · fast_reciprocal(levels) in f32, stored as T.
        let scale = self
            .dtype
            .round((mx - mn) * (1.0 / f32::from(self.max_code())));
        Encoder {
            params: Params { scale, zero: mn },
            // inf when the scale is 0 (constant vector): see `Encoder::code`.
            inv_scale: self.dtype.round(1.0 / scale),
            quantizer: self,
        }
    }
}

/// Encodes the elements of one vector once its params are known.
#[derive(Clone, Copy, Debug)]
pub struct Encoder {
    params: Params,
    inv_scale: f32,
    quantizer: TmQuantizer,
}

impl Encoder {
    #[cfg(test)]
    pub fn params(&self) -> Params {
        self.params
    }

    /// `min(cvt.rni.sat.u8((x − zero)·inv_scale), max_code)` with both operations in T.
    ///
    /// A constant vector has scale 0 and `inv_scale = inf`, so `(x − zero)·inv_scale` is
    /// `0·inf = NaN`, which the saturating conversion turns into 0: the vector decodes to
    /// `zero`, i.e. exactly to its (T-rounded) value.
    ///
    /// As in TurboMind, an element more than T::MAX above the minimum (an f16 vector spanning
    /// more than 65504) overflows `x − zero` to inf and takes the top code.
    #[cfg(test)]
    pub fn code(&self, x: f32) -> u8 {
        let t = self.quantizer.dtype;
        let d = t.round(self.quantizer.to_model_dtype(x) - self.params.zero);
        let v = t.round(d * self.inv_scale);
        cvt_rni_sat_u8(v).min(self.quantizer.max_code())
    }

    /// The codes of elements already in T, a vector's rounding at a time (`code`, the scalar
    /// reference, does the same per element); `t` is used as scratch.
    fn codes_in_t(&self, t: &mut [f32], codes: &mut [u8]) {
        let dtype = self.quantizer.dtype;
        t.iter_mut().for_each(|v| *v -= self.params.zero);
        dtype.round_slice(t);
        t.iter_mut().for_each(|v| *v *= self.inv_scale);
        dtype.round_slice(t);
        let top = self.quantizer.max_code();
        for (c, &v) in codes.iter_mut().zip(t.iter()) {
            *c = cvt_rni_sat_u8(v).min(top);
        }
    }
}

/// PTX `cvt.rni.sat.u8.f32`: round half to even, saturate to `[0, 255]`, NaN → 0.
#[inline]
pub fn cvt_rni_sat_u8(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        // Clamping first does not change the result; on `[0, 255]` adding and removing 2^23
        // rounds half to even without a libm call (the baseline x86-64 target has no
        // `roundss`).
        let c = v.clamp(0.0, 255.0);
        ((c + 8_388_608.0) - 8_388_608.0) as u8
    }
}

/// `Σ qᵢcᵢ` and `Σ qᵢ` of a fused dot product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DotSums {
    pub qc: f32,
    pub q: f32,
}

/// Accumulates [`DotSums`] in eight independent lanes, which the compiler keeps in one SIMD
/// register, and matches int4's eight-element groups.
#[derive(Clone, Copy, Debug, Default)]
pub struct DotAccumulator {
    qc: [f32; 8],
    q: [f32; 8],
}

impl DotAccumulator {
    #[inline]
    pub fn add_group(&mut self, q: &[f32], codes: [u8; 8]) {
        for j in 0..8 {
            self.qc[j] += q[j] * f32::from(codes[j]);
            self.q[j] += q[j];
        }
    }

    #[inline]
    pub fn finish(self) -> DotSums {
        DotSums {
            qc: self.qc.iter().sum(),
            q: self.q.iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_equals_round_ties_even_then_clamp() {
        let mut x = -300.0f32;
        while x < 300.0 {
            for v in [x, x + 0.5, x + 0.499_999_97, x + 0.500_000_06] {
                let want = v.round_ties_even().clamp(0.0, 255.0) as u8;
                assert_eq!(cvt_rni_sat_u8(v), want, "{v}");
            }
            x += 0.25;
        }
        for v in [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -0.0, 1e-30] {
            assert_eq!(
                cvt_rni_sat_u8(v),
                v.round_ties_even().clamp(0.0, 255.0) as u8
            );
        }
    }

    #[test]
    fn conversion_rounds_ties_to_even_saturates_and_maps_nan_to_zero() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (3.49, 3),
            (254.5, 254),
            (255.5, 255),
            (300.0, 255),
            (-3.0, 0),
            (f32::INFINITY, 255),
            (f32::NEG_INFINITY, 0),
            (f32::NAN, 0),
        ];
        for (v, want) in cases {
            assert_eq!(cvt_rni_sat_u8(v), want, "{v}");
        }
    }

    #[test]
    fn quantize_equals_the_scalar_encoder_on_random_vectors() {
        use engine_core::testing::{fresh_seed, gaussian, rng};
        let mut r = rng(fresh_seed("tm quantize vs scalar"));
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::F32] {
            for bits in [4, 8] {
                let q = TmQuantizer { bits, dtype };
                for (n, spread) in [(8usize, 1.0f32), (64, 3.0), (128, 1e4), (72, 1e-6)] {
                    let mut x: Vec<f32> = gaussian(&mut r, n).iter().map(|v| v * spread).collect();
                    if n == 128 {
                        (x[3], x[9], x[17]) = (f32::NAN, f32::INFINITY, -1e38);
                    }
                    let mut codes = vec![0xAAu8; n];
                    let params = q.quantize(&x, &mut codes);
                    let enc = q.encoder(&x);
                    assert_eq!(params, enc.params(), "{dtype:?} int{bits} n {n}");
                    for (i, (&c, &v)) in codes.iter().zip(&x).enumerate() {
                        assert_eq!(
                            c,
                            enc.code(v),
                            "{dtype:?} int{bits} n {n} element {i} = {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn params_of_the_worked_example_are_rounded_to_t() {
        let x = [0.50f32, -1.25, 0.75, 2.00, -0.10, 0.30, -2.50, 1.10];
        let q = TmQuantizer {
            bits: 4,
            dtype: KvDtype::F16,
        };
        let p = q.encoder(&x).params();
        assert_eq!(p.scale, KvDtype::F16.round(0.3));
        assert_eq!(p.zero, -2.5);
    }

    #[test]
    fn constant_vector_encodes_to_code_zero_with_zero_scale() {
        let q = TmQuantizer {
            bits: 8,
            dtype: KvDtype::Bf16,
        };
        let e = q.encoder(&[1.75; 16]);
        assert_eq!(
            e.params(),
            Params {
                scale: 0.0,
                zero: 1.75
            }
        );
        assert_eq!(e.code(1.75), 0);
    }

    #[test]
    fn f16_difference_overflow_takes_the_top_code_as_in_turbomind() {
        let q = TmQuantizer {
            bits: 8,
            dtype: KvDtype::F16,
        };
        let e = q.encoder(&[-40000.0, 0.0, 40000.0]);
        // 30000 − (−40000) = 70000 > 65504: inf in half arithmetic, though the nearest level is 223.
        assert_eq!(e.code(30000.0), 255);
        assert_eq!(e.code(0.0), 128);
    }

    #[test]
    fn extreme_inputs_keep_scale_and_decode_finite() {
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::F32] {
            for bits in [4, 8] {
                let q = TmQuantizer { bits, dtype };
                let limit = q.limit();
                let x = [
                    f32::NEG_INFINITY,
                    0.0,
                    f32::INFINITY,
                    1.0,
                    -f32::MAX,
                    f32::MAX,
                    f32::NAN,
                    3.0,
                ];
                let e = q.encoder(&x);
                let p = e.params();
                assert!(p.scale.is_finite() && p.scale > 0.0, "{p:?}");
                assert_eq!(e.code(-f32::MAX), 0);
                assert_eq!(p.decode(0), -limit);
                // T arithmetic may land the maximum a code or two low (bf16 int8): still close.
                let top = p.decode(e.code(f32::MAX));
                assert!(
                    (top - limit).abs() <= limit * 0.03,
                    "{dtype:?} int{bits}: {top} vs {limit}"
                );
                assert!(p.decode(q.max_code()).is_finite());
            }
        }
    }
}
