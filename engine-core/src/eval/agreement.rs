//! Row-by-row agreement of a model's logits with a reference's: the top-1 token, strictly and
//! up to near ties at f16 precision, and KL(reference ‖ other).
//!
//! A model whose matrix products take f16 inputs (the GPU runner's cuBLAS GEMMs) cannot
//! reproduce an f32 reference's ordering of two logits closer than its own rounding, so a
//! strict top-1 rate counts such swaps as disagreements although neither pick is wrong.
//! [`Agreement::top1_f16`] forgives exactly those swaps and nothing wider; the strict rate and
//! the number of near ties are reported with it so a forgiving bound never hides how many
//! positions it forgave.

use crate::error::KvqError;
use crate::ops::log_softmax;
use crate::sampling::argmax;

/// f16's machine epsilon, 2⁻¹⁰: f16 keeps 10 fraction bits, so rounding an input to f16
/// moves it by at most 2⁻¹¹ of its magnitude, and a product of two rounded inputs moves by at
/// most (1 + 2⁻¹¹)² − 1 ≈ 2⁻¹⁰ of its own.
pub const F16_EPS: f32 = 1.0 / 1024.0;

/// Whether two reference logits `a` and `b` are too close for a model with f16 GEMM inputs to
/// order: `|a − b| ≤ 2⁻¹⁰ · (|a| + |b|)`, the relative rounding of a product of two f16 inputs
/// ([`F16_EPS`]) allowed on each logit, in opposite directions. That is two to four f16 units in
/// the last place of the larger logit; at 15 (four standard deviations of the random test
/// models' logits) about 0.03. It is a scale, not a worst-case bound: the worst case of the
/// final GEMM alone is 2⁻¹⁰ · Σ|hᵢ·wᵢ| per logit, wider wherever its terms cancel, and no bound
/// follows the rounding of earlier layers. Measured on the GPU model test's random model
/// (the `logit_agreement` integration test, six seeds): rounding every weight to f16 moved the
/// top-two gap by at most 0.84 of this tolerance, and 8 to 14 of 316 positions were near ties,
/// so every other position must keep the reference's token exactly.
pub fn f16_tie(a: f32, b: f32) -> bool {
    (a - b).abs() <= F16_EPS * (a.abs() + b.abs())
}

/// How `[rows, vocab]` logits agree with a reference's, counted over rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    pub rows: usize,
    /// Rows whose most likely token (the first index of the largest logit) is the reference's.
    pub top1: usize,
    /// Rows whose most likely token is the reference's, or one whose reference logit is an
    /// [`f16_tie`] with the reference's largest.
    pub top1_f16: usize,
    /// Rows whose reference top two logits are an [`f16_tie`]: where [`Self::top1_f16`] can
    /// forgive a swap.
    pub near_ties: usize,
    /// Σ over rows of KL(reference ‖ other), each row's clamped at 0 against rounding; NaN
    /// when any row is not finite.
    pub kld_sum: f64,
}

impl Agreement {
    /// The strict top-1 agreement rate.
    pub fn top1_rate(&self) -> f64 {
        self.top1 as f64 / self.rows as f64
    }

    /// The top-1 agreement rate up to f16 near ties.
    pub fn top1_f16_rate(&self) -> f64 {
        self.top1_f16 as f64 / self.rows as f64
    }

    /// Mean KL(reference ‖ other) per row.
    pub fn mean_kld(&self) -> f64 {
        self.kld_sum / self.rows as f64
    }
}

/// Compares `other` with `reference` row by row (both `[rows, vocab]`). A row with a
/// non-finite logit on either side agrees on nothing and makes the KL sum NaN.
pub fn agreement(reference: &[f32], other: &[f32], vocab: usize) -> Result<Agreement, KvqError> {
    if vocab == 0 || reference.len() != other.len() || reference.len() % vocab != 0 {
        return Err(KvqError::InvalidArgument(format!(
            "comparing {} logits with {} reference logits in rows of {vocab}",
            other.len(),
            reference.len()
        )));
    }
    let mut a = Agreement {
        rows: reference.len() / vocab,
        top1: 0,
        top1_f16: 0,
        near_ties: 0,
        kld_sum: 0.0,
    };
    for (r, o) in reference.chunks_exact(vocab).zip(other.chunks_exact(vocab)) {
        a.kld_sum += kl_div(r, o);
        if !r.iter().chain(o).all(|x| x.is_finite()) {
            continue;
        }
        let (best, pick) = (argmax(r) as usize, argmax(o) as usize);
        a.top1 += (pick == best) as usize;
        a.top1_f16 += (pick == best || f16_tie(r[best], r[pick])) as usize;
        let second = r
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best)
            .map(|(_, &x)| x)
            .fold(f32::NEG_INFINITY, f32::max);
        a.near_ties += f16_tie(r[best], second) as usize;
    }
    Ok(a)
}

/// KL(p ‖ q) of the softmaxes of two logit rows, clamped at 0.
fn kl_div(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    let k: f64 = lp.iter().zip(&lq).map(|(&a, &b)| a.exp() * (a - b)).sum();
    if k.is_nan() {
        k
    } else {
        k.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of 4: a clear winner (token 2), then a near tie of tokens 0 and 3 at 16.
    fn reference() -> Vec<f32> {
        vec![1.0, -2.0, 9.0, 0.5, 16.0, 3.0, -1.0, 15.99]
    }

    #[test]
    fn identical_logits_agree_everywhere() {
        let r = reference();
        let a = agreement(&r, &r, 4).unwrap();
        assert_eq!((a.rows, a.top1, a.top1_f16, a.near_ties), (2, 2, 2, 1));
        assert_eq!(a.kld_sum, 0.0);
    }

    #[test]
    fn a_swap_inside_a_near_tie_is_forgiven_only_by_the_f16_rate() {
        let r = reference();
        let mut o = r.clone();
        o.swap(4, 7);
        let a = agreement(&r, &o, 4).unwrap();
        assert_eq!((a.top1, a.top1_f16, a.near_ties), (1, 2, 1));
        assert!(a.kld_sum > 0.0);
        assert_eq!(a.top1_rate(), 0.5);
        assert_eq!(a.top1_f16_rate(), 1.0);
    }

    #[test]
    fn a_swap_just_wider_than_f16_rounding_is_a_disagreement() {
        // 16 and 15.9: 0.1 apart, more than 2⁻¹⁰ · 31.9 ≈ 0.031.
        let r = vec![16.0, 3.0, -1.0, 15.9];
        let o = vec![15.9, 3.0, -1.0, 16.0];
        let a = agreement(&r, &o, 4).unwrap();
        assert_eq!((a.top1, a.top1_f16, a.near_ties), (0, 0, 0));
        // A clear winner swapped with a loser is a disagreement either way.
        let a = agreement(&[9.0, 1.0], &[1.0, 9.0], 2).unwrap();
        assert_eq!((a.top1, a.top1_f16), (0, 0));
    }

    #[test]
    fn the_tie_tolerance_scales_with_the_logits() {
        assert!(f16_tie(16.0, 15.99));
        assert!(!f16_tie(16.0, 15.9));
        assert!(f16_tie(1000.0, 999.0));
        assert!(!f16_tie(0.01, 0.0));
        assert!(!f16_tie(f32::NAN, f32::NAN));
    }

    #[test]
    fn non_finite_logits_never_agree() {
        let r = reference();
        let mut o = r.clone();
        o[2] = f32::NAN;
        let a = agreement(&r, &o, 4).unwrap();
        assert_eq!((a.top1, a.top1_f16), (1, 1));
        assert!(a.kld_sum.is_nan());
        let o = vec![f32::NAN; 8];
        let a = agreement(&r, &o, 4).unwrap();
        assert_eq!((a.top1, a.top1_f16), (0, 0));
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let r = reference();
        assert!(agreement(&r, &r[..4], 4).is_err());
        assert!(agreement(&r, &r, 3).is_err());
        assert!(agreement(&r, &r, 0).is_err());
    }
}
