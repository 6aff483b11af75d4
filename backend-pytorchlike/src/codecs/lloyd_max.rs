//! The Lloyd–Max codebooks of policy 42 (reference §5.3): optimal scalar quantizers of a
//! standard normal, tabulated at σ = 1 and scaled by σ = 1/√D, the Gaussian approximation of a
//! coordinate of a random unit vector of dimension D.

/// 2-bit centroids (V side).
pub const C2: [f32; 4] = [-1.510_417_6, -0.452_780_8, 0.452_780_8, 1.510_417_6];
/// 2-bit decision boundaries (midpoints of the centroids).
pub const B2: [f32; 3] = [-0.981_599_2, 0.0, 0.981_599_2];
/// 3-bit centroids (K side).
pub const C3: [f32; 8] = [
    -2.151_945_6,
    -1.343_909_3,
    -0.756_005_2,
    -0.245_094_2,
    0.245_094_2,
    0.756_005_2,
    1.343_909_3,
    2.151_945_6,
];
/// 3-bit decision boundaries (midpoints of the centroids).
pub const B3: [f32; 7] = [
    -1.747_927_4,
    -1.049_957_3,
    -0.500_549_7,
    0.0,
    0.500_549_7,
    1.049_957_3,
    1.747_927_4,
];

/// 4-bit centroids: the converged N(0, 1) Lloyd–Max quantizer (Max 1960).
pub const C4: [f32; 16] = [
    -2.732_589_6,
    -2.069_017_2,
    -1.618_046_4,
    -1.256_231_2,
    -0.942_340_5,
    -0.656_759_1,
    -0.388_048_3,
    -0.128_395,
    0.128_395,
    0.388_048_3,
    0.656_759_1,
    0.942_340_5,
    1.256_231_2,
    1.618_046_4,
    2.069_017_2,
    2.732_589_6,
];
/// 4-bit decision boundaries (midpoints of the centroids).
pub const B4: [f32; 15] = [
    -2.400_803_4,
    -1.843_531_8,
    -1.437_138_8,
    -1.099_285_8,
    -0.799_549_8,
    -0.522_403_7,
    -0.258_221_7,
    0.0,
    0.258_221_7,
    0.522_403_7,
    0.799_549_8,
    1.099_285_8,
    1.437_138_8,
    1.843_531_8,
    2.400_803_4,
];

/// A codebook scaled for unit vectors of one dimension: `N` centroids, `B = N − 1` boundaries.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledCodebook<const N: usize, const B: usize> {
    pub centroids: [f32; N],
    pub bounds: [f32; B],
}

impl<const N: usize, const B: usize> ScaledCodebook<N, B> {
    /// `centroids · σ` and `bounds · σ` with `σ = 1/√dim`.
    pub fn new(centroids: &[f32; N], bounds: &[f32; B], dim: usize) -> Self {
        let sigma = (1.0 / (dim as f64).sqrt()) as f32;
        Self {
            centroids: centroids.map(|c| c * sigma),
            bounds: bounds.map(|b| b * sigma),
        }
    }

    /// The bin of `u`: how many boundaries it lies strictly above (a value on a boundary goes
    /// to the lower bin, as `torch.searchsorted(..., side='left')`).
    #[inline]
    pub fn index(&self, u: f32) -> u8 {
        self.bounds.iter().filter(|&&b| u > b).count() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_centroid_midpoints() {
        for (b, c) in [(&B2[..], &C2[..]), (&B3[..], &C3[..]), (&B4[..], &C4[..])] {
            for (i, &bi) in b.iter().enumerate() {
                assert!((bi - (c[i] + c[i + 1]) / 2.0).abs() < 1e-6);
            }
        }
    }

    /// Each centroid is the conditional mean of N(0, 1) over its cell (the Lloyd–Max fixed
    /// point), by numerical integration.
    #[test]
    fn centroids_are_conditional_means_of_the_normal() {
        fn check(c: &[f32], b: &[f32]) {
            let pdf = |x: f64| (-x * x / 2.0).exp();
            for i in 0..c.len() {
                let lo = if i == 0 { -12.0 } else { b[i - 1] as f64 };
                let hi = if i == c.len() - 1 { 12.0 } else { b[i] as f64 };
                let n = 200_000;
                let h = (hi - lo) / n as f64;
                let (mut m0, mut m1) = (0.0, 0.0);
                for k in 0..n {
                    let x = lo + (k as f64 + 0.5) * h;
                    m0 += pdf(x);
                    m1 += x * pdf(x);
                }
                let mean = m1 / m0;
                assert!(
                    (mean - c[i] as f64).abs() < 2e-5,
                    "cell {i}: {mean} vs {}",
                    c[i]
                );
            }
        }
        check(&C2, &B2);
        check(&C3, &B3);
        check(&C4, &B4);
    }

    #[test]
    fn index_is_strict_at_boundaries() {
        let book = ScaledCodebook::new(&C3, &B3, 1);
        assert_eq!(book.index(0.0), 3);
        assert_eq!(book.index(f32::MIN_POSITIVE), 4);
        assert_eq!(book.index(B3[6]), 6);
        assert_eq!(book.index(-10.0), 0);
        assert_eq!(book.index(10.0), 7);
    }
}
