//! The asymmetric per-vector parameters of the PyTorch engine's int8/int4 cache
//! (reference §2.3, §7.1): `scale = (max − min) / levels`, a *float* zero point
//! `zero = −min / scale`, codes `trunc(x / scale + zero + 0.5)`, decode `(q − zero) · scale`.
//!
//! Codes are computed in f32 from the unrounded scale and zero (as the reference's fp32 worked
//! example); the stored pair is rounded to the model dtype and decoding uses the rounded pair,
//! as LMDeploy's kernels do.
//!
//! Deviation from LMDeploy: when the dtype-rounded scale is 0 or not finite, or the rounded
//! zero point is not finite (a constant or near-constant vector, where LMDeploy divides by
//! zero and stores garbage), we store `scale = 1`, `zero = −min` and all codes 0, so every
//! element decodes to `min`: a constant vector whose value the dtype represents decodes exactly
//! to itself, and nothing decodes to NaN.

use engine_core::dtype::sanitize;
use engine_core::KvDtype;

/// Scale and zero point of one vector, unrounded (for encoding) and as stored (for decoding).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffineParams {
    /// Unrounded f32 scale; meaningless when `fallback`.
    pub scale: f32,
    /// Unrounded f32 zero point; meaningless when `fallback`.
    pub zero: f32,
    /// The scale as stored in the model dtype.
    pub stored_scale: f32,
    /// The zero point as stored in the model dtype.
    pub stored_zero: f32,
    /// The degenerate-range rule applies: every code is 0 and decodes to `min`.
    pub fallback: bool,
}

impl AffineParams {
    /// Fits the parameters to `x` (sanitized with [`sanitize`] first) for codes `0..=levels`.
    pub fn fit(x: &[f32], levels: u8, dtype: KvDtype) -> Self {
        let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
        for v in x.iter().map(|&v| sanitize(v, dtype)) {
            mn = mn.min(v);
            mx = mx.max(v);
        }
        let scale = (mx - mn) / levels as f32;
        let zero = -mn / scale;
        let stored_scale = dtype.round(scale);
        let stored_zero = dtype.round(zero);
        if stored_scale > 0.0 && stored_scale.is_finite() && stored_zero.is_finite() {
            Self {
                scale,
                zero,
                stored_scale,
                stored_zero,
                fallback: false,
            }
        } else {
            Self {
                scale: 1.0,
                zero: -mn,
                stored_scale: 1.0,
                stored_zero: dtype.round_saturating(-mn),
                fallback: true,
            }
        }
    }

    /// The code of one (raw, unsanitized) element, saturated to `0..=levels`.
    #[inline]
    pub fn code(&self, x: f32, levels: u8, dtype: KvDtype) -> u8 {
        if self.fallback {
            return 0;
        }
        // `as u8` truncates toward zero and saturates (NaN → 0), LMDeploy's float→uint8.
        let q = (sanitize(x, dtype) / self.scale + self.zero + 0.5) as u8;
        q.min(levels)
    }

    /// Writes `[scale, zero]` in the model dtype.
    pub fn store(&self, dtype: KvDtype, meta: &mut [u8]) {
        dtype.store_at(self.stored_scale, meta, 0);
        dtype.store_at(self.stored_zero, meta, 1);
    }
}

/// Reads the stored `(scale, zero)`.
#[inline]
pub fn load_scale_zero(dtype: KvDtype, meta: &[u8]) -> (f32, f32) {
    (dtype.load_at(meta, 0), dtype.load_at(meta, 1))
}

/// `[zero, scale]` of the stored metadata: the per-vector coefficients of the vectorized
/// `(c − zero) · scale`.
#[inline]
pub fn sub_mul(dtype: KvDtype, meta: &[u8]) -> [f32; 2] {
    let (scale, zero) = load_scale_zero(dtype, meta);
    [zero, scale]
}

/// Bytes of the `[scale, zero]` metadata.
pub fn meta_bytes(dtype: KvDtype) -> usize {
    2 * dtype.size_bytes()
}
