//! Shared pieces of the codec unit tests: the reference's worked-example vector, input
//! strategies, and the int8/int4 error bound.

use engine_core::KvDtype;
use proptest::prelude::*;

use super::affine::load_scale_zero;

/// Reference §3.7 / §7.4 input (D = 8).
pub const EXAMPLE_X: [f32; 8] = [0.50, -1.25, 0.75, 2.00, -0.10, 0.30, -2.50, 1.10];

/// `dim` copies of `c` rounded to `dtype` (a constant the dtype represents).
pub fn constant_vector(c: f32, dim: usize, dtype: KvDtype) -> Vec<f32> {
    vec![dtype.round_saturating(c); dim]
}

/// Vectors of one of `dims` elements: `offset + spread · u`, `u` uniform in [−1, 1], with the
/// spread from 1e-6 (near-constant vectors, the degenerate-scale path) to 100 and offsets that
/// push the zero point around.
pub fn vector_strategy(dims: &'static [usize]) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::sample::select(dims),
        prop_oneof![Just(0.0f32), -60.0f32..60.0],
        -6.0f32..2.0,
    )
        .prop_flat_map(|(dim, offset, log_spread)| {
            let spread = 10f32.powf(log_spread);
            prop::collection::vec(-1.0f32..1.0, dim)
                .prop_map(move |u| u.iter().map(|v| offset + spread * v).collect())
        })
}

/// Checks a decoded int8/int4 vector against the bound a correct encoder guarantees.
///
/// With `s, z` the unrounded f32 pair and `s', z'` the stored (dtype-rounded) pair, a code
/// `q = trunc(x/s + z + 0.5)` satisfies `|x − (q − z)s| ≤ s/2`, and
/// `(q − z')s' − (q − z)s = (q − z)(s' − s) + (z − z')s'`, with `|q − z| ≤ |x|/s + 1/2`:
///
/// `|x̂ − x| ≤ s/2 + (|x|/s + 1/2)·|s' − s| + |z' − z|·s' + f32 rounding`.
///
/// On the degenerate-range path every element decodes to `round(min)`:
/// `|x̂ − x| ≤ (x − min) + |round(min) − min|`.
pub fn assert_within_affine_bound(x: &[f32], out: &[f32], meta: &[u8], levels: u8, dtype: KvDtype) {
    let mn = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let s = (mx - mn) / levels as f32;
    let z = -mn / s;
    let (s_r, z_r) = (dtype.round(s), dtype.round(z));
    let fallback = !(s_r > 0.0 && s_r.is_finite() && z_r.is_finite());
    let (stored_s, stored_z) = load_scale_zero(dtype, meta);
    if fallback {
        assert_eq!(
            (stored_s, stored_z),
            (1.0, dtype.round(-mn)),
            "degenerate-range metadata"
        );
    } else {
        assert_eq!(
            (stored_s, stored_z),
            (s_r, z_r),
            "stored metadata is the rounded pair"
        );
    }
    for (i, (&xi, &oi)) in x.iter().zip(out).enumerate() {
        assert!(oi.is_finite(), "element {i} decodes to {oi}");
        let (xi64, oi64) = (xi as f64, oi as f64);
        let bound = if fallback {
            (xi64 - mn as f64) + (dtype.round(mn) as f64 - mn as f64).abs()
        } else {
            let (s, z, s_r, z_r) = (s as f64, z as f64, s_r as f64, z_r as f64);
            s / 2.0 + (xi64.abs() / s + 0.5) * (s_r - s).abs() + (z_r - z).abs() * s_r
        };
        // f32 rounding of the encode and decode arithmetic, generously.
        let slack = if fallback {
            1e-6 * (xi64.abs() + oi64.abs())
        } else {
            1e-6 * (xi64.abs() + oi64.abs() + (z as f64 * s as f64).abs() + 256.0 * s as f64)
        };
        let err = (oi64 - xi64).abs();
        assert!(
            err <= bound + slack,
            "element {i}: x {xi} decodes to {oi}, error {err:e} > bound {bound:e} (scale {s}, zero {z}, stored {stored_s}/{stored_z}, fallback {fallback})"
        );
    }
}
