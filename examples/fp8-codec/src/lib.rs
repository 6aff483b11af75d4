//! An example kvq codec plugin: fp8 (e4m3) K and V with one scale per token and head.
//!
//! It lives outside the backend crates and needs only `engine-core`: implement
//! [`SideCodec`] (or the whole [`engine_core::KvCodec`]), then announce the codec with one
//! `inventory::submit!`. A config then selects it by name with the pytorch backend:
//!
//! ```toml
//! [engine]
//! backend = "pytorch"
//! quant_policy = "fp8_e4m3"
//! ```
//!
//! The binary that runs the engine must link this crate (`use fp8_codec as _;`), or the
//! linker drops its registration.

use std::sync::Arc;

use engine_core::codec::{CodecBuildParams, CodecRegistration, KvPair, SideBytes, SideCodec};
use engine_core::dtype::sanitize;
use engine_core::{ConfigError, KvCodec, KvDtype};
use float8::F8E4M3;

/// Largest finite e4m3 value.
const E4M3_MAX: f32 = 448.0;

/// fp8 e4m3 values scaled so the token's largest magnitude maps to 448; the scale is stored
/// in the model dtype. 8 bits per element plus 16 bits per token (f16/bf16 models).
#[derive(Debug, Clone)]
pub struct Fp8Side {
    dim: usize,
    dtype: KvDtype,
    /// e4m3 byte → f32, so reads are a table lookup.
    table: Arc<[f32; 256]>,
}

impl Fp8Side {
    pub fn new(dim: usize, dtype: KvDtype) -> Self {
        let mut table = [0f32; 256];
        for (bits, v) in table.iter_mut().enumerate() {
            *v = F8E4M3::from_bits(bits as u8).to_f32();
        }
        Self {
            dim,
            dtype,
            table: Arc::new(table),
        }
    }

    /// Stored scale; never 0, so a zero vector decodes to zeros.
    fn scale(&self, meta: &[u8]) -> f32 {
        self.dtype.load(meta)
    }
}

impl SideCodec for Fp8Side {
    fn dim(&self) -> usize {
        self.dim
    }
    fn bytes(&self) -> SideBytes {
        SideBytes {
            data: self.dim,
            meta: self.dtype.size_bytes(),
        }
    }
    /// NaN is stored as 0 and ±inf as the dtype's largest value, like the built-in codecs.
    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        let amax = x
            .iter()
            .map(|v| sanitize(*v, self.dtype).abs())
            .fold(0f32, f32::max);
        let scale = self.dtype.round_saturating(amax / E4M3_MAX);
        let scale = if scale > 0.0 && scale.is_finite() {
            scale
        } else {
            1.0
        };
        self.dtype.store(scale, meta);
        for (b, v) in data.iter_mut().zip(x) {
            let y = (sanitize(*v, self.dtype) / scale).clamp(-E4M3_MAX, E4M3_MAX);
            *b = F8E4M3::from_f32(y).to_bits();
        }
    }
    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let s = self.scale(meta);
        for (o, b) in out.iter_mut().zip(data) {
            *o = self.table[*b as usize] * s;
        }
    }
    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let acc: f32 = q
            .iter()
            .zip(data)
            .map(|(q, b)| q * self.table[*b as usize])
            .sum();
        acc * self.scale(meta)
    }
    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let ps = p * self.scale(meta);
        for (o, b) in out.iter_mut().zip(data) {
            *o += ps * self.table[*b as usize];
        }
    }
}

/// Builds the fp8 codec for a model's head dims.
pub fn build(p: &CodecBuildParams) -> Result<Box<dyn KvCodec>, ConfigError> {
    Ok(Box::new(KvPair::new(
        "fp8_e4m3",
        None,
        Arc::new(Fp8Side::new(p.head_dim_k, p.dtype)),
        Arc::new(Fp8Side::new(p.head_dim_v, p.dtype)),
    )))
}

engine_core::inventory::submit! {
    CodecRegistration {
        name: "fp8_e4m3",
        description: "fp8 e4m3 K and V with a per-token scale (example plugin)",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine_core::testing;

    fn codec(d: usize) -> Box<dyn KvCodec> {
        build(&CodecBuildParams {
            head_dim_k: d,
            head_dim_v: d,
            dtype: KvDtype::F16,
        })
        .unwrap()
    }

    #[test]
    fn round_trip_error_is_within_e4m3_precision() {
        let seed = testing::fresh_seed("fp8 round trip");
        let mut r = testing::rng(seed);
        let c = codec(64);
        for _ in 0..100 {
            let x = testing::gaussian(&mut r, 64);
            let y = testing::round_trip_k(c.as_ref(), &x);
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in x.iter().zip(&y) {
                // e4m3 keeps 3 mantissa bits (relative step 2^-3, error ≤ 2^-4), plus
                // the subnormal step near zero and the f16 rounding of the scale.
                let tol = a.abs() * (1.0 / 16.0 + 1e-3) + amax / E4M3_MAX * 2f32.powi(-9) + 1e-6;
                assert!((a - b).abs() <= tol, "{a} -> {b}");
            }
        }
    }

    #[test]
    fn zero_and_non_finite_inputs_are_documented() {
        let c = codec(64);
        assert_eq!(testing::round_trip_v(c.as_ref(), &[0.0; 64]), vec![0.0; 64]);
        testing::check_non_finite_input_gives_finite_output(c.as_ref());
    }

    #[test]
    fn fused_forms_match_decode() {
        testing::check_fused_forms(codec(128).as_ref(), testing::fresh_seed("fp8 fused"));
    }

    #[test]
    fn is_registered_by_name() {
        assert!(engine_core::codec::registered_codec_names().contains(&"fp8_e4m3"));
    }
}
