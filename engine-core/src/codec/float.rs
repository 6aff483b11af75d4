//! Policy 0: the unquantized cache, in f16, bf16 or f32.

use super::{decode_entries, EntryRun, SideBytes, SideCodec};
use crate::dtype::KvDtype;

/// Stores values in the model dtype. Non-finite values are stored as they are (f16 and bf16
/// represent NaN and ±inf; values beyond f16's range become ±inf, as in any f16 cache).
#[derive(Debug, Clone)]
pub struct FloatSide {
    pub dim: usize,
    pub dtype: KvDtype,
}

impl SideCodec for FloatSide {
    fn dim(&self) -> usize {
        self.dim
    }
    fn bytes(&self) -> SideBytes {
        SideBytes {
            data: self.dim * self.dtype.size_bytes(),
            meta: 0,
        }
    }
    fn encode(&self, x: &[f32], data: &mut [u8], _meta: &mut [u8]) {
        if self.dtype == KvDtype::F16 {
            return crate::ops::simd::f32_to_f16(&x[..self.dim], data);
        }
        for (i, &v) in x.iter().enumerate() {
            self.dtype.store_at(v, data, i);
        }
    }
    fn decode(&self, data: &[u8], _meta: &[u8], out: &mut [f32]) {
        if self.dtype == KvDtype::F16 {
            return crate::ops::simd::f16_to_f32(data, &mut out[..self.dim]);
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.dtype.load_at(data, i);
        }
    }
    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        if self.dtype == KvDtype::F16 {
            return crate::ops::dequant::f16_rows(data, out);
        }
        decode_entries(self.dim, data, meta, out, |d, m, o| self.decode(d, m, o))
    }
    fn dot(&self, q: &[f32], data: &[u8], _meta: &[u8]) -> f32 {
        q.iter()
            .enumerate()
            .map(|(i, &qi)| qi * self.dtype.load_at(data, i))
            .sum()
    }
    fn axpy(&self, p: f32, data: &[u8], _meta: &[u8], out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o += p * self.dtype.load_at(data, i);
        }
    }
}

/// The policy-0 codec for the given head dims and dtype.
pub fn float_codec(head_dim_k: usize, head_dim_v: usize, dtype: KvDtype) -> super::KvPair {
    use std::sync::Arc;
    let mut c = super::KvPair::new(
        "none",
        Some(0),
        Arc::new(FloatSide {
            dim: head_dim_k,
            dtype,
        }),
        Arc::new(FloatSide {
            dim: head_dim_v,
            dtype,
        }),
    );
    c.gpu_kernel = Some("float".into());
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::KvCodec;

    #[test]
    fn f16_round_trip_is_f16_rounding_and_keeps_non_finite() {
        let c = float_codec(4, 4, KvDtype::F16);
        let x = [0.1f32, f32::NAN, f32::INFINITY, 1e6];
        let mut data = vec![0u8; 8];
        c.encode_k(&x, &mut data, &mut []);
        let mut out = [0f32; 4];
        c.decode_k(&data, &[], &mut out);
        assert_eq!(out[0], KvDtype::F16.round(0.1));
        assert!(out[1].is_nan());
        assert_eq!(out[2], f32::INFINITY);
        assert_eq!(out[3], f32::INFINITY);
    }

    #[test]
    fn fused_score_equals_dot_of_decoded() {
        let c = float_codec(4, 4, KvDtype::Bf16);
        let x = [0.3f32, -1.7, 2.5, 0.01];
        let q = [1.0f32, 2.0, -0.5, 4.0];
        let mut data = vec![0u8; 8];
        c.encode_k(&x, &mut data, &mut []);
        let mut k = [0f32; 4];
        c.decode_k(&data, &[], &mut k);
        assert_eq!(c.score_k(&q, &data, &[]), crate::codec::dot(&q, &k));
    }
}
