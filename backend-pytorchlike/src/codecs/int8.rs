//! Policy 8 with PyTorch-engine semantics: one byte per element, `[scale, zero]` in the model
//! dtype per (token, head). See [`super::affine`] for the formulas and the constant-vector rule.
//!
//! LMDeploy's Triton kernel does this arithmetic at the model dtype's precision; we use f32, so
//! codes can differ from upstream by one near ties (upstream's own test allows ±2.5 codes).
//!
//! Non-finite input is sanitized first (NaN → 0, ±inf → ± the dtype's largest value), so one
//! bad activation cannot poison the metadata of its vector.

use engine_core::codec::{EntryRun, SideBytes, SideCodec};
use engine_core::ops::dequant::{affine_rows, Affine, Packing};
use engine_core::KvDtype;

use super::affine::{load_scale_zero, meta_bytes, sub_mul, AffineParams};

const LEVELS: u8 = 255;

/// The int8 side codec for vectors of `dim` elements.
#[derive(Debug, Clone)]
pub struct Int8Side {
    dim: usize,
    dtype: KvDtype,
}

impl Int8Side {
    pub fn new(dim: usize, dtype: KvDtype) -> Self {
        Self { dim, dtype }
    }
}

impl SideCodec for Int8Side {
    fn dim(&self) -> usize {
        self.dim
    }

    fn bytes(&self) -> SideBytes {
        SideBytes {
            data: self.dim,
            meta: meta_bytes(self.dtype),
        }
    }

    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        let p = AffineParams::fit(x, LEVELS, self.dtype);
        for (c, &v) in data[..self.dim].iter_mut().zip(x) {
            *c = p.code(v, LEVELS, self.dtype);
        }
        p.store(self.dtype, meta);
    }

    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (data, meta) = (&data[..self.dim], EntryRun::single(meta));
        self.decode_run(EntryRun::single(data), meta, out)
    }

    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        let dtype = self.dtype;
        // (c − zero) · scale per element, vectorized.
        affine_rows(
            data,
            Packing::Bytes,
            Affine::SubMul,
            |i| sub_mul(dtype, meta.entry(i)),
            out,
        );
    }

    /// `scale · Σ qᵢ (cᵢ − zero)`, reading the codes in place.
    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let (scale, zero) = load_scale_zero(self.dtype, meta);
        let acc: f32 = q[..self.dim]
            .iter()
            .zip(data)
            .map(|(&qi, &c)| qi * (c as f32 - zero))
            .sum();
        scale * acc
    }

    /// `out += (p · scale) · (c − zero)`, reading the codes in place.
    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (scale, zero) = load_scale_zero(self.dtype, meta);
        let ps = p * scale;
        for (o, &c) in out[..self.dim].iter_mut().zip(data) {
            *o += ps * (c as f32 - zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::test_support::{
        assert_within_affine_bound, constant_vector, vector_strategy, EXAMPLE_X,
    };
    use proptest::prelude::*;

    fn encode(side: &Int8Side, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let b = side.bytes();
        let (mut d, mut m) = (vec![0u8; b.data], vec![0u8; b.meta]);
        side.encode(x, &mut d, &mut m);
        (d, m)
    }

    fn decode(side: &Int8Side, d: &[u8], m: &[u8]) -> Vec<f32> {
        let mut out = vec![f32::NAN; side.dim()];
        side.decode(d, m, &mut out);
        out
    }

    /// Reference §3.7, PyTorch INT8, derived in fp32.
    #[test]
    fn known_answer_fp32() {
        let side = Int8Side::new(8, KvDtype::F32);
        let (d, m) = encode(&side, &EXAMPLE_X);
        assert_eq!(d, [170, 71, 184, 255, 136, 159, 0, 204]);
        let (scale, zero) = load_scale_zero(KvDtype::F32, &m);
        assert!((scale - 0.017_647_06).abs() < 1e-7, "{scale}");
        assert!((zero - 141.666_66).abs() < 1e-4, "{zero}");
    }

    /// With f16 metadata the codes are the same (computed from the unrounded pair) and the
    /// stored pair is the f16 rounding of the fp32 one.
    #[test]
    fn known_answer_f16_metadata() {
        let side = Int8Side::new(8, KvDtype::F16);
        let (d, m) = encode(&side, &EXAMPLE_X);
        assert_eq!(d, [170, 71, 184, 255, 136, 159, 0, 204]);
        let (scale, zero) = load_scale_zero(KvDtype::F16, &m);
        assert_eq!(scale, KvDtype::F16.round(4.5 / 255.0));
        assert_eq!(zero, KvDtype::F16.round(141.666_67));
    }

    #[test]
    fn constant_vectors_decode_exactly() {
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::F32] {
            let side = Int8Side::new(64, dtype);
            for c in [0.0f32, -0.0, 1.0, -3.7, 1234.5, -65504.0, 1e-6] {
                let x = constant_vector(c, 64, dtype);
                let (d, m) = encode(&side, &x);
                assert_eq!(decode(&side, &d, &m), x, "{dtype:?} constant {c}");
            }
        }
    }

    #[test]
    fn zero_point_overflow_falls_back_to_min_instead_of_garbage() {
        // zero = -min/scale ≈ -4.8e5 does not fit f16: every element decodes to min.
        let side = Int8Side::new(4, KvDtype::F16);
        let x = [60000.0f32, 60032.0, 60016.0, 60008.0];
        let (d, m) = encode(&side, &x);
        let out = decode(&side, &d, &m);
        assert!(out.iter().all(|&v| v == 60000.0), "{out:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn error_within_scale_half_plus_metadata_rounding(
            x in vector_strategy(&[64, 96, 128]),
            dtype in prop::sample::select(vec![KvDtype::F16, KvDtype::Bf16]),
        ) {
            let side = Int8Side::new(x.len(), dtype);
            let (d, m) = encode(&side, &x);
            let out = decode(&side, &d, &m);
            assert_within_affine_bound(&x, &out, &m, LEVELS, dtype);
        }

        #[test]
        fn stored_codes_are_the_quantizer_codes(x in vector_strategy(&[64, 96, 128])) {
            let dtype = KvDtype::F16;
            let side = Int8Side::new(x.len(), dtype);
            let (d, m) = encode(&side, &x);
            let p = AffineParams::fit(&x, LEVELS, dtype);
            let want: Vec<u8> = x.iter().map(|&v| p.code(v, LEVELS, dtype)).collect();
            prop_assert_eq!(&d, &want);
            // Each decoded element is exactly (code − zero)·scale of the stored pair.
            let (s, z) = load_scale_zero(dtype, &m);
            let out = decode(&side, &d, &m);
            for (o, &c) in out.iter().zip(&d) {
                prop_assert_eq!(*o, (c as f32 - z) * s);
            }
        }

        #[test]
        fn representable_constants_decode_exactly(c in -70000.0f32..70000.0, dim in prop::sample::select(vec![64usize, 96, 128])) {
            for dtype in [KvDtype::F16, KvDtype::Bf16] {
                let side = Int8Side::new(dim, dtype);
                let x = constant_vector(c, dim, dtype);
                let (d, m) = encode(&side, &x);
                prop_assert_eq!(decode(&side, &d, &m), x);
            }
        }
    }
}
