//! The floating-point type the model runs in, which is also the type of the fp16 cache and of
//! quantization metadata (scales, zeros, norms), as in LMDeploy.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// Element type of an unquantized cache and of codec metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    #[serde(alias = "float16", alias = "half")]
    F16,
    #[serde(alias = "bfloat16")]
    Bf16,
    /// Full precision; used by f32 CPU models and by known-answer tests derived in fp32.
    #[serde(alias = "float32")]
    F32,
}

impl KvDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            KvDtype::F16 | KvDtype::Bf16 => 2,
            KvDtype::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
        }
    }

    /// Rounds `x` to this type (round to nearest even) and back; NaN and ±inf pass through.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F16 => f16::from_f32(x).to_f32(),
            KvDtype::Bf16 => bf16::from_f32(x).to_f32(),
            KvDtype::F32 => x,
        }
    }

    /// Largest finite value of the type.
    pub fn max_finite(self) -> f32 {
        match self {
            KvDtype::F16 => f16::MAX.to_f32(),
            KvDtype::Bf16 => bf16::MAX.to_f32(),
            KvDtype::F32 => f32::MAX,
        }
    }

    /// Rounds like [`KvDtype::round`] but clamps to the finite range first, so metadata of a
    /// huge vector stays finite (a stored inf would decode to NaN through `inf * 0`).
    #[inline]
    pub fn round_saturating(self, x: f32) -> f32 {
        let m = self.max_finite();
        self.round(x.clamp(-m, m))
    }

    /// Writes `x` in this type, little-endian, into `out` (`size_bytes()` long).
    #[inline]
    pub fn store(self, x: f32, out: &mut [u8]) {
        match self {
            KvDtype::F16 => out[..2].copy_from_slice(&f16::from_f32(x).to_le_bytes()),
            KvDtype::Bf16 => out[..2].copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
            KvDtype::F32 => out[..4].copy_from_slice(&x.to_le_bytes()),
        }
    }

    /// Reads a value written by [`KvDtype::store`].
    #[inline]
    pub fn load(self, bytes: &[u8]) -> f32 {
        match self {
            KvDtype::F16 => f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            KvDtype::Bf16 => bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32(),
            KvDtype::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        }
    }

    /// Reads the `i`-th value of a packed array of this type.
    #[inline]
    pub fn load_at(self, bytes: &[u8], i: usize) -> f32 {
        let s = self.size_bytes();
        self.load(&bytes[i * s..(i + 1) * s])
    }

    /// Writes the `i`-th value of a packed array of this type.
    #[inline]
    pub fn store_at(self, x: f32, bytes: &mut [u8], i: usize) {
        let s = self.size_bytes();
        self.store(x, &mut bytes[i * s..(i + 1) * s]);
    }
}

/// Replaces values a quantizer cannot represent: NaN becomes 0 and ±inf the largest finite
/// value of `dtype`. Integer and Lloyd-Max codecs apply this on encode so one bad activation
/// cannot turn every later attention output into NaN; the fp16 cache stores values unchanged.
#[inline]
pub fn sanitize(x: f32, dtype: KvDtype) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        let m = dtype.max_finite();
        x.clamp(-m, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_round_trips_every_dtype() {
        for dt in [KvDtype::F16, KvDtype::Bf16, KvDtype::F32] {
            let mut buf = vec![0u8; dt.size_bytes() * 3];
            for (i, x) in [1.5f32, -0.25, 1000.0].into_iter().enumerate() {
                dt.store_at(x, &mut buf, i);
                assert_eq!(dt.load_at(&buf, i), dt.round(x));
            }
        }
    }

    #[test]
    fn saturating_round_keeps_huge_values_finite() {
        assert!(KvDtype::F16.round(1e6).is_infinite());
        assert_eq!(KvDtype::F16.round_saturating(1e6), 65504.0);
        assert_eq!(KvDtype::F16.round_saturating(-1e6), -65504.0);
    }

    #[test]
    fn sanitize_maps_non_finite_to_documented_values() {
        assert_eq!(sanitize(f32::NAN, KvDtype::F16), 0.0);
        assert_eq!(sanitize(f32::INFINITY, KvDtype::F16), 65504.0);
        assert_eq!(
            sanitize(f32::NEG_INFINITY, KvDtype::Bf16),
            -bf16::MAX.to_f32()
        );
        assert_eq!(sanitize(3.0, KvDtype::F16), 3.0);
    }
}
