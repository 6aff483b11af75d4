//! Policy 4 with PyTorch-engine semantics: 4-bit codes, half-split packed (byte `j` holds
//! element `j` low and `j + D/2` high), `[scale, zero]` in the model dtype per (token, head).
//! See [`super::affine`] for the formulas and the constant-vector rule; LMDeploy computes int4
//! in fp32, as we do.
//!
//! Non-finite input is sanitized first (NaN → 0, ±inf → ± the dtype's largest value).

use engine_core::codec::{EntryRun, SideBytes, SideCodec};
use engine_core::ops::dequant::{affine_rows, Affine, Packing};
use engine_core::KvDtype;

use super::affine::{load_scale_zero, meta_bytes, sub_mul, AffineParams};

const LEVELS: u8 = 15;

/// The int4 side codec for vectors of `dim` elements (`dim` even).
#[derive(Debug, Clone)]
pub struct Int4Side {
    dim: usize,
    dtype: KvDtype,
}

impl Int4Side {
    /// # Panics
    /// If `dim` is odd: two codes share a byte (the backend rejects odd head dims first).
    pub fn new(dim: usize, dtype: KvDtype) -> Self {
        assert!(dim % 2 == 0, "int4 needs an even head dim, got {dim}");
        Self { dim, dtype }
    }
}

impl SideCodec for Int4Side {
    fn dim(&self) -> usize {
        self.dim
    }

    fn bytes(&self) -> SideBytes {
        SideBytes {
            data: self.dim / 2,
            meta: meta_bytes(self.dtype),
        }
    }

    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        let p = AffineParams::fit(&x[..self.dim], LEVELS, self.dtype);
        let (lo, hi) = x[..self.dim].split_at(self.dim / 2);
        for ((byte, &a), &b) in data[..self.dim / 2].iter_mut().zip(lo).zip(hi) {
            *byte = p.code(a, LEVELS, self.dtype) | p.code(b, LEVELS, self.dtype) << 4;
        }
        p.store(self.dtype, meta);
    }

    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (data, meta) = (&data[..self.dim / 2], EntryRun::single(meta));
        self.decode_run(EntryRun::single(data), meta, out)
    }

    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        let dtype = self.dtype;
        // (c − zero) · scale per element, vectorized.
        affine_rows(
            data,
            Packing::HalfSplitNibbles,
            Affine::SubMul,
            |i| sub_mul(dtype, meta.entry(i)),
            out,
        );
    }

    /// `scale · Σ qᵢ (cᵢ − zero)`, reading both nibbles of each byte in place.
    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let (scale, zero) = load_scale_zero(self.dtype, meta);
        let (lo, hi) = q[..self.dim].split_at(self.dim / 2);
        let acc: f32 = data
            .iter()
            .zip(lo)
            .zip(hi)
            .map(|((&byte, &a), &b)| {
                a * ((byte & 0xF) as f32 - zero) + b * ((byte >> 4) as f32 - zero)
            })
            .sum();
        scale * acc
    }

    /// `out += (p · scale) · (c − zero)`, reading both nibbles of each byte in place.
    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (scale, zero) = load_scale_zero(self.dtype, meta);
        let ps = p * scale;
        let (lo, hi) = out[..self.dim].split_at_mut(self.dim / 2);
        for ((&byte, a), b) in data.iter().zip(lo).zip(hi) {
            *a += ps * ((byte & 0xF) as f32 - zero);
            *b += ps * ((byte >> 4) as f32 - zero);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codecs::packing::nibble_half_split;
    use crate::codecs::test_support::{
        assert_within_affine_bound, constant_vector, vector_strategy, EXAMPLE_X,
    };
    use proptest::prelude::*;

    fn encode(side: &Int4Side, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let b = side.bytes();
        let (mut d, mut m) = (vec![0u8; b.data], vec![0u8; b.meta]);
        side.encode(x, &mut d, &mut m);
        (d, m)
    }

    fn decode(side: &Int4Side, d: &[u8], m: &[u8]) -> Vec<f32> {
        let mut out = vec![f32::NAN; side.dim()];
        side.decode(d, m, &mut out);
        out
    }

    fn unpack(d: &[u8], dim: usize) -> Vec<u8> {
        (0..dim).map(|i| nibble_half_split(d, dim, i)).collect()
    }

    /// Reference §3.7, PyTorch INT4, derived in fp32.
    #[test]
    fn known_answer_fp32() {
        let side = Int4Side::new(8, KvDtype::F32);
        let (d, m) = encode(&side, &EXAMPLE_X);
        assert_eq!(d, [0x8a, 0x94, 0x0b, 0xcf]);
        assert_eq!(unpack(&d, 8), [10, 4, 11, 15, 8, 9, 0, 12]);
        let (scale, zero) = load_scale_zero(KvDtype::F32, &m);
        assert!((scale - 0.3).abs() < 1e-6, "{scale}");
        assert!((zero - 8.333_333).abs() < 1e-5, "{zero}");
    }

    #[test]
    fn known_answer_f16_metadata() {
        let side = Int4Side::new(8, KvDtype::F16);
        let (d, m) = encode(&side, &EXAMPLE_X);
        assert_eq!(d, [0x8a, 0x94, 0x0b, 0xcf]);
        let (scale, zero) = load_scale_zero(KvDtype::F16, &m);
        assert_eq!(scale, KvDtype::F16.round(0.3));
        assert_eq!(zero, KvDtype::F16.round(8.333_333));
    }

    #[test]
    #[should_panic(expected = "even head dim")]
    fn odd_dim_is_refused() {
        Int4Side::new(7, KvDtype::F16);
    }

    #[test]
    fn constant_vectors_decode_exactly() {
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::F32] {
            let side = Int4Side::new(96, dtype);
            for c in [0.0f32, 1.0, -3.7, 1234.5, 65504.0, -1e-6] {
                let x = constant_vector(c, 96, dtype);
                let (d, m) = encode(&side, &x);
                assert_eq!(decode(&side, &d, &m), x, "{dtype:?} constant {c}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn error_within_scale_half_plus_metadata_rounding(
            x in vector_strategy(&[64, 96, 128]),
            dtype in prop::sample::select(vec![KvDtype::F16, KvDtype::Bf16]),
        ) {
            let side = Int4Side::new(x.len(), dtype);
            let (d, m) = encode(&side, &x);
            let out = decode(&side, &d, &m);
            assert_within_affine_bound(&x, &out, &m, LEVELS, dtype);
        }

        #[test]
        fn packed_codes_unpack_to_the_quantizer_codes(x in vector_strategy(&[64, 96, 128])) {
            let dtype = KvDtype::F16;
            let side = Int4Side::new(x.len(), dtype);
            let (d, m) = encode(&side, &x);
            let p = AffineParams::fit(&x, LEVELS, dtype);
            let want: Vec<u8> = x.iter().map(|&v| p.code(v, LEVELS, dtype)).collect();
            let codes = unpack(&d, x.len());
            prop_assert_eq!(&codes, &want);
            let (s, z) = load_scale_zero(dtype, &m);
            let out = decode(&side, &d, &m);
            for (o, &c) in out.iter().zip(&codes) {
                prop_assert_eq!(*o, (c as f32 - z) * s);
            }
        }

        #[test]
        fn representable_constants_decode_exactly(c in -70000.0f32..70000.0, dim in prop::sample::select(vec![64usize, 96, 128])) {
            for dtype in [KvDtype::F16, KvDtype::Bf16] {
                let side = Int4Side::new(dim, dtype);
                let x = constant_vector(c, dim, dtype);
                let (d, m) = encode(&side, &x);
                prop_assert_eq!(decode(&side, &d, &m), x);
            }
        }
    }
}
