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
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
            KvDtype::Bf16 => bf16::from_f32(x).to_f32(),
            KvDtype::F32 => x,
        }
    }

    /// [`KvDtype::round`] of every element, vectorized for f16 (F16C converts exactly as
    /// `round` does): encoders that emulate T arithmetic round whole vectors at each step.
    pub fn round_slice(self, xs: &mut [f32]) {
        match self {
            KvDtype::F16 => {
                let mut buf = [0u8; 128];
                for chunk in xs.chunks_mut(64) {
                    let b = &mut buf[..2 * chunk.len()];
                    crate::ops::simd::f32_to_f16(chunk, b);
                    crate::ops::simd::f16_to_f32(b, chunk);
                }
            }
            KvDtype::Bf16 => xs.iter_mut().for_each(|x| *x = self.round(*x)),
            KvDtype::F32 => {}
        }
    }

    /// Largest finite value of the type.
    #[inline(always)]
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
            KvDtype::F16 => out[..2].copy_from_slice(&f32_to_f16_bits(x).to_le_bytes()),
            KvDtype::Bf16 => out[..2].copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
            KvDtype::F32 => out[..4].copy_from_slice(&x.to_le_bytes()),
        }
    }

    /// Reads a value written by [`KvDtype::store`].
    #[inline]
    pub fn load(self, bytes: &[u8]) -> f32 {
        match self {
            KvDtype::F16 => f16_bits_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
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

/// f32 to f16 bits, rounding to nearest even, exactly as [`half::f16::from_f32`] (overflow to
/// ±inf, f16 subnormals, NaN kept NaN and made quiet), inline and without a feature check:
/// codecs round every element to the model dtype.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return sign | 0x7E00 | ((abs >> 13) & 0x03FF) as u16;
    }
    if abs >= 0x477F_F000 {
        // 65520 and above (ties to the even 65536): ±inf.
        return sign | 0x7C00;
    }
    if abs < 0x3880_0000 {
        // Below 2^-14: a multiple of 2^-24. Scaling by 2^24 is exact; adding and removing
        // 2^23 rounds to the nearest even integer.
        let v = f32::from_bits(abs) * 16_777_216.0;
        return sign | ((v + 8_388_608.0) - 8_388_608.0) as u16;
    }
    // Normal: round the mantissa to 10 bits (a carry moves into the exponent), re-bias.
    let r = abs + 0x0FFF + ((abs >> 13) & 1);
    sign | ((r - 0x3800_0000) >> 13) as u16
}

/// f16 bits to f32, exactly as [`half::f16::to_f32`] (NaN payloads kept, made quiet), inline
/// and without a feature check: metadata is read one value at a time in hot loops.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x03FF) as u32;
    match exp {
        0 => {
            // Zero or subnormal: man · 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            f32::from_bits(v.to_bits() | sign)
        }
        0x1F if man == 0 => f32::from_bits(sign | 0x7F80_0000),
        0x1F => f32::from_bits(sign | 0x7FC0_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
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
    fn round_slice_equals_round_per_element() {
        use rand::Rng;
        let mut r = crate::testing::rng(crate::testing::fresh_seed("round_slice"));
        let mut x: Vec<f32> = (0..203)
            .map(|i| r.random_range(-1.0f32..1.0) * 10f32.powi(i % 13 - 8))
            .collect();
        x.extend([
            65519.0,
            65520.0,
            -7e4,
            6e-8,
            3e-8,
            f32::INFINITY,
            -0.0,
            2.5e38,
        ]);
        for dt in [KvDtype::F16, KvDtype::Bf16, KvDtype::F32] {
            let mut got = x.clone();
            dt.round_slice(&mut got);
            for (g, v) in got.iter().zip(&x) {
                assert_eq!(g.to_bits(), dt.round(*v).to_bits(), "{dt:?} {v}");
            }
        }
    }

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
    fn f16_conversion_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            assert_eq!(got.to_bits(), want.to_bits(), "f16 bits {h:#06x}");
        }
    }

    /// Every f16 value, its f32 neighbours, the midpoints between consecutive f16 values and
    /// their neighbours, and a sample of arbitrary bit patterns.
    #[test]
    fn f16_rounding_matches_half() {
        let check = |x: f32| {
            let want = f16::from_f32(x);
            assert_eq!(
                f32_to_f16_bits(x),
                want.to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
            let r = KvDtype::F16.round(x);
            assert_eq!(r.to_bits(), want.to_f32().to_bits(), "round {x:e}");
        };
        let near = |x: f32| {
            let b = x.to_bits();
            [b.wrapping_sub(1), b, b.wrapping_add(1)].map(f32::from_bits)
        };
        for h in 0..=u16::MAX {
            let x = f16::from_bits(h).to_f32();
            near(x).into_iter().for_each(check);
            let next = f16::from_bits(h.wrapping_add(1)).to_f32();
            if x.is_finite() && next.is_finite() && (h & 0x7FFF) != 0x7BFF {
                near((x + next) / 2.0).into_iter().for_each(check);
            }
        }
        for x in [
            65504.0f32,
            65519.99,
            65520.0,
            1e30,
            -1e-30,
            5.9e-8,
            2.98e-8,
            2.9802322e-8,
        ] {
            near(x).into_iter().for_each(check);
            near(-x).into_iter().for_each(check);
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            check(f32::from_bits(state as u32));
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
